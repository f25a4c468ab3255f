//! Envelope encryption over real gRPC with SoftHSM: wrap, unwrap, rewrap, rotation,
//! versions and key states.

mod common;

use common::{TestServer, TestToken, instance, req};
use kms::cli::connect::AuthedChannel;
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::{
    CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest, EnableKeyRequest, GetKeyRequest,
    KeyState, ListKeyVersionsRequest, RewrapKeyRequest, RotateKeyRequest, UnwrapKeyRequest,
    WrapKeyRequest,
};
use tonic::{Code, Status};

type Client = KeyServiceClient<AuthedChannel>;

const GENERIC: &str = "ciphertext: cannot be unwrapped";

async fn server_with(env: &[(&str, &str)]) -> (TestToken, tempfile::TempDir, TestServer) {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(&token, data.path(), env).await;
    (token, data, server)
}

async fn root_key(keys: &mut Client, tenant: &str) -> String {
    create(
        keys,
        tenant,
        CreateKeyRequest {
            name: "root".into(),
            ..Default::default()
        },
    )
    .await
}

async fn create(keys: &mut Client, tenant: &str, request: CreateKeyRequest) -> String {
    common::create_key(keys, tenant, request).await.id
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn wrap(
    keys: &mut Client,
    tenant: &str,
    id: &str,
    plaintext: Option<Vec<u8>>,
    aad: Vec<String>,
) -> Result<kms::proto::WrapKeyResponse, Status> {
    keys.wrap_key(req(
        tenant,
        WrapKeyRequest {
            id: id.into(),
            plaintext,
            aad,
        },
    ))
    .await
    .map(|r| r.into_inner())
}

async fn unwrap(
    keys: &mut Client,
    tenant: &str,
    id: &str,
    ciphertext: Vec<u8>,
    aad: Vec<String>,
) -> Result<kms::proto::UnwrapKeyResponse, Status> {
    keys.unwrap_key(req(
        tenant,
        UnwrapKeyRequest {
            id: id.into(),
            ciphertext,
            aad,
        },
    ))
    .await
    .map(|r| r.into_inner())
}

fn assert_generic(result: Result<impl std::fmt::Debug, Status>, case: &str) {
    let err = result.expect_err(case);
    assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err:?}");
    assert!(
        err.message().starts_with(GENERIC),
        "{case}: {}",
        err.message()
    );
}

fn assert_state_refusal(result: Result<impl std::fmt::Debug, Status>, state: &str, case: &str) {
    let err = result.expect_err(case);
    assert_eq!(err.code(), Code::FailedPrecondition, "{case}: {err:?}");
    assert!(err.message().contains(state), "{case}: {}", err.message());
}

