//! Single-folder LLaVA checkpoints: exporting the distilled student as one Hugging Face
//! `LlavaForConditionalGeneration` folder, and reading such folders (and TinyLLaVA's) back.
//!
//! # The exported folder
//!
//! What transformers 5.17 itself writes for a `LlavaForConditionalGeneration` (checked by saving a
//! tiny one from Python, `tests/fixtures/make_llava_fixtures.py`), except for three deliberate
//! choices made for older readers (transformers 4.x, vLLM), each checked to load identically in 5.17
//! (`scripts/check_hf_export.py`): the vision prefix, `head_dim` + top-level `rope_theta` in
//! `text_config`, and a 4.x-style processor/tokenizer config.
//!
//! * `model.safetensors` (f32, bf16 or f16; `{"format": "pt"}` metadata), tensor names:
//!   `language_model.model.…` (embeddings, layers, final norm), `language_model.lm_head.weight`
//!   (untied models only: tied ones store no head, as transformers does),
//!   `multi_modal_projector.linear_{1,2}.{weight,bias}`, and the SigLIP tower under
//!   `vision_tower.vision_model.…`. transformers 5.17 itself saves the tower as `vision_tower.…`
//!   (its `SiglipVisionModel` no longer has a `vision_model` child); it loads both names into the
//!   same parameters, while transformers 4.x and the tools built on the llava-hf layout (vLLM,
//!   SGLang) only know `vision_tower.vision_model.…`, so the export uses that
//!   ([`EXPORT_VISION_PREFIX`]). No `head.*` tensors: `vision_use_head` is false.
//! * `config.json`: `model_type` "llava", `architectures`, `dtype`, `image_seq_length`,
//!   `image_token_index`, `multimodal_projector_bias` true, `projector_hidden_act` "gelu",
//!   `tie_word_embeddings`, `transformers_version`, `vision_feature_layer` (negative),
//!   `vision_feature_select_strategy` ("default" = drop the first token, or "full"), and the two
//!   nested configs with every field transformers 5.17 writes for them. `text_config` also carries
//!   `head_dim` and a top-level `rope_theta` beside `rope_parameters` (4.x reads only the latter).
//! * `generation_config.json`; `preprocessor_config.json` (`SiglipImageProcessor`); and, when a
//!   tokenizer source is given, `tokenizer.json` with `<image>` added as a special token,
//!   `tokenizer_config.json` and the 4.x-style `processor_config.json` of a `LlavaProcessor`, so
//!   `AutoProcessor` works too.
//!
//! The folder is written into a temporary sibling and renamed into place, so a reader never sees
//! half an export; an existing non-empty target is refused, never overwritten.
//!
//! # Reading
//!
//! [`load_llava`] reads HF LLaVA folders in any of the names transformers uses (5.x saved, 4.x
//! saved, 5.x module names `model.language_model.…`/`lm_head.weight`) and TinyLLaVA_Factory's
//! single folder (`model_type` "tinyllava": `language_model.model.…`, `language_model.lm_head.weight`,
//! `vision_tower._vision_tower.vision_model.…`, `connector._connector.{0,2}.…` for `mlp2x_gelu`).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::config::{read_json, Arch, JsonFields, LlmConfig};
use super::llm::Llm;
use super::mllm::{FeatureSelect, Mllm, MllmWeights};
use super::params::ParamSet;
use super::vision::{VisionConfig, VisionTower};
use crate::backend::{Backend, GeluKind};
use crate::data::{load_tokenizer, Group, ImageProcessorConfig, PackedBatch, IMAGE_TAG, PREPROCESSOR_CONFIG_FILE};
use crate::weights::{write_json, write_safetensors_streamed, StagedDir, StoreDtype, TensorMeta, WeightSource};

