//! A wire-level fuzzer against the real server: for every RPC, mutated and random
//! protobuf bodies, sent in well-formed and malformed gRPC frames, authenticated as an
//! administrator so the bytes reach the decoders and validators. It must end with no
//! INTERNAL or UNKNOWN answer, the server alive and SERVING, its log free of panics,
//! and nothing changed that a refused call touched.
//!
//! `KMS_FUZZ_REQUESTS` sets the number of requests (default 100,000; the documented
//! long run is 1,000,000), `KMS_FUZZ_SEED` replays a run.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use common::{Rng, TestServer, TestToken, create_key, instance, req};
use http_body_util::{BodyExt, Full};
use kms::proto;
use prost::Message;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const DEFAULT_REQUESTS: usize = 100_000;
const IN_FLIGHT: usize = 48;

/// The fuzzer's draws: sizes and indexes as `usize`, bytes in runs.
trait Draw {
    fn pick(&mut self, n: usize) -> usize;
    fn bytes(&mut self, len: usize) -> Vec<u8>;
}

impl Draw for Rng {
    fn pick(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A protobuf body: one of the RPC's seeds changed in one of many ways, or noise.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut body = seeds[rng.pick(seeds.len())].clone();
    match rng.pick(12) {
        0 => {
            let len = rng.pick(80);
            body = rng.bytes(len);
        }
        1 => {
            for _ in 0..=rng.pick(4) {
                if !body.is_empty() {
                    let at = rng.pick(body.len());
                    body[at] ^= 1 << rng.pick(8);
                }
            }
        }
        2 if !body.is_empty() => {
            let at = rng.pick(body.len());
            body[at] = rng.next() as u8;
        }
        3 => {
            let at = rng.pick(body.len() + 1);
            let len = 1 + rng.pick(8);
            let extra = rng.bytes(len);
            body.splice(at..at, extra);
        }
        4 if !body.is_empty() => {
            let from = rng.pick(body.len());
            let to = (from + 1 + rng.pick(8)).min(body.len());
            body.drain(from..to);
        }
        5 => body.truncate(rng.pick(body.len() + 1)),
        6 => {
            // A field header announcing far more bytes than follow.
            body.extend([(rng.pick(20) as u8) << 3 | 2, 0xff, 0xff, 0xff, 0x0f]);
        }
        7 => {
            let other = &seeds[rng.pick(seeds.len())];
            let cut = rng.pick(other.len() + 1);
            body.extend_from_slice(&other[cut..]);
        }
        8 => {
            // Field headers of every wire type, including the reserved 6 and 7.
            for _ in 0..=rng.pick(6) {
                let field = 1 + rng.pick(40) as u64;
                body.push(((field << 3) | rng.pick(8) as u64) as u8);
                let len = rng.pick(4);
                body.extend(rng.bytes(len));
            }
        }
        9 => {
            // An over-long varint.
            body.push(0x08);
            body.extend(std::iter::repeat_n(0xff, 11));
        }
        _ => {} // The seed as is: valid, so the validators behind the decoder run too.
    }
    body
}

/// The gRPC frame around a body: well-formed most of the time, else broken one way.
/// Also returns the message a server may act on: the first complete frame's, if any
/// (tonic, like other gRPC servers, serves a unary call's first message and drops
/// whole messages after it).
fn frame(rng: &mut Rng, body: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let header = |flag: u8, len: u32| {
        let mut h = vec![flag];
        h.extend(len.to_be_bytes());
        h
    };
    let len = body.len() as u32;
    let whole = |framed: Vec<u8>| {
        let first = body.to_vec();
        (framed, Some(first))
    };
    let with_body = |mut framed: Vec<u8>| {
        framed.extend_from_slice(body);
        framed
    };
    match rng.pick(14) {
        // Announces more than is sent.
        0 => (with_body(header(0, len + 1 + rng.pick(64) as u32)), None),
        // Announces less: the first message is the body's start.
        1 => {
            let short = len.saturating_sub(1 + rng.pick(4) as u32);
            let first = body[..short as usize].to_vec();
            (with_body(header(0, short)), Some(first))
        }
        2 => (with_body(header(1, len)), None), // "compressed", with no encoding
        3 => (with_body(header(rng.next() as u8 | 2, len)), None), // an unknown flag
        4 => {
            let cut = rng.pick(5);
            (header(0, len)[..cut].to_vec(), None) // a cut header
        }
        5 => (Vec::new(), None),                     // no message at all
        6 => (with_body(header(0, u32::MAX)), None), // 4 GiB announced
        7 => {
            // Two messages in a unary call.
            let mut two = with_body(header(0, len));
            two.extend(with_body(header(0, len)));
            whole(two)
        }
        _ => whole(with_body(header(0, len))),
    }
}

/// Every RPC and valid requests for it, about the seed keys.
fn targets(keys: &Seeds) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let k = |i: usize| keys.ids[i].clone();
    let wrap = |id: String| proto::WrapKeyRequest {
        id,
        plaintext: Some(b"fuzz plaintext".to_vec()),
        aad: vec!["a".into()],
    };
    vec![
        (
            "/kms.v1.KeyService/CreateKey",
            vec![
                proto::CreateKeyRequest {
                    name: "fuzz".into(),
                    description: "fuzzed".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
                proto::CreateKeyRequest {
                    name: "fuzz-standard".into(),
                    extractable: true,
                    payload: Some(vec![7; 32]),
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/GetKey",
            vec![proto::GetKeyRequest { id: k(0) }.encode_to_vec()],
        ),
        (
            "/kms.v1.KeyService/ListKeys",
            vec![
                proto::ListKeysRequest {
                    limit: Some(10),
                    offset: 1,
                    state: vec![1, 2],
                    extractable: Some(false),
                    page_token: String::new(),
                }
                .encode_to_vec(),
                proto::ListKeysRequest {
                    limit: Some(2),
                    page_token: "01".repeat(33),
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/CountKeys",
            vec![
                proto::CountKeysRequest {
                    state: vec![1, 5],
                    extractable: Some(true),
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/WrapKey",
            vec![wrap(k(0)).encode_to_vec(), wrap(k(1)).encode_to_vec()],
        ),
        (
            "/kms.v1.KeyService/UnwrapKey",
            vec![
                proto::UnwrapKeyRequest {
                    id: k(0),
                    ciphertext: keys.ciphertext.clone(),
                    aad: vec!["a".into()],
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/RewrapKey",
            vec![
                proto::RewrapKeyRequest {
                    id: k(0),
                    ciphertext: keys.ciphertext.clone(),
                    aad: vec!["a".into()],
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/RotateKey",
            vec![
                proto::RotateKeyRequest {
                    id: k(1),
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/ListKeyVersions",
            vec![
                proto::ListKeyVersionsRequest {
                    id: k(0),
                    limit: Some(5),
                    offset: 0,
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/DisableKey",
            vec![proto::DisableKeyRequest { id: k(2) }.encode_to_vec()],
        ),
        (
            "/kms.v1.KeyService/EnableKey",
            vec![proto::EnableKeyRequest { id: k(3) }.encode_to_vec()],
        ),
        (
            "/kms.v1.KeyService/DeleteKey",
            vec![proto::DeleteKeyRequest { id: k(4) }.encode_to_vec()],
        ),
        (
            "/kms.v1.KeyService/GetParametersForImport",
            vec![
                proto::GetParametersForImportRequest {
                    key_id: k(0),
                    wrapping_algorithm: 1,
                    wrapping_key_spec: 1,
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/ImportKeyMaterial",
            vec![
                proto::ImportKeyMaterialRequest {
                    key_id: k(0),
                    import_token: vec![1; 40],
                    encrypted_key_material: vec![2; 256],
                    expiration_model: 1,
                    valid_to: None,
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.KeyService/DeleteImportedKeyMaterial",
            vec![proto::DeleteImportedKeyMaterialRequest { key_id: k(0) }.encode_to_vec()],
        ),
        (
            "/kms.v1.ImportTokenService/CreateImportToken",
            vec![
                // Refused (an expiration below the minimum): a valid one would generate
                // an RSA-4096 pair, seconds of HSM time each.
                proto::CreateImportTokenRequest {
                    expiration: Some(1),
                    max_allowed_retrievals: Some(501),
                }
                .encode_to_vec(),
            ],
        ),
        (
            "/kms.v1.ImportTokenService/GetImportToken",
            vec![proto::GetImportTokenRequest {}.encode_to_vec()],
        ),
        (
            "/kms.v1.AuditService/ListAuditEvents",
            vec![
                proto::ListAuditEventsRequest {
                    key_id: k(0),
                    operation: "WrapKey".into(),
                    page_size: 5,
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
    ]
}

/// A CreateImportToken body that decodes to a valid request: it would generate an
/// RSA-4096 pair (seconds of HSM time each), so the fuzzer does not send it; the
/// accepted path has tests of its own. The server decodes with prost as this does.
fn starts_rsa_generation(path: &str, body: &[u8]) -> bool {
    path == "/kms.v1.ImportTokenService/CreateImportToken"
        && proto::CreateImportTokenRequest::decode(body).is_ok_and(|request| {
            request
                .expiration
                .is_none_or(|e| (300..=86_400).contains(&e))
                && request
                    .max_allowed_retrievals
                    .is_none_or(|n| (1..=500).contains(&n))
        })
}

/// The keys the fuzzed requests are about.
struct Seeds {
    ids: Vec<String>,
    ciphertext: Vec<u8>,
}

/// What one request got: the gRPC code, or `None` when HTTP/2 itself refused it.
async fn send(
    channel: &mut tonic::transport::Channel,
    path: &'static str,
    tenant: &str,
    token: &str,
    body: Vec<u8>,
) -> Option<Code> {
    use tower_service::Service;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://fuzz{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .header("bluemix-instance", tenant)
        .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
        .unwrap();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .ok()?;
    let response = channel.call(request).await.ok()?;
    let (parts, body) = response.into_parts();
    let status_of = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
    };
    if let Some(code) = status_of(&parts.headers) {
        return Some(Code::from_i32(code));
    }
    let collected = body.collect().await.ok()?;
    let code = collected.trailers().and_then(status_of)?;
    Some(Code::from_i32(code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fuzzed_bytes_get_clean_refusals_and_change_nothing_they_touch() {
    let requests = std::env::var("KMS_FUZZ_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(DEFAULT_REQUESTS);
    let seed = Rng::seed_from("KMS_FUZZ_SEED");
    eprintln!("KMS_FUZZ_SEED={seed} KMS_FUZZ_REQUESTS={requests}");

    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start(&token, data.path()).await;
    let tenant = instance();
    let mut keys = server.keys().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let key = create_key(
            &mut keys,
            &tenant,
            proto::CreateKeyRequest {
                name: format!("seed-{i}"),
                ..Default::default()
            },
        )
        .await;
        ids.push(key.id);
    }
    keys.disable_key(req(
        &tenant,
        proto::DisableKeyRequest { id: ids[3].clone() },
    ))
    .await
    .unwrap();
    let ciphertext = keys
        .wrap_key(req(
            &tenant,
            proto::WrapKeyRequest {
                id: ids[0].clone(),
                plaintext: Some(b"fuzz plaintext".to_vec()),
                aad: vec!["a".into()],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .ciphertext;
    let seeds = Seeds { ids, ciphertext };
    let before = snapshot(&server, &tenant, &seeds.ids).await;

    let targets = Arc::new(targets(&seeds));
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = tokio::task::JoinSet::new();
    for lane in 0..IN_FLIGHT {
        let (targets, sent, tenant) = (Arc::clone(&targets), Arc::clone(&sent), tenant.clone());
        let token = server.admin_token.clone();
        let mut channel = server.channel().await;
        let mut rng = Rng(seed ^ (lane as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        senders.spawn(async move {
            // Per RPC: answers by code, and the bodies of the calls that succeeded.
            let mut codes: HashMap<(&'static str, i32), usize> = HashMap::new();
            let mut accepted: Vec<(&'static str, Vec<u8>)> = Vec::new();
            let mut refused_by_http2 = 0usize;
            while sent.fetch_add(1, Ordering::Relaxed) < requests {
                let (path, seeds) = &targets[rng.pick(targets.len())];
                let body = mutate(&mut rng, seeds);
                if starts_rsa_generation(path, &body) {
                    continue;
                }
                let (framed, first_message) = frame(&mut rng, &body);
                match send(&mut channel, path, &tenant, &token, framed).await {
                    Some(code) => {
                        *codes.entry((path, code as i32)).or_default() += 1;
                        if code == Code::Ok {
                            let Some(message) = first_message else {
                                panic!("{path}: a call without a whole message was served");
                            };
                            accepted.push((path, message));
                        }
                    }
                    None => refused_by_http2 += 1,
                }
            }
            (codes, accepted, refused_by_http2)
        });
    }
    let mut codes: HashMap<(&'static str, i32), usize> = HashMap::new();
    let mut accepted = Vec::new();
    let mut refused_by_http2 = 0;
    while let Some(lane) = senders.join_next().await {
        let (lane_codes, lane_accepted, lane_refused) = lane.unwrap();
        for (k, n) in lane_codes {
            *codes.entry(k).or_default() += n;
        }
        accepted.extend(lane_accepted);
        refused_by_http2 += lane_refused;
    }
    let elapsed = started.elapsed();
    let answered: usize = codes.values().sum();
    eprintln!(
        "{answered} answered, {refused_by_http2} refused by HTTP/2, {} accepted, in {elapsed:?}",
        accepted.len()
    );
    let mut by_path: Vec<_> = codes.iter().collect();
    by_path.sort();
    for ((path, code), n) in by_path {
        eprintln!("  {path} {:?}: {n}", Code::from_i32(*code));
    }
    let faults: Vec<_> = codes
        .iter()
        .filter(|((_, code), _)| [Code::Internal as i32, Code::Unknown as i32].contains(code))
        .collect();
    assert!(
        faults.is_empty(),
        "INTERNAL or UNKNOWN answers to bad input: {faults:?}"
    );
    assert!(
        answered >= requests * 99 / 100,
        "nearly every request got a gRPC answer: {answered} of {requests}"
    );

    // Alive, SERVING, no panic in its log.
    assert_eq!(server.health().await, Some(ServingStatus::Serving));
    assert!(!server.settled_log().await.contains("panicked"));

    // Nothing changed that a refused call touched: every difference is explained by
    // the calls that succeeded.
    let after = snapshot(&server, &tenant, &seeds.ids).await;
    fn accepted_for<'a>(
        accepted: &'a [(&'static str, Vec<u8>)],
        path: &'static str,
    ) -> impl Iterator<Item = &'a (&'static str, Vec<u8>)> {
        accepted.iter().filter(move |(p, _)| *p == path)
    }
    let ok = |path: &'static str| accepted_for(&accepted, path);
    let created = ok("/kms.v1.KeyService/CreateKey").count() as u64;
    assert_eq!(
        after.count,
        before.count + created,
        "keys: only accepted creates"
    );
    for (i, id) in seeds.ids.iter().enumerate() {
        let about = |path: &'static str| {
            ok(path)
                .filter(|(_, body)| {
                    // The id is field 1 of every request that names one key.
                    proto::GetKeyRequest::decode(body.as_slice())
                        .is_ok_and(|decoded| decoded.id == *id)
                })
                .count() as u64
        };
        let rotations = about("/kms.v1.KeyService/RotateKey");
        assert_eq!(
            after.versions[i],
            before.versions[i] + rotations,
            "key {i}: versions change only by accepted rotations"
        );
        let state_changes = about("/kms.v1.KeyService/DisableKey")
            + about("/kms.v1.KeyService/EnableKey")
            + about("/kms.v1.KeyService/DeleteKey")
            + about("/kms.v1.KeyService/DeleteImportedKeyMaterial");
        if state_changes == 0 {
            assert_eq!(
                after.states[i], before.states[i],
                "key {i}: state untouched"
            );
        }
    }
    if ok("/kms.v1.ImportTokenService/CreateImportToken").count() == 0 {
        let retrievals = ok("/kms.v1.ImportTokenService/GetImportToken").count();
        assert_eq!(
            retrievals, 0,
            "no import token exists, so no retrieval can succeed"
        );
    }
    let (verified, report) = {
        assert!(server.stop().await.success());
        common::audit_verify(data.path())
    };
    assert!(verified, "{report}");
}

struct Snapshot {
    count: u64,
    versions: Vec<u64>,
    states: Vec<i32>,
}

async fn snapshot(server: &TestServer, tenant: &str, ids: &[String]) -> Snapshot {
    let mut keys = server.keys().await;
    let count = keys
        .count_keys(req(tenant, proto::CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    let mut versions = Vec::new();
    let mut states = Vec::new();
    for id in ids {
        versions.push(
            keys.list_key_versions(req(
                tenant,
                proto::ListKeyVersionsRequest {
                    id: id.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .total_count,
        );
        states.push(
            keys.get_key(req(tenant, proto::GetKeyRequest { id: id.clone() }))
                .await
                .unwrap()
                .into_inner()
                .key
                .unwrap()
                .state,
        );
    }
    Snapshot {
        count,
        versions,
        states,
    }
}
