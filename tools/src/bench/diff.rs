//! `stp bench diff A.json B.json`: two runs side by side, each figure with
//! B / A, and a mark on differences larger than the spread their rounds
//! showed (`--rounds N`): a difference inside the spread is noise as far
//! as these runs can tell.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

/// Options of `stp bench diff`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Example:\n  stp bench raw /dev/sg3 --rw randrw --rwmix 70 --rounds 5 --json > a.json\n  \
(change something)\n  stp bench raw /dev/sg3 --rw randrw --rwmix 70 --rounds 5 --json > b.json\n  \
stp bench diff a.json b.json\n\n\
Ratios are B / A. A figure is marked `*` when the two differ by more than the larger\n\
relative spread ((max - min) / median) of either run's rounds; without --rounds in both\n\
runs the spread is unknown and nothing is marked."
)]
pub struct DiffArgs {
    /// The first run (`stp bench raw ... --json`), the reference.
    pub a: PathBuf,
    /// The second run, compared with the first.
    pub b: PathBuf,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which way is better for a figure.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// More is better (throughput).
    Higher,
    /// Less is better (latency, CPU).
    Lower,
}

/// One figure of both runs.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Row {
    /// What it is.
    pub figure: &'static str,
    /// Run A's value.
    pub a: f64,
    /// Run B's value.
    pub b: f64,
    /// b / a (0 when a is 0).
    pub ratio: f64,
    /// Which way is better.
    pub better: Better,
    /// Run A's relative spread over its rounds, if it had rounds.
    pub spread_a: Option<f64>,
    /// Run B's relative spread over its rounds.
    pub spread_b: Option<f64>,
    /// Whether the difference exceeds both spreads (`None`: unknown,
    /// a run had no rounds).
    pub beyond_spread: Option<bool>,
    /// With `beyond_spread`: whether B is better than A.
    pub b_is_better: Option<bool>,
}

/// (label, JSON pointer, key under `rounds`, better).
const FIGURES: [(&str, &str, Option<&str>, Better); 14] = [
    ("MB/s", "/mb_per_s", Some("mb_per_s"), Better::Higher),
    ("IOPS", "/iops", Some("iops"), Better::Higher),
    ("p50 µs", "/latency_us/p50", Some("p50_us"), Better::Lower),
    ("p99 µs", "/latency_us/p99", Some("p99_us"), Better::Lower),
    (
        "p99.9 µs",
        "/latency_us/p999",
        Some("p999_us"),
        Better::Lower,
    ),
    ("max µs", "/latency_us/max", None, Better::Lower),
    (
        "corrected p50 µs",
        "/corrected_latency_us/p50",
        None,
        Better::Lower,
    ),
    (
        "corrected p99 µs",
        "/corrected_latency_us/p99",
        Some("corrected_p99_us"),
        Better::Lower,
    ),
    (
        "corrected p99.9 µs",
        "/corrected_latency_us/p999",
        Some("corrected_p999_us"),
        Better::Lower,
    ),
    ("read MB/s", "/read/mb_per_s", None, Better::Higher),
    ("read p99 µs", "/read/latency_us/p99", None, Better::Lower),
    ("write MB/s", "/write/mb_per_s", None, Better::Higher),
    ("write p99 µs", "/write/latency_us/p99", None, Better::Lower),
    ("CPU-s/GB", "/cpu/s_per_gb", None, Better::Lower),
];

fn spread(v: &Value, key: Option<&str>) -> Option<f64> {
    v.pointer(&format!("/rounds/{}/spread", key?))?.as_f64()
}

/// Compares two reports' figures.
pub fn rows(a: &Value, b: &Value) -> Vec<Row> {
    let mut out = Vec::new();
    for (figure, ptr, key, better) in FIGURES {
        let (Some(va), Some(vb)) = (
            a.pointer(ptr).and_then(Value::as_f64),
            b.pointer(ptr).and_then(Value::as_f64),
        ) else {
            continue;
        };
        let ratio = if va != 0.0 { vb / va } else { 0.0 };
        let (sa, sb) = (spread(a, key), spread(b, key));
        let beyond = match (sa, sb) {
            (Some(x), Some(y)) if va != 0.0 => Some((ratio - 1.0).abs() > x.max(y)),
            _ => None,
        };
        let b_better = beyond.filter(|&x| x).map(|_| match better {
            Better::Higher => vb > va,
            Better::Lower => vb < va,
        });
        out.push(Row {
            figure,
            a: va,
            b: vb,
            ratio,
            better,
            spread_a: sa,
            spread_b: sb,
            beyond_spread: beyond,
            b_is_better: b_better,
        });
    }
    out
}

fn load(path: &PathBuf) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not JSON; give the output of `stp bench raw ... --json`",
            path.display()
        )
    })?;
    if v.get("mb_per_s").is_none() || v.get("latency_us").is_none() {
        bail!(
            "{} is not the report of one run (no mb_per_s / latency_us); give the output of `stp bench raw|stp|tcp ... --json`",
            path.display()
        );
    }
    Ok(v)
}

