//! Restores to another host through the array (docs/BACKUP.md §2, §7,
//! §8.1), on the in-process array: host 1 asks host 0's server for a
//! backup and writes it as it arrives. Exact through the array, with the
//! catalog's per-channel counts; a mid-stream fallback moves the bytes to
//! the LAN column; a hostile or truncated stream from the server fails
//! cleanly, leaving nothing half-written; peers of another version are
//! refused with an error that says so.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread;

use common::{fs_job, fs_run, hosts, quiet, serve, stp, LOCAL};
use sim_target::FaultControl;
use stp_core::flows::{db_server_accept, DbSession};
use stp_tools::backup::archive::{Kind, ManifestEntry};
use stp_tools::backup::demo::{compare_trees, make_tree};
use stp_tools::backup::inproc::{free_wkp, InProcArray};
use stp_tools::backup::pipe::{PipeSender, Policy};
use stp_tools::backup::progress::Progress;
use stp_tools::backup::remote::{restore_from_server, RestoreJob};
use stp_tools::backup::repo::Repo;
use stp_tools::backup::session::{Host, Outcome, RunOptions};
use stp_tools::backup::wire::{self, Level, Msg, RESTORE_VERSION};

/// Backs `src` up from `client` to `server`'s `repo`: the server's
/// outcome.
fn backup(server: &Host, client: &Host, repo: &Repo, src: &Path, level: Level) -> Outcome {
    let (s, a) = fs_run(server, client, repo, &fs_job(src, level), quiet());
    a.unwrap();
    s.unwrap()
}

/// A tree of `bytes` made from `seed` at `dir/src`, backed up in full from
/// `client` to `server`'s repository at `dir/repo`: the tree's path and
/// the server's outcome.
fn backed_up(
    dir: &Path,
    bytes: u64,
    seed: u64,
    server: &Host,
    client: &Host,
) -> (PathBuf, Outcome) {
    let src = dir.join("src");
    make_tree(&src, bytes, seed).unwrap();
    let repo = Repo::open(dir.join("repo")).unwrap();
    let full = backup(server, client, &repo, &src, Level::Full);
    (src, full)
}

