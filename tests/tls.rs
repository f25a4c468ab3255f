//! TLS and mutual TLS with certificates made in the test (rcgen): TLS only once
//! configured, a wrong CA and expired certificates refused, client certificates
//! required with a client CA, certificates re-read on SIGHUP, grpcurl with -cacert,
//! and plaintext refused off loopback.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ServerSetup, TestServer, TestToken, bearer, instance, req};
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::{CountKeysRequest, CreateKeyRequest};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate and its key, PEM. `expired`: valid only in 2020.
fn leaf(ca: &Ca, name: &str, server: bool, expired: bool) -> (String, String) {
    let sans = if server {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    } else {
        vec![name.to_owned()]
    };
    let mut params = CertificateParams::new(sans).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 12, 31);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Server files under `dir/tls`: cert.pem, key.pem (and client-ca.pem when given).
fn server_files(
    dir: &Path,
    ca: &Ca,
    client_ca: Option<&Ca>,
    expired: bool,
) -> Vec<(String, String)> {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let (cert, key) = leaf(ca, "kms", true, expired);
    let mut env = vec![
        (
            "KMS_TLS_CERT_FILE".to_owned(),
            write(&tls, "cert.pem", &cert).display().to_string(),
        ),
        (
            "KMS_TLS_KEY_FILE".to_owned(),
            write(&tls, "key.pem", &key).display().to_string(),
        ),
    ];
    if let Some(client_ca) = client_ca {
        env.push((
            "KMS_TLS_CLIENT_CA_FILE".to_owned(),
            write(&tls, "client-ca.pem", &client_ca.pem)
                .display()
                .to_string(),
        ));
    }
    env
}

fn trusting(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost")
}

fn with_identity(tls: ClientTlsConfig, (cert, key): &(String, String)) -> ClientTlsConfig {
    tls.identity(Identity::from_pem(cert, key))
}

async fn start(
    token: &TestToken,
    dir: &Path,
    env: Vec<(String, String)>,
    client_tls: ClientTlsConfig,
) -> TestServer {
    let mut setup = ServerSetup::new(Some(token), dir);
    setup.extra_env = env;
    setup.client_tls = Some(client_tls);
    TestServer::try_start(setup)
        .await
        .unwrap_or_else(|f| panic!("server did not start: {f}"))
}

