//! `kms bench`: drives N concurrent gRPC callers against a running server for a fixed
//! time per scenario and reports ops/s, p50 and p99. The health check is measured in the
//! same run with the same client as the no-op baseline.
//!
//! A client of the public API only: it creates its own keys in its own instance.
//!
//! The import scenarios (CreateImportToken, GetParametersForImport) are opt-in: each call
//! uses up a pre-generated RSA key pair, so they make `import_calls` sequential calls
//! and report latency; start the server with a pool at least that large
//! (KMS_IMPORT_RSA_POOL_SIZE) and let it fill ("RSA key-pair pool is full" in its log).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::proto::import_token_service_client::ImportTokenServiceClient;
use crate::proto::key_service_client::KeyServiceClient;
use crate::proto::{
    CreateImportTokenRequest, CreateKeyRequest, GetParametersForImportRequest, KeyOrigin,
    UnwrapKeyRequest, WrapKeyRequest,
};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub addr: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Distinct keys for the many-keys scenario (set above the server's key cache size).
    pub distinct_keys: usize,
    /// Sequential calls per import scenario.
    pub import_calls: usize,
    pub scenarios: Vec<Scenario>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Health,
    Wrap,
    Unwrap,
    UnwrapManyKeys,
    CreateImportToken,
    GetParametersForImport,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Health,
        Scenario::Wrap,
        Scenario::Unwrap,
        Scenario::UnwrapManyKeys,
    ];

    /// Import scenarios run one call at a time, a fixed number of calls.
    fn is_sequential(self) -> bool {
        matches!(
            self,
            Scenario::CreateImportToken | Scenario::GetParametersForImport
        )
    }

    fn label(self) -> &'static str {
        match self {
            Scenario::Health => "Health/Check (baseline)",
            Scenario::Wrap => "WrapKey",
            Scenario::Unwrap => "UnwrapKey",
            Scenario::UnwrapManyKeys => "UnwrapKey, many keys",
            Scenario::CreateImportToken => "CreateImportToken (RSA-4096)",
            Scenario::GetParametersForImport => "GetParametersForImport (RSA-2048)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0:?} is not a URL such as http://127.0.0.1:50051")]
    InvalidAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("setup call failed: {0}")]
    Setup(#[from] tonic::Status),
    #[error("{errors} of {calls} calls failed in {scenario}; first: {first}")]
    Calls {
        scenario: &'static str,
        errors: usize,
        calls: usize,
        first: String,
    },
}

