//! `stp bench`: throughput, latency percentiles and CPU cost of raw SCSI
//! I/O, of STP streams through the array, and of TCP on loopback.
//!
//! Every mode produces one [`Report`]: printed as text, or as JSON with
//! `--json`; its latency histogram can be written as a classic `.hgrm`
//! file (`--hgrm`) and as an SVG percentile plot (`--plot`).
//!
//! Raw mode's workloads are decided sans-IO in `workload` (mix, block-size
//! split, offsets, and the fixed-rate schedule, on a time passed in);
//! `curve` runs raw mode at fractions of its maximum, `diff` compares two
//! reports, `job` reads a run from a TOML file, `intervals` turns per-path
//! interval samples into JSON lines. docs/BENCH.md is the user's guide.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use scsi::Transport;
use serde::Serialize;

mod backup;
mod curve;
mod diff;
mod hist;
mod intervals;
mod job;
pub mod net;
mod png;
mod protection;
mod raw;
mod report;
pub mod units;
mod workload;

use hist::{distribution, CpuTime, Percentiles};

/// The version of the JSON output's shape.
pub const SCHEMA: u32 = 1;

/// Opens the path to a LUN for the STP modes, where several threads (a
/// stream's pump, writers and timer) share each LUN: a handle onto the
/// device's shared io_uring engine ([`scsi::EnginePool::global`]), or
/// synchronous `SG_IO` where io_uring cannot drive it. The first open of
/// each device says which on stderr and why.
pub fn open_path(path: &Path) -> Result<Box<dyn Transport>> {
    if !path.exists() {
        bail!("{}: no such device", path.display());
    }
    let best = scsi::EnginePool::global().open(path).with_context(|| {
        format!(
            "cannot open {} as a SCSI generic device (use a /dev/sgN path; `stp probe` lists them)",
            path.display()
        )
    })?;
    static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.iter().any(|p| p == path) {
        eprintln!("{}: {}", path.display(), best.reason);
        said.push(path.to_owned());
        record_engine(path, &best);
    }
    Ok(best.transport)
}

/// Opens `path` for one submitting thread with up to `depth` commands in
/// flight: the io_uring sg engine where it works, else synchronous SG_IO;
/// says which on stderr and why.
pub fn open_engine(path: &Path, depth: usize) -> Result<Box<dyn Transport>> {
    if !path.exists() {
        bail!("{}: no such device", path.display());
    }
    let best = scsi::open_best(path, depth).with_context(|| {
        format!(
            "cannot open {} as a SCSI generic device (use a /dev/sgN path; `stp probe` lists them)",
            path.display()
        )
    })?;
    eprintln!("{}: {}", path.display(), best.reason);
    record_engine(path, &best);
    Ok(best.transport)
}

/// Which SCSI engine drove a path, and why (`engines` in the JSON).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct EngineUsed {
    /// The device path given.
    pub path: String,
    /// `bsg`, `sg` or `sync`.
    pub engine: String,
    /// Why this engine (what was probed, what was not usable).
    pub reason: String,
}

static ENGINES: std::sync::Mutex<Vec<EngineUsed>> = std::sync::Mutex::new(Vec::new());

fn record_engine(path: &Path, best: &scsi::BestPath) {
    tracing::info!(path = %path.display(), engine = %best.engine, "SCSI engine: {}", best.reason);
    let mut e = ENGINES.lock().unwrap_or_else(|e| e.into_inner());
    let path = path.display().to_string();
    if !e.iter().any(|u| u.path == path) {
        e.push(EngineUsed {
            path,
            engine: best.engine.name().into(),
            reason: best.reason.clone(),
        });
    }
}

/// Options of `stp bench`.
#[derive(Args, Debug)]
#[command(
    after_help = "Run `stp bench <MODE> --help` for each mode's options and defaults.\n\
Latency percentiles come from an HDR histogram (3 significant digits); CPU is\n\
getrusage(RUSAGE_SELF) user+sys of this whole process per GB moved; with\n\
`stp --sim` the simulated array's share (timed by the thread CPU clock around\n\
its command execution) is reported apart and not counted in CPU-s/GB."
)]
pub struct BenchArgs {
    /// Boxed: the modes' options are large, and `stp`'s other commands small.
    #[command(subcommand)]
    mode: Box<Mode>,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// READ/WRITE straight at LUNs (devices or --sim), pipelined to --depth.
    Raw(raw::RawArgs),
    /// One-way goodput or ping-pong latency over an STP connection between
    /// two hosts through the array (vendor or block mode).
    Stp(net::StpArgs),
    /// The same goodput or ping-pong over TCP on loopback.
    Tcp(net::TcpArgs),
    /// Run several modes in one go and print their ratios.
    Compare(CompareArgs),
    /// One-core throughput of each per-byte frame protection candidate
    /// (CRC32C, keyed BLAKE3, AES-256-GCM, ChaCha20-Poly1305, GMAC) and of
    /// STP v1's and v2's per-side work.
    Protection(protection::ProtectionArgs),
    /// Turn a directory of bench and fio JSON results (scripts/bench-lio)
    /// into a table of ratios and one JSON report.
    Report(report::ReportArgs),
    /// The load curve: find the maximum rate (closed loop), then run at
    /// 10 %, 20 % ... 100 % of it and plot latency against achieved IOPS.
    Curve(curve::CurveArgs),
    /// Two `--json` reports side by side, with ratios; differences beyond
    /// the spread of their rounds are marked.
    Diff(diff::DiffArgs),
    /// Run the `raw` or `curve` job a TOML file describes (its keys are
    /// the mode's long options).
    Job(job::JobArgs),
}

/// Output options shared by every mode.
#[derive(Args, Debug, Clone, Default)]
pub struct OutArgs {
    /// Print one JSON document on stdout (implies no progress line).
    #[arg(long)]
    pub json: bool,
    /// No progress line and no notes on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Write the latency distribution here in HdrHistogram's .hgrm text format.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
    /// Write a latency-by-percentile plot here (SVG).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

impl OutArgs {
    /// True when stderr should carry nothing but errors.
    pub fn silent(&self) -> bool {
        self.json || self.quiet
    }
}

/// CPU cost of a run.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Cpu {
    /// User seconds (the whole process).
    pub user_s: f64,
    /// System seconds (the whole process).
    pub sys_s: f64,
    /// Counted CPU seconds per 10^9 bytes moved: what `counted` says.
    pub s_per_gb: f64,
    /// What `s_per_gb` counts: `process` (user + sys of the whole process)
    /// or `host ends` (the process minus the simulated array's execution,
    /// with `stp --sim`).
    pub counted: &'static str,
    /// With the in-process array: the CPU seconds its command execution
    /// took on the hosts' threads (reported apart, not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub array_s: Option<f64>,
    /// With the in-process array: the whole process's (user + sys) seconds
    /// per 10^9 bytes, the array included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process_s_per_gb: Option<f64>,
}

/// What the counted CPU is when the simulated array is taken out.
pub const HOST_ENDS: &str = "host ends";

