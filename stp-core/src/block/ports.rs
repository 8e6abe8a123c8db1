//! This host's ports in block mode: a queue of received frames per bound
//! port, filled by the poller and emptied by RECEIVEs.
//!
//! A frame stays where the poller's READ put it (a range of a pooled slot
//! buffer, [`Held`]) until a RECEIVE takes it. A RECEIVE takes frames in
//! one of two ways: copied, packed, into the caller's buffer
//! ([`PortQueue::take_copied`]), or — when every frame a slot buffer holds
//! waits in this one queue — by moving the buffers themselves to the
//! caller ([`PortQueue::take_lent`]), so the frame bytes are never copied
//! on the way to the connection.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Condvar};

use scsi::IoBuf;

use crate::chunk::RecvBuf;
use crate::mailbox::Lent;
use crate::wire::ALIGN;

/// A received frame: its bytes (header and payload) are `range` of `buf`.
#[derive(Clone)]
pub(super) struct Held {
    buf: Arc<RecvBuf>,
    range: Range<usize>,
}

impl Held {
    /// `range` of `buf`; `None` when the range is outside it.
    pub(super) fn new(buf: &Arc<RecvBuf>, range: Range<usize>) -> Option<Held> {
        let len = (**buf).as_ref().len();
        (range.start <= range.end && range.end <= len).then(|| Held {
            buf: buf.clone(),
            range,
        })
    }

    /// A frame held in a buffer of its own (a copy of `bytes`).
    pub(super) fn copied(bytes: &[u8]) -> Held {
        let mut buf = IoBuf::new(bytes.len());
        buf.copy_from_slice(bytes);
        Held {
            buf: Arc::new(RecvBuf::new(buf, None)),
            range: 0..bytes.len(),
        }
    }

    /// The frame's bytes.
    pub(super) fn bytes(&self) -> &[u8] {
        &(*self.buf).as_ref()[self.range.clone()]
    }

    /// What the frame takes in a queue: its length rounded up to
    /// [`ALIGN`].
    pub(super) fn span(&self) -> usize {
        self.range.len().next_multiple_of(ALIGN)
    }
}

/// The frames waiting for one bound port.
pub(super) struct PortQueue {
    pub(super) handle: u32,
    frames: VecDeque<Held>,
    /// The frames' spans, summed.
    bytes: usize,
    /// Receivers waiting for frames wait here.
    pub(super) ready: Arc<Condvar>,
}

impl PortQueue {
    pub(super) fn new(handle: u32) -> PortQueue {
        PortQueue {
            handle,
            frames: VecDeque::new(),
            bytes: 0,
            ready: Arc::new(Condvar::new()),
        }
    }

    /// Whether frames wait.
    pub(super) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The span of the first waiting frame.
    pub(super) fn first_span(&self) -> Option<usize> {
        self.frames.front().map(Held::span)
    }

    fn has_room(&self, frames: usize, bytes: usize, limits: Limits) -> bool {
        self.frames.is_empty()
            || (self.frames.len() + frames <= limits.frames && self.bytes + bytes <= limits.bytes)
    }

