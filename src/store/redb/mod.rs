//! The redb backend: an embedded store in one file, one process at a time (redb locks
//! it). Its tables are sled's trees ([`crate::store::sled`] documents them) with the
//! same keys and record forms ([`crate::store::kv`]), but for three:
//! - `keys`:  instance 0x00 key-uuid                    -> created-ms (BE u64)
//! - `order`: instance 0x00 created-ms(BE u64) key-uuid -> revision (BE u64) || KeyRecord
//!   [|| its first version]
//! - `key_versions`: key-created-ms(BE u64) key-uuid created-ms(BE u64) version-uuid
//!   -> VersionRecord (the versions after the first)
//!
//! (records and versions in creation order: [`keys`] says why), and audit blocks are
//! zstd frames ([`audit`]).
//!
//! Schema history: 3 is the first redb layout; 4 moved versions from `versions` (keyed
//! by key id, as sled keeps them) to `key_versions`; 8 writes a key's first version
//! into its record (as sled does; records written before are read as they are). A
//! schema-3 file is upgraded when it opens, before anything is served.
//!
//! Why a second embedded backend (decision, measured with a million keys: README, "At
//! size"): sled's memory is not bounded by its cache setting and it grows with what is
//! read; redb reads through a page cache of a set size (`store.cache_mib`) and its
//! commits are durable when they return. It is a copy-on-write B-tree: readers see a
//! snapshot and never wait for the writer, so a backup is one read transaction.
//!
//! Where the work runs: point reads inline on the caller's task (a read transaction and
//! a lookup in the page cache or one `pread`); scans on a blocking thread; every write
//! on the single writer thread ([`writer`]), batched into shared transactions, with
//! group commit for durability.
//!
//! A failed commit (a full disk) leaves redb refusing writes until the file is opened
//! again: [`Store::ping`] (the health probe) then closes and reopens it, as for sled.
//! What was durable before the fault is there after it.

mod audit;
mod imports;
mod keys;
mod snapshot;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};

use super::kv::DecodedKeys;
use super::{Durability, STORE_SCHEMA, Store, StoreError, StoreSizes, TreePages, TreeSize};
use writer::Writer;

const BACKEND: &str = "redb";

type Bytes = &'static [u8];
type Table = TableDefinition<'static, Bytes, Bytes>;

const KEYS: Table = TableDefinition::new("keys");
const ORDER: Table = TableDefinition::new("order");
const COUNTERS: Table = TableDefinition::new("counters");
const VERSIONS: Table = TableDefinition::new("key_versions");
/// Where schema 3 kept versions; read once, by the upgrade, then deleted.
const SCHEMA_3_VERSIONS: Table = TableDefinition::new("versions");
const EXPIRY: Table = TableDefinition::new("expiry");
const IMPORT_TOKENS: Table = TableDefinition::new("import_tokens");
const IMPORT_PARAMETERS: Table = TableDefinition::new("import_parameters");
const RSA_POOL: Table = TableDefinition::new("rsa_pool");
const AUDIT: Table = TableDefinition::new("audit");
const AUDIT_META: Table = TableDefinition::new("audit_meta");
const META: Table = TableDefinition::new("meta");
const TABLES: [Table; 11] = [
    KEYS,
    ORDER,
    COUNTERS,
    VERSIONS,
    EXPIRY,
    IMPORT_TOKENS,
    IMPORT_PARAMETERS,
    RSA_POOL,
    AUDIT,
    AUDIT_META,
    META,
];
const SCHEMA_KEY: &[u8] = b"schema_version";

/// redb's own errors: a corrupt file is corrupt; anything else may pass.
fn redb_error(error: impl Into<redb::Error>) -> StoreError {
    match error.into() {
        redb::Error::Corrupted(reason) => StoreError::corrupt("redb database", reason),
        other => StoreError::unavailable(BACKEND, other),
    }
}

macro_rules! from_redb {
    ($($error:ty),*) => {
        $(impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                redb_error(error)
            }
        })*
    };
}
from_redb!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError,
    redb::CompactionError
);

/// Compacts a stopped database file in place with redb's own compaction (crash-safe:
/// redb commits the moved pages as transactions): `kms store compact`. redb gives back
/// free pages at the end of the file as it commits, so this gains less than sled's.
/// Returns the file's size before and after.
pub fn compact_file(path: &Path) -> Result<(u64, u64), StoreError> {
    let size = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| StoreError::unavailable(BACKEND, e))
    };
    let before = size(path)?;
    let mut db = Database::open(path)?;
    while db.compact()? {}
    drop(db);
    Ok((before, size(path)?))
}

