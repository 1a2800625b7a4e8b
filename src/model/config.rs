//! Reading Hugging Face `config.json` for the decoder LLMs kd-engine supports, as transformers 4.x
//! (`rope_theta`, `torch_dtype`) and 5.x (`rope_parameters`, `dtype`) write it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The decoder families: they differ only in which projections carry a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `Qwen2ForCausalLM` (Qwen1.5, Qwen2, Qwen2.5): q/k/v biases, no o bias.
    Qwen2,
    /// `LlamaForCausalLM`: biases on q/k/v/o only when `attention_bias` is set.
    Llama,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlmConfig {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
}

/// Typed access to a JSON object with errors that name the file and the key.
pub(crate) struct JsonFields<'a> {
    pub what: String,
    pub obj: &'a Value,
}

impl<'a> JsonFields<'a> {
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.usize_or(key, None)
    }
    pub fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .with_context(|| format!("{}: \"{key}\" must be a non-negative integer, found {v}", self.what)),
            None => default.with_context(|| format!("{}: required key \"{key}\" is missing", self.what)),
        }
    }
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v.as_f64().with_context(|| format!("{}: \"{key}\" must be a number, found {v}", self.what)),
            None => Ok(default),
        }
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().with_context(|| format!("{}: \"{key}\" must be true or false, found {v}", self.what)),
            None => Ok(default),
        }
    }
    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(Value::as_str)
    }
}

/// Reads and parses a JSON file, naming it in every error.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

impl LlmConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let json = read_json(&path)?;
        Self::from_json(&json, &path.display().to_string())
    }

    /// Parses a decoder config object; `what` names it in errors.
    pub fn from_json(json: &Value, what: &str) -> Result<Self> {
        let f = JsonFields { what: what.to_string(), obj: json };
        let model_type = f.str("model_type").with_context(|| format!("{what}: no \"model_type\""))?;
        let arch = match model_type {
            "qwen2" => Arch::Qwen2,
            "llama" => Arch::Llama,
            other => bail!(
                "{what}: unknown model_type \"{other}\"; kd-engine supports qwen2 (Qwen1.5/2/2.5) and llama"
            ),
        };
        let hidden = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        let kv_heads = f.usize_or("num_key_value_heads", Some(heads))?;
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("{what}: {heads} attention heads cannot be grouped over {kv_heads} key/value heads");
        }
        let head_dim = match f.usize_or("head_dim", None) {
            Ok(d) => d,
            Err(_) if hidden % heads == 0 => hidden / heads,
            Err(_) => bail!("{what}: hidden_size {hidden} is not a multiple of {heads} heads and no head_dim is given"),
        };
        if head_dim % 2 != 0 {
            bail!("{what}: head_dim {head_dim} must be even for rotary embeddings");
        }
        let rope_theta = rope_theta(&f)?;
        if f.bool_or("use_sliding_window", false)? {
            bail!("{what}: use_sliding_window is set; kd-engine implements full causal attention only");
        }
        if f.bool_or("mlp_bias", false)? {
            bail!("{what}: mlp_bias is set; kd-engine's decoder has no MLP biases");
        }
        if let Some(act) = f.str("hidden_act") {
            if act != "silu" {
                bail!("{what}: hidden_act \"{act}\" is not supported (SwiGLU with silu only)");
            }
        }
        let attention_bias = f.bool_or("attention_bias", false)?;
        Ok(LlmConfig {
            arch,
            hidden,
            intermediate: f.usize("intermediate_size")?,
            layers: f.usize("num_hidden_layers")?,
            heads,
            kv_heads,
            head_dim,
            vocab: f.usize("vocab_size")?,
            rms_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch == Arch::Llama && attention_bias,
        })
    }
}

/// `rope_parameters.rope_theta` (transformers 5) or top-level `rope_theta` (4.x); only the
/// default (unscaled) rotary type is implemented, anything else is refused rather than ignored.
fn rope_theta(f: &JsonFields) -> Result<f64> {
    let what = &f.what;
    if let Some(params) = f.get("rope_parameters") {
        let p = JsonFields { what: format!("{what}: rope_parameters"), obj: params };
        let kind = p.str("rope_type").unwrap_or("default");
        if kind != "default" {
            bail!("{what}: rope_type \"{kind}\" is not supported (default rotary embeddings only)");
        }
        if let Some(theta) = p.get("rope_theta") {
            return theta.as_f64().with_context(|| format!("{what}: rope_parameters.rope_theta must be a number"));
        }
    }
    if let Some(scaling) = f.get("rope_scaling") {
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).unwrap_or("default");
        if kind != "default" {
            bail!("{what}: rope_scaling \"{kind}\" is not supported (default rotary embeddings only)");
        }
    }
    f.f64_or("rope_theta", 10000.0)
}
