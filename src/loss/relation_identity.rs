//! The relation loss (RDist, SPEC §1) without logits: R = Z·Zᵀ = H·(Wᵀ·W)·Hᵀ.
//!
//! With Z = H·W[:kept]ᵀ the logits of an image's visual rows (H its final hidden states `[n, h]`,
//! W the LM head `[V, h]`, `kept` = min(V_s, V_t) columns, SPEC §1's vocabulary-mismatch rule),
//! R = Z·Zᵀ = H·M·Hᵀ with M = W[:kept]ᵀ·W[:kept] (`[h, h]`, symmetric). This is exact, and once M
//! is known it costs nothing per vocabulary entry:
//!
//! | per image (n = 728, V = 151936) | direct: Z·Zᵀ, 2·n²·V | identity: T = H·M, R = T·Hᵀ, 2·(n·h² + n²·h) |
//! | --- | --- | --- |
//! | student, h = 1024 (Qwen1.5-0.5B) | 161.0 GFLOP | 2.61 GFLOP (61.7× less) |
//! | teacher, h = 2560 (Qwen1.5-4B)   | 161.0 GFLOP | 12.26 GFLOP (13.1× less) |
//!
//! M itself costs 2·V·h² (0.32 TFLOP for h = 1024, 1.99 TFLOP for h = 2560). The teacher never
//! trains, so M_t is computed **once per run**; so is M_s while the LLM is frozen (DPT). When the
//! LLM trains (DFT), M_s changes every step: 0.32 TFLOP to rebuild it plus 0.32 TFLOP for the head
//! gradient dW[:kept] += 2·W[:kept]·dM: 0.711 TFLOP per anchor step (4 images) against the direct
//! form's 1.933 TFLOP (R_s, R_t and ∂Z_s = 2·G·Z_s at 0.161 TFLOP each per image), and no `[n, V]`
//! logits are needed for the relation at all; with the LLM frozen, 0.064 TFLOP (30× less). See
//! [`relation_step_flops`].
//!
//! Gradients: with G = ∂L/∂R_s (symmetric), ∂L/∂H_s = 2·G·H_s·M_s = 2·G·T_s, and
//! ∂L/∂M_s = H_sᵀ·G·H_s, from which ∂L/∂W_s[:kept] = 2·W_s[:kept]·∂L/∂M_s ([`head_gram_backward`]).
//!
//! Numerics: R is accumulated in the backend's storage type like the direct form's; the cosine
//! (loss and G from the two Gram matrices) is the backend's `gram_cosine_into`, sums in f64 (on
//! CUDA the relation kernels' epilogue on bf16 Grams), so the f64 CPU backend matches the direct
//! form to ~1e-14. The loss is added into the step's sums and never read back mid-step.

use anyhow::{ensure, Result};

use crate::backend::{check_relation_images, Backend, Gemm};

/// One model's side of [`relation_loss_identity`].
#[derive(Debug)]
pub struct GramSide<'a, Buf> {
    /// Final normed hidden states `[rows, hidden_size]` of the micro-batch.
    pub hidden: &'a Buf,
    pub hidden_size: usize,
    /// M = W[:kept]ᵀ·W[:kept], `[hidden_size, hidden_size]` ([`head_gram`]).
    pub gram: &'a Buf,
}

// Copy for any Buf: the struct holds only references.
impl<Buf> Clone for GramSide<'_, Buf> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Buf> Copy for GramSide<'_, Buf> {}

/// The first `kept` rows of `weight` (`[vocab, hidden]`), copied only when `kept < vocab`.
fn head_prefix<B: Backend>(be: &B, weight: &B::Buf, vocab: usize, hidden: usize, kept: usize) -> Result<Option<B::Buf>> {
    ensure!(kept >= 1 && kept <= vocab, "head gram: {kept} kept rows of a {vocab}-row head");
    ensure!(
        be.len(weight) == vocab * hidden,
        "head gram: the head weight has {} elements, expected {vocab} × {hidden}",
        be.len(weight)
    );
    if kept == vocab {
        return Ok(None);
    }
    let mut w = be.empty(kept * hidden)?;
    be.copy_range(weight, 0, &mut w, 0, kept * hidden)?;
    Ok(Some(w))
}

