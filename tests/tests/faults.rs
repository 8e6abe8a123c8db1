//! Every stream still arrives exact, exactly once: STP byte streams over
//! vendor-mode paths that fail, lose, delay and reorder commands
//! ([`sim_target::FaultyTransport`] over the in-process front end), and a
//! stream whose peer's paths die fails with a clear error instead of hanging.
//!
//! Each scenario runs a 4 MiB stream (regenerated at the far end and
//! compared chunk by chunk, length exact, so a lost or duplicated frame is
//! caught) for several seeds. Faults are armed once both ends are connected,
//! so the scenarios exercise the data path; the handshake under faults has
//! its own test.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use scsi::Transport;
use sim_target::{
    Array, FaultControl, FaultPlan, FaultStats, FaultyTransport, Host, InProcOptions, LunConfig,
    StgMailbox, StgSpec,
};
use stp_core::conn::{Config, Stats};
use stp_core::mailbox::{Mailbox, VendorMailbox};
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::vendor::MailboxError;
use stp_tests::e2e::keys;

/// Socket-level timeout for connect, accept and shutdown.
const T: Duration = Duration::from_secs(10);
/// A scenario taking longer than this has hung.
const WATCHDOG: Duration = Duration::from_secs(60);
/// Bytes per stream.
const TOTAL: u64 = 4 << 20;
/// The STG's member LUNs.
const MEMBERS: [u64; 2] = [0, 1];
/// The server's well-known port.
const PORT: u32 = 5101;
/// Seeds every scenario runs with.
const SEEDS: [u64; 4] = [1, 2, 3, 0xDEAD_BEEF];

fn array() -> (Array, Arc<StgMailbox>) {
    let a = Array::new();
    for id in MEMBERS {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    let spec = StgSpec::new(7, MEMBERS.to_vec());
    let m = StgMailbox::with_seed(&a, vec![spec], 3).unwrap();
    m.install(&a);
    (a, m)
}

/// Mixes a seed with a stream index (splitmix64's finaliser).
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Paths for a new host onto the STG's members, each a faulty in-process
/// path under `control`. Every mailbox opened gets fresh seeds, derived
/// from `seed` and the order of opening, so a run is repeatable.
fn source(
    a: &Array,
    host: &str,
    plan: &FaultPlan,
    seed: u64,
    control: &FaultControl,
    shuffle: bool,
) -> Arc<dyn PathSource> {
    let h = Host::login(a, host);
    let plan = plan.clone();
    let control = control.clone();
    let opened = AtomicU64::new(0);
    Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
        let n = opened.fetch_add(1, Ordering::Relaxed);
        let paths = MEMBERS
            .iter()
            .map(|&lun| {
                let s = mix(seed, n * 16 + lun);
                let opts = InProcOptions {
                    queue_depth: 16,
                    reorder_seed: Some(s),
                    shuffle_execution: shuffle,
                    ..InProcOptions::default()
                };
                let path = h.open_with(lun, opts).expect("member LUN");
                Box::new(FaultyTransport::with_control(
                    path,
                    plan.clone(),
                    s,
                    control.clone(),
                )) as Box<dyn Transport>
            })
            .collect();
        Ok(Box::new(VendorMailbox::new(paths)?))
    })
}

/// Small frames and windows so many are in flight; quick retransmission.
fn config() -> Config {
    Config {
        max_payload: 16 * 1024,
        recv_window_frames: 16,
        send_buffer_bytes: 256 * 1024,
        initial_rto: Duration::from_millis(50),
        min_rto: Duration::from_millis(10),
        // Patient enough (about 12 s) that a loaded 2-core CI machine's
        // scheduling stalls are not mistaken for a dead path.
        max_rto: Duration::from_secs(1),
        max_retransmits: 16,
        delayed_ack: Duration::from_millis(2),
        keepalive: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(15),
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

fn send_stream(s: &mut StpStream, seed: u64, total: u64) -> io::Result<()> {
    let mut off = 0u64;
    while off < total {
        let n = CHUNK.min((total - off) as usize);
        s.write_all(&chunk(seed, off, n))?;
        off += n as u64;
    }
    s.flush()
}

/// One scenario.
#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    plan: FaultPlan,
    shuffle_execution: bool,
    /// Fire `Array::power_on` from another thread once this many bytes
    /// have been received.
    power_on_at: Option<u64>,
    /// With `power_on_at`: the array restarts then, not just reports a
    /// power on: every binding is dropped, queued frames with them
    /// (`StgMailbox::reset`), and the connection binds its ports again.
    restart: bool,
    /// Arm the faults before the handshake rather than after it.
    armed_from_start: bool,
}

impl Scenario {
    fn new(name: &'static str, plan: FaultPlan) -> Scenario {
        Scenario {
            name,
            plan,
            shuffle_execution: true,
            power_on_at: None,
            restart: false,
            armed_from_start: false,
        }
    }
}

/// What a successful run saw.
#[derive(Debug)]
struct Outcome {
    elapsed: Duration,
    client_faults: FaultStats,
    server_faults: FaultStats,
    client: Stats,
    server: Stats,
}

/// Runs `scenario` once with `seed`: client → server 4 MiB, server → client
/// a short trailer, both close. Panics on any error, on corruption, or if
/// the run outlives the watchdog.
fn run(scenario: &Scenario, seed: u64) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let sc = scenario.clone();
    let worker = thread::Builder::new()
        .name(format!("{}-{seed}", scenario.name))
        .spawn(move || {
            let _ = tx.send(run_inner(&sc, seed));
        })
        .unwrap();
    match rx.recv_timeout(WATCHDOG) {
        Ok(outcome) => {
            worker.join().unwrap();
            outcome
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The worker panicked: surface its message.
            match worker.join() {
                Err(p) => std::panic::resume_unwind(p),
                Ok(()) => unreachable!("worker ended without a result"),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "{} (seed {seed}) hung: no result within {WATCHDOG:?}",
                scenario.name
            )
        }
    }
}