/// Makes one authenticated CountKeys over `url` with `tls`; Err on any failure,
/// connecting or calling.
async fn count_keys(url: &str, tls: Option<ClientTlsConfig>, token: &str) -> Result<u64, String> {
    let mut endpoint = Channel::from_shared(url.to_owned()).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    KeyServiceClient::new(channel)
        .count_keys(bearer(req(&instance(), CountKeysRequest::default()), token))
        .await
        .map(|r| r.into_inner().count)
        .map_err(|e| format!("call: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_once_configured_and_a_wrong_ca_is_refused() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server_ca = ca("server CA");
    let mut env = server_files(data.path(), &server_ca, None, false);
    env.push(("KMS_HANDSHAKE_TIMEOUT_SECS".into(), "2".into()));
    let server = start(&token, data.path(), env, trusting(&server_ca)).await;
    let https = format!("https://{}", server.addr);
    assert_eq!(
        count_keys(&https, Some(trusting(&server_ca)), &server.admin_token).await,
        Ok(0)
    );
    // A plaintext client gets nothing from the TLS port.
    let plain = format!("http://{}", server.addr);
    assert!(count_keys(&plain, None, &server.admin_token).await.is_err());
    // A client that trusts another CA refuses the server.
    let other = ca("other CA");
    assert!(
        count_keys(&https, Some(trusting(&other)), &server.admin_token)
            .await
            .is_err()
    );
    // A socket that never starts its handshake is closed after the handshake timeout.
    let addr = server.addr.clone();
    let closed = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut silent = std::net::TcpStream::connect(&addr).unwrap();
        silent
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        // Ok(0) or a reset: closed by the server; a timeout: still open after 30 s.
        match silent.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    })
    .await
    .unwrap();
    assert!(closed);
    // TLS changes nothing about authentication: no token, no service.
    let mut keys = KeyServiceClient::new(server.channel().await);
    let status = keys
        .count_keys(req(&instance(), CountKeysRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(server.log().contains("listening (TLS)"));

    // grpcurl, as an operator would use it: reflection and a call, with -cacert.
    let grpcurl = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl");
    assert!(
        grpcurl.exists(),
        "grpcurl missing: scripts/deps.sh --test installs it into .venv"
    );
    let ca_file = write(data.path(), "ca.pem", &server_ca.pem);
    let tenant = instance();
    common::create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "seen-by-grpcurl".into(),
            ..Default::default()
        },
    )
    .await;
    let run = |args: &[&str]| {
        let output = Command::new(&grpcurl)
            .arg("-cacert")
            .arg(&ca_file)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, listed) = run(&[&server.addr, "list"]);
    assert!(ok && listed.contains("kms.v1.KeyService"), "{listed}");
    let auth = format!("authorization: Bearer {}", server.admin_token);
    let inst = format!("bluemix-instance: {tenant}");
    let (ok, counted) = run(&[
        "-H",
        &auth,
        "-H",
        &inst,
        &server.addr,
        "kms.v1.KeyService/CountKeys",
    ]);
    assert!(ok && counted.contains("\"count\": \"1\""), "{counted}");
    // Without -cacert, grpcurl does not trust the server.
    let output = Command::new(&grpcurl)
        .args([&server.addr, "list"])
        .output()
        .unwrap();
    assert!(!output.status.success());

    // The client commands speak TLS too, with --ca-file.
    let output = Command::new(env!("CARGO_BIN_EXE_kms"))
        .args(["bench", "--addr", &https, "--ca-file"])
        .arg(&ca_file)
        .arg("--token-file")
        .arg(common::admin_token_path(data.path()))
        .args(["--seconds", "1", "--warmup-seconds", "0", "--rounds", "1"])
        .args(["--concurrency", "4", "--scenarios", "health,wrap"])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && printed.contains("| WrapKey |"),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_current_client_certificate_from_the_client_ca() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server_ca = ca("server CA");
    let client_ca = ca("client CA");
    let env = server_files(data.path(), &server_ca, Some(&client_ca), false);
    let good = leaf(&client_ca, "app", false, false);
    let server = start(
        &token,
        data.path(),
        env,
        with_identity(trusting(&server_ca), &good),
    )
    .await;
    let https = format!("https://{}", server.addr);
    let admin = &server.admin_token;
    assert_eq!(
        count_keys(
            &https,
            Some(with_identity(trusting(&server_ca), &good)),
            admin
        )
        .await,
        Ok(0)
    );
    assert!(
        count_keys(&https, Some(trusting(&server_ca)), admin)
            .await
            .is_err(),
        "no client certificate"
    );
    let stranger = leaf(&ca("another CA"), "stranger", false, false);
    assert!(
        count_keys(
            &https,
            Some(with_identity(trusting(&server_ca), &stranger)),
            admin
        )
        .await
        .is_err(),
        "a client certificate from another CA"
    );
    let expired = leaf(&client_ca, "old-app", false, true);
    assert!(
        count_keys(
            &https,
            Some(with_identity(trusting(&server_ca), &expired)),
            admin
        )
        .await
        .is_err(),
        "an expired client certificate"
    );
    // A certificate alone is not enough: the bearer token is still required.
    let wrong = kms::auth::BearerToken::generate().unwrap();
    let refused = count_keys(
        &https,
        Some(with_identity(trusting(&server_ca), &good)),
        wrong.expose(),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("Unauthenticated"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_re_read_on_sighup_and_an_expired_one_is_refused_by_clients() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let first = ca("first CA");
    let env = server_files(data.path(), &first, None, false);
    let server = start(&token, data.path(), env, trusting(&first)).await;
    let https = format!("https://{}", server.addr);
    let admin = server.admin_token.clone();
    assert!(
        count_keys(&https, Some(trusting(&first)), &admin)
            .await
            .is_ok()
    );

    // Files that do not load are refused; the certificate in force stays.
    std::fs::write(data.path().join("tls/cert.pem"), "not a certificate").unwrap();
    server.hangup();
    assert!(server.log_eventually("TLS files refused").await);
    assert!(
        count_keys(&https, Some(trusting(&first)), &admin)
            .await
            .is_ok()
    );

    // A new certificate from another CA, then SIGHUP: new connections get it.
    let second = ca("second CA");
    let (cert, key) = leaf(&second, "kms", true, false);
    write(&data.path().join("tls"), "key.pem", &key);
    write(&data.path().join("tls"), "cert.pem", &cert);
    server.hangup();
    assert!(
        server
            .log_eventually("TLS certificate files reloaded")
            .await
    );
    assert!(
        count_keys(&https, Some(trusting(&second)), &admin)
            .await
            .is_ok()
    );
    assert!(
        count_keys(&https, Some(trusting(&first)), &admin)
            .await
            .is_err()
    );

    // An expired server certificate: clients refuse it.
    let (cert, key) = leaf(&second, "kms", true, true);
    write(&data.path().join("tls"), "key.pem", &key);
    write(&data.path().join("tls"), "cert.pem", &cert);
    server.hangup();
    let reloads = || {
        server
            .log()
            .matches("TLS certificate files reloaded")
            .count()
    };
    for _ in 0..100 {
        if reloads() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(reloads(), 2);
    assert!(
        count_keys(&https, Some(trusting(&second)), &admin)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_off_loopback_is_refused_unless_allowed() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let mut setup = ServerSetup::new(Some(&token), data.path());
    setup.extra_env = vec![("KMS_LISTEN".into(), "0.0.0.0:0".into())];
    let failure = TestServer::try_start(setup)
        .await
        .err()
        .expect("plaintext on 0.0.0.0 must not start");
    assert_eq!(failure.status.and_then(|s| s.code()), Some(2), "{failure}");

    let output = Command::new(env!("CARGO_BIN_EXE_kms"))
        .arg("serve")
        .env("KMS_LISTEN", "0.0.0.0:0")
        .env("KMS_DATA_DIR", data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("KMS_ALLOW_PLAINTEXT"),
        "{stderr}"
    );

    let mut setup = ServerSetup::new(Some(&token), data.path());
    setup.extra_env = vec![
        ("KMS_LISTEN".into(), "0.0.0.0:0".into()),
        ("KMS_ALLOW_PLAINTEXT".into(), "true".into()),
    ];
    let server = TestServer::try_start(setup).await.expect("allowed");
    let mut keys = server.keys().await;
    keys.count_keys(req(&instance(), CountKeysRequest::default()))
        .await
        .unwrap();
}
