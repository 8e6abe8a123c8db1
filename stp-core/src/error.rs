//! The mailbox seam's one error type, [`MailboxError`], grouped by cause
//! so that callers match the group and, where they care, the condition:
//!
//! * [`MailboxError::Transport`] — the command failed below STP: the path
//!   (host or driver status, timeout, the OS), or a SCSI condition that
//!   docs/PROTOCOL.md §3.1 does not name (BUSY, UNIT ATTENTION, …). The
//!   [`CommandError`] says which.
//! * [`MailboxError::Refused`] — the STG refused the operation with one of
//!   the conditions of §3.1 ([`Refusal`]); block mode refuses with the same
//!   conditions.
//! * [`MailboxError::Config`] — the STG cannot be used as configured
//!   ([`SetupError`]): no member path, a member that cannot be opened, a
//!   protocol version the array does not route, a block-mode STG not
//!   formatted or formatted otherwise, a port of another host.
//! * [`MailboxError::Protocol`] — the other side broke the protocol
//!   ([`ProtocolError`]): a malformed STG INFO or BIND reply, a block-mode
//!   layout on the members that contradicts itself.
//!
//! No condition travels as a string: each has a typed variant with the
//! fields a caller may need, and its message says what went wrong and what
//! to do. Which failures a retry may clear is decided in one place,
//! [`crate::retry`]; [`MailboxError::is_retryable`] and
//! [`MailboxError::binding_lost`] are the questions the layers above ask.

use std::io;
use std::sync::Arc;

use scsi::{Asc, CommandError, Sense, SenseKey};

use crate::block::BlockError;
use crate::stg::ConfigError;
use crate::vendor::{
    VendorError, ASC_BAD_HANDLE, ASC_FRAME_TOO_LARGE, ASC_MALFORMED_FRAME, ASC_NO_FREE_PORTS,
    ASC_PORT_IN_USE, ASC_PORT_NOT_BOUND, ASC_QUEUE_FULL, ASC_RELEASED, ASC_SOURCE_PORT_MISMATCH,
};

/// A failed mailbox operation, in either mode, grouped by cause.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The command failed below STP (the path, or a SCSI condition §3.1
    /// does not name).
    #[error(transparent)]
    Transport(CommandError),
    /// The STG refused the operation (§3.1).
    #[error(transparent)]
    Refused(Refusal),
    /// The STG cannot be used as configured.
    #[error(transparent)]
    Config(SetupError),
    /// The other side broke the protocol.
    #[error(transparent)]
    Protocol(ProtocolError),
}

/// The STP conditions of docs/PROTOCOL.md §3.1: the array's vendor sense
/// in vendor mode, the host's own mailbox in block mode.
///
/// Information values a non-conforming array left out read as 0 (never a
/// valid port, so [`Refusal::PortNotBound`]`(0)` means "not given").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// 80h/01h: nobody has bound the destination port (connection refused,
    /// or the peer is gone).
    #[error("destination port {0} is not bound on the STG (connection refused or peer gone)")]
    PortNotBound(u32),
    /// 80h/02h: the binding handle is unknown (released, or the array
    /// restarted); bind again.
    #[error(
        "the array does not know this binding handle (released or array restarted); bind again"
    )]
    BadHandle,
    /// 80h/03h: the port is already bound; pick another.
    #[error("the port is already bound on the STG; pick another port")]
    PortInUse,
    /// 80h/04h: every dynamic port of the STG is bound.
    #[error("no free dynamic port on the STG; release ports and retry later")]
    NoFreePorts,
    /// 80h/04h with the INFORMATION field set: this initiator already holds
    /// `held` ports, the array's limit per initiator (docs/PROTOCOL.md
    /// §7.1); other hosts still bind.
    #[error(
        "this host already holds {held} ports on the STG, the array's limit per initiator; \
         close connections (or find what keeps opening them: another process on this host \
         sharing its SCSI paths counts too) and retry"
    )]
    PortLimit {
        /// The ports the initiator holds.
        held: u32,
    },
    /// 80h/05h: the SEND data holds a malformed frame (a bug in the sender).
    #[error("the array found a malformed frame at byte {offset} of the SEND data")]
    MalformedFrame {
        /// Byte offset of the frame in the SEND data.
        offset: u32,
    },
    /// 80h/06h: a frame's `src_port` is not the sender's bound port (a bug).
    #[error(
        "the frame at byte {offset} of the SEND data names a source port other than the sender's"
    )]
    SourcePortMismatch {
        /// Byte offset of the frame in the SEND data.
        offset: u32,
    },
    /// 80h/07h: the first queued frame does not fit the RECEIVE allocation.
    #[error("the next queued frame needs {needed} bytes, more than the RECEIVE allocation; retry with a larger buffer")]
    FrameTooLarge {
        /// The allocation that fits the frame.
        needed: u32,
    },
    /// 80h/08h: the destination queue is full; retry after a back-off.
    #[error("the queue of port {port} is full; retry after a back-off")]
    QueueFull {
        /// The destination port.
        port: u32,
    },
    /// 80h/09h: the binding was released while this RECEIVE waited.
    #[error("the binding was released while the RECEIVE waited; stop receiving")]
    Released,
    /// 20h/00h: the LUN is not a member of an STG (or the array does not
    /// implement the opcode): a configuration error.
    #[error("the LUN is not a member of an STG on this array, or the array does not implement STP vendor commands; check the configuration")]
    NotAnStgMember,
}

