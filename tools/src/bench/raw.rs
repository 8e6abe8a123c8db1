//! `stp bench raw`: READ(16)/WRITE(16) straight at logical units, pipelined
//! on a `scsi::Transport` (submit up to `--depth`, reap in any order).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use scsi::cdb::{Cdb, RwFlags};
use scsi::{Command, IoBuf, Transport};
use sim_target::{Array, Host, InProcOptions, LunConfig};

use super::hist::{new_histogram, record, Counters, CpuTime, Progress};
use super::units::{parse_duration, parse_nonzero_size};
use super::{open_engine, OutArgs, Report, Verified};

/// The access pattern.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random aligned offsets.
    Randread,
    /// Writes at random aligned offsets.
    Randwrite,
}

impl Rw {
    fn is_write(self) -> bool {
        matches!(self, Rw::Write | Rw::Randwrite)
    }
    fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite)
    }
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
        }
    }
}

/// Options of `stp bench raw`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  stp bench raw --sim --rw randread --bs 4k --depth 16 --time 10s\n  \
stp bench raw /dev/sg3 /dev/sg4 --rw write --bs 1m --size 4g --verify\n\n\
WRITES DESTROY DATA on the devices named. Latency is per command, from submit to reap."
)]
pub struct RawArgs {
    /// Use the embedded in-process simulated array instead of devices.
    #[arg(long)]
    pub sim: bool,
    /// LUNs in the simulated array (with --sim); one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub sim_luns: u64,
    /// Capacity of each simulated LUN (sparse; writes allocate memory).
    #[arg(long, default_value = "256m", value_parser = parse_nonzero_size)]
    pub sim_lun_size: u64,
    /// Bytes per command (a multiple of the LUN's block size), e.g. 4k, 1m.
    #[arg(long, default_value = "4k", value_parser = parse_nonzero_size)]
    pub bs: u64,
    /// Commands kept in flight per LUN (capped at the transport's queue depth).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub depth: u64,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Run for this long (e.g. 10s, 500ms); the default when --size is absent: 10s.
    #[arg(long, value_parser = parse_duration, conflicts_with = "size")]
    pub time: Option<Duration>,
    /// Move this many bytes in all (split evenly over the LUNs) instead of --time.
    #[arg(long, value_parser = parse_nonzero_size)]
    pub size: Option<u64>,
    /// Bytes of each LUN the run touches, from LBA 0 (capped at its capacity).
    #[arg(long, default_value = "1g", value_parser = parse_nonzero_size)]
    pub span: u64,
    /// Write an address-stamped pattern and check it: reads check a pattern
    /// written beforehand over the span; writes are read back afterwards.
    #[arg(long)]
    pub verify: bool,
    /// Output options.
    #[command(flatten)]
    pub out: OutArgs,
    /// Devices (/dev/sgN), one thread each; or --sim.
    pub devices: Vec<PathBuf>,
}

/// How one LUN is driven.
struct Plan {
    rw: Rw,
    bs: u64,
    block_size: u32,
    depth: usize,
    slots: u64,
    deadline: Option<Instant>,
    bytes: Option<u64>,
    verify: bool,
    seed: u64,
}

/// What one LUN did.
struct LunResult {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
    written: Vec<bool>,
}

/// Fills `buf` with the pattern for byte address `addr` of the run `seed`:
/// every 8-byte word carries (a hash of) its own address.
pub fn fill_pattern(buf: &mut [u8], seed: u64, addr: u64) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = pattern_word(seed, addr + 8 * i as u64).to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

fn pattern_word(seed: u64, addr: u64) -> u64 {
    (seed ^ addr).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ addr
}