/// M = W[:kept]ᵀ·W[:kept] (`[hidden, hidden]`) of an LM head `weight` `[vocab, hidden]`.
pub fn head_gram<B: Backend>(be: &B, weight: &B::Buf, vocab: usize, hidden: usize, kept: usize) -> Result<B::Buf> {
    let prefix = head_prefix(be, weight, vocab, hidden, kept)?;
    let w = prefix.as_ref().unwrap_or(weight);
    let mut m = be.empty(hidden * hidden)?;
    let g = Gemm { m: hidden, n: hidden, k: kept, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 };
    be.gemm(g, w, w, &mut m)?;
    Ok(m)
}

/// Backward of [`head_gram`] for a symmetric `dgram` (what [`relation_loss_identity`]
/// accumulates): `dweight[:kept] += 2·W[:kept]·dgram`; rows from `kept` on are untouched.
pub fn head_gram_backward<B: Backend>(
    be: &B,
    weight: &B::Buf,
    vocab: usize,
    hidden: usize,
    kept: usize,
    dgram: &B::Buf,
    dweight: &mut B::Buf,
) -> Result<()> {
    ensure!(be.len(dgram) == hidden * hidden, "head gram backward: dgram has {} elements, expected {hidden}²", be.len(dgram));
    ensure!(
        be.len(dweight) == vocab * hidden,
        "head gram backward: the head gradient has {} elements, expected {vocab} × {hidden}",
        be.len(dweight)
    );
    let prefix = head_prefix(be, weight, vocab, hidden, kept)?;
    let g = Gemm { m: kept, n: hidden, k: hidden, trans_a: false, trans_b: false, alpha: 2.0, beta: 1.0 };
    match prefix {
        None => be.gemm(g, weight, dgram, dweight),
        Some(w) => {
            let mut d = be.empty(kept * hidden)?;
            be.copy_range(dweight, 0, &mut d, 0, kept * hidden)?;
            be.gemm(g, &w, dgram, &mut d)?;
            be.copy_range(&d, 0, dweight, 0, kept * hidden)
        }
    }
}

