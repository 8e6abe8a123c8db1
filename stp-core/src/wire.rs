//! The STP frame header on the wire (docs/PROTOCOL.md §2): layout,
//! kinds and flags, and walking the frames packed in one buffer.
//!
//! This module checks structure only (lengths, magic, version). Integrity
//! (the header's CRC32C) and authenticity (the AEAD tag) are checked by
//! [`crate::frame`] at the endpoints; the array routes frames on structure
//! alone.
//!
//! No-panic contract: [`Header::parse`] and [`Frames`] accept any bytes.

use std::fmt;

use zerocopy::byteorder::{BigEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `"STPF"`.
pub const MAGIC: u32 = 0x5354_5046;
/// The protocol version this code speaks (docs/PROTOCOL.md §9).
pub const VERSION: u8 = 2;
/// The previous protocol version: its frames are recognised (to refuse them
/// with a clear error), never opened.
pub const PREVIOUS_VERSION: u8 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 80;
/// Frames packed in one buffer start at multiples of this.
pub const ALIGN: usize = 8;
/// The largest payload any frame may carry (1 MiB).
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Bytes of the header the AEAD authenticates as associated data and the
/// CRC32C covers: everything before the CRC field.
pub const AAD_LEN: usize = 60;
/// Byte range of the header's CRC32C field.
pub const CRC_RANGE: std::ops::Range<usize> = 60..64;
/// Byte range of the authentication tag.
pub const TAG_RANGE: std::ops::Range<usize> = 64..80;
/// Bytes in the authentication tag.
pub const TAG_LEN: usize = 16;

/// The header's exact wire layout.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// [`MAGIC`].
    pub magic: U32<BigEndian>,
    /// [`VERSION`].
    pub version: u8,
    /// [`Kind`].
    pub kind: u8,
    /// [`Flags`].
    pub flags: U16<BigEndian>,
    /// Sender's port.
    pub src_port: U32<BigEndian>,
    /// Receiver's port.
    pub dst_port: U32<BigEndian>,
    /// Connection id.
    pub conn_id: U64<BigEndian>,
    /// Sequence number of this frame.
    pub seq: U64<BigEndian>,
    /// Next sequence number expected from the peer.
    pub ack: U64<BigEndian>,
    /// Frames accepted beyond `ack`.
    pub credit: U32<BigEndian>,
    /// Payload bytes after the header.
    pub payload_len: U32<BigEndian>,
    /// Packet number: unique per sealed frame of one direction of one
    /// connection; the AEAD nonce (docs/PROTOCOL.md §7).
    pub pn: U64<BigEndian>,
    /// Zero.
    pub reserved: U32<BigEndian>,
    /// CRC32C of bytes 0–59 (the header before this field).
    pub crc32c: U32<BigEndian>,
    /// The AEAD tag (docs/PROTOCOL.md §7).
    pub tag: [u8; TAG_LEN],
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == HEADER_LEN);
const _: () = assert!(HEADER_LEN % ALIGN == 0);

/// A frame kind, as an open newtype (unknown kinds are dropped by receivers).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Kind(pub u8);

impl Kind {
    /// Open a connection.
    pub const SYN: Kind = Kind(1);
    /// Accept a connection.
    pub const SYN_ACK: Kind = Kind(2);
    /// Acknowledgement and credit only.
    pub const ACK: Kind = Kind(3);
    /// Stream bytes.
    pub const DATA: Kind = Kind(4);
    /// No more data from the sender.
    pub const FIN: Kind = Kind(5);
    /// Abort.
    pub const RST: Kind = Kind(6);
    /// Keepalive probe.
    pub const PING: Kind = Kind(7);
    /// Keepalive answer.
    pub const PONG: Kind = Kind(8);

    /// The kind's name, if known.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            Kind::SYN => "SYN",
            Kind::SYN_ACK => "SYN_ACK",
            Kind::ACK => "ACK",
            Kind::DATA => "DATA",
            Kind::FIN => "FIN",
            Kind::RST => "RST",
            Kind::PING => "PING",
            Kind::PONG => "PONG",
            _ => return None,
        })
    }

    /// True for kinds that consume a sequence number (SYN, SYN_ACK, DATA, FIN).
    pub fn is_sequenced(self) -> bool {
        matches!(self, Kind::SYN | Kind::SYN_ACK | Kind::DATA | Kind::FIN)
    }
}

impl fmt::Debug for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "Kind({})", self.0),
        }
    }
}

/// Header flags (docs/PROTOCOL.md §2.2), as an open newtype.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Debug)]
pub struct Flags(pub u16);

impl Flags {
    /// The receiver should acknowledge at once.
    pub const ACK_NOW: Flags = Flags(1 << 0);
    /// This frame is a retransmission (version 1 only; a version 2
    /// retransmission is the original sealed frame, unchanged).
    pub const RETRANSMIT: Flags = Flags(1 << 1);
    /// The payload is encrypted (the connection's protection is
    /// [`Protection::Encrypt`](crate::frame::Protection)).
    pub const ENCRYPTED: Flags = Flags(1 << 2);

