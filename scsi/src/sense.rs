//! Sense data (SPC-4 §4.5): fixed (0x70/0x71) and descriptor (0x72/0x73)
//! formats, parsed and emitted.
//!
//! No-panic contract: [`Sense::parse`] accepts any byte slice and either
//! returns a [`Sense`] or a [`SenseError`]; lengths claimed by the data are
//! clipped to what is actually present.

use std::fmt;

/// A sense key (the broad class of the condition), as an open newtype.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SenseKey(pub u8);

impl SenseKey {
    /// No specific sense key information.
    pub const NO_SENSE: SenseKey = SenseKey(0x0);
    /// The command completed with recovery action.
    pub const RECOVERED_ERROR: SenseKey = SenseKey(0x1);
    /// The logical unit is not accessible.
    pub const NOT_READY: SenseKey = SenseKey(0x2);
    /// A flaw in the medium or the recorded data.
    pub const MEDIUM_ERROR: SenseKey = SenseKey(0x3);
    /// A non-recoverable hardware failure.
    pub const HARDWARE_ERROR: SenseKey = SenseKey(0x4);
    /// An illegal parameter in the CDB or parameter data.
    pub const ILLEGAL_REQUEST: SenseKey = SenseKey(0x5);
    /// The device state changed (reset, power on, parameters changed).
    pub const UNIT_ATTENTION: SenseKey = SenseKey(0x6);
    /// Access to a protected block was attempted.
    pub const DATA_PROTECT: SenseKey = SenseKey(0x7);
    /// Blank or non-blank medium encountered unexpectedly.
    pub const BLANK_CHECK: SenseKey = SenseKey(0x8);
    /// A vendor-specific condition.
    pub const VENDOR_SPECIFIC: SenseKey = SenseKey(0x9);
    /// EXTENDED COPY failed.
    pub const COPY_ABORTED: SenseKey = SenseKey(0xA);
    /// The device aborted the command; the initiator may retry.
    pub const ABORTED_COMMAND: SenseKey = SenseKey(0xB);
    /// Buffered device reached end of partition.
    pub const VOLUME_OVERFLOW: SenseKey = SenseKey(0xD);
    /// Source data did not match the medium (VERIFY, COMPARE AND WRITE).
    pub const MISCOMPARE: SenseKey = SenseKey(0xE);

    /// The key's name, if listed.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x0 => "NO SENSE",
            0x1 => "RECOVERED ERROR",
            0x2 => "NOT READY",
            0x3 => "MEDIUM ERROR",
            0x4 => "HARDWARE ERROR",
            0x5 => "ILLEGAL REQUEST",
            0x6 => "UNIT ATTENTION",
            0x7 => "DATA PROTECT",
            0x8 => "BLANK CHECK",
            0x9 => "VENDOR SPECIFIC",
            0xA => "COPY ABORTED",
            0xB => "ABORTED COMMAND",
            0xD => "VOLUME OVERFLOW",
            0xE => "MISCOMPARE",
            _ => return None,
        })
    }
}

impl fmt::Debug for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SenseKey({self})")
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "sense key 0x{:X}", self.0),
        }
    }
}

/// An additional sense code and qualifier (ASC/ASCQ), as an open newtype.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Asc(pub u8, pub u8);

macro_rules! ascs {
    ($($name:ident = ($asc:expr, $ascq:expr), $text:expr;)*) => {
        impl Asc {
            $(#[doc = $text] pub const $name: Asc = Asc($asc, $ascq);)*

            /// The code's SPC name, if listed.
            pub fn name(self) -> Option<&'static str> {
                match (self.0, self.1) {
                    $(($asc, $ascq) => Some($text),)*
                    (0x80..=0xFF, _) | (_, 0x80..=0xFF) => Some("vendor specific"),
                    _ => None,
                }
            }
        }
    };
}

