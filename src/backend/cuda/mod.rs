//! The CUDA backend: bf16 storage, fp32 accumulation, fp32 softmax/norm/loss statistics (SPEC §4).
//!
//! - Buffers ([`CudaBuf`]) are bf16 device allocations; the two statistics the op set saves for a
//!   backward, attention's log-sum-exp and RMSNorm's rstd, are kept in f32: the op that writes one
//!   turns the buffer it is given into an f32 buffer of the same length (once; a buffer reused
//!   from step to step stays f32). Optimizer state ([`Backend::State`]) is f32.
//! - GEMMs go through cuBLAS (`cublasGemmEx`, bf16 inputs, fp32 compute, bf16 or fp32 output).
//! - Every other op is a hand-written kernel from `kernels/*.cu`, compiled by `build.rs` to PTX
//!   and to cubins for sm_80 and sm_90a, and loaded once: the cubin the device runs, else the PTX
//!   (JIT-compiled by the driver). The launchers in this module check every
//!   length before launching, exactly as the CPU backend does, so a caller's mistake is an error
//!   here too rather than an out-of-bounds access on the device.
//! - Small index arrays (ids, positions, targets, sequence starts, rows) are uploaded through
//!   page-locked staging memory with asynchronous copies (no host wait), cached by content.
//! - Loss values stay on the device: each loss op sums its per-row values on the device (a fixed
//!   reduction order, so the bits do not depend on scheduling) into a slot of a [`CudaSums`],
//!   which the training step reads back once per optimizer step ([`Backend::read_sums`]).
//!
//! Ops and what they launch:
//!
//! | op | launches |
//! | --- | --- |
//! | gemm | cublasGemmEx |
//! | add_bias, bias_grad, add_assign, scale | elementwise.cu |
//! | embedding, embedding_backward, qkv_split_rope, qkv_merge_rope_backward, swiglu(_backward), gelu(_backward) | elementwise.cu |
//! | rmsnorm(_backward), layernorm | norm.cu |
//! | attention(_backward) | attention.cu (flash forward; backward preprocess + flash backward) |
//! | attention_decode | decode_attention.cu (split kernel; combine kernel when the positions were split) |
//! | cross_entropy | cross_entropy.cu, then `sum_into_f64_from_f32` (sums.cu) into the op's slot |
//! | softmax_kl(_ce) | `softmax_kl_bf16` (softmax_kl.cu) for fkl; `softmax_div_bf16` (same file) for the other divergences; then `sum_into_f64_from_f32` per loss |
//! | relation_loss | cuBLAS Grams (bf16 in, f32 out) → `relation_cosine_partials`, `relation_cosine_grad` (relation.cu; loss into its slot) → f32→bf16 → cuBLAS dZ += 2·G·Z |
//! | gram_cosine | `relation_cosine_partials_bf16`, `relation_cosine_grad_bf16` (relation.cu) |
//! | distill_rows | one `softmax_kl_bf16` / `softmax_div_bf16` launch over the fused head's chunk in write mode (per-row KL weights), then `sum_terms_into_f64` (sums.cu) |
//! | sum_squares | `sum_squares_bf16` (adamw.cu) partials, then `sum_into_f64_from_f64` (sums.cu) |
//! | adamw | `adamw_bf16` (adamw.cu) |

mod attn;
pub mod bench;
pub mod checks;
mod decode;
mod device;
pub mod nccl;
mod ops;
mod pool;
mod relation;
pub mod sim;

use std::sync::{Mutex, MutexGuard};

use anyhow::{anyhow, ensure, Result};

pub use device::{built_arches, built_cubins, fmt_bytes, kernels_built, probe, unavailable_reason};
use device::{DevMem, Gpu};
pub use device::KArg;
pub use pool::PoolStats;

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
}

/// A flat device buffer: bf16 for activations, weights and gradients; f32 for saved statistics
/// and optimizer state.
pub struct CudaBuf {
    mem: DevMem,
    len: usize,
    dtype: DType,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The device address (for launchers and benchmarks).
    pub fn ptr(&self) -> u64 {
        self.mem.ptr()
    }
    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.mem.bytes()
    }
}

/// f64 slots on the device that loss ops add their values to ([`Backend::Sums`]): read back once
/// per optimizer step instead of once per op.
pub struct CudaSums {
    mem: DevMem,
    n: usize,
}

impl CudaSums {
    /// The device address of slot `slot`, or an error naming `what`.
    pub(crate) fn slot(&self, what: &str, slot: usize) -> Result<u64> {
        crate::backend::check_slot(what, slot, self.n)?;
        Ok(self.mem.ptr() + 8 * slot as u64)
    }
}

/// A grow-only device scratch area; its lock is held for the duration of an op.
#[derive(Default)]
pub(crate) struct Arena {
    mem: Option<DevMem>,
}

