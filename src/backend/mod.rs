//! The backend boundary: every numerical op the model, the losses and the optimizer use.
//!
//! Model code is written once, generic over [`Backend`]; the CPU backend (`cpu`, generic over f32
//! and f64) is the reference every other backend is tested against. Buffers are flat and row-major;
//! shapes travel as explicit dimensions (llm.c style), so a backend can keep device memory in a few
//! large allocations. Small index arrays (token ids, positions, labels, sequence lengths) are passed
//! as host slices: they are tiny next to the activations and every backend can stage them itself.
//!
//! Conventions shared by all ops:
//! - "accumulate" outputs are added to (`+=`), so gradients of shared weights and of tensors used
//!   twice sum up without extra buffers; all other outputs are overwritten.
//! - Token-major layouts: activations are `[T, features]`, attention heads are interleaved as
//!   `[T, heads, head_dim]`, sequences are packed back to back (`seq_lens`), so padding costs
//!   nothing and influences nothing.

pub mod cpu;
pub mod cuda;
pub mod divergence;

pub use divergence::Divergence;

use anyhow::{bail, ensure, Result};

/// The label value that marks a position without a cross-entropy target.
pub const IGNORE_INDEX: i32 = -100;

/// `C[m,n] = alpha · op(A) · op(B) + beta · C`, row-major, `op(X) = Xᵀ` when `trans_*` is set.
/// A is `[m,k]` (`[k,m]` when transposed), B is `[k,n]` (`[n,k]` when transposed): weights stored
/// as Hugging Face does, `[out, in]`, are used as `x · Wᵀ` with `trans_b = true`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `C = A · Bᵀ`: a linear layer's forward with `[out, in]` weights.
    pub fn linear(rows: usize, out: usize, inp: usize) -> Self {
        Gemm { m: rows, n: out, k: inp, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 }
    }
    /// `C (+)= A · B`: the input gradient of a linear layer (`dX = dY · W`).
    pub fn linear_input_grad(rows: usize, out: usize, inp: usize, accumulate: bool) -> Self {
        Gemm {
            m: rows,
            n: inp,
            k: out,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: if accumulate { 1.0 } else { 0.0 },
        }
    }
    /// `C += Aᵀ · B`: the weight gradient of a linear layer (`dW += dYᵀ · X`), always accumulated.
    pub fn linear_weight_grad(rows: usize, out: usize, inp: usize) -> Self {
        Gemm { m: out, n: inp, k: rows, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 }
    }
}

/// Shape of an attention call over packed sequences.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

/// Which GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluKind {
    /// `x·Φ(x)` with the exact normal CDF (PyTorch `gelu`, the projector's `mlp2x_gelu`).
    Erf,
    /// The tanh approximation (`gelu_pytorch_tanh`, SigLIP's MLP).
    Tanh,
}

/// Logit layouts of a distillation loss: row strides of the student and teacher logits, and how
/// many leading columns are distilled (`min(V_s, V_t)`), with the softmax temperature and the
/// divergence (the relation loss ignores both).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlShape {
    pub student_vocab: usize,
    pub teacher_vocab: usize,
    pub kept: usize,
    pub temperature: f32,
    pub divergence: Divergence,
}

/// One AdamW update's hyper-parameters (PyTorch `AdamW` semantics, decoupled weight decay).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies the gradient before use (global-norm clipping coefficient).
    pub grad_scale: f32,
    /// Seed of the counter hash (seed, step, element index) that drives stochastic rounding where
    /// parameters are stored in bf16 without an f32 master copy; backends that store parameters
    /// in f32 or wider ignore it.
    pub seed: u64,
}

/// The op set. Every op that anything trains through has a backward.
pub trait Backend: Send + Sync {
    /// A flat buffer of the backend's storage type.
    type Buf: Send + Sync;
    /// A flat buffer of optimizer state (AdamW moments, master weights): f32 or wider on every
    /// backend, whatever `Buf` stores (the CUDA backend keeps bf16 parameters with f32 moments).
    type State: Send + Sync;
    /// f64 slots the loss ops (and the gradient norm) add their values to, where the backend
    /// computes them: on CUDA a device buffer, so a training step reads all its scalars back at
    /// once ([`Backend::read_sums`]) instead of waiting for the device after every loss op.
    type Sums: Send + Sync;

