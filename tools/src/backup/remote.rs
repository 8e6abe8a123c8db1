//! Restores to another host through the array (docs/BACKUP.md §2 and §7):
//! the host that wants its files back asks the backup server, and the
//! server streams them back, over the database flow's session
//! (client-initiated, seed Fig. 5; a LAN session when the array cannot be
//! used), with the data stream and its fallback of [`super::pipe`] running
//! the other way.
//!
//! | step | who | what |
//! | --- | --- | --- |
//! | 1 | client → server | `restore_request` (version, backup, paths, where the client resumes) |
//! | 2 | server → client | `restore_accept` (the catalog's restore id, the manifest entries restored) or `refused` |
//! | 3 | server → client | the tar stream of exactly those entries (§4) |
//! | 4 | client → server | `restore_done`, once every file is written, checked and renamed into place |
//! | 5 | server → client | `restore_result`, once the catalog records it |
//!
//! The client extracts while the stream arrives (one thread receives, one
//! writes), with the rules of a restore on the server's own host: each
//! file under a temporary name, its SHA-256 checked against the manifest
//! before the rename, hostile paths refused. Both sides count where the
//! bytes went; the server records its count in the catalog's `restores`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use stp_core::sockets::Mechanism;

use super::archive::{self, Extracted};
use super::pipe::{PipeReceiver, PipeSender, StreamReport};
use super::progress::Progress;
use super::repo::{Repo, RestoreEnd};
use super::restore::RestorePlan;
use super::session::{db_client_open, DbConn, Host, Outcome, RunOptions};
use super::traffic::Meter;
use super::wire::{self, Msg, RESTORE_VERSION};

/// What the client asked for (step 1).
#[derive(Clone, Debug)]
pub struct RestoreAsk {
    /// The restore protocol version the client speaks.
    pub version: u32,
    /// The backup to restore.
    pub backup_id: i64,
    /// Only these paths (and what is under them); empty: everything.
    pub paths: Vec<String>,
    /// The client's name, for the catalog.
    pub client: String,
    /// Where the files go on the client, for the catalog.
    pub to: String,
    /// The client's TCP port to resume the stream on if the array fails.
    pub fallback_port: u16,
}

/// Refuses a restore on the session: tells the client why and fails.
fn refuse(host: &Host, conn: &DbConn, why: String) -> anyhow::Error {
    let _ = wire::send(
        &host.layer,
        conn.data,
        &Msg::Refused {
            message: why.clone(),
        },
    );
    let _ = host.layer.flush(conn.data);
    wire::close_quietly(&host.layer, conn.data);
    anyhow!("{why}")
}

