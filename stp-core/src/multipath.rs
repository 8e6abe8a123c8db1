//! One logical unit over several paths: [`Multipath`] is a [`Transport`]
//! that spreads commands over every path to the same logical unit (the same
//! NAA seen through several `/dev/sg` or bsg nodes, or several in-process
//! nexuses), prefers the paths whose target port group is active/optimized,
//! and moves a command whose path failed to another path when the one retry
//! rule allows ([`crate::retry::path_failure`]).
//!
//! The mailbox code above sees one member and one transport; it never sees
//! paths. A member with one path is opened without this wrapper.
//!
//! # Path states
//!
//! At [`Multipath::open`] each path's target port (VPD 0x83's relative
//! target port and target port group designators) is read and REPORT
//! TARGET PORT GROUPS tells each group's asymmetric access state. A device
//! without ALUA (REPORT TARGET PORT GROUPS refused, or no port designators)
//! leaves the state unknown, which is served like active/optimized. Then:
//!
//! * a command refused for its port's state (NOT READY 04h/0Ah, 0Bh, 0Ch,
//!   12h) records that state on its path and moves;
//! * UNIT ATTENTION 2Ah/06h, or any state recorded from sense, schedules a
//!   REPORT TARGET PORT GROUPS on a serving path, whose answer updates
//!   every path;
//! * a path failure (host status, timeout, an OS error) marks the path
//!   down; a down path gets a TEST UNIT READY every [`RECHECK`] and comes
//!   back when it answers; while any path is not active, the states are
//!   read again every [`RECHECK`] too.
//!
//! Commands go to the serving path with the best state (active/optimized,
//! then active/non-optimized), the least loaded among equals. When no path
//! serves, a transitioning path is tried after the policy's back-off; when
//! every path is down, the least recently failed one is tried, so the
//! caller gets a real error rather than a hang.
//!
//! Every command completes to the caller exactly once, with its own tag:
//! a moved command is the same command (same CDB, same buffer), submitted
//! again only when the rule says it did not run or may safely run twice.

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use scsi::alua::{AccessState, PortGroups, PortIdentity};
use scsi::cdb::Cdb;
use scsi::inquiry::{vpd, VpdPage};
use scsi::{CdbBuf, Command, CommandError, Completion, DataDirection, SubmitError, Transport};
use serde::Serialize;

use crate::retry::{path_failure, Op, PathFault, RetryPolicy, Stage};

/// How often states are read again while some path is not active, and a
/// down path is tested.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The longest a reap waits on one path while several have commands in
/// flight (the paths are polled in turn).
const POLL_SLICE: Duration = Duration::from_millis(1);

/// What is known about one path, for `stp probe` and tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathInfo {
    /// The path's name ([`Transport::describe`]).
    pub name: String,
    /// The relative target port it enters through, if the device says.
    pub relative_port: Option<u16>,
    /// Its target port group, if the device says.
    pub group: Option<u16>,
    /// Its group's asymmetric access state (`None`: unknown, served like
    /// active/optimized).
    #[serde(serialize_with = "state_name")]
    pub state: Option<AccessState>,
    /// Its group is preferred (PREF).
    pub preferred: bool,
    /// The path failed and has not answered since.
    pub down: bool,
}

fn state_name<S: serde::Serializer>(s: &Option<AccessState>, ser: S) -> Result<S::Ok, S::Error> {
    match s {
        Some(s) => ser.serialize_some(&s.to_string()),
        None => ser.serialize_none(),
    }
}

