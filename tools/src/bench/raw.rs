//! `stp bench raw`: READ(16)/WRITE(16) straight at logical units, pipelined
//! on a `scsi::Transport` (submit up to `--depth`, reap in any order).
//!
//! One thread per path drives its LUN with a [`Workload`] (pattern, read/
//! write mix, block-size split), either closed-loop (a new command as soon
//! as a tag is free) or open-loop at a fixed rate (`--rate`: a
//! [`Schedule`] says when each command is due, and its latency is also
//! measured from that intended time). Commands completing during the ramp
//! (`--ramp`) are not counted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use scsi::cdb::{Cdb, RwFlags};
use scsi::{Command, IoBuf, Transport};
use sim_target::{Array, Host, InProcOptions, LunConfig};

use super::hist::{new_histogram, record, Counters, CpuTime, Percentiles, Progress};
use super::intervals::{self, IntervalSample};
use super::units::{parse_duration, parse_nonzero_size};
pub use super::workload::Rw;
use super::workload::{parse_bssplit, parse_rwmix, BsSplit, Op, Schedule, Workload};
use super::{open_engine, DeviceFigures, Figures, FixedRate, OutArgs, Report, Verified};

/// A stall of the simulated array: `DURATION@COMMANDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimStall {
    /// Commands the array executes before it stalls.
    pub after: u64,
    /// How long it takes no command.
    pub duration: Duration,
}

/// Parses `--sim-stall`: `200ms@5000` (stall 200 ms after 5000 commands).
pub fn parse_sim_stall(s: &str) -> Result<SimStall, String> {
    let help = "write DURATION@COMMANDS, e.g. 200ms@5000 (a 200 ms stall after 5000 commands)";
    let (d, n) = s.split_once('@').ok_or_else(|| format!("`{s}`: {help}"))?;
    let duration = parse_duration(d).map_err(|e| format!("{e}; {help}"))?;
    let after = n
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("`{n}` is not a number of commands; {help}"))?;
    Ok(SimStall { after, duration })
}

/// Parses `--rate`: commands per second over all paths, more than 0
/// (`k` for thousands: `20k`).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, mul) = match t.strip_suffix(['k', 'K']) {
        Some(n) => (n, 1e3),
        None => (t, 1.0),
    };
    match num.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * mul <= 1e9 => Ok(v * mul),
        _ => Err(format!(
            "`{s}`: --rate is commands per second over all paths, a number more than 0 (e.g. 5000 or 20k)"
        )),
    }
}

/// Options of `stp bench raw`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  stp bench raw --sim --rw randread --bs 4k --depth 16 --time 10s\n  \
stp bench raw /dev/sg3 /dev/sg4 --rw write --bs 1m --size 4g --verify\n  \
stp bench raw /dev/sg3 --rw randrw --rwmix 70 --bssplit 4k/60,64k/30,1m/10 --ramp 5s --time 30s\n  \
stp bench raw --sim --rate 20k --depth 32 --time 10s --sim-stall 100ms@50000\n\n\
WRITES DESTROY DATA on the devices named. Service time is per command, from submit\n\
to reap; with --rate, latency is also measured from when each command was due\n\
(corrected for coordinated omission). docs/BENCH.md explains every figure."
)]
pub struct RawArgs {
    /// Use the embedded in-process simulated array instead of devices.
    #[arg(long)]
    pub sim: bool,
    /// LUNs in the simulated array (with --sim).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub sim_luns: u64,
    /// Paths to each simulated LUN (with --sim): each its own initiator and
    /// thread, as several /dev/sgN paths to one LUN of a real array.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub sim_paths: u64,
    /// Capacity of each simulated LUN (sparse; writes allocate memory).
    #[arg(long, default_value = "256m", value_parser = parse_nonzero_size)]
    pub sim_lun_size: u64,
    /// Stall the simulated array once (with --sim): DURATION@COMMANDS, e.g.
    /// 200ms@5000 stalls it for 200 ms after 5000 commands (counted from
    /// the start of the run, the ramp included, over all LUNs).
    #[arg(long, value_parser = parse_sim_stall, requires = "sim")]
    pub sim_stall: Option<SimStall>,
    /// Bytes per command (a multiple of the LUN's block size), e.g. 4k, 1m.
    #[arg(long, default_value = "4k", value_parser = parse_nonzero_size)]
    pub bs: u64,
    /// Block-size mix instead of --bs: SIZE/WEIGHT,... e.g. 4k/60,64k/30,1m/10
    /// (fio's bssplit; `:` separators work too). Random offsets are aligned
    /// to the smallest size.
    #[arg(long, value_parser = parse_bssplit, conflicts_with = "bs")]
    pub bssplit: Option<BsSplit>,
    /// Commands kept in flight per path (capped at the transport's queue depth).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub depth: u64,
    /// Access pattern: read, write, randread, randwrite, readwrite (rw), randrw.
    #[arg(long, value_enum, default_value_t = Rw::Randread)]
    pub rw: Rw,
    /// Percentage of reads in readwrite and randrw (fio's rwmixread).
    #[arg(long, default_value = "50", value_parser = parse_rwmix)]
    pub rwmix: u8,
    /// Run for this long after the ramp (e.g. 10s, 500ms); the default when
    /// --size is absent: 10s.
    #[arg(long, value_parser = parse_duration, conflicts_with = "size")]
    pub time: Option<Duration>,
    /// Move this many bytes in all (split evenly over the paths) instead of --time.
    #[arg(long, value_parser = parse_nonzero_size)]
    pub size: Option<u64>,
    /// Run this long first without counting anything (fio's ramp_time).
    #[arg(long, value_parser = parse_duration, conflicts_with = "size")]
    pub ramp: Option<Duration>,
    /// Open loop: issue this many commands per second in all (split evenly
    /// over the paths) on a fixed schedule, whatever the completions do;
    /// latency is then also reported from each command's intended issue
    /// time. Without it: closed loop, as fast as --depth allows.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Bytes of each LUN the run touches, from LBA 0 (capped at its capacity).
    #[arg(long, default_value = "1g", value_parser = parse_nonzero_size)]
    pub span: u64,
    /// Write an address-stamped pattern and check it: reads check a pattern
    /// written beforehand over the span; writes are read back afterwards.
    #[arg(long)]
    pub verify: bool,
    /// Repeat the run this many times; the report is the round with the
    /// median MB/s, with every round's figures, their median and spread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Write IOPS, MB/s and latency percentiles of every interval this long
    /// to --log-file as JSON lines (fio's log_avg_msec).
    #[arg(long, value_parser = parse_duration, requires = "log_file")]
    pub log_interval: Option<Duration>,
    /// Where --log-interval's JSON lines go.
    #[arg(long, value_name = "FILE.jsonl", requires = "log_interval")]
    pub log_file: Option<PathBuf>,
    /// Plot --log-interval's p50, p99 and p99.9 against time here (of the
    /// reported round; from the intended issue time with --rate): SVG, or
    /// PNG when the name ends in .png.
    #[arg(long, value_name = "FILE.svg|FILE.png", requires = "log_interval")]
    pub log_plot: Option<PathBuf>,
    /// Output options.
    #[command(flatten)]
    pub out: OutArgs,
    /// Devices (/dev/sgN), one thread each; or --sim.
    pub devices: Vec<PathBuf>,
}

