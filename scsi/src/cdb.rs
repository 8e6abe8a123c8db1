//! Command descriptor blocks: typed wire layouts and a parsed form, built and
//! parsed both ways.
//!
//! [`wire`] holds one zerocopy struct per CDB layout (SPC-4 / SBC-3, plus
//! STP's 10-byte vendor-specific layout), read from and written to byte
//! slices without `unsafe`. [`Cdb`] is the parsed form: [`Cdb::parse`] turns
//! bytes into it and [`Cdb::emit`] turns it back into exactly as many bytes
//! as the opcode's layout has.
//!
//! Parsing validates the layout and no more: the length, the service action
//! of SERVICE ACTION IN(16) and MAINTENANCE IN, and the INQUIRY page code
//! when EVPD is clear. Reserved bits, protection fields, the group number
//! and the CONTROL byte (except in vendor CDBs) are not part of the parsed
//! form: a target that refuses what it does not support checks them in the
//! raw bytes (the simulated array does, against the CDB usage data it
//! reports in REPORT SUPPORTED OPERATION CODES). Bytes beyond the layout's
//! length are ignored too.
//!
//! No-panic contract: [`Cdb::parse`] accepts any byte slice and returns
//! either a [`Cdb`] or a [`CdbError`]; [`CdbError::to_sense`] gives the
//! sense data a target should answer with.

use std::fmt;

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::opcode::Opcode;
use crate::sense::{Asc, Sense, SenseKey};
use crate::transport::{CdbBuf, DataDirection};

/// Wire layouts of the CDBs this crate handles, one `#[repr(C)]` zerocopy
/// struct per layout, multi-byte fields big-endian. The last byte of each is
/// CONTROL.
pub mod wire {
    use zerocopy::byteorder::{BigEndian, U16, U32, U64};
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

    /// A big-endian `u16` field.
    pub type U16BE = U16<BigEndian>;
    /// A big-endian `u32` field.
    pub type U32BE = U32<BigEndian>;
    /// A big-endian `u64` field.
    pub type U64BE = U64<BigEndian>;

    /// Mask of a service action field (byte 1, bits 4-0).
    pub const SERVICE_ACTION_MASK: u8 = 0x1F;
    /// READ/WRITE byte 1: disable page out.
    pub const DPO: u8 = 0x10;
    /// READ/WRITE byte 1: force unit access.
    pub const FUA: u8 = 0x08;
    /// VERIFY byte 1: BYTCHK, bits 2-1.
    pub const BYTCHK_MASK: u8 = 0x06;
    /// WRITE SAME byte 1: unmap the blocks instead of writing them.
    pub const UNMAP: u8 = 0x08;
    /// UNMAP byte 1: anchor the blocks instead of deallocating them.
    pub const ANCHOR: u8 = 0x01;
    /// SYNCHRONIZE CACHE byte 1: return status immediately.
    pub const IMMED: u8 = 0x02;
    /// REQUEST SENSE byte 1: descriptor format sense.
    pub const DESC: u8 = 0x01;
    /// INQUIRY byte 1: enable vital product data.
    pub const EVPD: u8 = 0x01;
    /// MODE SENSE byte 1: disable block descriptors.
    pub const DBD: u8 = 0x08;
    /// MODE SENSE(10) byte 1: long LBA block descriptors accepted.
    pub const LLBAA: u8 = 0x10;
    /// REPORT TARGET PORT GROUPS byte 1: PARAMETER DATA FORMAT 001b, the
    /// extended header.
    pub const RTPG_EXTENDED: u8 = 0x20;
    /// REPORT SUPPORTED OPERATION CODES byte 2: return command timeouts.
    pub const RCTD: u8 = 0x80;
    /// REPORT SUPPORTED OPERATION CODES byte 2: reporting options mask.
    pub const REPORTING_OPTIONS_MASK: u8 = 0x07;
    /// MODE SENSE byte 2: page code mask (the PC field is bits 7-6).
    pub const PAGE_CODE_MASK: u8 = 0x3F;

