//! Compiles `kernels/*.cu` to PTX with nvcc when one is found (`NVCC`, `CUDA_HOME`/`CUDA_PATH`,
//! then `PATH`), for the architectures in `KD_CUDA_ARCH` (default: compute_80 and compute_90a).
//! A kernel that does not compile fails the build. Without nvcc the build succeeds, warns once,
//! and the CUDA backend reports "built without kernels" at run time (SPEC §4).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = env::var(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|d| d.join("nvcc")).find(|p| p.is_file()))
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=KD_CUDA_ARCH");
    println!("cargo::rustc-check-cfg=cfg(kd_kernels)");
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "cu")).collect())
        .unwrap_or_default();
    sources.sort();
    if sources.is_empty() {
        return;
    }
    let Some(nvcc) = find_nvcc() else {
        println!("cargo:warning=nvcc not found (set NVCC or CUDA_HOME): building without CUDA kernels");
        return;
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let archs = env::var("KD_CUDA_ARCH").unwrap_or_else(|_| "compute_80,compute_90a".into());
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("kernel file names are UTF-8");
        for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let ptx = out.join(format!("{stem}.{arch}.ptx"));
            let status = Command::new(&nvcc)
                .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math", "-Ikernels"])
                .arg(format!("-arch={arch}"))
                .arg(src)
                .arg("-o")
                .arg(&ptx)
                .status();
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => panic!("nvcc failed ({s}) compiling {} for {arch}", src.display()),
                Err(e) => panic!("could not run {}: {e}", nvcc.display()),
            }
        }
    }
    println!("cargo:rustc-cfg=kd_kernels");
}
