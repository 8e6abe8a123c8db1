//! INQUIRY data (SPC-4 §6.6): the standard INQUIRY data and the vital
//! product data (VPD) pages STP relies on — Supported VPD Pages (0x00), Unit
//! Serial Number (0x80), Device Identification (0x83) and Block Limits
//! (0xB0, SBC-3) — parsed (hosts read them) and emitted (the simulated array
//! returns them), plus [`inquiry`], [`vpd`] and [`identify`], which run the
//! commands over any [`Transport`].
//!
//! No-panic contract: [`StandardInquiry::parse`] and [`VpdPage::parse`]
//! accept any byte slice and return a value or an [`InquiryError`]. Lengths
//! claimed by the data are clipped to the bytes actually present (a device
//! returns less than the page length when the allocation length was short);
//! a designator whose length runs past the end of the page is dropped with
//! the rest of the list; fields missing from a short page read as zero.
//! Text fields are decoded lossily, so no byte sequence is rejected.

use std::fmt::Write as _;

use crate::cdb::{flag, Cdb};
use crate::transport::{Command, CommandError, Transport};

/// Why INQUIRY data could not be decoded.
#[non_exhaustive]
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum InquiryError {
    /// Fewer bytes than the smallest usable response.
    #[error("{what} truncated: {got} bytes, need at least {need}")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The device returned a different VPD page than the one asked for.
    #[error("asked for VPD page 0x{expected:02X}, device returned page 0x{got:02X}")]
    WrongPage {
        /// The page requested.
        expected: u8,
        /// The page returned.
        got: u8,
    },
    /// The data is inconsistent in a way clipping cannot repair.
    #[error("malformed INQUIRY data: {0}")]
    Malformed(&'static str),
}

/// Standard INQUIRY data (SPC-4 §6.6.2), the fields STP uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandardInquiry {
    /// PERIPHERAL QUALIFIER (byte 0 bits 7–5); 0 = a logical unit is connected.
    pub peripheral_qualifier: u8,
    /// PERIPHERAL DEVICE TYPE (byte 0 bits 4–0); 0 = direct-access block device.
    pub device_type: u8,
    /// RMB: removable medium.
    pub removable: bool,
    /// VERSION: the SPC standard claimed; 6 = SPC-4.
    pub version: u8,
    /// NORMACA: normal ACA supported.
    pub normaca: bool,
    /// HISUP: hierarchical LUN addressing supported.
    pub hisup: bool,
    /// RESPONSE DATA FORMAT; 2 for every current device.
    pub response_data_format: u8,
    /// TPGS: asymmetric logical unit access support (0–3).
    pub tpgs: u8,
    /// PROTECT: protection information supported.
    pub protect: bool,
    /// CMDQUE: command queuing supported.
    pub cmdque: bool,
    /// T10 VENDOR IDENTIFICATION (8 ASCII bytes, trailing spaces trimmed).
    pub vendor: String,
    /// PRODUCT IDENTIFICATION (16 ASCII bytes, trailing spaces trimmed).
    pub product: String,
    /// PRODUCT REVISION LEVEL (4 ASCII bytes, trailing spaces trimmed).
    pub revision: String,
    /// VERSION DESCRIPTORs (bytes 58–73, [`version_descriptor`]): the
    /// standards claimed, in their slots; trailing empty slots trimmed,
    /// empty slots before a used one kept as 0 (LIO leaves its transport
    /// slot 0 when it does not know the transport).
    pub version_descriptors: Vec<u16>,
}

/// VERSION DESCRIPTOR values (SPC-4 table 33) the simulated array and LIO
/// claim.
pub mod version_descriptor {
    /// SAM-5 (no version claimed).
    pub const SAM5: u16 = 0x00A0;
    /// SPC-4 (no version claimed).
    pub const SPC4: u16 = 0x0460;
    /// SBC-3 (no version claimed).
    pub const SBC3: u16 = 0x04C0;
    /// iSCSI (no version claimed).
    pub const ISCSI: u16 = 0x0960;
    /// SAS-3 (no version claimed): what LIO claims on tcm_loop.
    pub const SAS3: u16 = 0x0C60;
}

/// Where the VERSION DESCRIPTORs start, and how many there are.
const VERSION_DESCRIPTORS_AT: usize = 58;
const VERSION_DESCRIPTORS_MAX: usize = 8;
/// Length of standard INQUIRY data with version descriptors, as LIO sends
/// it (ADDITIONAL LENGTH 91).
const STANDARD_INQUIRY_LONG_LEN: usize = 96;

/// Length of the standard INQUIRY data [`StandardInquiry::to_bytes`] emits
/// and [`inquiry`] asks for: the part every device returns.
pub const STANDARD_INQUIRY_LEN: usize = 36;

/// Bytes needed to decode the flag fields of standard INQUIRY data.
const STANDARD_INQUIRY_MIN: usize = 8;

impl StandardInquiry {
    /// Decodes standard INQUIRY data. Never panics.
    ///
    /// Needs the first 8 bytes (the flag fields). Like Linux, the text
    /// fields are read from the bytes present whatever the ADDITIONAL LENGTH
    /// claims; a response cut short within them yields shortened strings.
    pub fn parse(data: &[u8]) -> Result<Self, InquiryError> {
        if data.len() < STANDARD_INQUIRY_MIN {
            return Err(InquiryError::Truncated {
                what: "standard INQUIRY data",
                got: data.len(),
                need: STANDARD_INQUIRY_MIN,
            });
        }
        let text = |from: usize, to: usize| -> String {
            let to = to.min(data.len());
            data.get(from..to).map(ascii_trim_end).unwrap_or_default()
        };
        let mut version_descriptors: Vec<u16> = data
            .get(VERSION_DESCRIPTORS_AT..)
            .unwrap_or_default()
            .chunks_exact(2)
            .take(VERSION_DESCRIPTORS_MAX)
            .map(|d| u16::from_be_bytes([d[0], d[1]]))
            .collect();
        while version_descriptors.last() == Some(&0) {
            version_descriptors.pop();
        }
        Ok(StandardInquiry {
            peripheral_qualifier: data[0] >> 5,
            device_type: data[0] & 0x1F,
            removable: data[1] & 0x80 != 0,
            version: data[2],
            normaca: data[3] & 0x20 != 0,
            hisup: data[3] & 0x10 != 0,
            response_data_format: data[3] & 0x0F,
            tpgs: (data[5] >> 4) & 0x03,
            protect: data[5] & 0x01 != 0,
            cmdque: data[7] & 0x02 != 0,
            vendor: text(8, 16),
            product: text(16, 32),
            revision: text(32, 36),
            version_descriptors,
        })
    }

    /// Emits 36 bytes of standard INQUIRY data (ADDITIONAL LENGTH 31), or
    /// 96 (ADDITIONAL LENGTH 91, as LIO) when there are version
    /// descriptors (at most 8 are kept). Numeric fields are masked to their
    /// widths; text fields are space-padded or cut to their widths,
    /// non-ASCII bytes become `?`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = if self.version_descriptors.is_empty() {
            STANDARD_INQUIRY_LEN
        } else {
            STANDARD_INQUIRY_LONG_LEN
        };
        let mut b = vec![0u8; len];
        b[0] = ((self.peripheral_qualifier & 0x07) << 5) | (self.device_type & 0x1F);
        b[1] = flag(self.removable, 0x80);
        b[2] = self.version;
        b[3] =
            flag(self.normaca, 0x20) | flag(self.hisup, 0x10) | (self.response_data_format & 0x0F);
        b[4] = (len - 5) as u8;
        b[5] = ((self.tpgs & 0x03) << 4) | flag(self.protect, 0x01);
        b[7] = flag(self.cmdque, 0x02);
        put_ascii(&mut b[8..16], &self.vendor);
        put_ascii(&mut b[16..32], &self.product);
        put_ascii(&mut b[32..36], &self.revision);
        for (i, d) in self
            .version_descriptors
            .iter()
            .take(VERSION_DESCRIPTORS_MAX)
            .enumerate()
        {
            let at = VERSION_DESCRIPTORS_AT + 2 * i;
            b[at..at + 2].copy_from_slice(&d.to_be_bytes());
        }
        b
    }
}

