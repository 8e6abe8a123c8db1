//! The process's sealing threads: where a stream's large DATA frames are
//! sealed when its writer is ahead of its cipher.
//!
//! A writer that copies faster than one core seals (AES-256-GCM runs at a
//! few GB/s per core, a memory copy at tens) would otherwise be the one
//! stage of the send path that runs on a single core. So a stream hands a
//! large frame, staged and copied into its DMA buffer, to these threads
//! while fewer than [`parallelism`] of its frames are being sealed here,
//! and seals the next one itself: with `n` cores, `n` frames of one stream
//! are sealed at once, and they reach the sender together, so a device
//! slower than the ciphers sees several SENDs queued per member LUN.
//!
//! The threads (one fewer than the CPUs the process may use, at most
//! [`MAX_THREADS`]) start on first use and then live as long as the
//! process, asleep on a condition variable while there is nothing to seal.
//! A frame's order on the wire does not depend on which thread sealed it
//! first: the connection sends staged frames in sequence order
//! ([`Connection::sealed`](crate::conn::Connection::sealed)).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;

/// The most sealing threads the process starts.
pub const MAX_THREADS: usize = 7;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    threads: usize,
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// How many sealing threads the process has (0 on a single CPU: a writer
/// then seals everything itself).
pub fn parallelism() -> usize {
    pool().threads
}

/// Runs `job` on a sealing thread; on a process without them, here.
pub(crate) fn spawn(job: impl FnOnce() + Send + 'static) {
    let pool = pool();
    if pool.threads == 0 {
        job();
        return;
    }
    pool.jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_back(Box::new(job));
    pool.ready.notify_one();
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get());
        let wanted = cpus.saturating_sub(1).min(MAX_THREADS);
        let mut started = 0;
        for i in 0..wanted {
            let spawned = thread::Builder::new()
                .name(format!("stp-seal-{i}"))
                .spawn(work);
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        Pool {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            threads: started,
        }
    })
}

fn work() {
    // The pool is being initialised by the thread that spawned this one;
    // `get_or_init` returns once it is.
    let pool = pool();
    let mut jobs = pool.jobs.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match jobs.pop_front() {
            Some(job) => {
                drop(jobs);
                // A job that panics must not take the thread with it (the
                // job's own guards report the failure).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                jobs = pool.jobs.lock().unwrap_or_else(|e| e.into_inner());
            }
            None => jobs = pool.ready.wait(jobs).unwrap_or_else(|e| e.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn every_job_runs_once() {
        let (tx, rx) = mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            spawn(move || tx.send(i).unwrap());
        }
        drop(tx);
        let mut got: Vec<i32> = rx.iter().collect();
        got.sort_unstable();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert!(parallelism() <= MAX_THREADS);
    }
}
