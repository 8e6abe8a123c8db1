//! Page-aligned I/O buffers.
//!
//! Direct I/O through the sg driver (`SG_FLAG_DIRECT_IO`) needs page-aligned
//! memory; a misaligned buffer silently falls back to copying. [`IoBuf`] is
//! built from 4 KiB-aligned pages, so every buffer qualifies, and it is
//! built without `unsafe`: the pages are plain zerocopy byte arrays.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// The alignment and growth unit of an [`IoBuf`].
pub const PAGE_SIZE: usize = 4096;

#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE]);

const ZERO_PAGE: Page = Page([0; PAGE_SIZE]);

/// An owned, page-aligned, zero-initialised byte buffer with a length that
/// can change within its capacity (a whole number of pages).
///
/// A [`Command`](crate::Command) owns its `IoBuf` while it is in flight and
/// hands it back in its [`Completion`](crate::Completion).
///
/// Each allocation has an [`id`](IoBuf::id) no other allocation of the
/// process shares (a clone, or a resize that reallocates, gets a new one):
/// an engine that registers buffers with the kernel keys its table by it.
#[derive(Default)]
pub struct IoBuf {
    pages: Vec<Page>,
    len: usize,
    id: u64,
    pooled: bool,
}

/// The next allocation id (0 is the empty default buffer's).
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Clone for IoBuf {
    fn clone(&self) -> IoBuf {
        IoBuf {
            pages: self.pages.clone(),
            len: self.len,
            id: next_id(),
            pooled: false,
        }
    }
}

impl IoBuf {
    /// A zeroed buffer of `len` bytes.
    ///
    /// The pages come from the allocator's `alloc_zeroed`. For a
    /// page-aligned layout the standard allocator takes aligned memory and
    /// writes zeros over it (calloc serves only small alignments), so a new
    /// buffer costs one pass over its bytes and faults its pages in: the
    /// pools ([`crate::pool::BufPool`]) exist to make this rare.
    pub fn new(len: usize) -> IoBuf {
        let n = len.div_ceil(PAGE_SIZE);
        let pages = Page::new_vec_zeroed(n).unwrap_or_else(|_| vec![ZERO_PAGE; n]);
        IoBuf {
            pages,
            len,
            id: next_id(),
            pooled: false,
        }
    }

    /// The allocation's identity: unique among the live allocations of the
    /// process and never reused, changed when the pages move.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True when the buffer came from a [`BufPool`](crate::pool::BufPool)
    /// (it will be used again, so registering it with a ring pays).
    pub fn is_pooled(&self) -> bool {
        self.pooled
    }

    pub(crate) fn set_pooled(&mut self) {
        self.pooled = true;
    }

    /// The start of the whole allocation (all `capacity()` bytes), for
    /// registering it with the kernel.
    pub(crate) fn base_ptr(&mut self) -> *mut u8 {
        self.pages.as_mut_bytes().as_mut_ptr()
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::new(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// The bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }

    /// Sets the length; grows the allocation (new bytes zeroed) when `len`
    /// exceeds the capacity. Bytes beyond a shortened length keep their value.
    pub fn resize(&mut self, len: usize) {
        let pages = len.div_ceil(PAGE_SIZE);
        if pages > self.pages.len() {
            let moves = pages > self.pages.capacity();
            self.pages.resize(pages, ZERO_PAGE);
            if moves {
                self.id = next_id();
            }
        }
        self.len = len;
    }

    /// Fills the whole buffer with `byte`.
    pub fn fill(&mut self, byte: u8) {
        self.as_mut_slice().fill(byte);
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.pages.as_bytes()[..self.len]
    }

    /// The buffer's bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.pages.as_mut_bytes()[..len]
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &IoBuf) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for IoBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let buf = IoBuf::new(len);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|&b| b == 0));
            if len > 0 {
                assert_eq!(buf.as_ptr() as usize % PAGE_SIZE, 0, "len {len}");
            }
        }
    }

    #[test]
    fn ids_are_unique_per_allocation() {
        let a = IoBuf::new(4096);
        let b = a.clone();
        assert_ne!(a.id(), b.id());
        assert!(!a.is_pooled());
        let mut c = IoBuf::new(4096);
        let before = c.id();
        c.resize(100);
        assert_eq!(c.id(), before, "no reallocation");
        c.resize(1 << 20);
        assert_ne!(c.id(), before, "the pages moved");
    }

    #[test]
    fn resize_keeps_and_zeroes() {
        let mut buf = IoBuf::from_slice(b"hello");
        buf.resize(3);
        assert_eq!(&buf[..], b"hel");
        buf.resize(5);
        assert_eq!(&buf[..], b"hello");
        buf.resize(9000);
        assert_eq!(buf.capacity(), 3 * PAGE_SIZE);
        assert!(buf[5..].iter().all(|&b| b == 0));
    }
}
