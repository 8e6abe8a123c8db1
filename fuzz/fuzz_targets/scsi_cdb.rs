//! CDBs as an initiator may send them.
//!
//! Property: a parsed CDB emits bytes that parse to the same CDB, with the
//! same data direction.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scsi::Cdb;

fuzz_target!(|data: &[u8]| {
    let Ok(cdb) = Cdb::parse(data) else {
        return;
    };
    let emitted = cdb.emit();
    let again = Cdb::parse(emitted.as_slice()).expect("an emitted CDB parses");
    assert_eq!(again, cdb);
    assert_eq!(again.direction(), cdb.direction());
});
