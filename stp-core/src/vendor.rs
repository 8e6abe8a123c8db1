//! The vendor command set (docs/PROTOCOL.md §3), shared by hosts and the
//! array: opcodes, CDB builders, the data layouts of STG INFO, BIND and
//! PORT STATUS, and the vendor sense codes of §3.1 with their meanings.
//!
//! Hosts build CDBs with [`bind`], [`release`], [`send`], [`receive`],
//! [`port_status`] and [`stg_info`], parse the data-in with
//! [`StgInfo::parse`], [`BindResult::parse`] and [`PortStatus::parse`], and
//! turn a failed command into a [`MailboxError`] with [`classify`]. The
//! array emits the same layouts with `to_bytes` and the same sense with
//! [`MailboxError::to_sense`], so both sides share one definition.
//!
//! No-panic contract: every `parse` accepts any bytes.

use std::ops::RangeInclusive;
use std::time::Duration;

use scsi::cdb::VendorCdb;
use scsi::{Asc, DataDirection, Opcode};

/// STG INFO: describe the transport group this LUN belongs to (data-in).
pub const STG_INFO: Opcode = Opcode(0xC0);
/// BIND: bind a port, get a binding handle (data-in, 16 bytes).
pub const BIND: Opcode = Opcode(0xC1);
/// RELEASE: release a binding (no data).
pub const RELEASE: Opcode = Opcode(0xC2);
/// SEND: queue frames (data-out).
pub const SEND: Opcode = Opcode(0xC3);
/// RECEIVE: take queued frames, possibly waiting for them (data-in).
pub const RECEIVE: Opcode = Opcode(0xC4);
/// PORT STATUS: a binding's counters (data-in, 32 bytes).
pub const PORT_STATUS: Opcode = Opcode(0xC5);

/// The six STP opcodes, in opcode order.
pub const OPCODES: [Opcode; 6] = [STG_INFO, BIND, RELEASE, SEND, RECEIVE, PORT_STATUS];

/// The data direction of an STP opcode; `None` for any other opcode.
pub fn direction(op: Opcode) -> Option<DataDirection> {
    Some(match op {
        STG_INFO | BIND | RECEIVE | PORT_STATUS => DataDirection::FromDevice,
        RELEASE => DataDirection::None,
        SEND => DataDirection::ToDevice,
        _ => return None,
    })
}

/// The name of an STP opcode (`"STG INFO"`, …); `None` for any other opcode.
pub fn name(op: Opcode) -> Option<&'static str> {
    Some(match op {
        STG_INFO => "STG INFO",
        BIND => "BIND",
        RELEASE => "RELEASE",
        SEND => "SEND",
        RECEIVE => "RECEIVE",
        PORT_STATUS => "PORT STATUS",
        _ => return None,
    })
}

/// ILLEGAL REQUEST 80h/01h: destination port not bound (information = port).
pub const ASC_PORT_NOT_BOUND: Asc = Asc(0x80, 0x01);
/// ILLEGAL REQUEST 80h/02h: unknown binding handle.
pub const ASC_BAD_HANDLE: Asc = Asc(0x80, 0x02);
/// ILLEGAL REQUEST 80h/03h: port already bound.
pub const ASC_PORT_IN_USE: Asc = Asc(0x80, 0x03);
/// ILLEGAL REQUEST 80h/04h: no free dynamic port.
pub const ASC_NO_FREE_PORTS: Asc = Asc(0x80, 0x04);
/// ILLEGAL REQUEST 80h/05h: malformed frame in SEND data (information = offset).
pub const ASC_MALFORMED_FRAME: Asc = Asc(0x80, 0x05);
/// ILLEGAL REQUEST 80h/06h: a frame's `src_port` is not the sender's port
/// (information = offset).
pub const ASC_SOURCE_PORT_MISMATCH: Asc = Asc(0x80, 0x06);
/// ILLEGAL REQUEST 80h/07h: first queued frame larger than the RECEIVE
/// allocation (information = bytes needed).
pub const ASC_FRAME_TOO_LARGE: Asc = Asc(0x80, 0x07);
/// ABORTED COMMAND 80h/08h: destination queue full (information = port).
pub const ASC_QUEUE_FULL: Asc = Asc(0x80, 0x08);
/// ABORTED COMMAND 80h/09h: binding released while this RECEIVE waited.
pub const ASC_RELEASED: Asc = Asc(0x80, 0x09);

