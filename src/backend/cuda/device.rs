//! The CUDA device layer under the backend: detection that never panics, the context and stream,
//! device memory with out-of-memory errors that say what was asked and what is free, the kernel
//! modules (loaded once: the embedded cubin the device runs, else PTX for the driver to JIT),
//! kernel launches, cuBLAS and events.
//!
//! Everything goes through cudarc's `result`/`sys` layers (the driver API, loaded at run time), so
//! every return code is checked here and turned into an error that names the call. All work is
//! issued on the context's legacy default stream: copies from the host are then ordered with the
//! kernels before and after them, which keeps per-call uploads of small index arrays simple.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::result::{self as dr, DriverError};
use cudarc::driver::{sys, CudaContext};

use super::pool::{Block, Pool, PoolStats, RawMemory};
use super::sim;

#[cfg(kd_kernels)]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
#[cfg(not(kd_kernels))]
mod ptx {
    pub const PTX: &[(&str, &str, &str)] = &[];
    pub const CUBIN: &[(&str, &str, &[u8])] = &[];
}

/// Whether this build has the CUDA kernels (nvcc was found at build time).
pub fn kernels_built() -> bool {
    cfg!(kd_kernels)
}

/// The arches this build has PTX for.
pub fn built_arches() -> Vec<&'static str> {
    let mut a: Vec<&str> = ptx::PTX.iter().map(|(_, arch, _)| *arch).collect();
    a.sort_unstable();
    a.dedup();
    a
}

/// The SM versions this build has cubins (machine code) for.
pub fn built_cubins() -> Vec<&'static str> {
    let mut a: Vec<&str> = ptx::CUBIN.iter().map(|(_, sm, _)| *sm).collect();
    a.sort_unstable();
    a.dedup();
    a
}

/// One embedded image of a kernel module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelImage {
    /// Machine code for an SM version (`sm_90a`): the driver loads it as is.
    Cubin(&'static str),
    /// PTX for a virtual arch (`compute_80`): the driver JIT-compiles it at load (seconds).
    Ptx(&'static str),
}

impl std::fmt::Display for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelImage::Cubin(sm) => write!(f, "{sm} cubin"),
            KernelImage::Ptx(arch) => write!(f, "{arch} PTX"),
        }
    }
}

impl KernelImage {
    /// The embedded bytes of `module` in this image (PTX with its terminating NUL, as the driver
    /// reads PTX up to it), or `None` when this build lacks it.
    pub fn bytes(self, module: &str) -> Option<Vec<u8>> {
        match self {
            KernelImage::Cubin(sm) => ptx::CUBIN.iter().find(|(m, s, _)| *m == module && *s == sm).map(|(_, _, b)| b.to_vec()),
            KernelImage::Ptx(arch) => ptx::PTX.iter().find(|(m, a, _)| *m == module && *a == arch).map(|(_, _, t)| {
                let mut b = t.as_bytes().to_vec();
                b.push(0);
                b
            }),
        }
    }
}

/// The kernel modules of this build (`kernels/<module>.cu`).
pub fn built_modules() -> Vec<&'static str> {
    let mut m: Vec<&str> = ptx::PTX.iter().map(|(name, _, _)| *name).collect();
    m.sort_unstable();
    m.dedup();
    m
}

/// Finds a usable CUDA device without ever panicking: the driver library must load (cudarc
/// panics on a missing libcuda, so that is checked first), `cuInit` must succeed and report at
/// least one device. Returns the number of devices or why there is none.
pub fn probe() -> std::result::Result<usize, String> {
    // KD_CUDA_SIM=1: the simulated device takes the driver's place before cudarc looks for it.
    sim::activate()?;
    // SAFETY: is_culib_present only tries to open the library by its candidate names.
    let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err("no CUDA driver library (libcuda) was found".into());
    }
    let counted = std::panic::catch_unwind(|| -> std::result::Result<i32, String> {
        dr::init().map_err(|e| format!("cuInit failed: {e}"))?;
        dr::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))
    });
    match counted {
        Ok(Ok(n)) if n > 0 => Ok(n as usize),
        Ok(Ok(_)) => Err("the CUDA driver reports no device".into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the CUDA driver library could not be used (a symbol is missing: driver older than this build's CUDA API?)".into()),
    }
}

/// Why `--device cuda` cannot run here, or `None` when it can.
pub fn unavailable_reason() -> Option<String> {
    if !kernels_built() {
        return Some(
            "this kd-engine was built without kernels (nvcc was not found at build time: set NVCC or CUDA_HOME and rebuild)".into(),
        );
    }
    probe().err().map(|e| format!("no CUDA device: {e}"))
}

fn cu(what: &str) -> impl FnOnce(DriverError) -> anyhow::Error + '_ {
    move |e| anyhow!("CUDA error in {what}: {e}")
}

