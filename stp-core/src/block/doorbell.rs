//! Block mode's doorbell: a datagram over the LAN that tells a host to
//! poll its lanes now (docs/PROTOCOL.md §4, Doorbell).
//!
//! A stock array cannot tell a host that a slot arrived, so an idle
//! consumer polls slowly (a few commands a second) and the first slot after
//! a pause waits for its next poll. The hosts share a LAN for control: a
//! sender that has been quiet towards a host rings that host's doorbell
//! after it publishes, and the host polls at once; where a probe of the
//! array is dear, a sender rings after every send, and the waiting side
//! polls when rung rather than probing for replies (`super::poll`). The data never takes
//! the LAN, and nothing but *when to poll* is taken from a datagram: a
//! forged or lost one costs a poll or the wait there would have been
//! without it. Rung polls that find nothing space the next ones out, up to
//! [`RING_SPACING`] (a ring within the spacing is put off, not dropped),
//! so a flood costs the array no more than that.
//!
//! [`Ring`] is the datagram, with the parse-everything-fails-typed contract
//! of the on-disk formats; [`Doorbell`] is the socket and the peers'
//! addresses.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use zerocopy::byteorder::{BigEndian, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::stg::MAX_HOSTS;

/// Doorbell magic, `"STPD"`.
pub const RING_MAGIC: u32 = 0x5354_5044;
/// Bytes of a doorbell datagram.
pub const RING_LEN: usize = 16;
/// A sender rings a host only when it has sent it nothing for this long:
/// a consumer that took a slot less than this ago still polls at most this
/// far apart (the warm interval's bound, [`super::PollConfig::max`]).
pub const RING_QUIET: Duration = Duration::from_millis(10);
/// How often the listening thread wakes with nothing heard, to notice
/// that the STG closed.
const LISTEN_SLICE: Duration = Duration::from_millis(50);
/// Rung polls that find nothing space the next ones out up to this (a
/// ring within the spacing is put off to its end): a flood of datagrams
/// costs the array about 200 polls a second at most, and a real ring waits
/// at most this for a forged one.
pub const RING_SPACING: Duration = Duration::from_millis(5);

/// The datagram's exact layout.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRing {
    /// [`RING_MAGIC`].
    pub magic: U32<BigEndian>,
    /// The STG whose lanes to poll.
    pub stg_id: U32<BigEndian>,
    /// The ringing host.
    pub src: U16<BigEndian>,
    /// The host rung.
    pub dst: U16<BigEndian>,
    /// The low 32 bits of the STG's format generation.
    pub generation: U32<BigEndian>,
}

const _: () = assert!(std::mem::size_of::<RawRing>() == RING_LEN);

/// A doorbell datagram: host `src` has published slots for host `dst` on
/// STG `stg_id` of format `generation` (its low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// The STG.
    pub stg_id: u32,
    /// The ringing host.
    pub src: u16,
    /// The host rung.
    pub dst: u16,
    /// The low 32 bits of the format generation.
    pub generation: u32,
}

/// Why a datagram is not a doorbell for this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// Not [`RING_LEN`] bytes.
    #[error("doorbell datagram of {0} bytes, need {RING_LEN}")]
    Length(usize),
    /// No `STPD` magic.
    #[error("bad doorbell magic 0x{0:08x}")]
    BadMagic(u32),
    /// Another STG, format, or host, or a host outside the layout.
    #[error("a doorbell for another STG, format or host")]
    NotOurs,
}

impl Ring {
    /// The datagram's bytes.
    pub fn encode(&self) -> [u8; RING_LEN] {
        let raw = RawRing {
            magic: RING_MAGIC.into(),
            stg_id: self.stg_id.into(),
            src: self.src.into(),
            dst: self.dst.into(),
            generation: self.generation.into(),
        };
        let mut b = [0u8; RING_LEN];
        b.copy_from_slice(raw.as_bytes());
        b
    }

    /// Parses a datagram (any bytes).
    pub fn decode(bytes: &[u8]) -> Result<Ring, RingError> {
        if bytes.len() != RING_LEN {
            return Err(RingError::Length(bytes.len()));
        }
        let Ok(raw) = RawRing::ref_from_bytes(bytes) else {
            return Err(RingError::Length(bytes.len()));
        };
        if raw.magic.get() != RING_MAGIC {
            return Err(RingError::BadMagic(raw.magic.get()));
        }
        Ok(Ring {
            stg_id: raw.stg_id.get(),
            src: raw.src.get(),
            dst: raw.dst.get(),
            generation: raw.generation.get(),
        })
    }

