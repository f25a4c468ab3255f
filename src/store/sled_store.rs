//! The sled implementation of [`KeyStore`].
//!
//! Trees and their keys (instance ids never contain NUL, so `instance 0x00` is a safe prefix):
//! - `keys`:     instance 0x00 key-uuid                      -> KeyRecord (JSON)
//! - `order`:    instance 0x00 created-ms(BE u64) key-uuid   -> [state, extractable]
//!   (the ListKeys index: creation order then id, filterable without reading records)
//! - `counters`: instance 0x00 state extractable             -> count (BE u64)
//!   (CountKeys sums at most ten counters; updated in the same transaction as records)
//! - `versions`: key-uuid created-ms(BE u64) version-uuid    -> VersionRecord (JSON)
//! - `expiry`:   due-ms(BE u64) instance 0x00 key-uuid       -> ()
//!   (keys with a time-driven transition due: ACTIVE keys with an expiration date,
//!   imported material with a valid-to; for the expiry sweep)
//! - `import_tokens`:     instance                           -> ImportTokenRecord (JSON)
//! - `import_parameters`: key-uuid                           -> ImportParametersRecord (JSON)
//! - `rsa_pool`:          bits(BE u32) pair-uuid             -> RsaKeyPair (JSON)
//! - `meta`:     "schema_version"                            -> BE u32
//! - `audit`, `audit_meta`: the audit trail (see `sled_audit`)

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::Mutex;

use lru::LruCache;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use uuid::Uuid;

use super::{ImportStore, KeyStore, STORE_SCHEMA, StoreError};
use crate::domain::model::{
    ImportParametersRecord, ImportTokenRecord, KeyFilter, KeyRecord, KeyState, Millis,
    VersionRecord,
};
use crate::hsm::RsaKeyPair;

const SCHEMA_KEY: &[u8] = b"schema_version";
/// sled writes what is not yet flushed at least this often (its default, made explicit).
pub const PERIODIC_FLUSH_MS: u64 = 500;

pub struct SledStore {
    db: sled::Db,
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
}

impl SledStore {
    /// Opens (creating if absent) the database and checks its schema version.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(PERIODIC_FLUSH_MS))
            .open()?;
        let meta = db.open_tree("meta")?;
        match meta.get(SCHEMA_KEY)? {
            Some(raw) => {
                let found = u32::from_be_bytes(raw.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt {
                        what: "schema_version".into(),
                        reason: "not 4 bytes".into(),
                    }
                })?);
                if found != STORE_SCHEMA {
                    return Err(StoreError::SchemaMismatch {
                        path: path.display().to_string(),
                        found,
                        expected: STORE_SCHEMA,
                    });
                }
            }
            None => {
                meta.insert(SCHEMA_KEY, &STORE_SCHEMA.to_be_bytes())?;
                db.flush()?;
            }
        }
        Ok(Self {
            keys: db.open_tree("keys")?,
            order: db.open_tree("order")?,
            counters: db.open_tree("counters")?,
            versions: db.open_tree("versions")?,
            expiry: db.open_tree("expiry")?,
            import_tokens: db.open_tree("import_tokens")?,
            import_parameters: db.open_tree("import_parameters")?,
            decoded_keys: DecodedKeys::new(),
            rsa_pool: db.open_tree("rsa_pool")?,
            audit: db.open_tree("audit")?,
            audit_meta: db.open_tree("audit_meta")?,
            db,
        })
    }

    /// Every tree a key's records live in: each key transaction spans them all.
    fn key_trees(&self) -> (&Tree, &Tree, &Tree, &Tree, &Tree) {
        (
            &self.keys,
            &self.order,
            &self.counters,
            &self.versions,
            &self.expiry,
        )
    }

    pub(super) fn audit_tree(&self) -> &Tree {
        &self.audit
    }

    pub(super) fn audit_meta_tree(&self) -> &Tree {
        &self.audit_meta
    }

    /// The handle the group flusher syncs.
    pub fn db(&self) -> sled::Db {
        self.db.clone()
    }
}

fn instance_prefix(instance: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(instance.len() + 1);
    prefix.extend_from_slice(instance.as_bytes());
    prefix.push(0);
    prefix
}

fn key_key(instance: &str, id: Uuid) -> Vec<u8> {
    let mut k = instance_prefix(instance);
    k.extend_from_slice(id.as_bytes());
    k
}

