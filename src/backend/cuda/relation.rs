//! The relation loss (RDist) on CUDA: per image, the Gram matrices R = Z·Zᵀ of the student and
//! teacher logits with cuBLAS (bf16 rows read in place with the logits' row stride, fp32 output),
//! the cosine loss and ∂loss/∂R_s with `relation.cu` (two launches: per-block partial sums, then
//! the coefficients and the gradient), then ∂Z_s += 2·G·Z_s with cuBLAS (G rounded to bf16, the
//! accumulation into the bf16 gradient in fp32 through beta = 1).
//!
//! Images with the same number of rows share one pair of kernel launches (the kernels take a
//! single n); the usual case, every image with 728 visual rows, is one group.

use anyhow::{ensure, Result};

use super::ops::args;
use super::{align256, bf, CudaBackend, CudaBuf, GRID_YZ};
use crate::backend::KlShape;

/// Blocks per image of the relation kernels (`RELATION_BLOCKS` in kernels/relation.cu).
const RELATION_BLOCKS: usize = 128;

/// Byte offsets of the f32 work area of one group of `c` images with `n` rows each.
struct Layout {
    gram_s: usize,
    gram_t: usize,
    grad: usize,
    grad_bf16: usize,
    partials: usize,
    total: usize,
}

impl Layout {
    fn new(c: usize, n: usize) -> Self {
        let g = align256(c * n * n * 4);
        let gram_s = 0;
        let gram_t = gram_s + g;
        let grad = gram_t + g;
        let grad_bf16 = grad + g;
        let partials = grad_bf16 + align256(c * n * n * 2);
        let total = partials + align256(c * RELATION_BLOCKS * 3 * 8);
        Layout { gram_s, gram_t, grad, grad_bf16, partials, total }
    }
}

/// Checked by the caller: shapes, image ranges in bounds, non-empty and disjoint. Adds the loss
/// sum to the f64 at `loss_sum` (a slot of the step's sums).
#[allow(clippy::too_many_arguments)]
pub(crate) fn relation_loss(
    be: &CudaBackend,
    student: &CudaBuf,
    teacher: &CudaBuf,
    shape: KlShape,
    images: &[(u32, u32)],
    scale: f32,
    dstudent: &mut CudaBuf,
    loss_sum: u64,
) -> Result<()> {
    let KlShape { student_vocab: vs, teacher_vocab: vt, kept, .. } = shape;
    let sp = bf(student, "relation_loss student logits")?;
    let tp = bf(teacher, "relation_loss teacher logits")?;
    let dp = bf(dstudent, "relation_loss student gradient")?;
    // Groups of images with equal n, in order of first appearance.
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for &(start, n) in images {
        let (start, n) = (start as usize, n as usize);
        match groups.iter_mut().find(|(gn, _)| *gn == n) {
            Some((_, starts)) => starts.push(start),
            None => groups.push((n, vec![start])),
        }
    }
    let gpu = be.gpu();
    for (n, starts) in &groups {
        let (n, c) = (*n, starts.len());
        // One grid row per image of the group.
        ensure!(c <= GRID_YZ, "relation_loss: {c} images of {n} rows in one call; the CUDA kernels take at most {GRID_YZ}");
        let lay = Layout::new(c, n);
        let (_guard, base) = be.work_f32(lay.total.div_ceil(4))?;
        let at = |off: usize| base + off as u64;
        let nn = (n * n) as u64;
        for (j, &start) in starts.iter().enumerate() {
            let zs = sp + (start * vs * 2) as u64;
            let zt = tp + (start * vt * 2) as u64;
            // SAFETY: rows start..start+n of each logit buffer (kept ≤ vocab columns, row stride
            // vocab) are in bounds (checked by the caller); the Gram slots hold n·n f32.
            unsafe {
                gpu.gemm(false, true, n, n, kept, 1.0, zs, vs, zs, vs, 0.0, at(lay.gram_s) + j as u64 * nn * 4, n, true)?;
                gpu.gemm(false, true, n, n, kept, 1.0, zt, vt, zt, vt, 0.0, at(lay.gram_t) + j as u64 * nn * 4, n, true)?;
            }
        }
        let (gs, gt, gg, gpart, gbf) = (at(lay.gram_s), at(lay.gram_t), at(lay.grad), at(lay.partials), at(lay.grad_bf16));
        cosine_launches(be, false, gs, gt, n * n, c, scale, gpart, loss_sum, gg)?;
        let count = (c * n * n) as i64;
        let mut a = args![gg, gbf, count];
        // SAFETY: grad holds count f32, grad_bf16 count bf16.
        unsafe { gpu.launch("elementwise", "f32_to_bf16", be.grid1d(c * n * n), (256, 1, 1), 0, &mut a)? };
        for (j, &start) in starts.iter().enumerate() {
            let zs = sp + (start * vs * 2) as u64;
            let d = dp + (start * vs * 2) as u64;
            // ∂Z_s[n, kept] += 2·G[n, n]·Z_s[n, kept] (the scale is inside G).
            // SAFETY: G_j is n·n bf16; Z_s and its gradient rows as above.
            unsafe { gpu.gemm(false, false, n, kept, n, 2.0, gbf + j as u64 * nn * 2, n, zs, vs, 1.0, d, vs, false)? };
        }
    }
    Ok(())
}

/// The two cosine kernels over `c` image pairs of `nn` entries each (f32 Grams and gradient, or
/// bf16 with `bf16`): writes the gradient Grams at `grad` and adds the images' loss sum to the f64
/// at `loss_sum`; `partials` holds c·RELATION_BLOCKS·3 f64.
#[allow(clippy::too_many_arguments)]
fn cosine_launches(be: &CudaBackend, bf16: bool, gs: u64, gt: u64, nn: usize, c: usize, scale: f32, partials: u64, loss_sum: u64, grad: u64) -> Result<()> {
    let (partials_kernel, grad_kernel) =
        if bf16 { ("relation_cosine_partials_bf16", "relation_cosine_grad_bf16") } else { ("relation_cosine_partials", "relation_cosine_grad") };
    let (nn, ci) = (nn as i64, super::int(c, "images")?);
    let grid = (RELATION_BLOCKS as u32, c as u32, 1);
    let mut a = args![gs, gt, nn, ci, partials];
    // SAFETY: c Gram pairs of nn entries, partials c·RELATION_BLOCKS·3 f64.
    unsafe { be.gpu().launch("relation", partials_kernel, grid, (256, 1, 1), 0, &mut a)? };
    let mut a = args![gs, gt, nn, ci, scale, partials, loss_sum, grad];
    // SAFETY: as above; loss_sum one f64, grad c·nn entries.
    unsafe { be.gpu().launch("relation", grad_kernel, grid, (256, 1, 1), 0, &mut a) }
}

/// The identity form's cosine ([`crate::backend::Backend::gram_cosine_into`]) on bf16 Grams of
/// equal length (checked by the caller): one image, the same kernels as the logits form.
pub(crate) fn gram_cosine(be: &CudaBackend, rs: &CudaBuf, rt: &CudaBuf, scale: f32, grad: &mut CudaBuf, loss_sum: u64) -> Result<()> {
    let (sp, tp, gp) = (bf(rs, "gram_cosine student Gram")?, bf(rt, "gram_cosine teacher Gram")?, bf(grad, "gram_cosine gradient")?);
    let (_guard, partials) = be.work_f32(2 * RELATION_BLOCKS * 3)?;
    cosine_launches(be, true, sp, tp, rs.len, 1, scale, partials, loss_sum, gp)
}
