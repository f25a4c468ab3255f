//! What faces callers: the tokens file, TLS, connection limits and the audit trail's
//! settings, from the `[auth]`, `[tls]`, `[server]` and `[audit]` sections and their
//! environment overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Env, parsed_var};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerSection {
    pub(super) allow_plaintext: Option<bool>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) idle_timeout_secs: Option<u64>,
    pub(super) handshake_timeout_secs: Option<u64>,
    pub(super) max_request_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsSection {
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthSection {
    pub(super) tokens_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditSection {
    pub(super) sync_reads: Option<bool>,
    pub(super) max_records: Option<u64>,
    pub(super) max_age_days: Option<u64>,
}

/// TLS files; re-read on SIGHUP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: every client must present a certificate signed by this CA (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Limits that keep hostile or broken clients from exhausting the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's accept queue.
    /// Clamped at start to the file-descriptor limit less [`FD_HEADROOM`].
    pub max_connections: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection.
    pub max_concurrent_streams: u32,
    /// A connection that sends no byte for this long is closed (the server's HTTP/2
    /// pings, answered by any live client, count as traffic).
    pub idle_timeout: Duration,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Largest request message accepted (the largest valid request is about 37 KiB).
    pub max_request_bytes: usize,
}

/// File descriptors kept free for the token, the store and the log.
pub const FD_HEADROOM: usize = 256;
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;
pub const DEFAULT_AUDIT_MAX_RECORDS: u64 = 5_000_000;
pub const DEFAULT_AUDIT_MAX_AGE_DAYS: u64 = 90;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// Make every call's record durable before answering, reads included.
    pub sync_reads: bool,
    pub retention: crate::audit::retention::Retention,
}

/// The file's sections this module resolves.
pub(super) struct FrontendSections {
    pub(super) server: Option<ServerSection>,
    pub(super) tls: Option<TlsSection>,
    pub(super) auth: Option<AuthSection>,
    pub(super) audit: Option<AuditSection>,
}

pub(super) struct Frontend {
    pub(super) tokens_file: PathBuf,
    pub(super) tls: Option<TlsConfig>,
    pub(super) allow_plaintext: bool,
    pub(super) limits: Limits,
    pub(super) audit: AuditConfig,
}

