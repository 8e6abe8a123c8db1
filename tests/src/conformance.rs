//! SBC/SPC conformance cases run against the simulated array and against
//! LIO's own backstores, with what each answers.
//!
//! [`sbc_spc_cases`] runs one list of cases on a path: CDB fields the model
//! does not support (RDPROTECT/WRPROTECT/VRPROTECT, NACA and LINK, the
//! group number), INQUIRY's version descriptors, the Block Limits and
//! Logical Block Provisioning VPD pages, REPORT SUPPORTED OPERATION CODES
//! with RCTD, VERIFY(10/16), WRITE SAME(10/16), COMPARE AND WRITE, UNMAP
//! and GET LBA STATUS. Each case compares status, sense key / ASC / ASCQ,
//! the INFORMATION field where the standard sets it, the field pointer
//! (always on the model; on LIO wherever it sets one, which it never does
//! today) and data, read back or parsed.
//!
//! Every case has one expected answer. Where LIO answers otherwise (its
//! VERIFY is a no-op, it ignores the CONTROL byte, it has no GET LBA
//! STATUS, the ramdisk has no WRITE SAME or UNMAP, Linux 6.1 has no REPORT
//! SUPPORTED OPERATION CODES) the case carries LIO's answer too, with the
//! reason; the run prints every such difference it met, so the log says
//! where the model and LIO part and why. docs/ARRAYS.md keeps the same
//! list.

use scsi::cdb::{Cdb, RwFlags};
use scsi::inquiry::{version_descriptor, VpdPage};
use scsi::provisioning::{
    LbaStatus, LogicalBlockProvisioning, ProvisioningStatus, UnmapDescriptor, UnmapList,
};
use scsi::sense::FieldPointer;
use scsi::supported::{AllCommands, OneCommand, Timeouts};
use scsi::{Asc, CdbBuf, Command, Completion, IoBuf, Opcode, ScsiStatus, SenseKey, Transport};

use crate::{capacity, dpofua, drain_unit_attentions, Check};

/// What answers on the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The simulated array: in-process, or the `stp-target` daemon behind
    /// LIO (which passes these commands through to it unchanged).
    Model,
    /// LIO's ramdisk backstore (rd_mcp).
    LioRamdisk,
    /// LIO's fileio backstore on a file, with `emulate_tpu`,
    /// `emulate_tpws` and `unmap_zeroes_data` set (as `stg-up` makes it).
    LioFileio,
}

/// A path's device, as the cases need to know it.
#[derive(Clone, Debug)]
pub struct Subject {
    /// What answers.
    pub target: Target,
    /// The target kernel's (major, minor), for LIO's answers.
    pub kernel: Option<(u32, u32)>,
    /// Logical blocks.
    pub blocks: u64,
    /// Logical block size.
    pub block_size: u32,
    /// READ CAPACITY(16) LBPME: thin provisioned.
    pub thin: bool,
    /// MODE SENSE DPOFUA.
    pub dpofua: bool,
    /// Block Limits: MAXIMUM WRITE SAME LENGTH.
    pub max_write_same: u64,
    /// Block Limits: MAXIMUM UNMAP LBA COUNT.
    pub max_unmap_blocks: u32,
    /// Block Limits: MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
    pub max_unmap_descriptors: u32,
    /// Block Limits: OPTIMAL UNMAP GRANULARITY.
    pub unmap_granularity: u32,
}

impl Subject {
    /// Asks the device what the cases need: capacity, provisioning, DPOFUA,
    /// Block Limits. `kernel` is the target kernel for LIO's answers
    /// ([`running_kernel`] in the test VM).
    pub fn probe(
        t: &mut dyn Transport,
        target: Target,
        kernel: Option<(u32, u32)>,
    ) -> Result<Subject, String> {
        drain_unit_attentions(t)?;
        let (blocks, block_size) = capacity(t)?;
        let (rc, _) = run(
            t,
            Cdb::ReadCapacity16 { alloc_len: 32 }.emit(),
            Data::In(32),
        )
        .into_result()
        .map_err(|e| format!("READ CAPACITY(16): {e}"))?;
        let thin = rc.get(14).is_some_and(|b| b & 0x80 != 0);
        let limits = match scsi::inquiry::vpd(t, VpdPage::BLOCK_LIMITS) {
            Ok(VpdPage::BlockLimits(l)) => l,
            other => return Err(format!("VPD page 0xB0: {other:?}")),
        };
        Ok(Subject {
            target,
            kernel,
            blocks,
            block_size,
            thin,
            dpofua: dpofua(t)?,
            max_write_same: limits.max_write_same_length,
            max_unmap_blocks: limits.max_unmap_lba_count,
            max_unmap_descriptors: limits.max_unmap_descriptor_count,
            unmap_granularity: limits.optimal_unmap_granularity,
        })
    }

    fn lio(&self) -> bool {
        self.target != Target::Model
    }

    /// LIO emulates REPORT SUPPORTED OPERATION CODES from Linux 6.3 on
    /// (6.1 refuses it as an unknown command).
    fn lio_has_rsoc(&self) -> bool {
        self.kernel.is_some_and(|k| k >= (6, 3))
    }

    fn bs(&self) -> usize {
        self.block_size as usize
    }

    /// The first block of the region the cases write: 4096 blocks near the
    /// end of the LUN, away from what other tests use, aligned to 256
    /// blocks (whole chunks of the model's thin provisioning).
    fn base(&self) -> u64 {
        (self.blocks.saturating_sub(8192)) & !255
    }
}

/// The target kernel's (major, minor) from `/proc/sys/kernel/osrelease`.
pub fn running_kernel() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// A data phase.
enum Data<'a> {
    None,
    In(usize),
    Out(&'a [u8]),
}

