//! An asynchronous [`Transport`] over the sg v3 interface, driven by
//! io_uring: [`UringSg`], and [`open_best`], which picks it or falls back to
//! the synchronous [`SgDevice`].
//!
//! # The pattern (and why nothing else)
//!
//! io_uring has no passthrough opcode for `/dev/sg` (sg implements no
//! `uring_cmd`). Asynchronous sg is the v3 interface: `write()` of an
//! 88-byte [`SgIoHdr`] queues a command on an `O_NONBLOCK` fd, `read()`
//! returns one completed header. When io_uring runs sg's `read`/`write`
//! from a worker thread or from deferred task work, the sg driver can take
//! the call for a 32-bit (compat) one and use the 32-bit header layout
//! (truncated `usr_ptr`, `EFAULT`, a wedged process were seen in a
//! prototype). The one pattern that was both safe and fast, and the only
//! one this module uses:
//!
//! * a ring set up with `SINGLE_ISSUER | DEFER_TASKRUN` (fallback
//!   `COOP_TASKRUN`, then plain): see [`RingMode`];
//! * commands submitted as batched `IORING_OP_WRITE`s of headers to
//!   `O_NONBLOCK` sg fds, with no `IOSQE_ASYNC`, no links and no SQPOLL, so
//!   sg's `write` runs inside `io_uring_enter`, in this process's own
//!   64-bit syscall context;
//! * completions reaped with one multishot `POLL_ADD(POLLIN)` per fd and a
//!   plain `read(2)` of headers until `EAGAIN`, re-arming the poll when its
//!   CQE lacks `IORING_CQE_F_MORE`. **Never `IORING_OP_READ` on sg.**
//! * every completion's `pack_id` (slot index) and `usr_ptr` (slot index
//!   and generation) are checked against the slot table
//!   ([`GuardError`]); a mismatch is reported as an error from
//!   [`reap`](Transport::reap), never guessed. It means the kernel and this
//!   engine disagree about the header layout or the commands in flight: the
//!   command it belonged to cannot be identified, stays counted in flight,
//!   and the transport should be dropped.
//!
//! The sg driver allows at most [`SG_MAX_QUEUE_PER_FD`] (16) outstanding
//! commands per open fd (the 17th `write()` fails with `EDOM`), so a queue
//! depth above 16 opens several fds on the same device
//! ([`fds_for_depth`]) and each command goes to the least-loaded one.
//!
//! # Direct I/O
//!
//! With `/sys/module/sg/parameters/allow_dio` at 1 (the engine tries to set
//! it when it is 0 and the process may write it), commands carry
//! `SG_FLAG_DIRECT_IO` and the device DMAs straight into the command's
//! page-aligned [`IoBuf`](crate::IoBuf). The kernel still copies when it
//! must; [`UringSg::direct_io_stats`] counts, per completion, what happened
//! (`info & SG_INFO_DIRECT_IO_MASK`). Unlike synchronous `SG_IO` (see
//! [`SgDevice::set_direct_io`]), no call here blocks in the sg driver, so a
//! signal cannot orphan a command behind the caller's back.
//!
//! # Timeouts and cancellation
//!
//! Each command carries its own timeout in the header (`Command::timeout`,
//! sg's `timeout` field): the SCSI midlayer aborts a command that overruns
//! it and the completion reports [`CommandError::Timeout`]. **sg cannot
//! abort a queued command from user space**; there is no per-command
//! cancel. [`UringSg::cancel`] waits a grace period for what is in flight,
//! then abandons the rest: it closes the fds (sg discards results that
//! arrive later) and leaks the buffers the device may still write into
//! (direct I/O). Dropping a `UringSg` with commands in flight does the same
//! with no grace period.
//!
//! # Buffer lifetime invariant
//!
//! As in [`sg`](crate::sg): a header names the CDB, the data buffer and a
//! sense buffer by raw pointer. Here all three live in one heap-allocated
//! slot ([`Box`]), together with the header itself, from [`submit`] until
//! the completed header has been read back **and** the ring reported the
//! `WRITE` done (the kernel copies the header and the CDB during the write,
//! writes sense and, for indirect I/O, data-in during the `read()`, and
//! DMAs direct-I/O data at any time in between). The data buffer is never
//! resized while in flight. A slot whose command was abandoned is leaked,
//! never freed, if the kernel may still touch it.
//!
//! # bsg passthrough (`IORING_OP_URING_CMD`)
//!
//! Linux 7.1 added io_uring SCSI passthrough through **bsg**
//! (`/dev/bsg/H:C:T:L`), which removes the `write`/`read` round trip and
//! the 16-per-fd limit: [`UringBsg`](crate::bsg::UringBsg) in
//! [`bsg`](crate::bsg). [`open_best`] tries it first and falls back to this
//! engine (see [`select`](crate::select)); this engine stays for older
//! kernels.
//!
//! [`submit`]: Transport::submit

#![allow(unsafe_code)]

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, EnterFlags, IoUring};
use nix::libc::{self, c_void};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::sg::{sg_version, SgDevice, SgError, SgFlags, SgIoHdr, SENSE_LEN};
use crate::transport::{Command, CommandError, Completion, SubmitError, Transport};

/// The most commands the sg driver accepts outstanding on one open fd.
pub const SG_MAX_QUEUE_PER_FD: usize = 16;

