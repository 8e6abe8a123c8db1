//! The data stream of a backup, with acknowledgements and LAN fallback
//! (docs/BACKUP.md §4).
//!
//! The sender cuts the byte stream into *segments* of at most [`SEGMENT`]
//! bytes; each travels as a 4-byte big-endian length and the bytes. The
//! receiver hands each complete segment to its sink and answers with an
//! acknowledgement (`1`, then the stream offset after the segment, u64).
//! The sender keeps every unacknowledged segment and stops to read
//! acknowledgements when more than [`WINDOW`] are outstanding. A zero
//! length ends the stream; it is followed by the stream's length (u64) and
//! SHA-256 (32 bytes), and the receiver answers `2` (all well) or `3`
//! (mismatch) with the length it has.
//!
//! When a send or receive on the STP connection fails (or it ends early),
//! and the policy allows it, both sides move to TCP: the receiver listens
//! on a port it announced before the data, the sender connects and sends
//! [`RESUME_MAGIC`] and the job id, the receiver answers with the offset of
//! the end of the last segment it took, and the sender resends everything
//! from there. No byte is lost or written twice: the receiver only ever
//! takes whole segments, in order.
//!
//! A receiver whose sink fails (a full disk, a restore that refuses an
//! entry) gives up: `4`, a reason length (u32) and the UTF-8 reason, in
//! place of the next acknowledgement; the sender stops with that reason.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use stp_core::sockets::{Fd, Mechanism, SockError, SocketLayer};

use super::hashing::StreamHasher;
use super::progress::Progress;
use super::wire;

/// Most bytes in one segment.
pub const SEGMENT: usize = 1 << 20;
/// Most unacknowledged segments in flight.
pub const WINDOW: usize = 8;
/// The first bytes of a resume connection.
pub const RESUME_MAGIC: [u8; 16] = *b"STP-BK-RESUME\0\0\0";

/// A segment length that means "the sender gives up": a u32 length and a
/// UTF-8 reason follow.
const ABORT: u32 = u32::MAX;
/// Longest abort reason.
const MAX_REASON: usize = 64 * 1024;

const ACK: u8 = 1;
const FINAL_OK: u8 = 2;
const FINAL_BAD: u8 = 3;
/// Receiver → sender: the receiver gives up (its sink failed); a u32
/// length and a UTF-8 reason follow.
const GIVE_UP: u8 = 4;

/// Whether the data may travel over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Use the array; fall back to TCP when it is unavailable at the start
    /// or fails mid-stream.
    #[default]
    Preferred,
    /// Use the array only; fail if it fails.
    Always,
    /// Never use the array: TCP only.
    Never,
}

impl Policy {
    /// The configuration file's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Preferred => "preferred",
            Policy::Always => "always",
            Policy::Never => "never",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "preferred" => Ok(Policy::Preferred),
            "always" => Ok(Policy::Always),
            "never" => Ok(Policy::Never),
            _ => Err(format!(
                "unknown fallback policy {s:?}: use preferred, always or never"
            )),
        }
    }
}

/// Which channels carried a stream, and why it changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelLog {
    /// The channels in order of use: `stp`, `tcp`.
    pub used: Vec<String>,
    /// Why the stream left STP, if it did.
    pub reason: Option<String>,
    /// Stream offset at which it moved to TCP.
    pub resumed_at: Option<u64>,
    /// When it moved to TCP (this process's clock), for the time spent on
    /// each channel.
    #[serde(skip)]
    pub moved_at: Option<Instant>,
}

impl ChannelLog {
    /// A log starting on `mechanism`.
    pub fn starting(mechanism: Mechanism) -> ChannelLog {
        ChannelLog {
            used: vec![name(mechanism).into()],
            reason: None,
            resumed_at: None,
            moved_at: None,
        }
    }

    /// Seconds of a stream that ran from `start` to `end` spent on the
    /// array and on the LAN: (array, LAN).
    pub fn split_time(&self, start: Instant, end: Instant) -> (f64, f64) {
        let whole = end.saturating_duration_since(start).as_secs_f64();
        if self.used.first().map(String::as_str) != Some("stp") {
            return (0.0, whole);
        }
        match self.moved_at {
            Some(t) => {
                let on_stp = t.saturating_duration_since(start).as_secs_f64().min(whole);
                (on_stp, whole - on_stp)
            }
            None => (whole, 0.0),
        }
    }

