//! The host side of the STG mailbox, vendor mode (docs/PROTOCOL.md §3).
//!
//! A [`VendorMailbox`] holds one [`Transport`] per STG member LUN (paths
//! onto the same port space) and stripes commands over them. Control
//! commands (BIND, RELEASE, RECEIVE) are synchronous per path (`execute`);
//! a stream's SENDs are pipelined ([`Mailbox::submit_send`],
//! [`Mailbox::reap_sends`]): each goes to the member with the fewest SENDs
//! in flight, up to [`SENDS_PER_PATH`] each, and completes in any order.
//! Each path is typically a handle onto the device's shared io_uring engine
//! (`scsi::shared`), where every mailbox and stream of the process meets.
//! Every path retries what the one retry rule allows ([`crate::retry`]:
//! conditions that guarantee the command did not run, such as queue full,
//! unit attention, BUSY, TASK SET FULL; never an ambiguous failure of a
//! SEND or RECEIVE, which are not idempotent) with a short back-off;
//! anything else is returned classified ([`MailboxError`]).

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use scsi::{Command, Completion, DataDirection, IoBuf, Transport};

use crate::counters;
use crate::error::{shared_io_error, ProtocolError, SetupError};
use crate::retry::{RetryPolicy, Retrying};
use crate::vendor::{self, BindResult, StgInfo};

pub use crate::error::MailboxError;

/// A bound port: the port number and the capability that proves ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The bound port.
    pub port: u32,
    /// The binding handle the array issued.
    pub handle: u32,
    /// The destination queue's limit in frames.
    pub queue_frames: u32,
    /// The destination queue's limit in bytes.
    pub queue_bytes: u32,
}

impl From<BindResult> for Binding {
    fn from(b: BindResult) -> Binding {
        Binding {
            port: b.port,
            handle: b.handle,
            queue_frames: b.queue_frames,
            queue_bytes: b.queue_bytes,
        }
    }
}

/// A SEND that finished, from [`Mailbox::submit_send`] or
/// [`Mailbox::reap_sends`]: the caller's token, its buffer back, and what
/// happened.
#[derive(Debug)]
pub struct SendDone {
    /// The token the SEND was submitted with.
    pub token: u64,
    /// The SEND's buffer (empty if the transport could not hand it back,
    /// as after a timeout).
    pub buf: IoBuf,
    /// The outcome, after the mailbox's retries.
    pub result: Result<(), MailboxError>,
}

/// Received frames a mailbox hands over in the buffers it read them into
/// ([`Mailbox::receive_lent`]), so they are not copied again.
#[derive(Debug, Default)]
pub struct Lent {
    /// The buffers; the caller owns them now.
    pub bufs: Vec<IoBuf>,
    /// Each frame, in the order received: its buffer's index in `bufs` and
    /// its bytes there (header and payload).
    pub frames: Vec<(usize, Range<usize>)>,
}

