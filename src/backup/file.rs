//! Writing a backup as a sequence of byte chunks (the server streams them), and reading
//! one back from a file.

use std::io::{BufRead, BufReader, Read, Write};

use sha2::{Digest, Sha256};

use super::{FORMAT_VERSION, Line, MAGIC, Manifest, Trailer};
use crate::store::{ItemCounts, StoreItem};

/// zstd's level for backups: fast enough to keep up with a snapshot's walk.
const LEVEL: i32 = 3;

/// Builds a backup file: the manifest, records, then the trailer. The compressed bytes
/// gather in the writer until the caller takes them to send on.
pub struct BackupWriter {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
    digest: Sha256,
    counts: ItemCounts,
}

impl BackupWriter {
    /// Starts a file with `manifest`.
    pub fn start(manifest: &Manifest) -> std::io::Result<Self> {
        let mut encoder = zstd::stream::write::Encoder::new(MAGIC.to_vec(), LEVEL)?;
        encoder.include_checksum(true)?;
        let mut writer = Self {
            encoder,
            digest: Sha256::new(),
            counts: ItemCounts::default(),
        };
        writer.line(&Line::Manifest(manifest.clone()))?;
        Ok(writer)
    }

    /// Adds a record.
    pub fn record(&mut self, item: StoreItem) -> std::io::Result<()> {
        self.counts.add(&item);
        self.line(&Line::Record(item))
    }

    /// Compressed bytes not taken yet.
    pub fn buffered(&self) -> usize {
        self.encoder.get_ref().len()
    }

    /// The compressed bytes produced since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.encoder.get_mut())
    }

    /// Adds the trailer and ends the stream; returns the bytes not taken yet and the
    /// counts.
    pub fn finish(mut self) -> std::io::Result<(Vec<u8>, ItemCounts)> {
        let trailer = Trailer {
            counts: self.counts.clone(),
            sha256: hex::encode(self.digest.clone().finalize()),
        };
        let json = serde_json::to_vec(&Line::Trailer(trailer)).expect("a trailer serializes");
        self.encoder.write_all(&json)?;
        self.encoder.write_all(b"\n")?;
        Ok((self.encoder.finish()?, self.counts))
    }

    fn line(&mut self, line: &Line) -> std::io::Result<()> {
        let mut json = serde_json::to_vec(line).expect("backup lines serialize");
        json.push(b'\n');
        self.digest.update(&json);
        self.encoder.write_all(&json)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read the backup: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a backup file of this service (it does not start with \"kms-backup 1\")")]
    NotABackup,
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("the backup has format version {0}; this build reads version {FORMAT_VERSION}")]
    UnknownFormat(u32),
}

/// Reads a backup: the manifest first, then records until the trailer, which is
/// checked against what was read.
pub struct BackupReader<R: Read> {
    lines: Lines<R>,
    pub manifest: Manifest,
}

/// The decompressed lines, the digest of those read and the counts of the records.
struct Lines<R: Read> {
    stream: BufReader<zstd::stream::read::Decoder<'static, BufReader<R>>>,
    digest: Sha256,
    counts: ItemCounts,
    line: Vec<u8>,
}

impl<R: Read> BackupReader<R> {
    pub fn open(mut input: R) -> Result<Self, ReadError> {
        let mut magic = vec![0; MAGIC.len()];
        if input.read_exact(&mut magic).is_err() || magic != MAGIC {
            return Err(ReadError::NotABackup);
        }
        let mut lines = Lines {
            stream: BufReader::new(zstd::stream::read::Decoder::new(input)?),
            digest: Sha256::new(),
            counts: ItemCounts::default(),
            line: Vec::new(),
        };
        match lines.next()? {
            Some(Line::Manifest(manifest)) if manifest.format != FORMAT_VERSION => {
                Err(ReadError::UnknownFormat(manifest.format))
            }
            Some(Line::Manifest(manifest)) => Ok(Self { lines, manifest }),
            _ => Err(ReadError::Damaged(
                "it does not begin with a manifest".into(),
            )),
        }
    }