fn order_key(key: &KeyRecord) -> Vec<u8> {
    let mut k = instance_prefix(&key.instance);
    k.extend_from_slice(&(key.created_at as u64).to_be_bytes());
    k.extend_from_slice(key.id.as_bytes());
    k
}

fn order_value(key: &KeyRecord) -> [u8; 2] {
    [key.state.code(), key.extractable as u8]
}

fn counter_key(instance: &str, state: KeyState, extractable: bool) -> Vec<u8> {
    let mut k = instance_prefix(instance);
    k.push(state.code());
    k.push(extractable as u8);
    k
}

/// The expiry-index entry of a key, if it should have one.
fn expiry_key(key: &KeyRecord) -> Option<Vec<u8>> {
    let at = key.next_transition_at()?;
    let mut k = (at.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(&key_key(&key.instance, key.id));
    Some(k)
}

fn version_key(version: &VersionRecord) -> Vec<u8> {
    let mut k = version.key_id.as_bytes().to_vec();
    k.extend_from_slice(&(version.created_at as u64).to_be_bytes());
    k.extend_from_slice(version.id.as_bytes());
    k
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

fn decode<T: DeserializeOwned>(what: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// Decoded key records, each with the exact bytes it was decoded from. A read whose
/// bytes equal the remembered ones skips the JSON decode, the largest cost of a
/// WrapKey/UnwrapKey outside the HSM. sled stays the only source of truth: every read
/// still fetches the stored bytes, so a changed record can never be served stale.
struct DecodedKeys {
    shards: Vec<Mutex<LruCache<Uuid, (sled::IVec, KeyRecord)>>>,
}

impl DecodedKeys {
    const SHARDS: usize = 16;
    const PER_SHARD: usize = 256;

    fn new() -> Self {
        let per_shard = NonZeroUsize::new(Self::PER_SHARD).expect("non-zero");
        Self {
            shards: (0..Self::SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    fn decode(&self, id: Uuid, raw: sled::IVec) -> Result<KeyRecord, StoreError> {
        let shard = &self.shards[id.as_u128() as usize % Self::SHARDS];
        if let Some((bytes, record)) = shard.lock().unwrap_or_else(|e| e.into_inner()).get(&id)
            && *bytes == raw
        {
            return Ok(record.clone());
        }
        let record: KeyRecord = decode("key", &raw)?;
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(id, (raw, record.clone()));
        Ok(record)
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn add_to_counter(counters: &TransactionalTree, key: &KeyRecord, delta: i64) -> TxResult<()> {
    let ck = counter_key(&key.instance, key.state, key.extractable);
    let current = counters
        .get(&ck)?
        .map(|raw| u64::from_be_bytes(raw.as_ref().try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let next = (current as i64 + delta).max(0) as u64;
    counters.insert(ck, &next.to_be_bytes())?;
    Ok(())
}

fn unpack<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Database(e),
    })
}

impl KeyStore for SledStore {
    fn has_keys(&self) -> Result<bool, StoreError> {
        Ok(!self.keys.is_empty())
    }

    fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError> {
        let record = encode(key);
        let version_entry = version.map(|v| (version_key(v), encode(v)));
        let expiry_entry = expiry_key(key);
        unpack(
            self.key_trees()
                .transaction(|(keys, order, counters, versions, expiry)| {
                    keys.insert(key_key(&key.instance, key.id), record.as_slice())?;
                    order.insert(order_key(key), &order_value(key))?;
                    add_to_counter(counters, key, 1)?;
                    if let Some(entry) = &expiry_entry {
                        expiry.insert(entry.as_slice(), &[])?;
                    }
                    if let Some((vk, vv)) = &version_entry {
                        versions.insert(vk.as_slice(), vv.as_slice())?;
                    }
                    Ok(())
                }),
        )
    }

    fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        match self.keys.get(key_key(instance, id))? {
            Some(raw) => self.decoded_keys.decode(id, raw).map(Some),
            None => Ok(None),
        }
    }

    fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError> {
        let expected = encode(previous);
        let added = new_version.map(|v| (version_key(v), encode(v)));
        let record = encode(next);
        // Versions to erase are read outside the transaction; a version added
        // concurrently changes the key record, which makes the compare below fail.
        let mut erased = Vec::new();
        if erase_material {
            for version in self.list_versions(previous.id)? {
                let key = version_key(&version);
                erased.push((
                    key,
                    encode(&VersionRecord {
                        wrapped: None,
                        ..version
                    }),
                ));
            }
        }
        let (old_expiry, new_expiry) = (expiry_key(previous), expiry_key(next));
        unpack(
            self.key_trees()
                .transaction(|(keys, order, counters, versions, expiry)| {
                    let kk = key_key(&previous.instance, previous.id);
                    match keys.get(&kk)? {
                        Some(current) if current.as_ref() == expected.as_slice() => {}
                        _ => return Err(ConflictableTransactionError::Abort(StoreError::Conflict)),
                    }
                    keys.insert(kk, record.as_slice())?;
                    order.insert(order_key(next), &order_value(next))?;
                    add_to_counter(counters, previous, -1)?;
                    add_to_counter(counters, next, 1)?;
                    for (vk, vv) in erased.iter().chain(added.iter()) {
                        versions.insert(vk.as_slice(), vv.as_slice())?;
                    }
                    if old_expiry != new_expiry {
                        if let Some(entry) = &old_expiry {
                            expiry.remove(entry.as_slice())?;
                        }
                        if let Some(entry) = &new_expiry {
                            expiry.insert(entry.as_slice(), &[])?;
                        }
                    }
                    Ok(())
                }),
        )
    }

    fn get_version(
        &self,
        key_id: Uuid,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError> {
        for entry in self.versions.scan_prefix(key_id.as_bytes()) {
            let (k, v) = entry?;
            if k.ends_with(version_id.as_bytes()) {
                return Ok(Some(decode("version", &v)?));
            }
        }
        Ok(None)
    }

    fn list_versions(&self, key_id: Uuid) -> Result<Vec<VersionRecord>, StoreError> {
        self.versions
            .scan_prefix(key_id.as_bytes())
            .rev()
            .map(|entry| decode("version", &entry?.1))
            .collect()
    }

    fn list_keys(
        &self,
        instance: &str,
        filter: &KeyFilter,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        let total = self.count_keys(instance, filter)?;
        let prefix = instance_prefix(instance);
        let mut page = Vec::with_capacity(limit.min(total as usize));
        let mut skipped = 0usize;
        for entry in self.order.scan_prefix(&prefix) {
            if page.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let state = v.first().and_then(|c| KeyState::from_code(*c));
            let extractable = v.get(1).is_some_and(|e| *e == 1);
            let Some(state) = state else {
                return Err(StoreError::Corrupt {
                    what: "order index".into(),
                    reason: "bad state byte".into(),
                });
            };
            if !filter.matches(state, extractable) {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            let id_bytes: [u8; 16] = k[k.len() - 16..].try_into().expect("16 bytes");
            let id = Uuid::from_bytes(id_bytes);
            match self.get_key(instance, id)? {
                Some(record) => page.push(record),
                None => {
                    return Err(StoreError::Corrupt {
                        what: format!("order index entry for {id}"),
                        reason: "no key record".into(),
                    });
                }
            }
        }
        Ok((page, total))
    }

    fn due_for_expiry(&self, now: Millis, limit: usize) -> Result<Vec<(String, Uuid)>, StoreError> {
        let end = ((now.max(0) as u64) + 1).to_be_bytes();
        self.expiry
            .range(..end.as_slice())
            .take(limit)
            .map(|entry| Self::decode_expiry_entry(&entry?.0))
            .collect()
    }

    fn count_keys(&self, instance: &str, filter: &KeyFilter) -> Result<u64, StoreError> {
        let mut total = 0u64;
        for state in KeyState::ALL {
            for extractable in [false, true] {
                if !filter.matches(state, extractable) {
                    continue;
                }
                if let Some(raw) = self
                    .counters
                    .get(counter_key(instance, state, extractable))?
                {
                    total += u64::from_be_bytes(raw.as_ref().try_into().map_err(|_| {
                        StoreError::Corrupt {
                            what: "counter".into(),
                            reason: "not 8 bytes".into(),
                        }
                    })?);
                }
            }
        }
        Ok(total)
    }
}

impl SledStore {
    fn decode_expiry_entry(entry: &[u8]) -> Result<(String, Uuid), StoreError> {
        let corrupt = || StoreError::Corrupt {
            what: "expiry index".into(),
            reason: "malformed entry".into(),
        };
        if entry.len() < 8 + 1 + 16 {
            return Err(corrupt());
        }
        let rest = &entry[8..];
        let (instance, id) = rest.split_at(rest.len() - 16);
        let instance = instance.strip_suffix(&[0]).ok_or_else(corrupt)?;
        let instance = String::from_utf8(instance.to_vec()).map_err(|_| corrupt())?;
        Ok((
            instance,
            Uuid::from_bytes(id.try_into().map_err(|_| corrupt())?),
        ))
    }
}

impl ImportStore for SledStore {
    fn get_import_token(&self, instance: &str) -> Result<Option<ImportTokenRecord>, StoreError> {
        self.import_tokens
            .get(instance.as_bytes())?
            .map(|raw| decode("import token", &raw))
            .transpose()
    }

    fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError> {
        let swapped = self.import_tokens.compare_and_swap(
            instance.as_bytes(),
            previous.map(encode),
            next.map(encode),
        )?;
        swapped.map_err(|_| StoreError::Conflict)
    }

    fn import_tokens(&self) -> Result<Vec<ImportTokenRecord>, StoreError> {
        self.import_tokens
            .iter()
            .map(|entry| decode("import token", &entry?.1))
            .collect()
    }

    fn get_import_parameters(
        &self,
        key_id: Uuid,
    ) -> Result<Option<ImportParametersRecord>, StoreError> {
        self.import_parameters
            .get(key_id.as_bytes())?
            .map(|raw| decode("import parameters", &raw))
            .transpose()
    }

    fn put_import_parameters(&self, parameters: &ImportParametersRecord) -> Result<(), StoreError> {
        self.import_parameters
            .insert(parameters.key_id.as_bytes(), encode(parameters))?;
        Ok(())
    }

    fn remove_import_parameters(&self, key_id: Uuid) -> Result<(), StoreError> {
        self.import_parameters.remove(key_id.as_bytes())?;
        Ok(())
    }

    fn expired_import_parameters(&self, now: Millis) -> Result<Vec<Uuid>, StoreError> {
        let mut expired = Vec::new();
        for entry in self.import_parameters.iter() {
            let record: ImportParametersRecord = decode("import parameters", &entry?.1)?;
            if record.expires_at <= now {
                expired.push(record.key_id);
            }
        }
        Ok(expired)
    }

    fn push_key_pair(&self, pair: &RsaKeyPair) -> Result<(), StoreError> {
        let mut k = pair.bits.to_be_bytes().to_vec();
        k.extend_from_slice(Uuid::new_v4().as_bytes());
        self.rsa_pool.insert(k, encode(pair))?;
        Ok(())
    }

    fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError> {
        loop {
            let Some((k, raw)) = self
                .rsa_pool
                .scan_prefix(bits.to_be_bytes())
                .next()
                .transpose()?
            else {
                return Ok(None);
            };
            // Another caller may take the same entry: only the one whose remove finds it
            // gets it.
            if self.rsa_pool.remove(&k)?.is_some() {
                return decode("RSA key pair", &raw).map(Some);
            }
        }
    }

    fn count_key_pairs(&self, bits: u32) -> Result<usize, StoreError> {
        Ok(self.rsa_pool.scan_prefix(bits.to_be_bytes()).count())
    }

    fn clear_import_state(&self) -> Result<usize, StoreError> {
        let dropped = self.import_tokens.len() + self.import_parameters.len() + self.rsa_pool.len();
        self.import_tokens.clear()?;
        self.import_parameters.clear()?;
        self.rsa_pool.clear()?;
        self.db.flush()?;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{KeyOrigin, RECORD_SCHEMA};

    fn key(instance: &str, created_at: i64, state: KeyState, extractable: bool) -> KeyRecord {
        KeyRecord {
            schema: RECORD_SCHEMA,
            id: Uuid::new_v4(),
            instance: instance.into(),
            name: "k".into(),
            description: String::new(),
            state,
            extractable,
            created_at,
            updated_at: created_at,
            expires_at: None,
            origin: KeyOrigin::Generated,
            size_bits: 256,
            current_version: None,
            imported: false,
            expiration_model: None,
            valid_to: None,
            destroyed_at: None,
            check_value: None,
        }
    }

    #[test]
    fn counters_follow_inserts_and_state_changes_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = key("a", 1, KeyState::Active, false);
        store.insert_key(&a, None).unwrap();
        store
            .insert_key(&key("a", 2, KeyState::Active, true), None)
            .unwrap();
        store
            .insert_key(&key("b", 3, KeyState::Active, true), None)
            .unwrap();
        let all = KeyFilter::default();
        assert_eq!(store.count_keys("a", &all).unwrap(), 2);
        assert_eq!(store.count_keys("b", &all).unwrap(), 1);

        let destroyed = KeyRecord {
            state: KeyState::Destroyed,
            ..a.clone()
        };
        store.replace_key(&a, &destroyed, None, true).unwrap();
        let active = KeyFilter {
            states: vec![KeyState::Active],
            extractable: None,
        };
        assert_eq!(store.count_keys("a", &active).unwrap(), 1);
        assert_eq!(store.count_keys("a", &all).unwrap(), 2);
        // A stale `previous` is refused and changes nothing.
        assert!(matches!(
            store.replace_key(&a, &destroyed, None, false),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.count_keys("a", &active).unwrap(), 1);
    }

    #[test]
    fn reads_follow_every_change_and_stay_within_their_instance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = key("a", 1, KeyState::Active, false);
        store.insert_key(&a, None).unwrap();
        assert_eq!(store.get_key("a", a.id).unwrap(), Some(a.clone()));
        // Read twice (the second from the decoded records), then changed twice: every
        // read returns what is stored now.
        assert_eq!(store.get_key("a", a.id).unwrap(), Some(a.clone()));
        let suspended = KeyRecord {
            state: KeyState::Suspended,
            updated_at: 2,
            ..a.clone()
        };
        store.replace_key(&a, &suspended, None, false).unwrap();
        assert_eq!(store.get_key("a", a.id).unwrap(), Some(suspended.clone()));
        let renamed = KeyRecord {
            name: "renamed".into(),
            ..suspended.clone()
        };
        store
            .replace_key(&suspended, &renamed, None, false)
            .unwrap();
        assert_eq!(store.get_key("a", a.id).unwrap(), Some(renamed));
        assert_eq!(store.get_key("b", a.id).unwrap(), None);
    }

    #[test]
    fn expiry_index_follows_state_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut a = key("a", 1, KeyState::Active, false);
        a.expires_at = Some(100);
        store.insert_key(&a, None).unwrap();
        store
            .insert_key(&key("a", 2, KeyState::Active, false), None)
            .unwrap();
        assert!(store.due_for_expiry(99, 10).unwrap().is_empty());
        assert_eq!(
            store.due_for_expiry(100, 10).unwrap(),
            [("a".to_string(), a.id)]
        );
        let deactivated = KeyRecord {
            state: KeyState::Deactivated,
            ..a.clone()
        };
        store.replace_key(&a, &deactivated, None, false).unwrap();
        assert!(store.due_for_expiry(1000, 10).unwrap().is_empty());
    }

    #[test]
    fn key_pairs_are_taken_once_and_tokens_swap_only_from_what_was_read() {
        use crate::hsm::{WrapFormat, WrappedKey};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let pair = |bits| RsaKeyPair {
            bits,
            public_key: vec![bits as u8],
            private_key: WrappedKey {
                format: WrapFormat::Rfc5649,
                blob: vec![1, 2, 3],
            },
        };
        store.push_key_pair(&pair(2048)).unwrap();
        store.push_key_pair(&pair(4096)).unwrap();
        assert_eq!(store.count_key_pairs(2048).unwrap(), 1);
        assert_eq!(store.take_key_pair(2048).unwrap(), Some(pair(2048)));
        assert_eq!(store.take_key_pair(2048).unwrap(), None);
        assert_eq!(store.count_key_pairs(4096).unwrap(), 1);

        let token = ImportTokenRecord {
            schema: crate::domain::model::RECORD_SCHEMA,
            instance: "a".into(),
            id: Uuid::new_v4(),
            created_at: 1,
            expires_at: 2,
            max_retrievals: 1,
            remaining_retrievals: 1,
            nonce: vec![0; 12],
            key_pair: Some(pair(4096)),
        };
        store.swap_import_token("a", None, Some(&token)).unwrap();
        assert!(matches!(
            store.swap_import_token("a", None, Some(&token)),
            Err(StoreError::Conflict)
        ));
        let used = ImportTokenRecord {
            remaining_retrievals: 0,
            ..token.clone()
        };
        store
            .swap_import_token("a", Some(&token), Some(&used))
            .unwrap();
        assert!(matches!(
            store.swap_import_token("a", Some(&token), None),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.get_import_token("a").unwrap(), Some(used));
        assert_eq!(store.import_tokens().unwrap().len(), 1);
        assert_eq!(store.clear_import_state().unwrap(), 2);
        assert_eq!(store.get_import_token("a").unwrap(), None);
    }

    #[test]
    fn schema_version_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let meta = store.db.open_tree("meta").unwrap();
            meta.insert(SCHEMA_KEY, &99u32.to_be_bytes()).unwrap();
            store.db.flush().unwrap();
        }
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::SchemaMismatch { found: 99, .. })
        ));
    }
}