#[tokio::test]
async fn wrap_and_unwrap_round_trip_with_and_without_plaintext() {
    let (_t, _d, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let id = root_key(&mut keys, &tenant).await;
    let current = keys
        .get_key(req(&tenant, GetKeyRequest { id: id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .current_version_id;

    let given = b"a data encryption key of any length".to_vec();
    let wrapped = wrap(
        &mut keys,
        &tenant,
        &id,
        Some(given.clone()),
        strings(&["ctx"]),
    )
    .await
    .unwrap();
    assert!(
        wrapped.plaintext.is_empty(),
        "given plaintext is not echoed"
    );
    assert_eq!(wrapped.key_version_id, current);
    assert!(!wrapped.ciphertext.windows(given.len()).any(|w| w == given));
    let unwrapped = unwrap(
        &mut keys,
        &tenant,
        &id,
        wrapped.ciphertext.clone(),
        strings(&["ctx"]),
    )
    .await
    .unwrap();
    assert_eq!(unwrapped.plaintext, given);
    assert_eq!(unwrapped.key_version_id, current);
    assert!(unwrapped.rewrapped_ciphertext.is_empty());

    // Same plaintext twice: different IVs, different ciphertexts.
    let again = wrap(
        &mut keys,
        &tenant,
        &id,
        Some(given.clone()),
        strings(&["ctx"]),
    )
    .await
    .unwrap();
    assert_ne!(again.ciphertext, wrapped.ciphertext);

    // No plaintext: the HSM generates a 32-byte data key and returns it.
    let generated = wrap(&mut keys, &tenant, &id, None, vec![]).await.unwrap();
    assert_eq!(generated.plaintext.len(), 32);
    let back = unwrap(&mut keys, &tenant, &id, generated.ciphertext, vec![])
        .await
        .unwrap();
    assert_eq!(back.plaintext, generated.plaintext);
    let other = wrap(&mut keys, &tenant, &id, None, vec![]).await.unwrap();
    assert_ne!(other.plaintext, generated.plaintext);

    let log = server.settled_log().await;
    assert!(!log.contains(&format!("{:?}", generated.plaintext)));
}

#[tokio::test]
async fn aad_order_and_content_matter() {
    let (_t, _d, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let id = root_key(&mut keys, &tenant).await;
    let ct = wrap(
        &mut keys,
        &tenant,
        &id,
        Some(vec![1; 16]),
        strings(&["ab", "c"]),
    )
    .await
    .unwrap()
    .ciphertext;
    assert!(
        unwrap(&mut keys, &tenant, &id, ct.clone(), strings(&["ab", "c"]))
            .await
            .is_ok()
    );
    for (case, aad) in [
        ("split differently", strings(&["a", "bc"])),
        ("reordered", strings(&["c", "ab"])),
        ("missing", vec![]),
        ("extra entry", strings(&["ab", "c", ""])),
        ("changed", strings(&["ab", "d"])),
        ("concatenated", strings(&["abc"])),
    ] {
        assert_generic(unwrap(&mut keys, &tenant, &id, ct.clone(), aad).await, case);
    }
    let empty_list = wrap(&mut keys, &tenant, &id, Some(vec![2; 16]), vec![])
        .await
        .unwrap()
        .ciphertext;
    assert_generic(
        unwrap(&mut keys, &tenant, &id, empty_list, strings(&[""])).await,
        "[] vs [\"\"]",
    );
}

#[tokio::test]
async fn limits_at_and_past_each_bound() {
    let (_t, _d, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let id = root_key(&mut keys, &tenant).await;

    for len in [1usize, 4096] {
        let pt = vec![0xab; len];
        let ct = wrap(&mut keys, &tenant, &id, Some(pt.clone()), vec![])
            .await
            .unwrap()
            .ciphertext;
        let back = unwrap(&mut keys, &tenant, &id, ct, vec![]).await.unwrap();
        assert_eq!(back.plaintext, pt);
    }
    for len in [0usize, 4097] {
        let err = wrap(&mut keys, &tenant, &id, Some(vec![1; len]), vec![])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("plaintext"), "{}", err.message());
    }

    let max_aad: Vec<String> = (0..126)
        .map(|i| "x".repeat(if i == 0 { 255 } else { i % 7 }))
        .collect();
    let ct = wrap(&mut keys, &tenant, &id, Some(vec![5; 8]), max_aad.clone())
        .await
        .unwrap()
        .ciphertext;
    assert!(
        unwrap(&mut keys, &tenant, &id, ct.clone(), max_aad.clone())
            .await
            .is_ok()
    );

    let too_many: Vec<String> = (0..127).map(|_| "a".into()).collect();
    let too_long = vec!["y".repeat(256)];
    for (case, aad) in [("127 entries", too_many), ("256-byte entry", too_long)] {
        let err = wrap(&mut keys, &tenant, &id, Some(vec![5; 8]), aad.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{case}");
        assert!(
            err.message().starts_with("aad"),
            "{case}: {}",
            err.message()
        );
        let err = unwrap(&mut keys, &tenant, &id, ct.clone(), aad)
            .await
            .unwrap_err();
        assert!(
            err.message().starts_with("aad"),
            "{case}: {}",
            err.message()
        );
    }
    let err = unwrap(&mut keys, &tenant, &id, vec![], vec![])
        .await
        .unwrap_err();
    assert!(err.message().starts_with("ciphertext: required"));
}

#[tokio::test]
async fn every_tampering_gets_the_same_answer() {
    let (_t, _d, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let id = root_key(&mut keys, &tenant).await;
    let other_key = root_key(&mut keys, &tenant).await;
    let ct = wrap(
        &mut keys,
        &tenant,
        &id,
        Some(vec![9; 32]),
        strings(&["aad"]),
    )
    .await
    .unwrap()
    .ciphertext;
    // format byte | version id 1..17 | iv 17..29 | body | tag (last 16)
    let body = 29;
    let tag = ct.len() - 16;
    for (case, index) in [
        ("format byte", 0),
        ("version id", 5),
        ("iv", 20),
        ("ciphertext body", body + 3),
        ("tag", tag + 2),
    ] {
        let mut bad = ct.clone();
        bad[index] ^= 0x01;
        assert_generic(
            unwrap(&mut keys, &tenant, &id, bad, strings(&["aad"])).await,
            case,
        );
    }
    assert_generic(
        unwrap(
            &mut keys,
            &tenant,
            &id,
            ct[..ct.len() - 1].to_vec(),
            strings(&["aad"]),
        )
        .await,
        "truncated by one byte",
    );
    assert_generic(
        unwrap(
            &mut keys,
            &tenant,
            &id,
            ct[..20].to_vec(),
            strings(&["aad"]),
        )
        .await,
        "truncated header",
    );
    let mut longer = ct.clone();
    longer.push(0);
    assert_generic(
        unwrap(&mut keys, &tenant, &id, longer, strings(&["aad"])).await,
        "extended",
    );
    assert_generic(
        unwrap(
            &mut keys,
            &tenant,
            &other_key,
            ct.clone(),
            strings(&["aad"]),
        )
        .await,
        "another key of the same instance",
    );

    // Another instance cannot even see the key.
    let err = unwrap(&mut keys, &instance(), &id, ct.clone(), strings(&["aad"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The original still unwraps: nothing was damaged by the attempts.
    assert!(
        unwrap(&mut keys, &tenant, &id, ct, strings(&["aad"]))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn rotation_keeps_old_ciphertexts_readable_and_rewraps_them() {
    let (token, data, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let id = root_key(&mut keys, &tenant).await;
    let aad = strings(&["tenant", "table"]);
    let old = wrap(
        &mut keys,
        &tenant,
        &id,
        Some(b"old secret".to_vec()),
        aad.clone(),
    )
    .await
    .unwrap();

    let rotated = keys
        .rotate_key(req(
            &tenant,
            RotateKeyRequest {
                id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_ne!(rotated.current_version_id, old.key_version_id);

    let fresh = wrap(
        &mut keys,
        &tenant,
        &id,
        Some(b"new secret".to_vec()),
        aad.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        fresh.key_version_id, rotated.current_version_id,
        "wrap uses the latest"
    );

    let opened = unwrap(&mut keys, &tenant, &id, old.ciphertext.clone(), aad.clone())
        .await
        .unwrap();
    assert_eq!(opened.plaintext, b"old secret");
    assert_eq!(opened.key_version_id, old.key_version_id);
    assert_eq!(opened.rewrapped_key_version_id, rotated.current_version_id);
    let reopened = unwrap(
        &mut keys,
        &tenant,
        &id,
        opened.rewrapped_ciphertext.clone(),
        aad.clone(),
    )
    .await
    .unwrap();
    assert_eq!(reopened.plaintext, b"old secret");
    assert!(
        reopened.rewrapped_ciphertext.is_empty(),
        "already on the latest version"
    );

    // RewrapKey: to the latest version, plaintext never returned.
    let rewrapped = keys
        .rewrap_key(req(
            &tenant,
            RewrapKeyRequest {
                id: id.clone(),
                ciphertext: old.ciphertext.clone(),
                aad: aad.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rewrapped.key_version_id, rotated.current_version_id);
    let back = unwrap(&mut keys, &tenant, &id, rewrapped.ciphertext, aad.clone())
        .await
        .unwrap();
    assert_eq!(back.plaintext, b"old secret");

    let third = keys
        .rotate_key(req(
            &tenant,
            RotateKeyRequest {
                id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    let versions = keys
        .list_key_versions(req(
            &tenant,
            ListKeyVersionsRequest {
                id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = versions.versions.iter().map(|v| v.id.clone()).collect();
    assert_eq!(
        ids,
        [
            third.current_version_id.clone(),
            rotated.current_version_id.clone(),
            old.key_version_id.clone()
        ],
        "newest first"
    );
    assert_eq!(versions.total_count, 3);

    // Rotation is durable: after a restart every version still unwraps.
    drop(keys);
    assert!(server.stop().await.success());
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    for (ct, expected) in [
        (old.ciphertext, "old secret"),
        (fresh.ciphertext, "new secret"),
    ] {
        let opened = unwrap(&mut keys, &tenant, &id, ct, aad.clone())
            .await
            .unwrap();
        assert_eq!(opened.plaintext, expected.as_bytes());
        assert_eq!(opened.rewrapped_key_version_id, third.current_version_id);
    }
    let key = keys
        .get_key(req(&tenant, GetKeyRequest { id }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(key.current_version_id, third.current_version_id);
}

#[tokio::test]
async fn rotation_of_imported_and_standard_keys() {
    let (_t, _d, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let imported = create(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "byok".into(),
            payload: Some(vec![0x11; 32]),
            ..Default::default()
        },
    )
    .await;
    let ct = wrap(&mut keys, &tenant, &imported, Some(vec![1; 10]), vec![])
        .await
        .unwrap()
        .ciphertext;
    let rotate = |id: &str, payload: Option<Vec<u8>>| RotateKeyRequest {
        id: id.into(),
        payload,
        ..Default::default()
    };
    let err = keys
        .rotate_key(req(&tenant, rotate(&imported, None)))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("payload: required"),
        "{}",
        err.message()
    );
    let err = keys
        .rotate_key(req(&tenant, rotate(&imported, Some(vec![0x22; 16]))))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("payload"), "{}", err.message());
    keys.rotate_key(req(&tenant, rotate(&imported, Some(vec![0x22; 32]))))
        .await
        .unwrap();
    let opened = unwrap(&mut keys, &tenant, &imported, ct, vec![])
        .await
        .unwrap();
    assert_eq!(opened.plaintext, vec![1; 10]);
    assert!(!opened.rewrapped_ciphertext.is_empty());

    let generated = root_key(&mut keys, &tenant).await;
    let err = keys
        .rotate_key(req(&tenant, rotate(&generated, Some(vec![0x22; 32]))))
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("payload: must be absent"),
        "{}",
        err.message()
    );

    let standard = create(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "std".into(),
            extractable: true,
            ..Default::default()
        },
    )
    .await;
    for result in [
        keys.rotate_key(req(&tenant, rotate(&standard, None)))
            .await
            .map(|_| ()),
        wrap(&mut keys, &tenant, &standard, None, vec![])
            .await
            .map(|_| ()),
    ] {
        let err = result.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("standard key"), "{}", err.message());
    }
}

#[tokio::test]
async fn each_state_refuses_what_it_must() {
    let (_t, _d, server) = server_with(&[]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let id = root_key(&mut keys, &tenant).await;
    let ct = wrap(&mut keys, &tenant, &id, Some(vec![3; 24]), vec![])
        .await
        .unwrap()
        .ciphertext;

    // SUSPENDED: no wrap, unwrap, rewrap or rotate.
    let disabled = keys
        .disable_key(req(&tenant, DisableKeyRequest { id: id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(disabled.state, KeyState::Suspended as i32);
    refuse_all_uses(&mut keys, &tenant, &id, &ct, "SUSPENDED", true).await;
    assert_state_refusal(
        keys.disable_key(req(&tenant, DisableKeyRequest { id: id.clone() }))
            .await,
        "SUSPENDED",
        "disable twice",
    );
    let enabled = keys
        .enable_key(req(&tenant, EnableKeyRequest { id: id.clone() }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(enabled.state, KeyState::Active as i32);
    assert_state_refusal(
        keys.enable_key(req(&tenant, EnableKeyRequest { id: id.clone() }))
            .await,
        "ACTIVE",
        "enable an active key",
    );
    assert!(
        unwrap(&mut keys, &tenant, &id, ct.clone(), vec![])
            .await
            .is_ok()
    );

    // DEACTIVATED once the expiration date passes: unwrap still works.
    let expires = std::time::SystemTime::now() + std::time::Duration::from_millis(1500);
    let expires = expires.duration_since(std::time::UNIX_EPOCH).unwrap();
    let expiring = create(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "expiring".into(),
            expiration_date: Some(prost_types::Timestamp {
                seconds: expires.as_secs() as i64,
                nanos: expires.subsec_nanos() as i32,
            }),
            ..Default::default()
        },
    )
    .await;
    let before = wrap(&mut keys, &tenant, &expiring, Some(vec![4; 24]), vec![])
        .await
        .unwrap()
        .ciphertext;
    keys.rotate_key(req(
        &tenant,
        RotateKeyRequest {
            id: expiring.clone(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    while std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        <= expires
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let state = keys
        .get_key(req(
            &tenant,
            GetKeyRequest {
                id: expiring.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
        .state;
    assert_eq!(state, KeyState::Deactivated as i32);
    assert_state_refusal(
        wrap(&mut keys, &tenant, &expiring, None, vec![]).await,
        "DEACTIVATED",
        "wrap when deactivated",
    );
    assert_state_refusal(
        keys.rotate_key(req(
            &tenant,
            RotateKeyRequest {
                id: expiring.clone(),
                ..Default::default()
            },
        ))
        .await,
        "DEACTIVATED",
        "rotate when deactivated",
    );
    assert_state_refusal(
        keys.rewrap_key(req(
            &tenant,
            RewrapKeyRequest {
                id: expiring.clone(),
                ciphertext: before.clone(),
                aad: vec![],
            },
        ))
        .await,
        "DEACTIVATED",
        "rewrap when deactivated",
    );
    let opened = unwrap(&mut keys, &tenant, &expiring, before, vec![])
        .await
        .unwrap();
    assert_eq!(opened.plaintext, vec![4; 24]);
    assert!(
        opened.rewrapped_ciphertext.is_empty(),
        "no new ciphertexts from a deactivated key"
    );

    // DESTROYED: terminal.
    keys.delete_key(req(&tenant, DeleteKeyRequest { id: id.clone() }))
        .await
        .unwrap();
    refuse_all_uses(&mut keys, &tenant, &id, &ct, "DESTROYED", true).await;
    assert_state_refusal(
        keys.enable_key(req(&tenant, EnableKeyRequest { id: id.clone() }))
            .await,
        "DESTROYED",
        "enable a destroyed key",
    );
}

async fn refuse_all_uses(
    keys: &mut Client,
    tenant: &str,
    id: &str,
    ct: &[u8],
    state: &str,
    unwrap_refused: bool,
) {
    assert_state_refusal(wrap(keys, tenant, id, None, vec![]).await, state, "wrap");
    if unwrap_refused {
        assert_state_refusal(
            unwrap(keys, tenant, id, ct.to_vec(), vec![]).await,
            state,
            "unwrap",
        );
    }
    assert_state_refusal(
        keys.rewrap_key(req(
            tenant,
            RewrapKeyRequest {
                id: id.into(),
                ciphertext: ct.to_vec(),
                aad: vec![],
            },
        ))
        .await,
        state,
        "rewrap",
    );
    assert_state_refusal(
        keys.rotate_key(req(
            tenant,
            RotateKeyRequest {
                id: id.into(),
                ..Default::default()
            },
        ))
        .await,
        state,
        "rotate",
    );
}

/// Many callers wrap and unwrap on many keys, with a cache far smaller than the key
/// count, while another caller rotates and disables/enables. Every result is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_use_with_rotation_and_disable_stays_correct() {
    let (_t, _d, server) = server_with(&[("KMS_HSM_KEY_CACHE_SIZE", "4")]).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(root_key(&mut keys, &tenant).await);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut workers = Vec::new();
    for worker in 0..16usize {
        let mut client = keys.clone();
        let (tenant, ids) = (tenant.clone(), ids.clone());
        workers.push(tokio::spawn(async move {
            let mut kept = Vec::new();
            let (mut ok, mut refused) = (0, 0);
            for round in 0..40usize {
                let id = &ids[(worker * 7 + round) % ids.len()];
                let plaintext = format!("w{worker}-r{round}").into_bytes();
                let aad = vec![format!("worker-{worker}")];
                match wrap(
                    &mut client,
                    &tenant,
                    id,
                    Some(plaintext.clone()),
                    aad.clone(),
                )
                .await
                {
                    Ok(w) => {
                        match unwrap(&mut client, &tenant, id, w.ciphertext.clone(), aad.clone())
                            .await
                        {
                            Ok(u) => {
                                assert_eq!(u.plaintext, plaintext);
                                ok += 1;
                            }
                            Err(e) => {
                                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                                refused += 1;
                            }
                        }
                        kept.push((id.clone(), w.ciphertext, aad, plaintext));
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                        assert!(e.message().contains("SUSPENDED"), "{}", e.message());
                        refused += 1;
                    }
                }
            }
            (kept, ok, refused)
        }));
    }

    let mut admin = keys.clone();
    let (admin_tenant, admin_ids, admin_stop) = (tenant.clone(), ids.clone(), stop.clone());
    let rotator = tokio::spawn(async move {
        let mut round = 0usize;
        while !admin_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = admin_ids[round % admin_ids.len()].clone();
            admin
                .rotate_key(req(
                    &admin_tenant,
                    RotateKeyRequest {
                        id: id.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            admin
                .disable_key(req(&admin_tenant, DisableKeyRequest { id: id.clone() }))
                .await
                .unwrap();
            admin
                .enable_key(req(&admin_tenant, EnableKeyRequest { id }))
                .await
                .unwrap();
            round += 1;
        }
        round
    });

    let mut all = Vec::new();
    let mut ok_total = 0;
    for worker in workers {
        let (kept, ok, _refused) = worker.await.unwrap();
        ok_total += ok;
        all.extend(kept);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rotations = rotator.await.unwrap();
    assert!(rotations > 0 && ok_total > 0);

    // Every ciphertext ever returned still opens to its plaintext.
    for (id, ct, aad, plaintext) in all {
        let opened = unwrap(&mut keys, &tenant, &id, ct, aad).await.unwrap();
        assert_eq!(opened.plaintext, plaintext);
    }
}
