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
//!   news on the turn's member reads the others at once;
//! * **rung** (a peer's doorbell, docs/PROTOCOL.md §4): a probe of the
//!   lanes of the hosts that rang ([`Reads::Rung`]), at once, as the ring
//!   spacing allows (below); the other lanes wait for their own rings or
//!   the schedule's polls.
//!
//! **Replies by doorbell.** Where a probe is dear (its READ's measured
//! cost, averaged, at least [`PollConfig::ring_replies_above`]: in the VM an
//! emulated command costs milliseconds, in-process microseconds) and the
//! STG has doorbells, the reply polls cost more than they save: each empty
//! one is a command the array serves while the answering side's WRITE
//! waits. There a host rings its peer after *every* send
//! ([`PollSchedule::rung_replies`]; a lone short slot right after its data
//! is written, its producer block left for later), and the waiting side
//! does not probe for the reply: a send arms no reply polls and moves the
//! next poll no nearer than [`PollConfig::max`] (a lost ring's bound), a
//! probe that took a message polls next only after that unless rung
//! sooner, and such a poll probes (the message a lost ring announced is a
//! probe's). A message then costs its WRITE and one probe. A host waits
//! for rings only while they come: a message taken with no ring heard
//! since the one before puts it back to probing for replies
//! ([`PollSchedule::rung_replies`]), so a LAN that drops the datagrams
//! costs the probes of old, not a [`PollConfig::max`] per message.
//!
//! **The ring spacing.** A ring is a datagram anyone may send. A rung poll
//! that finds nothing doubles the spacing, from [`PollConfig::min`] up to
//! [`RING_SPACING`] (or the cost bound's spacing, if longer); one that
//! finds slots resets it. A ring within the spacing of the last is put off
//! to its end, never dropped: a flood costs the array at most about 200
//! polls a second, and a real ring waits at most the spacing for a forged
//! one.
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

use super::doorbell::RING_SPACING;

/// The most bytes a send may carry and still be taken for a message that
/// a reply may answer soon ([`PollConfig::reply_polls`]).
pub const SMALL_SEND: usize = 64 * 1024;

/// The poll intervals (docs/PROTOCOL.md §4, Polling).
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
    /// With doorbells, replies are rung rather than probed for once a
    /// probe's READ costs this much on average (docs/PROTOCOL.md §4,
    /// Replies by doorbell).
    pub ring_replies_above: Duration,
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
            ring_replies_above: Duration::from_micros(150),
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
    /// A doorbell rang: a probe of the lanes of the hosts that rang
    /// ([`PollSchedule::take_rang`]), whatever their last slot was.
    Rung,
}

