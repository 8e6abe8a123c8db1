//! The Linux SCSI generic (sg) v3 interface and a synchronous `SG_IO`
//! [`Transport`].
//!
//! # The sg v3 interface
//!
//! User space describes one SCSI command in a `struct sg_io_hdr`
//! ([`SgIoHdr`]): the CDB, the data direction and buffer, a sense buffer, a
//! timeout and flags. The kernel fills in the result fields of the same
//! header: SCSI status, host (path) and driver status, residual count,
//! sense length, duration and `info` bits. The header can be handed over in
//! two ways:
//!
//! * `ioctl(fd, SG_IO, &hdr)` runs the command and blocks until it finishes.
//!   It works on `/dev/sgN` and on SCSI block devices (`/dev/sdX`, through
//!   the block layer). [`SgDevice`] uses this.
//! * `write(fd, &hdr)` queues the command and `read(fd, &hdr)` collects a
//!   completion, on a `/dev/sgN` opened `O_NONBLOCK`. The sg driver allows at
//!   most 16 outstanding commands per file descriptor; the 17th `write()`
//!   fails with `EDOM`, so an asynchronous engine must cap its depth per fd
//!   (or open more fds). io_uring has no passthrough opcode for `/dev/sg`
//!   (sg implements no `uring_cmd`), so such an engine queues these same
//!   `write()`/`read()` calls as ordinary io_uring WRITE/READ operations.
//!   [`SgIoHdr::for_command`] and [`SgIoHdr::outcome`] are shared by both
//!   paths.
//!
//! # Buffer lifetime invariant
//!
//! A header holds raw pointers into memory owned by a
//! [`Command`] and a sense buffer; the kernel dereferences
//! them, Rust cannot check them. The CDB (`cmdp`, pointing into the
//! `Command` itself) must stay put until the submitting call returns: the
//! kernel copies it at submission. The data buffer (`dxferp`, the heap pages
//! of the command's [`IoBuf`](crate::IoBuf), which do not move when the
//! `Command` moves) and the sense buffer (`sbp`) must stay allocated, and
//! the data buffer must not be resized, until the completion has been
//! collected. Every operation that hands a header to the kernel lives in
//! this module and upholds this; the header itself is inert data.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::{Duration, Instant};

use nix::libc::{c_int, c_void};

use crate::status::{DriverStatus, HostStatus, ScsiStatus};
use crate::transport::{
    Command, CommandError, Completion, DataDirection, Outcome, SubmitError, Transport,
};

/// `ioctl` request: run one command synchronously.
pub const SG_IO: u32 = 0x2285;
/// `ioctl` request: read the sg driver version (e.g. 30536 for 3.5.36).
pub const SG_GET_VERSION_NUM: u32 = 0x2282;

/// `interface_id` of a v3 header (`'S'`).
pub const SG_INTERFACE_ID: i32 = b'S' as i32;
/// The lowest driver version that speaks the v3 interface.
pub const SG_V3_MIN_VERSION: u32 = 30000;

/// No data phase.
pub const SG_DXFER_NONE: i32 = -1;
/// Data-out: user memory to device.
pub const SG_DXFER_TO_DEV: i32 = -2;
/// Data-in: device to user memory.
pub const SG_DXFER_FROM_DEV: i32 = -3;
/// Data-in through a buffer pre-filled with data-out (indirect I/O only).
pub const SG_DXFER_TO_FROM_DEV: i32 = -4;

/// `flags`: ask for direct I/O (DMA to user pages).
pub const SG_FLAG_DIRECT_IO: u32 = 1;
/// `flags`: use the fd's mmap()ed reserved buffer.
pub const SG_FLAG_MMAP_IO: u32 = 4;
/// `flags`: queue at the tail of the device queue (sg's default is the head).
pub const SG_FLAG_Q_AT_TAIL: u32 = 0x10;
/// `flags`: queue at the head (the block layer's default is the tail).
pub const SG_FLAG_Q_AT_HEAD: u32 = 0x20;

/// `info` mask: OK versus CHECK.
pub const SG_INFO_OK_MASK: u32 = 0x1;
/// `info`: something other than GOOD happened (status, host or driver).
pub const SG_INFO_CHECK: u32 = 0x1;
/// `info` mask: how the data moved.
pub const SG_INFO_DIRECT_IO_MASK: u32 = 0x6;
/// `info`: the data moved by direct I/O.
pub const SG_INFO_DIRECT_IO: u32 = 0x2;
/// `info`: part of the data moved by direct I/O, part was copied.
pub const SG_INFO_MIXED_IO: u32 = 0x4;

/// Sense buffer size handed to the kernel: the kernel keeps at most
/// `SCSI_SENSE_BUFFERSIZE` (96) bytes of sense per command.
pub const SENSE_LEN: usize = 96;

/// Commands [`SgDevice`] holds before they must be reaped. `SG_IO` runs one
/// command at a time, so a deeper queue would only pin more buffers.
pub const SYNC_QUEUE_DEPTH: usize = 1;

