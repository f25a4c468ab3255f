//! ListAuditEvents: newest first, filtered, paged by an opaque token.
//!
//! A page token is the sequence number to continue below and a digest of the query it
//! belongs to (scope and filters), hex-encoded; a token used with another query is
//! refused. The token grants nothing: scope and filters are applied to every page from
//! the request itself, so an edited sequence number only moves where the page starts. A call reads at most [`SCAN_BUDGET`] records, so its cost is
//! bounded whatever the filters: a page may hold fewer than `page_size` events while
//! `next_page_token` is still set. Paging ends when `next_page_token` is empty.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AuditError;
use super::record::{AuditRecord, decode_block};
use crate::store::AuditStore;

/// Records read per call at most.
pub const SCAN_BUDGET: usize = 10_000;
/// Blocks read from the store at a time.
const READ_BLOCKS: usize = 4;

#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// `None`: every instance.
    pub instance: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub key_id: Option<Uuid>,
    pub principal: Option<String>,
    pub operation: Option<String>,
    pub code: Option<i32>,
    pub page_size: usize,
    /// Continue below this sequence number (from a page token).
    pub before_seq: Option<u64>,
}

pub struct AuditPage {
    pub records: Vec<AuditRecord>,
    pub next_page_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "page_token: not a token of this query (it is opaque: pass back next_page_token unchanged, with the same filters)"
)]
pub struct PageTokenError;

impl AuditQuery {
    fn digest(&self) -> [u8; 8] {
        let mut h = Sha256::new();
        let mut field = |value: Option<&[u8]>| match value {
            None => h.update([0]),
            Some(bytes) => {
                h.update([1]);
                h.update((bytes.len() as u32).to_be_bytes());
                h.update(bytes);
            }
        };
        field(self.instance.as_deref().map(str::as_bytes));
        field(self.since_ms.map(i64::to_be_bytes).as_ref().map(|b| &b[..]));
        field(self.until_ms.map(i64::to_be_bytes).as_ref().map(|b| &b[..]));
        field(self.key_id.as_ref().map(|id| &id.as_bytes()[..]));
        field(self.principal.as_deref().map(str::as_bytes));
        field(self.operation.as_deref().map(str::as_bytes));
        field(self.code.map(i32::to_be_bytes).as_ref().map(|b| &b[..]));
        let full: [u8; 32] = h.finalize().into();
        full[..8].try_into().expect("8 bytes")
    }

    /// Reads a page token made by [`run`] for this same query.
    pub fn resume_from(&mut self, token: &str) -> Result<(), PageTokenError> {
        let mut raw = [0u8; 16];
        hex::decode_to_slice(token, &mut raw).map_err(|_| PageTokenError)?;
        if raw[8..] != self.digest() {
            return Err(PageTokenError);
        }
        self.before_seq = Some(u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")));
        Ok(())
    }

    fn token(&self, before_seq: u64) -> String {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&before_seq.to_be_bytes());
        raw[8..].copy_from_slice(&self.digest());
        hex::encode(raw)
    }

    fn matches(&self, r: &AuditRecord) -> bool {
        self.instance.as_ref().is_none_or(|i| *i == r.instance)
            && self.since_ms.is_none_or(|t| r.time_ms >= t)
            && self.until_ms.is_none_or(|t| r.time_ms < t)
            && self.key_id.is_none_or(|k| r.key_id == k.to_string())
            && self.principal.as_ref().is_none_or(|p| *p == r.principal)
            && self.operation.as_ref().is_none_or(|o| *o == r.operation)
            && self.code.is_none_or(|c| c == r.code)
    }
}

pub(super) async fn run(
    store: &dyn AuditStore,
    query: &AuditQuery,
) -> Result<AuditPage, AuditError> {
    let mut records = Vec::new();
    let mut scanned = 0;
    // Blocks are keyed by their first record, so the block holding `before_seq - 1`
    // is the newest one keyed below `before_seq`.
    let mut below_block = query.before_seq;
    loop {
        let blocks = store.audit_blocks_before(below_block, READ_BLOCKS).await?;
        if blocks.is_empty() {
            return Ok(AuditPage {
                records,
                next_page_token: None,
            });
        }
        for (block_seq, raw) in blocks {
            below_block = Some(block_seq);
            let decoded = decode_block(&raw).map_err(|reason| AuditError::Corrupt {
                seq: block_seq,
                reason,
            })?;
            for (record, _) in decoded.into_iter().rev() {
                if query.before_seq.is_some_and(|before| record.seq >= before) {
                    continue;
                }
                scanned += 1;
                let seq = record.seq;
                if query.matches(&record) {
                    records.push(record);
                    if records.len() == query.page_size {
                        return Ok(AuditPage {
                            records,
                            next_page_token: (seq > 1).then(|| query.token(seq)),
                        });
                    }
                }
                if scanned >= SCAN_BUDGET {
                    return Ok(AuditPage {
                        records,
                        next_page_token: (seq > 1).then(|| query.token(seq)),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_only_fits_its_own_query() {
        let query = AuditQuery {
            instance: Some("a".into()),
            page_size: 10,
            ..Default::default()
        };
        let token = query.token(42);
        let mut same = query.clone();
        same.resume_from(&token).unwrap();
        assert_eq!(same.before_seq, Some(42));
        let mut other = AuditQuery {
            instance: Some("b".into()),
            ..query.clone()
        };
        assert!(other.resume_from(&token).is_err());
        let mut tampered = query.clone();
        let mut bad = token.clone().into_bytes();
        bad[20] = if bad[20] == b'0' { b'1' } else { b'0' };
        assert!(
            tampered
                .resume_from(&String::from_utf8(bad).unwrap())
                .is_err()
        );
        assert!(tampered.resume_from("xyz").is_err());
    }
}
