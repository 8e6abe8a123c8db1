//! `stp preflight`: checks an STG and this host before the first backup
//! (see [`stp_core::preflight`]); one line per check, `--json` for scripts.
//! Exits 1 when any check failed.
//!
//! With `--peer HOST` on one host and `--serve-peer` on the other, the two
//! exchange their views of the STG over the LAN (one `preflight_view`
//! control message each way, [`stp_core::preflight::peer`]) and both add
//! the `peer` check: the same member set on both hosts.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use stp_core::preflight::peer::{self, PeerView};
use stp_core::preflight::{self, Finding, HostFacts, Status};
use stp_core::stg::{self, Config, PathEngine};

/// Options of `stp preflight`.
#[derive(Args, Debug)]
pub struct PreflightArgs {
    /// The STP configuration file (the same on every host).
    #[arg(long)]
    config: PathBuf,
    /// The STG id.
    #[arg(long)]
    stg: u32,
    /// Find the members in this device map (JSON from
    /// sim-target/scripts/stg-up) instead of probing /dev/sg*.
    #[arg(long)]
    map: Option<PathBuf>,
    /// The host of the device map whose paths to use.
    #[arg(long, default_value_t = 0)]
    map_host: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Exchange views with the other host, which runs `stp preflight
    /// --serve-peer`: HOST or HOST:PORT (default port: the configuration's
    /// wkp + 3). Adds the `peer` check: both hosts see the same members.
    #[arg(long, value_name = "HOST[:PORT]", conflicts_with = "serve_peer")]
    peer: Option<String>,
    /// Wait for the other host's `stp preflight --peer` and answer it, on
    /// ADDR:PORT (default 0.0.0.0 and the configuration's wkp + 3).
    #[arg(long, value_name = "ADDR[:PORT]", num_args = 0..=1, default_missing_value = "")]
    serve_peer: Option<String>,
    /// How long to wait for the peer, in seconds (connecting, or for its
    /// connection).
    #[arg(long, default_value_t = 120)]
    peer_timeout: u64,
}

/// The port of the preflight exchange when none is given: wkp + 3 (the
/// backup uses wkp, wkp + 1 and wkp + 2).
pub fn peer_port(wkp: u16) -> u16 {
    wkp.saturating_add(3)
}

fn with_port(spec: &str, default_host: &str, port: u16) -> String {
    let spec = if spec.is_empty() { default_host } else { spec };
    // HOST, HOST:PORT, [v6], [v6]:PORT, bare v6.
    let has_port = if spec.starts_with('[') {
        spec.contains("]:")
    } else {
        spec.matches(':').count() == 1
    };
    match (has_port, spec.contains(':') && !spec.starts_with('[')) {
        (true, _) => spec.to_string(),
        (false, true) => format!("[{spec}]:{port}"),
        (false, false) => format!("{spec}:{port}"),
    }
}

/// Connects to a peer serving its view, sends `mine` first, and returns
/// the peer's.
pub fn exchange_as_client(addr: &str, mine: &PeerView, patience: Duration) -> Result<PeerView> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving the peer {addr}"))?
        .collect();
    let deadline = Instant::now() + patience;
    let mut s = 'connect: loop {
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                Ok(s) => break 'connect s,
                Err(e) => last = Some(e),
            }
        }
        if Instant::now() >= deadline {
            return match last {
                Some(e) => Err(e).with_context(|| {
                    format!(
                        "connecting to the peer {addr}: does it run `stp preflight --serve-peer`?"
                    )
                }),
                None => Err(anyhow::anyhow!("the peer {addr} resolves to no address")),
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    s.set_read_timeout(Some(patience))?;
    s.set_write_timeout(Some(patience))?;
    peer::write_view(&mut s, mine)?;
    Ok(peer::read_view(&mut s)?)
}

/// Waits on `listener` for one peer, reads its view and answers with
/// `mine`.
pub fn exchange_as_server(
    listener: &TcpListener,
    mine: &PeerView,
    patience: Duration,
) -> Result<(PeerView, SocketAddr)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + patience;
    let (mut s, from) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "no peer connected within {patience:?}: run `stp preflight --peer <this host>` on the other host"
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).context("accepting the peer's connection"),
        }
    };
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(patience))?;
    s.set_write_timeout(Some(patience))?;
    let theirs = peer::read_view(&mut s).with_context(|| format!("the view from {from}"))?;
    peer::write_view(&mut s, mine)?;
    Ok((theirs, from))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The engine that would drive `path`, and why: today the sg v3 io_uring
