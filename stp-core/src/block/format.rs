//! Block mode's on-disk formats (docs/PROTOCOL.md §4): the superblock at
//! LBA 0 of every member, the producer and consumer index blocks of each
//! lane, and the header of every slot.
//!
//! Each has an exact wire layout (`Raw*`, zerocopy, big-endian fields, no
//! padding) and a parsed form. **No-panic contract:** every `decode` and
//! [`open_slot`] accepts any byte slice, of any length and content, and
//! returns a value or a typed error; nothing here indexes past what it
//! checked. Property tests feed arbitrary bytes to each and check that
//! `decode(encode(x)) == x` and that a changed byte is caught by the CRC
//! (of a slot, a changed header byte, and in a short slot any byte).
//! The bytes come from LUNs every host on the fabric can write: a decoded
//! value is well-formed, not trustworthy (callers check generations,
//! counts and ranges against what they know).

use zerocopy::byteorder::{BigEndian, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::stg::BlockLayout;

/// Superblock magic, `"STPBLKv4"`: block format 4, whose slot CRC covers
/// the slot header, and the frames too in a slot of at most [`SHORT_SLOT`]
/// bytes (which a consumer may then read before any index announces it),
/// and whose producer blocks give the sizes of the latest slots (so a
/// consumer reads a slot by its size, not whole).
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"STPBLKv4";
/// The block format [`SUPERBLOCK_MAGIC`] names.
pub const FORMAT: u8 = 4;
/// The magics of block formats 1 (slot CRC over the whole slot), 2 (slot
/// CRC over the header alone) and 3 (no slot sizes in the producer
/// blocks), which this version refuses with an error that says to
/// reformat.
pub const SUPERBLOCK_MAGIC_OLD: [[u8; 8]; 3] = [*b"STPBLKv1", *b"STPBLKv2", *b"STPBLKv3"];
/// A slot of at most this many bytes (header and frames) is *short*: its
/// CRC covers its frames as well, so it is whole when its CRC holds
/// whatever the index blocks say. It fits the first block of its slot on
/// any LUN (blocks are 512 bytes at least).
pub const SHORT_SLOT: usize = 512;
/// Bytes of the superblock that carry data (the rest of block 0 is zero).
pub const SUPERBLOCK_LEN: usize = 44;
/// Producer block magic, `"STPP"`.
pub const PRODUCER_MAGIC: u32 = 0x5354_5050;
/// Consumer block magic, `"STPC"`.
pub const CONSUMER_MAGIC: u32 = 0x5354_5043;
/// Slot sizes a producer block carries: those of the latest this many
/// slots on its member (a consumer further behind reads a slot's head to
/// learn its size).
pub const INDEX_SIZES: usize = 64;
/// Bytes of a producer or consumer block that carry data.
pub const INDEX_LEN: usize = 32 + 4 * INDEX_SIZES;
/// Bytes of the header at the start of every slot: byte count (u32),
/// CRC32C (u32), generation (u64), lane sequence number (u64).
pub const SLOT_HEADER_LEN: usize = 24;

/// The superblock's exact layout.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSuperblock {
    /// [`SUPERBLOCK_MAGIC`].
    pub magic: [u8; 8],
    /// The STG id.
    pub stg_id: U32<BigEndian>,
    /// This member's index.
    pub member_index: U16<BigEndian>,
    /// The STG's member count.
    pub member_count: U16<BigEndian>,
    /// Hosts sharing the STG.
    pub hosts: U16<BigEndian>,
    /// Zero.
    pub reserved: [u8; 2],
    /// The block size formatted with.
    pub block_size: U32<BigEndian>,
    /// Slots per lane.
    pub slots: U32<BigEndian>,
    /// Blocks per slot.
    pub slot_blocks: U32<BigEndian>,
    /// The format generation.
    pub generation: U64<BigEndian>,
    /// CRC32C of the 40 bytes before it.
    pub crc: U32<BigEndian>,
}

/// An index block's exact layout.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawIndex {
    /// [`PRODUCER_MAGIC`] or [`CONSUMER_MAGIC`].
    pub magic: U32<BigEndian>,
    /// The format generation.
    pub generation: U64<BigEndian>,
    /// Slots produced or consumed.
    pub count: U64<BigEndian>,
    /// The writer's restarts.
    pub epoch: U64<BigEndian>,
    /// In a producer block, the bytes (header and frames) of the slot
    /// numbered `n` on this member at `sizes[n % INDEX_SIZES]`, for the
    /// latest [`INDEX_SIZES`] slots below `count`; 0 where not known. Zero
    /// in a consumer block.
    pub sizes: [U32<BigEndian>; INDEX_SIZES],
    /// CRC32C of the bytes before it.
    pub crc: U32<BigEndian>,
}

