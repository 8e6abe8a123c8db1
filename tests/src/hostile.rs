//! A hostile third initiator on the SAN during a backup (issue 19, items 2
//! and 3; docs/PROTOCOL.md §7.1). One body over a [`Rig`]: the in-process
//! suite runs it on the model's third host, the real-LIO suite on a third
//! tcm_loop nexus onto the same LUNs.
//!
//! Host 0 backs up host 1's file tree (the fs flow, STP only) while host 2,
//! the intruder, reads everything it can reach and searches it for
//! distinctive content of the backed-up files (random 64-byte markers), and
//! attacks:
//!
//! * **vendor mode**: before the backup, floods BINDs until the array
//!   refuses (its per-initiator port limit), checking that a connection
//!   open meanwhile keeps working, that another host still binds, and that
//!   a new connection works once the flood is released; during the backup, guesses
//!   binding handles (RECEIVE, RELEASE, PORT STATUS with random handles),
//!   replays the client's captured SENDs verbatim and with a payload byte
//!   flipped, churns BINDs to catch released ports and RECEIVEs all they
//!   get, and READs the member LUNs;
//! * **block mode**: sweeps every lane with READ, replays slots it read
//!   earlier over the slots they came from, and writes garbage over index
//!   blocks and slots.
//!
//! The backup then restores byte-exact and verifies clean, or failed with a
//! reason; nothing the intruder found holds a marker when the frames are
//! encrypted; and a positive control shows the search would have found
//! them: the same campaign with authentication only (payload in the clear)
//! finds the markers in block mode, and in vendor mode a frame sent to the
//! intruder in the clear is found.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use scsi::cdb::{Cdb, RwFlags};
use scsi::{Command, IoBuf, Transport};
use stp_core::block::{BlockConfig, BlockStg};
use stp_core::conn::Config;
use stp_core::frame::{Cipher, Direction, Protection};
use stp_core::mailbox::Binding;
use stp_core::stg::{self, MailboxMode, OpenOptions};
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::vendor::{self, MailboxError, Refusal};
use stp_core::wire::{Header, Kind};
use stp_tools::backup::demo::{compare_trees, make_tree};
use stp_tools::backup::pipe::Policy;
use stp_tools::backup::repo::Repo;
use stp_tools::backup::traffic::DroppedFrames;

use crate::backup::{format_block_stg, free_wkp3, host_with, BLOCK_STG};
use crate::e2e::{self, block_layout, keys, Tap, T};
use crate::rig::{all_members, Rig};

/// The intruder's host index on the rig.
pub const INTRUDER: usize = 2;

/// Distinctive content planted in the backed-up files, and the search for
/// any 16-byte quarter of it.
pub struct Markers {
    markers: Vec<[u8; 64]>,
    /// Quarters by their first two bytes (a prefilter).
    first2: Vec<bool>,
    quarters: Vec<([u8; 16], usize)>,
}

impl Markers {
    /// `n` random markers.
    pub fn new(n: usize, seed: u64) -> Markers {
        let mut rng = StdRng::seed_from_u64(seed);
        let markers: Vec<[u8; 64]> = (0..n)
            .map(|_| {
                let mut m = [0u8; 64];
                rng.fill_bytes(&mut m);
                m
            })
            .collect();
        let mut m = Markers {
            markers: Vec::new(),
            first2: vec![false; 1 << 16],
            quarters: Vec::new(),
        };
        for (i, mk) in markers.iter().enumerate() {
            m.add(i, mk);
        }
        m.markers = markers;
        m
    }

    fn add(&mut self, i: usize, mk: &[u8; 64]) {
        for q in mk.chunks_exact(16) {
            let q: [u8; 16] = q.try_into().unwrap();
            self.first2[usize::from(u16::from_le_bytes([q[0], q[1]]))] = true;
            self.quarters.push((q, i));
        }
    }

    /// Marker `i`.
    pub fn get(&self, i: usize) -> &[u8; 64] {
        &self.markers[i]
    }

    /// The markers found in `buf` (by index), each once.
    pub fn find(&self, buf: &[u8]) -> Vec<usize> {
        let mut found = Vec::new();
        if buf.len() < 16 {
            return found;
        }
        for at in 0..=buf.len() - 16 {
            if !self.first2[usize::from(u16::from_le_bytes([buf[at], buf[at + 1]]))] {
                continue;
            }
            let w = &buf[at..at + 16];
            for (q, i) in &self.quarters {
                if w == q && !found.contains(i) {
                    found.push(*i);
                }
            }
        }
        found
    }
}