    macro_rules! layouts {
        ($(
            $(#[$attr:meta])*
            pub struct $name:ident { $($(#[$fattr:meta])* pub $field:ident: $ty:ty,)* }
        )*) => {$(
            $(#[$attr])*
            #[derive(
                Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
                FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
            )]
            #[repr(C)]
            pub struct $name { $($(#[$fattr])* pub $field: $ty,)* }
        )*};
    }

    layouts! {
        /// TEST UNIT READY (0x00), 6 bytes.
        pub struct TestUnitReady {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Bytes 1-4: reserved.
            pub reserved: [u8; 4],
            /// Byte 5: CONTROL.
            pub control: u8,
        }

        /// REQUEST SENSE (0x03), 6 bytes.
        pub struct RequestSense {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: DESC in bit 0.
            pub flags: u8,
            /// Bytes 2-3: reserved.
            pub reserved: [u8; 2],
            /// Byte 4: allocation length.
            pub alloc_len: u8,
            /// Byte 5: CONTROL.
            pub control: u8,
        }

        /// INQUIRY (0x12), 6 bytes.
        pub struct Inquiry {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: EVPD in bit 0.
            pub flags: u8,
            /// Byte 2: VPD page code.
            pub page_code: u8,
            /// Bytes 3-4: allocation length.
            pub alloc_len: U16BE,
            /// Byte 5: CONTROL.
            pub control: u8,
        }

        /// MODE SENSE(6) (0x1A), 6 bytes.
        pub struct ModeSense6 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: DBD in bit 3.
            pub flags: u8,
            /// Byte 2: page control (bits 7-6) and page code (bits 5-0).
            pub page: u8,
            /// Byte 3: subpage code.
            pub subpage: u8,
            /// Byte 4: allocation length.
            pub alloc_len: u8,
            /// Byte 5: CONTROL.
            pub control: u8,
        }

        /// MODE SENSE(10) (0x5A), 10 bytes.
        pub struct ModeSense10 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: LLBAA in bit 4, DBD in bit 3.
            pub flags: u8,
            /// Byte 2: page control (bits 7-6) and page code (bits 5-0).
            pub page: u8,
            /// Byte 3: subpage code.
            pub subpage: u8,
            /// Bytes 4-6: reserved.
            pub reserved: [u8; 3],
            /// Bytes 7-8: allocation length.
            pub alloc_len: U16BE,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// READ CAPACITY(10) (0x25), 10 bytes.
        pub struct ReadCapacity10 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: reserved.
            pub reserved1: u8,
            /// Bytes 2-5: logical block address (obsolete).
            pub lba: U32BE,
            /// Bytes 6-7: reserved.
            pub reserved2: [u8; 2],
            /// Byte 8: PMI in bit 0 (obsolete).
            pub pmi: u8,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// READ CAPACITY(16): SERVICE ACTION IN(16) (0x9E) with service
        /// action 0x10, 16 bytes.
        pub struct ReadCapacity16 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: service action in bits 4-0.
            pub service_action: u8,
            /// Bytes 2-9: logical block address (obsolete).
            pub lba: U64BE,
            /// Bytes 10-13: allocation length.
            pub alloc_len: U32BE,
            /// Byte 14: PMI in bit 0 (obsolete).
            pub pmi: u8,
            /// Byte 15: CONTROL.
            pub control: u8,
        }

        /// READ(10) (0x28) and WRITE(10) (0x2A), 10 bytes; VERIFY(10)
        /// (0x2F) and WRITE SAME(10) (0x41) have the same layout.
        pub struct ReadWrite10 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: DPO in bit 4, FUA in bit 3.
            pub flags: u8,
            /// Bytes 2-5: logical block address.
            pub lba: U32BE,
            /// Byte 6: group number.
            pub group: u8,
            /// Bytes 7-8: transfer length in blocks.
            pub blocks: U16BE,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// READ(16) (0x88) and WRITE(16) (0x8A), 16 bytes; VERIFY(16)
        /// (0x8F) and WRITE SAME(16) (0x93) have the same layout.
        pub struct ReadWrite16 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: DPO in bit 4, FUA in bit 3.
            pub flags: u8,
            /// Bytes 2-9: logical block address.
            pub lba: U64BE,
            /// Bytes 10-13: transfer length in blocks.
            pub blocks: U32BE,
            /// Byte 14: group number.
            pub group: u8,
            /// Byte 15: CONTROL.
            pub control: u8,
        }

        /// COMPARE AND WRITE (0x89), 16 bytes.
        pub struct CompareAndWrite {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: WRPROTECT in bits 7-5, DPO in bit 4, FUA in bit 3.
            pub flags: u8,
            /// Bytes 2-9: logical block address.
            pub lba: U64BE,
            /// Bytes 10-12: reserved.
            pub reserved: [u8; 3],
            /// Byte 13: number of logical blocks.
            pub blocks: u8,
            /// Byte 14: group number.
            pub group: u8,
            /// Byte 15: CONTROL.
            pub control: u8,
        }

        /// UNMAP (0x42), 10 bytes.
        pub struct Unmap {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: ANCHOR in bit 0.
            pub flags: u8,
            /// Bytes 2-5: reserved.
            pub reserved: [u8; 4],
            /// Byte 6: group number.
            pub group: u8,
            /// Bytes 7-8: parameter list length.
            pub param_len: U16BE,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// GET LBA STATUS: SERVICE ACTION IN(16) (0x9E) with service action
        /// 0x12, 16 bytes.
        pub struct GetLbaStatus {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: service action in bits 4-0.
            pub service_action: u8,
            /// Bytes 2-9: starting logical block address.
            pub lba: U64BE,
            /// Bytes 10-13: allocation length.
            pub alloc_len: U32BE,
            /// Byte 14: reserved (REPORT TYPE in SBC-4).
            pub reserved: u8,
            /// Byte 15: CONTROL.
            pub control: u8,
        }

        /// SYNCHRONIZE CACHE(10) (0x35), 10 bytes.
        pub struct SynchronizeCache10 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: IMMED in bit 1.
            pub flags: u8,
            /// Bytes 2-5: logical block address.
            pub lba: U32BE,
            /// Byte 6: group number.
            pub group: u8,
            /// Bytes 7-8: number of blocks (0 = through the last block).
            pub blocks: U16BE,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// SYNCHRONIZE CACHE(16) (0x91), 16 bytes.
        pub struct SynchronizeCache16 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: IMMED in bit 1.
            pub flags: u8,
            /// Bytes 2-9: logical block address.
            pub lba: U64BE,
            /// Bytes 10-13: number of blocks (0 = through the last block).
            pub blocks: U32BE,
            /// Byte 14: group number.
            pub group: u8,
            /// Byte 15: CONTROL.
            pub control: u8,
        }

        /// REPORT LUNS (0xA0), 12 bytes.
        pub struct ReportLuns {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: reserved.
            pub reserved1: u8,
            /// Byte 2: select report.
            pub select_report: u8,
            /// Bytes 3-5: reserved.
            pub reserved2: [u8; 3],
            /// Bytes 6-9: allocation length.
            pub alloc_len: U32BE,
            /// Byte 10: reserved.
            pub reserved3: u8,
            /// Byte 11: CONTROL.
            pub control: u8,
        }

        /// REPORT SUPPORTED OPERATION CODES: MAINTENANCE IN (0xA3) with
        /// service action 0x0C, 12 bytes.
        pub struct ReportSupportedOpcodes {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: service action in bits 4-0.
            pub service_action: u8,
            /// Byte 2: RCTD in bit 7, reporting options in bits 2-0.
            pub options: u8,
            /// Byte 3: requested operation code.
            pub requested_opcode: u8,
            /// Bytes 4-5: requested service action.
            pub requested_service_action: U16BE,
            /// Bytes 6-9: allocation length.
            pub alloc_len: U32BE,
            /// Byte 10: reserved.
            pub reserved: u8,
            /// Byte 11: CONTROL.
            pub control: u8,
        }

        /// PERSISTENT RESERVE IN (SPC-4 6.15).
        pub struct PersistentReserveIn {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: service action in bits 4-0.
            pub service_action: u8,
            /// Bytes 2-6: reserved.
            pub reserved: [u8; 5],
            /// Bytes 7-8: allocation length.
            pub alloc_len: U16BE,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// PERSISTENT RESERVE OUT (SPC-4 6.16).
        pub struct PersistentReserveOut {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: service action in bits 4-0.
            pub service_action: u8,
            /// Byte 2: scope in bits 7-4, type in bits 3-0.
            pub scope_type: u8,
            /// Bytes 3-4: reserved.
            pub reserved: [u8; 2],
            /// Bytes 5-8: parameter list length.
            pub param_len: U32BE,
            /// Byte 9: CONTROL.
            pub control: u8,
        }

        /// STP's vendor-specific CDB (opcodes 0xC0-0xFF), 10 bytes: the
        /// length Linux LIO copies for command groups 6 and 7.
        pub struct Vendor10 {
            /// Byte 0: operation code.
            pub opcode: u8,
            /// Byte 1: command-defined flags.
            pub flags: u8,
            /// Bytes 2-5: handle (a port or handle number).
            pub handle: U32BE,
            /// Bytes 6-8: 24-bit big-endian length.
            pub length: [u8; 3],
            /// Byte 9: CONTROL.
            pub control: u8,
        }
    }

    // Every layout is as long as its opcode's command group says, and fits
    // in a `CdbBuf`.
    const _: () = {
        assert!(size_of::<TestUnitReady>() == 6);
        assert!(size_of::<RequestSense>() == 6);
        assert!(size_of::<Inquiry>() == 6);
        assert!(size_of::<ModeSense6>() == 6);
        assert!(size_of::<ModeSense10>() == 10);
        assert!(size_of::<ReadCapacity10>() == 10);
        assert!(size_of::<ReadCapacity16>() == 16);
        assert!(size_of::<ReadWrite10>() == 10);
        assert!(size_of::<ReadWrite16>() == 16);
        assert!(size_of::<CompareAndWrite>() == 16);
        assert!(size_of::<Unmap>() == 10);
        assert!(size_of::<GetLbaStatus>() == 16);
        assert!(size_of::<SynchronizeCache10>() == 10);
        assert!(size_of::<SynchronizeCache16>() == 16);
        assert!(size_of::<ReportLuns>() == 12);
        assert!(size_of::<ReportSupportedOpcodes>() == 12);
        assert!(size_of::<PersistentReserveIn>() == 10);
        assert!(size_of::<PersistentReserveOut>() == 10);
        assert!(size_of::<Vendor10>() == 10);
    };
}

/// The DPO and FUA bits of READ and WRITE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RwFlags {
    /// Force unit access: bypass (write through / re-read) the volatile cache.
    pub fua: bool,
    /// Disable page out: do not keep the data in the cache.
    pub dpo: bool,
}

impl RwFlags {
    fn from_byte(b: u8) -> RwFlags {
        RwFlags {
            fua: b & wire::FUA != 0,
            dpo: b & wire::DPO != 0,
        }
    }

    fn to_byte(self) -> u8 {
        flag(self.fua, wire::FUA) | flag(self.dpo, wire::DPO)
    }
}

/// MODE SENSE page control (PC, 2 bits), as an open newtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PageControl(pub u8);

impl PageControl {
    /// Current values.
    pub const CURRENT: PageControl = PageControl(0);
    /// Changeable values (a mask).
    pub const CHANGEABLE: PageControl = PageControl(1);
    /// Default values.
    pub const DEFAULT: PageControl = PageControl(2);
    /// Saved values.
    pub const SAVED: PageControl = PageControl(3);
}

/// STP's 10-byte vendor-specific CDB (see [`wire::Vendor10`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VendorCdb {
    /// Operation code, 0xC0-0xFF.
    pub opcode: Opcode,
    /// Command-defined flags (byte 1).
    pub flags: u8,
    /// Port or handle number (bytes 2-5).
    pub handle: u32,
    /// Length, at most [`VendorCdb::MAX_LENGTH`] (bytes 6-8).
    pub length: u32,
    /// CONTROL byte (byte 9).
    pub control: u8,
}

impl VendorCdb {
    /// The largest length the 24-bit field holds.
    pub const MAX_LENGTH: u32 = 0x00FF_FFFF;

    /// A vendor CDB with CONTROL 0. Fails when `opcode` is outside
    /// 0xC0-0xFF or `length` exceeds [`VendorCdb::MAX_LENGTH`].
    pub fn new(opcode: Opcode, flags: u8, handle: u32, length: u32) -> Result<VendorCdb, CdbError> {
        if !opcode.is_vendor_specific() {
            return Err(CdbError::InvalidField {
                byte: 0,
                bit: None,
                reason: "vendor-specific CDB opcode must be in 0xC0..=0xFF",
            });
        }
        if length > Self::MAX_LENGTH {
            return Err(CdbError::InvalidField {
                byte: 6,
                bit: None,
                reason: "vendor-specific CDB length must fit in 24 bits (at most 0xFFFFFF)",
            });
        }
        Ok(VendorCdb {
            opcode,
            flags,
            handle,
            length,
            control: 0,
        })
    }
}

impl From<VendorCdb> for Cdb {
    fn from(v: VendorCdb) -> Cdb {
        Cdb::Vendor(v)
    }
}

/// A parsed CDB.
///
/// [`Cdb::emit`] writes fields wider than their wire field masked to it
/// (page code 6 bits, page control 2, reporting options 3, BYTCHK 2, vendor
/// length 24);
/// everything else round-trips exactly through [`Cdb::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cdb {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense {
        /// Descriptor-format sense requested.
        desc: bool,
        /// Allocation length.
        alloc_len: u8,
    },
    /// INQUIRY: standard data, or a VPD page when `evpd` is set.
    Inquiry {
        /// Return the VPD page `page_code`.
        evpd: bool,
        /// VPD page code (0 when `evpd` is clear).
        page_code: u8,
        /// Allocation length.
        alloc_len: u16,
    },
    /// MODE SENSE(6).
    ModeSense6 {
        /// Disable block descriptors.
        dbd: bool,
        /// Which values to return.
        page_control: PageControl,
        /// Mode page code (6 bits; 0x3F = all pages).
        page_code: u8,
        /// Subpage code.
        subpage: u8,
        /// Allocation length.
        alloc_len: u8,
    },
    /// MODE SENSE(10).
    ModeSense10 {
        /// Long LBA block descriptors accepted.
        llbaa: bool,
        /// Disable block descriptors.
        dbd: bool,
        /// Which values to return.
        page_control: PageControl,
        /// Mode page code (6 bits; 0x3F = all pages).
        page_code: u8,
        /// Subpage code.
        subpage: u8,
        /// Allocation length.
        alloc_len: u16,
    },
    /// READ CAPACITY(10); returns 8 bytes.
    ReadCapacity10,
    /// READ CAPACITY(16) (SERVICE ACTION IN(16), service action 0x10).
    ReadCapacity16 {
        /// Allocation length.
        alloc_len: u32,
    },
    /// READ(10).
    Read10 {
        /// First logical block.
        lba: u32,
        /// Number of blocks (0 transfers nothing).
        blocks: u16,
        /// DPO and FUA.
        flags: RwFlags,
    },
    /// READ(16).
    Read16 {
        /// First logical block.
        lba: u64,
        /// Number of blocks (0 transfers nothing).
        blocks: u32,
        /// DPO and FUA.
        flags: RwFlags,
    },
    /// WRITE(10).
    Write10 {
        /// First logical block.
        lba: u32,
        /// Number of blocks (0 transfers nothing).
        blocks: u16,
        /// DPO and FUA.
        flags: RwFlags,
    },
    /// WRITE(16).
    Write16 {
        /// First logical block.
        lba: u64,
        /// Number of blocks (0 transfers nothing).
        blocks: u32,
        /// DPO and FUA.
        flags: RwFlags,
    },
    /// VERIFY(10): check the blocks can be read, and with BYTCHK compare
    /// them with the data-out buffer.
    Verify10 {
        /// First logical block.
        lba: u32,
        /// Number of blocks (0 verifies nothing).
        blocks: u16,
        /// BYTCHK (2 bits): 0 no data, 1 compare every block, 3 compare
        /// every block with one block of data-out (2 is reserved).
        bytchk: u8,
        /// Disable page out.
        dpo: bool,
    },
    /// VERIFY(16).
    Verify16 {
        /// First logical block.
        lba: u64,
        /// Number of blocks (0 verifies nothing).
        blocks: u32,
        /// BYTCHK (2 bits), as in [`Cdb::Verify10`].
        bytchk: u8,
        /// Disable page out.
        dpo: bool,
    },
    /// WRITE SAME(10): one block of data-out written to every block of the
    /// range, or the range unmapped.
    WriteSame10 {
        /// First logical block.
        lba: u32,
        /// Number of blocks.
        blocks: u16,
        /// Unmap (deallocate) the range where the LUN is thin provisioned.
        unmap: bool,
    },
    /// WRITE SAME(16).
    WriteSame16 {
        /// First logical block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Unmap (deallocate) the range where the LUN is thin provisioned.
        unmap: bool,
    },
    /// COMPARE AND WRITE: the data-out holds `blocks` blocks to compare
    /// with the medium, then `blocks` blocks written if they all match.
    CompareAndWrite {
        /// First logical block.
        lba: u64,
        /// Number of blocks (0 compares and writes nothing).
        blocks: u8,
        /// DPO and FUA.
        flags: RwFlags,
    },
    /// UNMAP: deallocate the ranges of the parameter list.
    Unmap {
        /// ANCHOR: anchor rather than deallocate.
        anchor: bool,
        /// Parameter list length.
        param_len: u16,
    },
    /// GET LBA STATUS (SERVICE ACTION IN(16), service action 0x12).
    GetLbaStatus {
        /// The first logical block to report on.
        lba: u64,
        /// Allocation length.
        alloc_len: u32,
    },
    /// SYNCHRONIZE CACHE(10).
    SynchronizeCache10 {
        /// First logical block.
        lba: u32,
        /// Number of blocks; 0 means through the last block.
        blocks: u16,
        /// Return status before the cache is flushed.
        immed: bool,
    },
    /// SYNCHRONIZE CACHE(16).
    SynchronizeCache16 {
        /// First logical block.
        lba: u64,
        /// Number of blocks; 0 means through the last block.
        blocks: u32,
        /// Return status before the cache is flushed.
        immed: bool,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// Which logical units to report.
        select_report: u8,
        /// Allocation length.
        alloc_len: u32,
    },
    /// REPORT SUPPORTED OPERATION CODES (MAINTENANCE IN, service action 0x0C).
    ReportSupportedOpcodes {
        /// Return command timeouts descriptors.
        rctd: bool,
        /// Reporting options (3 bits).
        reporting_options: u8,
        /// Requested operation code.
        opcode: u8,
        /// Requested service action.
        service_action: u16,
        /// Allocation length.
        alloc_len: u32,
    },
    /// REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0x0A).
    ReportTargetPortGroups {
        /// PARAMETER DATA FORMAT 001b: the 8-byte extended header.
        extended: bool,
        /// Allocation length.
        alloc_len: u32,
    },
    /// PERSISTENT RESERVE IN: read keys, the reservation, capabilities.
    PersistentReserveIn {
        /// Service action (5 bits).
        service_action: u8,
        /// Allocation length.
        alloc_len: u16,
    },
    /// PERSISTENT RESERVE OUT: register, reserve, release, clear, preempt.
    PersistentReserveOut {
        /// Service action (5 bits).
        service_action: u8,
        /// Scope (4 bits; 0 = logical unit).
        scope: u8,
        /// Reservation type (4 bits).
        pr_type: u8,
        /// Parameter list length (24 for the basic parameter list).
        param_len: u32,
    },
    /// A vendor-specific command (opcodes 0xC0-0xFF).
    Vendor(VendorCdb),
}

