//! Attention launchers for `kernels/attention.cu` (flash forward; backward = preprocess Δ, flash
//! backward with dQ accumulated in f32, then dQ → bf16). Launch configurations are the ones the
//! kernel file's header gives; the head dims with kernels are 64, 72, 80 and 128.

use anyhow::{bail, ensure, Result};

use super::ops::args;
use super::{align256, bf, check_len, f32p, int, CudaBackend, CudaBuf, DType, GRID_YZ};
use crate::backend::AttnShape;

/// Head dims with a kernel.
pub const HEAD_DIMS: [usize; 4] = [64, 72, 80, 128];

const BLOCK: u32 = 128;
const TILE: usize = 64;

fn names(d: usize) -> Result<(&'static str, &'static str)> {
    Ok(match d {
        64 => ("flash_attn_fwd_bf16_d64", "flash_attn_bwd_bf16_d64"),
        72 => ("flash_attn_fwd_bf16_d72", "flash_attn_bwd_bf16_d72"),
        80 => ("flash_attn_fwd_bf16_d80", "flash_attn_bwd_bf16_d80"),
        128 => ("flash_attn_fwd_bf16_d128", "flash_attn_bwd_bf16_d128"),
        _ => bail!("attention: head_dim {d} has no CUDA kernel (the fused attention supports {HEAD_DIMS:?})"),
    })
}

/// Row stride of the kernels' shared-memory tiles, in elements.
fn ld(d: usize) -> usize {
    d.div_ceil(16) * 16 + 8
}

fn fwd_smem(d: usize) -> u32 {
    (4 * TILE * ld(d)) as u32
}

/// Warps of the backward sharing each group of 16 keys (AttCfg::BWD_WN): two at head dim 128,
/// where one warp's dK and dV accumulators over all of d would not fit its registers.
fn bwd_warps_per_key_group(d: usize) -> usize {
    if d > 80 { 2 } else { 1 }
}

fn bwd_block(d: usize) -> u32 {
    BLOCK * bwd_warps_per_key_group(d) as u32
}

fn bwd_smem(d: usize) -> u32 {
    let l = ld(d);
    // K, V, Q, dO tiles; dSᵀ, and Pᵀ when two warps share a key group; lse and delta (f32).
    let key_by_query_tiles = bwd_warps_per_key_group(d);
    (2 * (2 * TILE * l + 2 * TILE * l + TILE * (TILE + 8) * key_by_query_tiles) + 8 * TILE) as u32
}

struct Seqs {
    cu: Vec<i32>,
    n_seqs: i32,
    max_len: i32,
    tokens: usize,
}

