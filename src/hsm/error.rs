//! Typed HSM errors. Every PKCS#11 return code is classified here and nowhere else.

use cryptoki::error::{Error as CryptokiError, RvError};

use super::link::Repair;

/// What went wrong talking to the PKCS#11 token.
///
/// Messages name functions, return codes, labels and paths, never key material or PINs.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    #[error("cannot load PKCS#11 module {path}: {reason}")]
    ModuleLoad { path: String, reason: String },

    #[error("no token labelled {label:?} is present")]
    TokenNotFound { label: String },

    #[error("cannot read the user PIN: {0}")]
    Pin(String),

    #[error("the token was refused the user PIN")]
    PinIncorrect,

    #[error("the token is unreachable: {function} returned {rv}")]
    Unavailable { function: String, rv: RvError },

    #[error("the session is no longer usable: {function} returned {rv}")]
    SessionBroken { function: String, rv: RvError },

    /// The blob could not be unwrapped, or the data did not authenticate.
    #[error("the HSM rejected the input: {function} returned {rv}")]
    Rejected { function: String, rv: RvError },

    /// A key object handle is no longer valid (its session closed).
    #[error("{function}: the key object is gone ({rv})")]
    StaleObject { function: String, rv: RvError },

    #[error("{function} failed: {rv}")]
    Pkcs11 { function: String, rv: RvError },

    #[error("the token offers no usable {what} mechanism")]
    MechanismMissing { what: &'static str },

    #[error("master key {label:?}: {problem}")]
    MasterKey { label: String, problem: String },

    /// The cache does not hold the key version and the call carried no blob: the
    /// caller reads the blob and calls again.
    #[error("the key version is not cached and no blob was given")]
    NotCached,

    /// Key import input that the HSM (or the OAEP decoder) refused.
    #[error("key import refused: {0}")]
    ImportRefused(#[from] super::rsa::ImportRefusal),

    #[error("embedded token setup: {0}")]
    Setup(String),

    #[error("PKCS#11 binding error: {0}")]
    Binding(String),

    #[error("the HSM worker stopped: {0}")]
    Worker(String),

    /// The token is being repaired (see [`super::link`]); calls fail fast meanwhile.
    #[error("the token is unusable and being repaired")]
    Recovering,

    /// Every HSM session is busy and the queue of waiting calls is full, or a call
    /// waited in it longer than the configured bound.
    #[error("the HSM is saturated: no session came free in time")]
    Overloaded,

    /// A PKCS#11 call did not return within the configured bound; its worker is still
    /// inside the module.
    #[error("a PKCS#11 call did not return within {seconds} s")]
    Hung { seconds: u64 },
}

impl HsmError {
    /// The token or module is gone: report NOT_SERVING / UNAVAILABLE rather than INTERNAL.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            HsmError::Unavailable { .. }
                | HsmError::SessionBroken { .. }
                | HsmError::Recovering
                | HsmError::Hung { .. }
        )
    }

    /// What the connection must do before the token is usable again after this error.
    pub(crate) fn repair(&self) -> Repair {
        match self {
            HsmError::SessionBroken {
                rv: RvError::UserNotLoggedIn,
                ..
            }
            | HsmError::Unavailable {
                rv: RvError::UnwrappingKeyHandleInvalid | RvError::WrappingKeyHandleInvalid,
                ..
            } => Repair::Login,
            HsmError::Unavailable {
                rv: RvError::DeviceError | RvError::DeviceMemory,
                ..
            }
            | HsmError::SessionBroken { .. }
            | HsmError::Hung { .. } => Repair::Check,
            HsmError::Unavailable { .. } | HsmError::TokenNotFound { .. } => Repair::Reinitialize,
            _ => Repair::None,
        }
    }

    /// The pooled session must be dropped and a new one opened.
    pub fn breaks_session(&self) -> bool {
        matches!(
            self,
            HsmError::SessionBroken { .. } | HsmError::Unavailable { .. }
        )
    }
}

