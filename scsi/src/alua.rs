//! Asymmetric logical unit access (ALUA, SPC-4 §5.16): which target port
//! groups a logical unit is reached through, and in which state each group
//! is — the answer of REPORT TARGET PORT GROUPS — and where a path's target
//! port sits (the relative target port and target port group designators of
//! VPD page 0x83).
//!
//! [`PortGroups::parse`] reads REPORT TARGET PORT GROUPS parameter data
//! (either header format); [`PortGroups::to_bytes`] emits it as Linux LIO
//! does (`target_emulate_report_target_port_groups`): the RETURN DATA
//! LENGTH counts the descriptors only, and with the extended header byte 4
//! is 10h and byte 5 the implicit transition time.
//!
//! No-panic contract: [`PortGroups::parse`] accepts any byte slice; a
//! descriptor cut short by the allocation length ends the list (what fits
//! is returned), so a truncated answer never fails.

use std::fmt;

use crate::cdb::Cdb;
use crate::inquiry::{Association, Designator, DesignatorType};
use crate::transport::{Command, CommandError, Transport};

/// An asymmetric access state (4 bits), as an open newtype.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessState(pub u8);

impl AccessState {
    /// Active/optimized: the preferred way to the logical unit.
    pub const ACTIVE_OPTIMIZED: AccessState = AccessState(0x0);
    /// Active/non-optimized: works, more slowly (LIO delays each command).
    pub const ACTIVE_NON_OPTIMIZED: AccessState = AccessState(0x1);
    /// Standby: only management commands; I/O fails with NOT READY 04h/0Bh.
    pub const STANDBY: AccessState = AccessState(0x2);
    /// Unavailable: I/O fails with NOT READY 04h/0Ch.
    pub const UNAVAILABLE: AccessState = AccessState(0x3);
    /// LBA dependent.
    pub const LBA_DEPENDENT: AccessState = AccessState(0x4);
    /// Offline: I/O fails with NOT READY 04h/12h.
    pub const OFFLINE: AccessState = AccessState(0xE);
    /// Transitioning between states: I/O fails with NOT READY 04h/0Ah.
    pub const TRANSITION: AccessState = AccessState(0xF);

    /// Whether I/O (READ, WRITE, vendor commands) is served in this state.
    pub fn serves_io(self) -> bool {
        matches!(
            self,
            AccessState::ACTIVE_OPTIMIZED
                | AccessState::ACTIVE_NON_OPTIMIZED
                | AccessState::LBA_DEPENDENT
        )
    }

    /// Order of preference for I/O: lower is better (active/optimized 0,
    /// active/non-optimized 1, LBA dependent 2, transition 3, anything else
    /// 4).
    pub fn rank(self) -> u8 {
        match self {
            AccessState::ACTIVE_OPTIMIZED => 0,
            AccessState::ACTIVE_NON_OPTIMIZED => 1,
            AccessState::LBA_DEPENDENT => 2,
            AccessState::TRANSITION => 3,
            _ => 4,
        }
    }

    /// The state's SPC name.
    pub fn name(self) -> &'static str {
        match self {
            AccessState::ACTIVE_OPTIMIZED => "active/optimized",
            AccessState::ACTIVE_NON_OPTIMIZED => "active/non-optimized",
            AccessState::STANDBY => "standby",
            AccessState::UNAVAILABLE => "unavailable",
            AccessState::LBA_DEPENDENT => "lba-dependent",
            AccessState::OFFLINE => "offline",
            AccessState::TRANSITION => "transitioning",
            _ => "reserved",
        }
    }
}

impl fmt::Display for AccessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "reserved" => write!(f, "reserved state {:X}h", self.0),
            n => f.write_str(n),
        }
    }
}

impl fmt::Debug for AccessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessState({self})")
    }
}

/// Supported-state bits of a target port group descriptor (byte 1).
pub mod supported {
    /// T_SUP: transitioning is reported.
    pub const TRANSITION: u8 = 0x80;
    /// O_SUP: offline.
    pub const OFFLINE: u8 = 0x40;
    /// LBD_SUP: LBA dependent.
    pub const LBA_DEPENDENT: u8 = 0x10;
    /// U_SUP: unavailable.
    pub const UNAVAILABLE: u8 = 0x08;
    /// S_SUP: standby.
    pub const STANDBY: u8 = 0x04;
    /// AN_SUP: active/non-optimized.
    pub const ACTIVE_NON_OPTIMIZED: u8 = 0x02;
    /// AO_SUP: active/optimized.
    pub const ACTIVE_OPTIMIZED: u8 = 0x01;
    /// What LIO's target port groups support (all but LBA dependent).
    pub const LIO_DEFAULT: u8 =
        TRANSITION | OFFLINE | UNAVAILABLE | STANDBY | ACTIVE_NON_OPTIMIZED | ACTIVE_OPTIMIZED;
}

