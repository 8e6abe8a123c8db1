//! The lane state machines of block mode (docs/PROTOCOL.md §4.3), sans-IO.
//!
//! A lane `(s, d)` is a ring of slots on every member plus a producer and a
//! consumer index block per member. [`Producer`] is host `s`'s side: it
//! says which member and ring position the next slot goes to, whether the
//! ring has room, and which count to publish once a slot's data is on the
//! array. [`Consumer`] is host `d`'s side: it judges the producer blocks
//! it is given, plans which slots to read (in the producer's round-robin
//! order), judges each slot, and says which consumer blocks to write.
//!
//! Neither reads a clock, sleeps or does I/O: the driver in the parent
//! module feeds them the bytes it read and the time, and does what they
//! say. Everything they are given came from LUNs any host can write, so
//! every index is checked against what the machine knows before it moves
//! anything; a forged or torn block is reported, never trusted.

use std::time::{Duration, Instant};

use super::format::{long_slot_head, open_slot, IndexBlock, IndexKind, INDEX_SIZES, SHORT_SLOT};
use super::SLOT_HEADER_LEN;

/// What an index block read from a member says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Index {
    /// A valid block of this lane: the count it carries was taken.
    Fresh,
    /// A valid block of another format generation: the STG may have been
    /// reformatted under this host.
    Foreign,
    /// A bad magic, kind or CRC, or a count the ring cannot hold from
    /// where this side is (torn, stale or forged): ignored.
    Bad,
}

/// Judges an index block of `kind`: `Ok(block)` for one of this
/// generation, else what it is.
fn judge(bytes: &[u8], kind: IndexKind, generation: u64) -> Result<IndexBlock, Index> {
    match IndexBlock::decode(bytes) {
        Ok(b) if b.kind == kind && b.generation != generation => Err(Index::Foreign),
        Ok(b) if b.kind == kind => Ok(b),
        _ => Err(Index::Bad),
    }
}

/// Where a slot goes: its member, its position in that member's ring (the
/// count of slots written to the member before it) and its lane sequence
/// number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotPos {
    pub member: usize,
    pub counter: u64,
    pub seq: u64,
}

/// The producer side of one lane.
///
/// Slots are *staged* (given a position) in round-robin order over the
/// members; the driver writes their data, then publishes each member's new
/// count ([`publish`](Self::publish)) and reports it written
/// ([`published`](Self::published)). A count is never published before
/// every slot below it on that member is on the array.
#[derive(Debug)]
pub(crate) struct Producer {
    slots: u64,
    /// Slots published, per member.
    produced: Vec<u64>,
    /// Slots staged beyond `produced`, per member.
    staged: Vec<u64>,
    /// Slots the consumer had consumed when last read, per member.
    consumed: Vec<u64>,
    /// The sizes of the latest slots, per member, as producer blocks
    /// carry them (the slot numbered `n` at `n % INDEX_SIZES`).
    sizes: Vec<[u32; INDEX_SIZES]>,
    /// Slots published whose member's producer block does not yet say so
    /// (messages a probe takes without it), per member, and since when.
    unannounced: Vec<u64>,
    unannounced_since: Option<Instant>,
    turn: usize,
    seq: u64,
}

impl Producer {
    /// A producer that has published `produced` (per member) and knows the
    /// consumer at `consumed`; the next slot continues the round-robin.
    pub fn new(slots: u32, produced: Vec<u64>, consumed: Vec<u64>) -> Producer {
        let total: u64 = produced.iter().sum();
        let members = produced.len().max(1);
        Producer {
            slots: u64::from(slots),
            staged: vec![0; produced.len()],
            sizes: vec![[0; INDEX_SIZES]; produced.len()],
            unannounced: vec![0; produced.len()],
            unannounced_since: None,
            turn: (total % members as u64) as usize,
            seq: total,
            produced,
            consumed,
        }
    }

    /// The member the next slot goes to.
    pub fn turn(&self) -> usize {
        self.turn
    }

    /// Published slots on member `m`.
    pub fn produced(&self, m: usize) -> u64 {
        self.produced[m]
    }

    /// Whether the next slot fits in its member's ring.
    pub fn has_room(&self) -> bool {
        let m = self.turn;
        self.produced[m] + self.staged[m] - self.consumed[m] < self.slots
    }

    /// Takes the consumer block read from member `m`. A count never moves
    /// back (an older block is no news) and must lie within one ring below
    /// what was published.
    pub fn on_consumer_block(&mut self, m: usize, bytes: &[u8], generation: u64) -> Index {
        match judge(bytes, IndexKind::Consumer, generation) {
            Ok(IndexBlock { count: c, .. })
                if c <= self.produced[m] && self.produced[m] - c <= self.slots =>
            {
                self.consumed[m] = self.consumed[m].max(c);
                Index::Fresh
            }
            Ok(_) => Index::Bad,
            Err(e) => e,
        }
    }

