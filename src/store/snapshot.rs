//! A store's whole contents as one consistent stream of records, and loading such a
//! stream into an empty store: what `kms backup`, `kms restore` and `kms store migrate`
//! are made of.
//!
//! Decisions:
//! - A snapshot is consistent: redb reads in one read transaction and PostgreSQL in one
//!   REPEATABLE READ transaction (nothing waits); sled holds its write gate for the
//!   whole walk (reads go on, writes wait). Records are sent through a bounded
//!   channel, so memory stays bounded whatever the store's size and the walk runs at
//!   the reader's pace.
//! - The audit chain's end and anchor come first, then keys (each with its versions,
//!   oldest first), import tokens, import parameters, pooled RSA pairs, and the audit
//!   blocks oldest first: a loader can write each record as it arrives.
//! - Loading goes through the store traits, so the target builds its own counters and
//!   indexes; key revisions start again at 0. Audit blocks are copied as stored (never
//!   re-hashed), so the restored chain verifies as the original did.
//! - Keys are loaded a few hundred at a time, concurrently: one at a time, a restore
//!   paid a commit per key (about 5,000 keys/s on redb); concurrently the target
//!   batches them (about 14,000 keys/s measured). Keys are independent of each other,
//!   and every other kind of record waits until the keys before it are written.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{ChainEnd, SealedBlocks, Store, StoreError};
use crate::domain::model::{ImportParametersRecord, ImportTokenRecord, KeyRecord, VersionRecord};
use crate::hsm::RsaKeyPair;

/// Records a snapshot holds in its channel before the walk waits for the reader.
pub const SNAPSHOT_CHANNEL: usize = 256;
/// Audit blocks a loader appends per step.
const AUDIT_CHUNK: usize = 64;
/// Keys a loader writes at once. Loading them concurrently is what lets the target
/// batch them: redb's writer commits whatever is waiting as one transaction, and
/// PostgreSQL runs them on every connection of the pool, so a restore does not pay a
/// commit and a round trip per key.
const KEYS_AT_ONCE: usize = 256;

/// One record of a store's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreItem {
    /// Where the audit chain ends and what retention left as its anchor.
    AuditChain {
        end: Option<ChainEnd>,
        anchor: Option<ChainEnd>,
    },
    /// A key as stored, and its versions oldest first.
    Key {
        key: KeyRecord,
        versions: Vec<VersionRecord>,
    },
    ImportToken(ImportTokenRecord),
    ImportParameters(ImportParametersRecord),
    KeyPair(RsaKeyPair),
    /// A block of audit records under the sequence number of its first.
    AuditBlock {
        first_seq: u64,
        #[serde(with = "hex::serde")]
        block: Vec<u8>,
    },
}

/// Where snapshot records go; the walk stops when the receiver is dropped.
pub type SnapshotSink = mpsc::Sender<StoreItem>;

#[async_trait]
pub trait Snapshot: Send + Sync {
    /// Sends every record, as of one moment, to `sink`, in the order of the module doc.
    /// Returns early (with `Ok`) if the receiver goes away.
    async fn snapshot(&self, sink: SnapshotSink) -> Result<(), StoreError>;
}

/// How many records of each kind a load wrote (or a snapshot held).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemCounts {
    pub keys: u64,
    pub versions: u64,
    pub import_tokens: u64,
    pub import_parameters: u64,
    pub key_pairs: u64,
    pub audit_blocks: u64,
}

impl ItemCounts {
    pub fn add(&mut self, item: &StoreItem) {
        match item {
            StoreItem::AuditChain { .. } => {}
            StoreItem::Key { versions, .. } => {
                self.keys += 1;
                self.versions += versions.len() as u64;
            }
            StoreItem::ImportToken(_) => self.import_tokens += 1,
            StoreItem::ImportParameters(_) => self.import_parameters += 1,
            StoreItem::KeyPair(_) => self.key_pairs += 1,
            StoreItem::AuditBlock { .. } => self.audit_blocks += 1,
        }
    }

    /// The records counted (a key's versions travel with it; the chain's end is not
    /// counted).
    pub fn records(&self) -> u64 {
        self.keys + self.import_tokens + self.import_parameters + self.key_pairs + self.audit_blocks
    }
}

impl std::fmt::Display for ItemCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} keys ({} versions), {} import tokens, {} import parameters, {} pooled RSA \
             pairs, {} audit blocks",
            self.keys,
            self.versions,
            self.import_tokens,
            self.import_parameters,
            self.key_pairs,
            self.audit_blocks
        )
    }
}

/// Writes snapshot records into an empty store: keys [`KEYS_AT_ONCE`] at a time, the
/// rest in order, each kind after the keys that came before it.
pub struct Loader<'a> {
    target: &'a dyn Store,
    chain: Option<(Option<ChainEnd>, Option<ChainEnd>)>,
    pending_keys: Vec<(KeyRecord, Vec<VersionRecord>)>,
    pending_blocks: Vec<(u64, Vec<u8>)>,
    pub counts: ItemCounts,
}

