//! One socket API over two transports, routed by descriptor value: the
//! seed's *SSLConnect* layer (Fig. 3, element 54).
//!
//! A [`SocketLayer`] owns a descriptor table. [`SocketLayer::socket`] hands
//! out TCP descriptors below [`STP_FD_BASE`] and STP descriptors at or above
//! it, and every later call decides which mechanism serves it from the
//! descriptor's value alone ([`Fd::mechanism`]), as the seed describes: the
//! layer "is pre-set to make a determination as to the type of socket call
//! based on the value of the file descriptor". TCP descriptors are served by
//! `std::net`; STP descriptors by [`StpListener`] / [`StpStream`] over the
//! STG the socket was created on.
//!
//! The verbs follow BSD sockets: `socket`, `bind`, `listen`, `getsockname`,
//! `connect`, `accept`, `send`, `recv`, `close`, plus `set_key` for the
//! per-connection frame key an STP socket needs before it listens or
//! connects (docs/PROTOCOL.md §7; [`crate::flows`] agrees one over TCP).
//!
//! Differences from BSD sockets, forced by the layers underneath:
//!
//! * TCP `bind` binds *and* opens the listening socket at once (`std::net`
//!   has no separate bind), so a bound TCP socket can only `listen`; connect
//!   from an unbound socket (the local port is then ephemeral).
//! * An STP `bind` only records the port; the port is bound on the array at
//!   `listen`, so `getsockname` of a dynamically bound STP socket answers
//!   after `listen`. An STP `connect` always sends from a fresh dynamic port
//!   (docs/PROTOCOL.md §6.1).
//! * TCP reads and writes honour [`SocketLayer::set_read_timeout`] /
//!   [`SocketLayer::set_write_timeout`]. STP streams have no read timeout: a
//!   `recv` ends when data arrives, the peer closes, or the connection fails
//!   (the peer is declared dead after [`Config::idle_timeout`]).
//! * Calls on one descriptor are serialized, except that a TCP `send` and a
//!   TCP `recv` may run at the same time from two threads. An STP `recv`
//!   that waits blocks other calls on the same STP descriptor.
//!
//! The layer is `Send + Sync`; share it between threads behind an `Arc`.
//! Users who do not want descriptors can use [`StpListener`] and
//! [`StpStream`] (re-exported here) directly.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::auth::FrameKey;
use crate::conn::Config;
pub use crate::stream::{PathSource, StpListener, StpStream};

/// The first STP descriptor. Descriptors below it are TCP sockets, those at
/// or above it STP sockets; the value alone decides the mechanism.
pub const STP_FD_BASE: i32 = 1 << 20;

/// The first TCP descriptor handed out (0–2 look like standard streams).
const TCP_FD_FIRST: i32 = 3;

/// Highest port number either mechanism accepts (STP ports above it are
/// reserved, docs/PROTOCOL.md §1).
const MAX_PORT: u32 = 65_535;

/// Connect timeout of [`SocketLayer::connect`] unless configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a TCP accept with a timeout polls its listener.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Payload bytes a socket (or a whole layer) has moved, by mechanism and
/// direction: what `send` handed over and `recv` returned, counted where
/// the bytes cross the layer. TCP counts exclude the kernel's IP and TCP
/// headers, STP counts exclude frame headers and retransmissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes sent on TCP sockets.
    pub tcp_sent: u64,
    /// Bytes received on TCP sockets.
    pub tcp_received: u64,
    /// Bytes sent on STP sockets.
    pub stp_sent: u64,
    /// Bytes received on STP sockets.
    pub stp_received: u64,
}

impl Traffic {
    /// TCP bytes, both directions.
    pub fn tcp(&self) -> u64 {
        self.tcp_sent.saturating_add(self.tcp_received)
    }

    /// STP bytes, both directions.
    pub fn stp(&self) -> u64 {
        self.stp_sent.saturating_add(self.stp_received)
    }

    /// What moved since `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            tcp_sent: self.tcp_sent.saturating_sub(earlier.tcp_sent),
            tcp_received: self.tcp_received.saturating_sub(earlier.tcp_received),
            stp_sent: self.stp_sent.saturating_sub(earlier.stp_sent),
            stp_received: self.stp_received.saturating_sub(earlier.stp_received),
        }
    }
}

/// A pair of byte counters (sent, received).
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

impl Counters {
    fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// A socket descriptor of a [`SocketLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fd(pub i32);

impl Fd {
    /// Which mechanism serves this descriptor, decided from its value alone
    /// (the seed's routing rule): at or above [`STP_FD_BASE`] STP, below it
    /// TCP. Says nothing about whether the descriptor is open.
    pub fn mechanism(self) -> Mechanism {
        if self.0 >= STP_FD_BASE {
            Mechanism::Stp
        } else {
            Mechanism::Tcp
        }
    }
}

impl fmt::Display for Fd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What kind of socket [`SocketLayer::socket`] creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A TCP socket on the LAN (the seed's `AF_INET`, `SOCK_STREAM`).
    Tcp,
    /// An STP socket through the storage array (the seed's `STPsocket`).
    Stp {
        /// The STG whose ports the socket binds and connects to.
        stg: u32,
    },
}

/// The communication mechanism serving a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mechanism {
    /// TCP over the LAN.
    Tcp,
    /// STP through the shared storage array.
    Stp,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::Tcp => "TCP",
            Mechanism::Stp => "STP",
        })
    }
}

/// A peer address for [`SocketLayer::connect`], or a peer's address from
/// [`SocketLayer::peer_addr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A TCP endpoint.
    Tcp(SocketAddr),
    /// A port on the STG of the STP socket.
    Stp(u32),
}

impl Address {
    fn mechanism(&self) -> Mechanism {
        match self {
            Address::Tcp(_) => Mechanism::Tcp,
            Address::Stp(_) => Mechanism::Stp,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "TCP address {a}"),
            Address::Stp(p) => write!(f, "STP port {p}"),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        Address::Tcp(a)
    }
}

