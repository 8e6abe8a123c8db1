//! `stp stg`: format a block-mode STG (behind the destructive-write guard)
//! and show what its members hold.
//!
//! The work is done by [`format_members`] and [`member_status`] over any
//! [`Transport`]s, so the simulated array tests them; the command resolves
//! the configuration's members to this host's device nodes and calls them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rand::rngs::OsRng;
use scsi::Transport;
use serde::Serialize;
use stp_core::block::{self, IndexBlock, IndexKind, Superblock};
use stp_core::guard::{self, Finding};
use stp_core::stg::{self, BlockLayout, BlockSpec, Config, MailboxMode, PathEngine};

/// `stp stg`.
#[derive(Args, Debug)]
pub struct StgArgs {
    #[command(subcommand)]
    command: StgCommand,
}

#[derive(Subcommand, Debug)]
enum StgCommand {
    /// Format a block-mode STG: write every member's superblock and the
    /// index blocks of every lane (erasing what the lanes held). Refuses a
    /// member that carries a partition table, a file system, another STG or
    /// a kernel holder, unless --force.
    Format(FormatArgs),
    /// Show each member of an STG: capacity, superblock, and per lane the
    /// slots produced and consumed.
    Status(StatusArgs),
    /// Fence a block-mode STG with SCSI persistent reservations: only the
    /// hosts that joined may WRITE its members (Write Exclusive –
    /// Registrants Only); any other initiator's WRITE gets RESERVATION
    /// CONFLICT. See docs/ARRAYS.md.
    Fence(FenceArgs),
}

#[derive(Args, Debug)]
struct FenceArgs {
    #[command(subcommand)]
    action: FenceAction,
}

#[derive(Subcommand, Debug)]
enum FenceAction {
    /// Run on each participating host: register this host's key on every
    /// path to every member; the first host to join also reserves them.
    Join(FenceHost),
    /// Run on a participating host: take another host's access away
    /// (PREEMPT its key on every member); its WRITEs conflict from now on.
    Remove(FenceRemove),
    /// Run on a host that stops participating: unregister its key. If it
    /// held the reservation, another host runs `join` again to take it.
    Leave(FenceHost),
    /// Show each member's registered hosts and reservation.
    Status(FenceStatus),
}

#[derive(Args, Debug)]
struct FenceHost {
    #[command(flatten)]
    common: Common,
    /// This host's index in the STG (0-based, as the backup service's
    /// --host-index).
    #[arg(long)]
    host: u16,
}

#[derive(Args, Debug)]
struct FenceRemove {
    #[command(flatten)]
    common: Common,
    /// This host's index (it must have joined).
    #[arg(long)]
    host: u16,
    /// The index of the host to fence out.
    #[arg(long)]
    remove: u16,
}

