//! Two backup hosts in one process over the embedded simulated array: the
//! `stp demo` and the in-process tests run the real flows on it.
//!
//! [`InProcArray`] builds an array with one vendor-mode STG of
//! [`MEMBERS`] LUNs and logs in two hosts (0: the backup server, 1: the
//! client). Each host's paths can be wrapped in a fault injector whose
//! [`FaultControl`] kills them on demand (tests of the LAN fallback).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use scsi::Transport;
use sim_target::{
    Array, FaultControl, FaultPlan, FaultyTransport, Host, LunConfig, StgMailbox, StgSpec,
};
use stp_core::conn::Config;
use stp_core::error::{MailboxError, SetupError};
use stp_core::mailbox::Mailbox;
use stp_core::sockets::SocketLayer;
use stp_core::stg::{self, MailboxMode, OpenOptions};
use stp_core::stream::PathSource;

use super::pipe::Policy;
use super::session;

/// The STG id of the in-process array.
pub const STG: u32 = 7;
/// The block-mode STG on the plain shared LUN [`PLAIN_LUN`].
pub const BLOCK_STG: u32 = 9;
/// A plain LUN (no STP support needed) both hosts share, for block mode.
pub const PLAIN_LUN: u64 = 100;
/// Its members.
pub const MEMBERS: usize = 4;

/// The embedded array with two logged-in hosts.
pub struct InProcArray {
    array: Array,
    hosts: Vec<Host>,
    _mailbox: Arc<StgMailbox>,
    /// The block-mode hosts' doorbells, on loopback (chosen at the first
    /// [`block_host`](Self::block_host)).
    doorbells: std::sync::OnceLock<stp_core::block::Doorbells>,
}

impl std::fmt::Debug for InProcArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcArray").finish_non_exhaustive()
    }
}

