//! The io_uring engines against real LIO — bsg passthrough
//! (`scsi::bsg::UringBsg`, Linux 7.1+) and sg v3 (`scsi::uring::UringSg`) —
//! each test body run once per engine the kernel has: the shared
//! conformance bodies, sense and residual decoded alike on every engine,
//! engine selection and its fallback (an old kernel is detected and the
//! reason reported), one engine shared by many threads
//! (`scsi::EnginePool`), deep queues, 1 MiB transfers (direct I/O on sg,
//! registered pool buffers on bsg), cancellation, and a rough comparison
//! with fio's sg engine on the same LUN (printed, never asserted).
//!
//! Ignored in a plain `cargo test`: run in the VM after `stg-up`, e.g.
//! `cargo test -p stp-tests --test lio_engine -- --ignored --nocapture
//! --test-threads 1`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use scsi::bsg::{bsg_node_for, UringBsg};
use scsi::cdb::{Cdb, RwFlags};
use scsi::uring::{open_best, Engine, UringSg};
use scsi::{Command, Completion, EngineChoice, IoBuf, Transport};
use stp_core::retry::{RetryPolicy, Retrying};
use stp_tests::rig::LioRig;
use stp_tests::*;

/// Deeper than one sg fd takes (16): the sg engine opens two.
const DEPTH: usize = 32;

fn ok(c: Check) {
    if let Err(e) = c {
        panic!("{e}");
    }
}

/// True when the running kernel is 7.1 or later: bsg io_uring passthrough
/// must then work, and the default engine is bsg.
fn kernel_has_bsg_uring() -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut it = rel
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (7, 1)
}

/// The io_uring engines to run each body on: bsg (7.1+) and sg v3.
fn engines() -> Vec<Engine> {
    let mut v = Vec::new();
    if kernel_has_bsg_uring() {
        v.push(Engine::UringBsg);
    } else {
        eprintln!(
            "kernel {}: no bsg io_uring passthrough; the sg v3 engine only",
            scsi::bsg::kernel_release()
        );
    }
    v.push(Engine::UringSg);
    v
}

fn uring(path: &Path, depth: usize) -> UringSg {
    let t = UringSg::open(path, depth).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("opened {}", t.describe());
    t
}

fn bsg(path: &Path, depth: usize) -> UringBsg {
    let node = bsg_node_for(path).unwrap_or_else(|e| panic!("{e}"));
    let t = UringBsg::open(&node, depth).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("opened {}", t.describe());
    t
}

/// `path` on `engine`, boxed.
fn open(engine: Engine, path: &Path, depth: usize) -> Box<dyn Transport> {
    match engine {
        Engine::UringBsg => Box::new(bsg(path, depth)),
        _ => Box::new(uring(path, depth)),
    }
}

fn paths() -> (LioRig, PathBuf, PathBuf, PathBuf, PathBuf) {
    let lio = LioRig::load_env();
    let r0 = lio.plain_path(0).unwrap();
    let r1 = lio.plain_path(1).unwrap();
    let s0 = lio.member_path(0, 0).unwrap();
    let s1 = lio.member_path(1, 0).unwrap();
    (lio, r0, r1, s0, s1)
}

#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn engine_conformance_on_ramdisk_and_stg_member() {
    let (_lio, r0, r1, s0, s1) = paths();
    for engine in engines() {
        for (a, b) in [(&r0, &r1), (&s0, &s1)] {
            eprintln!(
                "{engine} engine conformance on {} / {}",
                a.display(),
                b.display()
            );
            // A fresh path starts with a UNIT ATTENTION (REPORTED LUNS DATA
            // HAS CHANGED); the retry policy takes it.
            let ua = RetryPolicy::default();
            let mut ta = Retrying::new(open(engine, a, DEPTH), ua);
            let mut tb = Retrying::new(open(engine, b, DEPTH), ua);
            if engine == Engine::UringSg {
                assert!(ta.inner().describe().contains("2 fd(s)"));
            }
            assert_eq!(ta.queue_depth(), DEPTH);
            ok(write_here_read_there(&mut ta, &mut tb, 2000, 256, DEPTH));
            ok(multi_block_and_residual(&mut ta, 8192));
            ok(standard_errors(&mut ta));
            if a == &r0 {
                // The ramdisk implements no vendor opcode (the STG does).
                ok(unknown_vendor_opcode(&mut ta, 0xC0));
            }
            assert_eq!(ta.in_flight(), 0);
            assert_eq!(tb.in_flight(), 0);
            eprintln!("  retries {} / {}", ta.retries(), tb.retries());
        }
    }
}

