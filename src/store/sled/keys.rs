//! Keys, versions, counters and the expiry index in sled (layout in the module above).

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use std::ops::Bound;

use ::sled::{IVec, Transactional, Tree};
use async_trait::async_trait;
use uuid::Uuid;

use super::{SCHEMA_4_VERSIONS, SledStore, Trees};
use crate::domain::model::{KeyFilter, KeyRecord, Millis, VersionRecord};
use crate::store::kv::{
    carried_version, counter_key, counter_keys, created_value, decode_counter, decode_expiry_entry,
    decode_key_value, decode_key_versions_entry, expiry_key, instance_prefix, is_before, key_key,
    key_version_entry, new_key_value, newest_first, next_counter, next_record, order_key,
    order_key_at, order_key_created, parse_key_key, parse_order_key, record_place, stored_revision,
    under_key_created, versions_prefix,
};
use crate::store::{KeyStore, PageStart, StoreError};

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn add_to_counter(counters: &TransactionalTree, key: &KeyRecord, delta: i64) -> TxResult<()> {
    let ck = counter_key(&key.instance, key.state, key.extractable);
    let next = next_counter(counters.get(&ck)?.as_deref(), delta);
    counters.insert(ck, &next)?;
    Ok(())
}

fn unpack<T>(result: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    })
}

impl Trees {
    /// Every tree a created key writes to: its creation's transaction spans them all.
    /// (Its first version rides in its record, so `key_versions` is not among them.)
    fn key_trees(&self) -> (&Tree, &Tree, &Tree, &Tree) {
        (&self.keys, &self.order, &self.counters, &self.expiry)
    }

    fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError> {
        let record = new_key_value(key, version)?;
        let expiry_entry = expiry_key(key);
        unpack(
            self.key_trees()
                .transaction(|(keys, order, counters, expiry)| {
                    let kk = key_key(&key.instance, key.id);
                    if keys.get(&kk)?.is_some() {
                        return Err(ConflictableTransactionError::Abort(StoreError::Conflict));
                    }
                    keys.insert(kk, &created_value(key))?;
                    order.insert(order_key(key), record.as_slice())?;
                    add_to_counter(counters, key, 1)?;
                    if let Some(entry) = &expiry_entry {
                        expiry.insert(entry.as_slice(), &[])?;
                    }
                    Ok(())
                }),
        )
    }

    /// Schema 4 to 5: copies every version from `versions` (keyed by key id) into
    /// `key_versions` (keyed by its key's creation time, see
    /// [`under_key_created`]), walking keys in listing order, a batch of keys at a
    /// time, then drops the old tree. Rerun from the start after an interruption, it
    /// writes the same entries again. A version whose key has no record is unreachable
    /// and is not carried over.
    pub(super) fn move_versions_to_creation_order(&self) -> Result<u64, StoreError> {
        const KEYS_PER_BATCH: u64 = 10_000;
        let old = self.db.open_tree(SCHEMA_4_VERSIONS)?;
        let mut moved = 0u64;
        let mut batch = ::sled::Batch::default();
        for entry in self.order.iter() {
            let (k, _) = entry?;
            let (_, id) = parse_order_key(&k)?;
            let created = order_key_created(&k)?;
            for version in old.scan_prefix(id.as_bytes()) {
                let (vk, vv) = version?;
                batch.insert(under_key_created(created, &vk), vv);
            }
            moved += 1;
            if moved.is_multiple_of(KEYS_PER_BATCH) {
                self.key_versions.apply_batch(std::mem::take(&mut batch))?;
                if moved.is_multiple_of(100_000) {
                    tracing::info!(keys = moved, "moving key versions into creation order");
                }
            }
        }
        self.key_versions.apply_batch(batch)?;
        self.db.flush()?;
        drop(old);
        self.db.drop_tree(SCHEMA_4_VERSIONS)?;
        Ok(moved)
    }

    /// Schema 5 to 6: moves every key's record from `keys` (by id) to `order`, under
    /// its place in listing order (replacing the state and extractable flag kept
    /// there), and leaves in `keys` the creation time that finds it. A batch of keys at
    /// a time, `order`'s half written first: sled recovers a prefix of what it was
    /// given, so after a crash a `keys` entry holding a creation time (8 bytes; a
    /// record is longer) was moved, and one still holding its record is moved again.
    pub(super) fn move_records_into_order(&self) -> Result<u64, StoreError> {
        const KEYS_PER_BATCH: usize = 10_000;
        let mut after: Option<IVec> = None;
        let mut moved = 0u64;
        loop {
            let entries = match after.take() {
                None => self.keys.iter(),
                Some(after) => self.keys.range((Bound::Excluded(after), Bound::Unbounded)),
            };
            let (mut records, mut places) = (::sled::Batch::default(), ::sled::Batch::default());
            for entry in entries.take(KEYS_PER_BATCH) {
                let (k, v) = entry?;
                if v.len() > 8 {
                    let (instance, id) = parse_key_key(&k)?;
                    let record = decode_key_value(&instance, id, &v)?;
                    records.insert(order_key(&record), v);
                    places.insert(k.clone(), &created_value(&record));
                    moved += 1;
                    if moved.is_multiple_of(100_000) {
                        tracing::info!(keys = moved, "moving key records into listing order");
                    }
                }
                after = Some(k);
            }
            if after.is_none() {
                break;
            }
            self.order.apply_batch(records)?;
            self.keys.apply_batch(places)?;
        }
        self.db.flush()?;
        Ok(moved)
    }

