//! The sled backend: the embedded default of earlier builds (a data directory that
//! holds a sled `db` keeps it), one process per data directory (sled holds an
//! exclusive lock on it).
//!
//! Trees and their keys (instance ids never contain NUL, so `instance 0x00` is a safe
//! prefix):
//! - `order`:    instance 0x00 created-ms(BE u64) key-uuid   -> revision (BE u64) || KeyRecord [|| its first version] ([`codec`](crate::store::kv::codec))
//!   (records in listing order: creation time, then id)
//! - `keys`:     instance 0x00 key-uuid                      -> created-ms (BE u64)
//!   (where a key's record is in `order`)
//! - `counters`: instance 0x00 state extractable             -> count (BE u64)
//!   (CountKeys sums at most ten counters; updated in the same transaction as records)
//! - `key_versions`: key-created-ms(BE u64) key-uuid created-ms(BE u64) version-uuid -> VersionRecord ([`codec`](crate::store::kv::codec))
//!   (a key's later versions, next to the keys created with it: see below)
//! - `expiry`:   due-ms(BE u64) instance 0x00 key-uuid       -> ()
//!   (keys with a time-driven transition due, for the expiry sweep)
//! - `import_tokens`:     instance      -> revision (BE u64) || token id || ImportTokenRecord (JSON)
//! - `import_parameters`: key-uuid      -> ImportParametersRecord (JSON)
//! - `rsa_pool`:          bits(BE u32) pair-uuid             -> RsaKeyPair (JSON)
//! - `meta`:     "schema_version"                            -> BE u32
//! - `audit`, `audit_meta`: the audit trail (see [`audit`])
//!
//! Schema history: 1 had no revisions (compare-and-swap compared whole records); 2
//! prefixes key and import-token records with their revision (and the token's id); 3
//! stores key and version records in a compact binary form ([`codec`](crate::store::kv::codec)) instead of
//! JSON; 4 changed only redb's layout, so a sled store at 3 just records 4; 5 keeps
//! versions in their key's creation order (`key_versions`) instead of by key id
//! (`versions`); 6 moves key records from `keys` into `order`, leaving `keys` an
//! index of creation times; 7 writes audit blocks as zstd frames, as redb does (the
//! blocks already written stay as they are and are read either way, so the upgrade
//! only records the number); 8 writes a key's first version into its record instead of
//! an entry of `key_versions`, which keeps the versions rotated in after it (records
//! and entries written before stay as they are: a key's versions are read from both,
//! in order, so the upgrade only records the number). An older database is rewritten in place when it opens (a
//! record already in the newer form, from a migration interrupted after it, is left
//! alone). The layout is now redb's, tree for table.
//!
//! Why versions and records in creation order: key ids are random (v4), so a tree
//! keyed by key id takes every created key's entry at a random place; at a million
//! keys that place is on a node the cache no longer holds, read and rewritten by every
//! durable CreateKey, and a ListKeys page of 200 records kept by id was 200 reads of
//! cold nodes (p99 13 ms at a million keys, the first page 0.8). Kept under their key's
//! creation time, new versions and records are appended next to each other, a page is
//! one range scan wherever it starts, and `keys`, with 8-byte values, is the one tree
//! of random inserts a created key makes. GetKey is two point reads instead of one
//! (README, "At size").
//!
//! Where the work runs: point reads and writes run inline on the caller's task (sled
//! answers them from memory and its write buffer in microseconds, and they are the
//! WrapKey/UnwrapKey hot path); scans, bulk changes and the schema migration go to a
//! blocking thread ([`SledStore::blocking`]); the fsync runs on the flusher's own thread.
//! sled writes what is not flushed every [`PERIODIC_FLUSH_MS`] anyway; durability on
//! demand is the group flush ([`Durability::sync`]).
//!
//! A write error (a full disk, a read-only directory) poisons a sled database: every
//! operation fails from then on. So the store reopens it: [`Store::ping`] (the health
//! monitor's probe) finds the poisoned database (a flush or a write failed), waits for
//! operations in flight to let go of it, closes it and opens it again, retrying until
//! the fault has cleared. Meanwhile every operation answers UNAVAILABLE. What was
//! flushed before the fault is there after it; writes that were never acknowledged may
//! be gone.

mod audit;
mod compact;
mod flush;
mod imports;
mod keys;
mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ::sled::Tree;
use async_trait::async_trait;

use super::{
    DEFAULT_CACHE_BYTES, Durability, STORE_SCHEMA, Store, StoreError, StoreSizes, TreeSize,
};
use crate::store::kv::{self, DecodedKeys, codec};
pub use compact::Compacted;
use flush::GroupFlusher;

