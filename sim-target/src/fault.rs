//! Seeded fault injection for any [`Transport`]: [`FaultyTransport`] wraps a
//! path and makes it misbehave the way SAN paths and arrays do, repeatably
//! (the idea of smoltcp's `FaultInjector`, one layer down).
//!
//! ```text
//!  caller ──submit──▶ FaultyTransport ──(maybe)──▶ inner transport ──▶ array
//!         ◀──reap──── fail / lose / delay / shuffle ◀── completions
//! ```
//!
//! What a [`FaultPlan`] can do to a command:
//!
//! * **fail the submission** ([`FaultPlan::fail_submit`]): `submit` refuses
//!   it with a retryable path error (BUS BUSY); the command never reaches
//!   the array and its buffer is handed back.
//! * **fail the completion** ([`FaultPlan::fail_completion`]): the caller
//!   sees BUSY, TASK SET FULL, CHECK CONDITION / ABORTED COMMAND or a
//!   `DID_SOFT_ERROR` path error, chosen at random. A data-out or no-data
//!   command is, at random, first forwarded to the array (the realistic
//!   *lost completion*: the array acted, the initiator sees an error) or
//!   not forwarded at all. A data-in command is not forwarded (losing
//!   data-in is the next knob's job).
//! * **lose data-in** ([`FaultPlan::lose_data_in`]): a data-in command
//!   (READ, RECEIVE, …) is executed by the array and its completion is then
//!   replaced by one of the errors above. What the array handed out (the
//!   frames a RECEIVE dequeued) is lost; the layer above must recover.
//! * **delay** ([`FaultPlan::delay`]): every completion is held for a
//!   random time in the range before `reap` returns it.
//! * **reorder** ([`FaultPlan::reorder`]): each batch `reap` returns is
//!   shuffled. (A caller with one command in flight per path, such as the
//!   synchronous vendor mailbox, sees reordering only across paths, from
//!   delays and failed commands.)
//! * **unit attention** ([`FaultPlan::unit_attention_every`]): every N-th
//!   accepted command is answered CHECK CONDITION / UNIT ATTENTION
//!   29h/00h (POWER ON, RESET, OR BUS DEVICE RESET OCCURRED) without being
//!   forwarded.
//! * **path death** ([`FaultPlan::die_after`], [`FaultControl::kill`]):
//!   from then on every command on every path sharing the control fails
//!   with `DID_NO_CONNECT` (not retryable) and never reaches the array.
//!
//! Determinism: every decision is drawn from a [`SmallRng`] seeded by the
//! caller, a fixed number of draws per command, so the same seed and the
//! same sequence of commands give the same faults. The wall clock only
//! decides *when* a delayed completion is released, never *what* happens.
//! Reordering draws from a second generator (derived from the same seed),
//! so batch sizes, which depend on timing, cannot shift the fault sequence.
//!
//! A [`FaultControl`] may be shared by several transports (all the paths
//! of a host, say): it arms and disarms them together (a disarmed transport
//! is a plain pass-through and draws nothing), kills them together, and
//! sums their [`FaultStats`]. Periods (`unit_attention_every`,
//! `die_after`) count each transport's own commands; a death kills every
//! transport sharing the control.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use scsi::transport::SubmitError;
use scsi::{
    Asc, Command, CommandError, Completion, DataDirection, DriverStatus, HostStatus, Outcome,
    ScsiStatus, Sense, SenseKey, Transport,
};

/// Mixed into the seed of the reordering generator, so it is independent
/// of the fault generator.
const REORDER_SEED_MIX: u64 = 0x5245_4F52_4445_5221;

/// Which faults to inject, and how often. Probabilities are per command,
/// clamped to 0..=1 (NaN counts as 0).
#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    /// Probability that `submit` refuses a command with a retryable path
    /// error (BUS BUSY).
    pub fail_submit: f64,
    /// Probability that a command's completion is replaced by BUSY, TASK
    /// SET FULL, ABORTED COMMAND or `DID_SOFT_ERROR` (chosen at random).
    /// Data-out and no-data commands are forwarded to the array first half
    /// of the time (a lost completion); data-in commands never are.
    pub fail_completion: f64,
    /// Probability that a data-in command is executed by the array and its
    /// completion then replaced by one of the errors above: its data is lost.
    pub lose_data_in: f64,
    /// Hold every completion for a random time in `(min, max)`.
    pub delay: Option<(Duration, Duration)>,
    /// Shuffle every batch of completions `reap` returns.
    pub reorder: bool,
    /// Answer every N-th accepted command with UNIT ATTENTION 29h/00h
    /// instead of forwarding it.
    pub unit_attention_every: Option<u32>,
    /// After this many (armed) commands on one transport it kills its
    /// [`FaultControl`]: that path and every other path sharing the control
    /// fail every later command with `DID_NO_CONNECT`, without reaching the
    /// array (a host that lost its SAN).
    pub die_after: Option<u64>,
}