/// The transformers version whose file layout the export reproduces.
pub const TRANSFORMERS_LAYOUT_VERSION: &str = "5.17.0";
/// Prefix of the LLM's tensors (`model.…`, `lm_head.weight` follow) in saved LLaVA files.
pub const EXPORT_LLM_PREFIX: &str = "language_model.";
/// Prefix of the SigLIP tower's tensors in the export (see the module documentation).
pub const EXPORT_VISION_PREFIX: &str = "vision_tower.vision_model.";
/// Prefix of the projector's `linear_1.*`/`linear_2.*` tensors.
pub const EXPORT_PROJECTOR_PREFIX: &str = "multi_modal_projector.";
/// `max_position_embeddings` written into `text_config`: kd-engine does not keep the source's
/// value; with default (unscaled) RoPE it only sizes transformers' caches, never the math.
pub const EXPORT_MAX_POSITIONS: usize = 32768;
/// `model_max_length` of a tokenizer config written from scratch (the SPEC's sequence limit).
pub const EXPORT_MODEL_MAX_LENGTH: usize = 2048;

/// Which single-folder checkpoint layout a folder has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlavaLayout {
    /// Hugging Face `LlavaForConditionalGeneration` (`model_type` "llava").
    HfLlava,
    /// TinyLLaVA_Factory's `TinyLlavaForConditionalGeneration` (`model_type` "tinyllava").
    TinyLlava,
}

/// How [`export_llava`] writes the folder.
#[derive(Clone, Debug)]
pub struct ExportOptions<'a> {
    /// A `tokenizer.json` file or a folder holding one (and maybe `tokenizer_config.json`); copied
    /// with `<image>` added. `None`: no tokenizer files (then `image_token_id` is required).
    pub tokenizer: Option<&'a Path>,
    /// The `<image>` id. `None`: the tokenizer's own `<image>` if it has one, else the first id
    /// after its vocabulary ([`choose_image_token_id`]). With a tokenizer, any other id is refused:
    /// the `tokenizers` library renumbers added tokens to follow the vocabulary.
    pub image_token_id: Option<u32>,
    /// Storage type of the weights.
    pub dtype: StoreDtype,
    /// The image preprocessing to record; `None`: SigLIP's (bicubic, ×1/255, mean = std = 0.5)
    /// at the tower's image size.
    pub image_processor: Option<ImageProcessorConfig>,
}

impl Default for ExportOptions<'_> {
    fn default() -> Self {
        ExportOptions { tokenizer: None, image_token_id: None, dtype: StoreDtype::Bf16, image_processor: None }
    }
}

/// What [`export_llava`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportSummary {
    pub image_token_id: u32,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Files in the folder, by name.
    pub files: Vec<String>,
}

/// A single-folder MLLM checkpoint loaded onto a backend.
pub struct LoadedLlava<Buf> {
    pub mllm: Mllm,
    pub weights: MllmWeights<Buf>,
    pub layout: LlavaLayout,
    /// The `<image>` id of an HF LLaVA folder (its embedding row is never used: those positions
    /// receive image features). `None` for TinyLLaVA, which marks the image with the
    /// out-of-vocabulary id −200 and splices the features in its place.
    pub image_token_id: Option<u32>,
    /// The folder's `preprocessor_config.json`, else SigLIP's settings at the tower's size.
    pub image_processor: ImageProcessorConfig,
}

/// The `<image>` id for a tokenizer and an embedding matrix of `rows` rows: the tokenizer's own
/// `<image>` token if it has one, else the first id after every id the tokenizer uses (for Qwen1.5
/// 151646 of 151936 rows: rows past the tokenizer are padding, never produced by tokenisation).
/// Errors when that id has no embedding row.
pub fn choose_image_token_id(tokenizer: &tokenizers::Tokenizer, rows: usize) -> Result<u32> {
    let id = match tokenizer.token_to_id(IMAGE_TAG) {
        Some(id) => id,
        None => tokenizer.get_vocab(true).values().max().map_or(0, |&m| m + 1),
    };
    ensure!(
        (id as usize) < rows,
        "no free embedding row for the {IMAGE_TAG} token: the tokenizer uses ids 0..{id} and the \
         embedding matrix has only {rows} rows (every row is a token); resize the embeddings or use \
         a tokenizer that already has an {IMAGE_TAG} token"
    );
    Ok(id)
}

