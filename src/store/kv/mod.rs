//! What the ordered key-value backends (sled, redb) share: how records and index
//! entries are laid out as bytes. Both keep the same tables under the same keys (the
//! layout is in [`crate::store::sled`]'s module doc), so a record means the same thing
//! in either.

pub(crate) mod audit_frame;
pub(crate) mod codec;

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::domain::model::{
    ImportTokenRecord, KeyFilter, KeyRecord, KeyState, Millis, VersionRecord,
};
use crate::store::{ChainEnd, KeyPosition, Revision, StoreError};

pub(crate) fn instance_prefix(instance: &str) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(instance.len() + 1);
    prefix.extend_from_slice(instance.as_bytes());
    prefix.push(0);
    prefix
}

pub(crate) fn key_key(instance: &str, id: Uuid) -> Vec<u8> {
    let mut k = instance_prefix(instance);
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn order_key(key: &KeyRecord) -> Vec<u8> {
    order_key_at(&key.instance, key.created_at, key.id)
}

/// A key's place in listing order: instance 0x00 created-ms(BE u64) key-uuid.
pub(crate) fn order_key_at(instance: &str, created_at: Millis, id: Uuid) -> Vec<u8> {
    let mut k = instance_prefix(instance);
    k.extend_from_slice(&(created_at as u64).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// An `order` tree key: the instance and the key id (its last 16 bytes).
pub(crate) fn parse_order_key(k: &[u8]) -> Result<(String, Uuid), StoreError> {
    let corrupt = || StoreError::corrupt("order index", "malformed entry");
    if k.len() < 1 + 8 + 16 {
        return Err(corrupt());
    }
    let (rest, id) = k.split_at(k.len() - 16);
    let instance = rest[..rest.len() - 8]
        .strip_suffix(&[0])
        .ok_or_else(corrupt)?;
    let instance = String::from_utf8(instance.to_vec()).map_err(|_| corrupt())?;
    Ok((instance, Uuid::from_bytes(id.try_into().expect("16 bytes"))))
}

/// An `order` tree key's creation time (the 8 bytes before the key id).
pub(crate) fn order_key_created(k: &[u8]) -> Result<Millis, StoreError> {
    parse_order_key(k)?;
    let created = &k[k.len() - 24..k.len() - 16];
    Ok(u64::from_be_bytes(created.try_into().expect("8 bytes")) as Millis)
}

/// A `keys` entry's value: the key's creation time, which with its instance and id
/// is where its record is in `order`.
pub(crate) fn created_value(key: &KeyRecord) -> [u8; 8] {
    (key.created_at as u64).to_be_bytes()
}

/// Where a key's record is in `order`, from the creation time its `keys` entry holds.
pub(crate) fn record_place(
    instance: &str,
    id: Uuid,
    created: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let created: [u8; 8] = created
        .try_into()
        .map_err(|_| StoreError::corrupt(format!("key {id}"), "creation time not 8 bytes"))?;
    Ok(order_key_at(
        instance,
        u64::from_be_bytes(created) as Millis,
        id,
    ))
}

pub(crate) fn counter_key(instance: &str, state: KeyState, extractable: bool) -> Vec<u8> {
    let mut k = instance_prefix(instance);
    k.push(state.code());
    k.push(extractable as u8);
    k
}

/// The counters CountKeys sums for `filter` (at most ten).
pub(crate) fn counter_keys<'a>(
    instance: &'a str,
    filter: &'a KeyFilter,
) -> impl Iterator<Item = Vec<u8>> + 'a {
    KeyState::ALL.into_iter().flat_map(move |state| {
        [false, true]
            .into_iter()
            .filter(move |extractable| filter.matches(state, *extractable))
            .map(move |extractable| counter_key(instance, state, extractable))
    })
}

/// A stored counter's value.
pub(crate) fn decode_counter(raw: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(raw.try_into().map_err(|_| {
        StoreError::corrupt("counter", "not 8 bytes")
    })?))
}

