//! The test harness: a fresh PKCS#11 token in a temporary directory (made by the
//! project's own `softhsm/create-token.sh`, or `kryoptic/create-token.sh` when
//! `KMS_TEST_TOKEN=kryoptic`), the real `kms` binary on 127.0.0.1 port 0, and readiness
//! by the gRPC health check. Every server gets a principal `admin` (`*=Administrator`),
//! made with `kms token create` before the first start (or by the server itself on the
//! embedded default); the clients the harness hands out authenticate with its token.
#![allow(dead_code)]

pub mod faults;
pub mod import;
pub mod postgres;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kms::cli::connect::{AuthedChannel, BearerAuth};
use kms::proto::audit_service_client::AuditServiceClient;
use kms::proto::import_token_service_client::ImportTokenServiceClient;
use kms::proto::key_service_client::KeyServiceClient;
use tempfile::TempDir;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// A token of its own, in a temporary directory.
pub struct TestToken {
    pub dir: TempDir,
    pub label: String,
    pub pin_file: PathBuf,
    pub module: PathBuf,
    /// What the module needs in its environment (SOFTHSM2_CONF or KRYOPTIC_CONF).
    pub env: Vec<(String, String)>,
}

/// Which soft token the suite runs against: `KMS_TEST_TOKEN` = softhsm (default) or kryoptic.
pub fn token_kind() -> String {
    std::env::var("KMS_TEST_TOKEN").unwrap_or_else(|_| "softhsm".into())
}

impl TestToken {
    pub fn create() -> TestToken {
        Self::create_labelled("kms-test")
    }

    pub fn create_labelled(label: &str) -> TestToken {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(token_kind())
            .join("create-token.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg(dir.path())
            .arg(label)
            .output()
            .expect("run create-token.sh");
        assert!(
            output.status.success(),
            "create-token.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The script prints the environment to use the token, one NAME=value a line.
        let printed = String::from_utf8(output.stdout).unwrap();
        let value = |name: &str| {
            printed
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("create-token.sh printed no {name}"))
                .to_owned()
        };
        let env = printed
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| !k.starts_with("KMS_"))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        TestToken {
            pin_file: PathBuf::from(value("KMS_HSM_PIN_FILE")),
            module: PathBuf::from(value("KMS_HSM_MODULE")),
            label: label.to_owned(),
            env,
            dir,
        }
    }

    pub fn user_pin(&self) -> String {
        std::fs::read_to_string(&self.pin_file)
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// A running `kms serve`. Killed on drop.
pub struct TestServer {
    child: Option<Child>,
    pub addr: String,
    pub log_file: PathBuf,
    pub data_dir: PathBuf,
    /// The `admin` principal's token (`*=Administrator`).
    pub admin_token: String,
    client_tls: Option<ClientTlsConfig>,
}

/// Where the harness keeps the admin token of a data directory.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Runs `kms token ARGS...`; returns stdout, asserting success.
pub fn kms_token(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_kms"))
        .arg("token")
        .args(args)
        .output()
        .expect("run kms token");
    assert!(
        output.status.success(),
        "kms token {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Creates a principal in the data directory's tokens file; returns its token.
pub fn create_principal(data_dir: &Path, name: &str, roles: &[&str]) -> String {
    let dir = data_dir.to_str().unwrap();
    let mut args = vec!["create", "--data-dir", dir, "--principal", name];
    for role in roles {
        args.push("--role");
        args.push(role);
    }
    kms_token(&args).trim().to_owned()
}

/// Before a configured server's first start: the admin principal, as an operator would
/// make it. (The embedded default makes its own.)
fn ensure_admin(data_dir: &Path) {
    let token_path = admin_token_path(data_dir);
    if token_path.exists() {
        return;
    }
    let token = create_principal(data_dir, "admin", &["*=Administrator"]);
    std::fs::write(&token_path, format!("{token}\n")).unwrap();
}

/// A server that exited (or never printed its address) instead of starting.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub log: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}; log:\n{}", self.status, self.log)
    }
}

/// How to start the server.
pub struct ServerSetup<'a> {
    pub token: Option<&'a TestToken>,
    pub data_dir: &'a Path,
    pub extra_env: Vec<(String, String)>,
    /// Set when the server serves TLS: how the harness's own clients connect.
    pub client_tls: Option<ClientTlsConfig>,
    /// Start the server under this open-file limit (soft and hard), with prlimit.
    pub fd_limit: Option<u32>,
}

impl<'a> ServerSetup<'a> {
    pub fn new(token: Option<&'a TestToken>, data_dir: &'a Path) -> Self {
        Self {
            token,
            data_dir,
            extra_env: vec![],
            client_tls: None,
            fd_limit: None,
        }
    }
}

impl TestServer {
    /// The server on `token`, with its database under `data_dir`.
    pub async fn start(token: &TestToken, data_dir: &Path) -> TestServer {
        Self::try_start(ServerSetup {
            token: Some(token),
            data_dir,
            extra_env: vec![],
            client_tls: None,
            fd_limit: None,
        })
        .await
        .unwrap_or_else(|failure| panic!("server did not start: {failure}"))
    }

