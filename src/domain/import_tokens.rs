//! Import tokens, IBM Key Protect style: one per instance, an RSA-4096 key pair made in
//! the HSM (private key stored only KEK-wrapped), a 12-byte nonce, an expiration and a
//! retrieval budget.
//!
//! Decisions where the sources are silent or disagree:
//! - `max_allowed_retrievals` limits GetImportToken only. A client that retrieved the
//!   token may import with it until it expires, as IBM documents ("can be reused to
//!   import one or more keys up until the date that the import token expires"); an
//!   expired token is refused for import whatever its retrievals.
//! - An expired token's private key is erased by a sweep at once; the token's metadata
//!   stays for a day so GetImportToken can say "expired" rather than "none", then it
//!   is removed.

use std::sync::Arc;

use uuid::Uuid;

use super::key_pairs::KeyPairPool;
use super::model::{ImportTokenRecord, Millis, RECORD_SCHEMA, now_millis};
use super::{CallerContext, KmsError, retry_on_conflict};
use crate::hsm::{Hsm, RsaKeyPair};
use crate::store::{ImportStore, Revision, StoreError};

/// Import tokens use RSA-4096 key pairs.
pub const IMPORT_TOKEN_RSA_BITS: u32 = 4096;
pub const NONCE_LEN: usize = 12;
pub const DEFAULT_EXPIRATION_SECS: u32 = 600;
pub const MAX_EXPIRATION_SECS: u32 = 86_400;
pub const DEFAULT_MAX_RETRIEVALS: u32 = 1;
pub const MAX_RETRIEVALS: u32 = 500;
/// How long an expired token's metadata is kept (without its private key).
const EXPIRED_TOKEN_KEPT_MILLIS: Millis = 24 * 60 * 60 * 1000;

/// A GetImportToken answer: the metadata after this retrieval, public key and nonce.
#[derive(Debug)]
pub struct RetrievedToken {
    pub token: ImportTokenRecord,
    pub public_key: Vec<u8>,
}

/// What secure import needs from the instance's token.
#[derive(Debug)]
pub struct UsableToken {
    pub key_pair: RsaKeyPair,
    pub nonce: Vec<u8>,
}

pub struct ImportTokenManager {
    hsm: Arc<Hsm>,
    store: Arc<dyn ImportStore>,
    pairs: Arc<KeyPairPool>,
    min_expiration_secs: u32,
}

impl ImportTokenManager {
    pub fn new(
        hsm: Arc<Hsm>,
        store: Arc<dyn ImportStore>,
        pairs: Arc<KeyPairPool>,
        min_expiration_secs: u32,
    ) -> Self {
        Self {
            hsm,
            store,
            pairs,
            min_expiration_secs,
        }
    }

    /// Creates the instance's token, replacing any previous one.
    pub async fn create(
        &self,
        ctx: &CallerContext,
        expiration_secs: Option<u32>,
        max_retrievals: Option<u32>,
    ) -> Result<ImportTokenRecord, KmsError> {
        let expiration = expiration_secs.unwrap_or(DEFAULT_EXPIRATION_SECS);
        if !(self.min_expiration_secs..=MAX_EXPIRATION_SECS).contains(&expiration) {
            return Err(KmsError::invalid(
                "expiration",
                format!(
                    "must be {}..{MAX_EXPIRATION_SECS} seconds; got {expiration}",
                    self.min_expiration_secs
                ),
            ));
        }
        let max_retrievals = max_retrievals.unwrap_or(DEFAULT_MAX_RETRIEVALS);
        if !(1..=MAX_RETRIEVALS).contains(&max_retrievals) {
            return Err(KmsError::invalid(
                "max_allowed_retrievals",
                format!("must be 1..{MAX_RETRIEVALS}; got {max_retrievals}"),
            ));
        }
        let key_pair = self.pairs.take(IMPORT_TOKEN_RSA_BITS).await?;
        let nonce = self.hsm.random_bytes(NONCE_LEN).await?;
        let now = now_millis();
        let token = ImportTokenRecord {
            schema: RECORD_SCHEMA,
            revision: 0,
            instance: ctx.instance.clone(),
            id: Uuid::new_v4(),
            created_at: now,
            expires_at: now + Millis::from(expiration) * 1000,
            max_retrievals,
            remaining_retrievals: max_retrievals,
            nonce,
            key_pair: Some(key_pair),
        };
        self.swap(ctx, |_| Ok((token.clone(), token.clone()))).await
    }

