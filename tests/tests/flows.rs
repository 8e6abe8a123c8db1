//! The seed's connection flows end to end on one machine: two hosts (two
//! socket layers logged in to the same in-process array as different
//! initiators), real TCP on 127.0.0.1, STP through the simulated array.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sim_target::StgMailbox;
use stp_core::auth::FrameKey;
use stp_core::flows::{db_client_connect, fs_client_accept, fs_server_connect, FlowError};
use stp_core::sockets::{
    Address, Domain, Fd, Mechanism, PathSource, SockError, SocketLayer, StpListener, STP_FD_BASE,
};
use stp_tests::e2e::{self, config, free_wkp, LOCAL, T};
use stp_tests::rig::{all_members, InProcRig, Rig};

const STG: u32 = 7;

/// An in-process rig with its mailbox (for frame counts).
fn array() -> (Arc<dyn Rig>, Arc<StgMailbox>) {
    let rig = InProcRig::new(2, 5);
    let m = Arc::clone(rig.mailbox());
    (Arc::new(rig), m)
}

/// Host `i` of the rig: a socket layer with paths to the STG.
fn host(rig: &Arc<dyn Rig>, i: usize) -> Arc<SocketLayer> {
    e2e::socket_host(rig, i)
}

fn source(rig: &Arc<dyn Rig>, i: usize) -> Arc<dyn PathSource> {
    all_members(rig, i)
}

fn keys() -> (FrameKey, FrameKey) {
    e2e::keys(11)
}

#[test]
fn fs_flow_control_over_tcp_data_over_stp() {
    e2e::fs_flow(&array().0, 3 << 20);
}

#[test]
fn db_flow_everything_over_stp() {
    e2e::db_flow(&array().0, 1 << 20, 300_001);
}

#[test]
fn descriptor_value_routes_the_call() {
    let (a, mailbox) = array();
    let layer = host(&a, 0);

    // TCP: a layer descriptor below STP_FD_BASE; its bytes reach a plain
    // std TCP peer, and the array sees no STP frame.
    let before = mailbox.stats().frames_accepted;
    let peer = TcpListener::bind((LOCAL, 0)).unwrap();
    let t = layer.socket(Domain::Tcp).unwrap();
    assert_eq!(layer.mechanism(t), Mechanism::Tcp);
    layer
        .connect(t, Address::Tcp(peer.local_addr().unwrap()))
        .unwrap();
    layer.send_all(t, b"over tcp").unwrap();
    let (mut ps, _) = peer.accept().unwrap();
    let mut got = [0u8; 8];
    ps.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"over tcp");
    ps.write_all(b"tcp back").unwrap();
    layer.recv_exact(t, &mut got).unwrap();
    assert_eq!(&got, b"tcp back");
    assert_eq!(
        mailbox.stats().frames_accepted,
        before,
        "TCP send touched the array"
    );

    // STP: a descriptor at or above STP_FD_BASE; its bytes reach a plain
    // StpListener on another initiator, through the array.
    let (kc, ks) = keys();
    let mut listener = StpListener::bind(source(&a, 1), None, ks, config()).unwrap();
    let s = layer.socket(Domain::Stp { stg: STG }).unwrap();
    assert_eq!(layer.mechanism(s), Mechanism::Stp);
    assert!(s.0 >= STP_FD_BASE && t.0 < STP_FD_BASE);
    layer.set_key(s, kc).unwrap();
    let port = listener.local_port();
    let acceptor = thread::spawn(move || {
        let mut st = listener.accept(T).unwrap();
        let mut got = [0u8; 8];
        st.read_exact(&mut got).unwrap();
        st.write_all(b"stp back").unwrap();
        st.flush().unwrap();
        (got, st)
    });
    layer.connect(s, Address::Stp(port)).unwrap();
    let after_connect = mailbox.stats().frames_accepted;
    assert!(
        after_connect > before,
        "STP connect sent no frame through the array"
    );
    layer.send_all(s, b"over stp").unwrap();
    let (got_stp, st) = acceptor.join().unwrap();
    assert_eq!(&got_stp, b"over stp");
    assert!(mailbox.stats().frames_accepted > after_connect);
    layer.recv_exact(s, &mut got).unwrap();
    assert_eq!(&got, b"stp back");
    assert_eq!(layer.peer_addr(s).unwrap(), Address::Stp(st.local_port()));
    drop(ps);
    layer.close(t).unwrap();
    let closer = thread::spawn(move || drop(st));
    layer.close(s).unwrap();
    closer.join().unwrap();
}

