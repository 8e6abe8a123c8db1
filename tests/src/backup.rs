//! Backup and restore bodies over a [`Rig`]: the application's two flows
//! end to end. The in-process suite (`tests/backup.rs`) and the real-LIO
//! suite (`tests/lio.rs`) run the same body.

use std::collections::HashMap;
use std::fs;
use std::net::IpAddr;
use std::sync::Arc;
use std::thread;

use rand::rngs::StdRng;
use rand::SeedableRng;
use stp_core::block::{format, BlockStg};
use stp_core::stg::{block_source, MailboxMode};
use stp_core::stream::PathSource;

use stp_core::sockets::SocketLayer;
use stp_tools::backup::demo::{check_db, compare_trees, make_tree, LiveDb};
use stp_tools::backup::pipe::Policy;
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

/// A free TCP port with the next two free (WKP, WKP+1, WKP+2).
pub fn free_wkp3() -> u16 {
    stp_tools::backup::inproc::free_wkp().unwrap()
}

/// Host 0 is the backup server, host 1 the client: a full and an
/// incremental file-system backup of a `tree_bytes` tree, restored and
/// compared; a live SQLite database backed up while written, restored and
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