/// Shortest decimal of an f32 (e.g. 1e-6, not 9.99999997e-7), as a JSON number.
/// An f32 written as its shortest decimal (1e-6, not 9.999999974752427e-7), as Python writes it.
pub(crate) fn f32_json(x: f32) -> Value {
    json!(format!("{x}").parse::<f64>().unwrap_or(x as f64))
}

/// The decoder's HF `config.json` fields (the LLaVA `text_config`, and the core of a standalone
/// decoder config), with `max_position_embeddings`.
pub(crate) fn text_config_json(c: &LlmConfig, max_positions: usize) -> Result<Value> {
    let rope = json!({"rope_theta": c.rope_theta, "rope_type": "default"});
    let mut v = json!({
        "attention_dropout": 0.0,
        "bos_token_id": null,
        "eos_token_id": null,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate,
        "max_position_embeddings": max_positions,
        "num_attention_heads": c.heads,
        "num_hidden_layers": c.layers,
        "num_key_value_heads": c.kv_heads,
        "pad_token_id": null,
        "rms_norm_eps": f32_json(c.rms_eps),
        "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "use_cache": true,
        "vocab_size": c.vocab,
    });
    let obj = v.as_object_mut().expect("a JSON object");
    match c.arch {
        Arch::Qwen2 => {
            ensure!(
                c.qkv_bias && !c.o_bias,
                "a qwen2 decoder has q/k/v biases and no o_proj bias; this one has qkv_bias {} and o_bias {}",
                c.qkv_bias,
                c.o_bias
            );
            obj.insert("model_type".into(), json!("qwen2"));
            obj.insert("layer_types".into(), json!(vec!["full_attention"; c.layers]));
            obj.insert("max_window_layers".into(), json!(c.layers));
            obj.insert("sliding_window".into(), Value::Null);
            obj.insert("use_sliding_window".into(), json!(false));
        }
        Arch::Llama => {
            ensure!(
                c.qkv_bias == c.o_bias,
                "a llama decoder has biases on all of q/k/v/o or none (attention_bias); this one has qkv_bias {} and o_bias {}",
                c.qkv_bias,
                c.o_bias
            );
            obj.insert("model_type".into(), json!("llama"));
            obj.insert("attention_bias".into(), json!(c.qkv_bias));
            obj.insert("mlp_bias".into(), json!(false));
            obj.insert("pretraining_tp".into(), json!(1));
        }
    }
    Ok(v)
}

/// The SigLIP tower's HF config fields (the LLaVA `vision_config`, and the core of a standalone
/// `SiglipVisionModel` config).
pub(crate) fn vision_config_json(c: &VisionConfig) -> Value {
    json!({
        "attention_dropout": 0.0,
        "hidden_act": match c.act { GeluKind::Tanh => "gelu_pytorch_tanh", GeluKind::Erf => "gelu" },
        "hidden_size": c.hidden,
        "image_size": c.image_size,
        "intermediate_size": c.intermediate,
        "layer_norm_eps": f32_json(c.ln_eps),
        "model_type": "siglip_vision_model",
        "num_attention_heads": c.heads,
        "num_channels": c.channels,
        "num_hidden_layers": c.layers,
        "patch_size": c.patch_size,
        "vision_use_head": false,
    })
}

/// The LLaVA `config.json` of `mllm` (what [`export_llava`] writes).
pub fn llava_config_json(mllm: &Mllm, image_token_id: u32, dtype: StoreDtype) -> Result<Value> {
    let layers = mllm.vision.cfg.layers as i64;
    Ok(json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "dtype": dtype.torch_name(),
        "image_seq_length": mllm.visual_tokens(),
        "image_token_index": image_token_id,
        "model_type": "llava",
        "multimodal_projector_bias": true,
        "projector_hidden_act": "gelu",
        "text_config": text_config_json(&mllm.llm.cfg, EXPORT_MAX_POSITIONS)?,
        "tie_word_embeddings": mllm.llm.cfg.tie_embeddings,
        "transformers_version": TRANSFORMERS_LAYOUT_VERSION,
        "vision_config": vision_config_json(&mllm.vision.cfg),
        "vision_feature_layer": mllm.feature_layer as i64 - (layers + 1),
        "vision_feature_select_strategy": match mllm.select { FeatureSelect::Patch => "default", FeatureSelect::Full => "full" },
    }))
}