    /// The catalog's channel column: `stp`, `tcp` or `stp+tcp`.
    pub fn summary(&self) -> String {
        self.used.join("+")
    }
}

fn name(m: Mechanism) -> &'static str {
    match m {
        Mechanism::Stp => "stp",
        Mechanism::Tcp => "tcp",
    }
}

/// What a finished stream carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamReport {
    /// Stream bytes.
    pub bytes: u64,
    /// SHA-256 of the stream, hex.
    pub sha256: String,
    /// The channels.
    pub channels: ChannelLog,
    /// The descriptor that carried the end of the stream (TCP after a
    /// fallback): the session's next messages go there.
    pub fd: Fd,
}

/// A one-shot action a test runs when the sender has sent a number of
/// bytes (to break the STP connection mid-stream).
pub type FailHook = Box<dyn FnMut(&SocketLayer, Fd) + Send>;

const ABORTED: &str = "the sender gave up: ";
const RESUME_LABEL: &str = "stp-backup resume";

/// How long a resume connection waits for the peer (longer than the STP
/// idle timeout, so the receiver has noticed the failure).
pub const RESUME_PATIENCE: Duration = Duration::from_secs(90);

/// How long a sender keeps trying to connect to the receiver's resume port
/// while it is refused. The receiver listens there from before the data
/// until the stream ends, so a refusal means it is gone: the sender stops
/// soon rather than waiting [`RESUME_PATIENCE`].
pub const RESUME_CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// The sending side: a [`Write`] whose bytes reach the receiver's sink.
pub struct PipeSender<'a> {
    layer: &'a SocketLayer,
    fd: Fd,
    /// Where the receiver takes a resume connection.
    fallback: Option<SocketAddr>,
    policy: Policy,
    job: u64,
    seg: Vec<u8>,
    /// Sent, unacknowledged segments with their start offsets.
    unacked: VecDeque<(u64, Arc<Vec<u8>>)>,
    sent: u64,
    finishing: bool,
    /// The stream's SHA-256, on a thread of its own.
    hasher: StreamHasher,
    log: ChannelLog,
    hook: Option<(u64, FailHook)>,
    progress: Progress,
    psk: Option<Vec<u8>>,
}

