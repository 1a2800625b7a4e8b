//! The LLaVA-KD objective (SPEC §1) on top of the backend's fused losses:
//!
//! total = L_ce + α·(L_res + L_prompt) + β·L_vis + γ·L_rel
//!
//! * L_ce: next-token cross-entropy over the student's full vocabulary (it can be switched off,
//!   for distillation alone: it is then still measured and reported, but not in the total and
//!   with no gradient);
//! * L_res, L_prompt, L_vis: τ²·D(p_t, p_s) with p = softmax(logits/τ) over the first
//!   min(V_s, V_t) columns, D the stage's divergence (forward KL(p_t‖p_s) by default; the others
//!   are defined in [`crate::backend::divergence`]), on the rows [`select`] describes (L_prompt is the text-side KL of the
//!   prompt tokens, off by default, and shares α with L_res);
//! * L_rel: per image, 1 − cos(vec Z_s·Z_sᵀ, vec Z_t·Z_tᵀ) over the image's visual rows (same
//!   kept columns, no temperature).
//!
//! Each term is a mean over its rows (images for L_rel) in the **whole optimizer step**: the
//! caller passes the step-wide [`LossCounts`] (the sum of [`LossCounts::of`] over the step's
//! micro-batches), each micro-batch contributes Σ(its rows)/count, and the gradients and reported
//! values of the micro-batches add up to those of the step. A term with no rows in the whole step
//! is 0 with no gradient.

pub mod fused_head;
pub mod relation_identity;
pub mod select;

pub use fused_head::{frozen_head_gram, fused_distill_loss, lm_head_grad, FusedHeadOptions, HeadSide, RelationForm};
pub use select::{visual_ranges, LossCounts, LossInputs, SelectedRows};

use anyhow::{bail, ensure, Result};

use crate::backend::{Backend, Divergence, KlShape};

/// Which rows the KL part of MDist distils (paper Table A6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KlTargets {
    /// L_res: rows predicting a response token.
    pub response: bool,
    /// L_prompt: rows predicting a prompt-text token.
    pub prompt: bool,
    /// L_vis: rows at the visual positions.
    pub visual: bool,
}

impl Default for KlTargets {
    /// Response and visual, as LLaVA-KD distils.
    fn default() -> Self {
        KlTargets { response: true, prompt: false, visual: true }
    }
}

/// The objective of one stage: weights, which terms are on, and the KL temperature.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillConfig {
    /// L_ce in the objective (always in the paper's stages). Off, the student learns from the
    /// teacher alone: the distillation sanity experiment of the study.
    pub ce: bool,
    /// Weight of L_res (and of L_prompt).
    pub alpha: f32,
    /// Weight of L_vis.
    pub beta: f32,
    /// Weight of L_rel.
    pub gamma: f32,
    /// Which KL targets MDist uses.
    pub targets: KlTargets,
    /// Multimodal distillation (the KL terms) on or off (paper Table A5).
    pub mdist: bool,
    /// Relation distillation (L_rel) on or off (paper Table A5).
    pub rdist: bool,
    /// Softmax temperature τ of the KL terms (each is multiplied by τ²); 1 by default.
    pub temperature: f32,
    /// The divergence of the MDist terms (response, prompt, visual); forward KL by default.
    pub divergence: Divergence,
}

impl Default for DistillConfig {
    /// The DPT/DFT defaults: α = β = 1, γ = 0.5 (paper Table A4 row 1), response + visual KL,
    /// MDist and RDist on, τ = 1, forward KL.
    fn default() -> Self {
        DistillConfig {
            ce: true,
            alpha: 1.0,
            beta: 1.0,
            gamma: 0.5,
            targets: KlTargets::default(),
            mdist: true,
            rdist: true,
            temperature: 1.0,
            divergence: Divergence::Fkl,
        }
    }
}

impl DistillConfig {
    /// Cross-entropy only (the PT and SFT stages): no teacher needed.
    pub fn ce_only() -> Self {
        DistillConfig { mdist: false, rdist: false, ..Self::default() }
    }

