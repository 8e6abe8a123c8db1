//! The repository: archives, manifests and the SQLite catalog
//! (docs/BACKUP.md §6).
//!
//! Layout under the repository directory:
//!
//! | path | what |
//! | --- | --- |
//! | `catalog.sqlite` | the catalog (WAL, `synchronous=FULL`) |
//! | `archives/<id>.tar` | the archive of backup `<id>`, exactly the stream the client sent |
//! | `archives/<id>.tar.partial` | an archive being received |
//! | `manifests/<id>.json` | the manifest: every file with its SHA-256 |
//!
//! The catalog's `restores` table records every restore through the array
//! to another host (its backup, client, destination, outcome and where its
//! bytes went).
//!
//! A backup becomes `complete` only after its archive is fsynced and
//! renamed into place, the directory fsynced, and its manifest written and
//! fsynced; then one catalog transaction records its files and marks it
//! complete. A backup interrupted at any point stays `running` or `failed`;
//! [`Repo::open`] turns leftover `running` rows into `failed`
//! ("interrupted") and deletes their files, so the next run starts clean.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::archive::{self, Extracted, Kind, ManifestEntry};
use super::pipe::StreamReport;
use super::progress::Progress;
use super::restore::RestorePlan;
use super::traffic::ChannelUse;

/// One backup as the catalog records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackupInfo {
    /// The id.
    pub id: i64,
    /// `fs` or `db`.
    pub kind: String,
    /// The client's name.
    pub client: String,
    /// The source: a directory, a database path, or a command.
    pub source: String,
    /// `full` or `incremental` (db backups are full).
    pub level: String,
    /// The base backup of an incremental.
    pub base_id: Option<i64>,
    /// Seconds since the epoch.
    pub started: f64,
    /// Seconds since the epoch, when it ended.
    pub finished: Option<f64>,
    /// `running`, `complete` or `failed`.
    pub status: String,
    /// Bytes of the archive.
    pub bytes: i64,
    /// Entries in the manifest.
    pub files: i64,
    /// SHA-256 of the archive, hex.
    pub archive_sha256: Option<String>,
    /// `stp`, `tcp` or `stp+tcp`.
    pub channel: Option<String>,
    /// Why the data left STP (or never used it).
    pub fallback_reason: Option<String>,
    /// Per-file errors.
    pub errors: i64,
    /// What went wrong, for failed backups.
    pub message: Option<String>,
    /// Bytes and time per channel, as the server counted them at its
    /// sockets (`None`: recorded before the catalog kept them, or the
    /// session ended before it could be counted).
    pub traffic: Option<ChannelUse>,
}

/// One restore through the array as the catalog records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RestoreInfo {
    /// The restore's id.
    pub id: i64,
    /// The backup restored.
    pub backup_id: i64,
    /// The client's name, as it gave it.
    pub client: String,
    /// Where the files went on the client.
    pub to: String,
    /// The paths restored (empty: everything).
    pub paths: Vec<String>,
    /// Seconds since the epoch.
    pub started: f64,
    /// Seconds since the epoch, when it ended.
    pub finished: Option<f64>,
    /// `running`, `complete` or `failed`.
    pub status: String,
    /// Stream bytes.
    pub bytes: i64,
    /// Files the client wrote.
    pub files: i64,
    /// `stp`, `tcp` or `stp+tcp`.
    pub channel: Option<String>,
    /// Why the data left STP (or never used it).
    pub fallback_reason: Option<String>,
    /// A summary, or what went wrong.
    pub message: Option<String>,
    /// Bytes and time per channel, as the server counted them at its
    /// sockets.
    pub traffic: Option<ChannelUse>,
}

/// How a restore ended, for [`Repo::end_restore`].
#[derive(Clone, Debug)]
pub struct RestoreEnd {
    /// True when the client has every file in place.
    pub ok: bool,
    /// Stream bytes.
    pub bytes: u64,
    /// Files the client wrote.
    pub files: u64,
    /// `stp`, `tcp` or `stp+tcp`.
    pub channel: String,
    /// Why the data left STP, if it did.
    pub fallback_reason: Option<String>,
    /// A summary, or what went wrong.
    pub message: String,
}

/// A per-file error as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileErrorRecord {
    /// The path.
    pub path: String,
    /// The message.
    pub message: String,
}

/// The outcome of [`Repo::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The backup.
    pub id: i64,
    /// Files whose hash was checked.
    pub files_checked: u64,
    /// Everything that did not match (empty: all good).
    pub problems: Vec<String>,
}

