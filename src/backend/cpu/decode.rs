//! Decoding on the CPU: attention of one new query per row against its sequence's KV cache, and
//! the few-row GEMM of a decoding step's linear layers.
//!
//! The same arithmetic as the row loop of `attention::forward` (scores scaled by 1/√D, max-shifted
//! exponentials, weights normalised by their sum), so a cached step reproduces the uncached
//! forward's last row. Parallel over (row, head): each task reads `len` cached keys and values
//! of one KV head and writes its own `D` outputs, so the step is bound by reading the cache.

use anyhow::Result;
use rayon::prelude::*;

use super::{check_len, Elem};
use crate::backend::{check_decode_args, AttnShape, Gemm};

#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: Elem>(
    shape: AttnShape,
    capacity: usize,
    slots: &[u32],
    lens: &[usize],
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    out: &mut [T],
) -> Result<()> {
    check_decode_args(shape, capacity, slots, lens, q.len(), k_cache.len(), v_cache.len(), out.len())?;
    let (h, hkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let kvd = hkv * d;
    let group = h / hkv;
    let scale = T::of(1.0 / (d as f64).sqrt());
    out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
        let (r, head) = (task / h, task % h);
        let (len, base) = (lens[r], slots[r] as usize * capacity * kvd);
        let kh = head / group;
        let qv = &q[task * d..][..d];
        let key = |j: usize| &k_cache[base + j * kvd + kh * d..][..d];
        let val = |j: usize| &v_cache[base + j * kvd + kh * d..][..d];
        let mut p: Vec<T> = (0..len).map(|j| qv.iter().zip(key(j)).map(|(&a, &b)| a * b).sum::<T>() * scale).collect();
        let max = p.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
        p.iter_mut().for_each(|x| *x = (*x - max).exp());
        let sum: T = p.iter().copied().sum();
        o.iter_mut().for_each(|x| *x = T::zero());
        for (j, &pj) in p.iter().enumerate() {
            let w = pj / sum;
            o.iter_mut().zip(val(j)).for_each(|(o, &v)| *o = *o + w * v);
        }
    });
    Ok(())
}

/// Rows up to which [`gemm_few_rows`] replaces the packed GEMM.
const FEW_ROWS: usize = 8;

/// Whether a GEMM is a decoding step's linear layer: a handful of rows times `[out, in]`
/// weights (`trans_b`). `matrixmultiply` would pad those rows to its 8-row micro-kernel and
/// re-pack the whole weight matrix on every call; reading each weight row once instead makes
/// decoding bound by the weights' memory traffic, as it should be.
pub fn few_rows(g: &Gemm) -> bool {
    g.m > 0 && g.m <= FEW_ROWS && g.trans_b && g.k > 0
}

/// `C = α·op(A)·Bᵀ + β·C` for [`few_rows`] GEMMs: parallel over blocks of output columns, each
/// weight row (contiguous, `k` values) dotted with the `m` input rows while it is in cache.
/// Deterministic: every output is one thread's fixed-order sum.
pub fn gemm_few_rows<T: Elem>(g: Gemm, a: &[T], b: &[T], c: &mut [T]) -> Result<()> {
    let (m, n, k) = (g.m, g.n, g.k);
    check_len("gemm A", a.len(), m * k)?;
    check_len("gemm B", b.len(), k * n)?;
    check_len("gemm C", c.len(), m * n)?;
    // Input rows contiguous, whatever op(A) is.
    let rows: Vec<T> = if g.trans_a { (0..m).flat_map(|i| (0..k).map(move |p| a[p * m + i])).collect() } else { a.to_vec() };
    let (alpha, beta) = (T::of(g.alpha as f64), T::of(g.beta as f64));
    const BLOCK: usize = 64;
    // out[j·m + i] = (op(A)·Bᵀ)[i, j]
    let mut out = vec![T::zero(); n * m];
    out.par_chunks_mut(BLOCK * m).enumerate().for_each(|(blk, o)| {
        for (jj, oj) in o.chunks_mut(m).enumerate() {
            let w = &b[(blk * BLOCK + jj) * k..][..k];
            for (i, oij) in oj.iter_mut().enumerate() {
                *oij = dot8(&rows[i * k..(i + 1) * k], w);
            }
        }
    });
    for i in 0..m {
        for j in 0..n {
            let v = alpha * out[j * m + i];
            let cij = &mut c[i * n + j];
            *cij = if g.beta == 0.0 { v } else { v + beta * *cij };
        }
    }
    Ok(())
}

/// Dot product with eight independent partial sums, so the compiler vectorises it.
fn dot8<T: Elem>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] = acc[l] + a[l] * b[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&a, &b) in xr.iter().zip(yr) {
        s = s + a * b;
    }
    s
}