    fn name(&self) -> String;

    // ---- memory ----
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// A buffer for an op to overwrite whole (an output, never an accumulator): its contents are
    /// unspecified until then. On CUDA it skips the zero-fill (a memset per op); the simulated
    /// device fills it with NaN, so an op that reads it before writing shows in every test.
    fn empty(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// Host f32 → buffer (converting to the storage type).
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Buffer → host f32.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// A zero-filled optimizer-state buffer.
    fn zeros_state(&self, len: usize) -> Result<Self::State>;
    /// Host f32 → optimizer-state buffer (checkpoint resume, master weights from the parameters).
    fn upload_state(&self, data: &[f32]) -> Result<Self::State>;
    /// Optimizer-state buffer → host f32 (checkpoints).
    fn download_state(&self, buf: &Self::State) -> Result<Vec<f32>>;
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// `n` sums, all 0.
    fn sums(&self, n: usize) -> Result<Self::Sums>;
    /// The sums' values (on CUDA: one device-to-host copy, which waits for the queued work).
    fn read_sums(&self, sums: &Self::Sums) -> Result<Vec<f64>>;
    /// A copy of `buf` in a new buffer.
    fn duplicate(&self, buf: &Self::Buf) -> Result<Self::Buf> {
        let n = self.len(buf);
        let mut out = self.empty(n)?;
        self.copy_range(buf, 0, &mut out, 0, n)?;
        Ok(out)
    }
    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy_range(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        len: usize,
    ) -> Result<()>;

    // ---- linear algebra ----
    fn gemm(&self, g: Gemm, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()>;
    /// `x[r, :] += bias` for each of `rows` rows of width `bias.len()`.
    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize) -> Result<()>;
    /// Accumulate: `dbias += Σ_r dy[r, :]`.
    fn bias_grad(&self, dy: &Self::Buf, dbias: &mut Self::Buf, rows: usize) -> Result<()>;
    /// Accumulate: `dst += src` (residual adds and gradient sums).
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()>;
    /// Σ x² over all the buffers, accumulated in f64 (the global gradient norm takes every
    /// gradient tensor in one call: on CUDA one read-back for all of them).
    fn sum_squares(&self, xs: &[&Self::Buf]) -> Result<f64> {
        let whole: Vec<(&Self::Buf, std::ops::Range<usize>)> = xs.iter().map(|x| (*x, 0..self.len(x))).collect();
        self.sum_squares_ranges(&whole)
    }
    /// Σ x² over an element range of each buffer (the ranges a rank owns under ZeRO-1), in f64,
    /// summed range by range in order; a range past its buffer is an error.
    fn sum_squares_ranges(&self, parts: &[(&Self::Buf, std::ops::Range<usize>)]) -> Result<f64> {
        Ok(resolved(self, 1, |s| self.sum_squares_into(parts, s, 0))?[0])
    }
    /// [`Backend::sum_squares_ranges`] added into slot `slot` of `sums` (no read-back).
    fn sum_squares_into(&self, parts: &[(&Self::Buf, std::ops::Range<usize>)], sums: &mut Self::Sums, slot: usize) -> Result<()>;

    // ---- embeddings ----
    /// `out[t, :] = table[ids[t], :]`; an id ≥ rows of the table is an error.
    fn embedding(&self, table: &Self::Buf, ids: &[u32], dim: usize, out: &mut Self::Buf) -> Result<()>;
    /// Accumulate: `dtable[ids[t], :] += dout[t, :]`.
    fn embedding_backward(
        &self,
        dout: &Self::Buf,
        ids: &[u32],
        dim: usize,
        dtable: &mut Self::Buf,
    ) -> Result<()>;

    // ---- normalisation ----
    /// RMSNorm (statistics in f32 or better): `out = x · rsqrt(mean(x²) + eps) · w`; saves `rstd[rows]`.
    fn rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        eps: f32,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Result<()>;
    /// Writes `dx` (overwritten) and accumulates `dw`.
    fn rmsnorm_backward(
        &self,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
    ) -> Result<()>;

    /// LayerNorm forward (the frozen vision tower): `out = (x − mean) · rstd · w + b` per row.
    fn layernorm(&self, x: &Self::Buf, w: &Self::Buf, b: &Self::Buf, eps: f32, out: &mut Self::Buf) -> Result<()>;

    // ---- positions (RoPE, on the stacked Q/K/V projection) ----
    /// Splits a fused Q/K/V projection `qkv [T, q_dim + 2·kv_dim]` (each row: the queries, then the
    /// keys, then the values) into `q [T, q_dim]`, `k [T, kv_dim]`, `v [T, kv_dim]`, adding the
    /// projection's `bias [q_dim + 2·kv_dim]` when given (so the bias costs no pass of its own) and
    /// rotating q and k by RoPE on the way (Hugging Face's rotate-half: the pair (x[i], x[i + D/2])
    /// of each head by the angle pos·θ^(−2i/head_dim), computed in f64). Overwrites q, k, v.
    #[allow(clippy::too_many_arguments)]
    fn qkv_split_rope(
        &self,
        qkv: &Self::Buf,
        bias: Option<&Self::Buf>,
        positions: &[u32],
        head_dim: usize,
        theta: f64,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<()>;
    /// The backward of [`Backend::qkv_split_rope`]: `dqkv [T, q_dim + 2·kv_dim]` holds, row by row, dq and dk
    /// rotated back (the transposed rotation) and dv. Overwrites dqkv.
    #[allow(clippy::too_many_arguments)]
    fn qkv_merge_rope_backward(
        &self,
        dq: &Self::Buf,
        dk: &Self::Buf,
        dv: &Self::Buf,
        positions: &[u32],
        head_dim: usize,
        theta: f64,
        dqkv: &mut Self::Buf,
    ) -> Result<()>;

    // ---- attention ----
    /// Scaled dot-product attention over packed sequences with GQA. `q [T, H·D]`, `k, v [T, Hkv·D]`,
    /// `out [T, H·D]`, `lse [T, H]` (log-sum-exp of each softmax row, saved for the backward).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        shape: AttnShape,
        seq_lens: &[usize],
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) -> Result<()>;
    /// Writes (overwrites) `dq`, `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        shape: AttnShape,
        seq_lens: &[usize],
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    ) -> Result<()>;

