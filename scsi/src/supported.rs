//! REPORT SUPPORTED OPERATION CODES parameter data (SPC-4 §6.35): the
//! all_commands list, the one_command answer, and the command timeouts
//! descriptor RCTD asks for, built and parsed both ways.
//!
//! No-panic contract: every `parse` accepts any bytes; a list cut short by
//! the allocation length keeps the whole descriptors that fit.

use crate::cdb::flag;

/// Why bytes are not REPORT SUPPORTED OPERATION CODES data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SupportedError {
    /// Fewer bytes than the fixed header.
    #[error("{what} truncated: {got} bytes, need at least {need}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
}

/// A command timeouts descriptor (SPC-4 §6.35.4): 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// COMMAND SPECIFIC.
    pub command_specific: u8,
    /// NOMINAL COMMAND PROCESSING TIMEOUT in seconds (0: not specified).
    pub nominal: u32,
    /// RECOMMENDED COMMAND TIMEOUT in seconds (0: not specified).
    pub recommended: u32,
}

/// Bytes of a command timeouts descriptor.
pub const TIMEOUTS_LEN: usize = 12;

impl Timeouts {
    /// The 12 descriptor bytes (DESCRIPTOR LENGTH 0Ah).
    pub fn to_bytes(self) -> [u8; TIMEOUTS_LEN] {
        let mut b = [0u8; TIMEOUTS_LEN];
        b[..2].copy_from_slice(&0x0Au16.to_be_bytes());
        b[3] = self.command_specific;
        b[4..8].copy_from_slice(&self.nominal.to_be_bytes());
        b[8..12].copy_from_slice(&self.recommended.to_be_bytes());
        b
    }

    fn parse(b: &[u8]) -> Option<Timeouts> {
        let b = b.get(..TIMEOUTS_LEN)?;
        Some(Timeouts {
            command_specific: b[3],
            nominal: u32::from_be_bytes(b[4..8].try_into().ok()?),
            recommended: u32::from_be_bytes(b[8..12].try_into().ok()?),
        })
    }
}

/// One command descriptor of the all_commands format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CommandDescriptor {
    /// OPERATION CODE.
    pub opcode: u8,
    /// SERVICE ACTION, when SERVACTV is set.
    pub service_action: Option<u16>,
    /// CDB LENGTH.
    pub cdb_len: u16,
    /// The timeouts descriptor, when CTDP is set.
    pub timeouts: Option<Timeouts>,
}

/// Bytes of a command descriptor without its timeouts descriptor.
const COMMAND_DESCRIPTOR_LEN: usize = 8;

/// The all_commands parameter data (REPORTING OPTIONS 000b).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AllCommands {
    /// COMMAND DATA LENGTH: the bytes of descriptors, as the device claims.
    pub data_length: u32,
    /// The descriptors present.
    pub commands: Vec<CommandDescriptor>,
}

impl AllCommands {
    /// Parameter data listing `commands`, its length field consistent.
    pub fn new(commands: Vec<CommandDescriptor>) -> AllCommands {
        let n: usize = commands
            .iter()
            .map(|c| COMMAND_DESCRIPTOR_LEN + c.timeouts.map_or(0, |_| TIMEOUTS_LEN))
            .sum();
        AllCommands {
            data_length: u32::try_from(n).unwrap_or(u32::MAX),
            commands,
        }
    }

    /// The parameter data bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.data_length.to_be_bytes().to_vec();
        for c in &self.commands {
            b.push(c.opcode);
            b.push(0);
            b.extend_from_slice(&c.service_action.unwrap_or(0).to_be_bytes());
            b.push(0);
            b.push(flag(c.timeouts.is_some(), 0x02) | flag(c.service_action.is_some(), 0x01));
            b.extend_from_slice(&c.cdb_len.to_be_bytes());
            if let Some(t) = c.timeouts {
                b.extend_from_slice(&t.to_bytes());
            }
        }
        b
    }

    /// Decodes the parameter data: the whole descriptors within `data` and
    /// the COMMAND DATA LENGTH.
    pub fn parse(data: &[u8]) -> Result<AllCommands, SupportedError> {
        let Some(header) = data.get(..4) else {
            return Err(SupportedError::Truncated {
                what: "REPORT SUPPORTED OPERATION CODES data",
                got: data.len(),
                need: 4,
            });
        };
        let data_length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let end = usize::try_from(data_length)
            .unwrap_or(usize::MAX)
            .saturating_add(4)
            .min(data.len());
        let mut rest = &data[4..end];
        let mut commands = Vec::new();
        while let Some(d) = rest.get(..COMMAND_DESCRIPTOR_LEN) {
            let ctdp = d[5] & 0x02 != 0;
            let len = COMMAND_DESCRIPTOR_LEN + if ctdp { TIMEOUTS_LEN } else { 0 };
            let timeouts = if ctdp {
                match Timeouts::parse(&rest[COMMAND_DESCRIPTOR_LEN..]) {
                    Some(t) => Some(t),
                    None => break,
                }
            } else {
                None
            };
            commands.push(CommandDescriptor {
                opcode: d[0],
                service_action: (d[5] & 0x01 != 0).then(|| u16::from_be_bytes([d[2], d[3]])),
                cdb_len: u16::from_be_bytes([d[6], d[7]]),
                timeouts,
            });
            rest = rest.get(len..).unwrap_or_default();
        }
        Ok(AllCommands {
            data_length,
            commands,
        })
    }
}

