//! The one retry policy of every SCSI command STP issues: which failures
//! may be retried, for which commands, and how patiently.
//!
//! # The rule
//!
//! A failed command falls in one of three classes ([`Failure`]):
//!
//! * **Not executed** — the device guarantees the command did not run:
//!   BUSY, TASK SET FULL, UNIT ATTENTION (SAM-5: a command that reports one
//!   is not executed), NOT READY / becoming ready (04h/01h), and the STG's
//!   queue full (ABORTED COMMAND 80h/08h: SEND is atomic, nothing was
//!   queued; in block mode a ring that stayed full). **Any** command may be
//!   retried.
//! * **Ambiguous** — the command may or may not have run: a timeout, a
//!   path error after submission (host status BUS BUSY, SOFT ERROR,
//!   REQUEUE, TRANSPORT DISRUPTED, RESET), ABORTED COMMAND without an STP
//!   code. Only an **idempotent** command ([`Op::idempotent`]) may be
//!   retried, and only when its buffer came back whole (a timed-out
//!   command's buffer is not handed back).
//!   The ALUA refusals — NOT READY 04h/0Ah (asymmetric access state
//!   transition), 04h/0Bh (port in standby), 04h/0Ch (unavailable), 04h/12h
//!   (offline) — are not executed either (the array checks the port's
//!   state before executing).
//! * **Final** — a retry cannot help (ILLEGAL REQUEST, the other §3.1
//!   conditions, a lost binding, RESERVATION CONFLICT, an I/O error of the
//!   OS, …). Never retried.
//!
//! Which commands are idempotent, that is may safely run twice:
//!
//! | command | idempotent | why |
//! | --- | --- | --- |
//! | READ, STG INFO, PORT STATUS, INQUIRY, READ CAPACITY, TEST UNIT READY, REPORT LUNS | yes | they read |
//! | WRITE (of the same data to the same LBAs) | yes | the blocks end the same; block mode has one writer per block |
//! | RELEASE | yes, in effect | a repeat after success answers BAD HANDLE: the binding is gone either way |
//! | BIND | yes, by docs/PROTOCOL.md §3 | a repeat after a lost reply leaks the first binding until the array is reset (bounded by the attempts), or finds a static port bound (PORT IN USE, reported) |
//! | RECEIVE | **no** | it consumes frames: a repeat would skip what the first took |
//! | SEND | **no** | a repeat may queue the frames twice. A connection drops duplicates by sequence number, so that would be harmless, but a SEND that may have been lost is recovered by the connection's retransmission, not by the mailbox |
//! | anything else (REQUEST SENSE, unknown opcodes) | no | assume the worst |
//!
//! # The helpers
//!
//! Every retrying loop uses one of two, both under a [`RetryPolicy`]
//! (bounded attempts, back-off doubling from `initial_backoff` up to
//! `max_backoff`):
//!
//! * [`RetryPolicy::run`] for a synchronous command (block mode's READs
//!   and WRITEs);
//! * [`Retrying`], a [`Transport`] that resubmits in the background, for
//!   pipelined commands (every path of a vendor-mode mailbox, so its
//!   synchronous BIND/RELEASE/RECEIVE and its pipelined SENDs share it).
//!
//! # Paths
//!
//! [`path_failure`] says which failures are the *path's* rather than the
//! command's, and how the command fares if it is moved to another path to
//! the same logical unit ([`crate::multipath::Multipath`] does the moving):
//!
//! | failure | the path | the command moves |
//! | --- | --- | --- |
//! | NOT READY 04h/0Ah, 04h/0Bh, 04h/0Ch, 04h/12h | its port's state (transitioning, standby, unavailable, offline) | always (not executed) |
//! | UNIT ATTENTION 2Ah/06h ASYMMETRIC ACCESS STATE CHANGED | states must be read again | always (not executed) |
//! | host status NO CONNECT, BAD TARGET, TRANSPORT FAILFAST; an OS error at submission | down | always (never delivered) |
//! | host status TRANSPORT DISRUPTED, ERROR, ABORT, TIME OUT; a timeout; an OS error at completion | down | only if idempotent (it may have run) |
//!
//! BUS BUSY, SOFT ERROR, REQUEUE and RESET are the path asking for a retry
//! on itself, not a failed path: [`Retrying`] handles them.
//!
//! A command that must not move (SEND, RECEIVE after an ambiguous path
//! failure) fails to its caller as it would on one path; the connection
//! recovers it (retransmission, duplicates dropped by sequence number), so
//! nothing is lost or duplicated above the mailbox.
//!
//! A long-poll loop (a receive pump, an accepting listener) is not
//! a retry: after a failure other than a lost binding it waits
//! [`POLL_PAUSE`] and polls with a new RECEIVE; whatever the failed one may
//! have taken, the connection retransmits.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use scsi::alua::AccessState;
use scsi::{
    Asc, CdbBuf, Command, CommandError, Completion, DataDirection, HostStatus, Opcode, SenseKey,
    SubmitError, Transport,
};

