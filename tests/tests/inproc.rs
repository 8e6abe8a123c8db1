//! The shared conformance bodies and array-specific behaviour, against the
//! in-process simulated array.

use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use scsi::cdb::{Cdb, PageControl, RwFlags, VendorCdb};
use scsi::sense::FieldPointer;
use scsi::transport::SubmitError;
use scsi::{
    Asc, CdbBuf, Command, CommandError, Completion, DataDirection, IoBuf, Opcode, ScsiStatus,
    SenseKey,
};
use scsi::{ScsiStatus as S, Transport};
use sim_target::array::Lun;
use sim_target::{Array, Host, InProcOptions, LunConfig, Task, TaskResult, VendorHandler};
use stp_tests::*;

fn array(luns: u64) -> Array {
    let a = Array::new();
    for id in 0..luns {
        a.add_lun(id, LunConfig::new(id, 1 << 20, 512)).unwrap();
    }
    a
}

fn ok(r: Check) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn persistent_reservations_fence_an_unregistered_host() {
    let a = array(1);
    let (h1, h2) = (Host::login(&a, "host-a"), Host::login(&a, "host-b"));
    let (mut t1, mut t2) = (h1.open(0).unwrap(), h2.open(0).unwrap());
    ok(persistent_reservations(&mut t1, &mut t2, 42));
}

#[test]
fn fencing_refuses_a_third_initiators_write() {
    let a = array(1);
    let h0 = Host::login_through(&a, "host-0", 1);
    let (h1a, h1b) = (
        Host::login_through(&a, "host-1-p1", 1),
        Host::login_through(&a, "host-1-p2", 2),
    );
    let third = Host::login(&a, "intruder");
    ok(stp_tests::fencing(
        Box::new(h0.open(0).unwrap()),
        Box::new(h1a.open(0).unwrap()),
        Box::new(h1b.open(0).unwrap()),
        &mut third.open(0).unwrap(),
        42,
    ));
}

#[test]
fn two_hosts_see_one_lun() {
    let a = array(2);
    let (h1, h2) = (Host::login(&a, "host-a"), Host::login(&a, "host-b"));
    for lun in 0..2 {
        ok(same_identity(
            &mut h1.open(lun).unwrap(),
            &mut h2.open(lun).unwrap(),
        ));
    }
    // Different LUNs have different identities.
    let i0 = scsi::inquiry::identify(&mut h1.open(0).unwrap()).unwrap();
    let i1 = scsi::inquiry::identify(&mut h1.open(1).unwrap()).unwrap();
    assert_ne!(i0.preferred_id(), i1.preferred_id());
    assert_eq!(i0.serial.as_deref(), Some("STPSIM0000000000"));
}

/// A transport that records the tags it submits and reaps, in order.
struct Recorder<T> {
    inner: T,
    submitted: Vec<u64>,
    reaped: Vec<u64>,
}

impl<T> Recorder<T> {
    fn new(inner: T) -> Recorder<T> {
        Recorder {
            inner,
            submitted: Vec::new(),
            reaped: Vec::new(),
        }
    }

    /// True when some completion came back in another order than its
    /// command was submitted.
    fn reordered(&self) -> bool {
        self.submitted != self.reaped
    }
}

