//! Configuration: one optional TOML file, then environment overrides.
//!
//! With no file (or a file without an `[hsm]` section) the service runs on the embedded
//! default: a SoftHSM token, its PINs and the redb database under the data directory.
//! The PIN is read from a file or an environment variable, never from the command line.
//! What faces callers (tokens file, TLS, connection limits, audit) is in [`frontend`].

mod frontend;
mod store;

pub use store::{Backend as StoreBackend, STORE_PASSWORD_ENV, postgres_for_command};

pub use frontend::{
    AuditConfig, DEFAULT_AUDIT_MAX_AGE_DAYS, DEFAULT_AUDIT_MAX_RECORDS,
    DEFAULT_HANDSHAKE_TIMEOUT_SECS, DEFAULT_IDLE_TIMEOUT_SECS, DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES, FD_HEADROOM, Limits, TlsConfig,
};
use frontend::{AuditSection, AuthSection, Frontend, FrontendSections, ServerSection, TlsSection};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::hsm::provision::{
    DEFAULT_KEK_LABEL, DEFAULT_KEY_CACHE_SIZE, DEFAULT_SOFTHSM_MODULE, EmbeddedSoftHsm,
    default_pool_size,
};
use crate::hsm::{CallLimits, HsmConfig, PinSource};

pub const DEFAULT_DATA_DIR: &str = "./kms-data";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Environment variable holding the PIN itself, when used.
pub const PIN_ENV: &str = "KMS_HSM_PIN";
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{name}: {reason}")]
    Invalid { name: String, reason: String },
}

/// The file's shape. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    shutdown_grace_secs: Option<u64>,
    hsm: Option<HsmSection>,
    log: Option<LogSection>,
    import: Option<ImportSection>,
    server: Option<ServerSection>,
    tls: Option<TlsSection>,
    auth: Option<AuthSection>,
    audit: Option<AuditSection>,
    store: Option<store::StoreSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportSection {
    rsa_pool_size: Option<usize>,
    min_token_expiration_secs: Option<u32>,
    parameters_lifetime_secs: Option<u64>,
}

/// Key import settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportConfig {
    /// Pre-generated RSA key pairs kept per size (2048, 3072, 4096); 0 turns the pool
    /// off, so every pair is generated on the request path.
    pub rsa_pool_size: usize,
    /// Lower bound of CreateImportToken's expiration. 300 s as in the API contract; a
    /// test deployment may lower it to exercise expiry quickly.
    pub min_token_expiration_secs: u32,
    /// How long GetParametersForImport's token and public key stay valid (24 h).
    pub parameters_lifetime: Duration,
}

pub const DEFAULT_RSA_POOL_SIZE: usize = 2;
pub const DEFAULT_MIN_TOKEN_EXPIRATION_SECS: u32 = 300;
pub const DEFAULT_PARAMETERS_LIFETIME_SECS: u64 = 24 * 60 * 60;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HsmSection {
    module: Option<PathBuf>,
    token_label: Option<String>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    kek_label: Option<String>,
    pool_size: Option<usize>,
    key_cache_size: Option<usize>,
    oaep_fallback: Option<bool>,
    queue_size: Option<usize>,
    queue_wait_ms: Option<u64>,
    call_timeout_ms: Option<u64>,
}