fn preprocessor_json(p: &ImageProcessorConfig) -> Value {
    json!({
        "do_convert_rgb": true,
        "do_normalize": p.do_normalize,
        "do_rescale": p.do_rescale,
        "do_resize": p.do_resize,
        "image_mean": p.mean.iter().map(|&x| f32_json(x)).collect::<Vec<_>>(),
        "image_processor_type": "SiglipImageProcessor",
        "image_std": p.std.iter().map(|&x| f32_json(x)).collect::<Vec<_>>(),
        "resample": p.resample as i64,
        "rescale_factor": p.rescale_factor,
        "size": {"height": p.height, "width": p.width},
    })
}

/// Writes `value` as pretty JSON with a final newline, as transformers does.
/// The tokenizer files of the export: `tokenizer.json` with `<image>` at `image_token_id`, and the
/// source's `tokenizer_config.json` (with `<image>` in `added_tokens_decoder`) or a minimal one.
/// Returns the ids of the end-of-sequence and beginning-of-sequence tokens, when known.
fn write_tokenizer(src: &Path, out: &Path, image_token_id: u32, arch: Arch) -> Result<(Option<u32>, Option<u32>)> {
    let tok_file = if src.is_dir() { src.join("tokenizer.json") } else { src.to_path_buf() };
    let tokenizer = load_tokenizer(src)?;
    let mut json = read_json(&tok_file)?;
    if tokenizer.token_to_id(IMAGE_TAG).is_none() {
        let added = json
            .get_mut("added_tokens")
            .and_then(Value::as_array_mut)
            .with_context(|| format!("{}: no \"added_tokens\" list", tok_file.display()))?;
        added.push(json!({
            "id": image_token_id, "content": IMAGE_TAG, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        }));
    }
    let dst = out.join("tokenizer.json");
    std::fs::write(&dst, serde_json::to_string(&json)?).with_context(|| format!("writing {}", dst.display()))?;
    // The written file must give <image> the id the model was told.
    let written = load_tokenizer(out)?;
    let got = written.token_to_id(IMAGE_TAG);
    ensure!(
        got == Some(image_token_id),
        "{}: the tokenizer gives {IMAGE_TAG} the id {got:?}, not {image_token_id}",
        dst.display()
    );

    let eos_token = ["<|endoftext|>", "</s>"].into_iter().find(|t| written.token_to_id(t).is_some());
    let bos_token = (arch == Arch::Llama).then_some("<s>").filter(|t| written.token_to_id(t).is_some());
    let src_cfg = src.is_dir().then(|| src.join("tokenizer_config.json")).filter(|p| p.is_file());
    let cfg = match src_cfg {
        Some(path) => {
            let mut cfg = read_json(&path)?;
            let obj = cfg.as_object_mut().with_context(|| format!("{}: not a JSON object", path.display()))?;
            if let Some(dec) = obj.get_mut("added_tokens_decoder").and_then(Value::as_object_mut) {
                dec.insert(
                    image_token_id.to_string(),
                    json!({"content": IMAGE_TAG, "lstrip": false, "normalized": false, "rstrip": false,
                           "single_word": false, "special": true}),
                );
            }
            cfg
        }
        None => {
            let mut cfg = json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": EXPORT_MODEL_MAX_LENGTH,
                "clean_up_tokenization_spaces": false,
                "extra_special_tokens": {"image_token": IMAGE_TAG},
            });
            let obj = cfg.as_object_mut().expect("a JSON object");
            if let Some(eos) = eos_token {
                obj.insert("eos_token".into(), json!(eos));
                obj.insert("pad_token".into(), json!(eos));
            }
            if let Some(bos) = bos_token {
                obj.insert("bos_token".into(), json!(bos));
            }
            cfg
        }
    };
    write_json(&out.join("tokenizer_config.json"), &cfg)?;
    let id = |t: Option<&str>| t.and_then(|t| written.token_to_id(t));
    Ok((id(eos_token), id(bos_token)))
}

