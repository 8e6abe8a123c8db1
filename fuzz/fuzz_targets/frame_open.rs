//! Seal a frame the fuzzer describes, damage it the way the fuzzer says
//! (bit flips, truncation, the wrong direction, another connection's key),
//! and open it.
//!
//! Property: `open` succeeds exactly when the frame's bytes are the sealed
//! ones, opened by the right connection in the right direction, and then
//! returns the sealed header and the original payload.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use stp_core::frame::{Cipher, Direction, Protection};
use stp_core::wire::{Flags, Header, Kind, HEADER_LEN};

#[derive(Arbitrary, Debug)]
struct Input {
    encrypt: bool,
    from_client: bool,
    kind: u8,
    flags: u16,
    src_port: u32,
    dst_port: u32,
    seq: u64,
    ack: u64,
    credit: u32,
    pn: u64,
    payload: Vec<u8>,
    flips: Vec<(u16, u8)>,
    truncate: Option<u16>,
    reverse: bool,
    other_conn: bool,
}

/// Ciphers by (encrypt, other connection).
fn cipher(encrypt: bool, other: bool) -> &'static Cipher {
    static C: OnceLock<[Cipher; 4]> = OnceLock::new();
    let all = C.get_or_init(|| {
        let key = stp_fuzz_input::frame_key();
        let id = stp_fuzz_input::CONN_ID;
        [
            Cipher::new(&key, id, Protection::Encrypt),
            Cipher::new(&key, id + 1, Protection::Encrypt),
            Cipher::new(&key, id, Protection::Authenticate),
            Cipher::new(&key, id + 1, Protection::Authenticate),
        ]
    });
    &all[usize::from(!encrypt) * 2 + usize::from(other)]
}

fuzz_target!(|input: Input| {
    let dir = if input.from_client {
        Direction::ClientToServer
    } else {
        Direction::ServerToClient
    };
    let header = Header {
        kind: Kind(input.kind),
        flags: Flags(input.flags),
        src_port: input.src_port,
        dst_port: input.dst_port,
        conn_id: stp_fuzz_input::CONN_ID,
        seq: input.seq,
        ack: input.ack,
        credit: input.credit,
        payload_len: input.payload.len() as u32,
        pn: input.pn,
        crc32c: 0,
        tag: [0; 16],
    };
    let sealer = cipher(input.encrypt, false);
    let sealed = sealer
        .seal_to_vec(dir, header, &[&input.payload])
        .expect("any header and payload under 1 MiB seal");
    let end = HEADER_LEN + input.payload.len();
    assert_eq!(sealed.len(), end.next_multiple_of(8));
    if input.encrypt && !input.payload.is_empty() && input.payload.len() >= 16 {
        assert_ne!(
            sealed[HEADER_LEN..end],
            input.payload[..],
            "payload left in the clear"
        );
    }
    let mut bytes = sealed.clone();
    for (at, x) in &input.flips {
        let at = usize::from(*at) % bytes.len();
        bytes[at] ^= x;
    }
    if let Some(t) = input.truncate {
        bytes.truncate(usize::from(t) % (bytes.len() + 1));
    }
    let open_dir = if input.reverse {
        match dir {
            Direction::ClientToServer => Direction::ServerToClient,
            Direction::ServerToClient => Direction::ClientToServer,
        }
    } else {
        dir
    };
    let intact = bytes.len() >= end && bytes[..end] == sealed[..end];
    let should_open = intact && !input.reverse && !input.other_conn;
    let opener = cipher(input.encrypt, input.other_conn);
    let mut work = bytes.clone();
    match opener.open(open_dir, &mut work) {
        Ok(h) => {
            assert!(should_open, "a damaged or foreign frame opened: {input:?}");
            assert_eq!(Header::parse(&sealed), Ok(h));
            assert_eq!(work[HEADER_LEN..end], input.payload[..]);
        }
        Err(e) => assert!(!should_open, "an intact frame failed to open: {e}"),
    }
});
