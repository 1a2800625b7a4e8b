//! `kd-engine bench-kernels`: the two hardware ceilings measured on the spot (device-to-device
//! copy bandwidth, cuBLAS bf16 GEMM rate), then each named kernel at the SPEC §5 shapes, timed with
//! CUDA events after a warm-up, the median of the repeats reported with what it achieves (TB/s
//! or TFLOP/s) and the fraction of the measured ceiling (METHOD.md). Inputs are random (never
//! zero), created on the device from a counter hash, so nothing large crosses PCIe.

use anyhow::{ensure, Result};
use serde::Serialize;

use super::{CudaBackend, CudaBuf, DType};
use crate::backend::{AdamWStep, AttnShape, Backend, Divergence, Gemm, KlShape};

/// What one timed kernel achieved.
#[derive(Clone, Debug, Serialize)]
pub struct KernelResult {
    /// Stable key shared with benches/compare_torch.py.
    pub key: String,
    pub shape: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub reps: usize,
    /// "TB/s" or "TFLOP/s".
    pub unit: String,
    /// Achieved rate in `unit` (bytes or FLOPs counted as `counted` says, over the median).
    pub rate: f64,
    /// The measured ceiling in `unit`.
    pub ceiling: f64,
    /// rate / ceiling.
    pub fraction: f64,
    /// What the bytes or FLOPs count.
    pub counted: String,
    /// SPEC §5 target time, where the SPEC gives one in ms.
    pub target_ms: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub copy_tb_s: f64,
    pub gemm_tflop_s: f64,
    pub kernels: Vec<KernelResult>,
    /// kd-engine's own peak device allocation during the run.
    pub peak_bytes: usize,
}

/// Options (repeats per measurement, after `warmup` untimed runs).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub warmup: usize,
    pub reps: usize,
    /// Only the ceilings and the smaller shapes (a quick look, not the SPEC shapes).
    pub quick: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { warmup: 3, reps: 20, quick: false }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Times `f` with events around each run: (median ms, min ms).
fn time(be: &CudaBackend, o: Options, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let gpu = be.gpu();
    for _ in 0..o.warmup {
        f()?;
    }
    be.synchronize()?;
    let (start, end) = (gpu.event()?, gpu.event()?);
    let mut ms = Vec::with_capacity(o.reps);
    for _ in 0..o.reps.max(1) {
        gpu.record(&start)?;
        f()?;
        gpu.record(&end)?;
        ms.push(gpu.elapsed_ms(&start, &end)? as f64);
    }
    be.synchronize()?;
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((median(ms), min))
}

fn random(be: &CudaBackend, len: usize, dtype: DType, seed: u64, lo: f32, hi: f32) -> Result<CudaBuf> {
    let mut b = be.alloc(len, dtype)?;
    be.fill_uniform(&mut b, seed, lo, hi)?;
    Ok(b)
}

#[allow(clippy::too_many_arguments)]
fn result(key: &str, shape: String, (med, min): (f64, f64), reps: usize, unit: &str, amount: f64, ceiling: f64, counted: &str, target_ms: Option<f64>) -> KernelResult {
    // Bytes or FLOPs per second, in units of 10^12 (TB/s or TFLOP/s).
    let rate = amount / (med * 1e-3) / 1e12;
    KernelResult {
        key: key.into(),
        shape,
        median_ms: med,
        min_ms: min,
        reps,
        unit: unit.into(),
        rate,
        ceiling,
        fraction: rate / ceiling,
        counted: counted.into(),
        target_ms,
    }
}

/// Device copy bandwidth in TB/s (bytes read + bytes written).
fn copy_ceiling(be: &CudaBackend, o: Options) -> Result<f64> {
    let n = if o.quick { 1 << 28 } else { 1 << 30 }; // bf16 elements: 2 GiB per buffer
    let src = random(be, n, DType::Bf16, 1, -1.0, 1.0)?;
    let mut dst = random(be, n, DType::Bf16, 2, -1.0, 1.0)?;
    let (med, _) = time(be, o, || be.copy_range(&src, 0, &mut dst, 0, n))?;
    Ok(2.0 * (2 * n) as f64 / (med * 1e-3) / 1e12)
}

