//! RSA key pairs for key import, and importing RSA-OAEP-wrapped AES material.
//!
//! Pairs are generated in the HSM. The public half leaves as a DER SubjectPublicKeyInfo;
//! the private half leaves only wrapped under the master KEK (RFC 5649, since a PKCS#8
//! encoding is not a multiple of 8 bytes) and is unwrapped into a sensitive,
//! non-extractable session object for the duration of one import.
//!
//! Importing material: the ciphertext is unwrapped by the HSM straight into an AES key
//! object (C_UnwrapKey with CKM_RSA_PKCS_OAEP) where the token supports the OAEP hash;
//! otherwise, if the software fallback is enabled, the HSM does the raw RSA operation
//! (CKM_RSA_X_509), [`super::oaep::decode`] removes the padding in zeroized buffers, and
//! the material is put into the HSM (C_CreateObject) at once. The optional nonce proof
//! (IBM's secure import) is checked inside the HSM by AES-GCM decryption under the new
//! key. The check value is an AES-CMAC of a zero block computed in the HSM, so a later
//! re-import can be compared without keeping the material.

use std::os::raw::c_ulong;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::oaep::{self, OaepHash};
use super::{
    GCM_TAG_LEN, HsmError, WrapMechanism, WrapMechanisms, WrappedKey, create_with_value,
    wrap_and_destroy,
};

/// An RSA key pair made in the HSM, as stored: public key in the clear, private key
/// wrapped under the master KEK.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RsaKeyPair {
    pub bits: u32,
    /// DER SubjectPublicKeyInfo.
    #[serde(with = "hex::serde")]
    pub public_key: Vec<u8>,
    pub private_key: WrappedKey,
}

/// How the token decrypts one OAEP variant, decided at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OaepSupport {
    /// C_UnwrapKey with CKM_RSA_PKCS_OAEP and this hash.
    Native,
    /// Raw RSA in the HSM, padding removed by OpenSSL's decoder in the process.
    Fallback,
    /// Neither: requests for this hash are refused.
    Unavailable,
}

/// Proof that the importer knows the material: the token's nonce, AES-GCM encrypted
/// under the material being imported (IBM Key Protect's secure import).
#[derive(Debug)]
pub struct NonceProof {
    pub expected_nonce: Vec<u8>,
    pub iv: Vec<u8>,
    /// GCM ciphertext || 16-byte tag.
    pub encrypted_nonce: Vec<u8>,
}

/// One import of RSA-OAEP-wrapped AES material.
#[derive(Debug)]
pub struct MaterialImport {
    pub private_key: WrappedKey,
    pub modulus_bits: u32,
    pub hash: OaepHash,
    pub encrypted_material: Vec<u8>,
    /// Accepted material lengths in bytes.
    pub allowed_sizes: Vec<usize>,
    pub nonce_proof: Option<NonceProof>,
}

/// The imported material, now KEK-wrapped, with its size and check value.
#[derive(Clone, Debug)]
pub struct ImportedMaterial {
    pub wrapped: WrappedKey,
    pub size_bytes: usize,
    pub check_value: Vec<u8>,
}

/// Why an import was refused (the input's fault, not the HSM's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImportRefusal {
    #[error("the encrypted key material cannot be decrypted with this import key")]
    Undecryptable,
    /// The material is not of an accepted length (`None`: the token would not say
    /// exactly, only that it is none of them).
    #[error("the decrypted key material has a length that is not accepted")]
    MaterialSize { bytes: Option<usize> },
    #[error("the encrypted nonce does not match the import token's nonce")]
    NonceMismatch,
    #[error("the token cannot decrypt {}", .0.algorithm_name())]
    HashUnavailable(OaepHash),
}

const PUBLIC_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];
/// AES-CMAC of this block is the check value (the usual CMAC key check value input).
const CHECK_VALUE_INPUT: [u8; 16] = [0; 16];

/// Generates a pair in the HSM and returns it wrapped; every object is destroyed.
pub(super) fn generate_pair(
    session: &Session,
    bits: u32,
    kek: ObjectHandle,
    wrap: WrapMechanism,
) -> Result<RsaKeyPair, HsmError> {
    let (public, private) = generate_session_pair(session, bits, true)?;
    let spki = public_key_info(session, public);
    let destroyed = session.destroy_object(public);
    let wrapped = wrap_and_destroy(session, wrap, kek, private);
    let public_key = spki?;
    destroyed?;
    Ok(RsaKeyPair {
        bits,
        public_key,
        private_key: wrapped?,
    })
}

