//! Blocking STP sockets over an STG mailbox (either mode): [`StpListener`] and
//! [`StpStream`] (which implements `Read` and `Write`, and lends its DMA
//! buffers: [`StpStream::send_buf`], [`StpStream::recv_buf`]).
//!
//! Each stream owns a sans-IO [`Connection`] behind a mutex and the threads
//! around it, so that sealing, SCSI I/O and opening overlap:
//!
//! * **writers** (the caller of `write`) stage a DATA frame with the
//!   connection, copy the payload from the caller's buffer into a pooled,
//!   page-aligned DMA buffer and seal it there (AES-256-GCM in place) —
//!   outside the lock — then queue it. That copy and that pass are the
//!   payload's only ones on the way out; through [`StpStream::send_buf`] the
//!   caller writes into the DMA buffer itself and there is no copy. A large
//!   frame is sealed on one of the process's **sealing threads**
//!   ([`sealers`]) while fewer than [`sealers::parallelism`] of the
//!   stream's frames are there, so a writer keeps several cores sealing;
//!   the connection sends frames in sequence order whichever was sealed
//!   first.
//! * the **sender** keeps up to [`Mailbox::send_window`] SENDs in flight (two
//!   per member LUN in vendor mode), submitting each as soon as it is queued
//!   and reaping completions as they come, in any order. A sealed frame
//!   stays with the stream until acknowledged; a retransmission re-sends it
//!   as it is, with no second seal.
//!   Between SENDs it is also the connection's **timer**: it sleeps until
//!   the next deadline (delayed ACK, retransmission, keepalive) and fires
//!   it.
//! * **receive pumps** are the host's, not the stream's: one *hub* per
//!   host and STG (`crate::hub`, docs/PROTOCOL.md §3.2) holds one binding
//!   at the array, and the stream's port is a port of it. The hub's pumps
//!   (one per member path while busy, one while idle) long-poll RECEIVE
//!   into pooled buffers and hand each frame to the stream its port and
//!   connection id name; the stream opens its frames in place
//!   (decrypting) *outside* its lock, then hands them to the connection: a
//!   DATA payload stays where the device wrote it, as a [`Chunk`] of the
//!   RECEIVE buffer, until read. Acks they cause go to the sender's queue:
//!   a pump never waits on a SEND. Where the array predates shared
//!   bindings (or in block mode) the stream has a binding and pumps of its
//!   own, the same code serving one port.
//!
//! So a stream costs one thread (its sender) and no RECEIVE of its own;
//! threads and held RECEIVEs grow with member paths, not connections.
//! Wake-ups go only to whom has work: readers on new data or the end,
//! writers on room, connection and state changes, the sender when
//! something is queued or an earlier deadline appears. [`counters`](crate::counters)
//! counts copies, protection passes, SENDs in flight and wake-ups.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::RngCore;
use scsi::pool::BufPool;
use scsi::IoBuf;

use crate::auth::FrameKey;
use crate::chunk::Chunk;
use crate::conn::{Config, ConnError, Connection, Event, State, Transmit};
use crate::counters::bump;
use crate::error::{MailboxError, Refusal};
use crate::frame::{Cipher, Direction, FrameError};
use crate::hub::{self, Attached, Endpoint, Hub, Opened};
use crate::mailbox::{Binding, Mailbox, SendDone};
use crate::rebind;
use crate::sealers;
use crate::wire::{self, frame_span, Frames, Header, Kind, WireError, HEADER_LEN};

/// Opens a new mailbox handle onto one STG (for vendor mode, a fresh set of
/// paths onto its members). A stream opens one for its sender; the host's
/// hub for the STG one per receive pump. Streams opened with one source
/// (the same `Arc`) share one binding at the array (docs/PROTOCOL.md §3.2),
/// so a process keeps one source per STG.
pub trait PathSource: Send + Sync {
    /// A mailbox over every member of the STG.
    fn open(&self) -> Result<Box<dyn Mailbox>, MailboxError>;
}

impl<F> PathSource for F
where
    F: Fn() -> Result<Box<dyn Mailbox>, MailboxError> + Send + Sync,
{
    fn open(&self) -> Result<Box<dyn Mailbox>, MailboxError> {
        self()
    }
}

/// The longest a pump waits in one RECEIVE.
const POLL: Duration = Duration::from_millis(100);

/// The most data one SCSI command of a stream carries: 1 MiB. Linux's sg
/// driver over tcm_loop refuses a larger `SG_IO` (`EINVAL`), and many HBAs
/// cap a command near it, so every SEND and RECEIVE stays within it: a
/// SEND holds one DATA frame, or control frames up to this size, and a
/// RECEIVE asks for exactly this much.
pub const MAX_TRANSFER: usize = 1 << 20;
/// A listener's RECEIVE allocation.
const RECV_BYTES: usize = MAX_TRANSFER;
/// The largest payload whose frame fits one transfer.
pub const MAX_STREAM_PAYLOAD: u32 = (MAX_TRANSFER - HEADER_LEN) as u32;
/// DATA payloads smaller than this are copied out of the RECEIVE buffer
/// (into a buffer of their own size) rather than keeping the whole buffer
/// alive until read: a slow reader of small frames then holds kilobytes,
/// not megabytes.
const SMALL_PAYLOAD: usize = 16 * 1024;

/// DATA frames from this payload size up may be sealed on a sealing thread
/// ([`sealers`]); smaller ones cost less to seal than to hand over.
const PARALLEL_SEAL_MIN: usize = 64 * 1024;
/// Control-frame SEND buffers start at this size.
const CONTROL_BUF: usize = 16 * 1024;
/// Tokens of control SENDs have this bit set (DATA tokens are sequence
/// numbers, far below it).
const CONTROL_TOKEN: u64 = 1 << 63;
/// How long a stopping sender waits for SENDs in flight to complete.
const STOP_PATIENCE: Duration = Duration::from_secs(2);
/// How long a sender with SENDs in flight and room for more waits for a
/// completion before looking at its queue again.
const SENDER_SLICE: Duration = Duration::from_micros(500);
/// How long a sender with its window full waits for a completion before
/// looking at its timers again (a deadline that appeared meanwhile, such
/// as a delayed ACK, waits at most this long).
const FULL_SLICE: Duration = Duration::from_millis(5);