/// Why an STG cannot be used as configured. Fix the configuration, the
/// array or the host, then open the STG again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A mailbox was asked for with no member path.
    #[error("an STG mailbox needs at least one member path; list the STG's members")]
    NoPaths,
    /// The configuration does not resolve to this host's devices (unknown
    /// STG, member not visible, members that differ …).
    #[error(transparent)]
    Resolve(ConfigError),
    /// A member's device node could not be opened.
    #[error("STG {stg} member {member}: {source}")]
    OpenDevice {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Why (it names the node).
        #[source]
        source: scsi::sg::SgError,
    },
    /// A member path supplied by the caller (in-process, tests) could not
    /// be opened.
    #[error("STG {stg} member {member}: cannot open a path to it: {source}")]
    OpenPath {
        /// The STG id.
        stg: u32,
        /// The member index.
        member: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The array routes another frame version than this host speaks.
    #[error(
        "the array routes STP v{array} frames, this host speaks v{host}: run the same STP \
         release on the array (stp-target) and both hosts"
    )]
    VersionMismatch {
        /// The version STG INFO reported.
        array: u8,
        /// The version this host speaks.
        host: u8,
    },
    /// Block mode: a block-mode STG could not be opened as configured (not
    /// formatted, a member formatted for another STG or at another
    /// position, a host index out of range, reformatted since it was
    /// opened …).
    #[error(transparent)]
    Block(BlockError),
    /// Block mode: a port of another host was asked for.
    #[error(
        "port {port} belongs to host {owner} in block mode (host = port >> 12); this is host \
         {host}, whose ports are {first}–{last}: configure a port of this host",
        first = u32::from(*host) << 12 | 1,
        last = u32::from(*host) << 12 | 4095
    )]
    ForeignPort {
        /// The port asked for.
        port: u32,
        /// The host that owns it.
        owner: u16,
        /// This host's index.
        host: u16,
    },
    /// Block mode: a port number outside the block-mode layout.
    #[error(
        "port {port} is not a block-mode port (host << 12 | local, local 1–4095, host 0–15); \
         configure a port of this host"
    )]
    NotABlockPort {
        /// The port asked for.
        port: u32,
    },
    /// Block mode: a frame's payload does not fit one slot.
    #[error(
        "the frame at byte {offset} has a {payload}-byte payload; block mode on STG {stg} \
         carries at most {max} bytes per frame (the slot size less the slot and frame \
         headers): lower max_payload"
    )]
    PayloadTooLarge {
        /// The STG id.
        stg: u32,
        /// Byte offset of the frame in the data.
        offset: usize,
        /// Its payload length.
        payload: u32,
        /// The most one slot carries.
        max: u32,
    },
    /// The STG could not be reached when the host started; every open
    /// reports why (for a host that falls back to the LAN).
    #[error("STG {stg} is unavailable on this host: {cause}")]
    Unavailable {
        /// The STG id.
        stg: u32,
        /// Why.
        #[source]
        cause: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// The other side broke the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The STG INFO reply could not be parsed.
    #[error("STG INFO: {0}")]
    StgInfo(#[source] VendorError),
    /// The BIND reply could not be parsed.
    #[error("BIND: {0}")]
    Bind(#[source] VendorError),
    /// Block mode: the members' superblocks contradict each other or are
    /// corrupt.
    #[error(transparent)]
    Block(BlockError),
}

/// Classifies a failed vendor command by the meanings of §3.1: a §3.1
/// condition becomes [`MailboxError::Refused`], anything else
/// [`MailboxError::Transport`].
pub fn classify(e: CommandError) -> MailboxError {
    match refusal(&e) {
        Some(r) => MailboxError::Refused(r),
        None => MailboxError::Transport(e),
    }
}

/// The §3.1 condition a failed command reports, if it reports one.
pub fn refusal(e: &CommandError) -> Option<Refusal> {
    let CommandError::CheckCondition(sense) = e else {
        return None;
    };
    let info0 = sense
        .information
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0);
    Some(match (sense.key, sense.asc) {
        (SenseKey::ILLEGAL_REQUEST, Asc::INVALID_COMMAND_OPERATION_CODE) => Refusal::NotAnStgMember,
        (SenseKey::ILLEGAL_REQUEST, ASC_PORT_NOT_BOUND) => Refusal::PortNotBound(info0),
        (SenseKey::ILLEGAL_REQUEST, ASC_BAD_HANDLE) => Refusal::BadHandle,
        (SenseKey::ILLEGAL_REQUEST, ASC_PORT_IN_USE) => Refusal::PortInUse,
        (SenseKey::ILLEGAL_REQUEST, ASC_NO_FREE_PORTS) if info0 > 0 => {
            Refusal::PortLimit { held: info0 }
        }
        (SenseKey::ILLEGAL_REQUEST, ASC_NO_FREE_PORTS) => Refusal::NoFreePorts,
        (SenseKey::ILLEGAL_REQUEST, ASC_MALFORMED_FRAME) => {
            Refusal::MalformedFrame { offset: info0 }
        }
        (SenseKey::ILLEGAL_REQUEST, ASC_SOURCE_PORT_MISMATCH) => {
            Refusal::SourcePortMismatch { offset: info0 }
        }
        (SenseKey::ILLEGAL_REQUEST, ASC_FRAME_TOO_LARGE) => {
            Refusal::FrameTooLarge { needed: info0 }
        }
        (SenseKey::ABORTED_COMMAND, ASC_QUEUE_FULL) => Refusal::QueueFull { port: info0 },
        (SenseKey::ABORTED_COMMAND, ASC_RELEASED) => Refusal::Released,
        _ => return None,
    })
}

impl From<CommandError> for MailboxError {
    fn from(e: CommandError) -> MailboxError {
        classify(e)
    }
}

impl From<Refusal> for MailboxError {
    fn from(r: Refusal) -> MailboxError {
        MailboxError::Refused(r)
    }
}

impl From<SetupError> for MailboxError {
    fn from(e: SetupError) -> MailboxError {
        MailboxError::Config(e)
    }
}

impl From<ProtocolError> for MailboxError {
    fn from(e: ProtocolError) -> MailboxError {
        MailboxError::Protocol(e)
    }
}

impl From<ConfigError> for MailboxError {
    fn from(e: ConfigError) -> MailboxError {
        MailboxError::Config(SetupError::Resolve(e))
    }
}

/// A block-mode open failure in its group: a failed command is
/// [`MailboxError::Transport`] (the error names the member and what was
/// being done), superblocks that contradict each other or are corrupt are
/// [`MailboxError::Protocol`], everything else [`MailboxError::Config`].
impl From<BlockError> for MailboxError {
    fn from(e: BlockError) -> MailboxError {
        match e {
            BlockError::Io { .. } => MailboxError::Transport(CommandError::Io(io::Error::other(e))),
            BlockError::CorruptSuperblock { .. }
            | BlockError::LayoutMismatch { .. }
            | BlockError::GenerationMismatch { .. } => {
                MailboxError::Protocol(ProtocolError::Block(e))
            }
            e => MailboxError::Config(SetupError::Block(e)),
        }
    }
}

impl MailboxError {
    /// The §3.1 condition, if the STG refused with one.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            MailboxError::Refused(r) => Some(*r),
            _ => None,
        }
    }

    /// The command error, for [`MailboxError::Transport`].
    pub fn command_error(&self) -> Option<&CommandError> {
        match self {
            MailboxError::Transport(e) => Some(e),
            _ => None,
        }
    }

    /// True when retrying the same command may succeed: a full queue, or a
    /// retryable [`CommandError`] (BUSY, transient path errors, …). Whether
    /// a given command *may* be retried also depends on whether it is
    /// idempotent: see [`crate::retry`].
    pub fn is_retryable(&self) -> bool {
        match self {
            MailboxError::Refused(Refusal::QueueFull { .. }) => true,
            MailboxError::Transport(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// True when the binding is certainly gone and the endpoint must bind
    /// again: unknown handle, or released. A power-on/reset unit attention
    /// (29h) only says bindings *may* be gone: it is retryable, and the next
    /// command on a lost binding answers BAD HANDLE.
    pub fn binding_lost(&self) -> bool {
        matches!(
            self,
            MailboxError::Refused(Refusal::BadHandle | Refusal::Released)
        )
    }

    /// The sense the array returns for this condition (fixed format);
    /// `Some` only for [`MailboxError::Refused`].
    pub fn to_sense(&self) -> Option<Sense> {
        self.refusal().map(|r| r.to_sense())
    }
}

impl Refusal {
    /// The sense the array returns for this condition (fixed format).
    pub fn to_sense(&self) -> Sense {
        use SenseKey as K;
        let (key, asc, info) = match *self {
            Refusal::PortNotBound(port) => (K::ILLEGAL_REQUEST, ASC_PORT_NOT_BOUND, Some(port)),
            Refusal::BadHandle => (K::ILLEGAL_REQUEST, ASC_BAD_HANDLE, None),
            Refusal::PortInUse => (K::ILLEGAL_REQUEST, ASC_PORT_IN_USE, None),
            Refusal::NoFreePorts => (K::ILLEGAL_REQUEST, ASC_NO_FREE_PORTS, None),
            Refusal::PortLimit { held } => (K::ILLEGAL_REQUEST, ASC_NO_FREE_PORTS, Some(held)),
            Refusal::MalformedFrame { offset } => {
                (K::ILLEGAL_REQUEST, ASC_MALFORMED_FRAME, Some(offset))
            }
            Refusal::SourcePortMismatch { offset } => {
                (K::ILLEGAL_REQUEST, ASC_SOURCE_PORT_MISMATCH, Some(offset))
            }
            Refusal::FrameTooLarge { needed } => {
                (K::ILLEGAL_REQUEST, ASC_FRAME_TOO_LARGE, Some(needed))
            }
            Refusal::QueueFull { port } => (K::ABORTED_COMMAND, ASC_QUEUE_FULL, Some(port)),
            Refusal::Released => (K::ABORTED_COMMAND, ASC_RELEASED, None),
            Refusal::NotAnStgMember => (
                K::ILLEGAL_REQUEST,
                Asc::INVALID_COMMAND_OPERATION_CODE,
                None,
            ),
        };
        let sense = Sense::new(key, asc);
        match info {
            Some(i) => sense.with_information(u64::from(i)),
            None => sense,
        }
    }
}

/// The source of an [`io::Error`] that several failed commands share (one
/// path failure ends every command it held): each gets an `io::Error` of
/// the same kind whose source is the one original.
pub fn shared_io_error(e: &Arc<io::Error>) -> io::Error {
    io::Error::new(e.kind(), Arc::clone(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_survives_its_sense_data() {
        for r in [
            Refusal::PortNotBound(9),
            Refusal::BadHandle,
            Refusal::PortInUse,
            Refusal::NoFreePorts,
            Refusal::PortLimit { held: 4096 },
            Refusal::MalformedFrame { offset: 160 },
            Refusal::SourcePortMismatch { offset: 80 },
            Refusal::FrameTooLarge { needed: 8192 },
            Refusal::QueueFull { port: 5101 },
            Refusal::Released,
            Refusal::NotAnStgMember,
        ] {
            let e = CommandError::CheckCondition(r.to_sense());
            assert_eq!(refusal(&e), Some(r), "{r:?}");
        }
        // NO FREE PORTS names the ports held when it is the initiator's
        // limit, and says so.
        let limit = Refusal::PortLimit { held: 4096 };
        assert_eq!(limit.to_sense().asc, ASC_NO_FREE_PORTS);
        assert!(limit.to_string().contains("4096 ports"));
        assert!(limit.to_string().contains("limit per initiator"));
    }
}
