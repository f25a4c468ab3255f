//! Malformed input of every kind is INVALID_ARGUMENT, names the field, and changes nothing.

mod common;

use common::{TestServer, TestToken, instance, req};
use kms::cli::connect::AuthedChannel;
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::{
    CountKeysRequest, CreateKeyRequest, DeleteKeyRequest, GetKeyRequest, ListKeysRequest,
};
use prost_types::Timestamp;
use tonic::{Code, Request, Status};

fn named(name: &str) -> CreateKeyRequest {
    CreateKeyRequest {
        name: name.into(),
        ..Default::default()
    }
}

async fn total(keys: &mut KeyServiceClient<AuthedChannel>, tenant: &str) -> u64 {
    keys.count_keys(req(tenant, CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count
}

#[tokio::test]
async fn bad_inputs_are_refused_naming_the_field_and_change_nothing() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let mut keys = server.keys().await;
    let tenant = instance();
    let existing = common::create_key(&mut keys, &tenant, named("existing")).await;
    let before = total(&mut keys, &tenant).await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // (case, expected field in the message, call)
    let creates: Vec<(&str, &str, CreateKeyRequest)> = vec![
        ("empty name", "name", named("")),
        ("name of 91 chars", "name", named(&"n".repeat(91))),
        ("leading space", "name", named(" name")),
        ("trailing space", "name", named("name ")),
        ("control char in name", "name", named("na\u{7}me")),
        (
            "description of 241 chars",
            "description",
            CreateKeyRequest {
                description: "d".repeat(241),
                ..named("ok")
            },
        ),
        (
            "root payload of 20 bytes",
            "payload",
            CreateKeyRequest {
                payload: Some(vec![1; 20]),
                ..named("ok")
            },
        ),
        (
            "empty root payload",
            "payload",
            CreateKeyRequest {
                payload: Some(vec![]),
                ..named("ok")
            },
        ),
        (
            "root payload of 64 bytes",
            "payload",
            CreateKeyRequest {
                payload: Some(vec![1; 64]),
                ..named("ok")
            },
        ),
        (
            "standard payload of 16 bytes",
            "payload",
            CreateKeyRequest {
                payload: Some(vec![1; 16]),
                extractable: true,
                ..named("ok")
            },
        ),
        (
            "standard payload of 65 bytes",
            "payload",
            CreateKeyRequest {
                payload: Some(vec![1; 65]),
                extractable: true,
                ..named("ok")
            },
        ),
        (
            "unknown origin",
            "origin",
            CreateKeyRequest {
                origin: 42,
                ..named("ok")
            },
        ),
        (
            "unknown encryption_algorithm",
            "encryption_algorithm",
            CreateKeyRequest {
                encryption_algorithm: 9,
                ..named("ok")
            },
        ),
        (
            "expiration in the past",
            "expiration_date",
            CreateKeyRequest {
                expiration_date: Some(Timestamp {
                    seconds: now - 60,
                    nanos: 0,
                }),
                ..named("ok")
            },
        ),
        (
            "expiration with bad nanos",
            "expiration_date",
            CreateKeyRequest {
                expiration_date: Some(Timestamp {
                    seconds: now + 3600,
                    nanos: -5,
                }),
                ..named("ok")
            },
        ),
        (
            "GENERATED origin with a payload",
            "payload",
            CreateKeyRequest {
                origin: 1,
                payload: Some(vec![1; 32]),
                ..named("ok")
            },
        ),
        (
            "IMPORTED origin without a payload",
            "payload",
            CreateKeyRequest {
                origin: 2,
                ..named("ok")
            },
        ),
    ];
    for (case, field, request) in creates {
        let err = keys.create_key(req(&tenant, request)).await.unwrap_err();
        expect_invalid(case, field, &err);
    }

    for (case, id) in [
        ("empty id", ""),
        ("not a uuid", "not-a-uuid"),
        ("v1 uuid", "c232ab00-9414-11ec-b3c8-9e6bdeced846"),
        ("uuid with junk", "0d0466b0-e727-4d9c-b35d-f84bb474a37fx"),
    ] {
        let err = keys
            .get_key(req(&tenant, GetKeyRequest { id: id.into() }))
            .await
            .unwrap_err();
        expect_invalid(case, "id", &err);
        let err = keys
            .delete_key(req(&tenant, DeleteKeyRequest { id: id.into() }))
            .await
            .unwrap_err();
        expect_invalid(case, "id", &err);
    }

    for (case, field, request) in [
        (
            "limit 0",
            "limit",
            ListKeysRequest {
                limit: Some(0),
                ..Default::default()
            },
        ),
        (
            "limit 5001",
            "limit",
            ListKeysRequest {
                limit: Some(5001),
                ..Default::default()
            },
        ),
        (
            "unknown state",
            "state",
            ListKeysRequest {
                state: vec![4],
                ..Default::default()
            },
        ),
    ] {
        let err = keys.list_keys(req(&tenant, request)).await.unwrap_err();
        expect_invalid(case, field, &err);
    }
    let err = keys
        .count_keys(req(
            &tenant,
            CountKeysRequest {
                state: vec![99],
                extractable: None,
            },
        ))
        .await
        .unwrap_err();
    expect_invalid("count with unknown state", "state", &err);

    // Metadata.
    let err = keys
        .create_key(Request::new(named("no-instance")))
        .await
        .unwrap_err();
    expect_invalid("missing instance", "bluemix-instance", &err);
    let mut spaced = Request::new(named("bad-instance"));
    spaced
        .metadata_mut()
        .insert("bluemix-instance", "has space".parse().unwrap());
    let err = keys.create_key(spaced).await.unwrap_err();
    expect_invalid("instance with a space", "bluemix-instance", &err);
    let mut bad_correlation = req(&tenant, named("bad-correlation"));
    bad_correlation
        .metadata_mut()
        .insert("correlation-id", "1234".parse().unwrap());
    let err = keys.create_key(bad_correlation).await.unwrap_err();
    expect_invalid("bad correlation id", "correlation-id", &err);

    // Nothing changed.
    assert_eq!(total(&mut keys, &tenant).await, before);
    let still = keys
        .get_key(req(&tenant, GetKeyRequest { id: existing.id }))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(still.state, existing.state);
    let listing = keys
        .list_keys(req(&tenant, ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listing.keys.len(), 1);
}

fn expect_invalid(case: &str, field: &str, err: &Status) {
    assert_eq!(err.code(), Code::InvalidArgument, "{case}: {err:?}");
    assert!(
        err.message().starts_with(field),
        "{case}: message {:?} should name {field}",
        err.message()
    );
}

/// Sends raw bytes as a method's request body, bypassing the client's own encoding.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// A body that is not the method's protobuf message is the caller's malformed input:
/// INVALID_ARGUMENT, for every KMS method, without naming internal messages or fields;
/// and it is audited with that code.
#[tokio::test]
async fn undecodable_bodies_are_invalid_argument_for_every_method() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let tenant = instance();
    let methods = [
        "/kms.v1.KeyService/CreateKey",
        "/kms.v1.KeyService/WrapKey",
        "/kms.v1.KeyService/UnwrapKey",
        "/kms.v1.KeyService/ListKeys",
        "/kms.v1.ImportTokenService/CreateImportToken",
        "/kms.v1.AuditService/ListAuditEvents",
    ];
    // A truncated varint, a field with wire type 7, a length running past the end.
    let bodies: [&[u8]; 3] = [&[0x08, 0xff], &[0x0f, 0x01], &[0x0a, 0x7f, 0x41]];
    let mut grpc = tonic::client::Grpc::new(server.channel_with(&server.admin_token).await);
    for method in methods {
        for body in bodies {
            grpc.ready().await.unwrap();
            let status = grpc
                .unary(
                    req(&tenant, body.to_vec()),
                    http::uri::PathAndQuery::from_static(method),
                    RawCodec,
                )
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
            assert_eq!(
                status.message(),
                kms::api::codec::MALFORMED_BODY,
                "{method}: nothing of prost's detail"
            );
        }
    }
    let recorded = common::audit_events(
        &server,
        &tenant,
        kms::proto::ListAuditEventsRequest {
            operation: "WrapKey".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(recorded.len(), bodies.len());
    assert!(
        recorded
            .iter()
            .all(|e| e.code == Code::InvalidArgument as i32)
    );
}
