//! Logical units: identity, geometry and sparse in-memory storage.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::ConfigError;

/// Storage is allocated in chunks of this many bytes, on first write; a
/// never-written chunk reads as zeros. A 1 TiB LUN costs nothing until used.
/// It is also the unit of thin provisioning: a chunk is mapped while it is
/// allocated, deallocated (and reads as zeros) otherwise.
pub const CHUNK: usize = 64 * 1024;

/// How a logical unit presents itself: geometry and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LunConfig {
    /// Number of logical blocks.
    pub blocks: u64,
    /// Logical block size in bytes (512 or 4096 are typical).
    pub block_size: u32,
    /// T10 vendor identification (at most 8 ASCII characters).
    pub vendor: String,
    /// Product identification (at most 16 ASCII characters).
    pub product: String,
    /// Product revision level (at most 4 ASCII characters).
    pub revision: String,
    /// Unit serial number (VPD 0x80), printable ASCII.
    pub serial: String,
    /// The 16-byte NAA 6 (IEEE registered extended) designator of VPD 0x83:
    /// the stable identity hosts use to recognise this LUN.
    pub naa: [u8; 16],
    /// Largest transfer in blocks the LUN accepts in one command (VPD 0xB0).
    pub max_transfer_blocks: u32,
    /// Whether the LUN supports the DPO and FUA bits of READ and WRITE (the
    /// DPOFUA bit of MODE SENSE). As in LIO, a CDB with either bit set to a
    /// LUN without them is INVALID FIELD IN CDB; LIO's ramdisk has none.
    pub dpofua: bool,
    /// Thin provisioned (logical block provisioning management, SBC-3
    /// §4.7): READ CAPACITY(16) reports LBPME and LBPRZ, VPD page 0xB2
    /// LBPU, LBPWS and LBPWS10, and the LUN takes UNMAP, WRITE SAME with
    /// the UNMAP bit and GET LBA STATUS, as LIO's fileio backstore does with
    /// `emulate_tpu`, `emulate_tpws` and `unmap_zeroes_data` set. Without
    /// it the LUN is fully provisioned, like LIO's ramdisk: UNMAP is an
    /// unsupported command and the UNMAP bit an invalid field.
    pub thin: bool,
    /// MAXIMUM UNMAP LBA COUNT (VPD 0xB0): blocks one UNMAP block
    /// descriptor may cover.
    pub max_unmap_blocks: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT (VPD 0xB0).
    pub max_unmap_descriptors: u32,
    /// MAXIMUM WRITE SAME LENGTH (VPD 0xB0), in blocks.
    pub max_write_same_blocks: u32,
}

/// The IEEE company id this simulator puts in its NAA designators.
pub const SIM_OUI: u32 = 0x53_54_50;

