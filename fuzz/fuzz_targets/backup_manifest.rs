//! A manifest as the repository stores it (and as a client sends it in
//! BACKUP_DONE): parsed, and every path checked as a restore checks it.
//!
//! Property: a path `safe_relative` accepts is relative and never climbs.
#![no_main]

use std::path::Component;

use libfuzzer_sys::fuzz_target;
use stp_tools::backup::archive;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = archive::read_manifest(data) else {
        return;
    };
    for e in &manifest {
        for p in std::iter::once(&e.path).chain(e.link.as_ref()) {
            if let Ok(rel) = archive::safe_relative(p) {
                assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
                assert!(rel.components().next().is_some());
            }
        }
    }
    let json = serde_json::to_vec(&manifest).expect("a manifest encodes");
    assert_eq!(
        archive::read_manifest(&json[..]).expect("it parses"),
        manifest
    );
});
