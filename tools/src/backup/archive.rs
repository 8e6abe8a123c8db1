//! Archives: a directory tree to a GNU-tar-readable stream with a SHA-256
//! per file, and back, safely (docs/BACKUP.md §5 and §7).
//!
//! The writer walks the tree without following symbolic links, in name
//! order, and writes GNU tar headers (long names and link targets use GNU
//! extensions; `tar -tvf` and `tar -xf` read the result). Hard links become
//! tar link entries to the first path of the inode; FIFOs are entries of
//! their own; the source directory itself is the first entry, `./`. Sparse
//! files are stored
//! expanded and restored with holes. A file that cannot be read, or that
//! changes while it is read, is reported through a callback (the error
//! channel) and recorded in the manifest; the job goes on.
//!
//! The reader ([`extract`]) refuses absolute paths, `..` components,
//! entries whose parent directory is a symbolic link (no writing through a
//! link created earlier in the archive), hard links to anything outside
//! the extraction, and device nodes; it creates symbolic links last, and
//! writes each file under a temporary name renamed into place once its
//! hash matches.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tar::{Builder, EntryType, Header, HeaderMode};

use super::wire::Level;

/// What a manifest entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (`link` is its target).
    Symlink,
    /// Another name of a regular file (`link` is the first name).
    Hardlink,
    /// A named pipe (FIFO): only its name and metadata.
    Fifo,
}

impl Kind {
    /// The catalog's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::Fifo => "fifo",
        }
    }
}

/// One file of a backup, as the manifest and the catalog record it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Relative path, `/`-separated, no `.` or `..`.
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Bytes (regular files).
    pub size: u64,
    /// Permission bits and type-independent mode bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: i64,
    /// Status change time, seconds (incremental detection).
    pub ctime: i64,
    /// Inode number (incremental detection, hard links).
    pub ino: u64,
    /// SHA-256 of the content (regular files), hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Symlink target, or the first name of a hard-linked file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// True if the file had holes (restored sparse).
    #[serde(default)]
    pub sparse: bool,
    /// True if this backup's archive holds the content; false if an
    /// earlier backup's does (incremental, unchanged).
    pub in_archive: bool,
    /// The backup whose archive holds the content (filled in by the
    /// server; `None` in a client's manifest means "this backup").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<i64>,
    /// `ok`, `changed` (changed while read: the copy may be inconsistent)
    /// or `error` (not backed up).
    pub status: String,
}

/// Reads a manifest as the repository stores it (a JSON array of
/// entries). Accepts any bytes; checks no paths ([`safe_relative`] does,
/// before any is used).
pub fn read_manifest(reader: impl Read) -> Result<Vec<ManifestEntry>> {
    Ok(serde_json::from_reader(reader)?)
}

/// An entry of the base backup, as the server sends it for an
/// incremental backup.
pub type BaseEntry = ManifestEntry;

/// What to back up and how.
#[derive(Clone, Debug, Default)]
pub struct WalkOptions {
    /// Exclude patterns (see [`excluded`]).
    pub excludes: Vec<String>,
    /// The base backup's entries by path (incremental).
    pub base: HashMap<String, BaseEntry>,
    /// Full or incremental.
    pub incremental: bool,
}

impl WalkOptions {
    /// Options for `level` with the base manifest `base`.
    pub fn new(level: Level, excludes: Vec<String>, base: Vec<BaseEntry>) -> WalkOptions {
        WalkOptions {
            excludes,
            base: base.into_iter().map(|e| (e.path.clone(), e)).collect(),
            incremental: level == Level::Incremental,
        }
    }
}

/// Matches `text` against a glob: `*` any run of characters but `/`, `**`
/// any run including `/`, `?` one character but `/`. Runs in time
/// proportional to the pattern's length times the text's, whatever the
/// pattern (a dynamic program, not backtracking: patterns come from the
/// server).
pub fn glob(pattern: &str, text: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Tok {
        AnyRun,
        Run,
        One,
        Lit(u8),
    }
    let p = pattern.as_bytes();
    let mut toks = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'*' if p.get(i + 1) == Some(&b'*') => {
                toks.push(Tok::AnyRun);
                i += 2;
            }
            b'*' => {
                toks.push(Tok::Run);
                i += 1;
            }
            b'?' => {
                toks.push(Tok::One);
                i += 1;
            }
            c => {
                toks.push(Tok::Lit(c));
                i += 1;
            }
        }
    }
    let t = text.as_bytes();
    // next[j]: do the tokens after the current one match t[j..]?
    let mut next = vec![false; t.len() + 1];
    next[t.len()] = true;
    let mut cur = vec![false; t.len() + 1];
    for tok in toks.iter().rev() {
        for j in (0..=t.len()).rev() {
            let here = t.get(j).copied();
            cur[j] = match *tok {
                Tok::AnyRun => next[j] || (here.is_some() && cur[j + 1]),
                Tok::Run => next[j] || (here.is_some_and(|c| c != b'/') && cur[j + 1]),
                Tok::One => here.is_some_and(|c| c != b'/') && next[j + 1],
                Tok::Lit(c) => here == Some(c) && next[j + 1],
            };
        }
        std::mem::swap(&mut cur, &mut next);
    }
    next[0]
}

