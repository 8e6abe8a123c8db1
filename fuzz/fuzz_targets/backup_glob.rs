//! Exclude patterns (from the client's configuration, or sent by the
//! server in a backup request) matched against a path: `patterns` and
//! `path` separated by the first NUL, patterns one per line.
//!
//! Property: matching terminates promptly whatever the pattern (the
//! fuzzer's timeout catches exponential backtracking).
#![no_main]

use libfuzzer_sys::fuzz_target;
use stp_tools::backup::archive;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (patterns, path) = text.split_once('\0').unwrap_or((&text, "a/b/c"));
    let patterns: Vec<String> = patterns.lines().map(str::to_owned).collect();
    let _ = archive::excluded(&patterns, path);
    for p in &patterns {
        let _ = archive::glob(p, path);
    }
});
