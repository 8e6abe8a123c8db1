//! One TCMU device: opening its ring (resetting a ring a dead daemon left
//! commands in), the [`Reply`] whose data is the command's data area,
//! completion from any thread, and the serving loop.
//!
//! ```text
//!  device thread:  poll(uio) ─▶ read(4) ─▶ Ring::read_new ─▶ Task ─▶ Array::submit
//!                                                        (held: mailbox)
//!  any thread:     TcmuReply::complete ─▶ lock ─▶ Ring::complete_at(cmd_tail) ─▶ write(uio, 1)
//! ```
//!
//! Lock discipline: the device's mutex covers the ring's write side
//! (`cmd_tail`, the read position the tail may not pass, the in-flight
//! count); it is a leaf lock, held only while a completion is written.
//! The kick (`write()` to the uio fd) happens after it is released, and is
//! deferred to the end of the batch when the device thread itself
//! completes commands while it dispatches a batch.
//!
//! No per-command buffers: command data is read and written in place in
//! the ring's data area through the entry's iovecs, and the vectors that
//! hold those iovecs (and the batch of entries) are reused: a reply gives
//! its iovec vector back to the device when it is dropped (a leaf lock of
//! its own, held for a push or pop).

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use scsi::{Asc, DataDirection, ScsiStatus, Sense, SenseKey};

use super::discover::{self, Found, UioName};
use super::ring::{BadCommand, Batch, Command, Entry, Iov, Region, Response, Ring, RingError};
use super::{Log, Shared};
use crate::task::{InitiatorId, Reply, Task, TaskResult};

/// How long the device thread waits in `poll` before looking at the stop
/// flag again.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Iovec vectors a device keeps for reuse (about the most commands LIO
/// queues to a device at once); more are freed.
const SPARE_IOVS: usize = 256;

/// The LUN number used for a device whose cfg is unusable: no array has
/// it, so every command is answered as for a LUN that does not exist.
pub(crate) const NO_LUN: u64 = u64::MAX;

/// Where a device's commands go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    /// The array LUN ([`NO_LUN`] for an unusable cfg).
    pub lun: u64,
    /// The initiator the commands are from.
    pub initiator: InitiatorId,
    /// For the state file and the log: `lun=… initiator=…`.
    pub describe: String,
}

/// The write side of the ring, under the device's lock.
#[derive(Debug)]
struct State {
    /// Our `cmd_tail` (only we write it).
    tail: u32,
    /// How far the device thread has read: completions never pass it.
    read: u32,
    /// Bumped by a ring reset: replies of an older generation belong to
    /// commands the reset failed, and complete nowhere.
    generation: u64,
    /// Commands read and not yet completed.
    in_flight: usize,
    /// The thread dispatching a batch, whose own completions defer the kick.
    batch_owner: Option<ThreadId>,
    kick_pending: bool,
}

/// One TCMU device being served.
#[derive(Debug)]
pub(crate) struct Device {
    /// The uio node (`uio3`).
    pub uio: String,
    /// The uio name's parts.
    pub name: UioName,
    /// Where commands go.
    pub route: Route,
    ring: Ring,
    /// The uio fd (`None` in tests: kicks are only counted).
    fd: Option<OwnedFd>,
    state: Mutex<State>,
    idle: Condvar,
    kicks: AtomicU64,
    /// Set when a completion found the ring in a state it cannot write:
    /// the device thread resets the ring.
    needs_reset: AtomicBool,
    /// Used iovec vectors, given back by dropped replies (a leaf lock).
    spare_iovs: Mutex<Vec<Vec<Iov>>>,
    /// The batch the device thread reads into, kept for its capacity.
    batch: Mutex<Batch>,
    log: Log,
}

impl Device {
    /// A device over `ring` that reads from `start.read` and completes
    /// at `start.tail`.
    pub(crate) fn new(
        uio: String,
        name: UioName,
        route: Route,
        ring: Ring,
        fd: Option<OwnedFd>,
        start: Start,
        log: Log,
    ) -> Device {
        let Start { tail, read } = start;
        Device {
            uio,
            name,
            route,
            ring,
            fd,
            state: Mutex::new(State {
                tail,
                read,
                generation: 0,
                in_flight: 0,
                batch_owner: None,
                kick_pending: false,
            }),
            idle: Condvar::new(),
            kicks: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
            spare_iovs: Mutex::new(Vec::new()),
            batch: Mutex::new(Batch {
                entries: Vec::new(),
                next: 0,
                error: None,
            }),
            log,
        }
    }

    /// A used iovec vector, or a new one.
    fn take_iovs(&self) -> Vec<Iov> {
        let mut spare = self.spare_iovs.lock().unwrap_or_else(|e| e.into_inner());
        spare.pop().unwrap_or_default()
    }

