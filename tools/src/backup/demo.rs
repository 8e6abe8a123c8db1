//! `stp demo`: the main job on the embedded default. On the in-process
//! array (no root, no VM, no SCSI hardware), back up a real directory tree
//! and a live SQLite database through STP, restore both elsewhere (the tree
//! also to the client, streamed back through the array), check them byte
//! for byte, say where the bytes went (through the array, over
//! the LAN: counted at the sockets), and measure STP's goodput for a moment
//! with the bench's own measuring code (`stp bench stp --sim`), against TCP
//! on loopback as a named reference (a memory copy in this process, not a
//! LAN).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;

use super::inproc::{free_wkp, InProcArray};
use super::pipe::Policy;
use super::remote::{restore_from_server, RestoreJob};
use super::repo::{Repo, VerifyReport};
use super::session::{self, AgentRules, FsJob, Host, Outcome, RunOptions};
use super::traffic::ChannelUse;
use super::wire::{DbSource, Level};
use crate::bench::net::{run_stp, run_tcp, NetArgs, StpArgs, TcpArgs};
use crate::bench::{OutArgs, VsTcp};

/// Options of `stp demo`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Everything runs in this process over the embedded simulated array:\n\
the backup server and the client are two hosts on it, control goes over TCP on\n\
loopback (standing in for the LAN: the demo counts the bytes that would cross it)\n\
and the data through the array. The closing bench's TCP figure is loopback in\n\
this process, a memory copy, not a LAN. Exits 1 if anything differs."
)]
pub struct DemoArgs {
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
    /// Bytes of file data in the demo tree (about).
    #[arg(long, default_value_t = 24 << 20)]
    pub tree_bytes: u64,
    /// Bytes each closing goodput bench moves, STP and TCP (0: skip the
    /// bench).
    #[arg(long, default_value = "256m", value_parser = crate::bench::units::parse_size)]
    pub bench_bytes: u64,
    /// Round trips of 64 bytes each closing ping-pong bench makes.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub bench_count: u64,
    /// Keep the demo's files in this directory (default: a temporary one,
    /// removed at the end).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
}

/// One backup's line in the summary.
#[derive(Clone, Debug, Serialize)]
pub struct DemoBackup {
    /// What was backed up.
    pub what: String,
    /// The catalog id.
    pub backup_id: i64,
    /// Stream bytes.
    pub bytes: u64,
    /// Files.
    pub files: u64,
    /// Seconds.
    pub seconds: f64,
    /// MB/s.
    pub mb_per_s: f64,
    /// Channel.
    pub channel: String,
    /// Bytes and time per channel, as the server counted them at its
    /// sockets.
    pub traffic: ChannelUse,
    /// Restored and compared equal.
    pub restored_equal: bool,
    /// `stp backup verify` found no problem.
    pub verified: bool,
    /// What differed, if anything.
    pub problems: Vec<String>,
}

impl DemoBackup {
    /// The line of backup `out`: `problems` is what its restore found to
    /// differ, `verify` what `stp backup verify` found (both count against
    /// "restored equal").
    fn new(what: &str, out: &Outcome, mut problems: Vec<String>, verify: VerifyReport) -> Self {
        let verified = verify.problems.is_empty();
        problems.extend(verify.problems);
        DemoBackup {
            what: what.into(),
            backup_id: out.backup_id,
            bytes: out.bytes,
            files: out.files,
            seconds: out.seconds,
            mb_per_s: out.bytes as f64 / 1e6 / out.seconds.max(1e-9),
            channel: out.channel.clone(),
            traffic: out.traffic,
            restored_equal: problems.is_empty(),
            verified,
            problems,
        }
    }
}

/// The restore through the array in the summary: the client takes the
/// directory tree's backup back from the server.
#[derive(Clone, Debug, Serialize)]
pub struct DemoRestore {
    /// The backup restored.
    pub backup_id: i64,
    /// The catalog's restore id.
    pub restore_id: Option<i64>,
    /// Stream bytes.
    pub bytes: u64,
    /// Seconds, from the start of the stream to every file in place, as
    /// the server measured them.
    pub seconds: f64,
    /// MB/s.
    pub mb_per_s: f64,
    /// Channel.
    pub channel: String,
    /// Bytes and time per channel, as the server counted them.
    pub traffic: ChannelUse,
    /// The restored tree compared equal to the source.
    pub restored_equal: bool,
    /// What differed, if anything.
    pub problems: Vec<String>,
}