/// The deepest queue [`UringSg`] accepts (64 fds of 16).
pub const MAX_QUEUE_DEPTH: usize = 1024;

/// The major device number of `/dev/sgN` (`SCSI_GENERIC_MAJOR`).
pub const SCSI_GENERIC_MAJOR: u64 = 21;

/// Where the sg driver's direct-I/O switch lives on 6.x kernels.
pub const ALLOW_DIO_PARAM: &str = "/sys/module/sg/parameters/allow_dio";

/// Size of a v3 header as `write()`/`read()` move it.
const HDR_LEN: usize = std::mem::size_of::<SgIoHdr>();

/// `user_data` bit marking a poll CQE (the rest is the fd index).
const UD_POLL: u64 = 1 << 63;

/// `user_data` of the waker's eventfd poll (no fd index is this large).
const UD_WAKE: u64 = UD_POLL | 0xFFFF;

/// How many fds a queue of `depth` commands needs: one per 16, at least one.
pub fn fds_for_depth(depth: usize) -> usize {
    depth.div_ceil(SG_MAX_QUEUE_PER_FD).max(1)
}

/// How the io_uring instance was set up, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingMode {
    /// `SINGLE_ISSUER | DEFER_TASKRUN` (6.1+): completion work runs only
    /// inside this thread's `io_uring_enter`. The ring is bound to the
    /// thread that first submits or reaps; using it from another thread
    /// afterwards is refused with an error.
    DeferTaskrun,
    /// `COOP_TASKRUN` (5.19+): no task-work interrupts.
    CoopTaskrun,
    /// No setup flags.
    Plain,
}

impl RingMode {
    /// A short name for [`describe`](Transport::describe).
    pub fn name(self) -> &'static str {
        match self {
            RingMode::DeferTaskrun => "SINGLE_ISSUER|DEFER_TASKRUN",
            RingMode::CoopTaskrun => "COOP_TASKRUN",
            RingMode::Plain => "plain ring",
        }
    }

    fn binds_thread(self) -> bool {
        self == RingMode::DeferTaskrun
    }
}

/// Which engine [`open_best`] (or [`EnginePool`](crate::EnginePool)) chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Engine {
    /// [`UringBsg`](crate::bsg::UringBsg): io_uring `URING_CMD`
    /// passthrough on the bsg node (Linux 7.1+).
    UringBsg,
    /// [`UringSg`]: sg v3 `write`/`read` driven by io_uring.
    UringSg,
    /// [`SgDevice`]: synchronous `SG_IO`, one command at a time.
    SyncSgIo,
}

impl Engine {
    /// A short stable name: `bsg`, `sg` or `sync` (as `STP_ENGINE` takes).
    pub fn name(self) -> &'static str {
        match self {
            Engine::UringBsg => "bsg",
            Engine::UringSg => "sg",
            Engine::SyncSgIo => "sync",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether commands ask for direct I/O, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectIo {
    /// `allow_dio` is 1: commands carry `SG_FLAG_DIRECT_IO`.
    Enabled {
        /// True when this process switched `allow_dio` on.
        switched_on: bool,
    },
    /// Commands are copied through kernel pages; the reason.
    Disabled(String),
}

impl DirectIo {
    /// True when commands ask for direct I/O.
    pub fn is_enabled(&self) -> bool {
        matches!(self, DirectIo::Enabled { .. })
    }
}

impl fmt::Display for DirectIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirectIo::Enabled { switched_on: false } => f.write_str("direct I/O"),
            DirectIo::Enabled { switched_on: true } => {
                f.write_str("direct I/O (allow_dio switched on)")
            }
            DirectIo::Disabled(why) => write!(f, "copied I/O: {why}"),
        }
    }
}

/// Reads the sg driver's `allow_dio` parameter at `param`; when it is 0,
/// tries to write 1 (works as root). Never fails: the answer says why
/// direct I/O is off.
pub fn enable_direct_io(param: &Path) -> DirectIo {
    let read = |p: &Path| fs::read_to_string(p).map(|s| s.trim().to_owned());
    match read(param) {
        Ok(v) if v == "1" => DirectIo::Enabled { switched_on: false },
        Ok(v) if v == "0" => match fs::write(param, "1") {
            Ok(()) if read(param).is_ok_and(|v| v == "1") => {
                DirectIo::Enabled { switched_on: true }
            }
            Ok(()) => DirectIo::Disabled(format!("{} stayed 0 after writing 1", param.display())),
            Err(e) => DirectIo::Disabled(format!(
                "{} is 0 and cannot be set ({e}); as root: echo 1 > {}",
                param.display(),
                param.display()
            )),
        },
        Ok(v) => DirectIo::Disabled(format!("{} reads {v:?}", param.display())),
        Err(e) => DirectIo::Disabled(format!("cannot read {}: {e}", param.display())),
    }
}

/// Why a [`UringSg`] could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UringError {
    /// The node could not be opened or does not speak sg v3.
    #[error(transparent)]
    Sg(#[from] SgError),
    /// The node speaks `SG_IO` but is not a `/dev/sgN` character device
    /// (e.g. `/dev/sdX`): only the sg driver has the asynchronous interface.
    #[error("{} is not a SCSI generic (/dev/sgN) character device; the io_uring engine needs the sg driver's write/read interface (block devices support only synchronous SG_IO)", path.display())]
    NotSgChar {
        /// The path given.
        path: PathBuf,
    },
    /// io_uring is unavailable or refused the setup.
    #[error("io_uring is unavailable: {0}")]
    Ring(io::Error),
    /// The requested queue depth is out of range.
    #[error("queue depth {0} is out of range 1..={MAX_QUEUE_DEPTH}")]
    Depth(usize),
}

