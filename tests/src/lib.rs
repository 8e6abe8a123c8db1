//! Test bodies shared by every array STP runs against.
//!
//! Each body takes `scsi::Transport`s — paths from one or two hosts to the
//! same LUN — and asserts what any conforming array must do. The in-process
//! suite (`tests/inproc.rs`) runs them against the simulated array; the VM
//! stage runs the same bodies against `/dev/sgN` on real LIO. One test body,
//! two arrays.
//!
//! The bodies never panic on what a device returns: short, truncated or
//! nonsensical data is a failed check with a message, not an index out of
//! bounds or an overflow.

pub mod backup;
pub mod conformance;
pub mod e2e;
pub mod hostile;
pub mod rig;

use scsi::cdb::{Cdb, RwFlags, VendorCdb};
use scsi::inquiry::identify;
use scsi::{Asc, Command, CommandError, Completion, IoBuf, Opcode, SenseKey, Transport};

/// A failed expectation, with enough context to debug it.
pub type Check = Result<(), String>;

/// Runs `cdb` with no data phase.
pub fn run_none(t: &mut dyn Transport, cdb: Cdb) -> Completion {
    t.execute(Command::no_data(cdb.emit()))
}

/// Runs a data-in `cdb` with a buffer of `len` bytes.
pub fn run_in(t: &mut dyn Transport, cdb: Cdb, len: usize) -> Completion {
    t.execute(Command::data_in(cdb.emit(), len))
}

/// Runs a data-out `cdb` sending `data`.
pub fn run_out(t: &mut dyn Transport, cdb: Cdb, data: &[u8]) -> Completion {
    t.execute(Command::data_out(cdb.emit(), IoBuf::from_slice(data)))
}

/// (last LBA + 1, block size) from READ CAPACITY(16).
pub fn capacity(t: &mut dyn Transport) -> Result<(u64, u32), String> {
    let (d, _) = run_in(t, Cdb::ReadCapacity16 { alloc_len: 32 }, 32)
        .into_result()
        .map_err(|e| format!("READ CAPACITY(16) failed: {e}"))?;
    if d.len() < 12 {
        return Err(format!("READ CAPACITY(16) returned {} bytes", d.len()));
    }
    let last = be_u64(&d, 0).ok_or("READ CAPACITY(16): short data")?;
    let bs = be_u32(&d, 8).ok_or("READ CAPACITY(16): short data")?;
    let blocks = last.checked_add(1).ok_or_else(|| {
        format!("READ CAPACITY(16) reports last LBA 0x{last:X}: the block count overflows")
    })?;
    if bs == 0 {
        return Err("READ CAPACITY(16) reports a block size of 0".into());
    }
    Ok((blocks, bs))
}

/// The big-endian u32 at `at`, if `d` is long enough.
pub fn be_u32(d: &[u8], at: usize) -> Option<u32> {
    let b = d.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(b.try_into().ok()?))
}

