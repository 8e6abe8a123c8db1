//! Block mode (docs/PROTOCOL.md §4): STP over plain READ(16)/WRITE(16) on
//! shared LUNs, for arrays with no STP support.
//!
//! * [`format()`] writes the superblock and the lane index blocks on every
//!   member (what `stp stg format` runs); [`choose_layout`] picks the slot
//!   size and ring from the members' limits when the configuration does
//!   not fix them.
//! * [`BlockStg`] is one host's engine for a formatted STG: it verifies the
//!   superblocks, owns this host's ports, runs one poller thread that reads
//!   the lanes other hosts write to this host, and writes the lanes from
//!   this host to the others. [`BlockStg::handle`] gives cheap
//!   [`BlockMailbox`] handles that implement [`Mailbox`] for the stream
//!   layer. It is the driver: what a lane does next is decided by the
//!   sans-IO machines of `lane` (producer and consumer) and `poll` (when
//!   to poll, what to read), given the bytes read and the time; `batch`
//!   runs a commit's or a poll's commands on every member at once.
//!
//! # Ports
//!
//! A frame names only ports, so in block mode a port number says which
//! host owns it: `port = host << 12 | local` ([`port_host`],
//! [`host_port`]), 16 hosts × 4096 ports, all below 65536. A host binds
//! only its own ports; `local` 0 is never bound. Locals 1–2047 are static
//! (a server binds one it was configured with), 2048–4095 dynamic.
//!
//! # Lanes
//!
//! Frames from host `s` to host `d` go through lane `(s, d)` on every
//! member, successive slots striped round-robin over the members. Every
//! slot carries a header ([`SLOT_HEADER_LEN`] bytes: byte count, CRC32C,
//! format generation, lane sequence number) and frames packed exactly as in
//! SEND data. The producer writes slot data (WRITE(16) FUA) and only after
//! that data's GOOD the producer block (FUA); the consumer reads producer
//! blocks, reads the new slots, takes them in the producer's round-robin
//! order (so frames of one lane arrive in the order they were sent) and
//! then writes its consumer block. Index blocks with a bad CRC, magic,
//! generation or an index the ring cannot hold are ignored and counted in
//! [`BlockStats`], never trusted. A slot that fails its checks (count, CRC,
//! generation) is never delivered: the lane is held there, re-reading it,
//! for [`BlockConfig::bad_slot_patience`] (an index may have been forged
//! ahead of the data) and then the slot is skipped.
//!
//! A full destination port queue holds its lane (back-pressure through the
//! ring) rather than dropping; frames for unbound ports are dropped and
//! counted. A sender that finds the ring full waits, polling the consumer
//! block, up to [`BlockConfig::ring_full_wait`] and then fails with
//! [`Refusal::QueueFull`] (retryable).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use scsi::cdb::RwFlags;
use scsi::pool::BufPool;
use scsi::{Cdb, CdbBuf, Command, CommandError, IoBuf, Transport};
use zerocopy::FromBytes;

use crate::chunk::RecvBuf;
use crate::error::{Refusal, SetupError};
use crate::mailbox::{Binding, Lent, Mailbox, SendDone};
use crate::retry::{Op, RetryPolicy};
use crate::stg::{BlockLayout, MAX_HOSTS};
use crate::vendor::MailboxError;
use crate::wire::{Frames, ALIGN, HEADER_LEN, MAX_PAYLOAD};

mod batch;
mod doorbell;
mod format;
mod lane;
mod poll;
mod ports;
mod sizing;
mod slack;

use batch::BatchIo;
use lane::{Consumer, Index, Probe, Producer, Slot, SlotPos};
use poll::{PollSchedule, Reads};
use ports::{Held, Limits, PortQueue, Ports};

pub use poll::PollConfig;
pub use sizing::{
    choose_layout, Chosen, LayoutRequest, MAX_SLOTS, MAX_SLOT_BYTES, MIN_SLOTS, RING_BYTES,
};

pub use doorbell::{Doorbells, Ring, RingError, RING_LEN, RING_QUIET, RING_SPACING};
pub use format::{
    long_slot_head, open_slot, seal_slot, slot_used, IndexBlock, IndexError, IndexKind, RawIndex,
    RawSlotHeader, RawSuperblock, SlotError, Superblock, SuperblockError, CONSUMER_MAGIC, FORMAT,
    INDEX_LEN, INDEX_SIZES, PRODUCER_MAGIC, SHORT_SLOT, SLOT_HEADER_LEN, SUPERBLOCK_LEN,
    SUPERBLOCK_MAGIC,
};

/// The smallest block size block mode accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;

/// The destination port of a frame that [`Frames`] found (its header is
/// whole); 0, which no host binds, for anything shorter.
fn dst_port(frame: &[u8]) -> u32 {
    crate::wire::RawHeader::ref_from_prefix(frame).map_or(0, |(h, _)| h.dst_port.get())
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// Bits of a block-mode port that name the local port; the host index is
/// above them.
pub const PORT_HOST_SHIFT: u32 = 12;
/// Ports each host owns (locals `0..4096`; local 0 is never bound).
pub const PORTS_PER_HOST: u32 = 1 << PORT_HOST_SHIFT;
/// The first dynamic local port; locals below it (from 1) are static.
pub const FIRST_DYNAMIC_LOCAL: u32 = 2048;

/// The host that owns `port` in block mode (`port >> 12`); `None` for port
/// 0, a local part of 0, or a port beyond the 16 hosts (≥ 65536).
pub fn port_host(port: u32) -> Option<u16> {
    let host = port >> PORT_HOST_SHIFT;
    if port & (PORTS_PER_HOST - 1) == 0 || host >= u32::from(MAX_HOSTS) {
        return None;
    }
    Some(host as u16)
}

/// Port `local` (1–4095) of `host` (0–15): `host << 12 | local`.
pub fn host_port(host: u16, local: u32) -> Option<u32> {
    (host < MAX_HOSTS && (1..PORTS_PER_HOST).contains(&local))
        .then(|| u32::from(host) << PORT_HOST_SHIFT | local)
}

// ---------------------------------------------------------------------------
// Errors, configuration, statistics
// ---------------------------------------------------------------------------

/// Why a block-mode STG cannot be formatted or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// No member paths were given.
    #[error("STG {stg}: no member paths given")]
    NoMembers {
        /// The STG id.
        stg: u32,
    },
    /// More members than the superblock can number.
    #[error("STG {stg}: {count} members; block mode supports at most 65535")]
    TooManyMembers {
        /// The STG id.
        stg: u32,
        /// Paths given.
        count: usize,
    },
    /// A layout field is out of range.
    #[error("STG {stg}: block layout {field} = {value} {reason}")]
    BadLayout {
        /// The STG id.
        stg: u32,
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is allowed.
        reason: &'static str,
    },
    /// The configuration fixes a slot larger than one command carries.
    #[error(
        "STG {stg}: a slot of {slot_bytes} bytes (slot_blocks {slot_blocks}) does not fit in \
         one command, whose limit is {limit} bytes ({what}); a slot is written and read by \
         one command: leave the slot size out to have it chosen from the members' limits, \
         or make it at most {limit} bytes ({max_blocks} blocks)"
    )]
    SlotAboveTransferLimit {
        /// The STG id.
        stg: u32,
        /// The slot size asked for, in blocks.
        slot_blocks: u32,
        /// The same in bytes.
        slot_bytes: u64,
        /// The lowest per-command limit found.
        limit: u64,
        /// What sets it.
        what: String,
        /// The largest slot in blocks within it.
        max_blocks: u64,
    },
    /// A member's block size is too small or differs from member 0's.
    #[error("STG {stg} member {member} ({path}): block size {block_size} {reason}")]
    BadBlockSize {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// Its block size.
        block_size: u32,
        /// What is expected.
        reason: String,
    },
    /// A member holds fewer blocks than the layout needs.
    #[error(
        "STG {stg} member {member} ({path}) has {present} blocks but the layout \
         (hosts {hosts}, slots {slots}, slot_blocks {slot_blocks}) needs {needed}; \
         use a larger LUN or fewer or smaller slots"
    )]
    TooSmall {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// Blocks the layout needs.
        needed: u64,
        /// Blocks the LUN has.
        present: u64,
        /// Layout hosts.
        hosts: u16,
        /// Layout slots.
        slots: u32,
        /// Layout slot size in blocks.
        slot_blocks: u32,
    },
    /// Block 0 holds no block-mode superblock.
    #[error(
        "STG {stg} member {member} ({path}) is not formatted for block mode; \
         run `stp stg format` for STG {stg} (it erases the lanes of every member)"
    )]
    NotFormatted {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
    },
    /// The member carries a superblock of an older block format (an
    /// earlier STP).
    #[error(
        "STG {stg} member {member} ({path}) was formatted by an earlier STP in block format \
         {format}; this version speaks block format {FORMAT}: run `stp stg format` for STG {stg} \
         again, then reopen it on every host"
    )]
    OldFormat {
        /// The format found (1 to 3).
        format: u8,
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
    },
    /// The superblock's CRC does not match.
    #[error(
        "STG {stg} member {member} ({path}) has a corrupt superblock ({why}); \
         run `stp stg format` for STG {stg} again"
    )]
    CorruptSuperblock {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// The decoding error.
        why: SuperblockError,
    },
    /// The member was formatted for another STG.
    #[error(
        "member {member} ({path}) was formatted for STG {found}, not STG {stg}; \
         check the members listed for STG {stg} in the configuration"
    )]
    WrongStg {
        /// The STG id asked for.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// The STG id in its superblock.
        found: u32,
    },
    /// The member count differs from the number of paths.
    #[error(
        "STG {stg} member {member} ({path}) was formatted as one of {found} members, \
         but {given} were given; list every member, or reformat"
    )]
    MemberCount {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// The count in its superblock.
        found: u16,
        /// Paths given.
        given: usize,
    },
    /// A member sits at another position than it was formatted at.
    #[error(
        "STG {stg}: path {position} ({path}) holds member {found}; list the members \
         in the same order on every host (the order they were formatted in)"
    )]
    MemberOrder {
        /// The STG id.
        stg: u32,
        /// The position the path was given at.
        position: usize,
        /// The path.
        path: String,
        /// The member index in its superblock.
        found: u16,
    },
    /// Members disagree about the layout.
    #[error(
        "STG {stg} member {member} ({path}) has layout {found:?} but member 0 has \
         {expected:?}; the members were formatted separately: reformat them together"
    )]
    LayoutMismatch {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// Its layout.
        found: BlockLayout,
        /// Member 0's layout.
        expected: BlockLayout,
    },
    /// Members carry different format generations.
    #[error(
        "STG {stg} member {member} ({path}) is from format generation {found:#018x} but \
         member 0 is from {expected:#018x}; the members were formatted separately (or a \
         format was interrupted): run `stp stg format` for STG {stg} again"
    )]
    GenerationMismatch {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// Its generation.
        found: u64,
        /// Member 0's generation.
        expected: u64,
    },
    /// The STG was reformatted after this host opened it.
    #[error(
        "STG {stg} was reformatted after this host opened it (member {member} now has \
         generation {found:#018x}, this host opened {opened:#018x}); reopen the STG \
         on every host"
    )]
    Reformatted {
        /// The STG id.
        stg: u32,
        /// The member whose superblock changed.
        member: usize,
        /// Its generation now (0: no valid superblock).
        found: u64,
        /// The generation this host opened.
        opened: u64,
    },
    /// This host's index is not below the layout's host count.
    #[error(
        "host index {host} is out of range: STG {stg} is formatted for {hosts} hosts \
         (indices 0–{}); give each host its own index",
        hosts.saturating_sub(1)
    )]
    BadHostIndex {
        /// The STG id.
        stg: u32,
        /// The index given.
        host: u16,
        /// Hosts in the layout.
        hosts: u16,
    },
    /// A command failed.
    #[error("STG {stg} member {member} ({path}): {action} failed: {source}")]
    Io {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Its path on this host.
        path: String,
        /// What was being done.
        action: &'static str,
        /// The command error.
        #[source]
        source: CommandError,
    },
    /// The poller thread could not be started.
    #[error("could not start the block-mode poller thread: {0}")]
    Spawn(#[source] io::Error),
    /// This host's doorbell address could not be bound.
    #[error(
        "STG {stg}: cannot listen for doorbells on {addr}: {source}; check `doorbells` in \
         [stg.block] (this host's entry must be an address of this host, its UDP port free)"
    )]
    Doorbell {
        /// The STG.
        stg: u32,
        /// This host's doorbell address.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
}