fn run(t: &mut dyn Transport, cdb: CdbBuf, data: Data<'_>) -> Completion {
    t.execute(match data {
        Data::None => Command::no_data(cdb),
        Data::In(n) => Command::data_in(cdb, n),
        Data::Out(d) => Command::data_out(cdb, IoBuf::from_slice(d)),
    })
}

fn raw(bytes: &[u8]) -> CdbBuf {
    CdbBuf::new(bytes).unwrap_or_else(|| panic!("a CDB of {} bytes", bytes.len()))
}

/// What a command ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    status: ScsiStatus,
    key: Option<SenseKey>,
    asc: Option<Asc>,
    pointer: Option<FieldPointer>,
    information: Option<u64>,
    data: Vec<u8>,
}

fn got(c: Completion) -> Result<Got, String> {
    let len = c.data.len();
    let o = c.result.map_err(|e| format!("the transport failed: {e}"))?;
    let sense = match o.decoded_sense() {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => return Err(format!("undecodable sense {:02x?}: {e}", o.sense)),
        None => None,
    };
    let moved = len.saturating_sub(o.residual as usize);
    Ok(Got {
        status: o.status,
        key: sense.as_ref().map(|s| s.key),
        asc: sense.as_ref().map(|s| s.asc),
        pointer: sense.as_ref().and_then(|s| s.field_pointer()),
        information: sense.as_ref().and_then(|s| s.information),
        data: c.data[..moved.min(c.data.len())].to_vec(),
    })
}

/// An expected answer.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Expect {
    /// `None`: GOOD; else CHECK CONDITION with this key and ASC/ASCQ.
    check: Option<(SenseKey, Asc)>,
    /// The field pointer the standard asks for: the model must give it (or
    /// none, when `None`); LIO, wherever it gives one.
    pointer: Option<FieldPointer>,
    /// The INFORMATION field, where the standard sets it.
    information: Option<u64>,
}

fn good() -> Expect {
    Expect {
        check: None,
        pointer: None,
        information: None,
    }
}

fn check(key: SenseKey, asc: Asc) -> Expect {
    Expect {
        check: Some((key, asc)),
        pointer: None,
        information: None,
    }
}

fn illegal(asc: Asc) -> Expect {
    check(SenseKey::ILLEGAL_REQUEST, asc)
}

/// INVALID FIELD IN CDB at `byte`, `bit`.
fn field(byte: u16, bit: u8) -> Expect {
    Expect {
        pointer: Some(FieldPointer {
            in_cdb: true,
            bit: Some(bit),
            byte,
        }),
        ..illegal(Asc::INVALID_FIELD_IN_CDB)
    }
}

/// INVALID FIELD IN PARAMETER LIST at `byte`, `bit` of the list.
fn param(byte: u16, bit: u8) -> Expect {
    Expect {
        pointer: Some(FieldPointer {
            in_cdb: false,
            bit: Some(bit),
            byte,
        }),
        ..illegal(Asc::INVALID_FIELD_IN_PARAMETER_LIST)
    }
}

fn miscompare(offset: u64) -> Expect {
    Expect {
        information: Some(offset),
        ..check(SenseKey::MISCOMPARE, Asc::MISCOMPARE_DURING_VERIFY)
    }
}

fn out_of_range() -> Expect {
    illegal(Asc::LBA_OUT_OF_RANGE)
}

fn bad_opcode() -> Expect {
    illegal(Asc::INVALID_COMMAND_OPERATION_CODE)
}

/// The answer a case expects on `s`: the model's, or LIO's with the reason
/// it differs.
struct Answer {
    expect: Expect,
    /// Why LIO answers otherwise than the model, when it does.
    lio_differs: Option<&'static str>,
}

/// The same answer from the model and LIO.
fn same(e: Expect) -> Answer {
    Answer {
        expect: e,
        lio_differs: None,
    }
}

/// `model` from the model; on LIO `lio`, for the reason `why`.
fn differs(s: &Subject, model: Expect, lio: Expect, why: &'static str) -> Answer {
    if s.lio() {
        Answer {
            expect: lio,
            lio_differs: Some(why),
        }
    } else {
        Answer {
            expect: model,
            lio_differs: None,
        }
    }
}

/// Compares what a command ended with to what the case expects.
fn compare(s: &Subject, g: &Got, e: &Expect) -> Result<(), String> {
    let want_status = if e.check.is_some() {
        ScsiStatus::CHECK_CONDITION
    } else {
        ScsiStatus::GOOD
    };
    if g.status != want_status {
        return Err(format!(
            "status {:?} (sense {:?} {:?}), want {want_status:?} {:?}",
            g.status, g.key, g.asc, e.check
        ));
    }
    if let Some((key, asc)) = e.check {
        if g.key != Some(key) || g.asc != Some(asc) {
            return Err(format!(
                "sense {:?} {:?}, want {key:?} {asc:?}",
                g.key, g.asc
            ));
        }
    }
    // The model always says where; LIO, where it says anything.
    if (!s.lio() || g.pointer.is_some()) && g.pointer != e.pointer {
        return Err(format!(
            "field pointer {:?}, want {:?}",
            g.pointer, e.pointer
        ));
    }
    if e.information.is_some() && g.information != e.information {
        return Err(format!(
            "INFORMATION {:?}, want {:?}",
            g.information, e.information
        ));
    }
    Ok(())
}

/// A pattern block for case `n`, block `i`.
fn pattern(n: u8, i: u64, bs: usize) -> Vec<u8> {
    (0..bs)
        .map(|j| (j as u64).wrapping_mul(13) as u8 ^ n.wrapping_mul(29) ^ (i as u8).wrapping_mul(7))
        .collect()
}