    fn pop(&mut self) -> Option<Held> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.span();
        Some(f)
    }

    /// Copies waiting frames, whole, at 8-byte aligned offsets into `buf`
    /// (its allocation reused) until the next one would pass `max` bytes.
    /// Returns the payload bytes copied (what a frame carries after its
    /// header).
    pub(super) fn take_copied(&mut self, buf: &mut IoBuf, max: usize, header_len: usize) -> usize {
        buf.resize(0);
        let mut len = 0;
        let mut payload = 0;
        while let Some(span) = self.first_span() {
            if len + span > max {
                break;
            }
            let Some(f) = self.pop() else { break };
            let bytes = f.bytes();
            buf.resize(len + span);
            buf[len..len + bytes.len()].copy_from_slice(bytes);
            buf[len + bytes.len()..len + span].fill(0);
            payload += bytes.len().saturating_sub(header_len);
            len += span;
        }
        payload
    }

    /// Moves the buffers of the longest run of waiting frames, from the
    /// first, whose buffers hold no frame for anyone else (no other port's
    /// queue and no poll still reading them) to `lent`, with each frame's
    /// place, in order. Returns false, taking nothing, when the first
    /// frame's buffer is shared.
    pub(super) fn take_lent(&mut self, lent: &mut Lent) -> bool {
        // Frames of each distinct buffer in the whole queue.
        let mut in_queue: Vec<(*const RecvBuf, usize)> = Vec::new();
        for f in &self.frames {
            let p = Arc::as_ptr(&f.buf);
            match in_queue.iter_mut().find(|e| e.0 == p) {
                Some(e) => e.1 += 1,
                None => in_queue.push((p, 1)),
            }
        }
        // The longest prefix that holds every frame of each buffer it
        // touches, and where this queue holds every reference to them.
        let mut taken: Vec<(*const RecvBuf, usize, usize)> = Vec::new(); // (buffer, taken, total)
        let mut open = 0; // buffers begun and not complete
        let mut prefix = 0;
        for (i, f) in self.frames.iter().enumerate() {
            let p = Arc::as_ptr(&f.buf);
            let k = match taken.iter().position(|e| e.0 == p) {
                Some(k) => k,
                None => {
                    let total = in_queue.iter().find(|e| e.0 == p).map_or(0, |e| e.1);
                    if Arc::strong_count(&f.buf) != total {
                        // Referenced elsewhere: this buffer cannot move.
                        break;
                    }
                    taken.push((p, 0, total));
                    open += 1;
                    taken.len() - 1
                }
            };
            taken[k].1 += 1;
            if taken[k].1 == taken[k].2 {
                open -= 1;
            }
            if open == 0 {
                prefix = i + 1;
            }
        }
        if prefix == 0 {
            return false;
        }
        let mut order: Vec<*const RecvBuf> = Vec::new();
        let mut last: Vec<Option<Arc<RecvBuf>>> = Vec::new();
        for _ in 0..prefix {
            let Some(f) = self.pop() else { break };
            let p = Arc::as_ptr(&f.buf);
            let k = match order.iter().position(|&q| q == p) {
                Some(k) => k,
                None => {
                    order.push(p);
                    last.push(None);
                    order.len() - 1
                }
            };
            lent.frames.push((lent.bufs.len() + k, f.range));
            // Keep one reference per buffer; the others go with `f`.
            last[k] = Some(f.buf);
        }
        for buf in last.into_iter().flatten() {
            let buf = match Arc::try_unwrap(buf) {
                Ok(b) => b.into_buf(),
                // Not reachable while the queue's lock is held (every
                // reference was counted above); a copy keeps it correct.
                Err(shared) => {
                    let bytes = (*shared).as_ref();
                    let mut copy = IoBuf::new(bytes.len());
                    copy.copy_from_slice(bytes);
                    copy
                }
            };
            lent.bufs.push(buf);
        }
        true
    }
}

/// A port queue's limits.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    /// Frames.
    pub(super) frames: usize,
    /// Bytes (spans).
    pub(super) bytes: usize,
}

/// What [`Ports::queue`] did.
#[derive(Default)]
pub(super) struct Queued {
    /// Frames queued for a bound port.
    pub(super) received: u64,
    /// Frames for ports not bound here, dropped.
    pub(super) unbound: u64,
    /// The queues that received frames: notify them (after the poll lets
    /// go of its buffers, so the frames can be lent).
    pub(super) wake: Vec<Arc<Condvar>>,
}

/// This host's bound ports.
#[derive(Default)]
pub(super) struct Ports {
    pub(super) bound: HashMap<u32, PortQueue>,
    pub(super) next_dynamic: u32,
}

