//! The command line: `kms serve` and the client commands, as clap parses them. `serve`
//! is the binary's own; [`run`] runs the others.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kms", version, about = "An HSM-backed key management service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gRPC service. Without --config: the embedded SoftHSM default under
    /// KMS_DATA_DIR (./kms-data), listening on KMS_LISTEN (127.0.0.1:50051).
    Serve {
        /// A TOML configuration file; KMS_* environment variables override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Measure a running server: N concurrent callers per scenario, ops/s, p50, p99.
    Bench {
        #[command(flatten)]
        target: TargetArgs,
        /// The instance to create the bench keys in (the token needs Editor there);
        /// default: a new random one (needs Editor on *).
        #[arg(long)]
        instance: Option<String>,
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
        scenarios: Vec<crate::cli::bench::Scenario>,
        /// Rounds: each throughput scenario is measured once per round, interleaved,
        /// and the rounds are summed.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The server's process id, to report its CPU time per call and, in the
        /// overload scenario, its resident memory (Linux).
        #[arg(long)]
        server_pid: Option<u32>,
        /// Overload scenario: flood callers per well-behaved caller.
        #[arg(long, default_value_t = 10)]
        flood_factor: usize,
        /// Before measuring, create keys in the instance (at least 128 calls in
        /// flight) until it holds this many; with --instance, a later run reuses them.
        #[arg(long, default_value_t = 0)]
        preload: u64,
    },
    /// Bring your own AES key: read material from a file, encrypt it locally for the
    /// server's import token (secure import) or import parameters (EXTERNAL keys), and
    /// import it. Give exactly one of --name, --rotate, --external.
    ImportKey {
        #[command(flatten)]
        target: TargetArgs,
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
    /// Manage principals and their bearer tokens in the tokens file.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Take a consistent backup of a running server's whole store (needs the
    /// Administrator role on *). Useless without the HSM's master KEK: back the token
    /// up too.
    Backup {
        #[command(flatten)]
        target: TargetArgs,
        /// The instance the call's audit record is filed under.
        #[arg(long, default_value = "backup")]
        instance: String,
        /// Where to write the backup (first to FILE.partial, renamed once checked).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Rebuild a store from a backup, into an empty store (the server stopped), after
    /// checking the file and that the token holds the backup's master KEK.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The data directory to restore into (overrides the configuration's and
        /// KMS_DATA_DIR).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The configuration the server will run with (its [hsm] and [store]).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Copy a stopped server's embedded store into an empty PostgreSQL database or redb
    /// file, to serve the same token from there (then set KMS_STORE_URL, or
    /// KMS_STORE_BACKEND=redb with the file at <data dir>/kms.redb).
    Migrate {
        /// The data directory whose store (`kms.redb`, else `db`) is copied.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// postgres:// URL or key=value string; the password from KMS_STORE_PASSWORD or
        /// KMS_STORE_PASSWORD_FILE.
        #[arg(
            long,
            value_name = "URL",
            required_unless_present = "to_redb",
            conflicts_with = "to_redb"
        )]
        to: Option<String>,
        /// A new redb database file.
        #[arg(long, value_name = "FILE")]
        to_redb: Option<PathBuf>,
    },
    /// Give back the space a stopped server's embedded store keeps for dead data: sled
    /// rewrites its database into a fresh one (about a third smaller as a server
    /// leaves it), redb compacts its file in place. Needs free disk for one more copy
    /// of a sled store.
    Compact {
        /// The data directory whose store (`kms.redb`, else `db`) is compacted.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
    /// Sizes of a stopped embedded default's store: entries and bytes per tree, and
    /// the database's size on disk.
    Stats {
        /// The data directory whose store (`kms.redb`, else `db`) is measured.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

/// Where a client command connects, and with which token.
#[derive(clap::Args)]
pub struct TargetArgs {
    /// The server's URL (https://... for TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// PEM CA certificate the server's TLS certificate must chain to.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// A file holding the bearer token (else KMS_TOKEN holds the token itself).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl TargetArgs {
    fn target(self) -> crate::cli::connect::Target {
        crate::cli::connect::Target {
            addr: self.addr,
            ca_file: self.ca_file,
            token_file: self.token_file,
        }
    }
}

/// Which tokens file: a data directory's `tokens.toml`, or a file named outright.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct TokensFileArgs {
    /// The server's data directory (its tokens.toml).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The tokens file itself (auth.tokens_file of a configuration).
    #[arg(long, value_name = "FILE")]
    tokens_file: Option<PathBuf>,
}

impl TokensFileArgs {
    fn path(&self) -> PathBuf {
        crate::cli::token::tokens_path(self.data_dir.as_deref(), self.tokens_file.as_deref())
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a principal with a new token; prints the token, once, on stdout.
    Create {
        #[command(flatten)]
        file: TokensFileArgs,
        #[arg(long)]
        principal: String,
        /// INSTANCE=ROLE (Viewer, Editor or Administrator; * = every instance). Repeat
        /// for several instances.
        #[arg(long = "role", value_name = "INSTANCE=ROLE", required = true)]
        roles: Vec<String>,
    },
    /// Remove a principal and its token.
    Revoke {
        #[command(flatten)]
        file: TokensFileArgs,
        #[arg(long)]
        principal: String,
    },
    /// Principals and their roles (never token digests).
    List {
        #[command(flatten)]
        file: TokensFileArgs,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole hash chain of a stopped server's audit trail (or of a copy).
    ///
    /// Either a data directory (redb or sled) or a PostgreSQL store.
    Verify {
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// postgres:// URL or key=value string; the password from KMS_STORE_PASSWORD or
        /// KMS_STORE_PASSWORD_FILE.
        #[arg(long, value_name = "URL", env = "KMS_STORE_URL")]
        store_url: Option<String>,
    },
}

/// `kms restore`: the configuration with `--data-dir` over it; the embedded token's
/// SOFTHSM2_CONF exported before any thread starts.
fn restore(from: PathBuf, data_dir: Option<PathBuf>, config: Option<PathBuf>) -> ExitCode {
    struct DataDirOver(Option<PathBuf>);
    impl crate::config::Env for DataDirOver {
        fn var(&self, name: &str) -> Option<String> {
            match (&self.0, name) {
                (Some(dir), "KMS_DATA_DIR") => Some(dir.display().to_string()),
                _ => crate::config::ProcessEnv.var(name),
            }
        }
    }
    let config = match crate::config::Config::load(config.as_deref(), &DataDirOver(data_dir)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kms restore: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    // The restored database holds KEK-wrapped keys: owner-only, as the server makes it.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    if let Some(embedded) = &config.embedded {
        if !embedded.softhsm_conf.exists() {
            eprintln!(
                "kms restore: no embedded token at {}: restore the token first (copy the \
                 softhsm directory of the data directory the backup was taken from)",
                embedded.softhsm_conf.display()
            );
            return ExitCode::FAILURE;
        }
        // SAFETY: no other thread exists yet (the runtime is built below), and SoftHSM
        // reads SOFTHSM2_CONF when the module initialises, after this point.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &embedded.softhsm_conf) };
    }
    run_client(
        "restore",
        &mut tokio::runtime::Builder::new_multi_thread(),
        crate::cli::backup::restore(config, from),
        |done| println!("restored {}", done.counts),
    )
}

/// Runs a client command (anything but `serve`, which the binary runs itself).
pub fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve { .. } => {
            eprintln!("kms: serve is not a client command");
            ExitCode::from(2)
        }
        Command::Token { command } => token(command),
        Command::Backup {
            target,
            instance,
            out,
        } => run_client(
            "backup",
            &mut tokio::runtime::Builder::new_multi_thread(),
            crate::cli::backup::backup(target.target(), instance, out),
            |done| {
                println!(
                    "backup written: {} keys ({} versions), {} audit blocks, {} bytes; \
                     KEK {:?}, check value {}",
                    done.counts.keys,
                    done.counts.versions,
                    done.counts.audit_blocks,
                    done.bytes,
                    done.manifest.kek_label,
                    hex::encode(done.manifest.kek_check.value)
                )
            },
        ),
        Command::Restore {
            from,
            data_dir,
            config,
        } => restore(from, data_dir, config),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    data_dir,
                    store_url,
                },
        } => audit_verify(data_dir, store_url),
        Command::Store {
            command: StoreCommand::Stats { data_dir },
        } => run_client(
            "store stats",
            &mut tokio::runtime::Builder::new_multi_thread(),
            crate::cli::store::stats(data_dir),
            |report| print!("{report}"),
        ),
        Command::Store {
            command: StoreCommand::Compact { data_dir },
        } => run_client(
            "store compact",
            &mut tokio::runtime::Builder::new_multi_thread(),
            crate::cli::store::compact(data_dir),
            |report| println!("{report}"),
        ),
        Command::Store {
            command: StoreCommand::Migrate { from, to, to_redb },
        } => run_client(
            "store migrate",
            &mut tokio::runtime::Builder::new_multi_thread(),
            async move {
                let to = crate::cli::store::MigrateTarget::from_args(to, to_redb)?;
                crate::cli::store::migrate(from, to).await
            },
            |m| println!("migrated {m}"),
        ),
        Command::Bench {
            target,
            instance,
            concurrency,
            seconds,
            warmup_seconds,
            keys,
            import_calls,
            scenarios,
            rounds,
            server_pid,
            flood_factor,
            preload,
        } => {
            let options = crate::cli::bench::BenchOptions {
                target: target.target(),
                instance: instance.unwrap_or_else(|| format!("bench-{}", uuid::Uuid::new_v4())),
                concurrency: concurrency.max(1),
                duration: std::time::Duration::from_secs(seconds.max(1)),
                warmup: std::time::Duration::from_secs(warmup_seconds),
                distinct_keys: keys,
                import_calls,
                scenarios: if scenarios.is_empty() {
                    crate::cli::bench::Scenario::ALL.to_vec()
                } else {
                    scenarios
                },
                rounds: rounds.max(1),
                server_pid,
                flood_factor,
                preload,
            };
            bench(options)
        }
        Command::ImportKey {
            target: server,
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
            use crate::cli::import_key::ImportTarget;
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
            let options = crate::cli::import_key::ImportOptions {
                server: server.target(),
                instance,
                material,
                hash: if hash == "sha1" {
                    crate::hsm::oaep::OaepHash::Sha1
                } else {
                    crate::hsm::oaep::OaepHash::Sha256
                },
                create_token,
                target,
            };
            import_key(options)
        }
    }
}

