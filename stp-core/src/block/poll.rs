//! When block mode's consumer polls, and what it reads (docs/PROTOCOL.md
//! §4.4), sans-IO: the driver asks [`PollSchedule::due`] when to poll,
//! [`PollSchedule::reads`] what to read, and reports each poll and each
//! local send with the time.
//!
//! A stock array cannot tell a host that a slot arrived, so the consumer
//! polls, and polling is a trade between the latency of the first slot
//! after a pause and the commands an idle connection costs the array:
//!
//! * **streaming** (the last poll took slots): poll again after
//!   [`PollConfig::min`], reading every member's producer block;
//! * **after a local send** (a reply is likely): the next poll after
//!   [`PollConfig::min`], and from there the interval doubles again —
//!   except after a *small* send (a message, not a slot of a bulk stream:
//!   at most [`SMALL_SEND`] bytes), when [`PollConfig::reply_polls`] polls
//!   that find nothing come every [`PollConfig::reply`] first: a request's
//!   reply comes within a few of them, and the doubling would otherwise
//!   add up to one whole interval to each direction of a round trip (half
//!   the reply interval is what a message waits for the poll that finds
//!   it, on average, so it is shorter than `min`). Those polls *probe*
//!   ([`Reads::Probe`]): one READ of the first block of the slot due next,
//!   which takes a short slot (a reply) whole, with no producer block read
//!   before it and no second READ;
//! * **warm** (activity within [`PollConfig::idle_after`]): the interval
//!   doubles up to [`PollConfig::max`];
//! * **idle**: every [`PollConfig::idle`], reading only the producer block
//!   of the member whose turn it is (the producer's next slot lands there),
//!   and every member's every [`PollConfig::sweep`] (slots a producer left
//!   on another member after a failure are found then). A poll that finds
//!   news on the turn's member reads the others at once.
//!
//! Polling that finds nothing never takes more than 1 /
//! [`PollConfig::cost_factor`] of the time: the next poll is at least that
//! many times such a poll's own duration away (in the VM a poll is several
//! emulated SCSI commands) — but for the few polls that await a reply
//! ([`PollConfig::reply_polls`]), spaced by [`PollConfig::reply_cost_factor`]
//! times theirs, so that where a command is slow a reply is not kept
//! waiting for eight of them.
//! So an idle lane costs `1/idle + (members − 1)/sweep` commands per second
//! (8.75 with the defaults and four members) and the first slot after a
//! pause waits at most `idle` plus one poll.

use std::time::{Duration, Instant};

/// The most bytes a send may carry and still be taken for a message that
/// a reply may answer soon ([`PollConfig::reply_polls`]).
pub const SMALL_SEND: usize = 64 * 1024;

/// The poll intervals (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollConfig {
    /// The interval while streaming and just after a local send.
    pub min: Duration,
    /// The interval of the polls that await a reply after a small send
    /// ([`reply_polls`](Self::reply_polls) of them).
    pub reply: Duration,
    /// The longest interval while warm.
    pub max: Duration,
    /// The interval when idle.
    pub idle: Duration,
    /// Silence after which the lane is idle.
    pub idle_after: Duration,
    /// How often an idle poll reads every member's producer block.
    pub sweep: Duration,
    /// The next poll is at least this many times the last poll's duration
    /// away.
    pub cost_factor: u32,
    /// The same while a reply is awaited ([`reply_polls`](Self::reply_polls)
    /// left): those polls are few and cheap (a probe is one READ), and the
    /// bound would otherwise set the round trip where a command is slow.
    pub reply_cost_factor: u32,
    /// Polls that find nothing at [`min`](Self::min) after a small send,
    /// before the interval doubles.
    pub reply_polls: u32,
}

impl Default for PollConfig {
    fn default() -> PollConfig {
        PollConfig {
            min: Duration::from_micros(50),
            reply: Duration::from_micros(20),
            max: Duration::from_millis(10),
            idle: Duration::from_millis(125),
            idle_after: Duration::from_secs(1),
            sweep: Duration::from_secs(4),
            cost_factor: 8,
            reply_cost_factor: 1,
            reply_polls: 8,
        }
    }
}

/// Which producer blocks a poll reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reads {
    /// Every member's.
    All,
    /// Only the turn's member's (then all, if it has news).
    Turn,
    /// None: the first block of the slot due next, which a short slot (a
    /// reply) fills whole; every member's producer block only when that
    /// block holds the head of a longer slot.
    Probe,
}