/// `[hsm] queue_size`, `queue_wait_ms`, `call_timeout_ms` (and their KMS_HSM_*
/// variables): the bounds on a call's time in and before the HSM.
fn call_limits(section: &HsmSection, env: &dyn Env) -> Result<CallLimits, ConfigError> {
    let mut limits = CallLimits::default();
    let queue_size = parsed_var(env, "KMS_HSM_QUEUE_SIZE", "a number")?.or(section.queue_size);
    if let Some(size) = queue_size {
        if !(1..=1_000_000).contains(&size) {
            return Err(ConfigError::Invalid {
                name: "hsm.queue_size".into(),
                reason: "must be 1..1000000".into(),
            });
        }
        limits.queue_size = size;
    }
    let millis =
        |var: &str, field: Option<u64>, name: &str| -> Result<Option<Duration>, ConfigError> {
            match parsed_var::<u64>(env, var, "a number of milliseconds")?.or(field) {
                None => Ok(None),
                Some(0) => Err(ConfigError::Invalid {
                    name: name.into(),
                    reason: "must be at least 1 ms".into(),
                }),
                Some(ms) => Ok(Some(Duration::from_millis(ms))),
            }
        };
    if let Some(wait) = millis(
        "KMS_HSM_QUEUE_WAIT_MS",
        section.queue_wait_ms,
        "hsm.queue_wait_ms",
    )? {
        limits.queue_wait = wait;
    }
    if let Some(timeout) = millis(
        "KMS_HSM_CALL_TIMEOUT_MS",
        section.call_timeout_ms,
        "hsm.call_timeout_ms",
    )? {
        limits.call_timeout = timeout;
    }
    Ok(limits)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    format: Option<LogFormat>,
    filter: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub store: crate::store::StoreConfig,
    pub hsm: HsmConfig,
    /// Set when the embedded SoftHSM token is used.
    pub embedded: Option<EmbeddedSoftHsm>,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// How long in-flight calls may take to finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    pub import: ImportConfig,
    /// Where principals, token digests and roles are read from.
    pub tokens_file: PathBuf,
    pub tls: Option<TlsConfig>,
    /// Serve without TLS on an address that is not loopback.
    pub allow_plaintext: bool,
    pub limits: Limits,
    pub audit: AuditConfig,
}

