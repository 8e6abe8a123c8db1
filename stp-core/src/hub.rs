//! The receive side of streams: one binding per host and STG, shared by
//! every connection (docs/PROTOCOL.md §3.2).
//!
//! A [`Hub`] holds one binding at the array and the **receive pumps** that
//! long-poll RECEIVE on it: one to start with, more while frames keep
//! coming, up to one per member path ([`Mailbox::receive_parallelism`]),
//! and the extra ones stop again after 2 s without a frame. Each connection
//! has a port of its own in that binding (BIND with `ADD`) and registers
//! it here with its connection id; a pump walks what a RECEIVE returned,
//! hands each frame to the connection its destination port and connection
//! id name ([`Endpoint`]: the connection opens its frames in place, outside
//! any lock, and takes them into its reassembly buffer), and at once
//! long-polls again. A slow reader therefore never holds up the queue: its
//! frames leave the array at once and wait in its own reassembly buffer,
//! which the credit it advertised bounds (§6.3); what lies beyond that
//! credit the connection drops, and a frame for no live connection the hub
//! drops (`counters::recv_dropped_no_connection`); the sender's
//! retransmission covers both.
//!
//! The process keeps one hub per source of mailboxes ([`PathSource`], one
//! per host and STG), created by the first connection and released with
//! the last ([`attach`]). Where the array refuses BIND's `ADD` flag (an
//! array of before §3.2) or the mailbox has no shared bindings (block
//! mode), each connection gets a *private* hub over a binding of its own
//! ([`Hub::private`]): the same pumps, serving one port, as before §3.2.
//!
//! When the array loses the binding (it restarted: a RECEIVE answers
//! 80h/02h or 80h/09h), the pump marks the hub lost and tells every
//! connection ([`Endpoint::binding_lost`]); each binds its port again by
//! number on a private hub of its own (docs/PROTOCOL.md §6.7,
//! `stream::rebind`), and the host's next new connection makes a new hub.

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use scsi::pool::BufPool;
use scsi::{Asc, CommandError, IoBuf, SenseKey};

use crate::chunk::RecvBuf;
use crate::counters::bump;
use crate::error::{MailboxError, Refusal};
use crate::mailbox::{Binding, Lent, Mailbox};
use crate::stream::{PathSource, MAX_TRANSFER};
use crate::wire::{Frames, Header, WireError, HEADER_LEN};

/// The longest a pump waits in one RECEIVE.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// RECEIVE allocation while data flows.
const RECV_BYTES: usize = MAX_TRANSFER;
/// RECEIVE allocation of an idle pump: an idle hub keeps its held RECEIVE
/// small. The first frame too large for it ends the RECEIVE at once
/// (80h/07h) and the pump asks again with [`RECV_BYTES`].
const IDLE_RECV_BYTES: usize = 16 * 1024;
/// What the send buffers of a hub's connections may hold together: the
/// buffers in flight are pooled DMA buffers, and the pool keeps 64 MiB
/// (`BufPool::global`). Beyond that, every frame would be sealed in fresh
/// pages (page faults and zeroing: two thirds of the process's CPU at 64
/// connections of 4 MiB each).
pub(crate) const SEND_BUDGET: usize = 64 << 20;
/// The least share of [`SEND_BUDGET`] a connection gets, however many
/// there are: two frames of the default size in flight.
pub(crate) const MIN_SEND_SHARE: usize = 512 << 10;

/// Empty long polls (of [`POLL`]) after which a pump counts as idle.
const IDLE_POLLS: u32 = 10;
/// Empty long polls after which an extra pump (not the hub's first) stops:
/// an idle hub keeps one RECEIVE at the array.
const SPARE_PUMP_POLLS: u32 = 20;

/// Payload bytes and their frame: an authentic frame's header and where
/// its payload lies in the RECEIVE buffer.
pub(crate) type Opened = (Header, Range<usize>);

/// A frame's place among a RECEIVE's buffers: (buffer, offset).
type At = (usize, usize);

/// An opened frame and the index of the buffer it lies in.
type InBuf = (usize, Opened);