    /// True if every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Flags.
    pub flags: Flags,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Connection id.
    pub conn_id: u64,
    /// Sequence number.
    pub seq: u64,
    /// Cumulative acknowledgement.
    pub ack: u64,
    /// Credit in frames beyond `ack`.
    pub credit: u32,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Packet number (the AEAD nonce's counter).
    pub pn: u64,
    /// CRC32C as carried.
    pub crc32c: u32,
    /// Tag as carried.
    pub tag: [u8; TAG_LEN],
}

/// Why bytes are not a structurally valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than a header.
    #[error("truncated frame header: {got} bytes, need {HEADER_LEN}")]
    ShortHeader {
        /// Bytes present.
        got: usize,
    },
    /// Wrong magic.
    #[error("bad frame magic 0x{0:08x}")]
    BadMagic(u32),
    /// Unsupported version.
    #[error(
        "unsupported frame version {0} (this build speaks STP v{VERSION}); \
         upgrade the side that sent it"
    )]
    BadVersion(u8),
    /// Payload larger than the protocol allows.
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(u32),
    /// Payload runs past the end of the buffer.
    #[error("frame payload of {len} bytes runs past the buffer ({available} available)")]
    TruncatedPayload {
        /// Declared payload length.
        len: u32,
        /// Bytes available after the header.
        available: usize,
    },
}

/// The version byte of what looks like a frame header (right magic, at
/// least 8 bytes), whatever the version: lets receivers and the array tell
/// a peer speaking another protocol version from garbage.
pub fn peek_version(bytes: &[u8]) -> Option<u8> {
    let magic = bytes.get(..4)?;
    (magic == MAGIC.to_be_bytes()).then(|| bytes.get(4).copied())?
}

/// The kind of what looks like a frame header of this version (right magic
/// and version), unchecked otherwise: lets the mailbox tell the SENDs that
/// carry a stream's data from its acknowledgements without parsing them.
pub fn peek_kind(bytes: &[u8]) -> Option<Kind> {
    let (raw, _) = RawHeader::ref_from_prefix(bytes).ok()?;
    (raw.magic.get() == MAGIC && raw.version == VERSION).then_some(Kind(raw.kind))
}

/// Bytes a frame occupies in a packed buffer, padding included.
pub fn frame_span(payload_len: u32) -> usize {
    (HEADER_LEN + payload_len as usize).next_multiple_of(ALIGN)
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes. Checks magic, version and the
    /// payload limit; not that the payload is present.
    pub fn parse(bytes: &[u8]) -> Result<Header, WireError> {
        let Ok((raw, _)) = RawHeader::ref_from_prefix(bytes) else {
            return Err(WireError::ShortHeader { got: bytes.len() });
        };
        if raw.magic.get() != MAGIC {
            return Err(WireError::BadMagic(raw.magic.get()));
        }
        if raw.version != VERSION {
            return Err(WireError::BadVersion(raw.version));
        }
        let payload_len = raw.payload_len.get();
        if payload_len > MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge(payload_len));
        }
        Ok(Header {
            kind: Kind(raw.kind),
            flags: Flags(raw.flags.get()),
            src_port: raw.src_port.get(),
            dst_port: raw.dst_port.get(),
            conn_id: raw.conn_id.get(),
            seq: raw.seq.get(),
            ack: raw.ack.get(),
            credit: raw.credit.get(),
            payload_len,
            pn: raw.pn.get(),
            crc32c: raw.crc32c.get(),
            tag: raw.tag,
        })
    }

    /// The wire bytes of this header, with the CRC and tag as set.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            magic: MAGIC.into(),
            version: VERSION,
            kind: self.kind.0,
            flags: self.flags.0.into(),
            src_port: self.src_port.into(),
            dst_port: self.dst_port.into(),
            conn_id: self.conn_id.into(),
            seq: self.seq.into(),
            ack: self.ack.into(),
            credit: self.credit.into(),
            payload_len: self.payload_len.into(),
            pn: self.pn.into(),
            reserved: 0.into(),
            crc32c: self.crc32c.into(),
            tag: self.tag,
        };
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Bytes this frame occupies in a packed buffer.
    pub fn span(&self) -> usize {
        frame_span(self.payload_len)
    }
}

/// One frame found in a packed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// Offset of the header in the buffer.
    pub offset: usize,
    /// The parsed header.
    pub header: Header,
}

impl Located {
    /// The frame's bytes (header and payload, no padding) within `buf`.
    pub fn bytes<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.offset..self.offset + HEADER_LEN + self.header.payload_len as usize]
    }

    /// The payload within `buf`.
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let start = self.offset + HEADER_LEN;
        &buf[start..start + self.header.payload_len as usize]
    }
}