ascs! {
    NO_ADDITIONAL_SENSE = (0x00, 0x00), "NO ADDITIONAL SENSE INFORMATION";
    NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00), "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE";
    NOT_READY_BECOMING_READY = (0x04, 0x01), "LOGICAL UNIT IN PROCESS OF BECOMING READY";
    NOT_READY_INIT_REQUIRED = (0x04, 0x02), "LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED";
    NOT_READY_MANUAL_INTERVENTION = (0x04, 0x03), "LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED";
    NOT_READY_TRANSITIONING = (0x04, 0x0A), "LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION";
    NOT_ACCESSIBLE_STANDBY = (0x04, 0x0B), "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE";
    NOT_ACCESSIBLE_UNAVAILABLE = (0x04, 0x0C), "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE";
    NOT_ACCESSIBLE_OFFLINE = (0x04, 0x12), "LOGICAL UNIT NOT READY, OFFLINE";
    LU_COMMUNICATION_FAILURE = (0x08, 0x00), "LOGICAL UNIT COMMUNICATION FAILURE";
    LU_COMMUNICATION_TIMEOUT = (0x08, 0x01), "LOGICAL UNIT COMMUNICATION TIME-OUT";
    WRITE_ERROR = (0x0C, 0x00), "WRITE ERROR";
    INVALID_FIELD_IN_COMMAND_IU = (0x0E, 0x03), "INVALID FIELD IN COMMAND INFORMATION UNIT";
    UNRECOVERED_READ_ERROR = (0x11, 0x00), "UNRECOVERED READ ERROR";
    MISCOMPARE_DURING_VERIFY = (0x1D, 0x00), "MISCOMPARE DURING VERIFY OPERATION";
    PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00), "PARAMETER LIST LENGTH ERROR";
    INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00), "INVALID COMMAND OPERATION CODE";
    LBA_OUT_OF_RANGE = (0x21, 0x00), "LOGICAL BLOCK ADDRESS OUT OF RANGE";
    INVALID_FIELD_IN_CDB = (0x24, 0x00), "INVALID FIELD IN CDB";
    LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00), "LOGICAL UNIT NOT SUPPORTED";
    INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00), "INVALID FIELD IN PARAMETER LIST";
    PARAMETER_NOT_SUPPORTED = (0x26, 0x01), "PARAMETER NOT SUPPORTED";
    INVALID_PARAMETER_VALUE = (0x26, 0x02), "PARAMETER VALUE INVALID";
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (0x26, 0x04), "INVALID RELEASE OF PERSISTENT RESERVATION";
    WRITE_PROTECTED = (0x27, 0x00), "WRITE PROTECTED";
    NOT_READY_TO_READY_TRANSITION = (0x28, 0x00), "NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED";
    POWER_ON_RESET_OR_BUS_DEVICE_RESET = (0x29, 0x00), "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED";
    POWER_ON_OCCURRED = (0x29, 0x01), "POWER ON OCCURRED";
    SCSI_BUS_RESET_OCCURRED = (0x29, 0x02), "SCSI BUS RESET OCCURRED";
    BUS_DEVICE_RESET_OCCURRED = (0x29, 0x03), "BUS DEVICE RESET FUNCTION OCCURRED";
    DEVICE_INTERNAL_RESET = (0x29, 0x04), "DEVICE INTERNAL RESET";
    I_T_NEXUS_LOSS_OCCURRED = (0x29, 0x07), "I_T NEXUS LOSS OCCURRED";
    PARAMETERS_CHANGED = (0x2A, 0x00), "PARAMETERS CHANGED";
    MODE_PARAMETERS_CHANGED = (0x2A, 0x01), "MODE PARAMETERS CHANGED";
    RESERVATIONS_PREEMPTED = (0x2A, 0x03), "RESERVATIONS PREEMPTED";
    RESERVATIONS_RELEASED = (0x2A, 0x04), "RESERVATIONS RELEASED";
    REGISTRATIONS_PREEMPTED = (0x2A, 0x05), "REGISTRATIONS PREEMPTED";
    ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06), "ASYMMETRIC ACCESS STATE CHANGED";
    CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09), "CAPACITY DATA HAS CHANGED";
    COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00), "COMMANDS CLEARED BY ANOTHER INITIATOR";
    SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00), "SAVING PARAMETERS NOT SUPPORTED";
    MEDIUM_NOT_PRESENT = (0x3A, 0x00), "MEDIUM NOT PRESENT";
    REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E), "REPORTED LUNS DATA HAS CHANGED";
    INTERNAL_TARGET_FAILURE = (0x44, 0x00), "INTERNAL TARGET FAILURE";
    INVALID_MESSAGE_ERROR = (0x49, 0x00), "INVALID MESSAGE ERROR";
    COMMAND_PHASE_ERROR = (0x4A, 0x00), "COMMAND PHASE ERROR";
    DATA_PHASE_ERROR = (0x4B, 0x00), "DATA PHASE ERROR";
    OVERLAPPED_COMMANDS_ATTEMPTED = (0x4E, 0x00), "OVERLAPPED COMMANDS ATTEMPTED";
    SYSTEM_RESOURCE_FAILURE = (0x55, 0x00), "SYSTEM RESOURCE FAILURE";
    INSUFFICIENT_RESOURCES = (0x55, 0x03), "INSUFFICIENT RESOURCES";
}