    /// Decoding attention: one new query per row against that row's KV cache. `q [R, H·D]`;
    /// `k_cache`, `v_cache` `[slots, capacity, Hkv·D]`; row `r` attends (with GQA, no mask) to the
    /// first `lens[r]` positions of slot `slots[r]`, the new token's own key and value included;
    /// writes `out [R, H·D]`. No log-sum-exp: nothing trains through decoding.
    ///
    /// The default, [`attention_decode_by_attention`], is correct on any backend but does
    /// O(len²) work per row; backends override it with a real decode kernel.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        shape: AttnShape,
        capacity: usize,
        slots: &[u32],
        lens: &[usize],
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()> {
        attention_decode_by_attention(self, shape, capacity, slots, lens, q, k_cache, v_cache, out)
    }

    // ---- activations ----
    /// `out [R, inter] = silu(gate) · up` where `gate_up [R, 2·inter]` holds each row's gate then its up.
    fn swiglu(&self, gate_up: &Self::Buf, inter: usize, out: &mut Self::Buf) -> Result<()>;
    /// The backward of [`Backend::swiglu`]: overwrites `dgate_up [R, 2·inter]` (each row: dgate then dup).
    fn swiglu_backward(&self, gate_up: &Self::Buf, inter: usize, dout: &Self::Buf, dgate_up: &mut Self::Buf) -> Result<()>;

    /// `out = gelu(x)`, exact (erf) or the tanh approximation (`gelu_pytorch_tanh`).
    fn gelu(&self, x: &Self::Buf, out: &mut Self::Buf, kind: GeluKind) -> Result<()>;
    /// Writes `dx = dout · gelu'(x)`.
    fn gelu_backward(&self, x: &Self::Buf, dout: &Self::Buf, dx: &mut Self::Buf, kind: GeluKind) -> Result<()>;

    // ---- losses ----
    // Each loss op adds its (unscaled) sum into a slot of a [`Backend::Sums`] (`_into`), so a
    // training step reads its loss values back once; the forms without `_into` return the value
    // at once (tests, benchmarks, one-off evaluations).

