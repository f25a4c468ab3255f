//! Opening the token: C_Initialize, the slot found by label, login, the wrap
//! mechanisms it offers, and the master KEK found (or, on a new token, created) by label.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{HsmError, WrapMechanism, kwp_type};
use crate::secret::SecretBytes;

pub(super) fn initialize(ctx: &Pkcs11) -> Result<(), HsmError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(()),
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn login(session: &Session, pin: &SecretBytes) -> Result<(), HsmError> {
    let pin = std::str::from_utf8(pin.expose())
        .map_err(|_| HsmError::Pin("the PIN is not UTF-8".into()))?;
    let pin = AuthPin::from(pin.to_owned());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) => Ok(()),
        Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// SoftHSM renumbers slots when tokens are created, so slots are found by token label.
pub(super) fn find_slot_by_label(ctx: &Pkcs11, label: &str) -> Result<Slot, HsmError> {
    for slot in ctx.get_slots_with_initialized_token()? {
        let info = ctx.get_token_info(slot)?;
        if info.label().trim_end() == label {
            return Ok(slot);
        }
    }
    Err(HsmError::TokenNotFound {
        label: label.to_owned(),
    })
}

pub(super) fn probe_wrap_mechanisms(
    ctx: &Pkcs11,
    slot: Slot,
) -> (Option<WrapMechanism>, Option<WrapMechanism>) {
    let offered = |mechanism: MechanismType| ctx.get_mechanism_info(slot, mechanism).is_ok();
    let rfc5649 = if offered(MechanismType::AES_KEY_WRAP_PAD) {
        Some(WrapMechanism::Pad)
    } else if offered(kwp_type()) {
        Some(WrapMechanism::Kwp)
    } else {
        None
    };
    let rfc3394 = offered(MechanismType::AES_KEY_WRAP).then_some(WrapMechanism::Rfc3394Wrap);
    (rfc5649, rfc3394)
}

pub(super) fn find_or_create_kek(
    session: &Session,
    label: &str,
    may_create: bool,
) -> Result<(ObjectHandle, bool), HsmError> {
    let problem = |problem: &str| HsmError::MasterKey {
        label: label.to_owned(),
        problem: problem.to_owned(),
    };
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    let (kek, created) = match found.as_slice() {
        [kek] => (*kek, false),
        [] if may_create => {
            tracing::info!(label, "creating the master key-encryption key in the HSM");
            session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32.into()),
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                        Attribute::Encrypt(false),
                        Attribute::Decrypt(false),
                        Attribute::Sign(false),
                        Attribute::Verify(false),
                        Attribute::Derive(false),
                        Attribute::Label(label.as_bytes().to_vec()),
                    ],
                )
                .map(|kek| (kek, true))?
        }
        [] => {
            return Err(problem(
                "not found on the token, but the store holds keys wrapped under a master key; \
                 refusing to create a new one over existing data (check the token label and \
                 the master key label in the configuration)",
            ));
        }
        _ => return Err(problem("more than one key carries this label")),
    };

    // Refuse a KEK that someone created weaker than ours.
    let attributes = session.get_attributes(
        kek,
        &[
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::Unwrap,
        ],
    )?;
    for attribute in attributes {
        let acceptable = match attribute {
            Attribute::Sensitive(v) => v,
            Attribute::Extractable(v) => !v,
            Attribute::Unwrap(v) => v,
            _ => true,
        };
        if !acceptable {
            return Err(problem(
                "must be CKA_SENSITIVE, not CKA_EXTRACTABLE, and allow CKA_UNWRAP",
            ));
        }
    }
    Ok((kek, created))
}