fn write(t: &mut dyn Transport, lba: u64, data: &[u8], bs: usize) -> Check {
    let blocks = (data.len() / bs) as u32;
    let cdb = Cdb::Write16 {
        lba,
        blocks,
        flags: RwFlags::default(),
    };
    run(t, cdb.emit(), Data::Out(data))
        .into_result()
        .map(|_| ())
        .map_err(|e| format!("WRITE(16) of {blocks} blocks at {lba}: {e}"))
}

fn read(t: &mut dyn Transport, lba: u64, blocks: u32, bs: usize) -> Result<Vec<u8>, String> {
    let cdb = Cdb::Read16 {
        lba,
        blocks,
        flags: RwFlags::default(),
    };
    run(t, cdb.emit(), Data::In(blocks as usize * bs))
        .into_result()
        .map(|(d, _)| d.to_vec())
        .map_err(|e| format!("READ(16) of {blocks} blocks at {lba}: {e}"))
}

fn lba10(lba: u64) -> [u8; 4] {
    (lba as u32).to_be_bytes()
}

/// A 10-byte CDB: `op`, byte 1, LBA, group, 16-bit count, CONTROL.
fn cdb10(op: u8, b1: u8, lba: u64, group: u8, count: u16, control: u8) -> CdbBuf {
    let l = lba10(lba);
    let c = count.to_be_bytes();
    raw(&[op, b1, l[0], l[1], l[2], l[3], group, c[0], c[1], control])
}

/// A 16-byte CDB: `op`, byte 1, LBA, 32-bit count, group, CONTROL.
fn cdb16(op: u8, b1: u8, lba: u64, count: u32, group: u8, control: u8) -> CdbBuf {
    let mut b = [0u8; 16];
    b[0] = op;
    b[1] = b1;
    b[2..10].copy_from_slice(&lba.to_be_bytes());
    b[10..14].copy_from_slice(&count.to_be_bytes());
    b[14] = group;
    b[15] = control;
    raw(&b)
}

/// COMPARE AND WRITE of `blocks` at `lba`, byte 1 `b1`.
fn caw(lba: u64, blocks: u8, b1: u8) -> CdbBuf {
    let mut b = [0u8; 16];
    b[0] = Opcode::COMPARE_AND_WRITE.0;
    b[1] = b1;
    b[2..10].copy_from_slice(&lba.to_be_bytes());
    b[13] = blocks;
    raw(&b)
}

fn unmap_cdb(b1: u8, param_len: u16) -> CdbBuf {
    let l = param_len.to_be_bytes();
    raw(&[Opcode::UNMAP.0, b1, 0, 0, 0, 0, 0, l[0], l[1], 0])
}

fn rsoc(options: u8, opcode: u8, sa: u16, alloc: u32) -> CdbBuf {
    let a = alloc.to_be_bytes();
    let s = sa.to_be_bytes();
    raw(&[
        0xA3, 0x0C, options, opcode, s[0], s[1], a[0], a[1], a[2], a[3], 0, 0,
    ])
}

/// Runs a case's command under test; on GOOD also checks its effect (data
/// read back or parsed) and fails with what differs.
type Runner = Box<dyn Fn(&mut dyn Transport, &Subject) -> Result<Got, String>>;

/// One case: a name, the command (and the reads that check its effect),
/// the answer expected.
struct Case {
    name: &'static str,
    answer: Answer,
    run: Runner,
}

fn case(
    name: &'static str,
    answer: Answer,
    run: impl Fn(&mut dyn Transport, &Subject) -> Result<Got, String> + 'static,
) -> Case {
    Case {
        name,
        answer,
        run: Box::new(run),
    }
}

/// Runs every case on `t` and reports all that fail, each with what was
/// expected and why LIO differs where it does; prints every difference
/// from the model it met on LIO.
pub fn sbc_spc_cases(t: &mut dyn Transport, s: &Subject) -> Check {
    let mut failures = Vec::new();
    for c in cases(s) {
        if let Some(why) = c.answer.lio_differs {
            eprintln!("  {:?} differs from the model: {}: {why}", s.target, c.name);
        }
        let result = (c.run)(t, s).and_then(|g| {
            compare(s, &g, &c.answer.expect)?;
            Ok(g)
        });
        if let Err(e) = result {
            let note = c
                .answer
                .lio_differs
                .map(|w| format!(" (LIO's answer, expected because {w})"))
                .unwrap_or_default();
            failures.push(format!("{}: {e}{note}", c.name));
        }
        // A case that failed badly may leave a unit attention or a
        // half-done state: the next one starts clean.
        let _ = drain_unit_attentions(t);
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{:?} ({} blocks of {}, thin {}, kernel {:?}): {} of the cases failed:\n  {}",
            s.target,
            s.blocks,
            s.block_size,
            s.thin,
            s.kernel,
            failures.len(),
            failures.join("\n  ")
        ))
    }
}

/// Fails with `what` unless `ok`.
fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn cases(s: &Subject) -> Vec<Case> {
    let mut v = Vec::new();
    field_cases(s, &mut v);
    inquiry_cases(s, &mut v);
    rsoc_cases(s, &mut v);
    verify_cases(s, &mut v);
    write_same_cases(s, &mut v);
    compare_and_write_cases(s, &mut v);
    unmap_cases(s, &mut v);
    lba_status_cases(s, &mut v);
    v
}

