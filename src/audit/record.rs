//! One audit record and its place in the hash chain.
//!
//! A record's hash is SHA-256 over a fixed binary encoding of every field (each string
//! length-prefixed, so no two records encode alike) followed by the previous record's
//! hash. The stored form is JSON, for people; the hash never depends on how JSON
//! happens to be written.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The hash the first record of a trail points back to.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
const DOMAIN_TAG: &[u8] = b"kms-audit-v1\0";

/// A record as stored. Carries no payload, plaintext, ciphertext, aad, token or PIN:
/// only who, where, what, on which key, with what outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    /// The principal, `anonymous` (not authenticated) or `system` (time-driven changes).
    pub principal: String,
    /// Empty when the call named no valid instance.
    pub instance: String,
    /// The RPC name (`WrapKey`) or the time-driven change (`ExpireKey`).
    pub operation: String,
    /// Empty when the call concerned no key or named no valid key id.
    pub key_id: String,
    /// The gRPC status code of the answer (0 = OK).
    pub code: i32,
    pub correlation_id: String,
    /// The caller's address; empty for time-driven changes.
    pub peer: String,
    #[serde(with = "hex::serde")]
    pub prev_hash: [u8; 32],
    #[serde(with = "hex::serde")]
    pub hash: [u8; 32],
}

impl AuditRecord {
    /// The hash this record must carry, given its fields and `prev_hash`.
    pub fn compute_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(DOMAIN_TAG);
        h.update(self.seq.to_be_bytes());
        h.update(self.time_ms.to_be_bytes());
        for field in [
            &self.principal,
            &self.instance,
            &self.operation,
            &self.key_id,
        ] {
            h.update((field.len() as u32).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.update(self.code.to_be_bytes());
        for field in [&self.correlation_id, &self.peer] {
            h.update((field.len() as u32).to_be_bytes());
            h.update(field.as_bytes());
        }
        h.update(self.prev_hash);
        h.finalize().into()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("audit records always serialize")
    }

    pub fn decode(raw: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(raw).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AuditRecord {
        let mut r = AuditRecord {
            seq: 1,
            time_ms: 1_700_000_000_000,
            principal: "app".into(),
            instance: "tenant".into(),
            operation: "WrapKey".into(),
            key_id: String::new(),
            code: 0,
            correlation_id: "c".into(),
            peer: "127.0.0.1:1".into(),
            prev_hash: GENESIS_HASH,
            hash: [0; 32],
        };
        r.hash = r.compute_hash();
        r
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = record();
        type Change = Box<dyn Fn(&mut AuditRecord)>;
        let changes: Vec<Change> = vec![
            Box::new(|r| r.seq += 1),
            Box::new(|r| r.time_ms += 1),
            Box::new(|r| r.principal.push('x')),
            Box::new(|r| r.instance.push('x')),
            Box::new(|r| r.operation.push('x')),
            Box::new(|r| r.key_id.push('x')),
            Box::new(|r| r.code = 7),
            Box::new(|r| r.correlation_id.push('x')),
            Box::new(|r| r.peer.push('x')),
            Box::new(|r| r.prev_hash[0] = 1),
        ];
        for change in changes {
            let mut r = base.clone();
            change(&mut r);
            assert_ne!(r.compute_hash(), base.hash);
        }
    }

    #[test]
    fn field_boundaries_matter() {
        let mut a = record();
        a.principal = "ab".into();
        a.instance = "c".into();
        let mut b = record();
        b.principal = "a".into();
        b.instance = "bc".into();
        assert_ne!(a.compute_hash(), b.compute_hash());
    }

    #[test]
    fn records_round_trip_through_their_stored_form() {
        let r = record();
        assert_eq!(AuditRecord::decode(&r.encode()).unwrap(), r);
    }
}
