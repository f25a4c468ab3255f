//! The stored form of key and version records: a format byte, then postcard (a compact
//! serde binary format: varints, no field names). What the entry's tree key already
//! holds is not repeated in its value: a key's instance and id, a version's key id,
//! creation time and id.
//!
//! Decision (measured with 100,000 generated root keys, `kms store stats`): as JSON a key
//! record took 421 bytes and its version 292 (the blob hex-encoded, every field named);
//! in this form the `keys` and `versions` trees hold 85 and 84 bytes per key, their tree
//! keys included. States, origins and wrap formats are stored
//! as explicit codes, not as serde's variant indexes, so reordering an enum cannot
//! change what stored bytes mean.
//!
//! Schema 2 stores JSON (`{` first); it is still read, and a schema-2 database is
//! rewritten in this form when it opens.
//!
//! Since schema 8 a key record may carry its first version after it
//! ([`POSTCARD_WITH_VERSION`]), leaving only rotated-in versions to their own entries.
//! Decision (measured with a million generated root keys on sled, `kms store stats`
//! and `du`): a version entry of its own took 92 bytes a key in `key_versions` (its
//! 48-byte tree key, the blob, sled's per-entry overhead) and the store 740-773 bytes
//! a key as the server left it; carried in the record it adds about 45 to the record
//! and the store took 534. The carried version's id and creation time are left out
//! when they equal the key's current version and creation time, as they do for every
//! key that was never rotated.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::model::{
    ExpirationModel, KeyOrigin, KeyRecord, KeyState, Millis, RECORD_SCHEMA, VersionRecord,
};
use crate::hsm::{WrapFormat, WrappedKey};
use crate::store::StoreError;

/// The first byte of a value in this form. JSON values begin with `{` (0x7b).
const POSTCARD_V1: u8 = 1;
/// The first byte of a key record followed by a version ([`StoredCarriedVersion`]).
const POSTCARD_WITH_VERSION: u8 = 2;

#[derive(Serialize, Deserialize)]
struct StoredKey<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    description: Cow<'a, str>,
    state: u8,
    extractable: bool,
    created_at: Millis,
    updated_at: Millis,
    expires_at: Option<Millis>,
    origin: u8,
    size_bits: u32,
    current_version: Option<Uuid>,
    imported: bool,
    expiration_model: Option<u8>,
    valid_to: Option<Millis>,
    destroyed_at: Option<Millis>,
    #[serde(borrow)]
    check_value: Option<Cow<'a, [u8]>>,
}

#[derive(Serialize, Deserialize)]
struct StoredVersion<'a> {
    /// Format code and blob; `None` once erased.
    #[serde(borrow)]
    wrapped: Option<(u8, Cow<'a, [u8]>)>,
}

/// The version a key record carries: what its own entry's tree key would hold, left
/// out where the record already says it.
#[derive(Serialize, Deserialize)]
struct StoredCarriedVersion<'a> {
    /// `None`: the key's current version.
    id: Option<Uuid>,
    /// `None`: the key's creation time.
    created_at: Option<Millis>,
    #[serde(borrow)]
    version: StoredVersion<'a>,
}

fn origin_code(origin: KeyOrigin) -> u8 {
    match origin {
        KeyOrigin::Generated => 0,
        KeyOrigin::Imported => 1,
        KeyOrigin::External => 2,
    }
}

fn origin_from(code: u8) -> Option<KeyOrigin> {
    Some(match code {
        0 => KeyOrigin::Generated,
        1 => KeyOrigin::Imported,
        2 => KeyOrigin::External,
        _ => return None,
    })
}

fn model_code(model: ExpirationModel) -> u8 {
    match model {
        ExpirationModel::KeyMaterialExpires => 0,
        ExpirationModel::KeyMaterialDoesNotExpire => 1,
    }
}

fn model_from(code: u8) -> Option<ExpirationModel> {
    Some(match code {
        0 => ExpirationModel::KeyMaterialExpires,
        1 => ExpirationModel::KeyMaterialDoesNotExpire,
        _ => return None,
    })
}

