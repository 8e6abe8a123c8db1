//! `stp probe`: which logical units can this host reach, who are they,
//! and over which paths? Nodes with the same identity are paths to one
//! logical unit; each row shows its path's target port, port group and
//! ALUA state (REPORT TARGET PORT GROUPS) and how many paths the unit has.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use scsi::discovery::list_generic_devices;
use scsi::inquiry::identify;
use scsi::Transport;
use serde::Serialize;
use sim_target::{Array, Host, LunConfig};

/// Options of `stp probe`.
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Probe the embedded simulated array instead of this host's devices
    /// (no root, no SCSI subsystem needed).
    #[arg(long)]
    sim: bool,
    /// LUNs in the simulated array (with --sim).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    sim_luns: u64,
    /// Target ports each simulated LUN is reached through (with --sim):
    /// that many paths per LUN.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    sim_paths: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Devices to probe (e.g. /dev/sg1 /dev/sdb); default: every /dev/sgN.
    devices: Vec<PathBuf>,
}

/// One probed logical unit.
#[derive(Serialize, Debug)]
struct Row {
    path: String,
    hctl: Option<String>,
    vendor: Option<String>,
    product: Option<String>,
    revision: Option<String>,
    serial: Option<String>,
    id: Option<String>,
    blocks: Option<u64>,
    block_size: Option<u32>,
    /// The relative target port this path enters through.
    target_port: Option<u16>,
    /// Its target port group.
    port_group: Option<u16>,
    /// The group's asymmetric access state (ALUA), if the unit reports one.
    alua_state: Option<String>,
    /// Paths this host has to the same logical unit (this one included).
    paths: usize,
    error: Option<String>,
    /// The SCSI engine this host would use on the path (`bsg`, `sg`,
    /// `sync`) and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_reason: Option<String>,
}

impl Row {
    fn empty(path: String) -> Row {
        Row {
            path,
            hctl: None,
            vendor: None,
            product: None,
            revision: None,
            serial: None,
            id: None,
            blocks: None,
            block_size: None,
            target_port: None,
            port_group: None,
            alua_state: None,
            paths: 1,
            error: None,
            engine: None,
            engine_reason: None,
        }
    }
}

fn probe_one(t: &mut dyn Transport, row: &mut Row) {
    match identify(t) {
        Ok(id) => {
            row.vendor = Some(id.inquiry.vendor.clone());
            row.product = Some(id.inquiry.product.clone());
            row.revision = Some(id.inquiry.revision.clone());
            row.id = id.preferred_id();
            row.serial = id.serial;
            let port = scsi::alua::PortIdentity::from_designators(&id.designators);
            row.target_port = port.relative_port;
            row.port_group = port.group;
        }
        Err(e) => {
            row.error = Some(e.to_string());
            return;
        }
    }
    let cdb = scsi::Cdb::ReadCapacity16 { alloc_len: 32 }.emit();
    match t.execute(scsi::Command::data_in(cdb, 32)).into_result() {
        Ok((d, _)) if d.len() >= 12 => {
            let last = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
            row.blocks = Some(last + 1);
            row.block_size = Some(u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()));
        }
        Ok(_) => row.error = Some("READ CAPACITY(16) returned too little data".into()),
        Err(e) => row.error = Some(format!("READ CAPACITY(16): {e}")),
    }
    // Devices without ALUA refuse REPORT TARGET PORT GROUPS: no state.
    if let Ok(groups) = scsi::alua::report_target_port_groups(t) {
        let group = row
            .target_port
            .and_then(|p| groups.group_of_port(p))
            .or_else(|| row.port_group.and_then(|g| groups.group(g)));
        if let Some(g) = group {
            row.port_group = Some(g.id);
            row.alua_state = Some(g.state.to_string());
        }
    }
}

