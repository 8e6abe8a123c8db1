//! The in-process front end: `scsi::Transport` straight into the array.
//!
//! A [`Host`] is one initiator port logged in to the array; it opens one
//! [`InProcTransport`] per LUN, as a host sees one `/dev/sgN` per LUN. Hosts
//! on different threads reach the same LUNs concurrently.
//!
//! Commands execute on the submitting thread unless a vendor handler holds
//! them; completions queue until [`reap`](scsi::Transport::reap). With
//! [`InProcOptions::reorder_seed`] each batch of completions is shuffled by a
//! seeded generator, so callers meet out-of-order completion repeatably.
//! With [`InProcOptions::shuffle_execution`] commands are not executed at
//! submission but queued, and run in a seeded random order when `reap` is
//! called, as a target that executes its task set in any order (SAM's
//! SIMPLE task attribute) would. A command that outlives its timeout
//! completes with [`CommandError::Timeout`] and, as with a real abort, its
//! buffer is not returned; a vendor handler still holding it sees
//! [`Reply::is_aborted`]. A timeout or wait of [`Duration::MAX`] (or any
//! too large to add to the clock) means "never".
//!
//! With [`InProcOptions::link_bytes_per_sec`] a path has a link of that
//! rate: a command reaches the array once its data-out has crossed it, one
//! command after another, so commands queue on the path as on a fabric
//! slower than the hosts.
//!
//! Data moves between the initiator's own [`IoBuf`] and the array, with no
//! buffer of the front end's in between. Per command the path allocates
//! only the boxed reply; the completion queue's storage and the abort
//! flags are reused from command to command.
//!
//! # The array's CPU time
//!
//! The array has no threads of its own here: it runs on the initiators'.
//! So that a benchmark can tell the hosts' cost from the array's, every
//! call into the array (a command's execution in `submit`, or the queued
//! commands `reap` runs) is timed by the calling thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`, one vDSO call pair per command) and added
//! to a process-wide total, [`array_cpu`]. A RECEIVE the mailbox holds and
//! another host's SEND completes is executed inside that SEND's submit, so
//! its cost lands there. What the array does on its own thread (the
//! mailbox's timer thread, which ends held RECEIVEs when their wait
//! expires) is not counted here, so a host-ends figure derived from this
//! errs against the hosts.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use scsi::transport::SubmitError;
use scsi::{
    Command, CommandError, Completion, DataDirection, DriverStatus, HostStatus, IoBuf, Outcome,
    ScsiStatus, Transport,
};

use crate::array::Array;
use crate::task::{InitiatorId, Reply, Task, TaskResult};

/// Nanoseconds of thread CPU time spent executing commands in the array,
/// summed over every in-process path of the process.
static ARRAY_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// CPU time the simulated array has spent executing commands submitted
/// through in-process paths, process-wide, since the process started
/// (monotonic: take it before and after a run and subtract). Measured on
/// the submitting threads, where the array runs (see the module's notes).
pub fn array_cpu() -> Duration {
    Duration::from_nanos(ARRAY_CPU_NS.load(Ordering::Relaxed))
}

/// This thread's CPU clock, nanoseconds (0 if it cannot be read).
fn thread_cpu_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// Runs `f` (a call into the array) and adds the thread CPU time it took to
/// [`array_cpu`].
fn in_array<R>(f: impl FnOnce() -> R) -> R {
    let t0 = thread_cpu_ns();
    let r = f();
    let spent = thread_cpu_ns().saturating_sub(t0);
    ARRAY_CPU_NS.fetch_add(spent, Ordering::Relaxed);
    r
}

/// Tunables of an in-process path.
#[derive(Clone, Debug)]
pub struct InProcOptions {
    /// Most commands in flight at once (like the 16 of an sg fd).
    pub queue_depth: usize,
    /// Shuffle each batch of completions with this seed.
    pub reorder_seed: Option<u64>,
    /// Do not execute commands inside `submit`: queue them, and when `reap`
    /// is called execute every queued command in a shuffled order (seeded
    /// with `reorder_seed`, or a fixed seed without one) before waiting.
    /// Models a target that executes the commands queued to it in any
    /// order. Off by default.
    pub shuffle_execution: bool,
    /// The path's link, in bytes per second: a command reaches the array
    /// only once its data-out has crossed the link, one command after
    /// another in submission order (data-in is not delayed), and until it
    /// has, it is in flight. Models a fabric slower than the array, where
    /// commands queue on each path. Commands in transit arrive when `reap`
    /// is called. `None` (the default): commands arrive at once.
    pub link_bytes_per_sec: Option<u64>,
}

