//! The backup application's control messages (docs/BACKUP.md §3).
//!
//! Every message is a 4-byte big-endian length followed by that many bytes
//! of JSON (an object whose `type` field names the message). Messages
//! travel over the file-system flow's TCP control and error connections,
//! over the database flow's STP connection before and after the data, and
//! at the start of a LAN (TCP-only) session. A length above [`MAX_MSG`] is
//! refused before anything is allocated.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use stp_core::sockets::{Address, Domain, Fd, SockError, SocketLayer};

use super::archive::{BaseEntry, ManifestEntry};

/// The largest control message accepted (a manifest of about a million
/// files fits).
pub const MAX_MSG: usize = 256 << 20;

/// The version of the restore exchange (`restore_request` …
/// `restore_result`, docs/BACKUP.md §2) this build speaks; a peer that
/// speaks another is refused, naming both.
pub const RESTORE_VERSION: u32 = 1;

/// What a backup copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Every file.
    Full,
    /// Files changed since the base backup (by size, mtime, inode, and
    /// content hash when those agree but the ctime moved).
    Incremental,
}

impl Level {
    /// The catalog's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Full => "full",
            Level::Incremental => "incremental",
        }
    }
}

/// Where a database backup's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DbSource {
    /// SQLite's online backup of the database file at `path` (on the
    /// client).
    Sqlite {
        /// The live database.
        path: String,
    },
    /// The standard output of `sh -c command` (on the client).
    Command {
        /// The shell command, e.g. `pg_dump mydb`.
        command: String,
    },
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Server → client (fs control): back up `source`.
    BackupRequest {
        /// The catalog's id of this backup.
        backup_id: i64,
        /// Full or incremental.
        level: Level,
        /// The directory to back up, on the client.
        source: String,
        /// Glob-like exclude patterns (docs/BACKUP.md §5).
        excludes: Vec<String>,
        /// The base backup's files (incremental only).
        base: Vec<BaseEntry>,
        /// The server's TCP port to resume the data stream on if STP fails.
        fallback_port: u16,
    },
    /// Client → server (fs errors connection): one file could not be
    /// backed up properly; the job goes on.
    FileError {
        /// The file's path in the archive.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Client → server (fs control): the client refuses the request.
    Refused {
        /// Why.
        message: String,
    },
    /// Client → server (fs control), after the data: what was sent.
    BackupDone {
        /// Every file of the source as backed up.
        manifest: Vec<ManifestEntry>,
        /// Per-file errors sent on the errors connection.
        errors: u64,
    },
    /// Server → client: the outcome.
    BackupResult {
        /// True when the backup is durable and recorded complete.
        ok: bool,
        /// The catalog's id.
        backup_id: i64,
        /// A human summary, or what went wrong.
        message: String,
        /// Seconds from the start of the data stream to the backup durable
        /// and recorded, as the server measured them (both sides report
        /// this figure).
        #[serde(default)]
        seconds: f64,
    },
    /// Client → server (db, first message on the data connection).
    DbRequest {
        /// The client's name for the database.
        name: String,
        /// Where the bytes come from.
        source: DbSource,
    },
    /// Server → client (db): go ahead.
    DbAccept {
        /// The catalog's id.
        backup_id: i64,
        /// The server's TCP port to resume the data stream on.
        fallback_port: u16,
    },
    /// Client → server (db), after the data: the archive entries sent.
    DbDone {
        /// The entries and their hashes.
        manifest: Vec<ManifestEntry>,
    },
    /// Agent → server (fs control), first: who the agent is.
    AgentHello {
        /// The agent's name in the catalog (`[client] name`), if it has
        /// one.
        name: Option<String>,
    },
    /// First message of each connection of a LAN session (no STP at all),
    /// after the acceptor's 32-byte challenge.
    LanHello {
        /// Which connection this is: `control`, `errors` or `data`.
        channel: String,
        /// Why the session is TCP-only.
        reason: String,
        /// The connector's challenge to the acceptor, hex (32 bytes).
        nonce: String,
        /// With a pre-shared key: [`proof`] over the acceptor's challenge,
        /// hex; empty without one.
        proof: String,
    },
    /// The acceptor's answer to [`Msg::LanHello`].
    LanOk {
        /// With a pre-shared key: [`proof`] over the connector's
        /// challenge, hex; empty without one.
        proof: String,
    },
    /// Client → server (restore, first message on the data connection):
    /// send backup `backup_id` back.
    RestoreRequest {
        /// The restore exchange's version ([`RESTORE_VERSION`]).
        version: u32,
        /// The backup to restore.
        backup_id: i64,
        /// Only these paths (and what is under them); empty: everything.
        paths: Vec<String>,
        /// The client's name, for the server's catalog.
        client: String,
        /// Where the files go on the client, for the server's catalog.
        to: String,
        /// The client's TCP port to resume the stream on if the array
        /// fails (0 in a LAN session).
        fallback_port: u16,
    },
    /// Server → client (restore): the stream follows.
    RestoreAccept {
        /// [`RESTORE_VERSION`].
        version: u32,
        /// The catalog's id of this restore.
        restore_id: i64,
        /// The backup restored.
        backup_id: i64,
        /// The manifest entries restored; the stream holds the content of
        /// their files, their directories, symbolic links and FIFOs.
        entries: Vec<ManifestEntry>,
        /// True when the whole tree is restored (the archive's root entry
        /// applies to the destination).
        whole: bool,
        /// About how many stream bytes follow (for progress).
        bytes: u64,
    },
    /// Client → server (restore), after the stream: whether every file is
    /// written, checked and in place.
    RestoreDone {
        /// True when the restore is complete on the client.
        ok: bool,
        /// Files written.
        files: u64,
        /// Bytes of file content written.
        bytes: u64,
        /// What went wrong, if anything.
        message: String,
    },
    /// Server → client (restore): recorded.
    RestoreResult {
        /// True when the server recorded the restore complete.
        ok: bool,
        /// The catalog's id of the restore.
        restore_id: i64,
        /// A human summary, or what went wrong.
        message: String,
        /// Seconds from the start of the stream to the client's word, as
        /// the server measured them (both sides report this figure).
        seconds: f64,
    },
}