/// CDB fields the model does not support.
fn field_cases(s: &Subject, v: &mut Vec<Case>) {
    const IGNORED_CONTROL: &str = "LIO never looks at the CONTROL byte (its own usage data \
                                   masks it to 0, but its parser does not refuse NACA or LINK)";
    const IGNORED_GROUP: &str = "LIO ignores the GROUP NUMBER (its usage data masks it to 0)";
    let base = s.base();
    // RDPROTECT / WRPROTECT on a LUN without protection information: both
    // refuse, LIO in sbc_check_prot.
    v.push(case(
        "READ(10) with RDPROTECT 001b",
        same(field(1, 7)),
        move |t, s| got(run(t, cdb10(0x28, 0x20, base, 0, 1, 0), Data::In(s.bs()))),
    ));
    v.push(case(
        "READ(16) with RDPROTECT 111b",
        same(field(1, 7)),
        move |t, s| got(run(t, cdb16(0x88, 0xE0, base, 1, 0, 0), Data::In(s.bs()))),
    ));
    v.push(case(
        "WRITE(10) with WRPROTECT 001b",
        same(field(1, 7)),
        move |t, s| {
            let d = vec![0x5A; s.bs()];
            got(run(t, cdb10(0x2A, 0x20, base, 0, 1, 0), Data::Out(&d)))
        },
    ));
    v.push(case(
        "WRITE(16) with WRPROTECT 100b",
        same(field(1, 7)),
        move |t, s| {
            let d = vec![0x5A; s.bs()];
            got(run(t, cdb16(0x8A, 0x80, base, 1, 0, 0), Data::Out(&d)))
        },
    ));
    v.push(case(
        "TEST UNIT READY with NACA",
        differs(s, field(5, 2), good(), IGNORED_CONTROL),
        |t, _| got(run(t, raw(&[0, 0, 0, 0, 0, 0x04]), Data::None)),
    ));
    v.push(case(
        "READ(10) with LINK",
        differs(s, field(9, 0), good(), IGNORED_CONTROL),
        move |t, s| got(run(t, cdb10(0x28, 0, base, 0, 1, 0x01), Data::In(s.bs()))),
    ));
    v.push(case(
        "READ(16) with NACA",
        differs(s, field(15, 2), good(), IGNORED_CONTROL),
        move |t, s| got(run(t, cdb16(0x88, 0, base, 1, 0, 0x04), Data::In(s.bs()))),
    ));
    v.push(case(
        "READ(16) with GROUP NUMBER 1",
        differs(s, field(14, 5), good(), IGNORED_GROUP),
        move |t, s| got(run(t, cdb16(0x88, 0, base, 1, 0x01, 0), Data::In(s.bs()))),
    ));
    // As SBC-2 asks and LIO does.
    v.push(case(
        "READ CAPACITY(10) with an LBA and PMI 0",
        same(field(2, 7)),
        |t, _| got(run(t, raw(&[0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0]), Data::In(8))),
    ));
}

/// Standard INQUIRY's version descriptors, the Block Limits and Logical
/// Block Provisioning pages, READ CAPACITY(16)'s provisioning bits.
fn inquiry_cases(_s: &Subject, v: &mut Vec<Case>) {
    v.push(case(
        "standard INQUIRY claims SPC-4 and SBC-3",
        same(good()),
        |t, s| {
            let g = got(run(t, raw(&[0x12, 0, 0, 0, 96, 0]), Data::In(96)))?;
            if g.status != ScsiStatus::GOOD {
                return Ok(g);
            }
            let inq = scsi::inquiry::StandardInquiry::parse(&g.data).map_err(|e| e.to_string())?;
            ensure(g.data.len() == 96 && g.data[4] == 91, || {
                format!("{} bytes, ADDITIONAL LENGTH {}", g.data.len(), g.data[4])
            })?;
            ensure(inq.version == 6, || format!("VERSION {}", inq.version))?;
            // LIO: SAM-5, the transport (SAS-3 on tcm_loop), SPC-4, SBC-3;
            // the model leaves the transport slot empty, knowing none.
            let d = &inq.version_descriptors;
            let transport = if s.lio() { version_descriptor::SAS3 } else { 0 };
            let want = [
                version_descriptor::SAM5,
                transport,
                version_descriptor::SPC4,
                version_descriptor::SBC3,
            ];
            ensure(d[..] == want, || {
                format!("version descriptors {d:04x?}, want {want:04x?}")
            })?;
            Ok(g)
        },
    ));
    v.push(case("Block Limits VPD page", same(good()), |t, s| {
        let g = got(run(t, raw(&[0x12, 1, 0xB0, 0, 64, 0]), Data::In(64)))?;
        if g.status != ScsiStatus::GOOD {
            return Ok(g);
        }
        let len = g
            .data
            .get(2..4)
            .map_or(0, |l| u16::from_be_bytes([l[0], l[1]]));
        // SBC-3's page length (3Ch); LIO 6.3 and later send only the
        // fields it fills: 0Ch, or 28h with thin provisioning.
        let want = match (s.lio(), s.lio_has_rsoc(), s.thin) {
            (false, _, _) => 0x3C,
            (true, false, true) => 0x3C,
            (true, false, false) => 0x10,
            (true, true, true) => 0x28,
            (true, true, false) => 0x0C,
        };
        ensure(len == want, || {
            format!("PAGE LENGTH {len:#x}, want {want:#x}")
        })?;
        let Ok(VpdPage::BlockLimits(l)) = VpdPage::parse(&g.data) else {
            return Err(format!("not a Block Limits page: {:02x?}", g.data));
        };
        ensure(l.wsnz && l.max_compare_and_write == 1, || {
            format!(
                "WSNZ {} MAXIMUM COMPARE AND WRITE LENGTH {}",
                l.wsnz, l.max_compare_and_write
            )
        })?;
        ensure(
            (l.max_unmap_lba_count > 0 && l.max_unmap_descriptor_count > 0) == s.thin,
            || format!("thin {} but unmap limits {l:?}", s.thin),
        )?;
        // LIO's ramdisk has no WRITE SAME (a limit of 0).
        let write_same = s.target != Target::LioRamdisk;
        ensure((l.max_write_same_length > 0) == write_same, || {
            format!("MAXIMUM WRITE SAME LENGTH {}", l.max_write_same_length)
        })?;
        Ok(g)
    }));
    v.push(case(
        "Logical Block Provisioning VPD page",
        same(good()),
        |t, s| {
            let g = got(run(t, raw(&[0x12, 1, 0xB2, 0, 64, 0]), Data::In(64)))?;
            if g.status != ScsiStatus::GOOD {
                return Ok(g);
            }
            let p = LogicalBlockProvisioning::parse(&g.data).map_err(|e| e.to_string())?;
            let t = s.thin;
            ensure(
                (p.lbpu, p.lbpws, p.lbpws10, p.lbprz, p.anc_sup) == (t, t, t, t, false),
                || format!("thin {t}: {p:?}"),
            )?;
            Ok(g)
        },
    ));
    v.push(case(
        "READ CAPACITY(16) LBPME and LBPRZ",
        same(good()),
        |t, s| {
            let g = got(run(
                t,
                Cdb::ReadCapacity16 { alloc_len: 32 }.emit(),
                Data::In(32),
            ))?;
            let b = g.data.get(14).copied().unwrap_or(0);
            let want = if s.thin { 0xC0 } else { 0 };
            ensure(g.status != ScsiStatus::GOOD || b & 0xC0 == want, || {
                format!("byte 14 {b:#04x}")
            })?;
            Ok(g)
        },
    ));
}