/// Where a received stream goes: the file as-is, or through gzip.
#[derive(Debug)]
enum Sink {
    Plain(File),
    Gzip(flate2::write::GzEncoder<File>),
}

/// A backup being received: its row is `running` and its archive is a
/// `.partial` file.
#[derive(Debug)]
pub struct Pending {
    /// The catalog id.
    pub id: i64,
    partial: PathBuf,
    /// Where the archive goes once complete.
    final_path: PathBuf,
    sink: Sink,
}

impl Pending {
    /// Where the stream goes (the repository compresses it if configured).
    pub fn sink(&mut self) -> &mut dyn Write {
        match &mut self.sink {
            Sink::Plain(f) => f,
            Sink::Gzip(g) => g,
        }
    }
}

/// The repository.
pub struct Repo {
    root: PathBuf,
    db: Mutex<Connection>,
    /// A shared lock on `lock` for as long as this handle lives: the sweep
    /// of interrupted backups needs it exclusively, so it never removes the
    /// partial archive of a backup another handle is receiving.
    _lock: nix::fcntl::Flock<File>,
    /// Show progress bars on long reads (verify, restore).
    progress: bool,
    /// Store new archives gzip-compressed (`<id>.tar.gz`).
    gzip: bool,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// Backups being received by this process: (catalog, id, partial archive).
static IN_FLIGHT: Mutex<Vec<(PathBuf, i64, PathBuf)>> = Mutex::new(Vec::new());

fn in_flight() -> MutexGuard<'static, Vec<(PathBuf, i64, PathBuf)>> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget_in_flight(id: i64, partial: &Path) {
    in_flight().retain(|(_, i, p)| !(*i == id && p == partial));
}

