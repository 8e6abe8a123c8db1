//! Members reached over several paths (issue 14): a [`Multipath`] member
//! steered by ALUA states, and STP streams that survive a path that dies
//! mid-stream and an ALUA transition mid-stream, arriving exact, exactly
//! once.
//!
//! Every host logs in to the in-process array twice, through target ports
//! 1 and 2 (two nexuses, as two tcm_loop targets or two HBAs give), and
//! each STG member is one [`Multipath`] over both.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use scsi::alua::AccessState;
use scsi::cdb::{Cdb, RwFlags};
use scsi::{Command, IoBuf, Transport};
use sim_target::{
    Array, FaultControl, FaultPlan, FaultyTransport, Host, InProcOptions, LunConfig, StgMailbox,
    StgSpec,
};
use stp_core::conn::Config;
use stp_core::mailbox::{Mailbox, VendorMailbox};
use stp_core::multipath::Multipath;
use stp_core::retry::RetryPolicy;
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::vendor::MailboxError;
use stp_tests::e2e::keys;

const T: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(60);
const MEMBERS: [u64; 2] = [0, 1];
const PORT: u32 = 5201;
const TOTAL: u64 = 4 << 20;
const CHUNK: usize = 100_003;

fn array() -> Array {
    let a = Array::new();
    for id in MEMBERS {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
        // Port 2 sits in group 1 on every member; port 1 stays in LIO's
        // default group 0.
        a.set_port_group(id, 2, 1);
    }
    let spec = StgSpec::new(7, MEMBERS.to_vec());
    StgMailbox::with_seed(&a, vec![spec], 3)
        .unwrap()
        .install(&a);
    a
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 50,
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(20),
    }
}

/// A host with two nexuses; each member a multipath over both, port 1's
/// paths wrapped in a fault injector under `control` with `plan`.
fn source(a: &Array, host: &str, plan: FaultPlan, control: FaultControl) -> Arc<dyn PathSource> {
    let h1 = Host::login_through(a, &format!("{host}-p1"), 1);
    let h2 = Host::login_through(a, &format!("{host}-p2"), 2);
    let opened = AtomicU64::new(0);
    Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
        let n = opened.fetch_add(1, Ordering::Relaxed);
        let opts = InProcOptions {
            queue_depth: 16,
            ..InProcOptions::default()
        };
        let paths = MEMBERS
            .iter()
            .map(|&lun| {
                let p1 = FaultyTransport::with_control(
                    h1.open_with(lun, opts.clone()).expect("member LUN"),
                    plan.clone(),
                    n * 16 + lun,
                    control.clone(),
                );
                let p2 = h2.open_with(lun, opts.clone()).expect("member LUN");
                let mp =
                    Multipath::open(vec![Box::new(p1), Box::new(p2)], policy()).expect("multipath");
                Box::new(mp) as Box<dyn Transport>
            })
            .collect();
        Ok(Box::new(VendorMailbox::new(paths)?))
    })
}

fn config() -> Config {
    Config {
        max_payload: 16 * 1024,
        recv_window_frames: 16,
        send_buffer_bytes: 256 * 1024,
        initial_rto: Duration::from_millis(50),
        min_rto: Duration::from_millis(10),
        max_rto: Duration::from_secs(1),
        max_retransmits: 16,
        delayed_ack: Duration::from_millis(2),
        keepalive: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(15),
        ..Config::default()
    }
}

fn chunk(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed ^ offset.rotate_left(17));
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Reads to EOF comparing with the regenerated stream; calls `at_half`
/// once half of it arrived.
fn recv_stream(s: &mut StpStream, seed: u64, mut at_half: impl FnMut()) -> io::Result<u64> {
    let mut got = Vec::new();
    let mut off = 0u64;
    let mut buf = vec![0u8; 70_001];
    let mut fired = false;
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
        if !fired && off >= TOTAL / 2 {
            fired = true;
            at_half();
        }
        if n == 0 {
            return Ok(off);
        }
    }
}

