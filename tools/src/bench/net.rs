//! `stp bench stp` and `stp bench tcp`: one-way goodput and ping-pong
//! latency between two endpoints, over an STP connection through the array
//! (host 0 listens, host 1 connects) or over TCP on loopback.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::{OsRng, StdRng};
use rand::{RngCore, SeedableRng};
use scsi::Transport;
use serde::Deserialize;
use sim_target::{Array, Host, InProcOptions, LunConfig, StgMailbox, StgSpec};
use stp_core::auth::{FrameKey, Handshake, Role};
use stp_core::block::{
    choose_layout, format, host_port, BlockConfig, BlockStg, Doorbells, LayoutRequest, PollConfig,
    MAX_SLOT_BYTES, MIN_SLOTS,
};
use stp_core::conn::Config;
use stp_core::counters;
use stp_core::frame::Protection;
use stp_core::mailbox::{Mailbox, VendorMailbox};
use stp_core::stg::BlockLayout;
use stp_core::stream::{PathSource, StpListener, StpStream, MAX_STREAM_PAYLOAD};
use stp_core::vendor::MailboxError;

use super::hist::{new_histogram, record, Counters, CpuTime, Percentiles, Progress};
use super::units::{parse_duration, parse_nonzero_size};
use super::workload::Schedule;
use super::{open_path, Connections, Datapath, FixedRate, IdleMemory, OutArgs, Report};

/// The patience of every blocking step (connect, accept, shutdown).
const PATIENCE: Duration = Duration::from_secs(60);

/// Goodput and ping-pong options shared by `stp` and `tcp`.
#[derive(Args, Debug, Clone)]
pub struct NetArgs {
    /// Goodput: bytes host 1 sends to host 0 (timed from the first write
    /// until host 0 confirms it has read them all).
    #[arg(long, default_value = "64m", value_parser = parse_nonzero_size)]
    pub bytes: u64,
    /// Goodput: bytes per write() call; latency is per write.
    #[arg(long, default_value = "1m", value_parser = parse_nonzero_size)]
    pub chunk: u64,
    /// Measure ping-pong latency instead: host 1 sends --msg bytes, host 0
    /// echoes them, and each round trip is one sample.
    #[arg(long)]
    pub rtt: bool,
    /// Ping-pong message size.
    #[arg(long, default_value = "64", value_parser = parse_nonzero_size)]
    pub msg: u64,
    /// Ping-pong round trips (unless --time).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Ping-pong for this long instead of --count round trips.
    #[arg(long, value_parser = parse_duration)]
    pub time: Option<Duration>,
    /// Ping-pong at a fixed rate: start this many round trips a second in
    /// all (split over --connections) on a schedule, and report latency
    /// from each one's intended start too (corrected for coordinated
    /// omission). One round trip is in flight per connection, so a late
    /// one delays the next.
    #[arg(long, value_parser = super::raw::parse_rate, requires = "rtt")]
    pub rate: Option<f64>,
    /// The ping-pong load curve: the closed-loop round-trip rate, then
    /// --rate at each of --steps percent of it (--time per point); --plot
    /// draws it (SVG, or PNG for a .png name), --json gives every point.
    #[arg(long, requires_all = ["rtt", "time"], conflicts_with = "rate")]
    pub curve: bool,
    /// Percentages of the maximum for --curve, comma-separated, each 1 to 100.
    #[arg(long, value_delimiter = ',', default_value = "10,20,30,40,50,60,70,80,90,100",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub steps: Vec<u32>,
    /// Output options.
    #[command(flatten)]
    pub out: OutArgs,
}

/// Which STG mailbox carries the connection.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxMode {
    /// Vendor SCSI commands (SEND/RECEIVE) to the array's STG mailbox.
    Vendor,
    /// Rings on plain LBAs: READ(16)/WRITE(16) only, any array.
    Block,
}

/// Options of `stp bench stp`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Examples:\n  stp bench stp --sim --bytes 256m\n  \
stp bench stp --sim --rtt --msg 64 --count 5000\n  \
stp bench stp --map /run/stp/sim-target.json --mode block --bytes 64m\n\n\
With --map, block mode FORMATS the map's ramdisk LUN. CPU covers this whole\n\
process: both hosts' stacks and, with --sim, the array.")]
pub struct StpArgs {
    /// Use the embedded in-process simulated array (an STG of --members
    /// LUNs with the vendor mailbox, and a plain LUN for block mode).
    #[arg(long, conflicts_with = "map")]
    pub sim: bool,
    /// Use real /dev/sg devices from the JSON map `sim-target/scripts/stg-up`
    /// writes (e.g. /run/stp/sim-target.json).
    #[arg(long, value_name = "FILE")]
    pub map: Option<PathBuf>,
    /// Mailbox mode.
    #[arg(long, value_enum, default_value_t = MailboxMode::Vendor)]
    pub mode: MailboxMode,
    /// STG members with --sim (vendor mode); with --map the map says.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub members: u64,
    /// Frame protection: aes-256-gcm (encrypt and authenticate, the
    /// default) or blake3-auth (authenticate only, payload in clear).
    #[arg(long, default_value = "aes-256-gcm", value_parser = parse_protection)]
    pub protection: Protection,
    /// Run N connections at once on the one STG between the two hosts,
    /// each moving --bytes/N (rounded down; each making --count round trips
    /// with --rtt); report the aggregate, each connection's rate, and the
    /// memory of N idle connections (measured before the transfer).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub connections: Option<u64>,
    /// With --sim: give each member path of the in-process array a link of
    /// this many bytes per second (e.g. 400m), which every SEND's data
    /// crosses before the array has it: a fabric slower than the hosts,
    /// where SENDs queue on the members.
    #[arg(long, value_name = "RATE", requires = "sim", value_parser = parse_nonzero_size)]
    pub sim_link: Option<u64>,
    /// Largest DATA frame payload (vendor mode; default: the stack's,
    /// 256 KiB; at most 1 MiB less the 80-byte header).
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub frame: Option<u64>,
    /// Send buffer per connection: bytes written and not yet acknowledged
    /// (default: the stack's, 4 MiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub send_buffer: Option<u64>,
    /// Block mode: the slot size the STG is formatted with (default: chosen
    /// from the LUN's limits as `stp stg format` does, 1 MiB where the path
    /// carries it; rounded up to whole blocks). A frame's payload is at
    /// most a slot less 104 bytes.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size)]
    pub slot: Option<u64>,
    /// Block mode: slots per lane (default: a 16 MiB ring where the LUN
    /// holds it).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub slots: Option<u32>,
    /// Block mode: after the run, leave the STG open with no traffic for
    /// SECS and report the commands its polling issues per second per lane,
    /// then how long one 64-byte message takes to arrive (0 skips both)
    #[arg(long, value_name = "SECS", default_value_t = 2.0, value_parser = parse_idle_secs)]
    pub idle: f64,
    /// Block mode: no doorbells (by default the two hosts ring each other
    /// over loopback UDP after a quiet spell, as `[stg.block] doorbells`
    /// configures on a LAN; without, a message after a pause waits for the
    /// receiver's next idle poll)
    #[arg(long)]
    pub no_doorbell: bool,
    /// Block mode, with doorbells: ring replies rather than probe for them
    /// once a probe READ costs US µs on average (default 150; 0 rings them
    /// whatever a probe costs, to measure the choice where probes are
    /// cheap)
    #[arg(long, value_name = "US")]
    pub ring_replies_above: Option<u64>,
    /// Block mode: format and use the STG's member LUNs, the ones vendor
    /// mode uses (slots striped over them), instead of the plain LUN: block
    /// and vendor mode on the same LUNs.
    #[arg(long)]
    pub block_on_members: bool,
    /// Goodput and ping-pong options.
    #[command(flatten)]
    pub net: NetArgs,
}

