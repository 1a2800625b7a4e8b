//! Fused cross-entropy (loss and gradient in one pass per row), the reference for the CUDA kernel.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{check_len, Elem};
use crate::backend::IGNORE_INDEX;

pub fn cross_entropy<T: Elem>(logits: &[T], targets: &[i32], vocab: usize, scale: f32, dlogits: &mut [T]) -> Result<f64> {
    ensure!(vocab > 0, "cross_entropy: empty vocabulary");
    let rows = targets.len();
    check_len("cross_entropy logits", logits.len(), rows * vocab)?;
    check_len("cross_entropy dlogits", dlogits.len(), rows * vocab)?;
    if let Some((r, &t)) = targets.iter().enumerate().find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
        bail!("cross_entropy: target {t} at row {r} is outside the vocabulary of {vocab}");
    }
    let scale = T::of(scale as f64);
    // Per-row losses are collected in order and summed sequentially: a rayon reduction would
    // associate differently from run to run, and resumed runs must reproduce losses bit for bit.
    let per_row: Vec<f64> = dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((d, z), &t)| {
            d.iter_mut().for_each(|v| *v = T::zero());
            if t == IGNORE_INDEX {
                return 0.0;
            }
            ce_row(z, t as usize, scale, d)
        })
        .collect();
    Ok(per_row.iter().sum())
}

/// One row's cross-entropy against `target` (in range): returns −log softmax(z)[target] and
/// **adds** `scale · (softmax(z) − onehot)` to `d`.
pub fn ce_row<T: Elem>(z: &[T], target: usize, scale: T, d: &mut [T]) -> f64 {
    let max = z.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    let sum = z.iter().map(|&v| (v - max).exp()).sum::<T>();
    let lse = max + sum.ln();
    d.iter_mut().zip(z).for_each(|(d, &v)| *d = *d + scale * (v - lse).exp());
    d[target] = d[target] - scale;
    (lse - z[target]).f64()
}
