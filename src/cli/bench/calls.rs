//! What the scenarios share: requests for an instance, keys and ciphertexts to call on.

use tonic::Request;
use tonic::metadata::MetadataValue;

use super::BenchError;
use crate::cli::connect::AuthedChannel;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::{CreateKeyRequest, WrapKeyRequest};

pub(super) fn spread(call: usize, len: usize) -> usize {
    // A multiplicative hash keeps consecutive calls on different keys.
    call.wrapping_mul(2_654_435_761) % len
}

pub(super) fn with_instance<T>(instance: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = MetadataValue::try_from(instance) {
        request.metadata_mut().insert("bluemix-instance", value);
    }
    request
}

pub(super) async fn create_root_keys(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
    count: usize,
) -> Result<Vec<String>, BenchError> {
    let mut ids = Vec::with_capacity(count);
    for batch in (0..count).collect::<Vec<_>>().chunks(64) {
        let mut pending = Vec::new();
        for i in batch {
            let mut keys = keys.clone();
            let request = with_instance(
                instance,
                CreateKeyRequest {
                    name: format!("bench-{i}"),
                    ..Default::default()
                },
            );
            pending.push(tokio::spawn(async move { keys.create_key(request).await }));
        }
        for task in pending {
            let key = task
                .await
                .expect("create task")
                .map_err(BenchError::Setup)?;
            ids.push(key.into_inner().key.map(|k| k.id).unwrap_or_default());
        }
    }
    Ok(ids)
}

pub(super) async fn wrap_one_each(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
    ids: Vec<String>,
) -> Result<Vec<(String, Vec<u8>)>, BenchError> {
    let mut samples = Vec::with_capacity(ids.len());
    for id in ids {
        let wrapped = keys
            .clone()
            .wrap_key(with_instance(
                instance,
                WrapKeyRequest {
                    id: id.clone(),
                    plaintext: Some(vec![0x5a; 32]),
                    aad: vec!["bench".into()],
                },
            ))
            .await?
            .into_inner();
        samples.push((id, wrapped.ciphertext));
    }
    Ok(samples)
}
