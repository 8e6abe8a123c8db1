//! Writes the seed corpus, `fuzz/corpus/<target>/`, from real encodings:
//! sealed frames, the array's own answers, formatted block-mode blocks,
//! backup messages, manifests and archives, configuration examples.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p stp-fuzz-input` (any
//! toolchain). Re-running rewrites the same files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use scsi::{Cdb, Command, Sense, Transport};
use sim_target::Host;
use stp_core::block::{seal_slot, IndexBlock, IndexKind, Superblock, SLOT_HEADER_LEN};
use stp_core::frame::{Cipher, Direction, Protection};
use stp_core::stg::BlockLayout;
use stp_core::vendor::{self, BindResult, PortStatus};
use stp_core::wire::{Flags, Header, Kind};
use stp_fuzz_input::{encode_script, Command as Step, CONN_ID, STG_ID};
use stp_tools::backup::archive::{Kind as EntryKind, ManifestEntry};
use stp_tools::backup::wire::{DbSource, Level, Msg};

struct Corpus {
    root: PathBuf,
}

impl Corpus {
    fn put(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("creating the corpus directory");
        fs::write(dir.join(name), bytes).expect("writing a seed");
    }
}

fn header(kind: Kind, src: u32, dst: u32, seq: u64, pn: u64) -> Header {
    Header {
        kind,
        flags: Flags::ACK_NOW,
        src_port: src,
        dst_port: dst,
        conn_id: CONN_ID,
        seq,
        ack: 1,
        credit: 8,
        payload_len: 0,
        pn,
        crc32c: 0,
        tag: [0; 16],
    }
}

fn sealed(protection: Protection, kind: Kind, payload: &[u8], pn: u64) -> Vec<u8> {
    let cipher = Cipher::new(&stp_fuzz_input::frame_key(), CONN_ID, protection);
    cipher
        .seal_to_vec(
            Direction::ClientToServer,
            header(kind, 5, 6, pn, pn),
            &[payload],
        )
        .expect("sealing a seed frame")
}

fn frames(c: &Corpus) {
    let data = sealed(Protection::Encrypt, Kind::DATA, b"hello, array", 1);
    let auth = sealed(Protection::Authenticate, Kind::DATA, b"in the clear", 2);
    let syn = sealed(Protection::Encrypt, Kind::SYN, &[0; 32], 0);
    let mut packed = data.clone();
    packed.extend_from_slice(&auth);
    packed.extend_from_slice(&syn);
    packed.extend_from_slice(&[0; 40]);
    let mut v1 = data.clone();
    v1[4] = stp_core::wire::PREVIOUS_VERSION;
    for (name, bytes) in [
        ("data-encrypted", &data),
        ("data-authenticated", &auth),
        ("syn", &syn),
        ("packed", &packed),
        ("version-1", &v1),
    ] {
        c.put("frame_parse", name, bytes);
    }
    // Arbitrary-driven: any bytes describe a frame.
    c.put("frame_open", "zeros", &[0; 64]);
    c.put("frame_open", "ramp", &(0..=255).collect::<Vec<u8>>());
}

