//! Sealing and opening frames (docs/PROTOCOL.md §2 and §7).
//!
//! [`seal`] fills in a header's `payload_len`, authentication tag and CRC32C
//! for a payload given as borrowed slices (scatter-gather); [`open`] checks a
//! received frame in the order the spec prescribes (structure, CRC32C, then
//! the tag, compared in constant time) and hands back the header and a
//! borrowed payload. Both walk the payload slices in place: a payload is
//! never copied or concatenated to compute the CRC or the tag, so the only
//! copy on the way out is the one the transport makes. [`pack`] and
//! [`pack_into`] lay sealed [`OutFrame`]s out in one contiguous buffer for
//! transports that need that today.
//!
//! The checks:
//!
//! * `tag = BLAKE3-keyed(K, header with crc32c and tag zeroed ‖ payload)`,
//!   truncated to its first 16 bytes, computed first;
//! * `crc32c = CRC32C(header with crc32c zeroed and the tag set ‖ payload)`.
//!
//! Both cover every header byte, `reserved` and unknown flag bits included,
//! as they appear on the wire.
//!
//! No-panic contract: [`open`] accepts any bytes and any key, and [`seal`],
//! [`pack`], [`pack_into`] and [`packed_len`] accept any headers and payload
//! slices; failures are [`FrameError`]s.

use std::fmt;

use crate::auth::FrameKey;
use crate::wire::{
    Header, WireError, ALIGN, CRC_RANGE, HEADER_LEN, MAX_PAYLOAD, TAG_LEN, TAG_RANGE,
};

/// Why a frame could not be sealed, opened or packed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes are not a structurally valid frame (too short, bad magic or
    /// version, payload over the maximum or past the end of the buffer).
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    /// The CRC32C does not match the contents: the frame was corrupted or
    /// torn on its way through the array.
    #[error(
        "frame CRC32C mismatch: frame carries 0x{expected:08x}, contents compute to 0x{got:08x}"
    )]
    BadCrc {
        /// The CRC32C the frame carries.
        expected: u32,
        /// The CRC32C computed over the frame as received.
        got: u32,
    },
    /// The authentication tag does not verify under this connection's key:
    /// the frame was forged, altered by someone who recomputed the CRC, or
    /// belongs to another connection.
    #[error("frame authentication tag does not verify (forged, altered, or another connection's)")]
    BadTag,
    /// The payload slices hold more than [`MAX_PAYLOAD`] bytes.
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte maximum")]
    PayloadTooLarge(usize),
    /// An [`OutFrame`]'s `header.payload_len` is not the total length of its
    /// payload slices (it was not sealed over them).
    #[error("frame header says payload_len {header} but its payload slices hold {slices} bytes")]
    LengthMismatch {
        /// `payload_len` in the header.
        header: u32,
        /// Total bytes in the payload slices.
        slices: usize,
    },
    /// The output buffer given to [`pack_into`] cannot hold the frames.
    #[error("packed frames need {needed} bytes but the buffer holds {available}")]
    BufferTooSmall {
        /// Bytes [`packed_len`] requires.
        needed: usize,
        /// Bytes in the buffer.
        available: usize,
    },
}

/// A frame on the way out: a header plus its payload as borrowed slices
/// (scatter-gather), never concatenated before it is packed into the
/// transport's buffer ([`pack_into`]).
///
/// `header.payload_len` must equal the total length of `payload`, and the
/// header must have been sealed over exactly these slices; use
/// [`OutFrame::sealed`] to build one.
#[derive(Clone, Copy)]
pub struct OutFrame<'a> {
    /// The sealed header (CRC32C and tag set).
    pub header: Header,
    /// The payload, in order.
    pub payload: &'a [&'a [u8]],
}

