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

/// The data path's structure, as `stp bench stp` reports it: counts, not
/// timings.
#[test]
fn stp_sim_datapath_counts() {
    let bytes = 16u64 << 20;
    let v = bench_json(&["stp", "--sim", "--bytes", "16m", "--json"]);
    check_sane(&v, "stp", "goodput");
    assert_eq!(v["params"]["protection"], "aes-256-gcm");
    let d = &v["datapath"];
    let f = |k: &str| num(d, &[k]);
    assert!(f("send_payload_bytes") >= bytes as f64, "{d}");
    assert!(f("recv_payload_bytes") >= bytes as f64, "{d}");
    // At most one copy per payload byte on each side. The 4-byte
    // confirmation the receiver sends back is a small frame, copied out of
    // its RECEIVE buffer as well: a few bytes over exactly 1.
    let slack = 16.0 / bytes as f64;
    assert!(f("send_copies_per_byte") <= 1.0 + slack, "{d}");
    assert!(f("recv_copies_per_byte") <= 1.0 + slack, "{d}");
    // One protection pass per byte: sealing once (a re-send goes out from
    // its sealed buffer); opening once, plus the duplicates a
    // retransmission delivers (each at most one 256 KiB frame).
    assert!(
        (f("send_protection_passes_per_byte") - 1.0).abs() <= 0.02,
        "{d}"
    );
    let dup = f("resent_sealed_frames") * (256.0 * 1024.0) / bytes as f64;
    let recv = f("recv_protection_passes_per_byte");
    assert!(recv >= 0.98 && recv <= 1.02 + dup, "{d}");
    assert!(f("sends_submitted") > 0.0 && f("mean_sends_in_flight_per_lun") >= 1.0);
    assert!(f("sends_in_flight_per_lun_max") >= 1.0, "{d}");
    assert!(f("flushes") > 0.0 && f("wakeups_per_flush") >= 0.0, "{d}");
    // The array's CPU is reported apart.
    assert_eq!(v["cpu"]["counted"], "host ends");
    assert!(num(&v, &["cpu", "array_s"]) >= 0.0);
    assert!(num(&v, &["cpu", "process_s_per_gb"]) >= num(&v, &["cpu", "s_per_gb"]));
}

/// Block mode's data path: the stream seals each frame in a buffer with
/// room for the slot header in front, and that buffer is the slot the
/// WRITE carries; the slot buffers the receiver's READs fill are lent to
/// the connection, which opens the frames where they lie. One copy per
/// payload byte on each side, as in vendor mode. The layout is chosen from
/// the LUN, and said.
#[test]
fn stp_sim_block_datapath_counts() {
    let bytes = 16u64 << 20;
    let v = bench_json(&[
        "stp", "--sim", "--mode", "block", "--bytes", "16m", "--idle", "0", "--json",
    ]);
    check_sane(&v, "stp", "goodput");
    assert_eq!(v["params"]["block_layout"]["slot_bytes"], 1 << 20, "{v}");
    let d = &v["datapath"];
    let f = |k: &str| num(d, &[k]);
    assert!(f("send_payload_bytes") >= bytes as f64, "{d}");
    // Control frames and the bench's small confirmation add a few KiB.
    let slack = 4096.0 / bytes as f64;
    assert!(f("send_copies_per_byte") <= 1.0 + slack, "{d}");
    // Duplicates a retransmission delivers (frames of up to a 1 MiB slot)
    // may be copied before they are dropped.
    let dup = f("resent_sealed_frames") * (1u64 << 20) as f64 / bytes as f64;
    assert!(f("recv_copies_per_byte") <= 1.0 + dup + slack, "{d}");
    assert!(num(&v, &["block", "bad_slots"]) == 0.0, "{v}");
}

