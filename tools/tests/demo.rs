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
            "--bench-seconds",
            "0.3",
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
    assert_eq!(backups.len(), 2, "{stdout}");
    for b in backups {
        assert_eq!(b["channel"], "stp", "{stdout}");
        assert_eq!(b["restored_equal"], true, "{stdout}");
        assert_eq!(b["verified"], true, "{stdout}");
        assert!(b["bytes"].as_u64().unwrap_or(0) > 0, "{stdout}");
    }
    assert!(
        v["bench_stp_mb_per_s"].as_f64().unwrap_or(0.0) > 0.0,
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
