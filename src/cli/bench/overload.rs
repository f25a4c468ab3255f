//! The overload scenario: what well-behaved callers get while a flood hits the server,
//! and how fast they get it back when the flood stops.
//!
//! Three phases of the bench's duration each, WrapKey throughout:
//! 1. steady: `concurrency` well-behaved callers (they back off 50 ms on
//!    RESOURCE_EXHAUSTED, as a client should);
//! 2. flood: the same callers, plus `flood_factor` times as many that retry at once on
//!    any refusal;
//! 3. after: the well-behaved callers alone; its first second is reported apart, to show
//!    that service recovers as soon as the flood stops.
//!
//! With the server's process id, its resident memory is sampled every 100 ms and the
//! largest value per phase reported: bounded queues keep it flat under the flood.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;

use super::calls::{create_root_keys, with_instance};
use super::{BenchError, BenchOptions};
use crate::cli::connect::AuthedChannel;
use crate::proto::WrapKeyRequest;
use crate::proto::key_service_client::KeyServiceClient;

const BACKOFF: Duration = Duration::from_millis(50);
const PHASES: [&str; 4] = ["steady", "flood", "after: first second", "after"];

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// Counts and latencies per phase, for one kind of caller.
#[derive(Default)]
struct Callers {
    phases: [Tally; PHASES.len()],
    latencies: std::sync::Mutex<Vec<(usize, Duration)>>,
}

struct Shared {
    phase: AtomicUsize,
    stop: AtomicBool,
    stop_flood: AtomicBool,
}

