//! Checkpoints: the trainable weights, the optimizer moments, and where the run stands (stage,
//! step, optimizer step count, seed), written atomically so an interrupted write leaves the
//! previous checkpoint usable. The data order is a pure function of (seed, stage, epoch), so the
//! position is all a resumed run needs to see the same samples in the same order.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::model::{MllmWeights, ParamSet};
use crate::optim::AdamW;
use crate::weights::{write_safetensors, NamedTensor, WeightSource};

/// Where the run stands after the last completed optimizer step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Index of the stage in the recipe.
    pub stage_index: usize,
    /// Optimizer steps completed in that stage.
    pub stage_step: u64,
    /// The stage has finished; a resumed run starts the next one.
    pub stage_done: bool,
    /// Optimizer steps completed in the whole run (steps skipped for non-finite values included).
    pub global_step: u64,
    /// AdamW's own step count (bias correction).
    pub optimizer_step: u64,
    pub seed: u64,
    pub nonfinite_streak: u32,
    pub nonfinite_total: u64,
}

const STATE: &str = "state.json";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

fn download_set<B: Backend>(be: &B, prefix: &str, set: &ParamSet<B::Buf>, out: &mut Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<()> {
    for (spec, buf) in set.specs.iter().zip(&set.bufs) {
        out.push((format!("{prefix}.{}", spec.name), spec.shape.clone(), be.download(buf)?));
    }
    Ok(())
}

/// A tensor on the host as a checkpoint file holds it: name, shape, values.
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// The name of an optimizer tensor in `optimizer.safetensors`: `kind` (`m`, `v`, `master`),
/// then the parameter set, then the parameter.
pub fn optimizer_entry_name(kind: &str, set: &str, param: &str) -> String {
    format!("{kind}.{set}.{param}")
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let named: Vec<NamedTensor> = tensors.iter().map(|(n, s, d)| NamedTensor { name: n.clone(), shape: s.clone(), data: d }).collect();
    write_safetensors(path, &named)
}

/// Writes `run_dir/checkpoint` atomically: into `checkpoint.tmp`, then swapped in by renames
/// (`checkpoint` → `checkpoint.old`, `checkpoint.tmp` → `checkpoint`, `checkpoint.old` removed).
/// [`latest`] falls back to `checkpoint.old` if a crash left only that. `optimizer` holds the
/// optimizer state on the host (in data-parallel training, gathered from every rank).
pub fn write<B: Backend>(
    be: &B,
    run_dir: &Path,
    state: &TrainState,
    weights: &MllmWeights<B::Buf>,
    optimizer: Option<&[HostTensor]>,
) -> Result<PathBuf> {
    let final_dir = run_dir.join("checkpoint");
    let tmp = run_dir.join("checkpoint.tmp");
    let old = run_dir.join("checkpoint.old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing a stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = Vec::new();
    download_set(be, "projector", &weights.projector, &mut w)?;
    download_set(be, "llm", &weights.llm, &mut w)?;
    write_tensors(&tmp.join(WEIGHTS), &w)?;
    if let Some(t) = optimizer {
        write_tensors(&tmp.join(OPTIMIZER), t)?;
    }
    std::fs::write(tmp.join(STATE), serde_json::to_string_pretty(state)?).with_context(|| format!("writing {}", tmp.join(STATE).display()))?;
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&final_dir, &old).with_context(|| format!("moving {} aside", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(final_dir)
}

/// The checkpoint to resume from, given a run folder or a checkpoint folder.
pub fn latest(path: &Path) -> Result<PathBuf> {
    for candidate in [path.to_path_buf(), path.join("checkpoint"), path.join("checkpoint.old")] {
        if candidate.join(STATE).is_file() {
            return Ok(candidate);
        }
    }
    bail!("{}: no checkpoint here (looked for {STATE} in it, in checkpoint/ and in checkpoint.old/)", path.display())
}

pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    let p = ckpt.join(STATE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a kd-engine train state", p.display()))
}

fn load_set<B: Backend>(be: &B, src: &WeightSource, prefix: &str, set: &mut ParamSet<B::Buf>) -> Result<()> {
    for (spec, buf) in set.specs.iter().zip(set.bufs.iter_mut()) {
        *buf = be.upload(&src.read_f32(&format!("{prefix}.{}", spec.name), &spec.shape)?)?;
    }
    Ok(())
}

/// Loads the tensors of `set` this rank `held`s (all of them without ZeRO-1): a checkpoint holds
/// every tensor whatever world size wrote it, so a run resumes at any world size.
fn load_state_set<B: Backend>(be: &B, src: &WeightSource, kind: &str, name: &str, set: &mut ParamSet<B::State>, held: &[bool]) -> Result<()> {
    for ((spec, buf), _) in set.specs.iter().zip(set.bufs.iter_mut()).zip(held).filter(|(_, &h)| h) {
        *buf = be.upload_state(&src.read_f32(&optimizer_entry_name(kind, name, &spec.name), &spec.shape)?)?;
    }
    Ok(())
}

/// Restores the trainable weights of a checkpoint into `weights`.
pub fn load_weights<B: Backend>(be: &B, ckpt: &Path, weights: &mut MllmWeights<B::Buf>) -> Result<()> {
    let src = WeightSource::open(&ckpt.join(WEIGHTS))?;
    load_set(be, &src, "projector", &mut weights.projector)?;
    load_set(be, &src, "llm", &mut weights.llm)
}

/// Restores optimizer moments written for the sets `names` (same order as the optimizer's), and
/// the f32 master weights when the optimizer keeps them (a checkpoint written without them leaves
/// the master copies as they are: taken from the loaded weights).
pub fn load_optimizer<B: Backend>(be: &B, ckpt: &Path, opt: &mut AdamW<B::State>, names: &[&str], step: u64) -> Result<()> {
    let path = ckpt.join(OPTIMIZER);
    ensure!(path.is_file(), "{}: the checkpoint has no optimizer state to resume a stage from", ckpt.display());
    let src = WeightSource::open(&path)?;
    for (i, name) in names.iter().enumerate() {
        load_state_set(be, &src, "m", name, &mut opt.m[i], &opt.held[i])?;
        load_state_set(be, &src, "v", name, &mut opt.v[i], &opt.held[i])?;
        if let Some(master) = &mut opt.master {
            let first = master[i].specs.first().map(|s| optimizer_entry_name("master", name, &s.name));
            if first.is_some_and(|n| src.info(&n).is_some()) {
                load_state_set(be, &src, "master", name, &mut master[i], &opt.held[i])?;
            }
        }
    }
    opt.step = step;
    Ok(())
}
