//! The embedded default HSM: a SoftHSMv2 token under the data directory, created on
//! first start with random PINs kept in owner-only files.
//!
//! The token is initialised through PKCS#11 itself (C_InitToken, C_InitPIN), so this
//! works with the SoftHSM module alone; `softhsm/create-token.sh` does the same with
//! `softhsm2-util` for operators who prefer a script.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::token::{find_slot_by_label, initialize};
use super::{HsmConfig, HsmError, PinSource};
use crate::secret::write_owner_only;

/// Debian's SoftHSMv2 module.
pub const DEFAULT_SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const DEFAULT_TOKEN_LABEL: &str = "kms";
pub const DEFAULT_KEK_LABEL: &str = "kms-master-kek";
pub const DEFAULT_KEY_CACHE_SIZE: usize = 1024;

/// Files of the embedded token under the data directory.
#[derive(Debug, Clone)]
pub struct EmbeddedSoftHsm {
    /// Value for SOFTHSM2_CONF: must be in the environment before the module initialises.
    pub softhsm_conf: PathBuf,
    pub user_pin_file: PathBuf,
    pub so_pin_file: PathBuf,
}

impl EmbeddedSoftHsm {
    /// Paths only; nothing is created.
    pub fn under(data_dir: &Path) -> Self {
        let dir = data_dir.join("softhsm");
        Self {
            softhsm_conf: dir.join("softhsm2.conf"),
            user_pin_file: dir.join("user.pin"),
            so_pin_file: dir.join("so.pin"),
        }
    }

    /// Writes the SoftHSM configuration and the PIN files when absent. Does not touch
    /// the module; call before SOFTHSM2_CONF is exported and the module initialised.
    pub fn prepare_files(&self) -> Result<(), HsmError> {
        let dir = self.softhsm_conf.parent().expect("conf has a parent");
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|e| io(&tokens, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(dir, e))?;
        if !self.softhsm_conf.exists() {
            let tokens = std::path::absolute(&tokens).map_err(|e| io(&tokens, e))?;
            let text = format!(
                "# Written by kms for its embedded default token.\n\
                 directories.tokendir = {}\n\
                 objectstore.backend = file\n\
                 log.level = ERROR\n\
                 slots.removable = false\n",
                tokens.display()
            );
            write_private(&self.softhsm_conf, text.as_bytes())?;
        }
        for file in [&self.user_pin_file, &self.so_pin_file] {
            if !file.exists() {
                write_private(file, random_pin()?.as_bytes())?;
            }
        }
        Ok(())
    }

    /// The HSM configuration for this token.
    pub fn hsm_config(&self, module: PathBuf) -> HsmConfig {
        HsmConfig {
            limits: Default::default(),
            module,
            token_label: DEFAULT_TOKEN_LABEL.into(),
            pin: PinSource::File(self.user_pin_file.clone()),
            kek_label: DEFAULT_KEK_LABEL.into(),
            pool_size: default_pool_size(),
            key_cache_size: DEFAULT_KEY_CACHE_SIZE,
            oaep_fallback: true,
        }
    }

    /// Initialises the token on a free slot unless a token with the label exists.
    /// Needs SOFTHSM2_CONF already pointing at `softhsm_conf`. Blocking.
    pub fn ensure_token(&self, module: &Path) -> Result<(), HsmError> {
        let ctx = Pkcs11::new(module).map_err(|e| HsmError::ModuleLoad {
            path: module.display().to_string(),
            reason: e.to_string(),
        })?;
        initialize(&ctx)?;
        for slot in ctx.get_slots_with_initialized_token()? {
            if ctx.get_token_info(slot)?.label().trim_end() == DEFAULT_TOKEN_LABEL {
                return Ok(());
            }
        }
        let mut free = None;
        for slot in ctx.get_slots_with_token()? {
            if !ctx.get_token_info(slot)?.token_initialized() {
                free = Some(slot);
                break;
            }
        }
        let slot = free.ok_or_else(|| HsmError::TokenNotFound {
            label: format!("{DEFAULT_TOKEN_LABEL} (and no free slot to create it in)"),
        })?;
        let so_pin = read_pin(&self.so_pin_file)?;
        let user_pin = read_pin(&self.user_pin_file)?;
        ctx.init_token(slot, &so_pin, DEFAULT_TOKEN_LABEL)?;
        // SoftHSM moves the new token to another slot number: look it up again.
        let slot = find_slot_by_label(&ctx, DEFAULT_TOKEN_LABEL)?;
        let session = ctx.open_rw_session(slot)?;
        session.login(UserType::So, Some(&so_pin))?;
        session.init_pin(&user_pin)?;
        session.logout()?;
        session.close()?;
        tracing::info!(conf = %self.softhsm_conf.display(), "created the embedded SoftHSM token");
        Ok(())
    }
}

pub fn default_pool_size() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 4)
}

fn read_pin(path: &Path) -> Result<AuthPin, HsmError> {
    let pin = PinSource::File(path.to_owned()).read()?;
    let text = std::str::from_utf8(pin.expose())
        .map_err(|_| HsmError::Pin(format!("{}: not UTF-8", path.display())))?;
    Ok(AuthPin::from(text.to_owned()))
}

/// 32 hex characters from the OS random source.
fn random_pin() -> Result<String, HsmError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| HsmError::Pin(format!("no randomness: {e}")))?;
    let pin = bytes.iter().map(|b| format!("{b:02x}")).collect();
    zeroize::Zeroize::zeroize(&mut bytes);
    Ok(pin)
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), HsmError> {
    write_owner_only(path, contents).map_err(|e| io(path, e))
}

fn io(path: &Path, e: std::io::Error) -> HsmError {
    HsmError::Setup(format!("{}: {e}", path.display()))
}
