//! The training pipeline on tiny models and the study's synthetic data: freeze rules per stage,
//! bit-identical resume, checkpoints that survive an interrupted write, and bad input.

use std::path::{Path, PathBuf};

use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::GeluKind;
use kd_engine::data::{write_study_data, StudySpec};
use kd_engine::model::{Arch, LlmConfig, VisionConfig};
use kd_engine::train::checkpoint;
use kd_engine::train::config::{RunConfig, StageConfig, StageKind};
use kd_engine::train::model_state::MllmState;
use kd_engine::train::recipe::{run_stages, RecipeRun};
use kd_engine::train::study::{new_model, stage, write_vision_tower};

type Be = CpuBackend<f32>;
type State = MllmState<Vec<f32>>;

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    vision: PathBuf,
    pretrain: PathBuf,
    sft: PathBuf,
    tokenizer: PathBuf,
}

fn vision_cfg(patch: usize) -> VisionConfig {
    VisionConfig { hidden: 16, intermediate: 24, layers: 2, heads: 2, channels: 3, image_size: 16, patch_size: patch, ln_eps: 1e-6, act: GeluKind::Tanh }
}

fn llm_cfg(vocab: usize, hidden: usize) -> LlmConfig {
    LlmConfig {
        arch: Arch::Qwen2,
        hidden,
        intermediate: 2 * hidden,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: hidden / 2,
        vocab,
        rms_eps: 1e-6,
        rope_theta: 1e4,
        tie_embeddings: true,
        qkv_bias: true,
        o_bias: false,
    }
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let spec = StudySpec { pretrain_samples: 24, sft_samples: 24, eval_questions: 5, train_images: 12, eval_images: 5, image_size: 16, ..StudySpec::quick() };
    let files = write_study_data(&root.join("data"), &spec).unwrap();
    let vision = root.join("vision");
    write_vision_tower(&vision, &vision_cfg(4), 3).unwrap();
    Setup { vision, pretrain: files.pretrain, sft: files.sft, tokenizer: files.tokenizer, root, _tmp: tmp }
}

fn vocab(s: &Setup) -> usize {
    kd_engine::data::load_tokenizer(&s.tokenizer).unwrap().get_vocab_size(true)
}

fn model(s: &Setup, hidden: usize, seed: u64) -> State {
    new_model(&Be::new(), &s.vision, &llm_cfg(vocab(s), hidden), &s.tokenizer, seed).unwrap()
}

fn short(kind: StageKind, data: &Path, steps: u64) -> StageConfig {
    StageConfig { max_steps: Some(steps), micro_batch: Some(4), ..stage(kind, data, 3e-3, 1.0, 8) }
}

fn run(s: &Setup, dir: &str, run: &RunConfig, stages: &[StageConfig], student: &mut State, teacher: Option<&State>, resume: Option<PathBuf>, stop: Option<u64>) -> anyhow::Result<checkpoint::TrainState> {
    let r = RecipeRun { run, out_dir: s.root.join(dir), progress: false, resume, stop_after_global_step: stop };
    run_stages(&Be::new(), &r, stages, student, teacher)
}

fn same(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()))
}

#[test]
fn freeze_rules_of_each_stage() {
    let s = setup();
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    let teacher = model(&s, 24, 9);
    for (kind, data, llm_trains) in [
        (StageKind::Pt, &s.pretrain, false),
        (StageKind::Dpt, &s.pretrain, false),
        (StageKind::Sft, &s.sft, true),
        (StageKind::Dft, &s.sft, true),
    ] {
        let mut m = model(&s, 16, 1);
        let before = m.weights.clone();
        let t = kind == StageKind::Dpt || kind == StageKind::Dft;
        run(&s, &format!("freeze-{}", kind.name()), &rc, &[short(kind, data, 2)], &mut m, t.then_some(&teacher), None, None).unwrap();
        assert!(same(&before.vision.bufs, &m.weights.vision.bufs), "{kind:?}: the vision tower must stay bit-identical");
        assert!(!same(&before.projector.bufs, &m.weights.projector.bufs), "{kind:?}: the projector must train");
        assert!(
            m.weights.projector.bufs.iter().zip(&before.projector.bufs).all(|(a, b)| a != b),
            "{kind:?}: every projector tensor must change"
        );
        assert_eq!(!same(&before.llm.bufs, &m.weights.llm.bufs), llm_trains, "{kind:?}: the LLM trains only in SFT/DFT");
    }
}