/// Static ports: bound by a server that was configured with one.
pub const STATIC_PORTS: RangeInclusive<u32> = 1..=32767;
/// Dynamic ports: allocated by BIND with port 0.
pub const DYNAMIC_PORTS: RangeInclusive<u32> = 32768..=65535;
/// The highest valid port; 65536 and above are reserved.
pub const MAX_PORT: u32 = 65535;

/// The largest transfer length a vendor CDB can carry (24 bits).
pub const MAX_TRANSFER: u32 = VendorCdb::MAX_LENGTH;

/// `"STGI"`, the magic of STG INFO data.
pub const STG_INFO_MAGIC: u32 = 0x5354_4749;
/// The protocol version the array reports in STG INFO: the frame format
/// it routes (docs/PROTOCOL.md §9).
pub const PROTOCOL_VERSION: u8 = crate::wire::VERSION;
/// Bytes of the STG INFO header.
pub const STG_INFO_HEADER_LEN: usize = 32;
/// Bytes per member in STG INFO.
pub const STG_INFO_MEMBER_LEN: usize = 16;
/// Bytes of BIND data-in.
pub const BIND_LEN: usize = 16;
/// Bytes of PORT STATUS data-in.
pub const PORT_STATUS_LEN: usize = 32;

/// The unit of the RECEIVE long-poll timeout.
pub const TIMEOUT_UNIT: Duration = Duration::from_millis(100);
/// RECEIVE flags bits holding the timeout (bits 0–6).
pub const TIMEOUT_MASK: u8 = 0x7F;
/// The longest RECEIVE long poll: 127 × 100 ms.
pub const MAX_RECEIVE_TIMEOUT: Duration = Duration::from_millis(100 * TIMEOUT_MASK as u64);

/// STG INFO with allocation `alloc` (use [`StgInfo::len_for`] for a known
/// member count; a short allocation returns the data cut to fit).
pub fn stg_info(alloc: u32) -> VendorCdb {
    cdb(STG_INFO, 0, 0, alloc)
}

/// BIND `port`; 0 asks for the lowest free dynamic port.
pub fn bind(port: u32) -> VendorCdb {
    cdb(BIND, 0, port, BIND_LEN as u32)
}

/// BIND flags bit 0, `ADD`: bind a dynamic port to the queue of the binding
/// whose handle the CDB carries, rather than a port of its own
/// (docs/PROTOCOL.md §3.2). The reply names the new port and a handle of
/// its own for it (SEND from it, RELEASE it alone).
pub const BIND_ADD: u8 = 0x01;

/// BIND a dynamic port to the queue of the binding `handle` (flag
/// [`BIND_ADD`]): frames addressed to the new port are received with
/// RECEIVE on `handle`.
pub fn bind_add(handle: u32) -> VendorCdb {
    cdb(BIND, BIND_ADD, handle, BIND_LEN as u32)
}

/// RELEASE the binding `handle`.
pub fn release(handle: u32) -> VendorCdb {
    cdb(RELEASE, 0, handle, 0)
}

/// SEND `len` bytes of packed frames from the binding `handle`.
///
/// `len` must not exceed [`MAX_TRANSFER`]; a larger value is carried masked
/// to 24 bits, which the array refuses (INVALID FIELD IN CDB, byte 6)
/// because it no longer matches the data buffer.
pub fn send(handle: u32, len: u32) -> VendorCdb {
    cdb(SEND, 0, handle, len)
}

/// RECEIVE up to `len` bytes for the binding `handle`, waiting at most
/// `timeout` for a frame to arrive (rounded up to 100 ms, clamped to
/// [`MAX_RECEIVE_TIMEOUT`]; zero returns at once). `len` as for [`send`].
pub fn receive(handle: u32, len: u32, timeout: Duration) -> VendorCdb {
    cdb(RECEIVE, timeout_flags(timeout), handle, len)
}

/// PORT STATUS of the binding `handle`.
pub fn port_status(handle: u32) -> VendorCdb {
    cdb(PORT_STATUS, 0, handle, PORT_STATUS_LEN as u32)
}

fn cdb(opcode: Opcode, flags: u8, handle: u32, length: u32) -> VendorCdb {
    VendorCdb {
        opcode,
        flags,
        handle,
        length,
        control: 0,
    }
}