impl Default for FaultPlan {
    fn default() -> FaultPlan {
        FaultPlan::none()
    }
}

impl FaultPlan {
    /// No faults: the wrapper is a pass-through.
    pub fn none() -> FaultPlan {
        FaultPlan {
            fail_submit: 0.0,
            fail_completion: 0.0,
            lose_data_in: 0.0,
            delay: None,
            reorder: false,
            unit_attention_every: None,
            die_after: None,
        }
    }

    /// Sets [`FaultPlan::fail_submit`] (clamped to 0..=1).
    pub fn fail_submit(mut self, p: f64) -> FaultPlan {
        self.fail_submit = probability(p);
        self
    }

    /// Sets [`FaultPlan::fail_completion`] (clamped to 0..=1).
    pub fn fail_completion(mut self, p: f64) -> FaultPlan {
        self.fail_completion = probability(p);
        self
    }

    /// Sets [`FaultPlan::lose_data_in`] (clamped to 0..=1).
    pub fn lose_data_in(mut self, p: f64) -> FaultPlan {
        self.lose_data_in = probability(p);
        self
    }

    /// Holds every completion for a random time between `min` and `max`
    /// (swapped if given the wrong way round).
    pub fn delay(mut self, min: Duration, max: Duration) -> FaultPlan {
        self.delay = Some((min.min(max), min.max(max)));
        self
    }

    /// Shuffles every batch of completions.
    pub fn reorder(mut self, on: bool) -> FaultPlan {
        self.reorder = on;
        self
    }

    /// Answers every `n`-th command with UNIT ATTENTION 29h/00h (`0`: never).
    pub fn unit_attention_every(mut self, n: u32) -> FaultPlan {
        self.unit_attention_every = (n > 0).then_some(n);
        self
    }

    /// Kills the path after `n` commands.
    pub fn die_after(mut self, n: u64) -> FaultPlan {
        self.die_after = Some(n);
        self
    }
}

fn probability(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

/// One draw: true with probability `p`. Always consumes exactly one value,
/// so the number of draws per command does not depend on the plan's rates.
fn chance(rng: &mut SmallRng, p: f64) -> bool {
    rng.gen::<f64>() < probability(p)
}

/// The error an injected failure reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InjectedError {
    /// SCSI status BUSY.
    Busy,
    /// SCSI status TASK SET FULL.
    TaskSetFull,
    /// CHECK CONDITION, ABORTED COMMAND / DATA PHASE ERROR (4Bh/00h).
    AbortedCommand,
    /// The path failed the command: host status `DID_SOFT_ERROR`.
    SoftError,
}

impl InjectedError {
    const ALL: [InjectedError; 4] = [
        InjectedError::Busy,
        InjectedError::TaskSetFull,
        InjectedError::AbortedCommand,
        InjectedError::SoftError,
    ];

    /// The outcome a caller sees; `residual` is reported as given.
    pub fn outcome(self, residual: u32) -> Outcome {
        let mut o = match self {
            InjectedError::Busy => Outcome {
                status: ScsiStatus::BUSY,
                ..Outcome::good(0)
            },
            InjectedError::TaskSetFull => Outcome {
                status: ScsiStatus::TASK_SET_FULL,
                ..Outcome::good(0)
            },
            InjectedError::AbortedCommand => Outcome::check_condition(&Sense::new(
                SenseKey::ABORTED_COMMAND,
                Asc::DATA_PHASE_ERROR,
            )),
            InjectedError::SoftError => Outcome {
                host_status: HostStatus::SOFT_ERROR,
                ..Outcome::good(0)
            },
        };
        o.residual = residual;
        o
    }
}

/// Counters of injected faults. With a shared [`FaultControl`] they are the
/// sums over every transport using it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Commands submitted while armed (faulted or not).
    pub commands: u64,
    /// Commands `submit` refused.
    pub failed_submits: u64,
    /// Completions replaced by an error (lost data-in not included).
    pub failed_completions: u64,
    /// Of [`FaultStats::failed_completions`], commands the array executed
    /// first (lost completions).
    pub executed_then_failed: u64,
    /// Data-in completions lost after the array executed the command.
    pub lost_data_in: u64,
    /// Completions held back by a delay.
    pub delayed: u64,
    /// Batches of two or more completions shuffled.
    pub reordered_batches: u64,
    /// Commands answered with an injected UNIT ATTENTION.
    pub unit_attentions: u64,
    /// Commands failed because the path was dead.
    pub dead: u64,
    /// Injected errors reported as BUSY.
    pub busy: u64,
    /// Injected errors reported as TASK SET FULL.
    pub task_set_full: u64,
    /// Injected errors reported as ABORTED COMMAND.
    pub aborted_command: u64,
    /// Injected errors reported as `DID_SOFT_ERROR`.
    pub soft_error: u64,
}

