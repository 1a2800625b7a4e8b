//! RMSNorm forward and backward (statistics in the element type, which is ≥ f32).

use anyhow::{ensure, Result};
use rayon::prelude::*;

use super::{check_len, Elem};

pub fn rmsnorm<T: Elem>(x: &[T], w: &[T], eps: f32, out: &mut [T], rstd: &mut [T]) -> Result<()> {
    let dim = w.len();
    ensure!(dim > 0 && x.len() % dim == 0, "rmsnorm: {} elements are not rows of {dim}", x.len());
    let rows = x.len() / dim;
    check_len("rmsnorm output", out.len(), x.len())?;
    check_len("rmsnorm rstd", rstd.len(), rows)?;
    let eps = T::of(eps as f64);
    let n = T::of(dim as f64);
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, xr), r)| {
            let ms = xr.iter().map(|&v| v * v).sum::<T>() / n;
            *r = T::one() / (ms + eps).sqrt();
            o.iter_mut().zip(xr).zip(w).for_each(|((o, &xv), &wv)| *o = xv * *r * wv);
        });
    Ok(())
}

/// With `x̂ = x·r`: `dx = r·(g − x̂·mean(g·x̂))` where `g = dout·w`; `dw += Σ_rows dout·x̂`.
pub fn rmsnorm_backward<T: Elem>(dout: &[T], x: &[T], w: &[T], rstd: &[T], dx: &mut [T], dw: &mut [T]) -> Result<()> {
    let dim = w.len();
    let rows = rstd.len();
    check_len("rmsnorm_backward input", x.len(), rows * dim)?;
    check_len("rmsnorm_backward gradient", dout.len(), rows * dim)?;
    check_len("rmsnorm_backward dx", dx.len(), rows * dim)?;
    check_len("rmsnorm_backward dw", dw.len(), dim)?;
    let n = T::of(dim as f64);
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim).zip(dout.par_chunks(dim)))
        .zip(rstd.par_iter())
        .for_each(|((dxr, (xr, gr)), &r)| {
            let dot = xr.iter().zip(gr).zip(w).map(|((&xv, &g), &wv)| g * wv * xv * r).sum::<T>() / n;
            dxr.iter_mut()
                .zip(xr.iter().zip(gr).zip(w))
                .for_each(|(d, ((&xv, &g), &wv))| *d = r * (g * wv - xv * r * dot));
        });
    for (xr, (gr, &r)) in x.chunks(dim).zip(dout.chunks(dim).zip(rstd)) {
        dw.iter_mut().zip(xr.iter().zip(gr)).for_each(|(d, (&xv, &g))| *d = *d + g * xv * r);
    }
    Ok(())
}

/// LayerNorm forward (biased variance, as PyTorch): only the frozen vision tower uses it.
pub fn layernorm<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f32, out: &mut [T]) -> Result<()> {
    let dim = w.len();
    ensure!(dim > 0 && x.len() % dim == 0, "layernorm: {} elements are not rows of {dim}", x.len());
    check_len("layernorm bias", b.len(), dim)?;
    check_len("layernorm output", out.len(), x.len())?;
    let (eps, n) = (T::of(eps as f64), T::of(dim as f64));
    out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(|(o, xr)| {
        let mean = xr.iter().copied().sum::<T>() / n;
        let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() / n;
        let rstd = T::one() / (var + eps).sqrt();
        o.iter_mut().zip(xr).zip(w.iter().zip(b)).for_each(|((o, &xv), (&wv, &bv))| *o = (xv - mean) * rstd * wv + bv);
    });
    Ok(())
}