/// One body, every engine: status, sense and residual come out the same
/// whether the command went as a bsg `URING_CMD`, an sg v3 header through
/// io_uring, or synchronous `SG_IO`.
#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn sense_and_residual_decode_the_same_on_every_engine() {
    let (_lio, r0, _, s0, _) = paths();
    for path in [&r0, &s0] {
        let ua = RetryPolicy::default();
        let mut runs = Vec::new();
        for engine in engines() {
            let mut t = Retrying::new(open(engine, path, 4), ua);
            let d = sense_and_residual(&mut t).unwrap_or_else(|e| panic!("{engine}: {e}"));
            runs.push((engine.name(), d));
        }
        let mut sync = Retrying::new(
            scsi::sg::SgDevice::open(path).unwrap_or_else(|e| panic!("{e}")),
            ua,
        );
        let d = sense_and_residual(&mut sync).unwrap_or_else(|e| panic!("sync: {e}"));
        runs.push(("sync", d));
        for (name, d) in &runs {
            eprintln!("{} {name}: {d:?}", path.display());
            assert_eq!(
                d, &runs[0].1,
                "{name} decodes differently from {}",
                runs[0].0
            );
        }
    }
}

#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn open_best_picks_the_engine_for_sg_nodes() {
    let (lio, r0, ..) = paths();
    let best = open_best(&r0, 64).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("open_best({}): {}", r0.display(), best.reason);
    assert_eq!(best.transport.queue_depth(), 64);
    if kernel_has_bsg_uring() {
        assert_eq!(best.engine, Engine::UringBsg, "{}", best.reason);
        assert!(best.reason.contains("/dev/bsg/"), "{}", best.reason);
    } else {
        // An old kernel: detected, and the fallback says why.
        assert_eq!(best.engine, Engine::UringSg, "{}", best.reason);
        assert!(best.transport.describe().contains("4 fd(s)"));
        assert!(
            best.reason.contains("bsg passthrough not used") && best.reason.contains("7.1"),
            "{}",
            best.reason
        );
    }
    // A block node speaks SG_IO and has a bsg node, but not the sg
    // write/read interface.
    let block = lio
        .map()
        .hosts
        .iter()
        .flat_map(|h| &h.luns)
        .find_map(|l| l.block.clone());
    if let Some(block) = block {
        let best = open_best(&block, 64).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("open_best({}): {}", block.display(), best.reason);
        if kernel_has_bsg_uring() {
            assert_eq!(best.engine, Engine::UringBsg, "{}", best.reason);
        } else {
            assert_eq!(best.engine, Engine::SyncSgIo);
            assert!(
                best.reason.contains("not a SCSI generic"),
                "{}",
                best.reason
            );
        }
    }
    // Forcing an engine (what STP_ENGINE and `stp --engine` do).
    for (choice, want) in [
        (EngineChoice::Sg, Some(Engine::UringSg)),
        (EngineChoice::Sync, Some(Engine::SyncSgIo)),
        (
            EngineChoice::Bsg,
            kernel_has_bsg_uring().then_some(Engine::UringBsg),
        ),
    ] {
        scsi::set_engine_override(Some(choice));
        let got = open_best(&r0, 8);
        scsi::set_engine_override(None);
        match (got, want) {
            (Ok(b), Some(w)) => {
                eprintln!("forced {choice}: {}", b.reason);
                assert_eq!(b.engine, w, "{}", b.reason);
            }
            (Err(e), None) => {
                eprintln!("forced {choice} refused: {e}");
                assert!(e.to_string().contains("7.1"), "{e}");
            }
            (Ok(b), None) => panic!("forced {choice} opened {:?}: {}", b.engine, b.reason),
            (Err(e), Some(_)) => panic!("forced {choice}: {e}"),
        }
    }
}

