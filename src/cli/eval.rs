//! `kd-engine eval` (not built yet).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

pub fn run(_a: EvalArgs) -> Result<()> {
    Err(super::not_built("eval"))
}