/// The consumer's poll schedule.
#[derive(Debug)]
pub(crate) struct PollSchedule {
    cfg: PollConfig,
    interval: Duration,
    /// The last time slots were taken or this host sent.
    last_activity: Instant,
    last_sweep: Instant,
    /// The earliest the next poll may start (the cost bound).
    earliest: Instant,
    next: Instant,
    streaming: bool,
    /// Empty polls left at `min` after a small send.
    reply_polls: u32,
    /// When this host last sent.
    last_sent: Instant,
    /// When a doorbell last moved the next poll.
    last_rung: Option<Instant>,
}

impl PollSchedule {
    /// A schedule that polls at once.
    pub fn new(cfg: PollConfig, now: Instant) -> PollSchedule {
        PollSchedule {
            cfg,
            interval: cfg.min,
            last_activity: now,
            last_sweep: now,
            earliest: now,
            next: now,
            streaming: false,
            reply_polls: 0,
            last_sent: now,
            last_rung: None,
        }
    }

    /// When the next poll is due.
    pub fn due(&self) -> Instant {
        self.next
    }

    /// What a poll starting at `now` reads.
    pub fn reads(&self, now: Instant) -> Reads {
        let idle = now.saturating_duration_since(self.last_activity) >= self.cfg.idle_after;
        let sweep_due = now.saturating_duration_since(self.last_sweep) >= self.cfg.sweep;
        if self.reply_polls > 0 {
            Reads::Probe
        } else if !idle || self.streaming || sweep_due {
            Reads::All
        } else {
            Reads::Turn
        }
    }

    /// A poll ran from `started` to `now`; `progress` if it took slots,
    /// `all` if it read every member's producer block.
    pub fn polled(&mut self, started: Instant, now: Instant, progress: bool, all: bool) {
        if all {
            self.last_sweep = started;
        }
        self.streaming = progress;
        if progress {
            self.last_activity = now;
            // What came may be the reply; the next small send re-arms —
            // unless it already did while this poll ran (the reader of
            // what the poll took answered at once).
            if self.last_sent < started {
                self.reply_polls = 0;
            }
            self.interval = if self.reply_polls > 0 {
                self.cfg.reply
            } else {
                self.cfg.min
            };
        } else if self.reply_polls > 0 {
            self.reply_polls -= 1;
            self.interval = self.cfg.reply;
        } else if now.saturating_duration_since(self.last_activity) >= self.cfg.idle_after {
            self.interval = self.cfg.idle;
        } else {
            self.interval = (self.interval * 2).clamp(self.cfg.min, self.cfg.max);
        }
        // Only a poll that found nothing is overhead; one that took slots
        // did the work.
        let cost = if progress {
            Duration::ZERO
        } else {
            now.saturating_duration_since(started)
        };
        let factor = if self.reply_polls > 0 {
            self.cfg.reply_cost_factor
        } else {
            self.cfg.cost_factor
        };
        self.earliest = now + cost * factor;
        self.next = (now + self.interval).max(self.earliest);
    }

    /// Something may have changed (a held lane's port queue drained):
    /// poll as soon as the cost bound allows.
    pub fn poke(&mut self, now: Instant) {
        self.next = self.next.min(now.max(self.earliest));
    }

    /// A peer rang this host's doorbell at `now` (it published slots after
    /// a quiet spell): poll at once, as the cost bound allows, but for
    /// doorbells at most once a `spacing` (a datagram anyone may send): a
    /// ring within the spacing of the last is put off to its end, never
    /// dropped, so a forged ring just before a real one delays the real one
    /// by the spacing at most. True when the next poll moved earlier (wake
    /// the poller).
    pub fn rung(&mut self, now: Instant, spacing: Duration) -> bool {
        let at = match self.last_rung {
            Some(t) if now < t + spacing => t + spacing,
            _ => {
                self.last_rung = Some(now);
                now
            }
        };
        let soon = at.max(self.earliest);
        if soon < self.next {
            self.next = soon;
            true
        } else {
            false
        }
    }

    /// Whether the next poll waits for a reply that may come any moment:
    /// its sleep should end on time (see `block::slack`).
    pub fn precise(&self) -> bool {
        self.reply_polls > 0
    }