/// Writes the marker files under `root`: marker `i` twice in file `i`,
/// between random bytes. Their directory sorts after everything else in
/// the tree, so the backup sends them last and the lanes still hold them
/// when the intruder's last sweep reads them (a loaded host may starve
/// the sweeps made while the backup runs).
pub fn plant_markers(root: &Path, markers: &Markers, files: usize) {
    let dir = root.join("zz-secrets");
    fs::create_dir_all(&dir).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5ec2e7);
    for i in 0..files {
        let mut v = vec![0u8; 24 << 10];
        rng.fill_bytes(&mut v);
        v[1000..1064].copy_from_slice(markers.get(i));
        v[17_000..17_064].copy_from_slice(markers.get(i));
        fs::write(dir.join(format!("secret-{i:02}.bin")), v).unwrap();
    }
}

/// What the intruder saw and did.
#[derive(Debug, Default)]
pub struct Seen {
    /// Commands that returned data to the intruder (READ, RECEIVE).
    pub reads: AtomicU64,
    /// Bytes they returned.
    pub bytes_read: AtomicU64,
    /// Markers found, with where (deduplicated by marker).
    pub found: Mutex<Vec<(usize, String)>>,
    /// Whether the control canary was found.
    pub canary: AtomicBool,
    /// Commands naming a random binding handle.
    pub guesses: AtomicU64,
    /// Of those, the ones the array accepted.
    pub guesses_accepted: AtomicU64,
    /// Captured SENDs replayed verbatim / with a payload byte flipped.
    pub replayed: AtomicU64,
    /// Forged (byte-flipped) SENDs replayed.
    pub forged: AtomicU64,
    /// Replays the array accepted.
    pub replays_accepted: AtomicU64,
    /// Frames the intruder's own bindings received.
    pub frames_caught: AtomicU64,
    /// Garbage WRITEs over lanes (block mode).
    pub scribbles: AtomicU64,
    /// Slots written back over themselves later (block mode).
    pub slot_replays: AtomicU64,
}

impl Seen {
    fn search(&self, markers: &Markers, canary: usize, buf: &[u8], what: &str) {
        self.reads.fetch_add(1, Relaxed);
        self.bytes_read.fetch_add(buf.len() as u64, Relaxed);
        for i in markers.find(buf) {
            if i == canary {
                self.canary.store(true, Relaxed);
                continue;
            }
            let mut f = self.found.lock().unwrap();
            if !f.iter().any(|(j, _)| *j == i) {
                f.push((i, what.to_owned()));
            }
        }
    }
}

/// The BIND flood's outcome (vendor mode).
#[derive(Debug, Clone)]
pub struct Flood {
    /// Ports the intruder got before the array refused.
    pub bound: usize,
    /// Why the array refused the next.
    pub refusal: String,
    /// Whether that was a limit on ports (NO FREE PORTS: the initiator's,
    /// or the whole port space's).
    pub at_limit: bool,
    /// What a legitimate host's BIND got while the flood held the ports.
    pub legit_bind: String,
    /// Seconds the flood took to reach the limit.
    pub seconds: f64,
}

/// Everything the campaign found.
#[derive(Debug)]
pub struct Findings {
    /// The backup restored byte-exact and verified, or why not.
    pub backup: Result<(), String>,
    /// What the intruder saw and did.
    pub seen: Arc<Seen>,
    /// The flood (vendor mode).
    pub flood: Option<Flood>,
    /// Frames the server's and the agent's connections dropped on receipt.
    pub dropped: (DroppedFrames, DroppedFrames),
}

fn conn_config(protection: Protection, max_payload: u32) -> Config {
    Config {
        max_payload,
        protection,
        ..Config::default()
    }
}

/// A host's vendor-mode source over every member, its SENDs recorded in
/// `log` if given.
fn vendor_src(rig: &Arc<dyn Rig>, host: usize, log: Option<e2e::SendLog>) -> Arc<dyn PathSource> {
    let r = Arc::clone(rig);
    stg::open_with(
        MailboxMode::Vendor,
        rig.stg(),
        rig.members(),
        &OpenOptions::default(),
        move |i| {
            let t = r.member(host, i)?;
            Ok(match &log {
                Some(log) => Box::new(Tap::new(t, log.clone())) as Box<dyn Transport>,
                None => t,
            })
        },
    )
    .unwrap_or_else(|e| panic!("host {host}'s vendor-mode source: {e}"))
}

