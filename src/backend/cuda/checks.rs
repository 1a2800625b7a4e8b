//! Every CUDA op against the CPU backend (f32) on fresh random inputs: the checks behind
//! `kd-engine selftest` and `tests/cuda_ops.rs` (one test per family).
//!
//! Method (SPEC §7, METHOD.md): inputs are drawn afresh from the seed, rounded to bf16 on the host
//! and given to both backends, so the comparison measures the computation alone; sizes include
//! rows of length 1 and sizes that are multiples of no tile; outputs that an op overwrites are
//! poisoned with NaN before the launch (an unwritten element stays NaN and fails); outputs that an
//! op accumulates into are pre-filled with random values of the size of the expected increment
//! (so both the accumulation and the increment show in the error). Error: ‖out − ref‖ / ‖ref‖,
//! ≤ 1e-2 for bf16 outputs, ≤ 1e-4 for f32 outputs (saved statistics, optimizer state, losses),
//! ≤ 1e-3 for the relation loss value (1 − cos of two Gram matrices summed in different orders by
//! cuBLAS and the CPU: the cosine's rounding error is divided by 1 − cos); any NaN or infinity
//! where the reference is finite fails.

use anyhow::{anyhow, ensure, Result};
use serde::Serialize;

use super::{CudaBackend, CudaBuf, DType};
use crate::backend::cpu::bf16::stochastic_round_bf16;
use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamWStep, AttnShape, Backend, Divergence, Gemm, GeluKind, KlShape, RowTerms, IGNORE_INDEX};
use crate::data::rng::SplitMix64;

/// Tolerances.
pub const TOL_BF16: f64 = 1e-2;
pub const TOL_F32: f64 = 1e-4;
pub const TOL_RELATION_LOSS: f64 = 1e-3;

/// The op families, each one test in `tests/cuda_ops.rs`.
pub const FAMILIES: &[&str] =
    &["memory", "gemm", "elementwise", "embedding", "norm", "rope", "attention", "attention_decode", "cross_entropy", "softmax_kl", "relation", "adamw", "driver_errors"];

/// One comparison.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub family: String,
    pub name: String,
    /// ‖out − ref‖ / ‖ref‖ (‖out‖ when the reference is zero); NaN when the check errored.
    pub rel_err: f64,
    pub tol: f64,
    pub passed: bool,
    /// Why it failed (error message, NaN count), empty when it passed.
    pub detail: String,
}

/// Rounds to the nearest bf16 (as the upload does).
fn r16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

struct Ctx<'a> {
    be: &'a CudaBackend,
    cpu: CpuBackend<f32>,
    rng: SplitMix64,
    family: &'static str,
    out: Vec<CheckResult>,
}

fn rel_err(got: &[f32], want: &[f32]) -> (f64, usize) {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut bad = 0;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() && w.is_finite() {
            bad += 1;
        }
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    let e = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    (e, bad)
}

impl<'a> Ctx<'a> {
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// `n` random values in [lo, hi), rounded to bf16.
    fn rand(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| r16(self.uniform(lo, hi))).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    fn up(&self, x: &[f32]) -> Result<CudaBuf> {
        self.be.upload(x)
    }

    /// A bf16 buffer of `n` NaNs.
    fn poisoned(&self, n: usize) -> Result<CudaBuf> {
        let mut b = self.be.alloc(n, DType::Bf16)?;
        self.be.fill_nan(&mut b)?;
        Ok(b)
    }

    /// `n` random values scaled to the RMS of `like` (a pre-fill for accumulated outputs).
    fn prefill_like(&mut self, n: usize, like: &[f32]) -> Vec<f32> {
        let rms = (like.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / like.len().max(1) as f64).sqrt() as f32;
        let s = if rms > 0.0 { rms } else { 1.0 };
        self.rand(n, -s, s)
    }

    fn record(&mut self, name: &str, rel: f64, tol: f64, detail: String) {
        let passed = rel.is_finite() && rel <= tol && detail.is_empty();
        self.out.push(CheckResult { family: self.family.to_string(), name: name.to_string(), rel_err: rel, tol, passed, detail });
    }

    fn cmp(&mut self, name: &str, got: &[f32], want: &[f32], tol: f64) {
        if got.len() != want.len() {
            self.record(name, f64::NAN, tol, format!("{} values, expected {}", got.len(), want.len()));
            return;
        }
        let (e, bad) = rel_err(got, want);
        let detail = if bad > 0 { format!("{bad} NaN/inf values where the reference is finite (unwritten or overflowed)") } else { String::new() };
        self.record(name, e, tol, detail);
    }

    fn cmp_buf(&mut self, name: &str, got: &CudaBuf, want: &[f32], tol: f64) -> Result<()> {
        let g = self.be.download(got)?;
        self.cmp(name, &g, want, tol);
        Ok(())
    }

    fn cmp_scalar(&mut self, name: &str, got: f64, want: f64, tol: f64) {
        let e = if want != 0.0 { ((got - want) / want).abs() } else { got.abs() };
        let detail = if !got.is_finite() && want.is_finite() { format!("value {got}, expected {want}") } else { String::new() };
        self.record(name, e, tol, detail);
    }

    /// Runs one case; an error is a failed check with the message.
    fn case(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<()>) {
        if let Err(e) = f(self) {
            self.record(name, f64::NAN, TOL_BF16, format!("error: {e:#}"));
        }
    }
}

/// Runs the checks of one family on `be`.
pub fn run_family(be: &CudaBackend, family: &str, seed: u64) -> Result<Vec<CheckResult>> {
    let fam = FAMILIES.iter().find(|f| **f == family).ok_or_else(|| anyhow!("unknown check family {family:?} (one of {})", FAMILIES.join(", ")))?;
    let mut c = Ctx { be, cpu: CpuBackend::new(), rng: SplitMix64::new(seed), family: fam, out: Vec::new() };
    match family {
        "memory" => memory(&mut c),
        "gemm" => gemm(&mut c),
        "elementwise" => {
            elementwise(&mut c);
            swiglu(&mut c);
        }
        "embedding" => embedding(&mut c),
        "norm" => norm(&mut c),
        "rope" => qkv_rope(&mut c),
        "attention" => attention(&mut c),
        "attention_decode" => attention_decode(&mut c),
        "cross_entropy" => cross_entropy(&mut c),
        "softmax_kl" => softmax_kl(&mut c),
        "relation" => relation(&mut c),
        "adamw" => adamw(&mut c),
        "driver_errors" => driver_errors(&mut c),
        _ => unreachable!("checked above"),
    }
    // A fault of an asynchronous launch that no download caught yet.
    if let Err(e) = be.synchronize() {
        c.record("device synchronise after the family", f64::NAN, 0.0, format!("error: {e:#}"));
    }
    Ok(c.out)
}

/// Every family.
pub fn run_all(be: &CudaBackend, seed: u64) -> Vec<CheckResult> {
    let mut all = Vec::new();
    for (i, fam) in FAMILIES.iter().enumerate() {
        match run_family(be, fam, seed.wrapping_add(i as u64 * 0x1000)) {
            Ok(r) => all.extend(r),
            Err(e) => all.push(CheckResult {
                family: fam.to_string(),
                name: "family".into(),
                rel_err: f64::NAN,
                tol: 0.0,
                passed: false,
                detail: format!("error: {e:#}"),
            }),
        }
    }
    all
}