impl StpArgs {
    /// The in-process array, vendor mode, --members 4, the default
    /// protection, one connection: what `stp bench compare` and `stp demo`
    /// run.
    pub fn sim(net: NetArgs) -> StpArgs {
        StpArgs {
            sim: true,
            map: None,
            mode: MailboxMode::Vendor,
            members: 4,
            protection: Protection::default(),
            connections: None,
            sim_link: None,
            frame: None,
            send_buffer: None,
            slot: None,
            slots: None,
            idle: 0.0,
            no_doorbell: false,
            ring_replies_above: None,
            block_on_members: false,
            net,
        }
    }
}

/// Parses `--protection`.
pub fn parse_protection(s: &str) -> Result<Protection, String> {
    Protection::parse(s).ok_or_else(|| {
        format!(
            "unknown protection `{s}`: say {} or {}",
            Protection::Encrypt.name(),
            Protection::Authenticate.name()
        )
    })
}

/// Options of `stp bench tcp`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  stp bench tcp --bytes 1g\n  stp bench tcp --rtt --msg 64\n\n\
Both ends run in this process over 127.0.0.1 with TCP_NODELAY."
)]
pub struct TcpArgs {
    /// Goodput and ping-pong options.
    #[command(flatten)]
    pub net: NetArgs,
}

/// A byte stream both benchmarks run over.
trait Duplex: Read + Write + Send + 'static {
    /// Ends the stream in order.
    fn finish(&mut self) -> io::Result<()>;
}

impl Duplex for StpStream {
    fn finish(&mut self) -> io::Result<()> {
        self.shutdown(PATIENCE)
    }
}

