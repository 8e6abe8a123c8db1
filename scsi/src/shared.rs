//! One engine shared by many threads: [`SharedEngine`], its per-user
//! [`EngineHandle`]s, and [`EnginePool`], which keeps one io_uring engine
//! per device.
//!
//! A [`UringSg`] or [`UringBsg`] ring is bound to one thread (sg's `write()` must run inside
//! that thread's own `io_uring_enter` (see the [`uring`](crate::uring)
//! module docs). The STP stack, though, uses a path from several threads (a
//! host's receive pumps, a stream's writers and its sender), and many streams use the
//! same LUNs. So the ring gets a thread of its own, the *engine thread*,
//! and everyone else talks to it through handles:
//!
//! * [`EngineHandle::submit`](Transport::submit) queues the command for the
//!   engine thread and wakes it (a condition variable when it is idle, the
//!   ring's eventfd [`Waker`] when it is blocked in the ring);
//! * the engine thread submits what is queued in one batch, reaps, and
//!   routes each completion back to the handle that submitted it (a
//!   channel per handle), with the caller's tag restored;
//! * each handle is a complete [`Transport`] with its own `in_flight`, so
//!   [`Transport::execute`] works on it while other handles have commands
//!   in flight on the same ring.
//!
//! Commands beyond the ring's depth wait in the engine thread's backlog and
//! go out as slots free up. If the ring fails (a completion guard mismatch
//! or an `io_uring_enter` error), the engine drops it (abandoning what is
//! in flight, see [`UringSg`]), fails every outstanding, queued and later
//! command with the reason, and the handles should be dropped; the pool
//! opens a new engine on the next [`EnginePool::open`].
//!
//! The engine thread can drive any [`Transport`]
//! ([`SharedEngine::start_polled`]); without a [`Waker`] it looks for new
//! commands every [`POLLED_WAIT`] while commands are in flight. The tests
//! run the routing over the in-process array that way.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::Duration;

use crate::bsg::UringBsg;
use crate::select::{open_engine, Opened};
use crate::sg::SgError;
use crate::transport::{Command, CommandError, Completion, SubmitError, Transport};
use crate::uring::{BestPath, Engine, UringSg, Waker};

/// How often an engine without a [`Waker`] looks for new commands while
/// commands are in flight.
pub const POLLED_WAIT: Duration = Duration::from_millis(1);

/// The queue depth [`EnginePool::global`] opens each device with: four sg
/// fds, room for every stream's long-poll RECEIVE plus its SENDs.
pub const POOL_DEPTH: usize = 64;

struct Request {
    cmd: Command,
    reply: Sender<Completion>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Request>,
    /// Live handles plus the [`SharedEngine`] itself; the engine thread
    /// ends when this reaches zero and nothing is in flight.
    users: usize,
    /// The engine thread is (about to be) blocked in the ring: wake it
    /// through the eventfd.
    in_ring: bool,
    /// Why the ring failed, once it has.
    broken: Option<String>,
}

struct Inner {
    queue: Mutex<Queue>,
    idle: Condvar,
    waker: Option<Waker>,
    describe: String,
    depth: usize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release_user(&self) {
        self.lock().users -= 1;
        self.idle.notify_one();
        if let Some(w) = &self.waker {
            w.wake();
        }
    }
}

/// An io_uring sg engine running on its own thread; hand out
/// [`EngineHandle`]s with [`handle`](SharedEngine::handle). Dropping it (and
/// every handle) ends the thread once the commands in flight are done.
pub struct SharedEngine {
    inner: Arc<Inner>,
}

impl fmt::Debug for SharedEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedEngine")
            .field("engine", &self.inner.describe)
            .finish()
    }
}

impl SharedEngine {
    /// Moves `ring` onto a new engine thread (the ring binds to it).
    pub fn start(mut ring: UringSg) -> io::Result<SharedEngine> {
        let waker = ring.waker()?;
        let name = ring
            .path()
            .file_name()
            .map_or_else(|| "dev".into(), |n| n.to_string_lossy().into_owned());
        SharedEngine::spawn(Box::new(ring), Some(waker), &name)
    }

