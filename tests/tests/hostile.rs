//! A hostile third initiator during a backup, on the in-process array
//! (the model's third host): the campaign of `stp_tests::hostile`, in both
//! modes, encrypted (the default) and, as the control that shows the
//! plaintext search can fail, authenticated only. The real-LIO suite runs
//! the same body on a third tcm_loop nexus (`tests/lio.rs`).

use stp_core::frame::Protection;
use stp_core::stg::MailboxMode;
use stp_tests::hostile::{backup_under_attack, check};
use stp_tests::rig::inproc;

fn campaign(mode: MailboxMode, protection: Protection, seed: u64) {
    let rig = inproc(2, seed);
    let f = backup_under_attack(&rig, mode, protection, 2 << 20);
    check(&rig, mode, protection, &f);
}

#[test]
fn a_third_initiator_during_a_vendor_mode_backup_sees_no_plaintext() {
    campaign(MailboxMode::Vendor, Protection::Encrypt, 71);
}

#[test]
fn a_third_initiator_during_a_block_mode_backup_sees_no_plaintext() {
    campaign(MailboxMode::Block, Protection::Encrypt, 72);
}

/// The control: the same campaign with the payload in the clear. In block
/// mode the intruder finds the markers on the lanes (so the search above
/// could have failed); in vendor mode it finds the frame sent to it in the
/// clear, and nothing of the backup (the array hands frames only to their
/// binding).
#[test]
fn the_controls_with_the_payload_in_the_clear_find_the_markers() {
    campaign(MailboxMode::Block, Protection::Authenticate, 73);
    campaign(MailboxMode::Vendor, Protection::Authenticate, 74);
}
