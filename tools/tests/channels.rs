//! Where a backup's bytes went (docs/BACKUP.md §8.1), on the in-process
//! array: the array and LAN columns the catalog records add up to what
//! moved, a fallback moves the bytes into the LAN column, both ends count
//! the same, and catalogs made before the columns existed stay readable.

mod common;

use std::fs;
use std::path::Path;

use common::{fs_job, fs_run, hosts, quiet, serve, stp, LOCAL};
use sim_target::FaultControl;
use stp_tools::backup::demo::make_tree;
use stp_tools::backup::inproc::free_wkp;
use stp_tools::backup::pipe::{Policy, SEGMENT};
use stp_tools::backup::repo::Repo;
use stp_tools::backup::session::{db_backup, Host, Outcome, RunOptions};
use stp_tools::backup::traffic::ChannelUse;
use stp_tools::backup::wire::{DbSource, Level};

/// A full backup of `src` that both ends complete: (server, agent)
/// outcomes.
fn full_backup(
    server: &Host,
    client: &Host,
    repo: &Repo,
    src: &Path,
    agent_opts: RunOptions,
) -> (Outcome, Outcome) {
    let (s, a) = fs_run(server, client, repo, &fs_job(src, Level::Full), agent_opts);
    (s.unwrap(), a.unwrap())
}

/// The stream's own framing on top of the archive: a 4-byte length per
/// segment and a 9-byte acknowledgement back, the end and the verdict.
fn framing(bytes: u64) -> u64 {
    let segments = bytes.div_ceil(SEGMENT as u64) + 1;
    segments * (4 + 9) + 4 + 8 + 32 + 9
}

/// The LAN column is the sum of its kinds, and the catalog holds what the
/// server counted.
fn consistent(repo: &Repo, out: &Outcome) -> ChannelUse {
    let t = out.traffic;
    assert_eq!(
        t.lan_bytes,
        t.lan_control_bytes + t.lan_error_bytes + t.lan_data_bytes,
        "{t:?}"
    );
    let info = repo.get(out.backup_id).unwrap();
    assert_eq!(
        info.traffic,
        Some(t),
        "the catalog holds the server's count"
    );
    t
}

#[test]
fn a_backup_through_the_array_leaves_only_control_on_the_lan() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 4 << 20, 3).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(31, Policy::Preferred, Policy::Preferred, None);
    let (out, agent) = full_backup(&server, &client, &repo, &src, quiet());
    assert_eq!(out.channel, "stp");
    let t = consistent(&repo, &out);
    // Every stream byte crossed the array once, with its framing.
    assert!(t.array_bytes >= out.bytes, "{t:?} for {} bytes", out.bytes);
    assert!(t.array_bytes <= out.bytes + framing(out.bytes), "{t:?}");
    // The LAN carried control (the flows' exchanges, the request, the
    // manifest), nothing of the data.
    assert_eq!(t.lan_data_bytes, 0, "{t:?}");
    assert!(t.lan_control_bytes > 0, "{t:?}");
    assert!(t.lan_percent() < 5.0, "{}", t.summary());
    assert!(t.array_seconds > 0.0 && t.lan_seconds == 0.0, "{t:?}");
    // Both ends saw the same bytes cross.
    assert_eq!(agent.traffic.array_bytes, t.array_bytes);
    assert_eq!(
        agent.traffic.lan_bytes, t.lan_bytes,
        "{:?} vs {t:?}",
        agent.traffic
    );
    assert!(t.summary().contains("through the array"), "{}", t.summary());

    // list shows it, as text and as JSON.
    drop(repo);
    let text = stp(&["backup", "list"], &tmp.path().join("repo"));
    assert!(text.contains("LAN %"), "{text}");
    let json = stp(&["backup", "list", "--json"], &tmp.path().join("repo"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v[0]["traffic"]["array_bytes"].as_u64(),
        Some(t.array_bytes),
        "{json}"
    );
    assert_eq!(
        v[0]["traffic"]["lan_bytes"].as_u64(),
        Some(t.lan_bytes),
        "{json}"
    );
}

