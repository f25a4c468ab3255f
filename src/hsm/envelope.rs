//! AES-GCM under root-key versions, inside the HSM: WrapKey's seal and UnwrapKey's
//! unseal. A version is unwrapped from its KEK-wrapped blob into a session object once
//! and kept in the key cache; the caller hands the blob over when the cache lacks the
//! version (this module never reads the store).

use std::os::raw::c_ulong;
use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use super::cache::{CachedKey, KeyCache};
use super::{Hsm, HsmError, VersionId, WrapMechanism, WrapMechanisms, WrappedKey};
use crate::secret::SecretBytes;

/// AES-GCM parameters: 96-bit IV, 128-bit tag.
pub const GCM_IV_LEN: usize = 12;
pub const GCM_TAG_LEN: usize = 16;

/// One root-key version as the HSM needs it: its identity (for the cache) and, when the
/// caller has read it, its KEK-wrapped blob. Without a blob, a version the cache does
/// not hold is [`HsmError::NotCached`]: the domain reads the blob from the store and
/// asks again. The HSM layer never reads the store.
pub struct KeyVersionRef {
    pub id: VersionId,
    pub blob: Option<WrappedKey>,
}

/// AES-GCM output: the IV the HSM drew and ciphertext||tag.
#[derive(Clone, Debug)]
pub struct Sealed {
    pub iv: [u8; GCM_IV_LEN],
    pub ciphertext: Vec<u8>,
}

impl Hsm {
    /// AES-GCM encrypts `plaintext` (or, when `None`, a fresh data key of
    /// `data_key_len` bytes from the HSM's RNG) under a root-key version, with an IV
    /// from the HSM's RNG. Returns the plaintext used and the sealed output.
    pub async fn seal(
        &self,
        key: KeyVersionRef,
        plaintext: Option<SecretBytes>,
        data_key_len: usize,
        aad: Vec<u8>,
    ) -> Result<(SecretBytes, Sealed), HsmError> {
        let (cache, random) = (Arc::clone(&self.cache), Arc::clone(&self.random));
        let wraps = self.wrap_mechanisms();
        self.run(move |session, kek| {
            let plaintext = match plaintext {
                Some(p) => p,
                None => {
                    let mut key = SecretBytes::new(vec![0; data_key_len]);
                    random.fill(session, key.expose_mut())?;
                    key
                }
            };
            let mut iv = [0u8; GCM_IV_LEN];
            random.fill(session, &mut iv)?;
            let ciphertext = with_key_object(session, &cache, kek, wraps, key, |handle| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, &aad, (GCM_TAG_LEN as c_ulong * 8).into())?;
                Ok(session.encrypt(&Mechanism::AesGcm(params), handle, plaintext.expose())?)
            })?;
            Ok((plaintext, Sealed { iv, ciphertext }))
        })
        .await
    }

    /// AES-GCM decrypts under a root-key version. Authentication failure is
    /// `HsmError::Rejected`.
    pub async fn unseal(
        &self,
        key: KeyVersionRef,
        sealed: Sealed,
        aad: Vec<u8>,
    ) -> Result<SecretBytes, HsmError> {
        let cache = Arc::clone(&self.cache);
        let wraps = self.wrap_mechanisms();
        self.run(move |session, kek| {
            with_key_object(session, &cache, kek, wraps, key, |handle| {
                let mut iv = sealed.iv;
                let params = GcmParams::new(&mut iv, &aad, (GCM_TAG_LEN as c_ulong * 8).into())?;
                let plaintext = session
                    .decrypt(&Mechanism::AesGcm(params), handle, &sealed.ciphertext)
                    .map_err(|e| HsmError::from(e).reclassify_aead_decrypt())?;
                Ok(SecretBytes::new(plaintext))
            })
        })
        .await
    }

    /// Drops cached objects of a key (rotation, disable, delete); they are destroyed
    /// once no call uses them.
    pub fn forget_key(&self, key_id: &uuid::Uuid) {
        self.cache.invalidate_key(key_id);
    }

    /// True when the cache holds the version unwrapped, so a call needs no blob.
    pub fn holds(&self, id: &VersionId) -> bool {
        self.cache.get(id).is_some()
    }
}

/// Runs `op` with the key version's object: from the cache, or unwrapped now from the
/// blob the caller gave, and cached. A cached object that vanished (its session died) is dropped and
/// unwrapped again once.
fn with_key_object<T>(
    session: &Session,
    cache: &KeyCache,
    kek: ObjectHandle,
    wraps: WrapMechanisms,
    key: KeyVersionRef,
    op: impl Fn(ObjectHandle) -> Result<T, HsmError>,
) -> Result<T, HsmError> {
    if let Some(cached) = cache.get(&key.id) {
        match op(cached.handle) {
            Err(HsmError::StaleObject { .. }) => cache.invalidate_key(&key.id.key_id),
            other => return other,
        }
    }
    let wrapped = key.blob.ok_or(HsmError::NotCached)?;
    let wrap = wraps.for_format(wrapped.format)?;
    let entry: Arc<CachedKey> = cache.insert(
        key.id,
        unwrap_root_key(session, kek, wrap, &wrapped).map_err(HsmError::reclassify_stored_blob)?,
    );
    op(entry.handle)
}

/// Unwraps a root-key blob into a non-extractable, sensitive session object that can
/// only encrypt and decrypt.
///
/// CKA_PRIVATE is false on purpose. A session object is visible only to this process's
/// sessions, which are all logged in, so "private" adds no access control here; but
/// SoftHSM keeps the value of private objects encrypted under the token key and decrypts
/// it on every C_EncryptInit/C_DecryptInit, a second cipher operation on each WrapKey and
/// UnwrapKey. CKA_SENSITIVE and non-extractability still keep the value from being read.
/// A token whose policy refuses a non-private secret key gets a private one instead.
fn unwrap_root_key(
    session: &Session,
    kek: ObjectHandle,
    wrap: WrapMechanism,
    wrapped: &WrappedKey,
) -> Result<ObjectHandle, HsmError> {
    let template = |private: bool| {
        [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(false),
            Attribute::Private(private),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
        ]
    };
    let mechanism = wrap.mechanism();
    match session
        .unwrap_key(&mechanism, kek, &wrapped.blob, &template(false))
        .map_err(HsmError::from)
    {
        // A token whose policy wants every secret key private gets one.
        Err(e) if e.is_template_refused() => {
            Ok(session.unwrap_key(&mechanism, kek, &wrapped.blob, &template(true))?)
        }
        other => other,
    }
}
