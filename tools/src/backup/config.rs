//! The backup configuration file (docs/BACKUP.md §1) and building a
//! [`session::Host`] from it on real SCSI devices.
//!
//! The file names the STP configuration file (`wkp`, `psk`, `[[stg]]`,
//! tunables: `stp_core::stg::Config`), picks the STG the data uses, and
//! holds the backup roles' settings:
//!
//! ```toml
//! stp_config = "/etc/stp/stp.toml"   # wkp, psk, [[stg]], [tunables]
//! stg = 7                            # the STG the data uses (vendor mode)
//! fallback = "preferred"             # preferred | always | never
//! bind = "0.0.0.0"                   # address the listeners use
//! timeout_ms = 30000                 # patience of each flow step
//! # Optional: take the device paths from a sim-target map instead of
//! # probing /dev/sg* (the VM's two tcm_loop paths act as two hosts).
//! # map = "/run/stp/sim-target.json"
//! # map_host = 0
//!
//! [server]
//! repository = "/var/lib/stp/backup"
//! compress = "gzip"                  # none (default) | gzip
//!
//! [client]
//! name = "web1"                      # this host's name in the catalog
//! server = "192.0.2.10"              # the backup server (database backups)
//! allow = ["/srv", "/home"]          # directories the server may ask for
//! excludes = ["*.tmp", "cache/"]     # never sent
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use scsi::Transport;
use serde::{Deserialize, Serialize};
use stp_core::conn::Config as ConnConfig;
use stp_core::error::{MailboxError, SetupError};
use stp_core::mailbox::Mailbox;
use stp_core::sockets::SocketLayer;
use stp_core::stg::{self, Config as StpConfig, LunInfo, MailboxMode, MapDirectory, OpenOptions};
use stp_core::stream::PathSource;

use super::daemon::ArrayStatus;
use super::pipe::Policy;
use super::session::{self, AgentRules};

/// The backup configuration file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// The STP configuration file, relative to this file's directory if
    /// relative.
    pub stp_config: PathBuf,
    /// The STG the data uses.
    pub stg: u32,
    /// LAN fallback policy.
    #[serde(default)]
    pub fallback: Policy,
    /// The address the listeners use.
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    /// Patience of each flow, milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// A sim-target device map to take paths from instead of probing.
    #[serde(default)]
    pub map: Option<PathBuf>,
    /// The map's host index this host uses.
    #[serde(default)]
    pub map_host: usize,
    /// This host's index in a block-mode STG (0 .. the layout's `hosts`,
    /// different on every host that shares the STG; docs/PROTOCOL.md §4).
    /// Required in block mode, unused in vendor mode.
    #[serde(default)]
    pub host_index: Option<u16>,
    /// Server settings.
    #[serde(default)]
    pub server: Option<ServerSection>,
    /// Client settings.
    #[serde(default)]
    pub client: Option<ClientSection>,
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The repository directory.
    pub repository: PathBuf,
    /// Compression of new archives: `none` (default) or `gzip`.
    #[serde(default)]
    pub compress: Compress,
}

/// How the server stores archives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// `<id>.tar`, exactly the stream received.
    #[default]
    None,
    /// `<id>.tar.gz` (GNU tar reads it with `-z`).
    Gzip,
}

/// `[client]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// This host's name in the catalog.
    pub name: String,
    /// The backup server's address (database backups).
    #[serde(default)]
    pub server: Option<IpAddr>,
    /// Directories the server may ask for (empty: any).
    #[serde(default)]
    pub allow: Vec<PathBuf>,
    /// Patterns never sent.
    #[serde(default)]
    pub excludes: Vec<String>,
}

fn default_bind() -> IpAddr {
    IpAddr::from([0, 0, 0, 0])
}

fn default_timeout() -> u64 {
    30_000
}

