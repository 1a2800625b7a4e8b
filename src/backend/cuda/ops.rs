//! The op set on CUDA: [`Backend`] for [`CudaBackend`]. Each op checks its lengths (as the CPU
//! backend does), stages its index arrays, and launches its kernel(s); see the table in `mod.rs`.

use anyhow::{bail, ensure, Result};

use super::{bf, check_len, f32p, int, to_bf16_bits, CudaBackend, CudaBuf, CudaSums, DType, KArg};
use crate::backend::{
    check_ce_labels, check_kl_rows, check_kl_shape, check_qkv_dims, check_relation_images, check_row_terms, check_swiglu, AdamWStep, AttnShape, Backend, Divergence, Gemm, GeluKind,
    KlShape, RowTerms, IGNORE_INDEX,
};

/// Kernel argument list from local variables: one [`KArg`] per parameter (the variable's address
/// and size; the launch checks the sizes against the PTX). Only plain identifiers are accepted,
/// so every pointee outlives the launch call that uses the list.
macro_rules! args {
    ($($a:ident),* $(,)?) => {
        [$( $crate::backend::cuda::KArg::of(&$a) ),*]
    };
}
pub(crate) use args;

impl CudaBackend {
    /// Launches a one-dimensional grid-stride kernel over `n` elements.
    ///
    /// # Safety
    /// As [`super::device::Gpu::launch`].
    unsafe fn launch_1d(&self, module: &'static str, name: &'static str, n: usize, args: &mut [KArg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.gpu.launch(module, name, self.grid1d(n), (256, 1, 1), 0, args)
    }

    /// How a column sum over `rows` rows of width `dim` is split: (slices, rows per slice), enough
    /// blocks of 32 columns × one slice to fill the device about four times, at least 64 rows a
    /// slice. The count depends only on the shape and the device, so the sums' bits do too.
    fn row_slices(&self, rows: usize, dim: usize) -> (usize, usize) {
        let col_blocks = dim.div_ceil(32).max(1);
        let want = (4 * self.gpu.sm_count.max(1) as usize).div_ceil(col_blocks);
        let slices = want.clamp(1, rows.div_ceil(64).clamp(1, super::GRID_YZ));
        let per = rows.div_ceil(slices).max(1);
        (rows.div_ceil(per).max(1), per)
    }

    /// `out[c] += Σ_s partials[s, c]` (bf16 `out` of `dim`), the slices in order.
    fn add_column_partials(&self, partials: u64, slices: usize, out: u64, dim: usize) -> Result<()> {
        let (s, d) = (int(slices, "row slices")?, int(dim, "columns")?);
        let mut a = args![partials, s, d, out];
        // SAFETY: partials holds slices × dim f32, out dim bf16.
        unsafe { self.launch_1d("elementwise", "column_partials_add_bf16", dim, &mut a) }
    }

    /// Makes `b` an f32 buffer of its length (statistics saved for a backward): a bf16 buffer is
    /// replaced by an f32 one; an f32 buffer is kept as it is.
    fn ensure_f32(&self, b: &mut CudaBuf) -> Result<()> {
        if b.dtype != DType::F32 {
            *b = self.alloc(b.len, DType::F32)?;
        }
        Ok(())
    }

    /// Grid-stride kernel grid as the AdamW/sum-of-squares kernels want it: ceil(n / 2048)
    /// blocks of 256, at most 8 per SM.
    fn stream_grid(&self, n: usize) -> (u32, u32, u32) {
        let blocks = n.div_ceil(8 * 256).clamp(1, 8 * self.gpu.sm_count.max(1) as usize);
        (blocks as u32, 1, 1)
    }

    /// Launches Σ x² of elements `range` of a bf16 buffer as one f64 partial per block at
    /// `partials`; returns the number of blocks (0 for an empty range: nothing is launched).
    /// `partials` must hold [`Self::sum_squares_blocks`] doubles.
    pub(crate) fn sum_squares_partials(&self, x: &CudaBuf, range: std::ops::Range<usize>, partials: u64) -> Result<usize> {
        ensure!(range.start <= range.end && range.end <= x.len, "sum_squares: range {range:?} of a buffer of {}", x.len);
        let xp = bf(x, "sum_squares input")? + 2 * range.start as u64;
        if range.is_empty() {
            return Ok(0);
        }
        let grid = self.stream_grid(range.len());
        let n = range.len() as i64;
        let mut a = args![xp, n, partials];
        // SAFETY: x holds n bf16 values; partials one f64 per block of the grid.
        unsafe { self.gpu.launch("adamw", "sum_squares_bf16", grid, (256, 1, 1), 0, &mut a)? };
        Ok(grid.0 as usize)
    }

    /// The most blocks [`Self::sum_squares_partials`] launches.
    pub(crate) fn sum_squares_blocks(&self) -> usize {
        self.stream_grid(usize::MAX / 2).0 as usize
    }

    /// The listed rows' KL and, with `ce` = (targets, scale, CE slot), their CE, in one launch;
    /// the per-row values are summed on the device into `kl_slot` (and the CE slot).
    #[allow(clippy::too_many_arguments)]
    fn kl_with_ce(
        &self,
        what: &str,
        student: &CudaBuf,
        teacher: &CudaBuf,
        shape: KlShape,
        rows: &[u32],
        ce: Option<(&[i32], f32, u64)>,
        scale: f32,
        dstudent: &mut CudaBuf,
        kl_slot: u64,
    ) -> Result<()> {
        let n_rows = check_kl_shape(what, student.len, teacher.len, dstudent.len, shape)?;
        check_kl_rows(what, rows, n_rows, shape.temperature)?;
        if let Some((targets, _, _)) = ce {
            check_ce_labels(what, rows, targets, shape.student_vocab)?;
        }
        let n = rows.len();
        if n == 0 {
            return Ok(());
        }
        int(n, "listed rows")?;
        // Rows, then the targets if any, in one upload (one index upload per op).
        let packed: Vec<i32> = rows.iter().map(|&r| r as i32).chain(ce.into_iter().flat_map(|c| c.0.iter().copied())).collect();
        let (_gi, rp) = self.upload_idx(&packed)?;
        let outputs = if ce.is_some() { 2 * n } else { n };
        let (_gw, klp) = self.work_f32(outputs)?;
        let ce_dev = ce.map(|(_, ce_scale, _)| (rp + 4 * n as u64, ce_scale, klp + 4 * n as u64));
        self.softmax_kl_launch(student, teacher, shape, rp, n, scale, 0, ce_dev, klp, true, dstudent)?;
        self.add_sum_f32(klp, n, kl_slot)?;
        if let Some((_, _, ce_slot)) = ce {
            // Rows without a label have row_ce 0.
            self.add_sum_f32(klp + 4 * n as u64, n, ce_slot)?;
        }
        Ok(())
    }

    /// The softmax-KL launch on rows already on the device (`rows_dev`, `n_rows` ints): writes
    /// `row_kl` (f32 [n_rows]) and the gradient into `dstudent`, added (`accumulate`) or written
    /// over every column of the listed rows; with `ce` = (targets, scale, row_ce) also the fused
    /// cross-entropy. The KL gradient scale is `scale`, or per row from `row_scale` (f32
    /// [n_rows] on the device) when it is not 0. Used by [`Backend::softmax_kl`],
    /// [`Backend::distill_rows_into`] and the benchmarks.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn softmax_kl_launch(
        &self,
        student: &CudaBuf,
        teacher: &CudaBuf,
        shape: KlShape,
        rows_dev: u64,
        n_rows: usize,
        scale: f32,
        row_scale: u64,
        ce: Option<(u64, f32, u64)>,
        row_kl: u64,
        accumulate: bool,
        dstudent: &mut CudaBuf,
    ) -> Result<()> {
        let s = bf(student, "softmax_kl student logits")?;
        let t = bf(teacher, "softmax_kl teacher logits")?;
        let d = bf(dstudent, "softmax_kl student gradient")?;
        let (nr, vs, vt, kept) = (int(n_rows, "rows")?, int(shape.student_vocab, "student vocabulary")?, int(shape.teacher_vocab, "teacher vocabulary")?, int(shape.kept, "kept columns")?);
        let tau = shape.temperature;
        let (ce_t, ce_scale, row_ce) = ce.unwrap_or((0, 0.0, 0));
        let acc = i32::from(accumulate);
        let grid = (n_rows as u32, 1, 1);
        if shape.divergence == Divergence::Fkl {
            // The forward KL's two-pass kernel (its KL comes from pass-1 statistics).
            let mut a = args![s, t, rows_dev, nr, vs, vt, kept, tau, scale, row_scale, ce_t, ce_scale, row_kl, row_ce, acc, d];
            // SAFETY: lengths were checked by the caller; rows_dev holds n_rows in-range, distinct rows.
            unsafe { self.gpu.launch("softmax_kl", "softmax_kl_bf16", grid, (512, 1, 1), 0, &mut a) }
        } else {
            let (code, lambda) = (shape.divergence.code(), shape.divergence.lambda() as f32);
            let mut a = args![s, t, rows_dev, nr, vs, vt, kept, tau, scale, row_scale, ce_t, ce_scale, code, lambda, row_kl, row_ce, acc, d];
            // SAFETY: as above; the extra arguments are scalars.
            unsafe { self.gpu.launch("softmax_kl", "softmax_div_bf16", grid, (512, 1, 1), 0, &mut a) }
        }
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type State = CudaBuf;
    type Sums = CudaSums;

    fn name(&self) -> String {
        format!("cuda {}", self.describe())
    }

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(len, DType::Bf16)
    }

