//! Persistence of key metadata, KEK-wrapped blobs, import state and the audit trail,
//! behind traits any real database can implement. Three backends: redb (the embedded
//! default, bounded memory, [`redb`]), sled (embedded, the default of earlier builds,
//! [`sled`]) and PostgreSQL ([`postgres`], several replicas on one database).
//!
//! The contract every backend keeps, and [`conformance`] checks:
//! - Durability is the store's: a change is durable once [`Durability::sync`] returns
//!   after it (sled: one group flush shared by concurrent callers; PostgreSQL: every
//!   write is a committed transaction, so `sync` has nothing to wait for).
//! - Records that change carry a [`Revision`]; a replacement names the revision it was
//!   computed from and fails with [`StoreError::Conflict`] if the stored one moved on
//!   (compare-and-swap). Retrying is the domain's, in one bounded helper.
//! - Errors are one [`StoreError`]: unavailable (retry later), conflict, corrupt, or a
//!   schema newer than this build. Each backend maps its own errors into it.
//! - Every method is async. A backend either does real async I/O (PostgreSQL) or says
//!   in its module which calls run inline and which go to a blocking thread (sled).
//! - The HSM layer never sees a store: the domain reads blobs and hands them over.

pub mod conformance;
pub(crate) mod kv;
pub mod postgres;
pub mod redb;
pub mod sled;
pub mod snapshot;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

pub use self::postgres::{PostgresConfig, PostgresStore};
pub use self::redb::RedbStore;
pub use self::sled::SledStore;
pub use self::snapshot::{ItemCounts, Loader, Snapshot, SnapshotSink, StoreItem};
use crate::domain::model::{
    ImportParametersRecord, ImportTokenRecord, KeyFilter, KeyRecord, Millis, VersionRecord,
};
use crate::hsm::RsaKeyPair;

/// Version of the layout (tables, trees, encodings) written by this build. Older layouts
/// are migrated when a store opens; a newer one is refused.
/// 4 changed only redb's layout ([`redb`](self::redb)), 5, 6 and 7 only sled's
/// ([`sled`](self::sled)): a store of the other backend just records the number. 8 lets
/// a key record of either carry the key's first version ([`kv::codec`]); records
/// written before it are read as they are, so the upgrade only records the number.
pub const STORE_SCHEMA: u32 = 8;

/// The embedded stores' page cache unless configured (`store.cache_mib`). redb holds its
/// cache to it. sled's own default is 1 GiB, which let 100,000 keys hold 600 MB
/// resident; sled counts its cache in compressed bytes on disk, not memory, so it gets a
/// quarter of this (`sled::SLED_CACHE_SHARE`), and keeps more than its cache besides.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;

/// What a stopped embedded store holds and takes, for `kms store stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSizes {
    pub trees: Vec<TreeSize>,
    /// The database's size on disk.
    pub on_disk: u64,
    /// Bytes of the file in pages the database uses, where the backend says (redb); the
    /// rest is free space it reuses as it writes on, and a compaction gives back.
    pub in_use: Option<u64>,
}

/// One tree (redb: table) of a stopped embedded store, for `kms store stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeSize {
    pub name: String,
    pub entries: u64,
    /// Bytes of keys plus values as the store holds them.
    pub bytes: u64,
    /// The pages the tree takes, where the backend says (redb); sled writes a log and
    /// has no pages of its own to count.
    pub pages: Option<TreePages>,
}

/// What a redb table's B-tree takes of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreePages {
    /// Leaf and branch pages, in bytes.
    pub bytes: u64,
    /// Bytes of those pages that hold no key or value: pages left part full by splits.
    pub unused: u64,
}

/// Counts the changes of one record: 0 when created, one more on every replacement.
pub type Revision = u64;