fn write16(lba: u64, blocks: u32, data: IoBuf, tag: u64) -> Command {
    let cdb = Cdb::Write16 {
        lba,
        blocks,
        flags: RwFlags::default(),
    };
    Command::data_out(cdb.emit(), data).with_tag(tag)
}

fn read16(lba: u64, blocks: u32, len: usize, tag: u64) -> Command {
    let cdb = Cdb::Read16 {
        lba,
        blocks,
        flags: RwFlags::default(),
    };
    Command::data_in(cdb.emit(), len).with_tag(tag)
}

fn fill(tag: u64, len: usize) -> IoBuf {
    let mut b = IoBuf::new(len);
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    b
}

#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn shared_engine_serves_many_threads() {
    let (_lio, r0, r1, _, _) = paths();
    let pool = scsi::EnginePool::new(DEPTH);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            // Every thread writes through host 0's engine and reads back
            // through host 1's; each has handles of its own.
            let w = pool.open(&r0).unwrap_or_else(|e| panic!("{e}"));
            let r = pool.open(&r1).unwrap_or_else(|e| panic!("{e}"));
            let default = if kernel_has_bsg_uring() {
                Engine::UringBsg
            } else {
                Engine::UringSg
            };
            assert_eq!(w.engine, default, "{}", w.reason);
            let ua = RetryPolicy::default();
            let (mut w, mut r) = (
                Retrying::new(w.transport, ua),
                Retrying::new(r.transport, ua),
            );
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    let lba = 40_000 + t * 1000 + i * 8;
                    let tag = t << 32 | i;
                    w.execute(write16(lba, 8, fill(tag, 4096), tag))
                        .into_result()
                        .unwrap_or_else(|e| panic!("WRITE {lba}: {e}"));
                    let (data, _) = r
                        .execute(read16(lba, 8, 4096, tag))
                        .into_result()
                        .unwrap_or_else(|e| panic!("READ {lba}: {e}"));
                    assert!(
                        data == fill(tag, 4096),
                        "thread {t}: LBA {lba} read back wrong"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Runs `cmds` through `t` with up to `depth` in flight; returns every
/// completion (checked to be GOOD), and how many arrived out of order.
fn pipeline(t: &mut dyn Transport, cmds: Vec<Command>, depth: usize) -> (Vec<(u64, IoBuf)>, usize) {
    let total = cmds.len();
    let mut cmds = cmds.into_iter();
    let mut sent = Vec::new();
    let mut done = Vec::with_capacity(total);
    let mut out = Vec::new();
    let mut reordered = 0;
    while done.len() < total {
        while t.in_flight() < depth {
            let Some(c) = cmds.next() else { break };
            sent.push(c.tag);
            t.submit(c).unwrap_or_else(|e| panic!("{e}"));
        }
        out.clear();
        t.reap(&mut out, Some(Duration::from_secs(60)))
            .unwrap_or_else(|e| panic!("reap: {e}"));
        assert!(!out.is_empty(), "no completion within 60 s");
        for c in out.drain(..) {
            let Completion { tag, .. } = c;
            if sent.get(done.len()) != Some(&tag) {
                reordered += 1;
            }
            let (data, _) = c
                .into_result()
                .unwrap_or_else(|e| panic!("command {tag}: {e}"));
            done.push((tag, data));
        }
    }
    (done, reordered)
}

/// `cmd` with its buffer moved into one from the DMA pool (which the bsg
/// engine registers with its ring).
fn pooled(mut cmd: Command) -> Command {
    let mut b = scsi::pool::BufPool::global().get(cmd.data.len());
    b.copy_from_slice(&cmd.data);
    cmd.data = b;
    cmd
}

#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn one_mib_transfers_at_depth_8_with_direct_io() {
    let (_lio, r0, r1, ..) = paths();
    let len = 1 << 20;
    let n = 64u64;
    let base = 100_000u64;
    // sg v3: direct I/O into the commands' own pages.
    {
        let mut a = uring(&r0, 8);
        let mut b = uring(&r1, 8);
        let (done, reordered) = one_mib_round_trip(&mut a, &mut b, base, n, len, |c| c);
        eprintln!(
            "sg 1 MiB x {n}: writer DIO {:?} ({}), reader DIO {:?}, {reordered} reads out of order",
            a.direct_io_stats(),
            a.direct_io(),
            b.direct_io_stats()
        );
        assert_eq!(done, n as usize);
        if a.direct_io().is_enabled() {
            let (direct, copied) = a.direct_io_stats();
            assert!(
                direct >= n,
                "direct I/O requested but not used: {direct} direct, {copied} copied"
            );
            assert!(b.direct_io_stats().0 >= n);
        } else {
            panic!("direct I/O is off in the VM (root): {}", a.direct_io());
        }
    }
    // bsg: pool buffers, registered with the ring as fixed buffers.
    if kernel_has_bsg_uring() {
        let mut a = bsg(&r0, 8);
        let mut b = bsg(&r1, 8);
        let (done, reordered) = one_mib_round_trip(&mut a, &mut b, base + 200_000, n, len, pooled);
        let (sa, sb) = (a.stats(), b.stats());
        eprintln!("bsg 1 MiB x {n}: writer {sa:?}, reader {sb:?}, {reordered} reads out of order");
        assert_eq!(done, n as usize);
        assert_eq!(sa.fixed_note, None, "registration failed as root");
        assert!(sa.fixed >= n && sb.fixed >= n, "{sa:?} {sb:?}");
    }
}