    /// Returns the token's public key and nonce, using up one retrieval.
    pub async fn retrieve(&self, ctx: &CallerContext) -> Result<RetrievedToken, KmsError> {
        self.swap(ctx, |stored| {
            let token = usable_token(stored)?;
            if token.remaining_retrievals == 0 {
                return Err(KmsError::FailedPrecondition(format!(
                    "the import token has no retrievals left (max_allowed_retrievals was {}); \
                     create a new import token",
                    token.max_retrievals
                )));
            }
            let public_key = token
                .key_pair
                .as_ref()
                .map(|pair| pair.public_key.clone())
                .ok_or_else(|| expired(&token))?;
            let next = ImportTokenRecord {
                remaining_retrievals: token.remaining_retrievals - 1,
                ..token
            };
            let retrieved = RetrievedToken {
                token: next.clone(),
                public_key,
            };
            Ok((next, retrieved))
        })
        .await
    }

    /// Replaces the instance's token by what `change` makes of the stored one, retrying
    /// when another call changed it in between. Durable once the caller's group flush
    /// (the API's call gate) returns.
    async fn swap<T>(
        &self,
        ctx: &CallerContext,
        change: impl Fn(Option<ImportTokenRecord>) -> Result<(ImportTokenRecord, T), KmsError>,
    ) -> Result<T, KmsError> {
        retry_on_conflict(|| async {
            let previous = self.store.get_import_token(&ctx.instance).await?;
            let (next, output) = change(previous.clone())?;
            let next = ImportTokenRecord {
                revision: next_revision(previous.as_ref(), &next),
                ..next
            };
            self.store
                .swap_import_token(&ctx.instance, previous.as_ref(), Some(&next))
                .await?;
            Ok(output)
        })
        .await
    }

    /// The instance's token for a secure import: it must exist and not have expired.
    pub async fn usable(&self, ctx: &CallerContext) -> Result<UsableToken, KmsError> {
        let token = self.current(ctx).await?;
        let key_pair = token.key_pair.clone().ok_or_else(|| expired(&token))?;
        Ok(UsableToken {
            key_pair,
            nonce: token.nonce,
        })
    }

    /// The instance's token, refused when it does not exist or has expired.
    async fn current(&self, ctx: &CallerContext) -> Result<ImportTokenRecord, KmsError> {
        usable_token(self.store.get_import_token(&ctx.instance).await?)
    }

    /// Erases the private keys of expired tokens and removes tokens expired for a day.
    /// Returns how many tokens it changed.
    pub async fn sweep(&self) -> Result<usize, KmsError> {
        let now = now_millis();
        let mut changed = 0;
        for token in self.store.import_tokens().await? {
            let next = if token.expires_at + EXPIRED_TOKEN_KEPT_MILLIS <= now {
                None
            } else if token.expires_at <= now && token.key_pair.is_some() {
                Some(ImportTokenRecord {
                    key_pair: None,
                    revision: token.revision + 1,
                    ..token.clone()
                })
            } else {
                continue;
            };
            match self
                .store
                .swap_import_token(&token.instance, Some(&token), next.as_ref())
                .await
            {
                // A concurrent replacement wins; the next sweep looks again.
                Ok(()) | Err(StoreError::Conflict) => changed += 1,
                Err(e) => return Err(e.into()),
            }
        }
        if changed > 0 {
            self.store.sync().await?;
        }
        Ok(changed)
    }
}

/// A changed token continues its revisions; a new token (another id) starts at 0.
fn next_revision(previous: Option<&ImportTokenRecord>, next: &ImportTokenRecord) -> Revision {
    match previous {
        Some(previous) if previous.id == next.id => previous.revision + 1,
        _ => 0,
    }
}

/// A stored token, refused when there is none or it has expired.
fn usable_token(stored: Option<ImportTokenRecord>) -> Result<ImportTokenRecord, KmsError> {
    let token = stored.ok_or_else(|| KmsError::NotFound {
        what: "import token for this instance (create one with CreateImportToken)".into(),
    })?;
    if token.expires_at <= now_millis() || token.key_pair.is_none() {
        return Err(expired(&token));
    }
    Ok(token)
}

fn expired(token: &ImportTokenRecord) -> KmsError {
    KmsError::FailedPrecondition(format!(
        "the import token expired at {}; create a new import token",
        super::model::format_millis(token.expires_at)
    ))
}
