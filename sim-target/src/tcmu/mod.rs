//! The TCMU front end: the array served to LIO through the kernel's
//! user-space backstore protocol (`target_core_user`), without
//! tcmu-runner (which drops vendor opcodes).
//!
//! ```text
//!  initiator ─▶ sd/sg ─▶ tcm_loop ─▶ LIO ─▶ user backstore ─▶ uio ring (mmap)
//!                                                                │
//!     discovery (every 200 ms) ─▶ one thread per device ─▶ Array::submit ─▶ StgMailbox
//! ```
//!
//! # Devices and initiators
//!
//! The daemon serves every uio device whose name is
//! `tcm-user/<hba>/<backstore>/stp/<cfg>`, with `<cfg>` =
//! `lun=<array LUN>,initiator=<name>` (see [`DeviceConfig`]). TCMU does not
//! tell user space which I_T nexus sent a command, yet the array keeps unit
//! attentions per initiator. So the set-up creates **one user backstore per
//! (LUN, host path)**: the same array LUN is seen through several
//! backstores that differ in `initiator=`, each linked into its own
//! tcm_loop target. Each distinct initiator name is logged in to the array
//! once ([`Array::login`]) and its id cached by name, so both paths of a
//! host share an identity. A device whose cfg is malformed is served
//! anyway, every command answered as for a LUN the array does not have, so
//! LIO never waits on an unserved ring.
//!
//! Setting the cfg: the backstore's `control` file splits its settings at
//! commas, so `dev_config=stp/lun=0,initiator=h0` written there arrives as
//! `stp/lun=0`. Write `stp/lun=0,initiator=h0` to `attrib/dev_config`
//! instead (before `enable`), or separate the pairs with `;`, which the
//! cfg parser accepts too.
//!
//! # The ring
//!
//! The private `ring` module (the only `unsafe` in the crate) maps the device and
//! speaks mailbox version 2 with out-of-order completion: the device thread
//! reads entries up to `cmd_head`, copies out CDB and iovecs, and submits a
//! [`Task`](crate::Task) whose reply reads and writes the command's data
//! area. A reply completes from any thread (a long-poll RECEIVE is completed
//! by another device's SEND or by the mailbox's timer): it writes its
//! response into the first command slot at `cmd_tail`, advances the tail
//! and kicks the kernel (a `write()` to the uio fd; once per batch for the
//! commands the device thread completes itself). The entry carries no data
//! direction: [`Array::direction_of`] supplies it.
//!
//! Two kernel behaviours shape the replies: a short data-in is reported
//! with `read_len` (so the initiator sees the right residual), and because
//! the kernel reads `read_len` 0 as "not given" (and would return the whole,
//! stale buffer), a GOOD data-in with no data — a long-poll RECEIVE that
//! timed out — is returned as one zero byte.
//!
//! # Restart and shutdown
//!
//! A daemon killed with commands on the ring leaves `cmd_head != cmd_tail`;
//! some of those commands may already have been completed (out of order,
//! into other slots), so a new daemon must not execute them. It resets the
//! ring through configfs (`action/block_dev` 1, `action/reset_ring` 1, which
//! fails them back to the initiators with BUSY, `action/block_dev` 0) and
//! starts from the empty ring. The new array has no bindings: hosts then get
//! "unknown binding handle" and fail cleanly.
//!
//! On SIGINT/SIGTERM ([`Shutdown`]) the daemon stops accepting work (new
//! commands get NOT READY / LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE),
//! resets the mailbox so every held RECEIVE completes (ABORTED COMMAND,
//! binding released), waits up to 2 s for each device's in-flight count to
//! reach 0, kicks, unmaps, removes its state files and returns.
//!
//! # State files
//!
//! `<state-dir>/pid` once the daemon is up; `<state-dir>/serving/<backstore>`
//! (`uio=<uioN> lun=<id> initiator=<name>`) while a device is served,
//! written only once its thread processes the ring: set-up scripts wait for
//! it before linking the backstore into tcm_loop (LIO hangs on the link if
//! nobody serves the ring).

pub mod config;
mod device;
pub mod discover;
mod ring;

use std::collections::HashMap;
use std::fmt::Display;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{build_array, parse_size, StgArg, DEFAULT_STG};
pub use discover::{CfgError, DeviceConfig, UioName, SUBTYPE};

use crate::array::Array;
use crate::task::InitiatorId;
use device::{Device, Ended, Route, NO_LUN};
use discover::Found;