use crate::error::{MailboxError, Refusal};
use crate::vendor;

/// What a command does, as far as retrying it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Op {
    /// STG INFO (reads).
    StgInfo,
    /// BIND (allocates).
    Bind,
    /// RELEASE (frees).
    Release,
    /// SEND (queues frames).
    Send,
    /// RECEIVE (consumes frames).
    Receive,
    /// PORT STATUS (reads).
    PortStatus,
    /// READ(10)/READ(16).
    Read,
    /// WRITE(10)/WRITE(16) of given data to given LBAs.
    Write,
    /// Other read-only commands: INQUIRY, READ CAPACITY, TEST UNIT READY,
    /// REPORT LUNS.
    Query,
    /// Anything else.
    Other,
}

impl Op {
    /// The operation of a CDB's opcode.
    pub fn of(opcode: Opcode) -> Op {
        match opcode {
            vendor::STG_INFO => Op::StgInfo,
            vendor::BIND => Op::Bind,
            vendor::RELEASE => Op::Release,
            vendor::SEND => Op::Send,
            vendor::RECEIVE => Op::Receive,
            vendor::PORT_STATUS => Op::PortStatus,
            Opcode::READ_10 | Opcode::READ_16 => Op::Read,
            Opcode::WRITE_10 | Opcode::WRITE_16 => Op::Write,
            Opcode::INQUIRY
            | Opcode::READ_CAPACITY_10
            | Opcode::SERVICE_ACTION_IN_16
            | Opcode::TEST_UNIT_READY
            | Opcode::REPORT_LUNS => Op::Query,
            _ => Op::Other,
        }
    }

    /// The operation of a command.
    pub fn of_cdb(cdb: &CdbBuf) -> Op {
        Op::of(cdb.opcode())
    }

    /// Whether the command may safely run twice (the table of the module
    /// documentation): only such a command is retried after an
    /// [`Failure::Ambiguous`] failure.
    pub fn idempotent(self) -> bool {
        match self {
            Op::StgInfo
            | Op::PortStatus
            | Op::Read
            | Op::Write
            | Op::Query
            | Op::Bind
            | Op::Release => true,
            Op::Send | Op::Receive | Op::Other => false,
        }
    }
}

/// What a failure says about whether the command ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The command certainly did not run: any command may be retried.
    NotExecuted,
    /// The command may or may not have run: only an idempotent command may
    /// be retried.
    Ambiguous,
    /// A retry cannot help.
    Final,
}

impl Failure {
    /// Whether `op` may be retried after this failure.
    pub fn may_retry(self, op: Op) -> bool {
        match self {
            Failure::NotExecuted => true,
            Failure::Ambiguous => op.idempotent(),
            Failure::Final => false,
        }
    }
}

/// Errors the policy can classify.
pub trait Classify {
    /// The class of this failure.
    fn failure(&self) -> Failure;
}

impl Classify for CommandError {
    fn failure(&self) -> Failure {
        match self {
            CommandError::Busy | CommandError::TaskSetFull => Failure::NotExecuted,
            CommandError::CheckCondition(s) => match s.key {
                SenseKey::UNIT_ATTENTION => Failure::NotExecuted,
                SenseKey::NOT_READY if s.asc == Asc::NOT_READY_BECOMING_READY => {
                    Failure::NotExecuted
                }
                SenseKey::NOT_READY if alua_state(s.asc).is_some() => Failure::NotExecuted,
                SenseKey::ABORTED_COMMAND if s.asc == vendor::ASC_QUEUE_FULL => {
                    Failure::NotExecuted
                }
                SenseKey::ABORTED_COMMAND if s.asc == vendor::ASC_RELEASED => Failure::Final,
                SenseKey::ABORTED_COMMAND => Failure::Ambiguous,
                _ => Failure::Final,
            },
            CommandError::Transport {
                host:
                    HostStatus::BUS_BUSY
                    | HostStatus::SOFT_ERROR
                    | HostStatus::REQUEUE
                    | HostStatus::TRANSPORT_DISRUPTED
                    | HostStatus::RESET,
                ..
            } => Failure::Ambiguous,
            CommandError::Timeout(_) => Failure::Ambiguous,
            _ => Failure::Final,
        }
    }
}

