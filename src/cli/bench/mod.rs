//! `kms bench`: drives N concurrent gRPC callers against a running server for a fixed
//! time per scenario and reports ops/s, p50 and p99. The health check is measured in the
//! same run with the same client as the no-op baseline.
//!
//! A client of the public API only: it creates its own keys in its own instance.
//!
//! The overload scenario ([`overload`]) is opt-in and reported in a table of its own.
//!
//! The import scenarios (CreateImportToken, GetParametersForImport) are opt-in: each call
//! uses up a pre-generated RSA key pair, so they make `import_calls` sequential calls
//! and report latency; start the server with a pool at least that large
//! (KMS_IMPORT_RSA_POOL_SIZE) and let it fill ("RSA key-pair pool is full" in its log).

mod at_size;
mod calls;
mod cpu;
mod overload;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::connect::{AuthedChannel, ConnectError, Target};
use calls::{create_root_keys, spread, with_instance, wrap_one_each};
use cpu::CpuClock;
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
    pub target: Target,
    /// The instance the bench creates its keys in (the token needs Editor there).
    pub instance: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Distinct keys for the many-keys scenario (set above the server's key cache size).
    pub distinct_keys: usize,
    /// Sequential calls per import scenario.
    pub import_calls: usize,
    pub scenarios: Vec<Scenario>,
    /// How many times each throughput scenario is measured, interleaved.
    pub rounds: usize,
    /// The server's process id, to report its CPU time per call (Linux `/proc`).
    pub server_pid: Option<u32>,
    /// Overload scenario: flood callers per well-behaved caller.
    pub flood_factor: usize,
    /// Fill the instance to this many keys before measuring (0: don't).
    pub preload: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Health,
    Wrap,
    Unwrap,
    UnwrapManyKeys,
    /// Durable CreateKey (a root key generated in the HSM, acknowledged once the store
    /// and its audit record are durable), at the bench's concurrency. Opt-in: it grows
    /// the store.
    Create,
    CreateImportToken,
    GetParametersForImport,
    /// GetKey on keys spread over the whole instance (see [`at_size`]).
    Get,
    /// The first ListKeys page (limit 200).
    ListFirst,
    /// ListKeys pages from every depth of the instance, by page token.
    ListDeep,
    /// CountKeys over the instance.
    Count,
    /// Well-behaved callers before, during and after a flood of `flood_factor` times as
    /// many (see [`overload`]). Opt-in.
    Overload,
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
            Scenario::Create => "CreateKey (durable)",
            Scenario::CreateImportToken => "CreateImportToken (RSA-4096)",
            Scenario::GetParametersForImport => "GetParametersForImport (RSA-2048)",
            Scenario::Overload => "WrapKey under a flood",
            Scenario::Get => "GetKey",
            Scenario::ListFirst => "ListKeys, first page",
            Scenario::ListDeep => "ListKeys, any page (token)",
            Scenario::Count => "CountKeys",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Connect(#[from] ConnectError),
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

/// One scenario's measurements, over all rounds.
#[derive(Debug, Clone)]
pub struct Measured {
    pub scenario: Scenario,
    pub ops: usize,
    pub ops_per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// Throughput of each round, in round order (one entry for sequential scenarios).
    pub rounds_ops_per_sec: Vec<f64>,
    /// The server's CPU time (user + system, all threads) per measured call, when its
    /// process id was given.
    pub server_cpu_per_call: Option<Duration>,
    /// This client's CPU time per measured call.
    pub client_cpu_per_call: Option<Duration>,
}

/// One measured window of one scenario.
struct Sample {
    latencies: Vec<Duration>,
    elapsed: Duration,
    server_cpu: Option<Duration>,
    client_cpu: Option<Duration>,
}

type CallFuture = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;
/// One call of a scenario; the argument numbers the call, to spread calls over keys.
type Call = Arc<dyn Fn(usize) -> CallFuture + Send + Sync>;

/// Runs the scenarios and returns their measurements. Setup (keys, sample ciphertexts)
/// happens once; then every throughput scenario is measured once per round, in the
/// given order, so that a slow phase of a shared machine weighs on all of them alike
/// rather than on whichever ran then. Sequential import scenarios run in the first
/// round only.
pub async fn run(options: &BenchOptions) -> Result<Vec<Measured>, BenchError> {
    let (channel, authed) = super::connect::connect(&options.target).await?;
    let clients = Clients {
        instance: options.instance.clone(),
        keys: KeyServiceClient::new(authed.clone()),
        tokens: ImportTokenServiceClient::new(authed),
        health: HealthClient::new(channel),
    };

    if options.preload > 0 {
        let in_flight = options.concurrency.max(128);
        at_size::preload(&clients.keys, &clients.instance, options.preload, in_flight).await?;
    }
    let listing = if options
        .scenarios
        .iter()
        .any(|s| matches!(s, Scenario::Get | Scenario::ListDeep))
    {
        let mut listing = at_size::walk(&clients.keys, &clients.instance).await?;
        if listing.ids.is_empty() {
            create_root_keys(&clients.keys, &clients.instance, 1).await?;
            listing = at_size::walk(&clients.keys, &clients.instance).await?;
        }
        Some(Arc::new(listing))
    } else {
        None
    };
    let mut prepared = Vec::with_capacity(options.scenarios.len());
    for scenario in options
        .scenarios
        .iter()
        .filter(|s| **s != Scenario::Overload)
    {
        prepared.push((
            *scenario,
            prepare(options, &clients, listing.as_ref(), *scenario).await?,
        ));
    }
    let mut samples: Vec<Vec<Sample>> = prepared.iter().map(|_| Vec::new()).collect();
    for round in 0..options.rounds.max(1) {
        for ((scenario, call), samples) in prepared.iter().zip(samples.iter_mut()) {
            if scenario.is_sequential() {
                if round == 0 {
                    samples.push(measure_sequential(options, *scenario, call).await?);
                }
            } else {
                samples.push(measure(options, *scenario, call).await?);
            }
        }
    }
    Ok(prepared
        .iter()
        .zip(samples)
        .map(|((scenario, _), samples)| summarise(*scenario, samples))
        .collect())
}

struct Clients {
    instance: String,
    keys: KeyServiceClient<AuthedChannel>,
    tokens: ImportTokenServiceClient<AuthedChannel>,
    health: HealthClient<Channel>,
}

/// Creates what a scenario needs and returns its call.
async fn prepare(
    options: &BenchOptions,
    clients: &Clients,
    listing: Option<&Arc<at_size::Listing>>,
    scenario: Scenario,
) -> Result<Call, BenchError> {
    let instance = clients.instance.clone();
    let call: Call = match scenario {
        Scenario::Get => {
            let (keys, listing) = (clients.keys.clone(), listing.cloned().expect("walked"));
            Arc::new(move |call| {
                let id = listing.ids[spread(call, listing.ids.len())].clone();
                at_size::get(&keys, &instance, id)
            })
        }
        Scenario::ListFirst => {
            let keys = clients.keys.clone();
            Arc::new(move |_| at_size::list(&keys, &instance, String::new()))
        }
        Scenario::ListDeep => {
            let (keys, listing) = (clients.keys.clone(), listing.cloned().expect("walked"));
            Arc::new(move |call| {
                let token = match listing.tokens.len() {
                    0 => String::new(),
                    pages => listing.tokens[spread(call, pages)].clone(),
                };
                at_size::list(&keys, &instance, token)
            })
        }
        Scenario::Count => {
            if at_size::count(&clients.keys, &instance).await? == 0 {
                create_root_keys(&clients.keys, &instance, 1).await?;
            }
            let keys = clients.keys.clone();
            Arc::new(move |_| at_size::count_call(&keys, &instance))
        }
        Scenario::Health => {
            let health = clients.health.clone();
            Arc::new(move |_| {
                let mut health = health.clone();
                Box::pin(async move {
                    health
                        .check(HealthCheckRequest {
                            service: "kms.v1.KeyService".into(),
                        })
                        .await
                        .map(|_| ())
                })
            })
        }
        // The overload scenario runs apart (`overload::run`); as a table row it would be
        // plain WrapKey.
        Scenario::Wrap | Scenario::Overload => {
            let key = create_root_keys(&clients.keys, &instance, 1)
                .await?
                .remove(0);
            let keys = clients.keys.clone();
            Arc::new(move |_| {
                let (mut keys, instance, key) = (keys.clone(), instance.clone(), key.clone());
                Box::pin(async move {
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
                })
            })
        }
        Scenario::Unwrap | Scenario::UnwrapManyKeys => {
            let count = if scenario == Scenario::Unwrap {
                1
            } else {
                options.distinct_keys.max(1)
            };
            let ids = create_root_keys(&clients.keys, &instance, count).await?;
            let samples = Arc::new(wrap_one_each(&clients.keys, &instance, ids).await?);
            let keys = clients.keys.clone();
            Arc::new(move |call| {
                let (mut keys, instance) = (keys.clone(), instance.clone());
                // Spread calls over the keys so that, with more keys than the cache
                // holds, most calls miss.
                let (key, ciphertext) = samples[spread(call, samples.len())].clone();
                Box::pin(async move {
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
                })
            })
        }
        Scenario::Create => {
            let keys = clients.keys.clone();
            Arc::new(move |_| {
                let (mut keys, instance) = (keys.clone(), instance.clone());
                Box::pin(async move {
                    keys.create_key(with_instance(
                        &instance,
                        CreateKeyRequest {
                            name: "bench-create".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(|_| ())
                })
            })
        }
        Scenario::CreateImportToken => {
            let tokens = clients.tokens.clone();
            Arc::new(move |_| {
                let (mut tokens, instance) = (tokens.clone(), instance.clone());
                Box::pin(async move {
                    tokens
                        .create_import_token(with_instance(
                            &instance,
                            CreateImportTokenRequest::default(),
                        ))
                        .await
                        .map(|_| ())
                })
            })
        }
        Scenario::GetParametersForImport => {
            let key = clients
                .keys
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
            let keys = clients.keys.clone();
            Arc::new(move |_| {
                let (mut keys, instance, key) = (keys.clone(), instance.clone(), key.clone());
                Box::pin(async move {
                    keys.get_parameters_for_import(with_instance(
                        &instance,
                        GetParametersForImportRequest {
                            key_id: key,
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(|_| ())
                })
            })
        }
    };
    Ok(call)
}

/// `import_calls` calls one after another (each uses up a pre-generated key pair).
async fn measure_sequential(
    options: &BenchOptions,
    scenario: Scenario,
    call: &Call,
) -> Result<Sample, BenchError> {
    let cpu = CpuClock::start(options.server_pid);
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(options.import_calls);
    for n in 0..options.import_calls.max(1) {
        let call_started = Instant::now();
        if let Err(status) = call(n).await {
            return Err(BenchError::Calls {
                scenario: scenario.label(),
                errors: 1,
                calls: latencies.len() + 1,
                first: status.to_string(),
            });
        }
        latencies.push(call_started.elapsed());
    }
    let (server_cpu, client_cpu) = cpu.stop();
    Ok(Sample {
        latencies,
        elapsed: started.elapsed(),
        server_cpu,
        client_cpu,
    })
}

/// A markdown table of the results, with each throughput relative to the baseline.
/// Runs every chosen scenario and returns the whole report: the throughput table, then
/// the overload table when that scenario was chosen.
pub async fn run_all(options: &BenchOptions) -> Result<String, BenchError> {
    let mut out = String::new();
    if options.scenarios.iter().any(|s| *s != Scenario::Overload) {
        let results = run(options).await?;
        out.push_str(&report(options, &results));
    }
    if options.scenarios.contains(&Scenario::Overload) {
        out.push_str(&overload::run(options).await?);
    }
    Ok(out)
}

pub fn report(options: &BenchOptions, results: &[Measured]) -> String {
    let baseline = results.iter().find(|m| m.scenario == Scenario::Health);
    let rounds = options.rounds.max(1);
    let mut out = format!(
        "{} callers in flight, {} round(s) of {:?} per scenario, each after {:?} warm-up\n\n\
         | scenario | ops/s | p50 | p99 | vs baseline | per round | server CPU/call | client CPU/call |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        options.concurrency, rounds, options.duration, options.warmup
    );
    let micros = |d: Option<Duration>| match d {
        Some(d) => format!("{:.1} µs", d.as_secs_f64() * 1e6),
        None => "-".to_string(),
    };
    for m in results {
        let (ratio, per_round) = match baseline {
            Some(b) if !m.scenario.is_sequential() => {
                let ratios: Vec<f64> = m
                    .rounds_ops_per_sec
                    .iter()
                    .zip(&b.rounds_ops_per_sec)
                    .map(|(ops, base)| ops / base)
                    .collect();
                let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
                let high = ratios.iter().copied().fold(0.0, f64::max);
                (
                    format!("{:.2}x", m.ops_per_sec / b.ops_per_sec),
                    format!("{low:.2}-{high:.2}x"),
                )
            }
            _ => ("-".to_string(), "-".to_string()),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.2} ms | {:.2} ms | {} | {} | {} | {} |\n",
            m.scenario.label(),
            m.ops_per_sec,
            m.p50.as_secs_f64() * 1e3,
            m.p99.as_secs_f64() * 1e3,
            ratio,
            per_round,
            micros(m.server_cpu_per_call),
            micros(m.client_cpu_per_call),
        ));
    }
    if results.iter().any(|m| m.scenario.is_sequential()) {
        out.push_str(&format!(
            "\nImport scenarios: {} sequential calls each (one caller), not {} in flight, \
             first round only.\n",
            options.import_calls, options.concurrency
        ));
    }
    if options.server_pid.is_none() {
        out.push_str("\nServer CPU/call needs --server-pid.\n");
    }
    out
}

/// Runs `call` from `concurrency` tasks, first for the warm-up (not recorded), then for
/// the measured duration.
async fn measure(
    options: &BenchOptions,
    scenario: Scenario,
    call: &Call,
) -> Result<Sample, BenchError> {
    let warmup_end = tokio::time::Instant::now() + options.warmup;
    let end = warmup_end + options.duration;
    let (warmup_end, end) = (warmup_end.into_std(), end.into_std());
    let mut tasks = Vec::with_capacity(options.concurrency);
    for worker in 0..options.concurrency {
        let call = Arc::clone(call);
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
    // CPU is read at the edges of the measured window, which holds the calls that
    // started in it.
    tokio::time::sleep_until(warmup_end.into()).await;
    let cpu = CpuClock::start(options.server_pid);
    tokio::time::sleep_until(end.into()).await;
    let (server_cpu, client_cpu) = cpu.stop();

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
    Ok(Sample {
        latencies,
        elapsed: options.duration,
        server_cpu,
        client_cpu,
    })
}

fn summarise(scenario: Scenario, samples: Vec<Sample>) -> Measured {
    let rounds_ops_per_sec = samples
        .iter()
        .map(|s| s.latencies.len() as f64 / s.elapsed.as_secs_f64())
        .collect();
    let elapsed: Duration = samples.iter().map(|s| s.elapsed).sum();
    let cpu_total =
        |pick: fn(&Sample) -> Option<Duration>| samples.iter().map(pick).sum::<Option<Duration>>();
    let server_cpu = cpu_total(|s| s.server_cpu);
    let client_cpu = cpu_total(|s| s.client_cpu);
    let mut latencies: Vec<Duration> = samples.into_iter().flat_map(|s| s.latencies).collect();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let per_call = |cpu: Option<Duration>| {
        cpu.filter(|_| !latencies.is_empty())
            .map(|cpu| cpu / latencies.len() as u32)
    };
    Measured {
        scenario,
        ops: latencies.len(),
        ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(0.50),
        p99: percentile(0.99),
        rounds_ops_per_sec,
        server_cpu_per_call: per_call(server_cpu),
        client_cpu_per_call: per_call(client_cpu),
    }
}