fn block_src(rig: &Arc<dyn Rig>, host: usize) -> Arc<dyn PathSource> {
    let cfg = BlockConfig {
        bad_slot_patience: Duration::from_millis(100),
        ..BlockConfig::default()
    };
    let stg = BlockStg::open_with(vec![rig.plain(host).unwrap()], host as u16, BLOCK_STG, cfg)
        .unwrap_or_else(|e| panic!("{}: opening block STG as host {host}: {e}", rig.describe()));
    stg::block_source(stg)
}

fn raw(t: &mut dyn Transport, cmd: Command) -> Result<IoBuf, String> {
    t.execute(cmd)
        .into_result()
        .map(|(d, _)| d)
        .map_err(|e| e.to_string())
}

fn vendor_cmd(cdb: scsi::cdb::VendorCdb, len: usize) -> Command {
    let cdb = Cdb::Vendor(cdb).emit();
    if len == 0 {
        Command::no_data(cdb)
    } else {
        Command::data_in(cdb, len)
    }
}

/// The campaign over `rig` in `mode` with frames under `protection`:
/// a file-system backup of a tree of about `tree_bytes` with the markers
/// planted, under attack. Panics only on a broken rig; the findings say
/// what happened (see [`check`]).
pub fn backup_under_attack(
    rig: &Arc<dyn Rig>,
    mode: MailboxMode,
    protection: Protection,
    tree_bytes: u64,
) -> Findings {
    assert!(
        rig.hosts() > INTRUDER,
        "{}: the campaign needs a third initiator (host {INTRUDER})",
        rig.describe()
    );
    let markers = Arc::new(Markers::new(33, rand::random()));
    // Marker 32 is the control canary, never in a file.
    const CANARY: usize = 32;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, tree_bytes, 19).unwrap();
    plant_markers(&src, &markers, 32);
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let wkp = free_wkp3();
    let seen = Arc::new(Seen::default());
    let log: e2e::SendLog = Arc::new(Mutex::new(Vec::new()));

    let mut flood = None;
    let (server, client) = match mode {
        MailboxMode::Vendor => {
            flood = Some(bind_flood(rig));
            let conn = conn_config(protection, 64 << 10);
            (
                host_with(
                    vendor_src(rig, 0, None),
                    rig.stg(),
                    rig.members(),
                    wkp,
                    Policy::Always,
                    conn.clone(),
                ),
                host_with(
                    vendor_src(rig, 1, Some(log.clone())),
                    rig.stg(),
                    rig.members(),
                    wkp,
                    Policy::Always,
                    conn,
                ),
            )
        }
        MailboxMode::Block => {
            format_block_stg(rig);
            let (s, c) = (block_src(rig, 0), block_src(rig, 1));
            let conn = conn_config(protection, 16 << 10);
            (
                host_with(s, BLOCK_STG, 1, wkp, Policy::Always, conn.clone()),
                host_with(c, BLOCK_STG, 1, wkp, Policy::Always, conn),
            )
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    match mode {
        MailboxMode::Vendor => {
            attackers.extend(vendor_attackers(rig, &markers, CANARY, &seen, &stop, &log));
        }
        MailboxMode::Block => {
            attackers.extend(block_attackers(rig, &markers, &seen, &stop));
        }
    }
    // Give the readers a head start.
    thread::sleep(Duration::from_millis(100));

    let (out, agent) = crate::backup::full_fs_backup(&server, &client, &repo, &src);
    // The readers keep looking at what the lanes still hold.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    let dropped = (
        out.as_ref().map(|o| o.dropped).unwrap_or_default(),
        agent.as_ref().map(|o| o.dropped).unwrap_or_default(),
    );
    let backup = match (out, agent) {
        (Ok(o), Ok(_)) => {
            let r = tmp.path().join("restored");
            repo.restore(o.backup_id, &r, &[])
                .map_err(|e| format!("restore: {e:#}"))
                .and_then(|_| {
                    let diff = compare_trees(&src, &r).map_err(|e| format!("compare: {e:#}"))?;
                    let v = repo
                        .verify(o.backup_id)
                        .map_err(|e| format!("verify: {e:#}"))?;
                    if diff.is_empty() && v.problems.is_empty() {
                        Ok(())
                    } else {
                        panic!(
                            "{}: the backup completed but did not restore exact \
                             (FORGED OR DAMAGED DATA DELIVERED): {diff:?} {:?}",
                            rig.describe(),
                            v.problems
                        )
                    }
                })
        }
        (Err(e), _) | (_, Err(e)) => Err(format!("{e:#}")),
    };
    Findings {
        backup,
        seen,
        flood,
        dropped,
    }
}

