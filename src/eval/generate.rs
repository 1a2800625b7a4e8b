//! Generation with a KV cache, on any backend: one packed prefill of every prompt, then one token
//! per unfinished sequence per step against its cached keys and values.
//!
//! Prompts are packed without padding (varlen attention), so a batch gives each sequence exactly
//! what it would get alone. A sequence stops at an end-of-sequence id (which is kept in its output,
//! as transformers does) or after `max_new_tokens`; finished sequences leave the batch, so they
//! cost nothing in later steps. Observers see every step's logits: the CLI streams text from them
//! and the tests compare them with an uncached forward.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::sampling::{Sampler, Sampling};
use crate::backend::Backend;
use crate::data::{collate, EncodedSample};
use crate::model::llm::KvCache;
use crate::model::{Llm, Mllm, MllmWeights, ParamSet};

/// The default `--max-new-tokens`.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 128;

/// Answer positions the KV cache holds before it first grows.
const INITIAL_ANSWER_POSITIONS: usize = 64;

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Ids that end a sequence (kept in its output). Empty: only `max_new_tokens` stops it.
    pub eos: Vec<u32>,
    pub sampling: Sampling,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: DEFAULT_MAX_NEW_TOKENS, eos: Vec::new(), sampling: Sampling::Greedy }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// It produced an end-of-sequence id (the last token of its output).
    Eos,
    /// It reached `max_new_tokens`.
    MaxNewTokens,
}

/// One sequence's new tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// What an observer sees for each new token.
pub struct Step<'a> {
    /// The sequence's index in the batch.
    pub seq: usize,
    /// 0 for the first new token.
    pub index: usize,
    pub token: u32,
    /// The logits row the token was chosen from.
    pub logits: &'a [f32],
}

/// Timings, for tokens-per-second reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecodeStats {
    /// Prompt tokens (all sequences).
    pub prompt_tokens: usize,
    /// Seconds from the start to the first new token of every sequence (prefill + LM head).
    pub prefill_seconds: f64,
    /// Tokens produced by the decoding steps after the prefill (all sequences).
    pub decoded_tokens: usize,
    pub decode_seconds: f64,
    /// Decoding steps (each runs every unfinished sequence once).
    pub steps: usize,
}

impl DecodeStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-12)
    }
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.decoded_tokens as f64 / self.decode_seconds.max(1e-12)
    }
    /// One line for stderr.
    pub fn summary(&self) -> String {
        format!(
            "prefill {} tokens in {:.3} s ({:.1} tokens/s); decode {} tokens in {} steps, {:.3} s ({:.2} tokens/s)",
            self.prompt_tokens,
            self.prefill_seconds,
            self.prefill_tokens_per_second(),
            self.decoded_tokens,
            self.steps,
            self.decode_seconds,
            self.decode_tokens_per_second()
        )
    }
}

pub struct GenerateOutput {
    pub sequences: Vec<Generated>,
    pub stats: DecodeStats,
}

/// An observer that ignores every step.
pub fn no_observer(_: Step<'_>) -> Result<()> {
    Ok(())
}