impl Duplex for TcpStream {
    fn finish(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// What the client side measured.
struct Measured {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    cpu: CpuTime,
    hist: Histogram<u64>,
    /// The data-path counters over the same window.
    counters: counters::Snapshot,
    /// The in-process array's CPU time over the same window.
    array_cpu: Duration,
    /// With --connections: per-connection figures.
    connections: Option<Connections>,
    /// With --rate: the schedule's figures.
    rated: Option<Rated>,
}

/// What a fixed-rate ping-pong measured besides the service time.
struct Rated {
    /// Round trips a second asked for.
    target: f64,
    /// From the intended start to the echo, ns.
    corrected: Histogram<u64>,
    /// From the intended to the actual start, ns.
    lag: Histogram<u64>,
    /// Round trips due before the end that never started.
    not_issued: u64,
}

impl Rated {
    fn add(&mut self, other: &Rated) -> Result<()> {
        self.target += other.target;
        self.not_issued += other.not_issued;
        self.corrected
            .add(&other.corrected)
            .context("merging latency histograms")?;
        self.lag
            .add(&other.lag)
            .context("merging latency histograms")?;
        Ok(())
    }
}

/// The process-wide meters, read at the start of a timed window.
struct Window {
    t0: Instant,
    cpu: CpuTime,
    counters: counters::Snapshot,
    array_cpu: Duration,
}

impl Window {
    fn start() -> Window {
        Window {
            counters: counters::snapshot(),
            array_cpu: sim_target::inproc::array_cpu(),
            cpu: CpuTime::now(),
            t0: Instant::now(),
        }
    }

    /// (elapsed, CPU, counters, array CPU) since the start.
    fn end(&self) -> (Duration, CpuTime, counters::Snapshot, Duration) {
        let elapsed = self.t0.elapsed();
        let cpu = CpuTime::since(self.cpu);
        let array = sim_target::inproc::array_cpu().saturating_sub(self.array_cpu);
        let c = counters::snapshot().since(&self.counters);
        (elapsed, cpu, c, array)
    }
}

const TRAILER: &[u8; 4] = b"done";

/// The buffers one side of a run moves its bytes through, made (and their
/// pages touched) before the timed window: the window then counts the
/// transport, not the bench's own allocation, which with `--connections`
/// would grow with the number of connections.
struct Buffers {
    /// Round trips: the message (sender) or the echo buffer (receiver).
    /// Goodput: the data written (sender) or the read buffer (receiver).
    main: Vec<u8>,
    /// Round trips: where the sender reads the echo.
    back: Vec<u8>,
}

impl Buffers {
    /// Host 1's: random data (a message, or a chunk written over and over).
    fn sender(net: &NetArgs) -> Buffers {
        if net.rtt {
            let mut msg = vec![0u8; net.msg as usize];
            OsRng.fill_bytes(&mut msg);
            Buffers {
                back: vec![0xA5; msg.len()],
                main: msg,
            }
        } else {
            let mut data = vec![0u8; net.chunk as usize];
            StdRng::seed_from_u64(1).fill_bytes(&mut data);
            Buffers {
                main: data,
                back: Vec::new(),
            }
        }
    }

    /// Host 0's: where it reads (filled, so its pages are in).
    fn receiver(net: &NetArgs) -> Buffers {
        let len = if net.rtt { net.msg as usize } else { 1 << 20 };
        Buffers {
            main: vec![0xA5; len],
            back: Vec::new(),
        }
    }
}

/// Host 0: reads `bytes` and confirms, or echoes messages until the end.
fn serve<S: Duplex>(s: &mut S, net: &NetArgs, bufs: &mut Buffers) -> Result<()> {
    let buf = &mut bufs.main;
    if net.rtt {
        loop {
            match s.read_exact(buf) {
                Ok(()) => s.write_all(buf).context("echoing")?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e).context("reading a ping"),
            }
        }
    } else {
        let mut got = 0u64;
        while got < net.bytes {
            let want = buf.len().min((net.bytes - got) as usize);
            let n = s.read(&mut buf[..want]).context("receiving")?;
            if n == 0 {
                bail!("the sender closed after {got} of {} bytes", net.bytes);
            }
            got += n as u64;
        }
        s.write_all(TRAILER).context("confirming")?;
        let mut rest = [0u8; 1];
        // Wait for the sender's end of stream.
        let _ = s.read(&mut rest);
    }
    s.finish().context("closing")?;
    Ok(())
}

/// Host 1: sends, timing each write (goodput) or each round trip.
fn client<C: Duplex>(
    c: &mut C,
    net: &NetArgs,
    counters: &Counters,
    bufs: &mut Buffers,
) -> Result<Measured> {
    let mut hist = new_histogram();
    let (mut ops, mut bytes) = (0u64, 0u64);
    let window = Window::start();
    let t0 = window.t0;
    // Ping-pong at a fixed rate (--rate needs --rtt).
    let mut schedule = net.rate.map(Schedule::new);
    if schedule.is_some() {
        // Wake as close to each start as the kernel can (best effort).
        let _ = nix::sys::prctl::set_timerslack(1);
    }
    let mut rated = net.rate.map(|target| Rated {
        target,
        corrected: new_histogram(),
        lag: new_histogram(),
        not_issued: 0,
    });
    if net.rtt {
        let (msg, back) = (&mut bufs.main, &mut bufs.back);
        let deadline = net.time.map(|t| t0 + t);
        loop {
            match deadline {
                Some(d) if Instant::now() >= d => break,
                None if ops >= net.count => break,
                _ => {}
            }
            // At a fixed rate: wait for this round trip's turn.
            let intended = match &mut schedule {
                None => None,
                Some(s) => {
                    let due = t0 + s.next_due();
                    if deadline.is_some_and(|d| due >= d) {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    s.poll(Instant::now().saturating_duration_since(t0))
                        .map(|at| t0 + at)
                }
            };
            let k = 8.min(msg.len());
            msg[..k].copy_from_slice(&ops.to_le_bytes()[..k]);
            let t = Instant::now();
            c.write_all(msg).context("sending a ping")?;
            c.read_exact(back).context("reading the echo")?;
            let end = Instant::now();
            record(&mut hist, end.saturating_duration_since(t));
            if let (Some(r), Some(i)) = (&mut rated, intended) {
                record(&mut r.corrected, end.saturating_duration_since(i));
                record(&mut r.lag, t.saturating_duration_since(i));
            }
            if back != msg {
                bail!("round trip {ops}: the echo differs from the message sent");
            }
            ops += 1;
            bytes += 2 * net.msg;
            counters.add(2 * net.msg);
        }
    } else {
        let data = &bufs.main;
        while bytes < net.bytes {
            let n = data.len().min((net.bytes - bytes) as usize);
            let t = Instant::now();
            c.write_all(&data[..n]).context("sending")?;
            record(&mut hist, t.elapsed());
            ops += 1;
            bytes += n as u64;
            counters.add(n as u64);
        }
        let mut trailer = [0u8; 4];
        c.read_exact(&mut trailer)
            .context("waiting for the receiver to confirm")?;
        if &trailer != TRAILER {
            bail!("the receiver's confirmation is garbled: {trailer:02x?}");
        }
    }
    let (elapsed, cpu, counters, array_cpu) = window.end();
    if let (Some(r), Some(s), Some(t)) = (&mut rated, &schedule, net.time) {
        // Due strictly before the end (one due exactly at it is not).
        r.not_issued = s.behind(t).saturating_sub(1);
    }
    Ok(Measured {
        ops,
        bytes,
        elapsed,
        cpu,
        hist,
        counters,
        array_cpu,
        connections: None,
        rated,
    })
}

/// Runs host 0 (`accept`, in a thread) against host 1 (`connect`).
fn measure<S: Duplex, C: Duplex>(
    net: &NetArgs,
    label: String,
    accept: impl FnOnce() -> Result<S> + Send + 'static,
    connect: impl FnOnce() -> Result<C>,
) -> Result<Measured> {
    let server_net = net.clone();
    let server = thread::spawn(move || -> Result<()> {
        let mut bufs = Buffers::receiver(&server_net);
        let mut s = accept()?;
        serve(&mut s, &server_net, &mut bufs)
    });
    let counters = Arc::new(Counters::default());
    let result = (|| {
        let mut bufs = Buffers::sender(net);
        let mut c = connect()?;
        let progress = Progress::start(label, Arc::clone(&counters), net.out.silent());
        let m = client(&mut c, net, &counters, &mut bufs);
        drop(progress);
        let m = m?;
        c.finish().context("closing the connection")?;
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        Ok(m)
    })();
    let served = server
        .join()
        .map_err(|_| anyhow!("the receiving side panicked"))?;
    match (result, served) {
        (Ok(m), Ok(())) => Ok(m),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.context("the receiving side (host 0) failed")),
    }
}

fn params(net: &NetArgs, extra: serde_json::Value) -> serde_json::Value {
    let mut p = if net.rtt {
        serde_json::json!({
            "msg": net.msg,
            "count": if net.time.is_some() { None } else { Some(net.count) },
            "time_s": net.time.map(|t| t.as_secs_f64()),
            "rate_per_s": net.rate,
            "latency": "round trip",
        })
    } else {
        serde_json::json!({
            "bytes": net.bytes,
            "chunk": net.chunk,
            "latency": "per write()",
        })
    };
    if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    p
}

fn report(
    mode: &str,
    transport: &str,
    paths: Vec<String>,
    net: &NetArgs,
    extra: serde_json::Value,
    m: Measured,
) -> Report {
    let connections = m.connections;
    let mut r = Report::new(
        mode,
        if net.rtt { "rtt" } else { "goodput" },
        transport,
        paths,
        params(net, extra),
        m.ops,
        m.bytes,
        m.elapsed,
        m.cpu,
        m.hist,
        None,
    );
    r.connections = connections;
    if let Some(rated) = m.rated {
        r.corrected_latency_us = Some(Percentiles::of(&rated.corrected));
        r.fixed_rate = Some(FixedRate {
            target_iops: rated.target,
            achieved_iops: r.iops,
            issue_lag_us: Percentiles::of(&rated.lag),
            not_issued: rated.not_issued,
        });
        r.corrected_hist = Some(rated.corrected);
    }
    r
}

/// Runs `stp bench tcp`.
pub fn run_tcp(args: &TcpArgs) -> Result<Report> {
    let net = &args.net;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback TCP port")?;
    let addr = listener.local_addr()?;
    let m = measure(
        net,
        format!("tcp {}", if net.rtt { "rtt" } else { "goodput" }),
        move || {
            let (s, _) = listener.accept().context("accepting on loopback")?;
            s.set_nodelay(true)?;
            Ok(s)
        },
        || {
            let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            s.set_nodelay(true)?;
            Ok(s)
        },
    )?;
    Ok(report(
        "tcp",
        "tcp loopback",
        vec![addr.to_string()],
        net,
        serde_json::json!({}),
        m,
    ))
}

/// One LUN as a host path sees it, from the map.
#[derive(Deserialize, Debug, Clone)]
struct MapLun {
    kind: String,
    #[serde(default)]
    member: Option<usize>,
    sg: PathBuf,
}

/// One host path from the map.
#[derive(Deserialize, Debug, Clone)]
struct MapHost {
    index: usize,
    luns: Vec<MapLun>,
}

/// The STG part of the map.
#[derive(Deserialize, Debug, Clone)]
struct MapStg {
    luns: usize,
}

/// The map `sim-target/scripts/stg-up` writes (only what the bench reads).
#[derive(Deserialize, Debug, Clone)]
struct DeviceMap {
    #[serde(default)]
    version: Option<u32>,
    stg: MapStg,
    hosts: Vec<MapHost>,
}

impl DeviceMap {
    fn load(path: &Path) -> Result<DeviceMap> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the device map {}; sim-target/scripts/stg-up writes it",
                path.display()
            )
        })?;
        DeviceMap::parse(&text).with_context(|| format!("the device map {}", path.display()))
    }

    fn parse(text: &str) -> Result<DeviceMap> {
        let map: DeviceMap = serde_json::from_str(text).context("malformed JSON")?;
        if let Some(v) = map.version.filter(|&v| v != 1) {
            bail!("version {v}; this build reads version 1");
        }
        for h in [0, 1] {
            if !map.hosts.iter().any(|x| x.index == h) {
                bail!("no host {h}: the bench needs hosts 0 and 1");
            }
        }
        if map.stg.luns == 0 {
            bail!("the STG has no members");
        }
        Ok(map)
    }

    fn sg(&self, host: usize, what: &str, pick: impl Fn(&MapLun) -> bool) -> io::Result<PathBuf> {
        self.hosts
            .iter()
            .find(|h| h.index == host)
            .and_then(|h| h.luns.iter().find(|l| pick(l)))
            .map(|l| l.sg.clone())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("host {host} has no {what} in the map"),
                )
            })
    }

    fn member(&self, host: usize, member: usize) -> io::Result<PathBuf> {
        self.sg(host, &format!("STG member {member}"), |l| {
            l.kind == "stg" && l.member == Some(member)
        })
    }

    fn plain(&self, host: usize) -> io::Result<PathBuf> {
        self.sg(host, "ramdisk LUN", |l| l.kind == "ramdisk")
    }
}

