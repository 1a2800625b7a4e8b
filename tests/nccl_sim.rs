//! The multi-process NCCL path on the simulated CUDA device (`KD_CUDA_SIM=1`, the simulated NCCL
//! of `kernels/sim/nccl.cpp`): `kd-engine launch --gpus 2 -- train` against the 1-rank run of
//! the same config (with and without ZeRO-1), `selftest --nccl` under the launcher, every
//! collective of the stand-in against values computed here, and a rank killed or hung mid-run.
//!
//! Tolerance of the 2-rank run: its first step is the 1-rank step (same weights, same samples,
//! the loss sums added in global micro-batch order), so its losses must be equal to the bit. The
//! gradients then differ in rounding only: one rank accumulates both micro-batches into its bf16
//! gradient buffers, two ranks each hold one and the reduction adds them (in f32, rounded once),
//! so each gradient element differs by up to about one bf16 rounding (2⁻⁸ relative); AdamW's
//! normalised update moves weights by lr·O(1) whatever the gradient's scale, so the next losses
//! move by far less than that: 5e-3 relative (the bf16 tolerance of tests/cuda_sim.rs) is ample,
//! while a wrong reduction (a rank's gradients lost, or counted twice) changes the next step's
//! loss by the full size of a step's update. The relation term (1 − cos, cos ≈ 1) is compared
//! absolutely, 1e-3, as in tests/cuda_sim.rs, and the small KL terms (~0.03) relative to 0.1, since
//! the same absolute noise is a larger part of them (5e-4 absolute). Measured over the 6 steps:
//! loss and CE within 4.1e-4 relative, the KL terms within 1.4e-4 absolute, the relation term
//! within 1.7e-4 absolute.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cudarc::driver::result as dr;
use cudarc::driver::CudaContext;
use cudarc::nccl::{result as nc, sys as ns};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::cuda::sim;
use kd_engine::backend::GeluKind;
use kd_engine::data::{write_study_data, StudySpec};
use kd_engine::model::{export_llava, Arch, ExportOptions, LlmConfig, VisionConfig};
use kd_engine::train::study::{new_model, write_vision_tower};

fn kd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kd-engine"));
    // Two simulated devices, so rank 1 can open LOCAL_RANK 1.
    c.env("KD_CUDA_SIM", "1").env("KD_SIM_DEVICES", "2");
    c
}

/// `kd-engine train` of `cfg` into `out` with `--set` overrides `sets`, on `ranks` simulated
/// devices (through `kd-engine launch` when more than one).
fn train(ranks: usize, cfg: &Path, out: &Path, sets: &[&str]) -> Command {
    let mut c = kd();
    if ranks > 1 {
        c.args(["launch", "--gpus", &ranks.to_string(), "--"]);
    }
    c.args(["train", "--config"]).arg(cfg).arg("--out").arg(out);
    for s in sets {
        c.args(["--set", s]);
    }
    c
}