impl fmt::Debug for Asc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Asc({self})")
    }
}

impl fmt::Display for Asc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} ({:02X}h/{:02X}h)", self.0, self.1),
            None => write!(f, "ASC/ASCQ {:02X}h/{:02X}h", self.0, self.1),
        }
    }
}

/// Which of the two sense data formats a [`Sense`] came in or is emitted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SenseFormat {
    /// Fixed format, response codes 0x70 (current) and 0x71 (deferred).
    Fixed,
    /// Descriptor format, response codes 0x72 (current) and 0x73 (deferred).
    Descriptor,
}

/// The sense-key-specific field pointer of an ILLEGAL REQUEST: which byte
/// (and bit) of the CDB or parameter list was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// True when the pointer refers to the CDB, false for the parameter list.
    pub in_cdb: bool,
    /// The offending bit within the byte, if indicated (0–7).
    pub bit: Option<u8>,
    /// The offending byte.
    pub byte: u16,
}

impl FieldPointer {
    fn from_sks(sks: [u8; 3]) -> FieldPointer {
        FieldPointer {
            in_cdb: sks[0] & 0x40 != 0,
            bit: (sks[0] & 0x08 != 0).then_some(sks[0] & 0x07),
            byte: u16::from_be_bytes([sks[1], sks[2]]),
        }
    }

    /// The three sense-key-specific bytes (SKSV set) encoding this pointer.
    pub fn to_sks(self) -> [u8; 3] {
        let mut b0 = 0x80;
        if self.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = self.bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let [hi, lo] = self.byte.to_be_bytes();
        [b0, hi, lo]
    }
}

/// Decoded sense data.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Sense {
    /// The format the data came in (or will be emitted in).
    pub format: SenseFormat,
    /// A deferred error (response code 0x71/0x73) rather than a current one.
    pub deferred: bool,
    /// The sense key.
    pub key: SenseKey,
    /// The additional sense code and qualifier.
    pub asc: Asc,
    /// The INFORMATION field (e.g. the failing LBA, or a residue), if valid.
    pub information: Option<u64>,
    /// The COMMAND-SPECIFIC INFORMATION field, if non-zero / present.
    pub command_specific: Option<u64>,
    /// The three sense-key-specific bytes, present only when SKSV is set;
    /// held with the SKSV bit clear, as parsed (emitting sets it).
    pub sense_key_specific: Option<[u8; 3]>,
    /// Field replaceable unit code (0 = none).
    pub fru: u8,
    /// FILEMARK, EOM and ILI bits (fixed format byte 2, bits 7..5).
    pub filemark: bool,
    /// End-of-medium.
    pub eom: bool,
    /// Incorrect length indicator.
    pub ili: bool,
}