/// The big-endian u64 at `at`, if `d` is long enough.
pub fn be_u64(d: &[u8], at: usize) -> Option<u64> {
    let b = d.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Checks standard INQUIRY data returned for a LUN the target does not
/// have: byte 0 is 0x3F (peripheral qualifier 001b, device type 0x1F), as
/// LIO answers.
pub fn missing_lun_inquiry(data: &[u8]) -> Check {
    match data.first() {
        Some(0x3F) => Ok(()),
        Some(b) => Err(format!(
            "INQUIRY of a missing LUN: byte 0 is 0x{b:02X}, expected 0x3F \
             (peripheral qualifier 1, device type 0x1F)"
        )),
        None => Err("INQUIRY of a missing LUN returned no data".into()),
    }
}

/// Expects CHECK CONDITION with `key`/`asc`.
pub fn expect_check(c: Completion, key: SenseKey, asc: Asc, what: &str) -> Check {
    match c.into_result() {
        Err(CommandError::CheckCondition(s)) if s.key == key && s.asc == asc => Ok(()),
        Err(e) => Err(format!("{what}: expected {key}/{asc}, got error {e}")),
        Ok(_) => Err(format!("{what}: expected {key}/{asc}, got GOOD")),
    }
}

/// A deterministic pattern for block `lba` written by `writer`.
pub fn pattern(writer: u8, lba: u64, block_size: u32) -> Vec<u8> {
    (0..block_size as u64)
        .map(|i| (i.wrapping_mul(31) ^ lba.wrapping_mul(7) ^ u64::from(writer) << 3) as u8)
        .collect()
}

/// Both paths see one logical unit: same identity, same capacity.
pub fn same_identity(a: &mut dyn Transport, b: &mut dyn Transport) -> Check {
    let ia = identify(a).map_err(|e| format!("identify via {}: {e}", a.describe()))?;
    let ib = identify(b).map_err(|e| format!("identify via {}: {e}", b.describe()))?;
    let (na, nb) = (ia.preferred_id(), ib.preferred_id());
    if na.is_none() || na != nb {
        return Err(format!(
            "identities differ or are missing: {na:?} vs {nb:?}"
        ));
    }
    if !na.as_deref().unwrap_or("").starts_with("naa.") {
        return Err(format!("expected an NAA designator, got {na:?}"));
    }
    if ia.inquiry.device_type != 0 {
        return Err(format!(
            "expected a block device, got type {}",
            ia.inquiry.device_type
        ));
    }
    if capacity(a)? != capacity(b)? {
        return Err("the two paths report different capacities".into());
    }
    Ok(())
}

/// Whether the LUN advertises DPO/FUA (MODE SENSE(6), device-specific
/// parameter bit 4).
pub fn dpofua(t: &mut dyn Transport) -> Result<bool, String> {
    let ms = Cdb::ModeSense6 {
        dbd: true,
        page_control: scsi::cdb::PageControl::CURRENT,
        page_code: 0x3F,
        subpage: 0,
        alloc_len: 255,
    };
    let (d, _) = run_in(t, ms, 255)
        .into_result()
        .map_err(|e| format!("MODE SENSE(6): {e}"))?;
    let b = d.get(2).ok_or("MODE SENSE(6) returned under 3 bytes")?;
    Ok(b & 0x10 != 0)
}

/// What one host writes (WRITE(16), FUA if advertised), the other reads back (READ(10)),
/// with up to `depth` commands in flight, completions in any order.
pub fn write_here_read_there(
    a: &mut dyn Transport,
    b: &mut dyn Transport,
    first_lba: u64,
    blocks: u64,
    depth: usize,
) -> Check {
    let (_, bs) = capacity(a)?;
    // FUA where the LUN advertises it (LIO refuses it otherwise).
    let fua = dpofua(a)?;
    let depth_a = depth.min(a.queue_depth()).max(1);
    let depth_b = depth.min(b.queue_depth()).max(1);
    let mut next = 0;
    let mut done = 0;
    let mut out = Vec::new();
    // Writes from host A, pipelined.
    while done < blocks {
        while next < blocks && a.in_flight() < depth_a {
            let lba = first_lba + next;
            let cdb = Cdb::Write16 {
                lba,
                blocks: 1,
                flags: RwFlags { fua, dpo: false },
            };
            let cmd = Command::data_out(cdb.emit(), IoBuf::from_slice(&pattern(1, lba, bs)))
                .with_tag(lba);
            a.submit(cmd).map_err(|e| format!("submit WRITE: {e}"))?;
            next += 1;
        }
        out.clear();
        a.reap(&mut out, None).map_err(|e| format!("reap: {e}"))?;
        for c in out.drain(..) {
            let tag = c.tag;
            c.into_result()
                .map_err(|e| format!("WRITE(16) lba {tag}: {e}"))?;
            done += 1;
        }
    }
    // Reads from host B, pipelined, checked per tag.
    let (mut next, mut done) = (0, 0);
    while done < blocks {
        while next < blocks && b.in_flight() < depth_b {
            let lba = first_lba + next;
            let cdb = Cdb::Read10 {
                lba: u32::try_from(lba).map_err(|_| "lba too large for READ(10)")?,
                blocks: 1,
                flags: RwFlags::default(),
            };
            b.submit(Command::data_in(cdb.emit(), bs as usize).with_tag(lba))
                .map_err(|e| format!("submit READ: {e}"))?;
            next += 1;
        }
        out.clear();
        b.reap(&mut out, None).map_err(|e| format!("reap: {e}"))?;
        for c in out.drain(..) {
            let lba = c.tag;
            let (data, _) = c
                .into_result()
                .map_err(|e| format!("READ(10) lba {lba}: {e}"))?;
            if data[..] != pattern(1, lba, bs)[..] {
                return Err(format!(
                    "block {lba} read back different from what was written"
                ));
            }
            done += 1;
        }
    }
    Ok(())
}

/// A multi-block transfer round-trips and a short read buffer reports the
/// residual.
pub fn multi_block_and_residual(t: &mut dyn Transport, lba: u64) -> Check {
    let (_, bs) = capacity(t)?;
    let bs = bs as usize;
    let data: Vec<u8> = (0..bs * 8).map(|i| (i * 7 % 253) as u8).collect();
    let w = Cdb::Write16 {
        lba,
        blocks: 8,
        flags: RwFlags::default(),
    };
    run_out(t, w, &data)
        .into_result()
        .map_err(|e| format!("WRITE(16) x8: {e}"))?;
    let r = Cdb::Read16 {
        lba,
        blocks: 8,
        flags: RwFlags::default(),
    };
    let (back, outcome) = run_in(t, r, data.len())
        .into_result()
        .map_err(|e| format!("READ(16) x8: {e}"))?;
    if back[..] != data[..] || outcome.residual != 0 {
        return Err("8-block read differs from what was written".into());
    }
    // INQUIRY with a 255-byte buffer returns fewer: the residual says how many.
    let c = run_in(
        t,
        Cdb::Inquiry {
            evpd: false,
            page_code: 0,
            alloc_len: 255,
        },
        255,
    );
    let (inq, outcome) = c.into_result().map_err(|e| format!("INQUIRY: {e}"))?;
    if inq.len() + outcome.residual as usize != 255 || inq.len() < 36 {
        return Err(format!(
            "INQUIRY returned {} bytes with residual {}",
            inq.len(),
            outcome.residual
        ));
    }
    Ok(())
}

/// What a transport reported for one command, as [`sense_and_residual`]
/// compares it across engines (the duration left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    /// Which command.
    pub what: &'static str,
    /// SCSI status, host status and driver status as raw values.
    pub status: (u8, u16, u16),
    /// The decoded sense (key, ASC, ASCQ), when there was sense.
    pub sense: Option<(u8, u8, u8)>,
    /// The sense bytes up to their own additional length (trailing bytes a
    /// transport pads with are not part of the sense).
    pub sense_bytes: Vec<u8>,
    /// The residual.
    pub residual: u32,
    /// Data-in bytes moved (length minus residual).
    pub moved: usize,
}