    /// Moves a bsg passthrough engine onto a new engine thread (the ring
    /// binds to it).
    pub fn start_bsg(mut ring: UringBsg) -> io::Result<SharedEngine> {
        let waker = ring.waker()?;
        let name = ring
            .path()
            .file_name()
            .map_or_else(|| "bsg".into(), |n| n.to_string_lossy().into_owned());
        SharedEngine::spawn(Box::new(ring), Some(waker), &name)
    }

    /// Moves any transport onto a new engine thread that, having no
    /// [`Waker`], polls for new commands every [`POLLED_WAIT`] while
    /// commands are in flight.
    pub fn start_polled(transport: Box<dyn Transport>) -> io::Result<SharedEngine> {
        SharedEngine::spawn(transport, None, "polled")
    }

    fn spawn(
        ring: Box<dyn Transport>,
        waker: Option<Waker>,
        name: &str,
    ) -> io::Result<SharedEngine> {
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue {
                users: 1,
                ..Queue::default()
            }),
            idle: Condvar::new(),
            waker,
            describe: format!("{}, shared engine thread", ring.describe()),
            depth: ring.queue_depth(),
        });
        let engine = Arc::clone(&inner);
        thread::Builder::new()
            .name(format!("stp-engine-{name}"))
            .spawn(move || run(ring, &engine))?;
        Ok(SharedEngine { inner })
    }

    /// A new handle onto the engine.
    pub fn handle(&self) -> EngineHandle {
        self.inner.lock().users += 1;
        let (tx, rx) = mpsc::channel();
        EngineHandle {
            inner: Arc::clone(&self.inner),
            tx,
            rx,
            in_flight: 0,
        }
    }

    /// Why the ring failed, if it has (its handles then fail every command).
    pub fn broken(&self) -> Option<String> {
        self.inner.lock().broken.clone()
    }
}

impl Drop for SharedEngine {
    fn drop(&mut self) {
        self.inner.release_user();
    }
}

/// The engine thread: submit what is queued, reap, route completions.
fn run(mut ring: Box<dyn Transport>, inner: &Inner) {
    let mut routes: HashMap<u64, (Sender<Completion>, u64)> = HashMap::new();
    let mut backlog: VecDeque<Request> = VecDeque::new();
    let mut out = Vec::new();
    let mut next: u64 = 0;
    loop {
        {
            let mut q = inner.lock();
            loop {
                backlog.extend(q.pending.drain(..));
                if !backlog.is_empty() || ring.in_flight() > 0 {
                    // From here until the reap returns, a new command must
                    // wake the ring, not the condition variable.
                    q.in_ring = true;
                    break;
                }
                if q.users == 0 {
                    return;
                }
                q = inner.idle.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        }
        while ring.in_flight() < inner.depth {
            let Some(req) = backlog.pop_front() else {
                break;
            };
            next = next.wrapping_add(1);
            let tag = req.cmd.tag;
            match ring.submit(req.cmd.with_tag(next)) {
                Ok(()) => {
                    routes.insert(next, (req.reply, tag));
                }
                Err(e) => {
                    let _ = req.reply.send(Completion {
                        tag,
                        data: e.cmd.data,
                        result: Err(e.error),
                    });
                }
            }
        }
        // Blocks until a completion or a wake (new commands, a handle
        // gone); returns at once when nothing is in flight.
        let wait = if inner.waker.is_some() {
            None
        } else {
            Some(POLLED_WAIT)
        };
        let reaped = ring.reap(&mut out, wait);
        inner.lock().in_ring = false;
        for c in out.drain(..) {
            if let Some((reply, tag)) = routes.remove(&c.tag) {
                let _ = reply.send(Completion { tag, ..c });
            }
        }
        if let Err(e) = reaped {
            let why = format!("{}: the engine failed: {e}", ring.describe());
            inner.lock().broken = Some(why.clone());
            // Abandons what is in flight (the ring leaks what the kernel
            // may still touch); its outcome is unknown.
            drop(ring);
            for (_, (reply, tag)) in routes.drain() {
                let _ = reply.send(Completion {
                    tag,
                    data: Default::default(),
                    result: Err(CommandError::Io(io::Error::other(why.clone()))),
                });
            }
            drain_broken(inner, &why);
            return;
        }
    }
}

/// After a failure: fails every command handed in until the last user is
/// gone.
fn drain_broken(inner: &Inner, why: &str) {
    let mut q = inner.lock();
    loop {
        for req in q.pending.drain(..) {
            fail(req, why);
        }
        if q.users == 0 {
            return;
        }
        q = inner.idle.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}

fn fail(req: Request, why: &str) {
    let _ = req.reply.send(Completion {
        tag: req.cmd.tag,
        data: req.cmd.data,
        result: Err(CommandError::Io(io::Error::other(why.to_owned()))),
    });
}

/// One user's [`Transport`] onto a [`SharedEngine`]: its own completions,
/// its own `in_flight`. Usable from any thread (one at a time).
pub struct EngineHandle {
    inner: Arc<Inner>,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
    in_flight: usize,
}

impl fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineHandle")
            .field("engine", &self.inner.describe)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.inner.release_user();
    }
}

