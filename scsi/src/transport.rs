//! The [`Transport`] abstraction: how commands reach a logical unit.
//!
//! A transport is one path to one logical unit (an I_T_L nexus): a
//! `/dev/sgN`, a `/dev/sdX`, or an in-process connection to the simulated
//! array. Commands are queued with [`Transport::submit`] and their
//! [`Completion`]s collected with [`Transport::reap`], possibly in a
//! different order than submitted. A command owns its data buffer
//! ([`IoBuf`]) from submission until its completion hands it back, so no
//! buffer can be freed or reused while a device may still touch it.
//!
//! Outcomes separate three layers: the transport itself failed
//! ([`CommandError::Io`], [`CommandError::Timeout`], [`CommandError::Transport`]),
//! the device answered with a non-GOOD status ([`CommandError::CheckCondition`]
//! and friends), or the command succeeded, possibly with a residual.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::buf::IoBuf;
use crate::opcode::Opcode;
use crate::sense::{Sense, SenseError};
use crate::status::{DriverStatus, HostStatus, ScsiStatus};

/// The longest CDB this crate handles.
pub const MAX_CDB_LEN: usize = 16;

/// The default per-command timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A CDB's bytes, 1 to 16 of them, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CdbBuf {
    bytes: [u8; MAX_CDB_LEN],
    len: u8,
}

impl CdbBuf {
    /// Copies `cdb`; `None` when it is empty or longer than 16 bytes.
    pub fn new(cdb: &[u8]) -> Option<CdbBuf> {
        if cdb.is_empty() || cdb.len() > MAX_CDB_LEN {
            return None;
        }
        let mut bytes = [0; MAX_CDB_LEN];
        bytes[..cdb.len()].copy_from_slice(cdb);
        Some(CdbBuf {
            bytes,
            len: cdb.len() as u8,
        })
    }

    /// The CDB's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The operation code (byte 0).
    pub fn opcode(&self) -> Opcode {
        Opcode(self.bytes[0])
    }
}

impl fmt::Debug for CdbBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CDB[")?;
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        f.write_str("]")
    }
}

/// Which way a command's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// No data phase.
    None,
    /// Data-out: from the initiator to the device (e.g. WRITE).
    ToDevice,
    /// Data-in: from the device to the initiator (e.g. READ, INQUIRY).
    FromDevice,
}

/// A command ready to submit. It owns its buffer until it completes.
#[derive(Debug)]
pub struct Command {
    /// The CDB.
    pub cdb: CdbBuf,
    /// The data direction; with [`DataDirection::None`] `data` is ignored.
    pub direction: DataDirection,
    /// Data-out bytes to send, or the data-in buffer (its length is the
    /// allocation: the most the device may return).
    pub data: IoBuf,
    /// How long the transport waits before giving up on the command.
    pub timeout: Duration,
    /// The caller's tag, returned in the completion.
    pub tag: u64,
}

impl Command {
    /// A command with no data phase.
    pub fn no_data(cdb: CdbBuf) -> Command {
        Command {
            cdb,
            direction: DataDirection::None,
            data: IoBuf::default(),
            timeout: DEFAULT_TIMEOUT,
            tag: 0,
        }
    }

    /// A data-in command that may return up to `len` bytes.
    pub fn data_in(cdb: CdbBuf, len: usize) -> Command {
        Command {
            direction: DataDirection::FromDevice,
            data: IoBuf::new(len),
            ..Command::no_data(cdb)
        }
    }

    /// A data-out command sending `data`.
    pub fn data_out(cdb: CdbBuf, data: IoBuf) -> Command {
        Command {
            direction: DataDirection::ToDevice,
            data,
            ..Command::no_data(cdb)
        }
    }

    /// Sets the tag.
    pub fn with_tag(mut self, tag: u64) -> Command {
        self.tag = tag;
        self
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Command {
        self.timeout = timeout;
        self
    }

    /// Bytes the data phase may move.
    pub fn transfer_len(&self) -> usize {
        match self.direction {
            DataDirection::None => 0,
            _ => self.data.len(),
        }
    }
}

/// What the device (and the path to it) said about a completed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The SCSI status byte.
    pub status: ScsiStatus,
    /// The path's status (sg `host_status`); [`HostStatus::OK`] in-process.
    pub host_status: HostStatus,
    /// The driver's status (sg `driver_status`).
    pub driver_status: DriverStatus,
    /// Raw sense bytes (empty when the device returned none).
    pub sense: Vec<u8>,
    /// Bytes of the data phase not transferred (requested minus actual).
    pub residual: u32,
    /// Time from submission to completion.
    pub duration: Duration,
}

impl Outcome {
    /// GOOD status with the given residual.
    pub fn good(residual: u32) -> Outcome {
        Outcome {
            status: ScsiStatus::GOOD,
            host_status: HostStatus::OK,
            driver_status: DriverStatus::OK,
            sense: Vec::new(),
            residual,
            duration: Duration::ZERO,
        }
    }

