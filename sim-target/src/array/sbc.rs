//! The SBC commands beyond READ and WRITE: VERIFY, WRITE SAME, COMPARE AND
//! WRITE, and on a thin-provisioned LUN UNMAP and GET LBA STATUS. Their
//! CDBs were checked (usage data, range, data-out length) before they get
//! here; what is left is the work and the parameter list.
//!
//! Thin provisioning is the store's own sparseness: a 64 KiB chunk
//! ([`CHUNK`]) is mapped while it holds data and deallocated (reading as
//! zeros, LBPRZ) otherwise, so GET LBA STATUS reports extents of whole
//! chunks and the optimal unmap granularity is a chunk.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use scsi::provisioning::{LbaStatus, LbaStatusDescriptor, ProvisioningStatus, UnmapList};
use scsi::sense::FieldPointer;
use scsi::{Asc, Sense, SenseKey};

use super::{Array, Lun};
use crate::lun::CHUNK;
use crate::task::{Task, TaskResult};

/// The most LBA status descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 1024;

/// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION with the offset of the
/// first byte that differs in INFORMATION (SBC-3 §5.2, §5.33).
fn miscompare(offset: usize) -> Sense {
    Sense::new(SenseKey::MISCOMPARE, Asc::MISCOMPARE_DURING_VERIFY).with_information(offset as u64)
}

/// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST pointing at `byte`
/// of the parameter list.
fn invalid_parameter(byte: usize, bit: Option<u8>) -> Sense {
    Sense::new(
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_FIELD_IN_PARAMETER_LIST,
    )
    .with_field_pointer(FieldPointer {
        in_cdb: false,
        bit,
        byte: u16::try_from(byte).unwrap_or(u16::MAX),
    })
}

impl Array {
    /// VERIFY(10/16): with BYTCHK 0 only the range (checked already); with
    /// BYTCHK 1 the data-out compared with the blocks.
    pub(super) fn verify(&self, lun: &Arc<Lun>, lba: u64, blocks: u64, bytchk: u8, task: Task) {
        if bytchk == 0 {
            return task.complete(TaskResult::good(0));
        }
        let bs = u64::from(lun.config.block_size);
        let total = usize::try_from(blocks * bs).unwrap_or(usize::MAX);
        let mut piece = vec![0u8; CHUNK.min(total)];
        let mut done = 0;
        while done < total {
            let n = piece.len().min(total - done);
            let got = task.reply.read_out(done, &mut piece[..n]);
            piece[got..n].fill(0);
            if let Some(at) = lun
                .store
                .first_difference(lba * bs + done as u64, &piece[..n])
            {
                return self.fail(task, miscompare(done + at));
            }
            done += n;
        }
        task.complete(TaskResult::good(0))
    }

    /// WRITE SAME(10/16): the one block of data-out written to every block
    /// of the range; with UNMAP (a thin LUN) an all-zero block deallocates
    /// the range instead, and any other block is written (SBC-3 lets the
    /// device server write rather than unmap; it must, since a deallocated
    /// block reads as zeros).
    pub(super) fn write_same(
        &self,
        lun: &Arc<Lun>,
        lba: u64,
        blocks: u64,
        unmap: bool,
        task: Task,
    ) {
        let bs = lun.config.block_size as usize;
        let mut block = vec![0u8; bs];
        let got = task.reply.read_out(0, &mut block);
        block[got..].fill(0);
        let offset = lba * bs as u64;
        let bytes = blocks * bs as u64;
        if unmap && block.iter().all(|&b| b == 0) {
            lun.store.unmap(offset, bytes);
            return task.complete(TaskResult::good(0));
        }
        // The range fits the WRITE SAME limit, so `bytes` fits in memory.
        let len = usize::try_from(bytes).unwrap_or(usize::MAX);
        lun.store.write_with(offset, len, |at, dst| {
            for (i, b) in dst.iter_mut().enumerate() {
                *b = block[(at + i) % bs];
            }
        });
        self.inner
            .stats
            .bytes_written
            .fetch_add(bytes, Ordering::Relaxed);
        task.complete(TaskResult::good(0))
    }

    /// COMPARE AND WRITE: the first half of the data-out compared with the
    /// blocks and, if every byte matches, the second half written, as one
    /// atomic step (at most one block: it lies within one chunk).
    pub(super) fn compare_and_write(&self, lun: &Arc<Lun>, lba: u64, blocks: u64, task: Task) {
        if blocks == 0 {
            // As LIO: a zero-length COMPARE AND WRITE is no error.
            return task.complete(TaskResult::good(0));
        }
        let n = usize::try_from(blocks * u64::from(lun.config.block_size)).unwrap_or(usize::MAX);
        let mut data = vec![0u8; 2 * n];
        let got = task.reply.read_out(0, &mut data);
        data[got..].fill(0);
        let (expected, new) = data.split_at(n);
        let offset = lba * u64::from(lun.config.block_size);
        match lun.store.compare_and_write(offset, expected, new) {
            Ok(()) => {
                self.inner
                    .stats
                    .bytes_written
                    .fetch_add(n as u64, Ordering::Relaxed);
                task.complete(TaskResult::good(0))
            }
            Err(at) => self.fail(task, miscompare(at)),
        }
    }