    /// Keeps `iovs`' allocation for a later command (up to [`SPARE_IOVS`]).
    fn give_iovs(&self, iovs: Vec<Iov>) {
        if iovs.capacity() == 0 {
            return;
        }
        let mut spare = self.spare_iovs.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < SPARE_IOVS {
            spare.push(iovs);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the device thread starts reading.
    pub(crate) fn read_position(&self) -> u32 {
        self.lock().read
    }

    /// Commands read and not yet completed.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Kicks the kernel has been given.
    #[cfg(test)]
    pub(crate) fn kicks(&self) -> u64 {
        self.kicks.load(Ordering::Relaxed)
    }

    /// Waits until no command is in flight, or `deadline`; returns how many
    /// are left.
    pub(crate) fn wait_idle(&self, deadline: Instant) -> usize {
        let mut st = self.lock();
        while st.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .idle
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.in_flight
    }

    /// Tells the kernel to look at `cmd_tail` (`write()` of a 32-bit 1 to
    /// the uio fd runs the kernel's completion handling).
    pub(crate) fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
        if let Some(fd) = &self.fd {
            // A device removed meanwhile refuses the write: nothing to do.
            let _ = nix::unistd::write(fd.as_fd(), &1u32.to_ne_bytes());
        }
    }

    /// Writes a completion at `cmd_tail` and kicks the kernel (or, on the
    /// device thread inside a batch, leaves the kick to the batch's end).
    fn complete(&self, generation: u64, rsp: &Response<'_>) {
        let kick = {
            let mut st = self.lock();
            if st.generation != generation {
                // The ring was reset since: the kernel failed the command.
                return;
            }
            match self.ring.complete_at(st.tail, st.read, rsp) {
                Ok(tail) => st.tail = tail,
                Err(e) => {
                    self.log.error(format_args!(
                        "{}: cannot complete command {}: {e}",
                        self.name.backstore, rsp.cmd_id
                    ));
                    self.needs_reset.store(true, Ordering::Release);
                }
            }
            st.in_flight = st.in_flight.saturating_sub(1);
            if st.in_flight == 0 {
                self.idle.notify_all();
            }
            if st.batch_owner == Some(std::thread::current().id()) {
                st.kick_pending = true;
                false
            } else {
                true
            }
        };
        if kick {
            self.kick();
        }
    }

    /// Reads what the kernel queued since `next` into `batch` and
    /// publishes the new read position (so completions may use those
    /// slots). Returns the generation the commands belong to.
    fn take(&self, next: &mut u32, batch: &mut Batch) -> u64 {
        self.ring
            .read_new_into(*next, batch, &mut || self.take_iovs());
        let commands = batch
            .entries
            .iter()
            .filter(|e| !matches!(e, Entry::Skip { .. }))
            .count();
        let generation = {
            let mut st = self.lock();
            st.read = batch.next;
            st.in_flight += commands;
            st.generation
        };
        *next = batch.next;
        generation
    }

    /// [`take`](Self::take) into a new batch: (entries, error, generation).
    #[cfg(test)]
    fn take_all(&self, next: &mut u32) -> (Vec<Entry>, Option<RingError>, u64) {
        let mut batch = Batch {
            entries: Vec::new(),
            next: *next,
            error: None,
        };
        let generation = self.take(next, &mut batch);
        (batch.entries, batch.error, generation)
    }

    fn begin_batch(&self) {
        self.lock().batch_owner = Some(std::thread::current().id());
    }

    fn end_batch(&self) {
        let pending = {
            let mut st = self.lock();
            st.batch_owner = None;
            std::mem::take(&mut st.kick_pending)
        };
        if pending {
            self.kick();
        }
    }

    /// Resets the ring through configfs after the ring was found corrupt:
    /// the kernel fails every outstanding command (BUSY), commands still
    /// held here complete nowhere. Returns the new read position, or an
    /// error if the ring could not be reset (then it cannot be served).
    fn recover(&self, configfs: &Path) -> io::Result<u32> {
        let mut st = self.lock();
        let start = reset_and_restart(configfs, &self.name, &self.ring)?;
        st.generation += 1;
        st.in_flight = 0;
        st.tail = start.tail;
        st.read = start.read;
        self.idle.notify_all();
        self.needs_reset.store(false, Ordering::Release);
        Ok(start.read)
    }
}

/// Where a device starts: the `cmd_tail` it completes at and the ring
/// offset it reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Start {
    /// Our `cmd_tail`.
    pub tail: u32,
    /// The first entry to read.
    pub read: u32,
}

/// Resets the ring and returns where to start: at 0, where the kernel
/// restarts the ring. Not at the current `cmd_head`: once the device is
/// unblocked, new commands are queued from 0 at once, and they must be
/// executed, not skipped. The reset zeroes `cmd_tail`, which only the
/// daemon writes otherwise, so a tail that is not 0 afterwards means the
/// reset did not happen.
fn reset_and_restart(configfs: &Path, name: &UioName, ring: &Ring) -> io::Result<Start> {
    reset_ring(configfs, name)?;
    match ring.tail() {
        0 => Ok(Start { tail: 0, read: 0 }),
        tail => Err(io::Error::other(format!(
            "cmd_tail is {tail} after the reset, not 0"
        ))),
    }
}

