//! Exact scaled dot-product attention over packed sequences, with GQA, causal or not.
//!
//! The reference for the fused CUDA kernel: the same saved state (`lse`, the log-sum-exp of each
//! softmax row) and the same backward formulation (recompute P from `lse`, Δ = rowsum(dO ∘ O)),
//! so the two can be compared op for op. Parallel over query rows (forward, dQ) and key rows
//! (dK, dV), so no two threads write the same output.

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::{check_len, Elem};
use crate::backend::AttnShape;

/// For each packed token: (start of its sequence, length of its sequence).
fn token_sequences(seq_lens: &[usize]) -> Vec<(usize, usize)> {
    let mut rows = Vec::with_capacity(seq_lens.iter().sum());
    let mut start = 0;
    for &len in seq_lens {
        rows.extend(std::iter::repeat((start, len)).take(len));
        start += len;
    }
    rows
}

fn dot<T: Elem>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

struct Layout {
    h: usize,
    hkv: usize,
    d: usize,
    group: usize,
    scale: f64,
}

impl Layout {
    fn new<T: Elem>(s: AttnShape, seq_lens: &[usize], q: &[T], k: &[T], v: &[T]) -> Result<(Self, usize)> {
        let (h, hkv, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
        ensure!(h > 0 && hkv > 0 && d > 0 && h % hkv == 0, "attention: {h} heads cannot share {hkv} kv heads");
        let t: usize = seq_lens.iter().sum();
        check_len("attention q", q.len(), t * h * d)?;
        check_len("attention k", k.len(), t * hkv * d)?;
        check_len("attention v", v.len(), t * hkv * d)?;
        Ok((Layout { h, hkv, d, group: h / hkv, scale: 1.0 / (d as f64).sqrt() }, t))
    }
    fn q<'a, T>(&self, q: &'a [T], t: usize, head: usize) -> &'a [T] {
        &q[(t * self.h + head) * self.d..][..self.d]
    }
    fn kv<'a, T>(&self, x: &'a [T], t: usize, kv_head: usize) -> &'a [T] {
        &x[(t * self.hkv + kv_head) * self.d..][..self.d]
    }
    /// Keys visible to local query index `i` of a sequence of `len`.
    fn visible(&self, causal: bool, i: usize, len: usize) -> usize {
        if causal {
            i + 1
        } else {
            len
        }
    }
}

pub fn forward<T: Elem>(
    shape: AttnShape,
    seq_lens: &[usize],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
) -> Result<()> {
    let (l, t) = Layout::new(shape, seq_lens, q, k, v)?;
    check_len("attention output", out.len(), t * l.h * l.d)?;
    check_len("attention lse", lse.len(), t * l.h)?;
    let rows = token_sequences(seq_lens);
    let scale = T::of(l.scale);
    out.par_chunks_mut(l.h * l.d).zip(lse.par_chunks_mut(l.h)).enumerate().for_each(|(t, (o, lse))| {
        let (s0, len) = rows[t];
        let nk = l.visible(shape.causal, t - s0, len);
        let mut p = vec![T::zero(); nk];
        for head in 0..l.h {
            let kh = head / l.group;
            let qv = l.q(q, t, head);
            for (j, pj) in p.iter_mut().enumerate() {
                *pj = dot(qv, l.kv(k, s0 + j, kh)) * scale;
            }
            let max = p.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
            p.iter_mut().for_each(|x| *x = (*x - max).exp());
            let sum: T = p.iter().copied().sum();
            lse[head] = max + sum.ln();
            let oh = &mut o[head * l.d..][..l.d];
            oh.iter_mut().for_each(|x| *x = T::zero());
            for (j, &pj) in p.iter().enumerate() {
                let w = pj / sum;
                oh.iter_mut().zip(l.kv(v, s0 + j, kh)).for_each(|(o, &vv)| *o = *o + w * vv);
            }
        }
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn backward<T: Elem>(
    shape: AttnShape,
    seq_lens: &[usize],
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    lse: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> Result<()> {
    let (l, t) = Layout::new(shape, seq_lens, q, k, v)?;
    for (what, buf, want) in [
        ("attention output", out.len(), t * l.h * l.d),
        ("attention lse", lse.len(), t * l.h),
        ("attention output gradient", dout.len(), t * l.h * l.d),
        ("attention dq", dq.len(), t * l.h * l.d),
        ("attention dk", dk.len(), t * l.hkv * l.d),
        ("attention dv", dv.len(), t * l.hkv * l.d),
    ] {
        check_len(what, buf, want)?;
    }
    let rows = token_sequences(seq_lens);
    let scale = T::of(l.scale);
    // Δ_i = Σ_d dO_i · O_i per (token, head): the softmax-backward row term.
    let delta: Vec<T> = (0..t * l.h)
        .into_par_iter()
        .map(|i| dot(&dout[i * l.d..][..l.d], &out[i * l.d..][..l.d]))
        .collect();
    let prob = |ti: usize, head: usize, tj: usize| -> T {
        (dot(l.q(q, ti, head), l.kv(k, tj, head / l.group)) * scale - lse[ti * l.h + head]).exp()
    };

    // dQ_i = scale · Σ_j P_ij (dP_ij − Δ_i) K_j, one query row per task.
    dq.par_chunks_mut(l.h * l.d).enumerate().for_each(|(ti, dqr)| {
        let (s0, len) = rows[ti];
        let nk = l.visible(shape.causal, ti - s0, len);
        for head in 0..l.h {
            let kh = head / l.group;
            let dqh = &mut dqr[head * l.d..][..l.d];
            dqh.iter_mut().for_each(|x| *x = T::zero());
            let dor = &dout[(ti * l.h + head) * l.d..][..l.d];
            for j in 0..nk {
                let tj = s0 + j;
                let ds = prob(ti, head, tj) * (dot(dor, l.kv(v, tj, kh)) - delta[ti * l.h + head]) * scale;
                dqh.iter_mut().zip(l.kv(k, tj, kh)).for_each(|(d, &kv)| *d = *d + ds * kv);
            }
        }
    });

    // dK_j, dV_j: sum over every query row (and every query head of the group) that sees key j.
    dk.par_chunks_mut(l.hkv * l.d).zip(dv.par_chunks_mut(l.hkv * l.d)).enumerate().for_each(
        |(tj, (dkr, dvr))| {
            let (s0, len) = rows[tj];
            let j = tj - s0;
            let first_query = if shape.causal { j } else { 0 };
            dkr.iter_mut().chain(dvr.iter_mut()).for_each(|x| *x = T::zero());
            for kh in 0..l.hkv {
                let dkh = &mut dkr[kh * l.d..][..l.d];
                let dvh = &mut dvr[kh * l.d..][..l.d];
                let vj = l.kv(v, tj, kh);
                for head in kh * l.group..(kh + 1) * l.group {
                    for ti in s0 + first_query..s0 + len {
                        let p = prob(ti, head, tj);
                        let dor = &dout[(ti * l.h + head) * l.d..][..l.d];
                        dvh.iter_mut().zip(dor).for_each(|(d, &g)| *d = *d + p * g);
                        let ds = p * (dot(dor, vj) - delta[ti * l.h + head]) * scale;
                        dkh.iter_mut().zip(l.q(q, ti, head)).for_each(|(d, &qv)| *d = *d + ds * qv);
                    }
                }
            }
        },
    );
    Ok(())
}
