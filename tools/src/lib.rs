//! The `stp` command line's application library: backup and restore over
//! two channels (`stp backup`, `stp demo`).

pub mod backup;
