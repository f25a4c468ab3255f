//! The sled backend: the embedded default, one process per data directory (sled holds
//! an exclusive lock on it).
//!
//! Trees and their keys (instance ids never contain NUL, so `instance 0x00` is a safe
//! prefix):
//! - `keys`:     instance 0x00 key-uuid                      -> revision (BE u64) || KeyRecord (JSON)
//! - `order`:    instance 0x00 created-ms(BE u64) key-uuid   -> [state, extractable]
//!   (the ListKeys index: creation order then id, filterable without reading records)
//! - `counters`: instance 0x00 state extractable             -> count (BE u64)
//!   (CountKeys sums at most ten counters; updated in the same transaction as records)
//! - `versions`: key-uuid created-ms(BE u64) version-uuid    -> VersionRecord (JSON)
//! - `expiry`:   due-ms(BE u64) instance 0x00 key-uuid       -> ()
//!   (keys with a time-driven transition due, for the expiry sweep)
//! - `import_tokens`:     instance      -> revision (BE u64) || token id || ImportTokenRecord (JSON)
//! - `import_parameters`: key-uuid      -> ImportParametersRecord (JSON)
//! - `rsa_pool`:          bits(BE u32) pair-uuid             -> RsaKeyPair (JSON)
//! - `meta`:     "schema_version"                            -> BE u32
//! - `audit`, `audit_meta`: the audit trail (see [`audit`])
//!
//! Schema history: 1 had no revisions (compare-and-swap compared whole records); 2
//! prefixes key and import-token records with their revision (and the token's id). A
//! version-1 database is rewritten in place when it opens.
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
//! monitor's probe) finds the poisoned database, waits for operations in flight to let
//! go of it, closes it and opens it again, retrying until the fault has cleared.
//! Meanwhile every operation answers UNAVAILABLE. What was flushed before the fault is
//! there after it; writes that were never acknowledged may be gone.

mod audit;
mod flush;
mod imports;
mod keys;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ::sled::Tree;
use async_trait::async_trait;

use super::{Durability, STORE_SCHEMA, Store, StoreError};
use flush::GroupFlusher;
use keys::DecodedKeys;

const SCHEMA_KEY: &[u8] = b"schema_version";
/// sled writes what is not yet flushed at least this often (its default, made explicit).
pub const PERIODIC_FLUSH_MS: u64 = 500;
const BACKEND: &str = "sled";

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
}

/// Every tree, shared with blocking threads.
pub(super) struct Trees {
    db: ::sled::Db,
    keys: Tree,
    order: Tree,
    counters: Tree,
    versions: Tree,
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
}

impl SledStore {
    /// Opens (creating if absent) the database, migrating an older schema and refusing
    /// a newer one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            current: RwLock::new(Some(Arc::new(Self::open_trees(path)?))),
            retired: Mutex::new(None),
            path: path.to_owned(),
        })
    }

    fn open_trees(path: &Path) -> Result<Trees, StoreError> {
        let db = ::sled::Config::new()
            .path(path)
            .flush_every_ms(Some(PERIODIC_FLUSH_MS))
            .open()?;
        let meta = db.open_tree("meta")?;
        let trees = Trees {
            keys: db.open_tree("keys")?,
            order: db.open_tree("order")?,
            counters: db.open_tree("counters")?,
            versions: db.open_tree("versions")?,
            expiry: db.open_tree("expiry")?,
            import_tokens: db.open_tree("import_tokens")?,
            import_parameters: db.open_tree("import_parameters")?,
            rsa_pool: db.open_tree("rsa_pool")?,
            audit: db.open_tree("audit")?,
            audit_meta: db.open_tree("audit_meta")?,
            decoded_keys: DecodedKeys::new(),
            flusher: GroupFlusher::start(db.clone()),
            audit_append: Mutex::new(()),
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
            tracing::info!(path = %path.display(), from = found, to = STORE_SCHEMA, "migrated the store's schema");
        }
        if found != STORE_SCHEMA || meta.get(SCHEMA_KEY)?.is_none() {
            meta.insert(SCHEMA_KEY, &STORE_SCHEMA.to_be_bytes())?;
        }
        db.flush()?;
        Ok(trees)
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
                        trees = Arc::new(Self::open_trees(&self.path)?);
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
        let trees = Self::open_trees(&self.path)?;
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

impl Trees {
    /// Schema 1 -> 2: revision 0 (and, for tokens, the id) in front of each record. A
    /// record already prefixed (a migration interrupted after it) is left alone.
    fn migrate_to_revisions(&self) -> Result<(), StoreError> {
        for entry in self.keys.iter() {
            let (k, v) = entry?;
            if v.first() == Some(&b'{') {
                self.keys.insert(k, keys::encode_key_value(0, &v))?;
            }
        }
        for entry in self.import_tokens.iter() {
            let (k, v) = entry?;
            if v.first() == Some(&b'{') {
                let token: crate::domain::model::ImportTokenRecord =
                    keys::decode("import token", &v)?;
                self.import_tokens
                    .insert(k, imports::encode_token(&token))?;
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
            Some(trees) => !trees.flusher.failing() || trees.db.flush().is_ok(),
            None => false,
        };
        if healthy {
            return Ok(());
        }
        let store = self.path.clone();
        let outcome = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.reopen())
            }
            _ => self.reopen(),
        };
        match &outcome {
            Ok(()) => {
                tracing::warn!(path = %store.display(), "the store reopened after a write failure")
            }
            Err(error) => tracing::debug!(error = %error, "reopening the store"),
        }
        outcome
    }

    fn describe(&self) -> String {
        format!("sled at {}", self.path.display())
    }
}

/// Whole-store reads for `kms store migrate`: every key and every pooled pair, in key
/// order. Run on a stopped server's database.
impl SledStore {
    pub async fn all_keys(&self) -> Result<Vec<crate::domain::model::KeyRecord>, StoreError> {
        self.blocking(|trees| {
            trees
                .keys
                .iter()
                .map(|entry| keys::decode_key_value(&entry?.1))
                .collect()
        })
        .await
    }

    pub async fn all_key_pairs(&self) -> Result<Vec<crate::hsm::RsaKeyPair>, StoreError> {
        self.blocking(|trees| {
            trees
                .rsa_pool
                .iter()
                .map(|entry| keys::decode("RSA key pair", &entry?.1))
                .collect()
        })
        .await
    }
}
