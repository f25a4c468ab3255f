//! Keys, versions and their states, as the service reasons about them and as they are
//! persisted. Records carry `schema` so the on-disk format can evolve.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hsm::WrappedKey;

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
