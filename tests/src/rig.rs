//! The arrays a test body runs against: one body, two arrays.
//!
//! A [`Rig`] hands out SCSI paths from numbered hosts to the members of one
//! vendor-mode STG and to one plain shared LUN (for block mode). The bodies
//! in [`crate::e2e`] take a rig and never ask which array is behind it.
//!
//! * [`InProcRig`]: the in-process array model, three initiators.
//! * [`LioRig`]: real LIO through `/dev/sgN` on two tcm_loop paths, described
//!   by the map that `sim-target/scripts/stg-up` writes (`$STP_LIO_MAP`,
//!   default `/run/stp/sim-target.json`): the TCMU daemon `stp-target` serves
//!   the STG; the shared LUN is a LIO ramdisk (the map also has a LIO fileio
//!   LUN, [`LioRig::fileio_path`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use scsi::{EnginePool, SharedEngine, Transport};
use sim_target::{Array, Host, LunConfig, StgMailbox, StgSpec};
use stp_core::stg::{self, MailboxMode, OpenOptions};
use stp_core::stream::PathSource;

/// Paths onto an array that has one vendor-mode STG and one plain LUN.
pub trait Rig: Send + Sync + 'static {
    /// What the rig is, for messages.
    fn describe(&self) -> String;
    /// The id of the vendor-mode STG.
    fn stg(&self) -> u32;
    /// Members of the STG.
    fn members(&self) -> usize;
    /// Hosts (independent initiator paths) the rig offers.
    fn hosts(&self) -> usize;
    /// A path from `host` to STG member `member`.
    fn member(&self, host: usize, member: usize) -> io::Result<Box<dyn Transport>>;
    /// A path from `host` to the plain shared LUN, for block mode.
    fn plain(&self, host: usize) -> io::Result<Box<dyn Transport>>;
    /// Whether a READ that races a WRITE of the same block always sees the
    /// block whole. SCSI does not promise it (nothing is atomic beyond one
    /// command, and not even that against a concurrent READ): LIO's
    /// ramdisk copies without a lock, so a reader can see half of a block
    /// being rewritten. The in-process model executes each command whole.
    fn whole_block_reads(&self) -> bool;
}

/// A [`PathSource`] for `host` over the STG members in `order`: each call
/// opens fresh paths and a [`VendorMailbox`] over them.
pub fn vendor_source(rig: &Arc<dyn Rig>, host: usize, order: Vec<usize>) -> Arc<dyn PathSource> {
    let rig = Arc::clone(rig);
    let members = order.len();
    stg::open_with(
        MailboxMode::Vendor,
        rig.stg(),
        members,
        &OpenOptions::default(),
        move |i| rig.member(host, order[i]),
    )
    .unwrap_or_else(|e| panic!("a vendor-mode source over {members} members: {e}"))
}

/// All STG members from `host`, in member order.
pub fn all_members(rig: &Arc<dyn Rig>, host: usize) -> Arc<dyn PathSource> {
    vendor_source(rig, host, (0..rig.members()).collect())
}

/// The in-process array: STG 7 over LUNs `0..members`, a plain 64 MiB LUN
/// 100, and three logged-in hosts.
pub struct InProcRig {
    array: Array,
    hosts: Vec<Host>,
    members: usize,
    mailbox: Arc<StgMailbox>,
}

/// The plain LUN of [`InProcRig`].
pub const PLAIN_LUN: u64 = 100;

/// A fresh in-process rig with `members` STG members; `seed` fixes the
/// mailbox's port allocation.
pub fn inproc(members: usize, seed: u64) -> Arc<dyn Rig> {
    Arc::new(InProcRig::new(members, seed))
}

impl InProcRig {
    /// As [`inproc`], keeping the concrete type (for the mailbox).
    pub fn new(members: usize, seed: u64) -> InProcRig {
        let array = Array::new();
        let luns: Vec<u64> = (0..members as u64).collect();
        for &id in &luns {
            array
                .add_lun(id, LunConfig::new(id, 1 << 16, 512))
                .expect("STG LUN");
        }
        // Like LIO's ramdisk: no DPO/FUA.
        let plain = LunConfig {
            dpofua: false,
            ..LunConfig::new(PLAIN_LUN, 1 << 17, 512)
        };
        array.add_lun(PLAIN_LUN, plain).expect("plain LUN");
        let mailbox =
            StgMailbox::with_seed(&array, vec![StgSpec::new(7, luns)], seed).expect("mailbox");
        mailbox.install(&array);
        let hosts = (0..3)
            .map(|i| Host::login(&array, &format!("h{i}")))
            .collect();
        InProcRig {
            array,
            hosts,
            members,
            mailbox,
        }
    }

    /// The array.
    pub fn array(&self) -> &Array {
        &self.array
    }

    /// The STG mailbox.
    pub fn mailbox(&self) -> &Arc<StgMailbox> {
        &self.mailbox
    }

    fn host(&self, host: usize) -> io::Result<&Host> {
        self.hosts.get(host).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no host {host} in the rig"),
            )
        })
    }
}

