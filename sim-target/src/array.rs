//! The array: LUNs, initiators and their unit attentions, command dispatch,
//! the SPC/SBC subset, and the vendor-command extension point.

mod sbc;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use scsi::cdb::{Cdb, PageControl, RwFlags, VendorCdb};
use scsi::inquiry::{version_descriptor, BlockLimits, Designator, StandardInquiry, VpdPage};
use scsi::provisioning::LogicalBlockProvisioning;
use scsi::supported::{self, AllCommands, CommandDescriptor, OneCommand, Timeouts};
use scsi::{Asc, DataDirection, Opcode, ScsiStatus, Sense, SenseKey};

use crate::alua::{Alua, Verdict};
use crate::commands::{self, Command};
use crate::lun::{LunConfig, LunStore};
use crate::pr::{self, Access, PrError, Reservations};
use crate::task::{InitiatorId, Task, TaskResult};
use crate::ConfigError;

/// The vendor-specific commands of a transport group plug in here.
///
/// The array handles SPC/SBC itself and hands every CDB whose opcode is in
/// 0xC0–0xFF to the installed handler, after the checks every command gets
/// (LUN exists, the handler implements the opcode, the CDB parses as a
/// [`VendorCdb`], then unit attention). A handler may complete the task at
/// once or keep it and complete it later from any thread — that is how a
/// long-poll is held — but it must complete every task it keeps, exactly
/// once, unless the task is aborted in the meantime: a handler holding a
/// task checks [`Task::is_aborted`] before giving it data it cannot give
/// twice (a dequeued message), and drops an aborted task instead (see
/// [`Reply`](crate::task::Reply)).
pub trait VendorHandler: Send + Sync {
    /// The data direction of `opcode`, or `None` if this handler does not
    /// implement it (the array then answers INVALID COMMAND OPERATION CODE
    /// at once). Front ends that receive no direction from the initiator
    /// (TCMU) use this to set up the data phase.
    fn direction(&self, opcode: Opcode) -> Option<DataDirection>;

    /// Executes a vendor command addressed to `lun`.
    fn execute(&self, lun: &Arc<Lun>, cdb: VendorCdb, task: Task);
}

/// One logical unit of the array.
#[derive(Debug)]
pub struct Lun {
    id: u64,
    config: LunConfig,
    store: LunStore,
    /// Pending unit attentions per initiator, oldest first.
    attentions: Mutex<HashMap<InitiatorId, VecDeque<Asc>>>,
    /// Persistent reservations (SPC-4 §5.14).
    reservations: Mutex<Reservations>,
    /// Target port groups and their access states (SPC-4 §5.16).
    alua: Mutex<Alua>,
    /// The standard commands it implements, with their CDB usage data.
    commands: Vec<Command>,
}

impl Lun {
    /// The LUN number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Geometry and identity.
    pub fn config(&self) -> &LunConfig {
        &self.config
    }

    /// The LUN's data.
    pub fn store(&self) -> &LunStore {
        &self.store
    }

    fn raise(&self, initiators: &[InitiatorId], asc: Asc) {
        let mut ua = self.attentions.lock().unwrap_or_else(|e| e.into_inner());
        for i in initiators {
            let queue = ua.entry(*i).or_default();
            if !queue.contains(&asc) {
                queue.push_back(asc);
            }
        }
    }

    fn take_attention(&self, initiator: InitiatorId) -> Option<Asc> {
        let mut ua = self.attentions.lock().unwrap_or_else(|e| e.into_inner());
        ua.get_mut(&initiator).and_then(VecDeque::pop_front)
    }

    /// The table entry of a standard command, or the sense a command the
    /// LUN does not implement gets: INVALID FIELD IN CDB at the service
    /// action for an opcode it implements other service actions of,
    /// INVALID COMMAND OPERATION CODE otherwise.
    fn command(&self, opcode: Opcode, service_action: Option<u8>) -> Result<&Command, Sense> {
        let mut opcode_known = false;
        for c in &self.commands {
            if c.opcode == opcode {
                if c.service_action == service_action {
                    return Ok(c);
                }
                opcode_known = true;
            }
        }
        Err(if opcode_known && service_action.is_some() {
            Sense::invalid_field_in_cdb(1, Some(4))
        } else {
            unsupported_opcode()
        })
    }
}

/// Counters the array keeps, for tests and the bench tool.
#[derive(Debug, Default)]
pub struct ArrayStats {
    /// Commands received.
    pub commands: AtomicU64,
    /// Commands answered with CHECK CONDITION.
    pub check_conditions: AtomicU64,
    /// Data-out bytes written to LUN storage.
    pub bytes_written: AtomicU64,
    /// Data-in bytes read from LUN storage.
    pub bytes_read: AtomicU64,
}

struct Inner {
    luns: RwLock<BTreeMap<u64, Arc<Lun>>>,
    /// Every nexus: its id, its name, and the relative target port it
    /// entered through (`None` when the front end cannot tell).
    initiators: Mutex<Vec<(InitiatorId, String, Option<u16>)>>,
    next_initiator: AtomicU32,
    vendor: RwLock<Option<Arc<dyn VendorHandler>>>,
    stats: ArrayStats,
    stall: Stall,
}

/// An armed stall of the whole array (see [`Array::stall_after`]): a fast
/// flag for the common case (none armed) and the state behind it.
#[derive(Default)]
struct Stall {
    armed: AtomicBool,
    state: Mutex<StallState>,
}

#[derive(Default)]
struct StallState {
    /// Commands still to pass before the stall begins.
    after: u64,
    /// How long it lasts once it begins.
    duration: Duration,
    /// When it ends, once it has begun.
    until: Option<Instant>,
}

impl Stall {
    /// Called for every command before it executes: counts it towards an
    /// armed stall, and waits out a stall in progress.
    fn pass(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let until = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            match s.until {
                Some(t) if now >= t => {
                    // Over: disarm (unless re-armed since, which resets `until`).
                    self.armed.store(false, Ordering::Release);
                    return;
                }
                Some(t) => t,
                None if s.after > 0 => {
                    s.after -= 1;
                    return;
                }
                None => {
                    let t = now.checked_add(s.duration).unwrap_or(now);
                    s.until = Some(t);
                    t
                }
            }
        };
        // The wait happens outside the lock, so every command arriving
        // meanwhile waits for the same end.
        let now = Instant::now();
        if until > now {
            std::thread::sleep(until - now);
        }
    }
}

/// The simulated array. Cheap to clone; clones share the same LUNs.
///
/// Every submitted [`Task`] is completed exactly once: at once for SPC/SBC
/// commands and for every error (an unknown opcode is never held), or
/// later when a vendor handler holds it.
#[derive(Clone)]
pub struct Array {
    inner: Arc<Inner>,
}

