//! HSM faults, injected for real: the fault-injecting module (`tests/pkcs11-faults`) sits
//! between the `kms` binary and the real token and fails or stalls chosen PKCS#11
//! functions. For each fault: the calls it hits answer UNAVAILABLE with a generic
//! message (DEADLINE_EXCEEDED for a hang), nothing half-done remains, health says
//! NOT_SERVING while the token is unusable, and the service repairs itself without a
//! restart. Runs on whichever token the suite runs on (SoftHSM or Kryoptic).

mod common;

use std::time::{Duration, Instant};

use common::faults::Faults;
use common::{ServerSetup, TestServer, TestToken, create_key, instance, req};
use kms::proto::{
    CountKeysRequest, CreateKeyRequest, ListKeyVersionsRequest, RotateKeyRequest, UnwrapKeyRequest,
    WrapKeyRequest,
};
use tempfile::TempDir;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

const HSM_UNAVAILABLE: &str = "the HSM is unavailable; retry later";

struct Rig {
    token: TestToken,
    data: TempDir,
    faults: Faults,
    server: TestServer,
    tenant: String,
}

async fn start(
    token: &TestToken,
    data: &TempDir,
    faults: &Faults,
    env: &[(&str, &str)],
) -> TestServer {
    let mut setup = ServerSetup::new(Some(token), data.path());
    setup.extra_env = faults.env();
    setup
        .extra_env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    TestServer::try_start(setup)
        .await
        .unwrap_or_else(|failure| panic!("server did not start: {failure}"))
}

async fn rig(env: &[(&str, &str)]) -> Rig {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::new(&token, data.path());
    let server = start(&token, &data, &faults, env).await;
    Rig {
        token,
        data,
        faults,
        server,
        tenant: instance(),
    }
}

