//! `stp bench report`: turns the result files of one LIO benchmark run
//! (`sim-target/vm/bench-lio`: our raw mode, fio's sg engine, fio
//! io_uring O_DIRECT and, where a fio that takes it was had, fio's
//! io_uring_cmd engine with `cmd_type=bsg` on the same LUNs, STP and TCP)
//! into a table of ratios and one JSON document (`target/bench/lio.json`).
//!
//! # Input: one directory
//!
//! | file | what |
//! | --- | --- |
//! | `raw-<lun>-<case>.json` | `stp bench raw --json` (schema 1) |
//! | `fio-sg-<lun>-<case>.json` | `fio --ioengine=sg --output-format=json` on the same `/dev/sgN` |
//! | `fio-uring-<lun>-<case>.json` | `fio --ioengine=io_uring --direct=1 --output-format=json` on the matching `/dev/sdX` |
//! | `fio-uringcmd-<lun>-<case>.json` | `fio --ioengine=io_uring_cmd --cmd_type=bsg --output-format=json` on the matching `/dev/bsg/H:C:T:L` (the third anchor; `meta.json`'s `fio_bsg` says which fio, or why it did not run) |
//! | `stp-{vendor,block}-{goodput,rtt}.json`, `tcp-{goodput,rtt}.json` | `stp bench stp|tcp --json` |
//! | `*.hgrm` | latency distributions for the plot |
//! | `*.err` | a run that failed (listed under `failed`) |
//! | `meta.json`, `sim-target.json` | where it ran; the LUN map |
//! | `protection.json` | `stp bench protection --json` in the same boot |
//! | `curve-*.json` | `stp bench curve --json` (`--curve`; not read here) |
//!
//! `<lun>` is `stg` (an STG member served by the stp-target TCMU daemon) or
//! `ramdisk` (LIO's rd_mcp backstore); `<case>` is `<rw>-<bs>-qd<depth>`,
//! e.g. `randwrite-4k-qd16`, or [`MIXED_CASE`], the mixed workload (random,
//! 70 % reads, 4k/64k/1m at 60/30/10 %, QD16). A mixed run's IOPS and MB/s
//! are reads and writes together; its percentiles are those of the
//! direction with more commands (the reads), since fio reports each
//! direction apart.
//!
//! # Output: schema 1
//!
//! Every ratio is one [`Ratio`]: `value / reference`, both absolute numbers
//! with what they are, the metric, which direction is better, the target
//! and whether it was met. Throughput ratios are ours / theirs (above 1: we
//! are faster); latency ratios are ours / the reference (below 1: we are
//! quicker). The keys `raw_vs_fio_sg` and `raw_vs_fio_uring_direct` hold one
//! ratio per (LUN, case) of `stp bench raw` on its default engine, each
//! naming the engine (`engine`: `bsg` on 7.1+ kernels, else `sg`);
//! `sgv3_vs_fio_sg` and `sgv3_vs_fio_uring_direct` the same for the runs
//! forced onto the sg v3 engine (`sgv3-<lun>-<case>`, not counted in the
//! summary), and `raw_vs_sgv3` the default engine against sg v3.
//! `raw_vs_fio_uring_cmd_bsg` holds raw against fio's io_uring_cmd engine
//! with `cmd_type=bsg` (the same passthrough as our bsg engine, target
//! ≥ 1.0) where those runs exist; `fio_bsg` says which fio ran them or why
//! none did (from `meta.json`). With
//! `--rounds N` each run is its median round by the case's metric (MB/s
//! for 1 MiB and mixed cases, IOPS otherwise). `stp_vendor_goodput_vs_raw_write`,
//! `stp_block_goodput_vs_raw_write`, `stp_rtt_p50_vs_raw_qd1_write` and
//! `stp_rtt_p999_vs_own_p50` hold one each (the STP latency ratios are vendor
//! mode's; block mode's are under `stp_block_*`).
//!
//! # Ceilings
//!
//! STP's goodput is bounded twice over: by the array, which must take each
//! byte as a WRITE and hand it back as a READ through the same daemon
//! (`mailbox_ceiling_mbps` = 1 / (1/raw write + 1/raw read), 1 MiB QD8 on
//! the STG LUN), and by one core's per-byte protection
//! (`protection_ceiling_mbps`, from `protection.json` of the same boot, for
//! the protection the STP runs recorded). `ceiling_mbps` is the smaller;
//! `stp_vendor_goodput_vs_mailbox_ceiling` and
//! `stp_block_goodput_vs_mailbox_ceiling` divide goodput by it (block mode by
//! the ceiling of the LUN it ran on, the ramdisk).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::hist::{self, DistPoint};
use super::protection::{self, ProtectionReport};

/// The version of `lio.json`'s shape.
pub const REPORT_SCHEMA: u32 = 1;

/// Targets of issue 5, as ratios measured in the same run.
pub mod targets {
    /// Our raw mode ≥ 2× fio's sg engine, every case.
    pub const RAW_VS_FIO_SG: f64 = 2.0;
    /// Our raw mode ≥ 0.9× fio io_uring O_DIRECT, every case.
    pub const RAW_VS_FIO_URING: f64 = 0.9;
    /// The mixed case ([`MIXED_CASE`](super::MIXED_CASE)) on the bsg
    /// engine: ≥ 1.0× fio io_uring O_DIRECT ("≥ 1.0× once the bsg engine
    /// is in").
    pub const RAW_VS_FIO_URING_MIXED_BSG: f64 = 1.0;
    /// Our raw mode ≥ 1.0× fio's io_uring_cmd engine with `cmd_type=bsg`
    /// (the same bsg passthrough), every case.
    pub const RAW_VS_FIO_URING_CMD_BSG: f64 = 1.0;

    /// The target of a raw / fio io_uring ratio for `case` run on `engine`.
    pub fn raw_vs_fio_uring(case: &str, engine: Option<&str>) -> f64 {
        if case == super::MIXED_CASE && engine == Some("bsg") {
            RAW_VS_FIO_URING_MIXED_BSG
        } else {
            RAW_VS_FIO_URING
        }
    }
    /// STP vendor one-way goodput ≥ 0.6× our raw 1 MiB writes.
    pub const STP_GOODPUT_VS_RAW: f64 = 0.6;
    /// STP 64 B round trip p50 ≤ 3× our raw 4 KiB QD1 write latency.
    pub const STP_RTT_VS_RAW_QD1: f64 = 3.0;
    /// STP round trip p99.9 ≤ 10× its own p50.
    pub const STP_TAIL_VS_P50: f64 = 10.0;
    /// STP 64 B round trip p50 ≤ 2.5× (raw 4 KiB QD1 write p50 + read
    /// p50) on the same LUN: a round trip is two SENDs and two RECEIVE
    /// completions, so 2× is the floor.
    pub const STP_RTT_VS_RAW_WRITE_PLUS_READ: f64 = 2.5;
    /// STP goodput ≥ 0.8× that run's ceiling (the smaller of the mailbox
    /// ceiling and the protection ceiling).
    pub const STP_GOODPUT_VS_CEILING: f64 = 0.8;
    /// The aggregate goodput of 16 connections on one STG ≥ 0.9× one
    /// connection's.
    pub const STP_CONNECTIONS_VS_ONE: f64 = 0.9;
    /// Block-mode goodput ≥ 0.8× vendor mode's on the same LUNs.
    pub const STP_BLOCK_VS_VENDOR: f64 = 0.8;
    /// Block-mode 64 B round trip p50 ≤ 2× vendor mode's on the same LUNs.
    pub const STP_BLOCK_RTT_VS_VENDOR: f64 = 2.0;
}

/// The block-mode goodput run on the STG's member LUNs, the ones vendor
/// mode uses (`stp bench stp --mode block --block-on-members`).
pub const BLOCK_ON_MEMBERS_RUN: &str = "stp-block-members-goodput";

/// The block-mode 64 B ping-pong on the STG's member LUNs.
pub const BLOCK_ON_MEMBERS_RTT_RUN: &str = "stp-block-members-rtt";

/// The run of 16 concurrent vendor-mode connections on the STG.
pub const CONNECTIONS_RUN: &str = "stp-vendor-connections-16";

/// The mixed block case: `--rw randrw --rwmix 70 --bssplit
/// 4k/60,64k/30,1m/10 --depth 16` (fio: `--rw=randrw --rwmixread=70
/// --bssplit=4k/60:64k/30:1m/10 --iodepth=16`).
pub const MIXED_CASE: &str = "randrw70-split-qd16";

/// The block cases, in table order.
pub const CASES: [&str; 7] = [
    "randread-4k-qd1",
    "randwrite-4k-qd1",
    "randread-4k-qd16",
    "randwrite-4k-qd16",
    "read-1m-qd8",
    "write-1m-qd8",
    MIXED_CASE,
];

/// The LUNs, in table order.
pub const LUNS: [&str; 2] = ["stg", "ramdisk"];

/// Options of `stp bench report`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Example (what scripts/bench-lio runs after the VM stage):\n  \
stp bench report target/bench/lio --out target/bench/lio.json --plot target/bench/lio-latency.svg\n\n\
Ratios are value / reference: throughput ours / theirs (above 1 is better), latency\n\
ours / reference (below 1 is better). Each carries its target and whether it was met."
)]
pub struct ReportArgs {
    /// The directory of result files (sim-target/vm/bench-lio's --out).
    pub dir: PathBuf,
    /// Write the JSON report here (e.g. target/bench/lio.json).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Write a latency-by-percentile plot (SVG) of the QD1 4 KiB writes and
    /// the 64-byte round trips here.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What one run measured, whichever tool ran it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Measured {
    /// Operations per second.
    pub iops: f64,
    /// Payload megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Median latency, µs (fio: total latency, submit to completion).
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Operations timed.
    pub ops: u64,
    /// Where it came from (file name).
    pub source: String,
    /// With `--rounds N` in the guest: every round's IOPS (this entry is
    /// the round with the median of the case's throughput metric: MB/s for
    /// 1 MiB and mixed cases, IOPS otherwise).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds_iops: Vec<f64>,
    /// Every round's MB/s, in round order, next to `rounds_iops`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds_mb_per_s: Vec<f64>,
    /// The SCSI engine our run used (`bsg`, `sg`, `sync`; from the
    /// report's `engines`); none for fio and for runs that do not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

/// The part of an `stp bench --json` report the table needs.
#[derive(Deserialize, Debug)]
struct OurJson {
    schema: u32,
    ops: u64,
    iops: f64,
    mb_per_s: f64,
    latency_us: OurLatency,
    /// Mixed runs: the reads and the writes apart.
    #[serde(default)]
    read: Option<OurDir>,
    #[serde(default)]
    write: Option<OurDir>,
    /// Which engine drove each path (runs on devices).
    #[serde(default)]
    engines: Vec<OurEngine>,
}

#[derive(Deserialize, Debug)]
struct OurEngine {
    engine: String,
}

#[derive(Deserialize, Debug)]
struct OurDir {
    ops: u64,
    latency_us: OurLatency,
}

#[derive(Deserialize, Debug)]
struct OurLatency {
    p50: f64,
    p99: f64,
    p999: f64,
}

/// Reads an `stp bench ... --json` document.
pub fn parse_ours(text: &str, source: &str) -> Result<Measured> {
    let j: OurJson = serde_json::from_str(text).context("not an `stp bench --json` report")?;
    if j.schema != super::SCHEMA {
        bail!("schema {}; this build reads {}", j.schema, super::SCHEMA);
    }
    // A mixed run: the percentiles of the direction with more commands,
    // as fio's are taken (it reports no combined percentiles).
    let lat = match (&j.read, &j.write) {
        (Some(r), Some(w)) if w.ops > r.ops => &w.latency_us,
        (Some(r), Some(_)) => &r.latency_us,
        _ => &j.latency_us,
    };
    Ok(Measured {
        iops: j.iops,
        mb_per_s: j.mb_per_s,
        p50_us: lat.p50,
        p99_us: lat.p99,
        p999_us: lat.p999,
        ops: j.ops,
        source: source.into(),
        rounds_iops: Vec::new(),
        rounds_mb_per_s: Vec::new(),
        engine: j.engines.first().map(|e| e.engine.clone()),
    })
}

/// One direction of a fio job (`jobs[0].read` or `.write`).
#[derive(Deserialize, Debug)]
struct FioDir {
    iops: f64,
    bw_bytes: f64,
    total_ios: u64,
    #[serde(default)]
    lat_ns: Option<FioLat>,
    #[serde(default)]
    clat_ns: Option<FioLat>,
}

#[derive(Deserialize, Debug)]
struct FioLat {
    #[serde(default)]
    min: f64,
    #[serde(default)]
    max: f64,
    #[serde(default)]
    percentile: Option<BTreeMap<String, f64>>,
}

#[derive(Deserialize, Debug)]
struct FioJob {
    jobname: String,
    error: i64,
    read: FioDir,
    write: FioDir,
}

#[derive(Deserialize, Debug)]
struct FioJson {
    jobs: Vec<FioJob>,
}

/// fio's JSON may follow notes fio printed on stdout: start at the first
/// line that opens an object.
fn fio_body(text: &str) -> &str {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('{') {
            return &text[at..];
        }
        at += line.len();
    }
    text
}

