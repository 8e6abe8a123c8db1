//! The destructive-write guard: before STP writes over a LUN's blocks
//! (formatting a block-mode STG), it looks for what a user would lose.
//!
//! A LUN is refused when it carries
//!
//! * a partition table (MBR boot signature with partition entries, GPT
//!   header),
//! * a file system, swap or volume signature (ext2/3/4, XFS, Btrfs, NTFS,
//!   FAT, ISO 9660, swap, LVM2 physical volume, LUKS),
//! * another block-mode STG's superblock (another STG id),
//! * a holder in the kernel (device mapper, LVM, MD: the block device's
//!   `holders/`) or a mounted file system (the block device or one of its
//!   partitions in `/proc/mounts`),
//!
//! unless the user forces it. Reformatting the *same* STG is allowed (its
//! hosts must reopen it). The signature checks are pure functions of the
//! LUN's first [`SCAN_BYTES`] bytes ([`scan_bytes`]); [`scan`] reads them
//! through any [`Transport`], and [`holders`] reads sysfs from a root given
//! as a parameter, so both run against the simulated array and a fake sysfs
//! in tests.
//!
//! No-panic contract: [`scan_bytes`] accepts any bytes.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use scsi::{CommandError, Transport};

/// Bytes read from the start of a LUN: enough for every signature checked
/// (Btrfs's superblock lies at 64 KiB + 64).
pub const SCAN_BYTES: usize = 68 * 1024;

/// Something on a LUN that formatting would destroy.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// A partition table ("MBR" or "GPT").
    PartitionTable(&'static str),
    /// A file system, swap area or volume (its name), found at `offset`.
    Signature {
        /// What it is, e.g. "an ext2/3/4 file system".
        what: &'static str,
        /// Byte offset of the magic on the LUN.
        offset: usize,
    },
    /// The superblock of another block-mode STG.
    OtherStg {
        /// That STG's id.
        stg: u32,
    },
    /// Kernel holders of the block device (dm, LVM, MD).
    Holders(Vec<String>),
    /// The block device or a partition of it is mounted.
    Mounted {
        /// The device in `/proc/mounts`.
        device: String,
        /// Where.
        mount_point: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::PartitionTable(kind) => write!(f, "an {kind} partition table"),
            Finding::Signature { what, offset } => write!(f, "{what} (signature at byte {offset})"),
            Finding::OtherStg { stg } => write!(f, "the superblock of block-mode STG {stg}"),
            Finding::Holders(h) => write!(f, "kernel holders {}", h.join(", ")),
            Finding::Mounted {
                device,
                mount_point,
            } => write!(f, "{device} mounted on {mount_point}"),
        }
    }
}

/// Why a format was refused: which member holds what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardError {
    /// A member holds something formatting would destroy.
    #[error(
        "refusing to format STG {stg}: member {member} ({path}) holds {}; formatting would \
         destroy it. Check that the configuration names the right LUNs (`stp probe` shows \
         their identities); to erase it anyway, run again with --force",
        .findings.iter().map(ToString::to_string).collect::<Vec<_>>().join(" and ")
    )]
    Refused {
        /// The STG being formatted.
        stg: u32,
        /// The member index.
        member: usize,
        /// The member's path.
        path: String,
        /// What was found.
        findings: Vec<Finding>,
    },
    /// A member could not be read.
    #[error(
        "cannot read the first {SCAN_BYTES} bytes of STG {stg} member {member} ({path}) to \
         check it before formatting: {source}"
    )]
    Unreadable {
        /// The STG being formatted.
        stg: u32,
        /// The member index.
        member: usize,
        /// The member's path.
        path: String,
        /// The failure.
        source: CommandError,
    },
}

/// Signatures: (offset, magic, what).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (1080, &[0x53, 0xEF], "an ext2/3/4 file system"),
    (0, b"XFSB", "an XFS file system"),
    (65_600, b"_BHRfS_M", "a Btrfs file system"),
    (3, b"NTFS    ", "an NTFS file system"),
    (82, b"FAT32   ", "a FAT32 file system"),
    (54, b"FAT16   ", "a FAT16 file system"),
    (54, b"FAT12   ", "a FAT12 file system"),
    (32_769, b"CD001", "an ISO 9660 file system"),
    (4086, b"SWAPSPACE2", "a Linux swap area"),
    (4086, b"SWAP-SPACE", "a Linux swap area"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (512, b"LABELONE", "an LVM2 physical volume"),
    (0, b"LABELONE", "an LVM2 physical volume"),
];

