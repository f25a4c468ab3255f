//! A call whose deadline passes while it waits for an HSM session is not started in the
//! HSM: the work would reach nobody.

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
    let mut tokens = server.import_tokens().await;
    let busy_tenant = instance();
    let busy = tokio::spawn(async move {
        tokens
            .create_import_token(req(
                &busy_tenant,
                CreateImportTokenRequest {
                    expiration: Some(600),
                    max_allowed_retrievals: Some(1),
                },
            ))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
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