impl LunConfig {
    /// A LUN of `blocks` × `block_size` bytes whose identity (serial and NAA)
    /// derives from `id`, which must be unique within the array.
    pub fn new(id: u64, blocks: u64, block_size: u32) -> LunConfig {
        LunConfig {
            blocks,
            block_size,
            vendor: "STP".into(),
            product: "SIM-ARRAY LUN".into(),
            revision: "0001".into(),
            serial: format!("STPSIM{id:010}"),
            naa: naa_for(SIM_OUI, id),
            max_transfer_blocks: (8 << 20) / block_size.max(1),
            dpofua: true,
            thin: true,
            max_unmap_blocks: 1 << 20,
            max_unmap_descriptors: 64,
            // A WRITE SAME writes (and allocates) at most what one WRITE
            // may: 8 MiB.
            max_write_same_blocks: (8 << 20) / block_size.max(1),
        }
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    /// The NAA designator as hosts print it (`naa.6…`, lowercase hex).
    pub fn naa_string(&self) -> String {
        let mut s = String::from("naa.");
        for b in self.naa {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Checks the configuration; errors name the field and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, why: String| Err(ConfigError::InvalidLun { field, why });
        if !(512..=65536).contains(&self.block_size) || !self.block_size.is_power_of_two() {
            return bad(
                "block_size",
                format!(
                    "{} is not a power of two between 512 and 65536",
                    self.block_size
                ),
            );
        }
        if self.blocks == 0 {
            return bad("blocks", "a LUN needs at least one block".into());
        }
        if self
            .blocks
            .checked_mul(u64::from(self.block_size))
            .is_none()
        {
            return bad("blocks", "capacity overflows 64 bits".into());
        }
        for (field, value, max) in [
            ("vendor", &self.vendor, 8),
            ("product", &self.product, 16),
            ("revision", &self.revision, 4),
            ("serial", &self.serial, 252),
        ] {
            if value.len() > max || !value.bytes().all(|b| (0x20..0x7F).contains(&b)) {
                return bad(
                    field,
                    format!("{value:?} must be at most {max} printable ASCII characters"),
                );
            }
        }
        if self.naa[0] >> 4 != 6 {
            return bad(
                "naa",
                "must be an NAA 6 (IEEE registered extended) designator".into(),
            );
        }
        for (field, value) in [
            ("max_transfer_blocks", self.max_transfer_blocks),
            ("max_unmap_blocks", self.max_unmap_blocks),
            ("max_unmap_descriptors", self.max_unmap_descriptors),
            ("max_write_same_blocks", self.max_write_same_blocks),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        Ok(())
    }
}

/// An NAA 6 designator: NAA nibble, 24-bit company id, 36-bit vendor
/// specific identifier (the low 36 bits of `id`), and a 64-bit extension
/// (the rest of `id` under a fixed tag).
pub fn naa_for(oui: u32, id: u64) -> [u8; 16] {
    let hi: u64 = (6u64 << 60) | (u64::from(oui & 0xFF_FFFF) << 36) | (id & 0xF_FFFF_FFFF);
    let lo: u64 = 0x5354_5053_494d_0000 ^ (id >> 36);
    let mut naa = [0u8; 16];
    naa[..8].copy_from_slice(&hi.to_be_bytes());
    naa[8..].copy_from_slice(&lo.to_be_bytes());
    naa
}

/// One chunk of storage, locked on its own.
type Chunk = Arc<RwLock<Box<[u8]>>>;

/// A logical unit's data: sparse chunks, each behind its own reader-writer
/// lock.
///
/// Atomicity is per chunk, not per command, as on a real target ("nothing
/// is atomic beyond one command", and not even one command is atomic
/// against another): a command's copy takes each chunk's lock only while
/// it copies that piece, so concurrent commands on overlapping ranges may
/// interleave at chunk boundaries (64 KiB), and a reader may see part of a
/// concurrent write. No lock is held between pieces or while another chunk
/// is locked.
#[derive(Debug)]
pub struct LunStore {
    capacity: u64,
    chunks: RwLock<HashMap<u64, Chunk>>,
}

impl LunStore {
    /// An all-zero store of `capacity` bytes.
    pub fn new(capacity: u64) -> LunStore {
        LunStore {
            capacity,
            chunks: RwLock::new(HashMap::new()),
        }
    }

    /// Bytes in the store.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of memory the written chunks occupy.
    pub fn allocated(&self) -> u64 {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        chunks.len() as u64 * CHUNK as u64
    }

    /// The chunk at `index`, if it was ever written.
    fn chunk(&self, index: u64) -> Option<Chunk> {
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        chunks.get(&index).cloned()
    }

    /// The chunk at `index`, allocated (zeroed) if it was never written.
    fn chunk_or_insert(&self, index: u64) -> Chunk {
        if let Some(chunk) = self.chunk(index) {
            return chunk;
        }
        let mut chunks = self.chunks.write().unwrap_or_else(|e| e.into_inner());
        chunks
            .entry(index)
            .or_insert_with(|| Arc::new(RwLock::new(vec![0u8; CHUNK].into_boxed_slice())))
            .clone()
    }

    /// Calls `f(offset_in_request, bytes)` for each piece of
    /// `[offset, offset + len)`, in order; unwritten pieces are zeros.
    /// Each piece is read under its chunk's lock, taken for that piece only.
    /// The caller has range-checked the request.
    pub fn read_with(&self, offset: u64, len: usize, mut f: impl FnMut(usize, &[u8])) {
        static ZEROS: [u8; CHUNK] = [0; CHUNK];
        for (done, index, within, n) in pieces(offset, len) {
            match self.chunk(index) {
                Some(chunk) => {
                    let chunk = chunk.read().unwrap_or_else(|e| e.into_inner());
                    f(done, &chunk[within..within + n]);
                }
                None => f(done, &ZEROS[..n]),
            }
        }
    }

    /// Fills `[offset, offset + len)` by calling `f(offset_in_request, dst)`
    /// for each piece, allocating chunks as needed. Each piece is written
    /// under its chunk's lock, taken for that piece only.
    pub fn write_with(&self, offset: u64, len: usize, mut f: impl FnMut(usize, &mut [u8])) {
        for (done, index, within, n) in pieces(offset, len) {
            let chunk = self.chunk_or_insert(index);
            let mut chunk = chunk.write().unwrap_or_else(|e| e.into_inner());
            f(done, &mut chunk[within..within + n]);
        }
    }

    /// The offset in `[offset, offset + expected.len())` of the first byte
    /// that differs from `expected`, if any. Each piece is compared under
    /// its chunk's lock, as [`read_with`](Self::read_with) reads it.
    pub fn first_difference(&self, offset: u64, expected: &[u8]) -> Option<usize> {
        let mut found = None;
        self.read_with(offset, expected.len(), |at, src| {
            if found.is_none() {
                found = first_mismatch(src, &expected[at..at + src.len()]).map(|i| at + i);
            }
        });
        found
    }

    /// Deallocates `[offset, offset + len)`: it reads as zeros from now on.
    /// A chunk the range covers whole is dropped; a chunk it covers in
    /// part is zeroed there, and dropped too when nothing else in it holds
    /// data. A write racing with this on the same chunk may land before or
    /// after it, as any two overlapping commands may.
    pub fn unmap(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.capacity);
        if end <= offset {
            return;
        }
        let first = offset / CHUNK as u64;
        let last = (end - 1) / CHUNK as u64;
        let whole = |index: u64| {
            let start = index * CHUNK as u64;
            offset <= start && start + CHUNK as u64 <= end
        };
        // Only allocated chunks need anything: visit whichever is fewer,
        // the chunks in the range or those allocated.
        let mut visit: Vec<u64> = {
            let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
            if (last - first) as usize >= chunks.len() {
                chunks
                    .keys()
                    .copied()
                    .filter(|i| (first..=last).contains(i))
                    .collect()
            } else {
                (first..=last).filter(|i| chunks.contains_key(i)).collect()
            }
        };
        visit.sort_unstable();
        for index in visit {
            if whole(index) {
                let mut chunks = self.chunks.write().unwrap_or_else(|e| e.into_inner());
                chunks.remove(&index);
                continue;
            }
            let Some(chunk) = self.chunk(index) else {
                continue;
            };
            let start = index * CHUNK as u64;
            let from = (offset.max(start) - start) as usize;
            let to = (end.min(start + CHUNK as u64) - start) as usize;
            let mut data = chunk.write().unwrap_or_else(|e| e.into_inner());
            data[from..to].fill(0);
            if data.iter().all(|&b| b == 0) {
                // Dropped under its own lock, so no write into it is lost
                // between the check and the removal (writers lock it first).
                let mut chunks = self.chunks.write().unwrap_or_else(|e| e.into_inner());
                if chunks.get(&index).is_some_and(|c| Arc::ptr_eq(c, &chunk)) {
                    chunks.remove(&index);
                }
            }
        }
    }

    /// Compares `[offset, offset + expected.len())` with `expected` and,
    /// when they match, writes `new` there, atomically against every other
    /// access to the store: the range must lie within one chunk (one
    /// logical block always does). Returns the offset of the first byte
    /// that differs, if any; then nothing is written.
    pub fn compare_and_write(&self, offset: u64, expected: &[u8], new: &[u8]) -> Result<(), usize> {
        let index = offset / CHUNK as u64;
        let within = (offset % CHUNK as u64) as usize;
        let n = expected.len().min(new.len()).min(CHUNK - within);
        let chunk = match self.chunk(index) {
            Some(chunk) => chunk,
            // Never written: compare with zeros before allocating anything.
            None => match first_mismatch(&vec![0u8; n], &expected[..n]) {
                Some(at) => return Err(at),
                None => self.chunk_or_insert(index),
            },
        };
        let mut data = chunk.write().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = first_mismatch(&data[within..within + n], &expected[..n]) {
            return Err(at);
        }
        data[within..within + n].copy_from_slice(&new[..n]);
        Ok(())
    }

    /// Whether the chunk holding byte `offset` is allocated (mapped).
    pub fn is_mapped(&self, offset: u64) -> bool {
        self.chunk(offset / CHUNK as u64).is_some()
    }

    /// The allocated chunks from the one holding byte `offset` on, by
    /// index (chunk `i` holds bytes `i * CHUNK..(i + 1) * CHUNK`),
    /// ascending.
    pub fn mapped_chunks_from(&self, offset: u64) -> Vec<u64> {
        let first = offset / CHUNK as u64;
        let chunks = self.chunks.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u64> = chunks.keys().copied().filter(|&i| i >= first).collect();
        v.sort_unstable();
        v
    }
}

/// The index of the first byte where `a` and `b` differ.
fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Splits a byte range into (offset in request, chunk index, offset in
/// chunk, length) pieces that each stay within one chunk.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (usize, u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let index = at / CHUNK as u64;
        let within = (at % CHUNK as u64) as usize;
        let n = (CHUNK - within).min(len - done);
        let piece = (done, index, within, n);
        done += n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_store_reads_zeros_and_round_trips_across_chunks() {
        let store = LunStore::new(1 << 30);
        assert_eq!(store.allocated(), 0);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let offset = (CHUNK as u64) - 100;
        store.write_with(offset, data.len(), |at, dst| {
            dst.copy_from_slice(&data[at..at + dst.len()])
        });
        let mut back = vec![0xAAu8; data.len() + 200];
        store.read_with(offset - 100, back.len(), |at, src| {
            back[at..at + src.len()].copy_from_slice(src)
        });
        assert!(back[..100].iter().all(|&b| b == 0));
        assert_eq!(&back[100..100 + data.len()], &data[..]);
        assert!(back[100 + data.len()..].iter().all(|&b| b == 0));
        assert_eq!(store.allocated(), 5 * CHUNK as u64);
    }

    #[test]
    fn commands_interleave_at_chunk_boundaries() {
        use std::sync::mpsc;
        use std::thread;
        use std::time::Duration;

        // While a two-chunk read is between its pieces, a write to the
        // second chunk completes and the read sees it: the read holds no
        // lock over the whole command (it did, before: the writer blocked).
        let store = LunStore::new(1 << 20);
        store.write_with(0, CHUNK, |_, dst| dst.fill(0x11));
        let mut seen = vec![0u8; 2 * CHUNK];
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            store.read_with(0, 2 * CHUNK, |at, src| {
                if at == 0 {
                    let (store, tx) = (&store, tx.clone());
                    s.spawn(move || {
                        store.write_with(CHUNK as u64, CHUNK, |_, dst| dst.fill(0xAB));
                        let _ = tx.send(());
                    });
                    rx.recv_timeout(Duration::from_secs(10))
                        .expect("a write to another chunk waited for the whole read");
                }
                seen[at..at + src.len()].copy_from_slice(src);
            });
        });
        assert!(seen[..CHUNK].iter().all(|&b| b == 0x11));
        assert!(seen[CHUNK..].iter().all(|&b| b == 0xAB));

        // And while a two-chunk write copies its second piece, its first is
        // already visible to a reader: the write does not hold it either.
        let store = LunStore::new(1 << 20);
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            store.write_with(0, 2 * CHUNK, |at, dst| {
                dst.fill(0x22);
                if at == CHUNK {
                    let (store, tx) = (&store, tx.clone());
                    s.spawn(move || {
                        let mut first = Vec::new();
                        store.read_with(0, CHUNK, |_, src| first.extend_from_slice(src));
                        let _ = tx.send(first);
                    });
                    let first = rx
                        .recv_timeout(Duration::from_secs(10))
                        .expect("a read of a finished chunk waited for the whole write");
                    assert!(first.iter().all(|&b| b == 0x22));
                }
            });
        });
    }

    #[test]
    fn config_validation_names_the_field() {
        let good = LunConfig::new(1, 1024, 512);
        good.validate().unwrap();
        assert!(good.naa_string().starts_with("naa.6535450"));
        let mut c = good.clone();
        c.block_size = 1000;
        assert!(c.validate().unwrap_err().to_string().contains("block_size"));
        let mut c = good.clone();
        c.vendor = "WAY-TOO-LONG".into();
        assert!(c.validate().unwrap_err().to_string().contains("vendor"));
        let mut c = good;
        c.blocks = 0;
        assert!(c.validate().unwrap_err().to_string().contains("blocks"));
    }

    #[test]
    fn naa_is_unique_per_id() {
        let a = naa_for(SIM_OUI, 1);
        let b = naa_for(SIM_OUI, 2);
        assert_ne!(a, b);
        assert_eq!(a[0] >> 4, 6);
    }
}
