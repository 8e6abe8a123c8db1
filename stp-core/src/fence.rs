//! Fencing a block-mode STG with SCSI persistent reservations: only the
//! participating hosts may write its members.
//!
//! Each participating host registers a reservation key on every member,
//! through every path it has (a registration belongs to one I_T nexus),
//! and the members are reserved **Write Exclusive – Registrants Only**:
//! every registered host reads and writes, any other initiator may read but
//! its WRITE ends in RESERVATION CONFLICT.
//!
//! Keys are derived, not secret: host `h` of STG `s` registers
//! [`host_key`]`(s, h)` (`"SP"`, the STG id, the host index), so a host can
//! name another in [`remove`] and `stp stg fence status` can say whose key
//! it sees.
//!
//! * [`join`] — this host registers on every path of every member; the
//!   first to join also takes the reservation.
//! * [`remove`] — a participating host PREEMPTs another's key: that host's
//!   registrations go (all its paths), and if it held the reservation, the
//!   remover now holds it; its WRITEs conflict from then on.
//! * [`leave`] — this host unregisters. If it held the reservation, the
//!   array releases it (Registrants Only types end with their holder):
//!   another participant runs `join` again to take it back.
//! * [`status`] — keys and reservation of every member.

use scsi::pr::{kind, Reservation};
use scsi::{CommandError, Transport};

use crate::retry::{Op, RetryPolicy};

/// The PERSISTENT RESERVE commands under the one retry policy: a unit
/// attention (reservations preempted or released, a reset) or BUSY is
/// passed, nothing else is retried.
mod pr {
    use super::*;
    pub use scsi::pr::action;

    pub fn out(
        t: &mut dyn Transport,
        sa: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<(), CommandError> {
        RetryPolicy::default().run(Op::Other, || scsi::pr::out(t, sa, kind, key, sa_key))
    }

    pub fn read_keys(t: &mut dyn Transport) -> Result<Vec<u64>, CommandError> {
        RetryPolicy::default().run(Op::Query, || scsi::pr::read_keys(t))
    }

    pub fn read_reservation(t: &mut dyn Transport) -> Result<Option<Reservation>, CommandError> {
        RetryPolicy::default().run(Op::Query, || scsi::pr::read_reservation(t))
    }
}

/// The first two bytes of every STP reservation key.
const MAGIC: u64 = 0x5350;

/// The reservation type STP uses.
pub const KIND: u8 = kind::WRITE_EXCLUSIVE_RO;

/// The reservation key of host `host` of STG `stg`.
pub fn host_key(stg: u32, host: u16) -> u64 {
    MAGIC << 48 | u64::from(stg) << 16 | u64::from(host)
}

/// The host whose key `key` is, if it is an STP key of STG `stg`.
pub fn key_host(stg: u32, key: u64) -> Option<u16> {
    (key >> 48 == MAGIC && (key >> 16) as u32 == stg).then_some(key as u16)
}

/// Why a fencing step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FenceError {
    /// A PERSISTENT RESERVE command failed on a member's path.
    #[error("member {member} path {path}: {what}: {source}")]
    Command {
        /// The member index.
        member: usize,
        /// The path's name.
        path: String,
        /// The step.
        what: &'static str,
        /// The failure.
        #[source]
        source: CommandError,
    },
    /// A member is reserved with another type or by a key that is not an
    /// STP host's: somebody else fences it.
    #[error(
        "member {member} is reserved by key {key:#018x} ({}), not by an STP host of this STG: \
         it is fenced by somebody else; find the owner before clearing it",
        kind::name(*kind)
    )]
    ForeignReservation {
        /// The member index.
        member: usize,
        /// The holder's key.
        key: u64,
        /// The reservation type.
        kind: u8,
    },
    /// A member has no path.
    #[error("member {member} has no path on this host")]
    NoPath {
        /// The member index.
        member: usize,
    },
}

fn step(
    member: usize,
    t: &dyn Transport,
    what: &'static str,
) -> impl FnOnce(CommandError) -> FenceError {
    let path = t.describe();
    move |source| FenceError::Command {
        member,
        path,
        what,
        source,
    }
}

