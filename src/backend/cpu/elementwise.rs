//! Row-wise and element-wise ops of the CPU backend: bias, embedding, the Q/K/V split with RoPE,
//! SwiGLU on a stacked gate/up projection, AdamW.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{check_len, Elem};
use crate::backend::{check_qkv_dims, check_swiglu, AdamWStep, GeluKind};

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

/// RoPE's inverse frequencies `θ^(−2i/D)` for i < D/2, in f64.
fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2).map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64)).collect()
}

/// (cos, sign · sin) of each pair's angle `pos · inv_freq[i]`. The angle is computed in f64, so
/// the f32 backend's cos/sin are as exact as f32 can hold; `inverse` gives the transposed rotation.
fn rope_angles<T: Elem>(pos: u32, inv_freq: &[f64], inverse: bool) -> Vec<(T, T)> {
    let sign = if inverse { -1.0 } else { 1.0 };
    inv_freq
        .iter()
        .map(|f| {
            let a = pos as f64 * f;
            (T::of(a.cos()), T::of(sign * a.sin()))
        })
        .collect()
}

/// Rotates, in place, every head of one token's row `[heads, head_dim]`: the pair (x[i], x[i + D/2])
/// of each head by the angle whose (cos, sin) is `cs[i]` (HF rotate-half). The one rotation of
/// `rope` and of the fused Q/K/V split and its backward.
fn rotate_row_heads<T: Elem>(row: &mut [T], head_dim: usize, cs: &[(T, T)]) {
    let half = head_dim / 2;
    for head in row.chunks_mut(head_dim) {
        let (lo, hi) = head.split_at_mut(half);
        for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cs) {
            let (x1, x2) = (*a, *b);
            *a = x1 * c - x2 * s;
            *b = x2 * c + x1 * s;
        }
    }
}

/// Fused Q/K/V split with RoPE: each row `q | k | v` of `qkv`, plus `bias` when given, is copied
/// into q, k and v, and q's and k's heads are rotated by HF rotate-half RoPE (for i < D/2 the pair
/// (x[i], x[i + D/2]) by `pos · θ^(−2i/D)`).
#[allow(clippy::too_many_arguments)]
pub fn qkv_split_rope<T: Elem>(
    qkv: &[T],
    bias: Option<&[T]>,
    positions: &[u32],
    head_dim: usize,
    theta: f64,
    q: &mut [T],
    k: &mut [T],
    v: &mut [T],
) -> Result<()> {
    let dims = check_qkv_dims("qkv_split_rope", ["qkv", "q", "k", "v"], positions.len(), head_dim, qkv.len(), q.len(), k.len(), v.len())?;
    let (qd, kd) = (dims.q_dim, dims.kv_dim);
    if let Some(b) = bias {
        check_len("qkv_split_rope bias", b.len(), dims.row())?;
    }
    let add = |dst: &mut [T], at: usize| {
        if let Some(b) = bias {
            dst.iter_mut().zip(&b[at..]).for_each(|(d, &x)| *d = *d + x);
        }
    };
    let inv_freq = rope_inv_freq(head_dim, theta);
    q.par_chunks_mut(qd)
        .zip(k.par_chunks_mut(kd))
        .zip(v.par_chunks_mut(kd))
        .zip(qkv.par_chunks(dims.row()))
        .zip(positions)
        .for_each(|((((qr, kr), vr), src), &pos)| {
            qr.copy_from_slice(&src[..qd]);
            kr.copy_from_slice(&src[qd..qd + kd]);
            vr.copy_from_slice(&src[qd + kd..]);
            add(qr, 0);
            add(kr, qd);
            add(vr, qd + kd);
            let cs = rope_angles::<T>(pos, &inv_freq, false);
            rotate_row_heads(qr, head_dim, &cs);
            rotate_row_heads(kr, head_dim, &cs);
        });
    Ok(())
}

/// The backward of [`qkv_split_rope`]: each row of `dqkv` is dq and dk rotated back (the
/// transposed rotation), then dv.
#[allow(clippy::too_many_arguments)]
pub fn qkv_merge_rope_backward<T: Elem>(dq: &[T], dk: &[T], dv: &[T], positions: &[u32], head_dim: usize, theta: f64, dqkv: &mut [T]) -> Result<()> {
    let what = "qkv_merge_rope_backward";
    let dims = check_qkv_dims(what, ["dqkv", "dq", "dk", "dv"], positions.len(), head_dim, dqkv.len(), dq.len(), dk.len(), dv.len())?;
    let (qd, kd) = (dims.q_dim, dims.kv_dim);
    let inv_freq = rope_inv_freq(head_dim, theta);
    dqkv.par_chunks_mut(dims.row())
        .zip(dq.par_chunks(qd))
        .zip(dk.par_chunks(kd))
        .zip(dv.par_chunks(kd))
        .zip(positions)
        .for_each(|((((dst, qr), kr), vr), &pos)| {
            let (dst_q, rest) = dst.split_at_mut(qd);
            let (dst_k, dst_v) = rest.split_at_mut(kd);
            dst_q.copy_from_slice(qr);
            dst_k.copy_from_slice(kr);
            dst_v.copy_from_slice(vr);
            let cs = rope_angles::<T>(pos, &inv_freq, true);
            rotate_row_heads(dst_q, head_dim, &cs);
            rotate_row_heads(dst_k, head_dim, &cs);
        });
    Ok(())
}