/// The demo's summary.
#[derive(Clone, Debug, Serialize)]
pub struct DemoSummary {
    /// The backups.
    pub backups: Vec<DemoBackup>,
    /// The directory tree restored to the client through the array.
    pub restore: DemoRestore,
    /// Rows the writer committed while the database was backed up.
    pub rows_written_during_backup: u64,
    /// One-way STP goodput through the array, MB/s.
    pub bench_stp_mb_per_s: Option<f64>,
    /// Where every backup's bytes went, together.
    pub traffic: ChannelUse,
    /// One-way TCP goodput on loopback in the same run, MB/s: a reference
    /// (a memory copy in this process), not a LAN.
    pub bench_tcp_mb_per_s: Option<f64>,
    /// The vendor-mode file-system backup's MB/s over the bench's one-way
    /// STP goodput (the target: at least 0.8).
    pub backup_vs_stp_goodput: Option<f64>,
    /// STP against TCP in the same run: goodput, CPU-s/GB (STP's host
    /// ends), 64 B round-trip p50, and what each reference is.
    pub bench_vs_tcp: Option<VsTcp>,
    /// True when everything matched.
    pub ok: bool,
}

/// Runs `stp demo`.
pub fn run(args: &DemoArgs) -> Result<ExitCode> {
    let summary = demo(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_text(&summary);
    }
    Ok(if summary.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_text(s: &DemoSummary) {
    println!("stp demo: backup and restore through the embedded simulated array");
    for b in &s.backups {
        println!(
            "  {:<36} backup {:>2}: {:>7.1} MB, {:>4} files in {:>5.2} s ({:>6.1} MB/s) over {:<7} restored {}, verify {}",
            b.what,
            b.backup_id,
            b.bytes as f64 / 1e6,
            b.files,
            b.seconds,
            b.mb_per_s,
            b.channel,
            if b.restored_equal { "equal" } else { "DIFFERENT" },
            if b.verified { "OK" } else { "FAILED" },
        );
        print_details(&b.traffic, &b.problems);
    }
    let r = &s.restore;
    println!(
        "  {:<36} backup {:>2}: {:>7.1} MB in {:>5.2} s ({:>6.1} MB/s) over {:<7} to the client, {}",
        "restore through the array",
        r.backup_id,
        r.bytes as f64 / 1e6,
        r.seconds,
        r.mb_per_s,
        r.channel,
        if r.restored_equal { "equal" } else { "DIFFERENT" },
    );
    print_details(&r.traffic, &r.problems);
    println!(
        "  where the backups' bytes went: {}; LAN: {}",
        s.traffic.summary(),
        s.traffic.lan_detail()
    );
    println!(
        "  (counted at the sockets; here the \"LAN\" is TCP on loopback in this process, \
         standing in for the network between two hosts)"
    );
    println!(
        "  the database took {} committed writes while it was backed up",
        s.rows_written_during_backup
    );
    if let Some(stp) = s.bench_stp_mb_per_s {
        println!("  bench: STP through the embedded array {stp:.1} MB/s one way");
    }
    if let Some(r) = s.backup_vs_stp_goodput {
        println!("  the file-system backup ran at {r:.2}× that goodput (hashing, tar and the catalog included)");
    }
    if let Some(tcp) = s.bench_tcp_mb_per_s {
        println!(
            "  reference: TCP on loopback {tcp:.1} MB/s in the same run: a memory copy inside this \
             process, not a LAN (`stp bench compare` for more)"
        );
    }
    if let Some(v) = &s.bench_vs_tcp {
        println!(
            "  {}",
            v.line()
                .replacen("vs TCP (same run)", "vs that loopback reference", 1)
        );
    }
    println!(
        "  {}",
        if s.ok {
            "all restored data is byte-for-byte equal to the source"
        } else {
            "MISMATCH: see above"
        }
    );
}

/// The lines under a summary line: where its bytes went, then what
/// differed.
fn print_details(traffic: &ChannelUse, problems: &[String]) {
    println!("      {}", traffic.summary());
    for p in problems {
        println!("      {p}");
    }
}

/// Builds the demo tree under `root`: files of several sizes, a symlink,
/// a hard link, a sparse file, an empty file, nested directories.
pub fn make_tree(root: &Path, bytes: u64, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    fs::create_dir_all(root.join("docs/notes"))?;
    fs::create_dir_all(root.join("data/blobs"))?;
    fs::create_dir_all(root.join("empty-dir"))?;
    let mut write = |p: &str, n: usize| -> Result<()> {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        fs::write(root.join(p), v).with_context(|| format!("writing {p}"))
    };
    write("docs/readme.txt", 1_234)?;
    write("docs/notes/a.txt", 10)?;
    write("docs/notes/b.txt", 65_536)?;
    let big = (bytes / 4) as usize;
    write("data/blobs/one.bin", big)?;
    write("data/blobs/two.bin", big / 3 + 7)?;
    for i in 0..20 {
        write(&format!("data/small-{i:02}.dat"), 100 + i * 997)?;
    }
    let rest = bytes.saturating_sub((big + big / 3) as u64) as usize;
    write("data/rest.bin", rest / 2)?;
    File::create(root.join("empty.txt"))?;
    std::os::unix::fs::symlink("docs/readme.txt", root.join("readme-link"))?;
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling-link"))?;
    fs::hard_link(root.join("docs/notes/b.txt"), root.join("b-hardlink.txt"))?;
    // A sparse file (16 MiB, or 4 for small trees) with data at three
    // places.
    let len: u64 = if bytes >= 16 << 20 { 16 << 20 } else { 4 << 20 };
    let mut f = File::create(root.join("data/sparse.img"))?;
    f.set_len(len)?;
    for off in [0u64, len / 3, len - 4096] {
        f.seek(SeekFrom::Start(off))?;
        f.write_all(&[0xAB; 4096])?;
    }
    drop(f);
    fs::set_permissions(
        root.join("docs/notes/a.txt"),
        fs::Permissions::from_mode(0o640),
    )?;
    fs::set_permissions(
        root.join("docs/readme.txt"),
        fs::Permissions::from_mode(0o444),
    )?;
    Ok(())
}

/// Compares two trees: entry types, contents, link targets, modes, hard
/// links and holes. Returns the differences.
pub fn compare_trees(a: &Path, b: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, fs::Metadata>) -> Result<()> {
        for e in fs::read_dir(root.join(rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            let m = fs::symlink_metadata(root.join(&r))?;
            if m.is_dir() {
                walk(root, &r, out)?;
            }
            out.insert(r, m);
        }
        Ok(())
    }
    let (mut ma, mut mb) = (BTreeMap::new(), BTreeMap::new());
    walk(a, Path::new(""), &mut ma)?;
    walk(b, Path::new(""), &mut mb)?;
    let mut problems = Vec::new();
    for k in ma.keys() {
        if !mb.contains_key(k) {
            problems.push(format!("{} is missing from the restore", k.display()));
        }
    }
    for k in mb.keys() {
        if !ma.contains_key(k) {
            problems.push(format!(
                "{} was restored but is not in the source",
                k.display()
            ));
        }
    }
    let mut inodes_a: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut inodes_b: BTreeMap<u64, PathBuf> = BTreeMap::new();
    for (k, x) in &ma {
        let Some(y) = mb.get(k) else { continue };
        let (pa, pb) = (a.join(k), b.join(k));
        let d = k.display();
        if x.file_type() != y.file_type() {
            problems.push(format!("{d}: the type differs"));
            continue;
        }
        if (x.uid(), x.gid()) != (y.uid(), y.gid()) {
            problems.push(format!(
                "{d}: owner {}:{} became {}:{}",
                x.uid(),
                x.gid(),
                y.uid(),
                y.gid()
            ));
        }
        if x.mode() & 0o7777 != y.mode() & 0o7777 && !x.file_type().is_symlink() {
            problems.push(format!(
                "{d}: mode {:o} became {:o}",
                x.mode() & 0o7777,
                y.mode() & 0o7777
            ));
        }
        if x.file_type().is_symlink() {
            if fs::read_link(&pa)? != fs::read_link(&pb)? {
                problems.push(format!("{d}: the link target differs"));
            }
        } else if x.is_file() {
            if !same_content(&pa, &pb)? {
                problems.push(format!("{d}: the content differs"));
            }
            if x.mtime() != y.mtime() {
                problems.push(format!("{d}: mtime {} became {}", x.mtime(), y.mtime()));
            }
            if x.blocks() * 512 < x.len() / 2 && y.blocks() * 512 >= y.len() {
                problems.push(format!("{d}: was sparse, restored without holes"));
            }
            if x.nlink() > 1 {
                let first_a = inodes_a.entry(x.ino()).or_insert_with(|| k.clone()).clone();
                let first_b = inodes_b.entry(y.ino()).or_insert_with(|| k.clone()).clone();
                if first_a != first_b {
                    problems.push(format!(
                        "{d}: the hard link to {} was not kept",
                        first_a.display()
                    ));
                }
            }
        }
    }
    Ok(problems)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// A live database: a writer thread commits a transaction every few
/// milliseconds, each adding one `events` row and setting `counter` to the
/// number of rows (so a torn snapshot is visible).
pub struct LiveDb {
    /// The database file.
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicU64>,
    writer: Option<thread::JoinHandle<Result<()>>>,
}

impl LiveDb {
    /// Creates the database with some rows and starts the writer.
    pub fn start(path: &Path) -> Result<LiveDb> {
        let c = rusqlite::Connection::open(path)?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.execute_batch(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, body BLOB NOT NULL);
             CREATE TABLE counter (n INTEGER NOT NULL);
             INSERT INTO counter VALUES (0);",
        )?;
        let tx = c.unchecked_transaction()?;
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..2000 {
            let mut body = vec![0u8; 512];
            rng.fill_bytes(&mut body);
            tx.execute("INSERT INTO events (body) VALUES (?1)", [&body])?;
        }
        tx.execute("UPDATE counter SET n = (SELECT count(*) FROM events)", [])?;
        tx.commit()?;
        drop(c);
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicU64::new(0));
        let (s, n, p) = (Arc::clone(&stop), Arc::clone(&commits), path.to_path_buf());
        let writer = thread::spawn(move || -> Result<()> {
            let mut c = rusqlite::Connection::open(&p)?;
            c.busy_timeout(Duration::from_secs(30))?;
            let mut rng = StdRng::seed_from_u64(10);
            while !s.load(Ordering::Acquire) {
                let tx = c.transaction()?;
                let mut body = vec![0u8; 512];
                rng.fill_bytes(&mut body);
                tx.execute("INSERT INTO events (body) VALUES (?1)", [&body])?;
                tx.execute("UPDATE counter SET n = n + 1", [])?;
                tx.commit()?;
                n.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        });
        Ok(LiveDb {
            path: path.to_path_buf(),
            stop,
            commits,
            writer: Some(writer),
        })
    }

    /// Commits so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Stops the writer; returns its error, if it had one.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.writer.take() {
            w.join()
                .map_err(|_| anyhow!("the database writer panicked"))??;
        }
        Ok(self.commits())
    }
}

