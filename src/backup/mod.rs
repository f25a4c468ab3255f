//! Backup files: a store's consistent snapshot, with what a restore needs to check
//! before it writes anything.
//!
//! Format (version [`FORMAT_VERSION`]): the line `kms-backup 1`, then one zstd stream
//! (with its checksum) of JSON lines: first the manifest ([`Manifest`]: schema, backend,
//! time, KEK label and KEK check value), then one line per store record
//! ([`crate::store::StoreItem`]), then the trailer ([`Trailer`]: how many records of each
//! kind, and the SHA-256 of every line before it). A file cut short or changed fails the
//! trailer check; a restore reads the whole file once to check it before it loads.
//!
//! What a backup holds: key metadata and KEK-wrapped blobs, import state, the audit
//! trail. It is useless without the HSM's master KEK, which never leaves the token: back
//! the token up with the HSM's own means (SoftHSM: its token directory).

mod file;

pub use file::{BackupReader, BackupWriter, ReadError};

use serde::{Deserialize, Serialize};

use crate::hsm::KekCheck;
use crate::store::{ItemCounts, StoreItem};

/// The first line of every backup file.
pub const MAGIC: &[u8] = b"kms-backup 1\n";
pub const FORMAT_VERSION: u32 = 1;

/// What a backup says about itself before its records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The store schema of the server that took it.
    pub schema: u32,
    /// `sled` or `postgres`.
    pub backend: String,
    /// When the snapshot was taken, Unix milliseconds.
    pub taken_at: i64,
    /// The build that took it.
    pub service_version: String,
    /// The master KEK's label on the token, and its check value: a restore computes the
    /// value on its own token and refuses on a mismatch.
    pub kek_label: String,
    pub kek_check: KekCheck,
}

/// What a backup says about itself after its records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub counts: ItemCounts,
    /// Hex SHA-256 of every line before this one.
    pub sha256: String,
}

/// One line of the compressed stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Manifest(Manifest),
    Record(StoreItem),
    Trailer(Trailer),
}
