//! Storage Transport Groups (STGs) and the configuration file.
//!
//! An STG is a set of LUNs that every participating host can reach; frames
//! travel through it (`docs/PROTOCOL.md` §1). Its members are named by
//! identity — the NAA designator of VPD page 0x83, written `naa.<hex>` as
//! [`scsi::inquiry::Designator::to_id_string`] prints it — never by device
//! path, because the same LUN is `/dev/sg3` on one host and `/dev/sg7` on
//! another. [`Config::resolve`] maps the identities to this host's paths
//! through a [`LunDirectory`].
//!
//! Both hosts read the same configuration file (TOML, §5). [`Config::parse`]
//! and [`Config::load`] read it and [`Config::validate`] it, so a [`Config`]
//! they return is always valid. Unknown keys are errors, so a misspelt key
//! is reported instead of silently falling back to a default. Durations are
//! integer milliseconds and their keys end in `_ms`.
//!
//! # The configuration file
//!
//! A complete example, annotated (every key of `[tunables]` is optional and
//! shown with its default):
//!
//! ```toml
//! # The well-known port (WKP) of the backup service: control runs over TCP
//! # on `wkp`, the STG information exchange on `wkp + 1` (PROTOCOL.md §8).
//! # 1–65534.
//! wkp = 5100
//!
//! # Optional pre-shared key: 16–64 bytes as hex (`openssl rand -hex 32`).
//! # It is mixed into every connection's frame key (PROTOCOL.md §7) and
//! # authenticates the LAN peer; without it frame keys are still secret
//! # from SAN observers, but the peer is unauthenticated. Same on both hosts.
//! psk = "9f8e7d6c5b4a39281706f5e4d3c2b1a000112233445566778899aabbccddeeff"
//!
//! [tunables]
//! max_payload = 262144        # largest frame payload offered, bytes (1 B–1 MiB)
//! queue_frames = 1024         # frames a connection buffers per direction (its credit)
//! keepalive_ms = 5000         # an idle connection sends PING this often
//! dead_after_ms = 30000       # no authentic frame for this long: peer dead (> keepalive)
//! initial_rto_ms = 200        # first retransmission timeout (20–5000)
//! command_timeout_ms = 30000  # timeout of each SCSI command
//!
//! # One [[stg]] table per transport group. A LUN belongs to at most one STG.
//! [[stg]]
//! id = 7                      # the STG id (u32), the same on every host
//! mode = "vendor"             # the array routes frames itself (PROTOCOL.md §3)
//! # Members by NAA identity: `naa.` and 16 or 32 hex digits, in the same
//! # order on every host. `stp probe` lists the identities this host sees.
//! members = [
//!     "naa.6535450000000000535450534d494d00",
//!     "naa.6535450000000001535450534d494d00",
//! ]
//!
//! [[stg]]
//! id = 8
//! mode = "block"              # plain READ/WRITE on any shared LUN (PROTOCOL.md §4)
//! members = [
//!     "naa.6001405a1b2c3d4e5f60718293a4b5c6",
//!     "naa.6001405a1b2c3d4e5f60718293a4b5c7",
//!     "naa.5000c500a1b2c3d4",
//! ]
//! # The block layout `stp stg format` writes: required in block mode,
//! # forbidden in vendor mode. `slots` and `slot_blocks` may be left out:
//! # format then chooses them from the members' limits (1 MiB slots where
//! # the path carries them, a 16 MiB ring where the members hold it) and
//! # hosts take them from the superblock. Every member needs at least
//! # 1 + hosts * (hosts - 1) * (2 + slots * slot_blocks) blocks:
//! # 16389 here.
//! [stg.block]
//! hosts = 2                   # hosts sharing the STG (2–16)
//! slots = 64                  # slots per ring: one ring per ordered host pair
//! slot_blocks = 128           # blocks per slot
//! ```
//!
//! # Block layout
//!
//! [`BlockLayout`] computes where each lane lives on a block-mode member
//! (§4): block 0 is the superblock; then, for each ordered host pair
//! `(s, d)`, `s ≠ d`, in s-major order, a producer block, a consumer block
//! and `slots` slots of `slot_blocks` blocks each.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use scsi::inquiry::Identity;
use scsi::Transport;
use serde::{Deserialize, Serialize};

use crate::error::{MailboxError, SetupError};

/// The well-known port and the transport groups of a deployment, as read
/// from the configuration file (see the [module documentation](self)).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The well-known TCP port of the backup service (1–65534); the STG
    /// information exchange uses `wkp + 1`.
    pub wkp: u16,
    /// The transport groups (`[[stg]]` tables).
    #[serde(rename = "stg", default)]
    pub stgs: Vec<StgConfig>,
    /// Protocol tunables (`[tunables]`); defaults when absent.
    #[serde(default)]
    pub tunables: Tunables,
    /// The optional pre-shared key, as hex (16–64 bytes). See
    /// [`Config::psk_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
}

