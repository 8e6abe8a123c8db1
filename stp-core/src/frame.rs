//! Sealing and opening frames (docs/PROTOCOL.md §2 and §7), protocol v2.
//!
//! Each payload byte gets **one** protection pass on each side, done in
//! place in the buffer the device reads or wrote by DMA:
//!
//! * [`Protection::Encrypt`] (the default): AES-256-GCM. The payload is
//!   encrypted in place; the header's first [`AAD_LEN`] bytes are the
//!   associated data; the 16-byte GCM tag goes in the header.
//! * [`Protection::Authenticate`] (for users who want the payload readable
//!   on the SAN): keyed BLAKE3 over a direction byte, the same header bytes
//!   and the payload in the clear, truncated to 16 bytes.
//!
//! Either way a CRC32C covers the header only (bytes 0–59): it catches a
//! torn or corrupted header cheaply, before any key is used, and says which
//! frames the array damaged; the payload's integrity is the tag's job.
//!
//! Keys and nonces: a [`Cipher`] holds one connection's key,
//! `HKDF-Expand(K, "stp v2 frames" ‖ mode ‖ conn_id)` from the session's
//! [`FrameKey`] `K`, so connections accepted under one session key never
//! share a key. The GCM nonce is `direction (4 bytes) ‖ pn (8 bytes)`:
//! the [`Direction`] is implied by the receiver's role (never read from the
//! wire, so a frame reflected back to its sender fails), and `pn`, the
//! header's packet number, is unique per sealed frame of one direction (the
//! connection hands out each number once). A retransmission re-sends the
//! sealed bytes unchanged; nothing is ever sealed twice under one nonce.
//!
//! No-panic contract: [`Cipher::open`] accepts any bytes, and
//! [`Cipher::seal`] any header and buffer; failures are [`FrameError`]s.

use std::fmt;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

use crate::auth::FrameKey;
use crate::counters::bump;
use crate::wire::{
    Flags, Header, WireError, AAD_LEN, ALIGN, CRC_RANGE, HEADER_LEN, MAX_PAYLOAD, TAG_LEN,
    TAG_RANGE,
};

/// How a connection protects its frames (both sides must agree; the mode
/// is part of the key, so a mismatch fails every tag).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protection {
    /// AES-256-GCM: the payload is encrypted and authenticated.
    #[default]
    Encrypt,
    /// Keyed BLAKE3: the payload travels in the clear, authenticated.
    Authenticate,
}

impl Protection {
    /// The name used in configuration files, bench output and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Protection::Encrypt => "aes-256-gcm",
            Protection::Authenticate => "blake3-auth",
        }
    }

    /// Parses [`Protection::name`] (also `encrypt` and `authenticate`).
    pub fn parse(s: &str) -> Option<Protection> {
        match s {
            "aes-256-gcm" | "encrypt" => Some(Protection::Encrypt),
            "blake3-auth" | "authenticate" => Some(Protection::Authenticate),
            _ => None,
        }
    }

    fn mode_byte(self) -> u8 {
        match self {
            Protection::Encrypt => 1,
            Protection::Authenticate => 2,
        }
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which way a frame travels: from the side that sent the SYN (the client)
/// or from the side that accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Sent by the connecting side.
    ClientToServer,
    /// Sent by the accepting side.
    ServerToClient,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// Why a frame could not be sealed or opened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes are not a structurally valid frame (too short, bad magic or
    /// version, payload over the maximum or past the end of the buffer).
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// The header's CRC32C does not match: the header was corrupted or torn
    /// on its way through the array.
    #[error(
        "frame header CRC32C mismatch: frame carries 0x{expected:08x}, header computes to \
         0x{got:08x}"
    )]
    BadCrc {
        /// The CRC32C the frame carries.
        expected: u32,
        /// The CRC32C computed over the header as received.
        got: u32,
    },
    /// The frame says it is protected another way than this connection is
    /// (one side encrypts, the other only authenticates).
    #[error(
        "frame protection mismatch: the frame is {got}, this connection uses {ours}; \
         configure both sides with the same protection"
    )]
    WrongProtection {
        /// The connection's protection.
        ours: Protection,
        /// What the frame's flags say.
        got: Protection,
    },
    /// The authentication tag does not verify under this connection's key:
    /// the frame was forged, altered, reflected, or belongs to another
    /// connection.
    #[error("frame authentication tag does not verify (forged, altered, or another connection's)")]
    BadTag,
    /// A payload larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(usize),
    /// The buffer given to seal cannot hold the header and payload.
    #[error("sealing needs {needed} bytes but the buffer holds {available}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes in the buffer.
        available: usize,
    },
}