impl FioDir {
    /// Total latency percentiles (`--lat_percentiles=1`), else completion
    /// latency's: (quantile 0..=1, ns), ascending.
    fn percentiles(&self) -> Vec<(f64, f64)> {
        let table = [&self.lat_ns, &self.clat_ns]
            .into_iter()
            .flatten()
            .find_map(|l| l.percentile.as_ref());
        let mut v: Vec<(f64, f64)> = table
            .into_iter()
            .flatten()
            .filter_map(|(k, ns)| k.parse::<f64>().ok().map(|p| (p / 100.0, *ns)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }

    fn at(&self, q: f64) -> f64 {
        // The smallest listed percentile at or above q.
        self.percentiles()
            .iter()
            .find(|(p, _)| *p >= q - 1e-9)
            .map_or(0.0, |(_, ns)| ns / 1000.0)
    }
}

/// The direction of fio's job that did the work: `write` for write
/// patterns, else `read`; of a mixed job, the one with more commands.
fn fio_dir(job: &FioJob) -> &FioDir {
    if job.write.total_ios > job.read.total_ios {
        &job.write
    } else {
        &job.read
    }
}

/// Reads fio's `--output-format=json` (first job).
pub fn parse_fio(text: &str, source: &str) -> Result<Measured> {
    let j: FioJson = serde_json::from_str(fio_body(text)).context("not fio JSON output")?;
    let job = j.jobs.first().context("fio's JSON has no jobs")?;
    if job.error != 0 {
        bail!("fio job {} reports error {}", job.jobname, job.error);
    }
    let d = fio_dir(job);
    if d.total_ios == 0 {
        bail!("fio job {} did no I/O", job.jobname);
    }
    // Throughput counts both directions (a mixed job does both).
    let (r, w) = (&job.read, &job.write);
    Ok(Measured {
        iops: r.iops + w.iops,
        mb_per_s: (r.bw_bytes + w.bw_bytes) / 1e6,
        p50_us: d.at(0.5),
        p99_us: d.at(0.99),
        p999_us: d.at(0.999),
        ops: r.total_ios + w.total_ios,
        source: source.into(),
        rounds_iops: Vec::new(),
        rounds_mb_per_s: Vec::new(),
        engine: None,
    })
}

/// fio's latency percentiles as a distribution for the plot.
pub fn fio_distribution(text: &str) -> Result<Vec<DistPoint>> {
    let j: FioJson = serde_json::from_str(fio_body(text)).context("not fio JSON output")?;
    let job = j.jobs.first().context("fio's JSON has no jobs")?;
    let d = fio_dir(job);
    let n = d.total_ios;
    let lat = d.lat_ns.as_ref().or(d.clat_ns.as_ref());
    let mut out = Vec::new();
    if let Some(l) = lat {
        out.push(DistPoint {
            value_us: l.min / 1000.0,
            quantile: 0.0,
            total: 0,
        });
    }
    for (q, ns) in d.percentiles() {
        out.push(DistPoint {
            value_us: ns / 1000.0,
            quantile: q,
            total: (q * n as f64).round() as u64,
        });
    }
    if let Some(l) = lat {
        out.push(DistPoint {
            value_us: l.max / 1000.0,
            quantile: 1.0,
            total: n,
        });
    }
    // Monotonic, as the plot expects.
    let mut mono: Vec<DistPoint> = Vec::with_capacity(out.len());
    for p in out {
        if mono
            .last()
            .is_none_or(|l| p.quantile >= l.quantile && p.value_us >= l.value_us)
        {
            mono.push(p);
        }
    }
    Ok(mono)
}

/// Reads a `.hgrm` percentile distribution (as `stp bench --hgrm` writes).
pub fn parse_hgrm(text: &str) -> Result<Vec<DistPoint>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || line.trim_start().starts_with('#') {
            continue;
        }
        let (Ok(v), Ok(q), Ok(t)) = (f[0].parse::<f64>(), f[1].parse::<f64>(), f[2].parse()) else {
            continue; // the header
        };
        if !(0.0..=1.0).contains(&q) {
            bail!("a quantile of {q} in a .hgrm line: {line}");
        }
        out.push(DistPoint {
            value_us: v,
            quantile: q,
            total: t,
        });
    }
    if out.is_empty() {
        bail!("no percentile lines");
    }
    Ok(out)
}

/// Reads `stp bench protection --json`.
pub fn parse_protection(text: &str) -> Result<ProtectionReport> {
    let p: ProtectionReport =
        serde_json::from_str(text).context("not an `stp bench protection --json` report")?;
    if p.schema != protection::PROTECTION_SCHEMA {
        bail!(
            "protection report schema {}; this build reads {}",
            p.schema,
            protection::PROTECTION_SCHEMA
        );
    }
    Ok(p)
}

/// The frame protection an `stp bench stp --json` run recorded, if any
/// (builds before the field was added recorded none).
fn recorded_protection(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("params")?
        .get("protection")?
        .as_str()
        .map(str::to_string)
}

/// 1 / (1/a + 1/b): the rate of two per-byte stages one after the other
/// (each byte goes through both), `None` unless both are positive.
fn in_series(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0).then(|| 1.0 / (1.0 / a + 1.0 / b))
}

/// What bounds STP's goodput in this boot: the array's mailbox path and
/// one core's per-byte protection.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Ceilings {
    /// The frame protection the STP runs recorded (null when they
    /// recorded none).
    pub protection: Option<String>,
    /// Which run said so, or why it is unknown.
    pub protection_from: String,
    /// One core's rate of that protection in this boot, MB/s.
    pub protection_ceiling_mbps: Option<f64>,
    /// How `protection_ceiling_mbps` was computed.
    pub protection_ceiling_is: String,
    /// One core's AES-256-GCM in this boot: the smaller of seal and open,
    /// MB/s (v2's default protection, whatever the STP runs used).
    pub aes256gcm_ceiling_mbps: Option<f64>,
    /// 1 / (1/raw write + 1/raw read), 1 MiB QD8, STG LUN, MB/s.
    pub mailbox_ceiling_mbps: Option<f64>,
    /// What `mailbox_ceiling_mbps` is.
    pub mailbox_ceiling_is: String,
    /// The smaller of the protection and mailbox ceilings (vendor mode).
    pub ceiling_mbps: Option<f64>,
    /// Which of the two it is.
    pub ceiling_is: String,
    /// The mailbox ceiling of the ramdisk LUN, where block mode runs.
    pub block_mailbox_ceiling_mbps: Option<f64>,
    /// What `block_mailbox_ceiling_mbps` is.
    pub block_mailbox_ceiling_is: String,
    /// The smaller of the protection and block-mode mailbox ceilings.
    pub block_ceiling_mbps: Option<f64>,
    /// Which of the two it is.
    pub block_ceiling_is: String,
}

impl Ceilings {
    /// The ceilings the results allow.
    pub fn of(r: &Results) -> Ceilings {
        let mut c = Ceilings::default();
        // The protection the STP runs ran with: vendor goodput's record
        // first (every run of one binary records the same).
        let said = ["stp-vendor-goodput", "stp-block-goodput"]
            .iter()
            .find_map(|k| r.stp_protection.get(*k).map(|p| (k.to_string(), p)))
            .or_else(|| r.stp_protection.iter().next().map(|(k, p)| (k.clone(), p)));
        match said {
            Some((stem, p)) => {
                c.protection = Some(p.clone());
                c.protection_from = format!("{stem}.json params.protection");
            }
            None => {
                c.protection_from = "not recorded: no stp-*.json run names its protection \
                                     (stp builds before params.protection)"
                    .into();
            }
        }
        let rate = |name: &str| -> Option<f64> {
            r.protection
                .as_ref()?
                .case(name)
                .map(|x| x.median_mbps)
                .filter(|v| *v > 0.0)
        };
        c.aes256gcm_ceiling_mbps = match (rate("aes256gcm-seal"), rate("aes256gcm-open")) {
            (Some(s), Some(o)) => Some(s.min(o)),
            _ => None,
        };
        let (ceiling, is) = match c.protection.as_deref() {
            Some(protection::V2_PROTECTION) => (
                c.aes256gcm_ceiling_mbps,
                "one core, this boot: the smaller of aes256gcm-seal and aes256gcm-open".to_string(),
            ),
            Some(protection::V1_PROTECTION) => (
                rate("blake3-keyed").zip(rate("crc32c")).and_then(|(b, k)| in_series(b, k)),
                "one core, this boot: blake3-keyed and crc32c over every byte, in series (v1 frames)"
                    .to_string(),
            ),
            Some(protection::V2_AUTH_ONLY) => (
                rate("blake3-keyed"),
                "one core, this boot: blake3-keyed over every byte (v2 authentication only)"
                    .to_string(),
            ),
            Some(other) => (
                None,
                format!("unknown: this build has no ceiling for protection `{other}`"),
            ),
            None => (None, "unknown: the protection is not recorded".to_string()),
        };
        c.protection_ceiling_is = if r.protection.is_none() {
            "unknown: no protection.json (stp bench protection) in this run".into()
        } else if ceiling.is_none() && c.protection.is_some() {
            format!("{is} (a case is missing from protection.json)")
        } else {
            is
        };
        c.protection_ceiling_mbps = ceiling;
        let mailbox = |lun: &str| -> (Option<f64>, String) {
            let w = r.get(&format!("raw-{lun}-write-1m-qd8"));
            let rd = r.get(&format!("raw-{lun}-read-1m-qd8"));
            match (w, rd) {
                (Some(w), Some(rd)) => (
                    in_series(w.mb_per_s, rd.mb_per_s),
                    format!(
                        "1/(1/raw write + 1/raw read), 1 MiB QD8, {lun} LUN: {} and {} MB/s",
                        num(w.mb_per_s),
                        num(rd.mb_per_s)
                    ),
                ),
                _ => (
                    None,
                    format!("unknown: needs raw-{lun}-write-1m-qd8 and raw-{lun}-read-1m-qd8"),
                ),
            }
        };
        let smaller = |mailbox: Option<f64>, lun: &str| -> (Option<f64>, String) {
            let p = c.protection.as_deref().unwrap_or("protection");
            match (mailbox, c.protection_ceiling_mbps) {
                (Some(m), Some(p_)) if p_ < m => (
                    Some(p_),
                    format!(
                        "protection ({p}, one core), below the {lun} LUN's mailbox at {} MB/s",
                        num(m)
                    ),
                ),
                (Some(m), Some(p_)) => (
                    Some(m),
                    format!(
                        "mailbox ({lun} LUN), below the protection ({p}, one core) at {} MB/s",
                        num(p_)
                    ),
                ),
                (Some(m), None) => (
                    Some(m),
                    format!("mailbox ({lun} LUN); the protection ceiling is unknown"),
                ),
                (None, Some(p_)) => (
                    Some(p_),
                    format!("protection ({p}, one core); the mailbox ceiling is unknown"),
                ),
                (None, None) => (None, "unknown".into()),
            }
        };
        (c.mailbox_ceiling_mbps, c.mailbox_ceiling_is) = mailbox("stg");
        (c.block_mailbox_ceiling_mbps, c.block_mailbox_ceiling_is) = mailbox("ramdisk");
        (c.ceiling_mbps, c.ceiling_is) = smaller(c.mailbox_ceiling_mbps, "stg");
        (c.block_ceiling_mbps, c.block_ceiling_is) =
            smaller(c.block_mailbox_ceiling_mbps, "ramdisk");
        c
    }
}

/// Which way a ratio should go.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    /// Throughput: a higher ratio is better; the target is a minimum.
    Higher,
    /// Latency: a lower ratio is better; the target is a maximum.
    Lower,
}

/// One ratio: `value / reference`.
#[derive(Serialize, Debug, Clone)]
pub struct Ratio {
    /// The LUN (`stg` or `ramdisk`), for per-case ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lun: Option<String>,
    /// The case (`randwrite-4k-qd16`...), for per-case ratios.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case: Option<String>,
    /// The SCSI engine our run (the value) used, for per-case ratios of
    /// `stp bench raw`: `bsg`, `sg` or `sync`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// What is compared: `iops`, `mb_per_s`, `p50_us`, `p999_us`.
    pub metric: String,
    /// The numerator: ours.
    pub value: f64,
    /// What the numerator is.
    pub value_is: String,
    /// The denominator: the peer, or our own reference.
    pub reference: f64,
    /// What the denominator is.
    pub reference_is: String,
    /// `value / reference` (0 when the reference is 0).
    pub ratio: f64,
    /// `higher` (throughput) or `lower` (latency) is better.
    pub better: Better,
    /// The target: a minimum when higher is better, a maximum when lower is;
    /// null where the issue sets none.
    pub target: Option<f64>,
    /// Whether the target was met (null without a target).
    pub met: Option<bool>,
}