impl FaultStats {
    fn count(&mut self, e: InjectedError) {
        match e {
            InjectedError::Busy => self.busy += 1,
            InjectedError::TaskSetFull => self.task_set_full += 1,
            InjectedError::AbortedCommand => self.aborted_command += 1,
            InjectedError::SoftError => self.soft_error += 1,
        }
    }

    /// Every injected fault (delays and reordering not counted).
    pub fn injected(&self) -> u64 {
        self.failed_submits
            + self.failed_completions
            + self.lost_data_in
            + self.unit_attentions
            + self.dead
    }
}

impl std::ops::AddAssign for FaultStats {
    fn add_assign(&mut self, o: FaultStats) {
        self.commands += o.commands;
        self.failed_submits += o.failed_submits;
        self.failed_completions += o.failed_completions;
        self.executed_then_failed += o.executed_then_failed;
        self.lost_data_in += o.lost_data_in;
        self.delayed += o.delayed;
        self.reordered_batches += o.reordered_batches;
        self.unit_attentions += o.unit_attentions;
        self.dead += o.dead;
        self.busy += o.busy;
        self.task_set_full += o.task_set_full;
        self.aborted_command += o.aborted_command;
        self.soft_error += o.soft_error;
    }
}

#[derive(Debug)]
struct ControlShared {
    armed: AtomicBool,
    killed: AtomicBool,
    died_at: Mutex<Option<Instant>>,
    stats: Mutex<FaultStats>,
}

/// Arms, disarms and kills one or more [`FaultyTransport`]s, and collects
/// their counters. Clones share the same state.
#[derive(Clone, Debug)]
pub struct FaultControl {
    shared: Arc<ControlShared>,
}

impl Default for FaultControl {
    fn default() -> FaultControl {
        FaultControl::new()
    }
}

impl FaultControl {
    /// An armed control.
    pub fn new() -> FaultControl {
        FaultControl::with_armed(true)
    }

    /// A disarmed control: transports pass commands through untouched
    /// until [`FaultControl::arm`].
    pub fn disarmed() -> FaultControl {
        FaultControl::with_armed(false)
    }

    fn with_armed(armed: bool) -> FaultControl {
        FaultControl {
            shared: Arc::new(ControlShared {
                armed: AtomicBool::new(armed),
                killed: AtomicBool::new(false),
                died_at: Mutex::new(None),
                stats: Mutex::new(FaultStats::default()),
            }),
        }
    }

    /// Starts injecting faults.
    pub fn arm(&self) {
        self.shared.armed.store(true, Ordering::Release);
    }

    /// Stops injecting faults (completions already decided keep their fate).
    pub fn disarm(&self) {
        self.shared.armed.store(false, Ordering::Release);
    }

    /// True while faults are injected.
    pub fn is_armed(&self) -> bool {
        self.shared.armed.load(Ordering::Acquire)
    }

    /// Kills every path using this control, armed or not: from now on every
    /// command fails with `DID_NO_CONNECT`.
    pub fn kill(&self) {
        self.shared.killed.store(true, Ordering::Release);
        self.note_death();
    }

    fn killed(&self) -> bool {
        self.shared.killed.load(Ordering::Acquire)
    }

