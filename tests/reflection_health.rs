//! What an operator's tools see: gRPC reflection (v1 and v1alpha) and the health service.

mod common;

use common::{TestServer, TestToken};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest as ReflectionRequestV1;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient as ClientV1;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest as RequestV1;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse as ResponseV1;
use tonic_reflection::pb::v1alpha::ServerReflectionRequest as ReflectionRequestV1Alpha;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as ClientV1Alpha;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as RequestV1Alpha;
use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as ResponseV1Alpha;

#[tokio::test]
async fn reflection_lists_and_describes_the_services_and_health_reports_serving() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;

    // v1: list services.
    let mut v1 = ClientV1::new(server.channel().await);
    let request = ReflectionRequestV1 {
        host: String::new(),
        message_request: Some(RequestV1::ListServices(String::new())),
    };
    let mut replies = v1
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(ResponseV1::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "kms.v1.KeyService",
        "kms.v1.ImportTokenService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    // v1alpha (what grpcurl 1.8 speaks): describe a symbol.
    let mut alpha = ClientV1Alpha::new(server.channel().await);
    let request = ReflectionRequestV1Alpha {
        host: String::new(),
        message_request: Some(RequestV1Alpha::FileContainingSymbol(
            "kms.v1.KeyService".into(),
        )),
    };
    let mut replies = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(ResponseV1Alpha::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("unexpected reply {reply:?}");
    };
    let text = String::from_utf8_lossy(&files.file_descriptor_proto[0]);
    assert!(text.contains("CreateKey") && text.contains("kms/v1/kms.proto"));

    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "kms.v1.KeyService", "kms.v1.ImportTokenService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
}

/// When the token disappears under the running server, health turns NOT_SERVING.
/// SoftHSM only: its file object store notices the missing token directory.
#[tokio::test]
async fn health_reports_not_serving_when_the_token_goes_away() {
    if common::token_kind() != "softhsm" {
        eprintln!("skipped: needs SoftHSM's file-backed token directory");
        return;
    }
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let mut health = HealthClient::new(server.channel().await);
    let status = |health: &mut HealthClient<tonic::transport::Channel>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "kms.v1.KeyService".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    assert_eq!(status(&mut health).await, ServingStatus::Serving as i32);

    std::fs::rename(
        token.dir.path().join("tokens"),
        token.dir.path().join("tokens.gone"),
    )
    .unwrap();
    // The monitor checks every 2 s; poll the health service, not the clock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if status(&mut health).await == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never reported NOT_SERVING"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(server.log_eventually("HSM health check failed").await);
}