impl Drop for LiveDb {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Checks a restored copy of the live database: SQLite's integrity check
/// passes and `counter` equals the number of `events` (a consistent
/// snapshot). Returns the problems.
pub fn check_db(path: &Path) -> Result<Vec<String>> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut problems = Vec::new();
    let ic: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if ic != "ok" {
        problems.push(format!("integrity_check says {ic}"));
    }
    let n: i64 = c.query_row("SELECT n FROM counter", [], |r| r.get(0))?;
    let rows: i64 = c.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    if n != rows {
        problems.push(format!(
            "torn snapshot: counter says {n} rows, the table has {rows}"
        ));
    }
    if rows < 2000 {
        problems.push(format!("only {rows} rows: data is missing"));
    }
    Ok(problems)
}

/// `client`'s agent answering one file-system backup, on a thread.
fn agent_once(client: Host) -> thread::JoinHandle<Result<Outcome>> {
    thread::spawn(move || {
        session::fs_agent(
            &client,
            &AgentRules::default(),
            RunOptions {
                quiet: true,
                ..RunOptions::default()
            },
        )
    })
}

/// `server` serving one client-initiated session (the database backup,
/// the restore through the array) on a thread, with a handle of its own
/// on the repository at `root`.
fn serve_once(server: &Host, root: &Path) -> thread::JoinHandle<Result<Outcome>> {
    let (server, root) = (server.clone(), root.to_path_buf());
    thread::spawn(move || -> Result<Outcome> {
        let repo = Repo::open(root)?;
        session::db_serve(
            &server,
            &repo,
            RunOptions {
                quiet: true,
                ..RunOptions::default()
            },
        )
    })
}

