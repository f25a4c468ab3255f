//! Keys, versions, counters and the expiry index in redb, read from a snapshot, changed
//! in the writer's transaction.
//!
//! A key's record lives in `order`, under its place in listing order (instance,
//! creation time, id), and `keys` only maps instance and id to the creation time (as
//! in sled's trees since its schema 6). Key ids are random (v4), so records kept by id spread a page of
//! ListKeys over as many pages of the file as it has keys: at a million keys a deep
//! page cost 1.7 ms of server CPU against 0.5 for the first, reading cold pages. Kept
//! in listing order, a page is one range scan, wherever it starts; GetKey is two
//! lookups instead of one, and new records are appended rather than spread.
//!
//! Versions follow the same rule: `key_versions` keys them under their key's creation
//! time and id. Keyed by key id alone (schema 3) they were a second tree written at a
//! random place per created key: at a million keys durable CreateKey ran at 75% of its
//! rate on an empty store; in creation order it is one tree of random inserts (`keys`)
//! instead of two, and 79% (86% once the audit append became durable itself; README,
//! "At size"). Version reads get the key's record, which says where they are. Since
//! schema 8 the record carries the key's first version itself ([`next_record`]), so a
//! created key writes no version entry at all; a version read looks at the record's
//! first.

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};
use uuid::Uuid;

use super::{
    Bytes, COUNTERS, EXPIRY, KEYS, ORDER, Open, RedbStore, SCHEMA_3_VERSIONS, VERSIONS, prefix_end,
    with_prefix,
};
use crate::domain::model::{KeyFilter, KeyRecord, Millis, VersionRecord};
use crate::store::kv::{
    carried_version, counter_key, counter_keys, created_value, decode_counter, decode_expiry_entry,
    decode_key_versions_entry, expiry_key, instance_prefix, is_before, key_key, key_version_entry,
    new_key_value, newest_first, next_counter, next_record, order_key, order_key_at,
    order_key_created, parse_order_key, record_place, stored_revision, under_key_created,
    versions_prefix,
};
use crate::store::{KeyStore, PageStart, StoreError};

fn add_to_counter(txn: &WriteTransaction, key: &KeyRecord, delta: i64) -> Result<(), StoreError> {
    let mut counters = txn.open_table(COUNTERS)?;
    let ck = counter_key(&key.instance, key.state, key.extractable);
    let current = counters.get(ck.as_slice())?;
    let next = next_counter(current.as_ref().map(|raw| raw.value()), delta);
    drop(current);
    counters.insert(ck.as_slice(), next.as_slice())?;
    Ok(())
}

/// Where a key's record is: its `order` key, from the creation time `keys` holds.
fn record_key(
    keys: &impl ReadableTable<Bytes, Bytes>,
    instance: &str,
    id: Uuid,
) -> Result<Option<Vec<u8>>, StoreError> {
    match keys.get(key_key(instance, id).as_slice())? {
        Some(created) => record_place(instance, id, created.value()).map(Some),
        None => Ok(None),
    }
}

fn get_key(
    open: &Open,
    keys: &impl ReadableTable<Bytes, Bytes>,
    order: &impl ReadableTable<Bytes, Bytes>,
    instance: &str,
    id: Uuid,
) -> Result<Option<KeyRecord>, StoreError> {
    let Some(at) = record_key(keys, instance, id)? else {
        return Ok(None);
    };
    match order.get(at.as_slice())? {
        Some(raw) => open
            .decoded_keys
            .decode(instance, id, raw.value())
            .map(Some),
        None => Err(StoreError::corrupt(
            format!("key {id}"),
            "indexed but no record",
        )),
    }
}

fn put_version(
    versions: &mut redb::Table<Bytes, Bytes>,
    key: &KeyRecord,
    version: &VersionRecord,
) -> Result<(), StoreError> {
    let (k, v) = key_version_entry(key, version)?;
    versions.insert(k.as_slice(), v.as_slice())?;
    Ok(())
}

