//! The `[store]` section: which backend holds keys, versions, import state and the
//! audit trail.
//!
//! ```toml
//! [store]
//! backend = "postgres"              # or "redb" (the default), or "sled"
//! url = "postgres://kms@db.internal/kms"  # or "host=/run/postgresql dbname=kms user=kms"
//! password_file = "/etc/kms/db.password"  # or KMS_STORE_PASSWORD in the environment
//! ca_file = "/etc/kms/db-ca.pem"    # TLS to the database, verified against this CA
//! pool_size = 16
//! cache_ttl_ms = 250                # how stale another replica's change may be seen
//! ```
//!
//! With no backend configured, the store is embedded: redb, unless the data directory
//! already holds an earlier build's sled database (`db`), which is then opened as it
//! is (`kms store migrate --to-redb` moves it). The embedded backends keep their files
//! in the data directory unless `path` (`KMS_STORE_PATH`) says otherwise: sled a
//! directory `db`, redb one file `kms.redb`. `cache_mib`
//! (`KMS_STORE_CACHE_MIB`, default 64) sizes their page cache. redb holds its cache to
//! that size. sled counts its cache in compressed bytes, each about 3.5 bytes resident,
//! so it gets a quarter of the figure; it holds more besides (a million keys walked:
//! about 400 MB resident), so the setting lowers but does not bound its memory (README,
//! "At size").
//!
//! `KMS_STORE_URL` overrides `url` and implies `backend = "postgres"`. A password is
//! never taken from the command line; one inside the URL works but then lives in the
//! configuration file or environment, so a password file is preferred.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Env, parsed_var};
use crate::secret::SecretBytes;
use crate::store::postgres::{DEFAULT_CACHE_TTL_MS, DEFAULT_POOL_SIZE, MAX_CACHE_TTL_MS};
use crate::store::{PostgresConfig, StoreConfig};

pub const STORE_PASSWORD_ENV: &str = "KMS_STORE_PASSWORD";

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sled,
    Redb,
    Postgres,
}

