//! Running a recipe: its stages in order over one student (and teacher), resumable, in a run
//! folder it holds alone ([`RunFolder`]), then the loss plots and the exported student.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::checkpoint::{self, StageStamp, TrainState};
use super::config::{RunConfig, StageConfig, TrainConfig};
use super::metrics::{cut_to_step, MetricsWriter};
use super::model_state::{check_token_ids, load_model, MllmState};
use super::plot::{plot_losses, read_metrics_jsonl};
use super::run_folder::RunFolder;
use super::stage::{run_stage, RunContext};
use crate::backend::Backend;
use crate::dist::data_parallel::check_same_on_all_ranks;
use crate::dist::{Collective, Solo};
use crate::model::{export_llava, ExportOptions};

/// How a recipe run is driven.
pub struct RecipeRun<'a> {
    pub run: &'a RunConfig,
    pub out_dir: PathBuf,
    pub progress: bool,
    /// Checkpoint folder to continue from.
    pub resume: Option<PathBuf>,
    /// Stop after this many optimizer steps of the whole run (to test resuming).
    pub stop_after_global_step: Option<u64>,
}

/// Runs `stages` in order on `student`, from the checkpoint in `r.resume` when given, writing
/// metrics to `out_dir/metrics.jsonl` and the loss plots at the end. Returns the final state.
pub fn run_stages<B: Backend>(
    be: &B,
    r: &RecipeRun<'_>,
    stages: &[StageConfig],
    student: &mut MllmState<B::Buf>,
    teacher: Option<&MllmState<B::Buf>>,
) -> Result<TrainState> {
    run_stages_ranked(be, &Solo, r, stages, student, teacher)
}

/// [`run_stages`] as one rank of a data-parallel job: every rank trains on its part of each
/// global batch; rank 0 holds the run folder and writes the metrics, plots and checkpoints.
pub fn run_stages_ranked<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    r: &RecipeRun<'_>,
    stages: &[StageConfig],
    student: &mut MllmState<B::Buf>,
    teacher: Option<&MllmState<B::Buf>>,
) -> Result<TrainState> {
    let _folder = hold_folder(comm, &r.out_dir, r.resume.is_some())?;
    check_same_on_all_ranks(comm, "recipe ([run] and the stages)", &(r.run, stages, r.stop_after_global_step))?;
    train_stages(be, comm, r, stages, student, teacher)
}

/// Rank 0 takes the run folder ([`RunFolder::open`]) for as long as the result is kept.
fn hold_folder<B: Backend>(comm: &dyn Collective<B>, out_dir: &Path, resuming: bool) -> Result<Option<RunFolder>> {
    (comm.rank() == 0).then(|| RunFolder::open(out_dir, resuming)).transpose()
}