/// The results as a table.
pub fn table(results: &[CheckResult]) -> String {
    let mut s = format!("{:<14} {:<58} {:>10} {:>8}  {}\n", "family", "check", "rel err", "tol", "status");
    for r in results {
        let status = if r.passed { "ok".to_string() } else { format!("FAIL {}", r.detail) };
        s.push_str(&format!("{:<14} {:<58} {:>10.2e} {:>8.0e}  {}\n", r.family, r.name, r.rel_err, r.tol, status));
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    s.push_str(&format!("{} passed, {} failed\n", results.len() - failed, failed));
    s
}

fn memory(c: &mut Ctx) {
    for n in [1usize, 1001] {
        c.case(&format!("upload/download n={n}"), |c| {
            let x = c.rand(n, -3.0, 3.0);
            let b = c.up(&x)?;
            c.cmp_buf(&format!("upload/download n={n}"), &b, &x, 0.0)
        });
    }
    c.case("copy_range", |c| {
        let src = c.rand(1000, -1.0, 1.0);
        let dst0 = c.rand(777, -1.0, 1.0);
        let (s, mut d) = (c.up(&src)?, c.up(&dst0)?);
        c.be.copy_range(&s, 13, &mut d, 101, 333)?;
        let mut want = dst0.clone();
        want[101..434].copy_from_slice(&src[13..346]);
        c.cmp_buf("copy_range 333 of 1000 into 777", &d, &want, 0.0)?;
        let dup = c.be.duplicate(&d)?;
        c.cmp_buf("duplicate", &dup, &want, 0.0)?;
        c.be.fill_zero(&mut d)?;
        c.cmp_buf("fill_zero", &d, &vec![0.0; 777], 0.0)?;
        ensure!(c.be.copy_range(&s, 900, &mut d, 0, 101).is_err(), "an out-of-range copy was accepted");
        Ok(())
    });
    c.case("out of memory is a clear error", |c| {
        // 2^50 bf16 values (2 PiB): more than any device has.
        match c.be.alloc(1 << 50, DType::Bf16) {
            Ok(_) => anyhow::bail!("a 2 PiB allocation succeeded"),
            Err(e) => {
                let msg = e.to_string();
                ensure!(msg.contains("out of memory") && msg.contains("asked for") && msg.contains("free"), "unclear message: {msg}");
            }
        }
        c.record("out of memory is a clear error", 0.0, 0.0, String::new());
        Ok(())
    });
    c.case("the pool serves a repeated sequence without the driver", |c| {
        let x = c.rand(70_000, -1.0, 1.0);
        // One "step": buffers of several sizes, freed in another order than allocated.
        let step = |c: &mut Ctx| -> Result<()> {
            let a = c.up(&x)?;
            let b = c.be.duplicate(&a)?;
            let z = c.be.zeros_of(300_000, DType::F32)?;
            drop(a);
            let d = c.be.duplicate(&b)?;
            drop((z, b));
            c.cmp_buf("pool: a reused block holds the new data", &d, &x, 0.0)
        };
        step(c)?;
        let first = c.be.pool_stats();
        for _ in 0..3 {
            step(c)?;
        }
        let s = c.be.pool_stats();
        ensure!(s.driver_allocs == first.driver_allocs, "{} driver allocations after the first step", s.driver_allocs - first.driver_allocs);
        ensure!(s.reuses >= first.reuses + 12, "only {} reuses in three steps", s.reuses - first.reuses);
        c.record("pool: no driver allocation after the first step", 0.0, 0.0, String::new());
        Ok(())
    });
    c.case("index arrays are uploaded once per content", |c| {
        // Positions no other check uses, so the cache cannot hold them already.
        let positions: Vec<u32> = (0..37).map(|i| 90_001 + 3 * i).collect();
        let x = c.rand(37 * 3 * 64, -1.0, 1.0);
        let (mut q, mut k, mut v, mut back) = (c.be.empty(37 * 64)?, c.be.empty(37 * 64)?, c.be.empty(37 * 64)?, c.be.empty(x.len())?);
        let before = c.be.index_uploads();
        c.be.qkv_split_rope(&c.up(&x)?, None, &positions, 64, 10_000.0, &mut q, &mut k, &mut v)?;
        c.be.qkv_merge_rope_backward(&q, &k, &v, &positions, 64, 10_000.0, &mut back)?;
        let uploads = c.be.index_uploads() - before;
        ensure!(uploads == 1, "{uploads} uploads of the same positions for two launches");
        c.cmp_buf("the Q/K/V split with RoPE, then its inverse, from cached positions", &back, &x, TOL_BF16)
    });
    c.case("optimizer state f32", |c| {
        let x: Vec<f32> = (0..513).map(|_| c.uniform(-1.0, 1.0)).collect();
        let s = c.be.upload_state(&x)?;
        let got = c.be.download_state(&s)?;
        c.cmp("upload_state/download_state (f32, exact)", &got, &x, 0.0);
        let z = c.be.zeros_state(5)?;
        let got = c.be.download_state(&z)?;
        c.cmp("zeros_state", &got, &[0.0; 5], 0.0);
        Ok(())
    });
}

fn gemm(c: &mut Ctx) {
    let shapes = [(37usize, 61usize, 45usize), (1, 1, 1), (1, 300, 17), (129, 65, 257), (64, 64, 64)];
    for &(m, n, k) in &shapes {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0)] {
                let name = format!("{m}x{n}x{k} ta={} tb={} alpha={alpha} beta={beta}", ta as u8, tb as u8);
                c.case(&name, |c| {
                    let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta };
                    let a = c.rand(m * k, -1.0, 1.0);
                    let b = c.rand(k * n, -1.0, 1.0);
                    let mut want = vec![0.0f32; m * n];
                    c.cpu.gemm(Gemm { beta: 0.0, ..g }, &a, &b, &mut want)?;
                    let (ga, gb) = (c.up(&a)?, c.up(&b)?);
                    let mut gc = if beta == 0.0 {
                        c.poisoned(m * n)?
                    } else {
                        let pre = c.prefill_like(m * n, &want);
                        want.iter_mut().zip(&pre).for_each(|(w, &p)| *w += beta * p);
                        c.up(&pre)?
                    };
                    c.be.gemm(g, &ga, &gb, &mut gc)?;
                    c.cmp_buf(&name, &gc, &want, TOL_BF16)
                });
            }
        }
    }
    c.case("k=0: C = beta·C", |c| {
        let pre = c.rand(12, -1.0, 1.0);
        let (a, b) = (c.up(&[])?, c.up(&[])?);
        let mut gc = c.up(&pre)?;
        c.be.gemm(Gemm { m: 3, n: 4, k: 0, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.5 }, &a, &b, &mut gc)?;
        let want: Vec<f32> = pre.iter().map(|&p| 0.5 * p).collect();
        c.cmp_buf("k=0: C = beta·C", &gc, &want, TOL_BF16)
    });
    c.case("bad lengths are errors", |c| {
        let (a, b) = (c.up(&[0.0; 6])?, c.up(&[0.0; 6])?);
        let mut gc = c.be.zeros(4)?;
        ensure!(c.be.gemm(Gemm::linear(2, 2, 4), &a, &b, &mut gc).is_err(), "a gemm with wrong lengths was accepted");
        Ok(())
    });
}

fn elementwise(c: &mut Ctx) {
    for (rows, dim) in [(1usize, 1usize), (37, 129), (300, 77)] {
        c.case(&format!("add_bias {rows}x{dim}"), |c| {
            let x = c.rand(rows * dim, -1.0, 1.0);
            let bias = c.rand(dim, -1.0, 1.0);
            let mut want = x.clone();
            c.cpu.add_bias(&mut want, &bias, rows)?;
            let mut gx = c.up(&x)?;
            c.be.add_bias(&mut gx, &c.up(&bias)?, rows)?;
            c.cmp_buf(&format!("add_bias {rows}x{dim}"), &gx, &want, TOL_BF16)
        });
        c.case(&format!("bias_grad {rows}x{dim}"), |c| {
            let dy = c.rand(rows * dim, -1.0, 1.0);
            let mut inc = vec![0.0f32; dim];
            c.cpu.bias_grad(&dy, &mut inc, rows)?;
            let pre = c.prefill_like(dim, &inc);
            let want: Vec<f32> = pre.iter().zip(&inc).map(|(p, i)| p + i).collect();
            let mut gd = c.up(&pre)?;
            c.be.bias_grad(&c.up(&dy)?, &mut gd, rows)?;
            c.cmp_buf(&format!("bias_grad {rows}x{dim} (accumulate)"), &gd, &want, TOL_BF16)
        });
    }
    for n in [1usize, 1001, 100_003] {
        c.case(&format!("add_assign/scale/sum_squares n={n}"), |c| {
            let x = c.rand(n, -1.0, 1.0);
            let y = c.rand(n, -1.0, 1.0);
            let mut want = x.clone();
            c.cpu.add_assign(&mut want, &y)?;
            let mut gx = c.up(&x)?;
            c.be.add_assign(&mut gx, &c.up(&y)?)?;
            c.cmp_buf(&format!("add_assign n={n}"), &gx, &want, TOL_BF16)?;
            let mut want = x.clone();
            c.cpu.scale(&mut want, -0.37)?;
            let mut gx = c.up(&x)?;
            c.be.scale(&mut gx, -0.37)?;
            c.cmp_buf(&format!("scale n={n}"), &gx, &want, TOL_BF16)?;
            let want = c.cpu.sum_squares(&[&x])?;
            let gx = c.up(&x)?;
            let got = c.be.sum_squares(&[&gx])?;
            c.cmp_scalar(&format!("sum_squares n={n} (f64 accumulation)"), got, want, TOL_F32);
            let again = c.be.sum_squares(&[&gx])?;
            let detail = if again.to_bits() == got.to_bits() { String::new() } else { format!("{got:e} then {again:e}") };
            c.record(&format!("sum_squares n={n} gives the same bits twice"), 0.0, 0.0, detail);
            let want = c.cpu.sum_squares(&[&x, &y, &x])?;
            let got = c.be.sum_squares(&[&gx, &c.up(&y)?, &gx])?;
            c.cmp_scalar(&format!("sum_squares of three buffers n={n}"), got, want, TOL_F32);
            // ZeRO-1's norm: element ranges of buffers (a range starting inside one).
            let (r1, r2) = (n / 3..n, 0..n / 2);
            let want = c.cpu.sum_squares_ranges(&[(&x, r1.clone()), (&x, r2.clone())])?;
            let got = c.be.sum_squares_ranges(&[(&gx, r1), (&gx, r2)])?;
            c.cmp_scalar(&format!("sum_squares_ranges n={n}"), got, want, TOL_F32);
            Ok(())
        });
    }
    for n in [1usize, 1001, 65_537] {
        for kind in [GeluKind::Erf, GeluKind::Tanh] {
            let name = format!("gelu {kind:?} n={n}");
            c.case(&name, |c| {
                let (x, d) = (c.rand(n, -6.0, 6.0), c.rand(n, -1.0, 1.0));
                let mut want = vec![0.0; n];
                c.cpu.gelu(&x, &mut want, kind)?;
                let (gx, gd) = (c.up(&x)?, c.up(&d)?);
                let mut out = c.poisoned(n)?;
                c.be.gelu(&gx, &mut out, kind)?;
                c.cmp_buf(&name, &out, &want, TOL_BF16)?;
                let mut wdx = vec![0.0; n];
                c.cpu.gelu_backward(&x, &d, &mut wdx, kind)?;
                let mut dx = c.poisoned(n)?;
                c.be.gelu_backward(&gx, &gd, &mut dx, kind)?;
                c.cmp_buf(&format!("gelu_backward {kind:?} n={n}"), &dx, &wdx, TOL_BF16)
            });
        }
    }
}