/// An RSA pair as session objects. `extractable`: whether the private key may be
/// wrapped (under the KEK) once.
fn generate_session_pair(
    session: &Session,
    bits: u32,
    extractable: bool,
) -> Result<(ObjectHandle, ObjectHandle), HsmError> {
    let public = [
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Encrypt(true),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::ModulusBits((bits as c_ulong).into()),
        Attribute::PublicExponent(PUBLIC_EXPONENT.to_vec()),
    ];
    let private = [
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Decrypt(true),
        Attribute::Unwrap(true),
        Attribute::Sign(false),
    ];
    Ok(session.generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &public, &private)?)
}

/// DER SubjectPublicKeyInfo of an RSA public key object.
fn public_key_info(session: &Session, public: ObjectHandle) -> Result<Vec<u8>, HsmError> {
    let attributes = session.get_attributes(
        public,
        &[AttributeType::Modulus, AttributeType::PublicExponent],
    )?;
    let (mut modulus, mut exponent) = (None, None);
    for attribute in attributes {
        match attribute {
            Attribute::Modulus(m) => modulus = Some(m),
            Attribute::PublicExponent(e) => exponent = Some(e),
            _ => {}
        }
    }
    let (Some(modulus), Some(exponent)) = (modulus, exponent) else {
        return Err(HsmError::Binding(
            "CKA_MODULUS or CKA_PUBLIC_EXPONENT missing".into(),
        ));
    };
    let encode = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let n = openssl::bn::BigNum::from_slice(&modulus)?;
        let e = openssl::bn::BigNum::from_slice(&exponent)?;
        openssl::rsa::Rsa::from_public_components(n, e)?.public_key_to_der()
    };
    encode().map_err(|e| HsmError::Binding(format!("encoding the public key: {e}")))
}

/// Unwraps a stored RSA private key into a sensitive, non-extractable session object
/// that can only decrypt and unwrap.
fn unwrap_private_key(
    session: &Session,
    kek: ObjectHandle,
    wrap: WrapMechanism,
    wrapped: &WrappedKey,
) -> Result<ObjectHandle, HsmError> {
    let template = [
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(KeyType::RSA),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Decrypt(true),
        Attribute::Unwrap(true),
        Attribute::Sign(false),
    ];
    Ok(session.unwrap_key(&wrap.mechanism(), kek, &wrapped.blob, &template)?)
}

fn oaep_mechanism(hash: OaepHash) -> Mechanism<'static> {
    let (hash_alg, mgf) = match hash {
        OaepHash::Sha1 => (MechanismType::SHA1, PkcsMgfType::MGF1_SHA1),
        OaepHash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256),
    };
    Mechanism::RsaPkcsOaep(PkcsOaepParams::new(hash_alg, mgf, PkcsOaepSource::empty()))
}

/// The imported AES key: sensitive; decrypts (the nonce proof), signs (the check value)
/// and is extractable only so it can be wrapped under the KEK once.
fn imported_key_template(sensitive: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(sensitive),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(true),
        Attribute::Sign(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]
}

pub(super) fn import_material(
    session: &Session,
    kek: ObjectHandle,
    wraps: WrapMechanisms,
    private_wrap: WrapMechanism,
    support: OaepSupport,
    request: MaterialImport,
) -> Result<ImportedMaterial, HsmError> {
    let kek_wrap = wraps.preferred();
    if support == OaepSupport::Unavailable {
        return Err(HsmError::ImportRefused(ImportRefusal::HashUnavailable(
            request.hash,
        )));
    }
    // An RSA ciphertext is exactly as long as the modulus; tokens disagree on how they
    // report anything else.
    if request.encrypted_material.len() != request.modulus_bits as usize / 8 {
        return Err(HsmError::ImportRefused(ImportRefusal::Undecryptable));
    }
    let private = unwrap_private_key(session, kek, private_wrap, &request.private_key)?;
    let material = material_object(session, kek, wraps, private, support, &request);
    let destroyed = session.destroy_object(private);
    let (key, size_bytes) = material?;
    destroyed?;

    let check_value = match check_material(session, key, &request) {
        Ok(check_value) => check_value,
        Err(e) => {
            let _ = session.destroy_object(key);
            return Err(e);
        }
    };
    let wrapped = wrap_and_destroy(session, kek_wrap, kek, key)?;
    Ok(ImportedMaterial {
        wrapped,
        size_bytes,
        check_value,
    })
}