fn format_code(format: WrapFormat) -> u8 {
    match format {
        WrapFormat::Rfc5649 => 0,
        WrapFormat::Rfc3394 => 1,
    }
}

fn format_from(code: u8) -> Option<WrapFormat> {
    Some(match code {
        0 => WrapFormat::Rfc5649,
        1 => WrapFormat::Rfc3394,
        _ => return None,
    })
}

/// A key record's value (without its revision prefix).
pub(crate) fn encode_key(key: &KeyRecord) -> Vec<u8> {
    encode_key_with_version(key, None)
}

/// A key record's value carrying `version` (one of the key's), or none.
pub(crate) fn encode_key_with_version(key: &KeyRecord, version: Option<&VersionRecord>) -> Vec<u8> {
    let stored = StoredKey {
        name: Cow::Borrowed(&key.name),
        description: Cow::Borrowed(&key.description),
        state: key.state.code(),
        extractable: key.extractable,
        created_at: key.created_at,
        updated_at: key.updated_at,
        expires_at: key.expires_at,
        origin: origin_code(key.origin),
        size_bits: key.size_bits,
        current_version: key.current_version,
        imported: key.imported,
        expiration_model: key.expiration_model.map(model_code),
        valid_to: key.valid_to,
        destroyed_at: key.destroyed_at,
        check_value: key.check_value.as_deref().map(Cow::Borrowed),
    };
    let Some(version) = version else {
        let mut out = vec![POSTCARD_V1];
        postcard::to_io(&stored, &mut out).expect("writing to a Vec cannot fail");
        return out;
    };
    let carried = StoredCarriedVersion {
        id: (key.current_version != Some(version.id)).then_some(version.id),
        created_at: (version.created_at != key.created_at).then_some(version.created_at),
        version: stored_version(version),
    };
    let mut out = vec![POSTCARD_WITH_VERSION];
    postcard::to_io(&stored, &mut out).expect("writing to a Vec cannot fail");
    postcard::to_io(&carried, &mut out).expect("writing to a Vec cannot fail");
    out
}

fn stored_version(version: &VersionRecord) -> StoredVersion<'_> {
    StoredVersion {
        wrapped: version
            .wrapped
            .as_ref()
            .map(|w| (format_code(w.format), Cow::Borrowed(w.blob.as_slice()))),
    }
}

/// The stored key of a binary value, and what follows it.
fn split_key(raw: &[u8]) -> Result<(StoredKey<'_>, &[u8]), String> {
    postcard::take_from_bytes(&raw[1..]).map_err(|e| e.to_string())
}

