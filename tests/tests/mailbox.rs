//! Frames, authentication and the vendor-mode mailbox, end to end: two hosts
//! on the in-process array, frames sent on one member LUN and received on
//! another, and a third initiator that tries to inject frames.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use scsi::Transport;
use sim_target::{Array, Host, LunConfig, StgMailbox, StgSpec};
use stp_core::auth::{Handshake, Role};
use stp_core::mailbox::VendorMailbox;
use stp_core::vendor::{MailboxError, Refusal};
use stp_core::wire::Frames;
use stp_tests::e2e::{self, data_header, open, seal};
use stp_tests::rig::inproc;

fn array_with_stg(members: u64) -> Array {
    let a = Array::new();
    for id in 0..members {
        a.add_lun(id, LunConfig::new(id, 1 << 16, 512)).unwrap();
    }
    let mb = StgMailbox::with_seed(&a, vec![StgSpec::new(7, (0..members).collect())], 1).unwrap();
    mb.install(&a);
    a
}

fn mailbox(a: &Array, host: &str) -> VendorMailbox {
    let h = Host::login(a, host);
    let paths: Vec<Box<dyn Transport>> = a
        .lun_ids()
        .into_iter()
        .map(|l| Box::new(h.open(l).unwrap()) as Box<dyn Transport>)
        .collect();
    VendorMailbox::new(paths).unwrap()
}

fn keys() -> (stp_core::auth::FrameKey, stp_core::auth::FrameKey) {
    let mut rng = StdRng::seed_from_u64(9);
    let client = Handshake::new(&mut rng);
    let server = Handshake::new(&mut rng);
    let (co, so) = (client.public(), server.public());
    let kc = client.finish(&so, Role::Client, Some(b"lab psk")).unwrap();
    let ks = server.finish(&co, Role::Server, Some(b"lab psk")).unwrap();
    (kc, ks)
}

#[test]
fn sealed_frames_cross_the_array_between_two_hosts() {
    let a = array_with_stg(2);
    let (kc, ks) = keys();
    let mut client = mailbox(&a, "client");
    let mut server = mailbox(&a, "server");

    let info = server.stg_info().unwrap();
    assert_eq!((info.stg_id, info.members.len()), (7, 2));

    let sb = server.bind(Some(5101)).unwrap();
    let cb = client.bind(None).unwrap();
    assert!(cb.port >= 32768);

    // Three frames, payloads given as several slices each (scatter-gather).
    let bodies: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 1000 + i as usize * 333]).collect();
    let parts: Vec<[&[u8]; 2]> = bodies.iter().map(|b| [&b[..10], &b[10..]]).collect();
    let frames: Vec<u8> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| seal(data_header(cb.port, sb.port, i as u64 + 1), p, &kc))
        .collect();
    client.send_packed(&cb, &frames).unwrap();

    let got = server
        .receive(&sb, 64 * 1024, Duration::from_secs(2))
        .unwrap();
    let mut seen = Vec::new();
    for f in Frames::new(&got) {
        let f = f.unwrap();
        let (h, payload) = open(f.bytes(&got), &ks).unwrap();
        assert_eq!(payload, &bodies[h.seq as usize - 1][..]);
        seen.push(h.seq);
    }
    assert_eq!(seen, vec![1, 2, 3]);
    server.release(&sb).unwrap();
    assert!(matches!(
        client.send_packed(&cb, &frames),
        Err(MailboxError::Refused(Refusal::PortNotBound(5101)))
    ));
}

#[test]
fn a_third_initiator_cannot_inject_or_replay() {
    e2e::spoofed_frames_rejected(&inproc(2, 1), 2);
}

#[test]
fn receive_long_polls_until_a_send_on_another_lun() {
    e2e::long_poll_receive(&inproc(2, 1));
}