/// A tiny teacher and student (head_dim 64: the CUDA attention kernels' size) exported as
/// LLaVA folders, the study data, and a config of `dpt_steps` DPT steps then two SFT and two DFT
/// steps, global batch 4 in micro-batches of 2 (one per rank at world size 2), no warm-up (so
/// every step updates the weights).
fn write_job(root: &Path, dpt_steps: usize) -> PathBuf {
    let spec = StudySpec { pretrain_samples: 16, sft_samples: 8, eval_questions: 4, train_images: 6, eval_images: 4, image_size: 16, ..StudySpec::quick() };
    let files = write_study_data(&root.join("data"), &spec).unwrap();
    let vision = root.join("vision");
    let vcfg = VisionConfig { hidden: 64, intermediate: 96, layers: 2, heads: 1, channels: 3, image_size: 16, patch_size: 4, ln_eps: 1e-6, act: GeluKind::Tanh };
    write_vision_tower(&vision, &vcfg, 3).unwrap();
    let vocab = kd_engine::data::load_tokenizer(&files.tokenizer).unwrap().get_vocab_size(true);
    let llm = |heads: usize| LlmConfig {
        arch: Arch::Qwen2,
        hidden: 64 * heads,
        intermediate: 96 * heads,
        layers: 2,
        heads,
        kv_heads: 1,
        head_dim: 64,
        vocab,
        rms_eps: 1e-6,
        rope_theta: 1e4,
        tie_embeddings: true,
        qkv_bias: true,
        o_bias: false,
    };
    let cpu = CpuBackend::<f32>::new();
    let opts = ExportOptions { tokenizer: Some(&files.tokenizer), ..Default::default() };
    for (name, heads, seed) in [("teacher", 2, 9), ("student", 1, 1)] {
        let m = new_model(&cpu, &vision, &llm(heads), &files.tokenizer, seed).unwrap();
        export_llava(&cpu, &root.join(name), &m.model, &m.weights, &opts).unwrap();
    }
    let cfg = format!(
        r#"
[run]
device = "cuda"
log_every = 1
checkpoint_every = 0
dist_timeout_s = 60

[student]
llava = "{student}"

[teacher]
llava = "{teacher}"

[[stage]]
kind = "dpt"
data = "{pt}"
lr = 3e-3
global_batch = 4
micro_batch = 2
max_steps = {dpt_steps}
warmup_ratio = 0.0

[[stage]]
kind = "sft"
data = "{sft}"
lr = 3e-3
global_batch = 4
micro_batch = 2
max_steps = 2
warmup_ratio = 0.0

[[stage]]
kind = "dft"
data = "{sft}"
lr = 3e-3
global_batch = 4
micro_batch = 2
max_steps = 2
warmup_ratio = 0.0
"#,
        student = root.join("student").display(),
        teacher = root.join("teacher").display(),
        pt = files.pretrain.display(),
        sft = files.sft.display(),
    );
    let path = root.join("job.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn check(out: std::process::Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// (stage, step, term, value) for every loss term of every optimizer step in `metrics.jsonl`.
fn losses(run: &Path) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(o) = v.as_object().filter(|o| o.contains_key("loss")) else { continue };
        for k in ["loss", "ce", "res", "prompt", "vis", "rel"] {
            if let Some(x) = o.get(k).and_then(|x| x.as_f64()) {
                out.push((format!("line {i} {k}"), x));
            }
        }
    }
    out
}

#[test]
fn two_ranks_over_the_simulated_nccl_train_what_one_rank_trains() {
    if !common::simulated_device_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = write_job(root, 2);
    let one = root.join("one");
    let two = root.join("two");
    let started = Instant::now();
    check(train(1, &cfg, &one, &[]).output().unwrap(), "the 1-rank run");
    let one_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let text = check(train(2, &cfg, &two, &[]).output().unwrap(), "the 2-rank run");
    println!("1 rank {one_s:.1} s, 2 ranks {:.1} s", started.elapsed().as_secs_f64());
    assert!(text.contains("DFT step 2/2"), "the 2-rank run logs its steps:\n{text}");
    let (want, got) = (losses(&one), losses(&two));
    assert!(want.len() >= 4 * 3, "every step's terms: {want:?}");
    assert_eq!(got.len(), want.len(), "the same terms and steps:\n{got:?}\n{want:?}");
    // The first step's terms come first, until the next `loss`.
    let first_step = 1 + want.iter().skip(1).position(|(k, _)| k.ends_with(" loss")).unwrap();
    for (i, ((k, g), (_, w))) in got.iter().zip(&want).enumerate() {
        // The relation term is 1 − cos with cos ≈ 1: compared absolutely, as in tests/cuda_sim.rs.
        // The other terms relative to their size, or to 0.1 for the small KL terms (~0.03), whose
        // bf16 noise is a larger part of themselves.
        let (err, tol) = if k.ends_with(" rel") { ((g - w).abs(), 1e-3) } else { ((g - w).abs() / w.abs().max(0.1), 5e-3) };
        let tol = if i < first_step { 0.0 } else { tol };
        println!("{k:<12} 2 ranks {g:.6} 1 rank {w:.6} rel err {err:.2e} (tol {tol:.0e})");
        assert!(err <= tol, "{k}: {g} with 2 ranks, {w} with 1");
    }
    // Rank 0 alone writes the run (one metrics file, one exported student).
    assert!(two.join("student/config.json").is_file());
    // Plain data parallelism (all-reduce, every rank updates everything) is ZeRO-1 (the default:
    // reduce to owners, owners update, broadcast) to the bit: the same sums, the same updates.
    let plain = root.join("plain");
    check(train(2, &cfg, &plain, &["run.zero=false"]).output().unwrap(), "the 2-rank run without ZeRO-1");
    assert_eq!(losses(&plain), got, "plain data parallelism and ZeRO-1 differ");
}

