//! Asymmetric logical unit access as Linux LIO implements it
//! (`target_core_alua.c`), for one logical unit of the model.
//!
//! * Every LUN starts with LIO's `default_tg_pt_gp`: group 0,
//!   active/optimized, not preferred, supporting every state but LBA
//!   dependent ([`supported::LIO_DEFAULT`]), holding every target port not
//!   moved to another group.
//! * A target port is the relative target port identifier a nexus entered
//!   through ([`Array::login_through`](crate::Array::login_through)).
//!   Nexuses whose port the front end cannot tell (TCMU: the kernel does
//!   ALUA itself there) get no ALUA treatment at all.
//! * REPORT TARGET PORT GROUPS lists the groups that have members, in
//!   group order, as LIO does; an allocation length shorter than the header
//!   is INVALID FIELD IN CDB.
//! * The state check comes after the unit attention check and before the
//!   reservation check (LIO's `__target_execute_cmd`). In standby only
//!   INQUIRY, MODE SENSE, REPORT LUNS, READ CAPACITY, REPORT TARGET PORT
//!   GROUPS, REQUEST SENSE and PERSISTENT RESERVE IN/OUT pass; in
//!   unavailable and transitioning only INQUIRY, REPORT LUNS, REPORT
//!   TARGET PORT GROUPS and REQUEST SENSE; everything else fails NOT READY
//!   with 04h/0Bh, 04h/0Ch or 04h/0Ah. Active/non-optimized delays each
//!   command by the group's non-optimized delay (LIO's default 100 ms).
//! * A state change (LIO: writing the group's `alua_access_state` in
//!   configfs, an implicit transition) sets status code 02h (altered by
//!   implicit ALUA) and queues UNIT ATTENTION 2Ah/06h ASYMMETRIC ACCESS
//!   STATE CHANGED for every nexus that entered through one of the group's
//!   ports.

use std::time::Duration;

use scsi::alua::{supported, AccessState, PortGroup, PortGroups};
use scsi::cdb::Cdb;
use scsi::{Asc, Opcode, Sense, SenseKey};

/// LIO's default non-optimized delay (`ALUA_DEFAULT_NONOP_DELAY_MSECS`).
pub const DEFAULT_NONOP_DELAY: Duration = Duration::from_millis(100);

/// Status code: altered by implicit ALUA.
const STATUS_IMPLICIT: u8 = 0x02;

/// One target port group of a LUN.
#[derive(Clone, Debug)]
struct Group {
    id: u16,
    state: AccessState,
    preferred: bool,
    status: u8,
    nonop_delay: Duration,
    /// Ports explicitly moved here (group 0 also holds every port not
    /// moved anywhere).
    ports: Vec<u16>,
}

/// The target port groups of one LUN.
#[derive(Clone, Debug)]
pub struct Alua {
    groups: Vec<Group>,
}

impl Default for Alua {
    fn default() -> Alua {
        Alua {
            groups: vec![Group::new(0)],
        }
    }
}

impl Group {
    fn new(id: u16) -> Group {
        Group {
            id,
            state: AccessState::ACTIVE_OPTIMIZED,
            preferred: false,
            status: 0,
            nonop_delay: DEFAULT_NONOP_DELAY,
            ports: Vec::new(),
        }
    }
}

/// What the state check decided for one command.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Execute it now.
    Pass,
    /// Execute it after this delay (active/non-optimized).
    Delay(Duration),
    /// Fail it with this sense.
    Refuse(Sense),
}

impl Alua {
    /// The group `port` belongs to.
    fn group_of(&self, port: u16) -> &Group {
        self.groups
            .iter()
            .find(|g| g.ports.contains(&port))
            .unwrap_or(&self.groups[0])
    }

    fn group_mut(&mut self, id: u16) -> &mut Group {
        if let Some(i) = self.groups.iter().position(|g| g.id == id) {
            return &mut self.groups[i];
        }
        self.groups.push(Group::new(id));
        self.groups.sort_by_key(|g| g.id);
        let i = self.groups.iter().position(|g| g.id == id).unwrap_or(0);
        &mut self.groups[i]
    }

    /// Moves `port` into group `group` (created, active/optimized, if new),
    /// as writing a LUN's `alua_tg_pt_gp` in configfs does.
    pub fn set_port_group(&mut self, port: u16, group: u16) {
        for g in &mut self.groups {
            g.ports.retain(|p| *p != port);
        }
        if group != 0 {
            self.group_mut(group).ports.push(port);
        }
    }

    /// Sets group `group`'s state (creating the group if new). Returns
    /// whether it changed (a unit attention is then due).
    pub fn set_state(&mut self, group: u16, state: AccessState) -> bool {
        let g = self.group_mut(group);
        if g.state == state {
            return false;
        }
        g.state = state;
        g.status = STATUS_IMPLICIT;
        true
    }

    /// Sets group `group`'s PREF bit.
    pub fn set_preferred(&mut self, group: u16, preferred: bool) {
        self.group_mut(group).preferred = preferred;
    }

    /// Sets group `group`'s non-optimized delay.
    pub fn set_nonop_delay(&mut self, group: u16, delay: Duration) {
        self.group_mut(group).nonop_delay = delay;
    }

    /// The ports (of `known`, the ports nexuses entered through) that sit
    /// in group `group`.
    pub fn ports_of(&self, group: u16, known: &[u16]) -> Vec<u16> {
        known
            .iter()
            .copied()
            .filter(|p| self.group_of(*p).id == group)
            .collect()
    }

