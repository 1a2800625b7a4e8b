//! `kd-engine train`: a recipe from a TOML config, or, with no config, the miniature study.

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::Device;
use crate::backend::cuda::nccl::{unique_id, NcclComm};
use crate::backend::cuda::CudaBackend;
use crate::backend::Backend;
use crate::dist::launch::RankEnv;
use crate::dist::rendezvous::{fetch, serve};
use crate::dist::watchdog::Watchdog;
use crate::dist::{Collective, Solo};
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::recipe::run_config;
use crate::train::study::{data_dir, run_study, seed_dir, write_compare_questions, StudyKind, StudyOptions, STUDY_MODELS};

/// The built-in study's experiments (`--study`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StudyArg {
    LlavaKd,
    DistilOnly,
}

pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    pub resume: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub study: StudyArg,
    pub quick: bool,
    pub ablation: bool,
    pub seeds: usize,
    pub device: Device,
}

/// A fresh run folder under `runs/`, named by the start time.
fn fresh_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let base = Path::new("runs").join(format!("run-{secs}"));
    (0..).map(|i| if i == 0 { base.clone() } else { PathBuf::from(format!("{}-{i}", base.display())) }).find(|p| !p.exists()).unwrap_or(base)
}

/// `seed-1/compare.html`: the teacher, the baseline student and the LLaVA-KD student of the first
/// seed answer every held-out question about three held-out images, side by side.
fn compare_report(out: &Path, device: Device) -> Result<PathBuf> {
    let dir = seed_dir(out, 1);
    let shown = &STUDY_MODELS[..3];
    let html = dir.join("compare.html");
    super::compare::run(super::compare::CompareArgs {
        models: shown.iter().map(|(name, _)| dir.join("models").join(name)).collect(),
        names: Some(shown.iter().map(|(_, row)| row.to_string()).collect()),
        data: write_compare_questions(out, &dir, 3)?,
        image_folder: data_dir(out),
        out: html.clone(),
        metric: Some(super::eval::MetricArg::Exact),
        batch: 8,
        // The study's answers are one word: its own evaluation stops after 4 tokens.
        max_new_tokens: 4,
        prompt_suffix: String::new(),
        template: None,
        title: "kd-engine miniature study, seed 1: held-out questions".into(),
        device,
    })?;
    Ok(html)
}

pub fn run(a: TrainArgs) -> Result<()> {
    ensure!(
        a.config.is_none() || !(a.quick || a.ablation || a.seeds != 1 || a.study != StudyArg::LlavaKd),
        "--study, --quick, --ablation and --seeds choose the built-in study's runs; a --config recipe takes none of them"
    );
    ensure!(
        !(a.ablation && a.study == StudyArg::DistilOnly),
        "--ablation adds variants of the llava-kd study; --study distil-only has none"
    );
    // One rank of a multi-process job when the launcher variables say so (WORLD_SIZE > 1).
    let env = RankEnv::from_env()?.filter(|e| e.world > 1);
    // The device: a config's `run.device` ("cpu", "cuda"; anything else defers to --device).
    let device = match &a.config {
        Some(path) => {
            let cfg = TrainConfig::load(path, &a.overrides)?;
            match cfg.run.device.as_str() {
                "cpu" => Device::Cpu,
                "cuda" => Device::Cuda,
                _ => a.device,
            }
        }
        None => a.device,
    };
    if let Some(env) = env {
        return run_rank(&a, device, &env);
    }
    crate::with_backend!(device, be => run_on(&be, &Solo, &a))
}

/// One rank of a multi-process job: CUDA on GPU `LOCAL_RANK`, NCCL between the ranks.
fn run_rank(a: &TrainArgs, device: Device, env: &RankEnv) -> Result<()> {
    let (rank, w) = (env.rank, env.world);
    let Some(path) = &a.config else { bail!("WORLD_SIZE={w}: data-parallel training runs a recipe from --config (the built-in study runs as one process)") };
    ensure!(
        device != Device::Cpu,
        "WORLD_SIZE={w}: multi-process training runs on CUDA with NCCL; on the CPU, data parallelism runs only as threads of one process (the tests)"
    );
    if let Some(why) = crate::backend::cuda::unavailable_reason() {
        bail!("WORLD_SIZE={w}: rank {rank} needs CUDA: {why}");
    }
    let be = CudaBackend::on_device(env.local_rank).with_context(|| format!("rank {rank}: opening GPU {} (LOCAL_RANK)", env.local_rank))?;
    let timeout = TrainConfig::load(path, &a.overrides)?.run.dist_timeout();
    let comm = nccl_communicator(&be, env, timeout)?;
    run_on(&be, &comm, a).with_context(|| format!("rank {rank} of {w}"))
}

