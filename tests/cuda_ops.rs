//! Every CUDA op against the CPU backend on fresh random inputs (the checks of
//! `kd_engine::backend::cuda::checks`, also run by `kd-engine selftest`), one test per op family.
//!
//! The one test target for all CUDA tests, so the executable sent to a GPU machine is a single
//! file (SPEC §7). Without a CUDA device the tests run on the simulated CUDA device (the kernels
//! on the CPU emulator behind the driver API, `src/backend/cuda/sim.rs`) when this build has it,
//! as CI's does; only a build without it prints `skipped: no CUDA device`. `KD_CHECK_SEED`
//! replays a run's inputs (each run otherwise draws fresh ones).

use std::sync::OnceLock;

use kd_engine::backend::cuda::{self, checks, CudaBackend};

/// The backend shared by the tests of this binary (`None`: no device here).
fn backend() -> Option<&'static CudaBackend> {
    static BE: OnceLock<Option<CudaBackend>> = OnceLock::new();
    BE.get_or_init(|| {
        if cuda::sim::use_simulated_if_no_device() {
            eprintln!("no CUDA device: running on the simulated CUDA device (KD_CUDA_SIM=1)");
        }
        if let Err(why) = cuda::probe() {
            assert!(std::env::var("KD_REQUIRE_KERNELS").as_deref() != Ok("1"), "KD_REQUIRE_KERNELS=1 but neither a CUDA device nor the simulated one is available: {why}");
            eprintln!("no CUDA device: {why}");
            return None;
        }
        assert!(cuda::kernels_built(), "a CUDA device is present but this test binary was built without kernels (no nvcc at build time)");
        Some(CudaBackend::new().expect("opening the CUDA device"))
    })
    .as_ref()
}

fn seed() -> u64 {
    std::env::var("KD_CHECK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

fn family(name: &str) {
    let Some(be) = backend() else {
        println!("skipped: no CUDA device");
        return;
    };
    // One family at a time: they share the device, and the memory family's pool counts (and its
    // out-of-memory case, which empties the cache) must not see another family's buffers.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // The CUDA context is bound per thread; the harness runs tests on several threads.
    let seed = seed();
    let results = checks::run_family(be, name, seed).expect("known family");
    println!("{} (seed {seed}, replay with KD_CHECK_SEED={seed})\n{}", be.describe(), checks::table(&results));
    let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
    assert!(failed.is_empty(), "{} of {} {name} checks failed: {:#?}", failed.len(), results.len(), failed);
}

#[test]
fn memory() {
    family("memory");
}

#[test]
fn gemm() {
    family("gemm");
}

#[test]
fn elementwise() {
    family("elementwise");
}

#[test]
fn embedding() {
    family("embedding");
}

#[test]
fn norm() {
    family("norm");
}

#[test]
fn rope() {
    family("rope");
}

#[test]
fn attention() {
    family("attention");
}

#[test]
fn attention_decode() {
    family("attention_decode");
}

#[test]
fn cross_entropy() {
    family("cross_entropy");
}

#[test]
fn softmax_kl() {
    family("softmax_kl");
}

#[test]
fn relation() {
    family("relation");
}

#[test]
fn adamw() {
    family("adamw");
}

#[test]
fn every_family_has_a_test() {
    assert_eq!(checks::FAMILIES.len(), 13, "add a #[test] for the new family");
}

/// CI and the GPU bundle build with `KD_REQUIRE_KERNELS=1`: the kernels must then be in the binary.
#[test]
fn kernels_are_built_when_required() {
    if std::env::var("KD_REQUIRE_KERNELS").is_ok_and(|v| v == "1") {
        assert!(cuda::kernels_built(), "KD_REQUIRE_KERNELS=1 but the kernels were not compiled into this build");
        let arches = cuda::built_arches();
        assert!(arches.contains(&"compute_80") && arches.contains(&"compute_90a"), "PTX built for {arches:?}");
    }
}

#[test]
fn device_cuda_without_a_device_is_a_clear_error() {
    use kd_engine::cli::{resolve_device, Device};
    backend(); // settles whether this process uses the simulated device
    match cuda::unavailable_reason() {
        Some(why) => {
            let e = resolve_device(Device::Cuda).unwrap_err().to_string();
            assert!(e.contains("--device cuda") && e.contains(&why), "{e}");
            assert_eq!(resolve_device(Device::Auto).unwrap(), Device::Cpu);
            assert!(CudaBackend::new().is_err());
        }
        None => assert_eq!(resolve_device(Device::Auto).unwrap(), Device::Cuda),
    }
    assert_eq!(resolve_device(Device::Cpu).unwrap(), Device::Cpu);
}

#[test]
fn driver_errors() {
    family("driver_errors");
}
