//! Wires the store, the HSM, the audit trail, the domain and the gRPC services
//! together, and runs them until the shutdown future completes: the listener and its
//! limits ([`listener`]), TLS ([`tls`]), the tokens file and SIGHUP reloads.

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub mod bootstrap;
pub mod listener;
pub mod tls;

use crate::api::{AuditApi, BackupApi, CallGate, EdgeLayer, GateOptions, ImportTokenApi, KeyApi};
use crate::audit::{AuditError, AuditTrail, BACKGROUND_COMMIT};
use crate::auth::{Authenticator, TokensFileError};
use crate::config::{Config, FD_HEADROOM};
use crate::domain::backup::BackupExporter;
use crate::domain::import_tokens::ImportTokenManager;
use crate::domain::key_pairs::KeyPairPool;
use crate::domain::keys::{Imports, KeyManager};
use crate::hsm::oaep::OaepHash;
use crate::hsm::{Hsm, HsmError, OaepSupport};
use crate::proto::audit_service_server::AuditServiceServer;
use crate::proto::backup_service_server::BackupServiceServer;
use crate::proto::import_token_service_server::ImportTokenServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::store::{AuditStore, ImportStore, KeyStore, Store, StoreConfig, StoreError};
use listener::ListenerOptions;
use tls::{ReloadableTls, TlsError};