/// One open fd on the device.
#[derive(Debug)]
struct SgFd {
    fd: OwnedFd,
    in_flight: usize,
    /// Reading stopped early (an error): completions may wait unread, and
    /// the multishot poll fires only on new ones, so read again before
    /// blocking.
    recheck: bool,
}

/// A command in flight: everything the kernel may touch, in one heap
/// allocation that does not move (see the buffer lifetime invariant).
struct Live {
    hdr: SgIoHdr,
    sense: [u8; SENSE_LEN],
    cmd: Command,
    fd: usize,
    start: Instant,
    /// The ring reported the WRITE (the kernel has copied the header).
    written: bool,
}

#[derive(Default)]
enum SlotState {
    #[default]
    Free,
    Live(Box<Live>),
    /// The completion was read before the WRITE's CQE was seen; the slot
    /// waits for that CQE before it can be reused.
    AwaitingWriteCqe,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    state: SlotState,
}

/// The token a slot's command carries in `usr_ptr` and its WRITE in
/// `user_data`: generation in the high 32 bits (never 0, bit 63 clear),
/// index in the low 32. A header read back in the 32-bit layout loses the
/// generation and fails the guard.
pub(crate) fn token(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

pub(crate) fn split_token(t: u64) -> (u32, u32) {
    ((t & 0xFFFF_FFFF) as u32, (t >> 32) as u32)
}

/// Why a completed header could not be matched to a command in flight.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// `pack_id` names no slot.
    #[error("completion names slot {pack_id}, out of range 0..{slots}")]
    BadPackId {
        /// The `pack_id` read back.
        pack_id: i32,
        /// How many slots there are.
        slots: usize,
    },
    /// The slot has no command in flight.
    #[error("completion for slot {0}, which has no command in flight")]
    NotInFlight(u32),
    /// `usr_ptr` disagrees with the slot (a stale or corrupt header, e.g.
    /// read back in the 32-bit layout).
    #[error("completion for slot {index} carries usr_ptr {got:#x}, expected {expected:#x}")]
    UsrPtr {
        /// The slot.
        index: u32,
        /// The `usr_ptr` read back.
        got: u64,
        /// The slot's token.
        expected: u64,
    },
    /// The completion came from a different fd than the command went to.
    #[error("completion for slot {index} read from fd #{got}, submitted on fd #{expected}")]
    WrongFd {
        /// The slot.
        index: u32,
        /// The fd index it was read from.
        got: usize,
        /// The fd index it was written to.
        expected: usize,
    },
}

/// Checks a completed header's `pack_id` and `usr_ptr` (and the fd it
/// came from) against the slot table; returns the slot index.
fn check_guard(slots: &[Slot], pack_id: i32, usr_ptr: u64, fd: usize) -> Result<u32, GuardError> {
    let index = u32::try_from(pack_id)
        .ok()
        .filter(|&i| (i as usize) < slots.len())
        .ok_or(GuardError::BadPackId {
            pack_id,
            slots: slots.len(),
        })?;
    let slot = &slots[index as usize];
    let SlotState::Live(live) = &slot.state else {
        return Err(GuardError::NotInFlight(index));
    };
    let expected = token(index, slot.generation);
    if usr_ptr != expected {
        return Err(GuardError::UsrPtr {
            index,
            got: usr_ptr,
            expected,
        });
    }
    if live.fd != fd {
        return Err(GuardError::WrongFd {
            index,
            got: fd,
            expected: live.fd,
        });
    }
    Ok(index)
}

/// Builds the ring, best mode first.
fn build_ring(entries: u32) -> Result<(IoUring, RingMode), io::Error> {
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_r_disabled();
    if let Ok(r) = b.build(entries) {
        return Ok((r, RingMode::DeferTaskrun));
    }
    let mut b = IoUring::builder();
    b.setup_coop_taskrun();
    if let Ok(r) = b.build(entries) {
        return Ok((r, RingMode::CoopTaskrun));
    }
    IoUring::new(entries).map(|r| (r, RingMode::Plain))
}

/// Checks that io_uring can be set up here (the same way [`UringSg`] does)
/// and returns the mode it would use.
pub fn probe_ring() -> io::Result<RingMode> {
    build_ring(8).map(|(_, mode)| mode)
}

/// An sg device driven asynchronously through io_uring (see the
/// [module docs](self)).
///
/// [`submit`](Transport::submit) queues a `WRITE` of the command's header;
/// queued writes go to the kernel in one batch at the next
/// [`reap`](Transport::reap) (or when the submission queue fills).
/// Completions come back in whatever order the device finishes them.
pub struct UringSg {
    // Declared first so the ring closes before the slots are dropped.
    ring: IoUring,
    mode: RingMode,
    /// The ring is disabled until first use, which binds it (SINGLE_ISSUER)
    /// to the using thread.
    bound_to: Option<ThreadId>,
    fds: Vec<SgFd>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: Vec<Completion>,
    path: PathBuf,
    version: u32,
    depth: usize,
    in_flight: usize,
    flags: SgFlags,
    dio: DirectIo,
    direct_io: u64,
    copied_io: u64,
    /// The eventfd another thread writes to end a blocked `reap` early.
    wake: Option<Arc<EventFd>>,
    woken: bool,
}

