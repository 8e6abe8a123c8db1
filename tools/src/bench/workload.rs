//! What `stp bench raw` issues and when, decided without I/O: the access
//! pattern and read/write mix ([`Rw`], `--rwmix`), the block-size mix
//! ([`BsSplit`]), the next command's direction, size and offset
//! ([`Workload`]), and the fixed-rate schedule ([`Schedule`]). Randomness
//! and time are passed in, so every decision is unit-tested with a seeded
//! generator and a virtual clock.

use std::time::Duration;

use clap::ValueEnum;
use rand::Rng;

use super::units::parse_size;

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
    /// Sequential reads and writes mixed by --rwmix (fio's `rw`).
    #[value(alias = "rw")]
    Readwrite,
    /// Reads and writes at random aligned offsets, mixed by --rwmix.
    Randrw,
}

impl Rw {
    /// Whether offsets are drawn at random.
    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Whether the pattern mixes reads and writes (by `--rwmix`).
    pub fn is_mixed(self) -> bool {
        matches!(self, Rw::Readwrite | Rw::Randrw)
    }

    /// The share of reads, percent, given `--rwmix` for mixed patterns.
    pub fn read_percent(self, rwmix: u8) -> u8 {
        match self {
            Rw::Read | Rw::Randread => 100,
            Rw::Write | Rw::Randwrite => 0,
            Rw::Readwrite | Rw::Randrw => rwmix.min(100),
        }
    }

    /// The name fio uses.
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Readwrite => "readwrite",
            Rw::Randrw => "randrw",
        }
    }
}

/// A block-size mix: sizes with relative weights (`--bssplit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BsSplit {
    /// (bytes, weight), weights positive.
    entries: Vec<(u64, u32)>,
    /// The sum of the weights.
    total: u64,
}

impl BsSplit {
    /// One size, always.
    pub fn single(bs: u64) -> BsSplit {
        BsSplit {
            entries: vec![(bs, 1)],
            total: 1,
        }
    }

    /// The sizes and their weights, as given.
    pub fn entries(&self) -> &[(u64, u32)] {
        &self.entries
    }

    /// The smallest size.
    pub fn min(&self) -> u64 {
        self.entries.iter().map(|e| e.0).min().unwrap_or(0)
    }

    /// The largest size.
    pub fn max(&self) -> u64 {
        self.entries.iter().map(|e| e.0).max().unwrap_or(0)
    }

    /// The mean command size the weights imply, bytes.
    pub fn mean(&self) -> f64 {
        let sum: f64 = self
            .entries
            .iter()
            .map(|&(b, w)| b as f64 * f64::from(w))
            .sum();
        sum / self.total.max(1) as f64
    }

    /// The size for a draw `r` in `0..total`.
    fn at(&self, mut r: u64) -> u64 {
        for &(bs, w) in &self.entries {
            if r < u64::from(w) {
                return bs;
            }
            r -= u64::from(w);
        }
        self.entries.last().map_or(0, |e| e.0)
    }

    /// Draws a size in proportion to the weights.
    pub fn pick(&self, rng: &mut impl Rng) -> u64 {
        if self.entries.len() == 1 {
            return self.entries[0].0;
        }
        self.at(rng.gen_range(0..self.total))
    }