pub struct RedbStore {
    /// The open database, or none while it is being reopened.
    current: RwLock<Option<Arc<Open>>>,
    path: PathBuf,
    cache_bytes: u64,
    /// Appenders to the audit chain take turns (see [`audit`]).
    audit_append: tokio::sync::Mutex<()>,
}

/// An open database and what lives as long as it does.
struct Open {
    /// Declared first: dropped (its thread joined) before the database it holds.
    writer: Writer,
    db: Arc<Database>,
    decoded_keys: DecodedKeys,
}

impl RedbStore {
    /// Opens (creating if absent) the database file, refusing a newer schema. `cache_bytes`
    /// is redb's page cache: what it keeps of the file in memory.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Ok(Self {
            current: RwLock::new(Some(Arc::new(Self::open_file(path, cache_bytes)?))),
            path: path.to_owned(),
            cache_bytes,
            audit_append: tokio::sync::Mutex::new(()),
        })
    }

    fn open_file(path: &Path, cache_bytes: u64) -> Result<Open, StoreError> {
        let db = Database::builder()
            .set_cache_size(usize::try_from(cache_bytes).unwrap_or(usize::MAX))
            .create(path)?;
        let txn = db.begin_write()?;
        for table in TABLES {
            txn.open_table(table)?;
        }
        let found = {
            let mut meta = txn.open_table(META)?;
            let found = match meta.get(SCHEMA_KEY)? {
                Some(raw) => {
                    Some(u32::from_be_bytes(raw.value().try_into().map_err(
                        |_| StoreError::corrupt("schema_version", "not 4 bytes"),
                    )?))
                }
                None => None,
            };
            // A new file, or one of a schema whose redb layout this build reads as it is
            // (4; 5 to 7 changed only sled's, 8 only what new records hold): just the
            // number. Schema 3 is upgraded below.
            if found.is_none_or(|found| found > 3 && found < STORE_SCHEMA) {
                meta.insert(SCHEMA_KEY, STORE_SCHEMA.to_be_bytes().as_slice())?;
            }
            found
        };
        match found {
            Some(found) if found > STORE_SCHEMA => {
                return Err(StoreError::SchemaTooNew {
                    location: path.display().to_string(),
                    found,
                    known: STORE_SCHEMA,
                });
            }
            // The first redb layout is the store's schema 3: there is nothing older.
            Some(found) if found < 3 => {
                return Err(StoreError::corrupt(
                    "schema_version",
                    format!("{found}, older than any redb store"),
                ));
            }
            _ => {}
        }
        txn.commit()?;
        if found == Some(3) {
            Self::upgrade_from_3(&db, path)?;
        }
        let db = Arc::new(db);
        Ok(Open {
            writer: Writer::start(Arc::clone(&db)),
            db,
            decoded_keys: DecodedKeys::new(),
        })
    }

    /// Schema 3 to this build's (4 is redb's last layout change); the schema is recorded
    /// only once the versions have moved.
    fn upgrade_from_3(db: &Database, path: &Path) -> Result<(), StoreError> {
        let keys = keys::move_versions_to_creation_order(db)?;
        let txn = db.begin_write()?;
        txn.open_table(META)?
            .insert(SCHEMA_KEY, STORE_SCHEMA.to_be_bytes().as_slice())?;
        txn.commit()?;
        tracing::info!(path = %path.display(), from = 3, to = STORE_SCHEMA, keys, "migrated the store's schema");
        Ok(())
    }

    /// The open database; UNAVAILABLE while it is being reopened.
    fn open_db(&self) -> Result<Arc<Open>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::unavailable(BACKEND, "reopening the database after a write failure")
            })
    }

    /// A read transaction: a snapshot of the last commit.
    fn read(&self) -> Result<(Arc<Open>, ReadTransaction), StoreError> {
        let open = self.open_db()?;
        let txn = open.db.begin_read()?;
        Ok((open, txn))
    }

    /// Runs `work` on a blocking thread over a read transaction: for scans.
    async fn scan<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Open, &ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (open, txn) = self.read()?;
        tokio::task::spawn_blocking(move || work(&open, &txn))
            .await
            .map_err(|e| StoreError::unavailable(BACKEND, e))?
    }

    /// Runs `work` in the writer's next transaction. A job holds nothing of the store:
    /// the last handle of a database must never be dropped on its own writer thread
    /// (that thread would wait to join itself).
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_job(false, work).await
    }

    /// [`Self::write`]; with `durable`, answered once the write is on disk.
    async fn write_job<T: Send + 'static>(
        &self,
        durable: bool,
        work: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.open_db()?.writer.write(work, durable).await
    }

    /// Closes the database and opens it again (redb refuses writes after a failed
    /// commit until then). Blocking.
    fn reopen(&self) -> Result<(), StoreError> {
        let taken = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut open) = taken {
            // Calls in flight hold it for microseconds; a scan may hold it longer.
            let mut waited = 0;
            loop {
                match Arc::try_unwrap(open) {
                    Ok(closed) => {
                        drop(closed);
                        break;
                    }
                    Err(shared) if waited < 50 => {
                        open = shared;
                        waited += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(shared) => {
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(shared);
                        return Err(StoreError::unavailable(
                            BACKEND,
                            "the failed database is still in use",
                        ));
                    }
                }
            }
        }
        let open = Self::open_file(&self.path, self.cache_bytes)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(open));
        Ok(())
    }

    /// The schema version written in the database.
    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        let (_, txn) = self.read()?;
        let meta = txn.open_table(META)?;
        Ok(meta
            .get(SCHEMA_KEY)?
            .and_then(|raw| raw.value().try_into().ok().map(u32::from_be_bytes)))
    }

    /// Overwrites the schema version: for tests of the refusal of newer schemas.
    #[doc(hidden)]
    pub async fn force_schema_version(&self, version: u32) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.open_table(META)?
                .insert(SCHEMA_KEY, version.to_be_bytes().as_slice())?;
            Ok(())
        })
        .await?;
        self.sync().await
    }

    /// Every table with its entries, bytes of keys plus values and the pages it takes;
    /// the file's size and the pages in use. For `kms store stats` of a stopped store.
    pub async fn table_sizes(&self) -> Result<StoreSizes, StoreError> {
        let path = self.path.clone();
        self.scan(move |open, txn| {
            let mut sizes = Vec::new();
            for table in TABLES {
                let opened = txn.open_table(table)?;
                // redb's stored bytes are the keys and values in its leaves.
                let stats = opened.stats()?;
                sizes.push(TreeSize {
                    name: table.name().to_owned(),
                    entries: opened.len()?,
                    bytes: stats.stored_bytes(),
                    pages: Some(TreePages {
                        bytes: stats.stored_bytes()
                            + stats.metadata_bytes()
                            + stats.fragmented_bytes(),
                        unused: stats.fragmented_bytes(),
                    }),
                });
            }
            // Only a write transaction counts the pages allocated; this one writes
            // nothing and is aborted.
            let counting = open.db.begin_write()?;
            let database = counting.stats()?;
            counting.abort()?;
            Ok(StoreSizes {
                trees: sizes,
                on_disk: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                in_use: Some(database.allocated_pages() * database.page_size() as u64),
            })
        })
        .await
    }
}