/// Opens a path from a host to a LUN: (host, member) for the STG; member
/// `None` for the plain LUN of block mode.
type Opener = Arc<dyn Fn(usize, Option<usize>) -> io::Result<Box<dyn Transport>> + Send + Sync>;

/// What the bench asks of the block layout (two hosts; `--slot` and
/// `--slots`, the rest chosen from the LUN's limits), for LUNs of
/// `block_size`-byte blocks.
fn block_request(args: &StpArgs, block_size: u32) -> Result<LayoutRequest> {
    let slot_blocks = args
        .slot
        .map(|slot| {
            u32::try_from(slot.div_ceil(u64::from(block_size.max(1))))
                .map_err(|_| anyhow!("--slot {slot} is too large"))
        })
        .transpose()?;
    Ok(LayoutRequest {
        hosts: 2,
        slots: args.slots,
        slot_blocks,
    })
}

const SIM_STG: u32 = 7;
const BLOCK_STG: u32 = 9;
const SIM_PLAIN_LUN: u64 = 100;

fn keys() -> Result<(FrameKey, FrameKey)> {
    let c = Handshake::new(&mut OsRng);
    let s = Handshake::new(&mut OsRng);
    let (co, so) = (c.public(), s.public());
    Ok((
        c.finish(&so, Role::Client, None)?,
        s.finish(&co, Role::Server, None)?,
    ))
}

