//! Thin-provisioning and command-support data as any device may return it
//! (or an initiator send it): the Logical Block Provisioning VPD page
//! (B2h), GET LBA STATUS parameter data, an UNMAP parameter list, and
//! REPORT SUPPORTED OPERATION CODES data in both formats (all commands,
//! one command).
//!
//! Property: what parses emits bytes that parse to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scsi::provisioning::{LbaStatus, LogicalBlockProvisioning, UnmapList};
use scsi::supported::{AllCommands, OneCommand};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = LogicalBlockProvisioning::parse(data) {
        assert_eq!(LogicalBlockProvisioning::parse_body(&p.body()), p);
    }
    if let Ok(s) = LbaStatus::parse(data) {
        let again = LbaStatus::parse(&s.to_bytes()).expect("emitted LBA status parses");
        assert_eq!(again, s);
    }
    if let Ok(u) = UnmapList::parse(data) {
        let again = UnmapList::parse(&u.to_bytes()).expect("an emitted UNMAP list parses");
        assert_eq!(again, u);
    }
    if let Ok(all) = AllCommands::parse(data) {
        let again = AllCommands::parse(&all.to_bytes()).expect("emitted command data parses");
        assert_eq!(again, all);
    }
    if let Ok(one) = OneCommand::parse(data) {
        let again = OneCommand::parse(&one.to_bytes()).expect("emitted one-command data parses");
        assert_eq!(again, one);
    }
});
