//! STP, the Storage Transport Protocol: frames, transport groups (STG), the
//! mailbox protocol, connections and sockets.
//!
//! This crate sits on the [`scsi`] layer's `Transport` abstraction and holds
//! no device code of its own. Its protocol logic is sans-IO: state machines
//! take input and the current time and produce output, so every one of them
//! runs deterministically in tests. The wire protocol is specified in
//! `docs/PROTOCOL.md`.
//!
//! * [`wire`] — the frame header layout and walking packed frames.
//! * [`frame`] — sealing and opening frames in place (AES-256-GCM or keyed
//!   BLAKE3, header CRC32C), per-connection keys and packet-number nonces.
//! * [`chunk`] — received payload bytes shared without copying.
//! * [`counters`] — copies, protection passes and SENDs in flight per
//!   payload byte, process-wide.
//! * [`guard`] — the check before any destructive write (format): partition
//!   tables, file systems, other STGs, kernel holders and mounts.
//! * [`fence`] — persistent reservations that keep other hosts from
//!   writing a block-mode STG's members.
//! * [`auth`] — the per-connection key agreed over the control connection.
//! * [`vendor`] — the vendor command set shared by hosts and the array.
//! * [`stg`] — transport groups, the configuration file, and [`stg::open`],
//!   the one way from a configuration to a source of mailboxes.
//! * [`multipath`] — one member over several paths: ALUA states steer the
//!   I/O, failed paths' commands move as the retry rule allows.
//! * [`preflight`] — the checks of `stp preflight`, one finding per line.
//! * [`mailbox`] — the host side of the STG mailbox (vendor mode).
//! * [`conn`] — the sans-IO connection state machine.
//! * [`error`] — the mailbox error, grouped: transport, refused, config, protocol.
//! * [`retry`] — the one retry rule and policy every retrying loop uses.
//! * [`engine`] — transport policies: striping over LUNs.
//! * [`stream`] — blocking `StpListener` / `StpStream` (Read + Write) over
//!   the vendor mailbox.
//! * `hub` — the receive side of streams: one binding per host and STG,
//!   its receive pumps, frames handed to their connections.
//! * [`block`] — block mode: STP over plain READ(16)/WRITE(16) on shared LUNs.
//! * [`sockets`] — one socket API over TCP and STP, routed by descriptor value.
//! * [`flows`] — the seed's file-system and database connection flows.

pub use scsi;

pub mod auth;
pub mod block;
pub mod chunk;
pub mod conn;
pub mod counters;
pub mod engine;
pub mod error;
pub mod fence;
pub mod flows;
pub mod frame;
pub mod guard;
pub(crate) mod hub;
pub mod mailbox;
pub mod multipath;
pub mod preflight;
pub(crate) mod rebind;
pub mod retry;
pub mod sealers;
pub mod sockets;
pub mod stg;
pub mod stream;
pub mod vendor;
pub mod wire;
