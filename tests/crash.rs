//! Crash at any moment: a mixed concurrent load (create, import, rotate, disable and
//! enable, delete, import-token retrieval, wrap and unwrap) and a SIGKILL at a random
//! moment, twenty rounds on one token and one store (the suite's backend: sled, or
//! PostgreSQL with KMS_TEST_STORE=postgres). After every kill, with the server down, the
//! audit chain verifies and the store is whole (counters equal the records, every
//! version of a usable key has its blob); after every restart the service is SERVING
//! within a bound and every acknowledged change is there. At the end the token holds
//! nothing but the master KEK.
//!
//! One test in this binary: at the end it sets the token's configuration variable for
//! its own process to open the token from outside.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Rng, TestServer, TestToken, instance, req};
use kms::domain::model::{KeyFilter, KeyState as StoredState};
use kms::proto::key_service_client::KeyServiceClient;
use kms::proto::{
    CountKeysRequest, CreateImportTokenRequest, CreateKeyRequest, DeleteKeyRequest,
    DisableKeyRequest, EnableKeyRequest, GetImportTokenRequest, GetKeyRequest, KeyState,
    ListKeyVersionsRequest, RotateKeyRequest, UnwrapKeyRequest, WrapKeyRequest,
};
use kms::store::PageStart;

const ROUNDS: usize = 20;
const WORKERS: usize = 6;
const RETRIEVALS: u32 = 500;
/// A restarted server must be SERVING within this.
const SERVING_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Rotate,
    Disable,
    Enable,
    Delete,
}

/// What the clients were told about one key.
#[derive(Clone, Debug)]
struct KnownKey {
    state: KeyState,
    versions: u64,
    /// A change sent but not answered when the server died: it may or may not hold.
    pending: Option<Change>,
    /// Acknowledged wraps: (plaintext, ciphertext).
    wrapped: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Default)]
struct Model {
    keys: HashMap<String, KnownKey>,
    /// CreateKey calls sent but not answered.
    pending_creates: usize,
    /// Keys made by creates that were never answered but did happen.
    unanswered_but_made: u64,
    retrievals_acknowledged: u32,
    retrievals_pending: u32,
}

type Shared = Arc<Mutex<Model>>;

