//! The two daemons, `stp backup client agent` and `stp backup server
//! serve` (docs/BACKUP.md §8): the ports they listen on, the start-up
//! check that every one of them is free, what they print when they start,
//! and the session loop with its bounded back-off.
//!
//! A daemon never spins: a session that fails is followed by a pause that
//! doubles from [`Backoff::FIRST`] up to [`Backoff::MAX`]; a port that
//! another process holds stops the daemon (at start at once, later after
//! [`MAX_PORT_IN_USE`] failures in a row) with an error naming the port
//! and what to do. A wait in which no peer came ([`Idle`]) is neither an
//! error nor a reason to pause.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use stp_core::sockets::SockError;

use super::pipe::Policy;
use super::session::{Host, Outcome};

/// Which daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `stp backup client agent`: waits for file-system sessions.
    Agent,
    /// `stp backup server serve`: waits for database sessions.
    Server,
}

impl Role {
    /// The command that runs it.
    pub fn command(self) -> &'static str {
        match self {
            Role::Agent => "stp backup client agent",
            Role::Server => "stp backup server serve",
        }
    }
}

/// One address a daemon listens on, and what arrives there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listening {
    /// The address.
    pub addr: SocketAddr,
    /// `WKP`, `WKP+1` or `WKP+2`.
    pub port: &'static str,
    /// What arrives there.
    pub carries: &'static str,
}

/// The addresses `role` listens on with `host`'s configuration: an agent on
/// WKP and WKP+1 (the array's sessions, unless the policy is `never`) and
/// WKP+2 (LAN sessions, unless it is `always`); a server on WKP and WKP+2
/// likewise.
pub fn ports(host: &Host, role: Role) -> Result<Vec<Listening>> {
    let at = |offset: u16| -> Result<SocketAddr> {
        let port = host.wkp.checked_add(offset).ok_or_else(|| {
            anyhow::anyhow!(
                "wkp {} leaves no room for WKP+{offset}: set a wkp of at most {} in the STP \
                 configuration",
                host.wkp,
                u16::MAX - 2
            )
        })?;
        Ok(SocketAddr::new(host.bind_ip, port))
    };
    let array = host.policy != Policy::Never;
    let lan = host.policy != Policy::Always;
    let mut v = Vec::new();
    match role {
        Role::Agent => {
            if array {
                v.push(Listening {
                    addr: at(0)?,
                    port: "WKP",
                    carries: "the server's file-system sessions (control and errors)",
                });
                v.push(Listening {
                    addr: at(1)?,
                    port: "WKP+1",
                    carries: "the STG and key exchange of those sessions",
                });
            }
        }
        Role::Server => {
            if array {
                v.push(Listening {
                    addr: at(0)?,
                    port: "WKP",
                    carries: "clients' database backups and restores through the array",
                });
            }
        }
    }
    if lan {
        v.push(Listening {
            addr: at(2)?,
            port: "WKP+2",
            carries: "LAN sessions (the data over TCP)",
        });
    }
    Ok(v)
}

/// A port the daemon needs is held by another process.
#[derive(Debug)]
pub struct PortInUse {
    /// The daemon.
    pub role: Role,
    /// The address, if known.
    pub addr: Option<SocketAddr>,
    /// `WKP`, `WKP+1`, `WKP+2`, or empty when unknown.
    pub port: &'static str,
}

impl fmt::Display for PortInUse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(a) if !self.port.is_empty() => write!(
                f,
                "{} cannot listen on {a} ({})",
                self.role.command(),
                self.port
            )?,
            Some(a) => write!(f, "{} cannot listen on {a}", self.role.command())?,
            None => write!(
                f,
                "{} cannot listen on one of its ports",
                self.role.command()
            )?,
        }
        write!(
            f,
            ": the address is already in use by another process. Stop that process (`ss \
             -ltnp` names it; another stp backup agent or server on this host uses the same \
             ports: an agent and `serve` on one host need different `bind` addresses), or \
             give both hosts another `wkp` in their STP configuration"
        )
    }
}

impl std::error::Error for PortInUse {}

/// Checks at start that every port of [`ports`] is free (binds each and
/// lets it go), so a daemon that cannot work says so at once.
pub fn check_ports(host: &Host, role: Role) -> Result<Vec<Listening>> {
    let ports = ports(host, role)?;
    for p in &ports {
        if let Err(e) = TcpListener::bind(p.addr) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(PortInUse {
                    role,
                    addr: Some(p.addr),
                    port: p.port,
                }
                .into());
            }
            return Err(anyhow::Error::new(e).context(format!(
                "{} cannot listen on {} ({}): check the `bind` address of the backup \
                 configuration",
                role.command(),
                p.addr,
                p.port
            )));
        }
    }
    Ok(ports)
}

