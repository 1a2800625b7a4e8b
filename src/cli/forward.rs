//! `kd-engine forward`: logits of one sequence, for comparison with any other implementation.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::Device;
use crate::backend::Backend;
use crate::model::LoadedLlm;
use crate::weights::{write_safetensors, NamedTensor};

/// Parses `--input-ids` values (already split at commas).
pub fn parse_ids(raw: &[String]) -> Result<Vec<u32>> {
    let ids: Vec<u32> = raw
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().with_context(|| format!("--input-ids: \"{s}\" is not a token id (a non-negative integer)")))
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--input-ids is empty: give at least one token id, e.g. --input-ids 1,5,42");
    }
    Ok(ids)
}

pub fn run(model: &Path, raw_ids: &[String], out: &Path, device: Device) -> Result<()> {
    let ids = parse_ids(raw_ids)?;
    crate::with_backend!(device, be => run_on(&be, model, &ids, out))
}

fn run_on<B: Backend>(be: &B, model: &Path, ids: &[u32], out: &Path) -> Result<()> {
    let llm = LoadedLlm::load(be, model, "").with_context(|| format!("loading the model in {}", model.display()))?;
    let vocab = llm.model.cfg.vocab;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("--input-ids: token id {bad} is out of range for the model's vocabulary of {vocab}");
    }
    let logits = be.download(&llm.logits(be, ids)?)?;
    write_safetensors(out, &[NamedTensor { name: "logits".into(), shape: vec![ids.len(), vocab], data: &logits }])?;
    eprintln!("wrote logits [{}, {vocab}] to {} ({})", ids.len(), out.display(), be.name());
    Ok(())
}
