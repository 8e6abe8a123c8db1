//! Block mode end to end (docs/PROTOCOL.md §4): two hosts on plain LUNs of
//! the in-process array (no vendor handler), formatted with
//! `stp_core::block::format`, moving raw frames and STP streams through the
//! lanes with READ(16)/WRITE(16) only.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use scsi::cdb::RwFlags;
use scsi::{Cdb, Command, IoBuf, Transport};
use sim_target::{Array, Host, LunConfig};
use stp_core::auth::FrameKey;
use stp_core::block::{
    choose_layout, format, host_port, BlockConfig, BlockError, BlockMailbox, BlockStg, Doorbells,
    IndexBlock, IndexKind, LayoutRequest, Ring, Superblock, RING_LEN, RING_QUIET,
};
use stp_core::conn::Config;
use stp_core::mailbox::{Binding, Mailbox};
use stp_core::stg::BlockLayout;
use stp_core::stream::{PathSource, StpListener, StpStream};
use stp_core::vendor::{MailboxError, Refusal};
use stp_core::wire::{Frames, Header, Kind};
use stp_tests::e2e::{self, keys, payload, recv_stream, send_stream};
use stp_tests::rig::inproc;

const T: Duration = Duration::from_secs(20);
const STG: u32 = 7;
const LUNS: [u64; 2] = [0, 1];
const LUN_BLOCKS: u64 = 1 << 16;

fn layout() -> BlockLayout {
    BlockLayout {
        hosts: 2,
        slots: 32,
        slot_blocks: 64,
    }
}

/// Two plain 32 MiB LUNs of 512-byte blocks.
fn array() -> Array {
    let a = Array::new();
    for id in LUNS {
        a.add_lun(id, LunConfig::new(id, LUN_BLOCKS, 512)).unwrap();
    }
    a
}

fn paths(h: &Host, luns: &[u64]) -> Vec<Box<dyn Transport>> {
    luns.iter()
        .map(|&l| Box::new(h.open(l).unwrap()) as Box<dyn Transport>)
        .collect()
}

fn format_stg(a: &Array, seed: u64) -> u64 {
    format_as(a, &layout(), seed)
}