/// The data path's structure during a run, from `stp_core::counters`
/// (process-wide, so both ends of an in-process connection): what the
/// stack did per payload byte, counted where it happened.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Datapath {
    /// Payload bytes writers handed to the stack.
    pub send_payload_bytes: u64,
    /// Payload bytes delivered to readers.
    pub recv_payload_bytes: u64,
    /// Copies per payload byte on the sending side.
    pub send_copies_per_byte: f64,
    /// Copies per payload byte on the receiving side.
    pub recv_copies_per_byte: f64,
    /// Protection passes (seal) per payload byte on the sending side.
    pub send_protection_passes_per_byte: f64,
    /// Protection passes (open) per payload byte on the receiving side.
    pub recv_protection_passes_per_byte: f64,
    /// SEND commands streams submitted.
    pub sends_submitted: u64,
    /// SENDs whose first frame is DATA (the rest carry acknowledgements).
    pub data_sends_submitted: u64,
    /// Mean SENDs in flight on a member LUN when a SEND carrying DATA was
    /// submitted (itself included).
    pub mean_sends_in_flight_per_lun: f64,
    /// The most SENDs of one stream in flight on one member LUN at once
    /// (a gauge: the most since the process started).
    pub sends_in_flight_per_lun_max: u64,
    /// Times a stream handed frames to its sender.
    pub flushes: u64,
    /// Condition-variable wake-ups issued per flush.
    pub wakeups_per_flush: f64,
    /// DATA frames re-sent from their sealed buffer.
    pub resent_sealed_frames: u64,
    /// DATA frames sealed on the process's sealing threads rather than the
    /// writer's.
    pub sealed_in_pool_frames: u64,
    /// The process's sealing threads (`stp_core::sealers`).
    pub sealing_threads: u64,
    /// Frames the receive pumps took off the array for no live connection
    /// (a port closed meanwhile, another connection id) and dropped.
    pub dropped_no_connection_frames: u64,
    /// Frames connections dropped for lying beyond the credit they
    /// advertised.
    pub dropped_above_window_frames: u64,
    /// Frames connections dropped because they failed to open (damaged,
    /// forged or replayed from another connection on the SAN).
    pub dropped_unauthentic_frames: u64,
}

impl Datapath {
    /// The figures of the counters' difference `d` (`later.since(&earlier)`).
    pub fn of(d: &stp_core::counters::Snapshot) -> Datapath {
        Datapath {
            send_payload_bytes: d.send_payload_bytes,
            recv_payload_bytes: d.recv_payload_bytes,
            send_copies_per_byte: d.send_copies_per_byte(),
            recv_copies_per_byte: d.recv_copies_per_byte(),
            send_protection_passes_per_byte: d.send_protect_per_byte(),
            recv_protection_passes_per_byte: d.recv_protect_per_byte(),
            sends_submitted: d.sends_submitted,
            data_sends_submitted: d.data_sends_submitted,
            mean_sends_in_flight_per_lun: d.mean_sends_in_flight(),
            sends_in_flight_per_lun_max: d.sends_in_flight_per_lun_max,
            flushes: d.flushes,
            wakeups_per_flush: d.wakeups_per_flush(),
            resent_sealed_frames: d.resent_sealed,
            sealed_in_pool_frames: d.sealed_in_pool,
            sealing_threads: stp_core::sealers::parallelism() as u64,
            dropped_no_connection_frames: d.recv_dropped_no_connection,
            dropped_above_window_frames: d.recv_dropped_above_window,
            dropped_unauthentic_frames: d.recv_dropped_unauthentic,
        }
    }

    fn print_text(&self) {
        println!(
            "  datapath    copies/B send {:.3} recv {:.3}; protection passes/B send {:.3} recv {:.3}",
            self.send_copies_per_byte,
            self.recv_copies_per_byte,
            self.send_protection_passes_per_byte,
            self.recv_protection_passes_per_byte
        );
        println!(
            "              SENDs in flight per LUN mean {:.2} max {}; wake-ups/flush {:.2}; re-sent sealed frames {}",
            self.mean_sends_in_flight_per_lun,
            self.sends_in_flight_per_lun_max,
            self.wakeups_per_flush,
            self.resent_sealed_frames
        );
        println!(
            "              frames sealed on the {} sealing thread(s): {}",
            self.sealing_threads, self.sealed_in_pool_frames
        );
        println!(
            "              frames dropped on receipt: for no live connection {}, beyond the credit {}, failing to open (damaged or forged) {}",
            self.dropped_no_connection_frames,
            self.dropped_above_window_frames,
            self.dropped_unauthentic_frames
        );
    }
}

/// The memory N idle connections cost, beyond the process's shared pools.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct IdleMemory {
    /// Idle connections open while measured (both ends in this process).
    pub connections: u64,
    /// Resident set growth (/proc/self/statm) from before they were opened
    /// to when all were open and idle, bytes.
    pub rss_delta_bytes: i64,
    /// Bytes of the shared buffer pool's free (already resident) buffers
    /// the idle connections took (their RECEIVE buffers), bytes.
    pub pool_bytes_taken: i64,
    /// (rss_delta_bytes + pool_bytes_taken) / connections: both ends.
    pub per_connection_bytes: f64,
    /// Half of that: one end (one host's stream).
    pub per_end_bytes: f64,
    /// Threads the connections added, per connection (both ends).
    pub threads_per_connection: f64,
}

/// What N concurrent connections did (`stp bench stp --connections N`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Connections {
    /// Connections on the one STG between the two hosts.
    pub count: u64,
    /// Payload bytes each moved (goodput), or round trips each made (rtt).
    pub each: u64,
    /// Each connection's own rate, MB/s, in the order they were opened.
    pub mb_per_s: Vec<f64>,
    /// The slowest connection's rate, MB/s.
    pub slowest_mb_per_s: f64,
    /// The fastest connection's rate, MB/s.
    pub fastest_mb_per_s: f64,
    /// slowest / fastest.
    pub slowest_over_fastest: f64,
    /// The idle connections' memory, measured before the transfer.
    pub idle: IdleMemory,
}

impl Connections {
    fn print_text(&self) {
        println!(
            "  connections {}: per connection MB/s slowest {:.1} fastest {:.1} (slowest/fastest {:.2})",
            self.count, self.slowest_mb_per_s, self.fastest_mb_per_s, self.slowest_over_fastest
        );
        let i = &self.idle;
        println!(
            "  idle memory {} idle connections: RSS +{} and {} of pooled buffers taken: {} per connection ({} per end), {:.1} threads per connection",
            i.connections,
            units::human_bytes(i.rss_delta_bytes.max(0) as u64),
            units::human_bytes(i.pool_bytes_taken.max(0) as u64),
            units::human_bytes(i.per_connection_bytes.max(0.0) as u64),
            units::human_bytes(i.per_end_bytes.max(0.0) as u64),
            i.threads_per_connection
        );
    }
}

/// Block mode's lanes over a run (both hosts), and what they cost idle.
#[derive(Serialize, Debug, Clone)]
pub struct BlockFigures {
    /// READ and WRITE commands issued during the run.
    pub commands: u64,
    /// Poll rounds.
    pub polls: u64,
    /// Slots written and published.
    pub slots_written: u64,
    /// Slots consumed.
    pub slots_read: u64,
    /// Of those, short slots a probe took before their producer block
    /// announced them.
    pub slots_probed: u64,
    /// Probe READs issued, `slots_probed` of them finding a message.
    pub probes: u64,
    /// Bytes READ from slots per byte the slots used (1.0: nothing read
    /// that did not carry frames; a whole 1 MiB slot read for 200 KiB of
    /// frames costs 5).
    pub slot_reads_per_byte: Option<f64>,
    /// Slots that failed their checks (torn or forged; never delivered).
    pub bad_slots: u64,
    /// Index blocks read with a bad CRC, magic or count (ignored).
    pub bad_index_blocks: u64,
    /// Times a consumer stopped waiting for a member's turn.
    pub turn_skips: u64,
    /// Times a sender found a ring full.
    pub ring_full_waits: u64,
    /// Doorbells rung (datagrams sent after a quiet spell, or after every
    /// send where replies are rung).
    pub doorbells_rung: u64,
    /// A probe READ's cost in µs, averaged, the larger of the two hosts'
    /// (0: none measured).
    pub probe_read_us: u64,
    /// Whether either host waited for rung replies rather than probing for
    /// them (doorbells, probes at least `ring_replies_above`, the peer's
    /// rings heard).
    pub replies_rung: bool,
    /// How long the STG was left idle after the run (0: not measured).
    pub idle_seconds: f64,
    /// Commands per second per lane while idle (the polling's cost to the
    /// array).
    pub idle_commands_per_sec_per_lane: Option<f64>,
    /// Then one 64-byte message, send to receipt, in ms.
    pub first_after_idle_ms: Option<f64>,
    /// Whether that message rang the receiver's doorbell.
    pub first_after_idle_rang: Option<bool>,
}

