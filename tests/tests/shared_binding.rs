//! One binding per host and STG (docs/PROTOCOL.md §3.2), end to end on
//! the in-process array: many connections share it (counted at the
//! array), a slow reader does not hold up a fast one on the same binding,
//! frames for a closed or unknown connection are dropped without harm,
//! an array that refuses BIND's `ADD` flag gets a binding per connection
//! instead, and connections on a shared binding ride an array restart
//! through (docs/PROTOCOL.md §6.7).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use scsi::Transport;
use sim_target::{Array, Host, LunConfig, StgMailbox, StgSpec};
use stp_core::conn::Config;
use stp_core::mailbox::VendorMailbox;
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::wire::{Header, Kind};
use stp_tests::e2e::{check_stream, config, keys, recv_stream, send_stream, T};

const MEMBERS: u64 = 4;

/// STG 7 over four members.
fn array() -> (Array, Arc<StgMailbox>) {
    let a = Array::new();
    for id in 0..MEMBERS {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    let m = StgMailbox::with_seed(&a, vec![StgSpec::new(7, (0..MEMBERS).collect())], 9).unwrap();
    m.install(&a);
    (a, m)
}

/// One host's source of mailboxes onto every member (one per host, as a
/// process keeps: its streams share one binding).
fn source(a: &Array, host: &str) -> Arc<dyn PathSource> {
    let h = Host::login(a, host);
    stp_core::stg::open_with(
        stp_core::stg::MailboxMode::Vendor,
        7,
        MEMBERS as usize,
        &stp_core::stg::OpenOptions::default(),
        move |i| Ok(Box::new(h.open(i as u64)?) as Box<dyn Transport>),
    )
    .expect("a vendor-mode source")
}

/// Waits (at most `T`, a hang detector) until `done` holds.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < end, "{what} did not happen within {T:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// `n` connections from host B to a listener on host A: (client streams,
/// server streams), in pairs.
fn connect_many(
    a: &Array,
    n: usize,
    cfg: Config,
) -> (Vec<StpStream>, Vec<StpStream>, Arc<dyn PathSource>) {
    let (kc, ks) = keys(77);
    let server_src = source(a, "host-a");
    let client_src = source(a, "host-b");
    let mut listener = StpListener::bind(Arc::clone(&server_src), None, ks, cfg.clone()).unwrap();
    let port = listener.local_port();
    let (tx, rx) = mpsc::channel();
    let acceptor = thread::spawn(move || {
        for _ in 0..n {
            tx.send(listener.accept(T).unwrap()).unwrap();
        }
    });
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..n {
        clients.push(
            StpStream::connect(Arc::clone(&client_src), port, kc.clone(), cfg.clone(), T).unwrap(),
        );
        servers.push(rx.recv_timeout(T).unwrap());
    }
    acceptor.join().unwrap();
    (clients, servers, client_src)
}

#[test]
fn many_connections_share_one_binding_per_host() {
    const N: usize = 16;
    let (a, m) = array();
    let (mut clients, mut servers, _) = connect_many(&a, N, config());
    assert!(clients
        .iter()
        .chain(&servers)
        .all(StpStream::shares_binding));
    // At the array: the listener's binding (gone with the listener) and
    // one per host, whatever the number of connections; every
    // connection's port added to its host's.
    let st = m.stats();
    assert_eq!((st.binds, st.binds_added), (3, 2 * N as u64), "{st:?}");
    let o = m.occupancy();
    assert_eq!((o.bindings, o.ports), (2, 2 + 2 * N), "{o:?}");
    // Held RECEIVEs: at most one per member path per host, not one per
    // connection.
    assert!(
        o.waiting_receives <= 2 * MEMBERS as usize,
        "{} RECEIVEs held for {N} connections",
        o.waiting_receives
    );
    // Every connection carries its own stream, all at once.
    let each = 2 << 20;
    let mut threads = Vec::new();
    for (i, (mut c, mut s)) in clients.drain(..).zip(servers.drain(..)).enumerate() {
        let seed = 100 + i as u64;
        threads.push(thread::spawn(move || {
            send_stream(&mut c, seed, each);
            c.shutdown(T).unwrap();
            c
        }));
        threads.push(thread::spawn(move || {
            recv_stream(&mut s, seed, each);
            s.shutdown(T).unwrap();
            s
        }));
    }
    // While they run, the pumps grow with the traffic, never past the
    // member paths.
    let mut busiest = 0;
    while !threads.iter().all(|t| t.is_finished()) {
        busiest = busiest.max(m.occupancy().waiting_receives);
        thread::sleep(Duration::from_millis(1));
    }
    assert!(busiest <= 2 * MEMBERS as usize, "{busiest} RECEIVEs held");
    let streams: Vec<StpStream> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    drop(streams);
    // The last connection of each host released its binding, every port
    // with it.
    let o = m.occupancy();
    assert_eq!(
        (o.bindings, o.ports, o.waiting_receives),
        (0, 0, 0),
        "{o:?}"
    );
}

#[test]
fn a_slow_reader_does_not_stall_a_fast_one_on_the_same_binding() {
    let (a, _m) = array();
    let cfg = Config {
        max_payload: 64 * 1024,
        recv_window_frames: 16,
        ..Config::default()
    };
    let (mut clients, mut servers, _) = connect_many(&a, 2, cfg);
    let (mut fast_c, mut slow_c) = (clients.remove(0), clients.remove(0));
    let (mut fast_s, mut slow_s) = (servers.remove(0), servers.remove(0));
    // The slow connection's writer fills its peer's window and blocks:
    // nobody reads it.
    let slow_total = 8u64 << 20;
    let slow_writer = thread::spawn(move || {
        send_stream(&mut slow_c, 5, slow_total);
        slow_c.shutdown(T).unwrap();
        slow_c
    });
    eventually("the slow reader's window filling", || {
        slow_s.stats().data_frames_received >= 16
    });
    // Meanwhile the fast one moves 32 MiB through the same binding.
    let fast_total = 32u64 << 20;
    let fast_writer = thread::spawn(move || {
        send_stream(&mut fast_c, 6, fast_total);
        fast_c.shutdown(T).unwrap();
        fast_c
    });
    recv_stream(&mut fast_s, 6, fast_total);
    fast_s.shutdown(T).unwrap();
    let _fast_c = fast_writer.join().unwrap();
    // The slow one held its window the whole time, never more (credit),
    // and still gets every byte once it reads.
    assert_eq!(slow_s.stats().above_window_dropped, 0);
    recv_stream(&mut slow_s, 5, slow_total);
    slow_s.shutdown(T).unwrap();
    let _slow_c = slow_writer.join().unwrap();
}

#[test]
fn frames_for_a_closed_or_unknown_connection_are_dropped_without_harm() {
    let (a, _m) = array();
    // Quick to give up on a peer that went away.
    let cfg = Config {
        max_retransmits: 4,
        max_rto: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        keepalive: Duration::from_millis(500),
        ..config()
    };
    let (mut clients, mut servers, _) = connect_many(&a, 2, cfg);
    let (mut keep_c, mut gone_c) = (clients.remove(0), clients.remove(0));
    let (mut keep_s, gone_s) = (servers.remove(0), servers.remove(0));
    let keep_port = keep_c.peer_port();
    // One connection's server end goes away mid-stream (its port leaves
    // the shared binding) while its client keeps writing.
    let gone_writer = thread::spawn(move || {
        let data = vec![7u8; 256 * 1024];
        let mut written = 0u64;
        let err = loop {
            match gone_c.write_all(&data) {
                Ok(()) => written += data.len() as u64,
                Err(e) => break e,
            }
            assert!(written < 1 << 30, "the writer never noticed its peer went");
        };
        (gone_c, err)
    });
    thread::sleep(Duration::from_millis(50));
    drop(gone_s);
    // A third initiator sends a well-formed frame to the other
    // connection's port under another connection id: the array routes it
    // (the port is bound), the hub drops it.
    let before = stp_core::counters::snapshot();
    let intruder = Host::login(&a, "intruder");
    let mut mb = VendorMailbox::new(vec![
        Box::new(intruder.open(0).unwrap()) as Box<dyn Transport>
    ])
    .unwrap();
    let ib = mb.bind(None).unwrap();
    let stray = Header {
        kind: Kind::DATA,
        src_port: ib.port,
        dst_port: keep_port,
        conn_id: 0x5EED,
        seq: 1,
        payload_len: 3,
        ..Header::default()
    };
    let mut frame = stray.to_bytes().to_vec();
    frame.extend_from_slice(b"bad");
    mb.send_packed(&ib, &frame).unwrap();
    eventually("the stray frame being dropped", || {
        stp_core::counters::snapshot()
            .since(&before)
            .recv_dropped_no_connection
            >= 1
    });
    // The other connection is untouched and exact.
    let keeper = thread::spawn(move || {
        recv_stream(&mut keep_s, 8, 8 << 20);
        keep_s.shutdown(T).unwrap();
        keep_s
    });
    send_stream(&mut keep_c, 8, 8 << 20);
    keep_c.shutdown(T).unwrap();
    let keep_s = keeper.join().unwrap();
    assert_eq!(keep_s.stats().protocol_violations, 0);
    // The orphaned writer learns its peer is gone.
    let (_gone_c, err) = gone_writer.join().unwrap();
    eprintln!("the writer of the closed connection: {err}");
    let _ = mb.release(&ib);
}

#[test]
fn an_array_without_shared_bindings_gets_a_binding_per_connection() {
    const N: usize = 4;
    let (a, m) = array();
    m.set_shared_bindings(false);
    let (mut clients, mut servers, client_src) = connect_many(&a, N, config());
    assert!(!clients
        .iter()
        .chain(&servers)
        .any(StpStream::shares_binding));
    // Each host tried once (a BIND, then the refused ADD), then bound a
    // port per connection: the listener, two probes, 2N connections.
    let st = m.stats();
    assert_eq!((st.binds, st.binds_added), (3 + 2 * N as u64, 0), "{st:?}");
    // One binding per connection end, and a RECEIVE held on each (a pump
    // between two long polls holds none for a moment).
    let o = m.occupancy();
    assert_eq!(o.bindings, 2 * N, "{o:?}");
    eventually("a RECEIVE held per connection end", || {
        m.occupancy().waiting_receives >= 2 * N
    });
    // The streams work as before.
    let (mut c, mut s) = (clients.remove(0), servers.remove(0));
    let t = thread::spawn(move || {
        recv_stream(&mut s, 9, 3 << 20);
        s.shutdown(T).unwrap();
        s
    });
    send_stream(&mut c, 9, 3 << 20);
    c.shutdown(T).unwrap();
    t.join().unwrap();
    // The host remembers: a further connection does not try again.
    let binds = m.stats().binds;
    let (kc, ks) = keys(3);
    let server_src = source(&a, "host-c");
    let mut l = StpListener::bind(server_src, None, ks, config()).unwrap();
    let port = l.local_port();
    let acc = thread::spawn(move || l.accept(T).unwrap());
    let mut c2 = StpStream::connect(client_src, port, kc, config(), T).unwrap();
    let mut s2 = acc.join().unwrap();
    // host-c's listener, its probe, its port; host-b's port alone.
    assert_eq!(m.stats().binds, binds + 4);
    c2.write_all(b"still works").unwrap();
    let closer = thread::spawn(move || {
        c2.shutdown(T).unwrap();
        c2
    });
    let mut got = Vec::new();
    s2.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"still works");
    s2.shutdown(T).unwrap();
    closer.join().unwrap();
    drop((clients, servers));
}