/// Exports `mllm` with `weights` (on any backend; downloaded one tensor at a time) as one Hugging
/// Face `LlavaForConditionalGeneration` folder at `dir` (see the module documentation for its
/// contents). `dir` must not exist or be empty; its parent is created if needed.
pub fn export_llava<B: Backend>(
    be: &B,
    dir: &Path,
    mllm: &Mllm,
    weights: &MllmWeights<B::Buf>,
    opts: &ExportOptions<'_>,
) -> Result<ExportSummary> {
    for (part, model, set) in [
        ("vision tower", &mllm.vision.specs, &weights.vision.specs),
        ("projector", &mllm.projector.specs, &weights.projector.specs),
        ("LLM", &mllm.llm.specs, &weights.llm.specs),
    ] {
        ensure!(model == set, "export: the {part} weights do not have the model's parameter layout");
    }
    let vocab = mllm.llm.cfg.vocab;
    let image_token_id = match opts.tokenizer {
        Some(src) => {
            let tok = load_tokenizer(src)?;
            let id = choose_image_token_id(&tok, vocab).with_context(|| format!("tokenizer {}", src.display()))?;
            if let Some(asked) = opts.image_token_id {
                ensure!(
                    asked == id,
                    "image_token_id {asked} was asked for, but with tokenizer {} the {IMAGE_TAG} token gets id {id} \
                     (its existing {IMAGE_TAG}, or the first id after its vocabulary: the tokenizers library \
                     renumbers added tokens that way); leave image_token_id unset",
                    src.display()
                );
            }
            id
        }
        None => {
            let id = opts.image_token_id.with_context(|| {
                format!("export to {}: give a tokenizer or an image_token_id (an unused embedding row)", dir.display())
            })?;
            ensure!((id as usize) < vocab, "image_token_id {id} is outside the {vocab}-row embedding matrix");
            id
        }
    };

    let tmp = StagedDir::new(dir, "export target", "export")?;

    // Weights, streamed one Hugging Face tensor at a time. A parameter stacking several is
    // downloaded once and kept until its last tensor is written (the file's name order may
    // interleave its tensors with others: `k_proj`, `o_proj`, `q_proj`, `v_proj`).
    let mut metas = Vec::new();
    // Per HF tensor: its parameter (index into `params`) and its index among the parameter's.
    let mut sources = Vec::new();
    let mut params = Vec::new();
    for (prefix, set) in [
        (EXPORT_VISION_PREFIX, &weights.vision),
        (EXPORT_PROJECTOR_PREFIX, &weights.projector),
        (EXPORT_LLM_PREFIX, &weights.llm),
    ] {
        for (spec, buf) in set.specs.iter().zip(&set.bufs) {
            for (k, t) in spec.hf_tensors().into_iter().enumerate() {
                metas.push(TensorMeta { name: format!("{prefix}{}", t.name), shape: t.shape });
                sources.push((params.len(), k));
            }
            params.push((spec, buf));
        }
    }
    let mut left: Vec<usize> = params.iter().map(|(s, _)| s.hf_tensors().len()).collect();
    let mut held: std::collections::HashMap<usize, Vec<f32>> = std::collections::HashMap::new();
    write_safetensors_streamed(&tmp.path().join("model.safetensors"), &metas, opts.dtype, &[("format", "pt")], |i| {
        let (p, k) = sources[i];
        let (spec, buf) = params[p];
        left[p] -= 1;
        if !spec.is_stacked() {
            return be.download(buf);
        }
        let values = match held.remove(&p) {
            Some(v) => v,
            None => be.download(buf)?,
        };
        let part = spec.split(&values)?.get(k).map(|(_, v)| v.to_vec());
        let part = part.with_context(|| format!("parameter {} has no tensor {k}", spec.name))?;
        if left[p] > 0 {
            held.insert(p, values);
        }
        Ok(part)
    })?;

    write_json(&tmp.path().join("config.json"), &llava_config_json(mllm, image_token_id, opts.dtype)?)?;
    let size = mllm.vision.cfg.image_size as u32;
    let processor = match &opts.image_processor {
        Some(p) => {
            ensure!(
                p.height == size && p.width == size,
                "the image processor resizes to {}×{}, but the vision tower takes {size}×{size} images",
                p.height,
                p.width
            );
            p.clone()
        }
        None => ImageProcessorConfig { height: size, width: size, ..ImageProcessorConfig::siglip() },
    };
    write_json(&tmp.path().join(PREPROCESSOR_CONFIG_FILE), &preprocessor_json(&processor))?;

    let mut generation = json!({"transformers_version": TRANSFORMERS_LAYOUT_VERSION});
    if let Some(src) = opts.tokenizer {
        let (eos, bos) = write_tokenizer(src, tmp.path(), image_token_id, mllm.llm.cfg.arch)?;
        let g = generation.as_object_mut().expect("a JSON object");
        if let Some(eos) = eos {
            g.insert("eos_token_id".into(), json!(eos));
            g.insert("pad_token_id".into(), json!(eos));
        }
        if let Some(bos) = bos {
            g.insert("bos_token_id".into(), json!(bos));
        }
        write_json(
            &tmp.path().join("processor_config.json"),
            &json!({
                "image_token": IMAGE_TAG,
                "num_additional_image_tokens": 0,
                "patch_size": mllm.vision.cfg.patch_size,
                "processor_class": "LlavaProcessor",
                "vision_feature_select_strategy": match mllm.select { FeatureSelect::Patch => "default", FeatureSelect::Full => "full" },
            }),
        )?;
    }
    write_json(&tmp.path().join("generation_config.json"), &generation)?;

    let files = tmp.commit()?;
    Ok(ExportSummary { image_token_id, tensors: metas.len(), files })
}