/// Resets a TCMU ring through configfs, as the kernel's `tcmu_reset_ring`
/// offers it: `block_dev` 1 (new commands fail BUSY; completions already
/// published before `cmd_tail` are handled), `reset_ring` 1 (every command
/// on the ring fails back to its initiator with BUSY, a retryable status;
/// 2 would fail them with CHECK CONDITION), `block_dev` 0. Afterwards
/// `cmd_head` = `cmd_tail` = 0.
pub(crate) fn reset_ring(configfs: &Path, name: &UioName) -> io::Result<()> {
    let dir = configfs
        .join("target/core")
        .join(format!("user_{}", name.hba))
        .join(&name.backstore)
        .join("action");
    let write = |file: &str, value: &str| {
        fs::write(dir.join(file), value)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
    };
    write("block_dev", "1")?;
    let reset = write("reset_ring", "1");
    // Unblock whatever the reset did.
    let unblock = write("block_dev", "0");
    reset.and(unblock)
}

/// Opens, maps and attaches to a device. A ring with commands between
/// `cmd_tail` and `cmd_head` (a daemon died) is reset first: with
/// out-of-order completion some of those may already have been completed,
/// and re-executing them would complete unknown ids and break the ring.
pub(crate) fn open(
    found: &Found,
    shared: &Shared,
    route: impl FnOnce() -> Route,
) -> Result<Device, String> {
    let size = discover::map_size(&shared.sysfs, &found.uio).map_err(|e| e.to_string())?;
    let node = shared.dev.join(&found.uio);
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc_flags())
        .open(&node)
        .map_err(|e| format!("open {}: {e}", node.display()))?;
    let fd = OwnedFd::from(file);
    let region = Region::map(fd.as_fd(), size)
        .map_err(|e| format!("mmap {} ({size} bytes): {e}", node.display()))?;
    let ring = Ring::new(region).map_err(|e| e.to_string())?;
    let log = shared.log;
    // The tail first: only a daemon moves it, while the kernel may move
    // the head at any time (a fresh ring has head = tail).
    let tail = ring.tail();
    let head = ring.head();
    let sane = |v: u32| v < ring.cmdr_size() && v % 8 == 0;
    let mut start = Start { tail, read: head };
    if head != tail || !sane(head) || !sane(tail) {
        let name = &found.name.backstore;
        log.warn(format_args!(
            "{name}: ring has commands left by a previous daemon (cmd_head {head}, cmd_tail {tail}): \
             blocking the device, resetting the ring (the kernel fails them BUSY), unblocking"
        ));
        match reset_and_restart(&shared.configfs, &found.name, &ring) {
            Ok(s) => {
                log.warn(format_args!(
                    "{name}: ring reset; starting at offset 0 (cmd_head is now {})",
                    ring.head()
                ));
                start = s;
            }
            Err(e) => {
                log.error(format_args!("{name}: cannot reset the ring: {e}"));
                let (tail, head) = (ring.tail(), ring.head());
                if !sane(head) || !sane(tail) {
                    return Err(format!(
                        "unusable ring (cmd_head {head}, cmd_tail {tail}) and no reset"
                    ));
                }
                // Not reset: start reading at cmd_head. The commands before
                // it are never executed (the kernel times them out after its
                // cmd_time_out); their slots are reused for completions.
                log.error(format_args!(
                    "{name}: skipping the {} bytes of commands between cmd_tail and cmd_head; \
                     the kernel will time them out",
                    ring.distance(tail, head)
                ));
                start = Start { tail, read: head };
            }
        }
    }
    let device = Device::new(
        found.uio.clone(),
        found.name.clone(),
        route(),
        ring,
        Some(fd),
        start,
        log,
    );
    // Let the kernel reap anything a previous daemon published without a kick.
    device.kick();
    Ok(device)
}

/// `O_CLOEXEC | O_NONBLOCK` (a spurious wake-up must not block in `read`).
fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).bits()
}

/// The reply of a command read from the ring: its data is the command's
/// data area (the entry's iovecs), its completion goes back to the ring.
pub(crate) struct TcmuReply {
    dev: Arc<Device>,
    generation: u64,
    cmd_id: u16,
    direction: DataDirection,
    iovs: Vec<Iov>,
    /// Data bytes (0 for a command without a data phase).
    len: usize,
    done: bool,
}

impl TcmuReply {
    fn new(dev: Arc<Device>, generation: u64, cmd: Command, direction: DataDirection) -> TcmuReply {
        let len = match direction {
            DataDirection::None => 0,
            _ => cmd.data_len(),
        };
        TcmuReply {
            dev,
            generation,
            cmd_id: cmd.cmd_id,
            direction,
            iovs: cmd.iovs,
            len,
            done: false,
        }
    }

