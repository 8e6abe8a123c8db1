//! Policies on top of any [`Transport`]: [`Retrying`] resubmits commands
//! the device refused without executing them (UNIT ATTENTION, BUSY, TASK
//! SET FULL) with bounded exponential back-off, and [`Stripe`] spreads a
//! logical block range over several LUNs.
//!
//! Only those three conditions are retried because each guarantees the
//! command did **not** execute: a retried WRITE cannot land twice. Other
//! failures (timeouts, transport errors, other sense) go to the caller
//! unchanged, since the command may have run.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use scsi::{
    CdbBuf, Command, CommandError, Completion, DataDirection, SenseKey, SubmitError, Transport,
};

/// How often and how patiently [`Retrying`] retries.
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

impl RetryPolicy {
    /// The delay before attempt `attempt + 1`, after `attempt` (≥ 1) failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// Why a completion may be retried, if it may: the device refused the
/// command without executing it.
pub fn retry_reason(c: &Completion) -> Option<&'static str> {
    let outcome = c.result.as_ref().ok()?;
    match outcome.check() {
        Err(CommandError::Busy) => Some("BUSY"),
        Err(CommandError::TaskSetFull) => Some("TASK SET FULL"),
        Err(CommandError::CheckCondition(s)) if s.key == SenseKey::UNIT_ATTENTION => {
            Some("UNIT ATTENTION")
        }
        _ => None,
    }
}

/// What [`Retrying`] keeps of a command to submit it again.
#[derive(Debug)]
struct Origin {
    tag: u64,
    cdb: CdbBuf,
    direction: DataDirection,
    timeout: Duration,
    attempts: u32,
}

/// A [`Transport`] that retries UNIT ATTENTION, BUSY and TASK SET FULL
/// (see [`retry_reason`]) under a [`RetryPolicy`]. Completions carry the
/// caller's tags; a command is reported once, with its last outcome.
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
                        out.push(Completion {
                            tag: o.tag,
                            data: e.cmd.data,
                            result: Err(e.error),
                        });
                    }
                }
            } else {
                i += 1;
            }
        }
        self.delayed.iter().map(|(due, _)| *due).min()
    }

    /// Handles one inner completion: delivers it or schedules a retry.
    fn settle(&mut self, c: Completion, out: &mut Vec<Completion>) {
        let Some(mut o) = self.origins.remove(&c.tag) else {
            // Not ours (cannot happen): pass it on untouched.
            out.push(c);
            return;
        };
        if retry_reason(&c).is_some() && o.attempts < self.policy.max_attempts {
            let due = Instant::now() + self.policy.backoff(o.attempts);
            o.attempts += 1;
            self.retries += 1;
            let cmd = Command {
                cdb: o.cdb,
                direction: o.direction,
                data: c.data,
                timeout: o.timeout,
                tag: c.tag,
            };
            self.origins.insert(c.tag, o);
            self.delayed.push((due, cmd));
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
            attempts: 1,
        };
        cmd.tag = id;
        match self.inner.submit(cmd) {
            Ok(()) => {
                self.origins.insert(id, origin);
                Ok(())
            }
            Err(mut e) => {
                e.cmd.tag = origin.tag;
                Err(e)
            }
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
        format!(
            "{} (retrying UA/BUSY/TASK SET FULL, {} attempts)",
            self.inner.describe(),
            self.policy.max_attempts
        )
    }
}

/// One piece of a striped range: `blocks` blocks at `lba` on member
/// `member`, holding the range's blocks from `offset` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The member LUN's index.
    pub member: usize,
    /// The first block on that member.
    pub lba: u64,
    /// How many blocks.
    pub blocks: u64,
    /// Blocks of the logical range before this piece.
    pub offset: u64,
}

/// Round-robin striping of a logical block space over `members` LUNs in
/// chunks of `chunk` blocks (RAID 0 layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripe {
    members: usize,
    chunk: u64,
}

impl Stripe {
    /// A stripe over `members` LUNs with `chunk` blocks per chunk; `None`
    /// when either is zero.
    pub fn new(members: usize, chunk: u64) -> Option<Stripe> {
        (members > 0 && chunk > 0).then_some(Stripe { members, chunk })
    }

    /// Where logical block `lba` lives: (member, member LBA).
    pub fn locate(&self, lba: u64) -> (usize, u64) {
        let chunk_no = lba / self.chunk;
        let m = self.members as u64;
        (
            (chunk_no % m) as usize,
            (chunk_no / m) * self.chunk + lba % self.chunk,
        )
    }