impl RawArgs {
    /// Options for a run of `bs`-byte commands at `depth` with everything
    /// else at its default, on the simulated array or `devices`.
    pub fn new(rw: Rw, bs: u64, depth: u64, devices: Vec<PathBuf>) -> RawArgs {
        RawArgs {
            sim: devices.is_empty(),
            sim_luns: 1,
            sim_paths: 1,
            sim_lun_size: 256 << 20,
            sim_stall: None,
            bs,
            bssplit: None,
            depth,
            rw,
            rwmix: 50,
            time: None,
            size: None,
            ramp: None,
            rate: None,
            span: 1 << 30,
            verify: false,
            rounds: 1,
            log_interval: None,
            log_file: None,
            log_plot: None,
            out: OutArgs::default(),
            devices,
        }
    }

    /// The block-size mix: --bssplit, else --bs alone.
    pub fn split(&self) -> BsSplit {
        self.bssplit
            .clone()
            .unwrap_or_else(|| BsSplit::single(self.bs))
    }

    /// What the run is called in reports: the pattern, with the mix when
    /// there is one.
    pub fn test_name(&self) -> String {
        let mut name = self.rw.name().to_string();
        if self.rw.is_mixed() {
            name.push_str(&format!(" {}/{}", self.rwmix, 100 - self.rwmix));
        }
        if let Some(s) = &self.bssplit {
            name.push_str(&format!(" bssplit {}", s.describe()));
        }
        if let Some(r) = self.rate {
            name.push_str(&format!(" at {r:.0}/s"));
        }
        name
    }
}

/// How one path is driven.
struct Plan {
    workload: Workload,
    block_size: u32,
    depth: usize,
    /// The run's origin: the schedule counts from here.
    t0: Instant,
    /// Completions from here on count (the ramp's end).
    measure_from: Instant,
    deadline: Option<Instant>,
    bytes: Option<u64>,
    verify: bool,
    seed: u64,
    /// This path's share of --rate.
    rate: Option<f64>,
    /// --log-interval.
    log_every: Option<Duration>,
}

/// One direction's counts and latencies.
struct Dir {
    ops: u64,
    bytes: u64,
    /// Submit to reap, ns.
    service: Histogram<u64>,
    /// Intended issue time to reap, ns (fixed-rate runs).
    corrected: Histogram<u64>,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            ops: 0,
            bytes: 0,
            service: new_histogram(),
            corrected: new_histogram(),
        }
    }

    fn add(&mut self, other: &Dir) -> Result<()> {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.service
            .add(&other.service)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        self.corrected
            .add(&other.corrected)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))
    }

    fn figures(&self, secs: f64, fixed_rate: bool) -> Figures {
        Figures::new(
            self.ops,
            self.bytes,
            secs,
            Percentiles::of(&self.service),
            fixed_rate.then(|| Percentiles::of(&self.corrected)),
        )
    }
}

/// What one path did.
struct LunResult {
    /// Reads, writes.
    dirs: [Dir; 2],
    /// Intended to actual submission, ns (fixed-rate runs).
    lag: Histogram<u64>,
    /// Units of the workload's alignment written (verify of write-only runs).
    written: Vec<bool>,
    /// Fixed-rate runs: commands due before issuing stopped that never went out.
    not_issued: u64,
    /// A block-size mix: each size's commands (in the split's order),
    /// both directions; empty for one size.
    sizes: Vec<Dir>,
}

/// A command in flight.
#[derive(Clone, Copy)]
struct InFlight {
    op: Op,
    start: Instant,
    intended: Option<Instant>,
}

/// One path's interval accumulator for --log-interval.
struct IntervalLog<'a> {
    every: Duration,
    origin: Instant,
    index: u64,
    acc: IntervalSample,
    tx: &'a mpsc::Sender<IntervalSample>,
}

impl<'a> IntervalLog<'a> {
    fn new(every: Duration, origin: Instant, tx: &'a mpsc::Sender<IntervalSample>) -> Self {
        IntervalLog {
            every,
            origin,
            index: 0,
            acc: IntervalSample::new(0, every),
            tx,
        }
    }