/// A counter's next stored value: `current` (absent or unreadable: 0) moved by `delta`,
/// never below 0.
pub(crate) fn next_counter(current: Option<&[u8]>, delta: i64) -> [u8; 8] {
    let current = current
        .map(|raw| u64::from_be_bytes(raw.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    ((current as i64 + delta).max(0) as u64).to_be_bytes()
}

/// The expiry-index entry of a key, if it should have one.
pub(crate) fn expiry_key(key: &KeyRecord) -> Option<Vec<u8>> {
    let at = key.next_transition_at()?;
    let mut k = (at.max(0) as u64).to_be_bytes().to_vec();
    k.extend_from_slice(&key_key(&key.instance, key.id));
    Some(k)
}

pub(crate) fn version_key(version: &VersionRecord) -> Vec<u8> {
    let mut k = version.key_id.as_bytes().to_vec();
    k.extend_from_slice(&(version.created_at as u64).to_be_bytes());
    k.extend_from_slice(version.id.as_bytes());
    k
}

/// A `versions` entry: its tree key holds the key id, creation time and version id.
pub(crate) fn decode_version_entry(k: &[u8], v: &[u8]) -> Result<VersionRecord, StoreError> {
    if k.len() != 16 + 8 + 16 {
        return Err(StoreError::corrupt("versions index", "malformed entry"));
    }
    let key_id = Uuid::from_bytes(k[..16].try_into().expect("16 bytes"));
    let created_at = u64::from_be_bytes(k[16..24].try_into().expect("8 bytes")) as Millis;
    let id = Uuid::from_bytes(k[24..].try_into().expect("16 bytes"));
    codec::decode_version(key_id, created_at, id, v)
}

/// A `key_versions` key, or prefix: the key's creation time (BE u64), then the
/// key-id-first form of [`version_key`] (a version key, or a key id alone). Versions sit
/// in their key's creation order, next to the keys created with it, so creating a key
/// appends them rather than writing at a random place in the tree.
pub(crate) fn under_key_created(key_created_at: Millis, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + rest.len());
    k.extend_from_slice(&(key_created_at as u64).to_be_bytes());
    k.extend_from_slice(rest);
    k
}

/// Where a key's versions are in `key_versions`.
pub(crate) fn versions_prefix(key: &KeyRecord) -> Vec<u8> {
    under_key_created(key.created_at, key.id.as_bytes())
}

/// A version's `key_versions` entry, key and value; refused if it names another key.
pub(crate) fn key_version_entry(
    key: &KeyRecord,
    version: &VersionRecord,
) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
    check_version_of(key, version)?;
    Ok((
        under_key_created(key.created_at, &version_key(version)),
        codec::encode_version(version),
    ))
}

/// A `key_versions` entry.
pub(crate) fn decode_key_versions_entry(k: &[u8], v: &[u8]) -> Result<VersionRecord, StoreError> {
    let Some(rest) = k.get(8..) else {
        return Err(StoreError::corrupt("versions index", "malformed entry"));
    };
    decode_version_entry(rest, v)
}

/// A `keys` tree key: the instance and the key id.
pub(crate) fn parse_key_key(k: &[u8]) -> Result<(String, Uuid), StoreError> {
    let corrupt = || StoreError::corrupt("keys index", "malformed entry");
    if k.len() < 1 + 16 {
        return Err(corrupt());
    }
    let (instance, id) = k.split_at(k.len() - 16);
    let instance = instance.strip_suffix(&[0]).ok_or_else(corrupt)?;
    let instance = String::from_utf8(instance.to_vec()).map_err(|_| corrupt())?;
    Ok((instance, Uuid::from_bytes(id.try_into().expect("16 bytes"))))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

pub(crate) fn decode<T: DeserializeOwned>(what: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::corrupt(what, e.to_string()))
}

/// Decoded key records, each with the exact bytes it was decoded from. A read whose
/// bytes equal the remembered ones skips the decode (with JSON records it was the
/// largest cost of a WrapKey/UnwrapKey outside the HSM); at most 4,096 records. The
/// database stays the only source of truth: every read still fetches the stored bytes,
/// so a changed record can never be served stale.
///
/// The bytes are a copy: a buffer from a read (sled's `IVec`) may share its memory with
/// the whole node it came from, and holding it would keep that node in memory after the
/// database's own cache let it go.
pub(crate) struct DecodedKeys {
    shards: Vec<Mutex<LruCache<Uuid, Decoded>>>,
}

/// A record's stored bytes and what they decode to.
type Decoded = (Box<[u8]>, KeyRecord);

impl DecodedKeys {
    const SHARDS: usize = 16;
    const PER_SHARD: usize = 256;