fn array(c: &Corpus) {
    let cdb = |cdb: Cdb| cdb.emit().as_slice().to_vec();
    let vcdb = |v: scsi::cdb::VendorCdb| Cdb::Vendor(v).emit().as_slice().to_vec();
    let step = |lun: u8, dir: u8, cdb: Vec<u8>, buf: u16| Step {
        lun,
        direction: dir,
        cdb,
        buf_len: buf,
        ..Step::default()
    };
    // The SPC/SBC subset on the plain LUN and a member.
    let spc = vec![
        step(2, 0, cdb(Cdb::TestUnitReady), 0),
        step(
            2,
            1,
            cdb(Cdb::Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 96,
            }),
            96,
        ),
        step(
            2,
            1,
            cdb(Cdb::Inquiry {
                evpd: true,
                page_code: 0x83,
                alloc_len: 255,
            }),
            255,
        ),
        step(
            0,
            1,
            cdb(Cdb::Inquiry {
                evpd: true,
                page_code: 0xB0,
                alloc_len: 64,
            }),
            64,
        ),
        step(2, 1, cdb(Cdb::ReadCapacity16 { alloc_len: 32 }), 32),
        step(2, 1, vec![0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], 64),
        step(
            2,
            1,
            cdb(Cdb::RequestSense {
                desc: true,
                alloc_len: 252,
            }),
            252,
        ),
        Step {
            lun: 2,
            direction: 2,
            cdb: vec![0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0],
            buf_len: 4096,
            data: b"block one".to_vec(),
            ..Step::default()
        },
        step(2, 1, vec![0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0], 4096),
        step(2, 1, vec![0x1A, 0, 0x3F, 0, 255, 0], 255),
        step(2, 1, vec![0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0], 512),
        step(3, 0, cdb(Cdb::TestUnitReady), 0),
    ];
    c.put("array", "spc-sbc", &encode_script(&spc));

    // VERIFY, WRITE SAME, COMPARE AND WRITE, UNMAP, GET LBA STATUS, RSOC
    // with RCTD, and fields the model refuses (WRPROTECT, NACA).
    let out = |lun: u8, cdb: Vec<u8>, data: Vec<u8>| Step {
        lun,
        direction: 2,
        cdb,
        buf_len: data.len() as u16,
        data,
        ..Step::default()
    };
    let block = vec![0xA5u8; 512];
    let unmap = scsi::provisioning::UnmapList::new(vec![scsi::provisioning::UnmapDescriptor {
        lba: 256,
        blocks: 128,
    }])
    .to_bytes();
    let provisioning = vec![
        out(2, vec![0x2A, 0, 0, 0, 1, 0, 0, 0, 1, 0], block.clone()),
        out(2, vec![0x2F, 0x02, 0, 0, 1, 0, 0, 0, 1, 0], block.clone()),
        step(2, 0, vec![0x8F, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 8, 0, 0], 0),
        out(
            2,
            vec![0x93, 0x08, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
            vec![0; 512],
        ),
        out(2, vec![0x41, 0, 0, 0, 2, 0, 0, 0, 16, 0], block.clone()),
        out(
            2,
            vec![0x89, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0],
            [block.clone(), vec![0x5A; 512]].concat(),
        ),
        out(2, vec![0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], unmap),
        step(
            2,
            1,
            vec![0x9E, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0],
            4096,
        ),
        step(2, 1, vec![0xA3, 0x0C, 0x81, 0x88, 0, 0, 0, 0, 2, 0, 0, 0], 512),
        out(2, vec![0x2A, 0x20, 0, 0, 1, 0, 0, 0, 1, 0], block),
        step(2, 0, vec![0, 0, 0, 0, 0, 0x04], 0),
    ];
    c.put("array", "sbc-provisioning", &encode_script(&provisioning));

    // Vendor mode: two bindings, a SEND from one to the other, RECEIVE,
    // PORT STATUS, RELEASE.
    let frame = sealed(Protection::Encrypt, Kind::DATA, b"through the array", 1);
    let mailbox = vec![
        step(0, 1, vcdb(vendor::stg_info(64)), 64),
        Step {
            initiator: 0,
            ..step(0, 1, vcdb(vendor::bind(5)), 16)
        },
        Step {
            initiator: 1,
            ..step(1, 1, vcdb(vendor::bind(6)), 16)
        },
        Step {
            initiator: 0,
            lun: 0,
            direction: 2,
            handle_slot: Some(0),
            cdb: vcdb(vendor::send(0, frame.len() as u32)),
            buf_len: frame.len() as u16,
            data: frame.clone(),
        },
        Step {
            initiator: 1,
            handle_slot: Some(1),
            ..step(1, 1, vcdb(vendor::receive(0, 4096, Duration::ZERO)), 4096)
        },
        Step {
            initiator: 1,
            handle_slot: Some(1),
            ..step(1, 1, vcdb(vendor::port_status(0)), 32)
        },
        Step {
            initiator: 1,
            handle_slot: Some(1),
            ..step(
                1,
                1,
                vcdb(vendor::receive(0, 4096, Duration::from_millis(300))),
                4096,
            )
        },
        Step {
            handle_slot: Some(0),
            ..step(0, 0, vcdb(vendor::release(0)), 0)
        },
        step(0, 1, vcdb(vendor::bind(0)), 16),
    ];
    c.put("array", "vendor-mailbox", &encode_script(&mailbox));
}