/// Connection settings for the in-process array: the defaults, with a dead
/// peer noticed within a few seconds (so a fallback test does not wait
/// half a minute).
pub fn stream_config() -> Config {
    Config {
        max_payload: 256 * 1024,
        max_retransmits: 5,
        max_rto: Duration::from_millis(500),
        keepalive: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

impl InProcArray {
    /// A fresh array; `seed` fixes the mailbox's port allocation.
    pub fn new(seed: u64) -> Result<InProcArray> {
        let array = Array::new();
        let luns: Vec<u64> = (0..MEMBERS as u64).collect();
        for &id in &luns {
            array
                .add_lun(id, LunConfig::new(id, 1 << 16, 512))
                .context("creating an STG LUN on the in-process array")?;
        }
        let mailbox = StgMailbox::with_seed(&array, vec![StgSpec::new(STG, luns)], seed)
            .context("configuring the in-process array's STG mailbox")?;
        mailbox.install(&array);
        array
            .add_lun(PLAIN_LUN, LunConfig::new(PLAIN_LUN, 1 << 16, 512))
            .context("creating the plain shared LUN on the in-process array")?;
        let hosts = ["backup-server", "backup-client"]
            .iter()
            .map(|n| Host::login(&array, n))
            .collect();
        Ok(InProcArray {
            array,
            hosts,
            _mailbox: mailbox,
            doorbells: std::sync::OnceLock::new(),
        })
    }

    /// The array.
    pub fn array(&self) -> &Array {
        &self.array
    }

    /// A path source for host `h` (0 or 1); with `control`, every path
    /// goes through a fault injector it can kill.
    pub fn source(&self, h: usize, control: Option<FaultControl>) -> Arc<dyn PathSource> {
        let host = self.hosts[h.min(1)].clone();
        let opened = stg::open_with(
            MailboxMode::Vendor,
            STG,
            MEMBERS,
            &OpenOptions::default(),
            move |m| -> std::io::Result<Box<dyn Transport>> {
                let t = host.open(m as u64)?;
                Ok(match &control {
                    Some(c) => Box::new(FaultyTransport::with_control(
                        t,
                        FaultPlan::none(),
                        m as u64,
                        c.clone(),
                    )),
                    None => Box::new(t),
                })
            },
        );
        // A vendor-mode source opens nothing until it is used.
        opened.unwrap_or_else(|e| unreachable!("a vendor-mode source with members: {e}"))
    }

    /// A backup host on the array: host 0 is the server, 1 the client.
    /// Both listen on loopback; `wkp` must leave WKP+1 and WKP+2 free.
    pub fn host(
        &self,
        h: usize,
        wkp: u16,
        policy: Policy,
        control: Option<FaultControl>,
    ) -> session::Host {
        host_over(self.source(h, control), STG, MEMBERS, wkp, policy)
    }
}

/// A backup host whose STP traffic goes through `src` (STG `stg` of
/// `members` members).
fn host_over(
    src: Arc<dyn PathSource>,
    stg: u32,
    members: usize,
    wkp: u16,
    policy: Policy,
) -> session::Host {
    let layer = SocketLayer::new(HashMap::from([(stg, Arc::clone(&src))]), stream_config());
    session::Host {
        layer: Arc::new(layer),
        stg,
        stg_len: members as u32,
        wkp,
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        psk: Some(b"in-process demo psk".to_vec()),
        policy,
        timeout: Duration::from_secs(30),
        probe: Some(src),
    }
}

impl InProcArray {
    /// Backup host `h` (0 server, 1 client) over block-mode STG
    /// [`BLOCK_STG`] on the plain shared LUN, as host index `h`: plain
    /// READ(16)/WRITE(16), what any array serves. Call
    /// [`format_block_stg`](Self::format_block_stg) once first. The hosts
    /// ring each other's doorbells over loopback, as `[stg.block]
    /// doorbells` has them do on a LAN.
    pub fn block_host(&self, h: usize, wkp: u16, policy: Policy) -> Result<session::Host> {
        let host = self.hosts[h.min(1)].clone();
        let path: Box<dyn Transport> = Box::new(host.open(PLAIN_LUN)?);
        let doorbells = match self.doorbells.get() {
            Some(d) => *d,
            None => {
                let d = stp_core::block::Doorbells::loopback(2)
                    .context("finding free loopback UDP ports for the doorbells")?;
                *self.doorbells.get_or_init(|| d)
            }
        };
        let config = stp_core::block::BlockConfig {
            doorbells: Some(doorbells),
            ..stp_core::block::BlockConfig::default()
        };
        let stg =
            stp_core::block::BlockStg::open_with(vec![path], h.min(1) as u16, BLOCK_STG, config)
                .with_context(|| format!("opening block-mode STG {BLOCK_STG} as host {h}"))?;
        Ok(host_over(stg::block_source(stg), BLOCK_STG, 1, wkp, policy))
    }

    /// Formats the plain shared LUN as block-mode STG [`BLOCK_STG`] for two
    /// hosts (behind the destructive-write guard, as `stp stg format`).
    pub fn format_block_stg(&self) -> Result<()> {
        let admin = Host::login(&self.array, "admin");
        let mut paths: Vec<Box<dyn Transport>> = vec![Box::new(admin.open(PLAIN_LUN)?)];
        // The layout `stp stg format` chooses for this LUN.
        let spec = stg::BlockSpec {
            hosts: 2,
            slots: None,
            slot_blocks: None,
            doorbells: None,
        };
        let (layout, _) = crate::stg::layout_for(BLOCK_STG, &spec, &mut paths, None)?;
        crate::stg::format_members(
            BLOCK_STG,
            &layout,
            &mut paths,
            &[format!("in-process LUN {PLAIN_LUN}")],
            false,
            std::path::Path::new("/nonexistent"),
            "",
        )?;
        Ok(())
    }

    /// A backup host whose paths to the array are all down (every open
    /// fails): the array is unavailable at the start.
    pub fn host_without_array(&self, wkp: u16, policy: Policy) -> session::Host {
        let mut h = self.host(0, wkp, policy, None);
        let down: Arc<dyn PathSource> = Arc::new(|| -> Result<Box<dyn Mailbox>, MailboxError> {
            Err(SetupError::Unavailable {
                stg: STG,
                cause: Arc::new(PathsDown),
            }
            .into())
        });
        h.layer = Arc::new(SocketLayer::new(
            HashMap::from([(STG, Arc::clone(&down))]),
            stream_config(),
        ));
        h.probe = Some(down);
        h
    }
}

/// A free TCP port on loopback whose next two ports are free too (WKP,
/// WKP+1, WKP+2), drawn at random below Linux's ephemeral range (32768 on):
/// a port the kernel hands out for other connections meanwhile (other
/// processes' tests, a build's downloads) would be taken from under the
/// caller between this check and its own bind.
pub fn free_wkp() -> Result<u16> {
    use rand::Rng;
    use std::net::TcpListener;
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let p: u16 = rng.gen_range(20_000..32_000);
        let free = |port: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        if free(p) && free(p + 1) && free(p + 2) {
            return Ok(p);
        }
    }
    anyhow::bail!("found no three free consecutive TCP ports on loopback between 20000 and 32000")
}

/// The failure of [`InProcArray::host_without_array`]'s paths.
#[derive(Debug)]
struct PathsDown;

impl std::fmt::Display for PathsDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("every path to the array is down")
    }
}

impl std::error::Error for PathsDown {}
