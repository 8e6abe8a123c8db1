//! The backup application's round trip on the in-process array (the same
//! body runs on real LIO in `lio.rs`).

use stp_tests::backup::fs_and_db_round_trip;
use stp_tests::rig::inproc;

#[test]
fn backup_round_trip_in_process() {
    fs_and_db_round_trip(&inproc(3, 41), 2 << 20);
}
