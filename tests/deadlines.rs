//! Bounds on waiting for the HSM. A call whose deadline passes while it waits for an
//! HSM session is not started in the HSM: the work would reach nobody. Calls beyond the
//! queue's size, or that waited longer than its bound, are refused RESOURCE_EXHAUSTED
//! instead of piling up; the service serves normally as soon as the session is free.
//!
//! The server has one session, held for a known time by a C_Encrypt that the
//! fault-injecting module stalls (`tests/pkcs11-faults`), so what queues behind it is
//! deterministic.

mod common;

use std::time::{Duration, Instant};

use common::faults::Faults;
use common::{ServerSetup, TestServer, TestToken, audit_events, create_key, instance, req};
use kms::proto::{CreateKeyRequest, ListAuditEventsRequest, WrapKeyRequest};
use tempfile::TempDir;
use tonic::Code;

struct Rig {
    _token: TestToken,
    _data: TempDir,
    faults: Faults,
    server: TestServer,
    tenant: String,
    key: String,
}

/// A server with one HSM session (and `env`), behind the fault module, and one key.
async fn rig(env: &[(&str, &str)]) -> Rig {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let faults = Faults::new(&token, data.path());
    let mut setup = ServerSetup::new(Some(&token), data.path());
    setup.extra_env = faults.env();
    setup
        .extra_env
        .push(("KMS_HSM_POOL_SIZE".into(), "1".into()));
    setup
        .extra_env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let server = TestServer::try_start(setup)
        .await
        .unwrap_or_else(|failure| panic!("server did not start: {failure}"));
    let tenant = instance();
    let key = create_key(
        &mut server.keys().await,
        &tenant,
        CreateKeyRequest {
            name: "queued".into(),
            ..Default::default()
        },
    )
    .await
    .id;
    Rig {
        _token: token,
        _data: data,
        faults,
        server,
        tenant,
        key,
    }
}

impl Rig {
    async fn wrap(&self, timeout: Option<Duration>) -> Result<(), tonic::Status> {
        let mut request = req(
            &self.tenant,
            WrapKeyRequest {
                id: self.key.clone(),
                plaintext: None,
                aad: vec![],
            },
        );
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        self.server.keys().await.wrap_key(request).await.map(|_| ())
    }

    /// Sends a WrapKey now, on its own task.
    async fn spawn_wrap(
        &self,
        timeout: Option<Duration>,
    ) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
        let (mut keys, tenant, id) = (
            self.server.keys().await,
            self.tenant.clone(),
            self.key.clone(),
        );
        tokio::spawn(async move {
            let mut request = req(
                &tenant,
                WrapKeyRequest {
                    id,
                    plaintext: None,
                    aad: vec![],
                },
            );
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            keys.wrap_key(request).await.map(|_| ())
        })
    }

    /// Holds the only session for `hold`: a WrapKey whose C_Encrypt stalls. Returns
    /// once the stall has begun.
    async fn hold_the_session(&self, hold: Duration) -> tokio::task::JoinHandle<()> {
        let injected = self.faults.injected();
        self.faults
            .set(&format!("C_Encrypt hang {} times 1", hold.as_millis()));
        let (mut keys, tenant, id) = (
            self.server.keys().await,
            self.tenant.clone(),
            self.key.clone(),
        );
        let held = tokio::spawn(async move {
            keys.wrap_key(req(
                &tenant,
                WrapKeyRequest {
                    id,
                    plaintext: None,
                    aad: vec![],
                },
            ))
            .await
            .expect("the held call itself completes");
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.faults.injected() == injected {
            assert!(Instant::now() < deadline, "the stall never began");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        held
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_whose_deadline_passed_in_the_queue_are_not_run_in_the_hsm() {
    let rig = rig(&[]).await;
    rig.wrap(None).await.unwrap();
    let held = rig.hold_the_session(Duration::from_secs(2)).await;
    let mut waiting = Vec::new();
    for _ in 0..10 {
        waiting.push(rig.spawn_wrap(Some(Duration::from_millis(300))).await);
    }
    for call in waiting {
        let status = call.await.unwrap().unwrap_err();
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
    }
    held.await.unwrap();
    assert!(
        rig.server
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
            &rig.server,
            &rig.tenant,
            ListAuditEventsRequest {
                operation: "WrapKey".into(),
                key_id: rig.key.clone(),
                ..Default::default()
            },
        )
        .await;
        let cut: Vec<_> = events.into_iter().filter(|e| e.code != 0).collect();
        waited += 1;
        if cut.len() >= 10 || waited == 50 {
            break cut;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cut_off.len(), 10, "one record per call cut off");
    for event in &cut_off {
        assert!(
            [Code::DeadlineExceeded as i32, Code::Cancelled as i32].contains(&event.code),
            "{event:?}"
        );
    }
    // The session is free again and serves at once.
    rig.wrap(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_beyond_the_hsm_queue_are_refused_at_once_and_service_resumes() {
    let rig = rig(&[("KMS_HSM_QUEUE_SIZE", "4")]).await;
    rig.wrap(None).await.unwrap();
    let held = rig.hold_the_session(Duration::from_secs(2)).await;

    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (keys, tenant, id) = (rig.server.keys().await, rig.tenant.clone(), rig.key.clone());
        flood.spawn(async move {
            let mut keys = keys;
            let started = Instant::now();
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
    // the session (which is held for two seconds). The four queued wait, then are
    // served.
    let (mut refused_at_once, mut served) = (0, 0);
    while let Some(call) = flood.join_next().await {
        match call.unwrap() {
            (Err(status), waited) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("retry with backoff"),
                    "{status:?}"
                );
                assert!(waited < Duration::from_secs(2), "refused after {waited:?}");
                refused_at_once += 1;
            }
            (Ok(()), _) => served += 1,
        }
    }
    assert_eq!(
        refused_at_once, 20,
        "all but the queue's four refused at once"
    );
    assert_eq!(served, 4);
    held.await.unwrap();
    // Well-behaved calls are served again as soon as the session is free.
    for _ in 0..10 {
        rig.wrap(None).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_that_waited_longer_than_the_queue_bound_are_refused() {
    let rig = rig(&[("KMS_HSM_QUEUE_WAIT_MS", "300")]).await;
    rig.wrap(None).await.unwrap();
    let held = rig.hold_the_session(Duration::from_secs(1)).await;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(rig.spawn_wrap(None).await);
    }
    for call in waiting {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    held.await.unwrap();
    rig.wrap(None).await.unwrap();
}