    /// Fused cross-entropy over `logits [rows, vocab]` with one target per row (`IGNORE_INDEX` = no
    /// target). Adds Σ over targeted rows of −log softmax(row)[target] (unscaled) to `sums[slot]`,
    /// and writes `dlogits = scale · (softmax − onehot)` on targeted rows and 0 elsewhere; `scale`
    /// is 1 / (targets in the whole optimizer step), so means span micro-batches.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy_into(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut Self::Buf,
        sums: &mut Self::Sums,
        slot: usize,
    ) -> Result<()>;
    /// [`Backend::cross_entropy_into`], returning the sum.
    fn cross_entropy(&self, logits: &Self::Buf, targets: &[i32], vocab: usize, scale: f32, dlogits: &mut Self::Buf) -> Result<f64> {
        Ok(resolved(self, 1, |s| self.cross_entropy_into(logits, targets, vocab, scale, dlogits, s, 0))?[0])
    }

    /// Fused softmax-KL distillation over the rows `rows` of student and teacher logits.
    /// Student rows have stride `s.vocab`, teacher rows `t.vocab`; only the first `kept` columns of
    /// both take part (vocabulary-mismatch rule, SPEC §1). With p = softmax(z/τ) over those columns,
    /// adds Σ_rows τ²·D(p_t, p_s) (unscaled) to `sums[slot]`, D = `shape.divergence` (forward
    /// KL(p_t‖p_s) by default; [`divergence`] defines them all), and **accumulates**
    /// `scale · ∂/∂z_s` of that sum into `dstudent` (so a cross-entropy gradient written first on
    /// the same rows is kept).
    #[allow(clippy::too_many_arguments)]
    fn softmax_kl_into(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        shape: KlShape,
        rows: &[u32],
        scale: f32,
        dstudent: &mut Self::Buf,
        sums: &mut Self::Sums,
        slot: usize,
    ) -> Result<()>;
    /// [`Backend::softmax_kl_into`], returning the sum.
    fn softmax_kl(&self, student: &Self::Buf, teacher: &Self::Buf, shape: KlShape, rows: &[u32], scale: f32, dstudent: &mut Self::Buf) -> Result<f64> {
        Ok(resolved(self, 1, |s| self.softmax_kl_into(student, teacher, shape, rows, scale, dstudent, s, 0))?[0])
    }
    /// [`Backend::softmax_kl_into`] over `rows` with the same rows' cross-entropy fused in:
    /// `targets[i]` labels row `rows[i]` (`IGNORE_INDEX`: no CE for that row), the CE over the
    /// student's full vocabulary at temperature 1. Adds Σ KL (as `softmax_kl_into` does) to
    /// `sums[kl_slot]` and Σ CE over the labelled rows to `sums[ce_slot]`, and **accumulates** both
    /// gradients (`scale` for the KL, `ce_scale` for the CE) into `dstudent`. For the rows that
    /// carry a label and a distillation target (the response rows): the CUDA kernel reads each
    /// student row once for both.
    #[allow(clippy::too_many_arguments)]
    fn softmax_kl_ce_into(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        shape: KlShape,
        rows: &[u32],
        targets: &[i32],
        scale: f32,
        ce_scale: f32,
        dstudent: &mut Self::Buf,
        sums: &mut Self::Sums,
        kl_slot: usize,
        ce_slot: usize,
    ) -> Result<()>;
    /// [`Backend::softmax_kl_ce_into`], returning (Σ KL, Σ CE).
    #[allow(clippy::too_many_arguments)]
    fn softmax_kl_ce(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        shape: KlShape,
        rows: &[u32],
        targets: &[i32],
        scale: f32,
        ce_scale: f32,
        dstudent: &mut Self::Buf,
    ) -> Result<(f64, f64)> {
        let v = resolved(self, 2, |s| self.softmax_kl_ce_into(student, teacher, shape, rows, targets, scale, ce_scale, dstudent, s, 0, 1))?;
        Ok((v[0], v[1]))
    }
    /// The distillation of one fused-head chunk in one pass over its logits: every row r of
    /// `student` (`[rows, V_s]`) gets its CE (over the full student row, target `terms.targets[r]`,
    /// `IGNORE_INDEX` for none) and its KL terms (bit k of `terms.kl_terms[r]`: term k, weight
    /// `terms.kl_scales[k]`; the divergence, temperature and kept columns of `shape`), and the
    /// gradient of all of them is **written** into `dstudent`, every row and column (0 where a row
    /// has no term): no zero-fill before and no read of it. Adds Σ CE to `sums[terms.ce_slot]` and,
    /// for each term k, Σ over its rows of τ²·D(p_t, p_s) to `sums[terms.kl_slots[k]]`.
    ///
    /// The default composes the other ops (CE writing every row, then each term's KL adding onto
    /// its rows); the CUDA backend runs the whole chunk as one softmax-KL launch in write mode.
    fn distill_rows_into(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        shape: KlShape,
        terms: &RowTerms<'_>,
        dstudent: &mut Self::Buf,
        sums: &mut Self::Sums,
    ) -> Result<()> {
        let n_rows = check_row_terms("distill_rows", self.len(student), shape.student_vocab, terms)?;
        self.cross_entropy_into(student, terms.targets, shape.student_vocab, terms.ce_scale, dstudent, sums, terms.ce_slot)?;
        for (k, (&scale, &slot)) in terms.kl_scales.iter().zip(terms.kl_slots).enumerate() {
            let rows: Vec<u32> = (0..n_rows).filter(|&r| terms.kl_terms[r] >> k & 1 == 1).map(|r| r as u32).collect();
            if !rows.is_empty() {
                self.softmax_kl_into(student, teacher, shape, &rows, scale, dstudent, sums, slot)?;
            }
        }
        Ok(())
    }
    /// Relation distillation (RDist): for each image `(start_row, n)`, Z = the n consecutive rows
    /// from `start_row` (first `kept` columns), R = Z·Zᵀ; adds Σ_images (1 − cos(vec R_s,
    /// vec R_t)) to `sums[slot]` and **accumulates** `scale · ∂/∂Z_s` into `dstudent`.
    #[allow(clippy::too_many_arguments)]
    fn relation_loss_into(
        &self,
        student: &Self::Buf,
        teacher: &Self::Buf,
        shape: KlShape,
        images: &[(u32, u32)],
        scale: f32,
        dstudent: &mut Self::Buf,
        sums: &mut Self::Sums,
        slot: usize,
    ) -> Result<()>;
    /// [`Backend::relation_loss_into`], returning the sum.
    fn relation_loss(&self, student: &Self::Buf, teacher: &Self::Buf, shape: KlShape, images: &[(u32, u32)], scale: f32, dstudent: &mut Self::Buf) -> Result<f64> {
        Ok(resolved(self, 1, |s| self.relation_loss_into(student, teacher, shape, images, scale, dstudent, s, 0))?[0])
    }
    /// The cosine part of the relation loss from two Gram matrices of equal shape (the identity
    /// form's R = H·M·Hᵀ, [`crate::loss::relation_identity`]): adds 1 − cos(vec R_s, vec R_t) to
    /// `sums[slot]` and **writes** `grad = scale · ∂(1 − cos)/∂R_s` =
    /// −scale·(R_t − (⟨R_s,R_t⟩/‖R_s‖²)·R_s)/(‖R_s‖·‖R_t‖); when either matrix is zero the loss is
    /// 1 and `grad` is 0 (the convention of [`Backend::relation_loss_into`]).
    #[allow(clippy::too_many_arguments)]
    fn gram_cosine_into(
        &self,
        rs: &Self::Buf,
        rt: &Self::Buf,
        scale: f32,
        grad: &mut Self::Buf,
        sums: &mut Self::Sums,
        slot: usize,
    ) -> Result<()>;

    // ---- optimizer ----
    /// One AdamW update of `param` from `grad` with moments `m`, `v` (PyTorch semantics).
    /// With `master` (an f32 copy of the parameters) the update is applied to the master copy and
    /// `param` is its rounding; without it, a backend whose `Buf` is narrower than f32 rounds the
    /// updated value stochastically with noise from a counter hash of (`h.seed`, `h.step`, element
    /// index), so the expected parameter is the exact update.
    ///
    /// The update covers `param[offset .. offset + m.len()]` from the same range of `grad`: `m`,
    /// `v` and `master` hold that range only (an optimizer piece of a larger tensor; the noise's
    /// element index counts from the range's start).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        h: AdamWStep,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        offset: usize,
        m: &mut Self::State,
        v: &mut Self::State,
        master: Option<&mut Self::State>,
    ) -> Result<()>;
}

