//! SCSI-3 persistent reservations of one LUN (SPC-4 §5.14), as Linux LIO
//! implements them for its backstores: registrations keyed per initiator,
//! one reservation (logical-unit scope) of one of six types, and the
//! conflict rules that refuse another initiator's commands.
//!
//! No I/O: [`Reservations::out`] applies a PERSISTENT RESERVE OUT,
//! [`Reservations::read_keys`] and friends answer PERSISTENT RESERVE IN,
//! and [`Reservations::conflicts`] tells the array whether a command from an
//! initiator must end in RESERVATION CONFLICT. Unit attentions that a
//! change owes other initiators come back to the caller to raise. Not
//! modelled: APTPL (nothing persists across a power cycle), SPEC_I_PT and
//! ALL_TG_PT (refused), REGISTER AND MOVE (refused), READ FULL STATUS
//! (refused), and the aborting of tasks by PREEMPT AND ABORT (it preempts).

use std::collections::BTreeMap;

use scsi::{Asc, Sense, SenseKey};

use crate::task::InitiatorId;

/// The service actions and reservation types (one definition, in `scsi`).
pub use scsi::pr::{action, kind, read};

/// Bytes of the basic PERSISTENT RESERVE OUT parameter list.
pub const PARAM_LEN: usize = 24;

/// What a command does to the medium, for the conflict rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads the medium (READ).
    Read,
    /// Changes the medium or its cache (WRITE, SYNCHRONIZE CACHE).
    Write,
    /// Neither (INQUIRY, TEST UNIT READY, READ CAPACITY, PERSISTENT
    /// RESERVE IN, ...): never in conflict.
    Other,
}

/// Why a PERSISTENT RESERVE OUT failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrError {
    /// RESERVATION CONFLICT status (a key that does not match, a
    /// reservation held by another).
    Conflict,
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    holder: InitiatorId,
    kind: u8,
}

/// One LUN's registrations and reservation.
#[derive(Clone, Debug, Default)]
pub struct Reservations {
    generation: u32,
    keys: BTreeMap<InitiatorId, u64>,
    held: Option<Held>,
}

fn all_registrants(kind: u8) -> bool {
    matches!(kind, kind::WRITE_EXCLUSIVE_AR | kind::EXCLUSIVE_ACCESS_AR)
}

fn registrants_only(kind: u8) -> bool {
    matches!(kind, kind::WRITE_EXCLUSIVE_RO | kind::EXCLUSIVE_ACCESS_RO)
}

fn exclusive_access(kind: u8) -> bool {
    matches!(
        kind,
        kind::EXCLUSIVE_ACCESS | kind::EXCLUSIVE_ACCESS_RO | kind::EXCLUSIVE_ACCESS_AR
    )
}

