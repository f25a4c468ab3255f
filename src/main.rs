//! `kms`: parse the command line, load configuration, initialise tracing, serve until
//! SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Serve { config } = cli.command;
    let config = match Config::load(config.as_deref(), &ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kms: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);

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

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
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
