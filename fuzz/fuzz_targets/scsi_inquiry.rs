//! Standard INQUIRY data and VPD pages as any device may return them.
//!
//! Property: what parses emits bytes that parse to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scsi::inquiry::{StandardInquiry, VpdPage};

fuzz_target!(|data: &[u8]| {
    if let Ok(std) = StandardInquiry::parse(data) {
        let again = StandardInquiry::parse(&std.to_bytes()).expect("emitted INQUIRY data parses");
        assert_eq!(again, std);
    }
    if let Ok(page) = VpdPage::parse(data) {
        let _ = page.page_code();
        if let VpdPage::DeviceIdentification(ids) = &page {
            for id in ids {
                let _ = id.to_id_string();
            }
        }
        let bytes = page.to_bytes(0);
        assert_eq!(VpdPage::parse(&bytes), Ok(page));
    }
});
