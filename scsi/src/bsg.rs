//! SCSI passthrough through **bsg** driven by io_uring (Linux 7.1+):
//! [`UringBsg`], the uapi it speaks ([`BsgUringCmd`], [`Res2`]), and the
//! probe that decides whether it can run ([`probe`]).
//!
//! # The interface
//!
//! Each SCSI device has a bsg node, `/dev/bsg/H:C:T:L`. Since Linux 7.1 its
//! file implements `uring_cmd`: an `IORING_OP_URING_CMD` SQE on that fd
//! carries an 80-byte [`BsgUringCmd`] in the command area of a 128-byte SQE
//! (the ring is set up with `IORING_SETUP_SQE128 | IORING_SETUP_CQE32`,
//! which the kernel requires: without both it answers `EOPNOTSUPP`). The
//! kernel copies the CDB during the submission, maps the data buffer into
//! the request (a registered buffer when the SQE says
//! `IORING_URING_CMD_FIXED`, else the user pages), queues it at the tail of
//! the device queue, and posts a 32-byte CQE when the command finishes:
//! `res` is 0 or a negative errno (the command was refused, or its sense
//! could not be copied), and the first extra word, [`Res2`], packs the SCSI
//! status, driver status, host status, sense bytes written and residual.
//! Sense goes to the `response` buffer. Only plain SCSI commands with one
//! flat data buffer in one direction are accepted (no iovecs, no BIDI).
//! The command's timeout is `timeout_ms` (0 means the block layer's
//! default); an overrun comes back with host status `DID_TIME_OUT`, which
//! [`Outcome::check`] turns into [`CommandError::Timeout`].
//!
//! Compared with the sg v3 engine ([`UringSg`](crate::UringSg)) there is
//! no `write`/`read` per command, no 16-command limit per fd (one fd for
//! any depth), and no bounce buffers: the block layer maps the user pages
//! of a page-aligned buffer straight into the request.
//!
//! # Ring discipline
//!
//! As with the sg engine: a `SINGLE_ISSUER | DEFER_TASKRUN` ring (fallback
//! `COOP_TASKRUN`, then plain) bound to the thread that first uses it;
//! commands queue in the submission ring and go to the kernel in one batch
//! per `io_uring_enter` (at the next [`reap`](Transport::reap), or when the
//! submission queue is full). A completion's `user_data` names its slot
//! and the slot's generation; one that names no command in flight is an
//! error from `reap`, never guessed at.
//!
//! # Fixed buffers
//!
//! A sparse table of [`FIXED_SLOTS`] buffers is registered when the ring
//! is set up. A command whose buffer came from the DMA pool
//! ([`IoBuf::is_pooled`](crate::IoBuf::is_pooled)) uses the buffer's table
//! entry, registering it on first sight (one `io_uring_register` call,
//! replacing the least recently used idle entry); the entry is keyed by
//! the allocation's [`id`](crate::IoBuf::id), address and capacity, so an
//! entry is only ever named for the allocation it was registered for.
//! Other buffers go unregistered (the kernel pins their pages per
//! command). When registration fails (e.g. `RLIMIT_MEMLOCK` for a
//! non-root user) the command goes unregistered and
//! [`UringBsg::stats`] says why.
//!
//! # Timeouts and cancellation
//!
//! As in the sg engine: each command's timeout goes to the kernel, which
//! aborts an overrunning command through the SCSI error handler. bsg marks
//! no command cancelable, so [`UringBsg::cancel`] waits a grace period,
//! then abandons what is left (closing the ring; the kernel finishes those
//! commands on its own) and leaks the buffers the device may still touch.
//! Dropping a `UringBsg` with commands in flight does the same with no
//! grace period.
//!
//! # Buffer lifetime invariant
//!
//! An SQE names the CDB and the sense buffer (inside a heap slot, [`Box`],
//! which does not move) and the data pages of the command's `IoBuf`. All
//! three stay allocated, and the data buffer unresized, from
//! [`submit`](Transport::submit) until the command's CQE is reaped: the
//! kernel may re-read the SQE's pointers when it retries the submission
//! from a worker, copies sense at completion and DMAs data in between. A
//! slot whose command was abandoned is leaked, never freed.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, EnterFlags, IoUring, Probe};
use nix::libc;
use nix::sys::eventfd::{EfdFlags, EventFd};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::sg::SENSE_LEN;
use crate::status::{DriverStatus, HostStatus, ScsiStatus};
use crate::transport::{
    CdbBuf, Command, CommandError, Completion, DataDirection, Outcome, SubmitError, Transport,
};
use crate::uring::{next_generation, split_token, token, RingMode, Waker, MAX_QUEUE_DEPTH};

/// `protocol`: SCSI (`BSG_PROTOCOL_SCSI`).
pub const BSG_PROTOCOL_SCSI: u32 = 0;
/// `subprotocol`: a SCSI command (`BSG_SUB_PROTOCOL_SCSI_CMD`).
pub const BSG_SUB_PROTOCOL_SCSI_CMD: u32 = 0;

/// Where bsg nodes live.
pub const BSG_DIR: &str = "/dev/bsg";

/// Entries of the registered-buffer table.
pub const FIXED_SLOTS: usize = 256;

/// `user_data` of the waker's eventfd poll (a command token never has bit
/// 63 set).
const UD_WAKE: u64 = 1 << 63;

