//! RSA-OAEP: the hash variants the service accepts, and the software decoder used by
//! the fallback for tokens that cannot do an OAEP hash natively (SoftHSM 2.6.1 has no
//! SHA-256 OAEP).
//!
//! The fallback splits OAEP decryption in two: the RSA private-key operation stays in
//! the HSM (CKM_RSA_X_509 on the token's private key), and only the padding is removed
//! here, by OpenSSL's `RSA_padding_check_PKCS1_OAEP_mgf1`, the constant-time decoder
//! OpenSSL itself uses for every OAEP decryption. Nothing here is written by this
//! project beyond calling it: every buffer is zeroized on drop, and a failure of any
//! kind is one indistinguishable `None`.

use std::os::raw::{c_int, c_uchar};

use zeroize::Zeroizing;

use crate::secret::SecretBytes;

/// The OAEP variants offered for wrapped key material (hash = MGF1 hash, empty label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum OaepHash {
    Sha1,
    Sha256,
}

impl OaepHash {
    pub const ALL: [OaepHash; 2] = [OaepHash::Sha1, OaepHash::Sha256];

    /// The name used in the API and in messages.
    pub fn algorithm_name(self) -> &'static str {
        match self {
            OaepHash::Sha1 => "RSAES_OAEP_SHA_1",
            OaepHash::Sha256 => "RSAES_OAEP_SHA_256",
        }
    }

    fn digest(self) -> *const openssl_sys::EVP_MD {
        // SAFETY: both return pointers to OpenSSL's static digest tables.
        unsafe {
            match self {
                OaepHash::Sha1 => openssl_sys::EVP_sha1(),
                OaepHash::Sha256 => openssl_sys::EVP_sha256(),
            }
        }
    }
}

unsafe extern "C" {
    // Declared in <openssl/rsa.h> and exported by every libcrypto since 1.0.2 (deprecated
    // for direct use in 3.0, still the decoder behind EVP_PKEY_decrypt with OAEP);
    // openssl-sys does not bind it.
    fn RSA_padding_check_PKCS1_OAEP_mgf1(
        to: *mut c_uchar,
        tlen: c_int,
        from: *const c_uchar,
        flen: c_int,
        num: c_int,
        param: *const c_uchar,
        plen: c_int,
        md: *const openssl_sys::EVP_MD,
        mgf1md: *const openssl_sys::EVP_MD,
    ) -> c_int;
}

/// Removes OAEP padding (empty label) from `encoded`, the raw RSA output of a
/// `modulus_len`-byte key. `None` for every kind of failure.
pub fn decode(encoded: &[u8], modulus_len: usize, hash: OaepHash) -> Option<SecretBytes> {
    if encoded.len() > modulus_len || modulus_len > 2048 {
        return None;
    }
    // Raw RSA output is the big-endian integer; put it at full width.
    let mut block = Zeroizing::new(vec![0u8; modulus_len]);
    block[modulus_len - encoded.len()..].copy_from_slice(encoded);
    let mut message = Zeroizing::new(vec![0u8; modulus_len]);
    openssl_sys::init();
    let len = modulus_len as c_int;
    // SAFETY: `message` and `block` are valid for `modulus_len` bytes each; the label is
    // empty (null, 0); the digests are static. OpenSSL writes at most `tlen` bytes.
    let written = unsafe {
        RSA_padding_check_PKCS1_OAEP_mgf1(
            message.as_mut_ptr(),
            len,
            block.as_ptr(),
            len,
            len,
            std::ptr::null(),
            0,
            hash.digest(),
            hash.digest(),
        )
    };
    // SAFETY: clears this thread's OpenSSL error queue, which a failed check fills.
    unsafe { openssl_sys::ERR_clear_error() };
    let written = usize::try_from(written).ok()?;
    if written > modulus_len {
        return None;
    }
    Some(SecretBytes::new(message[..written].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::encrypt::{Decrypter, Encrypter};
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::{Padding, Rsa};

    fn md(hash: OaepHash) -> MessageDigest {
        match hash {
            OaepHash::Sha1 => MessageDigest::sha1(),
            OaepHash::Sha256 => MessageDigest::sha256(),
        }
    }

    /// Raw RSA (no padding) with OpenSSL: what CKM_RSA_X_509 returns from a token.
    fn raw_decrypt(key: &PKey<openssl::pkey::Private>, ciphertext: &[u8]) -> Vec<u8> {
        let mut decrypter = Decrypter::new(key).unwrap();
        decrypter.set_rsa_padding(Padding::NONE).unwrap();
        let mut out = vec![0; decrypter.decrypt_len(ciphertext).unwrap()];
        let n = decrypter.decrypt(ciphertext, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn encrypt(key: &PKey<openssl::pkey::Private>, hash: OaepHash, message: &[u8]) -> Vec<u8> {
        let mut encrypter = Encrypter::new(key).unwrap();
        encrypter.set_rsa_padding(Padding::PKCS1_OAEP).unwrap();
        encrypter.set_rsa_oaep_md(md(hash)).unwrap();
        encrypter.set_rsa_mgf1_md(md(hash)).unwrap();
        let mut out = vec![0; encrypter.encrypt_len(message).unwrap()];
        let n = encrypter.encrypt(message, &mut out).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn decodes_what_openssl_encrypts_and_nothing_else() {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        for hash in OaepHash::ALL {
            let material = [7u8; 32];
            let ciphertext = encrypt(&key, hash, &material);
            let encoded = raw_decrypt(&key, &ciphertext);
            let decoded = decode(&encoded, 256, hash).expect("valid OAEP decodes");
            assert_eq!(decoded.expose(), material);

            let other = match hash {
                OaepHash::Sha1 => OaepHash::Sha256,
                OaepHash::Sha256 => OaepHash::Sha1,
            };
            assert!(decode(&encoded, 256, other).is_none(), "wrong hash refused");
            let mut tampered = encoded.clone();
            tampered[100] ^= 1;
            assert!(decode(&tampered, 256, hash).is_none(), "tamper refused");
        }
        assert!(decode(&[1u8; 300], 256, OaepHash::Sha256).is_none());
    }
}