fn valid_kind(kind: u8) -> bool {
    matches!(
        kind,
        kind::WRITE_EXCLUSIVE
            | kind::EXCLUSIVE_ACCESS
            | kind::WRITE_EXCLUSIVE_RO
            | kind::EXCLUSIVE_ACCESS_RO
            | kind::WRITE_EXCLUSIVE_AR
            | kind::EXCLUSIVE_ACCESS_AR
    )
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Reservations {
    /// No registrations, no reservation (power on).
    pub fn new() -> Reservations {
        Reservations::default()
    }

    /// True when `initiator`'s command of `access` must end in RESERVATION
    /// CONFLICT.
    pub fn conflicts(&self, initiator: InitiatorId, access: Access) -> bool {
        let Some(held) = self.held else {
            return false;
        };
        if access == Access::Other || self.holds(initiator, held) {
            return false;
        }
        let registered = self.keys.contains_key(&initiator);
        let shut_out = if registrants_only(held.kind) || all_registrants(held.kind) {
            !registered
        } else {
            true
        };
        shut_out && (access == Access::Write || exclusive_access(held.kind))
    }

    /// The initiator is a reservation holder: the one that reserved, or
    /// any registrant under an all-registrants type.
    fn holds(&self, initiator: InitiatorId, held: Held) -> bool {
        if all_registrants(held.kind) {
            self.keys.contains_key(&initiator)
        } else {
            held.holder == initiator
        }
    }

    /// Applies a PERSISTENT RESERVE OUT from `initiator`: `action`, scope,
    /// `kind` and the parameter list `params` (24 bytes). On success,
    /// returns the initiators that are owed a unit attention and its code.
    pub fn out(
        &mut self,
        initiator: InitiatorId,
        action: u8,
        scope: u8,
        kind: u8,
        params: &[u8],
    ) -> Result<Vec<(InitiatorId, Asc)>, PrError> {
        if params.len() != PARAM_LEN {
            return Err(PrError::Check(Sense::new(
                SenseKey::ILLEGAL_REQUEST,
                Asc::PARAMETER_LIST_LENGTH_ERROR,
            )));
        }
        let key = be64(&params[0..8]);
        let sa_key = be64(&params[8..16]);
        let flags = params[20];
        if flags & 0x0C != 0 {
            // SPEC_I_PT or ALL_TG_PT: not offered (REPORT CAPABILITIES).
            return Err(PrError::Check(Sense::new(
                SenseKey::ILLEGAL_REQUEST,
                Asc::INVALID_FIELD_IN_PARAMETER_LIST,
            )));
        }
        let mine = self.keys.get(&initiator).copied();
        match action {
            action::REGISTER | action::REGISTER_AND_IGNORE => {
                let ignore = action == action::REGISTER_AND_IGNORE;
                match mine {
                    None if !ignore && key != 0 => return Err(PrError::Conflict),
                    Some(k) if !ignore && k != key => return Err(PrError::Conflict),
                    _ => {}
                }
                if sa_key == 0 {
                    if mine.is_some() {
                        self.unregister(initiator);
                        self.generation = self.generation.wrapping_add(1);
                    }
                } else {
                    self.keys.insert(initiator, sa_key);
                    self.generation = self.generation.wrapping_add(1);
                }
                Ok(Vec::new())
            }
            _ if mine != Some(key) => Err(PrError::Conflict),
            action::RESERVE => {
                check_scope_kind(scope, kind)?;
                match self.held {
                    None => {
                        self.held = Some(Held {
                            holder: initiator,
                            kind,
                        });
                        Ok(Vec::new())
                    }
                    Some(h) if self.holds(initiator, h) && h.kind == kind => Ok(Vec::new()),
                    Some(_) => Err(PrError::Conflict),
                }
            }
            action::RELEASE => {
                let Some(h) = self.held else {
                    return Ok(Vec::new());
                };
                if !self.holds(initiator, h) {
                    return Ok(Vec::new());
                }
                check_scope_kind(scope, kind)?;
                if h.kind != kind {
                    return Err(PrError::Check(Sense::new(
                        SenseKey::ILLEGAL_REQUEST,
                        Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
                    )));
                }
                self.held = None;
                let told = if registrants_only(kind) || all_registrants(kind) {
                    self.others(initiator, Asc::RESERVATIONS_RELEASED)
                } else {
                    Vec::new()
                };
                Ok(told)
            }
            action::CLEAR => {
                let told = self.others(initiator, Asc::RESERVATIONS_PREEMPTED);
                self.keys.clear();
                self.held = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(told)
            }
            action::PREEMPT | action::PREEMPT_AND_ABORT => {
                check_scope_kind(scope, kind)?;
                let victims: Vec<InitiatorId> = self
                    .keys
                    .iter()
                    .filter(|&(&i, &k)| k == sa_key && i != initiator)
                    .map(|(&i, _)| i)
                    .collect();
                let holder_preempted = self.held.is_some_and(|h| {
                    !all_registrants(h.kind) && self.keys.get(&h.holder) == Some(&sa_key)
                });
                if victims.is_empty() && !holder_preempted {
                    return Err(PrError::Conflict);
                }
                for &v in &victims {
                    self.keys.remove(&v);
                }
                if holder_preempted || self.held.is_some_and(|h| all_registrants(h.kind)) {
                    self.held = Some(Held {
                        holder: initiator,
                        kind,
                    });
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(victims
                    .into_iter()
                    .map(|v| (v, Asc::REGISTRATIONS_PREEMPTED))
                    .collect())
            }
            _ => Err(PrError::Check(Sense::invalid_field_in_cdb(1, Some(4)))),
        }
    }

    /// Removes `initiator`'s registration; a reservation it held alone
    /// goes with it.
    fn unregister(&mut self, initiator: InitiatorId) {
        self.keys.remove(&initiator);
        if let Some(h) = self.held {
            let gone = if all_registrants(h.kind) {
                self.keys.is_empty()
            } else {
                h.holder == initiator
            };
            if gone {
                self.held = None;
            }
        }
    }

    fn others(&self, initiator: InitiatorId, asc: Asc) -> Vec<(InitiatorId, Asc)> {
        self.keys
            .keys()
            .filter(|&&i| i != initiator)
            .map(|&i| (i, asc))
            .collect()
    }

    /// READ KEYS data: generation, length, then every registered key.
    pub fn read_keys(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 8 * self.keys.len());
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.extend_from_slice(&((8 * self.keys.len()) as u32).to_be_bytes());
        for k in self.keys.values() {
            v.extend_from_slice(&k.to_be_bytes());
        }
        v
    }

    /// READ RESERVATION data: generation, length, then the reservation's
    /// key (0 under an all-registrants type), scope and type.
    pub fn read_reservation(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.generation.to_be_bytes());
        match self.held {
            None => v.extend_from_slice(&0u32.to_be_bytes()),
            Some(h) => {
                v.extend_from_slice(&16u32.to_be_bytes());
                let key = if all_registrants(h.kind) {
                    0
                } else {
                    self.keys.get(&h.holder).copied().unwrap_or(0)
                };
                v.extend_from_slice(&key.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.push(0);
                v.push(h.kind & 0x0F);
                v.extend_from_slice(&[0; 2]);
            }
        }
        v
    }

    /// REPORT CAPABILITIES data: no SPEC_I_PT, ALL_TG_PT or PTPL; the
    /// type mask valid, with every type above.
    pub fn report_capabilities() -> Vec<u8> {
        // Length 8; byte 3 bit 7 TMV; byte 4: WR_EX_AR, EX_AC_RO, WR_EX_RO,
        // EX_AC, WR_EX; byte 5: EX_AC_AR.
        vec![0, 8, 0, 0x80, 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0]
    }
}

fn check_scope_kind(scope: u8, kind: u8) -> Result<(), PrError> {
    if scope != 0 {
        return Err(PrError::Check(Sense::invalid_field_in_cdb(2, Some(7))));
    }
    if !valid_kind(kind) {
        return Err(PrError::Check(Sense::invalid_field_in_cdb(2, Some(3))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: InitiatorId = InitiatorId(1);
    const B: InitiatorId = InitiatorId(2);
    const C: InitiatorId = InitiatorId(3);

    fn params(key: u64, sa_key: u64) -> [u8; PARAM_LEN] {
        let mut p = [0u8; PARAM_LEN];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    fn register(r: &mut Reservations, i: InitiatorId, key: u64) {
        r.out(i, action::REGISTER, 0, 0, &params(0, key)).unwrap();
    }

    #[test]
    fn write_exclusive_registrants_only_fences_a_third_initiator() {
        let mut r = Reservations::new();
        register(&mut r, A, 0xA);
        register(&mut r, B, 0xB);
        r.out(
            A,
            action::RESERVE,
            0,
            kind::WRITE_EXCLUSIVE_RO,
            &params(0xA, 0),
        )
        .unwrap();
        // Registrants read and write; the third host only reads.
        for i in [A, B] {
            assert!(!r.conflicts(i, Access::Write));
            assert!(!r.conflicts(i, Access::Read));
        }
        assert!(r.conflicts(C, Access::Write));
        assert!(!r.conflicts(C, Access::Read));
        assert!(!r.conflicts(C, Access::Other));
        // It cannot reserve, release or clear with a key it does not hold.
        assert_eq!(
            r.out(
                C,
                action::RESERVE,
                0,
                kind::WRITE_EXCLUSIVE_RO,
                &params(0xC, 0)
            ),
            Err(PrError::Conflict)
        );
        assert_eq!(
            r.out(C, action::CLEAR, 0, 0, &params(0xA, 0)),
            Err(PrError::Conflict)
        );
        // Registering itself is allowed (SPC-4): then it may write.
        register(&mut r, C, 0xC);
        assert!(!r.conflicts(C, Access::Write));
    }

    #[test]
    fn keys_reservation_and_generation_read_back() {
        let mut r = Reservations::new();
        assert_eq!(r.read_keys(), vec![0, 0, 0, 0, 0, 0, 0, 0]);
        register(&mut r, A, 0x1122);
        register(&mut r, B, 0x3344);
        let keys = r.read_keys();
        assert_eq!(&keys[0..4], &2u32.to_be_bytes(), "two registrations");
        assert_eq!(&keys[4..8], &16u32.to_be_bytes());
        assert_eq!(be64(&keys[8..]), 0x1122);
        assert_eq!(be64(&keys[16..]), 0x3344);
        assert_eq!(&r.read_reservation()[4..8], &0u32.to_be_bytes());
        r.out(
            B,
            action::RESERVE,
            0,
            kind::EXCLUSIVE_ACCESS,
            &params(0x3344, 0),
        )
        .unwrap();
        let res = r.read_reservation();
        assert_eq!(&res[4..8], &16u32.to_be_bytes());
        assert_eq!(be64(&res[8..]), 0x3344);
        assert_eq!(res[21], kind::EXCLUSIVE_ACCESS);
        // Exclusive access: the other registrant may not even read.
        assert!(r.conflicts(A, Access::Read));
    }

    #[test]
    fn register_checks_the_current_key_and_unregistering_releases() {
        let mut r = Reservations::new();
        register(&mut r, A, 7);
        assert_eq!(
            r.out(A, action::REGISTER, 0, 0, &params(8, 9)),
            Err(PrError::Conflict),
            "wrong current key"
        );
        r.out(A, action::REGISTER_AND_IGNORE, 0, 0, &params(0, 9))
            .unwrap();
        r.out(A, action::RESERVE, 0, kind::WRITE_EXCLUSIVE, &params(9, 0))
            .unwrap();
        assert!(r.conflicts(B, Access::Write));
        // Unregistering (new key 0) drops the reservation it held.
        r.out(A, action::REGISTER, 0, 0, &params(9, 0)).unwrap();
        assert!(!r.conflicts(B, Access::Write));
        assert_eq!(&r.read_keys()[4..8], &0u32.to_be_bytes());
    }

    #[test]
    fn release_clear_and_preempt_tell_the_others() {
        let mut r = Reservations::new();
        register(&mut r, A, 1);
        register(&mut r, B, 2);
        r.out(
            A,
            action::RESERVE,
            0,
            kind::WRITE_EXCLUSIVE_RO,
            &params(1, 0),
        )
        .unwrap();
        // Releasing with another type is refused; the holder's release
        // tells the other registrants.
        assert!(matches!(
            r.out(A, action::RELEASE, 0, kind::WRITE_EXCLUSIVE, &params(1, 0)),
            Err(PrError::Check(s)) if s.asc == Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION
        ));
        let told = r
            .out(
                A,
                action::RELEASE,
                0,
                kind::WRITE_EXCLUSIVE_RO,
                &params(1, 0),
            )
            .unwrap();
        assert_eq!(told, vec![(B, Asc::RESERVATIONS_RELEASED)]);
        // B preempts A: A's registration and reservation are gone.
        r.out(
            A,
            action::RESERVE,
            0,
            kind::WRITE_EXCLUSIVE_RO,
            &params(1, 0),
        )
        .unwrap();
        let told = r
            .out(
                B,
                action::PREEMPT,
                0,
                kind::WRITE_EXCLUSIVE_RO,
                &params(2, 1),
            )
            .unwrap();
        assert_eq!(told, vec![(A, Asc::REGISTRATIONS_PREEMPTED)]);
        assert!(r.conflicts(A, Access::Write));
        assert_eq!(be64(&r.read_reservation()[8..]), 2);
        // Preempting a key nobody holds conflicts.
        assert_eq!(
            r.out(
                B,
                action::PREEMPT,
                0,
                kind::WRITE_EXCLUSIVE_RO,
                &params(2, 99)
            ),
            Err(PrError::Conflict)
        );
        register(&mut r, A, 1);
        let told = r.out(B, action::CLEAR, 0, 0, &params(2, 0)).unwrap();
        assert_eq!(told, vec![(A, Asc::RESERVATIONS_PREEMPTED)]);
        assert_eq!(&r.read_keys()[4..8], &0u32.to_be_bytes());
        assert!(!r.conflicts(C, Access::Write));
    }

    #[test]
    fn malformed_requests_are_refused_with_sense() {
        let mut r = Reservations::new();
        let short = r.out(A, action::REGISTER, 0, 0, &[0; 8]);
        assert!(
            matches!(short, Err(PrError::Check(s)) if s.asc == Asc::PARAMETER_LIST_LENGTH_ERROR)
        );
        let mut spec = params(0, 1);
        spec[20] = 0x08;
        assert!(matches!(
            r.out(A, action::REGISTER, 0, 0, &spec),
            Err(PrError::Check(s)) if s.asc == Asc::INVALID_FIELD_IN_PARAMETER_LIST
        ));
        register(&mut r, A, 1);
        for (scope, kind) in [(1, kind::WRITE_EXCLUSIVE), (0, 2), (0, 9), (0, 0)] {
            assert!(matches!(
                r.out(A, action::RESERVE, scope, kind, &params(1, 0)),
                Err(PrError::Check(s)) if s.asc == Asc::INVALID_FIELD_IN_CDB
            ));
        }
        assert!(matches!(
            r.out(A, 0x07, 0, 0, &params(1, 0)),
            Err(PrError::Check(s)) if s.asc == Asc::INVALID_FIELD_IN_CDB
        ));
    }

    #[test]
    fn all_registrants_share_the_reservation() {
        let mut r = Reservations::new();
        register(&mut r, A, 1);
        register(&mut r, B, 2);
        r.out(
            A,
            action::RESERVE,
            0,
            kind::WRITE_EXCLUSIVE_AR,
            &params(1, 0),
        )
        .unwrap();
        assert!(!r.conflicts(B, Access::Write));
        assert!(r.conflicts(C, Access::Write));
        assert_eq!(be64(&r.read_reservation()[8..]), 0, "no single holder");
        // Until the last registrant leaves.
        r.out(A, action::REGISTER, 0, 0, &params(1, 0)).unwrap();
        assert!(r.conflicts(C, Access::Write));
        r.out(B, action::REGISTER, 0, 0, &params(2, 0)).unwrap();
        assert!(!r.conflicts(C, Access::Write));
    }
}