    fn empty(&self, len: usize) -> Result<CudaBuf> {
        self.alloc(len, DType::Bf16)
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        let b = self.alloc(data.len(), DType::Bf16)?;
        self.gpu.htod_async(b.ptr(), bytemuck::cast_slice(&to_bf16_bits(data)))?;
        Ok(b)
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        match buf.dtype {
            DType::Bf16 => {
                let mut bits = vec![0u16; buf.len];
                self.gpu.dtoh(&mut bits, buf.ptr())?;
                Ok(bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect())
            }
            DType::F32 => self.download_f32_raw(buf.ptr(), buf.len),
        }
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn zeros_state(&self, len: usize) -> Result<CudaBuf> {
        self.zeros_of(len, DType::F32)
    }

    fn upload_state(&self, data: &[f32]) -> Result<CudaBuf> {
        let b = self.alloc(data.len(), DType::F32)?;
        self.gpu.htod(b.ptr(), data)?;
        Ok(b)
    }

    fn download_state(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        self.download(buf)
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        self.gpu.memset_u8(buf.ptr(), 0, buf.len * buf.dtype.size())
    }

    fn sums(&self, n: usize) -> Result<CudaSums> {
        let mem = self.gpu.alloc(8 * n)?;
        self.gpu.memset_u8(mem.ptr(), 0, 8 * n)?;
        Ok(CudaSums { mem, n })
    }

    fn read_sums(&self, sums: &CudaSums) -> Result<Vec<f64>> {
        let mut out = vec![0f64; sums.n];
        self.gpu.dtoh(&mut out, sums.mem.ptr())?;
        Ok(out)
    }

    fn duplicate(&self, buf: &CudaBuf) -> Result<CudaBuf> {
        let out = self.alloc(buf.len, buf.dtype)?;
        self.gpu.dtod(out.ptr(), buf.ptr(), buf.len * buf.dtype.size())?;
        Ok(out)
    }

    fn copy_range(&self, src: &CudaBuf, src_off: usize, dst: &mut CudaBuf, dst_off: usize, len: usize) -> Result<()> {
        ensure!(
            src_off + len <= src.len && dst_off + len <= dst.len,
            "cuda backend: copy of {len} elements out of range (src {src_off}/{}, dst {dst_off}/{})",
            src.len,
            dst.len
        );
        ensure!(src.dtype == dst.dtype, "cuda backend: copy between a {:?} and a {:?} buffer", src.dtype, dst.dtype);
        let sz = src.dtype.size();
        self.gpu.dtod(dst.ptr() + (dst_off * sz) as u64, src.ptr() + (src_off * sz) as u64, len * sz)
    }

    fn gemm(&self, g: Gemm, a: &CudaBuf, b: &CudaBuf, c: &mut CudaBuf) -> Result<()> {
        check_len("gemm A", a.len, g.m * g.k)?;
        check_len("gemm B", b.len, g.k * g.n)?;
        check_len("gemm C", c.len, g.m * g.n)?;
        let (ap, bp, cp) = (bf(a, "gemm A")?, bf(b, "gemm B")?, bf(c, "gemm C")?);
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if g.k == 0 {
            // C = beta·C (an empty product).
            return if g.beta == 0.0 { self.fill_zero(c) } else { self.scale(c, g.beta) };
        }
        let lda = if g.trans_a { g.m } else { g.k };
        let ldb = if g.trans_b { g.k } else { g.n };
        // SAFETY: lengths checked above.
        unsafe { self.gpu.gemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.alpha, ap, lda, bp, ldb, g.beta, cp, g.n, false) }
    }

