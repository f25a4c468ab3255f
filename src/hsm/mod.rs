//! Everything PKCS#11. Nothing outside this module imports `cryptoki`.
//!
//! One `Hsm` per process: one loaded module, a connection to the token that repairs
//! itself ([`link`]: one logged-in anchor session, since login state belongs to the
//! application and every pooled session is logged in through it; sessions reopened,
//! login redone, the module re-initialised when the token went away), and a bounded
//! pool of sessions ([`pool`]). No PKCS#11 call runs on the async executor.
//!
//! Bounds on a call: it waits for a session in a queue of `queue_size` jobs, for at
//! most `queue_wait` (then RESOURCE_EXHAUSTED); a call whose caller has gone (deadline
//! passed, cancelled) is not started; a started call is awaited for at most
//! `call_timeout` (then UNAVAILABLE). A worker stuck inside the module is not replaced:
//! a thread inside a C call cannot be stopped safely and the session it holds is in
//! use. It is bounded instead: the other workers keep serving, and it rejoins the pool
//! when the call returns.
//!
//! Key objects the service creates:
//! - the master KEK: a token object, AES-256, `CKA_SENSITIVE=TRUE`,
//!   `CKA_EXTRACTABLE=FALSE`, `CKA_WRAP`/`CKA_UNWRAP` only, found by label;
//! - root keys: AES session objects, `CKA_SENSITIVE=TRUE`, generated or created, wrapped
//!   under the KEK (RFC 5649 where the token has it, else RFC 3394) and destroyed at once;
//!   only the wrapped blob leaves the HSM;
//! - standard keys: generic-secret session objects, `CKA_SENSITIVE=FALSE` because their
//!   payload is handed back on GetKey, stored KEK-wrapped like root keys.
//!
//! Opening the token is in [`token`]; AES-GCM under cached root-key versions (WrapKey,
//! UnwrapKey) in [`envelope`]; key pairs and OAEP import in [`rsa`].

mod cache;
mod check;
mod envelope;
mod error;
mod link;
pub mod oaep;
mod pool;
pub mod provision;
mod random;
mod rsa;
mod token;
mod wrap;

use token::probe_wrap_mechanisms;

use std::os::raw::c_ulong;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};

use cache::KeyCache;
pub use cache::VersionId;
pub use check::KekCheck;
pub use envelope::{GCM_IV_LEN, GCM_TAG_LEN, KeyVersionRef, Sealed};
pub use error::HsmError;
use link::{Connection, Repair};
use oaep::OaepHash;
use pool::SessionPool;
use random::RandomReserve;
pub use rsa::{
    ImportRefusal, ImportedMaterial, MaterialImport, NonceProof, OaepSupport, RsaKeyPair,
    encrypt_oaep,
};
pub use wrap::{WrapFormat, WrappedKey};
use wrap::{WrapMechanism, WrapMechanisms, create_with_value, kwp_type, wrap_and_destroy};

use crate::secret::SecretBytes;

/// How the token is reached.
#[derive(Clone, Debug)]
pub struct HsmConfig {
    pub module: PathBuf,
    pub token_label: String,
    pub pin: PinSource,
    pub kek_label: String,
    pub pool_size: usize,
    /// How many unwrapped root-key versions to keep in the HSM.
    pub key_cache_size: usize,
    /// Whether an OAEP hash the token cannot decrypt natively is served by raw RSA in
    /// the HSM plus OpenSSL's OAEP decoder in the process.
    pub oaep_fallback: bool,
    pub limits: CallLimits,
}

/// How long and how many calls may wait for, and in, the HSM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// Calls waiting for a session at most; beyond, RESOURCE_EXHAUSTED at once.
    pub queue_size: usize,
    /// How long a call may wait for a session before RESOURCE_EXHAUSTED.
    pub queue_wait: Duration,
    /// How long a started PKCS#11 job is awaited before UNAVAILABLE.
    pub call_timeout: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            queue_size: 1024,
            queue_wait: Duration::from_secs(2),
            // RSA-4096 generation takes seconds on a loaded machine.
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the user PIN comes from. Never the command line.
#[derive(Clone, Debug)]
pub enum PinSource {
    /// The name of an environment variable holding the PIN.
    Env(String),
    /// A file holding the PIN (trailing newline ignored).
    File(PathBuf),
}