/// Marks every backup this process is receiving `failed` with `reason` and
/// removes its partial archive: for a signal handler, just before the
/// process exits (a backup that completes first stays complete).
pub fn interrupt_in_flight(reason: &str) {
    let list = std::mem::take(&mut *in_flight());
    for (catalog, id, partial) in list {
        let _ = fs::remove_file(&partial);
        if let Ok(c) = Connection::open(&catalog) {
            let _ = c.busy_timeout(std::time::Duration::from_secs(5));
            let _ = c.execute(
                "UPDATE backups SET status = 'failed', finished = ?2, message = ?3 \
                 WHERE id = ?1 AND status = 'running'",
                params![id, now(), reason],
            );
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS backups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    client TEXT NOT NULL,
    source TEXT NOT NULL,
    level TEXT NOT NULL,
    base_id INTEGER,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    archive_sha256 TEXT,
    channel TEXT,
    fallback_reason TEXT,
    errors INTEGER NOT NULL DEFAULT 0,
    message TEXT
);
CREATE TABLE IF NOT EXISTS files (
    backup_id INTEGER NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    sha256 TEXT,
    from_backup INTEGER,
    status TEXT NOT NULL,
    PRIMARY KEY (backup_id, path)
);
CREATE TABLE IF NOT EXISTS file_errors (
    backup_id INTEGER NOT NULL REFERENCES backups(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS restores (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    backup_id INTEGER NOT NULL,
    client TEXT NOT NULL,
    dest TEXT NOT NULL,
    paths TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    files INTEGER NOT NULL DEFAULT 0,
    channel TEXT,
    fallback_reason TEXT,
    message TEXT,
    array_bytes INTEGER,
    array_seconds REAL,
    lan_bytes INTEGER,
    lan_control_bytes INTEGER,
    lan_error_bytes INTEGER,
    lan_data_bytes INTEGER,
    lan_seconds REAL
);
";

/// Fsyncs a directory (so a rename or create in it is durable).
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Per-channel counts from seven columns starting at `at` (array_bytes
/// first; `None` when array_bytes is NULL: not recorded).
fn row_traffic(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<ChannelUse>> {
    Ok(match r.get::<_, Option<i64>>(at)? {
        None => None,
        Some(array) => Some(ChannelUse {
            array_bytes: count(array),
            array_seconds: r.get::<_, Option<f64>>(at + 1)?.unwrap_or(0.0),
            lan_bytes: count(r.get::<_, Option<i64>>(at + 2)?.unwrap_or(0)),
            lan_control_bytes: count(r.get::<_, Option<i64>>(at + 3)?.unwrap_or(0)),
            lan_error_bytes: count(r.get::<_, Option<i64>>(at + 4)?.unwrap_or(0)),
            lan_data_bytes: count(r.get::<_, Option<i64>>(at + 5)?.unwrap_or(0)),
            lan_seconds: r.get::<_, Option<f64>>(at + 6)?.unwrap_or(0.0),
        }),
    })
}

const RESTORE_COLS: &str = "id, backup_id, client, dest, paths, started, finished, status, bytes, \
                            files, channel, fallback_reason, message, array_bytes, array_seconds, \
                            lan_bytes, lan_control_bytes, lan_error_bytes, lan_data_bytes, \
                            lan_seconds";

fn row_restore(r: &rusqlite::Row<'_>) -> rusqlite::Result<RestoreInfo> {
    let paths: String = r.get(4)?;
    Ok(RestoreInfo {
        id: r.get(0)?,
        backup_id: r.get(1)?,
        client: r.get(2)?,
        to: r.get(3)?,
        paths: serde_json::from_str(&paths).unwrap_or_default(),
        started: r.get(5)?,
        finished: r.get(6)?,
        status: r.get(7)?,
        bytes: r.get(8)?,
        files: r.get(9)?,
        channel: r.get(10)?,
        fallback_reason: r.get(11)?,
        message: r.get(12)?,
        traffic: row_traffic(r, 13)?,
    })
}

fn row_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<BackupInfo> {
    Ok(BackupInfo {
        id: r.get(0)?,
        kind: r.get(1)?,
        client: r.get(2)?,
        source: r.get(3)?,
        level: r.get(4)?,
        base_id: r.get(5)?,
        started: r.get(6)?,
        finished: r.get(7)?,
        status: r.get(8)?,
        bytes: r.get(9)?,
        files: r.get(10)?,
        archive_sha256: r.get(11)?,
        channel: r.get(12)?,
        fallback_reason: r.get(13)?,
        errors: r.get(14)?,
        message: r.get(15)?,
        traffic: row_traffic(r, 16)?,
    })
}

/// A stored count (never negative when this code wrote it).
fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A count as the catalog stores it (one beyond `i64` stores as its
/// largest).
fn stored(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The columns of per-channel accounting, added to catalogs made before
/// they existed (their old rows read as "not recorded").
const TRAFFIC_COLUMNS: [(&str, &str); 7] = [
    ("array_bytes", "INTEGER"),
    ("array_seconds", "REAL"),
    ("lan_bytes", "INTEGER"),
    ("lan_control_bytes", "INTEGER"),
    ("lan_error_bytes", "INTEGER"),
    ("lan_data_bytes", "INTEGER"),
    ("lan_seconds", "REAL"),
];

/// Adds what later versions keep to an older catalog.
fn upgrade(conn: &Connection) -> Result<()> {
    let have: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('backups')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for (col, ty) in TRAFFIC_COLUMNS {
        if !have.iter().any(|h| h == col) {
            conn.execute_batch(&format!("ALTER TABLE backups ADD COLUMN {col} {ty}"))?;
        }
    }
    Ok(())
}

const COLS: &str = "id, kind, client, source, level, base_id, started, finished, status, bytes, \
                    files, archive_sha256, channel, fallback_reason, errors, message, \
                    array_bytes, array_seconds, lan_bytes, lan_control_bytes, lan_error_bytes, \
                    lan_data_bytes, lan_seconds";

impl Repo {
    /// Opens (creating if needed) the repository at `root` and sweeps away
    /// what interrupted backups left.
    pub fn open(root: impl AsRef<Path>) -> Result<Repo> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let root = root.as_ref().to_path_buf();
        // The repository holds copies of private files: only its owner
        // may read it (directories 0700, files 0600).
        for d in ["archives", "manifests"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root.join(d))
                .with_context(|| {
                    format!(
                        "cannot create the repository directory {}: check the path and \
                         permissions",
                        root.join(d).display()
                    )
                })?;
        }
        let db_path = root.join("catalog.sqlite");
        if !db_path.exists() {
            // SQLite gives its journal files the catalog's mode.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&db_path)
                .with_context(|| format!("cannot create the catalog {}", db_path.display()))?;
            let _ = fs::set_permissions(&db_path, fs::Permissions::from_mode(0o600));
        }
        let conn = Connection::open(&db_path)
            .with_context(|| format!("cannot open the catalog {}", db_path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("setting up the catalog {}", db_path.display()))?;
        upgrade(&conn).with_context(|| {
            format!(
                "adding the per-channel columns to the catalog {}: check that it is writable",
                db_path.display()
            )
        })?;
        use nix::fcntl::{Flock, FlockArg};
        let lock_path = root.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        // Alone: sweep, then share. Not alone: another handle may be
        // receiving a backup, so leave the sweep to a later open.
        let (lock, alone) = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => (l, true),
            Err((f, _)) => match Flock::lock(f, FlockArg::LockShared) {
                Ok(l) => (l, false),
                Err((_, e)) => return Err(anyhow!("cannot lock {}: {e}", lock_path.display())),
            },
        };
        let repo = Repo {
            root,
            db: Mutex::new(conn),
            _lock: lock,
            progress: false,
            gzip: false,
        };
        if alone {
            repo.sweep()?;
            repo._lock
                .relock(FlockArg::LockShared)
                .with_context(|| format!("sharing the lock on {}", lock_path.display()))?;
        }
        Ok(repo)
    }

    /// Shows progress bars (bytes, rate, ETA) on verify and restore when
    /// stderr is a terminal.
    pub fn show_progress(&mut self, on: bool) {
        self.progress = on;
    }

    fn bar(&self, what: &str, total: u64) -> Progress {
        Progress::bytes(what, Some(total), !self.progress)
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores new archives gzip-compressed (`<id>.tar.gz`, which GNU tar
    /// reads with `-z`); hashes and sizes in the catalog stay those of the
    /// uncompressed tar stream.
    pub fn set_gzip(&mut self, on: bool) {
        self.gzip = on;
    }

    /// The archive of backup `id`: `<id>.tar.gz` if that exists, else
    /// `<id>.tar`.
    pub fn archive_path(&self, id: i64) -> PathBuf {
        let gz = self.root.join("archives").join(format!("{id}.tar.gz"));
        if gz.exists() {
            gz
        } else {
            self.root.join("archives").join(format!("{id}.tar"))
        }
    }

    /// Opens backup `id`'s archive as a tar stream (decompressing if
    /// needed); returns it with its size on disk.
    fn open_archive(&self, id: i64) -> Result<(Box<dyn Read>, u64)> {
        let path = self.archive_path(id);
        let f = File::open(&path)
            .with_context(|| format!("cannot open the archive {} (backup {id})", path.display()))?;
        let size = f.metadata().map_or(0, |m| m.len());
        let buffered = BufReader::with_capacity(1 << 20, f);
        let r: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::GzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        Ok((r, size))
    }

    fn manifest_path(&self, id: i64) -> PathBuf {
        self.root.join("manifests").join(format!("{id}.json"))
    }

    /// Marks `running` backups failed ("interrupted") and removes every
    /// file that belongs to no complete backup. Returns the ids marked.
    /// [`Repo::open`] calls it when no other handle has the repository
    /// open; call it only when no backup is in progress.
    pub fn sweep(&self) -> Result<Vec<i64>> {
        let db = self.db();
        let ids: Vec<i64> = db
            .prepare("SELECT id FROM backups WHERE status = 'running'")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        db.execute(
            "UPDATE backups SET status = 'failed', finished = ?1, message = \
             'interrupted: the server stopped before the backup was complete' \
             WHERE status = 'running'",
            params![now()],
        )?;
        db.execute(
            "UPDATE restores SET status = 'failed', finished = ?1, message = \
             'interrupted: the server stopped before the restore was complete' \
             WHERE status = 'running'",
            params![now()],
        )?;
        let complete: HashSet<i64> = db
            .prepare("SELECT id FROM backups WHERE status = 'complete'")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        drop(db);
        for dir in ["archives", "manifests"] {
            for e in fs::read_dir(self.root.join(dir))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.split('.').next().and_then(|s| s.parse::<i64>().ok());
                let keep = name == "lock"
                    || (!name.ends_with(".partial") && id.is_some_and(|i| complete.contains(&i)));
                if !keep {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(ids)
    }

    /// Starts a backup: a `running` row and an empty `.partial` archive.
    pub fn begin(
        &self,
        kind: &str,
        client: &str,
        source: &str,
        level: &str,
        base_id: Option<i64>,
    ) -> Result<Pending> {
        let id = {
            let db = self.db();
            db.execute(
                "INSERT INTO backups (kind, client, source, level, base_id, started, status) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running')",
                params![kind, client, source, level, base_id, now()],
            )?;
            db.last_insert_rowid()
        };
        let name = if self.gzip {
            format!("{id}.tar.gz")
        } else {
            format!("{id}.tar")
        };
        let final_path = self.root.join("archives").join(&name);
        let partial = self.root.join("archives").join(format!("{name}.partial"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("creating {}", partial.display()))?;
        in_flight().push((self.root.join("catalog.sqlite"), id, partial.clone()));
        let sink = if self.gzip {
            Sink::Gzip(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ))
        } else {
            Sink::Plain(file)
        };
        Ok(Pending {
            id,
            partial,
            final_path,
            sink,
        })
    }

    /// Records the channel a running backup uses (so a failed one says it
    /// too).
    pub fn note_channel(&self, id: i64, channel: &str, reason: Option<&str>) -> Result<()> {
        self.db().execute(
            "UPDATE backups SET channel = ?2, fallback_reason = ?3 WHERE id = ?1",
            params![id, channel, reason],
        )?;
        Ok(())
    }

    /// Records where a backup's bytes went (complete or failed).
    pub fn record_traffic(&self, id: i64, t: &ChannelUse) -> Result<()> {
        self.write_traffic("backups", id, t)
    }

    /// Writes the per-channel counts of row `id` of `table` (`backups` or
    /// `restores`, which keep them in the same columns).
    fn write_traffic(&self, table: &str, id: i64, t: &ChannelUse) -> Result<()> {
        self.db().execute(
            &format!(
                "UPDATE {table} SET array_bytes = ?2, array_seconds = ?3, lan_bytes = ?4, \
                 lan_control_bytes = ?5, lan_error_bytes = ?6, lan_data_bytes = ?7, \
                 lan_seconds = ?8 WHERE id = ?1"
            ),
            params![
                id,
                stored(t.array_bytes),
                t.array_seconds,
                stored(t.lan_bytes),
                stored(t.lan_control_bytes),
                stored(t.lan_error_bytes),
                stored(t.lan_data_bytes),
                t.lan_seconds
            ],
        )?;
        Ok(())
    }

    /// Makes a received backup durable and marks it complete: fsync the
    /// archive, rename it into place, fsync the directory, write and fsync
    /// the manifest, then one transaction with its files, errors and
    /// status. `manifest` entries with content in this archive get
    /// `from_backup = id`.
    pub fn commit(
        &self,
        pending: Pending,
        mut manifest: Vec<ManifestEntry>,
        stream: &StreamReport,
        errors: &[FileErrorRecord],
    ) -> Result<BackupInfo> {
        let id = pending.id;
        forget_in_flight(id, &pending.partial);
        let (file, plain) = match pending.sink {
            Sink::Plain(f) => (f, true),
            Sink::Gzip(g) => (
                g.finish()
                    .with_context(|| format!("compressing {}", pending.partial.display()))?,
                false,
            ),
        };
        file.sync_all()
            .with_context(|| format!("syncing {}", pending.partial.display()))?;
        let size = file.metadata()?.len();
        drop(file);
        if plain && size != stream.bytes {
            bail!(
                "the archive {} holds {size} bytes but {} were received: the disk may be full",
                pending.partial.display(),
                stream.bytes
            );
        }
        let archive = pending.final_path;
        fs::rename(&pending.partial, &archive)
            .with_context(|| format!("renaming {} into place", pending.partial.display()))?;
        sync_dir(&self.root.join("archives"))?;
        for e in &mut manifest {
            if e.in_archive {
                e.from_backup = Some(id);
            }
        }
        let mpath = self.manifest_path(id);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&mpath)
                .with_context(|| format!("creating {}", mpath.display()))?;
            serde_json::to_writer(&mut f, &manifest)?;
            f.sync_all()?;
        }
        sync_dir(&self.root.join("manifests"))?;
        let mut db = self.db();
        let tx = db.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT INTO files (backup_id, path, kind, size, mode, uid, gid, mtime, sha256, \
                 from_backup, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?;
            for e in &manifest {
                ins.execute(params![
                    id,
                    e.path,
                    e.kind.as_str(),
                    e.size as i64,
                    e.mode,
                    e.uid,
                    e.gid,
                    e.mtime,
                    e.sha256,
                    e.from_backup,
                    e.status
                ])?;
            }
            let mut err = tx.prepare(
                "INSERT INTO file_errors (backup_id, path, message) VALUES (?1, ?2, ?3)",
            )?;
            for e in errors {
                err.execute(params![id, e.path, e.message])?;
            }
        }
        tx.execute(
            "UPDATE backups SET status = 'complete', finished = ?2, bytes = ?3, files = ?4, \
             archive_sha256 = ?5, channel = ?6, fallback_reason = COALESCE(?7, fallback_reason), \
             errors = ?8 WHERE id = ?1",
            params![
                id,
                now(),
                stream.bytes as i64,
                manifest.len() as i64,
                stream.sha256,
                stream.channels.summary(),
                stream.channels.reason,
                errors.len() as i64
            ],
        )?;
        tx.commit().context("committing the catalog")?;
        drop(db);
        self.get(id)
    }

    /// Abandons a backup: removes its partial archive and marks it failed
    /// with `message`.
    pub fn fail(&self, pending: Pending, message: &str) -> Result<()> {
        let Pending {
            id, partial, sink, ..
        } = pending;
        drop(sink);
        forget_in_flight(id, &partial);
        let _ = fs::remove_file(&partial);
        self.db().execute(
            "UPDATE backups SET status = 'failed', finished = ?2, message = ?3 WHERE id = ?1",
            params![id, now(), message],
        )?;
        Ok(())
    }

    /// Every backup, oldest first.
    pub fn list(&self) -> Result<Vec<BackupInfo>> {
        let db = self.db();
        let mut st = db.prepare(&format!("SELECT {COLS} FROM backups ORDER BY id"))?;
        let v = st
            .query_map([], row_info)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// One backup.
    pub fn get(&self, id: i64) -> Result<BackupInfo> {
        self.db()
            .query_row(
                &format!("SELECT {COLS} FROM backups WHERE id = ?1"),
                params![id],
                row_info,
            )
            .optional()?
            .ok_or_else(|| anyhow!("no backup {id} in the catalog (`stp backup list` shows them)"))
    }

    /// The newest complete backup of `kind`/`client`/`source`.
    pub fn latest_complete(&self, kind: &str, client: &str, source: &str) -> Result<Option<i64>> {
        Ok(self
            .db()
            .query_row(
                "SELECT max(id) FROM backups WHERE status = 'complete' AND kind = ?1 AND \
                 client = ?2 AND source = ?3",
                params![kind, client, source],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten())
    }

    /// The per-file errors recorded for a backup.
    pub fn file_errors(&self, id: i64) -> Result<Vec<FileErrorRecord>> {
        let db = self.db();
        let mut st = db
            .prepare("SELECT path, message FROM file_errors WHERE backup_id = ?1 ORDER BY rowid")?;
        let v = st
            .query_map(params![id], |r| {
                Ok(FileErrorRecord {
                    path: r.get(0)?,
                    message: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    fn complete(&self, id: i64) -> Result<BackupInfo> {
        let info = self.get(id)?;
        if info.status != "complete" {
            bail!(
                "backup {id} is {} ({}); only complete backups can be used",
                info.status,
                info.message.as_deref().unwrap_or("no message")
            );
        }
        Ok(info)
    }

    /// The manifest of complete backup `id`.
    pub fn manifest(&self, id: i64) -> Result<Vec<ManifestEntry>> {
        self.complete(id)?;
        let p = self.manifest_path(id);
        let f = File::open(&p).with_context(|| {
            format!(
                "cannot open the manifest {}: the repository is damaged",
                p.display()
            )
        })?;
        archive::read_manifest(BufReader::new(f))
            .with_context(|| format!("the manifest {} is damaged", p.display()))
    }

    /// Re-reads backup `id`'s archive and checks its SHA-256 and every
    /// file's against the manifest and the catalog.
    pub fn verify(&self, id: i64) -> Result<VerifyReport> {
        let info = self.complete(id)?;
        let manifest = self.manifest(id)?;
        let mut problems = Vec::new();
        let (r, _) = self.open_archive(id)?;
        let bar = self.bar("verifying", info.bytes.max(0) as u64);
        let mut hashing = HashingReader {
            inner: r,
            hasher: Sha256::new(),
            bytes: 0,
            bar: bar.clone(),
        };
        let hashes: HashMap<String, String> = manifest
            .iter()
            .filter(|e| e.kind == Kind::File && e.in_archive)
            .filter_map(|e| e.sha256.clone().map(|h| (e.path.clone(), h)))
            .collect();
        let (checked, mut p) = archive::verify(&mut hashing, &hashes)?;
        problems.append(&mut p);
        io::copy(&mut hashing, &mut io::sink()).context("reading the archive's tail")?;
        bar.finish();
        let sum = hex::encode(hashing.hasher.finalize());
        if Some(&sum) != info.archive_sha256.as_ref() {
            problems.push(format!(
                "the archive's SHA-256 is {sum}, the catalog recorded {}",
                info.archive_sha256.as_deref().unwrap_or("none")
            ));
        }
        if hashing.bytes != info.bytes as u64 {
            problems.push(format!(
                "the archive holds {} bytes, the catalog recorded {}",
                hashing.bytes, info.bytes
            ));
        }
        // The catalog's file rows must agree with the manifest.
        let db = self.db();
        let rows: HashMap<String, Option<String>> = db
            .prepare("SELECT path, sha256 FROM files WHERE backup_id = ?1")?
            .query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        drop(db);
        for e in &manifest {
            if rows.get(&e.path) != Some(&e.sha256) {
                problems.push(format!("{}: the catalog and the manifest disagree", e.path));
            }
        }
        // Content held by earlier backups must still exist.
        let needed: BTreeSet<i64> = manifest
            .iter()
            .filter(|e| !e.in_archive && e.status != "error")
            .filter_map(|e| e.from_backup)
            .collect();
        for b in needed {
            if !self.archive_path(b).exists() {
                problems.push(format!(
                    "backup {b}, which holds unchanged files, is missing"
                ));
            }
        }
        Ok(VerifyReport {
            id,
            files_checked: checked,
            problems,
        })
    }

    /// Restores backup `id` (all of it, or the entries at or under
    /// `paths`) into `dest`, taking unchanged files of an incremental
    /// backup from the backups that hold them. Checks every file's
    /// SHA-256; refuses hostile paths (see [`archive::extract`]).
    pub fn restore(&self, id: i64, dest: &Path, paths: &[String]) -> Result<Extracted> {
        let plan = self.restore_plan(id, paths)?;
        let bar = self.bar("restoring", self.restore_bytes(&plan));
        let mut offset = 0u64;
        let mut total = Extracted::default();
        for src in plan.sources() {
            let size = self.get(src).map_or(0, |b| b.bytes.max(0) as u64);
            let (r, _) = self.open_archive(src)?;
            let reader = HashingReader {
                inner: r,
                hasher: Sha256::new(),
                bytes: offset,
                bar: bar.clone(),
            };
            offset += size;
            let want = |p: &str, k: Kind| plan.wants(src, p, k);
            let done = archive::extract(reader, dest, &plan.extract_options(&want))
                .with_context(|| format!("restoring from backup {src}'s archive"))?;
            total.files += done.files;
            total.bytes += done.bytes;
            total.others += done.others;
            total.root = total.root.or(done.root);
        }
        bar.finish();
        plan.finish(dest, total.root, &mut total)?;
        Ok(total)
    }

    /// What restoring backup `id` (everything, or the entries at or under
    /// `paths`) takes: its entries and the archives that hold them.
    pub fn restore_plan(&self, id: i64, paths: &[String]) -> Result<RestorePlan> {
        RestorePlan::select(id, &self.manifest(id)?, paths)
    }

    /// The stream bytes of the archives `plan` reads (about what a
    /// restore through the array sends).
    pub fn restore_bytes(&self, plan: &RestorePlan) -> u64 {
        plan.sources()
            .filter_map(|b| self.get(b).ok())
            .map(|b| b.bytes.max(0) as u64)
            .sum()
    }

    /// Writes one tar stream holding exactly what `plan` restores, read
    /// from each archive it names in turn (a restore through the array).
    pub fn write_restore(&self, plan: &RestorePlan, out: &mut dyn Write) -> Result<()> {
        let mut b = tar::Builder::new(out);
        for src in plan.sources() {
            let (r, _) = self.open_archive(src)?;
            let want = |p: &str, k: Kind| plan.wants(src, p, k);
            archive::copy_entries(r, &mut b, &want)
                .with_context(|| format!("reading backup {src}'s archive"))?;
        }
        b.into_inner()
            .context("writing the end of the restore stream")?;
        Ok(())
    }

    /// Starts recording a restore through the array: a `running` row.
    pub fn begin_restore(
        &self,
        backup_id: i64,
        client: &str,
        dest: &str,
        paths: &[String],
    ) -> Result<i64> {
        let db = self.db();
        db.execute(
            "INSERT INTO restores (backup_id, client, dest, paths, started, status) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
            params![
                backup_id,
                client,
                dest,
                serde_json::to_string(paths)?,
                now()
            ],
        )?;
        Ok(db.last_insert_rowid())
    }

    /// Records the channel a running restore uses.
    pub fn note_restore_channel(&self, id: i64, channel: &str, reason: Option<&str>) -> Result<()> {
        self.db().execute(
            "UPDATE restores SET channel = ?2, fallback_reason = ?3 WHERE id = ?1",
            params![id, channel, reason],
        )?;
        Ok(())
    }

    /// Records how a restore ended.
    pub fn end_restore(&self, id: i64, end: &RestoreEnd) -> Result<()> {
        self.db().execute(
            "UPDATE restores SET status = ?2, finished = ?3, bytes = ?4, files = ?5, \
             channel = ?6, fallback_reason = COALESCE(?7, fallback_reason), message = ?8 \
             WHERE id = ?1",
            params![
                id,
                if end.ok { "complete" } else { "failed" },
                now(),
                stored(end.bytes),
                stored(end.files),
                end.channel,
                end.fallback_reason,
                end.message
            ],
        )?;
        Ok(())
    }

    /// Records where a restore's bytes went.
    pub fn record_restore_traffic(&self, id: i64, t: &ChannelUse) -> Result<()> {
        self.write_traffic("restores", id, t)
    }

    /// Every restore through the array, oldest first.
    pub fn restores(&self) -> Result<Vec<RestoreInfo>> {
        let db = self.db();
        let mut st = db.prepare(&format!("SELECT {RESTORE_COLS} FROM restores ORDER BY id"))?;
        let v = st
            .query_map([], row_restore)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// Writes the content of backup `id`'s files, in manifest order, to
    /// `out` (a database dump restored to a file or a command), checking
    /// each file's SHA-256.
    pub fn restore_stream(&self, id: i64, out: &mut dyn Write) -> Result<u64> {
        let manifest = self.manifest(id)?;
        let want: HashMap<String, String> = manifest
            .iter()
            .filter(|e| e.kind == Kind::File)
            .filter_map(|e| e.sha256.clone().map(|h| (e.path.clone(), h)))
            .collect();
        let (r, _) = self.open_archive(id)?;
        let mut ar = tar::Archive::new(r);
        let mut total = 0u64;
        for entry in ar.entries().context("reading the archive")? {
            let mut entry = entry.context("the archive is damaged")?;
            let name = archive::name_key(&entry.path_bytes());
            let Some(sum) = want.get(&name) else { continue };
            let mut h = HashingWriter {
                inner: &mut *out,
                hasher: Sha256::new(),
            };
            total += io::copy(&mut entry, &mut h)
                .with_context(|| format!("restoring {name}: writing the output"))?;
            let got = hex::encode(h.hasher.finalize());
            if got != *sum {
                bail!("{name}: SHA-256 {got} differs from the manifest's {sum}: the archive is damaged");
            }
        }
        Ok(total)
    }

    /// Forgets all but the newest `keep` complete backups of each
    /// (kind, client, source), keeping any backup a kept one still takes
    /// unchanged files from, and every failed one's leftovers. Returns the
    /// ids removed.
    pub fn forget_keep_last(&self, keep: usize) -> Result<Vec<i64>> {
        let gone = self.forget_plan(keep)?;
        for &id in &gone {
            // Catalog first: a crash in between leaves stray files that the
            // next sweep removes, never a row without its archive.
            self.db()
                .execute("DELETE FROM backups WHERE id = ?1", params![id])?;
            let _ = fs::remove_file(self.archive_path(id));
            let _ = fs::remove_file(self.manifest_path(id));
        }
        Ok(gone)
    }

    /// The ids [`Repo::forget_keep_last`] would remove, removing nothing
    /// (`forget --dry-run`).
    pub fn forget_plan(&self, keep: usize) -> Result<Vec<i64>> {
        let all = self.list()?;
        let mut groups: HashMap<(String, String, String), Vec<i64>> = HashMap::new();
        for b in all.iter().filter(|b| b.status == "complete") {
            groups
                .entry((b.kind.clone(), b.client.clone(), b.source.clone()))
                .or_default()
                .push(b.id);
        }
        let mut kept: HashSet<i64> = HashSet::new();
        for ids in groups.values() {
            let mut ids = ids.clone();
            ids.sort_unstable_by(|a, b| b.cmp(a));
            kept.extend(ids.into_iter().take(keep));
        }
        let mut needed = kept.clone();
        for &id in &kept {
            for e in self.manifest(id)? {
                if let Some(b) = e.from_backup {
                    needed.insert(b);
                }
            }
        }
        let gone: Vec<i64> = all
            .iter()
            .filter(|b| b.status != "running" && !needed.contains(&b.id))
            .map(|b| b.id)
            .collect();
        Ok(gone)
    }
}

/// Counts (and hashes) what is read, moving a progress bar.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    bar: Progress,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        self.bar.set(self.bytes);
        Ok(n)
    }
}

struct HashingWriter<'a> {
    inner: &'a mut dyn Write,
    hasher: Sha256,
}

impl Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
