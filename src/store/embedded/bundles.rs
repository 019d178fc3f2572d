//! The Bundle log: every accepted Bundle (LZ4), appended and never rewritten; sled keeps only
//! where each one is. A Bundle is written once and read once per delivery attempt, so it has
//! no business in sled's tree nodes, which sled rewrites as they change.
//!
//! The log is a directory of segments, `bundles/<offset>.log`, each named by the log offset of
//! its first byte: offsets run on across segments, so a Bundle's place (`BundleAt`) is one
//! number whatever segment holds it. The last segment takes the appends; once it has grown past
//! the segment size the next round's Bundles start a new one. Old segments go whole (`drop_below`),
//! oldest first, once nothing needs them (the store's retention sweep decides that): reading a
//! place below the oldest kept segment is `None`, not an error.
//!
//! Frame: `u32` length, `u32` CRC-32 of the payload, payload (little-endian). Only the writer
//! thread appends; anyone may read at an offset. A crash can leave a torn frame at the end: no
//! record points at it (the writer fdatasyncs the segment before the sled transaction that
//! refers to its frames), and appends simply go after it.
//!
//! Only the newest `OPEN_SEGMENTS` segments are kept open for reading (where the outbox reads);
//! an older one is opened for the read that needs it: a log of thousands of segments (a long
//! retention) does not hold thousands of file descriptors — running out of them would stop the
//! gateway accepting connections.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::SystemTime;

use crate::store::model::StoreError;

/// The segment map, whatever a panic elsewhere left it as (each change to it is one insert or
/// remove: it is never half made).
fn read(s: &Segments) -> RwLockReadGuard<'_, BTreeMap<u64, Option<Arc<File>>>> {
    s.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write(s: &Segments) -> RwLockWriteGuard<'_, BTreeMap<u64, Option<Arc<File>>>> {
    s.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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

/// The segments by their first offset; the newest `OPEN_SEGMENTS` open for reading.
type Segments = Arc<RwLock<BTreeMap<u64, Option<Arc<File>>>>>;

/// How many segments (the newest) stay open for reading.
const OPEN_SEGMENTS: usize = 8;

/// Closes the files of all but the newest `OPEN_SEGMENTS` segments (readers holding one keep
/// it until they are done).
fn close_older(segments: &mut BTreeMap<u64, Option<Arc<File>>>) {
    for file in segments.values_mut().rev().skip(OPEN_SEGMENTS) {
        if file.take().is_none() {
            // Older ones were closed before.
            break;
        }
    }
}

/// Reads at offsets, from any thread; drops old segments.
pub(crate) struct BundleLog {
    dir: PathBuf,
    segments: Segments,
    /// Bundles below this offset are expiring: a retention sweep is about to drop their
    /// segments, so they are no longer kept for a replay though still readable.
    expiring_below: AtomicU64,
}

/// The most buffer memory an appender keeps between appends.
const FRAMES_KEPT: usize = 4 << 20;

/// Appends: owned by the writer thread alone.
pub(crate) struct BundleAppender {
    dir: PathBuf,
    segments: Segments,
    segment_bytes: u64,
    /// The first offset of the segment appended to.
    start: u64,
    append: File,
    end: u64,
    /// The frames of one append, kept between appends: a round's Bundles are often over
    /// 128 KiB, and an allocation that large freed each round costs fresh (zeroed) pages.
    frames: Vec<u8>,
}

/// A closed segment (not the one appended to), oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub start: u64,
    /// Where the next segment starts.
    pub end: u64,
    /// When its last Bundle was appended.
    pub modified: SystemTime,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.log"))
}