fn decoded(what: &'static str, c: Completion) -> Result<Decoded, String> {
    let len = c.data.len();
    let o = c
        .result
        .map_err(|e| format!("{what}: the transport failed: {e}"))?;
    let sense = match o.decoded_sense() {
        Some(Ok(s)) => Some((s.key.0, s.asc.0, s.asc.1)),
        Some(Err(e)) => return Err(format!("{what}: undecodable sense {:02x?}: {e}", o.sense)),
        None => None,
    };
    // Fixed format: 8 + byte 7; descriptor format: 8 + byte 7 as well.
    let keep = o
        .sense
        .get(7)
        .map_or(o.sense.len(), |&n| 8 + usize::from(n));
    Ok(Decoded {
        what,
        status: (o.status.0, o.host_status.0, o.driver_status.0),
        sense,
        sense_bytes: o.sense[..keep.min(o.sense.len())].to_vec(),
        residual: o.residual,
        moved: len.saturating_sub(o.residual as usize),
    })
}

/// Commands whose completions carry sense data and a residual, decoded
/// without classification: a short INQUIRY (GOOD with a residual), a READ
/// past the end (CHECK CONDITION, ILLEGAL REQUEST / LBA OUT OF RANGE), a
/// bad VPD page (sense and a data-in buffer) and an unknown opcode. Run on
/// two engines over the same LUN, the lists must be equal: each engine
/// decodes status, sense and residual the same way.
pub fn sense_and_residual(t: &mut dyn Transport) -> Result<Vec<Decoded>, String> {
    let (blocks, bs) = capacity(t)?;
    let mut out = Vec::new();
    let inq = Cdb::Inquiry {
        evpd: false,
        page_code: 0,
        alloc_len: 255,
    };
    out.push(decoded("INQUIRY 255", run_in(t, inq, 255))?);
    let beyond = Cdb::Read16 {
        lba: blocks - 1,
        blocks: 2,
        flags: RwFlags::default(),
    };
    out.push(decoded(
        "READ past the end",
        run_in(t, beyond, 2 * bs as usize),
    )?);
    let bad_page = Cdb::Inquiry {
        evpd: true,
        page_code: 0x99,
        alloc_len: 64,
    };
    out.push(decoded("INQUIRY VPD 0x99", run_in(t, bad_page, 64))?);
    let c = t.execute(Command::no_data(
        scsi::CdbBuf::new(&[0x7B, 0, 0, 0, 0, 0, 0, 0, 0, 0]).ok_or("cdb")?,
    ));
    out.push(decoded("opcode 0x7B", c)?);
    let inq = &out[0];
    if inq.status != (0, 0, 0) || inq.residual == 0 || inq.moved + inq.residual as usize != 255 {
        return Err(format!("short INQUIRY: {inq:?}"));
    }
    for d in &out[1..] {
        if d.status.0 != 0x02 || d.sense.is_none() {
            return Err(format!(
                "{}: expected CHECK CONDITION with sense: {d:?}",
                d.what
            ));
        }
    }
    Ok(out)
}

