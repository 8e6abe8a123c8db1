//! The two daemons as a user starts them: what they print at start, and
//! what they do when a port they need is held by another process.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A LAN-capable configuration (`preferred`; this machine has no SCSI, so
/// the array is unavailable) on a free WKP.
fn config(dir: &Path) -> (PathBuf, u16) {
    let wkp = stp_tools::backup::inproc::free_wkp().unwrap();
    std::fs::write(dir.join("stp.toml"), format!("wkp = {wkp}\n")).unwrap();
    let cfg = dir.join("backup.toml");
    std::fs::write(
        &cfg,
        format!(
            "stp_config = \"stp.toml\"\nstg = 7\nbind = \"127.0.0.1\"\ntimeout_ms = 2000\n\
             [server]\nrepository = \"{}\"\n[client]\nname = \"c\"\nserver = \"127.0.0.1\"\n",
            dir.join("repo").display()
        ),
    )
    .unwrap();
    (cfg, wkp)
}

fn start(role: &[&str], cfg: &Path, json: bool) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stp"));
    c.args(role).arg("--config").arg(cfg);
    if json {
        c.arg("--json");
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for the daemon to exit; a daemon that is still running after a
/// minute has not stopped (it loops), and is killed.
fn wait_exit(mut child: Child) -> (Option<i32>, String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the daemon did not stop; stderr starts: {}",
                String::from_utf8_lossy(&out.stderr[..out.stderr.len().min(2000)])
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Another process holds a port: each daemon stops at once, non-zero,
/// naming the port and what to do, instead of spinning.
#[test]
fn a_port_in_use_stops_each_daemon_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, wkp) = config(tmp.path());
    for (role, held) in [
        (&["backup", "server", "serve"][..], wkp + 2),
        (&["backup", "server", "serve"][..], wkp),
        (&["backup", "client", "agent"][..], wkp + 1),
        (&["backup", "client", "agent"][..], wkp + 2),
    ] {
        let _holder = TcpListener::bind(("127.0.0.1", held)).unwrap();
        let (code, _, err) = wait_exit(start(role, &cfg, false));
        assert_ne!(code, Some(0), "{role:?}: {err}");
        assert!(
            err.contains(&format!("127.0.0.1:{held}")),
            "{role:?}: {err}"
        );
        assert!(err.contains("already in use"), "{role:?}: {err}");
        assert!(err.contains("wkp"), "{role:?}: {err}");
        assert!(
            err.lines().count() < 5,
            "{role:?}: the daemon repeated itself: {err}"
        );
    }
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

/// At start each daemon says where it listens and what the array is doing,
/// as text and as JSON.
#[test]
fn daemons_say_where_they_listen_and_what_the_array_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, wkp) = config(tmp.path());
    let mut agent = start(&["backup", "client", "agent"], &cfg, true);
    let line = first_line(&mut agent);
    let _ = agent.kill();
    let _ = agent.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["event"], "started", "{v}");
    assert_eq!(v["role"], "agent", "{v}");
    let addrs: Vec<&str> = v["listening"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["addr"].as_str().unwrap())
        .collect();
    for p in [wkp, wkp + 1, wkp + 2] {
        assert!(addrs.contains(&format!("127.0.0.1:{p}").as_str()), "{v}");
    }
    // No SCSI on this machine: the array is unavailable, and it says why.
    assert_eq!(v["array"]["stg"], 7, "{v}");
    assert_eq!(v["array"]["state"], "unavailable", "{v}");
    assert!(!v["array"]["why"].as_str().unwrap_or("").is_empty(), "{v}");
    assert_eq!(v["array"]["fallback"], "preferred", "{v}");

    let mut server = start(&["backup", "server", "serve"], &cfg, false);
    let mut text = String::new();
    {
        let mut r = BufReader::new(server.stdout.as_mut().unwrap());
        while !text.contains("array:") {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 {
                break;
            }
            text += &l;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        text.contains(&format!("listening on 127.0.0.1:{wkp} (WKP")),
        "{text}"
    );
    assert!(
        text.contains(&format!("listening on 127.0.0.1:{} (WKP+2", wkp + 2)),
        "{text}"
    );
    assert!(text.contains("array: STG 7 unavailable"), "{text}");
}

/// Under a service manager (`NOTIFY_SOCKET`, systemd's `Type=notify`) a
/// daemon reports readiness once its ports are checked.
#[test]
fn daemons_tell_the_service_manager_they_are_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, wkp) = config(tmp.path());
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(["backup", "client", "agent", "--config"])
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let got = sock.recv(&mut buf);
    let _ = agent.kill();
    let _ = agent.wait();
    let n = got.expect("no readiness notification");
    let msg = String::from_utf8_lossy(&buf[..n]);
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{wkp}")), "{msg}");
}

/// `--log-file` takes a daemon's log records: here the refusal of a client
/// whose pre-shared key differs, and the client says the same.
#[test]
fn a_daemon_logs_to_its_log_file() {
    let tmp = tempfile::tempdir().unwrap();
    let wkp = stp_tools::backup::inproc::free_wkp().unwrap();
    let write = |name: &str, psk: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("stp.toml"),
            format!("wkp = {wkp}\npsk = \"{psk}\"\n"),
        )
        .unwrap();
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
    };
    let server_cfg = write("server", &"11".repeat(32));
    let client_cfg = write("client", &"22".repeat(32));
    let log = tmp.path().join("server.log");
    let mut server = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(["backup", "server", "serve", "--config"])
        .arg(&server_cfg)
        .arg("--log-file")
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Up once it has said so.
    let _ = first_line(&mut server);
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args([
            "backup",
            "client",
            "db",
            "--name",
            "d",
            "--from-command",
            "echo hi",
        ])
        .arg("--config")
        .arg(&client_cfg)
        .output()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("keys differ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pre-shared keys differ"), "{err}");
    assert!(text.contains("started"), "{text}");
    assert!(
        text.contains("WARN") && text.contains("pre-shared keys differ"),
        "{text}"
    );
}

/// `--wkp` overrides the STP configuration's well-known port.
#[test]
fn wkp_on_the_command_line_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, configured) = config(tmp.path());
    let other = (0..20)
        .map(|_| stp_tools::backup::inproc::free_wkp().unwrap())
        .find(|p| p.abs_diff(configured) > 2)
        .expect("a free WKP away from the configured one");
    let mut server = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args([
            "backup",
            "server",
            "serve",
            "--json",
            "--wkp",
            &other.to_string(),
            "--config",
        ])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = first_line(&mut server);
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let addrs: Vec<&str> = v["listening"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["addr"].as_str().unwrap())
        .collect();
    assert_eq!(
        addrs,
        [
            format!("127.0.0.1:{other}"),
            format!("127.0.0.1:{}", other + 2)
        ],
        "{line}"
    );
}
