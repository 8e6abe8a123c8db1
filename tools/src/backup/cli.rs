//! The `stp backup` command line (docs/BACKUP.md §8).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::config::BackupConfig;
use super::daemon::{self, ArrayStatus, LoopIo, Role, Started};
use super::remote::{restore_from_server, RestoreJob};
use super::repo::{BackupInfo, Repo};
use super::session::{self, escape_control, FsJob, RunOptions};
use super::traffic::ChannelUse;
use super::wire::{DbSource, Level};

/// Options of `stp backup`.
#[derive(Args, Debug)]
#[command(
    after_help = "The roles read a backup configuration file (docs/BACKUP.md).\n\
Examples:\n  stp backup client agent --config backup.toml\n  \
stp backup server fs --config backup.toml --client 192.0.2.20 --source /srv\n  \
stp backup client db --config backup.toml --sqlite /var/lib/app.db --name app\n  \
stp backup client restore 3 --config backup.toml --to /srv/restored\n  \
stp backup list --repo /var/lib/stp/backup\n  \
stp backup restore 3 --repo /var/lib/stp/backup --to /tmp/r --path etc\n  \
stp backup verify --all --repo /var/lib/stp/backup"
)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// The backup server: runs file-system backups, takes database backups.
    #[command(subcommand)]
    Server(ServerCommand),
    /// The agent on the host that owns the data.
    #[command(subcommand)]
    Client(ClientCommand),
    /// List the backups in the catalog.
    List(ListArgs),
    /// Restore a backup (or some paths of it) to another directory, or a
    /// database backup to a file or into a command.
    Restore(RestoreArgs),
    /// Re-read archives and check every hash.
    Verify(VerifyArgs),
    /// Forget old backups.
    Forget(ForgetArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// The backup configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Print a JSON summary instead of text (and no progress bars).
    #[arg(long)]
    json: bool,
    /// Use this well-known port (WKP; WKP+1 and WKP+2 follow) instead of
    /// the STP configuration's `wkp`. Both hosts must use the same.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..=65533))]
    wkp: Option<u16>,
}

impl Common {
    /// The host of `cfg`, with `--wkp` applied.
    fn host(&self, cfg: &BackupConfig) -> Result<(session::Host, ArrayStatus)> {
        let (mut host, array) = cfg.host_and_status()?;
        if let Some(p) = self.wkp {
            host.wkp = p;
        }
        Ok((host, array))
    }

    /// A run with progress bars unless the output is JSON.
    fn run_options(&self) -> RunOptions {
        RunOptions {
            quiet: self.json,
            ..RunOptions::default()
        }
    }
}

#[derive(Subcommand, Debug)]
enum ServerCommand {
    /// Back up a directory of a client (server-initiated, seed Figs. 4/4A).
    Fs {
        #[command(flatten)]
        common: Common,
        /// The client's address.
        #[arg(long)]
        client: IpAddr,
        /// The client's name in the catalog (default: its address).
        #[arg(long)]
        name: Option<String>,
        /// The directory on the client.
        #[arg(long)]
        source: String,
        /// Only what changed since the last backup of this source.
        #[arg(long)]
        incremental: bool,
        /// Exclude pattern (repeatable): `*.tmp`, `cache`, `/top/only`.
        #[arg(long = "exclude")]
        excludes: Vec<String>,
    },
    /// Take database backups and serve restores that clients start (seed
    /// Fig. 5).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Serve one session (a backup or a restore) and exit.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ClientCommand {
    /// Wait for the server's file-system backup sessions.
    Agent {
        #[command(flatten)]
        common: Common,
        /// Serve one session and exit.
        #[arg(long)]
        once: bool,
    },
    /// Back up a database to the server (client-initiated, seed Fig. 5).
    Db {
        #[command(flatten)]
        common: Common,
        /// A live SQLite database (SQLite's online backup).
        #[arg(
            long,
            conflicts_with = "from_command",
            required_unless_present = "from_command"
        )]
        sqlite: Option<PathBuf>,
        /// Back up the standard output of `sh -c CMD` (e.g. `pg_dump mydb`).
        #[arg(long, value_name = "CMD")]
        from_command: Option<String>,
        /// The database's name in the catalog.
        #[arg(long)]
        name: String,
        /// The server's address (default: [client] server).
        #[arg(long)]
        server: Option<IpAddr>,
    },
    /// Restore a backup from the server to this host, through the array
    /// (the server runs `stp backup server serve`).
    Restore {
        #[command(flatten)]
        common: Common,
        /// The backup id (`stp backup list` on the server).
        id: i64,
        /// Restore into this directory (it may exist; files in it are
        /// replaced).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Only these paths (and what is under them); repeatable.
        #[arg(long = "path")]
        paths: Vec<String>,
        /// The server's address (default: [client] server).
        #[arg(long)]
        server: Option<IpAddr>,
    },
}