/// A RECEIVE buffer shared by the chunks of every connection it carried.
pub(crate) type Shared = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// One connection, as its hub sees it.
pub(crate) trait Endpoint: Send + Sync {
    /// Opens (decrypts or verifies) the frames at `at`, offsets into
    /// `buf`, in place; returns the authentic ones. Called outside any
    /// lock of the hub.
    fn open(&self, buf: &mut [u8], at: &[usize]) -> Vec<Opened>;
    /// Takes opened frames, in the order received, each with the buffer
    /// its payload lies in.
    fn deliver(&self, opened: Vec<(Shared, Opened)>);
    /// The connection's share of the hub's send budget
    /// ([`SEND_BUDGET`]): its send buffer is this or its configured size,
    /// whichever is smaller.
    fn share_send_buffer(&self, bytes: usize);
    /// The binding is gone (the array restarted, or released it): the
    /// connection binds its port again (docs/PROTOCOL.md §6.7), or fails.
    fn binding_lost(self: Arc<Self>);
    /// A frame of protocol version `v` (not this one's) arrived for it.
    fn foreign_version(&self, v: u8);
}

/// A registered port.
struct Entry {
    conn_id: u64,
    endpoint: Weak<dyn Endpoint>,
}

/// One binding and its receive pumps (see the module docs).
pub(crate) struct Hub {
    source: Arc<dyn PathSource>,
    /// The binding the pumps RECEIVE on.
    binding: Binding,
    /// Shared: ports are added to the binding and released one by one
    /// through `ctl`, and the binding is released when the hub goes.
    /// Private: the binding is its one connection's, which releases it.
    ctl: Option<Mutex<Box<dyn Mailbox>>>,
    /// Destination port → the connection behind it.
    endpoints: RwLock<HashMap<u32, Entry>>,
    pool: Arc<BufPool>,
    stop: AtomicBool,
    /// The binding was lost: no new ports (a new hub takes over).
    lost: AtomicBool,
    pumps_running: AtomicUsize,
    pumps_max: usize,
    pump_threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("port", &self.binding.port)
            .field("shared", &self.ctl.is_some())
            .field("pumps", &self.pumps_running.load(Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    fn new(
        source: Arc<dyn PathSource>,
        binding: Binding,
        ctl: Option<Mutex<Box<dyn Mailbox>>>,
        rx: Box<dyn Mailbox>,
    ) -> io::Result<Arc<Hub>> {
        let hub = Arc::new(Hub {
            source,
            binding,
            ctl,
            endpoints: RwLock::new(HashMap::new()),
            pool: BufPool::global().clone(),
            stop: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            pumps_running: AtomicUsize::new(1),
            pumps_max: rx.receive_parallelism().max(1),
            pump_threads: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&hub);
        let pool = hub.pool.clone();
        let t = thread::Builder::new()
            .name(format!("stp-pump-{}.0", binding.port))
            .spawn(move || pump(weak, rx, pool))?;
        lock(&hub.pump_threads).push(t);
        Ok(hub)
    }

    /// A hub over one connection's own `binding` (no shared bindings),
    /// its first pump receiving through `rx`. The connection releases the
    /// binding: [`Hub::stop`], release, [`Hub::join`].
    pub(crate) fn private(
        source: Arc<dyn PathSource>,
        binding: Binding,
        rx: Box<dyn Mailbox>,
    ) -> io::Result<Arc<Hub>> {
        Hub::new(source, binding, None, rx)
    }

    /// Whether the hub's binding is shared by several connections.
    pub(crate) fn is_shared(&self) -> bool {
        self.ctl.is_some()
    }

    /// Frames for `port` carrying `conn_id` go to `endpoint` from now on.
    pub(crate) fn register(&self, port: u32, conn_id: u64, endpoint: Weak<dyn Endpoint>) {
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port, Entry { conn_id, endpoint });
        self.share_send_budget();
    }

    /// Frames for `port` are dropped from now on.
    pub(crate) fn unregister(&self, port: u32) {
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port);
        self.share_send_budget();
    }

    /// Gives every connection its share of [`SEND_BUDGET`], at least
    /// [`MIN_SEND_SHARE`]: up to 16 connections of the default 4 MiB keep
    /// it whole; beyond, the buffers shrink so that the frames in flight
    /// stay in pooled memory. Called with no lock of the hub held.
    fn share_send_budget(&self) {
        let live = self.live();
        let share = (SEND_BUDGET / live.len().max(1)).max(MIN_SEND_SHARE);
        for ep in live {
            ep.share_send_buffer(share);
        }
    }

    /// Adds a port to a shared hub's binding (BIND with `ADD`).
    fn add_port(&self) -> Result<Binding, MailboxError> {
        let Some(ctl) = &self.ctl else {
            return Err(MailboxError::Refused(Refusal::BadHandle));
        };
        match lock(ctl).bind_add(&self.binding) {
            Some(r) => r,
            None => Err(MailboxError::Refused(Refusal::BadHandle)),
        }
    }

    /// Unregisters a port of a shared hub and releases it at the array.
    pub(crate) fn remove_port(&self, port: &Binding) {
        self.unregister(port.port);
        if let Some(ctl) = &self.ctl {
            if !self.lost.load(Relaxed) {
                let _ = lock(ctl).release(port);
            }
        }
    }

    /// Tells the pumps to stop after their RECEIVE in flight.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Waits for the pumps (not the calling thread, if it is one).
    pub(crate) fn join(&self) {
        let threads = std::mem::take(&mut *lock(&self.pump_threads));
        let me = thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }

    /// Whether the hub's binding is gone (the array lost it).
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Relaxed)
    }

    /// The source of mailboxes the hub's binding is on.
    pub(crate) fn source(&self) -> Arc<dyn PathSource> {
        Arc::clone(&self.source)
    }

    /// Starts one more pump if fewer than [`Mailbox::receive_parallelism`]
    /// run (busy); quietly does nothing when it cannot.
    fn more_pumps(self: &Arc<Self>) {
        let n = self.pumps_running.load(Relaxed);
        if n >= self.pumps_max || self.stop.load(Relaxed) {
            return;
        }
        if self
            .pumps_running
            .compare_exchange(n, n + 1, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        let started = self.source.open().ok().and_then(|rx| {
            let weak = Arc::downgrade(self);
            let pool = self.pool.clone();
            thread::Builder::new()
                .name(format!("stp-pump-{}.{n}", self.binding.port))
                .spawn(move || pump(weak, rx, pool))
                .ok()
        });
        match started {
            Some(t) => lock(&self.pump_threads).push(t),
            None => {
                self.pumps_running.fetch_sub(1, Relaxed);
            }
        }
    }

    /// An idle pump may stop if it is not the last one.
    fn spare_pump_may_stop(&self) -> bool {
        let mut n = self.pumps_running.load(Relaxed);
        while n > 1 {
            match self
                .pumps_running
                .compare_exchange(n, n - 1, Relaxed, Relaxed)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
        false
    }

    /// Hands the frames of one RECEIVE, packed in `buf`, to their
    /// connections ([`hand_over`](Self::hand_over)). Returns the buffer
    /// when no frame was taken (for the next RECEIVE).
    fn dispatch(&self, buf: IoBuf) -> Option<IoBuf> {
        let mut found = Vec::new();
        for f in Frames::new(&buf) {
            match f {
                Ok(f) => found.push((0, f.offset, f.header)),
                Err((at, WireError::BadVersion(v))) => {
                    // Every version keeps `dst_port` at bytes 12–15.
                    let dst = buf
                        .get(at + 12..at + 16)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    let endpoints = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
                    if let Some(ep) = dst
                        .and_then(|p| endpoints.get(&p))
                        .and_then(|e| e.endpoint.upgrade())
                    {
                        ep.foreign_version(v);
                    }
                    break;
                }
                Err(_) => break,
            }
        }
        self.hand_over(vec![buf], &found).pop()
    }

    /// Hands frames a mailbox lent ([`Lent`]: the buffers it read them
    /// into) to their connections, without copying them. Buffers no
    /// delivered frame lies in go back to the pool.
    fn dispatch_lent(&self, lent: Lent) {
        let Lent { bufs, frames } = lent;
        let mut found = Vec::with_capacity(frames.len());
        for (b, range) in frames {
            // The mailbox parsed these already; a range that does not hold
            // a frame is dropped, never trusted.
            let parsed = bufs
                .get(b)
                .and_then(|buf| buf.get(range.clone()))
                .and_then(|bytes| Header::parse(bytes).ok());
            match parsed {
                Some(h) if HEADER_LEN + h.payload_len as usize <= range.len() => {
                    found.push((b, range.start, h))
                }
                _ => {
                    bump!(recv_dropped_no_connection, 1);
                }
            }
        }
        for unused in self.hand_over(bufs, &found) {
            self.pool.put(unused);
        }
    }

    /// Hands `frames` — (buffer, offset, header), in the order received —
    /// to the connections their destination port and connection id name:
    /// each connection opens its frames in place outside every lock of the
    /// hub, then takes the authentic ones, in order. Returns the buffers no
    /// delivered frame lies in (in their order).
    fn hand_over(&self, mut bufs: Vec<IoBuf>, frames: &[(usize, usize, Header)]) -> Vec<IoBuf> {
        // (port, connection, its frames as (buffer, offset))
        let mut groups: Vec<(u32, Arc<dyn Endpoint>, Vec<At>)> = Vec::new();
        let mut dropped = 0u64;
        {
            let endpoints = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
            for &(b, offset, header) in frames {
                let port = header.dst_port;
                let live = endpoints.get(&port).filter(|e| e.conn_id == header.conn_id);
                if let Some(g) = groups.iter_mut().find(|g| g.0 == port) {
                    match live {
                        Some(_) => g.2.push((b, offset)),
                        None => dropped += 1,
                    }
                    continue;
                }
                match live.and_then(|e| e.endpoint.upgrade()) {
                    Some(ep) => groups.push((port, ep, vec![(b, offset)])),
                    None => dropped += 1,
                }
            }
        }
        if dropped > 0 {
            bump!(recv_dropped_no_connection, dropped);
        }
        // Each connection opens its frames, a run of one buffer at a time.
        let mut opened: Vec<(Arc<dyn Endpoint>, Vec<InBuf>)> = Vec::new();
        let mut used = vec![false; bufs.len()];
        for (_, ep, at) in groups {
            let mut mine = Vec::new();
            for run in at.chunk_by(|x, y| x.0 == y.0) {
                let b = run[0].0;
                let offsets: Vec<usize> = run.iter().map(|x| x.1).collect();
                let o = ep.open(&mut bufs[b], &offsets);
                used[b] |= !o.is_empty();
                mine.extend(o.into_iter().map(|o| (b, o)));
            }
            if !mine.is_empty() {
                opened.push((ep, mine));
            }
        }
        let mut unused = Vec::new();
        let shared: Vec<Option<Shared>> = bufs
            .into_iter()
            .zip(used)
            .map(|(buf, used)| {
                if used {
                    let s: Shared = Arc::new(RecvBuf::new(buf, Some(self.pool.clone())));
                    Some(s)
                } else {
                    unused.push(buf);
                    None
                }
            })
            .collect();
        for (ep, o) in opened {
            let o = o
                .into_iter()
                .filter_map(|(b, o)| Some((shared[b].clone()?, o)))
                .collect();
            ep.deliver(o);
        }
        unused
    }

    /// The binding is gone: every connection on it binds its port again
    /// (docs/PROTOCOL.md §6.7) or fails.
    fn fail_all(&self) {
        self.lost.store(true, Relaxed);
        for ep in self.live() {
            ep.binding_lost();
        }
    }

    /// The connections registered now (those not yet dropped).
    fn live(&self) -> Vec<Arc<dyn Endpoint>> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|e| e.endpoint.upgrade())
            .collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
        // A lost binding's handle is not released: the array may have
        // issued it again since, to another binding.
        if let (Some(ctl), false) = (&self.ctl, self.is_lost()) {
            // Ends the held RECEIVEs at once (80h/09h): the pumps see
            // `stop` and return.
            let _ = lock(ctl).release(&self.binding);
        }
        self.join();
    }
}