/// One scenario's measurements.
#[derive(Debug, Clone)]
pub struct Measured {
    pub scenario: Scenario,
    pub ops: usize,
    pub ops_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// Runs the scenarios in order and returns their measurements.
pub async fn run(options: &BenchOptions) -> Result<Vec<Measured>, BenchError> {
    let channel = Channel::from_shared(options.addr.clone())
        .map_err(|_| BenchError::InvalidAddress(options.addr.clone()))?
        .connect()
        .await
        .map_err(|source| BenchError::Connect {
            addr: options.addr.clone(),
            source,
        })?;
    let instance = format!("bench-{}", uuid::Uuid::new_v4());
    let keys = KeyServiceClient::new(channel.clone());
    let tokens = ImportTokenServiceClient::new(channel.clone());
    let health = HealthClient::new(channel);

    let mut results = Vec::new();
    for scenario in &options.scenarios {
        let measured = match scenario {
            Scenario::Health => {
                let health = health.clone();
                measure(options, *scenario, move |_| {
                    let mut health = health.clone();
                    async move {
                        health
                            .check(HealthCheckRequest {
                                service: "kms.v1.KeyService".into(),
                            })
                            .await
                            .map(|_| ())
                    }
                })
                .await?
            }
            Scenario::Wrap => {
                let key = create_root_keys(&keys, &instance, 1).await?.remove(0);
                let (keys, instance) = (keys.clone(), instance.clone());
                measure(options, *scenario, move |_| {
                    let (mut keys, instance, key) = (keys.clone(), instance.clone(), key.clone());
                    async move {
                        keys.wrap_key(with_instance(
                            &instance,
                            WrapKeyRequest {
                                id: key,
                                plaintext: None,
                                aad: vec!["bench".into()],
                            },
                        ))
                        .await
                        .map(|_| ())
                    }
                })
                .await?
            }
            Scenario::Unwrap | Scenario::UnwrapManyKeys => {
                let count = if *scenario == Scenario::Unwrap {
                    1
                } else {
                    options.distinct_keys.max(1)
                };
                let ids = create_root_keys(&keys, &instance, count).await?;
                let samples = Arc::new(wrap_one_each(&keys, &instance, ids).await?);
                let (keys, instance) = (keys.clone(), instance.clone());
                measure(options, *scenario, move |call| {
                    let (mut keys, instance) = (keys.clone(), instance.clone());
                    // Spread calls over the keys so that, with more keys than the cache
                    // holds, most calls miss.
                    let (key, ciphertext) = samples[spread(call, samples.len())].clone();
                    async move {
                        keys.unwrap_key(with_instance(
                            &instance,
                            UnwrapKeyRequest {
                                id: key,
                                ciphertext,
                                aad: vec!["bench".into()],
                            },
                        ))
                        .await
                        .map(|_| ())
                    }
                })
                .await?
            }
            Scenario::CreateImportToken => {
                let (tokens, instance) = (tokens.clone(), instance.clone());
                measure_sequential(options, *scenario, move || {
                    let (mut tokens, instance) = (tokens.clone(), instance.clone());
                    async move {
                        tokens
                            .create_import_token(with_instance(
                                &instance,
                                CreateImportTokenRequest::default(),
                            ))
                            .await
                            .map(|_| ())
                    }
                })
                .await?
            }
            Scenario::GetParametersForImport => {
                let key = keys
                    .clone()
                    .create_key(with_instance(
                        &instance,
                        CreateKeyRequest {
                            name: "bench-external".into(),
                            origin: KeyOrigin::External as i32,
                            ..Default::default()
                        },
                    ))
                    .await?
                    .into_inner()
                    .key
                    .map(|k| k.id)
                    .unwrap_or_default();
                let (keys, instance) = (keys.clone(), instance.clone());
                measure_sequential(options, *scenario, move || {
                    let (mut keys, instance, key) = (keys.clone(), instance.clone(), key.clone());
                    async move {
                        keys.get_parameters_for_import(with_instance(
                            &instance,
                            GetParametersForImportRequest {
                                key_id: key,
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(|_| ())
                    }
                })
                .await?
            }
        };
        results.push(measured);
    }
    Ok(results)
}

/// `import_calls` calls one after another (each uses up a pre-generated key pair).
async fn measure_sequential<F, Fut>(
    options: &BenchOptions,
    scenario: Scenario,
    call: F,
) -> Result<Measured, BenchError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(options.import_calls);
    for _ in 0..options.import_calls.max(1) {
        let call_started = Instant::now();
        if let Err(status) = call().await {
            return Err(BenchError::Calls {
                scenario: scenario.label(),
                errors: 1,
                calls: latencies.len() + 1,
                first: status.to_string(),
            });
        }
        latencies.push(call_started.elapsed());
    }
    Ok(summarise(scenario, latencies, started.elapsed()))
}

/// A markdown table of the results, with each throughput relative to the baseline.
pub fn report(options: &BenchOptions, results: &[Measured]) -> String {
    let baseline = results
        .iter()
        .find(|m| m.scenario == Scenario::Health)
        .map(|m| m.ops_per_sec);
    let mut out = format!(
        "{} callers in flight, {:?} per scenario after {:?} warm-up\n\n\
         | scenario | ops/s | p50 | p99 | vs baseline |\n|---|---:|---:|---:|---:|\n",
        options.concurrency, options.duration, options.warmup
    );
    for m in results {
        let ratio = match baseline {
            Some(b) if !m.scenario.is_sequential() => format!("{:.2}x", m.ops_per_sec / b),
            _ => "-".to_string(),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} ms | {:.2} ms | {} |\n",
            m.scenario.label(),
            m.ops_per_sec,
            m.p50.as_secs_f64() * 1e3,
            m.p99.as_secs_f64() * 1e3,
            ratio
        ));
    }
    if results.iter().any(|m| m.scenario.is_sequential()) {
        out.push_str(&format!(
            "\nImport scenarios: {} sequential calls each (one caller), not {} in flight.\n",
            options.import_calls, options.concurrency
        ));
    }
    out
}

/// Runs `call` from `concurrency` tasks, first for the warm-up (not recorded), then for
/// the measured duration.
async fn measure<F, Fut>(
    options: &BenchOptions,
    scenario: Scenario,
    call: F,
) -> Result<Measured, BenchError>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let call = Arc::new(call);
    let warmup_end = Instant::now() + options.warmup;
    let end = warmup_end + options.duration;
    let mut tasks = Vec::with_capacity(options.concurrency);
    for worker in 0..options.concurrency {
        let call = Arc::clone(&call);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut errors, mut first_error) = (0usize, None);
            let mut n = worker;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let outcome = call(n).await;
                n += 7919;
                if started < warmup_end {
                    continue;
                }
                latencies.push(started.elapsed());
                if let Err(status) = outcome {
                    errors += 1;
                    first_error.get_or_insert_with(|| status.to_string());
                }
            }
            (latencies, errors, first_error)
        }));
    }
    let mut latencies = Vec::new();
    let (mut errors, mut first) = (0usize, None);
    for task in tasks {
        let (l, e, f) = task.await.expect("bench worker panicked");
        latencies.extend(l);
        errors += e;
        if first.is_none() {
            first = f;
        }
    }
    if errors > 0 {
        return Err(BenchError::Calls {
            scenario: scenario.label(),
            errors,
            calls: latencies.len(),
            first: first.unwrap_or_default(),
        });
    }
    Ok(summarise(scenario, latencies, options.duration))
}

fn summarise(scenario: Scenario, mut latencies: Vec<Duration>, over: Duration) -> Measured {
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Measured {
        scenario,
        ops: latencies.len(),
        ops_per_sec: latencies.len() as f64 / over.as_secs_f64(),
        p50: percentile(0.50),
        p99: percentile(0.99),
    }
}

fn spread(call: usize, len: usize) -> usize {
    // A multiplicative hash keeps consecutive calls on different keys.
    call.wrapping_mul(2_654_435_761) % len
}

fn with_instance<T>(instance: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = MetadataValue::try_from(instance) {
        request.metadata_mut().insert("bluemix-instance", value);
    }
    request
}

async fn create_root_keys(
    keys: &KeyServiceClient<Channel>,
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

async fn wrap_one_each(
    keys: &KeyServiceClient<Channel>,
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
