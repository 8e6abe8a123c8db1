//! The host side of the STG mailbox, vendor mode (docs/PROTOCOL.md §3).
//!
//! A [`VendorMailbox`] holds one [`Transport`] per STG member LUN (paths
//! onto the same port space) and stripes commands over them round-robin.
//! Commands here are synchronous per path (`execute`); many in flight is
//! the engine's job: each path is typically a handle onto the device's
//! shared io_uring engine (`scsi::shared`), where every mailbox and stream
//! of the process meets. SENDs that fail with a retryable condition
//! (queue full, unit attention, BUSY) are retried with a short back-off;
//! anything else is returned classified ([`MailboxError`]).

use std::time::Duration;

use scsi::{Command, DataDirection, IoBuf, Transport};

use crate::frame::{pack, OutFrame};
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

/// One host's view of an STG in vendor mode.
pub struct VendorMailbox {
    paths: Vec<Box<dyn Transport>>,
    next: usize,
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
        Ok(VendorMailbox { paths, next: 0 })
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
        StgInfo::parse(&data).map_err(|e| protocol_error(format!("STG INFO: {e}")))
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

    /// Sends sealed frames from `binding` in one SEND (atomic at the array),
    /// packed into one page-aligned buffer the device reads by DMA.
    pub fn send(&mut self, binding: &Binding, frames: &[OutFrame<'_>]) -> Result<(), MailboxError> {
        let mut packed = Vec::new();
        pack(frames, &mut packed).map_err(|e| protocol_error(format!("packing frames: {e}")))?;
        self.send_packed(binding, &packed)
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