impl<'a> PipeSender<'a> {
    /// A sender on the connected descriptor `fd`. `fallback` is where the
    /// receiver takes a resume connection (None: no fallback possible).
    pub fn new(
        layer: &'a SocketLayer,
        fd: Fd,
        fallback: Option<SocketAddr>,
        policy: Policy,
        job: u64,
        progress: Progress,
    ) -> PipeSender<'a> {
        PipeSender {
            layer,
            fd,
            fallback,
            policy,
            job,
            seg: Vec::with_capacity(SEGMENT),
            unacked: VecDeque::new(),
            sent: 0,
            finishing: false,
            hasher: StreamHasher::new(),
            log: ChannelLog::starting(fd.mechanism()),
            hook: None,
            progress,
            psk: None,
        }
    }

    /// Proves the pre-shared key on a resume connection (the receiver
    /// refuses one that does not).
    pub fn with_psk(mut self, psk: Option<Vec<u8>>) -> Self {
        self.psk = psk;
        self
    }

    /// Runs `hook` once the sender has sent `after` bytes (tests).
    pub fn fail_after(&mut self, after: u64, hook: FailHook) {
        self.hook = Some((after, hook));
    }

    /// The descriptor currently carrying the data.
    pub fn fd(&self) -> Fd {
        self.fd
    }

    fn raw_send(&self, bytes: &[u8]) -> Result<(), SockError> {
        self.layer.send_all(self.fd, bytes)
    }

    fn send_segment_raw(&self, data: &[u8]) -> Result<(), SockError> {
        self.raw_send(&(data.len() as u32).to_be_bytes())?;
        self.raw_send(data)
    }

    fn send_end_raw(&mut self) -> Result<(), SockError> {
        let mut end = Vec::with_capacity(4 + 8 + 32);
        end.extend_from_slice(&0u32.to_be_bytes());
        end.extend_from_slice(&self.sent.to_be_bytes());
        end.extend_from_slice(&self.hasher.finish());
        self.raw_send(&end)?;
        if self.fd.mechanism() == Mechanism::Stp {
            self.layer.flush(self.fd)?;
        }
        Ok(())
    }

    fn push_segment(&mut self) -> Result<()> {
        if self.seg.is_empty() {
            return Ok(());
        }
        let data = Arc::new(std::mem::replace(
            &mut self.seg,
            Vec::with_capacity(SEGMENT),
        ));
        self.hasher.update(Arc::clone(&data));
        let start = self.sent;
        self.sent += data.len() as u64;
        let res = self.send_segment_raw(&data);
        self.unacked.push_back((start, data));
        if let Err(e) = res {
            self.fall_back(format!("sending data at offset {start} failed: {e}"))?;
        }
        self.progress.set(self.sent);
        if let Some((after, _)) = &self.hook {
            if self.sent >= *after {
                if let Some((_, mut hook)) = self.hook.take() {
                    hook(self.layer, self.fd);
                }
            }
        }
        while self.unacked.len() > WINDOW {
            self.read_ack()?;
        }
        Ok(())
    }

    /// Reads one acknowledgement (falling back if the channel fails);
    /// returns the final answer if it was one.
    fn read_ack(&mut self) -> Result<Option<(bool, u64)>> {
        loop {
            let mut a = [0u8; 9];
            let got = self.layer.recv_exact(self.fd, &mut a[..1]).and_then(|()| {
                if a[0] == GIVE_UP {
                    Ok(())
                } else {
                    self.layer.recv_exact(self.fd, &mut a[1..])
                }
            });
            if got.is_ok() && a[0] == GIVE_UP {
                let why = read_reason(self.layer, self.fd)
                    .unwrap_or_else(|e| format!("(its reason was lost: {e})"));
                bail!("the receiver gave up: {why}");
            }
            match got {
                Ok(()) => {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&a[1..]);
                    let v = u64::from_be_bytes(v);
                    return match a[0] {
                        ACK => {
                            if v > self.sent {
                                bail!("the receiver acknowledged offset {v} but only {} bytes were sent: protocol error", self.sent);
                            }
                            while self
                                .unacked
                                .front()
                                .is_some_and(|(s, d)| s + d.len() as u64 <= v)
                            {
                                self.unacked.pop_front();
                            }
                            Ok(None)
                        }
                        FINAL_OK => Ok(Some((true, v))),
                        FINAL_BAD => Ok(Some((false, v))),
                        k => bail!("the receiver sent acknowledgement kind {k}: protocol error"),
                    };
                }
                Err(e) => self.fall_back(format!(
                    "reading an acknowledgement (after {} bytes sent) failed: {e}",
                    self.sent
                ))?,
            }
        }
    }

    /// Moves the stream to TCP and resends what the receiver lacks.
    fn fall_back(&mut self, reason: String) -> Result<()> {
        if self.fd.mechanism() == Mechanism::Tcp {
            bail!("{reason} (over TCP; nothing left to fall back to)");
        }
        if self.policy != Policy::Preferred {
            bail!(
                "{reason}; the fallback policy is '{}', so the backup stops (set \
                 fallback = \"preferred\" to continue over the LAN)",
                self.policy.as_str()
            );
        }
        let Some(addr) = self.fallback else {
            bail!("{reason}; the receiver offered no TCP port to resume on");
        };
        wire::close_quietly(self.layer, self.fd);
        let fd = wire::connect_tcp(self.layer, addr, RESUME_CONNECT_PATIENCE)
            .with_context(|| format!("{reason}; resuming over TCP"))?;
        self.fd = fd;
        let setup = (|| -> Result<u64, SockError> {
            self.layer.set_read_timeout(fd, Some(RESUME_PATIENCE))?;
            let mut challenge = [0u8; wire::NONCE_LEN];
            self.layer.recv_exact(fd, &mut challenge)?;
            let mut hello = RESUME_MAGIC.to_vec();
            hello.extend_from_slice(&self.job.to_be_bytes());
            let proof = self.psk.as_deref().map_or([0u8; 32], |k| {
                wire::proof(k, RESUME_LABEL, &challenge, &self.job.to_be_bytes())
            });
            hello.extend_from_slice(&proof);
            self.raw_send(&hello)?;
            let mut off = [0u8; 8];
            self.layer.recv_exact(fd, &mut off)?;
            self.layer.set_read_timeout(fd, None)?;
            Ok(u64::from_be_bytes(off))
        })();
        let resume = setup.with_context(|| format!("{reason}; resuming over TCP at {addr}"))?;
        while self
            .unacked
            .front()
            .is_some_and(|(s, d)| s + d.len() as u64 <= resume)
        {
            self.unacked.pop_front();
        }
        let have = self.unacked.front().map_or(self.sent, |(s, _)| *s);
        if have != resume {
            bail!(
                "{reason}; the receiver resumes at offset {resume} but this side holds the \
                 stream only from {have}: cannot continue without a gap"
            );
        }
        self.log.used.push("tcp".into());
        self.log.moved_at = Some(Instant::now());
        self.log.reason = Some(reason);
        self.log.resumed_at = Some(resume);
        self.progress.note(&format!(
            "LAN fallback: {}; continuing over TCP from byte {resume}",
            self.log.reason.as_deref().unwrap_or("STP failed")
        ));
        let resend: Vec<Arc<Vec<u8>>> = self.unacked.iter().map(|(_, d)| Arc::clone(d)).collect();
        let res = (|| -> Result<(), SockError> {
            for d in &resend {
                self.send_segment_raw(d)?;
            }
            if self.finishing {
                self.send_end_raw()?;
            }
            Ok(())
        })();
        res.context("resending over TCP")?;
        Ok(())
    }

    /// Tells the receiver the stream will not be completed, and why (best
    /// effort: errors are ignored, the receiver also notices a dead peer).
    pub fn abort(self, reason: &str) {
        let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        let mut m = Vec::with_capacity(8 + r.len());
        m.extend_from_slice(&ABORT.to_be_bytes());
        m.extend_from_slice(&(r.len() as u32).to_be_bytes());
        m.extend_from_slice(r);
        if self.raw_send(&m).is_ok() && self.fd.mechanism() == Mechanism::Stp {
            let _ = self.layer.flush(self.fd);
        }
    }

    /// Sends the end of the stream and waits for the receiver's verdict.
    pub fn finish(mut self) -> Result<StreamReport> {
        self.push_segment()?;
        self.finishing = true;
        if let Err(e) = self.send_end_raw() {
            self.fall_back(format!("sending the end of the stream failed: {e}"))?;
        }
        let (ok, got) = loop {
            if let Some(verdict) = self.read_ack()? {
                break verdict;
            }
        };
        if !ok || got != self.sent {
            bail!(
                "the receiver got {got} bytes that do not match the {} sent (length or SHA-256 \
                 differs): the stream was corrupted in transit",
                self.sent
            );
        }
        self.progress.finish();
        Ok(StreamReport {
            bytes: self.sent,
            sha256: hex::encode(self.hasher.finish()),
            channels: std::mem::take(&mut self.log),
            fd: self.fd,
        })
    }
}