/// Ends a blocked [`reap`](Transport::reap) of a [`UringSg`] from any
/// thread (an eventfd the ring polls). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Waker(Arc<EventFd>);

impl Waker {
    pub(crate) fn new(efd: Arc<EventFd>) -> Waker {
        Waker(efd)
    }

    /// Wakes the ring's reaper: its current or next blocking `reap`
    /// returns (possibly with no completion).
    pub fn wake(&self) {
        // Only fails when the counter would overflow, i.e. when it is
        // already signalled.
        let _ = self.0.write(1);
    }
}

impl fmt::Debug for UringSg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringSg")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("fds", &self.fds.len())
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight)
            .field("dio", &self.dio)
            .finish_non_exhaustive()
    }
}

impl UringSg {
    /// Opens `path` (a `/dev/sgN`) for up to `depth` commands in flight:
    /// [`fds_for_depth`] fds, each `O_RDWR | O_NONBLOCK | O_CLOEXEC`.
    /// Enables direct I/O when [`ALLOW_DIO_PARAM`] allows (see
    /// [`enable_direct_io`]).
    pub fn open(path: impl AsRef<Path>, depth: usize) -> Result<UringSg, UringError> {
        let dio = enable_direct_io(Path::new(ALLOW_DIO_PARAM));
        UringSg::open_with(path.as_ref(), depth, dio)
    }