fn job(id: i64, paths: &[&str]) -> RestoreJob {
    RestoreJob {
        server: LOCAL,
        client_name: "restorer".into(),
        backup_id: id,
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

/// A restore: the server (`serve` on a thread, with `server_opts`) and the
/// client here. Returns (server, client) outcomes.
fn restore(
    server: &Host,
    client: &Host,
    repo_dir: &Path,
    job: &RestoreJob,
    dest: &Path,
    server_opts: RunOptions,
) -> (anyhow::Result<Outcome>, anyhow::Result<Outcome>) {
    let srv = serve(server, repo_dir, server_opts);
    let c = restore_from_server(client, job, dest, quiet());
    (srv.join().expect("the server panicked"), c)
}

/// Backup `id`, restored whole from `dir/repo` into `dir/elsewhere`, is
/// `src` exactly: the (server, client) outcomes.
fn restore_exact(
    server: &Host,
    client: &Host,
    dir: &Path,
    id: i64,
    src: &Path,
    server_opts: RunOptions,
) -> (Outcome, Outcome) {
    let dest = dir.join("elsewhere");
    let (s, c) = restore(
        server,
        client,
        &dir.join("repo"),
        &job(id, &[]),
        &dest,
        server_opts,
    );
    let (s, c) = (s.unwrap(), c.unwrap());
    assert_eq!(compare_trees(src, &dest).unwrap(), Vec::<String>::new());
    (s, c)
}

/// No temporary restore file is left anywhere under `dir`.
fn no_temporaries(dir: &Path) {
    if !dir.exists() {
        return;
    }
    for e in walk(dir) {
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.contains(".stp-restore-"),
            "left behind: {}",
            e.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.symlink_metadata().unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn a_restore_to_another_host_comes_back_through_the_array_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let (_array, server, client) = hosts(51, Policy::Always, Policy::Always, None);
    let (src, full) = backed_up(tmp.path(), 4 << 20, 21, &server, &client);
    let repo_dir = tmp.path().join("repo");
    // An incremental: unchanged files come from the full backup's archive,
    // in the same stream.
    fs::write(src.join("docs/added.txt"), b"after the full backup").unwrap();
    let repo = Repo::open(&repo_dir).unwrap();
    let inc = backup(&server, &client, &repo, &src, Level::Incremental);
    drop(repo);

    let (s, c) = restore_exact(&server, &client, tmp.path(), inc.backup_id, &src, quiet());
    no_temporaries(&tmp.path().join("elsewhere"));
    assert_eq!((s.channel.as_str(), c.channel.as_str()), ("stp", "stp"));
    assert_eq!(s.restore_id, c.restore_id);
    assert_eq!(s.seconds, c.seconds, "both ends report the server's figure");
    // The stream crossed the array; the LAN carried the flow's set-up only.
    let t = s.traffic;
    assert!(
        t.array_bytes >= s.bytes && s.bytes > 0,
        "{t:?} for {}",
        s.bytes
    );
    assert_eq!(t.lan_data_bytes, 0, "{t:?}");
    assert!(t.lan_bytes < 4096, "{t:?}");
    assert_eq!(
        c.traffic.array_bytes, t.array_bytes,
        "both ends count alike"
    );
    assert!(t.array_seconds > 0.0 && t.lan_seconds == 0.0, "{t:?}");

    // The catalog holds the restore and the server's count.
    let repo = Repo::open(&repo_dir).unwrap();
    let r = repo.restores().unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].id, s.restore_id.unwrap());
    assert_eq!(
        (r[0].status.as_str(), r[0].backup_id),
        ("complete", inc.backup_id)
    );
    assert_eq!(
        (r[0].client.as_str(), r[0].channel.as_deref()),
        ("restorer", Some("stp"))
    );
    assert_eq!(r[0].traffic, Some(t));
    assert_eq!(r[0].files as u64, c.files);
    drop(repo);
    let json = stp(&["backup", "list", "--restores", "--json"], &repo_dir);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v[0]["traffic"]["array_bytes"].as_u64(),
        Some(t.array_bytes),
        "{json}"
    );
    assert_eq!(v[0]["status"], "complete", "{json}");
    let text = stp(&["backup", "list", "--restores"], &repo_dir);
    assert!(
        text.contains("restorer:") && text.contains("complete"),
        "{text}"
    );

    // Some paths only: what is under them, and nothing else.
    let part = tmp.path().join("part");
    let (s, c) = restore(
        &server,
        &client,
        &repo_dir,
        &job(full.backup_id, &["docs/notes"]),
        &part,
        quiet(),
    );
    s.unwrap();
    c.unwrap();
    assert_eq!(
        fs::read(part.join("docs/notes/b.txt")).unwrap(),
        fs::read(src.join("docs/notes/b.txt")).unwrap()
    );
    assert!(!part.join("data").exists() && !part.join("docs/readme.txt").exists());
}

#[test]
fn a_restore_falls_back_to_the_lan_mid_stream_and_the_lan_column_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let array = InProcArray::new(52).unwrap();
    let control = FaultControl::disarmed();
    let wkp = free_wkp().unwrap();
    // The server's paths go through a fault injector the hook kills.
    let server = array.host(0, wkp, Policy::Preferred, Some(control.clone()));
    let client = array.host(1, wkp, Policy::Preferred, None);
    let (src, full) = backed_up(tmp.path(), 6 << 20, 22, &server, &client);
    let kill = control.clone();
    let opts = RunOptions {
        quiet: true,
        fail_after: Some((2 << 20, Box::new(move |_, _| kill.kill()))),
    };
    let (s, c) = restore_exact(&server, &client, tmp.path(), full.backup_id, &src, opts);
    assert_eq!(
        (s.channel.as_str(), c.channel.as_str()),
        ("stp+tcp", "stp+tcp")
    );
    assert!(s.fallback_reason.is_some());
    let t = s.traffic;
    assert!(t.array_bytes > 0 && t.lan_data_bytes > 0, "{t:?}");
    assert!(
        t.array_bytes + t.lan_data_bytes >= s.bytes,
        "{t:?} for {}",
        s.bytes
    );
    assert!(t.lan_seconds > 0.0, "{t:?}");
    assert_eq!(c.traffic.lan_data_bytes, t.lan_data_bytes);
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let r = &repo.restores().unwrap()[0];
    assert_eq!(r.channel.as_deref(), Some("stp+tcp"));
    assert_eq!(r.traffic, Some(t));
    assert!(r.fallback_reason.is_some());
}

