//! The connection to PostgreSQL: TLS verified against the configured CA, the password
//! from a file (never the command line, never the log), and refusals that say why
//! without quoting secrets.

mod common;

use common::postgres::TempPostgres;
use common::{ServerSetup, TestServer, TestToken, create_key, instance};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA (PEM) and a server certificate for 127.0.0.1 it signed (PEM cert, PEM key).
fn certificates() -> (String, String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "db-ca");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(params, ca_key);
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".into()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "db");
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_with_a_password_from_a_file() {
    let (ca_pem, cert_pem, key_pem) = certificates();
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let pg = TempPostgres::start_secured(&cert_pem, &key_pem, &password);
    let secrets = tempfile::tempdir().unwrap();
    let ca_file = secrets.path().join("db-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let password_file = secrets.path().join("db.password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let url = format!("{} sslmode=require", pg.tcp_url("postgres"));

    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let start = |env: Vec<(&str, String)>| {
        let mut setup = ServerSetup::new(Some(&token), data.path());
        setup.extra_env = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        TestServer::try_start(setup)
    };

    // Without the CA the connection cannot be TLS, which the URL requires: refused.
    let failure = start(vec![
        ("KMS_STORE_URL", url.clone()),
        (
            "KMS_STORE_PASSWORD_FILE",
            password_file.display().to_string(),
        ),
    ])
    .await
    .err()
    .expect("no TLS, no start");
    assert!(
        !failure.log.contains(&password),
        "the password is never logged"
    );
    // A wrong password: refused, and neither password is logged.
    let wrong = secrets.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password-at-all").unwrap();
    let failure = start(vec![
        ("KMS_STORE_URL", url.clone()),
        ("KMS_STORE_CA_FILE", ca_file.display().to_string()),
        ("KMS_STORE_PASSWORD_FILE", wrong.display().to_string()),
    ])
    .await
    .err()
    .expect("a wrong password, no start");
    assert!(
        failure.log.contains("store") && !failure.log.contains("not-the-password-at-all"),
        "{}",
        failure.log
    );

    // TLS verified against the CA, the password from its file: serves.
    let server = start(vec![
        ("KMS_STORE_URL", url.clone()),
        ("KMS_STORE_CA_FILE", ca_file.display().to_string()),
        (
            "KMS_STORE_PASSWORD_FILE",
            password_file.display().to_string(),
        ),
    ])
    .await
    .unwrap_or_else(|failure| panic!("did not start: {failure}"));
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        kms::proto::CreateKeyRequest {
            name: "over-tls".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!key.id.is_empty());
    assert!(
        !server.log().contains(&password),
        "the password is never logged"
    );
    server.stop().await;

    // A CA that did not sign the database's certificate: refused.
    let (other_ca, _, _) = certificates();
    let other_ca_file = secrets.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, other_ca).unwrap();
    assert!(
        start(vec![
            ("KMS_STORE_URL", url),
            ("KMS_STORE_CA_FILE", other_ca_file.display().to_string()),
            (
                "KMS_STORE_PASSWORD_FILE",
                password_file.display().to_string()
            ),
        ])
        .await
        .is_err(),
        "a certificate from another CA is refused"
    );
}