impl Write for PipeSender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = SEGMENT - self.seg.len();
        let n = room.min(buf.len());
        self.seg.extend_from_slice(&buf[..n]);
        if self.seg.len() == SEGMENT {
            self.push_segment()
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The receiving side.
pub struct PipeReceiver<'a> {
    layer: &'a SocketLayer,
    fd: Fd,
    /// The TCP listener for a resume connection.
    listener: Option<Fd>,
    policy: Policy,
    job: u64,
    received: u64,
    /// The stream's SHA-256, on a thread of its own.
    hasher: StreamHasher,
    log: ChannelLog,
    progress: Progress,
    gone: Option<Arc<AtomicBool>>,
    psk: Option<Vec<u8>>,
}

impl<'a> PipeReceiver<'a> {
    /// Stops waiting for a resume connection once `gone` is set (the
    /// caller saw the peer disappear, e.g. its control connection closed).
    pub fn abort_when(&mut self, gone: Arc<AtomicBool>) {
        self.gone = Some(gone);
    }

    /// A receiver on the connected descriptor `fd`; `listener` is the TCP
    /// listener announced to the sender for resuming.
    pub fn new(
        layer: &'a SocketLayer,
        fd: Fd,
        listener: Option<Fd>,
        policy: Policy,
        job: u64,
        progress: Progress,
    ) -> PipeReceiver<'a> {
        PipeReceiver {
            layer,
            fd,
            listener,
            policy,
            job,
            received: 0,
            hasher: StreamHasher::new(),
            log: ChannelLog::starting(fd.mechanism()),
            progress,
            gone: None,
            psk: None,
        }
    }

    /// Requires a resume connection to prove the pre-shared key.
    pub fn with_psk(mut self, psk: Option<Vec<u8>>) -> Self {
        self.psk = psk;
        self
    }

    /// The descriptor currently carrying the data.
    pub fn fd(&self) -> Fd {
        self.fd
    }

    /// Reads the whole stream into `sink` (whole segments only, in order).
    pub fn run(&mut self, sink: &mut dyn Write) -> Result<StreamReport> {
        loop {
            let mut buf = self
                .hasher
                .spare()
                .unwrap_or_else(|| Vec::with_capacity(SEGMENT));
            match self.next(&mut buf) {
                Ok(Some(())) => {
                    if let Err(e) = sink.write_all(&buf) {
                        let e = anyhow::Error::new(e).context(format!(
                            "writing the data received after byte {} to its destination",
                            self.received
                        ));
                        self.give_up(&format!("{e:#}"));
                        return Err(e);
                    }
                    self.received += buf.len() as u64;
                    self.hasher.update(Arc::new(buf));
                    self.progress.set(self.received);
                    let mut a = [ACK; 9];
                    a[1..].copy_from_slice(&self.received.to_be_bytes());
                    if let Err(e) = self.layer.send_all(self.fd, &a) {
                        self.fall_back(format!("sending an acknowledgement failed: {e}"))?;
                    }
                }
                Ok(None) => {
                    // The end marker: length and hash follow.
                    let mut end = [0u8; 40];
                    if let Err(e) = self.layer.recv_exact(self.fd, &mut end) {
                        self.fall_back(format!("reading the end of the stream failed: {e}"))?;
                        continue;
                    }
                    let mut total = [0u8; 8];
                    total.copy_from_slice(&end[..8]);
                    let total = u64::from_be_bytes(total);
                    let digest = self.hasher.finish();
                    let ok = total == self.received && digest[..] == end[8..];
                    let mut a = [if ok { FINAL_OK } else { FINAL_BAD }; 9];
                    a[1..].copy_from_slice(&self.received.to_be_bytes());
                    let sent = self.layer.send_all(self.fd, &a).and_then(|()| {
                        if self.fd.mechanism() == Mechanism::Stp {
                            self.layer.flush(self.fd)
                        } else {
                            Ok(())
                        }
                    });
                    if let Err(e) = sent {
                        // The sender may not hear the verdict; the data is
                        // complete, so the receiver's view stands.
                        self.progress
                            .note(&format!("could not send the final acknowledgement: {e}"));
                    }
                    if !ok {
                        bail!(
                            "the stream's end says {total} bytes with another SHA-256 than the \
                             {} bytes received: the data was corrupted in transit; run the \
                             backup again",
                            self.received
                        );
                    }
                    self.progress.finish();
                    return Ok(StreamReport {
                        bytes: self.received,
                        sha256: hex::encode(digest),
                        channels: self.log.clone(),
                        fd: self.fd,
                    });
                }
                Err(reason) if reason.starts_with(ABORTED) => bail!("{reason}"),
                Err(reason) => self.fall_back(reason)?,
            }
        }
    }

    /// Tells the sender this side stops, and why (best effort: the sender
    /// also notices the connection close).
    fn give_up(&self, reason: &str) {
        let r = &reason.as_bytes()[..reason.len().min(MAX_REASON)];
        let mut m = Vec::with_capacity(5 + r.len());
        m.push(GIVE_UP);
        m.extend_from_slice(&(r.len() as u32).to_be_bytes());
        m.extend_from_slice(r);
        if self.layer.send_all(self.fd, &m).is_ok() && self.fd.mechanism() == Mechanism::Stp {
            let _ = self.layer.flush(self.fd);
        }
    }

    /// Reads the next segment into `buf`: `Some` for data, `None` for the
    /// end marker; `Err` names what failed on the channel.
    fn next(&self, buf: &mut Vec<u8>) -> Result<Option<()>, String> {
        let mut len = [0u8; 4];
        self.layer
            .recv_exact(self.fd, &mut len)
            .map_err(|e| format!("receiving data after byte {} failed: {e}", self.received))?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            return Ok(None);
        }
        if len == ABORT as usize {
            let why = read_reason(self.layer, self.fd)
                .unwrap_or_else(|e| format!("(its reason was lost: {e})"));
            return Err(format!("{ABORTED}{why}"));
        }
        if len > SEGMENT {
            return Err(format!(
                "the sender announced a segment of {len} bytes (limit {SEGMENT}): protocol error"
            ));
        }
        buf.resize(len, 0);
        self.layer
            .recv_exact(self.fd, buf)
            .map_err(|e| format!("receiving data after byte {} failed: {e}", self.received))?;
        Ok(Some(()))
    }

    fn fall_back(&mut self, reason: String) -> Result<()> {
        if self.fd.mechanism() == Mechanism::Tcp {
            bail!("{reason} (over TCP; nothing left to fall back to)");
        }
        if self.policy != Policy::Preferred {
            bail!(
                "{reason}; the fallback policy is '{}', so the backup stops",
                self.policy.as_str()
            );
        }
        let Some(listener) = self.listener else {
            bail!("{reason}; no TCP port was offered to resume on");
        };
        wire::close_quietly(self.layer, self.fd);
        let deadline = Instant::now() + RESUME_PATIENCE;
        let fd = loop {
            if self
                .gone
                .as_ref()
                .is_some_and(|g| g.load(Ordering::Acquire))
            {
                bail!("{reason}; the peer is gone (its control connection closed), so it will not resume");
            }
            match self.layer.accept(listener, Duration::from_millis(200)) {
                Ok(fd) => break fd,
                Err(e) if e.is_timeout() && Instant::now() < deadline => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("{reason}; waiting for the sender to resume over TCP")
                    })
                }
            }
        };
        self.fd = fd;
        let setup = (|| -> Result<(), SockError> {
            self.layer.set_read_timeout(fd, Some(RESUME_PATIENCE))?;
            let challenge = wire::nonce();
            self.layer.send_all(fd, &challenge)?;
            let mut hello = [0u8; 24 + 32];
            self.layer.recv_exact(fd, &mut hello)?;
            let refuse = |why: &str| SockError::Io {
                fd,
                op: "resume",
                source: io::Error::other(why.to_owned()),
            };
            if hello[..16] != RESUME_MAGIC || hello[16..24] != self.job.to_be_bytes() {
                return Err(refuse(
                    "the resume connection is not for this job (wrong magic or job id)",
                ));
            }
            if let Some(k) = self.psk.as_deref() {
                if !wire::proof_ok(k, RESUME_LABEL, &challenge, &hello[16..24], &hello[24..]) {
                    return Err(refuse(
                        "the resume connection does not prove the pre-shared key; refused",
                    ));
                }
            }
            self.layer.send_all(fd, &self.received.to_be_bytes())?;
            self.layer.set_read_timeout(fd, None)
        })();
        setup.with_context(|| format!("{reason}; resuming over TCP"))?;
        self.log.used.push("tcp".into());
        self.log.moved_at = Some(Instant::now());
        self.log.reason = Some(reason);
        self.log.resumed_at = Some(self.received);
        self.progress.note(&format!(
            "LAN fallback: {}; continuing over TCP from byte {}",
            self.log.reason.as_deref().unwrap_or("STP failed"),
            self.received
        ));
        Ok(())
    }
}