/// Writes `n` blocks of `len` through `a` at depth 8 and reads them back
/// through `b`, checking every byte; (completions, reads out of order).
fn one_mib_round_trip(
    a: &mut dyn Transport,
    b: &mut dyn Transport,
    base: u64,
    n: u64,
    len: usize,
    wrap: fn(Command) -> Command,
) -> (usize, usize) {
    let (_, bs) = capacity(a).unwrap();
    let blocks = (len / bs as usize) as u32;
    let writes = (0..n)
        .map(|i| {
            wrap(write16(
                base + i * u64::from(blocks),
                blocks,
                fill(i, len),
                i,
            ))
        })
        .collect();
    let (done, _) = pipeline(a, writes, 8);
    assert_eq!(done.len(), n as usize);
    let reads = (0..n)
        .map(|i| wrap(read16(base + i * u64::from(blocks), blocks, len, i)))
        .collect();
    let (done, reordered) = pipeline(b, reads, 8);
    for (tag, data) in &done {
        assert!(data[..] == fill(*tag, len)[..], "1 MiB block {tag} differs");
    }
    let seen: HashSet<u64> = done.iter().map(|(t, _)| *t).collect();
    assert_eq!(seen.len(), n as usize);
    (done.len(), reordered)
}

#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn mixed_sizes_complete_out_of_order_across_fds() {
    let (_lio, r0, ..) = paths();
    for engine in engines() {
        let mut t = open(engine, &r0, 48);
        if engine == Engine::UringSg {
            assert!(t.describe().contains("3 fd(s)"), "{}", t.describe());
        }
        let (_, bs) = capacity(&mut *t).unwrap();
        let big = 1 << 20;
        // Large writes interleaved with small reads: small ones overtake.
        let mut cmds = Vec::new();
        for i in 0..96u64 {
            if i % 3 == 0 {
                cmds.push(write16(
                    200_000 + (i / 3) * 2048,
                    (big / bs as usize) as u32,
                    fill(i, big),
                    i,
                ));
            } else {
                cmds.push(read16(i, 1, bs as usize, i));
            }
        }
        let (done, reordered) = pipeline(&mut *t, cmds, 48);
        let seen: HashSet<u64> = done.iter().map(|(tag, _)| *tag).collect();
        assert_eq!(seen.len(), 96, "each tag exactly once");
        eprintln!("{engine} mixed: {reordered} of 96 completions out of submission order");
        assert_eq!(t.in_flight(), 0);
        drop(t);

        // Cancel with 1 MiB writes in flight: with a grace period every one
        // completes normally; without, each comes back once, completed or
        // abandoned (buffer leaked, outcome unknown), and nothing crashes.
        for grace in [Duration::from_secs(30), Duration::ZERO] {
            let submit = |t: &mut dyn Transport| {
                for i in 0..32u64 {
                    t.submit(write16(
                        300_000 + i * 2048,
                        (big / bs as usize) as u32,
                        fill(i, big),
                        i,
                    ))
                    .unwrap_or_else(|e| panic!("{e}"));
                }
                let mut out = Vec::new();
                t.reap(&mut out, Some(Duration::ZERO)).unwrap();
                out.len()
            };
            let (early, rest) = if engine == Engine::UringBsg {
                let mut t = bsg(&r0, 32);
                let early = submit(&mut t);
                (early, t.cancel(grace))
            } else {
                let mut t = uring(&r0, 32);
                let early = submit(&mut t);
                (early, t.cancel(grace))
            };
            let abandoned = rest.iter().filter(|c| c.result.is_err()).count();
            eprintln!(
                "{engine} cancel(grace {grace:?}): {early} reaped before, {} at cancel, {abandoned} abandoned",
                rest.len()
            );
            assert_eq!(early + rest.len(), 32);
            if !grace.is_zero() {
                assert_eq!(abandoned, 0);
            }
        }
    }
}

