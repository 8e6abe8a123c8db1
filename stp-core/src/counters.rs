//! Data-path counters: what the stack does per payload byte, counted where
//! it happens (docs/ARCHITECTURE.md "The path of one byte").
//!
//! Process-wide relaxed atomics, cheap enough to stay on in production:
//! `stp bench` reports them (`--json`), and tests assert the structure they
//! describe (one copy and one protection pass per payload byte on each
//! side, none through the lending API; several SENDs in flight per member
//! LUN). A [`Snapshot`] taken before and after a run gives the run's
//! figures ([`Snapshot::since`]).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        pub(crate) static COUNTERS: Counters = Counters { $($name: AtomicU64::new(0),)* };

        /// The counters at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Snapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        /// Reads every counter.
        pub fn snapshot() -> Snapshot {
            Snapshot { $($name: COUNTERS.$name.load(Relaxed),)* }
        }

        impl Snapshot {
            /// What happened between `earlier` and `self` (counters are
            /// monotonic; the `*_max` gauges are kept as they are now).
            pub fn since(&self, earlier: &Snapshot) -> Snapshot {
                let mut d = Snapshot { $($name: self.$name.saturating_sub(earlier.$name),)* };
                d.sends_in_flight_per_lun_max = self.sends_in_flight_per_lun_max;
                d
            }
        }
    };
}

counters! {
    /// DATA payload bytes handed to the stack by writers (copied or lent).
    send_payload_bytes,
    /// Payload bytes the sending side copied (caller's buffer into a DMA
    /// buffer).
    send_copy_bytes,
    /// Payload bytes the sending side protected (encrypted or tagged).
    send_protect_bytes,
    /// DATA payload bytes delivered to readers (copied or lent).
    recv_payload_bytes,
    /// Payload bytes the receiving side copied (into the caller's buffer, or
    /// a small frame out of a large RECEIVE buffer).
    recv_copy_bytes,
    /// Payload bytes the receiving side opened (decrypted or verified).
    recv_protect_bytes,
    /// SEND commands submitted by streams.
    sends_submitted,
    /// SENDs submitted whose first frame is DATA (a stream's data, not its
    /// acknowledgements).
    data_sends_submitted,
    /// Sum over the SENDs carrying DATA of the SENDs then in flight on the
    /// same member LUN (this one included): divided by
    /// `data_sends_submitted`, the mean depth a data SEND met.
    sends_in_flight_sum,
    /// The most SENDs of one stream in flight on one member LUN at once
    /// when a SEND carrying DATA was submitted.
    sends_in_flight_per_lun_max,
    /// Times a stream handed frames to its sender (a flush with work).
    flushes,
    /// Condition-variable notifications a stream issued (every party woken
    /// counts once).
    wakeups,
    /// DATA frames re-sent from their sealed buffer (no second seal).
    resent_sealed,
    /// DATA frames a stream handed to the sealing threads
    /// ([`crate::sealers`]) rather than sealing on the writer's thread.
    sealed_in_pool,
    /// Frames a receive pump took off the array for no live connection (a
    /// port closed meanwhile, another connection id): dropped; the sender
    /// retransmits or gives up (docs/PROTOCOL.md §3.2).
    recv_dropped_no_connection,
    /// Frames a connection dropped for lying beyond the credit it
    /// advertised (its reassembly window, §6.2–6.3).
    recv_dropped_above_window,
    /// Frames a connection dropped because they failed to open (their tag
    /// or header CRC did not verify under its key and direction): damaged,
    /// forged or replayed from another connection on the SAN, or a peer
    /// with another key or protection (docs/PROTOCOL.md §7).
    recv_dropped_unauthentic,
    /// Bytes of block-mode doorbell datagrams this process sent and heard
    /// (docs/PROTOCOL.md §4, Doorbell): LAN traffic of an STG, not of any
    /// socket, which a session's LAN count includes. A datagram between
    /// two hosts of this process counts once, as sent.
    doorbell_bytes,
}

/// Adds `n` to the counter `name`.
macro_rules! bump {
    ($name:ident, $n:expr) => {
        $crate::counters::COUNTERS
            .$name
            .fetch_add(($n) as u64, std::sync::atomic::Ordering::Relaxed)
    };
}
pub(crate) use bump;

/// Records a SEND submitted while `depth` SENDs (this one included) were in
/// flight on its member LUN; `data`: it carries DATA.
pub(crate) fn send_submitted(depth: usize, data: bool) {
    COUNTERS.sends_submitted.fetch_add(1, Relaxed);
    if !data {
        return;
    }
    let depth = depth as u64;
    COUNTERS.data_sends_submitted.fetch_add(1, Relaxed);
    COUNTERS.sends_in_flight_sum.fetch_add(depth, Relaxed);
    COUNTERS
        .sends_in_flight_per_lun_max
        .fetch_max(depth, Relaxed);
}

impl Snapshot {
    /// Copies per payload byte on the sending side.
    pub fn send_copies_per_byte(&self) -> f64 {
        ratio(self.send_copy_bytes, self.send_payload_bytes)
    }
    /// Protection passes per payload byte on the sending side.
    pub fn send_protect_per_byte(&self) -> f64 {
        ratio(self.send_protect_bytes, self.send_payload_bytes)
    }
    /// Copies per payload byte on the receiving side.
    pub fn recv_copies_per_byte(&self) -> f64 {
        ratio(self.recv_copy_bytes, self.recv_payload_bytes)
    }
    /// Protection passes per payload byte on the receiving side.
    pub fn recv_protect_per_byte(&self) -> f64 {
        ratio(self.recv_protect_bytes, self.recv_payload_bytes)
    }
    /// The mean number of SENDs in flight on a member LUN when a SEND
    /// carrying DATA was submitted (itself included).
    pub fn mean_sends_in_flight(&self) -> f64 {
        ratio(self.sends_in_flight_sum, self.data_sends_submitted)
    }
    /// Wake-ups per flush.
    pub fn wakeups_per_flush(&self) -> f64 {
        ratio(self.wakeups, self.flushes)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}