/// SwiGLU on a stacked gate/up projection and its backward: inter a multiple of 8 (the 16-byte path) and not (13, 1:
/// the scalar path), outputs poisoned; wrong lengths are errors.
fn swiglu(c: &mut Ctx) {
    for (rows, inter) in [(1usize, 1usize), (37, 13), (29, 64), (5, 200)] {
        let name = format!("swiglu {rows}x(2·{inter})");
        c.case(&name, |c| {
            let mut gu = c.rand(rows * 2 * inter, -2.0, 2.0);
            // Gates over SiLU's curved range.
            for r in gu.chunks_mut(2 * inter) {
                r[..inter].iter_mut().for_each(|g| *g = r16(*g * 3.0));
            }
            let d = c.rand(rows * inter, -1.0, 1.0);
            let mut want = vec![0.0; rows * inter];
            c.cpu.swiglu(&gu, inter, &mut want)?;
            let (ggu, gd) = (c.up(&gu)?, c.up(&d)?);
            let mut out = c.poisoned(rows * inter)?;
            c.be.swiglu(&ggu, inter, &mut out)?;
            c.cmp_buf(&name, &out, &want, TOL_BF16)?;
            let mut wd = vec![0.0; rows * 2 * inter];
            c.cpu.swiglu_backward(&gu, inter, &d, &mut wd)?;
            let mut dgu = c.poisoned(rows * 2 * inter)?;
            c.be.swiglu_backward(&ggu, inter, &gd, &mut dgu)?;
            c.cmp_buf(&format!("swiglu_backward {rows}x(2·{inter})"), &dgu, &wd, TOL_BF16)
        });
    }
    c.case("swiglu: bad lengths are errors", |c| {
        let (gu, d) = (c.be.zeros(30)?, c.be.zeros(15)?);
        let (mut out, mut long, mut dgu, mut short) = (c.be.zeros(15)?, c.be.zeros(16)?, c.be.zeros(30)?, c.be.zeros(29)?);
        c.be.swiglu(&gu, 5, &mut out)?;
        c.be.swiglu_backward(&gu, 5, &d, &mut dgu)?;
        let errs = [
            ("inter 0", c.be.swiglu(&gu, 0, &mut out).err(), "inter"),
            ("gate_up not rows of 2·inter", c.be.swiglu(&gu, 4, &mut out).err(), "gate_up"),
            ("out too long", c.be.swiglu(&gu, 5, &mut long).err(), "out"),
            ("backward: dgate_up short", c.be.swiglu_backward(&gu, 5, &out, &mut short).err(), "dgate_up"),
            ("backward: dout wrong", c.be.swiglu_backward(&gu, 5, &long, &mut dgu).err(), "dout"),
        ];
        for (case, err, tensor) in errs {
            let msg = err.map(|e| e.to_string()).ok_or_else(|| anyhow!("swiglu, {case}: accepted"))?;
            ensure!(msg.contains("swiglu") && msg.contains(tensor), "swiglu, {case}: the error does not name {tensor}: {msg}");
        }
        c.record("swiglu: bad lengths are errors", 0.0, 0.0, String::new());
        Ok(())
    });
}

fn embedding(c: &mut Ctx) {
    for (rows, dim, t) in [(50usize, 33usize, 70usize), (1, 1, 1), (1000, 896, 300)] {
        let name = format!("embedding table {rows}x{dim}, {t} ids");
        c.case(&name, |c| {
            let table = c.rand(rows * dim, -1.0, 1.0);
            // Few distinct ids, so the scatter-add sees repeats.
            let distinct = (rows / 3).max(1);
            let ids: Vec<u32> = (0..t).map(|_| c.below(distinct) as u32 * (rows / distinct) as u32).collect();
            let mut want = vec![0.0; t * dim];
            c.cpu.embedding(&table, &ids, dim, &mut want)?;
            let gt = c.up(&table)?;
            let mut out = c.poisoned(t * dim)?;
            c.be.embedding(&gt, &ids, dim, &mut out)?;
            c.cmp_buf(&format!("{name} gather"), &out, &want, 0.0)?;
            let dout = c.rand(t * dim, -1.0, 1.0);
            let mut inc = vec![0.0; rows * dim];
            c.cpu.embedding_backward(&dout, &ids, dim, &mut inc)?;
            let pre = c.prefill_like(rows * dim, &inc);
            let want: Vec<f32> = pre.iter().zip(&inc).map(|(p, i)| p + i).collect();
            let mut gd = c.up(&pre)?;
            c.be.embedding_backward(&c.up(&dout)?, &ids, dim, &mut gd)?;
            c.cmp_buf(&format!("{name} scatter-add (accumulate)"), &gd, &want, TOL_BF16)?;
            let bad = [rows as u32];
            let mut o1 = c.be.zeros(dim)?;
            ensure!(c.be.embedding(&gt, &bad, dim, &mut o1).is_err(), "an out-of-range id was accepted");
            Ok(())
        });
    }
}

fn norm(c: &mut Ctx) {
    for (rows, dim) in [(1usize, 1usize), (37, 129), (5, 896), (3, 2560)] {
        let name = format!("rmsnorm {rows}x{dim}");
        c.case(&name, |c| {
            let x = c.rand(rows * dim, -2.0, 2.0);
            let w = c.rand(dim, 0.5, 1.5);
            let (mut want, mut wr) = (vec![0.0; rows * dim], vec![0.0; rows]);
            c.cpu.rmsnorm(&x, &w, 1e-6, &mut want, &mut wr)?;
            let (gx, gw) = (c.up(&x)?, c.up(&w)?);
            let mut out = c.poisoned(rows * dim)?;
            // As model code allocates it: a bf16 buffer, which the op turns into f32.
            let mut rstd = c.poisoned(rows)?;
            c.be.rmsnorm(&gx, &gw, 1e-6, &mut out, &mut rstd)?;
            c.cmp_buf(&format!("{name} out"), &out, &want, TOL_BF16)?;
            ensure!(rstd.dtype() == DType::F32, "rstd was not made f32");
            c.cmp_buf(&format!("{name} rstd (f32)"), &rstd, &wr, TOL_F32)?;
            let dout = c.rand(rows * dim, -1.0, 1.0);
            let (mut wdx, mut winc) = (vec![0.0; rows * dim], vec![0.0; dim]);
            c.cpu.rmsnorm_backward(&dout, &x, &w, &wr, &mut wdx, &mut winc)?;
            let pre = c.prefill_like(dim, &winc);
            let wdw: Vec<f32> = pre.iter().zip(&winc).map(|(p, i)| p + i).collect();
            let mut dx = c.poisoned(rows * dim)?;
            let mut dw = c.up(&pre)?;
            c.be.rmsnorm_backward(&c.up(&dout)?, &gx, &gw, &rstd, &mut dx, &mut dw)?;
            c.cmp_buf(&format!("{name} backward dx"), &dx, &wdx, TOL_BF16)?;
            c.cmp_buf(&format!("{name} backward dw (accumulate)"), &dw, &wdw, TOL_BF16)
        });
        let name = format!("layernorm {rows}x{dim}");
        c.case(&name, |c| {
            let x = c.rand(rows * dim, -2.0, 3.0);
            let (w, b) = (c.rand(dim, 0.5, 1.5), c.rand(dim, -0.5, 0.5));
            let mut want = vec![0.0; rows * dim];
            c.cpu.layernorm(&x, &w, &b, 1e-6, &mut want)?;
            let mut out = c.poisoned(rows * dim)?;
            c.be.layernorm(&c.up(&x)?, &c.up(&w)?, &c.up(&b)?, 1e-6, &mut out)?;
            c.cmp_buf(&name, &out, &want, TOL_BF16)
        });
    }
}