/// One target port group descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGroup {
    /// PREF: the group is preferred.
    pub preferred: bool,
    /// The group's asymmetric access state.
    pub state: AccessState,
    /// Supported-state bits ([`supported`]).
    pub supported: u8,
    /// The target port group number.
    pub id: u16,
    /// STATUS CODE (0: none; 1: altered by SET TARGET PORT GROUPS; 2:
    /// altered by implicit ALUA).
    pub status: u8,
    /// The relative target port identifiers of the group's ports.
    pub ports: Vec<u16>,
}

/// REPORT TARGET PORT GROUPS parameter data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortGroups {
    /// The groups, in the order reported.
    pub groups: Vec<PortGroup>,
    /// The implicit transition time in seconds (extended header only).
    pub implicit_transition_secs: Option<u8>,
}

impl PortGroups {
    /// Parses parameter data (see the module's no-panic contract). The
    /// extended header is recognised by its format byte (byte 4 = 10h).
    pub fn parse(data: &[u8]) -> PortGroups {
        let Some(len) = data.get(..4) else {
            return PortGroups::default();
        };
        let declared = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (mut off, implicit): (usize, _) = match data.get(4) {
            Some(b) if b & 0x70 == 0x10 => (8, data.get(5).copied()),
            _ => (4, None),
        };
        let end = data.len().min(off.saturating_add(declared));
        let mut groups = Vec::new();
        while let Some(d) = data.get(off..off + 8).filter(|_| off + 8 <= end) {
            let count = usize::from(d[7]);
            let ports_end = off + 8 + 4 * count;
            let ports = data
                .get(off + 8..ports_end.min(end))
                .unwrap_or_default()
                .chunks_exact(4)
                .map(|p| u16::from_be_bytes([p[2], p[3]]))
                .collect();
            groups.push(PortGroup {
                preferred: d[0] & 0x80 != 0,
                state: AccessState(d[0] & 0x0F),
                supported: d[1],
                id: u16::from_be_bytes([d[2], d[3]]),
                status: d[5],
                ports,
            });
            off = ports_end;
        }
        PortGroups {
            groups,
            implicit_transition_secs: implicit,
        }
    }

    /// Emits the parameter data as LIO does: the 4-byte header, or the
    /// 8-byte extended one when `implicit_transition_secs` is set; the
    /// RETURN DATA LENGTH counts the descriptors only.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = if self.implicit_transition_secs.is_some() {
            8
        } else {
            4
        };
        let mut out = vec![0u8; header];
        for g in &self.groups {
            out.push(u8::from(g.preferred) << 7 | (g.state.0 & 0x0F));
            out.push(g.supported);
            out.extend_from_slice(&g.id.to_be_bytes());
            out.push(0);
            out.push(g.status);
            out.push(0);
            out.push(g.ports.len().min(255) as u8);
            for p in g.ports.iter().take(255) {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&p.to_be_bytes());
            }
        }
        let len = (out.len() - header) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        if let Some(secs) = self.implicit_transition_secs {
            out[4] = 0x10;
            out[5] = secs;
        }
        out
    }

    /// The group that holds relative target port `port`.
    pub fn group_of_port(&self, port: u16) -> Option<&PortGroup> {
        self.groups.iter().find(|g| g.ports.contains(&port))
    }

    /// The group numbered `id`.
    pub fn group(&self, id: u16) -> Option<&PortGroup> {
        self.groups.iter().find(|g| g.id == id)
    }
}

/// Where a path enters the logical unit: its relative target port and its
/// target port group, from the designators of VPD page 0x83 associated
/// with the target port. Either may be missing (a device without ALUA).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortIdentity {
    /// The relative target port identifier.
    pub relative_port: Option<u16>,
    /// The target port group.
    pub group: Option<u16>,
}

impl PortIdentity {
    /// Reads the port designators out of VPD 0x83's list.
    pub fn from_designators(list: &[Designator]) -> PortIdentity {
        let number = |kind: DesignatorType| {
            list.iter()
                .find(|d| d.kind == kind && d.association == Association::TARGET_PORT)
                .and_then(|d| d.value.get(2..4))
                .map(|v| u16::from_be_bytes([v[0], v[1]]))
        };
        PortIdentity {
            relative_port: number(DesignatorType::RELATIVE_TARGET_PORT),
            group: number(DesignatorType::TARGET_PORT_GROUP),
        }
    }