impl Backend {
    /// The embedded store when none is configured: the one a data directory already
    /// holds (an earlier build's sled `db` is kept, never silently replaced by an empty
    /// store), else redb.
    fn embedded_default(data_dir: &Path) -> Backend {
        if data_dir.join("db").exists() && !data_dir.join("kms.redb").exists() {
            Backend::Sled
        } else {
            Backend::Redb
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreSection {
    backend: Option<Backend>,
    /// sled: the database directory (default `<data dir>/db`); redb: the database file
    /// (default `<data dir>/kms.redb`).
    path: Option<PathBuf>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
    cache_ttl_ms: Option<u64>,
    /// sled, redb: page cache size in MiB.
    cache_mib: Option<u64>,
}

fn invalid(name: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name: name.into(),
        reason: reason.into(),
    }
}

pub(super) fn resolve(
    section: Option<StoreSection>,
    env: &dyn Env,
    data_dir: &Path,
) -> Result<StoreConfig, ConfigError> {
    let section = section.unwrap_or_default();
    let url = env.var("KMS_STORE_URL").or(section.url);
    let backend = match env.var("KMS_STORE_BACKEND").as_deref() {
        Some("sled") => Backend::Sled,
        Some("redb") => Backend::Redb,
        Some("postgres") => Backend::Postgres,
        Some(other) => {
            return Err(invalid(
                "KMS_STORE_BACKEND",
                format!("{other:?} is not sled, redb or postgres"),
            ));
        }
        None if url.is_some() && env.var("KMS_STORE_URL").is_some() => Backend::Postgres,
        None => section
            .backend
            .unwrap_or_else(|| Backend::embedded_default(data_dir)),
    };
    if backend != Backend::Postgres {
        let path = env
            .var("KMS_STORE_PATH")
            .map(PathBuf::from)
            .or(section.path);
        let cache_mib = parsed_var(env, "KMS_STORE_CACHE_MIB", "a number of MiB")?
            .or(section.cache_mib)
            .unwrap_or(crate::store::DEFAULT_CACHE_BYTES >> 20);
        if cache_mib == 0 {
            return Err(invalid(
                "store.cache_mib (KMS_STORE_CACHE_MIB)",
                "must be at least 1",
            ));
        }
        let cache_bytes = cache_mib << 20;
        return Ok(if backend == Backend::Redb {
            StoreConfig::Redb {
                path: path.unwrap_or_else(|| data_dir.join("kms.redb")),
                cache_bytes,
            }
        } else {
            StoreConfig::Sled {
                path: path.unwrap_or_else(|| data_dir.join("db")),
                cache_bytes,
            }
        });
    }
    let url = url.ok_or_else(|| {
        invalid(
            "store.url (KMS_STORE_URL)",
            "required with backend = \"postgres\"",
        )
    })?;
    let mut config = PostgresConfig::new(url);
    // Checked here so a typo is a configuration error, not a start-up fault.
    config.parsed().map_err(|_| {
        invalid(
            "store.url (KMS_STORE_URL)",
            "is neither a postgres:// URL nor a key=value connection string",
        )
    })?;
    let password_file = env
        .var("KMS_STORE_PASSWORD_FILE")
        .map(PathBuf::from)
        .or(section.password_file);
    config.password = match (env.var(STORE_PASSWORD_ENV), password_file) {
        (Some(password), _) => Some(SecretBytes::new(password.into_bytes())),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                invalid(
                    "store.password_file (KMS_STORE_PASSWORD_FILE)",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            Some(SecretBytes::new(
                text.trim_end_matches(['\r', '\n']).as_bytes().to_vec(),
            ))
        }
        (None, None) => None,
    };
    config.ca_file = env
        .var("KMS_STORE_CA_FILE")
        .map(PathBuf::from)
        .or(section.ca_file);
    config.pool_size = parsed_var(env, "KMS_STORE_POOL_SIZE", "a number")?
        .or(section.pool_size)
        .unwrap_or(DEFAULT_POOL_SIZE);
    if config.pool_size == 0 {
        return Err(invalid(
            "store.pool_size (KMS_STORE_POOL_SIZE)",
            "must be at least 1",
        ));
    }
    let ttl = parsed_var(env, "KMS_STORE_CACHE_TTL_MS", "a number of milliseconds")?
        .or(section.cache_ttl_ms)
        .unwrap_or(DEFAULT_CACHE_TTL_MS);
    if ttl > MAX_CACHE_TTL_MS {
        return Err(invalid(
            "store.cache_ttl_ms (KMS_STORE_CACHE_TTL_MS)",
            format!("must be at most {MAX_CACHE_TTL_MS}; got {ttl}"),
        ));
    }
    config.cache_ttl = Duration::from_millis(ttl);
    Ok(StoreConfig::Postgres(config))
}

/// The PostgreSQL settings for a command given a store URL: password, CA file and pool
/// from the environment as for `serve`.
pub fn postgres_for_command(url: String, env: &dyn Env) -> Result<PostgresConfig, ConfigError> {
    let section = StoreSection {
        backend: Some(Backend::Postgres),
        url: Some(url.clone()),
        ..StoreSection::default()
    };
    // The command's URL wins over KMS_STORE_URL.
    struct Except<'a>(&'a dyn Env, String);
    impl Env for Except<'_> {
        fn var(&self, name: &str) -> Option<String> {
            if name == "KMS_STORE_URL" {
                Some(self.1.clone())
            } else {
                self.0.var(name)
            }
        }
    }
    match resolve(Some(section), &Except(env, url), Path::new("."))? {
        StoreConfig::Postgres(config) => Ok(config),
        StoreConfig::Sled { .. } | StoreConfig::Redb { .. } => {
            Err(invalid("store URL", "not a PostgreSQL store"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// An earlier build's sled database stays in use; a new data directory gets redb.
    #[test]
    fn an_existing_sled_database_is_kept_as_the_embedded_store() {
        let data = tempfile::tempdir().unwrap();
        assert_eq!(Backend::embedded_default(data.path()), Backend::Redb);
        std::fs::create_dir(data.path().join("db")).unwrap();
        assert!(matches!(
            resolve(None, &env(&[]), data.path()).unwrap(),
            StoreConfig::Sled { path, .. } if path == data.path().join("db")
        ));
        // Once migrated (the file exists beside it), redb is the store.
        std::fs::write(data.path().join("kms.redb"), b"").unwrap();
        assert_eq!(Backend::embedded_default(data.path()), Backend::Redb);
        // Asked for by name, either is used.
        assert!(matches!(
            resolve(None, &env(&[("KMS_STORE_BACKEND", "sled")]), data.path()).unwrap(),
            StoreConfig::Sled { .. }
        ));
    }

    struct MapEnv(HashMap<&'static str, String>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env(pairs: &[(&'static str, &str)]) -> MapEnv {
        MapEnv(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect())
    }

    fn section(text: &str) -> Option<StoreSection> {
        Some(toml::from_str(text).unwrap())
    }

    fn postgres(config: StoreConfig) -> PostgresConfig {
        match config {
            StoreConfig::Postgres(config) => config,
            other => panic!("expected PostgreSQL, not {other:?}"),
        }
    }

    #[test]
    fn redb_by_default_and_a_store_url_means_postgres() {
        let dir = Path::new("/srv/kms");
        assert!(matches!(
            resolve(None, &env(&[]), dir).unwrap(),
            StoreConfig::Redb { path, cache_bytes } if path == dir.join("kms.redb") && cache_bytes == 64 << 20
        ));
        let config = postgres(
            resolve(
                None,
                &env(&[("KMS_STORE_URL", "host=/run/postgresql dbname=kms")]),
                dir,
            )
            .unwrap(),
        );
        assert_eq!(
            config.cache_ttl,
            Duration::from_millis(DEFAULT_CACHE_TTL_MS)
        );
        assert_eq!(config.pool_size, DEFAULT_POOL_SIZE);
        // The environment's URL wins over the file's, and its backend over the file's.
        let config = postgres(
            resolve(
                section("backend = \"sled\"\nurl = \"postgres://file/kms\""),
                &env(&[("KMS_STORE_URL", "postgres://env/kms")]),
                dir,
            )
            .unwrap(),
        );
        assert_eq!(config.url, "postgres://env/kms");
    }

    #[test]
    fn the_password_comes_from_a_file_or_the_environment_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db.password");
        std::fs::write(&file, "s3cret-from-file\n").unwrap();
        let config = postgres(
            resolve(
                section(&format!(
                    "backend = \"postgres\"\nurl = \"postgres://kms@db/kms\"\npassword_file = {:?}",
                    file
                )),
                &env(&[]),
                dir.path(),
            )
            .unwrap(),
        );
        assert_eq!(
            config.password.as_ref().unwrap().expose(),
            b"s3cret-from-file",
            "the file's trailing newline is not part of the password"
        );
        assert!(!format!("{config:?}").contains("s3cret"));
        let config = postgres(
            resolve(
                section(&format!(
                    "backend = \"postgres\"\nurl = \"postgres://kms@db/kms\"\npassword_file = {:?}",
                    file
                )),
                &env(&[(STORE_PASSWORD_ENV, "from-env")]),
                dir.path(),
            )
            .unwrap(),
        );
        assert_eq!(config.password.unwrap().expose(), b"from-env");
        // A password inside the URL stays out of Debug output too.
        let config = PostgresConfig::new("postgres://kms:in-the-url@db/kms");
        assert!(!format!("{config:?}").contains("in-the-url"));
    }

    #[test]
    fn bad_settings_name_the_setting_and_never_echo_the_url() {
        let dir = Path::new("/srv/kms");
        let error = |section_text: &str, pairs: &[(&'static str, &str)]| {
            resolve(section(section_text), &env(pairs), dir)
                .unwrap_err()
                .to_string()
        };
        let message = error("backend = \"postgres\"", &[]);
        assert!(
            message.starts_with("store.url (KMS_STORE_URL)"),
            "{message}"
        );
        let message = error("", &[("KMS_STORE_URL", "pass=word-in-garbage ===")]);
        assert!(message.starts_with("store.url"), "{message}");
        assert!(!message.contains("word-in-garbage"), "{message}");
        let message = error(
            "",
            &[
                ("KMS_STORE_URL", "dbname=kms"),
                ("KMS_STORE_CACHE_TTL_MS", "5000"),
            ],
        );
        assert!(message.starts_with("store.cache_ttl_ms"), "{message}");
        let message = error(
            "",
            &[
                ("KMS_STORE_URL", "dbname=kms"),
                ("KMS_STORE_POOL_SIZE", "0"),
            ],
        );
        assert!(message.starts_with("store.pool_size"), "{message}");
        let message = error("", &[("KMS_STORE_BACKEND", "mysql")]);
        assert!(message.starts_with("KMS_STORE_BACKEND"), "{message}");
    }
}
