//! Recycled byte buffers for the array's copies of command data (the STG
//! mailbox reads each SEND into one).
//!
//! * Buffers come in power-of-two size classes from [`MIN_CLASS`] to
//!   [`MAX_CLASS`]; a request takes the smallest class that holds it, so a
//!   1 MiB SEND reuses a buffer some earlier SEND of 512 KiB + 1 … 1 MiB left.
//! * A [`PooledBuf`] goes back to its pool when it is dropped (for the
//!   mailbox: when the last queued frame that refers to it is delivered or
//!   dropped). The pool keeps at most `keep_bytes` of free buffers; beyond
//!   that a returned buffer is freed.
//! * A reused buffer is **not** zeroed: its bytes are whatever the previous
//!   user left. The holder overwrites the range it uses before reading it
//!   (the mailbox reads the whole data-out into it, zero-filling only what
//!   a misbehaving front end did not supply). Only a new allocation is
//!   zeroed, once, because safe Rust cannot hand out uninitialised memory.
//! * Lock discipline: one mutex, a leaf. It is held only to push or pop a
//!   free buffer and update counters, never while data is copied; callers
//!   may hold their own locks when a buffer comes back (a mailbox drops
//!   queued frames under its state lock), and the pool never calls out.

use std::sync::{Arc, Mutex, MutexGuard};

/// The smallest size class, in bytes.
pub(crate) const MIN_CLASS: usize = 1 << MIN_SHIFT;
/// The largest size class, in bytes: the largest transfer a 24-bit CDB
/// length can describe fits in it. Larger requests get a buffer of their
/// own, freed after use.
pub(crate) const MAX_CLASS: usize = 1 << MAX_SHIFT;
const MIN_SHIFT: u32 = 9;
const MAX_SHIFT: u32 = 24;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;

/// Counters of a [`BufPool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PoolStats {
    /// Buffers allocated (and zeroed) because none of the class was free.
    pub allocated: u64,
    /// Requests served with a previously used buffer.
    pub reused: u64,
    /// Buffers freed on return because the pool already kept its limit.
    pub discarded: u64,
    /// Bytes of free buffers kept now.
    pub kept_bytes: u64,
}

struct Inner {
    /// Free buffers by class (index 0 is [`MIN_CLASS`]), most recently
    /// returned last (reused first: its memory is the likeliest in cache).
    free: [Vec<Box<[u8]>>; CLASSES],
    kept: usize,
    stats: PoolStats,
}

/// A pool of byte buffers in size classes, with a bound on the bytes of
/// free buffers it keeps.
pub(crate) struct BufPool {
    inner: Mutex<Inner>,
    keep_bytes: usize,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("keep_bytes", &self.keep_bytes)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The class index and size for a request of `len` bytes, if a class holds it.
fn class_of(len: usize) -> Option<(usize, usize)> {
    let size = len.max(MIN_CLASS).checked_next_power_of_two()?;
    (size <= MAX_CLASS).then(|| ((size.trailing_zeros() - MIN_SHIFT) as usize, size))
}

impl BufPool {
    /// An empty pool that keeps at most `keep_bytes` of free buffers.
    pub(crate) fn new(keep_bytes: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            inner: Mutex::new(Inner {
                free: std::array::from_fn(|_| Vec::new()),
                kept: 0,
                stats: PoolStats::default(),
            }),
            keep_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes whose contents are unspecified (a reused
    /// buffer keeps its previous user's bytes): overwrite before reading.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let data = match class_of(len) {
            _ if len == 0 => Box::default(),
            Some((class, size)) => {
                let reused = {
                    let mut inner = self.lock();
                    let got = inner.free[class].pop();
                    match got {
                        Some(_) => {
                            inner.kept -= size;
                            inner.stats.reused += 1;
                        }
                        None => inner.stats.allocated += 1,
                    }
                    got
                };
                // A new buffer is allocated outside the lock.
                reused.unwrap_or_else(|| vec![0u8; size].into_boxed_slice())
            }
            None => {
                self.lock().stats.allocated += 1;
                vec![0u8; len].into_boxed_slice()
            }
        };
        PooledBuf {
            data,
            len,
            pool: self.clone(),
        }
    }