impl Rig {
    async fn create(&self, name: &str) -> Result<kms::proto::Key, Status> {
        self.server
            .keys()
            .await
            .create_key(req(
                &self.tenant,
                CreateKeyRequest {
                    name: name.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|r| r.into_inner().key.unwrap())
    }

    async fn wrap(&self, id: &str, plaintext: &[u8]) -> Result<Vec<u8>, Status> {
        self.server
            .keys()
            .await
            .wrap_key(req(
                &self.tenant,
                WrapKeyRequest {
                    id: id.into(),
                    plaintext: Some(plaintext.to_vec()),
                    aad: vec![],
                },
            ))
            .await
            .map(|r| r.into_inner().ciphertext)
    }

    async fn unwrap(&self, id: &str, ciphertext: &[u8]) -> Result<Vec<u8>, Status> {
        self.server
            .keys()
            .await
            .unwrap_key(req(
                &self.tenant,
                UnwrapKeyRequest {
                    id: id.into(),
                    ciphertext: ciphertext.to_vec(),
                    aad: vec![],
                },
            ))
            .await
            .map(|r| r.into_inner().plaintext)
    }

    async fn count(&self) -> u64 {
        self.server
            .keys()
            .await
            .count_keys(req(&self.tenant, CountKeysRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .count
    }

    async fn versions(&self, id: &str) -> u64 {
        self.server
            .keys()
            .await
            .list_key_versions(req(
                &self.tenant,
                ListKeyVersionsRequest {
                    id: id.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .total_count
    }

    async fn rotate(&self, id: &str) -> Result<(), Status> {
        self.server
            .keys()
            .await
            .rotate_key(req(
                &self.tenant,
                RotateKeyRequest {
                    id: id.into(),
                    ..Default::default()
                },
            ))
            .await
            .map(|_| ())
    }

    /// Retries `op` until it succeeds (at most 20 s); every failure on the way must be
    /// the generic UNAVAILABLE. Returns the result and how many calls failed.
    async fn until_ok<T>(&self, mut op: impl AsyncFnMut() -> Result<T, Status>) -> (T, usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut failed = 0;
        loop {
            match op().await {
                Ok(value) => return (value, failed),
                Err(status) => {
                    assert_hsm_unavailable(&status);
                    failed += 1;
                    assert!(Instant::now() < deadline, "the service never recovered");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn assert_hsm_unavailable(status: &Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        HSM_UNAVAILABLE,
        "a generic message: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_sessions_are_reopened_and_the_login_restored() {
    let rig = rig(&[("KMS_HSM_POOL_SIZE", "2")]).await;
    let key = rig.create("sessions").await.unwrap();
    let ciphertext = rig.wrap(&key.id, b"before").await.unwrap();

    // Handles reported invalid, then every session of the application really closed
    // (which also logs it out: the anchor session must be reopened and logged in).
    for rule in [
        "C_Encrypt CKR_SESSION_HANDLE_INVALID times 1",
        "C_Encrypt CKR_SESSION_CLOSED times 1",
        "C_Encrypt close-sessions times 1",
    ] {
        let injected = rig.faults.injected();
        rig.faults.set(rule);
        let status = rig.wrap(&key.id, b"hit").await.unwrap_err();
        assert_hsm_unavailable(&status);
        assert_eq!(rig.faults.injected(), injected + 1, "{rule} was injected");
        let (_, _) = rig
            .until_ok(async || rig.wrap(&key.id, b"after").await)
            .await;
        assert!(
            rig.server
                .health_becomes(ServingStatus::Serving, Duration::from_secs(10))
                .await
        );
        assert_eq!(rig.unwrap(&key.id, &ciphertext).await.unwrap(), b"before");
    }
    // The first call after the sessions were closed already found a working service:
    // the repair had reopened the anchor session and logged in again.
    assert!(rig.server.log_eventually("HSM usable again").await);
    let key = rig.create("after the faults").await.unwrap();
    rig.wrap(&key.id, b"new key").await.unwrap();
    assert_eq!(rig.count().await, 2, "no key lost or added by the faults");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_that_logged_the_service_out_is_logged_in_again() {
    let rig = rig(&[("KMS_HSM_POOL_SIZE", "2")]).await;
    let key = rig.create("login").await.unwrap();
    let ciphertext = rig.wrap(&key.id, b"secret").await.unwrap();

    // A real C_Logout: every session loses the login until the service logs in again.
    rig.faults.set("C_Encrypt logout times 1");
    assert_hsm_unavailable(&rig.wrap(&key.id, b"hit").await.unwrap_err());
    let (_, _) = rig
        .until_ok(async || rig.wrap(&key.id, b"after").await)
        .await;
    assert_eq!(rig.unwrap(&key.id, &ciphertext).await.unwrap(), b"secret");

    // The token answering CKR_USER_NOT_LOGGED_IN without a logout is mended the same way.
    rig.faults.set("C_Decrypt CKR_USER_NOT_LOGGED_IN times 1");
    assert_hsm_unavailable(&rig.unwrap(&key.id, &ciphertext).await.unwrap_err());
    let (plaintext, _) = rig
        .until_ok(async || rig.unwrap(&key.id, &ciphertext).await)
        .await;
    assert_eq!(plaintext, b"secret");
    assert!(
        rig.server.log_eventually("repair=Login").await,
        "{}",
        rig.server.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_gone_and_back_is_reconnected_without_a_restart() {
    let rig = rig(&[]).await;
    let key = rig.create("gone").await.unwrap();
    let ciphertext = rig.wrap(&key.id, b"kept").await.unwrap();

    for code in ["CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT"] {
        let count = rig.count().await;
        let faults_logged = rig.server.log_count("HSM fault:");
        rig.faults.set(&format!("* {code}"));
        for _ in 0..10 {
            assert_hsm_unavailable(&rig.wrap(&key.id, b"no").await.unwrap_err());
        }
        assert_hsm_unavailable(&rig.create("not made").await.unwrap_err());
        assert!(
            rig.server
                .health_becomes(ServingStatus::NotServing, Duration::from_secs(10))
                .await,
            "NOT_SERVING while the token is gone"
        );
        // Reads that need no HSM keep working, and the refused CreateKey left nothing.
        assert_eq!(rig.count().await, count);
        for _ in 0..5 {
            assert_hsm_unavailable(&rig.unwrap(&key.id, &ciphertext).await.unwrap_err());
        }
        assert!(rig.faults.injected() > 0);

        rig.faults.clear();
        assert!(
            rig.server
                .health_becomes(ServingStatus::Serving, Duration::from_secs(20))
                .await,
            "SERVING once the token is back ({code})"
        );
        // The first calls after recovery succeed: the module was re-initialised and
        // the root key unwrapped again from its blob.
        assert_eq!(rig.unwrap(&key.id, &ciphertext).await.unwrap(), b"kept");
        rig.wrap(&key.id, b"again").await.unwrap();
        rig.create("made").await.unwrap();
        assert_eq!(rig.count().await, count + 1);
        // Sixteen refused calls, one episode: the fault is logged once.
        assert!(rig.server.log_eventually("repair=Reinitialize").await);
        assert_eq!(
            rig.server.log_count("HSM fault:"),
            faults_logged + 1,
            "{}",
            rig.server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_device_errors_fail_only_the_calls_they_hit_and_leave_nothing_half_done() {
    let rig = rig(&[]).await;
    let key = rig.create("steady").await.unwrap();
    for code in ["CKR_DEVICE_ERROR", "CKR_DEVICE_MEMORY"] {
        let count = rig.count().await;
        let versions = rig.versions(&key.id).await;

        // Key generation fails: no key record, no version.
        rig.faults.set(&format!("C_GenerateKey {code} times 1"));
        assert_hsm_unavailable(&rig.create("half").await.unwrap_err());
        assert_eq!(rig.count().await, count, "no record without its key");
        rig.faults.set(&format!("C_GenerateKey {code} times 1"));
        assert_hsm_unavailable(&rig.rotate(&key.id).await.unwrap_err());
        // Generated but not wrapped under the KEK: the same.
        rig.faults.set(&format!("C_WrapKey {code} times 1"));
        assert_hsm_unavailable(&rig.create("half").await.unwrap_err());
        assert_eq!(rig.count().await, count);
        assert_eq!(
            rig.versions(&key.id).await,
            versions,
            "no version without its blob"
        );

        // The next calls succeed, and the counts move by exactly what succeeded.
        rig.create("whole").await.unwrap();
        rig.rotate(&key.id).await.unwrap();
        assert_eq!(rig.count().await, count + 1);
        assert_eq!(rig.versions(&key.id).await, versions + 1);

        rig.faults.set(&format!("C_Encrypt {code} times 1"));
        assert_hsm_unavailable(&rig.wrap(&key.id, b"x").await.unwrap_err());
        let ciphertext = rig.wrap(&key.id, b"y").await.unwrap();
        assert_eq!(rig.unwrap(&key.id, &ciphertext).await.unwrap(), b"y");
    }
    assert_eq!(rig.faults.injected(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_kek_handle_is_found_again_and_never_blamed_on_the_caller() {
    let rig = rig(&[]).await;
    let key = rig.create("kek").await.unwrap();
    let ciphertext = rig.wrap(&key.id, b"good data").await.unwrap();
    // A fresh process: the root key is not cached, so UnwrapKey must unwrap its blob
    // under the KEK first.
    let Rig {
        token,
        data,
        faults,
        server,
        tenant,
    } = rig;
    assert!(server.stop().await.success());
    let server = start(&token, &data, &faults, &[]).await;
    let rig = Rig {
        token,
        data,
        faults,
        server,
        tenant,
    };

    rig.faults
        .set("C_UnwrapKey CKR_UNWRAPPING_KEY_HANDLE_INVALID times 1");
    let status = rig.unwrap(&key.id, &ciphertext).await.unwrap_err();
    // Not INVALID_ARGUMENT "damaged ciphertext": the caller's data is good.
    assert_hsm_unavailable(&status);
    let (plaintext, _) = rig
        .until_ok(async || rig.unwrap(&key.id, &ciphertext).await)
        .await;
    assert_eq!(plaintext, b"good data");

    rig.faults
        .set("C_WrapKey CKR_WRAPPING_KEY_HANDLE_INVALID times 1");
    assert_hsm_unavailable(&rig.create("k2").await.unwrap_err());
    let (made, _) = rig.until_ok(async || rig.create("k2").await).await;
    rig.wrap(&made.id, b"z").await.unwrap();
    assert!(rig.server.log_eventually("repair=Login").await);
    // A ciphertext that really is damaged is still the caller's fault.
    let mut damaged = ciphertext.clone();
    *damaged.last_mut().unwrap() ^= 1;
    let status = rig.unwrap(&key.id, &damaged).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_hsm_call_holds_one_session_not_the_pool() {
    let rig = rig(&[
        ("KMS_HSM_POOL_SIZE", "3"),
        ("KMS_HSM_CALL_TIMEOUT_MS", "3000"),
    ])
    .await;
    let key = rig.create("hang").await.unwrap();
    rig.wrap(&key.id, b"warm").await.unwrap();

    rig.faults.set("C_Encrypt hang 30000 times 2");
    // With a deadline: DEADLINE_EXCEEDED at the caller's deadline.
    let mut keys = rig.server.keys().await;
    let mut request = req(
        &rig.tenant,
        WrapKeyRequest {
            id: key.id.clone(),
            plaintext: Some(b"stuck".to_vec()),
            aad: vec![],
        },
    );
    request.set_timeout(Duration::from_millis(1500));
    let started = Instant::now();
    let status = keys.wrap_key(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Without one: UNAVAILABLE after the server's call timeout, not a 30 s wait.
    let status = rig.wrap(&key.id, b"stuck too").await.unwrap_err();
    assert_hsm_unavailable(&status);
    assert_eq!(rig.faults.injected(), 2, "two workers are inside the hang");

    // The third session keeps serving while two are stuck.
    for i in 0..20u8 {
        let ciphertext = rig.wrap(&key.id, &[i]).await.unwrap();
        assert_eq!(rig.unwrap(&key.id, &ciphertext).await.unwrap(), [i]);
    }
    assert_eq!(rig.server.health().await, Some(ServingStatus::Serving));
    assert!(rig.server.log_eventually("did not return within 3 s").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_softhsm_token_directory_moved_away_and_back_is_found_again() {
    if common::token_kind() != "softhsm" {
        return; // Kryoptic keeps its token in one database file; see the fault module tests.
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "moved".into(),
            ..Default::default()
        },
    )
    .await;
    let wrap = async |plaintext: &[u8]| {
        server
            .keys()
            .await
            .wrap_key(req(
                &tenant,
                WrapKeyRequest {
                    id: key.id.clone(),
                    plaintext: Some(plaintext.to_vec()),
                    aad: vec![],
                },
            ))
            .await
            .map(|r| r.into_inner().ciphertext)
    };
    let ciphertext = wrap(b"before the move").await.unwrap();

    let tokens = token.dir.path().join("tokens");
    let away = token.dir.path().join("tokens-away");
    std::fs::rename(&tokens, &away).unwrap();
    assert!(
        server
            .health_becomes(ServingStatus::NotServing, Duration::from_secs(15))
            .await,
        "NOT_SERVING while the token directory is gone"
    );
    std::fs::rename(&away, &tokens).unwrap();
    assert!(
        server
            .health_becomes(ServingStatus::Serving, Duration::from_secs(20))
            .await,
        "SERVING again once the directory is back: {}",
        server.log()
    );
    let unwrapped = server
        .keys()
        .await
        .unwrap_key(req(
            &tenant,
            UnwrapKeyRequest {
                id: key.id.clone(),
                ciphertext,
                aad: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .plaintext;
    assert_eq!(unwrapped, b"before the move");
    wrap(b"after").await.unwrap();
    create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "after the move".into(),
            ..Default::default()
        },
    )
    .await;
}
