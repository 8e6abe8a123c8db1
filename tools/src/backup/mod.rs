//! Backup and restore over two channels: the seed's application
//! (docs/BACKUP.md).
//!
//! The backup **server** (repository and catalog) and the backup
//! **client** (the agent on the host that owns the data) talk over a
//! [`stp_core::sockets::SocketLayer`]: control over TCP, data through the
//! array over STP, with a LAN fallback.
//!
//! * [`session`]: the file-system flow (server-initiated) and the database
//!   flow (client-initiated).
//! * [`pipe`]: the acknowledged data stream and its mid-stream fallback.
//! * [`hashing`]: the stream's SHA-256 on a thread of its own.
//! * [`archive`]: tar streams with a SHA-256 per file; safe extraction.
//! * [`repo`]: archives, manifests and the SQLite catalog.
//! * [`restore`]: what a restore takes and how it lands.
//! * [`remote`]: restores to another host through the array.
//! * [`traffic`]: bytes and time per channel (array, LAN) of a session.
//! * [`wire`]: the control messages.
//! * [`config`]: the backup configuration file and building a host from it.
//! * [`daemon`]: the agent's and the server's ports, start-up report and
//!   session loop.
//! * [`demo`]: `stp demo`, everything on the in-process array.
//! * [`cli`]: the `stp backup` and `stp demo` commands.

pub mod archive;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod hashing;
pub mod inproc;
pub mod pipe;
pub mod progress;
pub mod remote;
pub mod repo;
pub mod restore;
pub mod session;
pub mod traffic;
pub mod wire;