/// Any boxed error a backend wraps as the cause of [`StoreError::Unavailable`].
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or failed the operation; a later call may work.
    #[error("the {backend} store is unavailable: {cause}")]
    Unavailable { backend: &'static str, cause: Cause },

    #[error("record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },

    #[error(
        "the store at {location} has schema version {found}; this build knows versions up to {known}"
    )]
    SchemaTooNew {
        location: String,
        found: u32,
        known: u32,
    },

    /// The record changed since it was read; the caller may re-read and retry.
    #[error("the record was changed concurrently")]
    Conflict,
}

impl StoreError {
    pub fn unavailable(backend: &'static str, cause: impl Into<Cause>) -> Self {
        StoreError::Unavailable {
            backend,
            cause: cause.into(),
        }
    }

    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Where a backend's durability promise is kept.
#[async_trait]
pub trait Durability: Send + Sync + 'static {
    /// Returns once every write this store returned from before the call is durable.
    async fn sync(&self) -> Result<(), StoreError>;
}

/// A whole store: what the server opens, one object for every trait.
#[async_trait]
pub trait Store: KeyStore + ImportStore + AuditStore + Snapshot {
    /// A cheap round trip to the database, for health.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Where the data lives, for logs: never a password.
    fn describe(&self) -> String;
}

/// Where a page of keys begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStart {
    /// Skip this many matching keys.
    Offset(usize),
    /// The keys after this one, in creation order then id.
    After(KeyPosition),
}

/// A record's place in its listing order: a key's among its instance's keys, or a
/// version's among its key's versions (creation time, then id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyPosition {
    pub created_at: Millis,
    pub id: Uuid,
}

impl KeyPosition {
    pub fn of(key: &KeyRecord) -> Self {
        Self {
            created_at: key.created_at,
            id: key.id,
        }
    }

    /// A version's place among its key's versions.
    pub fn of_version(version: &VersionRecord) -> Self {
        Self {
            created_at: version.created_at,
            id: version.id,
        }
    }
}

/// What the domain needs from storage for keys and their versions.
#[async_trait]
pub trait KeyStore: Durability {
    /// True when any key record exists, in any instance.
    async fn has_keys(&self) -> Result<bool, StoreError>;

    /// Inserts a new key (revision 0) and its first version (if any), updating the
    /// instance counters. A key id that exists already is a conflict.
    async fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError>;

    /// The key as stored, with its revision. A backend shared by several processes may
    /// answer from a local cache no older than its documented bound.
    async fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;

    /// Replaces `previous` by `next` if the stored revision is still `previous.revision`
    /// (otherwise `StoreError::Conflict`, nothing changed); `next.revision` must be one
    /// more. Adjusts counters and indexes; `new_version` is added in the same
    /// transaction (rotation), or replaces the version with its id (re-importing the
    /// same material restores an erased version); `erase_material` erases the wrapped
    /// blob of every existing version of the key.
    async fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError>;