    /// As [`open`](Self::open) with the direct-I/O decision made by the
    /// caller (`DirectIo::Disabled` to force copying).
    pub fn open_with(path: &Path, depth: usize, dio: DirectIo) -> Result<UringSg, UringError> {
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(UringError::Depth(depth));
        }
        let n = fds_for_depth(depth);
        let mut fds = Vec::with_capacity(n);
        let mut version = 0;
        for i in 0..n {
            let fd = open_sg(path)?;
            if i == 0 {
                version = sg_version(fd.as_fd()).map_err(|source| SgError::NotSg {
                    path: path.to_owned(),
                    source,
                })?;
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| SgError::Open {
                    path: path.to_owned(),
                    source: e.into(),
                })?;
                if st.st_mode & libc::S_IFMT != libc::S_IFCHR
                    || nix::sys::stat::major(st.st_rdev) != SCSI_GENERIC_MAJOR
                {
                    return Err(UringError::NotSgChar {
                        path: path.to_owned(),
                    });
                }
            }
            fds.push(SgFd {
                fd,
                in_flight: 0,
                recheck: false,
            });
        }
        // One WRITE per command plus one poll (re-)arm per fd fit at once.
        let entries = (depth + n).next_power_of_two().max(8) as u32;
        let (ring, mode) = build_ring(entries).map_err(UringError::Ring)?;
        let mut flags = SgFlags::Q_AT_TAIL;
        if dio.is_enabled() {
            flags |= SgFlags::DIRECT_IO;
        }
        let mut t = UringSg {
            ring,
            mode,
            bound_to: None,
            fds,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..depth as u32).rev().collect(),
            ready: Vec::new(),
            path: path.to_owned(),
            version,
            depth,
            in_flight: 0,
            flags,
            dio,
            direct_io: 0,
            copied_io: 0,
            wake: None,
            woken: false,
        };
        for i in 0..n {
            t.arm_poll(i).map_err(UringError::Ring)?;
        }
        Ok(t)
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sg driver's version number.
    pub fn driver_version(&self) -> u32 {
        self.version
    }

    /// How the ring was set up.
    pub fn ring_mode(&self) -> RingMode {
        self.mode
    }

    /// How many fds are open on the device.
    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }

    /// Whether commands ask for direct I/O, and why.
    pub fn direct_io(&self) -> &DirectIo {
        &self.dio
    }

    /// Completed commands with a data phase: `(direct, copied)`, where
    /// `copied` counts indirect and mixed transfers (as
    /// [`SgDevice::direct_io_stats`]).
    pub fn direct_io_stats(&self) -> (u64, u64) {
        (self.direct_io, self.copied_io)
    }

    /// A [`Waker`] for this ring: another thread can end a blocking
    /// [`reap`](Transport::reap) with it (to hand over new commands, for
    /// example). The first call creates the eventfd and arms its poll.
    pub fn waker(&mut self) -> io::Result<Waker> {
        if let Some(w) = &self.wake {
            return Ok(Waker(Arc::clone(w)));
        }
        let efd = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        self.wake = Some(Arc::clone(&efd));
        self.arm_wake()?;
        Ok(Waker(efd))
    }

    /// Arms the multishot POLLIN on the waker's eventfd.
    fn arm_wake(&mut self) -> io::Result<()> {
        let Some(efd) = &self.wake else {
            return Ok(());
        };
        let e = opcode::PollAdd::new(Fd(efd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(UD_WAKE);
        // SAFETY: a poll carries no pointer; the eventfd stays open as long
        // as the ring (`self.wake` holds it, and the ring is dropped first).
        unsafe { self.push(&e) }
    }

    /// Gives up on the commands in flight: waits up to `grace` for them to
    /// complete (their completions are returned with `Ok` results as
    /// usual), then abandons the rest. sg cannot abort a queued command, so
    /// "abandon" means: close every fd (the driver discards the results as
    /// the device finishes), leak the buffers the device may still write
    /// into, and return each abandoned command as a completion with an
    /// [`io::ErrorKind::Interrupted`] error (the outcome is unknown; the
    /// command may have executed) and an empty buffer. Consumes the
    /// transport.
    pub fn cancel(mut self, grace: Duration) -> Vec<Completion> {
        let mut out = std::mem::take(&mut self.ready);
        let deadline = Instant::now() + grace;
        while self.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.reap(&mut out, Some(left)).is_err() || left.is_zero() {
                break;
            }
        }
        for slot in &mut self.slots {
            if let SlotState::Live(live) = &slot.state {
                out.push(Completion {
                    tag: live.cmd.tag,
                    data: Default::default(),
                    result: Err(CommandError::Io(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "command abandoned: sg cannot abort it, so its outcome is unknown (it may have executed on the device)",
                    ))),
                });
            }
            abandon(slot);
        }
        self.in_flight = 0;
        out
    }

    /// Refuses `cmd` with an error of `kind`.
    fn refuse(cmd: Command, kind: io::ErrorKind, msg: String) -> SubmitError {
        SubmitError {
            cmd: Box::new(cmd),
            error: CommandError::Io(io::Error::new(kind, msg)),
        }
    }

    /// Enables the ring on first use (binding it to this thread in
    /// SINGLE_ISSUER mode) and refuses use from any other thread.
    fn bind(&mut self) -> io::Result<()> {
        if !self.mode.binds_thread() {
            return Ok(());
        }
        let me = thread::current().id();
        match self.bound_to {
            Some(t) if t == me => Ok(()),
            Some(_) => Err(io::Error::other(format!(
                "{}: the io_uring ring ({}) is bound to the thread that first used it; use the transport from that thread only",
                self.path.display(),
                self.mode.name()
            ))),
            None => {
                self.ring.submitter().register_enable_rings()?;
                self.bound_to = Some(me);
                Ok(())
            }
        }
    }

    /// Queues one SQE, flushing the submission queue first if it is full.
    ///
    /// # Safety
    ///
    /// Every pointer the entry carries must stay valid until its CQE is
    /// reaped (or until the ring is closed and the memory leaked).
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        if self.bound_to.is_some() || !self.mode.binds_thread() {
            self.enter(None)?;
        }
        // SAFETY: as above.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Arms the multishot POLLIN on fd `i`.
    fn arm_poll(&mut self, i: usize) -> io::Result<()> {
        let fd = self.fds[i].fd.as_raw_fd();
        let e = opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(UD_POLL | i as u64);
        // SAFETY: a poll carries no pointer; the fd stays open as long as
        // the ring (both are fields of `self`; the ring is dropped first).
        unsafe { self.push(&e) }
    }

    /// Submits queued SQEs and runs completion work; with `wait`, blocks
    /// until at least one CQE is ready or `wait` passes (`None` inside
    /// `Some`: no limit). `wait == None` never blocks.
    fn enter(&mut self, wait: Option<Option<Duration>>) -> io::Result<()> {
        let len = self.ring.submission().len() as u32;
        let submitter = self.ring.submitter();
        let r = match wait {
            None => {
                // SAFETY: no argument pointer is passed (`None`); the SQEs
                // being submitted uphold `push`'s contract.
                unsafe {
                    submitter.enter::<libc::sigset_t>(len, 0, EnterFlags::GETEVENTS.bits(), None)
                }
            }
            Some(None) => submitter.submit_and_wait(1),
            Some(Some(d)) => {
                let ts = Timespec::from(d);
                let args = SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Handles every CQE ready in the completion queue.
    fn drain_cq(&mut self) -> io::Result<()> {
        let cqes: Vec<cqueue::Entry> = self.ring.completion().collect();
        let mut first_err = None;
        for cqe in cqes {
            let ud = cqe.user_data();
            if ud == UD_WAKE {
                if let Some(efd) = &self.wake {
                    // Non-blocking: clears the counter, or EAGAIN if a
                    // previous CQE already did.
                    let _ = efd.read();
                }
                self.woken = true;
                if !cqueue::more(cqe.flags()) {
                    self.arm_wake()?;
                }
            } else if ud & UD_POLL != 0 {
                let i = (ud & !UD_POLL) as usize;
                if i >= self.fds.len() {
                    continue;
                }
                if let Err(e) = self.read_completions(i) {
                    first_err.get_or_insert(e);
                }
                if !cqueue::more(cqe.flags()) {
                    self.arm_poll(i)?;
                }
            } else {
                self.write_done(ud, cqe.result());
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// A WRITE's CQE: the command is queued (or refused).
    fn write_done(&mut self, ud: u64, result: i32) {
        let (index, generation) = split_token(ud);
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        match std::mem::take(&mut slot.state) {
            SlotState::AwaitingWriteCqe => self.release(index),
            SlotState::Live(mut live) if result == HDR_LEN as i32 => {
                live.written = true;
                slot.state = SlotState::Live(live);
            }
            SlotState::Live(live) => {
                // The kernel refused the command: nothing was queued and
                // nothing refers to the buffers.
                let error = if result < 0 {
                    let e = io::Error::from_raw_os_error(-result);
                    let hint = match -result {
                        libc::EDOM => "; more than 16 commands on one sg fd",
                        libc::EINVAL if self.flags.contains(SgFlags::DIRECT_IO) => {
                            "; direct I/O needs page-aligned buffers"
                        }
                        _ => "",
                    };
                    io::Error::new(
                        e.kind(),
                        format!("sg write of the command failed: {e}{hint}"),
                    )
                } else {
                    io::Error::other(format!("sg write moved {result} of {HDR_LEN} header bytes"))
                };
                self.fds[live.fd].in_flight -= 1;
                self.in_flight -= 1;
                self.ready.push(Completion {
                    tag: live.cmd.tag,
                    data: live.cmd.data,
                    result: Err(CommandError::Io(error)),
                });
                self.release(index);
            }
            SlotState::Free => {}
        }
    }

    /// Returns slot `index` to the free list.
    fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.state = SlotState::Free;
        slot.generation = next_generation(slot.generation);
        self.free.push(index);
    }

    /// Reads completed headers from fd `i` until `EAGAIN`.
    fn read_completions(&mut self, i: usize) -> io::Result<()> {
        self.fds[i].recheck = false;
        let r = self.read_completions_inner(i);
        if r.is_err() {
            self.fds[i].recheck = true;
        }
        r
    }

    fn read_completions_inner(&mut self, i: usize) -> io::Result<()> {
        loop {
            // Nothing more can complete on an fd with nothing in flight:
            // skip the read that would only say EAGAIN (one syscall per
            // command at queue depth 1).
            if self.fds[i].in_flight == 0 {
                return Ok(());
            }
            let mut hdr = SgIoHdr::new();
            let fd = self.fds[i].fd.as_raw_fd();
            // SAFETY: `hdr` is a live, exclusively borrowed SgIoHdr of
            // HDR_LEN bytes, every byte initialised; sg's read() writes one
            // completed v3 header into it (this is a plain read(2) from this
            // 64-bit process, so the native layout is used). The sense and
            // data-in the kernel copies during this call go to the pointers
            // of the original header, which live in a slot that stays
            // allocated until this read has returned.
            let n = unsafe { libc::read(fd, (&raw mut hdr).cast::<c_void>(), HDR_LEN) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(io::Error::new(
                        e.kind(),
                        format!("{}: reading sg completions: {e}", self.path.display()),
                    )),
                };
            }
            if n as usize != HDR_LEN {
                return Err(io::Error::other(format!(
                    "{}: sg read returned {n} bytes, expected a {HDR_LEN}-byte header",
                    self.path.display()
                )));
            }
            let index =
                check_guard(&self.slots, hdr.pack_id, hdr.usr_ptr as u64, i).map_err(|g| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: sg completion guard failed: {g}", self.path.display()),
                    )
                })?;
            self.complete(index, &hdr);
        }
    }

    /// Turns slot `index`'s completed header into a [`Completion`].
    fn complete(&mut self, index: u32, hdr: &SgIoHdr) {
        let slot = &mut self.slots[index as usize];
        let SlotState::Live(live) = std::mem::take(&mut slot.state) else {
            return;
        };
        let written = live.written;
        if !written {
            slot.state = SlotState::AwaitingWriteCqe;
        }
        if hdr.dxfer_len > 0 {
            if hdr.info().used_direct_io() {
                self.direct_io += 1;
            } else {
                self.copied_io += 1;
            }
        }
        let outcome = hdr.outcome(&live.sense, live.start.elapsed());
        self.fds[live.fd].in_flight -= 1;
        self.in_flight -= 1;
        let Live { cmd, .. } = *live;
        self.ready.push(Completion {
            tag: cmd.tag,
            data: cmd.data,
            result: Ok(outcome),
        });
        if written {
            self.release(index);
        }
    }
}

pub(crate) fn next_generation(g: u32) -> u32 {
    // 1..=0x7FFF_FFFF: never 0, bit 63 of the token stays clear.
    if g >= 0x7FFF_FFFF {
        1
    } else {
        g + 1
    }
}

/// Forgets an abandoned slot's contents when the kernel may still touch
/// them (any command in flight: with direct I/O the device may DMA into the
/// buffer until it finishes, and a WRITE not yet reported may still read
/// the header).
fn abandon(slot: &mut Slot) {
    if let SlotState::Live(live) = std::mem::take(&mut slot.state) {
        std::mem::forget(live);
    }
}

fn open_sg(path: &Path) -> Result<OwnedFd, SgError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| SgError::Open {
            path: path.to_owned(),
            source,
        })
}