/// The NCCL communicator of the job `env` describes: rank 0 makes the unique id and serves it on
/// `MASTER_PORT` (not for one rank), the others fetch it from `MASTER_ADDR:MASTER_PORT`.
pub fn nccl_communicator<'a>(be: &'a CudaBackend, env: &RankEnv, timeout: Duration) -> Result<NcclComm<'a>> {
    let id = if env.rank == 0 {
        let id = unique_id()?;
        if env.world > 1 {
            serve(env.master_port, env.world, &id, timeout)?;
        }
        id
    } else {
        fetch(&format!("{}:{}", env.master_addr, env.master_port), env.rank, env.world, timeout)?
    };
    // ncclCommInitRank blocks until every rank has joined: a rank that dies after the rendezvous
    // would hang the others there, so the process exits at the deadline instead.
    let _watchdog = Watchdog::exit_after(timeout, format!("rank {} of {}: joining the NCCL communicator", env.rank, env.world));
    NcclComm::init(be, &id, env.rank, env.world, timeout).with_context(|| format!("rank {} of {}: joining the NCCL communicator", env.rank, env.world))
}

fn run_on<B: Backend>(be: &B, comm: &dyn Collective<B>, a: &TrainArgs) -> Result<()> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match &a.config {
        Some(path) => {
            let cfg = TrainConfig::load(path, &a.overrides)?;
            let resume = a.resume.as_deref().map(checkpoint::latest).transpose()?;
            let out = match (&a.out, &cfg.run.out, &a.resume) {
                (Some(o), _, _) | (None, Some(o), _) => o.clone(),
                // Resuming continues the run folder that holds the checkpoint.
                (None, None, Some(_)) => resume.as_ref().and_then(|c| c.parent()).map(Path::to_path_buf).unwrap_or_else(fresh_run_dir),
                (None, None, None) if comm.world() == 1 => fresh_run_dir(),
                (None, None, None) => bail!("a job of {} ranks needs its run folder named (--out or run.out): the ranks must agree on it", comm.world()),
            };
            let state = run_config(be, comm, &cfg, &out, resume, progress)?;
            if comm.rank() != 0 {
                return Ok(());
            }
            eprintln!(
                "done: {} optimizer steps ({} skipped for non-finite values); run folder {}",
                state.global_step,
                state.nonfinite_total,
                out.display()
            );
            Ok(())
        }
        None => {
            ensure!(a.overrides.is_empty() && a.resume.is_none(), "--set and --resume need --config (the built-in study takes --study, --quick, --ablation, --seeds, --out)");
            ensure!(a.seeds >= 1, "--seeds must be at least 1");
            let out = a.out.clone().unwrap_or_else(fresh_run_dir);
            let kind = match a.study {
                StudyArg::LlavaKd => StudyKind::LlavaKd,
                StudyArg::DistilOnly => StudyKind::DistilOnly,
            };
            let opts = StudyOptions { kind, quick: a.quick, smoke: false, ablation: a.ablation, seeds: (1..=a.seeds as u64).collect(), out: out.clone(), progress };
            let table = run_study(be, &opts)?;
            println!("{table}");
            if kind == StudyKind::DistilOnly {
                eprintln!(
                    "results in {out}: results.md, results.json, and per seed models/ (HF folders), predictions/ (every model's answers), runs/ (metrics, plots)",
                    out = out.display()
                );
                return Ok(());
            }
            let report = compare_report(&out, a.device)?;
            eprintln!(
                "results in {out}: results.md, and per seed models/ (HF folders for generate, eval and compare), predictions/, runs/ \
                 (metrics, plots, checkpoints); the models side by side: {}",
                report.display(),
                out = out.display()
            );
            Ok(())
        }
    }
}
