//! The backup part of `stp bench report`: the files
//! `sim-target/vm/bench-backup` leaves (`backup-<mode>-<flow>.json`,
//! `backup-meta.json`), the backup table and the keys of `lio.json`
//! (`backup_stp_vs_lan_only`, `backup_lan_share`, `backup_vs_stp_goodput`,
//! `backup_app_vs_veth`).
//!
//! Modes are `vendor` and `block` (through the array) and `tcp` (the shaped
//! LAN alone); flows `fs` (the generated tree) and `db` (the live SQLite
//! database). Ratios compare each array mode with the `tcp` run of the same
//! flow, so a missing run leaves its ratios out rather than failing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A figure for the table: whole above 1000, three digits below.
fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// One backup run as bench-backup recorded it.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
pub struct BackupRun {
    /// `vendor`, `block` or `tcp`.
    pub mode: String,
    /// `fs` or `db`.
    pub flow: String,
    /// Stream bytes.
    pub bytes: u64,
    /// Entries in the manifest.
    pub files: u64,
    /// The server's time from the data's start to the durable record.
    pub seconds: f64,
    /// `bytes` over `seconds`, 10^6 B/s.
    pub mb_per_s: f64,
    /// The channel the catalog recorded.
    pub channel: String,
    /// CPU seconds of the server and the client processes.
    pub cpu_s: f64,
    /// `cpu_s` per 10^9 stream bytes.
    pub cpu_s_per_gb: Option<f64>,
    /// LAN bytes the server counted at its sockets (payload, both ways).
    pub app_lan_bytes: u64,
    /// Array bytes the server counted at its sockets.
    pub app_array_bytes: u64,
    /// Bytes the server's veth end received and sent (its own counters:
    /// frames with their Ethernet, IP and TCP headers).
    pub veth_bytes: u64,
    /// Packets the server's veth end received and sent.
    pub veth_packets: u64,
    /// The LAN's shaped rate, bytes per second.
    pub lan_bytes_per_s: u64,
    /// The STP one-way goodput the LAN was shaped against, MB/s.
    pub stp_goodput_mb_per_s: f64,
    /// The frame protection in use.
    pub protection: String,
}

/// A target: how it reads, and the test of a ratio.
type Target = (&'static str, fn(f64) -> bool);

/// A backup ratio: `value / reference`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct BackupRatio {
    /// The run (`vendor fs` ...).
    pub run: String,
    /// The numerator.
    pub value: f64,
    /// What it is.
    pub value_is: String,
    /// The denominator.
    pub reference: f64,
    /// What it is.
    pub reference_is: String,
    /// `value / reference` (0 when the reference is 0).
    pub ratio: f64,
    /// What the target is (`≥ 5`, `≤ 0.01`, `0.95 to 1.05`), if any.
    pub target: Option<String>,
    /// Whether it was met (null without a target).
    pub met: Option<bool>,
}

impl BackupRatio {
    fn new(
        run: &str,
        (value, value_is): (f64, String),
        (reference, reference_is): (f64, String),
        target: Option<Target>,
    ) -> BackupRatio {
        let ratio = if reference > 0.0 {
            value / reference
        } else {
            0.0
        };
        BackupRatio {
            run: run.into(),
            value,
            value_is,
            reference,
            reference_is,
            ratio,
            target: target.map(|(t, _)| t.to_string()),
            met: target.map(|(_, f)| reference > 0.0 && f(ratio)),
        }
    }
}

/// The backup runs of one results directory.
#[derive(Debug, Default, Clone)]
pub struct Backups {
    /// `<mode>-<flow>` → the run.
    pub runs: BTreeMap<String, BackupRun>,
    /// `backup-meta.json`: how the LAN was shaped.
    pub meta: Option<serde_json::Value>,
    /// Files that did not parse.
    pub unreadable: BTreeMap<String, String>,
}

const MODES: [&str; 3] = ["vendor", "block", "tcp"];
const FLOWS: [&str; 2] = ["fs", "db"];
/// The restore runs' flow: the file-system backup's tree back to the
/// client (`backup-<mode>-restore.json`).
const RESTORE: [&str; 1] = ["restore"];