impl Drop for UringSg {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            abandon(slot);
        }
    }
}

impl Transport for UringSg {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        if let Err(e) = self.bind() {
            return Err(SubmitError {
                cmd: Box::new(cmd),
                error: CommandError::Io(e),
            });
        }
        if self.in_flight() >= self.depth {
            let msg = format!(
                "{}: {} commands in flight (queue depth {}); reap before submitting more",
                self.path.display(),
                self.in_flight,
                self.depth
            );
            return Err(UringSg::refuse(cmd, io::ErrorKind::WouldBlock, msg));
        }
        let Some((fd, _)) = self
            .fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.in_flight < SG_MAX_QUEUE_PER_FD)
            .min_by_key(|(_, f)| f.in_flight)
        else {
            let msg = format!("{}: every sg fd holds 16 commands", self.path.display());
            return Err(UringSg::refuse(cmd, io::ErrorKind::WouldBlock, msg));
        };
        if self.free.is_empty() {
            // Slots whose completion was read before their WRITE's CQE
            // come free once that CQE is drained.
            if let Err(e) = self.enter(None).and_then(|()| self.drain_cq()) {
                return Err(SubmitError {
                    cmd: Box::new(cmd),
                    error: CommandError::Io(e),
                });
            }
        }
        let Some(index) = self.free.pop() else {
            let msg = format!("{}: no free command slot", self.path.display());
            return Err(UringSg::refuse(cmd, io::ErrorKind::WouldBlock, msg));
        };
        let mut live = Box::new(Live {
            hdr: SgIoHdr::new(),
            sense: [0; SENSE_LEN],
            cmd,
            fd,
            start: Instant::now(),
            written: false,
        });
        let Live {
            hdr, sense, cmd, ..
        } = &mut *live;
        match SgIoHdr::for_command(cmd, sense, self.flags) {
            Ok(h) => *hdr = h,
            Err(e) => {
                self.free.push(index);
                return Err(SubmitError {
                    cmd: Box::new(live.cmd),
                    error: CommandError::Io(e),
                });
            }
        }
        let slot = &mut self.slots[index as usize];
        if slot.generation == 0 {
            slot.generation = 1;
        }
        let t = token(index, slot.generation);
        live.hdr.pack_id = index as i32;
        live.hdr.usr_ptr = t as usize as *mut c_void;
        let entry = opcode::Write::new(
            Fd(self.fds[fd].fd.as_raw_fd()),
            (&raw const live.hdr).cast::<u8>(),
            HDR_LEN as u32,
        )
        .build()
        .user_data(t);
        slot.state = SlotState::Live(live);
        self.fds[fd].in_flight += 1;
        self.in_flight += 1;
        // SAFETY: the entry points at the header inside the slot's Box,
        // which stays allocated (and unmoved: only the Box pointer moves)
        // until the WRITE's CQE or the completed header is seen, and is
        // leaked if the transport is dropped before (see `abandon`). The
        // header's own pointers name the CDB and sense inside the same Box
        // and the data pages of its IoBuf.
        if let Err(e) = unsafe { self.push(&entry) } {
            let slot = &mut self.slots[index as usize];
            let SlotState::Live(live) = std::mem::take(&mut slot.state) else {
                unreachable!("slot was just filled");
            };
            self.fds[fd].in_flight -= 1;
            self.in_flight -= 1;
            self.release(index);
            return Err(SubmitError {
                cmd: Box::new(live.cmd),
                error: CommandError::Io(e),
            });
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let before = out.len();
        if self.in_flight == 0 && self.ready.is_empty() {
            return Ok(0);
        }
        self.bind()?;
        let deadline = wait.map(|w| Instant::now() + w);
        // One pass that never blocks: submits the batch, collects what is done.
        self.enter(None)?;
        let mut result = self.drain_cq();
        for i in 0..self.fds.len() {
            if self.fds[i].recheck {
                let r = self.read_completions(i);
                if result.is_ok() {
                    result = r;
                }
            }
        }
        loop {
            out.append(&mut self.ready);
            if out.len() > before
                || result.is_err()
                || self.in_flight == 0
                || std::mem::take(&mut self.woken)
            {
                break;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                break;
            }
            self.enter(Some(left))?;
            result = self.drain_cq();
        }
        result?;
        Ok(out.len() - before)
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.ready.len()
    }

    fn queue_depth(&self) -> usize {
        self.depth
    }

    fn describe(&self) -> String {
        format!(
            "{} (io_uring sg v3, {} fd(s) for depth {}, {}, {})",
            self.path.display(),
            self.fds.len(),
            self.depth,
            self.mode.name(),
            self.dio
        )
    }
}

