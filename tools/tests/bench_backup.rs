//! The backup benchmark's guest script (`sim-target/vm/bench-backup`):
//! bad options are refused with a message, and a set-up that cannot make
//! network namespaces says what the kernel or the user lacks (exit status
//! 3) instead of running with an unshaped LAN.

use std::path::PathBuf;
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sim-target/vm/bench-backup")
}

#[test]
fn bad_options_are_refused_with_what_to_give() {
    let tmp = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            vec!["--modes", "vendor,fast"],
            "--modes takes vendor, block and tcp",
        ),
        (
            vec!["--tree-bytes", "lots"],
            "--tree-bytes 'lots' is not a size",
        ),
        (vec!["--lan-fraction", "2"], "--lan-fraction must be"),
        (vec!["--goodput", "0"], "--goodput must be"),
    ] {
        let out = Command::new("bash")
            .arg(script())
            .args(&args)
            .arg("--out")
            .arg(tmp.path())
            .output()
            .expect("running bench-backup");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// In a user namespace (root there, but no privilege over the host's
/// mounts) `ip netns add` fails: the set-up must say so and stop.
#[test]
fn a_set_up_without_network_namespaces_says_what_is_missing() {
    let have = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("unshare") || !have("ip") || !have("tc") {
        eprintln!("skipped: needs unshare and iproute2");
        return;
    }
    let userns = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !userns {
        eprintln!("skipped: user namespaces are not available here");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "bash"])
        .arg(script())
        .args(["--check-net", "--out"])
        .arg(tmp.path())
        .output()
        .expect("running bench-backup");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("cannot set up the shaped LAN") && err.contains("CONFIG_NET_NS"),
        "{err}"
    );
    let recorded = std::fs::read_to_string(tmp.path().join("backup-net.err")).unwrap();
    assert!(recorded.contains("network namespace"), "{recorded}");
}
