//! Logical block provisioning (SBC-3 §4.7) on the wire: the UNMAP parameter
//! list (§5.28.2), GET LBA STATUS parameter data (§5.6.2) and the Logical
//! Block Provisioning VPD page (0xB2, §6.5.4), built and parsed both ways.
//!
//! No-panic contract: every `parse` accepts any bytes and returns a value
//! or a [`ProvisioningError`]; a list cut short keeps the whole entries
//! that fit, as an allocation length cuts it.

use crate::cdb::flag;

/// Why bytes are not provisioning data this module accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisioningError {
    /// Fewer bytes than the fixed header.
    #[error("{what} truncated: {got} bytes, need at least {need}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A page other than the one asked for.
    #[error("expected VPD page 0x{expected:02X}, got 0x{got:02X}")]
    WrongPage {
        /// The page code asked for.
        expected: u8,
        /// The page code found.
        got: u8,
    },
}

/// Bytes of an UNMAP parameter list header, and of each block descriptor.
pub const UNMAP_HEADER_LEN: usize = 8;
/// Bytes of an UNMAP block descriptor.
pub const UNMAP_DESCRIPTOR_LEN: usize = 16;

/// One UNMAP block descriptor: a range of logical blocks to deallocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct UnmapDescriptor {
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks (0 unmaps nothing).
    pub blocks: u32,
}

/// An UNMAP parameter list (SBC-3 §5.28.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UnmapList {
    /// UNMAP DATA LENGTH: the bytes that follow it, as the sender claims.
    pub data_length: u16,
    /// UNMAP BLOCK DESCRIPTOR DATA LENGTH, as the sender claims.
    pub descriptor_data_length: u16,
    /// The block descriptors.
    pub descriptors: Vec<UnmapDescriptor>,
}

impl UnmapList {
    /// A list of `descriptors` with consistent length fields.
    pub fn new(descriptors: Vec<UnmapDescriptor>) -> UnmapList {
        let d = descriptors.len().saturating_mul(UNMAP_DESCRIPTOR_LEN);
        let d = u16::try_from(d).unwrap_or(u16::MAX);
        UnmapList {
            data_length: d.saturating_add(6),
            descriptor_data_length: d,
            descriptors,
        }
    }

    /// The parameter list bytes: the header, then every descriptor (the
    /// length fields as held, whatever the descriptors).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(UNMAP_HEADER_LEN + 16 * self.descriptors.len());
        b.extend_from_slice(&self.data_length.to_be_bytes());
        b.extend_from_slice(&self.descriptor_data_length.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        for d in &self.descriptors {
            b.extend_from_slice(&d.lba.to_be_bytes());
            b.extend_from_slice(&d.blocks.to_be_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        b
    }

    /// Decodes a parameter list. The descriptors are those the BLOCK
    /// DESCRIPTOR DATA LENGTH covers within `data`; when it claims more
    /// than `data` holds, the whole descriptors present (as LIO reads an
    /// UNMAP whose parameter list is shorter than its header says); a
    /// partial last descriptor is ignored (SBC-3).
    pub fn parse(data: &[u8]) -> Result<UnmapList, ProvisioningError> {
        let Some(header) = data.get(..UNMAP_HEADER_LEN) else {
            return Err(ProvisioningError::Truncated {
                what: "UNMAP parameter list",
                got: data.len(),
                need: UNMAP_HEADER_LEN,
            });
        };
        let data_length = u16::from_be_bytes([header[0], header[1]]);
        let descriptor_data_length = u16::from_be_bytes([header[2], header[3]]);
        let body = &data[UNMAP_HEADER_LEN..];
        let covered = usize::from(descriptor_data_length).min(body.len());
        let descriptors = body[..covered]
            .chunks_exact(UNMAP_DESCRIPTOR_LEN)
            .map(|d| UnmapDescriptor {
                lba: u64::from_be_bytes(d[..8].try_into().unwrap_or_default()),
                blocks: u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()),
            })
            .collect();
        Ok(UnmapList {
            data_length,
            descriptor_data_length,
            descriptors,
        })
    }
}

/// The PROVISIONING STATUS of an LBA status descriptor, as an open newtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProvisioningStatus(pub u8);

impl ProvisioningStatus {
    /// Mapped (or unknown).
    pub const MAPPED: ProvisioningStatus = ProvisioningStatus(0);
    /// Deallocated.
    pub const DEALLOCATED: ProvisioningStatus = ProvisioningStatus(1);
    /// Anchored.
    pub const ANCHORED: ProvisioningStatus = ProvisioningStatus(2);
}

/// One LBA status descriptor: an extent of blocks in one provisioning
/// status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbaStatusDescriptor {
    /// First logical block of the extent.
    pub lba: u64,
    /// Number of logical blocks in it.
    pub blocks: u32,
    /// Their provisioning status (4 bits).
    pub status: ProvisioningStatus,
}

/// Bytes of the GET LBA STATUS parameter data header and of a descriptor.
pub const LBA_STATUS_HEADER_LEN: usize = 8;
/// Bytes of an LBA status descriptor.
pub const LBA_STATUS_DESCRIPTOR_LEN: usize = 16;