    /// The group number of `port`.
    pub fn group_id(&self, port: u16) -> u16 {
        self.group_of(port).id
    }

    /// REPORT TARGET PORT GROUPS parameter data for a LUN reached through
    /// the `known` ports; groups without members are left out, as LIO
    /// does.
    pub fn report(&self, known: &[u16], extended: bool) -> PortGroups {
        let groups = self
            .groups
            .iter()
            .map(|g| PortGroup {
                preferred: g.preferred,
                state: g.state,
                supported: supported::LIO_DEFAULT,
                id: g.id,
                status: g.status,
                ports: self.ports_of(g.id, known),
            })
            .filter(|g| !g.ports.is_empty())
            .collect();
        PortGroups {
            groups,
            implicit_transition_secs: extended.then_some(0),
        }
    }

    /// The state check of a command arriving through `port`.
    pub fn check(&self, port: u16, cdb: &Cdb) -> Verdict {
        let g = self.group_of(port);
        let op = cdb.opcode();
        let rtpg = matches!(cdb, Cdb::ReportTargetPortGroups { .. });
        let basic = rtpg
            || matches!(
                op,
                Opcode::INQUIRY | Opcode::REPORT_LUNS | Opcode::REQUEST_SENSE
            );
        let refuse = |asc| Verdict::Refuse(Sense::new(SenseKey::NOT_READY, asc));
        match g.state {
            AccessState::ACTIVE_OPTIMIZED => Verdict::Pass,
            AccessState::ACTIVE_NON_OPTIMIZED => {
                if g.nonop_delay.is_zero() || !is_data(cdb) {
                    Verdict::Pass
                } else {
                    Verdict::Delay(g.nonop_delay)
                }
            }
            AccessState::STANDBY => {
                let allowed = basic
                    || matches!(
                        cdb,
                        Cdb::ModeSense6 { .. }
                            | Cdb::ModeSense10 { .. }
                            | Cdb::ReadCapacity10
                            | Cdb::ReadCapacity16 { .. }
                            | Cdb::PersistentReserveIn { .. }
                            | Cdb::PersistentReserveOut { .. }
                    );
                if allowed {
                    Verdict::Pass
                } else {
                    refuse(Asc::NOT_ACCESSIBLE_STANDBY)
                }
            }
            AccessState::UNAVAILABLE if basic => Verdict::Pass,
            AccessState::UNAVAILABLE => refuse(Asc::NOT_ACCESSIBLE_UNAVAILABLE),
            AccessState::OFFLINE => refuse(Asc::NOT_ACCESSIBLE_OFFLINE),
            AccessState::TRANSITION if basic => Verdict::Pass,
            _ => refuse(Asc::NOT_READY_TRANSITIONING),
        }
    }
}

/// Commands LIO marks as data CDBs (the non-optimized delay applies).
fn is_data(cdb: &Cdb) -> bool {
    matches!(
        cdb,
        Cdb::Read10 { .. } | Cdb::Read16 { .. } | Cdb::Write10 { .. } | Cdb::Write16 { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use scsi::cdb::RwFlags;

    fn read() -> Cdb {
        Cdb::Read16 {
            lba: 0,
            blocks: 1,
            flags: RwFlags::default(),
        }
    }

    #[test]
    fn default_group_holds_every_port_and_serves_io() {
        let a = Alua::default();
        assert_eq!(a.check(1, &read()), Verdict::Pass);
        let r = a.report(&[1, 2], false);
        assert_eq!(r.groups.len(), 1);
        assert_eq!(r.groups[0].ports, [1, 2]);
        assert_eq!(r.groups[0].supported, 0xCF);
    }

    #[test]
    fn standby_refuses_io_but_answers_management() {
        let mut a = Alua::default();
        a.set_port_group(2, 5);
        assert!(a.set_state(5, AccessState::STANDBY));
        assert!(!a.set_state(5, AccessState::STANDBY));
        assert_eq!(a.check(1, &read()), Verdict::Pass);
        let Verdict::Refuse(s) = a.check(2, &read()) else {
            panic!("standby served a READ");
        };
        assert_eq!(
            (s.key, s.asc),
            (SenseKey::NOT_READY, Asc::NOT_ACCESSIBLE_STANDBY)
        );
        let rtpg = Cdb::ReportTargetPortGroups {
            extended: false,
            alloc_len: 64,
        };
        assert_eq!(a.check(2, &rtpg), Verdict::Pass);
        assert_eq!(
            a.check(2, &Cdb::ReadCapacity16 { alloc_len: 32 }),
            Verdict::Pass
        );
        let r = a.report(&[1, 2], true);
        assert_eq!(r.groups.len(), 2);
        assert_eq!(r.groups[1].status, 2);
        assert_eq!(
            r.group_of_port(2).map(|g| g.state),
            Some(AccessState::STANDBY)
        );
        a.set_state(5, AccessState::TRANSITION);
        assert_eq!(
            a.check(2, &Cdb::ReadCapacity16 { alloc_len: 32 }),
            Verdict::Refuse(Sense::new(
                SenseKey::NOT_READY,
                Asc::NOT_READY_TRANSITIONING
            ))
        );
        a.set_state(5, AccessState::ACTIVE_NON_OPTIMIZED);
        assert_eq!(a.check(2, &read()), Verdict::Delay(DEFAULT_NONOP_DELAY));
        a.set_nonop_delay(5, Duration::ZERO);
        assert_eq!(a.check(2, &read()), Verdict::Pass);
        a.set_port_group(2, 0);
        assert_eq!(a.report(&[1, 2], false).groups.len(), 1);
    }
}
