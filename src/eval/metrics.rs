//! Benchmark-style scores of generated answers.
//!
//! * `exact`: VQAv2-style short-answer accuracy. Prediction and references are normalised as the
//!   official VQA evaluation does (`vqaEval.py`: punctuation, periods, number words → digits,
//!   articles, contractions; see [`vqa_normalise`]), always on both sides (as the EvalAI answer
//!   processor that LLaVA's local evaluators use does). With `k` references of which `m` equal the
//!   prediction, the score is `min(1, m / min(3, k))`: VQAv2's `min(1, m/3)` for its 10 answers,
//!   plain exact match for a single answer (GQA-style). The official script further averages
//!   that over the 10 leave-one-out subsets of its answers; that refinement is not applied.
//! * `yesno`: POPE's accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive
//!   class. An answer is "yes"/"no" by its first word; when the first word is neither, POPE's own
//!   rule decides (its first sentence containing "no"/"not" means no, anything else yes).
//! * `choice`: multiple-choice letter accuracy (ScienceQA/MMBench style). The prediction's letter
//!   is the choice whose text it states, else the letter it starts with ("B", "(B)", "B.", "b) …"),
//!   else the first capital letter of a valid choice standing alone in it, else a choice text it
//!   contains; anything else is wrong.

use anyhow::{bail, ensure, Result};
use serde::Serialize;

/// Which score `kd-engine eval` computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Exact,
    YesNo,
    Choice,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Exact => "exact",
            Metric::YesNo => "yesno",
            Metric::Choice => "choice",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// VQA normalisation (the tables and rules of the official VQA evaluation, vqaEval.py).

const PUNCTUATION: [char; 21] = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];
const ARTICLES: [&str; 3] = ["a", "an", "the"];
const NUMBERS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];
/// The official table, verbatim (its capitalised keys can never match: words are lower-cased first).
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"), ("arent", "aren't"), ("cant", "can't"), ("couldve", "could've"), ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"), ("couldnt've", "couldn't've"), ("didnt", "didn't"), ("doesnt", "doesn't"),
    ("dont", "don't"), ("hadnt", "hadn't"), ("hadnt've", "hadn't've"), ("hadn'tve", "hadn't've"), ("hasnt", "hasn't"),
    ("havent", "haven't"), ("hed", "he'd"), ("hed've", "he'd've"), ("he'dve", "he'd've"), ("hes", "he's"),
    ("howd", "how'd"), ("howll", "how'll"), ("hows", "how's"), ("Id've", "I'd've"), ("I'dve", "I'd've"), ("Im", "I'm"),
    ("Ive", "I've"), ("isnt", "isn't"), ("itd", "it'd"), ("itd've", "it'd've"), ("it'dve", "it'd've"), ("itll", "it'll"),
    ("let's", "let's"), ("maam", "ma'am"), ("mightnt", "mightn't"), ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"), ("mightve", "might've"), ("mustnt", "mustn't"), ("mustve", "must've"),
    ("neednt", "needn't"), ("notve", "not've"), ("oclock", "o'clock"), ("oughtnt", "oughtn't"), ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"), ("'ow'sat", "'ow's'at"), ("shant", "shan't"), ("shed've", "she'd've"),
    ("she'dve", "she'd've"), ("she's", "she's"), ("shouldve", "should've"), ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"), ("shouldn'tve", "shouldn't've"), ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"), ("somebody'dve", "somebody'd've"), ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"), ("someoned", "someone'd"), ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"), ("someonell", "someone'll"), ("someones", "someone's"),
    ("somethingd", "something'd"), ("somethingd've", "something'd've"), ("something'dve", "something'd've"),
    ("somethingll", "something'll"), ("thats", "that's"), ("thered", "there'd"), ("thered've", "there'd've"),
    ("there'dve", "there'd've"), ("therere", "there're"), ("theres", "there's"), ("theyd", "they'd"),
    ("theyd've", "they'd've"), ("they'dve", "they'd've"), ("theyll", "they'll"), ("theyre", "they're"),
    ("theyve", "they've"), ("twas", "'twas"), ("wasnt", "wasn't"), ("wed've", "we'd've"), ("we'dve", "we'd've"),
    ("weve", "we've"), ("werent", "weren't"), ("whatll", "what'll"), ("whatre", "what're"), ("whats", "what's"),
    ("whatve", "what've"), ("whens", "when's"), ("whered", "where'd"), ("wheres", "where's"), ("whereve", "where've"),
    ("whod", "who'd"), ("whod've", "who'd've"), ("who'dve", "who'd've"), ("wholl", "who'll"), ("whos", "who's"),
    ("whove", "who've"), ("whyll", "why'll"), ("whyre", "why're"), ("whys", "why's"), ("wont", "won't"),
    ("wouldve", "would've"), ("wouldnt", "wouldn't"), ("wouldnt've", "wouldn't've"), ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"), ("yall'll", "y'all'll"), ("y'allll", "y'all'll"), ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"), ("y'all'dve", "y'all'd've"), ("youd", "you'd"), ("youd've", "you'd've"),
    ("you'dve", "you'd've"), ("youll", "you'll"), ("youre", "you're"), ("youve", "you've"),
];