/// The fused Q/K/V split with RoPE and its backward: GQA and multi-head, D/2 a multiple of 8 (the
/// 16-byte path: head dims 64, 80, 128) and not (2, 6, 72: the scalar path), every output poisoned
/// (v an exact copy where there is no bias), with and without the projection's bias; wrong
/// lengths are errors.
fn qkv_rope(c: &mut Ctx) {
    let shapes = [(1usize, 1usize, 1usize, 2usize, 1e4f64), (37, 4, 2, 64, 1e6), (19, 3, 3, 6, 1e4), (23, 6, 2, 72, 1e6), (19, 2, 2, 80, 1e4), (11, 2, 1, 128, 1e4)];
    for (t, qh, kvh, hd, theta) in shapes {
        let name = format!("qkv_split_rope T={t} heads={qh}/{kvh} head_dim={hd} theta={theta:e}");
        c.case(&name, |c| {
            let (qd, kd) = (qh * hd, kvh * hd);
            let qkv = c.rand(t * (qd + 2 * kd), -1.0, 1.0);
            let pos: Vec<u32> = (0..t).map(|_| c.below(20_000) as u32).collect();
            // The bias is bf16 on the device: round it so both backends add the same values.
            let bias: Vec<f32> = c.rand(qd + 2 * kd, -1.0, 1.0).into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect();
            for with_bias in [false, true] {
                let (mut wq, mut wk, mut wv) = (vec![0.0; t * qd], vec![0.0; t * kd], vec![0.0; t * kd]);
                c.cpu.qkv_split_rope(&qkv, with_bias.then_some(&bias), &pos, hd, theta, &mut wq, &mut wk, &mut wv)?;
                let (mut q, mut k, mut v) = (c.poisoned(t * qd)?, c.poisoned(t * kd)?, c.poisoned(t * kd)?);
                let gbias = c.up(&bias)?;
                c.be.qkv_split_rope(&c.up(&qkv)?, with_bias.then_some(&gbias), &pos, hd, theta, &mut q, &mut k, &mut v)?;
                let name = format!("{name}{}", if with_bias { " with bias" } else { "" });
                c.cmp_buf(&format!("{name} q"), &q, &wq, TOL_BF16)?;
                c.cmp_buf(&format!("{name} k"), &k, &wk, TOL_BF16)?;
                c.cmp_buf(&format!("{name} v"), &v, &wv, if with_bias { TOL_BF16 } else { 0.0 })?;
            }
            let (dq, dk, dv) = (c.rand(t * qd, -1.0, 1.0), c.rand(t * kd, -1.0, 1.0), c.rand(t * kd, -1.0, 1.0));
            let mut want = vec![0.0; qkv.len()];
            c.cpu.qkv_merge_rope_backward(&dq, &dk, &dv, &pos, hd, theta, &mut want)?;
            let mut got = c.poisoned(qkv.len())?;
            c.be.qkv_merge_rope_backward(&c.up(&dq)?, &c.up(&dk)?, &c.up(&dv)?, &pos, hd, theta, &mut got)?;
            c.cmp_buf(&format!("qkv_merge_rope_backward T={t} heads={qh}/{kvh} head_dim={hd}"), &got, &want, TOL_BF16)
        });
    }
    c.case("qkv_split_rope: bad lengths are errors", |c| {
        // T = 2, head_dim 4, q_dim 8, kv_dim 4: rows of 16.
        let pos = [0u32, 1];
        let z = |n: usize| c.be.zeros(n);
        let (qkv, q, k, v) = (z(32)?, z(16)?, z(8)?, z(8)?);
        let (mut mq, mut mk, mut mv, mut mqkv) = (z(16)?, z(8)?, z(8)?, z(32)?);
        c.be.qkv_split_rope(&qkv, None, &pos, 4, 1e4, &mut mq, &mut mk, &mut mv)?;
        c.be.qkv_merge_rope_backward(&q, &k, &v, &pos, 4, 1e4, &mut mqkv)?;
        let (qkv_long, k_odd, v_short) = (z(33)?, z(9)?, z(4)?);
        let (mut q_odd, mut v_short_m) = (z(17)?, z(4)?);
        let errs = [
            ("odd head_dim", c.be.qkv_split_rope(&qkv, None, &pos, 3, 1e4, &mut mq, &mut mk, &mut mv).err(), "head_dim"),
            ("no positions", c.be.qkv_split_rope(&qkv, None, &[], 4, 1e4, &mut mq, &mut mk, &mut mv).err(), "positions"),
            ("q not whole heads", c.be.qkv_split_rope(&qkv, None, &pos, 4, 1e4, &mut q_odd, &mut mk, &mut mv).err(), ": q has"),
            ("v shorter than k", c.be.qkv_split_rope(&qkv, None, &pos, 4, 1e4, &mut mq, &mut mk, &mut v_short_m).err(), ": v has"),
            ("qkv one long", c.be.qkv_split_rope(&qkv_long, None, &pos, 4, 1e4, &mut mq, &mut mk, &mut mv).err(), ": qkv has"),
            ("bias one short", c.be.qkv_split_rope(&qkv, Some(&z(15)?), &pos, 4, 1e4, &mut mq, &mut mk, &mut mv).err(), "bias has"),
            ("backward: dk not whole heads", c.be.qkv_merge_rope_backward(&q, &k_odd, &k_odd, &pos, 4, 1e4, &mut mqkv).err(), ": dk has"),
            ("backward: dv shorter than dk", c.be.qkv_merge_rope_backward(&q, &k, &v_short, &pos, 4, 1e4, &mut mqkv).err(), ": dv has"),
            ("backward: dqkv one short", c.be.qkv_merge_rope_backward(&q, &k, &v, &pos, 4, 1e4, &mut q_odd).err(), ": dqkv has"),
        ];
        for (case, err, says) in errs {
            let msg = err.map(|e| e.to_string()).ok_or_else(|| anyhow!("qkv rope, {case}: accepted"))?;
            ensure!(msg.contains("qkv_") && msg.contains(says), "qkv rope, {case}: the error does not say {says:?}: {msg}");
        }
        c.record("qkv_split_rope: bad lengths are errors", 0.0, 0.0, String::new());
        Ok(())
    });
}

fn attention(c: &mut Ctx) {
    let lens = [1usize, 37, 130];
    for hd in [64usize, 72, 80, 128] {
        for (h, hkv, causal) in [(4usize, 2usize, true), (3, 3, false), (2, 1, true), (4, 2, false)] {
            let name = format!("attention D={hd} H={h} Hkv={hkv} causal={causal} lens={lens:?}");
            c.case(&name, |c| {
                let t: usize = lens.iter().sum();
                let shape = AttnShape { n_heads: h, n_kv_heads: hkv, head_dim: hd, causal };
                let q = c.rand(t * h * hd, -1.5, 1.5);
                let k = c.rand(t * hkv * hd, -1.5, 1.5);
                let v = c.rand(t * hkv * hd, -1.0, 1.0);
                let (mut wo, mut wl) = (vec![0.0; t * h * hd], vec![0.0; t * h]);
                c.cpu.attention(shape, &lens, &q, &k, &v, &mut wo, &mut wl)?;
                let (gq, gk, gv) = (c.up(&q)?, c.up(&k)?, c.up(&v)?);
                let mut out = c.poisoned(t * h * hd)?;
                let mut lse = c.poisoned(t * h)?;
                c.be.attention(shape, &lens, &gq, &gk, &gv, &mut out, &mut lse)?;
                c.cmp_buf(&format!("{name} out"), &out, &wo, TOL_BF16)?;
                c.cmp_buf(&format!("{name} lse (f32)"), &lse, &wl, TOL_F32)?;
                // The backward from the CUDA forward's own out (bf16) and lse; the reference gets
                // the same out, rounded to bf16, so only the backward is measured.
                let gout_host = c.be.download(&out)?;
                let dout = c.rand(t * h * hd, -1.0, 1.0);
                let (mut wdq, mut wdk, mut wdv) = (vec![0.0; t * h * hd], vec![0.0; t * hkv * hd], vec![0.0; t * hkv * hd]);
                c.cpu.attention_backward(shape, &lens, &q, &k, &v, &gout_host, &wl, &dout, &mut wdq, &mut wdk, &mut wdv)?;
                let (mut dq, mut dk, mut dv) = (c.poisoned(t * h * hd)?, c.poisoned(t * hkv * hd)?, c.poisoned(t * hkv * hd)?);
                c.be.attention_backward(shape, &lens, &gq, &gk, &gv, &out, &lse, &c.up(&dout)?, &mut dq, &mut dk, &mut dv)?;
                c.cmp_buf(&format!("{name} dq"), &dq, &wdq, TOL_BF16)?;
                c.cmp_buf(&format!("{name} dk"), &dk, &wdk, TOL_BF16)?;
                c.cmp_buf(&format!("{name} dv"), &dv, &wdv, TOL_BF16)
            });
        }
    }
}

