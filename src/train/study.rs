//! The miniature LLaVA-KD study that `kd-engine train` runs with no arguments: procedural images
//! of coloured shapes with captions (PT/DPT) and questions (SFT/DFT), a tiny frozen SigLIP-shaped
//! tower shared by every model, LLMs that start from a short caption pretraining (the stand-in
//! for the paper's pretrained LLMs, see `Plan::student_caption_epochs`), a larger teacher trained
//! PT→SFT, a student baseline PT→SFT and a student trained with LLaVA-KD (DPT→SFT→DFT), all
//! evaluated on held-out questions about held-out images, in the form of paper Table A8.
//! `--ablation` adds the per-stage variants of Table A5 (DPT→SFT and PT→SFT→DFT).
//!
//! Each seed's folder keeps what a user can run again: every trained model as an HF LLaVA folder
//! with its tokenizer (`models/teacher`, `models/student-baseline`, `models/student-llava-kd`,
//! ...; `kd-engine generate / eval / compare` take them), each model's answer to every held-out
//! question (`predictions/NAME.jsonl`), and the runs' metrics, plots and checkpoints (`runs/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use serde_json::Value;

use super::config::{RunConfig, StageConfig, StageKind, Target};
use super::model_state::{linear_default_init, MllmState};
use super::plot::read_metrics_jsonl;
use super::recipe::{run_stages, RecipeRun};
use crate::backend::{Backend, GeluKind};
use crate::data::synthetic::study_tokenizer;
use crate::data::{
    answer_matches, default_visual_placeholder, load_rgb, normalise_answer, preprocess, write_study_data, EncodeOptions, ImageProcessorConfig, Role,
    StudyFiles, StudySpec, Template, Turn, IMAGE_TAG,
};
use crate::eval::greedy_answers;
use crate::model::{export_llava, Arch, ExportOptions, FeatureSelect, Llm, LlmConfig, Mllm, MllmWeights, ParamSet, ParamSpec, VisionConfig, VisionTower};
use crate::weights::{write_safetensors, NamedTensor, StoreDtype};

/// Which experiment of the study to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StudyKind {
    /// Teacher, student baseline and student + LLaVA-KD (and with `ablation` Table A5's variants).
    LlavaKd,
    /// The distillation sanity check ([`run_distil_only`]): students trained by MDist alone (no
    /// CE) against the same students trained by CE alone, scored by agreement with the teacher.
    DistilOnly,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct StudyOptions {
    pub kind: StudyKind,
    /// The small version (less data, fewer held-out questions).
    pub quick: bool,
    /// Every training cut short ([`Plan::smoke`]): a check of the plumbing, whose models are
    /// undertrained, for the tests (the command line has no switch for it).
    pub smoke: bool,
    pub ablation: bool,
    pub seeds: Vec<u64>,
    pub out: PathBuf,
    pub progress: bool,
}

/// Hyper-parameters of the study's runs (the miniature analogue of paper Table A9).
struct Plan {
    spec: StudySpec,
    vision: VisionConfig,
    teacher: LlmConfig,
    student: LlmConfig,
    /// Epochs of caption training each LLM gets before its recipe, LLM and projector unfrozen.
    /// The paper's LLMs arrive pretrained (Qwen1.5); the study's start random, and a random LLM
    /// frozen through PT/DPT learns nothing there, then sits on the answer prior through SFT
    /// (measured: all three models at chance). Caption training is the study's stand-in for that
    /// pretrained state; afterwards the recipes are exactly PT→SFT and DPT→SFT→DFT. The teacher
    /// gets three times the student's, as the larger model in the paper also knows more: with the
    /// same 8 epochs the teacher was no better than the student (3 seeds: 50.8 vs 56.2 %).
    student_caption_epochs: f64,
    teacher_caption_epochs: f64,
    pt_lr: f64,
    sft_lr: f64,
    /// The larger teacher trains stabler at a third of the student's rate (one seed: 60 vs 57 %).
    teacher_sft_lr: f64,
    sft_epochs: f64,
    teacher_sft_epochs: f64,
    batch: usize,
}