impl Classify for MailboxError {
    fn failure(&self) -> Failure {
        match self {
            MailboxError::Transport(e) => e.failure(),
            MailboxError::Refused(Refusal::QueueFull { .. }) => Failure::NotExecuted,
            _ => Failure::Final,
        }
    }
}

/// The ALUA state a NOT READY ASC/ASCQ reports, if it is one of ALUA's.
fn alua_state(asc: Asc) -> Option<AccessState> {
    match asc {
        Asc::NOT_READY_TRANSITIONING => Some(AccessState::TRANSITION),
        Asc::NOT_ACCESSIBLE_STANDBY => Some(AccessState::STANDBY),
        Asc::NOT_ACCESSIBLE_UNAVAILABLE => Some(AccessState::UNAVAILABLE),
        Asc::NOT_ACCESSIBLE_OFFLINE => Some(AccessState::OFFLINE),
        _ => None,
    }
}

/// What a failure says about the path it came back on (see the module's
/// table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathFault {
    /// The path's target port is in this (non-serving) ALUA state.
    State(AccessState),
    /// The target's port group states changed: read them again.
    StateChanged,
    /// The path itself failed (transport, host adapter, timeout).
    Down,
}

/// Where the command was when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The transport refused it at submission: it never left the host.
    Submit,
    /// It failed after submission.
    Completion,
}

/// Whether `e` is the path's failure rather than the command's, and if so
/// what it says about the path and how a move of the command to another
/// path is judged (its [`Failure`] class: moved when
/// [`Failure::may_retry`] allows). `None`: the path is fine; the error is
/// the command's own.
pub fn path_failure(e: &CommandError, stage: Stage) -> Option<(PathFault, Failure)> {
    match e {
        CommandError::CheckCondition(s) => match s.key {
            SenseKey::NOT_READY => {
                alua_state(s.asc).map(|st| (PathFault::State(st), Failure::NotExecuted))
            }
            SenseKey::UNIT_ATTENTION if s.asc == Asc::ASYMMETRIC_ACCESS_STATE_CHANGED => {
                Some((PathFault::StateChanged, Failure::NotExecuted))
            }
            _ => None,
        },
        CommandError::Transport { host, .. } => match *host {
            HostStatus::NO_CONNECT | HostStatus::BAD_TARGET | HostStatus::TRANSPORT_FAILFAST => {
                Some((PathFault::Down, Failure::NotExecuted))
            }
            HostStatus::TRANSPORT_DISRUPTED
            | HostStatus::ERROR
            | HostStatus::ABORT
            | HostStatus::TIME_OUT => Some((PathFault::Down, Failure::Ambiguous)),
            _ => None,
        },
        CommandError::Timeout(_) => Some((PathFault::Down, Failure::Ambiguous)),
        CommandError::Io(_) => Some((
            PathFault::Down,
            match stage {
                Stage::Submit => Failure::NotExecuted,
                Stage::Completion => Failure::Ambiguous,
            },
        )),
        _ => None,
    }
}

/// How often and how patiently a command is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: u32,
    /// The delay before the first retry; each further retry doubles it.
    pub initial_backoff: Duration,
    /// The longest delay between two attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(200),
        }
    }
}

/// The longest a long-poll loop (receive pump, accepting listener) waits
/// after a failed RECEIVE before it polls again.
pub const POLL_PAUSE: Duration = Duration::from_millis(5);

impl RetryPolicy {
    /// The vendor-mode mailbox's: about a second in all (50 attempts, 2 ms
    /// doubling to 20 ms), long enough for a receiver to drain a full
    /// queue or an array to come back from a reset.
    pub const MAILBOX: RetryPolicy = RetryPolicy {
        max_attempts: 50,
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(20),
    };

    /// Binding a port again after the array lost it (docs/PROTOCOL.md
    /// §6.7; each attempt a BIND under [`MAILBOX`](Self::MAILBOX)): about
    /// 20 s in all (25 attempts, 50 ms doubling to 1 s), as long as a
    /// connection's retransmissions last (§6.4), so an array that restarts
    /// a controller or its daemon is ridden through.
    pub const REBIND: RetryPolicy = RetryPolicy {
        max_attempts: 25,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
    };

