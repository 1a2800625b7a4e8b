//! The CUDA kernels on the CPU: `kernels/sim/run.sh` builds `kernels/sim/sim_test.cpp` with g++
//! against the emulation of the CUDA subset the kernels use (`kernels/sim/host_sim.h`: a fiber per
//! thread, warp collectives from the PTX ISA, cp.async deferred to its wait) and checks every
//! kernel family against double-precision references, then relation, softmax-KL, attention and
//! decode (the kernels whose warps share shared memory) again under the warp-serial schedules
//! that turn a missing `__syncthreads` into a wrong result.
//! This is what a machine without a GPU can check of the kernels' logic; `tests/cuda_ops.rs` runs
//! them on a device. Needs g++ (skipped without it unless `KD_REQUIRE_KERNELS=1`, as CI sets).

use std::process::Command;

#[test]
fn kernels_pass_the_cpu_emulation_under_every_schedule() {
    let have_gxx = Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_gxx {
        assert!(std::env::var("KD_REQUIRE_KERNELS").as_deref() != Ok("1"), "KD_REQUIRE_KERNELS=1 but g++ is missing");
        println!("skipped: no g++ to build the kernel emulation");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/sim/run.sh");
    let out = Command::new("bash").arg(script).env("TMPDIR", tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    let summaries: Vec<&str> = stdout.lines().filter(|l| l.contains(" passed, ")).collect();
    println!("{}", summaries.join("\n"));
    assert!(
        out.status.success() && failed.is_empty(),
        "kernel emulation failed (exit {:?}):\n{}\n{}",
        out.status.code(),
        failed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summaries.len(), 3, "one summary per schedule:\n{stdout}");
    assert!(summaries.iter().all(|s| s.ends_with(" 0 failed")), "{summaries:?}");
}