/// `processPunctuation`: each punctuation mark is deleted when it touches a space somewhere in the
/// text (or the text has a digit-comma-digit), else replaced by a space; then every period not
/// followed by a digit is deleted (the official `(?!<=\d)(\.)(?!\d)`, whose look-behind is
/// mistyped as a look-ahead, so a period after a digit goes too).
fn process_punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let comma_strip = chars.windows(3).any(|w| w[0].is_numeric() && w[1] == ',' && w[2].is_numeric());
    let mut out = text.to_string();
    for p in PUNCTUATION {
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if touches_space || comma_strip { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(|n| n.is_numeric()))
        .map(|(_, &c)| c)
        .collect()
}

/// `processDigitArticle`: lower-case, number words → digits, articles dropped, contractions
/// restored, words joined by single spaces.
fn process_digit_article(text: &str) -> String {
    let words: Vec<String> = text
        .to_lowercase()
        .split_whitespace()
        .map(|w| NUMBERS.iter().find(|(k, _)| *k == w).map_or(w, |(_, d)| d).to_string())
        .filter(|w| !ARTICLES.contains(&w.as_str()))
        .map(|w| CONTRACTIONS.iter().find(|(k, _)| *k == w).map_or(w.clone(), |(_, c)| c.to_string()))
        .collect();
    words.join(" ")
}

/// The official VQA normal form of an answer.
pub fn vqa_normalise(answer: &str) -> String {
    let t = answer.replace(['\n', '\t'], " ");
    process_digit_article(&process_punctuation(t.trim()))
}

/// VQA accuracy of `prediction` against `references`: `min(1, m / min(3, k))` (see the module
/// documentation). An empty normalised prediction scores 0.
pub fn vqa_score(prediction: &str, references: &[String]) -> f64 {
    let p = vqa_normalise(prediction);
    if p.is_empty() || references.is_empty() {
        return 0.0;
    }
    let m = references.iter().filter(|r| vqa_normalise(r) == p).count();
    (m as f64 / references.len().min(3) as f64).min(1.0)
}

// ---------------------------------------------------------------------------------------------
// Yes / no.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum YesNo {
    Yes,
    No,
}

/// The first word, lower-cased, without surrounding punctuation.
fn first_word(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase()
}

/// A generated answer as yes or no: by its first word, else POPE's rule (see the module docs).
pub fn parse_yes_no(answer: &str) -> YesNo {
    match first_word(answer).as_str() {
        "yes" => return YesNo::Yes,
        "no" => return YesNo::No,
        _ => {}
    }
    let first_sentence = answer.split('.').next().unwrap_or("").replace(',', "");
    if first_sentence.split(' ').any(|w| w == "No" || w == "no" || w == "not") {
        YesNo::No
    } else {
        YesNo::Yes
    }
}

/// A reference answer as yes or no by its first word; anything else is a data error.
pub fn reference_yes_no(answer: &str) -> Result<YesNo> {
    match first_word(answer).as_str() {
        "yes" => Ok(YesNo::Yes),
        "no" => Ok(YesNo::No),
        _ => bail!("the reference answer {answer:?} is not yes or no"),
    }
}

/// POPE's confusion counts (positive = yes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct YesNoCounts {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