/// Streams 4 MiB client → server over multipath members; `client_plan`
/// applies to the client's port-1 paths (armed once connected), and
/// `at_half` runs when the server has half the stream.
fn stream(
    seed: u64,
    client_plan: FaultPlan,
    at_half: impl FnMut() + Send + 'static,
) -> FaultControl {
    let (tx, rx) = mpsc::channel();
    let control = FaultControl::disarmed();
    let ctl = control.clone();
    let worker = thread::spawn(move || {
        let a = array();
        let (kc, ks) = keys(seed);
        let server_src = source(&a, "server", FaultPlan::none(), FaultControl::disarmed());
        let client_src = source(&a, "client", client_plan, ctl.clone());
        let mut listener = StpListener::bind(server_src, Some(PORT), ks, config()).unwrap();
        let server = thread::spawn(move || {
            let mut s = listener.accept(T).expect("accept");
            let got = recv_stream(&mut s, seed, at_half).expect("server read");
            assert_eq!(got, TOTAL, "stream length");
            s.write_all(b"done").unwrap();
            s.shutdown(T).unwrap();
        });
        let mut c = StpStream::connect(client_src, PORT, kc, config(), T).expect("connect");
        ctl.arm();
        let mut off = 0u64;
        while off < TOTAL {
            let n = CHUNK.min((TOTAL - off) as usize);
            c.write_all(&chunk(seed, off, n)).expect("client write");
            off += n as u64;
        }
        c.flush().unwrap();
        c.shutdown(T).expect("client shutdown");
        let mut trailer = Vec::new();
        c.read_to_end(&mut trailer).expect("client read");
        assert_eq!(trailer, b"done");
        server.join().unwrap();
        let _ = tx.send(());
    });
    match rx.recv_timeout(WATCHDOG) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!(),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("stream (seed {seed}) hung"),
    }
    control
}

#[test]
fn a_path_that_dies_mid_stream_is_survived() {
    for seed in [1, 2] {
        // Every port-1 path of the client dies after 40 of its commands.
        let control = stream(seed, FaultPlan::none().die_after(40), || {});
        assert!(control.died_at().is_some(), "the path never died");
        assert!(control.stats().injected() > 0);
    }
}

#[test]
fn an_alua_transition_mid_stream_is_survived() {
    // Half-way, port 1's group goes through transition to standby on every
    // member: I/O moves to port 2.
    for seed in [3, 4] {
        assert!(transition_stream(seed) > 0);
    }
}

/// As [`stream`], with the array built here so the ALUA states can be
/// changed half-way; returns how many group state changes were made.
fn transition_stream(seed: u64) -> usize {
    let a = array();
    let (kc, ks) = keys(seed);
    let server_src = source(&a, "server", FaultPlan::none(), FaultControl::disarmed());
    let client_src = source(&a, "client", FaultPlan::none(), FaultControl::disarmed());
    let mut listener = StpListener::bind(server_src, Some(PORT), ks, config()).unwrap();
    let flipper = a.clone();
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).expect("accept");
        let got = recv_stream(&mut s, seed, move || {
            for lun in MEMBERS {
                flipper.set_alua_state(lun, 0, AccessState::TRANSITION);
            }
            thread::sleep(Duration::from_millis(30));
            for lun in MEMBERS {
                flipper.set_alua_state(lun, 0, AccessState::STANDBY);
            }
        })
        .expect("server read");
        assert_eq!(got, TOTAL, "stream length");
        s.write_all(b"done").unwrap();
        s.shutdown(T).unwrap();
    });
    let (tx, rx) = mpsc::channel();
    let client = thread::spawn(move || {
        let mut c = StpStream::connect(client_src, PORT, kc, config(), T).expect("connect");
        let mut off = 0u64;
        while off < TOTAL {
            let n = CHUNK.min((TOTAL - off) as usize);
            c.write_all(&chunk(seed, off, n)).expect("client write");
            off += n as u64;
        }
        c.flush().unwrap();
        c.shutdown(T).expect("client shutdown");
        let mut trailer = Vec::new();
        c.read_to_end(&mut trailer).expect("client read");
        assert_eq!(trailer, b"done");
        let _ = tx.send(());
    });
    if rx.recv_timeout(WATCHDOG).is_err() {
        client.join().expect("client");
        panic!("stream (seed {seed}) hung through the ALUA transition");
    }
    client.join().unwrap();
    server.join().unwrap();
    MEMBERS.len() * 2
}