fn plan(quick: bool, vocab: usize) -> Plan {
    let llm = |hidden, layers, heads, kv| LlmConfig {
        arch: Arch::Qwen2,
        hidden,
        intermediate: hidden * 2,
        layers,
        heads,
        kv_heads: kv,
        head_dim: hidden / heads,
        vocab,
        rms_eps: 1e-6,
        rope_theta: 10000.0,
        tie_embeddings: true,
        qkv_bias: true,
        o_bias: false,
    };
    Plan {
        spec: if quick { StudySpec::quick() } else { StudySpec::full() },
        // 24×24 images in 8×8 patches: a 3×3 grid whose cells are the five object slots, 9 tokens,
        // 8 after dropping the first (an empty corner; so400m drops one of 729 the same way).
        // Features at hidden_states[-2]: after the first of two blocks.
        vision: VisionConfig { hidden: 48, intermediate: 96, layers: 2, heads: 4, channels: 3, image_size: 24, patch_size: 8, ln_eps: 1e-6, act: GeluKind::Tanh },
        teacher: llm(96, 3, 4, 2),
        student: llm(48, 2, 4, 2),
        student_caption_epochs: 8.0,
        teacher_caption_epochs: 24.0,
        pt_lr: 1e-3,
        sft_lr: 3e-3,
        teacher_sft_lr: 1e-3,
        sft_epochs: if quick { 6.0 } else { 8.0 },
        teacher_sft_epochs: if quick { 8.0 } else { 10.0 },
        batch: 16,
    }
}

impl Plan {
    /// The smoke run: every training cut short, a check of the plumbing (the distil-only CI test
    /// runs it) whose models are undertrained.
    fn smoke(self) -> Plan {
        Plan { teacher_caption_epochs: 4.0, student_caption_epochs: 3.0, sft_epochs: 2.0, teacher_sft_epochs: 2.0, ..self }
    }
}

/// A stage of the study with its defaults.
pub fn stage(kind: StageKind, data: &Path, lr: f64, epochs: f64, batch: usize) -> StageConfig {
    StageConfig {
        kind,
        name: None,
        data: data.to_path_buf(),
        image_folder: None,
        template: None,
        lr,
        global_batch: batch,
        micro_batch: None,
        epochs,
        max_steps: None,
        warmup_ratio: 0.03,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        ce: true,
        alpha: 1.0,
        beta: 1.0,
        gamma: 0.5,
        targets: vec![Target::Response, Target::Visual],
        mdist: true,
        rdist: true,
        temperature: 1.0,
        divergence: "fkl".into(),
        divergence_lambda: None,
        max_len: 2048,
    }
}

