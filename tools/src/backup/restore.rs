//! What a restore takes and how it lands (docs/BACKUP.md §6–§7): the plan
//! shared by a restore on the server's own host ([`super::repo::Repo::restore`])
//! and one through the array to another host ([`super::remote`]).
//!
//! A plan holds the manifest entries restored (the selected paths, and the
//! first name of every selected hard link), which archive holds each
//! file's content (an incremental takes unchanged files from older
//! backups), and each file's SHA-256. Extraction ([`super::archive::extract`])
//! takes what [`RestorePlan::wants`] accepts and checks each hash before
//! it renames a file into place; [`RestorePlan::finish`] then makes the
//! hard links and applies the manifest's metadata (nanosecond times,
//! modes, owners as root), directories last and the restore root at the
//! very end.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::archive::{
    self, safe_relative, ExtractOptions, Extracted, Kind, ManifestEntry, RootMeta,
};

/// What one restore takes from the repository.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    /// The backup restored.
    pub id: i64,
    /// The manifest entries restored.
    pub entries: Vec<ManifestEntry>,
    /// True when the whole tree is restored: the archive's root entry
    /// (`./`) applies to the destination too.
    pub whole: bool,
    /// Per archive (by backup id, oldest first), the files whose content
    /// it holds. The restored backup's own archive is always there: its
    /// directories, links and FIFOs come from it.
    sources: Vec<(i64, HashSet<String>)>,
    /// Directories, symbolic links and FIFOs restored.
    others: HashSet<String>,
    /// Expected SHA-256 per file path.
    hashes: HashMap<String, String>,
    /// Files restored with holes.
    sparse: HashSet<String>,
}

impl RestorePlan {
    /// The plan for restoring backup `id` (whose manifest is `manifest`):
    /// everything, or the entries at or under `paths`. Refuses a manifest
    /// with a hostile path and a selection that names nothing.
    pub fn select(id: i64, manifest: &[ManifestEntry], paths: &[String]) -> Result<RestorePlan> {
        let paths: Vec<String> = paths
            .iter()
            .map(|p| p.trim_matches('/').to_owned())
            .collect();
        let mut selected: Vec<&ManifestEntry> = manifest
            .iter()
            .filter(|e| e.status != "error")
            .filter(|e| {
                paths.is_empty()
                    || paths
                        .iter()
                        .any(|p| e.path == *p || e.path.starts_with(&format!("{p}/")))
            })
            .collect();
        // A selected hard link brings the file it links to along (its
        // content is stored under that name).
        let names: HashSet<&str> = selected.iter().map(|e| e.path.as_str()).collect();
        let extra: Vec<&ManifestEntry> = selected
            .iter()
            .filter(|e| e.kind == Kind::Hardlink)
            .filter_map(|e| e.link.as_deref())
            .filter(|first| !names.contains(first))
            .filter_map(|first| manifest.iter().find(|m| m.path == first))
            .collect();
        selected.extend(extra);
        if selected.is_empty() && !paths.is_empty() {
            bail!(
                "backup {id} has nothing at {paths:?} (`stp backup list --files {id}` shows its \
                 files)"
            );
        }
        RestorePlan::from_entries(
            id,
            selected.into_iter().cloned().collect(),
            paths.is_empty(),
        )
    }