/// Vendor mode, before the backup: the intruder BINDs ports into one
/// binding until the array refuses (its per-initiator limit). A connection
/// opened before keeps working, a legitimate BIND meanwhile still binds,
/// and once the intruder releases its ports a new connection works.
fn bind_flood(rig: &Arc<dyn Rig>) -> Flood {
    let (kc, ks) = keys(61);
    let mut listener = StpListener::bind(all_members(rig, 0), None, ks, e2e::config()).unwrap();
    let port = listener.local_port();
    const N: u64 = 10 * e2e::CHUNK as u64;
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        e2e::recv_stream(&mut s, 61, 2 * N);
    });
    let mut c = StpStream::connect(all_members(rig, 1), port, kc, e2e::config(), T).unwrap();
    e2e::send_range(&mut c, 61, 0, N).unwrap();

    let mut mb = e2e::rig_mailbox(rig, INTRUDER);
    let t0 = Instant::now();
    let catch = mb.bind(None).unwrap();
    let mut held: Vec<Binding> = Vec::new();
    let refusal = loop {
        match mb.bind_add(&catch) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
        assert!(
            held.len() <= vendor::MAX_PORT as usize,
            "{}: the array bound more ports than exist",
            rig.describe()
        );
    };
    let seconds = t0.elapsed().as_secs_f64();
    let bound = held.len() + 1;
    eprintln!(
        "{}: the intruder bound {bound} ports in {seconds:.1} s, then: {refusal}",
        rig.describe()
    );
    let mut legit = e2e::rig_mailbox(rig, 0);
    let legit_bind = match legit.bind(None) {
        Ok(b) => {
            legit.release(&b).unwrap();
            "bound".to_owned()
        }
        Err(e) => e.to_string(),
    };
    // The connection open before the flood keeps working.
    e2e::send_range(&mut c, 61, N, 2 * N).unwrap();
    c.shutdown(T).unwrap();
    server.join().unwrap();
    for b in held.iter().chain([&catch]) {
        mb.release(b).unwrap();
    }
    // And a new one works again.
    e2e::transfer(rig, 256 << 10, 62);
    Flood {
        bound,
        at_limit: matches!(
            refusal,
            MailboxError::Refused(Refusal::PortLimit { .. } | Refusal::NoFreePorts)
        ),
        refusal: refusal.to_string(),
        legit_bind,
        seconds,
    }
}