    /// This host sent `bytes` on a lane at `now`: a reply may come, so
    /// poll soon (after a bulk send once: polls that then find nothing back
    /// off as usual, so a host that streams does not poll its reverse lane
    /// flat out; after a small one, [`PollConfig::reply_polls`] times). True
    /// when the next poll moved earlier (wake the poller).
    pub fn sent(&mut self, now: Instant, bytes: usize) -> bool {
        self.last_activity = now;
        self.last_sent = now;
        self.interval = self.cfg.min;
        if bytes <= SMALL_SEND {
            self.reply_polls = self.cfg.reply_polls;
            self.interval = self.cfg.reply;
        }
        let soon = (now + self.interval).max(self.earliest);
        if soon < self.next {
            self.next = soon;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the schedule on a virtual clock for `span` from `start`, each
    /// poll taking `cost` and reading `members` producer blocks when it
    /// reads all and one otherwise (finding nothing): the commands issued.
    fn idle_commands(
        s: &mut PollSchedule,
        start: Instant,
        span: Duration,
        members: u64,
        cost: Duration,
    ) -> u64 {
        let mut now = start;
        let mut commands = 0;
        while now < start + span {
            now = now.max(s.due());
            let all = s.reads(now) == Reads::All;
            commands += if all { members } else { 1 };
            s.polled(now, now + cost, false, all);
            now += cost;
        }
        commands
    }

    #[test]
    fn an_idle_lane_costs_at_most_ten_commands_a_second() {
        let t0 = Instant::now();
        let mut s = PollSchedule::new(PollConfig::default(), t0);
        // Traffic, then silence: the first seconds are warm...
        s.polled(t0, t0, true, true);
        let warm = idle_commands(
            &mut s,
            t0,
            Duration::from_secs(2),
            4,
            Duration::from_micros(20),
        );
        // ...then idle for a minute.
        let t1 = t0 + Duration::from_secs(2);
        let idle = idle_commands(
            &mut s,
            t1,
            Duration::from_secs(60),
            4,
            Duration::from_micros(20),
        );
        let per_sec = idle as f64 / 60.0;
        assert!(per_sec <= 10.0, "idle lane: {per_sec:.2} commands/s");
        assert!(
            per_sec >= 8.0,
            "idle lane still polls: {per_sec:.2} commands/s"
        );
        assert!(warm > idle / 30, "warm polls more often than idle");
    }

    #[test]
    fn a_doorbell_polls_an_idle_lane_at_once_but_a_flood_no_more_than_its_spacing() {
        let t0 = Instant::now();
        let cfg = PollConfig::default();
        let spacing = Duration::from_millis(5);
        let mut s = PollSchedule::new(cfg, t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, false, true);
        assert_eq!(s.due(), t + cfg.idle, "idle");
        let ring = t + Duration::from_millis(40);
        assert!(s.rung(ring, spacing));
        assert_eq!(s.due(), ring, "polls at once");
        // The poll finds nothing (a forged ring); a real one right after is
        // put off to the end of the spacing, not dropped.
        s.polled(ring, ring, false, false);
        let real = ring + Duration::from_micros(10);
        assert!(s.rung(real, spacing));
        assert_eq!(s.due(), ring + spacing);
        // That poll finds the slot: streaming.
        let p = s.due();
        s.polled(p, p, true, false);
        assert_eq!(s.due(), p + cfg.min);
        // A flood of doorbells on an idle lane, one every microsecond for
        // a second (each poll 100 µs, finding nothing): polls no more than
        // once a spacing, and never beyond the cost bound.
        let mut s = PollSchedule::new(cfg, t0);
        s.polled(t, t, false, true);
        let cost = Duration::from_micros(100);
        let (mut now, end) = (t, t + Duration::from_secs(1));
        let mut polls = 0u32;
        while now < end {
            s.rung(now, spacing);
            if s.due() <= now {
                polls += 1;
                let all = s.reads(now) == Reads::All;
                s.polled(now, now + cost, false, all);
                now += cost;
            }
            now += Duration::from_micros(1);
        }
        assert!((180..=201).contains(&polls), "{polls} polls in a second");
    }

    #[test]
    fn streaming_polls_at_the_shortest_interval_reading_every_member() {
        let t0 = Instant::now();
        let mut s = PollSchedule::new(PollConfig::default(), t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, true, true);
        assert_eq!(s.due(), t + PollConfig::default().min);
        assert_eq!(s.reads(s.due()), Reads::All);
    }

    #[test]
    fn a_send_wakes_an_idle_poller() {
        let t0 = Instant::now();
        let cfg = PollConfig::default();
        let mut s = PollSchedule::new(cfg, t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, false, true);
        assert_eq!(s.due(), t + cfg.idle);
        assert_eq!(s.reads(t + cfg.idle), Reads::Turn);
        let send = t + Duration::from_millis(3);
        assert!(s.sent(send, 1 << 20), "the poll moves earlier");
        assert_eq!(s.due(), send + cfg.min);
        assert_eq!(s.reads(s.due()), Reads::All, "no longer idle");
        // After a bulk send, polls that find nothing back off as usual.
        let p = s.due();
        s.polled(p, p, false, true);
        assert_eq!(s.due(), p + cfg.min * 2);
        let later = s.due();
        s.polled(later, later, false, true);
        assert_eq!(s.due(), later + cfg.min * 4);
        // A second send while a poll is already near is no news.
        assert!(!s.sent(s.due() - cfg.min, 1 << 20));
    }

    #[test]
    fn a_small_send_keeps_polling_at_the_shortest_interval_for_a_while() {
        let t0 = Instant::now();
        let cfg = PollConfig::default();
        let mut s = PollSchedule::new(cfg, t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, false, true);
        assert!(s.sent(t, 64));
        assert_eq!(s.due(), t + cfg.reply);
        let mut now = s.due();
        let mut at_reply = 0;
        loop {
            s.polled(now, now, false, true);
            if s.due() - now > cfg.reply {
                break;
            }
            at_reply += 1;
            now = s.due();
        }
        assert_eq!(at_reply, cfg.reply_polls);
        assert_eq!(s.due() - now, cfg.min, "then the streaming interval");
        now = s.due();
        s.polled(now, now, false, true);
        assert_eq!(s.due() - now, cfg.min * 2, "then it backs off");
        // A reply taken ends the window: empty polls after it back off.
        assert!(s.sent(now, 64));
        let p = s.due();
        s.polled(p, p, true, true);
        assert_eq!(s.due(), p + cfg.min);
        let q = s.due();
        s.polled(q, q, false, true);
        assert_eq!(s.due(), q + cfg.min * 2);
    }

    #[test]
    fn the_reply_polls_probe_and_an_answer_sent_while_a_poll_ran_keeps_them() {
        let t0 = Instant::now();
        let cfg = PollConfig::default();
        let mut s = PollSchedule::new(cfg, t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, false, true);
        assert_ne!(s.reads(t), Reads::Probe, "no reply awaited");
        s.sent(t, 64);
        let p = s.due();
        assert_eq!(s.reads(p), Reads::Probe, "a reply awaited: probe");
        // The poll takes the reply, and the reader answers before the poll
        // ends: the answer's reply is awaited as well.
        let during = p + Duration::from_micros(5);
        s.sent(during, 64);
        s.polled(p, p + Duration::from_micros(10), true, false);
        let q = s.due();
        assert_eq!(s.reads(q), Reads::Probe);
        s.polled(q, q, false, false);
        assert_eq!(s.due(), q + cfg.reply, "still at the reply interval");
        // Awaiting a reply, a slow poll (2 ms of emulated SCSI) spaces the
        // next by its own duration, not eight times it.
        let r = s.due();
        let end = r + Duration::from_millis(2);
        s.polled(r, end, false, false);
        assert_eq!(s.due(), end + Duration::from_millis(2));
        // A bulk send awaits no reply.
        let mut b = PollSchedule::new(cfg, t0);
        b.polled(t, t, false, true);
        b.sent(t, SMALL_SEND + 1);
        assert_eq!(b.reads(b.due()), Reads::All);
    }

    #[test]
    fn expensive_polls_are_spaced_by_their_cost() {
        let t0 = Instant::now();
        let cfg = PollConfig::default();
        let mut s = PollSchedule::new(cfg, t0);
        // A poll that took 2 ms (emulated SCSI) and found nothing: the
        // next is 16 ms later, and a send cannot pull it closer.
        let end = t0 + Duration::from_millis(2);
        s.polled(t0, end, false, true);
        assert_eq!(s.due(), end + Duration::from_millis(16));
        assert!(!s.sent(end + Duration::from_millis(1), 64));
        assert_eq!(s.due(), end + Duration::from_millis(16));
    }

    #[test]
    fn an_idle_sweep_reads_every_member() {
        let t0 = Instant::now();
        let cfg = PollConfig::default();
        let mut s = PollSchedule::new(cfg, t0);
        let t = t0 + Duration::from_secs(10);
        s.polled(t, t, false, true);
        assert_eq!(s.reads(t + cfg.idle), Reads::Turn);
        assert_eq!(s.reads(t + cfg.sweep), Reads::All);
    }
}