/// Makes a directory's entries (a new, renamed or removed file) survive a power loss.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl BundleLog {
    /// Opens the log in `dir` (created if need be), with a new segment begun once the last one
    /// holds `segment_bytes`.
    pub(crate) fn open(
        dir: &Path,
        segment_bytes: u64,
    ) -> Result<(BundleLog, BundleAppender), StoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let start = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(start) = start {
                segments.insert(start, None);
            }
        }
        if segments.is_empty() {
            let path = segment_path(dir, 0);
            File::create(&path).map_err(io(&path))?;
            sync_dir(dir)?;
            segments.insert(0, None);
        }
        for (&start, file) in segments.iter_mut().rev().take(OPEN_SEGMENTS) {
            let path = segment_path(dir, start);
            *file = Some(Arc::new(File::open(&path).map_err(io(&path))?));
        }
        let start = segments
            .last_key_value()
            .map(|(&start, _)| start)
            .ok_or_else(|| io(dir)(std::io::Error::other("no segment")))?;
        let path = segment_path(dir, start);
        let end = start + std::fs::metadata(&path).map_err(io(&path))?.len();
        let append = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let segments = Arc::new(RwLock::new(segments));
        Ok((
            BundleLog {
                dir: dir.to_path_buf(),
                segments: Arc::clone(&segments),
                expiring_below: AtomicU64::new(0),
            },
            BundleAppender {
                dir: dir.to_path_buf(),
                segments,
                segment_bytes,
                start,
                append,
                end,
                frames: Vec::new(),
            },
        ))
    }

    /// The first offset of the segment holding `offset`, and its file if it is kept open;
    /// `None` below the oldest kept segment.
    fn segment(&self, offset: u64) -> Option<(u64, Option<Arc<File>>)> {
        let segments = read(&self.segments);
        let (&start, file) = segments.range(..=offset).next_back()?;
        Some((start, file.clone()))
    }

    /// Whether the Bundle at `at` is still kept for a replay: its segment is there and no
    /// sweep is about to drop it.
    pub(crate) fn keeps(&self, at: BundleAt) -> bool {
        at.offset >= self.expiring_below.load(Ordering::SeqCst) && self.segment(at.offset).is_some()
    }

    #[cfg(test)]
    fn open_files(&self) -> usize {
        read(&self.segments)
            .values()
            .filter(|f| f.is_some())
            .count()
    }

    /// Marks the Bundles below `offset` as expiring (never undone: segments only go).
    pub(crate) fn expire_below(&self, offset: u64) {
        self.expiring_below.fetch_max(offset, Ordering::SeqCst);
    }

    /// Reads (and checks) the Bundle at `at`; `None` when its segment was dropped.
    pub(crate) fn read(&self, key: &str, at: BundleAt) -> Result<Option<Vec<u8>>, StoreError> {
        let Some((start, file)) = self.segment(at.offset) else {
            return Ok(None);
        };
        let path = segment_path(&self.dir, start);
        let file = match file {
            Some(file) => file,
            None => match File::open(&path) {
                Ok(file) => Arc::new(file),
                // Dropped by a sweep since it was looked up.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io(&path)(e)),
            },
        };
        let mut frame = vec![0u8; HEADER + at.len as usize];
        file.read_exact_at(&mut frame, at.offset - start)
            .map_err(io(&path))?;
        let (header, payload) = frame.split_at(HEADER);
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len != at.len || crc != crc32fast::hash(payload) {
            return Err(StoreError::Corrupt {
                key: key.to_string(),
                source: serde::de::Error::custom(format!(
                    "the Bundle at offset {} of {} fails its check",
                    at.offset - start,
                    path.display()
                )),
            });
        }
        frame.drain(..HEADER);
        Ok(Some(frame))
    }

    /// The closed segments (all but the one appended to), oldest first.
    pub(crate) fn closed(&self) -> Result<Vec<Segment>, StoreError> {
        let starts: Vec<u64> = read(&self.segments).keys().copied().collect();
        let mut closed = Vec::new();
        for pair in starts.windows(2) {
            let (start, next) = (&pair[0], &pair[1]);
            let path = segment_path(&self.dir, *start);
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io(&path))?;
            closed.push(Segment {
                start: *start,
                end: *next,
                modified,
            });
        }
        Ok(closed)
    }

    /// Deletes the closed segments that end at or before `offset`; how many went.
    pub(crate) fn drop_below(&self, offset: u64) -> Result<usize, StoreError> {
        let gone: Vec<u64> = {
            let mut segments = write(&self.segments);
            let starts: Vec<u64> = segments.keys().copied().collect();
            // A segment ends where the next begins; the last one, appended to, never goes.
            let gone: Vec<u64> = starts
                .windows(2)
                .filter(|pair| pair[1] <= offset)
                .map(|pair| pair[0])
                .collect();
            for start in &gone {
                segments.remove(start);
            }
            gone
        };
        for start in &gone {
            let path = segment_path(&self.dir, *start);
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        if !gone.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(gone.len())
    }
}

