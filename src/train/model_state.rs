//! A student or teacher MLLM ready to train or run: the model, its weights on the backend, its
//! tokenizer and image preprocessing.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use tokenizers::Tokenizer;

use super::config::ModelSource;
use crate::backend::Backend;
use crate::data::{load_tokenizer, ImageProcessorConfig, SplitMix64};
use crate::model::{FeatureSelect, LoadedLlm, LoadedVision, Mllm, MllmWeights, ParamSet, ParamSpec};
use crate::weights::WeightSource;

pub struct MllmState<Buf> {
    pub model: Mllm,
    pub weights: MllmWeights<Buf>,
    pub tokenizer: Tokenizer,
    pub processor: ImageProcessorConfig,
    /// The folder the vision tower was read from: a teacher reading the same folder (with the
    /// same feature layer and selection) shares the student's visual features.
    pub vision_source: Option<PathBuf>,
}

impl<Buf> MllmState<Buf> {
    /// Whether `other` computes exactly the same visual features as `self`.
    pub fn shares_vision_with(&self, other: &MllmState<Buf>) -> bool {
        let same_dir = match (&self.vision_source, &other.vision_source) {
            (Some(a), Some(b)) => a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b),
            _ => false,
        };
        same_dir
            && self.model.feature_layer == other.model.feature_layer
            && self.model.select == other.model.select
            && self.model.vision.cfg == other.model.vision.cfg
    }
}

/// PyTorch's `nn.Linear` default initialisation (Kaiming-uniform with a = √5): weights and biases
/// uniform in ±1/√fan_in. Used for a fresh projector, seeded so runs reproduce.
pub fn linear_default_init(seed: u64) -> impl FnMut(&ParamSpec) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    // Specs list each weight before its bias: a bias takes the fan_in of the weight before it.
    let mut fan_in = 1usize;
    move |s: &ParamSpec| {
        if s.shape.len() == 2 {
            fan_in = s.shape[1];
        }
        let bound = 1.0 / (fan_in as f64).sqrt();
        (0..s.numel()).map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound).map(|x| x as f32).collect()
    }
}

pub fn parse_select(name: &str) -> Result<FeatureSelect> {
    match name {
        "patch" => Ok(FeatureSelect::Patch),
        "full" => Ok(FeatureSelect::Full),
        other => anyhow::bail!("feature_select \"{other}\" is not patch or full"),
    }
}

/// Loads a model as a config's `[student]` or `[teacher]` describes it.
/// Refuses a tokenizer whose ids reach past the LLM's embedding rows: found when the model is
/// loaded, not as an out-of-range row in the first step that meets such a token.
pub fn check_token_ids(what: &str, tokenizer: &Tokenizer, vocab: usize) -> Result<()> {
    let max = tokenizer.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    ensure!(
        max < vocab,
        "{what}: the tokenizer has token ids up to {max}, but the LLM's vocabulary has {vocab} rows (ids 0..={}); \
         use the tokenizer the model was trained with",
        vocab.saturating_sub(1)
    );
    Ok(())
}

pub fn load_model<B: Backend>(be: &B, what: &str, src: &ModelSource, seed: u64) -> Result<MllmState<B::Buf>> {
    let m = load_parts(be, what, src, seed)?;
    check_token_ids(what, &m.tokenizer, m.model.llm.cfg.vocab)?;
    Ok(m)
}

fn load_parts<B: Backend>(be: &B, what: &str, src: &ModelSource, seed: u64) -> Result<MllmState<B::Buf>> {
    let select = parse_select(&src.feature_select)?;
    if let Some(dir) = &src.llava {
        let l = crate::model::load_llava(be, dir).with_context(|| format!("{what}: loading the MLLM folder {}", dir.display()))?;
        let tok = src.tokenizer.clone().unwrap_or_else(|| dir.clone());
        return Ok(MllmState {
            tokenizer: load_tokenizer(&tok).with_context(|| format!("{what}: tokenizer in {}", tok.display()))?,
            model: l.mllm,
            weights: l.weights,
            processor: l.image_processor,
            vision_source: Some(dir.clone()),
        });
    }
    let (llm_dir, vision_dir) = match (&src.llm, &src.vision) {
        (Some(l), Some(v)) => (l, v),
        _ => anyhow::bail!("{what}: needs `llava` or both `llm` and `vision`"),
    };
    let llm = LoadedLlm::load(be, llm_dir, "").with_context(|| format!("{what}: LLM"))?;
    let vision = LoadedVision::load(be, vision_dir).with_context(|| format!("{what}: vision tower"))?;
    let model = Mllm::new(vision.tower, llm.model, src.feature_layer, select)?;
    let (llm_w, vision_w) = (llm.weights, vision.weights);
    let projector = match &src.projector {
        Some(file) => {
            let source = WeightSource::open(file)?;
            let prefix = if source.info("multi_modal_projector.linear_1.weight").is_some() { "multi_modal_projector." } else { "" };
            ParamSet::load(be, &model.projector.specs, &source, prefix).with_context(|| format!("{what}: projector {}", file.display()))?
        }
        None => ParamSet::from_fn(be, &model.projector.specs, linear_default_init(seed))?,
    };
    let tok = src.tokenizer.clone().unwrap_or_else(|| llm_dir.clone());
    Ok(MllmState {
        processor: ImageProcessorConfig::for_tower(vision_dir, model.vision.cfg.image_size)?,
        tokenizer: load_tokenizer(&tok).with_context(|| format!("{what}: tokenizer in {}", tok.display()))?,
        weights: MllmWeights { vision: vision_w, projector, llm: llm_w },
        model,
        vision_source: Some(vision_dir.clone()),
    })
}
