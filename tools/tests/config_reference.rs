//! The configuration reference in docs/BACKUP.md §1 against the parser:
//! a file made of every documented key's example loads, and every key
//! the parser knows is documented.

use std::collections::BTreeSet;

use stp_tools::backup::config::BackupConfig;

/// (section, key, example) of each row of the reference table.
fn documented() -> Vec<(Option<String>, String, String)> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/BACKUP.md")).unwrap();
    let start = doc
        .find("<!-- config-keys -->")
        .expect("the table's start marker");
    let end = doc
        .find("<!-- /config-keys -->")
        .expect("the table's end marker");
    let mut rows = Vec::new();
    for line in doc[start..end].lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        let example = cells[2].trim().trim_matches('`');
        let (section, key) = match key.strip_prefix('[') {
            Some(rest) => {
                let (s, k) = rest.split_once("] ").expect("`[section] key`");
                (Some(s.to_owned()), k.to_owned())
            }
            None => (None, key.to_owned()),
        };
        rows.push((section, key, example.to_owned()));
    }
    rows
}

#[test]
fn every_documented_key_parses_and_every_key_is_documented() {
    let rows = documented();
    assert!(rows.len() >= 10, "{rows:?}");
    let mut toml = String::new();
    for (_, key, example) in rows.iter().filter(|r| r.0.is_none()) {
        toml += &format!("{key} = {example}\n");
    }
    let sections: BTreeSet<&String> = rows.iter().filter_map(|r| r.0.as_ref()).collect();
    for s in &sections {
        toml += &format!("[{s}]\n");
        for (_, key, example) in rows.iter().filter(|r| r.0.as_ref() == Some(*s)) {
            toml += &format!("{key} = {example}\n");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("backup.toml");
    std::fs::write(&path, &toml).unwrap();
    let cfg = BackupConfig::load(&path).unwrap_or_else(|e| panic!("{e:#}\n{toml}"));

    // Every key the parser has, with every optional part present.
    let v = serde_json::to_value(&cfg).unwrap();
    let mut known = BTreeSet::new();
    for (k, val) in v.as_object().unwrap() {
        match val.as_object() {
            Some(section) => {
                for sk in section.keys() {
                    known.insert(format!("[{k}] {sk}"));
                }
            }
            None => {
                known.insert(k.clone());
            }
        }
    }
    let documented: BTreeSet<String> = rows
        .iter()
        .map(|(s, k, _)| match s {
            Some(s) => format!("[{s}] {k}"),
            None => k.clone(),
        })
        .collect();
    assert_eq!(known, documented);
}
