//! `kd-engine train`: a recipe from a TOML config, or, with no config, the miniature study.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

use super::Device;
use crate::backend::Backend;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::recipe::run_config;
use crate::train::study::{run_study, StudyOptions};

pub struct TrainArgs {
    pub config: Option<PathBuf>,
    pub overrides: Vec<String>,
    pub resume: Option<PathBuf>,
    pub out: Option<PathBuf>,
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

pub fn run(a: TrainArgs) -> Result<()> {
    ensure!(
        a.config.is_none() || !(a.quick || a.ablation || a.seeds != 1),
        "--quick, --ablation and --seeds choose the built-in study's runs; a --config recipe takes none of them"
    );
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
    crate::with_backend!(device, be => run_on(&be, &a))
}

fn run_on<B: Backend>(be: &B, a: &TrainArgs) -> Result<()> {
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match &a.config {
        Some(path) => {
            let cfg = TrainConfig::load(path, &a.overrides)?;
            let resume = a.resume.as_deref().map(checkpoint::latest).transpose()?;
            let out = match (&a.out, &cfg.run.out, &a.resume) {
                (Some(o), _, _) | (None, Some(o), _) => o.clone(),
                // Resuming continues the run folder that holds the checkpoint.
                (None, None, Some(_)) => resume.as_ref().and_then(|c| c.parent()).map(Path::to_path_buf).unwrap_or_else(fresh_run_dir),
                (None, None, None) => fresh_run_dir(),
            };
            let state = run_config(be, &crate::dist::Solo, &cfg, &out, resume, progress)?;
            eprintln!(
                "done: {} optimizer steps ({} skipped for non-finite values); run folder {}",
                state.global_step,
                state.nonfinite_total,
                out.display()
            );
            Ok(())
        }
        None => {
            ensure!(a.overrides.is_empty() && a.resume.is_none(), "--set and --resume need --config (the built-in study takes --quick, --ablation, --seeds, --out)");
            ensure!(a.seeds >= 1, "--seeds must be at least 1");
            let out = a.out.clone().unwrap_or_else(fresh_run_dir);
            let opts = StudyOptions { quick: a.quick, ablation: a.ablation, seeds: (1..=a.seeds as u64).collect(), out: out.clone(), progress };
            let table = run_study(be, &opts)?;
            println!("{table}");
            eprintln!("results, metrics, plots and checkpoints in {}", out.display());
            Ok(())
        }
    }
}
