//! Acceptance 1 of issue 7: `corelm plan` for Llama-3.1-8B at context 2048 (int4 ≈ 4.2 GB and
//! fp16 ≈ 16 GB as Apple reports) and the KV cache of Gemma-3-1B at 32k context with and without
//! sliding-window savings, each checked against a hand calculation written out here (never by
//! calling the planner). Plus: the planner's layout model against packages `corelm convert`
//! actually writes.
//!
//! Apple's figures: "On Device Llama 3.1 with Core ML", Apple Machine Learning Research, 2024,
//! https://machinelearning.apple.com/research/core-ml-on-device-llama — Llama-3.1-8B-Instruct in
//! Float16 is about 16 GB; with Int4 block-wise quantization (block size 32) it is about 4.2 GB.
//! (Apple's "4.2 GB" is binary: 4.52 × 10⁹ bytes is 4.21 GiB; its "16 GB" is decimal: 16.06 × 10⁹
//! bytes is 14.96 GiB. Both are checked below.)
//!
//! The configurations are the published `config.json` files (see
//! tests/fixtures/configs/README.md for where the dimensions were checked).

use std::path::{Path, PathBuf};

use corelm_deploy::devices::{find, DEVICES};
use corelm_deploy::plan::{breakdown, plan, recommend, Assumptions, Fit, Quant};
use corelm_deploy::ModelShape;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs").join(name)
}

const GIB: f64 = 1073741824.0;

// ------------------------------------------------------------------------------------------------
// Llama-3.1-8B: 32 layers, hidden h = 4096, 32 heads × head_dim 128 (q: 4096), 8 KV heads × 128
// (k, v: 1024), intermediate 14336, vocabulary 128256, embeddings untied.
//
// Matrices (rows × cols, as Core ML stores linear weights: out × in):
//   per layer  q 4096 × 4096     =  16,777,216
//              k 1024 × 4096     =   4,194,304
//              v 1024 × 4096     =   4,194,304
//              o 4096 × 4096     =  16,777,216
//              gate 14336 × 4096 =  58,720,256
//              up   14336 × 4096 =  58,720,256
//              down 4096 × 14336 =  58,720,256
//              sum               = 218,103,808
//   32 layers                    = 6,979,321,856
//   embedding 128256 × 4096      =   525,336,576
//   LM head 128256 × 4096        =   525,336,576
//   all matrices                 = 8,029,995,008 values
// Other stored values:
//   norms (fp32): 32 × 2 × 4096 + 4096 = 266,240 values × 4 B = 1,064,960 B
//   linear biases (fp16; zeros, the MIL default for `linear`): one per output row,
//     per layer 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096 = 43,008; × 32 = 1,376,256;
//     + LM head 128,256 = 1,504,512 values × 2 B = 3,009,024 B
//   RoPE cos + sin tables (fp16) at context 2048: 2 × 2048 × 128 × 2 B = 1,048,576 B
//   other = 5,122,560 B
// ------------------------------------------------------------------------------------------------
const LLAMA_PER_LAYER: u64 = 16_777_216 + 4_194_304 + 4_194_304 + 16_777_216 + 3 * 58_720_256;
const LLAMA_MATRIX_VALUES: u64 = 8_029_995_008;
const LLAMA_EMBEDDING_VALUES: u64 = 525_336_576;
const LLAMA_OTHER: u64 = 5_122_560;

// fp16: 2 B per value: 8,029,995,008 × 2 = 16,059,990,016; + 5,122,560 = 16,065,112,576 B.
const LLAMA_FP16: u64 = 16_065_112_576;
// int4 block 32: every cols (4096, 14336) is a multiple of 32, so each value costs 0.5 B plus one
// 2-byte scale per 32 values: 0.5 + 2/32 = 0.5625 B. 8,029,995,008 × 9 / 16 = 4,516,872,192;
// + 5,122,560 = 4,521,994,752 B (= 4.2114 GiB).
const LLAMA_INT4: u64 = 4_521_994_752;
// KV cache at 2048 (no sliding layers): 2 (K, V) × 8 heads × 128 × 2 B = 4096 B per token per
// layer; × 32 layers × 2048 tokens = 268,435,456 B (256 MiB), with or without savings.
const LLAMA_KV_2048: u64 = 268_435_456;