    pub fn response_on(&self) -> bool {
        self.mdist && self.targets.response
    }
    pub fn prompt_on(&self) -> bool {
        self.mdist && self.targets.prompt
    }
    pub fn visual_on(&self) -> bool {
        self.mdist && self.targets.visual
    }
    pub fn relation_on(&self) -> bool {
        self.rdist
    }
    /// The weight of L_ce in the total: 1, or 0 when it is off (then its gradient scale is 0:
    /// the term is still computed, for the report, but moves nothing).
    pub fn ce_weight(&self) -> f32 {
        if self.ce {
            1.0
        } else {
            0.0
        }
    }

    /// The total of a report's terms under this objective (terms that are off count 0).
    pub fn total(&self, r: &LossReport) -> f64 {
        let (a, b, g) = (self.alpha as f64, self.beta as f64, self.gamma as f64);
        self.ce_weight() as f64 * r.ce
            + a * (r.response.unwrap_or(0.0) + r.prompt.unwrap_or(0.0))
            + b * r.visual.unwrap_or(0.0)
            + g * r.relation.unwrap_or(0.0)
    }

    /// Whether any distillation term is on (then teacher logits are required).
    pub fn needs_teacher(&self) -> bool {
        self.response_on() || self.prompt_on() || self.visual_on() || self.relation_on()
    }

    /// Weights finite and ≥ 0, temperature finite and > 0, and some term on.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.ce || self.needs_teacher(), "the objective has no term: cross-entropy is off and so is every distillation term");
        for (name, w) in [("alpha", self.alpha), ("beta", self.beta), ("gamma", self.gamma)] {
            ensure!(w.is_finite() && w >= 0.0, "distillation weight {name} must be finite and non-negative, got {w}");
        }
        let t = self.temperature;
        ensure!(t.is_finite() && t > 0.0, "distillation temperature must be positive and finite, got {t}");
        Ok(())
    }
}

/// Logits of one model: a `[rows, vocab]` buffer.
#[derive(Clone, Copy, Debug)]
pub struct Logits<'a, Buf> {
    pub data: &'a Buf,
    pub vocab: usize,
}

/// Each term's value: this micro-batch's share of the step-wide mean (Σ its rows / step count),
/// so [`LossReport::add`] over the step's micro-batches gives the step's means. `None` for a term
/// that is off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossReport {
    /// The student's cross-entropy on the labels: measured even when the objective leaves it out.
    pub ce: f64,
    pub response: Option<f64>,
    pub prompt: Option<f64>,
    pub visual: Option<f64>,
    pub relation: Option<f64>,
    /// L_ce (only when the objective's CE is on) + α·(L_res + L_prompt) + β·L_vis + γ·L_rel.
    pub total: f64,
}

impl LossReport {
    /// Adds another micro-batch's report (terms off in either stay as the other has them).
    pub fn add(&mut self, o: &LossReport) {
        fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
            match (a, b) {
                (Some(x), Some(y)) => Some(x + y),
                (x, None) => x,
                (None, y) => y,
            }
        }
        self.ce += o.ce;
        self.response = add(self.response, o.response);
        self.prompt = add(self.prompt, o.prompt);
        self.visual = add(self.visual, o.visual);
        self.relation = add(self.relation, o.relation);
        self.total += o.total;
    }
}

/// A micro-batch's loss terms whose sums are still where the backend computed them: slots
/// `at .. at + PendingReport::SLOTS` of a [`Backend::Sums`] (on CUDA, device memory). The training
/// step reads its sums once ([`Backend::read_sums`]) and [`PendingReport::resolve`]s each
/// micro-batch's report from them, so no loss value makes the host wait for the device mid-step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PendingReport {
    at: usize,
    cfg: DistillConfig,
    step: LossCounts,
    distils: bool,
}

impl PendingReport {
    /// Slots one micro-batch's terms take: Σ CE, Σ L_res, Σ L_prompt, Σ L_vis, Σ L_rel.
    pub const SLOTS: usize = 5;
    const CE: usize = 0;
    const RESPONSE: usize = 1;
    const PROMPT: usize = 2;
    const VISUAL: usize = 3;
    const RELATION: usize = 4;