fn describe(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let rounds = v
        .pointer("/rounds/n")
        .and_then(Value::as_u64)
        .map_or("1 round".to_string(), |n| format!("{n} rounds"));
    format!("{} {} ({}), {rounds}", s("mode"), s("test"), s("transport"))
}

/// Runs `stp bench diff`.
pub fn run(args: &DiffArgs) -> Result<ExitCode> {
    let (a, b) = (load(&args.a)?, load(&args.b)?);
    let rows = rows(&a, &b);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "schema": super::SCHEMA,
                "a": { "file": args.a.display().to_string(), "run": describe(&a) },
                "b": { "file": args.b.display().to_string(), "run": describe(&b) },
                "rows": rows,
            }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("A: {}  [{}]", args.a.display(), describe(&a));
    println!("B: {}  [{}]", args.b.display(), describe(&b));
    if a.get("test") != b.get("test") || a.get("transport") != b.get("transport") {
        println!("note: the two runs are of different workloads or transports");
    }
    println!(
        "{:<20} {:>12} {:>12} {:>7}  spread A / B",
        "figure", "A", "B", "B/A"
    );
    let pct = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{:.1} %", 100.0 * s));
    for r in &rows {
        let mark = match (r.beyond_spread, r.b_is_better) {
            (Some(true), Some(true)) => " *  beyond the spread: B better",
            (Some(true), _) => " *  beyond the spread: B worse",
            (Some(false), _) => "    within the spread",
            (None, _) => "",
        };
        println!(
            "{:<20} {:>12.1} {:>12.1} {:>7.3}  {} / {}{mark}",
            r.figure,
            r.a,
            r.b,
            r.ratio,
            pct(r.spread_a),
            pct(r.spread_b)
        );
    }
    if rows.iter().all(|r| r.beyond_spread.is_none()) {
        println!(
            "(no spread to judge by: run both with --rounds N, N ≥ 3, to have differences marked)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(mb: f64, p99: f64, spread: Option<(f64, f64)>) -> Value {
        let mut v = json!({
            "mode": "raw", "test": "randread", "transport": "in-process",
            "mb_per_s": mb, "iops": mb * 10.0,
            "latency_us": {"p50": 10.0, "p99": p99, "p999": 100.0, "max": 200.0},
            "cpu": {"s_per_gb": 1.0},
        });
        if let Some((smb, sp99)) = spread {
            v["rounds"] = json!({
                "n": 3,
                "mb_per_s": {"spread": smb},
                "iops": {"spread": smb},
                "p50_us": {"spread": 0.0},
                "p99_us": {"spread": sp99},
                "p999_us": {"spread": 0.5},
            });
        }
        v
    }

    #[test]
    fn differences_beyond_the_spread_are_marked() {
        let a = run(100.0, 50.0, Some((0.05, 0.1)));
        let b = run(110.0, 52.0, Some((0.02, 0.2)));
        let r = rows(&a, &b);
        let get = |f: &str| r.iter().find(|x| x.figure == f).unwrap();
        let mb = get("MB/s");
        assert!((mb.ratio - 1.1).abs() < 1e-9);
        // 10 % more, both spreads ≤ 5 %: beyond, and better.
        assert_eq!((mb.beyond_spread, mb.b_is_better), (Some(true), Some(true)));
        // 4 % slower p99 inside a 20 % spread: not marked.
        let p99 = get("p99 µs");
        assert_eq!((p99.beyond_spread, p99.b_is_better), (Some(false), None));
        // Worse latency beyond the spread.
        let p50 = get("p50 µs");
        assert_eq!(p50.beyond_spread, Some(false));
        let c = rows(
            &run(100.0, 50.0, Some((0.0, 0.0))),
            &run(100.0, 80.0, Some((0.0, 0.1))),
        );
        let p99 = c.iter().find(|x| x.figure == "p99 µs").unwrap();
        assert_eq!(
            (p99.beyond_spread, p99.b_is_better),
            (Some(true), Some(false))
        );
        // Figures only one side has are left out; no rounds, no marks.
        let n = rows(&run(100.0, 50.0, None), &run(200.0, 50.0, Some((0.0, 0.0))));
        assert!(n.iter().all(|x| x.beyond_spread.is_none()));
        assert!(n.iter().all(|x| !x.figure.starts_with("corrected")));
        assert_eq!(n.iter().find(|x| x.figure == "MB/s").unwrap().ratio, 2.0);
    }

    #[test]
    fn bad_input_says_what_to_give() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        std::fs::write(&p, "{\"schema\":1}").unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("--json"), "{e}");
        std::fs::write(&p, "not json").unwrap();
        assert!(format!("{:#}", load(&p).unwrap_err()).contains("--json"));
        let e = load(&dir.path().join("missing.json")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