    /// Sends every interval that ended before `now`.
    fn roll(&mut self, now: Instant) {
        let at = now.saturating_duration_since(self.origin);
        let idx = intervals::index(at, self.every);
        while self.index < idx {
            let next = IntervalSample::new(self.index + 1, self.every);
            let done = std::mem::replace(&mut self.acc, next);
            let _ = self.tx.send(done);
            self.index += 1;
        }
    }

    /// Sends the last, partial interval, ended at `end`, unless it is
    /// shorter than a tenth of an interval (its rates would be noise; its
    /// commands still count in the run's totals).
    fn finish(mut self, end: Instant) {
        self.roll(end);
        let at = end.saturating_duration_since(self.origin);
        let every = self.every.as_secs_f64();
        self.acc.seconds = (at.as_secs_f64() - self.index as f64 * every).clamp(0.0, every);
        if self.acc.seconds >= every / 10.0 {
            let _ = self.tx.send(self.acc);
        }
    }
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

/// Reads back every unit `written` marks (runs of them, up to 1 MiB per
/// command) and checks the pattern; returns the bytes checked.
fn read_back(t: &mut dyn Transport, plan: &Plan, written: &[bool]) -> Result<u64> {
    let unit = plan.workload.align();
    let per_cmd = ((1u64 << 20) / unit).max(1) as usize;
    let mut checked = 0;
    let mut i = 0;
    while i < written.len() {
        if !written[i] {
            i += 1;
            continue;
        }
        let mut n = 1;
        while n < per_cmd && i + n < written.len() && written[i + n] {
            n += 1;
        }
        let addr = i as u64 * unit;
        let len = n as u64 * unit;
        let lba = addr / u64::from(plan.block_size);
        let blocks = (len / u64::from(plan.block_size)) as u32;
        let (d, _) = t
            .execute(Command::data_in(rw_cdb(false, lba, blocks), len as usize))
            .into_result()
            .with_context(|| format!("{}: verify read at LBA {lba}", t.describe()))?;
        if let Some(off) = check_pattern(&d, plan.seed, addr) {
            bail!(
                "{}: VERIFY FAILED: data read back at LBA {} differs from what was written",
                t.describe(),
                lba + off as u64 / u64::from(plan.block_size)
            );
        }
        checked += len;
        i += n;
    }
    Ok(checked)
}

/// The data buffers of one path: one per command in flight, each of the
/// split's largest size, taken from the DMA pool (so the bsg engine
/// registers them) and touched (first-touch page faults and the fill) before
/// the run's clock starts, as fio allocates its buffers before timing. Every
/// command uses a buffer's first `len` bytes.
fn buffers(plan: &Plan) -> Vec<IoBuf> {
    let max_len = plan.workload.split().max() as usize;
    (0..plan.depth)
        .map(|_| {
            let mut b = scsi::pool::BufPool::global().get(max_len);
            if !plan.verify {
                b.fill(0xA5);
            }
            b
        })
        .collect()
}

fn drive(
    t: &mut dyn Transport,
    plan: &Plan,
    mut pool: Vec<IoBuf>,
    counters: &Counters,
    stop: &AtomicBool,
    log: Option<&mpsc::Sender<IntervalSample>>,
) -> Result<LunResult> {
    let name = t.describe();
    let bsz = u64::from(plan.block_size);
    let mut workload = plan.workload.clone();
    let max_len = workload.split().max() as usize;
    let mut dirs = [Dir::new(), Dir::new()];
    let mut lag = new_histogram();
    let mut inflight: Vec<Option<InFlight>> = vec![None; plan.depth];
    let mut free: Vec<usize> = (0..plan.depth).rev().collect();
    let mut rng = SmallRng::seed_from_u64(plan.seed ^ 0x5EED);
    let mut schedule = plan.rate.map(Schedule::new);
    if schedule.is_some() {
        // Wake from the sleeps between due commands as close to the due
        // time as the kernel can (the default slack is 50 µs): lateness
        // here is counted as latency. Best effort.
        let _ = nix::sys::prctl::set_timerslack(1);
    }
    let mut issued = 0u64;
    let writes_only = workload.read_percent() == 0;
    let mut written = if plan.verify && writes_only {
        vec![false; (workload.span() / workload.align()) as usize]
    } else {
        Vec::new()
    };
    let mut log = plan
        .log_every
        .zip(log)
        .map(|(every, tx)| IntervalLog::new(every, plan.measure_from, tx));
    let mut done = Vec::with_capacity(plan.depth);
    let size_of: Vec<u64> = workload.split().entries().iter().map(|e| e.0).collect();
    let mut sizes: Vec<Dir> = if size_of.len() > 1 {
        size_of.iter().map(|_| Dir::new()).collect()
    } else {
        Vec::new()
    };
    // Sleep no longer than this at once, so a stop is seen.
    let tick = Duration::from_millis(100);
    loop {
        let now = Instant::now();
        let issuing = !stop.load(Ordering::Relaxed)
            && plan.deadline.is_none_or(|d| now < d)
            && plan.bytes.is_none_or(|b| issued < b);
        if issuing {
            while let Some(&tag) = free.last() {
                let start = Instant::now();
                let intended = match &mut schedule {
                    None => None,
                    Some(s) => match s.poll(start.saturating_duration_since(plan.t0)) {
                        Some(at) => Some(plan.t0 + at),
                        None => break,
                    },
                };
                free.pop();
                let op = workload.next(&mut rng);
                let lba = op.offset / bsz;
                let blocks = (op.len / bsz) as u32;
                let mut buf = pool.pop().unwrap_or_else(|| {
                    // `buffers` made one per tag and each completion hands
                    // its buffer back; should one not, take another.
                    scsi::pool::BufPool::global().get(max_len)
                });
                buf.resize(op.len as usize);
                let cmd = if op.write {
                    if plan.verify {
                        fill_pattern(buf.as_mut_slice(), plan.seed, op.offset);
                    }
                    Command::data_out(rw_cdb(true, lba, blocks), buf)
                } else {
                    Command {
                        data: buf,
                        ..Command::data_in(rw_cdb(false, lba, blocks), 0)
                    }
                };
                let start = Instant::now();
                inflight[tag] = Some(InFlight {
                    op,
                    start,
                    intended,
                });
                t.submit(cmd.with_tag(tag as u64))
                    .map_err(|e| anyhow!("{name}: could not submit at LBA {lba}: {}", e.error))?;
                issued += op.len;
                if plan.bytes.is_some_and(|b| issued >= b) {
                    break;
                }
            }
        }
        if t.in_flight() == 0 {
            if !issuing {
                break;
            }
            // Open loop, nothing in flight: sleep until the next command is due.
            if let Some(s) = &schedule {
                let due = plan.t0 + s.next_due();
                let now = Instant::now();
                if due > now {
                    thread::sleep((due - now).min(tick));
                }
                if let Some(l) = &mut log {
                    l.roll(Instant::now());
                }
            }
            continue;
        }
        // Wait for a completion, or until the next command is due when a
        // tag is free for it.
        let wait = match &schedule {
            Some(s) if issuing && !free.is_empty() => (plan.t0 + s.next_due())
                .saturating_duration_since(Instant::now())
                .min(tick),
            _ => tick,
        };
        done.clear();
        t.reap(&mut done, Some(wait))
            .with_context(|| format!("{name}: reaping completions"))?;
        let now = Instant::now();
        if let Some(l) = &mut log {
            l.roll(now);
        }
        let measuring = now >= plan.measure_from;
        for c in done.drain(..) {
            let tag = c.tag as usize;
            let f = inflight
                .get_mut(tag)
                .and_then(Option::take)
                .ok_or_else(|| anyhow!("{name}: a completion carries unknown tag {tag}"))?;
            free.push(tag);
            let op = f.op;
            let lba = op.offset / bsz;
            let (data, _) = c.into_result().with_context(|| {
                format!(
                    "{name}: {} at LBA {lba} failed",
                    if op.write { "WRITE(16)" } else { "READ(16)" },
                )
            })?;
            if data.len() as u64 != op.len {
                bail!(
                    "{name}: short transfer at LBA {lba}: {} of {} bytes",
                    data.len(),
                    op.len
                );
            }
            if plan.verify {
                if op.write {
                    if !written.is_empty() {
                        let unit = workload.align();
                        let first = (op.offset / unit) as usize;
                        let n = (op.len / unit) as usize;
                        written[first..first + n].fill(true);
                    }
                } else if let Some(off) = check_pattern(&data, plan.seed, op.offset) {
                    bail!(
                        "{name}: VERIFY FAILED: READ at LBA {lba} returned wrong data at byte {off}"
                    );
                }
            }
            pool.push(data);
            counters.add(op.len);
            if !measuring {
                continue;
            }
            let service = now.saturating_duration_since(f.start);
            let corrected = f.intended.map(|i| now.saturating_duration_since(i));
            let d = &mut dirs[usize::from(op.write)];
            d.ops += 1;
            d.bytes += op.len;
            record(&mut d.service, service);
            if let Some(i) = f.intended {
                record(&mut d.corrected, now.saturating_duration_since(i));
                record(&mut lag, f.start.saturating_duration_since(i));
            }
            if let Some(z) = size_of
                .iter()
                .position(|&b| b == op.len)
                .and_then(|k| sizes.get_mut(k))
            {
                z.ops += 1;
                z.bytes += op.len;
                record(&mut z.service, service);
                if let Some(c) = corrected {
                    record(&mut z.corrected, c);
                }
            }
            if let Some(l) = &mut log {
                l.acc.add(op.write, op.len, service, corrected);
            }
        }
    }
    let end = Instant::now();
    if let Some(l) = log {
        l.finish(end);
    }
    let not_issued = match (&schedule, plan.deadline) {
        // Due strictly before the deadline (one due exactly at it is not).
        (Some(s), Some(d)) => s
            .behind(d.saturating_duration_since(plan.t0))
            .saturating_sub(1),
        _ => 0,
    };
    Ok(LunResult {
        dirs,
        lag,
        written,
        not_issued,
        sizes,
    })
}

/// Checks the options that clap cannot.
fn check_args(args: &RawArgs) -> Result<()> {
    if args.sim != args.devices.is_empty() {
        bail!("give devices (e.g. /dev/sg3) or --sim for the embedded simulated array, not both or neither");
    }
    let split = args.split();
    let max = split.max();
    if max.saturating_mul(args.depth) > 4 << 30 {
        bail!(
            "--depth {} commands of up to {} would pin {} of buffers per path; lower one of them",
            args.depth,
            super::units::human_bytes(max),
            super::units::human_bytes(max.saturating_mul(args.depth))
        );
    }
    if max > u64::from(u32::MAX) {
        bail!("a {max}-byte command is too large for one command; lower --bs or --bssplit");
    }
    if args
        .log_interval
        .is_some_and(|d| d < Duration::from_millis(10))
    {
        bail!("--log-interval must be at least 10ms (each interval is one line and one histogram per path)");
    }
    if args.rwmix != 50 && !args.rw.is_mixed() {
        bail!(
            "--rwmix applies to --rw readwrite or randrw, not {}; pick one of those for a read/write mix",
            args.rw.name()
        );
    }
    Ok(())
}

/// Runs `stp bench raw`: once, or `--rounds` times with the median round
/// reported.
pub fn run(args: &RawArgs) -> Result<Report> {
    check_args(args)?;
    let mut log = match &args.log_file {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create the --log-file {}", p.display()))?,
        )),
        None => None,
    };
    let mut reports = Vec::new();
    for round in 1..=args.rounds {
        let label = if args.rounds > 1 {
            format!("raw {} (round {round} of {})", args.rw.name(), args.rounds)
        } else {
            format!("raw {}", args.rw.name())
        };
        let log = log.as_mut().map(|w| w as &mut dyn std::io::Write);
        reports.push(run_once(args, round, &label, log)?);
    }
    if let Some(mut w) = log {
        use std::io::Write as _;
        w.flush().context("writing the --log-file")?;
    }
    let report = super::with_rounds(reports);
    if let Some(path) = &args.log_plot {
        let (title, series) = interval_series(&report);
        let x_label = "seconds after the ramp";
        let bytes = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        {
            super::hist::xy_png(&title, x_label, &series, None)
        } else {
            super::hist::xy_svg(&title, x_label, &series, None).into_bytes()
        };
        std::fs::write(path, bytes)
            .with_context(|| format!("writing the --log-plot {}", path.display()))?;
    }
    Ok(report)
}

