//! GGUF reader: malformed files are refused with a message saying what is wrong (never a panic),
//! dequantization is bit-exact against the PyPI `gguf` package, and the tokenizer built from the
//! metadata equals what transformers builds. Fixtures come from `python/gguf_reference.py`.

use std::path::{Path, PathBuf};

use corelm_convert::gguf::{self, unpermute_qk, GgmlType, GgufFile, MetaArray, MetaValue};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf").join(name)
}

/// Little-endian GGUF bytes, written by hand.
#[derive(Default, Clone)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn header(version: u32, tensors: u64, kvs: u64) -> Bytes {
        let mut b = Bytes(b"GGUF".to_vec());
        b.u32(version).u64(tensors).u64(kvs);
        b
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads to the 32-byte data section and appends `n` data bytes.
    fn data(&mut self, n: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(32) {
            self.0.push(0);
        }
        self.0.extend(std::iter::repeat_n(0x11u8, n));
        self
    }
    fn parse(&self) -> corelm_convert::Result<GgufFile> {
        GgufFile::from_bytes("test.gguf", self.0.clone())
    }
}

fn refused(b: &Bytes) -> String {
    let e = b.parse().expect_err("the reader should refuse this file").to_string();
    assert!(e.starts_with("test.gguf: "), "{e}");
    e
}