/// Why bytes are not a CDB this crate accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CdbError {
    /// No bytes at all.
    #[error("empty CDB: no operation code")]
    Empty,
    /// Fewer bytes than the opcode's layout needs.
    #[error("{opcode} CDB too short: {got} bytes, need {need}")]
    TooShort {
        /// The operation code.
        opcode: Opcode,
        /// Bytes present.
        got: usize,
        /// Bytes the layout needs.
        need: usize,
    },
    /// An operation code this crate does not parse.
    #[error("unsupported command: {0}")]
    UnsupportedOpcode(Opcode),
    /// A service action this crate does not parse for a known opcode.
    #[error("{opcode}: unsupported service action 0x{service_action:02X}")]
    UnsupportedServiceAction {
        /// The operation code.
        opcode: Opcode,
        /// The service action found.
        service_action: u16,
    },
    /// A field holds a value the command does not allow.
    #[error("invalid field in CDB byte {byte}{}: {reason}", bit_suffix(.bit))]
    InvalidField {
        /// The offending byte.
        byte: u16,
        /// The offending bit (the field's most significant), if indicated.
        bit: Option<u8>,
        /// What is wrong.
        reason: &'static str,
    },
}

fn bit_suffix(bit: &Option<u8>) -> String {
    match bit {
        Some(b) => format!(" bit {b}"),
        None => String::new(),
    }
}

impl CdbError {
    /// The sense data a target answers this error with (fixed format,
    /// ILLEGAL REQUEST):
    ///
    /// * [`Empty`](CdbError::Empty), [`UnsupportedOpcode`](CdbError::UnsupportedOpcode):
    ///   INVALID COMMAND OPERATION CODE;
    /// * [`TooShort`](CdbError::TooShort): INVALID FIELD IN CDB without a
    ///   field pointer (the missing bytes cannot be pointed at);
    /// * [`UnsupportedServiceAction`](CdbError::UnsupportedServiceAction):
    ///   INVALID FIELD IN CDB pointing at byte 1, bit 4 (SPC-4);
    /// * [`InvalidField`](CdbError::InvalidField): INVALID FIELD IN CDB
    ///   with its field pointer.
    pub fn to_sense(&self) -> Sense {
        match self {
            CdbError::Empty | CdbError::UnsupportedOpcode(_) => Sense::new(
                SenseKey::ILLEGAL_REQUEST,
                Asc::INVALID_COMMAND_OPERATION_CODE,
            ),
            CdbError::TooShort { .. } => {
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB)
            }
            CdbError::UnsupportedServiceAction { .. } => Sense::invalid_field_in_cdb(1, Some(4)),
            CdbError::InvalidField { byte, bit, .. } => Sense::invalid_field_in_cdb(*byte, *bit),
        }
    }
}

/// `mask` when `set`, else 0: one flag of a CDB or parameter byte (every
/// builder and encoder of the crate uses this one).
pub(crate) fn flag(set: bool, mask: u8) -> u8 {
    if set {
        mask
    } else {
        0
    }
}

/// Reads layout `T` from the front of `bytes` (extra bytes are ignored).
fn read<T: FromBytes>(bytes: &[u8], opcode: Opcode) -> Result<T, CdbError> {
    match T::read_from_prefix(bytes) {
        Ok((wire, _rest)) => Ok(wire),
        Err(_) => Err(CdbError::TooShort {
            opcode,
            got: bytes.len(),
            need: size_of::<T>(),
        }),
    }
}

/// The bytes of a layout as a `CdbBuf`.
fn buf<T: IntoBytes + Immutable>(wire: &T) -> CdbBuf {
    match CdbBuf::new(wire.as_bytes()) {
        Some(b) => b,
        // Every layout is 6 to 16 bytes long (asserted at compile time in `wire`).
        None => unreachable!("CDB layouts are 6 to 16 bytes long"),
    }
}