/// GET LBA STATUS parameter data (SBC-3 §5.6.2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LbaStatus {
    /// PARAMETER DATA LENGTH: the bytes after the field, as the device
    /// claims (it may be more than the allocation length let through).
    pub data_length: u32,
    /// The descriptors present.
    pub descriptors: Vec<LbaStatusDescriptor>,
}

impl LbaStatus {
    /// Parameter data for `descriptors`, its length field consistent.
    pub fn new(descriptors: Vec<LbaStatusDescriptor>) -> LbaStatus {
        let n = descriptors
            .len()
            .saturating_mul(LBA_STATUS_DESCRIPTOR_LEN)
            .saturating_add(4);
        LbaStatus {
            data_length: u32::try_from(n).unwrap_or(u32::MAX),
            descriptors,
        }
    }

    /// The parameter data bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(LBA_STATUS_HEADER_LEN + 16 * self.descriptors.len());
        b.extend_from_slice(&self.data_length.to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        for d in &self.descriptors {
            b.extend_from_slice(&d.lba.to_be_bytes());
            b.extend_from_slice(&d.blocks.to_be_bytes());
            b.push(d.status.0 & 0x0F);
            b.extend_from_slice(&[0; 3]);
        }
        b
    }

    /// Decodes parameter data: the whole descriptors within both `data`
    /// and the PARAMETER DATA LENGTH.
    pub fn parse(data: &[u8]) -> Result<LbaStatus, ProvisioningError> {
        let Some(header) = data.get(..LBA_STATUS_HEADER_LEN) else {
            return Err(ProvisioningError::Truncated {
                what: "GET LBA STATUS parameter data",
                got: data.len(),
                need: LBA_STATUS_HEADER_LEN,
            });
        };
        let data_length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        // The length counts from byte 4: the descriptors end at 4 + length.
        let end = usize::try_from(data_length)
            .unwrap_or(usize::MAX)
            .saturating_add(4)
            .min(data.len());
        let body = data.get(LBA_STATUS_HEADER_LEN..end).unwrap_or_default();
        let descriptors = body
            .chunks_exact(LBA_STATUS_DESCRIPTOR_LEN)
            .map(|d| LbaStatusDescriptor {
                lba: u64::from_be_bytes(d[..8].try_into().unwrap_or_default()),
                blocks: u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()),
                status: ProvisioningStatus(d[12] & 0x0F),
            })
            .collect();
        Ok(LbaStatus {
            data_length,
            descriptors,
        })
    }
}

/// The Logical Block Provisioning VPD page (0xB2).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LogicalBlockProvisioning {
    /// THRESHOLD EXPONENT.
    pub threshold_exponent: u8,
    /// LBPU: UNMAP is supported.
    pub lbpu: bool,
    /// LBPWS: WRITE SAME(16) with UNMAP is supported.
    pub lbpws: bool,
    /// LBPWS10: WRITE SAME(10) with UNMAP is supported.
    pub lbpws10: bool,
    /// LBPRZ: a deallocated block reads as zeros.
    pub lbprz: bool,
    /// ANC_SUP: anchoring is supported.
    pub anc_sup: bool,
    /// DP: a provisioning group descriptor follows.
    pub dp: bool,
    /// PROVISIONING TYPE (3 bits): 0 not reported, 1 resource, 2 thin.
    pub provisioning_type: u8,
    /// Bytes after the fixed part (the provisioning group descriptor).
    pub descriptor: Vec<u8>,
}

impl LogicalBlockProvisioning {
    /// The page's code.
    pub const PAGE_CODE: u8 = 0xB2;

    /// The page body (the bytes after the 4-byte VPD header): 4 bytes and
    /// the descriptor.
    pub fn body(&self) -> Vec<u8> {
        let flags = flag(self.lbpu, 0x80)
            | flag(self.lbpws, 0x40)
            | flag(self.lbpws10, 0x20)
            | flag(self.lbprz, 0x04)
            | flag(self.anc_sup, 0x02)
            | flag(self.dp, 0x01);
        let mut b = vec![
            self.threshold_exponent,
            flags,
            self.provisioning_type & 0x07,
            0,
        ];
        b.extend_from_slice(&self.descriptor);
        b
    }

    /// Decodes a page body; fields beyond a short body read as zero.
    pub fn parse_body(body: &[u8]) -> LogicalBlockProvisioning {
        let at = |i: usize| body.get(i).copied().unwrap_or(0);
        LogicalBlockProvisioning {
            threshold_exponent: at(0),
            lbpu: at(1) & 0x80 != 0,
            lbpws: at(1) & 0x40 != 0,
            lbpws10: at(1) & 0x20 != 0,
            lbprz: at(1) & 0x04 != 0,
            anc_sup: at(1) & 0x02 != 0,
            dp: at(1) & 0x01 != 0,
            provisioning_type: at(2) & 0x07,
            descriptor: body.get(4..).unwrap_or_default().to_vec(),
        }
    }

