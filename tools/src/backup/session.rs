//! The two backup flows over a [`SocketLayer`] (docs/BACKUP.md §2–§4).
//!
//! * File systems, server-initiated (seed Figs. 4/4A):
//!   [`fs_backup`] on the backup server, [`fs_agent`] on the host that owns
//!   the data. Control and per-file errors travel over TCP, the tar stream
//!   over STP.
//! * Databases, client-initiated (seed Fig. 5): [`db_backup`] on the
//!   database host, [`db_serve`] on the backup server; everything travels
//!   over the one STP connection.
//!
//! With the fallback policy `preferred`, a side that cannot use the array
//! at the start opens a *LAN session* instead: plain TCP connections to
//! WKP+2, each starting with a [`Msg::LanHello`] that carries the reason.
//! Mid-stream failures are handled by [`super::pipe`].

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use stp_core::flows::{
    db_client_connect, db_server_accept, fs_client_accept, fs_server_connect, FlowError, FsSession,
};
use stp_core::sockets::{Fd, Mechanism, SocketLayer};
use stp_core::stream::PathSource;

use super::archive::{append_blob, ManifestEntry, TreeWriter, WalkOptions};
use super::daemon::Idle;
use super::pipe::{FailHook, PipeReceiver, PipeSender, Policy, StreamReport};
use super::progress::Progress;
use super::repo::{BackupInfo, FileErrorRecord, Repo};
use super::traffic::{ChannelUse, DroppedFrames, Meter};
use super::wire::{self, DbSource, Level, Msg};

/// The 16 bytes a server sends on the client's WKP instead of the
/// well-known string when it cannot use the array: the client's flow
/// fails at once and it takes the LAN session on WKP+2.
pub const WKP_LAN: [u8; 16] = *b"STP-WKP-LAN\0\0\0\0\0";

/// One host's networking for the backup flows.
#[derive(Clone)]
pub struct Host {
    /// The socket layer (TCP and STP).
    pub layer: Arc<SocketLayer>,
    /// The STG the data uses.
    pub stg: u32,
    /// Its member count (the server states it in the flows).
    pub stg_len: u32,
    /// The well-known port; WKP+1 carries the STG exchange, WKP+2 LAN
    /// sessions.
    pub wkp: u16,
    /// The address to listen on.
    pub bind_ip: IpAddr,
    /// The pre-shared key, if any.
    pub psk: Option<Vec<u8>>,
    /// LAN fallback policy.
    pub policy: Policy,
    /// Patience of each flow.
    pub timeout: Duration,
    /// Opens this host's paths to the STG, to check the array at the start.
    pub probe: Option<Arc<dyn PathSource>>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("stg", &self.stg)
            .field("wkp", &self.wkp)
            .field("bind_ip", &self.bind_ip)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Host {
    fn lan_port(&self) -> Result<u16> {
        self.wkp
            .checked_add(2)
            .ok_or_else(|| anyhow!("wkp {} leaves no room for WKP+2 (the LAN port)", self.wkp))
    }

    /// Why the array cannot be used right now, if it cannot.
    fn array_problem(&self) -> Option<String> {
        if !self.layer.has_stg(self.stg) {
            return Some(format!("STG {} is not configured on this host", self.stg));
        }
        let probe = self.probe.as_ref()?;
        match probe.open() {
            Ok(_) => None,
            Err(e) => Some(format!(
                "the array's STG {} cannot be opened: {e}",
                self.stg
            )),
        }
    }
}

/// Test and diagnostics knobs of a run.
#[derive(Default)]
pub struct RunOptions {
    /// Hide progress bars.
    pub quiet: bool,
    /// (sender only) Run a hook after this many stream bytes.
    pub fail_after: Option<(u64, FailHook)>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("quiet", &self.quiet)
            .field("fail_after", &self.fail_after.as_ref().map(|(n, _)| n))
            .finish()
    }
}

/// What a backup run produced, on either side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// The catalog id (of the backup restored, for a restore).
    pub backup_id: i64,
    /// A restore's catalog id (restores through the array: the server's
    /// `restores` table).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_id: Option<i64>,
    /// Stream bytes.
    pub bytes: u64,
    /// Entries in the manifest.
    pub files: u64,
    /// Per-file errors.
    pub errors: u64,
    /// `stp`, `tcp` or `stp+tcp`.
    pub channel: String,
    /// Why the data did not (only) use the array.
    pub fallback_reason: Option<String>,
    /// Seconds from the start of the data stream (the request or the
    /// acceptance) to the backup durable and recorded, as the server
    /// measured them: both sides report the server's figure.
    pub seconds: f64,
    /// `bytes` over `seconds` in MB/s (10^6 bytes): the same on both sides.
    pub mb_per_s: f64,
    /// This side's time for the whole session, from its set-up (for the
    /// agent: from the session's arrival, not its wait for it) to its end.
    pub session_seconds: f64,
    /// Bytes and time per channel, counted at this side's sockets.
    pub traffic: ChannelUse,
    /// Frames this side's connections dropped on receipt (forged, damaged
    /// or stray: docs/PROTOCOL.md §7.1).
    pub dropped: DroppedFrames,
    /// The per-file errors (file-system backups, on the server).
    pub file_errors: Vec<FileErrorRecord>,
    /// The catalog row (server side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<BackupInfo>,
}

impl Outcome {
    /// What a session moved, from its stream's `report`: its bytes, channel
    /// and rates, `seconds` being the server's figure, `t0` the session's
    /// start and `traffic` what `meter` read. The caller names the backup
    /// and fills in what only its flow knows (files, errors, the restore
    /// id, the catalog row).
    pub(super) fn of_stream(
        report: &StreamReport,
        lan_reason: &Option<String>,
        seconds: f64,
        t0: Instant,
        meter: &Meter,
        traffic: ChannelUse,
    ) -> Outcome {
        Outcome {
            bytes: report.bytes,
            channel: report.channels.summary(),
            fallback_reason: report.channels.reason.clone().or(lan_reason.clone()),
            seconds,
            mb_per_s: mb_per_s(report.bytes, seconds),
            session_seconds: t0.elapsed().as_secs_f64(),
            traffic,
            dropped: meter.dropped(),
            ..Outcome::default()
        }
    }
}