    /// Gives the next slot, of `size` bytes (header and frames), its
    /// position; call only when [`has_room`](Self::has_room).
    pub fn stage(&mut self, size: u32) -> SlotPos {
        let m = self.turn;
        let pos = SlotPos {
            member: m,
            counter: self.produced[m] + self.staged[m],
            seq: self.seq,
        };
        self.sizes[m][size_at(pos.counter)] = size;
        self.staged[m] += 1;
        self.seq += 1;
        self.turn = (m + 1) % self.produced.len();
        pos
    }

    /// The count to publish on member `m` once its staged slots are on the
    /// array; `None` when nothing is staged there.
    pub fn publish(&self, m: usize) -> Option<u64> {
        (self.staged[m] > 0).then(|| self.produced[m] + self.staged[m])
    }

    /// The slot sizes member `m`'s producer block carries with the count
    /// [`publish`](Self::publish) gives.
    pub fn sizes(&self, m: usize) -> [u32; INDEX_SIZES] {
        self.sizes[m]
    }

    /// Member `m`'s producer block now says what [`publish`](Self::publish)
    /// gave (and so announces every slot before it).
    pub fn published(&mut self, m: usize) {
        self.produced[m] += self.staged[m];
        self.staged[m] = 0;
        self.announced(m, self.produced[m]);
    }

    /// Member `m`'s staged slots are on the array and taken for published
    /// (a probe finds them), but its producer block is left to say so
    /// later ([`unannounced`](Self::unannounced)), at `now`.
    pub fn published_unannounced(&mut self, m: usize, now: Instant) {
        self.unannounced[m] += self.staged[m];
        self.produced[m] += self.staged[m];
        self.staged[m] = 0;
        self.unannounced_since.get_or_insert(now);
    }

    /// Slots published and not announced, on every member.
    pub fn unannounced_total(&self) -> u64 {
        self.unannounced.iter().sum()
    }

    /// Since when slots have been left unannounced (`None`: none are).
    pub fn unannounced_since(&self) -> Option<Instant> {
        self.unannounced_since
    }

    /// The members whose producer blocks trail what was published, with
    /// the count to write there.
    pub fn unannounced(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.produced.len())
            .filter(|&m| self.unannounced[m] > 0)
            .map(|m| (m, self.produced[m]))
    }

    /// Member `m`'s producer block now says `count`.
    pub fn announced(&mut self, m: usize, count: u64) {
        if count >= self.produced[m] {
            self.unannounced[m] = 0;
        }
        if self.unannounced.iter().all(|&n| n == 0) {
            self.unannounced_since = None;
        }
    }

    /// Where the next slot goes.
    pub fn next(&self) -> SlotPos {
        SlotPos {
            member: self.turn,
            counter: self.produced[self.turn] + self.staged[self.turn],
            seq: self.seq,
        }
    }

    /// The next slot is already on the array, written by an earlier
    /// opening of this host that did not live to announce it (a probe may
    /// have taken it): go past it, as if published. Only before staging.
    pub fn resume_past_written(&mut self) {
        let m = self.turn;
        self.sizes[m][size_at(self.produced[m])] = 0;
        self.produced[m] += 1;
        self.unannounced[m] += 1;
        self.seq += 1;
        self.turn = (m + 1) % self.produced.len();
    }

    /// Writing failed: every slot not published is forgotten and the
    /// round-robin resumes at the first of them, `first` (the position it
    /// was staged at), so the consumer finds no gap.
    pub fn abandon(&mut self, first: Option<SlotPos>) {
        for (m, staged) in self.staged.iter().enumerate() {
            // Sizes of slots never published would be read as those of
            // the slots a ring of sizes earlier.
            for n in self.produced[m]..self.produced[m] + (*staged).min(INDEX_SIZES as u64) {
                self.sizes[m][size_at(n)] = 0;
            }
        }
        self.staged.fill(0);
        if let Some(p) = first {
            self.turn = p.member;
            self.seq = p.seq;
        }
    }
}

/// Where the size of the slot numbered `n` on its member is in a producer
/// block's sizes.
fn size_at(n: u64) -> usize {
    (n % INDEX_SIZES as u64) as usize
}

/// Slots to read in one poll: how many from each member, and the order
/// (round-robin, as produced) in which to take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub take: Vec<u64>,
    pub order: Vec<usize>,
    /// The consumer stopped waiting for a member's turn and skipped it.
    pub skipped_turn: bool,
}

/// What to do with the slot the plan reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Valid: deliver its frames, then [`Consumer::take`]. `in_sequence`
    /// is false when its lane sequence number is not the one expected.
    Deliver { seq: u64, in_sequence: bool },
    /// Fails its checks (torn, stale, or its index forged ahead of the
    /// data): hold the lane here and read it again later. `first` is true
    /// the first time this slot failed.
    Hold { first: bool },
    /// Failed its checks for longer than the patience: skip it
    /// ([`Consumer::skip`]).
    Skip { first: bool },
}