/// `struct bsg_uring_cmd` from `<linux/bsg.h>` (7.1+): the command area of
/// an `IORING_OP_URING_CMD` SQE on a bsg node. All fields are input; the
/// results come back in the CQE ([`Res2`]) and the `response` buffer.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct BsgUringCmd {
    /// Address of the CDB.
    pub request: u64,
    /// CDB length in bytes (at most 32 in the kernel; 16 here).
    pub request_len: u32,
    /// [`BSG_PROTOCOL_SCSI`].
    pub protocol: u32,
    /// [`BSG_SUB_PROTOCOL_SCSI_CMD`].
    pub subprotocol: u32,
    /// Size of the sense (`response`) buffer.
    pub max_response_len: u32,
    /// Address of the sense buffer.
    pub response: u64,
    /// Data-out buffer address.
    pub dout_xferp: u64,
    /// Data-out length (non-zero makes the command a write).
    pub dout_xfer_len: u32,
    /// Must be 0 (iovecs are refused with `EOPNOTSUPP`).
    pub dout_iovec_count: u32,
    /// Data-in buffer address.
    pub din_xferp: u64,
    /// Data-in length.
    pub din_xfer_len: u32,
    /// Must be 0.
    pub din_iovec_count: u32,
    /// Timeout in milliseconds (0: the block layer's default).
    pub timeout_ms: u32,
    /// Reserved, zero.
    pub reserved: [u8; 12],
}

// The uapi layout: 80 bytes, the whole command area of a 128-byte SQE.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<BsgUringCmd>() == 80);
    assert!(offset_of!(BsgUringCmd, request) == 0);
    assert!(offset_of!(BsgUringCmd, request_len) == 8);
    assert!(offset_of!(BsgUringCmd, protocol) == 12);
    assert!(offset_of!(BsgUringCmd, subprotocol) == 16);
    assert!(offset_of!(BsgUringCmd, max_response_len) == 20);
    assert!(offset_of!(BsgUringCmd, response) == 24);
    assert!(offset_of!(BsgUringCmd, dout_xferp) == 32);
    assert!(offset_of!(BsgUringCmd, dout_xfer_len) == 40);
    assert!(offset_of!(BsgUringCmd, dout_iovec_count) == 44);
    assert!(offset_of!(BsgUringCmd, din_xferp) == 48);
    assert!(offset_of!(BsgUringCmd, din_xfer_len) == 56);
    assert!(offset_of!(BsgUringCmd, din_iovec_count) == 60);
    assert!(offset_of!(BsgUringCmd, timeout_ms) == 64);
    assert!(offset_of!(BsgUringCmd, reserved) == 68);
};

impl BsgUringCmd {
    /// The descriptor of `cdb` moving `len` bytes at `data` in `direction`,
    /// sense into `sense`. Refuses a transfer longer than `u32::MAX`.
    ///
    /// The descriptor names memory by address only; the caller keeps the
    /// CDB, the data and the sense buffer in place until the completion.
    pub fn new(
        cdb: &CdbBuf,
        direction: DataDirection,
        data: *const u8,
        len: usize,
        sense: &[u8; SENSE_LEN],
        timeout: Duration,
    ) -> io::Result<BsgUringCmd> {
        let len = u32::try_from(len).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes exceed bsg's transfer limit of 4 GiB - 1; split the command"),
            )
        })?;
        let cdb = cdb.as_slice();
        let mut c = BsgUringCmd {
            request: cdb.as_ptr() as u64,
            request_len: cdb.len() as u32,
            protocol: BSG_PROTOCOL_SCSI,
            subprotocol: BSG_SUB_PROTOCOL_SCSI_CMD,
            max_response_len: SENSE_LEN as u32,
            response: sense.as_ptr() as u64,
            timeout_ms: timeout_ms(timeout),
            ..BsgUringCmd::default()
        };
        match direction {
            DataDirection::None => {}
            _ if len == 0 => {}
            DataDirection::ToDevice => {
                c.dout_xferp = data as u64;
                c.dout_xfer_len = len;
            }
            DataDirection::FromDevice => {
                c.din_xferp = data as u64;
                c.din_xfer_len = len;
            }
        }
        Ok(c)
    }

    /// The descriptor as the SQE's command bytes.
    pub fn to_bytes(&self) -> [u8; 80] {
        let mut b = [0; 80];
        b.copy_from_slice(self.as_bytes());
        b
    }

    /// Bytes the data phase may move.
    pub fn xfer_len(&self) -> u32 {
        self.dout_xfer_len.max(self.din_xfer_len)
    }
}

/// `timeout` rounded up to whole milliseconds, within `1..=u32::MAX` (0
/// would mean "the default").
fn timeout_ms(timeout: Duration) -> u32 {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).unwrap_or(u32::MAX).max(1)
}

/// The CQE's first extra word for a bsg SCSI command: bits 0–7 the SCSI
/// status, 8–15 the driver status (`DRIVER_SENSE` with CHECK CONDITION),
/// 16–23 the host status, 24–31 the sense bytes written, 32–63 the
/// residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Res2(pub u64);

impl Res2 {
    /// Packs the fields (the kernel's side; for tests and the in-process
    /// model).
    pub fn build(status: u8, driver: u8, host: u8, sense_len: u8, resid: u32) -> Res2 {
        Res2(
            (u64::from(resid) << 32)
                | (u64::from(sense_len) << 24)
                | (u64::from(host) << 16)
                | (u64::from(driver) << 8)
                | u64::from(status),
        )
    }

