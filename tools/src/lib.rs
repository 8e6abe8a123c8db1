//! The `stp` command line's application library: backup and restore over
//! two channels (`stp backup`, `stp demo`), the bench's measuring code
//! (`stp bench`), which `stp demo` reuses, `stp stg` (format, status,
//! fence) and `stp preflight`.

pub mod backup;
pub mod bench;
pub mod logging;
pub mod preflight;
pub mod stg;
