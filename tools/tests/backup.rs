//! Backup and restore end to end on the in-process array: both flows, full
//! and incremental, restore, verify, LAN fallback (at the start and
//! mid-stream), damaged archives, interrupted backups, hostile archives.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::thread;

use common::{fs_run, hosts, quiet, serve, stp, LOCAL};
use sim_target::FaultControl;
use stp_tools::backup::archive::{self, ExtractOptions, Kind};
use stp_tools::backup::demo::{check_db, compare_trees, make_tree, LiveDb};
use stp_tools::backup::inproc::{free_wkp, InProcArray};
use stp_tools::backup::pipe::Policy;
use stp_tools::backup::repo::Repo;
use stp_tools::backup::session::{
    db_backup, db_serve, fs_agent, fs_backup, AgentRules, FsJob, Host, RunOptions,
};
use stp_tools::backup::wire::{DbSource, Level};

/// A backup of `src` that leaves out `*.tmp`.
fn job(src: &Path, level: Level) -> FsJob {
    FsJob {
        excludes: vec!["*.tmp".into()],
        ..common::fs_job(src, level)
    }
}

/// A hook that kills every path of `control` (the client's view of the
/// array) once the stream has passed the given offset.
fn kill_hook(control: FaultControl) -> stp_tools::backup::pipe::FailHook {
    Box::new(move |_, _| control.kill())
}

#[test]
fn fs_full_incremental_restore_verify_forget() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 2 << 20, 7).unwrap();
    fs::write(src.join("scratch.tmp"), b"excluded").unwrap();
    // Owners other than the runner's, where the runner may set them.
    if nix::unistd::geteuid().is_root() {
        for p in ["docs/readme.txt", "readme-link", "docs/notes"] {
            std::os::unix::fs::lchown(src.join(p), Some(1234), Some(5678)).unwrap();
        }
    }
    // A socket is the one kind of file not backed up.
    let sock = src.join("a-socket");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(11, Policy::Preferred, Policy::Preferred, None);

    // Full.
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let full = s.unwrap();
    a.unwrap();
    assert_eq!(full.channel, "stp");
    assert_eq!(full.errors, 1, "the socket is reported, the job goes on");
    let info = repo.get(full.backup_id).unwrap();
    assert_eq!(
        (info.status.as_str(), info.level.as_str()),
        ("complete", "full")
    );
    assert_eq!(info.channel.as_deref(), Some("stp"));
    let errors = repo.file_errors(full.backup_id).unwrap();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, "a-socket");
    assert!(errors[0].message.contains("special file"), "{errors:?}");
    let manifest = repo.manifest(full.backup_id).unwrap();
    assert!(manifest.iter().all(|e| e.path != "scratch.tmp"), "excluded");
    assert!(manifest
        .iter()
        .any(|e| e.path == "docs/notes/b.txt" && e.kind == Kind::Hardlink));
    drop(listener);
    fs::remove_file(&sock).unwrap();
    fs::remove_file(src.join("scratch.tmp")).unwrap();

    let r1 = tmp.path().join("r1");
    repo.restore(full.backup_id, &r1, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r1).unwrap(), Vec::<String>::new());
    let v = repo.verify(full.backup_id).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert!(v.files_checked > 20);

    // GNU tar reads the archive and extracts the same tree (it writes the
    // sparse file without holes; everything else matches).
    if Command::new("tar").arg("--version").output().is_ok() {
        let gnu = tmp.path().join("gnu");
        fs::create_dir(&gnu).unwrap();
        let out = Command::new("tar")
            .arg("-xf")
            .arg(repo.archive_path(full.backup_id))
            .arg("-C")
            .arg(&gnu)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let problems: Vec<String> = compare_trees(&src, &gnu)
            .unwrap()
            .into_iter()
            .filter(|p| !p.contains("without holes"))
            .collect();
        assert_eq!(problems, Vec::<String>::new());
    }

    // Changes: new content at the same size, a new file, a deletion, a
    // mode change, and an untouched tree elsewhere.
    let p = src.join("docs/notes/a.txt");
    fs::write(&p, b"0123456789").unwrap();
    archive::set_mtime(&p, 1_000_000_000, 0, false);
    fs::write(src.join("docs/new.txt"), b"new file").unwrap();
    fs::remove_file(src.join("data/small-03.dat")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        src.join("data/small-04.dat"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let (s, a) = fs_run(
        &server,
        &client,
        &repo,
        &job(&src, Level::Incremental),
        quiet(),
    );
    let inc = s.unwrap();
    a.unwrap();
    let info = repo.get(inc.backup_id).unwrap();
    assert_eq!(info.level, "incremental");
    assert_eq!(info.base_id, Some(full.backup_id));
    assert!(
        inc.bytes * 4 < full.bytes,
        "incremental {} vs full {}",
        inc.bytes,
        full.bytes
    );
    let m = repo.manifest(inc.backup_id).unwrap();
    let in_archive: Vec<&str> = m
        .iter()
        .filter(|e| e.kind == Kind::File && e.in_archive)
        .map(|e| e.path.as_str())
        .collect();
    assert!(in_archive.contains(&"docs/new.txt"), "{in_archive:?}");
    assert!(in_archive.contains(&"docs/notes/a.txt"), "{in_archive:?}");
    assert!(
        !in_archive.contains(&"data/blobs/one.bin"),
        "{in_archive:?}"
    );
    assert!(m.iter().all(|e| e.path != "data/small-03.dat"));

    let r2 = tmp.path().join("r2");
    repo.restore(inc.backup_id, &r2, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r2).unwrap(), Vec::<String>::new());
    let v = repo.verify(inc.backup_id).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);

    // Selected paths.
    let r3 = tmp.path().join("r3");
    repo.restore(inc.backup_id, &r3, &["docs/notes".into()])
        .unwrap();
    assert!(r3.join("docs/notes/b.txt").is_file());
    assert!(!r3.join("data").exists());
    assert_eq!(
        fs::read(r3.join("docs/notes/a.txt")).unwrap(),
        b"0123456789"
    );

    // The archive is GNU-tar-readable, if tar is installed.
    if let Ok(out) = Command::new("tar")
        .arg("-tf")
        .arg(repo.archive_path(full.backup_id))
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("data/blobs/one.bin"), "{list}");
    }

    // Forget: the incremental needs its base.
    assert!(repo.forget_keep_last(1).unwrap().is_empty());
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let full2 = s.unwrap();
    a.unwrap();
    let mut gone = repo.forget_keep_last(1).unwrap();
    gone.sort_unstable();
    assert_eq!(gone, vec![full.backup_id, inc.backup_id]);
    assert!(!repo.archive_path(full.backup_id).exists());
    let r4 = tmp.path().join("r4");
    repo.restore(full2.backup_id, &r4, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r4).unwrap(), Vec::<String>::new());
}

