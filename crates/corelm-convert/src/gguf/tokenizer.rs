//! The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, rebuilt as a Hugging
//! Face `tokenizer.json`.
//!
//! The result mirrors what transformers' GGUF loader builds (transformers 5.x,
//! `integrations/gguf/gguf_tokenizer_mapping.py` plus the tokenizer classes it hands the vocabulary
//! to), so that a converted model tokenizes exactly like `AutoTokenizer.from_pretrained(dir,
//! gguf_file=...)`:
//!
//! - `gpt2` (byte-level BPE, e.g. SmolLM2, Llama 3, Qwen): GPT2Tokenizer's model, `ByteLevel`
//!   pre-tokenizer and decoder; for the `tokenizer.ggml.pre` types transformers knows, a `Split` on
//!   that vocabulary's regex before a regex-less `ByteLevel`.
//! - `llama` (SentencePiece BPE with scores): LlamaTokenizer's `Metaspace` pre-tokenizer (prepend
//!   on the first word), byte fallback, merges from the file or derived from the scores; for the
//!   Gemma architectures GemmaTokenizer's layout instead (spaces replaced by `▁` in a normalizer, no
//!   prefix space, merges ordered by position in the vocabulary), and for Phi-3 a normalizer that
//!   prepends `▁`.
//! - `gemma4`: GemmaTokenizer's layout without Gemma 3's respelling of space tokens.
//!
//! Tokens typed control (3) become special added tokens, user-defined (4) plain added tokens,
//! and BOS is added by a template post-processor when the file asks for it.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::GgufFile;
use crate::{Error, Result};

const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Special token ids from `tokenizer.ggml.*_token_id` (negative values count as absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokenIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

fn token_id(f: &GgufFile, key: &str) -> Result<Option<u32>> {
    let Some(v) = f.get(key) else { return Ok(None) };
    match v.as_i128() {
        Some(i) if i < 0 => Ok(None),
        Some(i) => u32::try_from(i)
            .map(Some)
            .map_err(|_| Error::malformed(f.path(), format!("metadata key '{key}' is {i}, too large for a token id"))),
        None => {
            Err(Error::malformed(f.path(), format!("metadata key '{key}' is {}, expected an integer", v.type_name())))
        }
    }
}

/// BOS, EOS, padding and unknown token ids.
pub fn special_token_ids(f: &GgufFile) -> Result<SpecialTokenIds> {
    Ok(SpecialTokenIds {
        bos: token_id(f, "tokenizer.ggml.bos_token_id")?,
        eos: token_id(f, "tokenizer.ggml.eos_token_id")?,
        pad: token_id(f, "tokenizer.ggml.padding_token_id")?,
        unk: token_id(f, "tokenizer.ggml.unknown_token_id")?,
    })
}

/// The Jinja chat template (`tokenizer.chat_template`), if the file has one.
pub fn chat_template(f: &GgufFile) -> Option<String> {
    f.get_str("tokenizer.chat_template").ok().flatten().map(str::to_string)
}

/// Which of transformers' tokenizer classes the file maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// GPT2Tokenizer: byte-level BPE.
    ByteLevel,
    /// LlamaTokenizer: SentencePiece BPE with `Metaspace`.
    Llama,
    /// LlamaTokenizer with Phi-3's prepend normalizer.
    Phi3,
    /// GemmaTokenizer, with Gemma 1–3's respelling of space tokens and positional merges.
    Gemma,
    /// GemmaTokenizer as used for `gemma4` vocabularies.
    Gemma4,
}

/// Everything `tokenizer.ggml.*` says, checked.
struct Vocab<'a> {
    kind: Kind,
    pre: Option<&'a str>,
    tokens: Vec<String>,
    scores: Option<Vec<f32>>,
    types: Option<Vec<i64>>,
    merges: Option<&'a [String]>,
    ids: SpecialTokenIds,
    add_bos: bool,
    add_eos: bool,
}