/// True if relative path `rel` is excluded: a pattern without `/` matches
/// any path component's name; a pattern with `/` matches the whole
/// relative path (a leading `/` anchors it at the source root).
pub fn excluded(patterns: &[String], rel: &str) -> bool {
    patterns.iter().any(|p| {
        let p = p.trim_end_matches('/');
        if let Some(anchored) = p.strip_prefix('/') {
            glob(anchored, rel)
        } else if p.contains('/') {
            glob(p, rel) || glob(&format!("**/{p}"), rel)
        } else {
            rel.rsplit('/').next().is_some_and(|name| glob(p, name))
        }
    })
}

/// About how many stream bytes a backup of `root` takes: the sizes of its
/// regular files plus a header's worth per entry (for progress bars; a
/// quick walk, no file is read).
pub fn estimate(root: &Path, excludes: &[String]) -> u64 {
    fn go(dir: &Path, rel: &str, excludes: &[String]) -> u64 {
        let Ok(rd) = fs::read_dir(dir) else { return 0 };
        let mut total = 0;
        for e in rd.flatten() {
            let name = e.file_name();
            let name = path_key(Path::new(&name));
            let r = format!("{rel}{name}");
            if excluded(excludes, &r) {
                continue;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += 1024;
            if m.is_dir() {
                total += go(&e.path(), &format!("{r}/"), excludes);
            } else if m.is_file() {
                total += m.len();
            }
        }
        total
    }
    go(root, "", excludes)
}

/// A file name's bytes as the text the manifest, the catalog and the
/// control messages carry: the name itself when it is UTF-8; otherwise
/// its UTF-8 runs, and each other byte as a NUL character followed by two
/// hex digits (no real name holds a NUL, so the form is unambiguous and
/// [`key_bytes`] gives the bytes back).
pub fn name_key(bytes: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(bytes) {
        if !s.contains('\0') {
            return s.to_owned();
        }
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\0' {
                out.push('\0');
                out.push_str("00");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push('\0');
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// The bytes of a name written by [`name_key`]. A NUL not followed by two
/// hex digits stands for itself (a hostile manifest; the file system
/// refuses such a name later).
pub fn key_bytes(key: &str) -> Vec<u8> {
    if !key.contains('\0') {
        return key.as_bytes().to_vec();
    }
    let mut out = Vec::with_capacity(key.len());
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        if c == '\0' {
            let rest = chars.as_str();
            if let Some(b) = rest.get(..2).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                chars = rest[2..].chars();
                continue;
            }
        }
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
    out
}

/// The file system path of a manifest or archive key (see [`name_key`]).
pub fn key_path(key: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(&key_bytes(key)))
}

/// The key of a path (see [`name_key`]).
pub fn path_key(p: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    name_key(p.as_os_str().as_bytes())
}

/// Checks a path from an archive or a manifest (a key, see [`name_key`]):
/// relative, no `..`, no root or prefix, not empty. Returns its normal
/// components as a file system path.
pub fn safe_relative(path: &str) -> Result<PathBuf> {
    if path.is_empty() {
        bail!("an empty path");
    }
    let fs_path = key_path(path);
    if fs_path.has_root() {
        bail!("absolute path {path:?} refused (archives hold relative paths only)");
    }
    let mut out = PathBuf::new();
    for c in fs_path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                bail!("path {path:?} refused: it climbs out with '..'")
            }
            Component::RootDir | Component::Prefix(_) => {
                bail!("absolute path {path:?} refused")
            }
        }
    }
    if out.as_os_str().is_empty() {
        bail!("path {path:?} names no file");
    }
    Ok(out)
}

