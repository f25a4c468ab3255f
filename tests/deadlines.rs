//! Bounds on waiting for the HSM. A call whose deadline passes while it waits for an
//! HSM session is not started in the HSM: the work would reach nobody. Calls beyond the
//! queue's size, or that waited longer than its bound, are refused RESOURCE_EXHAUSTED
//! instead of piling up; the service serves normally as soon as the session is free.

mod common;

use std::time::Duration;

use common::{TestServer, TestToken, audit_events, create_key, instance, req};
use kms::proto::{
    CreateImportTokenRequest, CreateKeyRequest, ListAuditEventsRequest, WrapKeyRequest,
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_whose_deadline_passed_in_the_queue_are_not_run_in_the_hsm() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    // One session, so a slow HSM job holds up everything behind it.
    let server =
        TestServer::start_with_env(&token, data.path(), &[("KMS_HSM_POOL_SIZE", "1")]).await;
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "queued".into(),
            ..Default::default()
        },
    )
    .await;

    // Generating an RSA-4096 pair (the tests run without the pre-generated pool) keeps
    // the only session busy far longer than the deadlines below.
    let busy = session_held(&server).await;
    let mut waiting = Vec::new();
    for _ in 0..10 {
        let mut keys = server.keys().await;
        let mut request = req(
            &tenant,
            WrapKeyRequest {
                id: key.id.clone(),
                plaintext: None,
                aad: vec![],
            },
        );
        request.set_timeout(Duration::from_millis(30));
        waiting.push(tokio::spawn(async move { keys.wrap_key(request).await }));
    }
    for call in waiting {
        let status = call.await.unwrap().unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    busy.await.unwrap().expect("the slow call itself completes");
    assert!(
        server
            .log_eventually("HSM job skipped: its caller is gone")
            .await,
        "expired calls were skipped, not run"
    );
    // tonic cuts a call off at its deadline by dropping it, outside every layer of
    // ours (or the client's own timer resets the stream a moment before); each call is
    // still in the audit trail, as cut off.
    let mut waited = 0;
    let cut_off = loop {
        let events = audit_events(
            &server,
            &tenant,
            ListAuditEventsRequest {
                operation: "WrapKey".into(),
                key_id: key.id.clone(),
                ..Default::default()
            },
        )
        .await;
        waited += 1;
        if events.len() >= 10 || waited == 50 {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cut_off.len(), 10, "one record per call");
    for event in &cut_off {
        assert!(
            [Code::DeadlineExceeded as i32, Code::Cancelled as i32].contains(&event.code),
            "{event:?}"
        );
    }
    // The session is free again and serves at once.
    server
        .keys()
        .await
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: key.id.clone(),
                plaintext: None,
                aad: vec![],
            },
        ))
        .await
        .unwrap();
}

/// Holds the only HSM session with an RSA-4096 generation (seconds), on `server`.
/// The only session, held by a generation that is still running: a pair that came out
/// of the token unusually fast is waited out and another one started.
async fn session_held(server: &TestServer) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    loop {
        let busy = occupy_the_session(server).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if !busy.is_finished() {
            return busy;
        }
        busy.await.unwrap().expect("the slow call itself completes");
    }
}

/// The call's later HSM steps may themselves be refused once the flood fills the queue.
async fn occupy_the_session(
    server: &TestServer,
) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
    let tenant = instance();
    let mut tokens = server.import_tokens().await;
    tokio::spawn(async move {
        tokens
            .create_import_token(req(
                &tenant,
                CreateImportTokenRequest {
                    expiration: Some(600),
                    max_allowed_retrievals: Some(1),
                },
            ))
            .await
            .map(|_| ())
    })
}

async fn wrap(server: &TestServer, tenant: &str, id: &str) -> Result<(), tonic::Status> {
    server
        .keys()
        .await
        .wrap_key(req(
            tenant,
            WrapKeyRequest {
                id: id.into(),
                plaintext: None,
                aad: vec![],
            },
        ))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_beyond_the_hsm_queue_are_refused_at_once_and_service_resumes() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        &token,
        data.path(),
        &[("KMS_HSM_POOL_SIZE", "1"), ("KMS_HSM_QUEUE_SIZE", "4")],
    )
    .await;
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "flooded".into(),
            ..Default::default()
        },
    )
    .await;
    let busy = session_held(&server).await;

    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (keys, tenant, id) = (server.keys().await, tenant.clone(), key.id.clone());
        flood.spawn(async move {
            let mut keys = keys;
            let started = std::time::Instant::now();
            let outcome = keys
                .wrap_key(req(
                    &tenant,
                    WrapKeyRequest {
                        id,
                        plaintext: None,
                        aad: vec![],
                    },
                ))
                .await;
            (outcome.map(|_| ()), started.elapsed())
        });
    }
    // The queue holds four; the other twenty are refused at once, without waiting for
    // the session. The four queued wait, then are served or (past the queue's time
    // bound) refused too.
    let (mut refused_at_once, mut other) = (0, 0);
    while let Some(call) = flood.join_next().await {
        match call.unwrap() {
            (Err(status), waited) if waited < Duration::from_secs(1) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("retry with backoff"),
                    "{status:?}"
                );
                refused_at_once += 1;
            }
            (Err(status), _) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                other += 1;
            }
            (Ok(()), _) => other += 1,
        }
    }
    assert_eq!(
        refused_at_once, 20,
        "all but the queue's four refused at once"
    );
    assert_eq!(other, 4);
    if let Err(status) = busy.await.unwrap() {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    // Well-behaved calls are served again as soon as the session is free.
    for _ in 0..10 {
        wrap(&server, &tenant, &key.id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_that_waited_longer_than_the_queue_bound_are_refused() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_env(
        &token,
        data.path(),
        &[("KMS_HSM_POOL_SIZE", "1"), ("KMS_HSM_QUEUE_WAIT_MS", "300")],
    )
    .await;
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "waiting".into(),
            ..Default::default()
        },
    )
    .await;
    let busy = session_held(&server).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let (mut keys, tenant, id) = (server.keys().await, tenant.clone(), key.id.clone());
        waiting.push(tokio::spawn(async move {
            keys.wrap_key(req(
                &tenant,
                WrapKeyRequest {
                    id,
                    plaintext: None,
                    aad: vec![],
                },
            ))
            .await
        }));
    }
    for call in waiting {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    busy.await.unwrap().expect("the slow call itself completes");
    wrap(&server, &tenant, &key.id).await.unwrap();
}