/// True if `e` (or anything in its chain) says an address is in use.
pub fn is_addr_in_use(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if c.is::<PortInUse>() {
            return true;
        }
        if let Some(s) = c.downcast_ref::<SockError>() {
            return s.io_kind() == Some(std::io::ErrorKind::AddrInUse);
        }
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}

/// No peer started a session within the host's timeout: a daemon's idle
/// wait ended; it waits again.
#[derive(Debug)]
pub struct Idle {
    /// How long it waited.
    pub waited: Duration,
}

impl fmt::Display for Idle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no session arrived within {:?}", self.waited)
    }
}

impl std::error::Error for Idle {}

/// The pause after a failed session: doubles from [`Backoff::FIRST`] to
/// [`Backoff::MAX`], back to the start after a good one.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: Backoff::FIRST,
        }
    }
}

impl Backoff {
    /// The first pause.
    pub const FIRST: Duration = Duration::from_millis(250);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(30);

    /// The pause after one more failure.
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Backoff::MAX);
        d
    }

    /// A session went well: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.next = Backoff::FIRST;
    }
}

/// Failed sessions in a row whose cause is a port in use after which a
/// daemon stops.
pub const MAX_PORT_IN_USE: u32 = 5;

/// What a daemon's loop does besides running sessions: reporting and
/// pausing (tests pass their own).
pub trait LoopIo {
    /// A session ended well.
    fn outcome(&mut self, o: &Outcome) -> Result<()>;
    /// A session failed; the next starts after `pause`.
    fn failed(&mut self, e: &anyhow::Error, pause: Duration);
    /// Waits `d`.
    fn sleep(&mut self, d: Duration);
}

/// Runs `session` until `once` is satisfied (one good session), or
/// forever; pauses after each failure ([`Backoff`]); returns the error
/// that stops it: a failed session with `once`, or a port held by another
/// process [`MAX_PORT_IN_USE`] times in a row. [`Idle`] waits are skipped
/// silently.
pub fn run_loop(
    role: Role,
    once: bool,
    io: &mut dyn LoopIo,
    session: &mut dyn FnMut() -> Result<Outcome>,
) -> Result<()> {
    let mut backoff = Backoff::default();
    let mut in_use = 0u32;
    loop {
        match session() {
            Ok(o) => {
                backoff.succeeded();
                in_use = 0;
                io.outcome(&o)?;
                if once {
                    return Ok(());
                }
            }
            Err(e) if e.is::<Idle>() => {}
            Err(e) if once => return Err(e),
            Err(e) => {
                if is_addr_in_use(&e) {
                    in_use += 1;
                    if in_use >= MAX_PORT_IN_USE {
                        let held = PortInUse {
                            role,
                            addr: None,
                            port: "",
                        };
                        return Err(e.context(format!(
                            "{held} (the last {MAX_PORT_IN_USE} sessions failed this way; \
                             stopping)"
                        )));
                    }
                } else {
                    in_use = 0;
                }
                let pause = backoff.failed();
                io.failed(&e, pause);
                io.sleep(pause);
            }
        }
    }
}

/// The array's state on a daemon's host, as it starts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ArrayStatus {
    /// The STG the data uses.
    pub stg: u32,
    /// `resolved`: its members were found and open; `unavailable`: they
    /// were not (see `why`); `not used`: the policy is `never`.
    pub state: String,
    /// `vendor` or `block` (when the STP configuration names the STG).
    pub mode: Option<String>,
    /// The members' device paths on this host, in member order.
    pub members: Vec<String>,
    /// How the members are driven (io_uring engine or synchronous SG_IO,
    /// and why).
    pub engine: Option<String>,
    /// Why the array is not used, if it is not.
    pub why: Option<String>,
    /// The fallback policy.
    pub fallback: String,
}

impl ArrayStatus {
    /// One line for the operator.
    pub fn line(&self) -> String {
        let mut s = format!("array: STG {} {}", self.stg, self.state);
        if let Some(m) = &self.mode {
            s += &format!(", {m} mode");
        }
        if !self.members.is_empty() {
            s += &format!(", members {}", self.members.join(" "));
        }
        if let Some(e) = &self.engine {
            s += &format!(", {e}");
        }
        if let Some(w) = &self.why {
            s += &format!(": {w}");
        }
        s += &format!(" (fallback = \"{}\"", self.fallback);
        s += match (self.state.as_str(), self.fallback.as_str()) {
            ("resolved", _) => ")",
            (_, "preferred") => "; sessions go over the LAN)",
            (_, "never") => "; sessions go over the LAN)",
            _ => "; sessions fail until the array is reachable)",
        };
        s
    }
}

