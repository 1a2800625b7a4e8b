//! `kd-engine eval`: answers a benchmark-style question file with an MLLM folder in batches
//! (greedy, KV cache), writes one prediction per line and prints the score (exact = VQAv2-style
//! short answers, yesno = POPE, choice = multiple-choice letters; see `eval::metrics`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::Device;
use crate::backend::Backend;
use crate::eval::answer::{Answer, MllmRunner};
use crate::eval::generate::{no_observer, DecodeStats, GenerateOptions, DEFAULT_MAX_NEW_TOKENS};
use crate::eval::metrics::{score_item, Metric, Summary};
use crate::eval::questions::{default_suffix, question_prompt, read_questions, Question};
use crate::eval::sampling::Sampling;

/// `--metric`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricArg {
    /// VQAv2-style normalised short-answer match (min(1, matches/3) with several references).
    Exact,
    /// POPE: accuracy, precision, recall, F1 (yes = positive).
    Yesno,
    /// Multiple-choice letter accuracy (needs "choices").
    Choice,
}

impl From<MetricArg> for Metric {
    fn from(m: MetricArg) -> Metric {
        match m {
            MetricArg::Exact => Metric::Exact,
            MetricArg::Yesno => Metric::YesNo,
            MetricArg::Choice => Metric::Choice,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// MLLM folder (Hugging Face LLaVA, as `kd-engine train` exports it, or TinyLLaVA).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL: {"id", "image", "question", "answer": "…" | ["…", …], "choices"?: ["…", …]}.
    #[arg(long)]
    pub data: PathBuf,
    /// Folder the "image" paths are relative to.
    #[arg(long)]
    pub image_folder: PathBuf,
    #[arg(long, value_enum)]
    pub metric: MetricArg,
    /// Questions per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Predictions JSONL, one line per question: the question's fields, "prediction" and its
    /// "score" (default: predictions.jsonl in the current folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Instruction appended to each question on a new line (default: LLaVA's for the metric;
    /// "" for none). Not added twice when the question already ends with it.
    #[arg(long)]
    pub prompt_suffix: Option<String>,
    /// Chat template (default: phi for Qwen, llama for LLaMA).
    #[arg(long)]
    pub template: Option<String>,
    /// Print the score as one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
}

/// A progress bar over questions on stderr (hidden when stderr is not a terminal).
pub fn question_bar(n: usize, prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} questions, {per_sec}, eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// Answers every question in batches of `batch`, with a progress bar.
pub fn answer_all<B: Backend>(
    be: &B,
    runner: &MllmRunner<B::Buf>,
    questions: &[Question],
    image_folder: &Path,
    suffix: &str,
    batch: usize,
    opts: &GenerateOptions,
) -> Result<(Vec<Answer>, DecodeStats)> {
    ensure!(batch > 0, "--batch must be at least 1");
    let bar = question_bar(questions.len(), runner.name());
    let mut answers = Vec::with_capacity(questions.len());
    let mut total = DecodeStats::default();
    for chunk in questions.chunks(batch) {
        let items: Vec<(String, Option<PathBuf>)> = chunk.iter().map(|q| (question_prompt(q, suffix), q.image_path(image_folder))).collect();
        let first = &chunk[0];
        let (a, stats) = runner
            .answer(be, &items, opts, &mut no_observer)
            .with_context(|| format!("answering the questions of lines {}–{}", first.line, chunk[chunk.len() - 1].line))?;
        answers.extend(a);
        total.prompt_tokens += stats.prompt_tokens;
        total.prefill_seconds += stats.prefill_seconds;
        total.decoded_tokens += stats.decoded_tokens;
        total.decode_seconds += stats.decode_seconds;
        total.steps += stats.steps;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok((answers, total))
}

/// Checks up front that every question's image exists, so a long run does not stop at the end.
pub fn check_images(questions: &[Question], data: &Path, image_folder: &Path) -> Result<()> {
    for q in questions {
        if let Some(p) = q.image_path(image_folder) {
            ensure!(p.is_file(), "{}:{}: image {} not found", data.display(), q.line, p.display());
        }
    }
    Ok(())
}

pub fn run(a: EvalArgs) -> Result<()> {
    let metric: Metric = a.metric.into();
    let questions = read_questions(&a.data, Some(metric))?;
    check_images(&questions, &a.data, &a.image_folder)?;
    crate::with_backend!(a.device, be => run_on(&be, &a, metric, &questions))
}

fn run_on<B: Backend>(be: &B, a: &EvalArgs, metric: Metric, questions: &[Question]) -> Result<()> {
    let runner = MllmRunner::load(be, &a.model, a.template.as_deref(), None)?;
    let suffix = a.prompt_suffix.clone().unwrap_or_else(|| default_suffix(metric).to_string());
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, eos: runner.eos.clone(), sampling: Sampling::Greedy };
    let (answers, stats) = answer_all(be, &runner, questions, &a.image_folder, &suffix, a.batch, &opts)?;

    let out_path = a.out.clone().unwrap_or_else(|| PathBuf::from("predictions.jsonl"));
    let mut scores = Vec::with_capacity(questions.len());
    let mut lines = String::new();
    for (q, ans) in questions.iter().zip(&answers) {
        let s = score_item(metric, &ans.text, &q.answers, q.choices.as_deref()).with_context(|| format!("{}:{}", a.data.display(), q.line))?;
        let mut rec = json!({
            "id": q.id,
            "image": q.image,
            "question": q.question,
            "prediction": ans.text,
            "answer": if q.answers.len() == 1 { json!(q.answers[0]) } else { json!(q.answers) },
            "score": s.value(),
        });
        if metric != Metric::Exact {
            rec["parsed"] = json!(s);
        }
        if let Some(c) = &q.choices {
            rec["choices"] = json!(c);
        }
        lines.push_str(&rec.to_string());
        lines.push('\n');
        scores.push(s);
    }
    write_atomically(&out_path, lines.as_bytes())?;
    let summary = Summary::of(metric, &scores);
    eprintln!("wrote {} predictions to {}; {} [{}]", answers.len(), out_path.display(), stats.summary(), be.name());
    let mut stdout = std::io::stdout().lock();
    if a.json {
        writeln!(stdout, "{}", serde_json::to_string(&summary)?)?;
    } else {
        writeln!(stdout, "{summary}")?;
    }
    Ok(())
}

/// Writes a file through a temporary sibling and a rename, so a reader never sees half of it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
