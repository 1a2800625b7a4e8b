//! `kd-engine bench-kernels`: the CUDA kernels at the SPEC §5 shapes against the ceilings the run
//! measures itself (device copy bandwidth, cuBLAS bf16 GEMM). See `backend::cuda::bench`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::backend::cuda::{self, bench, CudaBackend};

#[derive(clap::Args, Debug)]
pub struct BenchKernelsArgs {
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Timed repeats per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Smaller shapes than the SPEC's (a smoke run; its numbers are not the SPEC figures).
    #[arg(long)]
    quick: bool,
}

pub fn run(a: BenchKernelsArgs) -> Result<()> {
    if let Some(why) = cuda::unavailable_reason() {
        anyhow::bail!("bench-kernels needs a CUDA device and a build with kernels: {why}");
    }
    let be = CudaBackend::new()?;
    let opts = bench::Options { warmup: a.warmup, reps: a.reps, quick: a.quick };
    let report = bench::run(&be, opts, |m| eprintln!("{m}"))?;
    print!("{}", bench::table(&report));
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
