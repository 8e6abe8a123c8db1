//! Block mode's READs and WRITEs on several members at once.
//!
//! A lane stripes its slots over the members, so the slots of one commit
//! (and the producer blocks after them, and the slots one poll reads) sit
//! on different LUNs that can work in parallel. [`run`] submits every
//! command before it reaps any; each member's path is locked for the
//! whole batch, in ascending member order (the only place two member
//! locks are held at once, so two batches never deadlock). A command that
//! fails is tried again alone, as [`RetryPolicy::BLOCK`] allows; one too
//! large for a single command runs alone through [`Geometry`].

use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use scsi::{Command, CommandError, DataDirection, IoBuf, Transport};

use super::{lock, rw, whole_read, Geometry};
use crate::retry::{Op, RetryPolicy};

/// One READ or WRITE of a batch.
pub(super) struct BatchIo {
    /// The member (an index into the paths given to [`run`]).
    pub member: usize,
    pub write: bool,
    pub lba: u64,
    /// A READ's bytes (whole blocks); a WRITE's length (padded to whole
    /// blocks for the command, restored after).
    pub len: usize,
    /// The command's data buffer: filled by a READ, carried by a WRITE.
    pub buf: IoBuf,
    pub result: Result<(), CommandError>,
}

impl BatchIo {
    /// A READ of `len` bytes at `lba` of `member` into `buf`.
    pub fn read(member: usize, lba: u64, len: usize, buf: IoBuf) -> BatchIo {
        BatchIo {
            member,
            write: false,
            lba,
            len,
            buf,
            result: Ok(()),
        }
    }

    /// A WRITE of `buf` at `lba` of `member`.
    pub fn write(member: usize, lba: u64, buf: IoBuf) -> BatchIo {
        BatchIo {
            member,
            write: true,
            lba,
            len: buf.len(),
            buf,
            result: Ok(()),
        }
    }

    /// Runs this command alone, retried as block I/O is.
    fn alone(&mut self, geo: &Geometry, t: &mut dyn Transport) {
        let bs = geo.block_size as usize;
        self.result = if self.write {
            self.buf.resize(self.len);
            geo.write_from(t, self.lba, &mut self.buf)
        } else {
            geo.read_into(t, self.lba, self.len.div_ceil(bs) as u64, &mut self.buf)
        };
    }

    /// Takes the completion of this command's batched attempt.
    fn complete(&mut self, data: IoBuf, result: Result<scsi::Outcome, CommandError>) {
        self.buf = data;
        self.result = result.and_then(|o| o.check().map(|()| o)).and_then(|o| {
            if self.write {
                return Ok(());
            }
            whole_read(self.buf.len(), self.len, o.residual)
        });
        if self.buf.capacity() >= self.len {
            self.buf.resize(self.len);
        }
    }
}

/// Runs `ios` on the members' `paths`: all submitted, then all reaped,
/// failures retried alone. Returns the number of commands that failed in
/// the end (each `result` says how).
pub(super) fn run(
    paths: &[&Mutex<Box<dyn Transport>>],
    geo: &Geometry,
    ios: &mut [BatchIo],
) -> usize {
    let bs = geo.block_size as usize;
    let mut members: Vec<usize> = ios.iter().map(|io| io.member).collect();
    members.sort_unstable();
    members.dedup();
    let mut guards: Vec<(usize, MutexGuard<'_, Box<dyn Transport>>)> =
        members.iter().map(|&m| (m, lock(paths[m]))).collect();
    let slot_of = |m: usize| members.binary_search(&m).unwrap_or(0);
    let mut pending = vec![Vec::new(); guards.len()];
    for (k, io) in ios.iter_mut().enumerate() {
        let g = slot_of(io.member);
        let t = guards[g].1.as_mut();
        let blocks = io.len.div_ceil(bs);
        if blocks == 0 || blocks > geo.max_blocks as usize {
            io.alone(geo, t);
            continue;
        }
        let mut data = std::mem::take(&mut io.buf);
        if io.write {
            super::pad_to_blocks(&mut data, bs);
        } else {
            data.resize(blocks * bs);
        }
        let direction = if io.write {
            DataDirection::ToDevice
        } else {
            DataDirection::FromDevice
        };
        let cmd = Command {
            direction,
            data,
            ..Command::no_data(rw(io.write, io.lba, blocks as u32))
        }
        .with_timeout(geo.timeout)
        .with_tag(k as u64);
        match t.submit(cmd) {
            Ok(()) => pending[g].push(k),
            Err(refused) => {
                io.buf = refused.cmd.data;
                io.alone(geo, t);
            }
        }
    }
    let mut out = Vec::new();
    let mut retry = Vec::new();
    for (g, (_, t)) in guards.iter_mut().enumerate() {
        while !pending[g].is_empty() {
            out.clear();
            // The engine times each command out itself; this bound only
            // keeps a broken one from hanging the batch.
            let wait = geo.timeout + Duration::from_secs(5);
            match t.reap(&mut out, Some(wait)) {
                Ok(n) if n > 0 => {}
                Ok(_) | Err(_) => {
                    for k in pending[g].drain(..) {
                        ios[k].result = Err(CommandError::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no completion from the path within the command timeout",
                        )));
                    }
                    break;
                }
            }
            for c in out.drain(..) {
                let k = c.tag as usize;
                let Some(at) = pending[g].iter().position(|&p| p == k) else {
                    continue;
                };
                pending[g].swap_remove(at);
                ios[k].complete(c.data, c.result);
                if let Err(e) = &ios[k].result {
                    let cdb = rw(ios[k].write, ios[k].lba, 1);
                    // A WRITE whose buffer stayed with the engine has
                    // nothing left to write.
                    let whole = !ios[k].write || ios[k].buf.len() == ios[k].len;
                    if let Some(delay) = RetryPolicy::BLOCK.next(Op::of_cdb(&cdb), 1, e) {
                        if whole {
                            retry.push((g, k, delay));
                        }
                    }
                }
            }
        }
    }
    for (g, k, delay) in retry {
        std::thread::sleep(delay);
        ios[k].alone(geo, guards[g].1.as_mut());
    }
    ios.iter().filter(|io| io.result.is_err()).count()
}