    /// Whether this is a doorbell of STG `stg_id` (format `generation`)
    /// from another of its `hosts` hosts to `host`.
    pub fn is_for(&self, stg_id: u32, generation: u64, hosts: u16, host: u16) -> bool {
        self.stg_id == stg_id
            && self.generation == generation as u32
            && self.dst == host
            && self.src != host
            && self.src < hosts
    }
}

/// Where each host of a block-mode STG hears its doorbell: host `i` at
/// `hosts[i]` (`None`: that host has none, and is never rung). A host binds
/// its own address; the others are where it rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Doorbells {
    /// By host index.
    pub hosts: [Option<SocketAddr>; MAX_HOSTS as usize],
}

impl Doorbells {
    /// From the addresses of hosts `0..addrs.len()` (at most
    /// [`MAX_HOSTS`]; more are ignored).
    pub fn new(addrs: &[SocketAddr]) -> Doorbells {
        let mut d = Doorbells::default();
        for (slot, a) in d.hosts.iter_mut().zip(addrs) {
            *slot = Some(*a);
        }
        d
    }

    /// Addresses on loopback for `hosts` hosts, for benches and tests that
    /// run every host in one process. Each is a UDP socket bound now and
    /// kept until the first host of this process to bind its address takes
    /// it over, so no other socket can take the port in between.
    pub fn loopback(hosts: usize) -> io::Result<Doorbells> {
        let sockets = (0..hosts)
            .map(|_| UdpSocket::bind("127.0.0.1:0"))
            .collect::<io::Result<Vec<_>>>()?;
        let addrs = sockets
            .iter()
            .map(UdpSocket::local_addr)
            .collect::<io::Result<Vec<_>>>()?;
        super::lock(&RESERVED).extend(sockets);
        Ok(Doorbells::new(&addrs))
    }

    /// Host `i`'s address, if it has one.
    pub fn of(&self, i: u16) -> Option<SocketAddr> {
        self.hosts.get(usize::from(i)).copied().flatten()
    }

    /// The addresses, in host index order, up to the first host without
    /// one.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.hosts.iter().map_while(|a| *a).collect()
    }
}

/// Sockets [`Doorbells::loopback`] bound and no host has taken yet.
static RESERVED: Mutex<Vec<UdpSocket>> = Mutex::new(Vec::new());

/// The doorbell addresses this process's hosts have bound.
static BOUND: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

/// Whether a host of this process has bound `addr` (a ring from there was
/// counted when it was sent).
pub(crate) fn bound_here(addr: SocketAddr) -> bool {
    super::lock(&BOUND).contains(&addr)
}

/// The socket reserved at `addr`, if [`Doorbells::loopback`] holds one.
fn take_reserved(addr: SocketAddr) -> Option<UdpSocket> {
    let mut reserved = super::lock(&RESERVED);
    let i = reserved
        .iter()
        .position(|s| s.local_addr().is_ok_and(|a| a == addr))?;
    Some(reserved.swap_remove(i))
}

/// One host's doorbell: its socket and where its peers hear theirs.
///
/// Its address counts as bound in this process ([`bound_here`]) until it
/// is dropped.
#[derive(Debug)]
pub(crate) struct Doorbell {
    socket: UdpSocket,
    /// The address it is bound to.
    own: SocketAddr,
    peers: Doorbells,
    /// When this host last sent to each host (rings only after
    /// [`RING_QUIET`]).
    last_sent: Vec<Option<Instant>>,
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        let mut bound = super::lock(&BOUND);
        if let Some(i) = bound.iter().position(|a| *a == self.own) {
            bound.swap_remove(i);
        }
    }
}

impl Doorbell {
    /// Binds this host's address in `peers`; `None` when it has none.
    pub fn bind(peers: Doorbells, host: u16) -> io::Result<Option<Doorbell>> {
        let Some(own) = peers.of(host) else {
            return Ok(None);
        };
        let socket = match take_reserved(own) {
            Some(s) => s,
            None => UdpSocket::bind(own)?,
        };
        socket.set_read_timeout(Some(LISTEN_SLICE))?;
        let own = socket.local_addr()?;
        super::lock(&BOUND).push(own);
        Ok(Some(Doorbell {
            socket,
            own,
            peers,
            last_sent: vec![None; MAX_HOSTS as usize],
        }))
    }