    fn add_bias(&self, x: &mut CudaBuf, bias: &CudaBuf, rows: usize) -> Result<()> {
        check_len("add_bias input", x.len, rows * bias.len)?;
        if bias.len == 0 || rows == 0 {
            return Ok(());
        }
        let (xp, bp) = (bf(x, "add_bias input")?, bf(bias, "bias")?);
        let (r, d) = (rows as i64, int(bias.len, "bias length")?);
        let mut a = args![xp, bp, r, d];
        // SAFETY: x is rows × dim, bias dim.
        unsafe { self.launch_1d("elementwise", "add_bias_bf16", x.len, &mut a) }
    }

    fn bias_grad(&self, dy: &CudaBuf, dbias: &mut CudaBuf, rows: usize) -> Result<()> {
        check_len("bias_grad input", dy.len, rows * dbias.len)?;
        if dbias.len == 0 {
            return Ok(());
        }
        let (yp, dp) = (bf(dy, "bias_grad input")?, bf(dbias, "bias gradient")?);
        let d = int(dbias.len, "bias length")?;
        let (slices, per) = self.row_slices(rows, dbias.len);
        let (_gw, partials) = self.work_f32(slices * dbias.len)?;
        let (r, per) = (rows as i64, per as i64);
        let mut a = args![yp, partials, r, d, per];
        let grid = (dbias.len.div_ceil(32) as u32, slices as u32, 1);
        // SAFETY: dy is rows × dim; partials slices × dim f32.
        unsafe { self.gpu.launch("elementwise", "bias_grad_partials_bf16", grid, (32, 8, 1), 0, &mut a)? };
        self.add_column_partials(partials, slices, dp, dbias.len)
    }