/// A reader that yields exactly `size` bytes of `inner` (zeros if it ends
/// early), hashing them, and remembers whether the size was wrong.
struct Exact<R> {
    inner: R,
    left: u64,
    hasher: Sha256,
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = if self.short {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            // The file shrank: pad so the archive stays well formed.
            self.short = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// The SHA-256 of a file's content, hex.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn entry_from(rel: &str, kind: Kind, m: &fs::Metadata) -> ManifestEntry {
    ManifestEntry {
        path: rel.to_owned(),
        kind,
        size: if kind == Kind::File || kind == Kind::Hardlink {
            m.len()
        } else {
            0
        },
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
        ctime: m.ctime(),
        ino: m.ino(),
        sha256: None,
        link: None,
        sparse: kind == Kind::File && m.blocks().saturating_mul(512) < m.len(),
        in_archive: true,
        from_backup: None,
        status: "ok".into(),
    }
}

fn header_for(m: &fs::Metadata, ty: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_metadata_in_mode(m, HeaderMode::Complete);
    h.set_entry_type(ty);
    h.set_size(0);
    h
}

/// Bytes read from a file at a time while it is backed up.
const FILE_READ: usize = 256 * 1024;

/// Writes the tree under `root` as a tar stream to `out`; calls `on_error`
/// with (path, message) for each file that could not be backed up
/// properly. Returns the manifest.
pub struct TreeWriter<'e, W: Write> {
    builder: Builder<W>,
    opts: WalkOptions,
    on_error: &'e mut dyn FnMut(&str, &str) -> Result<()>,
    manifest: Vec<ManifestEntry>,
    /// (dev, ino) → first path, and whether it went into this archive.
    inodes: HashMap<(u64, u64), (String, bool)>,
    errors: u64,
}