/// The server's side of one restore (steps 2–5), after the session's
/// first message asked for it: streams backup `ask.backup_id` from `repo`
/// and records the restore, its outcome and where its bytes went.
pub(super) fn serve(
    host: &Host,
    repo: &Repo,
    conn: DbConn,
    ask: RestoreAsk,
    mut meter: Meter,
    t0: Instant,
    opts: RunOptions,
) -> Result<Outcome> {
    let layer = &*host.layer;
    if ask.version != RESTORE_VERSION {
        return Err(refuse(
            host,
            &conn,
            format!(
                "the client asks for a restore in protocol version {}, this server speaks {}: \
                 run the same stp version on both hosts",
                ask.version, RESTORE_VERSION
            ),
        ));
    }
    let plan = match repo.restore_plan(ask.backup_id, &ask.paths) {
        Ok(p) => p,
        Err(e) => return Err(refuse(host, &conn, format!("{e:#}"))),
    };
    let rid = match repo.begin_restore(ask.backup_id, &ask.client, &ask.to, &ask.paths) {
        Ok(id) => id,
        Err(e) => return Err(refuse(host, &conn, format!("recording the restore: {e:#}"))),
    };
    tracing::info!(
        restore_id = rid,
        backup_id = ask.backup_id,
        client = %ask.client,
        "restoring backup {} to {}",
        ask.backup_id,
        ask.to
    );
    if let Some(r) = &conn.lan_reason {
        if let Err(e) = repo.note_restore_channel(rid, "tcp", Some(r)) {
            tracing::warn!("restore {rid}: noting the LAN session in the catalog failed: {e:#}");
        }
    }
    let peer = conn.peer.or_else(|| wire::peer_ip(layer, conn.data).ok());
    let fallback = match (&conn.lan_reason, peer) {
        (None, Some(ip)) => Some(SocketAddr::new(ip, ask.fallback_port)),
        _ => None,
    };
    let total = repo.restore_bytes(&plan);
    let mut data_fd = conn.data;
    let stream_t0 = Instant::now();
    let result = (|| -> Result<(StreamReport, u64, String)> {
        wire::send(
            layer,
            conn.data,
            &Msg::RestoreAccept {
                version: RESTORE_VERSION,
                restore_id: rid,
                backup_id: ask.backup_id,
                entries: plan.entries.clone(),
                whole: plan.whole,
                bytes: total,
            },
        )?;
        let mut tx = PipeSender::new(
            layer,
            conn.data,
            fallback,
            host.policy,
            rid as u64,
            Progress::bytes("sending", Some(total), opts.quiet),
        )
        .with_psk(host.psk.clone());
        if let Some((after, hook)) = opts.fail_after {
            tx.fail_after(after, hook);
        }
        if let Err(e) = repo.write_restore(&plan, &mut tx) {
            data_fd = tx.fd();
            tx.abort(&format!("{e:#}"));
            return Err(e);
        }
        data_fd = tx.fd();
        let report = tx.finish()?;
        data_fd = report.fd;
        meter.stream_ended(layer, data_fd, &report.channels, stream_t0);
        if data_fd.mechanism() == Mechanism::Tcp {
            layer.set_read_timeout(data_fd, Some(host.timeout))?;
        }
        match wire::recv::<Msg>(layer, data_fd, "the client's word on the restore")? {
            Msg::RestoreDone {
                ok: true, files, ..
            } => Ok((report, files, String::new())),
            Msg::RestoreDone { message, .. } => {
                bail!("the client could not complete the restore: {message}")
            }
            other => bail!(
                "expected the client's word on the restore, got {}",
                other.name()
            ),
        }
    })();
    let seconds = stream_t0.elapsed().as_secs_f64();
    let out = match result {
        Ok((report, files, _)) => {
            let recorded = repo.end_restore(
                rid,
                &RestoreEnd {
                    ok: true,
                    bytes: report.bytes,
                    files,
                    channel: report.channels.summary(),
                    fallback_reason: report.channels.reason.clone(),
                    message: format!("restore {rid} of backup {} complete", ask.backup_id),
                },
            );
            let _ = wire::send(
                layer,
                data_fd,
                &Msg::RestoreResult {
                    ok: true,
                    restore_id: rid,
                    message: match &recorded {
                        Ok(()) => format!("restore {rid} complete"),
                        Err(e) => {
                            format!("restore {rid} complete; the catalog did not take it: {e:#}")
                        }
                    },
                    seconds,
                },
            );
            if let Err(e) = recorded {
                tracing::warn!("restore {rid}: recording its end in the catalog failed: {e:#}");
            }
            let traffic = meter.read(layer);
            record_traffic(repo, rid, &traffic);
            Ok(Outcome {
                backup_id: ask.backup_id,
                restore_id: Some(rid),
                files,
                ..Outcome::of_stream(&report, &conn.lan_reason, seconds, t0, &meter, traffic)
            })
        }
        Err(e) => {
            let message = format!("{e:#}");
            if let Err(f) = repo.end_restore(
                rid,
                &RestoreEnd {
                    ok: false,
                    bytes: 0,
                    files: 0,
                    channel: conn_channel(&conn),
                    fallback_reason: conn.lan_reason.clone(),
                    message: message.clone(),
                },
            ) {
                tracing::error!(
                    "restore {rid}: recording the failure in the catalog failed: {f:#}"
                );
            }
            record_traffic(repo, rid, &meter.read(layer));
            Err(e.context(format!("restore {rid} failed and is recorded as failed")))
        }
    };
    // Wait for the client's close so its last read sees our answer.
    let mut b = [0u8; 1];
    if data_fd.mechanism() == Mechanism::Tcp {
        let _ = layer.set_read_timeout(data_fd, Some(std::time::Duration::from_secs(5)));
    }
    let _ = layer.recv(data_fd, &mut b);
    wire::close_quietly(layer, data_fd);
    out
}