/// The stages of [`run_stages_ranked`], in a folder rank 0 holds.
fn train_stages<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    r: &RecipeRun<'_>,
    stages: &[StageConfig],
    student: &mut MllmState<B::Buf>,
    teacher: Option<&MllmState<B::Buf>>,
) -> Result<TrainState> {
    let lead = comm.rank() == 0;
    r.run.check()?;
    for (i, stage) in stages.iter().enumerate() {
        stage.check(i)?;
    }
    if let Some(t) = teacher {
        check_token_ids("teacher (it reads the student's token ids)", &student.tokenizer, t.model.llm.cfg.vocab)?;
    }
    std::fs::create_dir_all(&r.out_dir).with_context(|| format!("creating {}", r.out_dir.display()))?;
    let metrics_path = r.out_dir.join("metrics.jsonl");
    let mut state = TrainState { seed: r.run.seed, recipe: StageStamp::of(stages), ..TrainState::default() };
    if let Some(ckpt) = &r.resume {
        state = checkpoint::read_state(ckpt)?;
        checkpoint::check_resume(&state, r.run, stages).with_context(|| format!("resuming from {}", ckpt.display()))?;
        state.recipe = StageStamp::of(stages);
        if lead {
            checkpoint::verify(ckpt)?;
            let dropped = cut_to_step(&metrics_path, state.global_step)?;
            if dropped > 0 {
                eprintln!("{}: dropped {dropped} line(s) after the checkpoint's step {} (written again now)", metrics_path.display(), state.global_step);
            }
        }
        checkpoint::load_weights(be, ckpt, &mut student.weights)?;
        if lead {
            eprintln!(
            "resuming from {}: stage {} step {}{}",
            ckpt.display(),
            state.stage_index,
            state.stage_step,
            if state.stage_done { " (stage finished)" } else { "" }
            );
        }
    }
    let mut metrics = if lead { Some(MetricsWriter::append(&metrics_path)?) } else { None };
    let mut ctx = RunContext {
        run: r.run,
        out_dir: &r.out_dir,
        comm,
        metrics: metrics.as_mut(),
        progress: r.progress,
        stop_after_global_step: r.stop_after_global_step,
        vocab_note_logged: false,
    };
    for (i, stage) in stages.iter().enumerate() {
        if i < state.stage_index || (i == state.stage_index && state.stage_done) {
            continue;
        }
        run_stage(be, &mut ctx, stage, i, student, teacher, &mut state, r.resume.as_deref())?;
        if r.stop_after_global_step.is_some_and(|s| state.global_step >= s) {
            return Ok(state);
        }
    }
    if !lead {
        return Ok(state);
    }
    let records = read_metrics_jsonl(&metrics_path)?;
    if !records.is_empty() {
        plot_losses(&records, &r.out_dir, "kd-engine")?;
    }
    Ok(state)
}

/// `kd-engine train --config FILE`: loads the models a config names and runs its recipe, as one
/// rank of `comm` (every rank loads the models; rank 0 writes the config copy and the export).
pub fn run_config<B: Backend>(be: &B, comm: &dyn Collective<B>, cfg: &TrainConfig, out_dir: &Path, resume: Option<PathBuf>, progress: bool) -> Result<TrainState> {
    let lead = comm.rank() == 0;
    cfg.check_paths()?;
    let folder = hold_folder(comm, out_dir, resume.is_some())?;
    let loaded = (|| -> Result<_> {
        if lead {
            std::fs::write(out_dir.join("config.toml"), toml::to_string_pretty(cfg)?).with_context(|| format!("writing the config copy into {}", out_dir.display()))?;
        }
        let student = load_model(be, "student", &cfg.student, cfg.run.seed)?;
        let teacher = cfg.teacher.as_ref().map(|t| load_model(be, "teacher", t, cfg.run.seed)).transpose()?;
        Ok((student, teacher))
    })();
    let (mut student, teacher) = match loaded {
        Ok(models) => models,
        Err(e) => {
            if let Some(folder) = folder {
                folder.abandon(&["config.toml"]);
            }
            return Err(e);
        }
    };
    let run = RecipeRun { run: &cfg.run, out_dir: out_dir.to_path_buf(), progress, resume, stop_after_global_step: None };
    let state = train_stages(be, comm, &run, &cfg.stages, &mut student, teacher.as_ref())?;
    if !lead {
        return Ok(state);
    }
    let export_dir = out_dir.join("student");
    let tokenizer = cfg.student.tokenizer.clone().or_else(|| cfg.student.llm.clone()).or_else(|| cfg.student.llava.clone());
    let opts = ExportOptions { tokenizer: tokenizer.as_deref(), image_processor: Some(student.processor.clone()), ..ExportOptions::default() };
    if export_dir.exists() {
        std::fs::remove_dir_all(&export_dir).with_context(|| format!("replacing the previous export {}", export_dir.display()))?;
    }
    export_llava(be, &export_dir, &student.model, &student.weights, &opts)?;
    eprintln!("exported the student as an HF LlavaForConditionalGeneration folder: {}", export_dir.display());
    Ok(state)
}
