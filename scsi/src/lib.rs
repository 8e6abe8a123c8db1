//! The SCSI layer: everything STP needs to speak SCSI to a logical unit, and
//! nothing about STP itself.
//!
//! Layering, bottom up:
//!
//! * wire types — [`Opcode`], [`ScsiStatus`], [`SenseKey`], [`Asc`] are open
//!   newtypes (values a real array returns that are not listed here survive);
//!   [`cdb`] has a typed, zerocopy layout for each command and a parsed
//!   [`Cdb`] that can emit itself; [`sense`] decodes and emits fixed and
//!   descriptor sense; [`inquiry`] does the same for INQUIRY data and VPD pages,
//!   [`supported`] for REPORT SUPPORTED OPERATION CODES data and
//!   [`provisioning`] for UNMAP parameter lists, GET LBA STATUS data and
//!   the Logical Block Provisioning VPD page.
//! * [`Transport`] — one path to one logical unit. Commands own their
//!   page-aligned [`IoBuf`] while in flight; completions may arrive out of
//!   order. [`sg::SgDevice`] is the synchronous SG_IO implementation; the
//!   simulated array's in-process front end is another. [`uring::UringSg`]
//!   drives `/dev/sgN` asynchronously through io_uring (queue depths above
//!   16 use several fds); [`bsg::UringBsg`] sends commands as io_uring
//!   `URING_CMD`s on the bsg node (Linux 7.1+); [`open_best`] probes and
//!   picks bsg, then sg v3, then `SG_IO`, and says why ([`select`]).
//! * [`alua`] — target port groups and their asymmetric access states
//!   (REPORT TARGET PORT GROUPS, the port designators of VPD 0x83).
//! * [`discovery`] — enumerates `/sys/class/scsi_generic` and identifies a
//!   logical unit by its VPD 0x83 designators, the identity that survives
//!   device renaming across hosts.
//!
//! Invariants: parsers never panic on any input (each module states its
//! no-panic contract and property tests hold it); `unsafe` lives only in
//! [`sg`], at the ioctl boundary, and [`uring`] and [`bsg`], where io_uring
//! entries, buffer registration and `read(2)` carry raw pointers to headers
//! and buffers.

pub mod alua;
pub mod bsg;
pub mod buf;
pub mod cdb;
pub mod discovery;
pub mod inquiry;
pub mod opcode;
pub mod pool;
pub mod pr;
pub mod provisioning;
pub mod select;
pub mod sense;
pub mod sg;
pub mod shared;
pub mod status;
pub mod supported;
pub mod transport;
pub mod uring;

pub use bsg::UringBsg;
pub use buf::IoBuf;
pub use cdb::Cdb;
pub use opcode::Opcode;
pub use select::{engine_choice, set_engine_override, EngineChoice, ENGINE_ENV};
pub use sense::{Asc, Sense, SenseKey};
pub use shared::{EngineHandle, EnginePool, SharedEngine};
pub use status::{DriverStatus, HostStatus, ScsiStatus};
pub use transport::{
    CdbBuf, Command, CommandError, Completion, DataDirection, Outcome, SubmitError, Transport,
};
pub use uring::{open_best, BestPath, Engine, UringSg};