/// Keeps the pre-shared key out of logs.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("wkp", &self.wkp)
            .field("stgs", &self.stgs)
            .field("tunables", &self.tunables)
            .field("psk", &self.psk.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One transport group (`[[stg]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StgConfig {
    /// The STG id, the same on every host.
    pub id: u32,
    /// How frames travel through the members.
    pub mode: MailboxMode,
    /// Member identities, `naa.` followed by 16 or 32 lowercase hex digits,
    /// in the same order on every host.
    pub members: Vec<String>,
    /// The block layout (`[stg.block]`): required in block mode, forbidden
    /// in vendor mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockSpec>,
}

/// `[stg.block]`: the hosts sharing a block-mode STG and, optionally, its
/// layout. What is left out, `stp stg format` chooses from the members'
/// limits ([`crate::block::choose_layout`]); hosts that open the STG read
/// the layout from its superblocks either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    /// Hosts sharing the STG (2–16).
    pub hosts: u16,
    /// Slots per ring; chosen by format when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Blocks per slot; chosen by format when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_blocks: Option<u32>,
    /// Where each host hears its doorbell, `"ip:port"` (UDP), one per host
    /// in host index order: a host that sends after a quiet spell rings
    /// the receiver, which polls at once instead of at its idle interval
    /// (docs/PROTOCOL.md §4, Doorbell). Absent: no doorbells.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "doorbell_addrs"
    )]
    pub doorbells: Option<crate::block::Doorbells>,
}

/// `doorbells` as a list of `"ip:port"` strings.
mod doorbell_addrs {
    use std::net::SocketAddr;

    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::block::Doorbells;

    pub fn serialize<S: Serializer>(d: &Option<Doorbells>, s: S) -> Result<S::Ok, S::Error> {
        let list: Vec<String> = d
            .iter()
            .flat_map(|d| d.addrs())
            .map(|a| a.to_string())
            .collect();
        list.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Doorbells>, D::Error> {
        let list = Vec::<String>::deserialize(de)?;
        if list.len() > usize::from(super::MAX_HOSTS) {
            return Err(D::Error::custom(format!(
                "doorbells: {} addresses, at most {} (one per host)",
                list.len(),
                super::MAX_HOSTS
            )));
        }
        let addrs = list
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    D::Error::custom(format!(
                        "doorbells: '{a}' is not an IP address and UDP port (e.g. \"192.0.2.10:5190\")"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Doorbells::new(&addrs)))
    }
}

impl BlockSpec {
    /// The whole layout, when the configuration fixes it.
    pub fn layout(&self) -> Option<BlockLayout> {
        Some(BlockLayout {
            hosts: self.hosts,
            slots: self.slots?,
            slot_blocks: self.slot_blocks?,
        })
    }

    /// What [`crate::block::choose_layout`] is asked.
    pub fn request(&self) -> crate::block::LayoutRequest {
        crate::block::LayoutRequest {
            hosts: self.hosts,
            slots: self.slots,
            slot_blocks: self.slot_blocks,
        }
    }

    fn validate(&self, stg: u32) -> Result<(), ConfigError> {
        // The fields given are checked as a layout would be, with the
        // smallest sound value standing in for one left out.
        BlockLayout {
            hosts: self.hosts,
            slots: self.slots.unwrap_or(1),
            slot_blocks: self.slot_blocks.unwrap_or(1),
        }
        .validate(stg)?;
        if let Some(d) = &self.doorbells {
            let addrs = d.addrs();
            if addrs.len() != usize::from(self.hosts) {
                return Err(ConfigError::BadDoorbells {
                    stg,
                    reason: format!(
                        "{} addresses for {} hosts: give one per host, in host index order",
                        addrs.len(),
                        self.hosts
                    ),
                });
            }
            let distinct: HashSet<_> = addrs.iter().collect();
            if distinct.len() != addrs.len() {
                return Err(ConfigError::BadDoorbells {
                    stg,
                    reason: "an address given twice: each host hears its own".into(),
                });
            }
        }
        Ok(())
    }
}

impl From<BlockLayout> for BlockSpec {
    fn from(l: BlockLayout) -> BlockSpec {
        BlockSpec {
            hosts: l.hosts,
            slots: Some(l.slots),
            slot_blocks: Some(l.slot_blocks),
            doorbells: None,
        }
    }
}

/// How an STG carries frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailboxMode {
    /// The array routes frames between ports itself: vendor SEND and
    /// RECEIVE commands (`docs/PROTOCOL.md` §3). TOML: `"vendor"`.
    Vendor,
    /// Rings of slots on plain LBAs, polled by the receiver; works on any
    /// shared LUN (`docs/PROTOCOL.md` §4). TOML: `"block"`.
    Block,
}

impl fmt::Display for MailboxMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MailboxMode::Vendor => "vendor",
            MailboxMode::Block => "block",
        })
    }
}

/// The layout of every member of a block-mode STG (`[stg.block]`,
/// `docs/PROTOCOL.md` §4).
///
/// ```text
/// LBA 0         superblock
/// then, for each ordered pair (s, d), s ≠ d, s-major:
///   1 block     producer block (written by s)
///   1 block     consumer block (written by d)
///   S slots     `slot_blocks` blocks each (written by s)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockLayout {
    /// Hosts sharing the STG, 2–16; host indices are `0..hosts`.
    pub hosts: u16,
    /// Slots per ring `S` (one ring per ordered host pair), at least 1.
    pub slots: u32,
    /// Blocks per slot, at least 1.
    pub slot_blocks: u32,
}

/// The smallest number of hosts a block layout serves.
pub const MIN_HOSTS: u16 = 2;
/// The largest number of hosts a block layout serves.
pub const MAX_HOSTS: u16 = 16;

impl BlockLayout {
    /// Blocks of one lane (one ordered host pair): the producer block, the
    /// consumer block and the ring, `2 + slots * slot_blocks`.
    pub fn lane_blocks(&self) -> u64 {
        2 + u64::from(self.slots) * u64::from(self.slot_blocks)
    }

    /// Ordered host pairs, `hosts * (hosts - 1)`.
    pub fn pairs(&self) -> u64 {
        let h = u64::from(self.hosts);
        h * h.saturating_sub(1)
    }

    /// Blocks every member needs: the superblock and one lane per ordered
    /// host pair, `1 + hosts * (hosts - 1) * (2 + slots * slot_blocks)`.
    /// Saturates at `u64::MAX` for layouts [`Config::validate`] rejects.
    pub fn required_blocks(&self) -> u64 {
        self.checked_required_blocks().unwrap_or(u64::MAX)
    }

    /// [`required_blocks`](Self::required_blocks), `None` on overflow.
    fn checked_required_blocks(&self) -> Option<u64> {
        self.pairs().checked_mul(self.lane_blocks())?.checked_add(1)
    }

    /// The LBA of the producer block of the lane carrying frames from host
    /// `src` to host `dst`; the consumer block follows it and slot `i` starts
    /// at `lane_offset + 2 + i * slot_blocks`. `None` when `src == dst` or
    /// either index is not below `hosts`.
    ///
    /// Lanes are in s-major order skipping `s == d`: with 3 hosts the order
    /// is (0,1), (0,2), (1,0), (1,2), (2,0), (2,1).
    pub fn lane_offset(&self, src: u16, dst: u16) -> Option<u64> {
        if src == dst || src >= self.hosts || dst >= self.hosts {
            return None;
        }
        let skip = if dst > src { dst - 1 } else { dst };
        let index = u64::from(src) * u64::from(self.hosts - 1) + u64::from(skip);
        index.checked_mul(self.lane_blocks())?.checked_add(1)
    }

    /// The LBA of the first block of slot `slot` (`< slots`) of the lane
    /// from `src` to `dst`; `None` if the lane or the slot does not exist.
    pub fn slot_offset(&self, src: u16, dst: u16, slot: u32) -> Option<u64> {
        if slot >= self.slots {
            return None;
        }
        let within = 2 + u64::from(slot) * u64::from(self.slot_blocks);
        self.lane_offset(src, dst)?.checked_add(within)
    }

    /// The first out-of-range field, as (field, value, what is allowed):
    /// hosts 2–16, at least one slot of at least one block, and a layout
    /// whose size fits in 64 bits. `None` when the layout is sound.
    pub fn problem(&self) -> Option<(&'static str, u64, &'static str)> {
        if !(MIN_HOSTS..=MAX_HOSTS).contains(&self.hosts) {
            return Some(("hosts", self.hosts.into(), "must be 2–16"));
        }
        if self.slots == 0 {
            return Some(("slots", 0, "must be at least 1"));
        }
        if self.slot_blocks == 0 {
            return Some(("slot_blocks", 0, "must be at least 1"));
        }
        if self.checked_required_blocks().is_none() {
            return Some((
                "slot_blocks",
                self.slot_blocks.into(),
                "makes the layout larger than 2^64 blocks; reduce slots or slot_blocks",
            ));
        }
        None
    }

    fn validate(&self, stg: u32) -> Result<(), ConfigError> {
        match self.problem() {
            Some((field, value, reason)) => Err(ConfigError::BadBlockLayout {
                stg,
                field,
                value,
                reason,
            }),
            None => Ok(()),
        }
    }
}

/// Protocol tunables (`[tunables]`). Every key is optional; see
/// [`Tunables::default`] for the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tunables {
    /// The largest frame payload a connection offers in its handshake, in
    /// bytes (1 to [`crate::wire::MAX_PAYLOAD`]). TOML: `max_payload`.
    pub max_payload: u32,
    /// Frames a connection buffers per direction, which bounds the credit
    /// it grants (at least 1). TOML: `queue_frames`.
    pub queue_frames: u32,
    /// An idle connection sends `PING` this often. TOML: `keepalive_ms`.
    #[serde(rename = "keepalive_ms", with = "millis")]
    pub keepalive: Duration,
    /// With no authentic frame from the peer for this long, the connection
    /// fails as "peer dead"; longer than `keepalive`. TOML: `dead_after_ms`.
    #[serde(rename = "dead_after_ms", with = "millis")]
    pub dead_after: Duration,
    /// The first retransmission timeout, 20 ms–5 s (the range the adapted
    /// RTO is clamped to, §6.4). TOML: `initial_rto_ms`.
    #[serde(rename = "initial_rto_ms", with = "millis")]
    pub initial_rto: Duration,
    /// The timeout of each SCSI command. TOML: `command_timeout_ms`.
    #[serde(rename = "command_timeout_ms", with = "millis")]
    pub command_timeout: Duration,
}

