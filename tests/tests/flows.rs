//! The seed's connection flows end to end on one machine: two hosts (two
//! socket layers logged in to the same in-process array as different
//! initiators), real TCP on 127.0.0.1, STP through the simulated array.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use scsi::Transport;
use sim_target::{Array, Host, LunConfig, StgMailbox, StgSpec};
use stp_core::auth::{FrameKey, Handshake, Role};
use stp_core::conn::Config;
use stp_core::flows::{
    db_client_connect, db_server_accept, fs_client_accept, fs_server_connect, FlowError,
};
use stp_core::mailbox::{Mailbox, VendorMailbox};
use stp_core::sockets::{
    Address, Domain, Fd, Mechanism, PathSource, SockError, SocketLayer, StpListener, STP_FD_BASE,
};
use stp_core::vendor::MailboxError;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const STG: u32 = 7;
const MEMBERS: [u64; 2] = [0, 1];
const T: Duration = Duration::from_secs(20);

fn array() -> (Array, Arc<StgMailbox>) {
    let a = Array::new();
    for id in MEMBERS {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    let m = StgMailbox::with_seed(&a, vec![StgSpec::new(STG, MEMBERS.to_vec())], 5).unwrap();
    m.install(&a);
    (a, m)
}

/// Paths for `host` onto the STG's members.
fn source(a: &Array, host: &str) -> Arc<dyn PathSource> {
    let h = Host::login(a, host);
    Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
        let paths = MEMBERS
            .iter()
            .map(|&l| Box::new(h.open(l).expect("member LUN")) as Box<dyn Transport>)
            .collect();
        Ok(Box::new(VendorMailbox::new(paths)?))
    })
}

fn config() -> Config {
    Config {
        max_payload: 64 * 1024,
        ..Config::default()
    }
}

/// One host: a socket layer with paths to the STG.
fn host(a: &Array, name: &str) -> Arc<SocketLayer> {
    Arc::new(SocketLayer::new(
        HashMap::from([(STG, source(a, name))]),
        config(),
    ))
}

/// A free TCP port whose successor is free too (the flows use WKP and
/// WKP+1).
fn free_wkp() -> u16 {
    loop {
        let l = TcpListener::bind((LOCAL, 0)).unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind((LOCAL, p + 1)).is_ok() {
            return p;
        }
    }
}

/// FNV-1a, 64 bit.
fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Reads `fd` to its end; returns the bytes.
fn recv_to_end(layer: &SocketLayer, fd: Fd) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_001];
    loop {
        let n = layer.recv(fd, &mut buf).unwrap();
        if n == 0 {
            return got;
        }
        got.extend_from_slice(&buf[..n]);
    }
}

fn send_msg(layer: &SocketLayer, fd: Fd, msg: &[u8]) {
    layer
        .send_all(fd, &u32::try_from(msg.len()).unwrap().to_be_bytes())
        .unwrap();
    layer.send_all(fd, msg).unwrap();
}

fn recv_msg(layer: &SocketLayer, fd: Fd) -> Vec<u8> {
    let mut len = [0u8; 4];
    layer.recv_exact(fd, &mut len).unwrap();
    let mut msg = vec![0u8; u32::from_be_bytes(len) as usize];
    layer.recv_exact(fd, &mut msg).unwrap();
    msg
}

