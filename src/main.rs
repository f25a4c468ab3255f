//! `kms`: parse the command line, load configuration, initialise tracing, serve until
//! SIGTERM or SIGINT. `kms bench` measures a running server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the service allocates many small short-lived buffers per call from many
/// threads; measured with `kms bench`, it lifts WrapKey/UnwrapKey throughput.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use kms::config::{Config, LogFormat, ProcessEnv};

#[derive(Parser)]
#[command(name = "kms", version, about = "An HSM-backed key management service")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC service. Without --config: the embedded SoftHSM default under
    /// KMS_DATA_DIR (./kms-data), listening on KMS_LISTEN (127.0.0.1:50051).
    Serve {
        /// A TOML configuration file; KMS_* environment variables override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Measure a running server: N concurrent callers per scenario, ops/s, p50, p99.
    Bench {
        /// The server's URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Measured seconds per scenario and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Unrecorded warm-up seconds before each measured window.
        #[arg(long, default_value_t = 1)]
        warmup_seconds: u64,
        /// Distinct keys for the many-keys scenario (more than the server's key cache).
        #[arg(long, default_value_t = 2048)]
        keys: usize,
        /// Sequential calls per import scenario (create-import-token,
        /// get-parameters-for-import); each uses up one pre-generated RSA pair.
        #[arg(long, default_value_t = 8)]
        import_calls: usize,
        /// Scenarios to run (default: the four throughput scenarios; the import
        /// scenarios are opt-in).
        #[arg(long, value_enum, value_delimiter = ',')]
        scenarios: Vec<kms::bench::Scenario>,
        /// Rounds: each throughput scenario is measured once per round, interleaved,
        /// and the rounds are summed.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The server's process id, to report its CPU time per call (Linux).
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Bring your own AES key: read material from a file, encrypt it locally for the
    /// server's import token (secure import) or import parameters (EXTERNAL keys), and
    /// import it. Give exactly one of --name, --rotate, --external.
    ImportKey {
        /// The server's URL.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// The instance (bluemix-instance).
        #[arg(long)]
        instance: String,
        /// A file holding the raw key material: 16, 24 or 32 bytes.
        #[arg(long, value_name = "FILE")]
        material: PathBuf,
        /// RSA-OAEP hash: sha256 (RSAES_OAEP_SHA_256) or sha1 (RSAES_OAEP_SHA_1).
        #[arg(long, default_value = "sha256", value_parser = ["sha256", "sha1"])]
        hash: String,
        /// Secure import into a new root key with this name.
        #[arg(long, group = "target")]
        name: Option<String>,
        /// Secure import of a new version of this imported root key.
        #[arg(long, group = "target", value_name = "KEY_ID")]
        rotate: Option<String>,
        /// Import into this EXTERNAL-origin key (GetParametersForImport + ImportKeyMaterial).
        #[arg(long, group = "target", value_name = "KEY_ID")]
        external: Option<String>,
        /// EXTERNAL keys: RSA size of the wrapping key (2048, 3072, 4096).
        #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(2048..=4096))]
        wrapping_key_bits: u32,
        /// EXTERNAL keys: the material expires this many seconds from now.
        #[arg(long)]
        valid_for_secs: Option<u64>,
        /// Secure import: create a new import token first (replacing the instance's).
        #[arg(long)]
        create_token: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.command {
        Command::Serve { config } => config,
        Command::Bench {
            addr,
            concurrency,
            seconds,
            warmup_seconds,
            keys,
            import_calls,
            scenarios,
            rounds,
            server_pid,
        } => {
            let options = kms::bench::BenchOptions {
                addr,
                concurrency: concurrency.max(1),
                duration: std::time::Duration::from_secs(seconds.max(1)),
                warmup: std::time::Duration::from_secs(warmup_seconds),
                distinct_keys: keys,
                import_calls,
                scenarios: if scenarios.is_empty() {
                    kms::bench::Scenario::ALL.to_vec()
                } else {
                    scenarios
                },
                rounds: rounds.max(1),
                server_pid,
            };
            return bench(options);
        }
        Command::ImportKey {
            addr,
            instance,
            material,
            hash,
            name,
            rotate,
            external,
            wrapping_key_bits,
            valid_for_secs,
            create_token,
        } => {
            use kms::client::ImportTarget;
            let target = match (name, rotate, external) {
                (Some(name), None, None) => ImportTarget::NewKey { name },
                (None, Some(key_id), None) => ImportTarget::Rotate { key_id },
                (None, None, Some(key_id)) => ImportTarget::External {
                    key_id,
                    wrapping_key_bits,
                    valid_for_secs,
                },
                _ => {
                    eprintln!("kms import-key: give one of --name, --rotate, --external");
                    return ExitCode::from(2);
                }
            };
            let options = kms::client::ImportOptions {
                addr,
                instance,
                material,
                hash: if hash == "sha1" {
                    kms::hsm::oaep::OaepHash::Sha1
                } else {
                    kms::hsm::oaep::OaepHash::Sha256
                },
                create_token,
                target,
            };
            return import_key(options);
        }
    };
    let config = match Config::load(config.as_deref(), &ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kms: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let _log_writer = init_tracing(&config);

    if let Some(embedded) = &config.embedded {
        if let Err(e) = embedded.prepare_files() {
            tracing::error!(error = %e, "cannot prepare the embedded SoftHSM token");
            return ExitCode::FAILURE;
        }
        // SAFETY: no other thread exists yet (the tokio runtime is built below), and
        // SoftHSM reads SOFTHSM2_CONF when the module initialises, after this point.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &embedded.softhsm_conf) };
        if let Err(e) = embedded.ensure_token(&config.hsm.module) {
            tracing::error!(error = %e, "cannot create the embedded SoftHSM token");
            return ExitCode::FAILURE;
        }
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kms::server::serve(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "kms stopped");
            ExitCode::FAILURE
        }
    }
}

fn import_key(options: kms::client::ImportOptions) -> ExitCode {
    run_client(
        "import-key",
        &mut tokio::runtime::Builder::new_current_thread(),
        kms::client::import_key(&options),
        |key| {
            println!(
                "key {} state {:?} version {} size {} bits",
                key.id,
                kms::proto::KeyState::try_from(key.state).unwrap_or_default(),
                key.current_version_id,
                key.size_bits
            )
        },
    )
}

fn bench(options: kms::bench::BenchOptions) -> ExitCode {
    run_client(
        "bench",
        &mut tokio::runtime::Builder::new_multi_thread(),
        kms::bench::run(&options),
        |results| print!("{}", kms::bench::report(&options, &results)),
    )
}

/// Runs a client command on a runtime of its own; failures go to stderr, prefixed
/// with the command's name.
fn run_client<T, E: std::fmt::Display>(
    command: &str,
    runtime: &mut tokio::runtime::Builder,
    work: impl std::future::Future<Output = Result<T, E>>,
    print: impl FnOnce(T),
) -> ExitCode {
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("kms {command}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(value) => {
            print(value);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kms {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr through a buffered writer thread, so request paths never wait on a
/// write syscall. Lines are never dropped: when the buffer is full, logging waits. The
/// returned guard flushes what is buffered when `main` returns.
fn init_tracing(config: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    guard
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
