//! `kd-engine launch`: the ranks it starts get the launcher variables; a rank that fails stops
//! the others and the launcher fails naming it; `train` under it on a machine without CUDA says
//! why instead of waiting for peers.

use std::path::Path;
use std::time::{Duration, Instant};

use kd_engine::dist::launch::{launch, LaunchSpec};

fn spec(gpus: usize) -> LaunchSpec {
    LaunchSpec { gpus, nnodes: 1, node_rank: 0, master_addr: None, master_port: None }
}

fn sh(script: &str) -> Vec<String> {
    vec!["-c".into(), script.into()]
}

#[test]
fn every_rank_gets_the_launcher_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let script = format!("echo $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT > {}/rank$RANK", tmp.path().display());
    launch(Path::new("sh"), &sh(&script), &spec(3)).unwrap();
    let mut port = None;
    for r in 0..3 {
        let line = std::fs::read_to_string(tmp.path().join(format!("rank{r}"))).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&f[..5], &[r.to_string().as_str(), r.to_string().as_str(), "3", "3", "127.0.0.1"], "{line}");
        assert!(f[5].parse::<u16>().is_ok_and(|p| p > 0));
        assert!(*port.get_or_insert(f[5].to_string()) == f[5], "every rank gets the same MASTER_PORT");
    }
    // Node 1 of 2 numbers its ranks after node 0's.
    let s = LaunchSpec { gpus: 2, nnodes: 2, node_rank: 1, master_addr: Some("10.0.0.1".into()), master_port: Some(29500) };
    launch(Path::new("sh"), &sh(&script), &s).unwrap();
    let line = std::fs::read_to_string(tmp.path().join("rank3")).unwrap();
    assert_eq!(line.trim(), "3 1 4 2 10.0.0.1 29500");
    let e = launch(Path::new("sh"), &sh("true"), &LaunchSpec { master_port: None, ..s }).unwrap_err().to_string();
    assert!(e.contains("needs --master-addr and --master-port"), "{e}");
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    let started = Instant::now();
    // Rank 2 fails after a moment; the others would run for a minute.
    let e = launch(Path::new("sh"), &sh("if [ $RANK = 2 ]; then sleep 0.3; exit 3; fi; exec sleep 60"), &spec(4)).unwrap_err().to_string();
    assert!(e.contains("rank 2 ended with exit status: 3") && e.contains("stopped the 3 other running rank(s)"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10), "the launcher took {:?}", started.elapsed());
    // A rank killed by a signal is a failure too.
    let e = launch(Path::new("sh"), &sh("if [ $RANK = 1 ]; then kill -9 $$; fi; exec sleep 60"), &spec(2)).unwrap_err().to_string();
    assert!(e.contains("rank 1 ended with signal: 9"), "{e}");
}

#[test]
fn train_under_launch_without_cuda_fails_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, "[run]\ndevice = \"cpu\"\n[student]\nllm = \"a\"\nvision = \"b\"\n[[stage]]\nkind = \"sft\"\ndata = \"d.json\"\nlr = 1e-3\nglobal_batch = 8\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["launch", "--gpus", "2", "--", "train", "--config"]).arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains("WORLD_SIZE=2: multi-process training runs on CUDA with NCCL") && err.contains("ended with exit status: 1"), "{err}");
}
