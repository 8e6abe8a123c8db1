//! The poller thread's timer slack: how late the kernel may end its sleeps.
//!
//! Linux lets a sleep of a normal thread end up to 50 µs late (the default
//! timer slack), which doubles block mode's shortest poll interval. While a
//! reply is awaited ([`PollSchedule::precise`](super::poll::PollSchedule::precise))
//! the poller asks for 1 µs; otherwise the default, so a streaming receiver
//! does not pay for precision it does not need (finer slack everywhere cost
//! a fifth more CPU per byte, docs/PERFORMANCE.md). Set through the
//! thread's `/proc/TID/timerslack_ns` (the thread id read from the
//! `/proc/thread-self` link); where that cannot be written the poller keeps
//! the default, which costs only latency.

use std::fs::{self, File, OpenOptions};
use std::io::Write;

/// The slack asked for while a reply is awaited, in nanoseconds.
const PRECISE_NS: &[u8] = b"1000";
/// Writing 0 restores the thread's default slack.
const DEFAULT_NS: &[u8] = b"0";

/// The calling thread's timer slack (open it on the thread it is for).
pub(super) struct TimerSlack {
    file: Option<File>,
    precise: bool,
}

impl TimerSlack {
    /// The calling thread's slack, at its default.
    pub(super) fn this_thread() -> TimerSlack {
        // "PID/task/TID"
        let file = fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|link| link.file_name().map(|tid| tid.to_owned()))
            .and_then(|tid| {
                let path = std::path::Path::new("/proc")
                    .join(tid)
                    .join("timerslack_ns");
                OpenOptions::new().write(true).open(path).ok()
            });
        TimerSlack {
            file,
            precise: false,
        }
    }

    /// Asks for the precise slack, or the default again.
    pub(super) fn set_precise(&mut self, precise: bool) {
        if precise == self.precise {
            return;
        }
        let Some(mut f) = self.file.as_ref() else {
            return;
        };
        let value = if precise { PRECISE_NS } else { DEFAULT_NS };
        // One write each: the file takes a whole value per write.
        match f.write_all(value) {
            Ok(()) => self.precise = precise,
            // Not permitted here: stay at the default from now on.
            Err(_) => self.file = None,
        }
    }
}