    /// When the first path using this control died (killed, or its
    /// [`FaultPlan::die_after`] count was reached).
    pub fn died_at(&self) -> Option<Instant> {
        *self
            .shared
            .died_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn note_death(&self) {
        let mut d = self
            .shared
            .died_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        d.get_or_insert_with(Instant::now);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FaultStats {
        *self.stats_mut()
    }

    fn stats_mut(&self) -> MutexGuard<'_, FaultStats> {
        self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What becomes of a forwarded command's completion.
#[derive(Clone, Copy, Debug)]
struct Forwarded {
    /// The caller's tag (the inner transport sees our own).
    tag: u64,
    /// Replace the outcome with this error once the array has executed it.
    replace: Option<InjectedError>,
    /// Hold the completion this long after it arrives.
    delay: Duration,
}

/// A completion waiting for its release time.
#[derive(Debug)]
struct Held {
    release: Instant,
    completion: Completion,
}

/// A [`Transport`] that injects the faults of a [`FaultPlan`] into the
/// commands it passes to `inner`, deterministically for a given seed.
pub struct FaultyTransport<T: Transport> {
    inner: T,
    rng: SmallRng,
    reorder_rng: SmallRng,
    plan: FaultPlan,
    seed: u64,
    control: FaultControl,
    /// Forwarded commands by the tag the inner transport knows them by.
    forwarded: HashMap<u64, Forwarded>,
    next_tag: u64,
    /// Completions decided (injected, or reaped from `inner`) and not yet
    /// returned.
    held: Vec<Held>,
    /// Commands submitted while armed (this transport only).
    commands: u64,
    /// Commands accepted while armed (the unit attention period counts these).
    accepted: u64,
}

impl<T: Transport> std::fmt::Debug for FaultyTransport<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyTransport")
            .field("inner", &self.inner.describe())
            .field("seed", &self.seed)
            .field("plan", &self.plan)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> FaultyTransport<T> {
    /// Wraps `inner`, injecting `plan`'s faults drawn from `seed`, with its
    /// own armed [`FaultControl`].
    pub fn new(inner: T, plan: FaultPlan, seed: u64) -> FaultyTransport<T> {
        FaultyTransport::with_control(inner, plan, seed, FaultControl::new())
    }

    /// Wraps `inner` under a (possibly shared) `control`.
    pub fn with_control(
        inner: T,
        plan: FaultPlan,
        seed: u64,
        control: FaultControl,
    ) -> FaultyTransport<T> {
        FaultyTransport {
            inner,
            rng: SmallRng::seed_from_u64(seed),
            reorder_rng: SmallRng::seed_from_u64(seed ^ REORDER_SEED_MIX),
            plan,
            seed,
            control,
            forwarded: HashMap::new(),
            next_tag: 0,
            held: Vec::new(),
            commands: 0,
            accepted: 0,
        }
    }

    /// The plan in force.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The control this transport answers to.
    pub fn control(&self) -> &FaultControl {
        &self.control
    }

    /// The counters (summed over every transport sharing the control).
    pub fn stats(&self) -> FaultStats {
        self.control.stats()
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Unwraps the transport. Completions held here are dropped.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// Queues a completion the array never saw.
    fn inject(&mut self, cmd: Command, outcome: Outcome, delay: Duration) {
        let mut outcome = outcome;
        if cmd.direction == DataDirection::FromDevice {
            outcome.residual = u32::try_from(cmd.data.len()).unwrap_or(u32::MAX);
        }
        self.hold(
            Completion {
                tag: cmd.tag,
                data: cmd.data,
                result: Ok(outcome),
            },
            delay,
        );
    }

    fn hold(&mut self, completion: Completion, delay: Duration) {
        if !delay.is_zero() {
            self.control.stats_mut().delayed += 1;
        }
        let now = Instant::now();
        self.held.push(Held {
            release: now.checked_add(delay).unwrap_or(now),
            completion,
        });
    }

    /// Passes `cmd` to the inner transport, remembering its fate.
    fn forward(&mut self, mut cmd: Command, fate: Forwarded) -> Result<(), SubmitError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        cmd.tag = tag;
        match self.inner.submit(cmd) {
            Ok(()) => {
                self.forwarded.insert(tag, fate);
                Ok(())
            }
            Err(mut e) => {
                e.cmd.tag = fate.tag;
                Err(e)
            }
        }
    }

    /// Takes completions from the inner transport, applies their fates and
    /// holds them until their release time.
    fn absorb(&mut self, batch: &mut Vec<Completion>) {
        for mut c in batch.drain(..) {
            let Some(fate) = self.forwarded.remove(&c.tag) else {
                // Not ours to decide (cannot happen): pass it on as it is.
                self.hold(c, Duration::ZERO);
                continue;
            };
            c.tag = fate.tag;
            if let (Some(e), Ok(o)) = (fate.replace, &c.result) {
                c.result = Ok(e.outcome(o.residual));
            }
            self.hold(c, fate.delay);
        }
    }

    /// Moves completions due at `now` to `out`, earliest first.
    fn release(&mut self, now: Instant, out: &mut Vec<Completion>) {
        if self.held.iter().all(|h| h.release > now) {
            return;
        }
        self.held.sort_by_key(|h| h.release);
        let due = self.held.partition_point(|h| h.release <= now);
        out.extend(self.held.drain(..due).map(|h| h.completion));
    }

    fn draw_delay(&mut self) -> Duration {
        match self.plan.delay {
            Some((lo, hi)) if hi > lo => {
                let span = (hi - lo).as_nanos().min(u128::from(u64::MAX)) as u64;
                lo + Duration::from_nanos(self.rng.gen_range(0..=span))
            }
            Some((lo, _)) => lo,
            None => Duration::ZERO,
        }
    }

    fn draw_error(&mut self) -> InjectedError {
        InjectedError::ALL[self.rng.gen_range(0..InjectedError::ALL.len())]
    }
}

impl<T: Transport> Transport for FaultyTransport<T> {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        if self.in_flight() >= self.queue_depth() {
            return Err(SubmitError {
                error: CommandError::Io(io::Error::other(format!(
                    "{} already has {} commands in flight (its queue depth)",
                    self.describe(),
                    self.in_flight()
                ))),
                cmd: Box::new(cmd),
            });
        }
        let killed = self.control.killed();
        if !killed && !self.control.is_armed() {
            let fate = Forwarded {
                tag: cmd.tag,
                replace: None,
                delay: Duration::ZERO,
            };
            return self.forward(cmd, fate);
        }
        self.commands += 1;
        self.control.stats_mut().commands += 1;

        // A dead path answers nothing but "no connection".
        let dies = self.plan.die_after.is_some_and(|n| self.commands > n);
        if dies && !killed {
            // The host lost its SAN: every path sharing the control goes.
            self.control.kill();
        }
        if killed || dies {
            self.control.stats_mut().dead += 1;
            let dead = Outcome {
                host_status: HostStatus::NO_CONNECT,
                ..Outcome::good(0)
            };
            self.inject(cmd, dead, Duration::ZERO);
            return Ok(());
        }

        // The same draws for every command, whatever the rates.
        let refuse = chance(&mut self.rng, self.plan.fail_submit);
        let lose = chance(&mut self.rng, self.plan.lose_data_in);
        let fail = chance(&mut self.rng, self.plan.fail_completion);
        let execute_anyway = self.rng.gen_bool(0.5);
        let error = self.draw_error();
        let delay = self.draw_delay();

        if refuse {
            self.control.stats_mut().failed_submits += 1;
            return Err(SubmitError {
                error: CommandError::Transport {
                    host: HostStatus::BUS_BUSY,
                    driver: DriverStatus::OK,
                },
                cmd: Box::new(cmd),
            });
        }
        self.accepted += 1;
        if let Some(n) = self.plan.unit_attention_every {
            if self.accepted % u64::from(n) == 0 {
                self.control.stats_mut().unit_attentions += 1;
                let ua = Outcome::check_condition(&Sense::new(
                    SenseKey::UNIT_ATTENTION,
                    Asc::POWER_ON_RESET_OR_BUS_DEVICE_RESET,
                ));
                self.inject(cmd, ua, delay);
                return Ok(());
            }
        }
        let data_in = cmd.direction == DataDirection::FromDevice;
        let tag = cmd.tag;
        if data_in && lose {
            let mut stats = self.control.stats_mut();
            stats.lost_data_in += 1;
            stats.count(error);
            drop(stats);
            let fate = Forwarded {
                tag,
                replace: Some(error),
                delay,
            };
            return self.forward(cmd, fate);
        }
        if fail {
            let forward = !data_in && execute_anyway;
            let mut stats = self.control.stats_mut();
            stats.failed_completions += 1;
            stats.count(error);
            if forward {
                stats.executed_then_failed += 1;
            }
            drop(stats);
            if forward {
                let fate = Forwarded {
                    tag,
                    replace: Some(error),
                    delay,
                };
                return self.forward(cmd, fate);
            }
            self.inject(cmd, error.outcome(0), delay);
            return Ok(());
        }
        let fate = Forwarded {
            tag,
            replace: None,
            delay,
        };
        self.forward(cmd, fate)
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let first = out.len();
        let give_up = wait.and_then(|w| Instant::now().checked_add(w));
        let mut batch = Vec::new();
        loop {
            if self.inner.in_flight() > 0 {
                self.inner.reap(&mut batch, Some(Duration::ZERO))?;
                self.absorb(&mut batch);
            }
            let now = Instant::now();
            self.release(now, out);
            if out.len() > first || self.in_flight() == 0 || give_up.is_some_and(|g| now >= g) {
                break;
            }
            // Wait for the inner transport or the next release, whichever
            // comes first (never past the give-up time).
            let next_release = self.held.iter().map(|h| h.release).min();
            let until = [give_up, next_release].into_iter().flatten().min();
            if self.inner.in_flight() > 0 {
                let wait = until.map(|u| u.saturating_duration_since(now));
                self.inner.reap(&mut batch, wait)?;
                self.absorb(&mut batch);
            } else if let Some(until) = until {
                std::thread::sleep(until.saturating_duration_since(now));
            }
        }
        if self.plan.reorder && out.len() - first > 1 && self.control.is_armed() {
            out[first..].shuffle(&mut self.reorder_rng);
            self.control.stats_mut().reordered_batches += 1;
        }
        Ok(out.len() - first)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn describe(&self) -> String {
        format!("{} with faults (seed {})", self.inner.describe(), self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Array, Host, InProcTransport, LunConfig};
    use scsi::cdb::RwFlags;
    use scsi::{Cdb, IoBuf};

    const BLOCK: usize = 512;

    fn lun() -> (Array, Host) {
        let a = Array::new();
        a.add_lun(0, LunConfig::new(0, 1 << 12, BLOCK as u32))
            .unwrap();
        let h = Host::login(&a, "faulty");
        (a, h)
    }

    fn faulty(h: &Host, plan: FaultPlan, seed: u64) -> FaultyTransport<InProcTransport> {
        FaultyTransport::new(h.open(0).unwrap(), plan, seed)
    }

    fn write(lba: u32, byte: u8) -> Command {
        let cdb = Cdb::Write10 {
            lba,
            blocks: 1,
            flags: RwFlags::default(),
        };
        Command::data_out(cdb.emit(), IoBuf::from_slice(&[byte; BLOCK]))
    }

    fn read(lba: u32) -> Command {
        let cdb = Cdb::Read10 {
            lba,
            blocks: 1,
            flags: RwFlags::default(),
        };
        Command::data_in(cdb.emit(), BLOCK)
    }

    fn tur() -> Command {
        Command::no_data(Cdb::TestUnitReady.emit())
    }

    /// A mix of the three directions.
    fn command(i: u32) -> Command {
        match i % 3 {
            0 => write(i % 64, i as u8),
            1 => read(i % 64),
            _ => tur(),
        }
    }

    fn commands_received(a: &Array) -> u64 {
        a.stats().commands.load(Ordering::Relaxed)
    }

    /// A short description of what the caller saw, for comparisons.
    fn verdict(c: Completion) -> String {
        match c.into_result() {
            Ok((data, _)) => format!("ok {}", data.len()),
            Err(e) => format!("err {e}"),
        }
    }

    #[test]
    fn no_faults_is_a_pass_through() {
        let (a, h) = lun();
        let mut t = faulty(&h, FaultPlan::none(), 1);
        for i in 0..60 {
            let c = t.execute(command(i).with_tag(u64::from(i)));
            assert_eq!(c.tag, u64::from(i));
            c.into_result().unwrap();
        }
        let s = t.stats();
        assert_eq!(s.commands, 60);
        assert_eq!(s.injected(), 0);
        assert_eq!(s.delayed, 0);
        assert_eq!(commands_received(&a), 60);
        assert!(t.describe().contains("seed 1"));
    }

    #[test]
    fn every_completion_fails_at_one() {
        let (a, h) = lun();
        let mut t = faulty(&h, FaultPlan::none().fail_completion(1.0), 7);
        let n = 300u32;
        for i in 0..n {
            let c = t.execute(command(i).with_tag(u64::from(i)));
            assert_eq!(c.tag, u64::from(i));
            let len = c.data.len();
            let e = c.into_result().unwrap_err();
            assert!(e.is_retryable(), "{e}");
            // The buffer always comes back.
            let want = if i % 3 == 2 { 0 } else { BLOCK };
            assert_eq!(len, want);
        }
        let s = t.stats();
        assert_eq!(s.failed_completions, u64::from(n));
        assert_eq!(
            s.busy + s.task_set_full + s.aborted_command + s.soft_error,
            300
        );
        for kind in [s.busy, s.task_set_full, s.aborted_command, s.soft_error] {
            assert!(kind > 30, "each error kind is chosen: {s:?}");
        }
        // Some data-out and no-data commands reached the array anyway (the
        // lost completions), no data-in command did.
        assert!(s.executed_then_failed > 40 && s.executed_then_failed < 160);
        assert_eq!(commands_received(&a), s.executed_then_failed);
    }

    #[test]
    fn lost_completions_executed_at_the_array() {
        let (a, h) = lun();
        let mut t = faulty(&h, FaultPlan::none().fail_completion(1.0), 11);
        for lba in 0..100u32 {
            t.execute(write(lba, 0xA5)).into_result().unwrap_err();
        }
        let executed = t.stats().executed_then_failed;
        let mut plain = h.open(0).unwrap();
        let mut landed = 0;
        for lba in 0..100u32 {
            let (d, _) = plain.execute(read(lba)).into_result().unwrap();
            if d[0] == 0xA5 {
                landed += 1;
            }
        }
        assert_eq!(landed, executed);
        assert!(landed > 0 && landed < 100);
        assert_eq!(commands_received(&a), executed + 100);
    }

    #[test]
    fn no_completion_fails_at_zero() {
        let (_, h) = lun();
        let mut t = faulty(&h, FaultPlan::none().fail_completion(0.0), 7);
        for i in 0..300 {
            t.execute(command(i)).into_result().unwrap();
        }
        assert_eq!(t.stats().injected(), 0);
    }

    #[test]
    fn failed_submits_hand_the_command_back() {
        let (a, h) = lun();
        let mut t = faulty(&h, FaultPlan::none().fail_submit(1.0), 3);
        for i in 0..50u32 {
            let e = t.submit(command(i).with_tag(99)).unwrap_err();
            assert!(e.error.is_retryable(), "{}", e.error);
            assert_eq!(e.cmd.tag, 99);
            assert_eq!(t.in_flight(), 0);
        }
        assert_eq!(t.stats().failed_submits, 50);
        assert_eq!(commands_received(&a), 0);
        let mut out = Vec::new();
        assert_eq!(t.reap(&mut out, None).unwrap(), 0);
    }

    #[test]
    fn lost_data_in_was_executed() {
        let (a, h) = lun();
        let mut plain = h.open(0).unwrap();
        plain.execute(write(5, 0x3C)).into_result().unwrap();
        let before = commands_received(&a);
        let mut t = faulty(&h, FaultPlan::none().lose_data_in(1.0), 5);
        for _ in 0..20 {
            let e = t.execute(read(5)).into_result().unwrap_err();
            assert!(e.is_retryable(), "{e}");
        }
        // Data-out and no-data commands are not touched by this knob.
        t.execute(write(6, 1)).into_result().unwrap();
        t.execute(tur()).into_result().unwrap();
        let s = t.stats();
        assert_eq!(s.lost_data_in, 20);
        assert_eq!(s.failed_completions, 0);
        assert_eq!(commands_received(&a) - before, 22);
        assert_eq!(
            a.stats().bytes_read.load(Ordering::Relaxed),
            20 * BLOCK as u64
        );
    }

    #[test]
    fn delays_hold_completions() {
        let (_, h) = lun();
        let (lo, hi) = (Duration::from_millis(20), Duration::from_millis(40));
        let mut t = faulty(&h, FaultPlan::none().delay(hi, lo), 9);
        assert_eq!(t.plan().delay, Some((lo, hi)));
        for _ in 0..5 {
            let start = Instant::now();
            t.execute(tur()).into_result().unwrap();
            assert!(start.elapsed() >= lo);
        }
        // A short wait returns nothing yet, and keeps the command in flight.
        t.submit(tur().with_tag(4)).unwrap();
        let mut out = Vec::new();
        assert_eq!(t.reap(&mut out, Some(Duration::from_millis(1))).unwrap(), 0);
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.reap(&mut out, None).unwrap(), 1);
        assert_eq!(out[0].tag, 4);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.stats().delayed, 6);
    }

    fn batch_order(h: &Host, seed: u64) -> Vec<u64> {
        let mut t = faulty(h, FaultPlan::none().reorder(true), seed);
        for tag in 0..8 {
            t.submit(tur().with_tag(tag)).unwrap();
        }
        let mut out = Vec::new();
        while out.len() < 8 {
            t.reap(&mut out, None).unwrap();
        }
        out.iter().map(|c| c.tag).collect()
    }

    #[test]
    fn reorder_shuffles_batches_repeatably() {
        let (_, h) = lun();
        let orders: Vec<Vec<u64>> = (0..8).map(|s| batch_order(&h, s)).collect();
        for (seed, order) in orders.iter().enumerate() {
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..8).collect::<Vec<_>>());
            assert_eq!(&batch_order(&h, seed as u64), order, "same seed");
        }
        assert!(
            orders.iter().any(|o| o.windows(2).any(|w| w[0] > w[1])),
            "some seed reorders"
        );
    }