/// Host `host`'s bit in a set of hosts (none beyond 32: the layout has at
/// most [`crate::stg::MAX_HOSTS`]).
pub(crate) fn host_bit(host: u16) -> u32 {
    1u32.checked_shl(u32::from(host)).unwrap_or(0)
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
    /// When the poll a ring asked for is due (a ring is pending).
    rung_due: Option<Instant>,
    /// When the last ring was heard.
    last_heard: Option<Instant>,
    /// The hosts heard ringing since the last rung poll began, one bit per
    /// host index.
    rang: u32,
    /// How far apart doorbells may move polls (see the module docs).
    ring_spacing: Duration,
    /// Whether this host hears a doorbell and rings its peers'.
    doorbells: bool,
    /// A probe READ's cost, averaged (`None`: not measured yet).
    read_cost: Option<Duration>,
    /// When a poll last took slots.
    last_take: Instant,
    /// Whether a ring was heard between the last two polls that took
    /// slots.
    peer_rings: bool,
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
            rung_due: None,
            last_heard: None,
            rang: 0,
            ring_spacing: cfg.min,
            doorbells: false,
            read_cost: None,
            last_take: now,
            peer_rings: false,
        }
    }

    /// The schedule of a host with doorbells: replies may be rung.
    pub fn with_doorbells(mut self) -> PollSchedule {
        self.doorbells = true;
        self
    }

    /// A probe's READ took `cost` (averaged over the last few).
    pub fn read_took(&mut self, cost: Duration) {
        self.read_cost = Some(match self.read_cost {
            None => cost,
            Some(avg) => (avg * 3 + cost) / 4,
        });
    }

    /// A probe READ's cost, averaged (`None`: not measured yet).
    pub fn read_cost(&self) -> Option<Duration> {
        self.read_cost
    }

    /// Whether this host rings its peers after every send: it has
    /// doorbells and a probe costs at least
    /// [`PollConfig::ring_replies_above`].
    pub fn rings_every_send(&self) -> bool {
        self.doorbells
            && self
                .read_cost
                .is_some_and(|c| c >= self.cfg.ring_replies_above)
    }

    /// Whether replies are rung rather than probed for: this host rings
    /// every send, and the last message it took had a ring heard before it
    /// (a peer whose datagrams do not arrive, a firewall on the LAN, gets
    /// its messages probed for as without doorbells, not found 10 ms late).
    pub fn rung_replies(&self) -> bool {
        self.rings_every_send() && self.peer_rings
    }

    /// When the next poll is due.
    pub fn due(&self) -> Instant {
        self.next
    }

    /// What a poll starting at `now` reads.
    pub fn reads(&self, now: Instant) -> Reads {
        let idle = now.saturating_duration_since(self.last_activity) >= self.cfg.idle_after;
        let sweep_due = now.saturating_duration_since(self.last_sweep) >= self.cfg.sweep;
        if self.rung_due.is_some_and(|t| t <= now) {
            Reads::Rung
        } else if self.reply_polls > 0 || (self.rung_replies() && !self.streaming && !idle) {
            // Where replies are rung, a poll that was not rung is a lost
            // ring's bound: the message it looks for is a probe's.
            Reads::Probe
        } else if !idle || self.streaming || sweep_due {
            Reads::All
        } else {
            Reads::Turn
        }
    }

    /// A poll of `reads` ran from `started` to `now`; `progress` if it took
    /// slots.
    pub fn polled(&mut self, started: Instant, now: Instant, progress: bool, reads: Reads) {
        if reads == Reads::All {
            self.last_sweep = started;
        }
        let cost = now.saturating_duration_since(started);
        if reads == Reads::Rung {
            self.ring_spacing = if progress {
                self.cfg.min
            } else {
                let cap = RING_SPACING.max(cost * self.cfg.cost_factor);
                (self.ring_spacing * 2).clamp(self.cfg.min, cap)
            };
            // A ring heard while the poll ran may be for a slot it missed:
            // another rung poll, a spacing on.
            self.rung_due = match self.last_heard {
                Some(h) if h > started => {
                    let at = self.ring_at(now);
                    self.last_rung = Some(at);
                    Some(at)
                }
                _ => None,
            };
        }
        let probed = matches!(reads, Reads::Probe | Reads::Rung);
        self.streaming = progress;
        if progress {
            self.peer_rings = self.last_heard.is_some_and(|h| h >= self.last_take);
            self.last_take = now;
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
        // A message probed for where replies are rung: the next comes by
        // doorbell, or after the longest warm interval.
        if progress && probed && self.rung_replies() {
            self.streaming = false;
            self.interval = self.cfg.max;
        }
        // Only a poll that found nothing is overhead; one that took slots
        // did the work.
        let cost = if progress { Duration::ZERO } else { cost };
        let factor = if self.reply_polls > 0 {
            self.cfg.reply_cost_factor
        } else {
            self.cfg.cost_factor
        };
        self.earliest = now + cost * factor;
        self.next = (now + self.interval).max(self.earliest);
        if let Some(t) = self.rung_due {
            self.next = self.next.min(t);
        }
    }

    /// Something may have changed (a held lane's port queue drained):
    /// poll as soon as the cost bound allows.
    pub fn poke(&mut self, now: Instant) {
        self.next = self.next.min(now.max(self.earliest));
    }

    /// Host `src` rang this host's doorbell at `now` (it published slots):
    /// a probe of its lane at once, but no sooner than the ring spacing
    /// after the last rung poll (a datagram anyone may send; see the
    /// module docs). A ring within the spacing is put off to its end, never
    /// dropped, so a forged ring just before a real one delays the real one
    /// by the spacing at most. True when the next poll moved earlier (wake
    /// the poller).
    pub fn rung(&mut self, now: Instant, src: u16) -> bool {
        self.last_heard = Some(now);
        self.rang |= host_bit(src);
        if self.rung_due.is_some() {
            // The poll already due for a ring takes this one's slots too
            // (or, if it is running, `polled` schedules another).
            return false;
        }
        let at = self.ring_at(now);
        self.rung_due = Some(at);
        self.last_rung = Some(at);
        if at < self.next {
            self.next = at;
            true
        } else {
            false
        }
    }

    /// The hosts heard ringing since the last call, one bit per host
    /// index: what a rung poll probes, taken as it begins (rings heard
    /// while it runs are the next rung poll's).
    pub fn take_rang(&mut self) -> u32 {
        std::mem::take(&mut self.rang)
    }

    /// When a ring heard at `now` may poll: at once, or at the end of the
    /// spacing after the last rung poll.
    fn ring_at(&self, now: Instant) -> Instant {
        self.last_rung
            .map_or(now, |t| now.max(t + self.ring_spacing))
    }

    /// Whether the next poll waits for a reply that may come any moment:
    /// its sleep should end on time (see `block::slack`).
    pub fn precise(&self) -> bool {
        self.reply_polls > 0 || self.rung_due.is_some()
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
        if self.rung_replies() {
            // The reply comes by doorbell; poll no later than a lost ring's
            // bound.
            self.reply_polls = 0;
            self.interval = self.cfg.max;
        } else if bytes <= SMALL_SEND {
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

    /// A schedule of `cfg` gone idle: it began 30 s before `t` and a poll
    /// at `t` found nothing. Returns it and `t`.
    fn idle(cfg: PollConfig) -> (PollSchedule, Instant) {
        let t0 = Instant::now();
        let mut s = PollSchedule::new(cfg, t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, false, Reads::All);
        (s, t)
    }

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
            let reads = s.reads(now);
            commands += if reads == Reads::All { members } else { 1 };
            s.polled(now, now + cost, false, reads);
            now += cost;
        }
        commands
    }

    #[test]
    fn an_idle_lane_costs_at_most_ten_commands_a_second() {
        let t0 = Instant::now();
        let mut s = PollSchedule::new(PollConfig::default(), t0);
        // Traffic, then silence: the first seconds are warm...
        s.polled(t0, t0, true, Reads::All);
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

    /// A rung poll probes the lanes of the hosts that rang before it began;
    /// a host that rings while it runs is the next rung poll's.
    #[test]
    fn a_rung_poll_probes_the_lanes_of_the_hosts_that_rang() {
        let cfg = PollConfig::default();
        let (mut s, t) = idle(cfg);
        let ring = t + Duration::from_millis(40);
        assert!(s.rung(ring, 2));
        assert!(!s.rung(ring, 5), "the poll already due takes it");
        assert_eq!(s.reads(ring), Reads::Rung);
        assert_eq!(s.take_rang(), 1 << 2 | 1 << 5);
        let cost = Duration::from_micros(30);
        s.rung(ring + cost / 2, 1);
        s.polled(ring, ring + cost, true, Reads::Rung);
        assert_eq!(s.reads(s.due()), Reads::Rung);
        assert_eq!(s.take_rang(), 1 << 1);
        assert_eq!(s.take_rang(), 0, "taken");
        // A source beyond any layout (a forged ring is refused before
        // this; the schedule does not rely on it) marks no lane.
        s.rung(ring + cost * 2, 40);
        assert_eq!(s.take_rang(), 0);
    }

    #[test]
    fn a_doorbell_probes_an_idle_lane_at_once_but_a_flood_no_more_than_its_spacing() {
        let cfg = PollConfig::default();
        let (mut s, t) = idle(cfg);
        assert_eq!(s.due(), t + cfg.idle, "idle");
        let ring = t + Duration::from_millis(40);
        assert!(s.rung(ring, 1));
        assert_eq!(s.due(), ring, "polls at once");
        assert_eq!(s.reads(ring), Reads::Rung, "a probe of host 1's lane");
        // The poll finds nothing (a forged ring): the spacing doubles, and
        // a real ring right after is put off to its end, not dropped.
        let cost = Duration::from_micros(30);
        s.polled(ring, ring + cost, false, Reads::Rung);
        assert_eq!(s.due(), ring + cost + cfg.idle, "back to idle");
        let real = ring + Duration::from_micros(60);
        assert!(s.rung(real, 1));
        assert_eq!(s.due(), ring + cfg.min * 2);
        assert_ne!(s.reads(real), Reads::Rung, "not yet");
        let p = s.due();
        assert_eq!(s.reads(p), Reads::Rung);
        // That poll finds the slot: the spacing is back at its floor.
        s.polled(p, p + cost, true, Reads::Rung);
        let p2 = s.due();
        let reads = s.reads(p2);
        assert_eq!(reads, Reads::All, "streaming");
        s.polled(p2, p2 + cost, false, reads);
        let q = p2 + cost + Duration::from_micros(10);
        assert!(s.due() > q);
        assert!(s.rung(q, 1));
        assert_eq!(s.due(), q, "the next ring polls at once");
        // A ring heard while a rung poll runs gets a poll of its own.
        s.rung(q + cost / 2, 1);
        s.polled(q, q + cost, false, Reads::Rung);
        assert_eq!(s.reads(s.due()), Reads::Rung);
        assert!(s.due() <= q + cost + cfg.min * 2);
        // A flood of doorbells on an idle lane, one every microsecond for
        // a second (each poll 100 µs, finding nothing): about one poll a
        // RING_SPACING once the spacing has grown.
        let cost = Duration::from_micros(100);
        let (mut s, t) = idle(cfg);
        let (mut now, end) = (t, t + Duration::from_secs(1));
        let mut polls = 0u32;
        while now < end {
            s.rung(now, 1);
            if s.due() <= now {
                polls += 1;
                let reads = s.reads(now);
                s.polled(now, now + cost, false, reads);
                now += cost;
            }
            now += Duration::from_micros(1);
        }
        assert!((190..=215).contains(&polls), "{polls} polls in a second");
    }

    /// Ping-pong on a virtual clock where every command costs `cost`: host
    /// A sends a message, B's poller finds it, B answers at once, and so
    /// on, `rounds` times. Each side's schedule is driven as the poller
    /// drives it; a send rings the peer when the sender's schedule says
    /// replies are rung (the ring lands `ring_delay` later). Returns the
    /// commands the two sides' polls issued per message and the mean one-way
    /// latency.
    fn ping_pong(doorbells: bool, lost: bool, cost: Duration, rounds: u32) -> (f64, Duration) {
        let cfg = PollConfig::default();
        let t0 = Instant::now();
        let ring_delay = Duration::from_micros(100);
        let new = || {
            let s = PollSchedule::new(cfg, t0);
            if doorbells {
                s.with_doorbells()
            } else {
                s
            }
        };
        let mut side = [new(), new()];
        for s in &mut side {
            s.read_took(cost);
        }
        let mut now = t0 + Duration::from_secs(10);
        for s in &mut side {
            s.polled(now, now, false, Reads::All);
        }
        let (mut polls, mut latency) = (0u64, Duration::ZERO);
        let mut to = 1;
        for _ in 0..rounds {
            // The sender WRITEs its slot, rings, and WRITEs the producer
            // block.
            let written = now + cost;
            let rings = side[1 - to].rings_every_send() && !lost;
            side[1 - to].sent(written + cost, 64);
            if rings {
                side[to].rung(written + ring_delay, 1);
            }
            // The receiver's polls until one starts after the slot landed.
            let r = &mut side[to];
            let mut t = now;
            loop {
                t = t.max(r.due());
                let reads = r.reads(t);
                polls += 1;
                let found = t >= written;
                r.polled(t, t + cost, found, reads);
                t += cost;
                if found {
                    break;
                }
            }
            latency += t - now;
            now = t;
            to = 1 - to;
        }
        (polls as f64 / f64::from(rounds), latency / rounds)
    }

    #[test]
    fn where_a_probe_is_dear_and_doorbells_ring_a_reply_costs_one_poll() {
        let dear = Duration::from_millis(2);
        let (probed, probed_latency) = ping_pong(false, false, dear, 200);
        let (rung, rung_latency) = ping_pong(true, false, dear, 200);
        assert!(probed > 1.9, "{probed} polls a message, probing");
        assert!(rung <= 1.02, "{rung} polls a message, rung");
        assert!(
            rung_latency <= probed_latency + Duration::from_micros(200),
            "rung {rung_latency:?}, probed {probed_latency:?}"
        );
        // Where a probe is cheap (in-process), the reply polls stay.
        let cheap = Duration::from_micros(5);
        let mut s = PollSchedule::new(PollConfig::default(), Instant::now()).with_doorbells();
        s.read_took(cheap);
        assert!(!s.rung_replies());
        let t = Instant::now();
        s.sent(t, 64);
        assert_eq!(s.reads(s.due()), Reads::Probe);
        // Measured dear, with no doorbell: probing still.
        let mut s = PollSchedule::new(PollConfig::default(), t);
        s.read_took(dear);
        assert!(!s.rung_replies());
    }

    #[test]
    fn where_a_peers_rings_never_arrive_its_messages_are_probed_for() {
        // Both hosts ring every send, but no datagram gets through (a
        // firewall): as many polls a message as without doorbells, and
        // no later.
        let dear = Duration::from_millis(2);
        let (probed, probed_latency) = ping_pong(false, false, dear, 200);
        let (lost, lost_latency) = ping_pong(true, true, dear, 200);
        assert!(
            (lost - probed).abs() < 0.05,
            "{lost} polls a message, rings lost; {probed} without doorbells"
        );
        assert!(
            lost_latency <= probed_latency + Duration::from_micros(50),
            "rings lost {lost_latency:?}, without doorbells {probed_latency:?}"
        );
    }

    #[test]
    fn where_replies_are_rung_a_lost_ring_costs_at_most_the_warm_bound() {
        let cfg = PollConfig::default();
        let t0 = Instant::now();
        let mut s = PollSchedule::new(cfg, t0).with_doorbells();
        let cost = Duration::from_millis(2);
        s.read_took(cost);
        assert!(s.rings_every_send());
        assert!(!s.rung_replies(), "no ring heard yet");
        // A message taken after a ring: the peer rings.
        let t = t0 + Duration::from_secs(30);
        s.rung(t, 1);
        s.polled(t, t, true, Reads::Rung);
        assert!(s.rung_replies());
        let t = t + Duration::from_secs(30);
        s.polled(t, t, false, Reads::All);
        // A send arms no reply polls, and moves an idle poll to the warm
        // bound: the ring will come; if it is lost, that poll finds the
        // reply.
        assert!(s.sent(t, 64));
        assert_eq!(s.due(), t + cfg.max);
        assert_eq!(
            s.reads(s.due()),
            Reads::Probe,
            "the lost ring's message is a probe's"
        );
        // A message a rung probe took: the next poll waits for a ring, or
        // the warm bound.
        let r = t + Duration::from_millis(3);
        s.rung(r, 1);
        assert_eq!(s.reads(r), Reads::Rung);
        s.polled(r, r + cost, true, Reads::Rung);
        assert_eq!(s.due(), r + cost + cfg.max);
    }

    #[test]
    fn streaming_polls_at_the_shortest_interval_reading_every_member() {
        let t0 = Instant::now();
        let mut s = PollSchedule::new(PollConfig::default(), t0);
        let t = t0 + Duration::from_secs(30);
        s.polled(t, t, true, Reads::All);
        assert_eq!(s.due(), t + PollConfig::default().min);
        assert_eq!(s.reads(s.due()), Reads::All);
    }

    #[test]
    fn a_send_wakes_an_idle_poller() {
        let cfg = PollConfig::default();
        let (mut s, t) = idle(cfg);
        assert_eq!(s.due(), t + cfg.idle);
        assert_eq!(s.reads(t + cfg.idle), Reads::Turn);
        let send = t + Duration::from_millis(3);
        assert!(s.sent(send, 1 << 20), "the poll moves earlier");
        assert_eq!(s.due(), send + cfg.min);
        assert_eq!(s.reads(s.due()), Reads::All, "no longer idle");
        // After a bulk send, polls that find nothing back off as usual.
        let p = s.due();
        s.polled(p, p, false, Reads::All);
        assert_eq!(s.due(), p + cfg.min * 2);
        let later = s.due();
        s.polled(later, later, false, Reads::All);
        assert_eq!(s.due(), later + cfg.min * 4);
        // A second send while a poll is already near is no news.
        assert!(!s.sent(s.due() - cfg.min, 1 << 20));
    }

    #[test]
    fn a_small_send_keeps_polling_at_the_shortest_interval_for_a_while() {
        let cfg = PollConfig::default();
        let (mut s, t) = idle(cfg);
        assert!(s.sent(t, 64));
        assert_eq!(s.due(), t + cfg.reply);
        let mut now = s.due();
        let mut at_reply = 0;
        loop {
            s.polled(now, now, false, Reads::All);
            if s.due() - now > cfg.reply {
                break;
            }
            at_reply += 1;
            now = s.due();
        }
        assert_eq!(at_reply, cfg.reply_polls);
        assert_eq!(s.due() - now, cfg.min, "then the streaming interval");
        now = s.due();
        s.polled(now, now, false, Reads::All);
        assert_eq!(s.due() - now, cfg.min * 2, "then it backs off");
        // A reply taken ends the window: empty polls after it back off.
        assert!(s.sent(now, 64));
        let p = s.due();
        s.polled(p, p, true, Reads::All);
        assert_eq!(s.due(), p + cfg.min);
        let q = s.due();
        s.polled(q, q, false, Reads::All);
        assert_eq!(s.due(), q + cfg.min * 2);
    }

    #[test]
    fn the_reply_polls_probe_and_an_answer_sent_while_a_poll_ran_keeps_them() {
        let cfg = PollConfig::default();
        let (mut s, t) = idle(cfg);
        assert_ne!(s.reads(t), Reads::Probe, "no reply awaited");
        s.sent(t, 64);
        let p = s.due();
        assert_eq!(s.reads(p), Reads::Probe, "a reply awaited: probe");
        // The poll takes the reply, and the reader answers before the poll
        // ends: the answer's reply is awaited as well.
        let during = p + Duration::from_micros(5);
        s.sent(during, 64);
        s.polled(p, p + Duration::from_micros(10), true, Reads::Turn);
        let q = s.due();
        assert_eq!(s.reads(q), Reads::Probe);
        s.polled(q, q, false, Reads::Turn);
        assert_eq!(s.due(), q + cfg.reply, "still at the reply interval");
        // Awaiting a reply, a slow poll (2 ms of emulated SCSI) spaces the
        // next by its own duration, not eight times it.
        let r = s.due();
        let end = r + Duration::from_millis(2);
        s.polled(r, end, false, Reads::Turn);
        assert_eq!(s.due(), end + Duration::from_millis(2));
        // A bulk send awaits no reply.
        let (mut b, t) = idle(cfg);
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
        s.polled(t0, end, false, Reads::All);
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
        s.polled(t, t, false, Reads::All);
        assert_eq!(s.reads(t + cfg.idle), Reads::Turn);
        assert_eq!(s.reads(t + cfg.sweep), Reads::All);
    }
}