/// Decode attention: each row's one query against its cache slot, through the backend method
/// (split planned from the SM count), a forced split of 128 positions (split kernel + combine)
/// and a forced single pass, against the CPU's `attention_decode`. The cache positions no row
/// reads are NaN, so a read past a row's length shows. The error is the worst row's (a short
/// row's large outputs would otherwise hide a long row's error).
fn attention_decode(c: &mut Ctx) {
    // (head_dim, heads, kv heads): GQA groups 7 (Qwen2.5-0.5B), 1, 8, 2, 3, 16 (two blocks of 8).
    let shapes = [(64usize, 14usize, 2usize), (128, 16, 16), (128, 16, 2), (80, 4, 2), (72, 3, 1), (64, 32, 2)];
    // (slot, len) per row: lengths 1 .. 2000 in different slots, two rows sharing one.
    let rows: [(u32, usize); 5] = [(3, 300), (0, 1), (4, 2000), (1, 17), (3, 1000)];
    let (n_slots, cap) = (5usize, 2003usize);
    for (hd, h, hkv) in shapes {
        let name = format!("attention_decode D={hd} H={h} Hkv={hkv} rows(slot,len)={rows:?} capacity={cap}");
        c.case(&name, |c| {
            let shape = AttnShape { n_heads: h, n_kv_heads: hkv, head_dim: hd, causal: false };
            let kvd = hkv * hd;
            let mut used = vec![0usize; n_slots];
            for &(s, l) in &rows {
                used[s as usize] = used[s as usize].max(l);
            }
            let cache = |c: &mut Ctx| -> Vec<f32> {
                let mut x = c.rand(n_slots * cap * kvd, -1.5, 1.5);
                for (s, &u) in used.iter().enumerate() {
                    x[(s * cap + u) * kvd..(s + 1) * cap * kvd].fill(f32::NAN);
                }
                x
            };
            let (k, v) = (cache(c), cache(c));
            let q = c.rand(rows.len() * h * hd, -1.5, 1.5);
            let slots: Vec<u32> = rows.iter().map(|r| r.0).collect();
            let lens: Vec<usize> = rows.iter().map(|r| r.1).collect();
            let mut want = vec![0.0f32; rows.len() * h * hd];
            c.cpu.attention_decode(shape, cap, &slots, &lens, &q, &k, &v, &mut want)?;
            let (gq, gk, gv) = (c.up(&q)?, c.up(&k)?, c.up(&v)?);
            for (label, chunk) in [("planned split", None), ("split 128 + combine", Some(128)), ("single pass", Some(cap))] {
                let mut out = c.poisoned(rows.len() * h * hd)?;
                match chunk {
                    None => c.be.attention_decode(shape, cap, &slots, &lens, &gq, &gk, &gv, &mut out)?,
                    Some(ch) => super::decode::decode(c.be, shape, cap, &slots, &lens, &gq, &gk, &gv, &mut out, Some(ch))?,
                }
                let got = c.be.download(&out)?;
                let n = h * hd;
                let (mut worst, mut bad) = (0.0f64, 0usize);
                for (g, w) in got.chunks(n).zip(want.chunks(n)) {
                    let (e, b) = rel_err(g, w);
                    worst = worst.max(e);
                    bad += b;
                }
                let detail = if bad > 0 { format!("{bad} NaN/inf values where the reference is finite (unwritten, or a read past a row's length)") } else { String::new() };
                c.record(&format!("D={hd} H={h} Hkv={hkv}, {label} (worst of {} rows)", rows.len()), worst, TOL_BF16, detail);
            }
            Ok(())
        });
    }
    c.case("attention_decode bad arguments are errors", |c| {
        let shape = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 64, causal: false };
        let (q, k, v) = (c.up(&vec![0.5; 2 * 64])?, c.up(&vec![0.5; 2 * 9 * 64])?, c.up(&vec![0.5; 2 * 9 * 64])?);
        let mut o = c.be.zeros(2 * 64)?;
        ensure!(c.be.attention_decode(shape, 9, &[2], &[1], &q, &k, &v, &mut o).is_err(), "a slot out of range was accepted");
        ensure!(c.be.attention_decode(shape, 9, &[0], &[10], &q, &k, &v, &mut o).is_err(), "a row longer than the cache was accepted");
        ensure!(c.be.attention_decode(shape, 9, &[0], &[0], &q, &k, &v, &mut o).is_err(), "a row with nothing to attend to was accepted");
        ensure!(c.be.attention_decode(shape, 9, &[0, 1], &[1], &q, &k, &v, &mut o).is_err(), "slots and lengths of different counts were accepted");
        ensure!(c.be.attention_decode(shape, 7, &[0], &[1], &q, &k, &v, &mut o).is_err(), "a cache that is not [slots, capacity, Hkv·D] was accepted");
        let bad_dim = AttnShape { n_heads: 2, n_kv_heads: 1, head_dim: 32, causal: false };
        let (q2, k2) = (c.up(&vec![0.5; 2 * 32])?, c.up(&vec![0.5; 9 * 32])?);
        let mut o2 = c.be.zeros(2 * 32)?;
        let e = c.be.attention_decode(bad_dim, 9, &[0], &[1], &q2, &k2, &k2, &mut o2).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(e.contains("head_dim 32"), "head_dim 32 was not refused clearly: {e:?}");
        c.record("attention_decode bad arguments are errors", 0.0, 0.0, String::new());
        Ok(())
    });
}

fn cross_entropy(c: &mut Ctx) {
    for (rows, vocab) in [(1usize, 1usize), (6, 1001), (3, 151_936)] {
        let name = format!("cross_entropy {rows}x{vocab}");
        c.case(&name, |c| {
            let z = c.rand(rows * vocab, -4.0, 4.0);
            let mut targets: Vec<i32> = (0..rows).map(|_| c.below(vocab) as i32).collect();
            if rows > 1 {
                targets[1] = IGNORE_INDEX;
            }
            let n_t = targets.iter().filter(|&&t| t != IGNORE_INDEX).count().max(1);
            let scale = 1.0 / n_t as f32;
            let mut wd = vec![0.0; rows * vocab];
            let wl = c.cpu.cross_entropy(&z, &targets, vocab, scale, &mut wd)?;
            let mut d = c.poisoned(rows * vocab)?;
            let gl = c.be.cross_entropy(&c.up(&z)?, &targets, vocab, scale, &mut d)?;
            c.cmp_scalar(&format!("{name} loss"), gl, wl, TOL_F32);
            c.cmp_buf(&format!("{name} dlogits"), &d, &wd, TOL_BF16)?;
            let mut d2 = c.be.zeros(rows * vocab)?;
            ensure!(c.be.cross_entropy(&c.up(&z)?, &vec![vocab as i32; rows], vocab, scale, &mut d2).is_err(), "an out-of-range target was accepted");
            Ok(())
        });
    }
}