/// A slot header's exact layout.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSlotHeader {
    /// Bytes of frames after the header.
    pub count: U32<BigEndian>,
    /// CRC32C of the header with this field zero, followed in a short
    /// slot ([`SHORT_SLOT`]) by its frames. A longer slot's frames are not
    /// covered: each is authenticated by its own protection (§7), and such
    /// a slot is read only after its producer index, written after the
    /// slot's WRITE completed, says it is there.
    pub crc: U32<BigEndian>,
    /// The format generation.
    pub generation: U64<BigEndian>,
    /// The lane's sequence number of this slot.
    pub seq: U64<BigEndian>,
}

const _: () = assert!(std::mem::size_of::<RawSuperblock>() == SUPERBLOCK_LEN);
const _: () = assert!(std::mem::size_of::<RawIndex>() == INDEX_LEN);
const _: () = assert!(std::mem::size_of::<RawSlotHeader>() == SLOT_HEADER_LEN);

/// Bytes of the superblock the CRC covers.
const SUPERBLOCK_CRC_COVERS: usize = SUPERBLOCK_LEN - 4;
/// Bytes of an index block the CRC covers.
const INDEX_CRC_COVERS: usize = INDEX_LEN - 4;

/// The superblock at LBA 0 of every member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The STG id.
    pub stg_id: u32,
    /// This member's index in the STG (its position in `members`).
    pub member_index: u16,
    /// The STG's member count.
    pub member_count: u16,
    /// Hosts, slots and slot size.
    pub layout: BlockLayout,
    /// The block size the member was formatted with.
    pub block_size: u32,
    /// The format generation: random, new on every format.
    pub generation: u64,
}

/// Why block 0 is not a valid superblock.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SuperblockError {
    /// Fewer bytes than a superblock.
    #[error("superblock truncated: {0} bytes, need {SUPERBLOCK_LEN}")]
    Short(usize),
    /// No `STPBLKv4` magic: never formatted for block mode.
    #[error("no block-mode superblock (magic is not \"STPBLKv4\")")]
    NotFormatted,
    /// Formatted by an earlier STP in an older block format (1 to 3),
    /// which this version does not speak.
    #[error(
        "formatted in block format {0} by an earlier STP; this version speaks block format {FORMAT}: \
         reformat the STG with `stp stg format` on one host, then reopen it on every host"
    )]
    OldFormat(u8),
    /// The magic is right but the CRC is not: torn or overwritten.
    #[error("superblock CRC32C mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})")]
    BadCrc {
        /// The CRC in the block.
        stored: u32,
        /// The CRC of the block's bytes.
        computed: u32,
    },
}

impl Superblock {
    /// The superblock's bytes (pad to the block size with zeros).
    pub fn encode(&self) -> [u8; SUPERBLOCK_LEN] {
        let mut raw = RawSuperblock {
            magic: SUPERBLOCK_MAGIC,
            stg_id: self.stg_id.into(),
            member_index: self.member_index.into(),
            member_count: self.member_count.into(),
            hosts: self.layout.hosts.into(),
            reserved: [0; 2],
            block_size: self.block_size.into(),
            slots: self.layout.slots.into(),
            slot_blocks: self.layout.slot_blocks.into(),
            generation: self.generation.into(),
            crc: 0.into(),
        };
        raw.crc = crc32c::crc32c(&raw.as_bytes()[..SUPERBLOCK_CRC_COVERS]).into();
        let mut b = [0u8; SUPERBLOCK_LEN];
        b.copy_from_slice(raw.as_bytes());
        b
    }

    /// Parses block 0. Checks magic and CRC; the caller checks the rest.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, SuperblockError> {
        let Ok((raw, _)) = RawSuperblock::ref_from_prefix(bytes) else {
            return Err(SuperblockError::Short(bytes.len()));
        };
        if let Some(old) = SUPERBLOCK_MAGIC_OLD.iter().position(|m| *m == raw.magic) {
            return Err(SuperblockError::OldFormat(old as u8 + 1));
        }
        if raw.magic != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::NotFormatted);
        }
        let stored = raw.crc.get();
        let computed = crc32c::crc32c(&raw.as_bytes()[..SUPERBLOCK_CRC_COVERS]);
        if stored != computed {
            return Err(SuperblockError::BadCrc { stored, computed });
        }
        Ok(Superblock {
            stg_id: raw.stg_id.get(),
            member_index: raw.member_index.get(),
            member_count: raw.member_count.get(),
            layout: BlockLayout {
                hosts: raw.hosts.get(),
                slots: raw.slots.get(),
                slot_blocks: raw.slot_blocks.get(),
            },
            block_size: raw.block_size.get(),
            generation: raw.generation.get(),
        })
    }
}