#[test]
fn a_restore_under_never_is_all_lan() {
    let tmp = tempfile::tempdir().unwrap();
    let (_array, server, client) = hosts(53, Policy::Never, Policy::Never, None);
    let (src, full) = backed_up(tmp.path(), 2 << 20, 23, &server, &client);
    let (s, _) = restore_exact(&server, &client, tmp.path(), full.backup_id, &src, quiet());
    assert_eq!(s.channel, "tcp");
    let t = s.traffic;
    assert_eq!(t.array_bytes, 0, "{t:?}");
    assert!(t.lan_data_bytes >= s.bytes, "{t:?} for {}", s.bytes);
}

/// The server's end of one client-initiated session on `h`, for a server
/// played by hand.
fn accept(h: &Host) -> DbSession {
    db_server_accept(
        &h.layer,
        h.bind_ip,
        h.wkp,
        h.stg,
        h.stg_len,
        h.psk.as_deref(),
        h.timeout,
    )
    .unwrap()
}

/// A server that answers a restore request by hand: `entries` as the
/// manifest, then `stream` as the data, through a real pipe (or, with
/// `cut`, only the first `cut` bytes of it, then the connection closes).
fn fake_server(
    server: Host,
    entries: Vec<ManifestEntry>,
    stream: Vec<u8>,
    cut: Option<usize>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let h = &server;
        let s = accept(h);
        let layer = &*h.layer;
        match wire::recv::<Msg>(layer, s.data, "the request").unwrap() {
            Msg::RestoreRequest { .. } => {}
            other => panic!("expected a restore request, got {}", other.name()),
        }
        wire::send(
            layer,
            s.data,
            &Msg::RestoreAccept {
                version: RESTORE_VERSION,
                restore_id: 1,
                backup_id: 7,
                entries,
                whole: true,
                bytes: stream.len() as u64,
            },
        )
        .unwrap();
        let mut tx = PipeSender::new(layer, s.data, None, Policy::Always, 1, Progress::hidden());
        match cut {
            Some(n) => {
                let _ = tx.write_all(&stream[..n]);
                let _ = layer.flush(s.data);
                // Gone mid-stream, without the end of the stream.
                wire::close_quietly(layer, s.data);
            }
            None => {
                tx.write_all(&stream).unwrap();
                // The client may give up before the end.
                if let Ok(r) = tx.finish() {
                    let _ = wire::recv_opt::<Msg>(layer, r.fd);
                    wire::close_quietly(layer, r.fd);
                }
            }
        }
    })
}

fn file_entry(path: &str, data: &[u8]) -> ManifestEntry {
    use sha2::{Digest, Sha256};
    ManifestEntry {
        path: path.into(),
        kind: Kind::File,
        size: data.len() as u64,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        ctime: 0,
        ino: 0,
        sha256: Some(hex::encode(Sha256::digest(data))),
        link: None,
        sparse: false,
        in_archive: true,
        from_backup: None,
        status: "ok".into(),
    }
}

/// A tar with raw entry names (the tar crate's builder refuses hostile
/// ones, which is the point).
fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Runs a restore from a fake server; returns the client's error.
fn restore_from_fake(
    seed: u64,
    entries: Vec<ManifestEntry>,
    stream: Vec<u8>,
    cut: Option<usize>,
    dest: &Path,
) -> String {
    let (_array, server, client) = hosts(seed, Policy::Always, Policy::Always, None);
    let srv = fake_server(server, entries, stream, cut);
    let e = restore_from_server(&client, &job(7, &[]), dest, quiet()).unwrap_err();
    srv.join().unwrap();
    format!("{e:#}")
}