#[test]
fn db_live_sqlite_and_from_command() {
    let tmp = tempfile::tempdir().unwrap();
    let live = LiveDb::start(&tmp.path().join("live.sqlite")).unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::open(&repo_dir).unwrap();
    let (_array, server, client) = hosts(12, Policy::Preferred, Policy::Preferred, None);

    let run = |source: DbSource, name: &str| {
        let srv = serve(&server, &repo_dir, quiet());
        let c = db_backup(&client, LOCAL, "client", name, &source, quiet());
        let s = srv.join().expect("the server panicked");
        (s, c)
    };

    // SQLite's online backup while the writer commits.
    let before = live.commits();
    let (s, c) = run(
        DbSource::Sqlite {
            path: live.path.display().to_string(),
        },
        "live",
    );
    let out = s.unwrap();
    c.unwrap();
    assert_eq!(out.channel, "stp");
    assert!(
        live.commits() > before,
        "the writer made no progress during the backup"
    );
    live.stop().unwrap();
    let restored = tmp.path().join("restored.sqlite");
    let mut f = fs::File::create(&restored).unwrap();
    repo.restore_stream(out.backup_id, &mut f).unwrap();
    drop(f);
    assert_eq!(check_db(&restored).unwrap(), Vec::<String>::new());
    assert!(repo.verify(out.backup_id).unwrap().problems.is_empty());

    // Any dump tool's output.
    let (s, c) = run(
        DbSource::Command {
            command: "seq 1 100000".into(),
        },
        "numbers",
    );
    let out = s.unwrap();
    c.unwrap();
    let want: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    let mut got = Vec::new();
    repo.restore_stream(out.backup_id, &mut got).unwrap();
    assert!(got == want.as_bytes(), "the restored dump differs");
    let info = repo.get(out.backup_id).unwrap();
    assert_eq!(info.kind, "db");
    assert!(info.source.contains("seq 1 100000"), "{}", info.source);

    // A failing command fails the backup, recorded as failed.
    let (s, c) = run(
        DbSource::Command {
            command: "echo partial; exit 3".into(),
        },
        "broken",
    );
    let e = c.unwrap_err();
    assert!(format!("{e:#}").contains("failed"), "{e:#}");
    let e = s.unwrap_err();
    assert!(format!("{e:#}").contains("gave up"), "{e:#}");
    let failed = repo.list().unwrap().into_iter().last().unwrap();
    assert_eq!(failed.status, "failed");
    assert!(!repo_dir
        .join(format!("archives/{}.tar.partial", failed.id))
        .exists());
}