#[test]
fn stp_sim_protection_and_connections() {
    let v = bench_json(&[
        "stp",
        "--sim",
        "--bytes",
        "4m",
        "--protection",
        "blake3-auth",
        "--connections",
        "3",
        "--json",
    ]);
    check_sane(&v, "stp", "goodput");
    assert_eq!(v["params"]["protection"], "blake3-auth");
    assert_eq!(v["params"]["connections"], 3);
    let each = (4u64 << 20) / 3;
    assert_eq!(v["params"]["bytes_each"], each);
    assert_eq!(num(&v, &["bytes"]), (3 * each) as f64);
    let c = &v["connections"];
    assert_eq!(c["count"], 3);
    assert_eq!(c["mb_per_s"].as_array().unwrap().len(), 3);
    let r = num(c, &["slowest_over_fastest"]);
    assert!(r > 0.0 && r <= 1.0, "{c}");
    assert_eq!(c["idle"]["connections"], 3);
    // Each end has its sender (which is also its timer); the receive
    // pumps are each host's, shared by its connections (one per member
    // path at most: four here, two hosts).
    let threads = num(c, &["idle", "threads_per_connection"]);
    assert!((2.0..=2.0 + 2.0 * 4.0 / 3.0).contains(&threads), "{c}");
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
    assert!(v["vs_tcp"].is_null(), "no stp run, no ratios to TCP: {v}");
}

#[test]
fn compare_stp_tcp_says_the_ratios_to_tcp() {
    let (ok, stdout, stderr) = stp(&[
        "bench", "compare", "--modes", "stp,tcp", "--bytes", "4m", "--count", "50", "-q",
    ]);
    assert!(ok, "{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("vs TCP"))
        .unwrap_or_else(|| panic!("no vs TCP line: {stdout}"));
    for what in [
        "goodput",
        "CPU-s/GB",
        "RTT p50",
        "host ends",
        "tcp loopback",
    ] {
        assert!(line.contains(what), "{what} missing: {line}");
    }
    assert!(!line.contains("not run"), "{line}");
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
        &[
            "bench",
            "stp",
            "--sim",
            "--block-on-members",
            "--bytes",
            "1m",
        ],
        &["bench", "raw", "--sim", "--rw", "randrw", "--rwmix", "170"],
        &["bench", "raw", "--sim", "--bssplit", "4k/60,1m/x"],
        &["bench", "raw", "--sim", "--rate", "fast"],
        &["bench", "raw", "--sim", "--rwmix", "70", "--time", "1s"],
        &[
            "bench",
            "raw",
            "--sim",
            "--bssplit",
            "4k/50,1m/50",
            "--span",
            "64k",
        ],
        &["bench", "curve", "--sim", "--rate", "100", "--time", "1s"],
        &["bench", "curve", "--sim", "--steps", "0"],
        &[
            "bench",
            "diff",
            "/nonexistent/a.json",
            "/nonexistent/b.json",
        ],
        &["bench", "job", "/nonexistent/job.toml"],
    ] {
        let (ok, _, stderr) = stp(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?} gave no message");
    }
}

#[test]
fn raw_sim_mixed_split_at_a_rate() {
    let v = bench_json(&[
        "raw",
        "--sim",
        "--rw",
        "randrw",
        "--rwmix",
        "70",
        "--bssplit",
        "4k/60,64k/30,1m/10",
        "--ramp",
        "100ms",
        "--time",
        "300ms",
        "--rate",
        "2000",
        "--sim-paths",
        "2",
        "--json",
    ]);
    check_sane(
        &v,
        "raw",
        "randrw 70/30 bssplit 4k/60,64k/30,1m/10 at 2000/s",
    );
    for dir in ["read", "write"] {
        assert!(num(&v, &[dir, "ops"]) > 0.0, "{dir}");
        assert!(
            num(&v, &[dir, "corrected_latency_us", "p99"]) > 0.0,
            "{dir}"
        );
    }
    assert!(num(&v, &["corrected_latency_us", "p999"]) > 0.0);
    assert_eq!(num(&v, &["fixed_rate", "target_iops"]), 2000.0);
    assert_eq!(v["devices"].as_array().expect("devices").len(), 2);
    assert_eq!(v["params"]["ramp_s"], 0.1);
}

