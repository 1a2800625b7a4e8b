//! `kd-engine bench-kernels` (not built yet).

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct BenchKernelsArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

pub fn run(_a: BenchKernelsArgs) -> Result<()> {
    Err(super::not_built("bench-kernels"))
}