fn vendor_attackers(
    rig: &Arc<dyn Rig>,
    markers: &Arc<Markers>,
    canary: usize,
    seen: &Arc<Seen>,
    stop: &Arc<AtomicBool>,
    log: &e2e::SendLog,
) -> Vec<thread::JoinHandle<()>> {
    let mut out = Vec::new();
    // Catch what reaches the intruder's ports: a binding with ports
    // churned through it, RECEIVEd all the time. The control: a frame in
    // the clear, carrying the canary, sent to it by another host.
    {
        let (rig, markers, seen, stop) = (rig.clone(), markers.clone(), seen.clone(), stop.clone());
        out.push(thread::spawn(move || {
            let mut mb = e2e::rig_mailbox(&rig, INTRUDER);
            let catch = mb.bind(None).unwrap();
            {
                let mut other = e2e::rig_mailbox(&rig, 0);
                let ob = other.bind(None).unwrap();
                let (k, _) = keys(63);
                let h = Header {
                    kind: Kind::DATA,
                    src_port: ob.port,
                    dst_port: catch.port,
                    conn_id: 1,
                    seq: 1,
                    ..Header::default()
                };
                let f = Cipher::new(&k, 1, Protection::Authenticate)
                    .seal_to_vec(Direction::ClientToServer, h, &[markers.get(canary)])
                    .unwrap();
                other.send_packed(&ob, &f).unwrap();
                other.release(&ob).unwrap();
            }
            let mut churn: Vec<Binding> = Vec::new();
            while !stop.load(Relaxed) {
                for b in churn.drain(..) {
                    let _ = mb.release(&b);
                }
                for _ in 0..64 {
                    if let Ok(b) = mb.bind_add(&catch) {
                        churn.push(b);
                    }
                }
                if let Ok(got) = mb.receive(&catch, 1 << 20, Duration::from_millis(50)) {
                    if !got.is_empty() {
                        let n = stp_core::wire::Frames::new(&got).count();
                        seen.frames_caught.fetch_add(n as u64, Relaxed);
                        seen.search(&markers, canary, &got, "a RECEIVE on the intruder's ports");
                    }
                }
            }
            for b in churn.iter().chain([&catch]) {
                let _ = mb.release(b);
            }
        }));
    }
    // Guess binding handles.
    {
        let (rig, markers, seen, stop) = (rig.clone(), markers.clone(), seen.clone(), stop.clone());
        out.push(thread::spawn(move || {
            let mut t = rig.member(INTRUDER, 0).unwrap();
            let mut rng = StdRng::seed_from_u64(rand::random());
            while !stop.load(Relaxed) {
                let h: u32 = rng.gen();
                let cmds = [
                    vendor_cmd(vendor::receive(h, 64 << 10, Duration::ZERO), 64 << 10),
                    vendor_cmd(vendor::port_status(h), vendor::PORT_STATUS_LEN),
                    vendor_cmd(vendor::release(h), 0),
                ];
                for cmd in cmds {
                    seen.guesses.fetch_add(1, Relaxed);
                    if let Ok(d) = raw(&mut *t, cmd) {
                        seen.guesses_accepted.fetch_add(1, Relaxed);
                        seen.search(&markers, canary, &d, "a RECEIVE with a guessed handle");
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    // Replay the client's captured SENDs, verbatim and forged.
    {
        let (rig, seen, stop, log) = (rig.clone(), seen.clone(), stop.clone(), log.clone());
        out.push(thread::spawn(move || {
            let mut paths: Vec<Box<dyn Transport>> = (0..rig.members())
                .map(|m| rig.member(INTRUDER, m).unwrap())
                .collect();
            let mut rng = StdRng::seed_from_u64(rand::random());
            while !stop.load(Relaxed) {
                let captured: Vec<_> = std::mem::take(&mut *log.lock().unwrap());
                // A sample: every SEND would double the backup's traffic.
                for (cdb, data) in &captured {
                    if !rng.gen_ratio(1, 4) {
                        continue;
                    }
                    let m = rng.gen_range(0..paths.len());
                    let mut data = data.clone();
                    let forge = rng.gen_bool(0.5) && data.len() > stp_core::wire::HEADER_LEN + 1;
                    if forge {
                        let at = rng.gen_range(stp_core::wire::HEADER_LEN..data.len());
                        data[at] ^= 0x20;
                        seen.forged.fetch_add(1, Relaxed);
                    } else {
                        seen.replayed.fetch_add(1, Relaxed);
                    }
                    let cmd = Command::data_out(*cdb, IoBuf::from_slice(&data));
                    if raw(&mut *paths[m], cmd).is_ok() {
                        seen.replays_accepted.fetch_add(1, Relaxed);
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // READ the member LUNs (vendor mode keeps frames in the array, not on
    // the LUNs' blocks: what is there to see?).
    {
        let (rig, markers, seen, stop) = (rig.clone(), markers.clone(), seen.clone(), stop.clone());
        out.push(thread::spawn(move || {
            let mut paths: Vec<Box<dyn Transport>> = (0..rig.members())
                .map(|m| rig.member(INTRUDER, m).unwrap())
                .collect();
            while !stop.load(Relaxed) {
                for (m, t) in paths.iter_mut().enumerate() {
                    for lba in (0..4096u64).step_by(256) {
                        let cdb = Cdb::Read16 {
                            lba,
                            blocks: 256,
                            flags: RwFlags::default(),
                        };
                        if let Ok(d) = raw(&mut **t, Command::data_in(cdb.emit(), 256 * 512)) {
                            seen.search(&markers, canary, &d, &format!("a READ of member {m}"));
                        }
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    out
}

/// Slot images the lane reader kept for the replayer: (LBA, bytes).
type Captured = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

fn block_attackers(
    rig: &Arc<dyn Rig>,
    markers: &Arc<Markers>,
    seen: &Arc<Seen>,
    stop: &Arc<AtomicBool>,
) -> Vec<thread::JoinHandle<()>> {
    let layout = block_layout();
    let lanes_end = 1 + layout.pairs() * layout.lane_blocks();
    let slot_blocks = u64::from(layout.slot_blocks);
    let slot_lbas: Vec<u64> = (0..2u16)
        .flat_map(|src| {
            let lane = layout.lane_offset(src, 1 - src).unwrap();
            (0..u64::from(layout.slots)).map(move |s| lane + 2 + s * slot_blocks)
        })
        .collect();
    let index_lbas: Vec<u64> = (0..2u16)
        .flat_map(|src| {
            let lane = layout.lane_offset(src, 1 - src).unwrap();
            [lane, lane + 1]
        })
        .collect();
    // Slots the reader saw, for the replayer.
    let captured: Captured = Arc::new(Mutex::new(Vec::new()));
    // How long one sweep of the lanes takes (ms): the writer's pace. On
    // the model a sweep takes a millisecond, in the VM a hundred or more;
    // at a fixed pace the intruder would destroy far more of each slot's
    // life on the slower array, and a backup that cannot move fails with
    // its reason (which the checks accept) before it has shown recovery.
    let sweep_ms = Arc::new(AtomicU64::new(0));
    let mut out = Vec::new();
    // Sweep every lane with READ.
    {
        let (rig, markers, seen, stop, captured, sweep_ms) = (
            rig.clone(),
            markers.clone(),
            seen.clone(),
            stop.clone(),
            captured.clone(),
            sweep_ms.clone(),
        );
        let slot_lbas = slot_lbas.clone();
        out.push(thread::spawn(move || {
            let mut t = rig.plain(INTRUDER).unwrap();
            let mut rng = StdRng::seed_from_u64(rand::random());
            let mut swept = 0;
            // One more sweep after the stop: what the lanes keep.
            while !stop.load(Relaxed) || swept == 0 {
                let t0 = Instant::now();
                let mut lba = 0;
                while lba < lanes_end {
                    let n = (lanes_end - lba).min(256);
                    let cdb = Cdb::Read16 {
                        lba,
                        blocks: n as u32,
                        flags: RwFlags::default(),
                    };
                    let d = raw(&mut *t, Command::data_in(cdb.emit(), n as usize * 512))
                        .unwrap_or_else(|e| panic!("the intruder's READ: {e}"));
                    seen.search(&markers, usize::MAX, &d, &format!("a READ of LBA {lba}"));
                    // Keep a slot now and then for a later replay.
                    if rng.gen_ratio(1, 4) {
                        if let Some(&s) = slot_lbas
                            .iter()
                            .find(|&&s| s >= lba && s + slot_blocks <= lba + n)
                        {
                            let off = ((s - lba) * 512) as usize;
                            let img = d[off..off + slot_blocks as usize * 512].to_vec();
                            let mut c = captured.lock().unwrap();
                            if c.len() < 64 {
                                c.push((s, img));
                            }
                        }
                    }
                    lba += n;
                }
                sweep_ms.store(t0.elapsed().as_millis() as u64, Relaxed);
                if stop.load(Relaxed) {
                    swept += 1;
                }
                thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    // Garbage over index blocks and slots, and old slots written back.
    {
        let (rig, seen, stop, captured, sweep_ms) = (
            rig.clone(),
            seen.clone(),
            stop.clone(),
            captured.clone(),
            sweep_ms.clone(),
        );
        out.push(thread::spawn(move || {
            let mut t = rig.plain(INTRUDER).unwrap();
            let mut rng = StdRng::seed_from_u64(rand::random());
            let write = |t: &mut dyn Transport, lba: u64, data: &[u8]| {
                let cdb = Cdb::Write16 {
                    lba,
                    blocks: (data.len() / 512) as u32,
                    flags: RwFlags::default(),
                };
                raw(t, Command::data_out(cdb.emit(), IoBuf::from_slice(data)))
                    .unwrap_or_else(|e| panic!("the intruder's WRITE: {e}"));
            };
            while !stop.load(Relaxed) {
                let pace = rng.gen_range(10..40) + 2 * sweep_ms.load(Relaxed);
                thread::sleep(Duration::from_millis(pace));
                match rng.gen_range(0..3) {
                    0 => {
                        let mut g = vec![0u8; 512];
                        rng.fill_bytes(&mut g);
                        write(&mut *t, index_lbas[rng.gen_range(0..index_lbas.len())], &g);
                        seen.scribbles.fetch_add(1, Relaxed);
                    }
                    1 => {
                        let mut g = vec![0u8; slot_blocks as usize * 512];
                        rng.fill_bytes(&mut g);
                        write(&mut *t, slot_lbas[rng.gen_range(0..slot_lbas.len())], &g);
                        seen.scribbles.fetch_add(1, Relaxed);
                    }
                    _ => {
                        let old = {
                            let c = captured.lock().unwrap();
                            (!c.is_empty()).then(|| c[rng.gen_range(0..c.len())].clone())
                        };
                        if let Some((lba, img)) = old {
                            write(&mut *t, lba, &img);
                            seen.slot_replays.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
        }));
    }
    out
}

/// What must hold: the backup is exact or failed with a reason; with
/// encryption no marker was found, and the control canary was (vendor
/// mode); without encryption (the control) the markers were found where
/// the intruder can read the data path (block mode); no guessed handle was
/// accepted; the flood was refused at the array's per-initiator limit,
/// and a legitimate BIND meanwhile still bound.
pub fn check(rig: &Arc<dyn Rig>, mode: MailboxMode, protection: Protection, f: &Findings) {
    let s = &f.seen;
    let found = s.found.lock().unwrap().clone();
    eprintln!(
        "{} ({mode} mode, {}): backup {:?}; the intruder read {} times, {} bytes; \
         markers found {found:?}; canary {}; guesses {} (accepted {}); replays {} and forged {} \
         (the array accepted {}); frames caught {}; scribbles {}, slot replays {}; flood {:?}; \
         dropped: server [{}], agent [{}]",
        rig.describe(),
        protection.name(),
        f.backup,
        s.reads.load(Relaxed),
        s.bytes_read.load(Relaxed),
        s.canary.load(Relaxed),
        s.guesses.load(Relaxed),
        s.guesses_accepted.load(Relaxed),
        s.replayed.load(Relaxed),
        s.forged.load(Relaxed),
        s.replays_accepted.load(Relaxed),
        s.frames_caught.load(Relaxed),
        s.scribbles.load(Relaxed),
        s.slot_replays.load(Relaxed),
        f.flood,
        f.dropped.0.summary(),
        f.dropped.1.summary(),
    );
    if let Err(why) = &f.backup {
        assert!(!why.trim().is_empty(), "a backup failed without a reason");
    }
    assert!(s.reads.load(Relaxed) > 0, "the intruder read nothing");
    assert_eq!(
        s.guesses_accepted.load(Relaxed),
        0,
        "the array accepted a guessed binding handle"
    );
    match protection {
        Protection::Encrypt => {
            assert!(
                found.is_empty(),
                "{}: PLAINTEXT of the backed-up files seen by a third initiator: {found:?}",
                rig.describe()
            );
        }
        Protection::Authenticate => {
            if mode == MailboxMode::Block {
                assert!(
                    !found.is_empty(),
                    "{}: the control (payload in the clear) found no marker: the search is blind",
                    rig.describe()
                );
            }
        }
    }
    if mode == MailboxMode::Vendor {
        assert!(
            s.canary.load(Relaxed),
            "{}: the control frame in the clear was not found: the search is blind",
            rig.describe()
        );
        assert!(s.guesses.load(Relaxed) > 0 && s.replayed.load(Relaxed) > 0);
        let fl = f.flood.as_ref().expect("the flood ran");
        assert!(
            fl.at_limit,
            "the flood ended with {:?}, not at the port space's limit",
            fl.refusal
        );
        assert!(
            fl.bound <= sim_target::mailbox::PORTS_PER_INITIATOR,
            "{}: one initiator bound {} ports",
            rig.describe(),
            fl.bound
        );
        assert_eq!(
            fl.legit_bind,
            "bound",
            "{}: a legitimate host could not BIND while the intruder held its limit",
            rig.describe()
        );
    } else {
        assert!(s.scribbles.load(Relaxed) > 0);
    }
}