impl<'a> Loader<'a> {
    pub fn new(target: &'a dyn Store) -> Self {
        Self {
            target,
            chain: None,
            pending_keys: Vec::new(),
            pending_blocks: Vec::new(),
            counts: ItemCounts::default(),
        }
    }

    pub async fn load(&mut self, item: StoreItem) -> Result<(), StoreError> {
        self.counts.add(&item);
        if !matches!(item, StoreItem::Key { .. }) {
            self.load_keys().await?;
        }
        match item {
            StoreItem::AuditChain { end, anchor } => self.chain = Some((end, anchor)),
            StoreItem::Key { key, versions } => {
                self.pending_keys.push((key, versions));
                if self.pending_keys.len() >= KEYS_AT_ONCE {
                    self.load_keys().await?;
                }
            }
            StoreItem::ImportToken(token) => {
                let token = ImportTokenRecord {
                    revision: 0,
                    ..token
                };
                self.target
                    .swap_import_token(&token.instance, None, Some(&token))
                    .await?;
            }
            StoreItem::ImportParameters(parameters) => {
                self.target.put_import_parameters(&parameters).await?;
            }
            StoreItem::KeyPair(pair) => self.target.push_key_pair(&pair).await?,
            StoreItem::AuditBlock { first_seq, block } => {
                self.pending_blocks.push((first_seq, block));
                if self.pending_blocks.len() >= AUDIT_CHUNK {
                    self.append_blocks().await?;
                }
            }
        }
        Ok(())
    }

    /// Writes what is still buffered, the audit chain's end and anchor, and waits until
    /// all of it is durable.
    pub async fn finish(mut self) -> Result<ItemCounts, StoreError> {
        self.load_keys().await?;
        if !self.pending_blocks.is_empty() {
            self.append_blocks().await?;
        }
        let (end, anchor) = self.chain.unwrap_or((None, None));
        if let Some(anchor) = anchor {
            self.target.prune_audit_blocks(0, anchor).await?;
        }
        if self.counts.audit_blocks == 0
            && let Some(end) = end
        {
            // Every record was pruned: only the end (and anchor) remain.
            self.target
                .append_audit(&|_| SealedBlocks {
                    blocks: Vec::new(),
                    end: Some(end),
                })
                .await?;
        }
        self.target.sync().await?;
        Ok(self.counts)
    }

    async fn append_blocks(&mut self) -> Result<(), StoreError> {
        let blocks = std::mem::take(&mut self.pending_blocks);
        // The end is the source's: the chain's newest record once the last block lands.
        let end = self.chain.and_then(|(end, _)| end);
        self.target
            .append_audit(&|_| SealedBlocks {
                blocks: blocks.clone(),
                end,
            })
            .await
    }

    /// Writes the buffered keys concurrently and waits for every one of them.
    async fn load_keys(&mut self) -> Result<(), StoreError> {
        let keys = std::mem::take(&mut self.pending_keys);
        futures_util::future::try_join_all(
            keys.into_iter()
                .map(|(key, versions)| load_key(self.target, key, versions)),
        )
        .await?;
        Ok(())
    }
}

/// The key with its first version, then each later version by a replacement carrying
/// it, ending with the record as it was.
async fn load_key(
    target: &dyn Store,
    key: KeyRecord,
    versions: Vec<VersionRecord>,
) -> Result<(), StoreError> {
    let mut current = KeyRecord { revision: 0, ..key };
    let mut versions = versions.into_iter();
    let first = versions.next();
    target.insert_key(&current, first.as_ref()).await?;
    for version in versions {
        let next = KeyRecord {
            revision: current.revision + 1,
            ..current.clone()
        };
        target
            .replace_key(&current, &next, Some(&version), false)
            .await?;
        current = next;
    }
    Ok(())
}

/// Refuses a target that already holds keys or audit records: a load never merges.
pub async fn ensure_empty(target: &dyn Store) -> Result<(), NotEmpty> {
    if target.has_keys().await.map_err(NotEmpty::Store)? {
        return Err(NotEmpty::Holds("keys"));
    }
    if target
        .audit_chain_end()
        .await
        .map_err(NotEmpty::Store)?
        .is_some()
    {
        return Err(NotEmpty::Holds("audit records"));
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum NotEmpty {
    #[error("the target store is not empty (it holds {0}); a restore or migration never merges")]
    Holds(&'static str),
    #[error("{0}")]
    Store(StoreError),
}

/// Copies `source`'s snapshot into the empty `target`, calling `copied` after each
/// record; returns what was copied once it is durable in the target.
pub async fn copy(
    source: &dyn Snapshot,
    target: &dyn Store,
    copied: &(dyn Fn(&StoreItem) + Sync),
) -> Result<ItemCounts, StoreError> {
    let (sink, mut records) = mpsc::channel(SNAPSHOT_CHANNEL);
    let load = async move {
        let mut loader = Loader::new(target);
        while let Some(item) = records.recv().await {
            copied(&item);
            loader.load(item).await?;
        }
        loader.finish().await
    };
    // A failed load drops the receiver, which ends the walk.
    let (walked, loaded) = tokio::join!(source.snapshot(sink), load);
    walked?;
    loaded
}
