//! The TCMU shared memory: mailbox, command ring and data area, as laid out
//! by `linux/target_core_user.h` (`TCMU_MAILBOX_VERSION` 2). The only module
//! of the crate with `unsafe`: the mapping itself and the raw copies in and
//! out of it, behind bounds-checked accessors.
//!
//! ```text
//!  0        12        64        cmdr_off (128)            cmdr_off + cmdr_size       len
//!  │mailbox │cmd_head │cmd_tail │ command ring (entries, PAD, TMR) │ data area (iovecs) │
//! ```
//!
//! * [`Region`] is the mapping (or, in tests, an aligned heap buffer):
//!   copies with bounds checks and the two 32-bit atomics of the mailbox.
//!   Nothing else in the crate sees a pointer into it.
//! * [`Ring`] is the protocol over a region: it validates the mailbox,
//!   reads and validates the entries the kernel wrote ([`Ring::read_new`]),
//!   writes completions at `cmd_tail` out of order ([`Ring::complete_at`])
//!   and copies command data through the entries' iovecs.
//!
//! Offsets (checked against the uapi header with a C compiler): the outer
//! entry struct is packed but the request union is not, so `req.cdb_off` is
//! at byte 24 and `req.iov[]` at byte 48 of an entry; the response has
//! `scsi_status` at 8, `read_len` at 12 and 96 bytes of sense at 16.
//!
//! Everything the kernel wrote is treated as untrusted input: a bad entry
//! never panics and never makes the daemon touch memory outside the ring
//! (a data page the kernel has not allocated would fault with SIGBUS), so
//! CDBs are read only from the command ring and iovecs only from the data
//! area.

#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::mman::{self, MapFlags, ProtFlags};
use scsi::{CdbBuf, Opcode};

/// `sizeof(struct tcmu_mailbox)`: the command ring starts after it.
pub(crate) const MAILBOX_LEN: usize = 128;
const MB_VERSION: usize = 0;
const MB_FLAGS: usize = 2;
const MB_CMDR_OFF: usize = 4;
const MB_CMDR_SIZE: usize = 8;
const MB_CMD_HEAD: usize = 12;
const MB_CMD_TAIL: usize = 64;

/// `TCMU_MAILBOX_VERSION`.
pub(crate) const MAILBOX_VERSION: u16 = 2;
/// `TCMU_MAILBOX_FLAG_CAP_OOOC`: out-of-order completion.
pub(crate) const CAP_OOOC: u16 = 1 << 0;
/// `TCMU_MAILBOX_FLAG_CAP_READ_LEN`: the daemon may report a short data-in.
pub(crate) const CAP_READ_LEN: u16 = 1 << 1;

const OP_MASK: u32 = 0x7;
const OP_PAD: u32 = 0;
const OP_CMD: u32 = 1;
const OP_TMR: u32 = 2;

const HDR_CMD_ID: usize = 4;
const HDR_UFLAGS: usize = 7;
/// `TCMU_UFLAG_READ_LEN`.
pub(crate) const UFLAG_READ_LEN: u8 = 0x2;

const REQ_IOV_CNT: usize = 8;
const REQ_IOV_BIDI_CNT: usize = 12;
const REQ_IOV_DIF_CNT: usize = 16;
const REQ_CDB_OFF: usize = 24;
const REQ_IOV: usize = 48;
const IOVEC_LEN: usize = 16;

const RSP_STATUS: usize = 8;
const RSP_READ_LEN: usize = 12;
const RSP_SENSE: usize = 16;
/// `TCMU_SENSE_BUFFERSIZE`.
pub(crate) const SENSE_LEN: usize = 96;
/// `sizeof(struct tcmu_cmd_entry)`: every command entry is at least this
/// long, so a response always fits in any command slot.
pub(crate) const ENTRY_MIN: usize = 112;

/// The variable-length CDB opcode; its length is 8 + byte 7.
const VARIABLE_LENGTH_CMD: u8 = 0x7F;

/// The shared memory of one TCMU device: a `MAP_SHARED` mapping of its uio
/// node, or (tests) a zeroed, 8-byte aligned heap buffer.
///
/// The memory is never lent out as a Rust reference (other than the two
/// mailbox atomics); every access is a bounds-checked copy, so it cannot
/// alias a Rust object and a bad offset is refused, not followed.
pub(crate) struct Region {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// `mmap`ed from a uio device; `munmap`ed on drop.
    Mapped,
    /// A leaked `Box<[u64]>`, freed on drop.
    #[cfg(test)]
    Heap(NonNull<[u64]>),
}

// SAFETY: a Region is a pointer to memory it owns (a mapping or a leaked
// box) that stays valid until it is dropped. Every access goes through
// `&self` methods that copy bytes in or out or use atomics; concurrent
// copies from several threads are coordinated by the TCMU protocol (a
// command's data and ring slot have one user at a time, and the ring
// writer holds the device's lock), exactly as with the kernel on the other
// side of the same memory.
unsafe impl Send for Region {}
// SAFETY: see `Send`: shared access is only through copying methods and
// atomics, never through references into the memory.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len).finish()
    }
}

