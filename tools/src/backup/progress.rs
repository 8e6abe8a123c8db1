//! Progress bars (bytes, rate, ETA) on long work, shown only on a terminal
//! and never with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar, or nothing. Cheap to clone (clones share the bar).
/// Notes (a fallback, say) are printed above the bar, or on stderr when
/// there is no bar and output is not quiet.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    bar: Option<ProgressBar>,
    notes: bool,
}

impl Progress {
    /// No output.
    pub fn hidden() -> Progress {
        Progress {
            bar: None,
            notes: false,
        }
    }

    /// A bar titled `what` on stderr if it is a terminal and `quiet` is
    /// false; `total` in bytes when known (a spinner with a byte count and
    /// rate otherwise).
    pub fn bytes(what: &str, total: Option<u64>, quiet: bool) -> Progress {
        if quiet || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                notes: !quiet,
            };
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template(
                    "{msg:>12} {spinner} {bytes} {binary_bytes_per_sec} {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_message(what.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress {
            bar: Some(bar),
            notes: true,
        }
    }

    /// Sets the position (bytes done).
    pub fn set(&self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    /// Prints a line above the bar, or on stderr (nothing when quiet).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None if self.notes => eprintln!("{line}"),
            None => {}
        }
    }

    /// Replaces the bar with its last word: the total and the rate.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            let line = final_line(&b.message(), b.position(), b.elapsed());
            b.finish_and_clear();
            eprintln!("{line}");
        }
    }
}

/// What a finished bar leaves on the terminal: `what`, the bytes moved
/// (the total), the time and the rate.
pub fn final_line(what: &str, bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        format!("{:.1} MB/s", bytes as f64 / 1e6 / secs)
    } else {
        "-".into()
    };
    format!(
        "{what:>12} done: {bytes} bytes ({:.1} MB) in {secs:.1} s, {rate}",
        bytes as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_frame_states_the_total_time_and_rate() {
        let l = final_line("sending", 25_000_000, Duration::from_secs(2));
        assert!(l.contains("sending done"), "{l}");
        assert!(l.contains("25000000 bytes (25.0 MB)"), "{l}");
        assert!(l.contains("in 2.0 s"), "{l}");
        assert!(l.contains("12.5 MB/s"), "{l}");
    }
}