    /// Two point reads: `keys` says when the key was created, `order` holds its record
    /// there.
    fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let Some(created) = self.keys.get(key_key(instance, id))? else {
            return Ok(None);
        };
        match self.order.get(record_place(instance, id, &created)?)? {
            Some(raw) => self.decoded_keys.decode(instance, id, &raw).map(Some),
            None => Err(StoreError::corrupt(
                format!("key {id}"),
                "indexed but no record",
            )),
        }
    }

    fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError> {
        crate::store::check_key_revision(previous, next)?;
        // A record's place follows its creation time, which no change moves.
        if (next.instance.as_str(), next.created_at, next.id)
            != (previous.instance.as_str(), previous.created_at, previous.id)
        {
            return Err(StoreError::Conflict);
        }
        let at = order_key(previous);
        // Versions to erase are read outside the transaction; a version added
        // concurrently changes the key's revision, which makes the check below fail.
        let mut erased = Vec::new();
        if erase_material {
            for version in self.stored_versions(previous).rev() {
                let erased_version = VersionRecord {
                    wrapped: None,
                    ..version?
                };
                erased.push(key_version_entry(previous, &erased_version)?);
            }
        }
        let (old_expiry, new_expiry) = (expiry_key(previous), expiry_key(next));
        unpack(
            (
                &self.order,
                &self.counters,
                &self.key_versions,
                &self.expiry,
            )
                .transaction(|(order, counters, versions, expiry)| {
                    let abort = ConflictableTransactionError::Abort;
                    let current = match order.get(&at)? {
                        Some(current)
                            if stored_revision(previous.id, &current).map_err(abort)?
                                == previous.revision =>
                        {
                            current
                        }
                        _ => return Err(abort(StoreError::Conflict)),
                    };
                    let record = next_record(previous, &current, next, new_version, erase_material)
                        .map_err(abort)?;
                    order.insert(at.as_slice(), record.value)?;
                    add_to_counter(counters, previous, -1)?;
                    add_to_counter(counters, next, 1)?;
                    let added = record
                        .to_versions
                        .map(|v| key_version_entry(previous, &v))
                        .transpose()
                        .map_err(abort)?;
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

    /// The version the key's record carries (none if it has no record).
    fn carried_of(&self, key: &KeyRecord) -> Result<Option<VersionRecord>, StoreError> {
        match self.order.get(order_key(key))? {
            Some(raw) => carried_version(key, &raw),
            None => Ok(None),
        }
    }

    /// The key's `key_versions` entries, oldest first.
    fn stored_versions(
        &self,
        key: &KeyRecord,
    ) -> impl DoubleEndedIterator<Item = Result<VersionRecord, StoreError>> + use<> {
        self.key_versions
            .scan_prefix(versions_prefix(key))
            .map(|entry| {
                let (k, v) = entry?;
                decode_key_versions_entry(&k, &v)
            })
    }

    fn get_version(
        &self,
        key: &KeyRecord,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError> {
        if let Some(carried) = self.carried_of(key)?
            && carried.id == version_id
        {
            return Ok(Some(carried));
        }
        for entry in self.key_versions.scan_prefix(versions_prefix(key)) {
            let (k, v) = entry?;
            if k.ends_with(version_id.as_bytes()) {
                return Ok(Some(decode_key_versions_entry(&k, &v)?));
            }
        }
        Ok(None)
    }

    /// A key's versions, newest first; `carried` is the version its record carries.
    pub(super) fn versions_with(
        &self,
        key: &KeyRecord,
        carried: Option<VersionRecord>,
    ) -> Result<Vec<VersionRecord>, StoreError> {
        newest_first(self.stored_versions(key).rev(), carried).collect()
    }

    /// A key's versions, newest first.
    fn list_versions(&self, key: &KeyRecord) -> Result<Vec<VersionRecord>, StoreError> {
        self.versions_with(key, self.carried_of(key)?)
    }

    fn list_versions_page(
        &self,
        key: &KeyRecord,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError> {
        let prefix = versions_prefix(key);
        let carried = self.carried_of(key)?;
        let mut total = u64::from(carried.is_some());
        for entry in self.key_versions.scan_prefix(&prefix) {
            entry?;
            total += 1;
        }
        let decode = |entry: ::sled::Result<(IVec, IVec)>| {
            let (k, v) = entry?;
            decode_key_versions_entry(&k, &v)
        };
        let page = match start {
            PageStart::Offset(offset) => newest_first(self.stored_versions(key).rev(), carried)
                .skip(offset)
                .take(limit)
                .collect::<Result<_, _>>()?,
            PageStart::After(position) => {
                let mut before = prefix.clone();
                before.extend_from_slice(&(position.created_at as u64).to_be_bytes());
                before.extend_from_slice(position.id.as_bytes());
                let carried = carried.filter(|carried| is_before(carried, &position));
                newest_first(
                    self.key_versions.range(prefix..before).rev().map(decode),
                    carried,
                )
                .take(limit)
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
                let mut from = order_key_at(instance, after.created_at.max(0), after.id);
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
            let (_, id) = parse_order_key(&k)?;
            let record = self.decoded_keys.decode(instance, id, &v)?;
            if !filter.matches(record.state, record.extractable) {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            page.push(record);
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
        let mut total = 0;
        for ck in counter_keys(instance, filter) {
            if let Some(raw) = self.counters.get(ck)? {
                total += decode_counter(&raw)?;
            }
        }
        Ok(total)
    }
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
        key: &KeyRecord,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.trees()?.get_version(key, version_id)
    }

    async fn list_versions(&self, key: &KeyRecord) -> Result<Vec<VersionRecord>, StoreError> {
        self.trees()?.list_versions(key)
    }

    async fn list_versions_page(
        &self,
        key: &KeyRecord,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError> {
        let key = key.clone();
        self.blocking(move |trees| trees.list_versions_page(&key, start, limit))
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
