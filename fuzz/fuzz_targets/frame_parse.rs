//! Raw bytes as a frame header, a packed buffer of frames (a RECEIVE
//! buffer, a block-mode slot), a handshake offer, and a frame to open
//! under a fixed key in either protection and direction.
//!
//! Properties: a parsed header emits the bytes it came from (all but the
//! reserved field); the walk yields frames in order, inside the buffer;
//! `open` succeeds only on bytes `seal` produced under that key: opening
//! and sealing again gives the same bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use stp_core::frame::{Cipher, Direction, Protection};
use stp_core::wire::{self, Frames, Header, HEADER_LEN};

fn ciphers() -> &'static [Cipher; 2] {
    static C: OnceLock<[Cipher; 2]> = OnceLock::new();
    C.get_or_init(|| {
        let key = stp_fuzz_input::frame_key();
        [
            Cipher::new(&key, stp_fuzz_input::CONN_ID, Protection::Encrypt),
            Cipher::new(&key, stp_fuzz_input::CONN_ID, Protection::Authenticate),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = wire::peek_version(data);
    let _ = wire::peek_kind(data);
    let _ = stp_core::auth::Offer::from_bytes(data);
    if let Ok(h) = Header::parse(data) {
        let b = h.to_bytes();
        assert_eq!(b[..56], data[..56]);
        assert_eq!(b[60..HEADER_LEN], data[60..HEADER_LEN]);
        assert_eq!(Header::parse(&b), Ok(h));
    }
    let mut next = 0;
    for f in Frames::new(data) {
        let Ok(found) = f else { break };
        assert!(found.offset >= next && found.offset % wire::ALIGN == 0);
        assert_eq!(
            found.bytes(data).len(),
            HEADER_LEN + found.header.payload_len as usize
        );
        assert_eq!(found.payload(data).len(), found.header.payload_len as usize);
        next = found.offset + found.header.span();
    }
    for cipher in ciphers() {
        for dir in [Direction::ClientToServer, Direction::ServerToClient] {
            let mut copy = data.to_vec();
            if let Ok(h) = cipher.open(dir, &mut copy) {
                let end = HEADER_LEN + h.payload_len as usize;
                let again = cipher
                    .seal_to_vec(dir, h, &[&copy[HEADER_LEN..end]])
                    .expect("an opened frame seals again");
                assert_eq!(
                    again[..end],
                    data[..end],
                    "opened bytes seal did not produce"
                );
            }
            let _ = cipher.open_to_vec(dir, data);
        }
    }
});