/// The offset of the first byte of `buf` that differs from the pattern.
pub fn check_pattern(buf: &[u8], seed: u64, addr: u64) -> Option<usize> {
    for (i, w) in buf.chunks(8).enumerate() {
        let v = pattern_word(seed, addr + 8 * i as u64).to_le_bytes();
        if w != &v[..w.len()] {
            let j = w
                .iter()
                .zip(v.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(8 * i + j);
        }
    }
    None
}

/// (blocks, block size) from READ CAPACITY(16). Retries what a retry may
/// clear, such as the UNIT ATTENTION a freshly mapped LUN reports first.
fn capacity(t: &mut dyn Transport) -> Result<(u64, u32)> {
    let mut tries = 0;
    let (d, _) = loop {
        match t
            .execute(Command::data_in(
                Cdb::ReadCapacity16 { alloc_len: 32 }.emit(),
                32,
            ))
            .into_result()
        {
            Err(e) if e.is_retryable() && tries < 5 => tries += 1,
            r => break r,
        }
    }
    .with_context(|| format!("{}: READ CAPACITY(16) failed", t.describe()))?;
    if d.len() < 12 {
        bail!(
            "{}: READ CAPACITY(16) returned {} bytes",
            t.describe(),
            d.len()
        );
    }
    let last = u64::from_be_bytes(d[..8].try_into()?);
    let bs = u32::from_be_bytes(d[8..12].try_into()?);
    if bs == 0 {
        bail!("{}: the device reports a block size of 0", t.describe());
    }
    Ok((last.saturating_add(1), bs))
}

fn rw_cdb(write: bool, lba: u64, blocks: u32) -> scsi::CdbBuf {
    let flags = RwFlags::default();
    if write {
        Cdb::Write16 { lba, blocks, flags }.emit()
    } else {
        Cdb::Read16 { lba, blocks, flags }.emit()
    }
}

/// Writes the pattern over the first `span` bytes, 1 MiB at a time.
fn prefill(t: &mut dyn Transport, span: u64, block_size: u32, seed: u64) -> Result<()> {
    let chunk = ((1u64 << 20) / u64::from(block_size)).max(1) * u64::from(block_size);
    let mut addr = 0;
    while addr < span {
        let n = chunk.min(span - addr);
        let mut buf = IoBuf::new(n as usize);
        fill_pattern(buf.as_mut_slice(), seed, addr);
        let lba = addr / u64::from(block_size);
        let blocks = (n / u64::from(block_size)) as u32;
        t.execute(Command::data_out(rw_cdb(true, lba, blocks), buf))
            .into_result()
            .with_context(|| {
                format!("{}: writing the verify pattern at LBA {lba}", t.describe())
            })?;
        addr += n;
    }
    Ok(())
}

/// Reads back every slot in `written` and checks the pattern; returns the
/// bytes checked.
fn read_back(t: &mut dyn Transport, plan: &Plan, written: &[bool]) -> Result<u64> {
    let mut checked = 0;
    let blocks = (plan.bs / u64::from(plan.block_size)) as u32;
    for (slot, _) in written.iter().enumerate().filter(|(_, w)| **w) {
        let addr = slot as u64 * plan.bs;
        let lba = addr / u64::from(plan.block_size);
        let (d, _) = t
            .execute(Command::data_in(
                rw_cdb(false, lba, blocks),
                plan.bs as usize,
            ))
            .into_result()
            .with_context(|| format!("{}: verify read at LBA {lba}", t.describe()))?;
        if let Some(off) = check_pattern(&d, plan.seed, addr) {
            bail!(
                "{}: VERIFY FAILED: data read back at LBA {lba} differs from what was written at byte {off} of the {}-byte block",
                t.describe(),
                plan.bs
            );
        }
        checked += plan.bs;
    }
    Ok(checked)
}

fn drive(
    t: &mut dyn Transport,
    plan: &Plan,
    counters: &Counters,
    stop: &AtomicBool,
) -> Result<LunResult> {
    let name = t.describe();
    let blocks = u32::try_from(plan.bs / u64::from(plan.block_size))
        .map_err(|_| anyhow!("--bs {} is too large for one command", plan.bs))?;
    let mut hist = new_histogram();
    let mut starts: Vec<Option<(Instant, u64)>> = vec![None; plan.depth];
    let mut free: Vec<usize> = (0..plan.depth).rev().collect();
    let mut pool: Vec<IoBuf> = Vec::new();
    let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0x5EED);
    let mut next_seq = 0u64;
    let (mut issued, mut ops, mut bytes) = (0u64, 0u64, 0u64);
    let mut written = if plan.verify && plan.rw.is_write() {
        vec![false; plan.slots as usize]
    } else {
        Vec::new()
    };
    let mut done = Vec::with_capacity(plan.depth);
    let write = plan.rw.is_write();
    loop {
        let issuing = !stop.load(Ordering::Relaxed)
            && plan.deadline.is_none_or(|d| Instant::now() < d)
            && plan.bytes.is_none_or(|b| issued < b);
        if issuing {
            while let Some(tag) = free.pop() {
                let slot = if plan.rw.is_random() {
                    rng.gen_range(0..plan.slots)
                } else {
                    let s = next_seq % plan.slots;
                    next_seq += 1;
                    s
                };
                let addr = slot * plan.bs;
                let lba = addr / u64::from(plan.block_size);
                let mut buf = pool.pop().unwrap_or_else(|| {
                    let mut b = IoBuf::new(plan.bs as usize);
                    if write && !plan.verify {
                        b.fill(0xA5);
                    }
                    b
                });
                buf.resize(plan.bs as usize);
                let cmd = if write {
                    if plan.verify {
                        fill_pattern(buf.as_mut_slice(), plan.seed, addr);
                    }
                    Command::data_out(rw_cdb(true, lba, blocks), buf)
                } else {
                    Command {
                        data: buf,
                        ..Command::data_in(rw_cdb(false, lba, blocks), 0)
                    }
                };
                starts[tag] = Some((Instant::now(), slot));
                t.submit(cmd.with_tag(tag as u64))
                    .map_err(|e| anyhow!("{name}: could not submit at LBA {lba}: {}", e.error))?;
                issued += plan.bs;
                if plan.bytes.is_some_and(|b| issued >= b) {
                    break;
                }
            }
        }
        if t.in_flight() == 0 {
            if issuing {
                continue;
            }
            break;
        }
        done.clear();
        t.reap(&mut done, Some(Duration::from_millis(100)))
            .with_context(|| format!("{name}: reaping completions"))?;
        for c in done.drain(..) {
            let tag = c.tag as usize;
            let (start, slot) = starts
                .get_mut(tag)
                .and_then(Option::take)
                .ok_or_else(|| anyhow!("{name}: a completion carries unknown tag {tag}"))?;
            record(&mut hist, start.elapsed());
            free.push(tag);
            let addr = slot * plan.bs;
            let (data, _) = c.into_result().with_context(|| {
                format!(
                    "{name}: {} at LBA {} failed",
                    if write { "WRITE(16)" } else { "READ(16)" },
                    addr / u64::from(plan.block_size)
                )
            })?;
            if data.len() as u64 != plan.bs {
                bail!(
                    "{name}: short transfer at LBA {}: {} of {} bytes",
                    addr / u64::from(plan.block_size),
                    data.len(),
                    plan.bs
                );
            }
            if plan.verify {
                if write {
                    written[slot as usize] = true;
                } else if let Some(off) = check_pattern(&data, plan.seed, addr) {
                    bail!(
                        "{name}: VERIFY FAILED: READ at LBA {} returned wrong data at byte {off}",
                        addr / u64::from(plan.block_size)
                    );
                }
            }
            pool.push(data);
            ops += 1;
            bytes += plan.bs;
            counters.add(plan.bs);
        }
    }
    Ok(LunResult {
        hist,
        ops,
        bytes,
        written,
    })
}