impl Ports {
    /// Queues `frames`, each with its destination port, all or nothing:
    /// `Err(port)`, and nothing queued, when a bound port lacks room.
    /// Frames for unbound ports are dropped (and counted in the result).
    pub(super) fn queue(&mut self, frames: &[(u32, Held)], limits: Limits) -> Result<Queued, u32> {
        let mut need: HashMap<u32, (usize, usize)> = HashMap::new();
        for (port, f) in frames {
            let e = need.entry(*port).or_default();
            e.0 += 1;
            e.1 += f.span();
        }
        for (&port, &(n, b)) in &need {
            if let Some(q) = self.bound.get(&port) {
                if !q.has_room(n, b, limits) {
                    return Err(port);
                }
            }
        }
        let mut done = Queued::default();
        let mut woken = Vec::new();
        for (port, f) in frames {
            match self.bound.get_mut(port) {
                Some(q) => {
                    q.bytes += f.span();
                    q.frames.push_back(f.clone());
                    done.received += 1;
                    if !woken.contains(port) {
                        woken.push(*port);
                        done.wake.push(q.ready.clone());
                    }
                }
                None => done.unbound += 1,
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        frames: 64,
        bytes: 1 << 20,
    };

    fn buffer(len: usize, fill: u8) -> Arc<RecvBuf> {
        let mut b = IoBuf::new(len);
        b.fill(fill);
        Arc::new(RecvBuf::new(b, None))
    }

    fn ports(bound: &[u32]) -> Ports {
        let mut p = Ports::default();
        for &port in bound {
            p.bound.insert(port, PortQueue::new(port));
        }
        p
    }

    #[test]
    fn whole_buffers_of_one_port_are_lent_in_order() {
        let (a, b) = (buffer(256, 1), buffer(256, 2));
        // Striped over two members: a, b, a, b.
        let frames = vec![
            (7, Held::new(&a, 0..64).unwrap()),
            (7, Held::new(&b, 0..64).unwrap()),
            (7, Held::new(&a, 128..200).unwrap()),
            (7, Held::new(&b, 128..136).unwrap()),
        ];
        let mut p = ports(&[7]);
        let q = p.queue(&frames, LIMITS).ok().unwrap();
        assert_eq!((q.received, q.unbound, q.wake.len()), (4, 0, 1));
        drop((frames, a, b)); // the poll lets go
        let q = p.bound.get_mut(&7).unwrap();
        let mut lent = Lent::default();
        assert!(q.take_lent(&mut lent));
        assert!(q.is_empty());
        assert_eq!(lent.bufs.len(), 2);
        assert_eq!(
            lent.frames,
            vec![(0, 0..64), (1, 0..64), (0, 128..200), (1, 128..136)]
        );
        assert!(lent.bufs[0].iter().all(|&x| x == 1) && lent.bufs[1].iter().all(|&x| x == 2));
    }

    #[test]
    fn a_buffer_still_referenced_elsewhere_is_copied_not_lent() {
        let a = buffer(256, 1);
        let frames = vec![
            (7, Held::new(&a, 0..64).unwrap()),
            (8, Held::new(&a, 64..128).unwrap()),
        ];
        let mut p = ports(&[7, 8]);
        p.queue(&frames, LIMITS).ok().unwrap();
        drop((frames, a));
        // Port 8's queue holds a frame of the same buffer.
        let q = p.bound.get_mut(&7).unwrap();
        let mut lent = Lent::default();
        assert!(!q.take_lent(&mut lent));
        assert!(lent.bufs.is_empty() && !q.is_empty());
        let mut buf = IoBuf::default();
        assert_eq!(q.take_copied(&mut buf, 1 << 20, 16), 48);
        assert_eq!(buf.len(), 64);
        assert!(q.is_empty());
        // Port 8 is now the buffer's only holder.
        let q8 = p.bound.get_mut(&8).unwrap();
        assert!(q8.take_lent(&mut lent));
        assert_eq!(lent.frames, vec![(0, 64..128)]);
    }

    #[test]
    fn a_poll_holding_the_buffer_keeps_it_from_being_lent() {
        let a = buffer(128, 3);
        let frames = vec![(7, Held::new(&a, 0..64).unwrap())];
        let mut p = ports(&[7]);
        p.queue(&frames, LIMITS).ok().unwrap();
        drop(frames);
        let q = p.bound.get_mut(&7).unwrap();
        let mut lent = Lent::default();
        assert!(!q.take_lent(&mut lent), "the poll still holds `a`");
        drop(a);
        assert!(q.take_lent(&mut lent));
    }

    #[test]
    fn the_lent_prefix_ends_where_a_buffer_is_incomplete() {
        // a's frames: 1st and 3rd; b's: 2nd; c (shared with port 8): 4th.
        let (a, b, c) = (buffer(128, 1), buffer(128, 2), buffer(128, 3));
        let frames = vec![
            (7, Held::new(&a, 0..8).unwrap()),
            (7, Held::new(&b, 0..8).unwrap()),
            (7, Held::new(&a, 8..16).unwrap()),
            (7, Held::new(&c, 0..8).unwrap()),
            (8, Held::new(&c, 8..16).unwrap()),
        ];
        let mut p = ports(&[7, 8]);
        p.queue(&frames, LIMITS).ok().unwrap();
        drop((frames, a, b, c));
        let q = p.bound.get_mut(&7).unwrap();
        let mut lent = Lent::default();
        assert!(q.take_lent(&mut lent));
        assert_eq!(lent.frames, vec![(0, 0..8), (1, 0..8), (0, 8..16)]);
        assert_eq!(q.first_span(), Some(8), "c's frame stays");
    }

    #[test]
    fn queueing_is_all_or_nothing_and_counts_unbound_ports() {
        let a = buffer(4096, 0);
        let mut p = ports(&[7, 8]);
        let small = Limits {
            frames: 2,
            bytes: 1 << 20,
        };
        let three: Vec<_> = (0..3)
            .map(|i| (8, Held::new(&a, i * 8..i * 8 + 8).unwrap()))
            .collect();
        // An empty queue takes any batch; then the limit holds.
        p.queue(&three, small).ok().unwrap();
        let more = vec![
            (7, Held::new(&a, 100..108).unwrap()),
            (8, Held::new(&a, 200..208).unwrap()),
        ];
        assert_eq!(p.queue(&more, small).err(), Some(8));
        assert!(p.bound[&7].is_empty(), "nothing queued");
        let q = p.queue(&[(9, Held::copied(b"x"))], small).ok().unwrap();
        assert_eq!((q.received, q.unbound), (0, 1));
    }
}
