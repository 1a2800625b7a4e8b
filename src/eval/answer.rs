//! An MLLM checkpoint folder ready to answer questions about images: the model, its tokenizer,
//! the chat template that wraps each question, and its stop tokens. `generate`, `eval` and
//! `compare` all answer through [`MllmRunner::answer`].

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use tokenizers::Tokenizer;

use super::generate::{eos_ids_from_dir, generate_mllm, DecodeStats, GenerateOptions, Step, StopReason};
use crate::backend::Backend;
use crate::data::{default_visual_placeholder, load_rgb, load_tokenizer, preprocess, EncodeOptions, EncodedSample, Role, Template, Turn, DEFAULT_MAX_LEN};
use crate::model::{load_llava, Arch, LoadedLlava};

/// Whether a folder holds a single-folder MLLM (`model_type` "llava" or "tinyllava") rather than
/// a plain decoder LLM.
pub fn is_mllm_folder(dir: &Path) -> Result<bool> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: no readable config.json (not a model folder)", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
    Ok(matches!(v.get("model_type").and_then(|m| m.as_str()), Some("llava" | "tinyllava")))
}

/// The template a model family was trained with (SPEC §2): `phi` for Qwen, `llama` for LLaMA.
pub fn default_template(arch: Arch) -> &'static str {
    match arch {
        Arch::Qwen2 => "phi",
        Arch::Llama => "llama",
    }
}

/// One generated answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Decoded text, special tokens and the end-of-turn string removed, trimmed.
    pub text: String,
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

pub struct MllmRunner<Buf> {
    pub dir: PathBuf,
    pub model: LoadedLlava<Buf>,
    pub tokenizer: Tokenizer,
    pub template: Template,
    pub encode: EncodeOptions,
    /// The folder's end-of-sequence ids plus the template's end-of-turn token.
    pub eos: Vec<u32>,
}

impl<Buf> MllmRunner<Buf> {
    /// Loads an MLLM folder (`load_llava`), its tokenizer (`tokenizer`, else the folder's
    /// `tokenizer.json`) and the template (`template`, else the family's default).
    pub fn load<B: Backend<Buf = Buf>>(be: &B, dir: &Path, template: Option<&str>, tokenizer: Option<&Path>) -> Result<Self> {
        let model = load_llava(be, dir).with_context(|| format!("loading the MLLM folder {}", dir.display()))?;
        let tok_path = tokenizer.unwrap_or(dir);
        let tokenizer = load_tokenizer(tok_path).with_context(|| format!("the tokenizer of {}", dir.display()))?;
        let template = Template::builtin(template.unwrap_or(default_template(model.mllm.llm.cfg.arch)))?;
        let placeholder = model.image_token_id.unwrap_or_else(|| default_visual_placeholder(&tokenizer));
        let encode = EncodeOptions { n_visual_tokens: model.mllm.visual_tokens(), visual_placeholder_id: placeholder, max_len: DEFAULT_MAX_LEN };
        let mut eos = eos_ids_from_dir(dir)?;
        if let Some(id) = tokenizer.token_to_id(&template.end_of_turn) {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let vocab = model.mllm.llm.cfg.vocab;
        eos.retain(|&id| (id as usize) < vocab);
        Ok(MllmRunner { dir: dir.to_path_buf(), model, tokenizer, template, encode, eos })
    }

    /// A short name for reports: the folder's last component.
    pub fn name(&self) -> String {
        self.dir.file_name().map_or_else(|| self.dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    }

    /// The question wrapped by the template, ending with the assistant prefix.
    pub fn prompt(&self, question: &str, has_image: bool) -> Result<EncodedSample> {
        let turns = [Turn::new(Role::User, question)];
        self.template.encode_generation_prompt(&turns, has_image, &self.tokenizer, &self.encode)
    }

    /// An image file, decoded and preprocessed as the folder's image processor says.
    pub fn load_image(&self, path: &Path) -> Result<Vec<f32>> {
        let img = load_rgb(path).with_context(|| format!("image {}", path.display()))?;
        preprocess(&img, &self.model.image_processor).with_context(|| format!("preprocessing {}", path.display()))
    }

    /// The text of generated tokens: a trailing end-of-sequence id dropped, special tokens
    /// skipped, cut at the template's end-of-turn string, trimmed.
    pub fn text(&self, tokens: &[u32]) -> Result<String> {
        let body = match tokens.split_last() {
            Some((last, rest)) if self.eos.contains(last) => rest,
            _ => tokens,
        };
        let text = self.tokenizer.decode(body, true).map_err(|e| anyhow!("decoding generated tokens: {e}"))?;
        let text = match text.find(&self.template.end_of_turn) {
            Some(at) if !self.template.end_of_turn.is_empty() => &text[..at],
            _ => &text[..],
        };
        Ok(text.trim().to_string())
    }

    /// Answers a batch of questions (each with an optional image file) in one generation batch.
    pub fn answer<B: Backend<Buf = Buf>>(
        &self,
        be: &B,
        items: &[(String, Option<PathBuf>)],
        opts: &GenerateOptions,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<()>,
    ) -> Result<(Vec<Answer>, DecodeStats)> {
        let mut prompts = Vec::with_capacity(items.len());
        for (question, image) in items {
            let pixels = image.as_deref().map(|p| self.load_image(p)).transpose()?;
            let sample = self.prompt(question, pixels.is_some()).with_context(|| format!("formatting the question {question:?}"))?;
            prompts.push((sample, pixels));
        }
        let out = generate_mllm(be, &self.model.mllm, &self.model.weights, prompts, opts, on_step)?;
        let answers = out
            .sequences
            .into_iter()
            .map(|g| Ok(Answer { text: self.text(&g.tokens)?, tokens: g.tokens, stop: g.stop }))
            .collect::<Result<_>>()?;
        Ok((answers, out.stats))
    }
}

/// Streams decoded text as tokens arrive: each call returns the text that became final,
/// holding back an incomplete UTF-8 sequence (shown as U+FFFD until its last byte arrives).
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    shown: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        TextStream { tokenizer, ids: Vec::new(), shown: 0 }
    }

    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, true).map_err(|e| anyhow!("decoding generated tokens: {e}"))?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.shown || !text.is_char_boundary(self.shown) {
            return Ok(String::new());
        }
        let new = text[self.shown..].to_string();
        self.shown = text.len();
        Ok(new)
    }
}
