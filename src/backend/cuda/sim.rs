//! The simulated CUDA device: the CUDA backend run without a GPU (`KD_CUDA_SIM=1`).
//!
//! `build.rs` compiles `kernels/*.cu` for the CPU emulator (`kernels/sim/host_sim.h`) into three
//! shared libraries that export the driver API, cuBLAS and NCCL entry points cudarc loads
//! (`kernels/sim/cuda_sim.h`, `kernels/sim/nccl.cpp`). Loading them here by path, before cudarc's
//! first call, makes the dynamic loader hand them to cudarc when it opens `libcuda.so` /
//! `libcublas.so` / `libnccl.so` by name (their sonames), so the same binary and the same backend
//! code run: module loading, launches with their argument buffers, the caching pool, cuBLAS calls,
//! whole models and training steps, and multi-process data parallelism over NCCL (the ranks meet
//! in shared memory; `KD_SIM_DEVICES=N` lists N devices so each rank opens its `LOCAL_RANK`).
//!
//! What it proves and what it does not: every launch's configuration, arguments and memory
//! accesses inside buffers, checked the way the driver would (and stricter: a write past a
//! buffer into its pool block's slack is caught); the kernels' results against the CPU backend.
//! Not speed, not the memory model between blocks (they run one after another), not the real
//! driver's PTX JIT.
//!
//! Never active in a normal run: only `KD_CUDA_SIM=1` loads it.

use std::sync::OnceLock;

use libloading::os::unix::{Library, Symbol, RTLD_GLOBAL, RTLD_NOW};

/// What the device counted since it was loaded (`kd_sim_counters` in `kernels/sim/driver.cpp`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Counters {
    pub launches: u64,
    pub memsets: u64,
    pub memset_bytes: u64,
    pub htod_copies: u64,
    pub htod_bytes: u64,
    pub dtoh_copies: u64,
    pub dtoh_bytes: u64,
    pub dtod_copies: u64,
    pub dtod_bytes: u64,
    /// cuCtxSynchronize, cuStreamSynchronize and cuEventSynchronize.
    pub syncs: u64,
    pub gemm_calls: u64,
    pub gemm_flops: f64,
    pub driver_allocs: u64,
    pub driver_frees: u64,
    /// Copies that return only when done: synchronous cuMemcpyHtoD/DtoH, and an asynchronous
    /// copy from pageable (not page-locked) host memory.
    pub blocking_copies: u64,
    /// Page-locked host allocations (cuMemHostAlloc).
    pub pinned_allocs: u64,
}

impl Counters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            launches: self.launches - earlier.launches,
            memsets: self.memsets - earlier.memsets,
            memset_bytes: self.memset_bytes - earlier.memset_bytes,
            htod_copies: self.htod_copies - earlier.htod_copies,
            htod_bytes: self.htod_bytes - earlier.htod_bytes,
            dtoh_copies: self.dtoh_copies - earlier.dtoh_copies,
            dtoh_bytes: self.dtoh_bytes - earlier.dtoh_bytes,
            dtod_copies: self.dtod_copies - earlier.dtod_copies,
            dtod_bytes: self.dtod_bytes - earlier.dtod_bytes,
            syncs: self.syncs - earlier.syncs,
            gemm_calls: self.gemm_calls - earlier.gemm_calls,
            gemm_flops: self.gemm_flops - earlier.gemm_flops,
            driver_allocs: self.driver_allocs - earlier.driver_allocs,
            driver_frees: self.driver_frees - earlier.driver_frees,
            blocking_copies: self.blocking_copies - earlier.blocking_copies,
            pinned_allocs: self.pinned_allocs - earlier.pinned_allocs,
        }
    }

    /// Host waits: explicit synchronisations plus the copies that block the host (a synchronous
    /// copy waits for the device's queue to drain; an asynchronous one from page-locked memory
    /// does not).
    pub fn host_syncs(&self) -> u64 {
        self.syncs + self.blocking_copies
    }
}

struct SimLib {
    // Kept loaded for the life of the process (cudarc holds pointers into them).
    _driver: Library,
    _blas: Library,
    _nccl: Library,
    nccl_timeout: unsafe extern "C" fn(f64),
    lend: unsafe extern "C" fn(u64, usize) -> i32,
    reclaim: unsafe extern "C" fn(u64) -> i32,
    counters: unsafe extern "C" fn(*mut Counters),
    mark: unsafe extern "C" fn(*const std::ffi::c_char),
}

static SIM: OnceLock<Result<SimLib, String>> = OnceLock::new();

/// Whether `KD_CUDA_SIM=1` asks for the simulated device.
pub fn requested() -> bool {
    std::env::var("KD_CUDA_SIM").is_ok_and(|v| v == "1")
}

/// Whether this build has the simulated device (a C++ compiler and nvcc at build time).
pub fn built() -> bool {
    cfg!(kd_cuda_sim)
}