    /// CHECK CONDITION carrying `sense` (emitted in its own format).
    pub fn check_condition(sense: &Sense) -> Outcome {
        Outcome {
            status: ScsiStatus::CHECK_CONDITION,
            driver_status: DriverStatus::SENSE,
            sense: sense.to_bytes(),
            ..Outcome::good(0)
        }
    }

    /// The decoded sense data, if any was returned.
    pub fn decoded_sense(&self) -> Option<Result<Sense, SenseError>> {
        (!self.sense.is_empty()).then(|| Sense::parse(&self.sense))
    }

    /// Classifies the outcome: `Ok` for GOOD and CONDITION MET, otherwise the
    /// typed error. Path errors take precedence over the status byte.
    pub fn check(&self) -> Result<(), CommandError> {
        if self.host_status == HostStatus::TIME_OUT
            || self.driver_status.code() == DriverStatus::TIMEOUT
        {
            return Err(CommandError::Timeout(self.duration));
        }
        if self.host_status != HostStatus::OK || self.driver_status.is_error() {
            return Err(CommandError::Transport {
                host: self.host_status,
                driver: self.driver_status,
            });
        }
        match self.status {
            ScsiStatus::GOOD | ScsiStatus::CONDITION_MET => Ok(()),
            ScsiStatus::CHECK_CONDITION => Err(match self.decoded_sense() {
                Some(Ok(sense)) => CommandError::CheckCondition(sense),
                Some(Err(error)) => CommandError::BadSense {
                    error,
                    raw: self.sense.clone(),
                },
                None => CommandError::BadSense {
                    error: SenseError::Empty,
                    raw: Vec::new(),
                },
            }),
            ScsiStatus::BUSY => Err(CommandError::Busy),
            ScsiStatus::TASK_SET_FULL => Err(CommandError::TaskSetFull),
            ScsiStatus::RESERVATION_CONFLICT => Err(CommandError::ReservationConflict),
            other => Err(CommandError::Status(other)),
        }
    }
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The device reported CHECK CONDITION with this sense.
    #[error("CHECK CONDITION: {0}")]
    CheckCondition(Sense),
    /// CHECK CONDITION whose sense data could not be decoded.
    #[error("CHECK CONDITION with unreadable sense data ({error}); raw sense: {raw:02x?}")]
    BadSense {
        /// Why decoding failed.
        error: SenseError,
        /// The bytes the device returned.
        raw: Vec<u8>,
    },
    /// The logical unit is busy; retry after a short delay.
    #[error("device BUSY; retry after a short delay")]
    Busy,
    /// The device's task set is full; retry once a command completes.
    #[error("TASK SET FULL; lower the queue depth or retry when a command completes")]
    TaskSetFull,
    /// Another initiator holds a reservation on the logical unit.
    #[error("RESERVATION CONFLICT: another initiator holds a reservation on this LUN")]
    ReservationConflict,
    /// Any other non-GOOD status.
    #[error("unexpected SCSI {0}")]
    Status(ScsiStatus),
    /// The path to the device failed (host or driver status).
    #[error("transport error ({host}, {driver}); check the path to the device")]
    Transport {
        /// The host (path) status.
        host: HostStatus,
        /// The driver status.
        driver: DriverStatus,
    },
    /// The command did not complete within its timeout.
    #[error("command timed out after {0:?}")]
    Timeout(Duration),
    /// The operating system refused or failed the request.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl CommandError {
    /// True for conditions a retry may clear: BUSY, TASK SET FULL, UNIT
    /// ATTENTION, ABORTED COMMAND, NOT READY (becoming ready) and transient
    /// path errors.
    pub fn is_retryable(&self) -> bool {
        use crate::sense::{Asc, SenseKey};
        match self {
            CommandError::Busy | CommandError::TaskSetFull => true,
            CommandError::CheckCondition(s) => {
                matches!(s.key, SenseKey::UNIT_ATTENTION | SenseKey::ABORTED_COMMAND)
                    || (s.key == SenseKey::NOT_READY && s.asc == Asc::NOT_READY_BECOMING_READY)
            }
            CommandError::Transport { host, .. } => matches!(
                *host,
                HostStatus::BUS_BUSY
                    | HostStatus::SOFT_ERROR
                    | HostStatus::REQUEUE
                    | HostStatus::TRANSPORT_DISRUPTED
                    | HostStatus::RESET
            ),
            _ => false,
        }
    }

    /// The decoded sense, for check conditions.
    pub fn sense(&self) -> Option<&Sense> {
        match self {
            CommandError::CheckCondition(s) => Some(s),
            _ => None,
        }
    }
}

/// A finished command: its tag, its buffer back, and what happened.
#[derive(Debug)]
pub struct Completion {
    /// The tag the command was submitted with.
    pub tag: u64,
    /// The command's buffer; for data-in, the first `len - residual` bytes
    /// hold the data.
    pub data: IoBuf,
    /// The outcome, or the error that kept the command from completing.
    pub result: Result<Outcome, CommandError>,
}

