//! `stp bench curve`: the load curve of a workload, as vdbench's `curve`
//! draws it. A closed-loop run finds the maximum rate; then the same
//! workload runs open-loop at fixed fractions of it (10 %, 20 % … 100 % by
//! default), and each point's latency, measured from the intended issue
//! time, is plotted against the IOPS it achieved.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use super::hist;
use super::raw::{self, RawArgs};
use super::units::parse_duration;
use super::{OutArgs, Report, SCHEMA};

/// Options of `stp bench curve`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  stp bench curve --sim --rw randread --bs 4k --depth 16 --time 5s --plot curve.svg\n  \
stp bench curve /dev/sg3 --rw randrw --rwmix 70 --bssplit 4k/60,64k/30,1m/10 --ramp 2s --time 20s \\\n    \
--plot curve.svg --json > curve.json\n\n\
Every option of `stp bench raw` applies (except --rate, which the curve sets, and\n\
--log-interval); --time is per point. --plot draws p50, p99 and p99.9 (from the\n\
intended issue time) against achieved IOPS (--png FILE.png: the same as an image); the\n\
JSON holds every point's full report."
)]
pub struct CurveArgs {
    /// Percentages of the maximum rate to run at, comma-separated, each 1 to 100.
    #[arg(long, value_delimiter = ',', default_value = "10,20,30,40,50,60,70,80,90,100",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub steps: Vec<u32>,
    /// How long the closed-loop run that finds the maximum lasts (default: --time).
    #[arg(long, value_parser = parse_duration)]
    pub max_time: Option<Duration>,
    /// Write the curve here as a PNG image too (the same plot as --plot).
    #[arg(long, value_name = "FILE.png")]
    pub png: Option<std::path::PathBuf>,
    /// The workload, as for `stp bench raw`.
    #[command(flatten)]
    pub raw: RawArgs,
}

/// One point of the curve.
#[derive(Serialize, Debug)]
pub struct Point {
    /// Percent of the closed-loop maximum asked for.
    pub percent: u32,
    /// Commands per second asked for.
    pub target_iops: f64,
    /// Commands per second achieved.
    pub achieved_iops: f64,
    /// MB/s achieved.
    pub mb_per_s: f64,
    /// Latency from the intended issue time, p50, µs.
    pub p50_us: f64,
    /// p99, µs.
    pub p99_us: f64,
    /// p99.9, µs.
    pub p999_us: f64,
    /// Service time p50, µs.
    pub service_p50_us: f64,
    /// Service time p99, µs.
    pub service_p99_us: f64,
    /// How late issuing fell behind the schedule, p99, µs.
    pub issue_lag_p99_us: f64,
    /// Commands due that never went out (the rate was beyond the LUN).
    pub not_issued: u64,
    /// The point's whole report.
    pub run: Report,
}

impl Point {
    fn of(percent: u32, target: f64, run: Report) -> Point {
        let c = run.corrected_latency_us.unwrap_or(run.latency_us);
        Point {
            percent,
            target_iops: target,
            achieved_iops: run.iops,
            mb_per_s: run.mb_per_s,
            p50_us: c.p50,
            p99_us: c.p99,
            p999_us: c.p999,
            service_p50_us: run.latency_us.p50,
            service_p99_us: run.latency_us.p99,
            issue_lag_p99_us: run.fixed_rate.as_ref().map_or(0.0, |f| f.issue_lag_us.p99),
            not_issued: run.fixed_rate.as_ref().map_or(0, |f| f.not_issued),
            run,
        }
    }
}

/// The curve.
#[derive(Serialize, Debug)]
pub struct Curve {
    /// [`SCHEMA`].
    pub schema: u32,
    /// `curve`.
    pub mode: &'static str,
    /// The workload.
    pub test: String,
    /// The closed-loop run that set the maximum.
    pub max: Report,
    /// The fixed-rate runs, in the order of --steps.
    pub points: Vec<Point>,
}

