//! The seed's connection flows (docs/PROTOCOL.md §8) over a
//! [`SocketLayer`]: TCP sets up, authenticates and (for file systems)
//! carries control; STP carries the data.
//!
//! * **Server-initiated, file system** (seed Figs. 4 and 4A):
//!   [`fs_server_connect`] on the backup server, [`fs_client_accept`] on the
//!   host being backed up. The *client* listens on WKP and WKP+1 and the
//!   *server* connects to it. The result, an [`FsSession`], has a TCP
//!   control connection, a TCP error connection and an STP data connection.
//! * **Client-initiated, database** (seed Fig. 5): [`db_client_connect`]
//!   on the database host, [`db_server_accept`] on the backup server. The
//!   TCP connections only set up the STP one and are closed; a
//!   [`DbSession`] has just the STP data connection.
//!
//! In both flows the side that opens the STP connection (sends the SYN) is
//! the backup **server**, so for the key derivation (docs/PROTOCOL.md §7,
//! [`Role`]) the server is [`Role::Client`] and the host being backed up is
//! [`Role::Server`]: `Role` names the STP roles, not the backup roles.
//!
//! Byte formats (all integers big-endian):
//!
//! | message | bytes |
//! | --- | --- |
//! | well-known string (fs, server → client on each WKP connection) | [`WKP_HELLO`], 16 |
//! | descriptor (fs) | u32 |
//! | dynamic TCP port (db, client → server over WKP) | u16 |
//! | confirmation (db, server → client over WKP) | [`WKP_OK`], 16 |
//! | STG message (server → client) | STG id u32, STG length u32, offer 48 ([`STG_MSG_LEN`]) |
//! | port message (client → server) | STP port u32, offer 48 ([`PORT_MSG_LEN`]) |
//!
//! An offer is [`crate::auth::Offer::to_bytes`]: X25519 public key (32),
//! nonce (16).
//!
//! Every flow takes one `timeout` for the whole exchange; every TCP read
//! and write has a timeout derived from it, and accepts and connects wait
//! at most the time left, so no step hangs. Errors name the seed's step
//! numbers. Each call serves one session; on failure every descriptor it
//! opened is closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::OsRng;

use crate::auth::{AuthError, FrameKey, Handshake, Offer, Role, OFFER_LEN};
use crate::sockets::{Address, Domain, Fd, SockError, SocketLayer};

/// The well-known string the server sends first on each WKP connection of
/// the file-system flow (seed Fig. 4, step 90).
pub const WKP_HELLO: [u8; 16] = *b"STP-WKP-HELLO\0\0\0";

/// The string the server confirms the database flow's WKP connection with
/// (seed Fig. 5, step 226).
pub const WKP_OK: [u8; 16] = *b"STP-WKP-OK\0\0\0\0\0\0";

/// Bytes of the STG message: STG id, STG length, offer.
pub const STG_MSG_LEN: usize = 8 + OFFER_LEN;

/// Bytes of the port message: STP port, offer.
pub const PORT_MSG_LEN: usize = 4 + OFFER_LEN;

/// How long a TCP connect that was refused waits before trying again (the
/// peer may not be listening yet).
const REFUSED_RETRY: Duration = Duration::from_millis(20);

/// A file-system session: control and errors over TCP, data over STP. The
/// descriptors belong to the [`SocketLayer`] the flow ran on; close them
/// there ([`FsSession::close`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSession {
    /// The data-control connection (TCP, the first WKP connection).
    pub control: Fd,
    /// The error connection (TCP, the second WKP connection).
    pub errors: Fd,
    /// The data connection (STP).
    pub data: Fd,
    /// The STG the data connection runs on.
    pub stg: u32,
    /// The STG's length (member count) as the server stated it.
    pub stg_len: u32,
}

impl FsSession {
    /// Closes all three connections; returns the first error.
    pub fn close(self, layer: &SocketLayer) -> Result<(), SockError> {
        let results = [self.data, self.control, self.errors].map(|fd| layer.close(fd));
        results.into_iter().collect()
    }
}

/// A database session: everything flows over one STP connection. The
/// descriptor belongs to the [`SocketLayer`] the flow ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbSession {
    /// The data connection (STP).
    pub data: Fd,
    /// The STG the data connection runs on.
    pub stg: u32,
    /// The STG's length (member count) as the server stated it.
    pub stg_len: u32,
    /// The other host's address: the server for the client, the client
    /// (where its WKP connection came from) for the server.
    pub peer: IpAddr,
}