impl<'e, W: Write> TreeWriter<'e, W> {
    /// A writer to `out`.
    pub fn new(
        out: W,
        opts: WalkOptions,
        on_error: &'e mut dyn FnMut(&str, &str) -> Result<()>,
    ) -> TreeWriter<'e, W> {
        let mut builder = Builder::new(out);
        builder.mode(HeaderMode::Complete);
        builder.follow_symlinks(false);
        builder.sparse(false);
        TreeWriter {
            builder,
            opts,
            on_error,
            manifest: Vec::new(),
            inodes: HashMap::new(),
            errors: 0,
        }
    }

    fn error(&mut self, rel: &str, msg: &str) -> Result<()> {
        self.errors += 1;
        (self.on_error)(rel, msg)
    }

    /// Walks `root` and writes everything; returns the manifest, the error
    /// count, and the underlying writer.
    pub fn write_tree(mut self, root: &Path) -> Result<(Vec<ManifestEntry>, u64, W)> {
        let meta = fs::metadata(root)
            .with_context(|| format!("cannot read the source directory {}", root.display()))?;
        if !meta.is_dir() {
            bail!("the source {} is not a directory", root.display());
        }
        // The root itself (`./`, as GNU tar writes it), so a restore of the
        // whole tree gives the target directory the source's mode and time.
        let mut h = header_for(&meta, EntryType::Directory);
        self.builder
            .append_data(&mut h, "./", io::empty())
            .context("writing to the data stream")?;
        self.walk(root, "")?;
        let out = self
            .builder
            .into_inner()
            .context("writing the end of the archive")?;
        Ok((self.manifest, self.errors, out))
    }

    fn walk(&mut self, dir: &Path, rel_dir: &str) -> Result<()> {
        let mut names = match fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect::<Vec<_>>(),
            Err(e) => {
                let shown = if rel_dir.is_empty() { "." } else { rel_dir };
                return self.error(shown, &format!("cannot list the directory: {e}"));
            }
        };
        names.sort();
        for name in names {
            // Names that are not UTF-8 travel as keys (`name_key`) and
            // reach the archive as their bytes.
            let rel = format!("{rel_dir}{}", path_key(Path::new(&name)));
            if excluded(&self.opts.excludes, &rel) {
                continue;
            }
            let path = dir.join(&name);
            let m = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    self.error(&rel, &format!("cannot stat: {e}"))?;
                    continue;
                }
            };
            let ft = m.file_type();
            if ft.is_dir() {
                let e = entry_from(&rel, Kind::Dir, &m);
                let mut h = header_for(&m, EntryType::Directory);
                self.builder
                    .append_data(&mut h, key_path(&format!("{rel}/")), io::empty())
                    .context("writing to the data stream")?;
                self.manifest.push(e);
                self.walk(&path, &format!("{rel}/"))?;
            } else if ft.is_symlink() {
                let target = match fs::read_link(&path) {
                    Ok(t) => t,
                    Err(e) => {
                        self.error(&rel, &format!("cannot read the link: {e}"))?;
                        continue;
                    }
                };
                let mut e = entry_from(&rel, Kind::Symlink, &m);
                e.link = Some(path_key(&target));
                let mut h = header_for(&m, EntryType::Symlink);
                self.builder
                    .append_link(&mut h, key_path(&rel), &target)
                    .context("writing to the data stream")?;
                self.manifest.push(e);
            } else if ft.is_file() {
                self.file(&path, &rel, &m)?;
            } else if ft.is_fifo() {
                let e = entry_from(&rel, Kind::Fifo, &m);
                let mut h = header_for(&m, EntryType::Fifo);
                self.builder
                    .append_data(&mut h, key_path(&rel), io::empty())
                    .context("writing to the data stream")?;
                self.manifest.push(e);
            } else {
                self.error(
                    &rel,
                    "special file (device or socket) skipped: only files, directories, links \
                     and FIFOs are backed up",
                )?;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &Path, rel: &str, m: &fs::Metadata) -> Result<()> {
        let key = (m.dev(), m.ino());
        if m.nlink() > 1 {
            if let Some((first, first_in)) = self.inodes.get(&key).cloned() {
                let mut e = entry_from(rel, Kind::Hardlink, m);
                e.link = Some(first.clone());
                e.sha256 = self
                    .manifest
                    .iter()
                    .rev()
                    .find(|x| x.path == first)
                    .and_then(|x| x.sha256.clone());
                e.in_archive = first_in;
                if first_in {
                    let mut h = header_for(m, EntryType::Link);
                    self.builder
                        .append_link(&mut h, key_path(rel), key_path(&first))
                        .context("writing to the data stream")?;
                }
                self.manifest.push(e);
                return Ok(());
            }
        }
        let mut e = entry_from(rel, Kind::File, m);
        // Incremental: unchanged by size, mtime and inode (and ctime), or
        // by content hash when only the ctime moved.
        if self.opts.incremental {
            if let Some(b) = self.opts.base.get(rel).filter(|b| {
                b.kind == Kind::File
                    && b.status == "ok"
                    && b.size == e.size
                    && b.mtime == e.mtime
                    && b.mtime_nsec == e.mtime_nsec
                    && b.ino == e.ino
            }) {
                let same = if b.ctime == e.ctime {
                    true
                } else {
                    match hash_file(path) {
                        Ok(h) => Some(&h) == b.sha256.as_ref(),
                        Err(_) => false,
                    }
                };
                if same {
                    e.sha256 = b.sha256.clone();
                    e.in_archive = false;
                    e.from_backup = b.from_backup;
                    self.inodes.insert(key, (rel.to_owned(), false));
                    self.manifest.push(e);
                    return Ok(());
                }
            }
        }
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(err) => {
                e.status = "error".into();
                e.in_archive = false;
                self.manifest.push(e);
                return self.error(rel, &format!("cannot open: {err}; not backed up"));
            }
        };
        let mut h = header_for(m, EntryType::Regular);
        h.set_size(m.len());
        // tar copies 8 KiB at a time: read the file in large pieces, not
        // one system call per 8 KiB.
        let mut reader = Exact {
            inner: io::BufReader::with_capacity(FILE_READ, f),
            left: m.len(),
            hasher: Sha256::new(),
            short: false,
        };
        let appended = self.builder.append_data(&mut h, key_path(rel), &mut reader);
        if let Err(err) = appended {
            // A read error inside append_data leaves the stream broken
            // (the header promised bytes): that ends the job.
            return Err(anyhow!(err)).with_context(|| {
                format!("reading {rel} failed in the middle of the file; the backup stops")
            });
        }
        e.sha256 = Some(hex::encode(reader.hasher.clone().finalize()));
        let after = fs::symlink_metadata(path).ok();
        let changed = reader.short
            || after.is_none_or(|a| {
                a.len() != m.len()
                    || a.mtime() != m.mtime()
                    || a.mtime_nsec() != m.mtime_nsec()
                    || a.ino() != m.ino()
            });
        if changed {
            e.status = "changed".into();
            self.inodes.insert(key, (rel.to_owned(), true));
            self.manifest.push(e);
            return self.error(
                rel,
                "the file changed while it was read; the copy may be inconsistent (back it \
                 up again when it is quiet)",
            );
        }
        self.inodes.insert(key, (rel.to_owned(), true));
        self.manifest.push(e);
        Ok(())
    }
}