bitflags::bitflags! {
    /// Request flags of a v3 header (`sg_io_hdr.flags`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SgFlags: u32 {
        /// Ask for direct I/O. The sg driver honours it only when
        /// `/sys/module/sg/parameters/allow_dio` is 1 (there is no `/proc/scsi/sg/allow_dio` on 6.x kernels) and the buffer is suitably
        /// aligned; otherwise it copies. [`SgInfo`] reports what happened.
        const DIRECT_IO = SG_FLAG_DIRECT_IO;
        /// Use the mmap()ed reserved buffer instead of `dxferp`.
        const MMAP_IO = SG_FLAG_MMAP_IO;
        /// Queue at the tail of the device queue.
        const Q_AT_TAIL = SG_FLAG_Q_AT_TAIL;
        /// Queue at the head of the device queue.
        const Q_AT_HEAD = SG_FLAG_Q_AT_HEAD;
    }
}

bitflags::bitflags! {
    /// Result bits of a v3 header (`sg_io_hdr.info`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct SgInfo: u32 {
        /// Something other than GOOD happened (status, host or driver).
        const CHECK = SG_INFO_CHECK;
        /// The data moved by direct I/O.
        const DIRECT_IO = SG_INFO_DIRECT_IO;
        /// The data moved partly by direct I/O, partly by copying.
        const MIXED_IO = SG_INFO_MIXED_IO;
    }
}

impl SgInfo {
    /// True when the whole transfer used direct I/O (not copied, not mixed).
    /// Block-device `SG_IO` never sets this bit.
    pub fn used_direct_io(self) -> bool {
        self.bits() & SG_INFO_DIRECT_IO_MASK == SG_INFO_DIRECT_IO
    }
}

/// Padding after `pack_id` so `usr_ptr` is pointer-aligned: 4 bytes on
/// 64-bit targets, none on 32-bit.
const PAD_AFTER_PACK_ID: usize = std::mem::size_of::<usize>() - 4;
/// Tail padding to a multiple of the pointer alignment (likewise).
const PAD_TAIL: usize = std::mem::size_of::<usize>() - 4;

/// `struct sg_io_hdr` from `<scsi/sg.h>`, field for field.
///
/// The padding the C compiler inserts is spelled out as zeroed fields, so
/// every byte of the struct is initialised.
///
/// The pointer fields refer to buffers owned by a [`Command`] and a sense
/// buffer (see the [module docs](self) for how long they must live). Only
/// code in this module gives a header to the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SgIoHdr {
    pub(crate) interface_id: i32,
    pub(crate) dxfer_direction: i32,
    pub(crate) cmd_len: u8,
    pub(crate) mx_sb_len: u8,
    pub(crate) iovec_count: u16,
    pub(crate) dxfer_len: u32,
    pub(crate) dxferp: *mut c_void,
    pub(crate) cmdp: *const u8,
    pub(crate) sbp: *mut u8,
    pub(crate) timeout: u32,
    pub(crate) flags: u32,
    pub(crate) pack_id: i32,
    _pad0: [u8; PAD_AFTER_PACK_ID],
    pub(crate) usr_ptr: *mut c_void,
    pub(crate) status: u8,
    pub(crate) masked_status: u8,
    pub(crate) msg_status: u8,
    pub(crate) sb_len_wr: u8,
    pub(crate) host_status: u16,
    pub(crate) driver_status: u16,
    pub(crate) resid: i32,
    pub(crate) duration: u32,
    pub(crate) info: u32,
    _pad1: [u8; PAD_TAIL],
}

// The kernel's layout (x86_64, aarch64 and every other LP64 target).
#[cfg(target_pointer_width = "64")]
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<SgIoHdr>() == 88);
    assert!(offset_of!(SgIoHdr, interface_id) == 0);
    assert!(offset_of!(SgIoHdr, dxfer_direction) == 4);
    assert!(offset_of!(SgIoHdr, cmd_len) == 8);
    assert!(offset_of!(SgIoHdr, mx_sb_len) == 9);
    assert!(offset_of!(SgIoHdr, iovec_count) == 10);
    assert!(offset_of!(SgIoHdr, dxfer_len) == 12);
    assert!(offset_of!(SgIoHdr, dxferp) == 16);
    assert!(offset_of!(SgIoHdr, cmdp) == 24);
    assert!(offset_of!(SgIoHdr, sbp) == 32);
    assert!(offset_of!(SgIoHdr, timeout) == 40);
    assert!(offset_of!(SgIoHdr, flags) == 44);
    assert!(offset_of!(SgIoHdr, pack_id) == 48);
    assert!(offset_of!(SgIoHdr, usr_ptr) == 56);
    assert!(offset_of!(SgIoHdr, status) == 64);
    assert!(offset_of!(SgIoHdr, sb_len_wr) == 67);
    assert!(offset_of!(SgIoHdr, host_status) == 68);
    assert!(offset_of!(SgIoHdr, driver_status) == 70);
    assert!(offset_of!(SgIoHdr, resid) == 72);
    assert!(offset_of!(SgIoHdr, duration) == 76);
    assert!(offset_of!(SgIoHdr, info) == 80);
};

