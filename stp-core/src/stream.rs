//! Blocking STP sockets over an STG mailbox (either mode): [`StpListener`] and
//! [`StpStream`] (which implements `Read` and `Write`).
//!
//! Each stream owns a sans-IO [`Connection`] behind a mutex, *pump*
//! threads that long-poll RECEIVE, open (CRC + tag) and feed frames to the
//! connection and send what it produces (one per RECEIVE worth keeping in
//! flight: [`Mailbox::receive_parallelism`], one per member path in vendor
//! mode), and a *timer* thread that sleeps
//! until the connection's next deadline (delayed ACK, retransmission,
//! keepalive) and fires it. Writers, readers and the timer thread block on
//! one condition variable, signalled on every change.
//!
//! Frames are sealed under the connection's lock (the payload is borrowed
//! from its send ring) straight into a page-aligned SEND buffer that the
//! device reads by direct I/O: the payload's one copy. A gather list (sg
//! `iovec_count`) would not save it, since the sg driver does direct I/O only
//! without one and copies a gathered SEND into pages of its own. SEND and
//! RECEIVE buffers are reused, so a busy stream allocates nothing.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::RngCore;
use scsi::IoBuf;

use crate::auth::FrameKey;
use crate::conn::{Config, ConnError, Connection, Event, State};
use crate::frame::{open, pack_into, OutFrame};
use crate::mailbox::{Binding, Mailbox};
use crate::vendor::MailboxError;
use crate::wire::{Frames, Header, Kind, ALIGN, HEADER_LEN};

/// Opens a new mailbox handle onto one STG (for vendor mode, a fresh set of
/// paths onto its members). A stream opens two: one for its pump thread, one
/// for senders.
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
/// SEND holds whole frames up to this size (more frames go in another
/// SEND) and a RECEIVE asks for exactly this much.
pub const MAX_TRANSFER: usize = 1 << 20;
/// RECEIVE allocation.
const RECV_BYTES: usize = MAX_TRANSFER;
/// The most a flush seals before sending (in SENDs of at most
/// [`MAX_TRANSFER`], which a mailbox may run side by side on its paths).
const FLUSH_BYTES: usize = 4 * MAX_TRANSFER;
/// The largest payload whose frame, aligned, fits one transfer.
pub const MAX_STREAM_PAYLOAD: u32 = (MAX_TRANSFER - HEADER_LEN - ALIGN) as u32;

/// `config` with its payload limit cut to what one transfer carries.
fn fit(mut config: Config) -> Config {
    config.max_payload = config.max_payload.min(MAX_STREAM_PAYLOAD);
    config
}

fn io_err(e: impl std::fmt::Display, kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, e.to_string())
}

fn mb_err(e: MailboxError) -> io::Error {
    io_err(e, io::ErrorKind::Other)
}