/// The connections of one file-system session.
struct FsConns {
    control: Fd,
    errors: Fd,
    data: Fd,
    /// Why it is TCP-only, if it is.
    lan_reason: Option<String>,
}

impl From<FsSession> for FsConns {
    /// A session through the array: control and errors over TCP, data over
    /// STP.
    fn from(s: FsSession) -> FsConns {
        FsConns {
            control: s.control,
            errors: s.errors,
            data: s.data,
            lan_reason: None,
        }
    }
}

fn close_all(layer: &SocketLayer, fds: &[Fd]) {
    for &fd in fds {
        wire::close_quietly(layer, fd);
    }
}

/// Server side: connects to the client's LAN port and opens the three
/// connections.
fn lan_connect(host: &Host, client: IpAddr, reason: &str, channels: &[&str]) -> Result<Vec<Fd>> {
    let addr = SocketAddr::new(client, host.lan_port()?);
    let mut fds = Vec::new();
    for ch in channels {
        let fd = match wire::connect_tcp(&host.layer, addr, host.timeout) {
            Ok(fd) => fd,
            Err(e) => {
                close_all(&host.layer, &fds);
                return Err(e).context("opening a LAN session");
            }
        };
        fds.push(fd);
        if let Err(e) = lan_hello(host, fd, ch, reason) {
            close_all(&host.layer, &fds);
            return Err(e);
        }
    }
    Ok(fds)
}

const LAN_CONNECTOR: &str = "stp-backup lan connector";
/// What to do when the pre-shared keys differ.
const KEYS_FIX: &str = "set the same `psk` in both hosts' STP configuration";
const LAN_ACCEPTOR: &str = "stp-backup lan acceptor";

/// The connector's side of a LAN connection's greeting: answers the
/// acceptor's challenge (with a pre-shared key, proving it knows the key)
/// and checks the acceptor's proof in return.
fn lan_hello(host: &Host, fd: Fd, channel: &str, reason: &str) -> Result<()> {
    let layer = &*host.layer;
    layer.set_read_timeout(fd, Some(host.timeout))?;
    let mut challenge = [0u8; wire::NONCE_LEN];
    layer
        .recv_exact(fd, &mut challenge)
        .context("waiting for the LAN peer's challenge")?;
    let mine = wire::nonce();
    let proof = host.psk.as_deref().map_or(String::new(), |k| {
        hex::encode(wire::proof(
            k,
            LAN_CONNECTOR,
            &challenge,
            channel.as_bytes(),
        ))
    });
    wire::send(
        layer,
        fd,
        &Msg::LanHello {
            channel: channel.into(),
            reason: reason.into(),
            nonce: hex::encode(mine),
            proof,
        },
    )?;
    match wire::recv::<Msg>(layer, fd, "the LAN peer's answer")? {
        Msg::Refused { message } => bail!(
            "the LAN peer at {} refused the session: {message}",
            wire::peer_ip(layer, fd).map_or("?".into(), |ip| ip.to_string())
        ),
        Msg::LanOk { proof } => {
            if let Some(k) = host.psk.as_deref() {
                let got = hex::decode(&proof).unwrap_or_default();
                if !wire::proof_ok(k, LAN_ACCEPTOR, &mine, channel.as_bytes(), &got) {
                    bail!(
                        "the pre-shared keys differ: the LAN peer at {} does not prove this \
                         host's key (it is not our backup peer, or its psk differs: set the \
                         same `psk` in both hosts' STP configuration)",
                        wire::peer_ip(layer, fd).map_or("?".into(), |ip| ip.to_string())
                    );
                }
            }
        }
        other => bail!("expected the LAN peer's answer, got {}", other.name()),
    }
    layer.set_read_timeout(fd, None)?;
    Ok(())
}

/// The acceptor's side: challenges the connector, checks its hello (and,
/// with a pre-shared key, its proof) and answers with its own proof.
/// Returns the session's reason.
fn lan_greet(host: &Host, fd: Fd, channel: &str) -> Result<String> {
    let layer = &*host.layer;
    layer.set_read_timeout(fd, Some(host.timeout))?;
    let challenge = wire::nonce();
    layer.send_all(fd, &challenge)?;
    let (reason, theirs) = match wire::recv::<Msg>(layer, fd, "the LAN session's hello")? {
        Msg::LanHello {
            channel: c,
            reason,
            nonce,
            proof,
        } if c == channel => {
            let peer = wire::peer_ip(layer, fd).map_or("?".into(), |ip| ip.to_string());
            let mismatch = match host.psk.as_deref() {
                Some(k) => {
                    let got = hex::decode(&proof).unwrap_or_default();
                    (!wire::proof_ok(k, LAN_CONNECTOR, &challenge, channel.as_bytes(), &got)).then(
                        || format!("the LAN session from {peer} does not prove this host's key"),
                    )
                }
                None => (!proof.is_empty()).then(|| {
                    format!("the LAN session from {peer} proves a key, and this host has none")
                }),
            };
            if let Some(why) = mismatch {
                // Tell the peer too, so both sides say what is wrong.
                let _ = wire::send(
                    layer,
                    fd,
                    &Msg::Refused {
                        message: format!(
                            "the pre-shared keys differ: the peer did not accept this side's \
                             proof of its key ({KEYS_FIX})"
                        ),
                    },
                );
                bail!("the pre-shared keys differ: {why} ({KEYS_FIX}); refused");
            }
            (reason, hex::decode(&nonce).unwrap_or_default())
        }
        other => bail!(
            "expected the LAN hello for the {channel} connection, got {}",
            other.name()
        ),
    };
    let proof = host.psk.as_deref().map_or(String::new(), |k| {
        hex::encode(wire::proof(k, LAN_ACCEPTOR, &theirs, channel.as_bytes()))
    });
    wire::send(layer, fd, &Msg::LanOk { proof })?;
    layer.set_read_timeout(fd, None)?;
    Ok(reason)
}