/// Runs `stp bench raw`.
pub fn run(args: &RawArgs) -> Result<Report> {
    if args.sim != args.devices.is_empty() {
        bail!("give devices (e.g. /dev/sg3) or --sim for the embedded simulated array, not both or neither");
    }
    if args.bs.saturating_mul(args.depth) > 4 << 30 {
        bail!(
            "--bs {} with --depth {} would pin {} of buffers per LUN; lower one of them",
            args.bs,
            args.depth,
            super::units::human_bytes(args.bs.saturating_mul(args.depth))
        );
    }
    if args.bs > u64::from(u32::MAX) {
        bail!("--bs {} is too large for one command", args.bs);
    }
    let out = &args.out;
    // Keep the array alive for the run.
    let mut _array = None;
    let mut paths: Vec<Box<dyn Transport>> = Vec::new();
    // The io_uring engine binds itself to the first thread that uses it (the
    // LUN's bench thread), so set-up and read-back go through a synchronous
    // SG_IO handle of their own.
    let mut side: Vec<Option<Box<dyn Transport>>> = Vec::new();
    if args.sim {
        let array = Array::new();
        let blocks = (args.sim_lun_size / 512).max(1);
        for id in 0..args.sim_luns {
            array
                .add_lun(id, LunConfig::new(id, blocks, 512))
                .context("building the simulated array")?;
        }
        let host = Host::login(&array, "bench");
        for id in 0..args.sim_luns {
            let options = InProcOptions {
                queue_depth: args.depth as usize,
                ..InProcOptions::default()
            };
            paths.push(Box::new(host.open_with(id, options)?));
        }
        _array = Some(array);
    } else {
        for p in &args.devices {
            paths.push(open_engine(p, args.depth as usize)?);
            // Set-up and read-back go through synchronous SG_IO, so the
            // engine's ring binds to the thread that benchmarks with it.
            let dev = scsi::sg::SgDevice::open(p)
                .with_context(|| format!("cannot open {} for set-up", p.display()))?;
            side.push(Some(Box::new(dev) as Box<dyn Transport>));
        }
    }
    let seed = rand::rngs::OsRng.next_u64();
    let time = match (args.time, args.size) {
        (Some(t), _) => Some(t),
        (None, None) => Some(Duration::from_secs(10)),
        (None, Some(_)) => None,
    };
    let per_lun = args.size.map(|s| (s / paths.len() as u64).max(args.bs));
    let mut plans = Vec::new();
    let mut described = Vec::new();
    side.resize_with(paths.len(), || None);
    for (t, st) in paths.iter_mut().zip(side.iter_mut()) {
        let (blocks, block_size) = capacity(st.as_deref_mut().unwrap_or(t.as_mut()))?;
        if args.bs % u64::from(block_size) != 0 {
            bail!(
                "--bs {} is not a multiple of {}'s block size ({block_size} bytes)",
                args.bs,
                t.describe()
            );
        }
        let span = args.span.min(blocks.saturating_mul(u64::from(block_size)));
        let slots = span / args.bs;
        if slots == 0 {
            bail!(
                "{} is smaller than one --bs {} command (span {span} bytes)",
                t.describe(),
                args.bs
            );
        }
        let depth = (args.depth as usize).min(t.queue_depth()).max(1);
        let note = if depth < args.depth as usize {
            format!(" (depth capped at its queue depth {depth})")
        } else {
            String::new()
        };
        if !out.silent() {
            eprintln!(
                "path {}: {blocks} blocks of {block_size} bytes; span {}{note}",
                t.describe(),
                super::units::human_bytes(slots * args.bs)
            );
        }
        described.push(t.describe());
        plans.push(Plan {
            rw: args.rw,
            bs: args.bs,
            block_size,
            depth,
            slots,
            deadline: None,
            bytes: per_lun,
            verify: args.verify,
            seed,
        });
    }
    if args.verify && !args.rw.is_write() {
        for ((t, st), p) in paths.iter_mut().zip(side.iter_mut()).zip(&plans) {
            if !out.silent() {
                eprintln!("writing the verify pattern over {}", t.describe());
            }
            let t = st.as_deref_mut().unwrap_or(t.as_mut());
            prefill(t, p.slots * p.bs, p.block_size, seed)?;
        }
    }
    let counters = Arc::new(Counters::default());
    let stop = AtomicBool::new(false);
    let cpu0 = CpuTime::now();
    let t0 = Instant::now();
    for p in &mut plans {
        p.deadline = time.map(|d| t0 + d);
    }
    let progress = Progress::start(
        format!("raw {}", args.rw.name()),
        Arc::clone(&counters),
        out.silent(),
    );
    let results: Vec<Result<LunResult>> = thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter_mut()
            .zip(&plans)
            .map(|(t, plan)| {
                let (counters, stop) = (&counters, &stop);
                s.spawn(move || {
                    let r = drive(t.as_mut(), plan, counters, stop);
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a bench thread panicked")))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    let cpu = CpuTime::since(cpu0);
    drop(progress);
    let mut hist = new_histogram();
    let (mut ops, mut bytes) = (0, 0);
    let mut verified = None;
    let mut lun_results = Vec::new();
    for r in results {
        let r = r?;
        hist.add(&r.hist)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        ops += r.ops;
        bytes += r.bytes;
        lun_results.push(r);
    }
    if args.verify {
        let mut checked = 0;
        if args.rw.is_write() {
            for (((t, st), p), r) in paths
                .iter_mut()
                .zip(side.iter_mut())
                .zip(&plans)
                .zip(&lun_results)
            {
                if !out.silent() {
                    eprintln!("reading back what was written to {}", t.describe());
                }
                let t = st.as_deref_mut().unwrap_or(t.as_mut());
                checked += read_back(t, p, &r.written)?;
            }
        } else {
            checked = bytes;
        }
        verified = Some(Verified {
            bytes: checked,
            errors: 0,
        });
    }
    let depth = plans.iter().map(|p| p.depth).min().unwrap_or(1);
    let params = serde_json::json!({
        "rw": args.rw.name(),
        "bs": args.bs,
        "depth": depth,
        "luns": paths.len(),
        "time_s": time.map(|t| t.as_secs_f64()),
        "size": args.size,
        "span": args.span,
        "verify": args.verify,
        "sim": args.sim,
    });
    let transport = if args.sim { "in-process" } else { "sg" };
    Ok(Report::new(
        "raw",
        args.rw.name(),
        transport,
        described,
        params,
        ops,
        bytes,
        elapsed,
        cpu,
        hist,
        verified,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_detects_misplaced_data() {
        let mut b = vec![0u8; 4100];
        fill_pattern(&mut b, 7, 8192);
        assert_eq!(check_pattern(&b, 7, 8192), None);
        assert!(check_pattern(&b, 7, 4096).is_some());
        assert!(check_pattern(&b, 8, 8192).is_some());
        b[4099] ^= 1;
        assert_eq!(check_pattern(&b, 7, 8192), Some(4099));
    }
}