fn blas_err(what: &str) -> impl FnOnce(blas_result::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLAS error in {what}: {e}")
}

/// Human-readable bytes.
pub fn fmt_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{} bytes", b as u64)
    }
}

/// The driver's allocator under the pool: `cuMemAlloc`/`cuMemFree` in this context.
pub(crate) struct DriverMemory {
    ctx: Arc<CudaContext>,
}

impl RawMemory for DriverMemory {
    fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
        self.ctx.bind_to_thread().map_err(cu("binding the CUDA context to this thread"))?;
        // SAFETY: plain allocation; the memory is uninitialised until written.
        match unsafe { dr::malloc_sync(bytes) } {
            Ok(ptr) => Ok(Some(ptr)),
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Ok(None),
            Err(e) => Err(anyhow!("CUDA error in cuMemAlloc of {bytes} bytes: {e}")),
        }
    }

    fn free(&self, ptr: u64, _bytes: usize) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: ptr came from cuMemAlloc in this context and is freed once (the pool hands
            // a block back to the driver only from its cache, never while a buffer holds it).
            let _ = unsafe { dr::free_sync(ptr) };
        }
    }

    fn quiesce(&self) {
        if self.ctx.bind_to_thread().is_ok() {
            // An error here is an earlier launch's fault; the next sync reports it.
            let _ = dr::ctx::synchronize();
        }
    }
}

pub(crate) type DevicePool = Pool<DriverMemory>;

/// One device buffer: a block of the caching pool, returned to it on drop.
pub struct DevMem {
    ptr: sys::CUdeviceptr,
    /// The bytes asked for; the block behind it may be larger.
    bytes: usize,
    /// The pool's block and the pool (none for an empty buffer).
    block: Option<(Block, Arc<DevicePool>)>,
}

impl DevMem {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if let Some((block, pool)) = self.block.take() {
            sim::reclaim(block.ptr);
            pool.free(block);
        }
    }
}

/// One kernel argument: the address of a host value and its size (checked against the PTX).
pub struct KArg {
    ptr: *mut c_void,
    size: usize,
}

impl KArg {
    /// The argument `x` (its address must stay valid until the launch call returns).
    pub fn of<T: Copy>(x: &T) -> KArg {
        KArg { ptr: x as *const T as *mut c_void, size: std::mem::size_of::<T>() }
    }
}

/// The parameter sizes in bytes of every `.entry` of a PTX module: what a launch must pass.
pub fn ptx_param_sizes(ptx: &str) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut rest = ptx;
    while let Some(i) = rest.find(".entry ") {
        rest = &rest[i + ".entry ".len()..];
        let open = match rest.find('(') {
            Some(o) => o,
            None => break,
        };
        let name = rest[..open].trim().to_string();
        let close = match rest[open..].find(')') {
            Some(c) => open + c,
            None => break,
        };
        let sizes = rest[open + 1..close]
            .split(',')
            .filter(|p| p.contains(".param"))
            .map(|p| {
                let toks: Vec<&str> = p.split_whitespace().collect();
                let mut k = toks.iter().position(|t| *t == ".param").map_or(0, |x| x + 1);
                if toks.get(k) == Some(&".align") {
                    k += 2;
                }
                let ty = toks.get(k).copied().unwrap_or("");
                let bits: usize = ty.trim_start_matches(|c: char| c == '.' || c.is_ascii_alphabetic()).parse().unwrap_or(0);
                // `.b8 name[N]`: an aggregate of N bytes.
                let array = toks.last().and_then(|t| t.split_once('[')).and_then(|(_, n)| n.trim_end_matches(']').parse::<usize>().ok());
                match array {
                    Some(n) => n * bits.max(8) / 8,
                    None => bits / 8,
                }
            })
            .collect();
        out.push((name, sizes));
        rest = &rest[close..];
    }
    out
}

#[derive(Clone, Copy)]
struct Func(sys::CUfunction);
// SAFETY: a CUfunction is a handle valid in every thread bound to its context.
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

/// Page-locked host memory (cuMemHostAlloc), freed on drop.
struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: plain host memory; every access goes through the staging lock.
unsafe impl Send for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc, freed once, after the host waited for the copies
            // out of it (see Staging).
            let _ = unsafe { dr::free_host(self.ptr as *mut c_void) };
        }
    }
}

