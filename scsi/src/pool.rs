//! A pool of page-aligned DMA buffers ([`IoBuf`]) shared by every stream of
//! a process.
//!
//! The data path takes a buffer per SEND and per RECEIVE; allocating one
//! means zeroed pages and page faults on first touch (a profile once showed
//! 19% of a stream's time there). The pool hands out buffers that were used
//! before, *not* zeroed: whoever takes one writes every byte it then sends
//! (frames are sealed over their whole span, padding included) or lets the
//! device overwrite it (RECEIVE), and reads back only what the device said
//! it wrote. Buffers are kept by size class (powers of two from 4 KiB);
//! beyond `limit` bytes kept, returned buffers are freed.
//!
//! Buffers handed out are marked [`IoBuf::is_pooled`]: the bsg engine
//! ([`bsg`](crate::bsg)) registers those with its ring as fixed buffers the
//! first time it sees them, since they come back again and again.

use std::sync::{Mutex, OnceLock};

use crate::buf::{IoBuf, PAGE_SIZE};

/// Size classes: 4 KiB, 8 KiB, ... 8 MiB (block mode reads up to 4 MiB of
/// slots per command).
const CLASSES: usize = 12;

/// Buffers by size class, reused without zeroing.
#[derive(Debug)]
pub struct BufPool {
    inner: Mutex<Inner>,
    limit: usize,
}

#[derive(Debug, Default)]
struct Inner {
    free: [Vec<IoBuf>; CLASSES],
    kept_bytes: usize,
    stats: PoolStats,
}

/// What a pool has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Buffers newly allocated (zeroed pages).
    pub allocated: u64,
    /// Buffers handed out again.
    pub reused: u64,
    /// Buffers freed because the pool was full.
    pub dropped: u64,
    /// Buffers now waiting in the pool.
    pub free_buffers: usize,
    /// Bytes now waiting in the pool.
    pub free_bytes: usize,
}

fn class_of(capacity: usize) -> Option<usize> {
    let pages = capacity.div_ceil(PAGE_SIZE).max(1);
    let class = pages.next_power_of_two().trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

impl BufPool {
    /// A pool keeping at most `limit` bytes of free buffers.
    pub fn new(limit: usize) -> BufPool {
        BufPool {
            inner: Mutex::new(Inner::default()),
            limit,
        }
    }

    /// The process-wide pool (64 MiB kept at most).
    pub fn global() -> &'static std::sync::Arc<BufPool> {
        static POOL: OnceLock<std::sync::Arc<BufPool>> = OnceLock::new();
        POOL.get_or_init(|| std::sync::Arc::new(BufPool::new(64 << 20)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes whose contents are unspecified (left from
    /// its last use, or zero when new).
    pub fn get(&self, len: usize) -> IoBuf {
        let Some(class) = class_of(len) else {
            self.lock().stats.allocated += 1;
            return IoBuf::new(len);
        };
        let mut inner = self.lock();
        if let Some(mut buf) = inner.free[class].pop() {
            inner.kept_bytes -= buf.capacity();
            inner.stats.reused += 1;
            drop(inner);
            buf.resize(len);
            buf.set_pooled();
            return buf;
        }
        inner.stats.allocated += 1;
        drop(inner);
        let mut buf = IoBuf::new(PAGE_SIZE << class);
        buf.resize(len);
        buf.set_pooled();
        buf
    }

    /// Returns a buffer for reuse (freed if the pool is full, or the buffer
    /// is of no class: empty, or larger than the largest).
    pub fn put(&self, buf: IoBuf) {
        let cap = buf.capacity();
        let class = class_of(cap).filter(|&c| PAGE_SIZE << c == cap);
        let mut inner = self.lock();
        match class {
            Some(c) if inner.kept_bytes + cap <= self.limit => {
                inner.kept_bytes += cap;
                inner.free[c].push(buf);
            }
            _ => inner.stats.dropped += 1,
        }
    }

    /// Counters and what the pool holds now.
    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            free_buffers: inner.free.iter().map(Vec::len).sum(),
            free_bytes: inner.kept_bytes,
            ..inner.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_class_without_zeroing() {
        let pool = BufPool::new(1 << 20);
        let mut a = pool.get(5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.capacity(), 8192);
        a.fill(0xAB);
        pool.put(a);
        let b = pool.get(7000);
        assert_eq!(b.len(), 7000);
        assert_eq!(b[..5000], [0xAB; 5000][..], "reused as it was");
        let s = pool.stats();
        assert_eq!((s.allocated, s.reused, s.free_buffers), (1, 1, 0));
        assert_eq!(b.as_ptr() as usize % PAGE_SIZE, 0);
    }

    #[test]
    fn bounded_and_odd_buffers_are_freed() {
        let pool = BufPool::new(8192);
        pool.put(pool.get(8192));
        pool.put(pool.get(1)); // a 4 KiB class: over the limit now
        assert_eq!(pool.stats().free_bytes, 8192);
        assert_eq!(pool.stats().dropped, 1);
        pool.put(IoBuf::new(3 * PAGE_SIZE)); // not a power of two
        pool.put(IoBuf::default());
        assert_eq!(pool.stats().dropped, 3);
        let big = pool.get(8 << 20); // beyond the classes: plain allocation
        assert_eq!(big.len(), 8 << 20);
    }
}