fn read_vocab(f: &GgufFile) -> Result<Vocab<'_>> {
    let arch = f.get_str("general.architecture")?.unwrap_or("");
    let model = f.get_str("tokenizer.ggml.model")?.ok_or_else(|| f.missing("tokenizer.ggml.model"))?;
    let kind = match (model, arch) {
        ("llama", "gemma" | "gemma2" | "gemma3") => Kind::Gemma,
        ("llama", "phi3") => Kind::Phi3,
        ("llama", _) => Kind::Llama,
        ("gpt2", _) => Kind::ByteLevel,
        ("gemma4", _) => Kind::Gemma4,
        (other, _) => {
            return Err(Error::invalid(format!(
                "{}: tokenizer model '{other}' is not supported (supported: gpt2, llama, gemma4)",
                f.path().display()
            )))
        }
    };
    let tokens = f.get_str_array("tokenizer.ggml.tokens")?.ok_or_else(|| f.missing("tokenizer.ggml.tokens"))?;
    let n = tokens.len();
    let scores = f.get_f32_array("tokenizer.ggml.scores")?;
    let types = f.get_i64_array("tokenizer.ggml.token_type")?;
    for (key, len) in [
        ("tokenizer.ggml.scores", scores.as_ref().map(Vec::len)),
        ("tokenizer.ggml.token_type", types.as_ref().map(Vec::len)),
    ] {
        if let Some(len) = len.filter(|&l| l != n) {
            return Err(Error::malformed(f.path(), format!("{key} has {len} entries but there are {n} tokens")));
        }
    }
    let ids = special_token_ids(f)?;
    for (key, id) in [("bos", ids.bos), ("eos", ids.eos), ("padding", ids.pad), ("unknown", ids.unk)] {
        if let Some(id) = id.filter(|&id| id as usize >= n) {
            return Err(Error::malformed(
                f.path(),
                format!("tokenizer.ggml.{key}_token_id is {id} but the vocabulary has {n} tokens"),
            ));
        }
    }
    let add_bos = match kind {
        // llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        Kind::Llama | Kind::Phi3 | Kind::Gemma => f.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true),
        // The Gemma 4 chat template writes `<bos>` itself (transformers overrides the flag).
        Kind::Gemma4 => false,
        Kind::ByteLevel => f.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
    };
    let add_eos = f.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    Ok(Vocab {
        kind,
        pre: f.get_str("tokenizer.ggml.pre")?,
        tokens: tokens.to_vec(),
        scores,
        types,
        merges: f.get_str_array("tokenizer.ggml.merges")?,
        ids,
        add_bos,
        add_eos,
    })
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`).
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\u{FFFD}')
        };
    }
    table
}

/// Pre-tokenizer split regexes transformers applies for these `tokenizer.ggml.pre` values.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

/// Merges derived from a vocabulary, as transformers' `generate_merges(vocab, vocab_scores)`:
/// every split of every token into two vocabulary tokens, best score first (ties: shorter left,
/// then shorter right piece, then vocabulary order).
fn generate_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // {token: index}, the last index winning, as a Python dict built from enumerate().
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t, i);
    }
    // dict(zip(tokens, scores)): first position, last score.
    let mut order: Vec<(&str, f64)> = Vec::with_capacity(tokens.len());
    let mut position: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (t, &s) in tokens.iter().zip(scores) {
        match position.get(t.as_str()) {
            Some(&p) => order[p].1 = s,
            None => {
                position.insert(t, order.len());
                order.push((t, s));
            }
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    let mut local = Vec::new();
    for (merge, score) in order {
        local.clear();
        for (cut, _) in merge.char_indices().skip(1) {
            let (l, r) = merge.split_at(cut);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(local.iter().map(|&(_, _, l, r)| (l, r, score)));
    }
    let chars = |s: &str| s.chars().count();
    // Python's sorted(..., reverse=True) keeps equal keys in their original order, as does a stable
    // sort on the reversed comparison.
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| chars(b.0).cmp(&chars(a.0)))
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

fn replace(pattern: &str, content: &str) -> Value {
    json!({"type": "Replace", "pattern": {"String": pattern}, "content": content})
}

/// Builds a Hugging Face `tokenizer.json` from the file's `tokenizer.ggml.*` metadata.
pub fn tokenizer_json(f: &GgufFile) -> Result<Value> {
    let v = read_vocab(f)?;
    let tokens = model_tokens(&v);
    // {token: id}, the last id winning for a repeated token.
    let mut last_id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        last_id.insert(t, i);
    }
    let merges = merges(f, &v, &tokens)?;
    let name = |id: Option<u32>| id.map(|i| v.tokens[i as usize].clone());
    let (bos, eos, unk, pad) = (name(v.ids.bos), name(v.ids.eos), name(v.ids.unk), name(v.ids.pad));
    let added = added_tokens(&v, &last_id, [&bos, &eos, &unk, &pad]);
    let Pipeline { normalizer, pre_tokenizer, decoder, mut model } = pipeline(&v);
    if let Value::Object(m) = &mut model {
        m.insert("vocab".into(), Value::Object(vocab(&tokens, &last_id)));
        m.insert("merges".into(), Value::Array(merges.into_iter().map(|(a, b)| json!([a, b])).collect()));
    }
    let added_tokens: Vec<Value> = added.iter().map(|(id, t, special)| added_token(*id, t, *special)).collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor(&v, bos.as_deref(), eos.as_deref()),
        "decoder": decoder,
        "model": model,
    }))
}

/// The vocabulary as the model sees it.
fn model_tokens(v: &Vocab) -> Vec<String> {
    match v.kind {
        Kind::ByteLevel => {
            let table = byte_chars();
            let alphabet: HashSet<char> = table.iter().copied().collect();
            v.tokens
                .iter()
                .map(|t| {
                    if t.chars().all(|c| alphabet.contains(&c)) {
                        t.clone()
                    } else {
                        t.bytes().map(|b| table[b as usize]).collect()
                    }
                })
                .collect()
        }
        // Gemma files store a token of only spaces with real spaces; the model knows it as `▁`s.
        Kind::Gemma => {
            v.tokens
                .iter()
                .map(|t| {
                    if t.contains(' ') && t.trim().is_empty() {
                        "\u{2581}".repeat(t.chars().count())
                    } else {
                        t.clone()
                    }
                })
                .collect()
        }
        _ => v.tokens.clone(),
    }
}

/// {token: id}, listed in id order, a repeated token under its last id.
fn vocab(tokens: &[String], last_id: &HashMap<&str, usize>) -> Map<String, Value> {
    let mut vocab = Map::with_capacity(last_id.len());
    for (i, t) in tokens.iter().enumerate() {
        if last_id[t.as_str()] == i {
            vocab.insert(t.clone(), json!(i));
        }
    }
    vocab
}

/// The merges the file lists, or those derived from the scores (from the token order for Gemma).
fn merges(f: &GgufFile, v: &Vocab, tokens: &[String]) -> Result<Vec<(String, String)>> {
    let path = f.path();
    Ok(match v.merges {
        Some(m) => m
            .iter()
            .map(|s| {
                s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                    Error::malformed(
                        path,
                        format!("tokenizer.ggml.merges entry {s:?} is not two tokens separated by a space"),
                    )
                })
            })
            .collect::<Result<_>>()?,
        None if v.kind == Kind::ByteLevel => Vec::new(),
        None => {
            let scores: Vec<f64> = match v.kind {
                // Gemma's scores do not follow its merge order; the token order does.
                Kind::Gemma => (0..tokens.len()).map(|i| -(i as f64)).collect(),
                _ => v
                    .scores
                    .as_ref()
                    .ok_or_else(|| {
                        Error::malformed(path, "the file has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
                    })?
                    .iter()
                    .map(|&s| f64::from(s))
                    .collect(),
            };
            generate_merges(tokens, &scores)
        }
    })
}

/// Added tokens (id, content, special), in id order. `named`: the BOS, EOS, UNK and PAD tokens.
///
/// They are taken in the order transformers adds them (the first addition of a token wins):
/// 1. the default special tokens of the tokenizer class the vocabulary is handed to, when the
///    vocabulary has them. transformers also adds them when it does not, with ids past the end
///    of the vocabulary (e.g. `<|endoftext|>` for Llama 3); we do not, since no embedding row
///    exists for such an id;
/// 2. control tokens as special (in a byte-level vocabulary only those spelled in the byte
///    alphabet: others are llama.cpp mislabels);
/// 3. user-defined tokens as plain added tokens;
/// 4. the BOS/EOS/UNK/PAD tokens the file names, as special.
fn added_tokens(v: &Vocab, last_id: &HashMap<&str, usize>, named: [&Option<String>; 4]) -> Vec<(usize, String, bool)> {
    let mut added: Vec<(usize, String, bool)> = Vec::new();
    let mut added_set: HashSet<String> = HashSet::new();
    let mut add = |t: &str, special: bool, added: &mut Vec<(usize, String, bool)>| {
        if let Some(&id) = last_id.get(t) {
            if added_set.insert(t.to_string()) {
                added.push((id, t.to_string(), special));
            }
        }
    };
    let class_defaults: &[&str] = match v.kind {
        Kind::ByteLevel => &["<|endoftext|>"],
        Kind::Llama | Kind::Phi3 => &["<s>", "</s>", "<unk>"],
        Kind::Gemma | Kind::Gemma4 => &["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"],
    };
    for t in class_defaults {
        add(t, true, &mut added);
    }
    if let Some(types) = &v.types {
        let alphabet: Option<HashSet<char>> = (v.kind == Kind::ByteLevel).then(|| byte_chars().into_iter().collect());
        for (t, &ty) in v.tokens.iter().zip(types) {
            let spelled = alphabet.as_ref().is_none_or(|a| t.chars().all(|c| a.contains(&c)));
            if ty == TOKEN_TYPE_CONTROL && spelled {
                add(t, true, &mut added);
            }
        }
        for (t, &ty) in v.tokens.iter().zip(types) {
            if ty == TOKEN_TYPE_USER_DEFINED {
                add(t, false, &mut added);
            }
        }
    }
    for t in named.into_iter().flatten() {
        add(t, true, &mut added);
    }
    added.sort_by_key(|a| a.0);
    added
}

/// The stages of the tokenizer around its vocabulary and merges.
struct Pipeline {
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    /// The model without `vocab` and `merges`.
    model: Value,
}

/// The pipeline of the tokenizer class the vocabulary maps to.
fn pipeline(v: &Vocab) -> Pipeline {
    let (normalizer, pre_tokenizer, decoder, model) = match v.kind {
        Kind::ByteLevel => (
            Value::Null,
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
            json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
            }),
        ),
        Kind::Llama | Kind::Phi3 => {
            let decoder = json!({"type": "Sequence", "decoders": [
                replace("\u{2581}", " "),
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]});
            let model = json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
            });
            if v.kind == Kind::Phi3 {
                let normalizer = json!({"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": "\u{2581}"},
                    replace(" ", "\u{2581}"),
                ]});
                (normalizer, Value::Null, decoder, model)
            } else {
                let pre =
                    json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
                (Value::Null, pre, decoder, model)
            }
        }
        Kind::Gemma | Kind::Gemma4 => (
            replace(" ", "\u{2581}"),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
            json!({"type": "Sequence", "decoders": [replace("\u{2581}", " "), {"type": "ByteFallback"}, {"type": "Fuse"}]}),
            json!({
                "type": "BPE",
                "dropout": null,
                "unk_token": "<unk>",
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": true,
                "ignore_merges": false,
            }),
        ),
    };
    let pre_tokenizer = match v.pre.and_then(split_regex) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => pre_tokenizer,
    };
    Pipeline { normalizer, pre_tokenizer, decoder, model }
}

/// transformers' `update_post_processor`: a template adding BOS and/or EOS as the file asks.
fn post_processor(v: &Vocab, bos: Option<&str>, eos: Option<&str>) -> Value {
    let bos = bos.filter(|_| v.add_bos).zip(v.ids.bos);
    let eos = eos.filter(|_| v.add_eos).zip(v.ids.eos);
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    if let Some((b, _)) = bos {
        single.push(special(b, 0));
    }
    single.push(seq("A", 0));
    if let Some((e, _)) = eos {
        single.push(special(e, 0));
    }
    let mut pair = single.clone();
    if let Some((b, _)) = bos {
        pair.push(special(b, 1));
    }
    pair.push(seq("B", 1));
    if let Some((e, _)) = eos {
        pair.push(special(e, 1));
    }
    let mut special_tokens = Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        special_tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

/// A `tokenizer_config.json` for the tokenizer: special tokens, BOS/EOS flags and chat template.
pub fn tokenizer_config_json(f: &GgufFile) -> Result<Value> {
    let v = read_vocab(f)?;
    let name = |id: Option<u32>| id.map(|i| v.tokens[i as usize].clone());
    let mut config = json!({
        "add_bos_token": v.add_bos,
        "add_eos_token": v.add_eos,
        "bos_token": name(v.ids.bos),
        "eos_token": name(v.ids.eos),
        "pad_token": name(v.ids.pad),
        "unk_token": name(v.ids.unk),
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let (Some(t), Value::Object(m)) = (chat_template(f), &mut config) {
        m.insert("chat_template".into(), Value::String(t));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = byte_chars();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[0xAD], 'Ń');
        assert_eq!(t.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn merges_from_scores() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = generate_merges(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
