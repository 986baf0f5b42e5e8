//! `--profile ane` conversions of every tiny architecture (tests/fixtures/tiny, random O(1)
//! weights), whole and split by `--chunks 2`, generate what the default profile generates, on
//! the reference interpreter (the split exactly what the whole does): finite
//! logits, the same greedy continuation, the same argmax wherever the top two logits are further
//! apart than fp16 can blur. With query lengths 1 and 8 and a 64-token context, the 24-token
//! prompt takes three prefill chunks and the sliding-window families (window 8) keep ring
//! buffers of 32 slots (window + chunk, rounded to 32), which the 16 generated tokens take past
//! their end, so the ring wraps around.
//!
//! Prefill-then-decode runs partial chunks, which the runtime pads with token id 0, also on
//! each checkpoint with that token's embedding row set to zero (as Hugging Face initializes a
//! `padding_idx` row): a row of zeros in the residual stream must not turn into NaN in the
//! Neural Engine form's norms and from there into every later query through the cache.

use std::path::{Path, PathBuf};

use corelm_contract::driver::{argmax, LanguageModel};
use corelm_convert::convert::{convert, open_source};
use corelm_convert::graph::{GraphOptions, Profile};
use corelm_format::package::WriteOptions;
use corelm_format::Package;
use corelm_interp::Interpreter;
use serde_json::Value;

/// Query lengths of the ane packages: decode and an 8-token prefill chunk.
const LENGTHS: [usize; 2] = [1, 8];
/// Tokens the caches hold.
const CONTEXT: usize = 64;
/// Tokens generated after the prompt.
const NEW_TOKENS: usize = 16;
/// Two fp16 programs that round differently may rank the top two logits differently when they
/// are close. fp16 keeps 11 significant bits, one ulp of a logit of magnitude M being
/// 2^(⌊log₂ M⌋ − 10); measured between the two profiles, the top two logits of a position
/// differ by at most 22 ulps of the row's largest |logit| (Gemma 2, whose attention and logits
/// are soft-capped at 50 and 30; 11 for Gemma 3, ≤ 8 for the others), so their order can change
/// only where they are within 44 ulps. Argmaxes must agree where the default profile's top-2
/// gap exceeds this many ulps.
const GAP_ULPS: f32 = 64.0;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

/// Every fixture the ane profile converts: not Qwen3.5, whose Gated DeltaNet the profile refuses
/// (`gated_delta_net_is_refused_by_name`).
fn every_fixture() -> Vec<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures()).unwrap().flatten().map(|e| e.path()).collect();
    dirs.retain(|d| !std::fs::read_to_string(d.join("config.json")).unwrap().contains("linear_attention"));
    dirs.sort();
    assert!(dirs.len() >= 10, "a fixture for every architecture expected, found {dirs:?}");
    dirs
}