fn scsi(c: &Corpus) {
    let array = sim_target::Array::new();
    array
        .add_lun(0, sim_target::LunConfig::new(0, 1024, 512))
        .expect("a LUN");
    let mut t = Host::login(&array, "seeds").open(0).expect("the LUN");
    let mut ask = |cdb: Cdb, len: usize| -> Vec<u8> {
        let (data, _) = t
            .execute(Command::data_in(cdb.emit(), len))
            .into_result()
            .expect("the array answers");
        data.to_vec()
    };
    c.put(
        "scsi_inquiry",
        "standard",
        &ask(
            Cdb::Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 96,
            },
            96,
        ),
    );
    for page in [0x00u8, 0x80, 0x83, 0xB0] {
        let data = ask(
            Cdb::Inquiry {
                evpd: true,
                page_code: page,
                alloc_len: 255,
            },
            255,
        );
        c.put("scsi_inquiry", &format!("vpd-{page:02x}"), &data);
    }
    // Thin provisioning and command support, as the model answers them
    // (some blocks written first, so that GET LBA STATUS has a mapped
    // extent to report), and an UNMAP list.
    let written = scsi::Cdb::Write16 {
        lba: 64,
        blocks: 8,
        flags: scsi::cdb::RwFlags::default(),
    };
    t.execute(Command::data_out(written.emit(), scsi::IoBuf::from_slice(&[7u8; 8 * 512])))
        .into_result()
        .expect("the array writes");
    let mut ask = |cdb: Cdb, len: usize| -> Vec<u8> {
        let (data, _) = t
            .execute(Command::data_in(cdb.emit(), len))
            .into_result()
            .expect("the array answers");
        data.to_vec()
    };
    c.put(
        "scsi_provisioning",
        "vpd-b2",
        &ask(
            Cdb::Inquiry {
                evpd: true,
                page_code: 0xB2,
                alloc_len: 255,
            },
            255,
        ),
    );
    c.put(
        "scsi_provisioning",
        "lba-status",
        &ask(
            Cdb::GetLbaStatus {
                lba: 0,
                alloc_len: 4096,
            },
            4096,
        ),
    );
    c.put(
        "scsi_provisioning",
        "supported-all",
        &ask(
            Cdb::ReportSupportedOpcodes {
                rctd: true,
                reporting_options: 0,
                opcode: 0,
                service_action: 0,
                alloc_len: 4096,
            },
            4096,
        ),
    );
    c.put(
        "scsi_provisioning",
        "supported-one",
        &ask(
            Cdb::ReportSupportedOpcodes {
                rctd: true,
                reporting_options: 1,
                opcode: 0x88,
                service_action: 0,
                alloc_len: 512,
            },
            512,
        ),
    );
    c.put(
        "scsi_provisioning",
        "unmap-list",
        &scsi::provisioning::UnmapList::new(vec![
            scsi::provisioning::UnmapDescriptor { lba: 64, blocks: 8 },
            scsi::provisioning::UnmapDescriptor { lba: 1 << 40, blocks: 0 },
        ])
        .to_bytes(),
    );
    let lba = Sense::new(scsi::SenseKey::ILLEGAL_REQUEST, scsi::Asc::LBA_OUT_OF_RANGE)
        .with_information(0x1_0000_0000);
    let field = Sense::invalid_field_in_cdb(6, Some(3));
    c.put("scsi_sense", "fixed-field-pointer", &field.to_fixed());
    c.put(
        "scsi_sense",
        "descriptor-field-pointer",
        &field.to_descriptor(),
    );
    c.put("scsi_sense", "descriptor-information", &lba.to_descriptor());
    c.put("scsi_sense", "fixed-information", &lba.to_fixed());
    for (name, cdb) in [
        ("tur", Cdb::TestUnitReady),
        (
            "inquiry-vpd",
            Cdb::Inquiry {
                evpd: true,
                page_code: 0x83,
                alloc_len: 255,
            },
        ),
        ("read-capacity-16", Cdb::ReadCapacity16 { alloc_len: 32 }),
        ("vendor-send", Cdb::Vendor(vendor::send(7, 4096))),
    ] {
        c.put("scsi_cdb", name, cdb.emit().as_slice());
    }
    for (name, bytes) in [
        ("read-10", &[0x28u8, 0, 0, 0, 0, 8, 0, 0, 8, 0][..]),
        (
            "write-16",
            &[0x8A, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0],
        ),
        ("mode-sense-10", &[0x5A, 0, 0x3F, 0, 0, 0, 0, 1, 0, 0]),
        ("rsoc", &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]),
        ("rsoc-rctd", &[0xA3, 0x0C, 0x82, 0x9E, 0, 0x10, 0, 0, 2, 0, 0, 0]),
        ("verify-10", &[0x2F, 0x02, 0, 0, 0x10, 0, 0, 0, 8, 0]),
        (
            "write-same-16",
            &[0x93, 0x08, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0x10, 0, 0],
        ),
        (
            "compare-and-write",
            &[0x89, 0x08, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0],
        ),
        ("unmap", &[0x42, 0, 0, 0, 0, 0, 0, 0, 0x18, 0]),
        (
            "get-lba-status",
            &[0x9E, 0x12, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x18, 0, 0],
        ),
    ] {
        c.put("scsi_cdb", name, bytes);
    }
}

