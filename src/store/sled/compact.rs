//! Compaction of a stopped sled database: `kms store compact`.
//!
//! Why: sled 0.34 writes a log and reclaims a segment only once half of it or less is
//! still live (a fixed threshold: its `segment_cleanup_threshold` setting does
//! nothing), so a store written by a live server keeps over a third of its file in
//! dead node versions. A million generated keys (1.02M after the at-size benches)
//! took 757 MB on disk as the server wrote them and 469 MB compacted, 460 bytes a key
//! with its creation's audit record, in 2 min 33 s (README, "At size"); a store that
//! has rotated, destroyed and purged keys keeps more dead data. Nothing is lost by waiting:
//! the space is reused as sled writes on, it is only not given back.
//!
//! The copy is not always smaller. sled writes a node again for every few entries
//! added to it and cleans the dead versions only as it writes on, so a copy made in
//! one quick pass carries dead data of its own; on a store that is mostly audit blocks
//! written by a short run (28k keys and 40 MB of trail, a 65 MB database) the copy
//! took 107 MB. A copy that is not smaller is deleted and the database left as it was.
//!
//! How: every tree is copied, in key order and in batches, into a new database beside
//! the old one (`db.compacting`, with this build's storage parameters), which is
//! flushed; then the two directories are exchanged in one `renameat2(RENAME_EXCHANGE)`,
//! so at every moment `db` is one whole database, the old or the new; then the old one
//! is deleted. A compaction interrupted before the exchange leaves `db` as it was and a
//! partial copy that the next one deletes first; one interrupted after it leaves the
//! old database under `db.compacting`, deleted the same way. The copy holds no record
//! in memory beyond one batch, and the server must be stopped (sled's lock says so).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{BACKEND, SledStore};
use crate::store::StoreError;

/// A batch is applied (as one log write) at this many entries or bytes, whichever
/// comes first: audit blocks are kilobytes each.
const BATCH_ENTRIES: usize = 10_000;
const BATCH_BYTES: usize = 4 << 20;

/// Sizes on disk around a compaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compacted {
    pub entries: u64,
    pub bytes_before: u64,
    /// The fresh copy's size.
    pub bytes_copied: u64,
    /// Whether the copy took the database's place (only when smaller).
    pub replaced: bool,
}

impl SledStore {
    /// Rewrites the stopped database at `path` into a fresh one and puts it in its
    /// place if it is smaller; `copied` is told how many entries have been copied so
    /// far. Blocking.
    pub fn compact(path: &Path, copied: &dyn Fn(u64)) -> Result<Compacted, StoreError> {
        let staging = staging_path(path);
        remove_if_present(&staging)?;
        let old = Self::open_database(path)?;
        let bytes_before = old.size_on_disk()?;
        let new = Self::database_config(&staging, crate::store::DEFAULT_CACHE_BYTES).open()?;
        let mut entries = 0u64;
        for name in old.tree_names() {
            let from = old.open_tree(&name)?;
            let to = new.open_tree(&name)?;
            let mut batch = ::sled::Batch::default();
            let (mut in_batch, mut batch_bytes) = (0, 0);
            for entry in from.iter() {
                let (key, value) = entry?;
                batch_bytes += key.len() + value.len();
                batch.insert(key, value);
                in_batch += 1;
                entries += 1;
                if in_batch == BATCH_ENTRIES || batch_bytes >= BATCH_BYTES {
                    to.apply_batch(std::mem::take(&mut batch))?;
                    (in_batch, batch_bytes) = (0, 0);
                    copied(entries);
                }
            }
            to.apply_batch(batch)?;
            copied(entries);
        }
        new.flush()?;
        let bytes_copied = new.size_on_disk()?;
        drop(new);
        drop(old);
        let replaced = bytes_copied < bytes_before;
        if replaced {
            exchange(path, &staging)?;
        }
        remove_if_present(&staging)?;
        Ok(Compacted {
            entries,
            bytes_before,
            bytes_copied,
            replaced,
        })
    }
}

/// Where the copy is built: beside the database, on the same file system.
fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".compacting");
    path.with_file_name(name)
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(StoreError::unavailable(BACKEND, e))
        }
        _ => Ok(()),
    }
}

/// Swaps two directories in one step, then makes the swap durable.
fn exchange(a: &Path, b: &Path) -> Result<(), StoreError> {
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|e| StoreError::unavailable(BACKEND, e))
    };
    let (a_c, b_c) = (c_path(a)?, c_path(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a_c.as_ptr(),
            libc::AT_FDCWD,
            b_c.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(StoreError::unavailable(
            BACKEND,
            std::io::Error::last_os_error(),
        ));
    }
    let parent = a.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(parent.unwrap_or(Path::new(".")))
        .and_then(|dir| dir.sync_all())
        .map_err(|e| StoreError::unavailable(BACKEND, e))
}
