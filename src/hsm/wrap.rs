//! Wrapping under the master KEK: the formats a stored blob can have, the token's
//! mechanism for each (probed at start-up), and the two steps every new key takes
//! (created in the HSM, then wrapped and its object destroyed).

use std::os::raw::c_ulong;

use cryptoki::mechanism::vendor_defined::VendorDefinedMechanism;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use serde::{Deserialize, Serialize};

use super::HsmError;
use crate::secret::SecretBytes;

/// PKCS#11 v2.40 CKM_AES_KEY_WRAP_KWP: the same RFC 5649 wrap as CKM_AES_KEY_WRAP_PAD
/// under another number; some tokens offer only this one.
const CKM_AES_KEY_WRAP_KWP: c_ulong = 0x0000_210B;

/// How a blob was wrapped under the KEK. Stored with every blob so that a blob stays
/// readable whichever of the equivalent mechanisms the token offers today.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WrapFormat {
    /// AES key wrap with padding (RFC 5649): CKM_AES_KEY_WRAP_PAD or CKM_AES_KEY_WRAP_KWP.
    Rfc5649,
    /// AES key wrap (RFC 3394): CKM_AES_KEY_WRAP.
    Rfc3394,
}

/// The token's mechanism for each wrap format, chosen by probing at start-up.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WrapMechanism {
    /// CKM_AES_KEY_WRAP_PAD (0x210A).
    Pad,
    /// CKM_AES_KEY_WRAP_KWP (0x210B).
    Kwp,
    /// CKM_AES_KEY_WRAP (0x2109).
    Rfc3394Wrap,
}

impl WrapMechanism {
    pub(crate) fn format(self) -> WrapFormat {
        match self {
            WrapMechanism::Pad | WrapMechanism::Kwp => WrapFormat::Rfc5649,
            WrapMechanism::Rfc3394Wrap => WrapFormat::Rfc3394,
        }
    }

    pub(crate) fn mechanism(self) -> Mechanism<'static> {
        match self {
            WrapMechanism::Pad => Mechanism::AesKeyWrapPad,
            WrapMechanism::Rfc3394Wrap => Mechanism::AesKeyWrap,
            WrapMechanism::Kwp => {
                Mechanism::VendorDefined(VendorDefinedMechanism::new::<()>(kwp_type(), None))
            }
        }
    }
}

/// cryptoki names no variant for CKM_AES_KEY_WRAP_KWP and refuses numbers below
/// CKM_VENDOR_DEFINED in `new_vendor_defined`, so the type is built from its number.
pub(crate) fn kwp_type() -> MechanismType {
    // SAFETY: MechanismType is `#[repr(transparent)]` over CK_MECHANISM_TYPE (c_ulong),
    // so every c_ulong is a valid bit pattern for it.
    unsafe { std::mem::transmute::<c_ulong, MechanismType>(CKM_AES_KEY_WRAP_KWP) }
}

/// A key wrapped under the master KEK, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub format: WrapFormat,
    #[serde(with = "hex::serde")]
    pub blob: Vec<u8>,
}

/// The token's mechanism for each wrap format (Copy, so jobs can carry it).
#[derive(Clone, Copy)]
pub(crate) struct WrapMechanisms {
    pub(crate) rfc5649: Option<WrapMechanism>,
    pub(crate) rfc3394: Option<WrapMechanism>,
}

impl WrapMechanisms {
    /// The mechanism for new blobs: RFC 5649 when offered, since it wraps any length.
    pub(crate) fn preferred(self) -> WrapMechanism {
        self.rfc5649
            .or(self.rfc3394)
            .expect("open() refuses a token without key wrap")
    }

    pub(crate) fn for_format(self, format: WrapFormat) -> Result<WrapMechanism, HsmError> {
        match format {
            WrapFormat::Rfc5649 => self.rfc5649,
            WrapFormat::Rfc3394 => self.rfc3394,
        }
        .ok_or(HsmError::MechanismMissing {
            what: match format {
                WrapFormat::Rfc5649 => "RFC 5649 AES key wrap for this stored blob",
                WrapFormat::Rfc3394 => "RFC 3394 AES key wrap for this stored blob",
            },
        })
    }
}

/// C_CreateObject with CKA_VALUE, wiping the template's copy of the material afterwards.
pub(crate) fn create_with_value(
    session: &Session,
    mut template: Vec<Attribute>,
    material: &SecretBytes,
) -> Result<ObjectHandle, HsmError> {
    template.push(Attribute::Value(material.expose().to_vec()));
    let created = session.create_object(&template);
    for attribute in &mut template {
        if let Attribute::Value(value) = attribute {
            zeroize::Zeroize::zeroize(value);
        }
    }
    Ok(created?)
}

/// Wraps `key` under the KEK, then destroys the session object whatever happened.
pub(crate) fn wrap_and_destroy(
    session: &Session,
    wrap: WrapMechanism,
    kek: ObjectHandle,
    key: ObjectHandle,
) -> Result<WrappedKey, HsmError> {
    let wrapped = session.wrap_key(&wrap.mechanism(), kek, key);
    let destroyed = session.destroy_object(key);
    let blob = wrapped?;
    destroyed?;
    Ok(WrappedKey {
        format: wrap.format(),
        blob,
    })
}
