//! Runs the built `stp bench` against the in-process array and loopback TCP
//! and checks its JSON. Nothing here asserts on speed.

use std::process::Command;

use serde_json::Value;

fn stp(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stp"))
        .args(args)
        .output()
        .expect("running stp");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn bench_json(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = stp(&all);
    assert!(ok, "stp {all:?} failed: {stderr}");
    assert!(
        !stderr.contains("MB/s"),
        "--json must not print the progress line: {stderr}"
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stp {all:?}: bad JSON ({e}): {stdout}"))
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

fn check_sane(v: &Value, mode: &str, test: &str) {
    assert_eq!(v["schema"], 1);
    assert_eq!(v["mode"], mode);
    assert_eq!(v["test"], test);
    assert!(v["transport"].is_string());
    assert!(!v["paths"].as_array().expect("paths").is_empty());
    assert!(v["params"].is_object());
    assert!(num(v, &["ops"]) > 0.0);
    assert!(num(v, &["bytes"]) > 0.0);
    assert!(num(v, &["seconds"]) > 0.0);
    assert!(num(v, &["iops"]) > 0.0);
    assert!(num(v, &["mb_per_s"]) > 0.0);
    assert!(num(v, &["cpu", "user_s"]) >= 0.0);
    assert!(num(v, &["cpu", "sys_s"]) >= 0.0);
    assert!(num(v, &["cpu", "s_per_gb"]) >= 0.0);
    let l = |k: &str| num(v, &["latency_us", k]);
    assert!(l("count") > 0.0);
    assert!(l("min") > 0.0);
    assert!(l("p50") <= l("p90"), "{v}");
    assert!(l("p90") <= l("p99"), "{v}");
    assert!(l("p99") <= l("p999"), "{v}");
    assert!(l("p999") <= l("max"), "{v}");
}

#[test]
fn raw_sim() {
    let v = bench_json(&["raw", "--sim", "--time", "1s", "--json"]);
    check_sane(&v, "raw", "randread");
    assert_eq!(v["params"]["bs"], 4096);
}

#[test]
fn raw_sim_verify_and_files() {
    let dir = std::env::temp_dir().join(format!("stp-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (hgrm, svg) = (dir.join("lat.hgrm"), dir.join("lat.svg"));
    let v = bench_json(&[
        "raw",
        "--sim",
        "--rw",
        "write",
        "--bs",
        "64k",
        "--size",
        "8m",
        "--verify",
        "--json",
        "--hgrm",
        hgrm.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    check_sane(&v, "raw", "write");
    assert_eq!(num(&v, &["bytes"]), (8 << 20) as f64);
    assert_eq!(num(&v, &["verify", "errors"]), 0.0);
    assert_eq!(num(&v, &["verify", "bytes"]), (8 << 20) as f64);
    let h = std::fs::read_to_string(&hgrm).unwrap();
    assert!(h.contains("1/(1-Percentile)") && h.contains("#[Max"));
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<?xml") && s.contains("<polyline"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stp_sim_goodput() {
    let v = bench_json(&["stp", "--sim", "--bytes", "8m", "--json"]);
    check_sane(&v, "stp", "goodput");
    assert_eq!(num(&v, &["bytes"]), (8 << 20) as f64);
}

#[test]
fn stp_sim_rtt() {
    let v = bench_json(&["stp", "--sim", "--rtt", "--count", "100", "--json"]);
    check_sane(&v, "stp", "rtt");
    assert_eq!(num(&v, &["ops"]), 100.0);
}

#[test]
fn stp_sim_block_goodput() {
    let v = bench_json(&["stp", "--sim", "--mode", "block", "--bytes", "2m", "--json"]);
    check_sane(&v, "stp", "goodput");
    assert_eq!(v["params"]["mailbox"], "block");
}

#[test]
fn tcp_goodput() {
    let v = bench_json(&["tcp", "--bytes", "8m", "--json"]);
    check_sane(&v, "tcp", "goodput");
}

#[test]
fn compare_json() {
    let v = bench_json(&["compare", "--modes", "raw,tcp", "--bytes", "4m", "--json"]);
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    check_sane(&runs[0], "raw", "write");
    check_sane(&runs[1], "tcp", "goodput");
    assert!(num(&v["ratios"][0], &["mb_per_s"]) > 0.0);
}

#[test]
fn bad_arguments_fail_cleanly() {
    for args in [
        &["bench", "raw", "--sim", "--bs", "0"][..],
        &["bench", "raw", "/nonexistent/sg42", "--time", "1s"],
        &["bench", "raw", "/dev/null", "--time", "1s"],
        &["bench", "raw", "--time", "1s"],
        &["bench", "raw", "--sim", "--bs", "1000", "--time", "1s"],
        &[
            "bench", "raw", "--sim", "--bs", "1g", "--depth", "64", "--time", "1s",
        ],
        &["bench", "raw", "--sim", "--bs", "1g", "--time", "1s"],
        &["bench", "stp", "--bytes", "1m"],
        &["bench", "stp", "--map", "/nonexistent/map.json"],
    ] {
        let (ok, _, stderr) = stp(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} gave no message");
    }
}
