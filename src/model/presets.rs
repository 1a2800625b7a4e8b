//! Real model shapes (SPEC §2) as presets, and randomly initialised checkpoints of them written in
//! Hugging Face layout, so smoke tests and benchmarks need no downloads.
//!
//! * [`Preset`]: the Qwen decoders (Qwen1.5 0.5B/1.8B/4B, Qwen2.5 0.5B/3B/7B) and the SigLIP
//!   so400m vision tower, with the shapes of their published `config.json` files and the
//!   parameter counts their model cards give; two hidden `tiny-*` presets for tests.
//! * [`Preset::scaled`]: the same architecture divided by a factor (heads, intermediate size,
//!   layers, vocabulary; head dimension kept), for CPU smoke tests of the real-shape code paths.
//! * [`write_preset`]: `config.json` as transformers writes it, `model.safetensors` (or shards of
//!   at most `max_shard_bytes` with `model.safetensors.index.json`, as `save_pretrained` does), and
//!   `generation_config.json` / `preprocessor_config.json`. Tensors are generated and written one
//!   at a time, so a 4B model never sits whole in memory (the largest single tensor, an embedding
//!   table, does: 152064 × 3584 f32 values = 2.2 GB for Qwen2.5-7B).
//! * [`init_values`]: the initialisation, a pure function of (seed, tensor name, element index):
//!   normal(0, 0.02) for matrices and embeddings (transformers' `initializer_range`), ones for norm
//!   weights, zeros for biases. A benchmark that creates "the same random weights directly on the
//!   device" calls it per tensor, in any order, and gets the very values `init` writes.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};

use super::config::{Arch, LlmConfig};
use super::export::{text_config_json, vision_config_json, TRANSFORMERS_LAYOUT_VERSION};
use super::llm::Llm;
use super::params::ParamSpec;
use super::vision::{VisionConfig, VisionTower};
use crate::backend::GeluKind;
use crate::weights::{write_json, write_safetensors_streamed, StagedDir, StoreDtype, TensorMeta};

/// Standard deviation of the random matrices (transformers' `initializer_range` for Qwen2).
pub const INIT_STD: f64 = 0.02;
/// Largest shard `init` writes by default: 5 GB, transformers 4.x's `max_shard_size` default.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;
/// Prefix of a `SiglipVisionModel`'s tensors, as the published checkpoints store them.
pub const SIGLIP_PREFIX: &str = "vision_model.";

/// What a preset builds.
#[derive(Clone, Debug, PartialEq)]
pub enum PresetModel {
    /// A `Qwen2ForCausalLM` decoder.
    Llm(LlmConfig),
    /// A `SiglipVisionModel` (with its attention-pooling head, as the published checkpoint has it;
    /// LLaVA never runs the head).
    Vision(VisionConfig),
}

/// A named real model shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// The Hugging Face repository whose `config.json` the shape comes from.
    pub source: &'static str,
    pub model: PresetModel,
    /// Parameter count as the model card states it (`None` for the test presets).
    pub published_params: Option<u64>,
    /// `max_position_embeddings` of the published config (sizes caches only; RoPE is unscaled).
    pub max_positions: usize,
    /// Test presets are not listed by `init --list`.
    pub hidden: bool,
}

/// Qwen bos/eos id (`<|endoftext|>`) in the published base-model configs.
const QWEN_ENDOFTEXT: u32 = 151643;

#[allow(clippy::too_many_arguments)]
fn qwen(
    name: &'static str,
    source: &'static str,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    tied: bool,
    rope_theta: f64,
    vocab: usize,
    published: u64,
    max_positions: usize,
) -> Preset {
    Preset {
        name,
        source,
        model: PresetModel::Llm(LlmConfig {
            arch: Arch::Qwen2,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            vocab,
            rms_eps: 1e-6,
            rope_theta,
            tie_embeddings: tied,
            qkv_bias: true,
            o_bias: false,
        }),
        published_params: Some(published),
        max_positions,
        hidden: false,
    }
}

/// SigLIP so400m-patch14-384's vision tower.
pub fn siglip_so400m() -> VisionConfig {
    VisionConfig {
        hidden: 1152,
        intermediate: 4304,
        layers: 27,
        heads: 16,
        channels: 3,
        image_size: 384,
        patch_size: 14,
        ln_eps: 1e-6,
        act: GeluKind::Tanh,
    }
}