/// Why a socket call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SockError {
    /// No socket with this descriptor is open in this layer (never opened,
    /// or closed).
    #[error("descriptor {fd} is not an open socket of this layer (never opened, or closed)")]
    BadDescriptor {
        /// The descriptor.
        fd: Fd,
    },
    /// The socket is in a state the call does not apply to.
    #[error("{op} on descriptor {fd}: the socket is {state}, but {op} needs {need}")]
    WrongState {
        /// The descriptor.
        fd: Fd,
        /// The call.
        op: &'static str,
        /// The socket's state.
        state: &'static str,
        /// What the call needs.
        need: &'static str,
    },
    /// The call or address belongs to the other mechanism than the one the
    /// descriptor's value selects.
    #[error(
        "{op} on descriptor {fd}: it is a {mechanism} socket (STP descriptors are \
         {STP_FD_BASE} and above, TCP ones below), but {detail}"
    )]
    WrongMechanism {
        /// The descriptor.
        fd: Fd,
        /// The mechanism its value selects.
        mechanism: Mechanism,
        /// The call.
        op: &'static str,
        /// What did not fit.
        detail: String,
    },
    /// An STP socket was asked for on an STG this layer has no paths to.
    #[error(
        "no paths to STG {stg} on this host (known STGs: {known:?}); \
         add it to the socket layer's STG map"
    )]
    UnknownStg {
        /// The STG asked for.
        stg: u32,
        /// The STGs the layer knows.
        known: Vec<u32>,
    },
    /// An STP socket has no frame key yet.
    #[error(
        "{op} on STP descriptor {fd}: no frame key; agree one with the peer over the \
         control connection (auth::Handshake, as stp_core::flows does) and call \
         set_key before connect or listen"
    )]
    NoKey {
        /// The descriptor.
        fd: Fd,
        /// The call.
        op: &'static str,
    },
    /// An argument is out of range.
    #[error("{op} on descriptor {fd}: {why}")]
    InvalidArgument {
        /// The descriptor.
        fd: Fd,
        /// The call.
        op: &'static str,
        /// What is wrong.
        why: String,
    },
    /// Every descriptor value of a mechanism is in use.
    #[error("no free {mechanism} descriptor: close some sockets")]
    Exhausted {
        /// The mechanism out of descriptors.
        mechanism: Mechanism,
    },
    /// The transport failed.
    #[error("{op} on {} descriptor {fd}: {source}", fd.mechanism())]
    Io {
        /// The descriptor.
        fd: Fd,
        /// The call.
        op: &'static str,
        /// The transport's error.
        #[source]
        source: io::Error,
    },
}

impl SockError {
    /// True if the error is a timeout (a read timeout, an accept or connect
    /// that waited too long).
    pub fn is_timeout(&self) -> bool {
        matches!(self, SockError::Io { source, .. }
            if matches!(source.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
    }

    /// The I/O error kind, for [`SockError::Io`].
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            SockError::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Descriptors of one mechanism: values in `first..=last`, handed out in
/// increasing order and reused only after wrapping around, so a stale
/// descriptor rarely names a new socket.
struct Table<T> {
    inner: Mutex<TableInner<T>>,
    first: i32,
    last: i32,
    mechanism: Mechanism,
}

struct TableInner<T> {
    map: HashMap<i32, Arc<T>>,
    next: i32,
}

impl<T> Table<T> {
    fn new(first: i32, last: i32, mechanism: Mechanism) -> Table<T> {
        Table {
            inner: Mutex::new(TableInner {
                map: HashMap::new(),
                next: first,
            }),
            first,
            last,
            mechanism,
        }
    }

    fn insert(&self, value: T) -> Result<Fd, SockError> {
        let mut t = lock(&self.inner);
        let span = i64::from(self.last) - i64::from(self.first) + 1;
        if t.map.len() as i64 >= span {
            return Err(SockError::Exhausted {
                mechanism: self.mechanism,
            });
        }
        loop {
            let fd = t.next;
            t.next = if fd >= self.last { self.first } else { fd + 1 };
            if let std::collections::hash_map::Entry::Vacant(e) = t.map.entry(fd) {
                e.insert(Arc::new(value));
                return Ok(Fd(fd));
            }
        }
    }

    fn get(&self, fd: Fd) -> Result<Arc<T>, SockError> {
        lock(&self.inner)
            .map
            .get(&fd.0)
            .cloned()
            .ok_or(SockError::BadDescriptor { fd })
    }

    fn remove(&self, fd: Fd) -> Result<Arc<T>, SockError> {
        lock(&self.inner)
            .map
            .remove(&fd.0)
            .ok_or(SockError::BadDescriptor { fd })
    }

    fn fds(&self) -> Vec<Fd> {
        lock(&self.inner).map.keys().map(|&k| Fd(k)).collect()
    }
}

/// A connected TCP socket: separate locks for the two directions, so one
/// thread may send while another receives.
struct TcpConn {
    rd: Mutex<TcpStream>,
    wr: Mutex<TcpStream>,
    /// For addresses, timeouts and shutdown, which need no lock.
    ctl: TcpStream,
    /// Payload bytes this connection moved.
    bytes: Counters,
}

impl TcpConn {
    fn new(s: TcpStream) -> io::Result<TcpConn> {
        s.set_nodelay(true)?;
        Ok(TcpConn {
            rd: Mutex::new(s.try_clone()?),
            wr: Mutex::new(s.try_clone()?),
            ctl: s,
            bytes: Counters::default(),
        })
    }
}

enum TcpState {
    Fresh,
    /// Bound; `std::net` listens from the moment it binds.
    Bound(Arc<TcpListener>),
    Listening(Arc<TcpListener>),
    Connected(Arc<TcpConn>),
}

impl TcpState {
    fn name(&self) -> &'static str {
        match self {
            TcpState::Fresh => "unbound and unconnected",
            TcpState::Bound(_) => "bound (not listening)",
            TcpState::Listening(_) => "listening",
            TcpState::Connected(_) => "connected",
        }
    }
}

struct TcpSock {
    state: Mutex<TcpState>,
    /// Set by close, so an accept waiting in another thread gives up.
    closed: AtomicBool,
}

enum StpPhase {
    Fresh,
    /// Bound to a port (`None`: a dynamic one), bound on the array at listen.
    Bound(Option<u32>),
    Listening(Box<StpListener>),
    Connected(StpStream),
}

impl StpPhase {
    fn name(&self) -> &'static str {
        match self {
            StpPhase::Fresh => "unbound and unconnected",
            StpPhase::Bound(_) => "bound (not listening)",
            StpPhase::Listening(_) => "listening",
            StpPhase::Connected(_) => "connected",
        }
    }
}

struct StpState {
    key: Option<FrameKey>,
    phase: StpPhase,
}

struct StpSock {
    stg: u32,
    source: Arc<dyn PathSource>,
    state: Mutex<StpState>,
    /// Payload bytes this socket moved.
    bytes: Counters,
}

/// The socket layer: one descriptor table over TCP and STP sockets.
pub struct SocketLayer {
    stgs: HashMap<u32, Arc<dyn PathSource>>,
    config: Config,
    local_ip: IpAddr,
    connect_timeout: Duration,
    tcp: Table<TcpSock>,
    stp: Table<StpSock>,
    /// Payload bytes every TCP socket of the layer moved.
    tcp_bytes: Counters,
    /// Payload bytes every STP socket of the layer moved.
    stp_bytes: Counters,
}

impl fmt::Debug for SocketLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketLayer")
            .field("stgs", &self.stg_ids())
            .field("local_ip", &self.local_ip)
            .field("open", &self.descriptors().len())
            .finish_non_exhaustive()
    }
}

