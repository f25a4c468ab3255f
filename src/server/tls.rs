//! TLS with rustls (ring as the one crypto provider): the server's certificate chain and
//! key, and for mutual TLS the CA that client certificates must chain to. The whole
//! rustls configuration is rebuilt on SIGHUP and swapped in for new connections; a set
//! of files that does not load leaves the previous configuration in force.
//!
//! No certificate revocation lists: rustls could check them, but this service has no
//! way to fetch or refresh them yet. Revoke a client by rotating the CA, or by revoking
//! its bearer token (every call needs one, TLS or not).

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider the whole process uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider, once; later calls are no-ops.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |reason: String| TlsError::Read {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Builds the rustls configuration from the files named in `config`.
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates("the certificate chain", &config.cert_file)?;
    // The error text of a key file never includes its contents.
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|e| TlsError::Read {
        what: "the private key",
        path: config.key_file.display().to_string(),
        reason: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("the client CA", ca_file)? {
                roots
                    .add(ca)
                    .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// The configuration new connections are accepted with; replaced on reload.
pub struct ReloadableTls {
    files: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadableTls {
    pub fn load(files: TlsConfig) -> Result<Self, TlsError> {
        let current = RwLock::new(server_config(&files)?);
        Ok(Self { files, current })
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Re-reads the files; on error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let next = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    pub fn mutual(&self) -> bool {
        self.files.client_ca_file.is_some()
    }
}