/// The RECEIVE flags byte for a long-poll `timeout`: 100 ms units, rounded
/// up, clamped to 127 units (12.7 s).
pub fn timeout_flags(timeout: Duration) -> u8 {
    let unit = TIMEOUT_UNIT.as_nanos();
    let units = timeout.as_nanos().div_ceil(unit);
    units.min(u128::from(TIMEOUT_MASK)) as u8
}

/// The long-poll timeout RECEIVE flags carry (bit 7 is ignored).
pub fn receive_timeout(flags: u8) -> Duration {
    TIMEOUT_UNIT * u32::from(flags & TIMEOUT_MASK)
}

/// Why vendor-command data could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VendorError {
    /// Fewer bytes than the layout needs.
    #[error(
        "{what} data is {got} bytes, need {need}; retry with an allocation of at least {need}"
    )]
    Short {
        /// Which layout.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// STG INFO without its magic: the LUN's array does not speak STP.
    #[error(
        "STG INFO magic is 0x{0:08x}, not \"STGI\"; the array does not implement STP vendor mode"
    )]
    BadMagic(u32),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

fn need(what: &'static str, bytes: &[u8], need: usize) -> Result<(), VendorError> {
    if bytes.len() < need {
        return Err(VendorError::Short {
            what,
            got: bytes.len(),
            need,
        });
    }
    Ok(())
}

/// STG INFO data: the group this LUN belongs to and its members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StgInfo {
    /// The array's protocol version.
    pub version: u8,
    /// This LUN's index among the members.
    pub member_index: u16,
    /// The STG id.
    pub stg_id: u32,
    /// The largest frame payload the array accepts.
    pub max_payload: u32,
    /// Per-port queue limit in bytes.
    pub queue_bytes: u32,
    /// Per-port queue limit in frames.
    pub queue_frames: u32,
    /// The NAA designator of each member, in member order; its length is
    /// the STG's length.
    pub members: Vec<[u8; 16]>,
}

impl StgInfo {
    /// Bytes of STG INFO data for an STG of `members` members.
    pub fn len_for(members: u32) -> usize {
        STG_INFO_HEADER_LEN + STG_INFO_MEMBER_LEN * members as usize
    }

    /// Parses STG INFO data. A buffer cut short by a small allocation fails
    /// with [`VendorError::Short`] naming the allocation that fits.
    pub fn parse(bytes: &[u8]) -> Result<StgInfo, VendorError> {
        need("STG INFO", bytes, STG_INFO_HEADER_LEN)?;
        let magic = be32(bytes, 0);
        if magic != STG_INFO_MAGIC {
            return Err(VendorError::BadMagic(magic));
        }
        let count = be32(bytes, 12);
        // Checked so that a hostile count cannot overflow on 32-bit hosts.
        let total = (count as usize)
            .checked_mul(STG_INFO_MEMBER_LEN)
            .and_then(|n| n.checked_add(STG_INFO_HEADER_LEN))
            .unwrap_or(usize::MAX);
        need("STG INFO", bytes, total)?;
        let members = bytes[STG_INFO_HEADER_LEN..total]
            .chunks_exact(STG_INFO_MEMBER_LEN)
            .map(|c| {
                let mut naa = [0u8; 16];
                naa.copy_from_slice(c);
                naa
            })
            .collect();
        Ok(StgInfo {
            version: bytes[4],
            member_index: be16(bytes, 6),
            stg_id: be32(bytes, 8),
            max_payload: be32(bytes, 16),
            queue_bytes: be32(bytes, 20),
            queue_frames: be32(bytes, 24),
            members,
        })
    }

    /// The wire bytes (header, then one NAA per member).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(StgInfo::len_for(self.members.len() as u32));
        b.extend_from_slice(&STG_INFO_MAGIC.to_be_bytes());
        b.push(self.version);
        b.push(0);
        b.extend_from_slice(&self.member_index.to_be_bytes());
        b.extend_from_slice(&self.stg_id.to_be_bytes());
        b.extend_from_slice(&(self.members.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.max_payload.to_be_bytes());
        b.extend_from_slice(&self.queue_bytes.to_be_bytes());
        b.extend_from_slice(&self.queue_frames.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        for naa in &self.members {
            b.extend_from_slice(naa);
        }
        b
    }
}

/// BIND data: the binding the array made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BindResult {
    /// The bound port.
    pub port: u32,
    /// The binding handle: the capability RELEASE, SEND, RECEIVE and PORT
    /// STATUS name the binding by.
    pub handle: u32,
    /// Per-port queue limit in bytes.
    pub queue_bytes: u32,
    /// Per-port queue limit in frames.
    pub queue_frames: u32,
}

