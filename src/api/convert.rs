//! Proto <-> domain conversion and field validation.

use crate::domain::import_tokens::NONCE_LEN;
use crate::domain::keys::SecureImport;
use crate::domain::model::ImportTokenRecord;
use crate::hsm::oaep::OaepHash;
use crate::hsm::{GCM_IV_LEN, GCM_TAG_LEN};
use prost_types::Timestamp;

use crate::domain::KmsError;
use crate::domain::model::{ExpirationModel, KeyFilter, KeyOrigin, KeyRecord, KeyState, Millis};
use crate::proto;

pub const MAX_NAME_CHARS: usize = 90;
pub const MAX_DESCRIPTION_CHARS: usize = 240;
pub const DEFAULT_LIST_LIMIT: u32 = 200;
pub const MAX_LIST_LIMIT: u32 = 5000;

pub fn timestamp(millis: Millis) -> Timestamp {
    Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A timestamp field to milliseconds, refusing out-of-range values.
pub fn millis_from(field: &'static str, ts: &Timestamp) -> Result<Millis, KmsError> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return Err(KmsError::invalid(field, "nanos must be in 0..1e9"));
    }
    // Years 1970..9999, the RFC 3339 range.
    if !(0..=253_402_300_799).contains(&ts.seconds) {
        return Err(KmsError::invalid(field, "out of range"));
    }
    Ok(ts.seconds * 1000 + i64::from(ts.nanos / 1_000_000))
}

pub fn key_state(state: KeyState) -> proto::KeyState {
    match state {
        KeyState::PreActivation => proto::KeyState::PreActivation,
        KeyState::Active => proto::KeyState::Active,
        KeyState::Suspended => proto::KeyState::Suspended,
        KeyState::Deactivated => proto::KeyState::Deactivated,
        KeyState::Destroyed => proto::KeyState::Destroyed,
    }
}

fn key_state_from(field: &'static str, value: i32) -> Result<KeyState, KmsError> {
    match proto::KeyState::try_from(value) {
        Ok(proto::KeyState::PreActivation) => Ok(KeyState::PreActivation),
        Ok(proto::KeyState::Active) => Ok(KeyState::Active),
        Ok(proto::KeyState::Suspended) => Ok(KeyState::Suspended),
        Ok(proto::KeyState::Deactivated) => Ok(KeyState::Deactivated),
        Ok(proto::KeyState::Destroyed) => Ok(KeyState::Destroyed),
        Err(_) => Err(KmsError::invalid(
            field,
            format!("unknown key state {value}"),
        )),
    }
}

pub fn key(record: &KeyRecord) -> proto::Key {
    proto::Key {
        id: record.id.to_string(),
        name: record.name.clone(),
        description: record.description.clone(),
        state: key_state(record.state) as i32,
        extractable: record.extractable,
        creation_date: Some(timestamp(record.created_at)),
        last_update_date: Some(timestamp(record.updated_at)),
        expiration_date: record.expires_at.map(timestamp),
        origin: match record.origin {
            KeyOrigin::Generated => proto::KeyOrigin::Generated,
            KeyOrigin::Imported => proto::KeyOrigin::Imported,
            KeyOrigin::External => proto::KeyOrigin::External,
        } as i32,
        algorithm_type: "AES".into(),
        size_bits: record.size_bits,
        current_version_id: record
            .current_version
            .map(|v| v.to_string())
            .unwrap_or_default(),
        imported: record.imported,
        expiration_model: match record.expiration_model {
            None => proto::ExpirationModel::Unspecified,
            Some(ExpirationModel::KeyMaterialExpires) => proto::ExpirationModel::KeyMaterialExpires,
            Some(ExpirationModel::KeyMaterialDoesNotExpire) => {
                proto::ExpirationModel::KeyMaterialDoesNotExpire
            }
        } as i32,
        valid_to: record.valid_to.map(timestamp),
        deletion_date: record.destroyed_at.map(timestamp),
    }
}