    fn add_assign(&self, dst: &mut CudaBuf, src: &CudaBuf) -> Result<()> {
        check_len("add_assign source", src.len, dst.len)?;
        let (dp, sp, n) = (bf(dst, "add_assign destination")?, bf(src, "add_assign source")?, dst.len as i64);
        let mut a = args![dp, sp, n];
        // SAFETY: both hold n values.
        unsafe { self.launch_1d("elementwise", "add_assign_bf16", dst.len, &mut a) }
    }

    fn scale(&self, x: &mut CudaBuf, s: f32) -> Result<()> {
        let (xp, n) = (bf(x, "scale input")?, x.len as i64);
        let mut a = args![xp, s, n];
        // SAFETY: x holds n values.
        unsafe { self.launch_1d("elementwise", "scale_bf16", x.len, &mut a) }
    }

    fn sum_squares_into(&self, parts: &[(&CudaBuf, std::ops::Range<usize>)], sums: &mut CudaSums, slot: usize) -> Result<()> {
        let out = sums.slot("sum_squares", slot)?;
        // Every range's partials side by side, then one device-side sum of all of them, in
        // buffer and block order: the same bits every run.
        let (_g, partials) = self.work_f32(2 * self.sum_squares_blocks() * parts.len())?;
        let mut used = 0usize;
        for (x, r) in parts {
            used += self.sum_squares_partials(x, r.clone(), partials + 8 * used as u64)?;
        }
        self.add_sum_f64(partials, used, out)
    }