    #[test]
    fn periodic_unit_attention() {
        let (a, h) = lun();
        let mut t = faulty(&h, FaultPlan::none().unit_attention_every(3), 2);
        for i in 1..=30u32 {
            let r = t.execute(command(i)).into_result();
            if i % 3 == 0 {
                let e = r.unwrap_err();
                let s = e.sense().expect("sense");
                assert_eq!(s.key, SenseKey::UNIT_ATTENTION);
                assert_eq!(s.asc, Asc(0x29, 0x00));
            } else {
                r.unwrap();
            }
        }
        assert_eq!(t.stats().unit_attentions, 10);
        assert_eq!(commands_received(&a), 20);
    }

    fn run_mixed(h: &Host, seed: u64) -> (Vec<String>, FaultStats) {
        let plan = FaultPlan::none()
            .fail_submit(0.1)
            .fail_completion(0.1)
            .lose_data_in(0.1)
            .unit_attention_every(17);
        let mut t = faulty(h, plan, seed);
        let v = (0..300)
            .map(|i| verdict(t.execute(command(i))))
            .collect::<Vec<_>>();
        (v, t.stats())
    }

    #[test]
    fn same_seed_same_faults() {
        let (_, h) = lun();
        let (a1, s1) = run_mixed(&h, 42);
        let (a2, s2) = run_mixed(&h, 42);
        let (b, _) = run_mixed(&h, 43);
        assert_eq!(a1, a2);
        assert_eq!(s1, s2);
        assert_ne!(a1, b);
        assert!(s1.failed_submits > 0 && s1.failed_completions > 0 && s1.lost_data_in > 0);
    }