    /// One version of a key. Version reads take the key's record, not only its id: a
    /// store may keep versions where the record says (redb keeps them in the key's
    /// creation order, so new keys append to the file instead of landing on a random
    /// page of it).
    async fn get_version(
        &self,
        key: &KeyRecord,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError>;

    /// Every version of a key, newest first.
    async fn list_versions(&self, key: &KeyRecord) -> Result<Vec<VersionRecord>, StoreError>;

    /// One page of a key's versions, newest first, and how many versions it has. From
    /// an offset the store walks the versions before it; after a position (the last
    /// version of the previous page) it seeks to the older ones, so every page costs
    /// what the first does. The count reads the key's index entries, decoding none.
    async fn list_versions_page(
        &self,
        key: &KeyRecord,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError>;

    /// One page of an instance's keys in creation order (then id), and the total
    /// number matching the filter. From an offset, the store walks every matching key
    /// before it; after a position (the last key of the previous page), it seeks there,
    /// so every page costs what the first does.
    async fn list_keys(
        &self,
        instance: &str,
        filter: &KeyFilter,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError>;

    /// Number of an instance's keys matching the filter, from counters (no scan).
    async fn count_keys(&self, instance: &str, filter: &KeyFilter) -> Result<u64, StoreError>;

    /// Up to `limit` keys with a time-driven transition due at or before `now`
    /// ([`KeyRecord::next_transition_at`]), as (instance, key id), from an index kept
    /// with the records.
    async fn due_for_expiry(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(String, Uuid)>, StoreError>;
}

/// What key import needs from storage: import tokens (one per instance), the parameters
/// of EXTERNAL keys, and the pool of pre-generated RSA key pairs.
#[async_trait]
pub trait ImportStore: Durability {
    async fn get_import_token(
        &self,
        instance: &str,
    ) -> Result<Option<ImportTokenRecord>, StoreError>;

    /// Replaces the instance's token (or removes it, with `None`) if the stored one is
    /// still `previous` (same id and revision; `None`: there is none); otherwise
    /// `StoreError::Conflict`. A `next` with the id of `previous` must carry the next
    /// revision; a new token starts at 0.
    async fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError>;

    /// Every stored import token, for the expiry sweep (one per instance at most).
    async fn import_tokens(&self) -> Result<Vec<ImportTokenRecord>, StoreError>;

    async fn get_import_parameters(
        &self,
        key_id: Uuid,
    ) -> Result<Option<ImportParametersRecord>, StoreError>;

    async fn put_import_parameters(
        &self,
        parameters: &ImportParametersRecord,
    ) -> Result<(), StoreError>;

    async fn remove_import_parameters(&self, key_id: Uuid) -> Result<(), StoreError>;

    /// Key ids whose import parameters expired at or before `now`.
    async fn expired_import_parameters(&self, now: Millis) -> Result<Vec<Uuid>, StoreError>;

    async fn push_key_pair(&self, pair: &RsaKeyPair) -> Result<(), StoreError>;

    /// Removes and returns one stored pair of this size, if any; two callers never get
    /// the same pair.
    async fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError>;

    async fn count_key_pairs(&self, bits: u32) -> Result<usize, StoreError>;

    /// Drops every import token, import parameters record and pooled pair: used when a
    /// new master KEK was created, since their private keys were wrapped under the old.
    async fn clear_import_state(&self) -> Result<usize, StoreError>;
}

/// The part of [`KeyStore::replace_key`]'s contract every backend checks before touching
/// its database: the replacement carries the next revision.
pub(crate) fn check_key_revision(previous: &KeyRecord, next: &KeyRecord) -> Result<(), StoreError> {
    if next.revision == previous.revision + 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict)
    }
}

/// The part of [`ImportStore::swap_import_token`]'s contract every backend checks
/// before touching its database: the same token's replacement carries the next
/// revision.
pub(crate) fn check_token_revision(
    previous: Option<&ImportTokenRecord>,
    next: Option<&ImportTokenRecord>,
) -> Result<(), StoreError> {
    match (previous, next) {
        (Some(previous), Some(next))
            if previous.id == next.id && next.revision != previous.revision + 1 =>
        {
            Err(StoreError::Conflict)
        }
        _ => Ok(()),
    }
}

/// Where the audit chain ends: its newest record's sequence number and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainEnd {
    pub seq: u64,
    #[serde(with = "hex::serde")]
    pub hash: [u8; 32],
}

/// What [`AuditStore::append_audit`]'s `seal` returns: blocks to store, oldest first,
/// each under its first sequence number, and the chain's new end.
#[derive(Debug, Default)]
pub struct SealedBlocks {
    pub blocks: Vec<(u64, Vec<u8>)>,
    pub end: Option<ChainEnd>,
}

/// Builds the blocks that continue the chain from where it ends (`None`: nothing yet).
pub type Seal<'a> = &'a (dyn Fn(Option<ChainEnd>) -> SealedBlocks + Send + Sync);

/// The audit trail's storage: blocks of consecutive records as opaque bytes, each under
/// the sequence number of its first record, the chain's end, and the anchor retention
/// leaves behind. Record format and chaining are `crate::audit`'s. One chain per store,
/// whatever number of processes append to it.
#[async_trait]
pub trait AuditStore: Durability {
    /// Reads the chain's end and stores what `seal` makes of it, as one step no other
    /// appender (in this or another process) can interleave with. `seal` may be called
    /// more than once if the backend retries.
    async fn append_audit(&self, seal: Seal<'_>) -> Result<(), StoreError>;

    /// [`Self::append_audit`], returning once the append and every write before it
    /// are durable. A backend that can commit both at once overrides it (redb: one
    /// trip through its writer instead of an append and then a sync).
    async fn append_audit_durably(&self, seal: Seal<'_>) -> Result<(), StoreError> {
        self.append_audit(seal).await?;
        self.sync().await
    }

    /// The chain's end as stored with the last append.
    async fn audit_chain_end(&self) -> Result<Option<ChainEnd>, StoreError>;

    /// The newest block.
    async fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    /// Up to `limit` blocks whose first sequence number is below `before` (all, with
    /// `None`), newest first.
    async fn audit_blocks_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// Up to `limit` blocks whose first sequence number is `from` or more, oldest first.
    async fn audit_blocks_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// The sequence number and hash of the last record retention removed, if any.
    async fn audit_anchor(&self) -> Result<Option<ChainEnd>, StoreError>;

    /// Removes every block whose first sequence number is `upto` or less and makes
    /// `anchor` the anchor, in one transaction. Returns how many blocks it removed.
    async fn prune_audit_blocks(&self, upto: u64, anchor: ChainEnd) -> Result<usize, StoreError>;
}

/// Which backend to open, from the configuration.
#[derive(Clone, Debug)]
pub enum StoreConfig {
    Sled {
        path: std::path::PathBuf,
        /// sled's page cache, in bytes.
        cache_bytes: u64,
    },
    Redb {
        path: std::path::PathBuf,
        /// redb's page cache, in bytes.
        cache_bytes: u64,
    },
    Postgres(PostgresConfig),
}

impl StoreConfig {
    /// Where an embedded store keeps its files (none for PostgreSQL).
    pub fn embedded_path(&self) -> Option<&std::path::Path> {
        match self {
            StoreConfig::Sled { path, .. } | StoreConfig::Redb { path, .. } => Some(path),
            StoreConfig::Postgres(_) => None,
        }
    }

