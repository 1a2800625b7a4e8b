//! One stage of a recipe: the optimizer-step loop with gradient accumulation, the stage's freeze
//! rules and objective, logging, checkpoints, and the stop on repeated non-finite values.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use super::checkpoint::{self, TrainState};
use super::config::{RunConfig, StageConfig, Target};
use super::metrics::{describe, loss_fields, MetricsWriter};
use super::model_state::MllmState;
use super::sample_order::SampleOrder;
use crate::backend::Backend;
use crate::dist::data_parallel::{step_counts, step_report, sum_over_ranks};
use crate::dist::{Collective, GradSync};
use crate::data::{default_visual_placeholder, Dataset, DatasetOptions, EncodeOptions, ImageProcessorConfig, PackedBatch, SampleEncoder, Template};
use crate::loss::{
    frozen_head_gram, fused_distill_loss, kept_vocab, lm_head_grad, visual_ranges, vocab_mismatch_note, DistillConfig, FusedHeadOptions, HeadSide, KlTargets,
    LossCounts, LossInputs, LossReport, PendingReport,
};
use crate::model::{GradsReady, MllmGrads, ParamSet};
use crate::optim::{AdamWConfig, CosineSchedule};

/// What a stage needs from the run around it.
pub struct RunContext<'a, B: Backend> {
    pub run: &'a RunConfig,
    pub out_dir: &'a Path,
    /// The other ranks of a data-parallel job ([`crate::dist::Solo`] for one).
    pub comm: &'a dyn Collective<B>,
    /// Rank 0 writes the metrics (and the checkpoints); the other ranks have none.
    pub metrics: Option<&'a mut MetricsWriter>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Stop after this many optimizer steps of the whole run (tests of resume use it).
    pub stop_after_global_step: Option<u64>,
    /// The vocabulary-mismatch note has been logged (SPEC §1: once per run).
    pub vocab_note_logged: bool,
}

/// Prints a log line above the progress bar, or plainly when the bar is hidden.
fn log(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// One optimizer step's micro-batches and the reasons of the samples skipped while loading them.
struct StepData {
    batches: Vec<PackedBatch>,
    skipped: Vec<String>,
}

/// Loads this rank's micro-batches of a step from the stage's sample order.
struct StepLoader<'a> {
    dataset: &'a Dataset,
    encoder: &'a SampleEncoder,
    processor: &'a ImageProcessorConfig,
    order: SampleOrder,
    global_batch: usize,
    micro_batch: usize,
    rank: usize,
    world: usize,
}

impl StepLoader<'_> {
    /// Rank r of W takes the r-th contiguous block of `global_batch / W` samples (whole
    /// micro-batches): the ranks' micro-batches, in rank order, are those one rank would load.
    fn load(&mut self, step: u64) -> Result<StepData> {
        let batch = self.order.step_indices(self.dataset, step, self.global_batch);
        let per_rank = self.global_batch / self.world;
        let idx = &batch[(self.rank * per_rank).min(batch.len())..((self.rank + 1) * per_rank).min(batch.len())];
        let mut data = StepData { batches: Vec::new(), skipped: Vec::new() };
        for chunk in idx.chunks(self.micro_batch) {
            let loaded = self.dataset.load_batch(chunk, self.encoder, self.processor)?;
            data.skipped.extend(loaded.skipped.iter().map(|s| s.to_string()));
            if loaded.batch.n_sequences() > 0 {
                data.batches.push(loaded.batch);
            }
        }
        Ok(data)
    }
}

/// The objective of a stage from its config.
pub fn distill_config(stage: &StageConfig) -> Result<DistillConfig> {
    if !stage.kind.distills() {
        return Ok(DistillConfig::ce_only());
    }
    Ok(DistillConfig {
        ce: stage.ce,
        alpha: stage.alpha as f32,
        beta: stage.beta as f32,
        gamma: stage.gamma as f32,
        targets: KlTargets {
            response: stage.targets.contains(&Target::Response),
            prompt: stage.targets.contains(&Target::Prompt),
            visual: stage.targets.contains(&Target::Visual),
        },
        mdist: stage.mdist,
        rdist: stage.rdist,
        temperature: stage.temperature as f32,
        divergence: stage.divergence()?,
    })
}

