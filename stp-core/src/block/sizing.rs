//! Choosing a block layout from the members' limits (what `stp stg format`
//! does when the configuration leaves `slots` or `slot_blocks` out).
//!
//! A slot is one WRITE and, when full, one READ, so the largest slot the
//! path carries in one command is the cheapest per byte: the slot size is
//! the smallest of [`MAX_SLOT_BYTES`] (the 1 MiB per command every host
//! keeps to, PROTOCOL.md §3), each member's MAXIMUM TRANSFER LENGTH (VPD
//! page B0h), the host's own limit for the path (the block queue's
//! `max_hw_sectors_kb`, where the caller knows it) and
//! [`BlockConfig::max_transfer_bytes`], rounded down to whole blocks. A
//! small message costs no more in a large slot: a producer writes only the
//! blocks it uses, and a consumer reads a lone slot by its head first.
//! The ring then holds about [`RING_BYTES`] per lane, within the smallest
//! member's capacity. A slot size the configuration fixes is kept if one
//! command carries it, and refused otherwise.

use scsi::inquiry::{vpd, VpdPage};
use scsi::Transport;

use super::{check_layout, member_capacity, BlockConfig, BlockError};
use crate::stg::BlockLayout;
use crate::wire::{ALIGN, HEADER_LEN};

/// The largest slot chosen: one 1 MiB command.
pub const MAX_SLOT_BYTES: u64 = 1 << 20;
/// The ring size per lane aimed at (slots × slot size), when the members
/// hold it: several send buffers' worth, so a producer rarely waits.
pub const RING_BYTES: u64 = 16 << 20;
/// The fewest slots chosen per ring.
pub const MIN_SLOTS: u32 = 4;
/// The most slots chosen per ring.
pub const MAX_SLOTS: u32 = 1024;

/// What the caller fixed; `None` fields are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayoutRequest {
    /// Hosts sharing the STG.
    pub hosts: u16,
    /// Slots per ring.
    pub slots: Option<u32>,
    /// Blocks per slot.
    pub slot_blocks: Option<u32>,
}

/// A chosen layout and why its slot size is what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// The layout.
    pub layout: BlockLayout,
    /// The members' block size.
    pub block_size: u32,
    /// Bytes per slot.
    pub slot_bytes: u64,
    /// What set the slot size (for the operator).
    pub limited_by: String,
}

/// Chooses the layout of `paths` (one per member) for `request`, asking
/// each member its capacity and Block Limits; `host_limit` is the host's
/// own per-command limit for these paths in bytes, if known. Fields the
/// request fixes are kept (and checked). Fails as [`format`](super::format)
/// would: no members, blocks below 512 bytes, members too small even for
/// [`MIN_SLOTS`] slots of one block.
pub fn choose_layout(
    paths: &mut [Box<dyn Transport>],
    stg: u32,
    request: LayoutRequest,
    host_limit: Option<u64>,
) -> Result<Chosen, BlockError> {
    let config = BlockConfig::default();
    let mut block_size = 0;
    let mut capacity = u64::MAX;
    let mut limit = (MAX_SLOT_BYTES, "STP's 1 MiB per command".to_string());
    let mut lower = |bytes: u64, what: String| {
        if bytes > 0 && bytes < limit.0 {
            limit = (bytes, what);
        }
    };
    lower(
        u64::from(config.max_transfer_bytes),
        "the block-mode transfer limit".into(),
    );
    if let Some(b) = host_limit {
        lower(b, "this host's max_hw_sectors_kb for the path".into());
    }
    if paths.is_empty() {
        return Err(BlockError::NoMembers { stg });
    }
    for (member, p) in paths.iter_mut().enumerate() {
        let (blocks, bs) = member_capacity(stg, member, p.as_mut(), config.command_timeout)?;
        if member == 0 {
            block_size = bs;
        }
        capacity = capacity.min(blocks);
        // A LUN without the Block Limits page reports no limit.
        if let Ok(VpdPage::BlockLimits(l)) = vpd(p.as_mut(), VpdPage::BLOCK_LIMITS) {
            lower(
                u64::from(l.max_transfer_length) * u64::from(bs),
                format!("member {member}'s MAXIMUM TRANSFER LENGTH (VPD B0h)"),
            );
        }
    }
    let bs = u64::from(block_size);
    // A slot holds its header and at least one frame header and a byte.
    let min_slot_blocks = ((super::SLOT_HEADER_LEN + HEADER_LEN + ALIGN) as u64).div_ceil(bs);
    let (mut slot_blocks, mut limited_by) = match request.slot_blocks {
        // A larger slot would take several commands each way, one at a
        // time: refused, not slowly served.
        Some(n) if u64::from(n) * bs > limit.0 => {
            return Err(BlockError::SlotAboveTransferLimit {
                stg,
                slot_blocks: n,
                slot_bytes: u64::from(n) * bs,
                limit: limit.0,
                what: limit.1,
                max_blocks: limit.0 / bs,
            })
        }
        Some(n) => (u64::from(n), "the configuration".to_string()),
        None => ((limit.0 / bs).max(min_slot_blocks), limit.1),
    };
    let lanes = u64::from(request.hosts) * u64::from(request.hosts.saturating_sub(1));
    // Blocks left for rings after the superblock and the index blocks.
    let room = capacity.saturating_sub(1 + 2 * lanes) / lanes.max(1);
    let slots = loop {
        let want = match request.slots {
            Some(n) => u64::from(n),
            None => (RING_BYTES / (slot_blocks * bs)).clamp(MIN_SLOTS.into(), MAX_SLOTS.into()),
        };
        let fits = room / slot_blocks;
        if fits >= want {
            break want;
        }
        if request.slots.is_none() && fits >= u64::from(MIN_SLOTS) {
            break fits;
        }
        if request.slot_blocks.is_some() || slot_blocks <= min_slot_blocks {
            // Nothing left to shrink: format's own check says how far off.
            break want;
        }
        slot_blocks = (slot_blocks / 2).max(min_slot_blocks);
        limited_by = "the members' capacity".into();
    };
    let layout = BlockLayout {
        hosts: request.hosts,
        slots: u32::try_from(slots).unwrap_or(u32::MAX),
        slot_blocks: u32::try_from(slot_blocks).unwrap_or(u32::MAX),
    };
    check_layout(stg, &layout)?;
    Ok(Chosen {
        layout,
        block_size,
        slot_bytes: slot_blocks * bs,
        limited_by,
    })
}