/// Where uploads are staged so that they are asynchronous: a copy from pageable memory makes the
/// host wait for the device's queue (a host sync per upload), a copy from page-locked memory does
/// not. The bytes a queued copy reads must stay untouched until it has run, so the buffer is
/// filled front to back and only reused after the host has waited for the stream anyway (every
/// [`Gpu::sync`] and [`Gpu::dtoh`]: the once-per-step read-back). An upload that does not fit
/// moves to a buffer twice as large; the old one is kept until that wait.
#[derive(Default)]
struct Staging {
    buf: Option<Pinned>,
    used: usize,
    retired: Vec<Pinned>,
}

/// Uploads larger than this go through the synchronous path (weights at load): staging them would
/// grow the page-locked buffer to their size.
const STAGING_MAX: usize = 64 << 20;

/// A CUDA event for timing.
pub struct Event {
    ev: sys::CUevent,
    ctx: Arc<CudaContext>,
}

impl Drop for Event {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created by cuEventCreate, destroyed once.
            let _ = unsafe { dr::event::destroy(self.ev) };
        }
    }
}

/// The device: context, stream, modules, cuBLAS.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    stream: sys::CUstream,
    blas: blas_sys::cublasHandle_t,
    modules: Vec<(&'static str, sys::CUmodule)>,
    funcs: Mutex<HashMap<(&'static str, &'static str), Func>>,
    /// Parameter sizes of every kernel, from the PTX: launches are checked against them.
    sigs: HashMap<String, Vec<usize>>,
    pub device_name: String,
    pub cc: (i32, i32),
    /// The kernel images loaded, e.g. `sm_90a cubin` or `compute_80 PTX`.
    pub image: String,
    pub sm_count: i32,
    /// Every device buffer comes from this cache (see `pool.rs`).
    pub(crate) pool: Arc<DevicePool>,
    /// Synchronise after every launch (`KD_CUDA_SYNC=1`), so an asynchronous fault is reported at
    /// the launch that caused it.
    sync_each: bool,
    /// Page-locked memory for asynchronous uploads.
    staging: Mutex<Staging>,
}

// SAFETY: the raw handles (stream, cuBLAS handle, modules) are used only after binding the
// context to the calling thread; cuBLAS calls are serialised by the `&self` methods below being
// issued on one stream (cuBLAS handles are thread-safe for use with one stream).
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = dr::ctx::synchronize();
            // SAFETY: created in `open`, destroyed once.
            unsafe {
                let _ = blas_result::destroy_handle(self.blas);
                for (_, m) in &self.modules {
                    let _ = dr::module::unload(*m);
                }
            }
        }
    }
}

/// Picks the cubin for a device: the exact `sm_XYa` or `sm_XY` when built, else the newest plain
/// `sm_XZ` of the same major version with Z ≤ Y (machine code runs on later minor versions of its
/// major; arch-specific `a` code only on its own version).
fn pick_cubin(cc: (i32, i32), available: &[&'static str]) -> Option<&'static str> {
    let exact = [format!("sm_{}{}a", cc.0, cc.1), format!("sm_{}{}", cc.0, cc.1)];
    if let Some(a) = exact.iter().find_map(|e| available.iter().find(|a| **a == e.as_str())) {
        return Some(a);
    }
    available
        .iter()
        .filter_map(|a| {
            let v: i32 = a.strip_prefix("sm_")?.parse().ok()?;
            (v / 10 == cc.0 && v % 10 <= cc.1).then_some((v, *a))
        })
        .max()
        .map(|(_, a)| a)
}

/// Loads one module image through cuModuleLoadDataEx with an error-log buffer, so a refused image
/// (PTX the JIT rejects, a cubin for another GPU, a damaged file) is an error that names the module
/// and carries the driver's log.
fn load_image(module: &str, what: &str, bytes: &[u8]) -> Result<sys::CUmodule> {
    const LOG_BYTES: usize = 16 << 10;
    // 8-byte aligned: embedded bytes have no alignment, and an ELF image is read as 64-bit fields.
    let mut image = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `image` holds at least bytes.len() bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), image.as_mut_ptr() as *mut u8, bytes.len()) };
    let mut log = vec![0u8; LOG_BYTES];
    let mut options = [sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER, sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
    // The size option's value is the number itself, passed in the pointer slot (the API's convention).
    let mut values: [*mut c_void; 2] = [log.as_mut_ptr() as *mut c_void, LOG_BYTES as *mut c_void];
    let mut module_handle: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: a complete image (PTX NUL-terminated by KernelImage::bytes); the log buffer outlives
    // the call and its size is the one given.
    let r = unsafe { sys::cuModuleLoadDataEx(&mut module_handle, image.as_ptr() as *const c_void, 2, options.as_mut_ptr(), values.as_mut_ptr()) };
    match r.result() {
        Ok(()) => Ok(module_handle),
        Err(e) => {
            let n = log.iter().position(|&b| b == 0).unwrap_or(LOG_BYTES);
            let text = String::from_utf8_lossy(&log[..n]);
            let text = text.trim();
            let log = if text.is_empty() { "the driver's error log is empty".to_string() } else { format!("driver's error log:\n{text}") };
            bail!("loading kernels/{module}.cu ({what}): {e}; {log}")
        }
    }
}