pub(super) fn resolve(
    sections: FrontendSections,
    env: &dyn Env,
    listen: SocketAddr,
    data_dir: &Path,
) -> Result<Frontend, ConfigError> {
    let auth = sections.auth.unwrap_or_default();
    let tokens_file = env
        .var("KMS_TOKENS_FILE")
        .map(PathBuf::from)
        .or(auth.tokens_file)
        .unwrap_or_else(|| data_dir.join("tokens.toml"));

    let tls_section = sections.tls.unwrap_or_default();
    let cert_file = env
        .var("KMS_TLS_CERT_FILE")
        .map(PathBuf::from)
        .or(tls_section.cert_file);
    let key_file = env
        .var("KMS_TLS_KEY_FILE")
        .map(PathBuf::from)
        .or(tls_section.key_file);
    let client_ca_file = env
        .var("KMS_TLS_CLIENT_CA_FILE")
        .map(PathBuf::from)
        .or(tls_section.client_ca_file);
    let tls = match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Some(TlsConfig {
            cert_file,
            key_file,
            client_ca_file,
        }),
        (None, None) if client_ca_file.is_none() => None,
        (None, None) => {
            return Err(ConfigError::Invalid {
                name: "tls.client_ca_file (KMS_TLS_CLIENT_CA_FILE)".into(),
                reason: "needs tls.cert_file and tls.key_file too".into(),
            });
        }
        _ => {
            return Err(ConfigError::Invalid {
                name: "tls.cert_file / tls.key_file (KMS_TLS_CERT_FILE / KMS_TLS_KEY_FILE)".into(),
                reason: "give both or neither".into(),
            });
        }
    };

    let server = sections.server.unwrap_or_default();
    let allow_plaintext = parsed_var(env, "KMS_ALLOW_PLAINTEXT", "true or false")?
        .or(server.allow_plaintext)
        .unwrap_or(false);
    if tls.is_none() && !allow_plaintext && !listen.ip().is_loopback() {
        return Err(ConfigError::Invalid {
            name: "listen (KMS_LISTEN)".into(),
            reason: format!(
                "{listen} is not a loopback address and TLS is not configured: set \
                 tls.cert_file and tls.key_file (KMS_TLS_CERT_FILE, KMS_TLS_KEY_FILE), or \
                 server.allow_plaintext = true (KMS_ALLOW_PLAINTEXT=true) to serve \
                 bearer tokens in clear"
            ),
        });
    }
    let limits = Limits {
        max_connections: parsed_var(env, "KMS_MAX_CONNECTIONS", "a number")?
            .or(server.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
        max_concurrent_streams: parsed_var(env, "KMS_MAX_CONCURRENT_STREAMS", "a number")?
            .or(server.max_concurrent_streams)
            .unwrap_or(DEFAULT_MAX_CONCURRENT_STREAMS),
        idle_timeout: Duration::from_secs(
            parsed_var(env, "KMS_IDLE_TIMEOUT_SECS", "a number of seconds")?
                .or(server.idle_timeout_secs)
                .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS),
        ),
        handshake_timeout: Duration::from_secs(
            parsed_var(env, "KMS_HANDSHAKE_TIMEOUT_SECS", "a number of seconds")?
                .or(server.handshake_timeout_secs)
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT_SECS),
        ),
        max_request_bytes: parsed_var(env, "KMS_MAX_REQUEST_BYTES", "a number of bytes")?
            .or(server.max_request_bytes)
            .unwrap_or(DEFAULT_MAX_REQUEST_BYTES),
    };
    for (name, ok, range) in [
        (
            "server.max_connections",
            (1..=1_000_000).contains(&limits.max_connections),
            "1..1000000",
        ),
        (
            "server.max_concurrent_streams",
            (1..=10_000).contains(&limits.max_concurrent_streams),
            "1..10000",
        ),
        (
            "server.idle_timeout_secs",
            (1..=86_400).contains(&limits.idle_timeout.as_secs()),
            "1..86400",
        ),
        (
            "server.handshake_timeout_secs",
            (1..=600).contains(&limits.handshake_timeout.as_secs()),
            "1..600",
        ),
        (
            "server.max_request_bytes",
            (4096..=16 << 20).contains(&limits.max_request_bytes),
            "4096..16777216",
        ),
    ] {
        if !ok {
            return Err(ConfigError::Invalid {
                name: name.into(),
                reason: format!("must be {range}"),
            });
        }
    }

    let audit_section = sections.audit.unwrap_or_default();
    let audit = AuditConfig {
        sync_reads: parsed_var(env, "KMS_AUDIT_SYNC_READS", "true or false")?
            .or(audit_section.sync_reads)
            .unwrap_or(false),
        retention: crate::audit::retention::Retention {
            max_records: parsed_var(env, "KMS_AUDIT_MAX_RECORDS", "a number")?
                .or(audit_section.max_records)
                .unwrap_or(DEFAULT_AUDIT_MAX_RECORDS),
            max_age: Duration::from_secs(
                86_400
                    * parsed_var(env, "KMS_AUDIT_MAX_AGE_DAYS", "a number of days")?
                        .or(audit_section.max_age_days)
                        .unwrap_or(DEFAULT_AUDIT_MAX_AGE_DAYS),
            ),
        },
    };
    if audit.retention.max_records == 0 || audit.retention.max_age.is_zero() {
        return Err(ConfigError::Invalid {
            name: "audit.max_records / audit.max_age_days".into(),
            reason: "must be at least 1".into(),
        });
    }

    Ok(Frontend {
        tokens_file,
        tls,
        allow_plaintext,
        limits,
        audit,
    })
}
