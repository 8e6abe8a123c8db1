//! An archive as the repository holds it (a tar stream): verified against
//! a manifest, and restored into a scratch directory.
//!
//! Property: a restore writes nothing outside its destination (the
//! destination's parent holds only the destination afterwards).
#![no_main]

use std::collections::{HashMap, HashSet};

use libfuzzer_sys::fuzz_target;
use stp_tools::backup::archive::{self, ExtractOptions, Kind};

fuzz_target!(|data: &[u8]| {
    let hashes: HashMap<String, String> = HashMap::from([(
        "a".to_string(),
        "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb".to_string(),
    )]);
    let _ = archive::verify(data, &hashes);

    let scratch = tempfile::tempdir().expect("a scratch directory");
    let dest = scratch.path().join("dest");
    let sparse = HashSet::from(["s".to_string()]);
    let want = |_: &str, _: Kind| true;
    let _ = archive::extract(
        data,
        &dest,
        &ExtractOptions {
            want: &want,
            hashes: &hashes,
            sparse: &sparse,
            owners: false,
        },
    );
    let outside: Vec<_> = std::fs::read_dir(scratch.path())
        .expect("the scratch directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n != "dest")
        .collect();
    assert!(
        outside.is_empty(),
        "a restore wrote outside its destination: {outside:?}"
    );
});