impl Ratio {
    fn new(
        metric: &str,
        (value, value_is): (f64, String),
        (reference, reference_is): (f64, String),
        better: Better,
        target: Option<f64>,
    ) -> Ratio {
        let ratio = if reference > 0.0 {
            value / reference
        } else {
            0.0
        };
        let met = target.map(|t| match better {
            Better::Higher => reference > 0.0 && ratio >= t,
            Better::Lower => reference > 0.0 && ratio <= t,
        });
        Ratio {
            lun: None,
            case: None,
            engine: None,
            metric: metric.into(),
            value,
            value_is,
            reference,
            reference_is,
            ratio,
            better,
            target,
            met,
        }
    }

    fn at(mut self, lun: &str, case: &str) -> Ratio {
        self.lun = Some(lun.into());
        self.case = Some(case.into());
        self
    }

    fn on(mut self, engine: Option<&str>) -> Ratio {
        self.engine = engine.map(str::to_string);
        self
    }
}

/// One block case on one LUN, three or four ways.
#[derive(Serialize, Debug, Clone)]
pub struct CaseRow {
    /// `stg` or `ramdisk`.
    pub lun: String,
    /// `<rw>-<bs>-qd<depth>`.
    pub case: String,
    /// `stp bench raw` on `/dev/sgN`, its default engine (bsg io_uring
    /// passthrough on 7.1+, else sg v3; `engine` says which).
    pub raw: Option<Measured>,
    /// fio `--ioengine=sg` on the same `/dev/sgN`.
    pub fio_sg: Option<Measured>,
    /// fio `--ioengine=io_uring --direct=1` on the matching `/dev/sdX`.
    pub fio_uring_direct: Option<Measured>,
    /// fio `--ioengine=io_uring_cmd --cmd_type=bsg` on the matching
    /// `/dev/bsg/H:C:T:L` (where a fio that takes it ran).
    pub fio_uring_cmd_bsg: Option<Measured>,
}

/// Everything one benchmark directory holds, parsed.
#[derive(Debug, Default)]
pub struct Results {
    /// Parsed runs by file stem (`raw-stg-randwrite-4k-qd1`, `stp-vendor-rtt`).
    pub runs: BTreeMap<String, Measured>,
    /// Runs that failed or could not be read: stem and why.
    pub failed: BTreeMap<String, String>,
    /// `meta.json`, if present.
    pub meta: Option<serde_json::Value>,
    /// The LUN map, if present.
    pub map: Option<serde_json::Value>,
    /// Raw file texts for the plot: stem → text (fio JSON and .hgrm).
    pub dists: BTreeMap<String, Vec<DistPoint>>,
    /// `protection.json`: `stp bench protection --json` in the same boot.
    pub protection: Option<ProtectionReport>,
    /// The frame protection each STP run recorded (`params.protection`),
    /// by file stem.
    pub stp_protection: BTreeMap<String, String>,
    /// The backup runs (`backup-*.json`, sim-target/vm/bench-backup).
    pub backup: super::backup::Backups,
}

/// `raw-stg-write-1m-qd8.r2` → (`raw-stg-write-1m-qd8`, Some(2)): the
/// guest's `--rounds N` names round K of a block case `<stem>.rK`.
pub fn split_round(stem: &str) -> (&str, Option<u32>) {
    if let Some((base, k)) = stem.rsplit_once(".r") {
        if let Ok(k) = k.parse::<u32>() {
            return (base, Some(k));
        }
    }
    (stem, None)
}

impl Results {
    /// Reads every result file in `dir`. Rounds of one run (`<stem>.rK`)
    /// become one entry: the round with the median of the case's
    /// throughput metric (MB/s for 1 MiB and mixed cases, IOPS otherwise;
    /// the lower of the two middle ones for an even count), every round's
    /// IOPS and MB/s with it.
    pub fn load(dir: &Path) -> Result<Results> {
        let mut r = Results::default();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the results directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        let mut rounds: BTreeMap<String, Vec<Measured>> = BTreeMap::new();
        for path in names {
            let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                continue;
            };
            let read = || std::fs::read_to_string(&path);
            if let Some(stem) = file.strip_suffix(".err") {
                let why = read().unwrap_or_default();
                let last = why.lines().rev().find(|l| !l.trim().is_empty());
                let first = why
                    .lines()
                    .find(|l| l.contains("error") || l.contains("FAIL"))
                    .or(last)
                    .unwrap_or("failed");
                r.failed.insert(stem.into(), first.trim().to_string());
            } else if let Some(stem) = file.strip_suffix(".hgrm") {
                // The plot shows the first round that has a distribution.
                let base = split_round(stem).0;
                if r.dists.contains_key(base) {
                    continue;
                }
                if let Ok(d) = read()
                    .map_err(anyhow::Error::from)
                    .and_then(|t| parse_hgrm(&t))
                {
                    r.dists.insert(base.into(), d);
                }
            } else if let Some(stem) = file.strip_suffix(".json") {
                let text = read().with_context(|| format!("reading {}", path.display()))?;
                let parsed = match stem {
                    "meta" => {
                        r.meta = serde_json::from_str(&text).ok();
                        continue;
                    }
                    "sim-target" => {
                        r.map = serde_json::from_str(&text).ok();
                        continue;
                    }
                    // `stp bench curve` documents: no part of the ratios.
                    s if s.starts_with("curve-") => continue,
                    // Read below, by the backup table's own code.
                    s if s.starts_with("backup-") => continue,
                    "protection" => {
                        match parse_protection(&text) {
                            Ok(p) => r.protection = Some(p),
                            Err(e) => {
                                r.failed.insert(stem.into(), format!("{e:#}"));
                            }
                        }
                        continue;
                    }
                    s if s.starts_with("fio-") => {
                        let base = split_round(stem).0;
                        if !r.dists.contains_key(base) {
                            if let Ok(d) = fio_distribution(&text) {
                                r.dists.insert(base.into(), d);
                            }
                        }
                        parse_fio(&text, file)
                    }
                    _ => {
                        if stem.starts_with("stp-") {
                            if let Some(p) = recorded_protection(&text) {
                                r.stp_protection.insert(split_round(stem).0.to_string(), p);
                            }
                        }
                        parse_ours(&text, file)
                    }
                };
                match parsed {
                    Ok(m) => {
                        rounds
                            .entry(split_round(stem).0.to_string())
                            .or_default()
                            .push(m);
                    }
                    Err(e) => {
                        r.failed.insert(stem.into(), format!("{e:#}"));
                    }
                }
            }
        }
        for (stem, mut all) in rounds {
            let each: Vec<f64> = all.iter().map(|m| m.iops).collect();
            let each_mb: Vec<f64> = all.iter().map(|m| m.mb_per_s).collect();
            // A mixed run's IOPS and MB/s need not rank its rounds alike:
            // the median is taken of the metric its ratios use.
            all.sort_by(|a, b| throughput(&stem, a).0.total_cmp(&throughput(&stem, b).0));
            let mut m = all.swap_remove((all.len() - 1) / 2);
            if each.len() > 1 {
                m.rounds_iops = each;
                m.rounds_mb_per_s = each_mb;
            }
            r.runs.insert(stem, m);
        }
        r.backup = super::backup::Backups::load(dir);
        Ok(r)
    }

    fn get(&self, stem: &str) -> Option<&Measured> {
        self.runs.get(stem)
    }

    /// The block cases present, in table order (known cases first).
    pub fn rows(&self) -> Vec<CaseRow> {
        let mut keys: Vec<(String, String)> = Vec::new();
        for lun in LUNS {
            for case in CASES {
                keys.push((lun.into(), case.into()));
            }
        }
        // Any other case the directory holds, after the known ones.
        for stem in self.runs.keys().chain(self.failed.keys()) {
            let stem = split_round(stem).0;
            for prefix in ["raw-", "fio-sg-", "fio-uring-", "fio-uringcmd-"] {
                if let Some(rest) = stem.strip_prefix(prefix) {
                    if let Some((lun, case)) = rest.split_once('-') {
                        let k = (lun.to_string(), case.to_string());
                        if !keys.contains(&k) {
                            keys.push(k);
                        }
                    }
                }
            }
        }
        keys.into_iter()
            .map(|(lun, case)| CaseRow {
                raw: self.get(&format!("raw-{lun}-{case}")).cloned(),
                fio_sg: self.get(&format!("fio-sg-{lun}-{case}")).cloned(),
                fio_uring_direct: self.get(&format!("fio-uring-{lun}-{case}")).cloned(),
                fio_uring_cmd_bsg: self.get(&format!("fio-uringcmd-{lun}-{case}")).cloned(),
                lun,
                case,
            })
            .filter(|r| {
                r.raw.is_some()
                    || r.fio_sg.is_some()
                    || r.fio_uring_direct.is_some()
                    || r.fio_uring_cmd_bsg.is_some()
            })
            .collect()
    }

    /// The third anchor's verdict: `meta.json`'s `fio_bsg` (`ran`, `fio`:
    /// its version, `suite`: where it came from, `path`, `reason`: why
    /// none ran), with `runs`: how many `fio-uringcmd-*` runs were read.
    /// A directory whose `meta.json` does not say gets a verdict from its
    /// files alone.
    pub fn fio_bsg(&self) -> serde_json::Value {
        let runs = self
            .runs
            .keys()
            .filter(|k| k.starts_with("fio-uringcmd-"))
            .count();
        let mut v = match self.meta.as_ref().and_then(|m| m.get("fio_bsg")) {
            Some(v) if v.is_object() => v.clone(),
            _ => serde_json::json!({
                "ran": runs > 0,
                "fio": null,
                "suite": null,
                "reason": if runs > 0 {
                    serde_json::Value::Null
                } else {
                    "meta.json does not say (results from before the third anchor)".into()
                },
            }),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("runs".into(), runs.into());
        }
        v
    }
}

/// The throughput metric of a case: MB/s for 1 MiB cases and block-size
/// mixes, IOPS otherwise (the ratio is the same either way at one block
/// size).
fn throughput(case: &str, m: &Measured) -> (f64, &'static str) {
    if case.contains("-1m-") || case.contains("-split-") {
        (m.mb_per_s, "mb_per_s")
    } else {
        (m.iops, "iops")
    }
}

/// Every ratio of the report.
#[derive(Serialize, Debug, Default)]
pub struct Ratios {
    /// Our raw mode / fio's sg engine, same `/dev/sgN`, one per case.
    pub raw_vs_fio_sg: Vec<Ratio>,
    /// Our raw mode / fio io_uring O_DIRECT on the matching `/dev/sdX`.
    pub raw_vs_fio_uring_direct: Vec<Ratio>,
    /// Our raw mode / fio io_uring_cmd with `cmd_type=bsg` on the matching
    /// `/dev/bsg/H:C:T:L`, where those runs exist.
    pub raw_vs_fio_uring_cmd_bsg: Vec<Ratio>,
    /// Our raw mode forced onto the sg v3 engine (`sgv3-<lun>-<case>`) /
    /// fio's sg engine: the same targets, for the older kernels' engine
    /// (not counted in the summary, which is the default engine's).
    pub sgv3_vs_fio_sg: Vec<Ratio>,
    /// The sg v3 runs / fio io_uring O_DIRECT (likewise).
    pub sgv3_vs_fio_uring_direct: Vec<Ratio>,
    /// Our raw mode on its default engine (bsg io_uring passthrough on a
    /// 7.1+ kernel) / our raw mode forced onto the sg v3 engine
    /// (`sgv3-<lun>-<case>`), same LUN (no target).
    pub raw_vs_sgv3: Vec<Ratio>,
    /// STP vendor one-way goodput / raw 1 MiB QD8 writes to an STG LUN.
    pub stp_vendor_goodput_vs_raw_write: Option<Ratio>,
    /// STP block-mode goodput / raw 1 MiB QD8 writes to the ramdisk LUN.
    pub stp_block_goodput_vs_raw_write: Option<Ratio>,
    /// STP vendor 64 B round trip p50 / raw 4 KiB QD1 write p50 (STG LUN).
    pub stp_rtt_p50_vs_raw_qd1_write: Option<Ratio>,
    /// STP vendor round trip p99.9 / its own p50.
    pub stp_rtt_p999_vs_own_p50: Option<Ratio>,
    /// STP vendor 64 B round trip p50 / (raw 4 KiB QD1 write p50 + read
    /// p50), STG LUN.
    pub stp_rtt_p50_vs_raw_qd1_write_plus_read: Option<Ratio>,
    /// STP block-mode 64 B round trip p50 / (raw 4 KiB QD1 write p50 +
    /// read p50), ramdisk LUN.
    pub stp_block_rtt_p50_vs_raw_qd1_write_plus_read: Option<Ratio>,
    /// STP block-mode round trip p50 / raw 4 KiB QD1 write p50 (ramdisk).
    pub stp_block_rtt_p50_vs_raw_qd1_write: Option<Ratio>,
    /// STP block-mode round trip p99.9 / its own p50.
    pub stp_block_rtt_p999_vs_own_p50: Option<Ratio>,
    /// STP vendor goodput / TCP loopback goodput (no target).
    pub stp_vendor_goodput_vs_tcp: Option<Ratio>,
    /// STP vendor round trip p50 / TCP loopback round trip p50 (no target).
    pub stp_vendor_rtt_p50_vs_tcp: Option<Ratio>,
    /// STP vendor goodput / `ceiling_mbps` (no target).
    pub stp_vendor_goodput_vs_mailbox_ceiling: Option<Ratio>,
    /// STP block-mode goodput / `block_ceiling_mbps` (no target).
    pub stp_block_goodput_vs_mailbox_ceiling: Option<Ratio>,
    /// The aggregate goodput of 16 concurrent vendor-mode connections /
    /// one connection's.
    pub stp_vendor_16_connections_vs_1: Option<Ratio>,
    /// STP block-mode goodput on the STG's member LUNs / vendor-mode
    /// goodput on the same LUNs.
    pub stp_block_vs_vendor_goodput_same_luns: Option<Ratio>,
    /// STP block-mode 64 B round trip p50 on the STG's member LUNs /
    /// vendor mode's on the same LUNs.
    pub stp_block_rtt_vs_vendor_same_luns: Option<Ratio>,
    /// The ceilings those two divide by.
    #[serde(skip)]
    pub ceilings: Ceilings,
}