/// Which index block: the producer's or the consumer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexKind {
    /// `"STPP"`, written only by the lane's source host.
    Producer,
    /// `"STPC"`, written only by the lane's destination host.
    Consumer,
}

impl IndexKind {
    fn magic(self) -> u32 {
        match self {
            IndexKind::Producer => PRODUCER_MAGIC,
            IndexKind::Consumer => CONSUMER_MAGIC,
        }
    }
}

/// A producer or consumer block: `magic` u32, `generation` u64, `count` u64
/// (slots produced / consumed), `epoch` u64 (the writer's restarts),
/// `sizes` ([`INDEX_SIZES`] × u32: a producer's latest slot sizes), CRC32C
/// of the preceding bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexBlock {
    /// Producer or consumer.
    pub kind: IndexKind,
    /// The format generation it was written under.
    pub generation: u64,
    /// Slots ever produced (producer block) or consumed (consumer block)
    /// on this lane of this member.
    pub count: u64,
    /// Incremented each time the writing host opens the STG.
    pub epoch: u64,
    /// A producer's slot sizes (see [`RawIndex::sizes`]); all 0 in a
    /// consumer block. Untrusted: a hint of how much of a slot to read.
    pub sizes: [u32; INDEX_SIZES],
}

/// Why a block is not a valid index block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// Fewer bytes than an index block.
    #[error("index block truncated: {0} bytes, need {INDEX_LEN}")]
    Short(usize),
    /// Neither `STPP` nor `STPC`.
    #[error("bad index block magic 0x{0:08x}")]
    BadMagic(u32),
    /// CRC mismatch: torn or overwritten.
    #[error("index block CRC32C mismatch")]
    BadCrc,
}

impl IndexBlock {
    /// A block with no slot sizes (a consumer's, or a producer's that knows
    /// none).
    pub fn new(kind: IndexKind, generation: u64, count: u64, epoch: u64) -> IndexBlock {
        IndexBlock {
            kind,
            generation,
            count,
            epoch,
            sizes: [0; INDEX_SIZES],
        }
    }

    /// The block's bytes (pad to the block size with zeros).
    pub fn encode(&self) -> [u8; INDEX_LEN] {
        let mut raw = RawIndex {
            magic: self.kind.magic().into(),
            generation: self.generation.into(),
            count: self.count.into(),
            epoch: self.epoch.into(),
            sizes: self.sizes.map(Into::into),
            crc: 0.into(),
        };
        raw.crc = crc32c::crc32c(&raw.as_bytes()[..INDEX_CRC_COVERS]).into();
        let mut b = [0u8; INDEX_LEN];
        b.copy_from_slice(raw.as_bytes());
        b
    }

    /// Parses an index block (magic and CRC; the caller checks the
    /// generation and the kind).
    pub fn decode(bytes: &[u8]) -> Result<IndexBlock, IndexError> {
        let Ok((raw, _)) = RawIndex::ref_from_prefix(bytes) else {
            return Err(IndexError::Short(bytes.len()));
        };
        let kind = match raw.magic.get() {
            PRODUCER_MAGIC => IndexKind::Producer,
            CONSUMER_MAGIC => IndexKind::Consumer,
            other => return Err(IndexError::BadMagic(other)),
        };
        if raw.crc.get() != crc32c::crc32c(&raw.as_bytes()[..INDEX_CRC_COVERS]) {
            return Err(IndexError::BadCrc);
        }
        Ok(IndexBlock {
            kind,
            generation: raw.generation.get(),
            count: raw.count.get(),
            epoch: raw.epoch.get(),
            sizes: raw.sizes.map(|s| s.get()),
        })
    }
}

/// The bytes a slot says it uses (its header and `count` frame bytes), from
/// its first bytes; `None` when they do not hold a header. Untrusted: only
/// a hint of how much to read ([`open_slot`] checks it).
pub fn slot_used(head: &[u8]) -> Option<usize> {
    let (raw, _) = RawSlotHeader::ref_from_prefix(head).ok()?;
    Some(SLOT_HEADER_LEN + raw.count.get() as usize)
}

