//! Audit blocks as the embedded stores keep them: one zstd frame (level 1) per block.
//!
//! Why: at a million keys the trail's blocks took 41% of their size so (354 MB of
//! blocks in 145 MB, median block two records; level 3 gained nothing more). redb does
//! not compress at all. sled compresses what it writes, so on its disk a frame takes
//! about what the block did (233 MB against 235 for a million keys' trail copied
//! into a fresh database), but sled holds each node it reads decoded, and a node of
//! frames is 41% of a node of blocks: a walk of that trail added 128 MB resident
//! instead of 307 (see the sled snapshot's `read_again`). Reads give back the block
//! as the trail wrote it.

use crate::store::StoreError;

/// No block the trail writes is larger (512 records of at most 64 KiB each).
const MAX_BLOCK_BYTES: u64 = 40 << 20;
/// How every zstd frame begins. A block as the trail writes it begins with its first
/// record's body length (a big-endian u32 under 64 KiB), so never with this.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

thread_local! {
    /// A zstd context per thread: making one allocates and clears several hundred KiB,
    /// which showed up in every append.
    static COMPRESSOR: std::cell::RefCell<zstd::block::Compressor> =
        std::cell::RefCell::new(zstd::block::Compressor::new());
    static DECOMPRESSOR: std::cell::RefCell<zstd::block::Decompressor> =
        std::cell::RefCell::new(zstd::block::Decompressor::new());
}

/// A block's stored form.
pub(crate) fn pack(block: &[u8]) -> Vec<u8> {
    COMPRESSOR.with(|compressor| {
        compressor
            .borrow_mut()
            .compress(block, 1)
            .expect("compressing into a buffer of the bound's size")
    })
}

/// The block a frame holds; anything else is corruption.
pub(crate) fn unpack(first_seq: u64, raw: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = |reason: String| StoreError::corrupt(format!("audit block {first_seq}"), reason);
    // The frame says how large it is; a size out of bounds is not trusted with memory.
    let size = zstd::zstd_safe::get_frame_content_size(raw);
    if size > MAX_BLOCK_BYTES {
        return Err(corrupt("not a zstd frame of a known size".into()));
    }
    DECOMPRESSOR
        .with(|decompressor| decompressor.borrow_mut().decompress(raw, size as usize))
        .map_err(|e| corrupt(e.to_string()))
}

/// [`unpack`] for a store whose older blocks were kept as written (sled before schema
/// 7): those come back unchanged, and the chain's own hashes check them.
pub(crate) fn unpack_either(first_seq: u64, raw: &[u8]) -> Result<Vec<u8>, StoreError> {
    if raw.starts_with(&ZSTD_MAGIC) {
        unpack(first_seq, raw)
    } else {
        Ok(raw.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_back_as_written_and_garbage_is_corrupt() {
        let block = b"\0\0\0\x05hello".repeat(100);
        assert_eq!(unpack(7, &pack(&block)).unwrap(), block);
        for garbage in [
            &b""[..],
            b"\0\0\0\x05hello",
            &[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff],
        ] {
            match unpack(7, garbage) {
                Err(StoreError::Corrupt { what, .. }) => assert_eq!(what, "audit block 7"),
                other => panic!("{garbage:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_block_kept_as_written_reads_as_it_is_and_a_broken_frame_is_corrupt() {
        let block = b"\0\0\0\x05hello".repeat(3);
        assert_eq!(unpack_either(7, &block).unwrap(), block);
        assert_eq!(unpack_either(7, &pack(&block)).unwrap(), block);
        assert!(matches!(
            unpack_either(7, &[0x28, 0xb5, 0x2f, 0xfd, 0xff, 0xff]),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
