//! AdamW as the Hugging Face Trainer runs it: decoupled weight decay on matrices only, bias
//! correction, and global gradient-norm clipping (`clip_grad_norm_`: coefficient
//! `max_norm / (norm + 1e-6)`, capped at 1) applied before the update.

use anyhow::Result;

use crate::backend::{AdamWStep, Backend};
use crate::model::{ParamSet, ParamSpec};

/// 4 Mi elements: the 0.5B student's tied embedding (155.6 M) becomes 38 pieces, every other
/// tensor of it one, so its state spreads evenly over up to ~100 ranks.
pub const DEFAULT_PIECE_ELEMS: usize = 1 << 22;

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
    /// Most elements one optimizer piece covers (a multiple of 8): larger tensors are cut into
    /// pieces, the unit ZeRO-1 spreads over ranks (see [`Piece`]).
    pub piece_elems: usize,
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
            piece_elems: DEFAULT_PIECE_ELEMS,
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

/// A run of one tensor's elements that the optimizer updates in one call. Tensors are cut into
/// pieces of at most [`AdamWConfig::piece_elems`] elements whatever the world size, so ZeRO-1 can
/// spread a large tensor's state over several ranks while every world size performs exactly the
/// same updates (on CUDA the stochastic-rounding noise is drawn per piece: its seed and its
/// element indices are the piece's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub set: usize,
    pub tensor: usize,
    pub start: usize,
    pub len: usize,
}

/// The pieces of `specs[set]`, in (set, tensor, start) order; an empty tensor has none.
pub fn pieces(specs: &[&[ParamSpec]], piece_elems: usize) -> Vec<Piece> {
    let size = piece_elems.max(8).next_multiple_of(8);
    let mut out = Vec::new();
    for (set, ss) in specs.iter().enumerate() {
        for (tensor, spec) in ss.iter().enumerate() {
            let n = spec.numel();
            out.extend((0..n).step_by(size).map(|start| Piece { set, tensor, start, len: size.min(n - start) }));
        }
    }
    out
}

/// The optimizer state of one piece.
pub struct PieceState<S> {
    pub m: S,
    pub v: S,
    /// f32 master copy of the piece's parameters, when `cfg.master_weights` is set.
    pub master: Option<S>,
}

/// AdamW state over the trainable parameter sets of a stage (e.g. projector and LLM): the
/// gradient norm for clipping is global over all of them, as `clip_grad_norm_` over
/// `model.parameters()` is. The state lives in the backend's optimizer-state buffers
/// ([`Backend::State`]: f32 moments on CUDA, whatever the parameters are stored in), one set per
/// [`Piece`]; under ZeRO-1 a rank holds the state of its pieces only and updates only them.
pub struct AdamW<S> {
    pub cfg: AdamWConfig,
    /// The parameter sets' layouts (names and shapes for checkpoints).
    pub specs: Vec<Vec<ParamSpec>>,
    /// Every piece of every trainable tensor, in (set, tensor, start) order.
    pub pieces: Vec<Piece>,
    /// `state[k]`: piece k's state, `None` where another rank holds it.
    pub state: Vec<Option<PieceState<S>>>,
    /// Updates applied so far (the next one is `step + 1`).
    pub step: u64,
}

