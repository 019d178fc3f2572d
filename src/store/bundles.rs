//! The Bundle log: every accepted Bundle (LZ4), appended to one file and never rewritten; sled
//! keeps only where each one is. A Bundle is written once and read once per delivery attempt,
//! so it has no business in sled's tree nodes, which sled rewrites as they change — keeping
//! them there cost about a sixth of the gateway's throughput (measured with the load bench).
//!
//! Frame: `u32` length, `u32` CRC-32 of the payload, payload (little-endian). Only the writer
//! thread appends; anyone may read at an offset. A crash can leave a torn frame at the end: no
//! record points at it (the writer fdatasyncs this file before the sled transaction that
//! refers to its frames), and appends simply go after it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::StoreError;

const HEADER: usize = 8;

/// Where a Bundle is in the log: what sled stores (12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BundleAt {
    pub offset: u64,
    pub len: u32,
}

impl BundleAt {
    /// The length of `to_bytes`.
    pub(crate) const LEN: usize = 12;

    pub(crate) fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<BundleAt> {
        let b: &[u8; Self::LEN] = b.try_into().ok()?;
        let (offset, len) = b.split_at(8);
        Some(BundleAt {
            offset: u64::from_le_bytes(offset.try_into().ok()?),
            len: u32::from_le_bytes(len.try_into().ok()?),
        })
    }
}

/// Reads at offsets, from any thread.
pub(crate) struct BundleLog {
    path: PathBuf,
    read: File,
}

/// Appends: owned by the writer thread alone.
pub(crate) struct BundleAppender {
    path: PathBuf,
    append: File,
    end: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl BundleLog {
    pub(crate) fn open(path: &Path) -> Result<(BundleLog, BundleAppender), StoreError> {
        let created = !path.exists();
        let append = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        if created {
            // The new file's name must survive a power loss too.
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(dir))?;
            }
        }
        let end = append.metadata().map_err(io(path))?.len();
        let read = File::open(path).map_err(io(path))?;
        let path = path.to_path_buf();
        Ok((
            BundleLog {
                path: path.clone(),
                read,
            },
            BundleAppender { path, append, end },
        ))
    }

    /// Reads (and checks) the Bundle at `at`.
    pub(crate) fn read(&self, key: &str, at: BundleAt) -> Result<Vec<u8>, StoreError> {
        let mut frame = vec![0u8; HEADER + at.len as usize];
        self.read
            .read_exact_at(&mut frame, at.offset)
            .map_err(io(&self.path))?;
        let (header, payload) = frame.split_at(HEADER);
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len != at.len || crc != crc32fast::hash(payload) {
            return Err(StoreError::Corrupt {
                key: key.to_string(),
                source: serde::de::Error::custom(format!(
                    "the Bundle at offset {} of {} fails its check",
                    at.offset,
                    self.path.display()
                )),
            });
        }
        frame.drain(..HEADER);
        Ok(frame)
    }
}

impl BundleAppender {
    /// Appends `bundles` (already compressed) with one write and one fdatasync; returns where
    /// each one is, in order.
    pub(crate) fn append(&mut self, bundles: &[&[u8]]) -> Result<Vec<BundleAt>, StoreError> {
        let mut buf = Vec::with_capacity(bundles.iter().map(|b| b.len() + HEADER).sum());
        let mut at = Vec::with_capacity(bundles.len());
        let mut offset = self.end;
        for b in bundles {
            let len = u32::try_from(b.len())
                .map_err(|_| io(&self.path)(std::io::Error::other("a Bundle over 4 GiB")))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(b).to_le_bytes());
            buf.extend_from_slice(b);
            at.push(BundleAt { offset, len });
            offset += (HEADER + b.len()) as u64;
        }
        if buf.is_empty() {
            return Ok(at);
        }
        let written = self
            .append
            .write_all(&buf)
            .and_then(|_| self.append.sync_data());
        if let Err(e) = written {
            // A partial write may have moved the end: find it again, so that later offsets
            // stay right (the torn bytes are never pointed at).
            self.end = self.append.metadata().map(|m| m.len()).unwrap_or(self.end);
            return Err(io(&self.path)(e));
        }
        self.end = offset;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_bundles_read_back_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundles.log");
        let (log, mut appender) = BundleLog::open(&path).unwrap();
        let at = appender.append(&[b"first", b"second one"]).unwrap();
        assert_eq!(log.read("a", at[0]).unwrap(), b"first");
        assert_eq!(log.read("b", at[1]).unwrap(), b"second one");
        assert_eq!(BundleAt::from_bytes(&at[1].to_bytes()), Some(at[1]));
        assert_eq!(BundleAt::from_bytes(b"short"), None);

        // A torn frame at the end (a crash mid-append) is skipped by later appends.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[9, 0, 0, 0, 1])
            .unwrap();
        let (log, mut appender) = BundleLog::open(&path).unwrap();
        let later = appender.append(&[b"after the tear"]).unwrap();
        assert_eq!(log.read("c", later[0]).unwrap(), b"after the tear");
        assert_eq!(log.read("a", at[0]).unwrap(), b"first");

        // A flipped byte fails the check.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (log, _) = BundleLog::open(&path).unwrap();
        assert!(matches!(
            log.read("a", at[0]),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
