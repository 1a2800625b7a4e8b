//! AdamW as the Hugging Face Trainer runs it: decoupled weight decay on matrices only, bias
//! correction, and global gradient-norm clipping (`clip_grad_norm_`: coefficient
//! `max_norm / (norm + 1e-6)`, capped at 1) applied before the update.

use anyhow::Result;

use crate::backend::{AdamWStep, Backend};
use crate::model::ParamSet;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clipping threshold; `None` disables clipping.
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// The HF Trainer defaults (SPEC §1).
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, max_grad_norm: Some(1.0) }
    }
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_coef: f64,
    /// The gradient norm was not finite: nothing was updated and the step count did not move.
    pub skipped: bool,
}

/// AdamW state over the trainable parameter sets of a stage (e.g. projector and LLM): the
/// gradient norm for clipping is global over all of them, as `clip_grad_norm_` over
/// `model.parameters()` is.
pub struct AdamW<Buf> {
    pub cfg: AdamWConfig,
    pub m: Vec<ParamSet<Buf>>,
    pub v: Vec<ParamSet<Buf>>,
    /// Updates applied so far (the next one is `step + 1`).
    pub step: u64,
}

impl<Buf> AdamW<Buf> {
    pub fn new<B: Backend<Buf = Buf>>(be: &B, params: &[&ParamSet<Buf>], cfg: AdamWConfig) -> Result<Self> {
        let zeros = || params.iter().map(|p| ParamSet::zeros(be, &p.specs)).collect::<Result<Vec<_>>>();
        Ok(AdamW { cfg, m: zeros()?, v: zeros()?, step: 0 })
    }

    /// Clips and applies one update with learning rate `lr` to `params[i]` from `grads[i]`. A
    /// non-finite gradient norm skips the update (SPEC §6) and says so in the report.
    pub fn step<B: Backend<Buf = Buf>>(
        &mut self,
        be: &B,
        params: &mut [&mut ParamSet<Buf>],
        grads: &[&ParamSet<Buf>],
        lr: f32,
    ) -> Result<StepReport> {
        anyhow::ensure!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "adamw: {} parameter sets and {} gradient sets for an optimizer over {}",
            params.len(),
            grads.len(),
            self.m.len()
        );
        let mut sq = 0.0;
        for g in grads {
            for b in &g.bufs {
                sq += be.sum_squares(b)?;
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepReport { grad_norm, clip_coef: 0.0, skipped: true });
        }
        let clip_coef = match self.cfg.max_grad_norm {
            Some(max) => (max as f64 / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.step += 1;
        for (s, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            for (i, spec) in g.specs.iter().enumerate() {
                let h = AdamWStep {
                    lr,
                    beta1: self.cfg.beta1,
                    beta2: self.cfg.beta2,
                    eps: self.cfg.eps,
                    weight_decay: if spec.decay { self.cfg.weight_decay } else { 0.0 },
                    step: self.step,
                    grad_scale: clip_coef as f32,
                };
                be.adamw(h, &mut p.bufs[i], &g.bufs[i], &mut self.m[s].bufs[i], &mut self.v[s].bufs[i])?;
            }
        }
        Ok(StepReport { grad_norm, clip_coef, skipped: false })
    }
}