/// cuBLAS bf16 GEMM rate in TFLOP/s on an 8192³ product of random matrices.
fn gemm_ceiling(be: &CudaBackend, o: Options) -> Result<f64> {
    let s = if o.quick { 4096 } else { 8192 };
    let a = random(be, s * s, DType::Bf16, 3, -1.0, 1.0)?;
    let b = random(be, s * s, DType::Bf16, 4, -1.0, 1.0)?;
    let mut c = random(be, s * s, DType::Bf16, 5, -1.0, 1.0)?;
    let g = Gemm { m: s, n: s, k: s, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    let (med, _) = time(be, o, || be.gemm(g, &a, &b, &mut c))?;
    Ok(2.0 * (s as f64).powi(3) / (med * 1e-3) / 1e12)
}

/// Runs every benchmark.
pub fn run(be: &CudaBackend, o: Options, mut log: impl FnMut(&str)) -> Result<Report> {
    ensure!(o.reps >= 1, "bench-kernels: at least one repeat");
    be.reset_peak();
    log("measuring the ceilings (device copy, cuBLAS bf16 GEMM)");
    let copy = copy_ceiling(be, o)?;
    let gemm = gemm_ceiling(be, o)?;
    log(&format!("  copy {copy:.2} TB/s, bf16 GEMM {gemm:.0} TFLOP/s"));
    let mut out = Vec::new();

    // ---- fused softmax-KL: 4096 rows × V 151936, loss + gradient ----
    {
        let (rows, v) = if o.quick { (512, 151_936) } else { (4096, 151_936) };
        log(&format!("softmax-KL {rows} x {v}"));
        let s = random(be, rows * v, DType::Bf16, 10, -8.0, 8.0)?;
        let t = random(be, rows * v, DType::Bf16, 11, -8.0, 8.0)?;
        let mut d = random(be, rows * v, DType::Bf16, 12, -1e-3, 1e-3)?;
        let shape = KlShape { student_vocab: v, teacher_vocab: v, kept: v, temperature: 1.0, divergence: Divergence::Fkl };
        let idx: Vec<i32> = (0..rows as i32).collect();
        let rows_dev = be.alloc(rows, DType::F32)?; // `rows` 4-byte slots for the int row list
        be.gpu().htod(rows_dev.ptr(), &idx)?;
        let row_kl = be.zeros_state(rows)?;
        let scale = 1.0 / rows as f32;
        let t_ = time(be, o, || be.softmax_kl_launch(&s, &t, shape, rows_dev.ptr(), rows, scale, 0, None, row_kl.ptr(), false, &mut d))?;
        let bytes = 3.0 * (rows * v * 2) as f64;
        out.push(result("softmax_kl", format!("{rows} rows x V {v}, bf16, tau 1"), t_, o.reps, "TB/s", bytes, copy, "two bf16 inputs read once + the bf16 gradient written once (SPEC floor; the fused head's write mode)", Some(1.6)));
    }

    // ---- relation loss: 4 images × 728 rows × V 151936 ----
    {
        let (imgs, n, v) = if o.quick { (2, 728, 32_768) } else { (4, 728, 151_936) };
        log(&format!("relation loss {imgs} x {n} x {v}"));
        let s = random(be, imgs * n * v, DType::Bf16, 20, -8.0, 8.0)?;
        let t = random(be, imgs * n * v, DType::Bf16, 21, -8.0, 8.0)?;
        let mut d = random(be, imgs * n * v, DType::Bf16, 22, -1e-3, 1e-3)?;
        let shape = KlShape { student_vocab: v, teacher_vocab: v, kept: v, temperature: 1.0, divergence: Divergence::Fkl };
        let images: Vec<(u32, u32)> = (0..imgs).map(|i| ((i * n) as u32, n as u32)).collect();
        let t_ = time(be, o, || be.relation_loss(&s, &t, shape, &images, 0.25, &mut d).map(|_| ()))?;
        let flops = 3.0 * 2.0 * (n * n) as f64 * v as f64 * imgs as f64;
        out.push(result("relation", format!("{imgs} images x {n} x V {v}, bf16"), t_, o.reps, "TFLOP/s", flops, gemm, "3 full GEMMs per image (R_s, R_t, dZ_s), 2·n²·V each (includes one host sync for the loss values)", Some(3.5)));
    }

    // ---- fused attention forward + backward ----
    for &(b, h, sl, dh) in &[(8usize, 16usize, 2048usize, 64usize), (4, 20, 2048, 128)] {
        let sl = if o.quick { sl / 4 } else { sl };
        let key = format!("attn_b{b}h{h}s{sl}d{dh}");
        log(&format!("attention B{b} H{h} S{sl} D{dh} causal, fwd + bwd"));
        let t = b * sl;
        let shape = AttnShape { n_heads: h, n_kv_heads: h, head_dim: dh, causal: true };
        let lens = vec![sl; b];
        let q = random(be, t * h * dh, DType::Bf16, 30, -1.0, 1.0)?;
        let k = random(be, t * h * dh, DType::Bf16, 31, -1.0, 1.0)?;
        let vv = random(be, t * h * dh, DType::Bf16, 32, -1.0, 1.0)?;
        let dout = random(be, t * h * dh, DType::Bf16, 33, -1.0, 1.0)?;
        let mut outb = random(be, t * h * dh, DType::Bf16, 34, -1.0, 1.0)?;
        let mut lse = be.zeros_state(t * h)?;
        let (mut dq, mut dk, mut dv) = (be.zeros(t * h * dh)?, be.zeros(t * h * dh)?, be.zeros(t * h * dh)?);
        // Causal: half of the 4·B·H·S²·D forward FLOPs; backward 2.5× the forward (the SPEC's and
        // PyTorch's convention for its SDPA figures).
        let fwd_flops = 4.0 * (b * h) as f64 * (sl * sl) as f64 * dh as f64 / 2.0;
        let tf = time(be, o, || be.attention(shape, &lens, &q, &k, &vv, &mut outb, &mut lse))?;
        out.push(result(&format!("{key}_fwd"), format!("B{b} H{h} S{sl} D{dh} causal, forward"), tf, o.reps, "TFLOP/s", fwd_flops, gemm, "causal forward: 2·B·H·S²·D", None));
        let tb = time(be, o, || be.attention_backward(shape, &lens, &q, &k, &vv, &outb, &lse, &dout, &mut dq, &mut dk, &mut dv))?;
        out.push(result(&format!("{key}_bwd"), format!("B{b} H{h} S{sl} D{dh} causal, backward"), tb, o.reps, "TFLOP/s", 2.5 * fwd_flops, gemm, "causal backward: 2.5 × forward", None));
        let tfb = time(be, o, || {
            be.attention(shape, &lens, &q, &k, &vv, &mut outb, &mut lse)?;
            be.attention_backward(shape, &lens, &q, &k, &vv, &outb, &lse, &dout, &mut dq, &mut dk, &mut dv)
        })?;
        out.push(result(&key, format!("B{b} H{h} S{sl} D{dh} causal, forward + backward"), tfb, o.reps, "TFLOP/s", 3.5 * fwd_flops, gemm, "causal forward + backward: 3.5 × 2·B·H·S²·D", None));
    }

    // ---- decode attention: one query per row against a 4096-position KV cache ----
    for &(r, h, hkv) in &[(1usize, 16usize, 16usize), (8, 16, 16), (8, 16, 2)] {
        let (dh, len) = (128usize, 4096usize);
        let key = format!("decode_r{r}h{h}kv{hkv}d{dh}s{len}");
        log(&format!("decode attention R{r} H{h} Hkv{hkv} D{dh}, {len} cached positions"));
        let shape = AttnShape { n_heads: h, n_kv_heads: hkv, head_dim: dh, causal: false };
        let q = random(be, r * h * dh, DType::Bf16, 50, -1.0, 1.0)?;
        let kc = random(be, r * len * hkv * dh, DType::Bf16, 51, -1.0, 1.0)?;
        let vc = random(be, r * len * hkv * dh, DType::Bf16, 52, -1.0, 1.0)?;
        let mut outb = be.zeros(r * h * dh)?;
        let slots: Vec<u32> = (0..r as u32).collect();
        let lens = vec![len; r];
        let t = time(be, o, || be.attention_decode(shape, len, &slots, &lens, &q, &kc, &vc, &mut outb))?;
        let bytes = 2.0 * (r * len * hkv * dh * 2) as f64;
        out.push(result(&key, format!("{r} rows x H{h}/Hkv{hkv} D{dh}, {len} cached positions each"), t, o.reps, "TB/s", bytes, copy, "K and V caches read once (bf16); includes the per-call upload of the rows' slots and lengths", None));
    }

    // ---- AdamW, bf16 parameters, fp32 moments; and the gradient's sum of squares ----
    {
        let n = if o.quick { 50_000_000 } else { 494_000_000 };
        log(&format!("AdamW {n} params, fp32 moments, stochastic rounding"));
        let mut p = random(be, n, DType::Bf16, 40, -0.1, 0.1)?;
        let g = random(be, n, DType::Bf16, 41, -1e-2, 1e-2)?;
        let mut m = random(be, n, DType::F32, 42, -1e-3, 1e-3)?;
        let mut v = random(be, n, DType::F32, 43, 1e-8, 1e-4)?;
        let mut step = 10u64;
        let ta = time(be, o, || {
            step += 1;
            let h = AdamWStep { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step, grad_scale: 1.0, seed: 7 };
            be.adamw(h, &mut p, &g, 0, &mut m, &mut v, None)
        })?;
        let bytes = 22.0 * n as f64;
        out.push(result("adamw_494m", format!("{n} params, bf16 params, fp32 moments, no master"), ta, o.reps, "TB/s", bytes, copy, "22 B/param: param r+w 4, grad 2, m r+w 8, v r+w 8", None));
        let (_gw, sq) = be.work_f32(2 * be.sum_squares_blocks())?;
        let ts = time(be, o, || be.sum_squares_partials(&g, 0..n, sq).map(drop))?;
        drop(_gw);
        out.push(result("sum_squares_494m", format!("{n} bf16 gradients"), ts, o.reps, "TB/s", 2.0 * n as f64, copy, "2 B/param read", None));
    }
    be.synchronize()?;
    Ok(Report { device: be.describe(), copy_tb_s: copy, gemm_tflop_s: gemm, kernels: out, peak_bytes: be.mem_stats().1 })
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    let mut s = format!("device: {}\nceilings: copy {:.2} TB/s (read + write), cuBLAS bf16 GEMM {:.0} TFLOP/s\n", r.device, r.copy_tb_s, r.gemm_tflop_s);
    s.push_str(&format!("{:<24} {:>10} {:>10} {:>9} {:>8} {:>8}  {}\n", "kernel", "median ms", "min ms", "rate", "unit", "ceiling", "target / shape"));
    for k in &r.kernels {
        let target = k.target_ms.map(|t| format!("target <= {t} ms; ")).unwrap_or_default();
        s.push_str(&format!(
            "{:<24} {:>10.3} {:>10.3} {:>9.2} {:>8} {:>7.0}%  {}{}\n",
            k.key,
            k.median_ms,
            k.min_ms,
            k.rate,
            k.unit,
            100.0 * k.fraction,
            target,
            k.shape
        ));
    }
    s.push_str(&format!("peak device memory held by kd-engine: {}\n", super::fmt_bytes(r.peak_bytes)));
    s
}