/// Runs `stp bench stp`.
pub fn run_stp(args: &StpArgs) -> Result<Report> {
    let net = &args.net;
    if args.block_on_members && args.mode == MailboxMode::Vendor {
        bail!(
            "--block-on-members is for --mode block: vendor mode always runs on the STG's members"
        );
    }
    // The array (kept alive for the run) or the map.
    let mut _array = None;
    let (opener, members, what): (Opener, usize, String) = if args.sim {
        let array = Array::new();
        let luns: Vec<u64> = (0..args.members).collect();
        for &id in &luns {
            array
                .add_lun(id, LunConfig::new(id, 1 << 16, 512))
                .context("building the simulated array")?;
        }
        // The plain LUN holds block mode's STG: 64 MiB, or what the layout
        // asks for (the largest chosen one where it leaves a part open).
        let request = block_request(args, 512)?;
        let needed = BlockLayout {
            hosts: 2,
            slots: request.slots.unwrap_or(MIN_SLOTS.max(16)),
            slot_blocks: request.slot_blocks.unwrap_or((MAX_SLOT_BYTES / 512) as u32),
        }
        .required_blocks();
        let plain = LunConfig {
            dpofua: false,
            ..LunConfig::new(SIM_PLAIN_LUN, needed.max(1 << 17), 512)
        };
        array
            .add_lun(SIM_PLAIN_LUN, plain)
            .context("building the simulated array")?;
        let mailbox = StgMailbox::new(&array, vec![StgSpec::new(SIM_STG, luns)])
            .context("building the simulated array's mailbox")?;
        mailbox.install(&array);
        let hosts = [Host::login(&array, "h0"), Host::login(&array, "h1")];
        _array = Some((array, mailbox));
        let options = InProcOptions {
            link_bytes_per_sec: args.sim_link,
            ..InProcOptions::default()
        };
        let opener: Opener = Arc::new(move |host, member| {
            let h = &hosts[host];
            let lun = member.map_or(SIM_PLAIN_LUN, |m| m as u64);
            Ok(Box::new(h.open_with(lun, options.clone())?) as Box<dyn Transport>)
        });
        (opener, args.members as usize, "in-process array".into())
    } else if let Some(path) = &args.map {
        let map = Arc::new(DeviceMap::load(path)?);
        let members = map.stg.luns;
        let opener: Opener = Arc::new(move |host, member| {
            let p = match member {
                Some(m) => map.member(host, m)?,
                None => map.plain(host)?,
            };
            open_path(&p).map_err(|e| io::Error::other(format!("{e:#}")))
        });
        (opener, members, format!("devices from {}", path.display()))
    } else {
        bail!("say where the array is: --sim for the embedded simulated array, or --map FILE (e.g. /run/stp/sim-target.json from stg-up)");
    };

    let label = format!(
        "stp {} {}",
        match args.mode {
            MailboxMode::Vendor => "vendor",
            MailboxMode::Block => "block",
        },
        if net.rtt { "rtt" } else { "goodput" }
    );
    let mut paths = Vec::new();
    let mut layout_line = None;
    let mut layout_json = None;
    let (kc, ks) = keys()?;
    let mut block_stgs: Option<[Arc<BlockStg>; 2]> = None;
    let ((server_src, client_src, config, port), transport) = match args.mode {
        MailboxMode::Vendor => {
            for host in [0, 1] {
                for m in 0..members {
                    paths.push(format!(
                        "host {host}: {}",
                        opener(host, Some(m))?.describe()
                    ));
                }
            }
            let source = |host: usize| -> Arc<dyn PathSource> {
                let opener = Arc::clone(&opener);
                Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
                    let paths = (0..members)
                        .map(|m| {
                            opener(host, Some(m))
                                .map_err(|e| MailboxError::Transport(scsi::CommandError::Io(e)))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Box::new(VendorMailbox::new(paths)?))
                })
            };
            let defaults = Config::default();
            let config = Config {
                protection: args.protection,
                max_payload: args.frame.map_or(defaults.max_payload, |f| {
                    u32::try_from(f).unwrap_or(u32::MAX).min(MAX_STREAM_PAYLOAD)
                }),
                send_buffer_bytes: args
                    .send_buffer
                    .map_or(defaults.send_buffer_bytes, |b| b as usize),
                ..defaults
            };
            let sides = (source(0), source(1), config, None);
            (sides, format!("stp vendor, {what}"))
        }
        MailboxMode::Block => {
            // The LUNs block mode runs on: the plain LUN, or every member.
            let luns: Vec<Option<usize>> = if args.block_on_members {
                (0..members).map(Some).collect()
            } else {
                vec![None]
            };
            let open_all = |host: usize| -> io::Result<Vec<Box<dyn Transport>>> {
                luns.iter().map(|&m| opener(host, m)).collect()
            };
            let mut admin = open_all(0)?;
            for (host, paths_of) in [(0, &admin), (1, &open_all(1)?)] {
                for p in paths_of {
                    paths.push(format!("host {host}: {}", p.describe()));
                }
            }
            let (_, block_size) =
                stp_core::block::read_capacity(admin[0].as_mut(), Duration::from_secs(30))
                    .context("reading the block-mode LUN's capacity")?;
            let chosen = choose_layout(
                &mut admin,
                BLOCK_STG,
                block_request(args, block_size)?,
                None,
            )
            .context("choosing the block layout")?;
            layout_json = Some(serde_json::json!({
                "slots": chosen.layout.slots,
                "slot_bytes": chosen.slot_bytes,
                "slot_size_set_by": chosen.limited_by,
            }));
            layout_line = Some(format!(
                "layout {} slots of {} KiB per lane (slot size set by {})",
                chosen.layout.slots,
                chosen.slot_bytes >> 10,
                chosen.limited_by
            ));
            format(
                &mut admin,
                BLOCK_STG,
                &chosen.layout,
                &mut StdRng::from_entropy(),
            )
            .context("formatting the block-mode STG")?;
            drop(admin);
            let mut config = BlockConfig {
                doorbells: (!args.no_doorbell)
                    .then(|| Doorbells::loopback(2))
                    .transpose()
                    .context("finding free loopback UDP ports for the doorbells")?,
                ..BlockConfig::default()
            };
            if let Some(us) = args.ring_replies_above {
                config.poll.ring_replies_above = Duration::from_micros(us);
            }
            let open = |host: usize| -> Result<Arc<BlockStg>> {
                BlockStg::open_with(open_all(host)?, host as u16, BLOCK_STG, config)
                    .with_context(|| format!("host {host}: opening the block-mode STG"))
            };
            let (h0, h1) = (open(0)?, open(1)?);
            let source = |stg: &Arc<BlockStg>| -> Arc<dyn PathSource> {
                let stg = Arc::clone(stg);
                Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
                    Ok(Box::new(stg.handle()))
                })
            };
            let config = Config {
                max_payload: h0.max_payload(),
                protection: args.protection,
                ..Config::default()
            };
            let port = host_port(0, 1005).ok_or_else(|| anyhow!("no port 1005 for host 0"))?;
            let sides = (source(&h0), source(&h1), config, Some(port));
            block_stgs = Some([h0, h1]);
            (sides, format!("stp block, {what}"))
        }
    };
    // Host 0 listens (on `port`, or a dynamic one), host 1 connects.
    let mut listener = StpListener::bind(server_src, port, ks, config.clone())
        .context("host 0: binding a listening port")?;
    let port = listener.local_port();
    let want = args.protection;
    let accept = move || listener.accept(PATIENCE).context("host 0: accepting");
    let connect = move || -> Result<StpStream> {
        let s = StpStream::connect(
            Arc::clone(&client_src),
            port,
            kc.clone(),
            config.clone(),
            PATIENCE,
        )
        .context("host 1: connecting")?;
        if s.protection() != want {
            bail!(
                "the connection runs {} where {} was asked for",
                s.protection().name(),
                want.name()
            );
        }
        Ok(s)
    };
    let m = match args.connections {
        None => measure(net, label, accept, connect)?,
        Some(n) => measure_many(net, n, label, accept, connect)?,
    };
    if !net.out.silent() {
        for p in &paths {
            eprintln!("path {p}");
        }
        if let Some(l) = &layout_line {
            eprintln!("{l}");
        }
    }
    let mut extra = serde_json::json!({
        "mailbox": match args.mode { MailboxMode::Vendor => "vendor", MailboxMode::Block => "block" },
        "members": if args.mode == MailboxMode::Vendor || args.block_on_members { members } else { 1 },
        "sim": args.sim,
        "protection": args.protection.name(),
    });
    if let (Some(l), Some(e)) = (layout_json, extra.as_object_mut()) {
        e.insert("block_layout".into(), l);
    }
    if let (Some(n), Some(e)) = (args.connections, extra.as_object_mut()) {
        e.insert("connections".into(), n.into());
        e.insert(
            if net.rtt { "count_each" } else { "bytes_each" }.into(),
            if net.rtt { net.count } else { net.bytes / n }.into(),
        );
    }
    let datapath = Datapath::of(&m.counters);
    let array_cpu = m.array_cpu.as_secs_f64();
    let block = block_stgs
        .map(|stgs| block_figures(&stgs, args.idle))
        .transpose()?;
    let mut r = report("stp", &transport, paths, net, extra, m);
    r.datapath = Some(datapath);
    r.block = block;
    if args.sim {
        r = r.without_array_cpu(array_cpu);
    }
    Ok(r)
}