/// N(0, 0.02²) matrices (HF `initializer_range`), unit norm weights, zero biases; seeded.
fn llm_init(seed: u64) -> impl FnMut(&ParamSpec) -> Vec<f32> {
    let mut rng = crate::data::SplitMix64::new(seed);
    move |s: &ParamSpec| {
        if s.shape.len() == 1 {
            let v = if s.name.contains("norm") { 1.0 } else { 0.0 };
            return vec![v; s.numel()];
        }
        (0..s.numel())
            .map(|_| {
                // Box–Muller from two uniforms in (0, 1].
                let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }
}

/// Writes a randomly initialised (seeded) SigLIP-shaped tower as a checkpoint folder: the study's
/// frozen tower, which every model reads through the real loader (so the teacher shares the
/// student's features).
pub fn write_vision_tower(dir: &Path, cfg: &VisionConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tower = VisionTower::new(cfg.clone());
    let mut init = linear_default_init(seed);
    // The file holds Hugging Face tensors, each initialised by its own name and shape.
    let values: Vec<(ParamSpec, Vec<f32>)> = tower
        .specs
        .iter()
        .flat_map(ParamSpec::hf_specs)
        .map(|s| {
            let v = if s.name.contains("layer_norm") || s.name.contains("post_layernorm") {
                vec![if s.name.ends_with("weight") { 1.0 } else { 0.0 }; s.numel()]
            } else if s.name.contains("patch_embedding.weight") {
                // A conv weight [D, C, P, P] has fan_in C·P·P.
                let fan = s.shape[1..].iter().product::<usize>() as f64;
                init(&ParamSpec::matrix(s.name.clone(), s.shape[0], fan as usize))
            } else {
                init(&s)
            };
            (s, v)
        })
        .collect();
    let tensors: Vec<NamedTensor> = values.iter().map(|(s, v)| NamedTensor { name: s.name.clone(), shape: s.shape.clone(), data: v }).collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let mut config = crate::model::export::vision_config_json(cfg);
    if let Some(obj) = config.as_object_mut() {
        obj.insert("architectures".into(), serde_json::json!(["SiglipVisionModel"]));
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}

/// A model of the study: the tower read from `vision_dir`, a fresh projector and a fresh LLM.
pub fn new_model<B: Backend>(be: &B, vision_dir: &Path, llm_cfg: &LlmConfig, tokenizer_path: &Path, seed: u64) -> Result<MllmState<B::Buf>> {
    let loaded = crate::model::LoadedVision::load(be, vision_dir)?;
    let model = Mllm::new(loaded.tower, Llm::new(llm_cfg.clone()), -2, FeatureSelect::Patch)?;
    let projector = ParamSet::from_fn(be, &model.projector.specs, linear_default_init(seed ^ 0x5052_4f4a))?;
    let llm = ParamSet::from_fn(be, &model.llm.specs, llm_init(seed))?;
    let processor = ImageProcessorConfig::for_tower(vision_dir, model.vision.cfg.image_size)?;
    Ok(MllmState {
        tokenizer: crate::data::load_tokenizer(tokenizer_path)?,
        weights: MllmWeights { vision: loaded.weights, projector, llm },
        model,
        processor,
        vision_source: Some(vision_dir.to_path_buf()),
    })
}

/// Accuracy of one model on the held-out questions, overall and per question kind.
#[derive(Clone, Debug, Serialize)]
pub struct Score {
    pub overall: f64,
    pub by_kind: BTreeMap<String, f64>,
}

/// One model's answer to one held-out question.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub id: String,
    pub image: String,
    pub question: String,
    pub answer: String,
    pub prediction: String,
    pub correct: bool,
}

/// The kind of a held-out question (`color`, `count`, ...): the last part of its id.
fn question_kind(id: &str) -> &str {
    id.rsplit('-').next().unwrap_or("all")
}

/// Scores `m` on the held-out questions; returns the score and every answer.
pub fn evaluate<B: Backend>(be: &B, m: &MllmState<B::Buf>, files: &StudyFiles) -> Result<(Score, Vec<Prediction>)> {
    let text = std::fs::read_to_string(&files.eval)?;
    let template = Template::phi();
    let opts = EncodeOptions { n_visual_tokens: m.model.visual_tokens(), visual_placeholder_id: default_visual_placeholder(&m.tokenizer), max_len: 2048 };
    let mut prompts = Vec::new();
    let mut refs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{} line {}", files.eval.display(), n + 1))?;
        let field = |k: &str| v[k].as_str().map(str::to_string).with_context(|| format!("{} line {}: no \"{k}\"", files.eval.display(), n + 1));
        let (id, image, question, answer) = (field("id")?, field("image")?, field("question")?, field("answer")?);
        let turns = [Turn { role: Role::User, text: format!("{IMAGE_TAG}\n{question}") }];
        let sample = template.encode_generation_prompt(&turns, true, &m.tokenizer, &opts)?;
        let pixels = preprocess(&load_rgb(&files.dir.join(&image))?, &m.processor)?;
        prompts.push((sample, Some(pixels)));
        let kind = question_kind(&id).to_string();
        refs.push((kind, Prediction { id, image, question, answer, prediction: String::new(), correct: false }));
    }
    let eos = m.tokenizer.token_to_id("<|endoftext|>").context("the study tokenizer has no <|endoftext|>")?;
    let answers = greedy_answers(be, m, prompts, 4, &[eos])?;
    let mut per: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut right = 0;
    let n = refs.len();
    let mut predictions = Vec::with_capacity(n);
    for (ids, (kind, mut p)) in answers.iter().zip(refs) {
        let text = m.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("decoding an answer: {e}"))?;
        let ok = answer_matches(&text, &p.answer);
        right += ok as usize;
        let e = per.entry(kind).or_default();
        e.0 += ok as usize;
        e.1 += 1;
        (p.prediction, p.correct) = (text.trim().to_string(), ok);
        predictions.push(p);
    }
    let score = Score { overall: right as f64 / n.max(1) as f64, by_kind: per.into_iter().map(|(k, (r, n))| (k, r as f64 / n as f64)).collect() };
    Ok((score, predictions))
}

/// The models a seed keeps, in table order: (folder name under `models/`, row of the table).
pub const STUDY_MODELS: &[(&str, &str)] = &[
    ("teacher", "teacher (PT→SFT)"),
    ("student-baseline", "student (PT→SFT)"),
    ("student-llava-kd", "student + LLaVA-KD (DPT→SFT→DFT)"),
    ("student-dpt-sft", "student DPT→SFT"),
    ("student-pt-sft-dft", "student PT→SFT→DFT"),
];

/// Scores a trained model, writes its answers to `seed_dir/predictions/NAME.jsonl` and exports it
/// with its tokenizer to `seed_dir/models/NAME`; returns the score and the answers.
fn evaluate_and_keep<B: Backend>(be: &B, m: &MllmState<B::Buf>, files: &StudyFiles, seed_dir: &Path, name: &str) -> Result<(Score, Vec<Prediction>)> {
    let (score, predictions) = evaluate(be, m, files)?;
    let dir = seed_dir.join("predictions");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut lines = String::new();
    for p in &predictions {
        lines.push_str(&serde_json::to_string(p)?);
        lines.push('\n');
    }
    let path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&path, lines).with_context(|| format!("writing {}", path.display()))?;
    // f32: the exported model is the one the table scores (bf16 rounding moves these tiny
    // models' greedy answers), and at this size the file is small anyway.
    let opts = ExportOptions { tokenizer: Some(&files.tokenizer), image_processor: Some(m.processor.clone()), dtype: StoreDtype::F32, ..ExportOptions::default() };
    export_llava(be, &seed_dir.join("models").join(name), &m.model, &m.weights, &opts).with_context(|| format!("exporting the {name} model"))?;
    Ok((score, predictions))
}

