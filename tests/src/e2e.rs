//! End-to-end bodies over a [`Rig`]: STP streams, the seed's two flows and
//! block mode. The in-process suites and the real-LIO suite call the same
//! functions; only the rig differs.
//!
//! These bodies panic (they are test bodies), with messages that say what
//! differed and where.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use scsi::Transport;
use stp_core::auth::{FrameKey, Handshake, Role};
use stp_core::block::{format, host_port, BlockStg};
use stp_core::conn::Config;
use stp_core::flows::{db_client_connect, db_server_accept, fs_client_accept, fs_server_connect};
use stp_core::frame::{Cipher, Direction, FrameError, Protection};
use stp_core::mailbox::{Mailbox, VendorMailbox};
use stp_core::sockets::{Fd, Mechanism, SocketLayer, STP_FD_BASE};
use stp_core::stg::BlockLayout;
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::vendor::{MailboxError, Refusal};
use stp_core::wire::{Frames, Header, Kind};

use crate::rig::{all_members, vendor_source, Rig};

/// The patience of every blocking step.
pub const T: Duration = Duration::from_secs(30);
/// Loopback, for the control connections.
pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `len` pseudo-random bytes from `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The bytes at `offset` of the deterministic stream `seed`: the receiver
/// regenerates them and compares.
pub fn chunk(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    payload(seed ^ offset.rotate_left(17), len)
}

/// Write size of the streams: odd on purpose.
pub const CHUNK: usize = 100_003;

/// A matched pair of frame keys (client, server).
pub fn keys(seed: u64) -> (FrameKey, FrameKey) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Handshake::new(&mut rng);
    let s = Handshake::new(&mut rng);
    let (co, so) = (c.public(), s.public());
    (
        c.finish(&so, Role::Client, None).unwrap(),
        s.finish(&co, Role::Server, None).unwrap(),
    )
}

/// The connection settings of the vendor-mode bodies.
pub fn config() -> Config {
    Config {
        max_payload: 64 * 1024,
        ..Config::default()
    }
}

/// Writes `total` bytes of stream `seed` from offset `from`, then flushes.
pub fn send_range(s: &mut StpStream, seed: u64, from: u64, total: u64) -> std::io::Result<()> {
    let mut off = from;
    while off < total {
        let n = CHUNK.min((total - off) as usize);
        s.write_all(&chunk(seed, off, n))?;
        off += n as u64;
    }
    s.flush()
}

/// Writes the whole stream `seed` of `total` bytes.
pub fn send_stream(s: &mut StpStream, seed: u64, total: u64) {
    send_range(s, seed, 0, total).unwrap();
}

/// Reads stream `seed` up to `total` bytes (not waiting for the end of the
/// stream) and checks every byte as it arrives; returns how many bytes
/// matched before the stream ended or failed (a mismatch panics: that is
/// corruption, never acceptable). `Ok` only for exactly `total` bytes.
pub fn check_stream(
    s: &mut StpStream,
    seed: u64,
    total: u64,
    progress: Option<&AtomicU64>,
) -> Result<u64, (u64, String)> {
    let mut got = Vec::new();
    let mut off = 0u64;
    let mut buf = vec![0u8; 70_001];
    while off < total {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) => return Err((off + got.len() as u64, e.to_string())),
        };
        got.extend_from_slice(&buf[..n]);
        assert!(
            off + (got.len() as u64) <= total,
            "stream {seed}: more than the {total} bytes sent arrived"
        );
        let last = off + got.len() as u64 >= total;
        while !got.is_empty() && (got.len() >= CHUNK || last || n == 0) {
            let take = CHUNK.min(got.len());
            assert!(
                got[..take] == chunk(seed, off, take)[..],
                "stream {seed}: bytes at offset {off}..{} differ from what was sent",
                off + take as u64
            );
            got.drain(..take);
            off += take as u64;
            if let Some(p) = progress {
                p.store(off, Ordering::Relaxed);
            }
        }
        if n == 0 {
            break;
        }
    }
    if off == total {
        Ok(off)
    } else {
        Err((off, format!("stream ended after {off} of {total} bytes")))
    }
}

/// Reads and checks the whole stream `seed` of `total` bytes.
pub fn recv_stream(s: &mut StpStream, seed: u64, total: u64) {
    if let Err((at, e)) = check_stream(s, seed, total, None) {
        panic!("stream {seed} failed at byte {at} of {total}: {e}");
    }
}

/// One connection: host 1 connects to host 0's listener, sends `total`
/// bytes, host 0 checks them and answers with a trailer.
pub fn transfer(rig: &Arc<dyn Rig>, total: u64, seed: u64) {
    let (kc, ks) = keys(seed);
    let n = rig.members();
    let server_src = all_members(rig, 0);
    // The client lists the members in the opposite order: order is local.
    let client_src = vendor_source(rig, 1, (0..n).rev().collect());
    let mut listener = StpListener::bind(server_src, None, ks, config()).unwrap();
    let port = listener.local_port();
    let t0 = Instant::now();
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        recv_stream(&mut s, seed, total);
        s.write_all(b"done").unwrap();
        s.shutdown(T).unwrap();
    });
    let mut c = StpStream::connect(client_src, port, kc, config(), T).unwrap();
    send_stream(&mut c, seed, total);
    c.shutdown(T).unwrap();
    let mut trailer = Vec::new();
    c.read_to_end(&mut trailer).unwrap();
    assert_eq!(trailer, b"done");
    server.join().unwrap();
    if total >= 1 << 20 {
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} MiB in {secs:.1} s ({:.1} MB/s)",
            rig.describe(),
            total >> 20,
            total as f64 / secs / 1e6
        );
    }
}

/// Three connections at once on three ports, both directions of hosts.
pub fn concurrent_ports(rig: &Arc<dyn Rig>, bytes: u64) {
    let mut handles = Vec::new();
    for (i, seed) in [21u64, 22, 23].into_iter().enumerate() {
        let (kc, ks) = keys(seed);
        // Alternate which host listens.
        let (srv, cli) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
        let mut listener = StpListener::bind(all_members(rig, srv), None, ks, config()).unwrap();
        let port = listener.local_port();
        let client_src = all_members(rig, cli);
        handles.push(thread::spawn(move || {
            let mut s = listener.accept(T).unwrap();
            recv_stream(&mut s, seed, bytes);
        }));
        handles.push(thread::spawn(move || {
            let mut c = StpStream::connect(client_src, port, kc, config(), T).unwrap();
            send_stream(&mut c, seed, bytes);
            c.shutdown(T).unwrap();
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

/// A client with the wrong key never gets a connection.
pub fn wrong_key_never_connects(rig: &Arc<dyn Rig>) {
    let (_, ks) = keys(5);
    let (wrong, _) = keys(6);
    let mut listener = StpListener::bind(all_members(rig, 0), None, ks, config()).unwrap();
    let port = listener.local_port();
    let client = thread::spawn({
        let src = all_members(rig, 1);
        move || StpStream::connect(src, port, wrong, config(), Duration::from_secs(2))
    });
    assert!(listener.accept(Duration::from_secs(3)).is_err());
    assert!(client.join().unwrap().is_err());
}

/// SEND commands captured by a [`Tap`]: CDB and data-out bytes.
pub type SendLog = Arc<std::sync::Mutex<Vec<(scsi::CdbBuf, Vec<u8>)>>>;

/// Records the SEND commands a path carries: a stand-in for an attacker who
/// has learned the client's binding handle and captured its frames.
pub struct Tap {
    inner: Box<dyn Transport>,
    log: SendLog,
}

impl Tap {
    /// A tap on `inner` that records into `log`.
    pub fn new(inner: Box<dyn Transport>, log: SendLog) -> Tap {
        Tap { inner, log }
    }
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

/// Halfway through a stream, another initiator path (`intruder_host`)
/// replays every SEND the client issued, handshake included: the array
/// accepts them (handle and source port are genuine) and the stream still
/// arrives exact, the server counting the duplicates.
pub fn replay_changes_nothing(rig: &Arc<dyn Rig>, intruder_host: usize) {
    let (kc, ks) = keys(41);
    let log: SendLog = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client_src: Arc<dyn PathSource> = {
        let rig = Arc::clone(rig);
        let log = log.clone();
        Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
            let paths = (0..rig.members())
                .map(|m| {
                    let inner = rig
                        .member(1, m)
                        .map_err(|e| MailboxError::Transport(scsi::CommandError::Io(e)))?;
                    Ok(Box::new(Tap {
                        inner,
                        log: log.clone(),
                    }) as Box<dyn Transport>)
                })
                .collect::<Result<Vec<_>, MailboxError>>()?;
            Ok(Box::new(VendorMailbox::new(paths)?))
        })
    };
    let mut listener = StpListener::bind(all_members(rig, 0), None, ks, config()).unwrap();
    let port = listener.local_port();
    let total = 40 * CHUNK as u64;
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        recv_stream(&mut s, 41, total);
        s.stats()
    });
    let mut c = StpStream::connect(client_src, port, kc, config(), T).unwrap();
    let half = total / 2;
    send_range(&mut c, 41, 0, half).unwrap();

    let captured = log.lock().unwrap().clone();
    assert!(captured.len() > 10, "captured {} SENDs", captured.len());
    let mut intruder = rig.member(intruder_host, 0).unwrap();
    for (cdb, data) in &captured {
        let cmd = scsi::Command::data_out(*cdb, scsi::IoBuf::from_slice(data));
        intruder.execute(cmd).into_result().unwrap();
    }

    let mut off = half;
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

/// One host of the flows: a socket layer with paths to the rig's STG.
pub fn socket_host(rig: &Arc<dyn Rig>, host: usize) -> Arc<SocketLayer> {
    Arc::new(SocketLayer::new(
        HashMap::from([(rig.stg(), all_members(rig, host))]),
        config(),
    ))
}

/// A free TCP port whose successor is free too (the flows use WKP and
/// WKP+1).
pub fn free_wkp() -> u16 {
    loop {
        let l = TcpListener::bind((LOCAL, 0)).unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind((LOCAL, p + 1)).is_ok() {
            return p;
        }
    }
}

/// FNV-1a, 64 bit.
pub fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}
/// FNV-1a's offset basis.
pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Reads `fd` to its end; returns the bytes.
pub fn recv_to_end(layer: &SocketLayer, fd: Fd) -> Vec<u8> {
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

/// Sends a length-prefixed message.
pub fn send_msg(layer: &SocketLayer, fd: Fd, msg: &[u8]) {
    layer
        .send_all(fd, &u32::try_from(msg.len()).unwrap().to_be_bytes())
        .unwrap();
    layer.send_all(fd, msg).unwrap();
}

/// Receives a length-prefixed message.
pub fn recv_msg(layer: &SocketLayer, fd: Fd) -> Vec<u8> {
    let mut len = [0u8; 4];
    layer.recv_exact(fd, &mut len).unwrap();
    let mut msg = vec![0u8; u32::from_be_bytes(len) as usize];
    layer.recv_exact(fd, &mut msg).unwrap();
    msg
}

/// Figs. 4/4A: the backup server (host 0) connects to the file-system
/// client (host 1); control and errors over TCP, `total` bytes of data over
/// STP, the checksum back over control.
pub fn fs_flow(rig: &Arc<dyn Rig>, total: usize) {
    let (server, client) = (socket_host(rig, 0), socket_host(rig, 1));
    let (stg, members) = (rig.stg(), rig.members() as u32);
    let wkp = free_wkp();
    let t0 = Instant::now();

    let srv = Arc::clone(&server);
    let server_side = thread::spawn(move || {
        let s = fs_server_connect(&srv, LOCAL, wkp, stg, members, Some(b"site psk"), T).unwrap();
        assert_eq!((s.stg, s.stg_len), (stg, members));
        send_msg(&srv, s.control, format!("BACKUP {total}").as_bytes());
        let data = payload(42, total);
        for chunk in data.chunks(100_003) {
            srv.send_all(s.data, chunk).unwrap();
        }
        srv.flush(s.data).unwrap();
        srv.shutdown_write(s.data).unwrap();
        let sum = recv_msg(&srv, s.control);
        assert_eq!(sum, fnv(FNV_INIT, &data).to_be_bytes(), "checksum");
        send_msg(
            &srv,
            s.errors,
            b"E0042 /etc/shadow: permission denied, skipped",
        );
        assert_eq!(recv_msg(&srv, s.control), b"DONE");
        s
    });

    let s = fs_client_accept(&client, LOCAL, wkp, Some(b"site psk"), T).unwrap();
    assert_eq!((s.stg, s.stg_len), (stg, members));
    assert_eq!(client.mechanism(s.control), Mechanism::Tcp);
    assert_eq!(client.mechanism(s.errors), Mechanism::Tcp);
    assert_eq!(client.mechanism(s.data), Mechanism::Stp);
    assert!(s.control.0 < STP_FD_BASE && s.errors.0 < STP_FD_BASE && s.data.0 >= STP_FD_BASE);
    let mut want = vec![s.control, s.errors, s.data];
    want.sort();
    assert_eq!(client.descriptors(), want);

    assert_eq!(
        recv_msg(&client, s.control),
        format!("BACKUP {total}").as_bytes()
    );
    let data = recv_to_end(&client, s.data);
    assert_eq!(data.len(), total);
    assert!(
        data == payload(42, total),
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
    eprintln!(
        "{}: fs flow + {total} B: {:?}",
        rig.describe(),
        t0.elapsed()
    );
}

/// Fig. 5: the database host (host 1) connects to the backup server
/// (host 0); after the port exchange everything moves to STP and the TCP
/// sockets are closed. `up` bytes go to the server, `down` come back.
pub fn db_flow(rig: &Arc<dyn Rig>, up: usize, down: usize) {
    let (server, client) = (socket_host(rig, 0), socket_host(rig, 1));
    let (stg, members) = (rig.stg(), rig.members() as u32);
    let wkp = free_wkp();
    let up = payload(7, up);
    let down = payload(8, down);

    let srv = Arc::clone(&server);
    let (up2, down2) = (up.clone(), down.clone());
    let server_side = thread::spawn(move || {
        let s = db_server_accept(&srv, LOCAL, wkp, stg, members, None, T).unwrap();
        assert_eq!(srv.mechanism(s.data), Mechanism::Stp);
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
    assert_eq!((s.stg, s.stg_len), (stg, members));
    assert_eq!(client.mechanism(s.data), Mechanism::Stp);
    assert_eq!(client.descriptors(), vec![s.data]);
    client.send_all(s.data, &up).unwrap();
    client.flush(s.data).unwrap();
    let got = recv_to_end(&client, s.data);
    assert!(got == down, "server → client data differs");
    client.shutdown_write(s.data).unwrap();

    let ss = server_side.join().unwrap();
    for layer in [&client, &server] {
        for fd in 3..64 {
            assert!(!layer.is_open(Fd(fd)), "TCP descriptor {fd} still open");
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

/// The block layout the block-mode bodies format: two hosts.
pub fn block_layout() -> BlockLayout {
    BlockLayout {
        hosts: 2,
        slots: 32,
        slot_blocks: 64,
    }
}

/// Block mode on the rig's plain shared LUN: format it (as STG 9), open
/// it from host 0 and host 1, and move `up` bytes one way and `down` back
/// over an STP stream carried by READ(16)/WRITE(16) only.
pub fn block_stream(rig: &Arc<dyn Rig>, up: u64, down: u64) {
    const STG: u32 = 9;
    let mut admin = vec![rig.plain(0).unwrap()];
    format(
        &mut admin,
        STG,
        &block_layout(),
        &mut StdRng::seed_from_u64(up),
    )
    .unwrap();
    drop(admin);
    let open = |host: usize| -> Arc<BlockStg> {
        BlockStg::open(vec![rig.plain(host).unwrap()], host as u16, STG).unwrap()
    };
    let (h0, h1) = (open(0), open(1));
    let source = |stg: &Arc<BlockStg>| -> Arc<dyn PathSource> {
        stp_core::stg::block_source(Arc::clone(stg))
    };
    let (kc, ks) = keys(4);
    let config = Config {
        max_payload: h0.max_payload(),
        ..Config::default()
    };
    let wkp = host_port(1, 1005).unwrap();
    let mut listener = StpListener::bind(source(&h1), Some(wkp), ks, config.clone()).unwrap();
    let started = Instant::now();
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        assert_eq!(s.local_port() >> 12, 1);
        recv_stream(&mut s, 41, up);
        send_stream(&mut s, 42, down);
        s.shutdown(T).unwrap();
    });
    let mut c = StpStream::connect(source(&h0), wkp, kc, config, T).unwrap();
    assert_eq!(c.local_port() >> 12, 0);
    send_stream(&mut c, 41, up);
    recv_stream(&mut c, 42, down);
    c.shutdown(T).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    server.join().unwrap();
    let (s0, s1) = (h0.stats(), h1.stats());
    eprintln!(
        "{}: block mode {} KiB in {:?}; host 0 {s0:?}; host 1 {s1:?}",
        rig.describe(),
        (up + down) >> 10,
        started.elapsed()
    );
    assert!(s1.slots_read + 4 >= s0.slots_written);
    // A block read while its owner rewrites it fails its CRC and is read
    // again next poll. Where reads are whole (the model) that never
    // happens; on a real array it may, now and then, never as a pattern.
    let bad = s0.bad_slots + s1.bad_slots + s0.bad_producer_blocks + s1.bad_producer_blocks;
    if rig.whole_block_reads() {
        assert_eq!(
            bad, 0,
            "bad slots or producer blocks with whole-block reads"
        );
    } else {
        let written = s0.slots_written + s1.slots_written;
        assert!(
            bad <= 1 + written / 20,
            "{bad} bad slots or producer blocks for {written} slots written: more than torn reads explain"
        );
    }
}

/// A vendor mailbox for `host` over every STG member.
pub fn rig_mailbox(rig: &Arc<dyn Rig>, host: usize) -> VendorMailbox {
    let paths = (0..rig.members())
        .map(|m| rig.member(host, m).unwrap())
        .collect();
    VendorMailbox::new(paths).unwrap()
}

/// The connection id of the hand-made frames below.
const HAND_CONN: u64 = 0xC0FFEE;

/// Seals a hand-made frame as a client of connection [`HAND_CONN`] would.
pub fn seal(header: Header, body: &[&[u8]], key: &FrameKey) -> Vec<u8> {
    Cipher::new(key, HAND_CONN, Protection::Encrypt)
        .seal_to_vec(Direction::ClientToServer, header, body)
        .unwrap()
}

/// Opens a hand-made frame as the server of [`HAND_CONN`] would.
pub fn open(bytes: &[u8], key: &FrameKey) -> Result<(Header, Vec<u8>), FrameError> {
    Cipher::new(key, HAND_CONN, Protection::Encrypt).open_to_vec(Direction::ClientToServer, bytes)
}

/// A DATA frame header from `src` to `dst`.
pub fn data_header(src: u32, dst: u32, seq: u64) -> Header {
    Header {
        kind: Kind::DATA,
        src_port: src,
        dst_port: dst,
        conn_id: HAND_CONN,
        seq,
        ..Header::default()
    }
}

/// Spoofed frames from another binding (on host `intruder_host`): the array
/// refuses a forged source port; a frame from the intruder's own port is
/// delivered but its tag does not verify under the connection's key; a
/// genuine frame sent twice arrives twice (the connection drops the
/// duplicate by sequence number).
pub fn spoofed_frames_rejected(rig: &Arc<dyn Rig>, intruder_host: usize) {
    let (kc, ks) = keys(9);
    let mut server = rig_mailbox(rig, 0);
    let mut client = rig_mailbox(rig, 1);
    let mut intruder = rig_mailbox(rig, intruder_host);
    let sb = server.bind(None).unwrap();
    let cb = client.bind(None).unwrap();
    let ib = intruder.bind(None).unwrap();
    let (wrong_key, _) = keys(77);
    let body = [b"forged" as &[u8]];
    let spoofed = seal(data_header(cb.port, sb.port, 1), &body, &wrong_key);
    let e = intruder.send_packed(&ib, &spoofed).unwrap_err();
    assert!(
        matches!(e, MailboxError::Refused(Refusal::SourcePortMismatch { .. })),
        "a forged source port: {e}"
    );
    let forged = seal(data_header(ib.port, sb.port, 1), &body, &wrong_key);
    intruder.send_packed(&ib, &forged).unwrap();
    let got = server.receive(&sb, 4096, Duration::from_secs(2)).unwrap();
    let f = Frames::new(&got).next().unwrap().unwrap();
    assert!(matches!(open(f.bytes(&got), &ks), Err(FrameError::BadTag)));

    let genuine_body = [b"hello" as &[u8]];
    let genuine = seal(data_header(cb.port, sb.port, 1), &genuine_body, &kc);
    client
        .send_packed(&cb, &[genuine.as_slice(), genuine.as_slice()].concat())
        .unwrap();
    let got = server.receive(&sb, 4096, Duration::from_secs(2)).unwrap();
    let seqs: Vec<u64> = Frames::new(&got)
        .map(|f| open(f.unwrap().bytes(&got), &ks).unwrap().0.seq)
        .collect();
    assert_eq!(seqs, vec![1, 1]);
    for (mb, b) in [(&mut server, &sb), (&mut client, &cb), (&mut intruder, &ib)] {
        mb.release(b).unwrap();
    }
}

/// A RECEIVE on one member is held (a long poll) until a SEND on another
/// member, from the other host, completes it.
pub fn long_poll_receive(rig: &Arc<dyn Rig>) {
    let (kc, ks) = keys(10);
    let mut server = rig_mailbox(rig, 0);
    let sb = server.bind(None).unwrap();
    let port = sb.port;
    let waiter = thread::spawn(move || {
        let t0 = Instant::now();
        let got = server.receive(&sb, 4096, Duration::from_secs(5)).unwrap();
        let f = Frames::new(&got).next().unwrap().unwrap();
        let body = open(f.bytes(&got), &ks).unwrap().1.to_vec();
        server.release(&sb).unwrap();
        (body, t0.elapsed())
    });
    thread::sleep(Duration::from_millis(300));
    let mut client = rig_mailbox(rig, 1);
    let cb = client.bind(None).unwrap();
    let body = [b"late arrival" as &[u8]];
    let frame = seal(data_header(cb.port, port, 1), &body, &kc);
    client.send_packed(&cb, &frame).unwrap();
    let (got, waited) = waiter.join().unwrap();
    assert_eq!(got, b"late arrival");
    assert!(
        waited >= Duration::from_millis(250),
        "the RECEIVE returned before the SEND ({waited:?}): it was not held"
    );
    client.release(&cb).unwrap();
}

/// Two mailboxes of host 0 over the same paths: while one holds a
/// long-poll RECEIVE, the other SENDs to it. On a path shared by an engine
/// thread (or any transport) the SEND must not wait behind the held
/// RECEIVE: were it stuck, the RECEIVE would end empty at its timeout.
/// `until_held` returns once the array holds the RECEIVE.
pub fn held_receive_does_not_stall_its_path(rig: &Arc<dyn Rig>, until_held: &dyn Fn()) {
    let (kc, ks) = keys(11);
    let mut waiter = rig_mailbox(rig, 0);
    let mut sender = rig_mailbox(rig, 0);
    let wb = waiter.bind(None).unwrap();
    let sb = sender.bind(None).unwrap();
    let held = thread::spawn(move || {
        let got = waiter.receive(&wb, 4096, Duration::from_secs(12)).unwrap();
        waiter.release(&wb).unwrap();
        got
    });
    until_held();
    let body = [b"through the same paths" as &[u8]];
    let frame = seal(data_header(sb.port, wb.port, 1), &body, &kc);
    sender.send_packed(&sb, &frame).unwrap();
    let got = held.join().unwrap();
    let f = Frames::new(&got)
        .next()
        .expect("the held RECEIVE ended empty: the SEND waited behind it")
        .unwrap();
    assert_eq!(open(f.bytes(&got), &ks).unwrap().1, body[0]);
    sender.release(&sb).unwrap();
}