/// Tunables of a [`BlockStg`]; [`BlockConfig::default`] suits most uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Frames one port may queue before its lane is held (back-pressure).
    pub queue_frames: u32,
    /// Bytes (aligned frame spans) one port may queue before its lane is held.
    pub queue_bytes: u32,
    /// How long a sender waits for a free slot before
    /// [`Refusal::QueueFull`].
    pub ring_full_wait: Duration,
    /// When the consumer polls (see [`PollConfig`]); `poll.min` and
    /// `poll.max` also pace a sender waiting for a full ring.
    pub poll: PollConfig,
    /// The largest READ or WRITE issued, in bytes (at least one block is
    /// always moved).
    pub max_transfer_bytes: u32,
    /// Timeout of each SCSI command.
    pub command_timeout: Duration,
    /// How long the consumer holds a lane at a slot that fails its checks
    /// (re-reading it: an index block may have been forged or be ahead of
    /// the data) before it skips the slot.
    pub bad_slot_patience: Duration,
    /// Where the hosts hear their doorbells (see [`Doorbells`]); `None`:
    /// no doorbells, an idle lane's first slot waits for the next poll.
    pub doorbells: Option<Doorbells>,
}

impl Default for BlockConfig {
    fn default() -> BlockConfig {
        BlockConfig {
            queue_frames: 1024,
            queue_bytes: 16 << 20,
            ring_full_wait: Duration::from_secs(1),
            poll: PollConfig::default(),
            max_transfer_bytes: 1 << 20,
            command_timeout: Duration::from_secs(30),
            bad_slot_patience: Duration::from_secs(2),
            doorbells: None,
        }
    }
}

/// Counters of a [`BlockStg`] (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Slots this host wrote and published.
    pub slots_written: u64,
    /// Frames this host sent to other hosts.
    pub frames_sent: u64,
    /// Frames this host sent to its own ports (no array I/O).
    pub frames_local: u64,
    /// Slots this host consumed (valid or not).
    pub slots_read: u64,
    /// Of those, short slots taken by a probe before their producer block
    /// announced them (docs/PROTOCOL.md §4).
    pub slots_probed: u64,
    /// Probe READs issued (each one lane's; `slots_probed` of them found a
    /// message).
    pub probes: u64,
    /// Bytes READ from slots (probes and rereads included).
    pub slot_read_bytes: u64,
    /// Bytes the slots delivered said they used (headers and frames):
    /// `slot_read_bytes` over this is what reading costs per byte carried.
    pub slot_used_bytes: u64,
    /// Frames queued to this host's ports from the lanes.
    pub frames_received: u64,
    /// Frames dropped because their port was not bound here.
    pub frames_unbound: u64,
    /// Frames dropped because their port belongs to another host, or
    /// structurally malformed inside a valid slot.
    pub frames_misrouted: u64,
    /// Producer blocks read with a bad magic, CRC or index (ignored).
    pub bad_producer_blocks: u64,
    /// Consumer blocks read with a bad magic, CRC or index (ignored).
    pub bad_consumer_blocks: u64,
    /// Slots with a bad count, CRC or generation (held for
    /// [`BlockConfig::bad_slot_patience`], then skipped); each counted once.
    pub bad_slots: u64,
    /// Index blocks from another format generation (ignored).
    pub foreign_generation: u64,
    /// Slots whose lane sequence number was not the one expected
    /// (delivered anyway; the connection layer restores order).
    pub out_of_sequence: u64,
    /// Times the consumer gave up waiting for a member's turn.
    pub turn_skips: u64,
    /// Times a sender found a ring full and waited.
    pub ring_full_waits: u64,
    /// Sends that gave up on a full ring ([`Refusal::QueueFull`]).
    pub ring_full_errors: u64,
    /// Times the poller held a lane because a port queue was full.
    pub lane_stalls: u64,
    /// Commands that failed (after retries).
    pub io_errors: u64,
    /// Poll rounds.
    pub polls: u64,
    /// READ and WRITE commands issued (a retry not counted again).
    pub commands: u64,
    /// Doorbells this host rang (datagrams sent).
    pub doorbells_rung: u64,
    /// Doorbells heard from peers of this STG.
    pub doorbells_heard: u64,
    /// Datagrams on the doorbell's port that were not a peer's doorbell
    /// (ignored).
    pub doorbells_bad: u64,
    /// Messages published without writing their producer block at once
    /// (replies rung: the peer's probe takes them; the block follows).
    pub unannounced_slots: u64,
    /// A probe READ's cost in µs, averaged (0: none measured yet).
    pub probe_read_us: u64,
    /// Whether replies are rung rather than probed for (docs/PROTOCOL.md
    /// §4, Replies by doorbell): doorbells, probes at least
    /// [`PollConfig::ring_replies_above`], and the peer's rings heard.
    pub replies_rung: bool,
}

#[derive(Default)]
struct Counters {
    slots_written: AtomicU64,
    frames_sent: AtomicU64,
    frames_local: AtomicU64,
    slots_read: AtomicU64,
    slots_probed: AtomicU64,
    probes: AtomicU64,
    slot_read_bytes: AtomicU64,
    slot_used_bytes: AtomicU64,
    frames_received: AtomicU64,
    frames_unbound: AtomicU64,
    frames_misrouted: AtomicU64,
    bad_producer_blocks: AtomicU64,
    bad_consumer_blocks: AtomicU64,
    bad_slots: AtomicU64,
    foreign_generation: AtomicU64,
    out_of_sequence: AtomicU64,
    turn_skips: AtomicU64,
    ring_full_waits: AtomicU64,
    ring_full_errors: AtomicU64,
    lane_stalls: AtomicU64,
    io_errors: AtomicU64,
    polls: AtomicU64,
    commands: AtomicU64,
    doorbells_rung: AtomicU64,
    doorbells_heard: AtomicU64,
    doorbells_bad: AtomicU64,
    unannounced_slots: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> BlockStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            slots_written: g(&self.slots_written),
            frames_sent: g(&self.frames_sent),
            frames_local: g(&self.frames_local),
            slots_read: g(&self.slots_read),
            slots_probed: g(&self.slots_probed),
            probes: g(&self.probes),
            slot_read_bytes: g(&self.slot_read_bytes),
            slot_used_bytes: g(&self.slot_used_bytes),
            frames_received: g(&self.frames_received),
            frames_unbound: g(&self.frames_unbound),
            frames_misrouted: g(&self.frames_misrouted),
            bad_producer_blocks: g(&self.bad_producer_blocks),
            bad_consumer_blocks: g(&self.bad_consumer_blocks),
            bad_slots: g(&self.bad_slots),
            foreign_generation: g(&self.foreign_generation),
            out_of_sequence: g(&self.out_of_sequence),
            turn_skips: g(&self.turn_skips),
            ring_full_waits: g(&self.ring_full_waits),
            ring_full_errors: g(&self.ring_full_errors),
            lane_stalls: g(&self.lane_stalls),
            io_errors: g(&self.io_errors),
            polls: g(&self.polls),
            commands: g(&self.commands),
            doorbells_rung: g(&self.doorbells_rung),
            doorbells_heard: g(&self.doorbells_heard),
            doorbells_bad: g(&self.doorbells_bad),
            unannounced_slots: g(&self.unannounced_slots),
            probe_read_us: 0,
            replies_rung: false,
        }
    }
}

// ---------------------------------------------------------------------------
// Block I/O helpers
// ---------------------------------------------------------------------------

/// A consumer waits this long for a member's turn when other members
/// already have newer slots, then skips it.
const TURN_PATIENCE: Duration = Duration::from_millis(100);
/// Superblocks are re-read at most this often when foreign index blocks
/// suggest a reformat.
const SUPERBLOCK_RECHECK: Duration = Duration::from_secs(1);
/// A consumer writes its consumer blocks again at least this often (as
/// often as an idle poll reads every member), even
/// with nothing new consumed: another host on the SAN may have written
/// over one (docs/PROTOCOL.md §7.1), and a producer that cannot read it
/// sees a full ring until the consumer writes it again — which, with
/// nothing more to consume, it otherwise never would.
const CONSUMER_REASSERT: Duration = Duration::from_secs(4);
/// The longest the consumer blocks wait to be written after a probe took
/// a slot (fewer than half a ring taken since): a ping-pong then writes
/// them every few messages, not after each.
const PROBED_WRITE_DELAY: Duration = Duration::from_millis(100);
/// The most messages a producer leaves unannounced by its producer blocks
/// (a probe takes them without), and for how long at most.
const UNANNOUNCED_MAX: u64 = 16;
const UNANNOUNCED_DELAY: Duration = Duration::from_millis(100);
/// The poller's longest sleep, so that it notices a dropped engine soon.
const SLEEP_SLICE: Duration = Duration::from_millis(10);
/// What a consumer reads first of a large slot it expects alone: enough
/// for control frames and small messages.
const SLOT_HEAD: usize = 64 << 10;
/// Bytes of slots a sender stages before writing them.
const STAGE_BYTES: usize = 4 << 20;

fn rw(write: bool, lba: u64, blocks: u32) -> CdbBuf {
    if write {
        // No FUA: another initiator sees a WRITE once it completes GOOD,
        // which is all the lanes need, and LUNs that do not advertise
        // DPOFUA (LIO's ramdisk, for one) refuse the bit.
        Cdb::Write16 {
            lba,
            blocks,
            flags: RwFlags::default(),
        }
        .emit()
    } else {
        Cdb::Read16 {
            lba,
            blocks,
            flags: RwFlags::default(),
        }
        .emit()
    }
}

/// A READ returned fewer bytes than it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("short read: {got} of {expected} bytes; the LUN answered GOOD with less data than asked")]
pub struct ShortRead {
    /// Bytes returned.
    pub got: usize,
    /// Bytes asked for.
    pub expected: usize,
}

/// Runs one READ or READ CAPACITY into `buf` (resized to `len`), retried as
/// [`crate::retry`] allows ([`RetryPolicy::BLOCK`]): READs are idempotent,
/// so an ambiguous failure goes again too. The buffer is the command's
/// data-in buffer (no copy); a short read is an error.
fn exec_read(
    t: &mut dyn Transport,
    cdb: CdbBuf,
    buf: &mut IoBuf,
    len: usize,
    timeout: Duration,
) -> Result<(), CommandError> {
    RetryPolicy::BLOCK.run(Op::of_cdb(&cdb), || {
        let mut data = std::mem::take(buf);
        data.resize(len);
        let cmd = Command {
            direction: scsi::DataDirection::FromDevice,
            data,
            ..Command::no_data(cdb)
        }
        .with_timeout(timeout);
        let c = t.execute(cmd);
        *buf = c.data;
        let outcome = c.result.and_then(|o| o.check().map(|()| o))?;
        whole_read(len.min(buf.len()), len, outcome.residual)
    })
}

/// A READ of `asked` bytes that came back `residual` short must still have
/// brought the `wanted` ones.
fn whole_read(asked: usize, wanted: usize, residual: u32) -> Result<(), CommandError> {
    let got = asked.saturating_sub(residual as usize);
    if got < wanted {
        return Err(CommandError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            ShortRead {
                got,
                expected: wanted,
            },
        )));
    }
    Ok(())
}

/// Runs one WRITE from `buf` (whole blocks), retried as [`crate::retry`]
/// allows: a WRITE of the same data to the same blocks is idempotent. The
/// buffer is the command's data-out buffer (no copy) and comes back in
/// `buf`, unless a timed-out attempt kept it (then the WRITE is not
/// retried: there is nothing left to write).
fn exec_write(
    t: &mut dyn Transport,
    cdb: CdbBuf,
    buf: &mut IoBuf,
    timeout: Duration,
) -> Result<(), CommandError> {
    let len = buf.len();
    let mut lost: Option<CommandError> = None;
    RetryPolicy::BLOCK.run(Op::of_cdb(&cdb), || {
        if let Some(e) = lost.take() {
            return Err(e);
        }
        let cmd = Command::data_out(cdb, std::mem::take(buf)).with_timeout(timeout);
        let c = t.execute(cmd);
        *buf = c.data;
        let r = c.result.and_then(|o| o.check());
        if r.is_err() && buf.len() != len {
            lost = Some(CommandError::Io(io::Error::other(
                "a WRITE's buffer stayed with a command that did not finish; not retried",
            )));
        }
        r
    })
}

