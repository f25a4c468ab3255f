//! The store at size: `--preload N` fills the bench instance to N keys (through the
//! public API, so every key is a real HSM-generated, KEK-wrapped, durable root key),
//! and the `get`, `list-first`, `list-deep` and `count` scenarios read it.
//!
//! `list-deep` calls ListKeys (limit 200) with page tokens from every depth of the
//! listing, gathered by one walk over all of it before the measurement; `get` calls
//! GetKey on keys sampled evenly over the whole instance in that walk.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::calls::with_instance;
use super::{BenchError, CallFuture};
use crate::cli::connect::AuthedChannel;
use crate::cli::progress::Progress;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::{CountKeysRequest, CreateKeyRequest, GetKeyRequest, ListKeysRequest};

/// Page size of the list scenarios and of the walk.
pub(super) const PAGE: u32 = 200;
/// At most this many key ids are kept for `get`, evenly spaced over the instance.
const MAX_SAMPLED_IDS: usize = 65_536;

/// Creates keys in `instance` until it holds `target` keys, `in_flight` calls at once.
pub(super) async fn preload(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
    target: u64,
    in_flight: usize,
) -> Result<(), BenchError> {
    let existing = count(keys, instance).await?;
    if existing >= target {
        eprintln!("preload: {instance} already holds {existing} keys");
        return Ok(());
    }
    let missing = (target - existing) as usize;
    let progress = Arc::new(Progress::new(
        &format!("preload {instance}"),
        Some(missing as u64),
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(in_flight);
    for _ in 0..in_flight.max(1) {
        let (mut keys, instance) = (keys.clone(), instance.to_string());
        let (next, progress) = (Arc::clone(&next), Arc::clone(&progress));
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= missing {
                    return Ok::<(), tonic::Status>(());
                }
                let request = CreateKeyRequest {
                    name: format!("preload-{}", existing as usize + n),
                    ..Default::default()
                };
                keys.create_key(with_instance(&instance, request)).await?;
                progress.add(1);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("preload worker panicked")?;
    }
    if let Ok(progress) = Arc::try_unwrap(progress) {
        progress.finish();
    }
    Ok(())
}

pub(super) async fn count(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
) -> Result<u64, BenchError> {
    Ok(keys
        .clone()
        .count_keys(with_instance(instance, CountKeysRequest::default()))
        .await?
        .into_inner()
        .count)
}

/// What one walk over the instance's listing gathered.
pub(super) struct Listing {
    /// The page token of every page after the first, in listing order.
    pub tokens: Vec<String>,
    /// Key ids spaced evenly over the listing.
    pub ids: Vec<String>,
}

/// Walks every page of the instance's keys.
pub(super) async fn walk(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
) -> Result<Listing, BenchError> {
    let total = count(keys, instance).await?;
    let keep_every = (total as usize).div_ceil(MAX_SAMPLED_IDS).max(1);
    let progress = Progress::new(&format!("walk {instance}"), Some(total));
    let (mut tokens, mut ids, mut seen) = (Vec::new(), Vec::new(), 0usize);
    let mut token = String::new();
    let mut last_len;
    loop {
        let page = keys
            .clone()
            .list_keys(with_instance(
                instance,
                ListKeysRequest {
                    limit: Some(PAGE),
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        progress.add(page.keys.len() as u64);
        last_len = page.keys.len();
        for key in page.keys {
            if seen.is_multiple_of(keep_every) {
                ids.push(key.id);
            }
            seen += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        tokens.push(token.clone());
    }
    // A full last page hands out a token whose page is empty.
    if last_len == 0 {
        tokens.pop();
    }
    progress.finish();
    Ok(Listing { tokens, ids })
}

pub(super) fn get(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
    id: String,
) -> CallFuture {
    let (mut keys, instance) = (keys.clone(), instance.to_string());
    Box::pin(async move {
        keys.get_key(with_instance(&instance, GetKeyRequest { id }))
            .await
            .map(|_| ())
    })
}

/// One page: the first with an empty token, else the page after the token's.
pub(super) fn list(
    keys: &KeyServiceClient<AuthedChannel>,
    instance: &str,
    page_token: String,
) -> CallFuture {
    let (mut keys, instance) = (keys.clone(), instance.to_string());
    Box::pin(async move {
        let page = keys
            .list_keys(with_instance(
                &instance,
                ListKeysRequest {
                    limit: Some(PAGE),
                    page_token,
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        if page.keys.is_empty() {
            return Err(tonic::Status::not_found("an empty page"));
        }
        Ok(())
    })
}

pub(super) fn count_call(keys: &KeyServiceClient<AuthedChannel>, instance: &str) -> CallFuture {
    let (mut keys, instance) = (keys.clone(), instance.to_string());
    Box::pin(async move {
        keys.count_keys(with_instance(&instance, CountKeysRequest::default()))
            .await
            .map(|_| ())
    })
}
