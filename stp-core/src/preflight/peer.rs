//! The peer check of `stp preflight`: both hosts of an STG see the same
//! member set.
//!
//! Each host builds its [`PeerView`] of the STG — the id, the mode, the
//! configured block layout, and per member the NAA the configuration names,
//! the NAA its device actually reports here, its capacity, and (block mode)
//! what its superblock says — and the two hosts exchange their views over
//! the LAN: one `preflight_view` control message each way, framed as the
//! backup's control messages (a 4-byte big-endian length, then a JSON
//! object whose `type` names the message; docs/PROTOCOL.md §8.3). The
//! connecting side sends first; the listening side answers with its own.
//! [`compare`] turns the two views into one [`Finding`]: ok, or what
//! differs and what to fix.
//!
//! The peer's message is untrusted input: [`read_view`] refuses a length
//! above [`MAX_VIEW_BYTES`] before allocating, and [`decode_view`] accepts
//! any bytes without panicking, refusing a view with more than
//! [`MAX_MEMBERS`] members or a field out of bounds.

use std::io::{self, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Finding, Status};
use crate::stg::{BlockSpec, MailboxMode, PathSet, ResolvedStg};

/// The version of [`PeerView`] this build speaks.
pub const VIEW_VERSION: u32 = 1;
/// The largest `preflight_view` message accepted, in bytes.
pub const MAX_VIEW_BYTES: usize = 256 * 1024;
/// The most members a view may list (a superblock's member count is a
/// `u16`; no real STG comes near this).
pub const MAX_MEMBERS: usize = 1024;
/// The longest host name or identity string a view may carry.
pub const MAX_NAME: usize = 255;

/// A block-mode member's superblock as one host reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatView {
    /// The STG id in the superblock.
    pub stg_id: u32,
    /// The member index in the superblock.
    pub member_index: u16,
    /// The member count in the superblock.
    pub member_count: u16,
    /// Hosts of the layout.
    pub hosts: u16,
    /// Slots per ring.
    pub slots: u32,
    /// Blocks per slot.
    pub slot_blocks: u32,
    /// The format generation (new on every format).
    pub generation: u64,
}

/// One member as one host sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// The identity the configuration names (`naa.<hex>`).
    pub naa: String,
    /// The identity the member's device on this host reports (`None`: it
    /// could not be read).
    pub seen: Option<String>,
    /// Capacity in blocks.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Block mode: the superblock, when the member is formatted.
    #[serde(default)]
    pub format: Option<FormatView>,
}

/// What one host sees of an STG, for the other host's preflight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// [`VIEW_VERSION`].
    pub version: u32,
    /// The host's name, for messages.
    pub host: String,
    /// The STG id.
    pub stg: u32,
    /// The STG's mode.
    pub mode: MailboxMode,
    /// The block layout the configuration gives (block mode).
    #[serde(default)]
    pub block: Option<BlockSpec>,
    /// The members, in member index order.
    pub members: Vec<MemberView>,
}

/// This host's view of `stg` over `sets` (member `i`'s paths in
/// `sets[i]`; the first path of each is asked).
pub fn local_view(host: &str, stg: &ResolvedStg, sets: &mut [PathSet]) -> PeerView {
    let members = stg
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let t = sets.get_mut(i).and_then(|s| s.first_mut());
            let (seen, format) = match t {
                Some(t) => {
                    let seen = scsi::inquiry::identify(t.as_mut())
                        .ok()
                        .and_then(|id| id.naa().map(|d| d.to_id_string()));
                    let format = if stg.mode == MailboxMode::Block {
                        superblock(t.as_mut(), m.block_size)
                    } else {
                        None
                    };
                    (seen, format)
                }
                None => (None, None),
            };
            MemberView {
                naa: m.naa.clone(),
                seen,
                blocks: m.blocks,
                block_size: m.block_size,
                format,
            }
        })
        .collect();
    PeerView {
        version: VIEW_VERSION,
        host: host.chars().take(MAX_NAME).collect(),
        stg: stg.id,
        mode: stg.mode,
        block: stg.block,
        members,
    }
}

fn superblock(t: &mut dyn scsi::Transport, block_size: u32) -> Option<FormatView> {
    let block0 = crate::block::read_blocks(t, 0, 1, block_size, Duration::from_secs(30)).ok()?;
    let sb = crate::block::Superblock::decode(&block0).ok()?;
    Some(FormatView {
        stg_id: sb.stg_id,
        member_index: sb.member_index,
        member_count: sb.member_count,
        hosts: sb.layout.hosts,
        slots: sb.layout.slots,
        slot_blocks: sb.layout.slot_blocks,
        generation: sb.generation,
    })
}