fn metric_losses(path: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // Everything but timings: losses, grad norm, lr, counts, as written.
            let mut o = v.as_object().unwrap().clone();
            o.remove("tokens_per_s");
            (v["global_step"].as_u64().unwrap(), serde_json::Value::Object(o).to_string())
        })
        .collect()
}

#[test]
fn a_stopped_and_resumed_run_reproduces_the_uninterrupted_loss_curve_bit_for_bit() {
    let s = setup();
    let teacher = model(&s, 24, 9);
    let rc = RunConfig { log_every: 0, checkpoint_every: 1, ..RunConfig::default() };
    let stages = [short(StageKind::Dpt, &s.pretrain, 3), short(StageKind::Sft, &s.sft, 2), short(StageKind::Dft, &s.sft, 2)];

    let mut a = model(&s, 16, 1);
    let done = run(&s, "full", &rc, &stages, &mut a, Some(&teacher), None, None).unwrap();
    assert_eq!(done.global_step, 7);

    // Stop inside the SFT stage (after global step 4), then resume from the checkpoint in a new
    // process-like start: fresh model objects, weights from the checkpoint.
    let mut b = model(&s, 16, 1);
    let st = run(&s, "resumed", &rc, &stages, &mut b, Some(&teacher), None, Some(4)).unwrap();
    assert_eq!((st.stage_index, st.stage_step, st.global_step), (1, 1, 4));
    let ckpt = checkpoint::latest(&s.root.join("resumed")).unwrap();
    let mut c = model(&s, 16, 77); // different initial weights: everything must come from the checkpoint
    run(&s, "resumed", &rc, &stages, &mut c, Some(&teacher), Some(ckpt), None).unwrap();

    let full = metric_losses(&s.root.join("full/metrics.jsonl"));
    let resumed = metric_losses(&s.root.join("resumed/metrics.jsonl"));
    assert_eq!(full.len(), 7);
    assert_eq!(full, resumed, "the resumed loss curve must match the uninterrupted one exactly");
    assert!(same(&a.weights.llm.bufs, &c.weights.llm.bufs) && same(&a.weights.projector.bufs, &c.weights.projector.bufs));
}

#[test]
fn gradient_checkpointing_trains_the_same_run_bit_for_bit() {
    let s = setup();
    let teacher = model(&s, 24, 9);
    let stages = [short(StageKind::Dpt, &s.pretrain, 2), short(StageKind::Dft, &s.sft, 2)];
    let mut plain = model(&s, 16, 1);
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    run(&s, "plain", &rc, &stages, &mut plain, Some(&teacher), None, None).unwrap();
    let mut ckpt = model(&s, 16, 1);
    let rc = RunConfig { gradient_checkpointing: true, ..rc };
    run(&s, "checkpointed", &rc, &stages, &mut ckpt, Some(&teacher), None, None).unwrap();
    assert!(ckpt.model.llm.gradient_checkpointing, "the run's setting reaches the student");
    assert_eq!(metric_losses(&s.root.join("plain/metrics.jsonl")), metric_losses(&s.root.join("checkpointed/metrics.jsonl")));
    assert!(same(&plain.weights.llm.bufs, &ckpt.weights.llm.bufs) && same(&plain.weights.projector.bufs, &ckpt.weights.projector.bufs));
}

