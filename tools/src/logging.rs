//! Logging for every `stp` command: `tracing` events on stderr, or
//! appended to a file (`--log-file`, for the daemons), filtered by
//! `--log-level`, `-v` or `RUST_LOG`.
//!
//! Precedence: `--log-level LEVEL` (or a filter such as
//! `stp_tools=debug`), then `-v` (debug) / `-vv` (trace), then `RUST_LOG`,
//! then `warn` on stderr or `info` in a log file. What a command prints
//! as its result (summaries, JSON, tables) goes to stdout and is not
//! logging.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::{ArgAction, Args};
use tracing_subscriber::EnvFilter;

/// The logging options every command takes.
#[derive(Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// More log detail: -v debug, -vv trace.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log level (error, warn, info, debug, trace) or a filter in
    /// RUST_LOG's syntax; wins over -v and RUST_LOG (default warn on
    /// stderr, info in a --log-file).
    #[arg(long, value_name = "LEVEL", global = true)]
    pub log_level: Option<String>,
    /// Append log records to FILE instead of writing them to stderr.
    #[arg(long, value_name = "FILE", global = true)]
    pub log_file: Option<PathBuf>,
}

/// The filter `args` and `rust_log` (the variable's value) ask for;
/// `default` when none says anything.
pub fn filter(args: &LogArgs, rust_log: Option<&str>, default: &str) -> Result<EnvFilter> {
    if let Some(l) = &args.log_level {
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        if !l.contains(['=', ',']) && !LEVELS.contains(&l.to_ascii_lowercase().as_str()) {
            anyhow::bail!(
                "--log-level {l:?} is not a level: use error, warn, info, debug, trace or off \
                 (or a filter such as stp_tools=debug)"
            );
        }
    }
    let spec = match (&args.log_level, args.verbose, rust_log) {
        (Some(l), _, _) => l.clone(),
        (None, 1, _) => "debug".into(),
        (None, 2.., _) => "trace".into(),
        (None, 0, Some(r)) if !r.trim().is_empty() => r.to_owned(),
        _ => default.into(),
    };
    EnvFilter::try_new(&spec).with_context(|| {
        format!(
            "the log filter {spec:?} is not valid: use error, warn, info, debug or trace \
             (or RUST_LOG's syntax, e.g. stp_tools=debug)"
        )
    })
}

/// Installs the subscriber. Returns true when records go to a file.
pub fn init(args: &LogArgs) -> Result<bool> {
    // On a terminal the commands' own output says what happened: warnings
    // and errors only. A log file (a daemon's) also gets what it did.
    let default = if args.log_file.is_some() {
        "info"
    } else {
        "warn"
    };
    let filter = filter(args, std::env::var("RUST_LOG").ok().as_deref(), default)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &args.log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            builder
                .with_ansi(false)
                .with_writer(Mutex::new(file))
                .try_init()
                .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
            Ok(true)
        }
        None => {
            builder
                .with_writer(std::io::stderr)
                .try_init()
                .map_err(|e| anyhow::anyhow!("installing the logger: {e}"))?;
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &LogArgs, env: Option<&str>) -> String {
        filter(args, env, "warn").unwrap().to_string()
    }

    #[test]
    fn precedence_of_the_filters() {
        let none = LogArgs::default();
        assert_eq!(spec(&none, None), "warn");
        assert_eq!(spec(&none, Some("warn")), "warn");
        let v = LogArgs {
            verbose: 1,
            ..LogArgs::default()
        };
        assert_eq!(spec(&v, Some("warn")), "debug");
        let vv = LogArgs {
            verbose: 3,
            ..LogArgs::default()
        };
        assert_eq!(spec(&vv, None), "trace");
        let l = LogArgs {
            verbose: 2,
            log_level: Some("error".into()),
            ..LogArgs::default()
        };
        assert_eq!(spec(&l, Some("debug")), "error");
        let bad = LogArgs {
            log_level: Some("loud!!".into()),
            ..LogArgs::default()
        };
        assert!(filter(&bad, None, "warn").is_err());
    }
}
