//! `kd-engine generate`: text for an image and a prompt (MLLM folder, streamed as it is
//! generated), or new token ids for a prompt of ids (`--json`: exactly one JSON line on stdout,
//! `{"ids": [...]}`, new tokens only, the end-of-sequence token included when generation stopped
//! at one, as transformers' `generate` returns them). Everything else goes to stderr, including
//! the prefill and decode speeds in tokens per second.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;

use super::forward::parse_ids;
use super::Device;
use crate::backend::Backend;
use crate::data::{load_tokenizer, EncodedSample, Group};
use crate::eval::answer::{is_mllm_folder, MllmRunner, TextStream};
use crate::eval::generate::{eos_ids_from_dir, generate_ids, generate_mllm, DecodeStats, GenerateOptions, Generated, Step, StopReason, DEFAULT_MAX_NEW_TOKENS};
use crate::eval::sampling::Sampling;
use crate::model::LoadedLlm;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Model folder: a decoder LLM (config.json + safetensors) or a single-folder MLLM (Hugging
    /// Face LLaVA, as `kd-engine train` exports the student, or TinyLLaVA).
    #[arg(long)]
    pub model: PathBuf,
    /// Image file (PNG, JPEG, GIF) for an MLLM; one per prompt.
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// The question; an MLLM's template wraps it. A plain LLM gets the tokenised text as it is.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids instead of text, e.g. 1,5,42 (for an MLLM: with the
    /// image token repeated once per visual position, as transformers expects).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub input_ids: Vec<String>,
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Print one JSON line on stdout (`{"ids": [...]}`, plus `"text"` when decoded) instead of
    /// streaming text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Chat template for an MLLM: phi (default for Qwen), llama (default for LLaMA), pretrain.
    #[arg(long)]
    pub template: Option<String>,
    /// tokenizer.json (or a folder holding one); default: the model folder's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Sample with this temperature (default: greedy). generation_config.json's sampling
    /// settings are never applied on their own.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most probable tokens up to this mass (needs --temperature).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most probable tokens (needs --temperature).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampling stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End-of-sequence ids, comma-separated, replacing the model folder's (generation_config.json,
    /// else config.json); `none` for none.
    #[arg(long, value_delimiter = ',')]
    pub eos_token_id: Option<Vec<String>>,
}

/// `--eos-token-id`: ids, or `none`.
fn parse_eos(raw: &[String]) -> Result<Vec<u32>> {
    if raw.len() == 1 && raw[0].trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    parse_ids(raw).context("--eos-token-id")
}

/// Where generated tokens go as they arrive.
enum Sink<'t> {
    /// Nothing streamed (`--json` prints at the end).
    Quiet,
    /// Decoded text on stdout.
    Text(TextStream<'t>),
    /// Token ids on stdout, space-separated (no tokenizer).
    Ids,
}

impl Sink<'_> {
    fn push(&mut self, token: u32) -> Result<()> {
        let piece = match self {
            Sink::Quiet => return Ok(()),
            Sink::Text(s) => s.push(token)?,
            Sink::Ids => format!("{token} "),
        };
        let mut out = std::io::stdout().lock();
        out.write_all(piece.as_bytes()).and_then(|_| out.flush()).context("writing to stdout")
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    ensure!(a.image.len() <= 1, "--image given {} times: one image per prompt (a sample with more than one image is not supported)", a.image.len());
    ensure!(
        a.prompt.is_some() == a.input_ids.is_empty(),
        "give the prompt as text (--prompt) or as token ids (--input-ids), exactly one of them"
    );
    let sampling = Sampling::from_options(a.temperature, a.top_k, a.top_p, a.seed)?;
    let eos_override = a.eos_token_id.as_deref().map(parse_eos).transpose()?;
    let mllm = is_mllm_folder(&a.model)?;
    if !mllm {
        ensure!(a.image.is_empty(), "{} is a plain language model (no vision tower): --image needs an MLLM folder", a.model.display());
    }
    crate::with_backend!(a.device, be => if mllm { run_mllm(&be, &a, sampling, eos_override) } else { run_llm(&be, &a, sampling, eos_override) })
}

fn report(stats: &DecodeStats, g: &Generated, max_new: usize, backend: &str) {
    match g.stop {
        StopReason::Eos => eprintln!("stopped at end-of-sequence id {} after {} new tokens", g.tokens.last().copied().unwrap_or(0), g.tokens.len()),
        StopReason::MaxNewTokens => eprintln!("stopped at --max-new-tokens {max_new}"),
    }
    eprintln!("{} [{backend}]", stats.summary());
}

