//! Configuration text: the STP configuration (`stp.toml`: wkp, psk,
//! STGs, block layouts, tunables), the backup configuration, the
//! sim-target device map, and the daemon's size and `--stg` arguments.
//! Every parser gets every input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sim_target::tcmu::config::{parse_size, StgArg};
use stp_core::stg::Config;
use stp_tools::backup::config::{parse_device_map, BackupConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(config) => {
            let _ = config.psk_bytes();
            for stg in &config.stgs {
                let _ = config.stg(stg.id);
                if let Some(layout) = stg.block.as_ref().and_then(|b| b.layout()) {
                    let _ = layout.required_blocks();
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok(backup) = BackupConfig::parse(text, Path::new("/etc/stp/backup.toml")) {
        let _ = backup.rules();
    }
    let _ = parse_device_map(text, 0);
    let _ = parse_size(text);
    let _ = text.parse::<StgArg>();
});