#[test]
fn socket_errors() {
    let (a, _m) = array();
    let layer = host(&a, 0);
    let t = layer.socket(Domain::Tcp).unwrap();
    let s = layer.socket(Domain::Stp { stg: STG }).unwrap();

    // STP connect (or listen) without a key, with advice.
    let e = layer.connect(s, Address::Stp(5101)).unwrap_err();
    assert!(matches!(e, SockError::NoKey { .. }), "{e}");
    assert!(e.to_string().contains("set_key"), "{e}");
    assert!(matches!(layer.listen(s), Err(SockError::NoKey { .. })));

    // The address must match the mechanism the descriptor's value selects.
    let e = layer.connect(t, Address::Stp(5101)).unwrap_err();
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
    let addr = SocketAddr::new(LOCAL, 9);
    let e = layer.connect(s, Address::Tcp(addr)).unwrap_err();
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

    // Bad descriptors in either range, and after close.
    for fd in [Fd(77), Fd(STP_FD_BASE + 77)] {
        assert!(matches!(
            layer.recv(fd, &mut [0; 4]),
            Err(SockError::BadDescriptor { .. })
        ));
    }
    layer.close(t).unwrap();
    assert!(matches!(
        layer.send(t, b"x"),
        Err(SockError::BadDescriptor { .. })
    ));

    // Unknown STG.
    assert!(matches!(
        layer.socket(Domain::Stp { stg: 8 }),
        Err(SockError::UnknownStg { stg: 8, .. })
    ));
    // Connecting to an STP port nobody listens on fails, not hangs.
    let (kc, _) = keys();
    layer.set_key(s, kc).unwrap();
    let t0 = Instant::now();
    let e = layer
        .connect_timeout(s, Address::Stp(5999), Duration::from_millis(500))
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(5), "{e}");
    layer.close(s).unwrap();
}

#[test]
fn wrong_well_known_string_is_reported() {
    let (a, _m) = array();
    let client = host(&a, 1);
    let wkp = free_wkp();
    // Not an STP server: an HTTP client knocking on the WKP.
    let knocker = thread::spawn(move || {
        let t0 = Instant::now();
        let mut s = loop {
            match TcpStream::connect((LOCAL, wkp)) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < Duration::from_secs(3) => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        };
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    let e = fs_client_accept(&client, LOCAL, wkp, None, Duration::from_secs(3)).unwrap_err();
    assert!(matches!(e, FlowError::WrongString { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("not an STP endpoint") && msg.contains("step 120"),
        "{msg}"
    );
    assert!(client.descriptors().is_empty());
    knocker.join().unwrap();

    // The database flow: a server that answers with something else.
    let server = TcpListener::bind((LOCAL, 0)).unwrap();
    let wkp = server.local_addr().unwrap().port();
    let fake = thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut port = [0u8; 2];
        s.read_exact(&mut port).unwrap();
        s.write_all(b"STP-WKP-NOPE\0\0\0\0").unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    let e = db_client_connect(&client, LOCAL, wkp, None, Duration::from_secs(3)).unwrap_err();
    assert!(
        matches!(e, FlowError::WrongString { step: "196A", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("STP-WKP-NOPE"), "{e}");
    assert!(client.descriptors().is_empty());
    fake.join().unwrap();
}

#[test]
fn psk_mismatch_never_connects() {
    let (a, _m) = array();
    let (server, client) = (host(&a, 0), host(&a, 1));
    let wkp = free_wkp();
    let timeout = Duration::from_millis(1500);
    let t0 = Instant::now();
    let srv = Arc::clone(&server);
    let server_side = thread::spawn(move || {
        fs_server_connect(&srv, LOCAL, wkp, STG, 2, Some(b"psk one"), timeout)
    });
    let c = fs_client_accept(&client, LOCAL, wkp, Some(b"psk two"), timeout);
    let s = server_side.join().unwrap();
    let elapsed = t0.elapsed();
    let (ce, se) = (c.unwrap_err(), s.unwrap_err());
    // Neither side gets an STP connection: the SYN's tag fails under the
    // client's key, so the client never sees it and the server never hears
    // back. Both name the STP step and the likely cause.
    assert!(matches!(ce, FlowError::Timeout { step: "172", .. }), "{ce}");
    assert!(matches!(se, FlowError::Timeout { step: "146", .. }), "{se}");
    for e in [&ce, &se] {
        assert!(e.to_string().contains("PSK"), "{e}");
    }
    assert!(client.descriptors().is_empty() && server.descriptors().is_empty());
    // Bounded: the flow timeout plus the STP layer's 2 s close linger.
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    eprintln!("psk mismatch detected in {elapsed:?}");
}
