//! `kms token create | revoke | list`: edit the tokens file. A new token is printed once,
//! on stdout alone, and only its SHA-256 is written. Edits hold an exclusive lock on
//! `<tokens file>.lock`, so two commands at once cannot lose each other's change. A
//! running server sees an edit after SIGHUP (or a restart).

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::auth::{
    BearerToken, Grants, PrincipalEntry, Role, TokensFile, TokensFileError, load_tokens_file,
    save_tokens_file, valid_grant_instance, valid_principal_name,
};

#[derive(Debug, thiserror::Error)]
pub enum TokenCommandError {
    #[error("{0}")]
    File(#[from] TokensFileError),
    #[error("--role {0:?}: expected INSTANCE=ROLE, ROLE one of Viewer, Editor, Administrator")]
    Role(String),
    #[error("--role: {0}")]
    Instance(String),
    #[error("{0}")]
    Principal(String),
    #[error("principal {0:?} already exists: revoke it first to issue a new token")]
    Exists(String),
    #[error("no principal {0:?} in {1}")]
    Unknown(String, String),
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot generate a token: {0}")]
    Random(getrandom::Error),
}

/// The tokens file of a data directory, or the one given.
pub fn tokens_path(data_dir: Option<&Path>, tokens_file: Option<&Path>) -> PathBuf {
    match (tokens_file, data_dir) {
        (Some(file), _) => file.to_owned(),
        (None, Some(dir)) => dir.join("tokens.toml"),
        (None, None) => PathBuf::from(crate::config::DEFAULT_DATA_DIR).join("tokens.toml"),
    }
}

/// `INSTANCE=ROLE` pairs to grants.
pub fn parse_roles(pairs: &[String]) -> Result<Grants, TokenCommandError> {
    let mut grants = BTreeMap::new();
    for pair in pairs {
        let (instance, role) = pair
            .split_once('=')
            .ok_or_else(|| TokenCommandError::Role(pair.clone()))?;
        let role = Role::parse(role).ok_or_else(|| TokenCommandError::Role(pair.clone()))?;
        if !valid_grant_instance(instance) {
            return Err(TokenCommandError::Instance(format!(
                "{instance:?} is not an instance id (1..128 printable ASCII characters) or *"
            )));
        }
        grants.insert(instance.to_owned(), role);
    }
    Ok(Grants(grants))
}

/// Holds `<path>.lock` exclusively until dropped.
struct EditLock(#[allow(dead_code)] std::fs::File);

fn lock(path: &Path) -> Result<EditLock, TokenCommandError> {
    let lock_path = path.with_extension("toml.lock");
    let failed = |source| TokenCommandError::Lock {
        path: lock_path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(failed)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(failed(std::io::Error::last_os_error()));
    }
    Ok(EditLock(file))
}

fn load_or_empty(path: &Path) -> Result<TokensFile, TokenCommandError> {
    if path.exists() {
        Ok(load_tokens_file(path)?)
    } else {
        Ok(TokensFile::default())
    }
}

/// Adds a principal with a new token and returns the token (to print once).
pub fn create(
    path: &Path,
    principal: &str,
    roles: Grants,
) -> Result<BearerToken, TokenCommandError> {
    valid_principal_name(principal).map_err(TokenCommandError::Principal)?;
    if roles.0.is_empty() {
        return Err(TokenCommandError::Role(String::new()));
    }
    let _lock = lock(path)?;
    let mut file = load_or_empty(path)?;
    if file.find(principal).is_some() {
        return Err(TokenCommandError::Exists(principal.to_owned()));
    }
    let token = BearerToken::generate().map_err(TokenCommandError::Random)?;
    file.principals.push(PrincipalEntry {
        name: principal.to_owned(),
        token_sha256: token.digest(),
        roles,
    });
    save_tokens_file(path, &file)?;
    Ok(token)
}

/// Removes a principal, and with it its token.
pub fn revoke(path: &Path, principal: &str) -> Result<(), TokenCommandError> {
    let _lock = lock(path)?;
    let mut file = load_or_empty(path)?;
    let before = file.principals.len();
    file.principals.retain(|p| p.name != principal);
    if file.principals.len() == before {
        return Err(TokenCommandError::Unknown(
            principal.to_owned(),
            path.display().to_string(),
        ));
    }
    save_tokens_file(path, &file)?;
    Ok(())
}

/// One line per principal: its name and roles, never its digest.
pub fn list(path: &Path) -> Result<Vec<String>, TokenCommandError> {
    let file = load_tokens_file(path)?;
    Ok(file
        .principals
        .iter()
        .map(|p| format!("{}\t{}", p.name, p.roles.describe()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let roles = parse_roles(&["tenant-a=viewer".into(), "*=Editor".into()]).unwrap();
        let token = create(&path, "app", roles).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(token.expose()),
            "the token itself is never stored"
        );
        assert!(text.contains(&token.digest().to_hex()));
        assert_eq!(list(&path).unwrap(), ["app\t*=Editor, tenant-a=Viewer"]);
        assert!(matches!(
            create(&path, "app", parse_roles(&["a=Viewer".into()]).unwrap()),
            Err(TokenCommandError::Exists(_))
        ));
        revoke(&path, "app").unwrap();
        assert!(list(&path).unwrap().is_empty());
        assert!(matches!(
            revoke(&path, "app"),
            Err(TokenCommandError::Unknown(..))
        ));
    }

    #[test]
    fn bad_roles_are_refused() {
        for bad in ["tenant", "tenant=Owner", "=Viewer", "a b=Viewer"] {
            assert!(parse_roles(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