/// A key's `key_versions` entries, oldest first.
fn stored_versions(
    versions: &impl ReadableTable<Bytes, Bytes>,
    key: &KeyRecord,
) -> Result<Vec<VersionRecord>, StoreError> {
    with_prefix(versions, &versions_prefix(key))?
        .map(|entry| {
            let (k, v) = entry?;
            decode_key_versions_entry(k.value(), v.value())
        })
        .collect()
}

/// A key's versions, oldest first; `carried` is the version its record carries.
pub(super) fn versions_of(
    versions: &impl ReadableTable<Bytes, Bytes>,
    key: &KeyRecord,
    carried: Option<VersionRecord>,
) -> Result<Vec<VersionRecord>, StoreError> {
    let stored = stored_versions(versions, key)?;
    let mut all: Vec<_> =
        newest_first(stored.into_iter().rev().map(Ok), carried).collect::<Result<_, _>>()?;
    all.reverse();
    Ok(all)
}

/// The version the key's record carries (none if it has no record).
fn carried_of(
    order: &impl ReadableTable<Bytes, Bytes>,
    key: &KeyRecord,
) -> Result<Option<VersionRecord>, StoreError> {
    match order.get(order_key(key).as_slice())? {
        Some(raw) => carried_version(key, raw.value()),
        None => Ok(None),
    }
}

/// Schema 3 to 4: copies every version from the table keyed by key id into the one
/// keyed by creation time, a chunk of keys per transaction, then drops the old table.
/// Rerun from the start after an interruption, it writes the same entries again.
pub(super) fn move_versions_to_creation_order(db: &redb::Database) -> Result<u64, StoreError> {
    const KEYS_PER_TRANSACTION: usize = 10_000;
    let mut after: Option<Vec<u8>> = None;
    let mut moved = 0u64;
    loop {
        let mut txn = db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        let mut last = None;
        {
            let order = txn.open_table(ORDER)?;
            let old = txn.open_table(SCHEMA_3_VERSIONS)?;
            let mut new = txn.open_table(VERSIONS)?;
            let entries = match &after {
                None => order.range::<&[u8]>(..)?,
                Some(after) => order.range::<&[u8]>((
                    std::ops::Bound::Excluded(after.as_slice()),
                    std::ops::Bound::Unbounded,
                ))?,
            };
            for entry in entries.take(KEYS_PER_TRANSACTION) {
                let (k, _) = entry?;
                let k = k.value();
                let (_, id) = parse_order_key(k)?;
                let created = order_key_created(k)?;
                for version in with_prefix(&old, id.as_bytes())? {
                    let (vk, vv) = version?;
                    new.insert(
                        under_key_created(created, vk.value()).as_slice(),
                        vv.value(),
                    )?;
                }
                moved += 1;
                last = Some(k.to_vec());
            }
        }
        match last {
            Some(last) => {
                txn.commit()?;
                after = Some(last);
                if moved.is_multiple_of(100_000) {
                    tracing::info!(keys = moved, "moving key versions into creation order");
                }
            }
            None => {
                txn.set_durability(redb::Durability::Immediate)?;
                txn.delete_table(SCHEMA_3_VERSIONS)?;
                txn.commit()?;
                return Ok(moved);
            }
        }
    }
}

fn insert_key(
    txn: &WriteTransaction,
    key: &KeyRecord,
    version: Option<&VersionRecord>,
) -> Result<(), StoreError> {
    let kk = key_key(&key.instance, key.id);
    {
        let mut keys = txn.open_table(KEYS)?;
        if keys.get(kk.as_slice())?.is_some() {
            return Err(StoreError::Conflict);
        }
        keys.insert(kk.as_slice(), created_value(key).as_slice())?;
    }
    // The first version rides in the record ([`next_record`]).
    let record = new_key_value(key, version)?;
    txn.open_table(ORDER)?
        .insert(order_key(key).as_slice(), record.as_slice())?;
    add_to_counter(txn, key, 1)?;
    if let Some(entry) = expiry_key(key) {
        txn.open_table(EXPIRY)?
            .insert(entry.as_slice(), [].as_slice())?;
    }
    Ok(())
}