/// Why sense data could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SenseError {
    /// The buffer is empty: the device returned no sense data.
    #[error("no sense data")]
    Empty,
    /// The response code is not one of 0x70–0x73.
    #[error(
        "sense response code 0x{0:02X} is not fixed (0x70/0x71) or descriptor (0x72/0x73) format"
    )]
    UnknownResponseCode(u8),
    /// Too few bytes to hold even the sense key.
    #[error("sense data truncated: {got} bytes, need at least {need}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
}

impl Sense {
    /// A current-error sense in fixed format with the given key and ASC/ASCQ.
    pub fn new(key: SenseKey, asc: Asc) -> Sense {
        Sense {
            format: SenseFormat::Fixed,
            deferred: false,
            key,
            asc,
            information: None,
            command_specific: None,
            sense_key_specific: None,
            fru: 0,
            filemark: false,
            eom: false,
            ili: false,
        }
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB pointing at `byte` (and `bit`).
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB).with_field_pointer(
            FieldPointer {
                in_cdb: true,
                bit,
                byte,
            },
        )
    }

    /// Sets the sense-key-specific bytes to a field pointer.
    pub fn with_field_pointer(mut self, ptr: FieldPointer) -> Sense {
        let [b0, hi, lo] = ptr.to_sks();
        self.sense_key_specific = Some([b0 & 0x7F, hi, lo]);
        self
    }

    /// Sets the INFORMATION field.
    pub fn with_information(mut self, info: u64) -> Sense {
        self.information = Some(info);
        self
    }

    /// The field pointer, when the sense key specific bytes carry one
    /// (ILLEGAL REQUEST).
    pub fn field_pointer(&self) -> Option<FieldPointer> {
        match (self.key, self.sense_key_specific) {
            (SenseKey::ILLEGAL_REQUEST, Some(sks)) => Some(FieldPointer::from_sks(sks)),
            _ => None,
        }
    }

    /// Decodes fixed or descriptor sense data. Never panics.
    pub fn parse(data: &[u8]) -> Result<Sense, SenseError> {
        let Some(&b0) = data.first() else {
            return Err(SenseError::Empty);
        };
        match b0 & 0x7F {
            0x70 | 0x71 => Self::parse_fixed(data),
            0x72 | 0x73 => Self::parse_descriptor(data),
            other => Err(SenseError::UnknownResponseCode(other)),
        }
    }

    fn parse_fixed(data: &[u8]) -> Result<Sense, SenseError> {
        if data.len() < 3 {
            return Err(SenseError::Truncated {
                got: data.len(),
                need: 3,
            });
        }
        // Clip to the additional sense length the data claims, if present.
        let len = match data.get(7) {
            Some(&add) => data.len().min(8 + add as usize),
            None => data.len(),
        };
        let data = &data[..len];
        let be32 = |at: usize| -> Option<u32> {
            data.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let mut sense = Sense::new(SenseKey(data[2] & 0x0F), Asc::default());
        sense.deferred = data[0] & 0x7F == 0x71;
        sense.filemark = data[2] & 0x80 != 0;
        sense.eom = data[2] & 0x40 != 0;
        sense.ili = data[2] & 0x20 != 0;
        if data[0] & 0x80 != 0 {
            sense.information = be32(3).map(u64::from);
        }
        sense.command_specific = be32(8).filter(|&v| v != 0).map(u64::from);
        if let (Some(&asc), Some(&ascq)) = (data.get(12), data.get(13)) {
            sense.asc = Asc(asc, ascq);
        }
        sense.fru = data.get(14).copied().unwrap_or(0);
        if let Some(sks) = data.get(15..18) {
            if sks[0] & 0x80 != 0 {
                sense.sense_key_specific = Some([sks[0] & 0x7F, sks[1], sks[2]]);
            }
        }
        Ok(sense)
    }

    fn parse_descriptor(data: &[u8]) -> Result<Sense, SenseError> {
        if data.len() < 2 {
            return Err(SenseError::Truncated {
                got: data.len(),
                need: 2,
            });
        }
        let mut sense = Sense::new(SenseKey(data[1] & 0x0F), Asc::default());
        sense.format = SenseFormat::Descriptor;
        sense.deferred = data[0] & 0x7F == 0x73;
        if let (Some(&asc), Some(&ascq)) = (data.get(2), data.get(3)) {
            sense.asc = Asc(asc, ascq);
        }
        let end = match data.get(7) {
            Some(&add) => data.len().min(8 + add as usize),
            None => return Ok(sense),
        };
        let mut at = 8;
        // Each descriptor: type, additional length, then that many bytes.
        while at + 2 <= end {
            let kind = data[at];
            let body_end = (at + 2 + data[at + 1] as usize).min(end);
            let d = &data[at..body_end];
            let be64 = |from: usize| -> Option<u64> {
                d.get(from..from + 8)
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            };
            match kind {
                0x00 if d.get(2).is_some_and(|b| b & 0x80 != 0) => sense.information = be64(4),
                0x01 => sense.command_specific = be64(4),
                0x02 => {
                    if let Some(sks) = d.get(4..7) {
                        if sks[0] & 0x80 != 0 {
                            sense.sense_key_specific = Some([sks[0] & 0x7F, sks[1], sks[2]]);
                        }
                    }
                }
                0x03 => sense.fru = d.get(3).copied().unwrap_or(0),
                0x04 => {
                    // Stream commands: FILEMARK, EOM, ILI in byte 3.
                    if let Some(&b) = d.get(3) {
                        sense.filemark = b & 0x80 != 0;
                        sense.eom = b & 0x40 != 0;
                        sense.ili = b & 0x20 != 0;
                    }
                }
                _ => {}
            }
            at = body_end;
        }
        Ok(sense)
    }

    /// Emits this sense in its [`format`](Sense::format).
    pub fn to_bytes(&self) -> Vec<u8> {
        match self.format {
            SenseFormat::Fixed => self.to_fixed(),
            SenseFormat::Descriptor => self.to_descriptor(),
        }
    }

    /// Emits 18 bytes of fixed-format sense. An INFORMATION or
    /// COMMAND-SPECIFIC INFORMATION value wider than 32 bits does not fit
    /// the fixed format and is left out (for INFORMATION, VALID is clear);
    /// it is never truncated to a wrong value. Use
    /// [`to_descriptor`](Sense::to_descriptor) to keep 64-bit values.
    pub fn to_fixed(&self) -> Vec<u8> {
        let mut b = vec![0u8; 18];
        b[0] = if self.deferred { 0x71 } else { 0x70 };
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = (self.key.0 & 0x0F)
            | if self.filemark { 0x80 } else { 0 }
            | if self.eom { 0x40 } else { 0 }
            | if self.ili { 0x20 } else { 0 };
        b[7] = 10;
        if let Some(cs) = self.command_specific.and_then(|c| u32::try_from(c).ok()) {
            b[8..12].copy_from_slice(&cs.to_be_bytes());
        }
        b[12] = self.asc.0;
        b[13] = self.asc.1;
        b[14] = self.fru;
        if let Some(sks) = self.sense_key_specific {
            b[15] = sks[0] | 0x80;
            b[16] = sks[1];
            b[17] = sks[2];
        }
        b
    }

    /// Emits descriptor-format sense with information, command-specific,
    /// sense-key-specific, FRU and stream descriptors as needed.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut b = vec![
            if self.deferred { 0x73 } else { 0x72 },
            self.key.0 & 0x0F,
            self.asc.0,
            self.asc.1,
            0,
            0,
            0,
            0,
        ];
        if let Some(info) = self.information {
            b.extend_from_slice(&[0x00, 0x0A, 0x80, 0]);
            b.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(cs) = self.command_specific {
            b.extend_from_slice(&[0x01, 0x0A, 0, 0]);
            b.extend_from_slice(&cs.to_be_bytes());
        }
        if let Some(sks) = self.sense_key_specific {
            b.extend_from_slice(&[0x02, 0x06, 0, 0, sks[0] | 0x80, sks[1], sks[2], 0]);
        }
        if self.fru != 0 {
            b.extend_from_slice(&[0x03, 0x02, 0, self.fru]);
        }
        if self.filemark || self.eom || self.ili {
            let flags = if self.filemark { 0x80 } else { 0 }
                | if self.eom { 0x40 } else { 0 }
                | if self.ili { 0x20 } else { 0 };
            b.extend_from_slice(&[0x04, 0x02, 0, flags]);
        }
        b[7] = (b.len() - 8) as u8;
        b
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.asc)?;
        if self.deferred {
            f.write_str(" [deferred]")?;
        }
        if let Some(info) = self.information {
            write!(f, ", information 0x{info:X}")?;
        }
        if let Some(ptr) = self.field_pointer() {
            let what = if ptr.in_cdb { "CDB" } else { "parameter list" };
            write!(f, ", {what} byte {}", ptr.byte)?;
            if let Some(bit) = ptr.bit {
                write!(f, " bit {bit}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A sense built with a field pointer equals what an initiator parses
    /// from its bytes, in either format. (Found by fuzzing the array: the
    /// built sense held the SKSV bit in its sense-key-specific bytes, the
    /// parsed one did not, so the array's sense never compared equal to
    /// the same sense read back.)
    #[test]
    fn field_pointer_sense_equals_its_parse() {
        let built = Sense::invalid_field_in_cdb(1, Some(0));
        assert_eq!(built.sense_key_specific, Some([0x48, 0, 1]));
        assert_eq!(Sense::parse(&built.to_fixed()).unwrap(), built);
        assert_eq!(
            Sense::parse(&built.to_descriptor()).unwrap(),
            Sense {
                format: SenseFormat::Descriptor,
                ..built.clone()
            }
        );
        assert_eq!(built.to_fixed()[15], 0xC8, "SKSV is set on the wire");
    }

    #[test]
    fn fixed_invalid_opcode_from_lio() {
        // The 18 bytes LIO returns for an opcode its backstore does not
        // implement (sg_raw -v prints them): ILLEGAL REQUEST, 20h/00h.
        let bytes = [
            0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x20, 0x00, 0, 0, 0, 0,
        ];
        let s = Sense::parse(&bytes).unwrap();
        assert_eq!(s.format, SenseFormat::Fixed);
        assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
        assert_eq!(s.asc, Asc::INVALID_COMMAND_OPERATION_CODE);
        assert_eq!(s.information, None);
        assert_eq!(s.field_pointer(), None);
        assert_eq!(s.to_fixed(), bytes);
        assert_eq!(
            s.to_string(),
            "ILLEGAL REQUEST: INVALID COMMAND OPERATION CODE (20h/00h)"
        );
    }

    #[test]
    fn fixed_with_information_and_field_pointer() {
        // SPC-4 Table 48 layout: VALID, INFORMATION = 0x12345678, SKSV with
        // C/D=1, BPV=1, bit 3, field pointer byte 2.
        let bytes = [
            0xF0, 0, 0x25, 0x12, 0x34, 0x56, 0x78, 0x0A, 0, 0, 0, 0, 0x24, 0x00, 0, 0xCB, 0x00,
            0x02,
        ];
        let s = Sense::parse(&bytes).unwrap();
        assert!(s.ili);
        assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
        assert_eq!(s.information, Some(0x1234_5678));
        assert_eq!(
            s.field_pointer(),
            Some(FieldPointer {
                in_cdb: true,
                bit: Some(3),
                byte: 2
            })
        );
        assert_eq!(s.to_fixed(), bytes);
    }

    #[test]
    fn descriptor_unit_attention() {
        // Descriptor format, UNIT ATTENTION, POWER ON OCCURRED, an
        // information descriptor with a 64-bit value.
        let bytes = [
            0x72, 0x06, 0x29, 0x01, 0, 0, 0, 0x0C, 0x00, 0x0A, 0x80, 0, 0, 0, 0, 1, 0, 0, 0, 2,
        ];
        let s = Sense::parse(&bytes).unwrap();
        assert_eq!(s.format, SenseFormat::Descriptor);
        assert_eq!(s.key, SenseKey::UNIT_ATTENTION);
        assert_eq!(s.asc, Asc::POWER_ON_OCCURRED);
        assert_eq!(s.information, Some(0x1_0000_0002));
        assert_eq!(s.to_descriptor(), bytes);
    }

    #[test]
    fn fixed_format_drops_fields_wider_than_32_bits() {
        let mut s = Sense::new(SenseKey::MEDIUM_ERROR, Asc::UNRECOVERED_READ_ERROR);
        s.information = Some(0x1_0000_0001);
        s.command_specific = Some(0x2_0000_0003);
        let fixed = s.to_fixed();
        // Neither is truncated to its low 32 bits: both are left out.
        assert_eq!(fixed[0], 0x70, "VALID must be clear");
        assert_eq!(&fixed[3..7], &[0; 4]);
        assert_eq!(&fixed[8..12], &[0; 4]);
        let back = Sense::parse(&fixed).unwrap();
        assert_eq!((back.information, back.command_specific), (None, None));
        // Values that fit are kept, and descriptor format keeps all 64 bits.
        s.command_specific = Some(0xFFFF_FFFF);
        assert_eq!(&s.to_fixed()[8..12], &[0xFF; 4]);
        s.command_specific = Some(0x2_0000_0003);
        let back = Sense::parse(&s.to_descriptor()).unwrap();
        assert_eq!(back.command_specific, Some(0x2_0000_0003));
        assert_eq!(back.information, Some(0x1_0000_0001));
    }

    #[test]
    fn short_and_bogus_sense() {
        assert_eq!(Sense::parse(&[]), Err(SenseError::Empty));
        assert_eq!(
            Sense::parse(&[0x70, 0]),
            Err(SenseError::Truncated { got: 2, need: 3 })
        );
        assert_eq!(
            Sense::parse(&[0x00, 1, 2]),
            Err(SenseError::UnknownResponseCode(0))
        );
        // Three bytes: key known, ASC unknown.
        let s = Sense::parse(&[0x70, 0, 0x02]).unwrap();
        assert_eq!(s.key, SenseKey::NOT_READY);
        assert_eq!(s.asc, Asc(0, 0));
        // Additional length claims more than present: clipped, not a panic.
        let s = Sense::parse(&[0x72, 0x05, 0x24, 0x00, 0, 0, 0, 0xFF, 0x02, 0x06]).unwrap();
        assert_eq!(s.asc, Asc::INVALID_FIELD_IN_CDB);
    }

    #[test]
    fn unknown_codes_print() {
        assert_eq!(Asc(0x7E, 0x01).to_string(), "ASC/ASCQ 7Eh/01h");
        assert_eq!(Asc(0x80, 0x01).name(), Some("vendor specific"));
        assert_eq!(SenseKey(0xF).to_string(), "sense key 0xF");
    }

    fn any_sense() -> impl Strategy<Value = Sense> {
        (
            any::<bool>(),
            any::<bool>(),
            0u8..16,
            any::<(u8, u8)>(),
            proptest::option::of(any::<u32>()),
            proptest::option::of(1u32..),
            proptest::option::of(any::<[u8; 3]>()),
            any::<u8>(),
            any::<(bool, bool, bool)>(),
        )
            .prop_map(
                |(desc, deferred, key, asc, info, cs, sks, fru, flags)| Sense {
                    format: if desc {
                        SenseFormat::Descriptor
                    } else {
                        SenseFormat::Fixed
                    },
                    deferred,
                    key: SenseKey(key),
                    asc: Asc(asc.0, asc.1),
                    information: info.map(u64::from),
                    command_specific: cs.map(u64::from),
                    sense_key_specific: sks.map(|s| [s[0] & 0x7F, s[1], s[2]]),
                    fru,
                    filemark: flags.0,
                    eom: flags.1,
                    ili: flags.2,
                },
            )
    }

    proptest! {
        #[test]
        fn parse_of_emit_is_identity(s in any_sense()) {
            prop_assert_eq!(Sense::parse(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Sense::parse(&bytes).map(|s| s.to_string());
        }
    }
}