fn silu<T: Elem>(g: T) -> T {
    g / (T::one() + (-g).exp())
}

/// (dgate, dup) of `silu(g) · u` for the output gradient `d`.
fn swiglu_grads<T: Elem>(g: T, u: T, d: T) -> (T, T) {
    let sig = T::one() / (T::one() + (-g).exp());
    // d silu(g)/dg = σ(g) · (1 + g · (1 − σ(g)))
    (d * u * sig * (T::one() + g * (T::one() - sig)), d * g * sig)
}

/// SwiGLU on a stacked gate/up projection: `out[r, j] = silu(gate_up[r, j]) · gate_up[r, inter + j]`.
pub fn swiglu<T: Elem>(gate_up: &[T], inter: usize, out: &mut [T]) -> Result<()> {
    check_swiglu("swiglu", "gate_up", gate_up.len(), "out", out.len(), inter)?;
    out.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| {
        let (gate, up) = gu.split_at(inter);
        o.iter_mut().zip(gate.iter().zip(up)).for_each(|(o, (&g, &u))| *o = silu(g) * u);
    });
    Ok(())
}

/// The backward of [`swiglu`]: each row of `dgate_up` is dgate then dup.
pub fn swiglu_backward<T: Elem>(gate_up: &[T], inter: usize, dout: &[T], dgate_up: &mut [T]) -> Result<()> {
    let what = "swiglu_backward";
    let rows = check_swiglu(what, "gate_up", gate_up.len(), "dout", dout.len(), inter)?;
    check_len("swiglu_backward dgate_up", dgate_up.len(), rows * 2 * inter)?;
    dgate_up.par_chunks_mut(2 * inter).zip(gate_up.par_chunks(2 * inter)).zip(dout.par_chunks(inter)).for_each(|((dgu, gu), d)| {
        let (dgate, dup) = dgu.split_at_mut(inter);
        let (gate, up) = gu.split_at(inter);
        for j in 0..inter {
            (dgate[j], dup[j]) = swiglu_grads(gate[j], up[j], d[j]);
        }
    });
    Ok(())
}

/// erf, evaluated in f64 whatever the element type.
fn erf<T: Elem>(x: T) -> T {
    T::of(libm_erf(x.f64()))
}

/// erf in f64 to full double precision (Abramowitz–Stegun is too coarse for f64 checks), by the
/// series for small |x| and the continued fraction of erfc for large |x|.
fn libm_erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series: erf x = 2/√π Σ (−1)^n x^(2n+1) / (n! (2n+1)).
        let (mut term, mut sum, x2) = (ax, ax, ax * ax);
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc x = exp(−x²)/√π · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...)))) (Lentz-free, 60 terms).
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    r.copysign(x)
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

fn gelu_value<T: Elem>(x: T, kind: GeluKind) -> T {
    let half = T::of(0.5);
    match kind {
        GeluKind::Erf => half * x * (T::one() + erf(x / T::of(std::f64::consts::SQRT_2))),
        GeluKind::Tanh => {
            let inner = T::of(SQRT_2_OVER_PI) * (x + T::of(0.044715) * x * x * x);
            half * x * (T::one() + inner.tanh())
        }
    }
}

fn gelu_derivative<T: Elem>(x: T, kind: GeluKind) -> T {
    let half = T::of(0.5);
    match kind {
        GeluKind::Erf => {
            let cdf = half * (T::one() + erf(x / T::of(std::f64::consts::SQRT_2)));
            let pdf = (-(x * x) * half).exp() * T::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
            cdf + x * pdf
        }
        GeluKind::Tanh => {
            let c = T::of(SQRT_2_OVER_PI);
            let k = T::of(0.044715);
            let th = (c * (x + k * x * x * x)).tanh();
            half * (T::one() + th) + half * x * (T::one() - th * th) * c * (T::one() + T::of(3.0) * k * x * x)
        }
    }
}

pub fn gelu<T: Elem>(x: &[T], out: &mut [T], kind: GeluKind) -> Result<()> {
    check_len("gelu output", out.len(), x.len())?;
    out.par_iter_mut().with_min_len(PAR_MIN_LEN).zip(x.par_iter()).for_each(|(o, &v)| *o = gelu_value(v, kind));
    Ok(())
}

pub fn gelu_backward<T: Elem>(x: &[T], dout: &[T], dx: &mut [T], kind: GeluKind) -> Result<()> {
    check_len("gelu_backward gradient", dout.len(), x.len())?;
    check_len("gelu_backward dx", dx.len(), x.len())?;
    dx.par_iter_mut()
        .with_min_len(PAR_MIN_LEN)
        .zip(x.par_iter().zip(dout.par_iter()))
        .for_each(|(d, (&v, &g))| *d = g * gelu_derivative(v, kind));
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
