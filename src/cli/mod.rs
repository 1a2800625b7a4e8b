//! The `kd-engine` command line.

mod bench_kernels;
mod bench_step;
mod compare;
mod encode_image;
mod eval;
mod forward;
mod generate;
mod init;
mod launch;
mod selftest;
mod train;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "kd-engine", version, about = "Distil large multimodal LLMs into small ones with LLaVA-KD")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a device is present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a decoder LLM on one sequence of token ids and write its logits (f32 [T, V]).
    Forward {
        /// Hugging Face model folder (config.json + safetensors, single or sharded).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,5,42.
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        input_ids: Vec<String>,
        /// Output safetensors file; holds the tensor `logits`.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
    },
    /// Run the vision tower on one image and write pixel_values, hidden_states[K] and
    /// last_hidden_state (f32).
    EncodeImage {
        /// SigLIP checkpoint folder (SiglipVisionModel or dual-tower SiglipModel).
        #[arg(long)]
        vision: PathBuf,
        /// Image file (PNG, JPEG, GIF: first frame).
        #[arg(long)]
        image: PathBuf,
        /// HF `hidden_states` index to write as `hidden`: 0 = embeddings, negative from the end.
        #[arg(long, default_value_t = -2, allow_negative_numbers = true)]
        layer: i64,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
    },
    /// Train with a LLaVA-KD recipe from a TOML config; with no config, run the miniature
    /// LLaVA-KD study (teacher, student, student + KD on synthetic shapes) and print its table.
    Train {
        /// Recipe config (see configs/); without it the built-in study runs.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config value, e.g. --set stage.0.lr=1e-3 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Continue from a checkpoint (a run folder or its checkpoint/ folder).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Run folder (default: a fresh runs/run-<time>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Study: which experiment. `llava-kd`: teacher, student, student + LLaVA-KD;
        /// `distil-only`: students trained by MDist alone (no CE) against CE alone, scored by
        /// agreement with the teacher (the distillation sanity check; with --quick a few
        /// minutes a seed on 2 cores).
        #[arg(long, value_enum, default_value_t = train::StudyArg::LlavaKd)]
        study: train::StudyArg,
        /// Study: the small version (smoke test, about 30-40 s a seed on 2 cores).
        #[arg(long)]
        quick: bool,
        /// Study: add the per-stage ablation of paper Table A5 (DPT→SFT, PT→SFT→DFT).
        #[arg(long)]
        ablation: bool,
        /// Study: repeat over this many seeds (1, 2, …) and report mean ± std.
        #[arg(long, default_value_t = 1)]
        seeds: usize,
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
    },
    /// Generate text: an answer for an image and a prompt (MLLM), or token ids (plain LLM).
    Generate(generate::GenerateArgs),
    /// Score a model on a benchmark-style question set (exact / yesno / choice).
    Eval(eval::EvalArgs),
    /// Side-by-side answers of several models on the same images, as an HTML report.
    Compare(compare::CompareArgs),
    /// Write a randomly initialised model of a real shape (Qwen, SigLIP presets) in HF layout.
    Init(init::InitArgs),
    /// Benchmark the CUDA kernels at the SPEC §5 shapes against the measured hardware ceilings.
    BenchKernels(bench_kernels::BenchKernelsArgs),
    /// Benchmark the anchor DFT training step (real shapes, random weights) on the GPU.
    BenchStep(bench_step::BenchStepArgs),
    /// Run every CUDA kernel against the CPU backend on fresh random inputs.
    Selftest(selftest::SelftestArgs),
    /// Start one process per GPU for data-parallel training: `launch --gpus 8 -- train --config FILE`.
    Launch(launch::LaunchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Forward { model, input_ids, out, device } => forward::run(&model, &input_ids, &out, device),
        Command::EncodeImage { vision, image, layer, out, device } => encode_image::run(&vision, &image, layer, &out, device),
        Command::Train { config, overrides, resume, out, study, quick, ablation, seeds, device } => {
            train::run(train::TrainArgs { config, overrides, resume, out, study, quick, ablation, seeds, device })
        }
        Command::Generate(a) => generate::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Init(a) => init::run(a),
        Command::BenchKernels(a) => bench_kernels::run(a),
        Command::BenchStep(a) => bench_step::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Launch(a) => launch::run(a),
    }
}

/// Resolves `--device`: `auto` is CUDA when this build has its kernels and a CUDA device is
/// present, else the CPU; `cuda` without a device, or in a build without kernels, is an error that
/// says which. Detection never panics (a missing libcuda is checked before any CUDA call).
pub fn resolve_device(d: Device) -> Result<Device> {
    use crate::backend::cuda::unavailable_reason;
    match d {
        Device::Cpu => Ok(Device::Cpu),
        Device::Auto => Ok(if unavailable_reason().is_none() { Device::Cuda } else { Device::Cpu }),
        Device::Cuda => match unavailable_reason() {
            None => Ok(Device::Cuda),
            Some(why) => bail!("--device cuda: {why}; use --device cpu"),
        },
    }
}

/// Runs `$body` with `$be` bound to the backend `--device` resolves to: a `CpuBackend<f32>` or a
/// `CudaBackend` (the body is generic code, compiled once per backend).
#[macro_export]
macro_rules! with_backend {
    ($device:expr, $be:ident => $body:expr) => {
        match $crate::cli::resolve_device($device)? {
            $crate::cli::Device::Cuda => {
                let $be = $crate::backend::cuda::CudaBackend::new()?;
                $body
            }
            _ => {
                let $be = $crate::backend::cpu::CpuBackend::<f32>::new();
                $body
            }
        }
    };
}
