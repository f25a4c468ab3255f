//! Connection limits against hostile clients: idle sockets (nothing, only the HTTP/2
//! preface, half a frame) are closed; the stream limit is announced in SETTINGS; large
//! request messages are refused; and at a low open-file limit the server caps its
//! connections below it, logs that once, keeps serving and keeps its token usable.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{ServerSetup, TestServer, TestToken, instance, req};
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::{CountKeysRequest, CreateKeyRequest, UnwrapKeyRequest, WrapKeyRequest};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// True once the server has closed the socket (EOF or reset), reading and discarding
/// whatever it sends meanwhile; false if still open after `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_open_connections_are_closed() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_env(&token, data.path(), &[("KMS_IDLE_TIMEOUT_SECS", "2")]).await;
    let addr = server.addr.clone();
    let closed = tokio::task::spawn_blocking(move || {
        let mut silent = TcpStream::connect(&addr).unwrap();
        let mut preface_only = TcpStream::connect(&addr).unwrap();
        preface_only.write_all(PREFACE).unwrap();
        let mut half_frame = TcpStream::connect(&addr).unwrap();
        half_frame.write_all(PREFACE).unwrap();
        half_frame.write_all(&EMPTY_SETTINGS).unwrap();
        // The first 5 of a HEADERS frame's 9 header bytes, then nothing.
        half_frame.write_all(&[0, 0, 64, 1, 4]).unwrap();
        // Well past the 2 s timeout, far below "never" (they stayed open for 150 s
        // before the limit existed).
        let within = Duration::from_secs(30);
        [
            closed_within(&mut silent, within),
            closed_within(&mut preface_only, within),
            closed_within(&mut half_frame, within),
        ]
    })
    .await
    .unwrap();
    assert_eq!(closed, [true, true, true]);
    // The server serves on.
    let mut keys = server.keys().await;
    keys.count_keys(req(&instance(), CountKeysRequest::default()))
        .await
        .unwrap();
}

/// Reads frames until the server's first SETTINGS frame; returns its (id, value) pairs.
fn server_settings(stream: &mut TcpStream) -> Vec<(u16, u32)> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).unwrap();
        let (kind, flags) = (header[3], header[4]);
        if kind == 4 && flags & 1 == 0 {
            return payload
                .chunks(6)
                .map(|c| {
                    (
                        u16::from_be_bytes([c[0], c[1]]),
                        u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                    )
                })
                .collect();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_and_request_size_are_capped() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_with_env(&token, data.path(), &[("KMS_MAX_CONCURRENT_STREAMS", "7")])
            .await;
    let addr = server.addr.clone();
    let settings = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream.write_all(PREFACE).unwrap();
        stream.write_all(&EMPTY_SETTINGS).unwrap();
        server_settings(&mut stream)
    })
    .await
    .unwrap();
    // SETTINGS_MAX_CONCURRENT_STREAMS (3) and SETTINGS_INITIAL_WINDOW_SIZE (4).
    assert!(settings.contains(&(3, 7)), "{settings:?}");
    assert!(settings.contains(&(4, 64 * 1024)), "{settings:?}");

    let tenant = instance();
    let mut keys = server.keys().await;
    let key = common::create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "limits".into(),
            ..Default::default()
        },
    )
    .await
    .id;
    // The largest valid request (4,096-byte plaintext, 126 aad entries of 255 bytes,
    // about 37 KiB) fits under the 64 KiB default.
    let aad: Vec<String> = (0..126).map(|i| format!("{i:0>255}")).collect();
    let wrapped = keys
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: key.clone(),
                plaintext: Some(vec![7; 4096]),
                aad: aad.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    keys.unwrap_key(req(
        &tenant,
        UnwrapKeyRequest {
            id: key.clone(),
            ciphertext: wrapped.ciphertext,
            aad,
        },
    ))
    .await
    .unwrap();
    // A message over the cap is refused before it is decoded: here two million
    // empty aad entries (a 4 MiB message that once cost ~110 MB before refusal).
    let status = keys
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: key,
                plaintext: None,
                aad: vec![String::new(); 2_000_000],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("65536"), "{}", status.message());
    // Refused by gRPC before any handler ran, and still on the audit trail.
    let refused = common::audit_events(
        &server,
        &tenant,
        kms::proto::ListAuditEventsRequest {
            operation: "WrapKey".into(),
            code: Some(status.code() as i32),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].principal, "admin");
    assert!(refused[0].peer.starts_with("127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_low_open_file_limit_connections_are_capped_and_the_token_stays_usable() {
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let mut setup = ServerSetup::new(Some(&token), data.path());
    setup.fd_limit = Some(400);
    setup.extra_env = vec![("KMS_IDLE_TIMEOUT_SECS".into(), "300".into())];
    let server = TestServer::try_start(setup).await.unwrap();
    assert!(
        server
            .log()
            .contains("connection limit lowered to fit the open-file limit")
    );
    let tenant = instance();
    let mut keys = server.keys().await;
    let key = common::create_key(
        &mut keys,
        &tenant,
        CreateKeyRequest {
            name: "fd".into(),
            ..Default::default()
        },
    )
    .await
    .id;

    // Far more idle connections than the limit allows open files.
    let addr = server.addr.clone();
    let idle = tokio::task::spawn_blocking(move || {
        (0..600)
            .map(|_| TcpStream::connect(&addr).unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(server.log_eventually("connection limit reached").await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Logged once, not once per refused connection; no accept loop spinning on EMFILE.
    let log = server.log();
    assert_eq!(log.matches("connection limit reached").count(), 1);
    assert!(!log.contains("Too many open files"), "EMFILE reached");
    // The connection made before the flood still works, and so does the HSM.
    let wrapped = keys
        .wrap_key(req(
            &tenant,
            WrapKeyRequest {
                id: key.clone(),
                plaintext: Some(b"still here".to_vec()),
                aad: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    drop(idle);
    // Once the flood is gone, new connections are served again.
    let mut fresh = None;
    for _ in 0..100 {
        if let Ok(channel) = server.endpoint().connect().await {
            fresh = Some(channel);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut keys = KeyServiceClient::new(server.channel_with(&server.admin_token).await);
    drop(fresh);
    let opened = keys
        .unwrap_key(req(
            &tenant,
            UnwrapKeyRequest {
                id: key,
                ciphertext: wrapped.ciphertext,
                aad: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(opened.plaintext, b"still here");
}