/// The block-mode superblock magic of any block format (docs/PROTOCOL.md §4).
const STP_MAGIC: &[u8] = b"STPBLKv";

fn at(bytes: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    bytes.get(offset..offset.checked_add(len)?)
}

/// What the first bytes of a LUN (`head`, ideally [`SCAN_BYTES`] of them;
/// fewer are checked as far as they go) hold that formatting STG
/// `own_stg` would destroy. `block_size` locates the GPT header (LBA 1).
pub fn scan_bytes(head: &[u8], block_size: u32, own_stg: u32) -> Vec<Finding> {
    let mut found = Vec::new();
    if at(head, 0, STP_MAGIC.len()) == Some(STP_MAGIC) {
        // A block-mode STG: its own superblock may be reformatted; another
        // STG's may not. Nothing else is looked for (the STG wrote it all).
        let id = at(head, 8, 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if let Some(stg) = id.filter(|&s| s != own_stg) {
            found.push(Finding::OtherStg { stg });
        }
        return found;
    }
    if at(head, block_size as usize, 8) == Some(b"EFI PART") {
        found.push(Finding::PartitionTable("GPT"));
    } else if at(head, 510, 2) == Some(&[0x55, 0xAA])
        && at(head, 446, 64).is_some_and(|entries| entries.iter().any(|&b| b != 0))
    {
        found.push(Finding::PartitionTable("MBR"));
    }
    for &(offset, magic, what) in SIGNATURES {
        if at(head, offset, magic.len()) == Some(magic)
            && !found
                .iter()
                .any(|f| matches!(f, Finding::Signature { what: w, .. } if *w == what))
        {
            found.push(Finding::Signature { what, offset });
        }
    }
    found
}

/// Reads the first [`SCAN_BYTES`] of a LUN through `t` (READ(16)) and
/// checks them ([`scan_bytes`]).
pub fn scan(
    t: &mut dyn Transport,
    block_size: u32,
    own_stg: u32,
) -> Result<Vec<Finding>, CommandError> {
    let bs = block_size.max(512);
    let blocks = SCAN_BYTES.div_ceil(bs as usize) as u32;
    let data = crate::block::read_blocks(t, 0, blocks, bs, Duration::from_secs(30))?;
    Ok(scan_bytes(&data, block_size, own_stg))
}

/// The block devices behind a device path: for `/dev/sgN`, the disk its
/// SCSI device exposes (`<sys>/class/scsi_generic/sgN/device/block/*`);
/// for `/dev/sdX`, itself.
fn block_devices(sys_root: &Path, dev_path: &Path) -> Vec<String> {
    let Some(name) = dev_path.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    if name.starts_with("sg") {
        let dir = sys_root
            .join("class/scsi_generic")
            .join(name)
            .join("device/block");
        return fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
    }
    vec![name.to_owned()]
}

/// Kernel holders and mounts of the block device behind `dev_path` (and
/// its partitions), from sysfs under `sys_root` and the mount table
/// `mounts` (the text of `/proc/mounts`). A device the kernel shows no
/// block device for (no `sd` driver) has none.
pub fn holders(sys_root: &Path, mounts: &str, dev_path: &Path) -> Vec<Finding> {
    let mut found = Vec::new();
    for disk in block_devices(sys_root, dev_path) {
        let base: PathBuf = sys_root.join("class/block").join(&disk);
        let mut names = vec![disk.clone()];
        if let Ok(d) = fs::read_dir(&base) {
            for e in d.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&disk) && n != disk {
                    names.push(n);
                }
            }
        }
        let mut held = Vec::new();
        for n in &names {
            let dir = sys_root.join("class/block").join(n).join("holders");
            if let Ok(d) = fs::read_dir(dir) {
                held.extend(
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
        }
        if !held.is_empty() {
            found.push(Finding::Holders(held));
        }
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            let (Some(dev), Some(point)) = (f.next(), f.next()) else {
                continue;
            };
            if names.iter().any(|n| dev == format!("/dev/{n}")) {
                found.push(Finding::Mounted {
                    device: dev.to_owned(),
                    mount_point: point.to_owned(),
                });
            }
        }
    }
    found
}

