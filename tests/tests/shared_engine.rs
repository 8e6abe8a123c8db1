//! The shared engine (`scsi::shared`): many handles, many threads, one
//! engine thread per path — the way the io_uring engine carries the STP
//! stack on real devices — over the in-process array. The same routing
//! runs over real LIO in `lio.rs` (through `EnginePool::global`).

use std::collections::HashSet;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use scsi::cdb::{Cdb, RwFlags};
use scsi::{Command, IoBuf, SharedEngine, Transport};
use sim_target::{Array, Host, InProcOptions, LunConfig};
use stp_tests::e2e;
use stp_tests::rig::{inproc, shared, InProcRig};

const BS: usize = 512;

fn write16(lba: u64, data: IoBuf) -> Command {
    let blocks = (data.len() / BS) as u32;
    Command::data_out(
        Cdb::Write16 {
            lba,
            blocks,
            flags: RwFlags::default(),
        }
        .emit(),
        data,
    )
}

fn read16(lba: u64, blocks: u32) -> Command {
    Command::data_in(
        Cdb::Read16 {
            lba,
            blocks,
            flags: RwFlags::default(),
        }
        .emit(),
        blocks as usize * BS,
    )
}

fn block(tag: u64) -> IoBuf {
    let mut b = IoBuf::new(BS);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (tag as usize * 31 + i) as u8;
    }
    b
}

fn lun() -> (Array, Host) {
    let a = Array::new();
    a.add_lun(0, LunConfig::new(0, 1 << 16, BS as u32)).unwrap();
    let h = Host::login(&a, "h0");
    (a, h)
}

#[test]
fn many_threads_share_one_engine() {
    let (_a, h) = lun();
    let engine = SharedEngine::start_polled(Box::new(h.open(0).unwrap())).unwrap();
    let workers: Vec<_> = (0..6u64)
        .map(|t| {
            let mut path = engine.handle();
            thread::spawn(move || {
                for i in 0..100u64 {
                    let lba = t * 1000 + i;
                    let c = path.execute(write16(lba, block(lba)));
                    c.into_result().unwrap();
                    let (data, _) = path.execute(read16(lba, 1)).into_result().unwrap();
                    assert!(data == block(lba), "thread {t} LBA {lba} read back wrong");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn backlog_beyond_the_depth_keeps_every_tag() {
    let (_a, h) = lun();
    let options = InProcOptions {
        queue_depth: 2,
        ..InProcOptions::default()
    };
    let engine = SharedEngine::start_polled(Box::new(h.open_with(0, options).unwrap())).unwrap();
    let (mut a, mut b) = (engine.handle(), engine.handle());
    // Both handles use the same tags: each must get its own back.
    for tag in 0..10u64 {
        a.submit(write16(tag, block(tag)).with_tag(tag)).unwrap();
        b.submit(read16(tag + 500, 1).with_tag(tag)).unwrap();
    }
    assert_eq!((a.in_flight(), b.in_flight()), (10, 10));
    for (path, data_in) in [(&mut a, false), (&mut b, true)] {
        let mut out = Vec::new();
        while out.len() < 10 {
            path.reap(&mut out, Some(Duration::from_secs(10))).unwrap();
        }
        assert_eq!(path.in_flight(), 0);
        let tags: HashSet<u64> = out.iter().map(|c| c.tag).collect();
        assert_eq!(tags, (0..10).collect());
        for c in out {
            let (data, _) = c.into_result().unwrap();
            if data_in {
                assert!(data.iter().all(|&x| x == 0), "unwritten LBAs read as zeros");
            }
        }
    }
    for tag in 0..10u64 {
        let (data, _) = a.execute(read16(tag, 1)).into_result().unwrap();
        assert!(data == block(tag), "LBA {tag}");
    }
}

#[test]
fn a_held_receive_does_not_stall_other_handles() {
    let base = Arc::new(InProcRig::new(1, 11));
    let rig = shared(base.clone());
    e2e::held_receive_does_not_stall_its_path(&rig, &|| {
        while base.mailbox().stats().receives_held == 0 {
            thread::sleep(Duration::from_millis(5));
        }
    });
}

#[test]
fn stream_over_shared_engines() {
    e2e::transfer(&shared(inproc(4, 12)), 8 << 20, 12);
}

#[test]
fn concurrent_ports_over_shared_engines() {
    e2e::concurrent_ports(&shared(inproc(2, 13)), 2 << 20);
}

#[test]
fn fs_flow_over_shared_engines() {
    e2e::fs_flow(&shared(inproc(2, 14)), 3 << 20);
}

#[test]
fn block_mode_over_shared_engines() {
    e2e::block_stream(&shared(inproc(1, 15)), 2 << 20, 1 << 20);
}

#[test]
fn every_rig_path_is_a_shared_handle() {
    let rig = shared(inproc(2, 16));
    let p = rig.member(1, 1).unwrap();
    assert!(
        p.describe().contains("shared engine thread"),
        "{}",
        p.describe()
    );
}
