//! Distillation losses of the CPU backend: fused softmax-divergence (forward KL and the others of
//! [`crate::backend::divergence`]) and the Gram-matrix relation loss.
//!
//! Both are the references the CUDA kernels are tested against. Row statistics (max, sums, the KL
//! and the cosine) are accumulated in f64 whatever the element type, so the f32 backend is as close
//! to the exact value as its inputs allow; the Gram matrices use the element type's GEMM.

use anyhow::Result;
use rayon::prelude::*;

use super::loss::ce_row;
use super::Elem;
use crate::backend::{check_ce_labels, check_kl_rows, check_kl_shape, check_relation_images, Divergence, KlShape, IGNORE_INDEX};

/// log-sum-exp of `z[..] / tau`, in f64.
fn lse_scaled<T: Elem>(z: &[T], inv_tau: f64) -> f64 {
    let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.f64() * inv_tau));
    if max == f64::NEG_INFINITY || !max.is_finite() {
        // All −∞ (no probability mass anywhere) or a +∞/NaN logit: propagate as a non-finite loss.
        return max;
    }
    let sum: f64 = z.iter().map(|&v| (v.f64() * inv_tau - max).exp()).sum();
    max + sum.ln()
}

/// Fused softmax-divergence over the listed rows; see [`crate::backend::Backend::softmax_kl`].
///
/// Per listed row r, with z_s = `s[r, ..kept] / τ`, z_t = `t[r, ..kept] / τ`, p = softmax(z):
/// loss_r = τ²·D(p_t, p_s) with D = `shape.divergence` (forward KL Σ_v p_t·(log p_t − log p_s) by
/// default; a zero probability contributes 0, the convention 0·log 0 = 0). Returns Σ_r loss_r and
/// accumulates `scale · ∂loss_r/∂(raw student logits)` into `ds[r, ..kept]` (for the forward KL
/// `scale · τ · (p_s − p_t)`); columns from `kept` on and rows not listed are left untouched.
pub fn softmax_kl<T: Elem>(s: &[T], t: &[T], shape: KlShape, rows: &[u32], scale: f32, ds: &mut [T]) -> Result<f64> {
    Ok(kl_with_ce("softmax_kl", s, t, shape, rows, None, scale, 0.0, ds)?.0)
}

/// One row's τ²·D(p_t, p_s) over the kept columns `zs`, `zt`; adds `g_scale · (h − p_s·Σh)` to
/// `d` (the gradient form of [`Divergence::terms`], g_scale = scale·τ).
fn kl_row<T: Elem>(zs: &[T], zt: &[T], tau: f64, div: Divergence, g_scale: f64, d: &mut [T]) -> f64 {
    let inv_tau = 1.0 / tau;
    let lse_s = lse_scaled(zs, inv_tau);
    let lse_t = lse_scaled(zt, inv_tau);
    let logs = |a: T, b: T| (b.f64() * inv_tau - lse_t, a.f64() * inv_tau - lse_s);
    // First sweep: the loss and H = Σ h; second: the gradient, which needs H.
    let (mut loss, mut h_sum) = (0.0, 0.0);
    for (&a, &b) in zs.iter().zip(zt) {
        let (log_pt, log_ps) = logs(a, b);
        let (l, h) = div.terms(log_pt, log_ps);
        loss += l;
        h_sum += h;
    }
    if div == Divergence::Fkl {
        // Σh = −Σp_t is −1 exactly: the gradient stays τ·(p_s − p_t) bit for bit as before.
        h_sum = -1.0;
    }
    for ((d, &a), &b) in d.iter_mut().zip(zs).zip(zt) {
        let (log_pt, log_ps) = logs(a, b);
        let (_, h) = div.terms(log_pt, log_ps);
        *d = *d + T::of(g_scale * (h - log_ps.exp() * h_sum));
    }
    tau * tau * loss
}