fn conn_err(e: &ConnError) -> io::Error {
    let kind = match e {
        ConnError::Timeout | ConnError::PeerDead { .. } => io::ErrorKind::TimedOut,
        ConnError::Reset { .. } => io::ErrorKind::ConnectionReset,
        ConnError::Closed => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

struct Inner {
    conn: Connection,
    failed: Option<ConnError>,
    stop: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
    key: FrameKey,
    binding: Binding,
    tx: Mutex<Box<dyn Mailbox>>,
    send_buffer_bytes: usize,
}

thread_local! {
    /// Each flushing thread's SEND buffers, reused from flush to flush.
    static SEND_BUFS: std::cell::RefCell<Vec<IoBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seals everything the connection wants to send and sends it; a failed
    /// SEND is reported back so the frames are retransmitted.
    fn flush(&self, inner: MutexGuard<'_, Inner>) {
        SEND_BUFS.with(|bufs| self.flush_with(inner, &mut bufs.borrow_mut()));
    }

    /// Seals the frames the connection wants to send (up to
    /// [`FLUSH_BYTES`]) straight into page-aligned SEND buffers (`spare`,
    /// this thread's, reused), at most [`MAX_TRANSFER`] bytes of whole
    /// frames each, and sends them, side by side where the mailbox can: the
    /// payload's one copy, from the connection's send buffer into memory
    /// the device reads by DMA (see the module docs).
    fn flush_with(&self, mut inner: MutexGuard<'_, Inner>, spare: &mut Vec<IoBuf>) {
        let now = Instant::now();
        let mut sends: Vec<IoBuf> = Vec::new();
        let mut cur = spare.pop().unwrap_or_default();
        cur.resize(0);
        let mut seqs = Vec::new();
        let mut total = 0;
        while let Some(t) = inner.conn.poll_transmit(now) {
            let payload = t.payload;
            let Ok(f) = OutFrame::sealed(t.header, &payload, &self.key) else {
                break;
            };
            let span = f.header.span();
            if cur.len() + span > MAX_TRANSFER {
                sends.push(std::mem::replace(&mut cur, spare.pop().unwrap_or_default()));
                cur.resize(0);
            }
            let at = cur.len();
            cur.resize(at + span);
            if pack_into(&[f], &mut cur[at..]).is_err() {
                cur.resize(at);
                break;
            }
            if f.header.kind.is_sequenced() {
                seqs.push(f.header.seq);
            }
            total += span;
            if total >= FLUSH_BYTES {
                break;
            }
        }
        if !cur.is_empty() {
            sends.push(cur);
        } else {
            spare.push(cur);
        }
        Self::drain_events(&mut inner);
        drop(inner);
        // Whatever called flush changed the connection (frames delivered,
        // data written or read, a timer fired): readers, writers and the
        // timer thread re-check it.
        self.changed.notify_all();
        if sends.is_empty() {
            return;
        }
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let failed = tx.send_bufs(&self.binding, &mut sends).is_err();
        drop(tx);
        spare.append(&mut sends);
        if failed {
            let mut inner = self.lock();
            let now = Instant::now();
            for seq in seqs {
                inner.conn.on_send_failed(seq, now);
            }
        }
        self.changed.notify_all();
    }

    fn drain_events(inner: &mut Inner) {
        while let Some(ev) = inner.conn.poll_event() {
            if let Event::Failed(e) = ev {
                inner.failed = Some(e);
            }
        }
    }

    /// Hands received frame bytes to the connection; bad frames are dropped.
    fn deliver(&self, inner: &mut Inner, buf: &[u8]) {
        let now = Instant::now();
        for found in Frames::new(buf) {
            let Ok(found) = found else { break };
            if let Ok((header, payload)) = open(found.bytes(buf), &self.key) {
                inner.conn.handle_frame(now, &header, payload);
            }
        }
    }
}

/// The receive side: long-polls RECEIVE and hands what arrives to the
/// connection. Timers are the timer thread's, so every poll is a full
/// [`POLL`] (the wire's long-poll unit is 100 ms; a shorter wait would be a
/// zero-wait spin).
fn pump(shared: Weak<Shared>, mut rx: Box<dyn Mailbox>) {
    let mut buf = IoBuf::default();
    loop {
        let Some(s) = shared.upgrade() else { return };
        {
            let inner = s.lock();
            if inner.stop || inner.conn.is_closed() {
                return;
            }
        }
        let binding = s.binding;
        drop(s); // do not keep the stream alive across a long poll
        let got = rx.receive_into(&binding, &mut buf, RECV_BYTES, POLL);
        let Some(s) = shared.upgrade() else { return };
        match got {
            Ok(()) if !buf.is_empty() => {
                let mut inner = s.lock();
                s.deliver(&mut inner, &buf);
                s.flush(inner);
            }
            Ok(()) => {}
            Err(e) if e.binding_lost() => {
                let mut inner = s.lock();
                inner.failed.get_or_insert(ConnError::BindingLost);
                inner.stop = true;
                drop(inner);
                s.changed.notify_all();
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The timer side: sleeps until the connection's next deadline (delayed
/// ACK, retransmission, keepalive), fires it and sends what it produced.
/// Every change to the connection wakes it (`changed`), so a new, earlier
/// deadline is seen at once.
fn timers(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let mut inner = s.lock();
        if inner.stop || inner.conn.is_closed() {
            return;
        }
        let now = Instant::now();
        match inner.conn.poll_timeout() {
            Some(t) if t <= now => {
                inner.conn.handle_timeout(now);
                s.flush(inner);
            }
            next => {
                let wait = next.map_or(POLL, |t| (t - now).min(POLL));
                drop(s.changed.wait_timeout(inner, wait));
            }
        }
    }
}

/// A connected STP byte stream.
pub struct StpStream {
    shared: Arc<Shared>,
    pumps: Vec<JoinHandle<()>>,
    timer: Option<JoinHandle<()>>,
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

impl StpStream {
    fn start(
        source: &dyn PathSource,
        conn: Connection,
        binding: Binding,
        key: FrameKey,
        tx: Box<dyn Mailbox>,
        send_buffer_bytes: usize,
    ) -> io::Result<StpStream> {
        let rx = source.open().map_err(mb_err)?;
        // One pump per RECEIVE worth keeping in flight (vendor mode: one per
        // member path, so receiving keeps pace with SENDs spread over them).
        let mut rxs = vec![rx];
        for _ in 1..rxs[0].receive_parallelism() {
            rxs.push(source.open().map_err(mb_err)?);
        }
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                conn,
                failed: None,
                stop: false,
            }),
            changed: Condvar::new(),
            key,
            binding,
            tx: Mutex::new(tx),
            send_buffer_bytes,
        });
        shared.flush(shared.lock());
        let mut stream = StpStream {
            shared,
            pumps: Vec::new(),
            timer: None,
        };
        // On a spawn failure, dropping `stream` stops and joins what runs.
        for (i, rx) in rxs.into_iter().enumerate() {
            let weak = Arc::downgrade(&stream.shared);
            stream.pumps.push(
                thread::Builder::new()
                    .name(format!("stp-pump-{}.{i}", binding.port))
                    .spawn(move || pump(weak, rx))?,
            );
        }
        let weak = Arc::downgrade(&stream.shared);
        stream.timer = Some(
            thread::Builder::new()
                .name(format!("stp-timer-{}", binding.port))
                .spawn(move || timers(weak))?,
        );
        Ok(stream)
    }

    /// Connects to `port` on the STG, authenticating frames with `key`.
    pub fn connect(
        source: Arc<dyn PathSource>,
        port: u32,
        key: FrameKey,
        config: Config,
        timeout: Duration,
    ) -> io::Result<StpStream> {
        let mut tx = source.open().map_err(mb_err)?;
        let binding = tx.bind(None).map_err(mb_err)?;
        let buffer = config.send_buffer_bytes;
        let conn = Connection::connect(
            fit(config),
            Instant::now(),
            binding.port,
            port,
            rand::rngs::OsRng.next_u64(),
            nonce(),
        );
        let stream = StpStream::start(source.as_ref(), conn, binding, key, tx, buffer)?;
        stream.wait_for(
            "STP connection not established (is anyone listening on the port, with the same key?)",
            timeout,
            |c| c.state() != State::SynSent,
        )?;
        Ok(stream)
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
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} within {timeout:?}"),
                ));
            }
            inner = self
                .shared
                .changed
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
}