impl Ratios {
    /// Computes every ratio the results allow.
    pub fn of(r: &Results) -> Ratios {
        let mut out = Ratios::default();
        for row in r.rows() {
            let sgv3 = r.get(&format!("sgv3-{}-{}", row.lun, row.case));
            for (ours, value_is, to_sg, to_uring) in [
                (
                    row.raw.as_ref(),
                    row.raw.as_ref().map(raw_default_is),
                    &mut out.raw_vs_fio_sg,
                    &mut out.raw_vs_fio_uring_direct,
                ),
                (
                    sgv3,
                    Some("stp bench raw, STP_ENGINE=sg (io_uring sg v3)".to_string()),
                    &mut out.sgv3_vs_fio_sg,
                    &mut out.sgv3_vs_fio_uring_direct,
                ),
            ] {
                let (Some(m), Some(value_is)) = (ours, value_is) else {
                    continue;
                };
                let engine = m.engine.as_deref();
                for (peer, name, target, list) in [
                    (
                        &row.fio_sg,
                        "fio --ioengine=sg, same /dev/sg",
                        targets::RAW_VS_FIO_SG,
                        &mut *to_sg,
                    ),
                    (
                        &row.fio_uring_direct,
                        "fio --ioengine=io_uring --direct=1, matching /dev/sd",
                        targets::raw_vs_fio_uring(&row.case, engine),
                        &mut *to_uring,
                    ),
                ] {
                    if let Some(p) = peer {
                        list.push(case_ratio(&row, m, value_is.clone(), p, name, Some(target)));
                    }
                }
            }
        }
        for row in r.rows() {
            let (Some(raw), Some(peer)) = (&row.raw, &row.fio_uring_cmd_bsg) else {
                continue;
            };
            out.raw_vs_fio_uring_cmd_bsg.push(case_ratio(
                &row,
                raw,
                raw_default_is(raw),
                peer,
                "fio --ioengine=io_uring_cmd --cmd_type=bsg, matching /dev/bsg",
                Some(targets::RAW_VS_FIO_URING_CMD_BSG),
            ));
        }
        for row in r.rows() {
            let (Some(raw), Some(sg)) =
                (&row.raw, r.get(&format!("sgv3-{}-{}", row.lun, row.case)))
            else {
                continue;
            };
            out.raw_vs_sgv3.push(case_ratio(
                &row,
                raw,
                "stp bench raw (its default engine)".into(),
                sg,
                "stp bench raw, STP_ENGINE=sg (io_uring sg v3)",
                None,
            ));
        }
        let goodput = |stp: &str, lun: &str, target: Option<f64>| -> Option<Ratio> {
            let s = r.get(stp)?;
            let w = r.get(&format!("raw-{lun}-write-1m-qd8"))?;
            Some(Ratio::new(
                "mb_per_s",
                (s.mb_per_s, format!("{stp} (one-way, MB/s)")),
                (
                    w.mb_per_s,
                    format!("raw 1 MiB sequential writes, QD8, {lun} LUN"),
                ),
                Better::Higher,
                target,
            ))
        };
        out.stp_vendor_goodput_vs_raw_write = goodput(
            "stp-vendor-goodput",
            "stg",
            Some(targets::STP_GOODPUT_VS_RAW),
        );
        out.stp_block_goodput_vs_raw_write = goodput("stp-block-goodput", "ramdisk", None);
        let rtt = |stp: &str, lun: &str, target: Option<f64>| -> Option<Ratio> {
            let s = r.get(stp)?;
            let w = r.get(&format!("raw-{lun}-randwrite-4k-qd1"))?;
            Some(Ratio::new(
                "p50_us",
                (s.p50_us, format!("{stp}: 64-byte round trip p50")),
                (
                    w.p50_us,
                    format!("raw 4 KiB random write p50, QD1, {lun} LUN"),
                ),
                Better::Lower,
                target,
            ))
        };
        let tail = |stp: &str, target: Option<f64>| -> Option<Ratio> {
            let s = r.get(stp)?;
            Some(Ratio::new(
                "p999_us",
                (s.p999_us, format!("{stp}: round trip p99.9")),
                (s.p50_us, format!("{stp}: round trip p50")),
                Better::Lower,
                target,
            ))
        };
        out.stp_rtt_p50_vs_raw_qd1_write =
            rtt("stp-vendor-rtt", "stg", Some(targets::STP_RTT_VS_RAW_QD1));
        let rtt2 = |stp: &str, lun: &str, target: Option<f64>| -> Option<Ratio> {
            let s = r.get(stp)?;
            let w = r.get(&format!("raw-{lun}-randwrite-4k-qd1"))?;
            let rd = r.get(&format!("raw-{lun}-randread-4k-qd1"))?;
            Some(Ratio::new(
                "p50_us",
                (s.p50_us, format!("{stp}: 64-byte round trip p50")),
                (
                    w.p50_us + rd.p50_us,
                    format!("raw 4 KiB write p50 + read p50, QD1, {lun} LUN"),
                ),
                Better::Lower,
                target,
            ))
        };
        out.stp_rtt_p50_vs_raw_qd1_write_plus_read = rtt2(
            "stp-vendor-rtt",
            "stg",
            Some(targets::STP_RTT_VS_RAW_WRITE_PLUS_READ),
        );
        // Block mode's round-trip target is relative to vendor mode's.
        out.stp_block_rtt_p50_vs_raw_qd1_write_plus_read = rtt2("stp-block-rtt", "ramdisk", None);
        out.stp_rtt_p999_vs_own_p50 = tail("stp-vendor-rtt", Some(targets::STP_TAIL_VS_P50));
        out.stp_block_rtt_p50_vs_raw_qd1_write = rtt(
            "stp-block-rtt",
            "ramdisk",
            Some(targets::STP_RTT_VS_RAW_QD1),
        );
        out.stp_block_rtt_p999_vs_own_p50 = tail("stp-block-rtt", Some(targets::STP_TAIL_VS_P50));
        if let (Some(n), Some(one)) = (r.get(CONNECTIONS_RUN), r.get("stp-vendor-goodput")) {
            out.stp_vendor_16_connections_vs_1 = Some(Ratio::new(
                "mb_per_s",
                (n.mb_per_s, format!("{CONNECTIONS_RUN} (aggregate, MB/s)")),
                (one.mb_per_s, "stp-vendor-goodput (one connection)".into()),
                Better::Higher,
                Some(targets::STP_CONNECTIONS_VS_ONE),
            ));
        }
        if let (Some(b), Some(v)) = (r.get(BLOCK_ON_MEMBERS_RUN), r.get("stp-vendor-goodput")) {
            out.stp_block_vs_vendor_goodput_same_luns = Some(Ratio::new(
                "mb_per_s",
                (
                    b.mb_per_s,
                    format!("{BLOCK_ON_MEMBERS_RUN} (the STG's LUNs)"),
                ),
                (v.mb_per_s, "stp-vendor-goodput (the same LUNs)".into()),
                Better::Higher,
                Some(targets::STP_BLOCK_VS_VENDOR),
            ));
        }
        if let (Some(b), Some(v)) = (r.get(BLOCK_ON_MEMBERS_RTT_RUN), r.get("stp-vendor-rtt")) {
            out.stp_block_rtt_vs_vendor_same_luns = Some(Ratio::new(
                "p50_us",
                (
                    b.p50_us,
                    format!("{BLOCK_ON_MEMBERS_RTT_RUN} p50 (the STG's LUNs)"),
                ),
                (v.p50_us, "stp-vendor-rtt p50 (the same LUNs)".into()),
                Better::Lower,
                Some(targets::STP_BLOCK_RTT_VS_VENDOR),
            ));
        }
        if let (Some(s), Some(t)) = (r.get("stp-vendor-goodput"), r.get("tcp-goodput")) {
            out.stp_vendor_goodput_vs_tcp = Some(Ratio::new(
                "mb_per_s",
                (s.mb_per_s, "stp-vendor-goodput".into()),
                (t.mb_per_s, "tcp-goodput (loopback)".into()),
                Better::Higher,
                None,
            ));
        }
        if let (Some(s), Some(t)) = (r.get("stp-vendor-rtt"), r.get("tcp-rtt")) {
            out.stp_vendor_rtt_p50_vs_tcp = Some(Ratio::new(
                "p50_us",
                (s.p50_us, "stp-vendor-rtt p50".into()),
                (t.p50_us, "tcp-rtt p50 (loopback)".into()),
                Better::Lower,
                None,
            ));
        }
        out.ceilings = Ceilings::of(r);
        let c = &out.ceilings;
        let vs_ceiling = |stp: &str, ceiling: Option<f64>, is: &str| -> Option<Ratio> {
            let s = r.get(stp)?;
            Some(Ratio::new(
                "mb_per_s",
                (s.mb_per_s, format!("{stp} (one-way, MB/s)")),
                (ceiling?, format!("ceiling: {is}")),
                Better::Higher,
                Some(targets::STP_GOODPUT_VS_CEILING),
            ))
        };
        out.stp_vendor_goodput_vs_mailbox_ceiling =
            vs_ceiling("stp-vendor-goodput", c.ceiling_mbps, &c.ceiling_is);
        out.stp_block_goodput_vs_mailbox_ceiling = vs_ceiling(
            "stp-block-goodput",
            c.block_ceiling_mbps,
            &c.block_ceiling_is,
        );
        out
    }

    /// Every ratio with a target, with its key.
    fn targeted(&self) -> Vec<(&'static str, &Ratio)> {
        let mut v: Vec<(&'static str, &Ratio)> = Vec::new();
        v.extend(self.raw_vs_fio_sg.iter().map(|r| ("raw_vs_fio_sg", r)));
        v.extend(
            self.raw_vs_fio_uring_direct
                .iter()
                .map(|r| ("raw_vs_fio_uring_direct", r)),
        );
        v.extend(
            self.raw_vs_fio_uring_cmd_bsg
                .iter()
                .map(|r| ("raw_vs_fio_uring_cmd_bsg", r)),
        );
        for (k, r) in self.singles() {
            if let Some(r) = r {
                v.push((k, r));
            }
        }
        v.retain(|(_, r)| r.target.is_some());
        v
    }

    fn singles(&self) -> [(&'static str, Option<&Ratio>); 15] {
        [
            (
                "stp_rtt_p50_vs_raw_qd1_write_plus_read",
                self.stp_rtt_p50_vs_raw_qd1_write_plus_read.as_ref(),
            ),
            (
                "stp_block_rtt_p50_vs_raw_qd1_write_plus_read",
                self.stp_block_rtt_p50_vs_raw_qd1_write_plus_read.as_ref(),
            ),
            (
                "stp_vendor_goodput_vs_raw_write",
                self.stp_vendor_goodput_vs_raw_write.as_ref(),
            ),
            (
                "stp_block_goodput_vs_raw_write",
                self.stp_block_goodput_vs_raw_write.as_ref(),
            ),
            (
                "stp_rtt_p50_vs_raw_qd1_write",
                self.stp_rtt_p50_vs_raw_qd1_write.as_ref(),
            ),
            (
                "stp_rtt_p999_vs_own_p50",
                self.stp_rtt_p999_vs_own_p50.as_ref(),
            ),
            (
                "stp_block_rtt_p50_vs_raw_qd1_write",
                self.stp_block_rtt_p50_vs_raw_qd1_write.as_ref(),
            ),
            (
                "stp_block_rtt_p999_vs_own_p50",
                self.stp_block_rtt_p999_vs_own_p50.as_ref(),
            ),
            (
                "stp_vendor_goodput_vs_tcp",
                self.stp_vendor_goodput_vs_tcp.as_ref(),
            ),
            (
                "stp_vendor_rtt_p50_vs_tcp",
                self.stp_vendor_rtt_p50_vs_tcp.as_ref(),
            ),
            (
                "stp_vendor_goodput_vs_mailbox_ceiling",
                self.stp_vendor_goodput_vs_mailbox_ceiling.as_ref(),
            ),
            (
                "stp_block_goodput_vs_mailbox_ceiling",
                self.stp_block_goodput_vs_mailbox_ceiling.as_ref(),
            ),
            (
                "stp_vendor_16_connections_vs_1",
                self.stp_vendor_16_connections_vs_1.as_ref(),
            ),
            (
                "stp_block_vs_vendor_goodput_same_luns",
                self.stp_block_vs_vendor_goodput_same_luns.as_ref(),
            ),
            (
                "stp_block_rtt_vs_vendor_same_luns",
                self.stp_block_rtt_vs_vendor_same_luns.as_ref(),
            ),
        ]
    }
}

/// The host this report was made on (the VM's host).
fn host_machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string());
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string());
    serde_json::json!({
        "cpu_model": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "mem_gib": mem_kib.map(|k| (k as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0),
        "kernel": kernel,
    })
}