    /// The next record; `None` once the trailer was read and matched.
    pub fn next_record(&mut self) -> Result<Option<StoreItem>, ReadError> {
        match self.lines.next()? {
            Some(Line::Record(item)) => {
                self.lines.counts.add(&item);
                Ok(Some(item))
            }
            Some(Line::Trailer(_)) => Ok(None),
            Some(Line::Manifest(_)) => Err(ReadError::Damaged("a second manifest".into())),
            None => Err(ReadError::Damaged("it ends before its trailer".into())),
        }
    }

    /// Reads every remaining record, only checking them; returns their counts.
    pub fn check_all(mut self) -> Result<ItemCounts, ReadError> {
        while self.next_record()?.is_some() {}
        Ok(self.lines.counts)
    }
}

fn unreadable(e: std::io::Error) -> ReadError {
    ReadError::Damaged(format!("the compressed stream is unreadable: {e}"))
}

impl<R: Read> Lines<R> {
    fn next(&mut self) -> Result<Option<Line>, ReadError> {
        self.line.clear();
        if self
            .stream
            .read_until(b'\n', &mut self.line)
            .map_err(unreadable)?
            == 0
        {
            return Ok(None);
        }
        let line: Line = serde_json::from_slice(&self.line)
            .map_err(|e| ReadError::Damaged(format!("a line does not parse: {e}")))?;
        if let Line::Trailer(trailer) = &line {
            if trailer.sha256 != hex::encode(self.digest.clone().finalize()) {
                return Err(ReadError::Damaged(
                    "its digest does not match its contents".into(),
                ));
            }
            if trailer.counts != self.counts {
                return Err(ReadError::Damaged("its record counts do not match".into()));
            }
            let mut rest = Vec::new();
            self.stream.read_to_end(&mut rest).map_err(unreadable)?;
            if !rest.is_empty() {
                return Err(ReadError::Damaged("bytes follow its trailer".into()));
            }
        } else {
            self.digest.update(&self.line);
        }
        Ok(Some(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ChainEnd;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            schema: 3,
            backend: "sled".into(),
            taken_at: 1,
            service_version: "test".into(),
            kek_label: "kek".into(),
            kek_check: crate::hsm::KekCheck {
                format: crate::hsm::WrapFormat::Rfc5649,
                value: [7; 8],
            },
        }
    }

    fn file(blocks: u64) -> Vec<u8> {
        let mut writer = BackupWriter::start(&manifest()).unwrap();
        let mut out = writer.take();
        writer
            .record(StoreItem::AuditChain {
                end: Some(ChainEnd {
                    seq: 9,
                    hash: [1; 32],
                }),
                anchor: None,
            })
            .unwrap();
        for seq in 0..blocks {
            let block = vec![seq as u8; 100];
            writer
                .record(StoreItem::AuditBlock {
                    first_seq: seq,
                    block,
                })
                .unwrap();
            // Taken part-way, as the server does.
            if writer.buffered() > 1000 {
                out.extend(writer.take());
            }
        }
        let (last, counts) = writer.finish().unwrap();
        assert_eq!(counts.audit_blocks, blocks);
        out.extend(last);
        out
    }

    #[test]
    fn a_written_file_reads_back_record_for_record() {
        let bytes = file(500);
        let mut reader = BackupReader::open(&bytes[..]).unwrap();
        assert_eq!(reader.manifest, manifest());
        let mut blocks = 0;
        while let Some(item) = reader.next_record().unwrap() {
            if let StoreItem::AuditBlock { first_seq, block } = item {
                assert_eq!(block, vec![first_seq as u8; 100]);
                blocks += 1;
            }
        }
        assert_eq!(blocks, 500);
    }

    #[test]
    fn a_cut_or_changed_file_is_refused() {
        let bytes = file(500);
        let cut = &bytes[..bytes.len() - 20];
        assert!(matches!(
            BackupReader::open(cut).and_then(BackupReader::check_all),
            Err(ReadError::Damaged(_))
        ));
        let mut changed = bytes.clone();
        let middle = changed.len() / 2;
        changed[middle] ^= 0x40;
        assert!(
            BackupReader::open(&changed[..])
                .and_then(BackupReader::check_all)
                .is_err()
        );
        assert!(matches!(
            BackupReader::open(&b"not a backup"[..]),
            Err(ReadError::NotABackup)
        ));
    }
}
