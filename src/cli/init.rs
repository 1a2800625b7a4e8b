//! `kd-engine init`: a randomly initialised model of a real shape (Qwen, SigLIP presets) written
//! in Hugging Face layout, so smoke tests need no downloads (`crate::model::presets`).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::model::presets::{self, human_count, InitOptions, PresetModel};
use crate::weights::StoreDtype;

/// Storage type of the written weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum InitDtype {
    Bf16,
    F32,
}

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Preset to write (see --list).
    #[arg(long, required_unless_present = "list")]
    preset: Option<String>,
    /// Output folder (must not exist, or be empty).
    #[arg(long, required_unless_present = "list")]
    out: Option<PathBuf>,
    /// Seed of the random weights (the same seed gives the same weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = InitDtype::Bf16)]
    dtype: InitDtype,
    /// Print the presets with their parameter counts and exit.
    #[arg(long)]
    list: bool,
    /// Largest shard file (e.g. 5GB, 500MB); larger checkpoints are sharded with an index.
    #[arg(long, default_value = "5GB")]
    max_shard_size: String,
    /// A tokenizer.json (or a folder with one) to copy into a decoder's folder.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Divide the shape by this factor (heads, intermediate, layers, vocabulary): a test hook.
    #[arg(long, default_value_t = 1, hide = true)]
    scale_down: usize,
}

/// The `--list` table.
pub fn list_table() -> String {
    let mut out = format!("{:<27} {:<18} {:>8}  shape\n", "preset", "kind", "params");
    for p in presets::all().iter().filter(|p| !p.hidden) {
        let mut shape = p.describe();
        if let PresetModel::Vision(_) = p.model {
            shape.push_str(&format!("; {} without the pooling head LLaVA does not run", human_count(p.llava_param_count())));
        }
        out.push_str(&format!("{:<27} {:<18} {:>8}  {}\n", p.name, p.kind(), human_count(p.param_count()), shape));
    }
    out
}

pub fn run(a: InitArgs) -> Result<()> {
    if a.list {
        print!("{}", list_table());
        return Ok(());
    }
    let (name, out) = (a.preset.context("--preset is required")?, a.out.context("--out is required")?);
    anyhow::ensure!(a.scale_down >= 1, "--scale-down must be at least 1");
    let preset = presets::find(&name)?.scaled(a.scale_down);
    let opts = InitOptions {
        seed: a.seed,
        dtype: match a.dtype {
            InitDtype::Bf16 => StoreDtype::Bf16,
            InitDtype::F32 => StoreDtype::F32,
        },
        max_shard_bytes: presets::parse_size(&a.max_shard_size).context("--max-shard-size")?,
        tokenizer: a.tokenizer,
    };
    eprintln!(
        "init: {} ({}, {} parameters, {}) → {}",
        preset.name,
        preset.kind(),
        human_count(preset.param_count()),
        preset.describe(),
        out.display()
    );
    let s = presets::write_preset(&preset, &out, &opts)?;
    eprintln!(
        "wrote {} tensors ({:.2} GB of {}) in {} weight file{}: {}",
        s.tensors,
        s.bytes as f64 / 1e9,
        opts.dtype.torch_name(),
        s.shards.len(),
        if s.shards.len() == 1 { "" } else { "s" },
        s.files.join(", ")
    );
    Ok(())
}