#[test]
fn hand_calculations_are_consistent() {
    // The arithmetic of the comments above, step by step (constants only, no planner code).
    assert_eq!(LLAMA_PER_LAYER, 218_103_808);
    assert_eq!(32 * LLAMA_PER_LAYER + 2 * LLAMA_EMBEDDING_VALUES, LLAMA_MATRIX_VALUES);
    assert_eq!(4096 * 4096 + 1024 * 4096 * 2 + 4096 * 4096 + 3 * 14336 * 4096, LLAMA_PER_LAYER);
    assert_eq!(128_256 * 4096, LLAMA_EMBEDDING_VALUES);
    assert_eq!(
        (32 * 2 * 4096 + 4096) * 4
            + (32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096) + 128_256) * 2
            + 2 * 2048 * 128 * 2,
        LLAMA_OTHER
    );
    assert_eq!(LLAMA_MATRIX_VALUES * 2 + LLAMA_OTHER, LLAMA_FP16);
    assert_eq!(LLAMA_MATRIX_VALUES / 2 + LLAMA_MATRIX_VALUES / 32 * 2 + LLAMA_OTHER, LLAMA_INT4);
    assert_eq!(2 * 8 * 128 * 2 * 32 * 2048, LLAMA_KV_2048);
}

#[test]
fn llama_3_1_8b_at_2048_matches_apple() {
    let model = corelm_deploy::open(&fixture("Llama-3.1-8B")).unwrap();
    assert_eq!(model.parameters, LLAMA_MATRIX_VALUES);
    let a = Assumptions::default();

    let fp16 = breakdown(&model, Some(Quant::Fp16), 2048, &a).unwrap();
    assert_eq!(fp16.weights.total, LLAMA_FP16);
    assert_eq!(fp16.weights.other, LLAMA_OTHER);
    // Apple: "~16 GB" in Float16.
    assert!((fp16.weights.total as f64 / 1e9 - 16.0).abs() < 0.1, "{}", fp16.weights.total);

    let int4 = breakdown(&model, Some(Quant::Int4), 2048, &a).unwrap();
    assert_eq!(int4.weights.total, LLAMA_INT4);
    // Apple: "~4.2 GB" with Int4 blocks of 32.
    assert!((int4.weights.total as f64 / GIB - 4.2).abs() < 0.05, "{}", int4.weights.total);

    for b in [&fp16, &int4] {
        assert_eq!(b.kv_cache.full, LLAMA_KV_2048);
        assert_eq!(b.kv_cache.with_sliding_window_savings, LLAMA_KV_2048);
        assert_eq!(b.kv_cache.sliding_layers, 0);
        assert_eq!(b.kv_cache.per_layer.len(), 32);
        assert!(b.kv_cache.per_layer.iter().all(|l| l.full == 4096 * 2048));
    }

    // Activations (context T = 2048, prefill chunk 512):
    //   per token 8h + 2(q + 2kv) + 4i + 2V = 32,768 + 2 × (4096 + 2048) + 57,344 + 256,512 = 358,912
    //   decode  = 358,912 + 2 × 32 heads × 1 × 2048 = 489,984
    //   prefill = 512 × 358,912 + 2 × 32 × 512 × 2048 = 183,762,944 + 67,108,864 = 250,871,808
    assert_eq!(int4.activations.decode, 489_984);
    assert_eq!(int4.activations.prefill_tokens, 512);
    assert_eq!(int4.activations.prefill, 250_871_808);
    // Load overhead: 256 MiB + 10% of 4,521,994,752 = 268,435,456 + 452,199,475 = 720,634,931.
    assert_eq!(int4.load_overhead, 720_634_931);
    // Total: 4,521,994,752 + 268,435,456 + 250,871,808 + 720,634,931 = 5,761,936,947.
    assert_eq!(int4.total, 5_761_936_947);
    // Bytes read per decoded token: the weights minus the gathered (untied) embedding table
    // (525,336,576 × 0.5625 = 295,501,824) and the RoPE tables (1,048,576), plus the KV cache:
    // 4,521,994,752 − 295,501,824 − 1,048,576 + 268,435,456 = 4,493,879,808.
    assert_eq!(int4.decode_bytes_per_token, 4_493_879_808);

    // On an M1 Max (400 GB/s) the bound is 400e9 / 4,493,879,808 = 89.01 tok/s (Apple measured
    // ~33 tok/s on that machine: the bound holds).
    let m1_max = find("Mac M1 Max 64GB");
    let p = plan(&model, Some(Quant::Int4), Some(2048), &m1_max, &a).unwrap();
    assert!((p.devices[0].decode_tokens_per_second - 89.01).abs() < 0.01);
    assert!(p.devices[0].decode_tokens_per_second > 33.0);
    assert_eq!(p.devices[0].fit, Fit::Fits);

    // Where it fits: a 16 GB iPad (12 GiB usable) holds int8 with 15% free, not fp16; an 8 GB
    // iPhone (6 GiB usable) holds int4 only tightly (5.37 GiB of 6: more than 85%), lut4 (half a
    // byte a value plus 2 B per row, 5.21 × 10⁹ B in all) with margin; a 4 GB iPhone holds neither.
    let ipad16 = find("iPad Pro M4 (16 GB, 1-2 TB)")[0];
    let r = recommend(&model, ipad16, 2048, &a);
    assert_eq!((r.scheme, r.context, r.compute_units), (Some(Quant::Int8), Some(2048), "all"));
    let iphone = find("iPhone 15 Pro / Pro Max")[0];
    let p = plan(&model, Some(Quant::Int4), Some(2048), &[iphone], &a).unwrap();
    assert_eq!(p.devices[0].fit, Fit::Tight);
    let r = &p.devices[0].recommendation;
    assert_eq!((r.scheme, r.context, r.compute_units), (Some(Quant::Lut4), Some(2048), "cpuAndNeuralEngine"));
    let p = plan(&model, Some(Quant::Int4), Some(2048), &find("iPhone 12 / 12 mini"), &a).unwrap();
    assert_eq!(p.devices[0].fit, Fit::DoesNotFit);
}