impl Default for Array {
    fn default() -> Self {
        Array::new()
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Array")
            .field("luns", &self.lun_ids())
            .finish_non_exhaustive()
    }
}

/// The largest LUN number REPORT LUNS can express with flat addressing.
pub const MAX_LUN: u64 = 0x3FFF;

impl Array {
    /// An array with no LUNs.
    pub fn new() -> Array {
        Array {
            inner: Arc::new(Inner {
                luns: RwLock::new(BTreeMap::new()),
                initiators: Mutex::new(Vec::new()),
                next_initiator: AtomicU32::new(1),
                vendor: RwLock::new(None),
                stats: ArrayStats::default(),
                stall: Stall::default(),
            }),
        }
    }

    /// Adds LUN `id`. Fails on a duplicate number or identity, or a bad
    /// configuration.
    pub fn add_lun(&self, id: u64, config: LunConfig) -> Result<Arc<Lun>, ConfigError> {
        config.validate()?;
        if id > MAX_LUN {
            return Err(ConfigError::LunOutOfRange {
                lun: id,
                max: MAX_LUN,
            });
        }
        let mut luns = self.inner.luns.write().unwrap_or_else(|e| e.into_inner());
        if luns.contains_key(&id) {
            return Err(ConfigError::DuplicateLun(id));
        }
        if let Some(other) = luns.values().find(|l| l.config.naa == config.naa) {
            return Err(ConfigError::DuplicateIdentity {
                naa: config.naa_string(),
                first: other.id,
                second: id,
            });
        }
        let lun = Arc::new(Lun {
            id,
            store: LunStore::new(config.capacity()),
            commands: commands::standard(&config),
            config,
            attentions: Mutex::new(HashMap::new()),
            reservations: Mutex::new(Reservations::new()),
            alua: Mutex::new(Alua::default()),
        });
        luns.insert(id, lun.clone());
        Ok(lun)
    }

    /// The LUN numbers, ascending.
    pub fn lun_ids(&self) -> Vec<u64> {
        let luns = self.inner.luns.read().unwrap_or_else(|e| e.into_inner());
        luns.keys().copied().collect()
    }

    /// LUN `id`, if it exists.
    pub fn lun(&self, id: u64) -> Option<Arc<Lun>> {
        let luns = self.inner.luns.read().unwrap_or_else(|e| e.into_inner());
        luns.get(&id).cloned()
    }

    /// Registers an initiator port (a new I_T nexus) and returns its id.
    /// Like LIO, a login establishes no unit attention by itself.
    ///
    /// The front end cannot tell which target port the nexus entered
    /// through (TCMU: LIO handles ALUA in the kernel), so the array applies
    /// no ALUA states to it and lists no port designators on VPD 0x83.
    pub fn login(&self, name: &str) -> InitiatorId {
        self.register(name, None)
    }

    /// Registers a nexus that entered through relative target port `port`
    /// (1 or more; every LUN is exported on every port). ALUA applies to it
    /// ([`Array::set_port_group`], [`Array::set_alua_state`]).
    pub fn login_through(&self, name: &str, port: u16) -> InitiatorId {
        self.register(name, Some(port))
    }

    fn register(&self, name: &str, port: Option<u16>) -> InitiatorId {
        let id = InitiatorId(self.inner.next_initiator.fetch_add(1, Ordering::Relaxed));
        let mut all = self
            .inner
            .initiators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.push((id, name.to_owned(), port));
        id
    }

