//! Measuring: latency histograms (HdrHistogram, nanoseconds), CPU time,
//! the live progress line, and the two files a run can leave behind: a
//! classic `.hgrm` percentile distribution and an SVG percentile plot.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::resource::{getrusage, UsageWho};
use serde::Serialize;

/// A latency histogram in nanoseconds, 3 significant digits, auto-resizing.
pub fn new_histogram() -> Histogram<u64> {
    let mut h = Histogram::new(3).expect("3 significant digits is a valid precision");
    h.auto(true);
    h
}

/// Records `d` (clamped to at least 1 ns).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    // Auto-resize makes recording infallible short of u64::MAX.
    let _ = h.record(ns);
}

/// Latency percentiles in microseconds.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Summarises `h` (nanoseconds) in microseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles {
                count: 0,
                min: 0.0,
                mean: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            };
        }
        Percentiles {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// One line of a percentile distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistPoint {
    /// Latency in microseconds.
    pub value_us: f64,
    /// Quantile, 0..=1.
    pub quantile: f64,
    /// Samples at or below `value_us`.
    pub total: u64,
}

/// The percentile distribution of `h` the way HdrHistogram prints it: five
/// steps per halving of the distance to 100 %, then the maximum at 1.0.
pub fn distribution(h: &Histogram<u64>) -> Vec<DistPoint> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to().clamp(0.0, 1.0);
        let point = DistPoint {
            value_us: h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
            quantile: q,
            total: total.min(h.len()),
        };
        // Keep it monotonic whatever the iterator's rounding.
        if let Some(last) = out.last() {
            let last: &DistPoint = last;
            if point.quantile < last.quantile || point.value_us < last.value_us {
                continue;
            }
        }
        out.push(point);
        if q >= 1.0 {
            break;
        }
    }
    if out.last().is_none_or(|p| p.quantile < 1.0) {
        out.push(DistPoint {
            value_us: h.highest_equivalent(h.max()) as f64 / 1000.0,
            quantile: 1.0,
            total: h.len(),
        });
    }
    out
}

/// The classic `.hgrm` text (values in microseconds), as HdrHistogram's
/// `outputPercentileDistribution` writes it, readable by its plotters.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for p in distribution(h) {
        if p.quantile >= 1.0 {
            let _ = writeln!(s, "{:12.3} {:2.12} {:10}", p.value_us, p.quantile, p.total);
        } else {
            let _ = writeln!(
                s,
                "{:12.3} {:2.12} {:10} {:14.2}",
                p.value_us,
                p.quantile,
                p.total,
                1.0 / (1.0 - p.quantile)
            );
        }
    }
    let (mean, sd, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            h.mean() / 1000.0,
            h.stdev() / 1000.0,
            h.max() as f64 / 1000.0,
        )
    };
    let _ = writeln!(s, "#[Mean    = {mean:12.3}, StdDeviation   = {sd:12.3}]");
    let _ = writeln!(
        s,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets(h.sigfig())
    );
    s
}

/// Sub-buckets per bucket at `sigfig` significant digits (2048 for 3), as
/// HdrHistogram reports them.
fn sub_buckets(sigfig: u8) -> u64 {
    let largest = 2 * 10u64.pow(u32::from(sigfig.min(5)));
    largest.next_power_of_two()
}

/// The percentile axis ticks: 0 %, 90 %, 99 %, ... as (label, 1/(1-q)).
const TICKS: [(&str, f64); 7] = [
    ("0%", 1.0),
    ("90%", 10.0),
    ("99%", 100.0),
    ("99.9%", 1e3),
    ("99.99%", 1e4),
    ("99.999%", 1e5),
    ("99.9999%", 1e6),
];