#[test]
fn damaged_archive_is_caught_by_verify_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 1 << 20, 8).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(13, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let out = s.unwrap();
    a.unwrap();
    assert!(repo.verify(out.backup_id).unwrap().problems.is_empty());
    // Flip one byte inside the content of data/blobs/one.bin.
    let path = repo.archive_path(out.backup_id);
    let data = fs::read(&path).unwrap();
    let name = b"data/blobs/one.bin";
    let at = data
        .windows(name.len())
        .position(|w| w == name)
        .expect("the entry's header");
    let target = (at / 512 + 1) * 512 + 1000;
    let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(target as u64)).unwrap();
    f.write_all(&[data[target] ^ 0x01]).unwrap();
    drop(f);
    let v = repo.verify(out.backup_id).unwrap();
    assert!(
        v.problems.iter().any(|p| p.contains("data/blobs/one.bin")),
        "{:?}",
        v.problems
    );
    assert!(
        v.problems.iter().any(|p| p.contains("archive's SHA-256")),
        "{:?}",
        v.problems
    );
    let e = repo
        .restore(out.backup_id, &tmp.path().join("r"), &[])
        .unwrap_err();
    assert!(format!("{e:#}").contains("damaged"), "{e:#}");

    // A tampered manifest that points outside the restore is refused
    // before anything is written.
    let mpath = repo
        .root()
        .join(format!("manifests/{}.json", out.backup_id));
    let text = fs::read_to_string(&mpath).unwrap();
    fs::write(
        &mpath,
        text.replace("\"docs/readme.txt\"", "\"../../evil.txt\""),
    )
    .unwrap();
    let dest = tmp.path().join("r2");
    let e = repo.restore(out.backup_id, &dest, &[]).unwrap_err();
    assert!(format!("{e:#}").contains("climbs out"), "{e:#}");
    assert!(!tmp.path().join("evil.txt").exists() && !dest.exists());
}

#[test]
fn fs_falls_back_to_tcp_mid_stream_without_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 6 << 20, 9).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let control = FaultControl::disarmed();
    let (_array, server, client) = hosts(
        14,
        Policy::Preferred,
        Policy::Preferred,
        Some(control.clone()),
    );
    let opts = RunOptions {
        quiet: true,
        fail_after: Some((2 << 20, kill_hook(control.clone()))),
    };
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), opts);
    let out = s.unwrap();
    let agent = a.unwrap();
    assert!(control.died_at().is_some());
    assert_eq!(out.channel, "stp+tcp");
    assert_eq!(agent.channel, "stp+tcp");
    let info = repo.get(out.backup_id).unwrap();
    assert_eq!(info.status, "complete");
    assert_eq!(info.channel.as_deref(), Some("stp+tcp"));
    let reason = info.fallback_reason.unwrap_or_default();
    assert!(!reason.is_empty());
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());
    assert!(repo.verify(out.backup_id).unwrap().problems.is_empty());
}

#[test]
fn db_falls_back_mid_stream_and_policy_always_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::open(&repo_dir).unwrap();
    let want: String = (1..=700_000).map(|i| format!("{i}\n")).collect();
    for (policy, seed) in [(Policy::Preferred, 15u64), (Policy::Always, 16)] {
        let control = FaultControl::disarmed();
        let (_array, server, client) = hosts(seed, policy, policy, Some(control.clone()));
        let srv = serve(&server, &repo_dir, quiet());
        let c = db_backup(
            &client,
            LOCAL,
            "client",
            "numbers",
            &DbSource::Command {
                command: "seq 1 700000".into(),
            },
            RunOptions {
                quiet: true,
                fail_after: Some((1 << 20, kill_hook(control.clone()))),
            },
        );
        let s = srv.join().expect("the server panicked");
        if policy == Policy::Preferred {
            let out = s.unwrap();
            c.unwrap();
            assert_eq!(out.channel, "stp+tcp");
            let mut got = Vec::new();
            repo.restore_stream(out.backup_id, &mut got).unwrap();
            assert!(got == want.as_bytes(), "the restored dump differs");
        } else {
            let e = c.unwrap_err();
            assert!(format!("{e:#}").contains("'always'"), "{e:#}");
            assert!(s.is_err());
            let last = repo.list().unwrap().into_iter().last().unwrap();
            assert_eq!(last.status, "failed");
        }
    }
}

#[test]
fn array_unavailable_at_start_and_policy_never_use_the_lan() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 1 << 20, 10).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let array = InProcArray::new(17).unwrap();

    // The server's paths are down: it says so and uses the LAN.
    let wkp = free_wkp().unwrap();
    let server = array.host_without_array(wkp, Policy::Preferred);
    let client = array.host(1, wkp, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let out = s.unwrap();
    a.unwrap();
    assert_eq!(out.channel, "tcp");
    let info = repo.get(out.backup_id).unwrap();
    assert_eq!(info.channel.as_deref(), Some("tcp"));
    assert!(
        info.fallback_reason
            .as_deref()
            .unwrap_or("")
            .contains("unavailable at the start"),
        "{:?}",
        info.fallback_reason
    );
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());

    // With policy 'always' it refuses instead.
    let wkp = free_wkp().unwrap();
    let server = array.host_without_array(wkp, Policy::Always);
    let e = fs_backup(&server, &repo, &job(&src, Level::Full), quiet()).unwrap_err();
    assert!(format!("{e:#}").contains("'always'"), "{e:#}");

    // Policy 'never' on both sides: TCP only.
    let wkp = free_wkp().unwrap();
    let server = array.host(0, wkp, Policy::Never, None);
    let client = array.host(1, wkp, Policy::Never, None);
    let (s, a) = fs_run(
        &server,
        &client,
        &repo,
        &job(&src, Level::Incremental),
        quiet(),
    );
    assert_eq!(s.unwrap().channel, "tcp");
    a.unwrap();

    // The database flow, client's paths down.
    let wkp = free_wkp().unwrap();
    let server = array.host(0, wkp, Policy::Preferred, None);
    let client = array.host_without_array(wkp, Policy::Preferred);
    let dir = tmp.path().join("repo");
    let run = |client: &Host| {
        let srv = serve(&server, &dir, quiet());
        let c = db_backup(
            client,
            LOCAL,
            "client",
            "n",
            &DbSource::Command {
                command: "seq 1 1000".into(),
            },
            quiet(),
        )
        .unwrap();
        let s = srv.join().unwrap().unwrap();
        (c.channel, s.channel)
    };
    assert_eq!(run(&client), ("tcp".into(), "tcp".into()));
    // The server's wait on WKP ended with the LAN session: the next
    // client gets the array on the same port.
    let client = array.host(1, wkp, Policy::Preferred, None);
    assert_eq!(run(&client), ("stp".into(), "stp".into()));
}