/// Why a slot's contents are not trusted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// Fewer bytes than a slot header.
    #[error("slot truncated: {0} bytes")]
    Short(usize),
    /// The byte count runs past the slot (or is zero).
    #[error("slot byte count {count} does not fit the slot ({capacity} bytes for frames)")]
    BadCount {
        /// The count in the header.
        count: u32,
        /// Bytes available for frames.
        capacity: usize,
    },
    /// CRC mismatch: torn, stale or overwritten.
    #[error("slot CRC32C mismatch")]
    BadCrc,
    /// Written under another format generation.
    #[error("slot from format generation {found:#x}")]
    WrongGeneration {
        /// The generation in the header.
        found: u64,
    },
}

/// The CRC of a slot: its header with the CRC field zero, and its frames
/// when the slot is short ([`SHORT_SLOT`]).
fn slot_crc(header: &RawSlotHeader, frames: &[u8]) -> u32 {
    let mut head = *header;
    head.crc = 0.into();
    let crc = crc32c::crc32c(head.as_bytes());
    if SLOT_HEADER_LEN + frames.len() <= SHORT_SLOT {
        crc32c::crc32c_append(crc, frames)
    } else {
        crc
    }
}

/// Fills in the header of a slot image: `image` is [`SLOT_HEADER_LEN`]
/// bytes of room followed by the packed frames (no trailing padding). An
/// image shorter than a header, or with more than 4 GiB of frames, is left
/// as it is (no slot is that size).
pub fn seal_slot(image: &mut [u8], generation: u64, seq: u64) {
    let Ok((head, frames)) = RawSlotHeader::mut_from_prefix(image) else {
        return;
    };
    let Ok(count) = u32::try_from(frames.len()) else {
        return;
    };
    head.count = count.into();
    head.generation = generation.into();
    head.seq = seq.into();
    head.crc = slot_crc(head, frames).into();
}

/// The lane sequence number and size (header and frames) of a *long* slot
/// whose first bytes are `head`: `Some` when they hold a valid header of
/// `generation` for a slot larger than [`SHORT_SLOT`] (whose CRC covers
/// the header alone, so its head is enough to check it). Says only that
/// the slot's WRITE began: its frames are read once its index says so.
pub fn long_slot_head(head: &[u8], generation: u64) -> Option<(u64, usize)> {
    let (raw, _) = RawSlotHeader::ref_from_prefix(head).ok()?;
    let used = SLOT_HEADER_LEN.checked_add(raw.count.get() as usize)?;
    (used > SHORT_SLOT && raw.crc.get() == slot_crc(raw, &[]) && raw.generation.get() == generation)
        .then(|| (raw.seq.get(), used))
}

