//! The SPC/SBC commands a LUN of the array implements, each with the CDB
//! usage data REPORT SUPPORTED OPERATION CODES reports for it, and the
//! check that refuses every CDB bit outside that usage data.
//!
//! One table serves both: a bit the usage data marks as unused is a field
//! the model does not support (a reserved bit, RDPROTECT/WRPROTECT on a LUN
//! without protection information, DPO/FUA on a LUN without DPOFUA, the
//! group number, NACA and LINK in the CONTROL byte), and a CDB that sets
//! one is refused with ILLEGAL REQUEST / INVALID FIELD IN CDB and a field
//! pointer to it (SPC-4 §4.5.2.4.2: the bit pointer names the most
//! significant bit of a field of several bits). LIO's own usage data marks
//! the same fields unused (its CONTROL byte mask is 0) but its parser does
//! not refuse all of them: docs/ARRAYS.md lists where it does not.

use scsi::{Opcode, Sense};

use crate::lun::LunConfig;

/// One command of the table.
#[derive(Clone, Debug)]
pub(crate) struct Command {
    /// The operation code.
    pub opcode: Opcode,
    /// The service action, for opcodes that have them.
    pub service_action: Option<u8>,
    /// CDB USAGE DATA: byte 0 the operation code, the service action in
    /// byte 1 bits 4-0 where there is one, elsewhere a bit set for every
    /// CDB bit the device server looks at. As long as the CDB.
    pub usage: Vec<u8>,
    /// Fields of several bits within one byte, as (byte, mask): an
    /// unsupported value there is pointed at the field's top bit.
    fields: &'static [(usize, u8)],
    /// Fields over several bytes, as (first byte, last byte): pointed at
    /// the first byte's top bit.
    spans: &'static [(usize, usize)],
}

/// The CONTROL byte's vendor-specific field (bits 7-6).
const VENDOR_CONTROL: u8 = 0xC0;

/// The multi-bit fields of a 10-byte data command: PROTECT (byte 1 bits
/// 7-5), GROUP NUMBER (byte 6 bits 5-0), the CONTROL byte's vendor bits.
const FIELDS_10: &[(usize, u8)] = &[(1, 0xE0), (6, 0x3F), (9, VENDOR_CONTROL)];
/// As [`FIELDS_10`] for 16 bytes (GROUP NUMBER in byte 14).
const FIELDS_16: &[(usize, u8)] = &[(1, 0xE0), (14, 0x3F), (15, VENDOR_CONTROL)];
const CONTROL_6: &[(usize, u8)] = &[(5, VENDOR_CONTROL)];
const CONTROL_10: &[(usize, u8)] = &[(9, VENDOR_CONTROL)];
const CONTROL_12: &[(usize, u8)] = &[(11, VENDOR_CONTROL)];
const CONTROL_16: &[(usize, u8)] = &[(15, VENDOR_CONTROL)];

impl Command {
    fn new(opcode: Opcode, service_action: Option<u8>, usage: &[u8]) -> Command {
        let mut usage = usage.to_vec();
        usage[0] = opcode.0;
        let fields = match usage.len() {
            6 => CONTROL_6,
            10 => CONTROL_10,
            12 => CONTROL_12,
            _ => CONTROL_16,
        };
        Command {
            opcode,
            service_action,
            usage,
            fields,
            spans: &[],
        }
    }

    fn fields(mut self, fields: &'static [(usize, u8)]) -> Command {
        self.fields = fields;
        self
    }

    fn spans(mut self, spans: &'static [(usize, usize)]) -> Command {
        self.spans = spans;
        self
    }

    /// Refuses a CDB that sets a bit outside the usage data: INVALID FIELD
    /// IN CDB pointing at the first such field. `cdb` is the CDB as sent
    /// (at least as long as the usage data: the parser checked).
    pub fn check(&self, cdb: &[u8]) -> Result<(), Sense> {
        for (i, (&b, &used)) in cdb.iter().zip(&self.usage).enumerate().skip(1) {
            let used = if i == 1 && self.service_action.is_some() {
                // The service action itself was matched when parsing.
                used | 0x1F
            } else {
                used
            };
            let bad = b & !used;
            if bad != 0 {
                return Err(self.pointer(i, bad));
            }
        }
        Ok(())
    }

    fn pointer(&self, byte: usize, bad: u8) -> Sense {
        let top = |m: u8| 7 - m.leading_zeros() as u8;
        if let Some(&(first, _)) = self
            .spans
            .iter()
            .find(|&&(first, last)| (first..=last).contains(&byte))
        {
            return Sense::invalid_field_in_cdb(first as u16, Some(7));
        }
        let field = self
            .fields
            .iter()
            .find(|&&(b, mask)| b == byte && mask & bad != 0)
            .map(|&(_, mask)| mask);
        let bit = top(field.unwrap_or(bad));
        Sense::invalid_field_in_cdb(byte as u16, Some(bit))
    }
}

