//! `kms audit verify`: checks the whole hash chain of a data directory's audit trail,
//! offline (the server must be stopped, or run it on a copy of the directory).

use std::io::IsTerminal;
use std::path::Path;

use crate::audit::{VerifyFailure, VerifyReport, verify};
use crate::store::{SledStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AuditCommandError {
    #[error("no database at {0}")]
    NoDatabase(String),
    #[error(
        "cannot open the database at {path} (a running server holds it: stop the server, or \
         verify a copy of the data directory): {source}"
    )]
    Open { path: String, source: StoreError },
    #[error("reading the audit trail: {0}")]
    Store(#[from] StoreError),
    #[error("the audit trail is broken at {0}")]
    Broken(VerifyFailure),
}

/// Verifies `<data dir>/db`. Progress goes to stderr every 100,000 records.
pub fn verify_data_dir(data_dir: &Path) -> Result<VerifyReport, AuditCommandError> {
    let db = data_dir.join("db");
    if !db.exists() {
        return Err(AuditCommandError::NoDatabase(db.display().to_string()));
    }
    let store = SledStore::open(&db).map_err(|source| AuditCommandError::Open {
        path: db.display().to_string(),
        source,
    })?;
    let terminal = std::io::stderr().is_terminal();
    let mut next_report = 100_000;
    let outcome = verify(&store, |checked| {
        if checked >= next_report {
            if terminal {
                eprint!("\rverified {checked} records");
            } else {
                eprintln!("verified {checked} records");
            }
            next_report += 100_000;
        }
    })?;
    if terminal && next_report > 100_000 {
        eprintln!();
    }
    outcome.map_err(AuditCommandError::Broken)
}