/// What a probe of the next slot's first block found
/// ([`Consumer::on_probe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The next slot, short and whole (its CRC covers its frames): deliver
    /// its frames, then [`Consumer::take`] it from `member`.
    Short { member: usize, seq: u64 },
    /// The next slot's header, of a slot too long to take this way: read
    /// the producer blocks.
    Long,
    /// Nothing to take: a slot of an earlier lap, one half written, or
    /// anything else.
    Nothing,
}

/// The consumer side of one lane.
#[derive(Debug)]
pub(crate) struct Consumer {
    slots: u64,
    /// Slots consumed, per member.
    consumed: Vec<u64>,
    /// Slots the producer blocks of this poll announced beyond `consumed`.
    avail: Vec<u64>,
    /// Per member, the count of the last valid producer block read and the
    /// slot sizes it carried.
    sizes: Vec<(u64, [u32; INDEX_SIZES])>,
    /// Consumer blocks not yet written since `consumed` moved.
    dirty: Vec<bool>,
    turn: usize,
    expect: u64,
    stuck_since: Option<Instant>,
    bad_since: Option<Instant>,
    turn_patience: Duration,
    bad_slot_patience: Duration,
}

impl Consumer {
    /// A consumer at `consumed` (per member); every consumer block counts
    /// as unwritten until [`written`](Self::written).
    pub fn new(
        slots: u32,
        consumed: Vec<u64>,
        turn_patience: Duration,
        bad_slot_patience: Duration,
    ) -> Consumer {
        let total: u64 = consumed.iter().sum();
        let members = consumed.len().max(1);
        Consumer {
            slots: u64::from(slots),
            avail: vec![0; consumed.len()],
            sizes: vec![(0, [0; INDEX_SIZES]); consumed.len()],
            dirty: vec![true; consumed.len()],
            turn: (total % members as u64) as usize,
            expect: total,
            consumed,
            stuck_since: None,
            bad_since: None,
            turn_patience,
            bad_slot_patience,
        }
    }

    /// The member whose slot comes next.
    pub fn turn(&self) -> usize {
        self.turn
    }

    /// Slots consumed on member `m`.
    #[cfg(test)]
    pub fn consumed(&self, m: usize) -> u64 {
        self.consumed[m]
    }

    /// Where the next slot starts if the producer has written it: `(member,
    /// counter)`. A probe reads its first block there before any producer
    /// block announces it (docs/PROTOCOL.md §4, short slots).
    pub fn probe(&self) -> (usize, u64) {
        (self.turn, self.consumed[self.turn])
    }

    /// Judges the first block of the next slot, read where
    /// [`probe`](Self::probe) said. Only the slot with the lane sequence
    /// number expected next counts; a short one whose CRC holds is whole
    /// whatever the index blocks say.
    pub fn on_probe(&self, block: &[u8], generation: u64) -> Probe {
        match open_slot(block, generation) {
            Ok((seq, frames))
                if seq == self.expect && SLOT_HEADER_LEN + frames.len() <= SHORT_SLOT =>
            {
                Probe::Short {
                    member: self.turn,
                    seq,
                }
            }
            _ => match long_slot_head(block, generation) {
                Some((seq, _)) if seq == self.expect => Probe::Long,
                _ => Probe::Nothing,
            },
        }
    }

    /// Starts a poll: what earlier polls announced is forgotten.
    pub fn begin_poll(&mut self) {
        self.avail.fill(0);
    }

    /// Takes the producer block read from member `m`: its count must lie
    /// within one ring of what was consumed. Behind it is no news, not a
    /// bad block: a probe takes a short slot before the producer publishes
    /// it, so the count the producer block carries may trail what was
    /// consumed, by at most a ring.
    pub fn on_producer_block(&mut self, m: usize, bytes: &[u8], generation: u64) -> Index {
        let consumed = self.consumed[m];
        let (p, sizes) = match judge(bytes, IndexKind::Producer, generation) {
            Ok(b) => (b.count, b.sizes),
            Err(e) => return e,
        };
        if p >= consumed && p - consumed <= self.slots {
            self.avail[m] = p - consumed;
        } else if p < consumed && consumed - p <= self.slots {
            self.avail[m] = 0;
        } else {
            return Index::Bad;
        }
        self.sizes[m] = (p, sizes);
        Index::Fresh
    }

    /// The size (header and frames) the producer block last read from
    /// member `m` gave for its slot numbered `n`: `None` when it gave none
    /// (a slot older than the sizes a block carries, or not yet produced).
    /// Untrusted: how much to read, never what to believe.
    pub fn slot_size(&self, m: usize, n: u64) -> Option<usize> {
        let (p, sizes) = &self.sizes[m];
        if n >= *p || p - n > INDEX_SIZES as u64 {
            return None;
        }
        match sizes[size_at(n)] {
            0 => None,
            s => Some(s as usize),
        }
    }