fn block(c: &Corpus) {
    let layout = BlockLayout {
        hosts: 3,
        slots: 8,
        slot_blocks: 16,
    };
    let sb = Superblock {
        stg_id: 8,
        member_index: 0,
        member_count: 2,
        layout,
        block_size: 512,
        generation: 0x1234_5678_9abc_def0,
    };
    let mut block0 = sb.encode().to_vec();
    block0.resize(512, 0);
    c.put("block_formats", "superblock", &block0);
    for (name, kind) in [
        ("producer", IndexKind::Producer),
        ("consumer", IndexKind::Consumer),
    ] {
        let mut ix = IndexBlock::new(kind, sb.generation, 41, 3);
        if kind == IndexKind::Producer {
            // The sizes of slots 38–40, as a producer gives them.
            ix.sizes[38] = 1 << 20;
            ix.sizes[39] = 208;
            ix.sizes[40] = 0x3_0040;
        }
        c.put("block_formats", name, &ix.encode());
    }
    let ring = stp_core::block::Ring {
        stg_id: 8,
        src: 1,
        dst: 0,
        generation: sb.generation as u32,
    };
    c.put("block_formats", "doorbell", &ring.encode());
    let mut slot = vec![0u8; SLOT_HEADER_LEN];
    slot.extend_from_slice(&sealed(Protection::Encrypt, Kind::DATA, b"slot data", 9));
    slot.extend_from_slice(&sealed(Protection::Encrypt, Kind::ACK, b"", 10));
    seal_slot(&mut slot, sb.generation, 42);
    slot.resize(1024, 0);
    c.put("block_formats", "slot", &slot);

    let info = vendor::StgInfo {
        version: vendor::PROTOCOL_VERSION,
        member_index: 1,
        stg_id: STG_ID,
        max_payload: 1 << 20,
        queue_bytes: 8 << 20,
        queue_frames: 256,
        members: vec![[0x60; 16], [0x61; 16]],
    };
    c.put("vendor_data", "stg-info", &info.to_bytes());
    let bind = BindResult {
        port: 32768,
        handle: 0xdead_beef,
        queue_bytes: 8 << 20,
        queue_frames: 256,
    };
    c.put("vendor_data", "bind", &bind.to_bytes());
    c.put(
        "vendor_data",
        "port-status",
        &PortStatus::default().to_bytes(),
    );
}

fn entry(path: &str, kind: EntryKind) -> ManifestEntry {
    ManifestEntry {
        path: path.into(),
        kind,
        size: if kind == EntryKind::File { 1 } else { 0 },
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime: 1_700_000_000,
        mtime_nsec: 5,
        ctime: 1_700_000_000,
        ino: 42,
        sha256: (kind == EntryKind::File)
            .then(|| "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb".into()),
        link: match kind {
            EntryKind::Symlink => Some("../elsewhere".into()),
            EntryKind::Hardlink => Some("a".into()),
            _ => None,
        },
        sparse: false,
        in_archive: true,
        from_backup: None,
        status: "ok".into(),
    }
}

