//! The SHA-256 of a data stream, computed on a thread of its own.
//!
//! Both ends of a backup's data stream hash every byte of it (the end of
//! the stream carries the sender's SHA-256; the receiver's is the
//! catalog's `archive_sha256`). On the thread that also reads files, hashes
//! each file and builds the tar stream (the sender), or receives, writes
//! and acknowledges segments (the receiver), that pass ran in series with
//! everything else (docs/PERFORMANCE.md, "Backups through the array"):
//! here it overlaps with them. Segments are handed over whole and in
//! order, at most [`QUEUE`] at a time, so a slow hash holds the stream back
//! rather than letting memory grow.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use sha2::{Digest, Sha256};

/// Segments waiting for the hashing thread at most.
pub const QUEUE: usize = 8;

/// A stream's SHA-256, fed segment by segment.
#[derive(Debug)]
pub struct StreamHasher {
    tx: Option<SyncSender<Arc<Vec<u8>>>>,
    /// Segments hashed, handed back for reuse (a receiver fills them
    /// again without allocating and zeroing a fresh one each time).
    spares: Option<Receiver<Arc<Vec<u8>>>>,
    thread: Option<JoinHandle<Sha256>>,
    /// Hashing inline: the thread could not be started.
    inline: Option<Sha256>,
    digest: Option<[u8; 32]>,
}

impl Default for StreamHasher {
    fn default() -> Self {
        StreamHasher::new()
    }
}

impl StreamHasher {
    /// A hasher with its thread started (or, if no thread can be started,
    /// one that hashes on the caller's thread).
    pub fn new() -> StreamHasher {
        let (tx, rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(QUEUE);
        let (back, spares) = mpsc::sync_channel::<Arc<Vec<u8>>>(QUEUE);
        let spawned = thread::Builder::new()
            .name("stp-backup-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for seg in rx {
                    h.update(&seg[..]);
                    // Full or gone: the segment is simply freed.
                    let _ = back.try_send(seg);
                }
                h
            });
        match spawned {
            Ok(t) => StreamHasher {
                tx: Some(tx),
                spares: Some(spares),
                thread: Some(t),
                inline: None,
                digest: None,
            },
            Err(_) => StreamHasher {
                tx: None,
                spares: None,
                thread: None,
                inline: Some(Sha256::new()),
                digest: None,
            },
        }
    }

    /// Adds the next segment of the stream.
    pub fn update(&mut self, seg: Arc<Vec<u8>>) {
        if let Some(h) = &mut self.inline {
            h.update(&seg[..]);
            return;
        }
        if let Some(tx) = &self.tx {
            if let Err(back) = tx.send(seg) {
                // The thread is gone (it panicked): the digest cannot be
                // right any more; `finish` reports it as all zeros, which
                // no stream has, so the check at the end fails loudly.
                drop(back);
                self.tx = None;
            }
        }
    }

    /// A segment already hashed that nobody else holds, to fill again
    /// (its length is the old segment's; its bytes are stale).
    pub fn spare(&mut self) -> Option<Vec<u8>> {
        let spares = self.spares.as_ref()?;
        while let Ok(seg) = spares.try_recv() {
            if let Ok(v) = Arc::try_unwrap(seg) {
                return Some(v);
            }
        }
        None
    }

    /// The SHA-256 of every segment given, once they are all hashed (the
    /// same on every call).
    pub fn finish(&mut self) -> [u8; 32] {
        if let Some(d) = self.digest {
            return d;
        }
        self.tx = None;
        let h = match (self.inline.take(), self.thread.take()) {
            (Some(h), _) => Some(h),
            (None, Some(t)) => t.join().ok(),
            (None, None) => None,
        };
        let d = h.map_or([0u8; 32], |h| h.finalize().into());
        self.digest = Some(d);
        d
    }
}

impl Drop for StreamHasher {
    fn drop(&mut self) {
        // Let the thread end (its channel closes) and wait for it.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_the_streams() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = StreamHasher::new();
        for seg in data.chunks(1 << 20) {
            h.update(Arc::new(seg.to_vec()));
        }
        let want: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(h.finish(), want);
        assert_eq!(h.finish(), want, "the same on every call");
        let mut empty = StreamHasher::new();
        assert_eq!(empty.finish(), <[u8; 32]>::from(Sha256::digest(b"")));
    }

    #[test]
    fn hashed_segments_come_back_for_reuse_unless_shared() {
        let mut h = StreamHasher::new();
        h.update(Arc::new(vec![1u8; 4096]));
        let kept = Arc::new(vec![2u8; 4096]);
        h.update(Arc::clone(&kept));
        // Both are hashed once `finish` returns; only the first is free.
        let d = h.finish();
        let mut data = vec![1u8; 4096];
        data.extend_from_slice(&[2u8; 4096]);
        assert_eq!(d, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(h.spare(), Some(vec![1u8; 4096]));
        assert_eq!(h.spare(), None, "the second is still held by its owner");
    }
}