    fn embedding(&self, table: &CudaBuf, ids: &[u32], dim: usize, out: &mut CudaBuf) -> Result<()> {
        ensure!(dim > 0 && table.len % dim == 0, "embedding: table length {} is not a multiple of {dim}", table.len);
        check_len("embedding output", out.len, ids.len() * dim)?;
        let rows = table.len / dim;
        if let Some((t, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= rows) {
            bail!("token id {id} at position {t} is out of range for a vocabulary of {rows} rows");
        }
        if ids.is_empty() {
            return Ok(());
        }
        let (tp, op) = (bf(table, "embedding table")?, bf(out, "embedding output")?);
        let (_g, idp) = self.upload_idx(ids)?;
        let d = int(dim, "embedding dim")?;
        let mut a = args![tp, idp, d, op];
        let block = (dim.div_ceil(32) * 32).min(256) as u32;
        // SAFETY: ids are in range; out holds T × dim.
        unsafe { self.gpu.launch("elementwise", "embedding_fwd_bf16", (ids.len() as u32, 1, 1), (block, 1, 1), 0, &mut a) }
    }

    fn embedding_backward(&self, dout: &CudaBuf, ids: &[u32], dim: usize, dtable: &mut CudaBuf) -> Result<()> {
        check_len("embedding_backward gradient", dout.len, ids.len() * dim)?;
        let rows = dtable.len / dim.max(1);
        for (t, &id) in ids.iter().enumerate() {
            ensure!((id as usize) < rows, "token id {id} at position {t} is out of range for {rows} rows");
        }
        if ids.is_empty() || dim == 0 {
            return Ok(());
        }
        // Group positions by id on the host: [unique ids | offsets (n_u + 1) | positions].
        let mut order: Vec<i32> = (0..ids.len() as i32).collect();
        order.sort_by_key(|&p| (ids[p as usize], p));
        let mut uid = Vec::new();
        let mut offsets = Vec::new();
        for (k, &p) in order.iter().enumerate() {
            let id = ids[p as usize] as i32;
            if uid.last() != Some(&id) {
                uid.push(id);
                offsets.push(k as i32);
            }
        }
        offsets.push(order.len() as i32);
        let n_u = uid.len();
        let mut packed = uid;
        packed.extend_from_slice(&offsets);
        packed.extend_from_slice(&order);
        let (dp, tp) = (bf(dout, "embedding_backward gradient")?, bf(dtable, "embedding table gradient")?);
        let (_g, base) = self.upload_idx(&packed)?;
        let (up, offp, ordp) = (base, base + 4 * n_u as u64, base + 4 * (2 * n_u as u64 + 1));
        let d = int(dim, "embedding dim")?;
        let mut a = args![dp, up, offp, ordp, d, tp];
        let block = (dim.div_ceil(32) * 32).min(256) as u32;
        // SAFETY: the groups index positions < T and ids < rows.
        unsafe { self.gpu.launch("elementwise", "embedding_bwd_bf16", (n_u as u32, 1, 1), (block, 1, 1), 0, &mut a) }
    }

    fn rmsnorm(&self, x: &CudaBuf, w: &CudaBuf, eps: f32, out: &mut CudaBuf, rstd: &mut CudaBuf) -> Result<()> {
        let dim = w.len;
        ensure!(dim > 0 && x.len % dim == 0, "rmsnorm: {} elements are not rows of {dim}", x.len);
        let rows = x.len / dim;
        check_len("rmsnorm output", out.len, x.len)?;
        check_len("rmsnorm rstd", rstd.len, rows)?;
        self.ensure_f32(rstd)?;
        let (xp, wp, op, rp) = (bf(x, "rmsnorm input")?, bf(w, "rmsnorm weight")?, bf(out, "rmsnorm output")?, rstd.ptr());
        let d = int(dim, "rmsnorm dim")?;
        let mut a = args![xp, wp, op, rp, d, eps];
        // SAFETY: x, out rows × dim; rstd rows f32.
        unsafe { self.gpu.launch("norm", "rmsnorm_fwd_bf16", (int(rows, "rows")? as u32, 1, 1), (256, 1, 1), 0, &mut a) }
    }

    fn rmsnorm_backward(
        &self,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        dx: &mut CudaBuf,
        dw: &mut CudaBuf,
    ) -> Result<()> {
        let dim = w.len;
        let rows = rstd.len;
        check_len("rmsnorm_backward input", x.len, rows * dim)?;
        check_len("rmsnorm_backward gradient", dout.len, rows * dim)?;
        check_len("rmsnorm_backward dx", dx.len, rows * dim)?;
        check_len("rmsnorm_backward dw", dw.len, dim)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        let rp = f32p(rstd, "rmsnorm_backward rstd (written by the CUDA rmsnorm)")?;
        let (gp, xp, wp) = (bf(dout, "rmsnorm_backward gradient")?, bf(x, "rmsnorm_backward input")?, bf(w, "rmsnorm weight")?);
        let (dxp, dwp) = (bf(dx, "rmsnorm_backward dx")?, bf(dw, "rmsnorm_backward dw")?);
        let (d, r) = (int(dim, "rmsnorm dim")?, int(rows, "rows")?);
        let mut a = args![gp, xp, wp, rp, dxp, d];
        // SAFETY: all rows × dim (dw dim, rstd rows f32).
        unsafe { self.gpu.launch("norm", "rmsnorm_bwd_dx_bf16", (r as u32, 1, 1), (256, 1, 1), 0, &mut a)? };
        let (slices, per) = self.row_slices(rows, dim);
        let (_gw, partials) = self.work_f32(slices * dim)?;
        let per = int(per, "rows per slice")?;
        let mut a = args![gp, xp, rp, partials, r, d, per];
        // SAFETY: as above; partials slices × dim f32.
        unsafe { self.gpu.launch("norm", "rmsnorm_bwd_dw_partials_bf16", (dim.div_ceil(32) as u32, slices as u32, 1), (32, 8, 1), 0, &mut a)? };
        self.add_column_partials(partials, slices, dwp, dim)
    }

    fn layernorm(&self, x: &CudaBuf, w: &CudaBuf, b: &CudaBuf, eps: f32, out: &mut CudaBuf) -> Result<()> {
        let dim = w.len;
        ensure!(dim > 0 && x.len % dim == 0, "layernorm: {} elements are not rows of {dim}", x.len);
        check_len("layernorm bias", b.len, dim)?;
        check_len("layernorm output", out.len, x.len)?;
        let rows = x.len / dim;
        let (xp, wp, bp, op) = (bf(x, "layernorm input")?, bf(w, "layernorm weight")?, bf(b, "layernorm bias")?, bf(out, "layernorm output")?);
        let d = int(dim, "layernorm dim")?;
        let mut a = args![xp, wp, bp, op, d, eps];
        // SAFETY: x, out rows × dim.
        unsafe { self.gpu.launch("norm", "layernorm_fwd_bf16", (int(rows, "rows")? as u32, 1, 1), (256, 1, 1), 0, &mut a) }
    }

    fn qkv_split_rope(
        &self,
        qkv: &CudaBuf,
        bias: Option<&CudaBuf>,
        positions: &[u32],
        head_dim: usize,
        theta: f64,
        q: &mut CudaBuf,
        k: &mut CudaBuf,
        v: &mut CudaBuf,
    ) -> Result<()> {
        let what = "qkv_split_rope";
        let dims = check_qkv_dims(what, ["qkv", "q", "k", "v"], positions.len(), head_dim, qkv.len, q.len, k.len, v.len)?;
        let bp = match bias {
            Some(b) => {
                check_len("qkv_split_rope bias", b.len, dims.row())?;
                bf(b, "qkv_split_rope bias")?
            }
            None => 0u64,
        };
        let (src, qp, kp, vp) = (bf(qkv, "qkv_split_rope qkv")?, bf(q, "qkv_split_rope q")?, bf(k, "qkv_split_rope k")?, bf(v, "qkv_split_rope v")?);
        let (_g, pp) = self.upload_idx(positions)?;
        let (ti, qh, kh, di) = (int(dims.t, "tokens")?, int(dims.q_dim / head_dim, "q heads")?, int(dims.kv_dim / head_dim, "kv heads")?, int(head_dim, "head_dim")?);
        int(dims.row(), "qkv row length")?;
        let mut a = args![src, bp, pp, ti, qh, kh, di, theta, qp, kp, vp];
        // SAFETY: qkv is T × (q_dim + 2·kv_dim), bias (if not null) q_dim + 2·kv_dim, q T × q_dim,
        // k and v T × kv_dim; positions T.
        unsafe { self.launch_1d("elementwise", "qkv_split_rope_bf16", dims.t * (dims.q_dim + dims.kv_dim) / 2, &mut a) }
    }

    fn qkv_merge_rope_backward(&self, dq: &CudaBuf, dk: &CudaBuf, dv: &CudaBuf, positions: &[u32], head_dim: usize, theta: f64, dqkv: &mut CudaBuf) -> Result<()> {
        let what = "qkv_merge_rope_backward";
        let dims = check_qkv_dims(what, ["dqkv", "dq", "dk", "dv"], positions.len(), head_dim, dqkv.len, dq.len, dk.len, dv.len)?;
        let (dqp, dkp, dvp) = (bf(dq, "qkv_merge_rope_backward dq")?, bf(dk, "qkv_merge_rope_backward dk")?, bf(dv, "qkv_merge_rope_backward dv")?);
        let dst = bf(dqkv, "qkv_merge_rope_backward dqkv")?;
        let (_g, pp) = self.upload_idx(positions)?;
        let (ti, qh, kh, di) = (int(dims.t, "tokens")?, int(dims.q_dim / head_dim, "q heads")?, int(dims.kv_dim / head_dim, "kv heads")?, int(head_dim, "head_dim")?);
        int(dims.row(), "dqkv row length")?;
        let mut a = args![dqp, dkp, dvp, pp, ti, qh, kh, di, theta, dst];
        // SAFETY: dqkv is T × (q_dim + 2·kv_dim), dq T × q_dim, dk and dv T × kv_dim; positions T.
        unsafe { self.launch_1d("elementwise", "qkv_merge_rope_bwd_bf16", dims.t * (dims.q_dim + dims.kv_dim) / 2, &mut a) }
    }

    fn attention(
        &self,
        shape: AttnShape,
        seq_lens: &[usize],
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
    ) -> Result<()> {
        super::attn::forward(self, shape, seq_lens, q, k, v, out, lse)
    }

    fn attention_backward(
        &self,
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
        super::attn::backward(self, shape, seq_lens, q, k, v, out, lse, dout, dq, dk, dv)
    }

    fn attention_decode(
        &self,
        shape: AttnShape,
        capacity: usize,
        slots: &[u32],
        lens: &[usize],
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<()> {
        super::decode::decode(self, shape, capacity, slots, lens, q, k_cache, v_cache, out, None)
    }

    fn swiglu(&self, gate_up: &CudaBuf, inter: usize, out: &mut CudaBuf) -> Result<()> {
        let rows = check_swiglu("swiglu", "gate_up", gate_up.len, "out", out.len, inter)?;
        let (gp, op) = (bf(gate_up, "swiglu gate_up")?, bf(out, "swiglu out")?);
        let (r, ii) = (rows as i64, int(inter, "swiglu inter")?);
        let mut a = args![gp, r, ii, op];
        // SAFETY: gate_up holds rows × 2·inter values, out rows × inter.
        unsafe { self.launch_1d("elementwise", "swiglu_fwd_bf16", out.len, &mut a) }
    }

    fn swiglu_backward(&self, gate_up: &CudaBuf, inter: usize, dout: &CudaBuf, dgate_up: &mut CudaBuf) -> Result<()> {
        let rows = check_swiglu("swiglu_backward", "gate_up", gate_up.len, "dout", dout.len, inter)?;
        check_len("swiglu_backward dgate_up", dgate_up.len, gate_up.len)?;
        let (gp, dp, dgp) = (bf(gate_up, "swiglu gate_up")?, bf(dout, "swiglu dout")?, bf(dgate_up, "swiglu dgate_up")?);
        let (r, ii) = (rows as i64, int(inter, "swiglu inter")?);
        let mut a = args![gp, dp, r, ii, dgp];
        // SAFETY: gate_up and dgate_up hold rows × 2·inter values, dout rows × inter.
        unsafe { self.launch_1d("elementwise", "swiglu_bwd_bf16", dout.len, &mut a) }
    }

    fn gelu(&self, x: &CudaBuf, out: &mut CudaBuf, kind: GeluKind) -> Result<()> {
        check_len("gelu output", out.len, x.len)?;
        let (xp, op, n) = (bf(x, "gelu input")?, bf(out, "gelu output")?, x.len as i64);
        let k: i32 = if kind == GeluKind::Erf { 0 } else { 1 };
        let mut a = args![xp, op, n, k];
        // SAFETY: both hold n values.
        unsafe { self.launch_1d("elementwise", "gelu_fwd_bf16", x.len, &mut a) }
    }

    fn gelu_backward(&self, x: &CudaBuf, dout: &CudaBuf, dx: &mut CudaBuf, kind: GeluKind) -> Result<()> {
        check_len("gelu_backward gradient", dout.len, x.len)?;
        check_len("gelu_backward dx", dx.len, x.len)?;
        let (xp, gp, dp, n) = (bf(x, "gelu input")?, bf(dout, "gelu gradient")?, bf(dx, "gelu dx")?, x.len as i64);
        let k: i32 = if kind == GeluKind::Erf { 0 } else { 1 };
        let mut a = args![xp, gp, dp, n, k];
        // SAFETY: all hold n values.
        unsafe { self.launch_1d("elementwise", "gelu_bwd_bf16", x.len, &mut a) }
    }

    fn cross_entropy_into(&self, logits: &CudaBuf, targets: &[i32], vocab: usize, scale: f32, dlogits: &mut CudaBuf, sums: &mut CudaSums, slot: usize) -> Result<()> {
        let out = sums.slot("cross_entropy", slot)?;
        ensure!(vocab > 0, "cross_entropy: empty vocabulary");
        let rows = targets.len();
        check_len("cross_entropy logits", logits.len, rows * vocab)?;
        check_len("cross_entropy dlogits", dlogits.len, rows * vocab)?;
        if let Some((r, &t)) = targets.iter().enumerate().find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab)) {
            bail!("cross_entropy: target {t} at row {r} is outside the vocabulary of {vocab}");
        }
        if rows == 0 {
            return Ok(());
        }
        let (lp, dp) = (bf(logits, "cross_entropy logits")?, bf(dlogits, "cross_entropy dlogits")?);
        let (_gi, tp) = self.upload_idx(targets)?;
        let (_gw, lossp) = self.work_f32(rows)?;
        let v = int(vocab, "vocabulary")?;
        let mut a = args![lp, tp, v, scale, lossp, dp];
        // SAFETY: logits, dlogits rows × vocab; targets in range or IGNORE_INDEX (negative).
        unsafe { self.gpu.launch("cross_entropy", "cross_entropy_bf16", (int(rows, "rows")? as u32, 1, 1), (512, 1, 1), 0, &mut a)? };
        self.add_sum_f32(lossp, rows, out)
    }