/// Runs a READ CAPACITY or a one-off READ of `len` bytes into a new buffer.
fn exec(
    t: &mut dyn Transport,
    cdb: CdbBuf,
    len: usize,
    timeout: Duration,
) -> Result<IoBuf, CommandError> {
    let mut buf = IoBuf::default();
    exec_read(t, cdb, &mut buf, len, timeout)?;
    Ok(buf)
}

/// Frames grouped by destination host: (host, each frame's byte range,
/// header and payload), hosts in the order they first appear.
type Routes = Vec<(u16, Vec<std::ops::Range<usize>>)>;

/// Rounds `buf`'s length up to whole `block_size` blocks, zeroing the bytes
/// added: a pooled buffer may hold an earlier command's data (a frame
/// opened in place, say) past its length, and these bytes go onto a LUN
/// every host on the fabric can read.
fn pad_to_blocks(buf: &mut IoBuf, block_size: usize) {
    let len = buf.len();
    buf.resize(len.div_ceil(block_size) * block_size);
    buf[len..].fill(0);
}

/// Geometry shared by the I/O helpers.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    block_size: u32,
    max_blocks: u32,
    timeout: Duration,
}

impl Geometry {
    fn new(block_size: u32, config: &BlockConfig) -> Geometry {
        Geometry {
            block_size,
            max_blocks: (config.max_transfer_bytes / block_size).max(1),
            timeout: config.command_timeout,
        }
    }

    /// Reads `blocks` blocks at `lba` into `out` (resized to them): straight
    /// into it when one command carries them, else command by command
    /// through a bounce buffer.
    fn read_into(
        &self,
        t: &mut dyn Transport,
        lba: u64,
        blocks: u64,
        out: &mut IoBuf,
    ) -> Result<(), CommandError> {
        let bs = self.block_size as usize;
        let total = usize::try_from(blocks)
            .ok()
            .and_then(|b| b.checked_mul(bs))
            .ok_or_else(|| CommandError::Io(io::Error::other("a read too large to address")))?;
        if blocks <= u64::from(self.max_blocks) {
            return exec_read(t, rw(false, lba, blocks as u32), out, total, self.timeout);
        }
        out.resize(total);
        let mut bounce = IoBuf::default();
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(u64::from(self.max_blocks)) as u32;
            let len = n as usize * bs;
            exec_read(t, rw(false, lba + done, n), &mut bounce, len, self.timeout)?;
            let at = done as usize * bs;
            out[at..at + len].copy_from_slice(&bounce);
            done += u64::from(n);
        }
        Ok(())
    }

    /// Reads `blocks` blocks at `lba` into a new buffer.
    fn read(&self, t: &mut dyn Transport, lba: u64, blocks: u64) -> Result<IoBuf, CommandError> {
        let mut out = IoBuf::default();
        self.read_into(t, lba, blocks, &mut out)?;
        Ok(out)
    }

    /// Writes `buf` at `lba`, its length rounded up to whole blocks with
    /// zeros ([`pad_to_blocks`]). Straight from `buf` when one command
    /// carries it, else command by command through a bounce buffer. `buf`
    /// comes back with its length restored.
    fn write_from(
        &self,
        t: &mut dyn Transport,
        lba: u64,
        buf: &mut IoBuf,
    ) -> Result<(), CommandError> {
        let bs = self.block_size as usize;
        let len = buf.len();
        let blocks = len.div_ceil(bs);
        if blocks <= self.max_blocks as usize {
            pad_to_blocks(buf, bs);
            let r = exec_write(t, rw(true, lba, blocks as u32), buf, self.timeout);
            if buf.capacity() >= len {
                buf.resize(len);
            }
            return r;
        }
        let max = self.max_blocks as usize * bs;
        let mut bounce = IoBuf::default();
        let mut at = 0;
        while at < len {
            let end = (at + max).min(len);
            bounce.resize(end - at);
            bounce.copy_from_slice(&buf[at..end]);
            pad_to_blocks(&mut bounce, bs);
            let n = bounce.len() / bs;
            exec_write(
                t,
                rw(true, lba + (at / bs) as u64, n as u32),
                &mut bounce,
                self.timeout,
            )?;
            at = end;
        }
        Ok(())
    }

    /// Writes `data` (padded with zeros to whole blocks) at `lba`.
    fn write(&self, t: &mut dyn Transport, lba: u64, data: &[u8]) -> Result<(), CommandError> {
        let bs = self.block_size as usize;
        let mut buf = IoBuf::new(data.len().div_ceil(bs) * bs);
        buf[..data.len()].copy_from_slice(data);
        self.write_from(t, lba, &mut buf)
    }
}

/// Reads `blocks` blocks of `block_size` bytes at `lba` (READ(16)), retried
/// as block I/O is; a short read is an error.
pub fn read_blocks(
    t: &mut dyn Transport,
    lba: u64,
    blocks: u32,
    block_size: u32,
    timeout: Duration,
) -> Result<IoBuf, CommandError> {
    exec(
        t,
        rw(false, lba, blocks),
        blocks as usize * block_size as usize,
        timeout,
    )
}

/// READ CAPACITY(16): (blocks, block size), retried as block I/O is.
pub fn read_capacity(t: &mut dyn Transport, timeout: Duration) -> Result<(u64, u32), CommandError> {
    let b = exec(t, Cdb::ReadCapacity16 { alloc_len: 32 }.emit(), 32, timeout)?;
    let field = |r: std::ops::Range<usize>| b.get(r).unwrap_or_default();
    let last = field(0..8).try_into().map_or(0, u64::from_be_bytes);
    let block_size = field(8..12).try_into().map_or(0, u32::from_be_bytes);
    Ok((last.saturating_add(1), block_size))
}

fn check_layout(stg: u32, layout: &BlockLayout) -> Result<(), BlockError> {
    match layout.problem() {
        Some((field, value, reason)) => Err(BlockError::BadLayout {
            stg,
            field,
            value,
            reason,
        }),
        None => Ok(()),
    }
}

fn check_slot_size(stg: u32, layout: &BlockLayout, block_size: u32) -> Result<usize, BlockError> {
    let bytes = u64::from(layout.slot_blocks) * u64::from(block_size);
    let min = (SLOT_HEADER_LEN + HEADER_LEN + ALIGN) as u64;
    if bytes < min || bytes > u64::from(u32::MAX) {
        return Err(BlockError::BadLayout {
            stg,
            field: "slot_blocks",
            value: layout.slot_blocks.into(),
            reason: "gives a slot outside 104 bytes – 4 GiB",
        });
    }
    Ok(bytes as usize)
}

/// READ CAPACITY(16) of member `member` of STG `stg`: its blocks and block
/// size, which must be at least [`MIN_BLOCK_SIZE`].
fn member_capacity(
    stg: u32,
    member: usize,
    t: &mut dyn Transport,
    timeout: Duration,
) -> Result<(u64, u32), BlockError> {
    let (blocks, bs) = read_capacity(t, timeout).map_err(|source| BlockError::Io {
        stg,
        member,
        path: t.describe(),
        action: "READ CAPACITY(16)",
        source,
    })?;
    if bs < MIN_BLOCK_SIZE {
        return Err(BlockError::BadBlockSize {
            stg,
            member,
            path: t.describe(),
            block_size: bs,
            reason: format!("is below the {MIN_BLOCK_SIZE} bytes block mode needs"),
        });
    }
    Ok((blocks, bs))
}

/// Formats `paths` (one per member, in member order) as block-mode STG
/// `stg_id` with `layout`: writes every member's superblock and, for every
/// lane, a producer and a consumer block with zero counts. Returns the new
/// format generation (random, never 0). Slots are not written.
///
/// Every member must hold [`BlockLayout::required_blocks`] blocks and all
/// must have the same block size (at least 512). Any host that had the STG
/// open must reopen it.
pub fn format<R: RngCore + ?Sized>(
    paths: &mut [Box<dyn Transport>],
    stg_id: u32,
    layout: &BlockLayout,
    rng: &mut R,
) -> Result<u64, BlockError> {
    let stg = stg_id;
    check_layout(stg, layout)?;
    if paths.is_empty() {
        return Err(BlockError::NoMembers { stg });
    }
    let member_count = u16::try_from(paths.len()).map_err(|_| BlockError::TooManyMembers {
        stg,
        count: paths.len(),
    })?;
    let config = BlockConfig::default();
    let io_err = |member: usize, path: &dyn Transport, action, source| BlockError::Io {
        stg,
        member,
        path: path.describe(),
        action,
        source,
    };
    let mut block_size = 0;
    for (member, p) in paths.iter_mut().enumerate() {
        let (blocks, bs) = member_capacity(stg, member, p.as_mut(), config.command_timeout)?;
        if member == 0 {
            block_size = bs;
            check_slot_size(stg, layout, bs)?;
        } else if bs != block_size {
            return Err(BlockError::BadBlockSize {
                stg,
                member,
                path: p.describe(),
                block_size: bs,
                reason: format!("differs from member 0's {block_size}"),
            });
        }
        let needed = layout.required_blocks();
        if blocks < needed {
            return Err(BlockError::TooSmall {
                stg,
                member,
                path: p.describe(),
                needed,
                present: blocks,
                hosts: layout.hosts,
                slots: layout.slots,
                slot_blocks: layout.slot_blocks,
            });
        }
    }
    let generation = loop {
        let g = rng.next_u64();
        if g != 0 {
            break g;
        }
    };
    let geo = Geometry::new(block_size, &config);
    let mut lanes = vec![0u8; 2 * block_size as usize];
    for kind in [IndexKind::Producer, IndexKind::Consumer] {
        let at = if kind == IndexKind::Producer {
            0
        } else {
            block_size as usize
        };
        let b = IndexBlock::new(kind, generation, 0, 0).encode();
        lanes[at..at + INDEX_LEN].copy_from_slice(&b);
    }
    for (member, p) in paths.iter_mut().enumerate() {
        let t = p.as_mut();
        // Invalidate first, so an interrupted format reads as unformatted.
        geo.write(t, 0, &vec![0u8; block_size as usize])
            .map_err(|e| io_err(member, t, "erasing the superblock", e))?;
        for s in 0..layout.hosts {
            for d in (0..layout.hosts).filter(|&d| d != s) {
                let lba = layout.lane_offset(s, d).unwrap_or(u64::MAX);
                geo.write(t, lba, &lanes)
                    .map_err(|e| io_err(member, t, "writing lane index blocks", e))?;
            }
        }
        let sb = Superblock {
            stg_id,
            member_index: member as u16,
            member_count,
            layout: *layout,
            block_size,
            generation,
        };
        geo.write(t, 0, &sb.encode())
            .map_err(|e| io_err(member, t, "writing the superblock", e))?;
    }
    Ok(generation)
}

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

struct Member {
    path: Mutex<Box<dyn Transport>>,
    name: String,
}

/// Consumer state of lane (`src` → this host); owned by the poller.
struct ConsLane {
    src: u16,
    c: Consumer,
    /// When its consumer blocks were last written (see
    /// [`CONSUMER_REASSERT`]).
    written_at: Instant,
    /// The last slot taken was short (a message): a probe may find the
    /// next one (after a long slot, a bulk stream's, it would not).
    last_short: bool,
    /// Slots probes took since the consumer blocks were last written: they
    /// are written at half a ring or after [`PROBED_WRITE_DELAY`].
    probed_unwritten: u64,
}

/// A slot staged for writing.
struct Staged {
    pos: SlotPos,
    image: IoBuf,
    frames: u64,
}