fn write16(lba: u64, data: &[u8]) -> Command {
    let cdb = Cdb::Write16 {
        lba,
        blocks: (data.len() / 512) as u32,
        flags: RwFlags::default(),
    }
    .emit();
    Command::data_out(cdb, IoBuf::from_slice(data))
}

fn read16(lba: u64, blocks: u32) -> Command {
    let cdb = Cdb::Read16 {
        lba,
        blocks,
        flags: RwFlags::default(),
    }
    .emit();
    Command::data_in(cdb, blocks as usize * 512)
}

#[test]
fn paths_states_and_moves_on_one_member() {
    let a = Array::new();
    a.add_lun(0, LunConfig::new(0, 1 << 12, 512)).unwrap();
    let h1 = Host::login_through(&a, "h-p1", 1);
    let h2 = Host::login_through(&a, "h-p2", 2);
    a.set_port_group(0, 2, 1);
    a.set_alua_state(0, 1, AccessState::ACTIVE_NON_OPTIMIZED);
    a.set_nonop_delay(0, 1, Duration::ZERO);
    let mut mp = Multipath::open(
        vec![Box::new(h1.open(0).unwrap()), Box::new(h2.open(0).unwrap())],
        policy(),
    )
    .unwrap();
    let paths = mp.paths();
    assert_eq!(paths[0].relative_port, Some(1));
    assert_eq!(paths[0].group, Some(0));
    assert_eq!(paths[0].state, Some(AccessState::ACTIVE_OPTIMIZED));
    assert_eq!(paths[1].relative_port, Some(2));
    assert_eq!(paths[1].group, Some(1));
    assert_eq!(paths[1].state, Some(AccessState::ACTIVE_NON_OPTIMIZED));

    // Writes go to the optimized path; the reads find them.
    for lba in 0..8u64 {
        let data = vec![lba as u8; 512];
        mp.execute(write16(lba, &data)).into_result().unwrap();
    }
    assert_eq!(mp.stats().moved, 0);

    // Port 1's group goes to standby: the next command is refused there
    // (NOT READY 04h/0Bh), moves to port 2 and succeeds; nothing lost.
    a.set_alua_state(0, 0, AccessState::STANDBY);
    for lba in 8..16u64 {
        let data = vec![lba as u8; 512];
        mp.execute(write16(lba, &data)).into_result().unwrap();
    }
    for lba in 0..16u64 {
        let (d, _) = mp.execute(read16(lba, 1)).into_result().unwrap();
        assert!(d.iter().all(|b| *b == lba as u8), "block {lba}");
    }
    assert!(mp.stats().moved >= 1, "{:?}", mp.stats());
    let paths = mp.paths();
    assert_eq!(paths[0].state, Some(AccessState::STANDBY));
    assert!(paths[1].serves());
    // The state was re-read (REPORT TARGET PORT GROUPS after the refusal).
    assert!(mp.stats().refreshes >= 1, "{:?}", mp.stats());

    // Every path refuses: the caller gets the real error, not a hang.
    a.set_alua_state(0, 1, AccessState::UNAVAILABLE);
    let err = mp
        .execute(write16(20, &[0u8; 512]))
        .into_result()
        .unwrap_err();
    let sense = err.sense().expect("a check condition");
    assert_eq!(sense.key, scsi::SenseKey::NOT_READY, "{err}");
    // Back to normal: port 1 active/optimized again; the periodic re-read
    // finds it.
    a.set_alua_state(0, 0, AccessState::ACTIVE_OPTIMIZED);
    a.set_alua_state(0, 1, AccessState::ACTIVE_NON_OPTIMIZED);
    let mut ok = false;
    for _ in 0..100 {
        if mp.execute(write16(21, &[7u8; 512])).into_result().is_ok() {
            ok = true;
            break;
        }
        thread::sleep(Duration::from_millis(30));
    }
    assert!(ok, "{:?}", mp.paths());
}

