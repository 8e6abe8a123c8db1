//! The `stp` command line's application library: backup and restore over
//! two channels (`stp backup`, `stp demo`), the bench's measuring code
//! (`stp bench`), which `stp demo` reuses, and `stp stg` (format, status).

pub mod backup;
pub mod bench;
pub mod logging;
pub mod stg;