#[test]
fn killed_client_or_server_leaves_the_catalog_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 4 << 20, 12).unwrap();
    let repo_dir = tmp.path().join("repo");
    let repo = Repo::open(&repo_dir).unwrap();

    // The client dies mid-stream: every socket it has closes at once.
    let (_array, server, client) = hosts(18, Policy::Preferred, Policy::Always, None);
    let die: stp_tools::backup::pipe::FailHook = Box::new(|layer, _| {
        for fd in layer.descriptors() {
            let _ = layer.close(fd);
        }
    });
    let opts = RunOptions {
        quiet: true,
        fail_after: Some((1 << 20, die)),
    };
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), opts);
    assert!(a.is_err());
    let e = s.unwrap_err();
    assert!(format!("{e:#}").contains("recorded as failed"), "{e:#}");
    let list = repo.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].status, "failed");
    assert!(fs::read_dir(repo_dir.join("archives"))
        .unwrap()
        .next()
        .is_none());

    // The server dies mid-stream: a running row and a partial archive are
    // left behind, as a crash would leave them.
    let mut pending = repo.begin("fs", "client", "/x", "full", None).unwrap();
    let crashed = pending.id;
    pending.sink().write_all(&[0u8; 4096]).unwrap();
    drop(pending);
    drop(repo);
    let repo = Repo::open(&repo_dir).unwrap();
    let b = repo.get(crashed).unwrap();
    assert_eq!(b.status, "failed");
    assert!(b.message.unwrap_or_default().contains("interrupted"));
    assert!(fs::read_dir(repo_dir.join("archives"))
        .unwrap()
        .next()
        .is_none());
    assert!(repo.manifest(crashed).is_err());

    // The next backup runs normally, and an incremental does not take a
    // failed backup as its base.
    let (_array, server, client) = hosts(19, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(
        &server,
        &client,
        &repo,
        &job(&src, Level::Incremental),
        quiet(),
    );
    let out = s.unwrap();
    a.unwrap();
    let info = repo.get(out.backup_id).unwrap();
    assert_eq!(
        (info.status.as_str(), info.level.as_str()),
        ("complete", "full")
    );
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());
}

/// A tar with raw entry names (the tar crate's builder refuses hostile
/// ones, which is the point).
fn hostile_tar(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, ty, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        if !link.is_empty() {
            h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn hostile_archive_paths_are_refused() {
    use tar::EntryType::{Link, Regular, Symlink};
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let all = |_: &str, _: Kind| true;
    let none = Default::default();
    let none2 = Default::default();
    let opts = ExtractOptions {
        want: &all,
        hashes: &none,
        sparse: &none2,
        owners: false,
    };
    let evil_abs = format!("{}/abs-evil", outside.display());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("absolute", hostile_tar(&[(&evil_abs, Regular, "", b"x")])),
        (
            "dotdot",
            hostile_tar(&[("../outside/evil", Regular, "", b"x")]),
        ),
        (
            "inner dotdot",
            hostile_tar(&[("a/../../outside/evil", Regular, "", b"x")]),
        ),
        (
            "write through a symlink",
            hostile_tar(&[
                ("link", Symlink, outside.to_str().unwrap(), b""),
                ("link/evil", Regular, "", b"x"),
            ]),
        ),
        (
            "hard link outside",
            hostile_tar(&[("h", Link, "../outside/target", b"")]),
        ),
        (
            "device node",
            hostile_tar(&[("dev", tar::EntryType::Char, "", b"")]),
        ),
    ];
    fs::write(outside.join("target"), b"secret").unwrap();
    for (what, tar) in cases {
        let dest = tmp.path().join(format!("dest-{}", what.replace(' ', "-")));
        let r = archive::extract(&tar[..], &dest, &opts);
        assert!(r.is_err(), "{what}: accepted");
        let msg = format!("{:#}", r.unwrap_err());
        assert!(
            msg.contains("refused") || msg.contains("did not create"),
            "{what}: {msg}"
        );
        let names: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("target")],
            "{what}: wrote outside"
        );
    }
    // A benign archive with a symlink still restores, link last.
    let ok = hostile_tar(&[
        ("dir/file", Regular, "", b"hello"),
        ("dir/l", Symlink, "file", b""),
    ]);
    let dest = tmp.path().join("ok");
    archive::extract(&ok[..], &dest, &opts).unwrap();
    assert_eq!(fs::read(dest.join("dir/l")).unwrap(), b"hello");
}

