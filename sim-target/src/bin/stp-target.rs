//! `stp-target`: the simulated array served to LIO through TCMU.
//!
//! Serves every TCMU user backstore whose `dev_config` is
//! `stp/lun=<id>,initiator=<name>` from one in-memory array with an STG
//! mailbox, until SIGINT or SIGTERM. See `sim_target::tcmu` for the
//! protocol, the state files and the set-up order.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use sim_target::tcmu::{self, Options, Shutdown, StgArg};

/// The STP simulated array, served to LIO's user backstores (TCMU).
///
/// Serves every TCMU device whose dev_config is
/// `stp/lun=<array LUN>,initiator=<name>` (one backstore per LUN and host
/// path). Writes `<state-dir>/pid` once up and
/// `<state-dir>/serving/<backstore>` for each device it serves; stops cleanly
/// on SIGINT or SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "stp-target", version)]
struct Cli {
    /// An STG of COUNT member LUNs with id ID; repeat for more. LUNs are
    /// numbered 0, 1, 2, … over the STGs in order [default: 1:4]
    #[arg(long = "stg", value_name = "ID:COUNT")]
    stgs: Vec<StgArg>,

    /// Size of each LUN (binary K, M, G, T suffixes)
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = tcmu::parse_size)]
    lun_size: u64,

    /// Logical block size in bytes
    #[arg(long, value_name = "N", default_value_t = 512)]
    block_size: u32,

    /// Where the pid file and serving/ state files go
    #[arg(long, value_name = "DIR", default_value = "/run/stp-target")]
    state_dir: PathBuf,

    /// The configfs mount (ring resets after a restart)
    #[arg(long, value_name = "DIR", default_value = "/sys/kernel/config")]
    configfs: PathBuf,

    /// The sysfs mount (uio device discovery)
    #[arg(long, value_name = "DIR", default_value = "/sys")]
    sysfs: PathBuf,

    /// Where the uio device nodes are
    #[arg(long, value_name = "DIR", default_value = "/dev")]
    dev: PathBuf,

    /// Do not log the per-device info lines (errors are still logged)
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; a bad option is a setup
            // error like any other.
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let opts = Options {
        stgs: cli.stgs,
        lun_size: cli.lun_size,
        block_size: cli.block_size,
        state_dir: cli.state_dir,
        configfs: cli.configfs,
        sysfs: cli.sysfs,
        dev: cli.dev,
        quiet: cli.quiet,
    };
    let shutdown = Arc::new(Shutdown::new());
    let on_signal = shutdown.clone();
    if let Err(e) = ctrlc::set_handler(move || on_signal.trigger()) {
        eprintln!("stp-target: cannot install the SIGINT/SIGTERM handler: {e}");
        return ExitCode::FAILURE;
    }
    match tcmu::run(&opts, &shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stp-target: {e}");
            ExitCode::FAILURE
        }
    }
}