impl HsmError {
    /// Reclassifies an error from an AEAD decryption. Tokens report a failed GCM tag
    /// check in different ways: the standard CKR_ENCRYPTED_DATA_INVALID, but SoftHSM 2.6
    /// returns CKR_GENERAL_ERROR and others CKR_FUNCTION_FAILED. For a decryption whose
    /// inputs the service built itself, all three mean "does not authenticate".
    pub(crate) fn reclassify_aead_decrypt(self) -> HsmError {
        match self {
            HsmError::Pkcs11 {
                function,
                rv: rv @ (RvError::GeneralError | RvError::FunctionFailed),
            } => HsmError::Rejected { function, rv },
            other => other,
        }
    }
}

impl HsmError {
    /// Reclassifies an error from decrypting or unwrapping data a client supplied (an
    /// RSA-OAEP ciphertext). Tokens report a bad block in their own ways: Kryoptic 1.5
    /// answers a failed OAEP check with CKR_DEVICE_ERROR, SoftHSM raw RSA input that is
    /// not below the modulus with CKR_GENERAL_ERROR. For input the service did not make,
    /// these mean "rejected", and must not make the session (or the key cache) be
    /// thrown away; a token that is really gone is noticed by the next call and by the
    /// health monitor.
    pub(crate) fn reclassify_client_decrypt(self) -> HsmError {
        match self {
            HsmError::Unavailable {
                function,
                rv: rv @ RvError::DeviceError,
            } => HsmError::Rejected { function, rv },
            other => other.reclassify_aead_decrypt(),
        }
    }

    /// An error from unwrapping a blob the service stored itself (a root-key version):
    /// a refusal there is not about the caller's input but a damaged store or the wrong
    /// KEK, so it must not read as "your ciphertext is bad".
    pub(crate) fn reclassify_stored_blob(self) -> HsmError {
        match self {
            HsmError::Rejected { function, rv } => HsmError::Pkcs11 { function, rv },
            other => other,
        }
    }

    /// The token refused an object template (an attribute value its policy forbids).
    pub(crate) fn is_template_refused(&self) -> bool {
        matches!(
            self,
            HsmError::Pkcs11 {
                rv: RvError::TemplateInconsistent | RvError::AttributeValueInvalid,
                ..
            }
        )
    }

    /// The key cannot be used with the mechanism (wrong length or type for it): for an
    /// AES operation on imported material, the material is not an AES key.
    pub(crate) fn is_key_unfit(&self) -> bool {
        matches!(
            self,
            HsmError::Pkcs11 {
                rv: RvError::MechanismInvalid
                    | RvError::KeySizeRange
                    | RvError::KeyTypeInconsistent,
                ..
            }
        )
    }
}

impl From<CryptokiError> for HsmError {
    fn from(err: CryptokiError) -> Self {
        match err {
            CryptokiError::Pkcs11(rv, function) => classify(rv, function.to_string()),
            CryptokiError::LibraryLoading(e) => HsmError::ModuleLoad {
                path: String::from("(module)"),
                reason: e.to_string(),
            },
            other => HsmError::Binding(other.to_string()),
        }
    }
}

