//! The PostgreSQL backend: several `kms serve` replicas on one database serve one key
//! space.
//!
//! Decisions:
//! - tokio-postgres (async, pipelined) with a deadpool-postgres pool and per-connection
//!   prepared statements. A connection that cannot be had within
//!   [`POOL_WAIT`] is `Unavailable`, so a stopped database turns into UNAVAILABLE
//!   answers, not hung calls; the pool reconnects on its own when the database returns.
//! - Every write is one transaction, durable when it commits (`synchronous_commit` as
//!   the server sets it): [`Durability::sync`] has nothing to wait for.
//! - Compare-and-swap is `UPDATE ... WHERE revision = $previous`; a serialisation
//!   failure or deadlock is a `Conflict` too, which the domain retries.
//! - Counters (CountKeys) are rows updated in the key's transaction, sixteen shards per
//!   (instance, state, extractable) so concurrent creates do not queue on one row, and
//!   in a fixed order so two transactions never wait on each other's counters in a cycle.
//! - Key records read by a replica are cached for at most `cache_ttl` (default
//!   [`DEFAULT_CACHE_TTL_MS`] ms): the bound within which a change made on another
//!   replica (DisableKey, DeleteKey, RotateKey) is seen here. Absence is never cached,
//!   so a key created elsewhere is usable at once; this replica's own writes update the
//!   cache, and a conflict evicts the entry so the retry reads the database. 0 turns
//!   the cache off (every call reads through).
//! - The audit trail is one chain for all replicas: an append locks the chain's row
//!   (`SELECT ... FOR UPDATE`), seals its records onto the end it finds, inserts the
//!   blocks and moves the end, in one transaction.
//! - The RSA key-pair pool is a table shared by the replicas: each tops it up to the
//!   configured size, and a pair is taken by `DELETE ... FOR UPDATE SKIP LOCKED`, so no
//!   pair serves two tokens.

mod audit;
mod imports;
mod keys;
pub mod schema;
mod snapshot;

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use lru::LruCache;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::{Durability, Store, StoreError};
use crate::domain::model::KeyRecord;
use crate::secret::SecretBytes;

const BACKEND: &str = "postgres";
/// How long a call waits for a pooled connection (or to make one) before the store is
/// reported unavailable.
pub const POOL_WAIT: Duration = Duration::from_secs(3);
pub const DEFAULT_POOL_SIZE: usize = 16;
pub const DEFAULT_CACHE_TTL_MS: u64 = 250;
/// The most a replica may serve a key record without re-reading it.
pub const MAX_CACHE_TTL_MS: u64 = 1000;
/// Key records one replica keeps cached.
const CACHE_ENTRIES: usize = 65_536;

/// How to reach the database. The password comes from a file or the environment (set by
/// the configuration loader), never the command line, and is never printed.
#[derive(Clone)]
pub struct PostgresConfig {
    /// A `postgres://` URL or a libpq key-value string (`host=/run/postgresql dbname=kms`).
    pub url: String,
    pub password: Option<SecretBytes>,
    /// PEM file of the CA that signed the database's certificate: connect with TLS and
    /// verify it. Without it, connections are plaintext (a Unix socket or a trusted
    /// network).
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub cache_ttl: Duration,
}

impl PostgresConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            ca_file: None,
            pool_size: DEFAULT_POOL_SIZE,
            cache_ttl: Duration::from_millis(DEFAULT_CACHE_TTL_MS),
        }
    }

    /// Parses the connection string (password applied); errors never quote it.
    pub fn parsed(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut config: tokio_postgres::Config = self.url.parse().map_err(|_| {
            StoreError::unavailable(
                BACKEND,
                "the store URL is neither a postgres:// URL nor a key=value connection string",
            )
        })?;
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        if config.get_dbname().is_none() {
            config.dbname("kms");
        }
        if config.get_application_name().is_none() {
            config.application_name("kms");
        }
        Ok(config)
    }

    /// Host(s), port and database, for logs: no user secrets.
    pub fn describe(&self) -> String {
        match self.parsed() {
            Ok(config) => {
                let hosts: Vec<String> = config
                    .get_hosts()
                    .iter()
                    .map(|host| match host {
                        tokio_postgres::config::Host::Tcp(name) => name.clone(),
                        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                    })
                    .collect();
                format!(
                    "postgres host={} port={:?} dbname={}",
                    hosts.join(","),
                    config.get_ports(),
                    config.get_dbname().unwrap_or("")
                )
            }
            Err(_) => "postgres (unparsable URL)".into(),
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("database", &self.describe())
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

/// Maps a database error: conflicts the domain may retry, everything else unavailable.
fn db_error(error: tokio_postgres::Error) -> StoreError {
    match error.code() {
        Some(code)
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            StoreError::Conflict
        }
        _ => StoreError::unavailable(BACKEND, error),
    }
}

fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(e) => db_error(e),
        other => StoreError::unavailable(BACKEND, other),
    }
}