/// Decodes a key record's value, of either form, for the key `id` of `instance`.
pub(crate) fn decode_key(instance: &str, id: Uuid, raw: &[u8]) -> Result<KeyRecord, StoreError> {
    let corrupt = |reason: String| StoreError::corrupt(format!("key {id}"), reason);
    match raw.first() {
        Some(b'{') => serde_json::from_slice(raw).map_err(|e| corrupt(e.to_string())),
        Some(&POSTCARD_V1 | &POSTCARD_WITH_VERSION) => {
            let (stored, _) = split_key(raw).map_err(corrupt)?;
            let code = |what: &str, code: u8| corrupt(format!("unknown {what} code {code}"));
            Ok(KeyRecord {
                schema: RECORD_SCHEMA,
                revision: 0,
                id,
                instance: instance.to_string(),
                name: stored.name.into_owned(),
                description: stored.description.into_owned(),
                state: KeyState::from_code(stored.state)
                    .ok_or_else(|| code("state", stored.state))?,
                extractable: stored.extractable,
                created_at: stored.created_at,
                updated_at: stored.updated_at,
                expires_at: stored.expires_at,
                origin: origin_from(stored.origin).ok_or_else(|| code("origin", stored.origin))?,
                size_bits: stored.size_bits,
                current_version: stored.current_version,
                imported: stored.imported,
                expiration_model: stored
                    .expiration_model
                    .map(|c| model_from(c).ok_or_else(|| code("expiration model", c)))
                    .transpose()?,
                valid_to: stored.valid_to,
                destroyed_at: stored.destroyed_at,
                check_value: stored.check_value.map(Cow::into_owned),
            })
        }
        Some(other) => Err(corrupt(format!("unknown record format {other}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// True when a key record's value carries a version.
pub(crate) fn carries_version(raw: &[u8]) -> bool {
    raw.first() == Some(&POSTCARD_WITH_VERSION)
}

/// The version a key record's value carries, if any; `key` is what the value decodes
/// to (its id, current version and creation time fill in what the value left out).
pub(crate) fn decode_carried_version(
    key: &KeyRecord,
    raw: &[u8],
) -> Result<Option<VersionRecord>, StoreError> {
    if !carries_version(raw) {
        return Ok(None);
    }
    let corrupt = |reason: String| StoreError::corrupt(format!("key {}", key.id), reason);
    let (_, rest) = split_key(raw).map_err(corrupt)?;
    let carried: StoredCarriedVersion =
        postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
    let id = match carried.id.or(key.current_version) {
        Some(id) => id,
        None => return Err(corrupt("a carried version without an id".into())),
    };
    Ok(Some(VersionRecord {
        schema: RECORD_SCHEMA,
        key_id: key.id,
        id,
        created_at: carried.created_at.unwrap_or(key.created_at),
        wrapped: wrapped_from(carried.version, &|reason| {
            StoreError::corrupt(format!("version {id}"), reason)
        })?,
    }))
}

fn wrapped_from(
    stored: StoredVersion<'_>,
    corrupt: &dyn Fn(String) -> StoreError,
) -> Result<Option<WrappedKey>, StoreError> {
    stored
        .wrapped
        .map(|(code, blob)| {
            Ok(WrappedKey {
                format: format_from(code)
                    .ok_or_else(|| corrupt(format!("unknown wrap format code {code}")))?,
                blob: blob.into_owned(),
            })
        })
        .transpose()
}

/// A version record's value.
pub(crate) fn encode_version(version: &VersionRecord) -> Vec<u8> {
    let mut out = vec![POSTCARD_V1];
    postcard::to_io(&stored_version(version), &mut out).expect("writing to a Vec cannot fail");
    out
}

/// Decodes a version record's value, of either form; `key_id`, `created_at` and `id`
/// come from its tree key.
pub(crate) fn decode_version(
    key_id: Uuid,
    created_at: Millis,
    id: Uuid,
    raw: &[u8],
) -> Result<VersionRecord, StoreError> {
    let corrupt = |reason: String| StoreError::corrupt(format!("version {id}"), reason);
    match raw.first() {
        Some(b'{') => serde_json::from_slice(raw).map_err(|e| corrupt(e.to_string())),
        Some(&POSTCARD_V1) => {
            let stored: StoredVersion =
                postcard::from_bytes(&raw[1..]).map_err(|e| corrupt(e.to_string()))?;
            let wrapped = wrapped_from(stored, &corrupt)?;
            Ok(VersionRecord {
                schema: RECORD_SCHEMA,
                key_id,
                id,
                created_at,
                wrapped,
            })
        }
        Some(other) => Err(corrupt(format!("unknown record format {other}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// True when a stored value is in the old JSON form.
pub(crate) fn is_json(raw: &[u8]) -> bool {
    raw.first() == Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRecord {
        KeyRecord {
            schema: RECORD_SCHEMA,
            revision: 0,
            id: Uuid::new_v4(),
            instance: "inst".into(),
            name: "a name".into(),
            description: "described".into(),
            state: KeyState::Suspended,
            extractable: false,
            created_at: 1_700_000_000_000,
            updated_at: 1_700_000_000_500,
            expires_at: Some(1_800_000_000_000),
            origin: KeyOrigin::External,
            size_bits: 256,
            current_version: Some(Uuid::new_v4()),
            imported: true,
            expiration_model: Some(ExpirationModel::KeyMaterialExpires),
            valid_to: Some(1_750_000_000_000),
            destroyed_at: None,
            check_value: Some(vec![1, 2, 3, 200]),
        }
    }

    #[test]
    fn keys_round_trip_in_both_forms() {
        let key = key();
        let binary = encode_key(&key);
        assert_eq!(decode_key(&key.instance, key.id, &binary).unwrap(), key);
        let json = serde_json::to_vec(&key).unwrap();
        assert_eq!(decode_key(&key.instance, key.id, &json).unwrap(), key);
        assert!(binary.len() < json.len() / 3, "{} bytes", binary.len());
    }

    #[test]
    fn versions_round_trip_in_both_forms() {
        for wrapped in [
            Some(WrappedKey {
                format: WrapFormat::Rfc3394,
                blob: vec![7; 40],
            }),
            None,
        ] {
            let version = VersionRecord {
                schema: RECORD_SCHEMA,
                key_id: Uuid::new_v4(),
                id: Uuid::new_v4(),
                created_at: 1_700_000_000_123,
                wrapped,
            };
            let (k, c, i) = (version.key_id, version.created_at, version.id);
            let binary = encode_version(&version);
            assert_eq!(decode_version(k, c, i, &binary).unwrap(), version);
            let json = serde_json::to_vec(&version).unwrap();
            assert_eq!(decode_version(k, c, i, &json).unwrap(), version);
        }
    }

    #[test]
    fn a_record_carries_its_version_with_what_the_record_says_left_out() {
        let key = key();
        let version = |id, created_at| VersionRecord {
            schema: RECORD_SCHEMA,
            key_id: key.id,
            id,
            created_at,
            wrapped: Some(WrappedKey {
                format: WrapFormat::Rfc5649,
                blob: vec![9; 40],
            }),
        };
        let plain = encode_key(&key);
        assert_eq!(decode_carried_version(&key, &plain).unwrap(), None);
        let current = version(key.current_version.unwrap(), key.created_at);
        let rotated_out = version(Uuid::new_v4(), key.created_at - 5);
        // Spelled out: the id's length and 16 bytes, and the time as a 6-byte varint.
        for (carried, extra) in [(&current, 0), (&rotated_out, 1 + 16 + 6)] {
            let raw = encode_key_with_version(&key, Some(carried));
            assert_eq!(decode_key(&key.instance, key.id, &raw).unwrap(), key);
            assert_eq!(
                decode_carried_version(&key, &raw).unwrap().as_ref(),
                Some(carried)
            );
            // Two absent fields, the wrap format, the blob's length and the blob.
            assert_eq!(raw.len(), plain.len() + 2 + 1 + 1 + 1 + 40 + extra);
        }
        let raw = encode_key_with_version(&key, Some(&current));
        let erased = VersionRecord {
            wrapped: None,
            ..current
        };
        let erased_raw = encode_key_with_version(&key, Some(&erased));
        assert_eq!(
            decode_carried_version(&key, &erased_raw).unwrap(),
            Some(erased)
        );
        let mut unknown_format = raw.clone();
        unknown_format[plain.len() + 3] = 7;
        for damaged in [&raw[..raw.len() - 1], &unknown_format[..]] {
            assert!(matches!(
                decode_carried_version(&key, damaged),
                Err(StoreError::Corrupt { .. })
            ));
        }
    }

    #[test]
    fn damaged_values_are_corrupt_not_panics() {
        let key = key();
        let mut binary = encode_key(&key);
        binary.truncate(binary.len() / 2);
        for raw in [&binary[..], &[9u8, 1, 2][..], &[][..]] {
            assert!(matches!(
                decode_key("inst", key.id, raw),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut bad_state = encode_key(&key);
        bad_state[1 + 1 + key.name.len() + 1 + key.description.len()] = 4;
        assert!(matches!(
            decode_key("inst", key.id, &bad_state),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