/// The folder of one seed's runs, models and predictions.
pub fn seed_dir(out: &Path, seed: u64) -> PathBuf {
    out.join(format!("seed-{seed}"))
}

/// The study's data folder (the `--image-folder` of its question files).
pub fn data_dir(out: &Path) -> PathBuf {
    out.join("data")
}

/// Writes the held-out questions about the first `images` held-out images to
/// `dir/compare-questions.jsonl` (the input of the study's `compare` report) and returns its path.
pub fn write_compare_questions(out: &Path, dir: &Path, images: usize) -> Result<PathBuf> {
    let eval = data_dir(out).join("eval.jsonl");
    let text = std::fs::read_to_string(&eval).with_context(|| format!("reading {}", eval.display()))?;
    let mut seen: Vec<String> = Vec::new();
    let mut keep = String::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{} line {}", eval.display(), n + 1))?;
        let image = v["image"].as_str().with_context(|| format!("{} line {}: no \"image\"", eval.display(), n + 1))?.to_string();
        if !seen.contains(&image) {
            if seen.len() == images {
                continue;
            }
            seen.push(image);
        }
        keep.push_str(line);
        keep.push('\n');
    }
    let path = dir.join("compare-questions.jsonl");
    std::fs::write(&path, keep).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The result rows of the study for one seed.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    pub seed: u64,
    pub rows: BTreeMap<String, Score>,
    pub seconds: f64,
}

/// What every experiment of a study shares: its plan, data, frozen tower and backend.
struct Study<'a, B: Backend> {
    be: &'a B,
    p: Plan,
    files: StudyFiles,
    vision_dir: PathBuf,
    out: PathBuf,
    progress: bool,
}

/// One seed's run settings and folder.
struct SeedRun {
    seed: u64,
    run: RunConfig,
    dir: PathBuf,
}

impl SeedRun {
    fn new(out: &Path, seed: u64) -> Self {
        SeedRun { seed, run: RunConfig { seed, log_every: 0, ..RunConfig::default() }, dir: seed_dir(out, seed) }
    }
    /// The seeds that make a seed's teacher and student LLMs (and their starts).
    fn init_seeds(&self) -> (u64, u64) {
        (self.seed.wrapping_mul(31) + 1, self.seed.wrapping_mul(31) + 2)
    }
}