/// One connection's frame key, ready to seal and open (see the module docs).
pub struct Cipher {
    protection: Protection,
    /// AES-256-GCM key ([`Protection::Encrypt`]).
    aead: Option<LessSafeKey>,
    /// Keyed-BLAKE3 key ([`Protection::Authenticate`]).
    mac: [u8; 32],
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cipher")
            .field("protection", &self.protection)
            .finish_non_exhaustive()
    }
}

/// The HKDF `info` prefix of a connection key.
const CONN_INFO: &[u8] = b"stp v2 frames";

impl Cipher {
    /// The key of connection `conn_id` under the session key `key`.
    pub fn new(key: &FrameKey, conn_id: u64, protection: Protection) -> Cipher {
        let mut info = [0u8; CONN_INFO.len() + 9];
        info[..CONN_INFO.len()].copy_from_slice(CONN_INFO);
        info[CONN_INFO.len()] = protection.mode_byte();
        info[CONN_INFO.len() + 1..].copy_from_slice(&conn_id.to_be_bytes());
        let okm = key.expand(&info);
        let aead = match protection {
            Protection::Encrypt => Some(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &okm).expect("AES-256 takes a 32-byte key"),
            )),
            Protection::Authenticate => None,
        };
        Cipher {
            protection,
            aead,
            mac: okm,
        }
    }

    /// How this cipher protects frames.
    pub fn protection(&self) -> Protection {
        self.protection
    }

    /// Seals a frame in place. `frame` holds the header's room
    /// ([`HEADER_LEN`] bytes, any contents) followed by
    /// `header.payload_len` payload bytes in the clear; the header is
    /// written (with the [`Flags::ENCRYPTED`] bit set to the protection),
    /// the payload encrypted in place or tagged, and the tag and CRC32C
    /// stored. Bytes of `frame` after the payload, up to the frame's span,
    /// are zeroed (padding); bytes beyond the span are left alone. Returns
    /// the span. `header` is updated to what was written.
    ///
    /// `header.pn` must never have been sealed before in this direction
    /// under this cipher (the connection hands out packet numbers).
    pub fn seal(
        &self,
        dir: Direction,
        header: &mut Header,
        frame: &mut [u8],
    ) -> Result<usize, FrameError> {
        let len = header.payload_len as usize;
        if header.payload_len > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge(len));
        }
        let end = HEADER_LEN + len;
        if frame.len() < end {
            return Err(FrameError::BufferTooSmall {
                needed: end,
                available: frame.len(),
            });
        }
        header.flags = match self.protection {
            Protection::Encrypt => header.flags | Flags::ENCRYPTED,
            Protection::Authenticate => Flags(header.flags.0 & !Flags::ENCRYPTED.0),
        };
        header.crc32c = 0;
        header.tag = [0; TAG_LEN];
        let (head, rest) = frame.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&header.to_bytes());
        let payload = &mut rest[..len];
        let tag = match &self.aead {
            Some(key) => {
                let nonce = nonce(dir, header.pn);
                let tag = key
                    .seal_in_place_separate_tag(nonce, Aad::from(&head[..AAD_LEN]), payload)
                    .map_err(|_| FrameError::PayloadTooLarge(len))?;
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag.as_ref());
                t
            }
            None => self.mac_tag(dir, &head[..AAD_LEN], payload),
        };
        bump!(send_protect_bytes, len);
        let crc = crc32c::crc32c(&head[..AAD_LEN]);
        head[CRC_RANGE].copy_from_slice(&crc.to_be_bytes());
        head[TAG_RANGE].copy_from_slice(&tag);
        header.crc32c = crc;
        header.tag = tag;
        let span = end.next_multiple_of(ALIGN);
        let pad_end = span.min(frame.len());
        frame[end..pad_end].fill(0);
        Ok(span)
    }

    /// Opens the frame at the start of `bytes` in place: checks structure
    /// ([`Header::parse`], the whole payload present), the header's CRC32C,
    /// the protection flag, then the tag (GCM decrypts the payload in
    /// place; BLAKE3's tag is compared in constant time). On success the
    /// payload, in the clear, is `bytes[HEADER_LEN..][..payload_len]`.
    /// On a tag failure the payload bytes are unspecified.
    pub fn open(&self, dir: Direction, bytes: &mut [u8]) -> Result<Header, FrameError> {
        let header = Header::parse(bytes)?;
        let len = header.payload_len as usize;
        let available = bytes.len() - HEADER_LEN;
        if len > available {
            return Err(WireError::TruncatedPayload {
                len: header.payload_len,
                available,
            }
            .into());
        }
        let (head, rest) = bytes.split_at_mut(HEADER_LEN);
        let got = crc32c::crc32c(&head[..AAD_LEN]);
        if got != header.crc32c {
            return Err(FrameError::BadCrc {
                expected: header.crc32c,
                got,
            });
        }
        let flagged = if header.flags.contains(Flags::ENCRYPTED) {
            Protection::Encrypt
        } else {
            Protection::Authenticate
        };
        if flagged != self.protection {
            return Err(FrameError::WrongProtection {
                ours: self.protection,
                got: flagged,
            });
        }
        let payload = &mut rest[..len];
        match &self.aead {
            Some(key) => {
                key.open_in_place_separate_tag(
                    nonce(dir, header.pn),
                    Aad::from(&head[..AAD_LEN]),
                    Tag::from(header.tag),
                    payload,
                    0..,
                )
                .map_err(|_| FrameError::BadTag)?;
            }
            None => {
                if !tags_equal(&self.mac_tag(dir, &head[..AAD_LEN], payload), &header.tag) {
                    return Err(FrameError::BadTag);
                }
            }
        }
        bump!(recv_protect_bytes, len);
        Ok(header)
    }

    fn mac_tag(&self, dir: Direction, aad: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = blake3::Hasher::new_keyed(&self.mac);
        mac.update(&[dir.byte()]);
        mac.update(aad);
        mac.update(payload);
        let mut tag = [0u8; TAG_LEN];
        mac.finalize_xof().fill(&mut tag);
        tag
    }

    /// Seals a frame whose payload is given as slices into `out` (copying
    /// them after the header), as [`Cipher::seal`]; returns the span. For
    /// small control frames and tests: DATA is written into its DMA buffer
    /// by the stream and sealed there.
    pub fn seal_into(
        &self,
        dir: Direction,
        header: &mut Header,
        payload: &[&[u8]],
        out: &mut [u8],
    ) -> Result<usize, FrameError> {
        let len = payload
            .iter()
            .fold(0usize, |n, s| n.saturating_add(s.len()));
        if len > MAX_PAYLOAD as usize {
            return Err(FrameError::PayloadTooLarge(len));
        }
        let needed = (HEADER_LEN + len).next_multiple_of(ALIGN);
        if out.len() < needed {
            return Err(FrameError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        let mut at = HEADER_LEN;
        for s in payload {
            out[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        header.payload_len = len as u32;
        self.seal(dir, header, out)
    }

    /// A sealed frame as a new vector (span-padded): tests and tools.
    pub fn seal_to_vec(
        &self,
        dir: Direction,
        mut header: Header,
        payload: &[&[u8]],
    ) -> Result<Vec<u8>, FrameError> {
        let len = payload
            .iter()
            .fold(0usize, |n, s| n.saturating_add(s.len()));
        if len > MAX_PAYLOAD as usize {
            return Err(FrameError::PayloadTooLarge(len));
        }
        let mut out = vec![0u8; (HEADER_LEN + len).next_multiple_of(ALIGN)];
        self.seal_into(dir, &mut header, payload, &mut out)?;
        Ok(out)
    }

    /// Opens a copy of the frame at the start of `bytes` (tests and tools):
    /// the header and the payload in the clear.
    pub fn open_to_vec(
        &self,
        dir: Direction,
        bytes: &[u8],
    ) -> Result<(Header, Vec<u8>), FrameError> {
        let header = Header::parse(bytes)?;
        let end = HEADER_LEN.saturating_add(header.payload_len as usize);
        let mut copy = bytes.get(..end).unwrap_or(bytes).to_vec();
        let header = self.open(dir, &mut copy)?;
        copy.drain(..HEADER_LEN);
        Ok((header, copy))
    }
}

/// The GCM nonce: direction, three zero bytes, packet number.
fn nonce(dir: Direction, pn: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = dir.byte();
    n[4..].copy_from_slice(&pn.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Compares two tags in constant time (no early exit on a mismatch).
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Frames, Kind};
    use proptest::prelude::*;

    const C2S: Direction = Direction::ClientToServer;
    const S2C: Direction = Direction::ServerToClient;

    fn key(b: u8) -> FrameKey {
        FrameKey::from_bytes([b; 32])
    }

    fn cipher(b: u8, p: Protection) -> Cipher {
        Cipher::new(&key(b), 0x0102_0304_0506_0708, p)
    }

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
            pn: 42,
            ..Header::default()
        }
    }

    /// Rewrites the header CRC to match a tampered header, as a forger who
    /// knows CRC32C but not the key would.
    fn fix_crc(frame: &mut [u8]) {
        let crc = crc32c::crc32c(&frame[..AAD_LEN]);
        frame[CRC_RANGE].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    /// Pinned bytes, computed independently from the formulas of
    /// docs/PROTOCOL.md §7 by `stp-core/vectors/frame_v2_kat.py` (Python's
    /// `cryptography` AESGCM and `blake3` packages, HKDF from `hmac`).
    #[test]
    fn known_answer() {
        let k = FrameKey::from_bytes(core::array::from_fn(|i| i as u8));
        let enc = Cipher::new(&k, 0x0102_0304_0506_0708, Protection::Encrypt);
        let frame = enc
            .seal_to_vec(C2S, sample(), &[b"hello, ", b"stp"])
            .unwrap();
        assert_eq!(hex(&frame[..HEADER_LEN]), KAT_ENC_HEADER);
        assert_eq!(hex(&frame[HEADER_LEN..HEADER_LEN + 10]), KAT_ENC_PAYLOAD);
        let auth = Cipher::new(&k, 0x0102_0304_0506_0708, Protection::Authenticate);
        let frame = auth.seal_to_vec(S2C, sample(), &[b"hello, stp"]).unwrap();
        assert_eq!(hex(&frame[..HEADER_LEN]), KAT_AUTH_HEADER);
        assert_eq!(&frame[HEADER_LEN..HEADER_LEN + 10], b"hello, stp");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    const KAT_ENC_HEADER: &str = "535450460204000500008000000013ed0102030405060708000000000000\
        00090000000000000004000000400000000a000000000000002a00000000e4f237d4b8e94c5b0fd312758bb1bcda\
        c5fbc9ce";
    const KAT_ENC_PAYLOAD: &str = "c7dbc42a84b6ba6bd8bd";
    const KAT_AUTH_HEADER: &str = "535450460204000100008000000013ed0102030405060708000000000000\
        00090000000000000004000000400000000a000000000000002a00000000cef1616f1fc5be3e9a7379e7cc1625bd\
        c0d9e1d0";

    #[test]
    fn round_trip_both_protections_and_the_payload_is_hidden_only_when_encrypted() {
        for p in [Protection::Encrypt, Protection::Authenticate] {
            let c = cipher(1, p);
            let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
            let mut frame = c
                .seal_to_vec(C2S, sample(), &[&data[..7], &data[7..]])
                .unwrap();
            assert_eq!(frame.len(), (HEADER_LEN + 1000).next_multiple_of(ALIGN));
            let in_clear = frame[HEADER_LEN..HEADER_LEN + 1000] == data[..];
            assert_eq!(in_clear, p == Protection::Authenticate, "{p:?}");
            let h = c.open(C2S, &mut frame).unwrap();
            assert_eq!(h.seq, 9);
            assert_eq!(h.payload_len, 1000);
            assert_eq!(h.flags.contains(Flags::ENCRYPTED), p == Protection::Encrypt);
            assert_eq!(&frame[HEADER_LEN..HEADER_LEN + 1000], &data[..]);
        }
    }

    #[test]
    fn empty_payload_and_trailing_bytes() {
        let c = cipher(2, Protection::Encrypt);
        let mut h = sample();
        h.kind = Kind::ACK;
        let mut frame = c.seal_to_vec(S2C, h, &[]).unwrap();
        frame.extend_from_slice(&[0xFF; 20]); // padding or the next frame
        let got = c.open(S2C, &mut frame).unwrap();
        assert_eq!(got.payload_len, 0);
    }

    #[test]
    fn padding_is_zeroed_and_bytes_past_the_span_kept() {
        let c = cipher(2, Protection::Encrypt);
        let mut buf = vec![0xEE; HEADER_LEN + 16];
        buf[HEADER_LEN..HEADER_LEN + 3].copy_from_slice(b"abc");
        let mut h = sample();
        h.payload_len = 3;
        let span = c.seal(C2S, &mut h, &mut buf).unwrap();
        assert_eq!(span, HEADER_LEN + 8);
        assert_eq!(&buf[HEADER_LEN + 3..span], &[0; 5]);
        assert_eq!(&buf[span..], &[0xEE; 8]);
    }

    #[test]
    fn corrupted_header_is_bad_crc_and_corrupted_payload_bad_tag() {
        for p in [Protection::Encrypt, Protection::Authenticate] {
            let c = cipher(1, p);
            let frame = c.seal_to_vec(C2S, sample(), &[b"payload bytes"]).unwrap();
            let mut f = frame.clone();
            f[30] ^= 0x10;
            assert!(matches!(
                c.open(C2S, &mut f),
                Err(FrameError::BadCrc { .. })
            ));
            let mut f = frame.clone();
            f[HEADER_LEN + 3] ^= 0x10;
            assert_eq!(c.open(C2S, &mut f), Err(FrameError::BadTag), "{p:?}");
            let mut f = frame.clone();
            f[TAG_RANGE.start] ^= 1; // the tag is not under the CRC
            assert_eq!(c.open(C2S, &mut f), Err(FrameError::BadTag), "{p:?}");
        }
    }

    #[test]
    fn forger_with_crc_but_no_key_is_bad_tag() {
        for p in [Protection::Encrypt, Protection::Authenticate] {
            let c = cipher(1, p);
            let forged = cipher(2, p).seal_to_vec(C2S, sample(), &[b"evil"]).unwrap();
            assert_eq!(c.open(C2S, &mut forged.clone()), Err(FrameError::BadTag));
            // Every header field before the CRC is covered by the tag.
            for at in [5, 7, 11, 15, 23, 31, 39, 43, 51, 55, 59] {
                let mut f = c.seal_to_vec(C2S, sample(), &[b"x"]).unwrap();
                f[at] ^= 0x40;
                fix_crc(&mut f);
                let got = c.open(C2S, &mut f);
                assert!(
                    matches!(
                        got,
                        Err(FrameError::BadTag | FrameError::WrongProtection { .. })
                    ),
                    "{p:?} byte {at}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn reflected_frames_and_other_connections_fail() {
        let c = cipher(1, Protection::Encrypt);
        let frame = c.seal_to_vec(C2S, sample(), &[b"to the server"]).unwrap();
        // Sent back to its sender: the receiver expects the other direction.
        assert_eq!(c.open(S2C, &mut frame.clone()), Err(FrameError::BadTag));
        // Another connection under the same session key: another key.
        let other = Cipher::new(&key(1), 0xBBBB, Protection::Encrypt);
        assert_eq!(other.open(C2S, &mut frame.clone()), Err(FrameError::BadTag));
        assert!(c.open(C2S, &mut frame.clone()).is_ok());
    }

    #[test]
    fn protection_mismatch_is_named() {
        let enc = cipher(1, Protection::Encrypt);
        let auth = cipher(1, Protection::Authenticate);
        let mut f = enc.seal_to_vec(C2S, sample(), &[b"x"]).unwrap();
        assert_eq!(
            auth.open(C2S, &mut f),
            Err(FrameError::WrongProtection {
                ours: Protection::Authenticate,
                got: Protection::Encrypt
            })
        );
        // Setting the flag by hand does not help: the mode is in the key.
        let mut f = auth.seal_to_vec(C2S, sample(), &[b"x"]).unwrap();
        f[7] |= Flags::ENCRYPTED.0 as u8;
        fix_crc(&mut f);
        assert_eq!(enc.open(C2S, &mut f), Err(FrameError::BadTag));
    }

    #[test]
    fn truncated_frames_are_wire_errors() {
        let c = cipher(1, Protection::Encrypt);
        let frame = c.seal_to_vec(C2S, sample(), &[b"0123456789"]).unwrap();
        let mut cut = frame[..HEADER_LEN + 9].to_vec();
        assert_eq!(
            c.open(C2S, &mut cut),
            Err(FrameError::Wire(WireError::TruncatedPayload {
                len: 10,
                available: 9
            }))
        );
        assert_eq!(
            c.open(C2S, &mut frame[..40].to_vec()),
            Err(FrameError::Wire(WireError::ShortHeader { got: 40 }))
        );
    }

    #[test]
    fn seal_rejects_what_does_not_fit() {
        let c = cipher(1, Protection::Encrypt);
        let mut h = sample();
        h.payload_len = 10;
        let mut small = [0u8; HEADER_LEN + 9];
        assert_eq!(
            c.seal(C2S, &mut h, &mut small),
            Err(FrameError::BufferTooSmall {
                needed: HEADER_LEN + 10,
                available: HEADER_LEN + 9
            })
        );
        h.payload_len = MAX_PAYLOAD + 1;
        assert!(matches!(
            c.seal(C2S, &mut h, &mut small),
            Err(FrameError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn packed_frames_open_in_place_one_by_one() {
        let c = cipher(3, Protection::Encrypt);
        let mut buf = Vec::new();
        for (i, p) in [&b"one"[..], b"", b"three33"].iter().enumerate() {
            let mut h = sample();
            h.seq = i as u64;
            h.pn = i as u64;
            buf.extend(c.seal_to_vec(C2S, h, &[p]).unwrap());
        }
        let found: Vec<_> = Frames::new(&buf).map(|f| f.unwrap().offset).collect();
        assert_eq!(found.len(), 3);
        for (i, at) in found.into_iter().enumerate() {
            let h = c.open(C2S, &mut buf[at..]).unwrap();
            assert_eq!(h.seq, i as u64);
        }
        assert_eq!(&buf[HEADER_LEN..HEADER_LEN + 3], b"one");
    }

    proptest! {
        #[test]
        fn open_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let c = cipher(7, Protection::Encrypt);
            let _ = c.open(C2S, &mut bytes);
            let a = cipher(7, Protection::Authenticate);
            let _ = a.open(S2C, &mut bytes);
        }

        #[test]
        fn seal_open_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..3000),
                                pn in any::<u64>(), auth in any::<bool>()) {
            let p = if auth { Protection::Authenticate } else { Protection::Encrypt };
            let c = cipher(9, p);
            let mut h = sample();
            h.pn = pn;
            let mut f = c.seal_to_vec(S2C, h, &[&payload]).unwrap();
            let got = c.open(S2C, &mut f).unwrap();
            prop_assert_eq!(got.pn, pn);
            prop_assert_eq!(&f[HEADER_LEN..HEADER_LEN + payload.len()], &payload[..]);
        }
    }
}