/// How often the health service asks the token and the store whether they answer; more
/// often while one does not, so recovery shows quickly.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const HEALTH_INTERVAL_FAILING: Duration = Duration::from_millis(500);
/// How often expired keys are looked for.
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often audit retention runs, and how many records one pass may remove: above
/// the rate a saturated server appends (about 25k calls/s on this class of machine).
const AUDIT_RETENTION_INTERVAL: Duration = Duration::from_secs(1);
const AUDIT_RETENTION_BUDGET: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("start-up task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Tokens(#[from] TokensFileError),
    #[error("{0}")]
    Bootstrap(String),
    #[error("audit trail: {0}")]
    Audit(#[from] AuditError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Runs the service until `shutdown` resolves, then stops accepting, lets in-flight calls
/// finish, flushes the store, closes the HSM sessions and finalizes the module.
///
/// The port is bound before anything else, so a taken port is reported before the token
/// is touched. Once the HSM is open it is shut down on every way out, errors included: a
/// worker thread still inside the PKCS#11 module when the process exits would have the
/// module's crypto library torn down under it by the exit handlers (a crash at exit).
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let listener = listener::bind(config.listen).map_err(|source| ServeError::Bind {
        addr: config.listen.to_string(),
        source,
    })?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    if let StoreConfig::Sled { path, .. } | StoreConfig::Redb { path, .. } = &config.store
        && let Some(parent) = path.parent()
    {
        std::fs::create_dir_all(parent).map_err(|source| ServeError::DataDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let auth = Arc::new(bootstrap::authenticator(&config)?);
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(ReloadableTls::load(files.clone())?)),
        None => None,
    };
    let store = crate::store::open(&config.store).await?;
    tracing::info!(store = %store.describe(), "store open");
    bootstrap::restrict_permissions(&config.data_dir);
    let may_create_kek = !store.has_keys().await?;
    let hsm_config = config.hsm.clone();
    let hsm = Arc::new(
        tokio::task::spawn_blocking(move || Hsm::open(&hsm_config, may_create_kek)).await??,
    );
    let outcome = serve_with_hsm(
        &config,
        Frontend {
            listener,
            auth,
            tls,
        },
        store,
        Arc::clone(&hsm),
        shutdown,
    )
    .await;
    tokio::task::spawn_blocking(move || hsm.shutdown()).await?;
    outcome?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// What faces the network: the bound port, the tokens in force and TLS.
struct Frontend {
    listener: TcpListener,
    auth: Arc<Authenticator>,
    tls: Option<Arc<ReloadableTls>>,
}

/// Everything between opening the HSM and closing it. Background tasks are aborted
/// when this returns, on success or error.
async fn serve_with_hsm(
    config: &Config,
    frontend: Frontend,
    store: Arc<dyn Store>,
    hsm: Arc<Hsm>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Frontend {
        listener,
        auth,
        tls,
    } = frontend;
    let caps = hsm.capabilities();
    tracing::info!(
        token = %config.hsm.token_label,
        rfc5649 = caps.rfc5649_mechanism.unwrap_or("none"),
        rfc3394 = caps.rfc3394,
        aes_gcm = caps.aes_gcm,
        pool_size = config.hsm.pool_size,
        oaep_sha1 = ?caps.oaep_sha1,
        oaep_sha256 = ?caps.oaep_sha256,
        "HSM ready"
    );
    for hash in OaepHash::ALL {
        match caps.oaep(hash) {
            OaepSupport::Native => {}
            OaepSupport::Fallback => tracing::warn!(
                algorithm = hash.algorithm_name(),
                "the token cannot decrypt this RSA-OAEP variant natively: using the \
                 fallback (raw RSA in the HSM, OAEP padding removed in this process by \
                 OpenSSL); set hsm.oaep_fallback = false to refuse it instead"
            ),
            OaepSupport::Unavailable => tracing::warn!(
                algorithm = hash.algorithm_name(),
                "the token cannot decrypt this RSA-OAEP variant and the fallback is off \
                 or impossible: imports using it will be refused"
            ),
        }
    }

    let audit = Arc::new(AuditTrail::open(store.clone() as Arc<dyn AuditStore>).await?);
    let import_store = store.clone() as Arc<dyn ImportStore>;
    if hsm.kek_created() {
        let dropped = import_store.clear_import_state().await?;
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "a new master KEK was created: dropped import tokens, import parameters and \
                 pooled RSA pairs wrapped under the previous one"
            );
        }
    }
    let pairs = KeyPairPool::new(
        Arc::clone(&hsm),
        Arc::clone(&import_store),
        config.import.rsa_pool_size,
    );
    let tokens = Arc::new(ImportTokenManager::new(
        Arc::clone(&hsm),
        Arc::clone(&import_store),
        Arc::clone(&pairs),
        config.import.min_token_expiration_secs,
    ));
    let keys = Arc::new(KeyManager::new(
        Arc::clone(&hsm),
        store.clone() as Arc<dyn KeyStore>,
        Imports {
            store: import_store,
            tokens: Arc::clone(&tokens),
            pairs: Arc::clone(&pairs),
            parameters_lifetime: config.import.parameters_lifetime,
        },
        Arc::clone(&audit),
    ));
    let exporter = Arc::new(BackupExporter::new(
        Arc::clone(&hsm),
        Arc::clone(&store),
        config.hsm.kek_label.clone(),
        config.store.backend(),
    ));
    let gate = Arc::new(CallGate::new(
        Arc::clone(&auth),
        Arc::clone(&audit),
        GateOptions {
            sync_reads: config.audit.sync_reads,
        },
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    let background_tasks = AbortOnDrop(vec![
        tokio::spawn(sweep_expired(Arc::clone(&keys), Arc::clone(&tokens))),
        tokio::spawn(pairs.refill_forever()),
        tokio::spawn(monitor_health(Arc::clone(&hsm), Arc::clone(&store), health)),
        tokio::spawn(retain_audit(
            Arc::clone(&audit),
            config.audit.retention.clone(),
        )),
        tokio::spawn(commit_audit(Arc::clone(&audit))),
        tokio::spawn(reload_on_hangup(hangups(), Arc::clone(&auth), tls.clone())),
    ]);

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let local = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen.to_string(),
        source,
    })?;
    let limits = &config.limits;
    let fd_limit = listener::raise_fd_limit().unwrap_or(1024);
    let max_connections = limits
        .max_connections
        .min((fd_limit as usize).saturating_sub(FD_HEADROOM).max(1));
    if max_connections < limits.max_connections {
        tracing::warn!(
            configured = limits.max_connections,
            max_connections,
            fd_limit,
            "connection limit lowered to fit the open-file limit"
        );
    }
    let (incoming, accept_task) = listener::accept(
        listener,
        tls.clone(),
        ListenerOptions {
            max_connections,
            idle_timeout: limits.idle_timeout,
            handshake_timeout: limits.handshake_timeout,
        },
    );
    let _accept_task = AbortOnDrop(vec![accept_task]);
    match &tls {
        Some(tls) => tracing::info!(
            %local,
            mutual_tls = tls.mutual(),
            max_connections,
            "listening (TLS)"
        ),
        None => tracing::info!(
            %local,
            max_connections,
            "listening (plaintext: without TLS, bearer tokens cross the network in clear; \
             set KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE to serve TLS)"
        ),
    }
    // A machine-readable line on stdout, so scripts and tests can find an ephemeral port.
    println!("kms listening on {local}");
    let _ = std::io::stdout().flush();

    // Once the signal arrives, in-flight calls get `shutdown_grace` to finish; a client
    // that never lets its connection close must not keep the process (and the HSM
    // sessions) alive forever.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    };
    let grace = config.shutdown_grace;
    let deadline = async move {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let max_request = limits.max_request_bytes;
    let server = Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        // Flow-control windows bound what one connection can make the server buffer:
        // a stream holds at most one window (64 KiB, enough for the largest valid
        // request), a connection at most 1 MiB across its streams.
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .http2_max_header_list_size(16 * 1024)
        .http2_keepalive_interval(Some(limits.idle_timeout / 3))
        .http2_keepalive_timeout(Some(limits.idle_timeout / 3))
        .layer(EdgeLayer::new(
            Arc::clone(&audit),
            Arc::clone(&auth),
            max_request,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            KeyServiceServer::new(KeyApi::new(Arc::clone(&keys), Arc::clone(&gate)))
                .max_decoding_message_size(max_request),
        )
        .add_service(
            ImportTokenServiceServer::new(ImportTokenApi::new(tokens, Arc::clone(&gate)))
                .max_decoding_message_size(max_request),
        )
        .add_service(
            AuditServiceServer::new(AuditApi::new(Arc::clone(&audit), Arc::clone(&gate)))
                .max_decoding_message_size(max_request),
        )
        .add_service(
            BackupServiceServer::new(BackupApi::new(exporter, gate))
                .max_decoding_message_size(max_request),
        )
        .serve_with_incoming_shutdown(incoming, shutdown);
    let served = tokio::select! {
        served = server => served,
        () = deadline => {
            tracing::warn!(?grace, "in-flight calls did not finish within the grace period; closing connections");
            Ok(())
        }
    };

    tracing::info!("stopped accepting; closing down");
    drop(background_tasks);
    // Commits the last audit records and makes everything durable.
    let flushed = audit.persist().await;
    served?;
    flushed?;
    Ok(())
}

/// Aborts the tasks when dropped, so no background task outlives the server.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Applies time-driven changes even to keys nobody uses, so lists and counts are right:
/// expiration dates (-> DEACTIVATED) and imported material's valid-to (-> erased). Any
/// use of a key applies the same rules at once. Also erases the private keys of expired
/// import tokens and import parameters.
async fn sweep_expired(keys: Arc<KeyManager>, tokens: Arc<ImportTokenManager>) {
    loop {
        if let Err(e) = keys.expire_due().await {
            tracing::error!(error = %e, "key expiry sweep failed");
        }
        if let Err(e) = tokens.sweep().await {
            tracing::error!(error = %e, "import token sweep failed");
        }
        if let Err(e) = keys.sweep_import_parameters().await {
            tracing::error!(error = %e, "import parameters sweep failed");
        }
        tokio::time::sleep(EXPIRY_SWEEP_INTERVAL).await;
    }
}

/// Makes read calls' (and time-driven changes') audit records durable, every
/// [`BACKGROUND_COMMIT`]. Mutating calls do not wait for this; an idle server does not
/// write at all.
async fn commit_audit(audit: Arc<AuditTrail>) {
    loop {
        tokio::time::sleep(BACKGROUND_COMMIT).await;
        if !audit.has_pending() {
            continue;
        }
        // A failure is logged once per episode by the trail or the store.
        if let Err(e) = audit.persist().await {
            tracing::debug!(error = %e, "background audit flush failed");
        }
    }
}

/// Applies the audit trail's retention bounds.
async fn retain_audit(audit: Arc<AuditTrail>, retention: crate::audit::retention::Retention) {
    loop {
        tokio::time::sleep(AUDIT_RETENTION_INTERVAL).await;
        match audit.prune(&retention, AUDIT_RETENTION_BUDGET).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "audit retention removed old records"),
            Err(e) => tracing::error!(error = %e, "audit retention failed"),
        }
    }
}