impl BackupConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<BackupConfig> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the backup configuration {} (docs/BACKUP.md §1 shows one)",
                path.display()
            )
        })?;
        BackupConfig::parse(&text, path)
            .with_context(|| format!("the backup configuration {} is malformed", path.display()))
    }

    /// Parses and checks the text of the file at `path` (a relative
    /// `stp_config` is taken from `path`'s directory; nothing is read).
    /// Accepts any text.
    pub fn parse(text: &str, path: &Path) -> Result<BackupConfig> {
        let mut cfg: BackupConfig = toml::from_str(text)?;
        if cfg.stp_config.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.stp_config = dir.join(&cfg.stp_config);
            }
        }
        if cfg.timeout_ms == 0 {
            bail!("timeout_ms must be above 0");
        }
        Ok(cfg)
    }

    /// The agent's rules from `[client]`.
    pub fn rules(&self) -> AgentRules {
        self.client
            .as_ref()
            .map(|c| AgentRules {
                name: Some(c.name.clone()),
                allowed: c.allow.clone(),
                excludes: c.excludes.clone(),
            })
            .unwrap_or_default()
    }

    /// Builds this host's socket layer over the STG's devices (with
    /// `fallback = "never"`, a TCP-only layer: no device is opened).
    pub fn host(&self) -> Result<session::Host> {
        self.host_and_status().map(|(h, _)| h)
    }

    /// [`BackupConfig::host`], and what was found of the array (what the
    /// daemons print when they start).
    pub fn host_and_status(&self) -> Result<(session::Host, ArrayStatus)> {
        let mut status = ArrayStatus {
            stg: self.stg,
            fallback: self.fallback.as_str().into(),
            ..ArrayStatus::default()
        };
        let stp = StpConfig::load(&self.stp_config).with_context(|| {
            format!(
                "reading the STP configuration {}",
                self.stp_config.display()
            )
        })?;
        if let Some(c) = stp.stg(self.stg) {
            status.mode = Some(c.mode.to_string());
        }
        if self.fallback == Policy::Never {
            status.state = "not used".into();
            status.why = Some("the fallback policy is 'never': the data goes over the LAN".into());
            let host = session::Host {
                layer: Arc::new(
                    SocketLayer::new(HashMap::new(), ConnConfig::default())
                        .with_local_ip(self.bind),
                ),
                stg: self.stg,
                stg_len: 0,
                wkp: stp.wkp,
                bind_ip: self.bind,
                psk: stp.psk_bytes()?,
                policy: Policy::Never,
                timeout: Duration::from_millis(self.timeout_ms),
                probe: None,
            };
            return Ok((host, status));
        }
        let mut options = OpenOptions::default();
        if let Some(c) = stp.stg(self.stg).filter(|c| c.mode == MailboxMode::Block) {
            let Some(index) = self.host_index else {
                bail!(
                    "STG {} is a block-mode STG: give this host its index with `host_index = N` \
                     in the backup configuration (0 .. the STG's hosts, a different one on each \
                     host that shares the STG)",
                    c.id
                );
            };
            options = OpenOptions::host(index);
        }
        let opened = (|| -> Result<_> {
            let dir = match &self.map {
                Some(m) => directory_from_map(m, self.map_host)?,
                None => probe_directory()?,
            };
            let find = || {
                format!(
                    "finding STG {}'s members on this host (`stp probe` lists the identities it sees)",
                    self.stg
                )
            };
            let resolved = stp.resolve(self.stg, &dir).with_context(find)?;
            let src = stg::open(&stp, self.stg, &dir, &options).with_context(find)?;
            Ok((resolved, src))
        })();
        let src = match opened {
            Ok((resolved, src)) => {
                status.mode = Some(resolved.mode.to_string());
                status.members = resolved.paths().iter().map(|p| (*p).to_owned()).collect();
                status.engine =
                    resolved
                        .paths()
                        .first()
                        .map(|p| match scsi::EnginePool::global().open(p) {
                            Ok(best) => best.reason,
                            Err(e) => format!("{p} does not open: {e}"),
                        });
                status.state = "resolved".into();
                src
            }
            Err(e) => {
                status.state = "unavailable".into();
                status.why = Some(format!("{e:#}"));
                if self.fallback == Policy::Preferred {
                    // The array is unavailable at the start: the sessions
                    // see why through the probe and go over the LAN.
                    return Ok((self.unavailable(&stp, e)?, status));
                }
                return Err(e);
            }
        };
        let stg_len = stp.stg(self.stg).map_or(0, |c| c.members.len() as u32);
        let t = &stp.tunables;
        let conn = ConnConfig {
            max_payload: t.max_payload,
            keepalive: t.keepalive,
            idle_timeout: t.dead_after,
            initial_rto: t.initial_rto,
            ..ConnConfig::default()
        };
        let layer = SocketLayer::new(HashMap::from([(self.stg, Arc::clone(&src))]), conn)
            .with_local_ip(self.bind);
        let host = session::Host {
            layer: Arc::new(layer),
            stg: self.stg,
            stg_len,
            wkp: stp.wkp,
            bind_ip: self.bind,
            psk: stp.psk_bytes()?,
            policy: self.fallback,
            timeout: Duration::from_millis(self.timeout_ms),
            probe: Some(src),
        };
        Ok((host, status))
    }
}

