//! The SigLIP vision tower (`SiglipVisionModel`): patch embedding (a convolution with stride =
//! kernel, computed as one GEMM over flattened patches), learned position embeddings, pre-LN encoder
//! blocks with bidirectional attention and a `gelu_pytorch_tanh` MLP, post-layernorm.
//!
//! It is frozen in every LLaVA-KD stage, so it runs forward only and saves nothing; the LLaVA path
//! stops at the feature layer it needs (HF `hidden_states[-2]` skips the last block entirely).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::config::{read_json, JsonFields};
use super::params::{ParamId, ParamSet, ParamSpec};
use crate::backend::{AttnShape, Backend, GeluKind, Gemm};
use crate::weights::WeightSource;

#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub ln_eps: f32,
    pub act: GeluKind,
}

impl VisionConfig {
    /// Tokens per image: one per patch (SigLIP has no class token).
    pub fn tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Reads `dir/config.json`: a `SiglipVisionModel` config, or a dual-tower `SiglipModel` one
    /// whose `vision_config` is nested (fields left at their defaults are absent there).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        let what = path.display().to_string();
        let vision = match json.get("model_type").and_then(Value::as_str) {
            Some("siglip_vision_model") => &json,
            Some("siglip") | Some("llava") => json
                .get("vision_config")
                .with_context(|| format!("{what}: a {} config without \"vision_config\"", json["model_type"]))?,
            Some(other) => bail!("{what}: model_type \"{other}\" is not a SigLIP vision tower (siglip_vision_model or siglip)"),
            None => bail!("{what}: no \"model_type\""),
        };
        Self::from_json(vision, &what)
    }

    /// Parses a SigLIP vision config object, with `SiglipVisionConfig`'s class defaults.
    pub fn from_json(v: &Value, what: &str) -> Result<Self> {
        let f = JsonFields { what: what.to_string(), obj: v };
        let act = match f.str("hidden_act").unwrap_or("gelu_pytorch_tanh") {
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => GeluKind::Tanh,
            "gelu" => GeluKind::Erf,
            other => bail!("{what}: vision hidden_act \"{other}\" is not supported (gelu or gelu_pytorch_tanh)"),
        };
        let cfg = VisionConfig {
            hidden: f.usize_or("hidden_size", Some(768))?,
            intermediate: f.usize_or("intermediate_size", Some(3072))?,
            layers: f.usize_or("num_hidden_layers", Some(12))?,
            heads: f.usize_or("num_attention_heads", Some(12))?,
            channels: f.usize_or("num_channels", Some(3))?,
            image_size: f.usize_or("image_size", Some(224))?,
            patch_size: f.usize_or("patch_size", Some(16))?,
            ln_eps: f.f64_or("layer_norm_eps", 1e-6)? as f32,
            act,
        };
        ensure!(cfg.heads > 0 && cfg.hidden % cfg.heads == 0, "{what}: hidden_size {} is not a multiple of {} heads", cfg.hidden, cfg.heads);
        // The patch convolution (stride = kernel) covers floor(image / patch) patches per side and
        // drops the remainder, as PyTorch's Conv2d does: so400m-patch14-384 has 27×27 patches and
        // leaves the last 384 − 378 = 6 pixel rows and columns unused.
        ensure!(
            cfg.patch_size > 0 && cfg.image_size >= cfg.patch_size,
            "{what}: image_size {} is smaller than patch_size {}",
            cfg.image_size,
            cfg.patch_size
        );
        Ok(cfg)
    }
}

struct BlockIds {
    ln1_w: ParamId,
    ln1_b: ParamId,
    q_w: ParamId,
    q_b: ParamId,
    k_w: ParamId,
    k_b: ParamId,
    v_w: ParamId,
    v_b: ParamId,
    o_w: ParamId,
    o_b: ParamId,
    ln2_w: ParamId,
    ln2_b: ParamId,
    fc1_w: ParamId,
    fc1_b: ParamId,
    fc2_w: ParamId,
    fc2_b: ParamId,
}

pub struct VisionTower {
    pub cfg: VisionConfig,
    pub specs: Vec<ParamSpec>,
    patch_w: ParamId,
    patch_b: ParamId,
    pos: ParamId,
    blocks: Vec<BlockIds>,
    post_w: ParamId,
    post_b: ParamId,
}