impl Read for StpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut inner = self.shared.lock();
        loop {
            match inner.conn.read(buf) {
                Ok(n) => {
                    // Reading opened the window: let the peer know.
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
                .changed
                .wait_timeout(inner, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Write for StpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut inner = self.shared.lock();
        loop {
            if let Some(e) = &inner.failed {
                return Err(conn_err(e));
            }
            match inner.conn.write(buf) {
                Ok(0) => {}
                Ok(n) => {
                    self.shared.flush(inner);
                    return Ok(n);
                }
                Err(e) => return Err(conn_err(&e)),
            }
            inner = self
                .shared
                .changed
                .wait_timeout(inner, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Wait until everything written is acknowledged (the send buffer
        // is empty again).
        let cap = self.shared.send_buffer_bytes;
        self.wait_for(
            "the peer did not acknowledge the written data",
            Duration::from_secs(300),
            |c| c.send_buffer_free() >= cap,
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
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for t in self.timer.take().into_iter().chain(self.pumps.drain(..)) {
            let _ = t.join();
        }
        let _ = self
            .shared
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(&self.shared.binding);
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
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no STP connection on port {} within {timeout:?}",
                        self.binding.port
                    ),
                ));
            }
            let buf =
                match self
                    .mailbox
                    .receive(&self.binding, RECV_BYTES, (deadline - now).min(POLL))
                {
                    Ok(buf) => buf,
                    Err(e) if e.binding_lost() => return Err(mb_err(e)),
                    // Transient trouble on the path: poll again.
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
            for found in Frames::new(&buf) {
                let Ok(found) = found else { break };
                let Ok((header, payload)) = open(found.bytes(&buf), &self.key) else {
                    continue;
                };
                if header.kind != Kind::SYN {
                    continue;
                }
                if self.redeliver(&header, payload) {
                    continue;
                }
                return self.accept_syn(&header, payload);
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

    fn accept_syn(&mut self, syn: &Header, payload: &[u8]) -> io::Result<StpStream> {
        let mut tx = self.source.open().map_err(mb_err)?;
        let binding = tx.bind(None).map_err(mb_err)?;
        let conn = Connection::accept(
            fit(self.config.clone()),
            Instant::now(),
            syn,
            payload,
            binding.port,
            nonce(),
        )
        .map_err(|e| conn_err(&e))?;
        let buffer = self.config.send_buffer_bytes;
        let stream = StpStream::start(
            self.source.as_ref(),
            conn,
            binding,
            self.key.clone(),
            tx,
            buffer,
        )?;
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