fn backup(c: &Corpus) {
    let manifest = vec![
        entry("a", EntryKind::File),
        entry("d", EntryKind::Dir),
        entry("d/link", EntryKind::Symlink),
        entry("d/again", EntryKind::Hardlink),
    ];
    c.put(
        "backup_manifest",
        "manifest",
        &serde_json::to_vec(&manifest).expect("JSON"),
    );
    let msgs = [
        Msg::BackupRequest {
            backup_id: 3,
            level: Level::Incremental,
            source: "/srv".into(),
            excludes: vec!["*.tmp".into(), "cache/".into()],
            base: manifest[..2].to_vec(),
            fallback_port: 40000,
        },
        Msg::FileError {
            path: "d/x".into(),
            message: "permission denied".into(),
        },
        Msg::BackupDone {
            manifest: manifest.clone(),
            errors: 1,
        },
        Msg::DbRequest {
            name: "app".into(),
            source: DbSource::Command {
                command: "pg_dump app".into(),
            },
        },
        Msg::LanHello {
            channel: "control".into(),
            reason: "no STG".into(),
            nonce: "00".repeat(32),
            proof: String::new(),
        },
    ];
    for m in &msgs {
        c.put(
            "backup_wire",
            m.name(),
            &serde_json::to_vec(m).expect("JSON"),
        );
    }

    // `stp preflight`'s view exchange: a block-mode view with a formatted
    // member, and a vendor-mode one with an unreadable member.
    {
        use stp_core::preflight::peer::{self, FormatView, MemberView, PeerView};
        use stp_core::stg::{BlockSpec, MailboxMode};
        let member = |i: u16, format| MemberView {
            naa: format!("naa.600140500000000{i}"),
            seen: Some(format!("naa.600140500000000{i}")),
            blocks: 1 << 20,
            block_size: 512,
            format,
        };
        let block = PeerView {
            version: peer::VIEW_VERSION,
            host: "a".into(),
            stg: 8,
            mode: MailboxMode::Block,
            block: Some(BlockSpec {
                hosts: 2,
                slots: Some(64),
                slot_blocks: None,
                doorbells: None,
            }),
            members: vec![member(
                0,
                Some(FormatView {
                    stg_id: 8,
                    member_index: 0,
                    member_count: 1,
                    hosts: 2,
                    slots: 64,
                    slot_blocks: 2048,
                    generation: 0x1234_5678,
                }),
            )],
        };
        let mut unread = member(1, None);
        unread.seen = None;
        let vendor = PeerView {
            mode: MailboxMode::Vendor,
            block: None,
            members: vec![member(0, None), unread],
            ..block.clone()
        };
        c.put("preflight_view", "block", &peer::encode_view(&block));
        c.put("preflight_view", "vendor", &peer::encode_view(&vendor));
    }

    // An archive as the backup writes one: a file, a directory, a
    // symbolic link and a hard link.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "d/", &[][..]).expect("tar");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(1);
    b.append_data(&mut h, "a", &b"a"[..]).expect("tar");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "d/link", "../a").expect("tar");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "d/again", "a").expect("tar");
    let ar = b.into_inner().expect("tar");
    c.put("backup_archive", "tree", &ar);

    c.put(
        "backup_glob",
        "excludes",
        b"*.tmp\ncache/\n/top\nx/**/y?\0x/a/b/y1",
    );
}

fn config(c: &Corpus, repo: &Path) {
    let read = |p: &str| fs::read_to_string(repo.join(p)).expect("a documented example");
    let doc_example = |source: &str| -> String {
        source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .skip_while(|l| *l != "```toml")
            .skip(1)
            .take_while(|l| *l != "```")
            .map(|l| format!("{l}\n"))
            .collect()
    };
    c.put(
        "config",
        "backup-toml",
        doc_example(&read("tools/src/backup/config.rs")).as_bytes(),
    );
    c.put(
        "config",
        "stp-toml",
        doc_example(&read("stp-core/src/stg.rs")).as_bytes(),
    );
    c.put(
        "config",
        "stp-toml-block",
        b"wkp = 5100\npsk = \"000102030405060708090a0b0c0d0e0f\"\n[[stg]]\nid = 8\n\
          mode = \"block\"\nmembers = [\"naa.6001405a1b2c3d4e5f60718293a4b5c6\"]\n\
          [stg.block]\nhosts = 2\nslots = 8\nslot_blocks = 16\n[tunables]\nmax_payload = 65536\n",
    );
    c.put(
        "config",
        "device-map",
        br#"{"hosts":[{"index":0,"luns":[{"naa":"naa.6001405a1b2c3d4e5f60718293a4b5c6","sg":"/dev/sg1"}]}]}"#,
    );
    c.put("config", "size", b"256MiB");
    c.put("config", "stg-arg", b"1:4");
}

fn main() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/")
        .to_path_buf();
    let repo = fuzz.parent().expect("the repository").to_path_buf();
    let c = Corpus {
        root: fuzz.join("corpus"),
    };
    frames(&c);
    array(&c);
    scsi(&c);
    block(&c);
    backup(&c);
    config(&c, &repo);
    println!("seeds written under {}", c.root.display());
}
