//! The store contract as executable checks: every backend runs all of them
//! (`tests/store_conformance.rs`: sled in a temporary directory, PostgreSQL in a
//! throwaway cluster). Each check takes a fresh, empty store and panics with a message
//! naming what broke.
//!
//! By concern: keys, versions and listings ([`keys`]); import tokens, parameters and the
//! RSA pair pool ([`imports`]); the audit chain, snapshots and schema versions
//! ([`audit`]).

mod audit;
mod imports;
mod keys;

pub use audit::{audit_chain, newer_schema_is_refused, snapshot_holds_everything};
pub use imports::{import_parameters_and_pairs, import_tokens, last_retrieval_goes_once};
pub use keys::{
    concurrent_updates_lose_nothing, expiry_index, keys_and_counters, list_pages,
    list_pages_after_a_position, replace_by_revision, version_material, version_pages, versions,
    versions_of_an_earlier_layout,
};

use uuid::Uuid;

use crate::domain::model::{
    ImportParametersRecord, ImportTokenRecord, KeyFilter, KeyOrigin, KeyRecord, KeyState,
    RECORD_SCHEMA, VersionRecord,
};
use crate::hsm::oaep::OaepHash;
use crate::hsm::{RsaKeyPair, WrapFormat, WrappedKey};

pub(crate) fn key(
    instance: &str,
    created_at: i64,
    state: KeyState,
    extractable: bool,
) -> KeyRecord {
    KeyRecord {
        schema: RECORD_SCHEMA,
        revision: 0,
        id: Uuid::new_v4(),
        instance: instance.into(),
        name: "k".into(),
        description: String::new(),
        state,
        extractable,
        created_at,
        updated_at: created_at,
        expires_at: None,
        origin: KeyOrigin::Generated,
        size_bits: 256,
        current_version: None,
        imported: false,
        expiration_model: None,
        valid_to: None,
        destroyed_at: None,
        check_value: None,
    }
}

pub(crate) fn version(key_id: Uuid, created_at: i64) -> VersionRecord {
    VersionRecord {
        schema: RECORD_SCHEMA,
        key_id,
        id: Uuid::new_v4(),
        created_at,
        wrapped: Some(WrappedKey {
            format: WrapFormat::Rfc5649,
            blob: vec![created_at as u8; 40],
        }),
    }
}

pub(crate) fn changed(key: &KeyRecord, change: impl FnOnce(&mut KeyRecord)) -> KeyRecord {
    let mut next = key.clone();
    next.revision = key.revision + 1;
    change(&mut next);
    next
}

fn pair(bits: u32, tag: u8) -> RsaKeyPair {
    RsaKeyPair {
        bits,
        public_key: vec![tag],
        private_key: WrappedKey {
            format: WrapFormat::Rfc5649,
            blob: vec![tag; 8],
        },
    }
}

fn token(instance: &str) -> ImportTokenRecord {
    ImportTokenRecord {
        schema: RECORD_SCHEMA,
        revision: 0,
        instance: instance.into(),
        id: Uuid::new_v4(),
        created_at: 1,
        expires_at: 2,
        max_retrievals: 2,
        remaining_retrievals: 2,
        nonce: vec![0; 12],
        key_pair: Some(pair(4096, 9)),
    }
}

fn all() -> KeyFilter {
    KeyFilter::default()
}

fn only(state: KeyState) -> KeyFilter {
    KeyFilter {
        states: vec![state],
        extractable: None,
    }
}