#[test]
fn file_changed_or_unreadable_during_backup_is_reported_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let big = src.join("big.bin");
    fs::write(&big, vec![7u8; 3 << 20]).unwrap();
    fs::write(src.join("small.txt"), b"small").unwrap();
    let locked = src.join("locked.txt");
    fs::write(&locked, b"secret").unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads anything: only an unprivileged run sees the open fail.
    let unreadable = fs::File::open(&locked).is_err();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(20, Policy::Preferred, Policy::Preferred, None);
    // While big.bin is being read (1 MiB into the stream), it shrinks.
    let target = big.clone();
    let shrink: stp_tools::backup::pipe::FailHook = Box::new(move |_, _| {
        fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .unwrap()
            .set_len(100)
            .unwrap();
    });
    let opts = RunOptions {
        quiet: true,
        fail_after: Some((1 << 20, shrink)),
    };
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), opts);
    let out = s.unwrap();
    a.unwrap();
    let errors = repo.file_errors(out.backup_id).unwrap();
    let changed = errors
        .iter()
        .find(|e| e.path == "big.bin")
        .expect("big.bin reported");
    assert!(
        changed.message.contains("changed while it was read"),
        "{errors:?}"
    );
    assert_eq!(errors.len(), 1 + usize::from(unreadable), "{errors:?}");
    // The server's outcome (`server fs --json`) carries them too.
    assert_eq!(out.file_errors, errors);
    let json = serde_json::to_value(&out).unwrap();
    assert_eq!(json["file_errors"][0]["path"], "big.bin", "{json}");
    let m = repo.manifest(out.backup_id).unwrap();
    let e = m.iter().find(|e| e.path == "big.bin").unwrap();
    assert_eq!(e.status, "changed");
    if unreadable {
        let e = m.iter().find(|e| e.path == "locked.txt").unwrap();
        assert_eq!(e.status, "error");
    }
    // The archive stays well formed and verifiable; the other files restore.
    assert!(repo.verify(out.backup_id).unwrap().problems.is_empty());
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    assert_eq!(fs::read(r.join("small.txt")).unwrap(), b"small");
    assert_eq!(fs::metadata(r.join("big.bin")).unwrap().len(), 3 << 20);
}