impl BackupConfig {
    /// A host whose STG cannot be used (`why`): every open of its paths
    /// fails with the reason, so a session under `preferred` records it
    /// and goes over the LAN.
    fn unavailable(&self, stp: &StpConfig, why: anyhow::Error) -> Result<session::Host> {
        let stg = self.stg;
        let cause: Arc<dyn std::error::Error + Send + Sync> = Arc::new(Why(why));
        let down: Arc<dyn PathSource> =
            Arc::new(move || -> Result<Box<dyn Mailbox>, MailboxError> {
                Err(SetupError::Unavailable {
                    stg,
                    cause: Arc::clone(&cause),
                }
                .into())
            });
        Ok(session::Host {
            layer: Arc::new(
                SocketLayer::new(
                    HashMap::from([(self.stg, Arc::clone(&down))]),
                    ConnConfig::default(),
                )
                .with_local_ip(self.bind),
            ),
            stg: self.stg,
            stg_len: 0,
            wkp: stp.wkp,
            bind_ip: self.bind,
            psk: stp.psk_bytes()?,
            policy: self.fallback,
            timeout: Duration::from_millis(self.timeout_ms),
            probe: Some(down),
        })
    }
}

/// One LUN of the sim-target map (only what is needed here).
#[derive(Deserialize)]
struct MapLun {
    naa: String,
    sg: PathBuf,
}

#[derive(Deserialize)]
struct MapHost {
    index: usize,
    luns: Vec<MapLun>,
}

#[derive(Deserialize)]
struct DeviceMap {
    hosts: Vec<MapHost>,
}

pub(crate) fn directory_from_map(path: &Path, host: usize) -> Result<MapDirectory> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the device map {}; sim-target/scripts/stg-up writes it",
            path.display()
        )
    })?;
    let mut dir = parse_device_map(&text, host)
        .with_context(|| format!("the device map {}", path.display()))?;
    // The map does not say how large each LUN is, and block mode checks its
    // layout against the capacity: ask each device (one that does not
    // answer stays at 0, and the layout check says so).
    for info in dir.0.values_mut() {
        if let Some((blocks, block_size)) = capacity(Path::new(&info.path)) {
            info.blocks = blocks;
            info.block_size = block_size;
        }
    }
    Ok(dir)
}

/// A LUN's capacity in blocks and its block size (READ CAPACITY(16)), or
/// `None` when the device cannot be opened or does not answer.
fn capacity(path: &Path) -> Option<(u64, u32)> {
    let mut t = scsi::sg::SgDevice::open(path).ok()?;
    read_capacity(&mut t)
}

fn read_capacity(t: &mut scsi::sg::SgDevice) -> Option<(u64, u32)> {
    let cdb = scsi::Cdb::ReadCapacity16 { alloc_len: 32 }.emit();
    match t.execute(scsi::Command::data_in(cdb, 32)).into_result() {
        Ok((b, _)) if b.len() >= 12 => {
            let mut last = [0u8; 8];
            last.copy_from_slice(&b[..8]);
            let mut bs = [0u8; 4];
            bs.copy_from_slice(&b[8..12]);
            Some((
                u64::from_be_bytes(last).saturating_add(1),
                u32::from_be_bytes(bs),
            ))
        }
        _ => None,
    }
}