/// Index arrays (token ids, positions, sequence offsets, targets) on the device, found again by
/// their contents. Why: a training step hands the same positions and sequence offsets to every
/// layer's RoPE and attention; uploading them once per step instead of once per op saves ~5
/// copies a layer. The uploads that remain are staged through page-locked memory and queued
/// ([`device::Gpu::htod_async`]), so none makes the host wait for the GPU. Entries are never written after their upload; the least recently
/// used goes back to the pool when the cache is full (the pool reuses it in stream order).
#[derive(Default)]
pub(crate) struct IdxCache {
    entries: Vec<(Vec<u8>, DevMem)>,
    uploads: u64,
}

const IDX_CACHE_ENTRIES: usize = 16;

/// The CUDA backend on one device.
pub struct CudaBackend {
    gpu: Gpu,
    /// Index arrays, uploaded once per distinct content.
    idx: Mutex<IdxCache>,
    /// f32 temporaries (per-row losses, Gram matrices).
    work: Mutex<Arena>,
}

/// The largest gridDim.y or gridDim.z a launch may use.
pub(crate) const GRID_YZ: usize = 65_535;

/// Rounds up to a multiple of 256 bytes (cuBLAS and vector loads like aligned sub-buffers).
pub(crate) fn align256(b: usize) -> usize {
    b.div_ceil(256) * 256
}

impl CudaBackend {
    /// Opens device 0 (`CUDA_VISIBLE_DEVICES` chooses which physical one).
    pub fn new() -> Result<Self> {
        Self::on_device(0)
    }

    pub fn on_device(ordinal: usize) -> Result<Self> {
        Ok(CudaBackend { gpu: Gpu::open(ordinal)?, idx: Mutex::new(IdxCache::default()), work: Mutex::new(Arena::default()) })
    }

