//! `stp preflight`: checks an STG and this host before the first backup
//! (see [`stp_core::preflight`]); one line per check, `--json` for scripts.
//! Exits 1 when any check failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use stp_core::preflight::{self, HostFacts, Status};
use stp_core::stg::{self, Config, PathEngine};

/// Options of `stp preflight`.
#[derive(Args, Debug)]
pub struct PreflightArgs {
    /// The STP configuration file (the same on every host).
    #[arg(long)]
    config: PathBuf,
    /// The STG id.
    #[arg(long)]
    stg: u32,
    /// Find the members in this device map (JSON from
    /// sim-target/scripts/stg-up) instead of probing /dev/sg*.
    #[arg(long)]
    map: Option<PathBuf>,
    /// The host of the device map whose paths to use.
    #[arg(long, default_value_t = 0)]
    map_host: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// The engine that would drive `path`, and why: today the sg v3 io_uring
/// engine or synchronous SG_IO ([`scsi::open_best`]). The one place to ask
/// another engine's probe (bsg io_uring) once there is one.
pub fn engine_probe(path: &Path) -> Option<(String, String)> {
    scsi::open_best(path, 16)
        .ok()
        .map(|b| (format!("{:?}", b.engine), b.reason))
}

/// The smallest `queue/max_hw_sectors_kb` (in bytes) of the block devices
/// behind `paths`, from sysfs.
pub(crate) fn queue_limit(paths: &[&str]) -> Option<u64> {
    let devices = scsi::discovery::list_generic_devices().ok()?;
    devices
        .iter()
        .filter(|d| paths.iter().any(|p| Path::new(p) == d.dev_path))
        .filter_map(|d| d.block_device.as_ref())
        .filter_map(|b| {
            std::fs::read_to_string(format!("/sys/block/{b}/queue/max_hw_sectors_kb")).ok()
        })
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .min()
}

/// Runs `stp preflight`.
pub fn run(a: &PreflightArgs) -> Result<ExitCode> {
    let config = Config::load(&a.config)
        .with_context(|| format!("reading the STP configuration {}", a.config.display()))?;
    let dir = match &a.map {
        Some(m) => crate::backup::config::directory_from_map(m, a.map_host)?,
        None => crate::backup::config::probe_directory()?,
    };
    let (resolved, mut sets) = stg::open_member_path_sets(&config, a.stg, &dir, PathEngine::Sync)
        .with_context(|| {
            format!(
                "members: STG {} is not reachable from this host (`stp probe` lists the identities it sees)",
                a.stg
            )
        })?;
    let paths = resolved.paths();
    // The engine first: opening it may switch sg's direct I/O on.
    let engine = paths.first().and_then(|p| engine_probe(Path::new(p)));
    let facts = HostFacts {
        allow_dio: std::fs::read_to_string("/sys/module/sg/parameters/allow_dio")
            .ok()
            .map(|s| s.trim().to_string()),
        engine,
        queue_max_bytes: queue_limit(&paths),
    };
    let findings = preflight::check(&resolved, &mut sets, &facts, config.tunables.max_payload);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            println!("{}", f.line());
        }
    }
    Ok(if findings.iter().any(|f| f.status == Status::Fail) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