    /// Whether the producer blocks read so far announce a slot on the
    /// member whose turn it is.
    pub fn turn_has_news(&self) -> bool {
        self.avail[self.turn] > 0
    }

    /// The slots to read now, at most `budget` (at least one), or `None`
    /// when there is nothing (or the turn's member has nothing yet while
    /// others do, for less than the turn patience: the producer is
    /// normally between publishing one member and the next).
    pub fn plan(&mut self, now: Instant, budget: usize) -> Option<Plan> {
        let members = self.consumed.len();
        if self.avail.iter().all(|&a| a == 0) {
            self.stuck_since = None;
            return None;
        }
        let mut skipped_turn = false;
        if self.avail[self.turn] == 0 {
            let since = *self.stuck_since.get_or_insert(now);
            if now.saturating_duration_since(since) < self.turn_patience {
                return None;
            }
            skipped_turn = true;
            while self.avail[self.turn] == 0 {
                self.turn = (self.turn + 1) % members;
            }
        }
        self.stuck_since = None;
        let mut take = vec![0u64; members];
        let mut order = Vec::new();
        let mut turn = self.turn;
        while order.len() < budget.max(1) && take[turn] < self.avail[turn] {
            take[turn] += 1;
            order.push(turn);
            turn = (turn + 1) % members;
        }
        Some(Plan {
            take,
            order,
            skipped_turn,
        })
    }

    /// Member `m`'s next `n` slots as ring-contiguous runs `(counter,
    /// slots)`: at most two, since the ring wraps at most once.
    pub fn runs(&self, m: usize, n: u64) -> impl Iterator<Item = (u64, u64)> {
        let first = self.consumed[m];
        let to_end = self.slots - first % self.slots;
        let a = n.min(to_end);
        [(first, a), (first + a, n - a)]
            .into_iter()
            .filter(|&(_, k)| k > 0)
    }

    /// Judges the next slot (the plan's current one) read as `slot`.
    pub fn on_slot(&mut self, slot: &[u8], generation: u64, now: Instant) -> Slot {
        match open_slot(slot, generation) {
            Ok((seq, _)) => {
                self.bad_since = None;
                Slot::Deliver {
                    seq,
                    in_sequence: seq == self.expect,
                }
            }
            Err(_) => {
                let first = self.bad_since.is_none();
                let since = *self.bad_since.get_or_insert(now);
                if now.saturating_duration_since(since) < self.bad_slot_patience {
                    Slot::Hold { first }
                } else {
                    self.bad_since = None;
                    Slot::Skip { first }
                }
            }
        }
    }

    /// The slot on member `m` with sequence number `seq` was delivered.
    pub fn take(&mut self, m: usize, seq: u64) {
        self.expect = seq.wrapping_add(1);
        self.advance(m);
    }

    /// The bad slot on member `m` is skipped.
    pub fn skip(&mut self, m: usize) {
        self.expect = self.expect.wrapping_add(1);
        self.advance(m);
    }

    fn advance(&mut self, m: usize) {
        self.consumed[m] += 1;
        self.avail[m] = self.avail[m].saturating_sub(1);
        self.dirty[m] = true;
        self.turn = (m + 1) % self.consumed.len();
    }

