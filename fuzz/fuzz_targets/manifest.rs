//! Arbitrary bytes as `Manifest.json`: parsing must return Ok or an error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = corelm_format::package::Manifest::parse("Manifest.json".as_ref(), data) {
        // Whatever parses must serialize and parse again to the same manifest.
        let again = corelm_format::package::Manifest::parse("Manifest.json".as_ref(), manifest.to_json().as_bytes())
            .expect("a written manifest parses");
        assert_eq!(again, manifest);
    }
});
