//! Received payload bytes, shared without copying.
//!
//! A RECEIVE buffer holds the frames of one command. Once they are opened
//! (decrypted in place), each DATA frame's payload becomes a [`Chunk`]: a
//! range of that buffer, reference-counted, so the connection's reassembly
//! buffer holds the bytes where the device wrote them. The last chunk
//! dropped returns the buffer to its pool ([`RecvBuf`]). A reader copies
//! out of a chunk once (`Read`), or takes the chunk itself (the lending
//! API, no copy).

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

use scsi::pool::BufPool;
use scsi::IoBuf;

/// A RECEIVE buffer that goes back to its pool when the last [`Chunk`] of
/// it is dropped.
pub struct RecvBuf {
    buf: IoBuf,
    pool: Option<Arc<BufPool>>,
}

impl RecvBuf {
    /// Wraps `buf`, to be returned to `pool` (if any) when dropped.
    pub fn new(buf: IoBuf, pool: Option<Arc<BufPool>>) -> RecvBuf {
        RecvBuf { buf, pool }
    }
}

impl RecvBuf {
    /// The buffer itself, no longer bound for the pool (its new owner
    /// returns it).
    pub fn into_buf(mut self) -> IoBuf {
        self.pool = None;
        std::mem::take(&mut self.buf)
    }
}

impl AsRef<[u8]> for RecvBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.put(std::mem::take(&mut self.buf));
        }
    }
}

/// Payload bytes: a range of a shared buffer.
#[derive(Clone)]
pub struct Chunk {
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Chunk {
    /// `range` of a shared buffer; `None` when the range is outside it.
    pub fn new(data: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Option<Chunk> {
        let len = (*data).as_ref().len();
        (range.start <= range.end && range.end <= len).then_some(Chunk { data, range })
    }

    /// A chunk holding a copy of `bytes` (small frames, tests).
    pub fn copied(bytes: &[u8]) -> Chunk {
        Chunk {
            range: 0..bytes.len(),
            data: Arc::new(bytes.to_vec()),
        }
    }

    /// The bytes from `offset` on (a partly read chunk).
    pub fn tail(mut self, offset: usize) -> Chunk {
        self.range.start = (self.range.start + offset).min(self.range.end);
        self
    }
}

impl Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.data).as_ref()[self.range.clone()]
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Chunk({} bytes)", self.range.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_tails() {
        let c = Chunk::copied(b"hello, stp");
        assert_eq!(&c[..], b"hello, stp");
        assert_eq!(&c.clone().tail(7)[..], b"stp");
        assert!(c.clone().tail(99).is_empty());
        let shared: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(b"abcdef".to_vec());
        assert_eq!(&Chunk::new(shared.clone(), 2..4).unwrap()[..], b"cd");
        assert!(Chunk::new(shared, 4..7).is_none());
    }

    #[test]
    fn the_last_chunk_returns_the_buffer_to_its_pool() {
        let pool = Arc::new(BufPool::new(8 << 20));
        let buf = pool.get(4096);
        let recv: Arc<dyn AsRef<[u8]> + Send + Sync> =
            Arc::new(RecvBuf::new(buf, Some(pool.clone())));
        let a = Chunk::new(recv.clone(), 0..10).unwrap();
        let b = Chunk::new(recv, 10..20).unwrap();
        assert_eq!(pool.stats().free_buffers, 0);
        drop(a);
        assert_eq!(pool.stats().free_buffers, 0);
        drop(b);
        assert_eq!(pool.stats().free_buffers, 1);
    }
}