/// A receive pump: long-polls RECEIVE into pooled buffers, or takes the
/// buffers a mailbox lends ([`Mailbox::receive_lent`]), and hands what
/// arrives to the connections ([`Hub::dispatch`], [`Hub::dispatch_lent`]). Every poll is a full
/// [`POLL`] (the wire's long-poll unit is 100 ms; a shorter wait would be
/// a zero-wait spin).
fn pump(hub: Weak<Hub>, mut rx: Box<dyn Mailbox>, pool: Arc<BufPool>) {
    let mut want = IDLE_RECV_BYTES;
    let mut quiet = 0;
    let mut failures: u32 = 0;
    let mut buf = pool.get(want);
    let mut lent = Lent::default();
    loop {
        let Some(h) = hub.upgrade() else { return };
        if h.stop.load(Relaxed) {
            return;
        }
        let binding = h.binding;
        drop(h); // do not keep the hub alive across a long poll
        let got = rx.receive_lent(&binding, &mut buf, &mut lent, want, POLL);
        let got_ok = got.is_ok();
        let Some(h) = hub.upgrade() else { return };
        if h.stop.load(Relaxed) {
            pool.put(std::mem::take(&mut buf));
            for b in std::mem::take(&mut lent).bufs {
                pool.put(b);
            }
            return;
        }
        match got {
            Ok(()) if !lent.bufs.is_empty() => {
                quiet = 0;
                let bytes: usize = lent.frames.iter().map(|f| f.1.len()).sum();
                if bytes > want / 2 {
                    want = RECV_BYTES;
                    h.more_pumps();
                }
                h.dispatch_lent(std::mem::take(&mut lent));
            }
            Ok(()) if !buf.is_empty() => {
                quiet = 0;
                if buf.len() > want / 2 {
                    // Busy: a bigger RECEIVE, and one more pump (up to one
                    // per member path) so receiving keeps pace.
                    want = RECV_BYTES;
                    h.more_pumps();
                }
                let full = std::mem::take(&mut buf);
                match h.dispatch(full) {
                    Some(back) => buf = back,
                    None => buf = pool.get(want),
                }
            }
            Ok(()) => {
                quiet += 1;
                if quiet >= IDLE_POLLS {
                    want = IDLE_RECV_BYTES;
                }
                if quiet >= SPARE_PUMP_POLLS && h.spare_pump_may_stop() {
                    pool.put(std::mem::take(&mut buf));
                    return;
                }
            }
            Err(MailboxError::Refused(Refusal::FrameTooLarge { .. })) => want = RECV_BYTES,
            Err(e) if e.binding_lost() => {
                h.fail_all();
                pool.put(std::mem::take(&mut buf));
                return;
            }
            Err(e) => {
                failures += 1;
                // The first failure, then the 2nd, 4th, 8th…: a dead path
                // must not flood the log.
                if failures.is_power_of_two() {
                    tracing::warn!(
                        port = binding.port,
                        failures,
                        "a RECEIVE failed ({e}); polling again in {:?}",
                        crate::retry::POLL_PAUSE
                    );
                }
                thread::sleep(crate::retry::POLL_PAUSE)
            }
        }
        if got_ok {
            failures = 0;
        }
        if buf.capacity() < want || buf.capacity() > want.max(RECV_BYTES) {
            pool.put(std::mem::take(&mut buf));
            buf = pool.get(want);
        } else if buf.capacity() > want && quiet == IDLE_POLLS {
            // Gone idle: give the large buffer back.
            pool.put(std::mem::take(&mut buf));
            buf = pool.get(want);
        }
    }
}