impl BindResult {
    /// Parses BIND data.
    pub fn parse(bytes: &[u8]) -> Result<BindResult, VendorError> {
        need("BIND", bytes, BIND_LEN)?;
        Ok(BindResult {
            port: be32(bytes, 0),
            handle: be32(bytes, 4),
            queue_bytes: be32(bytes, 8),
            queue_frames: be32(bytes, 12),
        })
    }

    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; BIND_LEN] {
        let mut b = [0u8; BIND_LEN];
        b[0..4].copy_from_slice(&self.port.to_be_bytes());
        b[4..8].copy_from_slice(&self.handle.to_be_bytes());
        b[8..12].copy_from_slice(&self.queue_bytes.to_be_bytes());
        b[12..16].copy_from_slice(&self.queue_frames.to_be_bytes());
        b
    }
}

/// PORT STATUS data: a binding's queue and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortStatus {
    /// The bound port.
    pub port: u32,
    /// Frames waiting in the port's queue.
    pub queued_frames: u32,
    /// Bytes those frames occupy (their aligned spans).
    pub queued_bytes: u32,
    /// RECEIVEs waiting on the binding.
    pub waiting_receives: u32,
    /// Frames addressed to the port that the array accepted since BIND.
    pub frames_accepted: u64,
    /// Frames handed to RECEIVEs since BIND.
    pub frames_delivered: u64,
}

impl PortStatus {
    /// Parses PORT STATUS data.
    pub fn parse(bytes: &[u8]) -> Result<PortStatus, VendorError> {
        need("PORT STATUS", bytes, PORT_STATUS_LEN)?;
        Ok(PortStatus {
            port: be32(bytes, 0),
            queued_frames: be32(bytes, 4),
            queued_bytes: be32(bytes, 8),
            waiting_receives: be32(bytes, 12),
            frames_accepted: be64(bytes, 16),
            frames_delivered: be64(bytes, 24),
        })
    }

    /// The wire bytes.
    pub fn to_bytes(&self) -> [u8; PORT_STATUS_LEN] {
        let mut b = [0u8; PORT_STATUS_LEN];
        b[0..4].copy_from_slice(&self.port.to_be_bytes());
        b[4..8].copy_from_slice(&self.queued_frames.to_be_bytes());
        b[8..12].copy_from_slice(&self.queued_bytes.to_be_bytes());
        b[12..16].copy_from_slice(&self.waiting_receives.to_be_bytes());
        b[16..24].copy_from_slice(&self.frames_accepted.to_be_bytes());
        b[24..32].copy_from_slice(&self.frames_delivered.to_be_bytes());
        b
    }
}

pub use crate::error::{classify, refusal, MailboxError, Refusal};

#[cfg(test)]
mod tests {
    use super::*;
    use scsi::{Asc, Cdb, CommandError, Sense, SenseKey};

    #[test]
    fn directions_cover_exactly_the_six_opcodes() {
        for op in 0..=0xFFu8 {
            let op = Opcode(op);
            assert_eq!(direction(op).is_some(), OPCODES.contains(&op), "{op:?}");
            assert_eq!(name(op).is_some(), OPCODES.contains(&op));
        }
        assert_eq!(direction(SEND), Some(DataDirection::ToDevice));
        assert_eq!(direction(RELEASE), Some(DataDirection::None));
        assert_eq!(direction(RECEIVE), Some(DataDirection::FromDevice));
        assert_eq!(direction(Opcode(0xC9)), None);
    }