// ------------------------------------------------------------------------------------------------
// Gemma-3-1B: 26 layers, 1 KV head × head_dim 256, sliding window 512 on five layers of six: the
// global layers are those with (index + 1) % 6 == 0, i.e. 5, 11, 17, 23 (4 layers); 22 slide.
//
// KV cache per token per layer: 2 (K, V) × 1 × 256 × 2 B = 1024 B.
// At 32k = 32,768 tokens:
//   full cache (what corelm writes):  26 × 32,768 × 1024 = 872,415,232 B (832 MiB)
//   with sliding-window savings:       4 × 32,768 × 1024 = 134,217,728
//                                   + 22 ×    512 × 1024 =  11,534,336
//                                                          = 145,752,064 B (139 MiB)
// Parameters (tied embeddings counted once):
//   per layer q 1024 × 1152 = 1,179,648; k, v 256 × 1152 = 294,912 each; o 1152 × 1024 = 1,179,648;
//   gate, up 6912 × 1152 = 7,962,624 each; down 1152 × 6912 = 7,962,624 → 26,836,992
//   26 layers = 697,761,792; embedding 262,144 × 1152 = 301,989,888; total 999,751,680.
// ------------------------------------------------------------------------------------------------
const GEMMA_KV_FULL_32K: u64 = 872_415_232;
const GEMMA_KV_SLIDING_32K: u64 = 145_752_064;
const GEMMA_PARAMETERS: u64 = 999_751_680;