impl Default for Tunables {
    /// 256 KiB payloads, 1024 frames, keepalive 5 s, dead after 30 s,
    /// initial RTO 200 ms, SCSI command timeout 30 s.
    fn default() -> Tunables {
        Tunables {
            max_payload: 256 * 1024,
            queue_frames: 1024,
            keepalive: Duration::from_secs(5),
            dead_after: Duration::from_secs(30),
            initial_rto: Duration::from_millis(200),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// The range of the initial retransmission timeout (§6.4's clamp).
const RTO_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(20)..=Duration::from_secs(5);

impl Tunables {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: u64, reason: String| ConfigError::BadTunable {
            field,
            value,
            reason,
        };
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        if self.max_payload == 0 || self.max_payload > crate::wire::MAX_PAYLOAD {
            return Err(bad(
                "max_payload",
                self.max_payload.into(),
                format!("must be 1–{} bytes", crate::wire::MAX_PAYLOAD),
            ));
        }
        if self.queue_frames == 0 {
            return Err(bad("queue_frames", 0, "must be at least 1".into()));
        }
        if self.keepalive.is_zero() {
            return Err(bad("keepalive_ms", 0, "must be at least 1".into()));
        }
        if self.dead_after <= self.keepalive {
            return Err(bad(
                "dead_after_ms",
                ms(self.dead_after),
                format!(
                    "must be longer than keepalive_ms ({}), or an idle peer is declared dead \
                     before it is pinged",
                    ms(self.keepalive)
                ),
            ));
        }
        if !RTO_RANGE.contains(&self.initial_rto) {
            return Err(bad(
                "initial_rto_ms",
                ms(self.initial_rto),
                "must be 20–5000".into(),
            ));
        }
        if self.command_timeout.is_zero() {
            return Err(bad("command_timeout_ms", 0, "must be at least 1".into()));
        }
        Ok(())
    }
}

/// Durations as integer milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Why a configuration could not be read, validated or resolved. Every
/// message names the offending STG, member or key and says what to do.
#[non_exhaustive]
#[derive(thiserror::Error, Debug)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or does not fit the schema (unknown or
    /// missing key, wrong type).
    #[error("{}", syntax_message(.file, .line, .column, .line_text, .message))]
    Syntax {
        /// The file, when read by [`Config::load`].
        file: Option<PathBuf>,
        /// The 1-based line of the error, when TOML located it.
        line: Option<usize>,
        /// The 1-based column (in characters) of the error.
        column: Option<usize>,
        /// The text of that line (a `psk` line is redacted).
        line_text: Option<String>,
        /// TOML's description of the error.
        message: String,
    },
    /// The well-known port is 0 or 65535.
    #[error(
        "wkp = {wkp} is out of range: the well-known port must be 1–65534 \
         (control uses wkp and the STG information exchange wkp + 1)"
    )]
    BadWkp {
        /// The configured port.
        wkp: u16,
    },
    /// Two `[[stg]]` tables have the same id.
    #[error("STG id {stg} is configured twice; give each [[stg]] table its own id")]
    DuplicateStgId {
        /// The repeated id.
        stg: u32,
    },
    /// An STG lists no members.
    #[error("STG {stg} has no members; list at least one LUN in `members` (see `stp probe`)")]
    NoMembers {
        /// The STG.
        stg: u32,
    },
    /// A member is not `naa.` followed by 16 or 32 hex digits.
    #[error(
        "STG {stg}: member {member:?} is not an NAA identity; write `naa.` followed by 16 or \
         32 hex digits, as `stp probe` prints it"
    )]
    BadMember {
        /// The STG.
        stg: u32,
        /// The member as written.
        member: String,
    },
    /// A member appears twice in one STG.
    #[error("STG {stg}: member {member} is listed twice; list each LUN once")]
    DuplicateMember {
        /// The STG.
        stg: u32,
        /// The repeated member.
        member: String,
    },
    /// A member appears in two STGs.
    #[error(
        "member {member} is in both STG {first} and STG {second}; a LUN can belong to one \
         STG only — remove it from one of them"
    )]
    MemberInTwoStgs {
        /// The member.
        member: String,
        /// The first STG listing it.
        first: u32,
        /// The second STG listing it.
        second: u32,
    },
    /// A block-mode STG has no `[stg.block]` table.
    #[error(
        "STG {stg} is in block mode but has no [stg.block] table; add one with hosts, slots \
         and slot_blocks"
    )]
    MissingBlockLayout {
        /// The STG.
        stg: u32,
    },
    /// A vendor-mode STG has a `[stg.block]` table.
    #[error(
        "STG {stg} is in vendor mode but has a [stg.block] table; remove it, or set \
         mode = \"block\""
    )]
    UnexpectedBlockLayout {
        /// The STG.
        stg: u32,
    },
    /// A field of `[stg.block]` is out of range.
    #[error("STG {stg}: [stg.block] {field} = {value} is invalid: {reason}")]
    BadBlockLayout {
        /// The STG.
        stg: u32,
        /// The key: `hosts`, `slots` or `slot_blocks`.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What the value must be.
        reason: &'static str,
    },
    /// `[stg.block] doorbells` does not give one address per host.
    #[error("STG {stg}: [stg.block] doorbells is invalid: {reason}")]
    BadDoorbells {
        /// The STG.
        stg: u32,
        /// What is wrong.
        reason: String,
    },
    /// The pre-shared key is not 16–64 bytes of hex. The key itself is never
    /// part of the message.
    #[error("psk is invalid: {reason}; give 16–64 bytes as hex (e.g. `openssl rand -hex 32`)")]
    BadPsk {
        /// What is wrong with it.
        reason: String,
    },
    /// A tunable is out of range.
    #[error("[tunables] {field} = {value} is invalid: {reason}")]
    BadTunable {
        /// The TOML key.
        field: &'static str,
        /// Its value (durations in milliseconds).
        value: u64,
        /// What the value must be.
        reason: String,
    },
    /// [`Config::resolve`] was asked for an STG the configuration lacks.
    #[error("no STG {stg} in the configuration (configured: {})", id_list(.configured))]
    UnknownStg {
        /// The id asked for.
        stg: u32,
        /// The ids configured.
        configured: Vec<u32>,
    },
    /// A member is not visible on this host.
    #[error(
        "STG {stg}: member {member} is not visible on this host; run `stp probe` to list the \
         LUNs this host sees, and check zoning and LUN masking"
    )]
    MemberMissing {
        /// The STG.
        stg: u32,
        /// The member.
        member: String,
    },
    /// Members of one STG have different logical block sizes.
    #[error(
        "STG {stg}: member {member} ({path}) has {block_size}-byte blocks but {first} has \
         {expected}-byte blocks; all members of an STG must have the same block size"
    )]
    BlockSizeMismatch {
        /// The STG.
        stg: u32,
        /// The member that differs.
        member: String,
        /// Its path on this host.
        path: String,
        /// Its block size.
        block_size: u32,
        /// The first member, whose block size the others must match.
        first: String,
        /// The first member's block size.
        expected: u32,
    },
    /// A block-mode member is smaller than the block layout.
    #[error(
        "STG {stg}: member {member} ({path}) has {present} blocks but the block layout \
         (hosts = {hosts}, slots = {slots}, slot_blocks = {slot_blocks}) needs {needed}; \
         use a larger LUN or reduce slots or slot_blocks"
    )]
    MemberTooSmall {
        /// The STG.
        stg: u32,
        /// The member.
        member: String,
        /// Its path on this host.
        path: String,
        /// Blocks the layout needs.
        needed: u64,
        /// Blocks the member has.
        present: u64,
        /// The layout's `hosts`.
        hosts: u16,
        /// The layout's `slots`.
        slots: u32,
        /// The layout's `slot_blocks`.
        slot_blocks: u32,
    },
}

fn syntax_message(
    file: &Option<PathBuf>,
    line: &Option<usize>,
    column: &Option<usize>,
    line_text: &Option<String>,
    message: &str,
) -> String {
    let mut s = String::from("configuration error");
    if let Some(file) = file {
        s.push_str(&format!(" in {}", file.display()));
    }
    match (line, column) {
        (Some(line), Some(column)) => s.push_str(&format!(" at line {line}, column {column}")),
        (Some(line), None) => s.push_str(&format!(" at line {line}")),
        _ => {}
    }
    s.push_str(": ");
    s.push_str(message);
    if let (Some(line), Some(text)) = (line, line_text) {
        s.push_str(&format!(" (line {line}: `{}`)", text.trim()));
    }
    s.push_str("; the file format is documented in stp_core::stg");
    s
}