impl DbSession {
    /// Closes the data connection.
    pub fn close(self, layer: &SocketLayer) -> Result<(), SockError> {
        layer.close(self.data)
    }
}

/// Why a flow failed. `step` is the seed's step number (Figs. 4, 4A, 5).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The peer sent something other than the well-known string.
    #[error(
        "step {step}: expected the well-known string \"{expected}\" but got \"{got}\": \
         the peer is not an STP endpoint or speaks another version of the protocol"
    )]
    WrongString {
        /// The seed's step.
        step: &'static str,
        /// The expected string, escaped.
        expected: String,
        /// What arrived, escaped.
        got: String,
    },
    /// A step did not complete before the flow's deadline.
    #[error("timed out {waiting_for} (step {step}; the flow's timeout is {timeout:?}){hint}")]
    Timeout {
        /// The seed's step.
        step: &'static str,
        /// What the step was waiting for.
        waiting_for: &'static str,
        /// The flow's timeout.
        timeout: Duration,
        /// What to check, if anything is known (starts with "; ").
        hint: String,
    },
    /// The peer closed a TCP connection before the flow was done.
    #[error(
        "the peer closed the TCP connection while {waiting_for} (step {step}); \
         its log says why"
    )]
    Closed {
        /// The seed's step.
        step: &'static str,
        /// What the step was waiting for.
        waiting_for: &'static str,
    },
    /// A TCP call failed.
    #[error("step {step}, {doing} (TCP): {source}")]
    Tcp {
        /// The seed's step.
        step: &'static str,
        /// What the step was doing.
        doing: &'static str,
        /// The socket layer's error.
        #[source]
        source: SockError,
    },
    /// An STP call failed.
    #[error("step {step}, {doing} (STP): {source}")]
    Stp {
        /// The seed's step.
        step: &'static str,
        /// What the step was doing.
        doing: &'static str,
        /// The socket layer's error.
        #[source]
        source: SockError,
    },
    /// The key agreement failed: the peer's offer is unusable.
    #[error("step {step}: the peer's key offer is unusable: {source}")]
    Auth {
        /// The seed's step.
        step: &'static str,
        /// Why.
        #[source]
        source: AuthError,
    },
    /// The STG the flow names is not configured on this host.
    #[error(
        "step {step}: STG {stg} is not in this host's socket layer (it has {known:?}); \
         add STG {stg} to this host's configuration"
    )]
    UnknownStg {
        /// The seed's step.
        step: &'static str,
        /// The STG named.
        stg: u32,
        /// The STGs this host has.
        known: Vec<u32>,
    },
    /// The peer sent a value that breaks the flow.
    #[error("step {step}: {what}")]
    Protocol {
        /// The seed's step.
        step: &'static str,
        /// What is wrong.
        what: String,
    },
}

const HINT_STP: &str = "; no authentic STP frame came back: check that both hosts use the \
    same PSK and reach the same STG (frames whose tag fails are dropped silently)";