fn softmax_kl(c: &mut Ctx) {
    // (rows, student vocab, teacher vocab, kept, tau, listed rows)
    let cases: [(usize, usize, usize, usize, f32, Vec<u32>); 5] = [
        (6, 1003, 1011, 1000, 2.0, vec![4, 0, 2]),
        (4, 151_936, 151_936, 151_936, 1.0, vec![3, 1, 0]),
        (2, 8, 8, 8, 1.0, vec![0, 1]),
        (3, 1, 1, 1, 1.0, vec![2]),
        (5, 4099, 4096, 4096, 0.7, vec![0, 1, 2, 3, 4]),
    ];
    for (rows, vs, vt, kept, tau, listed) in cases {
        let name = format!("softmax_kl {rows} rows Vs={vs} Vt={vt} kept={kept} tau={tau} listed={}", listed.len());
        c.case(&name, |c| {
            let s = c.rand(rows * vs, -4.0, 4.0);
            let t = c.rand(rows * vt, -4.0, 4.0);
            let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: tau, divergence: Divergence::Fkl };
            let scale = 1.0 / listed.len() as f32;
            let mut inc = vec![0.0; rows * vs];
            let wl = c.cpu.softmax_kl(&s, &t, shape, &listed, scale, &mut inc)?;
            let pre = c.prefill_like(rows * vs, &inc);
            let mut want = pre.clone();
            c.cpu.softmax_kl(&s, &t, shape, &listed, scale, &mut want)?;
            let mut d = c.up(&pre)?;
            let gl = c.be.softmax_kl(&c.up(&s)?, &c.up(&t)?, shape, &listed, scale, &mut d)?;
            c.cmp_scalar(&format!("{name} loss"), gl, wl, TOL_F32);
            c.cmp_buf(&format!("{name} dstudent (accumulate)"), &d, &want, TOL_BF16)
        });
    }
    // A fused-head chunk in one launch (write mode): every row's CE and KL terms, rows in two terms,
    // rows in none (gradient 0), rows with only a CE; the gradient starts as NaN garbage and must
    // be written whole; each term's sum lands in its own slot (added to what is there).
    for (vs, vt, tau, div) in [(1003usize, 1011usize, 2.0f32, "fkl"), (4099, 4096, 1.0, "fkl"), (1000, 1000, 1.5, "jsd")] {
        let name = format!("distill_rows Vs={vs} Vt={vt} tau={tau} {div}");
        c.case(&name, |c| {
            let rows = 9;
            let kept = vs.min(vt);
            let divergence = Divergence::parse(div, (div == "jsd").then_some(0.9))?;
            let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: tau, divergence };
            let s = c.rand(rows * vs, -4.0, 4.0);
            let t = c.rand(rows * vt, -4.0, 4.0);
            let targets = [3, IGNORE_INDEX, (vs - 1) as i32, 0, IGNORE_INDEX, 7, IGNORE_INDEX, 11, 5];
            let kl_terms = [0b001u8, 0b100, 0b001, 0b000, 0b110, 0b001, 0b100, 0b010, 0b101];
            let terms = RowTerms { targets: &targets, kl_terms: &kl_terms, kl_scales: &[0.25, 0.5, 1.25], kl_slots: &[1, 2, 4], ce_scale: 0.2, ce_slot: 0 };
            let mut want = vec![f32::NAN; rows * vs];
            let mut wsums = c.cpu.sums(5)?;
            c.cpu.distill_rows_into(&s, &t, shape, &terms, &mut want, &mut wsums)?;
            let mut d = c.poisoned(rows * vs)?;
            let mut sums = c.be.sums(5)?;
            c.be.distill_rows_into(&c.up(&s)?, &c.up(&t)?, shape, &terms, &mut d, &mut sums)?;
            let got = c.be.read_sums(&sums)?;
            for (slot, what) in [(0, "CE"), (1, "term 0"), (2, "term 1"), (4, "term 2")] {
                c.cmp_scalar(&format!("{name} {what} sum"), got[slot], wsums[slot], TOL_F32);
            }
            ensure!(got[3] == 0.0, "{name}: slot 3 belongs to no term but holds {}", got[3]);
            c.cmp_buf(&format!("{name} dstudent (written over NaN)"), &d, &want, TOL_BF16)
        });
    }
    c.case("distill_rows refuses a term bit past its terms", |c| {
        let (s, t) = (c.up(&[0.0; 8])?, c.up(&[0.0; 8])?);
        let mut d = c.be.zeros(8)?;
        let shape = KlShape { student_vocab: 4, teacher_vocab: 4, kept: 4, temperature: 1.0, divergence: Divergence::Fkl };
        let terms = RowTerms { targets: &[0, 1], kl_terms: &[0b10, 0], kl_scales: &[1.0], kl_slots: &[0], ce_scale: 1.0, ce_slot: 0 };
        let mut sums = c.be.sums(1)?;
        let e = c.be.distill_rows_into(&s, &t, shape, &terms, &mut d, &mut sums).err().map(|e| e.to_string()).unwrap_or_default();
        ensure!(e.contains("row 0"), "accepted, or an error that does not name the row: {e:?}");
        Ok(())
    });
    // The CE fused into the same launch: τ = 1 with V_s = kept (the kernel reuses the KL's student
    // statistics), τ = 2 with extra student columns (a third statistic), a listed row without a
    // label, and the real vocabulary.
    let ce_cases: [(usize, usize, usize, usize, f32, Vec<u32>, Vec<i32>); 3] = [
        (6, 1003, 1003, 1003, 1.0, vec![4, 0, 2], vec![17, 1002, 0]),
        (5, 4099, 4096, 4096, 2.0, vec![0, 3, 1], vec![4098, IGNORE_INDEX, 5]),
        (3, 151_936, 151_936, 151_936, 1.0, vec![2, 0], vec![151_935, 77]),
    ];
    for (rows, vs, vt, kept, tau, listed, labels) in ce_cases {
        let name = format!("softmax_kl_ce {rows} rows Vs={vs} Vt={vt} kept={kept} tau={tau} labels={labels:?}");
        c.case(&name, |c| {
            let s = c.rand(rows * vs, -4.0, 4.0);
            let t = c.rand(rows * vt, -4.0, 4.0);
            let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: tau, divergence: Divergence::Fkl };
            let (scale, ce_scale) = (0.5, 1.0 / 3.0);
            let mut inc = vec![0.0; rows * vs];
            c.cpu.softmax_kl_ce(&s, &t, shape, &listed, &labels, scale, ce_scale, &mut inc)?;
            let pre = c.prefill_like(rows * vs, &inc);
            let mut want = pre.clone();
            let (wkl, wce) = c.cpu.softmax_kl_ce(&s, &t, shape, &listed, &labels, scale, ce_scale, &mut want)?;
            let mut d = c.up(&pre)?;
            let (gkl, gce) = c.be.softmax_kl_ce(&c.up(&s)?, &c.up(&t)?, shape, &listed, &labels, scale, ce_scale, &mut d)?;
            c.cmp_scalar(&format!("{name} KL"), gkl, wkl, TOL_F32);
            c.cmp_scalar(&format!("{name} CE"), gce, wce, TOL_F32);
            c.cmp_buf(&format!("{name} dstudent (accumulate)"), &d, &want, TOL_BF16)
        });
    }
    // The other divergences (softmax_div_bf16, three passes): each with and without the fused CE,
    // at τ ≠ 1 with mismatched vocabularies; JSD also at the real vocabulary.
    for name in crate::backend::divergence::DIVERGENCE_NAMES.into_iter().filter(|&n| n != "fkl") {
        let div = match Divergence::parse(name, None) {
            Ok(d) => d,
            Err(e) => {
                c.case(&format!("divergence {name}"), |_| Err(e));
                continue;
            }
        };
        let mut cases: Vec<(usize, usize, usize, usize, f32, Vec<u32>, Vec<i32>)> =
            vec![(6, 1003, 1011, 1000, 2.0, vec![4, 0, 2], vec![]), (5, 4099, 4096, 4096, 2.0, vec![0, 3, 1], vec![4098, IGNORE_INDEX, 5])];
        if name == "jsd" {
            cases.push((3, 151_936, 151_936, 151_936, 1.0, vec![2, 0], vec![151_935, 77]));
        }
        for (rows, vs, vt, kept, tau, listed, labels) in cases {
            let case = format!("softmax_kl {name} {rows} rows Vs={vs} Vt={vt} kept={kept} tau={tau} labels={labels:?}");
            c.case(&case, |c| {
                let s = c.rand(rows * vs, -4.0, 4.0);
                let t = c.rand(rows * vt, -4.0, 4.0);
                let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: tau, divergence: div };
                let (scale, ce_scale) = (0.5, 1.0 / 3.0);
                let run_cpu = |cpu: &CpuBackend<f32>, d: &mut Vec<f32>| -> Result<(f64, f64)> {
                    if labels.is_empty() {
                        Ok((cpu.softmax_kl(&s, &t, shape, &listed, scale, d)?, 0.0))
                    } else {
                        cpu.softmax_kl_ce(&s, &t, shape, &listed, &labels, scale, ce_scale, d)
                    }
                };
                let mut inc = vec![0.0; rows * vs];
                run_cpu(&c.cpu, &mut inc)?;
                let pre = c.prefill_like(rows * vs, &inc);
                let mut want = pre.clone();
                let (wkl, wce) = run_cpu(&c.cpu, &mut want)?;
                let mut d = c.up(&pre)?;
                let (su, tu) = (c.up(&s)?, c.up(&t)?);
                let (gkl, gce) = if labels.is_empty() {
                    (c.be.softmax_kl(&su, &tu, shape, &listed, scale, &mut d)?, 0.0)
                } else {
                    c.be.softmax_kl_ce(&su, &tu, shape, &listed, &labels, scale, ce_scale, &mut d)?
                };
                c.cmp_scalar(&format!("{case} loss"), gkl, wkl, TOL_F32);
                c.cmp_scalar(&format!("{case} CE"), gce, wce, TOL_F32);
                c.cmp_buf(&format!("{case} dstudent (accumulate)"), &d, &want, TOL_BF16)
            });
        }
    }
    c.case("softmax_kl bad rows are errors", |c| {
        let (s, t) = (c.up(&[0.0; 8])?, c.up(&[0.0; 8])?);
        let mut d = c.be.zeros(8)?;
        let shape = KlShape { student_vocab: 4, teacher_vocab: 4, kept: 4, temperature: 1.0, divergence: Divergence::Fkl };
        ensure!(c.be.softmax_kl(&s, &t, shape, &[2], 1.0, &mut d).is_err(), "a row out of range was accepted");
        ensure!(c.be.softmax_kl(&s, &t, shape, &[1, 1], 1.0, &mut d).is_err(), "a repeated row was accepted");
        Ok(())
    });
}