    #[test]
    fn dead_path_fails_everything() {
        let (a, h) = lun();
        let control = FaultControl::new();
        let plan = FaultPlan::none().die_after(4);
        let mut t = FaultyTransport::with_control(h.open(0).unwrap(), plan, 1, control.clone());
        for _ in 0..4 {
            t.execute(tur()).into_result().unwrap();
        }
        assert!(control.died_at().is_none());
        for _ in 0..10 {
            let e = t.execute(tur()).into_result().unwrap_err();
            assert!(!e.is_retryable(), "{e}");
            assert!(matches!(
                e,
                CommandError::Transport {
                    host: HostStatus::NO_CONNECT,
                    ..
                }
            ));
        }
        assert!(control.died_at().is_some());
        assert_eq!(control.stats().dead, 10);
        assert_eq!(commands_received(&a), 4);
        // Every path sharing the control died with it.
        let mut sibling = FaultyTransport::with_control(
            h.open(0).unwrap(),
            FaultPlan::none(),
            2,
            control.clone(),
        );
        assert!(sibling.execute(tur()).into_result().is_err());
        assert_eq!(commands_received(&a), 4);

        // kill() takes a path down even when disarmed.
        let other = FaultControl::disarmed();
        let mut u =
            FaultyTransport::with_control(h.open(0).unwrap(), FaultPlan::none(), 1, other.clone());
        u.execute(tur()).into_result().unwrap();
        other.kill();
        assert!(u.execute(tur()).into_result().is_err());
        assert_eq!(other.stats().dead, 1);
    }

