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

mod audit;
mod flush;
mod imports;
mod keys;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    trees: Arc<Trees>,
    flusher: GroupFlusher,
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
    /// Held while appending to the audit chain, so reading its end and writing after it
    /// is one step.
    audit_append: Mutex<()>,
}

impl SledStore {
    /// Opens (creating if absent) the database, migrating an older schema and refusing
    /// a newer one.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
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
        Ok(Self {
            flusher: GroupFlusher::start(db),
            trees: Arc::new(trees),
            path: path.to_owned(),
        })
    }

    /// Runs `work` on a blocking thread: the explicit boundary for scans and bulk work.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Trees) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let trees = Arc::clone(&self.trees);
        tokio::task::spawn_blocking(move || work(&trees))
            .await
            .map_err(|e| StoreError::unavailable(BACKEND, e))?
    }

    /// The schema version written in the database.
    pub fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .trees
            .db
            .open_tree("meta")?
            .get(SCHEMA_KEY)?
            .and_then(|raw| raw.as_ref().try_into().ok().map(u32::from_be_bytes)))
    }

    /// Overwrites the schema version: for tests of the refusal of newer schemas.
    #[doc(hidden)]
    pub fn force_schema_version(&self, version: u32) -> Result<(), StoreError> {
        self.trees
            .db
            .open_tree("meta")?
            .insert(SCHEMA_KEY, &version.to_be_bytes())?;
        self.trees.db.flush()?;
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
        self.flusher.flush().await
    }
}

#[async_trait]
impl Store for SledStore {
    async fn ping(&self) -> Result<(), StoreError> {
        // No connection to lose; a failing disk shows in the group flush.
        Ok(())
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