    fn softmax_kl_into(&self, student: &CudaBuf, teacher: &CudaBuf, shape: KlShape, rows: &[u32], scale: f32, dstudent: &mut CudaBuf, sums: &mut CudaSums, slot: usize) -> Result<()> {
        let out = sums.slot("softmax_kl", slot)?;
        self.kl_with_ce("softmax_kl", student, teacher, shape, rows, None, scale, dstudent, out)
    }

    fn softmax_kl_ce_into(
        &self,
        student: &CudaBuf,
        teacher: &CudaBuf,
        shape: KlShape,
        rows: &[u32],
        targets: &[i32],
        scale: f32,
        ce_scale: f32,
        dstudent: &mut CudaBuf,
        sums: &mut CudaSums,
        kl_slot: usize,
        ce_slot: usize,
    ) -> Result<()> {
        let (kl_out, ce_out) = (sums.slot("softmax_kl_ce (KL)", kl_slot)?, sums.slot("softmax_kl_ce (CE)", ce_slot)?);
        self.kl_with_ce("softmax_kl_ce", student, teacher, shape, rows, Some((targets, ce_scale, ce_out)), scale, dstudent, kl_out)
    }

    fn distill_rows_into(&self, student: &CudaBuf, teacher: &CudaBuf, shape: KlShape, terms: &RowTerms<'_>, dstudent: &mut CudaBuf, sums: &mut CudaSums) -> Result<()> {
        const WHAT: &str = "distill_rows";
        let n = check_kl_shape(WHAT, student.len, teacher.len, dstudent.len, shape)?;
        check_row_terms(WHAT, student.len, shape.student_vocab, terms)?;
        ensure!(shape.temperature.is_finite() && shape.temperature > 0.0, "{WHAT}: temperature must be positive and finite, got {}", shape.temperature);
        let mut outs = [0u64; 4];
        for (k, &slot) in terms.kl_slots.iter().enumerate() {
            outs[k] = sums.slot(WHAT, slot)?;
        }
        outs[3] = sums.slot(WHAT, terms.ce_slot)?;
        if n == 0 {
            return Ok(());
        }
        int(n, "rows")?;
        // Per row: its index (every row is listed), CE target, KL weight (the sum of its terms'
        // scales, bits of an f32) and term mask, in one upload.
        let weight = |b: u8| terms.kl_scales.iter().enumerate().filter(|(k, _)| b >> k & 1 == 1).map(|(_, &s)| s).sum::<f32>();
        let packed: Vec<i32> = (0..n as i32)
            .chain(terms.targets.iter().copied())
            .chain(terms.kl_terms.iter().map(|&b| weight(b).to_bits() as i32))
            .chain(terms.kl_terms.iter().map(|&b| b as i32))
            .collect();
        let (_gi, base) = self.upload_idx(&packed)?;
        let at = |k: u64| base + 4 * k * n as u64;
        let (_gw, klp) = self.work_f32(2 * n)?;
        let cep = klp + 4 * n as u64;
        self.softmax_kl_launch(student, teacher, shape, at(0), n, 0.0, at(2), Some((at(1), terms.ce_scale, cep)), klp, false, dstudent)?;
        let (bits, nn) = (at(3), n as i64);
        let [o0, o1, o2, oce] = outs;
        let mut a = args![klp, cep, bits, nn, o0, o1, o2, oce];
        // SAFETY: row_kl, row_ce and bits hold n values; every non-null out is a slot of `sums`.
        unsafe { self.gpu.launch("sums", "sum_terms_into_f64", (4, 1, 1), (256, 1, 1), 0, &mut a) }
    }