    /// Takes back a buffer, or frees it (outside the lock) if it is not of
    /// a class or the pool is full.
    fn put(&self, data: Box<[u8]>) {
        let size = data.len();
        let Some((class, _)) = class_of(size).filter(|&(_, s)| s == size) else {
            return; // empty, or one of its own
        };
        let mut inner = self.lock();
        if inner.kept + size > self.keep_bytes {
            inner.stats.discarded += 1;
            drop(inner);
            drop(data);
            return;
        }
        inner.kept += size;
        inner.free[class].push(data);
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            kept_bytes: inner.kept as u64,
            ..inner.stats
        }
    }
}

/// A buffer taken from a [`BufPool`]: `len` bytes, returned to the pool
/// when dropped.
pub(crate) struct PooledBuf {
    /// The class-sized allocation (empty for a zero-length request).
    data: Box<[u8]>,
    len: usize,
    pool: Arc<BufPool>,
}

impl PooledBuf {
    /// The buffer's bytes, to fill.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.len)
            .field("class", &self.data.len())
            .finish()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(0), Some((0, MIN_CLASS)));
        assert_eq!(class_of(1), Some((0, MIN_CLASS)));
        assert_eq!(class_of(MIN_CLASS), Some((0, MIN_CLASS)));
        assert_eq!(class_of(MIN_CLASS + 1), Some((1, 2 * MIN_CLASS)));
        assert_eq!(class_of(1 << 20), Some((11, 1 << 20)));
        assert_eq!(class_of((1 << 20) - 80), Some((11, 1 << 20)));
        assert_eq!(class_of((1 << 24) - 1), Some((CLASSES - 1, MAX_CLASS)));
        assert_eq!(class_of(MAX_CLASS + 1), None);
        assert_eq!(class_of(usize::MAX), None);
    }

    #[test]
    fn a_returned_buffer_is_reused_as_it_was_not_zeroed() {
        let pool = BufPool::new(1 << 20);
        let mut a = pool.take(3000);
        assert_eq!(a.len(), 3000);
        a.as_mut_slice().fill(0xA5);
        let at = a.as_ptr();
        drop(a);
        assert_eq!(pool.stats().kept_bytes, 4096);
        // Same class (2049..=4096 bytes): the same memory, old bytes intact.
        let b = pool.take(2100);
        assert_eq!(b.len(), 2100);
        assert_eq!(b.as_ptr(), at);
        assert!(b.iter().all(|&x| x == 0xA5));
        // Another class: a new, zeroed allocation.
        let c = pool.take(5000);
        assert!(c.iter().all(|&x| x == 0));
        assert_eq!(
            pool.stats(),
            PoolStats {
                allocated: 2,
                reused: 1,
                discarded: 0,
                kept_bytes: 0,
            }
        );
    }

    #[test]
    fn the_pool_keeps_at_most_its_limit() {
        let pool = BufPool::new(10 << 10);
        let bufs: Vec<_> = (0..4).map(|_| pool.take(4096)).collect();
        drop(bufs);
        // Two 4 KiB buffers fit in 10 KiB; the other two are freed.
        let s = pool.stats();
        assert_eq!((s.kept_bytes, s.discarded), (8 << 10, 2));
        // Zero-length and oversize requests never enter the pool.
        drop(pool.take(0));
        let big = pool.take(MAX_CLASS + 1);
        assert_eq!(big.len(), MAX_CLASS + 1);
        drop(big);
        let s = pool.stats();
        assert_eq!((s.kept_bytes, s.allocated, s.reused), (8 << 10, 5, 0));
    }
}