/// The standard commands a LUN configured as `config` implements, in the
/// order REPORT SUPPORTED OPERATION CODES lists them. DPO and FUA are used
/// bits only where the LUN has DPOFUA; the UNMAP bit of WRITE SAME, UNMAP
/// and GET LBA STATUS only where it is thin provisioned.
pub(crate) fn standard(config: &LunConfig) -> Vec<Command> {
    const FF: u8 = 0xFF;
    let dpofua = if config.dpofua { 0x18 } else { 0 };
    let dpo = if config.dpofua { 0x10 } else { 0 };
    let unmap_bit = if config.thin { 0x08 } else { 0 };
    let rw10 = [0, dpofua, FF, FF, FF, FF, 0, FF, FF, 0];
    let rw16 = [
        0, dpofua, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0,
    ];
    // BYTCHK as SBC-3 has it (bit 1; 11b is SBC-4's) and DPO.
    let verify10 = [0, 0x02 | dpo, FF, FF, FF, FF, 0, FF, FF, 0];
    let verify16 = [
        0,
        0x02 | dpo,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        FF,
        0,
        0,
    ];
    let ws10 = [0, unmap_bit, FF, FF, FF, FF, 0, FF, FF, 0];
    let ws16 = [
        0, unmap_bit, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0,
    ];
    let sync10 = [0, 0x02, FF, FF, FF, FF, 0, FF, FF, 0];
    let sync16 = [
        0, 0x02, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0,
    ];
    let caw = [0, dpofua, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0, 0, FF, 0, 0];
    let sa = |op: Opcode, action: u8, usage: &[u8]| {
        let mut c = Command::new(op, Some(action), usage);
        c.usage[1] |= action;
        c
    };
    let mut v = vec![
        Command::new(Opcode::TEST_UNIT_READY, None, &[0, 0, 0, 0, 0, 0]),
        // DESC (byte 1 bit 0) unused: descriptor format sense is refused.
        Command::new(Opcode::REQUEST_SENSE, None, &[0, 0, 0, 0, FF, 0]),
        Command::new(Opcode::INQUIRY, None, &[0, 0x01, FF, FF, FF, 0]),
        Command::new(Opcode::MODE_SENSE_6, None, &[0, 0x08, FF, FF, FF, 0]),
        // PMI and the (obsolete) LBA, checked against each other as LIO does.
        Command::new(
            Opcode::READ_CAPACITY_10,
            None,
            &[0, 0, FF, FF, FF, FF, 0, 0, 0x01, 0],
        ),
        Command::new(Opcode::READ_10, None, &rw10).fields(FIELDS_10),
        Command::new(Opcode::WRITE_10, None, &rw10).fields(FIELDS_10),
        Command::new(Opcode::VERIFY_10, None, &verify10).fields(FIELDS_10),
        Command::new(Opcode::SYNCHRONIZE_CACHE_10, None, &sync10).fields(FIELDS_10),
        Command::new(Opcode::WRITE_SAME_10, None, &ws10).fields(FIELDS_10),
    ];
    if config.thin {
        // ANCHOR (byte 1 bit 0) unused: there is no anchored state.
        v.push(
            Command::new(Opcode::UNMAP, None, &[0, 0, 0, 0, 0, 0, 0, FF, FF, 0]).fields(FIELDS_10),
        );
    }
    v.push(Command::new(
        Opcode::MODE_SENSE_10,
        None,
        &[0, 0x18, FF, FF, 0, 0, 0, FF, FF, 0],
    ));
    let pr_in = [0, 0, 0, 0, 0, 0, 0, FF, FF, 0];
    for action in [
        scsi::pr::read::KEYS,
        scsi::pr::read::RESERVATION,
        scsi::pr::read::CAPABILITIES,
    ] {
        v.push(sa(Opcode::PERSISTENT_RESERVE_IN, action, &pr_in));
    }
    let pr_out = [0, 0, FF, 0, 0, FF, FF, FF, FF, 0];
    for action in scsi::pr::action::REGISTER..=scsi::pr::action::REGISTER_AND_IGNORE {
        v.push(sa(Opcode::PERSISTENT_RESERVE_OUT, action, &pr_out));
    }
    v.extend([
        Command::new(Opcode::READ_16, None, &rw16).fields(FIELDS_16),
        Command::new(Opcode::COMPARE_AND_WRITE, None, &caw).fields(FIELDS_16),
        Command::new(Opcode::WRITE_16, None, &rw16).fields(FIELDS_16),
        Command::new(Opcode::VERIFY_16, None, &verify16).fields(FIELDS_16),
        Command::new(Opcode::SYNCHRONIZE_CACHE_16, None, &sync16).fields(FIELDS_16),
        Command::new(Opcode::WRITE_SAME_16, None, &ws16).fields(FIELDS_16),
        // The (obsolete) LBA and PMI unused.
        sa(
            Opcode::SERVICE_ACTION_IN_16,
            Opcode::SA_READ_CAPACITY_16,
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        )
        .spans(&[(2, 9)]),
    ]);
    if config.thin {
        v.push(sa(
            Opcode::SERVICE_ACTION_IN_16,
            Opcode::SA_GET_LBA_STATUS,
            &[0, 0, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        ));
    }
    v.extend([
        Command::new(
            Opcode::REPORT_LUNS,
            None,
            &[0, 0, FF, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        ),
        // PARAMETER DATA FORMAT 000b and 001b.
        sa(
            Opcode::MAINTENANCE_IN,
            Opcode::SA_REPORT_TARGET_PORT_GROUPS,
            &[0, 0x20, 0, 0, 0, 0, FF, FF, FF, FF, 0, 0],
        )
        .fields(&[(1, 0xE0), (11, VENDOR_CONTROL)]),
        // RCTD and REPORTING OPTIONS.
        sa(
            Opcode::MAINTENANCE_IN,
            Opcode::SA_REPORT_SUPPORTED_OPCODES,
            &[0, 0, 0x87, FF, FF, FF, FF, FF, FF, FF, 0, 0],
        ),
    ]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use scsi::sense::FieldPointer;

    fn find(v: &[Command], op: Opcode, sa: Option<u8>) -> &Command {
        v.iter()
            .find(|c| c.opcode == op && c.service_action == sa)
            .unwrap()
    }

    fn pointer(r: Result<(), Sense>) -> Option<(u16, Option<u8>)> {
        r.err()
            .and_then(|s| s.field_pointer())
            .map(|FieldPointer { byte, bit, .. }| (byte, bit))
    }

    #[test]
    fn usage_data_points_at_unsupported_fields() {
        let config = LunConfig::new(1, 1024, 512);
        let v = standard(&config);
        let read10 = find(&v, Opcode::READ_10, None);
        let ok = [0x28, 0x18, 0, 0, 0, 1, 0, 0, 1, 0];
        assert_eq!(read10.check(&ok), Ok(()));
        // RDPROTECT 001b: the field's top bit.
        let mut c = ok;
        c[1] |= 0x20;
        assert_eq!(pointer(read10.check(&c)), Some((1, Some(7))));
        // Group number, NACA, LINK, vendor bits of CONTROL.
        for (byte, value, bit) in [(6, 0x01, 5), (9, 0x04, 2), (9, 0x01, 0), (9, 0x40, 7)] {
            let mut c = ok;
            c[byte] = value;
            assert_eq!(pointer(read10.check(&c)), Some((byte as u16, Some(bit))));
        }
        // READ CAPACITY(16): the obsolete LBA is one field.
        let rc16 = find(&v, Opcode::SERVICE_ACTION_IN_16, Some(0x10));
        let mut c = [0u8; 16];
        c[..2].copy_from_slice(&[0x9E, 0x10]);
        c[13] = 32;
        assert_eq!(rc16.check(&c), Ok(()));
        c[9] = 1;
        assert_eq!(pointer(rc16.check(&c)), Some((2, Some(7))));
        // A service action byte: the action bits are not the check's.
        let rtpg = find(&v, Opcode::MAINTENANCE_IN, Some(0x0A));
        assert_eq!(rtpg.usage[1], 0x2A);
        assert_eq!(
            rtpg.check(&[0xA3, 0x2A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            Ok(())
        );
        assert_eq!(
            pointer(rtpg.check(&[0xA3, 0x4A, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])),
            Some((1, Some(7)))
        );
    }

    #[test]
    fn the_table_follows_the_configuration() {
        let thin = LunConfig::new(1, 1024, 512);
        let thick = LunConfig {
            thin: false,
            dpofua: false,
            ..thin.clone()
        };
        let has = |c: &LunConfig, op, sa| {
            standard(c)
                .iter()
                .any(|x| x.opcode == op && x.service_action == sa)
        };
        assert!(has(&thin, Opcode::UNMAP, None));
        assert!(has(&thin, Opcode::SERVICE_ACTION_IN_16, Some(0x12)));
        assert!(!has(&thick, Opcode::UNMAP, None));
        assert!(!has(&thick, Opcode::SERVICE_ACTION_IN_16, Some(0x12)));
        let ws = |c: &LunConfig| find(&standard(c), Opcode::WRITE_SAME_16, None).usage[1];
        assert_eq!((ws(&thin), ws(&thick)), (0x08, 0x00));
        let fua = |c: &LunConfig| find(&standard(c), Opcode::WRITE_16, None).usage[1];
        assert_eq!((fua(&thin), fua(&thick)), (0x18, 0x00));
        // Every usage data is as long as its opcode's CDB.
        for c in standard(&thin) {
            assert_eq!(c.usage.len(), c.opcode.group_cdb_len(), "{:?}", c.opcode);
            assert_eq!(c.usage[0], c.opcode.0);
        }
    }
}