fn conn_channel(conn: &DbConn) -> String {
    if conn.lan_reason.is_some() {
        "tcp"
    } else {
        "stp"
    }
    .into()
}

fn record_traffic(repo: &Repo, id: i64, t: &super::traffic::ChannelUse) {
    if let Err(e) = repo.record_restore_traffic(id, t) {
        tracing::warn!("restore {id}: recording its per-channel byte counts failed: {e:#}");
    }
}

/// What a restore asks of the server (the client's side).
#[derive(Clone, Debug)]
pub struct RestoreJob {
    /// The backup server's address.
    pub server: IpAddr,
    /// This host's name, for the server's catalog.
    pub client_name: String,
    /// The backup to restore.
    pub backup_id: i64,
    /// Only these paths (and what is under them); empty: everything.
    pub paths: Vec<String>,
}

/// The client's side of a restore through the array: asks the server at
/// `job.server` for backup `job.backup_id` and writes it into `dest`
/// (created if missing) as it arrives, by the rules of docs/BACKUP.md §7.
/// The outcome's `seconds` and `mb_per_s` are the server's measurement.
pub fn restore_from_server(
    host: &Host,
    job: &RestoreJob,
    dest: &Path,
    opts: RunOptions,
) -> Result<Outcome> {
    let t0 = Instant::now();
    let mut meter = Meter::start(&host.layer);
    let conn = db_client_open(host, job.server)?;
    let layer = &*host.layer;
    let mut data_fd = conn.data;
    let mut listener = None;
    let res = (|| -> Result<Outcome> {
        // Where the server resumes the stream over TCP if the array fails
        // (a LAN session has nothing to fall back to).
        let port = if conn.lan_reason.is_none() {
            let (l, port) = wire::listen_tcp(layer, SocketAddr::new(host.bind_ip, 0))?;
            listener = Some(l);
            port
        } else {
            0
        };
        wire::send(
            layer,
            conn.data,
            &Msg::RestoreRequest {
                version: RESTORE_VERSION,
                backup_id: job.backup_id,
                paths: job.paths.clone(),
                client: job.client_name.clone(),
                to: dest.display().to_string(),
                fallback_port: port,
            },
        )?;
        let answer = wire::recv_opt::<Msg>(layer, conn.data)
            .context("waiting for the server's answer to the restore request")?;
        let (rid, entries, whole, total) = match answer {
            Some(Msg::RestoreAccept {
                version,
                restore_id,
                backup_id,
                entries,
                whole,
                bytes,
            }) => {
                if version != RESTORE_VERSION || backup_id != job.backup_id {
                    bail!(
                        "the server answered for backup {backup_id} in restore protocol version \
                         {version} (asked: backup {}, version {RESTORE_VERSION}): run the same \
                         stp version on both hosts",
                        job.backup_id
                    );
                }
                (restore_id, entries, whole, bytes)
            }
            Some(Msg::Refused { message }) => bail!("the server refused the restore: {message}"),
            Some(other) => bail!(
                "expected the server's answer to the restore request, got {}",
                other.name()
            ),
            None => bail!(
                "the server closed the session without answering the restore request: a server \
                 built before restores through the array cannot serve one (upgrade stp on the \
                 server), or see the server's log"
            ),
        };
        let plan = RestorePlan::from_entries(job.backup_id, entries, whole)
            .context("the server's list of entries to restore")?;
        let mut rx = PipeReceiver::new(
            layer,
            conn.data,
            listener,
            host.policy,
            rid as u64,
            Progress::bytes("receiving", Some(total), opts.quiet),
        )
        .with_psk(host.psk.clone());
        let stream_t0 = Instant::now();
        let received = receive_into(&mut rx, &plan, dest);
        data_fd = rx.fd();
        let (report, extracted) = received?;
        meter.stream_ended(layer, data_fd, &report.channels, stream_t0);
        if data_fd.mechanism() == Mechanism::Tcp {
            layer.set_read_timeout(data_fd, Some(host.timeout))?;
        }
        let mut done = Extracted::default();
        let finished = extracted.and_then(|d| {
            done = d;
            plan.finish(dest, done.root, &mut done)?;
            let want = plan.file_count();
            if done.files != want {
                bail!(
                    "the server's stream held {} of the {want} files the restore names: the \
                     restore is incomplete",
                    done.files
                );
            }
            Ok(())
        });
        wire::send(
            layer,
            data_fd,
            &Msg::RestoreDone {
                ok: finished.is_ok(),
                files: done.files,
                bytes: done.bytes,
                message: finished
                    .as_ref()
                    .err()
                    .map_or(String::new(), |e| format!("{e:#}")),
            },
        )?;
        finished?;
        let seconds = match wire::recv::<Msg>(layer, data_fd, "the server's result")? {
            Msg::RestoreResult {
                ok: true, seconds, ..
            } => seconds,
            Msg::RestoreResult { message, .. } => {
                bail!("the server could not record the restore: {message}")
            }
            other => bail!("expected the server's result, got {}", other.name()),
        };
        let traffic = meter.read(layer);
        Ok(Outcome {
            backup_id: job.backup_id,
            restore_id: Some(rid),
            files: done.files,
            ..Outcome::of_stream(&report, &conn.lan_reason, seconds, t0, &meter, traffic)
        })
    })();
    if let Some(l) = listener {
        wire::close_quietly(layer, l);
    }
    let _ = layer.flush(data_fd);
    wire::close_quietly(layer, data_fd);
    res
}

