//! ListKeys and ListKeyVersions page tokens: where the next page starts, bound to the
//! listing it came from.
//!
//! A token is the last record's position (creation time and id) and a fingerprint of
//! the listing (ListKeys: instance and filters; ListKeyVersions: instance and key), in
//! hex. A token of another instance or other filters, or one
//! altered, is refused naming `page_token`. It is not a secret and needs no key: it can
//! only position a listing the caller may make anyway.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::model::KeyFilter;
use crate::domain::{KeyPosition, KmsError};

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 16 + 8;

fn keys_fingerprint(instance: &str, filter: &KeyFilter) -> [u8; 8] {
    let mut states: Vec<u8> = filter.states.iter().map(|s| s.code()).collect();
    states.sort_unstable();
    states.dedup();
    let mut hash = Sha256::new();
    hash.update(b"kms.ListKeys.v1\0");
    hash.update(instance.as_bytes());
    hash.update([0]);
    hash.update(&states);
    hash.update([0, filter.extractable.map_or(0, |e| 1 + e as u8)]);
    hash.finalize()[..8].try_into().expect("8 bytes")
}

fn versions_fingerprint(instance: &str, key_id: Uuid) -> [u8; 8] {
    let mut hash = Sha256::new();
    hash.update(b"kms.ListKeyVersions.v1\0");
    hash.update(instance.as_bytes());
    hash.update([0]);
    hash.update(key_id.as_bytes());
    hash.finalize()[..8].try_into().expect("8 bytes")
}

/// The ListKeys token for the page after `position`.
pub fn encode(instance: &str, filter: &KeyFilter, position: KeyPosition) -> String {
    encode_for(keys_fingerprint(instance, filter), position)
}

/// The position a ListKeys token names, if it is a token of this listing.
pub fn decode(instance: &str, filter: &KeyFilter, token: &str) -> Result<KeyPosition, KmsError> {
    decode_for(keys_fingerprint(instance, filter), token)
}

/// The ListKeyVersions token for the page after `position` (older versions).
pub fn encode_versions(instance: &str, key_id: Uuid, position: KeyPosition) -> String {
    encode_for(versions_fingerprint(instance, key_id), position)
}

/// The position a ListKeyVersions token names, if it is a token of this key's listing.
pub fn decode_versions(instance: &str, key_id: Uuid, token: &str) -> Result<KeyPosition, KmsError> {
    decode_for(versions_fingerprint(instance, key_id), token)
}

fn encode_for(fingerprint: [u8; 8], position: KeyPosition) -> String {
    let mut raw = Vec::with_capacity(LEN);
    raw.push(VERSION);
    raw.extend_from_slice(&position.created_at.to_be_bytes());
    raw.extend_from_slice(position.id.as_bytes());
    raw.extend_from_slice(&fingerprint);
    hex::encode(raw)
}

fn decode_for(fingerprint: [u8; 8], token: &str) -> Result<KeyPosition, KmsError> {
    let refused = || {
        KmsError::invalid(
            "page_token",
            "not a token of this listing: pass next_page_token back unchanged, with the same \
             instance and filters",
        )
    };
    let mut raw = [0u8; LEN];
    hex::decode_to_slice(token, &mut raw).map_err(|_| refused())?;
    if raw[0] != VERSION || raw[LEN - 8..] != fingerprint {
        return Err(refused());
    }
    Ok(KeyPosition {
        created_at: i64::from_be_bytes(raw[1..9].try_into().expect("8 bytes")),
        id: Uuid::from_bytes(raw[9..25].try_into().expect("16 bytes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::KeyState;

    #[test]
    fn tokens_round_trip_only_within_their_listing() {
        let filter = KeyFilter {
            states: vec![KeyState::Active, KeyState::Suspended],
            extractable: Some(false),
        };
        let position = KeyPosition {
            created_at: 1_700_000_000_123,
            id: Uuid::new_v4(),
        };
        let token = encode("a", &filter, position);
        assert_eq!(decode("a", &filter, &token).unwrap(), position);
        // The same states in another order are the same listing.
        let reordered = KeyFilter {
            states: vec![KeyState::Suspended, KeyState::Active],
            ..filter.clone()
        };
        assert_eq!(decode("a", &reordered, &token).unwrap(), position);
        assert!(decode("b", &filter, &token).is_err(), "another instance");
        assert!(
            decode("a", &KeyFilter::default(), &token).is_err(),
            "other filters"
        );
        // The fingerprint is checked; the position itself may be any within the listing.
        let mut altered = token.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'0' { b'1' } else { b'0' };
        assert!(decode("a", &filter, &String::from_utf8(altered).unwrap()).is_err());
        assert!(decode("a", &filter, "").is_err());
        assert!(decode("a", &filter, &token[..20]).is_err());
        assert!(decode("a", &filter, "zz").is_err());
    }

    #[test]
    fn version_tokens_hold_only_for_their_key_and_instance() {
        let (key, other) = (Uuid::new_v4(), Uuid::new_v4());
        let position = KeyPosition {
            created_at: 5,
            id: Uuid::new_v4(),
        };
        let token = encode_versions("a", key, position);
        assert_eq!(decode_versions("a", key, &token).unwrap(), position);
        assert!(decode_versions("a", other, &token).is_err(), "another key");
        assert!(
            decode_versions("b", key, &token).is_err(),
            "another instance"
        );
        assert!(
            decode("a", &KeyFilter::default(), &token).is_err(),
            "not a ListKeys token"
        );
    }
}