/// Reads a reason: a u32 length (clipped to [`MAX_REASON`]) and that many
/// bytes, shown as UTF-8.
fn read_reason(layer: &SocketLayer, fd: Fd) -> Result<String, SockError> {
    let mut n = [0u8; 4];
    layer.recv_exact(fd, &mut n)?;
    let mut reason = vec![0u8; (u32::from_be_bytes(n) as usize).min(MAX_REASON)];
    layer.recv_exact(fd, &mut reason)?;
    Ok(String::from_utf8_lossy(&reason).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::thread;
    use stp_core::conn::Config;

    fn tcp_layer() -> Arc<SocketLayer> {
        Arc::new(SocketLayer::new(HashMap::new(), Config::default()))
    }

    /// A connected TCP pair on one layer: (sender side, receiver side).
    fn pair(layer: &SocketLayer) -> (Fd, Fd) {
        let (l, port) =
            wire::listen_tcp(layer, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)).unwrap();
        let c = wire::connect_tcp(
            layer,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Duration::from_secs(5),
        )
        .unwrap();
        let s = layer.accept(l, Duration::from_secs(5)).unwrap();
        wire::close_quietly(layer, l);
        (c, s)
    }

    #[test]
    fn stream_round_trip_over_tcp() {
        let layer = tcp_layer();
        let (c, s) = pair(&layer);
        let data: Vec<u8> = (0..(3 * SEGMENT + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let l2 = Arc::clone(&layer);
        let want = data.clone();
        let rx = thread::spawn(move || {
            let mut got = Vec::new();
            let mut r = PipeReceiver::new(&l2, s, None, Policy::Preferred, 1, Progress::hidden());
            let rep = r.run(&mut got).unwrap();
            assert!(got == want);
            rep
        });
        let mut tx = PipeSender::new(&layer, c, None, Policy::Preferred, 1, Progress::hidden());
        for chunk in data.chunks(77_777) {
            tx.write_all(chunk).unwrap();
        }
        let sent = tx.finish().unwrap();
        let got = rx.join().unwrap();
        assert_eq!(sent.bytes, data.len() as u64);
        assert_eq!(sent.sha256, got.sha256);
        assert_eq!(sent.channels.summary(), "tcp");
    }

    #[test]
    fn receiver_rejects_oversized_segments_and_bad_ends() {
        let layer = tcp_layer();
        // A segment longer than the limit.
        let (c, s) = pair(&layer);
        layer
            .send_all(c, &((SEGMENT as u32) + 1).to_be_bytes())
            .unwrap();
        let mut r = PipeReceiver::new(&layer, s, None, Policy::Preferred, 1, Progress::hidden());
        let e = r.run(&mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("limit"), "{e:#}");
        // An end whose hash does not match what arrived.
        let (c, s) = pair(&layer);
        let mut m = Vec::new();
        m.extend_from_slice(&3u32.to_be_bytes());
        m.extend_from_slice(b"abc");
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&3u64.to_be_bytes());
        m.extend_from_slice(&[0u8; 32]);
        layer.send_all(c, &m).unwrap();
        let mut got = Vec::new();
        let mut r = PipeReceiver::new(&layer, s, None, Policy::Preferred, 1, Progress::hidden());
        let e = r.run(&mut got).unwrap_err();
        assert!(format!("{e:#}").contains("corrupted"), "{e:#}");
        assert_eq!(got, b"abc");
        let mut verdict = [0u8; 18];
        layer.recv_exact(c, &mut verdict).unwrap();
        assert_eq!(verdict[0], ACK);
        assert_eq!(verdict[9], FINAL_BAD);
        // An abort carries its reason.
        let (c, s) = pair(&layer);
        let tx = PipeSender::new(&layer, c, None, Policy::Preferred, 1, Progress::hidden());
        tx.abort("disk on fire");
        let mut r = PipeReceiver::new(&layer, s, None, Policy::Preferred, 1, Progress::hidden());
        let e = r.run(&mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("gave up: disk on fire"), "{e:#}");
    }

    /// A sink that takes `left` bytes, then fails.
    struct Full {
        left: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left < buf.len() {
                return Err(io::Error::other("no space left on the test's disk"));
            }
            self.left -= buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_receiver_whose_sink_fails_gives_up_and_the_sender_says_why() {
        let layer = tcp_layer();
        let (c, s) = pair(&layer);
        let l2 = Arc::clone(&layer);
        let rx = thread::spawn(move || {
            let mut r = PipeReceiver::new(&l2, s, None, Policy::Preferred, 1, Progress::hidden());
            let e = r.run(&mut Full { left: SEGMENT }).unwrap_err();
            // Take what else comes until the sender, having read the
            // reason, closes.
            let mut b = vec![0u8; 64 * 1024];
            while matches!(l2.recv(s, &mut b), Ok(n) if n > 0) {}
            format!("{e:#}")
        });
        let mut tx = PipeSender::new(&layer, c, None, Policy::Preferred, 1, Progress::hidden());
        let data = vec![5u8; 3 * SEGMENT];
        let sent = tx.write_all(&data).map_err(anyhow::Error::new);
        let e = match sent {
            Ok(()) => tx.finish().unwrap_err(),
            Err(e) => e,
        };
        wire::close_quietly(&layer, c);
        let msg = format!("{e:#}");
        assert!(
            msg.contains("the receiver gave up") && msg.contains("no space left"),
            "{msg}"
        );
        let theirs = rx.join().unwrap();
        assert!(
            theirs.contains("after byte 1048576 to its destination"),
            "{theirs}"
        );
    }

    #[test]
    fn policies_parse() {
        assert_eq!("never".parse::<Policy>(), Ok(Policy::Never));
        assert!("sometimes"
            .parse::<Policy>()
            .unwrap_err()
            .contains("preferred"));
    }
}