impl PathInfo {
    /// A short state for tables: `down`, the ALUA state, or `active` when
    /// unknown.
    pub fn summary(&self) -> String {
        match (self.down, self.state) {
            (true, _) => "down".into(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "active".into(),
        }
    }

    /// Whether I/O is sent to this path in preference to the others: not
    /// down and in a serving (or unknown) state.
    pub fn serves(&self) -> bool {
        !self.down && self.state.is_none_or(AccessState::serves_io)
    }

    /// Preference rank, lower first.
    fn rank(&self) -> (u8, bool) {
        let state = if self.down {
            9
        } else {
            self.state.map_or(0, AccessState::rank)
        };
        (state, !self.preferred)
    }
}

/// Reads the port identity of each path and the groups' states through
/// the first path that answers REPORT TARGET PORT GROUPS, on idle
/// transports. A path that cannot be asked keeps unknowns.
pub fn discover(paths: &mut [Box<dyn Transport>]) -> Vec<PathInfo> {
    let mut infos: Vec<PathInfo> = paths
        .iter_mut()
        .map(|t| {
            let port = match vpd(t.as_mut(), VpdPage::DEVICE_IDENTIFICATION) {
                Ok(VpdPage::DeviceIdentification(list)) => PortIdentity::from_designators(&list),
                _ => PortIdentity::default(),
            };
            PathInfo {
                name: t.describe(),
                relative_port: port.relative_port,
                group: port.group,
                state: None,
                preferred: false,
                down: false,
            }
        })
        .collect();
    for t in paths.iter_mut() {
        // Under the one retry policy: the first command after a state
        // change meets UNIT ATTENTION 2Ah/06h (INQUIRY passes it, REPORT
        // TARGET PORT GROUPS does not).
        let answer = RetryPolicy::default().run(Op::Query, || {
            scsi::alua::report_target_port_groups(t.as_mut())
        });
        if let Ok(groups) = answer {
            apply_groups(&mut infos, &groups);
            break;
        }
    }
    infos
}

/// Updates each path's state from REPORT TARGET PORT GROUPS data: by its
/// relative target port, else by its group number.
fn apply_groups<'a>(infos: impl IntoIterator<Item = &'a mut PathInfo>, groups: &PortGroups) {
    for info in infos {
        let group = info
            .relative_port
            .and_then(|p| groups.group_of_port(p))
            .or_else(|| info.group.and_then(|g| groups.group(g)));
        if let Some(g) = group {
            info.group = Some(g.id);
            info.state = Some(g.state);
            info.preferred = g.preferred;
        }
    }
}

struct Path {
    transport: Box<dyn Transport>,
    info: PathInfo,
    /// When it went down.
    down_since: Option<Instant>,
    /// When it was last tested while down.
    last_probe: Option<Instant>,
}

/// What is kept of a caller's command to move it.
struct Origin {
    tag: u64,
    cdb: CdbBuf,
    direction: DataDirection,
    timeout: Duration,
    len: usize,
    path: usize,
    attempts: u32,
}

/// A command the wrapper sends for itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Internal {
    /// REPORT TARGET PORT GROUPS, to read the states again.
    Refresh,
    /// TEST UNIT READY on a down path.
    Probe,
}

/// Counters of a [`Multipath`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MultipathStats {
    /// Commands moved to another path (or sent again after a transition).
    pub moved: u64,
    /// Times a path went down.
    pub path_failures: u64,
    /// REPORT TARGET PORT GROUPS answers applied after open.
    pub refreshes: u64,
}

/// One logical unit over several paths (see the module documentation).
pub struct Multipath {
    paths: Vec<Path>,
    policy: RetryPolicy,
    origins: HashMap<u64, Origin>,
    internal: HashMap<u64, (usize, Internal)>,
    next_id: u64,
    /// Commands waiting to go again: (due, command with its inner id).
    delayed: Vec<(Instant, Command)>,
    refresh_due: Option<Instant>,
    last_refresh: Instant,
    stats: MultipathStats,
}

