//! Question sets for `eval` and `compare`: JSONL, one question per line,
//! `{"id", "image"?, "question", "answer"?: "…" | ["…", …], "choices"?: ["…", …]}`.
//!
//! Every problem is reported with `file:line`, so a bad line in a 100k-line benchmark file is
//! found at once; blank lines are skipped. `id` may be a string or a number (benchmarks use both).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::metrics::{check_references, format_choices, Metric};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// 1-based line in its file.
    pub line: usize,
    pub id: String,
    /// Path relative to the image folder, if the question has an image.
    pub image: Option<String>,
    pub question: String,
    /// Reference answers (empty when the file gives none).
    pub answers: Vec<String>,
    pub choices: Option<Vec<String>>,
}

impl Question {
    /// The image file under `folder`.
    pub fn image_path(&self, folder: &Path) -> Option<PathBuf> {
        self.image.as_ref().map(|i| folder.join(i))
    }
}

/// LLaVA's instruction after a short-answer question (its VQAv2, GQA and POPE question files).
pub const SHORT_ANSWER_SUFFIX: &str = "Answer the question using a single word or phrase.";
/// LLaVA's instruction after a multiple-choice question (MMBench, ScienceQA).
pub const CHOICE_SUFFIX: &str = "Answer with the option's letter from the given choices directly.";

/// The instruction `kd-engine eval` appends for a metric by default.
pub fn default_suffix(metric: Metric) -> &'static str {
    match metric {
        Metric::Exact | Metric::YesNo => SHORT_ANSWER_SUFFIX,
        Metric::Choice => CHOICE_SUFFIX,
    }
}

/// The text a model is asked: the question, its choices listed `A. …` on their own lines (when
/// it has any), and the instruction `suffix` on a new line (unless empty, or already there).
pub fn question_prompt(q: &Question, suffix: &str) -> String {
    let mut text = q.question.trim_end().to_string();
    if let Some(choices) = &q.choices {
        text.push('\n');
        text.push_str(&format_choices(choices));
    }
    let suffix = suffix.trim();
    if !suffix.is_empty() && !text.ends_with(suffix) {
        text.push('\n');
        text.push_str(suffix);
    }
    text
}

fn string_list(v: &Value, key: &str) -> Result<Vec<String>> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|x| x.as_str().map(str::to_string).with_context(|| format!("\"{key}\" must hold strings, found {x}")))
            .collect(),
        other => bail!("\"{key}\" must be a string or a list of strings, found {other}"),
    }
}

fn parse_line(text: &str) -> Result<Question> {
    let v: Value = serde_json::from_str(text).context("not valid JSON")?;
    let obj = v.as_object().with_context(|| format!("a line must be a JSON object, found {v}"))?;
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => bail!("\"id\" must be a string or a number, found {other}"),
        None => bail!("no \"id\""),
    };
    let question = match obj.get("question") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => bail!("\"question\" is empty"),
        Some(other) => bail!("\"question\" must be a string, found {other}"),
        None => bail!("no \"question\""),
    };
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => bail!("\"image\" must be a path relative to --image-folder, found {other}"),
    };
    let answers = match obj.get("answer") {
        None | Some(Value::Null) => Vec::new(),
        Some(a) => string_list(a, "answer")?,
    };
    let choices = match obj.get("choices") {
        None | Some(Value::Null) => None,
        Some(Value::Array(_)) => Some(string_list(&obj["choices"], "choices")?),
        Some(other) => bail!("\"choices\" must be a list of strings, found {other}"),
    };
    Ok(Question { line: 0, id, image, question, answers, choices })
}

/// Reads a question file. With a metric, every line's references are checked against it.
pub fn read_questions(path: &Path, metric: Option<Metric>) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the question file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let mut q = parse_line(line).with_context(at)?;
        q.line = i + 1;
        if let Some(m) = metric {
            check_references(m, &q.answers, q.choices.as_deref()).with_context(|| format!("{} (question {:?})", at(), q.id))?;
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{}: no questions (the file is empty)", path.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_errors() {
        let q = parse_line(r#"{"id": 3, "image": "a.png", "question": "What?", "answer": ["x", "y"]}"#).unwrap();
        assert_eq!((q.id.as_str(), q.image.as_deref(), q.answers.len()), ("3", Some("a.png"), 2));
        let q = parse_line(r#"{"id": "q", "question": "What?", "answer": "x", "choices": ["a", "b"]}"#).unwrap();
        assert_eq!(q.choices.unwrap(), vec!["a".to_string(), "b".to_string()]);
        for (bad, want) in [
            (r#"{"id": 1}"#, "no \"question\""),
            (r#"{"question": "q"}"#, "no \"id\""),
            (r#"{"id": 1, "question": "q", "answer": 5}"#, "\"answer\""),
            (r#"{"id": 1, "question": "q", "choices": "a"}"#, "\"choices\""),
            (r#"[1]"#, "JSON object"),
            (r#"{"id": 1, "#, "not valid JSON"),
        ] {
            let e = format!("{:#}", parse_line(bad).unwrap_err());
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
