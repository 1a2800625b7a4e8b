//! `kd-engine bench-step`: the anchor DFT training step of SPEC §5, timed by phase.
//!
//! Student Qwen1.5-0.5B shape, teacher Qwen1.5-4B shape, one SigLIP-so400m-shape tower shared by
//! both (run once per step: it is frozen and identical), batch 4 × 1024 tokens per sequence laid
//! out as `[32 prompt] [728 visual] [32 prompt] [232 response]` (response tokens at the end),
//! LLaVA-KD DFT objective (L_ce + L_res + L_vis + 0.5·L_rel), AdamW over projector + LLM. Weights
//! are random ([`crate::model::presets::init_values`], the values `kd-engine init` writes),
//! created directly on the backend: no files.
//!
//! Phases, each closed by a device synchronisation so its time is its own: vision (the tower to
//! `hidden_states[-2]`), teacher forward (projector + LLM to its final hidden states, by default
//! through `Llm::hidden_states`, which drops each block's activations as soon as the next block has
//! its input; with `--head direct` also its full logits), student forward (the same, keeping what
//! the backward needs: every block's activations, or with `--gradient-checkpointing` only each
//! block's input, the backward then recomputing the block), loss (the LM heads and the
//! objective with their gradients: the chunked fused head by default, or full logits →
//! `distill_loss` → `lm_head_backward` with `--head direct`), backward (the student LLM and
//! projector), optimizer (AdamW with global-norm clipping, then zeroing the gradients).
//!
//! Memory: on CUDA the high-water mark of kd-engine's own device allocations (SPEC §5 counting),
//! on the CPU the process's peak RSS; transient = peak − (weights + gradients + optimizer state).
//!
//! `--scale S` divides the shapes (heads, intermediate sizes, layers, vocabulary, tokens per
//! sequence; the image grid by √S) so the CPU can smoke-test the same code in seconds. CPU figures
//! are **not** the GPU anchor.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{resolve_device, Device};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::sim;
use crate::backend::Backend;
use crate::data::{Group, PackedBatch};
use crate::loss::fused_head::{lm_head_grad, rows_with_logits};
use crate::loss::{
    distill_loss, frozen_head_gram, fused_distill_loss, kept_vocab, visual_ranges, DistillConfig, FusedHeadOptions, HeadSide, Logits,
    LossCounts, LossInputs, LossReport, PendingReport, RelationForm,
};
use crate::model::presets::{self, init_values, PresetModel, SIGLIP_PREFIX};
use crate::model::{FeatureSelect, Llm, LlmConfig, Mllm, MllmGrads, MllmWeights, ParamSet, ParamSpec, VisionConfig, VisionTower};
use crate::optim::{AdamW, AdamWConfig};

/// How the LM heads and the loss run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadMode {
    /// The chunked fused head (`loss::fused_head`): logits only for used rows, chunk by chunk.
    Fused,
    /// Full `[T, V]` logits for both models, then `distill_loss` (the PyTorch way).
    Direct,
}

/// How the relation term runs in the fused head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelationArg {
    /// R = H·(WᵀW)·Hᵀ (the teacher's WᵀW computed once, before the timed steps).
    Identity,
    /// R = Z·Zᵀ on each image's logits (one 728-row chunk per image).
    Logits,
}