/// How often `<sysfs>/class/uio` is scanned for new devices.
const SCAN_INTERVAL: Duration = Duration::from_millis(200);
/// How long shutdown waits for in-flight commands.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemon's settings (the `stp-target` command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The STGs; empty means [`DEFAULT_STG`].
    pub stgs: Vec<StgArg>,
    /// Bytes per LUN.
    pub lun_size: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Where `pid` and `serving/` go.
    pub state_dir: PathBuf,
    /// The configfs mount (ring resets).
    pub configfs: PathBuf,
    /// The sysfs mount (uio discovery).
    pub sysfs: PathBuf,
    /// Where the uio device nodes are.
    pub dev: PathBuf,
    /// Drop the per-device info lines.
    pub quiet: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            stgs: Vec::new(),
            lun_size: 256 << 20,
            block_size: 512,
            state_dir: "/run/stp-target".into(),
            configfs: "/sys/kernel/config".into(),
            sysfs: "/sys".into(),
            dev: "/dev".into(),
            quiet: false,
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The array configuration is invalid.
    #[error("{0}")]
    Array(String),
    /// There is no `<sysfs>/class/uio`.
    #[error("no uio class in sysfs ({0}): load target_core_user (modprobe target_core_user)")]
    NoUio(PathBuf),
    /// The state directory cannot be used.
    #[error("state directory {path}: {error}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        error: String,
    },
}

/// A stop request: set (from a signal handler) with [`trigger`](Self::trigger),
/// waited for by [`run`].
#[derive(Debug, Default)]
pub struct Shutdown {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shutdown {
    /// A request not yet made.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks the daemon to stop.
    pub fn trigger(&self) {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_all();
    }

    /// True once [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for the request; true if it was made.
    fn wait(&self, timeout: Duration) -> bool {
        let guard = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, timeout, |stop| !*stop)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// One line per event on stderr, prefixed `stp-target:`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Log {
    /// Drop the info lines.
    pub quiet: bool,
}

impl Log {
    pub(crate) fn info(&self, msg: impl Display) {
        if !self.quiet {
            eprintln!("stp-target: {msg}");
        }
    }

    pub(crate) fn warn(&self, msg: impl Display) {
        eprintln!("stp-target: warning: {msg}");
    }

    pub(crate) fn error(&self, msg: impl Display) {
        eprintln!("stp-target: error: {msg}");
    }
}

/// What the device threads share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub array: Array,
    /// True while commands may reach the array. Device threads hold it
    /// (read) while they submit; shutdown takes it (write) to close it, so
    /// after that nothing new can be held by the mailbox.
    pub gate: RwLock<bool>,
    /// Tells the device threads to return.
    pub stop: AtomicBool,
    pub log: Log,
    pub state_dir: PathBuf,
    pub configfs: PathBuf,
    pub sysfs: PathBuf,
    pub dev: PathBuf,
}

/// A device being served.
struct Served {
    device: Arc<Device>,
    thread: JoinHandle<Ended>,
}

/// The discovery loop's bookkeeping.
struct Daemon {
    shared: Arc<Shared>,
    /// By (uio node, uio name): a re-created device is a new key.
    served: HashMap<(String, String), Served>,
    /// Devices that could not be opened, with the error last logged.
    failed: HashMap<(String, String), String>,
    initiators: HashMap<String, InitiatorId>,
    scan_error: Option<String>,
}

/// Runs the daemon until `shutdown` is triggered: builds the array, serves
/// every matching TCMU device (scanning for new ones every 200 ms), then
/// shuts down cleanly. Errors are setup errors (the daemon exits 1).
pub fn run(opts: &Options, shutdown: &Shutdown) -> Result<(), SetupError> {
    let log = Log { quiet: opts.quiet };
    let (array, mailbox) =
        build_array(&opts.stgs, opts.lun_size, opts.block_size).map_err(SetupError::Array)?;
    let uio_class = opts.sysfs.join("class/uio");
    if !uio_class.is_dir() {
        return Err(SetupError::NoUio(uio_class));
    }
    prepare_state_dir(&opts.state_dir, log)?;
    let luns = array.lun_ids();
    let mut daemon = Daemon {
        shared: Arc::new(Shared {
            array,
            gate: RwLock::new(true),
            stop: AtomicBool::new(false),
            log,
            state_dir: opts.state_dir.clone(),
            configfs: opts.configfs.clone(),
            sysfs: opts.sysfs.clone(),
            dev: opts.dev.clone(),
        }),
        served: HashMap::new(),
        failed: HashMap::new(),
        initiators: HashMap::new(),
        scan_error: None,
    };
    daemon.scan();
    let pid_file = opts.state_dir.join("pid");
    write_atomic(&pid_file, &format!("{}\n", std::process::id())).map_err(|e| {
        SetupError::StateDir {
            path: opts.state_dir.clone(),
            error: format!("cannot write {}: {e}", pid_file.display()),
        }
    })?;
    log.info(format_args!(
        "up (pid {}): LUNs {}..={} of {} bytes in {}-byte blocks, STGs {}; watching {}",
        std::process::id(),
        luns.first().copied().unwrap_or(0),
        luns.last().copied().unwrap_or(0),
        opts.lun_size,
        opts.block_size,
        describe_stgs(&opts.stgs),
        uio_class.display()
    ));
    while !shutdown.wait(SCAN_INTERVAL) {
        daemon.scan();
    }
    log.info("shutting down");
    daemon.shut_down(&mailbox);
    let _ = fs::remove_file(&pid_file);
    log.info("stopped");
    Ok(())
}