fn id_list(ids: &[u32]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turns a TOML error into [`ConfigError::Syntax`], locating it in `text`.
fn syntax_error(text: &str, err: &toml::de::Error, file: Option<PathBuf>) -> ConfigError {
    let located = err.span().and_then(|span| {
        let before = text.get(..span.start)?;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let line = before.matches('\n').count() + 1;
        let column = before[line_start..].chars().count() + 1;
        let mut line_text = text[line_start..].lines().next().unwrap_or("").to_string();
        if line_text.trim_start().starts_with("psk") {
            line_text = "psk = <redacted>".into();
        }
        Some((line, column, line_text))
    });
    ConfigError::Syntax {
        file,
        line: located.as_ref().map(|l| l.0),
        column: located.as_ref().map(|l| l.1),
        line_text: located.map(|l| l.2),
        message: err
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Bytes a pre-shared key may have.
const PSK_BYTES: std::ops::RangeInclusive<usize> = 16..=64;

/// Decodes a hex pre-shared key; the error never contains the key.
fn decode_psk(psk: &str) -> Result<Vec<u8>, ConfigError> {
    let bad = |reason: String| ConfigError::BadPsk { reason };
    if let Some(at) = psk.chars().position(|c| !c.is_ascii_hexdigit()) {
        return Err(bad(format!("character {} is not a hex digit", at + 1)));
    }
    if psk.len() % 2 != 0 {
        return Err(bad(format!(
            "it has an odd number of hex digits ({})",
            psk.len()
        )));
    }
    let bytes: Vec<u8> = psk
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            // Both are ASCII hex digits, checked above.
            let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            (digit(pair[0]) << 4) | digit(pair[1])
        })
        .collect();
    if !PSK_BYTES.contains(&bytes.len()) {
        return Err(bad(format!("it is {} bytes", bytes.len())));
    }
    Ok(bytes)
}

/// Whether `member` is `naa.` followed by 16 or 32 lowercase hex digits.
fn is_naa_id(member: &str) -> bool {
    member.strip_prefix("naa.").is_some_and(|hex| {
        matches!(hex.len(), 16 | 32)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl Config {
    /// Parses and validates a configuration (see the [module
    /// documentation](self) for the format). Member identities are
    /// lowercased before validation.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_in(text, None)
    }

    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse_in(&text, Some(path.to_path_buf()))
    }

    fn parse_in(text: &str, file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| syntax_error(text, &e, file))?;
        for stg in &mut config.stgs {
            for member in &mut stg.members {
                member.make_ascii_lowercase();
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the configuration, returning the first problem found: the
    /// well-known port, the pre-shared key, the tunables, then each STG
    /// (unique id, members present, well-formed, listed once and in no
    /// other STG, the block layout present exactly in block mode and in
    /// range).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.wkp == 0 || self.wkp == u16::MAX {
            return Err(ConfigError::BadWkp { wkp: self.wkp });
        }
        if let Some(psk) = &self.psk {
            decode_psk(psk)?;
        }
        self.tunables.validate()?;
        let mut ids = HashSet::new();
        let mut owners: HashMap<&str, u32> = HashMap::new();
        for stg in &self.stgs {
            if !ids.insert(stg.id) {
                return Err(ConfigError::DuplicateStgId { stg: stg.id });
            }
            if stg.members.is_empty() {
                return Err(ConfigError::NoMembers { stg: stg.id });
            }
            for member in &stg.members {
                if !is_naa_id(member) {
                    return Err(ConfigError::BadMember {
                        stg: stg.id,
                        member: member.clone(),
                    });
                }
                match owners.insert(member, stg.id) {
                    None => {}
                    Some(first) if first == stg.id => {
                        return Err(ConfigError::DuplicateMember {
                            stg: stg.id,
                            member: member.clone(),
                        });
                    }
                    Some(first) => {
                        return Err(ConfigError::MemberInTwoStgs {
                            member: member.clone(),
                            first,
                            second: stg.id,
                        });
                    }
                }
            }
            match (stg.mode, &stg.block) {
                (MailboxMode::Block, None) => {
                    return Err(ConfigError::MissingBlockLayout { stg: stg.id });
                }
                (MailboxMode::Vendor, Some(_)) => {
                    return Err(ConfigError::UnexpectedBlockLayout { stg: stg.id });
                }
                (MailboxMode::Block, Some(layout)) => layout.validate(stg.id)?,
                (MailboxMode::Vendor, None) => {}
            }
        }
        Ok(())
    }

    /// The STG with id `id`.
    pub fn stg(&self, id: u32) -> Option<&StgConfig> {
        self.stgs.iter().find(|s| s.id == id)
    }

    /// The pre-shared key's bytes, `None` when none is configured.
    pub fn psk_bytes(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        self.psk.as_deref().map(decode_psk).transpose()
    }

    /// Maps STG `stg_id`'s members to this host's devices through `dir`.
    ///
    /// Validates the configuration first. Then every member must be visible,
    /// all members must have the first member's block size, and in block
    /// mode each must hold at least [`BlockLayout::required_blocks`] blocks.
    pub fn resolve(&self, stg_id: u32, dir: &dyn LunDirectory) -> Result<ResolvedStg, ConfigError> {
        self.validate()?;
        let stg = self.stg(stg_id).ok_or_else(|| ConfigError::UnknownStg {
            stg: stg_id,
            configured: self.stgs.iter().map(|s| s.id).collect(),
        })?;
        let mut members: Vec<ResolvedMember> = Vec::with_capacity(stg.members.len());
        for naa in &stg.members {
            let info = dir.find(naa).ok_or_else(|| ConfigError::MemberMissing {
                stg: stg.id,
                member: naa.clone(),
            })?;
            if let Some(first) = members.first() {
                if info.block_size != first.block_size {
                    return Err(ConfigError::BlockSizeMismatch {
                        stg: stg.id,
                        member: naa.clone(),
                        path: info.path,
                        block_size: info.block_size,
                        first: first.naa.clone(),
                        expected: first.block_size,
                    });
                }
            }
            if let Some(layout) = stg.block.as_ref().and_then(BlockSpec::layout) {
                let needed = layout.required_blocks();
                if info.blocks < needed {
                    return Err(ConfigError::MemberTooSmall {
                        stg: stg.id,
                        member: naa.clone(),
                        path: info.path,
                        needed,
                        present: info.blocks,
                        hosts: layout.hosts,
                        slots: layout.slots,
                        slot_blocks: layout.slot_blocks,
                    });
                }
            }
            members.push(ResolvedMember {
                naa: naa.clone(),
                path: info.path,
                other_paths: info.other_paths,
                blocks: info.blocks,
                block_size: info.block_size,
            });
        }
        Ok(ResolvedStg {
            id: stg.id,
            mode: stg.mode,
            block: stg.block,
            members,
        })
    }
}

/// What this host knows about one logical unit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LunInfo {
    /// Its device path on this host, e.g. `/dev/sg3`.
    pub path: String,
    /// Further paths to the same unit (the same NAA through other target
    /// ports or host adapters), e.g. `/dev/sg7`: with any, a member is
    /// opened as a [`Multipath`](crate::multipath::Multipath).
    pub other_paths: Vec<String>,
    /// Its capacity in logical blocks.
    pub blocks: u64,
    /// Its logical block size in bytes.
    pub block_size: u32,
}

/// The logical units this host can reach, by identity.
pub trait LunDirectory {
    /// The unit whose identity is `naa` (`naa.<lowercase hex>`, as
    /// [`scsi::inquiry::Designator::to_id_string`] prints it), if this host
    /// sees it.
    fn find(&self, naa: &str) -> Option<LunInfo>;
}

/// A [`LunDirectory`] held in a map from identity to unit: built by probing
/// (see [`MapDirectory::insert_identified`]), by tests, or from the
/// simulated array. Lookups ignore ASCII case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapDirectory(pub HashMap<String, LunInfo>);

impl MapDirectory {
    /// An empty directory.
    pub fn new() -> MapDirectory {
        MapDirectory::default()
    }

    /// Adds (or replaces) the unit with identity `naa`, lowercased;
    /// returns the unit it replaced.
    pub fn insert(&mut self, naa: impl Into<String>, info: LunInfo) -> Option<LunInfo> {
        let mut naa = naa.into();
        naa.make_ascii_lowercase();
        self.0.insert(naa, info)
    }

    /// Adds the unit `identity` describes under its NAA designator (the
    /// logical unit's, as [`Identity::naa`] finds it) and returns that
    /// identity; `None`, and nothing added, if it has no NAA designator.
    ///
    /// A unit already present under that identity is another path to it:
    /// `info`'s paths are added to its [`LunInfo::other_paths`] instead.
    pub fn insert_identified(&mut self, identity: &Identity, info: LunInfo) -> Option<String> {
        let naa = identity.naa()?.to_id_string();
        match self.0.get_mut(&naa) {
            Some(known) => {
                for path in std::iter::once(info.path).chain(info.other_paths) {
                    if known.path != path && !known.other_paths.contains(&path) {
                        known.other_paths.push(path);
                    }
                }
            }
            None => {
                self.insert(naa.clone(), info);
            }
        }
        Some(naa)
    }
}

impl FromIterator<(String, LunInfo)> for MapDirectory {
    fn from_iter<I: IntoIterator<Item = (String, LunInfo)>>(iter: I) -> MapDirectory {
        let mut dir = MapDirectory::new();
        for (naa, info) in iter {
            dir.insert(naa, info);
        }
        dir
    }
}

impl LunDirectory for MapDirectory {
    fn find(&self, naa: &str) -> Option<LunInfo> {
        self.0
            .get(naa)
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(naa))
                    .map(|(_, info)| info)
            })
            .cloned()
    }
}

/// One member of a resolved STG.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResolvedMember {
    /// Its identity, `naa.<hex>`.
    pub naa: String,
    /// Its device path on this host.
    pub path: String,
    /// Its further paths on this host (see [`LunInfo::other_paths`]).
    pub other_paths: Vec<String>,
    /// Its capacity in blocks.
    pub blocks: u64,
    /// Its block size in bytes (the same for every member).
    pub block_size: u32,
}

/// An STG mapped to this host's devices by [`Config::resolve`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResolvedStg {
    /// The STG id.
    pub id: u32,
    /// How frames travel through it.
    pub mode: MailboxMode,
    /// The block layout as configured (block mode only).
    pub block: Option<BlockSpec>,
    /// The members, in configuration order (member index order).
    pub members: Vec<ResolvedMember>,
}

impl ResolvedStg {
    /// The members' device paths, in member index order.
    pub fn paths(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.path.as_str()).collect()
    }

    /// The members' common block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.members.first().map_or(0, |m| m.block_size)
    }

    /// Bytes per slot in block mode (`slot_blocks * block_size`): the most
    /// frame data, count included, one slot can carry. `None` in vendor
    /// mode and when `stp stg format` chooses the slot size.
    pub fn slot_bytes(&self) -> Option<u64> {
        self.block
            .and_then(|b| b.slot_blocks)
            .map(|n| u64::from(n) * u64::from(self.block_size()))
    }
}

// ---------------------------------------------------------------------------
// Opening an STG: configuration → members → paths → mailbox
// ---------------------------------------------------------------------------

/// How [`open`] reaches a member's device node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PathEngine {
    /// The process's shared io_uring engine for the device
    /// ([`scsi::EnginePool::global`]), falling back to synchronous `SG_IO`
    /// where io_uring cannot drive it.
    #[default]
    Shared,
    /// Synchronous `SG_IO` only.
    Sync,
}

/// What [`open`] and [`open_with`] need beyond the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// This host's index in a block-mode STG (each host is given its own
    /// when it starts; unused in vendor mode).
    pub host_index: u16,
    /// Block-mode tunables.
    pub block: crate::block::BlockConfig,
    /// How device nodes are opened.
    pub engine: PathEngine,
}

