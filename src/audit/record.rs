//! One audit record, its place in the hash chain, and its stored form.
//!
//! A record's *body* is a fixed binary encoding of every field (each string
//! length-prefixed, so no two records encode alike) ending with the previous record's
//! hash; its hash is SHA-256 over a domain tag and the body. The store keeps records in
//! blocks: each record as `u32 body length || body || hash`, one after another. The
//! stored bytes are exactly the hashed bytes, so verification never depends on
//! re-encoding anything.

use sha2::{Digest, Sha256};

/// The hash the first record of a trail points back to.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
const DOMAIN_TAG: &[u8] = b"kms-audit-v1\0";
/// No field of a record comes near this; a longer length is corruption.
const MAX_BODY: usize = 64 * 1024;

/// A record. Carries no payload, plaintext, ciphertext, aad, token or PIN: only who,
/// where, what, on which key, with what outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Reads the body's fields in order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "a field is not UTF-8".into())
    }

    fn hash(&mut self) -> Result<[u8; 32], String> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
}

impl AuditRecord {
    /// The canonical encoding of every field but the record's own hash.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.instance.len() + self.principal.len());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        for field in [
            &self.principal,
            &self.instance,
            &self.operation,
            &self.key_id,
        ] {
            put_str(&mut out, field);
        }
        out.extend_from_slice(&self.code.to_be_bytes());
        put_str(&mut out, &self.correlation_id);
        put_str(&mut out, &self.peer);
        out.extend_from_slice(&self.prev_hash);
        out
    }

    fn from_body(body: &[u8], hash: [u8; 32]) -> Result<Self, String> {
        let mut r = Reader(body);
        let record = AuditRecord {
            seq: r.u64()?,
            time_ms: r.u64()? as i64,
            principal: r.string()?,
            instance: r.string()?,
            operation: r.string()?,
            key_id: r.string()?,
            code: r.u32()? as i32,
            correlation_id: r.string()?,
            peer: r.string()?,
            prev_hash: r.hash()?,
            hash,
        };
        if !r.0.is_empty() {
            return Err("trailing bytes in a record".into());
        }
        Ok(record)
    }

    /// The hash this record must carry, given its fields and `prev_hash`.
    pub fn compute_hash(&self) -> [u8; 32] {
        hash_body(&self.body())
    }
}

fn hash_body(body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN_TAG);
    h.update(body);
    h.finalize().into()
}

/// The stored form of consecutive records.
pub fn encode_block(records: &[AuditRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * 280);
    for record in records {
        let body = record.body();
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&record.hash);
    }
    out
}

/// A block's records, each with whether its stored hash matches its stored body.
pub fn decode_block(raw: &[u8]) -> Result<Vec<(AuditRecord, bool)>, String> {
    let mut r = Reader(raw);
    let mut records = Vec::new();
    while !r.0.is_empty() {
        let len = r.u32()? as usize;
        if len > MAX_BODY {
            return Err(format!("a record of {len} bytes"));
        }
        let body = r.take(len)?;
        let hash = r.hash()?;
        let record = AuditRecord::from_body(body, hash)?;
        records.push((record, hash_body(body) == hash));
    }
    Ok(records)
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
    fn blocks_round_trip_and_a_flipped_byte_is_seen() {
        let mut second = record();
        second.seq = 2;
        second.prev_hash = record().hash;
        second.hash = second.compute_hash();
        let block = encode_block(&[record(), second.clone()]);
        let decoded = decode_block(&block).unwrap();
        assert_eq!(decoded, vec![(record(), true), (second, true)]);
        let mut damaged = block.clone();
        damaged[30] ^= 1;
        let decoded = decode_block(&damaged);
        assert!(decoded.is_err() || decoded.unwrap().iter().any(|(_, ok)| !ok));
        assert!(decode_block(&block[..block.len() - 1]).is_err());
    }
}