/// Every preset, listed ones first. Shapes: SPEC §2 (from the published `config.json` files);
/// parameter counts: the model cards (Qwen1.5-0.5B 464M with tied embeddings, Qwen2.5-0.5B 494M,
/// SigLIP-so400m's vision tower 428M with its pooling head).
pub fn all() -> Vec<Preset> {
    const V: usize = 151936;
    let mut out = vec![
        qwen("qwen1.5-0.5b", "Qwen/Qwen1.5-0.5B", 1024, 2816, 24, 16, 16, true, 1e6, V, 464_000_000, 32768),
        qwen("qwen1.5-1.8b", "Qwen/Qwen1.5-1.8B", 2048, 5504, 24, 16, 16, false, 1e6, V, 1_840_000_000, 32768),
        qwen("qwen1.5-4b", "Qwen/Qwen1.5-4B", 2560, 6912, 40, 20, 20, false, 5e6, V, 3_950_000_000, 32768),
        qwen("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, true, 1e6, V, 494_000_000, 32768),
        qwen("qwen2.5-3b", "Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, true, 1e6, V, 3_090_000_000, 32768),
        qwen("qwen2.5-7b", "Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, false, 1e6, 152064, 7_620_000_000, 131072),
        Preset {
            name: "siglip-so400m-patch14-384",
            source: "google/siglip-so400m-patch14-384",
            model: PresetModel::Vision(siglip_so400m()),
            published_params: Some(428_000_000),
            max_positions: 0,
            hidden: false,
        },
    ];
    // Test presets: seconds to write, loadable by the real loaders.
    let mut tiny = qwen("tiny-qwen2", "(test)", 64, 96, 2, 4, 2, false, 1e6, 1000, 0, 2048);
    tiny.published_params = None;
    tiny.hidden = true;
    out.push(tiny);
    out.push(Preset {
        name: "tiny-siglip",
        source: "(test)",
        model: PresetModel::Vision(VisionConfig {
            hidden: 48,
            intermediate: 80,
            layers: 3,
            heads: 4,
            channels: 3,
            image_size: 28,
            patch_size: 7,
            ln_eps: 1e-6,
            act: GeluKind::Tanh,
        }),
        published_params: None,
        max_positions: 0,
        hidden: true,
    });
    out
}

/// The preset called `name` (listed or hidden); the error lists the listed ones.
pub fn find(name: &str) -> Result<Preset> {
    let all = all();
    match all.iter().find(|p| p.name.eq_ignore_ascii_case(name)) {
        Some(p) => Ok(p.clone()),
        None => {
            let names: Vec<&str> = all.iter().filter(|p| !p.hidden).map(|p| p.name).collect();
            bail!("unknown preset \"{name}\"; the presets are: {}", names.join(", "))
        }
    }
}

/// `cfg` divided by `s` for CPU smoke tests: heads and key/value heads ÷ s (at least 1, the
/// grouping kept valid), head dimension kept, intermediate size and vocabulary ÷ s, layers ÷ s
/// (at least 1). `s = 1` returns `cfg` unchanged.
pub fn scale_llm(cfg: &LlmConfig, s: usize) -> LlmConfig {
    if s <= 1 {
        return cfg.clone();
    }
    let heads = (cfg.heads / s).max(1);
    let mut kv_heads = (cfg.kv_heads / s).max(1).min(heads);
    while heads % kv_heads != 0 {
        kv_heads -= 1;
    }
    LlmConfig {
        hidden: heads * cfg.head_dim,
        intermediate: (cfg.intermediate / s).max(1),
        layers: (cfg.layers / s).max(1),
        heads,
        kv_heads,
        vocab: (cfg.vocab / s).max(2),
        ..cfg.clone()
    }
}

/// A vision config divided by `s`: heads ÷ s (head dimension kept), intermediate size ÷ s, layers
/// ÷ s (at least 2, so `hidden_states[-2]` is a real block), the patch grid ÷ √s (at least 2×2).
pub fn scale_vision(cfg: &VisionConfig, s: usize) -> VisionConfig {
    if s <= 1 {
        return cfg.clone();
    }
    let heads = (cfg.heads / s).max(1);
    let grid = ((cfg.image_size / cfg.patch_size) as f64 / (s as f64).sqrt()).round().max(2.0) as usize;
    VisionConfig {
        hidden: heads * cfg.head_dim(),
        intermediate: (cfg.intermediate / s).max(1),
        layers: (cfg.layers / s).max(2),
        heads,
        image_size: grid * cfg.patch_size,
        ..cfg.clone()
    }
}

impl Preset {
    /// The preset scaled down by `s` (see [`scale_llm`], [`scale_vision`]); named `NAME/sS`.
    pub fn scaled(&self, s: usize) -> Preset {
        if s <= 1 {
            return self.clone();
        }
        let model = match &self.model {
            PresetModel::Llm(c) => PresetModel::Llm(scale_llm(c, s)),
            PresetModel::Vision(c) => PresetModel::Vision(scale_vision(c, s)),
        };
        Preset { model, published_params: None, hidden: true, ..self.clone() }
    }

    pub fn kind(&self) -> &'static str {
        match self.model {
            PresetModel::Llm(_) => "Qwen2ForCausalLM",
            PresetModel::Vision(_) => "SiglipVisionModel",
        }
    }

    /// The tensors of the checkpoint, by their names in the file, in module order: Hugging Face
    /// tensors, each a plain spec (a parameter stacking several gives each of them).
    pub fn tensors(&self) -> Vec<ParamSpec> {
        let hf = |specs: &[ParamSpec]| specs.iter().flat_map(ParamSpec::hf_specs).collect::<Vec<_>>();
        match &self.model {
            PresetModel::Llm(c) => hf(&Llm::new(c.clone()).specs),
            PresetModel::Vision(c) => {
                let mut specs: Vec<ParamSpec> = hf(&VisionTower::new(c.clone()).specs)
                    .into_iter()
                    .map(|s| ParamSpec { name: format!("{SIGLIP_PREFIX}{}", s.name), ..s })
                    .collect();
                specs.extend(siglip_head_specs(c));
                specs
            }
        }
    }

    /// Parameters of the whole checkpoint (for SigLIP: with the pooling head).
    pub fn param_count(&self) -> u64 {
        self.tensors().iter().map(|s| s.numel() as u64).sum()
    }

    /// Parameters the LLaVA path uses (SigLIP without its pooling head; a decoder: all).
    pub fn llava_param_count(&self) -> u64 {
        match &self.model {
            PresetModel::Llm(_) => self.param_count(),
            PresetModel::Vision(c) => VisionTower::new(c.clone()).specs.iter().map(|s| s.numel() as u64).sum(),
        }
    }

    /// `config.json` as transformers 5.17 writes it for this model (plus the 4.x-readable
    /// `rope_theta` and `head_dim`): the fields the LLaVA export writes for the same config, with
    /// the standalone model's own.
    pub fn config_json(&self, dtype: StoreDtype) -> Result<Value> {
        let (mut v, own) = match &self.model {
            PresetModel::Llm(c) => (
                text_config_json(c, self.max_positions)?,
                json!({
                    "architectures": ["Qwen2ForCausalLM"],
                    "bos_token_id": QWEN_ENDOFTEXT,
                    "eos_token_id": QWEN_ENDOFTEXT,
                    "initializer_range": INIT_STD,
                }),
            ),
            PresetModel::Vision(c) => (vision_config_json(c), json!({ "architectures": ["SiglipVisionModel"], "vision_use_head": true })),
        };
        let obj = v.as_object_mut().context("a config is a JSON object")?;
        for (k, x) in own.as_object().into_iter().flatten() {
            obj.insert(k.clone(), x.clone());
        }
        obj.insert("dtype".into(), json!(dtype.torch_name()));
        obj.insert("transformers_version".into(), json!(TRANSFORMERS_LAYOUT_VERSION));
        Ok(v)
    }

    /// A one-line description of the shape.
    pub fn describe(&self) -> String {
        match &self.model {
            PresetModel::Llm(c) => format!(
                "hidden {}, intermediate {}, {} layers, {} heads / {} kv heads (head dim {}), vocab {}, {}, rope_theta {:e}",
                c.hidden,
                c.intermediate,
                c.layers,
                c.heads,
                c.kv_heads,
                c.head_dim,
                c.vocab,
                if c.tie_embeddings { "tied" } else { "untied" },
                c.rope_theta
            ),
            PresetModel::Vision(c) => format!(
                "hidden {}, intermediate {}, {} layers, {} heads, image {}, patch {} ({} tokens)",
                c.hidden,
                c.intermediate,
                c.layers,
                c.heads,
                c.image_size,
                c.patch_size,
                c.tokens()
            ),
        }
    }
}

/// The `SiglipMultiheadAttentionPoolingHead` of a `SiglipVisionModel` (`vision_use_head` true).
fn siglip_head_specs(c: &VisionConfig) -> Vec<ParamSpec> {
    let (d, i) = (c.hidden, c.intermediate);
    let p = |s: &str| format!("{SIGLIP_PREFIX}head.{s}");
    vec![
        ParamSpec::plain(p("probe"), vec![1, 1, d], true),
        ParamSpec::matrix(p("attention.in_proj_weight"), 3 * d, d),
        ParamSpec::vector(p("attention.in_proj_bias"), 3 * d),
        ParamSpec::matrix(p("attention.out_proj.weight"), d, d),
        ParamSpec::vector(p("attention.out_proj.bias"), d),
        ParamSpec::vector(p("layernorm.weight"), d),
        ParamSpec::vector(p("layernorm.bias"), d),
        ParamSpec::matrix(p("mlp.fc1.weight"), i, d),
        ParamSpec::vector(p("mlp.fc1.bias"), i),
        ParamSpec::matrix(p("mlp.fc2.weight"), d, i),
        ParamSpec::vector(p("mlp.fc2.bias"), d),
    ]
}

/// Shortest decimal of an f32 (1e-6, not 9.99999997e-7), as a JSON number.
/// How a tensor is initialised, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitKind {
    Zeros,
    Ones,
    /// normal(0, [`INIT_STD`]).
    Normal,
}

/// Biases are zero, norm weights one, everything else normal(0, 0.02).
pub fn init_kind(name: &str) -> InitKind {
    if name.ends_with(".bias") || name.ends_with("_bias") {
        InitKind::Zeros
    } else if name.ends_with(".weight") && name.rsplit('.').nth(1).is_some_and(|m| m.contains("norm")) {
        InitKind::Ones
    } else {
        InitKind::Normal
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Uniform in (0, 1] from a counter.
fn unit(key: u64, i: u64) -> f64 {
    ((splitmix(key ^ splitmix(i)) >> 11) as f64 + 1.0) / (1u64 << 53) as f64
}

/// The initial values of tensor `name` (`numel` elements): a pure function of (seed, name,
/// index), computed in parallel; any order of tensors, any device, gets the same values.
pub fn init_values(seed: u64, name: &str, numel: usize) -> Vec<f32> {
    match init_kind(name) {
        InitKind::Zeros => vec![0.0; numel],
        InitKind::Ones => vec![1.0; numel],
        InitKind::Normal => {
            let key = splitmix(seed ^ splitmix(name_hash(name)));
            let mut out = vec![0f32; numel];
            // Box–Muller on pairs: element 2p and 2p+1 come from the uniforms of pair p.
            out.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
                let base = (c as u64) << 16;
                for (j, pair) in chunk.chunks_mut(2).enumerate() {
                    let p = (base >> 1) + j as u64;
                    let r = (-2.0 * unit(key, 2 * p).ln()).sqrt() * INIT_STD;
                    let a = std::f64::consts::TAU * unit(key, 2 * p + 1);
                    pair[0] = (r * a.cos()) as f32;
                    if pair.len() > 1 {
                        pair[1] = (r * a.sin()) as f32;
                    }
                }
            });
            out
        }
    }
}

/// How [`write_preset`] writes a checkpoint.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub seed: u64,
    pub dtype: StoreDtype,
    /// Largest shard file; a larger checkpoint is sharded with an index, as `save_pretrained` does.
    pub max_shard_bytes: u64,
    /// A `tokenizer.json` (or a folder holding one and maybe `tokenizer_config.json`) to copy in.
    pub tokenizer: Option<PathBuf>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { seed: 0, dtype: StoreDtype::Bf16, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, tokenizer: None }
    }
}