impl Default for InProcOptions {
    fn default() -> Self {
        InProcOptions {
            queue_depth: 16,
            reorder_seed: None,
            shuffle_execution: false,
            link_bytes_per_sec: None,
        }
    }
}

/// The execution-order seed when [`InProcOptions::shuffle_execution`] is on
/// and no [`InProcOptions::reorder_seed`] is given.
const DEFAULT_EXECUTION_SEED: u64 = 0x5354_5045_5845_4331;

/// One initiator port logged in to an array.
#[derive(Clone, Debug)]
pub struct Host {
    array: Array,
    initiator: InitiatorId,
    name: String,
}

impl Host {
    /// Logs a new initiator called `name` in to `array` through target
    /// port 1 (in LIO's target port group 0, active/optimized, until moved).
    pub fn login(array: &Array, name: &str) -> Host {
        Host::login_through(array, name, 1)
    }

    /// Logs a new initiator called `name` in to `array` through relative
    /// target port `port`: another path to the same LUNs, subject to the
    /// ALUA state of the port's group ([`Array::set_alua_state`]).
    pub fn login_through(array: &Array, name: &str, port: u16) -> Host {
        Host {
            array: array.clone(),
            initiator: array.login_through(name, port),
            name: name.to_owned(),
        }
    }

    /// This host's initiator id.
    pub fn initiator(&self) -> InitiatorId {
        self.initiator
    }

    /// Opens a path to LUN `lun` with default options.
    pub fn open(&self, lun: u64) -> io::Result<InProcTransport> {
        self.open_with(lun, InProcOptions::default())
    }

    /// Opens a path to LUN `lun`.
    pub fn open_with(&self, lun: u64, options: InProcOptions) -> io::Result<InProcTransport> {
        if self.array.lun(lun).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "the simulated array has no LUN {lun} (it has {:?})",
                    self.array.lun_ids()
                ),
            ));
        }
        // The execution order gets its own generator, decorrelated from the
        // completion order's.
        let exec_seed = options
            .reorder_seed
            .map_or(DEFAULT_EXECUTION_SEED, |s| s ^ 0x9E37_79B9_7F4A_7C15);
        Ok(InProcTransport {
            array: self.array.clone(),
            initiator: self.initiator,
            lun,
            queue: Arc::new(DoneQueue::default()),
            pending: HashMap::new(),
            next_seq: 0,
            rng: options.reorder_seed.map(SmallRng::seed_from_u64),
            queued: Vec::new(),
            in_transit: VecDeque::new(),
            link_free: Instant::now(),
            exec_rng: SmallRng::seed_from_u64(exec_seed),
            options,
            name: format!("sim:{}/lun{lun}", self.name),
            spare: VecDeque::new(),
            flags: Vec::new(),
        })
    }
}

struct Done {
    seq: u64,
    buf: IoBuf,
    direction: DataDirection,
    result: TaskResult,
}

#[derive(Default)]
struct DoneQueue {
    done: Mutex<VecDeque<Done>>,
    ready: Condvar,
}

impl DoneQueue {
    fn push(&self, done: Done) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(done);
        self.ready.notify_all();
    }
}

struct InProcReply {
    seq: u64,
    buf: Option<IoBuf>,
    direction: DataDirection,
    queue: Arc<DoneQueue>,
    /// Set by the transport when it gives up on the command (timeout, or
    /// the transport is dropped); shared with its `Pending` entry.
    aborted: Arc<AtomicBool>,
}

impl InProcReply {
    fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }
}

impl Reply for InProcReply {
    fn data_len(&self) -> usize {
        match (self.direction, &self.buf) {
            (DataDirection::None, _) | (_, None) => 0,
            (_, Some(b)) => b.len(),
        }
    }

    fn read_out(&self, offset: usize, dst: &mut [u8]) -> usize {
        match (self.direction, &self.buf) {
            (DataDirection::ToDevice, Some(b)) => copy_at(&b[offset.min(b.len())..], dst),
            _ => 0,
        }
    }

    fn write_in(&mut self, offset: usize, src: &[u8]) -> usize {
        match (self.direction, &mut self.buf) {
            (DataDirection::FromDevice, Some(b)) => {
                let at = offset.min(b.len());
                copy_at(src, &mut b[at..])
            }
            _ => 0,
        }
    }