    /// Decodes the whole page (header included), as INQUIRY returns it.
    pub fn parse(page: &[u8]) -> Result<LogicalBlockProvisioning, ProvisioningError> {
        let Some(header) = page.get(..4) else {
            return Err(ProvisioningError::Truncated {
                what: "Logical Block Provisioning VPD page",
                got: page.len(),
                need: 4,
            });
        };
        if header[1] != Self::PAGE_CODE {
            return Err(ProvisioningError::WrongPage {
                expected: Self::PAGE_CODE,
                got: header[1],
            });
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let end = len.saturating_add(4).min(page.len());
        Ok(Self::parse_body(&page[4..end]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unmap_list_bytes() {
        // sg_unmap --lba=0x1000 --num=8: one descriptor, 24 bytes.
        let list = UnmapList::new(vec![UnmapDescriptor {
            lba: 0x1000,
            blocks: 8,
        }]);
        let b = list.to_bytes();
        assert_eq!(
            b,
            [
                0, 22, 0, 16, 0, 0, 0, 0, // header
                0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 8, 0, 0, 0, 0
            ]
        );
        assert_eq!(UnmapList::parse(&b), Ok(list));
        // A descriptor data length beyond the bytes present: the whole
        // descriptors there; a partial one is ignored.
        let mut long = b.clone();
        long[3] = 48;
        long.extend_from_slice(&[1; 10]);
        let parsed = UnmapList::parse(&long).unwrap();
        assert_eq!(parsed.descriptor_data_length, 48);
        assert_eq!(parsed.descriptors.len(), 1);
        // Shorter than its header.
        assert!(matches!(
            UnmapList::parse(&b[..7]),
            Err(ProvisioningError::Truncated { need: 8, .. })
        ));
        // A header alone: no descriptors.
        assert_eq!(
            UnmapList::parse(&[0, 6, 0, 0, 0, 0, 0, 0]).unwrap(),
            UnmapList::new(Vec::new())
        );
    }

    #[test]
    fn lba_status_bytes() {
        let status = LbaStatus::new(vec![
            LbaStatusDescriptor {
                lba: 0,
                blocks: 128,
                status: ProvisioningStatus::MAPPED,
            },
            LbaStatusDescriptor {
                lba: 128,
                blocks: 0x1_0000,
                status: ProvisioningStatus::DEALLOCATED,
            },
        ]);
        let b = status.to_bytes();
        assert_eq!(&b[..8], &[0, 0, 0, 36, 0, 0, 0, 0]);
        assert_eq!(
            &b[24..40],
            &[0, 0, 0, 0, 0, 0, 0, 128, 0, 1, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(LbaStatus::parse(&b), Ok(status.clone()));
        // Clipped by an allocation length: the whole descriptors that fit.
        let clipped = LbaStatus::parse(&b[..30]).unwrap();
        assert_eq!(clipped.data_length, 36);
        assert_eq!(clipped.descriptors, status.descriptors[..1]);
        assert!(LbaStatus::parse(&b[..4]).is_err());
    }

    #[test]
    fn provisioning_page_bytes() {
        // LIO's fileio with emulate_tpu, emulate_tpws and unmap_zeroes_data.
        let page = [0x00, 0xB2, 0x00, 0x04, 0x00, 0xE4, 0x00, 0x00];
        let p = LogicalBlockProvisioning::parse(&page).unwrap();
        assert!(p.lbpu && p.lbpws && p.lbpws10 && p.lbprz);
        assert!(!p.anc_sup && !p.dp);
        assert_eq!(p.provisioning_type, 0);
        assert_eq!(p.body(), page[4..]);
        assert!(matches!(
            LogicalBlockProvisioning::parse(&[0, 0xB0, 0, 4, 0, 0, 0, 0]),
            Err(ProvisioningError::WrongPage { got: 0xB0, .. })
        ));
        // A short page reads as zeros past its end.
        let short = LogicalBlockProvisioning::parse(&page[..5]).unwrap();
        assert!(!short.lbpu);
    }

    proptest! {
        #[test]
        fn unmap_lists_round_trip(ds in proptest::collection::vec(any::<(u64, u32)>(), 0..20)) {
            let list = UnmapList::new(
                ds.iter().map(|&(lba, blocks)| UnmapDescriptor { lba, blocks }).collect(),
            );
            prop_assert_eq!(UnmapList::parse(&list.to_bytes()), Ok(list));
        }

        #[test]
        fn lba_status_round_trips(ds in proptest::collection::vec(any::<(u64, u32, u8)>(), 0..20)) {
            let status = LbaStatus::new(
                ds.iter()
                    .map(|&(lba, blocks, s)| LbaStatusDescriptor {
                        lba,
                        blocks,
                        status: ProvisioningStatus(s & 0x0F),
                    })
                    .collect(),
            );
            prop_assert_eq!(LbaStatus::parse(&status.to_bytes()), Ok(status));
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = UnmapList::parse(&data);
            let _ = LbaStatus::parse(&data);
            let _ = LogicalBlockProvisioning::parse(&data);
            let body = LogicalBlockProvisioning::parse_body(&data);
            let again = LogicalBlockProvisioning::parse_body(&body.body());
            // Reserved bits are not kept; everything else is.
            prop_assert_eq!(again, body);
        }
    }
}