fn demo(args: &DemoArgs) -> Result<DemoSummary> {
    let tmp;
    let base = match &args.keep {
        Some(d) => {
            fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("stp-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let src = base.join("source");
    if src.exists() {
        bail!("{} exists: give --keep an empty directory", src.display());
    }
    make_tree(&src, args.tree_bytes, 1)?;
    let live = LiveDb::start(&base.join("live.sqlite"))?;
    let mut repo = Repo::open(base.join("repository"))?;
    repo.show_progress(!args.json);
    let array = InProcArray::new(1)?;
    let wkp = free_wkp()?;
    let server = array.host(0, wkp, Policy::Preferred, None);
    let client = array.host(1, wkp, Policy::Preferred, None);
    let quiet = args.json;
    let mut backups = Vec::new();

    // 1. The directory tree: server-initiated.
    let agent = agent_once(client.clone());
    let job = FsJob {
        client: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client_name: Some("demo-client".into()),
        source: src.display().to_string(),
        level: Level::Full,
        excludes: Vec::new(),
    };
    let fs_out = session::fs_backup(
        &server,
        &repo,
        &job,
        RunOptions {
            quiet,
            ..RunOptions::default()
        },
    )
    .context("the file-system backup failed")?;
    agent
        .join()
        .map_err(|_| anyhow!("the client agent panicked"))?
        .context("the client agent failed")?;
    let fs_dest = base.join("restored/tree");
    repo.restore(fs_out.backup_id, &fs_dest, &[])?;
    let problems = compare_trees(&src, &fs_dest)?;
    backups.push(DemoBackup::new(
        "directory tree (fs flow)",
        &fs_out,
        problems,
        repo.verify(fs_out.backup_id)?,
    ));
    // 1a. The same backup back to the client, through the array: the
    // server streams it, the client writes it as it arrives.
    let restore = {
        let srv = serve_once(&server, repo.root());
        let remote_dest = base.join("restored/tree-on-the-client");
        let got = restore_from_server(
            &client,
            &RestoreJob {
                server: IpAddr::V4(Ipv4Addr::LOCALHOST),
                client_name: "demo-client".into(),
                backup_id: fs_out.backup_id,
                paths: Vec::new(),
            },
            &remote_dest,
            RunOptions {
                quiet,
                ..RunOptions::default()
            },
        )
        .context("the restore through the array failed")?;
        // The server's outcome: its counts are the ones the catalog keeps.
        let sent = srv
            .join()
            .map_err(|_| anyhow!("the backup server panicked"))?
            .context("the backup server failed to serve the restore")?;
        let problems = compare_trees(&src, &remote_dest)?;
        DemoRestore {
            backup_id: fs_out.backup_id,
            restore_id: got.restore_id,
            bytes: sent.bytes,
            seconds: sent.seconds,
            mb_per_s: sent.mb_per_s,
            channel: sent.channel.clone(),
            traffic: sent.traffic,
            restored_equal: problems.is_empty(),
            problems,
        }
    };

    // 1b. The same tree in block mode: the STG is a plain shared LUN read
    // and written with READ(16)/WRITE(16), as on any array.
    array.format_block_stg()?;
    let bwkp = free_wkp()?;
    let bserver = array.block_host(0, bwkp, Policy::Preferred)?;
    let bclient = array.block_host(1, bwkp, Policy::Preferred)?;
    let agent = agent_once(bclient);
    let block_out = session::fs_backup(
        &bserver,
        &repo,
        &job,
        RunOptions {
            quiet,
            ..RunOptions::default()
        },
    )
    .context("the file-system backup in block mode failed")?;
    agent
        .join()
        .map_err(|_| anyhow!("the client agent (block mode) panicked"))?
        .context("the client agent (block mode) failed")?;
    drop(bserver);
    let block_dest = base.join("restored/tree-block");
    repo.restore(block_out.backup_id, &block_dest, &[])?;
    let problems = compare_trees(&src, &block_dest)?;
    backups.push(DemoBackup::new(
        "directory tree, block mode (fs flow)",
        &block_out,
        problems,
        repo.verify(block_out.backup_id)?,
    ));

    // 2. The live database: client-initiated, SQLite's online backup while
    // the writer keeps committing.
    let before = live.commits();
    let srv = serve_once(&server, repo.root());
    let _db_client = session::db_backup(
        &client,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "demo-client",
        "live",
        &DbSource::Sqlite {
            path: live.path.display().to_string(),
        },
        RunOptions {
            quiet,
            ..RunOptions::default()
        },
    )
    .context("the database backup failed")?;
    // The server's outcome: its counts are the ones the catalog keeps.
    let db_out = srv
        .join()
        .map_err(|_| anyhow!("the backup server panicked"))?
        .context("the backup server failed")?;
    let during = live.commits() - before;
    live.stop()?;
    let db_dest = base.join("restored/live.sqlite");
    fs::create_dir_all(base.join("restored"))?;
    let repo = Repo::open(base.join("repository"))?;
    super::cli::restore_to_file(&repo, db_out.backup_id, &db_dest)?;
    let problems = check_db(&db_dest)?;
    backups.push(DemoBackup::new(
        "live SQLite database (db flow)",
        &db_out,
        problems,
        repo.verify(db_out.backup_id)?,
    ));

    // 3. A short bench, with `stp bench`'s code: one-way goodput and 64 B
    // ping-pong through an in-process array and over TCP on loopback.
    let vs = if args.bench_bytes > 0 {
        Some(bench(args.bench_bytes, args.bench_count)?)
    } else {
        None
    };
    let (stp, tcp, vs) = match vs {
        Some((s, t, v)) => (Some(s), Some(t), Some(v)),
        None => (None, None, None),
    };
    let ok = backups.iter().all(|b| b.restored_equal && b.verified) && restore.restored_equal;
    let traffic = backups
        .iter()
        .fold(ChannelUse::default(), |a, b| a.plus(&b.traffic));
    let backup_vs_stp_goodput = stp.filter(|s| *s > 0.0).map(|s| backups[0].mb_per_s / s);
    Ok(DemoSummary {
        backups,
        restore,
        rows_written_during_backup: during,
        traffic,
        bench_stp_mb_per_s: stp,
        bench_tcp_mb_per_s: tcp,
        backup_vs_stp_goodput,
        bench_vs_tcp: vs,
        ok,
    })
}

/// STP (vendor mode, in-process array) against TCP on loopback: goodput
/// of `bytes` and `count` 64-byte round trips each; returns both goodputs
/// and the ratios.
fn bench(bytes: u64, count: u64) -> Result<(f64, f64, VsTcp)> {
    let net = |rtt: bool| NetArgs {
        bytes,
        chunk: 1 << 20,
        rtt,
        msg: 64,
        count,
        time: None,
        rate: None,
        curve: false,
        steps: Vec::new(),
        out: OutArgs {
            quiet: true,
            ..OutArgs::default()
        },
    };
    let stp = run_stp(&StpArgs::sim(net(false))).context("bench: STP goodput")?;
    let tcp = run_tcp(&TcpArgs { net: net(false) }).context("bench: TCP goodput")?;
    let stp_rtt = run_stp(&StpArgs::sim(net(true))).context("bench: STP ping-pong")?;
    let tcp_rtt = run_tcp(&TcpArgs { net: net(true) }).context("bench: TCP ping-pong")?;
    let vs = VsTcp::of(Some(&stp), Some(&tcp), Some(&stp_rtt), Some(&tcp_rtt));
    Ok((stp.mb_per_s, tcp.mb_per_s, vs))
}
