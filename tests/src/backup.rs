//! Backup and restore bodies over a [`Rig`]: the application's two flows
//! end to end. The in-process suite (`tests/backup.rs`) and the real-LIO
//! suite (`tests/lio.rs`) run the same body.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use scsi::{Command, Completion, DataDirection, Opcode, SubmitError, Transport};
use stp_core::block::{format, BlockStg};
use stp_core::multipath::Multipath;
use stp_core::retry::RetryPolicy;
use stp_core::stg::{block_source, MailboxMode};
use stp_core::stream::PathSource;

use stp_core::sockets::SocketLayer;
use stp_tools::backup::demo::{check_db, compare_trees, make_tree, LiveDb};
use stp_tools::backup::pipe::Policy;
use stp_tools::backup::remote::{restore_from_server, RestoreJob};
use stp_tools::backup::repo::Repo;
use stp_tools::backup::session::{self, AgentRules, FsJob, Host, RunOptions};
use stp_tools::backup::wire::{DbSource, Level};

use crate::e2e::{block_layout, config, LOCAL, T};
use crate::rig::{all_members, Rig};

/// The block-mode STG the block bodies format on the rig's plain LUN.
pub const BLOCK_STG: u32 = 9;

/// A backup host on `rig`'s host `host`.
pub fn backup_host(rig: &Arc<dyn Rig>, host: usize, wkp: u16, policy: Policy) -> Host {
    host_over(
        all_members(rig, host),
        rig.stg(),
        rig.members(),
        wkp,
        policy,
    )
}

/// A backup host on `rig`'s host `host` over block-mode STG [`BLOCK_STG`]
/// on the plain shared LUN (formatted by [`format_block_stg`]), as host
/// index `host`.
pub fn block_backup_host(rig: &Arc<dyn Rig>, host: usize, wkp: u16, policy: Policy) -> Host {
    let stg = BlockStg::open(vec![rig.plain(host).unwrap()], host as u16, BLOCK_STG)
        .unwrap_or_else(|e| panic!("{}: opening block STG as host {host}: {e}", rig.describe()));
    host_over(block_source(stg), BLOCK_STG, 1, wkp, policy)
}

/// Formats the rig's plain shared LUN as block-mode STG [`BLOCK_STG`].
pub fn format_block_stg(rig: &Arc<dyn Rig>) {
    format(
        &mut [rig.plain(0).unwrap()],
        BLOCK_STG,
        &block_layout(),
        &mut StdRng::seed_from_u64(9),
    )
    .unwrap();
}

fn host_over(src: Arc<dyn PathSource>, stg: u32, members: usize, wkp: u16, policy: Policy) -> Host {
    host_with(src, stg, members, wkp, policy, config())
}

/// A backup host over `src` (STG `stg` of `members` members) whose STP
/// connections use `conn` (its protection, among others).
pub fn host_with(
    src: Arc<dyn PathSource>,
    stg: u32,
    members: usize,
    wkp: u16,
    policy: Policy,
    conn: stp_core::conn::Config,
) -> Host {
    Host {
        layer: Arc::new(SocketLayer::new(
            HashMap::from([(stg, Arc::clone(&src))]),
            conn,
        )),
        stg,
        stg_len: members as u32,
        wkp,
        bind_ip: LOCAL,
        psk: Some(b"backup suite psk".to_vec()),
        policy,
        timeout: T,
        probe: Some(src),
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        ..RunOptions::default()
    }
}

/// A full file-system backup of `src` from `client` (its agent on a thread
/// of its own) into `server`'s `repo`: the server's outcome and the
/// agent's.
pub fn full_fs_backup(
    server: &Host,
    client: &Host,
    repo: &Repo,
    src: &std::path::Path,
) -> (
    anyhow::Result<session::Outcome>,
    anyhow::Result<session::Outcome>,
) {
    let job = FsJob {
        client: LOCAL,
        client_name: Some("client".into()),
        source: src.display().to_string(),
        level: Level::Full,
        excludes: Vec::new(),
    };
    let c = client.clone();
    let agent = thread::spawn(move || session::fs_agent(&c, &AgentRules::default(), quiet()));
    let out = session::fs_backup(server, repo, &job, quiet());
    (out, agent.join().unwrap())
}

/// A free TCP port with the next two free (WKP, WKP+1, WKP+2).
pub fn free_wkp3() -> u16 {
    stp_tools::backup::inproc::free_wkp().unwrap()
}

