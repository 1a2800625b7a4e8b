//! Checkpoints: the trainable weights, the optimizer moments, and where the run stands (stage,
//! step, optimizer step count, seed, the recipe it follows), written atomically so an interrupted
//! write leaves the previous checkpoint usable. The data order is a pure function of (seed,
//! stage, epoch), so the position is all a resumed run needs to see the same samples in the same
//! order, provided the config is the one the checkpoint was trained with ([`check_resume`]).
//! `state.json` carries a CRC-32 of each other file, checked before a resume reads them
//! ([`verify`]), and every file is on disk (fsynced) before the renames that publish it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::config::{RunConfig, StageConfig, StageKind};
use crate::backend::Backend;
use crate::model::{MllmWeights, ParamSet, ParamSpec};
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
    /// Steps in which every sample failed when its batch was built (no optimizer step taken).
    #[serde(default)]
    pub empty_steps: u64,
    /// The recipe the run was started with (empty in checkpoints of older versions).
    #[serde(default)]
    pub recipe: Vec<StageStamp>,
}

/// What of a stage's config fixes the data order and the step count: a resume must match it.
/// (`micro_batch` may change: a step's result does not depend on its split, SPEC §1.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageStamp {
    pub kind: StageKind,
    pub global_batch: usize,
    pub epochs: f64,
    pub max_steps: Option<u64>,
}

impl StageStamp {
    pub fn of(stages: &[StageConfig]) -> Vec<StageStamp> {
        stages.iter().map(|s| StageStamp { kind: s.kind, global_batch: s.global_batch, epochs: s.epochs, max_steps: s.max_steps }).collect()
    }
}

/// `state.json`: the state and the checksums of the checkpoint's other files.
#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    state: TrainState,
    /// File name → CRC-32 (hex) of its bytes.
    #[serde(default)]
    checksums: BTreeMap<String, String>,
}

const STATE: &str = "state.json";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

fn download_set<B: Backend>(be: &B, prefix: &str, set: &ParamSet<B::Buf>, out: &mut Vec<HostTensor>) -> Result<()> {
    for (spec, buf) in set.specs.iter().zip(&set.bufs) {
        push_hf_tensors(spec, be.download(buf)?, |n| format!("{prefix}.{n}"), out)?;
    }
    Ok(())
}

/// A tensor on the host as a checkpoint file holds it: name, shape, values.
pub type HostTensor = (String, Vec<usize>, Vec<f32>);

/// Appends parameter `spec`'s host `values` to `out` as its Hugging Face tensors, each named
/// `name(tensor name)`: a checkpoint file holds Hugging Face tensors whatever the parameter
/// layout (a plain parameter's values are moved, not copied).
pub fn push_hf_tensors(spec: &ParamSpec, values: Vec<f32>, name: impl Fn(&str) -> String, out: &mut Vec<HostTensor>) -> Result<()> {
    if !spec.is_stacked() {
        ensure!(values.len() == spec.numel(), "parameter {} has {} values for shape {:?}", spec.name, values.len(), spec.shape);
        out.push((name(&spec.name), spec.shape.clone(), values));
        return Ok(());
    }
    for (t, v) in spec.split(&values)? {
        out.push((name(&t.name), t.shape, v.to_vec()));
    }
    Ok(())
}

/// The name of an optimizer tensor in `optimizer.safetensors`: `kind` (`m`, `v`, `master`),
/// then the parameter set, then the parameter.
pub fn optimizer_entry_name(kind: &str, set: &str, param: &str) -> String {
    format!("{kind}.{set}.{param}")
}