const SCHEMA_KEY: &[u8] = b"schema_version";
/// sled writes what is not yet flushed at least this often (its default, made explicit).
pub const PERIODIC_FLUSH_MS: u64 = 500;
/// sled's log segment. With zstd compression of what it writes, 2 MiB segments held
/// 100,000 generated keys (and their creation's audit records) in about 620 bytes a
/// key; sled's defaults (512 KiB, uncompressed) took 1,840, compression alone 975,
/// 128 KiB segments 1,137, 4 and 8 MiB 671 and 755 (size on disk after preloading with
/// `kms bench --preload 100000`). A segment size is fixed when a database is created.
const SEGMENT_BYTES: usize = 2 << 20;
const BACKEND: &str = "sled";
/// sled is given this fraction of the configured cache: it counts its cache in the
/// compressed bytes it reads from disk, not what they take in memory once decoded. At
/// a million keys, after the at-size benches, 64 MiB of sled cache left the server at
/// 574 MB resident and 16 MiB at 404 MB (about 3.5 bytes resident per byte counted; on
/// mimalloc, which held freed memory the allocator now gives back); 8 MiB gained
/// nothing more. The smaller cache costs deep ListKeys pages (p50 4.3 to 5.7
/// ms), not CreateKey or WrapKey (README, "At size").
const SLED_CACHE_SHARE: u64 = 4;
/// Where schemas up to 4 kept versions, by key id; moved by the upgrade to 5, then dropped.
const SCHEMA_4_VERSIONS: &str = "versions";

impl From<::sled::Error> for StoreError {
    fn from(error: ::sled::Error) -> Self {
        match error {
            ::sled::Error::Corruption { at, .. } => StoreError::corrupt(
                "sled database",
                match at {
                    Some(at) => format!("corruption at {at}"),
                    None => "corruption".into(),
                },
            ),
            other => StoreError::unavailable(BACKEND, other),
        }
    }
}

pub struct SledStore {
    /// The open database, or none while it is being reopened.
    current: RwLock<Option<Arc<Trees>>>,
    /// A poisoned database some operation still held when a reopen began.
    retired: Mutex<Option<Arc<Trees>>>,
    path: PathBuf,
    cache_bytes: u64,
    /// Every write holds it shared; a snapshot holds it exclusively, so what it reads
    /// is one moment's state (reads are not gated).
    writes: Arc<tokio::sync::RwLock<()>>,
}

/// Every tree, shared with blocking threads.
pub(super) struct Trees {
    db: ::sled::Db,
    keys: Tree,
    order: Tree,
    counters: Tree,
    key_versions: Tree,
    expiry: Tree,
    import_tokens: Tree,
    import_parameters: Tree,
    rsa_pool: Tree,
    audit: Tree,
    audit_meta: Tree,
    decoded_keys: DecodedKeys,
    /// Holds a handle of the database on its thread; declared after the trees, so it
    /// is dropped (and its thread joined) when they are.
    flusher: GroupFlusher,
    /// Held while appending to the audit chain, so reading its end and writing after it
    /// is one step.
    audit_append: Mutex<()>,
    /// A write failed in the database: [`Store::ping`] checks whether it must reopen.
    write_failed: AtomicBool,
}