/// How long one 64-byte message from host 1 to host 0 takes to arrive on
/// an idle STG, send to receipt, in ms (the lane's latency after a pause:
/// the receiver's idle poll, or its doorbell). `None` when it does not come
/// within 5 s.
fn first_message_ms(stgs: &[Arc<BlockStg>; 2]) -> Result<Option<f64>> {
    use stp_core::wire::{Header, Kind};
    let mut m0 = stgs[0].handle();
    let mut m1 = stgs[1].handle();
    let p0 = m0.bind(None).context("host 0: binding a port")?;
    let p1 = m1.bind(None).context("host 1: binding a port")?;
    let body = [0x5a; 64];
    let mut frame = Header {
        kind: Kind::DATA,
        src_port: p1.port,
        dst_port: p0.port,
        payload_len: body.len() as u32,
        ..Header::default()
    }
    .to_bytes()
    .to_vec();
    frame.extend_from_slice(&body);
    frame.resize(frame.len().next_multiple_of(stp_core::wire::ALIGN), 0);
    let started = Instant::now();
    m1.send_packed(&p1, &frame).context("host 1: sending")?;
    let deadline = started + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        if !m0
            .receive(&p0, 1 << 16, left)
            .context("host 0: receiving")?
            .is_empty()
        {
            return Ok(Some(started.elapsed().as_secs_f64() * 1e3));
        }
    }
}