#[test]
fn gzip_repository_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 1 << 20, 21).unwrap();
    let mut repo = Repo::open(tmp.path().join("repo")).unwrap();
    repo.set_gzip(true);
    let (_array, server, client) = hosts(22, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let full = s.unwrap();
    a.unwrap();
    let path = repo.archive_path(full.backup_id);
    assert!(
        path.to_string_lossy().ends_with(".tar.gz"),
        "{}",
        path.display()
    );
    // Compressed on disk (the sparse file's zeros shrink to nothing).
    assert!(fs::metadata(&path).unwrap().len() < full.bytes / 2);
    if let Ok(out) = Command::new("tar").arg("-tzf").arg(&path).output() {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(src.join("later.txt"), b"later").unwrap();
    let (s, a) = fs_run(
        &server,
        &client,
        &repo,
        &job(&src, Level::Incremental),
        quiet(),
    );
    let inc = s.unwrap();
    a.unwrap();
    for id in [full.backup_id, inc.backup_id] {
        let v = repo.verify(id).unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
    }
    let r = tmp.path().join("r");
    repo.restore(inc.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());
}

#[test]
fn lan_sessions_prove_the_pre_shared_key() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let array = InProcArray::new(23).unwrap();
    let wkp = free_wkp().unwrap();
    let mut server = array.host(0, wkp, Policy::Never, None);
    let client = array.host(1, wkp, Policy::Never, None);
    // The same key: fine.
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    assert_eq!(s.unwrap().channel, "tcp");
    a.unwrap();
    // A server with another key gets nothing, and both sides say why.
    server.psk = Some(b"not the site key".to_vec());
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    for e in [s.unwrap_err(), a.unwrap_err()] {
        let e = format!("{e:#}");
        assert!(e.contains("pre-shared keys differ"), "{e}");
        assert!(!e.contains("version"), "{e}");
    }
    // A server with no key at all, likewise.
    server.psk = None;
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    for e in [s.unwrap_err(), a.unwrap_err()] {
        assert!(format!("{e:#}").contains("pre-shared keys differ"), "{e:#}");
    }
    assert_eq!(repo.list().unwrap().len(), 1, "no backup was started");

    // The server cannot use the array and tells the agent so on WKP (the
    // agent's STP flow sees another string than the well-known one): the
    // keys still differ, and that is what both sides say, not a version
    // mismatch.
    let wkp = free_wkp().unwrap();
    let mut server = array.host_without_array(wkp, Policy::Preferred);
    server.psk = Some(b"not the site key".to_vec());
    let client = array.host(1, wkp, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    for e in [s.unwrap_err(), a.unwrap_err()] {
        let e = format!("{e:#}");
        assert!(e.contains("pre-shared keys differ"), "{e}");
        assert!(!e.contains("version"), "{e}");
    }
}

/// The agent refuses a source that does not exist, one outside its
/// `allow`, and one that is a file: the reason reaches the server over the
/// control connection and is recorded in the catalog.
#[test]
fn the_agents_refusal_reaches_the_server_and_the_catalog() {
    let tmp = tempfile::tempdir().unwrap();
    let allowed = tmp.path().join("allowed");
    let other = tmp.path().join("other");
    fs::create_dir_all(&allowed).unwrap();
    fs::create_dir_all(&other).unwrap();
    fs::write(allowed.join("f"), b"x").unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let rules = AgentRules {
        name: None,
        allowed: vec![allowed.clone()],
        excludes: Vec::new(),
    };
    for (source, why, excludes) in [
        (tmp.path().join("no-such-dir"), "does not exist", vec![]),
        (other.clone(), "outside the directories", vec![]),
        (allowed.join("f"), "not a directory", vec![]),
        (
            allowed.clone(),
            "exclude pattern of",
            vec!["*".repeat(5000)],
        ),
    ] {
        let (_array, server, client) = hosts(31, Policy::Preferred, Policy::Preferred, None);
        let r = rules.clone();
        let agent = thread::spawn(move || fs_agent(&client, &r, quiet()));
        let mut j = job(&source, Level::Full);
        j.excludes.extend(excludes);
        let s = fs_backup(&server, &repo, &j, quiet());
        let a = agent.join().unwrap();
        let a = format!("{:#}", a.unwrap_err());
        assert!(a.contains(why), "{a}");
        let s = format!("{:#}", s.unwrap_err());
        assert!(s.contains("the client refused the backup"), "{s}");
        assert!(s.contains(why), "{s}");
        let last = repo.list().unwrap().into_iter().last().unwrap();
        assert_eq!(last.status, "failed");
        let m = last.message.unwrap_or_default();
        assert!(m.contains(why), "{m}");
        if source == other {
            // The section is `[client]`, the key `allow`.
            assert!(m.contains("`allow` in the [client] section"), "{m}");
        }
    }
}

/// Without `--name`, a file-system backup is recorded under the name the
/// agent is configured with; both ends report the server's measurement.
#[test]
fn fs_backups_take_the_agents_name_and_both_ends_report_one_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 1 << 20, 33).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(34, Policy::Preferred, Policy::Preferred, None);
    let rules = AgentRules {
        name: Some("web1".into()),
        ..AgentRules::default()
    };
    let agent = thread::spawn(move || fs_agent(&client, &rules, quiet()));
    let mut j = job(&src, Level::Full);
    j.client_name = None;
    let s = fs_backup(&server, &repo, &j, quiet()).unwrap();
    let a = agent.join().unwrap().unwrap();
    assert_eq!(repo.get(s.backup_id).unwrap().client, "web1");
    assert_eq!(a.seconds, s.seconds);
    assert_eq!(a.mb_per_s, s.mb_per_s);
    assert!(s.mb_per_s > 0.0);
    // An incremental finds that backup as its base under the same name.
    let (_array, server, client) = hosts(35, Policy::Preferred, Policy::Preferred, None);
    let rules = AgentRules {
        name: Some("web1".into()),
        ..AgentRules::default()
    };
    let agent = thread::spawn(move || fs_agent(&client, &rules, quiet()));
    let mut j = job(&src, Level::Incremental);
    j.client_name = None;
    let inc = fs_backup(&server, &repo, &j, quiet()).unwrap();
    agent.join().unwrap().unwrap();
    let info = repo.get(inc.backup_id).unwrap();
    assert_eq!(info.level, "incremental");
    assert_eq!(info.base_id, Some(s.backup_id));
}

/// A server whose LAN port is held by another process fails at once and
/// leaves nothing behind: no descriptor, and no thread holding WKP.
#[test]
fn db_serve_with_its_lan_port_in_use_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, _client) = hosts(36, Policy::Preferred, Policy::Preferred, None);
    let holder = std::net::TcpListener::bind((LOCAL, server.wkp + 2)).unwrap();
    let e = db_serve(&server, &repo, quiet()).unwrap_err();
    assert!(stp_tools::backup::daemon::is_addr_in_use(&e), "{e:#}");
    assert_eq!(server.layer.descriptors(), Vec::new());
    // WKP is free at once: no session thread was left waiting on it.
    std::net::TcpListener::bind((LOCAL, server.wkp)).expect("WKP is still held");
    drop(holder);
}