impl SledStore {
    /// Opens (creating if absent) the database, migrating an older schema and refusing
    /// a newer one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// [`SledStore::open`] with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Ok(Self {
            current: RwLock::new(Some(Arc::new(Self::open_trees(path, cache_bytes)?))),
            retired: Mutex::new(None),
            path: path.to_owned(),
            cache_bytes,
            writes: Arc::new(tokio::sync::RwLock::new(())),
        })
    }

    /// The bare sled database at `path`, opened with the storage parameters it was
    /// created with and no migration: for tools and tests that inspect or edit a
    /// stopped data directory below the store's API.
    pub fn open_database(path: &Path) -> Result<::sled::Db, StoreError> {
        Ok(Self::database_config(path, DEFAULT_CACHE_BYTES).open()?)
    }

    fn database_config(path: &Path, cache_bytes: u64) -> ::sled::Config {
        // sled refuses to open a database with other storage parameters than it was
        // created with: one made by an earlier build keeps its own.
        let (segment_bytes, compression) = created_with(path).unwrap_or((SEGMENT_BYTES, true));
        ::sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes / SLED_CACHE_SHARE)
            .use_compression(compression)
            .segment_size(segment_bytes)
            .flush_every_ms(Some(PERIODIC_FLUSH_MS))
    }

    fn open_trees(path: &Path, cache_bytes: u64) -> Result<Trees, StoreError> {
        let db = Self::database_config(path, cache_bytes).open()?;
        let meta = db.open_tree("meta")?;
        let trees = Trees {
            keys: db.open_tree("keys")?,
            order: db.open_tree("order")?,
            counters: db.open_tree("counters")?,
            key_versions: db.open_tree("key_versions")?,
            expiry: db.open_tree("expiry")?,
            import_tokens: db.open_tree("import_tokens")?,
            import_parameters: db.open_tree("import_parameters")?,
            rsa_pool: db.open_tree("rsa_pool")?,
            audit: db.open_tree("audit")?,
            audit_meta: db.open_tree("audit_meta")?,
            decoded_keys: DecodedKeys::new(),
            flusher: GroupFlusher::start(db.clone()),
            audit_append: Mutex::new(()),
            write_failed: AtomicBool::new(false),
            db: db.clone(),
        };
        let found = match meta.get(SCHEMA_KEY)? {
            Some(raw) => u32::from_be_bytes(
                raw.as_ref()
                    .try_into()
                    .map_err(|_| StoreError::corrupt("schema_version", "not 4 bytes"))?,
            ),
            None if trees.keys.is_empty() && trees.import_tokens.is_empty() => STORE_SCHEMA,
            None => 1,
        };
        if found > STORE_SCHEMA {
            return Err(StoreError::SchemaTooNew {
                location: path.display().to_string(),
                found,
                known: STORE_SCHEMA,
            });
        }
        if found < 2 {
            trees.migrate_to_revisions()?;
        }
        if found < 3 {
            trees.migrate_to_binary()?;
        }
        if found < 5 {
            trees.move_versions_to_creation_order()?;
        }
        if found < 6 {
            trees.move_records_into_order()?;
        }
        if found < STORE_SCHEMA {
            tracing::info!(path = %path.display(), from = found, to = STORE_SCHEMA, "migrated the store's schema");
        }
        if found != STORE_SCHEMA || meta.get(SCHEMA_KEY)?.is_none() {
            meta.insert(SCHEMA_KEY, &STORE_SCHEMA.to_be_bytes())?;
        }
        db.flush()?;
        Ok(trees)
    }

    /// Runs a write on the open database, waiting while a snapshot is being taken. A
    /// failure of the database itself (not a conflict) is remembered for the health
    /// probe: once a write to its log failed, sled refuses every operation, and only a
    /// reopen mends it, whether or not a flush has failed yet.
    async fn write<T>(
        &self,
        work: impl FnOnce(&Trees) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _gate = self.writes.read().await;
        let trees = self.trees()?;
        let result = work(&trees);
        trees.note_failure(&result);
        result
    }

    /// [`SledStore::write`] for bulk writes, on a blocking thread.
    async fn write_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _gate = self.writes.read().await;
        self.blocking(move |trees| {
            let result = work(trees);
            trees.note_failure(&result);
            result
        })
        .await
    }

    /// The open database; UNAVAILABLE while it is being reopened.
    fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::unavailable(BACKEND, "reopening the database after a write failure")
            })
    }

    /// Closes a poisoned database and opens it again. Blocking.
    fn reopen(&self) -> Result<(), StoreError> {
        let taken = self
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(trees) = taken {
            *retired = Some(trees);
        }
        if let Some(trees) = retired.take() {
            // Operations in flight hold it for microseconds; a scan may hold it longer.
            let mut trees = trees;
            for _ in 0..50 {
                match Arc::try_unwrap(trees) {
                    Ok(closed) => {
                        drop(closed);
                        trees = Arc::new(Self::open_trees(&self.path, self.cache_bytes)?);
                        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(trees);
                        return Ok(());
                    }
                    Err(shared) => trees = shared,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            *retired = Some(trees);
            return Err(StoreError::unavailable(
                BACKEND,
                "the poisoned database is still in use",
            ));
        }
        let trees = Self::open_trees(&self.path, self.cache_bytes)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(trees));
        Ok(())
    }

    /// Runs `work` on a blocking thread: the explicit boundary for scans and bulk work.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let trees = self.trees()?;
        tokio::task::spawn_blocking(move || work(&trees))
            .await
            .map_err(|e| StoreError::unavailable(BACKEND, e))?
    }

    /// The schema version written in the database.
    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .trees()?
            .db
            .open_tree("meta")?
            .get(SCHEMA_KEY)?
            .and_then(|raw| raw.as_ref().try_into().ok().map(u32::from_be_bytes)))
    }

    /// Overwrites the schema version: for tests of the refusal of newer schemas.
    #[doc(hidden)]
    pub fn force_schema_version(&self, version: u32) -> Result<(), StoreError> {
        self.trees()?
            .db
            .open_tree("meta")?
            .insert(SCHEMA_KEY, &version.to_be_bytes())?;
        self.trees()?.db.flush()?;
        Ok(())
    }
}

