//! A command as the array sees it: a [`Task`] whose [`Reply`] owns the data
//! buffer and the way back to the initiator.
//!
//! The reply abstracts the front end. In-process it is the initiator's own
//! [`IoBuf`](scsi::IoBuf); behind LIO it is the TCMU data area of the
//! command. Data moves through `read_out`/`write_in` at byte offsets, so a
//! front end may scatter one command's data over several segments and the
//! array still copies each byte once.

use scsi::cdb::CdbError;
use scsi::{CdbBuf, DataDirection, ScsiStatus, Sense};

/// Identifies one initiator port (one I_T nexus) on the array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitiatorId(pub u32);

/// How a task ended: a status, sense for CHECK CONDITION, and the number of
/// data-in bytes delivered (the front end derives the residual from it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskResult {
    /// The SCSI status.
    pub status: ScsiStatus,
    /// Sense data, with CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-in bytes written to the reply.
    pub data_in: usize,
}

impl TaskResult {
    /// GOOD, having delivered `data_in` bytes.
    pub fn good(data_in: usize) -> TaskResult {
        TaskResult {
            status: ScsiStatus::GOOD,
            sense: None,
            data_in,
        }
    }

    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> TaskResult {
        TaskResult {
            status: ScsiStatus::CHECK_CONDITION,
            sense: Some(sense),
            data_in: 0,
        }
    }

    /// A bare status (BUSY, TASK SET FULL, …) with no sense.
    pub fn status(status: ScsiStatus) -> TaskResult {
        TaskResult {
            status,
            sense: None,
            data_in: 0,
        }
    }
}

impl From<CdbError> for TaskResult {
    fn from(e: CdbError) -> TaskResult {
        TaskResult::check(e.to_sense())
    }
}

/// The front end's half of a command: its data buffer and its completion.
///
/// Exactly one of `complete` is called per task, by the array or by a
/// vendor handler that held the task; dropping a reply without completing
/// it is a bug in the handler (front ends treat it as an aborted command) —
/// except for an aborted task, see below.
///
/// # Aborted tasks
///
/// The initiator may give up on a command the array still holds (it timed
/// out, or the path went away). From then on the reply's completion goes
/// nowhere, and [`is_aborted`](Reply::is_aborted) returns true. A handler
/// that holds a task (a long-poll RECEIVE, say) must check `is_aborted()`
/// before it gives the task data it cannot give twice — a message dequeued
/// from a mailbox into an aborted reply would be lost — and, when it is
/// aborted, just drop the task: dropping an aborted reply is correct and
/// completes nothing (its completion would be discarded anyway).
pub trait Reply: Send {
    /// Length of the initiator's data buffer: data-out bytes sent, or the
    /// most data-in bytes that fit.
    fn data_len(&self) -> usize;

    /// Copies data-out bytes from `offset` into `dst`; returns how many.
    fn read_out(&self, offset: usize, dst: &mut [u8]) -> usize;

    /// Copies data-in bytes into the buffer at `offset`; returns how many fit.
    fn write_in(&mut self, offset: usize, src: &[u8]) -> usize;

    /// Completes the command.
    fn complete(self: Box<Self>, result: TaskResult);

    /// True once the initiator has given up on this command (timed out or
    /// aborted): whatever the reply is given now is discarded. A front end
    /// that cannot tell returns false, the default.
    fn is_aborted(&self) -> bool {
        false
    }
}

/// A command addressed to one LUN of the array.
pub struct Task {
    /// The initiator that sent it.
    pub initiator: InitiatorId,
    /// The addressed LUN.
    pub lun: u64,
    /// The CDB as received.
    pub cdb: CdbBuf,
    /// The direction the initiator set up for the data phase.
    pub direction: DataDirection,
    /// The buffer and the way back.
    pub reply: Box<dyn Reply>,
}

impl Task {
    /// True once the initiator has given up on this task (see
    /// [`Reply::is_aborted`]): a handler holding it should drop it rather
    /// than hand it data.
    pub fn is_aborted(&self) -> bool {
        self.reply.is_aborted()
    }

    /// Completes the task.
    pub fn complete(self, result: TaskResult) {
        self.reply.complete(result);
    }

    /// Completes with CHECK CONDITION.
    pub fn fail(self, sense: Sense) {
        self.complete(TaskResult::check(sense));
    }

    /// Delivers `data` as data-in (clipped to `alloc_len` and to the buffer)
    /// and completes with GOOD.
    pub fn respond(mut self, data: &[u8], alloc_len: usize) {
        let n = data.len().min(alloc_len);
        let written = self.reply.write_in(0, &data[..n]);
        self.complete(TaskResult::good(written));
    }
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("initiator", &self.initiator)
            .field("lun", &self.lun)
            .field("cdb", &self.cdb)
            .field("direction", &self.direction)
            .field("data_len", &self.reply.data_len())
            .finish()
    }
}