fn run_inner(sc: &Scenario, seed: u64) -> Outcome {
    let start = Instant::now();
    let (a, m) = array();
    let (kc, ks) = keys(seed);
    let control = |armed| {
        if armed {
            FaultControl::new()
        } else {
            FaultControl::disarmed()
        }
    };
    let server_ctl = control(sc.armed_from_start);
    let client_ctl = control(sc.armed_from_start);
    let server_src = source(
        &a,
        "server",
        &sc.plan,
        mix(seed, 1),
        &server_ctl,
        sc.shuffle_execution,
    );
    let client_src = source(
        &a,
        "client",
        &sc.plan,
        mix(seed, 2),
        &client_ctl,
        sc.shuffle_execution,
    );
    let mut listener = StpListener::bind(server_src, Some(PORT), ks, config())
        .unwrap_or_else(|e| panic!("{} (seed {seed}): bind: {e}", sc.name));

    let (accepted_tx, accepted_rx) = mpsc::channel();
    let name = sc.name;
    let restart = sc.restart.then(|| m.clone());
    let power_on = sc.power_on_at.map(|at| (at, a.clone(), restart));
    let server = thread::spawn(move || {
        let mut s = listener
            .accept(T)
            .unwrap_or_else(|e| panic!("{name} (seed {seed}): accept: {e}"));
        accepted_tx.send(()).unwrap();
        let got = match power_on {
            None => recv_stream(&mut s, seed),
            Some((at, array, restart)) => {
                let mut reader = PowerOnAt {
                    stream: &mut s,
                    at,
                    seen: 0,
                    array: Some((array, restart)),
                    fired: None,
                };
                let got = recv_stream(&mut reader, seed);
                if let Some(h) = reader.fired.take() {
                    h.join().unwrap();
                }
                got
            }
        }
        .unwrap_or_else(|e| panic!("{name} (seed {seed}): server read: {e}"));
        assert_eq!(got, TOTAL, "{name} (seed {seed}): stream length");
        s.write_all(b"done")
            .unwrap_or_else(|e| panic!("{name} (seed {seed}): server write: {e}"));
        s.shutdown(T)
            .unwrap_or_else(|e| panic!("{name} (seed {seed}): server shutdown: {e}"));
        s.stats()
    });

    let mut c = StpStream::connect(client_src, PORT, kc, config(), T)
        .unwrap_or_else(|e| panic!("{} (seed {seed}): connect: {e}", sc.name));
    accepted_rx
        .recv_timeout(T)
        .unwrap_or_else(|_| panic!("{} (seed {seed}): accept never returned", sc.name));
    server_ctl.arm();
    client_ctl.arm();
    send_stream(&mut c, seed, TOTAL)
        .unwrap_or_else(|e| panic!("{} (seed {seed}): client write: {e}", sc.name));
    c.shutdown(T)
        .unwrap_or_else(|e| panic!("{} (seed {seed}): client shutdown: {e}", sc.name));
    let mut trailer = Vec::new();
    c.read_to_end(&mut trailer)
        .unwrap_or_else(|e| panic!("{} (seed {seed}): client read: {e}", sc.name));
    assert_eq!(trailer, b"done", "{} (seed {seed}): trailer", sc.name);
    let client = c.stats();
    let server = server.join().unwrap();
    Outcome {
        elapsed: start.elapsed(),
        client_faults: client_ctl.stats(),
        server_faults: server_ctl.stats(),
        client,
        server,
    }
}

