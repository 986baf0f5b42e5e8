//! The hybrid families from the GGUF files llama.cpp's converter writes for them
//! (tests/fixtures/gguf/tiny_lfm2.gguf, tiny_qwen3_5_text.gguf and tiny_granite4_h.gguf, made
//! from the tiny safetensors fixtures by python/gguf_reference.py) convert as their safetensors
//! folders do: the same model configuration, every weight the same bits, the same program and
//! interface, in fp32 and fp16.
//!
//! LFM2's file is the checkpoint under llama.cpp's names (the kernel squeezed to (channels,
//! taps), the final norm as `token_embd_norm`), so everything matches bit for bit. Qwen3.5's
//! norms come back exactly from llama.cpp's `1 + w` (w' = (1 + w) − 1 is exact, and the graph's
//! 1 + w' is 1 + w again) and its tiled value heads by the inverse permutation; only `A_log`,
//! stored as a = −exp(A_log) in float32, comes back through a logarithm: ln(−a) is an A_log
//! whose −exp rounds to the same a, the checkpoint's own for 11 of the fixture's 12 values and
//! its float32 neighbour for the twelfth (0.27086976 for 0.27086973: exp is flatter there than
//! float32's spacing, so both give the same a). That one word is all that differs between the
//! packages (measured with `corelm run`: the same 12 greedy ids and bit-equal logits from both).
//!
//! Granite 4.0-H's Mamba-2 layers come back the same way: `ssm_a` through the logarithm (one of
//! the fixture's 12 values as its float32 neighbour: 0.13446237 for 0.13446236, both giving
//! a = −1.1439216), `D` and the gated norm's gain flattened from the (heads, 1) and (groups,
//! values / groups) llama.cpp stores, the kernel as squeezed; again that one word is all that
//! differs. Its configuration differs from the folder's where llama.cpp reads or computes the
//! model otherwise (`as_llama_cpp_reads`): no time-step limit (llama.cpp's scan bounds none; the
//! folder says (0, 1000)) and the 2^20 positions the converter writes for a model without RoPE;
//! and its multipliers come as float32.

use std::path::{Path, PathBuf};

use corelm_convert::arch::{tensor_spec, LayerRole, Role};
use corelm_convert::checkpoint::load;
use corelm_convert::config::{ModelConfig, Norm};
use corelm_convert::convert::{convert, open_source, Source};
use corelm_convert::graph::{roles, AttentionImpl, GraphOptions, Precision};
use corelm_format::package::WriteOptions;
use corelm_format::{Package, Target};

/// Each fixture with the A_log values its GGUF gives back other than the checkpoint's (see above).
const A_LOG_OFF: [(&str, usize); 3] = [("lfm2", 0), ("qwen3_5_text", 1), ("granite4_h", 1)];