#[test]
fn an_interrupted_checkpoint_write_leaves_the_previous_one_usable() {
    let s = setup();
    let rc = RunConfig { log_every: 0, checkpoint_every: 1, ..RunConfig::default() };
    let mut m = model(&s, 16, 1);
    run(&s, "ck", &rc, &[short(StageKind::Pt, &s.pretrain, 2)], &mut m, None, None, None).unwrap();
    let dir = s.root.join("ck");
    let good = checkpoint::read_state(&checkpoint::latest(&dir).unwrap()).unwrap();
    assert_eq!(good.global_step, 2);
    // A crash while writing the next one: a half-written temporary folder.
    std::fs::create_dir_all(dir.join("checkpoint.tmp")).unwrap();
    std::fs::write(dir.join("checkpoint.tmp/weights.safetensors"), b"\x10\x00").unwrap();
    assert_eq!(checkpoint::latest(&dir).unwrap(), dir.join("checkpoint"));
    // A crash between the two renames: only checkpoint.old is left.
    std::fs::rename(dir.join("checkpoint"), dir.join("checkpoint.old")).unwrap();
    let ck = checkpoint::latest(&dir).unwrap();
    assert_eq!(ck, dir.join("checkpoint.old"));
    assert_eq!(checkpoint::read_state(&ck).unwrap(), good);
    let mut fresh = model(&s, 16, 5);
    checkpoint::load_weights(&Be::new(), &ck, &mut fresh.weights).unwrap();
    assert!(same(&fresh.weights.projector.bufs, &m.weights.projector.bufs));
    // A first run killed while writing its first checkpoint left only the temporary folder: the
    // next run there replaces it and succeeds.
    let first = s.root.join("ck2");
    std::fs::create_dir_all(first.join("checkpoint.tmp")).unwrap();
    std::fs::write(first.join("checkpoint.tmp/weights.safetensors"), b"\x10\x00").unwrap();
    let mut m2 = model(&s, 16, 1);
    run(&s, "ck2", &rc, &[short(StageKind::Pt, &s.pretrain, 1)], &mut m2, None, None, None).unwrap();
    assert!(first.join("checkpoint/state.json").is_file() && !first.join("checkpoint.tmp").exists());
}

#[test]
fn distillation_without_a_teacher_is_refused() {
    let s = setup();
    let mut m = model(&s, 16, 1);
    let e = run(&s, "x", &RunConfig::default(), &[short(StageKind::Dpt, &s.pretrain, 1)], &mut m, None, None, None).unwrap_err().to_string();
    assert!(e.contains("distils") && e.contains("no teacher"), "{e}");
}

#[test]
fn teacher_with_a_different_visual_token_count_is_refused() {
    let s = setup();
    let other = s.root.join("vision8");
    write_vision_tower(&other, &vision_cfg(8), 3).unwrap(); // 4 patches instead of 16
    let teacher = new_model(&Be::new(), &other, &llm_cfg(vocab(&s), 24), &s.tokenizer, 2).unwrap();
    let mut m = model(&s, 16, 1);
    let e = run(&s, "x", &RunConfig::default(), &[short(StageKind::Dft, &s.sft, 1)], &mut m, Some(&teacher), None, None).unwrap_err().to_string();
    assert!(e.contains("different numbers of visual tokens") && e.contains("(3 vs 15)"), "{e}");
}

#[test]
fn non_finite_losses_skip_steps_and_stop_the_run_after_a_streak() {
    let s = setup();
    let mut m = model(&s, 16, 1);
    // A NaN in the projector makes every loss NaN.
    m.weights.projector.bufs[0][0] = f32::NAN;
    let before = m.weights.clone();
    let rc = RunConfig { log_every: 0, max_nonfinite_streak: 3, ..RunConfig::default() };
    let e = run(&s, "nan", &rc, &[short(StageKind::Pt, &s.pretrain, 10)], &mut m, None, None, None).unwrap_err().to_string();
    assert!(e.contains("3 optimizer steps in a row had a non-finite loss"), "{e}");
    assert!(same(&before.projector.bufs[1..], &m.weights.projector.bufs[1..]), "skipped steps update nothing");
    let lines = std::fs::read_to_string(s.root.join("nan/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("\"skipped_step\":true")).count(), 3);
}