/// Checks a slot read back (any length from the header on, padding
/// included) and returns its lane sequence number and its frame bytes.
pub fn open_slot(slot: &[u8], generation: u64) -> Result<(u64, &[u8]), SlotError> {
    let Ok((head, rest)) = RawSlotHeader::ref_from_prefix(slot) else {
        return Err(SlotError::Short(slot.len()));
    };
    let count = head.count.get();
    let capacity = rest.len();
    let frames = match rest.get(..count as usize) {
        Some(f) if count > 0 => f,
        _ => return Err(SlotError::BadCount { count, capacity }),
    };
    if head.crc.get() != slot_crc(head, frames) {
        return Err(SlotError::BadCrc);
    }
    let found = head.generation.get();
    if found != generation {
        return Err(SlotError::WrongGeneration { found });
    }
    Ok((head.seq.get(), frames))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GEN: u64 = 0x0102_0304_0506_0708;

    fn padded(bytes: &[u8], len: usize) -> Vec<u8> {
        let mut v = bytes.to_vec();
        v.resize(len, 0);
        v
    }

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn superblock_literal_bytes() {
        let sb = Superblock {
            stg_id: 7,
            member_index: 1,
            member_count: 2,
            layout: BlockLayout {
                hosts: 2,
                slots: 32,
                slot_blocks: 64,
            },
            block_size: 512,
            generation: GEN,
        };
        let b = sb.encode();
        assert_eq!(&b[0..8], b"STPBLKv4");
        assert_eq!(&b[8..12], &[0, 0, 0, 7]);
        assert_eq!(&b[12..20], &[0, 1, 0, 2, 0, 2, 0, 0]);
        assert_eq!(&b[20..32], &[0, 0, 2, 0, 0, 0, 0, 32, 0, 0, 0, 64]);
        assert_eq!(&b[32..40], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[40..44], &[0x5F, 0xEA, 0x96, 0x98]);
        // Block 0 as read back: the superblock then zeros.
        let block = padded(&b, 512);
        assert_eq!(Superblock::decode(&block), Ok(sb));

        assert_eq!(
            Superblock::decode(&[0; 512]),
            Err(SuperblockError::NotFormatted)
        );
        for (magic, format) in [(b"STPBLKv1", 1), (b"STPBLKv2", 2), (b"STPBLKv3", 3)] {
            let mut old = block.clone();
            old[..8].copy_from_slice(magic);
            assert_eq!(
                Superblock::decode(&old),
                Err(SuperblockError::OldFormat(format))
            );
        }
        assert_eq!(
            Superblock::decode(&b[..43]),
            Err(SuperblockError::Short(43))
        );
        let mut torn = block.clone();
        torn[33] ^= 0x40; // generation changed, CRC not
        assert!(matches!(
            Superblock::decode(&torn),
            Err(SuperblockError::BadCrc {
                stored: 0x5FEA_9698,
                ..
            })
        ));
    }

    #[test]
    fn index_blocks_literal_bytes() {
        // Slots 4 and 5 of this member: 1 MiB, then 260 bytes.
        let mut sizes = [0; INDEX_SIZES];
        sizes[4] = 1 << 20;
        sizes[5] = 0x104;
        let p = IndexBlock {
            sizes,
            ..IndexBlock::new(IndexKind::Producer, GEN, 5, 3)
        };
        let b = p.encode();
        assert_eq!(b.len(), 288);
        assert_eq!(&b[0..4], b"STPP");
        assert_eq!(&b[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[12..20], &[0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&b[20..28], &[0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(&b[28..44], &[0; 16]);
        assert_eq!(&b[44..52], &[0, 0x10, 0, 0, 0, 0, 1, 4]);
        assert!(b[52..284].iter().all(|&x| x == 0));
        assert_eq!(&b[284..288], &[0x9A, 0x21, 0x5D, 0x4E]);
        assert_eq!(IndexBlock::decode(&padded(&b, 512)), Ok(p));

        let c = IndexBlock::new(IndexKind::Consumer, GEN, 4, 2);
        let b = c.encode();
        assert_eq!(&b[0..4], b"STPC");
        assert_eq!(&b[284..288], &[0x13, 0xF8, 0xEF, 0xE7]);
        assert_eq!(IndexBlock::decode(&b), Ok(c));

        assert_eq!(
            IndexBlock::decode(&[0; INDEX_LEN]),
            Err(IndexError::BadMagic(0))
        );
        assert_eq!(IndexBlock::decode(&b[..287]), Err(IndexError::Short(287)));
        let mut torn = b;
        torn[19] = 5; // count moved, CRC not
        assert_eq!(IndexBlock::decode(&torn), Err(IndexError::BadCrc));
        // Garbage never decodes as valid by accident here.
        assert!(IndexBlock::decode(&[0xA5; 512]).is_err());
    }

    #[test]
    fn slot_literal_bytes() {
        let mut image = vec![0u8; SLOT_HEADER_LEN];
        image.extend_from_slice(b"abc");
        seal_slot(&mut image, GEN, 9);
        assert_eq!(&image[0..4], &[0, 0, 0, 3]);
        // A short slot: the CRC runs over the header and then the frames.
        assert_eq!(&image[4..8], &[0xCC, 0x8C, 0xB2, 0xE7]);
        assert_eq!(&image[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&image[16..24], &[0, 0, 0, 0, 0, 0, 0, 9]);
        // Read back with the slot's padding (and stale bytes) after it.
        let mut slot = image.clone();
        slot.resize(512, 0xEE);
        assert_eq!(open_slot(&slot, GEN), Ok((9, &b"abc"[..])));
        assert_eq!(
            open_slot(&slot, GEN + 1),
            Err(SlotError::WrongGeneration { found: GEN })
        );
        let mut torn = slot.clone();
        torn[20] ^= 0x10; // the sequence number changed, the CRC not
        assert_eq!(open_slot(&torn, GEN), Err(SlotError::BadCrc));
        // A short slot's frames are the CRC's too (a long slot's are not:
        // their own protection judges them).
        let mut changed = slot.clone();
        changed[SLOT_HEADER_LEN + 1] = b'X';
        assert_eq!(open_slot(&changed, GEN), Err(SlotError::BadCrc));
        let mut long = slot.clone();
        long[0..4].copy_from_slice(&600u32.to_be_bytes());
        assert_eq!(
            open_slot(&long, GEN),
            Err(SlotError::BadCount {
                count: 600,
                capacity: 512 - SLOT_HEADER_LEN
            })
        );
        assert!(matches!(
            open_slot(&[0; 512], GEN),
            Err(SlotError::BadCount { count: 0, .. })
        ));
        assert_eq!(open_slot(&[0; 10], GEN), Err(SlotError::Short(10)));
        // Too short to hold a header: left alone.
        let mut tiny = [7u8; 10];
        seal_slot(&mut tiny, GEN, 1);
        assert_eq!(tiny, [7u8; 10]);
    }

    fn layout() -> impl Strategy<Value = BlockLayout> {
        (any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(hosts, slots, slot_blocks)| {
            BlockLayout {
                hosts,
                slots,
                slot_blocks,
            }
        })
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..600), gen in any::<u64>()) {
            let _ = Superblock::decode(&bytes);
            let _ = IndexBlock::decode(&bytes);
            if let Ok((_, frames)) = open_slot(&bytes, gen) {
                prop_assert!(frames.len() + SLOT_HEADER_LEN <= bytes.len());
            }
            if let Some((_, used)) = long_slot_head(&bytes, gen) {
                prop_assert!(used > SHORT_SLOT);
            }
            let _ = slot_used(&bytes);
        }

        #[test]
        fn superblocks_round_trip_and_catch_a_changed_byte(
            stg_id in any::<u32>(), member_index in any::<u16>(), member_count in any::<u16>(),
            layout in layout(), block_size in any::<u32>(), generation in any::<u64>(),
            at in 0..SUPERBLOCK_LEN, flip in 1..=255u8,
        ) {
            let sb = Superblock { stg_id, member_index, member_count, layout, block_size, generation };
            let mut b = sb.encode();
            prop_assert_eq!(Superblock::decode(&b), Ok(sb));
            b[at] ^= flip;
            prop_assert!(Superblock::decode(&b).is_err(), "a changed byte {} decoded", at);
        }

        #[test]
        fn index_blocks_round_trip_and_catch_a_changed_byte(
            producer in any::<bool>(), generation in any::<u64>(), count in any::<u64>(),
            epoch in any::<u64>(), at in 0..INDEX_LEN, flip in 1..=255u8,
            sizes in proptest::collection::vec(any::<u32>(), INDEX_SIZES),
        ) {
            let kind = if producer { IndexKind::Producer } else { IndexKind::Consumer };
            let mut ib = IndexBlock::new(kind, generation, count, epoch);
            ib.sizes.copy_from_slice(&sizes);
            let mut b = ib.encode();
            prop_assert_eq!(IndexBlock::decode(&b), Ok(ib));
            b[at] ^= flip;
            prop_assert!(IndexBlock::decode(&b).is_err());
        }

        #[test]
        fn slots_round_trip_and_catch_a_changed_header_byte(
            frames in proptest::collection::vec(any::<u8>(), 1..300), pad in 0..64usize,
            generation in any::<u64>(), seq in any::<u64>(), flip in 1..=255u8, at in any::<usize>(),
        ) {
            let mut image = vec![0u8; SLOT_HEADER_LEN];
            image.extend_from_slice(&frames);
            seal_slot(&mut image, generation, seq);
            let used = image.len();
            image.resize(used + pad, 0xEE);
            prop_assert_eq!(open_slot(&image, generation), Ok((seq, &frames[..])));
            let at = at % SLOT_HEADER_LEN.min(used);
            image[at] ^= flip;
            prop_assert!(open_slot(&image, generation) != Ok((seq, &frames[..])));
        }

        #[test]
        fn a_short_slot_catches_a_changed_frame_byte_and_a_long_one_leaves_it_to_the_frames(
            len in 1..1200usize, generation in any::<u64>(), seq in any::<u64>(),
            flip in 1..=255u8, at in any::<usize>(),
        ) {
            let mut image = vec![0u8; SLOT_HEADER_LEN + len];
            seal_slot(&mut image, generation, seq);
            let at = SLOT_HEADER_LEN + at % len;
            image[at] ^= flip;
            let opened = open_slot(&image, generation).map(|(s, f)| (s, f.len()));
            if SLOT_HEADER_LEN + len <= SHORT_SLOT {
                prop_assert_eq!(opened, Err(SlotError::BadCrc));
            } else {
                prop_assert_eq!(opened, Ok((seq, len)));
            }
        }
    }
}