/// SIGHUP's handler, installed before the server listens: until it is, SIGHUP's default
/// action ends the process, so one sent right after start-up (a test, an operator's
/// reload) must not find the reload task not yet polled.
fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP: no reloads");
            None
        }
    }
}

/// SIGHUP: re-read the tokens file and the TLS files. What does not load is refused,
/// logged, and the previous settings stay in force.
async fn reload_on_hangup(
    hangups: Option<tokio::signal::unix::Signal>,
    auth: Arc<Authenticator>,
    tls: Option<Arc<ReloadableTls>>,
) {
    let Some(mut hangups) = hangups else {
        return;
    };
    while hangups.recv().await.is_some() {
        match auth.reload() {
            Ok(principals) => tracing::info!(
                principals,
                file = %auth.path().display(),
                "SIGHUP: tokens file reloaded"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "SIGHUP: tokens file refused; the previous tokens stay in force"
            ),
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate files reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS files refused; the previous certificates stay in force"
                ),
            }
        }
    }
}

/// Keeps the health service in step with the token and the store: NOT_SERVING while
/// either does not answer. A change is logged once, not on every check.
async fn monitor_health(hsm: Arc<Hsm>, store: Arc<dyn Store>, health: HealthReporter) {
    let services = [
        "",
        "kms.v1.KeyService",
        "kms.v1.ImportTokenService",
        "kms.v1.AuditService",
    ];
    let mut last = None;
    let (mut hsm_failing, mut store_failing) = (false, false);
    loop {
        let hsm_ok = match hsm.ping().await {
            Ok(()) => true,
            Err(e) => {
                if !hsm_failing {
                    tracing::error!(error = %e, "HSM health check failed");
                }
                false
            }
        };
        let store_ok = match store.ping().await {
            Ok(()) => true,
            Err(e) => {
                if !store_failing {
                    tracing::error!(error = %e, "store health check failed");
                }
                false
            }
        };
        if (hsm_failing && hsm_ok) || (store_failing && store_ok) {
            tracing::warn!(hsm = hsm_ok, store = store_ok, "health check recovered");
        }
        (hsm_failing, store_failing) = (!hsm_ok, !store_ok);
        let status = if hsm_ok && store_ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            for service in services {
                health.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        let interval = if status == ServingStatus::Serving {
            HEALTH_INTERVAL
        } else {
            HEALTH_INTERVAL_FAILING
        };
        tokio::time::sleep(interval).await;
    }
}