impl BlockFigures {
    fn print_text(&self) {
        println!(
            "  block       {} commands, {} polls; slots written {} read {} (probed {} in {} probes; {} bytes read per byte used); bad slots {}, bad index blocks {}, turn skips {}, ring full {}, doorbells rung {}; probe {} µs, replies {}",
            self.commands,
            self.polls,
            self.slots_written,
            self.slots_read,
            self.slots_probed,
            self.probes,
            self.slot_reads_per_byte
                .map_or_else(|| "-".to_string(), |r| format!("{r:.2}")),
            self.bad_slots,
            self.bad_index_blocks,
            self.turn_skips,
            self.ring_full_waits,
            self.doorbells_rung,
            self.probe_read_us,
            if self.replies_rung { "rung" } else { "probed for" }
        );
        if let Some(r) = self.idle_commands_per_sec_per_lane {
            println!(
                "  idle cost   {r:.1} commands/s per lane (STG open, no traffic, polling gone idle, over {:.1} s)",
                self.idle_seconds
            );
        }
        if let Some(ms) = self.first_after_idle_ms {
            println!(
                "  after idle  the next 64 B message arrived in {ms:.2} ms ({})",
                if self.first_after_idle_rang == Some(true) {
                    "it rang the receiver's doorbell"
                } else {
                    "no doorbell: the receiver's next idle poll found it"
                }
            );
        }
    }
}

/// What a `--verify` run checked.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Verified {
    /// Bytes compared against the pattern.
    pub bytes: u64,
    /// Mismatches (a mismatch fails the run, so a report carries 0).
    pub errors: u64,
}

/// The result of one run.
#[derive(Serialize, Debug)]
pub struct Report {
    /// [`SCHEMA`].
    pub schema: u32,
    /// `raw`, `stp` or `tcp`.
    pub mode: String,
    /// What ran: the raw pattern, or `goodput` / `rtt`.
    pub test: String,
    /// The transport underneath.
    pub transport: String,
    /// Every path used, as its transport describes itself.
    pub paths: Vec<String>,
    /// Device runs: the SCSI engine of each device path, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<EngineUsed>,
    /// The run's settings.
    pub params: serde_json::Value,
    /// Operations timed (commands, writes, round trips).
    pub ops: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Operations per second.
    pub iops: f64,
    /// Payload megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// CPU cost.
    pub cpu: Cpu,
    /// Latency per operation, microseconds.
    pub latency_us: Percentiles,
    /// Present with --verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verified>,
    /// STP runs: the data path's structural counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datapath: Option<Datapath>,
    /// STP runs with `--connections`: per-connection figures and idle
    /// memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
    /// Block-mode STP runs: the lanes' counters and idle cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockFigures>,
    /// Fixed-rate runs (`--rate`): latency from each command's intended
    /// issue time to its completion, µs (corrected for coordinated
    /// omission); `latency_us` is then the service time alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_latency_us: Option<Percentiles>,
    /// Fixed-rate runs: the rate asked for and how far issuing fell behind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fixed_rate: Option<FixedRate>,
    /// Mixed read/write runs: the reads alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<Figures>,
    /// Mixed read/write runs: the writes alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write: Option<Figures>,
    /// Runs on several paths: each path's own figures (the top level is
    /// their aggregate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceFigures>,
    /// Runs with a block-size mix (`--bssplit`): each size's own figures,
    /// all paths and both directions together.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sizes: Vec<SizeFigures>,
    /// Runs with `--rounds N`: every round's figures, their median and
    /// spread (the rest of the report is the median round's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounds: Option<Rounds>,
    /// The latency histogram, nanoseconds.
    #[serde(skip)]
    pub hist: Histogram<u64>,
    /// Fixed-rate runs: the corrected latency histogram, nanoseconds.
    #[serde(skip)]
    pub corrected_hist: Option<Histogram<u64>>,
    /// More distributions for the plot (reads and writes apart), ns.
    #[serde(skip)]
    pub plot_series: Vec<(String, Histogram<u64>)>,
    /// With `--log-interval`: the run's interval lines.
    #[serde(skip)]
    pub intervals: Vec<intervals::Line>,
}

/// Throughput and latency of part of a run (one direction, one path).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Figures {
    /// Commands completed.
    pub ops: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// Commands per second over the run's measured window.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Service time (submit to completion), µs.
    pub latency_us: Percentiles,
    /// Fixed-rate runs: from the intended issue time, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_latency_us: Option<Percentiles>,
}

impl Figures {
    /// Figures of `ops` commands moving `bytes` over `secs` seconds.
    pub fn new(
        ops: u64,
        bytes: u64,
        secs: f64,
        latency_us: Percentiles,
        corrected_latency_us: Option<Percentiles>,
    ) -> Figures {
        let secs = secs.max(1e-9);
        Figures {
            ops,
            bytes,
            iops: ops as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            latency_us,
            corrected_latency_us,
        }
    }

    fn line(&self, name: &str) -> String {
        let l = &self.latency_us;
        let mut s = format!(
            "  {name:<11} {:.1} MB/s, {:.0} ops/s; service µs p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            self.mb_per_s, self.iops, l.p50, l.p99, l.p999, l.max
        );
        if let Some(c) = &self.corrected_latency_us {
            s.push_str(&format!(
                "; from intended p50 {:.1}  p99 {:.1}  p99.9 {:.1}",
                c.p50, c.p99, c.p999
            ));
        }
        s
    }
}

/// One path's part of a run on several paths.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct DeviceFigures {
    /// The path, as its transport describes itself.
    pub path: String,
    /// Everything it did.
    #[serde(flatten)]
    pub all: Figures,
    /// Mixed runs: its reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<Figures>,
    /// Mixed runs: its writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write: Option<Figures>,
}

/// The commands of one size of a block-size mix.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SizeFigures {
    /// Bytes per command.
    pub bs: u64,
    /// What the commands of this size did.
    #[serde(flatten)]
    pub all: Figures,
}

/// What a fixed-rate (open-loop) run asked for and got.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct FixedRate {
    /// Commands per second asked for (`--rate`, all paths).
    pub target_iops: f64,
    /// Commands per second completed in the measured window.
    pub achieved_iops: f64,
    /// How late commands were submitted after they were due, µs: near
    /// zero while the array keeps up; large when every tag was busy (the
    /// array is slower than the rate, or stalled).
    pub issue_lag_us: Percentiles,
    /// Commands that fell due before the run's end but were never issued
    /// (every tag stayed busy: the rate is beyond what the LUN did at this
    /// depth; or the host itself could not issue them in time, starved of
    /// CPU). They are in no latency figure, so when this is not 0 the
    /// corrected tail understates what a client at this rate would see.
    pub not_issued: u64,
}