pub struct PostgresStore {
    pool: Pool,
    cache: KeyCache,
    description: String,
}

impl PostgresStore {
    /// Connects, and applies the schema's migrations under a lock.
    pub async fn connect(config: &PostgresConfig) -> Result<Self, StoreError> {
        let parsed = config.parsed()?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &config.ca_file {
            Some(ca_file) => Manager::from_config(parsed, tls_connector(ca_file)?, manager_config),
            None => Manager::from_config(parsed, tokio_postgres::NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .recycle_timeout(Some(POOL_WAIT))
            .build()
            .map_err(|e| StoreError::unavailable(BACKEND, e))?;
        let store = Self {
            pool,
            cache: KeyCache::new(config.cache_ttl),
            description: config.describe(),
        };
        let mut client = store.client().await?;
        schema::migrate(&mut client, &store.description).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<Client, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// The newest applied migration.
    pub async fn schema_version(&self) -> Result<u32, StoreError> {
        schema::version(&self.client().await?).await
    }

    /// Records a schema version beyond this build's: for tests of the refusal.
    #[doc(hidden)]
    pub async fn force_schema_version(&self, version: u32) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO kms_schema (version) VALUES ($1)",
                &[&(version as i32)],
            )
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

/// rustls (ring) verifying the database's certificate against one CA file.
fn tls_connector(
    ca_file: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let tls_error = |reason: String| StoreError::unavailable(BACKEND, reason);
    let pem = std::fs::read(ca_file)
        .map_err(|e| tls_error(format!("cannot read {}: {e}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls::pki_types::CertificateDer<'static> =
            cert.map_err(|e| tls_error(format!("{}: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| tls_error(format!("{}: {e}", ca_file.display())))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_error(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[async_trait]
impl Durability for PostgresStore {
    async fn sync(&self) -> Result<(), StoreError> {
        // Every write committed its own transaction before it returned.
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .simple_query("SELECT 1")
            .await
            .map_err(db_error)?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Key records this replica read or wrote, each kept for at most the TTL.
struct KeyCache {
    ttl: Duration,
    shards: Vec<Mutex<LruCache<Uuid, (Instant, KeyRecord)>>>,
}

impl KeyCache {
    const SHARDS: usize = 16;

    fn new(ttl: Duration) -> Self {
        let per_shard = NonZeroUsize::new(CACHE_ENTRIES / Self::SHARDS).expect("non-zero");
        Self {
            ttl,
            shards: (0..Self::SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        }
    }

    fn shard(&self, id: &Uuid) -> std::sync::MutexGuard<'_, LruCache<Uuid, (Instant, KeyRecord)>> {
        self.shards[id.as_u128() as usize % Self::SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, instance: &str, id: Uuid) -> Option<KeyRecord> {
        if self.ttl.is_zero() {
            return None;
        }
        let mut shard = self.shard(&id);
        match shard.get(&id) {
            Some((at, record)) if at.elapsed() < self.ttl => {
                (record.instance == instance).then(|| record.clone())
            }
            Some(_) => {
                shard.pop(&id);
                None
            }
            None => None,
        }
    }

    /// Remembers a record read (or written) at `read_at`.
    fn put(&self, record: &KeyRecord, read_at: Instant) {
        if !self.ttl.is_zero() {
            self.shard(&record.id)
                .put(record.id, (read_at, record.clone()));
        }
    }

    fn evict(&self, id: &Uuid) {
        self.shard(id).pop(id);
    }
}
