//! Binding a port again after the array lost its binding
//! (docs/PROTOCOL.md §6.7): the same port number, with a plain BIND, for
//! as long as [`RetryPolicy::REBIND`] allows.
//!
//! An array that restarts (a controller reboot, a failover, its daemon
//! killed and started again) forgets every binding; the first command
//! after it answers UNIT ATTENTION (retried by the mailbox) and then
//! 80h/02h, unknown binding handle. A connection rides that through: its
//! port is bound again by number and its lost frames are retransmitted.
//! What can fail for good is kept apart from what the array coming back
//! will clear ([`Classify`]).

use crate::error::{MailboxError, Refusal};
use crate::retry::{Classify, Failure, Op, RetryPolicy};

/// Why an attempt to bind a port again did not succeed.
enum Attempt {
    /// The caller is over (its stream or listener ended meanwhile).
    Over,
    /// The array's answer.
    Array(MailboxError),
}

impl Classify for Attempt {
    /// The array may still be coming back: every answer is worth another
    /// attempt but a port someone else bound meanwhile and a LUN that is
    /// no longer an STG member; and an ended caller stops.
    fn failure(&self) -> Failure {
        match self {
            Attempt::Over
            | Attempt::Array(MailboxError::Refused(Refusal::PortInUse | Refusal::NotAnStgMember)) => {
                Failure::Final
            }
            Attempt::Array(_) => Failure::NotExecuted,
        }
    }
}

/// Runs `attempt` (binding the port again, and whatever goes with it)
/// until it succeeds, fails for good, or [`RetryPolicy::REBIND`] is used
/// up, backing off in between. `over` is asked before every attempt: once
/// it says so, this gives up (`Ok(None)`). The last error otherwise.
pub(crate) fn bind_again<T>(
    over: impl Fn() -> bool,
    mut attempt: impl FnMut() -> Result<T, MailboxError>,
) -> Result<Option<T>, MailboxError> {
    let got = RetryPolicy::REBIND.run(Op::Bind, || {
        if over() {
            return Err(Attempt::Over);
        }
        attempt().map_err(Attempt::Array)
    });
    match got {
        Ok(v) => Ok(Some(v)),
        Err(Attempt::Over) => Ok(None),
        Err(Attempt::Array(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn what_is_tried_again() {
        let lost = MailboxError::Refused(Refusal::BadHandle);
        assert_eq!(Attempt::Array(lost).failure(), Failure::NotExecuted);
        for r in [Refusal::PortInUse, Refusal::NotAnStgMember] {
            assert_eq!(
                Attempt::Array(MailboxError::Refused(r)).failure(),
                Failure::Final
            );
        }
        assert_eq!(Attempt::Over.failure(), Failure::Final);
    }

    #[test]
    fn a_port_taken_meanwhile_fails_at_once() {
        let n = Cell::new(0);
        let r: Result<Option<()>, _> = bind_again(
            || false,
            || {
                n.set(n.get() + 1);
                Err(MailboxError::Refused(Refusal::PortInUse))
            },
        );
        assert!(matches!(r, Err(MailboxError::Refused(Refusal::PortInUse))));
        assert_eq!(n.get(), 1);
    }

    #[test]
    fn an_ended_caller_stops_trying() {
        let n = Cell::new(0);
        let r: Result<Option<()>, MailboxError> = bind_again(
            || n.get() >= 1,
            || {
                n.set(n.get() + 1);
                Err(MailboxError::Refused(Refusal::NoFreePorts))
            },
        );
        assert!(matches!(r, Ok(None)));
        assert_eq!(n.get(), 1);
    }

    #[test]
    fn success_after_the_array_came_back() {
        let n = Cell::new(0);
        let r = bind_again(
            || false,
            || {
                n.set(n.get() + 1);
                if n.get() < 3 {
                    Err(MailboxError::Refused(Refusal::BadHandle))
                } else {
                    Ok(7)
                }
            },
        );
        assert!(matches!(r, Ok(Some(7))));
    }
}