#[test]
fn fs_flow_control_over_tcp_data_over_stp() {
    const TOTAL: usize = 3 << 20;
    let (a, _m) = array();
    let (server, client) = (host(&a, "backup-server"), host(&a, "fs-client"));
    let wkp = free_wkp();
    let t0 = Instant::now();

    let srv = Arc::clone(&server);
    let server_side = thread::spawn(move || {
        let s = fs_server_connect(&srv, LOCAL, wkp, STG, 2, Some(b"site psk"), T).unwrap();
        assert_eq!((s.stg, s.stg_len), (STG, 2));
        // Control over TCP: what is coming.
        send_msg(&srv, s.control, format!("BACKUP {TOTAL}").as_bytes());
        // Data over STP, then end of stream.
        let data = payload(42, TOTAL);
        for chunk in data.chunks(100_003) {
            srv.send_all(s.data, chunk).unwrap();
        }
        srv.flush(s.data).unwrap();
        srv.shutdown_write(s.data).unwrap();
        // The client's checksum comes back over control.
        let sum = recv_msg(&srv, s.control);
        assert_eq!(sum, fnv(FNV_INIT, &data).to_be_bytes(), "checksum");
        // An error report over the errors connection.
        send_msg(
            &srv,
            s.errors,
            b"E0042 /etc/shadow: permission denied, skipped",
        );
        assert_eq!(recv_msg(&srv, s.control), b"DONE");
        s
    });

    let s = fs_client_accept(&client, LOCAL, wkp, Some(b"site psk"), T).unwrap();
    assert_eq!((s.stg, s.stg_len), (STG, 2));
    assert_eq!(client.mechanism(s.control), Mechanism::Tcp);
    assert_eq!(client.mechanism(s.errors), Mechanism::Tcp);
    assert_eq!(client.mechanism(s.data), Mechanism::Stp);
    assert!(s.control.0 < STP_FD_BASE && s.errors.0 < STP_FD_BASE && s.data.0 >= STP_FD_BASE);
    // The flow leaves exactly the session's three descriptors open.
    let mut want = vec![s.control, s.errors, s.data];
    want.sort();
    assert_eq!(client.descriptors(), want);

    assert_eq!(
        recv_msg(&client, s.control),
        format!("BACKUP {TOTAL}").as_bytes()
    );
    let data = recv_to_end(&client, s.data);
    assert_eq!(data.len(), TOTAL);
    assert!(
        data == payload(42, TOTAL),
        "STP data differs from what was sent"
    );
    send_msg(&client, s.control, &fnv(FNV_INIT, &data).to_be_bytes());
    let err = recv_msg(&client, s.errors);
    assert_eq!(err, b"E0042 /etc/shadow: permission denied, skipped");
    send_msg(&client, s.control, b"DONE");

    let ss = server_side.join().unwrap();
    assert_eq!(server.mechanism(ss.control), Mechanism::Tcp);
    assert_eq!(server.mechanism(ss.errors), Mechanism::Tcp);
    assert_eq!(server.mechanism(ss.data), Mechanism::Stp);
    let mut want = vec![ss.control, ss.errors, ss.data];
    want.sort();
    assert_eq!(server.descriptors(), want);

    let closer = {
        let srv = Arc::clone(&server);
        thread::spawn(move || ss.close(&srv).unwrap())
    };
    s.close(&client).unwrap();
    closer.join().unwrap();
    assert!(client.descriptors().is_empty() && server.descriptors().is_empty());
    eprintln!("fs flow + 3 MiB: {:?}", t0.elapsed());
}

#[test]
fn db_flow_everything_over_stp() {
    let (a, _m) = array();
    let (server, client) = (host(&a, "backup-server"), host(&a, "db-host"));
    let wkp = free_wkp();
    let up = payload(7, 1 << 20);
    let down = payload(8, 300_001);

    let srv = Arc::clone(&server);
    let (up2, down2) = (up.clone(), down.clone());
    let server_side = thread::spawn(move || {
        let s = db_server_accept(&srv, LOCAL, wkp, STG, 2, None, T).unwrap();
        assert_eq!(srv.mechanism(s.data), Mechanism::Stp);
        // Every TCP socket of the flow is closed: only the STP one is left.
        assert_eq!(srv.descriptors(), vec![s.data]);
        let mut got = vec![0u8; up2.len()];
        srv.recv_exact(s.data, &mut got).unwrap();
        assert!(got == up2, "client → server data differs");
        srv.send_all(s.data, &down2).unwrap();
        srv.flush(s.data).unwrap();
        srv.shutdown_write(s.data).unwrap();
        assert!(recv_to_end(&srv, s.data).is_empty());
        s
    });

    let s = db_client_connect(&client, LOCAL, wkp, None, T).unwrap();
    assert_eq!((s.stg, s.stg_len), (STG, 2));
    assert_eq!(client.mechanism(s.data), Mechanism::Stp);
    assert_eq!(client.descriptors(), vec![s.data]);
    assert!(client.descriptors().iter().all(|fd| fd.0 >= STP_FD_BASE));
    client.send_all(s.data, &up).unwrap();
    client.flush(s.data).unwrap();
    let got = recv_to_end(&client, s.data);
    assert!(got == down, "server → client data differs");
    client.shutdown_write(s.data).unwrap();

    let ss = server_side.join().unwrap();
    // The TCP descriptors the flows used (all below the STP range) are
    // gone: nothing in either layer answers to them.
    for layer in [&client, &server] {
        for fd in 3..64 {
            assert!(!layer.is_open(Fd(fd)), "TCP descriptor {fd} still open");
            assert!(matches!(
                layer.send(Fd(fd), b"x"),
                Err(SockError::BadDescriptor { .. })
            ));
        }
    }
    let closer = {
        let srv = Arc::clone(&server);
        thread::spawn(move || ss.close(&srv).unwrap())
    };
    s.close(&client).unwrap();
    closer.join().unwrap();
    assert!(!client.is_open(s.data));
}

fn keys() -> (FrameKey, FrameKey) {
    let mut rng = StdRng::seed_from_u64(11);
    let c = Handshake::new(&mut rng);
    let s = Handshake::new(&mut rng);
    let (co, so) = (c.public(), s.public());
    (
        c.finish(&so, Role::Client, None).unwrap(),
        s.finish(&co, Role::Server, None).unwrap(),
    )
}

#[test]
fn descriptor_value_routes_the_call() {
    let (a, mailbox) = array();
    let layer = host(&a, "router");

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
    let mut listener = StpListener::bind(source(&a, "peer"), None, ks, config()).unwrap();
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
    let layer = host(&a, "errors");
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
    let client = host(&a, "fs-client");
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
    let (server, client) = (host(&a, "backup-server"), host(&a, "fs-client"));
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
