//! `kms store migrate --from <sled data dir> --to <postgres url>`: moves an embedded
//! default's store to PostgreSQL, so the same token serves it from there.
//!
//! Decisions: the target must hold no keys and no audit records (a migration never
//! merges); the source server must be stopped (sled's lock says so). Every record is
//! copied through the store traits, so the target's own invariants (counters, indexes)
//! are built by the target: keys with their versions oldest first, import tokens,
//! import parameters, pooled RSA pairs, then the audit trail's blocks as stored (the
//! chain is not re-hashed, so `kms audit verify --store-url` checks the same chain) and
//! its anchor. Key revisions start again at 0 in the target.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::cli::audit::{AuditCommandError, open_data_dir};
use crate::config::{ProcessEnv, postgres_for_command};
use crate::domain::model::KeyRecord;
use crate::store::{
    AuditStore, Durability, ImportStore, KeyStore, PostgresStore, SealedBlocks, SledStore,
    StoreError,
};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0}")]
    Open(#[from] AuditCommandError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the target store is not empty ({0}); a migration never merges")]
    TargetNotEmpty(&'static str),
}

/// What was copied.
#[derive(Debug, Default)]
pub struct Migrated {
    pub keys: usize,
    pub versions: usize,
    pub import_tokens: usize,
    pub import_parameters: usize,
    pub key_pairs: usize,
    pub audit_blocks: usize,
}

/// Audit blocks copied per step.
const AUDIT_CHUNK: usize = 64;

pub async fn migrate(from: PathBuf, to: String) -> Result<Migrated, MigrateError> {
    let sled = open_data_dir(&from)?;
    let target = PostgresStore::connect(&postgres_for_command(to, &ProcessEnv)?).await?;
    if target.has_keys().await? {
        return Err(MigrateError::TargetNotEmpty("it holds keys"));
    }
    if target.audit_chain_end().await?.is_some() {
        return Err(MigrateError::TargetNotEmpty("it holds audit records"));
    }
    let progress = Progress::new();
    let mut migrated = Migrated::default();
    for key in sled.all_keys().await? {
        migrated.versions += copy_key(&sled, &target, &key).await?;
        migrated.keys += 1;
        progress.tick("keys", migrated.keys);
    }
    for token in sled.import_tokens().await? {
        let token = crate::domain::model::ImportTokenRecord {
            revision: 0,
            ..token
        };
        target
            .swap_import_token(&token.instance, None, Some(&token))
            .await?;
        migrated.import_tokens += 1;
    }
    for key_id in sled.expired_import_parameters(i64::MAX).await? {
        if let Some(parameters) = sled.get_import_parameters(key_id).await? {
            target.put_import_parameters(&parameters).await?;
            migrated.import_parameters += 1;
        }
    }
    for pair in sled.all_key_pairs().await? {
        target.push_key_pair(&pair).await?;
        migrated.key_pairs += 1;
    }
    migrated.audit_blocks = copy_audit(&sled, &target, &progress).await?;
    target.sync().await?;
    progress.done();
    Ok(migrated)
}

/// `kms store stats`: a table of the sled trees and the size on disk.
pub async fn stats(data_dir: PathBuf) -> Result<String, MigrateError> {
    let sled = open_data_dir(&data_dir)?;
    let (trees, on_disk) = sled.tree_sizes().await?;
    let mut out = String::from("| tree | entries | bytes (keys + values) |\n|---|---:|---:|\n");
    for (name, entries, bytes) in trees {
        out.push_str(&format!("| {name} | {entries} | {bytes} |\n"));
    }
    out.push_str(&format!("\nsize on disk: {on_disk} bytes\n"));
    Ok(out)
}

/// A key, its versions oldest first (the first with the key, each later one by a
/// replacement carrying it), ending with the record as it was.
async fn copy_key(
    source: &SledStore,
    target: &PostgresStore,
    key: &KeyRecord,
) -> Result<usize, StoreError> {
    let mut versions = source.list_versions(key.id).await?;
    versions.reverse();
    let mut current = KeyRecord {
        revision: 0,
        ..key.clone()
    };
    let mut versions = versions.into_iter();
    let first = versions.next();
    let copied = usize::from(first.is_some());
    target.insert_key(&current, first.as_ref()).await?;
    let mut count = copied;
    for version in versions {
        let next = KeyRecord {
            revision: current.revision + 1,
            ..current.clone()
        };
        target
            .replace_key(&current, &next, Some(&version), false)
            .await?;
        current = next;
        count += 1;
    }
    Ok(count)
}

async fn copy_audit(
    source: &SledStore,
    target: &PostgresStore,
    progress: &Progress,
) -> Result<usize, StoreError> {
    let mut copied = 0;
    let mut from = 0;
    loop {
        let chunk = source.audit_blocks_from(from, AUDIT_CHUNK).await?;
        let Some((last, _)) = chunk.last() else {
            break;
        };
        from = last + 1;
        copied += chunk.len();
        let blocks = chunk;
        // The end is the source's: the chain's newest record once the last chunk lands.
        let end = source.audit_chain_end().await?;
        target
            .append_audit(&|_| SealedBlocks {
                blocks: blocks.clone(),
                end,
            })
            .await?;
        progress.tick("audit blocks", copied);
    }
    if let Some(anchor) = source.audit_anchor().await? {
        target.prune_audit_blocks(0, anchor).await?;
    }
    if copied == 0
        && let Some(end) = source.audit_chain_end().await?
    {
        // Every record was pruned: only the end (and anchor) remain.
        target
            .append_audit(&|_| SealedBlocks {
                blocks: Vec::new(),
                end: Some(end),
            })
            .await?;
    }
    Ok(copied)
}

/// Progress on stderr: a rewritten line on a terminal, a line every 10,000 otherwise.
struct Progress {
    terminal: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn tick(&self, what: &str, done: usize) {
        if self.terminal && done.is_multiple_of(100) {
            eprint!("\rmigrated {done} {what}");
        } else if !self.terminal && done.is_multiple_of(10_000) {
            eprintln!("migrated {done} {what}");
        }
    }

    fn done(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}