impl Completion {
    /// Flattens the completion: `Ok` with the buffer truncated to the bytes
    /// actually transferred, or the error (transport or status).
    pub fn into_result(self) -> Result<(IoBuf, Outcome), CommandError> {
        let outcome = self.result?;
        outcome.check()?;
        let mut data = self.data;
        let moved = data.len().saturating_sub(outcome.residual as usize);
        data.resize(moved);
        Ok((data, outcome))
    }
}

/// A command the transport could not accept, handed back to the caller.
#[derive(Debug, thiserror::Error)]
#[error("could not submit {:?}: {error}", cmd.cdb)]
pub struct SubmitError {
    /// The command, returned so its buffer is not lost.
    pub cmd: Box<Command>,
    /// Why it was refused.
    pub error: CommandError,
}

/// One path to one logical unit.
pub trait Transport: Send {
    /// Queues a command. The transport owns it until its completion is
    /// returned by [`reap`](Transport::reap).
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError>;

    /// Appends finished commands to `out` and returns how many. Waits up to
    /// `wait` for at least one when none is ready (`None`: until one is,
    /// provided any is in flight). Returns 0 at once when nothing is in flight.
    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize>;

    /// Commands submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// The most commands this transport accepts at once.
    fn queue_depth(&self) -> usize;

    /// A short human-readable name of the path (e.g. `/dev/sg1 (SG_IO)`).
    fn describe(&self) -> String;

    /// Submits one command and waits for it. Requires an idle transport (no
    /// other command in flight) so no other completion is consumed.
    fn execute(&mut self, cmd: Command) -> Completion {
        if self.in_flight() != 0 {
            return Completion {
                tag: cmd.tag,
                data: cmd.data,
                result: Err(CommandError::Io(io::Error::other(
                    "execute() needs an idle transport; use submit() and reap() when commands are in flight",
                ))),
            };
        }
        if let Err(e) = self.submit(cmd) {
            return Completion {
                tag: e.cmd.tag,
                data: e.cmd.data,
                result: Err(e.error),
            };
        }
        let mut out = Vec::with_capacity(1);
        loop {
            match self.reap(&mut out, None) {
                Ok(_) => {
                    if let Some(c) = out.pop() {
                        return c;
                    }
                }
                Err(e) => {
                    return Completion {
                        tag: 0,
                        data: IoBuf::default(),
                        result: Err(CommandError::Io(e)),
                    }
                }
            }
        }
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        (**self).submit(cmd)
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        (**self).reap(out, wait)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn queue_depth(&self) -> usize {
        (**self).queue_depth()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::{Asc, SenseKey};

    #[test]
    fn cdb_buf_bounds() {
        assert!(CdbBuf::new(&[]).is_none());
        assert!(CdbBuf::new(&[0; 17]).is_none());
        let c = CdbBuf::new(&[0x12, 0, 0, 0, 36, 0]).unwrap();
        assert_eq!(c.opcode(), Opcode::INQUIRY);
        assert_eq!(format!("{c:?}"), "CDB[12 00 00 00 24 00]");
    }

    #[test]
    fn outcome_classification() {
        assert!(Outcome::good(0).check().is_ok());
        let ua = Sense::new(SenseKey::UNIT_ATTENTION, Asc::POWER_ON_OCCURRED);
        let err = Outcome::check_condition(&ua).check().unwrap_err();
        assert_eq!(err.sense(), Some(&ua));
        assert!(err.is_retryable());

        let mut o = Outcome::good(0);
        o.status = ScsiStatus::TASK_SET_FULL;
        assert!(matches!(o.check(), Err(CommandError::TaskSetFull)));
        o.status = ScsiStatus::RESERVATION_CONFLICT;
        assert!(matches!(o.check(), Err(CommandError::ReservationConflict)));
        o.status = ScsiStatus::BUSY;
        assert!(matches!(o.check(), Err(CommandError::Busy)));
        o.status = ScsiStatus(0x22);
        assert!(matches!(o.check(), Err(CommandError::Status(_))));

        // Path errors win over the status byte.
        o.host_status = HostStatus::TIME_OUT;
        assert!(matches!(o.check(), Err(CommandError::Timeout(_))));
        o.host_status = HostStatus::NO_CONNECT;
        assert!(matches!(o.check(), Err(CommandError::Transport { .. })));

        // CHECK CONDITION with garbage sense is still a typed error.
        let mut o = Outcome::good(0);
        o.status = ScsiStatus::CHECK_CONDITION;
        o.sense = vec![0x01, 0x02];
        assert!(matches!(o.check(), Err(CommandError::BadSense { .. })));
        // A plain illegal request is not retryable.
        let ir = Sense::new(
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        );
        assert!(!CommandError::CheckCondition(ir).is_retryable());
    }

    #[test]
    fn into_result_trims_to_residual() {
        let c = Completion {
            tag: 7,
            data: IoBuf::from_slice(&[1, 2, 3, 4, 5, 6]),
            result: Ok(Outcome::good(2)),
        };
        let (data, _) = c.into_result().unwrap();
        assert_eq!(&data[..], &[1, 2, 3, 4]);
    }
}
