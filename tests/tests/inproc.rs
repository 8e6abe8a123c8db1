//! The shared conformance bodies and array-specific behaviour, against the
//! in-process simulated array.

use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use scsi::cdb::{Cdb, RwFlags, VendorCdb};
use scsi::{Asc, Command, CommandError, DataDirection, IoBuf, Opcode, ScsiStatus, SenseKey};
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

#[test]
fn write_on_one_host_read_on_the_other_out_of_order() {
    let a = array(1);
    let (h1, h2) = (Host::login(&a, "host-a"), Host::login(&a, "host-b"));
    let opts = |seed| InProcOptions {
        queue_depth: 16,
        reorder_seed: Some(seed),
    };
    let mut t1 = h1.open_with(0, opts(1)).unwrap();
    let mut t2 = h2.open_with(0, opts(2)).unwrap();
    ok(write_here_read_there(&mut t1, &mut t2, 100, 300, 16));
}

#[test]
fn standard_errors_and_probes() {
    let a = array(1);
    let mut t = Host::login(&a, "h").open(0).unwrap();
    ok(standard_errors(&mut t));
    ok(sd_probe_commands(&mut t));
    ok(multi_block_and_residual(&mut t, 4096));
    ok(unknown_vendor_opcode(&mut t, 0xC3));
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
    struct Capture(mpsc::Sender<TaskResult>, Vec<u8>);
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
            self.0.send(r).unwrap();
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
    let r = submit(Cdb::ReadCapacity10, 8);
    assert_eq!(r.status, S::CHECK_CONDITION);
    assert_eq!(r.sense.unwrap().asc, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
    let r = submit(
        Cdb::Inquiry {
            evpd: false,
            page_code: 0,
            alloc_len: 36,
        },
        36,
    );
    assert_eq!(r.status, S::GOOD);
    assert_eq!(r.data_in, 36);
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
    ok(expect_check(
        run_out(&mut t, w, &[0xEE; 512]),
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_FIELD_IN_CDB,
        "WRITE of 2 blocks with 1 block of data",
    ));
    let r = Cdb::Read10 {
        lba: 10,
        blocks: 2,
        flags: RwFlags::default(),
    };
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
        reorder_seed: None,
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
            vec![0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0],
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_FIELD_IN_CDB,
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
}