/// REPORT SUPPORTED OPERATION CODES with RCTD: timeouts descriptors.
fn rsoc_cases(s: &Subject, v: &mut Vec<Case>) {
    const NO_RSOC: &str = "LIO before Linux 6.3 does not emulate REPORT SUPPORTED OPERATION \
                           CODES: an unknown MAINTENANCE IN service action";
    let supported = |s: &Subject, e: Expect| {
        if s.lio() && !s.lio_has_rsoc() {
            differs(s, e, bad_opcode(), NO_RSOC)
        } else {
            same(e)
        }
    };
    v.push(case(
        "REPORT SUPPORTED OPERATION CODES, all, RCTD",
        supported(s, good()),
        |t, s| {
            let g = got(run(t, rsoc(0x80, 0, 0, 16384), Data::In(16384)))?;
            if g.status != ScsiStatus::GOOD {
                return Ok(g);
            }
            let all = AllCommands::parse(&g.data).map_err(|e| e.to_string())?;
            ensure(
                all.commands
                    .iter()
                    .all(|c| c.timeouts == Some(Timeouts::default())),
                || format!("descriptors without zeroed timeouts: {all:?}"),
            )?;
            let listed = |op: Opcode, sa: Option<u16>| {
                all.commands
                    .iter()
                    .any(|c| c.opcode == op.0 && c.service_action == sa)
            };
            let mut want = vec![
                (Opcode::TEST_UNIT_READY, None, true),
                (Opcode::INQUIRY, None, true),
                (Opcode::READ_10, None, true),
                (Opcode::WRITE_10, None, true),
                (Opcode::READ_16, None, true),
                (Opcode::WRITE_16, None, true),
                (Opcode::VERIFY_10, None, true),
                (Opcode::VERIFY_16, None, true),
                (Opcode::COMPARE_AND_WRITE, None, true),
                (Opcode::SYNCHRONIZE_CACHE_10, None, true),
                (Opcode::SERVICE_ACTION_IN_16, Some(0x10), true),
                (Opcode::MAINTENANCE_IN, Some(0x0C), true),
                (Opcode::UNMAP, None, s.thin),
                // The ramdisk has no WRITE SAME; LIO has no GET LBA STATUS.
                (Opcode::WRITE_SAME_16, None, s.target != Target::LioRamdisk),
                (Opcode::SERVICE_ACTION_IN_16, Some(0x12), s.thin && !s.lio()),
            ];
            want.retain(|&(op, sa, yes)| listed(op, sa) != yes);
            ensure(want.is_empty(), || format!("listed wrongly: {want:?}"))?;
            Ok(g)
        },
    ));
    v.push(case(
        "REPORT SUPPORTED OPERATION CODES, READ(16), RCTD",
        supported(s, good()),
        |t, s| {
            let g = got(run(t, rsoc(0x81, 0x88, 0, 512), Data::In(512)))?;
            if g.status != ScsiStatus::GOOD {
                return Ok(g);
            }
            let one = OneCommand::parse(&g.data).map_err(|e| e.to_string())?;
            ensure(
                one.support == 3
                    && one.usage.len() == 16
                    && one.timeouts == Some(Timeouts::default()),
                || format!("{one:?}"),
            )?;
            // LIO marks RDPROTECT (byte 1 bits 7-5) used: it looks at it to
            // refuse it. The model marks it unused: it refuses it. The rest
            // agree: DPO/FUA as DPOFUA, no group number, no CONTROL bit.
            let fua = if s.dpofua { 0x18 } else { 0 };
            let b1 = if s.lio() { 0xE0 | fua } else { fua };
            let mut want = vec![0x88, b1];
            want.extend_from_slice(&[0xFF; 12]);
            want.extend_from_slice(&[0, 0]);
            ensure(one.usage == want, || {
                format!("usage data {:02x?}, want {want:02x?}", one.usage)
            })?;
            Ok(g)
        },
    ));
    v.push(case(
        "REPORT SUPPORTED OPERATION CODES, UNMAP",
        supported(s, good()),
        |t, s| {
            let g = got(run(t, rsoc(0x01, Opcode::UNMAP.0, 0, 512), Data::In(512)))?;
            if g.status != ScsiStatus::GOOD {
                return Ok(g);
            }
            let one = OneCommand::parse(&g.data).map_err(|e| e.to_string())?;
            let want = if s.thin { 3 } else { 1 };
            ensure(one.support == want, || {
                format!("SUPPORT {}, want {want}", one.support)
            })?;
            Ok(g)
        },
    ));
    let rsoc_4 = if s.lio() && s.lio_has_rsoc() {
        differs(
            s,
            field(2, 2),
            good(),
            "LIO reads REPORTING OPTIONS as two bits: 100b is taken for 000b",
        )
    } else {
        supported(s, field(2, 2))
    };
    v.push(case(
        "REPORT SUPPORTED OPERATION CODES, reserved REPORTING OPTIONS 100b",
        rsoc_4,
        |t, _| got(run(t, rsoc(0x04, 0, 0, 16384), Data::In(16384))),
    ));
}