/// The first key after every key that begins with `prefix` (`None`: there is none).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Every entry of `table` whose key begins with `prefix`, in key order.
fn with_prefix<'t, T: ReadableTable<Bytes, Bytes>>(
    table: &'t T,
    prefix: &[u8],
) -> Result<redb::Range<'t, Bytes, Bytes>, StoreError> {
    Ok(match prefix_end(prefix) {
        Some(end) => table.range::<&[u8]>(prefix..end.as_slice())?,
        None => table.range::<&[u8]>(prefix..)?,
    })
}

#[async_trait]
impl Durability for RedbStore {
    async fn sync(&self) -> Result<(), StoreError> {
        self.open_db()?.writer.sync().await
    }
}

#[async_trait]
impl Store for RedbStore {
    /// No connection to lose; after a failed commit the file is reopened here.
    async fn ping(&self) -> Result<(), StoreError> {
        let healthy = match self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(open) => !open.writer.failing(),
            None => false,
        };
        if healthy {
            return Ok(());
        }
        super::kv::reopen_in_place(&self.path, || self.reopen())
    }

    fn describe(&self) -> String {
        format!("redb at {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{KeyRecord, KeyState, VersionRecord};
    use crate::store::KeyStore;
    use crate::store::conformance::{changed, key, version};

    /// Rewrites every key as schema 7 kept it: the record alone, each version in its
    /// own `key_versions` entry.
    fn carried_to_entries(txn: &redb::WriteTransaction) {
        let mut order = txn.open_table(ORDER).unwrap();
        let mut versions = txn.open_table(VERSIONS).unwrap();
        let mut rewritten = Vec::new();
        for entry in order.iter().unwrap() {
            let (k, v) = entry.unwrap();
            let (value, carried) =
                crate::store::order_value_before_schema_8(k.value(), v.value()).unwrap();
            rewritten.push((k.value().to_vec(), value, carried));
        }
        for (at, value, carried) in rewritten {
            order.insert(at.as_slice(), value.as_slice()).unwrap();
            if let Some((vk, vv)) = carried {
                versions.insert(vk.as_slice(), vv.as_slice()).unwrap();
            }
        }
    }

    /// Rewrites a file in the schema-3 layout: versions keyed by key id.
    fn downgrade_to_3(path: &Path) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        carried_to_entries(&txn);
        {
            let new = txn.open_table(VERSIONS).unwrap();
            let mut old = txn.open_table(SCHEMA_3_VERSIONS).unwrap();
            for entry in new.iter().unwrap() {
                let (k, v) = entry.unwrap();
                old.insert(&k.value()[8..], v.value()).unwrap();
            }
        }
        txn.delete_table(VERSIONS).unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SCHEMA_KEY, 3u32.to_be_bytes().as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    #[tokio::test]
    async fn a_schema_3_file_opens_upgraded_with_every_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let store = RedbStore::open(&path, 1 << 20).unwrap();
        // Two keys created in the same millisecond, one of them rotated, and a third
        // in another instance.
        let mut keys = Vec::new();
        for instance in ["a", "a", "b"] {
            let mut k = key(instance, 7, KeyState::Active, false);
            let first = version(k.id, 7);
            k.current_version = Some(first.id);
            store.insert_key(&k, Some(&first)).await.unwrap();
            keys.push(k);
        }
        let second = version(keys[0].id, 9);
        let rotated = changed(&keys[0], |k| k.current_version = Some(second.id));
        store
            .replace_key(&keys[0], &rotated, Some(&second), false)
            .await
            .unwrap();
        keys[0] = rotated;
        let mut before = Vec::new();
        for k in &keys {
            before.push(store.list_versions(k).await.unwrap());
        }
        assert_eq!(before.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1, 1]);
        drop(store);

        downgrade_to_3(&path);
        let store = RedbStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
        for (k, versions) in keys.iter().zip(&before) {
            assert_eq!(&store.list_versions(k).await.unwrap(), versions);
            for v in versions {
                assert_eq!(store.get_version(k, v.id).await.unwrap().as_ref(), Some(v));
            }
        }
        let (open, txn) = store.read().unwrap();
        let tables: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(!tables.contains(&"versions".to_owned()), "{tables:?}");
        drop((open, txn));
    }

    /// A new file holding one key, created with its first version.
    async fn a_store_with_a_key() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        RedbStore,
        KeyRecord,
        VersionRecord,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.redb");
        let store = RedbStore::open(&path, 1 << 20).unwrap();
        let mut k = key("a", 7, KeyState::Active, false);
        let first = version(k.id, 7);
        k.current_version = Some(first.id);
        store.insert_key(&k, Some(&first)).await.unwrap();
        (dir, path, store, k, first)
    }

    /// Schema 4 is this build's redb layout (5 changed only sled's): such a file opens
    /// as it is and records the new number.
    #[tokio::test]
    async fn a_schema_4_file_opens_as_it_is_and_records_this_schema() {
        let (_dir, path, store, k, first) = a_store_with_a_key().await;
        store.force_schema_version(4).await.unwrap();
        drop(store);
        let store = RedbStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
        assert_eq!(store.list_versions(&k).await.unwrap(), vec![first]);
    }

    /// A new key's first version rides in its record; a schema-7 file, where every
    /// version has its own entry, opens as it is, and its keys' versions read, rotate,
    /// erase and re-import as any other's.
    #[tokio::test]
    async fn versions_written_before_schema_8_read_beside_carried_ones() {
        let (_dir, path, store, k, first) = a_store_with_a_key().await;
        let stored_entries = |store: &RedbStore| {
            let (_, txn) = store.read().unwrap();
            txn.open_table(VERSIONS).unwrap().len().unwrap()
        };
        assert_eq!(stored_entries(&store), 0, "the first version is carried");
        let second = version(k.id, 8);
        let rotated = changed(&k, |k| k.current_version = Some(second.id));
        store
            .replace_key(&k, &rotated, Some(&second), false)
            .await
            .unwrap();
        assert_eq!(stored_entries(&store), 1, "a rotated-in version is not");
        drop(store);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            carried_to_entries(&txn);
            txn.open_table(META)
                .unwrap()
                .insert(SCHEMA_KEY, 7u32.to_be_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path, 1 << 20).unwrap();
        assert_eq!(store.schema_version().unwrap(), Some(STORE_SCHEMA));
        assert_eq!(stored_entries(&store), 2);
        let read = store.get_key("a", k.id).await.unwrap().unwrap();
        assert_eq!(read, rotated);
        crate::store::conformance::versions_of_an_earlier_layout(
            Arc::new(store),
            read,
            vec![first, second],
        )
        .await;
    }

    #[test]
    fn prefix_end_is_the_first_key_past_the_prefix() {
        assert_eq!(prefix_end(b"ab\0"), Some(b"ab\x01".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }
}