impl Rig for InProcRig {
    fn describe(&self) -> String {
        "in-process array".into()
    }
    fn stg(&self) -> u32 {
        7
    }
    fn members(&self) -> usize {
        self.members
    }
    fn hosts(&self) -> usize {
        self.hosts.len()
    }
    fn member(&self, host: usize, member: usize) -> io::Result<Box<dyn Transport>> {
        if member >= self.members {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no STG member {member}"),
            ));
        }
        Ok(Box::new(self.host(host)?.open(member as u64)?))
    }
    fn plain(&self, host: usize) -> io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.host(host)?.open(PLAIN_LUN)?))
    }
    fn whole_block_reads(&self) -> bool {
        true
    }
}

/// A rig whose every path is a handle onto one engine thread per (host,
/// LUN), started on first use over the inner rig's path
/// ([`SharedEngine::start_polled`]): the sharing the io_uring engine does on
/// real devices, over any array.
pub struct SharedRig {
    inner: Arc<dyn Rig>,
    /// Keyed by host and member (`None`: the plain LUN).
    engines: Mutex<HashMap<(usize, Option<usize>), SharedEngine>>,
}

/// `rig` with its paths shared through engine threads.
pub fn shared(rig: Arc<dyn Rig>) -> Arc<dyn Rig> {
    Arc::new(SharedRig {
        inner: rig,
        engines: Mutex::new(HashMap::new()),
    })
}

impl SharedRig {
    fn handle(
        &self,
        key: (usize, Option<usize>),
        open: impl FnOnce() -> io::Result<Box<dyn Transport>>,
    ) -> io::Result<Box<dyn Transport>> {
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = engines.get(&key) {
            return Ok(Box::new(e.handle()));
        }
        let engine = SharedEngine::start_polled(open()?)?;
        let handle = engine.handle();
        engines.insert(key, engine);
        Ok(Box::new(handle))
    }
}

impl Rig for SharedRig {
    fn describe(&self) -> String {
        format!("{} through shared engine threads", self.inner.describe())
    }
    fn stg(&self) -> u32 {
        self.inner.stg()
    }
    fn members(&self) -> usize {
        self.inner.members()
    }
    fn hosts(&self) -> usize {
        self.inner.hosts()
    }
    fn member(&self, host: usize, member: usize) -> io::Result<Box<dyn Transport>> {
        self.handle((host, Some(member)), || self.inner.member(host, member))
    }
    fn plain(&self, host: usize) -> io::Result<Box<dyn Transport>> {
        self.handle((host, None), || self.inner.plain(host))
    }
    fn whole_block_reads(&self) -> bool {
        self.inner.whole_block_reads()
    }
}

/// One LUN as a host path sees it, from the map.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct MapLun {
    /// The LUN number the host sees (on the tcm_loop target, or the node
    /// ACL's mapped LUN over iSCSI).
    pub lun: u64,
    /// `stg` (served by the TCMU daemon), `ramdisk` or `fileio` (LIO's own
    /// backstores).
    pub kind: String,
    /// The STG member index, for `stg` LUNs.
    #[serde(default)]
    pub member: Option<usize>,
    /// The NAA identity (`naa.<hex>`).
    pub naa: String,
    /// The SCSI generic node.
    pub sg: PathBuf,
    /// The block node, if there is one.
    #[serde(default)]
    pub block: Option<PathBuf>,
}

/// One host path from the map: a tcm_loop target (`stg-up`'s map), or an
/// iSCSI session (`iscsi-login`'s).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct MapHost {
    /// The host index (0 or 1).
    pub index: usize,
    /// The initiator name: the one the daemon knows a tcm_loop path by
    /// (`h<H>`), or an iSCSI session's initiator IQN.
    pub initiator: String,
    /// Its LUNs.
    pub luns: Vec<MapLun>,
}

/// The STG part of the map.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct MapStg {
    /// The STG id.
    pub id: u32,
    /// Its member count.
    pub luns: usize,
}

/// The map `sim-target/scripts/stg-up` writes.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct LioMap {
    /// Format version (1).
    pub version: u32,
    /// The STG served by the daemon.
    pub stg: MapStg,
    /// The host paths.
    pub hosts: Vec<MapHost>,
}

impl LioMap {
    /// Reads and checks the map at `path`.
    pub fn load(path: &Path) -> Result<LioMap, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the LIO map {}: {e}; run sim-target/scripts/stg-up first",
                path.display()
            )
        })?;
        let map: LioMap = serde_json::from_str(&text)
            .map_err(|e| format!("the LIO map {} is malformed: {e}", path.display()))?;
        if map.version != 1 {
            return Err(format!(
                "the LIO map {} has version {}; this build reads version 1",
                path.display(),
                map.version
            ));
        }
        if map.hosts.len() < 2 {
            return Err(format!(
                "the LIO map {} lists {} host paths; the tests need two",
                path.display(),
                map.hosts.len()
            ));
        }
        Ok(map)
    }

    /// The `sg` node of `host`'s LUN that `pick` selects.
    fn sg(&self, host: usize, what: &str, pick: impl Fn(&MapLun) -> bool) -> io::Result<PathBuf> {
        let h = self.hosts.iter().find(|h| h.index == host).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no host {host} in the LIO map"),
            )
        })?;
        h.luns
            .iter()
            .find(|l| pick(l))
            .map(|l| l.sg.clone())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("host {host} has no {what} in the LIO map"),
                )
            })
    }
}