/// What each row of a fused-head chunk carries ([`Backend::distill_rows_into`]).
#[derive(Clone, Copy, Debug)]
pub struct RowTerms<'a> {
    /// Per row: its CE target, or `IGNORE_INDEX`.
    pub targets: &'a [i32],
    /// Per row: the KL terms it belongs to, bit k for term k (at most [`RowTerms::MAX_TERMS`]).
    pub kl_terms: &'a [u8],
    /// Per KL term: its gradient scale (weight / the step's count of its rows).
    pub kl_scales: &'a [f32],
    /// Per KL term: the slot its sum goes to.
    pub kl_slots: &'a [usize],
    /// The CE gradient scale and the slot of its sum.
    pub ce_scale: f32,
    pub ce_slot: usize,
}

impl RowTerms<'_> {
    /// KL terms a chunk may carry (L_res, L_prompt, L_vis).
    pub const MAX_TERMS: usize = 3;
}

/// Checks [`RowTerms`] against logits of `len` elements with rows of `vocab`: one target and one
/// term mask per row, a scale and a slot per term, no bit past the terms, every target in range.
/// Returns the number of rows.
pub fn check_row_terms(what: &str, len: usize, vocab: usize, terms: &RowTerms<'_>) -> Result<usize> {
    ensure!(vocab > 0 && len % vocab == 0, "{what}: {len} logits are not rows of {vocab}");
    let rows = len / vocab;
    ensure!(terms.targets.len() == rows, "{what}: {} targets for {rows} rows", terms.targets.len());
    ensure!(terms.kl_terms.len() == rows, "{what}: {} term masks for {rows} rows", terms.kl_terms.len());
    let n = terms.kl_scales.len();
    ensure!(n <= RowTerms::MAX_TERMS && terms.kl_slots.len() == n, "{what}: {n} KL scales and {} slots (at most {} terms)", terms.kl_slots.len(), RowTerms::MAX_TERMS);
    if let Some(r) = terms.kl_terms.iter().position(|&b| b >> n != 0) {
        bail!("{what}: row {r} belongs to KL term bits {:#b}, but only {n} terms are given", terms.kl_terms[r]);
    }
    if let Some((r, &t)) = terms.targets.iter().enumerate().find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
        bail!("{what}: target {t} of row {r} is outside the student vocabulary of {vocab}");
    }
    Ok(rows)
}