/// Where a layout keeps each part's tensors.
struct Names {
    /// Source name of an LLM spec name (`model.…` or `lm_head.weight`).
    llm: fn(&str) -> String,
    vision_prefix: &'static str,
    /// Source name of a projector spec name (`linear_1.weight`, …).
    projector: fn(&str) -> String,
}

fn hf_llm_saved(n: &str) -> String {
    format!("language_model.{n}")
}
fn hf_llm_modules(n: &str) -> String {
    match n.strip_prefix("model.") {
        Some(rest) => format!("model.language_model.{rest}"),
        None => n.to_string(),
    }
}
fn hf_projector_saved(n: &str) -> String {
    format!("multi_modal_projector.{n}")
}
fn hf_projector_modules(n: &str) -> String {
    format!("model.multi_modal_projector.{n}")
}
fn tinyllava_connector(n: &str) -> String {
    let n = n.replacen("linear_1.", "0.", 1).replacen("linear_2.", "2.", 1);
    format!("connector._connector.{n}")
}

/// Finds which of `candidates` a probe tensor exists under.
fn find<T: Copy>(source: &WeightSource, candidates: &[T], probe: impl Fn(T) -> String) -> Option<T> {
    candidates.iter().copied().find(|&c| source.info(&probe(c)).is_some())
}