#[test]
fn a_hostile_stream_is_refused_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir_all(&dest).unwrap();
    fs::write(dest.join("a.txt"), b"the file that was there").unwrap();

    // An entry that climbs out of the destination.
    let e = restore_from_fake(
        61,
        vec![file_entry("a.txt", b"new")],
        raw_tar(&[("../escaped.txt", b"evil")]),
        None,
        &dest,
    );
    assert!(e.contains("'..'"), "{e}");
    assert!(!tmp.path().join("escaped.txt").exists());

    // Content that is not what the manifest says.
    let e = restore_from_fake(
        62,
        vec![file_entry("a.txt", b"what the manifest says")],
        raw_tar(&[("a.txt", b"something else")]),
        None,
        &dest,
    );
    assert!(e.contains("SHA-256"), "{e}");
    assert_eq!(
        fs::read(dest.join("a.txt")).unwrap(),
        b"the file that was there"
    );

    // A stream that lacks a file the restore names.
    let e = restore_from_fake(
        63,
        vec![file_entry("a.txt", b"x"), file_entry("b.txt", b"y")],
        raw_tar(&[("a.txt", b"x")]),
        None,
        &tmp.path().join("other"),
    );
    assert!(e.contains("1 of the 2 files"), "{e}");

    // The stream ends in the middle (the server is gone; `always`: no
    // fallback to wait for).
    let big = vec![7u8; 3 << 20];
    let e = restore_from_fake(
        64,
        vec![file_entry("big.bin", &big)],
        raw_tar(&[("big.bin", &big)]),
        Some((3 << 20) / 2),
        &dest,
    );
    assert!(e.contains("always") || e.contains("receiving data"), "{e}");
    assert!(!dest.join("big.bin").exists());
    no_temporaries(&dest);
    assert_eq!(
        fs::read(dest.join("a.txt")).unwrap(),
        b"the file that was there"
    );
}

#[test]
fn peers_of_another_version_are_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (_array, server, client) = hosts(65, Policy::Always, Policy::Always, None);
    let repo_dir = tmp.path().join("repo");

    // A client of another restore version: the server refuses, naming both.
    let srv = serve(&server, &repo_dir, quiet());
    let c = &client;
    let conn =
        stp_core::flows::db_client_connect(&c.layer, LOCAL, c.wkp, c.psk.as_deref(), c.timeout)
            .unwrap();
    wire::send(
        &c.layer,
        conn.data,
        &Msg::RestoreRequest {
            version: RESTORE_VERSION + 1,
            backup_id: 1,
            paths: Vec::new(),
            client: "future".into(),
            to: "/tmp/x".into(),
            fallback_port: 0,
        },
    )
    .unwrap();
    let answer = wire::recv::<Msg>(&c.layer, conn.data, "the answer").unwrap();
    let Msg::Refused { message } = answer else {
        panic!("expected a refusal, got {}", answer.name())
    };
    assert!(
        message.contains(&format!("version {}", RESTORE_VERSION + 1))
            && message.contains(&format!("speaks {RESTORE_VERSION}")),
        "{message}"
    );
    let e = srv.join().unwrap().unwrap_err();
    assert!(format!("{e:#}").contains("same stp version"), "{e:#}");
    wire::close_quietly(&c.layer, conn.data);

    // A server from before restores through the array: it takes the
    // request for a malformed message and closes.
    let s = server.clone();
    let old = thread::spawn(move || {
        let h = &s;
        let sess = accept(h);
        let mut len = [0u8; 4];
        h.layer.recv_exact(sess.data, &mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        h.layer.recv_exact(sess.data, &mut body).unwrap();
        let _ = h.layer.flush(sess.data);
        wire::close_quietly(&h.layer, sess.data);
    });
    let e = restore_from_server(&client, &job(1, &[]), &tmp.path().join("d"), quiet()).unwrap_err();
    old.join().unwrap();
    assert!(
        format!("{e:#}").contains("upgrade stp on the server"),
        "{e:#}"
    );

    // A backup that does not exist: refused, and the client says so.
    let srv = serve(&server, &repo_dir, quiet());
    let e =
        restore_from_server(&client, &job(99, &[]), &tmp.path().join("d"), quiet()).unwrap_err();
    assert!(
        format!("{e:#}").contains("refused the restore: no backup 99"),
        "{e:#}"
    );
    assert!(srv.join().unwrap().is_err());
}