impl PinSource {
    fn read(&self) -> Result<SecretBytes, HsmError> {
        let mut raw = match self {
            PinSource::Env(var) => std::env::var(var)
                .map_err(|_| HsmError::Pin(format!("environment variable {var} is not set")))?
                .into_bytes(),
            PinSource::File(path) => std::fs::read(path)
                .map_err(|e| HsmError::Pin(format!("{}: {e}", path.display())))?,
        };
        while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            raw.pop();
        }
        if raw.is_empty() {
            return Err(HsmError::Pin("the PIN is empty".into()));
        }
        Ok(SecretBytes::new(raw))
    }
}

/// Root keys are AES keys that never leave the HSM; standard keys are generic secrets
/// whose payload is handed back to authorised callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Root,
    Standard,
}

/// Where a new key's material comes from.
#[derive(Debug)]
pub enum NewMaterial {
    /// The HSM generates this many bytes.
    Generate { bytes: usize },
    /// Caller-supplied material, put into the HSM as is.
    Import(SecretBytes),
}

/// What the token offers, probed once at start-up.
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub rfc5649_mechanism: Option<&'static str>,
    pub rfc3394: bool,
    pub aes_gcm: bool,
    pub oaep_sha1: OaepSupport,
    pub oaep_sha256: OaepSupport,
}

impl Capabilities {
    pub fn oaep(&self, hash: OaepHash) -> OaepSupport {
        match hash {
            OaepHash::Sha1 => self.oaep_sha1,
            OaepHash::Sha256 => self.oaep_sha256,
        }
    }
}

/// The process's one connection to the token.
pub struct Hsm {
    connection: Arc<Connection>,
    pool: SessionPool,
    repairer: Mutex<Option<JoinHandle<()>>>,
    limits: CallLimits,
    /// The KEK was created by this start (none was on the token).
    kek_created: bool,
    rfc5649: Option<WrapMechanism>,
    rfc3394: Option<WrapMechanism>,
    capabilities: Capabilities,
    token_label: String,
    cache: Arc<KeyCache>,
    random: Arc<RandomReserve>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm")
            .field("token_label", &self.token_label)
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Loads the module, finds the token by label, logs in, probes mechanisms and finds
    /// the master KEK, creating it only when `may_create_kek` (the store holds no keys).
    /// Blocking.
    pub fn open(config: &HsmConfig, may_create_kek: bool) -> Result<Hsm, HsmError> {
        let ctx = Pkcs11::new(&config.module).map_err(|e| HsmError::ModuleLoad {
            path: config.module.display().to_string(),
            reason: e.to_string(),
        })?;
        let cache = Arc::new(KeyCache::new(config.key_cache_size.max(1)));
        let (connection, kek_created) =
            Connection::open(ctx, config, may_create_kek, Arc::clone(&cache))?;
        let link = connection.current().expect("a link just opened");
        let ctx = &connection.ctx;

        let (rfc5649, rfc3394) = probe_wrap_mechanisms(ctx, link.slot);
        let aes_gcm = ctx
            .get_mechanism_info(link.slot, MechanismType::AES_GCM)
            .is_ok();
        let raw_rsa = rsa::raw_rsa_offered(ctx, link.slot);
        let (native_sha1, native_sha256) = link
            .with_anchor(rsa::probe_native_oaep)
            .unwrap_or((false, false));
        let oaep = |native: bool| {
            if native {
                OaepSupport::Native
            } else if config.oaep_fallback && raw_rsa {
                OaepSupport::Fallback
            } else {
                OaepSupport::Unavailable
            }
        };
        let capabilities = Capabilities {
            oaep_sha1: oaep(native_sha1),
            oaep_sha256: oaep(native_sha256),
            rfc5649_mechanism: rfc5649.map(|m| match m {
                WrapMechanism::Pad => "CKM_AES_KEY_WRAP_PAD",
                _ => "CKM_AES_KEY_WRAP_KWP",
            }),
            rfc3394: rfc3394.is_some(),
            aes_gcm,
        };
        if rfc5649.is_none() && rfc3394.is_none() {
            connection.shutdown();
            return Err(HsmError::MechanismMissing {
                what: "AES key wrap (CKM_AES_KEY_WRAP_PAD, _KWP or CKM_AES_KEY_WRAP)",
            });
        }
        drop(link);

        let connection = Arc::new(connection);
        let pool = SessionPool::start(
            Arc::clone(&connection),
            config.pool_size.max(1),
            config.limits.queue_size.max(1),
        )?;
        let repairing = Arc::clone(&connection);
        let repairer = std::thread::Builder::new()
            .name("hsm-repair".into())
            .spawn(move || repairing.repair_loop())
            .map_err(|e| HsmError::Worker(format!("cannot start the HSM repair thread: {e}")))?;
        Ok(Hsm {
            connection,
            pool,
            repairer: Mutex::new(Some(repairer)),
            limits: config.limits,
            kek_created,
            rfc5649,
            rfc3394,
            capabilities,
            token_label: config.token_label.clone(),
            cache,
            random: Arc::default(),
        })
    }

