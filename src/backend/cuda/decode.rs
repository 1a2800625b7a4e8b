//! Decode-attention launcher for `kernels/decode_attention.cu`: one new query per row against that
//! row's KV-cache slot ([`crate::backend::Backend::attention_decode`]). One launch of the split
//! kernel, plus the combine kernel when the positions were split (flash-decoding); the launch
//! configuration is the one the kernel file's header gives.

use anyhow::{anyhow, bail, ensure, Result};

use super::ops::args;
use super::{align256, bf, int, CudaBackend, CudaBuf, GRID_YZ};
use crate::backend::{check_decode_args, AttnShape};

/// Head dims with a decode kernel.
pub const HEAD_DIMS: [usize; 4] = [64, 72, 80, 128];

const BLOCK: u32 = 128;
/// Warps per block of the combine kernel (one per (row, head)).
const COMBINE_WARPS: usize = 4;
/// Split lengths are multiples of this many positions.
const CHUNK_ALIGN: usize = 128;
/// Positions are not split into chunks shorter than about this.
const MIN_CHUNK: usize = 256;
/// Blocks per SM the split aims for (each block holds few loads in flight: see the kernel header).
const BLOCKS_PER_SM: usize = 4;
/// CUDA's limit on grid.y and grid.z.

/// Query heads per block: the smallest of 1, 2, 4, 8 that holds the GQA group; larger groups take
/// several blocks of 8.
fn group_chunk(group: usize) -> usize {
    match group {
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

fn kernel(d: usize, gc: usize) -> Result<&'static str> {
    const NAMES: [[&str; 4]; 4] = [
        ["decode_attn_bf16_d64_g1", "decode_attn_bf16_d64_g2", "decode_attn_bf16_d64_g4", "decode_attn_bf16_d64_g8"],
        ["decode_attn_bf16_d72_g1", "decode_attn_bf16_d72_g2", "decode_attn_bf16_d72_g4", "decode_attn_bf16_d72_g8"],
        ["decode_attn_bf16_d80_g1", "decode_attn_bf16_d80_g2", "decode_attn_bf16_d80_g4", "decode_attn_bf16_d80_g8"],
        ["decode_attn_bf16_d128_g1", "decode_attn_bf16_d128_g2", "decode_attn_bf16_d128_g4", "decode_attn_bf16_d128_g8"],
    ];
    let di = match d {
        64 => 0,
        72 => 1,
        80 => 2,
        128 => 3,
        _ => bail!("attention_decode: head_dim {d} has no CUDA kernel (the decode kernels support {HEAD_DIMS:?})"),
    };
    let gi = match gc {
        1 => 0,
        2 => 1,
        4 => 2,
        8 => 3,
        _ => bail!("attention_decode: no kernel for {gc} heads per block"),
    };
    Ok(NAMES[di][gi])
}

/// `(chunk, n_splits)` for rows of at most `max_len` (≥ 1) positions when one split of every row
/// is `base_blocks` blocks: enough splits for about [`BLOCKS_PER_SM`] blocks per SM, chunks a
/// multiple of [`CHUNK_ALIGN`] and not much shorter than [`MIN_CHUNK`].
fn plan_splits(max_len: usize, base_blocks: usize, sm_count: usize) -> (usize, usize) {
    let max_len = max_len.max(1);
    let want = (BLOCKS_PER_SM * sm_count.max(1)).div_ceil(base_blocks.max(1));
    let n = want.clamp(1, max_len.div_ceil(MIN_CHUNK).max(1));
    let chunk = max_len.div_ceil(n).div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
    (chunk, max_len.div_ceil(chunk))
}

/// `Backend::attention_decode` on CUDA. `chunk` forces the split length (tests use it to run both
/// the single-pass and the split path); `None` plans it from the shape and the SM count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode(
    be: &CudaBackend,
    shape: AttnShape,
    capacity: usize,
    slots: &[u32],
    lens: &[usize],
    q: &CudaBuf,
    k_cache: &CudaBuf,
    v_cache: &CudaBuf,
    out: &mut CudaBuf,
    chunk: Option<usize>,
) -> Result<()> {
    check_decode_args(shape, capacity, slots, lens, q.len(), k_cache.len(), v_cache.len(), out.len())?;
    let (h, hkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let rows = slots.len();
    let group = h / hkv;
    let gc = group_chunk(group);
    let name = kernel(d, gc)?;
    let (qp, kp, vp) = (bf(q, "attention_decode q")?, bf(k_cache, "attention_decode K cache")?, bf(v_cache, "attention_decode V cache")?);
    let op = bf(out, "attention_decode output")?;
    if rows == 0 {
        return Ok(());
    }
    let n_gc = group.div_ceil(gc);
    ensure!(rows <= GRID_YZ, "attention_decode: {rows} rows in one call; the CUDA kernel takes at most {GRID_YZ} (decode in batches)");
    ensure!(hkv * n_gc <= GRID_YZ, "attention_decode: {hkv} kv heads × {n_gc} head blocks exceed the CUDA grid's {GRID_YZ}");
    let max_len = lens.iter().copied().max().unwrap_or(1);
    let (chunk, n_splits) = match chunk {
        Some(c) => {
            ensure!(c > 0, "attention_decode: split length 0");
            (c, max_len.div_ceil(c))
        }
        None => plan_splits(max_len, rows * hkv * n_gc, be.gpu().sm_count.max(1) as usize),
    };

    // (slot, len) per row, one upload.
    let mut meta = Vec::with_capacity(2 * rows);
    for (&slot, &len) in slots.iter().zip(lens) {
        meta.push(int(slot as usize, "cache slot")?);
        meta.push(int(len, "cached length")?);
    }
    let (_gi, metap) = be.upload_idx(&meta)?;
    // Partials, only when some row has more than one split: o fp32 [R, H, n_splits, D], then the
    // base-2 log-sum-exp fp32 [R, H, n_splits].
    let (_gw, po, pl) = if n_splits > 1 {
        let n = rows
            .checked_mul(h)
            .and_then(|x| x.checked_mul(n_splits))
            .ok_or_else(|| anyhow!("attention_decode: partial results overflow"))?;
        let o_bytes = align256(n * d * 4);
        let (g, base) = be.work_f32((o_bytes + n * 4).div_ceil(4))?;
        (Some(g), base, base + o_bytes as u64)
    } else {
        (None, 0u64, 0u64)
    };
    let (capi, hi, hkvi, di) = (int(capacity, "cache capacity")?, int(h, "heads")?, int(hkv, "kv heads")?, int(d, "head_dim")?);
    let (chunki, splitsi, rowsi) = (int(chunk, "split length")?, int(n_splits, "splits")?, int(rows, "rows")?);
    let scale = 1.0 / (d as f32).sqrt();
    let gpu = be.gpu();
    let mut a = args![qp, kp, vp, op, po, pl, metap, capi, hi, hkvi, chunki, scale];
    let grid = (n_splits as u32, (hkv * n_gc) as u32, rows as u32);
    // SAFETY: q, out [R, H·D] and the caches [n_slots, capacity, Hkv·D] bf16 as checked above;
    // every (slot, len) is in range; the partials hold R·H·n_splits·(D + 1) f32 when n_splits > 1
    // (not touched otherwise: every row then has len <= chunk).
    unsafe { gpu.launch("decode_attention", name, grid, (BLOCK, 1, 1), 0, &mut a)? };
    if n_splits > 1 {
        let mut a = args![po, pl, op, metap, rowsi, hi, di, chunki, splitsi];
        // SAFETY: the partials written above; out [R, H·D]; row_meta 2·R ints.
        unsafe {
            gpu.launch("decode_attention", "decode_attn_combine_bf16", ((rows * h).div_ceil(COMBINE_WARPS) as u32, 1, 1), (BLOCK, 1, 1), 0, &mut a)?
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{group_chunk, kernel, plan_splits};

    #[test]
    fn splits_fill_the_device_and_cover_every_position() {
        // One row, 16 kv heads, 132 SMs: 4·132/16 → 33 splits wanted, at most 4096/256 = 16.
        assert_eq!(plan_splits(4096, 16, 132), (256, 16));
        // Enough blocks already: one split, the whole row.
        assert_eq!(plan_splits(4096, 8 * 16 * 8, 132), (4096, 1));
        // Short rows are not split below MIN_CHUNK.
        assert_eq!(plan_splits(200, 1, 132), (256, 1));
        assert_eq!(plan_splits(1, 1, 132), (128, 1));
        for (len, base, sms) in [(1usize, 1usize, 1usize), (300, 2, 132), (2000, 7, 78), (4097, 16, 132), (100_000, 1, 132)] {
            let (chunk, n) = plan_splits(len, base, sms);
            assert!(chunk % 128 == 0 && chunk * n >= len && chunk * (n - 1) < len, "{len} {base} {sms}: {chunk} x {n}");
        }
    }

    #[test]
    fn kernels_for_every_head_dim_and_group() {
        assert_eq!([1, 2, 3, 4, 5, 7, 8, 14].map(group_chunk), [1, 2, 4, 4, 8, 8, 8, 8]);
        assert_eq!(kernel(128, 8).ok(), Some("decode_attn_bf16_d128_g8"));
        assert_eq!(kernel(72, 2).ok(), Some("decode_attn_bf16_d72_g2"));
        let e = kernel(96, 1).unwrap_err().to_string();
        assert!(e.contains("head_dim 96") && e.contains("[64, 72, 80, 128]"), "{e}");
    }
}
