//! `stp preflight`: is this host ready to run an STG? One line per check,
//! each ok, a warning, or a failure that says what to fix.
//!
//! The checks run over paths the caller opened (every path to every member
//! separately, [`crate::stg::open_member_path_sets`]) and over what the
//! caller read from the host ([`HostFacts`]: sysfs, the engine probe), so
//! the simulated array tests them exactly as real LUNs run them:
//!
//! * **paths** — each member is reachable on at least one path whose ALUA
//!   state serves I/O (REPORT TARGET PORT GROUPS and VPD 0x83's port
//!   designators, as [`crate::multipath`] reads them);
//! * **identity** — every path of a member reports the member's NAA, and
//!   all members one block size;
//! * **engine** — which engine drives the device nodes and why (the
//!   caller's probe: today [`scsi::open_best`]; a bsg io_uring engine's
//!   probe can answer instead);
//! * **allow_dio** — the sg driver's direct I/O switch;
//! * **transfer** — the largest command a slot or frame needs against the
//!   member's MAXIMUM TRANSFER LENGTH (VPD 0xB0) and the queue's limit;
//! * **cache** — write cache (MODE SENSE caching page) and FUA support;
//! * **reservations** — block mode: whether the members are fenced by this
//!   STG's hosts ([`crate::fence`]);
//! * **peer** — with the peer's view exchanged over the control connection
//!   ([`peer`]), that both hosts see the same member set.

use std::time::Duration;

use scsi::cdb::{Cdb, PageControl};
use scsi::inquiry::{vpd, VpdPage};
use scsi::{Command, Transport};
use serde::Serialize;

use crate::stg::{MailboxMode, PathSet, ResolvedStg};

pub mod peer;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Nothing to do.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// STP will not work (well) until fixed.
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The check's name (`paths`, `identity`, …).
    pub check: &'static str,
    /// Its outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub(crate) fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn bad(
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            check,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// The line `stp preflight` prints.
    pub fn line(&self) -> String {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        match &self.fix {
            Some(fix) => format!("{tag} {:<12} {} — fix: {fix}", self.check, self.detail),
            None => format!("{tag} {:<12} {}", self.check, self.detail),
        }
    }
}

/// What the caller learned about this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `/sys/module/sg/parameters/allow_dio`, trimmed (`None`: unreadable).
    pub allow_dio: Option<String>,
    /// The engine probe's answer: (engine name, why).
    pub engine: Option<(String, String)>,
    /// The smallest `queue/max_hw_sectors_kb` of the members' block
    /// devices, in bytes, if known.
    pub queue_max_bytes: Option<u64>,
}

/// Runs every check for `stg` over `sets` (member `i`'s paths in
/// `sets[i]`, on idle transports).
pub fn check(
    stg: &ResolvedStg,
    sets: &mut [PathSet],
    facts: &HostFacts,
    max_payload: u32,
) -> Vec<Finding> {
    let mut out = vec![
        paths(stg, sets),
        identity(stg, sets),
        engine(facts),
        allow_dio(facts),
        transfer(stg, sets, facts, max_payload),
        cache(sets),
    ];
    out.push(reservations(stg, sets));
    out
}

fn paths(stg: &ResolvedStg, sets: &mut [PathSet]) -> Finding {
    let mut bad = Vec::new();
    let mut summary = Vec::new();
    for (i, set) in sets.iter_mut().enumerate() {
        let infos = crate::multipath::discover(set);
        let serving = infos.iter().filter(|p| p.serves()).count();
        let states: Vec<String> = infos.iter().map(|p| p.summary()).collect();
        summary.push(format!("member {i}: {}", states.join("+")));
        if serving == 0 {
            bad.push(format!(
                "member {i} ({}): no active path ({})",
                stg.members[i].naa,
                states.join(", ")
            ));
        }
    }
    if bad.is_empty() {
        Finding::ok("paths", summary.join("; "))
    } else {
        Finding::bad(
            "paths",
            Status::Fail,
            bad.join("; "),
            "make a target port group of the member active on the array, or zone/map a path through an active port (`stp probe` shows each path's state)",
        )
    }
}