const VERIFY_NOOP: &str = "LIO's VERIFY is a no-op (sbc_emulate_noop): it checks the range \
                           and nothing else, neither BYTCHK data nor VRPROTECT";

fn verify_cases(s: &Subject, v: &mut Vec<Case>) {
    let base = s.base();
    v.push(case(
        "VERIFY(10) without BYTCHK",
        same(good()),
        move |t, _| got(run(t, cdb10(0x2F, 0, base, 0, 8, 0), Data::None)),
    ));
    v.push(case(
        "VERIFY(16) past the end",
        same(out_of_range()),
        |t, s| got(run(t, cdb16(0x8F, 0, s.blocks - 4, 8, 0, 0), Data::None)),
    ));
    v.push(case(
        "VERIFY(10) with BYTCHK, the same data",
        same(good()),
        move |t, s| {
            let data: Vec<u8> = (0..8).flat_map(|i| pattern(1, i, s.bs())).collect();
            write(t, base, &data, s.bs())?;
            got(run(t, cdb10(0x2F, 0x02, base, 0, 8, 0), Data::Out(&data)))
        },
    ));
    v.push(case(
        "VERIFY(16) with BYTCHK, one byte different",
        differs(s, miscompare(700), good(), VERIFY_NOOP),
        move |t, s| {
            let mut data: Vec<u8> = (0..8).flat_map(|i| pattern(2, i, s.bs())).collect();
            write(t, base, &data, s.bs())?;
            data[700] ^= 0x01;
            got(run(t, cdb16(0x8F, 0x02, base, 8, 0, 0), Data::Out(&data)))
        },
    ));
    v.push(case(
        "VERIFY(10) with VRPROTECT 001b",
        differs(s, field(1, 7), good(), VERIFY_NOOP),
        move |t, _| got(run(t, cdb10(0x2F, 0x20, base, 0, 8, 0), Data::None)),
    ));
    // LIO: less data-out than the CDB asks for is an overflow it refuses
    // for a control CDB.
    v.push(case(
        "VERIFY(10) with BYTCHK, one block of data for eight",
        same(illegal(Asc::INVALID_FIELD_IN_CDB)),
        move |t, s| {
            let data = pattern(1, 0, s.bs());
            got(run(t, cdb10(0x2F, 0x02, base, 0, 8, 0), Data::Out(&data)))
        },
    ));
}

fn write_same_cases(s: &Subject, v: &mut Vec<Case>) {
    const RD_NO_WRITE_SAME: &str = "LIO's ramdisk has no WRITE SAME: its MAXIMUM WRITE SAME \
                                    LENGTH is 0, so every block count is over it";
    const BITS_AS_OPCODE: &str = "LIO refuses PBDATA and LBDATA as an unsupported command, \
                                  not an invalid field";
    let base = s.base() + 256;
    let rd = s.target == Target::LioRamdisk;
    let on_rd = |s: &Subject, e: Expect| {
        if rd {
            differs(s, e, illegal(Asc::INVALID_FIELD_IN_CDB), RD_NO_WRITE_SAME)
        } else {
            same(e)
        }
    };
    v.push(case(
        "WRITE SAME(10) of 16 blocks",
        on_rd(s, good()),
        move |t, s| {
            let block = pattern(3, 0, s.bs());
            let g = got(run(t, cdb10(0x41, 0, base, 0, 16, 0), Data::Out(&block)))?;
            if g.status == ScsiStatus::GOOD {
                let back = read(t, base, 16, s.bs())?;
                ensure(back.chunks(s.bs()).all(|b| b == block), || {
                    "the blocks read back are not the block written".into()
                })?;
            }
            Ok(g)
        },
    ));
    v.push(case(
        "WRITE SAME(16) of 0 blocks (WSNZ)",
        same(field(10, 7)),
        move |t, s| {
            let block = pattern(3, 0, s.bs());
            got(run(t, cdb16(0x93, 0, base, 0, 0, 0), Data::Out(&block)))
        },
    ));
    let over = s.max_write_same + 1;
    v.push(case(
        "WRITE SAME(16) over MAXIMUM WRITE SAME LENGTH",
        same(field(10, 7)),
        move |t, s| {
            let block = pattern(3, 0, s.bs());
            let n = u32::try_from(over).unwrap_or(u32::MAX);
            got(run(t, cdb16(0x93, 0, 0, n, 0, 0), Data::Out(&block)))
        },
    ));
    v.push(case(
        "WRITE SAME(16) past the end",
        on_rd(s, out_of_range()),
        move |t, s| {
            let block = pattern(3, 0, s.bs());
            got(run(
                t,
                cdb16(0x93, 0, s.blocks - 1, 2, 0, 0),
                Data::Out(&block),
            ))
        },
    ));
    v.push(case(
        "WRITE SAME(16) with ANCHOR",
        same(field(1, 4)),
        move |t, s| {
            let block = vec![0; s.bs()];
            got(run(t, cdb16(0x93, 0x10, base, 8, 0, 0), Data::Out(&block)))
        },
    ));
    v.push(case(
        "WRITE SAME(16) with NDOB",
        same(field(1, 0)),
        move |t, s| {
            let block = vec![0; s.bs()];
            got(run(t, cdb16(0x93, 0x01, base, 8, 0, 0), Data::Out(&block)))
        },
    ));
    v.push(case(
        "WRITE SAME(10) with LBDATA",
        differs(s, field(1, 1), bad_opcode(), BITS_AS_OPCODE),
        move |t, s| {
            let block = pattern(3, 0, s.bs());
            got(run(t, cdb10(0x41, 0x02, base, 0, 8, 0), Data::Out(&block)))
        },
    ));
    v.push(case(
        "WRITE SAME(16) with WRPROTECT 001b",
        same(field(1, 7)),
        move |t, s| {
            let block = pattern(3, 0, s.bs());
            got(run(t, cdb16(0x93, 0x20, base, 8, 0, 0), Data::Out(&block)))
        },
    ));
    // The UNMAP bit: on a thin LUN a zero block deallocates (reads as
    // zeros, LBPRZ); a thick LUN does not support the bit.
    let unmap = if s.thin {
        same(good())
    } else if rd {
        differs(
            s,
            field(1, 3),
            illegal(Asc::INVALID_FIELD_IN_CDB),
            RD_NO_WRITE_SAME,
        )
    } else {
        same(field(1, 3))
    };
    v.push(case(
        "WRITE SAME(16) with UNMAP and a zero block",
        unmap,
        move |t, s| {
            let data: Vec<u8> = (0..256).flat_map(|i| pattern(4, i, s.bs())).collect();
            write(t, base, &data, s.bs())?;
            let zero = vec![0; s.bs()];
            let g = got(run(t, cdb16(0x93, 0x08, base, 256, 0, 0), Data::Out(&zero)))?;
            if g.status == ScsiStatus::GOOD {
                let back = read(t, base, 256, s.bs())?;
                ensure(back.iter().all(|&b| b == 0), || {
                    "unmapped blocks do not read as zeros".into()
                })?;
            }
            Ok(g)
        },
    ));
}