#[derive(Args, Debug)]
struct RepoArg {
    /// The repository directory.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    repo: Option<PathBuf>,
    /// Or the backup configuration file whose [server] names it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

impl RepoArg {
    fn open(&self) -> Result<Repo> {
        let dir = match (&self.repo, &self.config) {
            (Some(r), _) => r.clone(),
            (None, Some(c)) => {
                BackupConfig::load(c)?
                    .server
                    .context("the configuration has no [server] section naming the repository")?
                    .repository
            }
            (None, None) => bail!("say which repository: --repo DIR or --config FILE"),
        };
        let mut repo = Repo::open(dir)?;
        repo.show_progress(!self.json);
        Ok(repo)
    }
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// List the files (and recorded errors) of this backup instead.
    #[arg(long, value_name = "ID", conflicts_with = "restores")]
    files: Option<i64>,
    /// List the restores through the array to other hosts instead.
    #[arg(long)]
    restores: bool,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The backup id (`stp backup list`).
    id: i64,
    #[command(flatten)]
    repo: RepoArg,
    /// Restore into this directory (it may exist; files in it are replaced).
    #[arg(long, value_name = "DIR", required_unless_present_any = ["to_file", "into_command"])]
    to: Option<PathBuf>,
    /// Only these paths (and what is under them); repeatable.
    #[arg(long = "path")]
    paths: Vec<String>,
    /// Write a database backup's bytes to this file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["to", "into_command"])]
    to_file: Option<PathBuf>,
    /// Pipe a database backup's bytes into `sh -c CMD` (e.g. `psql mydb`).
    #[arg(long, value_name = "CMD", conflicts_with = "to")]
    into_command: Option<String>,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// The backup id.
    #[arg(required_unless_present = "all")]
    id: Option<i64>,
    /// Every complete backup.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    repo: RepoArg,
}

#[derive(Args, Debug)]
struct ForgetArgs {
    /// Keep the newest N complete backups of each source.
    #[arg(long, value_name = "N")]
    keep_last: usize,
    /// Say which backups would be forgotten, and remove nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    repo: RepoArg,
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_outcome(json: bool, what: &str, o: &session::Outcome) -> Result<()> {
    if json {
        return print_json(o);
    }
    let mb = o.bytes as f64 / 1e6;
    // Both ends print the server's measurement, so they agree.
    match o.restore_id {
        Some(rid) => println!(
            "{what}: restore {rid} of backup {} complete: {:.1} MB, {} files over {}; {:.1} MB/s \
             ({:.2} s from the start of the data to every file in place, as the server measured)",
            o.backup_id, mb, o.files, o.channel, o.mb_per_s, o.seconds,
        ),
        None => println!(
            "{what}: backup {} complete: {:.1} MB, {} files, {} errors over {}; {:.1} MB/s \
             ({:.2} s from the start of the data to the durable record, as the server measured)",
            o.backup_id, mb, o.files, o.errors, o.channel, o.mb_per_s, o.seconds,
        ),
    }
    println!(
        "  {}; LAN: {} (counted at this host's sockets)",
        o.traffic.summary(),
        o.traffic.lan_detail()
    );
    if let Some(r) = &o.fallback_reason {
        println!("  LAN fallback: {r}");
    }
    println!("  {}", o.dropped.summary());
    Ok(())
}

/// Seconds since the epoch as a UTC date and time, `2026-12-07 03:12:33Z`.
pub fn utc(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "-".into();
    }
    let t = secs as i64;
    let (days, rem) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Days to a civil date (proleptic Gregorian; H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The per-channel columns of `list`: bytes through the array, over the
/// LAN, and the LAN's share (`-` where the catalog holds none: a backup
/// recorded before it kept them, a session that ended before they were
/// counted).
fn traffic_cells(traffic: Option<&ChannelUse>) -> (String, String, String) {
    match traffic {
        Some(t) => (
            super::traffic::human_bytes(t.array_bytes),
            super::traffic::human_bytes(t.lan_bytes),
            super::traffic::percent(t.lan_percent()),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    }
}

fn info_line(b: &BackupInfo) -> String {
    let (array, lan, share) = traffic_cells(b.traffic.as_ref());
    format!(
        "{:>5}  {:<20}  {:<8}  {:<2}  {:<11}  {:<12}  {:>12}  {:>10}  {:>10}  {:>8}  {:>6}  {:>4}  \
         {:<7}  {}:{}",
        b.id,
        utc(b.started),
        b.status,
        b.kind,
        b.level,
        b.channel.as_deref().unwrap_or("-"),
        b.bytes,
        array,
        lan,
        share,
        b.files,
        b.errors,
        b.base_id.map_or("-".into(), |x| x.to_string()),
        escape_control(&b.client),
        escape_control(&b.source)
    )
}

/// The lines under a row of `list`: what went wrong (unless it is
/// complete) and why the data left the array.
fn print_notes(status: &str, message: Option<&str>, fallback_reason: Option<&str>) {
    if let Some(m) = message.filter(|_| status != "complete") {
        println!("       {}", escape_control(m));
    }
    if let Some(r) = fallback_reason {
        println!("       LAN fallback: {}", escape_control(r));
    }
}

/// On Ctrl-C, a server marks the backups it is receiving failed and
/// removes their partial archives before it exits (without this the next
/// open of the repository would do it).
fn clean_up_on_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        super::repo::interrupt_in_flight("interrupted by Ctrl-C: the server stopped mid-backup");
        eprintln!("stp backup: interrupted; backups in progress are recorded as failed");
        std::process::exit(130);
    });
}

/// The repository of the `[server]` section, with its compression.
fn server_repo(cfg: &BackupConfig, json: bool) -> Result<Repo> {
    clean_up_on_ctrl_c();
    let server = cfg
        .server
        .as_ref()
        .context("the configuration has no [server] section naming the repository")?;
    let mut repo = Repo::open(&server.repository)?;
    repo.set_gzip(server.compress == super::config::Compress::Gzip);
    repo.show_progress(!json);
    Ok(repo)
}

/// A daemon's reporting: text on stdout/stderr, or one JSON object per
/// line on stdout.
struct DaemonIo {
    role: Role,
    json: bool,
}

impl LoopIo for DaemonIo {
    fn outcome(&mut self, o: &session::Outcome) -> Result<()> {
        let event = if o.restore_id.is_some() {
            "restore"
        } else {
            "backup"
        };
        tracing::info!(
            backup_id = o.backup_id,
            restore_id = o.restore_id,
            bytes = o.bytes,
            files = o.files,
            errors = o.errors,
            channel = %o.channel,
            mb_per_s = o.mb_per_s,
            "{event} complete"
        );
        if self.json {
            let mut v = serde_json::to_value(o)?;
            if let Some(m) = v.as_object_mut() {
                m.insert("event".into(), event.into());
            }
            println!("{}", serde_json::to_string(&v)?);
            Ok(())
        } else {
            let what = match self.role {
                Role::Agent => "client",
                Role::Server => "server",
            };
            print_outcome(false, what, o)
        }
    }

