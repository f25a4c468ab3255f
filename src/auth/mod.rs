//! Who is calling and what they may do: bearer tokens, the tokens file, principals and
//! their roles per instance. A leaf module: the API's call gate and the `kms token`
//! commands use it; it knows nothing of keys, the HSM or the store.

mod roles;
mod token;
mod tokens_file;

pub use roles::{
    Grants, MAX_INSTANCE_LEN, Role, WILDCARD_INSTANCE, valid_grant_instance, valid_instance_id,
};
pub use token::{BearerToken, TokenDigest};
pub use tokens_file::{
    PrincipalEntry, TokensFile, TokensFileError, load_tokens_file, parse_tokens_file,
    render_tokens_file, save_tokens_file, valid_principal_name,
};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// A principal known to the server: its name and roles. Never holds the token.
#[derive(Debug)]
pub struct Principal {
    pub name: String,
    pub grants: Grants,
}

/// The tokens in force, swapped whole when the file is re-read (SIGHUP).
pub struct Authenticator {
    path: PathBuf,
    table: RwLock<Arc<TokenTable>>,
}

/// Token digests with their principals.
struct TokenTable {
    entries: Vec<(TokenDigest, Arc<Principal>)>,
}

impl TokenTable {
    fn from_file(file: TokensFile) -> Self {
        Self {
            entries: file
                .principals
                .into_iter()
                .map(|p| {
                    (
                        p.token_sha256,
                        Arc::new(Principal {
                            name: p.name,
                            grants: p.roles,
                        }),
                    )
                })
                .collect(),
        }
    }

    /// Compares the presented digest with every stored one in constant time and never
    /// stops early, so the time taken says nothing about which stored digest (if any)
    /// shares a prefix with it. A tokens file holds tens to hundreds of principals; at
    /// a few nanoseconds per 32-byte comparison this costs well under a microsecond.
    fn find(&self, digest: &TokenDigest) -> Option<Arc<Principal>> {
        let mut found = None;
        for (stored, principal) in &self.entries {
            if stored.ct_eq(digest) {
                found = Some(Arc::clone(principal));
            }
        }
        found
    }
}

impl Authenticator {
    /// Loads the tokens file; a missing or malformed file is an error.
    pub fn load(path: &Path) -> Result<Self, TokensFileError> {
        let file = load_tokens_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            table: RwLock::new(Arc::new(TokenTable::from_file(file))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file. On any error the tokens in force stay as they were.
    /// Returns the number of principals now in force.
    pub fn reload(&self) -> Result<usize, TokensFileError> {
        let table = TokenTable::from_file(load_tokens_file(&self.path)?);
        let count = table.entries.len();
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(count)
    }

    /// The principal holding `token`, if any.
    pub fn authenticate(&self, token: &BearerToken) -> Option<Arc<Principal>> {
        let table = Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()));
        table.find(&token.digest())
    }
}
