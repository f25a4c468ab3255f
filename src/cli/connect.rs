//! How the client commands reach a server: a channel (TLS when the URL is https, with
//! an optional CA file), and every call carrying the bearer token.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use tonic::{Request, Status};

use crate::auth::BearerToken;

/// Environment variable holding a bearer token itself (`--token-file` takes a file).
pub const TOKEN_ENV: &str = "KMS_TOKEN";

/// A channel whose calls carry `authorization: Bearer <token>`.
pub type AuthedChannel = InterceptedService<Channel, BearerAuth>;

/// Adds the token to every call. The header value is marked sensitive, so HPACK never
/// indexes it and `Debug` output of the request hides it.
#[derive(Clone)]
pub struct BearerAuth(MetadataValue<Ascii>);

impl BearerAuth {
    pub fn new(token: &BearerToken) -> Self {
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.expose()))
            .expect("a token is ASCII");
        value.set_sensitive(true);
        Self(value)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no token: give --token-file FILE or set {TOKEN_ENV}")]
    NoToken,
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the token in {0} is not a kms token (kms_ and 64 hex digits)")]
    BadToken(String),
    #[error("{0:?} is not a server URL (http://host:port or https://host:port)")]
    Address(String),
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// The token from `token_file`, else from `KMS_TOKEN`.
pub fn read_token(token_file: Option<&Path>) -> Result<BearerToken, ConnectError> {
    let (text, source) = match token_file {
        Some(path) => (
            zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                ConnectError::TokenFile {
                    path: path.display().to_string(),
                    source,
                }
            })?),
            path.display().to_string(),
        ),
        None => (
            zeroize::Zeroizing::new(std::env::var(TOKEN_ENV).map_err(|_| ConnectError::NoToken)?),
            TOKEN_ENV.to_owned(),
        ),
    };
    BearerToken::parse(text.trim()).ok_or(ConnectError::BadToken(source))
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: String,
    /// PEM CA certificate that the server's certificate must chain to (https URLs).
    pub ca_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

/// Connects and returns the plain channel (for health) and the authenticating one.
pub async fn connect(target: &Target) -> Result<(Channel, AuthedChannel), ConnectError> {
    let token = read_token(target.token_file.as_deref())?;
    let mut endpoint = Channel::from_shared(target.addr.clone())
        .map_err(|_| ConnectError::Address(target.addr.clone()))?;
    if target.addr.starts_with("https://") || target.ca_file.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca_file) = &target.ca_file {
            let pem = std::fs::read(ca_file).map_err(|source| ConnectError::CaFile {
                path: ca_file.display().to_string(),
                source,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|source| ConnectError::Connect {
                addr: target.addr.clone(),
                source,
            })?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ConnectError::Connect {
            addr: target.addr.clone(),
            source,
        })?;
    let authed = InterceptedService::new(channel.clone(), BearerAuth::new(&token));
    Ok((channel, authed))
}