/// Segments of the stream in flight between the receiving thread and the
/// extracting one.
const QUEUE: usize = 4;

/// Receives the stream with `rx` on this thread while another extracts it
/// into `dest`: the restore writes files while the next segments arrive.
/// An extraction that fails stops the stream (the receiver gives up with
/// its reason, which the server sees); a stream that fails stops the
/// extraction. `Err`: the stream did not complete; `Ok` with an inner
/// `Err`: it did, and the extraction failed.
fn receive_into(
    rx: &mut PipeReceiver<'_>,
    plan: &RestorePlan,
    dest: &Path,
) -> Result<(StreamReport, Result<Extracted>)> {
    let (tx, segments) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let why = Arc::new(Mutex::new(None::<String>));
    thread::scope(|s| {
        let extractor = {
            let why = Arc::clone(&why);
            s.spawn(move || -> Result<Extracted> {
                let mut reader = Segments {
                    rx: segments,
                    cur: Vec::new(),
                    at: 0,
                };
                let want = |p: &str, k| plan.wants_any(p, k);
                let done = archive::extract(&mut reader, dest, &plan.extract_options(&want));
                match done {
                    // Whatever follows the archive's end (its padding)
                    // is read, so the stream completes.
                    Ok(d) => {
                        io::copy(&mut reader, &mut io::sink()).context("reading the stream")?;
                        Ok(d)
                    }
                    Err(e) => {
                        *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                        Err(e)
                    }
                }
            })
        };
        let mut sink = Feed {
            tx,
            why: &why,
            failed: false,
        };
        let report = rx.run(&mut sink);
        let extraction_stopped = sink.failed;
        drop(sink);
        let extracted = extractor
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the extracting thread panicked")))
            .context("restoring the server's stream");
        match report {
            Ok(r) => Ok((r, extracted)),
            // The extraction stopped first: its error says what went
            // wrong on this host; the stream's only says it stopped.
            Err(e) if extraction_stopped => Err(extracted.err().unwrap_or(e)),
            // The stream broke; the extraction only saw it end.
            Err(e) => Err(e),
        }
    })
}

/// The receiving side's sink: hands each segment to the extracting thread.
struct Feed<'a> {
    tx: SyncSender<Vec<u8>>,
    why: &'a Mutex<Option<String>>,
    /// The extracting side stopped taking segments.
    failed: bool,
}

impl Write for Feed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tx.send(buf.to_vec()).is_err() {
            self.failed = true;
            let why = self
                .why
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_else(|| "the extraction stopped".into());
            return Err(io::Error::other(why));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The extracting side's reader: the segments, in order; the end of the
/// stream when the receiving side is done.
struct Segments {
    rx: Receiver<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
}

impl Read for Segments {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.cur.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.cur = v;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.at);
        buf[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