    /// UNMAP: the parameter list checked whole (descriptor count, each
    /// range against the limit and the capacity) before any block is
    /// deallocated.
    pub(super) fn unmap(&self, lun: &Arc<Lun>, param_len: u16, task: Task) {
        let len = usize::from(param_len);
        if len == 0 {
            return task.complete(TaskResult::good(0));
        }
        if len < scsi::provisioning::UNMAP_HEADER_LEN {
            return self.fail(
                task,
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::PARAMETER_LIST_LENGTH_ERROR),
            );
        }
        let mut params = vec![0u8; len];
        let got = task.reply.read_out(0, &mut params);
        params.truncate(got);
        let list = match UnmapList::parse(&params) {
            Ok(list) => list,
            Err(_) => {
                return self.fail(
                    task,
                    Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::PARAMETER_LIST_LENGTH_ERROR),
                )
            }
        };
        let c = &lun.config;
        if list.descriptors.len() > c.max_unmap_descriptors as usize {
            // UNMAP BLOCK DESCRIPTOR DATA LENGTH (bytes 2-3).
            return self.fail(task, invalid_parameter(2, Some(7)));
        }
        for (i, d) in list.descriptors.iter().enumerate() {
            let at =
                scsi::provisioning::UNMAP_HEADER_LEN + i * scsi::provisioning::UNMAP_DESCRIPTOR_LEN;
            if d.blocks > c.max_unmap_blocks {
                // Its NUMBER OF LOGICAL BLOCKS (bytes 8-11 of it).
                return self.fail(task, invalid_parameter(at + 8, Some(7)));
            }
            if let Err(sense) = Self::check_range(lun, d.lba, d.blocks.into()) {
                return self.fail(task, sense);
            }
        }
        let bs = u64::from(c.block_size);
        for d in &list.descriptors {
            lun.store.unmap(d.lba * bs, u64::from(d.blocks) * bs);
        }
        task.complete(TaskResult::good(0))
    }

    /// GET LBA STATUS: extents from `lba` on, mapped or deallocated, as
    /// many as the allocation length has room for (at least one; at most
    /// [`MAX_LBA_STATUS_DESCRIPTORS`]).
    pub(super) fn get_lba_status(&self, lun: &Arc<Lun>, lba: u64, alloc_len: u32, task: Task) {
        let c = &lun.config;
        if lba >= c.blocks {
            return self.fail(
                task,
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE).with_information(lba),
            );
        }
        let room = usize::try_from(alloc_len)
            .unwrap_or(usize::MAX)
            .saturating_sub(scsi::provisioning::LBA_STATUS_HEADER_LEN)
            / scsi::provisioning::LBA_STATUS_DESCRIPTOR_LEN;
        let max = room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let descriptors = lba_extents(lun, lba, max);
        let data = LbaStatus::new(descriptors).to_bytes();
        task.respond(&data, alloc_len as usize)
    }
}

/// Up to `max` extents of one provisioning status each, from block `lba`
/// to the end of the LUN: whole chunks, the first starting at `lba`.
fn lba_extents(lun: &Lun, lba: u64, max: usize) -> Vec<LbaStatusDescriptor> {
    let c = &lun.config;
    let bs = u64::from(c.block_size);
    let per_chunk = (CHUNK as u64 / bs).max(1);
    let mapped = lun.store.mapped_chunks_from(lba * bs);
    let mut next = mapped.iter().copied().peekable();
    let mut out = Vec::new();
    let mut at = lba;
    while at < c.blocks && out.len() < max {
        let chunk = at / per_chunk;
        while next.next_if(|&m| m < chunk).is_some() {}
        let (status, end) = if next.peek() == Some(&chunk) {
            // A run of consecutive mapped chunks.
            let mut last = chunk;
            while next.next_if_eq(&last).is_some() {
                last += 1;
            }
            (ProvisioningStatus::MAPPED, last * per_chunk)
        } else {
            let end = next.peek().map_or(c.blocks, |&m| m * per_chunk);
            (ProvisioningStatus::DEALLOCATED, end)
        };
        let mut left = end.min(c.blocks) - at;
        while left > 0 && out.len() < max {
            let n = left.min(u64::from(u32::MAX));
            out.push(LbaStatusDescriptor {
                lba: at,
                blocks: n as u32,
                status,
            });
            at += n;
            left -= n;
        }
    }
    out
}