/// The errors every SBC target reports, immediately.
pub fn standard_errors(t: &mut dyn Transport) -> Check {
    let (blocks, bs) = capacity(t)?;
    let beyond = Cdb::Read16 {
        lba: blocks - 1,
        blocks: 2,
        flags: RwFlags::default(),
    };
    expect_check(
        run_in(t, beyond, 2 * bs as usize),
        SenseKey::ILLEGAL_REQUEST,
        Asc::LBA_OUT_OF_RANGE,
        "READ past the end",
    )?;
    let bad_page = Cdb::Inquiry {
        evpd: true,
        page_code: 0x99,
        alloc_len: 64,
    };
    expect_check(
        run_in(t, bad_page, 64),
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_FIELD_IN_CDB,
        "INQUIRY of VPD page 0x99",
    )?;
    // DPO/FUA only where advertised.
    if !dpofua(t)? {
        let fua = Cdb::Write16 {
            lba: 0,
            blocks: 1,
            flags: RwFlags {
                fua: true,
                dpo: false,
            },
        };
        expect_check(
            run_out(t, fua, &vec![0; bs as usize]),
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
            "WRITE(16) FUA to a LUN without DPOFUA",
        )?;
    }
    // An opcode no SBC device implements.
    let c = t.execute(Command::no_data(
        scsi::CdbBuf::new(&[0x7B, 0, 0, 0, 0, 0, 0, 0, 0, 0]).ok_or("cdb")?,
    ));
    expect_check(
        c,
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_COMMAND_OPERATION_CODE,
        "opcode 0x7B",
    )?;
    Ok(())
}

/// A vendor opcode nobody implements is refused at once, not held.
pub fn unknown_vendor_opcode(t: &mut dyn Transport, opcode: u8) -> Check {
    let cdb = VendorCdb::new(Opcode(opcode), 0, 0, 0).map_err(|e| e.to_string())?;
    let c = run_none(t, Cdb::Vendor(cdb));
    expect_check(
        c,
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_COMMAND_OPERATION_CODE,
        "unimplemented vendor opcode",
    )
}

/// What the Linux sd driver asks at attach time is answered.
pub fn sd_probe_commands(t: &mut dyn Transport) -> Check {
    run_none(t, Cdb::TestUnitReady)
        .into_result()
        .map_err(|e| format!("TEST UNIT READY: {e}"))?;
    let (d, _) = run_in(t, Cdb::ReadCapacity10, 8)
        .into_result()
        .map_err(|e| format!("READ CAPACITY(10): {e}"))?;
    if d.len() != 8 {
        return Err("READ CAPACITY(10) must return 8 bytes".into());
    }
    let ms = Cdb::ModeSense6 {
        dbd: false,
        page_control: scsi::cdb::PageControl::CURRENT,
        page_code: 0x08,
        subpage: 0,
        alloc_len: 255,
    };
    let (d, _) = run_in(t, ms, 255)
        .into_result()
        .map_err(|e| format!("MODE SENSE(6) caching page: {e}"))?;
    // Header (4) + block descriptor (8) + caching page (20).
    if d.len() != 32 || d[0] as usize != d.len() - 1 || d[3] != 8 || d[12] != 0x08 {
        return Err(format!(
            "MODE SENSE(6) caching page malformed: {:02x?}",
            &d[..]
        ));
    }
    let rl = Cdb::ReportLuns {
        select_report: 0,
        alloc_len: 4096,
    };
    let (d, _) = run_in(t, rl, 4096)
        .into_result()
        .map_err(|e| format!("REPORT LUNS: {e}"))?;
    let listed = be_u32(&d, 0).ok_or_else(|| format!("REPORT LUNS returned {} bytes", d.len()))?;
    let listed = listed as usize;
    if listed == 0 || listed % 8 != 0 || Some(d.len()) != listed.checked_add(8) {
        return Err(format!("REPORT LUNS list length {listed} malformed"));
    }
    Ok(())
}

/// A data buffer that disagrees with the CDB's transfer length is refused
/// before anything moves, as LIO refuses it: a WRITE with too little or too
/// much data-out gets INVALID FIELD IN COMMAND INFORMATION UNIT, a READ into
/// a buffer shorter than the transfer INVALID FIELD IN CDB.
pub fn transfer_length_mismatches(t: &mut dyn Transport, lba: u64) -> Check {
    transfer_length_mismatches_with(t, lba, LongerRead::Residual)
}

/// What a READ into a buffer longer than its transfer gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LongerRead {
    /// GOOD, the residual saying how much of the buffer is left (SPC; the
    /// model, LIO's ramdisk).
    Residual,
    /// NOT READY / LOGICAL UNIT COMMUNICATION FAILURE: LIO's fileio on a
    /// file (Linux 7.3, `fd_do_rw`) reads into the whole buffer and takes
    /// the longer read for an error.
    LioFileioFails,
}