/// A database committing as fast as it can is still snapshotted: the copy
/// takes one read transaction, where a page-by-page copy would restart
/// after every commit and never finish on a slow machine.
#[test]
fn snapshot_of_a_database_under_constant_writes_finishes() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    const ROWS: i64 = 16_000;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("hot.sqlite");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL);")
        .unwrap();
    let tx = c.unchecked_transaction().unwrap();
    for _ in 0..ROWS {
        tx.execute("INSERT INTO t (body) VALUES (zeroblob(1000))", [])
            .unwrap();
    }
    tx.commit().unwrap();
    drop(c);
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, commits, path) = (Arc::clone(&stop), Arc::clone(&commits), path.clone());
        thread::spawn(move || {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.busy_timeout(Duration::from_secs(30)).unwrap();
            while !stop.load(Ordering::Acquire) {
                c.execute("INSERT INTO t (body) VALUES (zeroblob(100))", [])
                    .unwrap();
                commits.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while commits.load(Ordering::Relaxed) < 100 {
        thread::sleep(Duration::from_millis(1));
    }
    let (done, finished) = mpsc::channel();
    let p = path.clone();
    thread::spawn(move || {
        let _ = done.send(
            stp_tools::backup::session::sqlite_snapshot(&p).map(|(dir, file)| {
                let n: i64 = rusqlite::Connection::open(&file)
                    .unwrap()
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap();
                drop(dir);
                n
            }),
        );
    });
    let got = finished.recv_timeout(Duration::from_secs(120));
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    let rows = got
        .expect("the snapshot never finished while the database was being written")
        .unwrap();
    assert!(
        rows >= ROWS,
        "the snapshot has {rows} rows, fewer than before the writer started"
    );
}

/// The repository holds copies of private files: directories 0700, files
/// 0600.
#[test]
fn the_repository_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 1 << 18, 40).unwrap();
    let root = tmp.path().join("new").join("repo");
    let repo = Repo::open(&root).unwrap();
    let (_array, server, client) = hosts(41, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let id = s.unwrap().backup_id;
    a.unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in [root.clone(), root.join("archives"), root.join("manifests")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in [
        repo.archive_path(id),
        root.join("manifests").join(format!("{id}.json")),
        root.join("catalog.sqlite"),
        root.join("lock"),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// A restore that fails on a file (its hash differs) leaves the file that
/// was there untouched, and no temporary file behind.
#[test]
fn a_failed_restore_leaves_the_existing_file_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("f"), b"the good old content").unwrap();
    let tar = hostile_tar(&[("f", tar::EntryType::Regular, "", b"damaged")]);
    let all = |_: &str, _: Kind| true;
    let hashes = std::collections::HashMap::from([("f".to_owned(), "00".repeat(32))]);
    let none = Default::default();
    let opts = ExtractOptions {
        want: &all,
        hashes: &hashes,
        sparse: &none,
        owners: false,
    };
    let e = archive::extract(&tar[..], &dest, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("differs"), "{e:#}");
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"the good old content");
    let names: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    // A good restore replaces it.
    let good = hostile_tar(&[("f", tar::EntryType::Regular, "", b"new")]);
    let opts = ExtractOptions {
        hashes: &Default::default(),
        ..opts
    };
    archive::extract(&good[..], &dest, &opts).unwrap();
    assert_eq!(fs::read(dest.join("f")).unwrap(), b"new");
}

/// `list` shows when each backup started and escapes control characters
/// in names; `forget --dry-run` says what it would remove and removes
/// nothing.
#[test]
fn list_shows_dates_and_escapes_names_and_forget_can_dry_run() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("evil\nname\x1b[31m"), b"x").unwrap();
    let root = tmp.path().join("repo");
    let repo = Repo::open(&root).unwrap();
    let mut ids = Vec::new();
    for seed in [42, 43] {
        let (_array, server, client) = hosts(seed, Policy::Preferred, Policy::Preferred, None);
        let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
        ids.push(s.unwrap().backup_id);
        a.unwrap();
    }
    drop(repo);
    let list = stp(&["backup", "list"], &root);
    let today = stp_tools::backup::cli::utc(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64(),
    );
    assert!(list.contains(&today[..10]), "no date in:\n{list}");
    let files = stp(&["backup", "list", "--files", &ids[0].to_string()], &root);
    assert!(files.contains("evil\\nname\\u{1b}[31m"), "{files}");
    assert!(!files.contains('\x1b'), "{files:?}");
    assert_eq!(files.lines().count(), 1, "one line per file: {files}");

    let dry = stp(
        &["backup", "forget", "--keep-last", "1", "--dry-run"],
        &root,
    );
    assert!(
        dry.contains("would forget") && dry.contains(&ids[0].to_string()),
        "{dry}"
    );
    assert_eq!(Repo::open(&root).unwrap().list().unwrap().len(), 2);
    stp(&["backup", "forget", "--keep-last", "1"], &root);
    assert_eq!(Repo::open(&root).unwrap().list().unwrap().len(), 1);
}