/// Generates from input embeddings `x [Σ seq_lens, hidden]` of packed prompts.
pub fn generate<B: Backend>(
    be: &B,
    llm: &Llm,
    w: &ParamSet<B::Buf>,
    x: B::Buf,
    seq_lens: &[usize],
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(Step<'_>) -> Result<()>,
) -> Result<GenerateOutput> {
    let n = seq_lens.len();
    ensure!(n > 0, "nothing to generate: no prompts");
    ensure!(seq_lens.iter().all(|&l| l > 0), "an empty prompt: every prompt needs at least one token");
    let (h, v) = (llm.cfg.hidden, llm.cfg.vocab);
    let start = Instant::now();
    let mut stats = DecodeStats { prompt_tokens: seq_lens.iter().sum(), ..Default::default() };
    let mut out: Vec<Generated> = vec![Generated { tokens: Vec::new(), stop: StopReason::MaxNewTokens }; n];
    if opts.max_new_tokens == 0 {
        return Ok(GenerateOutput { sequences: out, stats });
    }
    // Sized for the prompts and a short answer; grown (doubling) only if an answer runs longer,
    // so a large --max-new-tokens reserves nothing it does not use. The last new token is never
    // fed back, so at most max_new_tokens − 1 positions are added.
    let longest = seq_lens.iter().copied().max().unwrap_or(0);
    let mut cache = KvCache::new(be, &llm.cfg, n, longest + (opts.max_new_tokens - 1).min(INITIAL_ANSWER_POSITIONS))?;
    let mut sampler = Sampler::new(opts.sampling, n);
    let slots: Vec<usize> = (0..n).collect();
    let hidden = llm.prefill(be, w, x, seq_lens, &slots, &mut cache)?;
    let mut last = be.empty(n * h)?;
    let mut end = 0;
    for (i, &len) in seq_lens.iter().enumerate() {
        end += len;
        be.copy_range(&hidden, (end - 1) * h, &mut last, i * h, h)?;
    }
    drop(hidden);
    let mut active = slots;
    let mut first_step = true;
    let mut step_start = Instant::now();
    loop {
        let logits = be.download(&llm.lm_head(be, w, &last)?)?;
        ensure!(logits.len() == active.len() * v, "generation: {} logits for {} rows of {v}", logits.len(), active.len());
        let mut still = Vec::with_capacity(active.len());
        for (row, &seq) in active.iter().enumerate() {
            let row_logits = &logits[row * v..(row + 1) * v];
            let token = sampler.pick(seq, row_logits)?;
            let g = &mut out[seq];
            g.tokens.push(token);
            on_step(Step { seq, index: g.tokens.len() - 1, token, logits: row_logits })?;
            if opts.eos.contains(&token) {
                g.stop = StopReason::Eos;
            } else if g.tokens.len() < opts.max_new_tokens {
                still.push(seq);
            }
        }
        if first_step {
            stats.prefill_seconds = start.elapsed().as_secs_f64();
            first_step = false;
        } else {
            stats.decoded_tokens += active.len();
            stats.steps += 1;
            stats.decode_seconds += step_start.elapsed().as_secs_f64();
        }
        active = still;
        if active.is_empty() {
            break;
        }
        step_start = Instant::now();
        let ids: Vec<u32> = active.iter().map(|&s| *out[s].tokens.last().expect("an active sequence has a token")).collect();
        let needed = active.iter().map(|&s| cache.lens()[s] + 1).max().unwrap_or(0);
        cache.reserve(be, needed)?;
        let x = llm.embed(be, w, &ids)?;
        last = llm.decode_step(be, w, x, &active, &mut cache)?;
    }
    Ok(GenerateOutput { sequences: out, stats })
}

/// Generates from token-id prompts on a plain decoder LLM.
pub fn generate_ids<B: Backend>(
    be: &B,
    llm: &Llm,
    w: &ParamSet<B::Buf>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(Step<'_>) -> Result<()>,
) -> Result<GenerateOutput> {
    let vocab = llm.cfg.vocab;
    for (i, p) in prompts.iter().enumerate() {
        ensure!(!p.is_empty(), "prompt {i} has no token ids");
        if let Some(&bad) = p.iter().find(|&&id| id as usize >= vocab) {
            bail!("prompt {i}: token id {bad} is out of range for the model's vocabulary of {vocab}");
        }
    }
    check_eos(&opts.eos, vocab)?;
    let ids: Vec<u32> = prompts.iter().flatten().copied().collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let x = llm.embed(be, w, &ids)?;
    generate(be, llm, w, x, &lens, opts, on_step)
}

/// Generates for encoded MLLM prompts, each with its preprocessed image (`[3, H, W]`) or none.
/// Every image goes through the vision tower once, in one batch.
pub fn generate_mllm<B: Backend>(
    be: &B,
    mllm: &Mllm,
    w: &MllmWeights<B::Buf>,
    prompts: Vec<(EncodedSample, Option<Vec<f32>>)>,
    opts: &GenerateOptions,
    on_step: &mut dyn FnMut(Step<'_>) -> Result<()>,
) -> Result<GenerateOutput> {
    let vocab = mllm.llm.cfg.vocab;
    check_eos(&opts.eos, vocab)?;
    let batch = collate(prompts)?;
    if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("prompt token id {bad} is out of range for the model's vocabulary of {vocab}");
    }
    let features = if batch.pixel_values.is_empty() { None } else { Some(mllm.encode_images(be, &w.vision, &batch.pixel_values)?) };
    let (x, _, _) = mllm.input_embeddings(be, w, &batch, features)?;
    generate(be, &mllm.llm, &w.llm, x, &batch.seq_lens, opts, on_step)
}

fn check_eos(eos: &[u32], vocab: usize) -> Result<()> {
    if let Some(&bad) = eos.iter().find(|&&id| id as usize >= vocab) {
        bail!("end-of-sequence id {bad} is out of range for the model's vocabulary of {vocab}");
    }
    Ok(())
}

/// The end-of-sequence ids of a model folder, as transformers resolves them for `generate`:
/// `eos_token_id` of `generation_config.json` when it has one, else of `config.json` (for a
/// LLaVA folder, also its `text_config`). Each may be an int or a list; null or absent means
/// none. Nothing else of `generation_config.json` (sampling settings) is read.
pub fn eos_ids_from_dir(dir: &Path) -> Result<Vec<u32>> {
    let read = |name: &str| -> Result<Option<Value>> {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
        Ok(Some(v))
    };
    let field = |v: &Value, what: &str| -> Result<Option<Vec<u32>>> { parse_eos(v.get("eos_token_id"), what) };
    if let Some(g) = read("generation_config.json")? {
        if let Some(ids) = field(&g, &dir.join("generation_config.json").display().to_string())? {
            return Ok(ids);
        }
    }
    if let Some(c) = read("config.json")? {
        let what = dir.join("config.json").display().to_string();
        if let Some(ids) = field(&c, &what)? {
            return Ok(ids);
        }
        if let Some(t) = c.get("text_config") {
            if let Some(ids) = field(t, &format!("{what}: text_config"))? {
                return Ok(ids);
            }
        }
    }
    Ok(Vec::new())
}

/// `eos_token_id`: an int, a list of ints, or null/absent (`None`).
fn parse_eos(v: Option<&Value>, what: &str) -> Result<Option<Vec<u32>>> {
    let as_id = |x: &Value| -> Result<u32> {
        x.as_u64()
            .filter(|&i| i <= u32::MAX as u64)
            .map(|i| i as u32)
            .with_context(|| format!("{what}: eos_token_id must be a token id or a list of them, found {x}"))
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items.iter().map(as_id).collect::<Result<_>>()?)),
        Some(x) => Ok(Some(vec![as_id(x)?])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_from_generation_config_then_config() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        assert_eq!(eos_ids_from_dir(d).unwrap(), Vec::<u32>::new());
        std::fs::write(d.join("config.json"), r#"{"eos_token_id": 7}"#).unwrap();
        assert_eq!(eos_ids_from_dir(d).unwrap(), vec![7]);
        std::fs::write(d.join("generation_config.json"), r#"{"eos_token_id": null, "do_sample": true}"#).unwrap();
        assert_eq!(eos_ids_from_dir(d).unwrap(), vec![7]);
        std::fs::write(d.join("generation_config.json"), r#"{"eos_token_id": [3, 9]}"#).unwrap();
        assert_eq!(eos_ids_from_dir(d).unwrap(), vec![3, 9]);
        std::fs::write(d.join("generation_config.json"), r#"{}"#).unwrap();
        std::fs::write(d.join("config.json"), r#"{"model_type": "llava", "text_config": {"eos_token_id": [4]}}"#).unwrap();
        assert_eq!(eos_ids_from_dir(d).unwrap(), vec![4]);
        std::fs::write(d.join("generation_config.json"), r#"{"eos_token_id": "x"}"#).unwrap();
        let e = format!("{:#}", eos_ids_from_dir(d).unwrap_err());
        assert!(e.contains("generation_config.json") && e.contains("eos_token_id"), "{e}");
        std::fs::write(d.join("generation_config.json"), "{").unwrap();
        assert!(format!("{:#}", eos_ids_from_dir(d).unwrap_err()).contains("not valid JSON"));
    }
}
