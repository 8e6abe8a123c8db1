//! `--log-interval`: IOPS, MB/s and latency percentiles of every interval of
//! a run, as JSON lines (one object per interval, all paths together).
//!
//! Each path's thread fills an [`IntervalSample`] per interval and sends it
//! when the interval ends; a [`Collector`] merges the samples of one
//! interval from every path and hands out the interval's [`Line`] as soon
//! as every path has reported it (and every earlier interval is out), so
//! lines appear while the run goes on, in order.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::hist::{new_histogram, record, Percentiles};

/// The interval `at` (time since the measured window began) falls in.
pub fn index(at: Duration, every: Duration) -> u64 {
    let every = every.as_nanos().max(1);
    u64::try_from(at.as_nanos() / every).unwrap_or(u64::MAX)
}

/// What one path did in one interval.
#[derive(Debug)]
pub struct IntervalSample {
    /// Which interval (0-based).
    pub index: u64,
    /// Its length, seconds (shorter for the last, partial one).
    pub seconds: f64,
    /// Reads, writes completed.
    pub ops: [u64; 2],
    /// Bytes read, written.
    pub bytes: [u64; 2],
    /// Service time, ns.
    pub service: Histogram<u64>,
    /// From the intended issue time, ns (fixed-rate runs).
    pub corrected: Option<Histogram<u64>>,
}

impl IntervalSample {
    /// An empty sample of a full interval.
    pub fn new(index: u64, every: Duration) -> IntervalSample {
        IntervalSample {
            index,
            seconds: every.as_secs_f64(),
            ops: [0; 2],
            bytes: [0; 2],
            service: new_histogram(),
            corrected: None,
        }
    }

    /// Counts one completed command.
    pub fn add(&mut self, write: bool, bytes: u64, service: Duration, corrected: Option<Duration>) {
        let d = usize::from(write);
        self.ops[d] += 1;
        self.bytes[d] += bytes;
        record(&mut self.service, service);
        if let Some(c) = corrected {
            record(self.corrected.get_or_insert_with(new_histogram), c);
        }
    }

    fn merge(&mut self, other: &IntervalSample) {
        for d in 0..2 {
            self.ops[d] += other.ops[d];
            self.bytes[d] += other.bytes[d];
        }
        self.seconds = self.seconds.max(other.seconds);
        let _ = self.service.add(&other.service);
        if let Some(c) = &other.corrected {
            let _ = self.corrected.get_or_insert_with(new_histogram).add(c);
        }
    }
}

/// One JSON line.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Line {
    /// The round (`--rounds`), from 1.
    pub round: u32,
    /// The interval, from 0.
    pub interval: u64,
    /// When it ended, seconds since the measured window began (after the ramp).
    pub t_s: f64,
    /// Its length, seconds.
    pub seconds: f64,
    /// Commands completed per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Reads completed per second.
    pub read_iops: f64,
    /// Writes completed per second.
    pub write_iops: f64,
    /// Service time of the commands that completed in it, µs.
    pub latency_us: Percentiles,
    /// From the intended issue time, µs (fixed-rate runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrected_latency_us: Option<Percentiles>,
}

/// Merges the samples of `paths` paths into lines.
#[derive(Debug)]
pub struct Collector {
    paths: usize,
    round: u32,
    every: f64,
    pending: BTreeMap<u64, (IntervalSample, usize)>,
    next: u64,
}

impl Collector {
    /// A collector for `paths` paths of round `round`, intervals `every` long.
    pub fn new(paths: usize, round: u32, every: Duration) -> Collector {
        Collector {
            paths: paths.max(1),
            round,
            every: every.as_secs_f64(),
            pending: BTreeMap::new(),
            next: 0,
        }
    }

    /// Takes one path's sample; returns the lines now complete, in order.
    pub fn push(&mut self, s: IntervalSample) -> Vec<Line> {
        match self.pending.get_mut(&s.index) {
            Some((acc, n)) => {
                acc.merge(&s);
                *n += 1;
            }
            None => {
                self.pending.insert(s.index, (s, 1));
            }
        }
        let mut out = Vec::new();
        while let Some((_, n)) = self.pending.get(&self.next) {
            if *n < self.paths {
                break;
            }
            if let Some((s, _)) = self.pending.remove(&self.next) {
                out.push(self.line(&s));
            }
            self.next += 1;
        }
        out
    }

    /// Every interval still held (some path ended before it, or stopped
    /// early), in order.
    pub fn finish(mut self) -> Vec<Line> {
        let held = std::mem::take(&mut self.pending);
        held.values().map(|(s, _)| self.line(s)).collect()
    }

    fn line(&self, s: &IntervalSample) -> Line {
        let secs = s.seconds.max(1e-9);
        let ops = s.ops[0] + s.ops[1];
        let bytes = s.bytes[0] + s.bytes[1];
        Line {
            round: self.round,
            interval: s.index,
            t_s: s.index as f64 * self.every + s.seconds,
            seconds: s.seconds,
            iops: ops as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            read_iops: s.ops[0] as f64 / secs,
            write_iops: s.ops[1] as f64 / secs,
            latency_us: Percentiles::of(&s.service),
            corrected_latency_us: s.corrected.as_ref().map(Percentiles::of),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_index() {
        let s = Duration::from_secs;
        assert_eq!(index(Duration::ZERO, s(1)), 0);
        assert_eq!(index(Duration::from_millis(999), s(1)), 0);
        assert_eq!(index(s(1), s(1)), 1);
        assert_eq!(index(s(5), Duration::from_millis(500)), 10);
        assert_eq!(index(s(5), Duration::ZERO), 5_000_000_000);
    }

    #[test]
    fn lines_wait_for_every_path_and_come_out_in_order() {
        let every = Duration::from_secs(1);
        let mut c = Collector::new(2, 1, every);
        let sample = |index, reads: u64, writes: u64| {
            let mut s = IntervalSample::new(index, every);
            for _ in 0..reads {
                s.add(false, 4096, Duration::from_micros(100), None);
            }
            for _ in 0..writes {
                s.add(true, 65536, Duration::from_micros(300), None);
            }
            s
        };
        assert!(c.push(sample(0, 10, 0)).is_empty());
        // Path 0 is ahead: interval 1 waits for path 1.
        assert!(c.push(sample(1, 5, 5)).is_empty());
        let lines = c.push(sample(0, 0, 10));
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!((l.round, l.interval), (1, 0));
        assert_eq!((l.read_iops, l.write_iops, l.iops), (10.0, 10.0, 20.0));
        assert!((l.mb_per_s - (10.0 * 4096.0 + 10.0 * 65536.0) / 1e6).abs() < 1e-9);
        assert_eq!(l.latency_us.count, 20);
        assert!(l.corrected_latency_us.is_none());
        let mut last = IntervalSample::new(1, every);
        last.seconds = 0.5;
        last.add(
            true,
            4096,
            Duration::from_micros(1),
            Some(Duration::from_millis(2)),
        );
        let lines = c.push(last);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].interval, 1);
        assert_eq!(lines[0].latency_us.count, 11);
        assert_eq!(lines[0].corrected_latency_us.unwrap().count, 1);
        // A path that stopped early: what is held comes out at the end.
        assert!(c.push(sample(2, 1, 0)).is_empty());
        let rest = c.finish();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].interval, 2);
        assert_eq!(rest[0].t_s, 3.0);
    }
}