    pub(crate) fn new() -> Self {
        let per_shard = NonZeroUsize::new(Self::PER_SHARD).expect("non-zero");
        Self {
            shards: (0..Self::SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    pub(crate) fn decode(
        &self,
        instance: &str,
        id: Uuid,
        raw: &[u8],
    ) -> Result<KeyRecord, StoreError> {
        let shard = &self.shards[id.as_u128() as usize % Self::SHARDS];
        if let Some((bytes, record)) = shard.lock().unwrap_or_else(|e| e.into_inner()).get(&id)
            && **bytes == *raw
        {
            return Ok(record.clone());
        }
        let record = decode_key_value(instance, id, raw)?;
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(id, (raw.into(), record.clone()));
        Ok(record)
    }
}

/// A key record's stored value: its revision, then the record ([`codec`]; JSON in
/// schema 2).
pub(crate) fn encode_key_value(revision: Revision, record: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + record.len());
    value.extend_from_slice(&revision.to_be_bytes());
    value.extend_from_slice(record);
    value
}

pub(crate) fn stored_revision(id: Uuid, raw: &[u8]) -> Result<Revision, StoreError> {
    raw.get(..8)
        .map(|r| Revision::from_be_bytes(r.try_into().expect("8 bytes")))
        .ok_or_else(|| StoreError::corrupt(format!("key {id}"), "shorter than its revision"))
}

pub(crate) fn decode_key_value(
    instance: &str,
    id: Uuid,
    raw: &[u8],
) -> Result<KeyRecord, StoreError> {
    let revision = stored_revision(id, raw)?;
    let mut record = codec::decode_key(instance, id, &raw[8..])?;
    record.revision = revision;
    Ok(record)
}

pub(crate) fn key_value(key: &KeyRecord) -> Vec<u8> {
    encode_key_value(key.revision, &codec::encode_key(key))
}

/// A new key's stored value, carrying its first version (refused if it names another
/// key).
pub(crate) fn new_key_value(
    key: &KeyRecord,
    version: Option<&VersionRecord>,
) -> Result<Vec<u8>, StoreError> {
    if let Some(version) = version {
        check_version_of(key, version)?;
    }
    let key = KeyRecord {
        revision: 0,
        ..key.clone()
    };
    Ok(encode_key_value(
        0,
        &codec::encode_key_with_version(&key, version),
    ))
}

fn check_version_of(key: &KeyRecord, version: &VersionRecord) -> Result<(), StoreError> {
    if version.key_id != key.id {
        return Err(StoreError::corrupt(
            format!("version {}", version.id),
            "written under another key",
        ));
    }
    Ok(())
}

/// The version a key's stored value carries (its first, since schema 8), if any.
pub(crate) fn carried_version(
    key: &KeyRecord,
    raw: &[u8],
) -> Result<Option<VersionRecord>, StoreError> {
    stored_revision(key.id, raw)?;
    if !codec::carries_version(&raw[8..]) {
        return Ok(None);
    }
    // What the stored record says, which `key` (read earlier) may no longer.
    let record = codec::decode_key(&key.instance, key.id, &raw[8..])?;
    codec::decode_carried_version(&record, &raw[8..])
}

/// A tree entry: its key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// An `order` entry's value as schemas before 8 wrote it (the record alone), and the
/// `key_versions` entry of the version it carries, if it carries one.
pub(crate) fn value_before_schema_8(
    order_key: &[u8],
    value: &[u8],
) -> Result<(Vec<u8>, Option<Entry>), StoreError> {
    let (instance, id) = parse_order_key(order_key)?;
    let record = decode_key_value(&instance, id, value)?;
    Ok(match carried_version(&record, value)? {
        Some(carried) => (
            key_value(&record),
            Some(key_version_entry(&record, &carried)?),
        ),
        None => (value.to_vec(), None),
    })
}

/// What replacing a key's record writes: the record's next value, still carrying the
/// version the current one does, and the version for `key_versions`, if any.
pub(crate) struct NextRecord {
    pub(crate) value: Vec<u8>,
    pub(crate) to_versions: Option<VersionRecord>,
}

/// The next value of a key whose stored value is `current`. The carried version is
/// kept (erased with `erase_material`), replaced by a `new_version` of its own id (a
/// re-import), or takes `new_version` when the key never had one; any other new
/// version goes to `key_versions`.
pub(crate) fn next_record(
    previous: &KeyRecord,
    current: &[u8],
    next: &KeyRecord,
    new_version: Option<&VersionRecord>,
    erase_material: bool,
) -> Result<NextRecord, StoreError> {
    let mut carried = carried_version(previous, current)?;
    if erase_material && let Some(carried) = &mut carried {
        carried.wrapped = None;
    }
    let mut to_versions = None;
    if let Some(version) = new_version {
        check_version_of(next, version)?;
        let carries_it = match &carried {
            Some(carried) => carried.id == version.id,
            None => previous.current_version.is_none(),
        };
        if carries_it {
            carried = Some(version.clone());
        } else {
            to_versions = Some(version.clone());
        }
    }
    Ok(NextRecord {
        value: encode_key_value(
            next.revision,
            &codec::encode_key_with_version(next, carried.as_ref()),
        ),
        to_versions,
    })
}

/// A version's place among its key's versions, as `key_versions` orders them.
fn version_place(version: &VersionRecord) -> (u64, Uuid) {
    (version.created_at as u64, version.id)
}

/// True when `version` sorts before `position` (an older version: on the page after it).
pub(crate) fn is_before(version: &VersionRecord, position: &KeyPosition) -> bool {
    version_place(version) < (position.created_at as u64, position.id)
}

/// A key's versions newest first: its `key_versions` entries (`stored`, newest first)
/// with the version its record carries in its place among them (last, unless the
/// key's stored versions predate schema 8).
pub(crate) fn newest_first<I>(stored: I, carried: Option<VersionRecord>) -> NewestFirst<I>
where
    I: Iterator<Item = Result<VersionRecord, StoreError>>,
{
    NewestFirst {
        stored: stored.peekable(),
        carried,
    }
}

pub(crate) struct NewestFirst<I: Iterator> {
    stored: std::iter::Peekable<I>,
    carried: Option<VersionRecord>,
}

impl<I> Iterator for NewestFirst<I>
where
    I: Iterator<Item = Result<VersionRecord, StoreError>>,
{
    type Item = Result<VersionRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(carried) = &self.carried {
            let carried_next = match self.stored.peek() {
                Some(Ok(stored)) => version_place(stored) < version_place(carried),
                Some(Err(_)) => false,
                None => true,
            };
            if carried_next {
                return self.carried.take().map(Ok);
            }
        }
        self.stored.next()
    }
}

pub(crate) fn decode_expiry_entry(entry: &[u8]) -> Result<(String, Uuid), StoreError> {
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

/// A token's stored value: revision, token id, then its JSON.
pub(crate) fn encode_token(token: &ImportTokenRecord) -> Vec<u8> {
    let json = encode(token);
    let mut value = Vec::with_capacity(24 + json.len());
    value.extend_from_slice(&token.revision.to_be_bytes());
    value.extend_from_slice(token.id.as_bytes());
    value.extend_from_slice(&json);
    value
}

pub(crate) fn decode_token(raw: &[u8]) -> Result<ImportTokenRecord, StoreError> {
    if raw.len() < 24 {
        return Err(StoreError::corrupt(
            "import token",
            "shorter than its header",
        ));
    }
    let mut token: ImportTokenRecord = decode("import token", &raw[24..])?;
    token.revision = Revision::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
    Ok(token)
}

/// A new `rsa_pool` entry's key: the pair's size, then a fresh id (pairs of one size
/// are taken in key order).
pub(crate) fn pool_key(bits: u32) -> Vec<u8> {
    let mut k = bits.to_be_bytes().to_vec();
    k.extend_from_slice(Uuid::new_v4().as_bytes());
    k
}

/// The part of a token's stored value a compare-and-swap compares.
pub(crate) fn token_identity(token: &ImportTokenRecord) -> [u8; 24] {
    let mut identity = [0u8; 24];
    identity[..8].copy_from_slice(&token.revision.to_be_bytes());
    identity[8..].copy_from_slice(token.id.as_bytes());
    identity
}

/// `audit_meta` keys: the anchor retention left, and the chain's newest record.
pub(crate) const ANCHOR_KEY: &[u8] = b"anchor";
pub(crate) const END_KEY: &[u8] = b"end";

pub(crate) fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| {
        StoreError::corrupt("audit record key", format!("{} bytes, not 8", key.len()))
    })?))
}

pub(crate) fn encode_end(end: &ChainEnd) -> Vec<u8> {
    let mut raw = end.seq.to_be_bytes().to_vec();
    raw.extend_from_slice(&end.hash);
    raw
}

pub(crate) fn decode_end(what: &str, raw: &[u8]) -> Result<ChainEnd, StoreError> {
    if raw.len() != 40 {
        return Err(StoreError::corrupt(
            what,
            format!("{} bytes, not 40", raw.len()),
        ));
    }
    Ok(ChainEnd {
        seq: seq_of(&raw[..8])?,
        hash: raw[8..].try_into().expect("32 bytes"),
    })
}

/// Runs an embedded store's blocking reopen from its async health probe (in place on a
/// multi-threaded runtime, so the executor keeps its other threads) and logs the outcome.
pub(crate) fn reopen_in_place(
    path: &std::path::Path,
    reopen: impl FnOnce() -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let outcome = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(reopen),
        _ => reopen(),
    };
    match &outcome {
        Ok(()) => {
            tracing::warn!(path = %path.display(), "the store reopened after a write failure")
        }
        Err(error) => tracing::debug!(error = %error, "reopening the store"),
    }
    outcome
}
