//! `kd-engine generate` (not built yet).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

pub fn run(_a: GenerateArgs) -> Result<()> {
    Err(super::not_built("generate"))
}