/// CRC-32 of a file's bytes, read in 1 MiB pieces.
fn crc32_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            return Ok(format!("{:08x}", hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Flushes a folder's entries (new files, renames) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
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
    // The safetensors files are fsynced by their writer; their checksums are taken from the disk.
    let mut checksums = BTreeMap::new();
    for name in [WEIGHTS, OPTIMIZER] {
        if tmp.join(name).is_file() {
            checksums.insert(name.to_string(), crc32_of(&tmp.join(name))?);
        }
    }
    let state_path = tmp.join(STATE);
    let text = serde_json::to_string_pretty(&StateFile { state: state.clone(), checksums })?;
    std::fs::File::create(&state_path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .with_context(|| format!("writing {}", state_path.display()))?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&final_dir, &old).with_context(|| format!("moving {} aside", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    sync_dir(run_dir)?;
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

fn read_state_file(ckpt: &Path) -> Result<StateFile> {
    let p = ckpt.join(STATE);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a kd-engine train state", p.display()))
}

pub fn read_state(ckpt: &Path) -> Result<TrainState> {
    Ok(read_state_file(ckpt)?.state)
}

/// Checks every file of the checkpoint against the checksum `state.json` holds for it.
pub fn verify(ckpt: &Path) -> Result<()> {
    let file = read_state_file(ckpt)?;
    if file.checksums.is_empty() {
        eprintln!("note: {} was written by an older kd-engine without checksums; its files are not verified", ckpt.display());
    }
    for (name, want) in &file.checksums {
        let path = ckpt.join(name);
        ensure!(path.is_file(), "{}: the checkpoint lists {name} but the file is missing", ckpt.display());
        let got = crc32_of(&path)?;
        ensure!(
            &got == want,
            "{}: checksum mismatch (CRC-32 {got}, state.json says {want}): the file changed or was damaged after it was written; \
             resume from an intact checkpoint",
            path.display()
        );
    }
    Ok(())
}

/// Refuses a resume whose config differs from the checkpoint's in what fixes the data order
/// and the step count (seed, stages, batch size, epochs, max_steps) or whose position lies
/// outside the config's stages, naming the differing values.
pub fn check_resume(state: &TrainState, run: &RunConfig, stages: &[StageConfig]) -> Result<()> {
    ensure!(
        state.seed == run.seed,
        "the checkpoint was trained with seed {}, the config has seed {}: the data order would differ; resume with run.seed = {}",
        state.seed,
        run.seed,
        state.seed
    );
    let names = |kinds: &mut dyn Iterator<Item = StageKind>| kinds.map(StageKind::name).collect::<Vec<_>>().join(" → ");
    let now = StageStamp::of(stages);
    if !state.recipe.is_empty() {
        ensure!(
            state.recipe.len() == now.len(),
            "the checkpoint's recipe has {} stages ({}), the config {} ({})",
            state.recipe.len(),
            names(&mut state.recipe.iter().map(|s| s.kind)),
            now.len(),
            names(&mut now.iter().map(|s| s.kind))
        );
        for (i, (was, is)) in state.recipe.iter().zip(&now).enumerate() {
            let differs = |what: &str, a: String, b: String| anyhow::anyhow!("stage {i}: the checkpoint was trained with {what} {a}, the config has {b}");
            if was.kind != is.kind {
                return Err(differs("kind", was.kind.name().into(), is.kind.name().into()));
            }
            if was.global_batch != is.global_batch {
                return Err(differs("global_batch", was.global_batch.to_string(), is.global_batch.to_string()));
            }
            if was.epochs != is.epochs {
                return Err(differs("epochs", was.epochs.to_string(), is.epochs.to_string()));
            }
            if was.max_steps != is.max_steps {
                let show = |m: Option<u64>| m.map_or("none".to_string(), |m| m.to_string());
                return Err(differs("max_steps", show(was.max_steps), show(is.max_steps)));
            }
        }
    }
    ensure!(
        state.stage_index < stages.len(),
        "the checkpoint stands in stage {}, but the config has {} stage(s)",
        state.stage_index,
        stages.len()
    );
    Ok(())
}

fn load_set<B: Backend>(be: &B, src: &WeightSource, prefix: &str, set: &mut ParamSet<B::Buf>) -> Result<()> {
    for (spec, buf) in set.specs.iter().zip(set.bufs.iter_mut()) {
        *buf = be.upload(&spec.read(src, |n| format!("{prefix}.{n}"))?)?;
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
/// the master copies as they are: taken from the loaded weights). The file holds whole tensors
/// whatever world size wrote it; each piece this rank holds takes its range, so a run resumes at
/// any world size.
pub fn load_optimizer<B: Backend>(be: &B, ckpt: &Path, opt: &mut AdamW<B::State>, names: &[&str], step: u64) -> Result<()> {
    let path = ckpt.join(OPTIMIZER);
    ensure!(path.is_file(), "{}: the checkpoint has no optimizer state to resume a stage from", ckpt.display());
    ensure!(names.len() == opt.specs.len(), "{} set names for an optimizer over {} sets", names.len(), opt.specs.len());
    let src = WeightSource::open(&path)?;
    // Entries are named by the parameters' Hugging Face tensors (a stacked parameter has several).
    let first_master = opt
        .specs
        .iter()
        .enumerate()
        .find_map(|(set, s)| s.first().map(|spec| (set, spec)))
        .and_then(|(set, spec)| spec.hf_tensors().first().map(|t| optimizer_entry_name("master", names[set], &t.name)));
    let master_saved = first_master.is_some_and(|n| src.info(&n).is_some());
    // One read of each tensor for its consecutive pieces.
    let mut cache: Option<((usize, usize), Vec<Vec<f32>>)> = None;
    for (p, st) in opt.pieces.iter().zip(opt.state.iter_mut()) {
        let Some(st) = st else { continue };
        if cache.as_ref().map(|c| c.0) != Some((p.set, p.tensor)) {
            let spec = &opt.specs[p.set][p.tensor];
            let kinds: &[&str] = if st.master.is_some() && master_saved { &["m", "v", "master"] } else { &["m", "v"] };
            let values = kinds
                .iter()
                .map(|k| spec.read(&src, |n| optimizer_entry_name(k, names[p.set], n)))
                .collect::<Result<Vec<_>>>()?;
            cache = Some(((p.set, p.tensor), values));
        }
        let values = &cache.as_ref().map(|c| &c.1).context("the tensor cache was just filled")?;
        let range = p.start..p.start + p.len;
        st.m = be.upload_state(&values[0][range.clone()])?;
        st.v = be.upload_state(&values[1][range.clone()])?;
        if let (Some(master), Some(saved)) = (st.master.as_mut(), values.get(2)) {
            *master = be.upload_state(&saved[range])?;
        }
    }
    opt.step = step;
    Ok(())
}