    /// The same embedded store at another path (PostgreSQL: unchanged).
    pub fn at_path(&self, at: std::path::PathBuf) -> StoreConfig {
        match self {
            StoreConfig::Sled { cache_bytes, .. } => StoreConfig::Sled {
                path: at,
                cache_bytes: *cache_bytes,
            },
            StoreConfig::Redb { cache_bytes, .. } => StoreConfig::Redb {
                path: at,
                cache_bytes: *cache_bytes,
            },
            StoreConfig::Postgres(config) => StoreConfig::Postgres(config.clone()),
        }
    }

    /// The backend's name, as backups and logs give it.
    pub fn backend(&self) -> &'static str {
        match self {
            StoreConfig::Sled { .. } => "sled",
            StoreConfig::Redb { .. } => "redb",
            StoreConfig::Postgres(_) => "postgres",
        }
    }
}

/// An embedded store's (sled, redb) `order` entry value as schemas before 8 wrote it,
/// and the `key_versions` entry (key, value) of the version it carries, if any: for
/// the tests that rebuild an earlier layout from a store this build wrote.
#[doc(hidden)]
pub fn order_value_before_schema_8(
    order_key: &[u8],
    value: &[u8],
) -> Result<(Vec<u8>, Option<kv::Entry>), StoreError> {
    kv::value_before_schema_8(order_key, value)
}

/// Opens (creating or migrating its schema) the configured store.
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Sled { path, cache_bytes } => {
            Arc::new(SledStore::open_with_cache(path, *cache_bytes)?)
        }
        StoreConfig::Redb { path, cache_bytes } => Arc::new(RedbStore::open(path, *cache_bytes)?),
        StoreConfig::Postgres(config) => Arc::new(PostgresStore::connect(config).await?),
    })
}
