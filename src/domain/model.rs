//! Keys, versions and their states, as the service reasons about them and as they are
//! persisted. Records carry `schema` so the on-disk format can evolve.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hsm::oaep::OaepHash;
use crate::hsm::{RsaKeyPair, WrappedKey};
use crate::store::Revision;

/// Version of the record format written by this build.
pub const RECORD_SCHEMA: u32 = 1;

/// Key states with IBM's numbering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum KeyState {
    PreActivation = 0,
    Active = 1,
    Suspended = 2,
    Deactivated = 3,
    Destroyed = 5,
}

impl KeyState {
    pub const ALL: [KeyState; 5] = [
        KeyState::PreActivation,
        KeyState::Active,
        KeyState::Suspended,
        KeyState::Deactivated,
        KeyState::Destroyed,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<KeyState> {
        KeyState::ALL.into_iter().find(|s| s.code() == code)
    }

    /// The name users see in errors, matching the API enum.
    pub fn name(self) -> &'static str {
        match self {
            KeyState::PreActivation => "PRE_ACTIVATION",
            KeyState::Active => "ACTIVE",
            KeyState::Suspended => "SUSPENDED",
            KeyState::Deactivated => "DEACTIVATED",
            KeyState::Destroyed => "DESTROYED",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOrigin {
    Generated,
    Imported,
    External,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpirationModel {
    KeyMaterialExpires,
    KeyMaterialDoesNotExpire,
}

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// A key's metadata. Holds no material: blobs live in `VersionRecord`s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub schema: u32,
    /// Kept by the store beside the record, for compare-and-swap.
    #[serde(skip)]
    pub revision: Revision,
    pub id: Uuid,
    pub instance: String,
    pub name: String,
    pub description: String,
    pub state: KeyState,
    pub extractable: bool,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub expires_at: Option<Millis>,
    pub origin: KeyOrigin,
    pub size_bits: u32,
    pub current_version: Option<Uuid>,
    pub imported: bool,
    pub expiration_model: Option<ExpirationModel>,
    pub valid_to: Option<Millis>,
    pub destroyed_at: Option<Millis>,
    /// EXTERNAL-origin keys: AES-CMAC of a zero block under the imported material,
    /// computed in the HSM, so a re-import can be checked to be the same material.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_option")]
    pub check_value: Option<Vec<u8>>,
}

impl KeyRecord {
    /// When the next time-driven transition is due: the expiration date of an ACTIVE
    /// key (-> DEACTIVATED), or the valid-to of imported material still present
    /// (-> material erased, PRE_ACTIVATION).
    pub fn next_transition_at(&self) -> Option<Millis> {
        let expiry = self.expires_at.filter(|_| self.state == KeyState::Active);
        let material_expiry = self.valid_to.filter(|_| self.has_expiring_material());
        match (expiry, material_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// EXTERNAL key whose imported material is present and has a valid-to.
    pub fn has_expiring_material(&self) -> bool {
        self.origin == KeyOrigin::External
            && self.valid_to.is_some()
            && matches!(
                self.state,
                KeyState::Active | KeyState::Suspended | KeyState::Deactivated
            )
    }
}

/// An instance's import token (IBM style). One per instance; a new one replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportTokenRecord {
    pub schema: u32,
    /// Kept by the store beside the record, for compare-and-swap.
    #[serde(skip)]
    pub revision: Revision,
    pub instance: String,
    pub id: Uuid,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub max_retrievals: u32,
    pub remaining_retrievals: u32,
    /// Not key material: handed to every retrieval, to be returned encrypted.
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
    /// `None` once the token expired and its private key was erased.
    pub key_pair: Option<RsaKeyPair>,
}

/// The parameters of one GetParametersForImport call for an EXTERNAL key. A new call
/// replaces them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportParametersRecord {
    pub schema: u32,
    pub key_id: Uuid,
    pub instance: String,
    /// Carried in the opaque import token, so a superseded token is recognised.
    pub id: Uuid,
    pub algorithm: OaepHash,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub key_pair: RsaKeyPair,
}

mod hex_option {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => s.serialize_str(&hex::encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

impl KeyRecord {
    /// The "root key" of IBM's vocabulary: material never leaves the HSM.
    pub fn is_root(&self) -> bool {
        !self.extractable
    }
}

/// One version of a key's material, KEK-wrapped. `wrapped` is `None` once erased.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub schema: u32,
    pub key_id: Uuid,
    pub id: Uuid,
    pub created_at: Millis,
    pub wrapped: Option<WrappedKey>,
}

/// Filters shared by ListKeys and CountKeys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Empty: any state.
    pub states: Vec<KeyState>,
    pub extractable: Option<bool>,
}

impl KeyFilter {
    pub fn matches(&self, state: KeyState, extractable: bool) -> bool {
        (self.states.is_empty() || self.states.contains(&state))
            && self.extractable.is_none_or(|e| e == extractable)
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.extractable.is_none()
    }
}

/// RFC 3339 (UTC) text of a time, for messages.
pub fn format_millis(at: Millis) -> String {
    prost_types::Timestamp {
        seconds: at.div_euclid(1000),
        nanos: (at.rem_euclid(1000) * 1_000_000) as i32,
    }
    .to_string()
}