#[derive(Args, Debug)]
struct FenceStatus {
    #[command(flatten)]
    common: Common,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct Common {
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
}

#[derive(Args, Debug)]
struct FormatArgs {
    #[command(flatten)]
    common: Common,
    /// Format even a member the guard refuses (it holds a partition table,
    /// a file system, another STG or a kernel holder): its data is lost.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    common: Common,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Runs `stp stg`.
pub fn run(args: &StgArgs) -> Result<ExitCode> {
    match &args.command {
        StgCommand::Format(a) => format_cmd(a),
        StgCommand::Status(a) => status_cmd(a),
        StgCommand::Fence(a) => fence_cmd(a),
    }
}

/// Every path to every member, for fencing (block mode only).
fn open_sets(c: &Common) -> Result<(stg::ResolvedStg, Vec<stg::PathSet>)> {
    let config = Config::load(&c.config)
        .with_context(|| format!("reading the STP configuration {}", c.config.display()))?;
    let dir = match &c.map {
        Some(m) => crate::backup::config::directory_from_map(m, c.map_host)?,
        None => crate::backup::config::probe_directory()?,
    };
    let (resolved, sets) = stg::open_member_path_sets(&config, c.stg, &dir, PathEngine::Sync)
        .with_context(|| {
            format!(
                "finding STG {}'s members on this host (`stp probe` lists the identities it sees)",
                c.stg
            )
        })?;
    if resolved.mode != MailboxMode::Block {
        bail!(
            "STG {} is a vendor-mode STG: the array routes its frames and keeps other hosts' \
             frames apart itself; fencing is for block-mode STGs",
            resolved.id
        );
    }
    Ok((resolved, sets))
}

fn fence_cmd(a: &FenceArgs) -> Result<ExitCode> {
    use stp_core::fence;
    match &a.action {
        FenceAction::Join(h) => {
            let (r, mut sets) = open_sets(&h.common)?;
            fence::join(&mut sets, r.id, h.host)?;
            println!(
                "host {} joined STG {}: registered on {} path(s) of {} member(s), which are \
                 reserved Write Exclusive - Registrants Only",
                h.host,
                r.id,
                sets.iter().map(Vec::len).sum::<usize>(),
                sets.len()
            );
        }
        FenceAction::Remove(h) => {
            let (r, mut sets) = open_sets(&h.common)?;
            fence::remove(&mut sets, r.id, h.host, h.remove)?;
            println!(
                "host {} removed from STG {}: its WRITEs to the members now get RESERVATION CONFLICT",
                h.remove, r.id
            );
        }
        FenceAction::Leave(h) => {
            let (r, mut sets) = open_sets(&h.common)?;
            fence::leave(&mut sets, r.id, h.host)?;
            let st = fence::status(&mut sets)?;
            let unfenced = st.iter().filter(|m| !m.fenced(r.id)).count();
            println!("host {} left STG {}", h.host, r.id);
            if unfenced > 0 && st.iter().any(|m| !m.hosts(r.id).is_empty()) {
                println!(
                    "{unfenced} member(s) lost their reservation with this host: run \
                     `stp stg fence join` on another participating host"
                );
            }
        }
        FenceAction::Status(s) => {
            let (r, mut sets) = open_sets(&s.common)?;
            let st = fence::status(&mut sets)?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                for (i, m) in st.iter().enumerate() {
                    let hosts: Vec<String> = m.hosts(r.id).iter().map(u16::to_string).collect();
                    let others = m
                        .keys
                        .iter()
                        .filter(|k| fence::key_host(r.id, **k).is_none())
                        .count();
                    let reservation = match m.reservation {
                        None => "not reserved".to_string(),
                        Some((k, t)) => format!(
                            "{} by {}",
                            scsi::pr::kind::name(t),
                            fence::key_host(r.id, k)
                                .map_or(format!("key {k:#018x}"), |h| format!("host {h}"))
                        ),
                    };
                    println!(
                        "member {i} ({}): hosts [{}]{}; {reservation}{}",
                        r.members[i].naa,
                        hosts.join(", "),
                        if others > 0 {
                            format!(", {others} foreign key(s)")
                        } else {
                            String::new()
                        },
                        if m.fenced(r.id) {
                            ""
                        } else {
                            " — NOT FENCED"
                        },
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open(c: &Common) -> Result<(stg::ResolvedStg, Vec<Box<dyn Transport>>)> {
    let config = Config::load(&c.config)
        .with_context(|| format!("reading the STP configuration {}", c.config.display()))?;
    let dir = match &c.map {
        Some(m) => crate::backup::config::directory_from_map(m, c.map_host)?,
        None => crate::backup::config::probe_directory()?,
    };
    stg::open_member_paths(&config, c.stg, &dir, PathEngine::Sync).with_context(|| {
        format!(
            "finding STG {}'s members on this host (`stp probe` lists the identities it sees)",
            c.stg
        )
    })
}

fn format_cmd(a: &FormatArgs) -> Result<ExitCode> {
    let (resolved, mut paths) = open(&a.common)?;
    let (MailboxMode::Block, Some(spec)) = (resolved.mode, resolved.block) else {
        bail!(
            "STG {} is a vendor-mode STG: the array keeps its mailbox, there is nothing to \
             format (only block-mode STGs are formatted)",
            resolved.id
        );
    };
    let names: Vec<String> = resolved.paths().iter().map(|p| p.to_string()).collect();
    let host_limit = crate::preflight::queue_limit(&resolved.paths());
    let (layout, why) = layout_for(resolved.id, &spec, &mut paths, host_limit)?;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let generation = format_members(
        resolved.id,
        &layout,
        &mut paths,
        &names,
        a.force,
        Path::new("/sys"),
        &mounts,
    )?;
    println!(
        "formatted block-mode STG {} on {} member(s) ({} hosts, {} slots of {} blocks per lane, \
         {why}), generation {generation:#018x}; hosts that had it open must reopen it",
        resolved.id,
        paths.len(),
        layout.hosts,
        layout.slots,
        layout.slot_blocks
    );
    Ok(ExitCode::SUCCESS)
}

/// The layout to format STG `stg` with: the configured one, or the parts
/// the configuration leaves out chosen from the members' limits
/// ([`block::choose_layout`]; `host_limit` is this host's per-command limit
/// for the paths). Also says how it came about, for the operator.
pub fn layout_for(
    stg: u32,
    spec: &BlockSpec,
    members: &mut [Box<dyn Transport>],
    host_limit: Option<u64>,
) -> Result<(BlockLayout, String)> {
    if let Some(layout) = spec.layout() {
        return Ok((layout, "as configured".to_string()));
    }
    let c = block::choose_layout(members, stg, spec.request(), host_limit)
        .with_context(|| format!("choosing a block layout for STG {stg}"))?;
    let why = format!(
        "chosen: {} KiB slots, set by {}; a ring of {} KiB per lane",
        c.slot_bytes >> 10,
        c.limited_by,
        (c.slot_bytes * u64::from(c.layout.slots)) >> 10
    );
    Ok((c.layout, why))
}

/// Formats the members of block-mode STG `stg` with `layout` (see
/// [`block::format`]) after the destructive-write guard has checked each
/// ([`guard::check_members`]; skipped with `force`). Returns the new
/// generation.
pub fn format_members(
    stg: u32,
    layout: &BlockLayout,
    members: &mut [Box<dyn Transport>],
    names: &[String],
    force: bool,
    sys_root: &Path,
    mounts: &str,
) -> Result<u64> {
    let Some(first) = members.first_mut() else {
        bail!("STG {stg} has no members to format");
    };
    let (_, block_size) = read_capacity(first.as_mut())
        .with_context(|| format!("READ CAPACITY(16) of STG {stg} member 0"))?;
    if !force {
        guard::check_members(stg, members, names, block_size, sys_root, mounts)?;
    }
    Ok(block::format(members, stg, layout, &mut OsRng)?)
}

/// What one member holds.
#[derive(Debug, Serialize)]
pub struct MemberStatus {
    /// Member index.
    pub member: usize,
    /// Device path.
    pub path: String,
    /// Capacity in blocks and block size.
    pub blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// The superblock, or why there is none.
    pub superblock: Result<SuperblockView, String>,
    /// What the guard would refuse to format over (empty for an STG's own
    /// member).
    pub findings: Vec<String>,
    /// Lanes (source host, destination host): produced and consumed.
    pub lanes: Vec<LaneStatus>,
}

/// A superblock, for display.
#[derive(Debug, Serialize)]
pub struct SuperblockView {
    /// The STG id.
    pub stg: u32,
    /// The member's index and the count.
    pub member_index: u16,
    /// Members in the STG.
    pub member_count: u16,
    /// Hosts.
    pub hosts: u16,
    /// Slots per lane.
    pub slots: u32,
    /// Blocks per slot.
    pub slot_blocks: u32,
    /// The format generation.
    pub generation: String,
}

/// One lane of one member.
#[derive(Debug, Serialize)]
pub struct LaneStatus {
    /// Source host.
    pub from: u16,
    /// Destination host.
    pub to: u16,
    /// Slots produced (producer block), or why unreadable.
    pub produced: Result<u64, String>,
    /// Slots consumed (consumer block), or why unreadable.
    pub consumed: Result<u64, String>,
    /// Producer and consumer epochs (host restarts).
    pub epochs: (Option<u64>, Option<u64>),
}

/// The block helpers' patience for one command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

fn read_blocks(t: &mut dyn Transport, lba: u64, blocks: u32, bs: u32) -> Result<Vec<u8>> {
    let data = block::read_blocks(t, lba, blocks, bs, COMMAND_TIMEOUT)
        .with_context(|| format!("READ(16) of {blocks} block(s) at LBA {lba}"))?;
    Ok(data.to_vec())
}

fn read_capacity(t: &mut dyn Transport) -> Result<(u64, u32)> {
    block::read_capacity(t, COMMAND_TIMEOUT).context("READ CAPACITY(16)")
}

/// Reads what each member of STG `stg` holds: superblock, guard findings,
/// and the index blocks of every lane. Reads only.
pub fn member_status(
    stg: u32,
    members: &mut [Box<dyn Transport>],
    names: &[String],
) -> Result<Vec<MemberStatus>> {
    let mut out = Vec::new();
    for (i, t) in members.iter_mut().enumerate() {
        let path = names.get(i).cloned().unwrap_or_else(|| t.describe());
        let (blocks, block_size) =
            read_capacity(t.as_mut()).with_context(|| format!("member {i} ({path})"))?;
        let head = read_blocks(t.as_mut(), 0, 1, block_size.max(512))
            .with_context(|| format!("member {i} ({path})"))?;
        let sb = Superblock::decode(&head);
        let findings: Vec<String> = guard::scan(t.as_mut(), block_size, stg)
            .unwrap_or_default()
            .iter()
            .map(Finding::to_string)
            .collect();
        let mut lanes = Vec::new();
        if let Ok(sb) = &sb {
            let l = sb.layout;
            for from in 0..l.hosts {
                for to in 0..l.hosts {
                    let Some(at) = l.lane_offset(from, to) else {
                        continue;
                    };
                    let read = |t: &mut Box<dyn Transport>, lba, kind| {
                        read_blocks(t.as_mut(), lba, 1, block_size)
                            .map_err(|e| format!("{e:#}"))
                            .and_then(|b| IndexBlock::decode(&b).map_err(|e| e.to_string()))
                            .and_then(|ib| {
                                if ib.kind != kind {
                                    Err(format!("holds a {:?} block", ib.kind))
                                } else if ib.generation != sb.generation {
                                    Err("from another format generation".into())
                                } else {
                                    Ok(ib)
                                }
                            })
                    };
                    let p = read(t, at, IndexKind::Producer);
                    let c = read(t, at + 1, IndexKind::Consumer);
                    lanes.push(LaneStatus {
                        from,
                        to,
                        epochs: (
                            p.as_ref().ok().map(|b| b.epoch),
                            c.as_ref().ok().map(|b| b.epoch),
                        ),
                        produced: p.map(|b| b.count),
                        consumed: c.map(|b| b.count),
                    });
                }
            }
        }
        out.push(MemberStatus {
            member: i,
            path,
            blocks,
            block_size,
            superblock: sb
                .map(|sb| SuperblockView {
                    stg: sb.stg_id,
                    member_index: sb.member_index,
                    member_count: sb.member_count,
                    hosts: sb.layout.hosts,
                    slots: sb.layout.slots,
                    slot_blocks: sb.layout.slot_blocks,
                    generation: format!("{:#018x}", sb.generation),
                })
                .map_err(|e| e.to_string()),
            findings,
            lanes,
        });
    }
    Ok(out)
}

fn status_cmd(a: &StatusArgs) -> Result<ExitCode> {
    let (resolved, mut paths) = open(&a.common)?;
    let names: Vec<String> = resolved.paths().iter().map(|p| p.to_string()).collect();
    if resolved.mode == MailboxMode::Vendor {
        println!(
            "STG {} is a vendor-mode STG of {} member(s): the array keeps its mailbox \
             (`stp probe` shows the members)",
            resolved.id,
            names.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let status = member_status(resolved.id, &mut paths, &names)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut ok = true;
    for m in &status {
        println!(
            "member {} {}: {} blocks of {} bytes",
            m.member, m.path, m.blocks, m.block_size
        );
        match &m.superblock {
            Ok(sb) => println!(
                "  superblock  STG {} member {}/{}, {} hosts, {} slots × {} blocks, generation {}",
                sb.stg,
                sb.member_index,
                sb.member_count,
                sb.hosts,
                sb.slots,
                sb.slot_blocks,
                sb.generation
            ),
            Err(e) => {
                ok = false;
                println!("  superblock  none: {e} (run `stp stg format`)");
            }
        }
        for f in &m.findings {
            println!("  holds       {f}");
        }
        for l in &m.lanes {
            let show = |r: &Result<u64, String>| match r {
                Ok(n) => n.to_string(),
                Err(e) => format!("? ({e})"),
            };
            println!(
                "  lane {}→{}    produced {}, consumed {}",
                l.from,
                l.to,
                show(&l.produced),
                show(&l.consumed)
            );
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use scsi::cdb::RwFlags;
    use scsi::{Cdb, Command};
    use sim_target::{Array, Host, LunConfig};

    fn members(a: &Array) -> Vec<Box<dyn Transport>> {
        let h = Host::login(a, "admin");
        (0..2)
            .map(|l| Box::new(h.open(l).unwrap()) as Box<dyn Transport>)
            .collect()
    }

    #[test]
    fn format_guards_then_status_shows_the_lanes() {
        let a = Array::new();
        for id in 0..2 {
            a.add_lun(id, LunConfig::new(id, 1 << 14, 512)).unwrap();
        }
        let names = vec!["lun0".to_string(), "lun1".to_string()];
        let layout = BlockLayout {
            hosts: 2,
            slots: 8,
            slot_blocks: 16,
        };
        let none = Path::new("/nonexistent");
        // An XFS signature on member 1: refused, then forced.
        let mut m = members(&a);
        let mut xfs = vec![0u8; 512];
        xfs[..4].copy_from_slice(b"XFSB");
        let cdb = Cdb::Write16 {
            lba: 0,
            blocks: 1,
            flags: RwFlags::default(),
        };
        m[1].execute(Command::data_out(cdb.emit(), scsi::IoBuf::from_slice(&xfs)))
            .into_result()
            .unwrap();
        let e = format_members(7, &layout, &mut m, &names, false, none, "").unwrap_err();
        assert!(format!("{e:#}").contains("member 1 (lun1)"), "{e:#}");
        let st = member_status(7, &mut m, &names).unwrap();
        assert!(st[1].superblock.is_err());
        assert_eq!(st[1].findings.len(), 1, "{:?}", st[1].findings);
        let g = format_members(7, &layout, &mut m, &names, true, none, "").unwrap();
        let st = member_status(7, &mut m, &names).unwrap();
        for (i, s) in st.iter().enumerate() {
            let sb = s.superblock.as_ref().unwrap();
            assert_eq!((sb.stg, sb.member_index, sb.member_count), (7, i as u16, 2));
            assert_eq!(sb.generation, format!("{g:#018x}"));
            assert!(s.findings.is_empty());
            assert_eq!(s.lanes.len(), 2);
            assert!(s
                .lanes
                .iter()
                .all(|l| l.produced == Ok(0) && l.consumed == Ok(0)));
        }
        // The same STG formats again without --force.
        format_members(7, &layout, &mut m, &names, false, none, "").unwrap();
        // With only `hosts` configured, the layout is chosen: 1 MiB slots
        // do not fit four times in these 8 MiB members, 512 KiB ones do.
        let spec = BlockSpec {
            hosts: 2,
            slots: None,
            slot_blocks: None,
            doorbells: None,
        };
        let (chosen, why) = layout_for(7, &spec, &mut m, None).unwrap();
        assert_eq!((chosen.slots, chosen.slot_blocks), (7, 1024), "{why}");
        assert!(
            why.contains("512 KiB slots") && why.contains("capacity"),
            "{why}"
        );
        let (limited, why) = layout_for(7, &spec, &mut m, Some(64 << 10)).unwrap();
        assert_eq!(limited.slot_blocks, 128, "{why}");
        assert!(why.contains("max_hw_sectors_kb"), "{why}");
        assert_eq!(
            layout_for(7, &layout.into(), &mut m, None).unwrap(),
            (layout, "as configured".to_string())
        );
        format_members(7, &chosen, &mut m, &names, false, none, "").unwrap();
    }
}