/// Picks the PTX arch for a device: the exact `compute_XYa` when built (Hopper's wgmma needs
/// 90a, which loads only on 9.0), else the newest plain `compute_XY` not above the device.
fn pick_arch(cc: (i32, i32), available: &[&'static str]) -> Option<&'static str> {
    let dev = cc.0 * 10 + cc.1;
    let exact = format!("compute_{dev}a");
    if let Some(a) = available.iter().find(|a| **a == exact) {
        return Some(a);
    }
    available
        .iter()
        .filter_map(|a| {
            let num = a.strip_prefix("compute_")?;
            if num.ends_with('a') || num.ends_with('f') {
                return None;
            }
            let v: i32 = num.parse().ok()?;
            (v <= dev).then_some((v, *a))
        })
        .max()
        .map(|(_, a)| a)
}

impl Gpu {
    /// Opens device `ordinal`: context, cuBLAS, and the PTX modules for its arch.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if let Some(why) = unavailable_reason() {
            bail!("--device cuda: {why}");
        }
        // SAFETY: only opens the library by name.
        ensure!(
            std::panic::catch_unwind(|| unsafe { blas_sys::is_culib_present() }).unwrap_or(false),
            "--device cuda: the CUDA driver is present but cuBLAS (libcublas) was not found; install the CUDA toolkit's cuBLAS or add its folder to LD_LIBRARY_PATH"
        );
        let ctx = CudaContext::new(ordinal).map_err(cu("creating the CUDA context"))?;
        let device_name = ctx.name().map_err(cu("cuDeviceGetName"))?;
        let cc = ctx.compute_capability().map_err(cu("reading the compute capability"))?;
        ensure!(cc.0 >= 8, "{device_name} has compute capability {}.{}; kd-engine's bf16 kernels need 8.0 or newer", cc.0, cc.1);
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cu("reading the multiprocessor count"))?;
        let blas = blas_result::create_handle().map_err(blas_err("cublasCreate"))?;
        let stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: a fresh handle and the legacy default stream.
        unsafe { blas_result::set_stream(blas, stream as _) }.map_err(blas_err("cublasSetStream"))?;
        let sync_each = std::env::var("KD_CUDA_SYNC").is_ok_and(|v| v == "1");
        let pool = Arc::new(Pool::new(DriverMemory { ctx: ctx.clone() }));
        let mut gpu = Gpu {
            ctx,
            stream,
            blas,
            modules: Vec::new(),
            funcs: Mutex::new(HashMap::new()),
            sigs: HashMap::new(),
            device_name,
            cc,
            image: String::new(),
            sm_count,
            pool,
            sync_each,
            staging: Mutex::new(Staging::default()),
        };
        gpu.load_kernels()?;
        Ok(gpu)
    }

    /// Loads every kernel module: the cubin the device runs when this build has one, else (or
    /// when the driver refuses the cubin) the PTX, which the driver JIT-compiles. A module loaded
    /// before an error is unloaded by `Drop`.
    fn load_kernels(&mut self) -> Result<()> {
        let (cc, device_name) = (self.cc, self.device_name.clone());
        let (cubins, arches) = (built_cubins(), built_arches());
        let images: Vec<KernelImage> =
            pick_cubin(cc, &cubins).map(KernelImage::Cubin).into_iter().chain(pick_arch(cc, &arches).map(KernelImage::Ptx)).collect();
        ensure!(
            !images.is_empty(),
            "{device_name} (compute capability {}.{}) has no kernel image in this build (cubins for {}; PTX for {}); rebuild with KD_CUDA_ARCH including compute_80",
            cc.0,
            cc.1,
            if cubins.is_empty() { "none".to_string() } else { cubins.join(", ") },
            arches.join(", ")
        );
        let mut used: Vec<(KernelImage, Vec<&'static str>)> = Vec::new();
        for module in built_modules() {
            // The signatures are the same in every arch's PTX (checked by a unit test below).
            if let Some((_, _, text)) = ptx::PTX.iter().find(|(m, _, _)| *m == module) {
                self.sigs.extend(ptx_param_sizes(text));
            }
            let mut refused = Vec::new();
            let mut loaded = None;
            for image in &images {
                let Some(bytes) = image.bytes(module) else { continue };
                match load_image(module, &format!("{image} on {device_name}"), &bytes) {
                    Ok(m) => {
                        loaded = Some((m, *image));
                        break;
                    }
                    Err(e) => refused.push(format!("{e:#}")),
                }
            }
            let Some((m, image)) = loaded else {
                bail!("{} (a driver older than the nvcc that built the kernels refuses their images)", refused.join("\n"));
            };
            if !refused.is_empty() {
                eprintln!("kd-engine: {}\nkd-engine: JIT-compiling kernels/{module}.cu from its {image} instead", refused.join("\n"));
            }
            self.modules.push((module, m));
            match used.iter_mut().find(|(i, _)| *i == image) {
                Some((_, ms)) => ms.push(module),
                None => used.push((image, vec![module])),
            }
        }
        self.image = match &used[..] {
            [(image, _)] => image.to_string(),
            _ => used.iter().map(|(i, ms)| format!("{i} for {}", ms.join(", "))).collect::<Vec<_>>().join("; "),
        };
        Ok(())
    }

    /// Loads `bytes` as kernel module `module` (`what` says which image, for the error), outside
    /// the set the device uses: for the checks that a refused image is a clear error.
    pub(crate) fn load_module_image(&self, module: &str, what: &str, bytes: &[u8]) -> Result<()> {
        self.bind()?;
        let m = load_image(module, what, bytes)?;
        // SAFETY: loaded just above and used by nothing else.
        unsafe { dr::module::unload(m) }.map_err(cu("cuModuleUnload"))
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cu("binding the CUDA context to this thread"))
    }

    /// Waits for all issued work; reports faults of earlier asynchronous launches.
    pub fn sync(&self) -> Result<()> {
        self.bind()?;
        dr::ctx::synchronize().map_err(cu("cuCtxSynchronize (an error here comes from an earlier asynchronous launch)"))?;
        self.drained();
        Ok(())
    }

    /// The host has waited for all issued work: every queued upload has read its staged bytes.
    fn drained(&self) {
        if let Ok(mut st) = self.staging.lock() {
            st.used = 0;
            st.retired.clear();
        }
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        dr::mem_get_info().map_err(cu("cuMemGetInfo"))
    }

    /// Allocates `bytes` (uninitialised) from the caching pool. Out of memory is an error that
    /// says what was asked and what is free.
    pub fn alloc(&self, bytes: usize) -> Result<DevMem> {
        if bytes == 0 {
            return Ok(DevMem { ptr: 0, bytes: 0, block: None });
        }
        match self.pool.alloc(bytes)? {
            Some(block) => {
                sim::lend(block.ptr, bytes);
                Ok(DevMem { ptr: block.ptr, bytes, block: Some((block, self.pool.clone())) })
            }
            None => {
                self.bind()?;
                let (free, total) = dr::mem_get_info().unwrap_or((0, 0));
                let held = self.pool.stats().in_use;
                bail!(
                    "CUDA out of memory on {}: asked for {} ({bytes} bytes), {} free of {} (kd-engine's buffers hold {})",
                    self.device_name,
                    fmt_bytes(bytes),
                    fmt_bytes(free),
                    fmt_bytes(total),
                    fmt_bytes(held)
                )
            }
        }
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Host → device, synchronous for the host (the host slice may be dropped on return).
    pub fn htod<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst points at ≥ size_of_val(src) bytes (callers size it from src).
        unsafe { dr::memcpy_htod_sync(dst, src) }.map_err(cu("cuMemcpyHtoD"))
    }

    /// Host → device without making the host wait: `src` is copied into page-locked staging
    /// memory and the copy is queued on the stream (see [`Staging`]); `src` may be dropped on
    /// return. Larger than [`STAGING_MAX`]: the synchronous [`Gpu::htod`].
    pub fn htod_async(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        if src.len() > STAGING_MAX {
            return self.htod(dst, src);
        }
        self.bind()?;
        let mut st = self.staging.lock().map_err(|_| anyhow!("CUDA staging lock poisoned"))?;
        let have = st.buf.as_ref().map_or(0, |b| b.bytes);
        if st.used + src.len() > have {
            let bytes = (2 * have).max(src.len()).max(1 << 20).next_power_of_two();
            // SAFETY: plain page-locked allocation, written before any copy reads it.
            let ptr = unsafe { dr::malloc_host(bytes, 0) }
                .map_err(|e| anyhow!("CUDA error in cuMemHostAlloc of {} of page-locked staging memory: {e}", fmt_bytes(bytes)))?;
            let fresh = Pinned { ptr: ptr as *mut u8, bytes, ctx: self.ctx.clone() };
            if let Some(old) = st.buf.replace(fresh) {
                st.retired.push(old);
            }
            st.used = 0;
        }
        let at = st.used;
        let Some(buf) = st.buf.as_ref() else { bail!("CUDA staging buffer missing after its allocation") };
        // SAFETY: [at, at + len) lies inside the buffer (checked above) and no queued copy reads
        // it (bytes are reused only after the host waited for the stream).
        let staged = unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), buf.ptr.add(at), src.len());
            std::slice::from_raw_parts(buf.ptr.add(at), src.len())
        };
        // SAFETY: dst points at ≥ src.len() bytes (callers size it from src); the staged bytes
        // outlive the copy (see above).
        unsafe { dr::memcpy_htod_async(dst, staged, self.stream) }.map_err(cu("cuMemcpyHtoDAsync"))?;
        // 16-byte steps keep every staged array aligned for any element type.
        st.used = at + src.len().next_multiple_of(16);
        Ok(())
    }

    /// Device → host; waits for the work before it, so asynchronous faults surface here.
    pub fn dtoh<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: src points at ≥ size_of_val(dst) bytes.
        unsafe { dr::memcpy_dtoh_sync(dst, src) }
            .map_err(cu("cuMemcpyDtoH (an error here may come from an earlier asynchronous launch)"))?;
        self.drained();
        Ok(())
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges were bounds-checked by the caller.
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream) }.map_err(cu("cuMemcpyDtoDAsync"))
    }

    pub fn memset_u8(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: bounds checked by the caller.
        unsafe { dr::memset_d8_async(dst, value, bytes, self.stream) }.map_err(cu("cuMemsetD8Async"))
    }

    pub fn memset_u16(&self, dst: u64, value: u16, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: bounds checked by the caller.
        unsafe { sys::cuMemsetD16Async(dst, value, count, self.stream) }.result().map_err(cu("cuMemsetD16Async"))
    }

    pub fn memset_u32(&self, dst: u64, value: u32, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: bounds checked by the caller.
        unsafe { sys::cuMemsetD32Async(dst, value, count, self.stream) }.result().map_err(cu("cuMemsetD32Async"))
    }

    pub(crate) fn func(&self, module: &'static str, name: &'static str) -> Result<sys::CUfunction> {
        let mut funcs = self.funcs.lock().map_err(|_| anyhow!("kernel table lock poisoned"))?;
        if let Some(f) = funcs.get(&(module, name)) {
            return Ok(f.0);
        }
        let m = self
            .modules
            .iter()
            .find(|(n, _)| *n == module)
            .map(|(_, m)| *m)
            .ok_or_else(|| anyhow!("kernel module {module} is not in this build (kernels/{module}.cu)"))?;
        let c = CString::new(name).map_err(|_| anyhow!("kernel name {name:?} holds a NUL byte"))?;
        // SAFETY: a loaded module.
        let f = unsafe { dr::module::get_function(m, c) }
            .map_err(|e| anyhow!("kernel {name} not found in kernels/{module}.cu ({}): {e}", self.image))?;
        funcs.insert((module, name), Func(f));
        Ok(f)
    }

    /// Launches `module::name`. `args` holds one value per kernel parameter, of exactly the
    /// parameter's type (device pointers as u64, `int` as i32, `long long` as i64, `float` as
    /// f32, `double` as f64); their number and sizes are checked against the PTX.
    ///
    /// # Safety
    /// The arguments must match the kernel's signature and every device pointer must cover what
    /// the kernel reads and writes for this grid.
    pub unsafe fn launch(
        &self,
        module: &'static str,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &mut [KArg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let got: Vec<usize> = args.iter().map(|a| a.size).collect();
        match self.sigs.get(name) {
            Some(want) if *want == got => {}
            Some(want) => bail!("launch of {name}: argument sizes {got:?} do not match the kernel's parameters {want:?} (kernels/{module}.cu changed?)"),
            None => bail!("kernel {name} is not in kernels/{module}.cu ({})", self.image),
        }
        let mut args: Vec<*mut c_void> = args.iter().map(|a| a.ptr).collect();
        let args = &mut args[..];
        self.bind()?;
        let f = self.func(module, name)?;
        if smem > 48 * 1024 {
            dr::function::set_function_attribute(
                f,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| anyhow!("CUDA error allowing {smem} bytes of shared memory for {name}: {e}"))?;
        }
        dr::launch_kernel(f, grid, block, smem, self.stream, args)
            .map_err(|e| anyhow!("CUDA error launching {name} (grid {grid:?}, block {block:?}, {smem} B shared): {e}"))?;
        if self.sync_each {
            self.sync().with_context(|| format!("after {name}"))?;
        }
        Ok(())
    }

    /// Row-major `C[m,n] = alpha·op(A)·op(B) + beta·C` through cublasGemmEx, fp32 compute. `lda`,
    /// `ldb`, `ldc` are the row strides of the matrices as stored (A is `[m,k]`, or `[k,m]` when
    /// `ta`; B is `[k,n]`, or `[n,k]` when `tb`). A and B are bf16; C is bf16 or f32.
    ///
    /// # Safety
    /// The pointers must cover the matrices the strides and sizes describe.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
        c_f32: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let fits = |x: usize| i32::try_from(x).map_err(|_| anyhow!("gemm dimension {x} exceeds cuBLAS's 32-bit sizes"));
        let (mi, ni, ki) = (fits(m)?, fits(n)?, fits(k)?);
        let (la, lb, lc) = (fits(lda.max(1))?, fits(ldb.max(1))?, fits(ldc.max(1))?);
        self.bind()?;
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let bf = blas_sys::cudaDataType_t::CUDA_R_16BF;
        let ct = if c_f32 { blas_sys::cudaDataType_t::CUDA_R_32F } else { bf };
        // Column-major view of row-major data: C_cm = Cᵀ = op(B)ᵀ·op(A)ᵀ, so B goes first.
        blas_result::gemm_ex(
            self.blas,
            op(tb),
            op(ta),
            ni,
            mi,
            ki,
            &alpha as *const f32 as *const c_void,
            b as *const c_void,
            bf,
            lb,
            a as *const c_void,
            bf,
            la,
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            ct,
            lc,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| anyhow!("cuBLAS error in cublasGemmEx (m {m}, n {n}, k {k}, trans_a {ta}, trans_b {tb}): {e}"))?;
        if self.sync_each {
            self.sync().context("after cublasGemmEx")?;
        }
        Ok(())
    }

    pub fn event(&self) -> Result<Event> {
        self.bind()?;
        let ev = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(cu("cuEventCreate"))?;
        Ok(Event { ev, ctx: self.ctx.clone() })
    }

    pub fn record(&self, e: &Event) -> Result<()> {
        self.bind()?;
        // SAFETY: a live event on this context.
        unsafe { dr::event::record(e.ev, self.stream) }.map_err(cu("cuEventRecord"))
    }

    /// Milliseconds between two recorded events (waits for the second).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        self.bind()?;
        // SAFETY: live events on this context.
        unsafe {
            dr::event::synchronize(end.ev).map_err(cu("cuEventSynchronize"))?;
            dr::event::elapsed(start.ev, end.ev).map_err(cu("cuEventElapsedTime"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pick_arch, pick_cubin, ptx_param_sizes};

    #[test]
    fn ptx_signatures() {
        let ptx = ".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .f64 k_param_2,\n\t.param .align 8 .b8 k_param_3[24]\n)\n{\n}\n.visible .entry z()\n{\n}\n";
        assert_eq!(ptx_param_sizes(ptx), vec![("k".to_string(), vec![8, 4, 8, 24]), ("z".to_string(), vec![])]);
    }

    /// The argument lists the launchers pass (their sizes), against the kernels as built: a kernel
    /// whose signature changes without its launcher fails here, on the CPU, before any GPU run.
    #[cfg(kd_kernels)]
    #[test]
    fn launchers_match_the_built_kernels() {
        use std::collections::HashMap;
        let mut sigs: HashMap<String, Vec<usize>> = HashMap::new();
        for (_, arch, text) in super::ptx::PTX {
            for (name, sizes) in ptx_param_sizes(text) {
                if let Some(prev) = sigs.insert(name.clone(), sizes.clone()) {
                    assert_eq!(prev, sizes, "{name} differs between arches ({arch})");
                }
            }
        }
        let (p, i, l, f, d) = (8usize, 4usize, 8usize, 4usize, 8usize); // pointer, int, long long, float, double
        let mut want: Vec<(&str, Vec<usize>)> = vec![
            ("fill_uniform_bf16", vec![p, l, 8, f, f]),
            ("fill_uniform_f32", vec![p, l, 8, f, f]),
            ("add_bias_bf16", vec![p, p, l, i]),
            ("bias_grad_partials_bf16", vec![p, p, l, i, l]),
            ("column_partials_add_bf16", vec![p, i, i, p]),
            ("add_assign_bf16", vec![p, p, l]),
            ("scale_bf16", vec![p, f, l]),
            ("f32_to_bf16", vec![p, p, l]),
            ("embedding_fwd_bf16", vec![p, p, i, p]),
            ("embedding_bwd_bf16", vec![p, p, p, p, i, p]),
            ("qkv_split_rope_bf16", vec![p, p, p, i, i, i, i, d, p, p, p]),
            ("qkv_merge_rope_bwd_bf16", vec![p, p, p, p, i, i, i, i, d, p]),
            ("swiglu_fwd_bf16", vec![p, l, i, p]),
            ("swiglu_bwd_bf16", vec![p, p, l, i, p]),
            ("gelu_fwd_bf16", vec![p, p, l, i]),
            ("gelu_bwd_bf16", vec![p, p, p, l, i]),
            ("rmsnorm_fwd_bf16", vec![p, p, p, p, i, f]),
            ("rmsnorm_bwd_dx_bf16", vec![p, p, p, p, p, i]),
            ("rmsnorm_bwd_dw_partials_bf16", vec![p, p, p, p, i, i, i]),
            ("layernorm_fwd_bf16", vec![p, p, p, p, i, f]),
            ("cross_entropy_bf16", vec![p, p, i, f, p, p]),
            ("softmax_kl_bf16", vec![p, p, p, i, i, i, i, f, f, p, p, f, p, p, i, p]),
            ("softmax_div_bf16", vec![p, p, p, i, i, i, i, f, f, p, p, f, i, f, p, p, i, p]),
            ("sum_terms_into_f64", vec![p, p, p, l, p, p, p, p]),
            ("relation_cosine_partials", vec![p, p, l, i, p]),
            ("relation_cosine_grad", vec![p, p, l, i, f, p, p, p]),
            ("relation_cosine_partials_bf16", vec![p, p, l, i, p]),
            ("relation_cosine_grad_bf16", vec![p, p, l, i, f, p, p, p]),
            ("sum_into_f64_from_f32", vec![p, l, p]),
            ("sum_into_f64_from_f64", vec![p, l, p]),
            ("adamw_bf16", vec![p, p, p, p, p, l, f, f, f, f, f, f, f, f, 8, 8]),
            ("sum_squares_bf16", vec![p, l, p]),
            ("flash_attn_bwd_preprocess_bf16", vec![p, p, p, l, i]),
            ("flash_attn_dq_to_bf16", vec![p, p, l]),
        ];
        for dh in [64, 72, 80, 128] {
            want.push((Box::leak(format!("flash_attn_fwd_bf16_d{dh}").into_boxed_str()), vec![p, p, p, p, p, p, i, i, i, i, i, f]));
            want.push((Box::leak(format!("flash_attn_bwd_bf16_d{dh}").into_boxed_str()), vec![p, p, p, p, p, p, p, p, p, p, i, i, i, i, i, f]));
            for gc in [1, 2, 4, 8] {
                want.push((Box::leak(format!("decode_attn_bf16_d{dh}_g{gc}").into_boxed_str()), vec![p, p, p, p, p, p, p, i, i, i, i, f]));
            }
        }
        want.push(("decode_attn_combine_bf16", vec![p, p, p, p, i, i, i, i, i]));
        for (name, sizes) in want {
            assert_eq!(sigs.get(name), Some(&sizes), "kernel {name}: the launcher passes {sizes:?}");
        }
    }

    #[test]
    fn arch_choice() {
        let built = ["compute_80", "compute_90a"];
        assert_eq!(pick_arch((9, 0), &built), Some("compute_90a"));
        assert_eq!(pick_arch((8, 0), &built), Some("compute_80"));
        assert_eq!(pick_arch((8, 9), &built), Some("compute_80"));
        assert_eq!(pick_arch((10, 0), &built), Some("compute_80"));
        assert_eq!(pick_arch((7, 5), &built), None);
        assert_eq!(pick_arch((9, 0), &["compute_90a"]), Some("compute_90a"));
        assert_eq!(pick_arch((10, 0), &["compute_90a"]), None);
    }

    #[test]
    fn cubin_choice() {
        let built = ["sm_80", "sm_90a"];
        assert_eq!(pick_cubin((9, 0), &built), Some("sm_90a"));
        assert_eq!(pick_cubin((8, 0), &built), Some("sm_80"));
        // sm_80 machine code runs on 8.6 and 8.9; nothing built runs on 10.0 or 12.0 (PTX then).
        assert_eq!(pick_cubin((8, 6), &built), Some("sm_80"));
        assert_eq!(pick_cubin((8, 9), &built), Some("sm_80"));
        assert_eq!(pick_cubin((10, 0), &built), None);
        assert_eq!(pick_cubin((12, 0), &built), None);
        assert_eq!(pick_cubin((9, 0), &["sm_80"]), None);
        assert_eq!(pick_cubin((8, 9), &["sm_80", "sm_86", "sm_90"]), Some("sm_86"));
        assert_eq!(pick_cubin((10, 0), &["sm_100", "sm_100a"]), Some("sm_100a"));
    }
}
