//! Keys, versions, counters and the expiry index in sled (layout in the module above).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::{IVec, Transactional, Tree};
use async_trait::async_trait;
use lru::LruCache;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::codec;
use super::{SledStore, Trees};
use crate::domain::model::{KeyFilter, KeyRecord, KeyState, Millis, VersionRecord};
use crate::store::{KeyStore, PageStart, Revision, StoreError};

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

/// A `versions` entry: its tree key holds the key id, creation time and version id.
pub(super) fn decode_version_entry(k: &[u8], v: &[u8]) -> Result<VersionRecord, StoreError> {
    if k.len() != 16 + 8 + 16 {
        return Err(StoreError::corrupt("versions index", "malformed entry"));
    }
    let key_id = Uuid::from_bytes(k[..16].try_into().expect("16 bytes"));
    let created_at = u64::from_be_bytes(k[16..24].try_into().expect("8 bytes")) as Millis;
    let id = Uuid::from_bytes(k[24..].try_into().expect("16 bytes"));
    codec::decode_version(key_id, created_at, id, v)
}

/// A `keys` tree key: the instance and the key id.
pub(super) fn parse_key_key(k: &[u8]) -> Result<(String, Uuid), StoreError> {
    let corrupt = || StoreError::corrupt("keys index", "malformed entry");
    if k.len() < 1 + 16 {
        return Err(corrupt());
    }
    let (instance, id) = k.split_at(k.len() - 16);
    let instance = instance.strip_suffix(&[0]).ok_or_else(corrupt)?;
    let instance = String::from_utf8(instance.to_vec()).map_err(|_| corrupt())?;
    Ok((instance, Uuid::from_bytes(id.try_into().expect("16 bytes"))))
}

pub(super) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

pub(super) fn decode<T: DeserializeOwned>(what: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::corrupt(what, e.to_string()))
}

/// Decoded key records, each with the exact bytes it was decoded from. A read whose
/// bytes equal the remembered ones skips the decode (with JSON records it was the
/// largest cost of a WrapKey/UnwrapKey outside the HSM); at most 4,096 records. sled stays the only source of truth: every read
/// still fetches the stored bytes, so a changed record can never be served stale.
///
/// The bytes are a copy: an `IVec` from a read may share its buffer with the whole
/// sled node it came from, and holding it would keep that node in memory after sled's
/// own cache let it go.
pub(super) struct DecodedKeys {
    shards: Vec<Mutex<LruCache<Uuid, Decoded>>>,
}

/// A record's stored bytes and what they decode to.
type Decoded = (Box<[u8]>, KeyRecord);

impl DecodedKeys {
    const SHARDS: usize = 16;
    const PER_SHARD: usize = 256;

    pub(super) fn new() -> Self {
        let per_shard = NonZeroUsize::new(Self::PER_SHARD).expect("non-zero");
        Self {
            shards: (0..Self::SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    fn decode(&self, instance: &str, id: Uuid, raw: IVec) -> Result<KeyRecord, StoreError> {
        let shard = &self.shards[id.as_u128() as usize % Self::SHARDS];
        if let Some((bytes, record)) = shard.lock().unwrap_or_else(|e| e.into_inner()).get(&id)
            && **bytes == *raw
        {
            return Ok(record.clone());
        }
        let record = decode_key_value(instance, id, &raw)?;
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(id, (raw.as_ref().into(), record.clone()));
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
        TransactionError::Storage(e) => e.into(),
    })
}

/// A key record's stored value: its revision, then the record ([`codec`]; JSON in
/// schema 2).
pub(super) fn encode_key_value(revision: Revision, record: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + record.len());
    value.extend_from_slice(&revision.to_be_bytes());
    value.extend_from_slice(record);
    value
}

fn stored_revision(id: Uuid, raw: &[u8]) -> Result<Revision, StoreError> {
    raw.get(..8)
        .map(|r| Revision::from_be_bytes(r.try_into().expect("8 bytes")))
        .ok_or_else(|| StoreError::corrupt(format!("key {id}"), "shorter than its revision"))
}

pub(super) fn decode_key_value(
    instance: &str,
    id: Uuid,
    raw: &[u8],
) -> Result<KeyRecord, StoreError> {
    let revision = stored_revision(id, raw)?;
    let mut record = codec::decode_key(instance, id, &raw[8..])?;
    record.revision = revision;
    Ok(record)
}

pub(super) fn key_value(key: &KeyRecord) -> Vec<u8> {
    encode_key_value(key.revision, &codec::encode_key(key))
}

impl Trees {
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

    fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError> {
        let record = key_value(&KeyRecord {
            revision: 0,
            ..key.clone()
        });
        let version_entry = version.map(|v| (version_key(v), codec::encode_version(v)));
        let expiry_entry = expiry_key(key);
        unpack(
            self.key_trees()
                .transaction(|(keys, order, counters, versions, expiry)| {
                    let kk = key_key(&key.instance, key.id);
                    if keys.get(&kk)?.is_some() {
                        return Err(ConflictableTransactionError::Abort(StoreError::Conflict));
                    }
                    keys.insert(kk, record.as_slice())?;
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
            Some(raw) => self.decoded_keys.decode(instance, id, raw).map(Some),
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
        if next.revision != previous.revision + 1 {
            return Err(StoreError::Conflict);
        }
        let added = new_version.map(|v| (version_key(v), codec::encode_version(v)));
        let record = key_value(next);
        // Versions to erase are read outside the transaction; a version added
        // concurrently changes the key's revision, which makes the check below fail.
        let mut erased = Vec::new();
        if erase_material {
            for version in self.list_versions(previous.id)? {
                let key = version_key(&version);
                erased.push((
                    key,
                    codec::encode_version(&VersionRecord {
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
                        Some(current)
                            if stored_revision(previous.id, &current)
                                .map_err(ConflictableTransactionError::Abort)?
                                == previous.revision => {}
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
                return Ok(Some(decode_version_entry(&k, &v)?));
            }
        }
        Ok(None)
    }

    pub(super) fn list_versions(&self, key_id: Uuid) -> Result<Vec<VersionRecord>, StoreError> {
        self.versions
            .scan_prefix(key_id.as_bytes())
            .rev()
            .map(|entry| {
                let (k, v) = entry?;
                decode_version_entry(&k, &v)
            })
            .collect()
    }

    fn list_versions_page(
        &self,
        key_id: Uuid,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError> {
        let prefix = key_id.as_bytes();
        let mut total = 0u64;
        for entry in self.versions.scan_prefix(prefix) {
            entry?;
            total += 1;
        }
        let decode = |entry: ::sled::Result<(IVec, IVec)>| {
            let (k, v) = entry?;
            decode_version_entry(&k, &v)
        };
        let page = match start {
            PageStart::Offset(offset) => self
                .versions
                .scan_prefix(prefix)
                .rev()
                .skip(offset)
                .take(limit)
                .map(decode)
                .collect::<Result<_, _>>()?,
            PageStart::After(position) => {
                let mut before = prefix.to_vec();
                before.extend_from_slice(&(position.created_at as u64).to_be_bytes());
                before.extend_from_slice(position.id.as_bytes());
                self.versions
                    .range(prefix.to_vec()..before)
                    .rev()
                    .take(limit)
                    .map(decode)
                    .collect::<Result<_, _>>()?
            }
        };
        Ok((page, total))
    }

    fn list_keys(
        &self,
        instance: &str,
        filter: &KeyFilter,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        let total = self.count_keys(instance, filter)?;
        let prefix = instance_prefix(instance);
        let mut page = Vec::with_capacity(limit.min(total as usize));
        let mut skipped = 0usize;
        let (offset, entries) = match start {
            PageStart::Offset(offset) => (offset, self.order.scan_prefix(&prefix)),
            PageStart::After(after) => {
                let mut from = prefix.clone();
                from.extend_from_slice(&(after.created_at.max(0) as u64).to_be_bytes());
                from.extend_from_slice(after.id.as_bytes());
                // Exclusive of the position itself: the key after it, byte-wise.
                from.push(0);
                let mut end = prefix.clone();
                *end.last_mut().expect("the prefix ends in 0x00") = 1;
                (0, self.order.range(from..end))
            }
        };
        for entry in entries {
            if page.len() >= limit {
                break;
            }
            let (k, v) = entry?;
            let state = v.first().and_then(|c| KeyState::from_code(*c));
            let extractable = v.get(1).is_some_and(|e| *e == 1);
            let Some(state) = state else {
                return Err(StoreError::corrupt("order index", "bad state byte"));
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
                    return Err(StoreError::corrupt(
                        format!("order index entry for {id}"),
                        "no key record",
                    ));
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
            .map(|entry| decode_expiry_entry(&entry?.0))
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
                    total += u64::from_be_bytes(
                        raw.as_ref()
                            .try_into()
                            .map_err(|_| StoreError::corrupt("counter", "not 8 bytes"))?,
                    );
                }
            }
        }
        Ok(total)
    }
}

fn decode_expiry_entry(entry: &[u8]) -> Result<(String, Uuid), StoreError> {
    let corrupt = || StoreError::corrupt("expiry index", "malformed entry");
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

/// Point reads and single-key transactions inline; scans on a blocking thread.
#[async_trait]
impl KeyStore for SledStore {
    async fn has_keys(&self) -> Result<bool, StoreError> {
        Ok(!self.trees()?.keys.is_empty())
    }

    async fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError> {
        self.write(|trees| trees.insert_key(key, version)).await
    }

    async fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.trees()?.get_key(instance, id)
    }

    async fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError> {
        self.write(|trees| trees.replace_key(previous, next, new_version, erase_material))
            .await
    }

    async fn get_version(
        &self,
        key_id: Uuid,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.trees()?.get_version(key_id, version_id)
    }

    async fn list_versions(&self, key_id: Uuid) -> Result<Vec<VersionRecord>, StoreError> {
        self.trees()?.list_versions(key_id)
    }

    async fn list_versions_page(
        &self,
        key_id: Uuid,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError> {
        self.blocking(move |trees| trees.list_versions_page(key_id, start, limit))
            .await
    }

    async fn list_keys(
        &self,
        instance: &str,
        filter: &KeyFilter,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<KeyRecord>, u64), StoreError> {
        let (instance, filter) = (instance.to_owned(), filter.clone());
        self.blocking(move |trees| trees.list_keys(&instance, &filter, start, limit))
            .await
    }

    async fn count_keys(&self, instance: &str, filter: &KeyFilter) -> Result<u64, StoreError> {
        self.trees()?.count_keys(instance, filter)
    }

    async fn due_for_expiry(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(String, Uuid)>, StoreError> {
        self.blocking(move |trees| trees.due_for_expiry(now, limit))
            .await
    }
}
