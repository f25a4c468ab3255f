//! Bearer tokens: `kms_` followed by 64 hex digits (256 random bits). Only their
//! SHA-256 digests are stored: for a secret of 256 random bits a fast one-way hash is
//! enough (NIST SP 800-63B 5.1.2.2); a slow password hash would add tens of
//! milliseconds per call and no security.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub const TOKEN_PREFIX: &str = "kms_";
const TOKEN_RANDOM_BYTES: usize = 32;
const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 2 * TOKEN_RANDOM_BYTES;

/// A bearer token as presented or generated. Zeroized on drop; `Debug` never shows it.
pub struct BearerToken(Zeroizing<String>);

impl BearerToken {
    /// A new random token from the operating system's generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut random = Zeroizing::new([0u8; TOKEN_RANDOM_BYTES]);
        getrandom::fill(random.as_mut())?;
        let mut text = Zeroizing::new(String::with_capacity(TOKEN_LEN));
        text.push_str(TOKEN_PREFIX);
        text.push_str(&hex::encode(random.as_ref()));
        Ok(Self(text))
    }

    /// Parses a token: the prefix and exactly 64 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let digits = text.strip_prefix(TOKEN_PREFIX)?;
        let well_formed = text.len() == TOKEN_LEN
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        well_formed.then(|| Self(Zeroizing::new(text.to_owned())))
    }

    /// The token from an `authorization` header value: `Bearer <token>` (the scheme is
    /// case-insensitive, as HTTP says).
    pub fn from_header(value: &str) -> Option<Self> {
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Self::parse(token.trim())
    }

    pub fn digest(&self) -> TokenDigest {
        TokenDigest(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The token itself, to print once or write to an owner-only file.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken([REDACTED])")
    }
}

/// SHA-256 of a token: what the tokens file stores.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest(pub [u8; 32]);

impl TokenDigest {
    /// Constant-time equality: no early exit on the first differing byte.
    pub fn ct_eq(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(text, &mut digest).ok()?;
        Some(Self(digest))
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenDigest({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = BearerToken::generate().unwrap();
        let b = BearerToken::generate().unwrap();
        assert!(a.expose().starts_with("kms_") && a.expose().len() == 68);
        assert_ne!(a.expose(), b.expose());
        let parsed = BearerToken::parse(a.expose()).unwrap();
        assert!(parsed.digest().ct_eq(&a.digest()));
        assert!(!parsed.digest().ct_eq(&b.digest()));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = BearerToken::generate().unwrap();
        let text = good.expose();
        for bad in [
            "",
            "kms_",
            &text[..67],
            &format!("{text}0"),
            &text.replace("kms_", "kmz_"),
            &text.to_uppercase(),
        ] {
            assert!(BearerToken::parse(bad).is_none(), "{bad:?}");
        }
        assert!(BearerToken::from_header(&format!("Bearer {text}")).is_some());
        assert!(BearerToken::from_header(&format!("bearer {text}")).is_some());
        assert!(BearerToken::from_header(&format!("Basic {text}")).is_none());
        assert!(BearerToken::from_header(text).is_none());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token = BearerToken::generate().unwrap();
        assert!(!format!("{token:?}").contains(&token.expose()[4..]));
    }
}