fn token(command: TokenCommand) -> ExitCode {
    use crate::cli::token;
    let outcome = match command {
        TokenCommand::Create {
            file,
            principal,
            roles,
        } => token::parse_roles(&roles)
            .and_then(|roles| token::create(&file.path(), &principal, roles))
            .map(|created| {
                println!("{}", created.expose());
                eprintln!(
                    "created principal {principal} in {}; a running server takes it on SIGHUP",
                    file.path().display()
                );
            }),
        TokenCommand::Revoke { file, principal } => {
            token::revoke(&file.path(), &principal).map(|()| {
                eprintln!("revoked principal {principal}; a running server drops it on SIGHUP")
            })
        }
        TokenCommand::List { file } => token::list(&file.path()).map(|lines| {
            for line in lines {
                println!("{line}");
            }
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn audit_verify(data_dir: Option<PathBuf>, store_url: Option<String>) -> ExitCode {
    use crate::cli::audit::{StoreTarget, verify_store};
    run_client(
        "audit verify",
        &mut tokio::runtime::Builder::new_current_thread(),
        async move { verify_store(&StoreTarget::from_args(data_dir, store_url)?).await },
        |report| match (report.first_seq, report.last_seq) {
            (Some(first), Some(last)) => println!(
                "audit trail intact: {} records ({first}..{last}), head {}",
                report.records,
                hex::encode(report.head_hash)
            ),
            _ => println!("audit trail intact: no records"),
        },
    )
}

fn import_key(options: crate::cli::import_key::ImportOptions) -> ExitCode {
    run_client(
        "import-key",
        &mut tokio::runtime::Builder::new_current_thread(),
        crate::cli::import_key::import_key(&options),
        |key| {
            println!(
                "key {} state {:?} version {} size {} bits",
                key.id,
                crate::proto::KeyState::try_from(key.state).unwrap_or_default(),
                key.current_version_id,
                key.size_bits
            )
        },
    )
}

fn bench(options: crate::cli::bench::BenchOptions) -> ExitCode {
    run_client(
        "bench",
        &mut tokio::runtime::Builder::new_multi_thread(),
        crate::cli::bench::run_all(&options),
        |report| print!("{report}"),
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