/// A designator's DESIGNATOR TYPE (SPC-4 Table 459), as an open newtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DesignatorType(pub u8);

impl DesignatorType {
    /// Vendor specific.
    pub const VENDOR_SPECIFIC: DesignatorType = DesignatorType(0);
    /// T10 vendor ID based (vendor identification then vendor specific).
    pub const T10_VENDOR_ID: DesignatorType = DesignatorType(1);
    /// EUI-64 based.
    pub const EUI64: DesignatorType = DesignatorType(2);
    /// NAA (the world-wide name of a logical unit or port).
    pub const NAA: DesignatorType = DesignatorType(3);
    /// Relative target port identifier.
    pub const RELATIVE_TARGET_PORT: DesignatorType = DesignatorType(4);
    /// Target port group.
    pub const TARGET_PORT_GROUP: DesignatorType = DesignatorType(5);
    /// Logical unit group.
    pub const LU_GROUP: DesignatorType = DesignatorType(6);
    /// MD5 logical unit identifier.
    pub const MD5_LU: DesignatorType = DesignatorType(7);
    /// SCSI name string.
    pub const SCSI_NAME_STRING: DesignatorType = DesignatorType(8);
}

/// A designator's CODE SET, as an open newtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CodeSet(pub u8);

impl CodeSet {
    /// Binary values.
    pub const BINARY: CodeSet = CodeSet(1);
    /// Printable ASCII.
    pub const ASCII: CodeSet = CodeSet(2);
    /// UTF-8.
    pub const UTF8: CodeSet = CodeSet(3);
}

/// What a designator identifies (its ASSOCIATION), as an open newtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Association(pub u8);

impl Association {
    /// The addressed logical unit.
    pub const LOGICAL_UNIT: Association = Association(0);
    /// The target port that received the command.
    pub const TARGET_PORT: Association = Association(1);
    /// The target device containing the logical unit.
    pub const TARGET_DEVICE: Association = Association(2);
}

/// One designation descriptor of the Device Identification VPD page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Designator {
    /// PROTOCOL IDENTIFIER (4 bits), meaningful only when `piv` is set.
    pub protocol_id: u8,
    /// CODE SET (4 bits).
    pub code_set: CodeSet,
    /// PIV: the protocol identifier is valid.
    pub piv: bool,
    /// ASSOCIATION (2 bits).
    pub association: Association,
    /// DESIGNATOR TYPE (4 bits).
    pub kind: DesignatorType,
    /// The designator's bytes (at most 255 are emitted).
    pub value: Vec<u8>,
}

impl Designator {
    /// A binary NAA designator of the logical unit.
    pub fn naa(value: Vec<u8>) -> Designator {
        Designator {
            protocol_id: 0,
            code_set: CodeSet::BINARY,
            piv: false,
            association: Association::LOGICAL_UNIT,
            kind: DesignatorType::NAA,
            value,
        }
    }

    /// A printable identifier: `naa.<hex>`, `eui.<hex>` (lowercase),
    /// `t10.<ascii>`, a SCSI name string as is (it carries its own `iqn.`,
    /// `naa.` or `eui.` prefix), `rtp.<n>`, `tpg.<n>` or `lug.<n>` for port
    /// and group numbers, `md5.<hex>`, and `vs.<…>` / `type<N>.<…>` for
    /// vendor-specific and unknown types (text or hex by code set).
    /// Trailing NULs and spaces of text values are dropped.
    pub fn to_id_string(&self) -> String {
        let text = || ascii_trim_end(&self.value);
        let number = |prefix: &str| match self.value.get(2..4) {
            Some(&[hi, lo]) if self.value.len() == 4 => {
                format!("{prefix}.{}", u16::from_be_bytes([hi, lo]))
            }
            _ => format!("{prefix}.{}", hex(&self.value)),
        };
        let by_code_set = |prefix: &str| match self.code_set {
            CodeSet::ASCII | CodeSet::UTF8 => format!("{prefix}.{}", text()),
            _ => format!("{prefix}.{}", hex(&self.value)),
        };
        match self.kind {
            DesignatorType::NAA => format!("naa.{}", hex(&self.value)),
            DesignatorType::EUI64 => format!("eui.{}", hex(&self.value)),
            DesignatorType::T10_VENDOR_ID => format!("t10.{}", text()),
            DesignatorType::SCSI_NAME_STRING => text(),
            DesignatorType::RELATIVE_TARGET_PORT => number("rtp"),
            DesignatorType::TARGET_PORT_GROUP => number("tpg"),
            DesignatorType::LU_GROUP => number("lug"),
            DesignatorType::MD5_LU => format!("md5.{}", hex(&self.value)),
            DesignatorType::VENDOR_SPECIFIC => by_code_set("vs"),
            DesignatorType(other) => by_code_set(&format!("type{other}")),
        }
    }

    /// Decodes the designators of a Device Identification page body,
    /// stopping at the first one that runs past the end.
    fn parse_list(mut body: &[u8]) -> Vec<Designator> {
        let mut list = Vec::new();
        while let [b0, b1, _, len, rest @ ..] = body {
            let len = *len as usize;
            let Some(value) = rest.get(..len) else {
                break;
            };
            list.push(Designator {
                protocol_id: b0 >> 4,
                code_set: CodeSet(b0 & 0x0F),
                piv: b1 & 0x80 != 0,
                association: Association((b1 >> 4) & 0x03),
                kind: DesignatorType(b1 & 0x0F),
                value: value.to_vec(),
            });
            body = &rest[len..];
        }
        list
    }

    /// Appends this designator's descriptor (value cut to 255 bytes).
    fn emit(&self, out: &mut Vec<u8>) {
        let value = &self.value[..self.value.len().min(255)];
        out.push(((self.protocol_id & 0x0F) << 4) | (self.code_set.0 & 0x0F));
        out.push(flag(self.piv, 0x80) | ((self.association.0 & 0x03) << 4) | (self.kind.0 & 0x0F));
        out.push(0);
        out.push(value.len() as u8);
        out.extend_from_slice(value);
    }
}

/// The Block Limits VPD page (SBC-3 §6.5.3), in blocks of the logical unit.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BlockLimits {
    /// WSNZ: WRITE SAME with a zero NUMBER OF LOGICAL BLOCKS is refused.
    pub wsnz: bool,
    /// MAXIMUM COMPARE AND WRITE LENGTH (0: not supported).
    pub max_compare_and_write: u8,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY.
    pub optimal_transfer_granularity: u16,
    /// MAXIMUM TRANSFER LENGTH (0: no limit reported).
    pub max_transfer_length: u32,
    /// OPTIMAL TRANSFER LENGTH (0: none reported).
    pub optimal_transfer_length: u32,
    /// MAXIMUM PREFETCH LENGTH.
    pub max_prefetch_length: u32,
    /// MAXIMUM UNMAP LBA COUNT (0: UNMAP not supported).
    pub max_unmap_lba_count: u32,
    /// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptor_count: u32,
    /// OPTIMAL UNMAP GRANULARITY.
    pub optimal_unmap_granularity: u32,
    /// UNMAP GRANULARITY ALIGNMENT (31 bits), present when UGAVALID is set.
    pub unmap_granularity_alignment: Option<u32>,
    /// MAXIMUM WRITE SAME LENGTH (0: no limit reported).
    pub max_write_same_length: u64,
}

/// PAGE LENGTH of an SBC-3 Block Limits page.
const BLOCK_LIMITS_PAGE_LEN: usize = 0x3C;