/// FIFOs are backed up and restored as FIFOs (GNU tar stores them too),
/// and a whole-tree restore gives the target directory the source root's
/// mode and modification time.
#[test]
fn fifos_and_the_roots_metadata_come_back() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    nix::unistd::mkfifo(
        &src.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o750)).unwrap();
    archive::set_mtime(&src, 1_000_000_000, 0, false);
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(44, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let out = s.unwrap();
    a.unwrap();
    assert_eq!(out.errors, 0, "{:?}", repo.file_errors(out.backup_id));
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    let p = fs::symlink_metadata(r.join("pipe")).unwrap();
    assert!(p.file_type().is_fifo(), "{p:?}");
    assert_eq!(p.mode() & 0o777, 0o640);
    let root = fs::metadata(&r).unwrap();
    assert_eq!(root.mtime(), 1_000_000_000);
    assert_eq!(root.mode() & 0o777, 0o750);
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());
    assert!(repo.verify(out.backup_id).unwrap().problems.is_empty());
    // A restore of some paths leaves the target's own metadata alone.
    let r2 = tmp.path().join("r2");
    repo.restore(out.backup_id, &r2, &["f".into()]).unwrap();
    assert_ne!(fs::metadata(&r2).unwrap().mtime(), 1_000_000_000);
}

/// A sparse file whose holes are small (12 KiB between 4 KiB pieces of
/// data) is restored with its holes.
#[test]
fn small_holes_are_restored_as_holes() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let len = 2u64 << 20;
    let mut f = fs::File::create(src.join("holes.img")).unwrap();
    f.set_len(len).unwrap();
    for off in (0..len).step_by(16 << 10) {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&[0x5A; 4096]).unwrap();
    }
    drop(f);
    let m = fs::metadata(src.join("holes.img")).unwrap();
    if m.blocks() * 512 >= len {
        eprintln!("this file system keeps no holes; nothing to check");
        return;
    }
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(45, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let out = s.unwrap();
    a.unwrap();
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    let got = fs::metadata(r.join("holes.img")).unwrap();
    assert_eq!(
        fs::read(r.join("holes.img")).unwrap(),
        fs::read(src.join("holes.img")).unwrap()
    );
    assert!(
        got.blocks() * 512 <= m.blocks() * 512 + (64 << 10),
        "restored with {} bytes allocated, the source has {}",
        got.blocks() * 512,
        m.blocks() * 512
    );
}

/// Names that are not UTF-8 (files, directories, link targets, hard
/// links) are backed up as their bytes and restored byte for byte; GNU
/// tar reads them too.
#[test]
fn names_that_are_not_utf8_are_backed_up_as_bytes() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let odd_dir = src.join(OsStr::from_bytes(b"d\xff"));
    fs::create_dir_all(&odd_dir).unwrap();
    let latin1 = OsStr::from_bytes(b"caf\xe9.txt");
    fs::write(odd_dir.join(latin1), b"latin-1 name").unwrap();
    fs::write(src.join("plain"), b"plain").unwrap();
    fs::hard_link(
        odd_dir.join(latin1),
        src.join(OsStr::from_bytes(b"link\xfe")),
    )
    .unwrap();
    std::os::unix::fs::symlink(OsStr::from_bytes(b"to\xe9"), src.join("sym")).unwrap();
    let repo = Repo::open(tmp.path().join("repo")).unwrap();
    let (_array, server, client) = hosts(46, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(&server, &client, &repo, &job(&src, Level::Full), quiet());
    let out = s.unwrap();
    a.unwrap();
    assert_eq!(out.errors, 0, "{:?}", out.file_errors);
    let r = tmp.path().join("r");
    repo.restore(out.backup_id, &r, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r).unwrap(), Vec::<String>::new());
    assert!(repo.verify(out.backup_id).unwrap().problems.is_empty());
    // A selected path in its key form restores just that directory.
    let key = archive::name_key(b"d\xff");
    let r2 = tmp.path().join("r2");
    repo.restore(out.backup_id, &r2, &[key]).unwrap();
    assert_eq!(
        fs::read(r2.join(OsStr::from_bytes(b"d\xff/caf\xe9.txt"))).unwrap(),
        b"latin-1 name"
    );
    // An incremental sees the unchanged files as unchanged.
    let (_array, server, client) = hosts(47, Policy::Preferred, Policy::Preferred, None);
    let (s, a) = fs_run(
        &server,
        &client,
        &repo,
        &job(&src, Level::Incremental),
        quiet(),
    );
    let inc = s.unwrap();
    a.unwrap();
    let m = repo.manifest(inc.backup_id).unwrap();
    assert!(
        m.iter()
            .filter(|e| e.kind == Kind::File)
            .all(|e| !e.in_archive),
        "{m:?}"
    );
    let r3 = tmp.path().join("r3");
    repo.restore(inc.backup_id, &r3, &[]).unwrap();
    assert_eq!(compare_trees(&src, &r3).unwrap(), Vec::<String>::new());
    // `list --files` shows the bytes as escapes.
    let files = stp(
        &["backup", "list", "--files", &out.backup_id.to_string()],
        repo.root(),
    );
    assert!(files.contains("d\\xff/caf\\xe9.txt"), "{files}");
    // GNU tar extracts the same names.
    if Command::new("tar").arg("--version").output().is_ok() {
        let gnu = tmp.path().join("gnu");
        fs::create_dir(&gnu).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(repo.archive_path(out.backup_id))
            .arg("-C")
            .arg(&gnu)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            fs::read(gnu.join(OsStr::from_bytes(b"d\xff/caf\xe9.txt"))).unwrap(),
            b"latin-1 name"
        );
    }
}