impl Region {
    /// Maps `len` bytes of the uio device `fd` shared, read-write, at
    /// offset 0 (map 0 of the device).
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Region> {
        let size = NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "map size is 0"))?;
        // SAFETY: the kernel picks the address (None), so the new mapping
        // overlaps no existing Rust object; the region owns it from here
        // and unmaps it exactly once, in Drop.
        let ptr = unsafe {
            mman::mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(io::Error::from)?;
        Ok(Region {
            base: ptr.cast(),
            len,
            backing: Backing::Mapped,
        })
    }

    /// A zeroed region of `len` bytes on the heap, 8-byte aligned (tests:
    /// a fake kernel lays out mailbox, ring and data in it).
    #[cfg(test)]
    pub(crate) fn heap(len: usize) -> Region {
        let words = len.div_ceil(8).max(1);
        let raw = NonNull::from(Box::leak(vec![0u64; words].into_boxed_slice()));
        Region {
            base: raw.cast(),
            len,
            backing: Backing::Heap(raw),
        }
    }

    /// The region's size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A pointer to `n` bytes at `off`, if they lie within the region.
    fn span(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n)?;
        if end > self.len {
            return None;
        }
        // SAFETY: off <= end <= len, so the result stays within (or one
        // past the end of) the region's allocation.
        Some(unsafe { self.base.as_ptr().add(off) })
    }

    /// Copies `dst.len()` bytes at `off` into `dst`; false (and nothing
    /// copied) if they do not lie within the region.
    pub(crate) fn read(&self, off: usize, dst: &mut [u8]) -> bool {
        let Some(src) = self.span(off, dst.len()) else {
            return false;
        };
        // SAFETY: `src..src+len` is within the live region (span checked
        // it); `dst` is a Rust buffer, which cannot lie inside the region
        // because the region's memory is never lent out as a reference.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Copies `src` to `off`; false (and nothing copied) if it does not fit.
    pub(crate) fn write(&self, off: usize, src: &[u8]) -> bool {
        let Some(dst) = self.span(off, src.len()) else {
            return false;
        };
        // SAFETY: as in `read`, the destination is within the live region
        // and cannot overlap the Rust slice `src`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        true
    }

    /// Fills `n` bytes at `off` with zeros; false if they do not fit.
    pub(crate) fn zero(&self, off: usize, n: usize) -> bool {
        let Some(dst) = self.span(off, n) else {
            return false;
        };
        // SAFETY: the `n` bytes at `dst` lie within the live region.
        unsafe { std::ptr::write_bytes(dst, 0, n) };
        true
    }

    /// The 32-bit word at `off` as an atomic (the mailbox's `cmd_head` and
    /// `cmd_tail`), if it is in bounds and 4-byte aligned.
    fn atomic_u32(&self, off: usize) -> Option<&AtomicU32> {
        if off % 4 != 0 {
            return None;
        }
        let ptr = self.span(off, 4)?;
        // SAFETY: the 4 bytes are within the region, which outlives the
        // returned reference (it borrows `self`); they are 4-byte aligned
        // (the base is page-aligned for a mapping and 8-aligned on the heap,
        // and off % 4 == 0). This process touches the mailbox words only
        // through these atomics, and the kernel accesses them as aligned
        // 32-bit words (READ_ONCE / smp_store_release).
        Some(unsafe { AtomicU32::from_ptr(ptr.cast()) })
    }

    fn read_array<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        self.read(off, &mut b).then_some(b)
    }

    fn read_u16(&self, off: usize) -> Option<u16> {
        self.read_array(off).map(u16::from_ne_bytes)
    }

    fn read_u32(&self, off: usize) -> Option<u32> {
        self.read_array(off).map(u32::from_ne_bytes)
    }

    fn read_u64(&self, off: usize) -> Option<u64> {
        self.read_array(off).map(u64::from_ne_bytes)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mapped => {
                // SAFETY: base and len are exactly the mapping `map` made;
                // no reference into it outlives `self` (the only ones are
                // the atomics, which borrow `self`).
                let _ = unsafe { mman::munmap(self.base.cast(), self.len) };
            }
            #[cfg(test)]
            Backing::Heap(raw) => {
                // SAFETY: `raw` came from `Box::leak` in `heap` and is
                // turned back into a box exactly once, here.
                drop(unsafe { Box::from_raw(raw.as_ptr()) });
            }
        }
    }
}

/// Something wrong with the shared memory: the ring cannot be trusted past
/// this point (recovery: reset the ring).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RingError {
    /// The mailbox is not one this daemon speaks.
    #[error("unusable TCMU mailbox: {0}")]
    Mailbox(String),
    /// `cmd_head` is outside the ring or unaligned.
    #[error("cmd_head {head} is not an 8-byte aligned offset in the {size}-byte command ring")]
    Head {
        /// The value read.
        head: u32,
        /// The ring's size.
        size: u32,
    },
    /// The entry at `at` cannot be walked past.
    #[error("corrupt ring entry at offset {at}: {why}")]
    Entry {
        /// Offset of the entry in the command ring.
        at: u32,
        /// What is wrong.
        why: String,
    },
    /// A completion found no command slot between `cmd_tail` and the read
    /// position (more completions than commands read).
    #[error("no command slot left between cmd_tail {tail} and the read position {read}")]
    NoSlot {
        /// The tail.
        tail: u32,
        /// The read position.
        read: u32,
    },
}

/// The kind of a ring entry, from `len_op & 7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// `TCMU_OP_PAD`: filler up to the end of the ring.
    Pad,
    /// `TCMU_OP_CMD`: a SCSI command.
    Cmd,
    /// `TCMU_OP_TMR`: a task management notification.
    Tmr,
}

/// An entry's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// PAD, CMD or TMR.
    pub kind: EntryKind,
    /// Length in bytes (a multiple of 8, at least 8).
    pub len: u32,
    /// The command id (CMD entries).
    pub cmd_id: u16,
}

/// A data segment of a command: `len` bytes at offset `off` from the start
/// of the map (always within the data area).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Iov {
    /// Offset from the start of the map.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A command entry, copied out of the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Command {
    /// The kernel's id, echoed in the completion.
    pub cmd_id: u16,
    /// The CDB (its length from the opcode's group, as the kernel copies it).
    pub cdb: CdbBuf,
    /// The data segments (`req.iov[0..iov_cnt]`).
    pub iovs: Vec<Iov>,
}

impl Command {
    /// Total data bytes of the command.
    pub(crate) fn data_len(&self) -> usize {
        self.iovs
            .iter()
            .fold(0usize, |n, i| n.saturating_add(i.len as usize))
    }
}

/// Why a command entry cannot be executed (it is completed with CHECK
/// CONDITION instead).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BadCommand {
    /// A CDB the array cannot hold (longer than 16 bytes).
    UnsupportedCdb(String),
    /// The kernel wrote offsets or counts that do not make sense.
    Malformed(String),
}

impl std::fmt::Display for BadCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadCommand::UnsupportedCdb(w) | BadCommand::Malformed(w) => f.write_str(w),
        }
    }
}

/// One entry read from the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// PAD or TMR: nothing to do (TMR notifications are off).
    Skip {
        /// PAD or TMR.
        kind: EntryKind,
        /// The entry's length.
        len: u32,
    },
    /// A command to execute.
    Command {
        /// The entry's length.
        len: u32,
        /// What was copied out of it.
        cmd: Command,
    },
    /// A command entry whose contents are unusable: completed at once with
    /// CHECK CONDITION.
    Bad {
        /// The entry's length.
        len: u32,
        /// The id to complete.
        cmd_id: u16,
        /// What is wrong.
        why: BadCommand,
    },
}

impl Entry {
    /// The entry's length in the ring.
    pub(crate) fn len(&self) -> u32 {
        match self {
            Entry::Skip { len, .. } | Entry::Command { len, .. } | Entry::Bad { len, .. } => *len,
        }
    }
}

/// The entries [`Ring::read_new`] found.
#[derive(Debug)]
pub(crate) struct Batch {
    /// Entries in ring order.
    pub entries: Vec<Entry>,
    /// The read position after them.
    pub next: u32,
    /// Set when the walk stopped at an entry it cannot get past (the
    /// entries before it are good and in `entries`).
    pub error: Option<RingError>,
}