/// Why a peer's view was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The connection failed.
    #[error("the control connection to the peer: {0}")]
    Io(#[from] io::Error),
    /// The peer announced a message longer than [`MAX_VIEW_BYTES`].
    #[error("the peer announced a {0}-byte message (limit {MAX_VIEW_BYTES}): not an stp preflight peer, or a different version")]
    TooLong(u64),
    /// Not a `preflight_view` this build reads.
    #[error("the peer's view is malformed: {0}")]
    Malformed(String),
}

#[derive(Serialize)]
struct Tagged<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    view: &'a PeerView,
}

#[derive(Deserialize)]
struct TaggedIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    view: PeerView,
}

/// The `preflight_view` message's bytes: length, then the JSON body.
pub fn encode_view(view: &PeerView) -> Vec<u8> {
    let body = serde_json::to_vec(&Tagged {
        kind: "preflight_view",
        view,
    })
    .unwrap_or_default();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes and checks a `preflight_view` body (the JSON after the length).
/// Any bytes: a malformed or out-of-bounds view is an error, never a
/// panic.
pub fn decode_view(body: &[u8]) -> Result<PeerView, PeerError> {
    if body.len() > MAX_VIEW_BYTES {
        return Err(PeerError::TooLong(body.len() as u64));
    }
    let quote = || String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
    let m: TaggedIn = serde_json::from_slice(body)
        .map_err(|e| PeerError::Malformed(format!("{e} ({}…)", quote())))?;
    if m.kind != "preflight_view" {
        return Err(PeerError::Malformed(format!(
            "a {:?} message where a preflight_view was expected",
            m.kind.chars().take(40).collect::<String>()
        )));
    }
    let v = m.view;
    if v.version != VIEW_VERSION {
        return Err(PeerError::Malformed(format!(
            "view version {}; this build reads version {VIEW_VERSION}",
            v.version
        )));
    }
    if v.members.len() > MAX_MEMBERS {
        return Err(PeerError::Malformed(format!(
            "{} members (limit {MAX_MEMBERS})",
            v.members.len()
        )));
    }
    let long = |s: &str| s.len() > MAX_NAME;
    if long(&v.host)
        || v.members
            .iter()
            .any(|m| long(&m.naa) || m.seen.as_deref().is_some_and(long))
    {
        return Err(PeerError::Malformed(format!(
            "a name or identity longer than {MAX_NAME} bytes"
        )));
    }
    Ok(v)
}

/// Sends `view` as a `preflight_view` message.
pub fn write_view(w: &mut impl Write, view: &PeerView) -> Result<(), PeerError> {
    w.write_all(&encode_view(view))?;
    w.flush()?;
    Ok(())
}

/// Reads one `preflight_view` message: the length first, refused above
/// [`MAX_VIEW_BYTES`] before anything is allocated.
pub fn read_view(r: &mut impl Read) -> Result<PeerView, PeerError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len as usize > MAX_VIEW_BYTES {
        return Err(PeerError::TooLong(u64::from(len)));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    decode_view(&body)
}

fn layout(b: &Option<BlockSpec>) -> String {
    match b {
        None => "none".into(),
        Some(b) => {
            let or_auto =
                |v: Option<u32>| v.map_or("chosen at format".to_string(), |v| v.to_string());
            format!(
                "hosts {}, slots {}, slot_blocks {}",
                b.hosts,
                or_auto(b.slots),
                or_auto(b.slot_blocks)
            )
        }
    }
}

/// The `peer` finding: whether `here` and `peer` see the same member set.
pub fn compare(here: &PeerView, peer: &PeerView) -> Finding {
    let who = if peer.host.is_empty() {
        "the peer".to_string()
    } else {
        format!("the peer ({})", peer.host)
    };
    let mut config = Vec::new();
    let mut devices = Vec::new();
    if here.stg != peer.stg {
        config.push(format!("STG {} here, STG {} on {who}", here.stg, peer.stg));
    }
    if here.mode != peer.mode {
        config.push(format!(
            "{} mode here, {} mode on {who}",
            here.mode, peer.mode
        ));
    }
    if here.block != peer.block {
        config.push(format!(
            "block layout {} here, {} on {who}",
            layout(&here.block),
            layout(&peer.block)
        ));
    }
    if here.members.len() != peer.members.len() {
        config.push(format!(
            "{} member(s) here, {} on {who}",
            here.members.len(),
            peer.members.len()
        ));
    }
    for (i, (a, b)) in here.members.iter().zip(&peer.members).enumerate() {
        if a.naa != b.naa {
            let elsewhere = here.members.iter().position(|m| m.naa == b.naa);
            config.push(match elsewhere {
                Some(j) => format!(
                    "member {i} is {} here and {} on {who} (member {j} here): another order",
                    a.naa, b.naa
                ),
                None => format!("member {i} is {} here, {} on {who}", a.naa, b.naa),
            });
            continue;
        }
        let side = |v: &MemberView, name: &str| -> Option<String> {
            match &v.seen {
                Some(s) if *s == v.naa => None,
                Some(s) => Some(format!(
                    "member {i}'s device {name} reports {s}, not {}",
                    v.naa
                )),
                None => Some(format!("member {i} ({}) could not be read {name}", v.naa)),
            }
        };
        devices.extend(side(a, "here"));
        devices.extend(side(b, &format!("on {who}")));
        if (a.blocks, a.block_size) != (b.blocks, b.block_size) {
            devices.push(format!(
                "member {i} ({}): {} blocks of {} bytes here, {} of {} on {who}",
                a.naa, a.blocks, a.block_size, b.blocks, b.block_size
            ));
        }
        if a.format != b.format {
            let f = |f: &Option<FormatView>| match f {
                None => "no superblock".to_string(),
                Some(f) => format!(
                    "STG {} member {}/{} generation {:016x}",
                    f.stg_id, f.member_index, f.member_count, f.generation
                ),
            };
            devices.push(format!(
                "member {i} ({}): {} here, {} on {who}",
                a.naa,
                f(&a.format),
                f(&b.format)
            ));
        }
    }
    if !config.is_empty() {
        config.extend(devices);
        return Finding::bad(
            "peer",
            Status::Fail,
            config.join("; "),
            "use the same configuration file on both hosts (the same [[stg]] id, mode, members in \
             the same order, and [stg.block])",
        );
    }
    if !devices.is_empty() {
        return Finding::bad(
            "peer",
            Status::Fail,
            devices.join("; "),
            "the two hosts reach different LUNs under one identity, or one a stale copy: check the \
             zoning and LUN masking, run `stp probe` on both hosts, and format again only once both \
             see the same devices",
        );
    }
    let generation = here
        .members
        .first()
        .and_then(|m| m.format)
        .map_or(String::new(), |f| {
            format!("; superblocks agree (generation {:016x})", f.generation)
        });
    Finding::ok(
        "peer",
        format!(
            "{who} sees the same {} member(s) of STG {} ({} mode){generation}",
            here.members.len(),
            here.stg,
            here.mode
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> PeerView {
        PeerView {
            version: VIEW_VERSION,
            host: "a".into(),
            stg: 8,
            mode: MailboxMode::Block,
            block: Some(BlockSpec {
                hosts: 2,
                slots: None,
                slot_blocks: None,
                doorbells: None,
            }),
            members: (0..2)
                .map(|i| MemberView {
                    naa: format!("naa.60014050000000{i}"),
                    seen: Some(format!("naa.60014050000000{i}")),
                    blocks: 4096,
                    block_size: 512,
                    format: None,
                })
                .collect(),
        }
    }

    #[test]
    fn round_trip_and_same_view() {
        let v = view();
        let bytes = encode_view(&v);
        let back = read_view(&mut &bytes[..]).unwrap();
        assert_eq!(back, v);
        let f = compare(&v, &back);
        assert_eq!(f.status, Status::Ok, "{}", f.line());
    }

    #[test]
    fn differences_are_named() {
        let here = view();
        let mut peer = view();
        peer.members.swap(0, 1);
        let f = compare(&here, &peer);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("another order"), "{}", f.line());
        let mut peer = view();
        peer.members[1].seen = Some("naa.6001405999".into());
        let f = compare(&here, &peer);
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.detail
                .contains("member 1's device on the peer (a) reports naa.6001405999"),
            "{}",
            f.line()
        );
        assert!(f.fix.unwrap().contains("zoning"));
    }

    #[test]
    fn hostile_bytes_are_refused_without_panic() {
        for body in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"type\":\"agent_hello\"}",
            b"{\"type\":\"preflight_view\",\"version\":2,\"host\":\"\",\"stg\":1,\"mode\":\"block\",\"members\":[]}",
            b"{\"type\":\"preflight_view\",\"version\":1,\"host\":\"\",\"stg\":-1,\"mode\":\"block\",\"members\":[]}",
            b"{\"type\":\"preflight_view\",\"version\":1,\"host\":\"\",\"stg\":1,\"mode\":\"tape\",\"members\":[]}",
        ] {
            assert!(decode_view(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
        let mut v = view();
        v.members = vec![v.members[0].clone(); MAX_MEMBERS + 1];
        let bytes = encode_view(&v);
        assert!(matches!(
            read_view(&mut &bytes[..]),
            Err(PeerError::Malformed(_))
        ));
        v.members.truncate(1);
        v.host = "h".repeat(MAX_NAME + 1);
        assert!(read_view(&mut &encode_view(&v)[..]).is_err());
        // A length past the limit is refused before the body is read.
        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            read_view(&mut &huge[..]),
            Err(PeerError::TooLong(_))
        ));
        // A truncated body is an I/O error.
        let bytes = encode_view(&view());
        assert!(matches!(
            read_view(&mut &bytes[..bytes.len() - 1]),
            Err(PeerError::Io(_))
        ));
    }
}