fn relation(c: &mut Ctx) {
    // (rows, student vocab, teacher vocab, kept, images)
    let cases: [(usize, usize, usize, usize, Vec<(u32, u32)>); 3] = [
        (25, 203, 211, 200, vec![(0, 5), (7, 1), (9, 12)]),
        (60, 1000, 1000, 1000, vec![(0, 16), (16, 16), (40, 16)]),
        (40, 4099, 4096, 4096, vec![(3, 37)]),
    ];
    for (rows, vs, vt, kept, images) in cases {
        let name = format!("relation {rows} rows Vs={vs} Vt={vt} kept={kept} images={images:?}");
        c.case(&name, |c| {
            let s = c.rand(rows * vs, -3.0, 3.0);
            // A teacher correlated with the student, so the cosine is not trivially near 1 or 0.
            let noise = c.rand(rows * vt, -3.0, 3.0);
            let t: Vec<f32> = (0..rows * vt)
                .map(|i| {
                    let (r, col) = (i / vt, i % vt);
                    r16(if col < vs { 0.5 * s[r * vs + col] + noise[i] } else { noise[i] })
                })
                .collect();
            let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: 1.0, divergence: Divergence::Fkl };
            let scale = 0.5;
            let mut inc = vec![0.0; rows * vs];
            let wl = c.cpu.relation_loss(&s, &t, shape, &images, scale, &mut inc)?;
            let pre = c.prefill_like(rows * vs, &inc);
            let mut want = pre.clone();
            c.cpu.relation_loss(&s, &t, shape, &images, scale, &mut want)?;
            let mut d = c.up(&pre)?;
            let gl = c.be.relation_loss(&c.up(&s)?, &c.up(&t)?, shape, &images, scale, &mut d)?;
            c.cmp_scalar(&format!("{name} loss"), gl, wl, TOL_RELATION_LOSS);
            c.cmp_buf(&format!("{name} dstudent (accumulate)"), &d, &want, TOL_BF16)
        });
    }
    // The identity form's cosine on bf16 Grams (the relation kernels' bf16 variants): loss into a
    // slot of the sums (added, not overwritten), gradient written over a NaN-poisoned buffer.
    for n in [7usize, 16, 45] {
        let name = format!("gram_cosine {n}×{n} bf16 Grams");
        c.case(&name, |c| {
            let rs: Vec<f32> = c.rand(n * n, -2.0, 2.0).into_iter().map(r16).collect();
            let noise = c.rand(n * n, -1.0, 1.0);
            let rt: Vec<f32> = rs.iter().zip(&noise).map(|(a, b)| r16(0.5 * a + b)).collect();
            let mut want = vec![0.0; n * n];
            let mut wsums = c.cpu.sums(2)?;
            c.cpu.gram_cosine_into(&rs, &rt, 0.5, &mut want, &mut wsums, 1)?;
            let (grs, grt) = (c.up(&rs)?, c.up(&rt)?);
            let mut g = c.poisoned(n * n)?;
            let mut sums = c.be.sums(2)?;
            for _ in 0..2 {
                c.be.gram_cosine_into(&grs, &grt, 0.5, &mut g, &mut sums, 1)?;
            }
            let got = c.be.read_sums(&sums)?;
            ensure!(got[0] == 0.0, "{name}: slot 0 was written ({})", got[0]);
            c.cmp_scalar(&format!("{name} loss, added twice"), got[1], 2.0 * wsums[1], TOL_RELATION_LOSS);
            c.cmp_buf(&format!("{name} gradient"), &g, &want, TOL_BF16)
        });
    }
    c.case("gram_cosine of a zero Gram: loss 1, zero gradient", |c| {
        let rt = c.rand(49, -1.0, 1.0);
        let mut g = c.poisoned(49)?;
        let mut sums = c.be.sums(1)?;
        c.be.gram_cosine_into(&c.up(&[0.0; 49])?, &c.up(&rt)?, 1.0, &mut g, &mut sums, 0)?;
        c.cmp_scalar("gram_cosine zero Gram loss", c.be.read_sums(&sums)?[0], 1.0, 0.0);
        c.cmp_buf("gram_cosine zero Gram gradient", &g, &[0.0; 49], 0.0)
    });
    c.case("relation overlapping images are an error", |c| {
        let (s, t) = (c.up(&[0.0; 40])?, c.up(&[0.0; 40])?);
        let mut d = c.be.zeros(40)?;
        let shape = KlShape { student_vocab: 4, teacher_vocab: 4, kept: 4, temperature: 1.0, divergence: Divergence::Fkl };
        ensure!(c.be.relation_loss(&s, &t, shape, &[(0, 5), (4, 2)], 1.0, &mut d).is_err(), "overlapping images were accepted");
        Ok(())
    });
}

fn adamw(c: &mut Ctx) {
    // Stochastic rounding draws the same noise as the CPU's `stochastic_round_bf16` (seed, step,
    // element index): one step from equal inputs must give the CPU's f32 update rounded with that
    // noise. A 1-ulp f32 difference in the update can flip a rounding (probability ~2⁻¹⁶ an
    // element), so up to 0.1 % of elements may differ by one bf16 ulp; a wrong key, hash or index
    // changes about half of them.
    for n in [1001usize, 40_009] {
        let name = format!("adamw n={n} stochastic rounding = CPU noise");
        c.case(&name, |c| {
            let p0 = c.rand(n, -1.0, 1.0);
            let g = c.rand(n, -1.0, 1.0);
            let h = AdamWStep { lr: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5, seed: 777 };
            let mut want = p0.clone();
            c.cpu.adamw(h, &mut want, &g, 0, &mut vec![0.0; n], &mut vec![0.0; n], None)?;
            let want: Vec<u16> = want.iter().enumerate().map(|(j, &x)| stochastic_round_bf16(x, h.seed, h.step, j as u64).to_bits()).collect();
            let mut gp = c.up(&p0)?;
            let (mut gm, mut gv) = (c.be.zeros_state(n)?, c.be.zeros_state(n)?);
            c.be.adamw(h, &mut gp, &c.up(&g)?, 0, &mut gm, &mut gv, None)?;
            let got: Vec<u16> = c.be.download(&gp)?.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            let far = got.iter().zip(&want).filter(|(&a, &b)| (a as i32 - b as i32).abs() > 1).count();
            let detail = if differ * 1000 > n || far > 0 {
                format!("{differ} of {n} parameters differ from the CPU's stochastic rounding ({far} by more than one ulp)")
            } else {
                String::new()
            };
            c.record(&name, differ as f64 / n as f64, 1e-3, detail);
            Ok(())
        });
    }
    // An optimizer piece of a larger tensor (ZeRO-1): only elements offset..offset+len change,
    // and the noise's element index counts from the piece's start.
    let (total, offset, len) = (5000usize, 1208usize, 3001usize);
    c.case("adamw piece at an offset", |c| {
        let p0 = c.rand(total, -1.0, 1.0);
        let g = c.rand(total, -1.0, 1.0);
        let h = AdamWStep { lr: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.5, seed: 99 };
        let mut want = p0.clone();
        c.cpu.adamw(h, &mut want, &g, offset, &mut vec![0.0; len], &mut vec![0.0; len], None)?;
        let want: Vec<u16> = want
            .iter()
            .enumerate()
            .map(|(j, &x)| (if (offset..offset + len).contains(&j) { stochastic_round_bf16(x, h.seed, h.step, (j - offset) as u64) } else { half::bf16::from_f32(x) }).to_bits())
            .collect();
        let mut gp = c.up(&p0)?;
        let (mut gm, mut gv) = (c.be.zeros_state(len)?, c.be.zeros_state(len)?);
        c.be.adamw(h, &mut gp, &c.up(&g)?, offset, &mut gm, &mut gv, None)?;
        let got: Vec<u16> = c.be.download(&gp)?.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
        let outside = got.iter().zip(&want).enumerate().filter(|(j, (a, b))| !(offset..offset + len).contains(j) && a != b).count();
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        let detail = if outside > 0 || differ * 1000 > len { format!("{differ} of {len} differ, {outside} outside the piece") } else { String::new() };
        c.record("adamw piece at an offset", differ as f64 / len as f64, 1e-3, detail);
        Ok(())
    });
    for n in [1usize, 7, 1001, 40_009] {
        for master in [false, true] {
            let name = format!("adamw n={n} master={master} 3 steps");
            c.case(&name, |c| {
                let p0 = c.rand(n, -1.0, 1.0);
                let (mut wp, mut wm, mut wv) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
                let mut wmaster = p0.clone();
                let mut gp = c.up(&p0)?;
                let (mut gm, mut gv) = (c.be.zeros_state(n)?, c.be.zeros_state(n)?);
                let mut gmaster = if master { Some(c.be.upload_state(&p0)?) } else { None };
                for step in 1..=3u64 {
                    let g = c.rand(n, -1.0, 1.0);
                    // lr large enough that the update shows above bf16 rounding of the parameters.
                    let h = AdamWStep { lr: 0.05, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step, grad_scale: 0.5, seed: 1234 };
                    if master {
                        c.cpu.adamw(h, &mut wp, &g, 0, &mut wm, &mut wv, Some(&mut wmaster))?;
                    } else {
                        c.cpu.adamw(h, &mut wp, &g, 0, &mut wm, &mut wv, None)?;
                        // The CUDA parameters are bf16, stochastically rounded every step: round the
                        // CPU's with the same noise, so both follow one trajectory (an unrounded f32
                        // one drifts by up to an ulp a step: over 1 % of a small value after three,
                        // which failed this check for some seeds at n = 1).
                        for (j, x) in wp.iter_mut().enumerate() {
                            *x = stochastic_round_bf16(*x, h.seed, h.step, j as u64).to_f32();
                        }
                    }
                    c.be.adamw(h, &mut gp, &c.up(&g)?, 0, &mut gm, &mut gv, gmaster.as_mut())?;
                }
                c.cmp_buf(&format!("{name} params (bf16)"), &gp, &wp, TOL_BF16)?;
                c.cmp_buf(&format!("{name} m (f32)"), &gm, &wm, TOL_F32)?;
                c.cmp_buf(&format!("{name} v (f32)"), &gv, &wv, TOL_F32)?;
                if let Some(ms) = &gmaster {
                    c.cmp_buf(&format!("{name} master (f32)"), ms, &wmaster, TOL_F32)?;
                }
                Ok(())
            });
        }
    }
}