/// What [`attach`] gave a new connection.
pub(crate) enum Attached {
    /// A port of the host's shared binding for this STG.
    Shared {
        /// The hub (the connection keeps it alive).
        hub: Arc<Hub>,
        /// The connection's port in it.
        port: Binding,
    },
    /// No shared bindings here: bind a port of its own
    /// ([`Hub::private`]).
    Unshared,
}

/// What the process knows of one source of mailboxes.
enum Known {
    /// Its hub, while a connection holds it.
    Hub(Weak<Hub>),
    /// It has no shared bindings (block mode, or an array of before §3.2).
    Unshared,
}

/// Hubs by source. A source is named by its address, and the slot keeps a
/// `Weak` of it, so the address is not reused while the slot lives; slots
/// of dropped sources are swept on every call.
static HUBS: Mutex<Vec<(Weak<dyn PathSource>, Known)>> = Mutex::new(Vec::new());

fn same(a: &Weak<dyn PathSource>, b: &Arc<dyn PathSource>) -> bool {
    std::ptr::addr_eq(a.as_ptr(), Arc::as_ptr(b))
}

/// Whether `e` is how an array of before docs/PROTOCOL.md §3.2 answers
/// BIND's `ADD` flag: ILLEGAL REQUEST, INVALID FIELD IN CDB.
fn refuses_add(e: &MailboxError) -> bool {
    matches!(e, MailboxError::Transport(CommandError::CheckCondition(s))
        if s.key == SenseKey::ILLEGAL_REQUEST && s.asc == Asc::INVALID_FIELD_IN_CDB)
}

