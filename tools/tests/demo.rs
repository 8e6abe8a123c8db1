//! `stp demo` as a user runs it: the binary, on the embedded array.

use std::process::Command;

#[test]
fn demo_backs_up_and_restores_byte_for_byte() {
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args([
            "demo",
            "--json",
            "--tree-bytes",
            "2000000",
            "--bench-bytes",
            "8m",
            "--bench-count",
            "50",
        ])
        .output()
        .expect("running stp demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stp demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("the JSON summary");
    assert_eq!(v["ok"], true, "{stdout}");
    let backups = v["backups"].as_array().expect("backups");
    // The tree in vendor mode, the tree in block mode, the database.
    assert_eq!(backups.len(), 3, "{stdout}");
    assert!(
        backups
            .iter()
            .any(|b| b["what"].as_str().unwrap_or("").contains("block mode")),
        "{stdout}"
    );
    for b in backups {
        assert_eq!(b["channel"], "stp", "{stdout}");
        assert_eq!(b["restored_equal"], true, "{stdout}");
        assert_eq!(b["verified"], true, "{stdout}");
        assert!(b["bytes"].as_u64().unwrap_or(0) > 0, "{stdout}");
        // Where the bytes went: the stream through the array, control
        // only over the LAN.
        let t = &b["traffic"];
        assert!(
            t["array_bytes"].as_u64().unwrap_or(0) >= b["bytes"].as_u64().unwrap_or(u64::MAX),
            "{stdout}"
        );
        assert_eq!(t["lan_data_bytes"].as_u64(), Some(0), "{stdout}");
        assert!(t["lan_bytes"].as_u64().unwrap_or(0) > 0, "{stdout}");
    }
    // The tree back to the client through the array: the stream on the
    // array, nothing of it on the LAN.
    let r = &v["restore"];
    assert_eq!(r["restored_equal"], true, "{stdout}");
    assert_eq!(r["channel"], "stp", "{stdout}");
    assert!(r["restore_id"].as_i64().is_some(), "{stdout}");
    assert!(
        r["traffic"]["array_bytes"].as_u64().unwrap_or(0)
            >= r["bytes"].as_u64().unwrap_or(u64::MAX),
        "{stdout}"
    );
    assert_eq!(r["traffic"]["lan_data_bytes"].as_u64(), Some(0), "{stdout}");
    let total = &v["traffic"];
    assert!(
        total["array_bytes"].as_u64().unwrap_or(0) > total["lan_bytes"].as_u64().unwrap_or(0),
        "{stdout}"
    );
    assert!(
        v["backup_vs_stp_goodput"].as_f64().unwrap_or(0.0) > 0.0,
        "{stdout}"
    );
    assert!(
        v["bench_stp_mb_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{stdout}"
    );
    let vs = &v["bench_vs_tcp"];
    for k in ["goodput", "cpu_s_per_gb", "rtt_p50"] {
        assert!(
            vs[k].as_f64().unwrap_or(0.0) > 0.0,
            "bench_vs_tcp.{k}: {stdout}"
        );
    }
    assert!(
        vs["references"].as_str().unwrap_or("").contains("TCP"),
        "{stdout}"
    );
}

#[test]
fn backup_cli_errors_say_what_to_do() {
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(["backup", "list"])
        .output()
        .expect("running stp backup list");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--repo DIR or --config FILE"), "{err}");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(["backup", "list", "--json", "--repo"])
        .arg(tmp.path().join("repo"))
        .output()
        .expect("running stp backup list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
}

/// The CLI roles as two processes. This machine has no SCSI devices, so
/// under `fallback = "preferred"` the array is unavailable at the start
/// and they use the LAN; the same commands with an STG use the array
/// (docs/BACKUP.md).
#[test]
fn cli_roles_in_two_processes_over_the_lan() {
    use std::fs;
    let tmp = tempfile::tempdir().unwrap();
    let wkp = stp_tools::backup::inproc::free_wkp().unwrap();
    fs::write(tmp.path().join("stp.toml"), format!("wkp = {wkp}\n")).unwrap();
    let repo = tmp.path().join("repo");
    let cfg = tmp.path().join("backup.toml");
    fs::write(
        &cfg,
        format!(
            "stp_config = \"stp.toml\"\nstg = 7\nfallback = \"preferred\"\nbind = \"127.0.0.1\"\n\
             [server]\nrepository = \"{}\"\n[client]\nname = \"cli-client\"\n\
             server = \"127.0.0.1\"\nexcludes = [\"*.tmp\"]\n",
            repo.display()
        ),
    )
    .unwrap();
    let src = tmp.path().join("src");
    stp_tools::backup::demo::make_tree(&src, 1 << 20, 5).unwrap();
    fs::write(src.join("skip.tmp"), b"x").unwrap();
    let stp = env!("CARGO_BIN_EXE_stp");
    let run = |args: &[&str]| {
        let out = Command::new(stp).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "stp {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stp {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    let cfg_s = cfg.to_str().unwrap();
    // A role that waits for one session, in the background.
    let waiting = |role: &[&str]| {
        Command::new(stp)
            .args(["backup"])
            .args(role)
            .args(["--once", "--json", "--config", cfg_s])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The agent waits; the server starts the file-system backup.
    let agent = waiting(&["client", "agent"]);
    let out = run(&[
        "backup",
        "server",
        "fs",
        "--json",
        "--config",
        cfg_s,
        "--client",
        "127.0.0.1",
        "--source",
        src.to_str().unwrap(),
    ]);
    assert!(agent.wait_with_output().unwrap().status.success());
    // No SCSI here: under `preferred` the array is unavailable at the
    // start and the backup goes over the LAN, saying why.
    assert_eq!(out["channel"], "tcp", "{out}");
    let reason = out["fallback_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("unavailable at the start"), "{out}");
    let id = out["backup_id"].as_i64().unwrap().to_string();
    // The server waits; the client starts the database backup.
    let server = waiting(&["server", "serve"]);
    let db = run(&[
        "backup",
        "client",
        "db",
        "--json",
        "--config",
        cfg_s,
        "--name",
        "nums",
        "--from-command",
        "seq 1 5000",
    ]);
    assert!(server.wait_with_output().unwrap().status.success());
    let db_id = db["backup_id"].as_i64().unwrap().to_string();
    let repo_s = repo.to_str().unwrap();
    let list = run(&["backup", "list", "--json", "--repo", repo_s]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let dest = tmp.path().join("restored");
    run(&[
        "backup",
        "restore",
        &id,
        "--json",
        "--repo",
        repo_s,
        "--to",
        dest.to_str().unwrap(),
    ]);
    fs::remove_file(src.join("skip.tmp")).unwrap();
    assert_eq!(
        stp_tools::backup::demo::compare_trees(&src, &dest).unwrap(),
        Vec::<String>::new()
    );
    let dump = tmp.path().join("nums.txt");
    run(&[
        "backup",
        "restore",
        &db_id,
        "--json",
        "--repo",
        repo_s,
        "--to-file",
        dump.to_str().unwrap(),
    ]);
    let want: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    assert_eq!(fs::read_to_string(&dump).unwrap(), want);
    // The client takes the tree back from the server (a LAN session here,
    // for want of SCSI; through the array where there is an STG).
    let server = waiting(&["server", "serve"]);
    let back = tmp.path().join("back");
    let r = run(&[
        "backup",
        "client",
        "restore",
        &id,
        "--json",
        "--config",
        cfg_s,
        "--to",
        back.to_str().unwrap(),
    ]);
    let served = server.wait_with_output().unwrap();
    assert!(served.status.success());
    let served = String::from_utf8_lossy(&served.stdout);
    assert!(served.contains("\"event\":\"restore\""), "{served}");
    assert_eq!(r["channel"], "tcp", "{r}");
    assert!(r["restore_id"].as_i64().is_some(), "{r}");
    assert_eq!(
        stp_tools::backup::demo::compare_trees(&src, &back).unwrap(),
        Vec::<String>::new()
    );
    let restores = run(&["backup", "list", "--restores", "--json", "--repo", repo_s]);
    assert_eq!(restores[0]["status"], "complete", "{restores}");
    assert_eq!(restores[0]["client"], "cli-client", "{restores}");
    assert!(
        restores[0]["traffic"]["lan_data_bytes"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{restores}"
    );
    let v = run(&["backup", "verify", "--all", "--json", "--repo", repo_s]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|r| r["problems"].as_array().unwrap().is_empty()),
        "{v}"
    );
}

/// A backup configuration for two LAN-only processes in `dir`.
fn lan_config(dir: &std::path::Path) -> std::path::PathBuf {
    let wkp = stp_tools::backup::inproc::free_wkp().unwrap();
    std::fs::write(dir.join("stp.toml"), format!("wkp = {wkp}\n")).unwrap();
    let cfg = dir.join("backup.toml");
    std::fs::write(
        &cfg,
        format!(
            "stp_config = \"stp.toml\"\nstg = 7\nfallback = \"never\"\nbind = \"127.0.0.1\"\n\
             [server]\nrepository = \"{}\"\n[client]\nname = \"c\"\nserver = \"127.0.0.1\"\n",
            dir.join("repo").display()
        ),
    )
    .unwrap();
    cfg
}

/// Waits until the repository has a partial archive (a backup is being
/// received).
fn wait_for_partial(repo: &std::path::Path) {
    for _ in 0..3000 {
        let found = std::fs::read_dir(repo.join("archives"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            })
            .unwrap_or(false);
        if found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no backup started");
}

fn list(repo: &std::path::Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(["backup", "list", "--json", "--repo"])
        .arg(repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// SIGKILL of the client, then of the server, in the middle of a backup
/// (the dump command stalls, so the kill always lands mid-stream): the
/// catalog never shows either backup complete and no partial archive
/// survives the next open.
#[test]
fn killed_processes_leave_the_catalog_consistent() {
    use std::process::Stdio;
    let stp = env!("CARGO_BIN_EXE_stp");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = lan_config(tmp.path());
    let repo = tmp.path().join("repo");
    let start = |role: &[&str]| {
        Command::new(stp)
            .args(role)
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stalled = [
        "backup",
        "client",
        "db",
        "--name",
        "d",
        "--from-command",
        "seq 1 10; sleep 5",
    ];

    // The client dies: the server fails the backup and records why.
    let server = start(&["backup", "server", "serve", "--once"]);
    let mut client = start(&stalled);
    wait_for_partial(&repo);
    client.kill().unwrap();
    let _ = client.wait();
    let out = server.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recorded as failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = list(&repo);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["status"], "failed", "{l:?}");

    // The server dies: the row stays 'running' until the next open sweeps
    // it to 'failed' and removes the partial archive.
    let mut server = start(&["backup", "server", "serve", "--once"]);
    let mut client = start(&stalled);
    wait_for_partial(&repo);
    server.kill().unwrap();
    let _ = server.wait();
    client.kill().unwrap();
    let _ = client.wait();
    let l = list(&repo);
    assert_eq!(l.len(), 2);
    assert_eq!(l[1]["status"], "failed", "{l:?}");
    assert!(
        l[1]["message"]
            .as_str()
            .unwrap_or("")
            .contains("interrupted"),
        "{l:?}"
    );
    let left: Vec<_> = std::fs::read_dir(repo.join("archives"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Ctrl-C (SIGINT) of a server mid-backup: it records the backup failed
/// and removes the partial archive itself before exiting.
#[test]
fn ctrl_c_marks_the_backup_failed_at_once() {
    use std::process::Stdio;
    let stp = env!("CARGO_BIN_EXE_stp");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = lan_config(tmp.path());
    let repo = tmp.path().join("repo");
    let server = Command::new(stp)
        .args(["backup", "server", "serve", "--once", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = Command::new(stp)
        .args([
            "backup",
            "client",
            "db",
            "--name",
            "d",
            "--from-command",
            "seq 1 10; sleep 5",
            "--config",
        ])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_partial(&repo);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = server.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    client.kill().unwrap();
    let _ = client.wait();
    let left: Vec<_> = std::fs::read_dir(repo.join("archives"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let l = list(&repo);
    assert_eq!(l[0]["status"], "failed", "{l:?}");
    assert!(
        l[0]["message"].as_str().unwrap_or("").contains("Ctrl-C"),
        "{l:?}"
    );
}

/// `stp probe --json` prints JSON whether or not the host has devices (an
/// empty list when it has none).
#[test]
fn probe_json_is_json_even_without_devices() {
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(["probe", "--json"])
        .output()
        .expect("running stp probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {stdout:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(v.is_array(), "{v}");
}

/// Every `stp …` command the README quotes in a code span parses: the
/// flags it names exist (`--help` is appended, so nothing runs).
#[test]
fn the_readme_commands_parse() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .unwrap()
        .replace('\n', " ");
    let mut checked = 0;
    for span in readme.split('`').skip(1).step_by(2) {
        let Some(rest) = span.strip_prefix("stp ") else {
            continue;
        };
        // Placeholders (`<mode>`, `ID`, `DIR`) and alternatives cannot run.
        if rest.contains(['<', '[', '|'])
            || rest
                .split_whitespace()
                .any(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase()))
        {
            continue;
        }
        let args: Vec<&str> = rest.split_whitespace().collect();
        let out = Command::new(env!("CARGO_BIN_EXE_stp"))
            .args(&args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README's `{span}` does not parse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} commands found");
}

/// Shell completions and manual pages come from the command definition.
#[test]
fn completions_and_manual_pages() {
    let stp = env!("CARGO_BIN_EXE_stp");
    let out = Command::new(stp)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_stp") && script.contains("backup"),
        "{script}"
    );
    let out = Command::new(stp).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH") && page.contains("backup"), "{page}");
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(stp)
        .args(["man", "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = std::fs::read_to_string(tmp.path().join("stp-backup-client-agent.1")).unwrap();
    assert!(list.contains("once"), "{list}");
    assert!(tmp.path().join("stp-backup-forget.1").exists());
}