fn describe_stgs(stgs: &[StgArg]) -> String {
    let stgs = if stgs.is_empty() {
        &[DEFAULT_STG][..]
    } else {
        stgs
    };
    stgs.iter()
        .map(StgArg::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Daemon {
    /// Forgets devices whose thread ended and starts serving new ones.
    fn scan(&mut self) {
        let log = self.shared.log;
        self.served.retain(|_, s| !s.thread.is_finished());
        let found = match discover::scan(&self.shared.sysfs) {
            Ok(f) => {
                self.scan_error = None;
                f
            }
            Err(e) => {
                let e = format!(
                    "cannot scan {}: {e}",
                    self.shared.sysfs.join("class/uio").display()
                );
                if self.scan_error.as_ref() != Some(&e) {
                    log.error(&e);
                    self.scan_error = Some(e);
                }
                return;
            }
        };
        let present: Vec<(String, String)> = found
            .iter()
            .map(|f| (f.uio.clone(), f.raw_name.clone()))
            .collect();
        self.failed.retain(|k, _| present.contains(k));
        for f in found {
            let key = (f.uio.clone(), f.raw_name.clone());
            if self.served.contains_key(&key) {
                continue;
            }
            let shared = self.shared.clone();
            let initiators = &mut self.initiators;
            let logged_cfg_error = self.failed.contains_key(&key);
            let opened = device::open(&f, &shared, || {
                route(&f, &shared, initiators, !logged_cfg_error)
            });
            match opened {
                Ok(dev) => {
                    self.failed.remove(&key);
                    let dev = Arc::new(dev);
                    let for_thread = dev.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("stp-{}", f.uio))
                        .spawn(move || device::serve(for_thread, shared));
                    match spawned {
                        Ok(thread) => {
                            self.served.insert(
                                key,
                                Served {
                                    device: dev,
                                    thread,
                                },
                            );
                        }
                        Err(e) => log.error(format_args!(
                            "{}: cannot start its thread: {e}",
                            f.name.backstore
                        )),
                    }
                }
                Err(e) => {
                    if self.failed.get(&key) != Some(&e) {
                        log.error(format_args!(
                            "cannot serve {} ({}): {e}",
                            f.name.backstore, f.uio
                        ));
                        self.failed.insert(key, e);
                    }
                }
            }
        }
    }

    /// Stops accepting work, completes held tasks, drains, stops the
    /// device threads and removes their state files.
    fn shut_down(self, mailbox: &crate::mailbox::StgMailbox) {
        let log = self.shared.log;
        // 1. Nothing new reaches the array (waits for submissions under way).
        *self.shared.gate.write().unwrap_or_else(|e| e.into_inner()) = false;
        // 2. Every held RECEIVE completes (binding released).
        mailbox.reset();
        // 3. Drain.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for s in self.served.values() {
            let left = s.device.wait_idle(deadline);
            if left > 0 {
                log.error(format_args!(
                    "{}: {left} command(s) still in flight after {} s; leaving them to the kernel's timeout",
                    s.device.name.backstore,
                    DRAIN_TIMEOUT.as_secs()
                ));
            }
        }
        // 4. Stop the threads; each kicks and removes its state file.
        self.shared.stop.store(true, Ordering::Release);
        for (_, s) in self.served {
            let name = s.device.name.backstore.clone();
            if s.thread.join().is_err() {
                log.error(format_args!("{name}: its thread panicked"));
            }
        }
        remove_serving_files(&self.shared.state_dir);
    }
}

