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
    #[command(flatten)]
    log: stp_tools::logging::LogArgs,
    /// The SCSI engine for device paths: auto (bsg io_uring passthrough,
    /// else the io_uring sg v3 engine, else synchronous SG_IO), or force
    /// bsg, sg or sync (fails with the reason when it cannot run).
    /// Overrides the STP_ENGINE environment variable.
    #[arg(long, global = true, value_name = "ENGINE", value_parser = parse_engine)]
    engine: Option<scsi::EngineChoice>,
}

fn parse_engine(s: &str) -> Result<scsi::EngineChoice, String> {
    s.parse()
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
    /// Check an STG and this host before use: paths and their ALUA states,
    /// identities, the engine, sg direct I/O, transfer limits, write cache
    /// and FUA, reservations, and with --peer/--serve-peer that both hosts
    /// see the same members. One line per check; exits 1 on a failure.
    Preflight(stp_tools::preflight::PreflightArgs),
    /// Print a shell completion script (e.g. `stp completions bash >
    /// /etc/bash_completion.d/stp`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or write one page per command into a
    /// directory (`stp man --dir /usr/local/share/man/man1`).
    Man {
        /// Write stp.1, stp-backup.1, stp-backup-server-fs.1, … here.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// Writes the manual pages of `cmd` and its subcommands into `dir`, named
/// after their command paths (`stp-backup-list.1`).
fn write_man_pages(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<u32> {
    use anyhow::Context;
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    let cmd = cmd
        .clone()
        .display_name(name.to_owned())
        .bin_name(name.replace('-', " "));
    clap_mangen::Man::new(cmd.clone())
        .title(name.to_owned())
        .render(&mut out)?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        n += write_man_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}

fn man(dir: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    match dir {
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
        Some(d) => {
            std::fs::create_dir_all(d)?;
            let n = write_man_pages(&cmd, "stp", d)?;
            println!("wrote {n} manual pages into {}", d.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let to_file = match stp_tools::logging::init(&cli.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("stp: error: {e:#}");
            return ExitCode::from(1);
        }
    };
    if let Some(engine) = cli.engine {
        scsi::set_engine_override(Some(engine));
    }
    let result = match cli.command {
        Command::Probe(args) => probe::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Backup(args) => backup::cli::run(&args),
        Command::Demo(args) => backup::demo::run(&args),
        Command::Stg(args) => stp_tools::stg::run(&args),
        Command::Preflight(args) => stp_tools::preflight::run(&args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "stp", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => man(dir.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if to_file {
                tracing::error!("{e:#}");
            }
            eprintln!("stp: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