fn prompt(dir: &Path) -> Vec<u32> {
    let r: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    r["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// fp16 conversions of `dir` with the default profile and with `--profile ane`, and when
/// `chunked` with `--profile ane --chunks 2` (the first of its two parts; the driver opens the
/// second).
fn conversions(dir: &Path, tmp: &Path, chunked: bool) -> Vec<Package> {
    let source = open_source(dir).unwrap();
    let name = dir.file_name().unwrap().to_string_lossy();
    let mut variants = vec![("default", Profile::Default, vec![], 1), ("ane", Profile::Ane, LENGTHS.to_vec(), 1)];
    if chunked {
        variants.push(("ane-chunked", Profile::Ane, LENGTHS.to_vec(), 2));
    }
    variants
        .into_iter()
        .map(|(label, profile, query_lengths, chunks)| {
            let out = tmp.join(format!("{name}-{label}.mlpackage"));
            let opts = GraphOptions { context: CONTEXT, query_lengths, profile, chunks, ..GraphOptions::default() };
            convert(&source, &out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap();
            let first = if chunks == 1 { out } else { tmp.join(format!("{name}-{label}_1of{chunks}.mlpackage")) };
            Package::open(&first).unwrap()
        })
        .collect()
}

/// A copy of the checkpoint in `dir` whose embedding row 0 (the pad token of these configs, and
/// the id the runtime pads partial chunks with) is zero.
fn with_zero_pad_row(dir: &Path, out: &Path) -> PathBuf {
    let copy = out.join(format!("{}-zero-pad-row", dir.file_name().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let path = copy.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, t) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.ends_with("embed_tokens.weight") || k.ends_with("wte.weight"))
        .expect("an embedding table");
    assert_eq!(t["dtype"], "F32", "{name}");
    let width = t["shape"][1].as_u64().unwrap() as usize;
    let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 4 * width].fill(0);
    std::fs::write(&path, bytes).unwrap();
    copy
}

/// The indices of the two largest logits (the first of equals, as [`argmax`]).
fn top_two(row: &[f32]) -> (usize, usize) {
    let first = argmax(row);
    let mut rest = row.to_vec();
    rest[first] = f32::NEG_INFINITY;
    (first, argmax(&rest))
}

/// The difference between the two largest logits, and the fp16 error bound it is compared
/// with: [`GAP_ULPS`] ulps of the largest |logit|.
fn gap_and_bound(row: &[f32]) -> (f32, f32) {
    let (first, second) = top_two(row);
    let largest = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let ulp = 2f32.powi(largest.log2().floor() as i32 - 10);
    (row[first] - row[second], GAP_ULPS * ulp)
}

/// Positions' logits from both profiles, compared.
#[derive(Default)]
struct Tally {
    positions: usize,
    /// Positions whose top-2 gap (default profile) exceeds the bound, and of those where the
    /// argmaxes agree.
    decided: usize,
    agree: usize,
    /// Positions whose argmaxes differ (top-2 gap within the bound), with the gap.
    close_calls: Vec<(usize, f32)>,
    max_err: f32,
    max_rel_err: f32,
    /// The largest difference at the default profile's top two logits, in fp16 ulps of the
    /// largest |logit| (what [`GAP_ULPS`] is set from).
    max_top2_ulps: f32,
    failures: Vec<String>,
}

impl Tally {
    fn figures(&self) -> String {
        format!(
            "argmax agrees at {}/{} positions whose top-2 gap exceeds {GAP_ULPS} ulps (of {}; differs at \
             (position, gap) {:?}), max|Δ| {:.3e} ({:.2e} of the range), at the top two {} ulps",
            self.agree,
            self.decided,
            self.positions,
            self.close_calls,
            self.max_err,
            self.max_rel_err,
            self.max_top2_ulps
        )
    }

    /// The first failure, and how many there are.
    fn summary(&self, label: &str) -> Option<String> {
        let first = self.failures.first()?;
        Some(format!("{label}: {first} ({} failures in all)", self.failures.len()))
    }

    fn add(&mut self, label: &str, pos: usize, want: &[f32], got: &[f32]) {
        self.positions += 1;
        if let Some(bad) = got.iter().position(|v| !v.is_finite()) {
            let count = got.iter().filter(|v| !v.is_finite()).count();
            self.failures.push(format!("{label} position {pos}: {count} non-finite logits (first at {bad})"));
            return;
        }
        let (gap, bound) = gap_and_bound(want);
        let range =
            want.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) - want.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let err = want.iter().zip(got).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        self.max_err = self.max_err.max(err);
        self.max_rel_err = self.max_rel_err.max(err / range);
        let (first, second) = top_two(want);
        let top2 = (want[first] - got[first]).abs().max((want[second] - got[second]).abs());
        self.max_top2_ulps = self.max_top2_ulps.max(top2 / bound * GAP_ULPS);
        let same = argmax(want) == argmax(got);
        if gap > bound {
            self.decided += 1;
            if same {
                self.agree += 1;
            } else {
                self.failures.push(format!(
                    "{label} position {pos}: argmax {} vs {} with a top-2 gap of {gap} (bound {bound})",
                    argmax(want),
                    argmax(got),
                ));
            }
        } else if !same {
            self.close_calls.push((pos, gap));
        }
    }
}

#[test]
fn every_architecture_generates_what_the_default_profile_does() {
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for dir in every_fixture() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let ids = prompt(&dir);
        let Ok([default, ane, chunked]) = <[Package; 3]>::try_from(conversions(&dir, tmp.path(), true)) else {
            unreachable!("three conversions")
        };
        let mut generated = Vec::new();
        let mut rows = Vec::new();
        for pkg in [&default, &ane, &chunked] {
            let mut lm = LanguageModel::open(pkg, Interpreter::load).unwrap();
            let prompt_rows = lm.feed(&ids).unwrap();
            let mut tokens = Vec::new();
            let mut decode_rows = Vec::new();
            let mut next = argmax(prompt_rows.last().unwrap()) as u32;
            for _ in 0..NEW_TOKENS {
                tokens.push(next);
                let row = lm.feed(&[next]).unwrap().remove(0);
                next = argmax(&row) as u32;
                decode_rows.push(row);
            }
            generated.push(tokens);
            rows.push((prompt_rows, decode_rows));
        }
        // The layer stack split in two parts computes exactly what the whole does.
        if rows[2] != rows[1] || generated[2] != generated[1] {
            failures.push(format!("{name}: --chunks 2 computes other logits than the whole ane package"));
        }
        let ((want_prompt, want_decode), (got_prompt, got_decode)) = (&rows[0], &rows[1]);
        let mut prompt_tally = Tally::default();
        for (pos, (want, got)) in want_prompt.iter().zip(got_prompt).enumerate() {
            prompt_tally.add("prompt", pos, want, got);
        }
        // Decode logits are compared while the two continuations agree (the same inputs).
        let mut decode_tally = Tally::default();
        for (i, (want, got)) in want_decode.iter().zip(got_decode).enumerate() {
            if generated[0][..=i] != generated[1][..=i] {
                break;
            }
            decode_tally.add("decode", ids.len() + i, want, got);
        }
        let greedy = generated[0].iter().zip(&generated[1]).take_while(|(a, b)| a == b).count();
        // The continuations may part only where the default profile's choice is a tie to fp16:
        // its top two within the bound, and the ane package taking the second.
        let mut parted = String::new();
        if greedy < NEW_TOKENS {
            let row = if greedy == 0 { want_prompt.last().unwrap() } else { &want_decode[greedy - 1] };
            let (gap, bound) = gap_and_bound(row);
            parted = format!(
                ", then token {} for {} at a top-2 gap of {gap} (bound {bound})",
                generated[1][greedy], generated[0][greedy]
            );
            if gap > bound || generated[1][greedy] as usize != top_two(row).1 {
                decode_tally.failures.push(format!(
                    "greedy continuation {:?}, default profile {:?}{parted}",
                    generated[1], generated[0]
                ));
            }
        }
        println!(
            "{name:<18} prompt: {}; greedy {greedy}/{NEW_TOKENS}{parted}; decode: max|Δ| {:.3e} ({:.2e} of the range)",
            prompt_tally.figures(),
            decode_tally.max_err,
            decode_tally.max_rel_err,
        );
        failures.extend(prompt_tally.summary(&name));
        failures.extend(decode_tally.summary(&name));
    }
    report(&failures);
}

