//! Where a session's bytes went: through the array or over the LAN
//! (docs/BACKUP.md §8.1).
//!
//! The counts come from the socket layer ([`SocketLayer::traffic`]): the
//! payload bytes every STP and TCP socket of the session's host sent and
//! received, both directions, counted where they crossed the layer, not
//! estimated. A [`Meter`] takes a snapshot when a session starts and the
//! difference when it ends, so a host must run one session at a time for
//! the figures to be the session's alone (the daemons do).
//!
//! LAN bytes are split by what they carried: *errors* (the per-file error
//! connection), *data* (the stream after a fallback, or all of it in a LAN
//! session, including the resume handshake) and *control* (everything
//! else: the flows' WKP and key exchanges, the control connection).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use stp_core::sockets::{Fd, Mechanism, SocketLayer, Traffic};

use super::pipe::ChannelLog;

/// Bytes and time per channel of one backup (or restore), as recorded in
/// the catalog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelUse {
    /// Payload bytes through the array (STP sockets, both directions).
    pub array_bytes: u64,
    /// Seconds the data stream spent on the array.
    pub array_seconds: f64,
    /// Payload bytes over the LAN (TCP sockets, both directions, and block
    /// mode's doorbell datagrams): the sum of the three below.
    pub lan_bytes: u64,
    /// LAN bytes of control: flow set-up, the control connection, block
    /// mode's doorbells.
    pub lan_control_bytes: u64,
    /// LAN bytes of the per-file error connection.
    pub lan_error_bytes: u64,
    /// LAN bytes of backup data (a fallback or a LAN session).
    pub lan_data_bytes: u64,
    /// Seconds the data stream spent on the LAN.
    pub lan_seconds: f64,
}

impl ChannelUse {
    /// Two sessions' counts together.
    pub fn plus(&self, o: &ChannelUse) -> ChannelUse {
        ChannelUse {
            array_bytes: self.array_bytes.saturating_add(o.array_bytes),
            array_seconds: self.array_seconds + o.array_seconds,
            lan_bytes: self.lan_bytes.saturating_add(o.lan_bytes),
            lan_control_bytes: self.lan_control_bytes.saturating_add(o.lan_control_bytes),
            lan_error_bytes: self.lan_error_bytes.saturating_add(o.lan_error_bytes),
            lan_data_bytes: self.lan_data_bytes.saturating_add(o.lan_data_bytes),
            lan_seconds: self.lan_seconds + o.lan_seconds,
        }
    }

    /// Every byte counted, on both channels.
    pub fn total_bytes(&self) -> u64 {
        self.array_bytes.saturating_add(self.lan_bytes)
    }

    /// The LAN's share of every byte counted, in percent (0 when nothing
    /// moved).
    pub fn lan_percent(&self) -> f64 {
        match self.total_bytes() {
            0 => 0.0,
            t => self.lan_bytes as f64 * 100.0 / t as f64,
        }
    }

    /// "412.0 MiB through the array, 38.0 KiB over the LAN (0.009 %)".
    pub fn summary(&self) -> String {
        format!(
            "{} through the array, {} over the LAN ({})",
            human_bytes(self.array_bytes),
            human_bytes(self.lan_bytes),
            percent(self.lan_percent())
        )
    }

    /// The LAN bytes by kind: "control 3.1 KiB, errors 0 B, data 0 B".
    pub fn lan_detail(&self) -> String {
        format!(
            "control {}, errors {}, data {}",
            human_bytes(self.lan_control_bytes),
            human_bytes(self.lan_error_bytes),
            human_bytes(self.lan_data_bytes)
        )
    }
}

/// A percentage with enough digits to show a small share: `0.009 %`,
/// `12.3 %`, `100 %`.
pub fn percent(p: f64) -> String {
    if !p.is_finite() {
        return "-".into();
    }
    if p == 0.0 || p >= 99.95 {
        format!("{p:.0} %")
    } else if p < 0.001 {
        "<0.001 %".into()
    } else if p < 0.1 {
        format!("{p:.3} %")
    } else if p < 10.0 {
        format!("{p:.2} %")
    } else {
        format!("{p:.1} %")
    }
}

/// A byte count for people: `10 B`, `4.0 KiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    crate::bench::units::human_bytes(n)
}

