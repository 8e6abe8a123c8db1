//! The `stp` command line's application library: backup and restore over
//! two channels (`stp backup`, `stp demo`), and the bench's measuring code
//! (`stp bench`), which `stp demo` reuses.

pub mod backup;
pub mod bench;