#[test]
fn a_fallback_moves_the_bytes_into_the_lan_column() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 6 << 20, 9).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let control = FaultControl::disarmed();
    let (_array, server, client) = hosts(
        32,
        Policy::Preferred,
        Policy::Preferred,
        Some(control.clone()),
    );
    let kill = control.clone();
    let opts = RunOptions {
        quiet: true,
        fail_after: Some((2 << 20, Box::new(move |_, _| kill.kill()))),
    };
    let (out, agent) = full_backup(&server, &client, &repo, &src, opts);
    assert_eq!(out.channel, "stp+tcp");
    let t = consistent(&repo, &out);
    // Part went through the array, the rest (and what was resent) over
    // the LAN: together at least the stream, at most the stream twice.
    assert!(t.lan_data_bytes > 0 && t.array_bytes > 0, "{t:?}");
    assert!(
        t.array_bytes + t.lan_data_bytes >= out.bytes,
        "{t:?} for {}",
        out.bytes
    );
    assert!(
        t.array_bytes + t.lan_data_bytes <= 2 * (out.bytes + framing(out.bytes)),
        "{t:?}"
    );
    assert!(t.lan_seconds > 0.0, "{t:?}");
    // The sender's LAN data count is the receiver's.
    assert_eq!(agent.traffic.lan_data_bytes, t.lan_data_bytes);
}

#[test]
fn a_tcp_only_backup_is_all_lan_and_a_database_backup_all_array() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 2 << 20, 4).unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::open(&repo_dir).unwrap();

    // fallback = "never": no byte through the array.
    let (array, server, client) = hosts(33, Policy::Never, Policy::Never, None);
    let (out, _) = full_backup(&server, &client, &repo, &src, quiet());
    assert_eq!(out.channel, "tcp");
    let t = consistent(&repo, &out);
    assert_eq!((t.array_bytes, t.array_seconds), (0, 0.0), "{t:?}");
    assert!(t.lan_data_bytes >= out.bytes, "{t:?} for {}", out.bytes);
    assert!(
        t.lan_data_bytes <= out.bytes + framing(out.bytes) + 4096,
        "{t:?}"
    );
    assert!(t.lan_percent() > 99.0, "{}", t.summary());

    // The database flow: everything on the one STP connection; the LAN
    // carries the flow's set-up only.
    let wkp = free_wkp().unwrap();
    let server = array.host(0, wkp, Policy::Preferred, None);
    let client = array.host(1, wkp, Policy::Preferred, None);
    let srv = serve(&server, &repo_dir, quiet());
    let c = db_backup(
        &client,
        LOCAL,
        "client",
        "numbers",
        &DbSource::Command {
            command: "seq 1 300000".into(),
        },
        quiet(),
    )
    .unwrap();
    let out = srv.join().expect("the server panicked").unwrap();
    assert_eq!(out.channel, "stp");
    let t = consistent(&repo, &out);
    assert!(t.array_bytes >= out.bytes, "{t:?}");
    assert_eq!(t.lan_data_bytes, 0, "{t:?}");
    assert!(t.lan_bytes < 4096, "{t:?}");
    assert_eq!(c.traffic.array_bytes, t.array_bytes);
}

#[test]
fn a_catalog_from_before_the_columns_stays_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    fs::create_dir_all(&root).unwrap();
    {
        let c = rusqlite::Connection::open(root.join("catalog.sqlite")).unwrap();
        c.execute_batch(
            "CREATE TABLE backups (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, \
             client TEXT NOT NULL, source TEXT NOT NULL, level TEXT NOT NULL, base_id INTEGER, \
             started REAL NOT NULL, finished REAL, status TEXT NOT NULL, \
             bytes INTEGER NOT NULL DEFAULT 0, files INTEGER NOT NULL DEFAULT 0, \
             archive_sha256 TEXT, channel TEXT, fallback_reason TEXT, \
             errors INTEGER NOT NULL DEFAULT 0, message TEXT);
             INSERT INTO backups (kind, client, source, level, started, finished, status, \
             channel) VALUES ('db', 'old', 'command:x:true', 'full', 1.0, 2.0, 'failed', 'stp');",
        )
        .unwrap();
    }
    let repo = Repo::open(&root).unwrap();
    let list = repo.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].traffic, None, "not recorded, not zero");
    drop(repo);
    let text = stp(&["backup", "list"], &root);
    assert!(text.contains("old:command:x:true"), "{text}");
}