/// One figure over the rounds of a run.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Spread {
    /// The median (the lower middle one of an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// (max - min) / median: how far apart the rounds were, relative.
    pub spread: f64,
    /// Every round's value, in the order run.
    pub each: Vec<f64>,
}

impl Spread {
    /// The spread of `values` (empty: all zero).
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let median = v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0);
        let (min, max) = (
            v.first().copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0),
        );
        Spread {
            median,
            min,
            max,
            spread: if median > 0.0 {
                (max - min) / median
            } else {
                0.0
            },
            each: values.to_vec(),
        }
    }
}

/// The rounds of a `--rounds N` run.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Rounds {
    /// Rounds run.
    pub n: usize,
    /// Which round the report is (1-based): the one with the median MB/s.
    pub reported: usize,
    /// MB/s.
    pub mb_per_s: Spread,
    /// Commands per second.
    pub iops: Spread,
    /// Service time p50, µs.
    pub p50_us: Spread,
    /// Service time p99, µs.
    pub p99_us: Spread,
    /// Service time p99.9, µs.
    pub p999_us: Spread,
    /// Fixed-rate runs: corrected p99, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_p99_us: Option<Spread>,
    /// Fixed-rate runs: corrected p99.9, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_p999_us: Option<Spread>,
}

/// One report of several rounds of the same run: the round with the median
/// MB/s (the lower middle one of an even count), with every round's figures
/// in `rounds`. A single round comes back as it is.
pub fn with_rounds(mut reports: Vec<Report>) -> Report {
    if reports.len() <= 1 {
        if let Some(r) = reports.pop() {
            return r;
        }
    }
    let f = |g: &dyn Fn(&Report) -> f64| -> Spread {
        Spread::of(&reports.iter().map(g).collect::<Vec<_>>())
    };
    let corrected = reports.iter().all(|r| r.corrected_latency_us.is_some());
    let cf = |g: &dyn Fn(&Percentiles) -> f64| -> Option<Spread> {
        corrected.then(|| f(&|r: &Report| r.corrected_latency_us.as_ref().map_or(0.0, g)))
    };
    let mut order: Vec<usize> = (0..reports.len()).collect();
    order.sort_by(|&a, &b| reports[a].mb_per_s.total_cmp(&reports[b].mb_per_s));
    let pick = order[(order.len() - 1) / 2];
    let rounds = Rounds {
        n: reports.len(),
        reported: pick + 1,
        mb_per_s: f(&|r| r.mb_per_s),
        iops: f(&|r| r.iops),
        p50_us: f(&|r| r.latency_us.p50),
        p99_us: f(&|r| r.latency_us.p99),
        p999_us: f(&|r| r.latency_us.p999),
        corrected_p99_us: cf(&|p| p.p99),
        corrected_p999_us: cf(&|p| p.p999),
    };
    let mut r = reports.swap_remove(pick);
    r.rounds = Some(rounds);
    r
}

impl Report {
    /// Builds a report and derives its rates.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mode: &str,
        test: &str,
        transport: &str,
        paths: Vec<String>,
        params: serde_json::Value,
        ops: u64,
        bytes: u64,
        elapsed: Duration,
        cpu: CpuTime,
        hist: Histogram<u64>,
        verify: Option<Verified>,
    ) -> Report {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let cpu_total = cpu.user + cpu.sys;
        Report {
            schema: SCHEMA,
            mode: mode.into(),
            test: test.into(),
            transport: transport.into(),
            paths,
            engines: ENGINES.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            params,
            ops,
            bytes,
            seconds: secs,
            iops: ops as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            cpu: Cpu {
                user_s: cpu.user,
                sys_s: cpu.sys,
                s_per_gb: per_gb(cpu_total, bytes),
                counted: "process",
                array_s: None,
                process_s_per_gb: None,
            },
            latency_us: Percentiles::of(&hist),
            verify,
            datapath: None,
            connections: None,
            block: None,
            corrected_latency_us: None,
            fixed_rate: None,
            read: None,
            write: None,
            devices: Vec::new(),
            sizes: Vec::new(),
            rounds: None,
            hist,
            corrected_hist: None,
            plot_series: Vec::new(),
            intervals: Vec::new(),
        }
    }

    /// Takes the simulated array's CPU time (`array`, seconds, measured
    /// over the same window) out of the counted CPU and reports it apart.
    pub fn without_array_cpu(mut self, array: f64) -> Report {
        let process = self.cpu.user_s + self.cpu.sys_s;
        self.cpu.process_s_per_gb = Some(self.cpu.s_per_gb);
        self.cpu.array_s = Some(array);
        self.cpu.s_per_gb = per_gb((process - array).max(0.0), self.bytes);
        self.cpu.counted = HOST_ENDS;
        self
    }

    /// A short name for tables and plots.
    pub fn label(&self) -> String {
        format!("{} {} ({})", self.mode, self.test, self.transport)
    }

    fn print_text(&self) {
        let l = &self.latency_us;
        println!("{}", self.label());
        for p in &self.paths {
            println!("  path        {p}");
        }
        for e in &self.engines {
            println!("  engine      {} on {}: {}", e.engine, e.path, e.reason);
        }
        println!(
            "  moved       {} in {:.2} s: {:.1} MB/s, {:.0} ops/s",
            units::human_bytes(self.bytes),
            self.seconds,
            self.mb_per_s,
            self.iops
        );
        if let Some(c) = &self.corrected_latency_us {
            println!(
                "  latency µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={}; from the intended issue time, corrected for coordinated omission)",
                c.p50, c.p90, c.p99, c.p999, c.max, c.count
            );
            println!(
                "  service µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (submit to completion)",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        } else {
            println!(
                "  latency µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (n={})",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            );
        }
        if let Some(f) = &self.fixed_rate {
            println!(
                "  rate        asked {:.0}/s, achieved {:.0}/s; issue lag µs p50 {:.1}  p99 {:.1}  max {:.1}",
                f.target_iops, f.achieved_iops, f.issue_lag_us.p50, f.issue_lag_us.p99, f.issue_lag_us.max
            );
            if f.not_issued > 0 {
                println!(
                    "  NOT ISSUED  {} commands fell due but never went out (every tag stayed busy, or this host could not issue them in time): the tail above understates what this rate would see",
                    f.not_issued
                );
            }
        }
        if let Some(r) = &self.read {
            println!("{}", r.line("reads"));
        }
        if let Some(w) = &self.write {
            println!("{}", w.line("writes"));
        }
        for z in &self.sizes {
            println!(
                "{}",
                z.all.line(&format!("{} cmds", workload::short_size(z.bs)))
            );
        }
        for d in &self.devices {
            println!("{}", d.all.line("device"));
            println!("              {}", d.path);
            if let (Some(r), Some(w)) = (&d.read, &d.write) {
                println!("  {}", r.line("  reads"));
                println!("  {}", w.line("  writes"));
            }
        }
        if let Some(r) = &self.rounds {
            println!(
                "  rounds      {} (this is round {}, the median MB/s): MB/s median {:.1} min {:.1} max {:.1} (spread {:.1} %); p99 µs median {:.1} (spread {:.1} %)",
                r.n,
                r.reported,
                r.mb_per_s.median,
                r.mb_per_s.min,
                r.mb_per_s.max,
                100.0 * r.mb_per_s.spread,
                r.p99_us.median,
                100.0 * r.p99_us.spread
            );
        }
        match self.cpu.array_s {
            Some(array) => println!(
                "  cpu         user {:.2} s, sys {:.2} s, of which the simulated array {:.2} s: {:.2} CPU-s/GB host ends ({:.2} with the array; its threads reported apart, not counted)",
                self.cpu.user_s,
                self.cpu.sys_s,
                array,
                self.cpu.s_per_gb,
                self.cpu.process_s_per_gb.unwrap_or(0.0)
            ),
            None => println!(
                "  cpu         user {:.2} s, sys {:.2} s: {:.2} CPU-s/GB",
                self.cpu.user_s, self.cpu.sys_s, self.cpu.s_per_gb
            ),
        }
        if let Some(d) = &self.datapath {
            d.print_text();
        }
        if let Some(c) = &self.connections {
            c.print_text();
        }
        if let Some(b) = &self.block {
            b.print_text();
        }
        if let Some(v) = &self.verify {
            println!(
                "  verify      {} checked, {} errors",
                units::human_bytes(v.bytes),
                v.errors
            );
        }
    }
}