/// Checks every member before a format of STG `stg`: reads each one's
/// first bytes through its transport and, where `paths[i]` is a device
/// path, its kernel holders and mounts (sysfs under `sys_root`, the mount
/// table `mounts`). The first member holding anything is refused.
pub fn check_members(
    stg: u32,
    members: &mut [Box<dyn Transport>],
    paths: &[String],
    block_size: u32,
    sys_root: &Path,
    mounts: &str,
) -> Result<(), GuardError> {
    for (member, t) in members.iter_mut().enumerate() {
        let path = paths.get(member).cloned().unwrap_or_else(|| t.describe());
        let mut findings =
            scan(t.as_mut(), block_size, stg).map_err(|source| GuardError::Unreadable {
                stg,
                member,
                path: path.clone(),
                source,
            })?;
        findings.extend(holders(sys_root, mounts, Path::new(&path)));
        if !findings.is_empty() {
            return Err(GuardError::Refused {
                stg,
                member,
                path,
                findings,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn blank() -> Vec<u8> {
        vec![0u8; SCAN_BYTES]
    }

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = blank();
        b[offset..offset + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn a_blank_lun_is_free() {
        assert!(scan_bytes(&blank(), 512, 7).is_empty());
        assert!(scan_bytes(&[], 512, 7).is_empty());
    }

    #[test]
    fn every_signature_is_found() {
        for &(offset, magic, what) in SIGNATURES {
            let got = scan_bytes(&with(offset, magic), 512, 7);
            assert_eq!(got, vec![Finding::Signature { what, offset }], "{what}");
        }
    }

    #[test]
    fn partition_tables() {
        let mut mbr = with(510, &[0x55, 0xAA]);
        // A boot signature alone (no entries) is not a partition table.
        assert!(scan_bytes(&mbr, 512, 7).is_empty());
        mbr[446 + 4] = 0x83;
        assert_eq!(
            scan_bytes(&mbr, 512, 7),
            vec![Finding::PartitionTable("MBR")]
        );
        let gpt = with(4096, b"EFI PART");
        assert_eq!(
            scan_bytes(&gpt, 4096, 7),
            vec![Finding::PartitionTable("GPT")]
        );
        assert!(
            scan_bytes(&gpt, 512, 7).is_empty(),
            "LBA 1 is at the block size"
        );
    }

    #[test]
    fn stg_superblocks() {
        let mut own = with(0, b"STPBLKv4");
        own[8..12].copy_from_slice(&7u32.to_be_bytes());
        assert!(
            scan_bytes(&own, 512, 7).is_empty(),
            "reformatting the same STG"
        );
        assert_eq!(scan_bytes(&own, 512, 8), vec![Finding::OtherStg { stg: 7 }]);
        // An STG of an earlier block format is an STG too.
        for old in [b"STPBLKv1", b"STPBLKv2", b"STPBLKv3"] {
            own[..8].copy_from_slice(old);
            assert_eq!(scan_bytes(&own, 512, 8), vec![Finding::OtherStg { stg: 7 }]);
        }
    }

    #[test]
    fn holders_and_mounts_from_a_fake_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let sys = root.path();
        fs::create_dir_all(sys.join("class/scsi_generic/sg3/device/block/sdc")).unwrap();
        fs::create_dir_all(sys.join("class/block/sdc/sdc1")).unwrap();
        fs::create_dir_all(sys.join("class/block/sdc1/holders/dm-0")).unwrap();
        fs::create_dir_all(sys.join("class/block/sdc/holders")).unwrap();
        let mounts = "/dev/sda1 / ext4 rw 0 0\n/dev/sdc1 /srv xfs rw 0 0\n";
        let got = holders(sys, mounts, Path::new("/dev/sg3"));
        assert_eq!(
            got,
            vec![
                Finding::Holders(vec!["dm-0".into()]),
                Finding::Mounted {
                    device: "/dev/sdc1".into(),
                    mount_point: "/srv".into()
                }
            ]
        );
        assert!(holders(sys, mounts, Path::new("/dev/sg9")).is_empty());
        assert!(holders(sys, "", Path::new("sim:h0/lun1")).is_empty());
    }

    #[test]
    fn the_refusal_names_the_member_and_the_way_out() {
        let e = GuardError::Refused {
            stg: 7,
            member: 1,
            path: "/dev/sg4".into(),
            findings: vec![Finding::Signature {
                what: "an XFS file system",
                offset: 0,
            }],
        };
        let text = e.to_string();
        assert!(
            text.contains("member 1 (/dev/sg4)") && text.contains("XFS"),
            "{text}"
        );
        assert!(text.contains("--force"), "{text}");
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000),
                                 bs in any::<u32>(), stg in any::<u32>()) {
            let _ = scan_bytes(&bytes, bs, stg);
        }
    }
}