/// [`transfer_length_mismatches`], with the answer `longer` to a READ into
/// a buffer longer than its transfer.
pub fn transfer_length_mismatches_with(
    t: &mut dyn Transport,
    lba: u64,
    longer: LongerRead,
) -> Check {
    let (_, bs) = capacity(t)?;
    let bs = bs as usize;
    let write = Cdb::Write10 {
        lba: u32::try_from(lba).map_err(|_| "lba too large for WRITE(10)")?,
        blocks: 2,
        flags: RwFlags::default(),
    };
    for len in [bs, 3 * bs] {
        expect_check(
            run_out(t, write, &vec![0xEE; len]),
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_COMMAND_IU,
            &format!("WRITE of 2 blocks with {len} bytes of data"),
        )?;
    }
    let read = Cdb::Read10 {
        lba: u32::try_from(lba).map_err(|_| "lba too large for READ(10)")?,
        blocks: 2,
        flags: RwFlags::default(),
    };
    expect_check(
        run_in(t, read, bs),
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_FIELD_IN_CDB,
        "READ of 2 blocks into a 1-block buffer",
    )?;
    if longer == LongerRead::LioFileioFails {
        return expect_check(
            run_in(t, read, 3 * bs),
            SenseKey::NOT_READY,
            Asc::LU_COMMUNICATION_FAILURE,
            "READ of 2 blocks into a 3-block buffer on LIO's fileio",
        );
    }
    // A longer buffer is fine: the residual says how much is left.
    let (d, outcome) = run_in(t, read, 3 * bs)
        .into_result()
        .map_err(|e| format!("READ of 2 blocks into a 3-block buffer: {e}"))?;
    if d.len() != 2 * bs || outcome.residual as usize != bs {
        return Err(format!(
            "READ of 2 blocks into 3 blocks of buffer returned {} bytes, residual {}",
            d.len(),
            outcome.residual
        ));
    }
    Ok(())
}