#[cfg(target_pointer_width = "32")]
const _: () = {
    assert!(std::mem::size_of::<SgIoHdr>() == 64);
    assert!(std::mem::offset_of!(SgIoHdr, usr_ptr) == 40);
    assert!(std::mem::offset_of!(SgIoHdr, info) == 60);
};

// SAFETY: a header is plain data; its pointers are only addresses until code
// in this module hands the header to the kernel, and the validity of the
// memory they name is tied to the owning `Command`, not to a thread.
unsafe impl Send for SgIoHdr {}

impl Default for SgIoHdr {
    fn default() -> SgIoHdr {
        SgIoHdr::new()
    }
}

impl SgIoHdr {
    /// A v3 header (`interface_id` `'S'`) with no data phase, null pointers
    /// and every other field zero.
    pub const fn new() -> SgIoHdr {
        SgIoHdr {
            interface_id: SG_INTERFACE_ID,
            dxfer_direction: SG_DXFER_NONE,
            cmd_len: 0,
            mx_sb_len: 0,
            iovec_count: 0,
            dxfer_len: 0,
            dxferp: ptr::null_mut(),
            cmdp: ptr::null(),
            sbp: ptr::null_mut(),
            timeout: 0,
            flags: 0,
            pack_id: 0,
            _pad0: [0; PAD_AFTER_PACK_ID],
            usr_ptr: ptr::null_mut(),
            status: 0,
            masked_status: 0,
            msg_status: 0,
            sb_len_wr: 0,
            host_status: 0,
            driver_status: 0,
            resid: 0,
            duration: 0,
            info: 0,
            _pad1: [0; PAD_TAIL],
        }
    }

    /// A header for `cmd`, pointing at its CDB, its data buffer and `sense`.
    ///
    /// The timeout is `cmd.timeout` rounded up to whole milliseconds, at
    /// least 1 ms and at most `u32::MAX` ms. With [`DataDirection::None`],
    /// or an empty buffer, `dxferp` is null.
    ///
    /// Fails with [`io::ErrorKind::InvalidInput`] when the data buffer is
    /// longer than `u32::MAX` bytes, the most `dxfer_len` can describe: the
    /// command must be split. (Describing only a prefix of the buffer would
    /// silently move less data than the caller asked for.)
    ///
    /// The header borrows nothing, but names memory in `cmd` and `sense`:
    /// submit it before `cmd` moves (the CDB lives inside `cmd`) and keep
    /// the data buffer and `sense` alive and unresized until the completion
    /// is collected (see the [module docs](self)).
    pub fn for_command(
        cmd: &mut Command,
        sense: &mut [u8; SENSE_LEN],
        flags: SgFlags,
    ) -> io::Result<SgIoHdr> {
        let (direction, len) = match cmd.direction {
            DataDirection::None => (SG_DXFER_NONE, 0),
            DataDirection::ToDevice => (SG_DXFER_TO_DEV, cmd.data.len()),
            DataDirection::FromDevice => (SG_DXFER_FROM_DEV, cmd.data.len()),
        };
        let dxfer_len = dxfer_len(len)?;
        let dxferp = if dxfer_len == 0 {
            ptr::null_mut()
        } else {
            cmd.data.as_mut_ptr().cast::<c_void>()
        };
        let cdb = cmd.cdb.as_slice();
        Ok(SgIoHdr {
            dxfer_direction: direction,
            // A CdbBuf holds 1 to 16 bytes.
            cmd_len: cdb.len() as u8,
            mx_sb_len: SENSE_LEN as u8,
            dxfer_len,
            dxferp,
            cmdp: cdb.as_ptr(),
            sbp: sense.as_mut_ptr(),
            timeout: timeout_ms(cmd.timeout),
            flags: flags.bits(),
            ..SgIoHdr::new()
        })
    }

    /// Decodes the completed header into an [`Outcome`], faithfully: status,
    /// host and driver status as the kernel wrote them (classify with
    /// [`Outcome::check`]).
    ///
    /// `sense` is the buffer the header pointed at; the sense bytes are the
    /// first `sb_len_wr` of it, clipped to `mx_sb_len` and `sense.len()`.
    /// The residual is clamped to `0..=dxfer_len`. `elapsed` becomes the
    /// duration (pass [`SgIoHdr::duration`] when no finer clock is at hand).
    pub fn outcome(&self, sense: &[u8], elapsed: Duration) -> Outcome {
        let sense_len = usize::from(self.sb_len_wr)
            .min(usize::from(self.mx_sb_len))
            .min(sense.len());
        Outcome {
            status: self.status(),
            host_status: self.host_status(),
            driver_status: self.driver_status(),
            sense: sense[..sense_len].to_vec(),
            residual: self.residual(),
            duration: elapsed,
        }
    }

    /// The data transfer length.
    pub fn dxfer_len(&self) -> u32 {
        self.dxfer_len
    }

    /// The request flags (unknown bits kept).
    pub fn flags(&self) -> SgFlags {
        SgFlags::from_bits_retain(self.flags)
    }

