//! Import tokens, import parameters and the RSA key-pair pool in redb.

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata};
use uuid::Uuid;

use super::{IMPORT_PARAMETERS, IMPORT_TOKENS, RSA_POOL, RedbStore, with_prefix};
use crate::domain::model::{ImportParametersRecord, ImportTokenRecord, Millis};
use crate::hsm::RsaKeyPair;
use crate::store::kv::{decode, decode_token, encode, encode_token, pool_key, token_identity};
use crate::store::{Durability, ImportStore, StoreError};

#[async_trait]
impl ImportStore for RedbStore {
    async fn get_import_token(
        &self,
        instance: &str,
    ) -> Result<Option<ImportTokenRecord>, StoreError> {
        let (_, txn) = self.read()?;
        let tokens = txn.open_table(IMPORT_TOKENS)?;
        let token = tokens.get(instance.as_bytes())?;
        token.map(|raw| decode_token(raw.value())).transpose()
    }

    async fn swap_import_token(
        &self,
        instance: &str,
        previous: Option<&ImportTokenRecord>,
        next: Option<&ImportTokenRecord>,
    ) -> Result<(), StoreError> {
        crate::store::check_token_revision(previous, next)?;
        let expected = previous.map(token_identity);
        let value = next.map(encode_token);
        let instance = instance.to_owned();
        self.write(move |txn| {
            let mut tokens = txn.open_table(IMPORT_TOKENS)?;
            let matches = {
                let current = tokens.get(instance.as_bytes())?;
                match (&current, &expected) {
                    (None, None) => true,
                    (Some(current), Some(expected)) => {
                        current.value().get(..24) == Some(&expected[..])
                    }
                    _ => false,
                }
            };
            if !matches {
                return Err(StoreError::Conflict);
            }
            match &value {
                Some(value) => {
                    tokens.insert(instance.as_bytes(), value.as_slice())?;
                }
                None => {
                    tokens.remove(instance.as_bytes())?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn import_tokens(&self) -> Result<Vec<ImportTokenRecord>, StoreError> {
        self.scan(|_, txn| {
            txn.open_table(IMPORT_TOKENS)?
                .iter()?
                .map(|entry| decode_token(entry?.1.value()))
                .collect()
        })
        .await
    }

    async fn get_import_parameters(
        &self,
        key_id: Uuid,
    ) -> Result<Option<ImportParametersRecord>, StoreError> {
        let (_, txn) = self.read()?;
        let parameters = txn.open_table(IMPORT_PARAMETERS)?;
        let record = parameters.get(key_id.as_bytes().as_slice())?;
        record
            .map(|raw| decode("import parameters", raw.value()))
            .transpose()
    }

    async fn put_import_parameters(
        &self,
        parameters: &ImportParametersRecord,
    ) -> Result<(), StoreError> {
        let (key, value) = (parameters.key_id, encode(parameters));
        self.write(move |txn| {
            txn.open_table(IMPORT_PARAMETERS)?
                .insert(key.as_bytes().as_slice(), value.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn remove_import_parameters(&self, key_id: Uuid) -> Result<(), StoreError> {
        self.write(move |txn| {
            txn.open_table(IMPORT_PARAMETERS)?
                .remove(key_id.as_bytes().as_slice())?;
            Ok(())
        })
        .await
    }

    async fn expired_import_parameters(&self, now: Millis) -> Result<Vec<Uuid>, StoreError> {
        self.scan(move |_, txn| {
            let mut expired = Vec::new();
            for entry in txn.open_table(IMPORT_PARAMETERS)?.iter()? {
                let record: ImportParametersRecord = decode("import parameters", entry?.1.value())?;
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
        let value = encode(pair);
        self.write(move |txn| {
            txn.open_table(RSA_POOL)?
                .insert(k.as_slice(), value.as_slice())?;
            Ok(())
        })
        .await
    }

    /// One writer: the pair read and removed here cannot be taken by anyone else.
    async fn take_key_pair(&self, bits: u32) -> Result<Option<RsaKeyPair>, StoreError> {
        self.write(move |txn| {
            let mut pool = txn.open_table(RSA_POOL)?;
            let first = match with_prefix(&pool, &bits.to_be_bytes())?.next() {
                Some(entry) => {
                    let (k, v) = entry?;
                    Some((k.value().to_vec(), v.value().to_vec()))
                }
                None => None,
            };
            let Some((k, raw)) = first else {
                return Ok(None);
            };
            let pair = decode("RSA key pair", &raw)?;
            pool.remove(k.as_slice())?;
            Ok(Some(pair))
        })
        .await
    }

    async fn count_key_pairs(&self, bits: u32) -> Result<usize, StoreError> {
        self.scan(move |_, txn| {
            Ok(with_prefix(&txn.open_table(RSA_POOL)?, &bits.to_be_bytes())?.count())
        })
        .await
    }

    async fn clear_import_state(&self) -> Result<usize, StoreError> {
        let dropped = self
            .write(|txn| {
                let mut dropped = 0;
                for table in [IMPORT_TOKENS, IMPORT_PARAMETERS, RSA_POOL] {
                    let mut opened = txn.open_table(table)?;
                    dropped += opened.len()? as usize;
                    opened.retain(|_, _| false)?;
                }
                Ok(dropped)
            })
            .await?;
        self.sync().await?;
        Ok(dropped)
    }
}