/// Relation distillation through the head Gram matrices: for each image `(start_row, n)` (rows of
/// `student.hidden` / `teacher.hidden`), R = H·M·Hᵀ on both sides, loss 1 − cos(vec R_s, vec R_t).
/// Adds Σ_images loss to `sums[slot]`; **accumulates** `scale · ∂/∂H_s` into `dhidden` (`[rows, h_s]`, the
/// image rows only) and, when given, `scale · ∂/∂M_s` into `dgram` (`[h_s, h_s]`, symmetric; pass
/// it on to [`head_gram_backward`] when the LM head trains).
///
/// Equal to the backend's `relation_loss` on the materialised logits Z = H·W[:kept]ᵀ (values and
/// gradients). Per image it holds at most two `[n, h]` per side and seven `[n, n]` matrices
/// (36 MB for n = 728 in f32 with h = 2560), never `[n, V]`.
pub fn relation_loss_identity<B: Backend>(
    be: &B,
    student: GramSide<'_, B::Buf>,
    teacher: GramSide<'_, B::Buf>,
    images: &[(u32, u32)],
    scale: f32,
    dhidden: &mut B::Buf,
    mut dgram: Option<&mut B::Buf>,
    sums: &mut B::Sums,
    slot: usize,
) -> Result<()> {
    const WHAT: &str = "relation loss (identity form)";
    let (hs, ht) = (student.hidden_size, teacher.hidden_size);
    ensure!(hs > 0 && ht > 0, "{WHAT}: empty hidden size");
    let rows = be.len(student.hidden) / hs;
    ensure!(be.len(student.hidden) == rows * hs, "{WHAT}: student hidden states are not [rows, {hs}]");
    ensure!(
        be.len(teacher.hidden) == rows * ht,
        "{WHAT}: teacher hidden states have {} elements, expected {rows} rows × {ht}",
        be.len(teacher.hidden)
    );
    ensure!(be.len(student.gram) == hs * hs, "{WHAT}: the student head Gram is not [{hs}, {hs}]");
    ensure!(be.len(teacher.gram) == ht * ht, "{WHAT}: the teacher head Gram is not [{ht}, {ht}]");
    ensure!(be.len(dhidden) == rows * hs, "{WHAT}: the hidden-state gradient is not [{rows}, {hs}]");
    if let Some(d) = dgram.as_deref() {
        ensure!(be.len(d) == hs * hs, "{WHAT}: the Gram gradient is not [{hs}, {hs}]");
    }
    check_relation_images(WHAT, images, rows)?;

    // R = (H·M)·Hᵀ; returns (H, T = H·M, R).
    let gram_of = |side: &GramSide<'_, B::Buf>, start: usize, n: usize| -> Result<(B::Buf, B::Buf, B::Buf)> {
        let h = side.hidden_size;
        let mut x = be.empty(n * h)?;
        be.copy_range(side.hidden, start * h, &mut x, 0, n * h)?;
        let mut t = be.empty(n * h)?;
        be.gemm(Gemm { m: n, n: h, k: h, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, &x, side.gram, &mut t)?;
        let mut r = be.empty(n * n)?;
        be.gemm(Gemm::linear(n, n, h), &t, &x, &mut r)?;
        Ok((x, t, r))
    };

    for &(start, n) in images {
        let (start, n) = (start as usize, n as usize);
        let (xs, ts, rs) = gram_of(&student, start, n)?;
        let (_, _, rt) = gram_of(&teacher, start, n)?;
        // The loss stays in `sums` (no read-back); G is 0 when a Gram matrix is (no gradient).
        let mut g = be.empty(n * n)?;
        be.gram_cosine_into(&rs, &rt, scale, &mut g, sums, slot)?;
        // dH_s[rows] += 2·G·T_s.
        let mut d = be.empty(n * hs)?;
        be.copy_range(dhidden, start * hs, &mut d, 0, n * hs)?;
        be.gemm(Gemm { m: n, n: hs, k: n, trans_a: false, trans_b: false, alpha: 2.0, beta: 1.0 }, &g, &ts, &mut d)?;
        be.copy_range(&d, 0, dhidden, start * hs, n * hs)?;
        // dM_s += H_sᵀ·(G·H_s).
        if let Some(dm) = dgram.as_deref_mut() {
            let mut u = be.empty(n * hs)?;
            be.gemm(Gemm { m: n, n: hs, k: n, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, &g, &xs, &mut u)?;
            be.gemm(Gemm { m: hs, n: hs, k: n, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 }, &xs, &u, dm)?;
        }
    }
    Ok(())
}

/// GEMM FLOPs of the relation term of one step, both ways (`images` images of `n` visual rows,
/// kept vocabulary `v`, hidden sizes `hs` (student) and `ht` (teacher)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RelationFlops {
    /// Direct form: R_s, R_t and ∂Z_s = 2·G·Z_s, 2·n²·v each per image (the logits themselves
    /// are shared with L_vis and not counted).
    pub direct: f64,
    /// Identity form with M_s and M_t already known (frozen LLM, precomputed per run): R_s, R_t,
    /// ∂H_s = 2·G·T_s.
    pub identity_frozen: f64,
    /// Identity form when the LLM trains: the above plus ∂M_s = H_sᵀ·G·H_s per image, and per
    /// step M_s = W_sᵀ·W_s and ∂W_s = 2·W_s·∂M_s (2·v·hs² each).
    pub identity_training: f64,
    /// Computing M_t once per run (2·v·ht²).
    pub teacher_gram_once: f64,
}

/// See [`RelationFlops`]. For the anchor DFT step (4 images × 728 rows, V 151936, h 1024 / 2560):
/// direct 1.933 TFLOP, identity 0.0638 TFLOP frozen (30× less) and 0.711 TFLOP training (2.7× less),
/// M_t 1.991 TFLOP once per run.
pub fn relation_step_flops(images: usize, n: usize, v: usize, hs: usize, ht: usize) -> RelationFlops {
    let (i, n, v, hs, ht) = (images as f64, n as f64, v as f64, hs as f64, ht as f64);
    let gram_id = |h: f64| 2.0 * (n * h * h + n * n * h);
    let direct = i * 3.0 * 2.0 * n * n * v;
    let dh = 2.0 * n * n * hs;
    let identity_frozen = i * (gram_id(hs) + gram_id(ht) + dh);
    let dm = 2.0 * (n * n * hs + n * hs * hs);
    let identity_training = identity_frozen + i * dm + 2.0 * (2.0 * v * hs * hs);
    RelationFlops { direct, identity_frozen, identity_training, teacher_gram_once: 2.0 * v * ht * ht }
}