/// Writes a single in-memory or streamed entry (database backups).
pub fn append_blob<W: Write>(
    builder: &mut Builder<W>,
    name: &str,
    data: &mut dyn Read,
    size: u64,
    mode: u32,
) -> Result<ManifestEntry> {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_size(size);
    h.set_mode(mode);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    h.set_mtime(now);
    let mut reader = Exact {
        inner: data,
        left: size,
        hasher: Sha256::new(),
        short: false,
    };
    builder
        .append_data(&mut h, name, &mut reader)
        .context("writing to the data stream")?;
    if reader.short {
        bail!("{name}: the source ended before its announced {size} bytes");
    }
    Ok(ManifestEntry {
        path: name.to_owned(),
        kind: Kind::File,
        size,
        mode,
        uid: 0,
        gid: 0,
        mtime: i64::try_from(now).unwrap_or(0),
        mtime_nsec: 0,
        ctime: 0,
        ino: 0,
        sha256: Some(hex::encode(reader.hasher.finalize())),
        link: None,
        sparse: false,
        in_archive: true,
        from_backup: None,
        status: "ok".into(),
    })
}

/// How [`extract`] treats entries.
pub struct ExtractOptions<'a> {
    /// Take only entries this accepts (by archive path).
    pub want: &'a dyn Fn(&str, Kind) -> bool,
    /// Expected SHA-256 per file path; a mismatch is an error.
    pub hashes: &'a HashMap<String, String>,
    /// Files to restore with holes.
    pub sparse: &'a HashSet<String>,
    /// Set owners (only works as root; failures are ignored otherwise).
    pub owners: bool,
}

/// What an extraction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Files written.
    pub files: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Directories, symlinks, hard links and FIFOs made.
    pub others: u64,
    /// The archive's root entry (`./`), if it has one and `want` took it
    /// (as the empty path): its metadata, applied last by the caller.
    pub root: Option<RootMeta>,
}

/// The metadata of an archive's root directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootMeta {
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
}

impl RootMeta {
    /// Applies it to `dir` (owners only when `owners`).
    pub fn apply(&self, dir: &Path, owners: bool) {
        if owners {
            let _ = std::os::unix::fs::lchown(
                dir,
                u32::try_from(self.uid).ok(),
                u32::try_from(self.gid).ok(),
            );
        }
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(self.mode | 0o700));
        set_mtime(dir, self.mtime, 0, false);
    }
}

fn kind_of(t: EntryType) -> Option<Kind> {
    match t {
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Some(Kind::File),
        EntryType::Directory => Some(Kind::Dir),
        EntryType::Symlink => Some(Kind::Symlink),
        EntryType::Link => Some(Kind::Hardlink),
        EntryType::Fifo => Some(Kind::Fifo),
        _ => None,
    }
}

/// Creates the directories leading to `rel` under `dest`, refusing any
/// existing component that is not a real directory (a symlink planted
/// earlier). Returns the full path of `rel`.
fn prepare_parent(dest: &Path, rel: &Path) -> Result<PathBuf> {
    let mut at = dest.to_path_buf();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!(
                "{} refused: its parent {} is not a directory (a symbolic link in the \
                 archive may be trying to redirect the restore)",
                rel.display(),
                at.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&at).with_context(|| format!("creating {}", at.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", at.display())),
        }
    }
    Ok(dest.join(rel))
}

/// Removes whatever is at `p` (not following links), unless it is a
/// directory.
fn clear(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => bail!(
            "{} is a directory in the way of a file or link; refused (an archive that \
             writes under a name and then turns it into a link is hostile)",
            p.display()
        ),
        Ok(_) => fs::remove_file(p).with_context(|| format!("replacing {}", p.display())),
        Err(_) => Ok(()),
    }
}

/// A new file beside `target` (same directory, so a rename replaces the
/// target atomically), named `.<name>.stp-restore-<random>`, mode 0600.
fn temp_beside(target: &Path) -> Result<(PathBuf, File)> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let base = target
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    for _ in 0..16 {
        let tmp = dir.join(format!(
            ".{base}.stp-restore-{:016x}",
            rand::random::<u64>()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", tmp.display()));
            }
        }
    }
    bail!(
        "could not create a temporary file beside {}: every name tried exists",
        target.display()
    )
}

/// The granularity of holes in restored sparse files: a file system block.
const HOLE_BLOCK: u64 = 4096;

/// Writes `r` to `out`, leaving holes for all-zero blocks if `sparse`.
fn copy_out(r: &mut dyn Read, out: &mut File, sparse: bool) -> Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).context("reading the archive")?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if sparse {
            // Block by block (at file offsets that are multiples of
            // HOLE_BLOCK), so holes between small pieces of data stay holes.
            let mut off = 0;
            while off < n {
                let at = total + off as u64;
                let end = (off + (HOLE_BLOCK - at % HOLE_BLOCK) as usize).min(n);
                let piece = &buf[off..end];
                if piece.iter().all(|&b| b == 0) {
                    out.seek(SeekFrom::Current(piece.len() as i64))?;
                } else {
                    out.write_all(piece)?;
                }
                off = end;
            }
        } else {
            out.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    out.set_len(total)?;
    Ok((total, hex::encode(h.finalize())))
}