    #[test]
    fn cdb_literal_bytes() {
        let b = Cdb::from(bind(5100)).emit();
        assert_eq!(b.as_slice(), &[0xC1, 0, 0, 0, 0x13, 0xEC, 0, 0, 16, 0]);
        let b = Cdb::from(bind_add(0xDEAD_BEEF)).emit();
        assert_eq!(
            b.as_slice(),
            &[0xC1, 1, 0xDE, 0xAD, 0xBE, 0xEF, 0, 0, 16, 0]
        );
        let b = Cdb::from(send(0xDEAD_BEEF, 0x01_0203)).emit();
        assert_eq!(b.as_slice(), &[0xC3, 0, 0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3, 0]);
        let b = Cdb::from(receive(7, 4096, Duration::from_millis(250))).emit();
        assert_eq!(b.as_slice(), &[0xC4, 3, 0, 0, 0, 7, 0, 0x10, 0, 0]);
        let b = Cdb::from(release(9)).emit();
        assert_eq!(b.as_slice(), &[0xC2, 0, 0, 0, 0, 9, 0, 0, 0, 0]);
        let b = Cdb::from(port_status(9)).emit();
        assert_eq!(b.as_slice(), &[0xC5, 0, 0, 0, 0, 9, 0, 0, 32, 0]);
        let b = Cdb::from(stg_info(64)).emit();
        assert_eq!(b.as_slice(), &[0xC0, 0, 0, 0, 0, 0, 0, 0, 64, 0]);
        // Builders agree with the parser.
        let c = receive(1, 2, Duration::from_secs(1));
        assert_eq!(
            Cdb::parse(Cdb::from(c).emit().as_slice()),
            Ok(Cdb::Vendor(c))
        );
    }

    #[test]
    fn timeout_encoding() {
        assert_eq!(timeout_flags(Duration::ZERO), 0);
        assert_eq!(timeout_flags(Duration::from_nanos(1)), 1);
        assert_eq!(timeout_flags(Duration::from_millis(100)), 1);
        assert_eq!(timeout_flags(Duration::from_millis(101)), 2);
        assert_eq!(timeout_flags(Duration::from_millis(12_700)), 127);
        assert_eq!(timeout_flags(Duration::from_secs(3600)), 127);
        assert_eq!(timeout_flags(Duration::MAX), 127);
        assert_eq!(receive_timeout(0), Duration::ZERO);
        assert_eq!(receive_timeout(5), Duration::from_millis(500));
        assert_eq!(receive_timeout(0xFF), MAX_RECEIVE_TIMEOUT);
        for f in 0..=TIMEOUT_MASK {
            assert_eq!(timeout_flags(receive_timeout(f)), f);
        }
    }

    fn sample_info() -> StgInfo {
        StgInfo {
            version: 1,
            member_index: 2,
            stg_id: 7,
            max_payload: 65536,
            queue_bytes: 0x0010_0000,
            queue_frames: 64,
            members: vec![[0x60; 16], [0x61; 16], [0x62; 16]],
        }
    }

    #[test]
    fn stg_info_literal_bytes_and_round_trip() {
        let info = sample_info();
        let b = info.to_bytes();
        assert_eq!(b.len(), StgInfo::len_for(3));
        assert_eq!(&b[0..8], &[0x53, 0x54, 0x47, 0x49, 1, 0, 0, 2]);
        assert_eq!(&b[8..16], &[0, 0, 0, 7, 0, 0, 0, 3]);
        assert_eq!(
            &b[16..32],
            &[0, 1, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0]
        );
        assert_eq!(&b[32..48], &[0x60; 16]);
        assert_eq!(&b[64..80], &[0x62; 16]);
        assert_eq!(StgInfo::parse(&b), Ok(info));
    }

