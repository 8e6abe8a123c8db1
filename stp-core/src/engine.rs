//! Transport policies: [`Stripe`] spreads a logical block range over
//! several LUNs. Retrying lives in [`crate::retry`], the one place that
//! decides which failed commands may run again.

/// One piece of a striped range: `blocks` blocks at `lba` on member
/// `member`, holding the range's blocks from `offset` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The member LUN's index.
    pub member: usize,
    /// The first block on that member.
    pub lba: u64,
    /// How many blocks.
    pub blocks: u64,
    /// Blocks of the logical range before this piece.
    pub offset: u64,
}

/// Round-robin striping of a logical block space over `members` LUNs in
/// chunks of `chunk` blocks (RAID 0 layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stripe {
    members: usize,
    chunk: u64,
}

impl Stripe {
    /// A stripe over `members` LUNs with `chunk` blocks per chunk; `None`
    /// when either is zero.
    pub fn new(members: usize, chunk: u64) -> Option<Stripe> {
        (members > 0 && chunk > 0).then_some(Stripe { members, chunk })
    }

    /// Where logical block `lba` lives: (member, member LBA).
    pub fn locate(&self, lba: u64) -> (usize, u64) {
        let chunk_no = lba / self.chunk;
        let m = self.members as u64;
        (
            (chunk_no % m) as usize,
            (chunk_no / m) * self.chunk + lba % self.chunk,
        )
    }

    /// Splits `blocks` logical blocks from `lba` into per-member extents,
    /// in logical order, none crossing a chunk boundary.
    pub fn split(&self, lba: u64, blocks: u64) -> Vec<Extent> {
        let mut v = Vec::new();
        let mut done = 0;
        while done < blocks {
            let at = lba + done;
            let n = (self.chunk - at % self.chunk).min(blocks - done);
            let (member, mlba) = self.locate(at);
            v.push(Extent {
                member,
                lba: mlba,
                blocks: n,
                offset: done,
            });
            done += n;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_layout() {
        assert!(Stripe::new(0, 8).is_none());
        assert!(Stripe::new(2, 0).is_none());
        let s = Stripe::new(3, 4).unwrap();
        assert_eq!(s.locate(0), (0, 0));
        assert_eq!(s.locate(5), (1, 1));
        assert_eq!(s.locate(12), (0, 4));
        assert_eq!(s.locate(23), (2, 7));
        let parts = s.split(2, 9);
        assert_eq!(
            parts,
            vec![
                Extent {
                    member: 0,
                    lba: 2,
                    blocks: 2,
                    offset: 0
                },
                Extent {
                    member: 1,
                    lba: 0,
                    blocks: 4,
                    offset: 2
                },
                Extent {
                    member: 2,
                    lba: 0,
                    blocks: 3,
                    offset: 6
                },
            ]
        );
        assert_eq!(parts.iter().map(|e| e.blocks).sum::<u64>(), 9);
        assert!(s.split(5, 0).is_empty());
    }
}