fn io_timeout(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

impl SocketLayer {
    /// A layer whose STP sockets reach the STGs in `stgs` (STG id → paths
    /// onto its members) and run connections with `config`. TCP sockets
    /// bind to 127.0.0.1 unless [`SocketLayer::with_local_ip`] says
    /// otherwise.
    pub fn new(stgs: HashMap<u32, Arc<dyn PathSource>>, config: Config) -> SocketLayer {
        SocketLayer {
            stgs,
            config,
            local_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tcp: Table::new(TCP_FD_FIRST, STP_FD_BASE - 1, Mechanism::Tcp),
            stp: Table::new(STP_FD_BASE, i32::MAX, Mechanism::Stp),
            tcp_bytes: Counters::default(),
            stp_bytes: Counters::default(),
        }
    }

    /// The IP address [`SocketLayer::bind`] binds TCP sockets to.
    pub fn with_local_ip(mut self, ip: IpAddr) -> SocketLayer {
        self.local_ip = ip;
        self
    }

    /// The timeout of [`SocketLayer::connect`] (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> SocketLayer {
        self.connect_timeout = timeout;
        self
    }

    /// The STGs this layer has paths to, ascending.
    pub fn stg_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.stgs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// True if the layer has paths to STG `stg`.
    pub fn has_stg(&self, stg: u32) -> bool {
        self.stgs.contains_key(&stg)
    }

    /// Which mechanism serves `fd`: the routing decision, from the value
    /// alone (see [`Fd::mechanism`]).
    pub fn mechanism(&self, fd: Fd) -> Mechanism {
        fd.mechanism()
    }

    /// True if `fd` is an open socket of this layer.
    pub fn is_open(&self, fd: Fd) -> bool {
        match fd.mechanism() {
            Mechanism::Tcp => self.tcp.get(fd).is_ok(),
            Mechanism::Stp => self.stp.get(fd).is_ok(),
        }
    }

    /// Every open descriptor, ascending.
    pub fn descriptors(&self) -> Vec<Fd> {
        let mut v = self.tcp.fds();
        v.extend(self.stp.fds());
        v.sort_unstable();
        v
    }

    /// Payload bytes every socket of this layer has moved since the layer
    /// was made (closed sockets included). Snapshot it before and after a
    /// session ([`Traffic::since`]) to learn what the session moved, when
    /// the layer runs one session at a time.
    pub fn traffic(&self) -> Traffic {
        let (tcp_sent, tcp_received) = self.tcp_bytes.get();
        let (stp_sent, stp_received) = self.stp_bytes.get();
        Traffic {
            tcp_sent,
            tcp_received,
            stp_sent,
            stp_received,
        }
    }

    /// Payload bytes one open socket has moved (zero for a socket that is
    /// not connected).
    pub fn socket_traffic(&self, fd: Fd) -> Result<Traffic, SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let s = self.tcp.get(fd)?;
                let st = lock(&s.state);
                let (tcp_sent, tcp_received) = match &*st {
                    TcpState::Connected(c) => c.bytes.get(),
                    _ => (0, 0),
                };
                Ok(Traffic {
                    tcp_sent,
                    tcp_received,
                    ..Traffic::default()
                })
            }
            Mechanism::Stp => {
                let (stp_sent, stp_received) = self.stp.get(fd)?.bytes.get();
                Ok(Traffic {
                    stp_sent,
                    stp_received,
                    ..Traffic::default()
                })
            }
        }
    }

    /// Creates a socket (the seed's `socket` / `STPsocket`).
    pub fn socket(&self, domain: Domain) -> Result<Fd, SockError> {
        match domain {
            Domain::Tcp => self.tcp.insert(TcpSock {
                state: Mutex::new(TcpState::Fresh),
                closed: AtomicBool::new(false),
            }),
            Domain::Stp { stg } => {
                let Some(source) = self.stgs.get(&stg) else {
                    return Err(SockError::UnknownStg {
                        stg,
                        known: self.stg_ids(),
                    });
                };
                self.stp.insert(StpSock {
                    stg,
                    source: Arc::clone(source),
                    state: Mutex::new(StpState {
                        key: None,
                        phase: StpPhase::Fresh,
                    }),
                    bytes: Counters::default(),
                })
            }
        }
    }

    /// The STG of an STP socket.
    pub fn stg(&self, fd: Fd) -> Result<u32, SockError> {
        match fd.mechanism() {
            Mechanism::Stp => Ok(self.stp.get(fd)?.stg),
            Mechanism::Tcp => {
                self.tcp.get(fd)?;
                Err(SockError::WrongMechanism {
                    fd,
                    mechanism: Mechanism::Tcp,
                    op: "stg",
                    detail: "only STP sockets belong to an STG".into(),
                })
            }
        }
    }

    /// Binds to `port` (0: a dynamic port). A TCP socket binds on the
    /// layer's local IP and is listening at once; an STP socket's port is
    /// bound on the array at [`SocketLayer::listen`].
    pub fn bind(&self, fd: Fd, port: u32) -> Result<(), SockError> {
        if port > MAX_PORT {
            return Err(SockError::InvalidArgument {
                fd,
                op: "bind",
                why: format!("port {port} is above {MAX_PORT}"),
            });
        }
        match fd.mechanism() {
            Mechanism::Tcp => {
                // Checked above: fits in u16.
                let port = u16::try_from(port).unwrap_or(0);
                self.bind_addr(fd, SocketAddr::new(self.local_ip, port))
            }
            Mechanism::Stp => {
                let s = self.stp.get(fd)?;
                let mut st = lock(&s.state);
                match st.phase {
                    StpPhase::Fresh => {
                        st.phase = StpPhase::Bound((port != 0).then_some(port));
                        Ok(())
                    }
                    ref p => Err(SockError::WrongState {
                        fd,
                        op: "bind",
                        state: p.name(),
                        need: "a fresh socket",
                    }),
                }
            }
        }
    }

    /// Binds a TCP socket to an explicit local address (port 0: dynamic).
    pub fn bind_addr(&self, fd: Fd, addr: SocketAddr) -> Result<(), SockError> {
        let s = self.tcp_sock(fd, "bind_addr", "an STP socket binds a port: use bind")?;
        let mut st = lock(&s.state);
        if !matches!(*st, TcpState::Fresh) {
            return Err(SockError::WrongState {
                fd,
                op: "bind",
                state: st.name(),
                need: "a fresh socket",
            });
        }
        let l = TcpListener::bind(addr).map_err(|source| SockError::Io {
            fd,
            op: "bind",
            source: io::Error::new(source.kind(), format!("binding {addr}: {source}")),
        })?;
        l.set_nonblocking(true).map_err(|source| SockError::Io {
            fd,
            op: "bind",
            source,
        })?;
        *st = TcpState::Bound(Arc::new(l));
        Ok(())
    }

    /// Listens for connections. An unbound socket is bound to a dynamic
    /// port first. An STP socket needs its frame key
    /// ([`SocketLayer::set_key`]) and binds its port on the array here.
    pub fn listen(&self, fd: Fd) -> Result<(), SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let s = self.tcp.get(fd)?;
                if matches!(*lock(&s.state), TcpState::Fresh) {
                    self.bind(fd, 0)?;
                }
                let mut st = lock(&s.state);
                match &*st {
                    TcpState::Bound(l) => {
                        *st = TcpState::Listening(Arc::clone(l));
                        Ok(())
                    }
                    other => Err(SockError::WrongState {
                        fd,
                        op: "listen",
                        state: other.name(),
                        need: "a bound socket",
                    }),
                }
            }
            Mechanism::Stp => {
                let s = self.stp.get(fd)?;
                let mut st = lock(&s.state);
                let port = match st.phase {
                    StpPhase::Fresh => None,
                    StpPhase::Bound(p) => p,
                    ref p => {
                        return Err(SockError::WrongState {
                            fd,
                            op: "listen",
                            state: p.name(),
                            need: "a fresh or bound socket",
                        })
                    }
                };
                let Some(key) = st.key.clone() else {
                    return Err(SockError::NoKey { fd, op: "listen" });
                };
                let l = StpListener::bind(Arc::clone(&s.source), port, key, self.config.clone())
                    .map_err(|source| SockError::Io {
                        fd,
                        op: "listen",
                        source: io::Error::new(
                            source.kind(),
                            format!(
                                "binding port {} on STG {}: {source}",
                                port.unwrap_or(0),
                                s.stg
                            ),
                        ),
                    })?;
                st.phase = StpPhase::Listening(Box::new(l));
                Ok(())
            }
        }
    }

    /// The local port (the seed's `getsockname` / `STPgetsockname`).
    pub fn getsockname(&self, fd: Fd) -> Result<u32, SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let s = self.tcp.get(fd)?;
                let st = lock(&s.state);
                let addr = match &*st {
                    TcpState::Bound(l) | TcpState::Listening(l) => l.local_addr(),
                    TcpState::Connected(c) => c.ctl.local_addr(),
                    TcpState::Fresh => {
                        return Err(SockError::WrongState {
                            fd,
                            op: "getsockname",
                            state: st.name(),
                            need: "a bound or connected socket",
                        })
                    }
                };
                addr.map(|a| u32::from(a.port()))
                    .map_err(|source| SockError::Io {
                        fd,
                        op: "getsockname",
                        source,
                    })
            }
            Mechanism::Stp => {
                let s = self.stp.get(fd)?;
                let st = lock(&s.state);
                match &st.phase {
                    StpPhase::Listening(l) => Ok(l.local_port()),
                    StpPhase::Connected(c) => Ok(c.local_port()),
                    StpPhase::Bound(Some(p)) => Ok(*p),
                    StpPhase::Bound(None) => Err(SockError::WrongState {
                        fd,
                        op: "getsockname",
                        state: "bound to a dynamic port not yet allocated",
                        need:
                            "listen first (STP allocates the dynamic port on the array at listen)",
                    }),
                    p => Err(SockError::WrongState {
                        fd,
                        op: "getsockname",
                        state: p.name(),
                        need: "a bound, listening or connected socket",
                    }),
                }
            }
        }
    }

    /// The address of a connected socket's peer.
    pub fn peer_addr(&self, fd: Fd) -> Result<Address, SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let c = self.tcp_conn(fd, "peer_addr")?;
                c.ctl
                    .peer_addr()
                    .map(Address::Tcp)
                    .map_err(|source| SockError::Io {
                        fd,
                        op: "peer_addr",
                        source,
                    })
            }
            Mechanism::Stp => {
                let s = self.stp.get(fd)?;
                let st = lock(&s.state);
                match &st.phase {
                    StpPhase::Connected(c) => Ok(Address::Stp(c.peer_port())),
                    p => Err(SockError::WrongState {
                        fd,
                        op: "peer_addr",
                        state: p.name(),
                        need: "a connected socket",
                    }),
                }
            }
        }
    }

    /// Sets the frame key of an STP socket (docs/PROTOCOL.md §7); needed
    /// before [`SocketLayer::connect`] or [`SocketLayer::listen`]. Accepted
    /// connections inherit the listener's key.
    pub fn set_key(&self, fd: Fd, key: FrameKey) -> Result<(), SockError> {
        let s = self.stp_sock(fd, "set_key", "TCP sockets carry no frame key")?;
        let mut st = lock(&s.state);
        match st.phase {
            StpPhase::Fresh | StpPhase::Bound(_) => {
                st.key = Some(key);
                Ok(())
            }
            ref p => Err(SockError::WrongState {
                fd,
                op: "set_key",
                state: p.name(),
                need: "a socket that has not listened or connected yet (the key is fixed then)",
            }),
        }
    }

    /// Connects with the layer's connect timeout (see
    /// [`SocketLayer::connect_timeout`]).
    pub fn connect(&self, fd: Fd, addr: Address) -> Result<(), SockError> {
        self.connect_timeout(fd, addr, self.connect_timeout)
    }

    /// Connects to `addr`, waiting at most `timeout`. A TCP socket takes an
    /// [`Address::Tcp`], an STP socket an [`Address::Stp`] port on its STG
    /// and needs its frame key ([`SocketLayer::set_key`]).
    pub fn connect_timeout(
        &self,
        fd: Fd,
        addr: Address,
        timeout: Duration,
    ) -> Result<(), SockError> {
        if addr.mechanism() != fd.mechanism() {
            // Report a bad descriptor before a mismatched address.
            self.check_open(fd)?;
            return Err(SockError::WrongMechanism {
                fd,
                mechanism: fd.mechanism(),
                op: "connect",
                detail: format!("the address is a {addr}"),
            });
        }
        match addr {
            Address::Tcp(sa) => {
                let s = self.tcp.get(fd)?;
                let mut st = lock(&s.state);
                if !matches!(*st, TcpState::Fresh) {
                    return Err(SockError::WrongState {
                        fd,
                        op: "connect",
                        state: st.name(),
                        need: "an unbound, unconnected socket (a bound TCP socket can only listen)",
                    });
                }
                let stream = TcpStream::connect_timeout(&sa, timeout)
                    .and_then(TcpConn::new)
                    .map_err(|source| SockError::Io {
                        fd,
                        op: "connect",
                        source: io::Error::new(source.kind(), format!("to {sa}: {source}")),
                    })?;
                *st = TcpState::Connected(Arc::new(stream));
                Ok(())
            }
            Address::Stp(port) => {
                if port == 0 || port > MAX_PORT {
                    return Err(SockError::InvalidArgument {
                        fd,
                        op: "connect",
                        why: format!("STP port {port} is not a valid address (1..={MAX_PORT})"),
                    });
                }
                let s = self.stp.get(fd)?;
                let mut st = lock(&s.state);
                match st.phase {
                    StpPhase::Fresh | StpPhase::Bound(None) => {}
                    ref p => {
                        return Err(SockError::WrongState {
                            fd,
                            op: "connect",
                            state: p.name(),
                            need: "an unconnected socket, unbound or bound to a dynamic port",
                        })
                    }
                }
                let Some(key) = st.key.clone() else {
                    return Err(SockError::NoKey { fd, op: "connect" });
                };
                let stream = StpStream::connect(
                    Arc::clone(&s.source),
                    port,
                    key,
                    self.config.clone(),
                    timeout,
                )
                .map_err(|source| SockError::Io {
                    fd,
                    op: "connect",
                    source: io::Error::new(
                        source.kind(),
                        format!("to port {port} on STG {}: {source}", s.stg),
                    ),
                })?;
                st.phase = StpPhase::Connected(stream);
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` for a connection on a listening socket and
    /// returns a new descriptor of the same mechanism for it.
    pub fn accept(&self, fd: Fd, timeout: Duration) -> Result<Fd, SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let s = self.tcp.get(fd)?;
                let l = match &*lock(&s.state) {
                    TcpState::Listening(l) => Arc::clone(l),
                    other => {
                        return Err(SockError::WrongState {
                            fd,
                            op: "accept",
                            state: other.name(),
                            need: "a listening socket",
                        })
                    }
                };
                let deadline = Instant::now() + timeout;
                let io = |source| SockError::Io {
                    fd,
                    op: "accept",
                    source,
                };
                let stream = loop {
                    match l.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io(e)),
                    }
                    if s.closed.load(Ordering::Acquire) {
                        return Err(io(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "the listening socket was closed",
                        )));
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
                        return Err(io(io_timeout(format!(
                            "no TCP connection on port {port} within {timeout:?}"
                        ))));
                    }
                    thread::sleep(ACCEPT_POLL.min(deadline - now));
                };
                let conn = stream
                    .set_nonblocking(false)
                    .and_then(|()| TcpConn::new(stream))
                    .map_err(io)?;
                self.tcp.insert(TcpSock {
                    state: Mutex::new(TcpState::Connected(Arc::new(conn))),
                    closed: AtomicBool::new(false),
                })
            }
            Mechanism::Stp => {
                let s = self.stp.get(fd)?;
                let mut st = lock(&s.state);
                let key = st.key.clone();
                let StpPhase::Listening(l) = &mut st.phase else {
                    return Err(SockError::WrongState {
                        fd,
                        op: "accept",
                        state: st.phase.name(),
                        need: "a listening socket",
                    });
                };
                let stream = l.accept(timeout).map_err(|source| SockError::Io {
                    fd,
                    op: "accept",
                    source,
                })?;
                drop(st);
                self.stp.insert(StpSock {
                    stg: s.stg,
                    source: Arc::clone(&s.source),
                    state: Mutex::new(StpState {
                        key,
                        phase: StpPhase::Connected(stream),
                    }),
                    bytes: Counters::default(),
                })
            }
        }
    }

    /// Sends bytes on a connected socket; returns how many were taken
    /// (possibly fewer than `buf.len()`; see [`SocketLayer::send_all`]).
    pub fn send(&self, fd: Fd, buf: &[u8]) -> Result<usize, SockError> {
        let io = |source| SockError::Io {
            fd,
            op: "send",
            source,
        };
        match fd.mechanism() {
            Mechanism::Tcp => {
                let c = self.tcp_conn(fd, "send")?;
                let mut w = lock(&c.wr);
                let n = w.write(buf).map_err(io)?;
                c.bytes.sent(n);
                self.tcp_bytes.sent(n);
                Ok(n)
            }
            Mechanism::Stp => {
                let (n, sock) = self.with_stp_sock(fd, "send", |s| s.write(buf).map_err(io))?;
                sock.bytes.sent(n);
                self.stp_bytes.sent(n);
                Ok(n)
            }
        }
    }

    /// Sends all of `buf`.
    pub fn send_all(&self, fd: Fd, mut buf: &[u8]) -> Result<(), SockError> {
        while !buf.is_empty() {
            match self.send(fd, buf)? {
                0 => {
                    return Err(SockError::Io {
                        fd,
                        op: "send",
                        source: io::Error::new(io::ErrorKind::WriteZero, "the peer took no bytes"),
                    })
                }
                n => buf = &buf[n..],
            }
        }
        Ok(())
    }

    /// Receives bytes from a connected socket; 0 means the peer closed its
    /// direction (end of stream).
    pub fn recv(&self, fd: Fd, buf: &mut [u8]) -> Result<usize, SockError> {
        let io = |source| SockError::Io {
            fd,
            op: "recv",
            source,
        };
        match fd.mechanism() {
            Mechanism::Tcp => {
                let c = self.tcp_conn(fd, "recv")?;
                let mut r = lock(&c.rd);
                loop {
                    match r.read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        other => {
                            let n = other.map_err(io)?;
                            c.bytes.received(n);
                            self.tcp_bytes.received(n);
                            return Ok(n);
                        }
                    }
                }
            }
            Mechanism::Stp => {
                let (n, sock) = self.with_stp_sock(fd, "recv", |s| s.read(buf).map_err(io))?;
                sock.bytes.received(n);
                self.stp_bytes.received(n);
                Ok(n)
            }
        }
    }

    /// Fills `buf` completely; an end of stream first is an
    /// `UnexpectedEof` [`SockError::Io`].
    pub fn recv_exact(&self, fd: Fd, mut buf: &mut [u8]) -> Result<(), SockError> {
        while !buf.is_empty() {
            match self.recv(fd, buf)? {
                0 => {
                    return Err(SockError::Io {
                        fd,
                        op: "recv",
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection",
                        ),
                    })
                }
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// Waits until everything sent is delivered: for STP, acknowledged by
    /// the peer; for TCP, handed to the kernel (nothing to wait for).
    pub fn flush(&self, fd: Fd) -> Result<(), SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => self.tcp_conn(fd, "flush").map(drop),
            Mechanism::Stp => self.with_stp_stream(fd, "flush", |s| {
                s.flush().map_err(|source| SockError::Io {
                    fd,
                    op: "flush",
                    source,
                })
            }),
        }
    }

    /// Closes the sending direction (the peer's `recv` then returns 0 once
    /// it has read everything); receiving continues.
    pub fn shutdown_write(&self, fd: Fd) -> Result<(), SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let c = self.tcp_conn(fd, "shutdown_write")?;
                c.ctl
                    .shutdown(Shutdown::Write)
                    .map_err(|source| SockError::Io {
                        fd,
                        op: "shutdown_write",
                        source,
                    })
            }
            Mechanism::Stp => self.with_stp_stream(fd, "shutdown_write", |s| {
                // Queues the FIN; a zero timeout returns without waiting for
                // the peer's FIN.
                match s.shutdown(Duration::ZERO) {
                    Err(e) if e.kind() != io::ErrorKind::TimedOut => Err(SockError::Io {
                        fd,
                        op: "shutdown_write",
                        source: e,
                    }),
                    _ => Ok(()),
                }
            }),
        }
    }

    /// Read timeout of a connected TCP socket (`None`: block). STP sockets
    /// have none (see the module documentation).
    pub fn set_read_timeout(&self, fd: Fd, timeout: Option<Duration>) -> Result<(), SockError> {
        let c = self.tcp_conn_only(fd, "set_read_timeout")?;
        c.ctl
            .set_read_timeout(timeout)
            .map_err(|source| SockError::Io {
                fd,
                op: "set_read_timeout",
                source,
            })
    }

    /// Write timeout of a connected TCP socket (`None`: block).
    pub fn set_write_timeout(&self, fd: Fd, timeout: Option<Duration>) -> Result<(), SockError> {
        let c = self.tcp_conn_only(fd, "set_write_timeout")?;
        c.ctl
            .set_write_timeout(timeout)
            .map_err(|source| SockError::Io {
                fd,
                op: "set_write_timeout",
                source,
            })
    }

    /// Closes a socket and frees its descriptor. A connected STP socket
    /// sends its FIN and waits up to 2 s for the peer to close (call
    /// [`SocketLayer::flush`] first to be sure the peer has everything).
    pub fn close(&self, fd: Fd) -> Result<(), SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => {
                let s = self.tcp.remove(fd)?;
                s.closed.store(true, Ordering::Release);
                if let TcpState::Connected(c) = &*lock(&s.state) {
                    // Wakes a recv blocked in another thread.
                    let _ = c.ctl.shutdown(Shutdown::Both);
                }
                Ok(())
            }
            Mechanism::Stp => {
                // The stream closes when the last user lets go of it.
                self.stp.remove(fd).map(drop)
            }
        }
    }

    fn check_open(&self, fd: Fd) -> Result<(), SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => self.tcp.get(fd).map(drop),
            Mechanism::Stp => self.stp.get(fd).map(drop),
        }
    }

    fn tcp_sock(&self, fd: Fd, op: &'static str, why: &str) -> Result<Arc<TcpSock>, SockError> {
        match fd.mechanism() {
            Mechanism::Tcp => self.tcp.get(fd),
            Mechanism::Stp => {
                self.stp.get(fd)?;
                Err(SockError::WrongMechanism {
                    fd,
                    mechanism: Mechanism::Stp,
                    op,
                    detail: format!("{op} applies to TCP sockets only: {why}"),
                })
            }
        }
    }

    fn stp_sock(&self, fd: Fd, op: &'static str, why: &str) -> Result<Arc<StpSock>, SockError> {
        match fd.mechanism() {
            Mechanism::Stp => self.stp.get(fd),
            Mechanism::Tcp => {
                self.tcp.get(fd)?;
                Err(SockError::WrongMechanism {
                    fd,
                    mechanism: Mechanism::Tcp,
                    op,
                    detail: format!("{op} applies to STP sockets only: {why}"),
                })
            }
        }
    }

    fn tcp_conn(&self, fd: Fd, op: &'static str) -> Result<Arc<TcpConn>, SockError> {
        let s = self.tcp.get(fd)?;
        let st = lock(&s.state);
        match &*st {
            TcpState::Connected(c) => Ok(Arc::clone(c)),
            other => Err(SockError::WrongState {
                fd,
                op,
                state: other.name(),
                need: "a connected socket",
            }),
        }
    }

    fn tcp_conn_only(&self, fd: Fd, op: &'static str) -> Result<Arc<TcpConn>, SockError> {
        self.tcp_sock(
            fd,
            op,
            "an STP recv ends when data arrives, the peer closes, or the peer is \
             declared dead after Config::idle_timeout",
        )?;
        self.tcp_conn(fd, op)
    }

    /// Like [`SocketLayer::with_stp_stream`], also handing back the socket
    /// (for its counters).
    fn with_stp_sock<R>(
        &self,
        fd: Fd,
        op: &'static str,
        f: impl FnOnce(&mut StpStream) -> Result<R, SockError>,
    ) -> Result<(R, Arc<StpSock>), SockError> {
        let s = self.stp.get(fd)?;
        let r = {
            let mut st = lock(&s.state);
            match &mut st.phase {
                StpPhase::Connected(stream) => f(stream)?,
                p => {
                    return Err(SockError::WrongState {
                        fd,
                        op,
                        state: p.name(),
                        need: "a connected socket",
                    })
                }
            }
        };
        Ok((r, s))
    }

    fn with_stp_stream<R>(
        &self,
        fd: Fd,
        op: &'static str,
        f: impl FnOnce(&mut StpStream) -> Result<R, SockError>,
    ) -> Result<R, SockError> {
        let s = self.stp.get(fd)?;
        let mut st = lock(&s.state);
        match &mut st.phase {
            StpPhase::Connected(stream) => f(stream),
            p => Err(SockError::WrongState {
                fd,
                op,
                state: p.name(),
                need: "a connected socket",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Mailbox;
    use crate::vendor::MailboxError;

    /// A layer with one STG whose paths never open: enough for every check
    /// made before the array is touched.
    fn layer() -> SocketLayer {
        let none: Arc<dyn PathSource> = Arc::new(|| -> Result<Box<dyn Mailbox>, MailboxError> {
            Err(crate::error::SetupError::NoPaths.into())
        });
        SocketLayer::new(HashMap::from([(7, none)]), Config::default())
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn routing_is_decided_by_the_value() {
        for v in [i32::MIN, -1, 0, 3, 1000, STP_FD_BASE - 1] {
            assert_eq!(Fd(v).mechanism(), Mechanism::Tcp, "{v}");
        }
        for v in [STP_FD_BASE, STP_FD_BASE + 1, i32::MAX] {
            assert_eq!(Fd(v).mechanism(), Mechanism::Stp, "{v}");
        }
        let l = layer();
        let t = l.socket(Domain::Tcp).unwrap();
        let s = l.socket(Domain::Stp { stg: 7 }).unwrap();
        assert!(t.0 >= TCP_FD_FIRST && t.0 < STP_FD_BASE);
        assert!(s.0 >= STP_FD_BASE);
        assert_eq!(l.mechanism(t), Mechanism::Tcp);
        assert_eq!(l.mechanism(s), Mechanism::Stp);
        // The decision needs no table entry.
        assert_eq!(l.mechanism(Fd(STP_FD_BASE + 12345)), Mechanism::Stp);
        assert_eq!(l.descriptors(), vec![t, s]);
    }

    #[test]
    fn descriptors_are_not_reused_at_once() {
        let l = layer();
        let a = l.socket(Domain::Tcp).unwrap();
        l.close(a).unwrap();
        let b = l.socket(Domain::Tcp).unwrap();
        assert_ne!(a, b);
        assert!(!l.is_open(a) && l.is_open(b));
        let t: Table<()> = Table::new(1, 3, Mechanism::Tcp);
        let fds: Vec<Fd> = (0..3).map(|_| t.insert(()).unwrap()).collect();
        assert_eq!(fds, vec![Fd(1), Fd(2), Fd(3)]);
        assert!(matches!(t.insert(()), Err(SockError::Exhausted { .. })));
        t.remove(Fd(2)).unwrap();
        assert_eq!(t.insert(()).unwrap(), Fd(2));
    }

    #[test]
    fn tcp_through_the_layer() {
        let l = layer();
        let lst = l.socket(Domain::Tcp).unwrap();
        l.bind(lst, 0).unwrap();
        l.listen(lst).unwrap();
        let port = l.getsockname(lst).unwrap();
        assert_ne!(port, 0);
        let c = l.socket(Domain::Tcp).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
        l.connect(c, Address::Tcp(addr)).unwrap();
        let a = l.accept(lst, T).unwrap();
        assert_eq!(a.mechanism(), Mechanism::Tcp);
        l.send_all(c, b"hello over tcp").unwrap();
        let mut buf = [0u8; 14];
        l.recv_exact(a, &mut buf).unwrap();
        assert_eq!(&buf, b"hello over tcp");
        let c_port = u16::try_from(l.getsockname(c).unwrap()).unwrap();
        let c_addr = SocketAddr::from(([127, 0, 0, 1], c_port));
        assert_eq!(l.peer_addr(a).unwrap(), Address::Tcp(c_addr));
        // Each socket counts what crossed it; the layer counts them all.
        assert_eq!(l.socket_traffic(c).unwrap().tcp_sent, 14);
        assert_eq!(l.socket_traffic(a).unwrap().tcp_received, 14);
        assert_eq!(l.socket_traffic(lst).unwrap(), Traffic::default());
        let before = l.traffic();
        assert_eq!(
            (before.tcp_sent, before.tcp_received, before.stp()),
            (14, 14, 0)
        );
        l.send_all(a, b"ok").unwrap();
        let mut ok = [0u8; 2];
        l.recv_exact(c, &mut ok).unwrap();
        assert_eq!(l.traffic().since(&before).tcp(), 4);
        l.shutdown_write(c).unwrap();
        assert_eq!(l.recv(a, &mut buf).unwrap(), 0);
        // A read timeout turns a silent peer into a timeout error.
        l.set_read_timeout(c, Some(Duration::from_millis(20)))
            .unwrap();
        assert!(l.recv(c, &mut buf).unwrap_err().is_timeout());
        for fd in [a, c, lst] {
            l.close(fd).unwrap();
        }
        assert!(l.descriptors().is_empty());
    }

    #[test]
    fn accept_times_out_and_stops_on_close() {
        let l = Arc::new(layer());
        let lst = l.socket(Domain::Tcp).unwrap();
        l.listen(lst).unwrap();
        let t0 = Instant::now();
        let e = l.accept(lst, Duration::from_millis(50)).unwrap_err();
        assert!(e.is_timeout(), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        let l2 = Arc::clone(&l);
        let h = thread::spawn(move || l2.accept(lst, Duration::from_secs(30)));
        thread::sleep(Duration::from_millis(50));
        l.close(lst).unwrap();
        let e = h.join().unwrap().unwrap_err();
        assert_eq!(e.io_kind(), Some(io::ErrorKind::NotConnected), "{e}");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let l = layer();
        let t = l.socket(Domain::Tcp).unwrap();
        let s = l.socket(Domain::Stp { stg: 7 }).unwrap();
        // Wrong mechanism for the address, either way round.
        let e = l.connect(t, Address::Stp(5)).unwrap_err();
        assert!(
            matches!(
                e,
                SockError::WrongMechanism {
                    mechanism: Mechanism::Tcp,
                    ..
                }
            ),
            "{e}"
        );
        let e = l
            .connect(s, Address::Tcp(SocketAddr::from(([127, 0, 0, 1], 9))))
            .unwrap_err();
        assert!(
            matches!(
                e,
                SockError::WrongMechanism {
                    mechanism: Mechanism::Stp,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("TCP address"), "{e}");
        // STP needs a key, and the message says how to get one.
        let e = l.connect(s, Address::Stp(5101)).unwrap_err();
        assert!(matches!(e, SockError::NoKey { .. }), "{e}");
        assert!(e.to_string().contains("set_key"), "{e}");
        assert!(matches!(l.listen(s), Err(SockError::NoKey { .. })));
        // Keys are for STP sockets only.
        let key = FrameKey::from_bytes([1; 32]);
        assert!(matches!(
            l.set_key(t, key.clone()),
            Err(SockError::WrongMechanism { .. })
        ));
        // STP has no read timeout.
        assert!(matches!(
            l.set_read_timeout(s, None),
            Err(SockError::WrongMechanism { .. })
        ));
        // Bad descriptors, of either range.
        for fd in [Fd(-1), Fd(0), Fd(999), Fd(STP_FD_BASE + 999)] {
            let e = l.send(fd, b"x").unwrap_err();
            assert!(matches!(e, SockError::BadDescriptor { .. }), "{e}");
        }
        // Wrong states.
        assert!(matches!(l.send(t, b"x"), Err(SockError::WrongState { .. })));
        assert!(matches!(l.send(s, b"x"), Err(SockError::WrongState { .. })));
        l.listen(t).unwrap();
        let e = l.recv(t, &mut [0; 4]).unwrap_err();
        assert!(e.to_string().contains("listening"), "{e}");
        assert!(matches!(l.accept(s, T), Err(SockError::WrongState { .. })));
        // Unknown STG, bad ports.
        let e = l.socket(Domain::Stp { stg: 99 }).unwrap_err();
        assert!(matches!(e, SockError::UnknownStg { stg: 99, .. }), "{e}");
        assert!(e.to_string().contains("[7]"), "{e}");
        assert!(matches!(
            l.bind(s, 70_000),
            Err(SockError::InvalidArgument { .. })
        ));
        l.set_key(s, key).unwrap();
        assert!(matches!(
            l.connect(s, Address::Stp(0)),
            Err(SockError::InvalidArgument { .. })
        ));
        // getsockname of a dynamic STP port before listen says to listen.
        l.bind(s, 0).unwrap();
        let e = l.getsockname(s).unwrap_err();
        assert!(e.to_string().contains("listen first"), "{e}");
        // Closing twice: the second is a bad descriptor.
        l.close(s).unwrap();
        assert!(matches!(l.close(s), Err(SockError::BadDescriptor { .. })));
    }
}
