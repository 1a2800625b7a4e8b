//! `kd-engine launch --gpus N -- train --config FILE`: one process per local GPU with the launcher
//! variables torchrun sets (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`);
//! when one rank fails, the others are stopped and the launcher exits with an error naming it.

use anyhow::{Context, Result};

use crate::dist::launch::{launch, LaunchSpec};

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start on this node, one per GPU (rank r uses GPU LOCAL_RANK).
    #[arg(long)]
    gpus: usize,
    /// Nodes in the job (start `kd-engine launch` on each with its --node-rank).
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index in 0..nnodes.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Host of rank 0 (node 0), reachable from every node; default for one node: 127.0.0.1.
    #[arg(long)]
    master_addr: Option<String>,
    /// Port on rank 0's host for the rendezvous; default for one node: a free one.
    #[arg(long)]
    master_port: Option<u16>,
    /// The kd-engine command every rank runs, after `--`: e.g. `-- train --config run.toml`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(a: LaunchArgs) -> Result<()> {
    let program = std::env::current_exe().context("locating the kd-engine executable to start the ranks")?;
    let spec = LaunchSpec { gpus: a.gpus, nnodes: a.nnodes, node_rank: a.node_rank, master_addr: a.master_addr, master_port: a.master_port };
    launch(&program, &a.command, &spec)
}