/// Reads environment variables; a seam so tests need not touch the process environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Config {
    pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
        let parsed = match file {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source: Box::new(source),
                })?
            }
        };
        Self::resolve(parsed, env)
    }

    fn resolve(file: FileConfig, env: &dyn Env) -> Result<Config, ConfigError> {
        let data_dir = env
            .var("KMS_DATA_DIR")
            .map(PathBuf::from)
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let listen_text = env
            .var("KMS_LISTEN")
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError::Invalid {
            name: "listen (KMS_LISTEN)".into(),
            reason: format!("{listen_text:?} is not an address:port"),
        })?;

        let section = file.hsm;
        let embedded = section.is_none().then(|| EmbeddedSoftHsm::under(&data_dir));
        let section = section.unwrap_or_default();
        let limits = call_limits(&section, env)?;
        let module = env
            .var("KMS_HSM_MODULE")
            .map(PathBuf::from)
            .or(section.module)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOFTHSM_MODULE));
        let mut hsm = match &embedded {
            Some(embedded) => embedded.hsm_config(module),
            None => HsmConfig {
                module,
                token_label: section
                    .token_label
                    .clone()
                    .ok_or_else(|| ConfigError::Invalid {
                        name: "hsm.token_label".into(),
                        reason: "required when an [hsm] section is given".into(),
                    })?,
                pin: match (&section.pin_file, &section.pin_env) {
                    (Some(file), None) => PinSource::File(file.clone()),
                    (None, Some(var)) => PinSource::Env(var.clone()),
                    (None, None) => PinSource::Env(PIN_ENV.into()),
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Invalid {
                            name: "hsm.pin_file / hsm.pin_env".into(),
                            reason: "give one, not both".into(),
                        });
                    }
                },
                kek_label: section
                    .kek_label
                    .clone()
                    .unwrap_or_else(|| DEFAULT_KEK_LABEL.into()),
                pool_size: section.pool_size.unwrap_or_else(default_pool_size),
                key_cache_size: section.key_cache_size.unwrap_or(DEFAULT_KEY_CACHE_SIZE),
                oaep_fallback: true,
                limits: Default::default(),
            },
        };
        hsm.limits = limits;
        if let Some(fallback) = section.oaep_fallback {
            hsm.oaep_fallback = fallback;
        }
        if let Some(fallback) = parsed_var::<bool>(env, "KMS_HSM_OAEP_FALLBACK", "true or false")? {
            hsm.oaep_fallback = fallback;
        }
        if let Some(label) = env.var("KMS_HSM_TOKEN_LABEL") {
            hsm.token_label = label;
        }
        if let Some(label) = env.var("KMS_HSM_KEK_LABEL") {
            hsm.kek_label = label;
        }
        if let Some(file) = env.var("KMS_HSM_PIN_FILE") {
            hsm.pin = PinSource::File(PathBuf::from(file));
        } else if env.var(PIN_ENV).is_some() {
            hsm.pin = PinSource::Env(PIN_ENV.into());
        }
        if let Some(size) = parsed_var(env, "KMS_HSM_POOL_SIZE", "a number")? {
            hsm.pool_size = size;
        }
        if let Some(size) = parsed_var(env, "KMS_HSM_KEY_CACHE_SIZE", "a number")? {
            hsm.key_cache_size = size;
        }
        if hsm.key_cache_size == 0 {
            return Err(ConfigError::Invalid {
                name: "hsm.key_cache_size".into(),
                reason: "must be at least 1".into(),
            });
        }
        if hsm.pool_size == 0 || hsm.pool_size > 1024 {
            return Err(ConfigError::Invalid {
                name: "hsm.pool_size".into(),
                reason: "must be 1..1024".into(),
            });
        }

        let log = file.log.unwrap_or_default();
        let log_format = match env.var("KMS_LOG_FORMAT").as_deref() {
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "KMS_LOG_FORMAT".into(),
                    reason: format!("{other:?}: expected text or json"),
                });
            }
            None => log.format.unwrap_or_default(),
        };
        let log_filter = env
            .var("KMS_LOG")
            .or(log.filter)
            .unwrap_or_else(|| "info".into());

        let shutdown_grace_secs =
            parsed_var(env, "KMS_SHUTDOWN_GRACE_SECS", "a number of seconds")?
                .or(file.shutdown_grace_secs)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS);

        let section = file.import.unwrap_or_default();
        let import = ImportConfig {
            rsa_pool_size: parsed_var(env, "KMS_IMPORT_RSA_POOL_SIZE", "a number")?
                .or(section.rsa_pool_size)
                .unwrap_or(DEFAULT_RSA_POOL_SIZE),
            min_token_expiration_secs: parsed_var(
                env,
                "KMS_IMPORT_MIN_TOKEN_EXPIRATION_SECS",
                "a number of seconds",
            )?
            .or(section.min_token_expiration_secs)
            .unwrap_or(DEFAULT_MIN_TOKEN_EXPIRATION_SECS),
            parameters_lifetime: Duration::from_secs(
                parsed_var(
                    env,
                    "KMS_IMPORT_PARAMETERS_LIFETIME_SECS",
                    "a number of seconds",
                )?
                .or(section.parameters_lifetime_secs)
                .unwrap_or(DEFAULT_PARAMETERS_LIFETIME_SECS),
            ),
        };
        if import.rsa_pool_size > 64 {
            return Err(ConfigError::Invalid {
                name: "import.rsa_pool_size".into(),
                reason: "must be 0..64".into(),
            });
        }
        if !(1..=DEFAULT_MIN_TOKEN_EXPIRATION_SECS).contains(&import.min_token_expiration_secs) {
            return Err(ConfigError::Invalid {
                name: "import.min_token_expiration_secs".into(),
                reason: format!("must be 1..{DEFAULT_MIN_TOKEN_EXPIRATION_SECS}"),
            });
        }
        if import.parameters_lifetime.is_zero()
            || import.parameters_lifetime > Duration::from_secs(DEFAULT_PARAMETERS_LIFETIME_SECS)
        {
            return Err(ConfigError::Invalid {
                name: "import.parameters_lifetime_secs".into(),
                reason: format!("must be 1..{DEFAULT_PARAMETERS_LIFETIME_SECS}"),
            });
        }

        let Frontend {
            tokens_file,
            tls,
            allow_plaintext,
            limits,
            audit,
        } = frontend::resolve(
            FrontendSections {
                server: file.server,
                tls: file.tls,
                auth: file.auth,
                audit: file.audit,
            },
            env,
            listen,
            &data_dir,
        )?;

        Ok(Config {
            tokens_file,
            tls,
            allow_plaintext,
            limits,
            audit,
            import,
            shutdown_grace: Duration::from_secs(shutdown_grace_secs),
            listen,
            store: store::resolve(file.store, env, &data_dir)?,
            data_dir,
            hsm,
            embedded,
            log_format,
            log_filter,
        })
    }
}