fn check(shape: AttnShape, seq_lens: &[usize], q: &CudaBuf, k: &CudaBuf, v: &CudaBuf) -> Result<Seqs> {
    let (h, hkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    ensure!(h > 0 && hkv > 0 && d > 0 && h % hkv == 0, "attention: {h} heads cannot share {hkv} kv heads");
    names(d)?;
    // One grid z-slice per sequence.
    ensure!(seq_lens.len() <= GRID_YZ, "attention: {} sequences in one call; the CUDA kernels take at most {GRID_YZ}", seq_lens.len());
    let t: usize = seq_lens.iter().sum();
    check_len("attention q", q.len(), t * h * d)?;
    check_len("attention k", k.len(), t * hkv * d)?;
    check_len("attention v", v.len(), t * hkv * d)?;
    let mut cu = Vec::with_capacity(seq_lens.len() + 1);
    cu.push(0i32);
    let mut acc = 0usize;
    for &l in seq_lens {
        acc += l;
        cu.push(int(acc, "packed tokens")?);
    }
    let max_len = seq_lens.iter().copied().max().unwrap_or(0);
    Ok(Seqs { cu, n_seqs: int(seq_lens.len(), "sequences")?, max_len: int(max_len, "sequence length")?, tokens: t })
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    be: &CudaBackend,
    shape: AttnShape,
    seq_lens: &[usize],
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
) -> Result<()> {
    let s = check(shape, seq_lens, q, k, v)?;
    let (h, d) = (shape.n_heads, shape.head_dim);
    check_len("attention output", out.len(), s.tokens * h * d)?;
    check_len("attention lse", lse.len(), s.tokens * h)?;
    if lse.dtype() != DType::F32 {
        *lse = be.alloc(lse.len(), DType::F32)?;
    }
    if s.tokens == 0 {
        return Ok(());
    }
    let (qp, kp, vp, op, lp) = (bf(q, "attention q")?, bf(k, "attention k")?, bf(v, "attention v")?, bf(out, "attention output")?, lse.ptr());
    let (fwd, _) = names(d)?;
    let (_g, cup) = be.upload_idx(&s.cu)?;
    let (n_seqs, max_len, nh, nkv) = (s.n_seqs, s.max_len, int(h, "heads")?, int(shape.n_kv_heads, "kv heads")?);
    let causal: i32 = shape.causal as i32;
    let scale = 1.0 / (d as f32).sqrt();
    let mut a = args![qp, kp, vp, op, lp, cup, n_seqs, max_len, nh, nkv, causal, scale];
    let grid = ((s.max_len as usize).div_ceil(TILE) as u32, h as u32, s.n_seqs as u32);
    // SAFETY: q, out [T, H, D], k, v [T, Hkv, D], lse f32 [T, H], cu_seqlens n_seqs + 1 ints.
    unsafe { be.gpu().launch("attention", fwd, grid, (BLOCK, 1, 1), fwd_smem(d), &mut a) }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    be: &CudaBackend,
    shape: AttnShape,
    seq_lens: &[usize],
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    out: &CudaBuf,
    lse: &CudaBuf,
    dout: &CudaBuf,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
) -> Result<()> {
    let s = check(shape, seq_lens, q, k, v)?;
    let (h, hkv, d, t) = (shape.n_heads, shape.n_kv_heads, shape.head_dim, s.tokens);
    for (what, got, want) in [
        ("attention output", out.len(), t * h * d),
        ("attention lse", lse.len(), t * h),
        ("attention output gradient", dout.len(), t * h * d),
        ("attention dq", dq.len(), t * h * d),
        ("attention dk", dk.len(), t * hkv * d),
        ("attention dv", dv.len(), t * hkv * d),
    ] {
        check_len(what, got, want)?;
    }
    if t == 0 {
        return Ok(());
    }
    let lp = f32p(lse, "attention lse (written by the CUDA attention forward)")?;
    let (qp, kp, vp) = (bf(q, "attention q")?, bf(k, "attention k")?, bf(v, "attention v")?);
    let (op, gp) = (bf(out, "attention output")?, bf(dout, "attention output gradient")?);
    let (dqp, dkp, dvp) = (bf(dq, "attention dq")?, bf(dk, "attention dk")?, bf(dv, "attention dv")?);
    let (_, bwd) = names(d)?;
    let gpu = be.gpu();
    let (_gi, cup) = be.upload_idx(&s.cu)?;
    // Work: delta f32 [T·H], dq_accum f32 [T·H·D].
    let delta_bytes = align256(t * h * 4);
    let (_gw, base) = be.work_f32((delta_bytes + t * h * d * 4).div_ceil(4))?;
    let (delta, dq_acc) = (base, base + delta_bytes as u64);
    gpu.memset_u8(dq_acc, 0, t * h * d * 4)?;

    let (rows, di) = ((t * h) as i64, int(d, "head_dim")?);
    let mut a = args![op, gp, delta, rows, di];
    // SAFETY: out, dout [T·H, D] bf16; delta T·H f32.
    unsafe { gpu.launch("attention", "flash_attn_bwd_preprocess_bf16", ((t * h).div_ceil(4) as u32, 1, 1), (BLOCK, 1, 1), 0, &mut a)? };

    let (n_seqs, max_len, nh, nkv) = (s.n_seqs, s.max_len, int(h, "heads")?, int(hkv, "kv heads")?);
    let causal: i32 = shape.causal as i32;
    let scale = 1.0 / (d as f32).sqrt();
    let mut a = args![qp, kp, vp, gp, lp, delta, dq_acc, dkp, dvp, cup, n_seqs, max_len, nh, nkv, causal, scale];
    let grid = ((s.max_len as usize).div_ceil(TILE) as u32, hkv as u32, s.n_seqs as u32);
    // SAFETY: shapes as checked above; dq_accum zeroed.
    unsafe { gpu.launch("attention", bwd, grid, (bwd_block(d), 1, 1), bwd_smem(d), &mut a)? };

    let n = (t * h * d) as i64;
    let mut a = args![dq_acc, dqp, n];
    // SAFETY: dq_accum and dq hold T·H·D elements.
    unsafe { gpu.launch("attention", "flash_attn_dq_to_bf16", be.grid1d(t * h * d), (256, 1, 1), 0, &mut a) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shared_memory_sizes_match_the_kernel_header() {
        assert_eq!([64, 72, 80, 128].map(super::fwd_smem), [18432, 22528, 22528, 34816]);
        assert_eq!([64, 72, 80, 128].map(super::bwd_smem), [46592, 54784, 54784, 88576]);
        assert_eq!([64, 72, 80, 128].map(super::bwd_block), [128, 128, 128, 256]);
    }
}
