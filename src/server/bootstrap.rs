//! First start and file hygiene: the tokens file (created with an `admin` principal on
//! the embedded default's first start) and owner-only permissions on the data
//! directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::ServeError;
use crate::auth::{
    Authenticator, BearerToken, Grants, PrincipalEntry, Role, TokensFile, WILDCARD_INSTANCE,
    save_tokens_file,
};
use crate::config::Config;
use crate::secret::write_owner_only;

/// The principal created on first start, and the file its token is written to.
pub const ADMIN_PRINCIPAL: &str = "admin";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Loads the tokens file. When it is absent: on the embedded default, creates it with
/// one `admin` principal (`*=Administrator`) whose token goes to
/// `<data dir>/admin.token` (0600); otherwise refuses to start, since a configured
/// deployment names its own principals.
pub fn authenticator(config: &Config) -> Result<Authenticator, ServeError> {
    let path = &config.tokens_file;
    if !path.exists() {
        // Only the embedded default makes its own admin; a configured deployment names
        // its principals.
        if config.embedded.is_none() {
            return Err(ServeError::Bootstrap(format!(
                "no tokens file at {}: create principals with `kms token create --tokens-file \
                 {} --principal NAME --role INSTANCE=ROLE`",
                path.display(),
                path.display()
            )));
        }
        let token_path = config.data_dir.join(ADMIN_TOKEN_FILE);
        create_admin(path, &token_path)?;
        tracing::warn!(
            tokens_file = %path.display(),
            admin_token = %token_path.display(),
            "first start: created principal admin (*=Administrator); its token is in the \
             admin token file (owner-only)"
        );
        println!(
            "kms created principal {ADMIN_PRINCIPAL} (*=Administrator); its token is in {}",
            token_path.display()
        );
    }
    Ok(Authenticator::load(path)?)
}

fn create_admin(tokens_file: &Path, token_path: &Path) -> Result<(), ServeError> {
    let token = BearerToken::generate()
        .map_err(|e| ServeError::Bootstrap(format!("cannot generate a token: {e}")))?;
    // Left by a first start that failed before the tokens file was written: its token
    // was never valid anywhere.
    match std::fs::remove_file(token_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ServeError::Bootstrap(format!(
                "cannot replace {}: {e}",
                token_path.display()
            )));
        }
    }
    write_owner_only(token_path, format!("{}\n", token.expose()).as_bytes()).map_err(|e| {
        ServeError::Bootstrap(format!("cannot write {}: {e}", token_path.display()))
    })?;
    let file = TokensFile {
        principals: vec![PrincipalEntry {
            name: ADMIN_PRINCIPAL.into(),
            token_sha256: token.digest(),
            roles: Grants(BTreeMap::from([(
                WILDCARD_INSTANCE.to_owned(),
                Role::Administrator,
            )])),
        }],
    };
    save_tokens_file(tokens_file, &file)?;
    Ok(())
}

/// Makes the data directory and everything under it owner-only (directories 0700,
/// files 0600), mending what an older build or a loose umask left readable. Symbolic
/// links are not followed. The process umask (0077, set at start) keeps new files so.
pub fn restrict_permissions(dir: &Path) {
    fn walk(dir: &Path, depth: usize) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        if depth == 0 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                walk(&path, depth - 1);
            } else if kind.is_file() {
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            }
        }
    }
    walk(dir, 4);
}