impl BlockLimits {
    /// Decodes a Block Limits page body (the bytes after the 4-byte header);
    /// fields beyond a short body read as zero / absent.
    fn parse(body: &[u8]) -> BlockLimits {
        let be = |at: usize, n: usize| -> Option<u64> {
            let bytes = body.get(at..at + n)?;
            Some(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        };
        // Each value is read at its own width, so the casts are exact.
        let be16 = |at| be(at, 2).unwrap_or(0) as u16;
        let be32 = |at| be(at, 4).unwrap_or(0) as u32;
        BlockLimits {
            wsnz: body.first().is_some_and(|b| b & 0x01 != 0),
            max_compare_and_write: body.get(1).copied().unwrap_or(0),
            optimal_transfer_granularity: be16(2),
            max_transfer_length: be32(4),
            optimal_transfer_length: be32(8),
            max_prefetch_length: be32(12),
            max_unmap_lba_count: be32(16),
            max_unmap_descriptor_count: be32(20),
            optimal_unmap_granularity: be32(24),
            unmap_granularity_alignment: be(28, 4)
                .map(|v| v as u32)
                .filter(|v| v & 0x8000_0000 != 0)
                .map(|v| v & 0x7FFF_FFFF),
            max_write_same_length: be(32, 8).unwrap_or(0),
        }
    }

    /// Emits the 60-byte page body. The alignment is cut to 31 bits.
    fn emit(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK_LIMITS_PAGE_LEN);
        b.push(flag(self.wsnz, 0x01));
        b.push(self.max_compare_and_write);
        b.extend_from_slice(&self.optimal_transfer_granularity.to_be_bytes());
        for v in [
            self.max_transfer_length,
            self.optimal_transfer_length,
            self.max_prefetch_length,
            self.max_unmap_lba_count,
            self.max_unmap_descriptor_count,
            self.optimal_unmap_granularity,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let uga = self
            .unmap_granularity_alignment
            .map_or(0, |v| 0x8000_0000 | (v & 0x7FFF_FFFF));
        b.extend_from_slice(&uga.to_be_bytes());
        b.extend_from_slice(&self.max_write_same_length.to_be_bytes());
        b.resize(BLOCK_LIMITS_PAGE_LEN, 0);
        b
    }
}

/// A decoded VPD page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VpdPage {
    /// 0x00: the page codes the device supports, in ascending order.
    SupportedPages(Vec<u8>),
    /// 0x80: the PRODUCT SERIAL NUMBER, surrounding spaces and NULs trimmed.
    UnitSerialNumber(String),
    /// 0x83: the designation descriptors.
    DeviceIdentification(Vec<Designator>),
    /// 0xB0: block limits.
    BlockLimits(BlockLimits),
    /// Any other page, undecoded. (Emitting one with a page code listed
    /// above and parsing it back yields the decoded variant.)
    Other {
        /// The PAGE CODE.
        page_code: u8,
        /// The bytes after the 4-byte header.
        data: Vec<u8>,
    },
}

impl VpdPage {
    /// Page code of Supported VPD Pages.
    pub const SUPPORTED_PAGES: u8 = 0x00;
    /// Page code of Unit Serial Number.
    pub const UNIT_SERIAL_NUMBER: u8 = 0x80;
    /// Page code of Device Identification.
    pub const DEVICE_IDENTIFICATION: u8 = 0x83;
    /// Page code of Block Limits.
    pub const BLOCK_LIMITS: u8 = 0xB0;

    /// The page's PAGE CODE.
    pub fn page_code(&self) -> u8 {
        match self {
            VpdPage::SupportedPages(_) => Self::SUPPORTED_PAGES,
            VpdPage::UnitSerialNumber(_) => Self::UNIT_SERIAL_NUMBER,
            VpdPage::DeviceIdentification(_) => Self::DEVICE_IDENTIFICATION,
            VpdPage::BlockLimits(_) => Self::BLOCK_LIMITS,
            VpdPage::Other { page_code, .. } => *page_code,
        }
    }

    /// Decodes a VPD page (header included). Never panics; the PAGE LENGTH
    /// is clipped to the bytes present.
    pub fn parse(data: &[u8]) -> Result<VpdPage, InquiryError> {
        let [_, page_code, hi, lo, rest @ ..] = data else {
            return Err(InquiryError::Truncated {
                what: "VPD page header",
                got: data.len(),
                need: 4,
            });
        };
        let claimed = u16::from_be_bytes([*hi, *lo]) as usize;
        let body = &rest[..claimed.min(rest.len())];
        Ok(match *page_code {
            Self::SUPPORTED_PAGES => VpdPage::SupportedPages(body.to_vec()),
            Self::UNIT_SERIAL_NUMBER => VpdPage::UnitSerialNumber(ascii_trim(body)),
            Self::DEVICE_IDENTIFICATION => {
                VpdPage::DeviceIdentification(Designator::parse_list(body))
            }
            Self::BLOCK_LIMITS => VpdPage::BlockLimits(BlockLimits::parse(body)),
            page_code => VpdPage::Other {
                page_code,
                data: body.to_vec(),
            },
        })
    }

    /// Emits the page with its header. `device_type` is written as byte 0
    /// (peripheral qualifier in bits 7–5, device type in bits 4–0; 0 for a
    /// connected direct-access logical unit). A body longer than 65535
    /// bytes is cut to fit the PAGE LENGTH field; the serial number's
    /// non-ASCII bytes become `?`.
    pub fn to_bytes(&self, device_type: u8) -> Vec<u8> {
        let mut b = vec![device_type, self.page_code(), 0, 0];
        match self {
            VpdPage::SupportedPages(pages) => b.extend_from_slice(pages),
            VpdPage::UnitSerialNumber(serial) => {
                b.extend(serial.bytes().map(|c| if c.is_ascii() { c } else { b'?' }))
            }
            VpdPage::DeviceIdentification(list) => {
                for d in list {
                    d.emit(&mut b);
                }
            }
            VpdPage::BlockLimits(limits) => b.extend_from_slice(&limits.emit()),
            VpdPage::Other { data, .. } => b.extend_from_slice(data),
        }
        b.truncate(4 + usize::from(u16::MAX));
        let len = (b.len() - 4) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        b
    }
}

/// Why [`inquiry`], [`vpd`] or [`identify`] failed.
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum IdentifyError {
    /// The command failed (transport error or non-GOOD status).
    #[error("{what} failed: {source}")]
    Command {
        /// Which command.
        what: &'static str,
        /// The failure; check conditions carry the decoded sense.
        #[source]
        source: CommandError,
    },
    /// The command succeeded but its data could not be decoded.
    #[error("cannot decode {what}: {source}")]
    Parse {
        /// Which data.
        what: &'static str,
        /// Why.
        #[source]
        source: InquiryError,
    },
}

impl IdentifyError {
    /// The sense data, when the device answered CHECK CONDITION.
    pub fn sense(&self) -> Option<&crate::Sense> {
        match self {
            IdentifyError::Command { source, .. } => source.sense(),
            IdentifyError::Parse { .. } => None,
        }
    }
}

/// Allocation length of the first VPD request: enough for every page STP
/// reads on a typical device, and the value sg3_utils starts with.
const VPD_FIRST_ALLOC: u16 = 252;

/// Runs INQUIRY and returns the raw data the device transferred.
fn run_inquiry(
    t: &mut dyn Transport,
    evpd: bool,
    page_code: u8,
    alloc_len: u16,
    what: &'static str,
) -> Result<Vec<u8>, IdentifyError> {
    let cdb = Cdb::Inquiry {
        evpd,
        page_code,
        alloc_len,
    }
    .emit();
    let completion = t.execute(Command::data_in(cdb, usize::from(alloc_len)));
    let (data, _) = completion
        .into_result()
        .map_err(|source| IdentifyError::Command { what, source })?;
    Ok(data.to_vec())
}