/// The whole report as JSON (`lio.json`).
pub fn document(r: &Results, ratios: &Ratios) -> serde_json::Value {
    let t = ratios.targeted();
    let met = t.iter().filter(|(_, r)| r.met == Some(true)).count();
    let mut doc = serde_json::json!({
        "schema": REPORT_SCHEMA,
        "what": "stp bench LIO report: our raw mode vs fio (sg; io_uring O_DIRECT; io_uring_cmd cmd_type=bsg where a fio had it) on the same LUNs, STP and TCP, one VM boot",
        "conventions": {
            "ratio": "value / reference",
            "throughput": "value = ours, reference = theirs; better: higher; target is a minimum",
            "latency": "value = ours, reference = the named reference; better: lower; target is a maximum",
            "latency_source": "ours: submit to reap per command (raw) or per round trip (rtt); fio: lat_ns (submit to completion) percentiles",
            "luns": {
                "stg": "STG member 0 as host 0 sees it: a TCMU user backstore served by the stp-target daemon",
                "ramdisk": "the LIO ramdisk backstore stp_rd as host 0 sees it",
            },
        },
        "machine": {
            "host": host_machine(),
            "guest": r.meta.clone(),
            "note": "QEMU TCG guest: absolute numbers are meaningless; compare ratios from the same run",
        },
        "cases": r.rows(),
        "runs": r.runs,
        "failed": r.failed,
        "summary": {"targets": t.len(), "met": met, "unmet": t.len() - met},
        "raw_vs_fio_sg": ratios.raw_vs_fio_sg,
        "raw_vs_fio_uring_direct": ratios.raw_vs_fio_uring_direct,
        "raw_vs_fio_uring_cmd_bsg": ratios.raw_vs_fio_uring_cmd_bsg,
        "fio_bsg": r.fio_bsg(),
        "raw_vs_sgv3": ratios.raw_vs_sgv3,
        "sgv3_vs_fio_sg": ratios.sgv3_vs_fio_sg,
        "sgv3_vs_fio_uring_direct": ratios.sgv3_vs_fio_uring_direct,
    });
    if let Some(o) = doc.as_object_mut() {
        for (k, v) in ratios.singles() {
            o.insert(k.into(), serde_json::to_value(v).unwrap_or_default());
        }
        if let Some(m) = &r.map {
            o.insert("map".into(), m.clone());
        }
        let c = &ratios.ceilings;
        o.insert("protection".into(), serde_json::json!(c.protection));
        o.insert(
            "protection_ceiling_mbps".into(),
            serde_json::json!(c.protection_ceiling_mbps),
        );
        o.insert(
            "mailbox_ceiling_mbps".into(),
            serde_json::json!(c.mailbox_ceiling_mbps),
        );
        o.insert("ceiling_mbps".into(), serde_json::json!(c.ceiling_mbps));
        o.insert(
            "ceilings".into(),
            serde_json::to_value(c).unwrap_or_default(),
        );
        o.insert(
            "protection_bench".into(),
            serde_json::to_value(&r.protection).unwrap_or_default(),
        );
        o.extend(r.backup.keys());
    }
    doc
}

fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn unit(metric: &str) -> &'static str {
    match metric {
        "iops" => "IOPS",
        "mb_per_s" => "MB/s",
        _ => "µs",
    }
}

fn verdict(r: &Ratio) -> String {
    match (r.target, r.met) {
        (Some(t), Some(m)) => format!(
            "{} {}  {}",
            if r.better == Better::Higher {
                "≥"
            } else {
                "≤"
            },
            num(t),
            if m { "met" } else { "NOT MET" }
        ),
        _ => "(no target)".into(),
    }
}

/// What our raw run on its default engine is, for a ratio's `value_is`.
fn raw_default_is(m: &Measured) -> String {
    match &m.engine {
        Some(e) => format!("stp bench raw (its default engine: {e})"),
        None => "stp bench raw (its default engine)".to_string(),
    }
}

/// `ours` against `peer` on one block case, in the case's throughput
/// metric, higher is better, tagged with the row's LUN and case and our
/// engine.
fn case_ratio(
    row: &CaseRow,
    ours: &Measured,
    value_is: String,
    peer: &Measured,
    peer_is: &str,
    target: Option<f64>,
) -> Ratio {
    let (value, metric) = throughput(&row.case, ours);
    let (theirs, _) = throughput(&row.case, peer);
    Ratio::new(
        metric,
        (value, value_is),
        (theirs, peer_is.into()),
        Better::Higher,
        target,
    )
    .at(&row.lun, &row.case)
    .on(ours.engine.as_deref())
}

/// The table's line on the third anchor: `×bsg` is raw ÷ fio's
/// io_uring_cmd engine with cmd_type=bsg, and which fio ran it, or why it
/// did not run.
fn fio_bsg_line(v: &serde_json::Value) -> String {
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).filter(|x| !x.is_empty());
    let runs = v.get("runs").and_then(|x| x.as_u64()).unwrap_or(0);
    let head = "(third anchor, fio --ioengine=io_uring_cmd --cmd_type=bsg on /dev/bsg/H:C:T:L";
    let target = targets::RAW_VS_FIO_URING_CMD_BSG;
    if runs > 0 {
        let from = match (text("fio"), text("suite")) {
            (Some(f), Some(s)) => format!("fio {f} ({s})"),
            (Some(f), None) => format!("fio {f}"),
            _ => "a fio meta.json does not name".to_string(),
        };
        format!("{head}: {from}; ×bsg = raw ÷ it, target ≥ {target})")
    } else if v.get("ran").and_then(|x| x.as_bool()) == Some(true) {
        format!(
            "{head}: {} ran, but no run of it could be read; see \"Failed runs\")",
            text("fio").map_or("fio".to_string(), |f| format!("fio {f}"))
        )
    } else {
        format!(
            "{head}: not run: {})",
            text("reason").unwrap_or("no reason recorded")
        )
    }
}

/// The printed table.
pub fn table(r: &Results, ratios: &Ratios) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Block cases on the same LUN (host 0): throughput (p50 latency)"
    );
    // The third anchor's columns only where its runs are.
    let rows = r.rows();
    let bsg = rows.iter().any(|row| row.fio_uring_cmd_bsg.is_some());
    let _ = write!(
        s,
        "{:<8} {:<18} {:>22} {:>22} {:>22}",
        "LUN", "case", "raw (ours)", "fio sg", "fio uring+direct"
    );
    if bsg {
        let _ = write!(s, " {:>22}", "fio uring_cmd bsg");
    }
    let _ = write!(s, "   {:>7} {:>7}", "×sg", "×uring");
    if bsg {
        let _ = write!(s, " {:>7}", "×bsg");
    }
    s.push('\n');
    let cell = |case: &str, m: &Option<Measured>| -> String {
        match m {
            Some(m) => {
                let (v, metric) = throughput(case, m);
                format!("{} {} ({}µs)", num(v), unit(metric), num(m.p50_us))
            }
            None => "-".into(),
        }
    };
    let find = |list: &[Ratio], lun: &str, case: &str| -> String {
        list.iter()
            .find(|x| x.lun.as_deref() == Some(lun) && x.case.as_deref() == Some(case))
            .map_or("-".into(), |x| {
                format!(
                    "{:.2}{}",
                    x.ratio,
                    if x.met == Some(false) { "!" } else { "" }
                )
            })
    };
    for row in &rows {
        let _ = write!(
            s,
            "{:<8} {:<18} {:>22} {:>22} {:>22}",
            row.lun,
            row.case,
            cell(&row.case, &row.raw),
            cell(&row.case, &row.fio_sg),
            cell(&row.case, &row.fio_uring_direct),
        );
        if bsg {
            let _ = write!(s, " {:>22}", cell(&row.case, &row.fio_uring_cmd_bsg));
        }
        let _ = write!(
            s,
            "   {:>7} {:>7}",
            find(&ratios.raw_vs_fio_sg, &row.lun, &row.case),
            find(&ratios.raw_vs_fio_uring_direct, &row.lun, &row.case),
        );
        if bsg {
            let _ = write!(
                s,
                " {:>7}",
                find(&ratios.raw_vs_fio_uring_cmd_bsg, &row.lun, &row.case)
            );
        }
        s.push('\n');
    }
    let mut engines: Vec<String> = rows
        .iter()
        .filter_map(|row| row.raw.as_ref()?.engine.clone())
        .collect();
    engines.sort();
    engines.dedup();
    let _ = writeln!(
        s,
        "(raw ran on: {}; ×sg target ≥ {}, ×uring target ≥ {} ({} for {MIXED_CASE} on bsg); ! = not met)",
        if engines.is_empty() {
            "its default engine".to_string()
        } else {
            engines.join(", ")
        },
        targets::RAW_VS_FIO_SG,
        targets::RAW_VS_FIO_URING,
        targets::RAW_VS_FIO_URING_MIXED_BSG
    );
    let _ = writeln!(s, "{}", fio_bsg_line(&r.fio_bsg()));
    let most = r.runs.values().map(|m| m.rounds_iops.len()).max();
    if let Some(n) = most.filter(|&n| n > 1) {
        let _ = writeln!(
            s,
            "(each cell: the round with the median MB/s (1 MiB, mixed) or IOPS of up to {n}; every round's figures are in the JSON)"
        );
    }
    if !ratios.raw_vs_sgv3.is_empty() {
        let _ = writeln!(
            s,
            "\nraw on its default engine (bsg where the kernel has it) / raw on sg v3, same LUN; the sg v3 runs against fio"
        );
        let _ = writeln!(
            s,
            "  {:<8} {:<18} {:>10}   {:>10} {:<8}   {:>7}   {:>7} {:>7}",
            "LUN", "case", "default", "sg v3", "", "×sgv3", "sgv3×sg", "×uring"
        );
        for x in &ratios.raw_vs_sgv3 {
            let (lun, case) = (
                x.lun.as_deref().unwrap_or("-"),
                x.case.as_deref().unwrap_or("-"),
            );
            let _ = writeln!(
                s,
                "  {:<8} {:<18} {:>10} / {:>10} {:<8}   {:>7.2}   {:>7} {:>7}",
                lun,
                case,
                num(x.value),
                num(x.reference),
                x.metric,
                x.ratio,
                find(&ratios.sgv3_vs_fio_sg, lun, case),
                find(&ratios.sgv3_vs_fio_uring_direct, lun, case),
            );
        }
    }
    let _ = writeln!(s, "\nSTP and TCP");
    for stem in [
        "stp-vendor-goodput",
        "sgv3-stp-vendor-goodput",
        CONNECTIONS_RUN,
        "stp-block-goodput",
        BLOCK_ON_MEMBERS_RUN,
        "tcp-goodput",
        "stp-vendor-rtt",
        "stp-block-rtt",
        BLOCK_ON_MEMBERS_RTT_RUN,
        "tcp-rtt",
    ] {
        if let Some(m) = r.get(stem) {
            let _ = writeln!(
                s,
                "  {:<20} {:>9} MB/s {:>9} ops/s   p50 {:>9} µs  p99 {:>9} µs  p99.9 {:>9} µs",
                stem,
                num(m.mb_per_s),
                num(m.iops),
                num(m.p50_us),
                num(m.p99_us),
                num(m.p999_us)
            );
        }
    }
    let c = &ratios.ceilings;
    if r.protection.is_some() || c.mailbox_ceiling_mbps.is_some() || !r.stp_protection.is_empty() {
        let mbps = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{} MB/s", num(v)));
        let _ = writeln!(s, "\nCeilings for STP goodput (this boot)");
        let _ = writeln!(
            s,
            "  {:<26} {:>12}   {}",
            "protection",
            c.protection.as_deref().unwrap_or("unknown"),
            c.protection_from
        );
        for (k, v, is) in [
            (
                "protection_ceiling_mbps",
                c.protection_ceiling_mbps,
                &c.protection_ceiling_is,
            ),
            (
                "mailbox_ceiling_mbps",
                c.mailbox_ceiling_mbps,
                &c.mailbox_ceiling_is,
            ),
            (
                "ceiling_mbps",
                c.ceiling_mbps,
                &format!("the smaller: {}", c.ceiling_is),
            ),
            (
                "block: mailbox ceiling",
                c.block_mailbox_ceiling_mbps,
                &c.block_mailbox_ceiling_is,
            ),
            (
                "block: ceiling",
                c.block_ceiling_mbps,
                &format!("the smaller: {}", c.block_ceiling_is),
            ),
        ] {
            let _ = writeln!(s, "  {k:<26} {:>12}   {is}", mbps(v));
        }
        if let Some(p) = &r.protection {
            let rate = |n: &str| p.case(n).map(|x| x.median_mbps);
            let _ = writeln!(
                s,
                "  {:<26} {:>12}   seal {}, open {} (one core; v2's default, for comparison)",
                "aes-256-gcm",
                mbps(c.aes256gcm_ceiling_mbps),
                mbps(rate("aes256gcm-seal")),
                mbps(rate("aes256gcm-open")),
            );
        }
    }
    let _ = writeln!(s, "\nRatios (value / reference)");
    for (k, x) in ratios.singles() {
        if let Some(x) = x {
            let _ = writeln!(
                s,
                "  {:<38} {:>8.2}  = {} / {} {}   {}",
                k,
                x.ratio,
                num(x.value),
                num(x.reference),
                unit(&x.metric),
                verdict(x)
            );
            if k.ends_with("_vs_mailbox_ceiling") {
                let _ = writeln!(s, "    reference: {}", x.reference_is);
            }
        }
    }
    let t = ratios.targeted();
    let met = t.iter().filter(|(_, x)| x.met == Some(true)).count();
    let _ = writeln!(s, "\nTargets met: {met} of {}", t.len());
    for (k, x) in &t {
        if x.met == Some(false) {
            let at = match (&x.lun, &x.case) {
                (Some(l), Some(c)) => format!(" [{l} {c}]"),
                _ => String::new(),
            };
            let _ = writeln!(s, "  not met: {k}{at}: {:.2} ({})", x.ratio, verdict(x));
        }
    }
    s.push_str(&r.backup.table());
    if !r.failed.is_empty() {
        let _ = writeln!(s, "\nFailed runs:");
        for (k, why) in &r.failed {
            let _ = writeln!(s, "  {k}: {why}");
        }
    }
    s
}

