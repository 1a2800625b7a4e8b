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
    /// Keep an f32 master copy of the parameters (the update is applied to it and the stored
    /// parameters are its rounding). Without it, backends that store parameters in bf16 round
    /// each update stochastically (SPEC §1).
    pub master_weights: bool,
    /// Seed of the stochastic rounding's counter hash (mixed with the tensor's index).
    pub seed: u64,
}

impl Default for AdamWConfig {
    /// The HF Trainer defaults (SPEC §1).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            master_weights: false,
            seed: 0,
        }
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
/// `model.parameters()` is. The state lives in the backend's optimizer-state buffers
/// ([`Backend::State`]: f32 moments on CUDA, whatever the parameters are stored in).
///
/// Under ZeRO-1 a rank holds the state of only some tensors (`held`); the others have empty
/// state buffers and are neither updated nor saved by this rank.
pub struct AdamW<S> {
    pub cfg: AdamWConfig,
    pub m: Vec<ParamSet<S>>,
    pub v: Vec<ParamSet<S>>,
    /// f32 master copies of the parameters, when `cfg.master_weights` is set.
    pub master: Option<Vec<ParamSet<S>>>,
    /// `held[set][tensor]`: this optimizer keeps that tensor's state and updates it.
    pub held: Vec<Vec<bool>>,
    /// Updates applied so far (the next one is `step + 1`).
    pub step: u64,
}

/// A zero-filled state set laid out like `specs`; tensors not `held` get empty buffers.
fn zero_state<B: Backend>(be: &B, specs: &[crate::model::ParamSpec], held: &[bool]) -> Result<ParamSet<B::State>> {
    let bufs = specs.iter().zip(held).map(|(s, &h)| be.zeros_state(if h { s.numel() } else { 0 })).collect::<Result<_>>()?;
    Ok(ParamSet { specs: specs.to_vec(), bufs })
}

/// The per-tensor seed of the stochastic rounding: the run's seed mixed with the tensor's place,
/// so no two tensors share a noise pattern (splitmix64 finaliser).
fn tensor_seed(seed: u64, set: usize, index: usize) -> u64 {
    let mut z = seed ^ ((set as u64) << 48) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<S> AdamW<S> {
    /// State for every tensor of `params`.
    pub fn new<B: Backend<State = S>>(be: &B, params: &[&ParamSet<B::Buf>], cfg: AdamWConfig) -> Result<Self> {
        Self::holding(be, params, cfg, |_, _| true)
    }

    /// State only for the tensors `holds(set, tensor)` selects (ZeRO-1: those this rank owns).
    pub fn holding<B: Backend<State = S>>(be: &B, params: &[&ParamSet<B::Buf>], cfg: AdamWConfig, holds: impl Fn(usize, usize) -> bool) -> Result<Self> {
        let held: Vec<Vec<bool>> = params.iter().enumerate().map(|(s, p)| (0..p.specs.len()).map(|i| holds(s, i)).collect()).collect();
        let zeros = || params.iter().zip(&held).map(|(p, h)| zero_state(be, &p.specs, h)).collect::<Result<Vec<_>>>();
        let master = if cfg.master_weights {
            let sets = params
                .iter()
                .zip(&held)
                .map(|(p, h)| {
                    let bufs = p.bufs.iter().zip(h).map(|(b, &h)| if h { be.upload_state(&be.download(b)?) } else { be.zeros_state(0) }).collect::<Result<_>>()?;
                    Ok(ParamSet { specs: p.specs.clone(), bufs })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(sets)
        } else {
            None
        };
        Ok(AdamW { cfg, m: zeros()?, v: zeros()?, master, held, step: 0 })
    }

    /// Sets the master copies (if any) from the current parameters, e.g. after loading weights.
    pub fn sync_master<B: Backend<State = S>>(&mut self, be: &B, params: &[&ParamSet<B::Buf>]) -> Result<()> {
        if let Some(master) = &mut self.master {
            for ((ms, p), held) in master.iter_mut().zip(params).zip(&self.held) {
                for ((mb, b), _) in ms.bufs.iter_mut().zip(&p.bufs).zip(held).filter(|(_, &h)| h) {
                    *mb = be.upload_state(&be.download(b)?)?;
                }
            }
        }
        Ok(())
    }

    /// Clips and applies one update with learning rate `lr` to `params[i]` from `grads[i]`. A
    /// non-finite gradient norm skips the update (SPEC §6) and says so in the report.
    pub fn step<B: Backend<State = S>>(
        &mut self,
        be: &B,
        params: &mut [&mut ParamSet<B::Buf>],
        grads: &[&ParamSet<B::Buf>],
        lr: f32,
    ) -> Result<StepReport> {
        let all: Vec<&B::Buf> = grads.iter().flat_map(|g| g.bufs.iter()).collect();
        let grad_norm = be.sum_squares(&all)?.sqrt();
        self.apply(be, params, grads, lr, grad_norm)
    }

    /// The update of [`AdamW::step`] given the global gradient norm (computed across ranks in
    /// data-parallel training): clips by it, then updates the tensors this optimizer holds.
    pub fn apply<B: Backend<State = S>>(
        &mut self,
        be: &B,
        params: &mut [&mut ParamSet<B::Buf>],
        grads: &[&ParamSet<B::Buf>],
        lr: f32,
        grad_norm: f64,
    ) -> Result<StepReport> {
        anyhow::ensure!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "adamw: {} parameter sets and {} gradient sets for an optimizer over {}",
            params.len(),
            grads.len(),
            self.m.len()
        );
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
                if !self.held[s][i] {
                    continue;
                }
                let h = AdamWStep {
                    lr,
                    beta1: self.cfg.beta1,
                    beta2: self.cfg.beta2,
                    eps: self.cfg.eps,
                    weight_decay: if spec.decay { self.cfg.weight_decay } else { 0.0 },
                    step: self.step,
                    grad_scale: clip_coef as f32,
                    seed: tensor_seed(self.cfg.seed, s, i),
                };
                let master = self.master.as_mut().map(|ms| &mut ms[s].bufs[i]);
                be.adamw(h, &mut p.bufs[i], &g.bufs[i], &mut self.m[s].bufs[i], &mut self.v[s].bufs[i], master)?;
            }
        }
        Ok(StepReport { grad_norm, clip_coef, skipped: false })
    }
}