    /// Block mode's READs and WRITEs: a few quick attempts (the poller
    /// reads again on its next round anyway).
    pub const BLOCK: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    };

    /// The delay before attempt `attempt + 1`, after `attempt` (≥ 1) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// After attempt `attempt` (≥ 1) of `op` failed with `e`: the delay
    /// before the next attempt, or `None` when the command must not (or
    /// need not) be tried again.
    pub fn next(&self, op: Op, attempt: u32, e: &impl Classify) -> Option<Duration> {
        (attempt < self.max_attempts && e.failure().may_retry(op)).then(|| self.backoff(attempt))
    }

    /// Runs `attempt` (a synchronous `op`) until it succeeds, fails in a
    /// way the rule does not retry, or the attempts are used up, sleeping
    /// the back-off in between. The last error is returned.
    pub fn run<T, E: Classify>(
        &self,
        op: Op,
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut n = 1;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(e) => match self.next(op, n, &e) {
                    Some(delay) => {
                        std::thread::sleep(delay);
                        n += 1;
                    }
                    None => return Err(e),
                },
            }
        }
    }
}

/// What [`Retrying`] keeps of a command to submit it again.
#[derive(Debug)]
struct Origin {
    tag: u64,
    cdb: CdbBuf,
    direction: DataDirection,
    timeout: Duration,
    len: usize,
    attempts: u32,
}

/// A [`Transport`] that retries what the rule allows (see the module
/// documentation) under a [`RetryPolicy`], in the background: a failed
/// command waits out its back-off and is submitted again from `reap`. A
/// command the inner transport refuses at submission never ran, so any
/// refusal that may clear (BUS BUSY, a full queue …) is retried the same
/// way, for every command.
/// Completions carry the caller's tags; a command is reported once, with
/// its last outcome.
pub struct Retrying<T: Transport> {
    inner: T,
    policy: RetryPolicy,
    next_id: u64,
    origins: HashMap<u64, Origin>,
    /// Commands waiting out their back-off: (due, command with inner id).
    delayed: Vec<(Instant, Command)>,
    retries: u64,
}

impl<T: Transport> Retrying<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, policy: RetryPolicy) -> Retrying<T> {
        Retrying {
            inner,
            policy,
            next_id: 0,
            origins: HashMap::new(),
            delayed: Vec::new(),
            retries: 0,
        }
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The wrapped transport, mutable.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Retries made so far.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Submits delayed commands whose back-off is over; returns the time
    /// the next one is due.
    fn resubmit_due(&mut self, out: &mut Vec<Completion>) -> Option<Instant> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now && self.inner.in_flight() < self.inner.queue_depth() {
                let (_, cmd) = self.delayed.swap_remove(i);
                if let Err(e) = self.inner.submit(cmd) {
                    let id = e.cmd.tag;
                    if let Some(o) = self.origins.remove(&id) {
                        if let Err(e) = self.refused_at_submit(o, e) {
                            out.push(Completion {
                                tag: e.cmd.tag,
                                data: e.cmd.data,
                                result: Err(e.error),
                            });
                        }
                    }
                }
            } else {
                i += 1;
            }
        }
        self.delayed.iter().map(|(due, _)| *due).min()
    }

    /// The inner transport refused to take a command: it never ran, so a
    /// condition that may clear is retried after the back-off (whatever
    /// the command); otherwise the refusal goes back with the caller's tag.
    fn refused_at_submit(&mut self, mut o: Origin, mut e: SubmitError) -> Result<(), SubmitError> {
        let retry = e.error.failure() != Failure::Final && o.attempts < self.policy.max_attempts;
        if !retry {
            e.cmd.tag = o.tag;
            return Err(e);
        }
        let due = Instant::now() + self.policy.backoff(o.attempts);
        o.attempts += 1;
        self.retries += 1;
        self.origins.insert(e.cmd.tag, o);
        self.delayed.push((due, *e.cmd));
        Ok(())
    }

    /// Handles one inner completion: delivers it or schedules a retry.
    fn settle(&mut self, c: Completion, out: &mut Vec<Completion>) {
        let Some(mut o) = self.origins.remove(&c.tag) else {
            // Not ours (cannot happen): pass it on untouched.
            out.push(c);
            return;
        };
        // Only data-out handed back whole can go again (a timed-out
        // command's buffer is not handed back); a data-in buffer is simply
        // sized again.
        let whole = o.direction != DataDirection::ToDevice || c.data.len() == o.len;
        let op = Op::of_cdb(&o.cdb);
        let delay = match &c.result {
            _ if !whole => None,
            Ok(outcome) => outcome
                .check()
                .err()
                .and_then(|e| self.policy.next(op, o.attempts, &e)),
            Err(e) => self.policy.next(op, o.attempts, e),
        };
        if let Some(delay) = delay {
            o.attempts += 1;
            self.retries += 1;
            let mut data = c.data;
            if o.direction == DataDirection::FromDevice {
                data.resize(o.len);
            }
            let cmd = Command {
                cdb: o.cdb,
                direction: o.direction,
                data,
                timeout: o.timeout,
                tag: c.tag,
            };
            self.origins.insert(c.tag, o);
            self.delayed.push((Instant::now() + delay, cmd));
            return;
        }
        out.push(Completion { tag: o.tag, ..c });
    }
}