#[derive(clap::Args, Debug)]
pub struct BenchStepArgs {
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Divide the anchor shapes by this factor (CPU smoke tests; 1 = the real anchor, the
    /// default on a GPU). Required on the CPU, where the full anchor needs ~25 GB and hours.
    #[arg(long)]
    scale: Option<usize>,
    /// Timed steps (the report gives their mean).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (before --scale).
    #[arg(long, default_value_t = 1024)]
    seq_len: usize,
    #[arg(long, value_enum, default_value_t = HeadMode::Fused)]
    head: HeadMode,
    #[arg(long, value_enum, default_value_t = RelationArg::Identity)]
    relation: RelationArg,
    /// Gradient checkpointing in the student LLM: keep each block's input only and recompute
    /// the block in the backward.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// With --scale: divide only the widths, vocabulary and tokens, and keep the anchor's layer
    /// counts (the simulated device then counts a step's launches, copies and syncs as the
    /// anchor's depth makes them).
    #[arg(long)]
    keep_layers: bool,
    /// No device synchronisation between the phases: only the whole step is timed, and the
    /// simulated device's counts are the step's own (the phase timings otherwise add 6 waits).
    #[arg(long)]
    no_phase_sync: bool,
    /// Rows per chunk of the fused head.
    #[arg(long, default_value_t = crate::loss::fused_head::DEFAULT_CHUNK_ROWS)]
    chunk_rows: usize,
    #[arg(long, default_value = "qwen1.5-0.5b")]
    student: String,
    #[arg(long, default_value = "qwen1.5-4b")]
    teacher: String,
    #[arg(long, default_value = "siglip-so400m-patch14-384")]
    vision: String,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the shapes, the FLOPs per phase and the state memory (bf16 parameters) without
    /// running anything.
    #[arg(long)]
    dry_run: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Prompt tokens before and after the image in each sequence (at scale 1).
const PROMPT_BEFORE: usize = 32;
const PROMPT_AFTER: usize = 32;

/// The step's shapes after scaling.
struct Shapes {
    student: LlmConfig,
    teacher: LlmConfig,
    vision: VisionConfig,
    batch: usize,
    seq_len: usize,
    before: usize,
    visual: usize,
    after: usize,
    response: usize,
}

fn llm_preset(name: &str, scale: usize, keep_layers: bool) -> Result<LlmConfig> {
    let full = presets::find(name)?;
    match (full.scaled(scale).model, &full.model) {
        (PresetModel::Llm(c), PresetModel::Llm(f)) => Ok(LlmConfig { layers: if keep_layers { f.layers } else { c.layers }, ..c }),
        _ => bail!("preset {name} is a vision tower, not a decoder"),
    }
}

fn shapes(a: &BenchStepArgs) -> Result<Shapes> {
    ensure!(a.scale() >= 1, "--scale must be at least 1");
    ensure!(a.batch >= 1, "--batch must be at least 1");
    let s = a.scale();
    let student = llm_preset(&a.student, s, a.keep_layers)?;
    let teacher = llm_preset(&a.teacher, s, a.keep_layers)?;
    let full_vision = presets::find(&a.vision)?;
    let vision = match (full_vision.scaled(s).model, &full_vision.model) {
        (PresetModel::Vision(c), PresetModel::Vision(f)) => VisionConfig { layers: if a.keep_layers { f.layers } else { c.layers }, ..c },
        _ => bail!("preset {} is a decoder, not a vision tower", a.vision),
    };
    let visual = vision.tokens() - 1; // "patch" selection drops the first token
    let (before, after) = ((PROMPT_BEFORE / s).max(1), (PROMPT_AFTER / s).max(1));
    let seq_len = (a.seq_len / s).max(before + visual + after + 2);
    Ok(Shapes { student, teacher, vision, batch: a.batch, seq_len, before, visual, after, response: seq_len - before - visual - after })
}

/// One batch: `batch` sequences of `[before prompt] [visual] [after prompt] [response]`.
fn make_batch(sh: &Shapes, seed: u64) -> PackedBatch {
    let mut rng = crate::data::SplitMix64::new(seed ^ 0x5eed_ba7c);
    let vocab = kept_vocab(sh.student.vocab, sh.teacher.vocab) as u64;
    let side = sh.vision.image_size;
    let mut b = PackedBatch::default();
    for i in 0..sh.batch {
        let groups = [
            vec![Group::Prompt; sh.before],
            vec![Group::Visual; sh.visual],
            vec![Group::Prompt; sh.after],
            vec![Group::Response; sh.response],
        ]
        .concat();
        b.ids.extend(groups.iter().map(|&g| if g == Group::Visual { 0 } else { rng.below(vocab) as u32 }));
        b.positions.extend(0..groups.len() as u32);
        b.seq_lens.push(groups.len());
        b.groups.extend(groups);
        b.images.push(Some(i));
        b.pixel_values.push((0..3 * side * side).map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect());
    }
    b
}

/// Random weights as `kd-engine init` writes them, by file name (`prefix` + Hugging Face tensor
/// name: [`ParamSet::from_fn`] initialises a stacked parameter per tensor).
fn random_set<B: Backend>(be: &B, specs: &[ParamSpec], prefix: &str, seed: u64) -> Result<ParamSet<B::Buf>> {
    ParamSet::from_fn(be, specs, |s| init_values(seed, &format!("{prefix}{}", s.name), s.numel()))
}

/// A step's loss: the fused head's terms still in the backend's sums, or the direct path's report.
enum Pending<S> {
    Fused(PendingReport, S),
    Direct(LossReport),
}

/// Waits for the backend's queued work: a one-element copy read back to the host.
fn sync<B: Backend>(be: &B, buf: &B::Buf) -> Result<()> {
    if be.len(buf) > 0 {
        let mut one = be.zeros(1)?;
        be.copy_range(buf, 0, &mut one, 0, 1)?;
        be.download(&one)?;
    }
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), and its reset (`clear_refs` 5).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

const PHASES: [&str; 6] = ["vision", "teacher_forward", "student_forward", "loss", "backward", "optimizer"];

/// GEMM/attention FLOPs of one step by phase (multiply-add = 2 FLOPs; causal attention counts
/// the half it computes; a backward is twice its forward).
fn phase_flops(sh: &Shapes, feature_layers: usize, logit_rows: usize, head: HeadMode, relation_flops: f64) -> [f64; 6] {
    let t = (sh.batch * sh.seq_len) as f64;
    let linear_params = |c: &LlmConfig| {
        let (h, qd, kvd) = (c.hidden as f64, (c.heads * c.head_dim) as f64, (c.kv_heads * c.head_dim) as f64);
        c.layers as f64 * (h * qd * 2.0 + h * kvd * 2.0 + 3.0 * h * c.intermediate as f64)
    };
    let causal_attn = |c: &LlmConfig| {
        let l = sh.seq_len as f64;
        c.layers as f64 * sh.batch as f64 * 2.0 * l * l * (c.heads * c.head_dim) as f64
    };
    let v = &sh.vision;
    let n = v.tokens() as f64;
    let imgs = sh.batch as f64;
    let d = v.hidden as f64;
    let vision = feature_layers as f64 * imgs * (2.0 * n * (4.0 * d * d + 2.0 * d * v.intermediate as f64) + 4.0 * n * n * d)
        + 2.0 * imgs * n * d * (3 * v.patch_size * v.patch_size) as f64;
    let projector = |h: f64| 2.0 * imgs * sh.visual as f64 * (d * h + h * h);
    let (s, te) = (&sh.student, &sh.teacher);
    let head_rows = match head {
        HeadMode::Fused => logit_rows as f64,
        HeadMode::Direct => t,
    };
    let teacher_head = 2.0 * head_rows * te.vocab as f64 * te.hidden as f64;
    let student_head = 2.0 * head_rows * s.vocab as f64 * s.hidden as f64;
    let (teacher_fwd, loss) = match head {
        // Direct: the teacher's logits are computed in its forward phase.
        HeadMode::Direct => (2.0 * t * linear_params(te) + causal_attn(te) + projector(te.hidden as f64) + teacher_head, 3.0 * student_head),
        HeadMode::Fused => (2.0 * t * linear_params(te) + causal_attn(te) + projector(te.hidden as f64), teacher_head + 3.0 * student_head),
    };
    let student_fwd = 2.0 * t * linear_params(s) + causal_attn(s) + projector(s.hidden as f64);
    let backward = 2.0 * student_fwd;
    [vision, teacher_fwd, student_fwd, loss + relation_flops, backward, 0.0]
}

/// The bench on any backend; `peak` reads the memory high-water mark, `reset_peak` resets it.
/// `param_bytes` is the backend's storage size per parameter (optimizer moments are f32 on every
/// backend).
fn bench<B: Backend>(
    be: &B,
    a: &BenchStepArgs,
    peak: &dyn Fn() -> Option<u64>,
    reset_peak: &dyn Fn(),
    peak_what: &str,
    param_bytes: u64,
) -> Result<Value> {
    let sh = shapes(a)?;
    let setup = Instant::now();
    let vision = VisionTower::new(sh.vision.clone());
    let mut student = Mllm::new(vision, Llm::new(sh.student.clone()), -2, FeatureSelect::Patch)?;
    student.llm.gradient_checkpointing = a.gradient_checkpointing;
    let teacher = Mllm::new(VisionTower::new(sh.vision.clone()), Llm::new(sh.teacher.clone()), -2, FeatureSelect::Patch)?;
    ensure!(student.visual_tokens() == sh.visual, "visual tokens {} vs layout {}", student.visual_tokens(), sh.visual);
    let seed = a.seed;
    let mut ws = MllmWeights {
        vision: random_set(be, &student.vision.specs, SIGLIP_PREFIX, seed)?,
        projector: random_set(be, &student.projector.specs, "multi_modal_projector.", seed)?,
        llm: random_set(be, &student.llm.specs, "", seed)?,
    };
    // The teacher shares the tower's features: it holds no tower weights of its own.
    let wt = MllmWeights {
        vision: ParamSet { specs: Vec::new(), bufs: Vec::new() },
        projector: random_set(be, &teacher.projector.specs, "teacher.multi_modal_projector.", seed)?,
        llm: random_set(be, &teacher.llm.specs, "", seed ^ 0x7eac_4e70)?,
    };
    let batch = make_batch(&sh, seed);
    let images = visual_ranges(&batch.groups, &batch.seq_lens)?;
    let inputs = LossInputs { ids: &batch.ids, groups: &batch.groups, seq_lens: &batch.seq_lens, images: &images };
    let counts = LossCounts::of(&inputs)?;
    let cfg = DistillConfig::default(); // DFT: α' = β' = 1, γ' = 0.5, response + visual KL, RDist
    let relation = match a.relation {
        RelationArg::Identity => RelationForm::Identity,
        RelationArg::Logits => RelationForm::Logits,
    };
    let opts = FusedHeadOptions { chunk_rows: a.chunk_rows, relation };
    let kept = kept_vocab(sh.student.vocab, sh.teacher.vocab);
    // The teacher never trains: its head Gram is computed once per run.
    let teacher_gram = if a.head == HeadMode::Fused && relation == RelationForm::Identity {
        Some(frozen_head_gram(be, &teacher.llm, &wt.llm, kept)?)
    } else {
        None
    };
    let mut gproj = ParamSet::zeros(be, &student.projector.specs)?;
    let mut gllm = ParamSet::zeros(be, &student.llm.specs)?;
    let mut opt = AdamW::new(be, &[&ws.projector, &ws.llm], AdamWConfig::default())?;
    let setup_s = setup.elapsed().as_secs_f64();

    let mut times = vec![[0f64; 6]; 0];
    let mut last_loss = None;
    for step in 0..a.warmup + a.steps {
        if step == a.warmup {
            reset_peak();
        }
        let mut ph = [0f64; 6];
        let mut clock = Instant::now();
        sim::mark(&format!("step {step} {}", if step < a.warmup { "warmup" } else { "timed" }));
        let mut lap = |i: usize, clock: &mut Instant| {
            ph[i] = clock.elapsed().as_secs_f64();
            *clock = Instant::now();
            sim::mark(&format!("end {}", PHASES[i]));
        };
        let features = student.encode_images(be, &ws.vision, &batch.pixel_values)?;
        if !a.no_phase_sync {
            sync(be, &features)?;
        }
        lap(0, &mut clock);
        let tfeat = be.duplicate(&features)?;
        let t_hidden = teacher.hidden_states(be, &wt, &batch, Some(tfeat))?;
        let tlogits = match a.head {
            HeadMode::Direct => Some(teacher.llm.lm_head(be, &wt.llm, &t_hidden)?),
            HeadMode::Fused => None,
        };
        if !a.no_phase_sync {
            sync(be, tlogits.as_ref().unwrap_or(&t_hidden))?;
        }
        lap(1, &mut clock);
        let sacts = student.forward(be, &ws, &batch, Some(features))?;
        if !a.no_phase_sync {
            sync(be, &sacts.llm.hidden)?;
        }
        lap(2, &mut clock);
        let (report, dh) = match a.head {
            HeadMode::Fused => {
                let mut dh = be.zeros(be.len(&sacts.llm.hidden))?;
                // The student's head trains: its Gram is rebuilt each step.
                let s_side = HeadSide::of(&student.llm, &ws.llm, &sacts.llm.hidden, None)?;
                let t_side = HeadSide::of(&teacher.llm, &wt.llm, &t_hidden, teacher_gram.as_ref())?;
                let dw = lm_head_grad(&student.llm, &mut gllm)?;
                // As a training step: the loss terms stay on the device until the step's end.
                let mut sums = be.sums(PendingReport::SLOTS)?;
                let pending = fused_distill_loss(be, &cfg, &inputs, s_side, Some(t_side), &counts, &opts, &mut dh, Some(dw), &mut sums, 0)?;
                (Pending::Fused(pending, sums), dh)
            }
            HeadMode::Direct => {
                let logits = student.llm.lm_head(be, &ws.llm, &sacts.llm.hidden)?;
                let mut dlogits = be.zeros(be.len(&logits))?;
                let tl = Logits { data: tlogits.as_ref().expect("direct mode computes teacher logits"), vocab: sh.teacher.vocab };
                let r = distill_loss(be, &cfg, &inputs, Logits { data: &logits, vocab: sh.student.vocab }, Some(tl), &counts, &mut dlogits)?;
                drop(logits);
                let dh = student.llm.lm_head_backward(be, &ws.llm, &sacts.llm.hidden, &dlogits, Some(&mut gllm))?;
                (Pending::Direct(r), dh)
            }
        };
        drop((t_hidden, tlogits));
        if !a.no_phase_sync {
            sync(be, &dh)?;
        }
        lap(3, &mut clock);
        student.backward(be, &ws, &sacts, &dh, MllmGrads { projector: Some(&mut gproj), llm: Some(&mut gllm), ready: None })?;
        drop(sacts);
        if !a.no_phase_sync {
            sync(be, &gproj.bufs[0])?;
        }
        lap(4, &mut clock);
        // The loss read-back, once per step as in training, before the optimizer's norm read-back.
        let report = match report {
            Pending::Fused(p, sums) => p.resolve(&be.read_sums(&sums)?)?,
            Pending::Direct(r) => r,
        };
        opt.step(be, &mut [&mut ws.projector, &mut ws.llm], &[&gproj, &gllm], 2e-5)?;
        gproj.zero_all(be)?;
        gllm.zero_all(be)?;
        sync(be, &ws.projector.bufs[0])?;
        lap(5, &mut clock);
        ensure!(report.total.is_finite(), "step {step}: the loss is not finite ({report:?})");
        last_loss = Some(report);
        if step >= a.warmup {
            times.push(ph);
        }
    }
    let peak_bytes = peak();
    ensure!(!times.is_empty(), "--steps must be at least 1");
    let mut mean = [0f64; 6];
    for t in &times {
        for (m, x) in mean.iter_mut().zip(t) {
            *m += x / times.len() as f64;
        }
    }
    let step_s: f64 = mean.iter().sum();
    let tokens = batch.n_tokens();
    let logit_rows = rows_with_logits(&cfg, &inputs, relation)?;
    let rel_flops = match (a.head, relation) {
        (HeadMode::Fused, RelationForm::Identity) => {
            crate::loss::relation_identity::relation_step_flops(images.len(), sh.visual, kept, sh.student.hidden, sh.teacher.hidden).identity_training
        }
        _ => crate::loss::relation_identity::relation_step_flops(images.len(), sh.visual, kept, sh.student.hidden, sh.teacher.hidden).direct,
    };
    let flops = phase_flops(&sh, student.feature_layer, logit_rows, a.head, rel_flops);

    // Memory the state needs (weights of all three models, gradients, optimizer moments).
    let elem = param_bytes;
    let weights = (ws.vision.numel() + ws.projector.numel() + ws.llm.numel() + wt.projector.numel() + wt.llm.numel()) as u64;
    let trainable = (ws.projector.numel() + ws.llm.numel()) as u64;
    let r = last_loss.expect("at least one step ran");
    let phases: serde_json::Map<String, Value> = PHASES
        .iter()
        .zip(mean.iter().zip(&flops))
        .map(|(name, (s, f))| (name.to_string(), json!({"ms": s * 1e3, "tflop": f / 1e12, "tflop_per_s": if *s > 0.0 { f / s / 1e12 } else { 0.0 }})))
        .collect();
    Ok(json!({
        "device": be.name(),
        "anchor": a.scale() == 1,
        "scale": a.scale(),
        "head": format!("{:?}", a.head).to_lowercase(),
        "relation": format!("{:?}", a.relation).to_lowercase(),
        "chunk_rows": a.chunk_rows,
        "gradient_checkpointing": a.gradient_checkpointing,
        "shapes": {
            "student": format!("{} /{}: {}", a.student, a.scale(), describe_llm(&sh.student)),
            "teacher": format!("{} /{}: {}", a.teacher, a.scale(), describe_llm(&sh.teacher)),
            "vision": format!("{} /{}: hidden {}, {} layers, image {}, {} visual tokens", a.vision, a.scale(), sh.vision.hidden, sh.vision.layers, sh.vision.image_size, sh.visual),
            "batch": sh.batch,
            "seq_len": sh.seq_len,
            "layout": [sh.before, sh.visual, sh.after, sh.response],
            "logit_rows": logit_rows,
        },
        "steps": times.len(),
        "warmup": a.warmup,
        "tokens_per_step": tokens,
        "step_ms": step_s * 1e3,
        "tokens_per_s": tokens as f64 / step_s,
        "tflop_per_step": flops.iter().sum::<f64>() / 1e12,
        "phases": phases,
        "memory": {
            "peak_bytes": peak_bytes,
            "peak_source": peak_what,
            "weights_bytes": weights * elem,
            "grads_bytes": trainable * elem,
            "optimizer_bytes": 2 * trainable * 4,
            // SPEC §5: transient = peak − (weights + gradients + optimizer state).
            "transient_bytes": peak_bytes.map(|p| p as i64 - ((weights + trainable) * elem + 2 * trainable * 4) as i64),
        },
        "loss": {"total": r.total, "ce": r.ce, "response": r.response, "visual": r.visual, "relation": r.relation},
        "setup_s": setup_s,
    }))
}

fn describe_llm(c: &LlmConfig) -> String {
    format!("hidden {}, intermediate {}, {} layers, {}/{} heads, vocab {}", c.hidden, c.intermediate, c.layers, c.heads, c.kv_heads, c.vocab)
}

/// The human-readable report.
fn print_report(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!("kd-engine bench-step on {} (scale 1/{}, head {}, relation {})", r["device"].as_str().unwrap_or("?"), r["scale"], r["head"].as_str().unwrap_or("?"), r["relation"].as_str().unwrap_or("?"));
    for k in ["student", "teacher", "vision"] {
        println!("  {k:<8} {}", r["shapes"][k].as_str().unwrap_or("?"));
    }
    println!(
        "  batch {} × {} tokens (layout {}), {} rows with logits; {} timed step(s) after {} warm-up",
        r["shapes"]["batch"], r["shapes"]["seq_len"], r["shapes"]["layout"], r["shapes"]["logit_rows"], r["steps"], r["warmup"]
    );
    println!("  {:<16} {:>10} {:>9} {:>10}", "phase", "ms", "TFLOP", "TFLOP/s");
    for p in PHASES {
        let ph = &r["phases"][p];
        println!("  {:<16} {:>10.2} {:>9.4} {:>10.3}", p, f(&ph["ms"]), f(&ph["tflop"]), f(&ph["tflop_per_s"]));
    }
    println!("  {:<16} {:>10.2} {:>9.4}", "step", f(&r["step_ms"]), f(&r["tflop_per_step"]));
    println!("  tokens/s {:.1}", f(&r["tokens_per_s"]));
    let m = &r["memory"];
    let gib = |v: &Value| v.as_f64().map_or("n/a".to_string(), |b| format!("{:.3} GiB", b / (1u64 << 30) as f64));
    println!(
        "  peak memory {} ({}); weights {}, gradients {}, optimizer {}, transient {}",
        gib(&m["peak_bytes"]),
        m["peak_source"].as_str().unwrap_or("?"),
        gib(&m["weights_bytes"]),
        gib(&m["grads_bytes"]),
        gib(&m["optimizer_bytes"]),
        gib(&m["transient_bytes"])
    );
    let p = &r["device_pool"];
    if p.is_object() {
        println!(
            "  device pool: peak reserved {}, {} driver allocations ({} inside the timed steps), {} reuses",
            gib(&p["peak_reserved_bytes"]),
            p["driver_allocs"],
            p["driver_allocs_in_timed_steps"],
            p["reuses"]
        );
    }
    let c = &r["simulated_device_per_step"];
    if c.is_object() {
        println!(
            "  simulated device, per step: {} launches, {} memsets ({} bytes), {} host→device copies ({} bytes), {} device→host copies, {} syncs ({} host waits, {} of them bench-step's own), {} GEMMs ({:.3} GFLOP)",
            f(&c["launches"]),
            f(&c["memsets"]),
            f(&c["memset_bytes"]),
            f(&c["htod_copies"]),
            f(&c["htod_bytes"]),
            f(&c["dtoh_copies"]),
            f(&c["syncs"]),
            f(&c["host_syncs"]),
            f(&c["bench_waits"]),
            f(&c["gemm_calls"]),
            f(&c["gemm_flops"]) / 1e9
        );
    }
    println!("  loss {:.4} (ce {:.4})", f(&r["loss"]["total"]), f(&r["loss"]["ce"]));
}

/// `--dry-run`: shapes, FLOPs per phase and state memory, computed without weights.
fn dry_run(a: &BenchStepArgs) -> Result<()> {
    let sh = shapes(a)?;
    let student = Mllm::new(VisionTower::new(sh.vision.clone()), Llm::new(sh.student.clone()), -2, FeatureSelect::Patch)?;
    let teacher = Mllm::new(VisionTower::new(sh.vision.clone()), Llm::new(sh.teacher.clone()), -2, FeatureSelect::Patch)?;
    let mut batch = make_batch(&sh, a.seed);
    batch.pixel_values.clear();
    let images = visual_ranges(&batch.groups, &batch.seq_lens)?;
    let inputs = LossInputs { ids: &batch.ids, groups: &batch.groups, seq_lens: &batch.seq_lens, images: &images };
    let relation = match a.relation {
        RelationArg::Identity => RelationForm::Identity,
        RelationArg::Logits => RelationForm::Logits,
    };
    let logit_rows = rows_with_logits(&DistillConfig::default(), &inputs, relation)?;
    let kept = kept_vocab(sh.student.vocab, sh.teacher.vocab);
    let rf = crate::loss::relation_identity::relation_step_flops(images.len(), sh.visual, kept, sh.student.hidden, sh.teacher.hidden);
    let rel = if a.head == HeadMode::Fused && relation == RelationForm::Identity { rf.identity_training } else { rf.direct };
    let flops = phase_flops(&sh, student.feature_layer, logit_rows, a.head, rel);
    let n = |specs: &[ParamSpec]| specs.iter().map(ParamSpec::numel).sum::<usize>() as f64;
    let weights = n(&student.vision.specs) + n(&student.projector.specs) + n(&student.llm.specs) + n(&teacher.projector.specs) + n(&teacher.llm.specs);
    let trainable = n(&student.projector.specs) + n(&student.llm.specs);
    println!("bench-step plan (scale 1/{}, head {:?}, relation {:?}): {} × {} tokens, layout [{}, {}, {}, {}], {} rows with logits",
        a.scale(), a.head, a.relation, sh.batch, sh.seq_len, sh.before, sh.visual, sh.after, sh.response, logit_rows);
    println!("  student {}\n  teacher {}", describe_llm(&sh.student), describe_llm(&sh.teacher));
    for (p, f) in PHASES.iter().zip(&flops) {
        println!("  {p:<16} {:>9.3} TFLOP", f / 1e12);
    }
    println!("  {:<16} {:>9.3} TFLOP", "step", flops.iter().sum::<f64>() / 1e12);
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!(
        "  state (bf16 parameters, f32 moments): weights {:.2} GiB ({:.3} B parameters), gradients {:.2} GiB, optimizer {:.2} GiB",
        gib(2.0 * weights), weights / 1e9, gib(2.0 * trainable), gib(8.0 * trainable)
    );
    Ok(())
}

/// The simulated device's counters divided by the timed steps. They include bench-step's own
/// waits (`bench_waits`: one per step, six with the phase timings; each a one-value read-back).
fn per_step(c: &sim::Counters, steps: usize) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        for x in o.values_mut() {
            *x = json!(x.as_f64().unwrap_or(f64::NAN) / steps.max(1) as f64);
        }
        o.insert("host_syncs".into(), json!(c.host_syncs() as f64 / steps.max(1) as f64));
    }
    v
}