/// The --log-plot of a report's intervals: its title (with the IOPS range)
/// and p50, p99 and p99.9 against the interval's end.
fn interval_series(r: &Report) -> (String, super::hist::Series) {
    let corrected = r.corrected_latency_us.is_some();
    let pick = |l: &intervals::Line| {
        if corrected {
            l.corrected_latency_us.unwrap_or(l.latency_us)
        } else {
            l.latency_us
        }
    };
    let lines: Vec<&intervals::Line> = r.intervals.iter().filter(|l| l.iops > 0.0).collect();
    let line = |f: fn(&Percentiles) -> f64| -> Vec<(f64, f64)> {
        lines.iter().map(|l| (l.t_s, f(&pick(l)))).collect()
    };
    let (lo, hi) = lines.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), l| {
        (lo.min(l.iops), hi.max(l.iops))
    });
    let what = if corrected {
        "from the intended issue time"
    } else {
        "service time"
    };
    let title = if lines.is_empty() {
        format!("{} per interval: none completed", r.label())
    } else {
        format!(
            "{} per interval ({what}); IOPS {lo:.0} to {hi:.0}",
            r.label()
        )
    };
    (
        title,
        vec![
            ("p50".to_string(), line(|p| p.p50)),
            ("p99".to_string(), line(|p| p.p99)),
            ("p99.9".to_string(), line(|p| p.p999)),
        ],
    )
}

