//! Persistence of key metadata and KEK-wrapped blobs, behind a small trait so the domain
//! does not see sled.
//!
//! Writes are made durable by [`GroupFlusher`]: a mutating call flushes before it is
//! acknowledged, and concurrent callers share one fsync.

mod flush;
mod sled_audit;
mod sled_store;

pub use flush::GroupFlusher;
pub use sled_store::SledStore;

use uuid::Uuid;

use crate::domain::model::{
    ImportParametersRecord, ImportTokenRecord, KeyFilter, KeyRecord, Millis, VersionRecord,
};
use crate::hsm::RsaKeyPair;

/// Version of the on-disk layout (trees and key encodings) written by this build.
pub const STORE_SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sled::Error),

    #[error("record {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },

    #[error(
        "the database at {path} has schema version {found}, this build reads version {expected}"
    )]
    SchemaMismatch {
        path: String,
        found: u32,
        expected: u32,
    },

    /// The record changed since it was read; the caller may re-read and retry.
    #[error("the record was changed concurrently")]
    Conflict,

    #[error("flushing the database failed: {0}")]
    Flush(String),

    #[error("the store's flush worker stopped")]
    FlushWorkerGone,
}

/// What the domain needs from storage. Every method is short and synchronous; durability
/// is requested separately through [`GroupFlusher`].
pub trait KeyStore: Send + Sync + 'static {
    /// True when any key record exists, in any instance.
    fn has_keys(&self) -> Result<bool, StoreError>;

    /// Inserts a new key and its first version (if any), updating the instance counters.
    fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError>;

    fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;

    /// Replaces `previous` by `next` if the stored record still equals `previous`
    /// (otherwise `StoreError::Conflict`), adjusting counters and the list index.
    /// `new_version` is added in the same transaction (rotation); `erase_material` also
    /// erases the wrapped blob of every existing version of the key.
    fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError>;

    fn get_version(
        &self,
        key_id: Uuid,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError>;

    /// Every version of a key, newest first.
    fn list_versions(&self, key_id: Uuid) -> Result<Vec<VersionRecord>, StoreError>;

    /// One page of an instance's keys in creation order (then id), and the total
    /// number matching the filter.
    fn list_keys(
        &self,
        instance: &str,
        filter: &KeyFilter,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError>;

    /// Number of an instance's keys matching the filter, from counters (no scan).
    fn count_keys(&self, instance: &str, filter: &KeyFilter) -> Result<u64, StoreError>;

    /// Up to `limit` keys with a time-driven transition due at or before `now`
    /// ([`KeyRecord::next_transition_at`]), as (instance, key id), from an index kept
    /// with the records.
    fn due_for_expiry(&self, now: Millis, limit: usize) -> Result<Vec<(String, Uuid)>, StoreError>;
}

/// What key import needs from storage: import tokens (one per instance), the parameters
/// of EXTERNAL keys, and the pool of pre-generated RSA key pairs.
pub trait ImportStore: Send + Sync + 'static {
    fn get_import_token(&self, instance: &str) -> Result<Option<ImportTokenRecord>, StoreError>;

    /// Replaces the instance's token (or removes it, with `None`) if the stored one still
    /// equals `previous` (`None`: there is none); otherwise `StoreError::Conflict`.
    fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError>;

    /// Every stored import token, for the expiry sweep (one per instance at most).
    fn import_tokens(&self) -> Result<Vec<ImportTokenRecord>, StoreError>;

    fn get_import_parameters(
        &self,
        key_id: Uuid,
    ) -> Result<Option<ImportParametersRecord>, StoreError>;

    fn put_import_parameters(&self, parameters: &ImportParametersRecord) -> Result<(), StoreError>;

    fn remove_import_parameters(&self, key_id: Uuid) -> Result<(), StoreError>;

    /// Key ids whose import parameters expired at or before `now`.
    fn expired_import_parameters(&self, now: Millis) -> Result<Vec<Uuid>, StoreError>;

    fn push_key_pair(&self, pair: &RsaKeyPair) -> Result<(), StoreError>;

    /// Removes and returns one stored pair of this size, if any.
    fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError>;

    fn count_key_pairs(&self, bits: u32) -> Result<usize, StoreError>;

    /// Drops every import token, import parameters record and pooled pair: used when a
    /// new master KEK was created, since their private keys were wrapped under the old.
    fn clear_import_state(&self) -> Result<usize, StoreError>;
}

/// The audit trail's storage: blocks of consecutive records as opaque bytes, each under
/// the sequence number of its first record, and the anchor retention leaves behind.
/// Record format and chaining are `crate::audit`'s.
pub trait AuditStore: Send + Sync + 'static {
    /// Stores a block; blocks arrive in sequence order.
    fn append_audit_block(&self, first_seq: u64, block: &[u8]) -> Result<(), StoreError>;

    /// The newest block.
    fn last_audit_block(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;

    /// Up to `limit` blocks whose first sequence number is below `before` (all, with
    /// `None`), newest first.
    fn audit_blocks_before(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// Up to `limit` blocks whose first sequence number is `from` or more, oldest first.
    fn audit_blocks_from(&self, from: u64, limit: usize)
    -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// The sequence number and hash of the last record retention removed, if any.
    fn audit_anchor(&self) -> Result<Option<(u64, [u8; 32])>, StoreError>;

    /// Removes every block whose first sequence number is `upto` or less and makes
    /// (`anchor_seq`, `anchor_hash`) the anchor, in one transaction. Returns how many
    /// blocks it removed.
    fn prune_audit_blocks(
        &self,
        upto: u64,
        anchor_seq: u64,
        anchor_hash: [u8; 32],
    ) -> Result<usize, StoreError>;
}