#[test]
fn connections_on_a_shared_binding_ride_an_array_restart_through() {
    const N: usize = 4;
    let each: u64 = 8 << 20;
    let (a, m) = array();
    let (mut clients, mut servers, client_src) = connect_many(&a, N, config());
    let ports: Vec<u32> = clients
        .iter()
        .chain(&servers)
        .map(|s| s.local_port())
        .collect();
    let received = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for (i, (mut c, mut s)) in clients.drain(..).zip(servers.drain(..)).enumerate() {
        let seed = 300 + i as u64;
        threads.push(thread::spawn(move || {
            send_stream(&mut c, seed, each);
            c.shutdown(T).unwrap();
            c
        }));
        let received = received.clone();
        threads.push(thread::spawn(move || {
            // Every byte, each once, and no more: Ok only then.
            if let Err((at, e)) = check_stream(&mut s, seed, each, Some(&received)) {
                panic!("stream {seed} failed at byte {at} after the restart: {e}");
            }
            s.shutdown(T).unwrap();
            s
        }));
    }
    // Before any stream can have ended (fewer bytes received in all than
    // one stream carries), the array restarts: every binding and every
    // frame queued at it gone. (A tight wait: the streams are fast.)
    let end = Instant::now() + T;
    while received.load(Ordering::Relaxed) < each / 2 {
        assert!(Instant::now() < end, "the streams did not start");
        thread::yield_now();
    }
    a.power_on();
    // Every binding is gone now; the streams' pumps may bind their ports
    // again at once, so what the array holds is not asserted here.
    m.reset();
    let streams: Vec<StpStream> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Each kept its port number, now a binding of its own.
    let after: Vec<u32> = streams.iter().map(|s| s.local_port()).collect();
    assert_eq!(after, {
        // threads alternate client, server per pair
        let (c, s) = ports.split_at(N);
        c.iter()
            .zip(s)
            .flat_map(|(c, s)| [*c, *s])
            .collect::<Vec<_>>()
    });
    let shared: Vec<bool> = streams.iter().map(StpStream::shares_binding).collect();
    assert!(shared.iter().all(|s| !s), "{shared:?}");
    // A new connection after the restart shares a new binding again.
    let (kc, ks) = keys(78);
    let mut listener = StpListener::bind(source(&a, "host-c"), None, ks, config()).unwrap();
    let port = listener.local_port();
    let acceptor = thread::spawn(move || listener.accept(T).unwrap());
    let fresh = StpStream::connect(Arc::clone(&client_src), port, kc, config(), T).unwrap();
    assert!(fresh.shares_binding());
    drop(acceptor.join().unwrap());
    drop(fresh);
    drop(streams);
    // Nothing is left bound at the array.
    let o = m.occupancy();
    assert_eq!((o.bindings, o.ports), (0, 0), "{o:?}");
}