    /// The plan for `entries` of backup `id` as they were selected
    /// (on the host that receives a restore, from the server's list).
    /// Every path is checked ([`safe_relative`]).
    pub fn from_entries(id: i64, entries: Vec<ManifestEntry>, whole: bool) -> Result<RestorePlan> {
        let mut by_archive: HashMap<i64, HashSet<String>> = HashMap::new();
        let mut others = HashSet::new();
        let mut hashes = HashMap::new();
        let mut sparse = HashSet::new();
        for e in &entries {
            safe_relative(&e.path).with_context(|| format!("backup {id}'s manifest"))?;
            match e.kind {
                Kind::File => {
                    let src = if e.in_archive {
                        id
                    } else {
                        e.from_backup.ok_or_else(|| {
                            anyhow!("{}: the manifest names no backup holding it", e.path)
                        })?
                    };
                    by_archive.entry(src).or_default().insert(e.path.clone());
                    if let Some(h) = &e.sha256 {
                        hashes.insert(e.path.clone(), h.clone());
                    }
                    if e.sparse {
                        sparse.insert(e.path.clone());
                    }
                }
                Kind::Dir | Kind::Symlink | Kind::Fifo => {
                    others.insert(e.path.clone());
                }
                Kind::Hardlink => {
                    let first = e.link.as_deref().unwrap_or_default();
                    safe_relative(first).with_context(|| format!("{}: hard link", e.path))?;
                }
            }
        }
        by_archive.entry(id).or_default();
        let mut sources: Vec<(i64, HashSet<String>)> = by_archive.into_iter().collect();
        sources.sort_unstable_by_key(|(b, _)| *b);
        Ok(RestorePlan {
            id,
            entries,
            whole,
            sources,
            others,
            hashes,
            sparse,
        })
    }

