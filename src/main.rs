//! `kms`: parse the command line, load configuration, initialise tracing, serve until
//! SIGTERM or SIGINT; or run one of the client commands in `kms::cli`.

use std::process::ExitCode;

use clap::Parser;
use kms::cli::command_line::{Cli, Command};

/// jemalloc, with background threads that give freed memory back to the OS after a
/// delay, off the request path. The service allocates many small short-lived buffers
/// per call from many threads, and sled allocates and frees node buffers of every size
/// as it pages its tree. Measured (README, "At size"): sled serving a million keys
/// peaked at 316-324 MB through GetKey, WrapKey, CreateKey and a backup on jemalloc,
/// against 518-546 MB on mimalloc (which held freed pages in idle threads' heaps) and
/// 509 MB on glibc's malloc, with the same heap in use; rates within the noise of
/// mimalloc's (`scripts/bench-builds.sh`), which had replaced glibc's for a faster
/// WrapKey.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use kms::config::{Config, LogFormat, ProcessEnv};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.command {
        Command::Serve { config } => config,
        client => return kms::cli::run(client),
    };
    let config = match Config::load(config.as_deref(), &ProcessEnv) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kms: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let _log_writer = init_tracing(&config);
    // Everything the server creates (database, tokens file, token, admin token) is
    // owner-only from the start.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    kms::server::tls::install_provider();

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
    let shutdown = match install_shutdown_signal(&runtime) {
        Ok(shutdown) => shutdown,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM and SIGINT");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kms::server::serve(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "kms stopped");
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

/// SIGTERM and SIGINT handlers, installed before the server starts. Registering them
/// inside the shutdown future would leave a window after "kms listening" is printed in
/// which a SIGTERM still kills the process with the default action (no clean stop).
fn install_shutdown_signal(
    runtime: &tokio::runtime::Runtime,
) -> std::io::Result<impl std::future::Future<Output = ()> + use<>> {
    use tokio::signal::unix::{SignalKind, signal};
    let _context = runtime.enter();
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
    })
}