/// Hidden states of a batch of images, HF `hidden_states` style.
pub struct VisionOutput<Buf> {
    /// `hidden_states[0..=upto]`: index 0 is the embeddings, index l the output of block l;
    /// each `[images · tokens, hidden]`.
    pub hidden_states: Vec<Buf>,
    /// Post-layernorm of the last block's output, when all blocks ran.
    pub last_hidden_state: Option<Buf>,
}

impl VisionTower {
    pub fn new(cfg: VisionConfig) -> Self {
        let mut specs = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| {
            let decay = shape.len() > 1;
            specs.push(ParamSpec::plain(name, shape, decay));
            ParamId(specs.len() - 1)
        };
        let (d, i, p, c) = (cfg.hidden, cfg.intermediate, cfg.patch_size, cfg.channels);
        let patch_w = add("embeddings.patch_embedding.weight".into(), vec![d, c, p, p]);
        let patch_b = add("embeddings.patch_embedding.bias".into(), vec![d]);
        let pos = add("embeddings.position_embedding.weight".into(), vec![cfg.tokens(), d]);
        let blocks = (0..cfg.layers)
            .map(|l| {
                let n = |s: &str| format!("encoder.layers.{l}.{s}");
                BlockIds {
                    ln1_w: add(n("layer_norm1.weight"), vec![d]),
                    ln1_b: add(n("layer_norm1.bias"), vec![d]),
                    q_w: add(n("self_attn.q_proj.weight"), vec![d, d]),
                    q_b: add(n("self_attn.q_proj.bias"), vec![d]),
                    k_w: add(n("self_attn.k_proj.weight"), vec![d, d]),
                    k_b: add(n("self_attn.k_proj.bias"), vec![d]),
                    v_w: add(n("self_attn.v_proj.weight"), vec![d, d]),
                    v_b: add(n("self_attn.v_proj.bias"), vec![d]),
                    o_w: add(n("self_attn.out_proj.weight"), vec![d, d]),
                    o_b: add(n("self_attn.out_proj.bias"), vec![d]),
                    ln2_w: add(n("layer_norm2.weight"), vec![d]),
                    ln2_b: add(n("layer_norm2.bias"), vec![d]),
                    fc1_w: add(n("mlp.fc1.weight"), vec![i, d]),
                    fc1_b: add(n("mlp.fc1.bias"), vec![i]),
                    fc2_w: add(n("mlp.fc2.weight"), vec![d, i]),
                    fc2_b: add(n("mlp.fc2.bias"), vec![d]),
                }
            })
            .collect();
        let post_w = add("post_layernorm.weight".into(), vec![d]);
        let post_b = add("post_layernorm.bias".into(), vec![d]);
        VisionTower { cfg, specs, patch_w, patch_b, pos, blocks, post_w, post_b }
    }

    /// Resolves an HF `hidden_states` index (negative from the end) to 0..=layers.
    pub fn resolve_layer(&self, layer: i64) -> Result<usize> {
        let n = self.cfg.layers as i64 + 1;
        let idx = if layer < 0 { n + layer } else { layer };
        ensure!(
            (0..n).contains(&idx),
            "vision feature layer {layer} is out of range: hidden_states has {n} entries (embeddings + {} layers)",
            self.cfg.layers
        );
        Ok(idx as usize)
    }