/// A completion to write into a ring slot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Response<'a> {
    /// The completed command's id.
    pub cmd_id: u16,
    /// SCSI status byte.
    pub status: u8,
    /// Sense bytes (at most [`SENSE_LEN`] are written).
    pub sense: &'a [u8],
    /// Data-in bytes delivered, with `TCMU_UFLAG_READ_LEN` (must be
    /// non-zero: the kernel ignores 0).
    pub read_len: Option<u32>,
}

/// The TCMU protocol over a [`Region`].
#[derive(Debug)]
pub(crate) struct Ring {
    region: Region,
    cmdr_off: usize,
    cmdr_size: u32,
    flags: u16,
}

impl Ring {
    /// Checks the mailbox (version 2, out-of-order completion, a command
    /// ring inside the region) and takes the region over.
    pub(crate) fn new(region: Region) -> Result<Ring, RingError> {
        let bad = |why: String| Err(RingError::Mailbox(why));
        if region.len() < MAILBOX_LEN {
            return bad(format!(
                "map of {} bytes is smaller than the mailbox",
                region.len()
            ));
        }
        let version = region.read_u16(MB_VERSION).unwrap_or(0);
        let flags = region.read_u16(MB_FLAGS).unwrap_or(0);
        let cmdr_off = region.read_u32(MB_CMDR_OFF).unwrap_or(0) as usize;
        let cmdr_size = region.read_u32(MB_CMDR_SIZE).unwrap_or(0);
        if version != MAILBOX_VERSION {
            return bad(format!(
                "mailbox version {version}, this daemon speaks {MAILBOX_VERSION}"
            ));
        }
        if flags & CAP_OOOC == 0 {
            return bad(format!(
                "flags {flags:#x} lack out-of-order completion (CAP_OOOC)"
            ));
        }
        if cmdr_off < MAILBOX_LEN || cmdr_off % 8 != 0 {
            return bad(format!("command ring offset {cmdr_off}"));
        }
        if (cmdr_size as usize) < 2 * ENTRY_MIN || cmdr_size % 8 != 0 {
            return bad(format!("command ring size {cmdr_size}"));
        }
        if cmdr_off + cmdr_size as usize > region.len() {
            return bad(format!(
                "command ring {cmdr_off}+{cmdr_size} runs past the {}-byte map",
                region.len()
            ));
        }
        Ok(Ring {
            region,
            cmdr_off,
            cmdr_size,
            flags,
        })
    }

    /// True if the kernel takes `read_len` (CAP_READ_LEN).
    pub(crate) fn has_read_len(&self) -> bool {
        self.flags & CAP_READ_LEN != 0
    }

    /// The command ring's size in bytes.
    pub(crate) fn cmdr_size(&self) -> u32 {
        self.cmdr_size
    }

    /// Where the data area starts (offset from the start of the map).
    fn data_off(&self) -> usize {
        self.cmdr_off + self.cmdr_size as usize
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        // Both mailbox words are 4-byte aligned and inside the region
        // (`new` checked the region holds the mailbox).
        self.region
            .atomic_u32(off)
            .expect("mailbox words are aligned and in bounds")
    }

    /// `cmd_head` (acquire: the entries before it are visible).
    pub(crate) fn head(&self) -> u32 {
        self.word(MB_CMD_HEAD).load(Ordering::Acquire)
    }

    /// `cmd_tail`.
    pub(crate) fn tail(&self) -> u32 {
        self.word(MB_CMD_TAIL).load(Ordering::Acquire)
    }

    /// Publishes `cmd_tail` (release: the completions before it are
    /// visible to the kernel first).
    fn set_tail(&self, tail: u32) {
        self.word(MB_CMD_TAIL).store(tail, Ordering::Release);
    }

    /// `at + len`, modulo the ring size.
    pub(crate) fn advance(&self, at: u32, len: u32) -> u32 {
        ((u64::from(at) + u64::from(len)) % u64::from(self.cmdr_size)) as u32
    }

    /// Bytes from `from` up to `to`, going forward around the ring.
    pub(crate) fn distance(&self, from: u32, to: u32) -> u32 {
        ((u64::from(to) + u64::from(self.cmdr_size) - u64::from(from)) % u64::from(self.cmdr_size))
            as u32
    }

    /// The header of the entry at ring offset `at`, validated: a known
    /// kind, a non-zero length that is a multiple of 8 and does not run
    /// past the end of the ring (entries never wrap; PAD fills the end).
    pub(crate) fn header(&self, at: u32) -> Result<Header, RingError> {
        let corrupt = |why: String| Err(RingError::Entry { at, why });
        if at >= self.cmdr_size || at % 8 != 0 {
            return corrupt("offset outside the ring or unaligned".into());
        }
        let base = self.cmdr_off + at as usize;
        let (Some(len_op), Some(cmd_id)) = (
            self.region.read_u32(base),
            self.region.read_u16(base + HDR_CMD_ID),
        ) else {
            return corrupt("header outside the map".into());
        };
        let len = len_op & !OP_MASK;
        let kind = match len_op & OP_MASK {
            OP_PAD => EntryKind::Pad,
            OP_CMD => EntryKind::Cmd,
            OP_TMR => EntryKind::Tmr,
            op => return corrupt(format!("unknown entry op {op} (len_op {len_op:#x})")),
        };
        if len == 0 {
            return corrupt(format!("zero-length entry (len_op {len_op:#x})"));
        }
        if len > self.cmdr_size - at {
            return corrupt(format!(
                "{len}-byte entry runs past the end of the {}-byte ring",
                self.cmdr_size
            ));
        }
        if kind == EntryKind::Cmd && (len as usize) < ENTRY_MIN {
            return corrupt(format!(
                "{len}-byte command entry is shorter than {ENTRY_MIN}"
            ));
        }
        Ok(Header { kind, len, cmd_id })
    }

    /// Reads the entry at `at`: PAD/TMR to skip, a command copied out of
    /// the ring (CDB and iovecs, the iovecs into a vector from `spare`: a
    /// used one saves an allocation), or a command whose contents are
    /// unusable.
    fn read_entry(&self, at: u32, spare: &mut dyn FnMut() -> Vec<Iov>) -> Result<Entry, RingError> {
        let h = self.header(at)?;
        Ok(match h.kind {
            EntryKind::Pad | EntryKind::Tmr => Entry::Skip {
                kind: h.kind,
                len: h.len,
            },
            EntryKind::Cmd => match self.command(at, &h, spare()) {
                Ok(cmd) => Entry::Command { len: h.len, cmd },
                Err(why) => Entry::Bad {
                    len: h.len,
                    cmd_id: h.cmd_id,
                    why,
                },
            },
        })
    }