    /// Splits `blocks` logical blocks from `lba` into per-member extents,
    /// in logical order, none crossing a chunk boundary.
    pub fn split(&self, lba: u64, blocks: u64) -> Vec<Extent> {
        let mut v = Vec::new();
        let mut done = 0;
        while done < blocks {
            let at = lba + done;
            let n = (self.chunk - at % self.chunk).min(blocks - done);
            let (member, mlba) = self.locate(at);
            v.push(Extent {
                member,
                lba: mlba,
                blocks: n,
                offset: done,
            });
            done += n;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scsi::{Asc, IoBuf, Outcome, ScsiStatus, Sense};
    use std::collections::VecDeque;

    /// Answers each command with the next scripted outcome (GOOD when the
    /// script is empty), holding completions until reaped.
    struct Scripted {
        script: VecDeque<Outcome>,
        done: Vec<Completion>,
        submitted: usize,
    }

    impl Transport for Scripted {
        fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
            self.submitted += 1;
            let o = self.script.pop_front().unwrap_or_else(|| Outcome::good(0));
            self.done.push(Completion {
                tag: cmd.tag,
                data: cmd.data,
                result: Ok(o),
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

    fn status(s: ScsiStatus) -> Outcome {
        Outcome {
            status: s,
            ..Outcome::good(0)
        }
    }

    fn scripted(script: Vec<Outcome>) -> Scripted {
        Scripted {
            script: script.into(),
            done: Vec::new(),
            submitted: 0,
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_micros(100),
            max_backoff: Duration::from_millis(1),
        }
    }

    fn write_cmd(tag: u64) -> Command {
        let cdb = CdbBuf::new(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap();
        Command::data_out(cdb, IoBuf::from_slice(&[9; 512])).with_tag(tag)
    }

    #[test]
    fn retries_busy_task_set_full_and_unit_attention() {
        let ua = Outcome::check_condition(&Sense::new(
            SenseKey::UNIT_ATTENTION,
            Asc::POWER_ON_OCCURRED,
        ));
        let t = scripted(vec![
            status(ScsiStatus::BUSY),
            status(ScsiStatus::TASK_SET_FULL),
            ua,
        ]);
        let mut r = Retrying::new(t, fast());
        let c = r.execute(write_cmd(77));
        assert_eq!(c.tag, 77);
        assert_eq!(c.data, IoBuf::from_slice(&[9; 512]));
        assert!(c.into_result().is_ok());
        assert_eq!(r.retries(), 3);
        assert_eq!(r.inner().submitted, 4);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn gives_up_after_max_attempts_and_never_retries_other_errors() {
        let t = scripted(vec![status(ScsiStatus::BUSY); 10]);
        let mut r = Retrying::new(t, fast());
        let c = r.execute(write_cmd(1));
        assert!(matches!(c.into_result(), Err(CommandError::Busy)));
        assert_eq!(r.inner().submitted, 4);

        let ir = Outcome::check_condition(&Sense::new(
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
        ));
        let mut r = Retrying::new(scripted(vec![ir]), fast());
        let c = r.execute(write_cmd(2));
        assert!(matches!(
            c.into_result(),
            Err(CommandError::CheckCondition(_))
        ));
        assert_eq!(r.retries(), 0);
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
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
    }

    #[test]
    fn stripe_layout() {
        assert!(Stripe::new(0, 8).is_none());
        assert!(Stripe::new(2, 0).is_none());
        let s = Stripe::new(3, 4).unwrap();
        assert_eq!(s.locate(0), (0, 0));
        assert_eq!(s.locate(5), (1, 1));
        assert_eq!(s.locate(12), (0, 4));
        assert_eq!(s.locate(23), (2, 7));
        let parts = s.split(2, 9);
        assert_eq!(
            parts,
            vec![
                Extent {
                    member: 0,
                    lba: 2,
                    blocks: 2,
                    offset: 0
                },
                Extent {
                    member: 1,
                    lba: 0,
                    blocks: 4,
                    offset: 2
                },
                Extent {
                    member: 2,
                    lba: 0,
                    blocks: 3,
                    offset: 6
                },
            ]
        );
        assert_eq!(parts.iter().map(|e| e.blocks).sum::<u64>(), 9);
        assert!(s.split(5, 0).is_empty());
    }
}