/// The LUNs host `host` reaches in the text of a sim-target device map.
/// Accepts any text.
pub fn parse_device_map(text: &str, host: usize) -> Result<MapDirectory> {
    let map: DeviceMap = serde_json::from_str(text).context("malformed")?;
    let h = map
        .hosts
        .iter()
        .find(|h| h.index == host)
        .with_context(|| format!("no host {host}"))?;
    let mut dir = MapDirectory::new();
    for l in &h.luns {
        dir.insert(
            l.naa.clone(),
            LunInfo {
                path: l.sg.display().to_string(),
                other_paths: Vec::new(),
                blocks: 0,
                block_size: 0,
            },
        );
    }
    Ok(dir)
}

pub(crate) fn probe_directory() -> Result<MapDirectory> {
    let devices = scsi::discovery::list_generic_devices()
        .context("listing SCSI generic devices (is the sg module loaded?)")?;
    let mut dir = MapDirectory::new();
    for d in devices {
        let Ok(mut t) = scsi::sg::SgDevice::open(&d.dev_path) else {
            continue;
        };
        let Ok(id) = scsi::inquiry::identify(&mut t) else {
            continue;
        };
        let (blocks, block_size) = read_capacity(&mut t).unwrap_or((0, 0));
        dir.insert_identified(
            &id,
            LunInfo {
                path: d.dev_path.display().to_string(),
                other_paths: Vec::new(),
                blocks,
                block_size,
            },
        );
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block-mode STG needs this host's index, and says so before any
    /// device is looked for.
    #[test]
    fn block_mode_needs_the_host_index() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("stp.toml"),
            "wkp = 5100\n[[stg]]\nid = 8\nmode = \"block\"\n\
             members = [\"naa.6001405a1b2c3d4e5f60718293a4b5c6\"]\n\
             [stg.block]\nhosts = 2\nslots = 8\nslot_blocks = 16\n",
        )
        .unwrap();
        let p = dir.path().join("backup.toml");
        std::fs::write(
            &p,
            "stp_config = \"stp.toml\"\nstg = 8\nfallback = \"always\"\n",
        )
        .unwrap();
        let c = BackupConfig::load(&p).unwrap();
        assert_eq!(c.host_index, None);
        let Err(e) = c.host() else {
            panic!("a block-mode STG without host_index was accepted");
        };
        let e = format!("{e:#}");
        assert!(e.contains("host_index"), "{e}");
    }

    /// The example of the module documentation parses.
    #[test]
    fn documented_example_parses() {
        let source = include_str!("config.rs");
        let example: String = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| l.trim_start_matches("//!").strip_prefix(' ').unwrap_or(""))
            .skip_while(|l| *l != "```toml")
            .skip(1)
            .take_while(|l| *l != "```")
            .map(|l| format!("{l}\n"))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("backup.toml");
        std::fs::write(&p, &example).unwrap();
        let c = BackupConfig::load(&p).unwrap();
        assert_eq!(c.stg, 7);
        assert_eq!(c.fallback, Policy::Preferred);
        assert_eq!(c.client.as_ref().unwrap().name, "web1");
        assert_eq!(c.rules().allowed.len(), 2);
        // Unknown keys and bad policies are errors that name the problem.
        std::fs::write(&p, format!("{example}\nstgg = 1\n")).unwrap();
        assert!(format!("{:#}", BackupConfig::load(&p).unwrap_err()).contains("stgg"));
        std::fs::write(&p, example.replace("\"preferred\"", "\"sometimes\"")).unwrap();
        assert!(BackupConfig::load(&p).is_err());
        // A missing STP configuration says which file.
        let e = BackupConfig::load(&p.with_file_name("none.toml")).unwrap_err();
        assert!(format!("{e:#}").contains("none.toml"), "{e:#}");
    }
}

/// Why an STG is unavailable, with its whole chain of causes in one line.
#[derive(Debug)]
struct Why(anyhow::Error);

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Why {}