impl<'a, B: Backend> Study<'a, B> {
    /// Writes the study's data and frozen tower into the new or empty folder `opts.out`.
    fn open(be: &'a B, opts: &StudyOptions) -> Result<Self> {
        let out = &opts.out;
        // A study never writes over another's results (every run folder inside would refuse anyway,
        // after the data were rewritten).
        let used = std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false);
        ensure!(!used, "{} is not empty: a study writes into a new or empty folder; choose another --out", out.display());
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let vocab = study_tokenizer()?.get_vocab_size(true);
        let p = if opts.smoke { plan(opts.quick, vocab).smoke() } else { plan(opts.quick, vocab) };
        let files = write_study_data(&data_dir(out), &p.spec)?;
        let vision_dir = out.join("vision");
        write_vision_tower(&vision_dir, &p.vision, 7)?;
        eprintln!(
            "miniature LLaVA-KD study{}{}: {} captions, {} QA conversations, {} held-out questions; teacher {}×{} layers, student {}×{} layers",
            if opts.kind == StudyKind::DistilOnly { ", distil-only" } else { "" },
            if opts.quick { " (quick)" } else { "" },
            p.spec.pretrain_samples,
            p.spec.sft_samples,
            p.spec.eval_questions,
            p.teacher.hidden,
            p.teacher.layers,
            p.student.hidden,
            p.student.layers
        );
        Ok(Study { be, p, files, vision_dir, out: out.clone(), progress: opts.progress })
    }

    fn recipe<'r>(&self, s: &'r SeedRun, name: &str) -> RecipeRun<'r> {
        RecipeRun { run: &s.run, out_dir: s.dir.join("runs").join(name), progress: self.progress, resume: None, stop_after_global_step: None }
    }

    /// A stage of the study on the question conversations.
    fn sft(&self, kind: StageKind, lr: f64, epochs: f64) -> StageConfig {
        stage(kind, &self.files.sft, lr, epochs, self.p.batch)
    }

    /// A stage of the study on the captions.
    fn pt(&self, kind: StageKind) -> StageConfig {
        stage(kind, &self.files.pretrain, self.p.pt_lr, 1.0, self.p.batch)
    }

    /// The start of every model of one LLM size in a seed (see `Plan::student_caption_epochs`):
    /// the whole model trained on the captions, with the PT template. Returns its checkpoint.
    fn llm_start(&self, s: &SeedRun, name: &str, cfg: &LlmConfig, init_seed: u64, epochs: f64) -> Result<PathBuf> {
        eprintln!("seed {}: {name} LLM: caption pretraining", s.seed);
        let mut m = new_model(self.be, &self.vision_dir, cfg, &self.files.tokenizer, init_seed)?;
        let captions = StageConfig {
            name: Some("captions".into()),
            template: Some("pretrain".into()),
            ..stage(StageKind::Sft, &self.files.pretrain, self.p.sft_lr, epochs, self.p.batch)
        };
        let r = self.recipe(s, &format!("{name}-captions"));
        run_stages(self.be, &r, &[captions], &mut m, None)?;
        Ok(r.out_dir.join("checkpoint"))
    }

    /// A model of size `cfg` with the weights of the checkpoint `start`.
    fn from_start(&self, cfg: &LlmConfig, init_seed: u64, start: &Path) -> Result<MllmState<B::Buf>> {
        let mut m = new_model(self.be, &self.vision_dir, cfg, &self.files.tokenizer, init_seed)?;
        crate::train::checkpoint::load_weights(self.be, start, &mut m.weights)?;
        Ok(m)
    }

    /// The seed's teacher: PT→SFT from `start`, scored and kept as `models/teacher`.
    fn teacher(&self, s: &SeedRun, start: &Path) -> Result<(MllmState<B::Buf>, Score, Vec<Prediction>)> {
        let p = &self.p;
        let mut teacher = self.from_start(&p.teacher, s.init_seeds().0, start)?;
        eprintln!("seed {}: teacher (PT→SFT)", s.seed);
        let teacher_sft = self.sft(StageKind::Sft, p.teacher_sft_lr, p.teacher_sft_epochs);
        let name = STUDY_MODELS[0].0;
        run_stages(self.be, &self.recipe(s, name), &[self.pt(StageKind::Pt), teacher_sft], &mut teacher, None)?;
        let (score, predictions) = evaluate_and_keep(self.be, &teacher, &self.files, &s.dir, name)?;
        Ok((teacher, score, predictions))
    }
}

/// Runs the study `opts.kind` names; writes `results.json` and `results.md` into `opts.out` and
/// returns the table.
pub fn run_study<B: Backend>(be: &B, opts: &StudyOptions) -> Result<String> {
    let study = Study::open(be, opts)?;
    match opts.kind {
        StudyKind::LlavaKd => run_llava_kd(&study, opts),
        StudyKind::DistilOnly => run_distil_only(&study, opts),
    }
}

