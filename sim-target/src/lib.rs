//! The simulated storage array STP runs on when there is no Symmetrix.
//!
//! One array model, two front ends:
//!
//! ```text
//!   initiator (scsi::Transport)          LIO + tcm_loop (kernel)
//!            │                                   │ TCMU ring (mmap of /dev/uioN)
//!   inproc::InProcTransport          tcmu front end (stp-target daemon)
//!            └──────────────┬────────────────────┘
//!                     array::Array  ── Task { cdb, Reply }
//!             SPC/SBC subset │ vendor opcodes 0xC0–0xFF
//!                 lun::LunStore   array::VendorHandler (the STG mailbox)
//! ```
//!
//! * [`Array`] holds LUNs ([`LunConfig`]: capacity, block size, identity
//!   with an NAA designator, thin or full provisioning) on sparse in-memory
//!   storage, tracks initiators and their unit attentions, and executes an
//!   SPC/SBC command set that answers as LIO's own backstores do: TEST UNIT
//!   READY, INQUIRY (standard with version descriptors, VPD
//!   0x00/0x80/0x83/0xB0/0xB2), REPORT LUNS, READ CAPACITY(10/16),
//!   READ/WRITE(10/16), VERIFY(10/16), WRITE SAME(10/16), COMPARE AND WRITE,
//!   UNMAP, GET LBA STATUS, SYNCHRONIZE CACHE(10/16), MODE SENSE(6/10),
//!   REQUEST SENSE, PERSISTENT RESERVE IN/OUT, REPORT TARGET PORT GROUPS and
//!   REPORT SUPPORTED OPERATION CODES (with command timeouts). The list and
//!   where LIO answers otherwise: docs/ARCHITECTURE.md, "The SPC/SBC
//!   command set".
//! * Everything else gets the sense a real target gives, at once: INVALID
//!   COMMAND OPERATION CODE for unknown opcodes, LBA OUT OF RANGE, INVALID
//!   FIELD IN CDB with a field pointer (every CDB bit outside a command's
//!   usage data, NACA and LINK included), LOGICAL UNIT NOT SUPPORTED.
//! * Vendor-specific opcodes go to the installed [`VendorHandler`], which may
//!   hold a command (a long poll) and complete it later from any thread.
//! * [`inproc`] is the front end for tests and the embedded demo.
//! * [`tcmu`] is the front end behind LIO: the `stp-target` daemon speaks
//!   the kernel's TCMU ring protocol and serves the same array to real
//!   initiators through tcm_loop.
//! * [`mailbox`] is the STG mailbox, the vendor handler of STP vendor mode.
//! * [`fault`] wraps any path in a seeded fault injector ([`FaultyTransport`]).
//! * [`alua`] and [`pr`]: target port groups with their access states
//!   (REPORT TARGET PORT GROUPS; a nexus enters through a target port,
//!   [`Host::login_through`]) and persistent reservations, as LIO has them.
//!
//! Invariants: every [`Task`] is completed exactly once (a reply dropped
//! unanswered completes as TASK ABORTED); no input from an initiator panics
//! the array; unit attentions are per initiator and per LUN, reported by
//! the next command other than INQUIRY and REPORT LUNS, as SAM-5 says.

pub mod alua;
pub mod array;
mod commands;
pub mod fault;
pub mod inproc;
pub mod lun;
pub mod mailbox;
mod pool;
pub mod pr;
pub mod task;
pub mod tcmu;

pub use array::{Array, Lun, VendorHandler};
pub use fault::{FaultControl, FaultPlan, FaultStats, FaultyTransport, InjectedError};
pub use inproc::{Host, InProcOptions, InProcTransport};
pub use lun::LunConfig;
pub use mailbox::{MailboxConfigError, MailboxStats, StgMailbox, StgSpec};
pub use task::{InitiatorId, Reply, Task, TaskResult};

/// A configuration the array refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A LUN setting is invalid.
    #[error("invalid LUN {field}: {why}")]
    InvalidLun {
        /// The offending field.
        field: &'static str,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// The LUN number is already in use.
    #[error("LUN {0} already exists; pick another LUN number")]
    DuplicateLun(u64),
    /// Two LUNs would share one identity.
    #[error("LUNs {first} and {second} would both be {naa}; every LUN needs its own identity")]
    DuplicateIdentity {
        /// The shared designator.
        naa: String,
        /// The LUN that has it.
        first: u64,
        /// The LUN that asked for it.
        second: u64,
    },
    /// The LUN number cannot be reported.
    #[error("LUN {lun} is beyond the highest supported LUN number {max}")]
    LunOutOfRange {
        /// The number asked for.
        lun: u64,
        /// The largest allowed.
        max: u64,
    },
}
