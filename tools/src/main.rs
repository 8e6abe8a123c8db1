//! `stp`: the STP command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod probe;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Probe(args) => probe::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stp: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