    /// Flattens images `[3, H, W]` into patch rows `[images · tokens, C·P·P]`, ordered as the
    /// convolution weight `[D, C, P, P]` flattens, patches row-major over the grid.
    fn patchify(&self, images: &[&[f32]]) -> Result<Vec<f32>> {
        let (c, s, p) = (self.cfg.channels, self.cfg.image_size, self.cfg.patch_size);
        let g = s / p;
        let mut out = Vec::with_capacity(images.len() * g * g * c * p * p);
        for (i, img) in images.iter().enumerate() {
            ensure!(img.len() == c * s * s, "image {i}: {} pixel values, the tower expects [{c}, {s}, {s}]", img.len());
            for py in 0..g {
                for px in 0..g {
                    for ch in 0..c {
                        for ky in 0..p {
                            let row = (ch * s + py * p + ky) * s + px * p;
                            out.extend_from_slice(&img[row..row + p]);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Runs the tower on `images` (each `[3, H, W]`, preprocessed) up to `hidden_states[upto]`;
    /// with `upto == layers` also the post-layernorm.
    pub fn forward<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, images: &[&[f32]], upto: usize) -> Result<VisionOutput<B::Buf>> {
        let c = &self.cfg;
        ensure!(upto <= c.layers, "vision forward: layer {upto} of {}", c.layers);
        let n = c.tokens();
        let t = images.len() * n;
        let (d, im, pdim) = (c.hidden, c.intermediate, c.channels * c.patch_size * c.patch_size);
        let patches = be.upload(&self.patchify(images)?)?;
        let linear = |wt: ParamId, b: ParamId, x: &B::Buf, din: usize, dout: usize| -> Result<B::Buf> {
            let mut y = be.empty(t * dout)?;
            be.gemm(Gemm::linear(t, dout, din), x, w.get(wt), &mut y)?;
            be.add_bias(&mut y, w.get(b), t)?;
            Ok(y)
        };
        let mut x = linear(self.patch_w, self.patch_b, &patches, pdim, d)?;
        for i in 0..images.len() {
            // Position embeddings repeat per image: add the table to each image's block.
            let mut block = be.empty(n * d)?;
            be.copy_range(&x, i * n * d, &mut block, 0, n * d)?;
            be.add_assign(&mut block, w.get(self.pos))?;
            be.copy_range(&block, 0, &mut x, i * n * d, n * d)?;
        }
        let shape = AttnShape { n_heads: c.heads, n_kv_heads: c.heads, head_dim: c.head_dim(), causal: false };
        let seq_lens = vec![n; images.len()];
        let mut hidden_states = Vec::with_capacity(upto + 1);
        for b in &self.blocks[..upto] {
            let mut h = be.empty(t * d)?;
            be.layernorm(&x, w.get(b.ln1_w), w.get(b.ln1_b), c.ln_eps, &mut h)?;
            let q = linear(b.q_w, b.q_b, &h, d, d)?;
            let k = linear(b.k_w, b.k_b, &h, d, d)?;
            let v = linear(b.v_w, b.v_b, &h, d, d)?;
            let mut attn = be.empty(t * d)?;
            let mut lse = be.empty(t * c.heads)?;
            be.attention(shape, &seq_lens, &q, &k, &v, &mut attn, &mut lse)?;
            let mut x_mid = linear(b.o_w, b.o_b, &attn, d, d)?;
            be.add_assign(&mut x_mid, &x)?;
            be.layernorm(&x_mid, w.get(b.ln2_w), w.get(b.ln2_b), c.ln_eps, &mut h)?;
            let f1 = linear(b.fc1_w, b.fc1_b, &h, d, im)?;
            let mut a = be.empty(t * im)?;
            be.gelu(&f1, &mut a, c.act)?;
            let mut x_out = linear(b.fc2_w, b.fc2_b, &a, im, d)?;
            be.add_assign(&mut x_out, &x_mid)?;
            hidden_states.push(std::mem::replace(&mut x, x_out));
        }
        let last_hidden_state = if upto == c.layers {
            let mut post = be.empty(t * d)?;
            be.layernorm(&x, w.get(self.post_w), w.get(self.post_b), c.ln_eps, &mut post)?;
            Some(post)
        } else {
            None
        };
        hidden_states.push(x);
        Ok(VisionOutput { hidden_states, last_hidden_state })
    }
}

/// A vision tower with its weights on a backend.
pub struct LoadedVision<Buf> {
    pub tower: VisionTower,
    pub weights: ParamSet<Buf>,
}

impl<Buf> LoadedVision<Buf> {
    /// Loads a SigLIP checkpoint folder: `SiglipVisionModel` (names with or without the
    /// `vision_model.` prefix) or a dual-tower `SiglipModel` (its `text_model.*` is ignored).
    pub fn load<B: Backend<Buf = Buf>>(be: &B, dir: &Path) -> Result<Self> {
        let tower = VisionTower::new(VisionConfig::from_dir(dir)?);
        let source = WeightSource::open(dir)?;
        let prefix = ["", "vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model."]
            .into_iter()
            .find(|p| source.info(&format!("{p}embeddings.patch_embedding.weight")).is_some())
            .with_context(|| format!("{}: no SigLIP vision tower (embeddings.patch_embedding.weight) found", source.describe()))?;
        let weights = ParamSet::load(be, &tower.specs, &source, prefix)?;
        Ok(LoadedVision { tower, weights })
    }
}