    fn initiators(&self) -> Vec<InitiatorId> {
        let all = self
            .inner
            .initiators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(id, _, _)| *id).collect()
    }

    /// The target port nexus `initiator` entered through, if known.
    fn port_of(&self, initiator: InitiatorId) -> Option<u16> {
        let all = self
            .inner
            .initiators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.iter()
            .find(|(id, _, _)| *id == initiator)
            .and_then(|(_, _, p)| *p)
    }

    /// The target ports nexuses entered through, ascending.
    fn known_ports(&self) -> Vec<u16> {
        let all = self
            .inner
            .initiators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut ports: Vec<u16> = all.iter().filter_map(|(_, _, p)| *p).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Moves target port `port` of LUN `lun` into target port group
    /// `group` (LIO: writing the LUN's `alua_tg_pt_gp` in configfs). Group
    /// 0 is LIO's `default_tg_pt_gp`; a new group starts active/optimized.
    pub fn set_port_group(&self, lun: u64, port: u16, group: u16) {
        if let Some(l) = self.lun(lun) {
            l.alua
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_port_group(port, group);
        }
    }

    /// Sets the asymmetric access state of target port group `group` of
    /// LUN `lun` (LIO: writing the group's `alua_access_state`). When the
    /// state changes, every nexus that entered through one of the group's
    /// ports gets UNIT ATTENTION 2Ah/06h.
    pub fn set_alua_state(&self, lun: u64, group: u16, state: scsi::alua::AccessState) {
        let Some(l) = self.lun(lun) else {
            return;
        };
        let ports = {
            let mut alua = l.alua.lock().unwrap_or_else(|e| e.into_inner());
            if !alua.set_state(group, state) {
                return;
            }
            alua.ports_of(group, &self.known_ports())
        };
        let nexuses: Vec<InitiatorId> = {
            let all = self
                .inner
                .initiators
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            all.iter()
                .filter(|(_, _, p)| p.is_some_and(|p| ports.contains(&p)))
                .map(|(id, _, _)| *id)
                .collect()
        };
        l.raise(&nexuses, Asc::ASYMMETRIC_ACCESS_STATE_CHANGED);
    }

    /// Sets group `group`'s non-optimized delay on LUN `lun` (LIO's
    /// `nonop_delay_msecs`, 100 ms unless changed).
    pub fn set_nonop_delay(&self, lun: u64, group: u16, delay: Duration) {
        if let Some(l) = self.lun(lun) {
            l.alua
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_nonop_delay(group, delay);
        }
    }

    /// Simulates a power cycle: every initiator gets UNIT ATTENTION / POWER
    /// ON OCCURRED on every LUN. Data is kept (the model has no volatile cache).
    pub fn power_on(&self) {
        let initiators = self.initiators();
        for lun in self.all_luns() {
            // Nothing persists through power loss (APTPL is not offered).
            *lun.reservations.lock().unwrap_or_else(|e| e.into_inner()) = Reservations::new();
            lun.raise(&initiators, Asc::POWER_ON_OCCURRED);
        }
    }

    /// Simulates a LUN reset: every initiator gets UNIT ATTENTION / BUS
    /// DEVICE RESET FUNCTION OCCURRED on that LUN.
    pub fn reset_lun(&self, id: u64) {
        if let Some(lun) = self.lun(id) {
            lun.raise(&self.initiators(), Asc::BUS_DEVICE_RESET_OCCURRED);
        }
    }

    /// Establishes an arbitrary unit attention for every initiator on a LUN
    /// (e.g. CAPACITY DATA HAS CHANGED).
    pub fn raise_attention(&self, id: u64, asc: Asc) {
        if let Some(lun) = self.lun(id) {
            lun.raise(&self.initiators(), asc);
        }
    }

    fn all_luns(&self) -> Vec<Arc<Lun>> {
        let luns = self.inner.luns.read().unwrap_or_else(|e| e.into_inner());
        luns.values().cloned().collect()
    }

    /// Installs the vendor-command handler (replacing any previous one).
    pub fn set_vendor_handler(&self, handler: Arc<dyn VendorHandler>) {
        *self.inner.vendor.write().unwrap_or_else(|e| e.into_inner()) = Some(handler);
    }

    fn vendor(&self) -> Option<Arc<dyn VendorHandler>> {
        self.inner
            .vendor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Arms a stall of the whole array, as when a real one pauses for a
    /// controller failover, a cache flush or garbage collection: the next
    /// `commands` commands execute as usual, then the array takes no
    /// command for `duration`. The command that begins the stall and every
    /// command arriving while it lasts wait until it ends, then execute.
    /// The wait happens where the array executes the command: on the
    /// submitting thread with an in-process path (inside `submit`), on the
    /// daemon's thread behind TCMU. Counting commands rather than time
    /// makes a test's stall land at the same point of its run every time.
    /// Arming again replaces a stall not yet over.
    pub fn stall_after(&self, commands: u64, duration: Duration) {
        let stall = &self.inner.stall;
        let mut s = stall.state.lock().unwrap_or_else(|e| e.into_inner());
        *s = StallState {
            after: commands,
            duration,
            until: None,
        };
        stall.armed.store(true, Ordering::Release);
    }

    /// Whether a stall is armed (or over but not yet noticed by a command).
    #[cfg(test)]
    pub(crate) fn stall_armed(&self) -> bool {
        self.inner.stall.armed.load(Ordering::Acquire)
    }

    /// The array's counters.
    pub fn stats(&self) -> &ArrayStats {
        &self.inner.stats
    }

    /// The data direction a CDB implies, for front ends that are not told
    /// (TCMU). `None` for a CDB the array cannot parse or an unknown vendor
    /// opcode (such commands fail before any data moves).
    pub fn direction_of(&self, cdb: &[u8]) -> Option<DataDirection> {
        let op = Opcode(*cdb.first()?);
        if op.is_vendor_specific() {
            return self.vendor()?.direction(op);
        }
        Cdb::parse(cdb).ok()?.direction()
    }

    /// Executes a task. The task's reply is completed exactly once, now or
    /// (for a held vendor command) later. A stall armed with
    /// [`Array::stall_after`] delays it first.
    ///
    /// The order is LIO's: the CDB is parsed first, and everything found
    /// wrong then (unsupported opcode, invalid field, LBA out of range,
    /// oversize transfer, a data phase that does not match the CDB) is
    /// reported as ILLEGAL REQUEST without touching a pending unit
    /// attention. The unit attention check comes only just before
    /// execution: INQUIRY and REPORT LUNS pass through, REQUEST SENSE
    /// reports and clears it (as its data), anything else fails with it
    /// and clears it. Then, as LIO's `__target_execute_cmd`, the ALUA
    /// state of the nexus's target port group ([`crate::alua`]), then the
    /// persistent reservation.
    pub fn submit(&self, task: Task) {
        self.inner.stall.pass();
        let stats = &self.inner.stats;
        stats.commands.fetch_add(1, Ordering::Relaxed);
        let Some(lun) = self.lun(task.lun) else {
            return self.no_such_lun(task);
        };

        // 1. Parse.
        let parsed = match self.parse(&task) {
            Ok(p) => p,
            Err(sense) => return self.fail(task, sense),
        };

        // 2. What LIO checks while parsing: range, length, direction.
        if let Parsed::Standard(cdb) = &parsed {
            if let Err(sense) = Self::check_cdb(&lun, cdb, &task) {
                return self.fail(task, sense);
            }
        }

        // 3. Unit attention (SAM-5 §5.14, at LIO's point: just before
        // execution). REQUEST SENSE reports and clears it when it executes.
        match parsed.opcode() {
            Opcode::INQUIRY | Opcode::REPORT_LUNS | Opcode::REQUEST_SENSE => {}
            _ => {
                if let Some(asc) = lun.take_attention(task.initiator) {
                    return self.fail(task, Sense::new(SenseKey::UNIT_ATTENTION, asc));
                }
            }
        }

        // 4. ALUA: the state of the target port group the nexus entered
        // through (LIO's target_alua_state_check).
        if let Some(port) = self.port_of(task.initiator) {
            let verdict = {
                let alua = lun.alua.lock().unwrap_or_else(|e| e.into_inner());
                match &parsed {
                    Parsed::Standard(cdb) => alua.check(port, cdb),
                    Parsed::Vendor(_, cdb) => alua.check(port, &Cdb::Vendor(*cdb)),
                }
            };
            match verdict {
                Verdict::Pass => {}
                Verdict::Delay(d) => std::thread::sleep(d),
                Verdict::Refuse(sense) => return self.fail(task, sense),
            }
        }

        // 5. Persistent reservations: a command another initiator's
        // reservation shuts this one out of ends in RESERVATION CONFLICT.
        if let Parsed::Standard(cdb) = &parsed {
            let access = match cdb {
                Cdb::Read10 { .. }
                | Cdb::Read16 { .. }
                | Cdb::Verify10 { .. }
                | Cdb::Verify16 { .. } => Access::Read,
                Cdb::Write10 { .. }
                | Cdb::Write16 { .. }
                | Cdb::WriteSame10 { .. }
                | Cdb::WriteSame16 { .. }
                | Cdb::CompareAndWrite { .. }
                | Cdb::Unmap { .. }
                | Cdb::SynchronizeCache10 { .. }
                | Cdb::SynchronizeCache16 { .. } => Access::Write,
                _ => Access::Other,
            };
            let conflict = lun
                .reservations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .conflicts(task.initiator, access);
            if conflict {
                return task.complete(TaskResult::status(ScsiStatus::RESERVATION_CONFLICT));
            }
        }

        // 6. Execute.
        match parsed {
            Parsed::Standard(cdb) => self.execute(&lun, cdb, task),
            Parsed::Vendor(handler, cdb) => handler.execute(&lun, cdb, task),
        }
    }

    /// Parses the task's CDB: an SPC/SBC command of the subset, or a vendor
    /// command the installed handler implements.
    fn parse(&self, task: &Task) -> Result<Parsed, Sense> {
        let op = task.cdb.opcode();
        if op.is_vendor_specific() {
            let handler = self
                .vendor()
                .filter(|h| h.direction(op).is_some())
                .ok_or_else(unsupported_opcode)?;
            return match Cdb::parse(task.cdb.as_slice()) {
                Ok(Cdb::Vendor(cdb)) => Ok(Parsed::Vendor(handler, cdb)),
                // A vendor opcode parses as a vendor CDB or not at all.
                Ok(_) => Err(unsupported_opcode()),
                Err(e) => Err(e.to_sense()),
            };
        }
        match Cdb::parse(task.cdb.as_slice()) {
            Ok(Cdb::Vendor(_)) => Err(unsupported_opcode()),
            Ok(cdb) => Ok(Parsed::Standard(cdb)),
            Err(e) => Err(e.to_sense()),
        }
    }

    /// The checks LIO makes while parsing a CDB (`sbc_parse_cdb`,
    /// `target_cmd_size_check`), before any unit attention is reported;
    /// and every CDB bit outside the command's usage data refused
    /// ([`commands`]), where LIO checks only some of them (DPO/FUA without
    /// DPOFUA, RDPROTECT/WRPROTECT without protection).
    fn check_cdb(lun: &Lun, cdb: &Cdb, task: &Task) -> Result<(), Sense> {
        // A data phase set up the wrong way round cannot be served.
        if let Some(expected) = cdb.direction() {
            let moves = cdb
                .transfer_len(lun.config.block_size)
                .is_some_and(|n| n > 0);
            if moves && task.direction != expected && task.reply.data_len() > 0 {
                return Err(invalid_field_without_pointer());
            }
        }
        // The command must be one of the LUN's, and set no bit its usage
        // data does not have.
        lun.command(cdb.opcode(), service_action(cdb))?
            .check(task.cdb.as_slice())?;
        let c = &lun.config;
        match *cdb {
            // As LIO (and SBC-2): the obsolete LBA only with PMI set.
            Cdb::ReadCapacity10 => {
                let raw = task.cdb.as_slice();
                if raw.get(8).is_some_and(|b| b & 1 == 0)
                    && raw.get(2..6).is_some_and(|lba| lba.iter().any(|&b| b != 0))
                {
                    return Err(Sense::invalid_field_in_cdb(2, Some(7)));
                }
                Ok(())
            }
            Cdb::Verify10 {
                lba,
                blocks,
                bytchk,
                ..
            } => Self::check_verify(lun, lba.into(), blocks.into(), bytchk, task),
            Cdb::Verify16 {
                lba,
                blocks,
                bytchk,
                ..
            } => Self::check_verify(lun, lba, blocks.into(), bytchk, task),
            Cdb::WriteSame10 { lba, blocks, .. } => {
                Self::check_write_same(lun, lba.into(), blocks.into(), 7, task)
            }
            Cdb::WriteSame16 { lba, blocks, .. } => {
                Self::check_write_same(lun, lba, blocks.into(), 10, task)
            }
            Cdb::CompareAndWrite { lba, blocks, .. } => {
                // MAXIMUM COMPARE AND WRITE LENGTH is 1, as LIO's.
                if blocks > 1 {
                    return Err(Sense::invalid_field_in_cdb(13, Some(7)));
                }
                Self::check_range(lun, lba, blocks.into())?;
                // A data CDB to LIO: the data-out must be exactly both halves.
                if task.reply.data_len() as u64 != 2 * Self::byte_len(lun, blocks.into()) {
                    return Err(Sense::new(
                        SenseKey::ILLEGAL_REQUEST,
                        Asc::INVALID_FIELD_IN_COMMAND_IU,
                    ));
                }
                Ok(())
            }
            Cdb::Unmap { param_len, .. } => {
                // Less data-out than the parameter list length: the
                // transfer is refused whole (LIO's overflow of a control CDB).
                if task.reply.data_len() < usize::from(param_len) {
                    return Err(invalid_field_without_pointer());
                }
                Ok(())
            }
            Cdb::GetLbaStatus { lba, .. } if lba >= c.blocks => {
                Err(Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE)
                    .with_information(lba))
            }
            _ => Self::check_transfer_cdb(lun, cdb, task),
        }
    }

    /// VERIFY: the range; with BYTCHK, at least the blocks' bytes of
    /// data-out (more is ignored, as LIO, which sees a control CDB).
    fn check_verify(
        lun: &Lun,
        lba: u64,
        blocks: u64,
        bytchk: u8,
        task: &Task,
    ) -> Result<(), Sense> {
        Self::check_range(lun, lba, blocks)?;
        if bytchk != 0 && (task.reply.data_len() as u64) < Self::byte_len(lun, blocks) {
            return Err(invalid_field_without_pointer());
        }
        Ok(())
    }

    /// WRITE SAME: a non-zero block count (WSNZ) within MAXIMUM WRITE SAME
    /// LENGTH (`count_at`: the NUMBER OF LOGICAL BLOCKS byte), the range,
    /// and exactly one block of data-out.
    fn check_write_same(
        lun: &Lun,
        lba: u64,
        blocks: u64,
        count_at: u16,
        task: &Task,
    ) -> Result<(), Sense> {
        if blocks == 0 || blocks > u64::from(lun.config.max_write_same_blocks) {
            return Err(Sense::invalid_field_in_cdb(count_at, Some(7)));
        }
        Self::check_range(lun, lba, blocks)?;
        if task.reply.data_len() as u64 != Self::byte_len(lun, 1) {
            return Err(invalid_field_without_pointer());
        }
        Ok(())
    }

    /// READ, WRITE and SYNCHRONIZE CACHE: range, transfer limit and length.
    fn check_transfer_cdb(lun: &Lun, cdb: &Cdb, task: &Task) -> Result<(), Sense> {
        match *cdb {
            Cdb::Read10 { lba, blocks, .. } => {
                Self::check_read(lun, lba.into(), blocks.into(), task)
            }
            Cdb::Read16 { lba, blocks, .. } => Self::check_read(lun, lba, blocks.into(), task),
            Cdb::Write10 { lba, blocks, .. } => {
                Self::check_write(lun, lba.into(), blocks.into(), task)
            }
            Cdb::Write16 { lba, blocks, .. } => Self::check_write(lun, lba, blocks.into(), task),
            Cdb::SynchronizeCache10 { lba, blocks, .. } => {
                Self::check_range(lun, lba.into(), blocks.into())
            }
            Cdb::SynchronizeCache16 { lba, blocks, .. } => {
                Self::check_range(lun, lba, blocks.into())
            }
            _ => Ok(()),
        }
    }

    fn fail(&self, task: Task, sense: Sense) {
        self.inner
            .stats
            .check_conditions
            .fetch_add(1, Ordering::Relaxed);
        task.fail(sense);
    }

    fn no_such_lun(&self, task: Task) {
        match Cdb::parse(task.cdb.as_slice()) {
            Ok(Cdb::Inquiry {
                evpd: false,
                alloc_len,
                ..
            }) => {
                // As LIO answers for a LUN it does not have (byte 0 = 0x3F):
                // peripheral qualifier 001b (no logical unit connected
                // here), device type 0x1F (unknown or no device type).
                let mut inq = self.standard_inquiry(None);
                inq.peripheral_qualifier = 1;
                inq.device_type = 0x1F;
                task.respond(&inq.to_bytes(), alloc_len.into());
            }
            Ok(Cdb::ReportLuns {
                select_report,
                alloc_len,
            }) => self.report_luns(select_report, alloc_len, task),
            Ok(Cdb::RequestSense { desc: true, .. }) => {
                self.fail(task, Self::request_sense_desc_unsupported())
            }
            Ok(Cdb::RequestSense {
                desc: false,
                alloc_len,
            }) => {
                let sense = Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
                task.respond(&sense.to_fixed(), alloc_len.into());
            }
            _ => self.fail(
                task,
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LOGICAL_UNIT_NOT_SUPPORTED),
            ),
        }
    }

    /// Executes a parsed command that passed [`check_cdb`](Self::check_cdb)
    /// and the unit attention step.
    fn execute(&self, lun: &Arc<Lun>, cdb: Cdb, task: Task) {
        match cdb {
            Cdb::TestUnitReady => task.complete(TaskResult::good(0)),
            Cdb::RequestSense { desc: true, .. } => {
                // LIO (spc_emulate_request_sense) refuses descriptor format,
                // and the unit attention stays pending.
                self.fail(task, Self::request_sense_desc_unsupported())
            }
            Cdb::RequestSense {
                desc: false,
                alloc_len,
            } => {
                // Reports and clears the oldest unit attention, if any.
                let sense = match lun.take_attention(task.initiator) {
                    Some(asc) => Sense::new(SenseKey::UNIT_ATTENTION, asc),
                    None => Sense::new(SenseKey::NO_SENSE, Asc::NO_ADDITIONAL_SENSE),
                };
                task.respond(&sense.to_fixed(), alloc_len.into());
            }
            Cdb::Inquiry {
                evpd,
                page_code,
                alloc_len,
            } => self.inquiry(lun, evpd, page_code, alloc_len, task),
            Cdb::ReportTargetPortGroups {
                extended,
                alloc_len,
            } => {
                // LIO: an allocation length shorter than the header is an
                // invalid CDB field; a longer one clips the data.
                if alloc_len < if extended { 8 } else { 4 } {
                    return self.fail(task, invalid_field_without_pointer());
                }
                let data = lun
                    .alua
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .report(&self.known_ports(), extended)
                    .to_bytes();
                task.respond(&data, alloc_len as usize)
            }
            Cdb::ReportLuns {
                select_report,
                alloc_len,
            } => self.report_luns(select_report, alloc_len, task),
            Cdb::ReadCapacity10 => {
                let last = (lun.config.blocks - 1).min(u64::from(u32::MAX)) as u32;
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&last.to_be_bytes());
                b[4..].copy_from_slice(&lun.config.block_size.to_be_bytes());
                task.respond(&b, 8);
            }
            Cdb::ReadCapacity16 { alloc_len } => {
                let mut b = [0u8; 32];
                b[..8].copy_from_slice(&(lun.config.blocks - 1).to_be_bytes());
                b[8..12].copy_from_slice(&lun.config.block_size.to_be_bytes());
                if lun.config.thin {
                    // LBPME, and LBPRZ: a deallocated block reads as zeros.
                    b[14] = 0x80 | 0x40;
                }
                task.respond(&b, alloc_len as usize);
            }
            Cdb::ModeSense6 {
                dbd,
                page_control,
                page_code,
                subpage,
                alloc_len,
            } => self.mode_sense(
                lun,
                ModeSense {
                    ten: false,
                    llbaa: false,
                    dbd,
                    page_control,
                    page_code,
                    subpage,
                },
                alloc_len.into(),
                task,
            ),
            Cdb::ModeSense10 {
                llbaa,
                dbd,
                page_control,
                page_code,
                subpage,
                alloc_len,
            } => self.mode_sense(
                lun,
                ModeSense {
                    ten: true,
                    llbaa,
                    dbd,
                    page_control,
                    page_code,
                    subpage,
                },
                alloc_len.into(),
                task,
            ),
            Cdb::Read10 { lba, blocks, flags } => {
                self.read(lun, lba.into(), blocks.into(), flags, task)
            }
            Cdb::Read16 { lba, blocks, flags } => self.read(lun, lba, blocks.into(), flags, task),
            Cdb::Write10 { lba, blocks, flags } => {
                self.write(lun, lba.into(), blocks.into(), flags, task)
            }
            Cdb::Write16 { lba, blocks, flags } => self.write(lun, lba, blocks.into(), flags, task),
            Cdb::Verify10 {
                lba,
                blocks,
                bytchk,
                ..
            } => self.verify(lun, lba.into(), blocks.into(), bytchk, task),
            Cdb::Verify16 {
                lba,
                blocks,
                bytchk,
                ..
            } => self.verify(lun, lba, blocks.into(), bytchk, task),
            Cdb::WriteSame10 { lba, blocks, unmap } => {
                self.write_same(lun, lba.into(), blocks.into(), unmap, task)
            }
            Cdb::WriteSame16 { lba, blocks, unmap } => {
                self.write_same(lun, lba, blocks.into(), unmap, task)
            }
            Cdb::CompareAndWrite { lba, blocks, .. } => {
                self.compare_and_write(lun, lba, blocks.into(), task)
            }
            Cdb::Unmap { param_len, .. } => self.unmap(lun, param_len, task),
            Cdb::GetLbaStatus { lba, alloc_len } => self.get_lba_status(lun, lba, alloc_len, task),
            // Write-through model (WCE = 0): nothing to flush; the range
            // (zero blocks meaning "to the end") was checked with the CDB.
            Cdb::SynchronizeCache10 { .. } | Cdb::SynchronizeCache16 { .. } => {
                task.complete(TaskResult::good(0))
            }
            Cdb::ReportSupportedOpcodes {
                rctd,
                reporting_options,
                opcode,
                service_action,
                alloc_len,
            } => self.report_opcodes(
                lun,
                RsocRequest {
                    rctd,
                    options: reporting_options,
                    opcode,
                    service_action,
                },
                alloc_len,
                task,
            ),
            Cdb::PersistentReserveIn {
                service_action,
                alloc_len,
            } => {
                let data = {
                    let r = lun.reservations.lock().unwrap_or_else(|e| e.into_inner());
                    match service_action {
                        pr::read::KEYS => r.read_keys(),
                        pr::read::RESERVATION => r.read_reservation(),
                        pr::read::CAPABILITIES => Reservations::report_capabilities(),
                        _ => return self.fail(task, Sense::invalid_field_in_cdb(1, Some(4))),
                    }
                };
                task.respond(&data, alloc_len.into());
            }
            Cdb::PersistentReserveOut {
                service_action,
                scope,
                pr_type,
                param_len,
            } => self.persistent_reserve_out(lun, service_action, scope, pr_type, param_len, task),
            // Parsed as a vendor command, never a standard one.
            Cdb::Vendor(_) => self.fail(task, unsupported_opcode()),
            // Cdb is non-exhaustive across crate versions: anything this
            // model does not implement is an unsupported command.
            #[allow(unreachable_patterns)]
            _ => self.fail(task, unsupported_opcode()),
        }
    }

    fn persistent_reserve_out(
        &self,
        lun: &Arc<Lun>,
        action: u8,
        scope: u8,
        kind: u8,
        param_len: u32,
        task: Task,
    ) {
        let len = usize::try_from(param_len).unwrap_or(usize::MAX);
        if len != pr::PARAM_LEN || task.reply.data_len() < len {
            return self.fail(
                task,
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::PARAMETER_LIST_LENGTH_ERROR),
            );
        }
        let mut params = [0u8; pr::PARAM_LEN];
        let got = task.reply.read_out(0, &mut params);
        if got != params.len() {
            return self.fail(
                task,
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::PARAMETER_LIST_LENGTH_ERROR),
            );
        }
        let result = lun
            .reservations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .out(task.initiator, action, scope, kind, &params);
        match result {
            Ok(told) => {
                for (initiator, asc) in told {
                    lun.raise(&[initiator], asc);
                }
                task.complete(TaskResult::good(0));
            }
            Err(PrError::Conflict) => {
                task.complete(TaskResult::status(ScsiStatus::RESERVATION_CONFLICT))
            }
            Err(PrError::Check(sense)) => self.fail(task, sense),
        }
    }

    /// REQUEST SENSE with DESC = 1: INVALID FIELD IN CDB at byte 1, bit 0.
    fn request_sense_desc_unsupported() -> Sense {
        Sense::invalid_field_in_cdb(1, Some(0))
    }

    /// Checks `[lba, lba + blocks)` against the capacity.
    fn check_range(lun: &Lun, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= lun.config.blocks => Ok(()),
            _ => {
                Err(Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LBA_OUT_OF_RANGE)
                    .with_information(lba))
            }
        }
    }

    /// Checks a READ or WRITE transfer against the capacity and the LUN's
    /// transfer limit.
    fn check_transfer(lun: &Lun, lba: u64, blocks: u64) -> Result<(), Sense> {
        Self::check_range(lun, lba, blocks)?;
        if blocks > u64::from(lun.config.max_transfer_blocks) {
            // LIO refuses a transfer over its max sectors with a plain
            // INVALID FIELD IN CDB: no sense-key-specific field pointer.
            return Err(invalid_field_without_pointer());
        }
        Ok(())
    }

    /// [`check_transfer`](Self::check_transfer), and the data-out length
    /// must equal the CDB's transfer length.
    fn check_write(lun: &Lun, lba: u64, blocks: u64, task: &Task) -> Result<(), Sense> {
        Self::check_transfer(lun, lba, blocks)?;
        // A short write would leave blocks half-written and an overlong one
        // has no place to go: refused before anything is stored, as LIO's
        // target_cmd_size_check refuses a WRITE whose data length differs
        // from the CDB: INVALID FIELD IN COMMAND INFORMATION UNIT (seen on
        // the 6.1 kernel's ramdisk backstore in the test VM).
        if task.reply.data_len() as u64 != Self::byte_len(lun, blocks) {
            return Err(Sense::new(
                SenseKey::ILLEGAL_REQUEST,
                Asc::INVALID_FIELD_IN_COMMAND_IU,
            ));
        }
        Ok(())
    }

    /// [`check_transfer`](Self::check_transfer), and the data-in buffer
    /// must hold the whole transfer: LIO refuses a READ into a shorter
    /// buffer with INVALID FIELD IN CDB (no field pointer); a longer one is
    /// fine and leaves a residual.
    fn check_read(lun: &Lun, lba: u64, blocks: u64, task: &Task) -> Result<(), Sense> {
        Self::check_transfer(lun, lba, blocks)?;
        if (task.reply.data_len() as u64) < Self::byte_len(lun, blocks) {
            return Err(invalid_field_without_pointer());
        }
        Ok(())
    }

    /// Bytes in `blocks` blocks of the LUN (checked to fit the transfer
    /// limit, so at most 2^32 × 64 KiB: no overflow).
    fn byte_len(lun: &Lun, blocks: u64) -> u64 {
        blocks.saturating_mul(u64::from(lun.config.block_size))
    }

    fn read(&self, lun: &Arc<Lun>, lba: u64, blocks: u64, _flags: RwFlags, mut task: Task) {
        let bytes = usize::try_from(Self::byte_len(lun, blocks)).unwrap_or(usize::MAX);
        // A short buffer gets what fits; the residual tells the initiator.
        let n = bytes.min(task.reply.data_len());
        let offset = lba * u64::from(lun.config.block_size);
        let reply = &mut task.reply;
        let mut written = 0;
        lun.store.read_with(offset, n, |at, src| {
            written += reply.write_in(at, src);
        });
        self.inner
            .stats
            .bytes_read
            .fetch_add(written as u64, Ordering::Relaxed);
        task.complete(TaskResult::good(written));
    }

    fn write(&self, lun: &Arc<Lun>, lba: u64, blocks: u64, _flags: RwFlags, task: Task) {
        // check_write made sure the data-out length is exactly this.
        let bytes = usize::try_from(Self::byte_len(lun, blocks)).unwrap_or(usize::MAX);
        let offset = lba * u64::from(lun.config.block_size);
        let reply = &task.reply;
        lun.store.write_with(offset, bytes, |at, dst| {
            let got = reply.read_out(at, dst);
            // The reply promised data_len bytes; zero-fill if it broke that.
            dst[got..].fill(0);
        });
        self.inner
            .stats
            .bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
        task.complete(TaskResult::good(0));
    }

    fn standard_inquiry(&self, lun: Option<&Lun>) -> StandardInquiry {
        let (vendor, product, revision) = match lun {
            Some(l) => (
                l.config.vendor.clone(),
                l.config.product.clone(),
                l.config.revision.clone(),
            ),
            None => ("STP".into(), "SIM-ARRAY".into(), "0001".into()),
        };
        StandardInquiry {
            peripheral_qualifier: 0,
            device_type: 0,
            removable: false,
            version: 6,
            normaca: false,
            // As LIO (spc_emulate_inquiry_std): NORMACA and HISUP clear.
            hisup: false,
            response_data_format: 2,
            tpgs: 0,
            protect: false,
            cmdque: true,
            vendor,
            product,
            revision,
            // As LIO: SAM-5, the transport (LIO leaves the slot empty for a
            // transport it does not know, and the model knows none), SPC-4,
            // SBC-3.
            version_descriptors: vec![
                version_descriptor::SAM5,
                0,
                version_descriptor::SPC4,
                version_descriptor::SBC3,
            ],
        }
    }

    /// The VPD pages of `lun` as seen by a nexus that entered through
    /// `port` (LIO lists the port's relative target port and target port
    /// group designators on page 0x83).
    fn vpd_pages(lun: &Lun, port: Option<u16>) -> Vec<VpdPage> {
        let c = &lun.config;
        let mut t10 = format!("{:<8}", c.vendor).into_bytes();
        t10.extend_from_slice(c.serial.as_bytes());
        let port_designators = port.map(|p| {
            let group = lun
                .alua
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .group_id(p);
            scsi::alua::PortIdentity::designators(p, group)
        });
        let chunk_blocks = (crate::lun::CHUNK as u32 / c.block_size).max(1);
        let (max_unmap_lba_count, max_unmap_descriptor_count, optimal_unmap_granularity) = if c.thin
        {
            (c.max_unmap_blocks, c.max_unmap_descriptors, chunk_blocks)
        } else {
            (0, 0, 0)
        };
        let provisioning = LogicalBlockProvisioning {
            lbpu: c.thin,
            lbpws: c.thin,
            lbpws10: c.thin,
            lbprz: c.thin,
            ..LogicalBlockProvisioning::default()
        };
        vec![
            VpdPage::SupportedPages(vec![0x00, 0x80, 0x83, 0xB0, 0xB2]),
            VpdPage::UnitSerialNumber(c.serial.clone()),
            VpdPage::DeviceIdentification(
                vec![
                    Designator::naa(c.naa.to_vec()),
                    Designator {
                        protocol_id: 0,
                        code_set: scsi::inquiry::CodeSet::ASCII,
                        piv: false,
                        association: scsi::inquiry::Association::LOGICAL_UNIT,
                        kind: scsi::inquiry::DesignatorType::T10_VENDOR_ID,
                        value: t10,
                    },
                ]
                .into_iter()
                .chain(port_designators.into_iter().flatten())
                .collect(),
            ),
            VpdPage::BlockLimits(BlockLimits {
                // As LIO: WRITE SAME of zero blocks is refused.
                wsnz: true,
                max_compare_and_write: 1,
                optimal_transfer_granularity: 1,
                max_transfer_length: c.max_transfer_blocks,
                optimal_transfer_length: c.max_transfer_blocks,
                max_prefetch_length: 0,
                max_unmap_lba_count,
                max_unmap_descriptor_count,
                optimal_unmap_granularity,
                unmap_granularity_alignment: None,
                max_write_same_length: c.max_write_same_blocks.into(),
            }),
            VpdPage::Other {
                page_code: LogicalBlockProvisioning::PAGE_CODE,
                data: provisioning.body(),
            },
        ]
    }

    fn inquiry(&self, lun: &Lun, evpd: bool, page: u8, alloc_len: u16, task: Task) {
        if !evpd {
            let mut inq = self.standard_inquiry(Some(lun));
            if self.port_of(task.initiator).is_some() {
                // ALUA applies to this nexus: TPGS 01b, implicit (REPORT
                // TARGET PORT GROUPS). LIO says 11b, implicit and explicit;
                // the model has no SET TARGET PORT GROUPS.
                inq.tpgs = 1;
            }
            return task.respond(&inq.to_bytes(), alloc_len.into());
        }
        match Self::vpd_pages(lun, self.port_of(task.initiator))
            .into_iter()
            .find(|p| p.page_code() == page)
        {
            Some(p) => task.respond(&p.to_bytes(0), alloc_len.into()),
            None => self.fail(task, Sense::invalid_field_in_cdb(2, None)),
        }
    }

    /// REPORT LUNS as LIO answers it: every SELECT REPORT value gets the
    /// same list, and an allocation length under 16 (even 0) clips the
    /// data rather than failing.
    fn report_luns(&self, _select_report: u8, alloc_len: u32, task: Task) {
        let ids = self.lun_ids();
        let mut data = vec![0u8; 8];
        data[..4].copy_from_slice(&((ids.len() * 8) as u32).to_be_bytes());
        for id in ids {
            let mut entry = [0u8; 8];
            if id < 256 {
                entry[1] = id as u8; // peripheral device addressing
            } else {
                entry[0] = 0x40 | (id >> 8) as u8; // flat space addressing
                entry[1] = id as u8;
            }
            data.extend_from_slice(&entry);
        }
        task.respond(&data, alloc_len as usize);
    }

    fn mode_sense(&self, lun: &Lun, req: ModeSense, alloc_len: usize, task: Task) {
        if req.page_control == PageControl::SAVED {
            return self.fail(
                task,
                Sense::new(
                    SenseKey::ILLEGAL_REQUEST,
                    Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
                ),
            );
        }
        let changeable = req.page_control == PageControl::CHANGEABLE;
        let caching = |p: &mut Vec<u8>| {
            // Caching page: WCE = 0 (write-through), RCD = 0.
            p.extend_from_slice(&[0x08, 0x12]);
            p.extend_from_slice(&[0; 0x12]);
        };
        let control = |p: &mut Vec<u8>| {
            // Control page: D_SENSE = 0 (fixed sense), QERR = 0, unrestricted
            // reordering (QAM = 1) unless asking for the changeable mask.
            p.extend_from_slice(&[0x0A, 0x0A, 0, if changeable { 0 } else { 0x10 }]);
            p.extend_from_slice(&[0; 8]);
        };
        let mut pages = Vec::new();
        match (req.page_code, req.subpage) {
            (0x08, 0) => caching(&mut pages),
            (0x0A, 0) => control(&mut pages),
            (0x3F, 0 | 0xFF) => {
                caching(&mut pages);
                control(&mut pages);
            }
            (0x08 | 0x0A | 0x3F, _) => {
                return self.fail(task, Sense::invalid_field_in_cdb(3, None))
            }
            _ => return self.fail(task, Sense::invalid_field_in_cdb(2, Some(5))),
        }
        let blocks = lun.config.blocks;
        let bs = lun.config.block_size;
        let mut desc = Vec::new();
        if !req.dbd {
            if req.ten && req.llbaa {
                // Long LBA descriptor: NUMBER OF LOGICAL BLOCKS (8 bytes),
                // reserved (4), LOGICAL BLOCK LENGTH (4).
                desc.extend_from_slice(&blocks.to_be_bytes());
                desc.extend_from_slice(&[0; 4]);
                desc.extend_from_slice(&bs.to_be_bytes());
            } else {
                // Short descriptor (SBC): NUMBER OF LOGICAL BLOCKS (4 bytes,
                // all ones when the count does not fit), reserved (1),
                // LOGICAL BLOCK LENGTH (3).
                let n = u32::try_from(blocks).unwrap_or(u32::MAX);
                desc.extend_from_slice(&n.to_be_bytes());
                desc.extend_from_slice(&bs.to_be_bytes());
                desc[4] = 0; // reserved (the block length fits in 3 bytes)
            }
        }
        // Device-specific parameter: DPOFUA (bit 4) when the LUN has it.
        let device_specific = if lun.config.dpofua { 0x10 } else { 0 };
        let mut data = Vec::new();
        if req.ten {
            let total = 8 + desc.len() + pages.len();
            data.extend_from_slice(&((total - 2) as u16).to_be_bytes());
            data.extend_from_slice(&[0, device_specific, u8::from(req.llbaa && !req.dbd), 0]);
            data.extend_from_slice(&(desc.len() as u16).to_be_bytes());
        } else {
            let total = 4 + desc.len() + pages.len();
            data.extend_from_slice(&[(total - 1) as u8, 0, device_specific, desc.len() as u8]);
        }
        data.extend_from_slice(&desc);
        data.extend_from_slice(&pages);
        task.respond(&data, alloc_len);
    }

    /// Every command `lun` implements, as REPORT SUPPORTED OPERATION CODES
    /// lists them: the standard ones with their CDB usage data, then the
    /// vendor opcodes the installed handler implements (10-byte CDBs
    /// whose bits are all the handler's).
    fn supported_commands(&self, lun: &Lun) -> Vec<(u8, Option<u16>, Vec<u8>)> {
        let mut v: Vec<(u8, Option<u16>, Vec<u8>)> = lun
            .commands
            .iter()
            .map(|c| (c.opcode.0, c.service_action.map(u16::from), c.usage.clone()))
            .collect();
        if let Some(h) = self.vendor() {
            for op in 0xC0..=0xFFu8 {
                if h.direction(Opcode(op)).is_some() {
                    let mut usage = vec![0xFFu8; 10];
                    usage[0] = op;
                    v.push((op, None, usage));
                }
            }
        }
        v
    }

    /// REPORT SUPPORTED OPERATION CODES (SPC-4r37 §6.35). With RCTD, every
    /// descriptor carries a command timeouts descriptor, as LIO's (7.x)
    /// do: zeros, "not specified" (the model gives no command a time it
    /// could promise).
    fn report_opcodes(&self, lun: &Lun, req: RsocRequest, alloc_len: u32, task: Task) {
        let all = self.supported_commands(lun);
        let timeouts = req.rctd.then(Timeouts::default);
        let op = req.opcode;
        let known = all.iter().any(|(o, _, _)| *o == op);
        let has_sa = all.iter().any(|(o, a, _)| *o == op && a.is_some());
        // A wrong REQUESTED OPERATION CODE for the option: byte 3.
        let bad_opcode = || Sense::invalid_field_in_cdb(3, None);
        let found = match req.options {
            0 => {
                let list = AllCommands::new(
                    all.iter()
                        .map(|(op, action, usage)| CommandDescriptor {
                            opcode: *op,
                            service_action: *action,
                            cdb_len: usage.len() as u16,
                            timeouts,
                        })
                        .collect(),
                );
                return task.respond(&list.to_bytes(), alloc_len as usize);
            }
            // The operation code alone: invalid for one with service actions.
            1 if has_sa => return self.fail(task, bad_opcode()),
            1 => all.iter().find(|(o, a, _)| *o == op && a.is_none()),
            // Operation code and service action: invalid for a (supported)
            // operation code without service actions.
            2 if known && !has_sa => return self.fail(task, bad_opcode()),
            2 => all
                .iter()
                .find(|(o, a, _)| *o == op && *a == Some(req.service_action)),
            // The operation code, and the service action if it has them.
            3 => all
                .iter()
                .find(|(o, a, _)| *o == op && a.is_none_or(|a| a == req.service_action)),
            // REPORTING OPTIONS is bits 2..0 of byte 2.
            _ => return self.fail(task, Sense::invalid_field_in_cdb(2, Some(2))),
        };
        let one = match found {
            Some((_, _, usage)) => OneCommand {
                support: supported::support::SUPPORTED,
                usage: usage.clone(),
                timeouts,
            },
            // Not supported: the header with CDB SIZE 0 (LIO stops after
            // the first two bytes).
            None => OneCommand {
                support: supported::support::NOT_SUPPORTED,
                usage: Vec::new(),
                timeouts: None,
            },
        };
        task.respond(&one.to_bytes(), alloc_len as usize);
    }
}