    fn failed(&mut self, e: &anyhow::Error, pause: Duration) {
        tracing::warn!(
            role = self.role.command(),
            "session failed: {e:#}; waiting for the next session in {:.1} s",
            pause.as_secs_f64()
        );
        if self.json {
            let v = serde_json::json!({
                "event": "failed",
                "error": format!("{e:#}"),
                "retry_in_s": pause.as_secs_f64(),
            });
            println!("{v}");
        }
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// Starts a daemon: checks its ports, says where it listens and what the
/// array is doing, then runs its sessions.
fn run_daemon(
    role: Role,
    host: &session::Host,
    array: ArrayStatus,
    common: &Common,
    once: bool,
    session: &mut dyn FnMut() -> Result<session::Outcome>,
) -> Result<ExitCode> {
    let listening = daemon::check_ports(host, role)?;
    let started = Started {
        event: "started",
        role,
        listening,
        array,
    };
    if common.json {
        println!("{}", serde_json::to_string(&started)?);
    } else {
        for l in started.lines() {
            println!("{l}");
        }
    }
    // Whoever reads the output (a terminal, a pipe, a service manager)
    // learns at once that the daemon is up.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let status = format!(
        "listening on {}; {}",
        started
            .listening
            .iter()
            .map(|l| l.addr.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        started.array.line()
    );
    tracing::info!(role = role.command(), "started: {status}");
    if let Err(e) = daemon::notify_ready(&status) {
        tracing::warn!(role = role.command(), "{e:#}");
    }
    let mut io = DaemonIo {
        role,
        json: common.json,
    };
    daemon::run_loop(role, once, &mut io, session)?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `stp backup`.
pub fn run(args: &BackupArgs) -> Result<ExitCode> {
    match &args.command {
        BackupCommand::Server(ServerCommand::Fs {
            common,
            client,
            name,
            source,
            incremental,
            excludes,
        }) => {
            let cfg = BackupConfig::load(&common.config)?;
            let repo = server_repo(&cfg, common.json)?;
            let (host, _) = common.host(&cfg)?;
            let job = FsJob {
                client: *client,
                client_name: name.clone(),
                source: source.clone(),
                level: if *incremental {
                    Level::Incremental
                } else {
                    Level::Full
                },
                excludes: excludes.clone(),
            };
            let o = session::fs_backup(&host, &repo, &job, common.run_options())?;
            print_outcome(common.json, "server", &o)?;
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Server(ServerCommand::Serve { common, once }) => {
            let cfg = BackupConfig::load(&common.config)?;
            let repo = server_repo(&cfg, common.json)?;
            let (host, array) = common.host(&cfg)?;
            let mut session = || session::db_serve(&host, &repo, common.run_options());
            run_daemon(Role::Server, &host, array, common, *once, &mut session)
        }
        BackupCommand::Client(ClientCommand::Agent { common, once }) => {
            let cfg = BackupConfig::load(&common.config)?;
            let (host, array) = common.host(&cfg)?;
            let rules = cfg.rules();
            let mut session = || session::fs_agent(&host, &rules, common.run_options());
            run_daemon(Role::Agent, &host, array, common, *once, &mut session)
        }
        BackupCommand::Client(ClientCommand::Db {
            common,
            sqlite,
            from_command,
            name,
            server,
        }) => {
            let cfg = BackupConfig::load(&common.config)?;
            let (client, server) = client_and_server(&cfg, *server)?;
            let source = match (sqlite, from_command) {
                (Some(p), _) => DbSource::Sqlite {
                    path: p
                        .canonicalize()
                        .with_context(|| format!("{} does not exist", p.display()))?
                        .display()
                        .to_string(),
                },
                (None, Some(c)) => DbSource::Command { command: c.clone() },
                (None, None) => bail!("say what to back up: --sqlite FILE or --from-command CMD"),
            };
            let (host, _) = common.host(&cfg)?;
            let o = session::db_backup(
                &host,
                server,
                &client.name,
                name,
                &source,
                common.run_options(),
            )?;
            print_outcome(common.json, "client", &o)?;
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Client(ClientCommand::Restore {
            common,
            id,
            to,
            paths,
            server,
        }) => {
            let cfg = BackupConfig::load(&common.config)?;
            let (client, server) = client_and_server(&cfg, *server)?;
            let (host, _) = common.host(&cfg)?;
            let job = RestoreJob {
                server,
                client_name: client.name.clone(),
                backup_id: *id,
                paths: paths.clone(),
            };
            let o = restore_from_server(&host, &job, to, common.run_options())?;
            print_outcome(common.json, "client", &o)?;
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::List(a) if a.restores => {
            let repo = a.repo.open()?;
            let list = repo.restores()?;
            if a.repo.json {
                print_json(&list)?;
            } else {
                println!(
                    "{:>5}  {:<20}  {:<8}  {:>6}  {:<12}  {:>12}  {:>10}  {:>10}  {:>8}  {:>6}  \
                     client:destination",
                    "id",
                    "started (UTC)",
                    "status",
                    "backup",
                    "channel",
                    "bytes",
                    "array",
                    "LAN",
                    "LAN %",
                    "files"
                );
                for r in &list {
                    let (array, lan, share) = traffic_cells(r.traffic.as_ref());
                    println!(
                        "{:>5}  {:<20}  {:<8}  {:>6}  {:<12}  {:>12}  {:>10}  {:>10}  {:>8}  \
                         {:>6}  {}:{}",
                        r.id,
                        utc(r.started),
                        r.status,
                        r.backup_id,
                        r.channel.as_deref().unwrap_or("-"),
                        r.bytes,
                        array,
                        lan,
                        share,
                        r.files,
                        escape_control(&r.client),
                        escape_control(&r.to)
                    );
                    print_notes(
                        &r.status,
                        r.message.as_deref(),
                        r.fallback_reason.as_deref(),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::List(a) => {
            let repo = a.repo.open()?;
            if let Some(id) = a.files {
                let files = repo.manifest(id)?;
                let errors = repo.file_errors(id)?;
                if a.repo.json {
                    print_json(&serde_json::json!({ "files": files, "errors": errors }))?;
                } else {
                    for f in &files {
                        println!(
                            "{:<8} {:>12} {:o} {} {} {}",
                            f.kind.as_str(),
                            f.size,
                            f.mode,
                            utc(f.mtime as f64),
                            f.sha256.as_deref().map_or("-", |h| &h[..16.min(h.len())]),
                            escape_control(&f.path)
                        );
                    }
                    for e in &errors {
                        println!(
                            "error: {}: {}",
                            escape_control(&e.path),
                            escape_control(&e.message)
                        );
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let list = repo.list()?;
            if a.repo.json {
                print_json(&list)?;
            } else {
                println!(
                    "{:>5}  {:<20}  {:<8}  {:<2}  {:<11}  {:<12}  {:>12}  {:>10}  {:>10}  {:>8}  \
                     {:>6}  {:>4}  {:<7}  client:source",
                    "id",
                    "started (UTC)",
                    "status",
                    "",
                    "level",
                    "channel",
                    "bytes",
                    "array",
                    "LAN",
                    "LAN %",
                    "files",
                    "errs",
                    "base"
                );
                for b in &list {
                    println!("{}", info_line(b));
                    print_notes(
                        &b.status,
                        b.message.as_deref(),
                        b.fallback_reason.as_deref(),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Restore(a) => restore(a),
        BackupCommand::Verify(a) => {
            let repo = a.repo.open()?;
            let ids: Vec<i64> = if a.all {
                repo.list()?
                    .into_iter()
                    .filter(|b| b.status == "complete")
                    .map(|b| b.id)
                    .collect()
            } else {
                a.id.into_iter().collect()
            };
            let mut reports = Vec::new();
            for id in ids {
                reports.push(repo.verify(id)?);
            }
            let bad = reports.iter().any(|r| !r.problems.is_empty());
            if a.repo.json {
                print_json(&reports)?;
            } else {
                for r in &reports {
                    if r.problems.is_empty() {
                        println!("backup {}: OK ({} files checked)", r.id, r.files_checked);
                    } else {
                        println!("backup {}: {} PROBLEMS", r.id, r.problems.len());
                        for p in &r.problems {
                            println!("  {p}");
                        }
                    }
                }
                if bad {
                    eprintln!("stp backup verify: damage found; restore from another backup and take a new one");
                }
            }
            Ok(if bad {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            })
        }
        BackupCommand::Forget(a) => {
            if a.keep_last == 0 {
                bail!("--keep-last 0 would forget everything; use at least 1");
            }
            let repo = a.repo.open()?;
            let gone = if a.dry_run {
                repo.forget_plan(a.keep_last)?
            } else {
                repo.forget_keep_last(a.keep_last)?
            };
            if a.repo.json {
                print_json(&serde_json::json!({ "forgotten": gone, "dry_run": a.dry_run }))?;
            } else if gone.is_empty() {
                println!("nothing to forget");
            } else if a.dry_run {
                println!("would forget backups {gone:?} (dry run: nothing was removed)");
            } else {
                println!("forgot backups {gone:?}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Where a restore's bytes went: restores read the repository on the
/// server's own host (`stp backup client restore` restores to another
/// host through the array).
const LOCAL_RESTORE: &str = "read from the repository on this host: 0 B through the array, \
                             0 B over the LAN";

fn restore(a: &RestoreArgs) -> Result<ExitCode> {
    let repo = a.repo.open()?;
    if let Some(dir) = &a.to {
        let done = repo.restore(a.id, dir, &a.paths)?;
        if a.repo.json {
            print_json(&serde_json::json!({
                "backup_id": a.id, "files": done.files, "bytes": done.bytes, "others": done.others,
                "to": dir, "channel": "local", "traffic": ChannelUse::default(),
            }))?;
        } else {
            println!(
                "restored backup {} into {}: {} files ({} bytes), {} directories and links; every hash checked",
                a.id,
                dir.display(),
                done.files,
                done.bytes,
                done.others
            );
            println!("  {LOCAL_RESTORE}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = if let Some(f) = &a.to_file {
        restore_to_file(&repo, a.id, f)?
    } else if let Some(cmd) = &a.into_command {
        let mut child = Proc::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run `sh -c {cmd:?}`"))?;
        let mut stdin = child
            .stdin
            .take()
            .context("the command has no standard input")?;
        let n = repo.restore_stream(a.id, &mut stdin);
        drop(stdin);
        let status = child.wait()?;
        let n = n?;
        if !status.success() {
            bail!("`{cmd}` failed ({status}) after taking {n} bytes");
        }
        n
    } else {
        bail!("say where to restore: --to DIR, --to-file FILE or --into-command CMD");
    };
    if a.repo.json {
        print_json(&serde_json::json!({
            "backup_id": a.id, "bytes": bytes, "channel": "local",
            "traffic": ChannelUse::default(),
        }))?;
    } else {
        println!(
            "restored backup {}: {bytes} bytes; every hash checked",
            a.id
        );
        println!("  {LOCAL_RESTORE}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a database backup's bytes to `file` (via a temporary name, so a
/// failed restore leaves no half file).
pub fn restore_to_file(repo: &Repo, id: i64, file: &Path) -> Result<u64> {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let n = repo.restore_stream(id, &mut tmp)?;
    tmp.as_file().sync_all()?;
    tmp.persist(file)
        .with_context(|| format!("moving the restored data to {}", file.display()))?;
    Ok(n)
}

/// The configuration's `[client]` section and the server to talk to
/// (`--server`, else the section's `server`).
fn client_and_server(
    cfg: &BackupConfig,
    server: Option<IpAddr>,
) -> Result<(super::config::ClientSection, IpAddr)> {
    let client = cfg
        .client
        .clone()
        .context("the configuration has no [client] section")?;
    let server = server
        .or(client.server)
        .context("say where the backup server is: --server ADDR or [client] server")?;
    Ok((client, server))
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0.0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00:00Z");
        assert_eq!(utc(4_102_444_799.5), "2099-12-31 23:59:59Z");
        assert_eq!(utc(-1.0), "-");
        assert_eq!(utc(f64::NAN), "-");
    }
}