#[test]
fn train_cli_reports_config_errors_by_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[student]\nllm = \"a\"\nvision = \"b\"\n[[stage]]\nkind = \"sft\"\ndata = \"d.json\"\nlr = 1e-3\nglobal_batch = 8\nmicro_batchh = 2\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"));
    assert!(err.contains("micro_batchh") && err.contains("bad.toml"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["train", "--config", "/nonexistent.toml"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("/nonexistent.toml"), "{err}");
}

#[test]
fn train_cli_runs_a_config_recipe_and_exports_the_student() {
    let s = setup();
    let be = Be::new();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    // The teacher: a study model on the fixture SigLIP tower, exported as one HF LLaVA folder.
    let tiny_siglip = fixtures.join("siglip/tiny");
    let teacher = new_model(&be, &tiny_siglip, &llm_cfg(vocab(&s), 24), &s.tokenizer, 4).unwrap();
    let teacher_dir = s.root.join("teacher");
    let opts = kd_engine::model::ExportOptions { tokenizer: Some(&s.tokenizer), ..Default::default() };
    kd_engine::model::export_llava(&be, &teacher_dir, &teacher.model, &teacher.weights, &opts).unwrap();
    // The student: a transformers-made Qwen2 folder and the same tower, the study's tokenizer.
    let out = s.root.join("run");
    let cfg = format!(
        r#"
[run]
out = "{out}"
log_every = 1

[student]
llm = "{llm}"
vision = "{vision}"
tokenizer = "{tok}"

[teacher]
llava = "{teacher}"

[[stage]]
kind = "dpt"
data = "{pt}"
lr = 1e-3
global_batch = 4
micro_batch = 2
max_steps = 2

[[stage]]
kind = "sft"
data = "{sft}"
lr = 1e-3
global_batch = 4
max_steps = 1

[[stage]]
kind = "dft"
data = "{sft}"
lr = 1e-3
global_batch = 4
max_steps = 1
"#,
        out = out.display(),
        llm = fixtures.join("llm/qwen2_gqa_tied").display(),
        vision = tiny_siglip.display(),
        tok = s.tokenizer.display(),
        teacher = teacher_dir.display(),
        pt = s.pretrain.display(),
        sft = s.sft.display(),
    );
    let path = s.root.join("recipe.toml");
    std::fs::write(&path, cfg).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["train", "--config", path.to_str().unwrap(), "--set", "stage.1.lr=2e-3"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("DPT step 2/2") && err.contains("res ") && err.contains("rel "), "each loss term is logged: {err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    let used: kd_engine::train::config::TrainConfig = toml::from_str(&std::fs::read_to_string(out.join("config.toml")).unwrap()).unwrap();
    assert_eq!(used.stages[1].lr, 2e-3, "the override reached stage 1");
    for f in ["losses_all_stages.png", "losses_stage0_dpt.png", "config.toml", "checkpoint/state.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The exported student reads back as one model with the trained weights.
    let back = kd_engine::model::load_llava(&be, &out.join("student")).unwrap();
    let ck = checkpoint::latest(&out).unwrap();
    let mut fresh = back.weights.clone();
    checkpoint::load_weights(&be, &ck, &mut fresh).unwrap();
    for (a, b) in back.weights.projector.bufs.iter().zip(&fresh.projector.bufs) {
        // bf16 export: equal to the checkpoint's f32 weights within bf16 rounding.
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 4e-3 * y.abs().max(1e-3)));
    }
}

/// The error with its causes, as the command line prints it.
fn err<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.unwrap_err())
}

/// Resumes the run in `dir` from its checkpoint, with fresh initial weights.
fn resume(s: &Setup, dir: &str, rc: &RunConfig, stages: &[StageConfig]) -> anyhow::Result<checkpoint::TrainState> {
    let ckpt = checkpoint::latest(&s.root.join(dir))?;
    let mut m = model(s, 16, 77);
    run(s, dir, rc, stages, &mut m, None, Some(ckpt), None)
}

#[test]
fn a_metrics_line_cut_by_a_kill_is_dropped_on_resume_with_the_lines_after_the_checkpoint() {
    let s = setup();
    let rc = RunConfig { log_every: 0, checkpoint_every: 2, ..RunConfig::default() };
    let stages = [short(StageKind::Pt, &s.pretrain, 4)];
    run(&s, "full", &rc, &stages, &mut model(&s, 16, 1), None, None, None).unwrap();
    // Killed after step 3 (checkpoint at step 2) in the middle of writing step 4's line.
    run(&s, "killed", &rc, &stages, &mut model(&s, 16, 1), None, None, Some(3)).unwrap();
    let metrics = s.root.join("killed/metrics.jsonl");
    let mut f = std::fs::OpenOptions::new().append(true).open(&metrics).unwrap();
    std::io::Write::write_all(&mut f, b"{\"stage\":\"pt\",\"stage_ind").unwrap();
    drop(f);
    resume(&s, "killed", &rc, &stages).unwrap();
    assert_eq!(metric_losses(&metrics), metric_losses(&s.root.join("full/metrics.jsonl")), "one line per step, none twice, no fragment");
    assert!(s.root.join("killed/losses_all_stages.png").is_file());
}