/// Copies the entries of the tar stream `reader` that `want` takes (by key,
/// `""` for the root entry `./`, and kind) into `out`, headers and content
/// as they are: a restore through the array sends one stream of exactly
/// what it restores. Refuses hostile names ([`safe_relative`]); an entry
/// cut short fails the copy (the header already promised its bytes).
pub fn copy_entries<W: Write>(
    reader: impl Read,
    out: &mut Builder<W>,
    want: &dyn Fn(&str, Kind) -> bool,
) -> Result<()> {
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries().context("reading the archive")? {
        let mut entry = entry.context("reading an archive entry (the archive is damaged)")?;
        let name = name_key(&entry.path_bytes());
        let Some(kind) = kind_of(entry.header().entry_type()) else {
            continue;
        };
        let is_root = !name.is_empty()
            && Path::new(&name)
                .components()
                .all(|c| c == Component::CurDir);
        let key = if is_root {
            String::new()
        } else {
            path_key(&safe_relative(&name).with_context(|| format!("archive entry {name:?}"))?)
        };
        if !want(&key, kind) {
            continue;
        }
        let mut h = entry.header().clone();
        let path = match kind {
            _ if is_root => PathBuf::from("./"),
            Kind::Dir => key_path(&format!("{key}/")),
            _ => key_path(&key),
        };
        let copied = match kind {
            Kind::File => {
                let left = entry.size();
                out.append_data(
                    &mut h,
                    &path,
                    NoShorter {
                        inner: &mut entry,
                        left,
                    },
                )
            }
            Kind::Symlink | Kind::Hardlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("{key}: a link without a target"))?
                    .into_owned();
                out.append_link(&mut h, &path, key_path(&name_key(&link)))
            }
            Kind::Dir | Kind::Fifo => out.append_data(&mut h, &path, io::empty()),
        };
        copied.with_context(|| format!("copying {key}"))?;
    }
    Ok(())
}