    /// Calls `f(map offset, buffer range)` for each data segment covering
    /// `n` bytes from `offset`; stops when `f` fails. Returns bytes covered.
    fn walk(
        &self,
        offset: usize,
        n: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> usize {
        let n = n.min(self.len.saturating_sub(offset));
        let mut skip = offset;
        let mut done = 0;
        for iov in &self.iovs {
            if done == n {
                break;
            }
            let l = iov.len as usize;
            if skip >= l {
                skip -= l;
                continue;
            }
            let take = (l - skip).min(n - done);
            if !f(iov.off + skip as u64, done..done + take) {
                break;
            }
            done += take;
            skip = 0;
        }
        done
    }

    fn finish(&self, result: &TaskResult) {
        let sense = result
            .sense
            .as_ref()
            .map(Sense::to_bytes)
            .unwrap_or_default();
        let mut read_len = None;
        if self.direction == DataDirection::FromDevice
            && self.len > 0
            && result.status != ScsiStatus::CHECK_CONDITION
        {
            let n = result.data_in.min(self.len);
            let ring = &self.dev.ring;
            if ring.has_read_len() {
                // The kernel takes read_len 0 for "not given" and returns the
                // whole buffer: report no data as one zero byte (a frame
                // walker reads it as padding) rather than stale bytes.
                if n == 0 {
                    self.walk(0, 1, |off, _| ring.data_zero(off, 1));
                }
                read_len = Some(u32::try_from(n.max(1)).unwrap_or(u32::MAX));
            } else if n < self.len {
                // No READ_LEN: the whole buffer goes back; no stale bytes.
                self.walk(n, self.len - n, |off, r| ring.data_zero(off, r.len()));
            }
        }
        self.dev.complete(
            self.generation,
            &Response {
                cmd_id: self.cmd_id,
                status: result.status.0,
                sense: &sense,
                read_len,
            },
        );
    }
}

impl Reply for TcmuReply {
    fn data_len(&self) -> usize {
        self.len
    }

    fn read_out(&self, offset: usize, dst: &mut [u8]) -> usize {
        if self.direction != DataDirection::ToDevice {
            return 0;
        }
        let ring = &self.dev.ring;
        self.walk(offset, dst.len(), |off, r| ring.data_read(off, &mut dst[r]))
    }

    fn write_in(&mut self, offset: usize, src: &[u8]) -> usize {
        if self.direction != DataDirection::FromDevice {
            return 0;
        }
        let ring = &self.dev.ring;
        self.walk(offset, src.len(), |off, r| ring.data_write(off, &src[r]))
    }

    fn complete(mut self: Box<Self>, result: TaskResult) {
        self.done = true;
        self.finish(&result);
    }
}

impl Drop for TcmuReply {
    fn drop(&mut self) {
        // Dropped unanswered (a handler bug): TASK ABORTED, as in-process,
        // so the initiator never waits for the kernel's command timeout.
        if !self.done {
            self.done = true;
            self.finish(&TaskResult::status(ScsiStatus::TASK_ABORTED));
        }
        self.dev.give_iovs(std::mem::take(&mut self.iovs));
    }
}

/// The answer while the daemon shuts down: NOT READY / LOGICAL UNIT NOT
/// READY, CAUSE NOT REPORTABLE (the sd driver fails it at once instead of
/// retrying, unlike BUSY).
fn shutting_down() -> TaskResult {
    TaskResult::check(Sense::new(
        SenseKey::NOT_READY,
        Asc::NOT_READY_CAUSE_NOT_REPORTABLE,
    ))
}

/// The answer to a command entry the daemon cannot use.
fn refused(why: &BadCommand) -> TaskResult {
    TaskResult::check(match why {
        BadCommand::UnsupportedCdb(_) => Sense::new(
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        ),
        BadCommand::Malformed(_) => {
            Sense::new(SenseKey::HARDWARE_ERROR, Asc::INTERNAL_TARGET_FAILURE)
        }
    })
}

/// Executes one batch: every entry since `next` is dispatched (to the
/// array, or answered at once), then the kernel is kicked once for the
/// completions made on this thread. Returns the ring error that stopped
/// the walk, if any.
pub(crate) fn process(dev: &Arc<Device>, shared: &Shared, next: &mut u32) -> Option<RingError> {
    dev.begin_batch();
    // Only the device thread processes: the batch's lock is never contended.
    let mut batch = {
        let mut kept = dev.batch.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(
            &mut *kept,
            Batch {
                entries: Vec::new(),
                next: 0,
                error: None,
            },
        )
    };
    let generation = dev.take(next, &mut batch);
    let error = batch.error.take();
    for entry in batch.entries.drain(..) {
        match entry {
            Entry::Skip { .. } => {}
            Entry::Bad { cmd_id, why, .. } => {
                shared.log.error(format_args!(
                    "{}: command {cmd_id} refused: {why}",
                    dev.name.backstore
                ));
                let result = refused(&why);
                let sense = result
                    .sense
                    .as_ref()
                    .map(Sense::to_bytes)
                    .unwrap_or_default();
                dev.complete(
                    generation,
                    &Response {
                        cmd_id,
                        status: result.status.0,
                        sense: &sense,
                        read_len: None,
                    },
                );
            }
            Entry::Command { cmd, .. } => dispatch(dev, shared, generation, cmd),
        }
    }
    *dev.batch.lock().unwrap_or_else(|e| e.into_inner()) = batch;
    dev.end_batch();
    error
}

fn dispatch(dev: &Arc<Device>, shared: &Shared, generation: u64, cmd: Command) {
    let direction = shared
        .array
        .direction_of(cmd.cdb.as_slice())
        .unwrap_or(DataDirection::None);
    let cdb = cmd.cdb;
    let reply = Box::new(TcmuReply::new(dev.clone(), generation, cmd, direction));
    let accepting = shared.gate.read().unwrap_or_else(|e| e.into_inner());
    if !*accepting {
        drop(accepting);
        return reply.complete(shutting_down());
    }
    shared.array.submit(Task {
        initiator: dev.route.initiator,
        lun: dev.route.lun,
        cdb,
        direction,
        reply,
    });
}

/// Writes `<state-dir>/serving/<backstore>` atomically.
pub(crate) fn write_serving(state_dir: &Path, dev: &Device) -> io::Result<()> {
    let dir = state_dir.join("serving");
    let tmp = dir.join(format!(".{}.tmp", dev.name.backstore));
    fs::write(&tmp, format!("uio={} {}\n", dev.uio, dev.route.describe))?;
    fs::rename(&tmp, dir.join(&dev.name.backstore))
}

/// Why the serving loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The daemon is stopping.
    Stopped,
    /// The device went away (rmdir) or its ring cannot be used any more.
    Gone,
}