/// The material as an AES session object, by native unwrap or by the fallback, and its
/// length in bytes (one of `request.allowed_sizes`).
fn material_object(
    session: &Session,
    kek: ObjectHandle,
    wraps: WrapMechanisms,
    private: ObjectHandle,
    support: OaepSupport,
    request: &MaterialImport,
) -> Result<(ObjectHandle, usize), HsmError> {
    let refused = |r| Err(HsmError::ImportRefused(r));
    match support {
        OaepSupport::Native => {
            let mechanism = oaep_mechanism(request.hash);
            let template = imported_key_template(true);
            match session.unwrap_key(&mechanism, private, &request.encrypted_material, &template) {
                Ok(key) => {
                    let len = secret_len(session, kek, wraps, key);
                    if let Ok(Some(len)) = len
                        && request.allowed_sizes.contains(&len)
                    {
                        return Ok((key, len));
                    }
                    session.destroy_object(key)?;
                    refused(ImportRefusal::MaterialSize { bytes: len? })
                }
                Err(e) => {
                    let e = HsmError::from(e).reclassify_client_decrypt();
                    if e.breaks_session() {
                        return Err(e);
                    }
                    // Decrypted fine but not an AES key length? Ask again as a generic
                    // secret, only to name the size in the error.
                    let generic = [
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::Token(false),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(true),
                    ];
                    match session.unwrap_key(
                        &mechanism,
                        private,
                        &request.encrypted_material,
                        &generic,
                    ) {
                        Ok(key) => {
                            let len = secret_len(session, kek, wraps, key);
                            session.destroy_object(key)?;
                            refused(ImportRefusal::MaterialSize { bytes: len? })
                        }
                        Err(_) => refused(ImportRefusal::Undecryptable),
                    }
                }
            }
        }
        OaepSupport::Fallback => {
            let modulus_len = request.modulus_bits as usize / 8;
            let raw =
                match session.decrypt(&Mechanism::RsaX509, private, &request.encrypted_material) {
                    Ok(raw) => Zeroizing::new(raw),
                    Err(e) => {
                        let e = HsmError::from(e).reclassify_client_decrypt();
                        return match e {
                            HsmError::Rejected { .. } => refused(ImportRefusal::Undecryptable),
                            other => Err(other),
                        };
                    }
                };
            let Some(material) = oaep::decode(&raw, modulus_len, request.hash) else {
                return refused(ImportRefusal::Undecryptable);
            };
            drop(raw);
            if !request.allowed_sizes.contains(&material.len()) {
                return refused(ImportRefusal::MaterialSize {
                    bytes: Some(material.len()),
                });
            }
            let key = create_with_value(session, imported_key_template(true), &material)?;
            Ok((key, material.len()))
        }
        OaepSupport::Unavailable => refused(ImportRefusal::HashUnavailable(request.hash)),
    }
}

/// The length of a sensitive secret-key object, without reading it: CKA_VALUE_LEN where
/// the token fills it in; SoftHSM 2.6 leaves it 0 on unwrapped keys, and then the length
/// of an RFC 3394 wrap under the KEK (input length + 8, defined only for multiples of 8)
/// tells it. `None`: not a multiple of 8, so no AES key length.
fn secret_len(
    session: &Session,
    kek: ObjectHandle,
    wraps: WrapMechanisms,
    key: ObjectHandle,
) -> Result<Option<usize>, HsmError> {
    let reported = session
        .get_attributes(key, &[AttributeType::ValueLen])?
        .into_iter()
        .find_map(|a| match a {
            Attribute::ValueLen(len) => Some(u64::from(len) as usize),
            _ => None,
        })
        .unwrap_or(0);
    if reported > 0 {
        return Ok(Some(reported));
    }
    let Some(rfc3394) = wraps.rfc3394 else {
        return Ok(None);
    };
    match session.wrap_key(&rfc3394.mechanism(), kek, key) {
        Ok(wrapped) => Ok(wrapped.len().checked_sub(8)),
        Err(e) => {
            let e = HsmError::from(e);
            if e.breaks_session() { Err(e) } else { Ok(None) }
        }
    }
}

