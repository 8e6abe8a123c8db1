//! STP byte streams end to end: two hosts, the in-process array, the
//! vendor-mode mailbox, authenticated frames, the connection state machine
//! and the blocking socket layer.

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use scsi::Transport;
use sim_target::{Array, Host, LunConfig, StgMailbox, StgSpec};
use stp_core::auth::{FrameKey, Handshake, Role};
use stp_core::conn::Config;
use stp_core::mailbox::{Mailbox, VendorMailbox};
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::vendor::MailboxError;

const T: Duration = Duration::from_secs(20);

fn array(stgs: &[(u32, Vec<u64>)]) -> Array {
    let a = Array::new();
    for (_, members) in stgs {
        for &id in members {
            a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
        }
    }
    let specs = stgs
        .iter()
        .map(|(id, m)| StgSpec::new(*id, m.clone()))
        .collect();
    StgMailbox::with_seed(&a, specs, 3).unwrap().install(&a);
    a
}

/// Paths for `host` onto the given member LUNs.
fn source(a: &Array, host: &str, members: Vec<u64>) -> Arc<dyn PathSource> {
    let h = Host::login(a, host);
    Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
        let paths = members
            .iter()
            .map(|&l| Box::new(h.open(l).expect("member LUN")) as Box<dyn Transport>)
            .collect();
        Ok(Box::new(VendorMailbox::new(paths)?))
    })
}

fn keys(seed: u64) -> (FrameKey, FrameKey) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Handshake::new(&mut rng);
    let s = Handshake::new(&mut rng);
    let (co, so) = (c.public(), s.public());
    (
        c.finish(&so, Role::Client, None).unwrap(),
        s.finish(&co, Role::Server, None).unwrap(),
    )
}

fn config() -> Config {
    Config {
        max_payload: 64 * 1024,
        ..Config::default()
    }
}

/// A deterministic stream: the receiver regenerates and compares.
fn chunk(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ offset.rotate_left(17));
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

const CHUNK: usize = 100_003; // odd on purpose

fn send_stream(s: &mut StpStream, seed: u64, total: u64) {
    let mut off = 0u64;
    while off < total {
        let n = CHUNK.min((total - off) as usize);
        s.write_all(&chunk(seed, off, n)).unwrap();
        off += n as u64;
    }
    s.flush().unwrap();
}

fn recv_stream(s: &mut StpStream, seed: u64, total: u64) {
    let mut got = Vec::new();
    let mut off = 0u64;
    let mut buf = vec![0u8; 70_001];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        while got.len() >= CHUNK || (off + got.len() as u64 == total && !got.is_empty()) {
            let take = CHUNK.min(got.len());
            assert_eq!(got[..take], chunk(seed, off, take)[..], "at offset {off}");
            got.drain(..take);
            off += take as u64;
        }
    }
    assert_eq!(off + got.len() as u64, total, "stream length");
}

fn transfer(total: u64, seed: u64) {
    let a = array(&[(7, vec![0, 1])]);
    let (kc, ks) = keys(seed);
    let server_src = source(&a, "server", vec![0, 1]);
    let client_src = source(&a, "client", vec![1, 0]);
    let mut listener = StpListener::bind(server_src, Some(5101), ks, config()).unwrap();
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        recv_stream(&mut s, seed, total);
        // Echo a short trailer the other way.
        s.write_all(b"done").unwrap();
        s.shutdown(T).unwrap();
    });
    let mut c = StpStream::connect(client_src, 5101, kc, config(), T).unwrap();
    send_stream(&mut c, seed, total);
    c.shutdown(T).unwrap();
    let mut trailer = Vec::new();
    c.read_to_end(&mut trailer).unwrap();
    assert_eq!(trailer, b"done");
    server.join().unwrap();
}

#[test]
fn empty_stream() {
    transfer(0, 1);
}

#[test]
fn one_byte() {
    transfer(1, 2);
}

#[test]
fn odd_sizes() {
    for (i, n) in [65_535u64, 65_536, 65_537, 333_333].into_iter().enumerate() {
        transfer(n, 10 + i as u64);
    }
}

#[test]
fn sixty_four_mebibytes() {
    transfer(64 << 20, 99);
}

/// The large transfer: 1 GiB, regenerated and compared at the far
/// end (about a minute on a 2-core machine at the test profile).
#[test]
fn one_gibibyte() {
    transfer(1 << 30, 1_000_000_007);
}

