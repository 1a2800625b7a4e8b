//! `kd-engine compare`: several MLLM folders answer the same questions about the same images;
//! the answers go side by side into one self-contained HTML page (paper Figure A1 for any set of
//! models). Models are loaded one at a time, so only one is in memory.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use super::eval::{answer_all, check_images, write_atomically, MetricArg};
use super::Device;
use crate::backend::Backend;
use crate::eval::answer::MllmRunner;
use crate::eval::generate::GenerateOptions;
use crate::eval::metrics::{score_item, Metric, Summary};
use crate::eval::questions::{question_prompt, read_questions, Question};
use crate::eval::report::{image_data_uri, Report, ReportItem};
use crate::eval::sampling::Sampling;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// MLLM folders, comma-separated (two or more).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub models: Vec<PathBuf>,
    /// Column titles, comma-separated, one per model (default: the folder names).
    #[arg(long, value_delimiter = ',')]
    pub names: Option<Vec<String>>,
    /// JSONL: {"id", "image", "question", "answer"?, "choices"?}.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub image_folder: PathBuf,
    /// The HTML page to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Also score each answer (needs reference answers) and colour it right or wrong.
    #[arg(long, value_enum)]
    pub metric: Option<MetricArg>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Instruction appended to each question on a new line (default: none).
    #[arg(long, default_value = "")]
    pub prompt_suffix: String,
    /// Chat template for every model (default: each model's family default).
    #[arg(long)]
    pub template: Option<String>,
    /// Page title.
    #[arg(long, default_value = "kd-engine: answers side by side")]
    pub title: String,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
}

pub fn run(a: CompareArgs) -> Result<()> {
    ensure!(!a.models.is_empty(), "--models: give at least one MLLM folder (two or more to compare)");
    let metric: Option<Metric> = a.metric.map(Into::into);
    let questions = read_questions(&a.data, metric)?;
    check_images(&questions, &a.data, &a.image_folder)?;
    let names: Vec<String> = match &a.names {
        Some(n) => {
            ensure!(n.len() == a.models.len(), "--names has {} names for {} models", n.len(), a.models.len());
            n.clone()
        }
        None => a.models.iter().map(|m| m.file_name().map_or_else(|| m.display().to_string(), |f| f.to_string_lossy().into_owned())).collect(),
    };
    let mut items: Vec<ReportItem> = questions
        .iter()
        .map(|q| {
            Ok(ReportItem {
                id: q.id.clone(),
                image: q.image_path(&a.image_folder).map(|p| image_data_uri(&p)).transpose().with_context(|| format!("{}:{}", a.data.display(), q.line))?,
                question: q.question.clone(),
                references: q.answers.clone(),
                answers: Vec::with_capacity(a.models.len()),
            })
        })
        .collect::<Result<_>>()?;
    let scores = crate::with_backend!(a.device, be => answer_models(&be, &a, metric, &questions, &names, &mut items))?;
    // The question as the models saw it (choices listed) when the set has choices.
    for (q, item) in questions.iter().zip(&mut items) {
        if q.choices.is_some() {
            item.question = question_prompt(q, "");
        }
    }
    let report = Report { title: a.title.clone(), models: names, scores: metric.map(|m| (m.name().to_string(), scores)), items };
    write_atomically(&a.out, report.to_html().as_bytes())?;
    eprintln!("wrote {} ({} questions, {} models)", a.out.display(), questions.len(), a.models.len());
    Ok(())
}

/// Each model in turn answers every question; its answers (and credits) join the rows. Returns
/// each model's overall score when a metric is given.
fn answer_models<B: Backend>(be: &B, a: &CompareArgs, metric: Option<Metric>, questions: &[Question], names: &[String], items: &mut [ReportItem]) -> Result<Vec<f64>> {
    let mut scores = Vec::new();
    for (dir, name) in a.models.iter().zip(names) {
        let runner = MllmRunner::load(be, dir, a.template.as_deref(), None)?;
        let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, eos: runner.eos.clone(), sampling: Sampling::Greedy };
        let (answers, stats) = answer_all(be, &runner, questions, &a.image_folder, &a.prompt_suffix, a.batch, &opts)?;
        eprintln!("{name}: {}", stats.summary());
        let mut item_scores = Vec::new();
        for ((q, ans), item) in questions.iter().zip(answers).zip(items.iter_mut()) {
            let credit = match metric {
                Some(m) => {
                    let s = score_item(m, &ans.text, &q.answers, q.choices.as_deref()).with_context(|| format!("{}:{}", a.data.display(), q.line))?;
                    let v = s.value();
                    item_scores.push(s);
                    Some(v)
                }
                None => None,
            };
            item.answers.push((ans.text, credit));
        }
        if let Some(m) = metric {
            let summary = Summary::of(m, &item_scores);
            eprintln!("{name}: {summary}");
            scores.push(summary.accuracy);
        }
    }
    Ok(scores)
}