/// Softmax-KL with the rows' cross-entropy fused in; see
/// [`crate::backend::Backend::softmax_kl_ce`]. Per listed row: the CE over the full student row
/// (when it has a target), then the KL over the kept columns, both added to `ds`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_kl_ce<T: Elem>(
    s: &[T],
    t: &[T],
    shape: KlShape,
    rows: &[u32],
    targets: &[i32],
    scale: f32,
    ce_scale: f32,
    ds: &mut [T],
) -> Result<(f64, f64)> {
    kl_with_ce("softmax_kl_ce", s, t, shape, rows, Some(targets), scale, ce_scale, ds)
}

/// The listed rows' KL and, with `targets`, their CE: (Σ KL, Σ CE). Per-row values are collected
/// in row order and summed sequentially, so the result does not depend on how rayon splits the
/// rows (runs and resumed runs reproduce losses bit for bit).
#[allow(clippy::too_many_arguments)]
fn kl_with_ce<T: Elem>(
    what: &str,
    s: &[T],
    t: &[T],
    shape: KlShape,
    rows: &[u32],
    targets: Option<&[i32]>,
    scale: f32,
    ce_scale: f32,
    ds: &mut [T],
) -> Result<(f64, f64)> {
    let n_rows = check_kl_shape(what, s.len(), t.len(), ds.len(), shape)?;
    check_kl_rows(what, rows, n_rows, shape.temperature)?;
    if let Some(targets) = targets {
        check_ce_labels(what, rows, targets, shape.student_vocab)?;
    }
    let tau = shape.temperature as f64;
    let KlShape { student_vocab: vs, teacher_vocab: vt, kept, divergence, .. } = shape;
    // Per buffer row: None (not listed) or its CE target (IGNORE_INDEX: none).
    let mut role: Vec<Option<i32>> = vec![None; n_rows];
    for (i, &r) in rows.iter().enumerate() {
        role[r as usize] = Some(targets.map_or(IGNORE_INDEX, |t| t[i]));
    }
    let (g_scale, ce_scale) = (scale as f64 * tau, T::of(ce_scale as f64));
    let per_row: Vec<(f64, f64)> = ds
        .par_chunks_mut(vs)
        .zip(s.par_chunks(vs))
        .zip(t.par_chunks(vt))
        .zip(role.par_iter())
        .map(|(((d, zs), zt), role)| match *role {
            None => (0.0, 0.0),
            Some(tg) => {
                let ce = if tg == IGNORE_INDEX { 0.0 } else { ce_row(zs, tg as usize, ce_scale, d) };
                (kl_row(&zs[..kept], &zt[..kept], tau, divergence, g_scale, &mut d[..kept]), ce)
            }
        })
        .collect();
    Ok((per_row.iter().map(|p| p.0).sum(), per_row.iter().map(|p| p.1).sum()))
}