    #[test]
    fn disarmed_control_passes_through() {
        let (a, h) = lun();
        let control = FaultControl::disarmed();
        let plan = FaultPlan::none().fail_completion(1.0).fail_submit(1.0);
        let mut t = FaultyTransport::with_control(h.open(0).unwrap(), plan, 1, control.clone());
        for i in 0..10 {
            t.execute(command(i)).into_result().unwrap();
        }
        assert_eq!(control.stats(), FaultStats::default());
        control.arm();
        assert!(t.execute(tur()).into_result().is_err());
        control.disarm();
        t.execute(tur()).into_result().unwrap();
        assert_eq!(control.stats().failed_submits, 1);
        assert_eq!(commands_received(&a), 11);
    }

    #[test]
    fn shared_control_sums_paths() {
        let (_, h) = lun();
        let control = FaultControl::new();
        let plan = FaultPlan::none().fail_completion(1.0);
        let mut paths: Vec<_> = (0..3)
            .map(|s| {
                FaultyTransport::with_control(h.open(0).unwrap(), plan.clone(), s, control.clone())
            })
            .collect();
        for p in &mut paths {
            for _ in 0..5 {
                p.execute(tur()).into_result().unwrap_err();
            }
        }
        assert_eq!(control.stats().failed_completions, 15);
        assert_eq!(paths[0].stats().commands, 15);
        let mut sum = FaultStats::default();
        sum += control.stats();
        sum += control.stats();
        assert_eq!(sum.failed_completions, 30);
        assert_eq!(sum.injected(), 30);
    }