fn u24(b: [u8; 3]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

fn to_u24(v: u32) -> [u8; 3] {
    let [_, a, b, c] = v.to_be_bytes();
    [a, b, c]
}

impl Cdb {
    /// Parses a CDB. Bytes beyond the opcode's layout are ignored. Never
    /// panics, whatever `bytes` holds.
    pub fn parse(bytes: &[u8]) -> Result<Cdb, CdbError> {
        let Some(&first) = bytes.first() else {
            return Err(CdbError::Empty);
        };
        let opcode = Opcode(first);
        let cdb = match opcode {
            Opcode::TEST_UNIT_READY => {
                read::<wire::TestUnitReady>(bytes, opcode)?;
                Cdb::TestUnitReady
            }
            Opcode::REQUEST_SENSE => {
                let w: wire::RequestSense = read(bytes, opcode)?;
                Cdb::RequestSense {
                    desc: w.flags & wire::DESC != 0,
                    alloc_len: w.alloc_len,
                }
            }
            Opcode::INQUIRY => {
                let w: wire::Inquiry = read(bytes, opcode)?;
                let evpd = w.flags & wire::EVPD != 0;
                if !evpd && w.page_code != 0 {
                    return Err(CdbError::InvalidField {
                        byte: 2,
                        bit: None,
                        reason: "INQUIRY with EVPD=0 must have page code 0",
                    });
                }
                Cdb::Inquiry {
                    evpd,
                    page_code: w.page_code,
                    alloc_len: w.alloc_len.get(),
                }
            }
            Opcode::MODE_SENSE_6 => {
                let w: wire::ModeSense6 = read(bytes, opcode)?;
                Cdb::ModeSense6 {
                    dbd: w.flags & wire::DBD != 0,
                    page_control: PageControl(w.page >> 6),
                    page_code: w.page & wire::PAGE_CODE_MASK,
                    subpage: w.subpage,
                    alloc_len: w.alloc_len,
                }
            }
            Opcode::MODE_SENSE_10 => {
                let w: wire::ModeSense10 = read(bytes, opcode)?;
                Cdb::ModeSense10 {
                    llbaa: w.flags & wire::LLBAA != 0,
                    dbd: w.flags & wire::DBD != 0,
                    page_control: PageControl(w.page >> 6),
                    page_code: w.page & wire::PAGE_CODE_MASK,
                    subpage: w.subpage,
                    alloc_len: w.alloc_len.get(),
                }
            }
            Opcode::READ_CAPACITY_10 => {
                read::<wire::ReadCapacity10>(bytes, opcode)?;
                Cdb::ReadCapacity10
            }
            Opcode::SERVICE_ACTION_IN_16 => {
                let w: wire::ReadCapacity16 = read(bytes, opcode)?;
                let sa = w.service_action & wire::SERVICE_ACTION_MASK;
                match sa {
                    Opcode::SA_READ_CAPACITY_16 => Cdb::ReadCapacity16 {
                        alloc_len: w.alloc_len.get(),
                    },
                    Opcode::SA_GET_LBA_STATUS => {
                        let w: wire::GetLbaStatus = read(bytes, opcode)?;
                        Cdb::GetLbaStatus {
                            lba: w.lba.get(),
                            alloc_len: w.alloc_len.get(),
                        }
                    }
                    _ => {
                        return Err(CdbError::UnsupportedServiceAction {
                            opcode,
                            service_action: sa.into(),
                        })
                    }
                }
            }
            Opcode::READ_10 | Opcode::WRITE_10 => {
                let w: wire::ReadWrite10 = read(bytes, opcode)?;
                let (lba, blocks, flags) =
                    (w.lba.get(), w.blocks.get(), RwFlags::from_byte(w.flags));
                if opcode == Opcode::READ_10 {
                    Cdb::Read10 { lba, blocks, flags }
                } else {
                    Cdb::Write10 { lba, blocks, flags }
                }
            }
            Opcode::READ_16 | Opcode::WRITE_16 => {
                let w: wire::ReadWrite16 = read(bytes, opcode)?;
                let (lba, blocks, flags) =
                    (w.lba.get(), w.blocks.get(), RwFlags::from_byte(w.flags));
                if opcode == Opcode::READ_16 {
                    Cdb::Read16 { lba, blocks, flags }
                } else {
                    Cdb::Write16 { lba, blocks, flags }
                }
            }
            Opcode::VERIFY_10 | Opcode::WRITE_SAME_10 => {
                let w: wire::ReadWrite10 = read(bytes, opcode)?;
                let (lba, blocks) = (w.lba.get(), w.blocks.get());
                if opcode == Opcode::VERIFY_10 {
                    Cdb::Verify10 {
                        lba,
                        blocks,
                        bytchk: (w.flags & wire::BYTCHK_MASK) >> 1,
                        dpo: w.flags & wire::DPO != 0,
                    }
                } else {
                    Cdb::WriteSame10 {
                        lba,
                        blocks,
                        unmap: w.flags & wire::UNMAP != 0,
                    }
                }
            }
            Opcode::VERIFY_16 | Opcode::WRITE_SAME_16 => {
                let w: wire::ReadWrite16 = read(bytes, opcode)?;
                let (lba, blocks) = (w.lba.get(), w.blocks.get());
                if opcode == Opcode::VERIFY_16 {
                    Cdb::Verify16 {
                        lba,
                        blocks,
                        bytchk: (w.flags & wire::BYTCHK_MASK) >> 1,
                        dpo: w.flags & wire::DPO != 0,
                    }
                } else {
                    Cdb::WriteSame16 {
                        lba,
                        blocks,
                        unmap: w.flags & wire::UNMAP != 0,
                    }
                }
            }
            Opcode::COMPARE_AND_WRITE => {
                let w: wire::CompareAndWrite = read(bytes, opcode)?;
                Cdb::CompareAndWrite {
                    lba: w.lba.get(),
                    blocks: w.blocks,
                    flags: RwFlags::from_byte(w.flags),
                }
            }
            Opcode::UNMAP => {
                let w: wire::Unmap = read(bytes, opcode)?;
                Cdb::Unmap {
                    anchor: w.flags & wire::ANCHOR != 0,
                    param_len: w.param_len.get(),
                }
            }
            Opcode::SYNCHRONIZE_CACHE_10 => {
                let w: wire::SynchronizeCache10 = read(bytes, opcode)?;
                Cdb::SynchronizeCache10 {
                    lba: w.lba.get(),
                    blocks: w.blocks.get(),
                    immed: w.flags & wire::IMMED != 0,
                }
            }
            Opcode::SYNCHRONIZE_CACHE_16 => {
                let w: wire::SynchronizeCache16 = read(bytes, opcode)?;
                Cdb::SynchronizeCache16 {
                    lba: w.lba.get(),
                    blocks: w.blocks.get(),
                    immed: w.flags & wire::IMMED != 0,
                }
            }
            Opcode::REPORT_LUNS => {
                let w: wire::ReportLuns = read(bytes, opcode)?;
                Cdb::ReportLuns {
                    select_report: w.select_report,
                    alloc_len: w.alloc_len.get(),
                }
            }
            Opcode::MAINTENANCE_IN => {
                let w: wire::ReportSupportedOpcodes = read(bytes, opcode)?;
                let sa = w.service_action & wire::SERVICE_ACTION_MASK;
                if sa == Opcode::SA_REPORT_TARGET_PORT_GROUPS {
                    return Ok(Cdb::ReportTargetPortGroups {
                        extended: w.service_action & 0xE0 == wire::RTPG_EXTENDED,
                        alloc_len: w.alloc_len.get(),
                    });
                }
                if sa != Opcode::SA_REPORT_SUPPORTED_OPCODES {
                    return Err(CdbError::UnsupportedServiceAction {
                        opcode,
                        service_action: sa.into(),
                    });
                }
                Cdb::ReportSupportedOpcodes {
                    rctd: w.options & wire::RCTD != 0,
                    reporting_options: w.options & wire::REPORTING_OPTIONS_MASK,
                    opcode: w.requested_opcode,
                    service_action: w.requested_service_action.get(),
                    alloc_len: w.alloc_len.get(),
                }
            }
            Opcode::PERSISTENT_RESERVE_IN => {
                let w: wire::PersistentReserveIn = read(bytes, opcode)?;
                Cdb::PersistentReserveIn {
                    service_action: w.service_action & wire::SERVICE_ACTION_MASK,
                    alloc_len: w.alloc_len.get(),
                }
            }
            Opcode::PERSISTENT_RESERVE_OUT => {
                let w: wire::PersistentReserveOut = read(bytes, opcode)?;
                Cdb::PersistentReserveOut {
                    service_action: w.service_action & wire::SERVICE_ACTION_MASK,
                    scope: w.scope_type >> 4,
                    pr_type: w.scope_type & 0x0F,
                    param_len: w.param_len.get(),
                }
            }
            Opcode(0xC0..=0xFF) => {
                let w: wire::Vendor10 = read(bytes, opcode)?;
                Cdb::Vendor(VendorCdb {
                    opcode,
                    flags: w.flags,
                    handle: w.handle.get(),
                    length: u24(w.length),
                    control: w.control,
                })
            }
            _ => return Err(CdbError::UnsupportedOpcode(opcode)),
        };
        Ok(cdb)
    }

    /// Emits the CDB: exactly as many bytes as the opcode's layout has, with
    /// reserved bytes, group number and CONTROL zero (vendor CDBs keep their
    /// CONTROL).
    pub fn emit(&self) -> CdbBuf {
        let op = self.opcode().0;
        match *self {
            Cdb::TestUnitReady => buf(&wire::TestUnitReady {
                opcode: op,
                ..Default::default()
            }),
            Cdb::RequestSense { desc, alloc_len } => buf(&wire::RequestSense {
                opcode: op,
                flags: flag(desc, wire::DESC),
                alloc_len,
                ..Default::default()
            }),
            Cdb::Inquiry {
                evpd,
                page_code,
                alloc_len,
            } => buf(&wire::Inquiry {
                opcode: op,
                flags: flag(evpd, wire::EVPD),
                page_code,
                alloc_len: alloc_len.into(),
                control: 0,
            }),
            Cdb::ModeSense6 {
                dbd,
                page_control,
                page_code,
                subpage,
                alloc_len,
            } => buf(&wire::ModeSense6 {
                opcode: op,
                flags: flag(dbd, wire::DBD),
                page: mode_page(page_control, page_code),
                subpage,
                alloc_len,
                control: 0,
            }),
            Cdb::ModeSense10 {
                llbaa,
                dbd,
                page_control,
                page_code,
                subpage,
                alloc_len,
            } => buf(&wire::ModeSense10 {
                opcode: op,
                flags: flag(llbaa, wire::LLBAA) | flag(dbd, wire::DBD),
                page: mode_page(page_control, page_code),
                subpage,
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::ReadCapacity10 => buf(&wire::ReadCapacity10 {
                opcode: op,
                ..Default::default()
            }),
            Cdb::ReadCapacity16 { alloc_len } => buf(&wire::ReadCapacity16 {
                opcode: op,
                service_action: Opcode::SA_READ_CAPACITY_16,
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::Read10 { lba, blocks, flags } | Cdb::Write10 { lba, blocks, flags } => {
                buf(&wire::ReadWrite10 {
                    opcode: op,
                    flags: flags.to_byte(),
                    lba: lba.into(),
                    blocks: blocks.into(),
                    ..Default::default()
                })
            }
            Cdb::Read16 { lba, blocks, flags } | Cdb::Write16 { lba, blocks, flags } => {
                buf(&wire::ReadWrite16 {
                    opcode: op,
                    flags: flags.to_byte(),
                    lba: lba.into(),
                    blocks: blocks.into(),
                    ..Default::default()
                })
            }
            Cdb::Verify10 {
                lba,
                blocks,
                bytchk,
                dpo,
            } => buf(&wire::ReadWrite10 {
                opcode: op,
                flags: ((bytchk << 1) & wire::BYTCHK_MASK) | flag(dpo, wire::DPO),
                lba: lba.into(),
                blocks: blocks.into(),
                ..Default::default()
            }),
            Cdb::Verify16 {
                lba,
                blocks,
                bytchk,
                dpo,
            } => buf(&wire::ReadWrite16 {
                opcode: op,
                flags: ((bytchk << 1) & wire::BYTCHK_MASK) | flag(dpo, wire::DPO),
                lba: lba.into(),
                blocks: blocks.into(),
                ..Default::default()
            }),
            Cdb::WriteSame10 { lba, blocks, unmap } => buf(&wire::ReadWrite10 {
                opcode: op,
                flags: flag(unmap, wire::UNMAP),
                lba: lba.into(),
                blocks: blocks.into(),
                ..Default::default()
            }),
            Cdb::WriteSame16 { lba, blocks, unmap } => buf(&wire::ReadWrite16 {
                opcode: op,
                flags: flag(unmap, wire::UNMAP),
                lba: lba.into(),
                blocks: blocks.into(),
                ..Default::default()
            }),
            Cdb::CompareAndWrite { lba, blocks, flags } => buf(&wire::CompareAndWrite {
                opcode: op,
                flags: flags.to_byte(),
                lba: lba.into(),
                blocks,
                ..Default::default()
            }),
            Cdb::Unmap { anchor, param_len } => buf(&wire::Unmap {
                opcode: op,
                flags: flag(anchor, wire::ANCHOR),
                param_len: param_len.into(),
                ..Default::default()
            }),
            Cdb::GetLbaStatus { lba, alloc_len } => buf(&wire::GetLbaStatus {
                opcode: op,
                service_action: Opcode::SA_GET_LBA_STATUS,
                lba: lba.into(),
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::SynchronizeCache10 { lba, blocks, immed } => buf(&wire::SynchronizeCache10 {
                opcode: op,
                flags: flag(immed, wire::IMMED),
                lba: lba.into(),
                blocks: blocks.into(),
                ..Default::default()
            }),
            Cdb::SynchronizeCache16 { lba, blocks, immed } => buf(&wire::SynchronizeCache16 {
                opcode: op,
                flags: flag(immed, wire::IMMED),
                lba: lba.into(),
                blocks: blocks.into(),
                ..Default::default()
            }),
            Cdb::ReportLuns {
                select_report,
                alloc_len,
            } => buf(&wire::ReportLuns {
                opcode: op,
                select_report,
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::ReportTargetPortGroups {
                extended,
                alloc_len,
            } => buf(&wire::ReportSupportedOpcodes {
                opcode: op,
                service_action: Opcode::SA_REPORT_TARGET_PORT_GROUPS
                    | flag(extended, wire::RTPG_EXTENDED),
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::ReportSupportedOpcodes {
                rctd,
                reporting_options,
                opcode,
                service_action,
                alloc_len,
            } => buf(&wire::ReportSupportedOpcodes {
                opcode: op,
                service_action: Opcode::SA_REPORT_SUPPORTED_OPCODES,
                options: flag(rctd, wire::RCTD)
                    | (reporting_options & wire::REPORTING_OPTIONS_MASK),
                requested_opcode: opcode,
                requested_service_action: service_action.into(),
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::PersistentReserveIn {
                service_action,
                alloc_len,
            } => buf(&wire::PersistentReserveIn {
                opcode: op,
                service_action: service_action & wire::SERVICE_ACTION_MASK,
                alloc_len: alloc_len.into(),
                ..Default::default()
            }),
            Cdb::PersistentReserveOut {
                service_action,
                scope,
                pr_type,
                param_len,
            } => buf(&wire::PersistentReserveOut {
                opcode: op,
                service_action: service_action & wire::SERVICE_ACTION_MASK,
                scope_type: (scope << 4) | (pr_type & 0x0F),
                param_len: param_len.into(),
                ..Default::default()
            }),
            Cdb::Vendor(v) => buf(&wire::Vendor10 {
                opcode: op,
                flags: v.flags,
                handle: v.handle.into(),
                length: to_u24(v.length),
                control: v.control,
            }),
        }
    }

    /// The operation code (byte 0).
    pub fn opcode(&self) -> Opcode {
        match self {
            Cdb::TestUnitReady => Opcode::TEST_UNIT_READY,
            Cdb::RequestSense { .. } => Opcode::REQUEST_SENSE,
            Cdb::Inquiry { .. } => Opcode::INQUIRY,
            Cdb::ModeSense6 { .. } => Opcode::MODE_SENSE_6,
            Cdb::ModeSense10 { .. } => Opcode::MODE_SENSE_10,
            Cdb::ReadCapacity10 => Opcode::READ_CAPACITY_10,
            Cdb::ReadCapacity16 { .. } => Opcode::SERVICE_ACTION_IN_16,
            Cdb::Read10 { .. } => Opcode::READ_10,
            Cdb::Read16 { .. } => Opcode::READ_16,
            Cdb::Write10 { .. } => Opcode::WRITE_10,
            Cdb::Write16 { .. } => Opcode::WRITE_16,
            Cdb::Verify10 { .. } => Opcode::VERIFY_10,
            Cdb::Verify16 { .. } => Opcode::VERIFY_16,
            Cdb::WriteSame10 { .. } => Opcode::WRITE_SAME_10,
            Cdb::WriteSame16 { .. } => Opcode::WRITE_SAME_16,
            Cdb::CompareAndWrite { .. } => Opcode::COMPARE_AND_WRITE,
            Cdb::Unmap { .. } => Opcode::UNMAP,
            Cdb::GetLbaStatus { .. } => Opcode::SERVICE_ACTION_IN_16,
            Cdb::SynchronizeCache10 { .. } => Opcode::SYNCHRONIZE_CACHE_10,
            Cdb::SynchronizeCache16 { .. } => Opcode::SYNCHRONIZE_CACHE_16,
            Cdb::ReportLuns { .. } => Opcode::REPORT_LUNS,
            Cdb::ReportSupportedOpcodes { .. } | Cdb::ReportTargetPortGroups { .. } => {
                Opcode::MAINTENANCE_IN
            }
            Cdb::PersistentReserveIn { .. } => Opcode::PERSISTENT_RESERVE_IN,
            Cdb::PersistentReserveOut { .. } => Opcode::PERSISTENT_RESERVE_OUT,
            Cdb::Vendor(v) => v.opcode,
        }
    }

    /// The command's data direction. `None` for [`Cdb::Vendor`], whose
    /// direction the vendor command set defines. A data-in or data-out
    /// command with a zero [`transfer_len`](Cdb::transfer_len) keeps its
    /// direction.
    pub fn direction(&self) -> Option<DataDirection> {
        Some(match self {
            Cdb::TestUnitReady
            | Cdb::SynchronizeCache10 { .. }
            | Cdb::SynchronizeCache16 { .. }
            | Cdb::Verify10 { bytchk: 0, .. }
            | Cdb::Verify16 { bytchk: 0, .. } => DataDirection::None,
            Cdb::Write10 { .. }
            | Cdb::Write16 { .. }
            | Cdb::PersistentReserveOut { .. }
            | Cdb::Verify10 { .. }
            | Cdb::Verify16 { .. }
            | Cdb::WriteSame10 { .. }
            | Cdb::WriteSame16 { .. }
            | Cdb::CompareAndWrite { .. }
            | Cdb::Unmap { .. } => DataDirection::ToDevice,
            Cdb::PersistentReserveIn { .. }
            | Cdb::RequestSense { .. }
            | Cdb::Inquiry { .. }
            | Cdb::ModeSense6 { .. }
            | Cdb::ModeSense10 { .. }
            | Cdb::ReadCapacity10
            | Cdb::ReadCapacity16 { .. }
            | Cdb::GetLbaStatus { .. }
            | Cdb::Read10 { .. }
            | Cdb::Read16 { .. }
            | Cdb::ReportLuns { .. }
            | Cdb::ReportSupportedOpcodes { .. }
            | Cdb::ReportTargetPortGroups { .. } => DataDirection::FromDevice,
            Cdb::Vendor(_) => return None,
        })
    }

    /// The data bytes the command moves at most: the allocation length for
    /// data-in commands (8 for READ CAPACITY(10)), `blocks * block_size` for
    /// READ and WRITE (and VERIFY with BYTCHK 01b), one block for WRITE
    /// SAME (and VERIFY with BYTCHK 11b), two per block for COMPARE AND
    /// WRITE, the parameter list length for UNMAP, 0 without a data phase.
    /// `None` for [`Cdb::Vendor`].
    pub fn transfer_len(&self, block_size: u32) -> Option<u64> {
        let blocks = |n: u64| n * u64::from(block_size);
        let verify = |bytchk: u8, n: u64| match bytchk {
            0 => 0,
            3 => blocks(1),
            _ => blocks(n),
        };
        Some(match *self {
            Cdb::TestUnitReady
            | Cdb::SynchronizeCache10 { .. }
            | Cdb::SynchronizeCache16 { .. } => 0,
            Cdb::Verify10 {
                bytchk, blocks: n, ..
            } => verify(bytchk, n.into()),
            Cdb::Verify16 {
                bytchk, blocks: n, ..
            } => verify(bytchk, n.into()),
            Cdb::WriteSame10 { .. } | Cdb::WriteSame16 { .. } => blocks(1),
            Cdb::CompareAndWrite { blocks: n, .. } => blocks(2 * u64::from(n)),
            Cdb::Unmap { param_len, .. } => param_len.into(),
            Cdb::GetLbaStatus { alloc_len, .. } => alloc_len.into(),
            Cdb::RequestSense { alloc_len, .. } | Cdb::ModeSense6 { alloc_len, .. } => {
                alloc_len.into()
            }
            Cdb::Inquiry { alloc_len, .. }
            | Cdb::ModeSense10 { alloc_len, .. }
            | Cdb::PersistentReserveIn { alloc_len, .. } => alloc_len.into(),
            Cdb::PersistentReserveOut { param_len, .. } => param_len.into(),
            Cdb::ReadCapacity10 => 8,
            Cdb::ReadCapacity16 { alloc_len }
            | Cdb::ReportLuns { alloc_len, .. }
            | Cdb::ReportSupportedOpcodes { alloc_len, .. }
            | Cdb::ReportTargetPortGroups { alloc_len, .. } => alloc_len.into(),
            Cdb::Read10 { blocks: n, .. } | Cdb::Write10 { blocks: n, .. } => blocks(n.into()),
            Cdb::Read16 { blocks: n, .. } | Cdb::Write16 { blocks: n, .. } => blocks(n.into()),
            Cdb::Vendor(_) => return None,
        })
    }

    /// `(first LBA, block count)` for READ, WRITE, VERIFY, WRITE SAME,
    /// COMPARE AND WRITE and SYNCHRONIZE CACHE (whose count 0 means through
    /// the last block); `None` otherwise.
    pub fn lba_range(&self) -> Option<(u64, u64)> {
        match *self {
            Cdb::Read10 { lba, blocks, .. }
            | Cdb::Write10 { lba, blocks, .. }
            | Cdb::Verify10 { lba, blocks, .. }
            | Cdb::WriteSame10 { lba, blocks, .. }
            | Cdb::SynchronizeCache10 { lba, blocks, .. } => Some((lba.into(), blocks.into())),
            Cdb::Read16 { lba, blocks, .. }
            | Cdb::Write16 { lba, blocks, .. }
            | Cdb::Verify16 { lba, blocks, .. }
            | Cdb::WriteSame16 { lba, blocks, .. }
            | Cdb::SynchronizeCache16 { lba, blocks, .. } => Some((lba, blocks.into())),
            Cdb::CompareAndWrite { lba, blocks, .. } => Some((lba, blocks.into())),
            _ => None,
        }
    }
}

fn mode_page(pc: PageControl, page_code: u8) -> u8 {
    (pc.0 << 6) | (page_code & wire::PAGE_CODE_MASK)
}

impl fmt::Display for Cdb {
    /// The CDB as emitted, in hex (`28 08 12 34 56 78 00 00 08 00`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.emit().as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::FieldPointer;
    use proptest::prelude::*;

    /// Parses hex bytes written as `"28 08 12 ..."`.
    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// Checks both directions: `bytes` parse to `cdb`, and `cdb` emits `bytes`.
    #[track_caller]
    fn both_ways(bytes: &str, cdb: Cdb) {
        let bytes = hex(bytes);
        assert_eq!(Cdb::parse(&bytes), Ok(cdb), "parse {bytes:02x?}");
        assert_eq!(cdb.emit().as_slice(), &bytes[..], "emit {cdb:?}");
    }

    const NO_FLAGS: RwFlags = RwFlags {
        fua: false,
        dpo: false,
    };
    const FUA: RwFlags = RwFlags {
        fua: true,
        dpo: false,
    };
    const DPO_FUA: RwFlags = RwFlags {
        fua: true,
        dpo: true,
    };

    #[test]
    fn spc_vectors() {
        both_ways("00 00 00 00 00 00", Cdb::TestUnitReady);
        both_ways(
            "03 00 00 00 12 00",
            Cdb::RequestSense {
                desc: false,
                alloc_len: 18,
            },
        );
        both_ways(
            "03 01 00 00 fc 00",
            Cdb::RequestSense {
                desc: true,
                alloc_len: 252,
            },
        );
        // sg_inq: standard INQUIRY, 36 bytes.
        both_ways(
            "12 00 00 00 24 00",
            Cdb::Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 36,
            },
        );
        // sg_vpd -p di: device identification VPD page.
        both_ways(
            "12 01 83 00 fc 00",
            Cdb::Inquiry {
                evpd: true,
                page_code: 0x83,
                alloc_len: 252,
            },
        );
        both_ways(
            "12 01 00 10 00 00",
            Cdb::Inquiry {
                evpd: true,
                page_code: 0,
                alloc_len: 0x1000,
            },
        );
        // Caching mode page, current values, no block descriptors.
        both_ways(
            "1a 08 08 00 ff 00",
            Cdb::ModeSense6 {
                dbd: true,
                page_control: PageControl::CURRENT,
                page_code: 0x08,
                subpage: 0,
                alloc_len: 255,
            },
        );
        both_ways(
            "1a 00 7f ff 04 00",
            Cdb::ModeSense6 {
                dbd: false,
                page_control: PageControl::CHANGEABLE,
                page_code: 0x3F,
                subpage: 0xFF,
                alloc_len: 4,
            },
        );
        both_ways(
            "5a 18 bf ff 00 00 00 10 00 00",
            Cdb::ModeSense10 {
                llbaa: true,
                dbd: true,
                page_control: PageControl::DEFAULT,
                page_code: 0x3F,
                subpage: 0xFF,
                alloc_len: 0x1000,
            },
        );
        both_ways(
            "5a 00 ca 00 00 00 00 00 fc 00",
            Cdb::ModeSense10 {
                llbaa: false,
                dbd: false,
                page_control: PageControl::SAVED,
                page_code: 0x0A,
                subpage: 0,
                alloc_len: 252,
            },
        );
        both_ways(
            "a0 00 00 00 00 00 00 00 10 00 00 00",
            Cdb::ReportLuns {
                select_report: 0,
                alloc_len: 4096,
            },
        );
        both_ways(
            "a0 00 02 00 00 00 00 01 00 00 00 00",
            Cdb::ReportLuns {
                select_report: 2,
                alloc_len: 0x10000,
            },
        );
        // sg_rtpg, then sg_rtpg --extended.
        both_ways(
            "a3 0a 00 00 00 00 00 00 20 00 00 00",
            Cdb::ReportTargetPortGroups {
                extended: false,
                alloc_len: 0x2000,
            },
        );
        both_ways(
            "a3 2a 00 00 00 00 00 00 20 00 00 00",
            Cdb::ReportTargetPortGroups {
                extended: true,
                alloc_len: 0x2000,
            },
        );
        // sg_opcodes: all commands; then one command with timeouts.
        both_ways(
            "a3 0c 00 00 00 00 00 00 20 00 00 00",
            Cdb::ReportSupportedOpcodes {
                rctd: false,
                reporting_options: 0,
                opcode: 0,
                service_action: 0,
                alloc_len: 0x2000,
            },
        );
        both_ways(
            "a3 0c 82 9e 00 10 00 00 02 00 00 00",
            Cdb::ReportSupportedOpcodes {
                rctd: true,
                reporting_options: 2,
                opcode: 0x9E,
                service_action: 0x10,
                alloc_len: 512,
            },
        );
    }

    #[test]
    fn sbc_vectors() {
        both_ways("25 00 00 00 00 00 00 00 00 00", Cdb::ReadCapacity10);
        // sg_readcap -l
        both_ways(
            "9e 10 00 00 00 00 00 00 00 00 00 00 00 20 00 00",
            Cdb::ReadCapacity16 { alloc_len: 32 },
        );
        both_ways(
            "28 08 12 34 56 78 00 00 08 00",
            Cdb::Read10 {
                lba: 0x1234_5678,
                blocks: 8,
                flags: FUA,
            },
        );
        both_ways(
            "2a 00 00 00 00 00 00 ff ff 00",
            Cdb::Write10 {
                lba: 0,
                blocks: 0xFFFF,
                flags: NO_FLAGS,
            },
        );
        both_ways(
            "2a 10 ff ff ff ff 00 00 01 00",
            Cdb::Write10 {
                lba: u32::MAX,
                blocks: 1,
                flags: RwFlags {
                    fua: false,
                    dpo: true,
                },
            },
        );
        both_ways(
            "88 00 00 00 00 01 00 00 00 00 00 01 00 00 00 00",
            Cdb::Read16 {
                lba: 1 << 32,
                blocks: 1 << 16,
                flags: NO_FLAGS,
            },
        );
        both_ways(
            "8a 18 00 00 00 01 23 45 67 89 00 00 01 00 00 00",
            Cdb::Write16 {
                lba: 0x1_2345_6789,
                blocks: 256,
                flags: DPO_FUA,
            },
        );
        both_ways(
            "35 00 00 00 00 00 00 00 00 00",
            Cdb::SynchronizeCache10 {
                lba: 0,
                blocks: 0,
                immed: false,
            },
        );
        both_ways(
            "35 02 00 00 10 00 00 00 80 00",
            Cdb::SynchronizeCache10 {
                lba: 0x1000,
                blocks: 0x80,
                immed: true,
            },
        );
        both_ways(
            "91 02 00 00 00 00 00 00 00 01 00 00 00 02 00 00",
            Cdb::SynchronizeCache16 {
                lba: 1,
                blocks: 2,
                immed: true,
            },
        );
    }

    #[test]
    fn sbc_provisioning_and_verify_vectors() {
        // sg_verify --lba=0x1000 --count=8 (BYTCHK 0), then with --ndo.
        both_ways(
            "2f 00 00 00 10 00 00 00 08 00",
            Cdb::Verify10 {
                lba: 0x1000,
                blocks: 8,
                bytchk: 0,
                dpo: false,
            },
        );
        both_ways(
            "2f 12 00 00 10 00 00 00 08 00",
            Cdb::Verify10 {
                lba: 0x1000,
                blocks: 8,
                bytchk: 1,
                dpo: true,
            },
        );
        both_ways(
            "8f 06 00 00 00 01 00 00 00 00 00 00 00 02 00 00",
            Cdb::Verify16 {
                lba: 1 << 32,
                blocks: 2,
                bytchk: 3,
                dpo: false,
            },
        );
        // sg_write_same --lba=64 --num=16, then --unmap --16.
        both_ways(
            "41 00 00 00 00 40 00 00 10 00",
            Cdb::WriteSame10 {
                lba: 64,
                blocks: 16,
                unmap: false,
            },
        );
        both_ways(
            "93 08 00 00 00 00 00 00 00 40 00 00 00 10 00 00",
            Cdb::WriteSame16 {
                lba: 64,
                blocks: 16,
                unmap: true,
            },
        );
        // sg_compare_and_write --lba=5 --num=1 --fua.
        both_ways(
            "89 08 00 00 00 00 00 00 00 05 00 00 00 01 00 00",
            Cdb::CompareAndWrite {
                lba: 5,
                blocks: 1,
                flags: FUA,
            },
        );
        // sg_unmap: one descriptor, 24 bytes of parameter list.
        both_ways(
            "42 00 00 00 00 00 00 00 18 00",
            Cdb::Unmap {
                anchor: false,
                param_len: 24,
            },
        );
        both_ways(
            "42 01 00 00 00 00 00 01 00 00",
            Cdb::Unmap {
                anchor: true,
                param_len: 256,
            },
        );
        // sg_get_lba_status --lba=0x10000.
        both_ways(
            "9e 12 00 00 00 00 00 01 00 00 00 00 00 18 00 00",
            Cdb::GetLbaStatus {
                lba: 0x10000,
                alloc_len: 24,
            },
        );
        // Bits the parsed form does not hold (WRPROTECT, ANCHOR, NDOB, the
        // group number, CONTROL) are not part of it.
        assert_eq!(
            Cdb::parse(&hex("93 f7 00 00 00 00 00 00 00 40 00 00 00 10 3f 07")),
            Ok(Cdb::WriteSame16 {
                lba: 64,
                blocks: 16,
                unmap: false,
            })
        );
    }

    #[test]
    fn sbc_provisioning_directions_and_lengths() {
        use DataDirection::*;
        let cases = [
            (
                Cdb::Verify10 {
                    lba: 0,
                    blocks: 8,
                    bytchk: 0,
                    dpo: false,
                },
                None,
                0,
            ),
            (
                Cdb::Verify10 {
                    lba: 0,
                    blocks: 8,
                    bytchk: 1,
                    dpo: false,
                },
                ToDevice,
                8 * 512,
            ),
            (
                Cdb::Verify16 {
                    lba: 0,
                    blocks: 8,
                    bytchk: 3,
                    dpo: false,
                },
                ToDevice,
                512,
            ),
            (
                Cdb::WriteSame16 {
                    lba: 0,
                    blocks: 100,
                    unmap: true,
                },
                ToDevice,
                512,
            ),
            (
                Cdb::CompareAndWrite {
                    lba: 0,
                    blocks: 1,
                    flags: NO_FLAGS,
                },
                ToDevice,
                1024,
            ),
            (
                Cdb::Unmap {
                    anchor: false,
                    param_len: 24,
                },
                ToDevice,
                24,
            ),
            (
                Cdb::GetLbaStatus {
                    lba: 0,
                    alloc_len: 32,
                },
                FromDevice,
                32,
            ),
        ];
        for (cdb, dir, len) in cases {
            assert_eq!(cdb.direction(), Some(dir), "{cdb:?}");
            assert_eq!(cdb.transfer_len(512), Some(len), "{cdb:?}");
        }
        assert_eq!(
            Cdb::WriteSame10 {
                lba: 7,
                blocks: 3,
                unmap: false
            }
            .lba_range(),
            Some((7, 3))
        );
        assert_eq!(
            Cdb::CompareAndWrite {
                lba: 9,
                blocks: 1,
                flags: NO_FLAGS
            }
            .lba_range(),
            Some((9, 1))
        );
        assert_eq!(
            Cdb::GetLbaStatus {
                lba: 0,
                alloc_len: 32
            }
            .lba_range(),
            Option::None
        );
    }

    #[test]
    fn vendor_vectors() {
        both_ways(
            "c3 01 00 00 00 2a 00 10 00 00",
            Cdb::Vendor(VendorCdb {
                opcode: Opcode(0xC3),
                flags: 1,
                handle: 42,
                length: 0x1000,
                control: 0,
            }),
        );
        both_ways(
            "ff 80 de ad be ef ff ff ff 04",
            Cdb::Vendor(VendorCdb {
                opcode: Opcode(0xFF),
                flags: 0x80,
                handle: 0xDEAD_BEEF,
                length: VendorCdb::MAX_LENGTH,
                control: 4,
            }),
        );
        both_ways(
            "c0 00 00 00 00 00 01 02 03 00",
            Cdb::Vendor(VendorCdb::new(Opcode(0xC0), 0, 0, 0x01_0203).unwrap()),
        );
    }

    #[test]
    fn vendor_new_checks_range_and_length() {
        let v = VendorCdb::new(Opcode(0xC3), 1, 42, 4096).unwrap();
        assert_eq!(
            v,
            VendorCdb {
                opcode: Opcode(0xC3),
                flags: 1,
                handle: 42,
                length: 4096,
                control: 0,
            }
        );
        assert!(VendorCdb::new(Opcode(0xFF), 0, 0, VendorCdb::MAX_LENGTH).is_ok());
        assert!(matches!(
            VendorCdb::new(Opcode(0xBF), 0, 0, 0),
            Err(CdbError::InvalidField { byte: 0, .. })
        ));
        assert!(matches!(
            VendorCdb::new(Opcode::READ_10, 0, 0, 0),
            Err(CdbError::InvalidField { byte: 0, .. })
        ));
        assert!(matches!(
            VendorCdb::new(Opcode(0xC0), 0, 0, VendorCdb::MAX_LENGTH + 1),
            Err(CdbError::InvalidField { byte: 6, .. })
        ));
    }

    #[test]
    fn reserved_bits_group_and_control_are_ignored() {
        // RDPROTECT bits, group number and CONTROL set on a READ(10).
        let b = hex("28 e8 00 00 00 01 3f 00 02 04");
        assert_eq!(
            Cdb::parse(&b),
            Ok(Cdb::Read10 {
                lba: 1,
                blocks: 2,
                flags: FUA
            })
        );
        // Obsolete CMDDT bit on INQUIRY, NACA in CONTROL.
        let b = hex("12 02 00 00 24 04");
        assert!(matches!(
            Cdb::parse(&b),
            Ok(Cdb::Inquiry {
                evpd: false,
                alloc_len: 36,
                ..
            })
        ));
        // Reserved bits in REPORT LUNS and the PMI/LBA of READ CAPACITY(10).
        let b = hex("a0 ff 00 ff ff ff 00 00 00 10 ff 00");
        assert_eq!(
            Cdb::parse(&b),
            Ok(Cdb::ReportLuns {
                select_report: 0,
                alloc_len: 16
            })
        );
        let b = hex("25 00 00 00 00 10 00 00 01 00");
        assert_eq!(Cdb::parse(&b), Ok(Cdb::ReadCapacity10));
        // Service action bits 7-5 of SERVICE ACTION IN(16) are not part of it.
        let b = hex("9e f0 00 00 00 00 00 00 00 00 00 00 00 20 00 00");
        assert_eq!(Cdb::parse(&b), Ok(Cdb::ReadCapacity16 { alloc_len: 32 }));
    }

    #[test]
    fn longer_buffers_are_accepted() {
        // An sg user passing a 16-byte buffer for a 6-byte INQUIRY.
        let mut b = hex("12 00 00 00 24 00");
        b.resize(16, 0xAA);
        assert_eq!(
            Cdb::parse(&b),
            Ok(Cdb::Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 36
            })
        );
        let b = hex("c3 01 00 00 00 2a 00 10 00 00 ff ff ff ff ff ff");
        let cdb = Cdb::parse(&b).unwrap();
        assert_eq!(cdb.emit().as_slice(), &b[..10]);
    }

    #[test]
    fn empty_is_an_error() {
        let e = Cdb::parse(&[]).unwrap_err();
        assert_eq!(e, CdbError::Empty);
        let s = e.to_sense();
        assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
        assert_eq!(s.asc, Asc::INVALID_COMMAND_OPERATION_CODE);
        assert_eq!(s.field_pointer(), None);
    }

    #[test]
    fn too_short_per_opcode() {
        let needs: [(u8, usize); 16] = [
            (0x00, 6),
            (0x03, 6),
            (0x12, 6),
            (0x1A, 6),
            (0x25, 10),
            (0x28, 10),
            (0x2A, 10),
            (0x35, 10),
            (0x5A, 10),
            (0x88, 16),
            (0x8A, 16),
            (0x91, 16),
            (0x9E, 16),
            (0xA0, 12),
            (0xA3, 12),
            (0xC7, 10),
        ];
        for (op, need) in needs {
            let opcode = Opcode(op);
            assert_eq!(opcode.group_cdb_len(), need, "{opcode}");
            let mut full = vec![0u8; need];
            full[0] = op;
            // Make the service actions valid so only the length is wrong.
            if op == 0x9E {
                full[1] = 0x10;
            }
            if op == 0xA3 {
                full[1] = 0x0C;
            }
            let cdb = Cdb::parse(&full).unwrap_or_else(|e| panic!("{opcode}: {e}"));
            assert_eq!(cdb.opcode(), opcode);
            assert_eq!(cdb.emit().as_slice(), &full[..]);
            for got in [1, need - 1] {
                let e = Cdb::parse(&full[..got]).unwrap_err();
                assert_eq!(e, CdbError::TooShort { opcode, got, need });
                let s = e.to_sense();
                assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
                assert_eq!(s.asc, Asc::INVALID_FIELD_IN_CDB);
            }
        }
    }

    #[test]
    fn unsupported_opcodes() {
        for op in [0x7B, 0x08, 0x0A, 0x15, 0x55, 0x7F, 0x8C, 0xA1, 0xBF] {
            let e = Cdb::parse(&[op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
            assert_eq!(e, CdbError::UnsupportedOpcode(Opcode(op)));
            let s = e.to_sense();
            assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
            assert_eq!(s.asc, Asc::INVALID_COMMAND_OPERATION_CODE);
            assert_eq!(s.field_pointer(), None);
        }
        // The opcode decides, even with a single byte.
        assert_eq!(
            Cdb::parse(&[0x7B]),
            Err(CdbError::UnsupportedOpcode(Opcode(0x7B)))
        );
    }

    #[test]
    fn inquiry_page_without_evpd_is_rejected() {
        let e = Cdb::parse(&hex("12 00 83 00 fc 00")).unwrap_err();
        assert!(matches!(
            e,
            CdbError::InvalidField {
                byte: 2,
                bit: None,
                ..
            }
        ));
        let s = e.to_sense();
        assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
        assert_eq!(s.asc, Asc::INVALID_FIELD_IN_CDB);
        assert_eq!(
            s.field_pointer(),
            Some(FieldPointer {
                in_cdb: true,
                bit: None,
                byte: 2
            })
        );
        assert_eq!(
            e.to_string(),
            "invalid field in CDB byte 2: INQUIRY with EVPD=0 must have page code 0"
        );
    }

    #[test]
    fn unsupported_service_actions() {
        // SERVICE ACTION IN(16) / REPORT REFERRALS.
        let e = Cdb::parse(&hex("9e 13 00 00 00 00 00 00 00 00 00 00 00 20 00 00")).unwrap_err();
        assert_eq!(
            e,
            CdbError::UnsupportedServiceAction {
                opcode: Opcode::SERVICE_ACTION_IN_16,
                service_action: 0x13
            }
        );
        let s = e.to_sense();
        assert_eq!(s.key, SenseKey::ILLEGAL_REQUEST);
        assert_eq!(s.asc, Asc::INVALID_FIELD_IN_CDB);
        assert_eq!(
            s.field_pointer(),
            Some(FieldPointer {
                in_cdb: true,
                bit: Some(4),
                byte: 1
            })
        );
        // MAINTENANCE IN / REPORT IDENTIFYING INFORMATION.
        let e = Cdb::parse(&hex("a3 05 00 00 00 00 00 00 10 00 00 00")).unwrap_err();
        assert_eq!(
            e,
            CdbError::UnsupportedServiceAction {
                opcode: Opcode::MAINTENANCE_IN,
                service_action: 0x05
            }
        );
        assert_eq!(
            e.to_string(),
            "MAINTENANCE IN (0xA3): unsupported service action 0x05"
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(CdbError::Empty.to_string(), "empty CDB: no operation code");
        assert_eq!(
            Cdb::parse(&[0x28, 0, 0]).unwrap_err().to_string(),
            "READ(10) (0x28) CDB too short: 3 bytes, need 10"
        );
        assert_eq!(
            Cdb::parse(&[0x7B]).unwrap_err().to_string(),
            "unsupported command: opcode 0x7B"
        );
        let e = CdbError::InvalidField {
            byte: 1,
            bit: Some(3),
            reason: "x",
        };
        assert_eq!(e.to_string(), "invalid field in CDB byte 1 bit 3: x");
        let s = e.to_sense();
        assert_eq!(
            s.field_pointer(),
            Some(FieldPointer {
                in_cdb: true,
                bit: Some(3),
                byte: 1
            })
        );
    }

    #[test]
    fn direction_transfer_len_and_range() {
        use DataDirection::{FromDevice, None as NoData, ToDevice};
        let read = Cdb::Read10 {
            lba: 100,
            blocks: 8,
            flags: FUA,
        };
        assert_eq!(read.direction(), Some(FromDevice));
        assert_eq!(read.transfer_len(512), Some(4096));
        assert_eq!(read.lba_range(), Some((100, 8)));

        let write = Cdb::Write16 {
            lba: u64::MAX - 1,
            blocks: u32::MAX,
            flags: NO_FLAGS,
        };
        assert_eq!(write.direction(), Some(ToDevice));
        assert_eq!(write.transfer_len(4096), Some(u64::from(u32::MAX) * 4096));
        assert_eq!(write.lba_range(), Some((u64::MAX - 1, u64::from(u32::MAX))));

        let w10 = Cdb::Write10 {
            lba: 7,
            blocks: 3,
            flags: NO_FLAGS,
        };
        assert_eq!(w10.direction(), Some(ToDevice));
        assert_eq!(w10.transfer_len(520), Some(1560));
        let r16 = Cdb::Read16 {
            lba: 9,
            blocks: 2,
            flags: NO_FLAGS,
        };
        assert_eq!(r16.transfer_len(4096), Some(8192));
        assert_eq!(r16.lba_range(), Some((9, 2)));

        let sync = Cdb::SynchronizeCache10 {
            lba: 5,
            blocks: 0,
            immed: true,
        };
        assert_eq!(sync.direction(), Some(NoData));
        assert_eq!(sync.transfer_len(512), Some(0));
        assert_eq!(sync.lba_range(), Some((5, 0)));
        let sync16 = Cdb::SynchronizeCache16 {
            lba: 1 << 40,
            blocks: 9,
            immed: false,
        };
        assert_eq!(sync16.lba_range(), Some((1 << 40, 9)));

        assert_eq!(Cdb::TestUnitReady.direction(), Some(NoData));
        assert_eq!(Cdb::TestUnitReady.transfer_len(512), Some(0));
        assert_eq!(Cdb::TestUnitReady.lba_range(), None);

        let data_in: [(Cdb, u64); 8] = [
            (
                Cdb::RequestSense {
                    desc: false,
                    alloc_len: 18,
                },
                18,
            ),
            (
                Cdb::Inquiry {
                    evpd: true,
                    page_code: 0x83,
                    alloc_len: 0x1FC,
                },
                0x1FC,
            ),
            (
                Cdb::ModeSense6 {
                    dbd: true,
                    page_control: PageControl::CURRENT,
                    page_code: 8,
                    subpage: 0,
                    alloc_len: 255,
                },
                255,
            ),
            (
                Cdb::ModeSense10 {
                    llbaa: false,
                    dbd: false,
                    page_control: PageControl::CURRENT,
                    page_code: 0x3F,
                    subpage: 0,
                    alloc_len: 0x1234,
                },
                0x1234,
            ),
            (Cdb::ReadCapacity10, 8),
            (Cdb::ReadCapacity16 { alloc_len: 32 }, 32),
            (
                Cdb::ReportLuns {
                    select_report: 0,
                    alloc_len: 0x12_3456,
                },
                0x12_3456,
            ),
            (
                Cdb::ReportSupportedOpcodes {
                    rctd: false,
                    reporting_options: 0,
                    opcode: 0,
                    service_action: 0,
                    alloc_len: 0x8000,
                },
                0x8000,
            ),
        ];
        for (cdb, len) in data_in {
            assert_eq!(cdb.direction(), Some(FromDevice), "{cdb:?}");
            // The block size only matters for READ and WRITE.
            assert_eq!(cdb.transfer_len(4096), Some(len), "{cdb:?}");
            assert_eq!(cdb.lba_range(), None, "{cdb:?}");
        }

        let vendor = Cdb::from(VendorCdb::new(Opcode(0xC3), 0, 1, 512).unwrap());
        assert_eq!(vendor.direction(), None);
        assert_eq!(vendor.transfer_len(512), None);
        assert_eq!(vendor.lba_range(), None);
        assert_eq!(vendor.opcode(), Opcode(0xC3));
    }

    #[test]
    fn persistent_reserve_literal_bytes() {
        let out = Cdb::PersistentReserveOut {
            service_action: 1,
            scope: 0,
            pr_type: 5,
            param_len: 24,
        };
        assert_eq!(out.emit().as_slice(), &[0x5F, 1, 5, 0, 0, 0, 0, 0, 24, 0]);
        assert_eq!(out.direction(), Some(DataDirection::ToDevice));
        assert_eq!(out.transfer_len(512), Some(24));
        let inn = Cdb::PersistentReserveIn {
            service_action: 0,
            alloc_len: 0x1234,
        };
        assert_eq!(
            inn.emit().as_slice(),
            &[0x5E, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0]
        );
        assert_eq!(
            Cdb::parse(&[0x5F, 0xE3, 0x16, 9, 9, 0, 0, 1, 0, 0]),
            Ok(Cdb::PersistentReserveOut {
                service_action: 3,
                scope: 1,
                pr_type: 6,
                param_len: 256,
            })
        );
    }

    #[test]
    fn emit_masks_overwide_fields() {
        let cdb = Cdb::ModeSense6 {
            dbd: false,
            page_control: PageControl(7),
            page_code: 0xC8,
            subpage: 0,
            alloc_len: 0,
        };
        assert_eq!(cdb.emit().as_slice(), &hex("1a 00 c8 00 00 00")[..]);
        let cdb = Cdb::Vendor(VendorCdb {
            opcode: Opcode(0xC1),
            flags: 0,
            handle: 0,
            length: 0x0123_4567,
            control: 0,
        });
        assert_eq!(
            cdb.emit().as_slice(),
            &hex("c1 00 00 00 00 00 23 45 67 00")[..]
        );
    }

    #[test]
    fn display_is_emitted_hex() {
        let cdb = Cdb::Read10 {
            lba: 0x1234_5678,
            blocks: 8,
            flags: FUA,
        };
        assert_eq!(cdb.to_string(), "28 08 12 34 56 78 00 00 08 00");
    }

    #[test]
    fn wire_layouts_read_and_write_in_place() {
        let bytes = hex("28 08 12 34 56 78 06 00 08 00");
        let w = wire::ReadWrite10::ref_from_bytes(&bytes[..]).unwrap();
        assert_eq!(w.lba.get(), 0x1234_5678);
        assert_eq!(w.group, 6);
        assert_eq!(w.blocks.get(), 8);
        assert_eq!(w.flags, wire::FUA);
        let mut w = *w;
        w.blocks = 0x0102.into();
        assert_eq!(w.as_bytes(), &hex("28 08 12 34 56 78 06 01 02 00")[..]);
    }

    fn any_rw_flags() -> impl Strategy<Value = RwFlags> {
        any::<(bool, bool)>().prop_map(|(fua, dpo)| RwFlags { fua, dpo })
    }

    fn any_page_control() -> impl Strategy<Value = PageControl> {
        (0u8..=3).prop_map(PageControl)
    }

    fn any_cdb() -> impl Strategy<Value = Cdb> {
        prop_oneof![
            Just(Cdb::TestUnitReady),
            any::<(bool, u8)>().prop_map(|(desc, alloc_len)| Cdb::RequestSense { desc, alloc_len }),
            any::<(bool, u8, u16)>().prop_map(|(evpd, page_code, alloc_len)| Cdb::Inquiry {
                evpd,
                page_code: if evpd { page_code } else { 0 },
                alloc_len,
            }),
            (
                any::<bool>(),
                any_page_control(),
                0u8..=0x3F,
                any::<(u8, u8)>()
            )
                .prop_map(|(dbd, page_control, page_code, (subpage, alloc_len))| {
                    Cdb::ModeSense6 {
                        dbd,
                        page_control,
                        page_code,
                        subpage,
                        alloc_len,
                    }
                }),
            (
                any::<(bool, bool)>(),
                any_page_control(),
                0u8..=0x3F,
                any::<(u8, u16)>()
            )
                .prop_map(
                    |((llbaa, dbd), page_control, page_code, (subpage, alloc_len))| {
                        Cdb::ModeSense10 {
                            llbaa,
                            dbd,
                            page_control,
                            page_code,
                            subpage,
                            alloc_len,
                        }
                    }
                ),
            Just(Cdb::ReadCapacity10),
            any::<u32>().prop_map(|alloc_len| Cdb::ReadCapacity16 { alloc_len }),
            (any::<(u32, u16)>(), any_rw_flags()).prop_map(|((lba, blocks), flags)| Cdb::Read10 {
                lba,
                blocks,
                flags
            }),
            (any::<(u64, u32)>(), any_rw_flags()).prop_map(|((lba, blocks), flags)| Cdb::Read16 {
                lba,
                blocks,
                flags
            }),
            (any::<(u32, u16)>(), any_rw_flags()).prop_map(|((lba, blocks), flags)| Cdb::Write10 {
                lba,
                blocks,
                flags
            }),
            (any::<(u64, u32)>(), any_rw_flags()).prop_map(|((lba, blocks), flags)| Cdb::Write16 {
                lba,
                blocks,
                flags
            }),
            any::<(u32, u16, bool)>().prop_map(|(lba, blocks, immed)| {
                Cdb::SynchronizeCache10 { lba, blocks, immed }
            }),
            (any::<(u32, u16, bool)>(), 0u8..=3).prop_map(|((lba, blocks, dpo), bytchk)| {
                Cdb::Verify10 {
                    lba,
                    blocks,
                    bytchk,
                    dpo,
                }
            }),
            (any::<(u64, u32, bool)>(), 0u8..=3).prop_map(|((lba, blocks, dpo), bytchk)| {
                Cdb::Verify16 {
                    lba,
                    blocks,
                    bytchk,
                    dpo,
                }
            }),
            any::<(u32, u16, bool)>().prop_map(|(lba, blocks, unmap)| Cdb::WriteSame10 {
                lba,
                blocks,
                unmap
            }),
            any::<(u64, u32, bool)>().prop_map(|(lba, blocks, unmap)| Cdb::WriteSame16 {
                lba,
                blocks,
                unmap
            }),
            (any::<(u64, u8)>(), any_rw_flags())
                .prop_map(|((lba, blocks), flags)| { Cdb::CompareAndWrite { lba, blocks, flags } }),
            any::<(bool, u16)>().prop_map(|(anchor, param_len)| Cdb::Unmap { anchor, param_len }),
            any::<(u64, u32)>().prop_map(|(lba, alloc_len)| Cdb::GetLbaStatus { lba, alloc_len }),
            any::<(u64, u32, bool)>().prop_map(|(lba, blocks, immed)| {
                Cdb::SynchronizeCache16 { lba, blocks, immed }
            }),
            any::<(u8, u32)>().prop_map(|(select_report, alloc_len)| Cdb::ReportLuns {
                select_report,
                alloc_len,
            }),
            (any::<bool>(), 0u8..=7, any::<(u8, u16, u32)>()).prop_map(
                |(rctd, reporting_options, (opcode, service_action, alloc_len))| {
                    Cdb::ReportSupportedOpcodes {
                        rctd,
                        reporting_options,
                        opcode,
                        service_action,
                        alloc_len,
                    }
                }
            ),
            any::<(bool, u32)>().prop_map(|(extended, alloc_len)| {
                Cdb::ReportTargetPortGroups {
                    extended,
                    alloc_len,
                }
            }),
            (0u8..=0x1F, any::<u16>()).prop_map(|(service_action, alloc_len)| {
                Cdb::PersistentReserveIn {
                    service_action,
                    alloc_len,
                }
            }),
            (0u8..=0x1F, 0u8..=0x0F, 0u8..=0x0F, any::<u32>()).prop_map(
                |(service_action, scope, pr_type, param_len)| Cdb::PersistentReserveOut {
                    service_action,
                    scope,
                    pr_type,
                    param_len,
                }
            ),
            (
                0xC0u8..=0xFF,
                any::<(u8, u32, u8)>(),
                0..=VendorCdb::MAX_LENGTH
            )
                .prop_map(|(op, (flags, handle, control), length)| Cdb::Vendor(
                    VendorCdb {
                        opcode: Opcode(op),
                        flags,
                        handle,
                        length,
                        control,
                    }
                )),
        ]
    }

    /// 0 to 31 arbitrary bytes; half the time the first is an opcode this
    /// module parses, so the `Ok` and field-check paths are exercised too.
    fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
        const KNOWN: [u8; 22] = [
            0x00, 0x03, 0x12, 0x1A, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x41, 0x42, 0x5A, 0x88, 0x89,
            0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA3, 0xC5,
        ];
        let any_vec = proptest::collection::vec(any::<u8>(), 0..32);
        prop_oneof![
            any_vec.clone(),
            (
                proptest::sample::select(&KNOWN[..]),
                proptest::collection::vec(any::<u8>(), 0..31)
            )
                .prop_map(|(op, mut rest)| {
                    rest.insert(0, op);
                    rest
                }),
        ]
    }

    proptest! {
        #[test]
        fn emit_then_parse_round_trips(cdb in any_cdb()) {
            let emitted = cdb.emit();
            prop_assert_eq!(emitted.as_slice().len(), cdb.opcode().group_cdb_len());
            prop_assert_eq!(emitted.opcode(), cdb.opcode());
            prop_assert_eq!(Cdb::parse(emitted.as_slice()), Ok(cdb));
        }

        #[test]
        fn parse_never_panics(bytes in any_bytes()) {
            match Cdb::parse(&bytes) {
                Ok(cdb) => {
                    // What parses re-emits to something that parses the same,
                    // and the parse only looked at the layout's bytes.
                    let emitted = cdb.emit();
                    let n = emitted.as_slice().len();
                    prop_assert!(n <= bytes.len());
                    prop_assert_eq!(Cdb::parse(emitted.as_slice()), Ok(cdb));
                    prop_assert_eq!(Cdb::parse(&bytes[..n]), Ok(cdb));
                }
                Err(CdbError::TooShort { got, need, .. }) => {
                    prop_assert_eq!(got, bytes.len());
                    prop_assert!(need > got);
                }
                Err(e) => {
                    // Every error maps to ILLEGAL REQUEST sense.
                    prop_assert_eq!(e.to_sense().key, SenseKey::ILLEGAL_REQUEST);
                }
            }
        }
    }
}