impl<T: Transport> Transport for Retrying<T> {
    fn submit(&mut self, mut cmd: Command) -> Result<(), SubmitError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let origin = Origin {
            tag: cmd.tag,
            cdb: cmd.cdb,
            direction: cmd.direction,
            timeout: cmd.timeout,
            len: cmd.data.len(),
            attempts: 1,
        };
        cmd.tag = id;
        match self.inner.submit(cmd) {
            Ok(()) => {
                self.origins.insert(id, origin);
                Ok(())
            }
            Err(e) => self.refused_at_submit(origin, e),
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let before = out.len();
        let deadline = wait.map(|w| Instant::now() + w);
        let mut inner_out = Vec::new();
        loop {
            let next_due = self.resubmit_due(out);
            if out.len() > before || (self.inner.in_flight() == 0 && next_due.is_none()) {
                break;
            }
            let now = Instant::now();
            let mut w = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(due) = next_due {
                let until = due.saturating_duration_since(now);
                w = Some(w.map_or(until, |w| w.min(until)));
            }
            if self.inner.in_flight() == 0 {
                // Only back-offs pending: sleep until the first is due.
                std::thread::sleep(w.unwrap_or_default());
            } else {
                inner_out.clear();
                self.inner.reap(&mut inner_out, w)?;
                for c in inner_out.drain(..) {
                    self.settle(c, out);
                }
            }
            if out.len() > before || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        Ok(out.len() - before)
    }

    fn in_flight(&self) -> usize {
        self.origins.len()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scsi::{IoBuf, Outcome, ScsiStatus, Sense};
    use std::cell::Cell;
    use std::collections::VecDeque;

    use crate::error::classify;

    fn check(key: SenseKey, asc: Asc) -> CommandError {
        CommandError::CheckCondition(Sense::new(key, asc))
    }

    fn busy() -> CommandError {
        CommandError::Busy
    }
    fn task_set_full() -> CommandError {
        CommandError::TaskSetFull
    }
    fn unit_attention() -> CommandError {
        check(SenseKey::UNIT_ATTENTION, Asc::POWER_ON_OCCURRED)
    }
    fn becoming_ready() -> CommandError {
        check(SenseKey::NOT_READY, Asc::NOT_READY_BECOMING_READY)
    }
    fn queue_full() -> CommandError {
        check(SenseKey::ABORTED_COMMAND, vendor::ASC_QUEUE_FULL)
    }
    fn illegal_request() -> CommandError {
        check(SenseKey::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB)
    }
    fn timeout() -> CommandError {
        CommandError::Timeout(Duration::from_secs(30))
    }
    fn path_error() -> CommandError {
        CommandError::Transport {
            host: HostStatus::TRANSPORT_DISRUPTED,
            driver: scsi::DriverStatus::OK,
        }
    }

    const ALL_OPS: [Op; 10] = [
        Op::StgInfo,
        Op::Bind,
        Op::Release,
        Op::Send,
        Op::Receive,
        Op::PortStatus,
        Op::Read,
        Op::Write,
        Op::Query,
        Op::Other,
    ];

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_micros(10),
            max_backoff: Duration::from_micros(40),
        }
    }

    /// Runs `op` under a fast policy against `errors` (then success);
    /// returns the result and the attempts made.
    fn run_script(op: Op, errors: Vec<CommandError>) -> (Result<(), MailboxError>, u32) {
        let script = std::cell::RefCell::new(VecDeque::from(errors));
        let attempts = Cell::new(0);
        let r = fast(8).run(op, || {
            attempts.set(attempts.get() + 1);
            match script.borrow_mut().pop_front() {
                Some(e) => Err(classify(e)),
                None => Ok(()),
            }
        });
        (r, attempts.get())
    }

    /// A condition that guarantees the command did not run is retried for
    /// every command, idempotent or not.
    fn retried_for_every_op(make: fn() -> CommandError) {
        assert_eq!(make().failure(), Failure::NotExecuted, "{}", make());
        for op in ALL_OPS {
            let (r, n) = run_script(op, vec![make(), make()]);
            assert!(r.is_ok(), "{op:?}: {}", make());
            assert_eq!(n, 3, "{op:?}");
        }
    }