    /// The timeout in milliseconds.
    pub fn timeout_ms(&self) -> u32 {
        self.timeout
    }

    /// The caller's packet id (echoed back by the kernel; sg's `read()` can
    /// select on it).
    pub fn pack_id(&self) -> i32 {
        self.pack_id
    }

    /// Sets the packet id.
    pub fn set_pack_id(&mut self, pack_id: i32) {
        self.pack_id = pack_id;
    }

    /// The SCSI status byte.
    pub fn status(&self) -> ScsiStatus {
        ScsiStatus(self.status)
    }

    /// The host (path) status.
    pub fn host_status(&self) -> HostStatus {
        HostStatus(self.host_status)
    }

    /// The driver status.
    pub fn driver_status(&self) -> DriverStatus {
        DriverStatus(self.driver_status)
    }

    /// The residual, clamped to `0..=dxfer_len`.
    pub fn residual(&self) -> u32 {
        u32::try_from(self.resid).unwrap_or(0).min(self.dxfer_len)
    }

    /// The kernel's duration (millisecond granularity).
    pub fn duration(&self) -> Duration {
        Duration::from_millis(u64::from(self.duration))
    }

    /// The `info` result bits (unknown bits kept).
    pub fn info(&self) -> SgInfo {
        SgInfo::from_bits_retain(self.info)
    }
}

/// A data buffer length as `dxfer_len`; over `u32::MAX` is refused.
fn dxfer_len(len: usize) -> io::Result<u32> {
    u32::try_from(len).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{len} bytes exceed the sg transfer limit of {} bytes (4 GiB - 1); split the command",
                u32::MAX
            ),
        )
    })
}

/// The error an `SG_IO` interrupted by a signal (`EINTR`) completes with.
///
/// The sg driver does not cancel an interrupted command: it orphans it and
/// the device may still execute it (or already has). Nothing tells the
/// caller which, so the outcome is reported as unknown rather than as a
/// plain, retryable interruption.
fn interrupted_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        "SG_IO was interrupted by a signal: the command's outcome is unknown \
         (it may have executed on the device); check the device state before retrying",
    )
}

/// `timeout` rounded up to whole milliseconds, within `1..=u32::MAX`.
fn timeout_ms(timeout: Duration) -> u32 {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).unwrap_or(u32::MAX).max(1)
}

mod ffi {
    use super::SgIoHdr;
    use nix::libc::c_int;

    nix::ioctl_readwrite_bad!(sg_io, super::SG_IO, SgIoHdr);
    nix::ioctl_read_bad!(sg_get_version_num, super::SG_GET_VERSION_NUM, c_int);
}

/// Asks the driver behind `fd` for its sg version number.
pub(crate) fn sg_version(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut version: c_int = 0;
    // SAFETY: request 0x2282 belongs to the sg ioctl range (type 0x22,
    // reserved for <scsi/sg.h>); sg and the block layer write one int through
    // the pointer, other drivers fail with ENOTTY without touching it.
    // `version` is a live, exclusively borrowed c_int and `fd` is open.
    unsafe { ffi::sg_get_version_num(fd.as_raw_fd(), &mut version) }.map_err(io::Error::from)?;
    u32::try_from(version)
        .ok()
        .filter(|&v| v >= SG_V3_MIN_VERSION)
        .ok_or_else(|| {
            io::Error::other(format!(
                "driver version {version} predates the sg v3 interface (needs {SG_V3_MIN_VERSION})"
            ))
        })
}

/// Runs `cmd` synchronously with `SG_IO`, its sense going to `sense`.
/// Returns the header as the kernel left it.
///
/// If a signal interrupts the command (`EINTR`), the kernel orphans it: it
/// may still run, so the error says the outcome is unknown
/// ([`interrupted_error`]). An orphaned direct-I/O command may still DMA
/// into the data buffer later, so that buffer is leaked (the command gets
/// an empty one) rather than returned for reuse. (A signal whose handler
/// was installed with `SA_RESTART` does not reach us at all: the kernel
/// restarts `SG_IO` with the same buffers, which is why direct I/O is off
/// by default; see [`SgDevice::set_direct_io`].)
fn sg_io(
    fd: BorrowedFd<'_>,
    cmd: &mut Command,
    sense: &mut [u8; SENSE_LEN],
    flags: SgFlags,
) -> io::Result<SgIoHdr> {
    let mut hdr = SgIoHdr::for_command(cmd, sense, flags)?;
    // SAFETY: `hdr` was built just above from `cmd` and `sense`, which stay
    // exclusively borrowed for this whole function, so `cmdp`, `dxferp` and
    // `sbp` name live memory of at least `cmd_len`, `dxfer_len` and
    // `mx_sb_len` bytes that nothing else touches. SG_IO is synchronous: the
    // kernel is done with that memory when the ioctl returns, except for an
    // interrupted direct-I/O command, whose buffer is leaked below. `hdr` is
    // a valid sg_io_hdr, exclusively borrowed, for the kernel to update.
    let result = unsafe { ffi::sg_io(fd.as_raw_fd(), &mut hdr) };
    match result.map_err(io::Error::from) {
        Ok(_) => Ok(hdr),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            if hdr.flags().contains(SgFlags::DIRECT_IO) && hdr.dxfer_len > 0 {
                std::mem::forget(std::mem::take(&mut cmd.data));
            }
            Err(interrupted_error())
        }
        Err(e) => Err(e),
    }
}