/// Checks the options that do not apply to a curve.
fn check(args: &CurveArgs) -> Result<()> {
    if args.raw.rate.is_some() {
        bail!("--rate does not apply to a curve (it sets each point's rate from the maximum it finds); use --steps to choose the points");
    }
    if args.raw.log_interval.is_some() {
        bail!("--log-interval does not apply to a curve; run `stp bench raw --rate N --log-interval ...` for one point");
    }
    if args.raw.out.hgrm.is_some() {
        bail!("--hgrm does not apply to a curve (it has one distribution per point, all in the JSON); use `stp bench raw --rate N --hgrm FILE` for one point");
    }
    if args.raw.size.is_some() {
        bail!("a curve's points are timed: use --time (per point), not --size");
    }
    if args.steps.is_empty() {
        bail!("--steps needs at least one percentage, e.g. 10,50,100");
    }
    Ok(())
}

/// The (x, y) series of the plot: p50, p99, p99.9 against achieved IOPS.
pub fn series(points: &[Point]) -> hist::Series {
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by(|a, b| a.achieved_iops.total_cmp(&b.achieved_iops));
    let line = |f: fn(&Point) -> f64| sorted.iter().map(|p| (p.achieved_iops, f(p))).collect();
    vec![
        ("p50".to_string(), line(|p| p.p50_us)),
        ("p99".to_string(), line(|p| p.p99_us)),
        ("p99.9".to_string(), line(|p| p.p999_us)),
    ]
}

/// Runs a sweep: `run(None)` closed-loop for the maximum, then
/// `run(Some(rate))` at each percentage of it.
pub fn sweep(
    steps: &[u32],
    silent: bool,
    mut run: impl FnMut(Option<f64>) -> Result<Report>,
) -> Result<(Report, Vec<Point>)> {
    if steps.is_empty() {
        bail!("--steps needs at least one percentage, e.g. 10,50,100");
    }
    if !silent {
        eprintln!("curve: closed-loop run to find the maximum rate");
    }
    let max = run(None)?;
    if max.iops <= 0.0 || max.ops == 0 {
        bail!("the closed-loop run completed nothing, so there is no maximum to take fractions of");
    }
    let mut points = Vec::new();
    for &pct in steps {
        let target = max.iops * f64::from(pct) / 100.0;
        if !silent {
            eprintln!("curve: {pct} % of {:.0}/s = {target:.0}/s", max.iops);
        }
        points.push(Point::of(pct, target, run(Some(target))?));
    }
    Ok((max, points))
}

/// Writes the curve's plots (`svg`; `png`) and prints it (text, or JSON).
/// `closed` says what the closed-loop run was, e.g. `depth 16`.
pub fn emit(
    curve: &Curve,
    svg: Option<&Path>,
    png: Option<&Path>,
    json: bool,
    closed: &str,
) -> Result<()> {
    let title = format!("{} load curve ({})", curve.test, curve.max.transport);
    let x_label = "achieved IOPS (latency from the intended issue time)";
    let marker = Some((curve.max.iops, "closed-loop maximum"));
    if let Some(path) = svg {
        let doc = hist::xy_svg(&title, x_label, &series(&curve.points), marker);
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = png {
        let img = hist::xy_png(&title, x_label, &series(&curve.points), marker);
        std::fs::write(path, img).with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(curve)?);
        return Ok(());
    }
    println!("curve {} ({})", curve.test, curve.max.transport);
    println!(
        "  maximum (closed loop, {closed}): {:.0} IOPS, {:.1} MB/s, p50 {:.1} µs, p99 {:.1} µs",
        curve.max.iops, curve.max.mb_per_s, curve.max.latency_us.p50, curve.max.latency_us.p99
    );
    println!(
        "  {:>4} {:>10} {:>10} {:>9}   {:>10} {:>10} {:>10}   {:>10} {:>10}",
        "%", "asked/s", "IOPS", "MB/s", "p50 µs", "p99 µs", "p99.9 µs", "svc p99", "lag p99"
    );
    for p in &curve.points {
        println!(
            "  {:>4} {:>10.0} {:>10.0} {:>9.1}   {:>10.1} {:>10.1} {:>10.1}   {:>10.1} {:>10.1}",
            p.percent,
            p.target_iops,
            p.achieved_iops,
            p.mb_per_s,
            p.p50_us,
            p.p99_us,
            p.p999_us,
            p.service_p99_us,
            p.issue_lag_p99_us
        );
    }
    println!("  (p50/p99/p99.9 from each command's intended issue time; svc = service time; lag = issue lag)");
    for p in curve.points.iter().filter(|p| p.not_issued > 0) {
        println!(
            "  at {} %: {} commands fell due but never went out; its tail is understated",
            p.percent, p.not_issued
        );
    }
    Ok(())
}