/// SUPPORT values of the one_command format.
pub mod support {
    /// The device server gives no information.
    pub const NOT_AVAILABLE: u8 = 0;
    /// Not supported.
    pub const NOT_SUPPORTED: u8 = 1;
    /// Supported as the standard defines it.
    pub const SUPPORTED: u8 = 3;
    /// Supported in a vendor-specific manner.
    pub const VENDOR: u8 = 5;
}

/// The one_command parameter data (REPORTING OPTIONS 001b–011b).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct OneCommand {
    /// SUPPORT (3 bits, [`support`]).
    pub support: u8,
    /// CDB USAGE DATA: as long as the CDB, each bit set where the device
    /// server looks at that bit (byte 0 is the operation code). Empty when
    /// the answer has none (LIO answers an unsupported command with the
    /// 2-byte header alone).
    pub usage: Vec<u8>,
    /// The timeouts descriptor, when CTDP is set.
    pub timeouts: Option<Timeouts>,
}

impl OneCommand {
    /// The parameter data: the header, CDB SIZE and usage data, then the
    /// timeouts descriptor.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![
            0,
            flag(self.timeouts.is_some(), 0x80) | (self.support & 0x07),
        ];
        let len = u16::try_from(self.usage.len()).unwrap_or(u16::MAX);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&self.usage[..usize::from(len)]);
        if let Some(t) = self.timeouts {
            b.extend_from_slice(&t.to_bytes());
        }
        b
    }

    /// Decodes the parameter data; a usage field or timeouts descriptor
    /// cut short is left out.
    pub fn parse(data: &[u8]) -> Result<OneCommand, SupportedError> {
        let Some(header) = data.get(..2) else {
            return Err(SupportedError::Truncated {
                what: "REPORT SUPPORTED OPERATION CODES one_command data",
                got: data.len(),
                need: 2,
            });
        };
        let support = header[1] & 0x07;
        let ctdp = header[1] & 0x80 != 0;
        let cdb_size = data
            .get(2..4)
            .map_or(0, |s| usize::from(u16::from_be_bytes([s[0], s[1]])));
        let usage = data
            .get(4..4 + cdb_size)
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let timeouts = if ctdp && !usage.is_empty() {
            data.get(4 + cdb_size..).and_then(Timeouts::parse)
        } else {
            None
        };
        Ok(OneCommand {
            support,
            usage,
            timeouts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn all_commands_with_timeouts() {
        let t = Timeouts {
            command_specific: 0,
            nominal: 0,
            recommended: 30,
        };
        let all = AllCommands::new(vec![
            CommandDescriptor {
                opcode: 0x28,
                service_action: None,
                cdb_len: 10,
                timeouts: Some(t),
            },
            CommandDescriptor {
                opcode: 0x9E,
                service_action: Some(0x10),
                cdb_len: 16,
                timeouts: Some(t),
            },
        ]);
        let b = all.to_bytes();
        assert_eq!(&b[..4], &[0, 0, 0, 40]);
        assert_eq!(&b[4..12], &[0x28, 0, 0, 0, 0, 0x02, 0, 10]);
        assert_eq!(&b[12..24], &[0, 0x0A, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30]);
        assert_eq!(&b[24..32], &[0x9E, 0, 0, 0x10, 0, 0x03, 0, 16]);
        assert_eq!(AllCommands::parse(&b), Ok(all.clone()));
        // Cut inside the second descriptor's timeouts: the first alone.
        let cut = AllCommands::parse(&b[..40]).unwrap();
        assert_eq!(cut.commands, all.commands[..1]);
        assert!(AllCommands::parse(&b[..3]).is_err());
    }

    #[test]
    fn one_command_forms() {
        // READ(10) with a timeouts descriptor, as LIO 7.x answers RCTD=1.
        let one = OneCommand {
            support: support::SUPPORTED,
            usage: vec![0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0],
            timeouts: Some(Timeouts::default()),
        };
        let b = one.to_bytes();
        assert_eq!(&b[..4], &[0, 0x83, 0, 10]);
        assert_eq!(b.len(), 4 + 10 + 12);
        assert_eq!(OneCommand::parse(&b), Ok(one));
        // LIO's answer for a command it does not have: two bytes.
        assert_eq!(
            OneCommand::parse(&[0, 0x01]),
            Ok(OneCommand {
                support: support::NOT_SUPPORTED,
                usage: Vec::new(),
                timeouts: None
            })
        );
        assert!(OneCommand::parse(&[0]).is_err());
    }

    proptest! {
        #[test]
        fn all_commands_round_trip(cs in proptest::collection::vec(
            (any::<u8>(), proptest::option::of(any::<u16>()), any::<u16>(),
             proptest::option::of(any::<(u8, u32, u32)>())), 0..12)) {
            let all = AllCommands::new(cs.into_iter().map(|(opcode, service_action, cdb_len, t)| {
                CommandDescriptor {
                    opcode,
                    service_action,
                    cdb_len,
                    timeouts: t.map(|(command_specific, nominal, recommended)| Timeouts {
                        command_specific, nominal, recommended,
                    }),
                }
            }).collect());
            prop_assert_eq!(AllCommands::parse(&all.to_bytes()), Ok(all));
        }

        #[test]
        fn one_command_round_trips(support in 0u8..8, usage in proptest::collection::vec(any::<u8>(), 1..32),
                                   t in proptest::option::of(any::<(u8, u32, u32)>())) {
            let one = OneCommand {
                support,
                usage,
                timeouts: t.map(|(command_specific, nominal, recommended)| Timeouts {
                    command_specific, nominal, recommended,
                }),
            };
            prop_assert_eq!(OneCommand::parse(&one.to_bytes()), Ok(one));
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = AllCommands::parse(&data);
            let _ = OneCommand::parse(&data);
        }
    }
}
