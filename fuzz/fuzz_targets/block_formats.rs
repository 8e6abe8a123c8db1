//! Block mode's on-disk formats as read back from shared LUNs any host
//! can write: the superblock (and the layout it describes), producer and
//! consumer index blocks, and a slot with the frames packed in it; and the
//! doorbell datagram anyone on the LAN can send.
//!
//! Properties: decoded blocks encode to bytes that decode to the same
//! value; a slot that opens yields a byte range inside the slot; the head
//! of a long slot is never taken for a short one; layout
//! arithmetic on any superblock that passes its check never overflows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stp_core::block::{
    long_slot_head, open_slot, IndexBlock, Ring, Superblock, SHORT_SLOT, SLOT_HEADER_LEN,
};
use stp_core::wire::Frames;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = Superblock::decode(data) {
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
        let layout = sb.layout;
        if layout.problem().is_none() {
            let required = layout.required_blocks();
            for src in 0..layout.hosts {
                for dst in 0..layout.hosts {
                    let lane = layout.lane_offset(src, dst);
                    assert_eq!(lane.is_none(), src == dst);
                    if let Some(lane) = lane {
                        assert!(lane + layout.lane_blocks() <= required);
                        for slot in [0, layout.slots - 1, layout.slots] {
                            if let Some(at) = layout.slot_offset(src, dst, slot) {
                                assert!(slot < layout.slots);
                                assert!(at + u64::from(layout.slot_blocks) <= required);
                            }
                        }
                    }
                }
            }
        } else {
            let _ = layout.required_blocks();
            let _ = layout.lane_offset(0, 1);
            let _ = layout.slot_offset(1, 0, 0);
        }
    }
    if let Ok(ix) = IndexBlock::decode(data) {
        assert_eq!(IndexBlock::decode(&ix.encode()), Ok(ix));
    }
    if let Ok(r) = Ring::decode(data) {
        assert_eq!(r.encode().as_slice(), data);
        let _ = r.is_for(r.stg_id, u64::from(r.generation), 16, r.dst);
    }
    // The slot's own generation field, so the fuzzer gets past that check.
    let generation = data
        .get(8..16)
        .map_or(0, |g| u64::from_be_bytes(g.try_into().unwrap_or_default()));
    if let Ok((_, frames)) = open_slot(data, generation) {
        assert!(!frames.is_empty() && frames.len() <= data.len() - SLOT_HEADER_LEN);
        for f in Frames::new(frames) {
            if f.is_err() {
                break;
            }
        }
    }
    // A probe's judgement of a first block (format 3): a long slot's head
    // is never also a short slot that opens.
    if let Some((_, used)) = long_slot_head(data, generation) {
        assert!(used > SHORT_SLOT);
        assert!(open_slot(data, generation)
            .map_or(true, |(_, f)| f.len() + SLOT_HEADER_LEN > SHORT_SLOT));
    }
    let _ = open_slot(data, 1);
});