impl Msg {
    /// The message's `type`, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::BackupRequest { .. } => "backup_request",
            Msg::FileError { .. } => "file_error",
            Msg::Refused { .. } => "refused",
            Msg::BackupDone { .. } => "backup_done",
            Msg::BackupResult { .. } => "backup_result",
            Msg::DbRequest { .. } => "db_request",
            Msg::DbAccept { .. } => "db_accept",
            Msg::DbDone { .. } => "db_done",
            Msg::AgentHello { .. } => "agent_hello",
            Msg::LanHello { .. } => "lan_hello",
            Msg::LanOk { .. } => "lan_ok",
            Msg::RestoreRequest { .. } => "restore_request",
            Msg::RestoreAccept { .. } => "restore_accept",
            Msg::RestoreDone { .. } => "restore_done",
            Msg::RestoreResult { .. } => "restore_result",
        }
    }
}

/// Bytes of a challenge.
pub const NONCE_LEN: usize = 32;

/// A fresh random challenge.
pub fn nonce() -> [u8; NONCE_LEN] {
    use rand::RngCore;
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn mac(psk: &[u8], label: &str, nonce: &[u8], context: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    // HMAC takes keys of any length.
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(psk)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    for part in [label.as_bytes(), nonce, context] {
        m.update(&(part.len() as u64).to_be_bytes());
        m.update(part);
    }
    m
}

/// HMAC-SHA256 under the pre-shared key over a label, a challenge and a
/// context (a channel name, a job id): proves knowledge of the key for
/// LAN sessions and resume connections, which STP's frame keys do not
/// cover.
pub fn proof(psk: &[u8], label: &str, nonce: &[u8], context: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    mac(psk, label, nonce, context)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a [`proof`] in constant time.
pub fn proof_ok(psk: &[u8], label: &str, nonce: &[u8], context: &[u8], got: &[u8]) -> bool {
    use hmac::Mac;
    mac(psk, label, nonce, context).verify_slice(got).is_ok()
}

/// Sends `msg` on `fd`.
pub fn send<T: Serialize>(layer: &SocketLayer, fd: Fd, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg).context("encoding a control message")?;
    if body.len() > MAX_MSG {
        bail!(
            "a control message of {} bytes exceeds the limit of {MAX_MSG}: back up fewer files per job",
            body.len()
        );
    }
    let mut framed = Vec::with_capacity(4 + body.len());
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    layer.send_all(fd, &framed).with_context(|| {
        format!(
            "sending a control message on {} descriptor {fd}",
            fd.mechanism()
        )
    })
}

/// Receives one message from `fd`; `Ok(None)` at a clean end of stream
/// (the peer closed before a new message).
pub fn recv_opt<T: DeserializeOwned>(layer: &SocketLayer, fd: Fd) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = layer
            .recv(fd, &mut len[got..])
            .with_context(|| format!("receiving a control message on descriptor {fd}"))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("the peer closed descriptor {fd} in the middle of a message length");
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MSG {
        bail!(
            "the peer announced a control message of {len} bytes (limit {MAX_MSG}): \
             it is not an stp backup peer, or a different version"
        );
    }
    let mut body = vec![0u8; len];
    layer
        .recv_exact(fd, &mut body)
        .with_context(|| format!("receiving a control message body on descriptor {fd}"))?;
    decode(&body).map(Some)
}

