//! `stp preflight`'s view exchange: the peer's `preflight_view` message,
//! length and body, as anyone on the LAN may send it.
//!
//! Property: a view read from the bytes encodes to a message that reads
//! back to the same view; a length past the limit is refused before the
//! body is read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stp_core::preflight::peer::{self, PeerError, MAX_VIEW_BYTES};

fuzz_target!(|data: &[u8]| {
    let _ = peer::decode_view(data);
    let mut r = data;
    match peer::read_view(&mut r) {
        Ok(v) => {
            let again = peer::read_view(&mut &peer::encode_view(&v)[..])
                .expect("an encoded view reads back");
            assert_eq!(again, v);
        }
        Err(PeerError::TooLong(n)) => assert!(n > MAX_VIEW_BYTES as u64),
        Err(_) => {}
    }
});