fn compare_and_write_cases(s: &Subject, v: &mut Vec<Case>) {
    let lba = s.base() + 600;
    v.push(case(
        "COMPARE AND WRITE that matches",
        same(good()),
        move |t, s| {
            let (old, new) = (pattern(5, 0, s.bs()), pattern(6, 0, s.bs()));
            write(t, lba, &old, s.bs())?;
            let data = [old, new.clone()].concat();
            let g = got(run(t, caw(lba, 1, 0), Data::Out(&data)))?;
            if g.status == ScsiStatus::GOOD {
                ensure(read(t, lba, 1, s.bs())? == new, || {
                    "the block was not written".into()
                })?;
            }
            Ok(g)
        },
    ));
    // LIO sets the offset of the first byte that differs too (7.x and 6.1).
    v.push(case(
        "COMPARE AND WRITE that differs at byte 100",
        same(miscompare(100)),
        move |t, s| {
            let old = pattern(7, 0, s.bs());
            write(t, lba, &old, s.bs())?;
            let mut verify = old.clone();
            verify[100] ^= 0x80;
            let data = [verify, pattern(8, 0, s.bs())].concat();
            let g = got(run(t, caw(lba, 1, 0), Data::Out(&data)))?;
            ensure(read(t, lba, 1, s.bs())? == old, || {
                "a COMPARE AND WRITE that miscompared wrote".into()
            })?;
            Ok(g)
        },
    ));
    v.push(case(
        "COMPARE AND WRITE of 2 blocks",
        same(field(13, 7)),
        move |t, s| {
            let data = vec![0; 4 * s.bs()];
            got(run(t, caw(lba, 2, 0), Data::Out(&data)))
        },
    ));
    v.push(case(
        "COMPARE AND WRITE with one block of data for two",
        same(illegal(Asc::INVALID_FIELD_IN_COMMAND_IU)),
        move |t, s| {
            let data = vec![0; s.bs()];
            got(run(t, caw(lba, 1, 0), Data::Out(&data)))
        },
    ));
    v.push(case(
        "COMPARE AND WRITE of 0 blocks",
        same(good()),
        move |t, _| got(run(t, caw(lba, 0, 0), Data::None)),
    ));
    v.push(case(
        "COMPARE AND WRITE past the end",
        same(out_of_range()),
        |t, s| {
            let data = vec![0; 2 * s.bs()];
            got(run(t, caw(s.blocks, 1, 0), Data::Out(&data)))
        },
    ));
    v.push(case(
        "COMPARE AND WRITE with WRPROTECT 001b",
        differs(
            s,
            field(1, 7),
            good(),
            "LIO does not look at WRPROTECT in COMPARE AND WRITE (no sbc_check_prot)",
        ),
        move |t, s| {
            // Compare data that matches and the same block again, so that
            // LIO, which goes ahead, changes nothing.
            let old = pattern(9, 0, s.bs());
            write(t, lba, &old, s.bs())?;
            let data = [old.clone(), old].concat();
            got(run(t, caw(lba, 1, 0x20), Data::Out(&data)))
        },
    ));
}

