//! A backup control message's body as a peer (client, server, or anyone
//! on the LAN) may send it.
//!
//! Property: a decoded message encodes to JSON that decodes to the same
//! message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stp_tools::backup::wire::{self, Msg};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = wire::decode::<Msg>(data) else {
        return;
    };
    let _ = msg.name();
    let json = serde_json::to_vec(&msg).expect("a message encodes");
    let again: Msg = wire::decode(&json).expect("an encoded message decodes");
    assert_eq!(again, msg);
});