#[test]
fn a_fresh_run_into_a_folder_holding_a_run_is_refused_and_the_run_kept() {
    let s = setup();
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    let stages = [short(StageKind::Pt, &s.pretrain, 1)];
    run(&s, "mine", &rc, &stages, &mut model(&s, 16, 1), None, None, None).unwrap();
    let dir = s.root.join("mine");
    let before = std::fs::read(dir.join("checkpoint/weights.safetensors")).unwrap();
    let e = run(&s, "mine", &rc, &stages, &mut model(&s, 16, 2), None, None, None).unwrap_err().to_string();
    assert!(e.contains("already holds a run") && e.contains("--resume") && e.contains("another folder"), "{e}");
    assert_eq!(std::fs::read(dir.join("checkpoint/weights.safetensors")).unwrap(), before, "the run is untouched");
}

#[test]
fn a_run_folder_locked_by_a_live_process_is_refused_and_a_stale_lock_taken_over() {
    let s = setup();
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    let stages = [short(StageKind::Pt, &s.pretrain, 1)];
    let dir = s.root.join("busy");
    std::fs::create_dir_all(&dir).unwrap();
    // This test process is alive: the folder is in use.
    std::fs::write(dir.join("kd-engine.lock"), format!("{}\n", std::process::id())).unwrap();
    let e = run(&s, "busy", &rc, &stages, &mut model(&s, 16, 1), None, None, None).unwrap_err().to_string();
    assert!(e.contains("in use by process") && e.contains(&std::process::id().to_string()), "{e}");
    assert!(!dir.join("checkpoint").exists());
    // A process that has exited holds nothing: its lock is taken over, and released at the end.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(dir.join("kd-engine.lock"), format!("{dead}\n")).unwrap();
    run(&s, "busy", &rc, &stages, &mut model(&s, 16, 1), None, None, None).unwrap();
    assert!(dir.join("checkpoint/state.json").is_file() && !dir.join("kd-engine.lock").exists());
}

#[test]
fn resume_refuses_a_checkpoint_of_another_config_naming_both_values() {
    let s = setup();
    let rc = RunConfig { log_every: 0, checkpoint_every: 1, ..RunConfig::default() };
    let stages = [short(StageKind::Pt, &s.pretrain, 3), short(StageKind::Sft, &s.sft, 2)];
    run(&s, "a", &rc, &stages, &mut model(&s, 16, 1), None, None, Some(2)).unwrap();
    let other_seed = RunConfig { seed: 7, ..rc.clone() };
    let e = err(resume(&s, "a", &other_seed, &stages));
    assert!(e.contains("seed") && e.contains("42") && e.contains('7'), "{e}");
    let e = err(resume(&s, "a", &rc, &[short(StageKind::Dpt, &s.pretrain, 3), stages[1].clone()]));
    assert!(e.contains("stage 0") && e.contains("pt") && e.contains("dpt"), "{e}");
    let e = err(resume(&s, "a", &rc, &stages[..1]));
    assert!(e.contains("2 stages") && e.contains('1'), "{e}");
    let e = err(resume(&s, "a", &rc, &[StageConfig { global_batch: 4, ..stages[0].clone() }, stages[1].clone()]));
    assert!(e.contains("global_batch") && e.contains('8') && e.contains('4'), "{e}");
    let e = err(resume(&s, "a", &rc, &[StageConfig { epochs: 2.0, ..stages[0].clone() }, stages[1].clone()]));
    assert!(e.contains("epochs") && e.contains('1') && e.contains('2'), "{e}");
    let e = err(resume(&s, "a", &rc, &[short(StageKind::Pt, &s.pretrain, 5), stages[1].clone()]));
    assert!(e.contains("max_steps") && e.contains('3') && e.contains('5'), "{e}");
    // The checkpoint stands at step 2 of stage 0; a data file cut to one step's samples cannot hold it.
    let list: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&s.pretrain).unwrap()).unwrap();
    let small = s.root.join("data/small.json");
    std::fs::write(&small, serde_json::to_string(&list[..8]).unwrap()).unwrap();
    let e = err(resume(&s, "a", &rc, &[short(StageKind::Pt, &small, 3), stages[1].clone()]));
    assert!(e.contains("step 2") && e.contains("1 step"), "{e}");
    // The same config resumes.
    resume(&s, "a", &rc, &stages).unwrap();
}