    fn complete(mut self: Box<Self>, result: TaskResult) {
        let buf = self.buf.take().unwrap_or_default();
        if self.aborted() {
            return; // nobody waits for it: the transport discarded the seq
        }
        self.queue.push(Done {
            seq: self.seq,
            buf,
            direction: self.direction,
            result,
        });
    }

    fn is_aborted(&self) -> bool {
        self.aborted()
    }
}

impl Drop for InProcReply {
    fn drop(&mut self) {
        // Dropped without completion (a handler bug or shutdown): the
        // initiator sees TASK ABORTED rather than waiting forever. An
        // aborted command is not waited for: dropping it is the handler's
        // right way to let go of it, and nothing is queued.
        if self.aborted() {
            return;
        }
        if let Some(buf) = self.buf.take() {
            self.queue.push(Done {
                seq: self.seq,
                buf,
                direction: self.direction,
                result: TaskResult::status(ScsiStatus::TASK_ABORTED),
            });
        }
    }
}

fn copy_at(src: &[u8], dst: &mut [u8]) -> usize {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

struct Pending {
    tag: u64,
    start: Instant,
    /// When the command times out; `None` for a timeout too large to
    /// represent (never).
    deadline: Option<Instant>,
    timeout: Duration,
    /// Shared with the command's reply: set when the command is given up.
    aborted: Arc<AtomicBool>,
}

/// Abort flags kept for reuse (more in flight at once than this are
/// allocated and freed).
const SPARE_FLAGS: usize = 64;

/// One host's path to one LUN of the simulated array.
pub struct InProcTransport {
    array: Array,
    initiator: InitiatorId,
    lun: u64,
    queue: Arc<DoneQueue>,
    pending: HashMap<u64, Pending>,
    next_seq: u64,
    rng: Option<SmallRng>,
    /// Submitted, not yet executed (with `shuffle_execution`).
    queued: Vec<Task>,
    /// Crossing the link (with `link_bytes_per_sec`): each command with the
    /// time its data-out is across, in submission order.
    in_transit: VecDeque<(Instant, Task)>,
    /// When the link is free for the next command's data.
    link_free: Instant,
    exec_rng: SmallRng,
    options: InProcOptions,
    name: String,
    /// The completion queue's other half: swapped with it to take a batch
    /// of completions, so neither is reallocated.
    spare: VecDeque<Done>,
    /// Abort flags of finished commands nothing else refers to any more.
    flags: Vec<Arc<AtomicBool>>,
}

impl Drop for InProcTransport {
    fn drop(&mut self) {
        // Nobody will reap what is still in flight: tell holding handlers.
        for p in self.pending.values() {
            p.aborted.store(true, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for InProcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcTransport")
            .field("name", &self.name)
            .field("in_flight", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl InProcTransport {
    /// The LUN this path reaches.
    pub fn lun(&self) -> u64 {
        self.lun
    }

    /// The array behind this path.
    pub fn array(&self) -> &Array {
        &self.array
    }

    fn finish(&mut self, done: Done, out: &mut Vec<Completion>) -> bool {
        let Some(mut p) = self.pending.remove(&done.seq) else {
            return false; // timed out earlier: its completion is discarded
        };
        // The reply is gone (or going): once nothing else holds the flag,
        // the next command may have it.
        if self.flags.len() < SPARE_FLAGS {
            if let Some(flag) = Arc::get_mut(&mut p.aborted) {
                *flag.get_mut() = false;
                self.flags.push(p.aborted.clone());
            }
        }
        let r = done.result;
        let residual = match done.direction {
            DataDirection::FromDevice => done.buf.len().saturating_sub(r.data_in),
            _ => 0,
        };
        let outcome = Outcome {
            status: r.status,
            host_status: HostStatus::OK,
            driver_status: if r.sense.is_some() {
                DriverStatus::SENSE
            } else {
                DriverStatus::OK
            },
            sense: r.sense.map(|s| s.to_bytes()).unwrap_or_default(),
            residual: u32::try_from(residual).unwrap_or(u32::MAX),
            duration: p.start.elapsed(),
        };
        out.push(Completion {
            tag: p.tag,
            data: done.buf,
            result: Ok(outcome),
        });
        true
    }

    fn expire(&mut self, now: Instant, out: &mut Vec<Completion>) -> usize {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &expired {
            if let Some(p) = self.pending.remove(seq) {
                // A handler holding the command learns it is gone.
                p.aborted.store(true, Ordering::Release);
                out.push(Completion {
                    tag: p.tag,
                    data: IoBuf::default(),
                    result: Err(CommandError::Timeout(p.timeout)),
                });
            }
        }
        expired.len()
    }

    /// Executes the commands whose data has crossed the link by `now`.
    fn run_arrived(&mut self, now: Instant) {
        while self.in_transit.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, task)) = self.in_transit.pop_front() {
                in_array(|| self.array.submit(task));
            }
        }
    }

    /// Executes the commands `submit` queued, in a shuffled order.
    fn run_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let mut tasks = std::mem::take(&mut self.queued);
        tasks.shuffle(&mut self.exec_rng);
        let array = &self.array;
        in_array(|| {
            for task in tasks {
                array.submit(task);
            }
        });
    }
}

impl Transport for InProcTransport {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        if self.pending.len() >= self.options.queue_depth {
            return Err(SubmitError {
                error: CommandError::Io(io::Error::other(format!(
                    "{} already has {} commands in flight (its queue depth)",
                    self.name, self.options.queue_depth
                ))),
                cmd: Box::new(cmd),
            });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let start = Instant::now();
        let aborted = self
            .flags
            .pop()
            .unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
        self.pending.insert(
            seq,
            Pending {
                tag: cmd.tag,
                start,
                deadline: start.checked_add(cmd.timeout),
                timeout: cmd.timeout,
                aborted: aborted.clone(),
            },
        );
        let reply = InProcReply {
            seq,
            buf: Some(cmd.data),
            direction: cmd.direction,
            queue: self.queue.clone(),
            aborted,
        };
        let task = Task {
            initiator: self.initiator,
            lun: self.lun,
            cdb: cmd.cdb,
            direction: cmd.direction,
            reply: Box::new(reply),
        };
        if let Some(rate) = self.options.link_bytes_per_sec.filter(|&r| r > 0) {
            let bytes = match task.direction {
                DataDirection::ToDevice => task.reply.data_len(),
                _ => 0,
            };
            let crossing = Duration::from_secs_f64(bytes as f64 / rate as f64);
            let arrives = self.link_free.max(start) + crossing;
            self.link_free = arrives;
            self.in_transit.push_back((arrives, task));
        } else if self.options.shuffle_execution {
            self.queued.push(task);
        } else {
            in_array(|| self.array.submit(task));
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let first = out.len();
        self.run_queued();
        self.run_arrived(Instant::now());
        // No give-up time: wait as long as it takes (`None`, or a wait too
        // long to add to the clock).
        let give_up = wait.and_then(|w| Instant::now().checked_add(w));
        let queue = self.queue.clone();
        while !self.pending.is_empty() {
            let mut batch = std::mem::take(&mut self.spare);
            {
                let mut q = queue.done.lock().unwrap_or_else(|e| e.into_inner());
                if q.is_empty() {
                    let now = Instant::now();
                    let next_deadline = self
                        .pending
                        .values()
                        .filter_map(|p| p.deadline)
                        .chain(self.in_transit.front().map(|(at, _)| *at))
                        .min();
                    let until = match (give_up, next_deadline) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match until {
                        Some(until) if until > now => {
                            q = queue
                                .ready
                                .wait_timeout(q, until - now)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                        Some(_) => {}
                        // Neither a give-up time nor a deadline: only a
                        // completion ends the wait.
                        None => q = queue.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
                    }
                }
                std::mem::swap(&mut *q, &mut batch);
            }
            for done in batch.drain(..) {
                self.finish(done, out);
            }
            self.spare = batch;
            let now = Instant::now();
            self.expire(now, out);
            self.run_arrived(now);
            if out.len() > first || give_up.is_some_and(|g| now >= g) {
                break;
            }
        }
        if let Some(rng) = &mut self.rng {
            out[first..].shuffle(rng);
        }
        Ok(out.len() - first)
    }

    fn in_flight(&self) -> usize {
        self.pending.len()
    }

    fn queue_depth(&self) -> usize {
        self.options.queue_depth
    }

    fn describe(&self) -> String {
        format!("{} (in-process)", self.name)
    }
}

#[cfg(test)]
mod tests {
    use scsi::CdbBuf;

    use super::*;
    use crate::LunConfig;

    #[test]
    fn abort_flags_and_completion_storage_are_reused() {
        let a = Array::new();
        a.add_lun(0, LunConfig::new(0, 2048, 512)).unwrap();
        let mut t = Host::login(&a, "h").open(0).unwrap();
        let tur = || Command::no_data(CdbBuf::new(&[0u8; 6]).unwrap());
        let mut out = Vec::new();
        for round in 0..10 {
            // Four in flight at once, then all reaped.
            for _ in 0..4 {
                t.submit(tur()).unwrap();
            }
            out.clear();
            while out.len() < 4 {
                t.reap(&mut out, None).unwrap();
            }
            assert!(out.iter().all(|c| c
                .result
                .as_ref()
                .is_ok_and(|o| o.status == ScsiStatus::GOOD)));
            assert_eq!(t.flags.len(), 4, "round {round}");
            assert!(t.flags.iter().all(|f| !f.load(Ordering::Relaxed)));
            assert!(t.spare.is_empty() && t.spare.capacity() >= 4);
        }
    }

    #[test]
    fn array_cpu_is_counted_at_submission() {
        let a = Array::new();
        a.add_lun(0, LunConfig::new(0, 1 << 14, 512)).unwrap();
        let mut t = Host::login(&a, "h").open(0).unwrap();
        let before = array_cpu();
        // 4 MiB of WRITE(10)s: the array copies every byte on this thread.
        let mut out = Vec::new();
        for i in 0..64u32 {
            let lba = (i % 64) * 128;
            let mut cdb = [0u8; 10];
            cdb[0] = 0x2A;
            cdb[2..6].copy_from_slice(&lba.to_be_bytes());
            cdb[7..9].copy_from_slice(&128u16.to_be_bytes());
            let cmd = Command::data_out(CdbBuf::new(&cdb).unwrap(), IoBuf::new(64 << 10));
            t.submit(cmd).unwrap();
            out.clear();
            t.reap(&mut out, None).unwrap();
        }
        assert!(array_cpu() > before, "no array CPU time counted");
    }

    #[test]
    fn commands_wait_for_their_data_to_cross_the_link() {
        let a = Array::new();
        a.add_lun(0, LunConfig::new(0, 1 << 14, 512)).unwrap();
        // 64 KiB per second: a 32 KiB WRITE takes half a second to cross.
        let link = InProcOptions {
            link_bytes_per_sec: Some(64 << 10),
            ..InProcOptions::default()
        };
        let mut t = Host::login(&a, "h").open_with(0, link).unwrap();
        let write = |lba: u32| {
            let mut cdb = [0u8; 10];
            cdb[0] = 0x2A;
            cdb[2..6].copy_from_slice(&lba.to_be_bytes());
            cdb[7..9].copy_from_slice(&64u16.to_be_bytes());
            Command::data_out(CdbBuf::new(&cdb).unwrap(), IoBuf::new(32 << 10)).with_tag(lba.into())
        };
        let t0 = Instant::now();
        t.submit(write(0)).unwrap();
        t.submit(write(64)).unwrap();
        let mut out = Vec::new();
        assert_eq!(t.reap(&mut out, Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(t.in_flight(), 2, "both are on the link");
        // One after the other: the first at 0.5 s, the second at 1 s.
        t.reap(&mut out, None).unwrap();
        assert_eq!((out.len(), out[0].tag), (1, 0));
        assert!(t0.elapsed() >= Duration::from_millis(500));
        t.reap(&mut out, None).unwrap();
        assert_eq!((out.len(), out[1].tag), (2, 64));
        assert!(t0.elapsed() >= Duration::from_secs(1));
        for c in &out {
            c.result.as_ref().unwrap().check().unwrap();
        }
    }

    #[test]
    fn a_stall_delays_the_command_that_begins_it_and_then_disarms() {
        let a = Array::new();
        a.add_lun(0, LunConfig::new(0, 2048, 512)).unwrap();
        let mut t = Host::login(&a, "h").open(0).unwrap();
        let tur = || Command::no_data(CdbBuf::new(&[0u8; 6]).unwrap());
        let stall = Duration::from_millis(30);
        a.stall_after(2, stall);
        let mut out = Vec::new();
        let mut took = Vec::new();
        for _ in 0..4 {
            let t0 = Instant::now();
            t.submit(tur()).unwrap();
            out.clear();
            t.reap(&mut out, None).unwrap();
            took.push(t0.elapsed());
            assert!(out[0]
                .result
                .as_ref()
                .is_ok_and(|o| o.status == ScsiStatus::GOOD));
        }
        // The third command begins the stall and waits it out (a lower
        // bound only: sleeping never ends early).
        assert!(took[2] >= stall, "{took:?}");
        assert!(!a.stall_armed(), "the stall stays armed after it ended");
    }
}