/// Computes the check value, then checks the nonce proof (if any) inside the HSM.
///
/// The CMAC comes first because it also proves the object is a usable AES key: a token
/// that cannot report a secret's length (SoftHSM leaves CKA_VALUE_LEN at 0 after an
/// unwrap, and pads RFC 3394 input) refuses AES operations on a key of another length.
fn check_material(
    session: &Session,
    key: ObjectHandle,
    request: &MaterialImport,
) -> Result<Vec<u8>, HsmError> {
    let check_value = match session.sign(&Mechanism::AesCMac, key, &CHECK_VALUE_INPUT) {
        Ok(value) => value,
        Err(e) => {
            return Err(match HsmError::from(e) {
                e if e.is_key_unfit() => {
                    HsmError::ImportRefused(ImportRefusal::MaterialSize { bytes: None })
                }
                other => other,
            });
        }
    };
    if let Some(proof) = &request.nonce_proof {
        let mut iv = proof.iv.clone();
        let decrypted = GcmParams::new(&mut iv, &[], (GCM_TAG_LEN as c_ulong * 8).into())
            .map_err(HsmError::from)
            .and_then(|params| {
                session
                    .decrypt(&Mechanism::AesGcm(params), key, &proof.encrypted_nonce)
                    .map_err(|e| HsmError::from(e).reclassify_aead_decrypt())
            });
        let nonce = match decrypted {
            Ok(nonce) => nonce,
            Err(HsmError::Rejected { .. }) => {
                return Err(HsmError::ImportRefused(ImportRefusal::NonceMismatch));
            }
            Err(e) => return Err(e),
        };
        let matches = nonce.len() == proof.expected_nonce.len()
            && openssl::memcmp::eq(&nonce, &proof.expected_nonce);
        if !matches {
            return Err(HsmError::ImportRefused(ImportRefusal::NonceMismatch));
        }
    }
    Ok(check_value)
}

/// Finds out which OAEP hashes the token decrypts natively, with one throwaway small
/// pair: for each hash, a ciphertext made by OpenSSL from its public key and a
/// C_UnwrapKey whose result is compared. Any failure means "not natively". Returns
/// (SHA-1, SHA-256).
pub(super) fn probe_native_oaep(session: &Session) -> (bool, bool) {
    let Ok((public, private)) = generate_session_pair(session, PROBE_BITS, false)
        .or_else(|_| generate_session_pair(session, 2048, false))
    else {
        return (false, false);
    };
    let native = |hash: OaepHash| -> Result<bool, HsmError> {
        let spki = public_key_info(session, public)?;
        let probe = [0x5au8; 16];
        let ciphertext = encrypt_oaep(&spki, hash, &probe)
            .map_err(|e| HsmError::Binding(format!("probe encryption: {e}")))?;
        let mut template = imported_key_template(false);
        template.retain(|a| !matches!(a, Attribute::Sign(_)));
        let key = session.unwrap_key(&oaep_mechanism(hash), private, &ciphertext, &template)?;
        let value = session.get_attributes(key, &[AttributeType::Value]);
        session.destroy_object(key)?;
        Ok(matches!(value?.as_slice(), [Attribute::Value(v)] if v.as_slice() == probe))
    };
    let verdict = (
        native(OaepHash::Sha1).unwrap_or(false),
        native(OaepHash::Sha256).unwrap_or(false),
    );
    let _ = session.destroy_object(public);
    let _ = session.destroy_object(private);
    verdict
}

const PROBE_BITS: u32 = 1024;

/// RSA-OAEP encryption with a DER SubjectPublicKeyInfo: the client half of import, used
/// by the start-up probe and by the `kms import` client.
pub fn encrypt_oaep(
    public_key_der: &[u8],
    hash: OaepHash,
    message: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    use openssl::encrypt::Encrypter;
    use openssl::hash::MessageDigest;
    let key = openssl::pkey::PKey::public_key_from_der(public_key_der)?;
    let digest = match hash {
        OaepHash::Sha1 => MessageDigest::sha1(),
        OaepHash::Sha256 => MessageDigest::sha256(),
    };
    let mut encrypter = Encrypter::new(&key)?;
    encrypter.set_rsa_padding(openssl::rsa::Padding::PKCS1_OAEP)?;
    encrypter.set_rsa_oaep_md(digest)?;
    encrypter.set_rsa_mgf1_md(digest)?;
    let mut out = vec![0; encrypter.encrypt_len(message)?];
    let written = encrypter.encrypt(message, &mut out)?;
    out.truncate(written);
    Ok(out)
}

/// Whether the token can do the raw RSA operation the fallback needs.
pub(super) fn raw_rsa_offered(ctx: &cryptoki::context::Pkcs11, slot: cryptoki::slot::Slot) -> bool {
    ctx.get_mechanism_info(slot, MechanismType::RSA_X_509)
        .is_ok()
}