fn unmap_cases(s: &Subject, v: &mut Vec<Case>) {
    const RD_NO_UNMAP: &str = "LIO's ramdisk has no UNMAP (rd_mcp has no execute_unmap)";
    let base = s.base() + 1024;
    // On a thick LUN UNMAP is an unsupported command, on the model and on
    // the ramdisk alike.
    let thin = |e: Expect| {
        if s.thin {
            same(e)
        } else if s.target == Target::LioRamdisk {
            differs(s, bad_opcode(), bad_opcode(), RD_NO_UNMAP)
        } else {
            same(bad_opcode())
        }
    };
    v.push(case("UNMAP of 256 blocks", thin(good()), move |t, s| {
        let data: Vec<u8> = (0..256).flat_map(|i| pattern(10, i, s.bs())).collect();
        write(t, base, &data, s.bs())?;
        let list = UnmapList::new(vec![UnmapDescriptor {
            lba: base,
            blocks: 256,
        }])
        .to_bytes();
        let g = got(run(t, unmap_cdb(0, list.len() as u16), Data::Out(&list)))?;
        if g.status == ScsiStatus::GOOD {
            let back = read(t, base, 256, s.bs())?;
            ensure(back.iter().all(|&b| b == 0), || {
                "unmapped blocks do not read as zeros".into()
            })?;
        }
        Ok(g)
    }));
    v.push(case(
        "UNMAP with a parameter list length of 0",
        thin(good()),
        |t, _| got(run(t, unmap_cdb(0, 0), Data::None)),
    ));
    v.push(case(
        "UNMAP with a parameter list length of 4",
        thin(illegal(Asc::PARAMETER_LIST_LENGTH_ERROR)),
        |t, _| got(run(t, unmap_cdb(0, 4), Data::Out(&[0, 2, 0, 0]))),
    ));
    let descriptors = s.max_unmap_descriptors.saturating_add(1).min(4096);
    v.push(case(
        "UNMAP with one descriptor over MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT",
        thin(param(2, 7)),
        move |t, _| {
            let list = UnmapList::new(
                (0..u64::from(descriptors))
                    .map(|i| UnmapDescriptor {
                        lba: base + i,
                        blocks: 1,
                    })
                    .collect(),
            )
            .to_bytes();
            got(run(t, unmap_cdb(0, list.len() as u16), Data::Out(&list)))
        },
    ));
    let over = s.max_unmap_blocks.saturating_add(1);
    v.push(case(
        "UNMAP of one block over MAXIMUM UNMAP LBA COUNT",
        thin(param(16, 7)),
        move |t, _| {
            let list = UnmapList::new(vec![UnmapDescriptor {
                lba: 0,
                blocks: over,
            }])
            .to_bytes();
            got(run(t, unmap_cdb(0, list.len() as u16), Data::Out(&list)))
        },
    ));
    v.push(case("UNMAP past the end", thin(out_of_range()), |t, s| {
        let list = UnmapList::new(vec![UnmapDescriptor {
            lba: s.blocks - 1,
            blocks: 2,
        }])
        .to_bytes();
        got(run(t, unmap_cdb(0, list.len() as u16), Data::Out(&list)))
    }));
    v.push(case("UNMAP with ANCHOR", thin(field(1, 0)), move |t, _| {
        let list = UnmapList::new(vec![UnmapDescriptor {
            lba: base,
            blocks: 1,
        }])
        .to_bytes();
        got(run(t, unmap_cdb(0x01, list.len() as u16), Data::Out(&list)))
    }));
}

fn lba_status_cases(s: &Subject, v: &mut Vec<Case>) {
    const NO_GET_LBA_STATUS: &str = "LIO has no GET LBA STATUS: SERVICE ACTION IN(16) 12h is \
                                     an unsupported service action on every backstore";
    let base = s.base() + 2048;
    let lio_refuses = |e: Expect| {
        let unsupported = field(1, 4);
        if s.lio() {
            differs(s, e, illegal(Asc::INVALID_FIELD_IN_CDB), NO_GET_LBA_STATUS)
        } else if s.thin {
            same(e)
        } else {
            same(unsupported)
        }
    };
    v.push(case(
        "GET LBA STATUS after WRITE and UNMAP",
        lio_refuses(good()),
        move |t, s| {
            let g = s.unmap_granularity.max(1) as u64;
            if s.thin {
                // A clean region, then one granule written.
                let list = UnmapList::new(vec![UnmapDescriptor {
                    lba: base,
                    blocks: 4 * g as u32,
                }])
                .to_bytes();
                run(t, unmap_cdb(0, list.len() as u16), Data::Out(&list))
                    .into_result()
                    .map_err(|e| format!("UNMAP: {e}"))?;
                let data: Vec<u8> = (0..g).flat_map(|i| pattern(11, i, s.bs())).collect();
                write(t, base, &data, s.bs())?;
            }
            let cdb = Cdb::GetLbaStatus {
                lba: base,
                alloc_len: 4096,
            };
            let r = got(run(t, cdb.emit(), Data::In(4096)))?;
            if r.status != ScsiStatus::GOOD {
                return Ok(r);
            }
            let st = LbaStatus::parse(&r.data).map_err(|e| e.to_string())?;
            let d = &st.descriptors;
            ensure(
                d.len() >= 2
                    && (d[0].lba, u64::from(d[0].blocks), d[0].status)
                        == (base, g, ProvisioningStatus::MAPPED)
                    && (d[1].lba, d[1].status) == (base + g, ProvisioningStatus::DEALLOCATED)
                    && u64::from(d[1].blocks) >= 3 * g,
                || format!("granule {g}: {d:?}"),
            )?;
            Ok(r)
        },
    ));
    v.push(case(
        "GET LBA STATUS past the end",
        lio_refuses(out_of_range()),
        |t, s| {
            let cdb = Cdb::GetLbaStatus {
                lba: s.blocks,
                alloc_len: 64,
            };
            got(run(t, cdb.emit(), Data::In(64)))
        },
    ));
}