/// Accepts a LAN session's connections on WKP+2, in order.
fn lan_accept(host: &Host, channels: &[&str]) -> Result<(Vec<Fd>, String)> {
    let (listener, _) =
        wire::listen_tcp(&host.layer, SocketAddr::new(host.bind_ip, host.lan_port()?))?;
    let mut fds = Vec::new();
    let mut reason = String::new();
    let res = (|| -> Result<()> {
        for (i, ch) in channels.iter().enumerate() {
            let fd = match host.layer.accept(listener, host.timeout) {
                Ok(fd) => fd,
                Err(e) if i == 0 && e.is_timeout() => {
                    return Err(Idle {
                        waited: host.timeout,
                    }
                    .into())
                }
                Err(e) => return Err(e).context("waiting for a LAN session on WKP+2"),
            };
            fds.push(fd);
            reason = lan_greet(host, fd, ch)?;
        }
        Ok(())
    })();
    wire::close_quietly(&host.layer, listener);
    match res {
        Ok(()) => Ok((fds, reason)),
        Err(e) => {
            close_all(&host.layer, &fds);
            Err(e)
        }
    }
}

fn fs_server_open(host: &Host, client: IpAddr) -> Result<FsConns> {
    let lan = |reason: String| -> Result<FsConns> {
        let fds = lan_connect(host, client, &reason, &["control", "errors", "data"])?;
        Ok(FsConns {
            control: fds[0],
            errors: fds[1],
            data: fds[2],
            lan_reason: Some(reason),
        })
    };
    if host.policy == Policy::Never {
        // The agent under `never` listens on WKP+2 only.
        return lan("the fallback policy is 'never': the data goes over the LAN".into());
    }
    if let Some(problem) = host.array_problem() {
        if host.policy == Policy::Always {
            bail!("{problem}; the fallback policy is 'always', so the backup stops (fix the array paths or set fallback = \"preferred\")");
        }
        // Make the agent's flow fail at once, then open the LAN session.
        if let Ok(fd) =
            wire::connect_tcp(&host.layer, SocketAddr::new(client, host.wkp), host.timeout)
        {
            let _ = host.layer.send_all(fd, &WKP_LAN);
            wire::close_quietly(&host.layer, fd);
        }
        return lan(format!("array unavailable at the start: {problem}"));
    }
    match fs_server_connect(
        &host.layer,
        client,
        host.wkp,
        host.stg,
        host.stg_len,
        host.psk.as_deref(),
        host.timeout,
    ) {
        Ok(s) => Ok(s.into()),
        Err(e) if host.policy == Policy::Preferred => {
            lan(format!("the STP connection could not be set up: {e}"))
        }
        Err(e) => Err(e).context("setting up the file-system session (seed Figs. 4/4A)"),
    }
}

fn fs_agent_open(host: &Host) -> Result<FsConns> {
    let lan = || -> Result<FsConns> {
        let (fds, reason) = lan_accept(host, &["control", "errors", "data"])?;
        Ok(FsConns {
            control: fds[0],
            errors: fds[1],
            data: fds[2],
            lan_reason: Some(reason),
        })
    };
    if host.policy == Policy::Never {
        return lan();
    }
    match fs_client_accept(
        &host.layer,
        host.bind_ip,
        host.wkp,
        host.psk.as_deref(),
        host.timeout,
    ) {
        Ok(s) => Ok(s.into()),
        Err(e) if host.policy == Policy::Preferred => {
            // The server that cannot use the array says so on WKP: not a
            // failure, the way to the LAN session.
            let told_lan = matches!(&e, FlowError::WrongString { got, .. }
                if *got == WKP_LAN.escape_ascii().to_string());
            let no_one = matches!(&e, FlowError::Timeout { step: "118", .. });
            match lan() {
                Ok(c) => Ok(c),
                // An idle wait stays one; a LAN session's failure is the
                // whole story when the STP flow never started.
                Err(l) if told_lan || no_one => Err(l),
                Err(l) => Err(l.context(format!(
                    "the STP session failed ({e}), and so did the LAN one"
                ))),
            }
        }
        Err(FlowError::Timeout { step: "118", .. }) => Err(Idle {
            waited: host.timeout,
        }
        .into()),
        Err(e) => Err(e).context("accepting the file-system session (seed Figs. 4/4A)"),
    }
}

/// What the server asks of an agent.
#[derive(Clone, Debug)]
pub struct FsJob {
    /// The client's address.
    pub client: IpAddr,
    /// The client's name in the catalog; `None`: the name the agent
    /// announces (its `[client] name`), or its address if it has none.
    pub client_name: Option<String>,
    /// The directory to back up, on the client.
    pub source: String,
    /// Full or incremental (incremental without a base becomes full).
    pub level: Level,
    /// Exclude patterns.
    pub excludes: Vec<String>,
}

/// Reads the agent's hello on the control connection: its name.
fn agent_name(host: &Host, control: Fd) -> Result<Option<String>> {
    let layer = &*host.layer;
    layer.set_read_timeout(control, Some(host.timeout))?;
    let name = match wire::recv::<Msg>(layer, control, "the agent's hello")? {
        Msg::AgentHello { name } => name.filter(|n| !n.trim().is_empty()),
        other => bail!("expected the agent's hello, got {}", other.name()),
    };
    layer.set_read_timeout(control, None)?;
    Ok(name)
}

/// After the data stream failed: the agent may have said why on the
/// control connection (it sends `refused` before it aborts the stream and
/// closes, so this read ends at once either way).
fn refusal(host: &Host, control: Fd) -> Option<String> {
    let layer = &*host.layer;
    layer.set_read_timeout(control, Some(host.timeout)).ok()?;
    match wire::recv_opt::<Msg>(layer, control) {
        Ok(Some(Msg::Refused { message })) => Some(message),
        _ => None,
    }
}