    /// The SCSI status byte.
    pub fn status(self) -> ScsiStatus {
        ScsiStatus(self.0 as u8)
    }

    /// The driver status.
    pub fn driver_status(self) -> DriverStatus {
        DriverStatus(u16::from((self.0 >> 8) as u8))
    }

    /// The host (path) status.
    pub fn host_status(self) -> HostStatus {
        HostStatus(u16::from((self.0 >> 16) as u8))
    }

    /// Sense bytes the kernel wrote to the response buffer.
    pub fn sense_len(self) -> u8 {
        (self.0 >> 24) as u8
    }

    /// The residual as the kernel reported it.
    pub fn residual(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Decodes a bsg command's CQE into what the sg path reports for the same
/// command: `Err` when the kernel refused or failed the command (`res` a
/// negative errno), else the [`Outcome`] with the sense bytes clipped to
/// what was written and fits `sense`, and the residual clamped to
/// `0..=xfer_len`. Never panics.
pub fn decode(
    res: i32,
    res2: Res2,
    sense: &[u8],
    xfer_len: u32,
    elapsed: Duration,
) -> Result<Outcome, CommandError> {
    if res < 0 {
        let e = io::Error::from_raw_os_error(-res);
        let hint = match -res {
            libc::EOPNOTSUPP => {
                "; this kernel's bsg has no io_uring passthrough (Linux 7.1+ needed), or not for this command (one flat buffer, no BIDI)"
            }
            libc::EPERM => "; vendor and write commands need CAP_SYS_RAWIO and the node open for writing",
            libc::EINVAL => "; the kernel refused the command descriptor (CDB length, protocol)",
            _ => "",
        };
        return Err(CommandError::Io(io::Error::new(
            e.kind(),
            format!("bsg io_uring command failed: {e}{hint}"),
        )));
    }
    let sense_len = usize::from(res2.sense_len()).min(sense.len());
    Ok(Outcome {
        status: res2.status(),
        host_status: res2.host_status(),
        driver_status: res2.driver_status(),
        sense: sense[..sense_len].to_vec(),
        residual: res2.residual().min(xfer_len),
        duration: elapsed,
    })
}

/// The bsg node of the SCSI device behind `path`: `path` itself when it
/// is under `/dev/bsg`, else, for a `/dev/sgN` or `/dev/sdX` (any name),
/// `/dev/bsg/H:C:T:L` found through sysfs. Says why not.
pub fn bsg_node_for(path: &Path) -> Result<PathBuf, String> {
    if path.starts_with(BSG_DIR) {
        return Ok(path.to_owned());
    }
    let meta = fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let kind = if meta.file_type().is_char_device() {
        "char"
    } else if meta.file_type().is_block_device() {
        "block"
    } else {
        return Err(format!("{} is not a device node", path.display()));
    };
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let hctl = hctl_of(Path::new("/sys"), kind, major, minor)?;
    let node = Path::new(BSG_DIR).join(&hctl);
    if node.exists() {
        Ok(node)
    } else {
        Err(format!(
            "{} has no bsg node ({} is missing: bsg is not built in, or devtmpfs did not create it)",
            path.display(),
            node.display()
        ))
    }
}

/// The `H:C:T:L` of the SCSI device behind device `major:minor` of `kind`
/// (`char` or `block`), from `sys` (normally `/sys`).
fn hctl_of(sys: &Path, kind: &str, major: u32, minor: u32) -> Result<String, String> {
    let link = sys
        .join("dev")
        .join(kind)
        .join(format!("{major}:{minor}"))
        .join("device");
    let target = fs::read_link(&link)
        .map_err(|e| format!("{} is not a SCSI device ({}: {e})", link.display(), kind))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parts: Vec<&str> = name.split(':').collect();
    if parts.len() == 4
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.parse::<u64>().is_ok())
    {
        Ok(name)
    } else {
        Err(format!(
            "{} points to {:?}, not a SCSI device H:C:T:L",
            link.display(),
            name
        ))
    }
}

/// The kernel release, for reasons printed to users.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// Why bsg passthrough cannot be used on a device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BsgError {
    /// The device has no bsg node, or it cannot be opened.
    #[error("{0}")]
    Node(String),
    /// io_uring cannot be set up with 128-byte SQEs and 32-byte CQEs, or
    /// lacks `IORING_OP_URING_CMD`.
    #[error("io_uring: {0}")]
    Ring(String),
    /// The kernel refused the probe command: no bsg `uring_cmd` (before 7.1).
    #[error("the kernel ({release}) refused the bsg probe command: {error}")]
    Unsupported {
        /// `uname -r`.
        release: String,
        /// What the probe command returned.
        error: String,
    },
    /// The probe command did not complete in time.
    #[error("the probe command (TEST UNIT READY) on {0} did not complete within 10 s")]
    ProbeTimeout(PathBuf),
    /// The requested depth is out of range.
    #[error("queue depth {0} is out of range 1..={MAX_QUEUE_DEPTH}")]
    Depth(usize),
}

fn open_node(path: &Path) -> Result<OwnedFd, BsgError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| BsgError::Node(format!("cannot open {}: {e}", path.display())))
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry32>;

