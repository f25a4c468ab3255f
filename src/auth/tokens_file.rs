//! The tokens file (TOML): one `[[principal]]` table per principal, with its name, the
//! SHA-256 digest of its token and its role per instance.
//!
//! ```toml
//! [[principal]]
//! name = "admin"
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! roles = { "*" = "Administrator" }
//! ```
//!
//! Written whole to a temporary file beside it and renamed into place, owner-only
//! (0600), so a reader (the server on SIGHUP) never sees half a file.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::roles::{Grants, Role, valid_grant_instance};
use super::token::TokenDigest;

/// Names the audit trail uses for callers that are not principals.
const RESERVED_NAMES: [&str; 2] = ["anonymous", "system"];
const MAX_PRINCIPAL_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TokensFileError {
    #[error("cannot read the tokens file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the tokens file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the tokens file {path} does not parse: {reason}")]
    Parse { path: String, reason: String },
    #[error("the tokens file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The file's contents, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokensFile {
    pub principals: Vec<PrincipalEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrincipalEntry {
    pub name: String,
    pub token_sha256: TokenDigest,
    pub roles: Grants,
}

impl TokensFile {
    pub fn find(&self, name: &str) -> Option<&PrincipalEntry> {
        self.principals.iter().find(|p| p.name == name)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    principal: Vec<RawPrincipal>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: String,
    token_sha256: String,
    roles: BTreeMap<String, String>,
}

/// Principal names: 1..64 of `A-Z a-z 0-9 . _ @ -`, and not a reserved name.
pub fn valid_principal_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_PRINCIPAL_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
    {
        return Err(format!(
            "principal name {name:?}: 1..{MAX_PRINCIPAL_LEN} of A-Z a-z 0-9 . _ @ -"
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "principal name {name:?} is reserved for the audit trail"
        ));
    }
    Ok(())
}

pub fn parse_tokens_file(path: &Path, text: &str) -> Result<TokensFile, TokensFileError> {
    let shown = || path.display().to_string();
    let raw: RawFile = toml::from_str(text).map_err(|e| TokensFileError::Parse {
        path: shown(),
        reason: e.message().to_owned(),
    })?;
    let invalid = |reason: String| TokensFileError::Invalid {
        path: shown(),
        reason,
    };
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    let mut principals = Vec::with_capacity(raw.principal.len());
    for p in raw.principal {
        valid_principal_name(&p.name).map_err(invalid)?;
        if !names.insert(p.name.clone()) {
            return Err(invalid(format!("principal {:?} appears twice", p.name)));
        }
        let digest = TokenDigest::from_hex(&p.token_sha256).ok_or_else(|| {
            invalid(format!(
                "principal {:?}: token_sha256 must be 64 hex digits",
                p.name
            ))
        })?;
        if !digests.insert(digest.0) {
            return Err(invalid(format!(
                "principal {:?}: its token digest is another principal's too",
                p.name
            )));
        }
        let mut grants = BTreeMap::new();
        for (instance, role) in p.roles {
            if !valid_grant_instance(&instance) {
                return Err(invalid(format!(
                    "principal {:?}: {instance:?} is not an instance id or *",
                    p.name
                )));
            }
            let role = Role::parse(&role).ok_or_else(|| {
                invalid(format!(
                    "principal {:?}: role {role:?} in {instance:?} is not Viewer, Editor or \
                     Administrator",
                    p.name
                ))
            })?;
            grants.insert(instance, role);
        }
        principals.push(PrincipalEntry {
            name: p.name,
            token_sha256: digest,
            roles: Grants(grants),
        });
    }
    Ok(TokensFile { principals })
}

pub fn load_tokens_file(path: &Path) -> Result<TokensFile, TokensFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokensFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_tokens_file(path, &text)
}

pub fn render_tokens_file(file: &TokensFile) -> String {
    let raw = RawFile {
        principal: file
            .principals
            .iter()
            .map(|p| RawPrincipal {
                name: p.name.clone(),
                token_sha256: p.token_sha256.to_hex(),
                roles: p
                    .roles
                    .0
                    .iter()
                    .map(|(i, r)| (i.clone(), r.name().to_owned()))
                    .collect(),
            })
            .collect(),
    };
    format!(
        "# kms tokens file: principals, the SHA-256 of their bearer tokens, and their role\n\
         # per instance (\"*\" = every instance). Edit with `kms token`; a running server\n\
         # re-reads it on SIGHUP.\n\n{}",
        toml::to_string(&raw).expect("the tokens file always serializes")
    )
}

/// Writes the file atomically (temporary file, fsync, rename), owner-only.
pub fn save_tokens_file(path: &Path, file: &TokensFile) -> Result<(), TokensFileError> {
    let failed = |source| TokensFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("toml.tmp");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(failed)?;
    out.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(failed)?;
    out.write_all(render_tokens_file(file).as_bytes())
        .map_err(failed)?;
    out.sync_all().map_err(failed)?;
    std::fs::rename(&tmp, path).map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::BearerToken;

    fn entry(name: &str, roles: &[(&str, Role)]) -> PrincipalEntry {
        PrincipalEntry {
            name: name.into(),
            token_sha256: BearerToken::generate().unwrap().digest(),
            roles: Grants(roles.iter().map(|(i, r)| (i.to_string(), *r)).collect()),
        }
    }

    #[test]
    fn a_rendered_file_parses_back_to_itself() {
        let file = TokensFile {
            principals: vec![
                entry("admin", &[("*", Role::Administrator)]),
                entry(
                    "app-1",
                    &[("tenant-a", Role::Viewer), ("tenant-b", Role::Editor)],
                ),
            ],
        };
        let text = render_tokens_file(&file);
        assert_eq!(parse_tokens_file(Path::new("t"), &text).unwrap(), file);
    }

    #[test]
    fn bad_files_are_refused_naming_the_problem() {
        let digest = "a".repeat(64);
        for (text, expected) in [
            ("principal = 3", "does not parse"),
            (
                "[[principal]]\nname = \"x\"\ntoken_sha256 = \"zz\"\nroles = {}",
                "64 hex digits",
            ),
            (
                &format!(
                    "[[principal]]\nname = \"x\"\ntoken_sha256 = \"{digest}\"\nroles = {{ a = \"Owner\" }}"
                ),
                "is not Viewer, Editor or Administrator",
            ),
            (
                &format!(
                    "[[principal]]\nname = \"system\"\ntoken_sha256 = \"{digest}\"\nroles = {{}}"
                ),
                "reserved",
            ),
            (
                &format!(
                    "[[principal]]\nname = \"x\"\ntoken_sha256 = \"{digest}\"\nroles = {{}}\n\
                     [[principal]]\nname = \"x\"\ntoken_sha256 = \"{}\"\nroles = {{}}",
                    "b".repeat(64)
                ),
                "appears twice",
            ),
            (
                &format!(
                    "[[principal]]\nname = \"x\"\ntoken_sha256 = \"{digest}\"\nroles = {{ \"a b\" = \"Viewer\" }}"
                ),
                "not an instance id",
            ),
        ] {
            let error = parse_tokens_file(Path::new("t"), text)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