    /// Copies a command's CDB and iovecs out of its entry (the iovecs into
    /// `iovs`, cleared first), checking every offset and count the kernel
    /// wrote.
    fn command(&self, at: u32, h: &Header, mut iovs: Vec<Iov>) -> Result<Command, BadCommand> {
        let malformed = |why: String| Err(BadCommand::Malformed(why));
        let base = self.cmdr_off + at as usize;
        let len = h.len as usize;
        let field32 = |off| self.region.read_u32(base + off).unwrap_or(0);
        let (iov_cnt, bidi, dif) = (
            field32(REQ_IOV_CNT),
            field32(REQ_IOV_BIDI_CNT),
            field32(REQ_IOV_DIF_CNT),
        );
        let slots = u64::from(iov_cnt) + u64::from(bidi) + u64::from(dif);
        if REQ_IOV as u64 + slots * IOVEC_LEN as u64 > len as u64 {
            return malformed(format!("{slots} iovecs do not fit in the {len}-byte entry"));
        }
        let data = self.data_off() as u64..self.region.len() as u64;
        iovs.clear();
        iovs.reserve(iov_cnt as usize);
        for i in 0..iov_cnt as usize {
            let at = base + REQ_IOV + i * IOVEC_LEN;
            let (off, n) = (
                self.region.read_u64(at).unwrap_or(u64::MAX),
                self.region.read_u64(at + 8).unwrap_or(u64::MAX),
            );
            let inside = off
                .checked_add(n)
                .is_some_and(|end| data.start <= off && end <= data.end);
            if !inside {
                return malformed(format!(
                    "iovec {i} ({off:#x}+{n:#x}) is outside the data area {:#x}..{:#x}",
                    data.start, data.end
                ));
            }
            if n > 0 {
                iovs.push(Iov { off, len: n });
            }
        }
        let cdb_off = self.region.read_u64(base + REQ_CDB_OFF).unwrap_or(u64::MAX);
        let cdb = self.read_cdb(cdb_off)?;
        Ok(Command {
            cmd_id: h.cmd_id,
            cdb,
            iovs,
        })
    }

    /// Reads a CDB at `off`, which must lie in the command ring, as long as
    /// the kernel's `scsi_command_size` says.
    fn read_cdb(&self, off: u64) -> Result<CdbBuf, BadCommand> {
        let ring = self.cmdr_off as u64..self.data_off() as u64;
        let in_ring = |n: u64| {
            off.checked_add(n)
                .is_some_and(|end| ring.start <= off && end <= ring.end)
        };
        if !in_ring(1) {
            return Err(BadCommand::Malformed(format!(
                "cdb_off {off:#x} is outside the command ring {:#x}..{:#x}",
                ring.start, ring.end
            )));
        }
        let off = off as usize;
        let op = self.region.read_array::<1>(off).map_or(0, |b| b[0]);
        let n = if op == VARIABLE_LENGTH_CMD {
            if !in_ring(8) {
                return Err(BadCommand::Malformed(
                    "variable-length CDB runs past the command ring".into(),
                ));
            }
            8 + usize::from(self.region.read_array::<1>(off + 7).map_or(0, |b| b[0]))
        } else {
            Opcode(op).group_cdb_len()
        };
        if n > scsi::transport::MAX_CDB_LEN {
            return Err(BadCommand::UnsupportedCdb(format!(
                "{n}-byte CDB (opcode {op:#04x}) is longer than 16 bytes"
            )));
        }
        if !in_ring(n as u64) {
            return Err(BadCommand::Malformed(format!(
                "{n}-byte CDB at {off:#x} runs past the command ring"
            )));
        }
        let mut buf = [0u8; scsi::transport::MAX_CDB_LEN];
        self.region.read(off, &mut buf[..n]);
        CdbBuf::new(&buf[..n]).ok_or_else(|| BadCommand::Malformed("empty CDB".into()))
    }

    /// [`read_new_into`](Self::read_new_into) a new batch.
    #[cfg(test)]
    pub(crate) fn read_new(&self, next: u32) -> Batch {
        let mut batch = Batch {
            entries: Vec::new(),
            next,
            error: None,
        };
        self.read_new_into(next, &mut batch, &mut Vec::new);
        batch
    }

    /// Reads every entry from `next` up to `cmd_head` into `batch` (its
    /// entries vector is cleared and reused), taking the vectors for
    /// commands' iovecs from `spare`, so the device thread need allocate
    /// nothing per command. Stops early, with [`Batch::error`] set, at an
    /// entry it cannot walk past.
    pub(crate) fn read_new_into(
        &self,
        next: u32,
        batch: &mut Batch,
        spare: &mut dyn FnMut() -> Vec<Iov>,
    ) {
        let head = self.head();
        batch.entries.clear();
        batch.next = next;
        batch.error = None;
        if head >= self.cmdr_size || head % 8 != 0 {
            batch.error = Some(RingError::Head {
                head,
                size: self.cmdr_size,
            });
            return;
        }
        while batch.next != head {
            let at = batch.next;
            match self.read_entry(at, spare) {
                Ok(e) if e.len() > self.distance(at, head) => {
                    batch.error = Some(RingError::Entry {
                        at,
                        why: format!("{}-byte entry runs past cmd_head {head}", e.len()),
                    });
                    break;
                }
                Ok(e) => {
                    batch.next = self.advance(at, e.len());
                    batch.entries.push(e);
                }
                Err(e) => {
                    batch.error = Some(e);
                    break;
                }
            }
        }
    }