/// CPU seconds per 10^9 bytes.
fn per_gb(cpu_s: f64, bytes: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        cpu_s / (bytes as f64 / 1e9)
    }
}

/// STP against TCP on loopback, measured in the same run: the three ratios
/// the issue sets targets for, each with what its two numbers are.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct VsTcp {
    /// STP vendor goodput / TCP loopback goodput (higher is better).
    pub goodput: Option<f64>,
    /// CPU-s/GB of STP's host ends / TCP's (lower is better).
    pub cpu_s_per_gb: Option<f64>,
    /// STP round-trip p50 / TCP's, same message size (lower is better).
    pub rtt_p50: Option<f64>,
    /// What each ratio's numerator and reference are.
    pub references: String,
}

impl VsTcp {
    /// The ratios of the runs given (goodput runs, ping-pong runs).
    pub fn of(
        stp_goodput: Option<&Report>,
        tcp_goodput: Option<&Report>,
        stp_rtt: Option<&Report>,
        tcp_rtt: Option<&Report>,
    ) -> VsTcp {
        let goodput = stp_goodput.zip(tcp_goodput);
        let rtt = stp_rtt.zip(tcp_rtt);
        let mut refs = Vec::new();
        if let Some((s, t)) = goodput {
            refs.push(format!(
                "goodput: {} {:.1} MB/s / {} {:.1} MB/s",
                s.label(),
                s.mb_per_s,
                t.label(),
                t.mb_per_s
            ));
            refs.push(format!(
                "CPU: {:.2} CPU-s/GB ({}) / TCP {:.2} CPU-s/GB ({}, both ends and the kernel's loopback)",
                s.cpu.s_per_gb, s.cpu.counted, t.cpu.s_per_gb, t.cpu.counted
            ));
        }
        if let Some((s, t)) = rtt {
            let msg = |r: &Report| r.params.get("msg").and_then(|m| m.as_u64()).unwrap_or(0);
            refs.push(format!(
                "RTT: {} B p50 {:.1} µs / TCP {} B p50 {:.1} µs",
                msg(s),
                s.latency_us.p50,
                msg(t),
                t.latency_us.p50
            ));
        }
        VsTcp {
            goodput: goodput.map(|(s, t)| ratio(s.mb_per_s, t.mb_per_s)),
            cpu_s_per_gb: goodput.map(|(s, t)| ratio(s.cpu.s_per_gb, t.cpu.s_per_gb)),
            rtt_p50: rtt.map(|(s, t)| ratio(s.latency_us.p50, t.latency_us.p50)),
            references: refs.join("; "),
        }
    }

    /// One line: the ratios, then what each reference is.
    pub fn line(&self) -> String {
        let f = |x: Option<f64>| x.map_or("not run".to_string(), |x| format!("{x:.2}×"));
        format!(
            "vs TCP (same run): goodput {}, CPU-s/GB {}, RTT p50 {}  [{}]",
            f(self.goodput),
            f(self.cpu_s_per_gb),
            f(self.rtt_p50),
            self.references
        )
    }
}