impl YesNoCounts {
    pub fn add(&mut self, predicted: YesNo, reference: YesNo) {
        match (predicted, reference) {
            (YesNo::Yes, YesNo::Yes) => self.tp += 1,
            (YesNo::Yes, YesNo::No) => self.fp += 1,
            (YesNo::No, YesNo::No) => self.tn += 1,
            (YesNo::No, YesNo::Yes) => self.fn_ += 1,
        }
    }
    pub fn total(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }
    /// Accuracy, precision, recall, F1 and yes-ratio; a ratio with a zero denominator is 0.
    pub fn scores(&self) -> YesNoScores {
        let div = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = div(self.tp, self.tp + self.fp);
        let recall = div(self.tp, self.tp + self.fn_);
        let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
        YesNoScores {
            accuracy: div(self.tp + self.tn, self.total()),
            precision,
            recall,
            f1,
            yes_ratio: div(self.tp + self.fp, self.total()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct YesNoScores {
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub yes_ratio: f64,
}

// ---------------------------------------------------------------------------------------------
// Multiple choice.

/// The letter of choice `i` (A, B, …).
pub fn choice_letter(i: usize) -> char {
    (b'A' + (i % 26) as u8) as char
}

/// The choices as the prompt lists them: `A. first\nB. second…`.
pub fn format_choices(choices: &[String]) -> String {
    choices.iter().enumerate().map(|(i, c)| format!("{}. {c}", choice_letter(i))).collect::<Vec<_>>().join("\n")
}

/// The choice a leading letter names: `B`, `(B)`, `B.`, `b) …`, `B: …` (the letter must be
/// followed by the end or a non-alphanumeric character, and be a valid choice).
fn leading_letter(text: &str, n: usize) -> Option<usize> {
    let t = text.trim_start().strip_prefix('(').unwrap_or(text.trim_start());
    let mut chars = t.chars();
    let c = chars.next()?;
    let next_ok = chars.next().map_or(true, |d| !d.is_alphanumeric());
    let i = (c.to_ascii_uppercase() as u32).checked_sub('A' as u32)? as usize;
    (c.is_ascii_alphabetic() && next_ok && i < n).then_some(i)
}

/// The first capital letter of a valid choice standing alone ("The answer is B.").
fn standalone_capital(text: &str, n: usize) -> Option<usize> {
    let chars: Vec<char> = text.chars().collect();
    (0..chars.len()).find_map(|i| {
        let c = chars[i];
        let alone = (i == 0 || !chars[i - 1].is_alphanumeric()) && chars.get(i + 1).map_or(true, |d| !d.is_alphanumeric());
        let idx = (c as u32).wrapping_sub('A' as u32) as usize;
        (c.is_ascii_uppercase() && alone && idx < n).then_some(idx)
    })
}

/// The choice whose (VQA-normalised) text equals the answer's, when exactly one does.
fn text_match(text: &str, choices: &[String]) -> Option<usize> {
    let t = vqa_normalise(text);
    let hits: Vec<usize> = (0..choices.len()).filter(|&i| !t.is_empty() && vqa_normalise(&choices[i]) == t).collect();
    (hits.len() == 1).then(|| hits[0])
}

/// The choice whose normalised text appears (as whole words) in the answer, when exactly one does.
fn text_contained(text: &str, choices: &[String]) -> Option<usize> {
    let t = format!(" {} ", vqa_normalise(text));
    let hits: Vec<usize> = (0..choices.len())
        .filter(|&i| {
            let c = vqa_normalise(&choices[i]);
            !c.is_empty() && t.contains(&format!(" {c} "))
        })
        .collect();
    (hits.len() == 1).then(|| hits[0])
}

/// The choice a generated answer picks, if any (rules in the module documentation).
pub fn parse_choice(answer: &str, choices: &[String]) -> Option<usize> {
    let n = choices.len().min(26);
    text_match(answer, choices)
        .or_else(|| leading_letter(answer, n))
        .or_else(|| standalone_capital(answer, n))
        .or_else(|| text_contained(answer, choices))
}

/// The choice a reference answer names: a letter (`B`, `(B)`, `B.`) or a choice's text.
pub fn reference_choice(answer: &str, choices: &[String]) -> Result<usize> {
    let n = choices.len().min(26);
    let t = answer.trim().trim_end_matches('.');
    let t = t.strip_prefix('(').and_then(|x| x.strip_suffix(')')).unwrap_or(t);
    if t.chars().count() == 1 {
        if let Some(i) = leading_letter(t, n) {
            return Ok(i);
        }
    }
    text_match(answer, choices).ok_or_else(|| {
        anyhow::anyhow!(
            "the reference answer {answer:?} is neither a choice letter (A–{}) nor one of the choices' texts",
            choice_letter(n.saturating_sub(1))
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Scoring a question set.

/// One question's outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ItemScore {
    Exact { score: f64 },
    YesNo { predicted: YesNo, reference: YesNo },
    Choice { predicted: Option<char>, reference: char },
}

impl ItemScore {
    /// The item's credit in [0, 1].
    pub fn value(&self) -> f64 {
        match self {
            ItemScore::Exact { score } => *score,
            ItemScore::YesNo { predicted, reference } => (predicted == reference) as u8 as f64,
            ItemScore::Choice { predicted, reference } => (*predicted == Some(*reference)) as u8 as f64,
        }
    }
}

/// Checks that a question's references suit the metric (before any model runs).
pub fn check_references(metric: Metric, answers: &[String], choices: Option<&[String]>) -> Result<()> {
    ensure!(!answers.is_empty(), "no reference answer");
    ensure!(answers.iter().all(|a| !a.trim().is_empty()), "an empty reference answer");
    match metric {
        Metric::Exact => Ok(()),
        Metric::YesNo => {
            ensure!(answers.len() == 1, "the yesno metric takes one reference answer, found {}", answers.len());
            reference_yes_no(&answers[0]).map(|_| ())
        }
        Metric::Choice => {
            let choices = choices.ok_or_else(|| anyhow::anyhow!("the choice metric needs \"choices\""))?;
            ensure!((2..=26).contains(&choices.len()), "{} choices: between 2 and 26 are supported", choices.len());
            ensure!(answers.len() == 1, "the choice metric takes one reference answer, found {}", answers.len());
            reference_choice(&answers[0], choices).map(|_| ())
        }
    }
}

/// Scores one prediction (its references already checked by [`check_references`]).
pub fn score_item(metric: Metric, prediction: &str, answers: &[String], choices: Option<&[String]>) -> Result<ItemScore> {
    Ok(match metric {
        Metric::Exact => ItemScore::Exact { score: vqa_score(prediction, answers) },
        Metric::YesNo => ItemScore::YesNo {
            predicted: parse_yes_no(prediction),
            reference: reference_yes_no(answers.first().map_or("", String::as_str))?,
        },
        Metric::Choice => {
            let choices = choices.ok_or_else(|| anyhow::anyhow!("the choice metric needs \"choices\""))?;
            ItemScore::Choice {
                predicted: parse_choice(prediction, choices).map(choice_letter),
                reference: choice_letter(reference_choice(answers.first().map_or("", String::as_str), choices)?),
            }
        }
    })
}

/// The score of a question set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub metric: &'static str,
    pub questions: usize,
    /// Mean credit: VQA accuracy, yes/no accuracy or letter accuracy.
    pub accuracy: f64,
    /// POPE's numbers, for `yesno`.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub yes_no: Option<YesNoScores>,
}

impl Summary {
    pub fn of(metric: Metric, items: &[ItemScore]) -> Self {
        let n = items.len();
        let accuracy = if n == 0 { 0.0 } else { items.iter().map(ItemScore::value).sum::<f64>() / n as f64 };
        let yes_no = (metric == Metric::YesNo).then(|| {
            let mut c = YesNoCounts::default();
            for it in items {
                if let ItemScore::YesNo { predicted, reference } = it {
                    c.add(*predicted, *reference);
                }
            }
            c.scores()
        });
        Summary { metric: metric.name(), questions: n, accuracy: yes_no.map_or(accuracy, |s| s.accuracy), yes_no }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.yes_no {
            None => write!(f, "{}: accuracy {:.2} % over {} questions", self.metric, 100.0 * self.accuracy, self.questions),
            Some(s) => write!(
                f,
                "yesno over {} questions: accuracy {:.2} %, precision {:.2} %, recall {:.2} %, F1 {:.2} %, yes-ratio {:.2} %",
                self.questions,
                100.0 * s.accuracy,
                100.0 * s.precision,
                100.0 * s.recall,
                100.0 * s.f1,
                100.0 * s.yes_ratio
            ),
        }
    }
}