/// What [`open_best`] opened, and why.
pub struct BestPath {
    /// The transport.
    pub transport: Box<dyn Transport>,
    /// The engine behind it.
    pub engine: Engine,
    /// Why this engine (e.g. why io_uring was not used).
    pub reason: String,
}

impl fmt::Debug for BestPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BestPath")
            .field("transport", &self.transport.describe())
            .field("engine", &self.engine)
            .field("reason", &self.reason)
            .finish()
    }
}

/// Opens `path` with the best engine available for one thread (see
/// [`select`](crate::select)): bsg io_uring passthrough at `depth` when the
/// kernel has it and the device a bsg node, else [`UringSg`] at `depth`
/// when the node is a `/dev/sgN` and io_uring works, else [`SgDevice`]
/// (synchronous `SG_IO`, depth 1); the reason says which and why. Fails
/// only when none can open the path (the error is [`SgDevice::open`]'s: a
/// clear "cannot open" or "not a SCSI generic or block device"), or when
/// the engine forced by `STP_ENGINE` cannot run.
pub fn open_best(path: impl AsRef<Path>, depth: usize) -> Result<BestPath, SgError> {
    crate::select::open_engine(path.as_ref(), depth).map(crate::select::Opened::into_best)
}

impl BestPath {
    /// Synchronous `SG_IO` on `path`, because io_uring could not be used
    /// (`why`).
    pub fn sync_fallback(path: &Path, why: &str) -> Result<BestPath, SgError> {
        let dev = SgDevice::open(path)?;
        Ok(BestPath {
            transport: Box::new(dev),
            engine: Engine::SyncSgIo,
            reason: format!("synchronous SG_IO fallback: {why}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sg::SG_DXFER_TO_DEV;
    use crate::transport::CdbBuf;
    use crate::IoBuf;

    #[test]
    fn depth_to_fds() {
        assert_eq!(fds_for_depth(0), 1);
        assert_eq!(fds_for_depth(1), 1);
        assert_eq!(fds_for_depth(16), 1);
        assert_eq!(fds_for_depth(17), 2);
        assert_eq!(fds_for_depth(32), 2);
        assert_eq!(fds_for_depth(64), 4);
        assert_eq!(fds_for_depth(65), 5);
        assert_eq!(fds_for_depth(MAX_QUEUE_DEPTH), 64);
    }

    #[test]
    fn tokens_round_trip_and_survive_no_truncation() {
        let t = token(5, 7);
        assert_eq!(split_token(t), (5, 7));
        assert_eq!(t & UD_POLL, 0);
        let t = token(u32::MAX, 0x7FFF_FFFF);
        assert_eq!(t & UD_POLL, 0);
        assert_eq!(next_generation(0x7FFF_FFFF), 1);
        assert_eq!(next_generation(1), 2);
    }

    fn live_slot(fd: usize) -> Slot {
        let cdb = CdbBuf::new(&[0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0]).unwrap();
        let mut cmd = Command::data_out(cdb, IoBuf::new(512));
        let mut sense = [0; SENSE_LEN];
        let hdr = SgIoHdr::for_command(&mut cmd, &mut sense, SgFlags::DIRECT_IO).unwrap();
        assert_eq!(hdr.dxfer_direction, SG_DXFER_TO_DEV);
        Slot {
            generation: 3,
            state: SlotState::Live(Box::new(Live {
                hdr,
                sense,
                cmd,
                fd,
                start: Instant::now(),
                written: true,
            })),
        }
    }

    #[test]
    fn guard_checks_pack_id_usr_ptr_and_fd() {
        let slots = vec![Slot::default(), live_slot(1)];
        assert_eq!(check_guard(&slots, 1, token(1, 3), 1), Ok(1));
        assert!(matches!(
            check_guard(&slots, 2, token(2, 3), 1),
            Err(GuardError::BadPackId { pack_id: 2, .. })
        ));
        assert!(matches!(
            check_guard(&slots, -1, token(1, 3), 1),
            Err(GuardError::BadPackId { .. })
        ));
        assert_eq!(
            check_guard(&slots, 0, token(0, 0), 1),
            Err(GuardError::NotInFlight(0))
        );
        // A stale generation, and a usr_ptr truncated to 32 bits.
        assert!(matches!(
            check_guard(&slots, 1, token(1, 2), 1),
            Err(GuardError::UsrPtr { .. })
        ));
        assert!(matches!(
            check_guard(&slots, 1, token(1, 3) & 0xFFFF_FFFF, 1),
            Err(GuardError::UsrPtr { .. })
        ));
        let e = check_guard(&slots, 1, token(1, 3), 0).unwrap_err();
        assert_eq!(
            e,
            GuardError::WrongFd {
                index: 1,
                got: 0,
                expected: 1
            }
        );
        assert!(e.to_string().contains("submitted on fd #1"), "{e}");
    }

    #[test]
    fn allow_dio_parameter() {
        let dir = std::env::temp_dir().join(format!("stp-uring-dio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("allow_dio");
        fs::write(&p, "1\n").unwrap();
        assert_eq!(
            enable_direct_io(&p),
            DirectIo::Enabled { switched_on: false }
        );
        fs::write(&p, "0\n").unwrap();
        // A plain file takes the write, as sysfs does for root.
        assert_eq!(
            enable_direct_io(&p),
            DirectIo::Enabled { switched_on: true }
        );
        fs::write(&p, "x").unwrap();
        assert!(!enable_direct_io(&p).is_enabled());
        let missing = enable_direct_io(&dir.join("nope"));
        assert!(missing.to_string().contains("cannot read"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_depth_is_refused() {
        let e = UringSg::open("/dev/null", 0).unwrap_err();
        assert!(matches!(e, UringError::Depth(0)), "{e:?}");
        let e = UringSg::open("/dev/null", MAX_QUEUE_DEPTH + 1).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
    }

    #[test]
    fn dev_null_is_a_clear_error() {
        let e = UringSg::open("/dev/null", 32).unwrap_err();
        assert!(matches!(&e, UringError::Sg(SgError::NotSg { .. })), "{e:?}");
        let e = open_best("/dev/null", 32).unwrap_err();
        assert!(e.to_string().contains("not a SCSI generic"), "{e}");
        let e = open_best("/nonexistent/stp/sg9", 32).unwrap_err();
        assert!(e.to_string().starts_with("cannot open"), "{e}");
    }

    #[test]
    fn ring_setup_works_on_this_kernel() {
        // The host kernel has io_uring (no sg): the engine's ring builds.
        match probe_ring() {
            Ok(mode) => eprintln!("io_uring ring mode: {}", mode.name()),
            Err(e) => eprintln!("io_uring unavailable here: {e}"),
        }
    }
}
