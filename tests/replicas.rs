//! Several replicas: two real `kms serve` processes on one throwaway PostgreSQL database
//! and one token serve one key space; PostgreSQL stopped and started under them; one
//! replica killed under load.

mod common;

use std::time::{Duration, Instant};

use common::postgres::TempPostgres;
use common::{ServerSetup, TestServer, TestToken, create_key, instance, req};
use kms::proto::{
    CreateImportTokenRequest, CreateKeyRequest, DeleteKeyRequest, DisableKeyRequest,
    GetImportTokenRequest, ListKeyVersionsRequest, RotateKeyRequest, UnwrapKeyRequest,
    WrapKeyRequest,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The documented bound (store.cache_ttl_ms, 250 ms by default) with room for a loaded
/// machine: a change on one replica is seen on the other within this.
const SEEN_WITHIN: Duration = Duration::from_secs(1);

struct Replicas {
    _token: TestToken,
    _data: tempfile::TempDir,
    a: TestServer,
    b: TestServer,
}

async fn replica(token: &TestToken, data: &std::path::Path, url: &str) -> TestServer {
    let mut setup = ServerSetup::new(Some(token), data);
    setup.extra_env = vec![("KMS_STORE_URL".into(), url.into())];
    TestServer::try_start(setup)
        .await
        .unwrap_or_else(|failure| panic!("replica did not start: {failure}"))
}

/// Two replicas sharing a data directory (token config, tokens file) and a database.
async fn replicas(pg: &TempPostgres) -> Replicas {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let url = pg.database(&format!("replicas_{}", uuid::Uuid::new_v4().simple()));
    let a = replica(&token, data.path(), &url).await;
    let b = replica(&token, data.path(), &url).await;
    assert!(
        !data.path().join("db").exists(),
        "with a store URL the data directory holds no database"
    );
    Replicas {
        _token: token,
        _data: data,
        a,
        b,
    }
}

fn root_key() -> CreateKeyRequest {
    CreateKeyRequest {
        name: "shared".into(),
        ..Default::default()
    }
}

async fn wrap(server: &TestServer, tenant: &str, id: &str) -> Result<(Vec<u8>, String), Code> {
    server
        .keys()
        .await
        .wrap_key(req(
            tenant,
            WrapKeyRequest {
                id: id.into(),
                plaintext: Some(b"replicated".to_vec()),
                aad: vec![],
            },
        ))
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.ciphertext, r.key_version_id)
        })
        .map_err(|s| s.code())
}

