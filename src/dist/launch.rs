//! Processes of a multi-GPU job: the launcher variables each rank reads (torchrun's names), and
//! `kd-engine launch`, which starts one process per local GPU with them and supervises the job:
//! when a rank exits with an error, the others are stopped and the launcher fails naming it.

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

/// Where one process sits in the job, from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
/// `MASTER_PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// The GPU of this process on its node.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankEnv {
    /// From the process environment; `None` without `WORLD_SIZE` (a plain single process).
    pub fn from_env() -> Result<Option<RankEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables looked up by `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let Some(world) = get("WORLD_SIZE") else { return Ok(None) };
        let num = |k: &str, v: &str| -> Result<usize> { v.trim().parse().with_context(|| format!("{k}={v:?} is not a non-negative whole number")) };
        let world = num("WORLD_SIZE", &world)?;
        ensure!(world >= 1, "WORLD_SIZE=0: a job needs at least one rank");
        let rank = match get("RANK") {
            Some(v) => num("RANK", &v)?,
            None if world == 1 => 0,
            None => bail!("WORLD_SIZE={world} but RANK is not set"),
        };
        ensure!(rank < world, "RANK={rank} is not below WORLD_SIZE={world}");
        let local_rank = get("LOCAL_RANK").map(|v| num("LOCAL_RANK", &v)).transpose()?.unwrap_or(rank);
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match get("MASTER_PORT") {
            Some(v) => v.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={v:?} is not a port number"))?,
            None if world == 1 => 0,
            None => bail!("WORLD_SIZE={world} but MASTER_PORT is not set (rank 0 serves the NCCL id there)"),
        };
        Ok(Some(RankEnv { rank, world, local_rank, master_addr, master_port }))
    }
}

/// What `kd-engine launch` starts on this node.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// Processes (GPUs) on this node.
    pub gpus: usize,
    pub nnodes: usize,
    /// This node's index: its ranks are `node_rank · gpus ..`.
    pub node_rank: usize,
    /// Rank 0's host; for one node, this machine.
    pub master_addr: Option<String>,
    /// Rank 0's rendezvous port; for one node, a free one is picked.
    pub master_port: Option<u16>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for MASTER_PORT")?;
    Ok(l.local_addr()?.port())
}

/// Starts `program args` once per GPU of this node with the launcher variables set, then waits:
/// Ok when every rank exits successfully; when one fails (an error exit or a signal), the
/// others are killed and the error names the rank and how it ended.
pub fn launch(program: &Path, args: &[String], spec: &LaunchSpec) -> Result<()> {
    ensure!(spec.gpus >= 1 && spec.nnodes >= 1, "launch: --gpus and --nnodes must be at least 1");
    ensure!(spec.node_rank < spec.nnodes, "launch: --node-rank {} is not below --nnodes {}", spec.node_rank, spec.nnodes);
    let (addr, port) = match (&spec.master_addr, spec.master_port) {
        (addr, Some(p)) => (addr.clone().unwrap_or_else(|| "127.0.0.1".into()), p),
        (None, None) if spec.nnodes == 1 => ("127.0.0.1".to_string(), free_port()?),
        _ => bail!("launch: a job over {} nodes needs --master-addr and --master-port (rank 0's host and a free port there)", spec.nnodes),
    };
    let world = spec.gpus * spec.nnodes;
    let mut children: Vec<(usize, Child)> = Vec::new();
    for local in 0..spec.gpus {
        let rank = spec.node_rank * spec.gpus + local;
        let child = Command::new(program)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", spec.gpus.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop(&mut children);
                bail!("launch: starting rank {rank} ({}): {e}", program.display());
            }
        }
    }
    supervise(children)
}

/// Kills the children still running (each by its own handle) and reaps them.
fn stop(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

fn supervise(mut children: Vec<(usize, Child)>) -> Result<()> {
    let n = children.len();
    let mut done = vec![false; n];
    loop {
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            match c.try_wait() {
                Ok(Some(status)) if status.success() => done[i] = true,
                Ok(Some(status)) => {
                    let rank = *rank;
                    let others = done.iter().filter(|d| !**d).count() - 1;
                    stop(&mut children);
                    bail!("rank {rank} ended with {status}; stopped the {others} other running rank(s) of this node");
                }
                Ok(None) => {}
                Err(e) => {
                    let rank = *rank;
                    stop(&mut children);
                    bail!("launch: waiting for rank {rank}: {e}");
                }
            }
        }
        if done.iter().all(|d| *d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn reads_torchrun_variables_and_names_bad_ones() {
        assert_eq!(RankEnv::from_vars(vars(&[])).unwrap(), None);
        let e = RankEnv::from_vars(vars(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")])).unwrap().unwrap();
        assert_eq!(e, RankEnv { rank: 2, world: 4, local_rank: 0, master_addr: "node0".into(), master_port: 29500 });
        let one = RankEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap().unwrap();
        assert_eq!((one.rank, one.world, one.local_rank), (0, 1, 0));
        for (bad, want) in [
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE=\"two\""),
            (vec![("WORLD_SIZE", "2"), ("MASTER_PORT", "1")], "RANK is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")], "RANK=2 is not below WORLD_SIZE=2"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "1")], "MASTER_PORT is not set"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "99999")], "MASTER_PORT=\"99999\""),
        ] {
            let e = RankEnv::from_vars(vars(&bad)).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