#[test]
fn header_errors() {
    assert!(refused(&Bytes(vec![])).contains("truncated header: the file is 0 bytes"));
    assert!(refused(&Bytes(b"GGU".to_vec())).contains("truncated header"));
    let e = refused(&Bytes(b"GGML\x03\0\0\0".to_vec()));
    assert!(e.contains(r#"not a GGUF file: starts with "GGML""#), "{e}");
    let e = refused(&Bytes::header(1, 0, 0));
    assert!(e.contains("GGUF version 1 is not supported (only versions 2 and 3)"), "{e}");
    let e = refused(&Bytes::header(7, 0, 0));
    assert!(e.contains("unsupported GGUF version 7"), "{e}");
    let e = refused(&Bytes::header(3u32.swap_bytes(), 0, 0));
    assert!(e.contains("big-endian GGUF (version 3) is not supported"), "{e}");
    let mut b = Bytes::header(3, 0, 0);
    b.0.truncate(20);
    let e = refused(&b);
    assert!(e.contains("truncated header: needs 8 bytes at offset 16, but the file ends after 4 more"), "{e}");
    // v2 and v3 with nothing in them are fine.
    for v in [2, 3] {
        let f = Bytes::header(v, 0, 0).parse().unwrap();
        assert_eq!((f.version(), f.tensors().len(), f.metadata().len()), (v, 0, 0));
    }
}

#[test]
fn absurd_counts() {
    let e = refused(&Bytes::header(3, 0, u64::MAX));
    assert!(e.contains("metadata entry count: count 18446744073709551615 cannot fit in the 0 bytes left"), "{e}");
    let mut b = Bytes::header(3, 0, 1000);
    b.kv_u32("a", 1);
    assert!(refused(&b).contains("metadata entry count: count 1000 cannot fit in the 17 bytes left"));
    let e = refused(&Bytes::header(3, 1 << 40, 0));
    assert!(e.contains("tensor count: count 1099511627776 cannot fit"), "{e}");
    // Array whose element count times the element size overflows u64.
    let mut b = Bytes::header(3, 0, 1);
    b.str("arr").u32(9).u32(10).u64(u64::MAX / 4);
    let e = refused(&b);
    assert!(e.contains("metadata 'arr' array of u64: count 4611686018427387903 cannot fit in the 0 bytes left"), "{e}");
    // String array whose count is larger than the bytes left could hold.
    let mut b = Bytes::header(3, 0, 1);
    b.str("arr").u32(9).u32(8).u64(3).u64(0).u64(0);
    assert!(refused(&b).contains("metadata 'arr' array of string: count 3 cannot fit in the 16 bytes left"));
}

#[test]
fn metadata_errors() {
    // Key length past the end of the file.
    let mut b = Bytes::header(3, 0, 1);
    b.u64(1 << 40).0.extend_from_slice(&[b'k'; 30]);
    let e = refused(&b);
    assert!(e.contains("metadata entry #0 key: string length 1099511627776 at offset 24 runs past the end of the file (30 bytes left)"), "{e}");
    // String value past the end of the file.
    let mut b = Bytes::header(3, 0, 1);
    b.str("general.name").u32(8).u64(100).0.extend_from_slice(b"short");
    let e = refused(&b);
    assert!(
        e.contains(
            "metadata 'general.name': string length 100 at offset 48 runs past the end of the file (5 bytes left)"
        ),
        "{e}"
    );
    // Value cut off.
    let mut b = Bytes::header(3, 0, 1);
    b.str("x").u32(10).u32(7);
    let e = refused(&b);
    assert!(e.contains("metadata 'x': needs 8 bytes at offset 37, but the file ends after 4 more"), "{e}");
    let mut b = Bytes::header(3, 0, 1);
    b.str("x").u32(13).u32(0);
    assert!(refused(&b).contains("metadata 'x': unknown value type 13"));
    let mut b = Bytes::header(3, 0, 1);
    b.str("x").u32(9).u32(42).u64(0);
    assert!(refused(&b).contains("metadata 'x': array of unknown value type 42"));
    let mut b = Bytes::header(3, 0, 1);
    b.str("x").u32(7).0.push(2);
    assert!(refused(&b).contains("metadata 'x': bool byte is 2, expected 0 or 1"));
    let mut b = Bytes::header(3, 0, 1);
    b.u64(2).0.extend_from_slice(&[0xC3, 0x28]);
    b.u32(4).u32(0);
    assert!(refused(&b).contains("metadata entry #0 key: string is not valid UTF-8"));
    let mut b = Bytes::header(3, 0, 2);
    b.kv_u32("k", 1).kv_u32("k", 2);
    assert!(refused(&b).contains("metadata key 'k' appears more than once"));
    // Arrays nested past the depth limit.
    let mut b = Bytes::header(3, 0, 1);
    b.str("deep").u32(9);
    for _ in 0..9 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0);
    assert!(refused(&b).contains("arrays nested more than 8 deep"));
    let mut b = Bytes::header(3, 0, 1);
    b.kv_u32("general.alignment", 48);
    assert!(refused(&b).contains("general.alignment must be a power of two up to 2^30, got 48"));
    let mut b = Bytes::header(3, 0, 1);
    b.kv_u32("general.alignment", 0);
    assert!(refused(&b).contains("general.alignment must be a power of two"));
}

#[test]
fn tensor_info_errors() {
    let one = |name: &str, ne: &[u64], ty: u32, offset: u64, data: usize| {
        let mut b = Bytes::header(3, 1, 0);
        b.tensor(name, ne, ty, offset).data(data);
        b
    };
    assert!(one("w", &[32, 2], 2, 0, 36).parse().is_ok());
    let e = refused(&one("w", &[32, 2], 99, 0, 64));
    assert!(e.contains("tensor 'w' has unknown ggml type id 99"), "{e}");
    let e = refused(&one("w", &[33, 2], 2, 0, 64));
    assert!(e.contains("tensor 'w' row length 33 is not a multiple of the Q4_0 block size 32"), "{e}");
    let e = refused(&one("w", &[256, 1], 12, 0, 64)); // Q4_K: 144 bytes needed
    assert!(e.contains("tensor 'w' data (bytes 96..240) runs past the end of the file (160 bytes)"), "{e}");
    let e = refused(&one("w", &[4], 0, u64::MAX - 31, 16));
    assert!(e.contains("tensor 'w' offset 18446744073709551584 + 16 bytes overflows"), "{e}");
    let e = refused(&one("w", &[4], 0, 8, 64));
    assert!(e.contains("tensor 'w' has offset 8, which is not a multiple of the alignment 32"), "{e}");
    let e = refused(&one("w", &[1, 1, 1, 1, 1], 0, 0, 4));
    assert!(e.contains("tensor 'w' has 5 dimensions; ggml allows at most 4"), "{e}");
    let e = refused(&one("w", &[1 << 32, 1 << 32], 0, 0, 4));
    assert!(e.contains("tensor 'w' dimensions [4294967296, 4294967296] overflow the element count"), "{e}");
    let e = refused(&one("w", &[u64::MAX], 0, 0, 4));
    assert!(e.contains("tensor 'w' has dimension 18446744073709551615, larger than ggml's int64"), "{e}");
    let e = refused(&one("w", &[1 << 40], 0, 0, 4));
    assert!(e.contains("tensor 'w' (F32, dims [1099511627776]) is larger than the whole file"), "{e}");
    // Name past the end of the file.
    let mut b = Bytes::header(3, 1, 0);
    b.u64(1000).0.extend_from_slice(&[b'x'; 30]);
    assert!(refused(&b)
        .contains("tensor #0 name: string length 1000 at offset 24 runs past the end of the file (30 bytes left)"));
    let mut b = Bytes::header(3, 2, 0);
    b.tensor("w", &[4], 0, 0).tensor("w", &[4], 0, 32).data(64);
    assert!(refused(&b).contains("tensor 'w' appears more than once"));
    // Cut off inside the tensor table.
    let mut b = Bytes::header(3, 1, 0);
    b.tensor("w", &[4, 4], 0, 0);
    b.0.truncate(b.0.len() - 10);
    assert!(refused(&b).contains("tensor 'w': needs 4 bytes at offset"));
}

#[test]
fn io_errors_name_the_file() {
    let e = GgufFile::open("/nonexistent/model.gguf").unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/model.gguf: "), "{e}");
}

/// Every truncation and many byte corruptions of a real file are refused or read, never a panic.
#[test]
fn truncated_and_corrupted_files_never_panic() {
    let bytes = std::fs::read(fixture("quants.gguf")).unwrap();
    let full = GgufFile::from_bytes("f", bytes.clone()).unwrap();
    let last_end = full.tensors().iter().map(|t| t.file_offset + t.byte_len).max().unwrap();
    for len in 0..bytes.len() {
        let r = GgufFile::from_bytes("f", bytes[..len].to_vec());
        assert_eq!(r.is_ok(), len >= last_end, "prefix of {len} bytes");
    }
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let header_end = full.data_start() as usize;
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % header_end;
            b[at] = match next() % 3 {
                0 => next() as u8,
                1 => 0xFF,
                _ => b[at] ^ (1 << (next() % 8)),
            };
        }
        if let Ok(f) = GgufFile::from_bytes("f", b) {
            for t in f.tensors() {
                let _ = f.dequantize(t);
            }
            let _ = gguf::tokenizer_json(&f);
        }
    }
}