impl Multipath {
    /// Wraps the `paths` (idle, at least one) to one logical unit, reading
    /// each path's port and the groups' states first ([`discover`]).
    /// Commands that failed on a path are moved at most
    /// `policy.max_attempts - 1` times.
    pub fn open(mut paths: Vec<Box<dyn Transport>>, policy: RetryPolicy) -> io::Result<Multipath> {
        if paths.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a multipath member needs at least one path",
            ));
        }
        let infos = discover(&mut paths);
        Ok(Multipath::with_infos(
            paths.into_iter().zip(infos).collect(),
            policy,
        ))
    }

    /// Wraps paths whose states are already known (no commands sent).
    pub fn with_infos(
        paths: Vec<(Box<dyn Transport>, PathInfo)>,
        policy: RetryPolicy,
    ) -> Multipath {
        Multipath {
            paths: paths
                .into_iter()
                .map(|(transport, info)| Path {
                    transport,
                    info,
                    down_since: None,
                    last_probe: None,
                })
                .collect(),
            policy,
            origins: HashMap::new(),
            internal: HashMap::new(),
            next_id: 0,
            delayed: Vec::new(),
            refresh_due: None,
            last_refresh: Instant::now(),
            stats: MultipathStats::default(),
        }
    }

    /// What is known about each path now.
    pub fn paths(&self) -> Vec<PathInfo> {
        self.paths.iter().map(|p| p.info.clone()).collect()
    }

    /// The counters.
    pub fn stats(&self) -> MultipathStats {
        self.stats
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// The path for the next command: the best-ranked path with room,
    /// least loaded among equals; a down path only when all are down (the
    /// least recently failed).
    fn choose(&self) -> Option<usize> {
        let room = |p: &Path| p.transport.in_flight() < p.transport.queue_depth();
        let up = self
            .paths
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.info.down && room(p))
            .min_by_key(|(_, p)| (p.info.rank(), p.transport.in_flight()))
            .map(|(i, _)| i);
        up.or_else(|| {
            self.paths
                .iter()
                .enumerate()
                .filter(|(_, p)| room(p))
                .min_by_key(|(_, p)| p.down_since)
                .map(|(i, _)| i)
        })
    }

    /// Records a path fault.
    fn mark(&mut self, path: usize, fault: PathFault) {
        let now = Instant::now();
        let p = &mut self.paths[path];
        match fault {
            PathFault::State(s) => {
                p.info.state = Some(s);
                self.refresh_due.get_or_insert(now);
            }
            PathFault::StateChanged => {
                self.refresh_due.get_or_insert(now);
            }
            PathFault::Down => {
                if !p.info.down {
                    tracing::warn!(path = %p.info.name, "path down; moving its commands to the other paths");
                    self.stats.path_failures += 1;
                }
                p.info.down = true;
                p.down_since = Some(now);
                p.last_probe = Some(now);
            }
        }
    }

    /// Sends `cmd` (carrying its inner id) on the best path; a path that
    /// refuses it for a path reason is marked and the next one tried.
    fn send(&mut self, mut cmd: Command, origin: &mut Origin) -> Result<(), SubmitError> {
        let mut tried = 0;
        loop {
            let Some(path) = self.choose() else {
                return Err(SubmitError {
                    cmd: Box::new(cmd),
                    error: CommandError::Io(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "every path's queue is full",
                    )),
                });
            };
            match self.paths[path].transport.submit(cmd) {
                Ok(()) => {
                    origin.path = path;
                    return Ok(());
                }
                Err(e) => {
                    tried += 1;
                    match path_failure(&e.error, Stage::Submit) {
                        Some((fault, _)) if tried < self.paths.len() => {
                            self.mark(path, fault);
                            cmd = *e.cmd;
                        }
                        Some((fault, _)) => {
                            self.mark(path, fault);
                            return Err(e);
                        }
                        None => return Err(e),
                    }
                }
            }
        }
    }

    /// Sends the internal commands that are due: a REPORT TARGET PORT
    /// GROUPS when states must be read, a TEST UNIT READY on each down
    /// path every [`RECHECK`].
    fn housekeeping(&mut self) {
        let now = Instant::now();
        let unsettled = self.paths.iter().any(|p| {
            p.info.down
                || p.info
                    .state
                    .is_some_and(|s| s != AccessState::ACTIVE_OPTIMIZED)
        });
        if unsettled && now.duration_since(self.last_refresh) >= RECHECK {
            self.refresh_due.get_or_insert(now);
        }
        let refreshing = self.internal.values().any(|(_, k)| *k == Internal::Refresh);
        if self.refresh_due.is_some_and(|d| d <= now) && !refreshing {
            // Any path that is up answers REPORT TARGET PORT GROUPS, whatever
            // its state (LIO lets it through in every state but offline).
            let path = self
                .paths
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.info.down && p.info.state != Some(AccessState::OFFLINE))
                .filter(|(_, p)| p.transport.in_flight() < p.transport.queue_depth())
                .min_by_key(|(_, p)| p.info.rank())
                .map(|(i, _)| i);
            if let Some(path) = path {
                let cdb = Cdb::ReportTargetPortGroups {
                    extended: false,
                    alloc_len: 4096,
                }
                .emit();
                let id = self.id();
                let cmd = Command::data_in(cdb, 4096).with_tag(id);
                if self.paths[path].transport.submit(cmd).is_ok() {
                    self.internal.insert(id, (path, Internal::Refresh));
                    self.refresh_due = None;
                    self.last_refresh = now;
                }
            }
        }
        for path in 0..self.paths.len() {
            let p = &self.paths[path];
            let probing = self
                .internal
                .values()
                .any(|(i, k)| *i == path && *k == Internal::Probe);
            let due = p.info.down
                && !probing
                && p.last_probe
                    .is_none_or(|t| now.duration_since(t) >= RECHECK);
            if due && p.transport.in_flight() < p.transport.queue_depth() {
                let id = self.id();
                let cmd = Command::no_data(Cdb::TestUnitReady.emit())
                    .with_tag(id)
                    .with_timeout(RECHECK.max(Duration::from_secs(5)));
                self.paths[path].last_probe = Some(now);
                if self.paths[path].transport.submit(cmd).is_ok() {
                    self.internal.insert(id, (path, Internal::Probe));
                }
            }
        }
    }

    /// Handles the completion of an internal command.
    fn settle_internal(&mut self, path: usize, kind: Internal, c: Completion) {
        match kind {
            Internal::Refresh => match c.into_result() {
                Ok((data, _)) => {
                    let groups = PortGroups::parse(&data);
                    apply_groups(self.paths.iter_mut().map(|p| &mut p.info), &groups);
                    self.stats.refreshes += 1;
                }
                // A unit attention (the state change itself) took the
                // answer's place: ask again. Any other refusal (no ALUA)
                // waits for the next reason.
                Err(e) if e.sense().map(|s| s.key) == Some(scsi::SenseKey::UNIT_ATTENTION) => {
                    self.refresh_due.get_or_insert(Instant::now());
                }
                Err(_) => {}
            },
            Internal::Probe => {
                // Any answer from the device (GOOD, a unit attention, …)
                // shows the path carries commands again.
                let answered = match c.result {
                    Ok(ref o) => o.check().map_or_else(
                        |e| {
                            path_failure(&e, Stage::Completion)
                                .is_none_or(|(f, _)| f != PathFault::Down)
                        },
                        |()| true,
                    ),
                    Err(_) => false,
                };
                if answered {
                    let p = &mut self.paths[path];
                    tracing::info!(path = %p.info.name, "path back");
                    p.info.down = false;
                    p.down_since = None;
                    self.refresh_due.get_or_insert(Instant::now());
                }
            }
        }
    }

    /// Handles one completion from a path: internal, delivered, or moved.
    fn settle(&mut self, c: Completion, out: &mut Vec<Completion>) {
        if let Some((path, kind)) = self.internal.remove(&c.tag) {
            return self.settle_internal(path, kind, c);
        }
        let Some(mut o) = self.origins.remove(&c.tag) else {
            out.push(c);
            return;
        };
        let fault = match &c.result {
            Err(e) => path_failure(e, Stage::Completion),
            Ok(outcome) => outcome
                .check()
                .err()
                .and_then(|e| path_failure(&e, Stage::Completion)),
        };
        let Some((fault, class)) = fault else {
            out.push(Completion { tag: o.tag, ..c });
            return;
        };
        self.mark(o.path, fault);
        let whole = o.direction != DataDirection::ToDevice || c.data.len() == o.len;
        let op = Op::of_cdb(&o.cdb);
        if !whole || !class.may_retry(op) || o.attempts >= self.policy.max_attempts {
            out.push(Completion { tag: o.tag, ..c });
            return;
        }
        // Moved: at once when another path serves, else after the back-off
        // (every path transitioning or down).
        let delay = if self.paths.iter().any(|p| p.info.serves()) {
            Duration::ZERO
        } else {
            self.policy.backoff(o.attempts)
        };
        self.stats.moved += 1;
        o.attempts += 1;
        let mut data = c.data;
        if o.direction == DataDirection::FromDevice {
            data.resize(o.len);
        }
        let cmd = Command {
            cdb: o.cdb,
            direction: o.direction,
            data,
            timeout: o.timeout,
            tag: c.tag,
        };
        self.origins.insert(c.tag, o);
        self.delayed.push((Instant::now() + delay, cmd));
    }

    /// Sends delayed commands that are due; returns when the next is due.
    fn resubmit_due(&mut self, out: &mut Vec<Completion>) -> Option<Instant> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 > now || self.choose().is_none() {
                i += 1;
                continue;
            }
            let (_, cmd) = self.delayed.swap_remove(i);
            let id = cmd.tag;
            let Some(mut o) = self.origins.remove(&id) else {
                continue;
            };
            match self.send(cmd, &mut o) {
                Ok(()) => {
                    self.origins.insert(id, o);
                }
                Err(e) => out.push(Completion {
                    tag: o.tag,
                    data: e.cmd.data,
                    result: Err(e.error),
                }),
            }
        }
        self.delayed.iter().map(|(due, _)| *due).min()
    }
}