/// Walks the frames packed in a buffer (SEND data, a RECEIVE buffer, a
/// block-mode slot). Yields an error at the first malformed frame and then
/// stops. Trailing zero bytes shorter than a header end the walk cleanly.
pub struct Frames<'a> {
    buf: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> Frames<'a> {
    /// Frames in `buf`.
    pub fn new(buf: &'a [u8]) -> Frames<'a> {
        Frames {
            buf,
            at: 0,
            done: false,
        }
    }
}

impl Iterator for Frames<'_> {
    type Item = Result<Located, (usize, WireError)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.at >= self.buf.len() {
            return None;
        }
        let rest = &self.buf[self.at..];
        if rest.len() < HEADER_LEN && rest.iter().all(|&b| b == 0) {
            self.done = true;
            return None;
        }
        let header = match Header::parse(rest) {
            Ok(h) => h,
            Err(e) => {
                self.done = true;
                return Some(Err((self.at, e)));
            }
        };
        let available = rest.len() - HEADER_LEN;
        if header.payload_len as usize > available {
            self.done = true;
            return Some(Err((
                self.at,
                WireError::TruncatedPayload {
                    len: header.payload_len,
                    available,
                },
            )));
        }
        let found = Located {
            offset: self.at,
            header,
        };
        self.at = self.at.saturating_add(header.span());
        Some(Ok(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        Header {
            kind: Kind::DATA,
            flags: Flags::ACK_NOW,
            src_port: 32768,
            dst_port: 5101,
            conn_id: 0x0102_0304_0506_0708,
            seq: 9,
            ack: 4,
            credit: 64,
            payload_len: 5,
            pn: 0x1122_3344_5566_7788,
            crc32c: 0xDEAD_BEEF,
            tag: [7; 16],
        }
    }

    #[test]
    fn layout_literal_bytes() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..8], &[0x53, 0x54, 0x50, 0x46, 2, 4, 0, 1]);
        assert_eq!(&b[8..16], &[0, 0, 0x80, 0, 0, 0, 0x13, 0xED]);
        assert_eq!(&b[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b[31], 9);
        assert_eq!(b[39], 4);
        assert_eq!(&b[40..48], &[0, 0, 0, 64, 0, 0, 0, 5]);
        assert_eq!(
            &b[48..56],
            &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
        assert_eq!(&b[56..60], &[0; 4]);
        assert_eq!(&b[CRC_RANGE], &[0xDE, 0xAD, 0xBE, 0xEF]);
        assert_eq!(&b[TAG_RANGE], &[7; 16]);
        assert_eq!(Header::parse(&b), Ok(sample()));
    }

    #[test]
    fn structural_errors() {
        let mut b = sample().to_bytes();
        assert_eq!(
            Header::parse(&b[..79]),
            Err(WireError::ShortHeader { got: 79 })
        );
        b[4] = 1;
        assert_eq!(Header::parse(&b), Err(WireError::BadVersion(1)));
        assert_eq!(peek_version(&b), Some(1));
        b[4] = 2;
        assert_eq!(peek_version(&b), Some(2));
        b[0] = 0;
        assert!(matches!(Header::parse(&b), Err(WireError::BadMagic(_))));
        let mut h = sample();
        h.payload_len = MAX_PAYLOAD + 1;
        assert_eq!(
            Header::parse(&h.to_bytes()),
            Err(WireError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
    }

    #[test]
    fn walks_packed_frames() {
        let mut buf = Vec::new();
        for len in [5u32, 0, 8] {
            let mut h = sample();
            h.payload_len = len;
            buf.extend_from_slice(&h.to_bytes());
            buf.extend(std::iter::repeat_n(0xAB, len as usize));
            buf.resize(buf.len().next_multiple_of(ALIGN), 0);
        }
        buf.extend_from_slice(&[0; 16]); // trailing zero padding
        let found: Vec<_> = Frames::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(found[1].offset, frame_span(5));
        assert_eq!(found[0].payload(&buf), &[0xAB; 5]);
        assert_eq!(found[2].bytes(&buf).len(), HEADER_LEN + 8);
        // Cut into the last payload: an error at its offset.
        let cut = found[2].offset + HEADER_LEN + 3;
        let last = Frames::new(&buf[..cut]).last().unwrap();
        assert!(
            matches!(last, Err((o, WireError::TruncatedPayload { .. })) if o == found[2].offset)
        );
    }

    proptest! {
        #[test]
        fn parse_of_emit(kind in any::<u8>(), flags in any::<u16>(), ports in any::<(u32, u32)>(),
                         ids in any::<(u64, u64, u64)>(), credit in any::<u32>(),
                         len in 0..=MAX_PAYLOAD, crc in any::<u32>(), tag in any::<[u8; 16]>(),
                         pn in any::<u64>()) {
            let h = Header { kind: Kind(kind), flags: Flags(flags), src_port: ports.0, dst_port: ports.1,
                conn_id: ids.0, seq: ids.1, ack: ids.2, credit, payload_len: len, pn, crc32c: crc, tag };
            prop_assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Header::parse(&bytes);
            for l in Frames::new(&bytes).flatten() {
                let _ = l.payload(&bytes);
            }
        }
    }
}