/// A reader that powers the array on (from another thread) once `at`
/// bytes went through it, and with a mailbox restarts it (every binding
/// and queued frame gone).
struct PowerOnAt<'a> {
    stream: &'a mut StpStream,
    at: u64,
    seen: u64,
    array: Option<(Array, Option<Arc<StgMailbox>>)>,
    fired: Option<thread::JoinHandle<()>>,
}

impl Read for PowerOnAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.seen += n as u64;
        if self.seen >= self.at {
            if let Some((a, restart)) = self.array.take() {
                self.fired = Some(thread::spawn(move || {
                    a.power_on();
                    if let Some(m) = restart {
                        m.reset();
                    }
                }));
            }
        }
        Ok(n)
    }
}

/// Reads to EOF, comparing against the regenerated stream chunk by chunk;
/// returns the length received.
fn recv_stream(s: &mut impl Read, seed: u64) -> io::Result<u64> {
    let mut got = Vec::new();
    let mut off = 0u64;
    let mut buf = vec![0u8; 70_001];
    loop {
        let n = s.read(&mut buf)?;
        got.extend_from_slice(&buf[..n]);
        while got.len() >= CHUNK || (n == 0 && !got.is_empty()) {
            let take = CHUNK.min(got.len());
            assert!(
                got[..take] == chunk(seed, off, take)[..],
                "stream differs in the {take} bytes at offset {off}"
            );
            got.drain(..take);
            off += take as u64;
        }
        if n == 0 {
            return Ok(off);
        }
    }
}

/// Totals over a scenario's seeds.
#[derive(Debug, Default)]
struct Totals {
    /// Both sides' injected faults.
    faults: FaultStats,
    /// Sequenced frames the client sent again.
    client_retransmits: u64,
    /// Duplicate frames the server received.
    server_duplicates: u64,
}