    #[test]
    fn busy_is_retried() {
        retried_for_every_op(busy);
    }

    #[test]
    fn task_set_full_is_retried() {
        retried_for_every_op(task_set_full);
    }

    #[test]
    fn unit_attention_is_retried() {
        retried_for_every_op(unit_attention);
        // The mailbox still reports a UA as "bindings may be lost", not lost.
        assert!(!classify(unit_attention()).binding_lost());
    }

    #[test]
    fn queue_full_is_retried() {
        retried_for_every_op(queue_full);
        let e = classify(queue_full());
        assert!(matches!(
            e,
            MailboxError::Refused(Refusal::QueueFull { .. })
        ));
        assert_eq!(e.failure(), Failure::NotExecuted);
        // Block mode's full ring is the same condition.
        let ring = MailboxError::Refused(Refusal::QueueFull { port: 4097 });
        assert!(fast(2).next(Op::Send, 1, &ring).is_some());
    }

    #[test]
    fn not_ready_becoming_ready_is_retried() {
        retried_for_every_op(becoming_ready);
        // Other NOT READY conditions will not clear by themselves.
        let e = check(SenseKey::NOT_READY, Asc(0x3A, 0x00));
        assert_eq!(e.failure(), Failure::Final);
    }

    #[test]
    fn illegal_request_is_never_retried() {
        assert_eq!(illegal_request().failure(), Failure::Final);
        for op in ALL_OPS {
            let (r, n) = run_script(op, vec![illegal_request()]);
            assert!(r.is_err());
            assert_eq!(n, 1, "{op:?}");
        }
        // Nor are the §3.1 conditions other than queue full.
        for r in [
            Refusal::PortNotBound(9),
            Refusal::BadHandle,
            Refusal::PortInUse,
            Refusal::NoFreePorts,
            Refusal::PortLimit { held: 4096 },
            Refusal::MalformedFrame { offset: 0 },
            Refusal::SourcePortMismatch { offset: 0 },
            Refusal::FrameTooLarge { needed: 8192 },
            Refusal::Released,
            Refusal::NotAnStgMember,
        ] {
            let e = classify(CommandError::CheckCondition(r.to_sense()));
            assert_eq!(e.failure(), Failure::Final, "{r:?}");
            assert!(fast(8).next(Op::Read, 1, &e).is_none());
        }
    }

    /// An ambiguous failure is retried for idempotent commands only.
    fn retried_only_when_idempotent(make: fn() -> CommandError) {
        assert_eq!(make().failure(), Failure::Ambiguous, "{}", make());
        for op in ALL_OPS {
            let (r, n) = run_script(op, vec![make()]);
            if op.idempotent() {
                assert!(r.is_ok(), "{op:?}");
                assert_eq!(n, 2, "{op:?}");
            } else {
                assert!(r.is_err(), "{op:?}");
                assert_eq!(n, 1, "{op:?}");
            }
        }
    }

    #[test]
    fn timeout_is_retried_only_for_idempotent_commands() {
        retried_only_when_idempotent(timeout);
    }

    #[test]
    fn transport_error_is_retried_only_for_idempotent_commands() {
        retried_only_when_idempotent(path_error);
        // A path status that will not clear is final.
        let dead = CommandError::Transport {
            host: HostStatus::NO_CONNECT,
            driver: scsi::DriverStatus::OK,
        };
        assert_eq!(dead.failure(), Failure::Final);
    }

    #[test]
    fn the_idempotence_rule() {
        for op in [
            Op::Read,
            Op::Write,
            Op::StgInfo,
            Op::PortStatus,
            Op::Query,
            Op::Bind,
            Op::Release,
        ] {
            assert!(op.idempotent(), "{op:?}");
        }
        for op in [Op::Receive, Op::Send, Op::Other] {
            assert!(!op.idempotent(), "{op:?}");
        }
        assert_eq!(Op::of(vendor::RECEIVE), Op::Receive);
        assert_eq!(Op::of(vendor::SEND), Op::Send);
        assert_eq!(Op::of(Opcode::READ_16), Op::Read);
        assert_eq!(Op::of(Opcode::WRITE_16), Op::Write);
        assert_eq!(Op::of(Opcode::REQUEST_SENSE), Op::Other);
    }