impl BundleAppender {
    /// Appends `bundles` (already compressed) with one write and one fdatasync; returns where
    /// each one is, in order.
    pub(crate) fn append(&mut self, bundles: &[&[u8]]) -> Result<Vec<BundleAt>, StoreError> {
        if bundles.is_empty() {
            return Ok(Vec::new());
        }
        if self.end - self.start >= self.segment_bytes {
            self.roll()?;
        }
        let path = segment_path(&self.dir, self.start);
        let buf = &mut self.frames;
        buf.clear();
        buf.reserve(bundles.iter().map(|b| b.len() + HEADER).sum());
        let mut at = Vec::with_capacity(bundles.len());
        let mut offset = self.end;
        for b in bundles {
            let len = u32::try_from(b.len())
                .map_err(|_| io(&path)(std::io::Error::other("a Bundle over 4 GiB")))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(b).to_le_bytes());
            buf.extend_from_slice(b);
            at.push(BundleAt { offset, len });
            offset += (HEADER + b.len()) as u64;
        }
        let written = self
            .append
            .write_all(buf)
            .and_then(|_| self.append.sync_data());
        if let Err(e) = written {
            // A partial write may have moved the end: find it again, so that later offsets
            // stay right (the torn bytes are never pointed at).
            self.end = self
                .append
                .metadata()
                .map(|m| self.start + m.len())
                .unwrap_or(self.end);
            return Err(io(&path)(e));
        }
        self.end = offset;
        if self.frames.capacity() > FRAMES_KEPT {
            // A rare large append (a retention move) does not keep its memory.
            self.frames = Vec::new();
        }
        Ok(at)
    }

    /// Begins a new segment at the end of the log. A segment file of that name left empty by
    /// a roll that failed half-way is taken as it is; one with data would mean the log's end is
    /// not what it seems: an error.
    fn roll(&mut self) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, self.end);
        let append = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        if append.metadata().map_err(io(&path))?.len() != 0 {
            return Err(io(&path)(std::io::Error::other(
                "a new Bundle log segment already holds data",
            )));
        }
        sync_dir(&self.dir)?;
        let reader = File::open(&path).map_err(io(&path))?;
        {
            let mut segments = write(&self.segments);
            segments.insert(self.end, Some(Arc::new(reader)));
            close_older(&mut segments);
        }
        self.append = append;
        self.start = self.end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, segment_bytes: u64) -> (BundleLog, BundleAppender) {
        BundleLog::open(&dir.join("bundles"), segment_bytes).unwrap()
    }

    fn read(log: &BundleLog, at: BundleAt) -> Option<Vec<u8>> {
        log.read("k", at).unwrap()
    }

    #[test]
    fn appended_bundles_read_back_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut appender) = open(dir.path(), 1 << 20);
        let at = appender.append(&[b"first", b"second one"]).unwrap();
        assert_eq!(read(&log, at[0]).unwrap(), b"first");
        assert_eq!(read(&log, at[1]).unwrap(), b"second one");
        assert_eq!(BundleAt::from_bytes(&at[1].to_bytes()), Some(at[1]));
        assert_eq!(BundleAt::from_bytes(b"short"), None);

        // A torn frame at the end (a crash mid-append) is skipped by later appends.
        let path = segment_path(&dir.path().join("bundles"), 0);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[9, 0, 0, 0, 1])
            .unwrap();
        let (log, mut appender) = open(dir.path(), 1 << 20);
        let later = appender.append(&[b"after the tear"]).unwrap();
        assert_eq!(read(&log, later[0]).unwrap(), b"after the tear");
        assert_eq!(read(&log, at[0]).unwrap(), b"first");

        // A flipped byte fails the check.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let (log, _) = open(dir.path(), 1 << 20);
        assert!(matches!(
            log.read("a", at[0]),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn segments_roll_keep_their_offsets_and_go_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 10 bytes: every append after the first frame begins a new one.
        let (log, mut appender) = open(dir.path(), 10);
        let a = appender.append(&[b"aaaa", b"bbbb"]).unwrap();
        let c = appender.append(&[b"cccc"]).unwrap()[0];
        let d = appender.append(&[b"dddd"]).unwrap()[0];
        assert_eq!(
            (c.offset, d.offset),
            (24, 36),
            "offsets run on across segments"
        );
        let closed = log.closed().unwrap();
        let starts: Vec<u64> = closed.iter().map(|s| s.start).collect();
        assert_eq!(starts, vec![0, 24], "the segment appended to is not closed");
        assert_eq!(closed[0].end, 24);

        // Dropping below `c` takes the first segment only; its Bundles read as gone.
        assert_eq!(log.drop_below(c.offset).unwrap(), 1);
        assert_eq!(read(&log, a[0]), None);
        assert_eq!(read(&log, a[1]), None);
        assert_eq!(read(&log, c).unwrap(), b"cccc");
        // The segment appended to never goes.
        assert_eq!(log.drop_below(u64::MAX).unwrap(), 1);
        assert_eq!(read(&log, d).unwrap(), b"dddd");
        drop((log, appender));

        let (log, mut appender) = open(dir.path(), 10);
        assert_eq!(read(&log, d).unwrap(), b"dddd");
        assert_eq!(read(&log, c), None);
        let e = appender.append(&[b"eeee"]).unwrap()[0];
        assert_eq!(e.offset, 48);
        assert_eq!(read(&log, e).unwrap(), b"eeee");
    }

    #[test]
    fn only_the_newest_segments_stay_open_and_older_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let (log, mut appender) = open(dir.path(), 10);
        let n = OPEN_SEGMENTS * 3;
        let at: Vec<BundleAt> = (0..n)
            .map(|i| appender.append(&[format!("b{i:03}").as_bytes()]).unwrap()[0])
            .collect();
        assert_eq!(log.closed().unwrap().len(), n - 1, "one segment each");
        assert_eq!(log.open_files(), OPEN_SEGMENTS);
        for (i, at) in at.iter().enumerate() {
            assert_eq!(read(&log, *at).unwrap(), format!("b{i:03}").as_bytes());
        }
        // The same after a reopen; and a dropped old segment reads as gone.
        drop((log, appender));
        let (log, _appender) = open(dir.path(), 10);
        assert_eq!(log.open_files(), OPEN_SEGMENTS);
        assert_eq!(read(&log, at[1]).unwrap(), b"b001");
        assert_eq!(log.drop_below(at[2].offset).unwrap(), 2);
        assert_eq!(read(&log, at[1]), None);
        assert_eq!(
            read(&log, at[n - 1]).unwrap(),
            format!("b{:03}", n - 1).as_bytes()
        );
    }
}
