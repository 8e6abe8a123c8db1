//! STP byte streams end to end: two hosts, the in-process array, the
//! vendor-mode mailbox, authenticated frames, the connection state machine
//! and the blocking socket layer. The bodies live in `stp_tests::e2e`; the
//! real-LIO suite (`lio.rs`) runs the same ones.

use std::sync::Arc;
use std::thread;

use scsi::Transport;
use sim_target::{Array, Host, LunConfig, StgMailbox, StgSpec};
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_tests::e2e::{self, config, keys, recv_stream, send_stream, T};
use stp_tests::rig::{inproc, Rig};

fn rig() -> Arc<dyn Rig> {
    inproc(2, 3)
}

#[test]
fn empty_stream() {
    e2e::transfer(&rig(), 0, 1);
}

#[test]
fn one_byte() {
    e2e::transfer(&rig(), 1, 2);
}

#[test]
fn odd_sizes() {
    let rig = rig();
    for (i, n) in [65_535u64, 65_536, 65_537, 333_333].into_iter().enumerate() {
        e2e::transfer(&rig, n, 10 + i as u64);
    }
}

#[test]
fn sixty_four_mebibytes() {
    e2e::transfer(&rig(), 64 << 20, 99);
}

/// The large transfer: 1 GiB, regenerated and compared at the far
/// end.
#[test]
fn one_gibibyte() {
    e2e::transfer(&rig(), 1 << 30, 1_000_000_007);
}

#[test]
fn concurrent_ports_on_one_stg() {
    e2e::concurrent_ports(&rig(), 3 << 20);
}

#[test]
fn wrong_key_never_connects() {
    e2e::wrong_key_never_connects(&rig());
}

#[test]
fn replayed_frames_from_a_third_initiator_change_nothing() {
    e2e::replay_changes_nothing(&rig(), 2);
}

/// Paths for a new initiator `host` onto the given member LUNs.
fn source(a: &Array, host: &str, members: Vec<u64>) -> Arc<dyn PathSource> {
    let h = Host::login(a, host);
    let n = members.len();
    stp_core::stg::open_with(
        stp_core::stg::MailboxMode::Vendor,
        7,
        n,
        &stp_core::stg::OpenOptions::default(),
        move |i| Ok(Box::new(h.open(members[i])?) as Box<dyn Transport>),
    )
    .expect("a vendor-mode source")
}

/// Two STGs on one array, the same port number in use on both, and a
/// second port on the first: each connection keeps to its own.
#[test]
fn concurrent_connections_on_two_stgs() {
    let a = Array::new();
    for id in 0..4 {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    let specs = vec![StgSpec::new(7, vec![0, 1]), StgSpec::new(8, vec![2, 3])];
    StgMailbox::with_seed(&a, specs, 3).unwrap().install(&a);
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

/// A stream error keeps its cause: a second listener on a port another
/// host holds fails with `AddrInUse`, and the error gives back the array's
/// refusal for a caller to match.
#[test]
fn a_port_in_use_is_a_typed_error() {
    use stp_core::error::{MailboxError, Refusal};
    let a = Array::new();
    for id in 0..2 {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    StgMailbox::with_seed(&a, vec![StgSpec::new(7, vec![0, 1])], 5)
        .unwrap()
        .install(&a);
    let (_, ks) = keys(31);
    let _held = StpListener::bind(
        source(&a, "first", vec![0, 1]),
        Some(5201),
        ks.clone(),
        config(),
    )
    .expect("the first listener");
    let Err(e) = StpListener::bind(source(&a, "second", vec![0, 1]), Some(5201), ks, config())
    else {
        panic!("a second listener bound a port another host holds");
    };
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
    let cause = e
        .get_ref()
        .and_then(|c| c.downcast_ref::<MailboxError>())
        .unwrap_or_else(|| panic!("no MailboxError inside {e:?}"));
    assert_eq!(cause.refusal(), Some(Refusal::PortInUse), "{cause}");
}
