//! STP, the Storage Transport Protocol: frames, transport groups (STG), the
//! mailbox protocol, connections and sockets.
//!
//! This crate sits on the [`scsi`] layer's `Transport` abstraction and holds
//! no device code of its own. Its protocol logic is sans-IO: state machines
//! take input and the current time and produce output, so every one of them
//! runs deterministically in tests. The wire protocol is specified in
//! `docs/PROTOCOL.md`.
//!
//! The workspace's foundation (the SCSI layer and the simulated array) is in
//! place; the protocol itself is built on it next.

pub use scsi;