/// What the connection layer needs from an STG mailbox, in either mode
/// (docs/PROTOCOL.md §3 vendor, §4 block): ports, and whole frames moved
/// between them in owned, page-aligned DMA buffers. A SEND's buffer is the
/// command's data-out buffer and comes back in its [`SendDone`]; a RECEIVE
/// fills the caller's buffer, which the caller then owns. `send_packed` and
/// `receive` are conveniences over the two (a copy each), for tests and
/// one-off control frames.
pub trait Mailbox: Send {
    /// Binds `port` (`None`: a dynamic port).
    fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError>;
    /// Releases a binding; receivers waiting on it return. A port added
    /// with [`bind_add`](Mailbox::bind_add) is released alone.
    fn release(&mut self, binding: &Binding) -> Result<(), MailboxError>;
    /// Bytes a SEND buffer leaves free before its frames, for the mailbox's
    /// own header (block mode: the slot header, so the buffer is the slot
    /// image and goes out uncopied). 0 for vendor mode.
    fn send_headroom(&self) -> usize {
        0
    }
    /// Whether this mailbox can add ports to a binding
    /// ([`bind_add`](Mailbox::bind_add); the array may still refuse).
    fn shares_bindings(&self) -> bool {
        false
    }
    /// Binds a dynamic port to the queue of `shared` (BIND with `ADD`,
    /// docs/PROTOCOL.md §3.2): frames for the new port are received on
    /// `shared`. `None` where the mailbox has no shared bindings.
    fn bind_add(&mut self, shared: &Binding) -> Option<Result<Binding, MailboxError>> {
        let _ = shared;
        None
    }
    /// Starts one SEND of the sealed frames packed at 8-byte aligned
    /// offsets in `buf` after its first [`send_headroom`](Mailbox::send_headroom)
    /// bytes (at most [`vendor::MAX_TRANSFER`] bytes of frames), all from
    /// `binding`'s port; the mailbox may overwrite the headroom. Its
    /// [`SendDone`], with `token` and the buffer, is pushed to `done` now
    /// (a mailbox that sends synchronously) or by a later
    /// [`reap_sends`](Mailbox::reap_sends).
    fn submit_send(&mut self, binding: &Binding, buf: IoBuf, token: u64, done: &mut Vec<SendDone>);
    /// Moves finished SENDs to `done`, waiting up to `wait` for one when
    /// SENDs are in flight and none has finished (`None`: until one has).
    fn reap_sends(&mut self, done: &mut Vec<SendDone>, wait: Option<Duration>) {
        let _ = (done, wait);
    }
    /// SENDs submitted and not yet reaped.
    fn sends_in_flight(&self) -> usize {
        0
    }
    /// How many SENDs are worth keeping in flight at once.
    fn send_window(&self) -> usize {
        1
    }
    /// How many RECEIVEs on one binding are worth keeping in flight at once
    /// (a hub runs up to this many receive pumps on its binding).
    fn receive_parallelism(&self) -> usize {
        1
    }
    /// The largest frame payload this mailbox carries, when it is smaller
    /// than the protocol's (block mode: what one slot holds). Streams cut
    /// their payload limit to it.
    fn max_payload(&self) -> Option<u32> {
        None
    }
    /// Whole frames for `binding`, at most `max` bytes packed at 8-byte
    /// aligned offsets, into `buf`, waiting up to `wait` for the first: on
    /// success `buf.len()` is the bytes received (0: none arrived). The
    /// buffer's allocation is reused from call to call, so a receive loop
    /// allocates nothing.
    fn receive_into(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError>;
    /// Frames for `binding` as [`receive_into`](Mailbox::receive_into)
    /// gives them, except that a mailbox which already holds them in
    /// buffers of its own (block mode: the slot buffers its READs filled)
    /// may move those buffers to `lent` instead of copying the frames into
    /// `buf`. On success `lent` holds frames (and `buf` is empty), or `buf`
    /// holds them as `receive_into` says, or neither (none arrived).
    /// `max` bounds `buf` only.
    fn receive_lent(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        lent: &mut Lent,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        let _ = lent;
        self.receive_into(binding, buf, max, wait)
    }

    /// Sends `packed` (copied into a DMA buffer) and waits for the SEND to
    /// finish. For callers with no SENDs of their own in flight.
    fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        const TOKEN: u64 = u64::MAX;
        let mut done = Vec::with_capacity(1);
        let room = self.send_headroom();
        let mut buf = IoBuf::new(room + packed.len());
        buf[room..].copy_from_slice(packed);
        self.submit_send(binding, buf, TOKEN, &mut done);
        loop {
            if let Some(i) = done.iter().position(|d| d.token == TOKEN) {
                return done.swap_remove(i).result;
            }
            if self.sends_in_flight() == 0 {
                return Ok(());
            }
            self.reap_sends(&mut done, None);
        }
    }
    /// [`receive_into`](Mailbox::receive_into) a new buffer.
    fn receive(
        &mut self,
        binding: &Binding,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<u8>, MailboxError> {
        let mut buf = IoBuf::default();
        self.receive_into(binding, &mut buf, max, wait)?;
        Ok(buf.to_vec())
    }
}

impl Mailbox for VendorMailbox {
    fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError> {
        VendorMailbox::bind(self, port)
    }
    fn release(&mut self, binding: &Binding) -> Result<(), MailboxError> {
        VendorMailbox::release(self, binding)
    }
    fn shares_bindings(&self) -> bool {
        true
    }
    fn bind_add(&mut self, shared: &Binding) -> Option<Result<Binding, MailboxError>> {
        Some(VendorMailbox::bind_add(self, shared))
    }
    fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        VendorMailbox::send_packed(self, binding, packed)
    }
    fn submit_send(&mut self, binding: &Binding, buf: IoBuf, token: u64, done: &mut Vec<SendDone>) {
        VendorMailbox::submit_send(self, binding, buf, token, done)
    }
    fn reap_sends(&mut self, done: &mut Vec<SendDone>, wait: Option<Duration>) {
        VendorMailbox::reap_sends(self, done, wait)
    }
    fn sends_in_flight(&self) -> usize {
        self.pending.len()
    }
    fn send_window(&self) -> usize {
        self.paths.len() * SENDS_PER_PATH
    }
    fn receive_parallelism(&self) -> usize {
        self.paths.len().min(MAX_RECEIVE_PUMPS)
    }
    fn receive_into(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        VendorMailbox::receive_into(self, binding, buf, max, wait)
    }
}

