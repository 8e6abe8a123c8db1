//! `stp`: the STP command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod probe;

use stp_tools::{backup, bench};

/// STP moves bulk data between two hosts through the storage array they
/// share, over SCSI, while the LAN carries only control.
#[derive(Parser, Debug)]
#[command(name = "stp", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List SCSI logical units and their identities (INQUIRY, VPD 0x80/0x83,
    /// capacity), from /dev/sg* or from the embedded simulated array.
    Probe(probe::ProbeArgs),
    /// Measure throughput, latency percentiles and CPU cost: raw SCSI I/O,
    /// STP streams through the array, TCP on loopback, or several compared.
    Bench(bench::BenchArgs),
    /// Backup and restore over two channels: the backup server and client
    /// roles, and the repository (list, restore, verify, forget).
    Backup(backup::cli::BackupArgs),
    /// The main job on the embedded simulated array: back up a directory
    /// tree and a live SQLite database through STP, restore both, compare
    /// them byte for byte, and bench a little.
    Demo(backup::demo::DemoArgs),
    /// Block-mode STGs: format one (behind a guard that refuses LUNs
    /// holding data) and show what its members hold.
    Stg(stp_tools::stg::StgArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => probe::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Backup(args) => backup::cli::run(&args),
        Command::Demo(args) => backup::demo::run(&args),
        Command::Stg(args) => stp_tools::stg::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stp: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