fn load() -> Result<SimLib, String> {
    let Some(dir) = option_env!("KD_CUDA_SIM_DIR") else {
        return Err("KD_CUDA_SIM=1, but this kd-engine was built without the simulated CUDA device (it needs nvcc and a C++ compiler at build time)".into());
    };
    let open = |name: &str| {
        let path = std::path::Path::new(dir).join(name);
        // SAFETY: our own library; its initialisers only register the host-compiled kernels.
        unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| format!("loading the simulated CUDA device ({}): {e} (rebuild kd-engine where it was built)", path.display()))
    };
    let driver = open("libkd_cuda_sim.so")?;
    let blas = open("libkd_cublas_sim.so")?;
    let nccl = open("libkd_nccl_sim.so")?;
    // SAFETY: the signatures are those of kernels/sim/driver.cpp and kernels/sim/nccl.cpp.
    unsafe {
        let sym = |lib: &Library, name: &[u8]| -> Result<*mut std::ffi::c_void, String> {
            let s: Symbol<*mut std::ffi::c_void> = lib.get(name).map_err(|e| format!("the simulated CUDA device lacks a symbol: {e}"))?;
            Ok(*s)
        };
        let lend = std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn(u64, usize) -> i32>(sym(&driver, b"kd_sim_lend")?);
        let reclaim = std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn(u64) -> i32>(sym(&driver, b"kd_sim_reclaim")?);
        let counters = std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn(*mut Counters)>(sym(&driver, b"kd_sim_counters")?);
        let nccl_timeout = std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn(f64)>(sym(&nccl, b"kd_nccl_sim_set_timeout")?);
        let mark = std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn(*const std::ffi::c_char)>(sym(&driver, b"kd_sim_mark")?);
        Ok(SimLib { _driver: driver, _blas: blas, _nccl: nccl, nccl_timeout, lend, reclaim, counters, mark })
    }
}

/// Loads the simulated device when `KD_CUDA_SIM=1` (once; before cudarc's first call). Returns
/// whether it is in use.
pub fn activate() -> Result<bool, String> {
    if !requested() {
        return Ok(SIM.get().is_some_and(|s| s.is_ok()));
    }
    SIM.get_or_init(load).as_ref().map(|_| true).map_err(Clone::clone)
}

fn lib() -> Option<&'static SimLib> {
    SIM.get().and_then(|s| s.as_ref().ok())
}

/// Whether the simulated device is loaded in this process.
pub fn active() -> bool {
    lib().is_some()
}

/// The device's counters, when the simulated device is in use.
pub fn counters() -> Option<Counters> {
    lib().map(|l| {
        let mut c = Counters::default();
        // SAFETY: writes one Counters.
        unsafe { (l.counters)(&mut c) };
        c
    })
}

/// How long a simulated NCCL collective waits for the other ranks before it fails with
/// ncclTimeout (a real one waits without end; `NcclComm` polls it against the same deadline).
pub(crate) fn set_collective_timeout(timeout: std::time::Duration) {
    if let Some(l) = lib() {
        // SAFETY: takes a number of seconds.
        unsafe { (l.nccl_timeout)(timeout.as_secs_f64()) };
    }
}

/// Whether `KD_SIM_COUNT_ONLY=1` asks the simulated device to check, count and trace every call
/// without computing anything (the anchor step's operations at full size for
/// benches/step_model.py; the results are meaningless).
pub fn count_only() -> bool {
    active() && std::env::var("KD_SIM_COUNT_ONLY").is_ok_and(|v| v == "1")
}

/// Writes a mark into the simulated device's trace (`KD_SIM_TRACE`), e.g. where a step's phase
/// ends, so the trace can be cut into steps and phases. Nothing without the simulated device.
pub fn mark(what: &str) {
    if let (Some(l), Ok(c)) = (lib(), std::ffi::CString::new(what)) {
        // SAFETY: a NUL-terminated string that outlives the call.
        unsafe { (l.mark)(c.as_ptr()) };
    }
}

/// The pool lends `[ptr, ptr + used)` of its block at `ptr` to a new buffer: the device fills it
/// with NaN bytes and guards the rest of the block.
pub(crate) fn lend(ptr: u64, used: usize) {
    if let Some(l) = lib() {
        // SAFETY: ptr is the start of a live driver allocation of at least `used` bytes.
        unsafe { (l.lend)(ptr, used) };
    }
}

/// The buffer at `ptr` went back to the pool's cache: the device guards the whole block.
pub(crate) fn reclaim(ptr: u64) {
    if let Some(l) = lib() {
        // SAFETY: ptr is the start of a live driver allocation.
        unsafe { (l.reclaim)(ptr) };
    }
}

/// For test harnesses: when no real CUDA device is present and this build has the simulated one,
/// selects it (sets `KD_CUDA_SIM=1` for this process). Returns whether the device in use (if
/// any) is simulated. Call it before any other CUDA call.
pub fn use_simulated_if_no_device() -> bool {
    if requested() {
        return true;
    }
    if super::probe().is_ok() || !built() {
        return false;
    }
    std::env::set_var("KD_CUDA_SIM", "1");
    true
}