    /// A handle on the socket for the receiving thread.
    pub fn receiver(&self) -> io::Result<UdpSocket> {
        self.socket.try_clone()
    }

    /// This host made slots visible to `dst` at `now`: rings `dst` (`ring`
    /// the datagram) when it has an address and `every` send is rung or
    /// this host had sent it nothing for [`RING_QUIET`]. True when a
    /// datagram went out.
    pub fn ring(&mut self, dst: u16, ring: &Ring, now: Instant, every: bool) -> bool {
        let Some(last) = self.last_sent.get_mut(usize::from(dst)) else {
            return false;
        };
        let quiet = last.is_none_or(|t| now.saturating_duration_since(t) >= RING_QUIET);
        *last = Some(now);
        match self.peers.of(dst) {
            Some(addr) if quiet || every => self.socket.send_to(&ring.encode(), addr).is_ok(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RING: Ring = Ring {
        stg_id: 7,
        src: 1,
        dst: 0,
        generation: 0x0506_0708,
    };

    #[test]
    fn literal_bytes() {
        let b = RING.encode();
        assert_eq!(
            b,
            [b'S', b'T', b'P', b'D', 0, 0, 0, 7, 0, 1, 0, 0, 5, 6, 7, 8]
        );
        assert_eq!(Ring::decode(&b), Ok(RING));
        assert_eq!(Ring::decode(&b[..15]), Err(RingError::Length(15)));
        assert_eq!(Ring::decode(&[0; 17]), Err(RingError::Length(17)));
        assert_eq!(Ring::decode(&[0; 16]), Err(RingError::BadMagic(0)));
    }

    #[test]
    fn only_a_peer_of_this_stg_and_format_rings_this_host() {
        let generation = 0x1122_3344_0506_0708;
        assert!(RING.is_for(7, generation, 2, 0));
        assert!(!RING.is_for(8, generation, 2, 0), "another STG");
        assert!(!RING.is_for(7, generation + 1, 2, 0), "another format");
        assert!(!RING.is_for(7, generation, 2, 1), "another host's");
        let own = Ring { src: 0, ..RING };
        assert!(!own.is_for(7, generation, 2, 0), "from itself");
        let outside = Ring { src: 2, ..RING };
        assert!(
            !outside.is_for(7, generation, 2, 0),
            "a host beyond the layout"
        );
    }

    #[test]
    fn a_sender_rings_only_after_a_quiet_spell_and_a_host_hears_it() {
        let peers = Doorbells::loopback(2).unwrap();
        let addrs = peers.addrs();
        let mut h1 = Doorbell::bind(peers, 1).unwrap().expect("host 1 has one");
        let h0 = Doorbell::bind(peers, 0).unwrap().expect("host 0 has one");
        let t0 = Instant::now();
        assert!(h1.ring(0, &RING, t0, false), "the first send rings");
        assert!(
            !h1.ring(0, &RING, t0 + RING_QUIET / 2, false),
            "within the quiet spell"
        );
        assert!(
            h1.ring(0, &RING, t0 + RING_QUIET * 3 / 4, true),
            "unless every send rings"
        );
        assert!(h1.ring(0, &RING, t0 + RING_QUIET * 2, false), "after it");
        assert!(!h1.ring(5, &RING, t0, true), "a host with no address");
        assert!(
            !h1.ring(u16::MAX, &RING, t0, true),
            "a host beyond any layout"
        );
        let rx = h0.receiver().unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let (n, _) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(Ring::decode(&buf[..n]), Ok(RING));
        }
        let none = Doorbells::new(&addrs[..1]);
        assert!(Doorbell::bind(none, 1).unwrap().is_none());
        // Both are bound in this process until dropped.
        assert!(bound_here(addrs[0]) && bound_here(addrs[1]));
        drop(h1);
        assert!(!bound_here(addrs[1]) && bound_here(addrs[0]));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_typed(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(r) = Ring::decode(&bytes) {
                let again = r.encode();
                prop_assert_eq!(again.as_slice(), bytes.as_slice());
            }
        }
    }
}