/// Formats the STG on `LUNS` with `layout`: its generation.
fn format_as(a: &Array, layout: &BlockLayout, seed: u64) -> u64 {
    let admin = Host::login(a, "admin");
    format(
        &mut paths(&admin, &LUNS),
        STG,
        layout,
        &mut StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

fn open_host(a: &Array, index: u16, config: BlockConfig) -> Arc<BlockStg> {
    let h = Host::login(a, &format!("host{index}"));
    BlockStg::open_with(paths(&h, &LUNS), index, STG, config).unwrap()
}

/// Host `index` opened with `config`, its mailbox, and a dynamic port
/// bound on it.
fn bound_host(
    a: &Array,
    index: u16,
    config: BlockConfig,
) -> (Arc<BlockStg>, BlockMailbox, Binding) {
    let h = open_host(a, index, config);
    let mut m = h.handle();
    let p = m.bind(None).unwrap();
    (h, m, p)
}

/// Opens host `index` again as initiator `name`, waiting while a closing
/// opening still holds its doorbell's address (it lets go once its threads
/// drop the engine).
fn reopen_host(a: &Array, name: &str, index: u16, config: BlockConfig) -> Arc<BlockStg> {
    let h = Host::login(a, name);
    let deadline = Instant::now() + T;
    loop {
        match BlockStg::open_with(paths(&h, &LUNS), index, STG, config) {
            Ok(s) => return s,
            Err(BlockError::Doorbell { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// A formatted STG opened by host 0 and host 1.
fn two_hosts(seed: u64) -> (Array, Arc<BlockStg>, Arc<BlockStg>) {
    let a = array();
    let (h0, h1) = two_hosts_as(&a, &layout(), seed);
    (a, h0, h1)
}

/// The STG on `a`'s `LUNS` formatted with `layout`, opened by host 0 and
/// host 1.
fn two_hosts_as(a: &Array, layout: &BlockLayout, seed: u64) -> (Arc<BlockStg>, Arc<BlockStg>) {
    format_as(a, layout, seed);
    let h0 = open_host(a, 0, BlockConfig::default());
    let h1 = open_host(a, 1, BlockConfig::default());
    (h0, h1)
}

/// A raw WRITE(16) by another initiator (an intruder, or a torn write).
fn raw_write(a: &Array, lun: u64, lba: u64, data: &[u8]) {
    let mut t = Host::login(a, "intruder").open(lun).unwrap();
    let cdb = Cdb::Write16 {
        lba,
        blocks: (data.len() / 512) as u32,
        flags: RwFlags::default(),
    };
    t.execute(Command::data_out(cdb.emit(), IoBuf::from_slice(data)))
        .into_result()
        .unwrap();
}

fn raw_read(a: &Array, lun: u64, lba: u64) -> Vec<u8> {
    let mut t = Host::login(a, "reader").open(lun).unwrap();
    let cdb = Cdb::Read16 {
        lba,
        blocks: 1,
        flags: RwFlags::default(),
    };
    let (d, _) = t
        .execute(Command::data_in(cdb.emit(), 512))
        .into_result()
        .unwrap();
    d.to_vec()
}

/// A DATA frame, packed (8-byte aligned), sealed with `key` or not.
fn frame(src: u32, dst: u32, seq: u64, body: &[u8], key: Option<&FrameKey>) -> Vec<u8> {
    let h = Header {
        kind: Kind::DATA,
        src_port: src,
        dst_port: dst,
        conn_id: 0xC0FFEE,
        seq,
        payload_len: body.len() as u32,
        ..Header::default()
    };
    match key {
        Some(k) => stp_tests::e2e::seal(h, &[body], k),
        None => {
            let mut v = h.to_bytes().to_vec();
            v.extend_from_slice(body);
            v.resize(v.len().next_multiple_of(8), 0);
            v
        }
    }
}

/// Receives until `n` frames arrived (or `T` passed): (header, payload).
fn recv_n(mb: &mut dyn Mailbox, b: &Binding, n: usize) -> Vec<(Header, Vec<u8>)> {
    let deadline = Instant::now() + T;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        let buf = mb.receive(b, 4 << 20, Duration::from_millis(100)).unwrap();
        for f in Frames::new(&buf) {
            let f = f.unwrap();
            out.push((f.header, f.payload(&buf).to_vec()));
        }
    }
    out
}

/// Message `i` (64 bytes) from host 1 to host 0 and an answer back, each
/// checked to arrive exact.
fn exchange(m0: &mut BlockMailbox, p0: &Binding, m1: &mut BlockMailbox, p1: &Binding, i: u64) {
    let there = payload(i, 64);
    m1.send_packed(p1, &frame(p1.port, p0.port, i, &there, None))
        .unwrap();
    let got = recv_n(m0, p0, 1);
    assert_eq!(got.len(), 1, "round {i}");
    assert_eq!((got[0].0.seq, &got[0].1), (i, &there), "round {i}");
    let back = payload(i | 1 << 32, 64);
    m0.send_packed(p0, &frame(p0.port, p1.port, i, &back, None))
        .unwrap();
    let got = recv_n(m1, p1, 1);
    assert_eq!(got.len(), 1, "round {i} back");
    assert_eq!((got[0].0.seq, &got[0].1), (i, &back), "round {i} back");
}

/// Exchanges messages until both hosts wait for their replies by doorbell
/// (each has measured a probe's cost, which only a message a probe took
/// measures, and heard the other's rings): a loaded machine's polls may
/// take the first few instead.
fn until_replies_rung(
    (h0, m0, p0): (&BlockStg, &mut BlockMailbox, &Binding),
    (h1, m1, p1): (&BlockStg, &mut BlockMailbox, &Binding),
) {
    for i in 0..200 {
        if h0.stats().replies_rung && h1.stats().replies_rung {
            return;
        }
        exchange(m0, p0, m1, p1, 1 << 40 | i);
    }
    panic!(
        "replies not rung after 200 exchanges: {:?} {:?}",
        h0.stats(),
        h1.stats()
    );
}

/// Asserts `n` (polls or probes, both hosts) is about one a message of a
/// ping-pong of `messages` that took `waited`: a quarter more, and one per
/// `PollConfig::max` (10 ms) of waiting per host.
fn about_one_a_message(n: u64, what: &str, messages: u64, waited: Duration) {
    let bound = messages * 5 / 4 + 2 * (waited.as_millis() as u64 / 10 + 1);
    assert!(
        n <= bound,
        "{n} {what} for {messages} messages in {waited:?} (at most {bound})"
    );
}

/// A host with `doorbells` that rings replies whatever a probe costs
/// (`ring_replies_above` zero: the choice where probes are dear).
fn rung_replies(doorbells: Doorbells) -> BlockConfig {
    let mut config = BlockConfig {
        doorbells: Some(doorbells),
        ..BlockConfig::default()
    };
    config.poll.ring_replies_above = Duration::ZERO;
    config
}

/// What `f` of the hosts' counters moved since `before` (taken of the
/// same hosts), summed.
fn moved(
    hosts: &[&BlockStg],
    before: &[stp_core::block::BlockStats],
    f: fn(&stp_core::block::BlockStats) -> u64,
) -> u64 {
    hosts
        .iter()
        .zip(before)
        .map(|(h, b)| f(&h.stats()) - f(b))
        .sum()
}

#[test]
fn format_then_open_from_both_hosts() {
    assert!(layout().required_blocks() <= LUN_BLOCKS);
    assert_eq!(layout().required_blocks(), 4101);
    let a = array();
    let generation = format_stg(&a, 1);
    assert_ne!(generation, 0);
    // Every member carries its own index and the same generation.
    for (i, lun) in LUNS.into_iter().enumerate() {
        let sb = Superblock::decode(&raw_read(&a, lun, 0)).unwrap();
        assert_eq!(sb.member_index as usize, i);
        assert_eq!(sb.member_count, 2);
        assert_eq!(sb.stg_id, STG);
        assert_eq!(sb.layout, layout());
        assert_eq!(sb.block_size, 512);
        assert_eq!(sb.generation, generation);
        // Lane (1, 0): producer and consumer blocks with zero counts.
        let lba = layout().lane_offset(1, 0).unwrap();
        let p = IndexBlock::decode(&raw_read(&a, lun, lba)).unwrap();
        assert_eq!(
            (p.kind, p.generation, p.count),
            (IndexKind::Producer, generation, 0)
        );
        let c = IndexBlock::decode(&raw_read(&a, lun, lba + 1)).unwrap();
        assert_eq!((c.kind, c.count), (IndexKind::Consumer, 0));
    }
    let h0 = open_host(&a, 0, BlockConfig::default());
    let h1 = open_host(&a, 1, BlockConfig::default());
    for (h, index) in [(&h0, 0), (&h1, 1)] {
        assert_eq!(h.host(), index);
        assert_eq!(h.generation(), generation);
        assert_eq!(h.layout(), layout());
        assert_eq!(h.members(), 2);
        assert_eq!(h.block_size(), 512);
        assert_eq!(h.slot_bytes(), 32 * 1024);
        assert_eq!(
            h.max_payload(),
            32 * 1024 - 24 - stp_core::wire::HEADER_LEN as u32
        );
        assert_eq!(h.epoch(), 1);
    }
    // Opening announced each host's epoch in the blocks it writes.
    let p = IndexBlock::decode(&raw_read(&a, 0, layout().lane_offset(0, 1).unwrap())).unwrap();
    assert_eq!(p.epoch, 1);

    // A host index beyond the layout.
    let h = Host::login(&a, "host2");
    let err = BlockStg::open(paths(&h, &LUNS), 2, STG).unwrap_err();
    assert!(
        matches!(
            err,
            BlockError::BadHostIndex {
                host: 2,
                hosts: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("formatted for 2 hosts"), "{err}");
    // The wrong STG id.
    let err = BlockStg::open(paths(&h, &LUNS), 0, 8).unwrap_err();
    assert!(
        matches!(err, BlockError::WrongStg { found: 7, .. }),
        "{err}"
    );
    // A member missing.
    let err = BlockStg::open(paths(&h, &LUNS[..1]), 0, STG).unwrap_err();
    assert!(
        matches!(
            err,
            BlockError::MemberCount {
                found: 2,
                given: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unformatted_or_too_small_luns_are_clear_errors() {
    let a = array();
    let h = Host::login(&a, "host0");
    let err = BlockStg::open(paths(&h, &LUNS), 0, STG).unwrap_err();
    assert!(
        matches!(err, BlockError::NotFormatted { member: 0, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("not formatted for block mode"), "{text}");
    assert!(text.contains("run `stp stg format`"), "{text}");
    assert!(text.contains("sim:host0/lun0"), "{text}");

    // Too small for the layout: says how many blocks it needs.
    a.add_lun(5, LunConfig::new(5, 4100, 512)).unwrap();
    let err = format(
        &mut paths(&h, &[0, 5]),
        STG,
        &layout(),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            BlockError::TooSmall {
                member: 1,
                needed: 4101,
                present: 4100,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("needs 4101"), "{err}");
    // A refused format wrote nothing: member 0 is still unformatted.
    assert!(matches!(
        BlockStg::open(paths(&h, &LUNS), 0, STG).unwrap_err(),
        BlockError::NotFormatted { .. }
    ));
}

#[test]
fn layouts_are_chosen_from_the_members_limits() {
    let a = Array::new();
    let lun = |id: u64, blocks: u64, max_transfer_blocks: u32| {
        let mut c = LunConfig::new(id, blocks, 512);
        c.max_transfer_blocks = max_transfer_blocks;
        a.add_lun(id, c).unwrap();
    };
    lun(10, 1 << 17, 8192); // 64 MiB, 4 MiB per command
    lun(11, 1 << 17, 8192);
    lun(12, 1 << 17, 512); // 256 KiB per command
    lun(13, 8192, 8192); // 4 MiB in all
    let h = Host::login(&a, "admin");
    let auto = LayoutRequest {
        hosts: 2,
        ..LayoutRequest::default()
    };
    let choose = |luns: &[u64], request, host_limit| {
        choose_layout(&mut paths(&h, luns), STG, request, host_limit).unwrap()
    };

    // Where the path carries it: 1 MiB slots, a 16 MiB ring.
    let c = choose(&[10, 11], auto, None);
    assert_eq!((c.layout.slot_blocks, c.layout.slots), (2048, 16), "{c:?}");
    assert_eq!((c.slot_bytes, c.block_size), (1 << 20, 512));
    // A member's MAXIMUM TRANSFER LENGTH, or the host's queue limit, is
    // the slot size when lower, and the operator is told which.
    let c = choose(&[10, 12], auto, None);
    assert_eq!((c.layout.slot_blocks, c.layout.slots), (512, 64), "{c:?}");
    assert!(c.limited_by.contains("member 1"), "{c:?}");
    let c = choose(&[10, 11], auto, Some(128 << 10));
    assert_eq!(c.slot_bytes, 128 << 10, "{c:?}");
    assert!(c.limited_by.contains("max_hw_sectors_kb"), "{c:?}");
    // A small member: fewer slots, then smaller ones, and the result
    // formats and opens.
    let c = choose(&[10, 13], auto, None);
    assert_eq!((c.layout.slot_blocks, c.layout.slots), (512, 7), "{c:?}");
    assert!(c.limited_by.contains("capacity"), "{c:?}");
    format(
        &mut paths(&h, &[10, 13]),
        STG,
        &c.layout,
        &mut StdRng::seed_from_u64(5),
    )
    .unwrap();
    let stg = BlockStg::open(paths(&Host::login(&a, "host0"), &[10, 13]), 0, STG).unwrap();
    assert_eq!(stg.layout(), c.layout);
    // What the configuration fixes is kept.
    let fixed = LayoutRequest {
        hosts: 3,
        slots: Some(8),
        slot_blocks: Some(64),
    };
    assert_eq!(
        choose(&[10, 11], fixed, None).layout,
        BlockLayout {
            hosts: 3,
            slots: 8,
            slot_blocks: 64
        }
    );
    let slots_only = LayoutRequest {
        slots: Some(8),
        ..auto
    };
    assert_eq!(choose(&[10, 11], slots_only, None).layout.slot_blocks, 2048);
    // But not a slot that one command does not carry: it is refused, with
    // the limit and what sets it.
    let too_large = |slot_blocks, luns: &[u64], host_limit| {
        let request = LayoutRequest {
            slot_blocks: Some(slot_blocks),
            ..auto
        };
        choose_layout(&mut paths(&h, luns), STG, request, host_limit).unwrap_err()
    };
    let err = too_large(1024, &[10, 12], None);
    assert!(
        matches!(
            err,
            BlockError::SlotAboveTransferLimit {
                limit: 262_144,
                max_blocks: 512,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("member 1"), "{err}");
    let err = too_large(4096, &[10, 11], None);
    assert!(err.to_string().contains("1 MiB per command"), "{err}");
    let err = too_large(512, &[10, 11], Some(128 << 10));
    assert!(err.to_string().contains("max_hw_sectors_kb"), "{err}");
    assert_eq!(
        choose(
            &[10, 11],
            LayoutRequest {
                slot_blocks: Some(256),
                ..auto
            },
            Some(128 << 10)
        )
        .slot_bytes,
        128 << 10
    );
}

#[test]
fn an_stg_of_the_earlier_block_format_is_refused_with_what_to_do() {
    let a = array();
    format_stg(&a, 3);
    let h = Host::login(&a, "host0");
    for (magic, format) in [(b"STPBLKv1", 1), (b"STPBLKv2", 2), (b"STPBLKv3", 3)] {
        // Member 1's superblock as that block format wrote it (its magic).
        let mut block0 = raw_read(&a, LUNS[1], 0);
        block0[..8].copy_from_slice(magic);
        raw_write(&a, LUNS[1], 0, &block0);
        let err = BlockStg::open(paths(&h, &LUNS), 0, STG).unwrap_err();
        assert!(
            matches!(err, BlockError::OldFormat { member: 1, format: f, .. } if f == format),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&format!("block format {format}")), "{text}");
        assert!(text.contains("run `stp stg format`"), "{text}");
    }
}

#[test]
fn member_order_and_generation_mismatch() {
    let a = array();
    let generation = format_stg(&a, 2);
    let h = Host::login(&a, "host0");
    // Members listed in another order than formatted.
    let err = BlockStg::open(paths(&h, &[1, 0]), 0, STG).unwrap_err();
    assert!(
        matches!(
            err,
            BlockError::MemberOrder {
                position: 0,
                found: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("same order on every host"),
        "{err}"
    );

    // Member 1 from another format (a stale view): generations differ.
    let mut sb = Superblock::decode(&raw_read(&a, 1, 0)).unwrap();
    sb.generation = generation ^ 0xFFFF;
    let mut block = sb.encode().to_vec();
    block.resize(512, 0);
    raw_write(&a, 1, 0, &block);
    let err = BlockStg::open(paths(&h, &LUNS), 0, STG).unwrap_err();
    assert!(
        matches!(err, BlockError::GenerationMismatch { member: 1, found, expected, .. }
            if found == generation ^ 0xFFFF && expected == generation),
        "{err}"
    );
    assert!(err.to_string().contains("run `stp stg format`"), "{err}");

    // A torn superblock.
    block[20] ^= 1;
    raw_write(&a, 1, 0, &block);
    let err = BlockStg::open(paths(&h, &LUNS), 0, STG).unwrap_err();
    assert!(
        matches!(err, BlockError::CorruptSuperblock { member: 1, .. }),
        "{err}"
    );
}

#[test]
fn raw_frames_route_by_port_in_order_both_ways() {
    let (_a, h0, h1) = two_hosts(3);
    let (key, _) = keys(3);
    let mut m0 = h0.handle();
    let mut m1 = h1.handle();
    // Ports are host-qualified: a host binds only its own.
    let a1 = m1.bind(Some(host_port(1, 100).unwrap())).unwrap();
    let b1 = m1.bind(None).unwrap();
    let c0 = m0.bind(None).unwrap();
    assert_eq!(a1.port, 4096 + 100);
    assert_eq!(b1.port >> 12, 1);
    assert!(b1.port & 4095 >= 2048);
    assert_eq!(c0.port >> 12, 0);
    let err = m0.bind(Some(host_port(1, 101).unwrap())).unwrap_err();
    assert!(err.to_string().contains("belongs to host 1"), "{err}");
    assert!(matches!(
        m1.bind(Some(a1.port)),
        Err(MailboxError::Refused(Refusal::PortInUse))
    ));
    // A frame for a host beyond the layout is refused at once.
    let f = frame(c0.port, host_port(5, 1).unwrap(), 0, b"x", None);
    assert!(matches!(
        m0.send_packed(&c0, &f),
        Err(MailboxError::Refused(Refusal::PortNotBound(p))) if p == host_port(5, 1).unwrap()
    ));

    // host 0 → host 1: sizes from empty to a full slot, one to five frames
    // per send, alternating between two ports.
    let max = h0.max_payload() as usize;
    let sizes = [0usize, 1, 100, 4000, 9000, max, 20_000, 7];
    let mut expect_a = Vec::new();
    let mut expect_b = Vec::new();
    let mut n = 0u64;
    for round in 0..40 {
        let mut packed = Vec::new();
        for k in 0..(round % 5 + 1) {
            let len = sizes[(round + k) % sizes.len()];
            let body = payload(n, len);
            let (dst, list) = if n % 3 == 0 {
                (b1.port, &mut expect_b)
            } else {
                (a1.port, &mut expect_a)
            };
            packed.extend(frame(c0.port, dst, n, &body, None));
            list.push((n, body));
            n += 1;
        }
        m0.send_packed(&c0, &packed).unwrap();
    }
    // A frame for an unbound port of host 1 is dropped and counted.
    let f = frame(c0.port, host_port(1, 999).unwrap(), 0, b"nobody", None);
    m0.send_packed(&c0, &f).unwrap();
    for (b, expect) in [(&a1, &expect_a), (&b1, &expect_b)] {
        let got = recv_n(&mut m1, b, expect.len());
        assert_eq!(got.len(), expect.len());
        for ((h, body), (seq, want)) in got.iter().zip(expect.iter()) {
            assert_eq!(h.seq, *seq, "frames in order per lane");
            assert_eq!(h.dst_port, b.port);
            assert_eq!(h.src_port, c0.port);
            assert_eq!(body, want, "payload of frame {seq}");
        }
    }
    // host 1 → host 0, sealed frames: they open with the key at the far end.
    for i in 0..30u64 {
        let body = payload(1000 + i, (i as usize * 1237) % 30_000);
        m1.send_packed(&a1, &frame(a1.port, c0.port, i, &body, Some(&key)))
            .unwrap();
    }
    let got = recv_n(&mut m0, &c0, 30);
    assert_eq!(got.len(), 30);
    for (i, (h, body)) in got.iter().enumerate() {
        assert_eq!(h.seq, i as u64);
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(body);
        let (_, plain) = stp_tests::e2e::open(&bytes, &key).unwrap();
        assert_eq!(plain, payload(1000 + i as u64, (i * 1237) % 30_000));
    }
    // Frames for this host's own ports never touch the array.
    m0.send_packed(&c0, &frame(c0.port, c0.port, 77, b"loop", None))
        .unwrap();
    let got = recv_n(&mut m0, &c0, 1);
    assert_eq!((got[0].0.seq, &got[0].1[..]), (77, &b"loop"[..]));

    let deadline = Instant::now() + T;
    while h1.stats().frames_unbound == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let s0 = h0.stats();
    let s1 = h1.stats();
    assert_eq!(s1.frames_unbound, 1);
    assert_eq!(s0.frames_sent, n + 1);
    assert_eq!(s0.frames_local, 1);
    assert_eq!(s1.frames_received, n);
    assert_eq!(s0.frames_received, 31);
    assert_eq!(
        s1.bad_slots + s1.bad_producer_blocks + s1.out_of_sequence,
        0
    );
    assert!(s0.slots_written >= 40, "{s0:?}");

    // A frame too large for a slot is refused, saying why.
    let f = frame(c0.port, a1.port, 0, &vec![0; max + 1], None);
    let err = m0.send_packed(&c0, &f).unwrap_err();
    assert!(err.to_string().contains("lower max_payload"), "{err}");
    // Releasing ends a waiting receive.
    let waiter = {
        let mut m = h1.handle();
        thread::spawn(move || m.receive(&b1, 1 << 20, Duration::from_secs(10)))
    };
    thread::sleep(Duration::from_millis(50));
    m1.release(&b1).unwrap();
    assert!(matches!(
        waiter.join().unwrap(),
        Err(MailboxError::Refused(Refusal::Released))
    ));
    assert!(matches!(
        m1.receive(&b1, 1024, Duration::ZERO),
        Err(MailboxError::Refused(Refusal::BadHandle))
    ));
}

fn source(stg: &Arc<BlockStg>) -> Arc<dyn PathSource> {
    stp_core::stg::block_source(Arc::clone(stg))
}

#[test]
fn stream_moves_8_mib_and_1_mib_back() {
    let (_a, h0, h1) = two_hosts(4);
    stream_8_mib_and_1_mib_back(&h0, &h1);
}

/// Members of 4096-byte logical blocks (4Kn LUNs, as some arrays offer):
/// slots, index blocks and probes are whole 4 KiB blocks, and a stream
/// moves the same.
#[test]
fn a_stream_over_4096_byte_blocks() {
    let a = Array::new();
    for id in LUNS {
        a.add_lun(id, LunConfig::new(id, LUN_BLOCKS / 8, 4096))
            .unwrap();
    }
    let four_k = BlockLayout {
        hosts: 2,
        slots: 16,
        slot_blocks: 16,
    };
    let (h0, h1) = two_hosts_as(&a, &four_k, 13);
    assert_eq!(h0.max_payload() as usize, 16 * 4096 - 104);
    stream_8_mib_and_1_mib_back(&h0, &h1);
}

/// Host 0 streams 8 MiB to host 1, which streams 1 MiB back, through
/// the block STG both have open: exact, and with no bad slot or index
/// block.
fn stream_8_mib_and_1_mib_back(h0: &Arc<BlockStg>, h1: &Arc<BlockStg>) {
    let (kc, ks) = keys(4);
    let config = Config {
        max_payload: h0.max_payload(),
        ..Config::default()
    };
    const UP: u64 = 8 << 20;
    const DOWN: u64 = 1 << 20;
    let wkp = host_port(1, 1005).unwrap();
    assert_eq!(wkp, 5101);
    let mut listener = StpListener::bind(source(h1), Some(wkp), ks, config.clone()).unwrap();
    let started = Instant::now();
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        assert_eq!(s.local_port() >> 12, 1);
        recv_stream(&mut s, 41, UP);
        send_stream(&mut s, 42, DOWN);
        s.shutdown(T).unwrap();
    });
    let mut c = StpStream::connect(source(h0), wkp, kc, config, T).unwrap();
    assert_eq!(c.local_port() >> 12, 0);
    send_stream(&mut c, 41, UP);
    recv_stream(&mut c, 42, DOWN);
    c.shutdown(T).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    server.join().unwrap();
    let elapsed = started.elapsed();
    let (s0, s1) = (h0.stats(), h1.stats());
    eprintln!("9 MiB in {elapsed:?}; host 0 {s0:?}; host 1 {s1:?}");
    // A slot a frame at most: the 8 MiB alone take this many.
    let frames_up = UP / u64::from(h0.max_payload());
    assert!(s0.slots_written > frames_up && s1.slots_read >= s0.slots_written - 4);
    assert_eq!(s0.bad_slots + s1.bad_slots, 0);
    assert_eq!(s0.bad_producer_blocks + s1.bad_producer_blocks, 0);
}

/// A host that sends after a quiet spell rings the receiver's doorbell,
/// which polls at once; a datagram that is not a peer's doorbell is
/// counted and changes nothing; a doorbell address in use is refused
/// with what to check.
#[test]
fn a_send_after_silence_rings_the_receivers_doorbell() {
    let a = array();
    format_stg(&a, 8);
    let bells = Doorbells::loopback(2).unwrap();
    let config = BlockConfig {
        doorbells: Some(bells),
        ..BlockConfig::default()
    };
    let (h0, mut m0, p0) = bound_host(&a, 0, config);
    let (h1, mut m1, p1) = bound_host(&a, 1, config);
    // Garbage, and a doorbell of another STG, at host 0's doorbell.
    let intruder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = bells.of(0).unwrap();
    intruder.send_to(b"ring ring", to).unwrap();
    let foreign = Ring {
        stg_id: STG + 1,
        src: 1,
        dst: 0,
        generation: h0.generation() as u32,
    };
    intruder.send_to(&foreign.encode(), to).unwrap();
    let deadline = Instant::now() + T;
    while h0.stats().doorbells_bad < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        (h0.stats().doorbells_bad, h0.stats().doorbells_heard),
        (2, 0)
    );
    // The first send to a host rings it; one right after does not (the
    // rule itself is tested on a virtual clock in `block::doorbell`; here
    // a loaded machine may space the two sends past the quiet spell).
    for i in 0..2 {
        m1.send_packed(&p1, &frame(p1.port, p0.port, i, &payload(i, 64), None))
            .unwrap();
    }
    assert_eq!(recv_n(&mut m0, &p0, 2).len(), 2);
    let rung = h1.stats().doorbells_rung;
    assert!((1..=2).contains(&rung), "{rung} doorbells rung");
    while h0.stats().doorbells_heard < rung && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(h0.stats().doorbells_heard, rung);
    // Silence past the quiet spell: the next send rings again.
    thread::sleep(RING_QUIET * 2);
    m1.send_packed(&p1, &frame(p1.port, p0.port, 2, &payload(2, 64), None))
        .unwrap();
    assert_eq!(recv_n(&mut m0, &p0, 1).len(), 1);
    while h0.stats().doorbells_heard < rung + 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        (h1.stats().doorbells_rung, h0.stats().doorbells_heard),
        (rung + 1, rung + 1)
    );
    assert_eq!(h0.stats().doorbells_bad, 2);
    // Host 0's address is taken while it is open.
    let h = Host::login(&a, "host0-again");
    let err = BlockStg::open_with(paths(&h, &LUNS), 0, STG, config).unwrap_err();
    assert!(matches!(err, BlockError::Doorbell { .. }), "{err}");
    assert!(err.to_string().contains("doorbells"), "{err}");
    // Closed, it lets the address go (once its threads let go of the
    // engine, which the last of them drops).
    drop((m0, h0));
    reopen_host(&a, "host0-again", 0, config);
}

/// Where a probe is dear (here: any probe, `ring_replies_above` zero) and
/// the hosts have doorbells, each side rings the other after every send and
/// takes the reply by the one probe the ring asks for, not by reply polls:
/// a ping-pong of messages arrives exact, each message rung and probed
/// once, and the polls are about the rung ones, plus at most one a
/// `PollConfig::max` of waiting (a ring the machine was slow to hear). A
/// message goes without its producer block, which follows; a host that
/// reopens before writing it goes past the message, not over it.
#[test]
fn where_probes_are_dear_replies_are_rung_not_probed_for() {
    let a = array();
    format_stg(&a, 9);
    let config = rung_replies(Doorbells::loopback(2).unwrap());
    let (h0, mut m0, p0) = bound_host(&a, 0, config);
    let (h1, mut m1, p1) = bound_host(&a, 1, config);
    until_replies_rung((&h0, &mut m0, &p0), (&h1, &mut m1, &p1));
    let before = [h0.stats(), h1.stats()];
    let counted = stp_core::counters::snapshot();
    let started = Instant::now();
    let rounds = 200u64;
    for i in 1..=rounds {
        exchange(&mut m0, &p0, &mut m1, &p1, i);
    }
    let waited = started.elapsed();
    let messages = 2 * rounds;
    let d = |f| moved(&[&h0, &h1], &before, f);
    assert_eq!(d(|s| s.doorbells_rung), messages, "every send rung");
    // The process counts them as LAN bytes (a backup's LAN control), each
    // once: sent, not heard again from a host of its own (other tests of
    // this binary may add theirs).
    let lan = stp_core::counters::snapshot()
        .since(&counted)
        .doorbell_bytes;
    assert!(
        lan >= messages * RING_LEN as u64,
        "{lan} doorbell bytes for {messages} datagrams"
    );
    assert_eq!(d(|s| s.slots_probed), messages, "every message probed");
    // A ring that comes after another poll already took its message costs
    // a poll more (a loaded machine's races); reply probing would cost
    // 1.4 polls a message and more.
    about_one_a_message(d(|s| s.polls), "polls", messages, waited);
    // Most messages were published without their producer block (the
    // probe took them); the blocks follow within about 100 ms.
    let unannounced = d(|s| s.unannounced_slots);
    assert!(
        unannounced >= messages / 2,
        "{unannounced} of {messages} left unannounced"
    );
    let announced = |a: &Array| -> u64 {
        let lane = layout().lane_offset(1, 0).unwrap();
        LUNS.iter()
            .map(|&lun| IndexBlock::decode(&raw_read(a, lun, lane)).unwrap().count)
            .sum()
    };
    // Every message host 1 sent, the warm-up's too: one slot each.
    let sent = h1.stats().slots_written;
    assert!(sent > rounds);
    let deadline = Instant::now() + T;
    while announced(&a) < sent && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(announced(&a), sent, "host 1's producer blocks caught up");
    // Host 1 goes away right after a message a probe took, before its
    // producer block says so; reopened, it writes its next message past
    // it, not over it (where it would be lost: host 0 has taken that
    // position).
    // A machine too loaded to look within the 100 ms the block may wait
    // sends another.
    let mut sent = sent;
    for k in 0.. {
        let body = payload(7777 + k, 64);
        m1.send_packed(&p1, &frame(p1.port, p0.port, 7777 + k, &body, None))
            .unwrap();
        assert_eq!(recv_n(&mut m0, &p0, 1).len(), 1);
        sent += 1;
        if announced(&a) < sent {
            break;
        }
        assert!(k < 20, "every message announced before it could be seen");
    }
    drop((m1, h1));
    let h1 = reopen_host(&a, "host1-again", 1, config);
    assert_eq!(announced(&a), sent, "announced on reopening");
    let mut m1 = h1.handle();
    let p1 = m1.bind(None).unwrap();
    let body = payload(8888, 64);
    m1.send_packed(&p1, &frame(p1.port, p0.port, 8888, &body, None))
        .unwrap();
    let got = recv_n(&mut m0, &p0, 1);
    assert_eq!(got.len(), 1, "the reopened host's first message arrives");
    assert_eq!((got[0].0.seq, &got[0].1), (8888, &body));
}

/// On an STG of three hosts where replies are rung, a ring probes the
/// lane of the host that rang, not every lane: a ping-pong between hosts 0
/// and 1 costs one probe a message, and host 2's idle lanes none.
#[test]
fn a_ring_probes_only_the_lane_of_the_host_that_rang() {
    let a = array();
    let three = BlockLayout {
        hosts: 3,
        ..layout()
    };
    format_as(&a, &three, 11);
    let config = rung_replies(Doorbells::loopback(3).unwrap());
    let (h0, mut m0, p0) = bound_host(&a, 0, config);
    let (h1, mut m1, p1) = bound_host(&a, 1, config);
    let (h2, _m2, _p2) = bound_host(&a, 2, config);
    until_replies_rung((&h0, &mut m0, &p0), (&h1, &mut m1, &p1));
    let before = [h0.stats(), h1.stats()];
    let started = Instant::now();
    let rounds = 100u64;
    for i in 1..=rounds {
        exchange(&mut m0, &p0, &mut m1, &p1, i);
    }
    let waited = started.elapsed();
    let d = |f| moved(&[&h0, &h1], &before, f);
    let messages = 2 * rounds;
    assert_eq!(d(|s| s.slots_probed), messages, "every message probed");
    // Probing every lane would cost two probes a message; a ring that
    // comes after another poll took its message, or a poll at a lost
    // ring's bound (`PollConfig::max`), may add one.
    about_one_a_message(d(|s| s.probes), "probes", messages, waited);
    assert_eq!(h2.stats().slots_read, 0);
}

/// Where one host's rings never reach its peer (here host 1 rings a port
/// nobody listens on, as behind a firewall), the peer keeps probing for
/// that host's messages rather than waiting for rings that do not come;
/// host 1, which hears host 0's rings, waits for them.
#[test]
fn a_host_whose_peers_rings_are_lost_probes_for_its_replies() {
    let a = array();
    format_stg(&a, 10);
    let bells = Doorbells::loopback(3).unwrap();
    let addrs = bells.addrs();
    let config = rung_replies(Doorbells::new(&addrs[..2]));
    let (h0, mut m0, p0) = bound_host(&a, 0, config);
    // Host 1 rings host 0 at the third address, where nothing listens.
    let lost = BlockConfig {
        doorbells: Some(Doorbells::new(&[addrs[2], addrs[1]])),
        ..config
    };
    let (h1, mut m1, p1) = bound_host(&a, 1, lost);
    // At least 20 exchanges, and more while host 1 has not measured a
    // probe (a loaded machine's ordinary polls may take the first few).
    for i in 0..200u64 {
        exchange(&mut m0, &p0, &mut m1, &p1, i);
        if i >= 20 && h1.stats().replies_rung {
            break;
        }
    }
    let (s0, s1) = (h0.stats(), h1.stats());
    assert_eq!(s0.doorbells_heard, 0, "host 1's rings are lost");
    assert!(s1.doorbells_heard > 0, "host 0's arrive");
    assert!(!s0.replies_rung, "host 0 probes for host 1's messages");
    assert!(s1.replies_rung, "host 1 waits for host 0's rings");
}

/// Slot sizes in a producer block are a hint of how much to READ: one too
/// small makes a lone slot read again as far as its header says, one too
/// large reads no more than the slot, and one too small at the end of a
/// run holds the lane at that slot (never delivering it cut short) until
/// a block with the right size comes. Every frame arrives exact, in order.
#[test]
fn forged_slot_sizes_delay_but_never_cut_a_slot() {
    let a = array();
    format_stg(&a, 6);
    // Host 1 alone; this test writes host 0's slots and producer blocks.
    let h1 = open_host(
        &a,
        1,
        BlockConfig {
            bad_slot_patience: T,
            ..BlockConfig::default()
        },
    );
    let generation = h1.generation();
    let mut m1 = h1.handle();
    let p1 = m1.bind(Some(host_port(1, 9).unwrap())).unwrap();
    let src = host_port(0, 9).unwrap();
    let lane = layout().lane_offset(0, 1).unwrap();
    let body = |seq: u64| payload(seq, 20_000);
    // Slot `counter` of member `lun` with lane sequence number `seq`.
    let put_slot = |lun: u64, counter: u32, seq: u64| -> u32 {
        let mut slot = vec![0u8; 24];
        slot.extend_from_slice(&frame(src, p1.port, seq, &body(seq), None));
        stp_core::block::seal_slot(&mut slot, generation, seq);
        let used = slot.len() as u32;
        slot.resize(slot.len().next_multiple_of(512), 0);
        raw_write(&a, lun, layout().slot_offset(0, 1, counter).unwrap(), &slot);
        used
    };
    let publish = |lun: u64, count: u64, sizes: &[(usize, u32)]| {
        let mut b = IndexBlock::new(IndexKind::Producer, generation, count, 9);
        for &(n, size) in sizes {
            b.sizes[n] = size;
        }
        let mut block = b.encode().to_vec();
        block.resize(512, 0);
        raw_write(&a, lun, lane, &block);
    };
    let expect = |m1: &mut dyn Mailbox, seqs: std::ops::Range<u64>| {
        let got = recv_n(m1, &p1, seqs.clone().count());
        let want: Vec<(u64, Vec<u8>)> = seqs.map(|q| (q, body(q))).collect();
        let got: Vec<(u64, Vec<u8>)> = got.into_iter().map(|(h, b)| (h.seq, b)).collect();
        let lens = |v: &[(u64, Vec<u8>)]| v.iter().map(|(q, b)| (*q, b.len())).collect::<Vec<_>>();
        assert!(
            got == want,
            "got (seq, bytes) {:?}, want {:?}",
            lens(&got),
            lens(&want)
        );
    };

    // Seq 0 on member 0, its size given as 600 bytes: read again whole.
    put_slot(0, 0, 0);
    publish(0, 1, &[(0, 600)]);
    expect(&mut m1, 0..1);
    // Seq 1 on member 1, its size given as 1 GiB: the slot, no more.
    let s1 = put_slot(1, 0, 1);
    publish(1, 1, &[(0, 1 << 30)]);
    expect(&mut m1, 1..2);
    // Seqs 2 and 4 on member 0, 3 on member 1; seq 4's size (the end of
    // member 0's run) given as 512 bytes.
    let s2 = put_slot(0, 1, 2);
    let s3 = put_slot(1, 1, 3);
    let s4 = put_slot(0, 2, 4);
    publish(1, 2, &[(0, s1), (1, s3)]);
    publish(0, 3, &[(1, s2), (2, 512)]);
    expect(&mut m1, 2..4);
    let deadline = Instant::now() + T;
    while h1.stats().bad_slots == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    let s = h1.stats();
    assert_eq!((s.bad_slots, s.frames_received), (1, 4), "{s:?}");
    // The right size: seq 4 arrives whole.
    publish(0, 3, &[(1, s2), (2, s4)]);
    expect(&mut m1, 4..5);
    let s = h1.stats();
    assert_eq!(
        (s.bad_slots, s.slots_read, s.frames_received),
        (1, 5, 5),
        "{s:?}"
    );
}

#[test]
fn corrupt_index_and_slot_are_ignored_and_counted() {
    let a = array();
    format_stg(&a, 5);
    let h0 = open_host(&a, 0, BlockConfig::default());
    let h1 = open_host(
        &a,
        1,
        BlockConfig {
            bad_slot_patience: T,
            ..BlockConfig::default()
        },
    );
    let mut m0 = h0.handle();
    let mut m1 = h1.handle();
    let p1 = m1.bind(Some(host_port(1, 9).unwrap())).unwrap();
    let p0 = m0.bind(None).unwrap();
    let lane = layout().lane_offset(0, 1).unwrap();
    let forge = |lun, count| {
        let mut block = IndexBlock::new(IndexKind::Producer, h1.generation(), count, 9)
            .encode()
            .to_vec();
        block.resize(512, 0);
        raw_write(&a, lun, lane, &block);
    };

    // Garbage in the producer block of lane (0, 1) on member 0, and on
    // member 1 a well-formed block of this generation claiming more slots
    // than the ring holds: neither is trusted.
    raw_write(&a, 0, lane, &payload(99, 512));
    forge(1, 1000);
    let deadline = Instant::now() + T;
    while h1.stats().bad_producer_blocks < 4 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    let s = h1.stats();
    assert!(s.bad_producer_blocks >= 4, "{s:?}");
    assert_eq!(
        s.slots_read, 0,
        "nothing read on the strength of a bad index"
    );

    // A forged index pointing at a slot that fails its CRC: the slot is
    // counted once and never delivered; the lane waits at it.
    forge(0, 1);
    raw_write(
        &a,
        0,
        layout().slot_offset(0, 1, 0).unwrap(),
        &payload(7, 1024),
    );
    while h1.stats().bad_slots == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    thread::sleep(Duration::from_millis(20));
    let s = h1.stats();
    assert_eq!(
        (s.bad_slots, s.slots_read, s.frames_received),
        (1, 0, 0),
        "{s:?}"
    );
    assert!(m1
        .receive(&p1, 1 << 20, Duration::from_millis(10))
        .unwrap()
        .is_empty());

    // The real producer rewrites the slot and its blocks as it sends:
    // every frame arrives, in order.
    for i in 0..10u64 {
        m0.send_packed(&p0, &frame(p0.port, p1.port, i, &payload(i, 3000), None))
            .unwrap();
    }
    let got = recv_n(&mut m1, &p1, 10);
    assert_eq!(got.len(), 10);
    for (i, (h, body)) in got.iter().enumerate() {
        assert_eq!(h.seq, i as u64);
        assert_eq!(*body, payload(i as u64, 3000));
    }
    // (The poller counts a slot read just after queueing its frames.)
    while h1.stats().slots_read < 10 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let s = h1.stats();
    assert_eq!(
        (s.bad_slots, s.slots_read, s.frames_received),
        (1, 10, 10),
        "{s:?}"
    );
}

#[test]
fn bad_slot_is_skipped_after_patience() {
    let a = array();
    format_stg(&a, 8);
    let h1 = open_host(
        &a,
        1,
        BlockConfig {
            bad_slot_patience: Duration::from_millis(50),
            ..BlockConfig::default()
        },
    );
    let lane = layout().lane_offset(0, 1).unwrap();
    let mut block = IndexBlock::new(IndexKind::Producer, h1.generation(), 1, 1)
        .encode()
        .to_vec();
    block.resize(512, 0);
    // A slot from another generation (a stale format) behind the index.
    let mut slot = vec![0u8; 24];
    slot.extend_from_slice(b"stale frames");
    stp_core::block::seal_slot(&mut slot, h1.generation() ^ 1, 0);
    slot.resize(512, 0);
    raw_write(&a, 0, layout().slot_offset(0, 1, 0).unwrap(), &slot);
    raw_write(&a, 0, lane, &block);
    let deadline = Instant::now() + T;
    while h1.stats().slots_read == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let s = h1.stats();
    assert_eq!(
        (s.bad_slots, s.slots_read, s.frames_received),
        (1, 1, 0),
        "{s:?}"
    );
    // Its consumer block moved past it.
    let c = IndexBlock::decode(&raw_read(&a, 0, lane + 1)).unwrap();
    assert_eq!((c.kind, c.count), (IndexKind::Consumer, 1));
}

#[test]
fn reformat_is_detected_by_a_running_host() {
    let (a, h0, h1) = two_hosts(6);
    let mut m0 = h0.handle();
    let p0 = m0.bind(Some(host_port(0, 5).unwrap())).unwrap();
    let old = h0.generation();
    drop(h1);
    // Formatted again while host 0 keeps running on the old generation.
    let new = format_stg(&a, 66);
    assert_ne!(new, old);
    let h1 = open_host(&a, 1, BlockConfig::default());
    let mut m1 = h1.handle();
    let p1 = m1.bind(None).unwrap();
    m1.send_packed(&p1, &frame(p1.port, p0.port, 0, b"new", None))
        .unwrap();
    let deadline = Instant::now() + T;
    while h0.stats().foreign_generation == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
    assert!(h0.stats().foreign_generation > 0);
    let err = h0.verify().unwrap_err();
    assert!(
        matches!(err, BlockError::Reformatted { found, opened, .. } if found == new && opened == old),
        "{err}"
    );
    assert!(err.to_string().contains("reopen"), "{err}");
    // The stale host delivers nothing and refuses to write.
    let err = m0.receive(&p0, 1 << 20, Duration::ZERO).unwrap_err();
    assert!(err.to_string().contains("reformatted"), "{err}");
    let err = m0
        .send_packed(&p0, &frame(p0.port, p1.port, 0, b"old", None))
        .unwrap_err();
    assert!(err.to_string().contains("reformatted"), "{err}");
    assert_eq!(h0.stats().frames_received, 0);
    // A host that opens now sees the new format.
    let h0 = open_host(&a, 0, BlockConfig::default());
    assert_eq!(h0.generation(), new);
}

#[test]
fn full_ring_back_pressures_and_data_arrives_later() {
    let a = array();
    format_stg(&a, 7);
    let h0 = open_host(
        &a,
        0,
        BlockConfig {
            ring_full_wait: Duration::from_millis(100),
            ..BlockConfig::default()
        },
    );
    let h1 = open_host(
        &a,
        1,
        BlockConfig {
            queue_frames: 4,
            queue_bytes: 64 * 1024,
            ..BlockConfig::default()
        },
    );
    let mut m1 = h1.handle();
    let p1 = m1.bind(None).unwrap();
    let p0 = h0.handle().bind(None).unwrap();
    // More frames than two rings (2 × 32 slots) and the queue hold: one
    // 16 KiB frame per send, so each send is one slot.
    const N: u64 = 100;
    let full = Arc::new(AtomicU64::new(0));
    let sender = {
        let mut m0 = h0.handle();
        let full = full.clone();
        thread::spawn(move || {
            for i in 0..N {
                let f = frame(p0.port, p1.port, i, &payload(i, 16_000), None);
                loop {
                    match m0.send_packed(&p0, &f) {
                        Ok(()) => break,
                        Err(MailboxError::Refused(Refusal::QueueFull { port })) => {
                            assert_eq!(port, p1.port);
                            full.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("send {i}: {e}"),
                    }
                }
            }
        })
    };
    // The receiver does not read for a while: the lane stalls, the ring
    // fills, the sender is told to back off.
    let deadline = Instant::now() + T;
    while full.load(Ordering::Relaxed) < 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(full.load(Ordering::Relaxed) >= 2);
    let s0 = h0.stats();
    let s1 = h1.stats();
    assert!(
        s0.ring_full_waits >= 1 && s0.ring_full_errors >= 2,
        "{s0:?}"
    );
    assert!(s1.lane_stalls >= 1, "{s1:?}");
    assert!(s0.slots_written <= 64 + 4 + 1, "{s0:?}");
    // Now read: everything arrives, exact and in order.
    let got = recv_n(&mut m1, &p1, N as usize);
    sender.join().unwrap();
    assert_eq!(got.len(), N as usize);
    for (i, (h, body)) in got.iter().enumerate() {
        assert_eq!(h.seq, i as u64);
        assert_eq!(*body, payload(i as u64, 16_000), "frame {i}");
    }
    assert_eq!(h1.stats().frames_unbound, 0);
}

/// The shared body: block mode on one plain LUN (the real-LIO suite runs it
/// on a LIO ramdisk).
#[test]
fn stream_on_one_plain_lun() {
    e2e::block_stream(&inproc(2, 1), 2 << 20, 256 << 10);
}

/// A third initiator scribbles random bytes over lane (0 → 1) on both
/// members — its index blocks and its slots, at random places — while
/// host 0 streams to host 1: the stream arrives exact (what the scribbler
/// destroyed is sent again) or fails with an error, and a byte that was
/// not sent is never delivered (`check_stream` panics on one).
#[test]
fn a_third_initiator_scribbling_on_the_lanes_never_delivers_forged_bytes() {
    use rand::{Rng, RngCore};
    use std::sync::atomic::AtomicBool;

    let a = array();
    format_stg(&a, 9);
    let cfg = BlockConfig {
        bad_slot_patience: Duration::from_millis(50),
        ..BlockConfig::default()
    };
    let h0 = open_host(&a, 0, cfg);
    let h1 = open_host(&a, 1, cfg);
    let (kc, ks) = keys(9);
    // A connection the scribbler starves gives up within seconds.
    let config = Config {
        max_payload: h0.max_payload(),
        idle_timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(1),
        ..Config::default()
    };
    const N: u64 = 4 << 20;
    let wkp = host_port(1, 1005).unwrap();
    let mut listener = StpListener::bind(source(&h1), Some(wkp), ks, config.clone()).unwrap();
    let server = thread::spawn(move || {
        let mut s = listener.accept(T).unwrap();
        e2e::check_stream(&mut s, 43, N, None)
    });

    let stop = Arc::new(AtomicBool::new(false));
    let scribbles = Arc::new(AtomicU64::new(0));
    let scribbler = {
        let (a, stop, scribbles) = (a.clone(), stop.clone(), scribbles.clone());
        thread::spawn(move || {
            let l = layout();
            let lane = l.lane_offset(0, 1).unwrap();
            let slot_blocks = u64::from(l.slot_blocks);
            let mut rng = StdRng::seed_from_u64(99);
            while !stop.load(Ordering::Relaxed) {
                let lun = LUNS[rng.gen_range(0..LUNS.len())];
                // The producer block, the consumer block, or eight slots
                // of the ring at a time.
                let (lba, blocks) = match rng.gen_range(0..3) {
                    0 => (lane, 1),
                    1 => (lane + 1, 1),
                    _ => {
                        let first = rng.gen_range(0..u64::from(l.slots) - 8);
                        (lane + 2 + first * slot_blocks, 8 * slot_blocks)
                    }
                };
                let mut garbage = vec![0u8; blocks as usize * 512];
                rng.fill_bytes(&mut garbage);
                raw_write(&a, lun, lba, &garbage);
                scribbles.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(3));
            }
        })
    };
    let mut c = StpStream::connect(source(&h0), wkp, kc, config, T).unwrap();
    let sent = e2e::send_range(&mut c, 43, 0, N);
    let received = server.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    scribbler.join().unwrap();
    let (s0, s1) = (h0.stats(), h1.stats());
    eprintln!(
        "{} scribbles; sent {sent:?}; received {received:?}; host 0 {s0:?}; host 1 {s1:?}",
        scribbles.load(Ordering::Relaxed)
    );
    assert!(scribbles.load(Ordering::Relaxed) > 10);
    assert!(
        s1.bad_producer_blocks + s1.bad_slots > 0,
        "the scribbles never reached the consumer: {s1:?}"
    );
    // Either way the outcome is clean; most runs recover completely.
    match received {
        Ok(n) => assert_eq!(n, N),
        Err((at, why)) => assert!(at < N && !why.is_empty()),
    }
}

/// Slots larger than what a consumer reads first of a lone slot (64 KiB):
/// small messages arrive from the head alone, large ones from the whole
/// slot read after it, in order, both ways round a wrapping ring.
#[test]
fn large_slots_read_by_their_head_first() {
    let a = array();
    let big = BlockLayout {
        hosts: 2,
        slots: 4,
        slot_blocks: 512,
    };
    let (h0, h1) = two_hosts_as(&a, &big, 12);
    let mut m0 = h0.handle();
    let mut m1 = h1.handle();
    let p1 = m1.bind(None).unwrap();
    let p0 = m0.bind(None).unwrap();
    let max = h0.max_payload() as usize;
    assert!(max > 200_000, "256 KiB slots: {max}");
    let sizes = [10usize, 70_000, 64, max, 65_400, 3];
    let mut expect = Vec::new();
    for (n, &len) in sizes.iter().cycle().take(30).enumerate() {
        let body = payload(n as u64, len);
        m0.send_packed(&p0, &frame(p0.port, p1.port, n as u64, &body, None))
            .unwrap();
        expect.push(body);
        // One message at a time: each arrives as a lone slot.
        let got = recv_n(&mut m1, &p1, 1);
        assert_eq!(got.len(), 1, "message {n} of {len} bytes");
        assert_eq!(got[0].1, expect[n], "message {n} of {len} bytes");
    }
    // (The poller counts a slot read just after queueing its frames.)
    let deadline = Instant::now() + T;
    while h1.stats().slots_read < 30 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let s1 = h1.stats();
    assert_eq!(s1.bad_slots, 0, "{s1:?}");
    assert_eq!(s1.slots_read, 30, "{s1:?}");
}

/// A consumer block written over once by another initiator at the worst
/// moment: the producer last read it when the ring was full, the consumer
/// has since taken every slot (and has nothing more to take), and the
/// block now holds garbage. The producer, finding the ring full, re-reads
/// it, cannot trust it and keeps seeing a full ring; the consumer used to
/// write its block only after consuming, so the lane stayed wedged for
/// ever (found by the hostile-neighbour campaign, stp_tests::hostile). The
/// consumer now writes its blocks again every few seconds: the lane moves.
#[test]
fn a_consumer_block_written_over_once_does_not_wedge_the_lane() {
    let a = array();
    format_stg(&a, 33);
    let cfg = BlockConfig {
        queue_frames: 16,
        ring_full_wait: Duration::from_millis(100),
        ..BlockConfig::default()
    };
    let h0 = open_host(&a, 0, cfg);
    let h1 = open_host(&a, 1, cfg);
    let mut m0 = h0.handle();
    let mut m1 = h1.handle();
    let p1 = m1.bind(None).unwrap();
    let p0 = m0.bind(None).unwrap();
    // Fill the port queue and then the ring, until the producer gives up.
    let mut sent = 0u64;
    loop {
        match m0.send_packed(&p0, &frame(p0.port, p1.port, sent, b"fill", None)) {
            Ok(()) => sent += 1,
            Err(MailboxError::Refused(Refusal::QueueFull { .. })) => break,
            Err(e) => panic!("send {sent}: {e}"),
        }
        assert!(sent < 10_000, "the ring never filled");
    }
    // The consumer takes everything and writes its blocks.
    assert_eq!(recv_n(&mut m1, &p1, sent as usize).len(), sent as usize);
    thread::sleep(Duration::from_millis(300));
    // The intruder writes over both members' consumer blocks of lane (0 → 1).
    let lba = layout().lane_offset(0, 1).unwrap() + 1;
    for lun in LUNS {
        raw_write(&a, lun, lba, &[0x5a; 512]);
    }
    let t0 = Instant::now();
    let sent_again = loop {
        match m0.send_packed(&p0, &frame(p0.port, p1.port, sent, b"after", None)) {
            Ok(()) => break true,
            Err(MailboxError::Refused(Refusal::QueueFull { .. })) => {
                if t0.elapsed() >= T {
                    break false;
                }
            }
            Err(e) => panic!("after the garbage: {e}"),
        }
    };
    let s0 = h0.stats();
    assert!(
        sent_again,
        "the lane stayed wedged for {:?} after its consumer blocks were written over: {s0:?}",
        t0.elapsed()
    );
    assert!(
        s0.bad_consumer_blocks > 0,
        "the producer never read the garbage: {s0:?}"
    );
    let got = recv_n(&mut m1, &p1, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, b"after");
    eprintln!("the lane moved again after {:?}", t0.elapsed());
}