/// Block mode's counters over the run, then its idle cost: the commands
/// both hosts issue in `idle` seconds with no traffic (once polling has
/// gone idle), per lane (each host polls the one lane to it); then the
/// first message after that silence.
fn block_figures(stgs: &[Arc<BlockStg>; 2], idle: f64) -> Result<super::BlockFigures> {
    let total = |f: fn(&stp_core::block::BlockStats) -> u64| -> u64 {
        stgs.iter().map(|s| f(&s.stats())).sum()
    };
    // The run's figures first: the idle spell and its message come after.
    let mut figures = super::BlockFigures {
        commands: total(|s| s.commands),
        polls: total(|s| s.polls),
        slots_written: total(|s| s.slots_written),
        slots_read: total(|s| s.slots_read),
        slots_probed: total(|s| s.slots_probed),
        probes: total(|s| s.probes),
        slot_reads_per_byte: match total(|s| s.slot_used_bytes) {
            0 => None,
            used => Some(total(|s| s.slot_read_bytes) as f64 / used as f64),
        },
        bad_slots: total(|s| s.bad_slots),
        bad_index_blocks: total(|s| s.bad_producer_blocks + s.bad_consumer_blocks),
        turn_skips: total(|s| s.turn_skips),
        ring_full_waits: total(|s| s.ring_full_waits),
        doorbells_rung: total(|s| s.doorbells_rung),
        probe_read_us: stgs
            .iter()
            .map(|s| s.stats().probe_read_us)
            .max()
            .unwrap_or(0),
        replies_rung: stgs.iter().any(|s| s.stats().replies_rung),
        idle_seconds: idle,
        idle_commands_per_sec_per_lane: None,
        first_after_idle_ms: None,
        first_after_idle_rang: None,
    };
    if idle > 0.0 {
        // Polling stays warm for a while after traffic: measure past it.
        std::thread::sleep(PollConfig::default().idle_after + Duration::from_millis(200));
        let before = total(|s| s.commands);
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(idle));
        let after = total(|s| s.commands);
        figures.idle_commands_per_sec_per_lane =
            Some((after - before) as f64 / t.elapsed().as_secs_f64() / stgs.len() as f64);
        let rung = total(|s| s.doorbells_rung);
        figures.first_after_idle_ms = first_message_ms(stgs)?;
        figures.first_after_idle_rang = figures
            .first_after_idle_ms
            .map(|_| total(|s| s.doorbells_rung) > rung);
    }
    Ok(figures)
}

fn parse_idle_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number of seconds from 0 to 3600")),
    }
}

/// What the process holds at one moment: resident set, threads, and the
/// shared buffer pool's free bytes.
#[derive(Clone, Copy, Debug)]
struct Held {
    rss: u64,
    threads: u64,
    pool_free: u64,
}

impl Held {
    fn now() -> Result<Held> {
        // The resident pages of /proc/self/statm, as /proc/self/status
        // states them in bytes (VmRSS, kB), with the thread count.
        let status =
            std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in /proc/self/status"))
        };
        Ok(Held {
            rss: field("VmRSS:")? * 1024,
            threads: field("Threads:")?,
            pool_free: scsi::pool::BufPool::global().stats().free_bytes as u64,
        })
    }

    /// What `n` connections opened between `self` and `after` cost each.
    fn idle(&self, after: &Held, n: u64) -> IdleMemory {
        let rss = after.rss as i64 - self.rss as i64;
        let pool = self.pool_free as i64 - after.pool_free as i64;
        let per = (rss + pool) as f64 / n as f64;
        IdleMemory {
            connections: n,
            rss_delta_bytes: rss,
            pool_bytes_taken: pool,
            per_connection_bytes: per,
            per_end_bytes: per / 2.0,
            threads_per_connection: (after.threads as f64 - self.threads as f64) / n as f64,
        }
    }
}

/// How long idle connections are left to settle (their receive pumps
/// post their RECEIVEs) before their memory is read.
const SETTLE: Duration = Duration::from_millis(500);

/// Runs `n` connections at once: a warm-up connection is opened and closed
/// (so one-time set-up is not counted), then `n` are opened and left idle
/// while their memory is read, then each moves `bytes / n` (or makes
/// `count` round trips) concurrently.
fn measure_many<S: Duplex, C: Duplex>(
    net: &NetArgs,
    n: u64,
    label: String,
    mut accept: impl FnMut() -> Result<S> + Send + 'static,
    connect: impl Fn() -> Result<C>,
) -> Result<Measured> {
    let each = NetArgs {
        bytes: net.bytes / n,
        rate: net.rate.map(|r| r / n as f64),
        ..net.clone()
    };
    if !net.rtt && each.bytes == 0 {
        bail!("--bytes {} is less than a byte per connection", net.bytes);
    }
    let (accepted_tx, accepted_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<bool>();
    let server_net = each.clone();
    let server = thread::spawn(move || -> Result<()> {
        let mut warm = accept().context("accepting the warm-up connection")?;
        let _ = warm.read_to_end(&mut Vec::new());
        warm.finish().context("closing the warm-up connection")?;
        drop(warm);
        let mut streams = Vec::new();
        for _ in 0..n {
            streams.push((accept()?, Buffers::receiver(&server_net)));
        }
        let _ = accepted_tx.send(());
        if !go_rx.recv().unwrap_or(false) {
            return Ok(());
        }
        let servers: Vec<_> = streams
            .into_iter()
            .map(|(mut s, mut bufs)| {
                let net = server_net.clone();
                thread::spawn(move || serve(&mut s, &net, &mut bufs))
            })
            .collect();
        let mut first = None;
        for h in servers {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a receiving thread panicked")));
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    });
    let result = (|| -> Result<Measured> {
        let mut warm = connect().context("the warm-up connection")?;
        warm.finish().context("closing the warm-up connection")?;
        let _ = warm.read_to_end(&mut Vec::new());
        drop(warm);
        thread::sleep(SETTLE);
        let before = Held::now()?;
        let mut conns = Vec::new();
        for i in 0..n {
            conns.push(connect().with_context(|| format!("connection {i}"))?);
        }
        accepted_rx
            .recv()
            .map_err(|_| anyhow!("host 0 stopped accepting"))?;
        thread::sleep(SETTLE);
        let idle = before.idle(&Held::now()?, n);
        let _ = go_tx.send(true);
        let started = Arc::new(Barrier::new(n as usize + 1));
        let ended = Arc::new(Barrier::new(n as usize + 1));
        let counters = Arc::new(Counters::default());
        let clients: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
                let (net, counters) = (each.clone(), Arc::clone(&counters));
                thread::spawn(move || -> Result<Measured> {
                    let mut bufs = Buffers::sender(&net);
                    started.wait();
                    let m = client(&mut c, &net, &counters, &mut bufs);
                    ended.wait();
                    let m = m?;
                    c.finish().context("closing a connection")?;
                    let _ = c.read_to_end(&mut Vec::new());
                    Ok(m)
                })
            })
            .collect();
        let progress = Progress::start(label, Arc::clone(&counters), net.out.silent());
        started.wait();
        let window = Window::start();
        ended.wait();
        let (elapsed, cpu, counted, array_cpu) = window.end();
        drop(progress);
        let mut each_m = Vec::new();
        for (i, h) in clients.into_iter().enumerate() {
            let m = h
                .join()
                .unwrap_or_else(|_| Err(anyhow!("a sending thread panicked")))
                .with_context(|| format!("connection {i}"))?;
            each_m.push(m);
        }
        let rates: Vec<f64> = each_m
            .iter()
            .map(|m| m.bytes as f64 / m.elapsed.as_secs_f64().max(1e-9) / 1e6)
            .collect();
        let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let fastest = rates.iter().copied().fold(0.0, f64::max);
        let mut hist = new_histogram();
        let mut rated: Option<Rated> = None;
        for m in &each_m {
            hist.add(&m.hist).context("merging latency histograms")?;
            if let Some(r) = &m.rated {
                match &mut rated {
                    Some(all) => all.add(r)?,
                    None => {
                        let mut all = Rated {
                            target: 0.0,
                            corrected: new_histogram(),
                            lag: new_histogram(),
                            not_issued: 0,
                        };
                        all.add(r)?;
                        rated = Some(all);
                    }
                }
            }
        }
        Ok(Measured {
            ops: each_m.iter().map(|m| m.ops).sum(),
            bytes: each_m.iter().map(|m| m.bytes).sum(),
            elapsed,
            cpu,
            hist,
            counters: counted,
            array_cpu,
            connections: Some(Connections {
                count: n,
                each: if net.rtt { net.count } else { each.bytes },
                mb_per_s: rates,
                slowest_mb_per_s: slowest,
                fastest_mb_per_s: fastest,
                slowest_over_fastest: if fastest > 0.0 {
                    slowest / fastest
                } else {
                    0.0
                },
                idle,
            }),
            rated,
        })
    })();
    if result.is_err() {
        let _ = go_tx.send(false);
    }
    let served = server
        .join()
        .map_err(|_| anyhow!("the receiving side panicked"))?;
    match (result, served) {
        (Ok(m), Ok(())) => Ok(m),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.context("the receiving side (host 0) failed")),
    }
}