#[test]
fn metadata_of_every_type() {
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_start() % 64, 0);
    assert_eq!(f.architecture().unwrap(), "llama");
    let m = f.metadata();
    assert_eq!(m["test.u8"], MetaValue::U8(200));
    assert_eq!(m["test.i8"], MetaValue::I8(-100));
    assert_eq!(m["test.u16"], MetaValue::U16(60000));
    assert_eq!(m["test.i16"], MetaValue::I16(-30000));
    assert_eq!(m["test.u32"], MetaValue::U32(4_000_000_000));
    assert_eq!(m["test.i32"], MetaValue::I32(-2_000_000_000));
    assert_eq!(m["test.f32"], MetaValue::F32(0.1));
    assert_eq!(m["test.bool"], MetaValue::Bool(true));
    assert_eq!(m["test.string"], MetaValue::String("héllo 😀".into()));
    assert_eq!(m["test.u64"], MetaValue::U64(18_000_000_000_000_000_000));
    assert_eq!(m["test.i64"], MetaValue::I64(-9_000_000_000_000_000_000));
    assert_eq!(m["test.f64"], MetaValue::F64(1e300));
    assert_eq!(m["test.array_u8"], MetaValue::Array(MetaArray::U8(vec![1, 2, 255])));
    assert_eq!(m["test.array_i16"], MetaValue::Array(MetaArray::I16(vec![-1, 2, -3])));
    assert_eq!(m["test.array_f32"], MetaValue::Array(MetaArray::F32(vec![0.5, -1.5])));
    assert_eq!(m["test.array_f64"], MetaValue::Array(MetaArray::F64(vec![0.25])));
    assert_eq!(m["test.array_bool"], MetaValue::Array(MetaArray::Bool(vec![true, false])));
    assert_eq!(m["test.array_u64"], MetaValue::Array(MetaArray::U64(vec![1 << 63])));
    let strs = ["a", "", "ü"].map(String::from).to_vec();
    assert_eq!(m["test.array_str"], MetaValue::Array(MetaArray::String(strs.clone())));
    assert_eq!(
        m["test.nested"],
        MetaValue::Array(MetaArray::Array(vec![MetaArray::I32(vec![1, 2]), MetaArray::I32(vec![3])]))
    );
    assert_eq!(f.metadata_keys()[0], "general.architecture");

    // Typed getters accept any integer type that fits.
    assert_eq!(f.get_u32("test.u8").unwrap(), Some(200));
    assert_eq!(f.get_usize("test.u16").unwrap(), Some(60000));
    assert_eq!(f.get_i64("test.i8").unwrap(), Some(-100));
    assert_eq!(f.get_u64("test.u64").unwrap(), Some(18_000_000_000_000_000_000));
    assert_eq!(f.get_f32("test.f32").unwrap(), Some(0.1));
    assert_eq!(f.get_f64("test.u8").unwrap(), Some(200.0));
    assert_eq!(f.get_bool("test.bool").unwrap(), Some(true));
    assert_eq!(f.get_str("test.string").unwrap(), Some("héllo 😀"));
    assert_eq!(f.get_str_array("test.array_str").unwrap(), Some(&strs[..]));
    assert_eq!(f.get_f32_array("test.array_i16").unwrap(), Some(vec![-1.0, 2.0, -3.0]));
    assert_eq!(f.get_i64_array("test.array_u8").unwrap(), Some(vec![1, 2, 255]));
    assert_eq!(f.get_u32("absent").unwrap(), None);
    let err = |r: corelm_convert::Result<_>| -> String { r.map(|_: ()| ()).unwrap_err().to_string() };
    let e = err(f.get_u32("test.i8").map(drop));
    assert!(e.contains("metadata key 'test.i8' is -100, which does not fit u32"), "{e}");
    let e = err(f.get_u32("test.u64").map(drop));
    assert!(e.contains("which does not fit u32"), "{e}");
    let e = err(f.get_str("test.u32").map(drop));
    assert!(e.contains("metadata key 'test.u32' is u32, expected a string"), "{e}");
    let e = err(f.get_str_array("test.array_u8").map(drop));
    assert!(e.contains("metadata key 'test.array_u8' is array of u8, expected an array of string"), "{e}");
    let e = err(f.require_usize("llama.block_count").map(drop));
    assert!(e.contains("metadata key 'llama.block_count' is missing"), "{e}");
    let e = err(f.get_i64_array("test.array_u64").map(drop));
    assert!(e.contains("holds 9223372036854775808, which does not fit i64"), "{e}");
}

