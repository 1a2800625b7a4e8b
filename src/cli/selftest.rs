//! `kd-engine selftest`: every CUDA op against the CPU backend on fresh random inputs (the checks
//! of `backend::cuda::checks`, also run by `tests/cuda_ops.rs`). Prints a table and fails when any
//! check fails; without a CUDA device it prints `skipped: no CUDA device` and succeeds.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::backend::cuda::{self, checks, CudaBackend};
use crate::dist::check::check_collective;
use crate::dist::launch::RankEnv;

use super::train::nccl_communicator;

#[derive(clap::Args, Debug)]
pub struct SelftestArgs {
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Only these op families (comma-separated): memory, gemm, elementwise, embedding, norm, rope,
    /// attention, cross_entropy, softmax_kl, relation, adamw.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seed of the random inputs (default: drawn from the clock, so each run checks fresh inputs;
    /// the seed is printed so a failure can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Check the NCCL communicator instead (every collective data parallelism uses): one rank by
    /// itself, or each rank of `kd-engine launch --gpus N -- selftest --nccl`.
    #[arg(long)]
    nccl: bool,
}

pub fn run(a: SelftestArgs) -> Result<()> {
    if let Err(why) = cuda::probe() {
        println!("skipped: no CUDA device ({why})");
        return Ok(());
    }
    if !cuda::kernels_built() {
        bail!("a CUDA device is present but this kd-engine was built without kernels (nvcc was not found at build time): nothing to test");
    }
    if a.nccl {
        return nccl_check();
    }
    let be = CudaBackend::new()?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("selftest on {} (seed {seed}; replay with --seed {seed})", be.describe());
    let families: Vec<&str> = if a.only.is_empty() { checks::FAMILIES.to_vec() } else { a.only.iter().map(String::as_str).collect() };
    let mut results = Vec::new();
    for (i, fam) in families.iter().enumerate() {
        let started = std::time::Instant::now();
        let r = checks::run_family(&be, fam, seed.wrapping_add(i as u64 * 0x1000))?;
        let failed = r.iter().filter(|c| !c.passed).count();
        eprintln!("  {fam}: {} checks, {failed} failed ({:.1} s)", r.len(), started.elapsed().as_secs_f64());
        results.extend(r);
    }
    print!("{}", checks::table(&results));
    if let Some(path) = &a.json {
        let doc = serde_json::json!({ "device": be.describe(), "seed": seed, "results": results });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let failed = results.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        bail!("{failed} of {} CUDA checks failed (seed {seed})", results.len());
    }
    Ok(())
}

/// `selftest --nccl`: joins the job the launcher variables describe (one rank without them),
/// builds the NCCL communicator even for one rank, and checks every collective on it.
fn nccl_check() -> Result<()> {
    let env = RankEnv::from_env()?.unwrap_or(RankEnv { rank: 0, world: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: 0 });
    let be = CudaBackend::on_device(env.local_rank)?;
    let comm = nccl_communicator(&be, &env, std::time::Duration::from_secs(60))?;
    let done = check_collective(&be, &comm)?;
    println!("nccl: rank {} of {} on {}: passed {}", env.rank, env.world, be.describe(), done.join(", "));
    Ok(())
}