/// Sets each row's path count: rows with the same identity are paths to
/// one logical unit.
fn count_paths(rows: &mut [Row]) {
    let groups = scsi::discovery::group_by_identity(rows.iter().map(|r| (r.id.clone(), ())));
    for r in rows.iter_mut() {
        r.paths = groups
            .iter()
            .find(|(id, _)| id.is_some() && *id == r.id)
            .map_or(1, |(_, v)| v.len());
    }
}

/// Runs `stp probe`.
pub fn run(args: &ProbeArgs) -> Result<ExitCode> {
    let mut rows = Vec::new();
    if args.sim {
        let array = Array::new();
        for id in 0..args.sim_luns {
            array
                .add_lun(id, LunConfig::new(id, 1 << 21, 512))
                .context("building the simulated array")?;
        }
        let hosts: Vec<Host> = (1..=args.sim_paths)
            .map(|port| Host::login_through(&array, &format!("probe-p{port}"), port))
            .collect();
        for id in array.lun_ids() {
            for host in &hosts {
                let mut t = host.open(id)?;
                let mut row = Row::empty(t.describe());
                probe_one(&mut t, &mut row);
                rows.push(row);
            }
        }
    } else {
        let mut targets: Vec<(PathBuf, Option<String>)> =
            args.devices.iter().map(|p| (p.clone(), None)).collect();
        if targets.is_empty() {
            let found = list_generic_devices().context(
                "no SCSI devices to probe; try `stp probe --sim` for the embedded simulated array",
            );
            let found = match found {
                Ok(f) => f,
                // A script asked for JSON: no devices is an empty list.
                Err(e) if args.json => {
                    eprintln!("stp probe: {e:#}");
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            if found.is_empty() {
                if args.json {
                    println!("[]");
                    return Ok(ExitCode::SUCCESS);
                }
                bail!("no /dev/sg devices found; try `stp probe --sim` for the embedded simulated array");
            }
            targets = found.into_iter().map(|d| (d.dev_path, d.hctl)).collect();
        }
        for (path, hctl) in targets {
            let mut row = Row::empty(path.display().to_string());
            row.hctl = hctl;
            // The engine selection as STP runs it (probe included).
            match scsi::open_best(&path, 4) {
                Ok(mut best) => {
                    row.engine = Some(best.engine.name().into());
                    row.engine_reason = Some(best.reason.clone());
                    probe_one(&mut *best.transport, &mut row);
                }
                Err(e) => row.error = Some(e.to_string()),
            }
            rows.push(row);
        }
    }
    count_paths(&mut rows);
    let failed = rows.iter().filter(|r| r.error.is_some()).count();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
        for r in rows.iter().filter(|r| r.engine.is_some()) {
            let s = |o: &Option<String>| o.clone().unwrap_or_default();
            println!(
                "engine {}: {} ({})",
                r.path,
                s(&r.engine),
                s(&r.engine_reason)
            );
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn print_table(rows: &[Row]) {
    let w = rows.iter().map(|r| r.path.len()).max().unwrap_or(0).max(4);
    println!(
        "{:<w$} {:<8} {:<17} {:<18} {:>12} {:>6}  {:<5} {:<28} ID",
        "PATH", "VENDOR", "PRODUCT", "SERIAL", "BLOCKS", "BS", "PATHS", "PORT/GROUP STATE"
    );
    for r in rows {
        if let Some(e) = &r.error {
            println!("{:<w$} error: {e}", r.path);
            continue;
        }
        let s = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        let n = |o: Option<u16>| o.map_or("-".into(), |v| v.to_string());
        let port = format!(
            "{}/{} {}",
            n(r.target_port),
            n(r.port_group),
            r.alua_state.as_deref().unwrap_or("-")
        );
        println!(
            "{:<w$} {:<8} {:<17} {:<18} {:>12} {:>6}  {:<5} {:<28} {}",
            r.path,
            s(&r.vendor),
            s(&r.product),
            s(&r.serial),
            r.blocks.map_or("-".into(), |b| b.to_string()),
            r.block_size.map_or("-".into(), |b| b.to_string()),
            r.paths,
            port,
            s(&r.id),
        );
    }
}