/// Builds a big-SQE/big-CQE ring, best mode first.
fn build_ring(entries: u32) -> io::Result<(Ring, RingMode)> {
    let mut b = Ring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_r_disabled();
    if let Ok(r) = b.build(entries) {
        return Ok((r, RingMode::DeferTaskrun));
    }
    let mut b = Ring::builder();
    b.setup_coop_taskrun();
    if let Ok(r) = b.build(entries) {
        return Ok((r, RingMode::CoopTaskrun));
    }
    Ring::builder().build(entries).map(|r| (r, RingMode::Plain))
}

/// Whether io_uring here knows `IORING_OP_URING_CMD`.
fn has_uring_cmd(ring: &Ring) -> Result<(), BsgError> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| BsgError::Ring(format!("cannot probe opcodes: {e}")))?;
    if probe.is_supported(opcode::UringCmd80::CODE) {
        Ok(())
    } else {
        Err(BsgError::Ring(
            "IORING_OP_URING_CMD is not supported (Linux 5.19+ needed)".into(),
        ))
    }
}

/// The start-up probe for `bsg` (a bsg node): a throwaway ring (this thread
/// keeps no binding), `IORING_OP_URING_CMD` supported, and a TEST UNIT
/// READY through it that comes back with a SCSI status (any status: a
/// UNIT ATTENTION proves the path as well as GOOD does).
pub fn probe(bsg: &Path) -> Result<Outcome, BsgError> {
    let fd = open_node(bsg)?;
    let mut ring = Ring::builder().build(4).map_err(|e| {
        BsgError::Ring(format!(
            "cannot set up a ring with 128-byte SQEs and 32-byte CQEs: {e}"
        ))
    })?;
    has_uring_cmd(&ring)?;
    // CDB and sense on the heap: leaked if the command does not finish.
    let live = Box::new(Live {
        cmd: Command::no_data(CdbBuf::new(&[0; 6]).expect("6 bytes")),
        sense: [0; SENSE_LEN],
        start: Instant::now(),
        xfer_len: 0,
        fixed: None,
    });
    let desc = BsgUringCmd::new(
        &live.cmd.cdb,
        DataDirection::None,
        std::ptr::null(),
        0,
        &live.sense,
        Duration::from_secs(10),
    )
    .map_err(|e| BsgError::Ring(e.to_string()))?;
    let sqe = opcode::UringCmd80::new(Fd(fd.as_raw_fd()), 0)
        .cmd(desc.to_bytes())
        .build()
        .user_data(1);
    // SAFETY: the SQE names the CDB and sense inside `live`, a Box that is
    // leaked below unless the command's CQE has been seen; it carries no
    // data buffer.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return Err(BsgError::Ring(
            "submission queue full on a fresh ring".into(),
        ));
    }
    let ts = Timespec::from(Duration::from_secs(10));
    let args = SubmitArgs::new().timespec(&ts);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => {
                std::mem::forget(live);
                return Err(BsgError::Ring(format!("io_uring_enter: {e}")));
            }
        }
        if let Some(cqe) = ring.completion().next() {
            let res2 = Res2(cqe.big_cqe()[0]);
            return decode(cqe.result(), res2, &live.sense, 0, live.start.elapsed()).map_err(|e| {
                BsgError::Unsupported {
                    release: kernel_release(),
                    error: e.to_string(),
                }
            });
        }
        if Instant::now() >= deadline {
            // The kernel may still write the sense buffer.
            std::mem::forget(live);
            return Err(BsgError::ProbeTimeout(bsg.to_owned()));
        }
    }
}

/// A command in flight: what the kernel may touch, in one heap allocation
/// that does not move.
struct Live {
    cmd: Command,
    sense: [u8; SENSE_LEN],
    start: Instant,
    xfer_len: u32,
    /// The registered-buffer entry the command uses.
    fixed: Option<u16>,
}

#[derive(Default)]
struct Slot {
    generation: u32,
    live: Option<Box<Live>>,
}

/// One entry of the registered-buffer table.
#[derive(Clone, Copy, Debug)]
struct FixedEntry {
    id: u64,
    base: usize,
    cap: usize,
    last_used: u64,
    in_use: u32,
}

/// What [`UringBsg`] did with buffers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BsgStats {
    /// Commands whose data moved through a registered (fixed) buffer.
    pub fixed: u64,
    /// Commands with data through an unregistered buffer.
    pub unfixed: u64,
    /// Buffers registered (table entries filled or replaced).
    pub registrations: u64,
    /// Why registration is off or last failed, if it is or did.
    pub fixed_note: Option<String>,
}

/// io_uring SCSI passthrough on a bsg node (see the [module docs](self)).
pub struct UringBsg {
    // Declared first so the ring closes before the slots are dropped.
    ring: Ring,
    mode: RingMode,
    bound_to: Option<ThreadId>,
    fd: OwnedFd,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ready: Vec<Completion>,
    path: PathBuf,
    depth: usize,
    in_flight: usize,
    fixed: Vec<Option<FixedEntry>>,
    fixed_by_id: HashMap<u64, u16>,
    fixed_on: bool,
    clock: u64,
    stats: BsgStats,
    wake: Option<Arc<EventFd>>,
    woken: bool,
    /// When the commands queued since the last `io_uring_enter` were
    /// first queued.
    batch_start: Option<Instant>,
}