#[test]
fn a_dead_path_moves_its_io() {
    let a = Array::new();
    a.add_lun(0, LunConfig::new(0, 1 << 12, 512)).unwrap();
    let h1 = Host::login_through(&a, "h-p1", 1);
    let h2 = Host::login_through(&a, "h-p2", 2);
    let control = FaultControl::disarmed();
    let p1 =
        FaultyTransport::with_control(h1.open(0).unwrap(), FaultPlan::none(), 1, control.clone());
    let mut mp =
        Multipath::open(vec![Box::new(p1), Box::new(h2.open(0).unwrap())], policy()).unwrap();
    control.arm();
    control.kill();
    // Pipelined writes across both paths; port 1's fail with NO CONNECT
    // and move.
    let depth = mp.queue_depth().min(8);
    let mut out = Vec::new();
    for lba in 0..64u64 {
        while mp.in_flight() >= depth {
            mp.reap(&mut out, None).unwrap();
        }
        mp.submit(write16(lba, &vec![lba as u8 ^ 0x5A; 512]).with_tag(lba))
            .unwrap();
    }
    while mp.in_flight() > 0 {
        mp.reap(&mut out, None).unwrap();
    }
    let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(
        tags,
        (0..64).collect::<Vec<_>>(),
        "each command completes once"
    );
    for c in out {
        c.into_result().unwrap();
    }
    for lba in 0..64u64 {
        let (d, _) = mp.execute(read16(lba, 1)).into_result().unwrap();
        assert!(d.iter().all(|b| *b == lba as u8 ^ 0x5A), "block {lba}");
    }
    let paths = mp.paths();
    assert!(paths[0].down, "{paths:?}");
    assert!(!paths[1].down);
}

/// A file-system backup (block mode, the in-process array's plain LUN)
/// whose client reaches the member over two nexuses, port 1 (the rig's)
/// and port 2; `fail` takes port 2's path away a third of the way in. The
/// body is the one the real-LIO suite runs
/// (`backup_survives_a_path_unmapped_mid_backup_on_lio`).
fn backup_with_a_failing_path(fail: impl FnOnce(&Array, FaultControl) + Send + 'static) {
    use stp_tests::rig::{InProcRig, Rig, PLAIN_LUN};
    let rig = InProcRig::new(1, 44);
    let array = rig.array().clone();
    let rig: Arc<dyn Rig> = Arc::new(rig);
    // Port 2 in a group of its own, as a second HBA's target port would be.
    array.set_port_group(PLAIN_LUN, 2, 1);
    let h = Host::login_through(&array, "h1-p2", 2);
    let control = FaultControl::disarmed();
    let second = FaultyTransport::with_control(
        h.open(PLAIN_LUN).unwrap(),
        FaultPlan::none(),
        1,
        control.clone(),
    );
    control.arm();
    stp_tests::backup::fs_backup_survives_a_path_failure(
        &rig,
        Box::new(second),
        Box::new(move || fail(&array, control)),
        8 << 20,
    );
}

#[test]
fn a_backup_survives_a_path_that_dies_mid_backup() {
    backup_with_a_failing_path(|_, control| control.kill());
}

#[test]
fn a_backup_survives_a_path_group_going_unavailable_mid_backup() {
    backup_with_a_failing_path(|array, _| array.set_alua_state(PLAIN, 1, AccessState::UNAVAILABLE));
}

const PLAIN: u64 = stp_tests::rig::PLAIN_LUN;