    /// The designators of a port (relative target port, target port
    /// group), as LIO lists them on VPD 0x83 (binary, 4 bytes, the number
    /// in bytes 2–3).
    pub fn designators(port: u16, group: u16) -> [Designator; 2] {
        let d = |kind, n: u16| Designator {
            protocol_id: 0,
            code_set: crate::inquiry::CodeSet::BINARY,
            piv: false,
            association: Association::TARGET_PORT,
            kind,
            value: vec![0, 0, (n >> 8) as u8, n as u8],
        };
        [
            d(DesignatorType::RELATIVE_TARGET_PORT, port),
            d(DesignatorType::TARGET_PORT_GROUP, group),
        ]
    }
}

/// Sends REPORT TARGET PORT GROUPS (normal header, up to 4 KiB of
/// descriptors) on an idle transport and parses the answer.
pub fn report_target_port_groups(t: &mut dyn Transport) -> Result<PortGroups, CommandError> {
    const ALLOC: u32 = 4096;
    let cdb = Cdb::ReportTargetPortGroups {
        extended: false,
        alloc_len: ALLOC,
    }
    .emit();
    let (data, _) = t
        .execute(Command::data_in(cdb, ALLOC as usize))
        .into_result()?;
    Ok(PortGroups::parse(&data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lio_two_groups() -> PortGroups {
        PortGroups {
            groups: vec![
                PortGroup {
                    preferred: false,
                    state: AccessState::ACTIVE_OPTIMIZED,
                    supported: supported::LIO_DEFAULT,
                    id: 0,
                    status: 0,
                    ports: vec![1],
                },
                PortGroup {
                    preferred: true,
                    state: AccessState::STANDBY,
                    supported: supported::LIO_DEFAULT,
                    id: 2,
                    status: 2,
                    ports: vec![2, 3],
                },
            ],
            implicit_transition_secs: None,
        }
    }

    #[test]
    fn literal_bytes_as_lio_emits_them() {
        let bytes = lio_two_groups().to_bytes();
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 28,
            0x00, 0xCF, 0, 0, 0, 0, 0, 1,   0, 0, 0, 1,
            0x82, 0xCF, 0, 2, 0, 2, 0, 2,   0, 0, 0, 2,  0, 0, 0, 3,
        ];
        assert_eq!(bytes, want);
        assert_eq!(PortGroups::parse(&bytes), lio_two_groups());
        let mut ext = lio_two_groups();
        ext.implicit_transition_secs = Some(0);
        let bytes = ext.to_bytes();
        assert_eq!(&bytes[..8], &[0, 0, 0, 28, 0x10, 0, 0, 0]);
        assert_eq!(PortGroups::parse(&bytes), ext);
    }

    #[test]
    fn truncated_answers_keep_what_fits() {
        let bytes = lio_two_groups().to_bytes();
        for cut in 0..bytes.len() {
            let p = PortGroups::parse(&bytes[..cut]);
            assert!(p.groups.len() <= 2);
        }
        let p = PortGroups::parse(&bytes[..12]);
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].ports, Vec::<u16>::new());
        assert_eq!(p.group_of_port(1), None);
        let full = PortGroups::parse(&bytes);
        assert_eq!(full.group_of_port(3).map(|g| g.id), Some(2));
        assert_eq!(
            full.group(0).map(|g| g.state),
            Some(AccessState::ACTIVE_OPTIMIZED)
        );
    }

    #[test]
    fn port_designators_round_trip() {
        let list = PortIdentity::designators(0x0102, 7);
        let id = PortIdentity::from_designators(&list);
        assert_eq!(id.relative_port, Some(0x0102));
        assert_eq!(id.group, Some(7));
        assert_eq!(PortIdentity::from_designators(&[]), PortIdentity::default());
    }

    #[test]
    fn state_order_and_names() {
        assert!(AccessState::ACTIVE_OPTIMIZED.rank() < AccessState::ACTIVE_NON_OPTIMIZED.rank());
        assert!(AccessState::STANDBY.rank() > AccessState::TRANSITION.rank());
        assert!(!AccessState::STANDBY.serves_io());
        assert_eq!(AccessState(0x7).to_string(), "reserved state 7h");
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PortGroups::parse(&data);
        }

        #[test]
        fn emit_then_parse_is_identity(
            groups in proptest::collection::vec(
                (any::<bool>(), 0u8..16, any::<u8>(), any::<u16>(), any::<u8>(),
                 proptest::collection::vec(any::<u16>(), 0..5)),
                0..5),
            ext in proptest::option::of(any::<u8>()),
        ) {
            let pg = PortGroups {
                groups: groups.into_iter().map(|(preferred, s, supported, id, status, ports)| PortGroup {
                    preferred, state: AccessState(s), supported, id, status, ports,
                }).collect(),
                implicit_transition_secs: ext,
            };
            prop_assert_eq!(PortGroups::parse(&pg.to_bytes()), pg);
        }
    }
}