/// The backup server's side of a file-system backup: opens the session to
/// the agent, asks for `job`, writes the stream into `repo`, records the
/// per-file errors, and marks the backup complete once it is durable.
pub fn fs_backup(host: &Host, repo: &Repo, job: &FsJob, opts: RunOptions) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut meter = Meter::start(&host.layer);
    let conns = fs_server_open(host, job.client)?;
    let layer = &*host.layer;
    let all = [conns.control, conns.errors, conns.data];
    let prepared = (|| -> Result<_> {
        let announced = agent_name(host, conns.control)?;
        let client_name = job
            .client_name
            .clone()
            .or(announced)
            .unwrap_or_else(|| job.client.to_string());
        let base = if job.level == Level::Incremental {
            repo.latest_complete("fs", &client_name, &job.source)?
        } else {
            None
        };
        let base_manifest: Vec<_> = match base {
            Some(b) => repo
                .manifest(b)?
                .into_iter()
                .map(|mut e| {
                    e.from_backup = e.from_backup.or(Some(b));
                    e
                })
                .collect(),
            None => Vec::new(),
        };
        let level = if base.is_some() {
            Level::Incremental
        } else {
            Level::Full
        };
        let pending = repo.begin("fs", &client_name, &job.source, level.as_str(), base)?;
        Ok((pending, level, base_manifest))
    })();
    let (mut pending, level, base_manifest) = match prepared {
        Ok(v) => v,
        Err(e) => {
            close_all(layer, &all);
            return Err(e);
        }
    };
    let id = pending.id;
    tracing::info!(
        backup_id = id,
        client = %job.client,
        level = level.as_str(),
        "backing up {}",
        job.source
    );
    let (listener, fallback_port) = match wire::listen_tcp(layer, SocketAddr::new(host.bind_ip, 0))
    {
        Ok(v) => v,
        Err(e) => {
            close_all(layer, &all);
            let _ = repo.fail(pending, &format!("{e:#}"));
            return Err(e);
        }
    };
    if let Some(r) = &conns.lan_reason {
        if let Err(e) = repo.note_channel(id, "tcp", Some(r)) {
            tracing::warn!("backup {id}: noting the LAN session in the catalog failed: {e:#}");
        }
    }
    // Per-file errors arrive on their own connection while the data flows.
    let gone = Arc::new(AtomicBool::new(false));
    let errors_thread = {
        let layer = Arc::clone(&host.layer);
        let fd = conns.errors;
        let gone = Arc::clone(&gone);
        let show = !opts.quiet;
        thread::spawn(move || -> Vec<FileErrorRecord> {
            let mut v = Vec::new();
            loop {
                match wire::recv_opt::<Msg>(&layer, fd) {
                    Ok(Some(Msg::FileError { path, message })) => {
                        if show {
                            tracing::warn!("client: {}: {message}", escape_control(&path));
                        }
                        v.push(FileErrorRecord { path, message })
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            gone.store(true, Ordering::Release);
            v
        })
    };
    let mut data_fd = conns.data;
    let stream_t0 = Instant::now();
    let result = (|| -> Result<(Vec<ManifestEntry>, StreamReport, u64)> {
        wire::send(
            layer,
            conns.control,
            &Msg::BackupRequest {
                backup_id: id,
                level,
                source: job.source.clone(),
                excludes: job.excludes.clone(),
                base: base_manifest,
                fallback_port,
            },
        )?;
        let mut rx = PipeReceiver::new(
            layer,
            conns.data,
            Some(listener),
            host.policy,
            id as u64,
            Progress::bytes("receiving", None, opts.quiet),
        )
        .with_psk(host.psk.clone());
        rx.abort_when(Arc::clone(&gone));
        let report = rx.run(pending.sink());
        data_fd = rx.fd();
        if let Ok(r) = &report {
            meter.stream_ended(layer, data_fd, &r.channels, stream_t0);
        }
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                // The agent says why it refused on the control connection.
                if let Some(why) = refusal(host, conns.control) {
                    bail!("the client refused the backup: {why}");
                }
                return Err(e);
            }
        };
        // The summary follows the data at once; do not wait forever.
        layer.set_read_timeout(conns.control, Some(host.timeout))?;
        match wire::recv::<Msg>(layer, conns.control, "the client's summary")? {
            Msg::BackupDone { manifest, errors } => Ok((manifest, report, errors)),
            Msg::Refused { message } => bail!("the client refused the backup: {message}"),
            other => bail!("expected the client's summary, got {}", other.name()),
        }
    })();
    wire::close_quietly(layer, listener);
    let outcome = match result {
        Ok((manifest, report, _)) => {
            // The agent closes the errors connection before its summary.
            let errors = errors_thread.join().unwrap_or_default();
            meter.errors_connection(layer, conns.errors);
            let files = manifest.len() as u64;
            match repo.commit(pending, manifest, &report, &errors) {
                Ok(mut info) => {
                    let seconds = stream_t0.elapsed().as_secs_f64();
                    let _ = wire::send(
                        layer,
                        conns.control,
                        &Msg::BackupResult {
                            ok: true,
                            backup_id: id,
                            message: format!(
                                "backup {id} complete: {} bytes, {files} files over {}",
                                report.bytes,
                                report.channels.summary()
                            ),
                            seconds,
                        },
                    );
                    let traffic = meter.read(layer);
                    record_traffic(repo, id, &traffic);
                    info.traffic = Some(traffic);
                    Ok(Outcome {
                        backup_id: id,
                        files,
                        errors: errors.len() as u64,
                        file_errors: errors,
                        info: Some(info),
                        ..Outcome::of_stream(
                            &report,
                            &conns.lan_reason,
                            seconds,
                            t0,
                            &meter,
                            traffic,
                        )
                    })
                }
                Err(e) => Err(e.context(format!("recording backup {id}"))),
            }
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let _ = wire::send(
                layer,
                conns.control,
                &Msg::BackupResult {
                    ok: false,
                    backup_id: id,
                    message: msg.clone(),
                    seconds: 0.0,
                },
            );
            if let Err(f) = repo.fail(pending, &msg) {
                tracing::error!("backup {id}: recording the failure in the catalog failed: {f:#}");
            }
            meter.errors_connection(layer, conns.errors);
            close_all(layer, &[conns.errors]);
            let _ = errors_thread.join();
            record_traffic(repo, id, &meter.read(layer));
            Err(e.context(format!("backup {id} failed and is recorded as failed")))
        }
    };
    close_all(layer, &[data_fd, conns.control, conns.errors]);
    outcome
}

/// Records a backup's per-channel counts; a catalog that refuses costs a
/// warning, not the backup.
fn record_traffic(repo: &Repo, id: i64, t: &ChannelUse) {
    if let Err(e) = repo.record_traffic(id, t) {
        tracing::warn!("backup {id}: recording its per-channel byte counts failed: {e:#}");
    }
}

/// `bytes` over `seconds` in MB/s (10^6 bytes).
pub fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / 1e6 / seconds
    } else {
        0.0
    }
}