/// Every tensor dequantizes to exactly the values `gguf.quants.dequantize` gave (bit for bit).
/// The gguf package's dequantization of quants.gguf: the manifest and the floats it indexes.
fn gguf_py_dequantization() -> (Value, Vec<f32>) {
    let manifest = serde_json::from_slice(&std::fs::read(fixture("quants.expected.json")).unwrap()).unwrap();
    let floats = std::fs::read(fixture("quants.expected.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (manifest, floats)
}

/// The lattice i-quants, ternary and fp4 types (carried as indices into a small table of levels).
const LATTICE_TYPES: [GgmlType; 11] = {
    use GgmlType::*;
    [IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, TQ1_0, TQ2_0, MXFP4, NVFP4]
};

#[test]
fn dequantization_matches_gguf_py_bit_for_bit() {
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    let (manifest, floats) = gguf_py_dequantization();
    let entries = manifest["tensors"].as_array().unwrap();
    assert_eq!(entries.len(), f.tensors().len());
    let mut types_seen = Vec::new();
    for entry in entries {
        let name = entry["name"].as_str().unwrap();
        let t = f.tensor(name).unwrap_or_else(|| panic!("tensor {name} missing"));
        assert_eq!(t.dtype.name(), entry["type"].as_str().unwrap(), "{name}");
        let shape: Vec<usize> =
            entry["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.shape, shape, "{name}");
        let got = f.dequantize(t).unwrap();
        let offset = entry["offset"].as_u64().unwrap() as usize;
        let want = &floats[offset..offset + t.n_elements()];
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{name}[{i}]: {g} vs {w}");
        }
        types_seen.push(t.dtype);
    }
    use GgmlType::*;
    let basic = [F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS];
    for ty in basic.into_iter().chain(LATTICE_TYPES) {
        assert!(types_seen.contains(&ty), "fixture has no {ty} tensor");
    }
    let t = f.tensor("shape3d.Q8_0").unwrap();
    assert_eq!((t.shape.clone(), t.ggml_dims(), t.n_rows(), t.row_len()), (vec![2, 3, 64], vec![64, 3, 2], 6, 64));
}

/// Every grid Core ML carries rebuilds the gguf package's dequantized values: bit for bit where
/// the scales are the file's own fp16 values (or values fp16 holds) and there is no minimum
/// (Q4_0, Q5_0, Q8_0, IQ4_NL, TQ1_0, TQ2_0, NVFP4); otherwise within the fp16 rounding of the derived scale `a` and offset `b/a`, that is
/// 2⁻¹¹·(|a·q| + |b|) per weight (plus f32 rounding), which in terms of what is stored is
/// 2⁻¹¹·(|scale·q| + |scale·offset|)·(1 + 2⁻¹⁰). `max_error` covers every weight.
#[test]
fn carried_grids_rebuild_gguf_py_dequantization() {
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    let (manifest, floats) = gguf_py_dequantization();
    let mut checked = Vec::new();
    for entry in manifest["tensors"].as_array().unwrap() {
        let t = f.tensor(entry["name"].as_str().unwrap()).unwrap();
        let Some(g) = gguf::carried_grid(t.dtype, f.raw(t), corelm_format::DType::Fp16) else {
            assert!(!t.dtype.is_quantized(), "{} has no grid form", t.name);
            continue;
        };
        let offset = entry["offset"].as_u64().unwrap() as usize;
        let want = &floats[offset..offset + t.n_elements()];
        let exact = g.form.exact_scales && !g.form.min;
        let mut worst = 0f32;
        for (i, &w) in want.iter().enumerate() {
            let b = i / g.form.run;
            let o = g.offsets.as_ref().map_or(0.0, |o| o[b]);
            let level = g.form.lut.map_or(f32::from(g.values[i]), |lut| f32::from(lut[g.values[i] as usize]));
            let got = g.scales[b] * (level - o);
            if exact {
                assert_eq!(got.to_bits(), w.to_bits(), "{}[{i}]: {got} vs {w}", t.name);
            } else {
                let stored = (g.scales[b] * level).abs() + (g.scales[b] * o).abs();
                let bound = stored * 2f32.powi(-11) * (1.0 + 2f32.powi(-10))
                    + 4.0 * f32::EPSILON * w.abs().max(stored)
                    + 32.0 * 2f32.powi(-24);
                assert!((got - w).abs() <= bound, "{}[{i}]: {got} vs {w} (bound {bound})", t.name);
            }
            worst = worst.max((got - w).abs());
        }
        assert!(worst <= g.max_error, "{}: max_error {} < observed {worst}", t.name, g.max_error);
        if exact {
            assert_eq!(g.max_error, 0.0, "{}", t.name);
        }
        checked.push(t.dtype);
    }
    use GgmlType::*;
    for ty in
        [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS].into_iter().chain(LATTICE_TYPES)
    {
        assert!(checked.contains(&ty), "no {ty} tensor checked");
    }
    for ty in [TQ1_0, TQ2_0, NVFP4] {
        let form = ty.grid_form().unwrap();
        assert!(form.exact_scales && !form.min, "{ty} should be carried exactly");
    }
}

/// Arbitrary bytes in every block type with a grid (NaN and infinite scales included): both
/// decoders run without panicking, agree on the element count, and wherever the dequantized
/// weight is finite the grid's integers are in the container's range.
#[test]
fn block_decoders_take_arbitrary_bytes() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut byte = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    let with_grid: Vec<GgmlType> = GgmlType::ALL.iter().copied().filter(|t| t.grid_form().is_some()).collect();
    assert!(LATTICE_TYPES.iter().all(|t| with_grid.contains(t)));
    for ty in with_grid {
        for blocks in [1usize, 3] {
            let data: Vec<u8> = (0..ty.type_size() * blocks).map(|_| byte()).collect();
            let values = gguf::dequantize_bytes(ty, &data).unwrap();
            let g = gguf::carried_grid(ty, &data, corelm_format::DType::Fp16).unwrap();
            assert_eq!((values.len(), g.values.len()), (blocks * ty.block_size(), blocks * ty.block_size()), "{ty}");
            assert_eq!(g.scales.len(), values.len() / g.form.run, "{ty}");
            let (lo, hi) = g.form.container.int_range().unwrap();
            assert!(g.values.iter().all(|&v| (lo..=hi).contains(&i64::from(v))), "{ty}: values outside {lo}..={hi}");
            if let Some(lut) = g.form.lut {
                assert_eq!(hi + 1, lut.len() as i64, "{ty}: the index type does not span the table");
            }
        }
        let e = gguf::dequantize_bytes(ty, &vec![0u8; ty.type_size() + 1]).unwrap_err().to_string();
        assert!(e.contains("not a whole number"), "{ty}: {e}");
    }
}

#[test]
fn q8_k_by_hand() {
    // block_q8_K { f32 d; i8 qs[256]; i16 bsums[16]; }: y = d * q.
    let mut b = 0.25f32.to_le_bytes().to_vec();
    b.extend((0..256).map(|i| (i as i8).wrapping_sub(100) as u8));
    b.extend([0u8; 32]);
    let y = gguf::dequantize_bytes(GgmlType::Q8_K, &b).unwrap();
    assert_eq!(y.len(), 256);
    for (i, v) in y.iter().enumerate() {
        assert_eq!(*v, 0.25 * f32::from((i as i8).wrapping_sub(100)), "{i}");
    }
}

#[test]
fn unpermutes_llama_cpp_qk_rows() {
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    let stored = f.tensor("permute.stored").unwrap();
    let original = f.dequantize(f.tensor("permute.original").unwrap()).unwrap();
    let (rows, cols) = (stored.shape[0], stored.shape[1]);
    let values = f.dequantize(stored).unwrap();
    assert_ne!(values, original);
    assert_eq!(unpermute_qk(&values, rows, cols, 4).unwrap(), original);
    // On the raw rows, before dequantizing: the same.
    let raw = unpermute_qk(f.raw(stored), rows, stored.row_bytes(), 4).unwrap();
    assert_eq!(gguf::dequantize_bytes(stored.dtype, &raw).unwrap(), original);
    let e = unpermute_qk(&values, rows, cols, 3).unwrap_err().to_string();
    assert!(e.contains("cannot unpermute 32 rows over 3 heads"), "{e}");
}

/// The tokenizer.json built from each vocabulary equals what transformers 5.24 builds from the
/// same file, except that transformers also adds its tokenizer class's default special tokens when
/// the vocabulary lacks them (`<|endoftext|>` for a byte-level vocabulary without one), with a new
/// id that no embedding row backs -- in `tok_gpt2`, whose vocabulary repeats a token, that id even
/// collides with another token's. We leave those out.
#[test]
fn tokenizer_json_matches_transformers() {
    for name in ["tok_gpt2", "tok_llama", "tok_phi3", "tok_gemma3"] {
        let f = GgufFile::open(fixture(&format!("{name}.gguf"))).unwrap();
        let ours = gguf::tokenizer_json(&f).unwrap();
        let mut theirs: Value =
            serde_json::from_slice(&std::fs::read(fixture(&format!("{name}.tokenizer.json"))).unwrap()).unwrap();
        let vocab = theirs["model"]["vocab"].clone();
        let added = theirs["added_tokens"].as_array_mut().unwrap();
        let before = added.len();
        added.retain(|t| vocab.get(t["content"].as_str().unwrap()) == Some(&t["id"]));
        assert_eq!(before - added.len(), usize::from(name == "tok_gpt2"), "{name}");
        for key in ["added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model"] {
            assert_eq!(ours[key], theirs[key], "{name}: {key}");
        }
        assert_eq!(ours, theirs, "{name}");
        assert!(gguf::chat_template(&f).unwrap().starts_with("{% for m in messages %}"));
    }
}

#[test]
fn special_tokens_and_config() {
    let f = GgufFile::open(fixture("tok_gemma3.gguf")).unwrap();
    let ids = gguf::special_token_ids(&f).unwrap();
    assert_eq!((ids.bos, ids.eos, ids.unk, ids.pad), (Some(2), Some(1), Some(3), Some(0)));
    let c = gguf::tokenizer_config_json(&f).unwrap();
    assert_eq!(c["bos_token"], "<bos>");
    assert_eq!(c["add_bos_token"], true);
    assert_eq!(c["pad_token"], "<pad>");
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    assert_eq!(gguf::special_token_ids(&f).unwrap(), gguf::SpecialTokenIds::default());
    assert_eq!(gguf::chat_template(&f), None);
    let e = gguf::tokenizer_json(&f).unwrap_err().to_string();
    assert!(e.contains("metadata key 'tokenizer.ggml.model' is missing"), "{e}");
}

#[test]
fn tokenizer_metadata_errors() {
    let mut b = Bytes::header(3, 0, 3);
    b.str("tokenizer.ggml.model").u32(8).str("gpt2");
    b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(2).str("a").str("b");
    b.kv_u32("tokenizer.ggml.bos_token_id", 5);
    let f = b.parse().unwrap();
    let e = gguf::tokenizer_json(&f).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.bos_token_id is 5 but the vocabulary has 2 tokens"), "{e}");

    let mut b = Bytes::header(3, 0, 2);
    b.str("tokenizer.ggml.model").u32(8).str("t5");
    b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(1).str("a");
    let e = gguf::tokenizer_json(&b.parse().unwrap()).unwrap_err().to_string();
    assert!(e.contains("tokenizer model 't5' is not supported"), "{e}");

    let mut b = Bytes::header(3, 0, 3);
    b.str("tokenizer.ggml.model").u32(8).str("llama");
    b.str("tokenizer.ggml.tokens").u32(9).u32(8).u64(1).str("a");
    b.str("tokenizer.ggml.scores").u32(9).u32(6).u64(2).u32(0).u32(0);
    let e = gguf::tokenizer_json(&b.parse().unwrap()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.scores has 2 entries but there are 1 tokens"), "{e}");
}

#[test]
fn tensor_infos_from_elsewhere_are_refused() {
    let f = GgufFile::open(fixture("quants.gguf")).unwrap();
    let mut t = f.tensor("quant.Q4_0").unwrap().clone();
    t.shape = vec![usize::MAX, 64];
    assert!(f.dequantize(&t).unwrap_err().to_string().contains("tensor 'quant.Q4_0' does not describe data of"));
    t.shape = vec![8, 64];
    t.byte_len = 8 * 2 * 18;
    t.file_offset = usize::MAX - 10;
    assert!(f.raw(&t).is_empty());
    assert!(f.dequantize(&t).is_err());
}
