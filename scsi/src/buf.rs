//! Page-aligned I/O buffers.
//!
//! Direct I/O through the sg driver (`SG_FLAG_DIRECT_IO`) needs page-aligned
//! memory; a misaligned buffer silently falls back to copying. [`IoBuf`] is
//! built from 4 KiB-aligned pages, so every buffer qualifies, and it is
//! built without `unsafe`: the pages are plain zerocopy byte arrays.

use std::fmt;
use std::ops::{Deref, DerefMut};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

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
#[derive(Clone, Default)]
pub struct IoBuf {
    pages: Vec<Page>,
    len: usize,
}

impl IoBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> IoBuf {
        IoBuf {
            pages: vec![ZERO_PAGE; len.div_ceil(PAGE_SIZE)],
            len,
        }
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
            self.pages.resize(pages, ZERO_PAGE);
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