/// Runs `f` on `n` fresh sums and reads them back: the immediate forms of the `_into` ops.
fn resolved<B: Backend + ?Sized>(be: &B, n: usize, f: impl FnOnce(&mut B::Sums) -> Result<()>) -> Result<Vec<f64>> {
    let mut sums = be.sums(n)?;
    f(&mut sums)?;
    be.read_sums(&sums)
}

/// Checks that `slot` is one of `n` sums (every backend's `_into` ops run it first).
pub fn check_slot(what: &str, slot: usize, n: usize) -> Result<()> {
    ensure!(slot < n, "{what}: sum slot {slot} is outside the {n} sums it was given");
    Ok(())
}

/// Checks a distillation op's [`KlShape`] against the lengths of its student logits, teacher
/// logits and student gradient (the checks every backend's `softmax_kl`, `softmax_kl_ce` and
/// `relation_loss` run first); returns the number of logit rows.
pub fn check_kl_shape(what: &str, s_len: usize, t_len: usize, ds_len: usize, shape: KlShape) -> Result<usize> {
    let KlShape { student_vocab: vs, teacher_vocab: vt, kept, .. } = shape;
    ensure!(vs > 0 && vt > 0, "{what}: empty vocabulary (student {vs}, teacher {vt})");
    ensure!(
        kept > 0 && kept <= vs && kept <= vt,
        "{what}: {kept} kept columns, but it must be in 1..=min(student vocabulary {vs}, teacher vocabulary {vt})"
    );
    ensure!(s_len % vs == 0, "{what}: student logits have {s_len} elements, not a multiple of the student vocabulary {vs}");
    let rows = s_len / vs;
    ensure!(t_len == rows * vt, "{what} teacher logits ({rows} rows of {vt}): expected {} elements, got {t_len}", rows * vt);
    ensure!(ds_len == s_len, "{what} student gradient: expected {s_len} elements, got {ds_len}");
    Ok(rows)
}