impl Transport for Multipath {
    fn submit(&mut self, mut cmd: Command) -> Result<(), SubmitError> {
        self.housekeeping();
        let id = self.id();
        let mut origin = Origin {
            tag: cmd.tag,
            cdb: cmd.cdb,
            direction: cmd.direction,
            timeout: cmd.timeout,
            len: cmd.data.len(),
            path: 0,
            attempts: 1,
        };
        cmd.tag = id;
        if self.choose().is_none() {
            // Every path's queue is full (internal commands take slots
            // too): the command waits for a free slot, sent from `reap`.
            self.origins.insert(id, origin);
            self.delayed.push((Instant::now(), cmd));
            return Ok(());
        }
        match self.send(cmd, &mut origin) {
            Ok(()) => {
                self.origins.insert(id, origin);
                Ok(())
            }
            Err(mut e) => {
                e.cmd.tag = origin.tag;
                Err(e)
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        let before = out.len();
        let deadline = wait.map(|w| Instant::now() + w);
        let mut got = Vec::new();
        loop {
            self.housekeeping();
            let next_due = self.resubmit_due(out);
            let busy: Vec<usize> = (0..self.paths.len())
                .filter(|&i| self.paths[i].transport.in_flight() > 0)
                .collect();
            if out.len() > before || (self.origins.is_empty() && busy.is_empty()) {
                break;
            }
            if self.origins.is_empty() {
                // Only internal commands: collect what is ready, wait for nothing.
                for &i in &busy {
                    got.clear();
                    self.paths[i]
                        .transport
                        .reap(&mut got, Some(Duration::ZERO))?;
                    for c in got.drain(..) {
                        self.settle(c, out);
                    }
                }
                break;
            }
            let now = Instant::now();
            let mut w = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(due) = next_due {
                let until = due.saturating_duration_since(now);
                w = Some(w.map_or(until, |w| w.min(until)));
            }
            if busy.len() > 1 {
                w = Some(w.map_or(POLL_SLICE, |w| w.min(POLL_SLICE)));
            }
            if busy.is_empty() {
                std::thread::sleep(w.unwrap_or(POLL_SLICE));
            } else {
                let each = w;
                for i in busy {
                    got.clear();
                    self.paths[i].transport.reap(&mut got, each)?;
                    for c in got.drain(..) {
                        self.settle(c, out);
                    }
                }
            }
            if out.len() > before || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        Ok(out.len() - before)
    }

    fn in_flight(&self) -> usize {
        self.origins.len()
    }

    fn queue_depth(&self) -> usize {
        self.paths
            .iter()
            .map(|p| p.transport.queue_depth())
            .min()
            .unwrap_or(1)
            .max(1)
    }

    fn describe(&self) -> String {
        let names: Vec<String> = self
            .paths
            .iter()
            .map(|p| format!("{} [{}]", p.info.name, p.info.summary()))
            .collect();
        format!("multipath {{{}}}", names.join(", "))
    }
}