    /// The terms of `cfg` (the distillation terms only when `distils`: a teacher was used) with
    /// the step-wide counts `step`, summed at `at..`.
    fn new(at: usize, cfg: &DistillConfig, step: &LossCounts, distils: bool) -> Self {
        PendingReport { at, cfg: *cfg, step: *step, distils }
    }

    /// The slot of term `k` (one of the constants above).
    fn slot(&self, k: usize) -> usize {
        self.at + k
    }

    /// The report from the read-back sums (each term a mean over the step's count).
    pub fn resolve(&self, sums: &[f64]) -> Result<LossReport> {
        ensure!(
            self.at + Self::SLOTS <= sums.len(),
            "loss report: its sums are slots {}..{}, but only {} were read back",
            self.at,
            self.at + Self::SLOTS,
            sums.len()
        );
        let v = |k: usize| sums[self.slot(k)];
        let (cfg, step) = (&self.cfg, &self.step);
        let mut report = LossReport { ce: mean(v(Self::CE), step.ce), ..LossReport::default() };
        if self.distils {
            let term = |on: bool, k: usize, count: usize| on.then(|| mean(v(k), count));
            report.response = term(cfg.response_on(), Self::RESPONSE, step.response);
            report.prompt = term(cfg.prompt_on(), Self::PROMPT, step.prompt);
            report.visual = term(cfg.visual_on(), Self::VISUAL, step.visual);
            report.relation = term(cfg.relation_on(), Self::RELATION, step.images);
        }
        report.total = cfg.total(&report);
        Ok(report)
    }
}

impl LossCounts {
    /// Checks that these step-wide counts are at least `batch`'s for every term `cfg` uses: a
    /// caller that passed one micro-batch's counts for a whole step would scale every mean wrongly.
    /// `what` names the caller in the error.
    pub fn check_covers(&self, batch: &LossCounts, cfg: &DistillConfig, what: &str) -> Result<()> {
        for (name, on, step, batch) in [
            ("cross-entropy targets", true, self.ce, batch.ce),
            ("response-KL rows", cfg.response_on(), self.response, batch.response),
            ("prompt-KL rows", cfg.prompt_on(), self.prompt, batch.prompt),
            ("visual-KL rows", cfg.visual_on(), self.visual, batch.visual),
            ("images", cfg.relation_on(), self.images, batch.images),
        ] {
            ensure!(
                !on || step >= batch,
                "{what}: the step-wide count of {name} ({step}) is smaller than this micro-batch's ({batch}); \
                 pass the sum of LossCounts::of over every micro-batch of the step"
            );
        }
        Ok(())
    }
}

/// Columns the KL and relation terms use: min(V_s, V_t).
pub fn kept_vocab(student_vocab: usize, teacher_vocab: usize) -> usize {
    student_vocab.min(teacher_vocab)
}

/// The line to log once when the vocabularies differ (SPEC §1), or `None` when they agree.
pub fn vocab_mismatch_note(student_vocab: usize, teacher_vocab: usize) -> Option<String> {
    (student_vocab != teacher_vocab).then(|| {
        format!(
            "student vocabulary {student_vocab} ≠ teacher vocabulary {teacher_vocab}: the KL and relation \
             terms use the first {} columns of both; cross-entropy uses the student's full vocabulary",
            kept_vocab(student_vocab, teacher_vocab)
        )
    })
}