/// A port for a new connection on `source`'s STG: in the host's shared
/// binding (made by the first connection, with its first pump), or
/// [`Attached::Unshared`] where there are no shared bindings. An array
/// that refuses BIND's `ADD` flag is remembered for the source, and said
/// once in the log.
pub(crate) fn attach(source: &Arc<dyn PathSource>) -> Result<Attached, MailboxError> {
    let mut hubs = lock(&HUBS);
    hubs.retain(|(s, _)| s.strong_count() > 0);
    let at = hubs.iter().position(|(s, _)| same(s, source));
    if let Some(i) = at {
        match &hubs[i].1 {
            Known::Unshared => return Ok(Attached::Unshared),
            Known::Hub(w) => {
                if let Some(hub) = w.upgrade().filter(|h| !h.is_lost()) {
                    drop(hubs);
                    match hub.add_port() {
                        Ok(port) => return Ok(Attached::Shared { hub, port }),
                        // Lost since (array restarted): a new hub below.
                        Err(e) if e.binding_lost() => {
                            hub.lost.store(true, Relaxed);
                            hubs = lock(&HUBS);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    // A new hub: its binding and the caller's port, then its first pump.
    let mut ctl = source.open()?;
    if !ctl.shares_bindings() {
        remember(&mut hubs, source, Known::Unshared);
        return Ok(Attached::Unshared);
    }
    let binding = ctl.bind(None)?;
    let port = match ctl.bind_add(&binding) {
        Some(Ok(port)) => port,
        Some(Err(e)) if refuses_add(&e) => {
            tracing::warn!(
                "the array refuses BIND's ADD flag ({e}): it predates shared bindings \
                 (docs/PROTOCOL.md §3.2), so each connection on this STG binds a port of its \
                 own and runs its own receive pumps"
            );
            let _ = ctl.release(&binding);
            remember(&mut hubs, source, Known::Unshared);
            return Ok(Attached::Unshared);
        }
        other => {
            let _ = ctl.release(&binding);
            return match other {
                Some(Err(e)) => Err(e),
                _ => Ok(Attached::Unshared),
            };
        }
    };
    let rx = match source.open() {
        Ok(rx) => rx,
        Err(e) => {
            let _ = ctl.release(&binding); // and the port with it
            return Err(e);
        }
    };
    // On a failure to start its pump the hub is dropped, which releases
    // the binding (and the port with it).
    let hub = Hub::new(Arc::clone(source), binding, Some(Mutex::new(ctl)), rx)
        .map_err(|e| MailboxError::Transport(CommandError::Io(e)))?;
    remember(&mut hubs, source, Known::Hub(Arc::downgrade(&hub)));
    Ok(Attached::Shared { hub, port })
}

fn remember(hubs: &mut Vec<(Weak<dyn PathSource>, Known)>, source: &Arc<dyn PathSource>, k: Known) {
    match hubs.iter_mut().find(|(s, _)| same(s, source)) {
        Some(slot) => slot.1 = k,
        None => hubs.push((Arc::downgrade(source), k)),
    }
}