/// Serves `dev` until the daemon stops or the device goes away. Writes the
/// serving state file once it is processing the ring, removes it at the end.
pub(crate) fn serve(dev: Arc<Device>, shared: Arc<Shared>) -> Ended {
    let log = shared.log;
    let name = dev.name.backstore.clone();
    let mut next = dev.read_position();
    // Anything queued before the thread started.
    let mut ended = None;
    if let Some(e) = process(&dev, &shared, &mut next) {
        ended = on_ring_error(&dev, &shared, &e, &mut next);
    }
    let state_file = shared.state_dir.join("serving").join(&name);
    match write_serving(&shared.state_dir, &dev) {
        Ok(()) => {}
        Err(e) => log.error(format_args!(
            "{name}: cannot write {}: {e}",
            state_file.display()
        )),
    }
    log.info(format_args!(
        "serving {name} (uio={} {})",
        dev.uio, dev.route.describe
    ));
    let ended = ended.unwrap_or_else(|| serve_loop(&dev, &shared, &mut next));
    dev.kick();
    // Only our own file: a re-created backstore of the same name may be
    // served by a newer thread already.
    let mine = format!("uio={} ", dev.uio);
    if fs::read_to_string(&state_file).is_ok_and(|s| s.starts_with(&mine)) {
        let _ = fs::remove_file(&state_file);
    }
    match ended {
        Ended::Stopped => log.info(format_args!("{name}: stopped")),
        Ended::Gone => log.info(format_args!("{name}: no longer served")),
    }
    ended
}

fn serve_loop(dev: &Arc<Device>, shared: &Shared, next: &mut u32) -> Ended {
    let log = shared.log;
    let name = &dev.name.backstore;
    let Some(fd) = dev.fd.as_ref() else {
        return Ended::Gone;
    };
    loop {
        if shared.stop.load(Ordering::Acquire) {
            // Answer what arrived meanwhile (NOT READY: the gate is shut).
            process(dev, shared, next);
            return Ended::Stopped;
        }
        if dev.needs_reset.load(Ordering::Acquire) {
            let e = "a completion found no usable slot";
            if let Some(ended) = on_ring_error(dev, shared, e, next) {
                return ended;
            }
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(POLL_INTERVAL).unwrap_or(PollTimeout::MAX);
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log.error(format_args!("{name}: poll: {e}"));
                return Ended::Gone;
            }
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            log.info(format_args!("{name}: device removed"));
            return Ended::Gone;
        }
        if revents.contains(PollFlags::POLLIN) {
            let mut count = [0u8; 4];
            match nix::unistd::read(fd.as_raw_fd(), &mut count) {
                Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                Err(e) => {
                    log.info(format_args!("{name}: device removed (read: {e})"));
                    return Ended::Gone;
                }
            }
        }
        // Also on a timeout: cheap, and a lost wake-up costs nothing.
        if let Some(e) = process(dev, shared, next) {
            if let Some(ended) = on_ring_error(dev, shared, &e, next) {
                return ended;
            }
        }
    }
}