/// A positive finite temperature, and every listed row in range and listed once (the rows'
/// gradients are written in parallel, and a repeated row is a bug in the caller's selection).
pub fn check_kl_rows(what: &str, rows: &[u32], n_rows: usize, temperature: f32) -> Result<()> {
    ensure!(temperature.is_finite() && temperature > 0.0, "{what}: temperature must be positive and finite, got {temperature}");
    let mut listed = vec![false; n_rows];
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        ensure!(r < n_rows, "{what}: row {r} (entry {i} of the row list) is outside the {n_rows} rows of the logits");
        ensure!(!listed[r], "{what}: row {r} is listed twice");
        listed[r] = true;
    }
    Ok(())
}

/// The labels of [`Backend::softmax_kl_ce`]: one per listed row, each `IGNORE_INDEX` or in the
/// student vocabulary.
pub fn check_ce_labels(what: &str, rows: &[u32], targets: &[i32], student_vocab: usize) -> Result<()> {
    ensure!(targets.len() == rows.len(), "{what}: {} targets for {} rows", targets.len(), rows.len());
    if let Some((i, &t)) = targets.iter().enumerate().find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= student_vocab)) {
        bail!("{what}: target {t} of row {} is outside the student vocabulary of {student_vocab}", rows[i]);
    }
    Ok(())
}

/// The images of [`Backend::relation_loss`]: each `(start, n)` non-empty, inside the `n_rows`
/// logit rows, and no two overlapping (each image's gradient rows are written as one block).
pub fn check_relation_images(what: &str, images: &[(u32, u32)], n_rows: usize) -> Result<()> {
    let mut sorted: Vec<(usize, usize, usize)> = images.iter().enumerate().map(|(i, &(a, n))| (a as usize, n as usize, i)).collect();
    sorted.sort_unstable();
    for (k, &(start, n, i)) in sorted.iter().enumerate() {
        ensure!(n > 0, "{what}: image {i} has no visual rows");
        ensure!(start + n <= n_rows, "{what}: image {i} covers rows {start}..{}, but there are only {n_rows} rows", start + n);
        if k > 0 {
            let (ps, pn, pi) = sorted[k - 1];
            if ps + pn > start {
                bail!("{what}: images {pi} (rows {ps}..{}) and {i} (rows {start}..{}) overlap", ps + pn, start + n);
            }
        }
    }
    Ok(())
}

/// The shape of a fused Q/K/V row ([`Backend::qkv_split_rope`] and its backward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvDims {
    /// Tokens (rows).
    pub t: usize,
    /// Query columns per row (query heads × head_dim).
    pub q_dim: usize,
    /// Key columns per row, and value columns (kv heads × head_dim).
    pub kv_dim: usize,
}

impl QkvDims {
    /// Columns of a fused row: `q_dim + 2·kv_dim`.
    pub fn row(&self) -> usize {
        self.q_dim + 2 * self.kv_dim
    }
}

/// Checks the lengths of [`Backend::qkv_split_rope`] (`what` names the op; `names` the fused tensor
/// and its three parts, as the op calls them): one position per token, an even head_dim, q, k and v
/// whole rows of whole heads, v as long as k, and the fused tensor `T·(q_dim + 2·kv_dim)`. Every
/// backend runs it first.
#[allow(clippy::too_many_arguments)]
pub fn check_qkv_dims(what: &str, names: [&str; 4], positions: usize, head_dim: usize, fused: usize, q: usize, k: usize, v: usize) -> Result<QkvDims> {
    let [fused_name, q_name, k_name, v_name] = names;
    ensure!(head_dim > 0 && head_dim % 2 == 0, "{what}: head_dim {head_dim} must be even and positive");
    let t = positions;
    ensure!(t > 0, "{what}: no positions (one per token is needed)");
    for (name, len) in [(q_name, q), (k_name, k)] {
        ensure!(
            len > 0 && len % (t * head_dim) == 0,
            "{what}: {name} has {len} elements, which do not split into {t} tokens of one or more heads of {head_dim}"
        );
    }
    ensure!(v == k, "{what}: {v_name} has {v} elements, but {k_name} has {k} (they must match)");
    let dims = QkvDims { t, q_dim: q / t, kv_dim: k / t };
    ensure!(
        fused == t * dims.row(),
        "{what}: {fused_name} has {fused} elements, expected {} ({t} tokens × ({} + 2·{}))",
        t * dims.row(),
        dims.q_dim,
        dims.kv_dim
    );
    Ok(dims)
}

