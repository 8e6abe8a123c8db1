//! SCSI status (SAM-5) and the Linux sg driver's host and driver status
//! bytes, as open newtypes.

use std::fmt;

/// The SCSI status byte a device returns for a command.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ScsiStatus(pub u8);

impl ScsiStatus {
    /// The command completed.
    pub const GOOD: ScsiStatus = ScsiStatus(0x00);
    /// Sense data describes an error or exception.
    pub const CHECK_CONDITION: ScsiStatus = ScsiStatus(0x02);
    /// CONDITION MET (PRE-FETCH).
    pub const CONDITION_MET: ScsiStatus = ScsiStatus(0x04);
    /// The logical unit is busy; retry later.
    pub const BUSY: ScsiStatus = ScsiStatus(0x08);
    /// Another initiator holds a reservation.
    pub const RESERVATION_CONFLICT: ScsiStatus = ScsiStatus(0x18);
    /// The task set is full; retry when a command completes.
    pub const TASK_SET_FULL: ScsiStatus = ScsiStatus(0x28);
    /// ACA ACTIVE.
    pub const ACA_ACTIVE: ScsiStatus = ScsiStatus(0x30);
    /// The command was aborted.
    pub const TASK_ABORTED: ScsiStatus = ScsiStatus(0x40);

    /// The status's name, if listed.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::GOOD => "GOOD",
            Self::CHECK_CONDITION => "CHECK CONDITION",
            Self::CONDITION_MET => "CONDITION MET",
            Self::BUSY => "BUSY",
            Self::RESERVATION_CONFLICT => "RESERVATION CONFLICT",
            Self::TASK_SET_FULL => "TASK SET FULL",
            Self::ACA_ACTIVE => "ACA ACTIVE",
            Self::TASK_ABORTED => "TASK ABORTED",
            _ => return None,
        })
    }
}

impl fmt::Debug for ScsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScsiStatus({self})")
    }
}

impl fmt::Display for ScsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "status 0x{:02X}", self.0),
        }
    }
}

/// The sg driver's `host_status` (the kernel's `DID_*` codes): the state of
/// the path to the device, independent of what the device said.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct HostStatus(pub u16);

impl HostStatus {
    /// No error on the path.
    pub const OK: HostStatus = HostStatus(0x00);
    /// Could not connect before the timeout.
    pub const NO_CONNECT: HostStatus = HostStatus(0x01);
    /// The bus stayed busy through the timeout period.
    pub const BUS_BUSY: HostStatus = HostStatus(0x02);
    /// The command timed out.
    pub const TIME_OUT: HostStatus = HostStatus(0x03);
    /// Bad target.
    pub const BAD_TARGET: HostStatus = HostStatus(0x04);
    /// The command was aborted.
    pub const ABORT: HostStatus = HostStatus(0x05);
    /// Parity error.
    pub const PARITY: HostStatus = HostStatus(0x06);
    /// Internal error of the host adapter driver.
    pub const ERROR: HostStatus = HostStatus(0x07);
    /// The bus was reset.
    pub const RESET: HostStatus = HostStatus(0x08);
    /// The command should be retried (transient).
    pub const SOFT_ERROR: HostStatus = HostStatus(0x0B);
    /// Requeue the command.
    pub const REQUEUE: HostStatus = HostStatus(0x0D);
    /// The transport is disrupted; retry after the fast-fail timeout.
    pub const TRANSPORT_DISRUPTED: HostStatus = HostStatus(0x0E);
    /// The transport failed; do not retry.
    pub const TRANSPORT_FAILFAST: HostStatus = HostStatus(0x0F);

    /// The code's kernel name, if listed.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::OK => "DID_OK",
            Self::NO_CONNECT => "DID_NO_CONNECT",
            Self::BUS_BUSY => "DID_BUS_BUSY",
            Self::TIME_OUT => "DID_TIME_OUT",
            Self::BAD_TARGET => "DID_BAD_TARGET",
            Self::ABORT => "DID_ABORT",
            Self::PARITY => "DID_PARITY",
            Self::ERROR => "DID_ERROR",
            Self::RESET => "DID_RESET",
            Self::SOFT_ERROR => "DID_SOFT_ERROR",
            Self::REQUEUE => "DID_REQUEUE",
            Self::TRANSPORT_DISRUPTED => "DID_TRANSPORT_DISRUPTED",
            Self::TRANSPORT_FAILFAST => "DID_TRANSPORT_FAILFAST",
            _ => return None,
        })
    }
}

impl fmt::Debug for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostStatus({self})")
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "host status 0x{:02X}", self.0),
        }
    }
}

/// The sg driver's `driver_status`: the low nibble is the kernel's
/// `DRIVER_*` code, the high nibble historical "suggestion" bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DriverStatus(pub u16);

impl DriverStatus {
    /// No driver-level condition.
    pub const OK: DriverStatus = DriverStatus(0x00);
    /// The driver was busy.
    pub const BUSY: DriverStatus = DriverStatus(0x01);
    /// Soft error.
    pub const SOFT: DriverStatus = DriverStatus(0x02);
    /// Media error.
    pub const MEDIA: DriverStatus = DriverStatus(0x03);
    /// Driver error.
    pub const ERROR: DriverStatus = DriverStatus(0x04);
    /// Invalid request.
    pub const INVALID: DriverStatus = DriverStatus(0x05);
    /// The driver timed the command out.
    pub const TIMEOUT: DriverStatus = DriverStatus(0x06);
    /// Hard error.
    pub const HARD: DriverStatus = DriverStatus(0x07);
    /// Sense data is valid (accompanies CHECK CONDITION; not an error by itself).
    pub const SENSE: DriverStatus = DriverStatus(0x08);

    /// The `DRIVER_*` code without the suggestion bits.
    pub fn code(self) -> DriverStatus {
        DriverStatus(self.0 & 0x0F)
    }

    /// True when the driver reports a problem of its own (anything but OK or SENSE).
    pub fn is_error(self) -> bool {
        !matches!(self.code(), Self::OK | Self::SENSE)
    }
}

impl fmt::Debug for DriverStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DriverStatus({self})")
    }
}

impl fmt::Display for DriverStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.code() {
            Self::OK => "DRIVER_OK",
            Self::BUSY => "DRIVER_BUSY",
            Self::SOFT => "DRIVER_SOFT",
            Self::MEDIA => "DRIVER_MEDIA",
            Self::ERROR => "DRIVER_ERROR",
            Self::INVALID => "DRIVER_INVALID",
            Self::TIMEOUT => "DRIVER_TIMEOUT",
            Self::HARD => "DRIVER_HARD",
            Self::SENSE => "DRIVER_SENSE",
            _ => return write!(f, "driver status 0x{:02X}", self.0),
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_unknowns() {
        assert_eq!(ScsiStatus(0x28).to_string(), "TASK SET FULL");
        assert_eq!(ScsiStatus(0x22).to_string(), "status 0x22");
        assert_eq!(HostStatus(0x03).to_string(), "DID_TIME_OUT");
        assert_eq!(HostStatus(0x7F).to_string(), "host status 0x7F");
        assert_eq!(DriverStatus(0x08).to_string(), "DRIVER_SENSE");
        assert!(!DriverStatus(0x08).is_error());
        assert!(DriverStatus(0x06).is_error());
        // Suggestion bits in the high nibble do not hide the code.
        assert_eq!(DriverStatus(0x28).code(), DriverStatus::SENSE);
    }
}