#[test]
fn selftest_nccl_passes_on_two_simulated_ranks() {
    if !common::simulated_device_built() {
        return;
    }
    let text = check(kd().args(["launch", "--gpus", "2", "--", "selftest", "--nccl"]).output().unwrap(), "selftest --nccl on 2 ranks");
    for r in 0..2 {
        assert!(text.contains(&format!("nccl: rank {r} of 2")) && text.contains("passed all_gather_host of 2 ranks"), "{text}");
    }
}

/// Runs 2 ranks (without the launcher, which would stop the others itself) with `set` overrides,
/// sends `signal` to rank 1 once rank 0 (the one that logs) has finished its first step, and
/// returns how long rank 0 ran on after it and its stderr; rank 0 must fail.
fn peer_fails(signal: &str, set: &str) -> (Duration, String) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_job(tmp.path(), 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let rank = |r: usize| {
        train(1, &cfg, &tmp.path().join("run"), &[set])
            .envs([("RANK", r.to_string()), ("WORLD_SIZE", "2".into()), ("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", port.to_string())])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut r0 = rank(0);
    let mut r1 = rank(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = r0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("DPT step 1/") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    assert!(rx.recv_timeout(Duration::from_secs(240)).is_ok(), "rank 0 did not finish its first step");
    let sent = Command::new("kill").args([signal, &r1.id().to_string()]).status().unwrap();
    assert!(sent.success());
    let at = Instant::now();
    let status = loop {
        if let Some(s) = r0.try_wait().unwrap() {
            break s;
        }
        assert!(at.elapsed() < Duration::from_secs(50), "rank 0 still runs {:?} after rank 1 got {signal}", at.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    };
    let after = at.elapsed();
    let err = reader.join().unwrap();
    // Rank 1 is left unreaped until here, as a rank of a torchrun-like launcher may be.
    let _ = r1.kill();
    let _ = r1.wait();
    println!("rank 0 ended {:.2} s after rank 1 got {signal}:\n{err}", after.as_secs_f64());
    assert!(!status.success(), "rank 0 succeeded without its peer:\n{err}");
    (after, err)
}

/// A rank killed during training ends the other with an error naming it at once.
#[test]
fn a_killed_rank_ends_the_other_with_an_error_naming_it() {
    if !common::simulated_device_built() {
        return;
    }
    let (after, err) = peer_fails("-KILL", "run.dist_timeout_s=60");
    assert!(err.contains("rank 1 (pid") && err.contains("exited") && err.contains("ncclRemoteError") && err.contains("the job stops"), "{err}");
    assert!(after < Duration::from_secs(10), "{after:?}: a dead peer is seen without waiting for the timeout");
}

/// A rank that hangs (stopped) ends the other at the job's timeout, naming the late rank.
#[test]
fn a_hung_rank_ends_the_other_at_the_timeout_naming_it() {
    if !common::simulated_device_built() {
        return;
    }
    let (after, err) = peer_fails("-STOP", "run.dist_timeout_s=8");
    assert!(err.contains("rank(s) 1 did not arrive within 8 s") && err.contains("ncclTimeout") && err.contains("the job stops"), "{err}");
    assert!(after >= Duration::from_secs(7), "{after:?}: failed before the timeout");
}

/// The element types the check below covers, with how a value is stored and what an average of
/// 3 values rounds to under the simulated NCCL's documented rules (f32, f64 accumulate in
/// themselves; bf16, f16 in f32, rounded once).
#[derive(Clone, Copy, Debug)]
enum Ty {
    F32,
    F64,
    Bf16,
    F16,
}

impl Ty {
    fn nccl(self) -> ns::ncclDataType_t {
        match self {
            Ty::F32 => ns::ncclDataType_t::ncclFloat32,
            Ty::F64 => ns::ncclDataType_t::ncclFloat64,
            Ty::Bf16 => ns::ncclDataType_t::ncclBfloat16,
            Ty::F16 => ns::ncclDataType_t::ncclFloat16,
        }
    }
    fn size(self) -> usize {
        match self {
            Ty::F32 => 4,
            Ty::F64 => 8,
            Ty::Bf16 | Ty::F16 => 2,
        }
    }
    /// Stores `x` (exactly representable, or rounded to nearest even).
    fn bytes(self, xs: impl IntoIterator<Item = f64>) -> Vec<u8> {
        xs.into_iter()
            .flat_map(|x| match self {
                Ty::F32 => (x as f32).to_le_bytes().to_vec(),
                Ty::F64 => x.to_le_bytes().to_vec(),
                Ty::Bf16 => half::bf16::from_f64(x).to_le_bytes().to_vec(),
                Ty::F16 => half::f16::from_f64(x).to_le_bytes().to_vec(),
            })
            .collect()
    }
    /// The mean of values whose (exact) sum is `s` over `n` ranks, as the type computes it.
    fn mean(self, s: f64, n: usize) -> f64 {
        match self {
            Ty::F64 => s / n as f64,
            _ => (s as f32 / n as f32) as f64,
        }
    }
}

/// Small integers, exact in every type and in every sum of a few of them.
fn value(rank: usize, i: usize) -> f64 {
    ((i * 7 + rank * 13) % 23) as f64 - 11.0
}

fn device(bytes: &[u8]) -> u64 {
    // SAFETY: a fresh allocation of the slice's size, then a copy of it.
    unsafe {
        let p = dr::malloc_sync(bytes.len()).unwrap();
        dr::memcpy_htod_sync(p, bytes).unwrap();
        p
    }
}

fn host(p: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    // SAFETY: p holds at least len bytes.
    unsafe { dr::memcpy_dtoh_sync(&mut out, p).unwrap() };
    out
}

/// Every collective the stand-in offers, on 3 ranks (threads of this process, each with its own
/// communicator as a process would have), in f32, f64, bf16 and f16, with sum, max, min and avg,
/// on sizes that take several staging chunks (2 MiB per rank) and do not divide into them,
/// against the values computed here; then buffer checks and a rank's abort.
#[test]
fn the_simulated_nccl_computes_every_collective_type_and_reduction() {
    if !common::simulated_device_built() {
        return;
    }
    std::env::set_var("KD_CUDA_SIM", "1");
    sim::activate().unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let id = nc::get_uniqueid().unwrap();
    const WORLD: usize = 3;
    const N: usize = 1_100_003;
    let ranks: Vec<_> = (0..WORLD)
        .map(|rank| {
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                ctx.bind_to_thread().unwrap();
                let mut comm: ns::ncclComm_t = std::ptr::null_mut();
                // SAFETY: every rank joins with the same id and world size.
                unsafe { nc::comm_init_rank(&mut comm, WORLD as i32, id, rank as i32) }.unwrap();
                let s = std::ptr::null_mut();
                let sum = |i: usize| (0..WORLD).map(|r| value(r, i)).sum::<f64>();
                let per_rank = |r: usize| (0..N).map(move |i| value(r, i));
                for ty in [Ty::F32, Ty::F64, Ty::Bf16, Ty::F16] {
                    use ns::ncclRedOp_t::*;
                    for (op, want) in [
                        (ncclSum, &(|i| sum(i)) as &dyn Fn(usize) -> f64),
                        (ncclMax, &|i| (0..WORLD).map(|r| value(r, i)).fold(f64::MIN, f64::max)),
                        (ncclMin, &|i| (0..WORLD).map(|r| value(r, i)).fold(f64::MAX, f64::min)),
                        (ncclAvg, &|i| ty.mean(sum(i), WORLD)),
                    ] {
                        let send = device(&ty.bytes(per_rank(rank)));
                        // In place for the sum, into another buffer otherwise.
                        let recv = if op == ncclSum { send } else { device(&vec![0u8; N * ty.size()]) };
                        // SAFETY: both hold N elements of ty.
                        unsafe { nc::all_reduce(send as _, recv as _, N, ty.nccl(), op, comm, s) }.unwrap();
                        assert!(host(recv, N * ty.size()) == ty.bytes((0..N).map(want)), "rank {rank}: all-reduce {op:?} in {ty:?}");
                    }
                }
                // Reduce-scatter: rank r gets the sum of the r-th block of every rank's buffer.
                let block = N / WORLD;
                let send = device(&Ty::F32.bytes((0..block * WORLD).map(|i| value(rank, i))));
                let recv = device(&vec![0u8; block * 4]);
                // SAFETY: send holds WORLD·block f32, recv block.
                unsafe { nc::reduce_scatter(send as _, recv as _, block, Ty::F32.nccl(), ns::ncclRedOp_t::ncclSum, comm, s) }.unwrap();
                assert!(host(recv, block * 4) == Ty::F32.bytes((rank * block..(rank + 1) * block).map(sum)), "rank {rank}: reduce-scatter");
                // All-gather in bf16 (in place: each rank's block already at its place).
                let all = device(&Ty::Bf16.bytes((0..block * WORLD).map(|i| value(i / block, i))));
                // SAFETY: all holds WORLD·block bf16; this rank's block is its send buffer.
                unsafe { nc::all_gather((all + (rank * block * 2) as u64) as _, all as _, block, Ty::Bf16.nccl(), comm, s) }.unwrap();
                assert!(host(all, block * WORLD * 2) == Ty::Bf16.bytes((0..block * WORLD).map(|i| value(i / block, i))), "rank {rank}: all-gather");
                // Broadcast from rank 2 in f64; reduce (max) to rank 1 in f16.
                let buf = device(&Ty::F64.bytes(per_rank(rank)));
                // SAFETY: N f64 on every rank.
                unsafe { nc::broadcast(buf as _, buf as _, N, Ty::F64.nccl(), 2, comm, s) }.unwrap();
                assert!(host(buf, N * 8) == Ty::F64.bytes(per_rank(2)), "rank {rank}: broadcast");
                let buf = device(&Ty::F16.bytes(per_rank(rank)));
                // SAFETY: N f16 on every rank.
                unsafe { nc::reduce(buf as _, buf as _, N, Ty::F16.nccl(), ns::ncclRedOp_t::ncclMax, 1, comm, s) }.unwrap();
                if rank == 1 {
                    assert!(host(buf, N * 2) == Ty::F16.bytes((0..N).map(|i| (0..WORLD).map(|r| value(r, i)).fold(f64::MIN, f64::max))), "reduce to rank 1");
                }
                // A buffer shorter than the count is refused before anything moves (so the ranks
                // stay in step), as NCCL's argument checks would.
                let short = device(&[0u8; 64]);
                // SAFETY: the simulated NCCL checks the range against the allocation.
                let e = unsafe { nc::all_reduce(short as _, short as _, 17, Ty::F32.nccl(), ns::ncclRedOp_t::ncclSum, comm, s) }.err().expect("an error");
                assert_eq!(e.0, ns::ncclResult_t::ncclInvalidArgument, "rank {rank}");
                // Rank 2 aborts: the others' next collective fails, and stays failed.
                if rank == 2 {
                    // SAFETY: a live communicator, not used again.
                    unsafe { nc::comm_abort(comm) }.unwrap();
                    return;
                }
                let buf = device(&[0u8; 64]);
                // SAFETY: 16 f32.
                let e = unsafe { nc::all_reduce(buf as _, buf as _, 16, Ty::F32.nccl(), ns::ncclRedOp_t::ncclSum, comm, s) }.err().expect("an error");
                assert_eq!(e.0, ns::ncclResult_t::ncclRemoteError, "rank {rank}");
                let mut async_err = ns::ncclResult_t::ncclSuccess;
                // SAFETY: a live communicator and an out pointer.
                unsafe { ns::ncclCommGetAsyncError(comm, &mut async_err) };
                assert_eq!(async_err, ns::ncclResult_t::ncclRemoteError, "rank {rank}");
                // SAFETY: a live communicator, destroyed once.
                unsafe { nc::comm_destroy(comm) }.unwrap();
            })
        })
        .collect();
    for (r, t) in ranks.into_iter().enumerate() {
        assert!(t.join().is_ok(), "rank {r} failed");
    }
}

/// Checks one rank's trace (`KD_SIM_TRACE`, written by the simulated driver and NCCL) of a run
/// with gradient buckets reduced during the backward; returns how many bucket collectives ran on
/// the side stream and how many of those had a backward kernel launched after them in the same
/// step (before the optimizer).
fn check_trace(trace: &str) -> (usize, usize) {
    let lines: Vec<&str> = trace.lines().collect();
    let stream = |l: &str| l.split_whitespace().find_map(|w| w.strip_prefix('s').and_then(|n| n.parse::<u32>().ok()));
    // Where each event was last recorded, as of each line.
    let mut recorded_on = std::collections::HashMap::new();
    let (mut side, mut overlapped) = (0, 0);
    let mut last_side_collective: Option<(usize, u32)> = None;
    for (i, l) in lines.iter().enumerate() {
        let word: Vec<&str> = l.split_whitespace().collect();
        match word[0] {
            "record" => {
                recorded_on.insert(word[1], stream(l).unwrap());
            }
            "ncclAllReduce" | "ncclReduce" if stream(l) != Some(0) => {
                let s = stream(l).unwrap();
                side += 1;
                // Within a group: after the group's first collective; the first follows a wait
                // of the side stream for an event recorded on the compute stream.
                let first = lines[..i].iter().rposition(|p| !(p.starts_with("ncclAllReduce") || p.starts_with("ncclReduce")) || stream(p) != Some(s)).unwrap();
                let w: Vec<&str> = lines[first].split_whitespace().collect();
                assert!(w[0] == "wait" && stream(lines[first]) == Some(s), "line {i} ({l}): the bucket does not wait for the compute stream first: {}", lines[first]);
                assert_eq!(recorded_on.get(w[2]), Some(&0), "line {i}: the side stream waits for {}, not an event of the compute stream", w[2]);
                // A backward kernel on the compute stream after it, before the optimizer's.
                let rest = &lines[i + 1..];
                let optimizer = rest.iter().position(|p| p.starts_with("launch adamw")).unwrap_or(rest.len());
                if rest[..optimizer].iter().any(|p| p.starts_with("launch") && p.contains("_bwd") && stream(p) == Some(0)) {
                    overlapped += 1;
                }
                last_side_collective = Some((i, s));
            }
            "launch" if l.starts_with("launch adamw") => {
                // The optimizer reads the reduced gradients: the compute stream must wait for an
                // event recorded on the side stream after its last collective.
                if let Some((at, s)) = last_side_collective.take() {
                    let waited = lines[at..i].iter().any(|p| {
                        let w: Vec<&str> = p.split_whitespace().collect();
                        w[0] == "wait" && stream(p) == Some(0) && recorded_on.get(w[2]) == Some(&s)
                    });
                    assert!(waited, "line {i}: the optimizer does not wait for the side stream's reductions (lines {at}..{i})");
                }
            }
            _ => {}
        }
    }
    (side, overlapped)
}

/// On the simulated device, with small buckets: every gradient bucket is reduced on a second
/// stream after an event of the compute stream, backward kernels still run on the compute
/// stream after buckets were started (the reduction overlaps the backward), and the optimizer's
/// stream waits for the side stream's event; the losses equal the run without overlap.
#[test]
fn gradient_buckets_run_on_a_second_stream_during_the_backward() {
    if !common::simulated_device_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = write_job(root, 1);
    let run = |name: &str, overlap: bool, trace: Option<&Path>| {
        let mut c = train(2, &cfg, &root.join(name), &["run.bucket_mb=0.01", &format!("run.overlap_reduction={overlap}")]);
        if let Some(t) = trace {
            c.env("KD_SIM_TRACE", t);
        }
        check(c.output().unwrap(), name);
        losses(&root.join(name))
    };
    let traces = root.join("traces");
    std::fs::create_dir(&traces).unwrap();
    let on = run("on", true, Some(&traces));
    let off = run("off", false, None);
    assert_eq!(on, off, "overlapping the reduction changed the losses");
    let files: Vec<PathBuf> = std::fs::read_dir(&traces).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 2, "one trace per rank: {files:?}");
    for f in files {
        let (side, overlapped) = check_trace(&std::fs::read_to_string(&f).unwrap());
        println!("{}: {side} bucket collectives on the side stream, {overlapped} with backward kernels after them", f.display());
        assert!(side >= 20, "{side} bucket collectives on the side stream");
        assert!(overlapped * 2 >= side, "only {overlapped} of {side} buckets overlap backward kernels");
    }
}