fn replace_key(
    txn: &WriteTransaction,
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
    let record = {
        let at = record_key(&txn.open_table(KEYS)?, &previous.instance, previous.id)?
            .ok_or(StoreError::Conflict)?;
        let mut order = txn.open_table(ORDER)?;
        let record = match order.get(at.as_slice())? {
            Some(current)
                if stored_revision(previous.id, current.value())? == previous.revision =>
            {
                next_record(previous, current.value(), next, new_version, erase_material)?
            }
            _ => return Err(StoreError::Conflict),
        };
        order.insert(at.as_slice(), record.value.as_slice())?;
        record
    };
    add_to_counter(txn, previous, -1)?;
    add_to_counter(txn, next, 1)?;
    {
        let mut versions = txn.open_table(VERSIONS)?;
        if erase_material {
            for version in stored_versions(&versions, previous)? {
                let erased = VersionRecord {
                    wrapped: None,
                    ..version
                };
                put_version(&mut versions, previous, &erased)?;
            }
        }
        if let Some(version) = &record.to_versions {
            put_version(&mut versions, next, version)?;
        }
    }
    let (old_expiry, new_expiry) = (expiry_key(previous), expiry_key(next));
    if old_expiry != new_expiry {
        let mut expiry = txn.open_table(EXPIRY)?;
        if let Some(entry) = &old_expiry {
            expiry.remove(entry.as_slice())?;
        }
        if let Some(entry) = &new_expiry {
            expiry.insert(entry.as_slice(), [].as_slice())?;
        }
    }
    Ok(())
}

fn count_keys(
    counters: &impl ReadableTable<Bytes, Bytes>,
    instance: &str,
    filter: &KeyFilter,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for ck in counter_keys(instance, filter) {
        if let Some(raw) = counters.get(ck.as_slice())? {
            total += decode_counter(raw.value())?;
        }
    }
    Ok(total)
}