#[test]
fn gemma_hand_calculations_are_consistent() {
    assert_eq!(26 * 32_768 * 1024, GEMMA_KV_FULL_32K);
    assert_eq!(4 * 32_768 * 1024 + 22 * 512 * 1024, GEMMA_KV_SLIDING_32K);
    let per_layer = 1024 * 1152 + 2 * 256 * 1152 + 1152 * 1024 + 3 * 6912 * 1152;
    assert_eq!(per_layer, 26_836_992);
    assert_eq!(26 * per_layer + 262_144 * 1152, GEMMA_PARAMETERS);
}

#[test]
fn gemma_3_1b_kv_cache_at_32k_with_and_without_sliding_window_savings() {
    let model = corelm_deploy::open(&fixture("gemma-3-1b-it")).unwrap();
    assert_eq!(model.parameters, GEMMA_PARAMETERS);
    assert!(model.tied_embeddings);
    let a = Assumptions::default();
    let b = breakdown(&model, Some(Quant::Fp16), 32_768, &a).unwrap();
    assert_eq!(b.kv_cache.full, GEMMA_KV_FULL_32K);
    assert_eq!(b.kv_cache.with_sliding_window_savings, GEMMA_KV_SLIDING_32K);
    assert_eq!(b.kv_cache.sliding_layers, 22);
    let global: Vec<usize> = b.kv_cache.per_layer.iter().filter(|l| l.window.is_none()).map(|l| l.layer).collect();
    assert_eq!(global, [5, 11, 17, 23]);
    for l in &b.kv_cache.per_layer {
        assert_eq!(l.full, 32_768 * 1024);
        assert_eq!(l.sliding, if l.window.is_some() { 512 * 1024 } else { 32_768 * 1024 });
    }
    assert_eq!(b.total - b.total_with_sliding_window_savings, GEMMA_KV_FULL_32K - GEMMA_KV_SLIDING_32K);
    // Below the window, sliding layers save nothing: at 256 tokens both are 26 × 256 × 1024.
    let short = breakdown(&model, Some(Quant::Fp16), 256, &a).unwrap();
    assert_eq!(short.kv_cache.full, 26 * 256 * 1024);
    assert_eq!(short.kv_cache.with_sliding_window_savings, 26 * 256 * 1024);

    // Transformers ≥ 4.53 writes the same pattern as an explicit `layer_types` list.
    let text = std::fs::read_to_string(fixture("gemma-3-1b-it/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let types: Vec<&str> =
        (0..26).map(|l| if (l + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect();
    json["layer_types"] = serde_json::json!(types);
    json.as_object_mut().unwrap().remove("sliding_window_pattern");
    let dir = scratch("gemma-layer-types");
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&json).unwrap()).unwrap();
    let listed = corelm_deploy::open(&dir).unwrap();
    let b2 = breakdown(&listed, Some(Quant::Fp16), 32_768, &a).unwrap();
    assert_eq!(b2.kv_cache, b.kv_cache);
    assert_eq!(b2.total, b.total);
}

#[test]
fn scheme_formulas_by_hand() {
    // A 64 × 96 matrix (6144 values):
    //   fp16  6144 × 2                      = 12,288
    //   int8  6144 + 2 × 64 scales          =  6,272
    //   int4  6144 / 2 + 2 × 64 × 96/32     =  3,456
    //   lut4  6144 × 4/8 + 2 × 16 × 64/16   =  3,200
    //   lut6  6144 × 6/8 + 2 × 64 × 64/16   =  5,120
    //   mixed: int8 if embedding, else int4
    assert_eq!(Quant::Fp16.matrix_bytes(64, 96, false), 12_288);
    assert_eq!(Quant::Int8.matrix_bytes(64, 96, false), 6_272);
    assert_eq!(Quant::Int4.matrix_bytes(64, 96, false), 3_456);
    assert_eq!(Quant::Lut4.matrix_bytes(64, 96, false), 3_200);
    assert_eq!(Quant::Lut6.matrix_bytes(64, 96, false), 5_120);
    assert_eq!(Quant::Mixed.matrix_bytes(64, 96, true), 6_272);
    assert_eq!(Quant::Mixed.matrix_bytes(64, 96, false), 3_456);
    // 40 columns are not a multiple of 32: one scale per row (int4); 20 rows are not a multiple
    // of 16: one table per row (lut4).
    //   int4  20 × 40 / 2 + 2 × 20     = 440
    //   lut4  20 × 40 / 2 + 2 × 16 × 20 = 1,040
    assert_eq!(Quant::Int4.matrix_bytes(20, 40, false), 440);
    assert_eq!(Quant::Lut4.matrix_bytes(20, 40, false), 1_040);
}

#[test]
fn every_device_gets_a_row_and_json() {
    let model = corelm_deploy::open(&fixture("gemma-3-1b-it")).unwrap();
    let all: Vec<_> = DEVICES.iter().collect();
    let p = plan(&model, None, Some(4096), &all, &Assumptions::default()).unwrap();
    assert_eq!(p.devices.len(), DEVICES.len());
    let text = p.to_text();
    for d in DEVICES {
        assert!(text.contains(d.name), "{}", d.name);
    }
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["breakdown"]["scheme"], "fp16");
    assert_eq!(json["devices"].as_array().unwrap().len(), DEVICES.len());
    // A 1B model in fp16 fits every Mac and 8 GB iPhone; on Macs the GPU is recommended.
    for d in &p.devices {
        if d.device.ram_gib >= 8.0 {
            assert_ne!(d.fit, Fit::DoesNotFit, "{}", d.device.name);
        }
        if !d.device.kind.is_mobile() {
            assert_eq!(d.recommendation.compute_units, "cpuAndGPU");
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("corelm-deploy-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Converts a tiny checkpoint of the repository's fixtures into a package.
fn convert_tiny(arch: &str, quant: Option<Quant>, context: usize) -> (ModelShape, PathBuf) {
    use corelm_convert::compress::{Policy, Scheme};
    use corelm_convert::graph::{AttentionImpl, GraphOptions, Precision};
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny").join(arch);
    let source = corelm_convert::convert::open_source(&src).unwrap();
    let scheme = |q: Quant| match q {
        Quant::Int8 => Scheme::Linear { bits: 8, block: None, offset: false },
        Quant::Int4 | Quant::Mixed => Scheme::Linear { bits: 4, block: Some(32), offset: false },
        Quant::Lut4 => Scheme::Lut { bits: 4, group: 16 },
        Quant::Lut6 => Scheme::Lut { bits: 6, group: 16 },
        Quant::Fp16 => unreachable!(),
    };
    let compress = match quant {
        None | Some(Quant::Fp16) => Policy::default(),
        Some(Quant::Mixed) => {
            Policy { body: Some(scheme(Quant::Int4)), embeddings: Some(scheme(Quant::Int8)), ..Policy::default() }
        }
        Some(q) => Policy::uniform(scheme(q)),
    };
    let opts = GraphOptions {
        target: corelm_format::Target::Ios18,
        context,
        // Qwen3.5's functions have fixed lengths; one (decode) keeps the package one function, as
        // the planner lays it out (each further function repeats its zero biases).
        query_lengths: if arch.starts_with("qwen3_5") || arch == "granite4_h" { vec![1] } else { vec![] },
        attention: AttentionImpl::Fused,
        precision: Precision::Fp16,
        compress,
        profile: Default::default(),
        chunks: 1,
    };
    let out = scratch(&format!("{arch}-{}", quant.map_or("fp16", |q| q.name()))).join("model.mlpackage");
    let write = corelm_format::package::WriteOptions { overwrite: true, ..Default::default() };
    corelm_convert::convert::convert(&source, &out, &opts, &write, &mut |_: &str, _: u64| {}).unwrap();
    (ModelShape::from_config(&source.config, &source.id), out)
}

#[test]
fn the_layout_model_matches_converted_packages() {
    let a = Assumptions::default();
    for arch in [
        "llama_rope_llama3",
        "gemma3_text",
        "qwen3",
        "gpt2",
        "phi3",
        "gemma2",
        "gemma4_text",
        "gemma3n_text",
        "lfm2",
        "lfm2_adjusted",
        "qwen3_5_text",
        "granite4_h",
    ] {
        for quant in
            [None, Some(Quant::Int8), Some(Quant::Int4), Some(Quant::Lut4), Some(Quant::Lut6), Some(Quant::Mixed)]
        {
            let (from_config, path) = convert_tiny(arch, quant, 32);
            let pkg = ModelShape::from_package(&path).unwrap();
            let predicted = breakdown(&from_config, quant, 32, &a).unwrap();
            let stored = breakdown(&pkg, None, 32, &a).unwrap();
            let what = format!("{arch} {quant:?}");
            // Weights exactly as written, and the KV cache states exactly as declared.
            assert_eq!(stored.weights.total, predicted.weights.total, "{what}");
            assert_eq!(stored.kv_cache.full, predicted.kv_cache.full, "{what}");
            // Hybrid models' recurrent states, a fixed size, as declared.
            assert_eq!(stored.recurrent_states, predicted.recurrent_states, "{what}");
            let hybrid = arch.starts_with("lfm2") || arch.starts_with("qwen3_5") || arch == "granite4_h";
            assert_eq!(predicted.recurrent_states > 0, hybrid, "{what}");
            assert_eq!(pkg.tied_embeddings, from_config.tied_embeddings, "{what}");
            // Gemma 3n/4's per-layer table lies beside the weights, as planned.
            assert_eq!(pkg.per_layer_table, from_config.per_layer_table, "{what}");
            assert_eq!(stored.per_layer_table, predicted.per_layer_table, "{what}");
            assert_eq!(
                from_config.per_layer_table.is_some(),
                arch.starts_with("gemma3n") || arch.starts_with("gemma4")
            );
            assert_eq!(
                (pkg.hidden, pkg.vocab, pkg.layers),
                (from_config.hidden, from_config.vocab, from_config.layers)
            );
            if quant.is_none() {
                // Re-quantizing a package is planned like converting with the scheme.
                for q in [Quant::Int8, Quant::Int4, Quant::Lut4, Quant::Mixed] {
                    // `corelm compress` (and so the planner) tells an LM head by its rows equal to
                    // a gathered table's; tiny models whose MLP is as wide as a table (the
                    // vocabulary, Gemma 3n's per-layer vocabulary) blur that.
                    let tables: Vec<u64> = from_config.matrices.iter().filter(|m| m.gathered).map(|m| m.rows).collect();
                    let blurred = from_config.matrices.iter().any(|m| !m.gathered && tables.contains(&m.rows));
                    if q == Quant::Mixed && blurred {
                        continue;
                    }
                    let re = breakdown(&pkg, Some(q), 32, &a).unwrap();
                    let direct = breakdown(&from_config, Some(q), 32, &a).unwrap();
                    assert_eq!(re.weights.total, direct.weights.total, "{what} → {q:?}");
                }
                assert_eq!(pkg.intermediate, from_config.intermediate, "{what}");
                assert_eq!(pkg.heads, from_config.heads, "{what}");
                assert_eq!(
                    stored.decode_bytes_per_token,
                    predicted.decode_bytes_per_token + rope_bytes(&from_config, 32)
                );
            }
            let _ = std::fs::remove_dir_all(path.parent().unwrap());
        }
    }
}

/// RoPE tables: not separable in a package, so a package's per-token read includes them.
fn rope_bytes(m: &ModelShape, context: u64) -> u64 {
    m.rope_dims.iter().map(|d| 2 * context * d * 2).sum()
}

#[test]
fn packages_reject_a_longer_context() {
    let (_, path) = convert_tiny("qwen3", None, 32);
    let pkg = corelm_deploy::open(&path).unwrap();
    assert_eq!(pkg.package.as_ref().unwrap().context, 32);
    let err = breakdown(&pkg, None, 64, &Assumptions::default()).unwrap_err().to_string();
    assert!(err.contains("holds 32 tokens"), "{err}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