/// The segment size and compression a database was created with, from sled's `conf`
/// file (`segment_size: N` and `use_compression: BOOL` lines); `None` for a new one.
fn created_with(path: &Path) -> Option<(usize, bool)> {
    let conf = std::fs::read(path.join("conf")).ok()?;
    let text = String::from_utf8_lossy(&conf);
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
            .map(str::trim)
    };
    Some((
        value("segment_size")?.parse().ok()?,
        value("use_compression")?.parse().ok()?,
    ))
}

impl Trees {
    /// Remembers a failure of the database itself for [`Store::ping`].
    fn note_failure<T>(&self, result: &Result<T, StoreError>) {
        if let Err(StoreError::Unavailable { .. }) = result {
            self.write_failed.store(true, Ordering::Release);
        }
    }

    /// Schema 1 -> 2: revision 0 (and, for tokens, the id) in front of each record. A
    /// record already prefixed (a migration interrupted after it) is left alone.
    fn migrate_to_revisions(&self) -> Result<(), StoreError> {
        for entry in self.keys.iter() {
            let (k, v) = entry?;
            if v.first() == Some(&b'{') {
                self.keys.insert(k, kv::encode_key_value(0, &v))?;
            }
        }
        for entry in self.import_tokens.iter() {
            let (k, v) = entry?;
            if v.first() == Some(&b'{') {
                let token: crate::domain::model::ImportTokenRecord =
                    kv::decode("import token", &v)?;
                self.import_tokens.insert(k, kv::encode_token(&token))?;
            }
        }
        Ok(())
    }
}

impl Trees {
    /// Schema 2 -> 3: key and version records from JSON to [`codec`]'s binary form (the
    /// versions still in the tree schema 4 kept them in, moved after this).
    fn migrate_to_binary(&self) -> Result<(), StoreError> {
        for entry in self.keys.iter() {
            let (k, v) = entry?;
            if v.len() > 8 && codec::is_json(&v[8..]) {
                let (instance, id) = kv::parse_key_key(&k)?;
                let record = kv::decode_key_value(&instance, id, &v)?;
                self.keys.insert(k, kv::key_value(&record))?;
            }
        }
        let versions = self.db.open_tree(SCHEMA_4_VERSIONS)?;
        for entry in versions.iter() {
            let (k, v) = entry?;
            if codec::is_json(&v) {
                let version = kv::decode_version_entry(&k, &v)?;
                versions.insert(k, codec::encode_version(&version))?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Durability for SledStore {
    async fn sync(&self) -> Result<(), StoreError> {
        self.trees()?.flusher.flush().await
    }
}

#[async_trait]
impl Store for SledStore {
    /// No connection to lose; a failed flush means a poisoned database, reopened here.
    async fn ping(&self) -> Result<(), StoreError> {
        let healthy = match self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(trees) => {
                !(trees.flusher.failing() || trees.write_failed.load(Ordering::Acquire))
                    || trees.db.flush().is_ok()
            }
            None => false,
        };
        if healthy {
            return Ok(());
        }
        kv::reopen_in_place(&self.path, || self.reopen())
    }

    fn describe(&self) -> String {
        format!("sled at {}", self.path.display())
    }
}

impl SledStore {
    /// Per tree: its name, entries, and bytes of keys plus values; then sled's own
    /// size on disk. For `kms store stats`.
    pub async fn tree_sizes(&self) -> Result<StoreSizes, StoreError> {
        self.blocking(|trees| {
            let mut sizes = Vec::new();
            for name in trees.db.tree_names() {
                let tree = trees.db.open_tree(&name)?;
                let (mut entries, mut bytes) = (0u64, 0u64);
                for entry in tree.iter() {
                    let (k, v) = entry?;
                    entries += 1;
                    bytes += (k.len() + v.len()) as u64;
                }
                sizes.push(TreeSize {
                    name: String::from_utf8_lossy(&name).into_owned(),
                    entries,
                    bytes,
                    pages: None,
                });
            }
            Ok(StoreSizes {
                trees: sizes,
                on_disk: trees.db.size_on_disk()?,
                in_use: None,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests;