/// What to try when opening a device node failed.
fn open_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "; run as root or join the group that owns the node (often `disk`)"
        }
        io::ErrorKind::NotFound => "; list the devices this host has with `stp probe`",
        _ => "",
    }
}

/// Why an [`SgDevice`] could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SgError {
    /// The node could not be opened.
    #[error("cannot open {}: {source}{}", path.display(), open_hint(source))]
    Open {
        /// The path given.
        path: PathBuf,
        /// The error from `open(2)`.
        source: io::Error,
    },
    /// The engine forced with `STP_ENGINE` / `--engine` cannot run on the
    /// node (or the variable is malformed).
    #[error("{}: the {engine} engine cannot be used: {why}", path.display())]
    EngineUnavailable {
        /// The path given.
        path: PathBuf,
        /// The engine asked for.
        engine: &'static str,
        /// Why it cannot run.
        why: String,
    },
    /// The node opened but does not speak the sg protocol.
    #[error(
        "{} is not a SCSI generic or SCSI block device (SG_GET_VERSION_NUM failed: {source}); pick a /dev/sgN or /dev/sdX",
        path.display()
    )]
    NotSg {
        /// The path given.
        path: PathBuf,
        /// Why `SG_GET_VERSION_NUM` failed.
        source: io::Error,
    },
}

/// A `/dev/sgN` or `/dev/sdX` driven with synchronous `SG_IO`.
///
/// [`submit`](Transport::submit) runs the command to completion and queues
/// its [`Completion`]; [`reap`](Transport::reap) hands queued completions
/// back without blocking. At most [`SYNC_QUEUE_DEPTH`] completions wait to
/// be reaped. Commands are queued at the tail of the device queue
/// ([`SgFlags::Q_AT_TAIL`]) so bulk transfers do not jump other I/O.
/// Direct I/O is off unless [`set_direct_io`](SgDevice::set_direct_io)
/// turns it on (read its caveat about signals first).
#[derive(Debug)]
pub struct SgDevice {
    fd: OwnedFd,
    path: PathBuf,
    version: u32,
    flags: SgFlags,
    done: VecDeque<Completion>,
    direct_io: u64,
    copied_io: u64,
}

