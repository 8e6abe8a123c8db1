//! The destructive-write guard on the simulated array: blank LUNs may be
//! formatted, a LUN carrying a file system or another STG is refused with
//! the member named, and the same STG may be formatted again.

use std::path::Path;

use rand::rngs::StdRng;
use rand::SeedableRng;
use scsi::cdb::RwFlags;
use scsi::{Cdb, Command, IoBuf, Transport};
use sim_target::{Array, Host, LunConfig};
use stp_core::block::format;
use stp_core::guard::{check_members, Finding, GuardError};
use stp_core::stg::BlockLayout;

const LUNS: [u64; 2] = [0, 1];

fn array() -> Array {
    let a = Array::new();
    for id in LUNS {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    a
}

fn members(a: &Array) -> Vec<Box<dyn Transport>> {
    let h = Host::login(a, "admin");
    LUNS.iter()
        .map(|&l| Box::new(h.open(l).unwrap()) as Box<dyn Transport>)
        .collect()
}

fn names() -> Vec<String> {
    LUNS.iter().map(|l| format!("sim:admin/lun{l}")).collect()
}

fn check(a: &Array, stg: u32) -> Result<(), GuardError> {
    // No sysfs for in-process LUNs: only the signatures count.
    check_members(
        stg,
        &mut members(a),
        &names(),
        512,
        Path::new("/nonexistent"),
        "",
    )
}

fn write(a: &Array, lun: u64, lba: u64, data: &[u8]) {
    let mut t = Host::login(a, "someone").open(lun).unwrap();
    let cdb = Cdb::Write16 {
        lba,
        blocks: (data.len() / 512) as u32,
        flags: RwFlags::default(),
    };
    t.execute(Command::data_out(cdb.emit(), IoBuf::from_slice(data)))
        .into_result()
        .unwrap();
}

fn layout() -> BlockLayout {
    BlockLayout {
        hosts: 2,
        slots: 8,
        slot_blocks: 16,
    }
}

#[test]
fn blank_luns_pass_and_a_file_system_is_refused_by_member() {
    let a = array();
    check(&a, 7).unwrap();
    // An ext4 superblock on member 1 (magic at byte 1080 = block 2, offset 56).
    let mut block = vec![0u8; 512];
    block[56..58].copy_from_slice(&[0x53, 0xEF]);
    write(&a, 1, 2, &block);
    match check(&a, 7).unwrap_err() {
        GuardError::Refused {
            member, findings, ..
        } => {
            assert_eq!(member, 1);
            assert_eq!(
                findings,
                vec![Finding::Signature {
                    what: "an ext2/3/4 file system",
                    offset: 1080
                }]
            );
        }
        e => panic!("{e}"),
    }
}

#[test]
fn the_same_stg_may_be_formatted_again_another_may_not_overwrite_it() {
    let a = array();
    check(&a, 7).unwrap();
    format(
        &mut members(&a),
        7,
        &layout(),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    check(&a, 7).unwrap();
    let e = check(&a, 8).unwrap_err();
    assert!(
        matches!(&e, GuardError::Refused { member: 0, findings, .. }
            if findings == &vec![Finding::OtherStg { stg: 7 }]),
        "{e}"
    );
    assert!(e.to_string().contains("--force"), "{e}");
}