#[test]
fn a_flipped_byte_in_a_checkpoint_file_is_an_error_naming_the_file() {
    let s = setup();
    let rc = RunConfig { log_every: 0, checkpoint_every: 1, ..RunConfig::default() };
    let stages = [short(StageKind::Sft, &s.sft, 3)];
    run(&s, "flip", &rc, &stages, &mut model(&s, 16, 1), None, None, Some(1)).unwrap();
    for file in ["weights.safetensors", "optimizer.safetensors"] {
        let path = s.root.join("flip/checkpoint").join(file);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        let at = bad.len() - 5; // inside the tensor data: the file still parses
        bad[at] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let e = format!("{:#}", resume(&s, "flip", &rc, &stages).unwrap_err());
        assert!(e.contains(file) && e.contains("checksum"), "{e}");
        std::fs::write(&path, &good).unwrap();
    }
    resume(&s, "flip", &rc, &stages).unwrap();
}

#[test]
fn temporary_files_of_an_interrupted_export_or_plot_are_removed_by_the_next_run() {
    let s = setup();
    let rc = RunConfig { log_every: 0, checkpoint_every: 1, ..RunConfig::default() };
    let stages = [short(StageKind::Pt, &s.pretrain, 2)];
    run(&s, "tmp", &rc, &stages, &mut model(&s, 16, 1), None, None, Some(1)).unwrap();
    let dir = s.root.join("tmp");
    let export = dir.join(".student.kd-export-4242");
    std::fs::create_dir_all(&export).unwrap();
    std::fs::write(export.join("model.safetensors"), b"half").unwrap();
    let plot = dir.join(".losses_all_stages.png.tmp-4242-0");
    std::fs::write(&plot, b"half").unwrap();
    resume(&s, "tmp", &rc, &stages).unwrap();
    assert!(!export.exists() && !plot.exists());
}

#[test]
fn a_step_whose_samples_all_fail_at_batch_time_is_skipped_and_counted_toward_max_skip_fraction() {
    let s = setup();
    // Images of another size than the tower's, read without resizing: they decode (so loading
    // keeps them) and fail when their batch is built.
    let spec = StudySpec { pretrain_samples: 16, sft_samples: 8, eval_questions: 2, train_images: 8, eval_images: 2, image_size: 20, ..StudySpec::quick() };
    let files = write_study_data(&s.root.join("data12"), &spec).unwrap();
    let mut m = model(&s, 16, 1);
    m.processor.do_resize = false;
    let before = m.weights.clone();
    let rc = RunConfig { log_every: 0, max_skip_fraction: 1.0, ..RunConfig::default() };
    let st = run(&s, "empty", &rc, &[short(StageKind::Pt, &files.pretrain, 2)], &mut m, None, None, None).unwrap();
    assert!(same(&before.projector.bufs, &m.weights.projector.bufs), "no optimizer step on no samples");
    assert_eq!((st.global_step, st.optimizer_step, st.empty_steps), (2, 0, 2));
    let lines = std::fs::read_to_string(s.root.join("empty/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().filter(|l| l.contains("\"skipped_step\":true") && l.contains("\"skipped_samples\":8")).count(), 2, "{lines}");
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    let e = err(run(&s, "empty-limit", &rc, &[short(StageKind::Pt, &files.pretrain, 2)], &mut m, None, None, None));
    assert!(e.contains("max_skip_fraction") && e.contains("batch time"), "{e}");
}

#[test]
fn absurd_epoch_counts_train_to_max_steps_without_building_the_whole_order() {
    let s = setup();
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    for (i, epochs) in [1e9, 1e30, f64::MAX].into_iter().enumerate() {
        let stage = StageConfig { epochs, ..short(StageKind::Pt, &s.pretrain, 2) };
        let st = run(&s, &format!("epochs-{i}"), &rc, &[stage], &mut model(&s, 16, 1), None, None, None).unwrap();
        assert_eq!(st.global_step, 2, "epochs {epochs}");
    }
    // A batch beyond any dataset is one step of every sample; a huge max_len truncates nothing.
    let stage = StageConfig { global_batch: usize::MAX, micro_batch: Some(usize::MAX), max_len: usize::MAX, ..short(StageKind::Pt, &s.pretrain, 2) };
    let st = run(&s, "huge-batch", &rc, &[stage], &mut model(&s, 16, 1), None, None, None).unwrap();
    assert_eq!(st.global_step, 1);
}