    /// `4k/60,64k/30,1m/10` (fio writes `4k/60:64k/30:1m/10`; both work).
    pub fn describe(&self) -> String {
        self.entries
            .iter()
            .map(|&(b, w)| format!("{}/{w}", short_size(b)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `4096` → `4k`, `1048576` → `1m`; other sizes in bytes.
pub fn short_size(b: u64) -> String {
    for (shift, unit) in [(30, "g"), (20, "m"), (10, "k")] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{}{unit}", b >> shift);
        }
    }
    b.to_string()
}

/// Parses `--bssplit`: `SIZE/WEIGHT` entries separated by `,` or `:` (fio's
/// separator), e.g. `4k/60,64k/30,1m/10`. Weights are relative (percentages
/// are usual). A size without a weight shares what the given weights leave
/// of 100 equally with the other unweighted sizes, as in fio.
pub fn parse_bssplit(s: &str) -> Result<BsSplit, String> {
    let help = "write SIZE/WEIGHT entries separated by commas, e.g. 4k/60,64k/30,1m/10";
    let mut given: Vec<(u64, Option<u32>)> = Vec::new();
    for part in s.split([',', ':']).map(str::trim) {
        if part.is_empty() {
            return Err(format!("`{s}` has an empty entry; {help}"));
        }
        let (size, weight) = match part.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (part, None),
        };
        let bytes = parse_size(size).map_err(|e| format!("--bssplit entry `{part}`: {e}"))?;
        if bytes == 0 {
            return Err(format!(
                "--bssplit entry `{part}`: the size must be more than 0"
            ));
        }
        let weight = match weight {
            None => None,
            Some(w) => Some(w.trim().parse::<u32>().map_err(|_| {
                format!("--bssplit entry `{part}`: `{w}` is not a whole-number weight; {help}")
            })?),
        };
        if given.iter().any(|(b, _)| *b == bytes) {
            return Err(format!(
                "--bssplit names {} twice; give each size once",
                short_size(bytes)
            ));
        }
        given.push((bytes, weight));
    }
    let weighed: u64 = given.iter().filter_map(|g| g.1).map(u64::from).sum();
    let unweighted = given.iter().filter(|g| g.1.is_none()).count() as u64;
    if unweighted > 0 && weighed >= 100 {
        return Err(format!(
            "--bssplit `{s}`: the weights given already reach {weighed}, leaving nothing for the sizes without one; give every size a weight"
        ));
    }
    // What the given weights leave of 100, shared by the unweighted sizes.
    let share = (100u64.saturating_sub(weighed))
        .checked_div(unweighted)
        .map_or(0, |v| v.max(1) as u32);
    let entries: Vec<(u64, u32)> = given
        .into_iter()
        .map(|(b, w)| (b, w.unwrap_or(share)))
        .filter(|&(_, w)| w > 0)
        .collect();
    let total: u64 = entries.iter().map(|e| u64::from(e.1)).sum();
    if total == 0 {
        return Err(format!("--bssplit `{s}`: every weight is 0; {help}"));
    }
    Ok(BsSplit { entries, total })
}

/// Parses `--rwmix`: the share of reads, 0 to 100 percent.
pub fn parse_rwmix(s: &str) -> Result<u8, String> {
    let t = s.trim().trim_end_matches('%');
    match t.parse::<u8>() {
        Ok(n) if n <= 100 => Ok(n),
        _ => Err(format!(
            "`{s}`: --rwmix is the percentage of reads, a whole number from 0 to 100 (70 = 70 % reads, 30 % writes)"
        )),
    }
}

/// One command to issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// A WRITE (else a READ).
    pub write: bool,
    /// Byte offset on the LUN (a multiple of the workload's alignment).
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// The sequence of commands one LUN is given: direction by the mix, size
/// by the split, offset by the pattern, all within the span.
#[derive(Clone, Debug)]
pub struct Workload {
    rw: Rw,
    read_percent: u8,
    split: BsSplit,
    /// Offsets are multiples of this (the smallest size of the split).
    align: u64,
    /// Bytes of the LUN used, from offset 0 (a multiple of `align`).
    span: u64,
    /// The next sequential offset, reads and writes apart (as fio keeps them).
    cursor: [u64; 2],
}

impl Workload {
    /// The workload over the first `span` bytes of a LUN. Every size of
    /// `split` must fit in the span.
    pub fn new(rw: Rw, rwmix: u8, split: BsSplit, span: u64) -> Result<Workload, String> {
        let align = split.min().max(1);
        let span = span / align * align;
        if split.max() > span {
            return Err(format!(
                "the span ({span} bytes) is smaller than a {}-byte command; raise --span or lower the block size",
                split.max()
            ));
        }
        Ok(Workload {
            rw,
            read_percent: rw.read_percent(rwmix),
            split,
            align,
            span,
            cursor: [0, 0],
        })
    }

    /// The span used, bytes.
    pub fn span(&self) -> u64 {
        self.span
    }

    /// The alignment of every offset, bytes.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// The block-size mix.
    pub fn split(&self) -> &BsSplit {
        &self.split
    }

    /// The share of reads, percent.
    pub fn read_percent(&self) -> u8 {
        self.read_percent
    }

    /// The next command. Draws (in this order, each only when it can
    /// vary): the direction, the size, the offset.
    pub fn next(&mut self, rng: &mut impl Rng) -> Op {
        let write = match self.read_percent {
            100 => false,
            0 => true,
            p => rng.gen_range(0..100u8) >= p,
        };
        let len = self.split.pick(rng);
        let offset = if self.rw.is_random() {
            let slots = (self.span - len) / self.align + 1;
            rng.gen_range(0..slots) * self.align
        } else {
            let c = &mut self.cursor[usize::from(write)];
            if *c + len > self.span {
                *c = 0;
            }
            let at = *c;
            *c += len;
            at
        };
        Op { write, offset, len }
    }
}

/// The fixed-rate schedule of an open-loop run: command k is due at
/// k / rate seconds after the run began, whether or not the ones before
/// it have completed. Time is passed in (elapsed since the run began), so
/// the schedule runs on a virtual clock in tests; the caller measures each
/// command's latency from the intended time it is given, which is what
/// corrects for coordinated omission: a stall that holds back issuing
/// still counts against every command that should have gone out during it.
#[derive(Clone, Debug)]
pub struct Schedule {
    rate: f64,
    issued: u64,
}

impl Schedule {
    /// A schedule of `rate` commands per second (positive and finite).
    pub fn new(rate: f64) -> Schedule {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1.0
        };
        Schedule { rate, issued: 0 }
    }