    /// Writes `rsp` into the first command slot at or after `tail` (PAD and
    /// TMR entries are stepped over, `read` is never passed), steps over
    /// any PAD/TMR entries that follow, and publishes the new `cmd_tail`,
    /// which it returns. With out-of-order completion any command slot
    /// will do: the kernel takes the command's identity from the slot's
    /// `cmd_id`, not from its position. The caller serialises calls.
    pub(crate) fn complete_at(
        &self,
        tail: u32,
        read: u32,
        rsp: &Response<'_>,
    ) -> Result<u32, RingError> {
        let mut at = tail;
        let h = loop {
            if at == read {
                return Err(RingError::NoSlot { tail, read });
            }
            let h = self.header(at)?;
            if h.kind == EntryKind::Cmd {
                break h;
            }
            at = self.advance(at, h.len);
        };
        let base = self.cmdr_off + at as usize;
        self.region
            .write(base + HDR_CMD_ID, &rsp.cmd_id.to_ne_bytes());
        let uflags = if rsp.read_len.is_some() {
            UFLAG_READ_LEN
        } else {
            0
        };
        self.region.write(base + HDR_UFLAGS, &[uflags]);
        self.region.write(base + RSP_STATUS, &[rsp.status, 0, 0, 0]);
        self.region.write(
            base + RSP_READ_LEN,
            &rsp.read_len.unwrap_or(0).to_ne_bytes(),
        );
        let sense = &rsp.sense[..rsp.sense.len().min(SENSE_LEN)];
        self.region.write(base + RSP_SENSE, sense);
        self.region
            .zero(base + RSP_SENSE + sense.len(), SENSE_LEN - sense.len());
        at = self.advance(at, h.len);
        while at != read {
            let h = self.header(at)?;
            if h.kind == EntryKind::Cmd {
                break;
            }
            at = self.advance(at, h.len);
        }
        self.set_tail(at);
        Ok(at)
    }

    /// True if `iov` lies within the data area.
    fn in_data(&self, off: u64, n: usize) -> bool {
        off.checked_add(n as u64)
            .is_some_and(|end| off >= self.data_off() as u64 && end <= self.region.len() as u64)
    }

    /// Copies data-area bytes at map offset `off` into `dst`; false if they
    /// are not all in the data area.
    pub(crate) fn data_read(&self, off: u64, dst: &mut [u8]) -> bool {
        self.in_data(off, dst.len()) && self.region.read(off as usize, dst)
    }

    /// Copies `src` into the data area at map offset `off`; false if it
    /// does not fit there.
    pub(crate) fn data_write(&self, off: u64, src: &[u8]) -> bool {
        self.in_data(off, src.len()) && self.region.write(off as usize, src)
    }

    /// Zeroes `n` data-area bytes at map offset `off`.
    pub(crate) fn data_zero(&self, off: u64, n: usize) -> bool {
        self.in_data(off, n) && self.region.zero(off as usize, n)
    }
}