/// A reader of exactly `left` bytes of `inner`: an early end is an error,
/// not a short entry.
struct NoShorter<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for NoShorter<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the archive ends {} bytes into an entry's content",
                    self.left
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Extracts a tar stream into `dest` (created if missing), safely (see the
/// module documentation). Stops at the first refused or broken entry.
pub fn extract(reader: impl Read, dest: &Path, opts: &ExtractOptions<'_>) -> Result<Extracted> {
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut ar = tar::Archive::new(reader);
    let mut done = Extracted::default();
    let mut symlinks: Vec<(PathBuf, PathBuf, u32)> = Vec::new();
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    for entry in ar.entries().context("reading the archive")? {
        let mut entry = entry.context("reading an archive entry (the archive is damaged)")?;
        let name = name_key(&entry.path_bytes());
        let ty = entry.header().entry_type();
        let Some(kind) = kind_of(ty) else {
            if matches!(ty, EntryType::XGlobalHeader | EntryType::XHeader) {
                continue;
            }
            bail!("{name}: entry type {ty:?} refused (only files, directories and links restore)");
        };
        let is_root = Path::new(&name)
            .components()
            .all(|c| c == Component::CurDir)
            && !name.is_empty();
        if is_root {
            if kind != Kind::Dir {
                bail!("the archive's root entry {name:?} is not a directory; refused");
            }
            if (opts.want)("", Kind::Dir) {
                let h = entry.header();
                done.root = Some(RootMeta {
                    mode: h.mode().unwrap_or(0o755) & 0o7777,
                    mtime: h.mtime().map_or(0, |t| i64::try_from(t).unwrap_or(0)),
                    uid: h.uid().unwrap_or(0),
                    gid: h.gid().unwrap_or(0),
                });
            }
            continue;
        }
        let rel = safe_relative(&name).with_context(|| format!("archive entry {name:?}"))?;
        let key = path_key(&rel);
        if !(opts.want)(&key, kind) {
            continue;
        }
        let target = prepare_parent(dest, &rel)?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let mtime = entry.header().mtime().unwrap_or(0);
        let (uid, gid) = (
            entry.header().uid().unwrap_or(0),
            entry.header().gid().unwrap_or(0),
        );
        match kind {
            Kind::Dir => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => bail!("{key}: a non-directory is in the way of a directory; refused"),
                    Err(_) => fs::create_dir(&target)
                        .with_context(|| format!("creating {}", target.display()))?,
                }
                dirs.push((target, mode, mtime));
                done.others += 1;
            }
            Kind::File => {
                // Written under a temporary name beside the target and
                // renamed over it only once its hash is checked: a failed
                // restore leaves whatever was there before untouched.
                if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    clear(&target)?;
                }
                let (tmp, mut out) = temp_beside(&target)?;
                let written = (|| -> Result<u64> {
                    let (n, sum) = copy_out(&mut entry, &mut out, opts.sparse.contains(&key))
                        .with_context(|| format!("restoring {key}"))?;
                    if let Some(want) = opts.hashes.get(&key) {
                        if *want != sum {
                            bail!(
                                "{key}: the restored content's SHA-256 {sum} differs from the \
                                 manifest's {want}: the archive is damaged (run `stp backup \
                                 verify`); the file was left as it was"
                            );
                        }
                    }
                    out.sync_all().ok();
                    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
                    if opts.owners {
                        let _ = std::os::unix::fs::lchown(
                            &tmp,
                            u32::try_from(uid).ok(),
                            u32::try_from(gid).ok(),
                        );
                    }
                    set_mtime(&tmp, mtime as i64, 0, false);
                    fs::rename(&tmp, &target)
                        .with_context(|| format!("moving the restored {key} into place"))?;
                    Ok(n)
                })();
                drop(out);
                let n = match written {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        return Err(e);
                    }
                };
                done.files += 1;
                done.bytes += n;
            }
            Kind::Fifo => {
                clear(&target)?;
                nix::unistd::mkfifo(&target, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .with_context(|| format!("creating the FIFO {}", target.display()))?;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
                if opts.owners {
                    let _ = std::os::unix::fs::lchown(
                        &target,
                        u32::try_from(uid).ok(),
                        u32::try_from(gid).ok(),
                    );
                }
                set_mtime(&target, mtime as i64, 0, true);
                done.others += 1;
            }
            Kind::Symlink => {
                let link = entry
                    .link_name()
                    .context("reading a link target")?
                    .ok_or_else(|| anyhow!("{key}: symbolic link without a target"))?
                    .into_owned();
                symlinks.push((target, link, mtime as u32));
            }
            Kind::Hardlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow!("{key}: hard link without a target"))?
                    .into_owned();
                let link = name_key(&link);
                let src_rel =
                    safe_relative(&link).with_context(|| format!("{key}: hard link target"))?;
                let src = dest.join(&src_rel);
                let sm = fs::symlink_metadata(&src).with_context(|| {
                    format!("{key}: hard link to {link}, which this restore did not create")
                })?;
                if !sm.is_file() {
                    bail!("{key}: hard link to {link}, which is not a regular file; refused");
                }
                // The target's parents were checked when it was created;
                // check them again now (a link may have replaced one).
                prepare_parent(dest, &src_rel)?;
                clear(&target)?;
                fs::hard_link(&src, &target).with_context(|| format!("linking {key} to {link}"))?;
                done.others += 1;
            }
        }
    }
    for (path, target, mtime) in symlinks {
        clear(&path)?;
        std::os::unix::fs::symlink(&target, &path)
            .with_context(|| format!("creating the symbolic link {}", path.display()))?;
        set_mtime(&path, i64::from(mtime), 0, true);
        done.others += 1;
    }
    // Deepest first, so setting a parent's time is not undone by a child.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (path, mode, mtime) in dirs {
        let _ = fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700));
        set_mtime(&path, mtime as i64, 0, false);
    }
    Ok(done)
}

/// Sets a path's modification (and access) time; errors are ignored (the
/// content matters more).
pub fn set_mtime(path: &Path, secs: i64, nsec: i64, nofollow: bool) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(secs, nsec);
    let flag = if nofollow {
        UtimensatFlags::NoFollowSymlink
    } else {
        UtimensatFlags::FollowSymlink
    };
    let _ = utimensat(None, path, &t, &t, flag);
}

