//! Import tokens, import parameters and the RSA key-pair pool in sled.

use async_trait::async_trait;
use uuid::Uuid;

use super::{SledStore, Trees};
use crate::domain::model::{ImportParametersRecord, ImportTokenRecord, Millis};
use crate::hsm::RsaKeyPair;
use crate::store::kv::{decode, decode_token, encode, encode_token, pool_key, token_identity};
use crate::store::{ImportStore, StoreError};

impl Trees {
    fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError> {
        crate::store::check_token_revision(previous, next)?;
        let expected = previous.map(token_identity);
        let value = next.map(encode_token);
        let outcome = self.import_tokens.transaction(|tokens| {
            let current = tokens.get(instance.as_bytes())?;
            let matches = match (&current, &expected) {
                (None, None) => true,
                (Some(current), Some(expected)) => current.get(..24) == Some(&expected[..]),
                _ => false,
            };
            if !matches {
                return Err(::sled::transaction::ConflictableTransactionError::Abort(()));
            }
            match &value {
                Some(value) => tokens.insert(instance.as_bytes(), value.as_slice())?,
                None => tokens.remove(instance.as_bytes())?,
            };
            Ok(())
        });
        match outcome {
            Ok(()) => Ok(()),
            Err(::sled::transaction::TransactionError::Abort(())) => Err(StoreError::Conflict),
            Err(::sled::transaction::TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError> {
        loop {
            let Some((k, raw)) = self
                .rsa_pool
                .scan_prefix(bits.to_be_bytes())
                .next()
                .transpose()?
            else {
                return Ok(None);
            };
            // Another caller may take the same entry: only the one whose remove finds it
            // gets it.
            if self.rsa_pool.remove(&k)?.is_some() {
                return decode("RSA key pair", &raw).map(Some);
            }
        }
    }
}

/// Point operations inline; whole-tree scans and clears on a blocking thread.
#[async_trait]
impl ImportStore for SledStore {
    async fn get_import_token(
        &self,
        instance: &str,
    ) -> Result<Option<ImportTokenRecord>, StoreError> {
        self.trees()?
            .import_tokens
            .get(instance.as_bytes())?
            .map(|raw| decode_token(&raw))
            .transpose()
    }

    async fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError> {
        self.write(|trees| trees.swap_import_token(instance, previous, next))
            .await
    }

    async fn import_tokens(&self) -> Result<Vec<ImportTokenRecord>, StoreError> {
        self.blocking(|trees| {
            trees
                .import_tokens
                .iter()
                .map(|entry| decode_token(&entry?.1))
                .collect()
        })
        .await
    }

    async fn get_import_parameters(
        &self,
        key_id: Uuid,
    ) -> Result<Option<ImportParametersRecord>, StoreError> {
        self.trees()?
            .import_parameters
            .get(key_id.as_bytes())?
            .map(|raw| decode("import parameters", &raw))
            .transpose()
    }

    async fn put_import_parameters(
        &self,
        parameters: &ImportParametersRecord,
    ) -> Result<(), StoreError> {
        self.write(|trees| {
            trees
                .import_parameters
                .insert(parameters.key_id.as_bytes(), encode(parameters))?;
            Ok(())
        })
        .await
    }

    async fn remove_import_parameters(&self, key_id: Uuid) -> Result<(), StoreError> {
        self.write(|trees| {
            trees.import_parameters.remove(key_id.as_bytes())?;
            Ok(())
        })
        .await
    }

    async fn expired_import_parameters(&self, now: Millis) -> Result<Vec<Uuid>, StoreError> {
        self.blocking(move |trees| {
            let mut expired = Vec::new();
            for entry in trees.import_parameters.iter() {
                let record: ImportParametersRecord = decode("import parameters", &entry?.1)?;
                if record.expires_at <= now {
                    expired.push(record.key_id);
                }
            }
            Ok(expired)
        })
        .await
    }

    async fn push_key_pair(&self, pair: &RsaKeyPair) -> Result<(), StoreError> {
        let k = pool_key(pair.bits);
        self.write(|trees| {
            trees.rsa_pool.insert(k, encode(pair))?;
            Ok(())
        })
        .await
    }

    async fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError> {
        self.write(|trees| trees.take_key_pair(bits)).await
    }

    async fn count_key_pairs(&self, bits: u32) -> Result<usize, StoreError> {
        self.blocking(move |trees| Ok(trees.rsa_pool.scan_prefix(bits.to_be_bytes()).count()))
            .await
    }

    async fn clear_import_state(&self) -> Result<usize, StoreError> {
        self.write_blocking(|trees| {
            let dropped =
                trees.import_tokens.len() + trees.import_parameters.len() + trees.rsa_pool.len();
            trees.import_tokens.clear()?;
            trees.import_parameters.clear()?;
            trees.rsa_pool.clear()?;
            trees.db.flush()?;
            Ok(dropped)
        })
        .await
    }
}