    #[test]
    fn attempts_are_bounded() {
        let (r, n) = run_script(Op::Read, (0..20).map(|_| busy()).collect());
        assert!(matches!(
            r,
            Err(MailboxError::Transport(CommandError::Busy))
        ));
        assert_eq!(n, 8);
        let p = fast(3);
        assert!(p.next(Op::Read, 2, &busy()).is_some());
        assert!(p.next(Op::Read, 3, &busy()).is_none());
        assert!(fast(1).next(Op::Read, 1, &busy()).is_none());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(50),
        };
        assert_eq!(p.backoff(1), Duration::from_millis(1));
        assert_eq!(p.backoff(2), Duration::from_millis(2));
        assert_eq!(p.backoff(4), Duration::from_millis(8));
        assert_eq!(p.backoff(7), Duration::from_millis(50));
        assert_eq!(p.backoff(99), Duration::from_millis(50));
        assert_eq!(p.next(Op::Send, 3, &busy()), Some(Duration::from_millis(4)));
        let m = RetryPolicy::MAILBOX;
        assert_eq!(m.backoff(1), Duration::from_millis(2));
        assert_eq!(m.backoff(4), Duration::from_millis(16));
        assert_eq!(m.backoff(5), Duration::from_millis(20));
        assert_eq!(m.backoff(49), Duration::from_millis(20));
    }

    #[test]
    fn mailbox_errors_keep_their_meaning() {
        // is_retryable() is "a retry may clear it"; the rule above adds
        // which commands may be retried after an ambiguous failure.
        for e in [busy(), task_set_full(), unit_attention(), becoming_ready()] {
            let e = classify(e);
            assert!(
                e.is_retryable() && e.failure() == Failure::NotExecuted,
                "{e}"
            );
        }
        assert!(classify(path_error()).is_retryable());
        assert!(!classify(illegal_request()).is_retryable());
    }

    /// Answers each command with the next scripted outcome (GOOD when the
    /// script is empty), holding completions until reaped.
    struct Scripted {
        script: VecDeque<Result<Outcome, CommandError>>,
        done: Vec<Completion>,
        submitted: usize,
        /// Submissions refused (BUS BUSY) before any is taken.
        refuse: usize,
    }

    impl Transport for Scripted {
        fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
            if self.refuse > 0 {
                self.refuse -= 1;
                return Err(SubmitError {
                    cmd: Box::new(cmd),
                    error: CommandError::Transport {
                        host: HostStatus::BUS_BUSY,
                        driver: scsi::DriverStatus::OK,
                    },
                });
            }
            self.submitted += 1;
            let o = self
                .script
                .pop_front()
                .unwrap_or_else(|| Ok(Outcome::good(0)));
            // A timed-out command's buffer is not handed back.
            let data = match &o {
                Err(CommandError::Timeout(_)) => IoBuf::default(),
                _ => cmd.data,
            };
            self.done.push(Completion {
                tag: cmd.tag,
                data,
                result: o,
            });
            Ok(())
        }
        fn reap(&mut self, out: &mut Vec<Completion>, _: Option<Duration>) -> io::Result<usize> {
            let n = self.done.len();
            out.append(&mut self.done);
            Ok(n)
        }
        fn in_flight(&self) -> usize {
            self.done.len()
        }
        fn queue_depth(&self) -> usize {
            4
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn status(s: ScsiStatus) -> Result<Outcome, CommandError> {
        Ok(Outcome {
            status: s,
            ..Outcome::good(0)
        })
    }

    fn scripted(script: Vec<Result<Outcome, CommandError>>) -> Scripted {
        Scripted {
            script: script.into(),
            done: Vec::new(),
            submitted: 0,
            refuse: 0,
        }
    }

    fn write_cmd(tag: u64) -> Command {
        let cdb = CdbBuf::new(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap();
        Command::data_out(cdb, IoBuf::from_slice(&[9; 512])).with_tag(tag)
    }

    fn send_cmd(tag: u64) -> Command {
        let cdb = scsi::Cdb::Vendor(vendor::send(1, 512)).emit();
        Command::data_out(cdb, IoBuf::from_slice(&[9; 512])).with_tag(tag)
    }

    #[test]
    fn retrying_transport_follows_the_rule() {
        let ua = Ok(Outcome::check_condition(&Sense::new(
            SenseKey::UNIT_ATTENTION,
            Asc::POWER_ON_OCCURRED,
        )));
        let t = scripted(vec![
            status(ScsiStatus::BUSY),
            status(ScsiStatus::TASK_SET_FULL),
            ua,
        ]);
        let mut r = Retrying::new(t, fast(4));
        let c = r.execute(write_cmd(77));
        assert_eq!(c.tag, 77);
        assert_eq!(c.data, IoBuf::from_slice(&[9; 512]));
        assert!(c.into_result().is_ok());
        assert_eq!(r.retries(), 3);
        assert_eq!(r.inner().submitted, 4);
        assert_eq!(r.in_flight(), 0);

        // Bounded.
        let mut r = Retrying::new(
            scripted((0..10).map(|_| status(ScsiStatus::BUSY)).collect()),
            fast(4),
        );
        let c = r.execute(write_cmd(1));
        assert!(matches!(c.into_result(), Err(CommandError::Busy)));
        assert_eq!(r.inner().submitted, 4);

        // ILLEGAL REQUEST: never.
        let ir = Ok(Outcome::check_condition(&Sense::new(
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
        )));
        let mut r = Retrying::new(scripted(vec![ir]), fast(4));
        let c = r.execute(write_cmd(2));
        assert!(matches!(
            c.into_result(),
            Err(CommandError::CheckCondition(_))
        ));
        assert_eq!(r.retries(), 0);

        // A path error: the idempotent WRITE goes again, the SEND does not.
        let mut r = Retrying::new(scripted(vec![Err(path_error())]), fast(4));
        assert!(r.execute(write_cmd(3)).into_result().is_ok());
        assert_eq!(r.retries(), 1);
        let mut r = Retrying::new(scripted(vec![Err(path_error())]), fast(4));
        assert!(r.execute(send_cmd(4)).into_result().is_err());
        assert_eq!(r.retries(), 0);

        // A refused submission never ran: even a SEND goes again.
        let mut t = scripted(Vec::new());
        t.refuse = 2;
        let mut r = Retrying::new(t, fast(4));
        let c = r.execute(send_cmd(6));
        assert_eq!(c.tag, 6);
        assert!(c.into_result().is_ok());
        assert_eq!(r.retries(), 2);

        // A timeout keeps the buffer: nothing to go again with.
        let mut r = Retrying::new(scripted(vec![Err(timeout())]), fast(4));
        assert!(r.execute(write_cmd(5)).into_result().is_err());
        assert_eq!(r.retries(), 0);
    }

    #[test]
    fn path_failures_per_the_table() {
        let standby = check(SenseKey::NOT_READY, Asc::NOT_ACCESSIBLE_STANDBY);
        assert_eq!(
            path_failure(&standby, Stage::Completion),
            Some((PathFault::State(AccessState::STANDBY), Failure::NotExecuted))
        );
        assert_eq!(standby.failure(), Failure::NotExecuted);
        let transition = check(SenseKey::NOT_READY, Asc::NOT_READY_TRANSITIONING);
        assert_eq!(
            path_failure(&transition, Stage::Completion).map(|p| p.0),
            Some(PathFault::State(AccessState::TRANSITION))
        );
        let changed = check(
            SenseKey::UNIT_ATTENTION,
            Asc::ASYMMETRIC_ACCESS_STATE_CHANGED,
        );
        assert_eq!(
            path_failure(&changed, Stage::Completion),
            Some((PathFault::StateChanged, Failure::NotExecuted))
        );
        let gone = CommandError::Transport {
            host: HostStatus::NO_CONNECT,
            driver: scsi::DriverStatus::OK,
        };
        assert_eq!(
            path_failure(&gone, Stage::Completion),
            Some((PathFault::Down, Failure::NotExecuted))
        );
        assert_eq!(
            path_failure(&path_error(), Stage::Completion),
            Some((PathFault::Down, Failure::Ambiguous))
        );
        // A SEND after an ambiguous path failure stays put; a READ moves.
        assert!(!Failure::Ambiguous.may_retry(Op::Send));
        assert!(Failure::Ambiguous.may_retry(Op::Read));
        let os = CommandError::Io(io::Error::other("ENODEV"));
        assert_eq!(
            path_failure(&os, Stage::Submit).map(|p| p.1),
            Some(Failure::NotExecuted)
        );
        assert_eq!(
            path_failure(&os, Stage::Completion).map(|p| p.1),
            Some(Failure::Ambiguous)
        );
        // The command's own errors and retry-on-this-path statuses are not
        // the path's.
        for e in [illegal_request(), busy(), queue_full(), unit_attention()] {
            assert_eq!(path_failure(&e, Stage::Completion), None, "{e}");
        }
        let soft = CommandError::Transport {
            host: HostStatus::SOFT_ERROR,
            driver: scsi::DriverStatus::OK,
        };
        assert_eq!(path_failure(&soft, Stage::Completion), None);
    }
}