/// `s` with control characters (newlines, escapes) shown as escapes, for
/// one line of a terminal. In a name, a NUL starts the escape of a byte
/// that is not UTF-8 (`archive::name_key`) and shows as `\x`, so such a
/// byte reads `\xe9`.
pub fn escape_control(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| match c {
            '\0' => "\\x".to_owned(),
            c if c.is_control() => c.escape_default().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The agent's rules.
#[derive(Clone, Debug, Default)]
pub struct AgentRules {
    /// This host's name in the catalog (`[client] name`).
    pub name: Option<String>,
    /// Directories the server may ask for (empty: any).
    pub allowed: Vec<PathBuf>,
    /// Exclude patterns added to the server's.
    pub excludes: Vec<String>,
}

/// Longest exclude pattern an agent takes (a path is at most 4096 bytes).
pub const MAX_EXCLUDE_LEN: usize = 4096;
/// Most exclude patterns an agent takes.
pub const MAX_EXCLUDES: usize = 4096;

/// Bounds the server's exclude patterns: each is matched against every
/// path of the walk.
fn check_excludes(excludes: &[String]) -> Result<()> {
    if excludes.len() > MAX_EXCLUDES {
        bail!(
            "the request has {} exclude patterns (at most {MAX_EXCLUDES}): merge them",
            excludes.len()
        );
    }
    if let Some(p) = excludes.iter().find(|p| p.len() > MAX_EXCLUDE_LEN) {
        bail!(
            "an exclude pattern of {} bytes (at most {MAX_EXCLUDE_LEN}) starting {:?}: shorten it",
            p.len(),
            &p.chars().take(40).collect::<String>()
        );
    }
    Ok(())
}

fn allowed(rules: &AgentRules, source: &Path) -> Result<PathBuf> {
    let canon = source.canonicalize().with_context(|| {
        format!(
            "the requested source {} does not exist on this host",
            source.display()
        )
    })?;
    if !canon.is_dir() {
        bail!(
            "the requested source {} is not a directory: a file-system backup takes a \
             directory (back up its parent, or use `stp backup client db --from-command`)",
            canon.display()
        );
    }
    if rules.allowed.is_empty() {
        return Ok(canon);
    }
    for a in &rules.allowed {
        if let Ok(a) = a.canonicalize() {
            if canon.starts_with(&a) {
                return Ok(canon);
            }
        }
    }
    bail!(
        "{} is outside the directories this agent may back up ({}); add it to `allow` in the \
         [client] section of the agent's backup configuration",
        canon.display(),
        rules
            .allowed
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The agent's side of one file-system backup: accepts the server's
/// session, backs up the requested directory, and reports per-file errors
/// on the errors connection. A request it refuses is answered with the
/// reason on the control connection and the data stream is aborted with
/// it, so the server records why.
pub fn fs_agent(host: &Host, rules: &AgentRules, opts: RunOptions) -> Result<Outcome> {
    // Counting starts before the wait: nothing moves until a session comes.
    let mut meter = Meter::start(&host.layer);
    let conns = fs_agent_open(host)?;
    // The session's time starts when it arrives, not while waiting.
    let t0 = Instant::now();
    let layer = &*host.layer;
    let mut data_fd = conns.data;
    let res = (|| -> Result<Outcome> {
        wire::send(
            layer,
            conns.control,
            &Msg::AgentHello {
                name: rules.name.clone(),
            },
        )?;
        // The request follows the session at once.
        layer.set_read_timeout(conns.control, Some(host.timeout))?;
        let (id, level, source, mut excludes, base, port) =
            match wire::recv::<Msg>(layer, conns.control, "the server's backup request")? {
                Msg::BackupRequest {
                    backup_id,
                    level,
                    source,
                    excludes,
                    base,
                    fallback_port,
                } => (backup_id, level, source, excludes, base, fallback_port),
                other => bail!("expected a backup request, got {}", other.name()),
            };
        layer.set_read_timeout(conns.control, None)?;
        tracing::info!(
            backup_id = id,
            level = level.as_str(),
            channel = if conns.lan_reason.is_some() {
                "tcp"
            } else {
                "stp"
            },
            "the server asks for {source}"
        );
        let root = match check_excludes(&excludes).and_then(|()| allowed(rules, Path::new(&source)))
        {
            Ok(r) => r,
            Err(e) => {
                let message = format!("{e:#}");
                let _ = wire::send(
                    layer,
                    conns.control,
                    &Msg::Refused {
                        message: message.clone(),
                    },
                );
                PipeSender::new(
                    layer,
                    conns.data,
                    None,
                    host.policy,
                    id as u64,
                    Progress::hidden(),
                )
                .abort(&message);
                return Err(e.context(format!("refused backup {id} of {source}")));
            }
        };
        excludes.extend(rules.excludes.iter().cloned());
        let server_ip = wire::peer_ip(layer, conns.control)?;
        let fallback = (conns.lan_reason.is_none()).then(|| SocketAddr::new(server_ip, port));
        let estimate = (!opts.quiet).then(|| super::archive::estimate(&root, &excludes));
        let mut tx = PipeSender::new(
            layer,
            conns.data,
            fallback,
            host.policy,
            id as u64,
            Progress::bytes("sending", estimate, opts.quiet),
        )
        .with_psk(host.psk.clone());
        if let Some((after, hook)) = opts.fail_after {
            tx.fail_after(after, hook);
        }
        let errors_fd = conns.errors;
        let stream_t0 = Instant::now();
        let mut on_error = |path: &str, message: &str| -> Result<()> {
            wire::send(
                layer,
                errors_fd,
                &Msg::FileError {
                    path: path.into(),
                    message: message.into(),
                },
            )
        };
        let writer = TreeWriter::new(
            &mut tx,
            WalkOptions::new(level, excludes, base),
            &mut on_error,
        );
        let walked = writer.write_tree(&root);
        let (manifest, errors) = match walked {
            Ok((m, e, _)) => (m, e),
            Err(e) => {
                data_fd = tx.fd();
                tx.abort(&format!("{e:#}"));
                return Err(e);
            }
        };
        data_fd = tx.fd();
        let report = tx.finish()?;
        data_fd = report.fd;
        meter.stream_ended(layer, data_fd, &report.channels, stream_t0);
        let _ = layer.shutdown_write(conns.errors);
        meter.errors_connection(layer, conns.errors);
        let files = manifest.len() as u64;
        wire::send(layer, conns.control, &Msg::BackupDone { manifest, errors })?;
        let seconds = match wire::recv::<Msg>(layer, conns.control, "the server's result")? {
            Msg::BackupResult {
                ok: true, seconds, ..
            } => seconds,
            Msg::BackupResult { message, .. } => {
                bail!("the server could not record the backup: {message}")
            }
            other => bail!("expected the server's result, got {}", other.name()),
        };
        let traffic = meter.read(layer);
        Ok(Outcome {
            backup_id: id,
            files,
            errors,
            ..Outcome::of_stream(&report, &conns.lan_reason, seconds, t0, &meter, traffic)
        })
    })();
    close_all(layer, &[data_fd, conns.control, conns.errors]);
    res
}

/// One client-initiated session's connection (database backups,
/// restores through the array).
pub(super) struct DbConn {
    /// The one connection everything travels on.
    pub(super) data: Fd,
    /// Why it is TCP-only, if it is.
    pub(super) lan_reason: Option<String>,
    /// The other host, when the flow names it (a LAN session's peer is
    /// its TCP connection's).
    pub(super) peer: Option<IpAddr>,
}

/// The client's side of a client-initiated session with the server at
/// `server`: the seed's database flow (Fig. 5), or a LAN session.
pub(super) fn db_client_open(host: &Host, server: IpAddr) -> Result<DbConn> {
    let lan = |reason: String| -> Result<DbConn> {
        let fds = lan_connect(host, server, &reason, &["data"])?;
        Ok(DbConn {
            data: fds[0],
            lan_reason: Some(reason),
            peer: Some(server),
        })
    };
    if host.policy == Policy::Never {
        return lan("the fallback policy is 'never': the data goes over the LAN".into());
    }
    if let Some(problem) = host.array_problem() {
        if host.policy == Policy::Always {
            bail!("{problem}; the fallback policy is 'always', so the backup stops");
        }
        return lan(format!("array unavailable at the start: {problem}"));
    }
    match db_client_connect(
        &host.layer,
        server,
        host.wkp,
        host.psk.as_deref(),
        host.timeout,
    ) {
        Ok(s) => Ok(DbConn {
            data: s.data,
            lan_reason: None,
            peer: Some(s.peer),
        }),
        Err(e) if host.policy == Policy::Preferred => {
            lan(format!("the STP connection could not be set up: {e}"))
        }
        Err(e) => Err(e).context("setting up the database session (seed Fig. 5)"),
    }
}

/// Server side: waits for a database session on WKP (the seed's flow) and,
/// unless the policy is `always`, for a LAN session on WKP+2 at the same
/// time; takes whichever comes first. The LAN port is bound before the
/// flow starts, so a port in use fails at once and leaves nothing behind.
fn db_server_open(host: &Host) -> Result<DbConn> {
    let lan_only = host.policy == Policy::Never;
    let listener = if host.policy == Policy::Always {
        None
    } else {
        Some(wire::listen_tcp(&host.layer, SocketAddr::new(host.bind_ip, host.lan_port()?))?.0)
    };
    let deadline = Instant::now() + host.timeout;
    let (tx, rx) = mpsc::channel();
    if !lan_only {
        let h = host.clone();
        thread::spawn(move || {
            let r = db_server_accept(
                &h.layer,
                h.bind_ip,
                h.wkp,
                h.stg,
                h.stg_len,
                h.psk.as_deref(),
                h.timeout,
            );
            if let Err(Ok(s)) = tx.send(r).map_err(|e| e.0) {
                // Nobody waits for it any more (cannot happen while the
                // caller holds the receiver): do not leak the session.
                let _ = s.close(&h.layer);
            }
        });
    }
    let idle_or = |e: FlowError| -> anyhow::Error {
        if matches!(&e, FlowError::Timeout { step: "222", .. }) {
            Idle {
                waited: host.timeout,
            }
            .into()
        } else {
            anyhow!(e).context("accepting the database session (seed Fig. 5)")
        }
    };
    let Some(listener) = listener else {
        return match rx.recv() {
            Ok(Ok(s)) => Ok(DbConn {
                data: s.data,
                lan_reason: None,
                peer: Some(s.peer),
            }),
            Ok(Err(e)) => Err(idle_or(e)),
            Err(_) => bail!("the session thread ended without an answer"),
        };
    };
    let mut flow_error = None;
    let mut flow_done = lan_only;
    let res = loop {
        if !flow_done {
            if let Ok(r) = rx.try_recv() {
                flow_done = true;
                match r {
                    Ok(s) => {
                        break Ok(DbConn {
                            data: s.data,
                            lan_reason: None,
                            peer: Some(s.peer),
                        })
                    }
                    Err(e) => flow_error = Some(e),
                }
            }
        }
        match host.layer.accept(listener, Duration::from_millis(100)) {
            Ok(fd) => match lan_greet(host, fd, "data") {
                Ok(reason) => {
                    break Ok(DbConn {
                        data: fd,
                        lan_reason: Some(reason),
                        peer: None,
                    })
                }
                Err(e) => {
                    tracing::warn!("a LAN session was refused: {e:#}");
                    wire::close_quietly(&host.layer, fd)
                }
            },
            Err(e) if e.is_timeout() => {}
            Err(e) => break Err(anyhow!(e).context("waiting for a LAN session on WKP+2")),
        }
        if Instant::now() >= deadline {
            // The flow's own deadline is a moment later: take its answer
            // (a session that arrived just now is taken, not dropped).
            if !flow_done {
                flow_done = true;
                match rx.recv() {
                    Ok(Ok(s)) => {
                        break Ok(DbConn {
                            data: s.data,
                            lan_reason: None,
                            peer: Some(s.peer),
                        })
                    }
                    Ok(Err(e)) => flow_error = Some(e),
                    Err(_) => {}
                }
            }
            break Err(match flow_error.take() {
                None => Idle {
                    waited: host.timeout,
                }
                .into(),
                Some(e) => idle_or(e),
            });
        }
    };
    wire::close_quietly(&host.layer, listener);
    if !flow_done && matches!(&res, Ok(c) if c.lan_reason.is_some()) {
        end_flow_thread(host, &rx);
    }
    res
}

/// The LAN session won: make the flow thread still waiting on WKP give up
/// now (a connection that announces dynamic port 0 fails it at step 224),
/// so the port is free for the next session.
fn end_flow_thread(
    host: &Host,
    rx: &mpsc::Receiver<Result<stp_core::flows::DbSession, stp_core::flows::FlowError>>,
) {
    let ip = if host.bind_ip.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.bind_ip
    };
    if let Ok(fd) = wire::connect_tcp(
        &host.layer,
        SocketAddr::new(ip, host.wkp),
        Duration::from_millis(500),
    ) {
        let _ = host.layer.send_all(fd, &0u16.to_be_bytes());
        let _ = rx.recv_timeout(Duration::from_secs(2)).map(|r| {
            if let Ok(s) = r {
                // A client raced in over the array: it will retry.
                let _ = s.close(&host.layer);
            }
        });
        wire::close_quietly(&host.layer, fd);
    }
}

/// Chunk size of a command's output in the archive.
const STREAM_CHUNK: usize = 8 << 20;

/// The database host's side: takes a consistent copy of `source` and sends
/// it to the server at `server` (client-initiated, seed Fig. 5). `name`
/// names the database in the catalog.
pub fn db_backup(
    host: &Host,
    server: IpAddr,
    client_name: &str,
    name: &str,
    source: &DbSource,
    opts: RunOptions,
) -> Result<Outcome> {
    let t0 = Instant::now();
    // A SQLite snapshot is taken before any connection: local errors cost
    // the server nothing.
    let snapshot = match source {
        DbSource::Sqlite { path } => Some(sqlite_snapshot(Path::new(path))?),
        DbSource::Command { .. } => None,
    };
    let mut meter = Meter::start(&host.layer);
    let conn = db_client_open(host, server)?;
    let layer = &*host.layer;
    let mut data_fd = conn.data;
    let res = (|| -> Result<Outcome> {
        wire::send(
            layer,
            conn.data,
            &Msg::DbRequest {
                name: format!("{client_name}:{name}"),
                source: source.clone(),
            },
        )?;
        let (id, port) = match wire::recv::<Msg>(layer, conn.data, "the server's answer")? {
            Msg::DbAccept {
                backup_id,
                fallback_port,
            } => (backup_id, fallback_port),
            Msg::BackupResult { message, .. } => bail!("the server refused: {message}"),
            other => bail!("expected the server's answer, got {}", other.name()),
        };
        let fallback = conn
            .lan_reason
            .is_none()
            .then(|| SocketAddr::new(server, port));
        let mut tx = PipeSender::new(
            layer,
            conn.data,
            fallback,
            host.policy,
            id as u64,
            Progress::bytes(
                "sending",
                snapshot
                    .as_ref()
                    .and_then(|(_, f)| std::fs::metadata(f).ok())
                    .map(|m| m.len() + 2048),
                opts.quiet,
            ),
        )
        .with_psk(host.psk.clone());
        if let Some((after, hook)) = opts.fail_after {
            tx.fail_after(after, hook);
        }
        let stream_t0 = Instant::now();
        let built = match (&snapshot, source) {
            (Some((_dir, file)), _) => sqlite_entries(&mut tx, file, name),
            (None, DbSource::Command { command }) => command_entries(&mut tx, command),
            (None, DbSource::Sqlite { .. }) => Err(anyhow!("no snapshot was taken")),
        };
        let manifest = match built {
            Ok(m) => m,
            Err(e) => {
                data_fd = tx.fd();
                tx.abort(&format!("{e:#}"));
                return Err(e);
            }
        };
        data_fd = tx.fd();
        let report = tx.finish()?;
        data_fd = report.fd;
        meter.stream_ended(layer, data_fd, &report.channels, stream_t0);
        if data_fd.mechanism() == Mechanism::Tcp {
            layer.set_read_timeout(data_fd, Some(host.timeout))?;
        }
        let files = manifest.len() as u64;
        wire::send(layer, data_fd, &Msg::DbDone { manifest })?;
        let seconds = match wire::recv::<Msg>(layer, data_fd, "the server's result")? {
            Msg::BackupResult {
                ok: true, seconds, ..
            } => seconds,
            Msg::BackupResult { message, .. } => {
                bail!("the server could not record the backup: {message}")
            }
            other => bail!("expected the server's result, got {}", other.name()),
        };
        let traffic = meter.read(layer);
        Ok(Outcome {
            backup_id: id,
            files,
            ..Outcome::of_stream(&report, &conn.lan_reason, seconds, t0, &meter, traffic)
        })
    })();
    let _ = layer.flush(data_fd);
    wire::close_quietly(layer, data_fd);
    res
}

/// A consistent copy of a live SQLite database (SQLite's online backup
/// API), in a fresh temporary directory.
pub fn sqlite_snapshot(db: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let src = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open the SQLite database {}", db.display()))?;
    src.busy_timeout(Duration::from_secs(30))?;
    let dir = tempfile::tempdir().context("creating a temporary directory for the snapshot")?;
    let out = dir.path().join("snapshot.sqlite");
    let mut dst = rusqlite::Connection::open(&out)?;
    {
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)
            .context("starting SQLite's online backup")?;
        // All pages in one step, inside one read transaction: a consistent
        // snapshot that always finishes. (Copying in small steps lets
        // writers in between, but SQLite restarts the copy after every
        // write from another connection, so a database committing every
        // few milliseconds, copied by a slow machine, is never done.) In
        // WAL mode writers go on meanwhile; otherwise they wait for the
        // copy (their busy timeout).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match backup
                .step(-1)
                .with_context(|| format!("SQLite's online backup of {} failed", db.display()))?
            {
                rusqlite::backup::StepResult::Done => break,
                _ if std::time::Instant::now() >= deadline => bail!(
                    "SQLite's online backup of {} could not get a read lock within 60 s (a writer holds the database); try again when it is quieter",
                    db.display()
                ),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    drop(dst);
    Ok((dir, out))
}

fn sqlite_entries(tx: &mut PipeSender<'_>, file: &Path, name: &str) -> Result<Vec<ManifestEntry>> {
    let mut b = tar::Builder::new(tx);
    let mut f = std::fs::File::open(file)?;
    let size = f.metadata()?.len();
    let entry_name = format!("{}.sqlite", sanitize(name));
    let e = append_blob(&mut b, &entry_name, &mut f, size, 0o600)?;
    b.finish().context("writing the end of the archive")?;
    Ok(vec![e])
}

/// A safe single-component name for an archive entry.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_owned();
    if s.is_empty() {
        "db".into()
    } else {
        s
    }
}

fn command_entries(tx: &mut PipeSender<'_>, command: &str) -> Result<Vec<ManifestEntry>> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run `sh -c {command:?}`"))?;
    let mut out = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("the command has no standard output"))?;
    let mut b = tar::Builder::new(tx);
    let mut manifest = Vec::new();
    let mut buf = vec![0u8; STREAM_CHUNK];
    let mut index = 0u32;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = out
                .read(&mut buf[filled..])
                .context("reading the command's output")?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 && index > 0 {
            break;
        }
        let name = format!("stream/{index:06}");
        manifest.push(append_blob(
            &mut b,
            &name,
            &mut &buf[..filled],
            filled as u64,
            0o600,
        )?);
        index += 1;
        if filled < buf.len() {
            break;
        }
    }
    let status = child.wait().context("waiting for the command")?;
    if !status.success() {
        bail!("`{command}` failed ({status}); nothing was recorded (see its messages above)");
    }
    b.finish().context("writing the end of the archive")?;
    Ok(manifest)
}

/// The server's side of one client-initiated session: accepts it (seed
/// Fig. 5, or a LAN session); for a database backup, writes the stream
/// into `repo` and marks it complete once durable; for a restore, streams
/// the backup back ([`super::remote`]).
pub fn db_serve(host: &Host, repo: &Repo, opts: RunOptions) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut meter = Meter::start(&host.layer);
    let conn = db_server_open(host)?;
    let layer = &*host.layer;
    let (name, source) = match wire::recv::<Msg>(layer, conn.data, "the client's request") {
        Ok(Msg::DbRequest { name, source }) => (name, source),
        Ok(Msg::RestoreRequest {
            version,
            backup_id,
            paths,
            client,
            to,
            fallback_port,
        }) => {
            let ask = super::remote::RestoreAsk {
                version,
                backup_id,
                paths,
                client,
                to,
                fallback_port,
            };
            return super::remote::serve(host, repo, conn, ask, meter, t0, opts);
        }
        Ok(other) => {
            wire::close_quietly(layer, conn.data);
            bail!("expected a database request, got {}", other.name());
        }
        Err(e) => {
            wire::close_quietly(layer, conn.data);
            return Err(e);
        }
    };
    let (client, dbname) = name
        .split_once(':')
        .map_or(("unknown".to_owned(), name.clone()), |(c, n)| {
            (c.into(), n.into())
        });
    let src_desc = match &source {
        DbSource::Sqlite { path } => format!("sqlite:{dbname}:{path}"),
        DbSource::Command { command } => format!("command:{dbname}:{command}"),
    };
    let mut pending = repo.begin("db", &client, &src_desc, "full", None)?;
    let id = pending.id;
    tracing::info!(backup_id = id, client = %client, "database backup of {dbname}");
    if let Some(r) = &conn.lan_reason {
        if let Err(e) = repo.note_channel(id, "tcp", Some(r)) {
            tracing::warn!("backup {id}: noting the LAN session in the catalog failed: {e:#}");
        }
    }
    let mut data_fd = conn.data;
    let listener = wire::listen_tcp(layer, SocketAddr::new(host.bind_ip, 0));
    let stream_t0 = Instant::now();
    let res = (|| -> Result<(Vec<ManifestEntry>, StreamReport)> {
        let (listener, port) = listener?;
        let r = (|| {
            wire::send(
                layer,
                conn.data,
                &Msg::DbAccept {
                    backup_id: id,
                    fallback_port: port,
                },
            )?;
            let mut rx = PipeReceiver::new(
                layer,
                conn.data,
                Some(listener),
                host.policy,
                id as u64,
                Progress::bytes("receiving", None, opts.quiet),
            )
            .with_psk(host.psk.clone());
            let report = rx.run(pending.sink());
            data_fd = rx.fd();
            let report = report?;
            meter.stream_ended(layer, data_fd, &report.channels, stream_t0);
            if data_fd.mechanism() == Mechanism::Tcp {
                layer.set_read_timeout(data_fd, Some(host.timeout))?;
            }
            match wire::recv::<Msg>(layer, data_fd, "the client's summary")? {
                Msg::DbDone { manifest } => Ok((manifest, report)),
                other => bail!("expected the client's summary, got {}", other.name()),
            }
        })();
        wire::close_quietly(layer, listener);
        r
    })();
    let out = match res {
        Ok((manifest, report)) => {
            let files = manifest.len() as u64;
            let info = repo.commit(pending, manifest, &report, &[]);
            let seconds = stream_t0.elapsed().as_secs_f64();
            let (ok, message) = match &info {
                Ok(_) => (true, format!("backup {id} complete")),
                Err(e) => (false, format!("{e:#}")),
            };
            let _ = wire::send(
                layer,
                data_fd,
                &Msg::BackupResult {
                    ok,
                    backup_id: id,
                    message,
                    seconds,
                },
            );
            let mut info = info?;
            let traffic = meter.read(layer);
            record_traffic(repo, id, &traffic);
            info.traffic = Some(traffic);
            Ok(Outcome {
                backup_id: id,
                files,
                info: Some(info),
                ..Outcome::of_stream(&report, &conn.lan_reason, seconds, t0, &meter, traffic)
            })
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if let Err(f) = repo.fail(pending, &msg) {
                tracing::error!("backup {id}: recording the failure in the catalog failed: {f:#}");
            }
            record_traffic(repo, id, &meter.read(layer));
            Err(e.context(format!("backup {id} failed and is recorded as failed")))
        }
    };
    // Wait for the client's close so its last read sees our answer.
    let mut b = [0u8; 1];
    if data_fd.mechanism() == Mechanism::Tcp {
        let _ = layer.set_read_timeout(data_fd, Some(Duration::from_secs(5)));
    }
    let _ = layer.recv(data_fd, &mut b);
    wire::close_quietly(layer, data_fd);
    out
}