/// Reads a whole archive and checks every file's SHA-256 against
/// `hashes` (paths the manifest says are in it). Returns (files checked,
/// problems).
pub fn verify(reader: impl Read, hashes: &HashMap<String, String>) -> Result<(u64, Vec<String>)> {
    let mut ar = tar::Archive::new(reader);
    let mut seen = HashSet::new();
    let mut problems = Vec::new();
    let mut checked = 0u64;
    let entries = ar.entries().context("reading the archive")?;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("the archive is damaged: {e}"));
                break;
            }
        };
        if entry.header().entry_type() != EntryType::Regular {
            continue;
        }
        let name = name_key(&entry.path_bytes());
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut broken = false;
        loop {
            match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(e) => {
                    problems.push(format!("{name}: cannot read: {e}"));
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            break;
        }
        checked += 1;
        let sum = hex::encode(h.finalize());
        match hashes.get(&name) {
            Some(want) if *want == sum => {}
            Some(want) => problems.push(format!(
                "{name}: SHA-256 {sum} in the archive, {want} in the manifest"
            )),
            None => problems.push(format!("{name}: in the archive but not in the manifest")),
        }
        seen.insert(name);
    }
    for name in hashes.keys() {
        if !seen.contains(name) {
            problems.push(format!(
                "{name}: in the manifest but missing from the archive"
            ));
        }
    }
    problems.sort();
    Ok((checked, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*.tmp", "a.tmp"));
        assert!(!glob("*.tmp", "d/a.tmp"));
        assert!(glob("**/*.tmp", "d/e/a.tmp"));
        assert!(glob("ca?he", "cache"));
        assert!(excluded(&["*.tmp".into()], "d/e/a.tmp"));
        assert!(excluded(&["cache".into()], "x/cache"));
        assert!(excluded(&["/top".into()], "top"));
        assert!(!excluded(&["/top".into()], "x/top"));
        assert!(excluded(&["x/cache".into()], "a/x/cache"));
        assert!(!excluded(&["*.tmp".into()], "a.tmpx"));
    }

    /// The backtracking matcher the dynamic program replaced (exponential
    /// on patterns with many `**`), as the reference for small cases.
    fn glob_reference(p: &[u8], t: &[u8]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some(b'*') if p.get(1) == Some(&b'*') => {
                (0..=t.len()).any(|i| glob_reference(&p[2..], &t[i..]))
            }
            Some(b'*') => {
                let mut i = 0;
                loop {
                    if glob_reference(&p[1..], &t[i..]) {
                        return true;
                    }
                    if i == t.len() || t[i] == b'/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some(b'?') => !t.is_empty() && t[0] != b'/' && glob_reference(&p[1..], &t[1..]),
            Some(&c) => t.first() == Some(&c) && glob_reference(&p[1..], &t[1..]),
        }
    }

    /// Every pattern of up to 5 symbols over `a / * ?` against every text
    /// of up to 4 characters over `a b /`: the same answers as the
    /// reference.
    #[test]
    fn glob_agrees_with_the_reference_exhaustively() {
        fn all(alphabet: &[u8], max: usize) -> Vec<Vec<u8>> {
            let mut out = vec![Vec::new()];
            let mut last = vec![Vec::new()];
            for _ in 0..max {
                let mut grown = Vec::new();
                for s in &last {
                    for &c in alphabet {
                        let mut n = s.clone();
                        n.push(c);
                        grown.push(n);
                    }
                }
                out.extend(grown.iter().cloned());
                last = grown;
            }
            out
        }
        let texts = all(b"ab/", 4);
        for p in all(b"a/*?", 5) {
            let ps = std::str::from_utf8(&p).unwrap();
            for t in &texts {
                let ts = std::str::from_utf8(t).unwrap();
                assert_eq!(glob(ps, ts), glob_reference(&p, t), "{ps:?} on {ts:?}");
            }
        }
    }

    /// A pattern with many `**` that the backtracking matcher took
    /// exponential time on (about 200^10 steps here) is answered at once.
    #[test]
    fn glob_is_not_exponential() {
        let pattern = "a**".repeat(10) + "b";
        let text = "a".repeat(200);
        assert!(!glob(&pattern, &text));
        assert!(glob(&pattern, &(text + "b")));
    }

    #[test]
    fn hostile_paths() {
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../b").is_err());
        assert!(safe_relative("..").is_err());
        assert!(safe_relative("").is_err());
        assert!(safe_relative("./").is_err());
        assert_eq!(safe_relative("./a/b").unwrap(), PathBuf::from("a/b"));
        // An escaped '/' or '..' is checked after decoding.
        assert!(safe_relative("\x002e\x002e/x").is_err());
        assert!(safe_relative("\x002fetc").is_err());
    }

    #[test]
    fn names_that_are_not_utf8_round_trip_through_keys() {
        use std::os::unix::ffi::OsStrExt;
        for name in [
            &b"plain.txt"[..],
            b"caf\xe9",
            b"\xff\xfe",
            b"a\x00b",
            "\u{e9}t\u{e9}".as_bytes(),
            b"\x80/\xc3",
        ] {
            let k = name_key(name);
            assert_eq!(key_bytes(&k), name, "{k:?}");
            assert_eq!(key_path(&k).as_os_str().as_bytes(), name);
        }
        assert_eq!(name_key(b"caf\xe9"), "caf\x00e9");
        assert_eq!(name_key("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_ne!(name_key(b"\xff"), name_key(b"\xfe"));
    }
}