/// Writes a study's table (`results.md`) and, with its per-seed results, `results.json`.
fn write_results(out: &Path, study: &str, spec: &StudySpec, seeds: Value, table: &str) -> Result<()> {
    let json = serde_json::json!({ "study": study, "spec": spec, "seeds": seeds, "table": table });
    for (file, text) in [("results.json", serde_json::to_string_pretty(&json)?), ("results.md", table.to_string())] {
        let path = out.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The LLaVA-KD study: teacher, student baseline, student + LLaVA-KD (and the ablation).
fn run_llava_kd<B: Backend>(st: &Study<'_, B>, opts: &StudyOptions) -> Result<String> {
    let (be, p, files) = (st.be, &st.p, &st.files);
    // In the order of STUDY_MODELS after the teacher.
    let sft = |kind| st.sft(kind, p.sft_lr, p.sft_epochs);
    let dft = || st.sft(StageKind::Dft, p.sft_lr, 1.0);
    let mut variants: Vec<Vec<StageConfig>> = vec![
        vec![st.pt(StageKind::Pt), sft(StageKind::Sft)],
        vec![st.pt(StageKind::Dpt), sft(StageKind::Sft), dft()],
    ];
    if opts.ablation {
        variants.push(vec![st.pt(StageKind::Dpt), sft(StageKind::Sft)]);
        variants.push(vec![st.pt(StageKind::Pt), sft(StageKind::Sft), dft()]);
    }
    let mut results = Vec::new();
    for &seed in &opts.seeds {
        let started = Instant::now();
        let s = SeedRun::new(&st.out, seed);
        let mut rows = BTreeMap::new();
        // Each LLM size gets its language once per seed; every model of that size starts there.
        let (teacher_seed, student_seed) = s.init_seeds();
        let teacher_start = st.llm_start(&s, "teacher", &p.teacher, teacher_seed, p.teacher_caption_epochs)?;
        let student_start = st.llm_start(&s, "student", &p.student, student_seed, p.student_caption_epochs)?;
        let (teacher, teacher_score, _) = st.teacher(&s, &teacher_start)?;
        rows.insert(STUDY_MODELS[0].1.to_string(), teacher_score);
        for (&(name, row), stages) in STUDY_MODELS[1..].iter().zip(&variants) {
            eprintln!("seed {seed}: {row}");
            // Every student variant starts from the same weights.
            let mut student = st.from_start(&p.student, student_seed, &student_start)?;
            let uses_teacher = stages.iter().any(|s| s.kind.distills());
            run_stages(be, &st.recipe(&s, name), stages, &mut student, uses_teacher.then_some(&teacher))?;
            rows.insert(row.to_string(), evaluate_and_keep(be, &student, files, &s.dir, name)?.0);
        }
        let r = SeedResult { seed, rows, seconds: started.elapsed().as_secs_f64() };
        eprintln!("seed {seed} done in {:.0}s", r.seconds);
        results.push(r);
    }
    let table = render_table(&results);
    write_results(&st.out, if opts.quick { "quick" } else { "full" }, &p.spec, serde_json::to_value(&results)?, &table)?;
    Ok(table)
}

/// Table A8's form: one row per model, accuracy per question kind and overall, as mean ± std
/// over the seeds (just the value for one seed).
fn render_table(results: &[SeedResult]) -> String {
    let Some(first) = results.first() else { return String::new() };
    let kinds: Vec<String> = first.rows.values().next().map(|s| s.by_kind.keys().cloned().collect()).unwrap_or_default();
    let cell = |vals: Vec<f64>| mean_sd(&vals, 100.0, 1);
    let mut s = format!(
        "held-out accuracy (%), {} seed{}: {}\n\n| model | {} | overall |\n| --- |{} --- |\n",
        results.len(),
        if results.len() == 1 { "" } else { "s" },
        results.iter().map(|r| r.seed.to_string()).collect::<Vec<_>>().join(", "),
        kinds.join(" | "),
        " --- |".repeat(kinds.len())
    );
    // Teacher first, then the students in the order they were run.
    let mut names: Vec<&String> = first.rows.keys().collect();
    names.sort_by_key(|n| (!n.starts_with("teacher"), !n.contains("(PT→SFT)"), (*n).clone()));
    for name in names {
        let per_kind: Vec<String> = kinds.iter().map(|k| cell(results.iter().map(|r| r.rows[name].by_kind[k]).collect())).collect();
        s.push_str(&format!("| {name} | {} | {} |\n", per_kind.join(" | "), cell(results.iter().map(|r| r.rows[name].overall).collect())));
    }
    s
}

/// `mean ± sd` of `vals × scale` over seeds (sample sd; just the mean for one value) with
/// `digits` decimals.
fn mean_sd(vals: &[f64], scale: f64, digits: usize) -> String {
    let n = vals.len() as f64;
    let mean = vals.iter().sum::<f64>() / n;
    if vals.len() < 2 {
        format!("{:.digits$}", scale * mean)
    } else {
        let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        format!("{:.digits$} ± {:.digits$}", scale * mean, scale * sd)
    }
}

/// How a model's answers relate to the teacher's on the held-out questions.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Agreement {
    /// Fraction of the questions answered as the teacher answered them ([`answer_matches`]).
    pub all: f64,
    /// The same over the questions the teacher answered wrongly (`None` if it answered none
    /// wrongly): agreement there is the teacher's own behaviour, not the labels', reaching the model.
    pub teacher_wrong: Option<f64>,
    /// The agreement of a model that answered each question with an answer drawn from its own
    /// answers to that kind of question, independently of the teacher: Σ over kinds and
    /// answers of (questions of the kind) · f_model(answer) · f_teacher(answer), over all questions.
    pub chance: f64,
}

/// Compares `model`'s answers with `teacher`'s, question by question (the same held-out file,
/// in the same order).
pub fn agreement(model: &[Prediction], teacher: &[Prediction]) -> Result<Agreement> {
    ensure!(model.len() == teacher.len() && !model.is_empty(), "agreement: {} answers against the teacher's {}", model.len(), teacher.len());
    let (mut same, mut wrong, mut same_wrong) = (0usize, 0usize, 0usize);
    // Per kind: (questions, model answer counts, teacher answer counts).
    type Counts = BTreeMap<String, usize>;
    let mut kinds: BTreeMap<&str, (usize, Counts, Counts)> = BTreeMap::new();
    for (m, t) in model.iter().zip(teacher) {
        ensure!(m.id == t.id, "agreement: question {} is answered against the teacher's answer to {}", m.id, t.id);
        let agree = answer_matches(&m.prediction, &t.prediction);
        same += agree as usize;
        if !t.correct {
            wrong += 1;
            same_wrong += agree as usize;
        }
        let k = kinds.entry(question_kind(&m.id)).or_default();
        k.0 += 1;
        *k.1.entry(normalise_answer(&m.prediction)).or_default() += 1;
        *k.2.entry(normalise_answer(&t.prediction)).or_default() += 1;
    }
    let n = model.len() as f64;
    let chance: f64 = kinds
        .values()
        .map(|(q, fm, ft)| {
            let q = *q as f64;
            // An empty answer never matches (as in answer_matches).
            let hits: f64 = fm.iter().filter(|(a, _)| !a.is_empty()).map(|(a, &c)| c as f64 * *ft.get(a).unwrap_or(&0) as f64).sum();
            hits / q
        })
        .sum::<f64>()
        / n;
    Ok(Agreement { all: same as f64 / n, teacher_wrong: (wrong > 0).then(|| same_wrong as f64 / wrong as f64), chance })
}

/// One model of the distil-only experiment.
#[derive(Clone, Debug, Serialize)]
pub struct DistilRow {
    /// `student` (the study's student size) or `teacher-size`.
    pub size: String,
    /// `start` (the caption-pretrained start, before), `mdist` (MDist alone, no CE) or `ce` (CE
    /// alone); the model's folder is `models/SIZE-TRAINING`.
    pub training: String,
    pub score: Score,
    pub agreement: Agreement,
    /// The MDist run's training KL to the teacher (response rows, visual rows): means of its
    /// first and of its last [`KL_STEPS`] steps.
    pub train_kl: Option<TrainKl>,
}

/// Steps averaged at each end of a run for [`TrainKl`].
pub const KL_STEPS: usize = 5;

/// Training KL at the start and end of a distillation run (from its `metrics.jsonl`).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TrainKl {
    pub res_first: f64,
    pub res_last: f64,
    pub vis_first: f64,
    pub vis_last: f64,
}