fn identity(stg: &ResolvedStg, sets: &mut [PathSet]) -> Finding {
    let mut bad = Vec::new();
    for (i, set) in sets.iter_mut().enumerate() {
        for t in set.iter_mut() {
            let got = scsi::inquiry::identify(t.as_mut())
                .ok()
                .and_then(|id| id.naa().map(|d| d.to_id_string()));
            if got.as_deref() != Some(stg.members[i].naa.as_str()) {
                bad.push(format!(
                    "member {i}: {} reports {}, not {}",
                    t.describe(),
                    got.as_deref().unwrap_or("no NAA"),
                    stg.members[i].naa
                ));
            }
        }
    }
    if bad.is_empty() {
        Finding::ok(
            "identity",
            format!(
                "{} member(s), every path reports its NAA; block size {}",
                sets.len(),
                stg.block_size()
            ),
        )
    } else {
        Finding::bad(
            "identity",
            Status::Fail,
            bad.join("; "),
            "a device node changed hands: probe again (`stp probe`) and check the configuration's members",
        )
    }
}

fn engine(facts: &HostFacts) -> Finding {
    match &facts.engine {
        Some((name, why)) if name.contains("sync") || name.contains("SG_IO") => Finding::bad(
            "engine",
            Status::Warn,
            format!("{name}: {why}"),
            "synchronous SG_IO carries one command at a time per path; see why above",
        ),
        Some((name, why)) => Finding::ok("engine", format!("{name}: {why}")),
        None => Finding::bad(
            "engine",
            Status::Warn,
            "not probed",
            "open a member's device node",
        ),
    }
}

fn allow_dio(facts: &HostFacts) -> Finding {
    match facts.allow_dio.as_deref() {
        Some("1") => Finding::ok("allow_dio", "sg direct I/O on"),
        Some(v) => Finding::bad(
            "allow_dio",
            Status::Warn,
            format!("sg direct I/O off (allow_dio = {v}): every command's data is copied"),
            "echo 1 > /sys/module/sg/parameters/allow_dio (as root)",
        ),
        None => Finding::bad(
            "allow_dio",
            Status::Warn,
            "no /sys/module/sg/parameters/allow_dio",
            "load the sg driver (modprobe sg)",
        ),
    }
}

fn transfer(
    stg: &ResolvedStg,
    sets: &mut [PathSet],
    facts: &HostFacts,
    max_payload: u32,
) -> Finding {
    let bs = u64::from(stg.block_size().max(1));
    // The largest data phase STP issues: a slot in block mode, a frame's
    // payload plus its header in vendor mode.
    let need = match (stg.mode, stg.slot_bytes()) {
        (MailboxMode::Block, Some(slot)) => slot,
        // The configuration leaves the slot to `stp stg format`: the one
        // formatted (another host's limits chose it), if there is one yet.
        (MailboxMode::Block, None) => match formatted_slot(sets, bs) {
            Some(slot) => slot,
            None => {
                return Finding::ok(
                    "transfer",
                    "not formatted yet: `stp stg format` chooses the slot within the members' \
                     limits",
                )
            }
        },
        _ => u64::from(max_payload) + 64,
    };
    let mut limit: Option<(u64, String)> = facts
        .queue_max_bytes
        .map(|b| (b, "the block queue's max_hw_sectors_kb".to_string()));
    for (i, set) in sets.iter_mut().enumerate() {
        let Some(t) = set.first_mut() else { continue };
        if let Ok(VpdPage::BlockLimits(l)) = vpd(t.as_mut(), VpdPage::BLOCK_LIMITS) {
            if l.max_transfer_length > 0 {
                let b = u64::from(l.max_transfer_length) * bs;
                if limit.as_ref().is_none_or(|(m, _)| b < *m) {
                    limit = Some((b, format!("member {i}'s MAXIMUM TRANSFER LENGTH (VPD B0h)")));
                }
            }
        }
    }
    match limit {
        Some((max, what)) if max < need => Finding::bad(
            "transfer",
            Status::Fail,
            format!("STP needs {need}-byte commands; {what} allows {max}"),
            match stg.mode {
                MailboxMode::Block => "format the STG with fewer slot_blocks (`stp stg format`)",
                _ => "lower tunables.max_payload in the configuration",
            },
        ),
        Some((max, what)) => Finding::ok(
            "transfer",
            format!("{need}-byte commands within {max} ({what})"),
        ),
        None => Finding::ok(
            "transfer",
            format!("{need}-byte commands; no limit reported"),
        ),
    }
}