#[test]
fn zero_streak_and_zero_max_steps_are_refused_naming_the_key() {
    let s = setup();
    let stages = [short(StageKind::Pt, &s.pretrain, 2)];
    let rc = RunConfig { log_every: 0, max_nonfinite_streak: 0, ..RunConfig::default() };
    let e = err(run(&s, "streak", &rc, &stages, &mut model(&s, 16, 1), None, None, None));
    assert!(e.contains("run.max_nonfinite_streak") && e.contains("at least 1"), "{e}");
    let rc = RunConfig { log_every: 0, ..RunConfig::default() };
    let e = err(run(&s, "steps", &rc, &[StageConfig { max_steps: Some(0), ..stages[0].clone() }], &mut model(&s, 16, 1), None, None, None));
    assert!(e.contains("stage.0.max_steps") && e.contains("at least 1"), "{e}");
}

#[test]
fn token_ids_beyond_a_models_vocabulary_are_refused_at_load_naming_the_model() {
    let s = setup();
    let be = Be::new();
    // A tokenizer with an id (300) past the fixture LLM's 256 embedding rows.
    let tok = s.root.join("big-tokenizer.json");
    std::fs::write(&tok, r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "far": 300}, "unk_token": "<unk>"}}"#).unwrap();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let src = kd_engine::train::config::ModelSource {
        llava: None,
        llm: Some(fixtures.join("llm/qwen2_gqa_tied")),
        vision: Some(fixtures.join("siglip/tiny")),
        projector: None,
        tokenizer: Some(tok),
        feature_layer: -2,
        feature_select: "patch".into(),
    };
    let e = err(kd_engine::train::model_state::load_model(&be, "student", &src, 1).map(|_| ()));
    assert!(e.contains("student") && e.contains("up to 300") && e.contains("256 rows"), "{e}");
    // A teacher reads the student's ids: one with fewer rows than the student's tokenizer is refused
    // before any step.
    let teacher = new_model(&be, &s.vision, &llm_cfg(vocab(&s) - 1, 24), &s.tokenizer, 2).unwrap();
    let e = err(run(&s, "small-teacher", &RunConfig::default(), &[short(StageKind::Dpt, &s.pretrain, 1)], &mut model(&s, 16, 1), Some(&teacher), None, None));
    assert!(e.contains("teacher") && e.contains(&format!("{} rows", vocab(&s) - 1)), "{e}");
    assert!(!s.root.join("small-teacher/metrics.jsonl").exists());
}

#[test]
fn quick_with_a_config_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["train", "--config", "/nonexistent.toml", "--quick"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--quick") && err.contains("--config"), "{err}");
}

#[test]
fn a_config_with_missing_paths_names_them_all_and_leaves_no_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("placeholders.toml");
    std::fs::write(
        &cfg,
        format!(
            "[run]\nout = \"{}\"\n[student]\nllm = \"/models/a\"\nvision = \"/models/b\"\n[teacher]\nllava = \"/models/t\"\n\
             [[stage]]\nkind = \"dpt\"\ndata = \"/data/pt.json\"\nimage_folder = \"/data/img\"\nlr = 1e-3\nglobal_batch = 8\n",
            out.display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("5 path(s)"), "{err}");
    for key in ["student.llm = /models/a", "student.vision = /models/b", "teacher.llava = /models/t", "stage.0.data = /data/pt.json", "stage.0.image_folder = /data/img"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    assert!(!out.exists(), "no run folder for a run that never started");
    // A start that fails later (the LLM folder exists but holds no model) leaves no folder either.
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let data = tmp.path().join("pt.json");
    std::fs::write(&data, "[]").unwrap();
    let text = format!(
        "[run]\nout = \"{}\"\n[student]\nllm = \"{m}\"\nvision = \"{m}\"\n[[stage]]\nkind = \"pt\"\ndata = \"{}\"\nlr = 1e-3\nglobal_batch = 8\n",
        out.display(),
        data.display(),
        m = models.display()
    );
    std::fs::write(&cfg, text).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("student"), "{err}");
    assert!(!out.exists(), "no run folder for a run that never started: {err}");
}