/// Reads [`TrainKl`] from a run's `metrics.jsonl`.
pub fn train_kl(metrics: &Path) -> Result<TrainKl> {
    let records = read_metrics_jsonl(metrics)?;
    ensure!(records.len() >= KL_STEPS, "{}: {} steps logged, fewer than {KL_STEPS}", metrics.display(), records.len());
    let mean = |recs: &[crate::train::plot::MetricRecord], key: &str| -> Result<f64> {
        let vals = recs.iter().map(|r| r.values.get(key).copied().with_context(|| format!("{}: step {} has no \"{key}\"", metrics.display(), r.step)));
        Ok(vals.collect::<Result<Vec<f64>>>()?.iter().sum::<f64>() / recs.len() as f64)
    };
    let (first, last) = (&records[..KL_STEPS], &records[records.len() - KL_STEPS..]);
    Ok(TrainKl { res_first: mean(first, "res")?, res_last: mean(last, "res")?, vis_first: mean(first, "vis")?, vis_last: mean(last, "vis")? })
}

/// One seed of the distil-only experiment.
#[derive(Clone, Debug, Serialize)]
pub struct DistilSeed {
    pub seed: u64,
    pub teacher: Score,
    pub rows: Vec<DistilRow>,
    pub seconds: f64,
}

/// The distillation sanity check: does the MDist signal alone move a student toward its teacher?
/// Per seed, the study's teacher (PT→SFT) and, for a student of the study's student size and one
/// of the teacher's size (from the teacher's own caption-pretrained start), three models from the
/// same start: the start itself, the start trained by MDist alone (DFT with `ce = false`, no
/// RDist: response and visual KL, τ = 1) on the teacher's SFT conversations and images, and the
/// start trained by CE alone (SFT) on the same data with the same learning rate and steps. Each
/// is scored by accuracy and by agreement with the teacher's answers.
fn run_distil_only<B: Backend>(st: &Study<'_, B>, opts: &StudyOptions) -> Result<String> {
    let (be, p, files) = (st.be, &st.p, &st.files);
    let mut results = Vec::new();
    for &seed in &opts.seeds {
        let started = Instant::now();
        let s = SeedRun::new(&st.out, seed);
        let (teacher_seed, student_seed) = s.init_seeds();
        let teacher_start = st.llm_start(&s, "teacher", &p.teacher, teacher_seed, p.teacher_caption_epochs)?;
        let student_start = st.llm_start(&s, "student", &p.student, student_seed, p.student_caption_epochs)?;
        let (teacher, teacher_score, teacher_answers) = st.teacher(&s, &teacher_start)?;
        let mut rows = Vec::new();
        // Each size trains as its own model in the LLaVA-KD study does (the student at its SFT
        // rate and epochs, the teacher size at the teacher's).
        let sizes = [
            ("student", &p.student, student_seed, &student_start, p.sft_lr, p.sft_epochs),
            ("teacher-size", &p.teacher, teacher_seed, &teacher_start, p.teacher_sft_lr, p.teacher_sft_epochs),
        ];
        for (size, cfg, init_seed, start, lr, epochs) in sizes {
            let mdist = StageConfig { name: Some("mdist".into()), ce: false, rdist: false, ..st.sft(StageKind::Dft, lr, epochs) };
            let ce = StageConfig { name: Some("ce".into()), ..st.sft(StageKind::Sft, lr, epochs) };
            for (training, stage) in [("start", None), ("mdist", Some(mdist)), ("ce", Some(ce))] {
                let name = format!("{size}-{training}");
                eprintln!("seed {seed}: {name}");
                let mut m = st.from_start(cfg, init_seed, start)?;
                let mut train_kl_of_run = None;
                if let Some(stage) = stage {
                    let r = st.recipe(&s, &name);
                    let distils = stage.kind.distills();
                    run_stages(be, &r, std::slice::from_ref(&stage), &mut m, distils.then_some(&teacher))?;
                    if distils {
                        train_kl_of_run = Some(train_kl(&r.out_dir.join("metrics.jsonl"))?);
                    }
                }
                let (score, answers) = evaluate_and_keep(be, &m, files, &s.dir, &name)?;
                let agreement = agreement(&answers, &teacher_answers)?;
                rows.push(DistilRow { size: size.into(), training: training.into(), score, agreement, train_kl: train_kl_of_run });
            }
        }
        let r = DistilSeed { seed, teacher: teacher_score, rows, seconds: started.elapsed().as_secs_f64() };
        eprintln!("seed {seed} done in {:.0}s", r.seconds);
        results.push(r);
        // After every seed, so that a long run shows its seeds so far.
        write_results(&st.out, if opts.quick { "distil-only-quick" } else { "distil-only" }, &p.spec, serde_json::to_value(&results)?, &render_distil_table(&results, p))?;
    }
    Ok(render_distil_table(&results, p))
}