/// Decodes a control message's body (the JSON after the length). Accepts
/// any bytes: a malformed body is an error quoting its start.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).with_context(|| {
        format!(
            "the peer sent a malformed control message ({}…): is it an stp backup peer of \
             the same version?",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        )
    })
}

/// Receives one message; an end of stream is an error naming `waiting_for`.
pub fn recv<T: DeserializeOwned>(layer: &SocketLayer, fd: Fd, waiting_for: &str) -> Result<T> {
    recv_opt(layer, fd)?.with_context(|| {
        format!("the peer closed the connection while this side was waiting for {waiting_for}")
    })
}

/// Opens a TCP connection to `addr`, trying again while it is refused
/// (the peer may not listen yet) for up to `patience`.
pub fn connect_tcp(layer: &SocketLayer, addr: SocketAddr, patience: Duration) -> Result<Fd> {
    let deadline = Instant::now() + patience;
    loop {
        let fd = layer.socket(Domain::Tcp)?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        match layer.connect_timeout(fd, Address::Tcp(addr), left) {
            Ok(()) => return Ok(fd),
            Err(e) => {
                let _ = layer.close(fd);
                let refused = e.io_kind() == Some(std::io::ErrorKind::ConnectionRefused);
                if !refused || Instant::now() >= deadline {
                    return Err(e).with_context(|| {
                        format!("connecting to {addr} over TCP: is the peer running and listening?")
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Binds a TCP listener on `ip`:`port` (0: dynamic) and returns it with
/// its port.
pub fn listen_tcp(layer: &SocketLayer, addr: SocketAddr) -> Result<(Fd, u16)> {
    let fd = layer.socket(Domain::Tcp)?;
    let bound = layer
        .bind_addr(fd, addr)
        .and_then(|()| layer.listen(fd))
        .and_then(|()| layer.getsockname(fd));
    match bound {
        Ok(port) => Ok((fd, u16::try_from(port).unwrap_or(0))),
        Err(e) => {
            let _ = layer.close(fd);
            Err(e).with_context(|| format!("listening on {addr} over TCP: is the port in use?"))
        }
    }
}

/// The IP address of a connected TCP descriptor's peer.
pub fn peer_ip(layer: &SocketLayer, fd: Fd) -> Result<std::net::IpAddr> {
    match layer.peer_addr(fd)? {
        Address::Tcp(a) => Ok(a.ip()),
        other => bail!("descriptor {fd}'s peer is {other}, not a TCP address"),
    }
}

/// Closes `fd`, ignoring errors (for cleanup paths).
pub fn close_quietly(layer: &SocketLayer, fd: Fd) {
    let _: Result<(), SockError> = layer.close(fd);
}