impl BenchStepArgs {
    fn scale(&self) -> usize {
        self.scale.unwrap_or(1)
    }
}

pub fn run(a: BenchStepArgs) -> Result<()> {
    if a.dry_run {
        return dry_run(&a);
    }
    let report = match resolve_device(a.device)? {
        Device::Cuda => {
            let be = crate::backend::cuda::CudaBackend::new()?;
            eprintln!("bench-step on {}", be.describe());
            let peak = || Some(be.mem_stats().1 as u64);
            // Driver allocations inside the timed steps show whether the pool served them all.
            let allocs_at_reset = std::cell::Cell::new(0u64);
            // On the simulated device, what the timed steps asked of the driver and cuBLAS.
            let counted_from = std::cell::Cell::new(None);
            let reset = || {
                be.reset_peak();
                allocs_at_reset.set(be.pool_stats().driver_allocs);
                counted_from.set(sim::counters());
            };
            // The simulated device runs kernels on the CPU emulator: the anchor would take days,
            // unless it only counts (KD_SIM_COUNT_ONLY=1, for benches/step_model.py).
            ensure!(
                !sim::active() || a.scale.is_some() || sim::count_only(),
                "bench-step on the simulated CUDA device (KD_CUDA_SIM=1) needs --scale: its kernels run on a CPU emulator; \
                 count a step's work with --scale 16 --keep-layers, or trace the anchor step's operations without \
                 computing them with KD_SIM_COUNT_ONLY=1 KD_SIM_TRACE=<folder> (benches/step_model.py)"
            );
            if sim::count_only() {
                eprintln!("note: KD_SIM_COUNT_ONLY=1: the simulated device computes nothing; only the operations and their counts are real (not the times, losses or memory contents)");
            }
            let mut r = bench(&be, &a, &peak, &reset, "kd-engine's device buffers, high-water mark over the timed steps", 2)?;
            r["count_only"] = json!(sim::count_only());
            if let (Some(from), Some(now)) = (counted_from.get(), sim::counters()) {
                r["simulated_device_per_step"] = per_step(&now.since(&from), a.steps);
                // bench-step's own waits: the final one per step, plus five between phases.
                r["simulated_device_per_step"]["bench_waits"] = json!(if a.no_phase_sync { 1 } else { 6 });
            }
            let p = be.pool_stats();
            r["device_pool"] = json!({
                "peak_reserved_bytes": p.peak_reserved,
                "driver_allocs": p.driver_allocs,
                "driver_allocs_in_timed_steps": p.driver_allocs - allocs_at_reset.get(),
                "reuses": p.reuses,
            });
            r
        }
        _ => {
            ensure!(
                a.scale.is_some(),
                "bench-step on the CPU needs --scale: the full anchor step needs ~25 GB of memory and hours per step here; \
                 smoke-test with --scale 16 (or more), or run on a GPU (--device cuda)"
            );
            eprintln!(
                "note: bench-step on the CPU backend{}: these figures are NOT the GPU anchor (SPEC §5 compares \
                 against PyTorch on an H200; run with --device cuda there)",
                if a.scale() > 1 { format!(", shapes divided by {}", a.scale()) } else { String::new() }
            );
            if a.scale() == 1 {
                eprintln!("note: the full anchor on the CPU needs ~25 GB of memory and hours per step; use --scale 16 or more to smoke-test");
            }
            let be = CpuBackend::<f32>::new();
            bench(&be, &a, &peak_rss, &reset_peak_rss, "process peak RSS (VmHWM) over the timed steps", 4)?
        }
    };
    print_report(&report);
    if let Some(path) = &a.json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
