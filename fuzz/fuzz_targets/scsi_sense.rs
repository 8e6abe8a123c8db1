//! Sense data, fixed or descriptor format, as any device may return it.
//!
//! Property: parsed sense emits descriptor-format bytes that parse back
//! to the same sense, and its fixed-format bytes parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scsi::sense::SenseFormat;
use scsi::Sense;

fuzz_target!(|data: &[u8]| {
    let Ok(sense) = Sense::parse(data) else {
        return;
    };
    let _ = sense.field_pointer();
    let _ = sense.to_string();
    let again = Sense::parse(&sense.to_descriptor()).expect("emitted descriptor sense parses");
    assert_eq!(
        again,
        Sense {
            format: SenseFormat::Descriptor,
            ..sense.clone()
        }
    );
    let fixed = Sense::parse(&sense.to_fixed()).expect("emitted fixed sense parses");
    assert_eq!((fixed.key, fixed.asc), (sense.key, sense.asc));
});