/// The slot size in the superblock of member 0, when it has one.
fn formatted_slot(sets: &mut [PathSet], block_size: u64) -> Option<u64> {
    let t = sets.first_mut()?.first_mut()?;
    let bs = u32::try_from(block_size).ok()?;
    let block0 = crate::block::read_blocks(t.as_mut(), 0, 1, bs, Duration::from_secs(30)).ok()?;
    let sb = crate::block::Superblock::decode(&block0).ok()?;
    Some(u64::from(sb.layout.slot_blocks) * block_size)
}

fn cache(sets: &mut [PathSet]) -> Finding {
    let Some(t) = sets.iter_mut().find_map(|s| s.first_mut()) else {
        return Finding::bad("cache", Status::Warn, "no path", "add a member");
    };
    let cdb = Cdb::ModeSense6 {
        dbd: true,
        page_control: PageControl::CURRENT,
        page_code: 0x08,
        subpage: 0,
        alloc_len: 255,
    }
    .emit();
    match t.execute(Command::data_in(cdb, 255)).into_result() {
        Ok((d, _)) => {
            let fua = d.get(2).is_some_and(|b| b & 0x10 != 0);
            let page = d.get(3).map_or(4, |l| 4 + usize::from(*l));
            let wce = d.get(page + 2).is_some_and(|b| b & 0x04 != 0);
            let text = format!(
                "write cache {}, FUA {}",
                if wce { "on" } else { "off" },
                if fua { "supported" } else { "not supported" }
            );
            if wce && !fua {
                Finding::bad(
                    "cache",
                    Status::Warn,
                    text,
                    "writes sit in the array's volatile cache with no way to force them through; check the array's cache protection",
                )
            } else {
                Finding::ok("cache", text)
            }
        }
        Err(e) => Finding::bad(
            "cache",
            Status::Warn,
            format!("MODE SENSE caching page: {e}"),
            "check the array's cache settings by hand",
        ),
    }
}

fn reservations(stg: &ResolvedStg, sets: &mut [PathSet]) -> Finding {
    if stg.mode != MailboxMode::Block {
        return Finding::ok(
            "reservations",
            "vendor mode: the array keeps hosts' frames apart",
        );
    }
    match crate::fence::status(sets) {
        Ok(st) => {
            let unfenced: Vec<String> = st
                .iter()
                .enumerate()
                .filter(|(_, m)| !m.fenced(stg.id))
                .map(|(i, _)| i.to_string())
                .collect();
            let foreign = st.iter().any(|m| {
                m.reservation
                    .is_some_and(|(k, _)| crate::fence::key_host(stg.id, k).is_none() && k != 0)
            });
            if foreign {
                Finding::bad(
                    "reservations",
                    Status::Fail,
                    "a member is reserved by a key that is not this STG's",
                    "find who reserved it (`stp stg fence status`) before using it",
                )
            } else if unfenced.is_empty() {
                let hosts = st.first().map(|m| m.hosts(stg.id)).unwrap_or_default();
                Finding::ok(
                    "reservations",
                    format!("fenced; hosts {hosts:?} registered"),
                )
            } else {
                Finding::bad(
                    "reservations",
                    Status::Warn,
                    format!(
                        "member(s) {} not fenced: any host on the SAN can write them",
                        unfenced.join(", ")
                    ),
                    "run `stp stg fence join` on each participating host",
                )
            }
        }
        Err(e) => Finding::bad(
            "reservations",
            Status::Warn,
            e.to_string(),
            "check PERSISTENT RESERVE support",
        ),
    }
}