/// The per-tensor seed of the stochastic rounding: the run's seed mixed with the tensor's place,
/// so no two tensors share a noise pattern (splitmix64 finaliser).
fn tensor_seed(seed: u64, set: usize, index: usize) -> u64 {
    let mut z = seed ^ ((set as u64) << 48) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A piece's seed: its tensor's for the first piece, mixed again with the start for the others.
fn piece_seed(seed: u64, p: &Piece) -> u64 {
    let t = tensor_seed(seed, p.set, p.tensor);
    if p.start == 0 {
        t
    } else {
        tensor_seed(t, 0, p.start)
    }
}

/// Host values of piece `p` of `params`, downloading each tensor once for its consecutive pieces.
struct TensorCache {
    key: Option<(usize, usize)>,
    values: Vec<f32>,
}

impl TensorCache {
    fn piece<B: Backend>(&mut self, be: &B, params: &[&ParamSet<B::Buf>], p: &Piece) -> Result<&[f32]> {
        if self.key != Some((p.set, p.tensor)) {
            self.values = be.download(&params[p.set].bufs[p.tensor])?;
            self.key = Some((p.set, p.tensor));
        }
        Ok(&self.values[p.start..p.start + p.len])
    }
}

impl<S> AdamW<S> {
    /// State for every tensor of `params`.
    pub fn new<B: Backend<State = S>>(be: &B, params: &[&ParamSet<B::Buf>], cfg: AdamWConfig) -> Result<Self> {
        Self::holding(be, params, cfg, |_| true)
    }

    /// State only for the pieces whose index `holds` selects (ZeRO-1: those this rank owns).
    pub fn holding<B: Backend<State = S>>(be: &B, params: &[&ParamSet<B::Buf>], cfg: AdamWConfig, holds: impl Fn(usize) -> bool) -> Result<Self> {
        let specs: Vec<Vec<ParamSpec>> = params.iter().map(|p| p.specs.clone()).collect();
        let spec_refs: Vec<&[ParamSpec]> = specs.iter().map(Vec::as_slice).collect();
        let pieces = pieces(&spec_refs, cfg.piece_elems);
        let mut cache = TensorCache { key: None, values: Vec::new() };
        let mut state = Vec::with_capacity(pieces.len());
        for (k, p) in pieces.iter().enumerate() {
            state.push(if holds(k) {
                let master = if cfg.master_weights { Some(be.upload_state(cache.piece(be, params, p)?)?) } else { None };
                Some(PieceState { m: be.zeros_state(p.len)?, v: be.zeros_state(p.len)?, master })
            } else {
                None
            });
        }
        Ok(AdamW { cfg, specs, pieces, state, step: 0 })
    }

    /// Sets the master copies (if any) from the current parameters, e.g. after loading weights.
    pub fn sync_master<B: Backend<State = S>>(&mut self, be: &B, params: &[&ParamSet<B::Buf>]) -> Result<()> {
        let mut cache = TensorCache { key: None, values: Vec::new() };
        for (p, st) in self.pieces.iter().zip(&mut self.state) {
            if let Some(master) = st.as_mut().and_then(|s| s.master.as_mut()) {
                *master = be.upload_state(cache.piece(be, params, p)?)?;
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
    /// data-parallel training): clips by it, then updates the pieces this optimizer holds.
    pub fn apply<B: Backend<State = S>>(
        &mut self,
        be: &B,
        params: &mut [&mut ParamSet<B::Buf>],
        grads: &[&ParamSet<B::Buf>],
        lr: f32,
        grad_norm: f64,
    ) -> Result<StepReport> {
        anyhow::ensure!(
            params.len() == self.specs.len() && grads.len() == self.specs.len(),
            "adamw: {} parameter sets and {} gradient sets for an optimizer over {}",
            params.len(),
            grads.len(),
            self.specs.len()
        );
        if !grad_norm.is_finite() {
            return Ok(StepReport { grad_norm, clip_coef: 0.0, skipped: true });
        }
        let clip_coef = match self.cfg.max_grad_norm {
            Some(max) => (max as f64 / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        self.step += 1;
        for (p, st) in self.pieces.iter().zip(&mut self.state) {
            let Some(st) = st else { continue };
            let h = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if self.specs[p.set][p.tensor].decay { self.cfg.weight_decay } else { 0.0 },
                step: self.step,
                grad_scale: clip_coef as f32,
                seed: piece_seed(self.cfg.seed, p),
            };
            be.adamw(h, &mut params[p.set].bufs[p.tensor], &grads[p.set].bufs[p.tensor], p.start, &mut st.m, &mut st.v, st.master.as_mut())?;
        }
        Ok(StepReport { grad_norm, clip_coef, skipped: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_cut_into_pieces_of_at_most_the_piece_size() {
        let a = [ParamSpec::matrix("w".into(), 10, 10), ParamSpec::vector("b".into(), 0), ParamSpec::vector("c".into(), 16)];
        let b = [ParamSpec::vector("d".into(), 5)];
        let p = pieces(&[&a, &b], 40);
        let got: Vec<(usize, usize, usize, usize)> = p.iter().map(|p| (p.set, p.tensor, p.start, p.len)).collect();
        assert_eq!(got, [(0, 0, 0, 40), (0, 0, 40, 40), (0, 0, 80, 20), (0, 2, 0, 16), (1, 0, 0, 5)]);
        // Sizes are rounded up to a multiple of 8 (16-byte aligned bf16 pieces).
        assert_eq!(pieces(&[&a], 30)[1].start, 32);
    }
}