/// Series colours.
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A latency-by-percentile plot: the x axis is log-scaled in 1/(1-q) as
/// HdrHistogram's plots are (0 %, 90 %, 99 %, 99.9 % ... equally spaced),
/// the y axis is linear latency in microseconds. One line per series.
pub fn svg(title: &str, series: &[(String, Vec<DistPoint>)]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 500.0;
    const L: f64 = 80.0;
    const R: f64 = 30.0;
    const T: f64 = 50.0;
    const B: f64 = 60.0;
    let (pw, ph) = (W - L - R, H - T - B);
    // The x range: up to the tick just past the deepest finite point.
    let deepest = series
        .iter()
        .flat_map(|(_, pts)| pts.iter())
        .filter(|p| p.quantile < 1.0)
        .map(|p| 1.0 / (1.0 - p.quantile))
        .fold(10.0f64, f64::max);
    let nticks = TICKS
        .iter()
        .position(|&(_, x)| x >= deepest * 10.0)
        .unwrap_or(TICKS.len() - 1)
        .max(2);
    let xmax = TICKS[nticks].1.log10();
    let ymax_raw = series
        .iter()
        .flat_map(|(_, pts)| pts.iter())
        .map(|p| p.value_us)
        .fold(0.0f64, f64::max);
    let ymin_raw = series
        .iter()
        .flat_map(|(_, pts)| pts.iter())
        .map(|p| p.value_us)
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    // A long tail (max far above the low percentiles) squeezes a linear
    // axis flat: switch to decades.
    let log_y = ymin_raw.is_finite() && ymax_raw / ymin_raw > 30.0;
    let (ylo, yhi, ystep) = if log_y {
        (
            ymin_raw.log10().floor(),
            ymax_raw.log10().ceil().max(ymin_raw.log10().floor() + 1.0),
            1.0,
        )
    } else {
        let step = nice_step(ymax_raw / 5.0);
        (0.0, (ymax_raw / step).ceil().max(1.0) * step, step)
    };
    let x_of = |q: f64| {
        let inv = if q >= 1.0 {
            TICKS[nticks].1
        } else {
            (1.0 / (1.0 - q)).min(TICKS[nticks].1)
        };
        L + inv.log10() / xmax * pw
    };
    let y_of = |v: f64| {
        let t = if log_y {
            v.max(10f64.powf(ylo)).log10()
        } else {
            v
        };
        T + ph - (t - ylo) / (yhi - ylo) * ph
    };
    let y_label = if log_y {
        "latency (µs, log scale)"
    } else {
        "latency (µs)"
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    // Grid and ticks.
    for &(label, x) in &TICKS[..=nticks] {
        let px = L + x.log10() / xmax * pw;
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#ddd"/>
<text x="{px:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            T + ph,
            T + ph + 18.0
        );
    }
    let mut t = ylo;
    while t <= yhi + ystep / 2.0 {
        let v = if log_y { 10f64.powf(t) } else { t };
        let py = y_of(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/>
<text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            L + pw,
            L - 6.0,
            py + 4.0,
            trim_num(v)
        );
        t += ystep;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">percentile</text>
<text x="20" y="{}" text-anchor="middle" transform="rotate(-90 20 {})">{y_label}</text>"##,
        L + pw / 2.0,
        H - 15.0,
        T + ph / 2.0,
        T + ph / 2.0
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut d = String::new();
        for p in pts {
            let _ = write!(d, "{:.1},{:.1} ", x_of(p.quantile), y_of(p.value_us));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>
<rect x="{}" y="{}" width="12" height="12" fill="{colour}"/>
<text x="{}" y="{}">{}</text>"#,
            d.trim_end(),
            L + 12.0,
            T + 10.0 + 18.0 * i as f64,
            L + 30.0,
            T + 21.0 + 18.0 * i as f64,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Named lines of (x, y) points, for the x-y plots.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// The axes of an x-y plot of latency: x linear from 0 in round steps,
/// y in whole decades (log scale).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct XyAxes {
    /// The x axis' end.
    pub xmax: f64,
    /// Its tick step.
    pub xstep: f64,
    /// The lowest decade (log10).
    pub ylo: f64,
    /// The highest decade (log10).
    pub yhi: f64,
}

impl XyAxes {
    /// Axes that hold every point of `series` and the marker's x.
    pub fn of(series: &[(String, Vec<(f64, f64)>)], marker: Option<f64>) -> XyAxes {
        let pts = || series.iter().flat_map(|(_, p)| p.iter());
        let xmax_raw = pts()
            .map(|p| p.0)
            .chain(marker)
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max);
        let xstep = nice_step(xmax_raw / 5.0);
        // (A hair of tolerance keeps 3.0000001 on an axis ending at 3.)
        let xmax = (xmax_raw / xstep - 1e-6).ceil().max(1.0) * xstep;
        let ys = || pts().map(|p| p.1).filter(|&y| y > 0.0 && y.is_finite());
        let ymin_raw = ys().fold(f64::INFINITY, f64::min);
        let ymax_raw = ys().fold(0.0f64, f64::max);
        let (ylo, yhi) = if ymin_raw.is_finite() {
            let lo = ymin_raw.log10().floor();
            (lo, ymax_raw.log10().ceil().max(lo + 1.0))
        } else {
            (0.0, 1.0)
        };
        XyAxes {
            xmax,
            xstep,
            ylo,
            yhi,
        }
    }

    /// The x ticks.
    pub fn x_ticks(&self) -> Vec<f64> {
        let n = (self.xmax / self.xstep).round() as usize;
        (0..=n).map(|i| i as f64 * self.xstep).collect()
    }

    /// The y ticks (every decade).
    pub fn y_ticks(&self) -> Vec<f64> {
        let n = (self.yhi - self.ylo).round() as i32;
        (0..=n)
            .map(|i| 10f64.powf(self.ylo + f64::from(i)))
            .collect()
    }

    /// Where x falls, 0..=1 of the width.
    pub fn fx(&self, x: f64) -> f64 {
        x / self.xmax
    }

    /// Where y falls, 0..=1 of the height from the bottom.
    pub fn fy(&self, y: f64) -> f64 {
        (y.max(10f64.powf(self.ylo)).log10() - self.ylo) / (self.yhi - self.ylo)
    }
}

/// The x-y plots' size and margins (both renderings).
mod xy {
    pub const W: f64 = 800.0;
    pub const H: f64 = 500.0;
    pub const L: f64 = 80.0;
    pub const R: f64 = 30.0;
    pub const T: f64 = 50.0;
    pub const B: f64 = 60.0;
}

/// A line plot of `series` of (x, y) points: x linear from 0, y latency
/// in microseconds on a log scale (decades). `marker` draws a dashed
/// vertical line at an x with a label (e.g. the closed-loop maximum).
pub fn xy_svg(
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    marker: Option<(f64, &str)>,
) -> String {
    use xy::{B, H, L, R, T, W};
    let (pw, ph) = (W - L - R, H - T - B);
    let ax = XyAxes::of(series, marker.map(|m| m.0));
    let x_of = |x: f64| L + ax.fx(x) * pw;
    let y_of = |y: f64| T + ph - ax.fy(y) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>
<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        W / 2.0,
        escape(title)
    );
    for x in ax.x_ticks() {
        let px = x_of(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#ddd"/>
<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            T + ph,
            T + ph + 18.0,
            tick_label(x)
        );
    }
    for y in ax.y_ticks() {
        let py = y_of(y);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#ddd"/>
<text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            L + pw,
            L - 6.0,
            py + 4.0,
            tick_label(y)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="20" y="{}" text-anchor="middle" transform="rotate(-90 20 {})">latency (µs, log scale)</text>"##,
        L + pw / 2.0,
        H - 15.0,
        escape(x_label),
        T + ph / 2.0,
        T + ph / 2.0
    );
    if let Some((mx, label)) = marker {
        let px = x_of(mx);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#555" stroke-dasharray="6 4"/>
<text x="{:.1}" y="{}" text-anchor="end">{}</text>"##,
            T + ph,
            px - 4.0,
            T + 14.0,
            escape(label)
        );
    }
    for (i, (name, p)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let mut d = String::new();
        for &(x, y) in p {
            let _ = write!(d, "{:.1},{:.1} ", x_of(x), y_of(y));
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            d.trim_end()
        );
        for &(x, y) in p {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                x_of(x),
                y_of(y)
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{colour}"/>
<text x="{}" y="{}">{}</text>"#,
            L + 12.0,
            T + 10.0 + 18.0 * i as f64,
            L + 30.0,
            T + 21.0 + 18.0 * i as f64,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The same plot as [`xy_svg`], as a PNG.
pub fn xy_png(
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    marker: Option<(f64, &str)>,
) -> Vec<u8> {
    use super::png::{rgb, Anchor, Canvas};
    use xy::{B, H, L, R, T, W};
    let (pw, ph) = (W - L - R, H - T - B);
    let ax = XyAxes::of(series, marker.map(|m| m.0));
    let x_of = |x: f64| L + ax.fx(x) * pw;
    let y_of = |y: f64| T + ph - ax.fy(y) * ph;
    let (grid, ink) = (rgb("#dddddd"), rgb("#333333"));
    let mut c = Canvas::new(W as usize, H as usize, [255, 255, 255]);
    // Large when it fits.
    let scale = if Canvas::text_width(title, 2) as f64 <= W - 20.0 {
        2
    } else {
        1
    };
    c.text(W / 2.0, 32.0, title, scale, Anchor::Middle, [0, 0, 0]);
    for x in ax.x_ticks() {
        let px = x_of(x);
        c.line((px, T), (px, T + ph), 1.0, grid, None);
        c.text(px, T + ph + 18.0, &tick_label(x), 1, Anchor::Middle, ink);
    }
    for y in ax.y_ticks() {
        let py = y_of(y);
        c.line((L, py), (L + pw, py), 1.0, grid, None);
        c.text(L - 6.0, py + 4.0, &tick_label(y), 1, Anchor::End, ink);
    }
    for (a, b) in [
        ((L, T), (L + pw, T)),
        ((L + pw, T), (L + pw, T + ph)),
        ((L, T + ph), (L + pw, T + ph)),
        ((L, T), (L, T + ph)),
    ] {
        c.line(a, b, 1.0, ink, None);
    }
    c.text(L + pw / 2.0, H - 15.0, x_label, 1, Anchor::Middle, ink);
    c.text_up(20.0, T + ph / 2.0, "latency (µs, log scale)", 1, ink);
    if let Some((mx, label)) = marker {
        let px = x_of(mx);
        c.line((px, T), (px, T + ph), 1.0, rgb("#555555"), Some((6.0, 4.0)));
        c.text(px - 4.0, T + 14.0, label, 1, Anchor::End, ink);
    }
    for (i, (name, p)) in series.iter().enumerate() {
        let colour = rgb(COLOURS[i % COLOURS.len()]);
        for w in p.windows(2) {
            c.line(
                (x_of(w[0].0), y_of(w[0].1)),
                (x_of(w[1].0), y_of(w[1].1)),
                2.0,
                colour,
                None,
            );
        }
        for &(x, y) in p {
            c.dot(x_of(x), y_of(y), 3.0, colour);
        }
        let ly = T + 10.0 + 18.0 * i as f64;
        c.fill_rect(L + 12.0, ly, 12.0, 12.0, colour);
        c.text(L + 30.0, ly + 11.0, name, 1, Anchor::Start, ink);
    }
    c.to_png()
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

/// A tick label: whole numbers as such, else up to three decimals
/// without trailing zeros (0.5, 1.5, 0.025).
fn tick_label(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round())
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn trim_num(v: f64) -> String {
    if v >= 1.0 || v == 0.0 {
        format!("{}", v.round())
    } else {
        format!("{v:.3}")
    }
}

/// CPU seconds this process has used (all threads), user and system.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    /// User seconds.
    pub user: f64,
    /// System seconds.
    pub sys: f64,
}

impl CpuTime {
    /// Now, from `getrusage(RUSAGE_SELF)` (zero if it fails).
    pub fn now() -> CpuTime {
        match getrusage(UsageWho::RUSAGE_SELF) {
            Ok(u) => {
                let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
                CpuTime {
                    user: s(u.user_time()),
                    sys: s(u.system_time()),
                }
            }
            Err(_) => CpuTime::default(),
        }
    }

    /// The CPU used since `earlier`.
    pub fn since(earlier: CpuTime) -> CpuTime {
        let n = CpuTime::now();
        CpuTime {
            user: (n.user - earlier.user).max(0.0),
            sys: (n.sys - earlier.sys).max(0.0),
        }
    }
}

/// Counters a run bumps and the progress thread reads.
#[derive(Default, Debug)]
pub struct Counters {
    /// Bytes moved.
    pub bytes: AtomicU64,
    /// Operations completed.
    pub ops: AtomicU64,
}

impl Counters {
    /// Adds one operation of `bytes`.
    pub fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.ops.fetch_add(1, Ordering::Relaxed);
    }
}

/// The live progress line: once a second on stderr, until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts reporting `counters` under `label`; a no-op when `quiet`.
    pub fn start(label: String, counters: Arc<Counters>, quiet: bool) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = (!quiet).then(|| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let t0 = Instant::now();
                let (mut last_b, mut last_o, mut last_t) = (0u64, 0u64, t0);
                let mut next = t0 + Duration::from_secs(1);
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now < next {
                        thread::sleep((next - now).min(Duration::from_millis(50)));
                        continue;
                    }
                    next += Duration::from_secs(1);
                    let (b, o) = (
                        counters.bytes.load(Ordering::Relaxed),
                        counters.ops.load(Ordering::Relaxed),
                    );
                    let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
                    eprintln!(
                        "[{label}] {:>4.0}s {:>10.1} MB/s {:>10.0} IOPS  total {}",
                        now.duration_since(t0).as_secs_f64(),
                        (b - last_b) as f64 / dt / 1e6,
                        (o - last_o) as f64 / dt,
                        super::units::human_bytes(b)
                    );
                    (last_b, last_o, last_t) = (b, o, now);
                }
            })
        });
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = new_histogram();
        for i in 1..=10_000u64 {
            record(&mut h, Duration::from_nanos(1000 + i * 37 % 5000));
        }
        record(&mut h, Duration::from_millis(20));
        h
    }

    #[test]
    fn percentiles_are_ordered() {
        let p = Percentiles::of(&sample());
        assert_eq!(p.count, 10_001);
        assert!(p.min <= p.p50 && p.p50 <= p.p90 && p.p90 <= p.p99);
        assert!(p.p99 <= p.p999 && p.p999 <= p.max);
        assert!((p.max - 20_000.0).abs() < 20.0);
        let empty = Percentiles::of(&new_histogram());
        assert_eq!(empty.count, 0);
    }

    #[test]
    fn hgrm_is_well_formed_and_monotonic() {
        let h = sample();
        let text = hgrm(&h);
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let mut last = (0.0f64, 0.0f64, 0u64);
        let mut rows = 0;
        let mut saw_end = false;
        for l in lines.by_ref() {
            if l.starts_with('#') {
                break;
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            let (v, q, n): (f64, f64, u64) = (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            );
            assert!(
                v >= last.0 && q >= last.1 && n >= last.2,
                "not monotonic: {l}"
            );
            if q < 1.0 {
                assert_eq!(f.len(), 4);
                let inv: f64 = f[3].parse().unwrap();
                assert!((inv - 1.0 / (1.0 - q)).abs() / inv < 0.01);
            } else {
                saw_end = true;
                assert_eq!(n, h.len());
            }
            last = (v, q, n);
            rows += 1;
        }
        assert!(saw_end && rows > 20);
        assert!(text.contains("#[Mean    ="));
        assert!(text.contains("Total count    ="));
        assert!(text.contains("SubBuckets     =         2048]"), "{text}");
        // An empty histogram still gives a header and a footer.
        assert!(hgrm(&new_histogram()).contains("#[Max"));
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(1.5), "1.5");
        assert_eq!(tick_label(0.025), "0.025");
        assert_eq!(tick_label(2000.0), "2000");
        assert_eq!(tick_label(0.1), "0.1");
    }

    #[test]
    fn xy_svg_is_well_formed() {
        let series = vec![
            (
                "p50".to_string(),
                vec![(1000.0, 20.0), (5000.0, 40.0), (9000.0, 300.0)],
            ),
            (
                "p99 <tail>".to_string(),
                vec![(1000.0, 90.0), (5000.0, 200.0), (9000.0, 9000.0)],
            ),
        ];
        let doc = xy_svg(
            "curve & co",
            "achieved IOPS",
            &series,
            Some((9500.0, "max")),
        );
        assert!(doc.starts_with("<?xml") && doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("curve &amp; co") && doc.contains("p99 &lt;tail&gt;"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert_eq!(doc.matches("<circle").count(), 6);
        assert_eq!(doc.matches("<text").count(), doc.matches("</text>").count());
        assert!(doc.contains("stroke-dasharray") && doc.contains(">max<"));
        // Decades on the y axis, round steps on the x axis.
        assert!(doc.contains(">10<") && doc.contains(">10000<") && doc.contains(">2000<"));
        for pts in doc.split("points=\"").skip(1) {
            for xy in pts.split('"').next().unwrap().split_whitespace() {
                let (x, y) = xy.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!(
                    (80.0..=770.1).contains(&x) && (50.0..=440.1).contains(&y),
                    "{xy}"
                );
            }
        }
        // Nothing to plot is still a document.
        let empty = xy_svg("none", "x", &[], None);
        assert!(empty.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn svg_is_well_formed() {
        let h = sample();
        let doc = svg(
            "raw <randread> & co",
            &[
                ("a".into(), distribution(&h)),
                ("b".into(), distribution(&h)),
            ],
        );
        assert!(doc.starts_with("<?xml"));
        assert!(doc.trim_end().ends_with("</svg>"));
        assert!(doc.contains("raw &lt;randread&gt; &amp; co"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains(">99.9%<"));
        // Tags balance: every opening tag is self-closed or closed.
        let opens = doc.matches("<text").count();
        assert_eq!(opens, doc.matches("</text>").count());
        assert_eq!(doc.matches("<svg").count(), doc.matches("</svg>").count());
        // Points stay inside the plot area.
        for pts in doc.split("points=\"").skip(1) {
            let list = pts.split('"').next().unwrap();
            for xy in list.split_whitespace() {
                let (x, y) = xy.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!(
                    (80.0..=770.1).contains(&x) && (50.0..=440.1).contains(&y),
                    "{xy}"
                );
            }
        }
        // No data is still a valid document.
        assert!(svg("empty", &[]).ends_with("</svg>\n"));
    }

    #[test]
    fn steps() {
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(120.0), 200.0);
    }
}