impl SgDevice {
    /// Opens `path` read-write (`O_CLOEXEC`, and `O_NONBLOCK` so an
    /// exclusive holder makes this fail with `EBUSY` instead of waiting;
    /// `SG_IO` itself still blocks) and checks with `SG_GET_VERSION_NUM`
    /// that it speaks sg v3.
    pub fn open(path: impl AsRef<Path>) -> Result<SgDevice, SgError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| SgError::Open {
                path: path.to_owned(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let version = sg_version(fd.as_fd()).map_err(|source| SgError::NotSg {
            path: path.to_owned(),
            source,
        })?;
        Ok(SgDevice::from_parts(fd, path.to_owned(), version))
    }

    fn from_parts(fd: OwnedFd, path: PathBuf, version: u32) -> SgDevice {
        SgDevice {
            fd,
            path,
            version,
            flags: SgFlags::Q_AT_TAIL,
            done: VecDeque::with_capacity(SYNC_QUEUE_DEPTH),
            direct_io: 0,
            copied_io: 0,
        }
    }

    /// The path the device was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The driver's version number (e.g. 30536 for sg 3.5.36).
    pub fn driver_version(&self) -> u32 {
        self.version
    }

    /// Requests direct I/O for later commands (off by default). The kernel
    /// may still copy (see [`SgFlags::DIRECT_IO`]);
    /// [`direct_io_stats`](Self::direct_io_stats) shows what happened.
    ///
    /// # Signals
    ///
    /// Turn this on only in a process whose signals cannot interrupt
    /// `SG_IO` unseen: block signals in the submitting thread, or install
    /// every handler *without* `SA_RESTART`. When a handled signal
    /// interrupts `SG_IO`, the sg driver orphans the command, which keeps
    /// running; with `SA_RESTART` the kernel then restarts `SG_IO`
    /// transparently, submitting the command again with the same buffers
    /// while the orphaned one may still DMA into them — the caller gets its
    /// buffer back while the device may still write to it. Without
    /// `SA_RESTART` the call fails with `EINTR`, which this type detects:
    /// the buffer of an interrupted direct-I/O command is leaked, never
    /// reused, and the completion is an [`io::ErrorKind::Interrupted`]
    /// error saying the outcome is unknown. Indirect I/O (the default)
    /// bounces through kernel pages, so an orphan cannot touch the caller's
    /// memory.
    pub fn set_direct_io(&mut self, on: bool) {
        self.flags.set(SgFlags::DIRECT_IO, on);
    }

    /// The flags each command is submitted with.
    pub fn flags(&self) -> SgFlags {
        self.flags
    }

    /// Completed commands with a data phase: `(direct, copied)`, where
    /// `copied` counts indirect and mixed transfers (and every transfer on a
    /// block device, which does not report direct I/O).
    pub fn direct_io_stats(&self) -> (u64, u64) {
        (self.direct_io, self.copied_io)
    }

    fn refuse(cmd: Command, kind: io::ErrorKind, msg: String) -> SubmitError {
        SubmitError {
            cmd: Box::new(cmd),
            error: CommandError::Io(io::Error::new(kind, msg)),
        }
    }
}

impl AsFd for SgDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Transport for SgDevice {
    fn submit(&mut self, mut cmd: Command) -> Result<(), SubmitError> {
        if self.done.len() >= SYNC_QUEUE_DEPTH {
            let msg = format!(
                "{}: {} completion(s) not yet reaped; reap before submitting more",
                self.path.display(),
                self.done.len()
            );
            return Err(SgDevice::refuse(cmd, io::ErrorKind::WouldBlock, msg));
        }
        if let Err(e) = dxfer_len(cmd.transfer_len()) {
            return Err(SubmitError {
                cmd: Box::new(cmd),
                error: CommandError::Io(e),
            });
        }
        let mut sense = [0; SENSE_LEN];
        let start = Instant::now();
        let result = sg_io(self.fd.as_fd(), &mut cmd, &mut sense, self.flags);
        let elapsed = start.elapsed();
        let result = match result {
            Ok(hdr) => {
                if hdr.dxfer_len > 0 {
                    if hdr.info().used_direct_io() {
                        self.direct_io += 1;
                    } else {
                        self.copied_io += 1;
                    }
                }
                Ok(hdr.outcome(&sense, elapsed))
            }
            Err(e) => Err(CommandError::Io(e)),
        };
        self.done.push_back(Completion {
            tag: cmd.tag,
            data: cmd.data,
            result,
        });
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>, _wait: Option<Duration>) -> io::Result<usize> {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> usize {
        SYNC_QUEUE_DEPTH
    }

    fn describe(&self) -> String {
        format!("{} (sync SG_IO)", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::IoBuf;
    use crate::sense::{Asc, SenseKey};
    use crate::transport::CdbBuf;

    fn cdb10() -> CdbBuf {
        CdbBuf::new(&[0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0]).unwrap()
    }

    #[test]
    fn header_for_data_in() {
        let mut cmd = Command::data_in(cdb10(), 512).with_timeout(Duration::from_secs(7));
        let mut sense = [0; SENSE_LEN];
        let hdr = SgIoHdr::for_command(&mut cmd, &mut sense, SgFlags::DIRECT_IO).unwrap();
        assert_eq!(hdr.interface_id, i32::from(b'S'));
        assert_eq!(hdr.dxfer_direction, SG_DXFER_FROM_DEV);
        assert_eq!(hdr.dxfer_len, 512);
        assert_eq!(hdr.dxferp.cast::<u8>().cast_const(), cmd.data.as_ptr());
        assert_eq!(hdr.cmd_len, 10);
        assert_eq!(hdr.cmdp, cmd.cdb.as_slice().as_ptr());
        assert_eq!(hdr.sbp.cast_const(), sense.as_ptr());
        assert_eq!(usize::from(hdr.mx_sb_len), SENSE_LEN);
        assert_eq!(hdr.timeout_ms(), 7000);
        assert_eq!(hdr.flags, SG_FLAG_DIRECT_IO);
        assert_eq!(hdr.iovec_count, 0);
        assert!(hdr.usr_ptr.is_null());
        assert_eq!(
            (hdr.status, hdr.host_status, hdr.driver_status, hdr.info),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn header_for_data_out() {
        let mut cmd = Command::data_out(cdb10(), IoBuf::from_slice(&[0xAB; 4096]));
        let mut sense = [0; SENSE_LEN];
        let flags = SgFlags::Q_AT_TAIL | SgFlags::DIRECT_IO;
        let hdr = SgIoHdr::for_command(&mut cmd, &mut sense, flags).unwrap();
        assert_eq!(hdr.dxfer_direction, SG_DXFER_TO_DEV);
        assert_eq!(hdr.dxfer_len, 4096);
        assert_eq!(hdr.dxferp.cast::<u8>().cast_const(), cmd.data.as_ptr());
        assert_eq!(hdr.flags, 0x11);
        assert_eq!(hdr.flags(), flags);
        assert_eq!(hdr.timeout_ms(), 30_000);
    }

    #[test]
    fn header_for_no_data() {
        let cdb = CdbBuf::new(&[0; 6]).unwrap();
        // A buffer on a no-data command is ignored.
        let mut cmd = Command {
            data: IoBuf::new(100),
            ..Command::no_data(cdb)
        };
        let mut sense = [0; SENSE_LEN];
        let hdr = SgIoHdr::for_command(&mut cmd, &mut sense, SgFlags::empty()).unwrap();
        assert_eq!(hdr.dxfer_direction, SG_DXFER_NONE);
        assert_eq!(hdr.dxfer_len, 0);
        assert!(hdr.dxferp.is_null());
        assert_eq!(hdr.cmd_len, 6);
        assert_eq!(hdr.flags, 0);

        // An empty data-in buffer gets a null pointer too.
        let mut cmd = Command::data_in(cdb, 0);
        let hdr = SgIoHdr::for_command(&mut cmd, &mut sense, SgFlags::empty()).unwrap();
        assert_eq!(hdr.dxfer_direction, SG_DXFER_FROM_DEV);
        assert!(hdr.dxferp.is_null());
    }

    #[test]
    fn timeout_clamping() {
        assert_eq!(timeout_ms(Duration::ZERO), 1);
        assert_eq!(timeout_ms(Duration::from_nanos(1)), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::from_millis(250)), 250);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), u32::MAX);
        let mut cmd = Command::no_data(cdb10()).with_timeout(Duration::ZERO);
        let hdr = SgIoHdr::for_command(&mut cmd, &mut [0; SENSE_LEN], SgFlags::empty()).unwrap();
        assert_eq!(hdr.timeout, 1);
    }

    #[test]
    fn oversize_buffer_is_refused_not_clamped() {
        assert_eq!(dxfer_len(0).unwrap(), 0);
        assert_eq!(dxfer_len(u32::MAX as usize).unwrap(), u32::MAX);
        let e = dxfer_len(u32::MAX as usize + 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("split the command"), "{e}");
        let e = dxfer_len(usize::MAX).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn interrupted_sg_io_reports_an_unknown_outcome() {
        let e = interrupted_error();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        let msg = e.to_string();
        assert!(msg.contains("outcome is unknown"), "{msg}");
        assert!(msg.contains("may have executed"), "{msg}");
    }

    /// A header as the kernel would leave it for a 512-byte data-in.
    fn completed(fill: impl FnOnce(&mut SgIoHdr)) -> SgIoHdr {
        let mut cmd = Command::data_in(cdb10(), 512);
        let mut hdr =
            SgIoHdr::for_command(&mut cmd, &mut [0; SENSE_LEN], SgFlags::empty()).unwrap();
        fill(&mut hdr);
        hdr
    }

    #[test]
    fn outcome_good_with_residual() {
        let hdr = completed(|h| {
            h.resid = 112;
            h.duration = 3;
        });
        let o = hdr.outcome(&[0; SENSE_LEN], Duration::from_micros(2500));
        assert_eq!(o.status, ScsiStatus::GOOD);
        assert_eq!(o.residual, 112);
        assert!(o.sense.is_empty());
        assert_eq!(o.duration, Duration::from_micros(2500));
        assert_eq!(hdr.duration(), Duration::from_millis(3));
        assert!(o.check().is_ok());
    }

    #[test]
    fn outcome_check_condition() {
        // Fixed sense: ILLEGAL REQUEST, INVALID FIELD IN CDB.
        let mut sense = [0; SENSE_LEN];
        sense[..18].copy_from_slice(&[
            0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x24, 0x00, 0, 0, 0, 0,
        ]);
        let hdr = completed(|h| {
            h.status = 0x02;
            h.masked_status = 0x01;
            h.driver_status = 0x08;
            h.info = SG_INFO_CHECK;
            h.sb_len_wr = 18;
            h.resid = 512;
        });
        assert!(hdr.info().contains(SgInfo::CHECK));
        let o = hdr.outcome(&sense, Duration::ZERO);
        assert_eq!(o.status, ScsiStatus::CHECK_CONDITION);
        assert_eq!(o.driver_status, DriverStatus::SENSE);
        assert_eq!(o.sense, &sense[..18]);
        match o.check() {
            Err(CommandError::CheckCondition(s)) => {
                assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
                assert_eq!(s.asc, Asc::INVALID_FIELD_IN_CDB);
            }
            other => panic!("expected CHECK CONDITION, got {other:?}"),
        }
    }

    #[test]
    fn outcome_host_errors() {
        let hdr = completed(|h| {
            h.host_status = HostStatus::TIME_OUT.0;
            h.info = SG_INFO_CHECK;
        });
        let elapsed = Duration::from_secs(30);
        let o = hdr.outcome(&[0; SENSE_LEN], elapsed);
        assert_eq!(o.host_status, HostStatus::TIME_OUT);
        assert!(matches!(o.check(), Err(CommandError::Timeout(d)) if d == elapsed));

        let hdr = completed(|h| h.host_status = HostStatus::NO_CONNECT.0);
        match hdr.outcome(&[0; SENSE_LEN], Duration::ZERO).check() {
            Err(CommandError::Transport { host, driver }) => {
                assert_eq!(host, HostStatus::NO_CONNECT);
                assert_eq!(driver, DriverStatus::OK);
            }
            other => panic!("expected a transport error, got {other:?}"),
        }
    }

    #[test]
    fn outcome_clamps_bad_kernel_values() {
        let hdr = completed(|h| h.resid = -5);
        assert_eq!(hdr.outcome(&[], Duration::ZERO).residual, 0);
        let hdr = completed(|h| h.resid = i32::MIN);
        assert_eq!(hdr.residual(), 0);
        let hdr = completed(|h| h.resid = 10_000);
        assert_eq!(hdr.outcome(&[], Duration::ZERO).residual, 512);

        let sense = [0x72; SENSE_LEN];
        let hdr = completed(|h| h.sb_len_wr = 255);
        assert_eq!(hdr.outcome(&sense, Duration::ZERO).sense.len(), SENSE_LEN);
        assert_eq!(hdr.outcome(&sense[..20], Duration::ZERO).sense.len(), 20);
        assert!(hdr.outcome(&[], Duration::ZERO).sense.is_empty());
        let hdr = completed(|h| {
            h.sb_len_wr = 40;
            h.mx_sb_len = 32;
        });
        assert_eq!(hdr.outcome(&sense, Duration::ZERO).sense.len(), 32);
    }

    #[test]
    fn info_bits() {
        assert!(SgInfo::DIRECT_IO.used_direct_io());
        assert!((SgInfo::DIRECT_IO | SgInfo::CHECK).used_direct_io());
        assert!(!SgInfo::empty().used_direct_io());
        assert!(!SgInfo::MIXED_IO.used_direct_io());
        assert!(!(SgInfo::MIXED_IO | SgInfo::DIRECT_IO).used_direct_io());
    }

    #[test]
    fn open_missing_path() {
        let path = "/nonexistent/stp-sg-test/sg0";
        let err = SgDevice::open(path).unwrap_err();
        assert!(
            matches!(&err, SgError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("cannot open {path}: ")), "{msg}");
        assert!(msg.contains("stp probe"), "{msg}");
        assert!(open_hint(&io::Error::from(io::ErrorKind::PermissionDenied)).contains("root"));
    }

    fn assert_not_sg(path: &Path) {
        let err = SgDevice::open(path).unwrap_err();
        match &err {
            SgError::NotSg { path: p, source } => {
                assert_eq!(p, path);
                assert_eq!(source.raw_os_error(), Some(nix::libc::ENOTTY), "{source}");
            }
            other => panic!("expected NotSg, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        assert!(msg.contains("SG_GET_VERSION_NUM failed"), "{msg}");
        assert!(msg.contains("/dev/sgN"), "{msg}");
    }

    #[test]
    fn open_regular_file_is_not_sg() {
        let path = std::env::temp_dir().join(format!("stp-sg-test-{}", std::process::id()));
        std::fs::write(&path, b"not a device").unwrap();
        let result = std::panic::catch_unwind(|| assert_not_sg(&path));
        std::fs::remove_file(&path).unwrap();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn open_dev_null_is_not_sg() {
        assert_not_sg(Path::new("/dev/null"));
    }

    /// Drives the transport plumbing over /dev/null, where SG_IO fails.
    #[test]
    fn failed_ioctl_becomes_completion() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut dev = SgDevice::from_parts(file.into(), PathBuf::from("/dev/null"), 30536);
        // Direct I/O is not requested unless asked for (see set_direct_io).
        assert_eq!(dev.flags(), SgFlags::Q_AT_TAIL);
        dev.set_direct_io(true);
        assert_eq!(dev.flags(), SgFlags::Q_AT_TAIL | SgFlags::DIRECT_IO);
        dev.set_direct_io(false);
        assert_eq!(dev.flags(), SgFlags::Q_AT_TAIL);
        assert_eq!(dev.describe(), "/dev/null (sync SG_IO)");
        assert_eq!(dev.driver_version(), 30536);
        assert_eq!(dev.queue_depth(), SYNC_QUEUE_DEPTH);

        let mut out = Vec::new();
        assert_eq!(dev.reap(&mut out, None).unwrap(), 0);

        let data = IoBuf::from_slice(&[7; 1000]);
        dev.submit(Command::data_out(cdb10(), data.clone()).with_tag(42))
            .unwrap();
        assert_eq!(dev.in_flight(), 1);

        // The queue is full until reaped; the refused command comes back.
        let refused = dev
            .submit(Command::no_data(cdb10()).with_tag(43))
            .unwrap_err();
        assert_eq!(refused.cmd.tag, 43);
        assert!(
            matches!(&refused.error, CommandError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
        );

        assert_eq!(dev.reap(&mut out, Some(Duration::ZERO)).unwrap(), 1);
        assert_eq!(dev.in_flight(), 0);
        let c = out.pop().unwrap();
        assert_eq!(c.tag, 42);
        assert_eq!(c.data, data);
        assert!(
            matches!(&c.result, Err(CommandError::Io(e)) if e.raw_os_error() == Some(nix::libc::ENOTTY)),
            "{:?}",
            c.result
        );
        assert_eq!(dev.direct_io_stats(), (0, 0));
        assert_eq!(dev.reap(&mut out, None).unwrap(), 0);
    }
}