/// engine or synchronous SG_IO ([`scsi::open_best`]). The one place to ask
/// another engine's probe (bsg io_uring) once there is one.
pub fn engine_probe(path: &Path) -> Option<(String, String)> {
    scsi::open_best(path, 16)
        .ok()
        .map(|b| (format!("{:?}", b.engine), b.reason))
}

/// The smallest `queue/max_hw_sectors_kb` (in bytes) of the block devices
/// behind `paths`, from sysfs.
pub(crate) fn queue_limit(paths: &[&str]) -> Option<u64> {
    let devices = scsi::discovery::list_generic_devices().ok()?;
    devices
        .iter()
        .filter(|d| paths.iter().any(|p| Path::new(p) == d.dev_path))
        .filter_map(|d| d.block_device.as_ref())
        .filter_map(|b| {
            std::fs::read_to_string(format!("/sys/block/{b}/queue/max_hw_sectors_kb")).ok()
        })
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .min()
}

/// Runs `stp preflight`.
pub fn run(a: &PreflightArgs) -> Result<ExitCode> {
    let config = Config::load(&a.config)
        .with_context(|| format!("reading the STP configuration {}", a.config.display()))?;
    let dir = match &a.map {
        Some(m) => crate::backup::config::directory_from_map(m, a.map_host)?,
        None => crate::backup::config::probe_directory()?,
    };
    let (resolved, mut sets) = stg::open_member_path_sets(&config, a.stg, &dir, PathEngine::Sync)
        .with_context(|| {
            format!(
                "members: STG {} is not reachable from this host (`stp probe` lists the identities it sees)",
                a.stg
            )
        })?;
    let paths = resolved.paths();
    // The engine first: opening it may switch sg's direct I/O on.
    let engine = paths.first().and_then(|p| engine_probe(Path::new(p)));
    let facts = HostFacts {
        allow_dio: std::fs::read_to_string("/sys/module/sg/parameters/allow_dio")
            .ok()
            .map(|s| s.trim().to_string()),
        engine,
        queue_max_bytes: queue_limit(&paths),
    };
    let mut findings = preflight::check(&resolved, &mut sets, &facts, config.tunables.max_payload);
    if a.peer.is_some() || a.serve_peer.is_some() {
        let mine = peer::local_view(&host_name(), &resolved, &mut sets);
        let port = peer_port(config.wkp);
        let patience = Duration::from_secs(a.peer_timeout);
        let theirs = match (&a.peer, &a.serve_peer) {
            (Some(p), _) => exchange_as_client(&with_port(p, "", port), &mine, patience),
            (None, Some(l)) => {
                let addr = with_port(l, "0.0.0.0", port);
                let listener = TcpListener::bind(&addr)
                    .with_context(|| format!("listening for the peer on {addr}"))?;
                if !a.json {
                    eprintln!("waiting for the peer's `stp preflight --peer` on {addr}");
                }
                exchange_as_server(&listener, &mine, patience).map(|(v, _)| v)
            }
            (None, None) => unreachable!(),
        };
        findings.push(match theirs {
            Ok(v) => peer::compare(&mine, &v),
            Err(e) => Finding {
                check: "peer",
                status: Status::Fail,
                detail: format!("{e:#}"),
                fix: Some(
                    "run `stp preflight --serve-peer` on the other host and `--peer <it>` here, \
                     with the same configuration; let TCP reach wkp + 3"
                        .into(),
                ),
            },
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            println!("{}", f.line());
        }
    }
    Ok(if findings.iter().any(|f| f.status == Status::Fail) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_take_the_default_port() {
        assert_eq!(with_port("host-b", "", 5103), "host-b:5103");
        assert_eq!(with_port("host-b:7000", "", 5103), "host-b:7000");
        assert_eq!(with_port("192.0.2.1", "", 5103), "192.0.2.1:5103");
        assert_eq!(with_port("2001:db8::1", "", 5103), "[2001:db8::1]:5103");
        assert_eq!(with_port("[2001:db8::1]", "", 5103), "[2001:db8::1]:5103");
        assert_eq!(
            with_port("[2001:db8::1]:7000", "", 5103),
            "[2001:db8::1]:7000"
        );
        assert_eq!(with_port("", "0.0.0.0", 5103), "0.0.0.0:5103");
        assert_eq!(peer_port(5100), 5103);
    }
}