/// Sends a standard INQUIRY (36 bytes, the length every device supports)
/// and decodes the answer.
pub fn inquiry(t: &mut dyn Transport) -> Result<StandardInquiry, IdentifyError> {
    const WHAT: &str = "standard INQUIRY";
    let data = run_inquiry(t, false, 0, STANDARD_INQUIRY_LEN as u16, WHAT)?;
    StandardInquiry::parse(&data).map_err(|source| IdentifyError::Parse { what: WHAT, source })
}

/// A description of the VPD request for error messages.
fn vpd_what(page: u8) -> &'static str {
    match page {
        VpdPage::SUPPORTED_PAGES => "INQUIRY VPD page 0x00 (supported pages)",
        VpdPage::UNIT_SERIAL_NUMBER => "INQUIRY VPD page 0x80 (unit serial number)",
        VpdPage::DEVICE_IDENTIFICATION => "INQUIRY VPD page 0x83 (device identification)",
        VpdPage::BLOCK_LIMITS => "INQUIRY VPD page 0xB0 (block limits)",
        _ => "INQUIRY VPD page",
    }
}

/// Reads VPD page `page`: asks for 252 bytes first and, when the PAGE
/// LENGTH says the page is longer, asks again for all of it (at most
/// 65535 bytes). Fails with [`InquiryError::WrongPage`] when the device
/// answers with another page.
pub fn vpd(t: &mut dyn Transport, page: u8) -> Result<VpdPage, IdentifyError> {
    let what = vpd_what(page);
    let mut data = run_inquiry(t, true, page, VPD_FIRST_ALLOC, what)?;
    if let Some(&[hi, lo]) = data.get(2..4) {
        let full = 4 + usize::from(u16::from_be_bytes([hi, lo]));
        if full > usize::from(VPD_FIRST_ALLOC) {
            let alloc = u16::try_from(full).unwrap_or(u16::MAX);
            data = run_inquiry(t, true, page, alloc, what)?;
        }
    }
    let parsed = VpdPage::parse(&data).map_err(|source| IdentifyError::Parse { what, source })?;
    if parsed.page_code() != page {
        return Err(IdentifyError::Parse {
            what,
            source: InquiryError::WrongPage {
                expected: page,
                got: parsed.page_code(),
            },
        });
    }
    Ok(parsed)
}

/// What [`identify`] learned about a logical unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The standard INQUIRY data.
    pub inquiry: StandardInquiry,
    /// The unit serial number, if the device lists VPD page 0x80.
    pub serial: Option<String>,
    /// The designators of VPD page 0x83 (empty if the page is not listed).
    pub designators: Vec<Designator>,
    /// The VPD pages the device lists on page 0x00.
    pub vpd_pages: Vec<u8>,
}

impl Identity {
    /// The logical unit's NAA designator (association: logical unit).
    pub fn naa(&self) -> Option<&Designator> {
        self.lu_designator(DesignatorType::NAA)
    }

    /// The first designator of `kind` associated with the logical unit.
    fn lu_designator(&self, kind: DesignatorType) -> Option<&Designator> {
        self.designators
            .iter()
            .find(|d| d.kind == kind && d.association == Association::LOGICAL_UNIT)
    }

    /// The identifier that names this logical unit on every host and path:
    /// its NAA, else EUI-64, else SCSI name string, else T10 vendor ID
    /// designator, as [`Designator::to_id_string`]. Only designators
    /// associated with the logical unit count (a port's name is shared by
    /// every LUN behind it).
    pub fn preferred_id(&self) -> Option<String> {
        [
            DesignatorType::NAA,
            DesignatorType::EUI64,
            DesignatorType::SCSI_NAME_STRING,
            DesignatorType::T10_VENDOR_ID,
        ]
        .into_iter()
        .find_map(|kind| self.lu_designator(kind))
        .map(Designator::to_id_string)
    }
}

/// Identifies the logical unit behind `t`: standard INQUIRY, VPD page 0x00,
/// then pages 0x80 and 0x83 if the device lists them.
pub fn identify(t: &mut dyn Transport) -> Result<Identity, IdentifyError> {
    let inquiry = inquiry(t)?;
    let vpd_pages = match vpd(t, VpdPage::SUPPORTED_PAGES)? {
        VpdPage::SupportedPages(pages) => pages,
        // vpd() checked the page code, so this cannot be another variant.
        _ => return Err(unexpected_variant(VpdPage::SUPPORTED_PAGES)),
    };
    let mut identity = Identity {
        inquiry,
        serial: None,
        designators: Vec::new(),
        vpd_pages,
    };
    if identity.vpd_pages.contains(&VpdPage::UNIT_SERIAL_NUMBER) {
        match vpd(t, VpdPage::UNIT_SERIAL_NUMBER)? {
            VpdPage::UnitSerialNumber(s) => identity.serial = Some(s),
            _ => return Err(unexpected_variant(VpdPage::UNIT_SERIAL_NUMBER)),
        }
    }
    if identity.vpd_pages.contains(&VpdPage::DEVICE_IDENTIFICATION) {
        match vpd(t, VpdPage::DEVICE_IDENTIFICATION)? {
            VpdPage::DeviceIdentification(list) => identity.designators = list,
            _ => return Err(unexpected_variant(VpdPage::DEVICE_IDENTIFICATION)),
        }
    }
    Ok(identity)
}

