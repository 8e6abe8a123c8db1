//! Persistent reservations from the initiator's side (SPC-4 §5.14, §6.15,
//! §6.16): PERSISTENT RESERVE OUT with the basic 24-byte parameter list,
//! and READ KEYS / READ RESERVATION of PERSISTENT RESERVE IN, decoded.
//!
//! Every function runs one command on an idle transport. A registration
//! belongs to the I_T nexus that made it: a host with several paths to a
//! logical unit registers on each.
//!
//! No-panic contract: the PERSISTENT RESERVE IN parsers accept any bytes; a
//! list cut short by the allocation length keeps the keys that fit.

use crate::cdb::Cdb;
use crate::transport::{Command, CommandError, Transport};
use crate::IoBuf;

/// PERSISTENT RESERVE OUT service actions.
pub mod action {
    /// Register, change or remove this nexus's key.
    pub const REGISTER: u8 = 0x00;
    /// Take the reservation.
    pub const RESERVE: u8 = 0x01;
    /// Give up the reservation.
    pub const RELEASE: u8 = 0x02;
    /// Remove every registration and the reservation.
    pub const CLEAR: u8 = 0x03;
    /// Remove other registrations (and take their reservation).
    pub const PREEMPT: u8 = 0x04;
    /// PREEMPT, aborting the preempted initiators' tasks.
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    /// REGISTER without checking the current key.
    pub const REGISTER_AND_IGNORE: u8 = 0x06;
}

/// PERSISTENT RESERVE IN service actions.
pub mod read {
    /// The registered keys.
    pub const KEYS: u8 = 0x00;
    /// The reservation.
    pub const RESERVATION: u8 = 0x01;
    /// What this device supports.
    pub const CAPABILITIES: u8 = 0x02;
}

/// Reservation types.
pub mod kind {
    /// Write Exclusive.
    pub const WRITE_EXCLUSIVE: u8 = 1;
    /// Exclusive Access.
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    /// Write Exclusive – Registrants Only.
    pub const WRITE_EXCLUSIVE_RO: u8 = 5;
    /// Exclusive Access – Registrants Only.
    pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
    /// Write Exclusive – All Registrants.
    pub const WRITE_EXCLUSIVE_AR: u8 = 7;
    /// Exclusive Access – All Registrants.
    pub const EXCLUSIVE_ACCESS_AR: u8 = 8;

    /// The type's name.
    pub fn name(t: u8) -> &'static str {
        match t {
            WRITE_EXCLUSIVE => "Write Exclusive",
            EXCLUSIVE_ACCESS => "Exclusive Access",
            WRITE_EXCLUSIVE_RO => "Write Exclusive - Registrants Only",
            EXCLUSIVE_ACCESS_RO => "Exclusive Access - Registrants Only",
            WRITE_EXCLUSIVE_AR => "Write Exclusive - All Registrants",
            EXCLUSIVE_ACCESS_AR => "Exclusive Access - All Registrants",
            _ => "unknown type",
        }
    }
}

/// The current reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The holder's key.
    pub key: u64,
    /// The type ([`kind`]).
    pub kind: u8,
}

/// Sends PERSISTENT RESERVE OUT `service_action` with reservation type
/// `kind`, RESERVATION KEY `key` and SERVICE ACTION RESERVATION KEY
/// `sa_key` (the new key of a REGISTER, the victim of a PREEMPT).
pub fn out(
    t: &mut dyn Transport,
    service_action: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
) -> Result<(), CommandError> {
    let cdb = Cdb::PersistentReserveOut {
        service_action,
        scope: 0,
        pr_type: kind,
        param_len: 24,
    }
    .emit();
    let mut params = [0u8; 24];
    params[..8].copy_from_slice(&key.to_be_bytes());
    params[8..16].copy_from_slice(&sa_key.to_be_bytes());
    t.execute(Command::data_out(cdb, IoBuf::from_slice(&params)))
        .into_result()
        .map(|_| ())
}

fn pr_in(t: &mut dyn Transport, service_action: u8) -> Result<Vec<u8>, CommandError> {
    const ALLOC: u16 = 8192;
    let cdb = Cdb::PersistentReserveIn {
        service_action,
        alloc_len: ALLOC,
    }
    .emit();
    let (data, _) = t
        .execute(Command::data_in(cdb, ALLOC.into()))
        .into_result()?;
    Ok(data.to_vec())
}

/// Decodes READ KEYS data: (PRgeneration, the keys).
pub fn parse_keys(data: &[u8]) -> (u32, Vec<u64>) {
    let word = |at: usize| {
        data.get(at..at + 4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let len = word(4) as usize;
    let end = data.len().min(8usize.saturating_add(len));
    let keys = data
        .get(8..end.max(8))
        .unwrap_or_default()
        .chunks_exact(8)
        .map(|k| u64::from_be_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]))
        .collect();
    (word(0), keys)
}

/// Decodes READ RESERVATION data: the reservation, if one is held.
pub fn parse_reservation(data: &[u8]) -> Option<Reservation> {
    let len = data
        .get(4..8)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if len < 16 {
        return None;
    }
    let d = data.get(8..24)?;
    Some(Reservation {
        key: u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]),
        kind: d[13] & 0x0F,
    })
}

/// The registered keys (READ KEYS).
pub fn read_keys(t: &mut dyn Transport) -> Result<Vec<u64>, CommandError> {
    Ok(parse_keys(&pr_in(t, 0)?).1)
}

/// The reservation (READ RESERVATION).
pub fn read_reservation(t: &mut dyn Transport) -> Result<Option<Reservation>, CommandError> {
    Ok(parse_reservation(&pr_in(t, 1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literal_keys_and_reservation() {
        #[rustfmt::skip]
        let keys = [0, 0, 0, 3,  0, 0, 0, 16,  0, 0, 0, 0, 0, 0, 0, 0xA1,  0, 0, 0, 0, 0, 0, 0, 0xB2];
        assert_eq!(parse_keys(&keys), (3, vec![0xA1, 0xB2]));
        assert_eq!(parse_keys(&keys[..20]), (3, vec![0xA1]));
        #[rustfmt::skip]
        let res = [0, 0, 0, 3,  0, 0, 0, 16,  0, 0, 0, 0, 0, 0, 0, 0xA1,  0, 0, 0, 0,  0, 0x05, 0, 0];
        assert_eq!(
            parse_reservation(&res),
            Some(Reservation {
                key: 0xA1,
                kind: kind::WRITE_EXCLUSIVE_RO
            })
        );
        assert_eq!(parse_reservation(&[0, 0, 0, 3, 0, 0, 0, 0]), None);
        assert_eq!(kind::name(5), "Write Exclusive - Registrants Only");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_keys(&data);
            let _ = parse_reservation(&data);
        }
    }
}