impl<T: Transport> Transport for Recorder<T> {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        let tag = cmd.tag;
        self.inner.submit(cmd)?;
        self.submitted.push(tag);
        Ok(())
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let first = out.len();
        let n = self.inner.reap(out, wait)?;
        self.reaped.extend(out[first..].iter().map(|c| c.tag));
        Ok(n)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn write_on_one_host_read_on_the_other_out_of_order() {
    let a = array(1);
    let (h1, h2) = (Host::login(&a, "host-a"), Host::login(&a, "host-b"));
    // Commands execute in a shuffled order and complete in another one.
    let opts = |seed| InProcOptions {
        queue_depth: 16,
        reorder_seed: Some(seed),
        shuffle_execution: true,
        ..InProcOptions::default()
    };
    let mut t1 = Recorder::new(h1.open_with(0, opts(1)).unwrap());
    let mut t2 = Recorder::new(h2.open_with(0, opts(2)).unwrap());
    ok(write_here_read_there(&mut t1, &mut t2, 100, 300, 16));
    // The seeds make this deterministic: the body really met reordering.
    assert!(t1.reordered(), "the writes completed in submission order");
    assert!(t2.reordered(), "the reads completed in submission order");
    // Every command completed exactly once.
    for t in [&t1, &t2] {
        let mut reaped = t.reaped.clone();
        reaped.sort_unstable();
        assert_eq!(reaped, t.submitted);
    }
}

#[test]
fn shuffle_execution_reorders_execution_not_just_completion() {
    // Two WRITEs of one block, submitted together: the one executed last
    // wins. Without shuffled execution the second always wins; with it,
    // some seeds execute the second first. Completion order cannot affect
    // this: only execution order can.
    let mut first_won = 0;
    for seed in 0..16u64 {
        let a = array(1);
        let opts = InProcOptions {
            queue_depth: 16,
            reorder_seed: Some(seed),
            shuffle_execution: true,
            ..InProcOptions::default()
        };
        let mut t = Host::login(&a, "h").open_with(0, opts).unwrap();
        for (tag, byte) in [(1u64, 0x11u8), (2, 0x22)] {
            let w = Cdb::Write10 {
                lba: 7,
                blocks: 1,
                flags: RwFlags::default(),
            };
            t.submit(Command::data_out(w.emit(), IoBuf::from_slice(&[byte; 512])).with_tag(tag))
                .unwrap();
        }
        // Nothing executes before reap.
        assert_eq!(a.lun(0).unwrap().store().allocated(), 0);
        let mut out = Vec::new();
        while out.len() < 2 {
            t.reap(&mut out, Some(Duration::from_secs(5))).unwrap();
        }
        for c in out {
            c.into_result().unwrap();
        }
        let r = Cdb::Read10 {
            lba: 7,
            blocks: 1,
            flags: RwFlags::default(),
        };
        let (d, _) = run_in(&mut t, r, 512).into_result().unwrap();
        match d[0] {
            0x11 => first_won += 1,
            0x22 => {}
            other => panic!("block holds 0x{other:02X}"),
        }
    }
    assert!(
        (1..16).contains(&first_won),
        "execution order never (or always) reversed: {first_won} of 16"
    );

    // Off (the default): commands execute in submission order, at submit.
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let w = Cdb::Write10 {
        lba: 7,
        blocks: 1,
        flags: RwFlags::default(),
    };
    t.submit(Command::data_out(w.emit(), IoBuf::from_slice(&[0x33; 512])))
        .unwrap();
    assert_eq!(a.lun(0).unwrap().store().allocated(), 64 * 1024);
    let mut out = Vec::new();
    t.reap(&mut out, None).unwrap();
}

#[test]
fn standard_errors_and_probes() {
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    ok(standard_errors(&mut t));
    ok(sd_probe_commands(&mut t));
    ok(multi_block_and_residual(&mut t, 4096));
    ok(unknown_vendor_opcode(&mut t, 0xC3));
    ok(transfer_length_mismatches(&mut t, 8192));
}

/// The body the VM runs once per engine (bsg, sg v3, SG_IO) to prove they
/// decode sense and residual alike, here on the in-process array directly
/// and through the shared engine's routing.
#[test]
fn sense_and_residual_decode_alike_in_process() {
    let a = array(1);
    let host = Host::login(&a, "h");
    let mut direct = host.open(0).unwrap();
    let shared = scsi::SharedEngine::start_polled(Box::new(host.open(0).unwrap())).unwrap();
    let mut handle = shared.handle();
    let one = sense_and_residual(&mut direct).unwrap_or_else(|e| panic!("{e}"));
    let two = sense_and_residual(&mut handle).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(one, two);
    assert_eq!(one[1].sense, Some((0x05, 0x21, 0x00)), "{:?}", one[1]);
}

#[test]
fn preemption_makes_a_unit_attention() {
    let a = array(1);
    let mut t0 = Host::login(&a, "h0").open(0).unwrap();
    let mut t1 = Host::login(&a, "h1").open(0).unwrap();
    ok(preempted_unit_attention(&mut t0, &mut t1));
}

#[test]
fn concurrent_hosts_on_threads() {
    let a = array(1);
    let mut handles = Vec::new();
    for writer in 0..4u8 {
        let host = Host::login(&a, &format!("host-{writer}"));
        handles.push(thread::spawn(move || {
            let mut t = host.open(0).unwrap();
            // Each writer owns a disjoint range of 64 blocks.
            let base = u64::from(writer) * 64;
            for i in 0..64 {
                let lba = base + i;
                let cdb = Cdb::Write10 {
                    lba: lba as u32,
                    blocks: 1,
                    flags: RwFlags::default(),
                };
                run_out(&mut t, cdb, &pattern(writer, lba, 512))
                    .into_result()
                    .unwrap();
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let mut t = Host::login(&a, "reader").open(0).unwrap();
    let r = Cdb::Read16 {
        lba: 0,
        blocks: 256,
        flags: RwFlags::default(),
    };
    let (data, _) = run_in(&mut t, r, 256 * 512).into_result().unwrap();
    for lba in 0..256u64 {
        let writer = (lba / 64) as u8;
        let block = &data[lba as usize * 512..][..512];
        assert_eq!(block, &pattern(writer, lba, 512)[..], "block {lba}");
    }
}

#[test]
fn unit_attention_after_power_on_and_reset() {
    let a = array(2);
    let h1 = Host::login(&a, "h1");
    let h2 = Host::login(&a, "h2");
    let mut t1 = h1.open(0).unwrap();
    let mut t2 = h2.open(0).unwrap();
    // No UA at login.
    run_none(&mut t1, Cdb::TestUnitReady).into_result().unwrap();

    a.power_on();
    // INQUIRY passes through without clearing the UA.
    run_in(
        &mut t1,
        Cdb::Inquiry {
            evpd: false,
            page_code: 0,
            alloc_len: 36,
        },
        36,
    )
    .into_result()
    .unwrap();
    // The next other command reports it, once.
    ok(expect_check(
        run_none(&mut t1, Cdb::TestUnitReady),
        SenseKey::UNIT_ATTENTION,
        Asc::POWER_ON_OCCURRED,
        "TUR after power on",
    ));
    run_none(&mut t1, Cdb::TestUnitReady).into_result().unwrap();
    // The other host has its own UA; REQUEST SENSE reports and clears it.
    let (sense, _) = run_in(
        &mut t2,
        Cdb::RequestSense {
            desc: false,
            alloc_len: 252,
        },
        252,
    )
    .into_result()
    .unwrap();
    let s = scsi::Sense::parse(&sense).unwrap();
    assert_eq!(
        (s.key, s.asc),
        (SenseKey::UNIT_ATTENTION, Asc::POWER_ON_OCCURRED)
    );
    run_none(&mut t2, Cdb::TestUnitReady).into_result().unwrap();

    // The power-on UA is per LUN too: host 1 still has it on LUN 1.
    let mut other = h1.open(1).unwrap();
    ok(expect_check(
        run_none(&mut other, Cdb::TestUnitReady),
        SenseKey::UNIT_ATTENTION,
        Asc::POWER_ON_OCCURRED,
        "TUR on LUN 1 after power on",
    ));

    // A LUN reset raises a UA on that LUN only; it is retryable.
    a.reset_lun(0);
    let err = run_none(&mut t1, Cdb::TestUnitReady)
        .into_result()
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.sense().unwrap().asc, Asc::BUS_DEVICE_RESET_OCCURRED);
    run_none(&mut other, Cdb::TestUnitReady)
        .into_result()
        .unwrap();
}

#[test]
fn lun_that_does_not_exist() {
    let a = array(1);
    let h = Host::login(&a, "h");
    assert!(h.open(5).unwrap_err().to_string().contains("no LUN 5"));
    // A task addressed to a missing LUN (as a stale path would send).
    let (tx, rx) = mpsc::channel();
    struct Capture(mpsc::Sender<(TaskResult, Vec<u8>)>, Vec<u8>);
    impl sim_target::Reply for Capture {
        fn data_len(&self) -> usize {
            self.1.len()
        }
        fn read_out(&self, _: usize, _: &mut [u8]) -> usize {
            0
        }
        fn write_in(&mut self, off: usize, src: &[u8]) -> usize {
            let n = src.len().min(self.1.len().saturating_sub(off));
            self.1[off..off + n].copy_from_slice(&src[..n]);
            n
        }
        fn complete(self: Box<Self>, r: TaskResult) {
            let data = self.1[..r.data_in.min(self.1.len())].to_vec();
            self.0.send((r, data)).unwrap();
        }
    }
    let submit = |cdb: Cdb, len| {
        a.submit(Task {
            initiator: h.initiator(),
            lun: 5,
            cdb: cdb.emit(),
            direction: DataDirection::FromDevice,
            reply: Box::new(Capture(tx.clone(), vec![0; len])),
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap()
    };
    let (r, _) = submit(Cdb::ReadCapacity10, 8);
    assert_eq!(r.status, S::CHECK_CONDITION);
    assert_eq!(r.sense.unwrap().asc, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let (r, data) = submit(
        Cdb::Inquiry {
            evpd: false,
            page_code: 0,
            alloc_len: 36,
        },
        36,
    );
    assert_eq!(r.status, S::GOOD);
    assert_eq!(r.data_in, 36);
    // Byte 0 = 0x3F: peripheral qualifier 1, device type 0x1F, as LIO.
    ok(missing_lun_inquiry(&data));
    assert_eq!(data[0], 0x3F);
    // REQUEST SENSE to it: GOOD, with LOGICAL UNIT NOT SUPPORTED as data.
    let (r, data) = submit(
        Cdb::RequestSense {
            desc: false,
            alloc_len: 18,
        },
        18,
    );
    assert_eq!(r.status, S::GOOD);
    let s = scsi::Sense::parse(&data).unwrap();
    assert_eq!(s.asc, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
}

#[test]
fn write_with_wrong_data_length_is_refused_and_stores_nothing() {
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let w = Cdb::Write10 {
        lba: 10,
        blocks: 2,
        flags: RwFlags::default(),
    };
    // As LIO (seen in the VM): INVALID FIELD IN COMMAND INFORMATION UNIT.
    ok(expect_check(
        run_out(&mut t, w, &[0xEE; 512]),
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_FIELD_IN_COMMAND_IU,
        "WRITE of 2 blocks with 1 block of data",
    ));
    let r = Cdb::Read10 {
        lba: 10,
        blocks: 2,
        flags: RwFlags::default(),
    };
    // A READ into a buffer shorter than the transfer: refused, as LIO does.
    ok(expect_check(
        run_in(&mut t, r, 512),
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_FIELD_IN_CDB,
        "READ of 2 blocks into 1 block of buffer",
    ));
    let (d, _) = run_in(&mut t, r, 1024).into_result().unwrap();
    assert!(d.iter().all(|&b| b == 0));
    assert_eq!(a.lun(0).unwrap().store().allocated(), 0);
}

/// A vendor handler that holds every command until released, like the
/// mailbox's long-poll RECEIVE, and echoes the handle as data-in.
#[derive(Default)]
struct Holder {
    held: Mutex<Vec<(VendorCdb, Task)>>,
}

impl VendorHandler for Holder {
    fn direction(&self, opcode: Opcode) -> Option<DataDirection> {
        (opcode == Opcode(0xC1)).then_some(DataDirection::FromDevice)
    }
    fn execute(&self, _lun: &Arc<Lun>, cdb: VendorCdb, task: Task) {
        self.held.lock().unwrap().push((cdb, task));
    }
}

impl Holder {
    fn release_all(&self) -> usize {
        let held: Vec<_> = std::mem::take(&mut *self.held.lock().unwrap());
        let n = held.len();
        for (cdb, task) in held {
            let len = cdb.length as usize;
            task.respond(&cdb.handle.to_be_bytes(), len);
        }
        n
    }
}

#[test]
fn held_vendor_commands_complete_later_from_another_thread() {
    let a = array(1);
    let holder = Arc::new(Holder::default());
    a.set_vendor_handler(holder.clone());
    let mut t = Host::login(&a, "h").open(0).unwrap();
    for handle in 0..5u32 {
        let cdb = VendorCdb::new(Opcode(0xC1), 0, handle, 4).unwrap();
        t.submit(Command::data_in(Cdb::Vendor(cdb).emit(), 4).with_tag(handle.into()))
            .unwrap();
    }
    assert_eq!(t.in_flight(), 5);
    // Nothing is ready while held.
    let mut out = Vec::new();
    assert_eq!(
        t.reap(&mut out, Some(Duration::from_millis(20))).unwrap(),
        0
    );
    // Another vendor opcode is still refused at once.
    let other = VendorCdb::new(Opcode(0xC2), 0, 0, 0).unwrap();
    t.submit(Command::no_data(Cdb::Vendor(other).emit()).with_tag(99))
        .unwrap();
    t.reap(&mut out, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag, 99);
    out.clear();

    let h2 = holder.clone();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        h2.release_all()
    });
    while out.len() < 5 {
        t.reap(&mut out, Some(Duration::from_secs(5))).unwrap();
    }
    assert_eq!(releaser.join().unwrap(), 5);
    for c in out {
        let tag = c.tag;
        let (d, _) = c.into_result().unwrap();
        assert_eq!(&d[..], &(tag as u32).to_be_bytes());
    }
    // REPORT SUPPORTED OPERATION CODES lists the vendor opcode.
    let rso = Cdb::ReportSupportedOpcodes {
        rctd: false,
        reporting_options: 0,
        opcode: 0,
        service_action: 0,
        alloc_len: 4096,
    };
    let (d, _) = run_in(&mut t, rso, 4096).into_result().unwrap();
    let listed: Vec<u8> = d[4..].chunks(8).map(|e| e[0]).collect();
    assert!(listed.contains(&0xC1) && listed.contains(&0x88) && !listed.contains(&0xC2));
}

#[test]
fn a_held_command_times_out_and_a_dropped_one_aborts() {
    let a = array(1);
    let holder = Arc::new(Holder::default());
    a.set_vendor_handler(holder.clone());
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let cdb = VendorCdb::new(Opcode(0xC1), 0, 7, 4).unwrap();
    let cmd = Command::data_in(Cdb::Vendor(cdb).emit(), 4)
        .with_tag(7)
        .with_timeout(Duration::from_millis(30));
    t.submit(cmd).unwrap();
    let mut out = Vec::new();
    t.reap(&mut out, None).unwrap();
    assert!(matches!(out[0].result, Err(CommandError::Timeout(_))));
    assert_eq!(t.in_flight(), 0);
    // The late completion of the timed-out command is discarded.
    holder.release_all();
    out.clear();
    assert_eq!(
        t.reap(&mut out, Some(Duration::from_millis(10))).unwrap(),
        0
    );

    // A handler that drops a task without completing it: TASK ABORTED.
    t.submit(Command::data_in(Cdb::Vendor(cdb).emit(), 4).with_tag(8))
        .unwrap();
    holder.held.lock().unwrap().clear();
    t.reap(&mut out, Some(Duration::from_secs(5))).unwrap();
    let o = out.pop().unwrap().result.unwrap();
    assert_eq!(o.status, ScsiStatus::TASK_ABORTED);
}

#[test]
fn queue_depth_is_enforced_and_the_command_is_returned() {
    let a = array(1);
    a.set_vendor_handler(Arc::new(Holder::default()));
    let opts = InProcOptions {
        queue_depth: 2,
        ..InProcOptions::default()
    };
    let mut t = Host::login(&a, "h").open_with(0, opts).unwrap();
    let cdb = Cdb::Vendor(VendorCdb::new(Opcode(0xC1), 0, 1, 4).unwrap()).emit();
    t.submit(Command::data_in(cdb, 4)).unwrap();
    t.submit(Command::data_in(cdb, 4)).unwrap();
    let e = t
        .submit(Command::data_out(cdb, IoBuf::from_slice(b"keep")))
        .unwrap_err();
    assert_eq!(&e.cmd.data[..], b"keep");
    assert!(e.to_string().contains("queue depth"), "{e}");
}

#[test]
fn sense_of_every_error_decodes() {
    // Every CHECK CONDITION the model produces carries parseable sense with
    // the right key (a regression net for the error paths).
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let cases: Vec<(Vec<u8>, SenseKey, Asc)> = vec![
        (
            vec![0x7B, 0, 0, 0, 0, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        ),
        (
            vec![0x12, 0, 0x80, 0, 36, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
        ),
        (
            vec![0x9E, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
        ),
        (
            vec![0x1A, 0, 0x3F, 0x01, 255, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
        ),
        (
            vec![0x1A, 0, 0xC8, 0, 255, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
        ),
        (
            vec![0x28, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
        ),
    ];
    for (bytes, key, asc) in cases {
        let cmd = Command::data_in(scsi::CdbBuf::new(&bytes).unwrap(), 255);
        let what = format!("{bytes:02x?}");
        ok(expect_check(t.execute(cmd), key, asc, &what));
    }
    // REPORT LUNS with an allocation length of 8 is no error (LIO does
    // not check it): the 8-byte header, clipped.
    let cmd = Command::data_in(
        scsi::CdbBuf::new(&[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]).unwrap(),
        255,
    );
    let (d, _) = t.execute(cmd).into_result().unwrap();
    assert_eq!(&d[..], &[0, 0, 0, 8, 0, 0, 0, 0]);
}

/// Runs raw CDB bytes as a data-in command with a `len`-byte buffer.
fn raw_in(t: &mut dyn Transport, cdb: &[u8], len: usize) -> Completion {
    t.execute(Command::data_in(CdbBuf::new(cdb).unwrap(), len))
}

/// The sense of a CHECK CONDITION, or a panic naming `what`.
fn sense_of(c: Completion, what: &str) -> scsi::Sense {
    match c.into_result() {
        Err(CommandError::CheckCondition(s)) => s,
        Err(e) => panic!("{what}: expected CHECK CONDITION, got {e}"),
        Ok(_) => panic!("{what}: expected CHECK CONDITION, got GOOD"),
    }
}

fn pointer(byte: u16, bit: Option<u8>) -> Option<FieldPointer> {
    Some(FieldPointer {
        in_cdb: true,
        bit,
        byte,
    })
}

#[test]
fn cdb_errors_leave_a_unit_attention_pending() {
    // LIO parses the CDB before it looks at unit attentions: a CDB it
    // rejects is ILLEGAL REQUEST and the UA waits for the next command.
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    a.power_on();
    let errors: Vec<(Completion, Asc, &str)> = vec![
        (
            raw_in(&mut t, &[0x7B, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0),
            Asc::INVALID_COMMAND_OPERATION_CODE,
            "opcode 0x7B",
        ),
        (
            run_in(
                &mut t,
                Cdb::Read16 {
                    lba: (1 << 20) - 1,
                    blocks: 2,
                    flags: RwFlags::default(),
                },
                1024,
            ),
            Asc::LBA_OUT_OF_RANGE,
            "READ past the end",
        ),
        (
            run_out(
                &mut t,
                Cdb::Write10 {
                    lba: 0,
                    blocks: 2,
                    flags: RwFlags::default(),
                },
                &[0; 512],
            ),
            Asc::INVALID_FIELD_IN_COMMAND_IU,
            "WRITE with a short data-out",
        ),
        (
            run_in(
                &mut t,
                Cdb::Read16 {
                    lba: 0,
                    blocks: 16385,
                    flags: RwFlags::default(),
                },
                512,
            ),
            Asc::INVALID_FIELD_IN_CDB,
            "READ over the transfer limit",
        ),
        (
            raw_in(&mut t, &[0x28, 0], 512),
            Asc::INVALID_FIELD_IN_CDB,
            "truncated READ(10)",
        ),
        (
            // A 2-byte REQUEST SENSE is too short: an error, not a report.
            raw_in(&mut t, &[0x03, 0], 252),
            Asc::INVALID_FIELD_IN_CDB,
            "2-byte REQUEST SENSE",
        ),
        (
            run_in(
                &mut t,
                Cdb::RequestSense {
                    desc: true,
                    alloc_len: 252,
                },
                252,
            ),
            Asc::INVALID_FIELD_IN_CDB,
            "REQUEST SENSE with DESC=1",
        ),
    ];
    for (c, asc, what) in errors {
        ok(expect_check(c, SenseKey::ILLEGAL_REQUEST, asc, what));
    }
    // Still pending: the next TUR reports it, once.
    ok(expect_check(
        run_none(&mut t, Cdb::TestUnitReady),
        SenseKey::UNIT_ATTENTION,
        Asc::POWER_ON_OCCURRED,
        "TUR after the rejected CDBs",
    ));
    run_none(&mut t, Cdb::TestUnitReady).into_result().unwrap();
}

#[test]
fn request_sense_reports_the_unit_attention_and_refuses_desc() {
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    a.reset_lun(0);
    // DESC=1: INVALID FIELD IN CDB at byte 1 bit 0 (LIO refuses it too).
    let s = sense_of(
        run_in(
            &mut t,
            Cdb::RequestSense {
                desc: true,
                alloc_len: 252,
            },
            252,
        ),
        "REQUEST SENSE DESC=1",
    );
    assert_eq!(s.asc, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(s.field_pointer(), pointer(1, Some(0)));
    // Fixed format reports the UA as data, GOOD status, clipped to the
    // allocation length of the CDB, and clears it.
    let (d, _) = raw_in(&mut t, &[0x03, 0, 0, 0, 14, 0], 252)
        .into_result()
        .unwrap();
    assert_eq!(d.len(), 14);
    let s = scsi::Sense::parse(&d).unwrap();
    assert_eq!(
        (s.key, s.asc),
        (SenseKey::UNIT_ATTENTION, Asc::BUS_DEVICE_RESET_OCCURRED)
    );
    run_none(&mut t, Cdb::TestUnitReady).into_result().unwrap();
    let (d, _) = run_in(
        &mut t,
        Cdb::RequestSense {
            desc: false,
            alloc_len: 18,
        },
        18,
    )
    .into_result()
    .unwrap();
    assert_eq!(scsi::Sense::parse(&d).unwrap().key, SenseKey::NO_SENSE);
}

#[test]
fn refused_transfers_carry_no_field_pointer() {
    // LIO reports these as plain INVALID FIELD IN CDB: no sense-key
    // specific bytes (there is no one field to point at).
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let read = |blocks| Cdb::Read16 {
        lba: 0,
        blocks,
        flags: RwFlags::default(),
    };
    let oversize = run_in(&mut t, read(16385), 512);
    // READ with a data-out buffer: the data phase goes the wrong way.
    let wrong_way = t.execute(Command::data_out(
        read(1).emit(),
        IoBuf::from_slice(&[0; 512]),
    ));
    let write = Cdb::Write16 {
        lba: 0,
        blocks: 1,
        flags: RwFlags::default(),
    };
    let long_write = run_out(&mut t, write, &[0; 1024]);
    let invalid = Asc::INVALID_FIELD_IN_CDB;
    for (c, asc, what) in [
        (oversize, invalid, "oversize READ"),
        (wrong_way, invalid, "READ with data-out"),
        (
            long_write,
            Asc::INVALID_FIELD_IN_COMMAND_IU,
            "WRITE of 1 block with 2 blocks of data",
        ),
    ] {
        let s = sense_of(c, what);
        assert_eq!(s.asc, asc, "{what}");
        assert_eq!(s.field_pointer(), None, "{what}");
        assert_eq!(s.sense_key_specific, None, "{what}");
    }
}

#[test]
fn huge_lun_capacity_and_block_descriptors() {
    // 2^33 blocks of 512 bytes (4 TiB): sparse storage makes it free.
    let a = Array::new();
    let blocks: u64 = 1 << 33;
    a.add_lun(0, LunConfig::new(0, blocks, 512)).unwrap();
    let mut t = Host::login(&a, "h").open(0).unwrap();

    // READ CAPACITY(10) clamps to 0xFFFFFFFF ("use READ CAPACITY(16)").
    let (d, _) = run_in(&mut t, Cdb::ReadCapacity10, 8)
        .into_result()
        .unwrap();
    assert_eq!(&d[..], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]);
    assert_eq!(capacity(&mut t).unwrap(), (blocks, 512));

    // MODE SENSE(6): short descriptor, 4-byte count all ones, byte 4
    // reserved, 3-byte block length.
    let ms6 = Cdb::ModeSense6 {
        dbd: false,
        page_control: PageControl::CURRENT,
        page_code: 0x08,
        subpage: 0,
        alloc_len: 255,
    };
    let (d, _) = run_in(&mut t, ms6, 255).into_result().unwrap();
    assert_eq!(d[3], 8);
    assert_eq!(&d[4..12], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]);

    // MODE SENSE(10) without LLBAA: the same short descriptor.
    let ms10 = |llbaa| Cdb::ModeSense10 {
        llbaa,
        dbd: false,
        page_control: PageControl::CURRENT,
        page_code: 0x08,
        subpage: 0,
        alloc_len: 255,
    };
    let (d, _) = run_in(&mut t, ms10(false), 255).into_result().unwrap();
    assert_eq!((d[4] & 1, &d[6..8]), (0, &[0u8, 8][..]));
    assert_eq!(&d[8..16], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 2, 0]);

    // With LLBAA: the long descriptor carries the full 8-byte count.
    let (d, _) = run_in(&mut t, ms10(true), 255).into_result().unwrap();
    assert_eq!((d[4] & 1, &d[6..8]), (1, &[0u8, 16][..]));
    assert_eq!(&d[8..16], &blocks.to_be_bytes());
    assert_eq!(&d[16..24], &[0, 0, 0, 0, 0, 0, 2, 0]);

    // A LUN that fits keeps its exact count in the short descriptor.
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let (d, _) = run_in(&mut t, ms6, 255).into_result().unwrap();
    assert_eq!(&d[4..12], &[0, 0x10, 0, 0, 0, 0, 2, 0]);
}

#[test]
fn report_supported_opcodes_options() {
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let rsoc = |rctd, reporting_options, opcode, service_action| Cdb::ReportSupportedOpcodes {
        rctd,
        reporting_options,
        opcode,
        service_action,
        alloc_len: 512,
    };
    let fails = |t: &mut dyn Transport, cdb: Cdb, what: &str| {
        let s = sense_of(run_in(t, cdb, 512), what);
        assert_eq!(
            (s.key, s.asc),
            (SenseKey::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB),
            "{what}"
        );
        s.field_pointer()
    };
    // RCTD = 1: every descriptor with a command timeouts descriptor.
    let (d, _) = run_in(&mut t, rsoc(true, 0, 0, 0), 4096)
        .into_result()
        .unwrap();
    let all = scsi::supported::AllCommands::parse(&d).unwrap();
    assert!(all.commands.len() > 20, "{all:?}");
    assert!(all.commands.iter().all(|c| c.timeouts.is_some()), "{all:?}");
    let (d, _) = run_in(&mut t, rsoc(true, 1, 0x28, 0), 512)
        .into_result()
        .unwrap();
    let one = scsi::supported::OneCommand::parse(&d).unwrap();
    assert_eq!((one.support, one.usage.len()), (3, 10));
    assert_eq!(one.timeouts, Some(scsi::supported::Timeouts::default()));
    // Option 2 for an opcode without service actions: byte 3.
    let p = fails(&mut t, rsoc(false, 2, 0x28, 0), "option 2, READ(10)");
    assert_eq!(p, pointer(3, None));
    // Option 1 for an opcode with service actions: byte 3.
    let p = fails(&mut t, rsoc(false, 1, 0x9E, 0x10), "option 1, 9Eh");
    assert_eq!(p, pointer(3, None));
    // Reserved reporting options.
    let p = fails(&mut t, rsoc(false, 4, 0x28, 0), "option 4");
    assert_eq!(p, pointer(2, Some(2)));

    let one = |t: &mut dyn Transport, cdb: Cdb| -> Vec<u8> {
        let (d, _) = run_in(t, cdb, 512).into_result().unwrap();
        d.to_vec()
    };
    // Option 1 and 2 as before.
    let d = one(&mut t, rsoc(false, 1, 0x28, 0));
    assert_eq!((d[1] & 7, &d[2..4], d[4]), (3, &[0u8, 10][..], 0x28));
    let d = one(&mut t, rsoc(false, 2, 0x9E, 0x10));
    assert_eq!((d[1] & 7, &d[2..4], d[4]), (3, &[0u8, 16][..], 0x9E));
    assert_eq!(d[5] & 0x1F, 0x10);
    assert_eq!(one(&mut t, rsoc(false, 2, 0x9E, 0x11)), [0, 1, 0, 0]);
    // Option 2 for an opcode the model does not have at all: unsupported.
    assert_eq!(one(&mut t, rsoc(false, 2, 0x7B, 0)), [0, 1, 0, 0]);
    // Option 3: the opcode, and the service action if it has them.
    let d = one(&mut t, rsoc(false, 3, 0x28, 0x1234));
    assert_eq!((d[1] & 7, &d[2..4], d[4]), (3, &[0u8, 10][..], 0x28));
    let d = one(&mut t, rsoc(false, 3, 0x9E, 0x10));
    assert_eq!((d[1] & 7, &d[2..4], d[4]), (3, &[0u8, 16][..], 0x9E));
    let d = one(&mut t, rsoc(false, 3, 0xA3, 0x0C));
    assert_eq!((d[1] & 7, &d[2..4], d[4]), (3, &[0u8, 12][..], 0xA3));
    assert_eq!(one(&mut t, rsoc(false, 3, 0x9E, 0x11)), [0, 1, 0, 0]);
    assert_eq!(one(&mut t, rsoc(false, 3, 0x7B, 0)), [0, 1, 0, 0]);
}

#[test]
fn report_luns_clips_and_uses_flat_addressing() {
    let a = Array::new();
    for id in [0u64, 5, 300] {
        a.add_lun(id, LunConfig::new(id, 1024, 512)).unwrap();
    }
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let rl = |select_report, alloc_len| Cdb::ReportLuns {
        select_report,
        alloc_len,
    };
    let (d, _) = run_in(&mut t, rl(0, 4096), 4096).into_result().unwrap();
    assert_eq!(&d[..8], &[0, 0, 0, 24, 0, 0, 0, 0]);
    assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    // Peripheral device addressing below 256.
    assert_eq!(&d[16..24], &[0, 5, 0, 0, 0, 0, 0, 0]);
    // Flat space addressing: 300 = 0x12C → 41 2C.
    assert_eq!(&d[24..32], &[0x41, 0x2C, 0, 0, 0, 0, 0, 0]);
    let full = d.to_vec();
    // Any SELECT REPORT value gets the same list.
    for select in [1, 2, 0x10, 0xFF] {
        let (d, _) = run_in(&mut t, rl(select, 4096), 4096)
            .into_result()
            .unwrap();
        assert_eq!(&d[..], &full[..], "SELECT REPORT 0x{select:02X}");
    }
    // Short allocation lengths clip; 0 is GOOD with no data.
    for alloc in [0u32, 1, 8, 15, 20] {
        let (d, o) = run_in(&mut t, rl(0, alloc), 4096).into_result().unwrap();
        assert_eq!(&d[..], &full[..alloc as usize], "alloc {alloc}");
        assert_eq!(o.residual as usize, 4096 - alloc as usize);
    }
}

#[test]
fn standard_inquiry_matches_lio() {
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let inq = Cdb::Inquiry {
        evpd: false,
        page_code: 0,
        alloc_len: 96,
    };
    let (d, _) = run_in(&mut t, inq, 96).into_result().unwrap();
    assert_eq!(d[0], 0x00, "connected direct-access block device");
    assert_eq!(d[3] & 0x10, 0, "HiSup must be clear, as LIO has it");
    assert_eq!(d[3] & 0x0F, 2, "response data format 2");
}

#[test]
fn huge_timeouts_and_waits_do_not_panic() {
    let a = array(1);
    let holder = Arc::new(Holder::default());
    a.set_vendor_handler(holder.clone());
    let mut t = Host::login(&a, "h").open(0).unwrap();
    // An ordinary command with the largest timeout.
    let c = t.execute(Command::no_data(Cdb::TestUnitReady.emit()).with_timeout(Duration::MAX));
    c.into_result().unwrap();
    // A held one never times out, and a Duration::MAX wait waits for it.
    let cdb = VendorCdb::new(Opcode(0xC1), 0, 9, 4).unwrap();
    t.submit(
        Command::data_in(Cdb::Vendor(cdb).emit(), 4)
            .with_tag(9)
            .with_timeout(Duration::MAX),
    )
    .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        t.reap(&mut out, Some(Duration::from_millis(20))).unwrap(),
        0
    );
    let h2 = holder.clone();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        h2.release_all()
    });
    assert_eq!(t.reap(&mut out, Some(Duration::MAX)).unwrap(), 1);
    assert_eq!(releaser.join().unwrap(), 1);
    let (d, _) = out.pop().unwrap().into_result().unwrap();
    assert_eq!(&d[..], &9u32.to_be_bytes());
    // And reap(None) with only a no-deadline command in flight blocks
    // (without spinning) until it completes.
    t.submit(
        Command::data_in(Cdb::Vendor(cdb).emit(), 4)
            .with_tag(10)
            .with_timeout(Duration::MAX),
    )
    .unwrap();
    let h2 = holder.clone();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(30));
        h2.release_all()
    });
    assert_eq!(t.reap(&mut out, None).unwrap(), 1);
    releaser.join().unwrap();
    assert_eq!(out[0].tag, 10);
}

#[test]
fn a_timed_out_held_command_is_marked_aborted() {
    let a = array(1);
    let holder = Arc::new(Holder::default());
    a.set_vendor_handler(holder.clone());
    let mut t = Host::login(&a, "h").open(0).unwrap();
    let cdb = VendorCdb::new(Opcode(0xC1), 0, 3, 4).unwrap();
    let held_aborted = |h: &Holder| -> Vec<bool> {
        h.held
            .lock()
            .unwrap()
            .iter()
            .map(|(_, task)| task.is_aborted())
            .collect()
    };
    t.submit(
        Command::data_in(Cdb::Vendor(cdb).emit(), 4)
            .with_tag(3)
            .with_timeout(Duration::from_millis(30)),
    )
    .unwrap();
    t.submit(Command::data_in(Cdb::Vendor(cdb).emit(), 4).with_tag(4))
        .unwrap();
    assert_eq!(held_aborted(&holder), [false, false]);
    let mut out = Vec::new();
    t.reap(&mut out, None).unwrap();
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].result, Err(CommandError::Timeout(_))));
    // The handler can tell: the timed-out one is aborted, the other not.
    assert_eq!(held_aborted(&holder), [true, false]);
    // Dropping the aborted task completes nothing; the live one still works.
    {
        let mut held = holder.held.lock().unwrap();
        held.retain(|(_, task)| !task.is_aborted());
        assert_eq!(held.len(), 1);
    }
    out.clear();
    assert_eq!(holder.release_all(), 1);
    t.reap(&mut out, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].tag, 4);
    assert_eq!(t.in_flight(), 0);

    // Dropping the transport aborts what it still has in flight.
    t.submit(Command::data_in(Cdb::Vendor(cdb).emit(), 4).with_tag(5))
        .unwrap();
    drop(t);
    assert_eq!(held_aborted(&holder), [true]);
}

/// A LUN without DPO/FUA (like LIO's ramdisk) says so in MODE SENSE and
/// refuses the FUA bit, as LIO does; the shared bodies adapt to it.
#[test]
fn a_lun_without_dpofua_refuses_fua_like_lio() {
    let rig = stp_tests::rig::inproc(2, 1);
    let (mut a, mut b) = (rig.plain(0).unwrap(), rig.plain(1).unwrap());
    assert_eq!(dpofua(a.as_mut()), Ok(false));
    ok(standard_errors(a.as_mut()));
    ok(write_here_read_there(a.as_mut(), b.as_mut(), 10, 8, 4));
    let mut member = rig.member(0, 0).unwrap();
    assert_eq!(dpofua(member.as_mut()), Ok(true));
}

/// `stp preflight`'s checks over a block-mode STG whose members are each
/// reached through two target ports: all ok on a healthy, fenced set-up;
/// on a broken one (a member with no active path, a transfer limit below
/// the slot size, sg direct I/O off, no fencing) each check says so.
#[test]
fn preflight_reports_a_healthy_and_a_broken_setup() {
    use scsi::alua::AccessState;
    use stp_core::preflight::{check, HostFacts, Status};
    use stp_core::stg::{Config, LunInfo, MapDirectory};

    let build = |max_transfer: u32| {
        let a = Array::new();
        for id in 0..2u64 {
            let mut c = LunConfig::new(id, 4096, 512);
            c.max_transfer_blocks = max_transfer;
            a.add_lun(id, c).unwrap();
            a.set_port_group(id, 2, 1);
        }
        a
    };
    const FIXED: &str = "hosts = 2\nslots = 4\nslot_blocks = 8\n";
    let run = |a: &Array, facts: &HostFacts, fence: bool, block: &str| {
        let naas: Vec<String> = (0..2)
            .map(|i| a.lun(i).unwrap().config().naa_string())
            .collect();
        let config = Config::parse(&format!(
            "wkp = 5100\n[[stg]]\nid = 4\nmode = \"block\"\nmembers = [\"{}\", \"{}\"]\n\
             [stg.block]\n{block}",
            naas[0], naas[1]
        ))
        .unwrap();
        let mut dir = MapDirectory::new();
        for (i, naa) in naas.iter().enumerate() {
            dir.insert(
                naa.clone(),
                LunInfo {
                    path: format!("sim-p1-lun{i}"),
                    other_paths: vec![format!("sim-p2-lun{i}")],
                    blocks: 4096,
                    block_size: 512,
                },
            );
        }
        let resolved = config.resolve(4, &dir).unwrap();
        let (p1, p2) = (
            Host::login_through(a, "pf-p1", 1),
            Host::login_through(a, "pf-p2", 2),
        );
        let mut sets: Vec<Vec<Box<dyn Transport>>> = (0..2u64)
            .map(|i| {
                vec![
                    Box::new(p1.open(i).unwrap()) as Box<dyn Transport>,
                    Box::new(p2.open(i).unwrap()) as Box<dyn Transport>,
                ]
            })
            .collect();
        if fence {
            stp_core::fence::join(&mut sets, 4, 0).unwrap();
        }
        check(&resolved, &mut sets, facts, 64 * 1024)
    };
    let healthy = HostFacts {
        allow_dio: Some("1".into()),
        engine: Some(("UringSg".into(), "io_uring sg v3 engine".into())),
        queue_max_bytes: None,
    };
    let a = build(128);
    let report = run(&a, &healthy, true, FIXED);
    for f in &report {
        eprintln!("{}", f.line());
        assert_eq!(f.status, Status::Ok, "{}", f.line());
    }
    let checks: Vec<&str> = report.iter().map(|f| f.check).collect();
    assert_eq!(
        checks,
        [
            "paths",
            "identity",
            "engine",
            "allow_dio",
            "transfer",
            "cache",
            "reservations"
        ]
    );

    // Broken: member 1 has no active path, the array takes only 4 blocks
    // per command (a slot is 8), direct I/O is off, nobody fenced.
    let a = build(4);
    for g in [0, 1] {
        a.set_alua_state(1, g, AccessState::STANDBY);
    }
    let broken = HostFacts {
        allow_dio: Some("0".into()),
        ..healthy.clone()
    };
    let report = run(&a, &broken, false, FIXED);
    let status = |c: &str| report.iter().find(|f| f.check == c).unwrap();
    for f in &report {
        eprintln!("{}", f.line());
    }
    assert_eq!(status("paths").status, Status::Fail);
    assert!(
        status("paths").detail.contains("member 1"),
        "{}",
        status("paths").line()
    );
    assert_eq!(status("transfer").status, Status::Fail);
    assert_eq!(status("allow_dio").status, Status::Warn);
    assert_eq!(status("reservations").status, Status::Warn);
    assert!(status("reservations")
        .fix
        .as_deref()
        .unwrap()
        .contains("fence join"));
    assert_eq!(status("identity").status, Status::Ok);

    // The slot left to `stp stg format`: fine before the format (it will
    // choose within the limits); once formatted, the slot in the
    // superblock is what must fit (here one another host chose: 8 blocks
    // where these paths take 4).
    let auto = "hosts = 2\n";
    let transfer = |a: &Array| {
        let report = run(a, &healthy, false, auto);
        report.into_iter().find(|f| f.check == "transfer").unwrap()
    };
    let a = build(4);
    let f = transfer(&a);
    assert_eq!(f.status, Status::Ok, "{}", f.line());
    assert!(f.detail.contains("not formatted"), "{}", f.line());
    let admin = Host::login(&a, "admin");
    let mut members: Vec<Box<dyn Transport>> = (0..2u64)
        .map(|i| Box::new(admin.open(i).unwrap()) as Box<dyn Transport>)
        .collect();
    let layout = stp_core::stg::BlockLayout {
        hosts: 2,
        slots: 4,
        slot_blocks: 8,
    };
    stp_core::block::format(&mut members, 4, &layout, &mut rand::rngs::OsRng).unwrap();
    let f = transfer(&a);
    assert_eq!(f.status, Status::Fail, "{}", f.line());
    assert!(f.detail.contains("4096-byte commands"), "{}", f.line());
}

/// The SBC/SPC cases the real-LIO suite also runs on the daemon's LUN and
/// LIO's own backstores, here on the model directly: a thin LUN with
/// DPO/FUA (as the STG members), a thick one without (as LIO's ramdisk),
/// and a thin one of 4 KiB blocks.
#[test]
fn sbc_spc_cases_on_the_model() {
    use stp_tests::conformance::{sbc_spc_cases, Subject, Target};
    let a = Array::new();
    a.add_lun(0, LunConfig::new(0, 1 << 16, 512)).unwrap();
    let thick = LunConfig {
        thin: false,
        dpofua: false,
        ..LunConfig::new(1, 1 << 16, 512)
    };
    a.add_lun(1, thick).unwrap();
    a.add_lun(2, LunConfig::new(2, 1 << 14, 4096)).unwrap();
    let host = Host::login(&a, "h");
    for (lun, thin, dpofua) in [(0, true, true), (1, false, false), (2, true, true)] {
        let mut t = host.open(lun).unwrap();
        let s = Subject::probe(&mut t, Target::Model, None).unwrap();
        assert_eq!((s.thin, s.dpofua), (thin, dpofua), "LUN {lun}");
        ok(sbc_spc_cases(&mut t, &s));
    }
}

/// `stp preflight`'s peer check (issue 14): two hosts of the in-process
/// array exchange their views of a block-mode STG over a TCP control
/// connection on loopback (`stp preflight --serve-peer` / `--peer`) and
/// compare them. The same members: ok on both sides, the superblocks'
/// generation agreeing; a configuration whose second member is another
/// LUN: what differs and to use one configuration; a device that reports
/// another identity than its member's: the zoning to check.
#[test]
fn preflight_peer_check_compares_both_hosts_member_sets() {
    use std::net::TcpListener;
    use stp_core::preflight::peer::{compare, local_view, PeerView};
    use stp_core::preflight::Status;
    use stp_core::stg::{Config, LunInfo, MapDirectory};
    use stp_tools::preflight::{exchange_as_client, exchange_as_server};

    let a = Array::new();
    for id in 0..3u64 {
        a.add_lun(id, LunConfig::new(id, 4096, 512)).unwrap();
    }
    let naa = |i: u64| a.lun(i).unwrap().config().naa_string();
    let admin = Host::login(&a, "admin");
    let mut members: Vec<Box<dyn Transport>> = (0..2u64)
        .map(|i| Box::new(admin.open(i).unwrap()) as Box<dyn Transport>)
        .collect();
    let layout = stp_core::stg::BlockLayout {
        hosts: 2,
        slots: 4,
        slot_blocks: 8,
    };
    stp_core::block::format(&mut members, 4, &layout, &mut rand::rngs::OsRng).unwrap();

    // A host's view: `config_luns` the configuration's members, `device_luns`
    // the LUNs its device nodes for them actually open.
    let view = |name: &str, config_luns: [u64; 2], device_luns: [u64; 2]| -> PeerView {
        let config = Config::parse(&format!(
            "wkp = 5100\n[[stg]]\nid = 4\nmode = \"block\"\nmembers = [\"{}\", \"{}\"]\n\
             [stg.block]\nhosts = 2\n",
            naa(config_luns[0]),
            naa(config_luns[1])
        ))
        .unwrap();
        let mut dir = MapDirectory::new();
        for (i, l) in config_luns.iter().enumerate() {
            dir.insert(
                naa(*l),
                LunInfo {
                    path: format!("{name}-lun{i}"),
                    other_paths: Vec::new(),
                    blocks: 4096,
                    block_size: 512,
                },
            );
        }
        let resolved = config.resolve(4, &dir).unwrap();
        let h = Host::login(&a, name);
        let mut sets: Vec<Vec<Box<dyn Transport>>> = device_luns
            .iter()
            .map(|l| vec![Box::new(h.open(*l).unwrap()) as Box<dyn Transport>])
            .collect();
        local_view(name, &resolved, &mut sets)
    };
    // Both sides of the exchange over TCP, as the two `stp preflight`s.
    let exchange = |server: PeerView, client: PeerView| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = T;
        let srv = thread::spawn(move || {
            let (theirs, _) = exchange_as_server(&listener, &server, t).unwrap();
            compare(&server, &theirs)
        });
        let theirs = exchange_as_client(&addr, &client, T).unwrap();
        (srv.join().unwrap(), compare(&client, &theirs))
    };

    let (s, c) = exchange(view("a", [0, 1], [0, 1]), view("b", [0, 1], [0, 1]));
    for f in [&s, &c] {
        eprintln!("same: {}", f.line());
        assert_eq!(f.status, Status::Ok, "{}", f.line());
        assert!(f.detail.contains("same 2 member(s)"), "{}", f.line());
        assert!(f.detail.contains("generation"), "{}", f.line());
    }
    assert!(s.detail.contains("the peer (b)"), "{}", s.line());

    // Host b's configuration names LUN 2 as member 1.
    let (s, c) = exchange(view("a", [0, 1], [0, 1]), view("b", [0, 2], [0, 2]));
    for f in [&s, &c] {
        eprintln!("other member: {}", f.line());
        assert_eq!(f.status, Status::Fail, "{}", f.line());
        assert!(f.detail.contains("member 1 is"), "{}", f.line());
        assert!(f.fix.as_deref().unwrap().contains("same configuration"));
    }
    assert!(
        s.detail.contains(&naa(2)) && s.detail.contains(&naa(1)),
        "{}",
        s.line()
    );

    // Host b's device node for member 1 is LUN 2 (zoning, masking): its
    // identity and superblock differ.
    let (s, c) = exchange(view("a", [0, 1], [0, 1]), view("b", [0, 1], [0, 2]));
    for f in [&s, &c] {
        eprintln!("other device: {}", f.line());
        assert_eq!(f.status, Status::Fail, "{}", f.line());
        assert!(f.detail.contains("member 1's device"), "{}", f.line());
        assert!(f.fix.as_deref().unwrap().contains("zoning"));
    }
}

const T: Duration = Duration::from_secs(10);