async fn unwrap(server: &TestServer, tenant: &str, id: &str, ciphertext: &[u8]) -> Vec<u8> {
    server
        .keys()
        .await
        .unwrap_key(req(
            tenant,
            UnwrapKeyRequest {
                id: id.into(),
                ciphertext: ciphertext.to_vec(),
                aad: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .plaintext
}

/// Polls `check` until it holds; returns how long that took, failing past `SEEN_WITHIN`.
async fn seen_within(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < SEEN_WITHIN,
            "{what}: not seen within {SEEN_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_serve_one_key_space() {
    let pg = TempPostgres::start();
    let r = replicas(&pg).await;
    let tenant = instance();

    // Created on A, usable on B at once; B's ciphertext opens on A.
    let key = create_key(&mut r.a.keys().await, &tenant, root_key()).await;
    let (ciphertext, first_version) = wrap(&r.b, &tenant, &key.id).await.unwrap();
    assert_eq!(
        unwrap(&r.a, &tenant, &key.id, &ciphertext).await,
        b"replicated"
    );

    // Rotated on A: B wraps with the new version within the bound.
    let rotated =
        r.a.keys()
            .await
            .rotate_key(req(
                &tenant,
                RotateKeyRequest {
                    id: key.id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
    assert_ne!(rotated.current_version_id, first_version);
    let took = seen_within("rotation on A seen by B", async || {
        wrap(&r.b, &tenant, &key.id).await.unwrap().1 == rotated.current_version_id
    })
    .await;
    eprintln!("rotation on A seen by B after {took:?}");
    // The old ciphertext still opens on B.
    assert_eq!(
        unwrap(&r.b, &tenant, &key.id, &ciphertext).await,
        b"replicated"
    );

    // Disabled on A: refused on B within the bound.
    r.a.keys()
        .await
        .disable_key(req(&tenant, DisableKeyRequest { id: key.id.clone() }))
        .await
        .unwrap();
    let took = seen_within("DisableKey on A refused by B", async || {
        wrap(&r.b, &tenant, &key.id).await == Err(Code::FailedPrecondition)
    })
    .await;
    eprintln!("DisableKey on A refused by B after {took:?}");

    // Deleted on A (from another key): refused on B within the bound.
    let other = create_key(&mut r.b.keys().await, &tenant, root_key()).await;
    assert!(wrap(&r.a, &tenant, &other.id).await.is_ok());
    r.a.keys()
        .await
        .delete_key(req(
            &tenant,
            DeleteKeyRequest {
                id: other.id.clone(),
            },
        ))
        .await
        .unwrap();
    let took = seen_within("DeleteKey on A refused by B", async || {
        wrap(&r.b, &tenant, &other.id).await.is_err()
    })
    .await;
    eprintln!("DeleteKey on A refused by B after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_tokens_and_rotations_are_exact_across_replicas() {
    let pg = TempPostgres::start();
    let r = replicas(&pg).await;
    let tenant = instance();

    // A token made on A with one retrieval: A and B race for it; exactly one wins.
    r.a.import_tokens()
        .await
        .create_import_token(req(
            &tenant,
            CreateImportTokenRequest {
                expiration: Some(600),
                max_allowed_retrievals: Some(1),
            },
        ))
        .await
        .unwrap();
    let (mut on_a, mut on_b) = (r.a.import_tokens().await, r.b.import_tokens().await);
    let (first, second) = tokio::join!(
        on_a.get_import_token(req(&tenant, GetImportTokenRequest {})),
        on_b.get_import_token(req(&tenant, GetImportTokenRequest {})),
    );
    let codes = [
        first
            .as_ref()
            .map(|_| Code::Ok)
            .unwrap_or_else(|s| s.code()),
        second
            .as_ref()
            .map(|_| Code::Ok)
            .unwrap_or_else(|s| s.code()),
    ];
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        1,
        "exactly one replica hands out the last retrieval: {codes:?}"
    );
    assert!(codes.contains(&Code::FailedPrecondition));

    // Rotations of one key on both replicas at once: none is lost.
    let key = create_key(&mut r.a.keys().await, &tenant, root_key()).await;
    let rotate = |mut keys: kms::proto::key_service_client::KeyServiceClient<
        kms::cli::connect::AuthedChannel,
    >| {
        let (tenant, id) = (tenant.clone(), key.id.clone());
        async move {
            for _ in 0..10 {
                keys.rotate_key(req(
                    &tenant,
                    RotateKeyRequest {
                        id: id.clone(),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap();
            }
        }
    };
    tokio::join!(
        rotate(r.a.keys().await),
        rotate(r.b.keys().await),
        rotate(r.a.keys().await),
        rotate(r.b.keys().await)
    );
    let versions =
        r.b.keys()
            .await
            .list_key_versions(req(
                &tenant,
                ListKeyVersionsRequest {
                    id: key.id.clone(),
                    limit: Some(100),
                    offset: 0,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        versions.total_count, 41,
        "the first version and 40 rotations"
    );
    // Either replica wraps with the newest version once the bound has passed.
    tokio::time::sleep(SEEN_WITHIN).await;
    for server in [&r.a, &r.b] {
        assert_eq!(
            wrap(server, &tenant, &key.id).await.unwrap().1,
            versions.versions[0].id
        );
    }
}

async fn health(server: &TestServer) -> i32 {
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: "kms.v1.KeyService".into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

async fn until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_then_back_both_replicas_recover() {
    let pg = TempPostgres::start();
    let r = replicas(&pg).await;
    let tenant = instance();
    let key = create_key(&mut r.a.keys().await, &tenant, root_key()).await;
    let (ciphertext, _) = wrap(&r.b, &tenant, &key.id).await.unwrap();

    pg.stop();
    for server in [&r.a, &r.b] {
        let created = server
            .keys()
            .await
            .create_key(req(&tenant, root_key()))
            .await
            .unwrap_err();
        assert_eq!(created.code(), Code::Unavailable, "{created:?}");
        assert!(
            !created.message().contains("postgres") && !created.message().contains("/tmp"),
            "generic message: {}",
            created.message()
        );
        until("NOT_SERVING", Duration::from_secs(15), async || {
            health(server).await == ServingStatus::NotServing as i32
        })
        .await;
    }

    pg.start_again();
    for server in [&r.a, &r.b] {
        until("SERVING again", Duration::from_secs(15), async || {
            health(server).await == ServingStatus::Serving as i32
        })
        .await;
        until("calls work again", Duration::from_secs(15), async || {
            server
                .keys()
                .await
                .create_key(req(&tenant, root_key()))
                .await
                .is_ok()
        })
        .await;
        assert_eq!(
            unwrap(server, &tenant, &key.id, &ciphertext).await,
            b"replicated"
        );
    }
    assert!(r.a.log_eventually("store health check failed").await);
    assert!(r.a.log_eventually("health check recovered").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_killed_under_load_the_other_serves_and_nothing_acknowledged_is_lost() {
    let pg = TempPostgres::start();
    let Replicas {
        _token,
        _data,
        a,
        b,
    } = replicas(&pg).await;
    let tenant = instance();
    let load = |mut keys: kms::proto::key_service_client::KeyServiceClient<
        kms::cli::connect::AuthedChannel,
    >| {
        let tenant = tenant.clone();
        async move {
            let mut acknowledged = Vec::new();
            for _ in 0..40 {
                match keys.create_key(req(&tenant, root_key())).await {
                    Ok(response) => acknowledged.push(response.into_inner().key.unwrap().id),
                    Err(_) => break,
                }
            }
            acknowledged
        }
    };
    let on_a = tokio::spawn(load(a.keys().await));
    let on_b = tokio::spawn(load(b.keys().await));
    tokio::time::sleep(Duration::from_millis(150)).await;
    a.kill().await;
    let (from_a, from_b) = (on_a.await.unwrap(), on_b.await.unwrap());
    assert_eq!(from_b.len(), 40, "the surviving replica served every call");
    // Every key either replica acknowledged is there, read through the survivor.
    let mut keys = b.keys().await;
    for id in from_a.iter().chain(&from_b) {
        keys.get_key(req(&tenant, kms::proto::GetKeyRequest { id: id.clone() }))
            .await
            .unwrap_or_else(|e| panic!("acknowledged key {id} lost: {e}"));
    }
    let count = keys
        .count_keys(req(&tenant, kms::proto::CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    assert!(
        count >= (from_a.len() + from_b.len()) as u64,
        "the counter covers every acknowledged key"
    );
    assert!(wrap(&b, &tenant, &from_b[0]).await.is_ok());
}