impl OpenOptions {
    /// The defaults, as host `host_index` (block mode).
    pub fn host(host_index: u16) -> OpenOptions {
        OpenOptions {
            host_index,
            ..OpenOptions::default()
        }
    }

    /// With the given way of opening device nodes.
    pub fn with_engine(mut self, engine: PathEngine) -> OpenOptions {
        self.engine = engine;
        self
    }

    /// With the given block-mode tunables.
    pub fn with_block(mut self, block: crate::block::BlockConfig) -> OpenOptions {
        self.block = block;
        self
    }
}

/// Opens STG `stg_id` of `config` on this host, the one way every
/// application opens one: resolves its members to this host's device nodes
/// through `dir` ([`Config::resolve`]), and returns the source of its
/// mailboxes. In vendor mode each [`PathSource::open`](crate::stream::PathSource::open)
/// opens the member paths afresh ([`PathEngine`]) and a
/// [`VendorMailbox`](crate::mailbox::VendorMailbox) over them; in block
/// mode the STG is opened here, once, as host `options.host_index`
/// ([`BlockStg`](crate::block::BlockStg)), and each open is a handle onto it.
pub fn open(
    config: &Config,
    stg_id: u32,
    dir: &dyn LunDirectory,
    options: &OpenOptions,
) -> Result<Arc<dyn crate::stream::PathSource>, MailboxError> {
    let resolved = config.resolve(stg_id, dir)?;
    let members: Vec<ResolvedMember> = resolved.members.clone();
    let engine = options.engine;
    let stg = resolved.id;
    // The configuration's doorbells, unless the caller gave its own.
    let mut options = *options;
    if options.block.doorbells.is_none() {
        options.block.doorbells = resolved.block.and_then(|b| b.doorbells);
    }
    open_members(resolved.mode, stg, members.len(), &options, move |member| {
        open_member(&members[member], engine, stg, member)
    })
}

/// Opens one member on every path this host has to it: the device node
/// itself when there is one, a [`Multipath`](crate::multipath::Multipath)
/// over all of them otherwise.
pub fn open_member(
    m: &ResolvedMember,
    engine: PathEngine,
    stg: u32,
    member: usize,
) -> Result<Box<dyn Transport>, MailboxError> {
    let first = open_device(std::path::Path::new(&m.path), engine, stg, member)?;
    if m.other_paths.is_empty() {
        return Ok(first);
    }
    let mut paths = vec![first];
    for p in &m.other_paths {
        // A path that cannot be opened is left out; the member is usable
        // while one path is.
        match open_device(std::path::Path::new(p), engine, stg, member) {
            Ok(t) => paths.push(t),
            Err(e) => tracing::warn!(path = %p, "path to member {member} not opened: {e}"),
        }
    }
    crate::multipath::Multipath::open(paths, crate::retry::RetryPolicy::MAILBOX)
        .map(|m| Box::new(m) as Box<dyn Transport>)
        .map_err(|source| {
            SetupError::OpenPath {
                stg,
                member,
                source,
            }
            .into()
        })
}

/// Opens one member's device node as `engine` says.
fn open_device(
    path: &std::path::Path,
    engine: PathEngine,
    stg: u32,
    member: usize,
) -> Result<Box<dyn Transport>, MailboxError> {
    let opened = match engine {
        PathEngine::Shared => scsi::EnginePool::global().open(path).map(|b| {
            tracing::info!(path = %path.display(), engine = %b.engine, "SCSI engine: {}", b.reason);
            b.transport
        }),
        PathEngine::Sync => {
            scsi::sg::SgDevice::open(path).map(|d| Box::new(d) as Box<dyn Transport>)
        }
    };
    opened.map_err(|source| {
        SetupError::OpenDevice {
            stg,
            member,
            source,
        }
        .into()
    })
}

/// The raw paths to STG `stg_id`'s members on this host, in member order,
/// with what resolving found: for tools that read or write the members'
/// blocks themselves (formatting, status), not frames.
pub fn open_member_paths(
    config: &Config,
    stg_id: u32,
    dir: &dyn LunDirectory,
    engine: PathEngine,
) -> Result<(ResolvedStg, Vec<Box<dyn Transport>>), MailboxError> {
    let resolved = config.resolve(stg_id, dir)?;
    let paths = resolved
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| open_member(m, engine, resolved.id, i))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((resolved, paths))
}

/// Every path to one member, each its own transport.
pub type PathSet = Vec<Box<dyn Transport>>;

/// Every path to each of STG `stg_id`'s members, opened separately (not
/// as one [`Multipath`](crate::multipath::Multipath)): for work that must
/// be done on each I_T nexus, such as registering a reservation key
/// ([`crate::fence`]). `result.1[i]` holds member `i`'s paths, the
/// directory's first path first.
pub fn open_member_path_sets(
    config: &Config,
    stg_id: u32,
    dir: &dyn LunDirectory,
    engine: PathEngine,
) -> Result<(ResolvedStg, Vec<PathSet>), MailboxError> {
    let resolved = config.resolve(stg_id, dir)?;
    let sets = resolved
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            std::iter::once(&m.path)
                .chain(&m.other_paths)
                .map(|p| open_device(std::path::Path::new(p), engine, resolved.id, i))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((resolved, sets))
}

/// As [`open`], for paths the caller supplies (an in-process array, a
/// fault injector, a test): `open_member(i)` opens a path to member `i` of
/// the `members` members of STG `stg`, in member order.
pub fn open_with(
    mode: MailboxMode,
    stg: u32,
    members: usize,
    options: &OpenOptions,
    open_member: impl Fn(usize) -> std::io::Result<Box<dyn Transport>> + Send + Sync + 'static,
) -> Result<Arc<dyn crate::stream::PathSource>, MailboxError> {
    open_members(mode, stg, members, options, move |member| {
        open_member(member).map_err(|source| {
            SetupError::OpenPath {
                stg,
                member,
                source,
            }
            .into()
        })
    })
}

fn open_members(
    mode: MailboxMode,
    stg: u32,
    members: usize,
    options: &OpenOptions,
    open_member: impl Fn(usize) -> Result<Box<dyn Transport>, MailboxError> + Send + Sync + 'static,
) -> Result<Arc<dyn crate::stream::PathSource>, MailboxError> {
    if members == 0 {
        return Err(SetupError::NoPaths.into());
    }
    match mode {
        MailboxMode::Vendor => Ok(Arc::new(
            move || -> Result<Box<dyn crate::mailbox::Mailbox>, MailboxError> {
                let paths = (0..members)
                    .map(&open_member)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Box::new(crate::mailbox::VendorMailbox::new(paths)?))
            },
        )),
        MailboxMode::Block => {
            let paths = (0..members)
                .map(&open_member)
                .collect::<Result<Vec<_>, _>>()?;
            let block =
                crate::block::BlockStg::open_with(paths, options.host_index, stg, options.block)?;
            Ok(block_source(block))
        }
    }
}