fn run_llm<B: Backend>(be: &B, a: &GenerateArgs, sampling: Sampling, eos_override: Option<Vec<u32>>) -> Result<()> {
    let llm = LoadedLlm::load(be, &a.model, "").with_context(|| format!("loading the model in {}", a.model.display()))?;
    let tok_path = a.tokenizer.clone().unwrap_or_else(|| a.model.clone());
    let has_tokenizer = a.tokenizer.is_some() || a.model.join("tokenizer.json").is_file();
    let tokenizer = if has_tokenizer { Some(load_tokenizer(&tok_path)?) } else { None };
    let ids = match &a.prompt {
        Some(text) => {
            let tok = tokenizer.as_ref().with_context(|| format!("--prompt needs a tokenizer: {} has no tokenizer.json (give --tokenizer or --input-ids)", a.model.display()))?;
            let enc = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenising the prompt: {e}"))?;
            enc.get_ids().to_vec()
        }
        None => parse_ids(&a.input_ids)?,
    };
    let eos = match eos_override {
        Some(e) => e,
        None => eos_ids_from_dir(&a.model)?,
    };
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, eos, sampling };
    let mut sink = match (&tokenizer, a.json) {
        (_, true) => Sink::Quiet,
        (Some(t), false) => Sink::Text(TextStream::new(t)),
        (None, false) => Sink::Ids,
    };
    let mut on_step = |s: Step<'_>| sink.push(s.token);
    let out = generate_ids(be, &llm.model, &llm.weights, &[ids], &opts, &mut on_step)?;
    let g = out.sequences.into_iter().next().context("no sequence generated")?;
    let text = match &tokenizer {
        Some(t) => Some(t.decode(&g.tokens, true).map_err(|e| anyhow::anyhow!("decoding generated tokens: {e}"))?),
        None => None,
    };
    finish(&g, &out.stats, a, text, &be.name())
}

/// Ends the output: the JSON line (`text` joins the ids when the prompt was text), or the
/// streamed text's newline; then the stop reason and speeds on stderr.
fn finish(g: &Generated, stats: &DecodeStats, a: &GenerateArgs, text: Option<String>, backend: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut line = json!({ "ids": g.tokens });
        if let (Some(t), true) = (text, a.prompt.is_some()) {
            line["text"] = json!(t);
        }
        writeln!(out, "{line}").context("writing to stdout")?;
    } else {
        writeln!(out).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    report(stats, g, a.max_new_tokens, backend);
    Ok(())
}

fn run_mllm<B: Backend>(be: &B, a: &GenerateArgs, sampling: Sampling, eos_override: Option<Vec<u32>>) -> Result<()> {
    let image = a.image.first().map(PathBuf::as_path);
    let runner = MllmRunner::load(be, &a.model, a.template.as_deref(), a.tokenizer.as_deref())?;
    let eos = eos_override.unwrap_or_else(|| runner.eos.clone());
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, eos, sampling };
    let mut sink = if a.json { Sink::Quiet } else { Sink::Text(TextStream::new(&runner.tokenizer)) };
    let mut on_step = |s: Step<'_>| if opts.eos.contains(&s.token) { Ok(()) } else { sink.push(s.token) };
    let (g, stats) = match &a.prompt {
        Some(prompt) => {
            let (answers, stats) = runner.answer(be, &[(prompt.clone(), image.map(Path::to_path_buf))], &opts, &mut on_step)?;
            let first = answers.into_iter().next().context("no answer generated")?;
            (Generated { tokens: first.tokens, stop: first.stop }, stats)
        }
        None => {
            let ids = parse_ids(&a.input_ids)?;
            let sample = ids_prompt(&runner, ids, image.is_some())?;
            let pixels = image.map(|p| runner.load_image(p)).transpose()?;
            let out = generate_mllm(be, &runner.model.mllm, &runner.model.weights, vec![(sample, pixels)], &opts, &mut on_step)?;
            (out.sequences.into_iter().next().context("no sequence generated")?, out.stats)
        }
    };
    let text = runner.text(&g.tokens)?;
    finish(&g, &stats, a, Some(text), &be.name())
}

/// An MLLM prompt given as ids: positions holding the image token receive the image (the HF
/// convention: one image token per visual position).
fn ids_prompt<Buf>(runner: &MllmRunner<Buf>, ids: Vec<u32>, has_image: bool) -> Result<EncodedSample> {
    let image_id = runner.model.image_token_id;
    let groups: Vec<Group> = ids.iter().map(|&id| if Some(id) == image_id { Group::Visual } else { Group::Prompt }).collect();
    let n_visual = groups.iter().filter(|&&g| g == Group::Visual).count();
    match (has_image, image_id) {
        (true, None) => bail!("{}: a TinyLLaVA folder marks no image token; give the question as --prompt", runner.dir.display()),
        (true, Some(id)) => ensure!(
            n_visual == runner.model.mllm.visual_tokens(),
            "--input-ids hold the image token {id} {n_visual} times; the model takes {} visual tokens per image",
            runner.model.mllm.visual_tokens()
        ),
        (false, _) => ensure!(n_visual == 0, "--input-ids hold the image token but no --image was given"),
    }
    Ok(EncodedSample { ids, groups, has_image })
}