/// Relation distillation; see [`crate::backend::Backend::relation_loss`].
///
/// For each image `(start, n)`: Z_s = `s[start..start+n, ..kept]`, Z_t likewise from `t`,
/// R = Z·Zᵀ (n×n, computed with the element type's GEMM), loss = 1 − ⟨R_s, R_t⟩ / (‖R_s‖·‖R_t‖)
/// (Frobenius). Returns Σ_images loss and accumulates `scale · 2·G·Z_s` into `ds` on the image's
/// rows and first `kept` columns, where G = ∂loss/∂R_s = −(R_t − (⟨R_s,R_t⟩/‖R_s‖²)·R_s)/(‖R_s‖·‖R_t‖)
/// is symmetric. When either Gram matrix is zero the cosine is taken as 0 (loss 1) with zero
/// gradient, as PyTorch's `cosine_similarity` (norms clamped to ε) gives in that case.
///
/// The relation loss has no temperature: `shape.temperature` is ignored (upstream LLaVA-KD takes
/// the Gram matrices of the raw logits).
pub fn relation_loss<T: Elem>(s: &[T], t: &[T], shape: KlShape, images: &[(u32, u32)], scale: f32, ds: &mut [T]) -> Result<f64> {
    const WHAT: &str = "relation_loss";
    let n_rows = check_kl_shape(WHAT, s.len(), t.len(), ds.len(), shape)?;
    let KlShape { student_vocab: vs, teacher_vocab: vt, kept, .. } = shape;
    check_relation_images(WHAT, images, n_rows)?;
    let mut total = 0.0;
    let mut rs: Vec<T> = Vec::new();
    let mut rt: Vec<T> = Vec::new();
    let mut g: Vec<T> = Vec::new();
    for &(start, n) in images {
        let (start, n) = (start as usize, n as usize);
        rs.clear();
        rs.resize(n * n, T::zero());
        rt.clear();
        rt.resize(n * n, T::zero());
        g.resize(n * n, T::zero());
        let zs = &s[start * vs..];
        let zt = &t[start * vt..];
        // SAFETY: Z_s spans rows start..start+n of `s` (row stride vs, kept ≤ vs columns), inside
        // `s` as checked above; likewise Z_t in `t`; R_s/R_t are fresh n×n buffers.
        unsafe {
            T::gemm_raw(n, kept, n, T::one(), zs.as_ptr(), vs as isize, 1, zs.as_ptr(), 1, vs as isize, T::zero(), rs.as_mut_ptr(), n as isize, 1);
            T::gemm_raw(n, kept, n, T::one(), zt.as_ptr(), vt as isize, 1, zt.as_ptr(), 1, vt as isize, T::zero(), rt.as_mut_ptr(), n as isize, 1);
        }
        let (loss, has_grad) = gram_cosine(&rs, &rt, 1.0, &mut g);
        total += loss;
        if !has_grad {
            continue;
        }
        let d = &mut ds[start * vs..];
        // ds[rows, ..kept] += (2·scale)·G·Z_s.
        // SAFETY: G is n×n contiguous; Z_s as above; the destination spans rows start..start+n
        // of `ds` (same layout as `s`, a distinct buffer), first `kept` columns.
        unsafe {
            T::gemm_raw(
                n,
                n,
                kept,
                T::of(2.0 * scale as f64),
                g.as_ptr(),
                n as isize,
                1,
                zs.as_ptr(),
                vs as isize,
                1,
                T::one(),
                d.as_mut_ptr(),
                vs as isize,
                1,
            );
        }
    }
    Ok(total)
}

/// The cosine part of the relation loss from two Gram matrices of equal length: returns
/// 1 − cos(vec R_s, vec R_t) and writes `g = scale · G`, G = ∂(1 − cos)/∂R_s =
/// −(R_t − (⟨R_s,R_t⟩/‖R_s‖²)·R_s)/(‖R_s‖‖R_t‖); when either matrix is zero, loss 1 and `g` = 0
/// (the second value says whether there is a gradient). Sums in f64, in element order.
pub fn gram_cosine<T: Elem>(rs: &[T], rt: &[T], scale: f64, g: &mut [T]) -> (f64, bool) {
    let (mut dot, mut ss, mut tt) = (0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in rs.iter().zip(rt) {
        let (a, b) = (a.f64(), b.f64());
        dot += a * b;
        ss += a * a;
        tt += b * b;
    }
    let (ns, nt) = (ss.sqrt(), tt.sqrt());
    if ns == 0.0 || nt == 0.0 {
        g.iter_mut().for_each(|x| *x = T::zero());
        return (1.0, false);
    }
    let c_t = -scale / (ns * nt);
    let c_s = scale * dot / (ss * ns * nt);
    for ((x, &a), &b) in g.iter_mut().zip(rs).zip(rt) {
        *x = T::of(c_t * b.f64() + c_s * a.f64());
    }
    (1.0 - dot / (ns * nt), true)
}
