//! Row-wise and element-wise ops of the CPU backend: bias, embedding, RoPE, SwiGLU, AdamW.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{check_len, Elem};
use crate::backend::AdamWStep;

/// Rows shorter than this are not worth a rayon task each.
const PAR_MIN_LEN: usize = 1 << 14;

pub fn add_bias<T: Elem>(x: &mut [T], bias: &[T], rows: usize) -> Result<()> {
    check_len("add_bias input", x.len(), rows * bias.len())?;
    if bias.is_empty() {
        return Ok(());
    }
    x.par_chunks_mut(bias.len()).for_each(|row| {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v = *v + b);
    });
    Ok(())
}

pub fn bias_grad<T: Elem>(dy: &[T], dbias: &mut [T], rows: usize) -> Result<()> {
    check_len("bias_grad input", dy.len(), rows * dbias.len())?;
    if dbias.is_empty() {
        return Ok(());
    }
    for row in dy.chunks(dbias.len()) {
        dbias.iter_mut().zip(row).for_each(|(d, &g)| *d = *d + g);
    }
    Ok(())
}

pub fn embedding<T: Elem>(table: &[T], ids: &[u32], dim: usize, out: &mut [T]) -> Result<()> {
    ensure!(dim > 0 && table.len() % dim == 0, "embedding: table length {} is not a multiple of {dim}", table.len());
    check_len("embedding output", out.len(), ids.len() * dim)?;
    let rows = table.len() / dim;
    if let Some((t, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
        bail!("token id {id} at position {t} is out of range for a vocabulary of {rows} rows");
    }
    out.par_chunks_mut(dim).zip(ids).for_each(|(row, &id)| {
        let start = id as usize * dim;
        row.copy_from_slice(&table[start..start + dim]);
    });
    Ok(())
}

pub fn embedding_backward<T: Elem>(dout: &[T], ids: &[u32], dim: usize, dtable: &mut [T]) -> Result<()> {
    check_len("embedding_backward gradient", dout.len(), ids.len() * dim)?;
    let rows = dtable.len() / dim.max(1);
    for (t, (&id, g)) in ids.iter().zip(dout.chunks(dim)).enumerate() {
        ensure!((id as usize) < rows, "token id {id} at position {t} is out of range for {rows} rows");
        let start = id as usize * dim;
        dtable[start..start + dim].iter_mut().zip(g).for_each(|(d, &v)| *d = *d + v);
    }
    Ok(())
}

/// HF rotate-half RoPE: for i < D/2 the pair (x[i], x[i + D/2]) rotates by `pos · θ^(−2i/D)`.
/// The angle is computed in f64, so the f32 backend's cos/sin are as exact as f32 can hold.
pub fn rope<T: Elem>(x: &mut [T], positions: &[u32], head_dim: usize, theta: f64, inverse: bool) -> Result<()> {
    ensure!(head_dim % 2 == 0 && head_dim > 0, "rope: head_dim {head_dim} must be even");
    let t = positions.len();
    ensure!(t > 0 && x.len() % (t * head_dim) == 0, "rope: {} elements do not split into {t} tokens of heads × {head_dim}", x.len());
    let row_len = x.len() / t;
    let half = head_dim / 2;
    let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect();
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(row_len).zip(positions).for_each(|(row, &pos)| {
        let cs: Vec<(T, T)> = inv_freq
            .iter()
            .map(|f| {
                let a = pos as f64 * f;
                (T::of(a.cos()), T::of(sign * a.sin()))
            })
            .collect();
        for head in row.chunks_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(&cs) {
                let (x1, x2) = (*a, *b);
                *a = x1 * c - x2 * s;
                *b = x2 * c + x1 * s;
            }
        }
    });
    Ok(())
}

fn silu<T: Elem>(g: T) -> T {
    g / (T::one() + (-g).exp())
}

pub fn swiglu<T: Elem>(gate: &[T], up: &[T], out: &mut [T]) -> Result<()> {
    check_len("swiglu up", up.len(), gate.len())?;
    check_len("swiglu output", out.len(), gate.len())?;
    out.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| *o = silu(g) * u);
    Ok(())
}

pub fn swiglu_backward<T: Elem>(gate: &[T], up: &[T], dout: &[T], dgate: &mut [T], dup: &mut [T]) -> Result<()> {
    let n = gate.len();
    check_len("swiglu_backward up", up.len(), n)?;
    check_len("swiglu_backward gradient", dout.len(), n)?;
    check_len("swiglu_backward dgate", dgate.len(), n)?;
    check_len("swiglu_backward dup", dup.len(), n)?;
    dgate
        .par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let g = gate[i];
            let sig = T::one() / (T::one() + (-g).exp());
            // d silu(g)/dg = σ(g) · (1 + g · (1 − σ(g)))
            *dg = dout[i] * up[i] * sig * (T::one() + g * (T::one() - sig));
            *du = dout[i] * g * sig;
        });
    Ok(())
}

/// PyTorch `AdamW` (its single-tensor formula, operation for operation, so an f32 run matches
/// `torch.optim.AdamW` to f32 rounding).
pub fn adamw<T: Elem>(h: AdamWStep, param: &mut [T], grad: &[T], m: &mut [T], v: &mut [T]) -> Result<()> {
    let n = param.len();
    check_len("adamw gradient", grad.len(), n)?;
    check_len("adamw first moment", m.len(), n)?;
    check_len("adamw second moment", v.len(), n)?;
    ensure!(h.step >= 1, "adamw: step counts from 1");
    let lr = h.lr as f64;
    let decay = T::of(1.0 - lr * h.weight_decay as f64);
    let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let bc2_sqrt = T::of((1.0 - (h.beta2 as f64).powi(h.step as i32)).sqrt());
    let step_size = T::of(lr / bc1);
    let (b1w, b2, b2w) = (T::of(1.0 - h.beta1 as f64), T::of(h.beta2 as f64), T::of(1.0 - h.beta2 as f64));
    let (eps, gs) = (T::of(h.eps as f64), T::of(h.grad_scale as f64));
    param
        .par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .zip(grad.par_iter())
        .for_each(|((p, (m, v)), &g)| {
            let g = g * gs;
            *p = *p * decay;
            *m = *m + b1w * (g - *m);
            *v = *v * b2 + b2w * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p = *p - step_size * (*m / denom);
        });
    Ok(())
}