/// What the driver refuses: launch configurations over the device's limits, shared memory over
/// 48 KiB without the attribute, unknown names. Each refusal must carry the driver's error code
/// and leave the context usable (checked by a correct launch at the end). On the simulated device
/// also what it checks beyond a real driver's reach: copies past a buffer or into a freed one,
/// and the NaN fill of fresh buffers. (A kernel writing out of bounds is sticky, so it is checked
/// on its own: [`out_of_bounds_write_is_caught`].)
fn driver_errors(c: &mut Ctx) {
    use cudarc::driver::result as dr;
    use cudarc::driver::sys::{CUfunction_attribute, CUresult};
    fn expect(c: &mut Ctx, name: &str, got: std::result::Result<(), dr::DriverError>, want: &[CUresult]) {
        let detail = match got {
            Ok(()) => format!("accepted; the driver refuses it with {want:?}"),
            Err(e) if want.contains(&e.0) => String::new(),
            Err(e) => format!("refused with {:?}, expected {want:?}", e.0),
        };
        c.record(name, 0.0, 0.0, detail);
    }
    let launch = |c: &mut Ctx, f, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32| -> Result<std::result::Result<(), dr::DriverError>> {
        let b = c.be.alloc(64, DType::Bf16)?;
        let (p, s, n) = (b.ptr(), 1.0f32, 64i64);
        let mut args = [&p as *const u64 as *mut std::ffi::c_void, &s as *const f32 as *mut _, &n as *const i64 as *mut _];
        c.be.gpu().bind()?;
        // SAFETY: scale_bf16(bf16*, float, long long) over a 64-element buffer; the grid-stride loop
        // stays inside it whatever the grid.
        Ok(unsafe { dr::launch_kernel(f, grid, block, smem, std::ptr::null_mut(), &mut args) })
    };
    use CUresult::{CUDA_ERROR_INVALID_VALUE as INVALID, CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES as RESOURCES, CUDA_ERROR_NOT_FOUND as NOT_FOUND};
    c.case("driver refusals", |c| {
        c.be.gpu().bind()?; // the context is current per thread; raw calls below need it
        let scale = c.be.gpu().func("elementwise", "scale_bf16")?;
        let r = launch(c, scale, (1, 1, 1), (1025, 1, 1), 0)?;
        expect(c, "a block of 1025 threads is refused", r, &[INVALID]);
        let r = launch(c, scale, (1, 1, 1), (32, 33, 1), 0)?;
        expect(c, "a block of 32×33 threads is refused", r, &[INVALID]);
        let r = launch(c, scale, (1, 65_536, 1), (32, 1, 1), 0)?;
        expect(c, "gridDim.y of 65536 is refused", r, &[INVALID]);
        let r = launch(c, scale, (1, 1, 1), (32, 1, 1), 64 << 10)?;
        expect(c, "64 KiB of dynamic shared memory without the attribute is refused", r, &[INVALID]);
        // SAFETY: a live function handle; the value is the point of the check.
        let r = unsafe { dr::function::set_function_attribute(scale, CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 300_000) };
        expect(c, "a dynamic shared memory attribute over the device's maximum is refused", r, &[INVALID]);
        // adamw_bf16 is declared __launch_bounds__(256).
        let adamw = c.be.gpu().func("adamw", "adamw_bf16")?;
        let r = launch(c, adamw, (1, 1, 1), (512, 1, 1), 0)?;
        expect(c, "512 threads for a kernel bounded to 256 are refused", r, &[INVALID, RESOURCES]);
        let missing = c.be.gpu().func("elementwise", "no_such_kernel").err().map(|e| format!("{e:#}")).unwrap_or_default();
        let detail = if missing.contains(&format!("{NOT_FOUND:?}")) { String::new() } else { format!("looking up a missing kernel gave: {missing:?}") };
        c.record("a missing kernel name is CUDA_ERROR_NOT_FOUND", 0.0, 0.0, detail);
        // The refusals left the context usable: a correct launch computes.
        let x = c.rand(1000, -2.0, 2.0);
        let mut b = c.up(&x)?;
        c.be.scale(&mut b, 0.5)?;
        let want: Vec<f32> = x.iter().map(|v| r16(v * 0.5)).collect();
        c.cmp_buf("a correct launch after the refusals", &b, &want, TOL_BF16)
    });
    c.case("refused kernel images", |c| {
        use super::device::{built_arches, built_cubins, KernelImage};
        // Each must be an error naming the module and the image; PTX the JIT refuses must carry
        // the driver's log (the simulated device also writes one for a damaged cubin).
        let expect_refusal = |c: &mut Ctx, name: &str, what: &str, bytes: &[u8], need_log: bool| {
            let err = c.be.gpu().load_module_image("elementwise", what, bytes).err().map(|e| format!("{e:#}"));
            let detail = match err {
                None => "loaded".to_string(),
                Some(e) if !e.contains("kernels/elementwise.cu") || !e.contains(what) => format!("the error names neither the module nor the image: {e:?}"),
                Some(e) if need_log && !e.split_once("driver's error log:").is_some_and(|(_, log)| !log.trim().is_empty()) => {
                    format!("the error carries no JIT log: {e:?}")
                }
                Some(_) => String::new(),
            };
            c.record(name, 0.0, 0.0, detail);
        };
        if let Some(mut cubin) = built_cubins().first().and_then(|sm| KernelImage::Cubin(sm).bytes("elementwise")) {
            // The ELF header after its identification bytes zeroed (machine, flags, section table):
            // the driver gets no length with an image, so a damaged header, not a shortened file,
            // is what it can detect without reading past the buffer.
            cubin[16..64].fill(0);
            let sim = super::sim::active();
            expect_refusal(c, "a cubin with a damaged header is refused", "a damaged cubin", &cubin, sim);
        }
        let arch = built_arches().first().copied().ok_or_else(|| anyhow!("this build has no PTX"))?;
        let ptx = KernelImage::Ptx(arch).bytes("elementwise").ok_or_else(|| anyhow!("no elementwise PTX for {arch}"))?;
        // PTX for a GPU that does not exist: the JIT refuses it whatever the device.
        let text = String::from_utf8_lossy(ptx.strip_suffix(&[0u8]).unwrap_or(&ptx));
        let mut bad: String = text.lines().map(|l| if l.starts_with(".target ") { ".target sm_990\n".to_string() } else { format!("{l}\n") }).collect();
        bad.push('\0');
        expect_refusal(c, "PTX for sm_990 is refused with the JIT's log", "PTX for sm_990", bad.as_bytes(), true);
        Ok(())
    });
    if !super::sim::active() {
        return;
    }
    c.case("simulated device: memory checks", |c| {
        let b = c.be.alloc(100, DType::Bf16)?;
        let r = c.be.gpu().htod(b.ptr(), &[0u16; 200]).err().map(|e| format!("{e:#}")).unwrap_or_default();
        let detail = if r.contains("CUDA_ERROR_INVALID_VALUE") { String::new() } else { format!("a 400-byte copy into a 200-byte buffer gave {r:?}") };
        c.record("simulated: a copy past the end of a buffer is refused", 0.0, 0.0, detail);
        let p = b.ptr();
        drop(b);
        let r = c.be.gpu().htod(p, &[0u16; 4]).err().map(|e| format!("{e:#}")).unwrap_or_default();
        let detail = if r.contains("CUDA_ERROR_INVALID_VALUE") { String::new() } else { format!("a copy into a freed buffer gave {r:?}") };
        c.record("simulated: a copy into a freed (cached) buffer is refused", 0.0, 0.0, detail);
        let fresh = c.be.alloc(1000, DType::F32)?;
        let v = c.be.download(&fresh)?;
        let nans = v.iter().filter(|x| x.is_nan()).count();
        let detail = if nans == v.len() { String::new() } else { format!("{} of {} elements of a fresh buffer are not NaN", v.len() - nans, v.len()) };
        c.record("simulated: a fresh buffer reads as NaN", 0.0, 0.0, detail);
        Ok(())
    });
}

/// On the simulated device only: a kernel that writes past its buffer is caught after its launch,
/// as an illegal address naming the kernel, and the error is sticky as on a GPU (every later call
/// fails: the backend is unusable afterwards, so this runs in a process of its own). Returns the
/// launch's error and the next synchronisation's.
pub fn out_of_bounds_write_is_caught(be: &CudaBackend) -> Result<(String, String)> {
    ensure!(super::sim::active(), "only the simulated device checks this (on a GPU it would poison the context)");
    let b = be.alloc(100, DType::Bf16)?;
    let (p, s, n) = (b.ptr(), 2.0f32, 130i64);
    let mut args = super::ops::args![p, s, n];
    // SAFETY (deliberately not): 130 elements of a 100-element buffer; the simulated device's
    // guard zones catch the write before anything else uses that memory.
    let launched = unsafe { be.gpu().launch("elementwise", "scale_bf16", (1, 1, 1), (256, 1, 1), 0, &mut args) };
    let launch_err = launched.err().map(|e| format!("{e:#}")).unwrap_or_default();
    let sync_err = be.synchronize().err().map(|e| format!("{e:#}")).unwrap_or_default();
    Ok((launch_err, sync_err))
}