/// Runs `scenario` for every seed.
fn survive(scenario: &Scenario) -> Totals {
    let mut t = Totals::default();
    for seed in SEEDS {
        let o = run(scenario, seed);
        eprintln!(
            "{} seed {seed}: {:?}; client faults {:?}; server faults {:?}; \
             client retransmits {} (send failures {}), server duplicates {} / out of order {}",
            scenario.name,
            o.elapsed,
            o.client_faults,
            o.server_faults,
            o.client.retransmits,
            o.client.send_failures,
            o.server.duplicates_received,
            o.server.out_of_order_received,
        );
        t.faults += o.client_faults;
        t.faults += o.server_faults;
        t.client_retransmits += o.client.retransmits;
        t.server_duplicates += o.server.duplicates_received;
    }
    t
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn failed_submits_and_completions() {
    let plan = FaultPlan::none().fail_submit(0.05).fail_completion(0.05);
    let s = survive(&Scenario::new("failed submits and completions", plan)).faults;
    assert!(s.failed_submits > 0, "{s:?}");
    assert!(s.failed_completions > 0, "{s:?}");
    assert!(s.executed_then_failed > 0, "lost completions: {s:?}");
}

#[test]
fn lost_receive_data() {
    let plan = FaultPlan::none().lose_data_in(0.05);
    let t = survive(&Scenario::new("lost RECEIVE data", plan));
    assert!(t.faults.lost_data_in > 0, "{t:?}");
    // The frames those RECEIVEs took from the array came again.
    assert!(t.client_retransmits > 0, "{t:?}");
}

#[test]
fn delays_and_reordering() {
    let plan = FaultPlan::none().delay(ms(0), ms(3)).reorder(true);
    let s = survive(&Scenario::new("delays and reordering", plan)).faults;
    assert!(s.delayed > 0, "{s:?}");
}

#[test]
fn unit_attentions_and_power_on() {
    // Unit attentions are per path (per I_T_L nexus), and so is the
    // period: a host keeps four paths busy (two members, a sender and a
    // receiver mailbox) and a 4 MiB stream takes about 30 commands per
    // path, so one every 12 per path is about one every 50 of the host's.
    let plan = FaultPlan::none().unit_attention_every(12);
    let scenario = Scenario {
        power_on_at: Some(TOTAL / 2),
        ..Scenario::new("unit attentions and power on", plan)
    };
    let s = survive(&scenario).faults;
    assert!(s.unit_attentions > 0, "{s:?}");
}

#[test]
fn array_restart_mid_stream_is_ridden_through() {
    // The array restarts half way: both hosts' bindings and every frame
    // queued at the array are gone. Each end binds its port again and
    // the frames lost are retransmitted: the stream arrives exact, each
    // byte once (`recv_stream` compares every chunk and the length).
    let scenario = Scenario {
        power_on_at: Some(TOTAL / 2),
        restart: true,
        ..Scenario::new("array restart", FaultPlan::none())
    };
    let t = survive(&scenario);
    // The restart lost frames in flight: some came again.
    assert!(t.client_retransmits > 0, "{t:?}");
}

fn everything() -> FaultPlan {
    FaultPlan::none()
        .fail_submit(0.02)
        .fail_completion(0.02)
        .lose_data_in(0.02)
        .delay(ms(0), ms(2))
        .reorder(true)
        .unit_attention_every(25)
}

#[test]
fn all_faults_at_once() {
    let scenario = Scenario {
        power_on_at: Some(TOTAL / 3),
        ..Scenario::new("all faults at once", everything())
    };
    let s = survive(&scenario).faults;
    assert!(s.injected() > 0, "{s:?}");
}

#[test]
fn all_but_unit_attentions() {
    let plan = FaultPlan {
        unit_attention_every: None,
        ..everything()
    };
    let s = survive(&Scenario::new("all but unit attentions", plan)).faults;
    assert!(
        s.failed_submits + s.failed_completions + s.lost_data_in > 0,
        "{s:?}"
    );
}

#[test]
fn handshake_under_faults() {
    // No lost data-in here: a lost BIND reply leaks the listener's static
    // port (docs/PROTOCOL.md §3), so its retry can only fail PORT IN USE.
    let plan = FaultPlan::none().fail_submit(0.05).fail_completion(0.05);
    let scenario = Scenario {
        armed_from_start: true,
        ..Scenario::new("handshake under faults", plan)
    };
    survive(&scenario);
}

/// Short timeouts: a dead peer is detected in about two seconds.
fn impatient() -> Config {
    Config {
        max_retransmits: 4,
        max_rto: ms(250),
        keepalive: ms(300),
        idle_timeout: Duration::from_secs(2),
        ..config()
    }
}

/// The server's paths die after 60 commands each: both ends fail with a
/// timeout error (retransmissions exhausted, or the peer silent for the
/// idle timeout) within a few seconds instead of hanging.
#[test]
fn dead_peer_path_fails_cleanly() {
    for seed in [5u64, 6] {
        let started = Instant::now();
        let (a, _m) = array();
        let (kc, ks) = keys(seed);
        let server_ctl = FaultControl::disarmed();
        let client_ctl = FaultControl::disarmed();
        let dies = FaultPlan::none().die_after(60);
        let server_src = source(&a, "server", &dies, mix(seed, 1), &server_ctl, true);
        let client_src = source(&a, "client", &FaultPlan::none(), 0, &client_ctl, true);
        let mut listener = StpListener::bind(server_src, Some(PORT), ks, impatient()).unwrap();
        let (accepted_tx, accepted_rx) = mpsc::channel();
        let server = thread::spawn(move || {
            let mut s = listener.accept(T).unwrap();
            accepted_tx.send(()).unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let err = loop {
                match s.read(&mut buf) {
                    Ok(0) => panic!("server saw EOF on a stream that never ends"),
                    Ok(_) => {}
                    Err(e) => break e,
                }
            };
            (err, Instant::now())
        });
        let mut c = StpStream::connect(client_src, PORT, kc, impatient(), T).unwrap();
        accepted_rx.recv_timeout(T).unwrap();
        server_ctl.arm();
        // Write until the connection fails (it must, long before 1 GiB).
        let data = chunk(seed, 0, 256 * 1024);
        let mut written = 0u64;
        let client_err = loop {
            if let Err(e) = c.write_all(&data) {
                break e;
            }
            written += data.len() as u64;
            assert!(written < 1 << 30, "the client never noticed the dead peer");
        };
        let client_failed = Instant::now();
        let (server_err, server_failed) = server.join().unwrap();
        let died = server_ctl.died_at().expect("the server's paths died");
        for (side, err, when) in [
            ("client", &client_err, client_failed),
            ("server", &server_err, server_failed),
        ] {
            let after = when.saturating_duration_since(died);
            eprintln!("dead peer seed {seed}: {side} failed {after:?} after the paths died: {err}");
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{side}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("timed out") || text.contains("peer dead"),
                "{side}: unclear error: {text}"
            );
            assert!(
                after < Duration::from_secs(6),
                "{side} took {after:?} to notice the dead path"
            );
        }
        assert!(server_ctl.stats().dead > 0);
        // Dropping both ends must not hang either.
        let drop_start = Instant::now();
        drop(c);
        assert!(drop_start.elapsed() < Duration::from_secs(5));
        eprintln!(
            "dead peer seed {seed}: {:?} in all, {written} bytes written",
            started.elapsed()
        );
    }
}
