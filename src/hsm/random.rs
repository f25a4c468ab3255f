//! Randomness from the HSM's RNG, drawn in batches.
//!
//! IVs and generated data keys must come from the HSM, but one C_GenerateRandom per
//! request costs as much as the encryption itself. The reserve draws 4 KiB at a time and
//! hands out each byte exactly once; the buffer is zeroized as it is consumed and on drop
//! (it may hold future data keys).

use std::sync::Mutex;

use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::error::HsmError;

const REFILL_BYTES: u32 = 4096;

#[derive(Default)]
pub(crate) struct RandomReserve {
    bytes: Mutex<Zeroizing<Vec<u8>>>,
}

impl RandomReserve {
    /// Fills `out` with bytes from the HSM's RNG not handed out before. Blocking.
    pub(crate) fn fill(&self, session: &Session, out: &mut [u8]) -> Result<(), HsmError> {
        if out.len() > REFILL_BYTES as usize {
            session.generate_random_slice(out)?;
            return Ok(());
        }
        let mut reserve = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        if reserve.len() < out.len() {
            let mut fresh = session.generate_random_vec(REFILL_BYTES)?;
            reserve.extend_from_slice(&fresh);
            fresh.zeroize();
        }
        let start = reserve.len() - out.len();
        out.copy_from_slice(&reserve[start..]);
        reserve[start..].zeroize();
        reserve.truncate(start);
        Ok(())
    }
}