/// The plot's series: QD1 4 KiB writes on the STG LUN three (or four) ways, and the
/// 64-byte round trips.
pub fn plot(r: &Results) -> String {
    let mut series = Vec::new();
    for (stem, label) in [
        ("raw-stg-randwrite-4k-qd1", "raw 4 KiB write QD1 (stg LUN)"),
        ("fio-sg-stg-randwrite-4k-qd1", "fio sg 4 KiB write QD1"),
        (
            "fio-uring-stg-randwrite-4k-qd1",
            "fio io_uring O_DIRECT 4 KiB write QD1",
        ),
        (
            "fio-uringcmd-stg-randwrite-4k-qd1",
            "fio io_uring_cmd bsg 4 KiB write QD1",
        ),
        ("stp-vendor-rtt", "STP vendor 64 B round trip"),
        ("stp-block-rtt", "STP block 64 B round trip"),
        ("tcp-rtt", "TCP loopback 64 B round trip"),
    ] {
        if let Some(d) = r.dists.get(stem) {
            series.push((label.to_string(), d.clone()));
        }
    }
    hist::svg("LIO in a QEMU TCG guest: latency by percentile", &series)
}

/// Runs `stp bench report`.
pub fn run(args: &ReportArgs) -> Result<()> {
    let r = Results::load(&args.dir)?;
    if r.runs.is_empty() && r.backup.is_empty() {
        bail!(
            "{} holds no results (raw-*.json, fio-*.json, stp-*.json, tcp-*.json, backup-*.json); \
             {} failed",
            args.dir.display(),
            r.failed.len()
        );
    }
    let ratios = Ratios::of(&r);
    let doc = document(&r, &ratios);
    let text = serde_json::to_string_pretty(&doc)?;
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(out, format!("{text}\n"))
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(p) = &args.plot {
        std::fs::write(p, plot(&r)).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{text}");
    } else {
        print!("{}", table(&r, &ratios));
        if let Some(out) = &args.out {
            println!("\nwritten: {}", out.display());
        }
        if let Some(p) = &args.plot {
            println!("plot:    {}", p.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured in the test VM: fio 3.33, `--ioengine=sg`, 4 KiB random
    /// writes at QD1 for 2 s on an STG LUN, `--lat_percentiles=1`.
    const FIO_SG: &str = include_str!("testdata/fio-sg-randwrite-4k-qd1.json");
    /// Captured in the test VM (kernel 7.3.4): upstream fio built from git
    /// (3.42-135-gf5344, `sim-target/vm/fetch-fio --source`),
    /// `--ioengine=io_uring_cmd --cmd_type=bsg`, 4 KiB random writes at QD1
    /// for 1 s on an STG LUN's `/dev/bsg/0:0:1:0`, `--lat_percentiles=1`.
    const FIO_URINGCMD: &str = include_str!("testdata/fio-uringcmd-randwrite-4k-qd1.json");
    /// Its write IOPS as the file spells them.
    const FIO_URINGCMD_IOPS: &str = "151.574803";

    fn ours(iops: f64, mb: f64, p50: f64, p999: f64) -> String {
        serde_json::json!({
            "schema": 1, "mode": "raw", "test": "x", "transport": "sg", "paths": [],
            "params": {}, "ops": 100, "bytes": 1, "seconds": 1.0, "iops": iops,
            "mb_per_s": mb, "cpu": {"user_s": 0.0, "sys_s": 0.0, "s_per_gb": 0.0},
            "latency_us": {"count": 100, "min": 1.0, "mean": p50, "p50": p50,
                           "p90": p50, "p99": p999, "p999": p999, "max": p999}
        })
        .to_string()
    }

    #[test]
    fn fio_sample_parses() {
        let m = parse_fio(FIO_SG, "fio.json").unwrap();
        assert!((m.iops - 396.301849).abs() < 1e-6, "{m:?}");
        assert!((m.mb_per_s - 1.623252).abs() < 1e-6);
        assert_eq!(m.ops, 793);
        // lat_ns percentiles: 50th = 847,872 ns.
        assert!((m.p50_us - 847.872).abs() < 1e-3, "{m:?}");
        assert!(m.p50_us <= m.p99_us && m.p99_us <= m.p999_us);
        let d = fio_distribution(FIO_SG).unwrap();
        assert_eq!(d.first().unwrap().quantile, 0.0);
        assert_eq!(d.last().unwrap().quantile, 1.0);
        assert_eq!(d.last().unwrap().total, 793);
        assert!(d.windows(2).all(|w| w[0].value_us <= w[1].value_us));
        // Notes fio prints before its JSON are skipped.
        let noisy = format!("fio: note: something\n{FIO_SG}");
        assert_eq!(parse_fio(&noisy, "fio.json").unwrap(), m);
        assert!(parse_fio("{\"jobs\": []}", "x").is_err());
        assert!(parse_fio("not json", "x").is_err());
    }

    #[test]
    fn fio_reads_the_direction_that_worked() {
        let v: serde_json::Value = serde_json::from_str(FIO_SG).unwrap();
        let mut j = v.clone();
        // Swap directions: a read job.
        let w = j["jobs"][0]["write"].take();
        j["jobs"][0]["write"] = j["jobs"][0]["read"].take();
        j["jobs"][0]["read"] = w;
        let m = parse_fio(&j.to_string(), "x").unwrap();
        assert!((m.iops - 396.301849).abs() < 1e-6);
        // A mixed job: both directions' throughput, the larger one's
        // percentiles.
        let mut mixed = v.clone();
        mixed["jobs"][0]["read"] = v["jobs"][0]["write"].clone();
        mixed["jobs"][0]["read"]["total_ios"] = 10.into();
        mixed["jobs"][0]["read"]["iops"] = 100.0.into();
        mixed["jobs"][0]["read"]["bw_bytes"] = 4e6.into();
        let m = parse_fio(&mixed.to_string(), "x").unwrap();
        let only = parse_fio(FIO_SG, "x").unwrap();
        assert!((m.iops - (only.iops + 100.0)).abs() < 1e-6);
        assert!((m.mb_per_s - (only.mb_per_s + 4.0)).abs() < 1e-6);
        assert_eq!(m.ops, only.ops + 10);
        assert_eq!(m.p99_us, only.p99_us);
        assert_eq!(throughput(MIXED_CASE, &m), (m.mb_per_s, "mb_per_s"));
        assert_eq!(throughput("randread-4k-qd16", &m), (m.iops, "iops"));
        // Ours, mixed: the reads' percentiles.
        let ours = serde_json::json!({
            "schema": super::super::SCHEMA, "ops": 10, "iops": 10.0, "mb_per_s": 1.0,
            "latency_us": {"p50": 1.0, "p99": 2.0, "p999": 3.0},
            "read": {"ops": 7, "latency_us": {"p50": 4.0, "p99": 5.0, "p999": 6.0}},
            "write": {"ops": 3, "latency_us": {"p50": 7.0, "p99": 8.0, "p999": 9.0}},
        });
        let m = parse_ours(&ours.to_string(), "x").unwrap();
        assert_eq!((m.p50_us, m.p99_us, m.p999_us), (4.0, 5.0, 6.0));
        let mut e = v;
        e["jobs"][0]["error"] = 5.into();
        assert!(parse_fio(&e.to_string(), "x").is_err());
    }

    #[test]
    fn hgrm_round_trip() {
        let mut h = hist::new_histogram();
        for us in [10u64, 20, 30, 40, 1000] {
            hist::record(&mut h, std::time::Duration::from_micros(us));
        }
        let d = parse_hgrm(&hist::hgrm(&h)).unwrap();
        assert_eq!(d.last().unwrap().quantile, 1.0);
        assert_eq!(d.last().unwrap().total, 5);
        assert!((d.last().unwrap().value_us - 1000.0).abs() < 1.0);
        assert!(parse_hgrm("# nothing\n").is_err());
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stp-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn ratios_targets_and_document() {
        let d = scratch("ratios");
        let w = |f: &str, t: &str| std::fs::write(d.join(f), t).unwrap();
        // fio sg does 396 IOPS at QD1 writes: 1000 is 2.52x (met); the
        // uring peer at 1200 makes it 0.83x (not met).
        w("fio-sg-stg-randwrite-4k-qd1.json", FIO_SG);
        w(
            "raw-stg-randwrite-4k-qd1.json",
            &ours(1000.0, 4.096, 500.0, 900.0),
        );
        let uring = FIO_SG.replace("396.301849", "1200.0");
        w("fio-uring-stg-randwrite-4k-qd1.json", &uring);
        w(
            "raw-stg-write-1m-qd8.json",
            &ours(100.0, 100.0, 8000.0, 9000.0),
        );
        w(
            "sgv3-stg-randwrite-4k-qd1.json",
            &ours(800.0, 3.2768, 600.0, 900.0),
        );
        w(
            "stp-vendor-goodput.json",
            &ours(50.0, 50.0, 20000.0, 30000.0),
        );
        w("stp-vendor-rtt.json", &ours(70.0, 0.01, 14000.0, 200000.0));
        w("tcp-rtt.json", &ours(9000.0, 1.0, 100.0, 300.0));
        w(
            "stp-vendor-connections-16.json",
            &ours(40.0, 40.0, 20000.0, 30000.0),
        );
        w(
            "fio-sg-ramdisk-read-1m-qd8.err",
            "fio: something broke\nexit status 1\n",
        );
        w("meta.json", "{\"kernel\": \"6.1\"}");
        let r = Results::load(&d).unwrap();
        assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
        let x = Ratios::of(&r);
        assert_eq!(x.raw_vs_fio_sg.len(), 1);
        let sg = &x.raw_vs_fio_sg[0];
        assert_eq!(sg.metric, "iops");
        assert!((sg.ratio - 1000.0 / 396.301849).abs() < 1e-6);
        assert_eq!(sg.met, Some(true));
        assert_eq!(sg.case.as_deref(), Some("randwrite-4k-qd1"));
        let u = &x.raw_vs_fio_uring_direct[0];
        assert!((u.ratio - 1000.0 / 1200.0).abs() < 1e-9);
        assert_eq!(u.met, Some(false));
        let g = x.stp_vendor_goodput_vs_raw_write.as_ref().unwrap();
        assert!((g.ratio - 0.5).abs() < 1e-9);
        assert_eq!(g.met, Some(false));
        let p = x.stp_rtt_p50_vs_raw_qd1_write.as_ref().unwrap();
        assert!((p.ratio - 28.0).abs() < 1e-9);
        assert_eq!((p.better, p.met), (Better::Lower, Some(false)));
        let t = x.stp_rtt_p999_vs_own_p50.as_ref().unwrap();
        assert!((t.ratio - 200000.0 / 14000.0).abs() < 1e-9);
        assert!(x.stp_block_goodput_vs_raw_write.is_none());
        assert!(x.stp_vendor_rtt_p50_vs_tcp.unwrap().target.is_none());
        let c = x.stp_vendor_16_connections_vs_1.as_ref().unwrap();
        assert!((c.ratio - 0.8).abs() < 1e-9, "40 of 50 MB/s");
        assert_eq!(c.met, Some(false));
        assert!(x.stp_block_vs_vendor_goodput_same_luns.is_none());
        w(
            "stp-block-members-goodput.json",
            &ours(45.0, 45.0, 20000.0, 30000.0),
        );
        let r = Results::load(&d).unwrap();
        let b = Ratios::of(&r)
            .stp_block_vs_vendor_goodput_same_luns
            .unwrap();
        assert!((b.ratio - 0.9).abs() < 1e-9, "45 of 50 MB/s");
        assert_eq!(b.met, Some(true));
        assert!(Ratios::of(&r).stp_block_rtt_vs_vendor_same_luns.is_none());
        w(
            "stp-block-members-rtt.json",
            &ours(30.0, 0.01, 35000.0, 300000.0),
        );
        let r = Results::load(&d).unwrap();
        let t = Ratios::of(&r).stp_block_rtt_vs_vendor_same_luns.unwrap();
        assert!((t.ratio - 2.5).abs() < 1e-9, "35 against 14 ms");
        assert_eq!((t.better, t.met), (Better::Lower, Some(false)));

        let x = Ratios::of(&r);
        let doc = document(&r, &x);
        for key in [
            "raw_vs_fio_sg",
            "raw_vs_fio_uring_direct",
            "stp_vendor_goodput_vs_raw_write",
            "stp_block_goodput_vs_raw_write",
            "stp_rtt_p50_vs_raw_qd1_write",
            "stp_rtt_p999_vs_own_p50",
            "cases",
            "machine",
            "failed",
            "summary",
        ] {
            assert!(doc.get(key).is_some(), "missing {key}");
        }
        assert_eq!(doc["schema"], REPORT_SCHEMA);
        // The block-on-members runs (goodput met, round trip not) are the
        // seventh and eighth targets.
        assert_eq!(doc["summary"]["targets"], 8);
        assert_eq!(doc["summary"]["met"], 2);
        assert!(doc["stp_block_vs_vendor_goodput_same_luns"]["value"].is_number());
        assert_eq!(doc["machine"]["guest"]["kernel"], "6.1");
        let e = &doc["raw_vs_fio_sg"][0];
        for key in [
            "lun",
            "case",
            "metric",
            "value",
            "reference",
            "ratio",
            "better",
            "target",
            "met",
        ] {
            assert!(e.get(key).is_some(), "ratio entry lacks {key}");
        }
        let text = table(&r, &x);
        assert!(text.contains("randwrite-4k-qd1"), "{text}");
        assert!(text.contains("Targets met: 2 of 8"), "{text}");
        assert!(text.contains("stp-block-members-goodput"), "{text}");
        // The default engine against sg v3 on the same case: no target.
        assert_eq!(x.raw_vs_sgv3.len(), 1);
        assert!((x.raw_vs_sgv3[0].ratio - 1.25).abs() < 1e-9);
        assert!(text.contains("raw on sg v3"), "{text}");
        assert!(text.contains("fio-sg-ramdisk-read-1m-qd8"), "{text}");
        assert!(plot(&r).starts_with("<?xml"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// `ours` with `params.protection` set.
    fn stp_run(mb: f64, protection: Option<&str>) -> String {
        let mut v: serde_json::Value = serde_json::from_str(&ours(mb, mb, 1e5, 2e5)).unwrap();
        if let Some(p) = protection {
            v["params"]["protection"] = p.into();
        }
        v.to_string()
    }

    /// A synthetic `stp bench protection --json`: (case, MB/s).
    fn protection_json(rates: &[(&str, f64)]) -> String {
        let cases = rates
            .iter()
            .map(|&(name, mbps)| protection::CaseResult {
                name: name.into(),
                what: "synthetic".into(),
                median_gbps: mbps / 1000.0,
                median_mbps: mbps,
                min_gbps: mbps / 1000.0,
                max_gbps: mbps / 1000.0,
                rounds_gbps: vec![mbps / 1000.0; 3],
                median_wall_gbps: mbps / 1000.0,
                rounds_wall_gbps: vec![mbps / 1000.0; 3],
                bytes: 3 << 20,
                ops: 3,
                seconds: 3.0,
                wall_seconds: 3.0,
                cpu_share: 1.0,
                cpu_s_per_gb: 1000.0 / mbps,
            })
            .collect();
        serde_json::to_string(&ProtectionReport {
            schema: protection::PROTECTION_SCHEMA,
            mode: "protection".into(),
            cpu: protection::CpuInfo::parse(
                "model name : QEMU TCG CPU version 2.5+\nflags : aes\n",
            ),
            build: "release".into(),
            threads: 1,
            size: 1 << 20,
            aad_bytes: 80,
            seconds_per_case: 1.0,
            rounds: 3,
            cases,
        })
        .unwrap()
    }

    #[test]
    fn ceilings_of_the_mailbox_and_the_protection() {
        let d = scratch("ceilings");
        let w = |f: &str, t: &str| std::fs::write(d.join(f), t).unwrap();
        // STG LUN: 100 MB/s written, 150 read: the mailbox carries 60.
        w("raw-stg-write-1m-qd8.json", &ours(100.0, 100.0, 8e3, 9e3));
        w("raw-stg-read-1m-qd8.json", &ours(150.0, 150.0, 8e3, 9e3));
        // Ramdisk: 200 and 200: 100.
        w(
            "raw-ramdisk-write-1m-qd8.json",
            &ours(200.0, 200.0, 4e3, 5e3),
        );
        w(
            "raw-ramdisk-read-1m-qd8.json",
            &ours(200.0, 200.0, 4e3, 5e3),
        );
        // One core: AES-256-GCM seals at 80, opens at 50; BLAKE3 40, CRC 120.
        w(
            "protection.json",
            &protection_json(&[
                ("aes256gcm-seal", 80.0),
                ("aes256gcm-open", 50.0),
                ("blake3-keyed", 40.0),
                ("crc32c", 120.0),
                ("memcpy", 2000.0),
            ]),
        );
        w(
            "stp-vendor-goodput.json",
            &stp_run(30.0, Some("aes-256-gcm")),
        );
        w(
            "stp-block-goodput.json",
            &stp_run(20.0, Some("aes-256-gcm")),
        );
        let r = Results::load(&d).unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(r.protection.is_some());
        let x = Ratios::of(&r);
        let c = &x.ceilings;
        assert_eq!(c.protection.as_deref(), Some("aes-256-gcm"));
        assert_eq!(c.protection_ceiling_mbps, Some(50.0));
        assert_eq!(c.aes256gcm_ceiling_mbps, Some(50.0));
        assert!((c.mailbox_ceiling_mbps.unwrap() - 60.0).abs() < 1e-9);
        assert!((c.block_mailbox_ceiling_mbps.unwrap() - 100.0).abs() < 1e-9);
        // The protection is the tighter bound on both LUNs here.
        assert_eq!(c.ceiling_mbps, Some(50.0));
        assert!(c.ceiling_is.starts_with("protection"), "{}", c.ceiling_is);
        assert_eq!(c.block_ceiling_mbps, Some(50.0));
        let v = x.stp_vendor_goodput_vs_mailbox_ceiling.as_ref().unwrap();
        assert!((v.ratio - 0.6).abs() < 1e-9, "{v:?}");
        assert_eq!(
            (v.target, v.met, v.better),
            (Some(0.8), Some(false), Better::Higher)
        );
        let b = x.stp_block_goodput_vs_mailbox_ceiling.as_ref().unwrap();
        assert!((b.ratio - 0.4).abs() < 1e-9, "{b:?}");
        // The existing goodput ratio is still there.
        let g = x.stp_vendor_goodput_vs_raw_write.as_ref().unwrap();
        assert!((g.ratio - 0.3).abs() < 1e-9);

        let doc = document(&r, &x);
        assert_eq!(doc["protection"], "aes-256-gcm");
        assert_eq!(doc["protection_ceiling_mbps"], 50.0);
        assert!((doc["mailbox_ceiling_mbps"].as_f64().unwrap() - 60.0).abs() < 1e-9);
        assert_eq!(doc["ceiling_mbps"], 50.0);
        assert!(
            (doc["stp_vendor_goodput_vs_mailbox_ceiling"]["ratio"]
                .as_f64()
                .unwrap()
                - 0.6)
                .abs()
                < 1e-9
        );
        assert!(doc["stp_block_goodput_vs_mailbox_ceiling"]["ratio"].is_number());
        assert!(doc["stp_vendor_goodput_vs_raw_write"]["ratio"].is_number());
        assert_eq!(doc["ceilings"]["block_ceiling_mbps"], 50.0);
        assert_eq!(
            doc["protection_bench"]["cpu"]["model"],
            "QEMU TCG CPU version 2.5+"
        );
        // The goodput-vs-raw target and the two goodput-vs-ceiling targets.
        assert_eq!(doc["summary"]["targets"], 3);
        let text = table(&r, &x);
        for want in [
            "Ceilings for STP goodput",
            "protection_ceiling_mbps",
            "mailbox_ceiling_mbps",
            "ceiling_mbps",
            "stp_vendor_goodput_vs_mailbox_ceiling",
            "stp_block_goodput_vs_mailbox_ceiling",
            "reference: ceiling: protection (aes-256-gcm, one core)",
            "1/(1/raw write + 1/raw read), 1 MiB QD8, stg LUN: 100.0 and 150.0 MB/s",
        ] {
            assert!(text.contains(want), "no `{want}` in\n{text}");
        }

        // Today's v1 frames: BLAKE3 then CRC32C over every byte, 30 MB/s;
        // the protection still binds.
        w(
            "stp-vendor-goodput.json",
            &stp_run(30.0, Some("blake3-keyed+crc32c")),
        );
        w(
            "stp-block-goodput.json",
            &stp_run(20.0, Some("blake3-keyed+crc32c")),
        );
        let x = Ratios::of(&Results::load(&d).unwrap());
        let c = &x.ceilings;
        assert!(
            (c.protection_ceiling_mbps.unwrap() - 30.0).abs() < 1e-9,
            "{c:?}"
        );
        assert!((x.stp_vendor_goodput_vs_mailbox_ceiling.unwrap().ratio - 1.0).abs() < 1e-9);

        // A fast core: the mailbox binds.
        w(
            "protection.json",
            &protection_json(&[("aes256gcm-seal", 9000.0), ("aes256gcm-open", 8000.0)]),
        );
        w(
            "stp-vendor-goodput.json",
            &stp_run(30.0, Some("aes-256-gcm")),
        );
        let x = Ratios::of(&Results::load(&d).unwrap());
        assert!((x.ceilings.ceiling_mbps.unwrap() - 60.0).abs() < 1e-9);
        assert!(x.ceilings.ceiling_is.starts_with("mailbox (stg LUN)"));
        assert!((x.stp_vendor_goodput_vs_mailbox_ceiling.unwrap().ratio - 0.5).abs() < 1e-9);

        // Runs that record no protection (older builds) and no
        // protection.json: the protection is unknown, the mailbox alone
        // bounds, and the report says so.
        std::fs::remove_file(d.join("protection.json")).unwrap();
        w("stp-vendor-goodput.json", &stp_run(30.0, None));
        w("stp-block-goodput.json", &stp_run(20.0, None));
        let r = Results::load(&d).unwrap();
        let x = Ratios::of(&r);
        let c = &x.ceilings;
        assert_eq!(
            (c.protection.as_deref(), c.protection_ceiling_mbps),
            (None, None)
        );
        assert!(
            c.ceiling_is.contains("protection ceiling is unknown"),
            "{}",
            c.ceiling_is
        );
        assert!(
            (x.stp_vendor_goodput_vs_mailbox_ceiling
                .as_ref()
                .unwrap()
                .ratio
                - 0.5)
                .abs()
                < 1e-9
        );
        let doc = document(&r, &x);
        assert!(doc["protection"].is_null() && doc["protection_ceiling_mbps"].is_null());
        assert!(table(&r, &x).contains("not recorded"));

        // A protection.json that is not one is a failed run, not a crash.
        w("protection.json", "{\"schema\": 1}");
        let r = Results::load(&d).unwrap();
        assert!(r.failed.contains_key("protection"), "{:?}", r.failed);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rounds_become_their_median() {
        assert_eq!(
            split_round("raw-stg-write-1m-qd8.r2"),
            ("raw-stg-write-1m-qd8", Some(2))
        );
        assert_eq!(split_round("stp-vendor-rtt"), ("stp-vendor-rtt", None));
        assert_eq!(split_round("a.rx"), ("a.rx", None));
        let d = scratch("rounds");
        let w = |f: &str, t: &str| std::fs::write(d.join(f), t).unwrap();
        w(
            "raw-stg-randwrite-4k-qd1.r1.json",
            &ours(300.0, 1.2, 900.0, 990.0),
        );
        w(
            "raw-stg-randwrite-4k-qd1.r2.json",
            &ours(100.0, 0.4, 700.0, 990.0),
        );
        w(
            "raw-stg-randwrite-4k-qd1.r3.json",
            &ours(200.0, 0.8, 800.0, 990.0),
        );
        w("fio-sg-stg-randwrite-4k-qd1.r1.json", FIO_SG);
        // A load curve's document is no run of the table, nor a failure.
        w(
            "curve-ramdisk-randread-4k-qd16.json",
            "{\"schema\":1,\"mode\":\"curve\",\"points\":[]}",
        );
        w(
            "fio-sg-stg-randwrite-4k-qd1.r2.err",
            "stp: error: gone\nexit status 1\n",
        );
        let r = Results::load(&d).unwrap();
        let raw = &r.runs["raw-stg-randwrite-4k-qd1"];
        assert_eq!(raw.iops, 200.0);
        assert_eq!(raw.p50_us, 800.0);
        assert_eq!(raw.rounds_iops, [300.0, 100.0, 200.0]);
        assert!(r.runs["fio-sg-stg-randwrite-4k-qd1"].rounds_iops.is_empty());
        let rows = r.rows();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(rows[0].raw.is_some() && rows[0].fio_sg.is_some());
        assert!(r.failed.contains_key("fio-sg-stg-randwrite-4k-qd1.r2"));
        assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
        assert!(!r.runs.keys().any(|k| k.starts_with("curve-")));
        assert!(r.dists.contains_key("fio-sg-stg-randwrite-4k-qd1"));
        let x = Ratios::of(&r);
        assert!((x.raw_vs_fio_sg[0].ratio - 200.0 / 396.301849).abs() < 1e-9);
        assert!(table(&r, &x).contains("or IOPS of up to 3"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// `ours` as a mixed run on `engine` (what `stp bench raw` writes).
    fn ours_on(engine: &str, iops: f64, mb: f64) -> String {
        let mut v: serde_json::Value =
            serde_json::from_str(&ours(iops, mb, 1000.0, 5000.0)).unwrap();
        v["engines"] = serde_json::json!([{"path": "/dev/sg4", "engine": engine, "reason": "x"}]);
        v.to_string()
    }

    /// fio's sample with both directions' throughput set (a mixed job).
    fn fio_mixed(read_bw: f64, write_bw: f64, iops: f64) -> String {
        let mut v: serde_json::Value = serde_json::from_str(FIO_SG).unwrap();
        v["jobs"][0]["read"] = v["jobs"][0]["write"].clone();
        for (dir, bw) in [("read", read_bw), ("write", write_bw)] {
            v["jobs"][0][dir]["bw_bytes"] = bw.into();
            v["jobs"][0][dir]["iops"] = (iops / 2.0).into();
        }
        v.to_string()
    }

    #[test]
    fn the_mixed_case_per_engine() {
        let d = scratch("mixed");
        let w = |f: &str, t: &str| std::fs::write(d.join(f), t).unwrap();
        let stem = format!("ramdisk-{MIXED_CASE}");
        // Three rounds whose IOPS and MB/s rank differently: the median by
        // MB/s (the mixed case's metric) is round 3's 1000 MB/s, though
        // round 2 has the median IOPS.
        w(
            &format!("raw-{stem}.r1.json"),
            &ours_on("bsg", 9000.0, 1200.0),
        );
        w(
            &format!("raw-{stem}.r2.json"),
            &ours_on("bsg", 8000.0, 900.0),
        );
        w(
            &format!("raw-{stem}.r3.json"),
            &ours_on("bsg", 7000.0, 1000.0),
        );
        w(
            &format!("sgv3-{stem}.r1.json"),
            &ours_on("sg", 6000.0, 600.0),
        );
        w(
            &format!("fio-uring-{stem}.r1.json"),
            &fio_mixed(700e6, 300e6, 5000.0),
        );
        w(
            &format!("fio-sg-{stem}.r1.json"),
            &fio_mixed(70e6, 30e6, 500.0),
        );
        let r = Results::load(&d).unwrap();
        let raw = &r.runs[&format!("raw-{stem}")];
        assert_eq!(raw.mb_per_s, 1000.0);
        assert_eq!(raw.rounds_mb_per_s, [1200.0, 900.0, 1000.0]);
        assert_eq!(raw.rounds_iops, [9000.0, 8000.0, 7000.0]);
        assert_eq!(raw.engine.as_deref(), Some("bsg"));
        let x = Ratios::of(&r);
        // Default engine (bsg) against fio io_uring: 1000 / 1000 MB/s,
        // target 1.0 on bsg; against fio sg: 10x.
        let u = &x.raw_vs_fio_uring_direct[0];
        assert_eq!(
            (u.metric.as_str(), u.engine.as_deref()),
            ("mb_per_s", Some("bsg"))
        );
        assert!((u.ratio - 1.0).abs() < 1e-9, "{u:?}");
        assert_eq!((u.target, u.met), (Some(1.0), Some(true)));
        assert!(u.value_is.contains("bsg"), "{}", u.value_is);
        assert!((x.raw_vs_fio_sg[0].ratio - 10.0).abs() < 1e-9);
        // sg v3: 600 MB/s, 0.6x io_uring against its 0.9 target, 6x sg.
        let s3 = &x.sgv3_vs_fio_uring_direct[0];
        assert_eq!(s3.engine.as_deref(), Some("sg"));
        assert!((s3.ratio - 0.6).abs() < 1e-9);
        assert_eq!((s3.target, s3.met), (Some(0.9), Some(false)));
        assert_eq!(x.sgv3_vs_fio_sg[0].met, Some(true));
        // The summary is the default engine's: two targets, both met.
        let doc = document(&r, &x);
        assert_eq!(doc["summary"]["targets"], 2);
        assert_eq!(doc["summary"]["met"], 2);
        assert_eq!(doc["sgv3_vs_fio_uring_direct"][0]["engine"], "sg");
        assert_eq!(doc["raw_vs_fio_uring_direct"][0]["case"], MIXED_CASE);
        let text = table(&r, &x);
        assert!(text.contains("raw ran on: bsg"), "{text}");
        assert!(text.contains("0.60!"), "{text}");
        // Without the bsg engine the mixed case keeps the 0.9 target.
        assert_eq!(targets::raw_vs_fio_uring(MIXED_CASE, Some("sg")), 0.9);
        assert_eq!(targets::raw_vs_fio_uring("read-1m-qd8", Some("bsg")), 0.9);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// fio's io_uring_cmd engine with cmd_type=bsg (the third anchor): a
    /// column, a ratio with target 1.0 and the fio that ran it where its
    /// runs are; the reason from meta.json where they are not.
    #[test]
    fn the_bsg_anchor_with_and_without_its_runs() {
        let reason = "fio 3.41 (Debian 3.41-2, sid): the cmd_type option of its io_uring_cmd engine lists nvme only, not bsg; not built";
        let d = scratch("no-bsg");
        let w = |f: &str, t: &str| std::fs::write(d.join(f), t).unwrap();
        w("fio-sg-stg-randwrite-4k-qd1.json", FIO_SG);
        w(
            "raw-stg-randwrite-4k-qd1.json",
            &ours_on("bsg", 1000.0, 4.096),
        );
        let meta = serde_json::json!({"kernel": "7.3.4+deb13-amd64", "fio": "fio-3.33",
            "fio_bsg": {"ran": false, "fio": "3.41-2", "suite": "sid", "path": null,
                        "reason": reason, "nodes": {}}});
        w("meta.json", &meta.to_string());
        let r = Results::load(&d).unwrap();
        let x = Ratios::of(&r);
        assert!(x.raw_vs_fio_uring_cmd_bsg.is_empty());
        let doc = document(&r, &x);
        assert_eq!(doc["fio_bsg"]["ran"], false);
        assert_eq!(doc["fio_bsg"]["fio"], "3.41-2");
        assert_eq!(doc["fio_bsg"]["reason"], reason);
        assert_eq!(doc["fio_bsg"]["runs"], 0);
        assert_eq!(doc["raw_vs_fio_uring_cmd_bsg"], serde_json::json!([]));
        assert_eq!(doc["summary"]["targets"], 1);
        let text = table(&r, &x);
        assert!(text.contains(&format!("not run: {reason}")), "{text}");
        assert!(!text.contains("×bsg"), "{text}");
        // Results from before the third anchor: their meta.json says nothing.
        w("meta.json", "{\"kernel\": \"6.1\"}");
        let old = Results::load(&d).unwrap();
        let v = old.fio_bsg();
        assert_eq!(v["ran"], false);
        assert!(v["reason"]
            .as_str()
            .unwrap()
            .contains("meta.json does not say"));
        std::fs::remove_dir_all(&d).unwrap();

        let d = scratch("bsg");
        let w = |f: &str, t: &str| std::fs::write(d.join(f), t).unwrap();
        w("fio-sg-stg-randwrite-4k-qd1.json", FIO_SG);
        w(
            "raw-stg-randwrite-4k-qd1.json",
            &ours_on("bsg", 1000.0, 4.096),
        );
        // fio io_uring_cmd bsg: 1250 IOPS, raw 0.80x (not met); on the
        // ramdisk 500 against raw's 600 (1.2x, met).
        w(
            "fio-uringcmd-stg-randwrite-4k-qd1.json",
            &FIO_URINGCMD.replace(FIO_URINGCMD_IOPS, "1250.0"),
        );
        w(
            "raw-ramdisk-randwrite-4k-qd1.json",
            &ours_on("bsg", 600.0, 2.4576),
        );
        w(
            "fio-uringcmd-ramdisk-randwrite-4k-qd1.json",
            &FIO_URINGCMD.replace(FIO_URINGCMD_IOPS, "500.0"),
        );
        let meta = serde_json::json!({"kernel": "7.3.4+deb13-amd64", "fio": "fio-3.33",
            "fio_bsg": {"ran": true, "fio": "3.42", "suite": "STP_FIO",
                        "path": "/opt/fio/fio", "reason": null,
                        "nodes": {"stg": "/dev/bsg/0:0:1:0", "ramdisk": "/dev/bsg/0:0:1:4"}}});
        w("meta.json", &meta.to_string());
        let r = Results::load(&d).unwrap();
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        let rows = r.rows();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|row| row.fio_uring_cmd_bsg.is_some()));
        let x = Ratios::of(&r);
        let b = &x.raw_vs_fio_uring_cmd_bsg;
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].lun.as_deref(), Some("stg"));
        assert!((b[0].ratio - 0.8).abs() < 1e-9, "{:?}", b[0]);
        assert_eq!((b[0].target, b[0].met), (Some(1.0), Some(false)));
        assert_eq!(b[0].engine.as_deref(), Some("bsg"));
        assert!(b[0].reference_is.contains("cmd_type=bsg"));
        assert!((b[1].ratio - 1.2).abs() < 1e-9);
        assert_eq!(b[1].met, Some(true));
        let doc = document(&r, &x);
        assert_eq!(doc["fio_bsg"]["ran"], true);
        assert_eq!(doc["fio_bsg"]["fio"], "3.42");
        assert_eq!(doc["fio_bsg"]["runs"], 2);
        assert_eq!(doc["raw_vs_fio_uring_cmd_bsg"][1]["met"], true);
        assert!(doc["cases"][0]["fio_uring_cmd_bsg"]["iops"].is_number());
        // sg (2 of raw's 1), bsg (2): counted in the summary.
        assert_eq!(doc["summary"]["targets"], 3);
        let text = table(&r, &x);
        assert!(text.contains("fio uring_cmd bsg"), "{text}");
        assert!(text.contains("×bsg"), "{text}");
        assert!(text.contains("0.80!"), "{text}");
        assert!(text.contains("fio 3.42 (STP_FIO)"), "{text}");
        assert!(
            text.contains("not met: raw_vs_fio_uring_cmd_bsg [stg randwrite-4k-qd1]"),
            "{text}"
        );
        assert!(plot(&r).contains("io_uring_cmd bsg"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let d = scratch("empty");
        let e = run(&ReportArgs {
            dir: d.clone(),
            out: None,
            plot: None,
            json: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("no results"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
        assert!(Results::load(&d).is_err());
    }
}