/// Writes the `--hgrm` and `--plot` files for `reports`.
fn write_files(out: &OutArgs, title: &str, reports: &[&Report]) -> Result<()> {
    if let Some(path) = &out.hgrm {
        // One file; with several runs, one section per run.
        let mut text = String::new();
        for r in reports {
            if reports.len() > 1 {
                text.push_str(&format!("# {}\n", r.label()));
            }
            text.push_str(&hist::hgrm(&r.hist));
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &out.plot {
        let mut series = Vec::new();
        for r in reports {
            let name = if r.corrected_hist.is_some() {
                format!("{}: service time", r.label())
            } else {
                r.label()
            };
            series.push((name, distribution(&r.hist)));
            if let Some(h) = &r.corrected_hist {
                series.push((
                    format!("{}: from intended issue", r.label()),
                    distribution(h),
                ));
            }
            for (name, h) in &r.plot_series {
                series.push((format!("{}: {name}", r.label()), distribution(h)));
            }
        }
        std::fs::write(path, hist::svg(title, &series))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn emit(out: &OutArgs, report: &Report) -> Result<()> {
    write_files(
        out,
        &format!("{} latency by percentile", report.label()),
        &[report],
    )?;
    if out.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        report.print_text();
    }
    Ok(())
}

/// Options of `stp bench compare`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example: stp bench compare --modes raw,stp,tcp --bytes 64m\n\n\
raw writes --bytes sequentially in --bs commands to a simulated LUN (or the\n\
given --device); stp and tcp send --bytes one way (or ping-pong with --rtt).\n\
Ratios are against the first mode. With both stp and tcp, a last line gives STP\n\
against TCP in the same run (goodput, CPU-s/GB of the host ends, round-trip p50;\n\
without --rtt, --count ping-pongs of --msg bytes are run for the last)."
)]
pub struct CompareArgs {
    /// Modes to run, in order, comma-separated: raw, stp, tcp.
    #[arg(long, value_delimiter = ',', default_value = "raw,stp,tcp")]
    modes: Vec<CompareMode>,
    /// Bytes each mode moves.
    #[arg(long, default_value = "64m", value_parser = units::parse_nonzero_size)]
    bytes: u64,
    /// Bytes per raw command.
    #[arg(long, default_value = "1m", value_parser = units::parse_nonzero_size)]
    bs: u64,
    /// Raw commands in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    depth: u64,
    /// STP mailbox mode.
    #[arg(long, value_enum, default_value_t = net::MailboxMode::Vendor)]
    mode: net::MailboxMode,
    /// Compare ping-pong latency (--msg bytes each way) instead of goodput; raw
    /// then does 1-command-deep --msg-sized (rounded up to 512) writes.
    #[arg(long)]
    rtt: bool,
    /// Message size with --rtt.
    #[arg(long, default_value = "64", value_parser = units::parse_nonzero_size)]
    msg: u64,
    /// Round trips with --rtt.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Raw mode on this device instead of the simulated array (DESTROYS DATA).
    #[arg(long)]
    device: Option<PathBuf>,
    /// STP over real devices described by this map instead of the simulated array.
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
    /// Output options.
    #[command(flatten)]
    out: OutArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum CompareMode {
    Raw,
    Stp,
    Tcp,
}

/// One ratio between two runs.
#[derive(Serialize, Debug)]
struct Ratio {
    /// The run compared.
    of: String,
    /// The run it is compared with (the first).
    to: String,
    /// Throughput ratio.
    mb_per_s: f64,
    /// Median latency ratio.
    p50: f64,
    /// p99 latency ratio.
    p99: f64,
    /// CPU per GB ratio.
    cpu_s_per_gb: f64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn compare(args: &CompareArgs) -> Result<()> {
    if args.modes.is_empty() {
        bail!("--modes needs at least one of raw, stp, tcp");
    }
    let quiet_out = OutArgs {
        json: args.out.json,
        quiet: args.out.quiet,
        hgrm: None,
        plot: None,
    };
    // The STP and TCP runs measure the same thing the same way.
    let net_args = || net::NetArgs {
        bytes: args.bytes,
        chunk: 1 << 20,
        rtt: args.rtt,
        msg: args.msg,
        count: args.count,
        time: None,
        rate: None,
        curve: false,
        steps: Vec::new(),
        out: quiet_out.clone(),
    };
    let stp_args = |net: net::NetArgs| net::StpArgs {
        sim: args.map.is_none(),
        map: args.map.clone(),
        mode: args.mode,
        ..net::StpArgs::sim(net)
    };
    let mut reports = Vec::new();
    for m in &args.modes {
        let r = match m {
            CompareMode::Raw => {
                let (bs, depth) = if args.rtt {
                    (args.msg.div_ceil(512) * 512, 1)
                } else {
                    (args.bs, args.depth)
                };
                let bytes = if args.rtt {
                    bs * args.count
                } else {
                    args.bytes.div_ceil(bs) * bs
                };
                raw::run(&raw::RawArgs {
                    sim_lun_size: bytes.clamp(bs, 256 << 20),
                    size: Some(bytes),
                    out: quiet_out.clone(),
                    ..raw::RawArgs::new(
                        raw::Rw::Write,
                        bs,
                        depth,
                        args.device.iter().cloned().collect(),
                    )
                })?
            }
            CompareMode::Stp => net::run_stp(&stp_args(net_args()))?,
            CompareMode::Tcp => net::run_tcp(&net::TcpArgs { net: net_args() })?,
        };
        reports.push(r);
    }
    // Against TCP in the same run: goodput and CPU from the goodput runs,
    // the round trip from ping-pong runs (made here when the modes ran
    // goodput).
    let both = args.modes.contains(&CompareMode::Stp) && args.modes.contains(&CompareMode::Tcp);
    let mut rtt_runs = Vec::new();
    if both && !args.rtt {
        let rtt = || net::NetArgs {
            rtt: true,
            ..net_args()
        };
        rtt_runs.push(net::run_stp(&stp_args(rtt()))?);
        rtt_runs.push(net::run_tcp(&net::TcpArgs { net: rtt() })?);
    }
    fn find<'a>(v: &'a [Report], mode: &str) -> Option<&'a Report> {
        v.iter().find(|r| r.mode == mode)
    }
    let vs_tcp = both.then(|| {
        if args.rtt {
            VsTcp::of(None, None, find(&reports, "stp"), find(&reports, "tcp"))
        } else {
            VsTcp::of(
                find(&reports, "stp"),
                find(&reports, "tcp"),
                find(&rtt_runs, "stp"),
                find(&rtt_runs, "tcp"),
            )
        }
    });
    let base = &reports[0];
    let ratios: Vec<Ratio> = reports
        .iter()
        .skip(1)
        .map(|r| Ratio {
            of: r.label(),
            to: base.label(),
            mb_per_s: ratio(r.mb_per_s, base.mb_per_s),
            p50: ratio(r.latency_us.p50, base.latency_us.p50),
            p99: ratio(r.latency_us.p99, base.latency_us.p99),
            cpu_s_per_gb: ratio(r.cpu.s_per_gb, base.cpu.s_per_gb),
        })
        .collect();
    let refs: Vec<&Report> = reports.iter().collect();
    write_files(&args.out, "latency by percentile", &refs)?;
    if args.out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": SCHEMA,
                "runs": reports,
                "ratios": ratios,
                "rtt_runs": rtt_runs,
                "vs_tcp": vs_tcp,
            }))?
        );
        return Ok(());
    }
    for r in &reports {
        r.print_text();
    }
    println!();
    let w = reports.iter().map(|r| r.label().len()).max().unwrap_or(3);
    println!(
        "{:<w$} {:>10} {:>10} {:>10} {:>10}   {:>8} {:>8} {:>8}",
        "run", "MB/s", "p50 µs", "p99 µs", "CPU-s/GB", "×MB/s", "×p50", "×CPU"
    );
    for r in &reports {
        println!(
            "{:<w$} {:>10.1} {:>10.1} {:>10.1} {:>10.2}   {:>8.2} {:>8.2} {:>8.2}",
            r.label(),
            r.mb_per_s,
            r.latency_us.p50,
            r.latency_us.p99,
            r.cpu.s_per_gb,
            ratio(r.mb_per_s, base.mb_per_s),
            ratio(r.latency_us.p50, base.latency_us.p50),
            ratio(r.cpu.s_per_gb, base.cpu.s_per_gb),
        );
    }
    println!("(ratios against {})", base.label());
    for r in &rtt_runs {
        println!(
            "{}: p50 {:.1} µs, p99 {:.1} µs ({} B messages)",
            r.label(),
            r.latency_us.p50,
            r.latency_us.p99,
            args.msg
        );
    }
    if let Some(v) = &vs_tcp {
        println!("{}", v.line());
    }
    Ok(())
}

