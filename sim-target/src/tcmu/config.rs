//! The daemon's array: `--stg ID:COUNT` groups, LUN size and block size.

use std::str::FromStr;
use std::sync::Arc;

use crate::array::{Array, MAX_LUN};
use crate::lun::LunConfig;
use crate::mailbox::{StgMailbox, StgSpec};

/// One `--stg ID:COUNT`: STG `id` with `members` LUNs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StgArg {
    /// The STG id.
    pub id: u32,
    /// How many member LUNs it has (at least 1).
    pub members: u32,
}

impl FromStr for StgArg {
    type Err = String;

    fn from_str(s: &str) -> Result<StgArg, String> {
        let (id, count) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not ID:COUNT (e.g. 1:4)"))?;
        let id = id
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("STG id {id:?} in {s:?} is not a number"))?;
        let members = count
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("member count {count:?} in {s:?} is not a number"))?;
        if members == 0 {
            return Err(format!("STG {id} needs at least one member LUN"));
        }
        Ok(StgArg { id, members })
    }
}

impl std::fmt::Display for StgArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, self.members)
    }
}

/// The STGs when no `--stg` is given: STG 1 with LUNs 0–3.
pub const DEFAULT_STG: StgArg = StgArg { id: 1, members: 4 };

/// Parses a size in bytes with an optional binary suffix: `512`, `64K`,
/// `256M`, `1G`, `2T` (case-insensitive; a trailing `B` or `iB` is allowed:
/// `256MiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix(['B', 'b']))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("{s:?} is not a size (a number with an optional K, M, G or T suffix)")
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Builds the array: LUNs 0, 1, 2, … numbered consecutively over `stgs` in
/// order, each of `lun_size` bytes in blocks of `block_size`, and the STG
/// mailbox installed as its vendor handler.
pub fn build_array(
    stgs: &[StgArg],
    lun_size: u64,
    block_size: u32,
) -> Result<(Array, Arc<StgMailbox>), String> {
    let stgs = if stgs.is_empty() {
        &[DEFAULT_STG][..]
    } else {
        stgs
    };
    if block_size == 0 || lun_size == 0 || lun_size % u64::from(block_size) != 0 {
        return Err(format!(
            "--lun-size {lun_size} must be a non-zero multiple of --block-size {block_size}"
        ));
    }
    let total: u64 = stgs.iter().map(|s| u64::from(s.members)).sum();
    if total > MAX_LUN + 1 {
        return Err(format!(
            "{total} LUNs in all; the array numbers at most {} (LUNs 0..={MAX_LUN})",
            MAX_LUN + 1
        ));
    }
    let array = Array::new();
    let mut specs = Vec::with_capacity(stgs.len());
    let mut next = 0u64;
    for s in stgs {
        let members: Vec<u64> = (next..next + u64::from(s.members)).collect();
        for &lun in &members {
            array
                .add_lun(
                    lun,
                    LunConfig::new(lun, lun_size / u64::from(block_size), block_size),
                )
                .map_err(|e| e.to_string())?;
        }
        next += u64::from(s.members);
        specs.push(StgSpec::new(s.id, members));
    }
    let mailbox = StgMailbox::new(&array, specs).map_err(|e| e.to_string())?;
    mailbox.install(&array);
    Ok((array, mailbox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stg_arguments_parse() {
        assert_eq!("1:4".parse::<StgArg>(), Ok(StgArg { id: 1, members: 4 }));
        assert_eq!("7: 2".parse::<StgArg>(), Ok(StgArg { id: 7, members: 2 }));
        for bad in ["1", "1:0", "x:2", "1:y", ":", "1:2:3", "-1:2"] {
            assert!(bad.parse::<StgArg>().is_err(), "{bad}");
        }
        assert_eq!(StgArg { id: 3, members: 2 }.to_string(), "3:2");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("4KB"), Ok(4096));
        for bad in ["", "M", "1.5G", "-1", "12Q", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn luns_are_numbered_over_the_stgs_in_order() {
        let (array, mailbox) = build_array(
            &[StgArg { id: 5, members: 2 }, StgArg { id: 2, members: 3 }],
            1 << 20,
            4096,
        )
        .unwrap();
        assert_eq!(array.lun_ids(), vec![0, 1, 2, 3, 4]);
        assert_eq!(mailbox.member_of(0), Some((5, 0)));
        assert_eq!(mailbox.member_of(1), Some((5, 1)));
        assert_eq!(mailbox.member_of(2), Some((2, 0)));
        assert_eq!(mailbox.member_of(4), Some((2, 2)));
        let lun = array.lun(3).unwrap();
        assert_eq!((lun.config().blocks, lun.config().block_size), (256, 4096));
        // Vendor commands reach the mailbox.
        assert!(array
            .direction_of(&[0xC0, 0, 0, 0, 0, 0, 0, 0, 0x40, 0])
            .is_some());
    }

    #[test]
    fn the_default_is_one_stg_of_four() {
        let (array, mailbox) = build_array(&[], 256 << 20, 512).unwrap();
        assert_eq!(array.lun_ids(), vec![0, 1, 2, 3]);
        assert_eq!(mailbox.member_of(3), Some((1, 3)));
    }

    #[test]
    fn bad_geometry_is_refused() {
        assert!(build_array(&[], 1000, 512).is_err());
        assert!(build_array(&[], 0, 512).is_err());
        assert!(build_array(&[], 1 << 20, 0).is_err());
        assert!(
            build_array(&[], 1 << 20, 1000).is_err(),
            "not a power of two"
        );
        assert!(build_array(
            &[StgArg {
                id: 1,
                members: 20000
            }],
            1 << 20,
            512
        )
        .is_err());
        let dup = [StgArg { id: 1, members: 1 }, StgArg { id: 1, members: 1 }];
        assert!(build_array(&dup, 1 << 20, 512).is_err());
    }
}
