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

/// The array restarts in the middle of a vendor-mode backup: power on, and
/// the mailbox forgets every binding and queued frame (what a killed and
/// restarted daemon does). The backup rides it through (the same body runs
/// on LIO with a real `kill -9`: `lio.rs`).
#[test]
fn a_backup_survives_an_array_restart_in_process() {
    use std::sync::Arc;
    use stp_tests::rig::{InProcRig, Rig};
    let rig = InProcRig::new(2, 43);
    let (array, mailbox) = (rig.array().clone(), rig.mailbox().clone());
    let rig: Arc<dyn Rig> = Arc::new(rig);
    stp_tests::backup::fs_backup_survives_an_array_restart(
        &rig,
        Box::new(move || {
            array.power_on();
            mailbox.reset();
        }),
        8 << 20,
    );
}
