//! The self-describing ciphertext WrapKey returns, and the GCM additional data that binds
//! it to its key, its key version and the caller's aad list.
//!
//! ```text
//! ciphertext = format (1 byte, 0x01)
//!            || key version id (16 bytes, UUID)
//!            || IV (12 bytes, from the HSM's RNG)
//!            || AES-256-GCM ciphertext || tag (16 bytes)
//!
//! GCM additional data =
//!              "kms.v1.wrap" (11 bytes, a domain label)
//!            || format (1 byte)
//!            || key id (16 bytes) || key version id (16 bytes)
//!            || number of aad entries (u32, big endian)
//!            || for each entry: length (u32, big endian) || bytes (UTF-8)
//! ```
//!
//! The length prefixes make the aad encoding injective: `["ab","c"]` and `["a","bc"]`
//! authenticate differently, and so do `[]` and `[""]`.

use uuid::Uuid;

use crate::hsm::{GCM_IV_LEN, GCM_TAG_LEN, Sealed};

pub const FORMAT_V1: u8 = 0x01;
const DOMAIN_LABEL: &[u8] = b"kms.v1.wrap";
const HEADER_LEN: usize = 1 + 16 + GCM_IV_LEN;

/// Limits of SPEC section 4.
pub const MAX_PLAINTEXT: usize = 4096;
pub const MAX_AAD_ENTRIES: usize = 126;
pub const MAX_AAD_ENTRY_BYTES: usize = 255;
/// The largest ciphertext a valid WrapKey can have produced.
pub const MAX_CIPHERTEXT: usize = HEADER_LEN + MAX_PLAINTEXT + GCM_TAG_LEN;

pub fn encode(version_id: Uuid, sealed: &Sealed) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.ciphertext.len());
    out.push(FORMAT_V1);
    out.extend_from_slice(version_id.as_bytes());
    out.extend_from_slice(&sealed.iv);
    out.extend_from_slice(&sealed.ciphertext);
    out
}

/// Splits a ciphertext into its version id and sealed parts; `None` for anything that
/// is not a well-formed version-1 ciphertext.
pub fn decode(bytes: &[u8]) -> Option<(Uuid, Sealed)> {
    if bytes.len() < HEADER_LEN + GCM_TAG_LEN + 1 || bytes.len() > MAX_CIPHERTEXT {
        return None;
    }
    if bytes[0] != FORMAT_V1 {
        return None;
    }
    let version_id = Uuid::from_bytes(bytes[1..17].try_into().ok()?);
    let iv: [u8; GCM_IV_LEN] = bytes[17..HEADER_LEN].try_into().ok()?;
    Some((
        version_id,
        Sealed {
            iv,
            ciphertext: bytes[HEADER_LEN..].to_vec(),
        },
    ))
}

/// The GCM additional data for one key version and aad list.
pub fn additional_data(key_id: Uuid, version_id: Uuid, aad: &[String]) -> Vec<u8> {
    let size: usize = aad.iter().map(|a| 4 + a.len()).sum();
    let mut out = Vec::with_capacity(DOMAIN_LABEL.len() + 1 + 32 + 4 + size);
    out.extend_from_slice(DOMAIN_LABEL);
    out.push(FORMAT_V1);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(version_id.as_bytes());
    out.extend_from_slice(&(aad.len() as u32).to_be_bytes());
    for entry in aad {
        out.extend_from_slice(&(entry.len() as u32).to_be_bytes());
        out.extend_from_slice(entry.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_encoding_is_injective() {
        let (k, v) = (Uuid::new_v4(), Uuid::new_v4());
        let strs = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = additional_data(k, v, &strs(&["ab", "c"]));
        let b = additional_data(k, v, &strs(&["a", "bc"]));
        let empty = additional_data(k, v, &[]);
        let one_empty = additional_data(k, v, &strs(&[""]));
        assert_ne!(a, b);
        assert_ne!(empty, one_empty);
        assert_ne!(additional_data(k, Uuid::new_v4(), &[]), empty);
    }

    #[test]
    fn round_trip_and_rejects() {
        let v = Uuid::new_v4();
        let sealed = Sealed {
            iv: [7; GCM_IV_LEN],
            ciphertext: vec![1; 48],
        };
        let bytes = encode(v, &sealed);
        let (version, parsed) = decode(&bytes).unwrap();
        assert_eq!(version, v);
        assert_eq!(parsed.iv, sealed.iv);
        assert_eq!(parsed.ciphertext, sealed.ciphertext);

        let mut wrong_format = bytes.clone();
        wrong_format[0] = 2;
        assert!(decode(&wrong_format).is_none());
        assert!(decode(&bytes[..HEADER_LEN + GCM_TAG_LEN]).is_none());
        assert!(decode(&[]).is_none());
    }
}
