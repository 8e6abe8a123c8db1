//! The simulated array's whole command handler: a script of CDBs and
//! data-out (see `stp_fuzz_input` for its format) from three initiators
//! to a small array with two STG members behind the vendor-mode mailbox
//! and a plain LUN. Every command must complete properly (checked by
//! `run_array_script`), and nothing may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stp_fuzz_input::run_array_script(data);
});