/// `sum / count`, 0 for an empty term.
fn mean(sum: f64, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// `weight / count` as the backend's gradient scale, 0 for an empty term.
fn grad_scale(weight: f32, count: usize) -> f32 {
    if count == 0 {
        0.0
    } else {
        (weight as f64 / count as f64) as f32
    }
}

/// Computes every enabled term of the objective on one micro-batch and **writes** (overwrites)
/// d(total)/d(student logits) into `dstudent` (`[rows, V_s]`, zero on rows no term uses).
///
/// `step` holds the step-wide counts (each at least this micro-batch's own). `teacher` must be
/// given when `cfg` enables any distillation term; it is ignored otherwise. Errors (never panics)
/// on a missing teacher, mismatched shapes, an inconsistent layout, or step counts smaller than
/// the micro-batch's.
pub fn distill_loss<B: Backend>(
    be: &B,
    cfg: &DistillConfig,
    inputs: &LossInputs,
    student: Logits<'_, B::Buf>,
    teacher: Option<Logits<'_, B::Buf>>,
    step: &LossCounts,
    dstudent: &mut B::Buf,
) -> Result<LossReport> {
    cfg.validate()?;
    let batch = LossCounts::of(inputs)?;
    let n = inputs.len();
    let vs = student.vocab;
    ensure!(vs > 0, "distill loss: the student vocabulary is empty");
    let got = be.len(student.data);
    ensure!(got == n * vs, "distill loss: student logits have {got} elements, expected {n} rows × {vs} = {}", n * vs);
    let got = be.len(dstudent);
    ensure!(got == n * vs, "distill loss: the student gradient has {got} elements, expected {n} rows × {vs} = {}", n * vs);
    let teacher = match teacher {
        Some(t) if cfg.needs_teacher() => {
            ensure!(t.vocab > 0, "distill loss: the teacher vocabulary is empty");
            let got = be.len(t.data);
            ensure!(
                got == n * t.vocab,
                "distill loss: teacher logits have {got} elements, expected {n} rows × {} = {}",
                t.vocab,
                n * t.vocab
            );
            Some(t)
        }
        Some(_) => None,
        None if cfg.needs_teacher() => {
            let on: Vec<&str> = [
                (cfg.response_on(), "L_res"),
                (cfg.prompt_on(), "L_prompt"),
                (cfg.visual_on(), "L_vis"),
                (cfg.relation_on(), "L_rel"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect();
            bail!("distill loss: teacher logits are required for {} but none were given", on.join(", "));
        }
        None => None,
    };
    step.check_covers(&batch, cfg, "distill loss")?;

    // Cross-entropy first: it overwrites the gradient buffer (zero on rows without a target);
    // every other term accumulates onto it.
    let pending = PendingReport::new(0, cfg, step, teacher.is_some());
    let mut sums = be.sums(PendingReport::SLOTS)?;
    let targets = inputs.ce_targets()?;
    be.cross_entropy_into(student.data, &targets, vs, grad_scale(cfg.ce_weight(), step.ce), dstudent, &mut sums, pending.slot(PendingReport::CE))?;

    if let Some(t) = teacher {
        let shape = KlShape {
            student_vocab: vs,
            teacher_vocab: t.vocab,
            kept: kept_vocab(vs, t.vocab),
            temperature: cfg.temperature,
            divergence: cfg.divergence,
        };
        let rows = inputs.rows();
        for (on, rows, weight, count, k) in [
            (cfg.response_on(), &rows.response, cfg.alpha, step.response, PendingReport::RESPONSE),
            (cfg.prompt_on(), &rows.prompt, cfg.alpha, step.prompt, PendingReport::PROMPT),
            (cfg.visual_on(), &rows.visual, cfg.beta, step.visual, PendingReport::VISUAL),
        ] {
            if on && !rows.is_empty() {
                be.softmax_kl_into(student.data, t.data, shape, rows, grad_scale(weight, count), dstudent, &mut sums, pending.slot(k))?;
            }
        }
        if cfg.relation_on() && !inputs.images.is_empty() {
            let images: Vec<(u32, u32)> = inputs.images.iter().map(|r| (r.start as u32, r.len() as u32)).collect();
            let slot = pending.slot(PendingReport::RELATION);
            be.relation_loss_into(student.data, t.data, shape, &images, grad_scale(cfg.gamma, step.images), dstudent, &mut sums, slot)?;
        }
    }
    pending.resolve(&be.read_sums(&sums)?)
}