/// Runs `stp bench`.
pub fn run(args: &BenchArgs) -> Result<ExitCode> {
    match args.mode.as_ref() {
        Mode::Raw(a) => emit(&a.out, &raw::run(a)?)?,
        Mode::Stp(a) if a.net.curve => net::curve_stp(a)?,
        Mode::Tcp(a) if a.net.curve => net::curve_tcp(a)?,
        Mode::Stp(a) => emit(&a.net.out, &net::run_stp(a)?)?,
        Mode::Tcp(a) => emit(&a.net.out, &net::run_tcp(a)?)?,
        Mode::Compare(a) => compare(a)?,
        Mode::Protection(a) => protection::run(a)?,
        Mode::Report(a) => report::run(a)?,
        Mode::Curve(a) => curve::run(a)?,
        Mode::Diff(a) => return diff::run(a),
        Mode::Job(a) => return job::run(a),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.bench)
    }

    #[test]
    fn raw_arguments() {
        let a = parse(&[
            "raw",
            "--sim",
            "--bs",
            "1m",
            "--depth",
            "8",
            "--rw",
            "randwrite",
            "--time",
            "2s",
        ])
        .unwrap();
        let Mode::Raw(r) = *a.mode else { panic!() };
        assert_eq!(r.bs, 1 << 20);
        assert_eq!(r.depth, 8);
        assert_eq!(r.rw, raw::Rw::Randwrite);
        assert_eq!(r.time, Some(Duration::from_secs(2)));
        let a = parse(&["raw", "/dev/sg1", "/dev/sg2", "--size", "4g", "--json"]).unwrap();
        let Mode::Raw(r) = *a.mode else { panic!() };
        assert_eq!(r.devices.len(), 2);
        assert_eq!(r.size, Some(4 << 30));
        assert_eq!(r.rw, raw::Rw::Randread);
        assert!(r.out.json && r.out.silent());
        for bad in [
            &["raw", "--sim", "--bs", "0"][..],
            &["raw", "--sim", "--depth", "0"],
            &["raw", "--sim", "--rw", "sideways"],
            &["raw", "--sim", "--time", "10s", "--size", "1g"],
            &["raw", "--sim", "--time", "0s"],
            &["raw", "--sim", "--bs", "4q"],
            &["raw", "--sim", "--rwmix", "101"],
            &["raw", "--sim", "--bssplit", "4k/x"],
            &["raw", "--sim", "--bs", "8k", "--bssplit", "4k/100"],
            &["raw", "--sim", "--rate", "0"],
            &["raw", "--sim", "--ramp", "1s", "--size", "1g"],
            &["raw", "/dev/sg1", "--sim-stall", "1s@5"],
            &["raw", "--sim", "--log-interval", "1s"],
            &["raw", "--sim", "--log-file", "x.jsonl"],
            &["raw", "--sim", "--rounds", "0"],
            &["raw", "--sim", "--rw", "randrw", "--rwmix", "seventy"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let a = parse(&[
            "raw",
            "--sim",
            "--rw",
            "randrw",
            "--rwmix",
            "70",
            "--bssplit",
            "4k/60,64k/30,1m/10",
            "--ramp",
            "2s",
            "--time",
            "10s",
            "--rate",
            "20k",
            "--rounds",
            "3",
            "--log-interval",
            "1s",
            "--log-file",
            "i.jsonl",
            "--sim-stall",
            "100ms@500",
            "--sim-paths",
            "2",
        ])
        .unwrap();
        let Mode::Raw(r) = *a.mode else { panic!() };
        assert_eq!((r.rw, r.rwmix), (raw::Rw::Randrw, 70));
        assert_eq!(r.split().max(), 1 << 20);
        assert_eq!(r.ramp, Some(Duration::from_secs(2)));
        assert_eq!(r.rate, Some(20_000.0));
        assert_eq!((r.rounds, r.sim_paths), (3, 2));
        assert_eq!(r.log_interval, Some(Duration::from_secs(1)));
        assert_eq!(r.sim_stall.unwrap().after, 500);
        let a = parse(&["raw", "--sim", "--rw", "rw"]).unwrap();
        let Mode::Raw(r) = *a.mode else { panic!() };
        assert_eq!((r.rw, r.rwmix), (raw::Rw::Readwrite, 50));
    }

    #[test]
    fn curve_and_diff_arguments() {
        let a = parse(&["curve", "--sim", "--steps", "25,50,100", "--time", "1s"]).unwrap();
        let Mode::Curve(c) = *a.mode else { panic!() };
        assert_eq!(c.steps, [25, 50, 100]);
        assert!(c.raw.sim);
        let a = parse(&["curve", "--sim"]).unwrap();
        let Mode::Curve(c) = *a.mode else { panic!() };
        assert_eq!(c.steps, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        for bad in [
            &["curve", "--sim", "--steps", "0"][..],
            &["curve", "--sim", "--steps", "101"],
            &["curve", "--sim", "--steps", "ten"],
            &["diff", "a.json"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let a = parse(&["diff", "a.json", "b.json", "--json"]).unwrap();
        let Mode::Diff(d) = *a.mode else { panic!() };
        assert!(d.json && d.a.ends_with("a.json"));
    }

    #[test]
    fn net_arguments() {
        let a = parse(&["stp", "--sim", "--rtt", "--msg", "64", "--mode", "block"]).unwrap();
        let Mode::Stp(s) = *a.mode else { panic!() };
        assert!(s.net.rtt && s.sim);
        assert_eq!(s.net.msg, 64);
        assert_eq!(s.mode, net::MailboxMode::Block);
        let a = parse(&["tcp", "--bytes", "8m"]).unwrap();
        let Mode::Tcp(t) = *a.mode else { panic!() };
        assert_eq!(t.net.bytes, 8 << 20);
        assert!(parse(&["stp", "--sim", "--map", "x.json"]).is_err());
        assert!(parse(&["stp", "--sim", "--mode", "carrier-pigeon"]).is_err());
        assert!(parse(&["tcp", "--msg", "0"]).is_err());
        // A fixed rate is for ping-pong.
        assert!(parse(&["tcp", "--rate", "1000"]).is_err());
        assert!(parse(&["stp", "--sim", "--rtt", "--rate", "0"]).is_err());
        let a = parse(&["stp", "--sim", "--rtt", "--rate", "2k", "--time", "1s"]).unwrap();
        let Mode::Stp(s) = *a.mode else { panic!() };
        assert_eq!(s.net.rate, Some(2000.0));
        // The ping-pong curve: timed points, no fixed --rate of its own.
        let a = parse(&[
            "tcp", "--rtt", "--curve", "--time", "1s", "--steps", "50,100",
        ])
        .unwrap();
        let Mode::Tcp(t) = *a.mode else { panic!() };
        assert!(t.net.curve);
        assert_eq!(t.net.steps, [50, 100]);
        for bad in [
            &["tcp", "--rtt", "--curve"][..],
            &["tcp", "--curve", "--time", "1s"],
            &["tcp", "--rtt", "--curve", "--time", "1s", "--rate", "100"],
            &["tcp", "--rtt", "--curve", "--time", "1s", "--steps", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let a = parse(&["compare", "--modes", "tcp,raw"]).unwrap();
        let Mode::Compare(c) = *a.mode else { panic!() };
        assert_eq!(c.modes, [CompareMode::Tcp, CompareMode::Raw]);
        assert!(parse(&["compare", "--modes", "raw,udp"]).is_err());
    }

    #[test]
    fn stp_protection_and_connections() {
        use stp_core::frame::Protection;
        let a = parse(&["stp", "--sim"]).unwrap();
        let Mode::Stp(s) = *a.mode else { panic!() };
        assert_eq!(s.protection, Protection::Encrypt);
        assert_eq!(s.connections, None);
        let a = parse(&[
            "stp",
            "--sim",
            "--protection",
            "blake3-auth",
            "--connections",
            "64",
        ])
        .unwrap();
        let Mode::Stp(s) = *a.mode else { panic!() };
        assert_eq!(s.protection, Protection::Authenticate);
        assert_eq!(s.connections, Some(64));
        let a = parse(&["stp", "--sim", "--protection", "aes-256-gcm"]).unwrap();
        let Mode::Stp(s) = *a.mode else { panic!() };
        assert_eq!(s.protection, Protection::Encrypt);
        for bad in [
            &["stp", "--sim", "--protection", "rot13"][..],
            &["stp", "--sim", "--protection", ""],
            &["stp", "--sim", "--connections", "0"],
            &["stp", "--sim", "--connections", "many"],
            &["stp", "--sim", "--connections", "1025"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = net::parse_protection("rot13").unwrap_err();
        assert!(
            e.contains("aes-256-gcm") && e.contains("blake3-auth"),
            "{e}"
        );
    }

    fn report(mode: &str, mb: f64, cpu: f64, p50_us: u64) -> Report {
        let mut h = hist::new_histogram();
        hist::record(&mut h, Duration::from_micros(p50_us));
        Report::new(
            mode,
            "goodput",
            "t",
            vec!["p".into()],
            serde_json::json!({"msg": 64}),
            1,
            1_000_000_000,
            Duration::from_secs_f64(1e3 / mb),
            CpuTime {
                user: cpu,
                sys: 0.0,
            },
            h,
            None,
        )
    }

    #[test]
    fn array_cpu_is_reported_apart() {
        let r = report("stp", 1000.0, 3.0, 10).without_array_cpu(1.0);
        assert_eq!(r.cpu.counted, HOST_ENDS);
        assert!((r.cpu.s_per_gb - 2.0).abs() < 1e-9);
        assert_eq!(r.cpu.process_s_per_gb, Some(3.0));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["cpu"]["array_s"], 1.0);
        assert_eq!(v["cpu"]["counted"], "host ends");
        let plain = serde_json::to_value(report("tcp", 1.0, 1.0, 1)).unwrap();
        assert_eq!(plain["cpu"]["counted"], "process");
        assert!(plain["cpu"].get("array_s").is_none());
        assert!(plain.get("datapath").is_none() && plain.get("connections").is_none());
    }

    #[test]
    fn vs_tcp_ratios_say_what_they_are() {
        let (s, t) = (
            report("stp", 500.0, 2.0, 30),
            report("tcp", 1000.0, 1.0, 10),
        );
        let v = VsTcp::of(Some(&s), Some(&t), Some(&s), Some(&t));
        assert!((v.goodput.unwrap() - 0.5).abs() < 1e-6);
        assert!((v.cpu_s_per_gb.unwrap() - 2.0).abs() < 1e-6);
        assert!((v.rtt_p50.unwrap() - 3.0).abs() < 0.01);
        let line = v.line();
        assert!(line.contains("0.50×") && line.contains("2.00×"), "{line}");
        assert!(line.contains("64 B") && line.contains("MB/s"), "{line}");
        let none = VsTcp::of(None, None, Some(&s), Some(&t));
        assert_eq!((none.goodput, none.cpu_s_per_gb), (None, None));
        assert!(none.line().contains("goodput not run"), "{}", none.line());
    }

    #[test]
    fn protection_arguments() {
        let a = parse(&["protection"]).unwrap();
        let Mode::Protection(p) = *a.mode else {
            panic!()
        };
        assert_eq!((p.size, p.seconds, p.rounds), (1 << 20, 1.0, 3));
        assert!(p.cases.is_empty() && !p.json);
        let a = parse(&[
            "protection",
            "--size",
            "64k",
            "--seconds",
            "0.25",
            "--rounds",
            "5",
            "--cases",
            "memcpy,aes256gcm-open,stp-v2-send,stp-v1-send,chacha20poly1305-seal",
            "--json",
        ])
        .unwrap();
        let Mode::Protection(p) = *a.mode else {
            panic!()
        };
        assert_eq!((p.size, p.seconds, p.rounds), (64 << 10, 0.25, 5));
        assert_eq!(
            p.cases,
            [
                protection::Case::Memcpy,
                protection::Case::Aes256GcmOpen,
                protection::Case::StpV2Send,
                protection::Case::StpV1Send,
                protection::Case::Chacha20Poly1305Seal
            ]
        );
        assert!(p.json);
        for c in protection::Case::ALL {
            let a = parse(&["protection", "--cases", c.name()]).unwrap();
            let Mode::Protection(p) = *a.mode else {
                panic!()
            };
            assert_eq!(p.cases, [c], "{}", c.name());
        }
        for bad in [
            &["protection", "--size", "0"][..],
            &["protection", "--size", "2m"],
            &["protection", "--seconds", "0"],
            &["protection", "--seconds", "-1"],
            &["protection", "--rounds", "0"],
            &["protection", "--cases", "rot13"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn unopenable_paths_are_errors() {
        let e = open_path(Path::new("/nonexistent/sg9")).err().unwrap();
        assert!(e.to_string().contains("no such device"), "{e}");
        let e = open_path(Path::new("/dev/null")).err().unwrap();
        assert!(format!("{e:#}").contains("SCSI generic"), "{e:#}");
    }

    #[test]
    fn json_schema() {
        let mut h = hist::new_histogram();
        for us in [10u64, 20, 30, 400] {
            hist::record(&mut h, Duration::from_micros(us));
        }
        let r = Report::new(
            "raw",
            "randread",
            "in-process",
            vec!["lun 0".into()],
            serde_json::json!({"bs": 4096}),
            4,
            4 * 4096,
            Duration::from_millis(10),
            CpuTime {
                user: 0.01,
                sys: 0.0,
            },
            h,
            None,
        );
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for key in [
            "schema",
            "mode",
            "test",
            "transport",
            "paths",
            "params",
            "ops",
            "bytes",
            "seconds",
            "iops",
            "mb_per_s",
            "cpu",
            "latency_us",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert!(v.get("verify").is_none());
        assert!(v.get("hist").is_none());
        assert!(v.get("datapath").is_none());
        assert_eq!(v["schema"], SCHEMA);
        assert!((v["iops"].as_f64().unwrap() - 400.0).abs() < 1.0);
        assert!((v["mb_per_s"].as_f64().unwrap() - 1.6384).abs() < 0.01);
        for key in ["user_s", "sys_s", "s_per_gb"] {
            assert!(v["cpu"][key].is_number(), "cpu.{key}");
        }
        let l = &v["latency_us"];
        for key in ["count", "min", "mean", "p50", "p90", "p99", "p999", "max"] {
            assert!(l[key].is_number(), "latency_us.{key}");
        }
        assert!(l["p50"].as_f64() <= l["p99"].as_f64());
        assert!(l["p99"].as_f64() <= l["max"].as_f64());
        assert!((l["max"].as_f64().unwrap() - 400.0).abs() < 1.0);
    }

    #[test]
    fn datapath_and_connections_json() {
        let mut d = stp_core::counters::Snapshot::default();
        d.send_payload_bytes = 1000;
        d.send_copy_bytes = 1000;
        d.send_protect_bytes = 1000;
        d.recv_payload_bytes = 1000;
        d.recv_copy_bytes = 500;
        d.recv_protect_bytes = 1010;
        d.sends_submitted = 5;
        d.data_sends_submitted = 4;
        d.sends_in_flight_sum = 6;
        d.sends_in_flight_per_lun_max = 3;
        d.flushes = 2;
        d.wakeups = 3;
        d.resent_sealed = 1;
        d.recv_dropped_no_connection = 2;
        d.recv_dropped_above_window = 7;
        d.recv_dropped_unauthentic = 4;
        let mut r = report("stp", 1.0, 1.0, 1);
        r.datapath = Some(Datapath::of(&d));
        r.connections = Some(Connections {
            count: 2,
            each: 10,
            mb_per_s: vec![1.0, 2.0],
            slowest_mb_per_s: 1.0,
            fastest_mb_per_s: 2.0,
            slowest_over_fastest: 0.5,
            idle: IdleMemory {
                connections: 2,
                rss_delta_bytes: 4096,
                pool_bytes_taken: 0,
                per_connection_bytes: 2048.0,
                per_end_bytes: 1024.0,
                threads_per_connection: 12.0,
            },
        });
        let v = serde_json::to_value(&r).unwrap();
        let p = &v["datapath"];
        let f = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("datapath.{k}"));
        assert_eq!(f("send_copies_per_byte"), 1.0);
        assert_eq!(f("recv_copies_per_byte"), 0.5);
        assert_eq!(f("send_protection_passes_per_byte"), 1.0);
        assert!((f("recv_protection_passes_per_byte") - 1.01).abs() < 1e-9);
        assert_eq!(f("mean_sends_in_flight_per_lun"), 1.5);
        assert_eq!(f("sends_in_flight_per_lun_max"), 3.0);
        assert_eq!(f("wakeups_per_flush"), 1.5);
        assert_eq!(f("resent_sealed_frames"), 1.0);
        assert_eq!(f("dropped_no_connection_frames"), 2.0);
        assert_eq!(f("dropped_above_window_frames"), 7.0);
        assert_eq!(f("dropped_unauthentic_frames"), 4.0);
        for k in [
            "send_payload_bytes",
            "recv_payload_bytes",
            "sends_submitted",
            "flushes",
        ] {
            assert!(p[k].is_u64(), "datapath.{k}");
        }
        let c = &v["connections"];
        assert_eq!(c["count"], 2);
        assert_eq!(c["slowest_over_fastest"], 0.5);
        assert_eq!(c["mb_per_s"].as_array().unwrap().len(), 2);
        for k in [
            "connections",
            "rss_delta_bytes",
            "pool_bytes_taken",
            "per_connection_bytes",
            "per_end_bytes",
            "threads_per_connection",
        ] {
            assert!(c["idle"][k].is_number(), "connections.idle.{k}");
        }
    }
}