/// The source of mailboxes onto an open block-mode STG: each open is a
/// new handle ([`BlockStg::handle`](crate::block::BlockStg::handle)).
pub fn block_source(stg: Arc<crate::block::BlockStg>) -> Arc<dyn crate::stream::PathSource> {
    Arc::new(
        move || -> Result<Box<dyn crate::mailbox::Mailbox>, MailboxError> {
            Ok(Box::new(stg.handle()))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use scsi::inquiry::{Designator, StandardInquiry};

    /// The example of the module documentation, extracted from this file's
    /// source so the test parses exactly what the documentation shows.
    fn doc_example() -> String {
        let source = include_str!("stg.rs");
        let mut lines = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| l.strip_prefix("//!").unwrap_or(l))
            .map(|l| l.strip_prefix(' ').unwrap_or(l))
            .skip_while(|l| *l != "```toml")
            .skip(1);
        let mut example = String::new();
        for line in lines.by_ref() {
            if line == "```" {
                return example;
            }
            example.push_str(line);
            example.push('\n');
        }
        panic!("no ```toml block in the module documentation");
    }

    const A: &str = "naa.6001405aaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "naa.6001405bbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "naa.5000c50000000001";

    fn block_config() -> Config {
        Config {
            wkp: 5100,
            stgs: vec![StgConfig {
                id: 9,
                mode: MailboxMode::Block,
                members: vec![A.into(), B.into(), C.into()],
                block: Some(
                    BlockLayout {
                        hosts: 2,
                        slots: 64,
                        slot_blocks: 128,
                    }
                    .into(),
                ),
            }],
            tunables: Tunables::default(),
            psk: None,
        }
    }

    fn vendor_config() -> Config {
        let mut config = block_config();
        config.stgs[0].mode = MailboxMode::Vendor;
        config.stgs[0].block = None;
        config
    }

    fn lun(path: &str, blocks: u64, block_size: u32) -> LunInfo {
        LunInfo {
            path: path.into(),
            other_paths: Vec::new(),
            blocks,
            block_size,
        }
    }

    fn full_dir() -> MapDirectory {
        [
            (A, lun("/dev/sg3", 20_000, 512)),
            (B, lun("/dev/sg7", 16_389, 512)),
            (C, lun("/dev/sg1", 1 << 30, 512)),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_string(), l))
        .collect()
    }

    fn parse_err(text: &str) -> ConfigError {
        match Config::parse(text) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e,
        }
    }

    fn validate_err(config: &Config) -> ConfigError {
        config.validate().expect_err("expected a validation error")
    }

    fn assert_mentions(err: &ConfigError, words: &[&str]) {
        let msg = err.to_string();
        for w in words {
            assert!(msg.contains(w), "{msg:?} does not mention {w:?}");
        }
    }

    // ---- the example and parsing ----

    #[test]
    fn documented_example_parses() {
        let text = doc_example();
        assert!(text.contains("[stg.block]"), "{text}");
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.wkp, 5100);
        assert_eq!(config.tunables, Tunables::default());
        assert_eq!(config.stgs.len(), 2);
        let vendor = config.stg(7).unwrap();
        assert_eq!(vendor.mode, MailboxMode::Vendor);
        assert_eq!(vendor.members.len(), 2);
        assert_eq!(vendor.block, None);
        let block = config.stg(8).unwrap();
        assert_eq!(block.mode, MailboxMode::Block);
        assert_eq!(block.members[2], "naa.5000c500a1b2c3d4");
        let layout = block.block.unwrap().layout().unwrap();
        assert_eq!(
            layout,
            BlockLayout {
                hosts: 2,
                slots: 64,
                slot_blocks: 128
            }
        );
        // The documentation's stated size is right.
        assert_eq!(layout.required_blocks(), 16389);
        assert_eq!(config.psk_bytes().unwrap().unwrap().len(), 32);
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let config = Config::parse(&format!(
            "wkp = 4000\n[[stg]]\nid = 1\nmode = \"vendor\"\nmembers = [\"{A}\"]\n"
        ))
        .unwrap();
        assert_eq!(config.tunables, Tunables::default());
        assert_eq!(config.tunables.max_payload, 256 * 1024);
        assert_eq!(config.tunables.queue_frames, 1024);
        assert_eq!(config.tunables.keepalive, Duration::from_secs(5));
        assert_eq!(config.tunables.dead_after, Duration::from_secs(30));
        assert_eq!(config.tunables.initial_rto, Duration::from_millis(200));
        assert_eq!(config.tunables.command_timeout, Duration::from_secs(30));
        assert_eq!(config.psk, None);
        assert_eq!(config.psk_bytes().unwrap(), None);
        assert!(config.stg(2).is_none());
    }

    #[test]
    fn tunables_in_milliseconds_and_partial() {
        let config =
            Config::parse("wkp = 1\n[tunables]\nkeepalive_ms = 1500\nqueue_frames = 8\n").unwrap();
        assert_eq!(config.tunables.keepalive, Duration::from_millis(1500));
        assert_eq!(config.tunables.queue_frames, 8);
        assert_eq!(config.tunables.dead_after, Duration::from_secs(30));
        assert!(config.stgs.is_empty());
    }

    #[test]
    fn members_are_lowercased_on_parse() {
        let config = Config::parse(&format!(
            "wkp = 4000\n[[stg]]\nid = 1\nmode = \"vendor\"\nmembers = [\"{}\"]\n",
            A.to_uppercase()
        ))
        .unwrap();
        assert_eq!(config.stgs[0].members, [A]);
    }

    #[test]
    fn unknown_keys_are_syntax_errors_with_the_line() {
        let cases = [
            ("wkp = 1\nwpk = 2\n".to_string(), 2, "wpk"),
            (
                "wkp = 1\n[tunables]\nkeepalive = 5\n".to_string(),
                3,
                "keepalive",
            ),
            (
                format!("wkp = 1\n[[stg]]\nid = 1\nmode = \"vendor\"\nmember = [\"{A}\"]\n"),
                5,
                "member",
            ),
            (
                format!(
                    "wkp = 1\n[[stg]]\nid = 1\nmode = \"block\"\nmembers = [\"{A}\"]\n\
                     [stg.block]\nhosts = 2\nslots = 1\nslot_block = 1\n"
                ),
                9,
                "slot_block",
            ),
        ];
        for (text, want_line, key) in cases {
            let err = parse_err(&text);
            let ConfigError::Syntax { line, message, .. } = &err else {
                panic!("expected Syntax, got {err:?}");
            };
            assert_eq!(*line, Some(want_line), "{err}");
            assert!(message.contains("unknown field"), "{err}");
            assert_mentions(&err, &[&format!("`{key}`"), &format!("line {want_line}")]);
        }
    }

    #[test]
    fn toml_syntax_error_names_line_and_column() {
        let err = parse_err("wkp = 1\n\n[[stg]\nid = 1\n");
        let ConfigError::Syntax {
            file,
            line,
            column,
            line_text,
            ..
        } = &err
        else {
            panic!("expected Syntax, got {err:?}");
        };
        assert_eq!(*file, None);
        assert_eq!(*line, Some(3));
        assert!(column.is_some());
        assert_eq!(line_text.as_deref(), Some("[[stg]"));
        assert_mentions(&err, &["line 3", "[[stg]"]);
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }

    #[test]
    fn wrong_types_and_modes_are_syntax_errors() {
        let err = parse_err("wkp = \"5100\"\n");
        assert_mentions(&err, &["line 1", "invalid type"]);
        let err = parse_err(&format!(
            "wkp = 1\n[[stg]]\nid = 1\nmode = \"blok\"\nmembers = [\"{A}\"]\n"
        ));
        assert_mentions(&err, &["line 4", "blok", "vendor", "block"]);
        let err = parse_err("wkp = 1\n[tunables]\nkeepalive_ms = -5\n");
        assert_mentions(&err, &["line 3"]);
        let err = parse_err("wkp = 70000\n");
        assert_mentions(&err, &["line 1"]);
        let err = parse_err("[[stg]]\nid = 1\nmode = \"vendor\"\nmembers = []\n");
        assert_mentions(&err, &["missing field `wkp`"]);
    }

    #[test]
    fn psk_line_is_redacted_in_syntax_errors() {
        let err = parse_err("wkp = 1\npsk = 00112233445566778899aabbccddeeff\n");
        assert_mentions(&err, &["line 2", "<redacted>"]);
        assert!(!err.to_string().contains("778899"), "{err}");
    }

    #[test]
    fn load_reads_a_file_and_names_it() {
        let dir = std::env::temp_dir().join(format!("stp-stg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, doc_example()).unwrap();
        assert_eq!(
            Config::load(&good).unwrap(),
            Config::parse(&doc_example()).unwrap()
        );
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "wkp = 1\ntypo = 2\n").unwrap();
        let err = Config::load(&bad).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Syntax { file: Some(f), line: Some(2), .. } if *f == bad),
            "{err:?}"
        );
        assert_mentions(&err, &["bad.toml", "line 2", "typo"]);
        let missing = dir.join("missing.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
        assert_mentions(&err, &["missing.toml"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn serializes_back_to_the_same_config() {
        let config = Config::parse(&doc_example()).unwrap();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), config);
        assert!(text.contains("keepalive_ms = 5000"), "{text}");
    }

    #[test]
    fn debug_redacts_the_psk() {
        let config = Config::parse(&doc_example()).unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains("9f8e7d6c"), "{debug}");
    }

    // ---- validation: one test per error ----

    #[test]
    fn valid_configs_validate() {
        block_config().validate().unwrap();
        vendor_config().validate().unwrap();
    }

    #[test]
    fn wkp_out_of_range() {
        for wkp in [0, u16::MAX] {
            let mut config = vendor_config();
            config.wkp = wkp;
            let err = validate_err(&config);
            assert!(matches!(err, ConfigError::BadWkp { wkp: w } if w == wkp));
            assert_mentions(&err, &["wkp", &wkp.to_string(), "1–65534"]);
        }
        let mut config = vendor_config();
        config.wkp = 65534;
        config.validate().unwrap();
    }

    #[test]
    fn duplicate_stg_id() {
        let mut config = vendor_config();
        let mut second = config.stgs[0].clone();
        second.members = vec!["naa.5000c50000000002".into()];
        config.stgs.push(second);
        let err = validate_err(&config);
        assert!(matches!(err, ConfigError::DuplicateStgId { stg: 9 }));
        assert_mentions(&err, &["STG id 9", "twice"]);
    }

    #[test]
    fn no_members() {
        let mut config = vendor_config();
        config.stgs[0].members.clear();
        let err = validate_err(&config);
        assert!(matches!(err, ConfigError::NoMembers { stg: 9 }));
        assert_mentions(&err, &["STG 9", "no members"]);
    }

    #[test]
    fn malformed_member() {
        let bad = [
            "6001405aaaaaaaaaaaaaaaaaaaaaaaaa",    // no prefix
            "eui.6001405aaaaaaaaa",                // not NAA
            "naa.5000c5000000001",                 // 15 digits
            "naa.5000c500000000011",               // 17 digits
            "naa.6001405aaaaaaaaaaaaaaaaaaaaaaaa", // 31 digits
            "naa.5000c5000000000g",                // not hex
            "naa.5000C50000000001",                // uppercase (parse lowercases)
            " naa.5000c50000000001",               // whitespace
            "naa.",                                // nothing
            "naa.5000c500-0000001",                // punctuation
        ];
        for member in bad {
            let mut config = vendor_config();
            config.stgs[0].members[1] = member.into();
            let err = validate_err(&config);
            assert!(
                matches!(&err, ConfigError::BadMember { stg: 9, member: m } if m == member),
                "{member}: {err:?}"
            );
            assert_mentions(&err, &["STG 9", member, "16 or 32 hex digits"]);
        }
        // Through the parser too.
        let err = parse_err("wkp = 1\n[[stg]]\nid = 3\nmode = \"vendor\"\nmembers = [\"sg3\"]\n");
        assert_mentions(&err, &["STG 3", "\"sg3\""]);
    }

    #[test]
    fn member_listed_twice_in_one_stg() {
        let mut config = vendor_config();
        config.stgs[0].members.push(B.into());
        let err = validate_err(&config);
        assert!(matches!(&err, ConfigError::DuplicateMember { stg: 9, member } if member == B));
        assert_mentions(&err, &["STG 9", B, "twice"]);
        // Case differences are the same member once parsed.
        let err = parse_err(&format!(
            "wkp = 1\n[[stg]]\nid = 3\nmode = \"vendor\"\nmembers = [\"{A}\", \"{}\"]\n",
            A.to_uppercase()
        ));
        assert_mentions(&err, &["STG 3", A, "twice"]);
    }

    #[test]
    fn member_in_two_stgs() {
        let mut config = vendor_config();
        config.stgs.push(StgConfig {
            id: 12,
            mode: MailboxMode::Vendor,
            members: vec!["naa.5000c50000000002".into(), C.into()],
            block: None,
        });
        let err = validate_err(&config);
        assert!(matches!(
            &err,
            ConfigError::MemberInTwoStgs { member, first: 9, second: 12 } if member == C
        ));
        assert_mentions(&err, &[C, "STG 9", "STG 12"]);
    }

    #[test]
    fn block_mode_requires_layout() {
        let mut config = block_config();
        config.stgs[0].block = None;
        let err = validate_err(&config);
        assert!(matches!(err, ConfigError::MissingBlockLayout { stg: 9 }));
        assert_mentions(&err, &["STG 9", "block mode", "[stg.block]"]);
    }

    #[test]
    fn doorbells_one_address_per_host() {
        let parse = |list: &str| {
            Config::parse(&format!(
                "wkp = 5100\n[[stg]]\nid = 9\nmode = \"block\"\nmembers = [\"{A}\"]\n\
                 [stg.block]\nhosts = 2\ndoorbells = [{list}]\n"
            ))
        };
        let config = parse("\"192.0.2.10:5190\", \"[2001:db8::2]:5190\"").unwrap();
        let d = config.stgs[0].block.unwrap().doorbells.unwrap();
        assert_eq!(d.of(0), Some("192.0.2.10:5190".parse().unwrap()));
        assert_eq!(d.of(1), Some("[2001:db8::2]:5190".parse().unwrap()));
        assert_eq!(d.of(2), None);
        // Written back as it was read.
        let text = toml::to_string(&config).unwrap();
        assert!(
            text.contains("doorbells = [\"192.0.2.10:5190\", \"[2001:db8::2]:5190\"]"),
            "{text}"
        );
        for (list, says) in [
            ("\"192.0.2.10:5190\"", "1 addresses for 2 hosts"),
            ("\"192.0.2.10:5190\", \"192.0.2.10:5190\"", "given twice"),
            (
                "\"192.0.2.10\", \"192.0.2.11:5190\"",
                "'192.0.2.10' is not an IP address and UDP port",
            ),
            (
                "\"host-a:5190\", \"192.0.2.11:5190\"",
                "'host-a:5190' is not an IP address",
            ),
        ] {
            let err = parse(list).unwrap_err().to_string();
            assert!(err.contains(says), "{list}: {err}");
            assert!(err.contains("doorbells"), "{list}: {err}");
        }
    }

    #[test]
    fn vendor_mode_forbids_layout() {
        let mut config = vendor_config();
        config.stgs[0].block = block_config().stgs[0].block;
        let err = validate_err(&config);
        assert!(matches!(err, ConfigError::UnexpectedBlockLayout { stg: 9 }));
        assert_mentions(&err, &["STG 9", "vendor mode", "[stg.block]"]);
    }

    #[test]
    fn block_layout_out_of_range() {
        let cases: [(u16, u32, u32, &str); 5] = [
            (1, 64, 128, "hosts"),
            (17, 64, 128, "hosts"),
            (2, 0, 128, "slots"),
            (2, 64, 0, "slot_blocks"),
            (16, u32::MAX, u32::MAX, "slot_blocks"),
        ];
        for (hosts, slots, slot_blocks, field) in cases {
            let mut config = block_config();
            config.stgs[0].block = Some(
                BlockLayout {
                    hosts,
                    slots,
                    slot_blocks,
                }
                .into(),
            );
            let err = validate_err(&config);
            assert!(
                matches!(&err, ConfigError::BadBlockLayout { stg: 9, field: f, .. } if *f == field),
                "{err:?}"
            );
            assert_mentions(&err, &["STG 9", field]);
        }
        // The largest host count is fine.
        let mut config = block_config();
        config.stgs[0].block = Some(
            BlockLayout {
                hosts: 16,
                slots: 1,
                slot_blocks: 1,
            }
            .into(),
        );
        config.validate().unwrap();
        // Slots and slot size may be left to `stp stg format`; hosts may not.
        config.stgs[0].block = Some(BlockSpec {
            hosts: 2,
            slots: None,
            slot_blocks: None,
            doorbells: None,
        });
        config.validate().unwrap();
        config.stgs[0].block = Some(BlockSpec {
            hosts: 1,
            slots: None,
            slot_blocks: None,
            doorbells: None,
        });
        assert!(matches!(
            validate_err(&config),
            ConfigError::BadBlockLayout { field: "hosts", .. }
        ));
    }

    #[test]
    fn bad_psk() {
        let cases = [
            ("00112233445566778899aabbccddeeXX", "character 31"),
            ("00112233445566778899aabbccddeeff0", "odd number"),
            ("00112233445566778899aabbccddee", "15 bytes"),
            (&"ab".repeat(65), "65 bytes"),
            ("", "0 bytes"),
        ];
        for (psk, why) in cases {
            let mut config = vendor_config();
            config.psk = Some(psk.to_string());
            let err = validate_err(&config);
            assert!(matches!(err, ConfigError::BadPsk { .. }), "{err:?}");
            assert_mentions(&err, &["psk", why, "16–64 bytes"]);
            if psk.len() > 4 {
                assert!(!err.to_string().contains(&psk[..8]), "leaks the key: {err}");
            }
            assert!(config.psk_bytes().is_err());
        }
        for psk in ["00".repeat(16), "Ab".repeat(64)] {
            let mut config = vendor_config();
            config.psk = Some(psk.clone());
            config.validate().unwrap();
            assert_eq!(config.psk_bytes().unwrap().unwrap().len(), psk.len() / 2);
        }
        let mut config = vendor_config();
        config.psk = Some("0fA1".repeat(8));
        assert_eq!(config.psk_bytes().unwrap().unwrap()[..2], [0x0f, 0xa1]);
    }

    #[test]
    fn bad_tunables() {
        type Edit = fn(&mut Tunables);
        let cases: [(Edit, &str); 8] = [
            (|t| t.max_payload = 0, "max_payload"),
            (|t| t.max_payload = (1 << 20) + 1, "max_payload"),
            (|t| t.queue_frames = 0, "queue_frames"),
            (|t| t.keepalive = Duration::ZERO, "keepalive_ms"),
            (|t| t.dead_after = t.keepalive, "dead_after_ms"),
            (
                |t| t.initial_rto = Duration::from_millis(19),
                "initial_rto_ms",
            ),
            (
                |t| t.initial_rto = Duration::from_millis(5001),
                "initial_rto_ms",
            ),
            (|t| t.command_timeout = Duration::ZERO, "command_timeout_ms"),
        ];
        for (edit, field) in cases {
            let mut config = vendor_config();
            edit(&mut config.tunables);
            let err = validate_err(&config);
            assert!(
                matches!(&err, ConfigError::BadTunable { field: f, .. } if *f == field),
                "{field}: {err:?}"
            );
            assert_mentions(&err, &["[tunables]", field]);
        }
        let mut config = vendor_config();
        config.tunables.max_payload = 1 << 20;
        config.validate().unwrap();
    }

    // ---- resolution ----

    #[test]
    fn resolve_maps_members_in_order() {
        let resolved = block_config().resolve(9, &full_dir()).unwrap();
        assert_eq!(resolved.id, 9);
        assert_eq!(resolved.mode, MailboxMode::Block);
        assert_eq!(resolved.paths(), ["/dev/sg3", "/dev/sg7", "/dev/sg1"]);
        assert_eq!(resolved.block_size(), 512);
        assert_eq!(resolved.members[1].naa, B);
        assert_eq!(resolved.members[1].blocks, 16_389);
        assert_eq!(resolved.slot_bytes(), Some(128 * 512));
        let resolved = vendor_config().resolve(9, &full_dir()).unwrap();
        assert_eq!(resolved.block, None);
        assert_eq!(resolved.slot_bytes(), None);
    }

    #[test]
    fn resolve_unknown_stg() {
        let err = block_config().resolve(4, &full_dir()).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownStg { stg: 4, .. }));
        assert_mentions(&err, &["STG 4", "configured: 9"]);
    }

    #[test]
    fn resolve_member_missing() {
        let mut dir = full_dir();
        dir.0.remove(B);
        let err = block_config().resolve(9, &dir).unwrap_err();
        assert!(matches!(&err, ConfigError::MemberMissing { stg: 9, member } if member == B));
        assert_mentions(&err, &["STG 9", B, "stp probe"]);
    }

    #[test]
    fn resolve_member_too_small() {
        let mut dir = full_dir();
        dir.insert(B, lun("/dev/sg7", 16_388, 512));
        let err = block_config().resolve(9, &dir).unwrap_err();
        assert!(matches!(
            &err,
            ConfigError::MemberTooSmall { stg: 9, member, needed: 16_389, present: 16_388, .. }
                if member == B
        ));
        assert_mentions(
            &err,
            &["STG 9", B, "/dev/sg7", "16388 blocks", "needs 16389"],
        );
        // Vendor mode has no layout to fit.
        vendor_config().resolve(9, &dir).unwrap();
    }

    #[test]
    fn resolve_block_size_mismatch() {
        let mut dir = full_dir();
        dir.insert(C, lun("/dev/sg1", 1 << 30, 4096));
        let err = block_config().resolve(9, &dir).unwrap_err();
        assert!(matches!(
            &err,
            ConfigError::BlockSizeMismatch { stg: 9, member, block_size: 4096, expected: 512, .. }
                if member == C
        ));
        assert_mentions(&err, &["STG 9", C, A, "4096", "512"]);
    }

    #[test]
    fn resolve_validates_first() {
        let mut config = block_config();
        config.wkp = 0;
        let err = config.resolve(9, &full_dir()).unwrap_err();
        assert!(matches!(err, ConfigError::BadWkp { .. }));
    }

    #[test]
    fn directory_from_identities() {
        let naa = |hex: &str| {
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            Designator::naa(bytes)
        };
        let identity = |designators: Vec<Designator>| Identity {
            inquiry: StandardInquiry::parse(&[0; 36]).unwrap(),
            serial: None,
            designators,
            vpd_pages: vec![0x00, 0x83],
        };
        let mut dir = MapDirectory::new();
        for (member, path) in [(A, "/dev/sg10"), (B, "/dev/sg11"), (C, "/dev/sg12")] {
            let id = identity(vec![naa(&member[4..].to_uppercase())]);
            assert_eq!(
                dir.insert_identified(&id, lun(path, 1 << 20, 512))
                    .as_deref(),
                Some(member)
            );
        }
        assert_eq!(
            dir.insert_identified(&identity(vec![]), lun("/dev/sg13", 1, 512)),
            None
        );
        let resolved = block_config().resolve(9, &dir).unwrap();
        assert_eq!(resolved.paths(), ["/dev/sg10", "/dev/sg11", "/dev/sg12"]);
        // Lookups ignore case even for keys put in the map directly.
        let mut raw = MapDirectory::default();
        raw.0.insert(A.to_uppercase(), lun("/dev/sg0", 1, 512));
        assert_eq!(raw.find(A).unwrap().path, "/dev/sg0");
        assert_eq!(raw.find(B), None);
    }

    // ---- layout math ----

    #[test]
    fn layout_literal_values() {
        let layout = BlockLayout {
            hosts: 2,
            slots: 64,
            slot_blocks: 128,
        };
        assert_eq!(layout.lane_blocks(), 8194);
        assert_eq!(layout.pairs(), 2);
        assert_eq!(layout.required_blocks(), 1 + 2 * (2 + 8192));
        assert_eq!(layout.required_blocks(), 16389);
        assert_eq!(layout.lane_offset(0, 1), Some(1));
        assert_eq!(layout.lane_offset(1, 0), Some(1 + 8194));
        assert_eq!(layout.lane_offset(0, 0), None);
        assert_eq!(layout.lane_offset(1, 1), None);
        assert_eq!(layout.lane_offset(0, 2), None);
        assert_eq!(layout.lane_offset(2, 0), None);
        assert_eq!(layout.slot_offset(0, 1, 0), Some(3));
        assert_eq!(layout.slot_offset(0, 1, 63), Some(3 + 63 * 128));
        assert_eq!(layout.slot_offset(1, 0, 1), Some(8195 + 2 + 128));
        assert_eq!(layout.slot_offset(0, 1, 64), None);
        assert_eq!(layout.slot_offset(0, 0, 0), None);

        // Three hosts: s-major, skipping s == d.
        let three = BlockLayout {
            hosts: 3,
            slots: 1,
            slot_blocks: 1,
        };
        assert_eq!(three.lane_blocks(), 3);
        assert_eq!(three.required_blocks(), 1 + 6 * 3);
        let order = [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)];
        for (i, (s, d)) in order.into_iter().enumerate() {
            assert_eq!(three.lane_offset(s, d), Some(1 + 3 * i as u64), "({s},{d})");
        }

        let overflowing = BlockLayout {
            hosts: 16,
            slots: u32::MAX,
            slot_blocks: u32::MAX,
        };
        assert_eq!(overflowing.required_blocks(), u64::MAX);
        assert_eq!(overflowing.lane_offset(15, 14), None);
    }

    proptest! {
        #[test]
        fn lanes_are_disjoint_and_tile_the_member(
            hosts in MIN_HOSTS..=MAX_HOSTS,
            slots in 1u32..=4096,
            slot_blocks in 1u32..=4096,
        ) {
            let layout = BlockLayout { hosts, slots, slot_blocks };
            let mut lanes = Vec::new();
            for s in 0..hosts {
                prop_assert_eq!(layout.lane_offset(s, s), None);
                prop_assert_eq!(layout.lane_offset(s, hosts), None);
                prop_assert_eq!(layout.lane_offset(hosts, s), None);
                for d in (0..hosts).filter(|&d| d != s) {
                    let start = layout.lane_offset(s, d).unwrap();
                    let last_slot = layout.slot_offset(s, d, slots - 1).unwrap();
                    prop_assert_eq!(last_slot + u64::from(slot_blocks), start + layout.lane_blocks());
                    lanes.push((start, start + layout.lane_blocks()));
                }
            }
            prop_assert_eq!(lanes.len() as u64, layout.pairs());
            lanes.sort_unstable();
            // After the superblock, back to back, up to the end of the layout.
            prop_assert_eq!(lanes[0].0, 1);
            for pair in lanes.windows(2) {
                prop_assert_eq!(pair[0].1, pair[1].0);
            }
            prop_assert_eq!(lanes.last().unwrap().1, layout.required_blocks());
        }

        #[test]
        fn parse_never_panics(text in "[a-z_=\\[\\]\" .0-9\n]{0,200}") {
            let _ = Config::parse(&text);
        }

        #[test]
        fn valid_configs_round_trip(
            wkp in 1u16..=65534,
            ids in proptest::collection::hash_set(any::<u32>(), 1..4),
            block in proptest::option::of((
                MIN_HOSTS..=MAX_HOSTS,
                proptest::option::of(1u32..1000),
                proptest::option::of(1u32..1000),
            )),
            keepalive_ms in 1u64..10_000,
        ) {
            let mut config = vendor_config();
            config.wkp = wkp;
            config.tunables.keepalive = Duration::from_millis(keepalive_ms);
            config.stgs = ids
                .into_iter()
                .enumerate()
                .map(|(i, id)| StgConfig {
                    id,
                    mode: if block.is_some() { MailboxMode::Block } else { MailboxMode::Vendor },
                    members: vec![format!("naa.{i:016x}"), format!("naa.{i:032x}")],
                    block: block.map(|(hosts, slots, slot_blocks)| BlockSpec {
                        hosts,
                        slots,
                        slot_blocks,
                        doorbells: None,
                    }),
                })
                .collect();
            config.validate().unwrap();
            let text = toml::to_string(&config).unwrap();
            prop_assert_eq!(Config::parse(&text).unwrap(), config);
        }
    }
}