/// Real LIO through `/dev/sgN`, as the map describes it.
pub struct LioRig {
    map: LioMap,
}

/// The environment variable naming the map.
pub const LIO_MAP_ENV: &str = "STP_LIO_MAP";
/// Set to `sync` to run the real-LIO tests over synchronous `SG_IO`
/// instead of the shared io_uring engines.
pub const LIO_TRANSPORT_ENV: &str = "STP_LIO_TRANSPORT";
/// The map's default place.
pub const LIO_MAP_DEFAULT: &str = "/run/stp/sim-target.json";

impl LioRig {
    /// The rig described by `$STP_LIO_MAP` (default
    /// `/run/stp/sim-target.json`). Panics with a clear message when there
    /// is none: these tests only run where LIO is set up.
    pub fn from_env() -> Arc<dyn Rig> {
        Arc::new(Self::load_env())
    }

    /// The rig the map at `path` describes.
    pub fn load(path: &Path) -> Result<LioRig, String> {
        LioMap::load(path).map(|map| LioRig { map })
    }

    /// As [`LioRig::from_env`], keeping the concrete type.
    pub fn load_env() -> LioRig {
        let path = std::env::var_os(LIO_MAP_ENV)
            .map_or_else(|| PathBuf::from(LIO_MAP_DEFAULT), Into::into);
        match LioMap::load(&path) {
            Ok(map) => LioRig { map },
            Err(e) => panic!("{e} (the real-LIO tests run in the VM: `just vm-test`)"),
        }
    }

    /// The map.
    pub fn map(&self) -> &LioMap {
        &self.map
    }

    fn open(path: &Path) -> io::Result<Box<dyn Transport>> {
        if std::env::var(LIO_TRANSPORT_ENV).is_ok_and(|v| v == "sync") {
            return scsi::sg::SgDevice::open(path)
                .map(|d| Box::new(d) as Box<dyn Transport>)
                .map_err(io::Error::other);
        }
        EnginePool::global()
            .open(path)
            .map(|b| b.transport)
            .map_err(io::Error::other)
    }

    /// The `sg` node of `host`'s STG member `member`.
    pub fn member_path(&self, host: usize, member: usize) -> io::Result<PathBuf> {
        self.map.sg(host, &format!("STG member {member}"), |l| {
            l.kind == "stg" && l.member == Some(member)
        })
    }

    /// The `sg` node of `host`'s ramdisk LUN.
    pub fn plain_path(&self, host: usize) -> io::Result<PathBuf> {
        self.map.sg(host, "ramdisk LUN", |l| l.kind == "ramdisk")
    }

    /// The `sg` node of `host`'s fileio LUN (thin provisioned).
    pub fn fileio_path(&self, host: usize) -> io::Result<PathBuf> {
        self.map.sg(host, "fileio LUN", |l| l.kind == "fileio")
    }
}

/// The real-LIO rig with LIO's fileio LUN as the plain shared LUN: block
/// mode on a second stock backstore (a file behind `fileio`, thin
/// provisioned), where [`LioRig`] uses the ramdisk.
pub struct LioFileioRig(pub LioRig);

impl Rig for LioFileioRig {
    fn describe(&self) -> String {
        "real LIO (tcm_loop, fileio backstore)".into()
    }
    fn stg(&self) -> u32 {
        self.0.stg()
    }
    fn members(&self) -> usize {
        self.0.members()
    }
    fn hosts(&self) -> usize {
        self.0.hosts()
    }
    fn member(&self, host: usize, member: usize) -> io::Result<Box<dyn Transport>> {
        self.0.member(host, member)
    }
    fn plain(&self, host: usize) -> io::Result<Box<dyn Transport>> {
        LioRig::open(&self.0.fileio_path(host)?)
    }
    fn whole_block_reads(&self) -> bool {
        false
    }
}

impl Rig for LioRig {
    fn describe(&self) -> String {
        "real LIO (tcm_loop + stp-target)".into()
    }
    fn stg(&self) -> u32 {
        self.map.stg.id
    }
    fn members(&self) -> usize {
        self.map.stg.luns
    }
    fn hosts(&self) -> usize {
        self.map.hosts.len()
    }
    fn member(&self, host: usize, member: usize) -> io::Result<Box<dyn Transport>> {
        Self::open(&self.member_path(host, member)?)
    }
    fn plain(&self, host: usize) -> io::Result<Box<dyn Transport>> {
        Self::open(&self.plain_path(host)?)
    }
    fn whole_block_reads(&self) -> bool {
        false
    }
}