fn unexpected_variant(page: u8) -> IdentifyError {
    IdentifyError::Parse {
        what: vpd_what(page),
        source: InquiryError::Malformed("page decoded to an unexpected variant"),
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn is_pad(b: &u8) -> bool {
    *b == b' ' || *b == 0
}

/// Text with trailing spaces and NULs dropped; every byte that is not
/// printable ASCII (a control character, an escape sequence, anything
/// above 0x7E) becomes `?`, one per byte, so a device's text is safe to
/// print and emits back to the same bytes.
fn ascii_trim_end(bytes: &[u8]) -> String {
    let end = bytes.iter().rposition(|b| !is_pad(b)).map_or(0, |i| i + 1);
    bytes[..end]
        .iter()
        .map(|&b| {
            if (0x20..0x7F).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect()
}

/// Text with leading and trailing spaces and NULs dropped, as
/// [`ascii_trim_end`].
fn ascii_trim(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| !is_pad(b)).unwrap_or(bytes.len());
    ascii_trim_end(&bytes[start..])
}

/// Fills `dst` with `s` left-aligned and space-padded; non-ASCII bytes become `?`.
fn put_ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes()) {
        *d = if c.is_ascii() { c } else { b'?' };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::{Asc, Sense, SenseKey};

    /// Text fields keep printable ASCII only: control characters (a
    /// terminal escape from a hostile device), inner NULs and bytes above
    /// 0x7E each read as `?`, and the result emits back to itself. (Found
    /// by fuzzing: lossy UTF-8 decoding turned the bytes into U+FFFD, which
    /// emitted as `?`, and kept control characters.)
    #[test]
    fn text_fields_are_printable_ascii() {
        let data = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0x80, 0x83, 0xb0,
        ];
        let std = StandardInquiry::parse(&data).unwrap();
        assert_eq!(std.vendor, "????????");
        assert_eq!(std.product, "?");
        assert_eq!(StandardInquiry::parse(&std.to_bytes()).unwrap(), std);
        let mut esc = StandardInquiry::parse(&data).unwrap().to_bytes();
        esc[8..16].copy_from_slice(b"\x1b[2JSTP1");
        assert_eq!(StandardInquiry::parse(&esc).unwrap().vendor, "?[2JSTP1");
    }
    use crate::transport::{Completion, Outcome, SubmitError};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, VecDeque};
    use std::io;
    use std::time::Duration;

    /// Standard INQUIRY data as LIO (Linux 5.x/6.x `spc_emulate_inquiry_std`)
    /// returns it for a fileio/block backstore named "stp-lun0" behind an
    /// iSCSI target with the default ALUA group: 96 bytes, ADDITIONAL LENGTH
    /// 91, SCCS and TPGS=3 (implicit+explicit) in byte 5, CMDQUE in byte 7,
    /// and version descriptors SAM-5, iSCSI, SPC-4, SBC-3 at bytes 58–65.
    /// LIO leaves HISUP clear (byte 3 = 0x02).
    fn lio_standard_inquiry() -> Vec<u8> {
        let mut b = vec![
            0x00, 0x00, 0x06, 0x02, 0x5B, 0xB0, 0x00, 0x02, // header
            b'L', b'I', b'O', b'-', b'O', b'R', b'G', b' ', // vendor
            b's', b't', b'p', b'-', b'l', b'u', b'n', b'0', // product
            b' ', b' ', b' ', b' ', b' ', b' ', b' ', b' ', //
            b'4', b'.', b'0', b' ', // revision
        ];
        b.resize(58, 0);
        b.extend_from_slice(&[0x00, 0xA0, 0x09, 0x60, 0x04, 0x60, 0x04, 0xC0]);
        b.resize(96, 0);
        b
    }

    fn lio_identity_inquiry() -> StandardInquiry {
        StandardInquiry {
            peripheral_qualifier: 0,
            device_type: 0,
            removable: false,
            version: 6,
            normaca: false,
            hisup: false,
            response_data_format: 2,
            tpgs: 3,
            protect: false,
            cmdque: true,
            vendor: "LIO-ORG".into(),
            product: "stp-lun0".into(),
            revision: "4.0".into(),
            version_descriptors: vec![
                version_descriptor::SAM5,
                version_descriptor::ISCSI,
                version_descriptor::SPC4,
                version_descriptor::SBC3,
            ],
        }
    }

    #[test]
    fn standard_inquiry_from_lio() {
        let bytes = lio_standard_inquiry();
        assert_eq!(bytes[4] as usize, bytes.len() - 5);
        let s = StandardInquiry::parse(&bytes).unwrap();
        assert_eq!(s, lio_identity_inquiry());

        // Emitting keeps the bytes except what the struct does not model
        // (SCCS): 96 of them, as LIO sends, with the version descriptors.
        let out = s.to_bytes();
        assert_eq!(out.len(), 96);
        assert_eq!(out[4], 91);
        assert_eq!(out[5], 0x30);
        assert_eq!(out[..5], bytes[..5]);
        assert_eq!(out[6..], bytes[6..]);
        assert_eq!(StandardInquiry::parse(&out).unwrap(), s);
        // Without version descriptors: the 36-byte form.
        let short = StandardInquiry {
            version_descriptors: Vec::new(),
            ..s.clone()
        };
        let out = short.to_bytes();
        assert_eq!((out.len(), out[4]), (36, 31));
        assert_eq!(StandardInquiry::parse(&out).unwrap(), short);
        // Cut short within the descriptors: the ones present; an empty slot
        // before a used one stays.
        let mut cut = bytes[..62].to_vec();
        cut[58..60].copy_from_slice(&[0, 0]);
        assert_eq!(
            StandardInquiry::parse(&cut).unwrap().version_descriptors,
            [0, version_descriptor::ISCSI]
        );
    }

    #[test]
    fn standard_inquiry_flags() {
        // HISUP + NORMACA + format 2, RMB, PROTECT, qualifier 1 type 5.
        let mut bytes = lio_standard_inquiry();
        bytes[0] = 0x25;
        bytes[1] = 0x80;
        bytes[3] = 0x32;
        bytes[5] = 0x11;
        bytes[7] = 0x00;
        let s = StandardInquiry::parse(&bytes).unwrap();
        assert_eq!((s.peripheral_qualifier, s.device_type), (1, 5));
        assert!(s.removable && s.hisup && s.normaca && s.protect && !s.cmdque);
        assert_eq!((s.response_data_format, s.tpgs), (2, 1));
        assert_eq!(
            s.to_bytes()[..8],
            [0x25, 0x80, 0x06, 0x32, 0x5B, 0x11, 0, 0]
        );
    }

    #[test]
    fn standard_inquiry_short_and_padded() {
        let bytes = lio_standard_inquiry();
        assert_eq!(
            StandardInquiry::parse(&bytes[..7]),
            Err(InquiryError::Truncated {
                what: "standard INQUIRY data",
                got: 7,
                need: 8
            })
        );
        // Cut inside the product field: shortened text, no panic.
        let s = StandardInquiry::parse(&bytes[..20]).unwrap();
        assert_eq!((s.vendor.as_str(), s.product.as_str()), ("LIO-ORG", "stp-"));
        assert_eq!(s.revision, "");
        // NUL padding (as some emulators use) is trimmed like spaces.
        let mut nul = bytes.clone();
        nul[35] = 0;
        nul[34] = 0;
        assert_eq!(StandardInquiry::parse(&nul).unwrap().revision, "4.");
        // An ADDITIONAL LENGTH claiming far more than present is harmless.
        let mut long = bytes[..36].to_vec();
        long[4] = 0xFF;
        assert_eq!(
            StandardInquiry::parse(&long).unwrap(),
            StandardInquiry {
                version_descriptors: Vec::new(),
                ..lio_identity_inquiry()
            }
        );
        // Over-long and non-ASCII text is cut and replaced on emit.
        let mut s = lio_identity_inquiry();
        s.vendor = "ÄBCDEFGHIJ".into();
        assert_eq!(&s.to_bytes()[8..16], b"??BCDEFG");
    }

    /// LIO's unit serial number (a UUID) for the test LUN.
    const SERIAL: &str = "3b0e5e8a-6b2b-4f8c-9d12-3456789abcde";

    /// VPD page 0x83 as LIO builds it (`spc_emulate_evpd_83`) for an iSCSI
    /// LUN with unit serial [`SERIAL`]: NAA 6 registered extended (company
    /// 0x001405, then the serial's hex digits), T10 vendor ID
    /// "LIO-ORG stp-lun0:<serial>" with a NUL, relative target port 1 and
    /// target port group 0 (iSCSI protocol 5, PIV, target port), and the
    /// target port's SCSI name string, NUL-padded to a multiple of 4.
    fn lio_vpd_83() -> Vec<u8> {
        let mut p = vec![0x00, 0x83, 0x00, 0x92];
        p.extend_from_slice(&[
            0x01, 0x03, 0x00, 0x10, // NAA, binary, LU
            0x60, 0x01, 0x40, 0x53, 0xB0, 0xE5, 0xE8, 0xA6, //
            0xB2, 0xB4, 0xF8, 0xC9, 0xD1, 0x23, 0x45, 0x67,
        ]);
        p.extend_from_slice(&[0x02, 0x01, 0x00, 0x36]); // T10, ASCII, LU, 54
        p.extend_from_slice(b"LIO-ORG stp-lun0:3b0e5e8a-6b2b-4f8c-9d12-3456789abcde\0");
        p.extend_from_slice(&[0x51, 0x94, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01]);
        p.extend_from_slice(&[0x51, 0x95, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00]);
        p.extend_from_slice(&[0x53, 0x98, 0x00, 0x30]); // SCSI name, UTF-8, 48
        p.extend_from_slice(b"iqn.2003-01.org.linux-iscsi.stp:array0,t,0x0001\0");
        p
    }

    #[test]
    fn vpd_83_from_lio() {
        let bytes = lio_vpd_83();
        assert_eq!(bytes.len() - 4, 0x92);
        let VpdPage::DeviceIdentification(list) = VpdPage::parse(&bytes).unwrap() else {
            panic!("not a device identification page");
        };
        let ids: Vec<String> = list.iter().map(Designator::to_id_string).collect();
        assert_eq!(
            ids,
            [
                "naa.60014053b0e5e8a6b2b4f8c9d1234567",
                "t10.LIO-ORG stp-lun0:3b0e5e8a-6b2b-4f8c-9d12-3456789abcde",
                "rtp.1",
                "tpg.0",
                "iqn.2003-01.org.linux-iscsi.stp:array0,t,0x0001",
            ]
        );
        assert_eq!(list[0], Designator::naa(bytes[8..24].to_vec()));
        assert_eq!(list[2].kind, DesignatorType::RELATIVE_TARGET_PORT);
        assert_eq!(list[2].association, Association::TARGET_PORT);
        assert!(list[2].piv);
        assert_eq!(list[2].protocol_id, 5);
        assert_eq!(list[4].code_set, CodeSet::UTF8);
        // Byte-exact re-emission.
        let page = VpdPage::DeviceIdentification(list);
        assert_eq!(page.to_bytes(0), bytes);
    }

    #[test]
    fn vpd_83_clipping() {
        let bytes = lio_vpd_83();
        // Allocation length cut inside the T10 designator: the NAA survives,
        // the partial designator and everything after it are dropped.
        let VpdPage::DeviceIdentification(list) = VpdPage::parse(&bytes[..40]).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].kind, DesignatorType::NAA);
        // A designator length running past the page length drops the rest.
        let mut bad = bytes.clone();
        bad[27] = 0xFF;
        let VpdPage::DeviceIdentification(list) = VpdPage::parse(&bad).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(list.len(), 1);
        // A page length shorter than the data hides the tail.
        let mut short = bytes.clone();
        short[3] = 20;
        assert_eq!(
            VpdPage::parse(&short).unwrap(),
            VpdPage::DeviceIdentification(vec![Designator::naa(bytes[8..24].to_vec())])
        );
    }

    #[test]
    fn other_id_strings() {
        let mut d = Designator::naa(vec![0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]);
        d.kind = DesignatorType::EUI64;
        assert_eq!(d.to_id_string(), "eui.0123456789abcdef");
        d.kind = DesignatorType::MD5_LU;
        assert_eq!(d.to_id_string(), "md5.0123456789abcdef");
        d.kind = DesignatorType::VENDOR_SPECIFIC;
        assert_eq!(d.to_id_string(), "vs.0123456789abcdef");
        d.kind = DesignatorType(0xA);
        d.code_set = CodeSet::ASCII;
        d.value = b"abc  ".to_vec();
        assert_eq!(d.to_id_string(), "type10.abc");
        d.kind = DesignatorType::LU_GROUP;
        d.value = vec![0, 0, 0x01, 0x02];
        assert_eq!(d.to_id_string(), "lug.258");
        d.value = vec![7];
        assert_eq!(d.to_id_string(), "lug.07");
    }

    #[test]
    fn vpd_80_from_lio() {
        // LIO counts the terminating NUL in the page length.
        let mut bytes = vec![0x00, 0x80, 0x00, 0x25];
        bytes.extend_from_slice(SERIAL.as_bytes());
        bytes.push(0);
        assert_eq!(
            VpdPage::parse(&bytes).unwrap(),
            VpdPage::UnitSerialNumber(SERIAL.into())
        );
        // Right-aligned, space-padded serials are trimmed too.
        let padded = [
            0x00, 0x80, 0x00, 0x08, b' ', b' ', b' ', b'A', b'B', b'C', b'1', b' ',
        ];
        let page = VpdPage::parse(&padded).unwrap();
        assert_eq!(page, VpdPage::UnitSerialNumber("ABC1".into()));
        assert_eq!(
            page.to_bytes(0),
            [0x00, 0x80, 0x00, 0x04, b'A', b'B', b'C', b'1']
        );
    }

    #[test]
    fn vpd_00_and_other() {
        let bytes = [0x00, 0x00, 0x00, 0x05, 0x00, 0x80, 0x83, 0x86, 0xB0];
        let page = VpdPage::parse(&bytes).unwrap();
        assert_eq!(
            page,
            VpdPage::SupportedPages(vec![0x00, 0x80, 0x83, 0x86, 0xB0])
        );
        assert_eq!(page.page_code(), 0x00);
        assert_eq!(page.to_bytes(0), bytes);
        let other = [0x00, 0xB1, 0x00, 0x02, 0x00, 0x01];
        let page = VpdPage::parse(&other).unwrap();
        assert_eq!(
            page,
            VpdPage::Other {
                page_code: 0xB1,
                data: vec![0, 1]
            }
        );
        assert_eq!(page.to_bytes(0), other);
        // Device type byte is emitted as given.
        assert_eq!(page.to_bytes(0x7F)[0], 0x7F);
    }

    /// Block Limits as LIO emits it for a thin-provisioned 512-byte-block
    /// LUN: WSNZ, CAW 1, granularity 1, max transfer 8192, optimal 16384,
    /// unmap 8192 LBAs / 1 descriptor, granularity 1, no alignment
    /// (UGAVALID clear), max WRITE SAME 4096.
    fn lio_vpd_b0() -> Vec<u8> {
        let mut b = vec![
            0x00, 0xB0, 0x00, 0x3C, // header
            0x01, 0x01, 0x00, 0x01, // WSNZ, CAW, granularity
            0x00, 0x00, 0x20, 0x00, // max transfer
            0x00, 0x00, 0x40, 0x00, // optimal transfer
            0x00, 0x00, 0x00, 0x00, // max prefetch
            0x00, 0x00, 0x20, 0x00, // max unmap LBA count
            0x00, 0x00, 0x00, 0x01, // max unmap descriptors
            0x00, 0x00, 0x00, 0x01, // optimal unmap granularity
            0x00, 0x00, 0x00, 0x00, // UGAVALID / alignment
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // max write same
        ];
        b.resize(64, 0);
        b
    }

    #[test]
    fn vpd_b0_from_lio() {
        let bytes = lio_vpd_b0();
        let expected = BlockLimits {
            wsnz: true,
            max_compare_and_write: 1,
            optimal_transfer_granularity: 1,
            max_transfer_length: 8192,
            optimal_transfer_length: 16384,
            max_prefetch_length: 0,
            max_unmap_lba_count: 8192,
            max_unmap_descriptor_count: 1,
            optimal_unmap_granularity: 1,
            unmap_granularity_alignment: None,
            max_write_same_length: 4096,
        };
        let page = VpdPage::parse(&bytes).unwrap();
        assert_eq!(page, VpdPage::BlockLimits(expected.clone()));
        assert_eq!(page.to_bytes(0), bytes);

        let mut aligned = bytes.clone();
        aligned[32..36].copy_from_slice(&[0x80, 0, 0, 8]);
        let VpdPage::BlockLimits(l) = VpdPage::parse(&aligned).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(l.unmap_granularity_alignment, Some(8));

        // Without thin provisioning LIO sends a 0x10-byte page: the unmap
        // and WRITE SAME fields are absent and read as zero.
        let mut short = bytes[..20].to_vec();
        short[3] = 0x10;
        let VpdPage::BlockLimits(l) = VpdPage::parse(&short).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(l.optimal_transfer_length, 16384);
        assert_eq!((l.max_unmap_lba_count, l.max_write_same_length), (0, 0));
        // A field cut in half reads as zero, not as a partial value.
        let VpdPage::BlockLimits(l) = VpdPage::parse(&bytes[..10]).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(
            (l.optimal_transfer_granularity, l.max_transfer_length),
            (1, 0)
        );
    }

    #[test]
    fn vpd_header_truncated() {
        assert_eq!(
            VpdPage::parse(&[0x00, 0x83, 0x00]),
            Err(InquiryError::Truncated {
                what: "VPD page header",
                got: 3,
                need: 4
            })
        );
        // Page length 0xFFFF with nothing behind it: an empty page.
        assert_eq!(
            VpdPage::parse(&[0x00, 0x83, 0xFF, 0xFF]),
            Ok(VpdPage::DeviceIdentification(vec![]))
        );
    }

    #[test]
    fn oversized_pages_are_cut_on_emit() {
        let page = VpdPage::Other {
            page_code: 0xC0,
            data: vec![0xAA; 70_000],
        };
        let bytes = page.to_bytes(0);
        assert_eq!(bytes.len(), 4 + 0xFFFF);
        assert_eq!(bytes[2..4], [0xFF, 0xFF]);
        let mut d = Designator::naa(vec![1; 300]);
        d.kind = DesignatorType::VENDOR_SPECIFIC;
        let bytes = VpdPage::DeviceIdentification(vec![d]).to_bytes(0);
        assert_eq!(bytes[7], 255);
        assert_eq!(bytes.len(), 4 + 4 + 255);
    }

    // ---- proptest -------------------------------------------------------

    /// Printable ASCII of at most `max` bytes without trailing spaces.
    fn ascii_field(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!("[ -~]{{0,{max}}}"))
            .expect("valid regex")
            .prop_map(|s| s.trim_end().to_string())
    }

    fn any_standard_inquiry() -> impl Strategy<Value = StandardInquiry> {
        (
            (0u8..8, 0u8..32, any::<bool>(), any::<u8>()),
            (any::<bool>(), any::<bool>(), 0u8..16, 0u8..4),
            (any::<bool>(), any::<bool>()),
            (ascii_field(8), ascii_field(16), ascii_field(4)),
            proptest::collection::vec(any::<u16>(), 0..=8).prop_map(|mut v| {
                while v.last() == Some(&0) {
                    v.pop();
                }
                v
            }),
        )
            .prop_map(
                |(
                    (peripheral_qualifier, device_type, removable, version),
                    (normaca, hisup, response_data_format, tpgs),
                    (protect, cmdque),
                    (vendor, product, revision),
                    version_descriptors,
                )| StandardInquiry {
                    peripheral_qualifier,
                    device_type,
                    removable,
                    version,
                    normaca,
                    hisup,
                    response_data_format,
                    tpgs,
                    protect,
                    cmdque,
                    vendor,
                    product,
                    revision,
                    version_descriptors,
                },
            )
    }

    fn any_designator() -> impl Strategy<Value = Designator> {
        (
            0u8..16,
            0u8..16,
            any::<bool>(),
            0u8..4,
            0u8..16,
            proptest::collection::vec(any::<u8>(), 0..=255),
        )
            .prop_map(|(protocol_id, code_set, piv, association, kind, value)| {
                Designator {
                    protocol_id,
                    code_set: CodeSet(code_set),
                    piv,
                    association: Association(association),
                    kind: DesignatorType(kind),
                    value,
                }
            })
    }

    fn any_block_limits() -> impl Strategy<Value = BlockLimits> {
        (
            (any::<bool>(), any::<u8>(), any::<u16>()),
            any::<[u32; 6]>(),
            proptest::option::of(0u32..0x8000_0000),
            any::<u64>(),
        )
            .prop_map(|((wsnz, caw, gran), v, uga, ws)| BlockLimits {
                wsnz,
                max_compare_and_write: caw,
                optimal_transfer_granularity: gran,
                max_transfer_length: v[0],
                optimal_transfer_length: v[1],
                max_prefetch_length: v[2],
                max_unmap_lba_count: v[3],
                max_unmap_descriptor_count: v[4],
                optimal_unmap_granularity: v[5],
                unmap_granularity_alignment: uga,
                max_write_same_length: ws,
            })
    }

    fn any_vpd_page() -> impl Strategy<Value = VpdPage> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(VpdPage::SupportedPages),
            proptest::string::string_regex("[ -~]{0,40}")
                .expect("valid regex")
                .prop_map(|s| VpdPage::UnitSerialNumber(s.trim().to_string())),
            proptest::collection::vec(any_designator(), 0..6)
                .prop_map(VpdPage::DeviceIdentification),
            any_block_limits().prop_map(VpdPage::BlockLimits),
            (
                any::<u8>().prop_filter("decoded page codes", |c| {
                    ![0x00, 0x80, 0x83, 0xB0].contains(c)
                }),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(page_code, data)| VpdPage::Other { page_code, data }),
        ]
    }

    /// A VPD header for one of the decoded pages followed by random bytes.
    fn vpd_like_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::sample::select(vec![0x00u8, 0x80, 0x83, 0xB0]),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..400),
        )
            .prop_map(|(code, len, tail)| {
                let mut b = vec![0, code];
                b.extend_from_slice(&len.to_be_bytes());
                b.extend(tail);
                b
            })
    }

    proptest! {
        #[test]
        fn standard_inquiry_parse_of_emit_is_identity(s in any_standard_inquiry()) {
            prop_assert_eq!(StandardInquiry::parse(&s.to_bytes()).unwrap(), s);
        }

        #[test]
        fn vpd_parse_of_emit_is_identity(page in any_vpd_page(), dt in any::<u8>()) {
            let bytes = page.to_bytes(dt);
            prop_assert_eq!(bytes[0], dt);
            prop_assert_eq!(VpdPage::parse(&bytes).unwrap(), page);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = StandardInquiry::parse(&bytes);
            if let Ok(VpdPage::DeviceIdentification(list)) = VpdPage::parse(&bytes) {
                for d in list {
                    let _ = d.to_id_string();
                }
            }
        }

        #[test]
        fn vpd_like_bytes_never_panic(bytes in vpd_like_bytes()) {
            match VpdPage::parse(&bytes) {
                Ok(VpdPage::DeviceIdentification(list)) => {
                    let _: Vec<String> = list.iter().map(Designator::to_id_string).collect();
                }
                Ok(page) => prop_assert_eq!(page.page_code(), bytes[1]),
                Err(e) => prop_assert!(false, "a 4-byte header must parse: {e}"),
            }
        }

        #[test]
        fn truncated_emissions_parse(page in any_vpd_page(), cut in any::<prop::sample::Index>()) {
            // A short allocation length cuts any page anywhere.
            let bytes = page.to_bytes(0);
            let cut = cut.index(bytes.len() + 1);
            match VpdPage::parse(&bytes[..cut]) {
                Ok(p) => prop_assert_eq!(p.page_code(), page.page_code()),
                Err(InquiryError::Truncated { got, .. }) => prop_assert!(got < 4),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    // ---- identify() over a fake transport --------------------------------

    /// A logical unit answering INQUIRY from canned data, completing each
    /// command at once through a queue, and logging the CDBs it saw as
    /// (evpd, page code, allocation length).
    struct FakeLu {
        standard: Vec<u8>,
        pages: BTreeMap<u8, Vec<u8>>,
        /// Answer every command with CHECK CONDITION and this sense.
        fail: Option<Sense>,
        /// Answer a VPD request with this page instead of the one asked for.
        swap: Option<(u8, u8)>,
        log: Vec<(bool, u8, u16)>,
        done: VecDeque<Completion>,
    }

    impl FakeLu {
        fn new(pages: &[&[u8]]) -> FakeLu {
            FakeLu {
                standard: lio_standard_inquiry(),
                pages: pages.iter().map(|p| (p[1], p.to_vec())).collect(),
                fail: None,
                swap: None,
                log: Vec::new(),
                done: VecDeque::new(),
            }
        }

        fn answer(&mut self, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
            if let Some(sense) = &self.fail {
                return Err(sense.clone());
            }
            let invalid = Sense::invalid_field_in_cdb(2, None);
            let (evpd, page) = (cdb[1] & 1 != 0, cdb[2]);
            self.log
                .push((evpd, page, u16::from_be_bytes([cdb[3], cdb[4]])));
            match (evpd, page) {
                (false, 0) => Ok(self.standard.clone()),
                (false, _) => Err(invalid),
                (true, _) => {
                    let page = match self.swap {
                        Some((from, to)) if from == page => to,
                        _ => page,
                    };
                    self.pages.get(&page).cloned().ok_or(invalid)
                }
            }
        }
    }

    impl Transport for FakeLu {
        fn submit(&mut self, mut cmd: Command) -> Result<(), SubmitError> {
            assert_eq!(cmd.cdb.opcode(), crate::Opcode::INQUIRY);
            let cdb = cmd.cdb.as_slice().to_vec();
            let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
            assert_eq!(alloc, cmd.data.len(), "buffer must match allocation length");
            let result = match self.answer(&cdb) {
                Ok(data) => {
                    let n = data.len().min(alloc);
                    cmd.data[..n].copy_from_slice(&data[..n]);
                    Ok(Outcome::good((alloc - n) as u32))
                }
                Err(sense) => Ok(Outcome::check_condition(&sense)),
            };
            self.done.push_back(Completion {
                tag: cmd.tag,
                data: cmd.data,
                result,
            });
            Ok(())
        }

        fn reap(&mut self, out: &mut Vec<Completion>, _: Option<Duration>) -> io::Result<usize> {
            let n = self.done.len();
            out.extend(self.done.drain(..));
            Ok(n)
        }

        fn in_flight(&self) -> usize {
            self.done.len()
        }

        fn queue_depth(&self) -> usize {
            1
        }

        fn describe(&self) -> String {
            "fake LU".into()
        }
    }

    fn serial_page() -> Vec<u8> {
        let mut p = vec![0x00, 0x80, 0x00, 0x25];
        p.extend_from_slice(SERIAL.as_bytes());
        p.push(0);
        p
    }

    const SUPPORTED_LIO: &[u8] = &[0x00, 0x00, 0x00, 0x05, 0x00, 0x80, 0x83, 0x86, 0xB0];

    #[test]
    fn identify_lio_lun() {
        let mut lu = FakeLu::new(&[SUPPORTED_LIO, &serial_page(), &lio_vpd_83(), &lio_vpd_b0()]);
        let id = identify(&mut lu).unwrap();
        // identify asks for the first 36 bytes: no version descriptors.
        assert_eq!(
            id.inquiry,
            StandardInquiry {
                version_descriptors: Vec::new(),
                ..lio_identity_inquiry()
            }
        );
        assert_eq!(id.vpd_pages, [0x00, 0x80, 0x83, 0x86, 0xB0]);
        assert_eq!(id.serial.as_deref(), Some(SERIAL));
        assert_eq!(id.designators.len(), 5);
        assert_eq!(id.naa(), Some(&id.designators[0]));
        assert_eq!(
            id.preferred_id().as_deref(),
            Some("naa.60014053b0e5e8a6b2b4f8c9d1234567")
        );
        // Standard INQUIRY with 36 bytes, then each VPD page once with 252.
        assert_eq!(
            lu.log,
            [
                (false, 0, 36),
                (true, 0x00, 252),
                (true, 0x80, 252),
                (true, 0x83, 252)
            ]
        );
        // Block limits on its own.
        lu.log.clear();
        let VpdPage::BlockLimits(l) = vpd(&mut lu, 0xB0).unwrap() else {
            panic!("wrong variant");
        };
        assert_eq!(l.max_transfer_length, 8192);
        assert_eq!(lu.log, [(true, 0xB0, 252)]);
    }

    #[test]
    fn identify_reissues_long_pages() {
        // 0x83 with a long SCSI name string pushes the page past 252 bytes.
        let mut page = lio_vpd_83();
        let mut name = b"iqn.2003-01.org.linux-iscsi.stp:".to_vec();
        name.resize(200, b'x');
        page.extend_from_slice(&[0x53, 0xA8, 0x00, 200]);
        page.extend_from_slice(&name);
        let len = (page.len() - 4) as u16;
        page[2..4].copy_from_slice(&len.to_be_bytes());
        assert!(page.len() > 252);

        let mut lu = FakeLu::new(&[SUPPORTED_LIO, &serial_page(), &page]);
        let id = identify(&mut lu).unwrap();
        assert_eq!(id.designators.len(), 6);
        assert_eq!(id.designators[5].association, Association::TARGET_DEVICE);
        assert_eq!(
            id.designators[5].to_id_string(),
            String::from_utf8(name).unwrap()
        );
        assert_eq!(
            lu.log[3..],
            [(true, 0x83, 252), (true, 0x83, page.len() as u16)]
        );

        // A claimed length beyond 65535 bytes is capped.
        let huge = [0x00, 0xC7, 0xFF, 0xFF, 1, 2, 3];
        let mut lu = FakeLu::new(&[&huge]);
        let page = vpd(&mut lu, 0xC7).unwrap();
        assert_eq!(
            page,
            VpdPage::Other {
                page_code: 0xC7,
                data: vec![1, 2, 3]
            }
        );
        assert_eq!(lu.log, [(true, 0xC7, 252), (true, 0xC7, 0xFFFF)]);
    }

    #[test]
    fn identify_without_serial_page() {
        // No 0x80 listed: serial stays None and page 0x80 is never asked for.
        // Without an NAA the T10 vendor ID is the preferred identifier.
        let supported: &[u8] = &[0x00, 0x00, 0x00, 0x02, 0x00, 0x83];
        let page_83 = lio_vpd_83();
        let mut no_naa = vec![0x00, 0x83, 0x00, 0x00];
        no_naa.extend_from_slice(&page_83[24..]);
        let len = (no_naa.len() - 4) as u16;
        no_naa[2..4].copy_from_slice(&len.to_be_bytes());

        let mut lu = FakeLu::new(&[supported, &serial_page(), &no_naa]);
        let id = identify(&mut lu).unwrap();
        assert_eq!(id.serial, None);
        assert_eq!(id.naa(), None);
        assert_eq!(
            id.preferred_id().as_deref(),
            Some("t10.LIO-ORG stp-lun0:3b0e5e8a-6b2b-4f8c-9d12-3456789abcde")
        );
        assert_eq!(
            lu.log,
            [(false, 0, 36), (true, 0x00, 252), (true, 0x83, 252)]
        );

        // Only port designators: no identifier for the logical unit.
        let ports = VpdPage::DeviceIdentification(id.designators[1..].to_vec()).to_bytes(0);
        let mut lu = FakeLu::new(&[supported, &ports]);
        let id = identify(&mut lu).unwrap();
        assert_eq!(id.designators.len(), 3);
        assert_eq!(id.preferred_id(), None);
    }

    #[test]
    fn identify_check_condition_carries_sense() {
        let sense = Sense::new(SenseKey::NOT_READY, Asc::NOT_READY_CAUSE_NOT_REPORTABLE);
        let mut lu = FakeLu::new(&[SUPPORTED_LIO]);
        lu.fail = Some(sense.clone());
        let err = identify(&mut lu).unwrap_err();
        assert_eq!(err.sense(), Some(&sense));
        let IdentifyError::Command { what, source } = &err else {
            panic!("expected a command error, got {err:?}");
        };
        assert_eq!(*what, "standard INQUIRY");
        assert!(matches!(source, CommandError::CheckCondition(s) if *s == sense));
        assert!(err.to_string().contains("NOT READY"), "{err}");

        // A listed page the device then refuses: ILLEGAL REQUEST surfaces.
        let mut lu = FakeLu::new(&[SUPPORTED_LIO, &serial_page()]);
        let err = identify(&mut lu).unwrap_err();
        assert_eq!(err.sense().map(|s| s.asc), Some(Asc::INVALID_FIELD_IN_CDB));
        assert!(
            matches!(err, IdentifyError::Command { what, .. } if what.contains("0x83")),
            "{err:?}"
        );
    }

    #[test]
    fn vpd_wrong_page_and_short_answer() {
        let mut lu = FakeLu::new(&[SUPPORTED_LIO, &serial_page()]);
        lu.swap = Some((0x83, 0x80));
        let err = vpd(&mut lu, 0x83).unwrap_err();
        assert!(
            matches!(
                err,
                IdentifyError::Parse {
                    source: InquiryError::WrongPage {
                        expected: 0x83,
                        got: 0x80
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        let mut lu = FakeLu::new(&[&[0x00, 0xC1]]);
        let err = vpd(&mut lu, 0xC1).unwrap_err();
        assert!(
            matches!(
                err,
                IdentifyError::Parse {
                    source: InquiryError::Truncated { got: 2, .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
