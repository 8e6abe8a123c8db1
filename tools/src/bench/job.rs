//! `stp bench job FILE.toml`: a repeatable run described in a file. The
//! file's keys are the long options of `stp bench raw` (or `curve`), so a
//! job means exactly what the same command line means and is checked the
//! same way:
//!
//! ```toml
//! mode = "raw"                 # or "curve" (default: raw)
//! devices = ["/dev/sg3"]       # or: sim = true
//! rw = "randrw"
//! rwmix = 70
//! bssplit = "4k/60,64k/30,1m/10"
//! depth = 16
//! ramp = "5s"
//! time = "60s"
//! rounds = 3
//! ```
//!
//! Strings and numbers become the option's value, `true` a flag (`false`
//! leaves it out), an array of values a comma-separated list (`steps =
//! [10, 50, 100]`). Options given after the file on the command line are
//! added to the job's (`stp bench job mix.toml --json`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser};

use super::BenchArgs;

/// Options of `stp bench job`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Example job file (keys are the long options of `stp bench raw` or `curve`):\n  \
mode = \"raw\"\n  devices = [\"/dev/sg3\"]\n  rw = \"randrw\"\n  rwmix = 70\n  \
bssplit = \"4k/60,64k/30,1m/10\"\n  depth = 16\n  ramp = \"5s\"\n  time = \"60s\"\n\n\
Run it: stp bench job mix.toml [--json ...]; docs/BENCH.md has more."
)]
pub struct JobArgs {
    /// The job file (TOML).
    pub file: PathBuf,
    /// More options of the job's mode, added after the file's.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub extra: Vec<String>,
}

#[derive(Parser, Debug)]
#[command(name = "stp bench")]
struct JobCli {
    #[command(flatten)]
    bench: BenchArgs,
}

/// The modes a job file may name.
const MODES: [&str; 2] = ["raw", "curve"];

/// The command line a job file stands for: the mode, then its options.
pub fn command_line(text: &str) -> Result<Vec<String>> {
    let table: toml::Table = text.parse().context(
        "not a TOML job file (keys are the long options of `stp bench raw`, e.g. rw = \"randrw\")",
    )?;
    let mode = match table.get("mode") {
        None => "raw".to_string(),
        Some(toml::Value::String(m)) if MODES.contains(&m.as_str()) => m.clone(),
        Some(other) => bail!("mode = {other} is not one of {}", MODES.join(", ")),
    };
    let mut args = vec![mode];
    let mut devices = Vec::new();
    for (key, value) in &table {
        if key == "mode" {
            continue;
        }
        if key == "devices" {
            match value {
                toml::Value::Array(a) => {
                    for d in a {
                        match d {
                            toml::Value::String(s) => devices.push(s.clone()),
                            other => bail!(
                                "devices: {other} is not a path; write devices = [\"/dev/sg3\"]"
                            ),
                        }
                    }
                }
                toml::Value::String(s) => devices.push(s.clone()),
                other => bail!("devices = {other}: write devices = [\"/dev/sg3\", ...]"),
            }
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!("{key} = {other}: give a string or a number"),
            })
        };
        match value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(a) => {
                let items: Result<Vec<String>> = a.iter().map(scalar).collect();
                args.push(flag);
                args.push(items?.join(","));
            }
            toml::Value::Table(_) => {
                bail!("{key} is a table; a job file holds `option = value` lines only")
            }
            v => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    if !devices.is_empty() {
        // Positional arguments after the options, behind `--` so a path
        // can never be read as an option.
        args.push("--".into());
        args.extend(devices);
    }
    Ok(args)
}

/// Reads a job file and parses it as the command line it stands for.
fn parse(args: &JobArgs) -> Result<BenchArgs> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read the job file {}", args.file.display()))?;
    let mut line = command_line(&text).with_context(|| format!("{}", args.file.display()))?;
    // Extra options go before the `--` that ends the options.
    let at = line.iter().position(|a| a == "--").unwrap_or(line.len());
    line.splice(at..at, args.extra.iter().cloned());
    let mut argv = vec!["stp bench".to_string()];
    argv.extend(line);
    JobCli::try_parse_from(&argv).map(|c| c.bench).map_err(|e| {
        // clap's message without its usage and help lines, which speak of
        // a command line rather than the file.
        let text = e.render().to_string();
        let why: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
            .map(|l| l.trim().trim_start_matches("error: "))
            .filter(|l| !l.is_empty())
            .collect();
        anyhow::anyhow!(
            "{}: {} (keys are the long options of `stp bench {}`; see its --help)",
            args.file.display(),
            why.join("; "),
            argv.get(1).map_or("raw", String::as_str)
        )
    })
}

/// Runs `stp bench job`.
pub fn run(args: &JobArgs) -> Result<std::process::ExitCode> {
    let bench = parse(args)?;
    super::run(&bench)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_file_is_its_command_line() {
        let line = command_line(
            r#"
mode = "raw"
devices = ["/dev/sg3", "/dev/sg4"]
rw = "randrw"
rwmix = 70
bssplit = "4k/60,64k/30,1m/10"
depth = 16
ramp = "5s"
time = "60s"
verify = true
json = false
log_interval = "1s"
"#,
        )
        .unwrap();
        let has = |pair: &[&str]| line.windows(pair.len()).any(|w| w == pair);
        assert_eq!(line[0], "raw");
        assert!(has(&["--rw", "randrw"]) && has(&["--rwmix", "70"]));
        assert!(has(&["--bssplit", "4k/60,64k/30,1m/10"]));
        assert!(has(&["--log-interval", "1s"]));
        assert!(line.contains(&"--verify".to_string()));
        assert!(!line.contains(&"--json".to_string()));
        assert!(line.ends_with(&["--".into(), "/dev/sg3".into(), "/dev/sg4".into()]));
        let curve = command_line("mode = \"curve\"\nsim = true\nsteps = [10, 50, 100]").unwrap();
        assert_eq!(curve, ["curve", "--sim", "--steps", "10,50,100"]);
    }

    #[test]
    fn jobs_parse_as_the_command_line_would_and_bad_ones_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            JobArgs {
                file: p,
                extra: Vec::new(),
            }
        };
        let good = write(
            "mix.toml",
            "sim = true\nrw = \"randrw\"\nrwmix = 70\nbssplit = \"4k/60:64k/30:1m/10\"\ntime = \"2s\"\n",
        );
        let b = parse(&JobArgs {
            extra: vec!["--json".into()],
            ..good
        })
        .unwrap();
        assert!(format!("{b:?}").contains("Randrw"), "{b:?}");
        for (name, text, want) in [
            ("typo.toml", "sim = true\nrwmixx = 70\n", "rwmixx"),
            ("range.toml", "sim = true\nrwmix = 170\n", "0 to 100"),
            ("mode.toml", "mode = \"fio\"\n", "raw, curve"),
            ("table.toml", "sim = true\n[x]\na = 1\n", "option = value"),
            ("broken.toml", "rw = \n", "TOML"),
            (
                "date.toml",
                "sim = true\ntime = 1979-05-27\n",
                "string or a number",
            ),
        ] {
            let e = format!("{:#}", parse(&write(name, text)).unwrap_err());
            assert!(e.contains(want), "{name}: {e}");
        }
        let e = parse(&JobArgs {
            file: dir.path().join("missing.toml"),
            extra: Vec::new(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
    }
}