/// The most RECEIVEs a stream keeps in flight on one binding.
const MAX_RECEIVE_PUMPS: usize = 4;

/// Timeout added to a long poll's own timeout for the SCSI command.
const COMMAND_SLACK: Duration = Duration::from_secs(10);

/// SENDs a stream keeps in flight per member path: enough that a member
/// always has the next SEND queued while one is moving.
pub const SENDS_PER_PATH: usize = 2;

/// The longest a blocked [`VendorMailbox::reap_sends`] waits on one path
/// before looking at the others again.
const REAP_SLICE: Duration = Duration::from_millis(2);

/// A pipelined SEND in flight.
#[derive(Debug)]
struct PendingSend {
    token: u64,
    path: usize,
}

/// One host's view of an STG in vendor mode.
pub struct VendorMailbox {
    /// The member paths, each retrying what [`crate::retry`] allows.
    paths: Vec<Retrying<Box<dyn Transport>>>,
    next: usize,
    /// Pipelined SENDs in flight, by command tag.
    pending: HashMap<u64, PendingSend>,
    in_flight: Vec<usize>,
    next_tag: u64,
}

impl std::fmt::Debug for VendorMailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<String> = self.paths.iter().map(|p| p.describe()).collect();
        f.debug_struct("VendorMailbox")
            .field("paths", &paths)
            .finish()
    }
}

impl VendorMailbox {
    /// A mailbox over the given member paths (at least one), retrying
    /// under [`RetryPolicy::MAILBOX`].
    pub fn new(paths: Vec<Box<dyn Transport>>) -> Result<VendorMailbox, MailboxError> {
        VendorMailbox::with_policy(paths, RetryPolicy::MAILBOX)
    }

    /// A mailbox over the given member paths (at least one), retrying
    /// under `policy`.
    pub fn with_policy(
        paths: Vec<Box<dyn Transport>>,
        policy: RetryPolicy,
    ) -> Result<VendorMailbox, MailboxError> {
        if paths.is_empty() {
            return Err(SetupError::NoPaths.into());
        }
        let n = paths.len();
        Ok(VendorMailbox {
            paths: paths
                .into_iter()
                .map(|p| Retrying::new(p, policy))
                .collect(),
            next: 0,
            pending: HashMap::new(),
            in_flight: vec![0; n],
            next_tag: 0,
        })
    }

    /// Number of member paths.
    pub fn paths(&self) -> usize {
        self.paths.len()
    }

    fn path(&mut self) -> &mut dyn Transport {
        let i = self.next % self.paths.len();
        self.next = self.next.wrapping_add(1);
        &mut self.paths[i]
    }

