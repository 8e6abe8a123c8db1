//! The data-in of the vendor-mode commands as a host reads it from the
//! array: STG INFO, BIND and PORT STATUS.
//!
//! Property: what parses emits bytes that parse to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stp_core::vendor::{BindResult, PortStatus, StgInfo};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = StgInfo::parse(data) {
        assert_eq!(StgInfo::parse(&info.to_bytes()), Ok(info));
    }
    if let Ok(bind) = BindResult::parse(data) {
        assert_eq!(BindResult::parse(&bind.to_bytes()), Ok(bind));
    }
    if let Ok(status) = PortStatus::parse(data) {
        assert_eq!(PortStatus::parse(&status.to_bytes()), Ok(status));
    }
});