    /// The server on `token` with extra environment variables (KMS_* settings).
    pub async fn start_with_env(
        token: &TestToken,
        data_dir: &Path,
        env: &[(&str, &str)],
    ) -> TestServer {
        Self::try_start(ServerSetup {
            token: Some(token),
            data_dir,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            client_tls: None,
            fd_limit: None,
        })
        .await
        .unwrap_or_else(|failure| panic!("server did not start: {failure}"))
    }

    /// Starts the server; on failure returns its exit status and log.
    pub async fn try_start(setup: ServerSetup<'_>) -> Result<TestServer, StartFailure> {
        std::fs::create_dir_all(setup.data_dir).unwrap();
        let log_file = setup.data_dir.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut command = match setup.fd_limit {
            None => Command::new(env!("CARGO_BIN_EXE_kms")),
            Some(limit) => {
                let mut command = Command::new("prlimit");
                command
                    .arg(format!("--nofile={limit}:{limit}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_kms"));
                command
            }
        };
        command.arg("serve");
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KMS_LISTEN", "127.0.0.1:0")
            .env("KMS_DATA_DIR", setup.data_dir)
            .env("KMS_LOG", "info,kms=debug")
            // No background RSA generation unless a test asks for the pool: it would eat
            // the CPU of every other test.
            .env("KMS_IMPORT_RSA_POOL_SIZE", "0");
        if postgres::selected() {
            command.env("KMS_STORE_URL", store_url(setup.data_dir));
        } else if sled_selected() {
            command.env("KMS_STORE_BACKEND", "sled");
        }
        if setup.token.is_some() {
            ensure_admin(setup.data_dir);
        }
        if let Some(token) = setup.token {
            let config = setup.data_dir.join("kms.toml");
            std::fs::write(
                &config,
                format!(
                    "[hsm]\nmodule = {:?}\ntoken_label = {:?}\npin_file = {:?}\npool_size = 8\n",
                    token.module, token.label, token.pin_file
                ),
            )
            .unwrap();
            command.arg("--config").arg(&config);
            for (name, value) in &token.env {
                command.env(name, value);
            }
        }
        for (k, v) in &setup.extra_env {
            // A test that names its own PostgreSQL means that store, whatever the suite's.
            if k == "KMS_STORE_URL" {
                command.env_remove("KMS_STORE_BACKEND");
            }
            command.env(k, v);
        }
        let log = std::fs::File::create(&log_file).unwrap();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn kms");

        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            // The embedded default's first start says where the admin token is first.
            for line in lines.by_ref().map_while(Result::ok) {
                if line.starts_with("kms listening on ") {
                    let _ = tx.send(line);
                    break;
                }
            }
            // Keep draining so the server never blocks on a full pipe.
            for _ in lines {}
        });
        let addr = match rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(line) => line
                .strip_prefix("kms listening on ")
                .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
                .to_owned(),
            Err(_) => {
                return Err(StartFailure {
                    status: child.wait().ok(),
                    log: std::fs::read_to_string(&log_file).unwrap_or_default(),
                });
            }
        };
        let admin_token = std::fs::read_to_string(admin_token_path(setup.data_dir))
            .expect("admin token file")
            .trim()
            .to_owned();
        let server = TestServer {
            child: Some(child),
            addr,
            log_file,
            data_dir: setup.data_dir.to_owned(),
            admin_token,
            client_tls: setup.client_tls,
        };
        server.wait_until_serving().await;
        // Logs are written by a buffered thread: once the "listening" line is in the
        // file, every start-up line before it is too.
        assert!(
            server.log_eventually("listening").await,
            "no listening line in the log"
        );
        Ok(server)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn url(&self) -> String {
        let scheme = if self.client_tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The endpoint the harness's clients use (TLS when the server serves it).
    pub fn endpoint(&self) -> tonic::transport::Endpoint {
        let endpoint = Channel::from_shared(self.url()).unwrap();
        match &self.client_tls {
            Some(tls) => endpoint.tls_config(tls.clone()).unwrap(),
            None => endpoint,
        }
    }

    pub async fn channel(&self) -> Channel {
        self.endpoint().connect().await.expect("connect")
    }

    /// A channel whose calls carry `token`.
    pub async fn channel_with(&self, token: &str) -> AuthedChannel {
        let token = kms::auth::BearerToken::parse(token).expect("a kms token");
        InterceptedService::new(self.channel().await, BearerAuth::new(&token))
    }

    /// Clients authenticated as `admin` (`*=Administrator`).
    pub async fn keys(&self) -> KeyServiceClient<AuthedChannel> {
        KeyServiceClient::new(self.channel_with(&self.admin_token).await)
    }

    pub async fn import_tokens(&self) -> ImportTokenServiceClient<AuthedChannel> {
        ImportTokenServiceClient::new(self.channel_with(&self.admin_token).await)
    }

    pub async fn audit(&self) -> AuditServiceClient<AuthedChannel> {
        AuditServiceClient::new(self.channel_with(&self.admin_token).await)
    }

    /// SIGHUP: the server re-reads its tokens file and TLS files.
    pub fn hangup(&self) {
        signal(self.child.as_ref().expect("server running"), "HUP");
    }

    /// Polls the health service until KeyService reports SERVING.
    async fn wait_until_serving(&self) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(channel) = self.endpoint().connect().await {
                let mut health = HealthClient::new(channel);
                let reply = health
                    .check(HealthCheckRequest {
                        service: "kms.v1.KeyService".into(),
                    })
                    .await;
                if let Ok(reply) = reply
                    && reply.get_ref().status == ServingStatus::Serving as i32
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never reported SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// KeyService's health status now (`None` if the check itself failed).
    pub async fn health(&self) -> Option<ServingStatus> {
        let channel = self.endpoint().connect().await.ok()?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "kms.v1.KeyService".into(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(reply.get_ref().status).ok()
    }

    /// Waits up to `within` for KeyService's health to be `status`.
    pub async fn health_becomes(&self, status: ServingStatus, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.health().await == Some(status) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// How many times `needle` occurs in the log now.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits (up to 10 s) for `needle` to reach the log, which is written asynchronously.
    pub async fn log_eventually(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// SIGTERM, then wait for the process to exit. Waits on the blocking pool so that the
    /// test's own runtime keeps driving its client connections meanwhile.
    pub async fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || {
            signal(&child, "TERM");
            child.wait().unwrap()
        })
        .await
        .unwrap()
    }

    /// SIGKILL: no chance to flush or close anything.
    pub async fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || {
            child.kill().unwrap();
            child.wait().unwrap();
        })
        .await
        .unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Every test's server log, at debug, is checked for the token it was called with.
        if !std::thread::panicking() {
            assert!(
                !self.log().contains(&self.admin_token),
                "the admin token appears in the server log {}",
                self.log_file.display()
            );
        }
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

impl TestServer {
    /// The log as of now, including every call answered before this one: makes a
    /// marked call and waits for its line, so absence checks cannot pass by racing the
    /// asynchronous log writer.
    pub async fn settled_log(&self) -> String {
        let marker = uuid::Uuid::new_v4().to_string();
        let mut request = req(&instance(), kms::proto::CountKeysRequest::default());
        request.metadata_mut().insert(
            "correlation-id",
            MetadataValue::try_from(marker.as_str()).unwrap(),
        );
        self.keys().await.count_keys(request).await.unwrap();
        assert!(self.log_eventually(&marker).await, "marker never logged");
        self.log()
    }
}

/// CreateKey in `tenant`, returning the created key's metadata.
pub async fn create_key(
    keys: &mut KeyServiceClient<AuthedChannel>,
    tenant: &str,
    request: kms::proto::CreateKeyRequest,
) -> kms::proto::Key {
    keys.create_key(req(tenant, request))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// WrapKey of `plaintext` under key `id` with `aad`, returning the ciphertext.
pub async fn wrap_key(
    keys: &mut KeyServiceClient<AuthedChannel>,
    tenant: &str,
    id: &str,
    plaintext: &[u8],
    aad: &[&str],
) -> Vec<u8> {
    keys.wrap_key(req(
        tenant,
        kms::proto::WrapKeyRequest {
            id: id.to_owned(),
            plaintext: Some(plaintext.to_vec()),
            aad: aad.iter().map(|a| a.to_string()).collect(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .ciphertext
}

/// UnwrapKey of `ciphertext` under key `id`: the plaintext; the call must succeed.
pub async fn unwrap_key(
    keys: &mut KeyServiceClient<AuthedChannel>,
    tenant: &str,
    id: &str,
    ciphertext: &[u8],
    aad: &[&str],
) -> Vec<u8> {
    keys.unwrap_key(req(
        tenant,
        kms::proto::UnwrapKeyRequest {
            id: id.to_owned(),
            ciphertext: ciphertext.to_vec(),
            aad: aad.iter().map(|a| a.to_string()).collect(),
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .plaintext
}

/// RotateKey of key `id`: a new current version.
pub async fn rotate_key(keys: &mut KeyServiceClient<AuthedChannel>, tenant: &str, id: &str) {
    keys.rotate_key(req(
        tenant,
        kms::proto::RotateKeyRequest {
            id: id.to_owned(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
}

/// CountKeys in `tenant` (every state), as the server's admin.
pub async fn count_keys(server: &TestServer, tenant: &str) -> u64 {
    server
        .keys()
        .await
        .count_keys(req(tenant, kms::proto::CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count
}

/// Wraps a message with the instance header.
pub fn req<T>(instance: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "bluemix-instance",
        MetadataValue::try_from(instance).unwrap(),
    );
    request
}

/// Adds `authorization: Bearer <token>` to a request.
pub fn bearer<T>(mut request: Request<T>, token: &str) -> Request<T> {
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

/// A random instance id, so tests never share tenants by accident.
pub fn instance() -> String {
    format!("inst-{}", uuid::Uuid::new_v4())
}

/// Every audit event of `tenant` matching `request`'s filters, newest first, following
/// next_page_token to the end. Authenticated as admin.
pub async fn audit_events(
    server: &TestServer,
    tenant: &str,
    mut request: kms::proto::ListAuditEventsRequest,
) -> Vec<kms::proto::AuditEvent> {
    let mut audit = server.audit().await;
    let mut events = Vec::new();
    request.page_size = 1000;
    loop {
        let page = audit
            .list_audit_events(req(tenant, request.clone()))
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return events;
        }
        request.page_token = page.next_page_token;
    }
}

/// Runs the `kms` binary with `args` (and no KMS_STORE_URL from the suite's own
/// environment); returns whether it succeeded and its stdout and stderr joined.
pub fn run_kms(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kms"))
        .args(args)
        .env_remove("KMS_STORE_URL")
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// `kms audit verify` of a data directory's store (sled: with no server running).
pub fn audit_verify(data_dir: &Path) -> (bool, String) {
    use std::ffi::OsStr;
    if postgres::selected() {
        let url = store_url(data_dir);
        run_kms(&[
            OsStr::new("audit"),
            OsStr::new("verify"),
            OsStr::new("--store-url"),
            OsStr::new(&url),
        ])
    } else {
        run_kms(&[
            OsStr::new("audit"),
            OsStr::new("verify"),
            OsStr::new("--data-dir"),
            data_dir.as_os_str(),
        ])
    }
}

/// The database a data directory's servers use when the suite runs on PostgreSQL: one
/// per data directory (so a restart finds its keys), on the binary's shared cluster.
pub fn store_url(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    postgres::shared().database(&format!("kms_{:016x}", hasher.finish()))
}

/// The store a (stopped) server of `data_dir` used: its sled database, its redb file, or
/// its PostgreSQL database, as the suite's store is chosen.
pub async fn open_store(data_dir: &Path) -> std::sync::Arc<dyn kms::store::Store> {
    let config = if postgres::selected() {
        kms::store::StoreConfig::Postgres(kms::store::PostgresConfig::new(store_url(data_dir)))
    } else if redb_selected() {
        kms::store::StoreConfig::Redb {
            path: data_dir.join("kms.redb"),
            cache_bytes: kms::store::DEFAULT_CACHE_BYTES,
        }
    } else {
        kms::store::StoreConfig::Sled {
            path: data_dir.join("db"),
            cache_bytes: kms::store::DEFAULT_CACHE_BYTES,
        }
    };
    kms::store::open(&config).await.expect("open the store")
}

/// True when the suite runs against redb, the embedded default (no `KMS_TEST_STORE`, or
/// `KMS_TEST_STORE=redb`).
pub fn redb_selected() -> bool {
    std::env::var("KMS_TEST_STORE").map_or(true, |s| s == "redb")
}

/// True when the suite runs against sled (`KMS_TEST_STORE=sled`).
pub fn sled_selected() -> bool {
    std::env::var("KMS_TEST_STORE").is_ok_and(|s| s == "sled")
}

/// A small deterministic generator (xorshift64) for tests that draw at random: seeded and
/// printed, so that a failing run can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// The seed in variable `var`, or one from the clock (never 0).
    pub fn seed_from(var: &str) -> u64 {
        std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            })
    }
}

/// The token opened from outside the service, logged in as its user: for checking what
/// the service left on it. Sets the token's configuration variable (SOFTHSM2_CONF or
/// KRYOPTIC_CONF) for this whole process, so call it only when no other thread reads the
/// environment: in a binary of one test, once its servers are gone.
pub fn open_token_from_outside(
    token: &TestToken,
) -> (cryptoki::context::Pkcs11, cryptoki::session::Session) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    for (name, value) in &token.env {
        // SAFETY: the caller guarantees no other thread reads the environment now.
        unsafe { std::env::set_var(name, value) };
    }
    let ctx = Pkcs11::new(&token.module).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == token.label)
        .expect("token by label");
    let session = ctx.open_ro_session(slot).unwrap();
    session
        .login(UserType::User, Some(&AuthPin::from(token.user_pin())))
        .unwrap();
    (ctx, session)
}

/// Every object on the token that can hold key material or data. (Some tokens, such as
/// Kryoptic, also expose built-in mechanism and profile objects, which are not the
/// service's.)
pub fn stored_objects(session: &cryptoki::session::Session) -> Vec<cryptoki::object::ObjectHandle> {
    use cryptoki::object::{Attribute, ObjectClass};
    [
        ObjectClass::SECRET_KEY,
        ObjectClass::PRIVATE_KEY,
        ObjectClass::PUBLIC_KEY,
        ObjectClass::DATA,
        ObjectClass::CERTIFICATE,
    ]
    .into_iter()
    .flat_map(|class| session.find_objects(&[Attribute::Class(class)]).unwrap())
    .collect()
}