    fn relation_loss_into(&self, student: &CudaBuf, teacher: &CudaBuf, shape: KlShape, images: &[(u32, u32)], scale: f32, dstudent: &mut CudaBuf, sums: &mut CudaSums, slot: usize) -> Result<()> {
        const WHAT: &str = "relation_loss";
        let out = sums.slot(WHAT, slot)?;
        let n_rows = check_kl_shape(WHAT, student.len, teacher.len, dstudent.len, shape)?;
        check_relation_images(WHAT, images, n_rows)?;
        super::relation::relation_loss(self, student, teacher, shape, images, scale, dstudent, out)
    }

    fn gram_cosine_into(&self, rs: &CudaBuf, rt: &CudaBuf, scale: f32, grad: &mut CudaBuf, sums: &mut CudaSums, slot: usize) -> Result<()> {
        let out = sums.slot("gram_cosine", slot)?;
        check_len("gram_cosine teacher Gram", rt.len, rs.len)?;
        check_len("gram_cosine gradient", grad.len, rs.len)?;
        super::relation::gram_cosine(self, rs, rt, scale, grad, out)
    }

    fn adamw(&self, h: AdamWStep, param: &mut CudaBuf, grad: &CudaBuf, offset: usize, m: &mut CudaBuf, v: &mut CudaBuf, master: Option<&mut CudaBuf>) -> Result<()> {
        let n = m.len;
        check_len("adamw gradient", grad.len, param.len)?;
        check_len("adamw second moment", v.len, n)?;
        ensure!(offset + n <= param.len, "adamw: elements {offset}..{} of {} parameters", offset + n, param.len);
        ensure!(h.step >= 1, "adamw: step counts from 1");
        // The piece starts `offset` bf16 elements in (the kernel counts noise indices from it).
        let pp = bf(param, "adamw parameters")? + 2 * offset as u64;
        let gp = bf(grad, "adamw gradient")? + 2 * offset as u64;
        let mp = f32p(m, "adamw first moment")?;
        let vp = f32p(v, "adamw second moment")?;
        let masterp = match master {
            Some(ms) => {
                check_len("adamw master weights", ms.len, n)?;
                f32p(ms, "adamw master weights")?
            }
            None => 0u64,
        };
        if n == 0 {
            return Ok(());
        }
        let nn = n as i64;
        let bc1 = (1.0 - (h.beta1 as f64).powi(h.step as i32)) as f32;
        let bc2_sqrt = (1.0 - (h.beta2 as f64).powi(h.step as i32)).sqrt() as f32;
        let (lr, b1, b2, eps, wd, gs, seed, step) = (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.grad_scale, h.seed, h.step);
        let mut a = args![pp, gp, mp, vp, masterp, nn, lr, b1, b2, eps, wd, bc1, bc2_sqrt, gs, seed, step];
        // SAFETY: every buffer holds n elements of the kernel's type; master may be null.
        unsafe { self.gpu.launch("adamw", "adamw_bf16", self.stream_grid(n), (256, 1, 1), 0, &mut a) }
    }
}
