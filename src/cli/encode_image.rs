//! `kd-engine encode-image`: one image through the preprocessing and the SigLIP tower, so anyone
//! can compare kd-engine's features with another implementation's.

use std::path::Path;

use anyhow::{Context, Result};

use super::Device;
use crate::backend::Backend;
use crate::data::{load_rgb, preprocess, ImageProcessorConfig};
use crate::model::LoadedVision;
use crate::weights::{write_safetensors, NamedTensor};

pub fn run(vision: &Path, image: &Path, layer: i64, out: &Path, device: Device) -> Result<()> {
    crate::with_backend!(device, be => run_on(&be, vision, image, layer, out))
}

fn run_on<B: Backend>(be: &B, vision: &Path, image: &Path, layer: i64, out: &Path) -> Result<()> {
    let v = LoadedVision::load(be, vision).with_context(|| format!("loading the vision tower in {}", vision.display()))?;
    let k = v.tower.resolve_layer(layer)?;
    let cfg = ImageProcessorConfig::for_tower(vision, v.tower.cfg.image_size)?;
    let pixels = preprocess(&load_rgb(image)?, &cfg).with_context(|| format!("preprocessing {}", image.display()))?;
    let layers = v.tower.cfg.layers;
    let o = v.tower.forward(be, &v.weights, &[&pixels], layers)?;
    let hidden = be.download(&o.hidden_states[k])?;
    let last = be.download(o.last_hidden_state.as_ref().context("the full tower ran, so the post-layernorm exists")?)?;
    let (n, d, s) = (v.tower.cfg.tokens(), v.tower.cfg.hidden, v.tower.cfg.image_size);
    write_safetensors(
        out,
        &[
            NamedTensor { name: "pixel_values".into(), shape: vec![3, s, s], data: &pixels },
            NamedTensor { name: "hidden".into(), shape: vec![n, d], data: &hidden },
            NamedTensor { name: "last_hidden_state".into(), shape: vec![n, d], data: &last },
        ],
    )?;
    eprintln!("wrote pixel_values, hidden_states[{layer}] and last_hidden_state [{n}, {d}] to {}", out.display());
    Ok(())
}