/// Runs `stp bench curve`.
pub fn run(args: &CurveArgs) -> Result<()> {
    check(args)?;
    let inner = RawArgs {
        out: OutArgs {
            json: args.raw.out.json,
            quiet: true,
            hgrm: None,
            plot: None,
        },
        ..args.raw.clone()
    };
    let (max, points) = sweep(&args.steps, args.raw.out.silent(), |rate| match rate {
        None => raw::run(&RawArgs {
            time: args.max_time.or(inner.time),
            ..inner.clone()
        }),
        Some(r) => raw::run(&RawArgs {
            rate: Some(r),
            ..inner.clone()
        }),
    })?;
    let curve = Curve {
        schema: SCHEMA,
        mode: "curve",
        test: args.raw.test_name(),
        max,
        points,
    };
    emit(
        &curve,
        args.raw.out.plot.as_deref(),
        args.png.as_deref(),
        args.raw.out.json,
        &format!("depth {}", args.raw.depth),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::Rw;

    fn args(steps: Vec<u32>) -> CurveArgs {
        let mut raw = RawArgs::new(Rw::Randread, 4096, 4, Vec::new());
        raw.sim_lun_size = 16 << 20;
        raw.span = 16 << 20;
        raw.time = Some(Duration::from_millis(150));
        raw.out.quiet = true;
        CurveArgs {
            steps,
            max_time: None,
            png: None,
            raw,
        }
    }

    #[test]
    fn options_that_do_not_fit_a_curve_are_refused() {
        let mut a = args(vec![50]);
        a.raw.rate = Some(100.0);
        assert!(run(&a).unwrap_err().to_string().contains("--steps"));
        let mut a = args(vec![50]);
        a.raw.size = Some(1 << 20);
        assert!(run(&a).unwrap_err().to_string().contains("--time"));
        let mut a = args(vec![50]);
        a.raw.out.hgrm = Some("x.hgrm".into());
        assert!(run(&a).unwrap_err().to_string().contains("--rate N --hgrm"));
        assert!(run(&args(Vec::new()))
            .unwrap_err()
            .to_string()
            .contains("10,50,100"));
    }

    #[test]
    fn a_short_curve_on_the_simulated_array() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("curve.svg");
        let png = dir.path().join("curve.png");
        let mut a = args(vec![50, 25]);
        a.raw.out.plot = Some(svg.clone());
        a.png = Some(png.clone());
        a.raw.out.json = true;
        run(&a).unwrap();
        let doc = std::fs::read_to_string(&svg).unwrap();
        assert_eq!(doc.matches("<polyline").count(), 3);
        assert!(doc.contains("closed-loop maximum"));
        let img = std::fs::read(&png).unwrap();
        assert_eq!(&img[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&img[16..24], &[0, 0, 3, 32, 0, 0, 1, 244]); // 800 × 500
    }

    #[test]
    fn the_plot_runs_by_achieved_iops() {
        let report = |iops: f64, p99: f64| {
            let mut h = crate::bench::hist::new_histogram();
            crate::bench::hist::record(&mut h, Duration::from_micros(10));
            let mut r = Report::new(
                "raw",
                "randread",
                "in-process",
                vec![],
                serde_json::json!({}),
                1,
                4096,
                Duration::from_secs_f64(1.0 / iops),
                Default::default(),
                h,
                None,
            );
            let mut c = r.latency_us;
            c.p99 = p99;
            r.corrected_latency_us = Some(c);
            r
        };
        let points = vec![
            Point::of(100, 1000.0, report(990.0, 500.0)),
            Point::of(10, 100.0, report(100.0, 20.0)),
        ];
        let s = series(&points);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["p50", "p99", "p99.9"]);
        let p99 = &s[1].1;
        assert_eq!(p99.len(), 2);
        assert!((p99[0].0 - 100.0).abs() < 0.01 && p99[0].1 == 20.0);
        assert!(
            (p99[1].0 - 990.0).abs() < 0.01 && p99[1].1 == 500.0,
            "{p99:?}"
        );
        let v = serde_json::to_value(&points[0]).unwrap();
        for k in [
            "percent",
            "target_iops",
            "achieved_iops",
            "p50_us",
            "p99_us",
            "p999_us",
            "run",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }
}