    /// Consumer blocks to write: `(member, count)`.
    pub fn to_write(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.consumed.len())
            .filter(|&m| self.dirty[m])
            .map(|m| (m, self.consumed[m]))
    }

    /// Every consumer block is to be written again (another host may have
    /// written over one).
    pub fn rewrite_all(&mut self) {
        self.dirty.iter_mut().for_each(|d| *d = true);
    }

    /// Member `m`'s consumer block now says `count`.
    pub fn written(&mut self, m: usize, count: u64) {
        if self.consumed[m] == count {
            self.dirty[m] = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::format::seal_slot;
    use crate::block::SLOT_HEADER_LEN;

    const GEN: u64 = 0x5eed;
    const SLOTS: u32 = 4;

    fn index(kind: IndexKind, count: u64, generation: u64) -> Vec<u8> {
        IndexBlock::new(kind, generation, count, 1)
            .encode()
            .to_vec()
    }

    /// A producer block with the slot sizes the producer gives.
    fn producer_block(count: u64, sizes: [u32; INDEX_SIZES]) -> Vec<u8> {
        IndexBlock {
            sizes,
            ..IndexBlock::new(IndexKind::Producer, GEN, count, 1)
        }
        .encode()
        .to_vec()
    }

    /// The size of a one-byte message's slot.
    const ONE: u32 = SLOT_HEADER_LEN as u32 + 1;

    fn slot(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut s = vec![0u8; SLOT_HEADER_LEN + payload.len()];
        s[SLOT_HEADER_LEN..].copy_from_slice(payload);
        seal_slot(&mut s, GEN, seq);
        s
    }

    /// One lane on `members` members of an in-memory array: rings of
    /// slot images and the two index blocks per member, moved by the two
    /// machines exactly as the driver moves them.
    struct Lane {
        ring: Vec<Vec<Vec<u8>>>,
        prod_block: Vec<Vec<u8>>,
        cons_block: Vec<Vec<u8>>,
        producer: Producer,
        consumer: Consumer,
    }

    impl Lane {
        fn new(members: usize) -> Lane {
            Lane {
                ring: vec![vec![Vec::new(); SLOTS as usize]; members],
                prod_block: vec![index(IndexKind::Producer, 0, GEN); members],
                cons_block: vec![index(IndexKind::Consumer, 0, GEN); members],
                producer: Producer::new(SLOTS, vec![0; members], vec![0; members]),
                consumer: Consumer::new(
                    SLOTS,
                    vec![0; members],
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                ),
            }
        }

        /// Sends `n` one-byte messages starting at `first`; false when the
        /// ring had no room for one of them.
        fn send(&mut self, first: u8, n: u8) -> bool {
            let members = self.ring.len();
            let mut staged = Vec::new();
            for k in 0..n {
                if !self.producer.has_room() {
                    let m = self.producer.turn();
                    let b = self.cons_block[m].clone();
                    self.producer.on_consumer_block(m, &b, GEN);
                }
                if !self.producer.has_room() {
                    return false;
                }
                let p = self.producer.stage(ONE);
                staged.push((p, first.wrapping_add(k)));
            }
            // Data first, then the producer blocks.
            for (p, byte) in staged {
                self.ring[p.member][(p.counter % u64::from(SLOTS)) as usize] = slot(p.seq, &[byte]);
            }
            for m in 0..members {
                if let Some(c) = self.producer.publish(m) {
                    self.prod_block[m] = producer_block(c, self.producer.sizes(m));
                    self.producer.published(m);
                }
            }
            true
        }

        /// Writes a one-byte message's slot without publishing it (the
        /// producer block still says what it said).
        fn write_unpublished(&mut self, byte: u8) -> SlotPos {
            let p = self.producer.stage(ONE);
            self.ring[p.member][(p.counter % u64::from(SLOTS)) as usize] = slot(p.seq, &[byte]);
            p
        }

        fn publish_all(&mut self) {
            for m in 0..self.ring.len() {
                if let Some(c) = self.producer.publish(m) {
                    self.prod_block[m] = producer_block(c, self.producer.sizes(m));
                    self.producer.published(m);
                }
            }
        }

        /// What the first block of the next slot says, as a probe reads it.
        fn probe_image(&self) -> Vec<u8> {
            let (m, counter) = self.consumer.probe();
            let mut block = self.ring[m][(counter % u64::from(SLOTS)) as usize].clone();
            block.resize(512, 0);
            block
        }

        /// One probe: the byte taken, if any.
        fn probe(&mut self) -> Option<u8> {
            let block = self.probe_image();
            match self.consumer.on_probe(&block, GEN) {
                Probe::Short { member, seq } => {
                    self.consumer.take(member, seq);
                    Some(block[SLOT_HEADER_LEN])
                }
                _ => None,
            }
        }

        /// One poll at `now`: the payload bytes delivered.
        fn poll(&mut self, now: Instant) -> Vec<u8> {
            let members = self.ring.len();
            self.consumer.begin_poll();
            for m in 0..members {
                let b = self.prod_block[m].clone();
                self.consumer.on_producer_block(m, &b, GEN);
            }
            let mut got = Vec::new();
            if let Some(plan) = self.consumer.plan(now, 64) {
                for m in plan.order {
                    let at = (self.consumer.consumed(m) % u64::from(SLOTS)) as usize;
                    let image = self.ring[m][at].clone();
                    match self.consumer.on_slot(&image, GEN, now) {
                        Slot::Deliver { seq, .. } => {
                            got.push(image[SLOT_HEADER_LEN]);
                            self.consumer.take(m, seq);
                        }
                        Slot::Hold { .. } => break,
                        Slot::Skip { .. } => self.consumer.skip(m),
                    }
                }
            }
            let writes: Vec<_> = self.consumer.to_write().collect();
            for (m, c) in writes {
                self.cons_block[m] = index(IndexKind::Consumer, c, GEN);
                self.consumer.written(m, c);
            }
            got
        }
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn frames_arrive_in_order_across_members_and_ring_wraps() {
        let now = t0();
        let mut lane = Lane::new(3);
        let mut expect = 0u8;
        // 3 members × 4 slots: 40 messages wrap every ring several times.
        for round in 0..10u8 {
            assert!(lane.send(round * 4, 4));
            let got = lane.poll(now);
            let want: Vec<u8> = (0..4).map(|k| expect.wrapping_add(k)).collect();
            assert_eq!(got, want);
            expect = expect.wrapping_add(4);
        }
    }

    #[test]
    fn a_probe_takes_short_slots_before_their_index_and_the_index_then_agrees() {
        let now = t0();
        let mut lane = Lane::new(3);
        assert_eq!(lane.probe(), None, "nothing written yet");
        let mut sent = 0u8;
        // 3 members × 4 slots: 30 messages wrap every ring twice; each is
        // taken by a probe before its producer block says it is there.
        for round in 0..10u8 {
            for _ in 0..3 {
                lane.write_unpublished(sent);
                assert_eq!(lane.probe(), Some(sent), "round {round}");
                assert_eq!(lane.probe(), None, "taken once");
                sent += 1;
            }
            lane.publish_all();
            assert!(lane.poll(now).is_empty(), "the index announces nothing new");
        }
        // Slots the probe did not take are still read through the index.
        assert!(lane.send(sent, 2));
        assert_eq!(lane.poll(now), vec![sent, sent + 1]);
    }

    /// A poll that reads the producer blocks after a probe took slots they
    /// do not announce yet finds them behind what was consumed: no news,
    /// and not a bad block.
    #[test]
    fn a_producer_block_behind_what_probes_took_is_not_bad() {
        let mut lane = Lane::new(2);
        for byte in 0..3u8 {
            lane.write_unpublished(byte);
            assert_eq!(lane.probe(), Some(byte));
        }
        lane.consumer.begin_poll();
        for m in 0..2 {
            let b = lane.prod_block[m].clone();
            assert_eq!(
                lane.consumer.on_producer_block(m, &b, GEN),
                Index::Fresh,
                "member {m}"
            );
        }
        assert!(
            lane.poll(t0()).is_empty(),
            "nothing announced that was not taken"
        );
        // A count more than a ring behind is still refused.
        let mut far = Lane::new(1);
        for byte in 0..(SLOTS as u8 + 1) {
            far.write_unpublished(byte);
            assert_eq!(far.probe(), Some(byte));
        }
        let stale = index(IndexKind::Producer, 0, GEN);
        assert_eq!(far.consumer.on_producer_block(0, &stale, GEN), Index::Bad);
    }

    #[test]
    fn a_probe_leaves_long_torn_and_stale_slots_to_the_index() {
        let mut lane = Lane::new(2);
        // A long slot with the expected sequence number: announced only.
        let p = lane.producer.stage(ONE);
        let mut long = vec![0u8; SHORT_SLOT + 100];
        seal_slot(&mut long, GEN, p.seq);
        lane.ring[p.member][0] = long;
        assert_eq!(
            lane.consumer.on_probe(&lane.probe_image(), GEN),
            Probe::Long
        );
        // A short slot half written (a frame byte not yet there).
        let mut torn = slot(p.seq, &[7, 8, 9]);
        torn[SLOT_HEADER_LEN + 1] ^= 0xff;
        lane.ring[p.member][0] = torn;
        assert_eq!(
            lane.consumer.on_probe(&lane.probe_image(), GEN),
            Probe::Nothing
        );
        // A slot of the wrong sequence number (an earlier lap), or format.
        lane.ring[p.member][0] = slot(p.seq + 8, &[1]);
        assert_eq!(
            lane.consumer.on_probe(&lane.probe_image(), GEN),
            Probe::Nothing
        );
        let mut other = vec![0u8; SLOT_HEADER_LEN + 1];
        seal_slot(&mut other, GEN + 1, p.seq);
        lane.ring[p.member][0] = other;
        assert_eq!(
            lane.consumer.on_probe(&lane.probe_image(), GEN),
            Probe::Nothing
        );
        lane.ring[p.member][0] = slot(p.seq, &[5]);
        assert_eq!(lane.probe(), Some(5));
    }

    #[test]
    fn a_full_ring_refuses_until_the_consumer_moves() {
        let now = t0();
        let mut lane = Lane::new(2);
        assert!(lane.send(0, 8), "2 members × 4 slots hold 8");
        assert!(!lane.send(8, 1), "a ninth slot has no room");
        assert_eq!(lane.poll(now), (0..8).collect::<Vec<u8>>());
        assert!(lane.send(8, 1), "room once the consumer block moved");
        assert_eq!(lane.poll(now), vec![8]);
    }

    #[test]
    fn torn_or_forged_index_blocks_move_nothing() {
        let now = t0();
        let mut lane = Lane::new(1);
        lane.send(0, 2);
        // A torn producer block (CRC broken) is ignored.
        let mut torn = lane.prod_block[0].clone();
        torn[12] ^= 0xff;
        lane.consumer.begin_poll();
        assert_eq!(lane.consumer.on_producer_block(0, &torn, GEN), Index::Bad);
        assert_eq!(lane.consumer.plan(now, 8), None);
        // A count more than a ring ahead is ignored.
        let ahead = index(IndexKind::Producer, u64::from(SLOTS) + 1, GEN);
        assert_eq!(lane.consumer.on_producer_block(0, &ahead, GEN), Index::Bad);
        // A consumer block claiming more than was produced is ignored.
        let forged = index(IndexKind::Consumer, 5, GEN);
        assert_eq!(lane.producer.on_consumer_block(0, &forged, GEN), Index::Bad);
        // A consumer block never moves backwards.
        lane.producer
            .on_consumer_block(0, &index(IndexKind::Consumer, 2, GEN), GEN);
        lane.producer
            .on_consumer_block(0, &index(IndexKind::Consumer, 1, GEN), GEN);
        assert!(lane.producer.has_room());
        assert_eq!(lane.poll(now), vec![0, 1]);
    }

    #[test]
    fn an_index_forged_ahead_of_its_data_holds_then_skips() {
        let now = t0();
        let mut lane = Lane::new(1);
        // Slot 0's index is published but its data is garbage.
        lane.prod_block[0] = index(IndexKind::Producer, 1, GEN);
        lane.ring[0][0] = vec![0xAB; 64];
        assert_eq!(lane.poll(now), Vec::<u8>::new());
        assert_eq!(lane.consumer.consumed(0), 0, "held, not consumed");
        // Still held within the patience...
        assert_eq!(lane.poll(now + Duration::from_secs(1)), Vec::<u8>::new());
        assert_eq!(lane.consumer.consumed(0), 0);
        // ...and skipped after it; nothing forged was delivered.
        assert_eq!(lane.poll(now + Duration::from_secs(3)), Vec::<u8>::new());
        assert_eq!(lane.consumer.consumed(0), 1);
    }

    #[test]
    fn the_data_arriving_late_is_delivered() {
        let now = t0();
        let mut lane = Lane::new(1);
        lane.prod_block[0] = index(IndexKind::Producer, 1, GEN);
        lane.ring[0][0] = vec![0; 64];
        assert_eq!(lane.poll(now), Vec::<u8>::new());
        lane.ring[0][0] = slot(0, &[42]);
        assert_eq!(lane.poll(now + Duration::from_millis(10)), vec![42]);
    }

    #[test]
    fn a_reformat_under_the_lane_is_reported() {
        let mut lane = Lane::new(1);
        let other = index(IndexKind::Producer, 1, GEN + 1);
        lane.consumer.begin_poll();
        assert_eq!(
            lane.consumer.on_producer_block(0, &other, GEN),
            Index::Foreign
        );
        let other = index(IndexKind::Consumer, 0, GEN + 1);
        assert_eq!(
            lane.producer.on_consumer_block(0, &other, GEN),
            Index::Foreign
        );
        // A block of the other kind is not this lane's.
        let wrong = index(IndexKind::Consumer, 0, GEN);
        assert_eq!(lane.consumer.on_producer_block(0, &wrong, GEN), Index::Bad);
    }

    #[test]
    fn a_member_behind_its_turn_is_waited_for_then_skipped() {
        let now = t0();
        let mut lane = Lane::new(2);
        lane.send(0, 2);
        // Member 0's producer block is lost; member 1's slot is visible.
        lane.prod_block[0] = index(IndexKind::Producer, 0, GEN);
        assert_eq!(lane.poll(now), Vec::<u8>::new());
        assert_eq!(lane.poll(now + Duration::from_millis(50)), Vec::<u8>::new());
        lane.consumer.begin_poll();
        lane.consumer
            .on_producer_block(1, &lane.prod_block[1].clone(), GEN);
        let plan = lane.consumer.plan(now + Duration::from_millis(200), 8);
        assert_eq!(
            plan,
            Some(Plan {
                take: vec![0, 1],
                order: vec![1],
                skipped_turn: true
            })
        );
    }

    #[test]
    fn a_failed_write_resumes_where_the_gap_would_be() {
        let mut lane = Lane::new(2);
        lane.send(0, 1);
        let a = lane.producer.stage(ONE);
        let _b = lane.producer.stage(ONE);
        // Neither reached the array: resume at the first.
        lane.producer.abandon(Some(a));
        assert_eq!(lane.producer.turn(), a.member);
        assert_eq!(lane.producer.stage(ONE), a);
    }

    #[test]
    fn messages_left_unannounced_are_counted_until_their_blocks_say_so() {
        let t = Instant::now();
        let mut p = Producer::new(8, vec![0; 2], vec![0; 2]);
        assert_eq!(p.unannounced_since(), None);
        // Two messages, one on each member, published unannounced.
        for (k, m) in [0usize, 1].into_iter().enumerate() {
            let pos = p.stage(100);
            assert_eq!((pos.member, pos.seq), (m, k as u64));
            p.published_unannounced(m, t + Duration::from_millis(k as u64));
        }
        assert_eq!(p.unannounced_total(), 2);
        assert_eq!(p.unannounced_since(), Some(t), "since the first");
        assert_eq!(p.unannounced().collect::<Vec<_>>(), [(0, 1), (1, 1)]);
        // A consumer block past the announced count is no forgery: the
        // producer knows it published that far.
        let cb = IndexBlock::new(IndexKind::Consumer, GEN, 1, 1).encode();
        assert_eq!(p.on_consumer_block(0, &cb, GEN), Index::Fresh);
        // Member 0's next slot and block: its block announces both.
        p.stage(100);
        assert_eq!(p.publish(0), Some(2));
        p.published(0);
        assert_eq!(p.unannounced().collect::<Vec<_>>(), [(1, 1)]);
        assert!(p.unannounced_since().is_some());
        p.announced(1, 1);
        assert_eq!((p.unannounced_total(), p.unannounced_since()), (0, None));
        // An older count announces nothing.
        p.stage(100);
        p.published_unannounced(1, t);
        p.announced(1, 1);
        assert_eq!(p.unannounced_total(), 1);
    }

    #[test]
    fn a_reopened_producer_goes_past_what_it_wrote_unannounced() {
        let mut p = Producer::new(8, vec![3, 2], vec![3, 2]);
        let next = p.next();
        assert_eq!((next.member, next.counter, next.seq), (1, 2, 5));
        p.resume_past_written();
        let next = p.next();
        assert_eq!((next.member, next.counter, next.seq), (0, 3, 6));
        assert_eq!(p.produced(1), 3);
        assert_eq!(p.stage(100), next, "the next slot goes there");
    }

    #[test]
    fn producer_blocks_give_the_sizes_of_the_latest_slots() {
        let members = 2;
        let mut p = Producer::new(1024, vec![0; members], vec![0; members]);
        let mut c = Consumer::new(
            1024,
            vec![0; members],
            Duration::from_millis(100),
            Duration::from_secs(2),
        );
        // 100 slots of sizes 1000 + seq: 50 on each member.
        for seq in 0..100u32 {
            let pos = p.stage(1000 + seq);
            assert_eq!(pos.seq, u64::from(seq));
        }
        let n = INDEX_SIZES as u64;
        for m in 0..members {
            let count = p.publish(m).expect("staged");
            p.published(m);
            c.begin_poll();
            let block = producer_block(count, p.sizes(m));
            assert_eq!(c.on_producer_block(m, &block, GEN), Index::Fresh);
            for k in 0..count {
                let seq = k * members as u64 + m as u64;
                let want = (count - k <= n).then_some(1000 + seq as usize);
                assert_eq!(c.slot_size(m, k), want, "member {m} slot {k}");
            }
            // Not produced yet: no size.
            assert_eq!(c.slot_size(m, count), None);
        }
        // Slots staged and abandoned leave no sizes behind: the block
        // published next does not give them for slots a ring of sizes
        // earlier.
        let a = p.stage(7);
        let _ = p.stage(7);
        p.abandon(Some(a));
        for m in 0..members {
            assert!(p.sizes(m).iter().all(|&s| s != 7), "member {m}");
        }
        // A consumer block carries none, and a torn block changes nothing.
        c.begin_poll();
        let mut torn = producer_block(60, p.sizes(0));
        torn[40] ^= 1;
        assert_eq!(c.on_producer_block(0, &torn, GEN), Index::Bad);
        assert_eq!(c.slot_size(0, 49), Some(1000 + 98));
    }

    #[test]
    fn two_hosts_lanes_on_one_member_do_not_mix() {
        let now = t0();
        // Lanes (0→1) and (1→0) on one member: each its own ring and
        // blocks; a consumer handed the other lane's producer block sees a
        // consumer block and ignores it.
        let mut a = Lane::new(1);
        let mut b = Lane::new(1);
        a.send(1, 1);
        b.send(2, 1);
        assert_eq!(a.poll(now), vec![1]);
        assert_eq!(b.poll(now), vec![2]);
        a.consumer.begin_poll();
        let cross = b.cons_block[0].clone();
        assert_eq!(a.consumer.on_producer_block(0, &cross, GEN), Index::Bad);
    }

    #[test]
    fn runs_split_at_the_ring_end() {
        let mut c = Consumer::new(
            4,
            vec![3],
            Duration::from_millis(100),
            Duration::from_secs(2),
        );
        assert_eq!(c.runs(0, 3).collect::<Vec<_>>(), vec![(3, 1), (4, 2)]);
        c.consumed[0] = 4;
        assert_eq!(c.runs(0, 4).collect::<Vec<_>>(), vec![(4, 4)]);
        assert_eq!(c.runs(0, 0).count(), 0);
    }
}