/// A prefill of t tokens (a partial chunk, padded with id 0) and then one token at a time up
/// to position 48, past the window (8) and around the ring (32 slots): each step's logits as
/// the default profile's, fed the same tokens (the prompt, then the default profile's greedy
/// choices). On every checkpoint as committed and with a zero embedding row for id 0.
#[test]
fn prefill_then_decode_past_the_window() {
    const END: usize = 48;
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for fixture in every_fixture() {
        let name = fixture.file_name().unwrap().to_string_lossy().to_string();
        let ids = prompt(&fixture);
        for (variant, dir) in
            [("as committed", fixture.clone()), ("zero pad row", with_zero_pad_row(&fixture, tmp.path()))]
        {
            let out = tmp.path().join(variant.replace(' ', "-"));
            std::fs::create_dir_all(&out).unwrap();
            let Ok([default, ane]) = <[Package; 2]>::try_from(conversions(&dir, &out, false)) else {
                unreachable!("two conversions")
            };
            let mut tally = Tally::default();
            for t in [5, 13] {
                let (mut want_lm, mut got_lm) = (
                    LanguageModel::open(&default, Interpreter::load).unwrap(),
                    LanguageModel::open(&ane, Interpreter::load).unwrap(),
                );
                let mut want = want_lm.feed(&ids[..t]).unwrap().pop().unwrap();
                let mut got = got_lm.feed(&ids[..t]).unwrap().pop().unwrap();
                for pos in t..END {
                    tally.add(&format!("prefill {t}"), pos - 1, &want, &got);
                    let next = ids.get(pos).copied().unwrap_or(argmax(&want) as u32);
                    want = want_lm.feed(&[next]).unwrap().remove(0);
                    got = got_lm.feed(&[next]).unwrap().remove(0);
                }
                tally.add(&format!("prefill {t}"), END - 1, &want, &got);
            }
            println!("{name:<18} {variant:<12} {}", tally.figures());
            failures.extend(tally.summary(&format!("{name} ({variant})")));
        }
    }
    report(&failures);
}

fn report(failures: &[String]) {
    assert!(failures.is_empty(), "the ane profile differs from the default profile:\n{}", failures.join("\n"));
}

/// Gated DeltaNet's chunked form needs fp32, which the Neural Engine lacks: `--profile ane` is
/// refused with the reason, not converted into a package that would fall back op by op.
#[test]
fn gated_delta_net_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let source = open_source(&fixtures().join("qwen3_5_text")).unwrap();
    let opts = GraphOptions { context: CONTEXT, profile: Profile::Ane, ..GraphOptions::default() };
    let out = tmp.path().join("qwen3_5_text-ane.mlpackage");
    let e = convert(&source, &out, &opts, &WriteOptions::overwriting(), &mut |_: &str, _: u64| {}).unwrap_err();
    assert!(e.to_string().contains("--profile ane is not available for qwen3_5_text"), "{e}");
    assert!(e.to_string().contains("fp32"), "{e}");
    assert!(!out.exists(), "nothing written");
}
