//! A bounded pool of pre-generated RSA key pairs, so CreateImportToken and
//! GetParametersForImport do not wait seconds for C_GenerateKeyPair (RSA-4096 takes
//! about 4.6 s on SoftHSM).
//!
//! Pairs are generated in the HSM by a background task, the private key wrapped under
//! the master KEK, and kept in the store, so a restart keeps a warm pool. Each size
//! holds at most `target` pairs. Taking a pair wakes the task to replace it.
//!
//! When the pool of a size is empty (a burst larger than the pool, or `target` 0), the
//! request generates its own pair on the spot: it is slow, never refused.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::KmsError;
use crate::hsm::{Hsm, RsaKeyPair};
use crate::store::ImportStore;

/// RSA sizes the pool keeps, in the order the refill task serves them.
pub const POOL_SIZES: [u32; 3] = [2048, 4096, 3072];
/// How long the refill task waits after an HSM or store error.
const RETRY_AFTER: Duration = Duration::from_secs(5);

pub struct KeyPairPool {
    hsm: Arc<Hsm>,
    store: Arc<dyn ImportStore>,
    target: usize,
    wake: Notify,
}

impl KeyPairPool {
    pub fn new(hsm: Arc<Hsm>, store: Arc<dyn ImportStore>, target: usize) -> Arc<Self> {
        Arc::new(Self {
            hsm,
            store,
            target,
            wake: Notify::new(),
        })
    }

    /// A pair of `bits`: from the pool when it has one, else generated now.
    pub async fn take(&self, bits: u32) -> Result<RsaKeyPair, KmsError> {
        if let Some(pair) = self.store.take_key_pair(bits).await? {
            tracing::debug!(bits, "RSA key pair taken from the pool");
            self.wake.notify_one();
            return Ok(pair);
        }
        if self.target > 0 {
            tracing::info!(
                bits,
                "RSA key-pair pool is empty: generating a pair on the request path"
            );
            self.wake.notify_one();
        }
        Ok(self.hsm.generate_rsa_pair(bits).await?)
    }

    /// Keeps every size at `target` pairs, one pair at a time, round robin, so each size
    /// gets its first pair early. Runs until aborted.
    pub async fn refill_forever(self: Arc<Self>) {
        if self.target == 0 {
            return;
        }
        loop {
            match self.refill_one().await {
                Ok(true) => continue,
                Ok(false) => {
                    tracing::info!(per_size = self.target, "RSA key-pair pool is full");
                    self.wake.notified().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refilling the RSA key-pair pool failed; retrying");
                    tokio::time::sleep(RETRY_AFTER).await;
                }
            }
        }
    }

    /// Adds one pair to each size below target. False when every size is full.
    async fn refill_one(&self) -> Result<bool, KmsError> {
        let mut added = false;
        for bits in POOL_SIZES {
            if self.store.count_key_pairs(bits).await? < self.target {
                let pair = self.hsm.generate_rsa_pair(bits).await?;
                self.store.push_key_pair(&pair).await?;
                tracing::debug!(bits, "RSA key pair added to the pool");
                added = true;
            }
        }
        Ok(added)
    }
}