impl Backups {
    /// Reads `backup-*.json` in `dir` (a directory that cannot be read has
    /// none).
    pub fn load(dir: &Path) -> Backups {
        let mut b = Backups::default();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return b;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name
                .strip_prefix("backup-")
                .and_then(|s| s.strip_suffix(".json"))
            else {
                continue;
            };
            let text = match std::fs::read_to_string(e.path()) {
                Ok(t) => t,
                Err(err) => {
                    b.unreadable.insert(name, err.to_string());
                    continue;
                }
            };
            match stem {
                "meta" => b.meta = serde_json::from_str(&text).ok(),
                // The goodput bench-backup measured when bench-lio had not.
                "stp-goodput" => {}
                _ => match serde_json::from_str::<BackupRun>(&text) {
                    Ok(r) => {
                        b.runs.insert(stem.to_string(), r);
                    }
                    Err(err) => {
                        b.unreadable
                            .insert(name, format!("not a backup run: {err}"));
                    }
                },
            }
        }
        b
    }

    /// True when there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.unreadable.is_empty()
    }

    fn run(&self, mode: &str, flow: &str) -> Option<&BackupRun> {
        self.runs.get(&format!("{mode}-{flow}"))
    }

    /// Each array mode against the LAN alone, same flow: ≥ 5 (10 is the
    /// limit the shaping sets).
    pub fn stp_vs_lan_only(&self) -> Vec<BackupRatio> {
        self.stp_vs_lan_only_of(&FLOWS)
    }

    fn stp_vs_lan_only_of(&self, flows: &[&str]) -> Vec<BackupRatio> {
        let mut v = Vec::new();
        for &flow in flows {
            let Some(lan) = self.run("tcp", flow) else {
                continue;
            };
            for mode in ["vendor", "block"] {
                if let Some(r) = self.run(mode, flow) {
                    v.push(BackupRatio::new(
                        &format!("{mode} {flow}"),
                        (r.mb_per_s, format!("STP {mode} mode MB/s")),
                        (lan.mb_per_s, "the shaped LAN alone MB/s".into()),
                        Some(("≥ 5", |x| x >= 5.0)),
                    ));
                }
            }
        }
        v
    }

    /// The LAN's share of a backup through the array, by the veth's own
    /// counters: ≤ 1 %.
    pub fn lan_share(&self) -> Vec<BackupRatio> {
        self.lan_share_of(&FLOWS)
    }

    fn lan_share_of(&self, flows: &[&str]) -> Vec<BackupRatio> {
        let mut v = Vec::new();
        for mode in ["vendor", "block"] {
            for &flow in flows {
                if let Some(r) = self.run(mode, flow) {
                    v.push(BackupRatio::new(
                        &format!("{mode} {flow}"),
                        (r.veth_bytes as f64, "veth bytes (both ways)".into()),
                        (r.bytes as f64, "stream bytes".into()),
                        Some(("≤ 0.01", |x| x <= 0.01)),
                    ));
                }
            }
        }
        v
    }

    /// The application's LAN count against the veth's: within 5 %.
    pub fn app_vs_veth(&self) -> Vec<BackupRatio> {
        self.app_vs_veth_of(&FLOWS)
    }

    fn app_vs_veth_of(&self, flows: &[&str]) -> Vec<BackupRatio> {
        let mut v = Vec::new();
        for mode in MODES {
            for &flow in flows {
                if let Some(r) = self.run(mode, flow) {
                    v.push(BackupRatio::new(
                        &format!("{mode} {flow}"),
                        (
                            r.app_lan_bytes as f64,
                            "LAN bytes the server counted".into(),
                        ),
                        (r.veth_bytes as f64, "veth bytes".into()),
                        Some(("0.95 to 1.05", |x| (0.95..=1.05).contains(&x))),
                    ));
                }
            }
        }
        v
    }

    /// Each array mode's backup rate against STP's one-way goodput in the
    /// same boot (no target in the VM: hashing and protection are emulated).
    pub fn vs_stp_goodput(&self) -> Vec<BackupRatio> {
        self.vs_stp_goodput_of(&FLOWS)
    }

    fn vs_stp_goodput_of(&self, flows: &[&str]) -> Vec<BackupRatio> {
        let mut v = Vec::new();
        for mode in ["vendor", "block"] {
            for &flow in flows {
                if let Some(r) = self.run(mode, flow) {
                    v.push(BackupRatio::new(
                        &format!("{mode} {flow}"),
                        (r.mb_per_s, format!("{flow} over STP {mode} mode MB/s")),
                        (
                            r.stp_goodput_mb_per_s,
                            "STP vendor one-way goodput MB/s (this boot)".into(),
                        ),
                        None,
                    ));
                }
            }
        }
        v
    }

    /// The keys `lio.json` gains.
    pub fn keys(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut o = serde_json::Map::new();
        if self.is_empty() {
            return o;
        }
        let j = |v: Vec<BackupRatio>| serde_json::to_value(v).unwrap_or_default();
        o.insert("backup_stp_vs_lan_only".into(), j(self.stp_vs_lan_only()));
        o.insert("backup_lan_share".into(), j(self.lan_share()));
        o.insert("backup_app_vs_veth".into(), j(self.app_vs_veth()));
        o.insert("backup_vs_stp_goodput".into(), j(self.vs_stp_goodput()));
        o.insert(
            "backup_runs".into(),
            serde_json::to_value(&self.runs).unwrap_or_default(),
        );
        o.insert(
            "backup_setup".into(),
            self.meta.clone().unwrap_or(serde_json::Value::Null),
        );
        // Restores to the client through the array: the file-system
        // backup's tree back, the same ratios.
        o.insert(
            "restore_stp_vs_lan_only".into(),
            j(self.stp_vs_lan_only_of(&RESTORE)),
        );
        o.insert("restore_lan_share".into(), j(self.lan_share_of(&RESTORE)));
        o.insert(
            "restore_app_vs_veth".into(),
            j(self.app_vs_veth_of(&RESTORE)),
        );
        o.insert(
            "restore_vs_stp_goodput".into(),
            j(self.vs_stp_goodput_of(&RESTORE)),
        );
        o
    }

    /// The backup table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        if self.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\nBackups (and the tree's restore to the client) through the array against a shaped \
             LAN (one round per mode)"
        );
        if let Some(m) = &self.meta {
            let f = |k: &str| m.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
            let _ =
                writeln!(
                s,
                "  LAN: {} at {:.2} MB/s = {} × STP vendor goodput {:.2} MB/s ({}); protection {}",
                m.get("shaping").and_then(|v| v.as_str()).unwrap_or("?"),
                f("lan_bytes_per_s") / 1e6,
                f("lan_fraction"),
                f("stp_goodput_mb_per_s"),
                m.get("goodput_source").and_then(|v| v.as_str()).unwrap_or("?"),
                m.get("protection").and_then(|v| v.as_str()).unwrap_or("?"),
            );
        }
        let _ = writeln!(
            s,
            "{:<7} {:<4} {:>9} {:>7} {:>9} {:>9} {:>11} {:>11} {:>9} {:>8} {:>8}",
            "mode",
            "flow",
            "MB",
            "files",
            "MB/s",
            "CPU-s/GB",
            "LAN (app)",
            "LAN (veth)",
            "LAN share",
            "app/veth",
            "channel"
        );
        for mode in MODES {
            for flow in FLOWS.iter().chain(&RESTORE) {
                let Some(r) = self.run(mode, flow) else {
                    continue;
                };
                let share = if r.bytes > 0 {
                    format!("{:.3} %", r.veth_bytes as f64 * 100.0 / r.bytes as f64)
                } else {
                    "-".into()
                };
                let agree = if r.veth_bytes > 0 {
                    format!("{:.3}", r.app_lan_bytes as f64 / r.veth_bytes as f64)
                } else {
                    "-".into()
                };
                let _ = writeln!(
                    s,
                    "{:<7} {:<4} {:>9.1} {:>7} {:>9.2} {:>9} {:>11} {:>11} {:>9} {:>8} {:>8}",
                    mode,
                    flow,
                    r.bytes as f64 / 1e6,
                    r.files,
                    r.mb_per_s,
                    r.cpu_s_per_gb.map_or("-".into(), |c| format!("{c:.1}")),
                    crate::bench::units::human_bytes(r.app_lan_bytes),
                    crate::bench::units::human_bytes(r.veth_bytes),
                    share,
                    agree,
                    r.channel
                );
            }
        }
        let all: Vec<(&str, Vec<BackupRatio>)> = vec![
            ("backup_stp_vs_lan_only", self.stp_vs_lan_only()),
            ("backup_lan_share", self.lan_share()),
            ("backup_app_vs_veth", self.app_vs_veth()),
            ("backup_vs_stp_goodput", self.vs_stp_goodput()),
            ("restore_stp_vs_lan_only", self.stp_vs_lan_only_of(&RESTORE)),
            ("restore_lan_share", self.lan_share_of(&RESTORE)),
            ("restore_app_vs_veth", self.app_vs_veth_of(&RESTORE)),
            ("restore_vs_stp_goodput", self.vs_stp_goodput_of(&RESTORE)),
        ];
        let _ = writeln!(s, "\nBackup ratios (value / reference)");
        let (mut targets, mut met) = (0, 0);
        for (k, v) in &all {
            for x in v {
                let verdict = match (&x.target, x.met) {
                    (Some(t), Some(m)) => {
                        targets += 1;
                        met += usize::from(m);
                        format!("{t}  {}", if m { "met" } else { "NOT MET" })
                    }
                    _ => "(no target)".into(),
                };
                let _ = writeln!(
                    s,
                    "  {k:<24} {:<10} {:>8.4} = {} / {}  {verdict}",
                    x.run,
                    x.ratio,
                    num(x.value),
                    num(x.reference)
                );
            }
        }
        let _ = writeln!(s, "  backup and restore targets met: {met} of {targets}");
        for (f, why) in &self.unreadable {
            let _ = writeln!(s, "  unreadable: {f}: {why}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: &str, flow: &str, mb_per_s: f64, app: u64, veth: u64) -> String {
        serde_json::json!({
            "mode": mode, "flow": flow, "bytes": 100_000_000u64, "files": 10, "seconds": 1.0,
            "mb_per_s": mb_per_s, "channel": if mode == "tcp" { "tcp" } else { "stp" },
            "cpu_s": 2.0, "cpu_s_per_gb": 20.0, "app_lan_bytes": app, "app_array_bytes": 0,
            "veth_bytes": veth, "veth_packets": 10, "lan_bytes_per_s": 1_000_000,
            "stp_goodput_mb_per_s": 10.0, "protection": "aes-256-gcm",
            "server_traffic": {}, "client_traffic": {}
        })
        .to_string()
    }

    #[test]
    fn ratios_keys_and_table_from_bench_backup_files() {
        let d = tempfile::tempdir().unwrap();
        let w = |n: &str, t: String| std::fs::write(d.path().join(n), t).unwrap();
        w(
            "backup-vendor-fs.json",
            run("vendor", "fs", 8.0, 50_000, 80_000),
        );
        w(
            "backup-block-fs.json",
            run("block", "fs", 4.0, 50_000, 80_000),
        );
        w(
            "backup-tcp-fs.json",
            run("tcp", "fs", 1.0, 101_000_000, 104_000_000),
        );
        w("backup-vendor-db.json", "{not json".into());
        // The tree's restore to the client, through the array and over
        // the LAN alone.
        w(
            "backup-vendor-restore.json",
            run("vendor", "restore", 6.0, 1_000, 1_500),
        );
        w(
            "backup-tcp-restore.json",
            run("tcp", "restore", 1.0, 101_000_000, 104_000_000),
        );
        w(
            "backup-meta.json",
            serde_json::json!({"lan_fraction": 0.1, "stp_goodput_mb_per_s": 10.0}).to_string(),
        );
        let b = Backups::load(d.path());
        assert_eq!(b.runs.len(), 5);
        assert!(b.unreadable.contains_key("backup-vendor-db.json"));
        let vs = b.stp_vs_lan_only();
        assert_eq!(vs.len(), 2);
        assert_eq!(
            (vs[0].run.as_str(), vs[0].ratio, vs[0].met),
            ("vendor fs", 8.0, Some(true))
        );
        assert_eq!((vs[1].ratio, vs[1].met), (4.0, Some(false)));
        let share = b.lan_share();
        assert_eq!(share[0].met, Some(true), "{share:?}");
        let agree = b.app_vs_veth();
        let tcp = agree.iter().find(|x| x.run == "tcp fs").unwrap();
        assert_eq!(tcp.met, Some(true), "{tcp:?}");
        assert_eq!(b.vs_stp_goodput()[0].ratio, 0.8);
        let keys = b.keys();
        for k in [
            "backup_stp_vs_lan_only",
            "backup_lan_share",
            "backup_vs_stp_goodput",
            "backup_runs",
            "restore_stp_vs_lan_only",
            "restore_lan_share",
            "restore_app_vs_veth",
            "restore_vs_stp_goodput",
        ] {
            assert!(keys.contains_key(k), "{k}");
        }
        // Restores have the backups' ratios under their own keys, and none
        // of the backups' keys holds a restore.
        let r = &keys["restore_stp_vs_lan_only"][0];
        assert_eq!(
            (r["run"].as_str(), r["ratio"].as_f64()),
            (Some("vendor restore"), Some(6.0))
        );
        assert_eq!(
            keys["restore_vs_stp_goodput"][0]["ratio"].as_f64(),
            Some(0.6)
        );
        assert!(b
            .stp_vs_lan_only()
            .iter()
            .all(|x| !x.run.contains("restore")));
        let t = b.table();
        assert!(
            t.contains("vendor  fs") && t.contains("vendor  restore"),
            "{t}"
        );
        assert!(t.contains("restore_stp_vs_lan_only"), "{t}");
        assert!(t.contains("NOT MET") && t.contains("unreadable"), "{t}");
        // A directory without backup files adds nothing.
        let empty = tempfile::tempdir().unwrap();
        let none = Backups::load(empty.path());
        assert!(none.keys().is_empty() && none.table().is_empty());
    }
}