/// A rough throughput run: `secs` seconds of writes of `len` bytes at
/// `depth`, random 4 KiB-aligned LBAs within the first `span` bytes when
/// `random`. Returns (IOPS, MB/s).
fn run_writes(
    t: &mut dyn Transport,
    bs: u32,
    len: usize,
    depth: usize,
    random: bool,
    span: u64,
    secs: f64,
) -> (f64, f64) {
    let blocks = (len / bs as usize) as u32;
    let slots = span / len as u64;
    let mut x = 0x1234_5678_9ABC_DEF1u64;
    let mut seq = 0u64;
    let mut pool: Vec<IoBuf> = (0..depth)
        .map(|i| {
            let mut b = scsi::pool::BufPool::global().get(len);
            b.copy_from_slice(&fill(i as u64, len));
            b
        })
        .collect();
    let mut out = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let elapsed = start.elapsed().as_secs_f64();
        let stop = elapsed >= secs;
        while !stop && t.in_flight() < depth {
            let slot = if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x % slots
            } else {
                seq = (seq + 1) % slots;
                seq
            };
            let lba = slot * u64::from(blocks);
            let buf = pool.pop().unwrap_or_else(|| IoBuf::new(len));
            t.submit(write16(lba, blocks, buf, lba))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if stop && t.in_flight() == 0 {
            break;
        }
        out.clear();
        t.reap(&mut out, Some(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{e}"));
        for c in out.drain(..) {
            let (mut data, _) = c.into_result().unwrap_or_else(|e| panic!("{e}"));
            data.resize(len);
            pool.push(data);
            n += 1;
        }
    }
    let s = start.elapsed().as_secs_f64();
    (n as f64 / s, n as f64 * len as f64 / s / 1e6)
}

/// fio's sg engine on the same LUN: (IOPS, MB/s).
fn fio(sg: &Path, rw: &str, bs: &str, depth: usize, span: u64, secs: u32) -> Option<(f64, f64)> {
    let out = std::process::Command::new("fio")
        .args([
            "--name=cmp",
            &format!("--filename={}", sg.display()),
            "--ioengine=sg",
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            &format!("--size={span}"),
            &format!("--runtime={secs}"),
            "--time_based",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{')?..];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let w = &v["jobs"][0]["write"];
    Some((w["iops"].as_f64()?, w["bw_bytes"].as_f64()? / 1e6))
}

#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn rough_comparison_with_fio_sg() {
    let (_lio, r0, ..) = paths();
    let span = 64u64 << 20;
    let secs = 4;
    let mut rows = Vec::new();
    for (what, len, depth, random, rw, bsname) in [
        (
            "4 KiB random writes QD16",
            4096usize,
            16usize,
            true,
            "randwrite",
            "4k",
        ),
        ("1 MiB writes QD8", 1 << 20, 8, false, "write", "1m"),
    ] {
        let mut t = uring(&r0, depth);
        let (_, bs) = capacity(&mut t).unwrap();
        let (iops, mbs) = run_writes(&mut t, bs, len, depth, random, span, f64::from(secs));
        let dio = t.direct_io_stats();
        drop(t);
        if kernel_has_bsg_uring() {
            let mut t = bsg(&r0, depth);
            let (biops, bmbs) = run_writes(&mut t, bs, len, depth, random, span, f64::from(secs));
            rows.push(format!(
                "{what}: bsg engine {biops:.0} IOPS {bmbs:.1} MB/s ({:?}); sg engine {iops:.0} IOPS; bsg/sg {:.2}x",
                t.stats(),
                biops / iops.max(1e-9)
            ));
        }
        let f = fio(&r0, rw, bsname, depth, span, secs);
        match f {
            Some((fiops, fmbs)) => rows.push(format!(
                "{what}: engine {iops:.0} IOPS {mbs:.1} MB/s (DIO {dio:?}); fio sg {fiops:.0} IOPS {fmbs:.1} MB/s; ratio {:.2}x",
                iops / fiops.max(1e-9)
            )),
            None => rows.push(format!(
                "{what}: engine {iops:.0} IOPS {mbs:.1} MB/s (DIO {dio:?}); fio sg unavailable"
            )),
        }
    }
    for r in rows {
        eprintln!("BENCH {r}");
    }
}

/// A unit attention made on purpose (a persistent-reservation preemption)
/// comes back through each engine as CHECK CONDITION / UNIT ATTENTION with
/// its sense, and the next command succeeds.
#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn unit_attention_on_every_engine() {
    let (_lio, r0, r1, ..) = paths();
    for engine in engines() {
        let mut a = open(engine, &r0, 4);
        let mut b = open(engine, &r1, 4);
        ok(preempted_unit_attention(&mut *a, &mut *b));
        eprintln!("{engine}: REGISTRATIONS PREEMPTED seen through the engine, then GOOD");
    }
}

/// The stp-target daemon's pid (the STG LUNs' TCMU backstore).
fn daemon_pid() -> String {
    let state = std::env::var_os("STP_TARGET_STATE")
        .map_or_else(|| "/run/stp-target".into(), PathBuf::from);
    std::fs::read_to_string(state.join("pid"))
        .unwrap_or_else(|e| panic!("{}/pid: {e}", state.display()))
        .trim()
        .to_owned()
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, pid])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// A command that overruns its timeout: the daemon behind the STG member
/// is stopped, a READ with a 1 s timeout goes out, and the daemon resumes
/// 3 s later. The kernel's error handler aborts the command; its
/// completion must come back, classified as a timeout, on each engine.
#[test]
#[ignore = "needs real LIO (just vm-test)"]
fn timeout_on_every_engine() {
    let (_lio, _, _, s0, _) = paths();
    let pid = daemon_pid();
    for engine in engines() {
        let mut t = open(engine, &s0, 4);
        drain_unit_attentions(&mut *t).unwrap_or_else(|e| panic!("{e}"));
        signal(&pid, "-STOP");
        let t0 = Instant::now();
        let cmd = read16(64, 8, 4096, 7).with_timeout(Duration::from_secs(1));
        if let Err(e) = t.submit(cmd) {
            signal(&pid, "-CONT");
            panic!("{engine}: {e}");
        }
        let mut out = Vec::new();
        let _ = t.reap(&mut out, Some(Duration::from_secs(3)));
        signal(&pid, "-CONT");
        while out.is_empty() && t0.elapsed() < Duration::from_secs(90) {
            t.reap(&mut out, Some(Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("{engine}: reap: {e}"));
        }
        let c = out
            .pop()
            .unwrap_or_else(|| panic!("{engine}: no completion in 90 s"));
        let r = c.result.as_ref().map(|o| o.check());
        eprintln!(
            "{engine}: READ with a 1 s timeout, daemon stopped 3 s: {r:?} after {:?}",
            t0.elapsed()
        );
        assert_eq!(c.tag, 7);
        assert!(
            matches!(r, Ok(Err(scsi::CommandError::Timeout(_)))),
            "{engine}: want a timeout, got {r:?}"
        );
        // The path works again.
        let mut ua = Retrying::new(t, RetryPolicy::default());
        capacity(&mut ua).unwrap_or_else(|e| panic!("{engine} after the timeout: {e}"));
    }
}