/// One host's engine for a formatted block-mode STG (see the
/// [module documentation](self)). Create it with [`BlockStg::open`] and
/// hand out [`BlockMailbox`]es with [`BlockStg::handle`]. Run exactly one
/// per host index and STG: two would both write this host's index blocks.
pub struct BlockStg {
    stg_id: u32,
    host: u16,
    layout: BlockLayout,
    generation: u64,
    epoch: u64,
    slot_bytes: usize,
    geo: Geometry,
    config: BlockConfig,
    members: Vec<Member>,
    ports: Mutex<Ports>,
    producers: Vec<Option<Mutex<Producer>>>,
    counters: Counters,
    stop: AtomicBool,
    stalled: AtomicBool,
    wake: Mutex<bool>,
    wake_cv: Condvar,
    schedule: Mutex<PollSchedule>,
    stale: Mutex<Option<(usize, u64)>>,
    last_recheck: Mutex<Option<Instant>>,
    poller: Mutex<Option<JoinHandle<()>>>,
    /// This host's doorbell, when the configuration gives it one.
    doorbell: Option<Mutex<doorbell::Doorbell>>,
    /// The thread that hears this host's doorbell.
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for BlockStg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        f.debug_struct("BlockStg")
            .field("stg_id", &self.stg_id)
            .field("host", &self.host)
            .field("layout", &self.layout)
            .field("generation", &format_args!("{:#018x}", self.generation))
            .field("members", &members)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlockStg {
    /// Opens STG `stg_id` as host `host_index` with the default
    /// [`BlockConfig`]; `paths` holds one path per member, in member order.
    pub fn open(
        paths: Vec<Box<dyn Transport>>,
        host_index: u16,
        stg_id: u32,
    ) -> Result<Arc<BlockStg>, BlockError> {
        BlockStg::open_with(paths, host_index, stg_id, BlockConfig::default())
    }

    /// Opens STG `stg_id` as host `host_index`: verifies every member's
    /// superblock (magic, CRC, STG id, member index = position, member
    /// count, one layout and one generation), resumes this host's lanes,
    /// and starts the poller thread.
    pub fn open_with(
        mut paths: Vec<Box<dyn Transport>>,
        host_index: u16,
        stg_id: u32,
        config: BlockConfig,
    ) -> Result<Arc<BlockStg>, BlockError> {
        let stg = stg_id;
        if paths.is_empty() {
            return Err(BlockError::NoMembers { stg });
        }
        let mut first: Option<Superblock> = None;
        for (member, p) in paths.iter_mut().enumerate() {
            let path = p.describe();
            let io_err = |action, source| BlockError::Io {
                stg,
                member,
                path: path.clone(),
                action,
                source,
            };
            let t = p.as_mut();
            let (blocks, bs) = read_capacity(t, config.command_timeout)
                .map_err(|e| io_err("READ CAPACITY(16)", e))?;
            if bs < MIN_BLOCK_SIZE {
                return Err(BlockError::NotFormatted { stg, member, path });
            }
            let geo = Geometry::new(bs, &config);
            let block0 = geo
                .read(t, 0, 1)
                .map_err(|e| io_err("reading the superblock", e))?;
            let sb = match Superblock::decode(&block0) {
                Ok(sb) => sb,
                Err(SuperblockError::NotFormatted | SuperblockError::Short(_)) => {
                    return Err(BlockError::NotFormatted { stg, member, path });
                }
                Err(SuperblockError::OldFormat(format)) => {
                    return Err(BlockError::OldFormat {
                        format,
                        stg,
                        member,
                        path,
                    });
                }
                Err(why) => {
                    return Err(BlockError::CorruptSuperblock {
                        stg,
                        member,
                        path,
                        why,
                    })
                }
            };
            if sb.stg_id != stg {
                return Err(BlockError::WrongStg {
                    stg,
                    member,
                    path,
                    found: sb.stg_id,
                });
            }
            if usize::from(sb.member_index) != member {
                return Err(BlockError::MemberOrder {
                    stg,
                    position: member,
                    path,
                    found: sb.member_index,
                });
            }
            if sb.block_size != bs {
                return Err(BlockError::BadBlockSize {
                    stg,
                    member,
                    path,
                    block_size: bs,
                    reason: format!("differs from the {} it was formatted with", sb.block_size),
                });
            }
            match &first {
                None => {
                    check_layout(stg, &sb.layout)?;
                    check_slot_size(stg, &sb.layout, bs)?;
                    first = Some(sb);
                }
                Some(f) => {
                    if sb.layout != f.layout {
                        return Err(BlockError::LayoutMismatch {
                            stg,
                            member,
                            path,
                            found: sb.layout,
                            expected: f.layout,
                        });
                    }
                    if sb.generation != f.generation {
                        return Err(BlockError::GenerationMismatch {
                            stg,
                            member,
                            path,
                            found: sb.generation,
                            expected: f.generation,
                        });
                    }
                    if sb.block_size != f.block_size {
                        return Err(BlockError::BadBlockSize {
                            stg,
                            member,
                            path,
                            block_size: bs,
                            reason: format!("differs from member 0's {}", f.block_size),
                        });
                    }
                }
            }
            let needed = sb.layout.required_blocks();
            if blocks < needed {
                return Err(BlockError::TooSmall {
                    stg,
                    member,
                    path,
                    needed,
                    present: blocks,
                    hosts: sb.layout.hosts,
                    slots: sb.layout.slots,
                    slot_blocks: sb.layout.slot_blocks,
                });
            }
        }
        let sb = first.unwrap_or_else(|| unreachable!("at least one member"));
        // Every superblock carries member 0's generation, so member 0's
        // count stands for all.
        if usize::from(sb.member_count) != paths.len() {
            return Err(BlockError::MemberCount {
                stg,
                member: 0,
                path: paths[0].describe(),
                found: sb.member_count,
                given: paths.len(),
            });
        }
        let layout = sb.layout;
        if host_index >= layout.hosts {
            return Err(BlockError::BadHostIndex {
                stg,
                host: host_index,
                hosts: layout.hosts,
            });
        }
        let geo = Geometry::new(sb.block_size, &config);
        let slot_bytes = check_slot_size(stg, &layout, sb.block_size)?;
        let generation = sb.generation;
        let bs = sb.block_size as usize;
        let m_count = paths.len();
        let s_count = u64::from(layout.slots);

        // Read the index blocks of every lane touching this host.
        let mut read_pair = |member: usize, src: u16, dst: u16| {
            let lba = layout.lane_offset(src, dst).unwrap_or(u64::MAX);
            let t = paths[member].as_mut();
            geo.read(t, lba, 2)
                .map(|b| {
                    let valid = |bytes: &[u8], kind| {
                        IndexBlock::decode(bytes)
                            .ok()
                            .filter(|i| i.kind == kind && i.generation == generation)
                    };
                    (
                        valid(&b[..bs], IndexKind::Producer),
                        valid(&b[bs..], IndexKind::Consumer),
                    )
                })
                .map_err(|source| BlockError::Io {
                    stg,
                    member,
                    path: t.describe(),
                    action: "reading lane index blocks",
                    source,
                })
        };
        let mut epoch = 0;
        let mut producers = Vec::with_capacity(layout.hosts as usize);
        for d in 0..layout.hosts {
            if d == host_index {
                producers.push(None);
                continue;
            }
            let mut produced = vec![0; m_count];
            let mut consumed = vec![0; m_count];
            for m in 0..m_count {
                let (p, c) = read_pair(m, host_index, d)?;
                let cc = c.map(|c| c.count);
                produced[m] = match (p, cc) {
                    (Some(p), Some(c)) => p.count.max(c),
                    (Some(p), None) => p.count,
                    (None, Some(c)) => c,
                    (None, None) => 0,
                };
                // Without a readable consumer block, assume a full ring and
                // re-read it before writing.
                consumed[m] = cc.unwrap_or(produced[m].saturating_sub(s_count));
                epoch = epoch.max(p.map_or(0, |p| p.epoch));
            }
            producers.push(Some(Producer::new(layout.slots, produced, consumed)));
        }
        let mut consumers = Vec::new();
        for s in (0..layout.hosts).filter(|&s| s != host_index) {
            let mut consumed = vec![0; m_count];
            for (m, c) in consumed.iter_mut().enumerate() {
                let (p, cb) = read_pair(m, s, host_index)?;
                epoch = epoch.max(cb.map_or(0, |c| c.epoch));
                // Start at the producer's position: frames queued for this
                // host before it opened belong to connections it no longer has.
                *c = p.map(|p| p.count).or(cb.map(|c| c.count)).unwrap_or(0);
            }
            consumers.push(ConsLane {
                src: s,
                c: Consumer::new(
                    layout.slots,
                    consumed,
                    TURN_PATIENCE,
                    config.bad_slot_patience,
                ),
                written_at: Instant::now(),
                last_short: true,
                probed_unwritten: 0,
            });
        }
        let epoch = epoch + 1;

        let members = paths
            .into_iter()
            .map(|p| Member {
                name: p.describe(),
                path: Mutex::new(p),
            })
            .collect();
        let doorbell = match config.doorbells {
            Some(peers) => doorbell::Doorbell::bind(peers, host_index).map_err(|source| {
                BlockError::Doorbell {
                    stg,
                    addr: peers
                        .of(host_index)
                        .unwrap_or_else(|| unreachable!("bound only with an address")),
                    source,
                }
            })?,
            None => None,
        };
        let listening = doorbell.as_ref().map(|d| d.receiver()).transpose();
        let listening = listening.map_err(BlockError::Spawn)?;
        let stg_arc = Arc::new(BlockStg {
            stg_id,
            host: host_index,
            layout,
            generation,
            epoch,
            slot_bytes,
            geo,
            config,
            members,
            ports: Mutex::new(Ports {
                bound: HashMap::new(),
                next_dynamic: rand::thread_rng().gen_range(0..PORTS_PER_HOST - FIRST_DYNAMIC_LOCAL),
            }),
            producers: producers.into_iter().map(|p| p.map(Mutex::new)).collect(),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            wake: Mutex::new(false),
            wake_cv: Condvar::new(),
            schedule: Mutex::new({
                let s = PollSchedule::new(config.poll, Instant::now());
                if doorbell.is_some() {
                    s.with_doorbells()
                } else {
                    s
                }
            }),
            stale: Mutex::new(None),
            last_recheck: Mutex::new(None),
            poller: Mutex::new(None),
            doorbell: doorbell.map(Mutex::new),
            listener: Mutex::new(None),
        });
        // Announce this host's epoch and position on every lane it writes,
        // past any message an earlier opening published and did not live
        // to announce (a probe may have taken it: writing another slot in
        // its place would be lost).
        for d in 0..layout.hosts {
            let Some(lane) = &stg_arc.producers[usize::from(d)] else {
                continue;
            };
            let mut lane = lock(lane);
            stg_arc.resume_past_unannounced(&mut lane, d);
            for m in 0..m_count {
                let count = lane.produced(m);
                stg_arc
                    .write_now(stg_arc.producer_block(&lane, d, m, count))
                    .map_err(|source| stg_arc.io_error(m, "writing a producer block", source))?;
                lane.announced(m, count);
            }
        }
        for lane in &mut consumers {
            stg_arc.write_consumer_blocks(lane);
        }
        let weak = Arc::downgrade(&stg_arc);
        let handle = thread::Builder::new()
            .name(format!("stp-block-{stg_id}-h{host_index}"))
            .spawn(move || poller(weak, consumers))
            .map_err(BlockError::Spawn)?;
        *lock(&stg_arc.poller) = Some(handle);
        if let Some(socket) = listening {
            let weak = Arc::downgrade(&stg_arc);
            let handle = thread::Builder::new()
                .name(format!("stp-bell-{stg_id}-h{host_index}"))
                .spawn(move || listener(weak, socket))
                .map_err(BlockError::Spawn)?;
            *lock(&stg_arc.listener) = Some(handle);
        }
        Ok(stg_arc)
    }

    fn io_error(&self, member: usize, action: &'static str, source: CommandError) -> BlockError {
        BlockError::Io {
            stg: self.stg_id,
            member,
            path: self.members[member].name.clone(),
            action,
            source,
        }
    }

    /// A new mailbox handle onto this STG (cheap: it shares the engine).
    pub fn handle(self: &Arc<Self>) -> BlockMailbox {
        BlockMailbox { stg: self.clone() }
    }

    /// The STG id.
    pub fn stg_id(&self) -> u32 {
        self.stg_id
    }

    /// This host's index.
    pub fn host(&self) -> u16 {
        self.host
    }

    /// The layout read from the superblocks.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// The format generation this host opened.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This host's epoch: one more than the largest epoch found in the
    /// index blocks it writes.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The members' block size.
    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }

    /// Member count.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// Bytes per slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The largest frame payload block mode carries on this STG:
    /// slot size − slot header − frame header (and at most 1 MiB). Set the
    /// connection's `max_payload` no higher.
    pub fn max_payload(&self) -> u32 {
        let p = self.slot_bytes - SLOT_HEADER_LEN - HEADER_LEN;
        u32::try_from(p).unwrap_or(u32::MAX).min(MAX_PAYLOAD)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BlockStats {
        let s = lock(&self.schedule);
        BlockStats {
            probe_read_us: s.read_cost().map_or(0, |c| c.as_micros() as u64),
            replies_rung: s.rung_replies(),
            ..self.counters.snapshot()
        }
    }

    /// Re-reads every member's superblock and checks it is still the
    /// format this host opened.
    pub fn verify(&self) -> Result<(), BlockError> {
        for m in 0..self.members.len() {
            let found = self.superblock_generation(m)?;
            if found != self.generation {
                self.mark_stale(m, found);
                return Err(self.reformatted(m, found));
            }
        }
        Ok(())
    }

    fn reformatted(&self, member: usize, found: u64) -> BlockError {
        BlockError::Reformatted {
            stg: self.stg_id,
            member,
            found,
            opened: self.generation,
        }
    }

    /// The generation in member `m`'s superblock, 0 when it has none.
    fn superblock_generation(&self, m: usize) -> Result<u64, BlockError> {
        let b = self
            .read(m, 0, 1)
            .map_err(|e| self.io_error(m, "reading the superblock", e))?;
        Ok(match Superblock::decode(&b) {
            Ok(sb) if sb.stg_id == self.stg_id => sb.generation,
            _ => 0,
        })
    }

    fn mark_stale(&self, member: usize, found: u64) {
        lock(&self.stale).get_or_insert((member, found));
    }

    /// Called when an index block carries another generation: re-reads the
    /// superblocks (at most once per [`SUPERBLOCK_RECHECK`]).
    fn foreign(&self) {
        bump(&self.counters.foreign_generation, 1);
        {
            let mut last = lock(&self.last_recheck);
            if last.is_some_and(|t| t.elapsed() < SUPERBLOCK_RECHECK) {
                return;
            }
            *last = Some(Instant::now());
        }
        let _ = self.verify();
    }

    fn check_stale(&self) -> Result<(), MailboxError> {
        match *lock(&self.stale) {
            None => Ok(()),
            Some((m, found)) => Err(SetupError::Block(self.reformatted(m, found)).into()),
        }
    }

    /// Runs `io` on member `m`'s path, counting a failure.
    fn on_member<T>(
        &self,
        m: usize,
        io: impl FnOnce(&Geometry, &mut dyn Transport) -> Result<T, CommandError>,
    ) -> Result<T, CommandError> {
        let mut t = lock(&self.members[m].path);
        bump(&self.counters.commands, 1);
        let r = io(&self.geo, t.as_mut());
        if r.is_err() {
            bump(&self.counters.io_errors, 1);
        }
        r
    }

    fn read(&self, m: usize, lba: u64, blocks: u64) -> Result<IoBuf, CommandError> {
        self.on_member(m, |g, t| g.read(t, lba, blocks))
    }

    fn write_from(&self, m: usize, lba: u64, buf: &mut IoBuf) -> Result<(), CommandError> {
        self.on_member(m, |g, t| g.write_from(t, lba, buf))
    }

    fn lane_lba(&self, src: u16, dst: u16) -> u64 {
        self.layout
            .lane_offset(src, dst)
            .unwrap_or_else(|| unreachable!("lane ({src}, {dst}) of a checked layout"))
    }

    fn slot_lba(&self, src: u16, dst: u16, counter: u64) -> u64 {
        let slot = (counter % u64::from(self.layout.slots)) as u32;
        self.layout
            .slot_offset(src, dst, slot)
            .unwrap_or_else(|| unreachable!("slot of a checked layout"))
    }

    /// Runs one WRITE made by [`index_write`](Self::index_write) alone.
    fn write_now(&self, mut io: BatchIo) -> Result<(), CommandError> {
        self.write_from(io.member, io.lba, &mut io.buf)
    }

    /// The WRITE of an index block (padded with zeros to the block);
    /// `sizes` as [`IndexBlock::sizes`].
    fn index_write(
        &self,
        m: usize,
        src: u16,
        dst: u16,
        kind: IndexKind,
        count: u64,
        sizes: [u32; INDEX_SIZES],
    ) -> BatchIo {
        let block = IndexBlock {
            sizes,
            ..IndexBlock::new(kind, self.generation, count, self.epoch)
        }
        .encode();
        let lba = self.lane_lba(src, dst) + u64::from(kind == IndexKind::Consumer);
        let mut buf = IoBuf::new(self.geo.block_size as usize);
        buf[..block.len()].copy_from_slice(&block);
        BatchIo::write(m, lba, buf)
    }

    /// The WRITE of this host's producer block on member `m` of the lane to
    /// `d`, saying `count` (with the sizes `lane` keeps).
    fn producer_block(&self, lane: &Producer, d: u16, m: usize, count: u64) -> BatchIo {
        self.index_write(m, self.host, d, IndexKind::Producer, count, lane.sizes(m))
    }

    /// How much of a slot a consumer reads first when it expects one slot
    /// from a member: `None` (the whole slot) unless slots are larger.
    fn slot_head_bytes(&self) -> Option<usize> {
        let bs = self.geo.block_size as usize;
        let head = SLOT_HEAD.next_multiple_of(bs);
        (head < self.slot_bytes).then_some(head)
    }

    /// Counts the bytes of slots `reads` READ (those that succeeded).
    fn count_read(&self, reads: &[BatchIo]) {
        let n: usize = reads
            .iter()
            .filter(|io| io.result.is_ok())
            .map(|io| io.len)
            .sum();
        bump(&self.counters.slot_read_bytes, n as u64);
    }

    /// Runs `ios` on their members at once (see [`batch`]), counting the
    /// commands that failed.
    fn batch(&self, ios: &mut [BatchIo]) {
        let paths: Vec<&Mutex<Box<dyn Transport>>> = self.members.iter().map(|m| &m.path).collect();
        bump(&self.counters.commands, ios.len() as u64);
        let failed = batch::run(&paths, &self.geo, ios);
        bump(&self.counters.io_errors, failed as u64);
    }

    fn kick(&self) {
        *lock(&self.wake) = true;
        self.wake_cv.notify_all();
    }

    /// Sleeps until `until` or a [`kick`](Self::kick).
    fn sleep_until(&self, until: Instant) {
        let mut kicked = lock(&self.wake);
        if !*kicked {
            let d = until.saturating_duration_since(Instant::now());
            kicked = self
                .wake_cv
                .wait_timeout(kicked, d)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *kicked = false;
    }

    /// Polls as soon as the schedule allows: a held lane may move.
    fn poll_now(&self) {
        lock(&self.schedule).poke(Instant::now());
        self.kick();
    }

    /// This host sent `bytes` to another host (its slots published): a
    /// reply may come, so poll soon.
    fn sent(&self, bytes: usize) {
        if lock(&self.schedule).sent(Instant::now(), bytes) {
            self.kick();
        }
    }

    /// This host made slots visible to host `dst`: ring `dst`'s doorbell if
    /// it has not heard from this host for a while, or after every send
    /// where replies are rung (see [`poll`]). True when replies are rung
    /// and the datagram went out: `dst` probes for the slot at once.
    fn ring(&self, dst: u16) -> bool {
        let Some(bell) = &self.doorbell else {
            return false;
        };
        let every = lock(&self.schedule).rings_every_send();
        let ring = Ring {
            stg_id: self.stg_id,
            src: self.host,
            dst,
            generation: self.generation as u32,
        };
        let rang = lock(bell).ring(dst, &ring, Instant::now(), every);
        if rang {
            bump(&self.counters.doorbells_rung, 1);
            crate::counters::bump!(doorbell_bytes, RING_LEN);
        }
        rang && every
    }

    /// A doorbell datagram arrived from `from`: poll at once if it is a
    /// peer's.
    fn heard(&self, datagram: &[u8], from: std::net::SocketAddr) {
        match Ring::decode(datagram) {
            Ok(r) if r.is_for(self.stg_id, self.generation, self.layout.hosts, self.host) => {
                bump(&self.counters.doorbells_heard, 1);
                // The process counts a datagram once: one a host of its own
                // rang was counted as sent.
                if !doorbell::bound_here(from) {
                    crate::counters::bump!(doorbell_bytes, RING_LEN);
                }
                if lock(&self.schedule).rung(Instant::now(), r.src) {
                    self.kick();
                }
            }
            _ => bump(&self.counters.doorbells_bad, 1),
        }
    }

    // ---- ports ----

    /// Binds `port` (`None` or `Some(0)`: a dynamic port of this host).
    pub fn bind(&self, port: Option<u32>) -> Result<Binding, MailboxError> {
        self.check_stale()?;
        let mut ports = lock(&self.ports);
        let port = match port.filter(|&p| p != 0) {
            Some(p) => {
                match port_host(p) {
                    Some(h) if h == self.host => {}
                    Some(owner) => {
                        return Err(SetupError::ForeignPort {
                            port: p,
                            owner,
                            host: self.host,
                        }
                        .into())
                    }
                    None => return Err(SetupError::NotABlockPort { port: p }.into()),
                }
                if ports.bound.contains_key(&p) {
                    return Err(MailboxError::Refused(Refusal::PortInUse));
                }
                p
            }
            None => {
                let span = PORTS_PER_HOST - FIRST_DYNAMIC_LOCAL;
                let start = ports.next_dynamic;
                let base = u32::from(self.host) << PORT_HOST_SHIFT | FIRST_DYNAMIC_LOCAL;
                let found = (0..span)
                    .map(|i| base + (start + i) % span)
                    .find(|p| !ports.bound.contains_key(p))
                    .ok_or(MailboxError::Refused(Refusal::NoFreePorts))?;
                ports.next_dynamic = (found - base + 1) % span;
                found
            }
        };
        let handle = loop {
            let h: u32 = rand::thread_rng().gen();
            if h != 0 {
                break h;
            }
        };
        ports.bound.insert(port, PortQueue::new(handle));
        Ok(Binding {
            port,
            handle,
            queue_frames: self.config.queue_frames,
            queue_bytes: self.config.queue_bytes,
        })
    }

    /// Releases a binding; its queued frames are dropped and receivers
    /// waiting on it return [`Refusal::Released`].
    pub fn release(&self, binding: &Binding) -> Result<(), MailboxError> {
        let mut ports = lock(&self.ports);
        match ports.bound.get(&binding.port) {
            Some(q) if q.handle == binding.handle => {
                let q = ports.bound.remove(&binding.port);
                drop(ports);
                if let Some(q) = q {
                    q.ready.notify_all();
                }
                self.poll_now();
                Ok(())
            }
            _ => Err(MailboxError::Refused(Refusal::BadHandle)),
        }
    }

    /// Whole frames for `binding`, at most `max` bytes, into `buf` (its
    /// allocation reused), waiting up to `wait` for the first: the frames
    /// are copied once, from the slot buffers they were read into, packed
    /// at 8-byte aligned offsets. On success `buf.len()` is the bytes
    /// received (0: none arrived).
    pub fn receive_into(
        &self,
        binding: &Binding,
        buf: &mut IoBuf,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        buf.resize(0);
        self.receive_with(binding, wait, |q| copy_out(q, buf, max))
    }

    /// Frames for `binding` as [`receive_into`](Self::receive_into) takes
    /// them, but without a copy where it can: when the slot buffers the
    /// first waiting frames were read into hold frames for this port alone
    /// (and the poll is done with them), the buffers move to `lent`
    /// ([`Mailbox::receive_lent`]); otherwise the frames are copied into
    /// `buf`.
    pub fn receive_lent(
        &self,
        binding: &Binding,
        buf: &mut IoBuf,
        lent: &mut Lent,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        buf.resize(0);
        self.receive_with(binding, wait, |q| {
            if q.take_lent(lent) {
                Ok(())
            } else {
                copy_out(q, buf, max)
            }
        })
    }

    /// Waits up to `wait` for frames for `binding` and lets `take` take
    /// them from its queue.
    fn receive_with(
        &self,
        binding: &Binding,
        wait: Duration,
        mut take: impl FnMut(&mut PortQueue) -> Result<(), MailboxError>,
    ) -> Result<(), MailboxError> {
        self.check_stale()?;
        let deadline = Instant::now().checked_add(wait);
        let mut ports = lock(&self.ports);
        let ready = match ports.bound.get(&binding.port) {
            Some(q) if q.handle == binding.handle => q.ready.clone(),
            _ => return Err(MailboxError::Refused(Refusal::BadHandle)),
        };
        loop {
            let q = match ports.bound.get_mut(&binding.port) {
                Some(q) if q.handle == binding.handle => q,
                _ => return Err(MailboxError::Refused(Refusal::Released)),
            };
            if !q.is_empty() {
                take(q)?;
                drop(ports);
                if self.stalled.load(Ordering::Acquire) {
                    self.poll_now();
                }
                return Ok(());
            }
            let now = Instant::now();
            ports = match deadline {
                Some(d) if now >= d => return Ok(()),
                Some(d) => {
                    ready
                        .wait_timeout(ports, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => ready.wait(ports).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// Queues frames (each `dst_port` on this host) for local ports, all or
    /// nothing: `Err(port)`, and nothing queued, when a bound port lacks
    /// room. Frames for unbound ports are dropped and counted. A frame
    /// stays where it was read (a range of its slot buffer) until received.
    /// Returns the queues to notify.
    fn deliver(&self, frames: &[(u32, Held)]) -> Result<Vec<Arc<Condvar>>, u32> {
        let limits = Limits {
            frames: self.config.queue_frames as usize,
            bytes: self.config.queue_bytes as usize,
        };
        let done = lock(&self.ports).queue(frames, limits)?;
        bump(&self.counters.frames_received, done.received);
        bump(&self.counters.frames_unbound, done.unbound);
        Ok(done.wake)
    }

    // ---- producing ----

    /// Checks the frames packed at 8-byte aligned offsets in `packed` (all
    /// from `binding`'s port: structure, source port, destination host,
    /// payload within [`max_payload`](Self::max_payload)) and groups them
    /// by destination host, in the order each host first appears: (host,
    /// each frame's byte range in `packed`, header and payload).
    fn route(&self, binding: &Binding, packed: &[u8]) -> Result<Routes, MailboxError> {
        self.check_stale()?;
        match lock(&self.ports).bound.get(&binding.port) {
            Some(q) if q.handle == binding.handle => {}
            _ => return Err(MailboxError::Refused(Refusal::BadHandle)),
        }
        let max_payload = self.max_payload();
        let mut routes: Routes = Vec::new();
        for found in Frames::new(packed) {
            let found = found.map_err(|(offset, _)| {
                MailboxError::Refused(Refusal::MalformedFrame {
                    offset: offset as u32,
                })
            })?;
            let h = found.header;
            if h.src_port != binding.port {
                return Err(MailboxError::Refused(Refusal::SourcePortMismatch {
                    offset: found.offset as u32,
                }));
            }
            if h.payload_len > max_payload {
                return Err(SetupError::PayloadTooLarge {
                    stg: self.stg_id,
                    offset: found.offset,
                    payload: h.payload_len,
                    max: max_payload,
                }
                .into());
            }
            let host = match port_host(h.dst_port) {
                Some(d) if d < self.layout.hosts => d,
                _ => return Err(MailboxError::Refused(Refusal::PortNotBound(h.dst_port))),
            };
            let range = found.offset..found.offset + HEADER_LEN + h.payload_len as usize;
            match routes.iter_mut().find(|(d, _)| *d == host) {
                Some((_, frames)) => frames.push(range),
                None => routes.push((host, vec![range])),
            }
        }
        Ok(routes)
    }

    /// Sends frames packed at 8-byte aligned offsets, all from `binding`'s
    /// port, splitting them by destination host (`dst_port >> 12`). Checks
    /// every frame first (`route`); frames for this host's
    /// own ports are queued directly, the others copied into slot images.
    /// Not atomic across destination hosts: a failure may leave earlier
    /// frames sent.
    pub fn send_packed(&self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        let routes = self.route(binding, packed)?;
        self.send_routed(packed, routes)
    }

    /// Sends frames [`route`](Self::route) has checked and grouped.
    fn send_routed(&self, packed: &[u8], routes: Routes) -> Result<(), MailboxError> {
        for (d, ranges) in routes {
            let frames: Vec<&[u8]> = ranges.iter().map(|r| &packed[r.clone()]).collect();
            let first_port = dst_port(frames[0]);
            if d == self.host {
                let local: Vec<(u32, Held)> = frames
                    .iter()
                    .map(|f| (dst_port(f), Held::copied(f)))
                    .collect();
                let wake = self
                    .deliver(&local)
                    .map_err(|port| MailboxError::Refused(Refusal::QueueFull { port }))?;
                for q in wake {
                    q.notify_all();
                }
                bump(&self.counters.frames_local, frames.len() as u64);
                continue;
            }
            let bytes = frames.iter().map(|f| f.len()).sum();
            let slots = self.build_slots(&frames);
            let mut spent = Vec::new();
            let result = self.produce(d, slots, first_port, &mut spent);
            for image in spent {
                BufPool::global().put(image);
            }
            result?;
            self.sent(bytes);
        }
        Ok(())
    }

    /// Sends the frames in `buf` after its first [`SLOT_HEADER_LEN`] bytes
    /// (the room [`Mailbox::send_headroom`] asks for), as
    /// [`send_packed`](Self::send_packed) does. When they all go to one
    /// other host and fit a slot, `buf` itself is the slot image: its
    /// header is written into the room and the WRITE carries the buffer, no
    /// copy. `buf` comes back as it went but for the room, on success or
    /// failure (the sender may send it again).
    pub fn send_owned(&self, binding: &Binding, buf: &mut IoBuf) -> Result<(), MailboxError> {
        let h = SLOT_HEADER_LEN;
        let Some(packed) = buf.get(h..) else {
            return Err(MailboxError::Refused(Refusal::MalformedFrame { offset: 0 }));
        };
        let routes = self.route(binding, packed)?;
        let (d, ranges) = match routes.as_slice() {
            [(d, ranges)] if *d != self.host && buf.len() <= self.slot_bytes => (*d, ranges),
            _ => return self.send_routed(packed, routes),
        };
        let first_port = dst_port(&packed[ranges[0].clone()]);
        let frames = ranges.len() as u64;
        // Zero what lies between and after the frames (alignment padding,
        // whatever the buffer held before): it goes onto a shared LUN.
        let mut at = h;
        for r in ranges {
            buf[at..h + r.start].fill(0);
            at = h + r.end;
        }
        let len = buf.len();
        buf.resize(at);
        let mut spent = Vec::with_capacity(1);
        let result = self.produce(
            d,
            vec![(std::mem::take(buf), frames)],
            first_port,
            &mut spent,
        );
        *buf = spent.pop().unwrap_or_default();
        if buf.capacity() >= len {
            buf.resize(len);
        }
        result?;
        self.sent(at - h);
        Ok(())
    }

    /// Packs frames into slot images (header room, then frames at aligned
    /// offsets, no trailing padding), as many per slot as fit, in pooled
    /// DMA buffers that the WRITEs then carry: the payload's one copy in
    /// block mode's send path.
    fn build_slots(&self, frames: &[&[u8]]) -> Vec<(IoBuf, u64)> {
        let cap = self.slot_bytes - SLOT_HEADER_LEN;
        let pool = BufPool::global();
        let fresh = || {
            let mut b = pool.get(self.slot_bytes);
            b.resize(SLOT_HEADER_LEN);
            b
        };
        let mut slots = Vec::new();
        let mut cur = fresh();
        let mut n = 0u64;
        for f in frames {
            let mut used = cur.len() - SLOT_HEADER_LEN;
            let mut start = used.next_multiple_of(ALIGN);
            if n > 0 && start + f.len() > cap {
                slots.push((std::mem::replace(&mut cur, fresh()), n));
                n = 0;
                (used, start) = (0, 0);
            }
            let at = SLOT_HEADER_LEN + start;
            cur.resize(at + f.len());
            // Padding between frames is zero (the CRC covers it).
            cur[SLOT_HEADER_LEN + used..at].fill(0);
            cur[at..].copy_from_slice(f);
            crate::counters::bump!(send_copy_bytes, f.len().saturating_sub(HEADER_LEN));
            n += 1;
        }
        if n > 0 {
            slots.push((cur, n));
        } else {
            pool.put(cur);
        }
        slots
    }

    /// Writes `slots` (images with their frame counts) on the lane to host
    /// `d` and publishes them, waiting for ring room up to
    /// [`BlockConfig::ring_full_wait`]. Every image ends in `spent`, written
    /// or not, whatever the outcome.
    fn produce(
        &self,
        d: u16,
        slots: Vec<(IoBuf, u64)>,
        port: u32,
        spent: &mut Vec<IoBuf>,
    ) -> Result<(), MailboxError> {
        let lane = self.producers[usize::from(d)]
            .as_ref()
            .unwrap_or_else(|| unreachable!("a lane to every other host"));
        let mut lane = lock(lane);
        let mut stage: Vec<Staged> = Vec::new();
        let mut pending = slots.into_iter();
        let result = self.produce_staged(&mut lane, d, &mut pending, &mut stage, port, spent);
        spent.extend(stage.into_iter().map(|s| s.image));
        spent.extend(pending.map(|(image, _)| image));
        result
    }

    fn produce_staged(
        &self,
        lane: &mut Producer,
        d: u16,
        pending: &mut impl Iterator<Item = (IoBuf, u64)>,
        stage: &mut Vec<Staged>,
        port: u32,
        spent: &mut Vec<IoBuf>,
    ) -> Result<(), MailboxError> {
        let mut staged_bytes = 0;
        let deadline = Instant::now() + self.config.ring_full_wait;
        for (mut image, frames) in pending {
            if let Err(e) =
                self.wait_for_room(lane, d, stage, &mut staged_bytes, deadline, port, spent)
            {
                spent.push(image);
                return Err(e);
            }
            let pos = lane.stage(u32::try_from(image.len()).unwrap_or(u32::MAX));
            seal_slot(&mut image, self.generation, pos.seq);
            staged_bytes += image.len();
            stage.push(Staged { pos, image, frames });
            if staged_bytes >= STAGE_BYTES {
                self.commit(lane, d, stage, spent)?;
                staged_bytes = 0;
            }
        }
        if !stage.is_empty() {
            self.commit(lane, d, stage, spent)?;
        }
        Ok(())
    }

    /// Waits until the lane's ring has room for one more slot: re-reads
    /// the consumer block, commits what is staged (the consumer can only
    /// make room for slots it can see), then backs off up to `deadline`.
    #[allow(clippy::too_many_arguments)]
    fn wait_for_room(
        &self,
        lane: &mut Producer,
        d: u16,
        stage: &mut Vec<Staged>,
        staged_bytes: &mut usize,
        deadline: Instant,
        port: u32,
        spent: &mut Vec<IoBuf>,
    ) -> Result<(), MailboxError> {
        let mut backoff = self.config.poll.min;
        let mut waited = false;
        while !lane.has_room() {
            self.refresh_consumed(lane, d, lane.turn());
            if lane.has_room() {
                break;
            }
            if !stage.is_empty() {
                self.commit(lane, d, stage, spent)?;
                *staged_bytes = 0;
                continue;
            }
            if !waited {
                waited = true;
                bump(&self.counters.ring_full_waits, 1);
            }
            if Instant::now() >= deadline {
                bump(&self.counters.ring_full_errors, 1);
                return Err(MailboxError::Refused(Refusal::QueueFull { port }));
            }
            self.check_stale()?;
            thread::sleep(backoff);
            backoff = (backoff * 2).min(self.config.poll.max);
        }
        Ok(())
    }

    /// Acts on what an index block read said: a foreign generation may be a
    /// reformat; a bad block is counted in `bad`.
    fn judged(&self, verdict: Index, bad: &AtomicU64) {
        match verdict {
            Index::Fresh => {}
            Index::Foreign => self.foreign(),
            Index::Bad => bump(bad, 1),
        }
    }

    /// Reads the consumer block of lane (this host → `d`) on member `m`.
    fn refresh_consumed(&self, lane: &mut Producer, d: u16, m: usize) {
        let Ok(b) = self.read(m, self.lane_lba(self.host, d) + 1, 1) else {
            return;
        };
        let verdict = lane.on_consumer_block(m, &b, self.generation);
        self.judged(verdict, &self.counters.bad_consumer_blocks);
    }

    /// Writes the staged slots (data first, every member), then the
    /// producer blocks, in the order the members were first used. The
    /// images go to `spent`.
    fn commit(
        &self,
        lane: &mut Producer,
        d: u16,
        stage: &mut Vec<Staged>,
        spent: &mut Vec<IoBuf>,
    ) -> Result<(), MailboxError> {
        let result = self.commit_inner(lane, d, stage);
        let mut done = std::mem::take(stage);
        for s in &mut done {
            spent.push(std::mem::take(&mut s.image));
        }
        match result {
            Ok(()) => {
                bump(&self.counters.slots_written, done.len() as u64);
                bump(
                    &self.counters.frames_sent,
                    done.iter().map(|s| s.frames).sum(),
                );
                Ok(())
            }
            Err((published, e)) => {
                // The first slot not published is where the next one goes.
                let first = done
                    .iter()
                    .find(|s| !published.contains(&s.pos.member))
                    .map(|s| s.pos);
                lane.abandon(first);
                Err(MailboxError::Transport(e))
            }
        }
    }

    fn commit_inner(
        &self,
        lane: &mut Producer,
        d: u16,
        stage: &mut [Staged],
    ) -> Result<(), (Vec<usize>, CommandError)> {
        let s_count = u64::from(self.layout.slots);
        let mut order: Vec<usize> = Vec::new();
        for s in stage.iter() {
            if !order.contains(&s.pos.member) {
                order.push(s.pos.member);
            }
        }
        // The data: one WRITE per run of ring-contiguous slots of a member,
        // every member's at once.
        let mut ios = Vec::new();
        // Per WRITE, the stage entry whose image it carries (one slot) or
        // `None` (a run copied into a pooled buffer).
        let mut carried = Vec::new();
        for &m in &order {
            let mine: Vec<usize> = (0..stage.len())
                .filter(|&k| stage[k].pos.member == m)
                .collect();
            let mut i = 0;
            while i < mine.len() {
                let first = stage[mine[i]].pos.counter;
                let room = (s_count - first % s_count) as usize;
                let run = &mine[i..(i + room).min(mine.len())];
                let lba = self.slot_lba(self.host, d, first);
                if let [one] = run {
                    // One slot: its image is the WRITE's buffer.
                    let image = std::mem::take(&mut stage[*one].image);
                    ios.push(BatchIo::write(m, lba, image));
                    carried.push(Some(*one));
                } else {
                    // Consecutive slots share one WRITE.
                    let mut buf = BufPool::global().get(run.len() * self.slot_bytes);
                    for (k, &s) in run.iter().enumerate() {
                        let at = k * self.slot_bytes;
                        let image = &stage[s].image;
                        buf[at..at + image.len()].copy_from_slice(image);
                    }
                    let last = run.len() - 1;
                    buf.resize(last * self.slot_bytes + stage[run[last]].image.len());
                    ios.push(BatchIo::write(m, lba, buf));
                    carried.push(None);
                }
                i += run.len();
            }
        }
        self.batch(&mut ios);
        let mut failed = None;
        for (io, owner) in ios.into_iter().zip(carried) {
            if let Err(e) = io.result {
                failed.get_or_insert(e);
            }
            match owner {
                Some(s) => stage[s].image = io.buf,
                None => BufPool::global().put(io.buf),
            }
        }
        if let Some(e) = failed {
            return Err((Vec::new(), e));
        }
        // A lone short slot (a message) is rung for now: the peer's probe
        // takes it without its producer block. Where replies are rung, the
        // block is left for later (UNANNOUNCED_MAX messages, or
        // UNANNOUNCED_DELAY): on a slow array it is a command the peer's
        // probe would queue behind.
        let lone_short =
            matches!(stage, [one] if slot_used(&one.image).is_some_and(|u| u <= SHORT_SLOT));
        if lone_short && self.ring(d) && lane.unannounced_total() < UNANNOUNCED_MAX {
            lane.published_unannounced(stage[0].pos.member, Instant::now());
            bump(&self.counters.unannounced_slots, 1);
            return Ok(());
        }
        // Then the producer blocks, every member's at once, and those of
        // members whose messages were left unannounced with them.
        let mut ios: Vec<BatchIo> = order
            .iter()
            .filter_map(|&m| {
                let count = lane.publish(m)?;
                Some(self.producer_block(lane, d, m, count))
            })
            .collect();
        let extra: Vec<(usize, u64)> = lane
            .unannounced()
            .filter(|(m, _)| !order.contains(m))
            .collect();
        for &(m, count) in &extra {
            ios.push(self.producer_block(lane, d, m, count));
        }
        self.batch(&mut ios);
        let mut published = Vec::new();
        let mut failed = None;
        for io in ios {
            if let Some(&(m, count)) = extra.iter().find(|(m, _)| *m == io.member) {
                // Announcing what was published: a failure leaves it for
                // the poller's next try, and fails no send.
                if io.result.is_ok() {
                    lane.announced(m, count);
                }
                continue;
            }
            match io.result {
                Ok(()) => {
                    lane.published(io.member);
                    published.push(io.member);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            None => {
                if !lone_short {
                    self.ring(d);
                }
                Ok(())
            }
            Some(e) => Err((published, e)),
        }
    }

    /// Goes past the messages an earlier opening of this host wrote on the
    /// lane to `d` without announcing them: valid short slots of this
    /// format with the sequence numbers due next, where the next slots go.
    fn resume_past_unannounced(&self, lane: &mut Producer, d: u16) {
        for _ in 0..=UNANNOUNCED_MAX {
            let next = lane.next();
            let lba = self.slot_lba(self.host, d, next.counter);
            let Ok(head) = self.read(next.member, lba, 1) else {
                return;
            };
            match open_slot(&head, self.generation) {
                Ok((seq, frames))
                    if seq == next.seq && SLOT_HEADER_LEN + frames.len() <= SHORT_SLOT =>
                {
                    lane.resume_past_written();
                }
                _ => return,
            }
        }
    }

    /// Writes the producer blocks that have trailed what was published for
    /// [`UNANNOUNCED_DELAY`] (the poller: a lane a sender holds is left for
    /// the next turn, or for the sender's own commit to announce).
    fn announce_due(&self, now: Instant) {
        // Nothing to do (no lock to take) on every poll of a host that has
        // never left a message unannounced.
        if self.counters.unannounced_slots.load(Ordering::Relaxed) == 0
            || lock(&self.stale).is_some()
        {
            return;
        }
        for (d, lane) in self.producers.iter().enumerate() {
            let Some(lane) = lane else { continue };
            let mut lane = match lane.try_lock() {
                Ok(l) => l,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            let due = lane
                .unannounced_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= UNANNOUNCED_DELAY);
            if !due {
                continue;
            }
            let counts: Vec<(usize, u64)> = lane.unannounced().collect();
            let d = d as u16;
            let mut ios: Vec<BatchIo> = counts
                .iter()
                .map(|&(m, count)| self.producer_block(&lane, d, m, count))
                .collect();
            self.batch(&mut ios);
            for (io, (m, count)) in ios.iter().zip(counts) {
                if io.result.is_ok() {
                    lane.announced(m, count);
                }
            }
        }
    }

    // ---- consuming (poller thread) ----

    fn write_consumer_blocks(&self, lane: &mut ConsLane) {
        if lock(&self.stale).is_some() {
            return;
        }
        let dirty: Vec<(usize, u64)> = lane.c.to_write().collect();
        lane.written_at = Instant::now();
        lane.probed_unwritten = 0;
        for (m, count) in dirty {
            let io = self.index_write(
                m,
                lane.src,
                self.host,
                IndexKind::Consumer,
                count,
                [0; INDEX_SIZES],
            );
            if self.write_now(io).is_ok() {
                lane.c.written(m, count);
            }
        }
    }

    /// Reads the producer blocks of lane (`lane.src` → this host) on
    /// `members`, all at once, into the consumer.
    fn read_producer_blocks(&self, lane: &mut ConsLane, members: &[usize]) {
        let lba = self.lane_lba(lane.src, self.host);
        let bs = self.geo.block_size as usize;
        let pool = BufPool::global();
        let mut ios: Vec<BatchIo> = members
            .iter()
            .map(|&m| BatchIo::read(m, lba, bs, pool.get(bs)))
            .collect();
        self.batch(&mut ios);
        for io in ios {
            if io.result.is_ok() {
                let verdict = lane
                    .c
                    .on_producer_block(io.member, &io.buf, self.generation);
                self.judged(verdict, &self.counters.bad_producer_blocks);
            }
            pool.put(io.buf);
        }
    }

    /// Hands the frames of the valid slot at `data[at..at + len]` to this
    /// host's ports, where they stay in `data` until read; the ports to
    /// wake are added to `wake`. False, with nothing delivered, when a
    /// port's queue is full (the lane holds at this slot).
    fn hand_slot(
        &self,
        data: &Arc<RecvBuf>,
        at: usize,
        len: usize,
        wake: &mut Vec<Arc<Condvar>>,
    ) -> bool {
        let bytes: &[u8] = (**data).as_ref();
        let Some(Ok((_, frames))) = bytes
            .get(at..at + len)
            .map(|slot| open_slot(slot, self.generation))
        else {
            return true; // judged valid by the caller: cannot happen
        };
        // Where the slot's frames start in the buffer.
        let base = at + SLOT_HEADER_LEN;
        let mut list = Vec::new();
        for f in Frames::new(frames) {
            match f {
                Ok(f) if port_host(f.header.dst_port) == Some(self.host) => {
                    let start = base + f.offset;
                    let range = start..start + HEADER_LEN + f.header.payload_len as usize;
                    list.extend(Held::new(data, range).map(|h| (f.header.dst_port, h)));
                }
                _ => bump(&self.counters.frames_misrouted, 1),
            }
        }
        match self.deliver(&list) {
            Ok(w) => {
                for q in w {
                    if !wake.iter().any(|x| Arc::ptr_eq(x, &q)) {
                        wake.push(q);
                    }
                }
                true
            }
            Err(_) => {
                if !self.stalled.swap(true, Ordering::AcqRel) {
                    bump(&self.counters.lane_stalls, 1);
                }
                false
            }
        }
    }

    /// A probe of lane (`lane.src` → this host): one READ of the first
    /// block of the slot due next, which a short slot fills whole, so a
    /// message is taken without its producer block (docs/PROTOCOL.md §4).
    /// `Some(progress)` when the poll is done; `None` when the head of a
    /// long slot says to read the producer blocks.
    fn probe_lane(&self, lane: &mut ConsLane) -> Option<bool> {
        let (m, counter) = lane.c.probe();
        let lba = self.slot_lba(lane.src, self.host, counter);
        let bs = self.geo.block_size as usize;
        let pool = BufPool::global();
        let mut ios = vec![BatchIo::read(m, lba, bs, pool.get(bs))];
        let started = Instant::now();
        self.batch(&mut ios);
        let took = started.elapsed();
        self.count_read(&ios);
        bump(&self.counters.probes, 1);
        let io = ios.pop()?;
        if io.result.is_err() {
            pool.put(io.buf);
            return Some(false);
        }
        lock(&self.schedule).read_took(took);
        match lane.c.on_probe(&io.buf, self.generation) {
            Probe::Short { member, seq } => {
                let used = slot_used(&io.buf).unwrap_or(bs);
                let data = Arc::new(RecvBuf::new(io.buf, Some(pool.clone())));
                let mut wake = Vec::new();
                let taken = self.hand_slot(&data, 0, bs, &mut wake);
                drop(data);
                if taken {
                    // Counted before the receivers wake, as a poll counts.
                    lane.c.take(member, seq);
                    lane.last_short = true;
                    lane.probed_unwritten += 1;
                    bump(&self.counters.slot_used_bytes, used as u64);
                    bump(&self.counters.slots_read, 1);
                    bump(&self.counters.slots_probed, 1);
                }
                for q in wake {
                    q.notify_all();
                }
                Some(taken)
            }
            Probe::Long => {
                pool.put(io.buf);
                None
            }
            Probe::Nothing => {
                pool.put(io.buf);
                Some(false)
            }
        }
    }

    /// One poll of lane (`lane.src` → this host), reading the producer
    /// blocks `reads` says; true if slots were consumed.
    fn poll_lane(&self, lane: &mut ConsLane, reads: Reads, now: Instant) -> bool {
        if (reads == Reads::Probe && lane.last_short) || reads == Reads::Rung {
            if let Some(progress) = self.probe_lane(lane) {
                return progress;
            }
        }
        let m_count = self.members.len();
        lane.c.begin_poll();
        let all: Vec<usize> = (0..m_count).collect();
        match reads {
            Reads::All | Reads::Probe | Reads::Rung => self.read_producer_blocks(lane, &all),
            Reads::Turn => {
                let turn = lane.c.turn();
                self.read_producer_blocks(lane, &[turn]);
                if lane.c.turn_has_news() && m_count > 1 {
                    let others: Vec<usize> = all.into_iter().filter(|&m| m != turn).collect();
                    self.read_producer_blocks(lane, &others);
                }
            }
        }
        if lock(&self.stale).is_some() {
            return false;
        }
        // As many slots from each member as one command carries.
        let per_member = (self.config.max_transfer_bytes as usize / self.slot_bytes).max(1);
        let Some(plan) = lane.c.plan(now, per_member * m_count) else {
            return false;
        };
        if plan.skipped_turn {
            bump(&self.counters.turn_skips, 1);
        }
        // Read each member's slots (at most two runs: the ring wraps),
        // every member's at once, into pooled buffers, which the frames
        // then stay in until read.
        let pool = BufPool::global();
        let mut ios = Vec::new();
        // Each run is read up to its last slot's size as the producer block
        // gave it (rounded up to whole blocks; the slots before it whole,
        // as they sit between). A slot whose size is not known is read
        // whole, or when it is alone, by its head first (a short message
        // need not READ a whole slot).
        let bs = self.geo.block_size as usize;
        let head = self.slot_head_bytes();
        for (m, &take) in plan.take.iter().enumerate() {
            for (k, (first, n)) in lane.c.runs(m, take).enumerate() {
                let lba = self.slot_lba(lane.src, self.host, first);
                let last = match lane.c.slot_size(m, first + n - 1) {
                    Some(size) => size.next_multiple_of(bs).min(self.slot_bytes),
                    None => match head {
                        Some(h) if take == 1 => h,
                        _ => self.slot_bytes,
                    },
                };
                let len = (n as usize - 1) * self.slot_bytes + last;
                // The first run's buffer has room for the second after it.
                let room = if k == 0 {
                    take as usize * self.slot_bytes
                } else {
                    len
                };
                let mut buf = pool.get(room);
                buf.resize(len);
                ios.push(BatchIo::read(m, lba, len, buf));
            }
        }
        self.batch(&mut ios);
        self.count_read(&ios);
        // A lone slot read shorter than its header says it is (its head,
        // or a size hint that was wrong): read again, as far as the header
        // says (untrusted, so at most the slot; a wrong count fails the
        // slot's checks below).
        let used_len = |io: &BatchIo| {
            slot_used(&io.buf).map(|used| used.next_multiple_of(bs).min(self.slot_bytes))
        };
        let rest: Vec<usize> = (0..ios.len())
            .filter(|&k| {
                let io = &ios[k];
                io.result.is_ok()
                    && io.len < self.slot_bytes
                    && used_len(io).is_some_and(|len| len > io.len)
            })
            .collect();
        if !rest.is_empty() {
            let mut again: Vec<BatchIo> = rest
                .iter()
                .map(|&k| {
                    let io = &mut ios[k];
                    let len = used_len(io).unwrap_or(self.slot_bytes);
                    let mut buf = std::mem::take(&mut io.buf);
                    buf.resize(len);
                    BatchIo::read(io.member, io.lba, len, buf)
                })
                .collect();
            self.batch(&mut again);
            self.count_read(&again);
            for (k, io) in rest.into_iter().zip(again) {
                ios[k] = io;
            }
        }
        let mut take = vec![0u64; m_count];
        let mut failed = vec![false; m_count];
        let mut bufs: Vec<Option<IoBuf>> = (0..m_count).map(|_| None).collect();
        for io in ios {
            let m = io.member;
            // A failed read shortens what can be taken from this member:
            // nothing from it on.
            if failed[m] || io.result.is_err() {
                failed[m] = true;
                pool.put(io.buf);
                continue;
            }
            // Where this run's first slot goes: after the slots before it
            // (each a whole slot apart, however much of the last was read).
            let at = take[m] as usize * self.slot_bytes;
            take[m] += io.len.div_ceil(self.slot_bytes) as u64;
            match &mut bufs[m] {
                None => bufs[m] = Some(io.buf),
                Some(first) => {
                    // The ring wrapped: the second run goes after the first.
                    first.resize(at + io.buf.len());
                    first[at..].copy_from_slice(&io.buf);
                    pool.put(io.buf);
                }
            }
        }
        let data: Vec<Arc<RecvBuf>> = bufs
            .into_iter()
            .map(|b| Arc::new(RecvBuf::new(b.unwrap_or_default(), Some(pool.clone()))))
            .collect();
        // Receivers are woken once this poll has let go of the buffers, so
        // a port that alone has frames in them can take them whole.
        let mut wake: Vec<Arc<Condvar>> = Vec::new();
        // Deliver in plan order.
        let mut used = vec![0usize; m_count];
        let mut progress = false;
        for m in plan.order {
            if used[m] as u64 >= take[m] {
                break;
            }
            let at = used[m] * self.slot_bytes;
            let whole: &[u8] = (*data[m]).as_ref();
            // A slot read by its head alone is shorter.
            let slot = &whole[at..(at + self.slot_bytes).min(whole.len())];
            match lane.c.on_slot(slot, self.generation, now) {
                Slot::Deliver { seq, in_sequence } => {
                    if !in_sequence {
                        bump(&self.counters.out_of_sequence, 1);
                    }
                    if !self.hand_slot(&data[m], at, slot.len(), &mut wake) {
                        break; // a port queue is full: hold the lane here
                    }
                    lane.c.take(m, seq);
                    let used = slot_used(slot).unwrap_or(slot.len());
                    bump(&self.counters.slot_used_bytes, used as u64);
                    lane.last_short = used <= SHORT_SLOT;
                }
                Slot::Hold { first } => {
                    // A real producer publishes an index only after its
                    // data: hold here, re-reading, in case the index was
                    // forged ahead of the data; skip the slot only later.
                    if first {
                        bump(&self.counters.bad_slots, 1);
                    }
                    break;
                }
                Slot::Skip { first } => {
                    if first {
                        bump(&self.counters.bad_slots, 1);
                    }
                    lane.c.skip(m);
                }
            }
            bump(&self.counters.slots_read, 1);
            used[m] += 1;
            progress = true;
        }
        drop(data);
        for q in wake {
            q.notify_all();
        }
        if progress {
            self.write_consumer_blocks(lane);
        }
        progress
    }
}

/// Copies the first frames waiting in `q` into `buf`, at most `max` bytes;
/// [`Refusal::FrameTooLarge`] when the first alone is larger.
fn copy_out(q: &mut PortQueue, buf: &mut IoBuf, max: usize) -> Result<(), MailboxError> {
    if let Some(span) = q.first_span().filter(|&s| s > max) {
        return Err(MailboxError::Refused(Refusal::FrameTooLarge {
            needed: u32::try_from(span).unwrap_or(u32::MAX),
        }));
    }
    let copied = q.take_copied(buf, max, HEADER_LEN);
    crate::counters::bump!(recv_copy_bytes, copied);
    Ok(())
}

fn poller(weak: Weak<BlockStg>, mut lanes: Vec<ConsLane>) {
    let mut slack = slack::TimerSlack::this_thread();
    loop {
        let Some(stg) = weak.upgrade() else { return };
        if stg.stop.load(Ordering::Acquire) {
            return;
        }
        let started = Instant::now();
        let (due, precise) = {
            let s = lock(&stg.schedule);
            (s.due(), s.precise())
        };
        slack.set_precise(precise);
        stg.announce_due(started);
        if started < due {
            // In slices, so that a dropped engine is let go of soon.
            stg.sleep_until(due.min(started + SLEEP_SLICE));
            continue;
        }
        bump(&stg.counters.polls, 1);
        stg.stalled.store(false, Ordering::Release);
        let (reads, rang) = {
            let mut s = lock(&stg.schedule);
            let reads = s.reads(started);
            let rang = if reads == Reads::Rung {
                s.take_rang()
            } else {
                0
            };
            (reads, rang)
        };
        let mut progress = false;
        let half_ring = u64::from(stg.layout.slots / 2).max(1);
        for lane in &mut lanes {
            // A rung poll probes only the lanes of the hosts that rang.
            if reads != Reads::Rung || rang & poll::host_bit(lane.src) != 0 {
                progress |= stg.poll_lane(lane, reads, started);
            }
            if started.saturating_duration_since(lane.written_at) >= CONSUMER_REASSERT {
                lane.c.rewrite_all();
            }
            // What probes took is written at half a ring, or after
            // PROBED_WRITE_DELAY: a producer needs it only as its ring fills.
            let deferred = lane.probed_unwritten > 0
                && lane.probed_unwritten < half_ring
                && started.saturating_duration_since(lane.written_at) < PROBED_WRITE_DELAY;
            if !deferred && lane.c.to_write().next().is_some() {
                stg.write_consumer_blocks(lane);
            }
        }
        lock(&stg.schedule).polled(started, Instant::now(), progress, reads);
    }
}

impl Drop for BlockStg {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.kick();
        for thread in [&self.poller, &self.listener] {
            if let Some(h) = lock(thread).take() {
                // The poller (or listener) may hold the last reference
                // itself.
                if h.thread().id() != thread::current().id() {
                    let _ = h.join();
                }
            }
        }
    }
}

/// Hears this host's doorbell on `socket` until the STG closes (the
/// socket's read timeout bounds how long that takes to notice).
fn listener(weak: Weak<BlockStg>, socket: std::net::UdpSocket) {
    let mut buf = [0u8; 64];
    loop {
        let got = socket.recv_from(&mut buf);
        let Some(stg) = weak.upgrade() else { return };
        if stg.stop.load(Ordering::Acquire) {
            return;
        }
        match got {
            Ok((n, from)) => stg.heard(&buf[..n], from),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // Anything else (an ICMP error reported on the socket): go on
            // listening, after a pause so an error that repeats does not
            // spin.
            Err(_) => thread::sleep(SLEEP_SLICE),
        }
    }
}

/// A handle onto a [`BlockStg`] implementing [`Mailbox`]; clone-cheap
/// (see [`BlockStg::handle`]).
#[derive(Clone, Debug)]
pub struct BlockMailbox {
    stg: Arc<BlockStg>,
}

impl BlockMailbox {
    /// The engine behind this handle.
    pub fn stg(&self) -> &Arc<BlockStg> {
        &self.stg
    }
}

impl Mailbox for BlockMailbox {
    fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError> {
        self.stg.bind(port)
    }
    fn max_payload(&self) -> Option<u32> {
        Some(self.stg.max_payload())
    }
    fn release(&mut self, binding: &Binding) -> Result<(), MailboxError> {
        self.stg.release(binding)
    }
    fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        self.stg.send_packed(binding, packed)
    }
    /// Room for a slot header: a SEND buffer becomes the slot image.
    fn send_headroom(&self) -> usize {
        SLOT_HEADER_LEN
    }
    /// Synchronous: the slots are written and published before it returns
    /// ([`BlockStg::send_owned`]; the buffer comes back as it went but for
    /// its headroom).
    fn submit_send(
        &mut self,
        binding: &Binding,
        mut buf: IoBuf,
        token: u64,
        done: &mut Vec<SendDone>,
    ) {
        let result = self.stg.send_owned(binding, &mut buf);
        done.push(SendDone { token, buf, result });
    }
    fn receive_into(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        self.stg.receive_into(binding, buf, max, wait)
    }
    fn receive_lent(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        lent: &mut Lent,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        self.stg.receive_lent(binding, buf, lent, max, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_scheme() {
        // host << 12 | local.
        assert_eq!(host_port(0, 1), Some(1));
        assert_eq!(host_port(1, 1005), Some(5101));
        assert_eq!(host_port(1, FIRST_DYNAMIC_LOCAL), Some(0x1800));
        assert_eq!(host_port(15, 4095), Some(65535));
        assert_eq!(host_port(0, 0), None);
        assert_eq!(host_port(3, 4096), None);
        assert_eq!(host_port(16, 1), None);
        assert_eq!(port_host(5101), Some(1));
        assert_eq!(port_host(1), Some(0));
        assert_eq!(port_host(4095), Some(0));
        assert_eq!(port_host(4097), Some(1));
        assert_eq!(port_host(32768 + 5), Some(8));
        assert_eq!(port_host(65535), Some(15));
        // Port 0, a local part of 0, and ports past host 15 are invalid.
        assert_eq!(port_host(0), None);
        assert_eq!(port_host(4096), None);
        assert_eq!(port_host(65536), None);
        assert_eq!(port_host(u32::MAX), None);
        for host in 0..MAX_HOSTS {
            for local in [1, 2047, 2048, 4095] {
                assert_eq!(port_host(host_port(host, local).unwrap()), Some(host));
            }
        }
    }

    #[test]
    fn layout_checks() {
        let ok = BlockLayout {
            hosts: 2,
            slots: 32,
            slot_blocks: 64,
        };
        check_layout(1, &ok).unwrap();
        assert_eq!(check_slot_size(1, &ok, 512).unwrap(), 32768);
        let tiny = BlockLayout {
            slot_blocks: 1,
            ..ok
        };
        // One 512-byte block holds a slot header and a frame header.
        assert_eq!(check_slot_size(1, &tiny, 512).unwrap(), 512);
        let err = check_layout(1, &BlockLayout { hosts: 17, ..ok }).unwrap_err();
        assert!(err.to_string().contains("hosts = 17"), "{err}");
        let err = check_layout(1, &BlockLayout { slots: 0, ..ok }).unwrap_err();
        assert!(err.to_string().contains("slots = 0"), "{err}");
    }
}