/// Reads a single-folder LLaVA checkpoint onto `be`: an HF `LlavaForConditionalGeneration` folder
/// (what [`export_llava`] writes, or what transformers 4.x/5.x writes) or TinyLLaVA_Factory's
/// folder. Errors name the folder and what is missing or unsupported.
pub fn load_llava<B: Backend>(be: &B, dir: &Path) -> Result<LoadedLlava<B::Buf>> {
    let cfg_path = dir.join("config.json");
    ensure!(cfg_path.is_file(), "{}: no config.json (not a LLaVA checkpoint folder)", dir.display());
    let json = read_json(&cfg_path)?;
    let what = cfg_path.display().to_string();
    let f = JsonFields { what: what.clone(), obj: &json };
    let layout = match f.str("model_type") {
        Some("llava") => LlavaLayout::HfLlava,
        Some("tinyllava") => LlavaLayout::TinyLlava,
        Some(other) => bail!(
            "{what}: unknown checkpoint layout, model_type \"{other}\"; kd-engine reads single-folder \
             LLaVA checkpoints: \"llava\" (Hugging Face LlavaForConditionalGeneration) or \"tinyllava\" (TinyLLaVA_Factory)"
        ),
        None => bail!("{what}: unknown checkpoint layout (no \"model_type\"); expected \"llava\" or \"tinyllava\""),
    };

    // Nested configs.
    let text = f.get("text_config").with_context(|| format!("{what}: no \"text_config\" (the language model's config)"))?;
    let mut llm_cfg = LlmConfig::from_json(text, &format!("{what}: text_config"))?;
    let vision = f.get("vision_config").with_context(|| format!("{what}: no \"vision_config\""))?;
    match vision.get("model_type").and_then(Value::as_str) {
        Some("siglip_vision_model") => {}
        other => bail!(
            "{what}: vision_config model_type {} is not supported; kd-engine's vision tower is SigLIP (siglip_vision_model)",
            other.map_or("(absent: transformers then assumes clip_vision_model)".to_string(), |s| format!("\"{s}\""))
        ),
    }
    let vision_cfg = VisionConfig::from_json(vision, &format!("{what}: vision_config"))?;
    let feature_layer = match f.get("vision_feature_layer") {
        None => -2,
        Some(v) => v.as_i64().with_context(|| {
            format!("{what}: vision_feature_layer must be one integer, found {v} (several layers are not supported)")
        })?,
    };
    let strategy = f.str("vision_feature_select_strategy");
    let select = match (layout, strategy) {
        (LlavaLayout::HfLlava, None | Some("default")) | (LlavaLayout::TinyLlava, None | Some("patch")) => FeatureSelect::Patch,
        (LlavaLayout::HfLlava, Some("full")) | (LlavaLayout::TinyLlava, Some("cls_patch")) => FeatureSelect::Full,
        (_, Some(other)) => bail!("{what}: vision_feature_select_strategy \"{other}\" is not supported"),
    };
    let image_token_id = match layout {
        LlavaLayout::HfLlava => {
            // transformers 5 writes image_token_index; image_token_id is the attribute's new name.
            let key = ["image_token_index", "image_token_id"].into_iter().find(|k| f.get(k).is_some());
            let id = match key {
                Some(k) => f.usize(k)?,
                None => 32000, // LlavaConfig's default
            };
            ensure!(id < llm_cfg.vocab, "{what}: image token id {id} is outside the {}-row embedding matrix", llm_cfg.vocab);
            if let Some(act) = f.str("projector_hidden_act") {
                ensure!(act == "gelu", "{what}: projector_hidden_act \"{act}\" is not supported (gelu, i.e. mlp2x_gelu)");
            }
            ensure!(f.bool_or("multimodal_projector_bias", true)?, "{what}: a projector without biases is not supported");
            // transformers 5.17 ties the LM head when either flag says so.
            llm_cfg.tie_embeddings |= f.bool_or("tie_word_embeddings", false)?;
            Some(id as u32)
        }
        LlavaLayout::TinyLlava => {
            let connector = f.str("connector_type").unwrap_or("(absent)");
            ensure!(
                connector == "mlp2x_gelu",
                "{what}: connector_type \"{connector}\" is not supported; kd-engine's projector is mlp2x_gelu"
            );
            None
        }
    };

    let source = WeightSource::open(dir).with_context(|| format!("{}: reading the weights", dir.display()))?;
    let names = match layout {
        LlavaLayout::HfLlava => {
            let llm = find(&source, &[hf_llm_saved as fn(&str) -> String, hf_llm_modules], |n| n("model.embed_tokens.weight"))
                .with_context(|| {
                    format!(
                        "{}: no language model weights (looked for language_model.model.embed_tokens.weight and \
                         model.language_model.embed_tokens.weight)",
                        source.describe()
                    )
                })?;
            let projector = find(&source, &[hf_projector_saved as fn(&str) -> String, hf_projector_modules], |n| n("linear_1.weight"))
                .with_context(|| {
                    format!(
                        "{}: no projector weights (looked for multi_modal_projector.linear_1.weight and \
                         model.multi_modal_projector.linear_1.weight)",
                        source.describe()
                    )
                })?;
            let prefixes = ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.", "model.vision_tower."];
            let vision_prefix = find(&source, &prefixes, |p| format!("{p}embeddings.patch_embedding.weight")).with_context(|| {
                format!("{}: no vision tower weights (looked for vision_tower[.vision_model].embeddings.patch_embedding.weight)", source.describe())
            })?;
            Names { llm, vision_prefix, projector }
        }
        LlavaLayout::TinyLlava => {
            ensure!(
                source.info("language_model.model.embed_tokens.weight").is_some(),
                "{}: no language model weights (looked for language_model.model.embed_tokens.weight)",
                source.describe()
            );
            ensure!(
                source.info("connector._connector.0.weight").is_some(),
                "{}: no projector weights (looked for connector._connector.0.weight of an mlp2x_gelu connector)",
                source.describe()
            );
            let prefixes = ["vision_tower._vision_tower.vision_model.", "vision_tower._vision_tower."];
            let vision_prefix = find(&source, &prefixes, |p| format!("{p}embeddings.patch_embedding.weight")).with_context(|| {
                format!(
                    "{}: no vision tower weights (looked for vision_tower._vision_tower[.vision_model].embeddings.patch_embedding.weight)",
                    source.describe()
                )
            })?;
            Names { llm: hf_llm_saved, vision_prefix, projector: tinyllava_connector }
        }
    };

    let llm = Llm::new(llm_cfg);
    let tower = VisionTower::new(vision_cfg);
    let mllm = Mllm::new(tower, llm, feature_layer, select).with_context(|| format!("{what}: vision_feature_layer"))?;
    let d = dir.display();
    let vision = ParamSet::load_named(be, &mllm.vision.specs, &source, |n| format!("{}{n}", names.vision_prefix))
        .with_context(|| format!("{d}: loading the vision tower"))?;
    let projector = ParamSet::load_named(be, &mllm.projector.specs, &source, names.projector).with_context(|| format!("{d}: loading the projector"))?;
    let llm_w = ParamSet::load_named(be, &mllm.llm.specs, &source, names.llm).with_context(|| format!("{d}: loading the language model"))?;
    let image_processor = ImageProcessorConfig::for_tower(dir, mllm.vision.cfg.image_size)?;
    Ok(LoadedLlava { mllm, weights: MllmWeights { vision, projector, llm: llm_w }, layout, image_token_id, image_processor })
}

