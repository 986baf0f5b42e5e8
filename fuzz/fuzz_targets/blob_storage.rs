//! Arbitrary bytes as `weight.bin`: walking and reading every record must not panic.
#![no_main]
use corelm_format::blob::BlobFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = BlobFile::from_bytes("weight.bin", data.to_vec()) else { return };
    let Ok(records) = file.all_metadata() else { return };
    for meta in records {
        let bytes = file.data(&meta);
        assert_eq!(bytes.len() as u64, meta.size_in_bytes);
        let read = file.read(meta.offset, meta.dtype, &[meta.element_count as usize]).expect("a checked record reads");
        assert_eq!(read.bytes(), bytes);
    }
});