impl Transport for EngineHandle {
    fn submit(&mut self, cmd: Command) -> Result<(), SubmitError> {
        let mut q = self.inner.lock();
        if let Some(why) = &q.broken {
            return Err(SubmitError {
                cmd: Box::new(cmd),
                error: CommandError::Io(io::Error::other(why.clone())),
            });
        }
        q.pending.push(Request {
            cmd,
            reply: self.tx.clone(),
        });
        let in_ring = q.in_ring;
        drop(q);
        match (&self.inner.waker, in_ring) {
            (Some(w), true) => w.wake(),
            _ => self.inner.idle.notify_one(),
        }
        self.in_flight += 1;
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>, wait: Option<Duration>) -> io::Result<usize> {
        if self.in_flight == 0 {
            return Ok(0);
        }
        let first = match wait {
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(w) => self.rx.recv_timeout(w),
        };
        let first = match first {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => return Ok(0),
            // Cannot happen while this handle holds a sender.
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("the io_uring engine thread is gone"))
            }
        };
        let before = out.len();
        out.push(first);
        out.extend(self.rx.try_iter());
        let n = out.len() - before;
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn queue_depth(&self) -> usize {
        self.inner.depth
    }

    fn describe(&self) -> String {
        self.inner.describe.clone()
    }
}

/// One [`SharedEngine`] per device path, opened on first use: every user of
/// a LUN in this process shares its ring and engine thread.
#[derive(Debug)]
pub struct EnginePool {
    depth: usize,
    engines: Mutex<HashMap<PathBuf, (SharedEngine, Engine, String)>>,
}

impl EnginePool {
    /// A pool whose engines allow `depth` commands in flight per device.
    pub fn new(depth: usize) -> EnginePool {
        EnginePool {
            depth,
            engines: Mutex::new(HashMap::new()),
        }
    }

    /// The process-wide pool (depth [`POOL_DEPTH`]).
    pub fn global() -> &'static EnginePool {
        static POOL: OnceLock<EnginePool> = OnceLock::new();
        POOL.get_or_init(|| EnginePool::new(POOL_DEPTH))
    }

    /// A transport onto `path`: a handle on the device's shared io_uring
    /// engine (bsg passthrough, else sg v3: see [`select`](crate::select)),
    /// or, where io_uring cannot drive it, a synchronous SG_IO device; says
    /// which and why. Fails only when none can open the path, or the
    /// engine forced by `STP_ENGINE` cannot run.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<BestPath, SgError> {
        let path = path.as_ref();
        let mut engines = self.engines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((e, engine, reason)) = engines.get(path) {
            if e.broken().is_none() {
                return Ok(shared_path(e, *engine, reason));
            }
            engines.remove(path);
        }
        let (started, engine, reason) = match open_engine(path, self.depth)? {
            Opened::Bsg(ring, reason) => (SharedEngine::start_bsg(ring), Engine::UringBsg, reason),
            Opened::Sg(ring, reason) => (SharedEngine::start(ring), Engine::UringSg, reason),
            Opened::Sync(best) => return Ok(best),
        };
        match started {
            Ok(e) => {
                let best = shared_path(&e, engine, &reason);
                engines.insert(path.to_owned(), (e, engine, reason));
                Ok(best)
            }
            Err(e) => BestPath::sync_fallback(
                path,
                &format!("cannot start the engine thread: {e} (after: {reason})"),
            ),
        }
    }
}

fn shared_path(e: &SharedEngine, engine: Engine, reason: &str) -> BestPath {
    BestPath {
        transport: Box::new(e.handle()),
        engine,
        reason: format!("{reason}; shared engine thread"),
    }
}