    /// True when this start created the master KEK: nothing wrapped under an earlier KEK
    /// can be used any more.
    pub fn kek_created(&self) -> bool {
        self.kek_created
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// Runs one PKCS#11 job on a pooled session's worker thread, off the async executor.
    /// The job gets the session and the master KEK's current handle.
    async fn run<T, F>(&self, job: F) -> Result<T, HsmError>
    where
        T: Send + 'static,
        F: FnOnce(&Session, ObjectHandle) -> Result<T, HsmError> + Send + 'static,
    {
        let (reply, result) = tokio::sync::oneshot::channel();
        let connection = Arc::clone(&self.connection);
        let queued = Instant::now();
        let queue_wait = self.limits.queue_wait;
        self.pool.submit(Box::new(move |worker| {
            // The caller went away while the job waited (its deadline passed or the
            // call was cancelled): the HSM does no work nobody will receive.
            if reply.is_closed() {
                tracing::debug!("HSM job skipped: its caller is gone");
                return;
            }
            if queued.elapsed() > queue_wait {
                let _ = reply.send(Err(HsmError::Overloaded));
                return;
            }
            let cache = &connection.cache;
            let result = connection.with_link(|link| {
                let session = worker.session(&connection.ctx, link)?;
                cache.graveyard.destroy_all(session, link.generation);
                let result = job(session, link.kek());
                if let Err(e) = &result
                    && e.breaks_session()
                {
                    worker.discard();
                    // Objects created in the dead session died with it; forget them all
                    // rather than risk using a handle the token may hand out again.
                    cache.clear();
                }
                result
            });
            if let Err(e) = &result {
                connection.request(e.repair(), e);
            }
            // The caller may have gone away (cancelled RPC); the result is dropped.
            let _ = reply.send(result);
        }))?;
        match tokio::time::timeout(self.limits.call_timeout, result).await {
            Ok(answer) => {
                answer.map_err(|_| HsmError::Worker("the HSM worker dropped the job".into()))?
            }
            Err(_) => {
                let hung = HsmError::Hung {
                    seconds: self.limits.call_timeout.as_secs(),
                };
                self.connection.request(Repair::Check, &hung);
                Err(hung)
            }
        }
    }

    /// The mechanism used for new blobs: RFC 5649 when offered, since it wraps any length.
    fn preferred_wrap(&self) -> WrapMechanism {
        self.wrap_mechanisms().preferred()
    }

    fn wrap_mechanisms(&self) -> WrapMechanisms {
        WrapMechanisms {
            rfc5649: self.rfc5649,
            rfc3394: self.rfc3394,
        }
    }

    fn mechanism_for(&self, format: WrapFormat) -> Result<WrapMechanism, HsmError> {
        self.wrap_mechanisms().for_format(format)
    }

    /// Creates a key in the HSM (generated there, or from caller-supplied material) and
    /// returns it wrapped under the KEK; the HSM object is destroyed before returning.
    pub async fn create_wrapped_key(
        &self,
        kind: KeyKind,
        material: NewMaterial,
    ) -> Result<WrappedKey, HsmError> {
        let wrap = self.preferred_wrap();
        self.run(move |session, kek| {
            let (mut template, key_type, generator) = match kind {
                KeyKind::Root => (root_key_template(), KeyType::AES, Mechanism::AesKeyGen),
                KeyKind::Standard => (
                    standard_key_template(),
                    KeyType::GENERIC_SECRET,
                    Mechanism::GenericSecretKeyGen,
                ),
            };
            let key = match material {
                NewMaterial::Generate { bytes } => {
                    template.push(Attribute::ValueLen((bytes as c_ulong).into()));
                    session.generate_key(&generator, &template)?
                }
                NewMaterial::Import(material) => {
                    template.push(Attribute::KeyType(key_type));
                    create_with_value(session, template, &material)?
                }
            };
            wrap_and_destroy(session, wrap, kek, key)
        })
        .await
    }

    /// Generates an RSA key pair in the HSM; returns the public key and the private key
    /// wrapped under the KEK. Takes seconds for large keys (RSA-4096).
    pub async fn generate_rsa_pair(&self, bits: u32) -> Result<RsaKeyPair, HsmError> {
        let wrap = self.rfc5649.ok_or(HsmError::MechanismMissing {
            what: "RFC 5649 AES key wrap (needed to store RSA private keys)",
        })?;
        self.run(move |session, kek| rsa::generate_pair(session, bits, kek, wrap))
            .await
    }

    /// Imports RSA-OAEP-wrapped AES material with a stored private key: into the HSM,
    /// nonce proof checked there, returned KEK-wrapped with its check value.
    pub async fn import_material(
        &self,
        request: MaterialImport,
    ) -> Result<ImportedMaterial, HsmError> {
        let wraps = self.wrap_mechanisms();
        let private_wrap = self.mechanism_for(request.private_key.format)?;
        let support = self.capabilities.oaep(request.hash);
        self.run(move |session, kek| {
            rsa::import_material(session, kek, wraps, private_wrap, support, request)
        })
        .await
    }

    /// `len` bytes from the HSM's random number generator.
    pub async fn random_bytes(&self, len: usize) -> Result<Vec<u8>, HsmError> {
        let random = Arc::clone(&self.random);
        self.run(move |session, _| {
            let mut bytes = vec![0; len];
            random.fill(session, &mut bytes)?;
            Ok(bytes)
        })
        .await
    }

    /// Unwraps a standard key's blob and reads its payload.
    pub async fn unwrap_standard_key(&self, wrapped: WrappedKey) -> Result<SecretBytes, HsmError> {
        let wrap = self.mechanism_for(wrapped.format)?;
        self.run(move |session, kek| {
            let mut template = standard_key_template();
            template.push(Attribute::KeyType(KeyType::GENERIC_SECRET));
            let key = session.unwrap_key(&wrap.mechanism(), kek, &wrapped.blob, &template)?;
            let read = session.get_attributes(key, &[AttributeType::Value]);
            let destroyed = session.destroy_object(key);
            let mut attributes = read?;
            destroyed?;
            match attributes.pop() {
                Some(Attribute::Value(value)) => Ok(SecretBytes::new(value)),
                _ => Err(HsmError::Binding("CKA_VALUE missing".into())),
            }
        })
        .await
    }

    /// Whether the token is usable now: no repair under way, the token answers and the
    /// anchor session is still logged in. A failure asks for the repair that mends it.
    pub async fn ping(&self) -> Result<(), HsmError> {
        if self.connection.repairing() {
            return Err(HsmError::Recovering);
        }
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let link = connection.current().ok_or(HsmError::Recovering)?;
            let answered = connection
                .ctx
                .get_token_info(link.slot)
                .map_err(HsmError::from)
                .and_then(|_| {
                    let state = link
                        .with_anchor(|a| a.get_session_info().map(|i| i.session_state()))
                        .transpose()?;
                    match state {
                        Some(SessionState::RwUser) => Ok(()),
                        _ => Err(HsmError::SessionBroken {
                            function: "C_GetSessionInfo".into(),
                            rv: cryptoki::error::RvError::UserNotLoggedIn,
                        }),
                    }
                });
            if let Err(e) = &answered {
                connection.request(e.repair().max(Repair::Check), e);
            }
            answered
        })
        .await
        .map_err(|e| HsmError::Worker(e.to_string()))?
    }

    /// Closes every session and finalizes the module. Call once, after the server has
    /// stopped and in-flight calls have finished.
    pub fn shutdown(&self) {
        self.cache.clear();
        self.pool.close_all();
        self.connection.shutdown();
        if let Some(repairer) = self
            .repairer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = repairer.join();
        }
    }
}

/// Root keys: usable for AES-GCM inside the HSM, never readable.
fn root_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        // Needed once, to wrap the fresh key under the KEK; the object is then destroyed.
        Attribute::Extractable(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]
}

/// Standard keys: their payload is returned to authorised callers, so not sensitive.
fn standard_key_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}