/// Logits `[T, vocab]` of one sequence through the whole MLLM: the positions holding
/// `image_token_id` (one contiguous block of [`Mllm::visual_tokens`]) receive the projected
/// features of `image` (`[3, H, W]`, preprocessed); without an image no id may be `image_token_id`.
/// The HF convention: `input_ids` already hold the expanded `<image>` tokens.
pub fn mllm_logits<B: Backend>(
    be: &B,
    mllm: &Mllm,
    weights: &MllmWeights<B::Buf>,
    ids: &[u32],
    image: Option<&[f32]>,
    image_token_id: u32,
) -> Result<Vec<f32>> {
    ensure!(!ids.is_empty(), "no input ids: at least one token is needed");
    let vocab = mllm.llm.cfg.vocab;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("input id {bad} is outside the vocabulary of {vocab}");
    }
    let groups: Vec<Group> = ids.iter().map(|&id| if id == image_token_id { Group::Visual } else { Group::Prompt }).collect();
    let batch = PackedBatch {
        ids: ids.to_vec(),
        groups,
        positions: (0..ids.len() as u32).collect(),
        seq_lens: vec![ids.len()],
        images: vec![image.map(|_| 0)],
        pixel_values: image.map(|p| vec![p.to_vec()]).unwrap_or_default(),
    };
    let features = match image {
        Some(_) => Some(mllm.encode_images(be, &weights.vision, &batch.pixel_values)?),
        None => None,
    };
    let hidden = mllm.hidden_states(be, weights, &batch, features)?;
    let logits = mllm.llm.lm_head(be, &weights.llm, &hidden)?;
    be.download(&logits)
}
