//! Operation codes as an open newtype: values a real device sends that are
//! not listed here survive parsing and printing.

use std::fmt;

/// A SCSI operation code (byte 0 of a CDB).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Opcode(pub u8);

macro_rules! opcodes {
    ($($name:ident = $value:expr, $text:expr;)*) => {
        impl Opcode {
            $(#[doc = $text] pub const $name: Opcode = Opcode($value);)*

            /// The command's name, if this is a listed opcode.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some($text),)*
                    0xC0..=0xFF => Some("VENDOR SPECIFIC"),
                    _ => None,
                }
            }
        }
    };
}

opcodes! {
    TEST_UNIT_READY = 0x00, "TEST UNIT READY";
    REQUEST_SENSE = 0x03, "REQUEST SENSE";
    INQUIRY = 0x12, "INQUIRY";
    MODE_SENSE_6 = 0x1A, "MODE SENSE(6)";
    READ_CAPACITY_10 = 0x25, "READ CAPACITY(10)";
    READ_10 = 0x28, "READ(10)";
    WRITE_10 = 0x2A, "WRITE(10)";
    VERIFY_10 = 0x2F, "VERIFY(10)";
    SYNCHRONIZE_CACHE_10 = 0x35, "SYNCHRONIZE CACHE(10)";
    WRITE_SAME_10 = 0x41, "WRITE SAME(10)";
    UNMAP = 0x42, "UNMAP";
    MODE_SENSE_10 = 0x5A, "MODE SENSE(10)";
    PERSISTENT_RESERVE_IN = 0x5E, "PERSISTENT RESERVE IN";
    PERSISTENT_RESERVE_OUT = 0x5F, "PERSISTENT RESERVE OUT";
    READ_16 = 0x88, "READ(16)";
    COMPARE_AND_WRITE = 0x89, "COMPARE AND WRITE";
    WRITE_16 = 0x8A, "WRITE(16)";
    VERIFY_16 = 0x8F, "VERIFY(16)";
    SYNCHRONIZE_CACHE_16 = 0x91, "SYNCHRONIZE CACHE(16)";
    WRITE_SAME_16 = 0x93, "WRITE SAME(16)";
    SERVICE_ACTION_IN_16 = 0x9E, "SERVICE ACTION IN(16)";
    REPORT_LUNS = 0xA0, "REPORT LUNS";
    MAINTENANCE_IN = 0xA3, "MAINTENANCE IN";
}

impl Opcode {
    /// Service action of SERVICE ACTION IN(16) that selects READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    /// Service action of SERVICE ACTION IN(16) that selects GET LBA STATUS.
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// Service action of MAINTENANCE IN that selects REPORT SUPPORTED OPERATION CODES.
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    /// MAINTENANCE IN service action: REPORT TARGET PORT GROUPS.
    pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;

    /// True for the vendor-specific range 0xC0–0xFF (command groups 6 and 7).
    pub fn is_vendor_specific(self) -> bool {
        self.0 >= 0xC0
    }

    /// The CDB length the opcode's command group implies (SPC-4 §4.2.5.1), as
    /// the Linux kernel's `scsi_command_size` computes it from its table
    /// `{6, 10, 10, 12, 16, 12, 10, 10}`. Group 3 (0x60–0x7F, reserved) gives
    /// 12, as the kernel's table does; the kernel takes the length of the
    /// variable-length CDB 0x7F from its byte 7 instead, which this function
    /// cannot see. Groups 6 and 7 (vendor specific) give 10: a longer vendor
    /// CDB is cut to 10 bytes by LIO, which is why STP's vendor commands are
    /// 10 bytes long.
    pub fn group_cdb_len(self) -> usize {
        const KERNEL_TABLE: [usize; 8] = [6, 10, 10, 12, 16, 12, 10, 10];
        KERNEL_TABLE[usize::from(self.0 >> 5)]
    }
}

impl fmt::Debug for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "Opcode(0x{:02X} {n})", self.0),
            None => write!(f, "Opcode(0x{:02X})", self.0),
        }
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} (0x{:02X})", self.0),
            None => write!(f, "opcode 0x{:02X}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lengths_match_the_kernel_table() {
        assert_eq!(Opcode::TEST_UNIT_READY.group_cdb_len(), 6);
        assert_eq!(Opcode::READ_10.group_cdb_len(), 10);
        assert_eq!(Opcode::MODE_SENSE_10.group_cdb_len(), 10);
        assert_eq!(Opcode::REPORT_LUNS.group_cdb_len(), 12);
        assert_eq!(Opcode::READ_16.group_cdb_len(), 16);
        // Group 3 (reserved) is 12 in the kernel's table, not 10.
        assert_eq!(Opcode(0x60).group_cdb_len(), 12);
        assert_eq!(Opcode(0x7B).group_cdb_len(), 12);
        assert_eq!(Opcode(0x7F).group_cdb_len(), 12);
        let table: Vec<usize> = (0..8u8).map(|g| Opcode(g << 5).group_cdb_len()).collect();
        assert_eq!(table, [6, 10, 10, 12, 16, 12, 10, 10]);
        assert_eq!(Opcode(0xC0).group_cdb_len(), 10);
        assert_eq!(Opcode(0xFF).group_cdb_len(), 10);
    }

    #[test]
    fn unknown_opcodes_survive_and_print() {
        let op = Opcode(0x7B);
        assert_eq!(op.name(), None);
        assert_eq!(format!("{op}"), "opcode 0x7B");
        assert_eq!(format!("{}", Opcode(0xC3)), "VENDOR SPECIFIC (0xC3)");
        assert!(Opcode(0xC3).is_vendor_specific());
        assert!(!Opcode::REPORT_LUNS.is_vendor_specific());
    }
}