/// A stand-in for the kernel's side of the ring, for tests: it lays out a
/// mailbox, queues command entries the way `queue_cmd_ring` does (PAD at
/// the end of the ring, data blocks in the data area, the CDB after the
/// iovecs) and reaps completions the way `tcmu_handle_completions` does.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::BTreeMap;

    use super::*;

    /// A completion as the kernel reads it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) struct Done {
        pub cmd_id: u16,
        pub status: u8,
        pub read_len: Option<u32>,
        pub sense: Vec<u8>,
        /// The data-in bytes the kernel would copy back (read_len of them,
        /// or the whole buffer without READ_LEN).
        pub data: Vec<u8>,
    }

    /// The fake kernel's state.
    #[derive(Debug)]
    pub(crate) struct FakeKernel {
        pub cmdr_size: u32,
        pub last_cleaned: u32,
        data_next: u64,
        data_end: u64,
        data_start: u64,
        /// Queued, not yet reaped: id → (iovs, data-in?).
        pub outstanding: BTreeMap<u16, (Vec<Iov>, bool)>,
    }

    /// Page size of the fake data blocks.
    const BLOCK: u64 = 4096;

    impl FakeKernel {
        /// A ring of `cmdr_size` bytes and `data_len` bytes of data area,
        /// with the given mailbox flags.
        pub(crate) fn with_flags(
            cmdr_size: u32,
            data_len: usize,
            flags: u16,
        ) -> (Ring, FakeKernel) {
            let len = MAILBOX_LEN + cmdr_size as usize + data_len;
            let region = Region::heap(len);
            region.write(MB_VERSION, &MAILBOX_VERSION.to_ne_bytes());
            region.write(MB_FLAGS, &flags.to_ne_bytes());
            region.write(MB_CMDR_OFF, &(MAILBOX_LEN as u32).to_ne_bytes());
            region.write(MB_CMDR_SIZE, &cmdr_size.to_ne_bytes());
            let ring = Ring::new(region).expect("fake mailbox is valid");
            let data_start = (MAILBOX_LEN + cmdr_size as usize) as u64;
            (
                ring,
                FakeKernel {
                    cmdr_size,
                    last_cleaned: 0,
                    data_next: data_start,
                    data_end: len as u64,
                    data_start,
                    outstanding: BTreeMap::new(),
                },
            )
        }

        /// As [`with_flags`](Self::with_flags) with OOOC and READ_LEN.
        pub(crate) fn new(cmdr_size: u32, data_len: usize) -> (Ring, FakeKernel) {
            Self::with_flags(cmdr_size, data_len, CAP_OOOC | CAP_READ_LEN)
        }

        fn head(&self, ring: &Ring) -> u32 {
            ring.head()
        }

        fn set_head(&self, ring: &Ring, head: u32) {
            ring.word(MB_CMD_HEAD).store(head, Ordering::Release);
        }

        /// Sets `cmd_head` to anything (tests of a corrupt mailbox).
        pub(crate) fn force_head(&self, ring: &Ring, head: u32) {
            self.set_head(ring, head);
        }

        /// Sets `cmd_tail` (as a dead daemon would have left it).
        pub(crate) fn force_tail(&self, ring: &Ring, tail: u32) {
            ring.set_tail(tail);
        }

        /// Writes raw bytes at a ring offset (tests of bad entries).
        pub(crate) fn poke(&self, ring: &Ring, at: u32, bytes: &[u8]) {
            assert!(ring.region.write(MAILBOX_LEN + at as usize, bytes));
        }

        /// Inserts a PAD to the end of the ring if `size` does not fit
        /// before it; returns the head to write at.
        fn pad_for(&self, ring: &Ring, size: u32) -> u32 {
            let head = self.head(ring);
            let to_end = self.cmdr_size - head;
            if to_end < size {
                self.poke(ring, head, &to_end.to_ne_bytes()); // op PAD = 0
                self.poke(ring, head + 4, &[0; 4]);
                self.set_head(ring, 0);
                return 0;
            }
            head
        }

        /// Free bytes in the ring (one kept unused, as the kernel does).
        fn free(&self, ring: &Ring) -> u32 {
            self.cmdr_size - ring.distance(self.last_cleaned, self.head(ring)) - 1
        }

        /// Queues a TMR entry (a notification the daemon skips).
        pub(crate) fn push_tmr(&mut self, ring: &Ring) {
            let size = 40; // sizeof(tcmu_tmr_entry) + 2 ids, rounded to 8
            let head = self.pad_for(ring, size);
            self.poke(ring, head, &(size | OP_TMR).to_ne_bytes());
            self.poke(ring, head + 4, &[0; 4]);
            self.set_head(ring, ring.advance(head, size));
        }

        /// Queues a command: `data_out` bytes written to the device, or a
        /// data-in buffer of `data_in` bytes. Returns the entry's offset,
        /// or None if the ring or the data area is full.
        pub(crate) fn push(
            &mut self,
            ring: &Ring,
            cmd_id: u16,
            cdb: &[u8],
            data_out: &[u8],
            data_in: usize,
        ) -> Option<u32> {
            let bytes = if data_out.is_empty() {
                data_in
            } else {
                data_out.len()
            } as u64;
            // One iovec per 4 KiB block, allocated back to back (merged
            // when contiguous, as new_block_to_iov does).
            let blocks = bytes.div_ceil(BLOCK);
            if self.data_next + blocks * BLOCK > self.data_end {
                self.data_next = self.data_start;
            }
            if self.data_next + blocks * BLOCK > self.data_end {
                return None;
            }
            let iovs: Vec<Iov> = if bytes == 0 {
                Vec::new()
            } else {
                vec![Iov {
                    off: self.data_next,
                    len: bytes,
                }]
            };
            let base = (REQ_IOV + IOVEC_LEN * iovs.len()).max(ENTRY_MIN) as u32;
            let size = base + (cdb.len() as u32).div_ceil(8) * 8;
            let to_end = self.cmdr_size - self.head(ring);
            let needed = if to_end >= size { size } else { size + to_end };
            if self.free(ring) < needed {
                return None;
            }
            self.data_next += blocks * BLOCK;
            let head = self.pad_for(ring, size);
            let mut e = vec![0u8; size as usize];
            e[0..4].copy_from_slice(&(size | OP_CMD).to_ne_bytes());
            e[4..6].copy_from_slice(&cmd_id.to_ne_bytes());
            e[8..12].copy_from_slice(&(iovs.len() as u32).to_ne_bytes());
            let cdb_off = (MAILBOX_LEN as u32 + head + base) as u64;
            e[24..32].copy_from_slice(&cdb_off.to_ne_bytes());
            for (i, iov) in iovs.iter().enumerate() {
                let at = REQ_IOV + i * IOVEC_LEN;
                e[at..at + 8].copy_from_slice(&iov.off.to_ne_bytes());
                e[at + 8..at + 16].copy_from_slice(&iov.len.to_ne_bytes());
            }
            e[base as usize..base as usize + cdb.len()].copy_from_slice(cdb);
            self.poke(ring, head, &e);
            if let Some(iov) = iovs.first() {
                if data_out.is_empty() {
                    // Stale bytes, as a reused data page would hold.
                    assert!(ring.data_write(iov.off, &vec![0xEE; data_in]));
                } else {
                    assert!(ring.data_write(iov.off, data_out));
                }
            }
            self.outstanding
                .insert(cmd_id, (iovs, data_out.is_empty() && data_in > 0));
            self.set_head(ring, ring.advance(head, size));
            Some(head)
        }

        /// Reaps completions from `last_cleaned` up to `cmd_tail`, as
        /// `tcmu_handle_completions` does. Panics where the kernel would
        /// mark the ring broken (an unknown cmd_id).
        pub(crate) fn reap(&mut self, ring: &Ring) -> Vec<Done> {
            let mut out = Vec::new();
            let tail = ring.tail();
            while self.last_cleaned != tail {
                let h = ring
                    .header(self.last_cleaned)
                    .expect("valid entry at last_cleaned");
                if h.kind != EntryKind::Cmd {
                    self.last_cleaned = ring.advance(self.last_cleaned, h.len);
                    continue;
                }
                let base = MAILBOX_LEN + self.last_cleaned as usize;
                let uflags = ring.region.read_array::<1>(base + HDR_UFLAGS).unwrap()[0];
                let status = ring.region.read_array::<1>(base + RSP_STATUS).unwrap()[0];
                let rl = ring.region.read_u32(base + RSP_READ_LEN).unwrap();
                let mut sense = vec![0u8; SENSE_LEN];
                ring.region.read(base + RSP_SENSE, &mut sense);
                let (iovs, data_in) = self
                    .outstanding
                    .remove(&h.cmd_id)
                    .unwrap_or_else(|| panic!("cmd_id {} not found, ring is broken", h.cmd_id));
                let read_len = (uflags & UFLAG_READ_LEN != 0 && rl != 0).then_some(rl);
                let mut data = Vec::new();
                if data_in && status != 0x02 {
                    let total: u64 = iovs.iter().map(|i| i.len).sum();
                    let n = read_len.map_or(total, |r| u64::from(r).min(total));
                    data = vec![0u8; n as usize];
                    ring.data_read(iovs[0].off, &mut data);
                }
                out.push(Done {
                    cmd_id: h.cmd_id,
                    status,
                    read_len,
                    sense,
                    data,
                });
                self.last_cleaned = ring.advance(self.last_cleaned, h.len);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::fake::FakeKernel;
    use super::*;

    const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    const WRITE10: [u8; 10] = [0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const TUR: [u8; 6] = [0; 6];

    fn commands(b: &Batch) -> Vec<&Command> {
        b.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Command { cmd, .. } => Some(cmd),
                _ => None,
            })
            .collect()
    }

    fn rsp(cmd_id: u16) -> Response<'static> {
        Response {
            cmd_id,
            status: 0,
            sense: &[],
            read_len: None,
        }
    }

    #[test]
    fn the_mailbox_is_checked() {
        let (ring, _k) = FakeKernel::new(4096, 16384);
        assert_eq!(ring.cmdr_size(), 4096);
        assert!(ring.has_read_len());
        let (ring, _k) = FakeKernel::with_flags(4096, 16384, CAP_OOOC);
        assert!(!ring.has_read_len());

        let region = Region::heap(8192);
        region.write(MB_VERSION, &1u16.to_ne_bytes());
        assert!(matches!(Ring::new(region), Err(RingError::Mailbox(w)) if w.contains("version 1")));

        let region = Region::heap(8192);
        region.write(MB_VERSION, &2u16.to_ne_bytes());
        region.write(MB_FLAGS, &CAP_READ_LEN.to_ne_bytes());
        assert!(matches!(Ring::new(region), Err(RingError::Mailbox(w)) if w.contains("CAP_OOOC")));

        let region = Region::heap(8192);
        region.write(MB_VERSION, &2u16.to_ne_bytes());
        region.write(MB_FLAGS, &CAP_OOOC.to_ne_bytes());
        region.write(MB_CMDR_OFF, &128u32.to_ne_bytes());
        region.write(MB_CMDR_SIZE, &(1u32 << 20).to_ne_bytes());
        assert!(matches!(Ring::new(region), Err(RingError::Mailbox(w)) if w.contains("runs past")));

        assert!(Ring::new(Region::heap(64)).is_err());
    }

    #[test]
    fn commands_are_copied_out_with_their_cdb_and_iovecs() {
        let (ring, mut k) = FakeKernel::new(4096, 64 * 1024);
        let out = vec![0xA5u8; 512];
        k.push(&ring, 7, &WRITE10, &out, 0).unwrap();
        k.push(&ring, 8, &READ10, &[], 4096).unwrap();
        k.push(&ring, 9, &TUR, &[], 0).unwrap();
        let b = ring.read_new(0);
        assert!(b.error.is_none());
        assert_eq!(b.next, ring.head());
        let cmds = commands(&b);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].cmd_id, 7);
        assert_eq!(cmds[0].cdb.as_slice(), &WRITE10);
        assert_eq!(cmds[0].data_len(), 512);
        let mut got = vec![0u8; 512];
        assert!(ring.data_read(cmds[0].iovs[0].off, &mut got));
        assert_eq!(got, out);
        assert_eq!(cmds[1].cdb.as_slice(), &READ10);
        assert_eq!(cmds[1].data_len(), 4096);
        assert_eq!(cmds[2].cdb.as_slice(), &TUR);
        assert!(cmds[2].iovs.is_empty());
        // Nothing new: an empty batch.
        let again = ring.read_new(b.next);
        assert!(again.entries.is_empty() && again.error.is_none());
    }

    #[test]
    fn cdb_length_follows_the_opcode_group() {
        let (ring, mut k) = FakeKernel::new(4096, 16384);
        // A 16-byte vendor CDB: the kernel copies 10 bytes (group 6).
        let mut vendor = [0u8; 16];
        vendor[0] = 0xC3;
        vendor[9] = 0x11;
        vendor[15] = 0x99;
        k.push(&ring, 1, &vendor[..10], &[], 0).unwrap();
        let mut read16 = [0u8; 16];
        read16[0] = 0x88;
        k.push(&ring, 2, &read16, &[], 0).unwrap();
        let b = ring.read_new(0);
        let cmds = commands(&b);
        assert_eq!(cmds[0].cdb.as_slice(), &vendor[..10]);
        assert_eq!(cmds[1].cdb.as_slice().len(), 16);
    }

    #[test]
    fn pad_and_tmr_entries_are_skipped_and_the_ring_wraps() {
        // A small ring of 120-byte command and 40-byte TMR entries: PADs
        // fill its end whenever an entry does not fit there.
        let (ring, mut k) = FakeKernel::new(1000, 256 * 1024);
        let mut next = 0;
        let mut tail = 0;
        let mut seen = Vec::new();
        for round in 0..20u16 {
            for j in 0..3u16 {
                let id = round * 3 + j + 1;
                k.push(&ring, id, &TUR, &[], 0).expect("room");
            }
            if round % 4 == 1 {
                k.push_tmr(&ring);
            }
            let b = ring.read_new(next);
            assert!(b.error.is_none(), "{:?}", b.error);
            next = b.next;
            for c in commands(&b) {
                seen.push(c.cmd_id);
                tail = ring.complete_at(tail, next, &rsp(c.cmd_id)).unwrap();
            }
            let done = k.reap(&ring);
            assert_eq!(done.len(), 3);
            assert!(k.outstanding.is_empty());
        }
        assert_eq!(seen, (1..=60).collect::<Vec<u16>>());
        assert_eq!(tail, next, "tail stepped over trailing PAD/TMR entries");
    }

    #[test]
    fn completions_go_to_cmd_tail_in_any_order() {
        let (ring, mut k) = FakeKernel::new(4096, 64 * 1024);
        for id in 1..=4 {
            k.push(&ring, id, &TUR, &[], 0).unwrap();
        }
        let b = ring.read_new(0);
        let read = b.next;
        let mut tail = 0;
        // Complete 3 first: it lands in 1's slot.
        tail = ring.complete_at(tail, read, &rsp(3)).unwrap();
        assert_eq!(ring.header(0).unwrap().cmd_id, 3);
        let done = k.reap(&ring);
        assert_eq!(done.iter().map(|d| d.cmd_id).collect::<Vec<_>>(), vec![3]);
        for id in [4, 1, 2] {
            tail = ring.complete_at(tail, read, &rsp(id)).unwrap();
        }
        let done = k.reap(&ring);
        assert_eq!(
            done.iter().map(|d| d.cmd_id).collect::<Vec<_>>(),
            vec![4, 1, 2]
        );
        assert_eq!(tail, read);
        // A fifth completion has no slot: an error, not a panic or an
        // overwrite of unread entries.
        assert_eq!(
            ring.complete_at(tail, read, &rsp(9)),
            Err(RingError::NoSlot { tail, read })
        );
    }

    #[test]
    fn completion_skips_a_pad_between_tail_and_the_read_position() {
        let (ring, mut k) = FakeKernel::new(560, 64 * 1024);
        // 120-byte entries at 0, 120, 240, 360; the fifth does not fit in
        // the last 80 bytes: PAD at 480, entry at 0 once there is room.
        for id in 1..=4 {
            k.push(&ring, id, &TUR, &[], 0).unwrap();
        }
        let b = ring.read_new(0);
        let mut tail = 0;
        let mut read = b.next;
        for id in 1..=3 {
            tail = ring.complete_at(tail, read, &rsp(id)).unwrap();
        }
        k.reap(&ring);
        assert_eq!(tail, 360);
        k.push(&ring, 5, &TUR, &[], 0).unwrap();
        assert_eq!(ring.head(), 120, "PAD at 480, then the entry at 0");
        let b = ring.read_new(read);
        assert_eq!(b.entries.len(), 2);
        assert!(matches!(
            b.entries[0],
            Entry::Skip {
                kind: EntryKind::Pad,
                len: 80
            }
        ));
        read = b.next;
        // 5 completes into 4's slot (360); the PAD after it is stepped over.
        tail = ring.complete_at(tail, read, &rsp(5)).unwrap();
        assert_eq!(tail, 0);
        // 4 completes into the slot at 0 (5's), past the PAD.
        tail = ring.complete_at(tail, read, &rsp(4)).unwrap();
        assert_eq!(tail, read);
        let ids: Vec<u16> = k.reap(&ring).iter().map(|d| d.cmd_id).collect();
        assert_eq!(ids, vec![5, 4]);
    }

    #[test]
    fn responses_carry_status_sense_and_read_len() {
        let (ring, mut k) = FakeKernel::new(4096, 64 * 1024);
        k.push(&ring, 1, &READ10, &[], 4096).unwrap();
        k.push(&ring, 2, &TUR, &[], 0).unwrap();
        let b = ring.read_new(0);
        let cmds = commands(&b);
        assert!(ring.data_write(cmds[0].iovs[0].off, &[1, 2, 3]));
        let mut tail = ring
            .complete_at(
                0,
                b.next,
                &Response {
                    cmd_id: 1,
                    status: 0,
                    sense: &[],
                    read_len: Some(3),
                },
            )
            .unwrap();
        let long_sense = [0x70u8; 200];
        tail = ring
            .complete_at(
                tail,
                b.next,
                &Response {
                    cmd_id: 2,
                    status: 2,
                    sense: &long_sense,
                    read_len: None,
                },
            )
            .unwrap();
        assert_eq!(tail, b.next);
        let done = k.reap(&ring);
        assert_eq!(done[0].read_len, Some(3));
        assert_eq!(done[0].data, vec![1, 2, 3]);
        assert_eq!(done[1].status, 2);
        assert_eq!(done[1].read_len, None);
        assert_eq!(done[1].sense, vec![0x70; SENSE_LEN], "clipped to 96 bytes");
    }

    #[test]
    fn bad_entries_do_not_panic() {
        // len_op 0: the walk cannot continue.
        let (ring, k) = FakeKernel::new(4096, 16384);
        k.force_head(&ring, 128);
        let b = ring.read_new(0);
        assert!(b.entries.is_empty());
        assert!(
            matches!(b.error, Some(RingError::Entry { at: 0, ref why }) if why.contains("zero-length"))
        );

        // Unknown op, a length past the ring's end, a short command.
        for (len_op, what) in [
            (128u32 | 5, "unknown entry op"),
            (8192 | OP_CMD, "past the end"),
            (64 | OP_CMD, "shorter than"),
        ] {
            let (ring, k) = FakeKernel::new(4096, 16384);
            k.poke(&ring, 0, &len_op.to_ne_bytes());
            k.force_head(&ring, 128);
            let b = ring.read_new(0);
            assert!(
                matches!(b.error, Some(RingError::Entry { ref why, .. }) if why.contains(what)),
                "{b:?}"
            );
        }

        // An entry longer than what the kernel published.
        let (ring, mut k) = FakeKernel::new(4096, 16384);
        k.push(&ring, 1, &TUR, &[], 0).unwrap();
        k.force_head(&ring, 64);
        assert!(ring.read_new(0).error.is_some());

        // A head outside the ring.
        let (ring, k) = FakeKernel::new(4096, 16384);
        k.force_head(&ring, 5000);
        assert!(matches!(
            ring.read_new(0).error,
            Some(RingError::Head { head: 5000, .. })
        ));
    }

    #[test]
    fn bad_commands_are_reported_with_their_id() {
        let (ring, mut k) = FakeKernel::new(4096, 16384);
        let at = k.push(&ring, 1, &READ10, &[], 4096).unwrap();
        // iovec 0 points at the command ring instead of the data area.
        k.poke(&ring, at + REQ_IOV as u32, &256u64.to_ne_bytes());
        let at2 = k.push(&ring, 2, &READ10, &[], 4096).unwrap();
        // cdb_off past the map.
        k.poke(&ring, at2 + REQ_CDB_OFF as u32, &(1u64 << 40).to_ne_bytes());
        let at3 = k.push(&ring, 3, &TUR, &[], 0).unwrap();
        // An iovec count that does not fit in the entry.
        k.poke(&ring, at3 + REQ_IOV_CNT as u32, &1000u32.to_ne_bytes());
        let at4 = k.push(&ring, 4, &READ10, &[], 4096).unwrap();
        // An iovec whose length runs off the end of the map.
        k.poke(&ring, at4 + REQ_IOV as u32 + 8, &u64::MAX.to_ne_bytes());
        // A variable-length CDB longer than 16 bytes.
        let mut var = [0u8; 16];
        var[0] = 0x7F;
        var[7] = 24;
        k.push(&ring, 5, &var, &[], 0).unwrap();
        let b = ring.read_new(0);
        assert!(b.error.is_none());
        let bad: Vec<(u16, bool)> = b
            .entries
            .iter()
            .map(|e| match e {
                Entry::Bad { cmd_id, why, .. } => {
                    (*cmd_id, matches!(why, BadCommand::UnsupportedCdb(_)))
                }
                other => panic!("expected a bad entry, got {other:?}"),
            })
            .collect();
        assert_eq!(
            bad,
            vec![(1, false), (2, false), (3, false), (4, false), (5, true)]
        );
        // Every one of them can still be completed.
        let mut tail = 0;
        for (id, _) in &bad {
            tail = ring.complete_at(tail, b.next, &rsp(*id)).unwrap();
        }
        assert_eq!(k.reap(&ring).len(), 5);
    }

    #[test]
    fn data_copies_stay_in_the_data_area() {
        let (ring, _k) = FakeKernel::new(4096, 8192);
        let data = (MAILBOX_LEN + 4096) as u64;
        assert!(ring.data_write(data, &[1; 8192]));
        assert!(!ring.data_write(data + 1, &[1; 8192]), "one past the end");
        assert!(!ring.data_write(0, &[1]), "mailbox");
        assert!(!ring.data_read(data - 1, &mut [0; 2]), "straddles the ring");
        assert!(!ring.data_read(u64::MAX, &mut [0; 2]));
        assert!(ring.data_zero(data, 16));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the kernel (or memory corruption) left in the ring,
        /// reading and completing never panics nor walks off the ring.
        #[test]
        fn arbitrary_ring_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 1024),
            head in 0u32..1100,
            next in 0u32..128,
        ) {
            let (ring, k) = FakeKernel::new(1024, 8192);
            k.poke(&ring, 0, &bytes);
            k.force_head(&ring, head);
            let next = next * 8;
            let b = ring.read_new(next);
            let mut tail = next;
            for e in &b.entries {
                prop_assert!(e.len() >= 8);
                if let Entry::Command { cmd, .. } = e {
                    for iov in &cmd.iovs {
                        let mut buf = vec![0u8; iov.len.min(64) as usize];
                        prop_assert!(ring.data_read(iov.off, &mut buf));
                    }
                }
                if let Entry::Command { cmd: Command { cmd_id, .. }, .. } | Entry::Bad { cmd_id, .. } = e {
                    match ring.complete_at(tail, b.next, &rsp(*cmd_id)) {
                        Ok(t) => tail = t,
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