/// The distil-only table: mean ± std over the seeds of each model's accuracy and agreement with
/// the teacher, and the MDist runs' training KL.
fn render_distil_table(results: &[DistilSeed], p: &Plan) -> String {
    let Some(first) = results.first() else { return String::new() };
    let mut s = format!(
        "distil-only: held-out accuracy and agreement with the teacher's answers (%), {} seed{}: {}\n\n\
         | model | trained by | accuracy | agreement | agreement where the teacher is wrong | chance agreement | train KL, response rows (first → last {KL_STEPS} steps) |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        results.len(),
        if results.len() == 1 { "" } else { "s" },
        results.iter().map(|r| r.seed.to_string()).collect::<Vec<_>>().join(", ")
    );
    let pct = |vals: Vec<f64>| mean_sd(&vals, 100.0, 1);
    s.push_str(&format!("| teacher {}×{} (PT→SFT) | CE | {} | — | — | — | — |\n", p.teacher.hidden, p.teacher.layers, pct(results.iter().map(|r| r.teacher.overall).collect())));
    for (i, row) in first.rows.iter().enumerate() {
        let all: Vec<&DistilRow> = results.iter().map(|r| &r.rows[i]).collect();
        let shape = if row.size == "student" { &p.student } else { &p.teacher };
        let trained = match row.training.as_str() {
            "start" => "nothing (the start: captions only)",
            "mdist" => "MDist alone (no CE)",
            _ => "CE alone",
        };
        let wrong: Vec<f64> = all.iter().filter_map(|r| r.agreement.teacher_wrong).collect();
        let kl = match all.iter().map(|r| r.train_kl).collect::<Option<Vec<TrainKl>>>() {
            Some(k) => format!(
                "{} → {}",
                mean_sd(&k.iter().map(|k| k.res_first).collect::<Vec<_>>(), 1.0, 3),
                mean_sd(&k.iter().map(|k| k.res_last).collect::<Vec<_>>(), 1.0, 3)
            ),
            None => "—".into(),
        };
        s.push_str(&format!(
            "| {} {}×{} | {trained} | {} | {} | {} | {} | {kl} |\n",
            row.size,
            shape.hidden,
            shape.layers,
            pct(all.iter().map(|r| r.score.overall).collect()),
            pct(all.iter().map(|r| r.agreement.all).collect()),
            if wrong.is_empty() { "—".into() } else { pct(wrong) },
            pct(all.iter().map(|r| r.agreement.chance).collect()),
        ));
    }
    s
}