    #[test]
    fn probabilities_are_clamped() {
        let p = FaultPlan::none()
            .fail_submit(2.0)
            .fail_completion(-1.0)
            .lose_data_in(f64::NAN)
            .unit_attention_every(0);
        assert_eq!(p.fail_submit, 1.0);
        assert_eq!(p.fail_completion, 0.0);
        assert_eq!(p.lose_data_in, 0.0);
        assert_eq!(p.unit_attention_every, None);
        assert_eq!(FaultPlan::default(), FaultPlan::none());
        // Raw out-of-range fields do not panic either.
        let (_, h) = lun();
        let raw = FaultPlan {
            fail_completion: 7.0,
            lose_data_in: f64::NAN,
            ..FaultPlan::none()
        };
        let mut t = faulty(&h, raw, 0);
        assert!(t.execute(tur()).into_result().is_err());
    }

    #[test]
    fn queue_depth_counts_held_completions() {
        let (_, h) = lun();
        let opts = crate::InProcOptions {
            queue_depth: 2,
            ..Default::default()
        };
        let plan = FaultPlan::none().fail_completion(1.0);
        let mut t = FaultyTransport::new(h.open_with(0, opts).unwrap(), plan, 4);
        t.submit(read(0)).unwrap();
        t.submit(read(1)).unwrap();
        assert_eq!(t.in_flight(), 2);
        assert!(t.submit(read(2)).is_err());
        let mut out = Vec::new();
        while out.len() < 2 {
            t.reap(&mut out, Some(Duration::from_secs(1))).unwrap();
        }
        assert_eq!(t.in_flight(), 0);
    }
}