/// A PERSISTENT RESERVE OUT parameter list: `key`, `sa_key`.
fn pr_params(key: u64, sa_key: u64) -> [u8; 24] {
    let mut p = [0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p
}

/// The persistent reservation type Write Exclusive – Registrants Only.
const WE_RO: u8 = 5;

/// WRITE(16) of `block` at `lba`.
fn write_block(t: &mut dyn Transport, lba: u64, block: &[u8]) -> Completion {
    run_out(
        t,
        Cdb::Write16 {
            lba,
            blocks: 1,
            flags: RwFlags::default(),
        },
        block,
    )
}

/// PERSISTENT RESERVE OUT `action` of `pr_type` with `key` and `sa_key`.
fn pr_out(t: &mut dyn Transport, action: u8, pr_type: u8, key: u64, sa_key: u64) -> Completion {
    let cdb = Cdb::PersistentReserveOut {
        service_action: action,
        scope: 0,
        pr_type,
        param_len: 24,
    };
    run_out(t, cdb, &pr_params(key, sa_key))
}

/// TEST UNIT READY until GOOD (at most 8 times): clears the unit
/// attentions pending for this path's I_T nexus.
pub fn drain_unit_attentions(t: &mut dyn Transport) -> Check {
    for _ in 0..8 {
        match run_none(t, Cdb::TestUnitReady).into_result() {
            Ok(_) => return Ok(()),
            Err(CommandError::CheckCondition(s)) if s.key == SenseKey::UNIT_ATTENTION => {}
            Err(e) => return Err(format!("TEST UNIT READY: {e}")),
        }
    }
    Err("TEST UNIT READY still reports UNIT ATTENTION after 8 tries".into())
}

/// A unit attention made on purpose and seen through `b`: `a` preempts
/// `b`'s persistent-reservation registration, so `b`'s next command ends
/// in CHECK CONDITION, UNIT ATTENTION, REGISTRATIONS PREEMPTED (2Ah/05h),
/// and the one after it succeeds. Leaves the LUN without keys.
pub fn preempted_unit_attention(a: &mut dyn Transport, b: &mut dyn Transport) -> Check {
    drain_unit_attentions(a)?;
    drain_unit_attentions(b)?;
    good(pr_out(a, 6, 0, 0, 0), "a unregistering")?;
    good(pr_out(b, 6, 0, 0, 0), "b unregistering")?;
    good(pr_out(a, 0, 0, 0, 0xA1), "a registers")?;
    good(pr_out(b, 0, 0, 0, 0xB2), "b registers")?;
    good(pr_out(a, 1, WE_RO, 0xA1, 0), "a reserves")?;
    good(pr_out(a, 4, WE_RO, 0xA1, 0xB2), "a preempts b")?;
    let c = run_none(b, Cdb::TestUnitReady);
    let seen = match c.into_result() {
        Err(CommandError::CheckCondition(s)) if s.key == SenseKey::UNIT_ATTENTION => s,
        other => {
            return Err(format!(
                "b's TEST UNIT READY after the preemption: want UNIT ATTENTION, got {other:?}"
            ))
        }
    };
    if seen.asc.0 != 0x2A {
        return Err(format!(
            "b's unit attention is {seen}, want 2Ah/xxh (PR changes)"
        ));
    }
    good(
        run_none(b, Cdb::TestUnitReady),
        "b's second TEST UNIT READY",
    )?;
    good(pr_out(a, 3, 0, 0xA1, 0), "a clears")?;
    if !pr_keys(a)?.is_empty() {
        return Err("keys survive CLEAR".into());
    }
    Ok(())
}

/// The unit attention `t`'s next command meets, `None` when it succeeds.
fn next_unit_attention(t: &mut dyn Transport) -> Result<Option<Asc>, String> {
    match run_none(t, Cdb::TestUnitReady).into_result() {
        Ok(_) => Ok(None),
        Err(CommandError::CheckCondition(s)) if s.key == SenseKey::UNIT_ATTENTION => {
            Ok(Some(s.asc))
        }
        Err(e) => Err(format!("TEST UNIT READY: {e}")),
    }
}

/// Two I_T nexuses, `a` and `c`, on one backstore (LIO's device: two
/// initiators mapped to the same TCMU backstore), and `other`, another
/// backstore of the same array LUN (another host's, as the set-up scripts
/// give every host its own). LIO's core, not the backstore, keeps the
/// persistent reservations and the unit attentions, per node ACL and
/// mapped LUN, and per backstore: `a`'s Write Exclusive – Registrants Only
/// reservation shuts unregistered `c` out (RESERVATION CONFLICT) but not
/// `other`, whose backstore LIO does not know to be the same LUN; when `a`
/// releases, registrant `c` alone gets RESERVATIONS RELEASED (2Ah/04h),
/// `a` and `other` none; when `a` clears, `c` gets RESERVATIONS PREEMPTED
/// (2Ah/03h). Block `lba` is written. Leaves the backstores without keys
/// and with no unit attention pending.
pub fn two_nexuses_on_one_backstore(
    a: &mut dyn Transport,
    c: &mut dyn Transport,
    other: &mut dyn Transport,
    lba: u64,
) -> Check {
    let (_, bs) = capacity(a)?;
    let block = vec![0xC5u8; bs as usize];
    let write = |t: &mut dyn Transport| write_block(t, lba, &block);
    let clean = |t: &mut dyn Transport, who: &str| -> Check {
        drain_unit_attentions(t)?;
        good(pr_out(t, 6, 0, 0, 0), &format!("{who} unregistering"))
    };
    clean(a, "a")?;
    clean(c, "c")?;
    clean(other, "other")?;
    good(pr_out(a, 0, 0, 0, 0xA1), "a registers")?;
    if pr_keys(c)? != [0xA1] {
        return Err(format!(
            "READ KEYS through c: {:?}, want [0xA1]",
            pr_keys(c)?
        ));
    }
    if !pr_keys(other)?.is_empty() {
        return Err(format!(
            "READ KEYS through the other backstore: {:?}, want none (LIO keeps registrations per backstore)",
            pr_keys(other)?
        ));
    }
    good(pr_out(a, 1, WE_RO, 0xA1, 0), "a reserves")?;
    conflict(write(c), "c's WRITE on a's backstore, unregistered")?;
    good(
        write(other),
        "the other backstore's WRITE while a holds the reservation on its own",
    )?;
    good(pr_out(c, 0, 0, 0, 0xC3), "c registers")?;
    good(write(c), "c's WRITE, registered")?;
    good(pr_out(a, 2, WE_RO, 0xA1, 0), "a releases")?;
    let seen = (
        next_unit_attention(a)?,
        next_unit_attention(c)?,
        next_unit_attention(other)?,
    );
    if seen != (None, Some(Asc::RESERVATIONS_RELEASED), None) {
        return Err(format!(
            "after a's release (a, c, other): {seen:?}, want (None, Some(RESERVATIONS RELEASED), None)"
        ));
    }
    good(pr_out(a, 3, 0, 0xA1, 0), "a clears")?;
    let seen = (next_unit_attention(a)?, next_unit_attention(c)?);
    if seen != (None, Some(Asc::RESERVATIONS_PREEMPTED)) {
        return Err(format!(
            "after a's clear (a, c): {seen:?}, want (None, Some(RESERVATIONS PREEMPTED))"
        ));
    }
    if !pr_keys(a)?.is_empty() {
        return Err(format!("keys survive CLEAR: {:?}", pr_keys(a)?));
    }
    drain_unit_attentions(a)?;
    drain_unit_attentions(c)?;
    drain_unit_attentions(other)
}

/// The registered keys (READ KEYS).
fn pr_keys(t: &mut dyn Transport) -> Result<Vec<u64>, String> {
    let c = run_in(
        t,
        Cdb::PersistentReserveIn {
            service_action: 0,
            alloc_len: 1024,
        },
        1024,
    );
    let (data, _) = c.into_result().map_err(|e| format!("READ KEYS: {e}"))?;
    let len = be_u32(&data, 4).ok_or("READ KEYS: short header")? as usize;
    (0..len / 8)
        .map(|i| be_u64(&data, 8 + 8 * i).ok_or_else(|| "READ KEYS: short list".to_string()))
        .collect()
}

/// The reservation's (key, type), if any (READ RESERVATION).
fn pr_reservation(t: &mut dyn Transport) -> Result<Option<(u64, u8)>, String> {
    let c = run_in(
        t,
        Cdb::PersistentReserveIn {
            service_action: 1,
            alloc_len: 64,
        },
        64,
    );
    let (data, _) = c
        .into_result()
        .map_err(|e| format!("READ RESERVATION: {e}"))?;
    match be_u32(&data, 4) {
        Some(0) => Ok(None),
        Some(_) => {
            let key = be_u64(&data, 8).ok_or("READ RESERVATION: short")?;
            let ty = *data.get(21).ok_or("READ RESERVATION: short")? & 0x0F;
            Ok(Some((key, ty)))
        }
        None => Err("READ RESERVATION: short header".into()),
    }
}

fn good(c: Completion, what: &str) -> Check {
    c.into_result()
        .map(|_| ())
        .map_err(|e| format!("{what}: {e}"))
}

fn conflict(c: Completion, what: &str) -> Check {
    match c.into_result() {
        Err(CommandError::ReservationConflict) => Ok(()),
        Err(e) => Err(format!("{what}: expected RESERVATION CONFLICT, got {e}")),
        Ok(_) => Err(format!("{what}: expected RESERVATION CONFLICT, got GOOD")),
    }
}

/// Persistent reservations on one LUN seen by two initiators `a` and `b`:
/// under Write Exclusive – Registrants Only held by `a`, the unregistered
/// `b` may read block `lba` but its WRITE ends in RESERVATION CONFLICT, until
/// it registers. Leaves the LUN with no registrations.
pub fn persistent_reservations(a: &mut dyn Transport, b: &mut dyn Transport, lba: u64) -> Check {
    let (_, bs) = capacity(a)?;
    let block = vec![0x5Au8; bs as usize];
    let write = |t: &mut dyn Transport| write_block(t, lba, &block);
    let read = |t: &mut dyn Transport| {
        run_in(
            t,
            Cdb::Read16 {
                lba,
                blocks: 1,
                flags: RwFlags::default(),
            },
            bs as usize,
        )
    };
    // A clean start: both unregistered (REGISTER AND IGNORE EXISTING KEY, 0).
    good(pr_out(a, 6, 0, 0, 0), "a unregistering")?;
    good(pr_out(b, 6, 0, 0, 0), "b unregistering")?;
    if !pr_keys(a)?.is_empty() {
        return Err("keys remain after both unregistered".into());
    }
    good(pr_out(a, 0, 0, 0, 0xA1), "a registers")?;
    if pr_keys(b)? != [0xA1] {
        return Err(format!("READ KEYS from b: {:?}, want [0xA1]", pr_keys(b)?));
    }
    good(pr_out(a, 1, WE_RO, 0xA1, 0), "a reserves")?;
    if pr_reservation(b)? != Some((0xA1, WE_RO)) {
        return Err(format!("READ RESERVATION: {:?}", pr_reservation(b)?));
    }
    conflict(pr_out(b, 1, WE_RO, 0xB2, 0), "b reserving unregistered")?;
    conflict(write(b), "b's WRITE, unregistered")?;
    good(read(b), "b's READ, unregistered")?;
    good(write(a), "a's WRITE, the holder")?;
    good(pr_out(b, 0, 0, 0, 0xB2), "b registers")?;
    good(write(b), "b's WRITE, registered")?;
    // Unregister b, release and clear: the LUN is open to all again.
    good(pr_out(b, 0, 0, 0xB2, 0), "b unregisters")?;
    good(pr_out(a, 2, WE_RO, 0xA1, 0), "a releases")?;
    good(pr_out(a, 3, 0, 0xA1, 0), "a clears")?;
    if pr_reservation(a)?.is_some() || !pr_keys(a)?.is_empty() {
        return Err("a reservation or keys survive CLEAR".into());
    }
    good(write(b), "b's WRITE after CLEAR")
}

/// STP's fencing of a block-mode STG member ([`stp_core::fence`]) on one
/// LUN: host 0 joins through `a`, host 1 through both its paths `b1` and
/// `b2`; the third initiator `c`'s WRITE to block `lba` conflicts while
/// the participants' succeed (on every path); host 0 removes host 1, whose
/// WRITE then conflicts; host 1 joins again; host 0 leaves, releasing the
/// reservation, and host 1 takes it back by joining. Leaves the LUN with
/// no registrations.
pub fn fencing(
    a: Box<dyn Transport>,
    b1: Box<dyn Transport>,
    b2: Box<dyn Transport>,
    c: &mut dyn Transport,
    lba: u64,
) -> Check {
    use stp_core::fence;
    const STG: u32 = 9;
    let (_, bs) = capacity(c)?;
    let block = vec![0xC3u8; bs as usize];
    // A WRITE, past the unit attentions reservation changes owe the nexus
    // (REGISTRATIONS PREEMPTED, RESERVATIONS RELEASED).
    let write = |t: &mut dyn Transport| {
        let mut tries = 0;
        loop {
            let c = write_block(t, lba, &block);
            let ua = matches!(&c.result, Ok(o) if o.check().err().and_then(|e| e.sense().map(|s| s.key)) == Some(SenseKey::UNIT_ATTENTION));
            tries += 1;
            if !ua || tries > 4 {
                return c;
            }
        }
    };
    // A clean start.
    good(pr_out(c, 6, 0, 0, 0), "c unregistering")?;
    let mut host0 = vec![vec![a]];
    let mut host1 = vec![vec![b1, b2]];
    for t in host0[0].iter_mut().chain(host1[0].iter_mut()) {
        good(pr_out(t.as_mut(), 6, 0, 0, 0), "unregistering")?;
    }
    if pr_reservation(c)?.is_some() {
        good(pr_out(c, 6, 0, 0, 0xC0FFEE), "c registers to clear")?;
        good(
            pr_out(c, 3, 0, 0xC0FFEE, 0),
            "c clears a leftover reservation",
        )?;
    }
    fence::join(&mut host0, STG, 0).map_err(|e| format!("host 0 joins: {e}"))?;
    fence::join(&mut host1, STG, 1).map_err(|e| format!("host 1 joins: {e}"))?;
    let st = fence::status(&mut host0).map_err(|e| e.to_string())?;
    if st[0].hosts(STG) != [0, 1] || !st[0].fenced(STG) {
        return Err(format!("status after both joined: {st:?}"));
    }
    conflict(write(c), "the third initiator's WRITE")?;
    good(write(host0[0][0].as_mut()), "host 0's WRITE")?;
    for (i, t) in host1[0].iter_mut().enumerate() {
        good(write(t.as_mut()), &format!("host 1's WRITE on path {i}"))?;
    }
    fence::remove(&mut host0, STG, 0, 1).map_err(|e| format!("host 0 removes host 1: {e}"))?;
    for (i, t) in host1[0].iter_mut().enumerate() {
        conflict(
            write(t.as_mut()),
            &format!("removed host 1's WRITE on path {i}"),
        )?;
    }
    good(
        write(host0[0][0].as_mut()),
        "host 0's WRITE after removing host 1",
    )?;
    fence::join(&mut host1, STG, 1).map_err(|e| format!("host 1 joins again: {e}"))?;
    good(
        write(host1[0][1].as_mut()),
        "host 1's WRITE after joining again",
    )?;
    fence::leave(&mut host0, STG, 0).map_err(|e| format!("host 0 leaves: {e}"))?;
    let st = fence::status(&mut host1).map_err(|e| e.to_string())?;
    if st[0].hosts(STG) != [1] {
        return Err(format!("status after host 0 left: {st:?}"));
    }
    if !st[0].fenced(STG) {
        // Host 0 held the reservation: leaving released it; host 1 takes it.
        fence::join(&mut host1, STG, 1).map_err(|e| format!("host 1 re-reserves: {e}"))?;
    }
    let st = fence::status(&mut host1).map_err(|e| e.to_string())?;
    if !st[0].fenced(STG) {
        return Err(format!("not fenced after host 1 re-joined: {st:?}"));
    }
    conflict(write(c), "the third initiator's WRITE at the end")?;
    conflict(write(host0[0][0].as_mut()), "host 0's WRITE after it left")?;
    // Clean up: host 1 leaves and releases; nothing remains.
    fence::leave(&mut host1, STG, 1).map_err(|e| format!("host 1 leaves: {e}"))?;
    if pr_reservation(c)?.is_some() || !pr_keys(c)?.is_empty() {
        return Err("a reservation or keys survive the last host leaving".into());
    }
    good(write(c), "c's WRITE once nobody fences")
}