/// Characters a name or description must not hold although they are not control
/// characters: format characters (Unicode category Cf: bidirectional overrides such as
/// U+202E that make a name display as another, zero-width spaces and joiners, U+FEFF)
/// and the line and paragraph separators U+2028 and U+2029, which break log lines.
fn invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// Names: 1..90 characters, printable and visible, no leading or trailing white space.
pub fn name(value: String) -> Result<String, KmsError> {
    let count = value.chars().count();
    if count == 0 {
        return Err(KmsError::invalid("name", "required"));
    }
    if count > MAX_NAME_CHARS {
        return Err(KmsError::invalid(
            "name",
            format!("at most {MAX_NAME_CHARS} characters; got {count}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(KmsError::invalid("name", "must be printable"));
    }
    if value.chars().any(invisible) {
        return Err(KmsError::invalid(
            "name",
            "must not contain invisible or text-direction characters (Unicode format \
             characters, line or paragraph separators)",
        ));
    }
    if value.trim() != value {
        return Err(KmsError::invalid(
            "name",
            "must not start or end with white space",
        ));
    }
    Ok(value)
}

/// Descriptions: 0..240 printable characters.
pub fn description(value: String) -> Result<String, KmsError> {
    let count = value.chars().count();
    if count > MAX_DESCRIPTION_CHARS {
        return Err(KmsError::invalid(
            "description",
            format!("at most {MAX_DESCRIPTION_CHARS} characters; got {count}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(KmsError::invalid("description", "must be printable"));
    }
    if value.chars().any(invisible) {
        return Err(KmsError::invalid(
            "description",
            "must not contain invisible or text-direction characters (Unicode format \
             characters, line or paragraph separators)",
        ));
    }
    Ok(value)
}

pub fn filter(states: &[i32], extractable: Option<bool>) -> Result<KeyFilter, KmsError> {
    let mut parsed = Vec::with_capacity(states.len());
    for value in states {
        let state = key_state_from("state", *value)?;
        if !parsed.contains(&state) {
            parsed.push(state);
        }
    }
    Ok(KeyFilter {
        states: parsed,
        extractable,
    })
}

/// `limit` absent: the default; present: 1..=MAX_LIST_LIMIT.
pub fn limit(value: Option<u32>) -> Result<usize, KmsError> {
    match value {
        None => Ok(DEFAULT_LIST_LIMIT as usize),
        Some(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Ok(n as usize),
        Some(n) => Err(KmsError::invalid(
            "limit",
            format!("must be 1..{MAX_LIST_LIMIT}; got {n}"),
        )),
    }
}

/// Largest RSA ciphertext accepted (RSA-4096).
pub const MAX_RSA_CIPHERTEXT: usize = 512;

/// The OAEP hash of a WrappingAlgorithm; UNSPECIFIED means RSAES_OAEP_SHA_256.
pub fn oaep_hash(field: &'static str, value: i32) -> Result<OaepHash, KmsError> {
    match proto::WrappingAlgorithm::try_from(value) {
        Ok(proto::WrappingAlgorithm::Unspecified | proto::WrappingAlgorithm::RsaesOaepSha256) => {
            Ok(OaepHash::Sha256)
        }
        Ok(proto::WrappingAlgorithm::RsaesOaepSha1) => Ok(OaepHash::Sha1),
        Err(_) => Err(KmsError::invalid(
            field,
            format!("unknown algorithm {value}"),
        )),
    }
}

/// RSA modulus bits of a WrappingKeySpec; UNSPECIFIED means RSA_2048.
pub fn wrapping_key_bits(value: i32) -> Result<u32, KmsError> {
    match proto::WrappingKeySpec::try_from(value) {
        Ok(proto::WrappingKeySpec::Unspecified | proto::WrappingKeySpec::Rsa2048) => Ok(2048),
        Ok(proto::WrappingKeySpec::Rsa3072) => Ok(3072),
        Ok(proto::WrappingKeySpec::Rsa4096) => Ok(4096),
        Err(_) => Err(KmsError::invalid(
            "wrapping_key_spec",
            format!("unknown key spec {value}"),
        )),
    }
}

pub fn expiration_model(value: i32) -> Result<Option<ExpirationModel>, KmsError> {
    match proto::ExpirationModel::try_from(value) {
        Ok(proto::ExpirationModel::Unspecified) => Ok(None),
        Ok(proto::ExpirationModel::KeyMaterialExpires) => {
            Ok(Some(ExpirationModel::KeyMaterialExpires))
        }
        Ok(proto::ExpirationModel::KeyMaterialDoesNotExpire) => {
            Ok(Some(ExpirationModel::KeyMaterialDoesNotExpire))
        }
        Err(_) => Err(KmsError::invalid(
            "expiration_model",
            format!("unknown expiration model {value}"),
        )),
    }
}

/// The secure-import fields of CreateKey and RotateKey: all absent, or all present with
/// the sizes IBM's format has (12-byte IV; the 12-byte nonce encrypted with its 16-byte
/// GCM tag).
pub fn secure_import(
    encrypted_payload: Vec<u8>,
    encrypted_nonce: Vec<u8>,
    iv: Vec<u8>,
    algorithm: i32,
) -> Result<Option<SecureImport>, KmsError> {
    let hash = oaep_hash("encryption_algorithm", algorithm)?;
    if encrypted_payload.is_empty() && encrypted_nonce.is_empty() && iv.is_empty() {
        return Ok(None);
    }
    if encrypted_payload.is_empty() || encrypted_payload.len() > MAX_RSA_CIPHERTEXT {
        return Err(KmsError::invalid(
            "encrypted_payload",
            format!(
                "required with encrypted_nonce and iv: the RSA-OAEP ciphertext of the key \
                 material (at most {MAX_RSA_CIPHERTEXT} bytes); got {} bytes",
                encrypted_payload.len()
            ),
        ));
    }
    if encrypted_nonce.len() != ENCRYPTED_NONCE_LEN {
        return Err(KmsError::invalid(
            "encrypted_nonce",
            format!(
                "must be {ENCRYPTED_NONCE_LEN} bytes (the 12-byte nonce AES-GCM encrypted, \
                 with its 16-byte tag); got {}",
                encrypted_nonce.len()
            ),
        ));
    }
    if iv.len() != GCM_IV_LEN {
        return Err(KmsError::invalid(
            "iv",
            format!("must be {GCM_IV_LEN} bytes; got {}", iv.len()),
        ));
    }
    Ok(Some(SecureImport {
        hash,
        encrypted_payload,
        encrypted_nonce,
        iv,
    }))
}

const ENCRYPTED_NONCE_LEN: usize = NONCE_LEN + GCM_TAG_LEN;

pub fn import_token(token: &ImportTokenRecord) -> proto::ImportToken {
    proto::ImportToken {
        creation_date: Some(timestamp(token.created_at)),
        expiration_date: Some(timestamp(token.expires_at)),
        max_allowed_retrievals: token.max_retrievals,
        remaining_retrievals: token.remaining_retrievals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any secure-import fields: all absent is no import; otherwise accepted only
        /// with the format's sizes and a known algorithm, else refused naming a field.
        #[test]
        fn secure_import_fields_are_accepted_only_whole(
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            nonce in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            iv in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20),
            algorithm in -2i32..5,
        ) {
            let (lens, known) = ((payload.len(), nonce.len(), iv.len()), (0..=2).contains(&algorithm));
            match secure_import(payload, nonce, iv, algorithm) {
                Ok(None) => proptest::prop_assert!(known && lens == (0, 0, 0)),
                Ok(Some(import)) => {
                    proptest::prop_assert!(known);
                    proptest::prop_assert!((1..=MAX_RSA_CIPHERTEXT).contains(&import.encrypted_payload.len()));
                    proptest::prop_assert_eq!(import.encrypted_nonce.len(), ENCRYPTED_NONCE_LEN);
                    proptest::prop_assert_eq!(import.iv.len(), GCM_IV_LEN);
                }
                Err(KmsError::InvalidArgument { field, .. }) => proptest::prop_assert!(
                    ["encryption_algorithm", "encrypted_payload", "encrypted_nonce", "iv"].contains(&field)
                ),
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(name("ok name".into()).is_ok());
        assert!(name("".into()).is_err());
        assert!(name(" lead".into()).is_err());
        assert!(name("trail ".into()).is_err());
        assert!(name("tab\tinside".into()).is_err());
        assert!(name("é".repeat(90)).is_ok());
        assert!(name("é".repeat(91)).is_err());
        for hidden in [
            '\u{202E}', '\u{200B}', '\u{FEFF}', '\u{2028}', '\u{2029}', '\u{2066}',
        ] {
            let error = name(format!("pay{hidden}roll")).unwrap_err().to_string();
            assert!(
                error.starts_with("name: must not contain invisible"),
                "{error}"
            );
            assert!(description(format!("a{hidden}b")).is_err());
        }
        assert!(
            name("Grüße, 鍵 ключ".into()).is_ok(),
            "ordinary letters of any script"
        );
    }

    #[test]
    fn timestamps_round_trip_at_millisecond_precision() {
        let ts = timestamp(1_700_000_000_123);
        assert_eq!(millis_from("t", &ts).unwrap(), 1_700_000_000_123);
        let bad = Timestamp {
            seconds: 1,
            nanos: -1,
        };
        assert!(millis_from("t", &bad).is_err());
    }
}