/// What [`write_preset`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct InitSummary {
    pub params: u64,
    pub tensors: usize,
    /// Weight files (one, or the shards).
    pub shards: Vec<String>,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Every file in the folder.
    pub files: Vec<String>,
}

/// Groups tensors (in module order) into shards of at most `max` bytes, as transformers'
/// `split_torch_state_dict_into_shards` does: a new shard starts when the next tensor would not
/// fit; a tensor larger than `max` gets a shard of its own.
pub fn plan_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current = 0u64;
    for (i, &b) in sizes.iter().enumerate() {
        match shards.last_mut() {
            Some(last) if current + b <= max => {
                last.push(i);
                current += b;
            }
            _ => {
                shards.push(vec![i]);
                current = b;
            }
        }
    }
    shards
}

/// Parses a shard size like transformers does: `5GB` (10⁹), `500MB`, `2GiB`, `1000` (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("size \"{s}\": expected a number with an optional unit, e.g. 5GB"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        other => bail!("size \"{s}\": unknown unit \"{other}\" (B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = (n * mult as f64).round();
    ensure!(bytes >= 1.0, "size \"{s}\" must be at least one byte");
    Ok(bytes as u64)
}

/// Writes `preset` with random weights into `dir` (which must not exist or be empty), atomically:
/// into a temporary sibling, then renamed. See the module documentation for the files.
pub fn write_preset(preset: &Preset, dir: &Path, opts: &InitOptions) -> Result<InitSummary> {
    ensure!(opts.max_shard_bytes > 0, "the largest shard size must be positive");
    let tmp = StagedDir::new(dir, "output folder", "init")?;

    let specs = preset.tensors();
    let elem_bytes: u64 = match opts.dtype {
        StoreDtype::F32 => 4,
        StoreDtype::Bf16 | StoreDtype::F16 => 2,
    };
    let sizes: Vec<u64> = specs.iter().map(|s| s.numel() as u64 * elem_bytes).collect();
    let total_bytes: u64 = sizes.iter().sum();
    let plan = plan_shards(&sizes, opts.max_shard_bytes);
    let n_shards = plan.len();
    let mut shard_names = Vec::with_capacity(n_shards);
    let mut weight_map = serde_json::Map::new();
    for (k, idx) in plan.iter().enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n_shards)
        };
        let metas: Vec<TensorMeta> = idx.iter().map(|&i| TensorMeta { name: specs[i].name.clone(), shape: specs[i].shape.clone() }).collect();
        write_safetensors_streamed(&tmp.path().join(&file), &metas, opts.dtype, &[("format", "pt")], |j| {
            let s = &specs[idx[j]];
            Ok(init_values(opts.seed, &s.name, s.numel()))
        })?;
        for &i in idx {
            weight_map.insert(specs[i].name.clone(), json!(file));
        }
        shard_names.push(file);
    }
    if n_shards > 1 {
        let mut sorted: Vec<(String, Value)> = weight_map.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        write_json(
            &tmp.path().join("model.safetensors.index.json"),
            &json!({
                "metadata": {"total_parameters": preset.param_count(), "total_size": total_bytes},
                "weight_map": serde_json::Map::from_iter(sorted),
            }),
        )?;
    }
    write_json(&tmp.path().join("config.json"), &preset.config_json(opts.dtype)?)?;
    match &preset.model {
        PresetModel::Llm(_) => write_json(
            &tmp.path().join("generation_config.json"),
            &json!({
                "bos_token_id": QWEN_ENDOFTEXT,
                "eos_token_id": QWEN_ENDOFTEXT,
                "transformers_version": TRANSFORMERS_LAYOUT_VERSION,
            }),
        )?,
        PresetModel::Vision(c) => write_json(
            &tmp.path().join(crate::data::PREPROCESSOR_CONFIG_FILE),
            &json!({
                "do_convert_rgb": null,
                "do_normalize": true,
                "do_rescale": true,
                "do_resize": true,
                "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "SiglipImageProcessor",
                "image_std": [0.5, 0.5, 0.5],
                "resample": 3,
                "rescale_factor": 1.0 / 255.0,
                "size": {"height": c.image_size, "width": c.image_size},
            }),
        )?,
    }
    if let Some(src) = &opts.tokenizer {
        let (json_src, cfg_src) = if src.is_dir() {
            (src.join("tokenizer.json"), Some(src.join("tokenizer_config.json")).filter(|p| p.is_file()))
        } else {
            (src.clone(), None)
        };
        ensure!(json_src.is_file(), "--tokenizer {}: no tokenizer.json there", src.display());
        std::fs::copy(&json_src, tmp.path().join("tokenizer.json")).with_context(|| format!("copying {}", json_src.display()))?;
        if let Some(c) = cfg_src {
            std::fs::copy(&c, tmp.path().join("tokenizer_config.json")).with_context(|| format!("copying {}", c.display()))?;
        }
    }

    let files = tmp.commit()?;
    Ok(InitSummary { params: preset.param_count(), tensors: specs.len(), shards: shard_names, bytes: total_bytes, files })
}

/// Human-readable parameter count: 463.99M, 3.95B.
pub fn human_count(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}
