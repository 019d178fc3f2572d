//! Group commit: one sled flush plus one fdatasync covers every write made before it, however
//! many callers wait. sled's `flush` writes with `sync_file_range`, which is not an fsync, and
//! `flush_async` deadlocks under concurrency (sled #1308); so a dedicated thread flushes with the
//! blocking call, then fdatasyncs sled's data file, then wakes every caller it covered.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use super::StoreError;

#[derive(Default)]
struct Progress {
    /// Commits asked for so far (a counter, not a queue).
    requested: u64,
    /// Commits made durable so far.
    done: u64,
    /// The last flush error and the highest commit it failed, reported to the callers it
    /// covered (unless a later flush succeeded for them).
    error: Option<String>,
    failed_through: u64,
    shutdown: bool,
    /// Flush rounds made, and the time spent in sled's flush and in fdatasync (µs).
    rounds: u64,
    flush_micros: u64,
    sync_micros: u64,
}

/// How group commit has gone so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub commits: u64,
    pub rounds: u64,
    pub flush_micros: u64,
    pub sync_micros: u64,
}

pub(crate) struct GroupCommit {
    state: Arc<(Mutex<Progress>, Condvar)>,
    /// Joined on drop, so that its handle on the database is gone when the store is.
    worker: Option<std::thread::JoinHandle<()>>,
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db, data_file: PathBuf) -> GroupCommit {
        let state = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let worker = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || flush_loop(&worker, &db, &data_file));
        let worker = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without the thread every commit would wait forever: fail them instead.
                let (lock, cvar) = &*state;
                if let Ok(mut p) = lock.lock() {
                    p.error = Some(format!("cannot start the commit thread: {e}"));
                    p.shutdown = true;
                }
                cvar.notify_all();
                None
            }
        };
        GroupCommit { state, worker }
    }

    /// Blocks until everything written before the call is on disk.
    pub(crate) fn wait(&self) -> Result<(), StoreError> {
        let (lock, cvar) = &*self.state;
        let poisoned = |_| StoreError::Io {
            path: PathBuf::from("<store>"),
            source: std::io::Error::other("commit state poisoned"),
        };
        let mut p = lock.lock().map_err(poisoned)?;
        p.requested += 1;
        let ticket = p.requested;
        cvar.notify_all();
        while p.done < ticket && p.failed_through < ticket && !p.shutdown {
            p = cvar.wait(p).map_err(poisoned)?;
        }
        if p.done >= ticket {
            return Ok(());
        }
        let why = p
            .error
            .clone()
            .unwrap_or_else(|| "the store is closing".to_string());
        Err(StoreError::Io {
            path: PathBuf::from("<store>"),
            source: std::io::Error::other(why),
        })
    }
}

impl GroupCommit {
    pub(crate) fn stats(&self) -> CommitStats {
        let (lock, _) = &*self.state;
        lock.lock()
            .map(|p| CommitStats {
                commits: p.done,
                rounds: p.rounds,
                flush_micros: p.flush_micros,
                sync_micros: p.sync_micros,
            })
            .unwrap_or_default()
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.state;
        if let Ok(mut p) = lock.lock() {
            p.shutdown = true;
        }
        cvar.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn flush_loop(state: &(Mutex<Progress>, Condvar), db: &sled::Db, data_file: &PathBuf) {
    let (lock, cvar) = state;
    loop {
        let target = {
            let Ok(mut p) = lock.lock() else { return };
            while p.requested == p.done && !p.shutdown {
                p = match cvar.wait(p) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            if p.shutdown && p.requested == p.done {
                let _ = db.flush();
                return;
            }
            p.requested
        };
        // Everything written before `target` was requested is covered by this flush.
        let started = std::time::Instant::now();
        let flushed = db.flush().map_err(|e| e.to_string());
        let flush_time = started.elapsed();
        let result = flushed.and_then(|_| {
            std::fs::File::open(data_file)
                .and_then(|f| f.sync_data())
                .map_err(|e| e.to_string())
        });
        let sync_time = started.elapsed() - flush_time;
        let Ok(mut p) = lock.lock() else { return };
        p.rounds += 1;
        p.flush_micros += flush_time.as_micros() as u64;
        p.sync_micros += sync_time.as_micros() as u64;
        match result {
            Ok(()) => p.done = target,
            Err(e) => {
                p.error = Some(e);
                p.failed_through = target; // wake them: they see the error
            }
        }
        cvar.notify_all();
    }
}