/// `config` with its payload limit cut to what one transfer (and the
/// mailbox: a block-mode slot) carries, and
/// its window to what the array queues for the port (§6.3: credit never
/// exceeds the array's per-port queue limit).
fn fit(mut config: Config, binding: &Binding, mailbox: &dyn Mailbox) -> Config {
    config.max_payload = config
        .max_payload
        .min(MAX_STREAM_PAYLOAD)
        .min(mailbox.max_payload().unwrap_or(u32::MAX));
    let span = frame_span(config.max_payload).max(1);
    let by_bytes = (binding.queue_bytes as usize / span).max(1);
    let by_frames = binding.queue_frames.max(1) as usize;
    config.recv_window_frames = config
        .recv_window_frames
        .min(by_bytes.min(by_frames).try_into().unwrap_or(u32::MAX));
    config
}

/// A mailbox failure as the `io::Error` of the stream API, with the
/// [`MailboxError`] itself as its source (`get_ref()` and
/// `downcast_ref::<MailboxError>()` give it back to a caller that matches).
fn mb_err(e: MailboxError) -> io::Error {
    let kind = match e.refusal() {
        Some(Refusal::PortNotBound(_)) => io::ErrorKind::ConnectionRefused,
        Some(Refusal::PortInUse) => io::ErrorKind::AddrInUse,
        _ if e.binding_lost() => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A connection failure as the `io::Error` of the stream API, with the
/// [`ConnError`] as its source (as [`mb_err`]).
fn conn_err(e: &ConnError) -> io::Error {
    let kind = match e {
        ConnError::Timeout | ConnError::PeerDead { .. } => io::ErrorKind::TimedOut,
        ConnError::Reset { .. } => io::ErrorKind::ConnectionReset,
        ConnError::Closed => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.clone())
}

/// A sealed DATA frame kept until acknowledged.
struct Sealed {
    /// `None` while a SEND of it is in flight.
    buf: Option<IoBuf>,
    /// Send it again when it comes back (a retransmission was asked for
    /// while it was in flight).
    resend: bool,
}

/// A SEND waiting for the sender.
struct Out {
    token: u64,
    buf: IoBuf,
}

struct Inner {
    conn: Connection,
    failed: Option<ConnError>,
    stop: bool,
    sealed: BTreeMap<u64, Sealed>,
    outq: VecDeque<Out>,
    /// Sequence numbers carried by each control SEND in flight.
    control: HashMap<u64, Vec<u64>>,
    next_control: u64,
    /// When the sender next looks at the timers (it sleeps until then).
    timer_at: Option<Instant>,
    last_una: u64,
    last_state: State,
    /// Frames of another protocol version seen (a peer to upgrade).
    foreign_version: Option<u8>,
}

struct Shared {
    inner: Mutex<Inner>,
    readers: Condvar,
    writers: Condvar,
    /// The sender: SENDs to submit, or an earlier deadline.
    sender: Condvar,
    cipher: Cipher,
    out_dir: Direction,
    in_dir: Direction,
    /// The port's number: the same for the connection's life, whatever
    /// binding holds it (docs/PROTOCOL.md §6.7).
    port_no: u32,
    /// The binding the port is in and the hub that receives for it;
    /// replaced when the port is bound again after the array lost it
    /// ([`rebind`]). A leaf lock: taken briefly, nothing taken under it.
    port: Mutex<Port>,
    /// One [`rebind`] at a time.
    rebinding: Mutex<()>,
    /// The configured send buffer: the most the hub's share may give it.
    send_buffer_bytes: usize,
    pool: Arc<BufPool>,
    /// The SEND side's mailbox. Lock order: `tx` before `inner`, never the
    /// other way round.
    tx: Mutex<Box<dyn Mailbox>>,
    /// SENDs in flight on `tx` (readable without its lock).
    tx_in_flight: AtomicUsize,
    /// Bytes every SEND buffer leaves free before its frames
    /// ([`Mailbox::send_headroom`]): a frame is built and sealed after them.
    headroom: usize,
    /// This stream's frames being sealed on the sealing threads.
    sealing: AtomicUsize,
    /// Frames received that failed to open (dropped).
    unauthentic: AtomicU64,
    /// The most SENDs worth keeping in flight ([`Mailbox::send_window`]).
    tx_window: usize,
}

/// Where a stream's port lives: its binding (the handle its SENDs name)
/// and the receive side, the host's shared binding or this stream's own.
struct Port {
    binding: Binding,
    hub: Arc<Hub>,
}

thread_local! {
    /// This thread is submitting SENDs already (no re-entry from the
    /// completions it settles).
    static SUBMITTING: Cell<bool> = const { Cell::new(false) };
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn port(&self) -> MutexGuard<'_, Port> {
        self.port.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn binding(&self) -> Binding {
        self.port().binding
    }

    fn hub(&self) -> Arc<Hub> {
        Arc::clone(&self.port().hub)
    }

    fn notify(cv: &Condvar) {
        bump!(wakeups, 1);
        cv.notify_all();
    }

    /// Moves what the connection wants to send to the sender's queue
    /// (sealing control frames, which are small), drops acknowledged sealed
    /// frames, and wakes whoever has work.
    fn flush(&self, mut guard: MutexGuard<'_, Inner>) {
        let now = Instant::now();
        let inner = &mut *guard;
        let queued = inner.outq.len();
        let mut ctl: Option<(IoBuf, Vec<u64>)> = None;
        let mut full_ctl = Vec::new();
        while let Some(t) = inner.conn.poll_transmit(now) {
            match t {
                Transmit::Frame {
                    mut header,
                    payload,
                } => {
                    let seq = header.kind.is_sequenced().then_some(header.seq);
                    let span = frame_span(payload.len() as u32);
                    let room = self.headroom;
                    if ctl
                        .as_ref()
                        .is_some_and(|(b, _)| b.len() - room + span > MAX_TRANSFER)
                    {
                        full_ctl.extend(ctl.take());
                    }
                    let (buf, seqs) = ctl.get_or_insert_with(|| {
                        let mut b = self.pool.get(room + CONTROL_BUF.max(span));
                        b.resize(room);
                        (b, Vec::new())
                    });
                    let at = buf.len();
                    buf.resize(at + span);
                    if self
                        .cipher
                        .seal_into(self.out_dir, &mut header, &[payload], &mut buf[at..])
                        .is_err()
                    {
                        buf.resize(at);
                        continue;
                    }
                    seqs.extend(seq);
                }
                Transmit::Sealed { seq, retransmit } => {
                    if retransmit {
                        bump!(resent_sealed, 1);
                    }
                    if let Some(s) = inner.sealed.get_mut(&seq) {
                        match s.buf.take() {
                            Some(buf) => inner.outq.push_back(Out { token: seq, buf }),
                            None => s.resend = true,
                        }
                    }
                }
            }
        }
        for (buf, seqs) in full_ctl.into_iter().chain(ctl) {
            push_control(inner, buf, seqs);
        }
        // Sealed frames the peer has acknowledged go back to the pool.
        let una = inner.conn.snd_una();
        while let Some(oldest) = inner.sealed.first_entry() {
            if *oldest.key() >= una {
                break;
            }
            if let Some(buf) = oldest.remove().buf {
                self.pool.put(buf);
            }
        }
        let (mut wake_readers, mut wake_writers) = (false, false);
        while let Some(ev) = inner.conn.poll_event() {
            match ev {
                Event::Readable | Event::PeerClosed => wake_readers = true,
                Event::Connected | Event::Writable => wake_writers = true,
                Event::Closed => (wake_readers, wake_writers) = (true, true),
                Event::Failed(e) => {
                    inner.failed = Some(e);
                    (wake_readers, wake_writers) = (true, true);
                }
            }
        }
        if una > inner.last_una {
            inner.last_una = una;
            wake_writers = true;
        }
        let state = inner.conn.state();
        if state != inner.last_state {
            inner.last_state = state;
            wake_writers = true;
        }
        let deadline = inner.conn.poll_timeout();
        let wake_timer = match (deadline, inner.timer_at) {
            (Some(d), Some(t)) => d < t,
            (Some(_), None) => true,
            _ => inner.conn.is_closed(),
        };
        let wake_sender = inner.outq.len() > queued;
        if wake_sender {
            bump!(flushes, 1);
        }
        drop(guard);
        if wake_sender {
            self.kick();
        }
        if wake_readers {
            Self::notify(&self.readers);
        }
        if wake_writers {
            Self::notify(&self.writers);
        }
        if wake_timer && !wake_sender {
            Self::notify(&self.sender);
        }
    }

    /// Queued SENDs go out at once from this thread when the SEND side is
    /// free (a ping-pong then costs no thread hop); otherwise, and to reap
    /// what this submits, the sender thread is woken.
    fn kick(&self) {
        if !SUBMITTING.with(Cell::get) {
            if let Ok(mut tx) = self.tx.try_lock() {
                SUBMITTING.with(|c| c.set(true));
                let mut done = Vec::new();
                self.submit_queued(tx.as_mut(), &mut done);
                if tx.sends_in_flight() > 0 {
                    tx.reap_sends(&mut done, Some(Duration::ZERO));
                    self.tx_in_flight.store(tx.sends_in_flight(), Relaxed);
                }
                drop(tx);
                if !done.is_empty() {
                    self.completed(&mut done);
                }
                SUBMITTING.with(|c| c.set(false));
            }
        }
        if self.tx_in_flight.load(Relaxed) > 0 || !self.lock().outq.is_empty() {
            Self::notify(&self.sender);
        }
    }

    /// Submits queued SENDs while the window has room. Takes `inner`
    /// briefly; the caller holds `tx`.
    fn submit_queued(&self, tx: &mut dyn Mailbox, done: &mut Vec<SendDone>) {
        let room = self.tx_window.saturating_sub(tx.sends_in_flight());
        if room == 0 {
            return;
        }
        let batch: Vec<Out> = {
            let mut inner = self.lock();
            let n = room.min(inner.outq.len());
            inner.outq.drain(..n).collect()
        };
        let binding = self.binding();
        for out in batch {
            tx.submit_send(&binding, out.buf, out.token, done);
        }
        self.tx_in_flight.store(tx.sends_in_flight(), Relaxed);
    }

    /// Seals the staged frame in `buf` where it lies and hands it to the
    /// connection (which sends staged frames in sequence order, whichever
    /// was sealed first). On failure the buffer goes back to the pool and
    /// the frame stays staged.
    fn seal_and_queue(&self, mut header: Header, mut buf: IoBuf) -> Result<(), FrameError> {
        let seq = header.seq;
        let room = self.headroom.min(buf.len());
        if let Err(e) = self
            .cipher
            .seal(self.out_dir, &mut header, &mut buf[room..])
        {
            self.pool.put(buf);
            return Err(e);
        }
        let mut inner = self.lock();
        inner.sealed.insert(
            seq,
            Sealed {
                buf: Some(buf),
                resend: false,
            },
        );
        inner.conn.sealed(seq);
        self.flush(inner);
        Ok(())
    }

    /// Stops the stream's threads and wakes everyone (the connection is
    /// over, or the stream is being dropped).
    fn stop(&self, mut inner: MutexGuard<'_, Inner>, why: Option<ConnError>) {
        inner.stop = true;
        if let Some(e) = why {
            inner.failed.get_or_insert(e);
        }
        drop(inner);
        for cv in [&self.readers, &self.writers, &self.sender] {
            Self::notify(cv);
        }
    }

    /// Settles finished SENDs: sealed frames come back (or go again), a
    /// failed SEND is retransmitted after the timeout.
    fn completed(&self, done: &mut Vec<SendDone>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut lost = false;
        for d in done.drain(..) {
            // A SEND that finds the binding gone is a failed SEND like any
            // other: the receive pump noticed the loss too, and the port is
            // being bound again (docs/PROTOCOL.md §6.7); the frame goes again
            // after the timeout.
            let failed = d.result.as_ref().err();
            if d.token & CONTROL_TOKEN != 0 {
                let seqs = inner.control.remove(&d.token).unwrap_or_default();
                if failed.is_some() {
                    if seqs.is_empty() {
                        inner.conn.on_send_failed(u64::MAX, now);
                    }
                    for seq in seqs {
                        inner.conn.on_send_failed(seq, now);
                    }
                }
                if !d.buf.is_empty() {
                    self.pool.put(d.buf);
                }
                continue;
            }
            let seq = d.token;
            if d.buf.is_empty() {
                // A timed-out SEND keeps its buffer: the sealed frame is
                // gone, and it cannot be sealed again (that would reuse its
                // nonce). The path is dead anyway.
                lost = lost || inner.sealed.contains_key(&seq);
                continue;
            }
            let Some(slot) = inner.sealed.get_mut(&seq) else {
                self.pool.put(d.buf); // acknowledged meanwhile
                continue;
            };
            if failed.is_some() {
                slot.buf = Some(d.buf);
                slot.resend = false;
                inner.conn.on_send_failed(seq, now);
            } else if std::mem::take(&mut slot.resend) {
                inner.outq.push_back(Out {
                    token: seq,
                    buf: d.buf,
                });
            } else {
                slot.buf = Some(d.buf);
            }
        }
        if lost {
            inner.conn.abort(
                crate::conn::reset_reason::TIMEOUT,
                "a SEND timed out and its frame was lost",
            );
            inner.failed.get_or_insert(ConnError::Timeout);
        }
        self.flush(inner);
    }
}

/// A port for a new connection: one of the host's shared binding for the
/// STG, or a binding of its own with a private hub where there are no
/// shared bindings (an array of before docs/PROTOCOL.md §3.2, block mode).
fn bind_port(
    source: &Arc<dyn PathSource>,
    tx: &mut dyn Mailbox,
) -> io::Result<(Arc<Hub>, Binding)> {
    match hub::attach(source).map_err(mb_err)? {
        Attached::Shared { hub, port } => Ok((hub, port)),
        Attached::Unshared => bind_private(source, tx, None).map_err(mb_err),
    }
}

/// Binds `port` (`None`: a dynamic one) through `tx` as a binding of its
/// own and starts the private hub that receives for it; the binding is
/// released again when the hub cannot start.
fn bind_private(
    source: &Arc<dyn PathSource>,
    tx: &mut dyn Mailbox,
    port: Option<u32>,
) -> Result<(Arc<Hub>, Binding), MailboxError> {
    let binding = tx.bind(port)?;
    let started = source.open().and_then(|rx| {
        Hub::private(Arc::clone(source), binding, rx)
            .map_err(|e| MailboxError::Transport(scsi::CommandError::Io(e)))
    });
    match started {
        Ok(hub) => Ok((hub, binding)),
        Err(e) => {
            let _ = tx.release(&binding);
            Err(e)
        }
    }
}

/// Gives back a port [`bind_port`] made: unregistered and released alone
/// in a shared binding; a binding of its own is released after its pumps
/// were told to stop (the release ends their RECEIVEs), then they are
/// joined.
fn unbind_port(hub: &Hub, binding: &Binding, tx: &mut dyn Mailbox) {
    if hub.is_shared() {
        hub.remove_port(binding);
    } else {
        hub.stop();
        let _ = tx.release(binding);
        hub.join();
    }
}

fn push_control(inner: &mut Inner, buf: IoBuf, seqs: Vec<u64>) {
    let token = CONTROL_TOKEN | inner.next_control;
    inner.next_control = (inner.next_control + 1) & !CONTROL_TOKEN;
    inner.control.insert(token, seqs);
    inner.outq.push_back(Out { token, buf });
}

impl Endpoint for Shared {
    /// Opens the frames at `at` in place, outside the lock.
    fn open(&self, buf: &mut [u8], at: &[usize]) -> Vec<Opened> {
        let mut opened = Vec::with_capacity(at.len());
        for &offset in at {
            match self.cipher.open(self.in_dir, &mut buf[offset..]) {
                Ok(h) => {
                    let start = offset + HEADER_LEN;
                    opened.push((h, start..start + h.payload_len as usize));
                }
                Err(e) => {
                    bump!(recv_dropped_unauthentic, 1);
                    let n = self.unauthentic.fetch_add(1, Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(
                            port = self.port_no,
                            dropped = n,
                            "a frame failed to open ({e}) and was dropped: a peer with another \
                             key or protection, or bytes damaged or forged on the SAN"
                        );
                    }
                }
            }
        }
        opened
    }

    /// Hands opened frames to the connection: DATA payloads of any size
    /// as chunks of the RECEIVE buffer.
    fn deliver(&self, opened: Vec<(hub::Shared, Opened)>) {
        let now = Instant::now();
        let mut inner = self.lock();
        for (recv, (h, range)) in opened {
            if h.kind == Kind::DATA && range.len() >= SMALL_PAYLOAD {
                if let Some(chunk) = Chunk::new(recv, range) {
                    inner.conn.handle_frame_chunk(now, &h, chunk);
                }
            } else {
                if h.kind == Kind::DATA {
                    bump!(recv_copy_bytes, range.len());
                }
                let bytes = &(*recv).as_ref()[range];
                inner.conn.handle_frame(now, &h, bytes);
            }
        }
        self.flush(inner);
    }

    fn share_send_buffer(&self, bytes: usize) {
        let bytes = bytes.min(self.send_buffer_bytes);
        let mut inner = self.lock();
        let before = inner.conn.send_buffer_capacity();
        if bytes != before {
            inner.conn.set_send_buffer(bytes);
            if bytes > before {
                self.writers.notify_all();
            }
        }
    }

    fn binding_lost(self: Arc<Self>) {
        if self.lock().stop {
            return;
        }
        let weak = Arc::downgrade(&self);
        let spawned = thread::Builder::new()
            .name(format!("stp-rebind-{}", self.port_no))
            .spawn(move || rebind(weak));
        if let Err(e) = spawned {
            tracing::warn!(port = self.port_no, "cannot bind the port again ({e})");
            self.stop(self.lock(), Some(ConnError::BindingLost));
        }
    }

    fn foreign_version(&self, v: u8) {
        self.lock().foreign_version = Some(v);
    }
}

/// Binds the stream's port again after the array lost its binding
/// (docs/PROTOCOL.md §6.7; [`rebind::bind_again`]): the same port number,
/// with a plain BIND, as a binding of the stream's own with a private hub.
/// The connection keeps its sequence state; what the array lost is
/// retransmitted. A port bound meanwhile by someone else, or an array that
/// stays away, fails the connection ([`ConnError::BindingLost`]).
fn rebind(weak: Weak<Shared>) {
    let Some(s) = weak.upgrade() else { return };
    let _one = s.rebinding.lock().unwrap_or_else(|e| e.into_inner());
    let old = s.hub();
    if !old.is_lost() || s.lock().stop {
        return; // bound again already, or over
    }
    let port = s.port_no;
    old.unregister(port);
    old.stop();
    let source = old.source();
    let bound = rebind::bind_again(
        || s.lock().stop,
        || bind_private(&source, source.open()?.as_mut(), Some(port)),
    );
    match bound {
        Ok(Some((hub, binding))) => {
            let conn_id = s.lock().conn.conn_id();
            let endpoint: Weak<dyn Endpoint> = Arc::downgrade(&s) as Weak<dyn Endpoint>;
            hub.register(port, conn_id, endpoint);
            *s.port() = Port { binding, hub };
            tracing::info!(
                port,
                "the array lost the port's binding (restarted?); bound it again, resuming"
            );
            if !old.is_shared() {
                old.join();
            }
            s.kick();
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(
                port,
                "the array lost the port's binding and binding it again failed ({e}); the \
                 connection fails"
            );
            s.stop(s.lock(), Some(ConnError::BindingLost));
        }
    }
}

/// The SEND side and the timers: submits queued SENDs as soon as the
/// window has room and reaps completions as they come (writers submit
/// themselves when they find the SEND side free; see `Shared::kick`), and
/// fires the connection's deadlines (delayed ACK, retransmission,
/// keepalive) when they come due.
fn sender(shared: Weak<Shared>) {
    let mut done = Vec::new();
    let mut stopping: Option<Instant> = None;
    loop {
        let Some(s) = shared.upgrade() else { return };
        let until;
        {
            let mut inner = s.lock();
            loop {
                let in_flight = s.tx_in_flight.load(Relaxed);
                if inner.stop {
                    // Reap what is in flight for a while, then give up on
                    // it (a dead path must not hang the stream's drop).
                    let since = *stopping.get_or_insert_with(Instant::now);
                    if in_flight == 0 || since.elapsed() > STOP_PATIENCE {
                        return;
                    }
                }
                let now = Instant::now();
                let deadline = if inner.stop || inner.conn.is_closed() {
                    None
                } else {
                    inner.conn.poll_timeout()
                };
                if deadline.is_some_and(|t| t <= now) {
                    inner.timer_at = None;
                    inner.conn.handle_timeout(now);
                    s.flush(inner);
                    inner = s.lock();
                    continue;
                }
                let wait = deadline.map_or(POLL, |t| (t - now).min(POLL));
                inner.timer_at = Some(now + wait);
                if in_flight > 0 || (!inner.outq.is_empty() && in_flight < s.tx_window) {
                    until = wait;
                    break;
                }
                inner = s
                    .sender
                    .wait_timeout(inner, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let mut tx = s.tx.lock().unwrap_or_else(|e| e.into_inner());
        SUBMITTING.with(|c| c.set(true));
        s.submit_queued(tx.as_mut(), &mut done);
        if done.is_empty() && tx.sends_in_flight() > 0 {
            let full = tx.sends_in_flight() >= s.tx_window;
            let slice = if full { FULL_SLICE } else { SENDER_SLICE };
            tx.reap_sends(&mut done, Some(slice.min(until)));
            s.tx_in_flight.store(tx.sends_in_flight(), Relaxed);
        }
        drop(tx);
        SUBMITTING.with(|c| c.set(false));
        if !done.is_empty() {
            s.completed(&mut done);
        }
    }
}

/// A connected STP byte stream.
pub struct StpStream {
    shared: Arc<Shared>,
    sender: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.shared.lock();
        f.debug_struct("StpStream")
            .field("local_port", &inner.conn.local_port())
            .field("remote_port", &inner.conn.remote_port())
            .field("state", &inner.conn.state())
            .finish()
    }
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// A frame handed to a sealing thread. However its job ends (sealed,
/// failed, or unwound), the stream counts it back; unless it was sealed,
/// the stream cannot go on: the frame is no longer the last staged one, so
/// it cannot be taken back, and it can never be sent.
struct Offloaded {
    shared: Arc<Shared>,
    seq: u64,
    /// Sealed and handed to the connection, or why not.
    outcome: Result<(), String>,
}

impl Drop for Offloaded {
    fn drop(&mut self) {
        self.shared.sealing.fetch_sub(1, Relaxed);
        if let Err(why) = &self.outcome {
            let mut inner = self.shared.lock();
            inner.conn.abort(
                crate::conn::reset_reason::ABORT,
                &format!("sealing frame {} failed: {why}", self.seq),
            );
            self.shared.flush(inner);
        }
    }
}

/// A DMA buffer lent by [`StpStream::send_buf`]: fill [`payload`](SendSlot::payload)
/// and [`commit`](SendSlot::commit) it. Dropped
/// uncommitted, nothing is sent.
pub struct SendSlot<'a> {
    stream: &'a mut StpStream,
    header: Header,
    buf: Option<IoBuf>,
}

impl SendSlot<'_> {
    /// The payload bytes to fill: exactly what will be sent (their
    /// contents are unspecified until written).
    pub fn payload(&mut self) -> &mut [u8] {
        let len = self.header.payload_len as usize;
        let at = self.stream.shared.headroom + HEADER_LEN;
        match &mut self.buf {
            Some(b) => &mut b[at..at + len],
            None => &mut [],
        }
    }

    /// Seals the payload where it is and queues it for sending.
    pub fn commit(mut self) -> io::Result<()> {
        let Some(buf) = self.buf.take() else {
            return Ok(());
        };
        bump!(send_payload_bytes, self.header.payload_len);
        self.stream.seal_and_queue(self.header, buf)
    }
}

impl Drop for SendSlot<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut inner = self.stream.shared.lock();
            inner.conn.unstage(self.header.seq);
            drop(inner);
            self.stream.shared.pool.put(buf);
        }
    }
}