    /// Runs `cmd` on the next path (which retries it as [`crate::retry`]
    /// allows) and classifies a failure.
    fn run(&mut self, cmd: Command) -> Result<IoBuf, MailboxError> {
        match self.path().execute(cmd).into_result() {
            Ok((data, _)) => Ok(data),
            Err(e) => Err(vendor::classify(e)),
        }
    }

    /// STG INFO from the next path.
    pub fn stg_info(&mut self) -> Result<StgInfo, MailboxError> {
        let alloc = StgInfo::len_for(256) as u32;
        let cdb = vendor::stg_info(alloc);
        let data = self.run(Command::data_in(
            scsi::Cdb::Vendor(cdb).emit(),
            alloc as usize,
        ))?;
        let info = StgInfo::parse(&data).map_err(ProtocolError::StgInfo)?;
        if info.version != vendor::PROTOCOL_VERSION {
            return Err(SetupError::VersionMismatch {
                array: info.version,
                host: vendor::PROTOCOL_VERSION,
            }
            .into());
        }
        Ok(info)
    }

    /// Binds `port` (`None`: a dynamic port).
    pub fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError> {
        let cdb = vendor::bind(port.unwrap_or(0));
        let data = self.run(Command::data_in(scsi::Cdb::Vendor(cdb).emit(), 16))?;
        let b = BindResult::parse(&data).map_err(ProtocolError::Bind)?;
        Ok(b.into())
    }

    /// Binds a dynamic port to the queue of the binding `shared` (BIND
    /// with `ADD`, docs/PROTOCOL.md §3.2).
    pub fn bind_add(&mut self, shared: &Binding) -> Result<Binding, MailboxError> {
        let cdb = vendor::bind_add(shared.handle);
        let data = self.run(Command::data_in(scsi::Cdb::Vendor(cdb).emit(), 16))?;
        let b = BindResult::parse(&data).map_err(ProtocolError::Bind)?;
        Ok(b.into())
    }

    /// Releases a binding (an added port: that port); waiting RECEIVEs on
    /// a released binding end.
    pub fn release(&mut self, binding: &Binding) -> Result<(), MailboxError> {
        let cdb = vendor::release(binding.handle);
        self.run(Command::no_data(scsi::Cdb::Vendor(cdb).emit()))?;
        Ok(())
    }

    /// Starts a pipelined SEND of `buf` on the member path with the fewest
    /// SENDs in flight (see [`Mailbox::submit_send`]).
    pub fn submit_send(
        &mut self,
        binding: &Binding,
        buf: IoBuf,
        token: u64,
        done: &mut Vec<SendDone>,
    ) {
        let start = self.next;
        self.next = self.next.wrapping_add(1);
        let n = self.paths.len();
        let path = (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&p| self.in_flight[p])
            .unwrap_or(0);
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let data = crate::wire::peek_kind(&buf) == Some(crate::wire::Kind::DATA);
        let cdb = scsi::Cdb::Vendor(vendor::send(binding.handle, buf.len() as u32)).emit();
        match self.paths[path].submit(Command::data_out(cdb, buf).with_tag(tag)) {
            Ok(()) => {
                self.in_flight[path] += 1;
                counters::send_submitted(self.in_flight[path], data);
                self.pending.insert(tag, PendingSend { token, path });
            }
            Err(e) => done.push(SendDone {
                token,
                buf: e.cmd.data,
                result: Err(vendor::classify(e.error)),
            }),
        }
    }

    /// Collects finished pipelined SENDs (see [`Mailbox::reap_sends`]);
    /// SENDs the array refused without running them have been retried by
    /// the path ([`Retrying`]).
    pub fn reap_sends(&mut self, done: &mut Vec<SendDone>, wait: Option<Duration>) {
        let deadline = wait.map(|w| Instant::now() + w);
        let before = done.len();
        let mut out = Vec::new();
        loop {
            for p in 0..self.paths.len() {
                if self.in_flight[p] > 0 {
                    self.reap_path(p, Some(Duration::ZERO), &mut out, done);
                }
            }
            if done.len() > before || self.pending.is_empty() {
                return;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return;
            }
            let mut slice = REAP_SLICE;
            if let Some(d) = deadline {
                slice = slice.min(d - now);
            }
            match (0..self.paths.len()).max_by_key(|&p| self.in_flight[p]) {
                Some(p) if self.in_flight[p] > 0 => self.reap_path(p, Some(slice), &mut out, done),
                _ => std::thread::sleep(slice),
            }
        }
    }