/// One run.
fn run_once(
    args: &RawArgs,
    round: u32,
    label: &str,
    log: Option<&mut dyn std::io::Write>,
) -> Result<Report> {
    let out = &args.out;
    // Keep the array alive for the run.
    let mut array = None;
    let mut paths: Vec<Box<dyn Transport>> = Vec::new();
    // The io_uring engine binds itself to the first thread that uses it (the
    // path's bench thread), so set-up and read-back go through a synchronous
    // SG_IO handle of their own.
    let mut side: Vec<Option<Box<dyn Transport>>> = Vec::new();
    if args.sim {
        let a = Array::new();
        let blocks = (args.sim_lun_size / 512).max(1);
        for id in 0..args.sim_luns {
            a.add_lun(id, LunConfig::new(id, blocks, 512))
                .context("building the simulated array")?;
        }
        let hosts: Vec<Host> = (0..args.sim_paths)
            .map(|p| Host::login(&a, &format!("bench{p}")))
            .collect();
        for id in 0..args.sim_luns {
            for host in &hosts {
                let options = InProcOptions {
                    queue_depth: args.depth as usize,
                    ..InProcOptions::default()
                };
                paths.push(Box::new(host.open_with(id, options)?));
            }
        }
        array = Some(a);
    } else {
        for p in &args.devices {
            paths.push(open_engine(p, args.depth as usize)?);
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
    let split = args.split();
    let per_path = args.size.map(|s| (s / paths.len() as u64).max(split.max()));
    let rate = args.rate.map(|r| r / paths.len() as f64);
    let mut plans = Vec::new();
    let mut described = Vec::new();
    side.resize_with(paths.len(), || None);
    // Placeholders until the run starts.
    let now = Instant::now();
    for (t, st) in paths.iter_mut().zip(side.iter_mut()) {
        let (blocks, block_size) = capacity(st.as_deref_mut().unwrap_or(t.as_mut()))?;
        if let Some(&(bad, _)) = split
            .entries()
            .iter()
            .find(|(b, _)| b % u64::from(block_size) != 0)
        {
            bail!(
                "a {bad}-byte command is not a multiple of {}'s block size ({block_size} bytes); use multiples of it in --bs / --bssplit",
                t.describe()
            );
        }
        let span = args.span.min(blocks.saturating_mul(u64::from(block_size)));
        let workload = Workload::new(args.rw, args.rwmix, split.clone(), span)
            .map_err(|e| anyhow!("{}: {e}", t.describe()))?;
        let depth = (args.depth as usize).min(t.queue_depth()).max(1);
        let note = if depth < args.depth as usize {
            format!(" (depth capped at its queue depth {depth})")
        } else {
            String::new()
        };
        if !out.silent() && round == 1 {
            eprintln!(
                "path {}: {blocks} blocks of {block_size} bytes; span {}{note}",
                t.describe(),
                super::units::human_bytes(workload.span())
            );
        }
        described.push(t.describe());
        plans.push(Plan {
            workload,
            block_size,
            depth,
            t0: now,
            measure_from: now,
            deadline: None,
            bytes: per_path,
            verify: args.verify,
            seed,
            rate,
            log_every: args.log_interval,
        });
    }
    let has_reads = args.rw.read_percent(args.rwmix) > 0;
    if args.verify && has_reads {
        for ((t, st), p) in paths.iter_mut().zip(side.iter_mut()).zip(&plans) {
            if !out.silent() && round == 1 {
                eprintln!("writing the verify pattern over {}", t.describe());
            }
            let t = st.as_deref_mut().unwrap_or(t.as_mut());
            prefill(t, p.workload.span(), p.block_size, seed)?;
        }
    }
    if let (Some(a), Some(s)) = (&array, args.sim_stall) {
        a.stall_after(s.after, s.duration);
    }
    let counters = Arc::new(Counters::default());
    let stop = AtomicBool::new(false);
    let ramp = args.ramp.unwrap_or_default();
    // Every path's buffers, made before the clock starts.
    let mut bufs: Vec<Vec<IoBuf>> = plans.iter().map(buffers).collect();
    let t0 = Instant::now();
    for p in &mut plans {
        p.t0 = t0;
        p.measure_from = t0 + ramp;
        p.deadline = time.map(|d| t0 + ramp + d);
    }
    let measure_from = t0 + ramp;
    let mut cpu0 = CpuTime::now();
    let progress = Progress::start(label.to_string(), Arc::clone(&counters), out.silent());
    let (tx, rx) = mpsc::channel::<IntervalSample>();
    let npaths = paths.len();
    let (results, log_result) = thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter_mut()
            .zip(&plans)
            .zip(bufs.iter_mut().map(std::mem::take))
            .map(|((t, plan), pool)| {
                let (counters, stop, tx) = (&counters, &stop, tx.clone());
                s.spawn(move || {
                    let r = drive(t.as_mut(), plan, pool, counters, stop, Some(&tx));
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        drop(tx);
        // The CPU of the measured window only: take it again once the ramp
        // is over.
        if ramp > Duration::ZERO {
            while Instant::now() < measure_from && !stop.load(Ordering::Relaxed) {
                thread::sleep((measure_from - Instant::now()).min(Duration::from_millis(50)));
            }
            cpu0 = CpuTime::now();
        }
        let log_result = write_intervals(rx, npaths, round, args.log_interval, log);
        let results: Vec<Result<LunResult>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a bench thread panicked")))
            })
            .collect();
        (results, log_result)
    });
    let end = Instant::now();
    let cpu = CpuTime::since(cpu0);
    drop(progress);
    let elapsed = end.saturating_duration_since(measure_from);
    let mut lun_results = Vec::new();
    for r in results {
        lun_results.push(r?);
    }
    let interval_lines = log_result?;
    let mut verified = None;
    let (mut reads, mut writes) = (Dir::new(), Dir::new());
    let mut lag = new_histogram();
    for r in &lun_results {
        reads.add(&r.dirs[0])?;
        writes.add(&r.dirs[1])?;
        lag.add(&r.lag)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
    }
    let mut all = Dir::new();
    all.add(&reads)?;
    all.add(&writes)?;
    if args.verify {
        let mut checked = 0;
        if !has_reads {
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
            checked = reads.bytes;
        }
        verified = Some(Verified {
            bytes: checked,
            errors: 0,
        });
    }
    let depth = plans.iter().map(|p| p.depth).min().unwrap_or(1);
    let params = serde_json::json!({
        "rw": args.rw.name(),
        "rwmix_read": args.rw.read_percent(args.rwmix),
        "bs": if args.bssplit.is_some() { None } else { Some(args.bs) },
        "bssplit": args.bssplit.as_ref().map(BsSplit::describe),
        "mean_bs": split.mean(),
        "depth": depth,
        "luns": if args.sim { args.sim_luns } else { paths.len() as u64 },
        "paths": paths.len(),
        "time_s": time.map(|t| t.as_secs_f64()),
        "ramp_s": args.ramp.map(|r| r.as_secs_f64()),
        "rate_iops": args.rate,
        "size": args.size,
        "span": args.span,
        "verify": args.verify,
        "sim": args.sim,
        "sim_stall": args.sim_stall.map(|s| format!("{}ms@{}", s.duration.as_millis(), s.after)),
        "round": round,
    });
    let transport = if args.sim { "in-process" } else { "sg" };
    let secs = elapsed.as_secs_f64().max(1e-9);
    let fixed = args.rate.is_some();
    let all_hist = all.service.clone();
    let mut report = Report::new(
        "raw",
        &args.test_name(),
        transport,
        described.clone(),
        params,
        all.ops,
        all.bytes,
        elapsed,
        cpu,
        all_hist,
        verified,
    );
    if let Some(r) = args.rate {
        report.corrected_latency_us = Some(Percentiles::of(&all.corrected));
        report.fixed_rate = Some(FixedRate {
            target_iops: r,
            achieved_iops: report.iops,
            issue_lag_us: Percentiles::of(&lag),
            not_issued: lun_results.iter().map(|r| r.not_issued).sum(),
        });
        report.corrected_hist = Some(all.corrected.clone());
    }
    report.intervals = interval_lines;
    if args.rw.is_mixed() {
        report.read = Some(reads.figures(secs, fixed));
        report.write = Some(writes.figures(secs, fixed));
        report
            .plot_series
            .push(("reads".into(), reads.service.clone()));
        report
            .plot_series
            .push(("writes".into(), writes.service.clone()));
    }
    let entries = split.entries();
    if entries.len() > 1 {
        for (k, &(bs, _)) in entries.iter().enumerate() {
            let mut z = Dir::new();
            for r in &lun_results {
                if let Some(d) = r.sizes.get(k) {
                    z.add(d)?;
                }
            }
            report.sizes.push(super::SizeFigures {
                bs,
                all: z.figures(secs, fixed),
            });
        }
    }
    if lun_results.len() > 1 {
        for (path, r) in described.iter().zip(&lun_results) {
            let mut a = Dir::new();
            a.add(&r.dirs[0])?;
            a.add(&r.dirs[1])?;
            report.devices.push(DeviceFigures {
                path: path.clone(),
                all: a.figures(secs, fixed),
                read: args.rw.is_mixed().then(|| r.dirs[0].figures(secs, fixed)),
                write: args.rw.is_mixed().then(|| r.dirs[1].figures(secs, fixed)),
            });
        }
    }
    Ok(report)
}

/// Writes the interval lines of one round as they complete (when
/// `--log-interval` is on), until every path has finished.
fn write_intervals(
    rx: mpsc::Receiver<IntervalSample>,
    paths: usize,
    round: u32,
    every: Option<Duration>,
    log: Option<&mut dyn std::io::Write>,
) -> Result<Vec<intervals::Line>> {
    let (Some(every), Some(w)) = (every, log) else {
        // Drain, so this ends when every path is done.
        for _ in rx {}
        return Ok(Vec::new());
    };
    let mut c = intervals::Collector::new(paths, round, every);
    let mut all = Vec::new();
    let mut put = |lines: Vec<intervals::Line>, w: &mut dyn std::io::Write| -> Result<()> {
        for l in lines {
            serde_json::to_writer(&mut *w, &l)?;
            w.write_all(b"\n").context("writing the --log-file")?;
            all.push(l);
        }
        w.flush().context("writing the --log-file")
    };
    for s in rx {
        put(c.push(s), w)?;
    }
    put(c.finish(), w)?;
    Ok(all)
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

    fn sim(rw: Rw) -> RawArgs {
        let mut a = RawArgs::new(rw, 4096, 8, Vec::new());
        a.sim_lun_size = 32 << 20;
        a.span = 32 << 20;
        a.out.quiet = true;
        a
    }

    #[test]
    fn a_mixed_split_run_reports_reads_writes_and_paths_apart() {
        let a = RawArgs {
            rwmix: 70,
            bssplit: Some(parse_bssplit("4k/60,64k/30,1m/10").unwrap()),
            size: Some(48 << 20),
            sim_paths: 2,
            verify: true,
            ..sim(Rw::Randrw)
        };
        let r = run(&a).unwrap();
        let (rd, wr) = (r.read.as_ref().unwrap(), r.write.as_ref().unwrap());
        assert!(rd.ops > 0 && wr.ops > 0, "{rd:?} {wr:?}");
        assert_eq!(rd.ops + wr.ops, r.ops);
        assert_eq!(rd.bytes + wr.bytes, r.bytes);
        assert_eq!(
            rd.latency_us.count + wr.latency_us.count,
            r.latency_us.count
        );
        assert!(rd.corrected_latency_us.is_none() && r.corrected_latency_us.is_none());
        // Every read checked the pattern the writes keep.
        assert_eq!(r.verify.unwrap().bytes, rd.bytes);
        assert_eq!(r.devices.len(), 2);
        assert_eq!(r.devices.iter().map(|d| d.all.ops).sum::<u64>(), r.ops);
        assert!(r
            .devices
            .iter()
            .all(|d| d.read.is_some() && d.write.is_some()));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["params"]["bssplit"], "4k/60,64k/30,1m/10");
        assert_eq!(v["params"]["rwmix_read"], 70);
        assert_eq!(v["params"]["paths"], 2);
        assert!(v["read"]["latency_us"]["p99"].is_number());
        assert!(v["devices"][1]["write"]["mb_per_s"].is_number());
        assert!(v["devices"][0]["latency_us"]["p50"].is_number());
        assert_eq!(r.test, "randrw 70/30 bssplit 4k/60,64k/30,1m/10");
        // Each size's own figures, in the split's order, adding up.
        let sizes: Vec<u64> = r.sizes.iter().map(|z| z.bs).collect();
        assert_eq!(sizes, [4096, 64 << 10, 1 << 20]);
        assert_eq!(r.sizes.iter().map(|z| z.all.ops).sum::<u64>(), r.ops);
        assert_eq!(r.sizes.iter().map(|z| z.all.bytes).sum::<u64>(), r.bytes);
        assert!(r.sizes.iter().all(|z| z.all.bytes == z.all.ops * z.bs));
        assert!(v["sizes"][2]["latency_us"]["p50"].is_number());
        assert_eq!(v["sizes"][0]["bs"], 4096);
    }

    #[test]
    fn write_only_splits_are_read_back() {
        let a = RawArgs {
            bssplit: Some(parse_bssplit("4k/50,64k/50").unwrap()),
            size: Some(4 << 20),
            verify: true,
            ..sim(Rw::Randwrite)
        };
        let r = run(&a).unwrap();
        assert!(r.read.is_none() && r.devices.is_empty());
        let v = r.verify.unwrap();
        assert!(v.bytes > 0 && v.bytes <= r.bytes, "{v:?}");
    }

    #[test]
    fn the_corrected_tail_sees_a_stall_the_service_time_hides() {
        // 2000 commands a second, one path; after 600 commands the array
        // stalls for 200 ms. In-process commands execute inside submit, so
        // one command carries the stall as service time, while the ~400
        // due during it are issued late: measured from when they were due,
        // they carry it too.
        let stall = Duration::from_millis(200);
        let a = RawArgs {
            rate: Some(2000.0),
            depth: 4,
            time: Some(Duration::from_millis(1000)),
            sim_stall: Some(SimStall {
                after: 600,
                duration: stall,
            }),
            ..sim(Rw::Randread)
        };
        let r = run(&a).unwrap();
        let half = (stall / 2).as_nanos() as u64;
        let service = r.hist.count_between(half, u64::MAX);
        let corrected = r.corrected_hist.as_ref().unwrap();
        let late = corrected.count_between(half, u64::MAX);
        // Only the commands in flight when it began can carry the stall as
        // service time; at least the ~200 due in its first half (each of
        // them waited it out from its due time) carry it when corrected.
        assert!(service <= 4, "service {service}");
        assert!(late >= 100, "corrected {late}");
        let c = r.corrected_latency_us.unwrap();
        assert!(c.p99 >= 100_000.0, "corrected p99 {} µs", c.p99);
        assert!(r.latency_us.p99 < c.p99);
        let f = r.fixed_rate.as_ref().unwrap();
        assert_eq!(f.target_iops, 2000.0);
        assert!(f.issue_lag_us.max >= 100_000.0);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v["corrected_latency_us"]["p999"].is_number());
        assert!(v["fixed_rate"]["issue_lag_us"]["p99"].is_number());
    }

    #[test]
    fn a_rate_beyond_the_lun_says_how_much_never_went_out() {
        let a = RawArgs {
            rate: Some(1e9),
            depth: 1,
            time: Some(Duration::from_millis(200)),
            ..sim(Rw::Randread)
        };
        let r = run(&a).unwrap();
        let f = r.fixed_rate.unwrap();
        assert!(f.not_issued > 0, "{f:?}");
        assert!(f.achieved_iops < f.target_iops);
        let e = run(&RawArgs {
            log_interval: Some(Duration::from_millis(1)),
            log_file: Some("/nonexistent/x.jsonl".into()),
            ..sim(Rw::Randread)
        })
        .unwrap_err();
        assert!(e.to_string().contains("at least 10ms"), "{e}");
    }

    #[test]
    fn rounds_ramp_and_interval_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("i.jsonl");
        let a = RawArgs {
            rounds: 3,
            ramp: Some(Duration::from_millis(100)),
            time: Some(Duration::from_millis(250)),
            log_interval: Some(Duration::from_millis(100)),
            log_file: Some(log.clone()),
            log_plot: Some(dir.path().join("i.svg")),
            ..sim(Rw::Randread)
        };
        let r = run(&a).unwrap();
        let plot = std::fs::read_to_string(dir.path().join("i.svg")).unwrap();
        assert_eq!(plot.matches("<polyline").count(), 3);
        assert!(plot.contains("per interval (service time)"), "{plot}");
        assert!(!r.intervals.is_empty());
        assert!(r
            .intervals
            .iter()
            .all(|l| l.round == r.rounds.as_ref().unwrap().reported as u32));
        let text = std::fs::read_to_string(&log).unwrap();
        let png = dir.path().join("i.png");
        run(&RawArgs {
            rounds: 1,
            rate: Some(500.0),
            log_plot: Some(png.clone()),
            log_file: Some(dir.path().join("j.jsonl")),
            ..a.clone()
        })
        .unwrap();
        assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
        let rounds = r.rounds.as_ref().unwrap();
        assert_eq!(rounds.n, 3);
        assert_eq!(rounds.mb_per_s.each.len(), 3);
        assert!((1..=3).contains(&rounds.reported));
        assert_eq!(rounds.mb_per_s.median, r.mb_per_s);
        assert!(rounds.mb_per_s.min <= rounds.mb_per_s.median);
        assert!(rounds.mb_per_s.median <= rounds.mb_per_s.max);
        assert_eq!(r.params["ramp_s"], 0.1);
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for round in 1..=3 {
            let mine: Vec<_> = lines.iter().filter(|l| l["round"] == round).collect();
            assert!(!mine.is_empty(), "no lines for round {round}");
            for (i, l) in mine.iter().enumerate() {
                assert_eq!(l["interval"], i as u64, "{l}");
                assert!(l["latency_us"]["p99"].is_number());
            }
        }
    }

    #[test]
    fn bad_combinations_are_refused_with_a_way_out() {
        let e = run(&RawArgs {
            rwmix: 70,
            ..sim(Rw::Randread)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("randrw"), "{e}");
        let e = run(&RawArgs {
            bssplit: Some(parse_bssplit("4k/50,1m/50").unwrap()),
            span: 512 << 10,
            ..sim(Rw::Randread)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--span"), "{e}");
        let e = run(&RawArgs {
            bssplit: Some(parse_bssplit("4k/50,1000/50").unwrap()),
            ..sim(Rw::Randread)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("block size"), "{e}");
        let e = run(&RawArgs {
            devices: vec!["/dev/sg9".into()],
            ..sim(Rw::Randread)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("not both"), "{e}");
        assert!(parse_sim_stall("200ms")
            .unwrap_err()
            .contains("DURATION@COMMANDS"));
        assert!(parse_sim_stall("200ms@x").is_err());
        assert_eq!(
            parse_sim_stall("200ms@5").unwrap(),
            SimStall {
                after: 5,
                duration: Duration::from_millis(200)
            }
        );
        assert_eq!(parse_rate("20k"), Ok(20_000.0));
        assert_eq!(parse_rate("1.5"), Ok(1.5));
        for bad in ["0", "-1", "x", "inf", "NaN", ""] {
            assert!(parse_rate(bad).unwrap_err().contains("e.g. 5000"), "{bad}");
        }
    }
}