    /// Device name, compute capability and the kernel image in use (`sm_90a cubin`, or
    /// `compute_80 PTX` where the driver JIT-compiled them).
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{}, {} SMs, {})", self.gpu.device_name, self.gpu.cc.0, self.gpu.cc.1, self.gpu.sm_count, self.gpu.image)
    }

    pub fn device_name(&self) -> &str {
        &self.gpu.device_name
    }

    /// (current, peak) bytes of kd-engine's live device buffers (requests rounded up to 512 B,
    /// as PyTorch's `memory_allocated` counts them).
    pub fn mem_stats(&self) -> (usize, usize) {
        let s = self.gpu.pool_stats();
        (s.in_use, s.peak_in_use)
    }

    /// The caching pool's counts: bytes in use and reserved, driver calls, reuses.
    pub fn pool_stats(&self) -> PoolStats {
        self.gpu.pool_stats()
    }

    /// Resets the peaks of [`Self::mem_stats`] to the present values.
    pub fn reset_peak(&self) {
        self.gpu.pool.reset_peaks()
    }

    /// (free, total) device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.gpu.mem_info()
    }

    /// Waits for all issued work and reports any asynchronous fault.
    pub fn synchronize(&self) -> Result<()> {
        self.gpu.sync()
    }

    pub(crate) fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// An uninitialised buffer.
    pub fn alloc(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let bytes = len.checked_mul(dtype.size()).ok_or_else(|| anyhow!("buffer of {len} elements overflows"))?;
        Ok(CudaBuf { mem: self.gpu.alloc(bytes)?, len, dtype })
    }

    /// A zero-filled buffer.
    pub fn zeros_of(&self, len: usize, dtype: DType) -> Result<CudaBuf> {
        let b = self.alloc(len, dtype)?;
        self.gpu.memset_u8(b.ptr(), 0, b.bytes())?;
        Ok(b)
    }

    /// Fills a buffer with NaN (tests poison outputs before each launch).
    pub fn fill_nan(&self, b: &mut CudaBuf) -> Result<()> {
        match b.dtype {
            DType::Bf16 => self.gpu.memset_u16(b.ptr(), 0x7FC0, b.len),
            DType::F32 => self.gpu.memset_u32(b.ptr(), 0x7FC0_0000, b.len),
        }
    }

    /// Fills a buffer with uniform random values in [lo, hi) on the device (a counter hash of
    /// `seed` and the index: the same values every run).
    pub fn fill_uniform(&self, b: &mut CudaBuf, seed: u64, lo: f32, hi: f32) -> Result<()> {
        let (p, n) = (b.ptr(), b.len as i64);
        let name = match b.dtype {
            DType::Bf16 => "fill_uniform_bf16",
            DType::F32 => "fill_uniform_f32",
        };
        let mut args = ops::args![p, n, seed, lo, hi];
        // SAFETY: the buffer holds n elements of the kernel's type.
        unsafe { self.gpu.launch("elementwise", name, self.grid1d(b.len), (256, 1, 1), 0, &mut args) }
    }

    /// A grid for grid-stride loops over `n` elements, 256 threads a block.
    pub(crate) fn grid1d(&self, n: usize) -> (u32, u32, u32) {
        let blocks = n.div_ceil(256).clamp(1, (self.gpu.sm_count.max(1) as usize) * 64);
        (blocks as u32, 1, 1)
    }

    /// Locks `arena` and makes it at least `bytes` long; returns the guard and the address.
    fn arena<'a>(&self, arena: &'a Mutex<Arena>, bytes: usize) -> Result<(MutexGuard<'a, Arena>, u64)> {
        let mut g = arena.lock().map_err(|_| anyhow!("CUDA scratch lock poisoned"))?;
        let have = g.mem.as_ref().map_or(0, |m| m.bytes());
        if have < bytes.max(1) {
            // Kernels still in flight may read the old area; its block goes back to the pool,
            // which hands it out again only to work queued after them on the same stream.
            g.mem = None;
            g.mem = Some(self.gpu.alloc(bytes.max(4096).max(have * 2))?);
        }
        let p = g.mem.as_ref().map(|m| m.ptr()).unwrap_or(0);
        Ok((g, p))
    }

    /// The device address of `data`, uploaded unless the cache holds the same contents. The
    /// guard keeps the entry in place until the op has launched (one upload per op: a second
    /// call while the guard is held would wait on itself).
    pub(crate) fn upload_idx<T: bytemuck::Pod>(&self, data: &[T]) -> Result<(MutexGuard<'_, IdxCache>, u64)> {
        let mut g = self.idx.lock().map_err(|_| anyhow!("CUDA index cache lock poisoned"))?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let p = match g.entries.iter().position(|(b, _)| b == bytes) {
            Some(i) => {
                let e = g.entries.remove(i);
                let p = e.1.ptr();
                g.entries.push(e);
                p
            }
            None => {
                // At least 4 bytes: kernels get a valid address even for an empty array.
                let mem = self.gpu.alloc(bytes.len().max(4))?;
                self.gpu.htod_async(mem.ptr(), bytes)?;
                let p = mem.ptr();
                if g.entries.len() == IDX_CACHE_ENTRIES {
                    g.entries.remove(0);
                }
                g.entries.push((bytes.to_vec(), mem));
                g.uploads += 1;
                p
            }
        };
        Ok((g, p))
    }

    /// How many index arrays were copied to the device (cache misses) so far.
    pub fn index_uploads(&self) -> u64 {
        self.idx.lock().map(|g| g.uploads).unwrap_or(0)
    }

    /// f32 work space of `len` elements (uninitialised); the guard keeps it alive.
    pub(crate) fn work_f32(&self, len: usize) -> Result<(MutexGuard<'_, Arena>, u64)> {
        self.arena(&self.work, len * 4)
    }

    /// `*slot += Σ values[..n]` on the device (f32 values, e.g. per-row losses), in a fixed order.
    pub(crate) fn add_sum_f32(&self, values: u64, n: usize, slot: u64) -> Result<()> {
        self.add_sum("sum_into_f64_from_f32", values, n, slot)
    }

    /// `*slot += Σ values[..n]` on the device (f64 values, e.g. per-block partial sums).
    pub(crate) fn add_sum_f64(&self, values: u64, n: usize, slot: u64) -> Result<()> {
        self.add_sum("sum_into_f64_from_f64", values, n, slot)
    }

    fn add_sum(&self, kernel: &'static str, values: u64, n: usize, slot: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let nn = n as i64;
        let mut a = ops::args![values, nn, slot];
        // SAFETY: values holds n elements of the kernel's type; slot is one f64 of a live CudaSums.
        unsafe { self.gpu.launch("sums", kernel, (1, 1, 1), (256, 1, 1), 0, &mut a) }
    }

    pub(crate) fn download_f32_raw(&self, ptr: u64, len: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; len];
        self.gpu.dtoh(&mut out, ptr)?;
        Ok(out)
    }
}

/// bf16 address of a buffer, or an error naming it.
pub(crate) fn bf(b: &CudaBuf, what: &str) -> Result<u64> {
    ensure!(b.dtype == DType::Bf16, "cuda backend: {what} is an f32 buffer where bf16 is expected");
    Ok(b.ptr())
}

/// f32 address of a buffer, or an error naming it.
pub(crate) fn f32p(b: &CudaBuf, what: &str) -> Result<u64> {
    ensure!(b.dtype == DType::F32, "cuda backend: {what} is a bf16 buffer where f32 is expected");
    Ok(b.ptr())
}

pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    ensure!(got == want, "cuda backend: {what} has {got} elements, expected {want}");
    Ok(())
}

/// Host f32 → bf16 bits, round to nearest even (as the kernels' `__float2bfloat16`).
pub(crate) fn to_bf16_bits(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
}

/// Largest value that fits a kernel's `int` argument.
pub(crate) fn int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| anyhow!("cuda backend: {what} = {x} exceeds the kernels' 32-bit range"))
}
