//! Opens the token the service uses, through PKCS#11 from outside the service, and checks
//! what lives there: one master KEK that can never be read or extracted, and nothing else.
//!
//! One test in this binary: it sets the token's configuration variable (SOFTHSM2_CONF or
//! KRYOPTIC_CONF) for its own process before loading the module.

mod common;

use common::{TestServer, TestToken, instance, req};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use kms::proto::{CreateKeyRequest, DeleteKeyRequest};

#[tokio::test(flavor = "current_thread")]
async fn the_token_holds_only_a_sensitive_non_extractable_kek() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    // The key-wrap mechanism is probed, not assumed: SoftHSM offers CKM_AES_KEY_WRAP_PAD,
    // Kryoptic only the equivalent CKM_AES_KEY_WRAP_KWP.
    let expected = match common::token_kind().as_str() {
        "kryoptic" => "CKM_AES_KEY_WRAP_KWP",
        _ => "CKM_AES_KEY_WRAP_PAD",
    };
    assert!(
        server.log().contains(&format!("rfc5649=\"{expected}\"")),
        "{}",
        server.log()
    );
    let mut keys = server.keys().await;
    let tenant = instance();
    for i in 0..6 {
        let key = keys
            .create_key(req(
                &tenant,
                CreateKeyRequest {
                    name: format!("k{i}"),
                    extractable: i % 2 == 1,
                    payload: (i >= 4).then(|| vec![7; 32]),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        if i == 0 {
            keys.delete_key(req(&tenant, DeleteKeyRequest { id: key.id }))
                .await
                .unwrap();
        }
    }

    // The only test in this binary, on a current-thread runtime: nothing else reads the
    // environment now.
    let (ctx, session) = common::open_token_from_outside(&token);

    let everything = common::stored_objects(&session);
    assert_eq!(
        everything.len(),
        1,
        "the service leaves no stray token objects, only the KEK"
    );
    let kek = everything[0];
    let attributes = session
        .get_attributes(
            kek,
            &[
                AttributeType::Class,
                AttributeType::Label,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::ValueLen,
            ],
        )
        .unwrap();
    let expect = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(b"kms-master-kek".to_vec()),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::AlwaysSensitive(true),
        Attribute::NeverExtractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::ValueLen(32.into()),
    ];
    assert_eq!(attributes, expect);

    // CKA_VALUE cannot be read, by anyone holding the PIN.
    let value = session
        .get_attribute_info(kek, &[AttributeType::Value])
        .unwrap();
    assert!(
        matches!(value.as_slice(), [AttributeInfo::Sensitive]),
        "CKA_VALUE must be sensitive: {value:?}"
    );

    // Still nothing else once the server has stopped.
    drop(keys);
    assert!(server.stop().await.success());
    assert_eq!(common::stored_objects(&session).len(), 1);
    session.logout().unwrap();
    drop(session);
    ctx.finalize().unwrap();
}