fn escaped(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

fn fd_u32(fd: Fd) -> u32 {
    u32::try_from(fd.0).unwrap_or(0)
}

fn stg_message(stg: u32, stg_len: u32, offer: &Offer) -> [u8; STG_MSG_LEN] {
    let mut m = [0u8; STG_MSG_LEN];
    m[..4].copy_from_slice(&stg.to_be_bytes());
    m[4..8].copy_from_slice(&stg_len.to_be_bytes());
    m[8..].copy_from_slice(&offer.to_bytes());
    m
}

fn port_message(port: u32, offer: &Offer) -> [u8; PORT_MSG_LEN] {
    let mut m = [0u8; PORT_MSG_LEN];
    m[..4].copy_from_slice(&port.to_be_bytes());
    m[4..].copy_from_slice(&offer.to_bytes());
    m
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// The local address a connection to `peer` leaves from (UDP `connect`
/// only consults the routing table; nothing is sent).
fn local_ip_toward(peer: IpAddr) -> IpAddr {
    let any = match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    UdpSocket::bind((any, 0))
        .and_then(|s| {
            s.connect((peer, 9))?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(any)
}

/// One run of a flow: the deadline, and the descriptors to close if it
/// fails.
struct Flow<'a> {
    layer: &'a SocketLayer,
    timeout: Duration,
    deadline: Instant,
    opened: Vec<Fd>,
}

impl Drop for Flow<'_> {
    fn drop(&mut self) {
        for fd in self.opened.drain(..).rev() {
            let _ = self.layer.close(fd);
        }
    }
}

impl<'a> Flow<'a> {
    fn new(layer: &'a SocketLayer, timeout: Duration) -> Flow<'a> {
        Flow {
            layer,
            timeout,
            deadline: Instant::now() + timeout,
            opened: Vec::new(),
        }
    }

    fn timed_out(&self, step: &'static str, waiting_for: &'static str, hint: &str) -> FlowError {
        FlowError::Timeout {
            step,
            waiting_for,
            timeout: self.timeout,
            hint: hint.to_owned(),
        }
    }

    /// Time left, at least a millisecond (a zero socket timeout means
    /// "block" or is refused).
    fn left(&self, step: &'static str, waiting_for: &'static str) -> Result<Duration, FlowError> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(self.timed_out(step, waiting_for, ""));
        }
        Ok((self.deadline - now).max(Duration::from_millis(1)))
    }

    fn tcp_err(&self, step: &'static str, doing: &'static str, e: SockError) -> FlowError {
        if e.is_timeout() {
            self.timed_out(step, doing, "")
        } else if e.io_kind() == Some(std::io::ErrorKind::UnexpectedEof) {
            FlowError::Closed {
                step,
                waiting_for: doing,
            }
        } else {
            FlowError::Tcp {
                step,
                doing,
                source: e,
            }
        }
    }

    fn stp_err(&self, step: &'static str, doing: &'static str, e: SockError) -> FlowError {
        if e.is_timeout() {
            self.timed_out(step, doing, HINT_STP)
        } else {
            FlowError::Stp {
                step,
                doing,
                source: e,
            }
        }
    }

    fn socket(&mut self, domain: Domain, step: &'static str) -> Result<Fd, FlowError> {
        let fd = self.layer.socket(domain).map_err(|e| match domain {
            Domain::Tcp => self.tcp_err(step, "creating a socket", e),
            Domain::Stp { .. } => self.stp_err(step, "creating a socket", e),
        })?;
        self.opened.push(fd);
        Ok(fd)
    }

    /// Closes `fd` now (it served its purpose).
    fn close(&mut self, fd: Fd) {
        self.opened.retain(|&f| f != fd);
        let _ = self.layer.close(fd);
    }

    /// Hands `fd` to the caller: it is not closed when the flow ends.
    fn keep(&mut self, fd: Fd) -> Fd {
        self.opened.retain(|&f| f != fd);
        fd
    }

    fn listen_tcp(
        &mut self,
        step: &'static str,
        addr: SocketAddr,
        doing: &'static str,
    ) -> Result<Fd, FlowError> {
        let fd = self.socket(Domain::Tcp, step)?;
        self.layer
            .bind_addr(fd, addr)
            .and_then(|()| self.layer.listen(fd))
            .map_err(|e| self.tcp_err(step, doing, e))?;
        Ok(fd)
    }

    /// Connects to `addr`, trying again while it is refused (the peer may
    /// not be listening yet) until the deadline.
    fn connect_tcp(
        &mut self,
        step: &'static str,
        addr: SocketAddr,
        doing: &'static str,
    ) -> Result<Fd, FlowError> {
        loop {
            let left = self.left(step, doing)?;
            let fd = self.socket(Domain::Tcp, step)?;
            match self.layer.connect_timeout(fd, Address::Tcp(addr), left) {
                Ok(()) => return Ok(fd),
                Err(e) if e.io_kind() == Some(std::io::ErrorKind::ConnectionRefused) => {
                    self.close(fd);
                    if Instant::now() + REFUSED_RETRY >= self.deadline {
                        return Err(self.timed_out(
                            step,
                            doing,
                            &format!("; {addr} refused every connection: is the peer listening?"),
                        ));
                    }
                    thread::sleep(REFUSED_RETRY);
                }
                Err(e) => return Err(self.tcp_err(step, doing, e)),
            }
        }
    }

    fn accept(
        &mut self,
        step: &'static str,
        listener: Fd,
        waiting_for: &'static str,
    ) -> Result<Fd, FlowError> {
        let left = self.left(step, waiting_for)?;
        let fd = self
            .layer
            .accept(listener, left)
            .map_err(|e| match listener.mechanism() {
                crate::sockets::Mechanism::Tcp => self.tcp_err(step, waiting_for, e),
                crate::sockets::Mechanism::Stp => self.stp_err(step, waiting_for, e),
            })?;
        self.opened.push(fd);
        Ok(fd)
    }

    fn read(
        &self,
        step: &'static str,
        fd: Fd,
        buf: &mut [u8],
        waiting_for: &'static str,
    ) -> Result<(), FlowError> {
        let mut got = 0;
        while got < buf.len() {
            let left = self.left(step, waiting_for)?;
            self.layer
                .set_read_timeout(fd, Some(left))
                .map_err(|e| self.tcp_err(step, waiting_for, e))?;
            match self.layer.recv(fd, &mut buf[got..]) {
                Ok(0) => return Err(FlowError::Closed { step, waiting_for }),
                Ok(n) => got += n,
                Err(e) => return Err(self.tcp_err(step, waiting_for, e)),
            }
        }
        Ok(())
    }

    fn write(
        &self,
        step: &'static str,
        fd: Fd,
        buf: &[u8],
        doing: &'static str,
    ) -> Result<(), FlowError> {
        let left = self.left(step, doing)?;
        self.layer
            .set_write_timeout(fd, Some(left))
            .and_then(|()| self.layer.send_all(fd, buf))
            .map_err(|e| self.tcp_err(step, doing, e))
    }

    fn read_u32(
        &self,
        step: &'static str,
        fd: Fd,
        waiting_for: &'static str,
    ) -> Result<u32, FlowError> {
        let mut b = [0u8; 4];
        self.read(step, fd, &mut b, waiting_for)?;
        Ok(u32::from_be_bytes(b))
    }

    fn expect_string(
        &self,
        step: &'static str,
        fd: Fd,
        expected: &[u8; 16],
        waiting_for: &'static str,
    ) -> Result<(), FlowError> {
        let mut got = [0u8; 16];
        self.read(step, fd, &mut got, waiting_for)?;
        if got != *expected {
            return Err(FlowError::WrongString {
                step,
                expected: escaped(expected),
                got: escaped(&got),
            });
        }
        Ok(())
    }

    /// Reads and checks the STG message; returns (STG id, length, offer).
    fn read_stg_message(
        &self,
        step: &'static str,
        fd: Fd,
        waiting_for: &'static str,
    ) -> Result<(u32, u32, Offer), FlowError> {
        let mut m = [0u8; STG_MSG_LEN];
        self.read(step, fd, &mut m, waiting_for)?;
        let (stg, stg_len) = (be_u32(&m[..4]), be_u32(&m[4..8]));
        let offer =
            Offer::from_bytes(&m[8..]).map_err(|source| FlowError::Auth { step, source })?;
        if !self.layer.has_stg(stg) {
            return Err(FlowError::UnknownStg {
                step,
                stg,
                known: self.layer.stg_ids(),
            });
        }
        if stg_len == 0 {
            return Err(FlowError::Protocol {
                step,
                what: format!("the server says STG {stg} has no members (length 0)"),
            });
        }
        Ok((stg, stg_len, offer))
    }

    /// Reads the port message; returns (STP port, offer).
    fn read_port_message(
        &self,
        step: &'static str,
        fd: Fd,
        waiting_for: &'static str,
    ) -> Result<(u32, Offer), FlowError> {
        let mut m = [0u8; PORT_MSG_LEN];
        self.read(step, fd, &mut m, waiting_for)?;
        let port = be_u32(&m[..4]);
        if port == 0 || port > 65_535 {
            return Err(FlowError::Protocol {
                step,
                what: format!("the client sent STP port {port}, which is not a valid port"),
            });
        }
        let offer =
            Offer::from_bytes(&m[4..]).map_err(|source| FlowError::Auth { step, source })?;
        Ok((port, offer))
    }

    /// STP socket on `stg`, keyed, bound to a dynamic port and listening;
    /// returns it and its port (steps socket, bind, listen, getsockname).
    fn stp_listen(
        &mut self,
        steps: [&'static str; 4],
        stg: u32,
        key: FrameKey,
    ) -> Result<(Fd, u32), FlowError> {
        let fd = self.socket(Domain::Stp { stg }, steps[0])?;
        let l = self.layer;
        l.set_key(fd, key)
            .and_then(|()| l.bind(fd, 0))
            .map_err(|e| self.stp_err(steps[1], "binding a dynamic STP port", e))?;
        l.listen(fd)
            .map_err(|e| self.stp_err(steps[2], "listening on the STP port", e))?;
        let port = l
            .getsockname(fd)
            .map_err(|e| self.stp_err(steps[3], "reading the STP port", e))?;
        Ok((fd, port))
    }

    /// STP socket on `stg`, keyed, connected to `port`.
    /// The server's half of the STG exchange on `conn` (Fig. 4A steps
    /// 138–146, Fig. 5 steps 236–244): offer the STG id, length and this
    /// side's key share, read the client's STP port and key share, derive the
    /// frame key (the server opens the STP connection, so it is the key
    /// derivation's client), and connect over STP.
    #[allow(clippy::too_many_arguments)]
    fn offer_stg_and_connect(
        &mut self,
        conn: Fd,
        stg: u32,
        stg_len: u32,
        psk: Option<&[u8]>,
        steps: [&'static str; 4],
        doing: [&'static str; 2],
    ) -> Result<Fd, FlowError> {
        let [offer_step, read_step, connect_step, established_step] = steps;
        let hs = Handshake::new(&mut OsRng);
        self.write(
            offer_step,
            conn,
            &stg_message(stg, stg_len, &hs.public()),
            doing[0],
        )?;
        let (port, client_offer) = self.read_port_message(read_step, conn, doing[1])?;
        let key = hs
            .finish(&client_offer, Role::Client, psk)
            .map_err(|source| FlowError::Auth {
                step: read_step,
                source,
            })?;
        self.stp_connect([connect_step, established_step], stg, key, port)
    }

    fn stp_connect(
        &mut self,
        steps: [&'static str; 2],
        stg: u32,
        key: FrameKey,
        port: u32,
    ) -> Result<Fd, FlowError> {
        const DOING: &str = "connecting to the client's STP port";
        let fd = self.socket(Domain::Stp { stg }, steps[0])?;
        let left = self.left(steps[1], DOING)?;
        self.layer
            .set_key(fd, key)
            .and_then(|()| self.layer.connect_timeout(fd, Address::Stp(port), left))
            .map_err(|e| self.stp_err(steps[1], DOING, e))?;
        Ok(fd)
    }
}

fn check_stg(layer: &SocketLayer, step: &'static str, stg: u32) -> Result<(), FlowError> {
    if layer.has_stg(stg) {
        Ok(())
    } else {
        Err(FlowError::UnknownStg {
            step,
            stg,
            known: layer.stg_ids(),
        })
    }
}

fn wkp_plus_one(wkp: u16, step: &'static str) -> Result<u16, FlowError> {
    wkp.checked_add(1).ok_or(FlowError::Protocol {
        step,
        what: "WKP 65535 leaves no port for WKP+1; configure a lower WKP".into(),
    })
}

/// The backup server's side of the file-system flow (seed Figs. 4 and 4A,
/// steps 82–146): connects to the client's WKP twice (control, then
/// errors) and to WKP+1, offers STG `stg` (of `stg_len` members) and its
/// key share, and opens the STP data connection to the port the client
/// answers with. `psk` must equal the client's. `timeout` bounds the whole
/// flow.
///
/// On the errors connection the server answers the client's descriptor
/// with the descriptor the client sent on the control connection (step
/// 100), so the client can tell that both connections come from the same
/// server.
pub fn fs_server_connect(
    layer: &SocketLayer,
    client_addr: IpAddr,
    wkp: u16,
    stg: u32,
    stg_len: u32,
    psk: Option<&[u8]>,
    timeout: Duration,
) -> Result<FsSession, FlowError> {
    check_stg(layer, "82", stg)?;
    let wkp1 = wkp_plus_one(wkp, "132")?;
    let mut f = Flow::new(layer, timeout);

    // Fig. 4: the control connection (steps 82-92).
    let control = f.connect_tcp(
        "86",
        SocketAddr::new(client_addr, wkp),
        "connecting to the client's WKP (control connection)",
    )?;
    f.write(
        "90",
        control,
        &WKP_HELLO,
        "sending the well-known string on the control connection",
    )?;
    let client_control = f.read_u32(
        "92",
        control,
        "waiting for the client's descriptor on the control connection",
    )?;

    // The errors connection (steps 94-100).
    let errors = f.connect_tcp(
        "98",
        SocketAddr::new(client_addr, wkp),
        "connecting to the client's WKP (errors connection)",
    )?;
    f.write(
        "98",
        errors,
        &WKP_HELLO,
        "sending the well-known string on the errors connection",
    )?;
    f.read_u32(
        "98",
        errors,
        "waiting for the client's descriptor on the errors connection",
    )?;
    f.write(
        "100",
        errors,
        &client_control.to_be_bytes(),
        "sending the descriptor back on the errors connection",
    )?;

    // Fig. 4A: STG and key shares over WKP+1 (steps 132-140).
    let info = f.connect_tcp(
        "136",
        SocketAddr::new(client_addr, wkp1),
        "connecting to the client's WKP+1",
    )?;
    let data = f.offer_stg_and_connect(
        info,
        stg,
        stg_len,
        psk,
        ["138", "140", "142", "146"],
        [
            "sending the STG id, length and key offer on WKP+1",
            "waiting for the client's STP port and key offer on WKP+1",
        ],
    )?;
    f.close(info);
    Ok(FsSession {
        control: f.keep(control),
        errors: f.keep(errors),
        data: f.keep(data),
        stg,
        stg_len,
    })
}

/// The backed-up host's side of the file-system flow (seed Figs. 4 and
/// 4A, steps 112–172): listens on `bind_ip`:WKP and WKP+1, accepts the
/// server's control and errors connections, then the WKP+1 connection;
/// takes the STG and the server's key share from it, listens on a dynamic
/// STP port of that STG, answers with the port and its own key share, and
/// accepts the server's STP connection. `psk` must equal the server's.
/// `timeout` bounds the whole flow. The listeners are closed when it ends.
pub fn fs_client_accept(
    layer: &SocketLayer,
    bind_ip: IpAddr,
    wkp: u16,
    psk: Option<&[u8]>,
    timeout: Duration,
) -> Result<FsSession, FlowError> {
    let wkp1 = wkp_plus_one(wkp, "152")?;
    let mut f = Flow::new(layer, timeout);

    // Both listeners first, so the server never finds one missing.
    let wkp_l = f.listen_tcp(
        "114",
        SocketAddr::new(bind_ip, wkp),
        "binding and listening on WKP",
    )?;
    let info_l = f.listen_tcp(
        "154",
        SocketAddr::new(bind_ip, wkp1),
        "binding and listening on WKP+1",
    )?;

    // Fig. 4: the control connection (steps 118-122).
    let control = f.accept(
        "118",
        wkp_l,
        "waiting for the server's control connection on WKP",
    )?;
    f.expect_string(
        "120",
        control,
        &WKP_HELLO,
        "waiting for the well-known string on the control connection",
    )?;
    f.write(
        "122",
        control,
        &fd_u32(control).to_be_bytes(),
        "sending this side's descriptor on the control connection",
    )?;

    // The errors connection (steps 124-126).
    let errors = f.accept(
        "124",
        wkp_l,
        "waiting for the server's errors connection on WKP",
    )?;
    f.close(wkp_l);
    f.expect_string(
        "124",
        errors,
        &WKP_HELLO,
        "waiting for the well-known string on the errors connection",
    )?;
    f.write(
        "124",
        errors,
        &fd_u32(errors).to_be_bytes(),
        "sending this side's descriptor on the errors connection",
    )?;
    let echoed = f.read_u32(
        "126",
        errors,
        "waiting for the server's descriptor on the errors connection",
    )?;
    if echoed != fd_u32(control) {
        return Err(FlowError::Protocol {
            step: "126",
            what: format!(
                "the errors connection answered with descriptor {echoed}, but the control \
                 connection's is {control}: the two WKP connections come from different \
                 servers (or the server runs another version)"
            ),
        });
    }

    // Fig. 4A: STG and key shares over WKP+1 (steps 158-170).
    let info = f.accept(
        "158",
        info_l,
        "waiting for the server's connection on WKP+1",
    )?;
    f.close(info_l);
    let (stg, stg_len, server_offer) = f.read_stg_message(
        "160",
        info,
        "waiting for the STG id, length and key offer on WKP+1",
    )?;
    let hs = Handshake::new(&mut OsRng);
    let offer = hs.public();
    let key = hs
        .finish(&server_offer, Role::Server, psk)
        .map_err(|source| FlowError::Auth {
            step: "160",
            source,
        })?;
    let (data_l, port) = f.stp_listen(["162", "164", "166", "168"], stg, key)?;
    f.write(
        "170",
        info,
        &port_message(port, &offer),
        "sending the STP port and key offer on WKP+1",
    )?;

    // The STP data connection (step 172).
    let data = f.accept("172", data_l, "waiting for the server's STP connection")?;
    f.close(data_l);
    f.close(info);
    Ok(FsSession {
        control: f.keep(control),
        errors: f.keep(errors),
        data: f.keep(data),
        stg,
        stg_len,
    })
}

/// The database host's side of the database flow (seed Fig. 5, steps
/// 182–214): listens on a dynamic TCP port (on the local address that
/// routes to `server_addr`), connects to the server's WKP and sends that
/// port, checks the server's confirmation, accepts the server's connection
/// on the dynamic port, takes the STG and the server's key share from it,
/// listens on a dynamic STP port, answers with the port and its key share,
/// accepts the server's STP connection and closes every TCP socket. `psk`
/// must equal the server's. `timeout` bounds the whole flow.
pub fn db_client_connect(
    layer: &SocketLayer,
    server_addr: IpAddr,
    wkp: u16,
    psk: Option<&[u8]>,
    timeout: Duration,
) -> Result<DbSession, FlowError> {
    let mut f = Flow::new(layer, timeout);

    // Steps 182-188: a dynamic TCP port.
    let dyn_l = f.listen_tcp(
        "184",
        SocketAddr::new(local_ip_toward(server_addr), 0),
        "binding and listening on a dynamic TCP port",
    )?;
    let dyn_port = layer
        .getsockname(dyn_l)
        .map_err(|e| f.tcp_err("188", "reading the dynamic TCP port", e))?;
    let dyn_port = u16::try_from(dyn_port).unwrap_or(0);

    // Steps 190-196A: the WKP connection.
    let wkp_c = f.connect_tcp(
        "194",
        SocketAddr::new(server_addr, wkp),
        "connecting to the server's WKP",
    )?;
    f.write(
        "196",
        wkp_c,
        &dyn_port.to_be_bytes(),
        "sending the dynamic port over WKP",
    )?;
    f.expect_string(
        "196A",
        wkp_c,
        &WKP_OK,
        "waiting for the server's confirmation over WKP",
    )?;

    // Steps 198-210: the server calls back on the dynamic port.
    let back = f.accept(
        "198",
        dyn_l,
        "waiting for the server's connection on the dynamic TCP port",
    )?;
    f.close(dyn_l);
    let (stg, stg_len, server_offer) = f.read_stg_message(
        "200",
        back,
        "waiting for the STG id, length and key offer on the dynamic connection",
    )?;
    let hs = Handshake::new(&mut OsRng);
    let offer = hs.public();
    let key = hs
        .finish(&server_offer, Role::Server, psk)
        .map_err(|source| FlowError::Auth {
            step: "200",
            source,
        })?;
    let (data_l, port) = f.stp_listen(["202", "204", "206", "208"], stg, key)?;
    f.write(
        "210",
        back,
        &port_message(port, &offer),
        "sending the STP port and key offer on the dynamic connection",
    )?;

    // Steps 212-214.
    let data = f.accept("212", data_l, "waiting for the server's STP connection")?;
    f.close(data_l);
    f.close(back);
    f.close(wkp_c);
    Ok(DbSession {
        data: f.keep(data),
        stg,
        stg_len,
        peer: server_addr,
    })
}

/// The backup server's side of the database flow (seed Fig. 5, steps
/// 222–246): listens on `bind_ip`:WKP, accepts the client, reads its
/// dynamic port, confirms with [`WKP_OK`], connects back to that port,
/// offers STG `stg` (of `stg_len` members) and its key share, opens the STP
/// data connection to the port the client answers with and closes every
/// TCP socket. `psk` must equal the client's. `timeout` bounds the whole
/// flow.
pub fn db_server_accept(
    layer: &SocketLayer,
    bind_ip: IpAddr,
    wkp: u16,
    stg: u32,
    stg_len: u32,
    psk: Option<&[u8]>,
    timeout: Duration,
) -> Result<DbSession, FlowError> {
    check_stg(layer, "222", stg)?;
    let mut f = Flow::new(layer, timeout);

    // Steps 222-226: the WKP connection.
    let wkp_l = f.listen_tcp(
        "222",
        SocketAddr::new(bind_ip, wkp),
        "binding and listening on WKP",
    )?;
    let c = f.accept("222", wkp_l, "waiting for the client's connection on WKP")?;
    f.close(wkp_l);
    let mut port = [0u8; 2];
    f.read(
        "224",
        c,
        &mut port,
        "waiting for the client's dynamic port over WKP",
    )?;
    let port = u16::from_be_bytes(port);
    if port == 0 {
        return Err(FlowError::Protocol {
            step: "224",
            what: "the client sent dynamic port 0".into(),
        });
    }
    f.write("226", c, &WKP_OK, "sending the confirmation over WKP")?;
    let client_ip = match layer.peer_addr(c) {
        Ok(Address::Tcp(a)) => a.ip(),
        Ok(other) => {
            return Err(FlowError::Protocol {
                step: "228",
                what: format!("the WKP connection's peer is {other}, not a TCP address"),
            })
        }
        Err(e) => return Err(f.tcp_err("228", "reading the client's address", e)),
    };

    // Steps 228-238: connect back, offer the STG and key share.
    let back = f.connect_tcp(
        "234",
        SocketAddr::new(client_ip, port),
        "connecting to the client's dynamic TCP port",
    )?;
    let data = f.offer_stg_and_connect(
        back,
        stg,
        stg_len,
        psk,
        ["236", "238", "240", "244"],
        [
            "sending the STG id, length and key offer on the dynamic connection",
            "waiting for the client's STP port and key offer on the dynamic connection",
        ],
    )?;
    f.close(back);
    f.close(c);
    Ok(DbSession {
        data: f.keep(data),
        stg,
        stg_len,
        peer: client_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Config;
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn tcp_only() -> SocketLayer {
        SocketLayer::new(HashMap::new(), Config::default())
    }

    /// A free port whose successor is free too.
    fn free_wkp() -> u16 {
        loop {
            let l = TcpListener::bind((LOCAL, 0)).unwrap();
            let p = l.local_addr().unwrap().port();
            if p < u16::MAX && TcpListener::bind((LOCAL, p + 1)).is_ok() {
                return p;
            }
        }
    }

    fn connect_retrying(addr: SocketAddr) -> TcpStream {
        let t0 = Instant::now();
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => return s,
                Err(e) if t0.elapsed() > Duration::from_secs(5) => panic!("{addr}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    #[test]
    fn byte_formats() {
        assert_eq!(WKP_HELLO.len(), 16);
        assert_eq!(&WKP_HELLO[..13], b"STP-WKP-HELLO");
        assert_eq!(&WKP_OK[..10], b"STP-WKP-OK");
        assert!(WKP_OK[10..].iter().all(|&b| b == 0));
        let offer = Offer {
            public_key: [0xAA; 32],
            nonce: [0xBB; 16],
        };
        let m = stg_message(7, 2, &offer);
        assert_eq!(&m[..8], &[0, 0, 0, 7, 0, 0, 0, 2]);
        assert_eq!(&m[8..], &offer.to_bytes());
        let m = port_message(32_768, &offer);
        assert_eq!(&m[..4], &32_768u32.to_be_bytes());
        assert_eq!(m.len(), 52);
    }

    #[test]
    fn client_rejects_a_wrong_well_known_string() {
        let layer = tcp_only();
        let wkp = free_wkp();
        let peer = thread::spawn(move || {
            let mut s = connect_retrying(SocketAddr::new(LOCAL, wkp));
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let e = fs_client_accept(&layer, LOCAL, wkp, None, Duration::from_secs(3)).unwrap_err();
        assert!(
            matches!(e, FlowError::WrongString { step: "120", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("not an STP endpoint"), "{e}");
        assert!(
            layer.descriptors().is_empty(),
            "the flow leaked descriptors"
        );
        peer.join().unwrap();
    }

    #[test]
    fn silent_peer_times_out_naming_the_step() {
        let layer = tcp_only();
        let wkp = free_wkp();
        let l = TcpListener::bind((LOCAL, wkp)).unwrap();
        // Accepts, then says nothing.
        let peer = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            thread::sleep(Duration::from_millis(800));
            drop(s);
        });
        let mut layer_stgs = HashMap::new();
        let none: std::sync::Arc<dyn crate::stream::PathSource> = std::sync::Arc::new(
            || -> Result<Box<dyn crate::mailbox::Mailbox>, crate::vendor::MailboxError> {
                Err(crate::error::SetupError::NoPaths.into())
            },
        );
        layer_stgs.insert(7, none);
        let server = SocketLayer::new(layer_stgs, Config::default());
        let t0 = Instant::now();
        let e = fs_server_connect(&server, LOCAL, wkp, 7, 2, None, Duration::from_millis(300))
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(matches!(e, FlowError::Timeout { step: "92", .. }), "{e}");
        assert!(e.to_string().contains("(step 92"), "{e}");
        assert!(server.descriptors().is_empty());
        // A server without the STG fails before any network traffic.
        let e = fs_server_connect(&layer, LOCAL, wkp, 7, 2, None, Duration::from_millis(300))
            .unwrap_err();
        assert!(matches!(e, FlowError::UnknownStg { stg: 7, .. }), "{e}");
        peer.join().unwrap();
    }
}