    fn reap_path(
        &mut self,
        p: usize,
        wait: Option<Duration>,
        out: &mut Vec<Completion>,
        done: &mut Vec<SendDone>,
    ) {
        out.clear();
        if let Err(e) = self.paths[p].reap(out, wait) {
            // The path is unusable: what it held is lost, every SEND with
            // the one error as its source.
            let e = std::sync::Arc::new(e);
            let lost: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, s)| s.path == p)
                .map(|(&t, _)| t)
                .collect();
            for tag in lost {
                if let Some(s) = self.pending.remove(&tag) {
                    done.push(SendDone {
                        token: s.token,
                        buf: IoBuf::default(),
                        result: Err(MailboxError::Transport(scsi::CommandError::Io(
                            shared_io_error(&e),
                        ))),
                    });
                }
            }
            self.in_flight[p] = 0;
            return;
        }
        for c in out.drain(..) {
            let Some(s) = self.pending.remove(&c.tag) else {
                continue;
            };
            self.in_flight[p] = self.in_flight[p].saturating_sub(1);
            let result = c.result.and_then(|o| o.check()).map_err(vendor::classify);
            done.push(SendDone {
                token: s.token,
                buf: c.data,
                result,
            });
        }
    }

    /// Sends frames already sealed and packed (8-byte aligned) in `packed`.
    pub fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        self.send_buf(binding, &mut IoBuf::from_slice(packed))
    }

    /// Sends the packed frames in `buf`, which becomes the SEND's data-out
    /// buffer (no copy) and is handed back for reuse.
    pub fn send_buf(&mut self, binding: &Binding, buf: &mut IoBuf) -> Result<(), MailboxError> {
        let cdb = scsi::Cdb::Vendor(vendor::send(binding.handle, buf.len() as u32)).emit();
        let c = self
            .path()
            .execute(Command::data_out(cdb, std::mem::take(buf)));
        // Empty only if the transport could not hand it back.
        *buf = c.data;
        c.result.and_then(|o| o.check()).map_err(vendor::classify)
    }

    /// Receives whole frames for `binding` (at most `max` bytes), waiting up
    /// to `wait` (at most 12.7 s) for the first. Empty when none arrived.
    pub fn receive(
        &mut self,
        binding: &Binding,
        max: usize,
        wait: Duration,
    ) -> Result<IoBuf, MailboxError> {
        let mut buf = IoBuf::default();
        self.receive_into(binding, &mut buf, max, wait)?;
        Ok(buf)
    }

    /// As [`receive`](Self::receive), into `buf`, which becomes the
    /// command's data-in buffer (no copy, and no allocation once it has
    /// grown to `max`). On success `buf.len()` is the bytes received.
    pub fn receive_into(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        let max = max.min(vendor::MAX_TRANSFER as usize);
        let cdb = scsi::Cdb::Vendor(vendor::receive(binding.handle, max as u32, wait)).emit();
        let timeout = wait.min(vendor::MAX_RECEIVE_TIMEOUT) + COMMAND_SLACK;
        let mut data = std::mem::take(buf);
        data.resize(max);
        let cmd = Command {
            direction: DataDirection::FromDevice,
            data,
            ..Command::no_data(cdb)
        }
        .with_timeout(timeout);
        let c = self.path().execute(cmd);
        // The buffer comes back even when the command failed (empty only
        // if the transport could not hand it back).
        *buf = c.data;
        match c.result.and_then(|o| o.check().map(|()| o)) {
            Ok(o) => {
                buf.resize(max.saturating_sub(o.residual as usize).min(buf.len()));
                Ok(())
            }
            Err(e) => {
                buf.resize(0);
                Err(vendor::classify(e))
            }
        }
    }
}