fn list_keys(
    open: &Open,
    txn: &redb::ReadTransaction,
    instance: &str,
    filter: &KeyFilter,
    start: PageStart,
    limit: usize,
) -> Result<(Vec<KeyRecord>, u64), StoreError> {
    let total = count_keys(&txn.open_table(COUNTERS)?, instance, filter)?;
    let order = txn.open_table(ORDER)?;
    let prefix = instance_prefix(instance);
    let mut page = Vec::with_capacity(limit.min(total as usize));
    let (offset, entries) = match start {
        PageStart::Offset(offset) => (offset, with_prefix(&order, &prefix)?),
        PageStart::After(after) => {
            // Exclusive of the position itself: the key after it, byte-wise.
            let mut from = order_key_at(instance, after.created_at.max(0), after.id);
            from.push(0);
            let end = prefix_end(&prefix).expect("the prefix ends in 0x00");
            (0, order.range::<&[u8]>(from.as_slice()..end.as_slice())?)
        }
    };
    let mut skipped = 0usize;
    for entry in entries {
        if page.len() >= limit {
            break;
        }
        let (k, v) = entry?;
        let (_, id) = parse_order_key(k.value())?;
        let record = open.decoded_keys.decode(instance, id, v.value())?;
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

fn list_versions_page(
    versions: &impl ReadableTable<Bytes, Bytes>,
    carried: Option<VersionRecord>,
    prefix: Vec<u8>,
    start: PageStart,
    limit: usize,
) -> Result<(Vec<VersionRecord>, u64), StoreError> {
    let mut total = u64::from(carried.is_some());
    for entry in with_prefix(versions, &prefix)? {
        entry?;
        total += 1;
    }
    let decode = |entry: Result<
        (redb::AccessGuard<'_, Bytes>, redb::AccessGuard<'_, Bytes>),
        redb::StorageError,
    >| {
        let (k, v) = entry?;
        decode_key_versions_entry(k.value(), v.value())
    };
    let page = match start {
        PageStart::Offset(offset) => {
            newest_first(with_prefix(versions, &prefix)?.rev().map(decode), carried)
                .skip(offset)
                .take(limit)
                .collect::<Result<_, _>>()?
        }
        PageStart::After(position) => {
            let mut before = prefix.clone();
            before.extend_from_slice(&(position.created_at as u64).to_be_bytes());
            before.extend_from_slice(position.id.as_bytes());
            let carried = carried.filter(|carried| is_before(carried, &position));
            let older = versions.range::<&[u8]>(prefix.as_slice()..before.as_slice())?;
            newest_first(older.rev().map(decode), carried)
                .take(limit)
                .collect::<Result<_, _>>()?
        }
    };
    Ok((page, total))
}

/// Point reads inline, scans on a blocking thread, writes on the writer thread.
#[async_trait]
impl KeyStore for RedbStore {
    async fn has_keys(&self) -> Result<bool, StoreError> {
        let (_, txn) = self.read()?;
        Ok(!txn.open_table(KEYS)?.is_empty()?)
    }

    async fn insert_key(
        &self,
        key: &KeyRecord,
        version: Option<&VersionRecord>,
    ) -> Result<(), StoreError> {
        let (key, version) = (key.clone(), version.cloned());
        self.write(move |txn| insert_key(txn, &key, version.as_ref()))
            .await
    }

    async fn get_key(&self, instance: &str, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        let (open, txn) = self.read()?;
        get_key(
            &open,
            &txn.open_table(KEYS)?,
            &txn.open_table(ORDER)?,
            instance,
            id,
        )
    }

    async fn replace_key(
        &self,
        previous: &KeyRecord,
        next: &KeyRecord,
        new_version: Option<&VersionRecord>,
        erase_material: bool,
    ) -> Result<(), StoreError> {
        let (previous, next, new_version) = (previous.clone(), next.clone(), new_version.cloned());
        self.write(move |txn| {
            replace_key(txn, &previous, &next, new_version.as_ref(), erase_material)
        })
        .await
    }

    async fn get_version(
        &self,
        key: &KeyRecord,
        version_id: Uuid,
    ) -> Result<Option<VersionRecord>, StoreError> {
        let (_, txn) = self.read()?;
        if let Some(carried) = carried_of(&txn.open_table(ORDER)?, key)?
            && carried.id == version_id
        {
            return Ok(Some(carried));
        }
        let versions = txn.open_table(VERSIONS)?;
        for entry in with_prefix(&versions, &versions_prefix(key))? {
            let (k, v) = entry?;
            if k.value().ends_with(version_id.as_bytes()) {
                return Ok(Some(decode_key_versions_entry(k.value(), v.value())?));
            }
        }
        Ok(None)
    }

    async fn list_versions(&self, key: &KeyRecord) -> Result<Vec<VersionRecord>, StoreError> {
        let (_, txn) = self.read()?;
        let carried = carried_of(&txn.open_table(ORDER)?, key)?;
        let mut versions = versions_of(&txn.open_table(VERSIONS)?, key, carried)?;
        versions.reverse();
        Ok(versions)
    }

    async fn list_versions_page(
        &self,
        key: &KeyRecord,
        start: PageStart,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, u64), StoreError> {
        let key = key.clone();
        self.scan(move |_, txn| {
            let carried = carried_of(&txn.open_table(ORDER)?, &key)?;
            let versions = txn.open_table(VERSIONS)?;
            list_versions_page(&versions, carried, versions_prefix(&key), start, limit)
        })
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
        self.scan(move |open, txn| list_keys(open, txn, &instance, &filter, start, limit))
            .await
    }

    async fn count_keys(&self, instance: &str, filter: &KeyFilter) -> Result<u64, StoreError> {
        let (_, txn) = self.read()?;
        count_keys(&txn.open_table(COUNTERS)?, instance, filter)
    }

    async fn due_for_expiry(
        &self,
        now: Millis,
        limit: usize,
    ) -> Result<Vec<(String, Uuid)>, StoreError> {
        self.scan(move |_, txn| {
            let end = ((now.max(0) as u64) + 1).to_be_bytes();
            txn.open_table(EXPIRY)?
                .range::<&[u8]>(..end.as_slice())?
                .take(limit)
                .map(|entry| decode_expiry_entry(entry?.0.value()))
                .collect()
        })
        .await
    }
}