/// Frames this host's STP connections dropped on receipt during a session
/// (from the process's counters, `stp_core::counters`: a daemon runs one
/// session at a time). Frames another host on the SAN forged, damaged or
/// replayed from another connection fail to open; stray and late frames
/// find no live connection (docs/PROTOCOL.md §7.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedFrames {
    /// Frames that failed to open: their tag or header CRC did not verify.
    pub unauthentic: u64,
    /// Frames for no live connection (a port closed meanwhile, another
    /// connection id).
    pub no_connection: u64,
    /// Frames beyond the credit their connection advertised.
    pub above_window: u64,
}

impl DroppedFrames {
    /// Every dropped frame.
    pub fn total(&self) -> u64 {
        self.unauthentic
            .saturating_add(self.no_connection)
            .saturating_add(self.above_window)
    }

    /// "frames dropped on receipt: 3 failing to open (damaged or forged on
    /// the SAN), 0 for no live connection, 0 beyond the credit".
    pub fn summary(&self) -> String {
        format!(
            "frames dropped on receipt: {} failing to open (damaged or forged on the SAN), \
             {} for no live connection, {} beyond the credit",
            self.unauthentic, self.no_connection, self.above_window
        )
    }
}

/// Counts a session's bytes on one host.
#[derive(Debug)]
pub struct Meter {
    start: Traffic,
    /// The process's data-path counters at the start.
    counters: stp_core::counters::Snapshot,
    /// Bytes of the errors connection, read before it closes.
    errors: u64,
    /// LAN bytes of the data stream, read when the stream ends.
    lan_data: u64,
    /// Seconds on each channel (array, LAN).
    seconds: (f64, f64),
}

impl Meter {
    /// Starts counting (before the session's first connection).
    pub fn start(layer: &SocketLayer) -> Meter {
        Meter {
            start: layer.traffic(),
            counters: stp_core::counters::snapshot(),
            errors: 0,
            lan_data: 0,
            seconds: (0.0, 0.0),
        }
    }

    /// Notes the errors connection's bytes (call before closing it).
    pub fn errors_connection(&mut self, layer: &SocketLayer, fd: Fd) {
        if let Ok(t) = layer.socket_traffic(fd) {
            self.errors = t.tcp();
        }
    }

    /// Notes the data stream's end: `fd` is the descriptor that carried
    /// its end (TCP after a fallback), `log` its channels, `start` when the
    /// stream began.
    pub fn stream_ended(&mut self, layer: &SocketLayer, fd: Fd, log: &ChannelLog, start: Instant) {
        if fd.mechanism() == Mechanism::Tcp {
            if let Ok(t) = layer.socket_traffic(fd) {
                self.lan_data = t.tcp();
            }
        }
        self.seconds = log.split_time(start, Instant::now());
    }

    /// The frames dropped on receipt so far.
    pub fn dropped(&self) -> DroppedFrames {
        let d = stp_core::counters::snapshot().since(&self.counters);
        DroppedFrames {
            unauthentic: d.recv_dropped_unauthentic,
            no_connection: d.recv_dropped_no_connection,
            above_window: d.recv_dropped_above_window,
        }
    }

    /// What the session moved so far.
    pub fn read(&self, layer: &SocketLayer) -> ChannelUse {
        let t = layer.traffic().since(&self.start);
        // Block mode's doorbells cross the LAN too (control).
        let doorbells = stp_core::counters::snapshot()
            .since(&self.counters)
            .doorbell_bytes;
        let lan = t.tcp().saturating_add(doorbells);
        let errors = self.errors.min(lan);
        let data = self.lan_data.min(lan - errors);
        ChannelUse {
            array_bytes: t.stp(),
            array_seconds: self.seconds.0,
            lan_bytes: lan,
            lan_control_bytes: lan - errors - data,
            lan_error_bytes: errors,
            lan_data_bytes: data,
            lan_seconds: self.seconds.1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_names_both_channels_and_the_share() {
        let u = ChannelUse {
            array_bytes: 412 << 20,
            lan_bytes: 38 << 10,
            lan_control_bytes: 38 << 10,
            ..ChannelUse::default()
        };
        assert_eq!(
            u.summary(),
            "412.0 MiB through the array, 38.0 KiB over the LAN (0.009 %)"
        );
        assert_eq!(ChannelUse::default().lan_percent(), 0.0);
        assert_eq!(percent(100.0), "100 %");
        assert_eq!(percent(0.0001), "<0.001 %");
        assert_eq!(percent(1.0 / 3.0), "0.33 %");
        assert_eq!(percent(42.42), "42.4 %");
        assert_eq!(percent(f64::NAN), "-");
    }
}