/// Registers host `host`'s key on every path of every member (`members[i]`
/// holds member `i`'s paths), then reserves each member not yet reserved.
pub fn join(
    members: &mut [Vec<Box<dyn Transport>>],
    stg: u32,
    host: u16,
) -> Result<(), FenceError> {
    let key = host_key(stg, host);
    for (member, paths) in members.iter_mut().enumerate() {
        if paths.is_empty() {
            return Err(FenceError::NoPath { member });
        }
        for t in paths.iter_mut() {
            pr::out(t.as_mut(), pr::action::REGISTER_AND_IGNORE, 0, 0, key).map_err(step(
                member,
                t.as_ref(),
                "REGISTER AND IGNORE EXISTING KEY",
            ))?;
        }
        let t = &mut paths[0];
        let held = pr::read_reservation(t.as_mut()).map_err(step(
            member,
            t.as_ref(),
            "READ RESERVATION",
        ))?;
        match held {
            None => pr::out(t.as_mut(), pr::action::RESERVE, KIND, key, 0).map_err(step(
                member,
                t.as_ref(),
                "RESERVE",
            ))?,
            Some(Reservation { key: k, kind: KIND }) if key_host(stg, k).is_some() => {}
            Some(r) => {
                return Err(FenceError::ForeignReservation {
                    member,
                    key: r.key,
                    kind: r.kind,
                })
            }
        }
    }
    Ok(())
}

/// Host `host` (registered) removes host `victim`: PREEMPT of the victim's
/// key on every member.
pub fn remove(
    members: &mut [Vec<Box<dyn Transport>>],
    stg: u32,
    host: u16,
    victim: u16,
) -> Result<(), FenceError> {
    for (member, paths) in members.iter_mut().enumerate() {
        let t = paths.first_mut().ok_or(FenceError::NoPath { member })?;
        pr::out(
            t.as_mut(),
            pr::action::PREEMPT,
            KIND,
            host_key(stg, host),
            host_key(stg, victim),
        )
        .map_err(step(member, t.as_ref(), "PREEMPT"))?;
    }
    Ok(())
}

/// Host `host` unregisters on every path of every member.
pub fn leave(
    members: &mut [Vec<Box<dyn Transport>>],
    stg: u32,
    host: u16,
) -> Result<(), FenceError> {
    let key = host_key(stg, host);
    for (member, paths) in members.iter_mut().enumerate() {
        for t in paths.iter_mut() {
            pr::out(t.as_mut(), pr::action::REGISTER, 0, key, 0).map_err(step(
                member,
                t.as_ref(),
                "REGISTER (unregister)",
            ))?;
        }
    }
    Ok(())
}

/// What one member's reservations are.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemberFence {
    /// The registered keys (one per registered nexus).
    pub keys: Vec<u64>,
    /// The reservation, if any.
    pub reservation: Option<(u64, u8)>,
}

impl MemberFence {
    /// The STP hosts of STG `stg` registered, ascending, without repeats.
    pub fn hosts(&self, stg: u32) -> Vec<u16> {
        let mut h: Vec<u16> = self.keys.iter().filter_map(|k| key_host(stg, *k)).collect();
        h.sort_unstable();
        h.dedup();
        h
    }

    /// Whether the member is fenced as STP fences it: reserved Write
    /// Exclusive – Registrants Only by an STP host of `stg`.
    pub fn fenced(&self, stg: u32) -> bool {
        matches!(self.reservation, Some((k, KIND)) if key_host(stg, k).is_some())
    }
}

/// Reads every member's keys and reservation through its first path.
pub fn status(members: &mut [Vec<Box<dyn Transport>>]) -> Result<Vec<MemberFence>, FenceError> {
    members
        .iter_mut()
        .enumerate()
        .map(|(member, paths)| {
            let t = paths.first_mut().ok_or(FenceError::NoPath { member })?;
            let keys = pr::read_keys(t.as_mut()).map_err(step(member, t.as_ref(), "READ KEYS"))?;
            let reservation = pr::read_reservation(t.as_mut())
                .map_err(step(member, t.as_ref(), "READ RESERVATION"))?
                .map(|r| (r.key, r.kind));
            Ok(MemberFence { keys, reservation })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_host() {
        let k = host_key(7, 3);
        assert_eq!(k, 0x5350_0000_0007_0003);
        assert_eq!(key_host(7, k), Some(3));
        assert_eq!(key_host(8, k), None);
        assert_eq!(key_host(7, 0xA1), None);
    }
}
