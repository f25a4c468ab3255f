//! Property tests over the decoders and validators that see bytes from outside: the
//! ciphertext format, the aad encoding, audit blocks, bearer tokens, the tokens file,
//! the configuration file, and stored key records. None may panic on any input; what
//! decodes must round-trip; a corrupt stored record is a clean `Corrupt` error naming
//! the key.

use std::path::Path;

use kms::audit::{AuditRecord, GENESIS_HASH, decode_block, encode_block};
use kms::auth::{BearerToken, parse_tokens_file};
use kms::config::{Config, Env};
use kms::domain::ciphertext::{additional_data, decode, encode};
use kms::store::{KeyStore, RedbStore, SledStore, StoreError};
use proptest::collection::vec;
use proptest::prelude::*;
use uuid::Uuid;

struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fn record_strategy() -> impl Strategy<Value = AuditRecord> {
    (
        any::<i64>(),
        ".{0,20}",
        ".{0,20}",
        ".{0,20}",
        ".{0,36}",
        any::<i32>(),
        ".{0,36}",
        ".{0,21}",
    )
        .prop_map(
            |(time_ms, principal, instance, operation, key_id, code, correlation_id, peer)| {
                AuditRecord {
                    seq: 0,
                    time_ms,
                    principal,
                    instance,
                    operation,
                    key_id,
                    code,
                    correlation_id,
                    peer,
                    prev_hash: GENESIS_HASH,
                    hash: [0; 32],
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn ciphertexts_decode_or_refuse_and_what_decodes_round_trips(
        bytes in vec(any::<u8>(), 0..4200),
        header in any::<[u8; 29]>(),
    ) {
        if let Some((version, sealed)) = decode(&bytes) {
            prop_assert_eq!(encode(version, &sealed), bytes.clone());
        }
        // A well-formed header with a random body decodes exactly when long enough.
        let mut framed = vec![1u8];
        framed.extend_from_slice(&header[..28]);
        framed.extend_from_slice(&bytes[..bytes.len().min(4000)]);
        if let Some((version, sealed)) = decode(&framed) {
            prop_assert_eq!(encode(version, &sealed), framed);
        }
    }

    #[test]
    fn aad_lists_encode_injectively(
        a in vec(".{0,6}", 0..5),
        b in vec(".{0,6}", 0..5),
    ) {
        let (key, version) = (Uuid::nil(), Uuid::max());
        if a != b {
            prop_assert_ne!(
                additional_data(key, version, &a),
                additional_data(key, version, &b)
            );
        }
    }

    #[test]
    fn audit_blocks_decode_or_refuse_and_blocks_round_trip(
        bytes in vec(any::<u8>(), 0..2000),
        records in vec(record_strategy(), 1..8),
    ) {
        let _ = decode_block(&bytes);
        let mut chained = Vec::new();
        let mut prev = GENESIS_HASH;
        for (i, record) in records.into_iter().enumerate() {
            let mut record = AuditRecord { seq: i as u64 + 1, prev_hash: prev, ..record };
            record.hash = record.compute_hash();
            prev = record.hash;
            chained.push(record);
        }
        let decoded = decode_block(&encode_block(&chained)).unwrap();
        prop_assert!(decoded.iter().all(|(_, hash_ok)| *hash_ok));
        let back: Vec<AuditRecord> = decoded.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(back, chained);
    }

    #[test]
    fn bearer_tokens_and_tokens_files_never_panic(
        text in ".{0,300}",
        header in "(Bearer )?[ -~]{0,80}",
    ) {
        let _ = BearerToken::parse(&text);
        let _ = BearerToken::from_header(&header);
        let _ = parse_tokens_file(Path::new("tokens.toml"), &text);
        let with_table = format!("[[principal]]\n{text}");
        let _ = parse_tokens_file(Path::new("tokens.toml"), &with_table);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn configuration_files_load_or_refuse(text in "[ -~\n]{0,300}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.toml");
        std::fs::write(&path, &text).unwrap();
        let _ = Config::load(Some(&path), &NoEnv);
        std::fs::write(&path, format!("[store]\n{text}")).unwrap();
        let _ = Config::load(Some(&path), &NoEnv);
    }
}

/// Random bytes where a key record belongs: reading it is `Corrupt` naming the key.
#[test]
fn corrupt_stored_key_records_are_clean_errors_naming_the_key() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    drop(SledStore::open(&path).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runner
        .run(&vec(any::<u8>(), 0..200), |garbage| {
            let id = Uuid::new_v4();
            {
                let db = retry_while_locked(|| {
                    SledStore::open_database(&path).map_err(|e| e.to_string())
                });
                let mut key = b"inst\0".to_vec();
                key.extend_from_slice(id.as_bytes());
                db.open_tree("keys").unwrap().insert(key, garbage).unwrap();
                db.flush().unwrap();
            }
            let store = open_when_released(&path);
            corrupt_naming_the_key(runtime.block_on(store.get_key("inst", id)), id)
        })
        .unwrap();
}

/// A read of a garbled record: `Corrupt`, naming the key.
fn corrupt_naming_the_key(
    read: Result<Option<kms::domain::model::KeyRecord>, StoreError>,
    id: Uuid,
) -> Result<(), proptest::test_runner::TestCaseError> {
    match read {
        Err(StoreError::Corrupt { what, .. }) => prop_assert_eq!(what, format!("key {id}")),
        other => prop_assert!(false, "{other:?}"),
    }
    Ok(())
}

/// sled lets go of its directory's lock a moment after the last handle is dropped (its
/// own I/O threads finish first): retry while another handle of this test holds it.
fn retry_while_locked<T>(mut open: impl FnMut() -> Result<T, String>) -> T {
    for _ in 0..100 {
        match open() {
            Ok(opened) => return opened,
            Err(e) if e.contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the database stayed locked");
}

fn open_when_released(path: &Path) -> SledStore {
    retry_while_locked(|| SledStore::open(path).map_err(|e| e.to_string()))
}

/// The same for redb, where a key's record sits in `order` under its creation time and
/// `keys` holds that time: garbage in either place is `Corrupt` naming the key.
#[test]
fn corrupt_redb_key_records_are_clean_errors_naming_the_key() {
    const KEYS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("keys");
    const ORDER: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("order");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kms.redb");
    drop(RedbStore::open(&path, 1 << 20).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runner
        .run(
            &(vec(any::<u8>(), 0..200), any::<bool>()),
            |(garbage, in_index)| {
                let id = Uuid::new_v4();
                {
                    let db = redb::Database::open(&path).unwrap();
                    let txn = db.begin_write().unwrap();
                    {
                        let mut key = b"inst\0".to_vec();
                        key.extend_from_slice(id.as_bytes());
                        let created = 5u64.to_be_bytes();
                        let mut keys = txn.open_table(KEYS).unwrap();
                        if in_index {
                            keys.insert(key.as_slice(), garbage.as_slice()).unwrap();
                        } else {
                            keys.insert(key.as_slice(), created.as_slice()).unwrap();
                            let mut at = b"inst\0".to_vec();
                            at.extend_from_slice(&created);
                            at.extend_from_slice(id.as_bytes());
                            txn.open_table(ORDER)
                                .unwrap()
                                .insert(at.as_slice(), garbage.as_slice())
                                .unwrap();
                        }
                    }
                    txn.commit().unwrap();
                }
                let store = RedbStore::open(&path, 1 << 20).unwrap();
                corrupt_naming_the_key(runtime.block_on(store.get_key("inst", id)), id)
            },
        )
        .unwrap();
}
