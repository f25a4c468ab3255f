//! Wires the store, the HSM, the domain and the gRPC services together, and runs them
//! until the shutdown future completes.

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::api::{ImportTokenApi, KeyApi};
use crate::config::Config;
use crate::domain::import_tokens::ImportTokenManager;
use crate::domain::key_pairs::KeyPairPool;
use crate::domain::keys::{Imports, KeyManager};
use crate::hsm::oaep::OaepHash;
use crate::hsm::{Hsm, HsmError, OaepSupport};
use crate::proto::import_token_service_server::ImportTokenServiceServer;
use crate::proto::key_service_server::KeyServiceServer;
use crate::store::{GroupFlusher, ImportStore, KeyStore, SledStore, StoreError};

/// How often the health service asks the token whether it is still there.
const HSM_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often expired keys are looked for.
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
}

/// Runs the service until `shutdown` resolves, then stops accepting, lets in-flight calls
/// finish, flushes the store, closes the HSM sessions and finalizes the module.
///
/// The port is bound before anything else, so a taken port is reported before the token
/// is touched. Once the HSM is open it is shut down on every way out, errors included: a
/// worker thread still inside the PKCS#11 module when the process exits would have the
/// module's crypto library torn down under it by the exit handlers (a crash at exit).
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen.to_string(),
            source,
        })?;
    if let Some(parent) = config.store_path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ServeError::DataDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let store = Arc::new(SledStore::open(&config.store_path)?);
    let may_create_kek = !store.has_keys()?;
    let hsm_config = config.hsm.clone();
    let hsm = Arc::new(
        tokio::task::spawn_blocking(move || Hsm::open(&hsm_config, may_create_kek)).await??,
    );
    let outcome = serve_with_hsm(&config, store, Arc::clone(&hsm), listener, shutdown).await;
    tokio::task::spawn_blocking(move || hsm.shutdown()).await?;
    outcome?;
    tracing::info!("shutdown complete");
    Ok(())
}

/// Everything between opening the HSM and closing it. Background tasks are aborted
/// when this returns, on success or error.
async fn serve_with_hsm(
    config: &Config,
    store: Arc<SledStore>,
    hsm: Arc<Hsm>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
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

    let flusher = GroupFlusher::start(store.db());
    let import_store = store.clone() as Arc<dyn ImportStore>;
    if hsm.kek_created() {
        let dropped = import_store.clear_import_state()?;
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
        flusher.clone(),
        Arc::clone(&pairs),
        config.import.min_token_expiration_secs,
    ));
    let keys = Arc::new(KeyManager::new(
        Arc::clone(&hsm),
        store.clone() as Arc<dyn KeyStore>,
        flusher.clone(),
        Imports {
            store: import_store,
            tokens: Arc::clone(&tokens),
            pairs: Arc::clone(&pairs),
            parameters_lifetime: config.import.parameters_lifetime,
        },
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    let background_tasks = AbortOnDrop(vec![
        tokio::spawn(sweep_expired(Arc::clone(&keys), Arc::clone(&tokens))),
        tokio::spawn(pairs.refill_forever()),
        tokio::spawn(monitor_hsm(Arc::clone(&hsm), health)),
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
    tracing::info!(%local, "listening");
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
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(KeyServiceServer::new(KeyApi::new(Arc::clone(&keys))))
        .add_service(ImportTokenServiceServer::new(ImportTokenApi::new(tokens)))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY, small responses wait on delayed ACKs (~40 ms tails).
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            shutdown,
        );
    let served = tokio::select! {
        served = server => served,
        () = deadline => {
            tracing::warn!(?grace, "in-flight calls did not finish within the grace period; closing connections");
            Ok(())
        }
    };

    tracing::info!("stopped accepting; closing down");
    drop(background_tasks);
    let flushed = flusher.flush().await;
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
        if let Err(e) = keys.expire_due() {
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

/// Keeps the health service in step with the token: NOT_SERVING while it does not answer.
async fn monitor_hsm(hsm: Arc<Hsm>, health: HealthReporter) {
    let services = ["", "kms.v1.KeyService", "kms.v1.ImportTokenService"];
    let mut last = None;
    loop {
        let status = match hsm.ping().await {
            Ok(()) => ServingStatus::Serving,
            Err(e) => {
                tracing::error!(error = %e, "HSM health check failed");
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            for service in services {
                health.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        tokio::time::sleep(HSM_HEALTH_INTERVAL).await;
    }
}