fn loss_inputs<'a>(b: &'a PackedBatch, images: &'a [std::ops::Range<usize>]) -> LossInputs<'a> {
    LossInputs { ids: &b.ids, groups: &b.groups, seq_lens: &b.seq_lens, images }
}

/// Runs (or resumes) stage `stage_index`. `state` says where the run stands and is updated as
/// steps complete; a checkpoint is written at the configured interval and at the stage's end.
#[allow(clippy::too_many_arguments)]
pub fn run_stage<B: Backend>(
    be: &B,
    ctx: &mut RunContext<'_, B>,
    stage: &StageConfig,
    stage_index: usize,
    student: &mut MllmState<B::Buf>,
    teacher: Option<&MllmState<B::Buf>>,
    state: &mut TrainState,
    resume_from: Option<&Path>,
) -> Result<()> {
    let name = stage.label().to_uppercase();
    student.model.llm.gradient_checkpointing = ctx.run.gradient_checkpointing;
    let objective = distill_config(stage)?;
    let teacher = match (objective.needs_teacher(), teacher) {
        (true, None) => bail!("stage {stage_index} ({name}) distils, but no teacher was given"),
        (true, Some(t)) => Some(t),
        (false, _) => None,
    };
    if let Some(t) = teacher {
        let (nt, ns) = (t.model.visual_tokens(), student.model.visual_tokens());
        ensure!(
            nt == ns,
            "teacher and student give different numbers of visual tokens per image ({nt} vs {ns}): distillation pairs them row by row"
        );
        if let Some(note) = vocab_mismatch_note(student.model.llm.cfg.vocab, t.model.llm.cfg.vocab) {
            if !ctx.vocab_note_logged && ctx.comm.rank() == 0 {
                eprintln!("note: {note}");
                ctx.vocab_note_logged = true;
            }
        }
    }
    let shared_features = teacher.is_some_and(|t| t.shares_vision_with(student));

    let encoder = SampleEncoder {
        template: Template::builtin(stage.template_name())?,
        tokenizer: student.tokenizer.clone(),
        options: EncodeOptions {
            n_visual_tokens: student.model.visual_tokens(),
            visual_placeholder_id: default_visual_placeholder(&student.tokenizer),
            max_len: stage.max_len,
        },
    };
    let opts = DatasetOptions {
        image_folder: stage.image_folder.clone(),
        max_skip_fraction: ctx.run.max_skip_fraction,
        ..DatasetOptions::default()
    };
    let dataset = Dataset::load(&stage.data, &encoder, &opts).with_context(|| format!("stage {stage_index} ({name})"))?;
    if ctx.comm.rank() == 0 {
        eprintln!("stage {stage_index} ({name}): {}: {}", stage.data.display(), dataset.report());
    }

    let order = SampleOrder::new(&dataset, ctx.run.seed, stage_index, stage.epochs);
    let gb = stage.global_batch;
    let (rank, world) = (ctx.comm.rank(), ctx.comm.world());
    ensure!(
        gb % (stage.micro_batch() * world) == 0,
        "stage {stage_index} ({name}): global_batch {gb} does not split into {world} ranks × whole micro-batches of {}; \
         make global_batch a multiple of micro_batch × world size",
        stage.micro_batch()
    );
    // Micro-batches per rank and step (fewer when the last batch of the stage is short).
    let slots = gb / stage.micro_batch() / world;
    let total_steps = order.steps(gb);
    let steps = stage.max_steps.map_or(total_steps, |m| m.min(total_steps));
    let schedule = CosineSchedule::new(stage.lr, stage.warmup_ratio, steps);

    // Freeze rules (SPEC §1): the projector always trains, the LLM in SFT/DFT, the tower never.
    let trains_llm = stage.kind.trains_llm();
    let set_names: &[&str] = if trains_llm { &["projector", "llm"] } else { &["projector"] };
    let adam_cfg = AdamWConfig {
        weight_decay: stage.weight_decay as f32,
        max_grad_norm: (stage.max_grad_norm > 0.0).then_some(stage.max_grad_norm as f32),
        piece_elems: ctx.run.optimizer_piece,
        ..AdamWConfig::default()
    };
    let (sync, mut opt) = {
        let w = &student.weights;
        let sets: Vec<&ParamSet<B::Buf>> = if trains_llm { vec![&w.projector, &w.llm] } else { vec![&w.projector] };
        let sync = GradSync::new(ctx.comm, ctx.run.dist_options(), &sets, adam_cfg);
        let opt = sync.optimizer(be, &sets)?;
        (sync, opt)
    };
    let mut gproj = ParamSet::zeros(be, &student.model.projector.specs)?;
    let mut gllm = if trains_llm { Some(ParamSet::zeros(be, &student.model.llm.specs)?) } else { None };
    let resuming_inside = state.stage_index == stage_index && !state.stage_done && state.stage_step > 0;
    ensure!(
        !resuming_inside || state.stage_step < steps,
        "the checkpoint stands at step {} of stage {stage_index} ({name}), but its data ({}) now makes {steps} step(s): resume with the data it was trained on",
        state.stage_step,
        stage.data.display()
    );
    if resuming_inside {
        let ckpt = resume_from.context("resuming inside a stage needs its checkpoint")?;
        checkpoint::load_optimizer(be, ckpt, &mut opt, set_names, state.optimizer_step)?;
    } else {
        state.stage_index = stage_index;
        state.stage_step = 0;
        state.stage_done = false;
        state.optimizer_step = 0;
    }

    // The loss runs on the fused LM head (`crate::loss::fused_head`): logits only for the rows a
    // term uses, chunk by chunk, never the full [T, V]; L_rel as R = H·(WᵀW)·Hᵀ. A frozen head's
    // Gram M = WᵀW (the teacher's always, the student's in PT/DPT) is built once per stage.
    let head_opts = FusedHeadOptions::default();
    // L_rel needs a teacher (checked above), so the grams exist only with one.
    let (teacher_gram, student_gram) = match teacher {
        Some(t) if objective.relation_on() => {
            let kept = kept_vocab(student.model.llm.cfg.vocab, t.model.llm.cfg.vocab);
            let student_gram = if trains_llm { None } else { Some(frozen_head_gram(be, &student.model.llm, &student.weights.llm, kept)?) };
            (Some(frozen_head_gram(be, &t.model.llm, &t.weights.llm, kept)?), student_gram)
        }
        _ => (None, None),
    };

    let bar = if ctx.progress && rank == 0 { ProgressBar::new(steps) } else { ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::hidden()) };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps, {per_sec}, eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(name.clone());
    bar.set_position(state.stage_step);
    let started = Instant::now();

    // The next step's batches (images decoded and preprocessed, samples tokenised and packed) are
    // loaded on another thread while this step computes; at most one step ahead, in the same
    // order as without it, so runs stay reproducible.
    let mut loader = StepLoader {
        dataset: &dataset,
        encoder: &encoder,
        processor: &student.processor.clone(),
        order,
        global_batch: gb,
        micro_batch: stage.micro_batch(),
        rank,
        world,
    };
    // Distinct samples this rank left out of their batches so far: they count toward
    // max_skip_fraction with those skipped at load.
    let mut batch_skips = std::collections::HashSet::new();
    let completed = std::thread::scope(|scope| -> Result<bool> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<StepData>>(0);
        let first = state.stage_step;
        scope.spawn(move || {
            for step in first..steps {
                // A panic while loading (a bug, never user data) becomes an error of the run.
                let data = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loader.load(step)))
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the batches of step {} panicked (a kd-engine bug)", step + 1)));
                let failed = data.is_err();
                // A closed channel: the stage stopped early; an error ends the loading too.
                if tx.send(data).is_err() || failed {
                    break;
                }
            }
        });
        while state.stage_step < steps {
            if ctx.stop_after_global_step.is_some_and(|s| state.global_step >= s) {
                bar.abandon();
                return Ok(false);
            }
            let step = state.stage_step;
            let step_start = Instant::now();
            let StepData { batches, skipped } = rx.recv().context("the data loader thread stopped")??;
            let who = if world > 1 { format!("rank {rank}: ") } else { String::new() };
            for s in &skipped {
                log(&bar, format!("{who}skipped at batch time: {s}"));
            }
            let skipped_now = skipped.len();
            batch_skips.extend(skipped);
            let ranges: Vec<Vec<std::ops::Range<usize>>> =
                batches.iter().map(|b| visual_ranges(&b.groups, &b.seq_lens)).collect::<Result<_>>()?;
            let counts: LossCounts = batches.iter().zip(&ranges).map(|(b, r)| LossCounts::of(&loss_inputs(b, r))).sum::<Result<LossCounts>>()?;
            // Every mean is over the whole step: all ranks' rows (SPEC §1).
            let (counts, fewest_micro_batches) = step_counts(ctx.comm, &counts, batches.len())?;

            gproj.zero_all(be)?;
            if let Some(g) = gllm.as_mut() {
                g.zero_all(be)?;
            }
            // Every micro-batch's loss terms stay on the device until the step's one read-back.
            let mut sums = be.sums(PendingReport::SLOTS * batches.len())?;
            let mut pending: Vec<PendingReport> = Vec::with_capacity(batches.len());
            let mut tokens = 0usize;
            // The gradient buckets are reduced while the last micro-batch's backward goes on,
            // when every rank has one (every rank must start the same buckets in the same order).
            let mut overlap = None;
            for (k, (b, r)) in batches.iter().zip(&ranges).enumerate() {
                if k + 1 == batches.len() && fewest_micro_batches > 0 {
                    overlap = sync.overlap(be);
                }
                tokens += b.n_tokens();
                let features = if b.pixel_values.is_empty() { None } else { Some(student.model.encode_images(be, &student.weights.vision, &b.pixel_values)?) };
                // The teacher runs forward only: no activation outlives its block; the final hidden states
                // are all that is kept.
                let teacher_hidden = match teacher {
                    Some(t) => {
                        let tf = match (&features, shared_features) {
                            (Some(f), true) => Some(be.duplicate(f)?),
                            (Some(_), false) => Some(t.model.encode_images(be, &t.weights.vision, &b.pixel_values)?),
                            (None, _) => None,
                        };
                        Some(t.model.hidden_states(be, &t.weights, b, tf)?)
                    }
                    None => None,
                };
                let acts = student.model.forward(be, &student.weights, b, features)?;
                let s_side = HeadSide::of(&student.model.llm, &student.weights.llm, &acts.llm.hidden, student_gram.as_ref())?;
                let t_side = match (teacher, &teacher_hidden) {
                    (Some(t), Some(h)) => Some(HeadSide::of(&t.model.llm, &t.weights.llm, h, teacher_gram.as_ref())?),
                    _ => None,
                };
                let mut dh = be.zeros(be.len(&acts.llm.hidden))?;
                let dweight = gllm.as_mut().map(|g| lm_head_grad(&student.model.llm, g)).transpose()?;
                let at = PendingReport::SLOTS * pending.len();
                let p = fused_distill_loss(be, &objective, &loss_inputs(b, r), s_side, t_side, &counts, &head_opts, &mut dh, dweight, &mut sums, at)?;
                pending.push(p);
                drop(teacher_hidden);
                let ready = overlap.as_mut().map(|o| o as &mut dyn GradsReady<B::Buf>);
                student.model.backward(be, &student.weights, &acts, &dh, MllmGrads { projector: Some(&mut gproj), llm: gllm.as_mut(), ready })?;
            }

            let values = be.read_sums(&sums)?;
            let reports: Vec<LossReport> = pending.iter().map(|p| p.resolve(&values)).collect::<Result<_>>()?;
            let report = step_report(ctx.comm, &reports, slots)?;
            let totals = sum_over_ranks(ctx.comm, &[tokens, skipped_now, batch_skips.len()])?;
            let (tokens, skipped) = (totals[0], totals[1]);
            dataset.check_skip_fraction(totals[2], ctx.run.max_skip_fraction).with_context(|| format!("stage {stage_index} ({name}) step {}", step + 1))?;
            // No rank had a sample left: there is nothing to step on (AdamW would still move the
            // weights on its moments), so the step is skipped and counted.
            let empty = tokens == 0;

            let lr = schedule.lr(step);
            let mut record = serde_json::Map::new();
            // The same on every rank (the report is the step's), so all take or skip the step.
            let finite = report.total.is_finite();
            let update = if finite && !empty {
                let w = &mut student.weights;
                let rep = match gllm.as_mut() {
                    Some(gl) => sync.step(be, &mut opt, &mut [&mut w.projector, &mut w.llm], &mut [&mut gproj, gl], lr as f32, overlap)?,
                    None => sync.step(be, &mut opt, &mut [&mut w.projector], &mut [&mut gproj], lr as f32, overlap)?,
                };
                record.insert("grad_norm".into(), json!(rep.grad_norm));
                !rep.skipped
            } else {
                sync.abandon(be, overlap)?;
                false
            };
            if empty {
                state.empty_steps += 1;
                if rank == 0 {
                    log(&bar, format!("stage {stage_index} ({name}) step {}: every sample failed at batch time, step skipped", step + 1));
                }
            } else if update {
                state.nonfinite_streak = 0;
            } else {
                state.nonfinite_streak += 1;
                state.nonfinite_total += 1;
                if rank == 0 {
                    log(&bar, format!("stage {stage_index} ({name}) step {}: non-finite loss or gradient, step skipped", step + 1));
                }
            }
            state.stage_step += 1;
            state.global_step += 1;
            state.optimizer_step = opt.step;

            let elapsed = step_start.elapsed().as_secs_f64();
            record.insert("stage".into(), json!(stage.label()));
            record.insert("stage_index".into(), json!(stage_index));
            record.insert("step".into(), json!(state.stage_step));
            record.insert("global_step".into(), json!(state.global_step));
            record.insert("lr".into(), json!(lr));
            record.extend(loss_fields(&report));
            if !objective.ce {
                // `ce` is then the student's cross-entropy on the labels, measured, not trained on.
                record.insert("ce_in_loss".into(), json!(false));
            }
            record.insert("tokens".into(), json!(tokens));
            record.insert("tokens_per_s".into(), json!(tokens as f64 / elapsed.max(1e-9)));
            record.insert("skipped_samples".into(), json!(skipped));
            record.insert("skipped_step".into(), json!(!update));
            if let Some(m) = ctx.metrics.as_deref_mut() {
                m.write(&Value::Object(record))?;
            }
            if state.nonfinite_streak >= ctx.run.max_nonfinite_streak {
                bar.abandon();
                bail!(
                    "stopping: {} optimizer steps in a row had a non-finite loss or gradient (stage {stage_index} ({name}), step {}); \
                     lower the learning rate or check the data",
                    state.nonfinite_streak,
                    step + 1
                );
            }
            bar.set_message(format!("loss {:.4}", report.total));
            bar.inc(1);
            if rank == 0 && ctx.run.log_every > 0 && (state.stage_step % ctx.run.log_every == 0 || state.stage_step == steps) {
                log(&bar, format!("{name} step {}/{steps} lr {lr:.3e} {}", state.stage_step, describe(&report)));
            }
            if state.stage_step == steps {
                state.stage_done = true;
            }
            let interval = ctx.run.checkpoint_every;
            if state.stage_done || (interval > 0 && state.global_step % interval == 0) {
                // Written once, by rank 0, with every rank's share of the optimizer state.
                if let Some(tensors) = sync.optimizer_tensors(be, &opt, set_names)? {
                    checkpoint::write(be, ctx.out_dir, state, &student.weights, Some(&tensors))?;
                }
            }
        }
        Ok(true)
    })?;
    if !completed {
        return Ok(());
    }
    bar.finish_and_clear();
    if rank == 0 {
        eprintln!("stage {stage_index} ({name}): {steps} steps in {:.1}s", started.elapsed().as_secs_f64());
    }
    Ok(())
}