    #[test]
    fn stg_info_errors() {
        let b = sample_info().to_bytes();
        assert_eq!(
            StgInfo::parse(&b[..40]),
            Err(VendorError::Short {
                what: "STG INFO",
                got: 40,
                need: 80
            })
        );
        assert!(matches!(
            StgInfo::parse(&b[..31]),
            Err(VendorError::Short { need: 32, .. })
        ));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(matches!(
            StgInfo::parse(&bad),
            Err(VendorError::BadMagic(_))
        ));
        let mut huge = b;
        huge[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            StgInfo::parse(&huge),
            Err(VendorError::Short { .. })
        ));
    }

    #[test]
    fn bind_and_port_status_literal_bytes() {
        let r = BindResult {
            port: 32768,
            handle: 0x0102_0304,
            queue_bytes: 4096,
            queue_frames: 16,
        };
        let b = r.to_bytes();
        assert_eq!(b, [0, 0, 0x80, 0, 1, 2, 3, 4, 0, 0, 0x10, 0, 0, 0, 0, 16]);
        assert_eq!(BindResult::parse(&b), Ok(r));
        assert!(BindResult::parse(&b[..15]).is_err());

        let s = PortStatus {
            port: 5100,
            queued_frames: 2,
            queued_bytes: 160,
            waiting_receives: 1,
            frames_accepted: 0x0102_0304_0506_0708,
            frames_delivered: 9,
        };
        let b = s.to_bytes();
        assert_eq!(
            &b[0..16],
            &[0, 0, 0x13, 0xEC, 0, 0, 0, 2, 0, 0, 0, 160, 0, 0, 0, 1]
        );
        assert_eq!(&b[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..32], &[0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(PortStatus::parse(&b), Ok(s));
        assert!(PortStatus::parse(&b[..31]).is_err());
    }

    fn all_errors() -> Vec<MailboxError> {
        vec![
            MailboxError::Refused(Refusal::PortNotBound(40001)),
            MailboxError::Refused(Refusal::BadHandle),
            MailboxError::Refused(Refusal::PortInUse),
            MailboxError::Refused(Refusal::NoFreePorts),
            MailboxError::Refused(Refusal::MalformedFrame { offset: 80 }),
            MailboxError::Refused(Refusal::SourcePortMismatch { offset: 160 }),
            MailboxError::Refused(Refusal::FrameTooLarge { needed: 4168 }),
            MailboxError::Refused(Refusal::QueueFull { port: 32768 }),
            MailboxError::Refused(Refusal::Released),
            MailboxError::Refused(Refusal::NotAnStgMember),
        ]
    }

    #[test]
    fn classify_round_trips_through_sense_bytes() {
        for e in all_errors() {
            let sense = e.to_sense().unwrap();
            // Through the wire: fixed-format bytes and back.
            let parsed = Sense::parse(&sense.to_bytes()).unwrap();
            let back = classify(CommandError::CheckCondition(parsed));
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
            assert_eq!(
                back.is_retryable(),
                matches!(e, MailboxError::Refused(Refusal::QueueFull { .. }))
            );
        }
    }

    #[test]
    fn sense_literal_bytes() {
        let b = MailboxError::Refused(Refusal::QueueFull { port: 32768 })
            .to_sense()
            .unwrap()
            .to_bytes();
        assert_eq!(b[0], 0xF0); // VALID | current, fixed
        assert_eq!(b[2], 0x0B); // ABORTED COMMAND
        assert_eq!(&b[3..7], &[0, 0, 0x80, 0]);
        assert_eq!((b[12], b[13]), (0x80, 0x08));
        let b = MailboxError::Refused(Refusal::BadHandle)
            .to_sense()
            .unwrap()
            .to_bytes();
        assert_eq!((b[0], b[2], b[12], b[13]), (0x70, 0x05, 0x80, 0x02));
    }

    #[test]
    fn classify_other() {
        // The vendor ASC under the wrong key is someone else's condition.
        let s = Sense::new(SenseKey::ILLEGAL_REQUEST, ASC_QUEUE_FULL);
        assert!(matches!(
            classify(CommandError::CheckCondition(s)),
            MailboxError::Transport(_)
        ));
        assert!(classify(CommandError::Busy).is_retryable());
        assert!(matches!(
            classify(CommandError::Timeout(Duration::from_secs(1))),
            MailboxError::Transport(CommandError::Timeout(_))
        ));
        let ua = Sense::new(SenseKey::UNIT_ATTENTION, Asc::POWER_ON_OCCURRED);
        let e = classify(CommandError::CheckCondition(ua));
        // A power-on UA says bindings *may* be gone: retry, do not give up.
        assert!(!e.binding_lost());
        assert!(matches!(&e, MailboxError::Transport(c) if c.is_retryable()));
        assert!(MailboxError::Refused(Refusal::BadHandle).binding_lost());
        assert!(MailboxError::Refused(Refusal::Released).binding_lost());
        assert!(!MailboxError::Refused(Refusal::Released).is_retryable());
        assert!(!MailboxError::Refused(Refusal::PortNotBound(1)).binding_lost());
        // Missing information reads as 0.
        let s = Sense::new(SenseKey::ILLEGAL_REQUEST, ASC_PORT_NOT_BOUND);
        assert!(matches!(
            classify(CommandError::CheckCondition(s)),
            MailboxError::Refused(Refusal::PortNotBound(0))
        ));
    }
}