impl<'a> OutFrame<'a> {
    /// Seals `header` over `payload` (see [`seal`]) and pairs them.
    pub fn sealed(
        mut header: Header,
        payload: &'a [&'a [u8]],
        key: &FrameKey,
    ) -> Result<OutFrame<'a>, FrameError> {
        seal(&mut header, payload, key)?;
        Ok(OutFrame { header, payload })
    }

    /// Total bytes in the payload slices.
    pub fn payload_len(&self) -> usize {
        total_len(self.payload)
    }

    /// The header's wire bytes: the first element of the frame's iovec.
    pub fn header_bytes(&self) -> [u8; HEADER_LEN] {
        self.header.to_bytes()
    }

    /// Checks that `header.payload_len` matches the payload slices and the
    /// protocol maximum.
    pub fn check(&self) -> Result<(), FrameError> {
        let slices = self.payload_len();
        if slices > MAX_PAYLOAD as usize {
            return Err(FrameError::PayloadTooLarge(slices));
        }
        if slices != self.header.payload_len as usize {
            return Err(FrameError::LengthMismatch {
                header: self.header.payload_len,
                slices,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for OutFrame<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Payloads run to a megabyte: show their shape, not their bytes.
        f.debug_struct("OutFrame")
            .field("header", &self.header)
            .field("slices", &self.payload.len())
            .field("payload_bytes", &self.payload_len())
            .finish()
    }
}

/// Total length of `slices`, saturating (a sum that large is rejected anyway).
fn total_len(slices: &[&[u8]]) -> usize {
    slices.iter().fold(0usize, |n, s| n.saturating_add(s.len()))
}

/// BLAKE3 in keyed mode under the frame key (docs/PROTOCOL.md §7).
fn keyed_mac(key: &FrameKey) -> blake3::Hasher {
    blake3::Hasher::new_keyed(key.bytes())
}

/// The truncated tag over `header` (CRC and tag fields already zero) and the
/// payload slices.
fn compute_tag(key: &FrameKey, header: &[u8; HEADER_LEN], payload: &[&[u8]]) -> [u8; TAG_LEN] {
    let mut mac = keyed_mac(key);
    mac.update(header);
    for slice in payload {
        mac.update(slice);
    }
    let mut tag = [0u8; TAG_LEN];
    mac.finalize_xof().fill(&mut tag);
    tag
}

/// Compares two tags in constant time (no early exit on a mismatch).
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// CRC32C over `header` (CRC field already zero) and the payload slices,
/// incrementally.
fn compute_crc(header: &[u8; HEADER_LEN], payload: &[&[u8]]) -> u32 {
    payload.iter().fold(crc32c::crc32c(header), |crc, s| {
        crc32c::crc32c_append(crc, s)
    })
}

/// Seals a frame: sets `header.payload_len` to the total length of
/// `payload`, computes the tag (keyed BLAKE3 under `key`, truncated to 16
/// bytes) and then the CRC32C, stores both in `header`, and returns the
/// header's wire bytes. The payload is then sent as is, after these bytes.
///
/// The payload slices are read in place, never concatenated. On error
/// (`PayloadTooLarge`) `header` is unchanged.
pub fn seal(
    header: &mut Header,
    payload: &[&[u8]],
    key: &FrameKey,
) -> Result<[u8; HEADER_LEN], FrameError> {
    let len = total_len(payload);
    let Some(len32) = u32::try_from(len).ok().filter(|&n| n <= MAX_PAYLOAD) else {
        return Err(FrameError::PayloadTooLarge(len));
    };
    header.payload_len = len32;
    header.crc32c = 0;
    header.tag = [0; TAG_LEN];
    let mut bytes = header.to_bytes();
    let tag = compute_tag(key, &bytes, payload);
    bytes[TAG_RANGE].copy_from_slice(&tag);
    let crc = compute_crc(&bytes, payload);
    bytes[CRC_RANGE].copy_from_slice(&crc.to_be_bytes());
    header.tag = tag;
    header.crc32c = crc;
    Ok(bytes)
}

/// Opens a received frame starting at `bytes[0]`: checks structure
/// ([`Header::parse`] and that the whole payload is present), then the
/// CRC32C ([`FrameError::BadCrc`]), then the tag under `key` in constant time
/// ([`FrameError::BadTag`]). Returns the header and the payload, borrowed
/// from `bytes`.
///
/// Bytes after the payload (padding, further frames) are ignored. The CRC
/// and tag are checked over the header bytes exactly as received.
pub fn open<'a>(bytes: &'a [u8], key: &FrameKey) -> Result<(Header, &'a [u8]), FrameError> {
    let Some((head, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(WireError::ShortHeader { got: bytes.len() }.into());
    };
    let header = Header::parse(head)?;
    let Some(payload) = rest.get(..header.payload_len as usize) else {
        return Err(WireError::TruncatedPayload {
            len: header.payload_len,
            available: rest.len(),
        }
        .into());
    };

    let mut work = *head;
    work[CRC_RANGE].fill(0);
    let got = compute_crc(&work, &[payload]);
    if got != header.crc32c {
        return Err(FrameError::BadCrc {
            expected: header.crc32c,
            got,
        });
    }

    work[TAG_RANGE].fill(0);
    if !tags_equal(&compute_tag(key, &work, &[payload]), &header.tag) {
        return Err(FrameError::BadTag);
    }
    Ok((header, payload))
}

/// Bytes [`pack`] or [`pack_into`] writes for `frames`: the sum of each
/// frame's span (header, payload, zero padding to the next 8-byte boundary;
/// see [`Header::span`]), including the padding after the last frame.
pub fn packed_len(frames: &[OutFrame<'_>]) -> usize {
    frames
        .iter()
        .fold(0usize, |n, f| n.saturating_add(f.header.span()))
}

/// Checks every frame before anything is written.
fn check_all(frames: &[OutFrame<'_>]) -> Result<(), FrameError> {
    frames.iter().try_for_each(OutFrame::check)
}

/// Appends sealed `frames` to `out`, each at an 8-byte aligned offset from
/// the start of `out` (`out` is first zero-padded to a multiple of 8), with
/// zero padding after each payload: the layout of SEND data, RECEIVE buffers
/// and block-mode slots (docs/PROTOCOL.md §2).
///
/// This copies the payloads once, into `out`, for transports that need one
/// contiguous buffer today; the io_uring engine will instead pass each
/// frame's [`OutFrame::header_bytes`] and payload slices as an iovec and
/// copy nothing.
///
/// Fails, leaving `out` unchanged, if a frame's `payload_len` does not match
/// its slices ([`FrameError::LengthMismatch`]) or exceeds the maximum.
pub fn pack(frames: &[OutFrame<'_>], out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_all(frames)?;
    let start = out.len().next_multiple_of(ALIGN);
    out.reserve((start - out.len()).saturating_add(packed_len(frames)));
    out.resize(start, 0);
    for frame in frames {
        let end = out.len().saturating_add(frame.header.span());
        out.extend_from_slice(&frame.header_bytes());
        for slice in frame.payload {
            out.extend_from_slice(slice);
        }
        out.resize(end, 0);
    }
    Ok(())
}

/// Writes sealed `frames` at the start of `out`, laid out as by [`pack`],
/// and returns the bytes written ([`packed_len`]). Bytes of `out` beyond
/// that are left alone.
///
/// Like [`pack`], this copies payloads for transports that need one buffer;
/// the io_uring engine will pass header and payload slices as an iovec.
///
/// Fails, leaving `out` unchanged, on a frame [`pack`] would reject or if
/// `out` is too small ([`FrameError::BufferTooSmall`]).
pub fn pack_into(frames: &[OutFrame<'_>], out: &mut [u8]) -> Result<usize, FrameError> {
    check_all(frames)?;
    let needed = packed_len(frames);
    let Some(mut rest) = out.get_mut(..needed) else {
        return Err(FrameError::BufferTooSmall {
            needed,
            available: out.len(),
        });
    };
    for frame in frames {
        // `check_all` and `needed` guarantee each piece fits.
        let (span, tail) = rest.split_at_mut(frame.header.span());
        let (head, body) = span.split_at_mut(HEADER_LEN);
        head.copy_from_slice(&frame.header_bytes());
        let mut at = 0;
        for slice in frame.payload {
            body[at..at + slice.len()].copy_from_slice(slice);
            at += slice.len();
        }
        body[at..].fill(0);
        rest = tail;
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Flags, Frames, Kind};
    use proptest::prelude::*;

    fn key(b: u8) -> FrameKey {
        FrameKey::from_bytes([b; 32])
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
            ..Header::default()
        }
    }

    /// A sealed frame's wire bytes, header then payload.
    fn sealed(mut h: Header, payload: &[&[u8]], k: &FrameKey) -> Vec<u8> {
        let mut out = seal(&mut h, payload, k).unwrap().to_vec();
        for s in payload {
            out.extend_from_slice(s);
        }
        out
    }

    /// Rewrites the CRC so that it matches the (tampered) contents, as a
    /// forger who knows CRC32C but not the key would.
    fn fix_crc(frame: &mut [u8]) {
        frame[CRC_RANGE].fill(0);
        let crc = crc32c::crc32c(frame);
        frame[CRC_RANGE].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let split = crc32c::crc32c_append(crc32c::crc32c(b"1234"), b"56789");
        assert_eq!(split, 0xE306_9283);
    }

    #[test]
    fn keyed_mac_is_blake3_keyed_with_the_32_byte_key() {
        let k = FrameKey::from_bytes(core::array::from_fn(|i| i as u8));
        let mut a = keyed_mac(&k);
        a.update(b"stp");
        assert_eq!(a.finalize(), blake3::keyed_hash(k.bytes(), b"stp"));
    }

    #[test]
    fn tags_compare_every_byte() {
        let a = [7u8; TAG_LEN];
        for i in 0..TAG_LEN {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!tags_equal(&a, &b), "byte {i}");
        }
        assert!(tags_equal(&a, &a));
    }

    /// Pinned bytes, computed independently (Python's `blake3` package and
    /// a bitwise CRC32C) from the formulas of docs/PROTOCOL.md §7.
    #[test]
    fn known_answer() {
        let k = FrameKey::from_bytes(core::array::from_fn(|i| i as u8));
        let mut h = sample();
        let bytes = seal(&mut h, &[b"hello, ", b"stp"], &k).unwrap();
        assert_eq!(h.payload_len, 10);
        assert_eq!(h.crc32c, KAT_CRC);
        assert_eq!(h.tag, KAT_TAG);
        assert_eq!(&bytes[CRC_RANGE], &KAT_CRC.to_be_bytes());
        assert_eq!(&bytes[TAG_RANGE], &KAT_TAG);
    }

    const KAT_CRC: u32 = 0x7D18_43AD;
    const KAT_TAG: [u8; 16] = [
        0xab, 0x56, 0x23, 0x1b, 0x31, 0x53, 0xa7, 0x37, 0xbf, 0xb8, 0x5d, 0x10, 0x45, 0xe9, 0xde,
        0xb3,
    ];

    #[test]
    fn matches_the_spec_formulas() {
        let k = key(3);
        let payload: &[&[u8]] = &[b"abc", b"", b"defgh"];
        let mut h = sample();
        let bytes = seal(&mut h, payload, &k).unwrap();
        let body = b"abcdefgh";
        let mut zeroed = bytes;
        zeroed[CRC_RANGE].fill(0);
        zeroed[TAG_RANGE].fill(0);
        let full = blake3::keyed_hash(k.bytes(), &[&zeroed[..], body].concat());
        assert_eq!(&h.tag[..], &full.as_bytes()[..16]);
        let mut crc_in = bytes;
        crc_in[CRC_RANGE].fill(0);
        assert_eq!(h.crc32c, crc32c::crc32c(&[&crc_in[..], body].concat()));
        assert_eq!(bytes, h.to_bytes());
        assert_eq!(h.payload_len, 8);
    }

    #[test]
    fn split_payload_seals_like_one_slice() {
        let k = key(1);
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let (mut one, mut many) = (sample(), sample());
        let a = seal(&mut one, &[&data], &k).unwrap();
        let b = seal(
            &mut many,
            &[&data[..1], &data[1..400], &[], &data[400..]],
            &k,
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(one, many);
        let frame = sealed(sample(), &[&data[..7], &data[7..]], &k);
        let (h, p) = open(&frame, &k).unwrap();
        assert_eq!(h, one);
        assert_eq!(p, &data[..]);
    }

    #[test]
    fn empty_payload_and_trailing_bytes() {
        let k = key(2);
        let mut h = sample();
        h.kind = Kind::ACK;
        let mut frame = sealed(h, &[], &k);
        frame.extend_from_slice(&[0xFF; 20]); // padding or the next frame
        let (got, p) = open(&frame, &k).unwrap();
        assert_eq!(got.payload_len, 0);
        assert!(p.is_empty());
    }

    #[test]
    fn flipped_payload_bit_is_bad_crc() {
        let k = key(1);
        let mut frame = sealed(sample(), &[b"payload bytes"], &k);
        frame[HEADER_LEN + 3] ^= 0x10;
        assert!(matches!(open(&frame, &k), Err(FrameError::BadCrc { .. })));
        let mut frame = sealed(sample(), &[b"payload bytes"], &k);
        let carried = u32::from_be_bytes(frame[CRC_RANGE].try_into().unwrap());
        frame[60] ^= 1; // in the tag: the CRC covers it too
        match open(&frame, &k) {
            Err(FrameError::BadCrc { expected, got }) => {
                assert_eq!(expected, carried);
                assert_ne!(got, carried);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forger_with_crc_but_no_key_is_bad_tag() {
        let k = key(1);
        // A whole frame sealed under another key, CRC valid.
        let forged = sealed(sample(), &[b"evil"], &key(2));
        assert_eq!(open(&forged, &k), Err(FrameError::BadTag));
        // A genuine frame with its payload altered and the CRC recomputed.
        let mut frame = sealed(sample(), &[b"transfer 100"], &k);
        frame[HEADER_LEN + 9] = b'9';
        fix_crc(&mut frame);
        assert_eq!(open(&frame, &k), Err(FrameError::BadTag));
        // Kind, unknown flags, seq, credit and reserved are covered too.
        for at in [5, 7, 31, 43, 53] {
            let mut frame = sealed(sample(), &[b"x"], &k);
            frame[at] ^= 0x40;
            fix_crc(&mut frame);
            assert_eq!(open(&frame, &k), Err(FrameError::BadTag), "byte {at}");
        }
    }

    #[test]
    fn replay_into_another_connection_fails() {
        let (ka, kb) = (key(0xA), key(0xB));
        let frame = sealed(sample(), &[b"for conn A"], &ka);
        assert!(open(&frame, &ka).is_ok());
        // Same bytes offered to connection B: different key.
        assert_eq!(open(&frame, &kb), Err(FrameError::BadTag));
        // conn_id rewritten to B's, CRC left alone: the CRC catches it.
        let mut moved = frame.clone();
        moved[16..24].copy_from_slice(&0xBBBB_u64.to_be_bytes());
        assert!(matches!(open(&moved, &ka), Err(FrameError::BadCrc { .. })));
        // ... and with the CRC fixed, the tag does, even under A's key.
        fix_crc(&mut moved);
        assert_eq!(open(&moved, &ka), Err(FrameError::BadTag));
        assert_eq!(open(&moved, &kb), Err(FrameError::BadTag));
    }

    #[test]
    fn truncated_frames_are_wire_errors() {
        let k = key(1);
        let frame = sealed(sample(), &[b"0123456789"], &k);
        assert_eq!(
            open(&frame[..frame.len() - 1], &k),
            Err(FrameError::Wire(WireError::TruncatedPayload {
                len: 10,
                available: 9
            }))
        );
        assert_eq!(
            open(&frame[..40], &k),
            Err(FrameError::Wire(WireError::ShortHeader { got: 40 }))
        );
        assert_eq!(
            open(&[], &k),
            Err(FrameError::Wire(WireError::ShortHeader { got: 0 }))
        );
    }

    #[test]
    fn oversized_payload_rejected_header_untouched() {
        let big = vec![0u8; MAX_PAYLOAD as usize];
        let mut h = sample();
        let before = h;
        assert_eq!(
            seal(&mut h, &[&big, b"!"], &key(1)),
            Err(FrameError::PayloadTooLarge(MAX_PAYLOAD as usize + 1))
        );
        assert_eq!(h, before);
        // Exactly the maximum is fine.
        let frame = sealed(sample(), &[&big[..10], &big[10..]], &key(1));
        assert_eq!(open(&frame, &key(1)).unwrap().1.len(), MAX_PAYLOAD as usize);
    }

    #[test]
    fn pack_lays_frames_out_aligned() {
        let k = key(7);
        let payloads: [&[&[u8]]; 4] = [&[b"hello"], &[], &[b"01234567"], &[b"ab", b"cdefghijklm"]];
        let frames: Vec<OutFrame<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut h = sample();
                h.seq = i as u64;
                OutFrame::sealed(h, p, &k).unwrap()
            })
            .collect();
        let mut buf = vec![0xEE; 3]; // existing content: frames start at 8
        pack(&frames, &mut buf).unwrap();
        assert_eq!(buf.len(), 8 + packed_len(&frames));
        assert_eq!(&buf[3..8], &[0; 5]);
        let data = &buf[8..];
        let found: Vec<_> = Frames::new(data).collect::<Result<_, _>>().unwrap();
        assert_eq!(found.len(), 4);
        for (loc, (frame, p)) in found.iter().zip(frames.iter().zip(payloads)) {
            assert_eq!(loc.offset % ALIGN, 0);
            let (h, payload) = open(loc.bytes(data), &k).unwrap();
            assert_eq!(h, frame.header);
            assert_eq!(payload, p.concat());
            // Padding is zero.
            let end = loc.offset + HEADER_LEN + payload.len();
            assert!(data[end..loc.offset + h.span()].iter().all(|&b| b == 0));
        }

        // pack_into gives the same bytes, and leaves the rest alone.
        let mut flat = vec![0xCC; packed_len(&frames) + 5];
        assert_eq!(pack_into(&frames, &mut flat), Ok(packed_len(&frames)));
        assert_eq!(&flat[..packed_len(&frames)], data);
        assert_eq!(&flat[packed_len(&frames)..], &[0xCC; 5]);
        let mut small = vec![0xCC; packed_len(&frames) - 1];
        assert_eq!(
            pack_into(&frames, &mut small),
            Err(FrameError::BufferTooSmall {
                needed: packed_len(&frames),
                available: small.len()
            })
        );
        assert!(small.iter().all(|&b| b == 0xCC));
        assert_eq!(pack_into(&[], &mut []), Ok(0));
    }

    #[test]
    fn pack_rejects_unsealed_lengths() {
        let k = key(7);
        let good = OutFrame::sealed(sample(), &[b"abc"], &k).unwrap();
        let mut bad = good;
        bad.header.payload_len = 4;
        let mut buf = vec![1, 2];
        assert_eq!(
            pack(&[good, bad], &mut buf),
            Err(FrameError::LengthMismatch {
                header: 4,
                slices: 3
            })
        );
        assert_eq!(buf, [1, 2]);
        assert!(pack_into(&[bad], &mut [0; 256]).is_err());
        assert_eq!(
            bad.check(),
            Err(FrameError::LengthMismatch {
                header: 4,
                slices: 3
            })
        );
        let shown = format!("{good:?}");
        assert!(shown.contains("payload_bytes: 3"));
    }

    /// Arbitrary header fields and a payload cut at arbitrary points.
    fn header_and_payload() -> impl Strategy<Value = (Header, Vec<u8>, Vec<usize>)> {
        (
            any::<(u8, u16, u32, u32)>(),
            any::<(u64, u64, u64, u32)>(),
            proptest::collection::vec(any::<u8>(), 0..600),
            proptest::collection::vec(any::<usize>(), 0..6),
        )
            .prop_map(
                |((kind, flags, src, dst), (conn, seq, ack, credit), payload, cuts)| {
                    let h = Header {
                        kind: Kind(kind),
                        flags: Flags(flags),
                        src_port: src,
                        dst_port: dst,
                        conn_id: conn,
                        seq,
                        ack,
                        credit,
                        ..Header::default()
                    };
                    let mut cuts: Vec<usize> =
                        cuts.iter().map(|c| c % (payload.len() + 1)).collect();
                    cuts.sort_unstable();
                    (h, payload, cuts)
                },
            )
    }

    fn split<'a>(payload: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts {
            out.push(&payload[at..c]);
            at = c;
        }
        out.push(&payload[at..]);
        out
    }

    proptest! {
        #[test]
        fn open_of_seal((h, payload, cuts) in header_and_payload(), k in any::<[u8; 32]>()) {
            let k = FrameKey::from_bytes(k);
            let slices = split(&payload, &cuts);
            let mut sealed_h = h;
            let head = seal(&mut sealed_h, &slices, &k).unwrap();
            let mut whole_h = h;
            prop_assert_eq!(seal(&mut whole_h, &[&payload], &k).unwrap(), head);
            let mut frame = head.to_vec();
            frame.extend_from_slice(&payload);
            let (got, p) = open(&frame, &k).unwrap();
            prop_assert_eq!(got, sealed_h);
            prop_assert_eq!(p, &payload[..]);
            let expect = Header { payload_len: payload.len() as u32, crc32c: got.crc32c, tag: got.tag, ..h };
            prop_assert_eq!(got, expect);
        }

        #[test]
        fn any_single_byte_change_is_caught((h, payload, _) in header_and_payload(),
                                           at in any::<usize>(), x in 1..=255u8) {
            let k = key(9);
            let mut frame = sealed(h, &[&payload], &k);
            let at = at % frame.len();
            frame[at] ^= x;
            prop_assert!(open(&frame, &k).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = open(&bytes, &key(1));
        }

        #[test]
        fn plausible_headers_never_panic((h, _, _) in header_and_payload(), len in 0..200u32,
                                         rest in proptest::collection::vec(any::<u8>(), 0..200),
                                         crc in any::<u32>()) {
            // Structurally valid headers over random contents reach the CRC
            // and tag checks.
            let mut bytes = Header { payload_len: len, crc32c: crc, ..h }.to_bytes().to_vec();
            bytes.extend_from_slice(&rest);
            let r = open(&bytes, &key(1));
            prop_assert!(r.is_err());
        }
    }
}