/// An environment variable parsed as `T`, naming the variable and what it should be
/// (`expected`, e.g. "a number") when it does not parse.
pub(crate) fn parsed_var<T: std::str::FromStr>(
    env: &dyn Env,
    name: &str,
    expected: &str,
) -> Result<Option<T>, ConfigError> {
    env.var(name)
        .map(|text| {
            text.parse().map_err(|_| ConfigError::Invalid {
                name: name.into(),
                reason: format!("{text:?} is not {expected}"),
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct MapEnv(HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    #[test]
    fn no_file_means_embedded_default_under_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let data: &'static str = dir.path().to_str().unwrap().to_owned().leak();
        let env = MapEnv(HashMap::from([("KMS_DATA_DIR", data)]));
        let config = Config::resolve(FileConfig::default(), &env).unwrap();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert!(matches!(
            &config.store,
            crate::store::StoreConfig::Redb { path, .. } if path == &dir.path().join("kms.redb")
        ));
        let embedded = config.embedded.expect("embedded");
        assert!(embedded.softhsm_conf.starts_with(data));
    }

    #[test]
    fn environment_overrides_the_file() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:1"
            data_dir = "/srv/kms"
            [hsm]
            module = "/m.so"
            token_label = "prod"
            pin_file = "/etc/kms/pin"
            "#,
        )
        .unwrap();
        let env = MapEnv(HashMap::from([
            ("KMS_LISTEN", "127.0.0.1:0"),
            ("KMS_HSM_TOKEN_LABEL", "other"),
        ]));
        let config = Config::resolve(file, &env).unwrap();
        assert_eq!(config.listen.port(), 0);
        assert_eq!(config.hsm.token_label, "other");
        assert!(config.embedded.is_none());
        assert!(matches!(config.hsm.pin, PinSource::File(_)));
    }

    #[test]
    fn malformed_environment_values_name_the_variable() {
        for (name, value, expected) in [
            ("KMS_HSM_POOL_SIZE", "eight", "is not a number"),
            (
                "KMS_SHUTDOWN_GRACE_SECS",
                "soon",
                "is not a number of seconds",
            ),
            ("KMS_HSM_OAEP_FALLBACK", "maybe", "is not true or false"),
        ] {
            let env = MapEnv(HashMap::from([(name, value)]));
            let error = Config::resolve(FileConfig::default(), &env).unwrap_err();
            let text = error.to_string();
            assert!(text.starts_with(name) && text.contains(expected), "{text}");
        }
    }

    #[test]
    fn plaintext_off_loopback_needs_tls_or_an_explicit_allowance() {
        let env = MapEnv(HashMap::from([("KMS_LISTEN", "0.0.0.0:50051")]));
        let error = Config::resolve(FileConfig::default(), &env).unwrap_err();
        assert!(error.to_string().contains("KMS_ALLOW_PLAINTEXT"), "{error}");
        let env = MapEnv(HashMap::from([
            ("KMS_LISTEN", "0.0.0.0:50051"),
            ("KMS_ALLOW_PLAINTEXT", "true"),
        ]));
        assert!(
            Config::resolve(FileConfig::default(), &env)
                .unwrap()
                .tls
                .is_none()
        );
        let env = MapEnv(HashMap::from([
            ("KMS_LISTEN", "0.0.0.0:50051"),
            ("KMS_TLS_CERT_FILE", "/c.pem"),
            ("KMS_TLS_KEY_FILE", "/k.pem"),
        ]));
        let config = Config::resolve(FileConfig::default(), &env).unwrap();
        assert_eq!(config.tls.unwrap().key_file, PathBuf::from("/k.pem"));
    }

    #[test]
    fn half_a_tls_setting_and_limits_out_of_range_are_refused() {
        for (name, value, expected) in [
            ("KMS_TLS_CERT_FILE", "/c.pem", "give both or neither"),
            ("KMS_TLS_CLIENT_CA_FILE", "/ca.pem", "needs tls.cert_file"),
            ("KMS_MAX_REQUEST_BYTES", "100", "server.max_request_bytes"),
            (
                "KMS_MAX_CONCURRENT_STREAMS",
                "0",
                "server.max_concurrent_streams",
            ),
            ("KMS_AUDIT_MAX_RECORDS", "0", "audit.max_records"),
        ] {
            let env = MapEnv(HashMap::from([(name, value)]));
            let error = Config::resolve(FileConfig::default(), &env).unwrap_err();
            assert!(error.to_string().contains(expected), "{name}: {error}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
    }
}
