//! The generation loop: prefill the prompt, then decode token by token, streaming text that never
//! splits a UTF-8 character, until EOS, a stop string, or the token limit.

use std::time::Instant;

use corelm_contract::driver::LanguageModel;
use serde::Serialize;

use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub eos_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    /// Drop the oldest prompt tokens when prompt + generation would not fit the context.
    pub truncate_prompt: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    pub stats: Stats,
}

/// Decodes a growing id list into text increments, holding back an incomplete UTF-8 character.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> TextStream<'t> {
        TextStream { tokenizer, ids: vec![], emitted: 0 }
    }

    /// Adds a token; returns the full text so far and whether it ends inside a character.
    fn push(&mut self, id: u32) -> Result<(String, bool)> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true)?;
        let partial = text.ends_with('\u{FFFD}');
        Ok((text, partial))
    }
}

/// Generates after `prompt` (which continues whatever the model was already fed), calling
/// `on_text` with each new piece of text.
pub fn generate(
    backend: &mut LanguageModel,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    params: &GenerateParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut prompt = prompt.to_vec();
    let room = backend.context().saturating_sub(backend.position());
    if prompt.len() + params.max_new_tokens.min(1) > room {
        if !params.truncate_prompt {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens but only {room} fit the context ({}); shorten it or allow truncation",
                prompt.len(),
                backend.context()
            )));
        }
        let keep = room.saturating_sub(params.max_new_tokens).max(1);
        prompt.drain(..prompt.len().saturating_sub(keep));
    }
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    let started = Instant::now();
    let mut logits = backend.feed_last(&prompt)?;
    let prefill = started.elapsed().as_secs_f64();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut history = prompt.clone();
    let mut stream = TextStream::new(tokenizer);
    let hold = params.stop_strings.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
    let mut generated = Vec::new();
    let mut text = String::new();
    let mut reason = StopReason::MaxTokens;
    let mut first_token = None;
    let decode_started = Instant::now();
    while generated.len() < params.max_new_tokens {
        let next = sampler.sample(&logits, &history)?;
        first_token.get_or_insert_with(|| started.elapsed().as_secs_f64());
        if params.eos_ids.contains(&next) {
            reason = StopReason::Eos;
            break;
        }
        generated.push(next);
        history.push(next);
        let (full, partial) = stream.push(next)?;
        text = full;
        if let Some(at) = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            reason = StopReason::StopString;
            break;
        }
        if !partial {
            // Hold back what could still become a stop string.
            let mut upto = text.len().saturating_sub(hold);
            while !text.is_char_boundary(upto) {
                upto -= 1;
            }
            if upto > stream.emitted {
                on_text(&text[stream.emitted..upto]);
                stream.emitted = upto;
            }
        }
        if generated.len() == params.max_new_tokens {
            break;
        }
        if backend.position() >= backend.context() {
            reason = StopReason::ContextFull;
            break;
        }
        logits = backend.feed_last(&[next])?;
    }
    if text.len() > stream.emitted {
        on_text(&text[stream.emitted..]);
    }
    let decode = decode_started.elapsed().as_secs_f64();
    let steps = generated.len().saturating_sub(1).max(1);
    Ok(Generation {
        stats: Stats {
            prompt_tokens: prompt.len(),
            generated_tokens: generated.len(),
            time_to_first_token_s: first_token.unwrap_or(prefill),
            prefill_tokens_per_s: prompt.len() as f64 / prefill.max(1e-9),
            decode_tokens_per_s: steps as f64 / decode.max(1e-9),
        },
        prompt_ids: prompt,
        generated_ids: generated,
        text,
        stop_reason: reason,
    })
}