/// The single place where PKCS#11 return codes become error kinds.
fn classify(rv: RvError, function: String) -> HsmError {
    match rv {
        RvError::DeviceRemoved
        | RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized
        | RvError::SlotIdInvalid
        // The KEK's handle: the service's own object, never the caller's input.
        | RvError::UnwrappingKeyHandleInvalid
        | RvError::WrappingKeyHandleInvalid => HsmError::Unavailable { function, rv },
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::UserNotLoggedIn
        | RvError::OperationActive => HsmError::SessionBroken { function, rv },
        RvError::PinIncorrect | RvError::PinLocked | RvError::PinLenRange => HsmError::PinIncorrect,
        RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::WrappedKeyInvalid
        | RvError::WrappedKeyLenRange
        | RvError::DataInvalid
        | RvError::DataLenRange => HsmError::Rejected { function, rv },
        RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => {
            HsmError::StaleObject { function, rv }
        }
        _ => HsmError::Pkcs11 { function, rv },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_fault_asks_for_the_repair_that_mends_it() {
        let repair = |rv| classify(rv, "C_Encrypt".into()).repair();
        assert_eq!(repair(RvError::SessionHandleInvalid), Repair::Check);
        assert_eq!(repair(RvError::SessionClosed), Repair::Check);
        assert_eq!(repair(RvError::DeviceError), Repair::Check);
        assert_eq!(repair(RvError::DeviceMemory), Repair::Check);
        assert_eq!(repair(RvError::UserNotLoggedIn), Repair::Login);
        assert_eq!(repair(RvError::UnwrappingKeyHandleInvalid), Repair::Login);
        assert_eq!(repair(RvError::DeviceRemoved), Repair::Reinitialize);
        assert_eq!(repair(RvError::TokenNotPresent), Repair::Reinitialize);
        assert_eq!(
            repair(RvError::CryptokiNotInitialized),
            Repair::Reinitialize
        );
        // The caller's bad input, or the token's refusal of it, mends nothing.
        assert_eq!(repair(RvError::EncryptedDataInvalid), Repair::None);
        assert_eq!(repair(RvError::KeyHandleInvalid), Repair::None);
        assert_eq!(repair(RvError::GeneralError), Repair::None);
    }

    #[test]
    fn return_codes_are_classified_by_kind() {
        assert!(classify(RvError::DeviceRemoved, "C_Encrypt".into()).is_unavailable());
        assert!(classify(RvError::SessionHandleInvalid, "C_Encrypt".into()).breaks_session());
        assert!(matches!(
            classify(RvError::WrappedKeyInvalid, "C_UnwrapKey".into()),
            HsmError::Rejected { .. }
        ));
        assert!(matches!(
            classify(RvError::PinIncorrect, "C_Login".into()),
            HsmError::PinIncorrect
        ));
        let other = classify(RvError::GeneralError, "C_GenerateKey".into());
        assert!(!other.is_unavailable() && !other.breaks_session());
        assert!(matches!(
            other.reclassify_aead_decrypt(),
            HsmError::Rejected { .. }
        ));
        assert!(
            classify(RvError::TemplateInconsistent, "C_UnwrapKey".into()).is_template_refused()
        );
        assert!(!classify(RvError::WrappedKeyInvalid, "C_UnwrapKey".into()).is_template_refused());
        let gone = classify(RvError::DeviceRemoved, "C_Decrypt".into());
        assert!(gone.reclassify_aead_decrypt().is_unavailable());
        // A bad client ciphertext must not cost the session (Kryoptic's OAEP failure).
        let bad_block = classify(RvError::DeviceError, "C_UnwrapKey".into());
        assert!(matches!(
            bad_block.reclassify_client_decrypt(),
            HsmError::Rejected { .. }
        ));
        let gone = classify(RvError::DeviceRemoved, "C_UnwrapKey".into());
        assert!(gone.reclassify_client_decrypt().is_unavailable());
        // The KEK's handle lost is the service's fault, never the caller's.
        assert!(
            classify(RvError::UnwrappingKeyHandleInvalid, "C_UnwrapKey".into()).is_unavailable()
        );
        assert!(classify(RvError::WrappingKeyHandleInvalid, "C_WrapKey".into()).is_unavailable());
        // A stored blob the token refuses is not a rejection of the caller's input.
        let refused = classify(RvError::WrappedKeyInvalid, "C_UnwrapKey".into());
        assert!(matches!(
            refused.reclassify_stored_blob(),
            HsmError::Pkcs11 { .. }
        ));
    }
}
