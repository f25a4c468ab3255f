//! Secrets in the process and on disk: buffers zeroized on drop and redacted in Debug,
//! and owner-only files for the ones kept (PINs, tokens).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

/// Creates `path` with mode 0600 (never overwriting) and writes `bytes` durably.
pub fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Key material, plaintext data keys or PINs. `Debug` shows only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn expose_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Hands the bytes to a consumer that takes ownership (for example a protobuf
    /// response); the consumer is then responsible for them.
    pub fn into_unprotected(self) -> Vec<u8> {
        let mut inner = self.0;
        std::mem::take(&mut *inner)
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes([REDACTED; {}])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_bytes() {
        let secret = SecretBytes::new(b"super-secret-key-material".to_vec());
        let shown = format!("{secret:?}");
        assert!(!shown.contains("super"));
        assert!(shown.contains("REDACTED; 25"));
    }
}