/// `--curve` of `stp bench stp` / `tcp`: sweeps `run` (one ping-pong run
/// of these options at a rate, or closed loop) and prints the curve.
fn net_curve(
    net: &NetArgs,
    test: String,
    closed: &str,
    mut run: impl FnMut(NetArgs) -> Result<Report>,
) -> Result<()> {
    if net.out.hgrm.is_some() {
        bail!("--hgrm does not apply to --curve (every point's figures are in its --json); run one point with --rate N --hgrm FILE");
    }
    let quiet = OutArgs {
        json: net.out.json,
        quiet: true,
        hgrm: None,
        plot: None,
    };
    let (max, points) = super::curve::sweep(&net.steps, net.out.silent(), |rate| {
        run(NetArgs {
            rate,
            curve: false,
            out: quiet.clone(),
            ..net.clone()
        })
    })?;
    let curve = super::curve::Curve {
        schema: super::SCHEMA,
        mode: "curve",
        test,
        max,
        points,
    };
    let plot = net.out.plot.as_deref();
    let is_png = plot.is_some_and(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")));
    let (svg, png) = if is_png { (None, plot) } else { (plot, None) };
    super::curve::emit(&curve, svg, png, net.out.json, closed)
}

/// Runs `stp bench stp --rtt --curve`.
pub fn curve_stp(args: &StpArgs) -> Result<()> {
    let n = args.connections.unwrap_or(1);
    net_curve(
        &args.net,
        format!("stp {:?} rtt {} B", args.mode, args.net.msg).to_lowercase(),
        &format!("one round trip in flight on each of {n} connection(s)"),
        |net| {
            run_stp(&StpArgs {
                net,
                ..args.clone()
            })
        },
    )
}

/// Runs `stp bench tcp --rtt --curve`.
pub fn curve_tcp(args: &TcpArgs) -> Result<()> {
    net_curve(
        &args.net,
        format!("tcp rtt {} B", args.net.msg),
        "one round trip in flight",
        |net| run_tcp(&TcpArgs { net }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"{
      "version": 1,
      "stg": {"id": 7, "luns": 2},
      "hosts": [
        {"index": 0, "initiator": "h0", "luns": [
          {"lun": 0, "kind": "stg", "member": 0, "naa": "naa.1", "sg": "/dev/sg1"},
          {"lun": 1, "kind": "stg", "member": 1, "naa": "naa.2", "sg": "/dev/sg2"},
          {"lun": 2, "kind": "ramdisk", "naa": "naa.3", "sg": "/dev/sg3", "block": "/dev/sdc"}]},
        {"index": 1, "initiator": "h1", "luns": [
          {"lun": 0, "kind": "stg", "member": 1, "naa": "naa.2", "sg": "/dev/sg5"}]}
      ]
    }"#;

    #[test]
    fn map_reader() {
        let m = DeviceMap::parse(MAP).unwrap();
        assert_eq!(m.stg.luns, 2);
        assert_eq!(m.member(0, 1).unwrap(), PathBuf::from("/dev/sg2"));
        assert_eq!(m.member(1, 1).unwrap(), PathBuf::from("/dev/sg5"));
        assert_eq!(m.plain(0).unwrap(), PathBuf::from("/dev/sg3"));
        assert!(m.member(1, 0).is_err());
        assert!(m.plain(1).unwrap_err().to_string().contains("ramdisk"));
        assert!(DeviceMap::parse("{").is_err());
        assert!(DeviceMap::parse(&MAP.replace("\"version\": 1", "\"version\": 2")).is_err());
        assert!(DeviceMap::parse(&MAP.replace("\"index\": 1", "\"index\": 3")).is_err());
    }
}