impl StpStream {
    fn start(
        hub: Arc<Hub>,
        conn: Connection,
        binding: Binding,
        cipher: Cipher,
        tx: Box<dyn Mailbox>,
        send_buffer_bytes: usize,
    ) -> io::Result<StpStream> {
        let (out_dir, in_dir) = match conn.role() {
            crate::conn::Role::Client => (Direction::ClientToServer, Direction::ServerToClient),
            crate::conn::Role::Server => (Direction::ServerToClient, Direction::ClientToServer),
        };
        let state = conn.state();
        let conn_id = conn.conn_id();
        let pool = BufPool::global().clone();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                conn,
                failed: None,
                stop: false,
                sealed: BTreeMap::new(),
                outq: VecDeque::new(),
                control: HashMap::new(),
                next_control: 0,
                timer_at: None,
                last_una: 0,
                last_state: state,
                foreign_version: None,
            }),
            readers: Condvar::new(),
            writers: Condvar::new(),
            sender: Condvar::new(),
            cipher,
            out_dir,
            in_dir,
            port_no: binding.port,
            port: Mutex::new(Port { binding, hub }),
            rebinding: Mutex::new(()),
            send_buffer_bytes,
            pool,
            tx_window: tx.send_window().max(1),
            headroom: tx.send_headroom(),
            tx: Mutex::new(tx),
            tx_in_flight: AtomicUsize::new(0),
            sealing: AtomicUsize::new(0),
            unauthentic: AtomicU64::new(0),
        });
        // Frames for the port reach the connection from now on: before its
        // first frame goes out, so the answer finds it.
        let endpoint: Weak<dyn Endpoint> = Arc::downgrade(&shared) as Weak<dyn Endpoint>;
        shared.hub().register(binding.port, conn_id, endpoint);
        shared.flush(shared.lock());
        let mut stream = StpStream {
            shared,
            sender: None,
        };
        // On a spawn failure, dropping `stream` stops what runs and gives
        // the port back.
        let weak = Arc::downgrade(&stream.shared);
        stream.sender = Some(
            thread::Builder::new()
                .name(format!("stp-send-{}", binding.port))
                .spawn(move || sender(weak))?,
        );
        Ok(stream)
    }

    /// Connects to `port` on the STG, protecting frames with `key`
    /// (docs/PROTOCOL.md §7) as `config.protection` says.
    pub fn connect(
        source: Arc<dyn PathSource>,
        port: u32,
        key: FrameKey,
        config: Config,
        timeout: Duration,
    ) -> io::Result<StpStream> {
        let mut tx = source.open().map_err(mb_err)?;
        let (hub, binding) = bind_port(&source, tx.as_mut())?;
        let buffer = config.send_buffer_bytes;
        let protection = config.protection;
        let conn_id = rand::rngs::OsRng.next_u64();
        let conn = Connection::connect(
            fit(config, &binding, tx.as_ref()),
            Instant::now(),
            binding.port,
            port,
            conn_id,
            nonce(),
        );
        let cipher = Cipher::new(&key, conn_id, protection);
        let stream = StpStream::start(hub, conn, binding, cipher, tx, buffer)?;
        stream.wait_for(
            "STP connection not established (is anyone listening on the port, with the same key \
             and protection?)",
            timeout,
            |c| c.state() != State::SynSent,
        )?;
        Ok(stream)
    }

    /// Whether this stream's port is one of the host's shared binding for
    /// the STG (docs/PROTOCOL.md §3.2), rather than a binding of its own
    /// (an array of before shared bindings, block mode).
    pub fn shares_binding(&self) -> bool {
        self.shared.hub().is_shared()
    }

    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Connection) -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.shared.lock();
        loop {
            if let Some(e) = &inner.failed {
                return Err(conn_err(e));
            }
            if done(&inner.conn) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let also = match inner.foreign_version {
                    Some(v) => format!(
                        "; frames of STP v{v} arrived and were refused: the peer runs a release \
                         speaking another protocol version (this one speaks v{}), upgrade it",
                        wire::VERSION
                    ),
                    None => String::new(),
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} within {timeout:?}{also}"),
                ));
            }
            inner = self
                .shared
                .writers
                .wait_timeout(inner, (deadline - now).min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// This end's port.
    pub fn local_port(&self) -> u32 {
        self.shared.lock().conn.local_port()
    }

    /// The peer's port.
    pub fn peer_port(&self) -> u32 {
        self.shared.lock().conn.remote_port()
    }

    /// Connection statistics.
    pub fn stats(&self) -> crate::conn::Stats {
        self.shared.lock().conn.stats()
    }

    /// How this stream protects its frames.
    pub fn protection(&self) -> crate::frame::Protection {
        self.shared.cipher.protection()
    }

    /// Closes this direction (FIN after the buffered data) and waits up to
    /// `timeout` for the connection to finish closing.
    pub fn shutdown(&mut self, timeout: Duration) -> io::Result<()> {
        {
            let mut inner = self.shared.lock();
            inner.conn.close();
            self.shared.flush(inner);
        }
        self.wait_for("STP connection did not finish closing", timeout, |c| {
            matches!(c.state(), State::Closed | State::Linger | State::CloseWait) || c.is_closed()
        })
    }

    /// Stages a DATA frame of up to `len` bytes, waiting for room.
    fn stage(&self, len: usize) -> io::Result<Header> {
        let mut inner = self.shared.lock();
        loop {
            if let Some(e) = &inner.failed {
                return Err(conn_err(e));
            }
            match inner.conn.stage(len) {
                Ok(Some(h)) => return Ok(h),
                Ok(None) => {}
                Err(e) => return Err(conn_err(&e)),
            }
            inner = self
                .shared
                .writers
                .wait_timeout(inner, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Seals the staged frame in `buf` (payload in place after the header)
    /// and queues it: a large frame on one of the process's sealing threads
    /// while fewer than [`sealers::parallelism`] of this stream's frames
    /// are there (the caller goes on to stage and copy the next one), any
    /// other here.
    fn seal_and_queue(&self, header: Header, buf: IoBuf) -> io::Result<()> {
        let shared = &self.shared;
        if header.payload_len as usize >= PARALLEL_SEAL_MIN {
            let busy = shared.sealing.load(Relaxed);
            if busy < sealers::parallelism()
                && shared
                    .sealing
                    .compare_exchange(busy, busy + 1, Relaxed, Relaxed)
                    .is_ok()
            {
                bump!(sealed_in_pool, 1);
                let job = Offloaded {
                    shared: shared.clone(),
                    seq: header.seq,
                    outcome: Err("the sealing thread gave up on it".into()),
                };
                sealers::spawn(move || {
                    let mut job = job;
                    job.outcome = job
                        .shared
                        .seal_and_queue(header, buf)
                        .map_err(|e| e.to_string());
                });
                return Ok(());
            }
        }
        shared.seal_and_queue(header, buf).map_err(|e| {
            shared.lock().conn.unstage(header.seq);
            io::Error::other(e)
        })
    }

    /// A DMA buffer for up to `len` payload bytes (at most the negotiated
    /// frame payload; see [`SendSlot::payload`] for how many it got),
    /// waiting for room in the send buffer. The caller fills it and
    /// commits: the payload is sealed where it lies, with no copy.
    pub fn send_buf(&mut self, len: usize) -> io::Result<SendSlot<'_>> {
        let header = self.stage(len.max(1))?;
        let span = frame_span(header.payload_len);
        let buf = self.shared.pool.get(self.shared.headroom + span);
        Ok(SendSlot {
            stream: self,
            header,
            buf: Some(buf),
        })
    }

    /// The next received bytes, without copying them: a chunk of the
    /// RECEIVE buffer the device wrote them into. `None` at end of stream.
    /// Waits until data, the end, or an error.
    pub fn recv_buf(&mut self) -> io::Result<Option<Chunk>> {
        let mut inner = self.shared.lock();
        loop {
            match inner.conn.read_chunk() {
                Ok(c) => {
                    self.shared.flush(inner);
                    return Ok(c);
                }
                Err(ConnError::WouldBlock) => {}
                Err(e) => return Err(conn_err(&e)),
            }
            if let Some(e) = &inner.failed {
                return Err(conn_err(e));
            }
            inner = self
                .shared
                .readers
                .wait_timeout(inner, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Read for StpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inner = self.shared.lock();
        loop {
            match inner.conn.read(buf) {
                Ok(n) => {
                    // Reading may have opened the window: let the peer know.
                    self.shared.flush(inner);
                    return Ok(n);
                }
                Err(ConnError::WouldBlock) => {}
                Err(e) => return Err(conn_err(&e)),
            }
            if let Some(e) = &inner.failed {
                return Err(conn_err(e));
            }
            inner = self
                .shared
                .readers
                .wait_timeout(inner, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Write for StpStream {
    /// Sends up to one frame's worth of `buf`: the bytes are copied once,
    /// into the frame's DMA buffer, and sealed there. Each call makes its
    /// own frame, so small writes make small frames (wrap the stream in a
    /// `BufWriter` to batch them).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let header = self.stage(buf.len())?;
        let n = header.payload_len as usize;
        let at = self.shared.headroom + HEADER_LEN;
        let mut frame = self
            .shared
            .pool
            .get(self.shared.headroom + frame_span(header.payload_len));
        frame[at..at + n].copy_from_slice(&buf[..n]);
        bump!(send_copy_bytes, n);
        bump!(send_payload_bytes, n);
        self.seal_and_queue(header, frame)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Wait until everything written is acknowledged (the send buffer
        // is empty again).
        self.wait_for(
            "the peer did not acknowledge the written data",
            Duration::from_secs(300),
            |c| c.send_buffer_free() >= c.send_buffer_capacity(),
        )
    }
}

impl Drop for StpStream {
    fn drop(&mut self) {
        let handshaking = {
            let mut inner = self.shared.lock();
            let handshaking = matches!(inner.conn.state(), State::SynSent | State::SynReceived);
            if handshaking {
                // Nobody to say goodbye to: abort rather than wait for a
                // close the peer can never acknowledge.
                inner
                    .conn
                    .abort(crate::conn::reset_reason::ABORT, "connection abandoned");
                self.shared.flush(inner);
            } else if !inner.conn.is_closed() {
                inner.conn.close();
                self.shared.flush(inner);
            }
            handshaking
        };
        if !handshaking {
            let _ = self.wait_for("close", Duration::from_secs(2), Connection::is_closed);
        }
        // Let the sender put out what is queued (a final ACK, an RST).
        let deadline = Instant::now() + Duration::from_millis(500);
        while !self.shared.lock().outq.is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        self.shared.stop(self.shared.lock(), None);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        {
            let mut tx = self.shared.tx.lock().unwrap_or_else(|e| e.into_inner());
            let mut done = Vec::new();
            tx.reap_sends(&mut done, Some(POLL));
            // A rebind under way finishes its attempt first (it sees
            // `stop` and gives up, or the port it bound is released here).
            let _one = self.shared.rebinding.lock();
            let (hub, binding) = (self.shared.hub(), self.shared.binding());
            unbind_port(&hub, &binding, tx.as_mut());
        }
        let mut inner = self.shared.lock();
        for (_, s) in std::mem::take(&mut inner.sealed) {
            if let Some(buf) = s.buf {
                self.shared.pool.put(buf);
            }
        }
    }
}

/// A bound, listening STP port.
pub struct StpListener {
    source: Arc<dyn PathSource>,
    mailbox: Box<dyn Mailbox>,
    binding: Binding,
    key: FrameKey,
    config: Config,
    /// Accepted connections by id, so a retransmitted SYN reaches the
    /// connection that answered it.
    accepted: HashMap<u64, Weak<Shared>>,
    /// Every connection id answered: a SYN replayed after its connection
    /// ended must not open a second connection under the same key.
    seen: HashSet<u64>,
    foreign_version: Option<u8>,
}

impl std::fmt::Debug for StpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StpListener")
            .field("port", &self.binding.port)
            .finish()
    }
}

impl StpListener {
    /// Binds `port` (`None`: a dynamic port) and listens on it.
    pub fn bind(
        source: Arc<dyn PathSource>,
        port: Option<u32>,
        key: FrameKey,
        config: Config,
    ) -> io::Result<StpListener> {
        let mut mailbox = source.open().map_err(mb_err)?;
        let binding = mailbox.bind(port).map_err(mb_err)?;
        Ok(StpListener {
            source,
            mailbox,
            binding,
            key,
            config,
            accepted: HashMap::new(),
            seen: HashSet::new(),
            foreign_version: None,
        })
    }

    /// The listening port (the seed's getsockname).
    pub fn local_port(&self) -> u32 {
        self.binding.port
    }

    /// Waits up to `timeout` for a connection and accepts it.
    pub fn accept(&mut self, timeout: Duration) -> io::Result<StpStream> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let also = match self.foreign_version {
                    Some(v) => format!(
                        "; frames of STP v{v} arrived and were refused: a peer runs a release \
                         speaking another protocol version (this one speaks v{}), upgrade it",
                        wire::VERSION
                    ),
                    None => String::new(),
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no STP connection on port {} within {timeout:?}{also}",
                        self.binding.port
                    ),
                ));
            }
            let mut buf =
                match self
                    .mailbox
                    .receive(&self.binding, RECV_BYTES, (deadline - now).min(POLL))
                {
                    Ok(buf) => buf,
                    Err(e) if e.binding_lost() => {
                        // The array lost the listening port's binding
                        // (restarted): bind the same port again (§6.7).
                        let port = self.binding.port;
                        let mailbox = &mut self.mailbox;
                        match rebind::bind_again(|| false, || mailbox.bind(Some(port))) {
                            Ok(Some(b)) => {
                                tracing::info!(
                                    port,
                                    "the array lost the listening port's binding (restarted?); \
                                     bound it again"
                                );
                                self.binding = b;
                                continue;
                            }
                            Ok(None) => return Err(mb_err(e)),
                            Err(last) => return Err(mb_err(last)),
                        }
                    }
                    // Transient trouble on the path: poll again.
                    Err(_) => {
                        thread::sleep(crate::retry::POLL_PAUSE);
                        continue;
                    }
                };
            let mut offsets = Vec::new();
            for found in Frames::new(&buf) {
                match found {
                    Ok(f) => offsets.push((f.offset, f.header.conn_id, f.header.kind)),
                    Err((_, WireError::BadVersion(v))) => {
                        self.foreign_version = Some(v);
                        break;
                    }
                    Err(_) => break,
                }
            }
            for (offset, conn_id, kind) in offsets {
                if kind != Kind::SYN {
                    continue;
                }
                let cipher = Cipher::new(&self.key, conn_id, self.config.protection);
                let Ok(header) = cipher.open(Direction::ClientToServer, &mut buf[offset..]) else {
                    continue;
                };
                let start = offset + HEADER_LEN;
                let payload = &buf[start..start + header.payload_len as usize];
                if self.redeliver(&header, payload) || !self.seen.insert(conn_id) {
                    continue;
                }
                return self.accept_syn(&header, payload, cipher);
            }
        }
    }

    /// Hands a retransmitted SYN to the connection that already accepted
    /// it (its SYN_ACK was lost); false if the SYN is new.
    fn redeliver(&mut self, header: &Header, payload: &[u8]) -> bool {
        let Some(shared) = self.accepted.get(&header.conn_id).and_then(Weak::upgrade) else {
            return false;
        };
        let mut inner = shared.lock();
        inner.conn.handle_frame(Instant::now(), header, payload);
        shared.flush(inner);
        true
    }

    fn accept_syn(
        &mut self,
        syn: &Header,
        payload: &[u8],
        cipher: Cipher,
    ) -> io::Result<StpStream> {
        let mut tx = self.source.open().map_err(mb_err)?;
        let (hub, binding) = bind_port(&self.source, tx.as_mut())?;
        let conn = match Connection::accept(
            fit(self.config.clone(), &binding, tx.as_ref()),
            Instant::now(),
            syn,
            payload,
            binding.port,
            nonce(),
        ) {
            Ok(c) => c,
            Err(e) => {
                // Refuse from the listening port (sealed under the
                // connection's key, as the client expects), then report.
                let (h, p) = Connection::refuse(syn, e.reset_reason(), &e.to_string());
                if let Ok(frame) = cipher.seal_to_vec(Direction::ServerToClient, h, &[&p]) {
                    let _ = self.mailbox.send_packed(&self.binding, &frame);
                }
                unbind_port(&hub, &binding, tx.as_mut());
                return Err(conn_err(&e));
            }
        };
        let buffer = self.config.send_buffer_bytes;
        let stream = StpStream::start(hub, conn, binding, cipher, tx, buffer)?;
        self.accepted.retain(|_, w| w.strong_count() > 0);
        self.accepted
            .insert(syn.conn_id, Arc::downgrade(&stream.shared));
        Ok(stream)
    }
}

impl Drop for StpListener {
    fn drop(&mut self) {
        let _ = self.mailbox.release(&self.binding);
    }
}
