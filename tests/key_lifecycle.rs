//! Key lifecycle over real gRPC against the real server and a fresh SoftHSM token.

mod common;

use common::{TestServer, TestToken, instance, req};
use kms::proto::{
    CountKeysRequest, CreateKeyRequest, DeleteKeyRequest, GetKeyRequest, Key, KeyOrigin, KeyState,
    ListKeyVersionsRequest, ListKeysRequest, RotateKeyRequest,
};
use tonic::Code;

async fn server() -> (TestToken, tempfile::TempDir, TestServer) {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    (token, data, server)
}

fn create(name: &str, extractable: bool, payload: Option<Vec<u8>>) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        extractable,
        payload,
        ..Default::default()
    }
}

#[tokio::test]
async fn root_key_is_generated_in_the_hsm_and_never_returns_material() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();

    let mut request = create("payments-root", false, None);
    request.description = "wraps payment DEKs".into();
    let created = common::create_key(&mut keys, &tenant, request).await;
    assert_eq!(created.state, KeyState::Active as i32);
    assert_eq!(created.origin, KeyOrigin::Generated as i32);
    assert_eq!(created.size_bits, 256);
    assert!(!created.extractable && !created.imported);
    assert_eq!(created.description, "wraps payment DEKs");
    assert!(uuid::Uuid::parse_str(&created.current_version_id).is_ok());

    let got = keys
        .get_key(req(
            &tenant,
            GetKeyRequest {
                id: created.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.key.as_ref().unwrap(), &created);
    assert_eq!(
        got.payload, None,
        "a root key's material never leaves the HSM"
    );
}

#[tokio::test]
async fn standard_keys_return_their_payload_generated_or_imported() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();

    let generated = common::create_key(&mut keys, &tenant, create("std-gen", true, None)).await;
    let payload_a = keys
        .get_key(req(
            &tenant,
            GetKeyRequest {
                id: generated.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .payload
        .expect("standard key payload");
    assert_eq!(payload_a.len(), 32);
    let payload_b = keys
        .get_key(req(
            &tenant,
            GetKeyRequest {
                id: generated.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .payload
        .unwrap();
    assert_eq!(payload_a, payload_b, "the payload is stable across reads");

    for len in [32usize, 48, 64] {
        let material: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        let imported = common::create_key(
            &mut keys,
            &tenant,
            create("std-imp", true, Some(material.clone())),
        )
        .await;
        assert_eq!(imported.origin, KeyOrigin::Imported as i32);
        assert!(imported.imported);
        assert_eq!(imported.size_bits as usize, len * 8);
        let got = keys
            .get_key(req(&tenant, GetKeyRequest { id: imported.id }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.payload.unwrap(), material);
    }

    // The material must not show up in the server's logs.
    let log = server.settled_log().await;
    assert!(!log.contains(&hex(&payload_a)));
}

#[tokio::test]
async fn root_keys_import_128_192_and_256_bit_material() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();
    for len in [16usize, 24, 32] {
        let key = keys
            .create_key(req(
                &tenant,
                create("root-imp", false, Some(vec![0x5a; len])),
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        assert_eq!(key.size_bits as usize, len * 8);
        assert_eq!(key.origin, KeyOrigin::Imported as i32);
        let got = keys
            .get_key(req(&tenant, GetKeyRequest { id: key.id }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.payload, None);
    }
}

#[tokio::test]
async fn delete_destroys_the_key_for_good() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let standard = keys
        .create_key(req(&tenant, create("doomed", true, Some(vec![1; 32]))))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();

    let deleted = keys
        .delete_key(req(
            &tenant,
            DeleteKeyRequest {
                id: standard.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(deleted.state, KeyState::Destroyed as i32);
    assert!(deleted.deletion_date.is_some());

    let got = keys
        .get_key(req(
            &tenant,
            GetKeyRequest {
                id: standard.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.key.unwrap().state, KeyState::Destroyed as i32);
    assert_eq!(got.payload, None, "a destroyed key has no payload");

    let again = keys
        .delete_key(req(
            &tenant,
            DeleteKeyRequest {
                id: standard.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    assert!(again.message().contains("DESTROYED"), "{}", again.message());

    let destroyed = CountKeysRequest {
        state: vec![KeyState::Destroyed as i32],
        extractable: None,
    };
    let count = keys
        .count_keys(req(&tenant, destroyed))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 1);
}

#[tokio::test]
async fn listing_pages_in_creation_order_with_filters_and_totals() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let mut created: Vec<Key> = Vec::new();
    for i in 0..9 {
        let extractable = i % 3 == 0;
        let key = common::create_key(
            &mut keys,
            &tenant,
            create(&format!("k{i}"), extractable, None),
        )
        .await;
        created.push(key);
    }
    // Destroy two root keys.
    for victim in [&created[1], &created[2]] {
        keys.delete_key(req(
            &tenant,
            DeleteKeyRequest {
                id: victim.id.clone(),
            },
        ))
        .await
        .unwrap();
    }

    // Pages of 4 cover every key exactly once, in creation order.
    let mut seen = Vec::new();
    for offset in (0..12).step_by(4) {
        let page = keys
            .list_keys(req(
                &tenant,
                ListKeysRequest {
                    limit: Some(4),
                    offset,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_count, 9);
        seen.extend(page.keys.into_iter().map(|k| k.name));
    }
    let expected: Vec<String> = (0..9).map(|i| format!("k{i}")).collect();
    assert_eq!(seen, expected);

    // The same by page token: each page starts after the last key of the one before.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut tokens = Vec::new();
    loop {
        let page = keys
            .list_keys(req(
                &tenant,
                ListKeysRequest {
                    limit: Some(2),
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_count, 9);
        seen.extend(page.keys.into_iter().map(|k| k.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        tokens.push(token.clone());
    }
    assert_eq!(seen, expected);
    assert_eq!(
        tokens.len(),
        4,
        "a token after each full page, none after the last"
    );
    // A token is good only for its own instance and filters, never with an offset.
    let refused = |request: ListKeysRequest, tenant: String| {
        let mut keys = keys.clone();
        async move { keys.list_keys(req(&tenant, request)).await.unwrap_err() }
    };
    let other_tenant = refused(
        ListKeysRequest {
            page_token: tokens[0].clone(),
            ..Default::default()
        },
        instance(),
    )
    .await;
    let other_filter = refused(
        ListKeysRequest {
            page_token: tokens[0].clone(),
            extractable: Some(true),
            ..Default::default()
        },
        tenant.clone(),
    )
    .await;
    let garbage = refused(
        ListKeysRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        },
        tenant.clone(),
    )
    .await;
    for status in [other_tenant, other_filter, garbage] {
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("page_token"), "{status:?}");
    }
    let both = refused(
        ListKeysRequest {
            page_token: tokens[0].clone(),
            offset: 2,
            ..Default::default()
        },
        tenant.clone(),
    )
    .await;
    assert!(both.message().starts_with("offset"), "{both:?}");

    // Filters.
    let list = |state: Vec<i32>, extractable: Option<bool>| ListKeysRequest {
        limit: None,
        offset: 0,
        state,
        extractable,
        page_token: String::new(),
    };
    let standard = keys
        .list_keys(req(&tenant, list(vec![], Some(true))))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = standard.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k0", "k3", "k6"]);
    assert_eq!(standard.total_count, 3);

    let active_root = keys
        .list_keys(req(
            &tenant,
            list(vec![KeyState::Active as i32], Some(false)),
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = active_root.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k4", "k5", "k7", "k8"]);

    let offset_filtered = keys
        .list_keys(req(
            &tenant,
            ListKeysRequest {
                limit: Some(2),
                offset: 1,
                state: vec![KeyState::Active as i32],
                extractable: Some(false),
                page_token: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = offset_filtered
        .keys
        .iter()
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(names, ["k5", "k7"]);
    assert_eq!(offset_filtered.total_count, 4);

    let count =
        |state: Vec<i32>, extractable: Option<bool>| CountKeysRequest { state, extractable };
    let mut counts = Vec::new();
    for (state, extractable) in [
        (vec![], None),
        (vec![KeyState::Active as i32], None),
        (vec![KeyState::Destroyed as i32], None),
        (
            vec![KeyState::Active as i32, KeyState::Destroyed as i32],
            Some(false),
        ),
        (vec![KeyState::Suspended as i32], None),
    ] {
        counts.push(
            keys.count_keys(req(&tenant, count(state, extractable)))
                .await
                .unwrap()
                .into_inner()
                .count,
        );
    }
    assert_eq!(counts, [9, 7, 2, 6, 0]);
}

#[tokio::test]
async fn instances_cannot_see_each_others_keys() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let (alice, bob) = (instance(), instance());
    let secret = keys
        .create_key(req(&alice, create("alice-std", true, Some(vec![9; 32]))))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    keys.create_key(req(&bob, create("bob-root", false, None)))
        .await
        .unwrap();

    let err = keys
        .get_key(req(
            &bob,
            GetKeyRequest {
                id: secret.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = keys
        .delete_key(req(
            &bob,
            DeleteKeyRequest {
                id: secret.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The same message as a key that never existed: no existence oracle.
    let unknown = uuid::Uuid::new_v4().to_string();
    let err_unknown = keys
        .get_key(req(
            &bob,
            GetKeyRequest {
                id: unknown.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err_unknown.message().replace(&unknown, "ID"),
        err.message().replace(&secret.id, "ID")
    );

    let bob_list = keys
        .list_keys(req(&bob, ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob_list.total_count, 1);
    assert_eq!(bob_list.keys[0].name, "bob-root");
    let alice_count = keys
        .count_keys(req(&alice, CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(alice_count, 1);

    // icp-instance is the same tenant as bluemix-instance.
    let mut icp = tonic::Request::new(GetKeyRequest {
        id: secret.id.clone(),
    });
    icp.metadata_mut()
        .insert("icp-instance", alice.parse().unwrap());
    assert!(
        keys.get_key(icp)
            .await
            .unwrap()
            .into_inner()
            .payload
            .is_some()
    );
}

#[tokio::test]
async fn correlation_id_is_echoed_or_generated() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let supplied = uuid::Uuid::new_v4().to_string();
    let mut request = req(&tenant, CountKeysRequest::default());
    request
        .metadata_mut()
        .insert("correlation-id", supplied.parse().unwrap());
    let response = keys.count_keys(request).await.unwrap();
    assert_eq!(
        response.metadata().get("correlation-id").unwrap(),
        supplied.as_str()
    );

    let response = keys
        .count_keys(req(&tenant, CountKeysRequest::default()))
        .await
        .unwrap();
    let generated = response.metadata().get("correlation-id").unwrap();
    let generated = uuid::Uuid::parse_str(generated.to_str().unwrap()).unwrap();
    assert_eq!(generated.get_version_num(), 4);

    // Errors carry it too, and it reaches the log.
    let mut request = req(
        &tenant,
        GetKeyRequest {
            id: uuid::Uuid::new_v4().to_string(),
        },
    );
    request
        .metadata_mut()
        .insert("correlation-id", supplied.parse().unwrap());
    let err = keys.get_key(request).await.unwrap_err();
    assert_eq!(
        err.metadata().get("correlation-id").unwrap(),
        supplied.as_str()
    );
    assert!(server.log_eventually(&supplied).await);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn expired_keys_are_deactivated_in_counts_and_lists_without_being_used() {
    let (_t, _d, server) = server().await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let soon = std::time::SystemTime::now() + std::time::Duration::from_millis(1200);
    let soon = soon.duration_since(std::time::UNIX_EPOCH).unwrap();
    keys.create_key(req(
        &tenant,
        CreateKeyRequest {
            name: "short-lived".into(),
            expiration_date: Some(prost_types::Timestamp {
                seconds: soon.as_secs() as i64,
                nanos: soon.subsec_nanos() as i32,
            }),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    keys.create_key(req(&tenant, create("long-lived", false, None)))
        .await
        .unwrap();
    let count = |state: KeyState| CountKeysRequest {
        state: vec![state as i32],
        extractable: None,
    };
    assert_eq!(
        keys.count_keys(req(&tenant, count(KeyState::Active)))
            .await
            .unwrap()
            .into_inner()
            .count,
        2
    );

    // Nobody names the key; the server's sweep must notice the date on its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let deactivated = keys
            .count_keys(req(&tenant, count(KeyState::Deactivated)))
            .await
            .unwrap()
            .into_inner()
            .count;
        if deactivated == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never deactivated");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let active = keys
        .count_keys(req(&tenant, count(KeyState::Active)))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(active, 1);
    let listed = keys
        .list_keys(req(&tenant, ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let states: Vec<_> = listed
        .keys
        .iter()
        .map(|k| (k.name.as_str(), k.state))
        .collect();
    assert_eq!(
        states,
        [
            ("short-lived", KeyState::Deactivated as i32),
            ("long-lived", KeyState::Active as i32)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_versions_page_by_token_newest_first() {
    let token = TestToken::create();
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, dir.path()).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let key = common::create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "rotated".into(),
            ..Default::default()
        },
    )
    .await;
    for _ in 0..6 {
        keys.rotate_key(req(
            &tenant,
            RotateKeyRequest {
                id: key.id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    }
    let list = |request: ListKeyVersionsRequest, tenant: String| {
        let mut keys = keys.clone();
        async move { keys.list_key_versions(req(&tenant, request)).await }
    };
    let all = list(
        ListKeyVersionsRequest {
            id: key.id.clone(),
            ..Default::default()
        },
        tenant.clone(),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(all.total_count, 7);
    assert!(all.next_page_token.is_empty(), "one page holds them all");
    let newest_first: Vec<String> = all.versions.iter().map(|v| v.id.clone()).collect();

    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = list(
            ListKeyVersionsRequest {
                id: key.id.clone(),
                limit: Some(3),
                page_token: page_token.clone(),
                ..Default::default()
            },
            tenant.clone(),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(page.total_count, 7);
        seen.extend(page.versions.into_iter().map(|v| v.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3);

    // A token of one key is refused for another key, another instance, or with an offset.
    let other = common::create_key(
        &mut keys.clone(),
        &tenant,
        CreateKeyRequest {
            name: "other".into(),
            ..Default::default()
        },
    )
    .await;
    let first = list(
        ListKeyVersionsRequest {
            id: key.id.clone(),
            limit: Some(3),
            ..Default::default()
        },
        tenant.clone(),
    )
    .await
    .unwrap()
    .into_inner()
    .next_page_token;
    let other_key = list(
        ListKeyVersionsRequest {
            id: other.id.clone(),
            page_token: first.clone(),
            ..Default::default()
        },
        tenant.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(other_key.code(), Code::InvalidArgument);
    assert!(
        other_key.message().starts_with("page_token"),
        "{other_key:?}"
    );
    let with_offset = list(
        ListKeyVersionsRequest {
            id: key.id.clone(),
            page_token: first,
            offset: 1,
            ..Default::default()
        },
        tenant.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(with_offset.code(), Code::InvalidArgument);
    assert!(
        with_offset.message().starts_with("offset"),
        "{with_offset:?}"
    );
}