/// A parsed CDB: a command of the SPC/SBC subset, or a vendor command with
/// the handler that implements it.
enum Parsed {
    Standard(Cdb),
    Vendor(Arc<dyn VendorHandler>, VendorCdb),
}

impl Parsed {
    fn opcode(&self) -> Opcode {
        match self {
            Parsed::Standard(cdb) => cdb.opcode(),
            Parsed::Vendor(_, cdb) => cdb.opcode,
        }
    }
}

/// The request fields of REPORT SUPPORTED OPERATION CODES.
struct RsocRequest {
    rctd: bool,
    options: u8,
    opcode: u8,
    service_action: u16,
}

/// The parameters of a MODE SENSE(6) or (10).
struct ModeSense {
    ten: bool,
    llbaa: bool,
    dbd: bool,
    page_control: PageControl,
    page_code: u8,
    subpage: u8,
}

/// The service action of a standard command that has them.
fn service_action(cdb: &Cdb) -> Option<u8> {
    match *cdb {
        Cdb::ReadCapacity16 { .. } => Some(Opcode::SA_READ_CAPACITY_16),
        Cdb::GetLbaStatus { .. } => Some(Opcode::SA_GET_LBA_STATUS),
        Cdb::ReportSupportedOpcodes { .. } => Some(Opcode::SA_REPORT_SUPPORTED_OPCODES),
        Cdb::ReportTargetPortGroups { .. } => Some(Opcode::SA_REPORT_TARGET_PORT_GROUPS),
        Cdb::PersistentReserveIn { service_action, .. }
        | Cdb::PersistentReserveOut { service_action, .. } => Some(service_action),
        _ => None,
    }
}

/// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
fn unsupported_opcode() -> Sense {
    Sense::new(
        SenseKey::ILLEGAL_REQUEST,
        Asc::INVALID_COMMAND_OPERATION_CODE,
    )
}

/// ILLEGAL REQUEST / INVALID FIELD IN CDB with no sense-key-specific bytes,
/// as LIO reports a transfer it refuses as a whole (over the transfer
/// limit, a data phase in the wrong direction, WRITE data whose length
/// differs from the CDB's): no single CDB field can be pointed at.
fn invalid_field_without_pointer() -> Sense {
    Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::INVALID_FIELD_IN_CDB)
}