/// Host 0 is the backup server, host 1 the client: a full and an
/// incremental file-system backup of a `tree_bytes` tree, restored and
/// compared, on the server and on the client through the array; a live
/// SQLite database backed up while written, restored and
/// checked; every backup verified; all of it through the rig's STG in
/// `mode` (vendor: the rig's STG; block: its plain shared LUN, formatted
/// as a block-mode STG, which any array serves).
pub fn fs_and_db_round_trip(rig: &Arc<dyn Rig>, tree_bytes: u64, mode: MailboxMode) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, tree_bytes, 3).unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::open(&repo_dir).unwrap();
    let wkp = free_wkp3();
    let (server, client) = match mode {
        MailboxMode::Vendor => (
            backup_host(rig, 0, wkp, Policy::Always),
            backup_host(rig, 1, wkp, Policy::Always),
        ),
        MailboxMode::Block => {
            format_block_stg(rig);
            (
                block_backup_host(rig, 0, wkp, Policy::Always),
                block_backup_host(rig, 1, wkp, Policy::Always),
            )
        }
    };
    let job = |level| FsJob {
        client: LOCAL,
        client_name: Some("client".into()),
        source: src.display().to_string(),
        level,
        excludes: Vec::new(),
    };
    let fs_run = |level| {
        let c = client.clone();
        let agent = thread::spawn(move || session::fs_agent(&c, &AgentRules::default(), quiet()));
        let out = session::fs_backup(&server, &repo, &job(level), quiet())
            .unwrap_or_else(|e| panic!("{}: file-system backup: {e:#}", rig.describe()));
        agent
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: agent: {e:#}", rig.describe()));
        assert_eq!(out.channel, "stp", "{}", rig.describe());
        eprintln!(
            "{} ({mode} mode): {} backup {}: {} bytes in {:.2} s",
            rig.describe(),
            level.as_str(),
            out.backup_id,
            out.bytes,
            out.seconds
        );
        out
    };
    let full = fs_run(Level::Full);
    let r = tmp.path().join("r-full");
    repo.restore(full.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());
    fs::write(src.join("docs/added.txt"), b"added after the full backup").unwrap();
    let inc = fs_run(Level::Incremental);
    assert!(inc.bytes < full.bytes / 2);
    let r = tmp.path().join("r-inc");
    repo.restore(inc.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());

    // The client takes the incremental back through the array (its
    // unchanged files from the full backup's archive, in one stream).
    let s = server.clone();
    let dir = repo_dir.clone();
    let srv = thread::spawn(move || session::db_serve(&s, &Repo::open(dir).unwrap(), quiet()));
    let remote = tmp.path().join("r-remote");
    let job = RestoreJob {
        server: LOCAL,
        client_name: "client".into(),
        backup_id: inc.backup_id,
        paths: Vec::new(),
    };
    let got = restore_from_server(&client, &job, &remote, quiet())
        .unwrap_or_else(|e| panic!("{}: restore through the array: {e:#}", rig.describe()));
    let sent = srv
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{}: serving the restore: {e:#}", rig.describe()));
    assert_eq!(
        (got.channel.as_str(), sent.channel.as_str()),
        ("stp", "stp")
    );
    assert_eq!(sent.traffic.lan_data_bytes, 0, "{:?}", sent.traffic);
    assert!(sent.traffic.array_bytes >= sent.bytes, "{:?}", sent.traffic);
    assert_eq!(compare_trees(&src, &remote).unwrap(), Vec::<String>::new());
    eprintln!(
        "{} ({mode} mode): restore of backup {} through the array: {} bytes in {:.2} s",
        rig.describe(),
        inc.backup_id,
        sent.bytes,
        sent.seconds
    );

    let live = LiveDb::start(&tmp.path().join("live.sqlite")).unwrap();
    let s = server.clone();
    let dir = repo_dir.clone();
    let srv = thread::spawn(move || session::db_serve(&s, &Repo::open(dir).unwrap(), quiet()));
    let server_ip: IpAddr = LOCAL;
    let db = session::db_backup(
        &client,
        server_ip,
        "client",
        "live",
        &DbSource::Sqlite {
            path: live.path.display().to_string(),
        },
        quiet(),
    )
    .unwrap_or_else(|e| panic!("{}: database backup: {e:#}", rig.describe()));
    srv.join().unwrap().unwrap();
    assert_eq!(db.channel, "stp");
    live.stop().unwrap();
    let restored = tmp.path().join("restored.sqlite");
    let mut f = fs::File::create(&restored).unwrap();
    repo.restore_stream(db.backup_id, &mut f).unwrap();
    drop(f);
    assert_eq!(check_db(&restored).unwrap(), Vec::<String>::new());
    for id in [full.backup_id, inc.backup_id, db.backup_id] {
        let v = repo.verify(id).unwrap();
        assert!(v.problems.is_empty(), "backup {id}: {:?}", v.problems);
    }
}

/// What passed through one path of a [`Watched`] member.
#[derive(Debug, Default)]
pub struct PathTally {
    /// Data-out bytes of the WRITEs submitted on the path.
    pub written: AtomicU64,
    /// Commands that failed on the path (refused at submission, or a
    /// transport error or a bad status at completion).
    pub errors: AtomicU64,
    /// Commands that completed well after [`PathTally::failed`] was set.
    pub ok_after_failure: AtomicU64,
    /// Set by the test when it fails one of the member's paths.
    pub failed: AtomicBool,
}

/// A path that counts its traffic in a [`PathTally`]; otherwise the inner
/// transport, untouched.
pub struct Watched {
    inner: Box<dyn Transport>,
    tally: Arc<PathTally>,
}

impl Watched {
    /// `inner`, counted in `tally`.
    pub fn new(inner: Box<dyn Transport>, tally: Arc<PathTally>) -> Watched {
        Watched { inner, tally }
    }
}

fn is_write(cmd: &Command) -> bool {
    cmd.direction == DataDirection::ToDevice
        && matches!(cmd.cdb.opcode(), Opcode::WRITE_10 | Opcode::WRITE_16)
}

impl Transport for Watched {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        let bytes = if is_write(&cmd) {
            cmd.data.len() as u64
        } else {
            0
        };
        let r = self.inner.submit(cmd);
        match &r {
            Ok(()) => {
                self.tally.written.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(_) => {
                self.tally.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let from = out.len();
        let r = self.inner.reap(out, wait);
        for c in &out[from..] {
            let good = matches!(&c.result, Ok(o) if o.check().is_ok());
            if !good {
                self.tally.errors.fetch_add(1, Ordering::Relaxed);
            } else if self.tally.failed.load(Ordering::Relaxed) {
                self.tally.ok_after_failure.fetch_add(1, Ordering::Relaxed);
            }
        }
        if r.is_err() {
            self.tally.errors.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// A file-system backup whose client reaches the block-mode STG's one
/// member (the rig's plain shared LUN) over two paths, one of which fails
/// mid-backup (issue 14): the client's member is a [`Multipath`] over its
/// rig path and `second`; once the client has written a third of the tree
/// through the member, `fail` takes `second` away (on LIO: the LUN
/// unmapped from that tcm_loop port; in-process: the nexus dies). The
/// backup completes through the array (policy `always`: no LAN fallback),
/// and the restore is byte for byte the tree. Checks that the failure came
/// mid-stream: the failed path saw errors, the other carried commands and
/// data after it.
pub fn fs_backup_survives_a_path_failure(
    rig: &Arc<dyn Rig>,
    second: Box<dyn Transport>,
    fail: Box<dyn FnOnce() + Send>,
    tree_bytes: u64,
) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, tree_bytes, 11).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let wkp = free_wkp3();
    format_block_stg(rig);
    let server = block_backup_host(rig, 0, wkp, Policy::Always);

    let (kept, lost) = (
        Arc::new(PathTally::default()),
        Arc::new(PathTally::default()),
    );
    let member = Multipath::open(
        // `second` first: among equally good paths the first carries a
        // command when none is in flight, so the failing path is the
        // busy one.
        vec![
            Box::new(Watched::new(second, Arc::clone(&lost))),
            Box::new(Watched::new(rig.plain(1).unwrap(), Arc::clone(&kept))),
        ],
        RetryPolicy::MAILBOX,
    )
    .unwrap_or_else(|e| panic!("{}: the two-path member: {e}", rig.describe()));
    eprintln!("client member paths: {:?}", member.paths());
    let stg = BlockStg::open(vec![Box::new(member)], 1, BLOCK_STG)
        .unwrap_or_else(|e| panic!("{}: opening block STG as host 1: {e}", rig.describe()));
    let client = host_over(block_source(stg), BLOCK_STG, 1, wkp, Policy::Always);

    // The failure, from its own thread once a third of the tree is written.
    let written = {
        let (kept, lost) = (kept.clone(), lost.clone());
        move || kept.written.load(Ordering::Relaxed) + lost.written.load(Ordering::Relaxed)
    };
    let event = {
        let (kept, lost) = (kept.clone(), lost.clone());
        Box::new(move || {
            kept.failed.store(true, Ordering::Relaxed);
            lost.failed.store(true, Ordering::Relaxed);
            fail();
        })
    };
    let (out, at) = backup_with_event(
        rig,
        (&server, &client, &repo, &src),
        Box::new(written),
        tree_bytes / 3,
        event,
        "the second path failed",
    );
    let total = kept.written.load(Ordering::Relaxed) + lost.written.load(Ordering::Relaxed);
    eprintln!("written {total} bytes; kept path {kept:?}; failed path {lost:?}");
    assert!(
        lost.errors.load(Ordering::Relaxed) >= 1 && lost.written.load(Ordering::Relaxed) > 0,
        "the failed path carried nothing or saw no error: {lost:?}"
    );
    assert!(
        kept.ok_after_failure.load(Ordering::Relaxed) >= 1 && total > at,
        "nothing went over the kept path after the failure: {kept:?}"
    );
    assert_restores_exact(&repo, out.backup_id, &src, tmp.path());
}

/// Runs a full file-system backup of `src` (`hosts`: server, client,
/// repository, source) while a watcher thread runs `event` once
/// `progress()` reaches `at_least`, and checks that it ran mid-backup and
/// that the backup completed through the array. Returns the server's
/// outcome and the progress when the event ran.
fn backup_with_event(
    rig: &Arc<dyn Rig>,
    hosts: (&Host, &Host, &Repo, &std::path::Path),
    progress: Box<dyn Fn() -> u64 + Send>,
    at_least: u64,
    event: Box<dyn FnOnce() + Send>,
    what: &'static str,
) -> (session::Outcome, u64) {
    let (server, client, repo, src) = hosts;
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        thread::spawn(move || -> Option<(u64, Instant)> {
            while progress() < at_least {
                if done.load(Ordering::Relaxed) {
                    return None;
                }
                thread::sleep(Duration::from_millis(2));
            }
            let at = progress();
            let t0 = Instant::now();
            event();
            eprintln!("{what} at {at} bytes ({:?} to do it)", t0.elapsed());
            Some((at, Instant::now()))
        })
    };
    let (out, agent) = full_fs_backup(server, client, repo, src);
    let ended = Instant::now();
    done.store(true, Ordering::Relaxed);
    let fired = watcher.join().unwrap();
    let out = out.unwrap_or_else(|e| panic!("{}: file-system backup: {e:#}", rig.describe()));
    agent.unwrap_or_else(|e| panic!("{}: agent: {e:#}", rig.describe()));
    let (at, happened) = fired.unwrap_or_else(|| panic!("the backup ended before: {what}"));
    eprintln!(
        "{}: backup {} of {} bytes in {:.2} s over {}; {what} {:?} before the end",
        rig.describe(),
        out.backup_id,
        out.bytes,
        out.seconds,
        out.channel,
        ended.saturating_duration_since(happened)
    );
    assert!(happened < ended);
    assert_eq!(out.channel, "stp", "{}", rig.describe());
    (out, at)
}

/// Backup `id` restores to exactly the tree `src` (into `scratch`) and
/// verifies.
fn assert_restores_exact(repo: &Repo, id: i64, src: &std::path::Path, scratch: &std::path::Path) {
    let r = scratch.join("restored");
    repo.restore(id, &r, &[]).unwrap();
    assert_eq!(compare_trees(src, &r).unwrap(), Vec::<String>::new());
    let v = repo.verify(id).unwrap();
    assert!(v.problems.is_empty(), "backup {id}: {:?}", v.problems);
}

/// A vendor-mode file-system backup during which the array restarts
/// (issue 19): once a third of the tree has gone through the array,
/// `restart` runs from a thread of its own (in-process: the array powers on
/// and its mailbox forgets every binding and queued frame; on LIO: the
/// daemon is killed with SIGKILL and started again). Both hosts' streams
/// bind their ports again and retransmit what the array lost
/// (docs/PROTOCOL.md §6.7): the backup completes through the array (policy
/// `always`: no LAN fallback) and restores byte for byte.
pub fn fs_backup_survives_an_array_restart(
    rig: &Arc<dyn Rig>,
    restart: Box<dyn FnOnce() + Send>,
    tree_bytes: u64,
) {
    use stp_core::counters;

    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, tree_bytes, 13).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let wkp = free_wkp3();
    let server = backup_host(rig, 0, wkp, Policy::Always);
    let client = backup_host(rig, 1, wkp, Policy::Always);

    // The process's payload bytes sent since the start: the client's data,
    // and little else in this test's process.
    let before = counters::snapshot();
    let sent = move || counters::snapshot().since(&before).send_payload_bytes;
    let (out, _) = backup_with_event(
        rig,
        (&server, &client, &repo, &src),
        Box::new(sent),
        tree_bytes / 3,
        restart,
        "the array restarted",
    );
    assert_restores_exact(&repo, out.backup_id, &src, tmp.path());
}