/// −exp(x) rounded once to float32: what llama.cpp's converter stores for A_log = x.
fn rate(x: f32) -> f32 {
    -(f64::from(x).exp()) as f32
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The GGUF file and the folder, the folder's configuration as llama.cpp reads the model.
fn sources(fixture: &str) -> (Source, Source) {
    let gguf = root().join(format!("crates/corelm-convert/tests/fixtures/gguf/tiny_{fixture}.gguf"));
    let folder = root().join("tests/fixtures/tiny").join(fixture);
    let mut folder = open_source(&folder).unwrap();
    as_llama_cpp_reads(fixture, &mut folder.config);
    (open_source(&gguf).unwrap(), folder)
}

/// Where llama.cpp reads or computes a model otherwise than transformers: Granite 4.0-H's
/// Mamba-2 time steps unbounded (its scan has no limit; the fixture's is (0, 1000), which its
/// time steps never reach) and the context the converter writes for a model without RoPE.
fn as_llama_cpp_reads(fixture: &str, c: &mut ModelConfig) {
    if fixture == "granite4_h" {
        let la = c.linear.as_mut().unwrap();
        assert_eq!(la.time_step_limit, Some((0.0, 1000.0)));
        la.time_step_limit = None;
        c.max_position_embeddings = 1 << 20;
    }
}

/// The GGUF's configuration with what GGUF cannot carry taken from the folder's: the norm
/// epsilon and Granite's multipliers stored as float32, and the padding id (the stand-in
/// vocabulary has none).
fn as_from_folder(mut gguf: ModelConfig, folder: &ModelConfig) -> ModelConfig {
    if let (Norm::Rms { eps: e, .. }, Norm::Rms { eps: want, .. }) = (&mut gguf.norm, folder.norm) {
        assert_eq!(*e as f32, want as f32, "epsilon up to float32");
        *e = want;
    }
    let up_to_f32 = |got: &mut f64, want: f64| {
        assert_eq!(*got as f32, want as f32, "up to float32");
        *got = want;
    };
    up_to_f32(&mut gguf.attention_scale, folder.attention_scale);
    if let (Some(got), Some(want)) = (gguf.residual_multiplier.as_mut(), folder.residual_multiplier) {
        up_to_f32(got, want);
    }
    gguf.pad_token_id = folder.pad_token_id;
    gguf
}

/// Every weight the graph reads, from the GGUF file and from the folder: the same shapes and
/// bits, but for Qwen3.5's A_log values, which need only give the same −exp(A_log). Returns how
/// many A_log values differ.
fn compare_weights(fixture: &str) -> usize {
    let (gguf, folder) = sources(fixture);
    assert_eq!(as_from_folder(gguf.config.clone(), &folder.config), folder.config, "{fixture}: configuration");
    let c = &folder.config;
    let mut a_log_off = 0;
    let mut read = 0;
    let mut plus_one_off = 0;
    for role in roles(c) {
        let Some(spec) = tensor_spec(c, role) else { continue };
        let (shape, got) = load(gguf.checkpoint.as_ref(), c, role, &spec).unwrap();
        let (want_shape, want) = load(folder.checkpoint.as_ref(), c, role, &spec).unwrap();
        assert_eq!(shape, want_shape, "{fixture} {role:?}");
        read += 1;
        if matches!(role, Role::Layer(_, LayerRole::ALog)) {
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(rate(*g).to_bits(), rate(*w).to_bits(), "{fixture} {role:?}: {g} for {w}");
                a_log_off += usize::from(g != w);
            }
            continue;
        }
        // Gains the graph stores as 1 + w (Qwen3.5's): w itself may differ by a rounding.
        let plus_one = matches!(c.norm, Norm::Rms { add_one: true, .. })
            && matches!(
                role,
                Role::FinalNorm
                    | Role::Layer(
                        _,
                        LayerRole::AttnNorm
                            | LayerRole::PostAttnNorm
                            | LayerRole::MlpNorm
                            | LayerRole::PostMlpNorm
                            | LayerRole::QNorm
                            | LayerRole::KNorm
                    )
            );
        let stored = |v: f32| if plus_one { v + 1.0 } else { v };
        let same = got.iter().zip(&want).all(|(g, w)| stored(*g).to_bits() == stored(*w).to_bits());
        assert!(same, "{fixture} {role:?} ({}): not the same bits", spec.name);
        plus_one_off += got.iter().zip(&want).filter(|(g, w)| g != w).count();
    }
    println!(
        "{fixture}: {read} weights read; {a_log_off} A_log values not the checkpoint's (same −exp); {plus_one_off} norm gains w off, \
         none of them 1 + w"
    );
    a_log_off
}

#[test]
fn gguf_weights_read_back_as_in_the_folder() {
    for (fixture, a_log_off) in A_LOG_OFF {
        assert_eq!(compare_weights(fixture), a_log_off, "{fixture}");
    }
}

fn convert_to(source: &Source, out: &Path, precision: Precision) -> Package {
    let opts = GraphOptions {
        target: Target::Ios18,
        context: 64,
        query_lengths: vec![],
        attention: AttentionImpl::Fused,
        precision,
        compress: Default::default(),
        profile: Default::default(),
        chunks: 1,
    };
    convert(source, out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
    Package::open(out).unwrap()
}

/// The packages converted from the GGUF file and from the folder, in fp32 and fp16: the same
/// functions, inputs, outputs and states, the same program, and weight files that differ only
/// in the float32 words of the A_log values the GGUF gave back otherwise (each giving the same
/// −exp(A_log) as the checkpoint's; A_log stays float32 in fp16 packages too).
#[test]
fn gguf_packages_match_the_folders() {
    let tmp = tempfile::tempdir().unwrap();
    for (fixture, _) in A_LOG_OFF {
        let a_log_off = compare_weights(fixture);
        let (gguf, folder) = sources(fixture);
        for precision in [Precision::Fp32, Precision::Fp16] {
            let label = format!("{fixture} {precision:?}");
            let got = convert_to(&gguf, &tmp.path().join(format!("{fixture}_gguf.mlpackage")), precision);
            let want = convert_to(&folder, &tmp.path().join(format!("{fixture}_st.mlpackage")), precision);
            let (g, w) = (got.model(), want.model());
            assert_eq!(g.description.functions, w.description.functions, "{label}: interface");
            assert_eq!(g.program, w.program, "{label}: program");
            let (files, want_files) = (got.weight_files().unwrap(), want.weight_files().unwrap());
            assert_eq!(files, want_files, "{label}: weight files");
            let mut words_off = 0;
            for (rel, _) in &files {
                let name = Path::new(rel).file_name().unwrap();
                let a = std::fs::read(got.weights_dir().join(name)).unwrap();
                let b = std::fs::read(want.weights_dir().join(name)).unwrap();
                for (i, (x, y)) in a.chunks(4).zip(b.chunks(4)).enumerate().filter(|(_, (x, y))| x != y) {
                    let f = |w: &[u8]| f32::from_le_bytes(w.try_into().unwrap());
                    assert_eq!(rate(f(x)), rate(f(y)), "{label}: {rel} word {i}: {} for {}", f(x), f(y));
                    words_off += 1;
                }
            }
            assert_eq!(words_off, a_log_off, "{label}: only the A_log values differ");
            println!("{label}: same program and interface; {words_off} float32 words of the weights differ");
        }
    }
}
