//! The `mlp2x_gelu` projector: Linear(D_v → H) → GELU (erf) → Linear(H → H), both with bias. It maps
//! vision features into the LLM's embedding space; it trains in every stage, so it has a backward
//! (its input, the frozen tower's output, needs no gradient). Names follow HF
//! `LlavaForConditionalGeneration` (`linear_1`, `linear_2`) under a prefix chosen at load.

use anyhow::Result;

use super::params::{ParamId, ParamSet, ParamSpec};
use crate::backend::{Backend, GeluKind, Gemm};

pub struct Projector {
    pub d_in: usize,
    pub d_out: usize,
    pub specs: Vec<ParamSpec>,
    w1: ParamId,
    b1: ParamId,
    w2: ParamId,
    b2: ParamId,
}

/// What the backward needs.
pub struct ProjectorActs<Buf> {
    input: Buf,
    pre: Buf,
    act: Buf,
}

impl Projector {
    pub fn new(d_in: usize, d_out: usize) -> Self {
        let specs = vec![
            ParamSpec::matrix("linear_1.weight".into(), d_out, d_in),
            ParamSpec::vector("linear_1.bias".into(), d_out),
            ParamSpec::matrix("linear_2.weight".into(), d_out, d_out),
            ParamSpec::vector("linear_2.bias".into(), d_out),
        ];
        Projector { d_in, d_out, specs, w1: ParamId(0), b1: ParamId(1), w2: ParamId(2), b2: ParamId(3) }
    }

    /// Projects `input [rows, d_in]` to `[rows, d_out]`.
    pub fn forward<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, input: B::Buf) -> Result<(B::Buf, ProjectorActs<B::Buf>)> {
        let rows = be.len(&input) / self.d_in;
        let h = self.d_out;
        let mut pre = be.empty(rows * h)?;
        be.gemm(Gemm::linear(rows, h, self.d_in), &input, w.get(self.w1), &mut pre)?;
        be.add_bias(&mut pre, w.get(self.b1), rows)?;
        let mut act = be.empty(rows * h)?;
        be.gelu(&pre, &mut act, GeluKind::Erf)?;
        let mut out = be.empty(rows * h)?;
        be.gemm(Gemm::linear(rows, h, h), &act, w.get(self.w2), &mut out)?;
        be.add_bias(&mut out, w.get(self.b2), rows)?;
        Ok((out, ProjectorActs { input, pre, act }))
    }

    /// Accumulates the projector's weight gradients from `dout [rows, d_out]`.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        acts: &ProjectorActs<B::Buf>,
        dout: &B::Buf,
        grads: &mut ParamSet<B::Buf>,
    ) -> Result<()> {
        let rows = be.len(dout) / self.d_out;
        let h = self.d_out;
        be.gemm(Gemm::linear_weight_grad(rows, h, h), dout, &acts.act, grads.get_mut(self.w2))?;
        be.bias_grad(dout, grads.get_mut(self.b2), rows)?;
        let mut dact = be.empty(rows * h)?;
        be.gemm(Gemm::linear_input_grad(rows, h, h, false), dout, w.get(self.w2), &mut dact)?;
        let mut dpre = be.empty(rows * h)?;
        be.gelu_backward(&acts.pre, &dact, &mut dpre, GeluKind::Erf)?;
        be.gemm(Gemm::linear_weight_grad(rows, h, self.d_in), &dpre, &acts.input, grads.get_mut(self.w1))?;
        be.bias_grad(&dpre, grads.get_mut(self.b1), rows)
    }
}
