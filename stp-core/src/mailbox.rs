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
//! Commands that fail with a condition that guarantees they did not run
//! (queue full, unit attention, BUSY, TASK SET FULL) are retried with a
//! short back-off; anything else is returned classified
//! ([`MailboxError`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use scsi::{Command, Completion, DataDirection, IoBuf, Transport};

use crate::counters;
use crate::vendor::{self, BindResult, MailboxError, StgInfo};

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

/// What the connection layer needs from an STG mailbox, in either mode
/// (docs/PROTOCOL.md §3 vendor, §4 block): ports, and whole frames moved
/// between them.
pub trait Mailbox: Send {
    /// Binds `port` (`None`: a dynamic port).
    fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError>;
    /// Releases a binding; receivers waiting on it return.
    fn release(&mut self, binding: &Binding) -> Result<(), MailboxError>;
    /// Sends sealed frames packed at 8-byte aligned offsets, all from
    /// `binding`'s port.
    fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError>;
    /// As [`send_packed`](Mailbox::send_packed), from `buf`, which a
    /// mailbox may use as the command's data-out buffer (no copy). `buf`
    /// keeps its allocation for the next call, unless the transport could
    /// not hand it back.
    fn send_buf(&mut self, binding: &Binding, buf: &mut IoBuf) -> Result<(), MailboxError> {
        self.send_packed(binding, buf)
    }
    /// Sends each buffer of packed frames as one SEND, as
    /// [`send_buf`](Mailbox::send_buf), possibly several at once (the array
    /// may then take them in any order; connections reorder by sequence
    /// number). Every buffer is attempted; the first error is returned.
    fn send_bufs(&mut self, binding: &Binding, bufs: &mut [IoBuf]) -> Result<(), MailboxError> {
        send_each(bufs, |buf| self.send_buf(binding, buf))
    }
    /// Starts one SEND of the packed frames in `buf` (at most
    /// [`vendor::MAX_TRANSFER`] bytes) from `binding`. Its [`SendDone`],
    /// with `token` and the buffer, is pushed to `done` now (a mailbox that
    /// sends synchronously, the default) or by a later
    /// [`reap_sends`](Mailbox::reap_sends).
    fn submit_send(
        &mut self,
        binding: &Binding,
        mut buf: IoBuf,
        token: u64,
        done: &mut Vec<SendDone>,
    ) {
        let result = self.send_buf(binding, &mut buf);
        done.push(SendDone { token, buf, result });
    }
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
    /// (a stream runs this many receive pumps).
    fn receive_parallelism(&self) -> usize {
        1
    }
    /// Whole frames for `binding`, at most `max` bytes, waiting up to `wait`
    /// for the first; empty when none arrived.
    fn receive(
        &mut self,
        binding: &Binding,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<u8>, MailboxError>;
    /// As [`receive`](Mailbox::receive), into `buf`: on success
    /// `buf.len()` is the bytes received (0: none arrived). The buffer's
    /// allocation is reused from call to call, so a receive loop allocates
    /// nothing.
    fn receive_into(
        &mut self,
        binding: &Binding,
        buf: &mut IoBuf,
        max: usize,
        wait: Duration,
    ) -> Result<(), MailboxError> {
        let got = self.receive(binding, max, wait)?;
        buf.resize(got.len());
        buf.copy_from_slice(&got);
        Ok(())
    }
}

impl Mailbox for VendorMailbox {
    fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError> {
        VendorMailbox::bind(self, port)
    }
    fn release(&mut self, binding: &Binding) -> Result<(), MailboxError> {
        VendorMailbox::release(self, binding)
    }
    fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        VendorMailbox::send_packed(self, binding, packed)
    }
    fn send_buf(&mut self, binding: &Binding, buf: &mut IoBuf) -> Result<(), MailboxError> {
        VendorMailbox::send_buf(self, binding, buf)
    }
    fn send_bufs(&mut self, binding: &Binding, bufs: &mut [IoBuf]) -> Result<(), MailboxError> {
        VendorMailbox::send_bufs(self, binding, bufs)
    }
    fn submit_send(&mut self, binding: &Binding, buf: IoBuf, token: u64, done: &mut Vec<SendDone>) {
        VendorMailbox::submit_send(self, binding, buf, token, done)
    }
    fn reap_sends(&mut self, done: &mut Vec<SendDone>, wait: Option<Duration>) {
        VendorMailbox::reap_sends(self, done, wait)
    }
    fn sends_in_flight(&self) -> usize {
        self.pending.len() + self.retry.len()
    }
    fn send_window(&self) -> usize {
        self.paths.len() * SENDS_PER_PATH
    }
    fn receive_parallelism(&self) -> usize {
        self.paths.len().min(MAX_RECEIVE_PUMPS)
    }
    fn receive(
        &mut self,
        binding: &Binding,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<u8>, MailboxError> {
        VendorMailbox::receive(self, binding, max, wait).map(|b| b.to_vec())
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

/// How often and how long a retryable SEND is retried.
const SEND_RETRIES: u32 = 50;
const SEND_BACKOFF: Duration = Duration::from_millis(2);

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
    len: usize,
    handle: u32,
    attempts: u32,
}

/// A pipelined SEND waiting out its back-off before another attempt.
#[derive(Debug)]
struct RetrySend {
    due: Instant,
    buf: IoBuf,
    pending: PendingSend,
}

/// One host's view of an STG in vendor mode.
pub struct VendorMailbox {
    paths: Vec<Box<dyn Transport>>,
    next: usize,
    /// Pipelined SENDs in flight, by command tag.
    pending: HashMap<u64, PendingSend>,
    retry: Vec<RetrySend>,
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
    /// A mailbox over the given member paths (at least one).
    pub fn new(paths: Vec<Box<dyn Transport>>) -> Result<VendorMailbox, MailboxError> {
        if paths.is_empty() {
            return Err(MailboxError::Other(scsi::CommandError::Io(
                std::io::Error::other("an STG mailbox needs at least one member path"),
            )));
        }
        let n = paths.len();
        Ok(VendorMailbox {
            paths,
            next: 0,
            pending: HashMap::new(),
            retry: Vec::new(),
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
        self.paths[i].as_mut()
    }

    /// Runs the command `make` builds, retrying retryable conditions (BUSY,
    /// TASK SET FULL, unit attention, transient path errors) with a short
    /// back-off, each time on the next path.
    fn run(&mut self, make: impl Fn() -> Command) -> Result<IoBuf, MailboxError> {
        let mut attempt = 0;
        loop {
            match self.path().execute(make()).into_result() {
                Ok((data, _)) => return Ok(data),
                Err(e) => {
                    let e = vendor::classify(e);
                    attempt += 1;
                    if !is_transient(&e) || attempt >= SEND_RETRIES {
                        return Err(e);
                    }
                    std::thread::sleep(SEND_BACKOFF * attempt.min(10));
                }
            }
        }
    }

    /// STG INFO from the next path.
    pub fn stg_info(&mut self) -> Result<StgInfo, MailboxError> {
        let alloc = StgInfo::len_for(256) as u32;
        let cdb = vendor::stg_info(alloc);
        let data = self.run(|| Command::data_in(scsi::Cdb::Vendor(cdb).emit(), alloc as usize))?;
        let info = StgInfo::parse(&data).map_err(|e| protocol_error(format!("STG INFO: {e}")))?;
        if info.version != vendor::PROTOCOL_VERSION {
            return Err(protocol_error(format!(
                "the array routes STP v{} frames, this host speaks v{}: run the same STP \
                 release on the array (stp-target) and both hosts",
                info.version,
                vendor::PROTOCOL_VERSION
            )));
        }
        Ok(info)
    }

    /// Binds `port` (`None`: a dynamic port).
    pub fn bind(&mut self, port: Option<u32>) -> Result<Binding, MailboxError> {
        let cdb = vendor::bind(port.unwrap_or(0));
        let data = self.run(|| Command::data_in(scsi::Cdb::Vendor(cdb).emit(), 16))?;
        let b = BindResult::parse(&data).map_err(|e| protocol_error(format!("BIND: {e}")))?;
        Ok(b.into())
    }

    /// Releases a binding; waiting RECEIVEs on it end.
    pub fn release(&mut self, binding: &Binding) -> Result<(), MailboxError> {
        let cdb = vendor::release(binding.handle);
        self.run(|| Command::no_data(scsi::Cdb::Vendor(cdb).emit()))?;
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
        let pending = PendingSend {
            token,
            path,
            len: buf.len(),
            handle: binding.handle,
            attempts: 1,
        };
        self.issue(pending, buf, done);
    }

    fn issue(&mut self, pending: PendingSend, buf: IoBuf, done: &mut Vec<SendDone>) {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let cdb = scsi::Cdb::Vendor(vendor::send(pending.handle, pending.len as u32)).emit();
        let path = pending.path;
        match self.paths[path].submit(Command::data_out(cdb, buf).with_tag(tag)) {
            Ok(()) => {
                self.in_flight[path] += 1;
                counters::send_submitted(self.in_flight[path]);
                self.pending.insert(tag, pending);
            }
            Err(e) => done.push(SendDone {
                token: pending.token,
                buf: e.cmd.data,
                result: Err(vendor::classify(e.error)),
            }),
        }
    }

    /// Collects finished pipelined SENDs (see [`Mailbox::reap_sends`]);
    /// SENDs the array refused without running them are retried here.
    pub fn reap_sends(&mut self, done: &mut Vec<SendDone>, wait: Option<Duration>) {
        let deadline = wait.map(|w| Instant::now() + w);
        let before = done.len();
        let mut out = Vec::new();
        loop {
            let now = Instant::now();
            let mut i = 0;
            while i < self.retry.len() {
                if self.retry[i].due <= now {
                    let r = self.retry.swap_remove(i);
                    self.issue(r.pending, r.buf, done);
                } else {
                    i += 1;
                }
            }
            for p in 0..self.paths.len() {
                if self.in_flight[p] > 0 {
                    self.reap_path(p, Some(Duration::ZERO), &mut out, done);
                }
            }
            if done.len() > before || (self.pending.is_empty() && self.retry.is_empty()) {
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
            if let Some(due) = self.retry.iter().map(|r| r.due).min() {
                slice = slice.min(due.saturating_duration_since(now));
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
            // The path is unusable: what it held is lost.
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
                        result: Err(MailboxError::Other(scsi::CommandError::Io(
                            std::io::Error::new(e.kind(), e.to_string()),
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
            match result {
                // A timed-out command's buffer is not handed back: no retry.
                Err(e)
                    if is_transient(&e) && c.data.len() == s.len && s.attempts < SEND_RETRIES =>
                {
                    let due = Instant::now() + SEND_BACKOFF * s.attempts.min(10);
                    self.retry.push(RetrySend {
                        due,
                        buf: c.data,
                        pending: PendingSend {
                            attempts: s.attempts + 1,
                            ..s
                        },
                    });
                }
                result => done.push(SendDone {
                    token: s.token,
                    buf: c.data,
                    result,
                }),
            }
        }
    }

    /// Sends frames already sealed and packed (8-byte aligned) in `packed`.
    pub fn send_packed(&mut self, binding: &Binding, packed: &[u8]) -> Result<(), MailboxError> {
        self.send_buf(binding, &mut IoBuf::from_slice(packed))
    }

    /// Sends the packed frames in `buf`, which becomes the SEND's data-out
    /// buffer (no copy) and is handed back for reuse.
    pub fn send_buf(&mut self, binding: &Binding, buf: &mut IoBuf) -> Result<(), MailboxError> {
        let len = buf.len();
        let cdb = scsi::Cdb::Vendor(vendor::send(binding.handle, len as u32)).emit();
        let mut attempt = 0;
        loop {
            let c = self
                .path()
                .execute(Command::data_out(cdb, std::mem::take(buf)));
            *buf = c.data;
            let Err(e) = c.result.and_then(|o| o.check()) else {
                return Ok(());
            };
            let e = vendor::classify(e);
            attempt += 1;
            // A timed-out command's buffer is not handed back: give up then.
            if !is_transient(&e) || attempt >= SEND_RETRIES || buf.len() != len {
                return Err(e);
            }
            std::thread::sleep(SEND_BACKOFF * attempt.min(10));
        }
    }

    /// Sends each buffer as one SEND, up to one per member path in flight
    /// at once (so a large flush moves at the speed of all the members, not
    /// one). The array may take them in any order; the connection reorders
    /// by sequence number. A SEND that fails with a retryable condition is
    /// retried alone ([`send_buf`](Self::send_buf)). Every buffer comes back
    /// for reuse; the first error is returned.
    pub fn send_bufs(&mut self, binding: &Binding, bufs: &mut [IoBuf]) -> Result<(), MailboxError> {
        let n = self.paths.len();
        if n == 1 || bufs.len() <= 1 {
            return send_each(bufs, |buf| self.send_buf(binding, buf));
        }
        let mut first = Ok(());
        for wave in bufs.chunks_mut(n) {
            let mut issued = Vec::with_capacity(wave.len());
            let mut retry = Vec::new();
            let lens: Vec<usize> = wave.iter().map(|b| b.len()).collect();
            for (i, buf) in wave.iter_mut().enumerate() {
                let p = self.next % n;
                self.next = self.next.wrapping_add(1);
                let cdb = scsi::Cdb::Vendor(vendor::send(binding.handle, buf.len() as u32)).emit();
                let cmd = Command::data_out(cdb, std::mem::take(buf)).with_tag(i as u64);
                match self.paths[p].submit(cmd) {
                    Ok(()) => issued.push(p),
                    Err(e) => {
                        *buf = e.cmd.data;
                        retry.push(i);
                    }
                }
            }
            for p in issued {
                let mut out = Vec::with_capacity(1);
                while out.is_empty() {
                    if let Err(e) = self.paths[p].reap(&mut out, None) {
                        // The path is unusable; what it held is lost.
                        first = first.and(Err(MailboxError::Other(scsi::CommandError::Io(e))));
                        break;
                    }
                }
                for c in out {
                    let i = c.tag as usize;
                    let Some(buf) = wave.get_mut(i) else {
                        continue;
                    };
                    *buf = c.data;
                    if let Err(e) = c.result.and_then(|o| o.check()) {
                        let e = vendor::classify(e);
                        // A timed-out command's buffer is not handed back:
                        // no retry then.
                        if is_transient(&e) && buf.len() == lens[i] {
                            retry.push(c.tag as usize);
                        } else {
                            first = first.and(Err(e));
                        }
                    }
                }
            }
            for i in retry {
                if let Err(e) = self.send_buf(binding, &mut wave[i]) {
                    first = first.and(Err(e));
                }
            }
        }
        first
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
        let mut attempt = 0;
        loop {
            let mut data = std::mem::take(buf);
            data.resize(max);
            let cmd = Command {
                direction: DataDirection::FromDevice,
                data,
                ..Command::no_data(cdb)
            }
            .with_timeout(timeout);
            let c = self.path().execute(cmd);
            // The buffer comes back even when the command failed (empty
            // only if the transport could not hand it back).
            *buf = c.data;
            let e = match c.result.and_then(|o| o.check().map(|()| o)) {
                Ok(o) => {
                    buf.resize(max.saturating_sub(o.residual as usize).min(buf.len()));
                    return Ok(());
                }
                Err(e) => vendor::classify(e),
            };
            attempt += 1;
            if !is_transient(&e) || attempt >= SEND_RETRIES {
                buf.resize(0);
                return Err(e);
            }
            std::thread::sleep(SEND_BACKOFF * attempt.min(10));
        }
    }
}

/// Sends every buffer with `send`, one after another, even past a failure;
/// the first error is returned.
fn send_each(
    bufs: &mut [IoBuf],
    mut send: impl FnMut(&mut IoBuf) -> Result<(), MailboxError>,
) -> Result<(), MailboxError> {
    let mut first = Ok(());
    for buf in bufs {
        if let Err(e) = send(buf) {
            first = first.and(Err(e));
        }
    }
    first
}

/// Conditions a retry of the same command may clear.
fn is_transient(e: &MailboxError) -> bool {
    e.is_retryable() || matches!(e, MailboxError::Other(c) if c.is_retryable())
}

fn protocol_error(text: String) -> MailboxError {
    MailboxError::Other(scsi::CommandError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        text,
    )))
}