/// One client: runs operations on its own keys until a call fails (the server died).
async fn client(
    mut keys: KeyServiceClient<kms::cli::connect::AuthedChannel>,
    mut tokens: kms::proto::import_token_service_client::ImportTokenServiceClient<
        kms::cli::connect::AuthedChannel,
    >,
    tenant: String,
    model: Shared,
    mut rng: Rng,
    mine: Arc<Mutex<Vec<String>>>,
) {
    loop {
        let owned: Vec<String> = mine.lock().unwrap().clone();
        let pick = |rng: &mut Rng| owned[rng.below(owned.len() as u64) as usize].clone();
        let choice = if owned.is_empty() { 0 } else { rng.below(10) };
        match choice {
            0 | 1 => {
                model.lock().unwrap().pending_creates += 1;
                let import = rng.below(2) == 0;
                let created = keys
                    .create_key(req(
                        &tenant,
                        CreateKeyRequest {
                            name: format!("crash-{}", rng.next()),
                            payload: import.then(|| rng.next().to_le_bytes().repeat(4)),
                            ..Default::default()
                        },
                    ))
                    .await;
                let Ok(created) = created else { return };
                let id = created.into_inner().key.unwrap().id;
                let mut model = model.lock().unwrap();
                model.pending_creates -= 1;
                model.keys.insert(
                    id.clone(),
                    KnownKey {
                        state: KeyState::Active,
                        versions: 1,
                        pending: None,
                        wrapped: vec![],
                    },
                );
                mine.lock().unwrap().push(id);
            }
            2..=5 => {
                let id = pick(&mut rng);
                if state_of(&model, &id) != KeyState::Active {
                    continue;
                }
                let plaintext = rng.next().to_le_bytes().to_vec();
                let wrapped = keys
                    .wrap_key(req(
                        &tenant,
                        WrapKeyRequest {
                            id: id.clone(),
                            plaintext: Some(plaintext.clone()),
                            aad: vec![],
                        },
                    ))
                    .await;
                let Ok(wrapped) = wrapped else { return };
                let ciphertext = wrapped.into_inner().ciphertext;
                // The unwrap of what was just wrapped, as a client would.
                let unwrapped = keys
                    .unwrap_key(req(
                        &tenant,
                        UnwrapKeyRequest {
                            id: id.clone(),
                            ciphertext: ciphertext.clone(),
                            aad: vec![],
                        },
                    ))
                    .await;
                let mut model = model.lock().unwrap();
                let known = model.keys.get_mut(&id).unwrap();
                if known.wrapped.len() < 4 {
                    known.wrapped.push((plaintext.clone(), ciphertext));
                } else {
                    known.wrapped[3] = (plaintext.clone(), ciphertext);
                }
                let Ok(unwrapped) = unwrapped else { return };
                assert_eq!(unwrapped.into_inner().plaintext, plaintext);
            }
            6 => {
                {
                    let mut model = model.lock().unwrap();
                    // The token allows RETRIEVALS in all; keep some for the checks.
                    if model.retrievals_acknowledged + model.retrievals_pending >= RETRIEVALS - 50 {
                        continue;
                    }
                    model.retrievals_pending += 1;
                }
                let got = tokens
                    .get_import_token(req(&tenant, GetImportTokenRequest {}))
                    .await;
                let Ok(_) = got else { return };
                let mut model = model.lock().unwrap();
                model.retrievals_pending -= 1;
                model.retrievals_acknowledged += 1;
            }
            _ => {
                let id = pick(&mut rng);
                let state = state_of(&model, &id);
                let change = match (state, rng.below(4)) {
                    (KeyState::Destroyed, _) => continue,
                    (KeyState::Active, 0) => Change::Rotate,
                    (KeyState::Active, 1 | 2) => Change::Disable,
                    (KeyState::Suspended, 0..=2) => Change::Enable,
                    _ => Change::Delete,
                };
                model.lock().unwrap().keys.get_mut(&id).unwrap().pending = Some(change);
                let answer = match change {
                    Change::Rotate => keys
                        .rotate_key(req(
                            &tenant,
                            RotateKeyRequest {
                                id: id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ()),
                    Change::Disable => keys
                        .disable_key(req(&tenant, DisableKeyRequest { id: id.clone() }))
                        .await
                        .map(|_| ()),
                    Change::Enable => keys
                        .enable_key(req(&tenant, EnableKeyRequest { id: id.clone() }))
                        .await
                        .map(|_| ()),
                    Change::Delete => keys
                        .delete_key(req(&tenant, DeleteKeyRequest { id: id.clone() }))
                        .await
                        .map(|_| ()),
                };
                if answer.is_err() {
                    return;
                }
                let mut model = model.lock().unwrap();
                let known = model.keys.get_mut(&id).unwrap();
                known.pending = None;
                apply(known, change);
            }
        }
    }
}

fn state_of(model: &Shared, id: &str) -> KeyState {
    model.lock().unwrap().keys[id].state
}

fn apply(known: &mut KnownKey, change: Change) {
    match change {
        Change::Rotate => known.versions += 1,
        Change::Disable => known.state = KeyState::Suspended,
        Change::Enable => known.state = KeyState::Active,
        Change::Delete => known.state = KeyState::Destroyed,
    }
}

/// With the server down: the chain verifies, and the store is whole.
async fn check_store(data_dir: &std::path::Path, tenant: &str) {
    let (verified, report) = common::audit_verify(data_dir);
    assert!(verified, "the audit chain verifies after a kill: {report}");
    let store = common::open_store(data_dir).await;
    let (records, total) = store
        .list_keys(tenant, &KeyFilter::default(), PageStart::Offset(0), 100_000)
        .await
        .unwrap();
    assert_eq!(records.len() as u64, total);
    for state in [
        StoredState::Active,
        StoredState::Suspended,
        StoredState::Destroyed,
    ] {
        let filter = KeyFilter {
            states: vec![state],
            extractable: None,
        };
        let counted = store.count_keys(tenant, &filter).await.unwrap();
        let real = records.iter().filter(|r| r.state == state).count() as u64;
        assert_eq!(counted, real, "the {state:?} counter equals the records");
    }
    for record in &records {
        if record.state == StoredState::Destroyed {
            continue;
        }
        let versions = store.list_versions(record).await.unwrap();
        assert!(!versions.is_empty(), "key {} has a version", record.id);
        assert!(
            versions.iter().all(|v| v.wrapped.is_some()),
            "every version of usable key {} has its blob",
            record.id
        );
        assert_eq!(
            record.current_version,
            Some(versions[0].id),
            "the current version is the newest"
        );
    }
}

/// One key after a restart: its acknowledged state and versions hold (or the pending
/// change's outcome), and its acknowledged ciphertexts unwrap. Returns it settled.
async fn check_key(
    mut keys: KeyServiceClient<kms::cli::connect::AuthedChannel>,
    tenant: &str,
    id: &str,
    mut expected: KnownKey,
) -> KnownKey {
    let id = id.to_owned();
    let key = keys
        .get_key(req(tenant, GetKeyRequest { id: id.clone() }))
        .await
        .unwrap_or_else(|e| panic!("acknowledged key {id} lost: {e:?}"))
        .into_inner()
        .key
        .unwrap();
    let versions = keys
        .list_key_versions(req(
            tenant,
            ListKeyVersionsRequest {
                id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .total_count;
    let found = (KeyState::try_from(key.state).unwrap(), versions);
    let before = (expected.state, expected.versions);
    let mut after = expected.clone();
    if let Some(change) = expected.pending {
        apply(&mut after, change);
    }
    assert!(
        found == before || found == (after.state, after.versions),
        "key {id}: found {found:?}, acknowledged {before:?}, pending {:?}",
        expected.pending
    );
    expected.state = found.0;
    expected.versions = found.1;
    expected.pending = None;
    if expected.state == KeyState::Active {
        for (plaintext, ciphertext) in &expected.wrapped {
            let unwrapped = keys
                .unwrap_key(req(
                    tenant,
                    UnwrapKeyRequest {
                        id: id.clone(),
                        ciphertext: ciphertext.clone(),
                        aad: vec![],
                    },
                ))
                .await
                .unwrap_or_else(|e| panic!("acknowledged ciphertext of {id}: {e:?}"))
                .into_inner()
                .plaintext;
            assert_eq!(&unwrapped, plaintext);
        }
    }
    expected
}

/// After a restart: every acknowledged change holds; pending ones are settled to
/// whatever the store says, if that is one of the two outcomes.
async fn check_service(server: &TestServer, tenant: &str, model: &Shared) {
    let known: Vec<(String, KnownKey)> = model
        .lock()
        .unwrap()
        .keys
        .iter()
        .map(|(id, k)| (id.clone(), k.clone()))
        .collect();
    let mut checks = tokio::task::JoinSet::new();
    for chunk in known.chunks(known.len().div_ceil(8).max(1)) {
        let keys = server.keys().await;
        let (chunk, tenant) = (chunk.to_vec(), tenant.to_owned());
        checks.spawn(async move {
            let mut settled = Vec::new();
            for (id, expected) in chunk {
                settled.push((
                    id.clone(),
                    check_key(keys.clone(), &tenant, &id, expected).await,
                ));
            }
            settled
        });
    }
    while let Some(settled) = checks.join_next().await {
        let mut model = model.lock().unwrap();
        for (id, known) in settled.expect("a key check held") {
            model.keys.insert(id, known);
        }
    }
    let mut keys = server.keys().await;
    // Unacknowledged creates may or may not have happened; nothing else appeared.
    let count = keys
        .count_keys(req(tenant, CountKeysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .count;
    let remaining = server
        .import_tokens()
        .await
        .get_import_token(req(tenant, GetImportTokenRequest {}))
        .await
        .unwrap()
        .into_inner()
        .remaining_retrievals
        + 1;
    let mut model = model.lock().unwrap();
    let known = model.keys.len() as u64 + model.unanswered_but_made;
    assert!(
        count >= known && count <= known + model.pending_creates as u64,
        "{count} keys stored, {known} known, {} creates unanswered",
        model.pending_creates
    );
    model.unanswered_but_made += count - known;
    model.pending_creates = 0;
    let spent = RETRIEVALS - remaining;
    assert!(
        spent >= model.retrievals_acknowledged
            && spent <= model.retrievals_acknowledged + model.retrievals_pending,
        "{spent} retrievals spent, {} acknowledged, {} unanswered",
        model.retrievals_acknowledged,
        model.retrievals_pending
    );
    // This check's own retrieval counts too.
    model.retrievals_acknowledged = spent + 1;
    model.retrievals_pending = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_change_survives_sigkill_at_any_moment() {
    let seed = Rng::seed_from("KMS_CRASH_SEED");
    eprintln!("KMS_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let token = TestToken::create();
    let data = tempfile::tempdir().unwrap();
    let tenant = instance();
    let model: Shared = Arc::default();
    let owned: Vec<Arc<Mutex<Vec<String>>>> = (0..WORKERS).map(|_| Arc::default()).collect();

    let server = TestServer::start(&token, data.path()).await;
    server
        .import_tokens()
        .await
        .create_import_token(req(
            &tenant,
            CreateImportTokenRequest {
                expiration: Some(86_400),
                max_allowed_retrievals: Some(RETRIEVALS),
            },
        ))
        .await
        .unwrap();
    let mut server = Some(server);
    for round in 0..ROUNDS {
        let running = server.take().unwrap();
        let mut clients = Vec::new();
        for mine in &owned {
            clients.push(tokio::spawn(client(
                running.keys().await,
                running.import_tokens().await,
                tenant.clone(),
                Arc::clone(&model),
                Rng(rng.next() | 1),
                Arc::clone(mine),
            )));
        }
        tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        running.kill().await;
        for client in clients {
            client.await.expect("a client's assertion held");
        }
        check_store(data.path(), &tenant).await;
        let started = Instant::now();
        let restarted = TestServer::start(&token, data.path()).await;
        assert!(
            started.elapsed() < SERVING_WITHIN,
            "round {round}: SERVING after {:?}",
            started.elapsed()
        );
        check_service(&restarted, &tenant, &model).await;
        eprintln!(
            "round {round}: checked, {:?} since the restart",
            started.elapsed()
        );
        server = Some(restarted);
    }
    let acknowledged = model.lock().unwrap().keys.len();
    assert!(
        acknowledged > ROUNDS,
        "the load did real work: {acknowledged} keys"
    );
    assert!(server.take().unwrap().stop().await.success());

    // Root keys live in the HSM only as session objects: after all the kills the token
    // holds the master KEK and nothing else.
    // Every server and client is gone: nothing else reads the environment now.
    let (_ctx, session) = common::open_token_from_outside(&token);
    let objects = common::stored_objects(&session).len();
    assert_eq!(objects, 1, "only the master KEK is on the token");
}