async fn caller(
    mut keys: KeyServiceClient<AuthedChannel>,
    instance: String,
    key: String,
    shared: Arc<Shared>,
    callers: Arc<Callers>,
    well_behaved: bool,
) {
    let mut latencies = Vec::new();
    let stop = if well_behaved {
        &shared.stop
    } else {
        &shared.stop_flood
    };
    while !stop.load(Ordering::Relaxed) {
        let phase = shared.phase.load(Ordering::Relaxed);
        let started = Instant::now();
        let outcome = keys
            .wrap_key(with_instance(
                &instance,
                WrapKeyRequest {
                    id: key.clone(),
                    plaintext: None,
                    aad: vec![],
                },
            ))
            .await;
        let tally = &callers.phases[phase];
        match outcome {
            Ok(_) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
                latencies.push((phase, started.elapsed()));
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                if well_behaved {
                    tokio::time::sleep(BACKOFF).await;
                }
            }
            Err(_) => {
                tally.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    callers
        .latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(latencies);
}

/// Runs the three phases and returns the report's table.
pub async fn run(options: &BenchOptions) -> Result<String, BenchError> {
    let (_, authed) = super::super::connect::connect(&options.target).await?;
    let keys = KeyServiceClient::new(authed);
    let key = create_root_keys(&keys, &options.instance, 1)
        .await?
        .remove(0);
    let shared = Arc::new(Shared {
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        stop_flood: AtomicBool::new(false),
    });
    let (good, flood) = (Arc::new(Callers::default()), Arc::new(Callers::default()));
    let spawn = |well_behaved: bool, callers: &Arc<Callers>| {
        tokio::spawn(caller(
            keys.clone(),
            options.instance.clone(),
            key.clone(),
            Arc::clone(&shared),
            Arc::clone(callers),
            well_behaved,
        ))
    };
    let memory = Arc::new(Memory::default());
    let sampler = options.server_pid.map(|pid| {
        let (memory, shared) = (Arc::clone(&memory), Arc::clone(&shared));
        tokio::spawn(async move {
            while !shared.stop.load(Ordering::Relaxed) {
                if let Some(kib) = resident_kib(pid) {
                    memory.record(shared.phase.load(Ordering::Relaxed), kib);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    let mut tasks: Vec<_> = (0..options.concurrency)
        .map(|_| spawn(true, &good))
        .collect();
    let mut durations = [options.duration; PHASES.len()];
    tokio::time::sleep(options.warmup).await;
    reset(&good);
    tokio::time::sleep(options.duration).await;

    shared.phase.store(1, Ordering::Relaxed);
    let flood_tasks: Vec<_> = (0..options.concurrency * options.flood_factor.max(1))
        .map(|_| spawn(false, &flood))
        .collect();
    tokio::time::sleep(options.duration).await;

    shared.stop_flood.store(true, Ordering::Relaxed);
    shared.phase.store(2, Ordering::Relaxed);
    let first = Duration::from_secs(1).min(options.duration);
    durations[2] = first;
    tokio::time::sleep(first).await;
    shared.phase.store(3, Ordering::Relaxed);
    durations[3] = options
        .duration
        .saturating_sub(first)
        .max(Duration::from_millis(1));
    tokio::time::sleep(durations[3]).await;
    shared.stop.store(true, Ordering::Relaxed);
    tasks.extend(flood_tasks);
    for task in tasks {
        let _ = task.await;
    }
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    Ok(report(options, &good, &flood, &memory, &durations))
}

/// Drops what the warm-up counted.
fn reset(callers: &Callers) {
    let tally = &callers.phases[0];
    tally.ok.store(0, Ordering::Relaxed);
    tally.refused.store(0, Ordering::Relaxed);
    tally.failed.store(0, Ordering::Relaxed);
    callers
        .latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

fn report(
    options: &BenchOptions,
    good: &Callers,
    flood: &Callers,
    memory: &Memory,
    durations: &[Duration; PHASES.len()],
) -> String {
    let rate = |tally: &AtomicU64, phase: usize| {
        tally.load(Ordering::Relaxed) as f64 / durations[phase].as_secs_f64()
    };
    let steady = rate(&good.phases[0].ok, 0);
    let latencies = good.latencies.lock().unwrap_or_else(|e| e.into_inner());
    let p99 = |phase: usize| {
        let mut of_phase: Vec<Duration> = latencies
            .iter()
            .filter(|(p, _)| *p == phase)
            .map(|(_, l)| *l)
            .collect();
        of_phase.sort_unstable();
        of_phase
            .get((of_phase.len() as f64 * 0.99) as usize)
            .or(of_phase.last())
            .map_or("-".to_string(), |d| {
                format!("{:.2} ms", d.as_secs_f64() * 1e3)
            })
    };
    let mut out = format!(
        "\nOverload (WrapKey): {} well-behaved callers (50 ms back-off when refused); \
         flood: {} more callers retrying at once; {:?} per phase\n\n\
         | phase | well-behaved ok/s | vs steady | well-behaved p99 | well-behaved refused/s | \
         flood ok/s | flood refused/s | errors | server RSS max |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        options.concurrency,
        options.concurrency * options.flood_factor.max(1),
        options.duration
    );
    for (phase, name) in PHASES.iter().enumerate() {
        let ok = rate(&good.phases[phase].ok, phase);
        let errors = good.phases[phase].failed.load(Ordering::Relaxed)
            + flood.phases[phase].failed.load(Ordering::Relaxed);
        out.push_str(&format!(
            "| {name} | {ok:.1} | {:.2}x | {} | {:.1} | {:.1} | {:.1} | {errors} | {} |\n",
            ok / steady.max(f64::MIN_POSITIVE),
            p99(phase),
            rate(&good.phases[phase].refused, phase),
            rate(&flood.phases[phase].ok, phase),
            rate(&flood.phases[phase].refused, phase),
            memory
                .max(phase)
                .map_or("-".to_string(), |kib| format!("{} MiB", kib / 1024)),
        ));
    }
    if options.server_pid.is_none() {
        out.push_str("\nServer RSS needs --server-pid.\n");
    }
    out
}

#[derive(Default)]
struct Memory {
    max_kib: [AtomicU64; PHASES.len()],
}

impl Memory {
    fn record(&self, phase: usize, kib: u64) {
        self.max_kib[phase].fetch_max(kib, Ordering::Relaxed);
    }

    fn max(&self, phase: usize) -> Option<u64> {
        Some(self.max_kib[phase].load(Ordering::Relaxed)).filter(|kib| *kib > 0)
    }
}

/// VmRSS of a process, from `/proc` (Linux).
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