/// Checks the lengths of [`Backend::swiglu`] (`stacked`: `gate_up` or `dgate_up`;
/// `half`: `out` or `dout`): `inter > 0`, the stacked tensor whole rows of `2·inter`, the other
/// `R·inter`. Returns R. Every backend runs it first.
pub fn check_swiglu(what: &str, stacked_name: &str, stacked: usize, half_name: &str, half: usize, inter: usize) -> Result<usize> {
    ensure!(inter > 0, "{what}: inter must be positive");
    ensure!(stacked % (2 * inter) == 0, "{what}: {stacked_name} has {stacked} elements, not rows of 2·{inter}");
    let rows = stacked / (2 * inter);
    ensure!(half == rows * inter, "{what}: {half_name} has {half} elements, expected {} ({rows} rows × {inter})", rows * inter);
    Ok(rows)
}

/// Checks the arguments of [`Backend::attention_decode`] from their lengths (`q`, `out`, each
/// cache): the checks every backend's decode runs first.
#[allow(clippy::too_many_arguments)]
pub fn check_decode_args(shape: AttnShape, capacity: usize, slots: &[u32], lens: &[usize], q: usize, k_cache: usize, v_cache: usize, out: usize) -> Result<()> {
    let (h, hkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    ensure!(h > 0 && hkv > 0 && d > 0 && h % hkv == 0, "attention_decode: {h} heads cannot share {hkv} kv heads");
    ensure!(slots.len() == lens.len(), "attention_decode: {} slots but {} lengths", slots.len(), lens.len());
    let (rows, kvd) = (slots.len(), hkv * d);
    ensure!(q == rows * h * d, "attention_decode: q has {q} elements, expected {} ({rows} rows × {h} heads × {d})", rows * h * d);
    ensure!(out == rows * h * d, "attention_decode: the output has {out} elements, expected {}", rows * h * d);
    ensure!(k_cache == v_cache, "attention_decode: K cache has {k_cache} values, V cache {v_cache}");
    ensure!(capacity > 0 && k_cache % (capacity * kvd) == 0, "attention_decode: cache of {k_cache} values is not [slots, {capacity}, {kvd}]");
    let n_slots = k_cache / (capacity * kvd);
    for (r, (&slot, &len)) in slots.iter().zip(lens).enumerate() {
        ensure!((slot as usize) < n_slots, "attention_decode: row {r} uses cache slot {slot} of {n_slots}");
        ensure!(len >= 1 && len <= capacity, "attention_decode: row {r} attends to {len} of {capacity} positions");
    }
    Ok(())
}

/// [`Backend::attention_decode`] from the backend's own ops: each row's cached keys and values
/// are copied out and [`Backend::attention`] runs causally with the query in the last position,
/// whose output row is the decode result. The default of the trait method, so a backend without
/// a decode kernel still generates correctly; public so backends' kernels can be tested against it.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode_by_attention<B: Backend + ?Sized>(
    be: &B,
    shape: AttnShape,
    capacity: usize,
    slots: &[u32],
    lens: &[usize],
    q: &B::Buf,
    k_cache: &B::Buf,
    v_cache: &B::Buf,
    out: &mut B::Buf,
) -> Result<()> {
    check_decode_args(shape, capacity, slots, lens, be.len(q), be.len(k_cache), be.len(v_cache), be.len(out))?;
    let (qd, kvd) = (shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim);
    let causal = AttnShape { causal: true, ..shape };
    for (r, (&slot, &len)) in slots.iter().zip(lens).enumerate() {
        let base = slot as usize * capacity * kvd;
        let mut k = be.empty(len * kvd)?;
        let mut v = be.empty(len * kvd)?;
        be.copy_range(k_cache, base, &mut k, 0, len * kvd)?;
        be.copy_range(v_cache, base, &mut v, 0, len * kvd)?;
        let mut qs = be.zeros(len * qd)?;
        be.copy_range(q, r * qd, &mut qs, (len - 1) * qd, qd)?;
        let mut o = be.empty(len * qd)?;
        let mut lse = be.empty(len * shape.n_heads)?;
        be.attention(causal, &[len], &qs, &k, &v, &mut o, &mut lse)?;
        be.copy_range(&o, (len - 1) * qd, out, r * qd, qd)?;
    }
    Ok(())
}
