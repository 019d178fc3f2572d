//! Group commit: one sled flush plus one fdatasync covers every write made before it, however
//! many callers wait. sled's `flush` writes with `sync_file_range`, which is not an fsync, and
//! `flush_async` deadlocks under concurrency (sled #1308); so a dedicated thread flushes with the
//! blocking call, then fdatasyncs sled's data file, then wakes every caller it covered — threads
//! through a condition variable, async tasks through a `watch` channel (no thread per waiter).

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

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

/// What async waiters watch.
#[derive(Debug, Clone, Default)]
struct Status {
    done: u64,
    failed_through: u64,
    error: Option<String>,
    closed: bool,
}

/// How group commit has gone so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    pub commits: u64,
    pub rounds: u64,
    pub flush_micros: u64,
    pub sync_micros: u64,
}

struct Shared {
    progress: Mutex<Progress>,
    /// The flush thread waits here for work …
    work: Condvar,
    /// … and blocking callers wait here for their flush.
    flushed: Condvar,
    status: watch::Sender<Status>,
}

pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    /// Joined on drop, so that its handle on the database is gone when the store is.
    worker: Option<std::thread::JoinHandle<()>>,
}

fn io_error(why: String) -> StoreError {
    StoreError::Io {
        path: PathBuf::from("<store>"),
        source: std::io::Error::other(why),
    }
}

impl GroupCommit {
    pub(crate) fn start(db: sled::Db, data_file: PathBuf) -> GroupCommit {
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress::default()),
            work: Condvar::new(),
            flushed: Condvar::new(),
            status: watch::Sender::new(Status::default()),
        });
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("store-commit".into())
            .spawn(move || flush_loop(&worker, &db, &data_file));
        let worker = match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                // Without the thread every commit would wait forever: fail them instead.
                if let Ok(mut p) = shared.progress.lock() {
                    p.error = Some(format!("cannot start the commit thread: {e}"));
                    p.shutdown = true;
                }
                shared.status.send_modify(|s| s.closed = true);
                shared.flushed.notify_all();
                None
            }
        };
        GroupCommit { shared, worker }
    }

    /// Takes a ticket: the commit number that must be durable for the caller.
    fn ticket(&self) -> Result<u64, StoreError> {
        let mut p = self
            .shared
            .progress
            .lock()
            .map_err(|_| io_error("commit state poisoned".into()))?;
        p.requested += 1;
        self.shared.work.notify_one();
        Ok(p.requested)
    }

    /// Blocks until everything written before the call is on disk.
    pub(crate) fn wait(&self) -> Result<(), StoreError> {
        let ticket = self.ticket()?;
        let poisoned = |_| io_error("commit state poisoned".into());
        let mut p = self.shared.progress.lock().map_err(poisoned)?;
        while p.done < ticket && p.failed_through < ticket && !p.shutdown {
            p = self.shared.flushed.wait(p).map_err(poisoned)?;
        }
        if p.done >= ticket {
            return Ok(());
        }
        Err(io_error(
            p.error
                .clone()
                .unwrap_or_else(|| "the store is closing".to_string()),
        ))
    }

    /// The same, for async callers: no thread is parked per waiter.
    pub(crate) async fn wait_async(&self) -> Result<(), StoreError> {
        let mut status = self.shared.status.subscribe();
        let ticket = self.ticket()?;
        loop {
            {
                let s = status.borrow_and_update();
                if s.done >= ticket {
                    return Ok(());
                }
                if s.failed_through >= ticket || s.closed {
                    return Err(io_error(
                        s.error
                            .clone()
                            .unwrap_or_else(|| "the store is closing".to_string()),
                    ));
                }
            }
            if status.changed().await.is_err() {
                return Err(io_error("the store is closing".to_string()));
            }
        }
    }

    pub(crate) fn stats(&self) -> CommitStats {
        self.shared
            .progress
            .lock()
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
        if let Ok(mut p) = self.shared.progress.lock() {
            p.shutdown = true;
        }
        self.shared.work.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        self.shared.status.send_modify(|s| s.closed = true);
        self.shared.flushed.notify_all();
    }
}

fn flush_loop(shared: &Shared, db: &sled::Db, data_file: &PathBuf) {
    loop {
        let target = {
            let Ok(mut p) = shared.progress.lock() else {
                return;
            };
            // Work is what was asked for beyond what a flush has answered (done or failed).
            while p.requested == p.done.max(p.failed_through) && !p.shutdown {
                p = match shared.work.wait(p) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            if p.shutdown && p.requested == p.done.max(p.failed_through) {
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
        let Ok(mut p) = shared.progress.lock() else {
            return;
        };
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
        let status = Status {
            done: p.done,
            failed_through: p.failed_through,
            error: p.error.clone(),
            closed: false,
        };
        drop(p);
        shared.status.send_replace(status);
        shared.flushed.notify_all();
    }
}