/// A corrupt ring: reset it (outstanding commands fail BUSY) and go on, or
/// give the device up if it cannot be reset.
fn on_ring_error(
    dev: &Device,
    shared: &Shared,
    e: impl std::fmt::Display,
    next: &mut u32,
) -> Option<Ended> {
    let name = &dev.name.backstore;
    shared
        .log
        .error(format_args!("{name}: {e}; resetting the ring"));
    match dev.recover(&shared.configfs) {
        Ok(at) => {
            *next = at;
            shared.log.warn(format_args!(
                "{name}: ring reset (outstanding commands failed BUSY)"
            ));
            None
        }
        Err(err) => {
            shared.log.error(format_args!(
                "{name}: cannot reset the ring ({err}); no longer serving it"
            ));
            Some(Ended::Gone)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use super::super::ring::fake::{Done, FakeKernel};
    use super::super::ring::SENSE_LEN;
    use super::*;
    use crate::tcmu::config::{build_array, StgArg};

    fn shared() -> Arc<Shared> {
        let (array, _mailbox) = build_array(&[StgArg { id: 1, members: 2 }], 1 << 20, 512).unwrap();
        Arc::new(Shared {
            array,
            gate: RwLock::new(true),
            stop: AtomicBool::new(false),
            log: Log { quiet: true },
            state_dir: std::env::temp_dir(),
            configfs: "/nonexistent".into(),
            sysfs: "/nonexistent".into(),
            dev: "/nonexistent".into(),
        })
    }

    fn device(shared: &Shared, ring: Ring, lun: u64) -> Arc<Device> {
        let start = Start {
            tail: ring.tail(),
            read: ring.head(),
        };
        device_at(shared, ring, lun, start)
    }

    fn device_at(shared: &Shared, ring: Ring, lun: u64, start: Start) -> Arc<Device> {
        let initiator = shared.array.login("h0");
        Arc::new(Device::new(
            "uio0".into(),
            UioName::parse("tcm-user/1/b/stp/lun=0,initiator=h0").unwrap(),
            Route {
                lun,
                initiator,
                describe: format!("lun={lun} initiator=h0"),
            },
            ring,
            None,
            start,
            Log { quiet: true },
        ))
    }

    fn write10(lba: u32, blocks: u16) -> [u8; 10] {
        let l = lba.to_be_bytes();
        let b = blocks.to_be_bytes();
        [0x2A, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]
    }

    fn read10(lba: u32, blocks: u16) -> [u8; 10] {
        let mut c = write10(lba, blocks);
        c[0] = 0x28;
        c
    }

    fn sense_of(d: &Done) -> Sense {
        Sense::parse(&d.sense).unwrap()
    }

    #[test]
    fn writes_and_reads_go_through_the_data_area() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        k.push(&dev.ring, 1, &write10(8, 16), &data, 0).unwrap();
        let mut next = 0;
        assert!(process(&dev, &sh, &mut next).is_none());
        let done = k.reap(&dev.ring);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, 0);
        assert_eq!(dev.kicks(), 1, "one kick for the batch");

        k.push(&dev.ring, 2, &read10(8, 16), &[], 8192).unwrap();
        // A short buffer (the initiator asked for less than the CDB says):
        // refused, as LIO refuses it.
        k.push(&dev.ring, 3, &read10(8, 16), &[], 4096).unwrap();
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        assert_eq!(done[0].data, data);
        assert_eq!(done[0].read_len, Some(8192));
        assert_eq!(done[1].status, 2, "CHECK CONDITION");
        assert_eq!(dev.in_flight(), 0);
    }

    #[test]
    fn iovec_vectors_are_reused_from_command_to_command() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        let spare = |dev: &Device| dev.spare_iovs.lock().unwrap().len();
        let data = vec![0x5Au8; 8192];
        let mut next = 0;
        for id in 1..=20u16 {
            k.push(&dev.ring, id, &write10(8, 16), &data, 0).unwrap();
            process(&dev, &sh, &mut next);
            assert_eq!(k.reap(&dev.ring)[0].status, 0);
            // The one vector goes back and forth: never a second.
            assert_eq!(spare(&dev), 1, "after command {id}");
        }
        // The commands of one batch are read before any runs: each needs
        // its own vector, and all come back for the next batch.
        for first in [21u16, 25] {
            for id in first..first + 4 {
                k.push(&dev.ring, id, &read10(8, 16), &[], 8192).unwrap();
            }
            process(&dev, &sh, &mut next);
            let done = k.reap(&dev.ring);
            assert_eq!(done.len(), 4);
            assert!(done.iter().all(|d| d.status == 0 && d.data == data));
            assert_eq!(spare(&dev), 4, "batch from {first}");
        }
    }

    #[test]
    fn errors_come_back_as_check_condition_with_sense() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        k.push(&dev.ring, 1, &[0xC7, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
            .unwrap();
        k.push(&dev.ring, 2, &read10(1 << 30, 1), &[], 512).unwrap();
        let mut next = 0;
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].status, 2);
        assert_eq!(sense_of(&done[0]).asc, Asc::INVALID_COMMAND_OPERATION_CODE);
        assert_eq!(done[0].sense.len(), SENSE_LEN);
        assert_eq!(sense_of(&done[1]).asc, Asc::LBA_OUT_OF_RANGE);
        assert_eq!(done[1].read_len, None, "no data with CHECK CONDITION");
    }

    #[test]
    fn a_malformed_cfg_answers_as_an_unknown_lun() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, NO_LUN);
        k.push(&dev.ring, 1, &[0; 6], &[], 0).unwrap();
        k.push(&dev.ring, 2, &[0x12, 0, 0, 0, 96, 0], &[], 96)
            .unwrap();
        let mut next = 0;
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        assert_eq!(sense_of(&done[0]).asc, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
        assert_eq!(done[1].status, 0);
        assert_eq!(done[1].data[0], 0x3F, "INQUIRY: no LUN connected here");
    }

    #[test]
    fn bad_entries_are_refused_at_once() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        let at = k.push(&dev.ring, 1, &read10(0, 1), &[], 512).unwrap();
        k.poke(&dev.ring, at + 48, &1u64.to_ne_bytes()); // iov into the mailbox
        let mut var = [0u8; 16];
        var[0] = 0x7F;
        var[7] = 32;
        k.push(&dev.ring, 2, &var, &[], 0).unwrap();
        let mut next = 0;
        assert!(process(&dev, &sh, &mut next).is_none());
        let done = k.reap(&dev.ring);
        assert_eq!(sense_of(&done[0]).key, SenseKey::HARDWARE_ERROR);
        assert_eq!(sense_of(&done[1]).asc, Asc::INVALID_COMMAND_OPERATION_CODE);
        assert_eq!(dev.in_flight(), 0);
    }

    #[test]
    fn held_commands_complete_from_another_thread_out_of_order() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        // Three commands; the second is completed last, from another thread.
        for id in 1..=3 {
            k.push(&dev.ring, id, &[0; 6], &[], 0).unwrap();
        }
        let mut next = 0;
        dev.begin_batch();
        let (entries, err, generation) = dev.take_all(&mut next);
        assert!(err.is_none());
        let mut replies: Vec<TcmuReply> = entries
            .into_iter()
            .map(|e| match e {
                Entry::Command { cmd, .. } => {
                    TcmuReply::new(dev.clone(), generation, cmd, DataDirection::None)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        let held = replies.remove(1);
        for r in replies {
            Box::new(r).complete(TaskResult::good(0));
        }
        dev.end_batch();
        assert_eq!(dev.kicks(), 1);
        assert_eq!(dev.in_flight(), 1);
        std::thread::spawn(move || Box::new(held).complete(TaskResult::good(0)))
            .join()
            .unwrap();
        assert_eq!(
            dev.kicks(),
            2,
            "a completion from another thread kicks at once"
        );
        let ids: Vec<u16> = k.reap(&dev.ring).iter().map(|d| d.cmd_id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert_eq!(dev.wait_idle(Instant::now()), 0);
    }

    #[test]
    fn a_dropped_reply_completes_as_task_aborted() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        k.push(&dev.ring, 9, &[0; 6], &[], 0).unwrap();
        let mut next = 0;
        let (entries, _, generation) = dev.take_all(&mut next);
        let Entry::Command { cmd, .. } = entries.into_iter().next().unwrap() else {
            panic!()
        };
        drop(TcmuReply::new(
            dev.clone(),
            generation,
            cmd,
            DataDirection::None,
        ));
        let done = k.reap(&dev.ring);
        assert_eq!((done[0].cmd_id, done[0].status), (9, 0x40));
    }

    #[test]
    fn no_data_in_is_reported_as_one_zero_byte() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        k.push(&dev.ring, 1, &read10(0, 8), &[], 4096).unwrap();
        let mut next = 0;
        let (entries, _, generation) = dev.take_all(&mut next);
        let Entry::Command { cmd, .. } = entries.into_iter().next().unwrap() else {
            panic!()
        };
        let r = TcmuReply::new(dev.clone(), generation, cmd, DataDirection::FromDevice);
        Box::new(r).complete(TaskResult::good(0));
        let done = k.reap(&dev.ring);
        assert_eq!(done[0].read_len, Some(1));
        assert_eq!(done[0].data, vec![0], "not the stale 0xEE of the data page");
    }

    #[test]
    fn without_read_len_a_short_data_in_is_zero_filled() {
        let sh = shared();
        let (ring, mut k) =
            FakeKernel::with_flags(64 * 1024, 1 << 20, super::super::ring::CAP_OOOC);
        let dev = device(&sh, ring, 0);
        k.push(&dev.ring, 1, &[0x12, 0, 0, 0, 255, 0], &[], 255)
            .unwrap();
        let mut next = 0;
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        assert_eq!(done[0].read_len, None);
        assert_eq!(done[0].data.len(), 255);
        let n = usize::from(done[0].data[4]) + 5; // INQUIRY's additional length
        assert!(done[0].data[n..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_shut_gate_answers_not_ready() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        *sh.gate.write().unwrap() = false;
        k.push(&dev.ring, 1, &[0; 6], &[], 0).unwrap();
        let mut next = 0;
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        let s = sense_of(&done[0]);
        assert_eq!(
            (s.key, s.asc),
            (SenseKey::NOT_READY, Asc::NOT_READY_CAUSE_NOT_REPORTABLE)
        );
    }

    #[test]
    fn replies_of_an_older_generation_complete_nowhere() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        k.push(&dev.ring, 1, &[0; 6], &[], 0).unwrap();
        let mut next = 0;
        let (entries, _, generation) = dev.take_all(&mut next);
        let Entry::Command { cmd, .. } = entries.into_iter().next().unwrap() else {
            panic!()
        };
        dev.lock().generation += 1; // as a ring reset does
        let tail = dev.ring.tail();
        Box::new(TcmuReply::new(
            dev.clone(),
            generation,
            cmd,
            DataDirection::None,
        ))
        .complete(TaskResult::good(0));
        assert_eq!(dev.ring.tail(), tail);
        assert!(k.reap(&dev.ring).is_empty());
    }

    #[test]
    fn commands_a_dead_daemon_left_are_skipped_and_their_slots_reused() {
        // What a daemon started on a ring it could not reset does: the
        // commands between cmd_tail and cmd_head are never executed (the
        // kernel times them out), new ones complete into their slots.
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        for id in 1..=3 {
            k.push(&ring, id, &[0; 6], &[], 0).unwrap();
        }
        k.force_tail(&ring, 0);
        let dev = device(&sh, ring, 0);
        let mut next = dev.read_position();
        assert_eq!(next, dev.ring.head());
        k.push(&dev.ring, 4, &[0; 6], &[], 0).unwrap();
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        assert_eq!(done.iter().map(|d| d.cmd_id).collect::<Vec<_>>(), vec![4]);
        assert_eq!(
            dev.ring.header(0).unwrap().cmd_id,
            4,
            "in the first stale slot"
        );
        assert_eq!(k.outstanding.len(), 3, "1, 2, 3 are left to the kernel");
    }

    #[test]
    fn a_ring_reset_blocks_resets_and_unblocks_through_configfs() {
        let dir = std::env::temp_dir().join(format!("stp-tcmu-cfs-{}", std::process::id()));
        let action = dir.join("target/core/user_3/bs/action");
        fs::create_dir_all(&action).unwrap();
        let name = UioName::parse("tcm-user/3/bs/stp/lun=0,initiator=h").unwrap();
        reset_ring(&dir, &name).unwrap();
        assert_eq!(fs::read_to_string(action.join("block_dev")).unwrap(), "0");
        assert_eq!(fs::read_to_string(action.join("reset_ring")).unwrap(), "1");
        let other = UioName::parse("tcm-user/4/bs/stp/lun=0,initiator=h").unwrap();
        let err = reset_ring(&dir, &other).unwrap_err();
        assert!(
            err.to_string().contains("user_4/bs/action/block_dev"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn after_a_reset_commands_queued_since_are_executed() {
        let dir = std::env::temp_dir().join(format!("stp-tcmu-reset-{}", std::process::id()));
        fs::create_dir_all(dir.join("target/core/user_1/b/action")).unwrap();
        let name = UioName::parse("tcm-user/1/b/stp/lun=0,initiator=h0").unwrap();
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        // The kernel reset the ring to 0/0 and, once the device was
        // unblocked, queued two new commands before the daemon looked.
        k.push(&ring, 1, &[0; 6], &[], 0).unwrap();
        k.push(&ring, 2, &[0; 6], &[], 0).unwrap();
        let start = reset_and_restart(&dir, &name, &ring).unwrap();
        assert_eq!(start, Start { tail: 0, read: 0 });
        let dev = device_at(&sh, ring, 0, start);
        let mut next = dev.read_position();
        process(&dev, &sh, &mut next);
        let ids: Vec<u16> = k.reap(&dev.ring).iter().map(|d| d.cmd_id).collect();
        assert_eq!(ids, vec![1, 2]);
        // A tail the "reset" left alone means it did not happen.
        k.force_tail(&dev.ring, 120);
        let err = reset_and_restart(&dir, &name, &dev.ring).unwrap_err();
        assert!(err.to_string().contains("not 0"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vendor_round_trip_through_the_mailbox() {
        let sh = shared();
        let (ring, mut k) = FakeKernel::new(64 * 1024, 1 << 20);
        let dev = device(&sh, ring, 0);
        // STG INFO with a 64-byte allocation.
        k.push(&dev.ring, 1, &[0xC0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0], &[], 64)
            .unwrap();
        // BIND, then RECEIVE with a 0.5 s long poll: held, then completed
        // GOOD with no data by the mailbox's timer thread.
        k.push(&dev.ring, 2, &[0xC1, 0, 0, 0, 0, 0, 0, 0, 16, 0], &[], 16)
            .unwrap();
        let mut next = 0;
        process(&dev, &sh, &mut next);
        let done = k.reap(&dev.ring);
        assert_eq!(&done[0].data[..4], &0x5354_4749u32.to_be_bytes());
        assert_eq!(done[0].read_len, Some(64));
        let handle = &done[1].data[4..8];
        let mut recv = [0xC4, 5, 0, 0, 0, 0, 0, 0x10, 0, 0];
        recv[2..6].copy_from_slice(handle);
        k.push(&dev.ring, 3, &recv, &[], 4096).unwrap();
        process(&dev, &sh, &mut next);
        assert_eq!(dev.in_flight(), 1, "held by the mailbox");
        assert_eq!(dev.wait_idle(Instant::now() + Duration::from_secs(5)), 0);
        let done = k.reap(&dev.ring);
        assert_eq!((done[0].cmd_id, done[0].status), (3, 0));
        assert_eq!(done[0].read_len, Some(1));
    }
}
