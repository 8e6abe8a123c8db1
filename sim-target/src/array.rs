//! The array: LUNs, initiators and their unit attentions, command dispatch,
//! the SPC/SBC subset, and the vendor-command extension point.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use scsi::cdb::{Cdb, PageControl, RwFlags, VendorCdb};
use scsi::inquiry::{BlockLimits, Designator, StandardInquiry, VpdPage};
use scsi::{Asc, DataDirection, Opcode, Sense, SenseKey};

use crate::lun::{LunConfig, LunStore};
use crate::task::{InitiatorId, Task, TaskResult};
use crate::ConfigError;

/// The vendor-specific commands of a transport group plug in here.
///
/// The array handles SPC/SBC itself and hands every CDB whose opcode is in
/// 0xC0–0xFF to the installed handler, after the checks every command gets
/// (LUN exists, unit attention). A handler may complete the task at once or
/// keep it and complete it later from any thread — that is how a long-poll
/// is held — but it must complete every task it keeps, exactly once.
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
    initiators: Mutex<Vec<(InitiatorId, String)>>,
    next_initiator: AtomicU32,
    vendor: RwLock<Option<Arc<dyn VendorHandler>>>,
    stats: ArrayStats,
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
            config,
            attentions: Mutex::new(HashMap::new()),
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
    pub fn login(&self, name: &str) -> InitiatorId {
        let id = InitiatorId(self.inner.next_initiator.fetch_add(1, Ordering::Relaxed));
        let mut all = self
            .inner
            .initiators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.push((id, name.to_owned()));
        id
    }

    fn initiators(&self) -> Vec<InitiatorId> {
        let all = self
            .inner
            .initiators
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(id, _)| *id).collect()
    }

    /// Simulates a power cycle: every initiator gets UNIT ATTENTION / POWER
    /// ON OCCURRED on every LUN. Data is kept (the model has no volatile cache).
    pub fn power_on(&self) {
        let initiators = self.initiators();
        for lun in self.all_luns() {
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
    /// (for a held vendor command) later.
    pub fn submit(&self, task: Task) {
        let stats = &self.inner.stats;
        stats.commands.fetch_add(1, Ordering::Relaxed);
        let op = task.cdb.opcode();
        let Some(lun) = self.lun(task.lun) else {
            return self.no_such_lun(task);
        };

        // Unit attention first (SAM-5 §5.14 via LIO's ordering): INQUIRY and
        // REPORT LUNS pass through, REQUEST SENSE reports and clears it, and
        // anything else fails with it and clears it.
        match op {
            Opcode::INQUIRY | Opcode::REPORT_LUNS => {}
            Opcode::REQUEST_SENSE => {
                if let Some(asc) = lun.take_attention(task.initiator) {
                    let sense = Sense::new(SenseKey::UNIT_ATTENTION, asc);
                    let desc = task.cdb.as_slice().get(1).is_some_and(|b| b & 1 != 0);
                    let alloc = task.cdb.as_slice().get(4).copied().unwrap_or(0) as usize;
                    let bytes = if desc {
                        sense.to_descriptor()
                    } else {
                        sense.to_fixed()
                    };
                    return task.respond(&bytes, alloc);
                }
            }
            _ => {
                if let Some(asc) = lun.take_attention(task.initiator) {
                    return self.fail(task, Sense::new(SenseKey::UNIT_ATTENTION, asc));
                }
            }
        }

        if op.is_vendor_specific() {
            return self.vendor_command(&lun, task);
        }
        match Cdb::parse(task.cdb.as_slice()) {
            Ok(cdb) => self.execute(&lun, cdb, task),
            Err(e) => self.fail(task, e.to_sense()),
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
                // Peripheral qualifier 3, device type 0x1F: no LU here.
                let mut inq = self.standard_inquiry(None);
                inq.peripheral_qualifier = 3;
                inq.device_type = 0x1F;
                task.respond(&inq.to_bytes(), alloc_len.into());
            }
            Ok(Cdb::ReportLuns {
                select_report,
                alloc_len,
            }) => self.report_luns(select_report, alloc_len, task),
            Ok(Cdb::RequestSense { desc, alloc_len }) => {
                let sense = Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LOGICAL_UNIT_NOT_SUPPORTED);
                let bytes = if desc {
                    sense.to_descriptor()
                } else {
                    sense.to_fixed()
                };
                task.respond(&bytes, alloc_len.into());
            }
            _ => self.fail(
                task,
                Sense::new(SenseKey::ILLEGAL_REQUEST, Asc::LOGICAL_UNIT_NOT_SUPPORTED),
            ),
        }
    }

    fn vendor_command(&self, lun: &Arc<Lun>, task: Task) {
        let op = task.cdb.opcode();
        let handler = self.vendor().filter(|h| h.direction(op).is_some());
        let Some(handler) = handler else {
            return self.fail(
                task,
                Sense::new(
                    SenseKey::ILLEGAL_REQUEST,
                    Asc::INVALID_COMMAND_OPERATION_CODE,
                ),
            );
        };
        match Cdb::parse(task.cdb.as_slice()) {
            Ok(Cdb::Vendor(cdb)) => handler.execute(lun, cdb, task),
            Ok(_) => unreachable_vendor(self, task),
            Err(e) => self.fail(task, e.to_sense()),
        }
    }

    fn execute(&self, lun: &Arc<Lun>, cdb: Cdb, task: Task) {
        // A data phase set up the wrong way round cannot be served.
        if let Some(expected) = cdb.direction() {
            let moves = cdb
                .transfer_len(lun.config.block_size)
                .is_some_and(|n| n > 0);
            if moves && task.direction != expected && task.reply.data_len() > 0 {
                return self.fail(task, Sense::invalid_field_in_cdb(0, None));
            }
        }
        match cdb {
            Cdb::TestUnitReady => task.complete(TaskResult::good(0)),
            Cdb::RequestSense { desc, alloc_len } => {
                let sense = Sense::new(SenseKey::NO_SENSE, Asc::NO_ADDITIONAL_SENSE);
                let bytes = if desc {
                    sense.to_descriptor()
                } else {
                    sense.to_fixed()
                };
                task.respond(&bytes, alloc_len.into());
            }
            Cdb::Inquiry {
                evpd,
                page_code,
                alloc_len,
            } => self.inquiry(lun, evpd, page_code, alloc_len, task),
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
            Cdb::SynchronizeCache10 { lba, blocks, .. } => {
                self.sync_cache(lun, lba.into(), blocks.into(), task)
            }
            Cdb::SynchronizeCache16 { lba, blocks, .. } => {
                self.sync_cache(lun, lba, blocks.into(), task)
            }
            Cdb::ReportSupportedOpcodes {
                reporting_options,
                opcode,
                service_action,
                alloc_len,
                ..
            } => self.report_opcodes(reporting_options, opcode, service_action, alloc_len, task),
            Cdb::Vendor(_) => unreachable_vendor(self, task),
            // Cdb is non-exhaustive across crate versions: anything this
            // model does not implement is an unsupported command.
            #[allow(unreachable_patterns)]
            _ => self.fail(
                task,
                Sense::new(
                    SenseKey::ILLEGAL_REQUEST,
                    Asc::INVALID_COMMAND_OPERATION_CODE,
                ),
            ),
        }
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

    /// Checks a transfer against the LUN's limits; returns its byte count.
    fn transfer_bytes(lun: &Lun, lba: u64, blocks: u64) -> Result<usize, Sense> {
        Self::check_range(lun, lba, blocks)?;
        if blocks > u64::from(lun.config.max_transfer_blocks) {
            // Byte 1 bit 0 stands for "the transfer length field" in the
            // pointer-free form LIO uses for oversize transfers.
            return Err(Sense::invalid_field_in_cdb(0, None));
        }
        Ok((blocks * u64::from(lun.config.block_size)) as usize)
    }

    fn read(&self, lun: &Arc<Lun>, lba: u64, blocks: u64, _flags: RwFlags, mut task: Task) {
        let bytes = match Self::transfer_bytes(lun, lba, blocks) {
            Ok(n) => n,
            Err(sense) => return self.fail(task, sense),
        };
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
        let bytes = match Self::transfer_bytes(lun, lba, blocks) {
            Ok(n) => n,
            Err(sense) => return self.fail(task, sense),
        };
        // The data-out length must match the CDB: a short write would leave
        // blocks half-written, so it is refused before anything is stored.
        if task.reply.data_len() != bytes {
            return self.fail(task, Sense::invalid_field_in_cdb(0, None));
        }
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

    fn sync_cache(&self, lun: &Arc<Lun>, lba: u64, blocks: u64, task: Task) {
        // Write-through model (WCE = 0): nothing to flush, but the range is
        // still checked. Zero blocks means "to the end of the medium".
        match Self::check_range(lun, lba, blocks) {
            Ok(()) => task.complete(TaskResult::good(0)),
            Err(sense) => self.fail(task, sense),
        }
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
            hisup: true,
            response_data_format: 2,
            tpgs: 0,
            protect: false,
            cmdque: true,
            vendor,
            product,
            revision,
        }
    }

    fn vpd_pages(lun: &Lun) -> Vec<VpdPage> {
        let c = &lun.config;
        let mut t10 = format!("{:<8}", c.vendor).into_bytes();
        t10.extend_from_slice(c.serial.as_bytes());
        vec![
            VpdPage::SupportedPages(vec![0x00, 0x80, 0x83, 0xB0]),
            VpdPage::UnitSerialNumber(c.serial.clone()),
            VpdPage::DeviceIdentification(vec![
                Designator::naa(c.naa.to_vec()),
                Designator {
                    protocol_id: 0,
                    code_set: scsi::inquiry::CodeSet::ASCII,
                    piv: false,
                    association: scsi::inquiry::Association::LOGICAL_UNIT,
                    kind: scsi::inquiry::DesignatorType::T10_VENDOR_ID,
                    value: t10,
                },
            ]),
            VpdPage::BlockLimits(BlockLimits {
                wsnz: false,
                max_compare_and_write: 0,
                optimal_transfer_granularity: 1,
                max_transfer_length: c.max_transfer_blocks,
                optimal_transfer_length: c.max_transfer_blocks,
                max_prefetch_length: 0,
                max_unmap_lba_count: 0,
                max_unmap_descriptor_count: 0,
                optimal_unmap_granularity: 0,
                unmap_granularity_alignment: None,
                max_write_same_length: 0,
            }),
        ]
    }

    fn inquiry(&self, lun: &Lun, evpd: bool, page: u8, alloc_len: u16, task: Task) {
        if !evpd {
            let data = self.standard_inquiry(Some(lun)).to_bytes();
            return task.respond(&data, alloc_len.into());
        }
        match Self::vpd_pages(lun)
            .into_iter()
            .find(|p| p.page_code() == page)
        {
            Some(p) => task.respond(&p.to_bytes(0), alloc_len.into()),
            None => self.fail(task, Sense::invalid_field_in_cdb(2, None)),
        }
    }

    fn report_luns(&self, select_report: u8, alloc_len: u32, task: Task) {
        if select_report > 2 {
            return self.fail(task, Sense::invalid_field_in_cdb(2, None));
        }
        if alloc_len < 16 {
            return self.fail(task, Sense::invalid_field_in_cdb(6, None));
        }
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
                desc.extend_from_slice(&blocks.to_be_bytes());
                desc.extend_from_slice(&[0; 4]);
                desc.extend_from_slice(&bs.to_be_bytes());
            } else {
                let n = blocks.min(0xFF_FFFF) as u32;
                desc.extend_from_slice(&n.to_be_bytes());
                desc.extend_from_slice(&bs.to_be_bytes());
                desc[4] = 0; // density code 0
            }
        }
        let mut data = Vec::new();
        if req.ten {
            let total = 8 + desc.len() + pages.len();
            data.extend_from_slice(&((total - 2) as u16).to_be_bytes());
            data.extend_from_slice(&[0, 0, u8::from(req.llbaa && !req.dbd), 0]);
            data.extend_from_slice(&(desc.len() as u16).to_be_bytes());
        } else {
            let total = 4 + desc.len() + pages.len();
            data.extend_from_slice(&[(total - 1) as u8, 0, 0, desc.len() as u8]);
        }
        data.extend_from_slice(&desc);
        data.extend_from_slice(&pages);
        task.respond(&data, alloc_len);
    }

    /// The commands this model implements: (opcode, service action, CDB length).
    fn supported_commands(&self) -> Vec<(u8, Option<u16>, u16)> {
        let mut v = vec![
            (Opcode::TEST_UNIT_READY.0, None, 6),
            (Opcode::REQUEST_SENSE.0, None, 6),
            (Opcode::INQUIRY.0, None, 6),
            (Opcode::MODE_SENSE_6.0, None, 6),
            (Opcode::READ_CAPACITY_10.0, None, 10),
            (Opcode::READ_10.0, None, 10),
            (Opcode::WRITE_10.0, None, 10),
            (Opcode::SYNCHRONIZE_CACHE_10.0, None, 10),
            (Opcode::MODE_SENSE_10.0, None, 10),
            (Opcode::READ_16.0, None, 16),
            (Opcode::WRITE_16.0, None, 16),
            (Opcode::SYNCHRONIZE_CACHE_16.0, None, 16),
            (
                Opcode::SERVICE_ACTION_IN_16.0,
                Some(Opcode::SA_READ_CAPACITY_16.into()),
                16,
            ),
            (Opcode::REPORT_LUNS.0, None, 12),
            (
                Opcode::MAINTENANCE_IN.0,
                Some(Opcode::SA_REPORT_SUPPORTED_OPCODES.into()),
                12,
            ),
        ];
        if let Some(h) = self.vendor() {
            for op in 0xC0..=0xFFu8 {
                if h.direction(Opcode(op)).is_some() {
                    v.push((op, None, 10));
                }
            }
        }
        v
    }

    fn report_opcodes(&self, options: u8, opcode: u8, sa: u16, alloc_len: u32, task: Task) {
        let all = self.supported_commands();
        let data = match options {
            0 => {
                let mut d = vec![0u8; 4];
                for (op, action, len) in &all {
                    d.push(*op);
                    d.push(0);
                    d.extend_from_slice(&action.unwrap_or(0).to_be_bytes());
                    d.push(0);
                    d.push(u8::from(action.is_some()));
                    d.extend_from_slice(&len.to_be_bytes());
                }
                let n = (d.len() - 4) as u32;
                d[..4].copy_from_slice(&n.to_be_bytes());
                d
            }
            1 | 2 => {
                let found = all.iter().find(|(op, action, _)| {
                    *op == opcode
                        && match (options, action) {
                            (1, None) => true,
                            (2, Some(a)) => *a == sa,
                            _ => false,
                        }
                });
                if options == 1 && all.iter().any(|(op, a, _)| *op == opcode && a.is_some()) {
                    // The opcode has service actions: option 1 is invalid for it.
                    return self.fail(task, Sense::invalid_field_in_cdb(2, Some(0)));
                }
                match found {
                    // SUPPORT = 011b: supported as the standard says; the
                    // usage map marks every bit as potentially meaningful.
                    Some((op, action, len)) => {
                        let mut d = vec![0, 0x03];
                        d.extend_from_slice(&len.to_be_bytes());
                        let mut usage = vec![0xFFu8; usize::from(*len)];
                        usage[0] = *op;
                        if let Some(a) = action {
                            usage[1] = (*a as u8) | 0xE0;
                        }
                        d.extend_from_slice(&usage);
                        d
                    }
                    // SUPPORT = 001b: not supported.
                    None => vec![0, 0x01, 0, 0],
                }
            }
            _ => return self.fail(task, Sense::invalid_field_in_cdb(2, Some(0))),
        };
        task.respond(&data, alloc_len as usize);
    }
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

/// A vendor opcode that did not parse as a vendor CDB: cannot happen with a
/// well-behaved CDB parser, answered as an unsupported command all the same.
fn unreachable_vendor(array: &Array, task: Task) {
    array.fail(
        task,
        Sense::new(
            SenseKey::ILLEGAL_REQUEST,
            Asc::INVALID_COMMAND_OPERATION_CODE,
        ),
    );
}