#[test]
fn curve_diff_and_job() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    let c = bench_json(&[
        "curve",
        "--sim",
        "--time",
        "150ms",
        "--steps",
        "50,100",
        "--depth",
        "4",
        "--plot",
        &p("c.svg"),
        "--png",
        &p("c.png"),
        "--json",
    ]);
    assert_eq!(c["mode"], "curve");
    let points = c["points"].as_array().expect("points");
    assert_eq!(points.len(), 2);
    assert_eq!(points[0]["percent"], 50);
    assert!(num(&points[1], &["run", "corrected_latency_us", "p99"]) > 0.0);
    assert!(std::fs::read_to_string(p("c.svg"))
        .unwrap()
        .contains("<polyline"));
    assert!(std::fs::read(p("c.png")).unwrap().starts_with(b"\x89PNG"));
    for f in ["a.json", "b.json"] {
        let v = bench_json(&["raw", "--sim", "--time", "100ms", "--rounds", "3", "--json"]);
        assert_eq!(v["rounds"]["n"], 3);
        std::fs::write(p(f), v.to_string()).unwrap();
    }
    let (ok, out, err) = stp(&["bench", "diff", &p("a.json"), &p("b.json")]);
    assert!(ok, "{err}");
    assert!(out.contains("MB/s") && out.contains("spread"), "{out}");
    let (ok, _, err) = stp(&["bench", "diff", &p("a.json"), &p("c.png")]);
    assert!(!ok && err.contains("--json"), "{err}");
    std::fs::write(
        p("job.toml"),
        "sim = true\nrw = \"randrw\"\nrwmix = 70\nbssplit = \"4k/60:64k/30:1m/10\"\ntime = \"150ms\"\n",
    )
    .unwrap();
    let v = bench_json(&["job", &p("job.toml"), "--json"]);
    check_sane(&v, "raw", "randrw 70/30 bssplit 4k/60,64k/30,1m/10");
    std::fs::write(p("bad.toml"), "sim = true\nrwmixx = 70\n").unwrap();
    let (ok, _, err) = stp(&["bench", "job", &p("bad.toml")]);
    assert!(
        !ok && err.contains("rwmixx") && err.contains("bad.toml"),
        "{err}"
    );
}

#[test]
fn ping_pong_at_a_fixed_rate() {
    let v = bench_json(&[
        "tcp", "--rtt", "--rate", "1000", "--time", "300ms", "--json",
    ]);
    check_sane(&v, "tcp", "rtt");
    assert!(num(&v, &["corrected_latency_us", "p99"]) >= num(&v, &["latency_us", "min"]));
    assert_eq!(num(&v, &["fixed_rate", "target_iops"]), 1000.0);
    assert_eq!(v["params"]["rate_per_s"], 1000.0);
    let v = bench_json(&[
        "stp",
        "--sim",
        "--rtt",
        "--rate",
        "400",
        "--time",
        "300ms",
        "--connections",
        "2",
        "--json",
    ]);
    assert_eq!(num(&v, &["fixed_rate", "target_iops"]), 400.0);
    assert!(num(&v, &["corrected_latency_us", "count"]) > 0.0);
}

#[test]
fn ping_pong_curve() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("rtt.png").display().to_string();
    let c = bench_json(&[
        "tcp", "--rtt", "--curve", "--time", "150ms", "--steps", "50,100", "--plot", &png, "--json",
    ]);
    assert_eq!(c["mode"], "curve");
    assert_eq!(c["test"], "tcp rtt 64 B");
    assert_eq!(c["points"].as_array().expect("points").len(), 2);
    assert!(num(&c["points"][0], &["p99_us"]) > 0.0);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let (ok, _, err) = stp(&[
        "bench", "tcp", "--rtt", "--curve", "--time", "1s", "--hgrm", "x.hgrm",
    ]);
    assert!(!ok && err.contains("--rate N --hgrm"), "{err}");
}