/// Where a device's commands go, from its cfg (logging a malformed one
/// when `report` is set).
fn route(
    f: &Found,
    shared: &Shared,
    initiators: &mut HashMap<String, InitiatorId>,
    report: bool,
) -> Route {
    let log = shared.log;
    let mut login = |name: &str| {
        *initiators
            .entry(name.to_owned())
            .or_insert_with(|| shared.array.login(name))
    };
    match DeviceConfig::parse(&f.name.cfg) {
        Ok(c) => {
            if report && shared.array.lun(c.lun).is_none() {
                log.warn(format_args!(
                    "{}: the array has no LUN {} (it has {:?}); its commands are answered as for a LUN that does not exist",
                    f.name.backstore,
                    c.lun,
                    shared.array.lun_ids()
                ));
            }
            Route {
                lun: c.lun,
                initiator: login(&c.initiator),
                describe: format!("lun={} initiator={}", c.lun, c.initiator),
            }
        }
        Err(e) => {
            if report {
                log.error(format_args!(
                    "{}: {e}; serving it with every command answered as for a LUN that does not exist",
                    f.name.backstore
                ));
            }
            Route {
                lun: NO_LUN,
                initiator: login("(invalid cfg)"),
                describe: "lun=none initiator=none".into(),
            }
        }
    }
}

/// Creates `<dir>/serving`, checks the directory is writable, refuses a
/// directory another live daemon uses, and removes state files a daemon
/// that did not exit cleanly left behind.
fn prepare_state_dir(dir: &Path, log: Log) -> Result<(), SetupError> {
    let fail = |error: String| SetupError::StateDir {
        path: dir.to_owned(),
        error,
    };
    fs::create_dir_all(dir.join("serving")).map_err(|e| fail(e.to_string()))?;
    let probe = dir.join(format!(".probe.{}", std::process::id()));
    fs::write(&probe, b"").map_err(|e| fail(format!("not writable: {e}")))?;
    let _ = fs::remove_file(&probe);
    if let Some(pid) = fs::read_to_string(dir.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if pid != std::process::id() && comm.trim() == "stp-target" {
            return Err(fail(format!(
                "used by another stp-target (pid {pid}); stop it or pick another --state-dir"
            )));
        }
        log.info(format_args!(
            "removing the state of a previous daemon (pid {pid}) that did not exit cleanly"
        ));
    }
    remove_serving_files(dir);
    Ok(())
}

fn remove_serving_files(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir.join("serving")) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes `path` through a temporary file and a rename.
fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stp-tcmu-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_missing_uio_class_is_a_setup_error() {
        let d = temp("nouio");
        let opts = Options {
            sysfs: d.join("sys"),
            state_dir: d.join("state"),
            ..Options::default()
        };
        let err = run(&opts, &Shutdown::new()).unwrap_err();
        assert!(matches!(err, SetupError::NoUio(_)));
        assert!(err.to_string().contains("modprobe target_core_user"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_bad_array_is_a_setup_error() {
        let opts = Options {
            lun_size: 1000,
            ..Options::default()
        };
        assert!(matches!(
            run(&opts, &Shutdown::new()),
            Err(SetupError::Array(_))
        ));
    }

    #[test]
    fn the_daemon_starts_writes_its_pid_and_stops_cleanly() {
        let d = temp("run");
        fs::create_dir_all(d.join("sys/class/uio")).unwrap();
        // A stale state file from a killed daemon.
        fs::create_dir_all(d.join("state/serving")).unwrap();
        fs::write(d.join("state/serving/old"), "uio=uio9 lun=0 initiator=h\n").unwrap();
        let opts = Options {
            sysfs: d.join("sys"),
            state_dir: d.join("state"),
            quiet: true,
            ..Options::default()
        };
        let shutdown = Arc::new(Shutdown::new());
        let t = {
            let (opts, shutdown) = (opts.clone(), shutdown.clone());
            std::thread::spawn(move || run(&opts, &shutdown))
        };
        let pid = d.join("state/pid");
        let start = Instant::now();
        while !pid.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no pid file");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!d.join("state/serving/old").exists(), "stale state removed");
        assert_eq!(
            fs::read_to_string(&pid).unwrap().trim(),
            std::process::id().to_string()
        );
        shutdown.trigger();
        assert!(shutdown.is_triggered());
        t.join().unwrap().unwrap();
        assert!(!pid.exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unwritable_state_dir_is_a_setup_error() {
        let d = temp("ro");
        fs::create_dir_all(d.join("sys/class/uio")).unwrap();
        fs::write(d.join("file"), "").unwrap();
        let opts = Options {
            sysfs: d.join("sys"),
            state_dir: d.join("file/state"),
            ..Options::default()
        };
        assert!(matches!(
            run(&opts, &Shutdown::new()),
            Err(SetupError::StateDir { .. })
        ));
        let _ = fs::remove_dir_all(&d);
    }
}