    /// Commands due at or before `now` (since the run began) that have not
    /// been taken: how far behind its schedule the caller is.
    pub fn behind(&self, now: Duration) -> u64 {
        let due = (now.as_secs_f64() * self.rate).floor();
        let due = if due.is_finite() && due >= 0.0 {
            (due as u64).saturating_add(1)
        } else {
            0
        };
        due.saturating_sub(self.issued)
    }

    /// When the next command is due, since the run began.
    pub fn next_due(&self) -> Duration {
        Duration::from_secs_f64(self.issued as f64 / self.rate)
    }

    /// If the next command is due at `now` (since the run began), takes it
    /// and returns its intended issue time; else `None` (wait until
    /// [`next_due`](Schedule::next_due)). A caller that fell behind gets
    /// every overdue command at once, each with its own intended time.
    pub fn poll(&mut self, now: Duration) -> Option<Duration> {
        let due = self.next_due();
        if due <= now {
            self.issued += 1;
            Some(due)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn bssplit_parses_like_fio() {
        let s = parse_bssplit("4k/60,64k/30,1m/10").unwrap();
        assert_eq!(s.entries(), &[(4096, 60), (65536, 30), (1 << 20, 10)]);
        assert_eq!(parse_bssplit("4k/60:64k/30:1m/10").unwrap(), s);
        assert_eq!((s.min(), s.max()), (4096, 1 << 20));
        assert_eq!(s.describe(), "4k/60,64k/30,1m/10");
        // Unweighted sizes share what is left of 100.
        let s = parse_bssplit("4k/50,8k,16k").unwrap();
        assert_eq!(s.entries(), &[(4096, 50), (8192, 25), (16384, 25)]);
        assert_eq!(parse_bssplit("8k").unwrap().entries(), &[(8192, 100)]);
        // Weights are relative.
        let s = parse_bssplit("4k/1,8k/3").unwrap();
        assert!((s.mean() - 7168.0).abs() < 1e-9);
        for bad in [
            "",
            "4k/",
            "4k/x",
            "4k/-1",
            "0/10",
            "4q/10",
            "4k/60,,1m/40",
            "4k/0",
            "4k/100,8k",
            "4k/10,4k/20",
        ] {
            let e = parse_bssplit(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        assert!(parse_bssplit("4k/x").unwrap_err().contains("e.g. 4k/60"));
    }

    #[test]
    fn rwmix_parses() {
        assert_eq!(parse_rwmix("70"), Ok(70));
        assert_eq!(parse_rwmix("70%"), Ok(70));
        assert_eq!(parse_rwmix("0"), Ok(0));
        assert_eq!(parse_rwmix("100"), Ok(100));
        for bad in ["101", "-1", "x", "", "70.5"] {
            assert!(parse_rwmix(bad).unwrap_err().contains("0 to 100"), "{bad}");
        }
    }

    #[test]
    fn the_mix_and_the_split_follow_their_weights() {
        let split = parse_bssplit("4k/60,64k/30,1m/10").unwrap();
        let span = 64 << 20;
        let mut w = Workload::new(Rw::Randrw, 70, split, span).unwrap();
        let mut rng = SmallRng::seed_from_u64(1);
        let n = 100_000;
        let (mut reads, mut sizes) = (0u32, [0u32; 3]);
        for _ in 0..n {
            let op = w.next(&mut rng);
            reads += u32::from(!op.write);
            let i = match op.len {
                4096 => 0,
                65536 => 1,
                1048576 => 2,
                other => panic!("size {other}"),
            };
            sizes[i] += 1;
            assert_eq!(op.offset % 4096, 0, "unaligned {op:?}");
            assert!(op.offset + op.len <= span, "beyond the span {op:?}");
        }
        let share = |k: u32| f64::from(k) / f64::from(n);
        // Seeded, so the same every run; the bounds are loose enough for
        // any seed.
        assert!((share(reads) - 0.70).abs() < 0.01, "reads {}", share(reads));
        for (i, want) in [0.6, 0.3, 0.1].into_iter().enumerate() {
            assert!(
                (share(sizes[i]) - want).abs() < 0.01,
                "{i}: {}",
                share(sizes[i])
            );
        }
    }

    #[test]
    fn pure_patterns_draw_one_direction_and_sequential_ones_wrap() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut w = Workload::new(Rw::Write, 70, BsSplit::single(4096), 3 * 4096 + 100).unwrap();
        assert_eq!(w.span(), 3 * 4096);
        let offs: Vec<u64> = (0..5).map(|_| w.next(&mut rng)).map(|o| o.offset).collect();
        assert_eq!(offs, [0, 4096, 8192, 0, 4096]);
        let mut r = Workload::new(Rw::Randread, 0, BsSplit::single(512), 1 << 20).unwrap();
        assert!((0..1000).all(|_| !r.next(&mut rng).write));
        // A sequential mix keeps a cursor per direction.
        let mut m = Workload::new(Rw::Readwrite, 50, BsSplit::single(4096), 64 << 20).unwrap();
        let mut next = [0u64; 2];
        for _ in 0..1000 {
            let op = m.next(&mut rng);
            assert_eq!(op.offset, next[usize::from(op.write)]);
            next[usize::from(op.write)] += 4096;
        }
        // Variable sizes never cross the span's end.
        let split = parse_bssplit("4k/50,1m/50").unwrap();
        let mut s = Workload::new(Rw::Read, 100, split, (1 << 20) + 8192).unwrap();
        for _ in 0..100 {
            let op = s.next(&mut rng);
            assert!(op.offset + op.len <= s.span(), "{op:?}");
        }
        assert!(Workload::new(Rw::Read, 100, BsSplit::single(1 << 20), 4096)
            .unwrap_err()
            .contains("--span"));
    }

    #[test]
    fn the_schedule_runs_on_a_virtual_clock() {
        let mut s = Schedule::new(1000.0);
        let ms = Duration::from_millis;
        // Command k is due at k ms: nothing is early.
        assert_eq!(s.poll(Duration::ZERO), Some(ms(0)));
        assert_eq!(s.poll(Duration::ZERO), None);
        assert_eq!(s.next_due(), ms(1));
        assert_eq!(s.poll(ms(1) - Duration::from_nanos(1)), None);
        assert_eq!(s.poll(ms(1)), Some(ms(1)));
        // A caller held up until 5.5 ms gets the four overdue commands at
        // once, each with its own intended time, then waits again.
        let mut late = Vec::new();
        while let Some(t) = s.poll(Duration::from_micros(5500)) {
            late.push(t);
        }
        assert_eq!(late, [ms(2), ms(3), ms(4), ms(5)]);
        assert_eq!(s.next_due(), ms(6));
        assert_eq!(s.behind(Duration::from_micros(5500)), 0);
        // At 9 ms, commands 6 to 9 are due and not taken.
        assert_eq!(s.behind(ms(9)), 4);
        assert_eq!(Schedule::new(1000.0).behind(Duration::ZERO), 1);
        // The rate does not drift over many commands.
        let mut s = Schedule::new(3.0);
        let mut last = Duration::ZERO;
        for _ in 0..3001 {
            last = s.poll(Duration::from_secs(10_000)).unwrap();
        }
        assert_eq!(last, Duration::from_secs(1000));
        // A nonsense rate cannot make a schedule that never fires.
        for bad in [f64::NAN, 0.0, -5.0, f64::INFINITY] {
            let mut s = Schedule::new(bad);
            assert!(s.poll(Duration::ZERO).is_some());
            assert_eq!(s.next_due(), Duration::from_secs(1), "{bad}");
        }
    }

    #[test]
    fn corrected_latency_sees_a_stall_the_service_time_hides() {
        // A virtual run at 1000/s with one command in flight at a time on a
        // device that serves each in 100 µs, except that it stalls for
        // 50 ms at 100 ms. Latency is measured both ways.
        let mut s = Schedule::new(1000.0);
        let service = Duration::from_micros(100);
        let (stall_at, stall) = (Duration::from_millis(100), Duration::from_millis(50));
        let (mut now, mut stalled) = (Duration::ZERO, false);
        let (mut svc, mut corrected) = (Vec::new(), Vec::new());
        while now < Duration::from_secs(1) {
            let Some(intended) = s.poll(now) else {
                now = s.next_due();
                continue;
            };
            let issue = now;
            let mut took = service;
            if !stalled && issue >= stall_at {
                took += stall;
                stalled = true;
            }
            now = issue + took;
            svc.push(took);
            corrected.push(now - intended);
        }
        let over = |v: &[Duration], t: Duration| v.iter().filter(|&&d| d >= t).count();
        let ms = Duration::from_millis;
        // One command saw the stall as service time; the ~50 held back
        // behind it saw it from when they were due.
        assert_eq!(over(&svc, ms(10)), 1);
        assert!(
            over(&corrected, ms(10)) >= 40,
            "{}",
            over(&corrected, ms(10))
        );
        let p99 = |v: &mut Vec<Duration>| {
            v.sort();
            v[v.len() * 99 / 100]
        };
        assert!(p99(&mut svc) < ms(1));
        assert!(p99(&mut corrected) >= ms(10));
    }
}