#[test]
fn concurrent_connections_on_two_stgs() {
    let a = array(&[(7, vec![0, 1]), (8, vec![2, 3])]);
    let mut handles = Vec::new();
    for (stg_luns, port, seed) in [
        (vec![0u64, 1], 5101u32, 21u64),
        (vec![0, 1], 5102, 22),
        (vec![2, 3], 5101, 23),
    ] {
        let (kc, ks) = keys(seed);
        let server_src = source(&a, &format!("server-{seed}"), stg_luns.clone());
        let client_src = source(&a, &format!("client-{seed}"), stg_luns);
        let mut listener = StpListener::bind(server_src, Some(port), ks, config()).unwrap();
        handles.push(thread::spawn(move || {
            let mut s = listener.accept(T).unwrap();
            recv_stream(&mut s, seed, 3 << 20);
        }));
        handles.push(thread::spawn(move || {
            let mut c = StpStream::connect(client_src, port, kc, config(), T).unwrap();
            send_stream(&mut c, seed, 3 << 20);
            c.shutdown(T).unwrap();
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn wrong_key_never_connects() {
    let a = array(&[(7, vec![0, 1])]);
    let (_, ks) = keys(5);
    let (wrong, _) = keys(6);
    let mut listener =
        StpListener::bind(source(&a, "server", vec![0, 1]), Some(5101), ks, config()).unwrap();
    let client = thread::spawn({
        let src = source(&a, "client", vec![0, 1]);
        move || StpStream::connect(src, 5101, wrong, config(), Duration::from_secs(2))
    });
    assert!(listener.accept(Duration::from_secs(3)).is_err());
    assert!(client.join().unwrap().is_err());
}

/// SEND commands captured by a [`Tap`]: CDB and data-out bytes.
type SendLog = Arc<std::sync::Mutex<Vec<(scsi::CdbBuf, Vec<u8>)>>>;

/// Records the SEND commands a path carries: a stand-in for an attacker who
/// has learned the client's binding handle and captured its frames.
struct Tap {
    inner: sim_target::InProcTransport,
    log: SendLog,
}

impl Transport for Tap {
    fn submit(&mut self, cmd: scsi::Command) -> Result<(), scsi::SubmitError> {
        if cmd.cdb.opcode() == stp_core::vendor::SEND {
            self.log.lock().unwrap().push((cmd.cdb, cmd.data.to_vec()));
        }
        self.inner.submit(cmd)
    }
    fn reap(
        &mut self,
        out: &mut Vec<scsi::Completion>,
        wait: Option<Duration>,
    ) -> std::io::Result<usize> {
        self.inner.reap(out, wait)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn describe(&self) -> String {
        format!("tap on {}", self.inner.describe())
    }
}

#[test]
fn replayed_frames_from_a_third_initiator_change_nothing() {
    let a = array(&[(7, vec![0, 1])]);
    let (kc, ks) = keys(41);
    let log: SendLog = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client_src: Arc<dyn PathSource> = {
        let h = Host::login(&a, "client");
        let log = log.clone();
        Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
            let paths = [0u64, 1]
                .iter()
                .map(|&l| {
                    Box::new(Tap {
                        inner: h.open(l).expect("member LUN"),
                        log: log.clone(),
                    }) as Box<dyn Transport>
                })
                .collect();
            Ok(Box::new(VendorMailbox::new(paths)?))
        })
    };
    let mut listener =
        StpListener::bind(source(&a, "server", vec![0, 1]), Some(5101), ks, config()).unwrap();
    // Halves on the receiver's comparison boundaries.
    let total = 40 * CHUNK as u64;
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        recv_stream(&mut s, 41, total);
        s.stats()
    });
    let mut c = StpStream::connect(client_src, 5101, kc, config(), T).unwrap();
    let half = total / 2;
    let mut off = 0u64;
    while off < half {
        let n = CHUNK.min((half - off) as usize);
        c.write_all(&chunk(41, off, n)).unwrap();
        off += n as u64;
    }
    c.flush().unwrap();

    // A third initiator replays every captured SEND: handshake and data.
    let captured = log.lock().unwrap().clone();
    assert!(captured.len() > 10, "captured {} SENDs", captured.len());
    let mut intruder = Host::login(&a, "intruder").open(0).unwrap();
    for (cdb, data) in &captured {
        let cmd = scsi::Command::data_out(*cdb, scsi::IoBuf::from_slice(data));
        // The array accepts them: the handle and source port are genuine.
        intruder.execute(cmd).into_result().unwrap();
    }

    while off < total {
        let n = CHUNK.min((total - off) as usize);
        c.write_all(&chunk(41, off, n)).unwrap();
        off += n as u64;
    }
    c.shutdown(T).unwrap();
    let stats = server.join().unwrap();
    assert!(
        stats.duplicates_received > 0,
        "the replay reached the server: {stats:?}"
    );
}