/// What a daemon prints when it starts (text, or one JSON line).
#[derive(Clone, Debug, Serialize)]
pub struct Started {
    /// Always `started`.
    pub event: &'static str,
    /// Which daemon.
    pub role: Role,
    /// Where it listens.
    pub listening: Vec<Listening>,
    /// The array's state.
    pub array: ArrayStatus,
}

impl Started {
    /// The text form: one line per address and one for the array.
    pub fn lines(&self) -> Vec<String> {
        let mut v = vec![format!("{}: started", self.role.command())];
        for l in &self.listening {
            v.push(format!(
                "  listening on {} ({}: {})",
                l.addr, l.port, l.carries
            ));
        }
        v.push(format!("  {}", self.array.line()));
        v
    }
}

/// Tells a service manager that watches `NOTIFY_SOCKET` (systemd's
/// `Type=notify`) that the daemon is up, with a one-line status. Returns
/// false when no manager asked (the variable is unset).
pub fn notify_ready(status: &str) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let msg = format!("READY=1\nSTATUS={}\n", status.replace('\n', " "));
    let sock =
        UnixDatagram::unbound().context("creating a socket to notify the service manager")?;
    let sent = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)
        }
        None => sock.send_to(msg.as_bytes(), std::path::Path::new(&path)),
    };
    sent.with_context(|| {
        format!(
            "notifying the service manager at NOTIFY_SOCKET={}",
            path.to_string_lossy()
        )
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_restarts_after_success() {
        let mut b = Backoff::default();
        let pauses: Vec<Duration> = (0..12).map(|_| b.failed()).collect();
        assert_eq!(pauses[0], Backoff::FIRST);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]), "{pauses:?}");
        assert!(pauses.iter().all(|p| *p <= Backoff::MAX), "{pauses:?}");
        assert_eq!(*pauses.last().unwrap(), Backoff::MAX);
        b.succeeded();
        assert_eq!(b.failed(), Backoff::FIRST);
    }

    #[derive(Default)]
    struct Recorder {
        pauses: Vec<Duration>,
        outcomes: usize,
    }

    impl LoopIo for Recorder {
        fn outcome(&mut self, _: &Outcome) -> Result<()> {
            self.outcomes += 1;
            Ok(())
        }
        fn failed(&mut self, _: &anyhow::Error, _: Duration) {}
        fn sleep(&mut self, d: Duration) {
            self.pauses.push(d);
        }
    }

    fn in_use() -> anyhow::Error {
        anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::AddrInUse))
            .context("listening on 127.0.0.1:5102")
    }

    #[test]
    fn a_port_in_use_stops_the_loop_after_pausing() {
        let mut io = Recorder::default();
        let mut calls = 0u32;
        let e = run_loop(Role::Server, false, &mut io, &mut || {
            calls += 1;
            // A few other failures first, then the port is taken for good.
            if calls <= 3 {
                anyhow::bail!("the peer went away")
            }
            Err(in_use())
        })
        .unwrap_err();
        assert_eq!(calls, 3 + MAX_PORT_IN_USE);
        let msg = format!("{e:#}");
        assert!(msg.contains("already in use"), "{msg}");
        assert!(msg.contains("127.0.0.1:5102"), "{msg}");
        assert!(msg.contains("wkp"), "{msg}");
        // Every failure but the last paused, and the pauses grew.
        assert_eq!(io.pauses.len() as u32, calls - 1);
        assert!(
            io.pauses.windows(2).all(|w| w[1] >= w[0]),
            "{:?}",
            io.pauses
        );
    }

    #[test]
    fn idle_waits_neither_pause_nor_stop_and_once_ends_after_one_session() {
        let mut io = Recorder::default();
        let mut calls = 0u32;
        run_loop(Role::Agent, true, &mut io, &mut || {
            calls += 1;
            if calls < 4 {
                return Err(Idle {
                    waited: Duration::from_secs(1),
                }
                .into());
            }
            Ok(Outcome::default())
        })
        .unwrap();
        assert_eq!(calls, 4);
        assert!(io.pauses.is_empty());
        assert_eq!(io.outcomes, 1);
    }

    #[test]
    fn a_port_in_use_error_is_recognised_through_the_chain() {
        assert!(is_addr_in_use(&in_use()));
        assert!(!is_addr_in_use(&anyhow::anyhow!("timed out")));
    }
}