    /// The archives the restore reads, oldest first.
    pub fn sources(&self) -> impl Iterator<Item = i64> + '_ {
        self.sources.iter().map(|(b, _)| *b)
    }

    /// Whether the restore takes the entry `path` (a key; `""` is the
    /// archive's root) of kind `kind` from backup `src`'s archive.
    pub fn wants(&self, src: i64, path: &str, kind: Kind) -> bool {
        let is_target = src == self.id;
        match kind {
            Kind::File => self
                .sources
                .iter()
                .find(|(b, _)| *b == src)
                .is_some_and(|(_, files)| files.contains(path)),
            Kind::Dir if path.is_empty() => is_target && self.whole,
            Kind::Dir | Kind::Symlink | Kind::Fifo => is_target && self.others.contains(path),
            // Hard links are made from the manifest (`finish`).
            Kind::Hardlink => false,
        }
    }

    /// Whether the restore takes the entry from any of its archives: what
    /// one stream carrying all of them (a restore through the array) may
    /// hold.
    pub fn wants_any(&self, path: &str, kind: Kind) -> bool {
        self.sources().any(|src| self.wants(src, path, kind))
    }

    /// How to extract what the restore takes, `want` choosing the entries
    /// of the archive at hand: every file's SHA-256 checked, holes kept,
    /// owners set when running as root.
    pub fn extract_options<'a>(
        &'a self,
        want: &'a dyn Fn(&str, Kind) -> bool,
    ) -> ExtractOptions<'a> {
        ExtractOptions {
            want,
            hashes: &self.hashes,
            sparse: &self.sparse,
            owners: nix::unistd::geteuid().is_root(),
        }
    }

    /// How many regular files the restore writes.
    pub fn file_count(&self) -> u64 {
        self.sources.iter().map(|(_, f)| f.len() as u64).sum()
    }

    /// After extraction into `dest`: makes the hard links, then applies
    /// the manifest's metadata (directories deepest first), then `root`
    /// (the archive's root entry, if extraction took it) to `dest` itself.
    /// Counts the links in `total`.
    pub fn finish(&self, dest: &Path, root: Option<RootMeta>, total: &mut Extracted) -> Result<()> {
        for e in self.entries.iter().filter(|e| e.kind == Kind::Hardlink) {
            let first = e.link.as_deref().unwrap_or_default();
            let src_rel = safe_relative(first).with_context(|| format!("{}: hard link", e.path))?;
            let rel = safe_relative(&e.path)?;
            let src = dest.join(&src_rel);
            if !fs::symlink_metadata(&src).is_ok_and(|m| m.is_file()) {
                bail!(
                    "{}: hard link to {first}, which was not restored (select both paths)",
                    e.path
                );
            }
            let target = dest.join(&rel);
            if let Some(parent) = target.parent() {
                if !fs::symlink_metadata(parent).is_ok_and(|m| m.is_dir()) {
                    bail!("{}: its parent is not a directory; refused", e.path);
                }
            }
            let _ = fs::remove_file(&target);
            fs::hard_link(&src, &target)
                .with_context(|| format!("linking {} to {first}", e.path))?;
            total.others += 1;
        }
        // Metadata from the manifest (nanosecond times, modes of files
        // whose content came from an older archive), directories last.
        let as_root = nix::unistd::geteuid().is_root();
        let mut dirs = Vec::new();
        for e in &self.entries {
            let p = dest.join(safe_relative(&e.path)?);
            if as_root {
                // Owners first: a chown clears set-id bits the mode restores.
                let _ = std::os::unix::fs::lchown(&p, Some(e.uid), Some(e.gid));
            }
            match e.kind {
                Kind::File | Kind::Hardlink => {
                    let _ = fs::set_permissions(&p, fs::Permissions::from_mode(e.mode));
                    archive::set_mtime(&p, e.mtime, e.mtime_nsec, false);
                }
                Kind::Symlink => archive::set_mtime(&p, e.mtime, e.mtime_nsec, true),
                Kind::Fifo => {
                    let _ = fs::set_permissions(&p, fs::Permissions::from_mode(e.mode));
                    archive::set_mtime(&p, e.mtime, e.mtime_nsec, true);
                }
                Kind::Dir => dirs.push((p, e)),
            }
        }
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, e) in dirs {
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(e.mode));
            archive::set_mtime(&p, e.mtime, e.mtime_nsec, false);
        }
        // The restore root last: everything above changed its time.
        if let Some(r) = &root {
            r.apply(dest, as_root);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind, in_archive: bool, from: Option<i64>) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            kind,
            size: 1,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            ctime: 0,
            ino: 0,
            sha256: (kind == Kind::File).then(|| "00".repeat(32)),
            link: (kind == Kind::Hardlink).then(|| "a/f".to_owned()),
            sparse: false,
            in_archive,
            from_backup: from,
            status: "ok".into(),
        }
    }

    #[test]
    fn files_come_from_the_archive_that_holds_them() {
        let manifest = vec![
            entry("a", Kind::Dir, true, None),
            entry("a/f", Kind::File, false, Some(3)),
            entry("a/g", Kind::File, true, None),
            entry("b", Kind::Hardlink, true, None),
            entry("s", Kind::Symlink, true, None),
        ];
        let p = RestorePlan::select(5, &manifest, &[]).unwrap();
        assert_eq!(p.sources().collect::<Vec<_>>(), vec![3, 5]);
        assert!(p.wants(3, "a/f", Kind::File) && !p.wants(5, "a/f", Kind::File));
        assert!(p.wants(5, "a/g", Kind::File) && !p.wants(3, "a/g", Kind::File));
        // Directories and links only from the restored backup's archive.
        assert!(p.wants(5, "a", Kind::Dir) && !p.wants(3, "a", Kind::Dir));
        assert!(p.wants(5, "", Kind::Dir) && p.wants_any("s", Kind::Symlink));
        assert!(!p.wants_any("b", Kind::Hardlink) && !p.wants_any("x", Kind::File));
        assert_eq!(p.file_count(), 2);
        // Selecting the hard link brings its first name along, not the root.
        let p = RestorePlan::select(5, &manifest, &["b".into()]).unwrap();
        assert_eq!(p.entries.len(), 2);
        assert!(p.wants(3, "a/f", Kind::File) && !p.wants(5, "", Kind::Dir));
        assert!(RestorePlan::select(5, &manifest, &["nothing".into()]).is_err());
    }

    #[test]
    fn hostile_entries_are_refused() {
        for bad in ["../x", "/etc/passwd", ""] {
            let e = entry(bad, Kind::File, true, None);
            assert!(
                RestorePlan::from_entries(1, vec![e], true).is_err(),
                "{bad:?}"
            );
        }
        let mut link = entry("l", Kind::Hardlink, true, None);
        link.link = Some("../../etc/shadow".into());
        assert!(RestorePlan::from_entries(1, vec![link], true).is_err());
        // A file held by no backup.
        let orphan = entry("f", Kind::File, false, None);
        assert!(RestorePlan::from_entries(1, vec![orphan], true).is_err());
    }
}
