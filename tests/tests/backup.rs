//! The backup application's round trip on the in-process array (the same
//! bodies run on real LIO in `lio.rs`): in vendor mode through the STG, and
//! in block mode through the plain shared LUN, as on any array.

use stp_core::stg::MailboxMode;
use stp_tests::backup::fs_and_db_round_trip;
use stp_tests::rig::inproc;

#[test]
fn backup_round_trip_in_process() {
    fs_and_db_round_trip(&inproc(3, 41), 2 << 20, MailboxMode::Vendor);
}

#[test]
fn backup_round_trip_in_block_mode_in_process() {
    fs_and_db_round_trip(&inproc(2, 42), 2 << 20, MailboxMode::Block);
}
