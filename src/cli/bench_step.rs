//! `kd-engine bench-step` (not built yet).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct BenchStepArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

pub fn run(_a: BenchStepArgs) -> Result<()> {
    Err(super::not_built("bench-step"))
}