impl fmt::Debug for UringBsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringBsg")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl UringBsg {
    /// Opens the bsg node `bsg` for up to `depth` commands in flight (no
    /// probe: [`probe`] first, or use [`open_best`](crate::open_best)).
    pub fn open(bsg: impl AsRef<Path>, depth: usize) -> Result<UringBsg, BsgError> {
        let bsg = bsg.as_ref();
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(BsgError::Depth(depth));
        }
        let fd = open_node(bsg)?;
        // One SQE per command plus the waker's poll.
        let entries = (depth + 1).next_power_of_two().max(8) as u32;
        let (ring, mode) = build_ring(entries).map_err(|e| {
            BsgError::Ring(format!(
                "cannot set up a ring with 128-byte SQEs and 32-byte CQEs: {e}"
            ))
        })?;
        has_uring_cmd(&ring)?;
        let mut stats = BsgStats::default();
        let fixed_on = match ring.submitter().register_buffers_sparse(FIXED_SLOTS as u32) {
            Ok(()) => true,
            Err(e) => {
                stats.fixed_note = Some(format!("no registered buffers: {e}"));
                false
            }
        };
        Ok(UringBsg {
            ring,
            mode,
            bound_to: None,
            fd,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..depth as u32).rev().collect(),
            ready: Vec::new(),
            path: bsg.to_owned(),
            depth,
            in_flight: 0,
            fixed: vec![None; if fixed_on { FIXED_SLOTS } else { 0 }],
            fixed_by_id: HashMap::new(),
            fixed_on,
            clock: 0,
            stats,
            wake: None,
            woken: false,
            batch_start: None,
        })
    }

    /// The bsg node.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the ring was set up.
    pub fn ring_mode(&self) -> RingMode {
        self.mode
    }

    /// The node, ring mode and buffer registration, for reasons.
    pub fn describe_short(&self) -> String {
        format!(
            "{}, depth {}, {}, {}",
            self.path.display(),
            self.depth,
            self.mode.name(),
            match (&self.stats.fixed_note, self.fixed_on) {
                (_, true) => format!("{FIXED_SLOTS} registered-buffer slots for pool buffers"),
                (Some(n), false) => n.clone(),
                (None, false) => "unregistered buffers".into(),
            }
        )
    }

    /// Buffer statistics.
    pub fn stats(&self) -> BsgStats {
        self.stats.clone()
    }

    /// A [`Waker`] that ends a blocking [`reap`](Transport::reap) from
    /// another thread.
    pub fn waker(&mut self) -> io::Result<Waker> {
        if let Some(w) = &self.wake {
            return Ok(Waker::new(Arc::clone(w)));
        }
        let efd = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        self.wake = Some(Arc::clone(&efd));
        self.arm_wake()?;
        Ok(Waker::new(efd))
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let Some(efd) = &self.wake else {
            return Ok(());
        };
        let e: squeue::Entry128 = opcode::PollAdd::new(Fd(efd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(UD_WAKE)
            .into();
        // SAFETY: a poll carries no pointer; the eventfd lives as long as
        // the ring (`self.wake` holds it; the ring is dropped first).
        unsafe { self.push(&e) }
    }

    /// Gives up on the commands in flight: waits up to `grace` for them
    /// (their completions come back as usual), then abandons the rest,
    /// each returned with an [`io::ErrorKind::Interrupted`] error (its
    /// outcome is unknown) and an empty buffer; the buffers the device may
    /// still touch are leaked. Consumes the transport.
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
            if let Some(live) = slot.live.take() {
                out.push(Completion {
                    tag: live.cmd.tag,
                    data: Default::default(),
                    result: Err(CommandError::Io(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "command abandoned: bsg cannot abort it, so its outcome is unknown (it may have executed on the device)",
                    ))),
                });
                std::mem::forget(live);
            }
        }
        self.in_flight = 0;
        out
    }

    fn bind(&mut self) -> io::Result<()> {
        if self.mode != RingMode::DeferTaskrun {
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

    /// Queues one SQE, flushing the queue first if it is full.
    ///
    /// # Safety
    ///
    /// Every pointer the entry carries must stay valid until its CQE is
    /// reaped (or the ring is closed and the memory leaked).
    unsafe fn push(&mut self, entry: &squeue::Entry128) -> io::Result<()> {
        // SAFETY: forwarded from this function's contract.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        if self.bound_to.is_some() || self.mode != RingMode::DeferTaskrun {
            self.enter(None)?;
        }
        // SAFETY: as above.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Submits what is queued; with `wait`, blocks until a CQE or the
    /// timeout (`Some(None)`: no limit).
    fn enter(&mut self, wait: Option<Option<Duration>>) -> io::Result<()> {
        self.batch_start = None;
        let len = self.ring.submission().len() as u32;
        let submitter = self.ring.submitter();
        let r = match wait {
            None => {
                // SAFETY: no argument pointer is passed; the SQEs being
                // submitted uphold `push`'s contract.
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

    /// The registered-buffer entry for `buf`, registering it when needed;
    /// `None` to go unregistered.
    fn fixed_index(&mut self, buf: &mut crate::IoBuf) -> Option<u16> {
        if !self.fixed_on || !buf.is_pooled() || buf.is_empty() {
            return None;
        }
        self.clock += 1;
        let id = buf.id();
        let base = buf.base_ptr() as usize;
        let cap = buf.capacity();
        if let Some(&i) = self.fixed_by_id.get(&id) {
            if let Some(e) = &mut self.fixed[usize::from(i)] {
                if e.id == id && e.base == base && e.cap == cap {
                    e.last_used = self.clock;
                    e.in_use += 1;
                    return Some(i);
                }
            }
        }
        // A free entry, else the least recently used idle one.
        let victim = self
            .fixed
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_none_or(|e| e.in_use == 0))
            .min_by_key(|(_, e)| e.map_or(0, |e| e.last_used))
            .map(|(i, _)| i)?;
        let iov = libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: cap,
        };
        // SAFETY: the iovec names the whole live allocation of `buf`. The
        // kernel pins those pages at registration and holds them until the
        // entry is replaced or the ring closes, whatever happens to the
        // allocation meanwhile; an entry is named in an SQE only for the
        // allocation it was registered for (same id, address and capacity,
        // checked above), so no command reaches pages that are no longer
        // the buffer's.
        let r = unsafe {
            self.ring
                .submitter()
                .register_buffers_update(victim as u32, &[iov], None)
        };
        match r {
            Ok(()) => {
                if let Some(old) = self.fixed[victim].take() {
                    self.fixed_by_id.remove(&old.id);
                }
                self.fixed[victim] = Some(FixedEntry {
                    id,
                    base,
                    cap,
                    last_used: self.clock,
                    in_use: 1,
                });
                self.fixed_by_id.insert(id, victim as u16);
                self.stats.registrations += 1;
                Some(victim as u16)
            }
            Err(e) => {
                self.stats.fixed_note = Some(format!("registering a buffer failed: {e}"));
                if e.raw_os_error() != Some(libc::ENOMEM) {
                    self.fixed_on = false;
                }
                None
            }
        }
    }

    fn unuse_fixed(&mut self, i: Option<u16>) {
        if let Some(Some(e)) = i.and_then(|i| self.fixed.get_mut(usize::from(i))) {
            e.in_use = e.in_use.saturating_sub(1);
        }
    }

    fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.live = None;
        slot.generation = next_generation(slot.generation);
        self.free.push(index);
    }

    /// Handles every CQE ready.
    fn drain_cq(&mut self) -> io::Result<()> {
        let cqes: Vec<cqueue::Entry32> = self.ring.completion().collect();
        let mut first_err = None;
        // One clock read for every completion of this pass.
        let now = (!cqes.is_empty()).then(Instant::now);
        for cqe in cqes {
            let ud = cqe.user_data();
            if ud == UD_WAKE {
                if let Some(efd) = &self.wake {
                    let _ = efd.read();
                }
                self.woken = true;
                if !cqueue::more(cqe.flags()) {
                    self.arm_wake()?;
                }
                continue;
            }
            let (index, generation) = split_token(ud);
            let live = match self.slots.get_mut(index as usize) {
                Some(slot) if slot.generation == generation && slot.live.is_some() => {
                    slot.live.take()
                }
                _ => None,
            };
            let Some(live) = live else {
                first_err.get_or_insert(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: a bsg completion names no command in flight (user_data {ud:#x})",
                        self.path.display()
                    ),
                ));
                continue;
            };
            let res2 = Res2(cqe.big_cqe()[0]);
            let result = decode(
                cqe.result(),
                res2,
                &live.sense,
                live.xfer_len,
                now.map_or(Duration::ZERO, |n| n.saturating_duration_since(live.start)),
            );
            match &result {
                Err(_) => {}
                Ok(_) if live.xfer_len == 0 => {}
                Ok(_) if live.fixed.is_some() => self.stats.fixed += 1,
                Ok(_) => self.stats.unfixed += 1,
            }
            self.unuse_fixed(live.fixed);
            self.in_flight -= 1;
            let Live { cmd, .. } = *live;
            self.ready.push(Completion {
                tag: cmd.tag,
                data: cmd.data,
                result,
            });
            self.release(index);
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for UringBsg {
    fn drop(&mut self) {
        // The kernel may still write sense and data of what is in flight.
        for slot in &mut self.slots {
            if let Some(live) = slot.live.take() {
                std::mem::forget(live);
            }
        }
    }
}

fn refuse(cmd: Command, error: io::Error) -> SubmitError {
    SubmitError {
        cmd: Box::new(cmd),
        error: CommandError::Io(error),
    }
}

impl Transport for UringBsg {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        if let Err(e) = self.bind() {
            return Err(refuse(cmd, e));
        }
        if self.in_flight >= self.depth {
            let msg = format!(
                "{}: {} commands in flight (queue depth {}); reap before submitting more",
                self.path.display(),
                self.in_flight,
                self.depth
            );
            return Err(refuse(cmd, io::Error::new(io::ErrorKind::WouldBlock, msg)));
        }
        let Some(index) = self.free.pop() else {
            let msg = format!("{}: no free command slot", self.path.display());
            return Err(refuse(cmd, io::Error::new(io::ErrorKind::WouldBlock, msg)));
        };
        // Commands queued between two io_uring_enter calls reach the
        // kernel together: one clock read stamps the batch.
        let start = *self.batch_start.get_or_insert_with(Instant::now);
        let mut live = Box::new(Live {
            cmd,
            sense: [0; SENSE_LEN],
            start,
            xfer_len: 0,
            fixed: None,
        });
        let len = live.cmd.transfer_len();
        if len > 0 {
            live.fixed = self.fixed_index(&mut live.cmd.data);
        }
        let data = live.cmd.data.as_mut_ptr().cast_const();
        let desc = match BsgUringCmd::new(
            &live.cmd.cdb,
            live.cmd.direction,
            data,
            len,
            &live.sense,
            live.cmd.timeout,
        ) {
            Ok(d) => d,
            Err(e) => {
                self.unuse_fixed(live.fixed);
                self.free.push(index);
                return Err(refuse(live.cmd, e));
            }
        };
        live.xfer_len = desc.xfer_len();
        let slot = &mut self.slots[index as usize];
        if slot.generation == 0 {
            slot.generation = 1;
        }
        let t = token(index, slot.generation);
        let mut op = opcode::UringCmd80::new(Fd(self.fd.as_raw_fd()), 0).cmd(desc.to_bytes());
        if let Some(i) = live.fixed {
            op = op.buf_index(Some(i));
        }
        let entry = op.build().user_data(t);
        slot.live = Some(live);
        self.in_flight += 1;
        // SAFETY: the entry names the CDB and sense inside the slot's Box
        // and the data pages of its IoBuf; the Box stays in the slot (and
        // its contents unmoved) until this command's CQE is reaped, and is
        // leaked if the transport goes before (see `Drop`).
        if let Err(e) = unsafe { self.push(&entry) } {
            let live = self.slots[index as usize].live.take();
            self.in_flight -= 1;
            self.release(index);
            let Some(live) = live else {
                return Err(SubmitError {
                    cmd: Box::new(Command::no_data(CdbBuf::new(&[0]).expect("1 byte"))),
                    error: CommandError::Io(e),
                });
            };
            self.unuse_fixed(live.fixed);
            return Err(refuse(live.cmd, e));
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let before = out.len();
        if self.in_flight == 0 && self.ready.is_empty() {
            return Ok(0);
        }
        self.bind()?;
        // One io_uring_enter both submits the batch and, when the caller
        // may wait and nothing is ready yet, waits for the first CQE: one
        // syscall per command at queue depth 1. The clock is read only
        // for a bounded wait (a clock read is a syscall in some guests).
        let first = match wait {
            _ if !self.ready.is_empty() || self.in_flight == 0 => None,
            Some(w) if w.is_zero() => None,
            Some(w) => Some(Some(w)),
            None => Some(None),
        };
        let deadline = match wait {
            Some(w) if !w.is_zero() && first.is_some() => Some(Instant::now() + w),
            Some(_) => Some(Instant::now()),
            None => None,
        };
        self.enter(first)?;
        let mut result = self.drain_cq();
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
            "{} (io_uring bsg passthrough, depth {}, {}, {})",
            self.path.display(),
            self.depth,
            self.mode.name(),
            if self.fixed_on {
                "registered pool buffers"
            } else {
                "unregistered buffers"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::{Asc, Sense, SenseKey};
    use crate::IoBuf;

    #[test]
    fn descriptor_bytes_for_read_and_write() {
        let cdb = CdbBuf::new(&[0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]).unwrap();
        let sense = [0u8; SENSE_LEN];
        let buf = IoBuf::new(4096);
        let d = BsgUringCmd::new(
            &cdb,
            DataDirection::FromDevice,
            buf.as_ptr(),
            4096,
            &sense,
            Duration::from_millis(1500),
        )
        .unwrap();
        let b = d.to_bytes();
        assert_eq!(
            u64::from_ne_bytes(b[0..8].try_into().unwrap()),
            cdb.as_slice().as_ptr() as u64
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 10);
        assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 96);
        assert_eq!(
            u64::from_ne_bytes(b[48..56].try_into().unwrap()),
            buf.as_ptr() as u64
        );
        assert_eq!(u32::from_ne_bytes(b[56..60].try_into().unwrap()), 4096);
        assert_eq!(&b[32..48], &[0; 16], "no data-out");
        assert_eq!(u32::from_ne_bytes(b[64..68].try_into().unwrap()), 1500);
        assert_eq!(&b[68..], &[0; 12]);

        let w = BsgUringCmd::new(
            &cdb,
            DataDirection::ToDevice,
            buf.as_ptr(),
            512,
            &sense,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(
            (w.dout_xfer_len, w.din_xfer_len, w.xfer_len()),
            (512, 0, 512)
        );
        assert_eq!(w.timeout_ms, 1, "0 would mean the default");
        let n = BsgUringCmd::new(
            &cdb,
            DataDirection::None,
            buf.as_ptr(),
            4096,
            &sense,
            Duration::MAX,
        )
        .unwrap();
        assert_eq!((n.dout_xferp, n.din_xferp, n.xfer_len()), (0, 0, 0));
        assert_eq!(n.timeout_ms, u32::MAX);
    }

    #[test]
    fn res2_round_trip_and_decode() {
        let r = Res2::build(0x02, 0x08, 0x00, 18, 512);
        assert_eq!(r.status(), ScsiStatus::CHECK_CONDITION);
        assert_eq!(r.driver_status(), DriverStatus::SENSE);
        assert_eq!(r.host_status(), HostStatus::OK);
        assert_eq!((r.sense_len(), r.residual()), (18, 512));

        let mut sense = [0u8; SENSE_LEN];
        let s = Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB);
        let bytes = s.to_bytes();
        sense[..bytes.len()].copy_from_slice(&bytes);
        let o = decode(
            0,
            Res2::build(2, 8, 0, bytes.len() as u8, 512),
            &sense,
            4096,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(o.sense, bytes);
        assert_eq!(o.residual, 512);
        match o.check() {
            Err(CommandError::CheckCondition(got)) => assert_eq!(got, s),
            other => panic!("{other:?}"),
        }
        // The kernel's values clipped: residual beyond the transfer, sense
        // longer than the buffer.
        let o = decode(
            0,
            Res2::build(0, 0, 0, 255, u32::MAX),
            &sense,
            4096,
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!((o.residual, o.sense.len()), (4096, SENSE_LEN));
        // Timeout and path errors classify as on sg.
        let o = decode(0, Res2::build(0, 0, 0x03, 0, 0), &sense, 0, Duration::ZERO).unwrap();
        assert!(matches!(o.check(), Err(CommandError::Timeout(_))));
        let e = decode(-libc::EOPNOTSUPP, Res2(0), &sense, 0, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("7.1"), "{e}");
        let e = decode(-libc::EPERM, Res2(0), &sense, 0, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("CAP_SYS_RAWIO"), "{e}");
    }

    #[test]
    fn hctl_from_sysfs() {
        let dir = std::env::temp_dir().join(format!("stp-bsg-sys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("dev/char")).unwrap();
        fs::create_dir_all(dir.join("dev/block")).unwrap();
        fs::create_dir_all(dir.join("dev/char/21:0")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0/host0/target0:0:1/0:0:1:0",
            dir.join("dev/char/21:0/device"),
        )
        .unwrap();
        fs::create_dir_all(dir.join("dev/block/8:0")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/x/2:0:0:7",
            dir.join("dev/block/8:0/device"),
        )
        .unwrap();
        fs::create_dir_all(dir.join("dev/char/1:3")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/virtual/mem",
            dir.join("dev/char/1:3/device"),
        )
        .unwrap();
        assert_eq!(hctl_of(&dir, "char", 21, 0).unwrap(), "0:0:1:0");
        assert_eq!(hctl_of(&dir, "block", 8, 0).unwrap(), "2:0:0:7");
        let e = hctl_of(&dir, "char", 1, 3).unwrap_err();
        assert!(e.contains("not a SCSI device"), "{e}");
        let e = hctl_of(&dir, "char", 9, 9).unwrap_err();
        assert!(e.contains("not a SCSI device"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nodes_that_are_not_scsi_say_why() {
        let e = bsg_node_for(Path::new("/dev/null")).unwrap_err();
        assert!(e.contains("not a SCSI device"), "{e}");
        let e = bsg_node_for(Path::new("/nonexistent/sg3")).unwrap_err();
        assert!(e.starts_with("cannot stat"), "{e}");
        let e = bsg_node_for(Path::new("/etc/hostname")).unwrap_err();
        assert!(e.contains("not a device node"), "{e}");
        assert_eq!(
            bsg_node_for(Path::new("/dev/bsg/0:0:1:0")).unwrap(),
            Path::new("/dev/bsg/0:0:1:0")
        );
        assert!(matches!(
            UringBsg::open("/dev/null", 0),
            Err(BsgError::Depth(0))
        ));
    }

    /// `/dev/null` implements `uring_cmd` as a no-op that completes with 0
    /// (Linux 6.0+, meant for testing io_uring passthrough): the ring, the
    /// SQE128/CQE32 layout, submission, buffer registration, completion
    /// routing and decoding all run on the machine's own kernel. Skips
    /// where the kernel refuses.
    #[test]
    fn engine_round_trip_on_dev_null() {
        match probe(Path::new("/dev/null")) {
            Ok(o) => assert_eq!(o.status, ScsiStatus::GOOD),
            Err(e) => {
                eprintln!("skipped: /dev/null takes no uring_cmd here: {e}");
                return;
            }
        }
        let mut t = UringBsg::open("/dev/null", 8).unwrap();
        let pool = crate::pool::BufPool::new(1 << 20);
        let cdb = CdbBuf::new(&[0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]).unwrap();
        let mut out = Vec::new();
        for round in 0..3u64 {
            for i in 0..8u64 {
                let mut cmd = Command::data_in(cdb, 0).with_tag(round * 8 + i);
                cmd.data = pool.get(4096);
                cmd.timeout = Duration::from_secs(1);
                t.submit(cmd).unwrap();
            }
            // A ninth is refused and handed back whole.
            let e = t.submit(Command::no_data(cdb).with_tag(99)).unwrap_err();
            assert_eq!(e.cmd.tag, 99);
            while t.in_flight() > 0 {
                t.reap(&mut out, Some(Duration::from_secs(5))).unwrap();
            }
            for c in out.drain(..) {
                let (data, outcome) = c.into_result().unwrap();
                assert_eq!((data.len(), outcome.residual), (4096, 0));
                pool.put(data);
            }
        }
        let s = t.stats();
        eprintln!("{}: {s:?}", t.describe());
        if s.fixed_note.is_none() {
            assert_eq!(s.fixed, 24, "every pooled buffer went registered");
            assert_eq!(s.registrations, 8, "registered once each, then reused");
        }
        // An unpooled buffer goes unregistered.
        let mut cmd = Command::data_out(cdb, IoBuf::new(512));
        cmd.timeout = Duration::from_secs(1);
        assert!(t.execute(cmd).into_result().is_ok());
        assert_eq!(t.stats().unfixed, 1);
        // The ring binds to this thread: another is refused, not served.
        let t = std::thread::scope(|s| {
            s.spawn(move || {
                let e = t.submit(Command::no_data(cdb)).unwrap_err();
                assert!(
                    e.error.to_string().contains("bound to the thread"),
                    "{}",
                    e.error
                );
                t
            })
            .join()
            .unwrap()
        });
        assert!(t.cancel(Duration::ZERO).is_empty());
    }
}
