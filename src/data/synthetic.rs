//! Procedural multimodal data for the miniature LLaVA-KD study (`kd-engine train` without
//! arguments).
//!
//! Everything is generated from a seed and written to disk in the real formats, so the study runs
//! through the real pipeline (PNG decoding, the image processor, the `pretrain` and `phi`
//! templates, the LLaVA dataset reader):
//!
//! * **Images**: small RGB PNGs (default 24×24) on a lightly noisy grey background with 1–3
//!   shapes (circle, square, triangle) in distinct colours (red, green, blue, yellow) at distinct
//!   positions (left, right, top, bottom, center). Within one image every shape, colour and
//!   position occurs at most once, so every question below has exactly one answer.
//! * **Captions** (PT/DPT, `pretrain.json`): `a red circle on the left, a blue square at the top
//!   and a green triangle in the center`, objects in reading order (top, left, center, right,
//!   bottom), so a caption is a function of the image.
//! * **Questions** (SFT/DFT, `sft.json`; held-out `eval.jsonl`), one-word answers so that exact
//!   match ([`answer_matches`]) is meaningful: colour (`What color is the circle?` → `red`), shape
//!   (`What shape is the red object?` → `circle`), count (`How many shapes are there?` → `two`),
//!   position (`Where is the triangle?` → `left`), yes/no (`Is there a green square?` →
//!   `yes`/`no`, alternating so the two answers are balanced within each file). A fifth of the
//!   SFT conversations ask `Describe the image.` and are answered with the caption.
//! * **Tokenizer** (`tokenizer.json`): a word-level tokenizer of this closed language (the
//!   generator's words plus every word of the `phi` and `pretrain` templates), made with the
//!   `tokenizers` crate: `WordLevel` model, a `Split` pre-tokenizer that keeps runs of word
//!   characters, single punctuation characters and `\n` (other whitespace is dropped), and the
//!   special tokens `<|endoftext|>`, `<image>` and `<unk>`. Whitespace is not part of any token,
//!   so the phi template's rule "the answer's first token carries its leading space" holds
//!   trivially: the answer's first word starts inside the response span, and the response
//!   positions are exactly the answer word(s) plus `<|endoftext|>` (phi) or the caption words plus
//!   `\n` (pretrain).
//!
//! Every image and every sample draws from its own random stream, derived from (seed, kind,
//! index): the same [`StudySpec`] gives byte-identical files, and train image `i` is the same
//! image whatever the other counts are. Train and eval images come from different streams and
//! are written under different names (`images/train_*.png`, `images/eval_*.png`).

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer,
    SplitDelimiterBehavior, Tokenizer,
};

use super::image::RgbImage;
use super::rng::SplitMix64;
use super::template::{Template, IMAGE_TAG};

// ---------------------------------------------------------------------------------------------
// The closed world: shapes, colours, positions.

/// A shape kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// A colour, with its nominal RGB value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
}

impl Colour {
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];

    pub fn word(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 45, 45],
            Colour::Green => [45, 165, 65],
            Colour::Blue => [45, 85, 215],
            Colour::Yellow => [230, 200, 40],
        }
    }
}

/// One of five slots in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Center,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
        Position::Center,
    ];

    /// The one-word answer to "Where is ...?".
    pub fn word(self) -> &'static str {
        match self {
            Position::Left => "left",
            Position::Right => "right",
            Position::Top => "top",
            Position::Bottom => "bottom",
            Position::Center => "center",
        }
    }

    /// The phrase used in captions.
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
            Position::Center => "in the center",
        }
    }

    /// Slot centre as a fraction of the image side, `(x, y)`.
    fn centre(self) -> (f32, f32) {
        match self {
            Position::Left => (1.0 / 6.0, 0.5),
            Position::Right => (5.0 / 6.0, 0.5),
            Position::Top => (0.5, 1.0 / 6.0),
            Position::Bottom => (0.5, 5.0 / 6.0),
            Position::Center => (0.5, 0.5),
        }
    }

    /// Reading order (top, left, center, right, bottom): the order of objects in captions.
    fn reading_rank(self) -> u8 {
        match self {
            Position::Top => 0,
            Position::Left => 1,
            Position::Center => 2,
            Position::Right => 3,
            Position::Bottom => 4,
        }
    }
}

/// The words for 1, 2, 3 (answers to the count question).
pub const COUNT_WORDS: [&str; 3] = ["one", "two", "three"];

/// One shape in a scene, with its exact geometry (fractions of the image side).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub position: Position,
    /// Centre, jittered around the slot centre.
    pub cx: f32,
    pub cy: f32,
    /// Half size (circle radius, square half side, triangle half height).
    pub half: f32,
    /// The colour actually drawn (the nominal colour, slightly jittered).
    pub rgb: [u8; 3],
}

/// What one image shows: 1–3 objects with distinct shapes, colours and positions.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    /// In reading order.
    pub objects: Vec<Object>,
    /// Background grey level per channel (slightly tinted).
    pub background: [u8; 3],
}

/// Half size and jitter (fractions of the side). The five slots are cells of a 3×3 grid, so with
/// `MAX_HALF + MAX_JITTER <= 1/6` every shape stays inside its cell: at the study's 24-pixel
/// images and 8-pixel patches, each object is exactly one visual token.
const MIN_HALF: f32 = 0.12;
const MAX_HALF: f32 = 0.14;
const MAX_JITTER: f32 = 0.02;

/// A uniform float in `[lo, hi)` from 24 random bits (exact and portable).
fn uniform(rng: &mut SplitMix64, lo: f32, hi: f32) -> f32 {
    let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
    lo + (hi - lo) * u
}

/// `k` distinct items of `items`, in random order.
fn pick<T: Copy>(rng: &mut SplitMix64, items: &[T], k: usize) -> Vec<T> {
    let mut v = items.to_vec();
    rng.shuffle(&mut v);
    v.truncate(k);
    v
}

impl Scene {
    /// A random scene: 1–3 objects, each with its own shape, colour and position.
    pub fn random(rng: &mut SplitMix64) -> Self {
        let n = 1 + rng.below(3) as usize;
        let shapes = pick(rng, &Shape::ALL, n);
        let colours = pick(rng, &Colour::ALL, n);
        let positions = pick(rng, &Position::ALL, n);
        let mut objects: Vec<Object> = (0..n)
            .map(|i| {
                let (sx, sy) = positions[i].centre();
                let cx = sx + uniform(rng, -MAX_JITTER, MAX_JITTER);
                let cy = sy + uniform(rng, -MAX_JITTER, MAX_JITTER);
                let half = uniform(rng, MIN_HALF, MAX_HALF);
                let base = colours[i].rgb();
                let rgb = base.map(|c| (c as i32 + rng.below(25) as i32 - 12).clamp(0, 255) as u8);
                Object {
                    shape: shapes[i],
                    colour: colours[i],
                    position: positions[i],
                    cx,
                    cy,
                    half,
                    rgb,
                }
            })
            .collect();
        objects.sort_by_key(|o| o.position.reading_rank());
        let grey = 175 + rng.below(66) as i32; // 175..=240
        let background = [0; 3].map(|_: u8| (grey + rng.below(13) as i32 - 6).clamp(0, 255) as u8);
        Self {
            objects,
            background,
        }
    }

    pub fn count(&self) -> usize {
        self.objects.len()
    }

    pub fn find_shape(&self, shape: Shape) -> Option<&Object> {
        self.objects.iter().find(|o| o.shape == shape)
    }

    pub fn find_colour(&self, colour: Colour) -> Option<&Object> {
        self.objects.iter().find(|o| o.colour == colour)
    }

    pub fn has(&self, colour: Colour, shape: Shape) -> bool {
        self.objects
            .iter()
            .any(|o| o.colour == colour && o.shape == shape)
    }

    /// The caption: `a red circle on the left, a blue square at the top and a green triangle in
    /// the center` (objects in reading order).
    pub fn caption(&self) -> String {
        let parts: Vec<String> = self
            .objects
            .iter()
            .map(|o| {
                format!(
                    "a {} {} {}",
                    o.colour.word(),
                    o.shape.word(),
                    o.position.phrase()
                )
            })
            .collect();
        join_list(&parts)
    }

    /// Draws the scene: background, shapes (2×2 supersampled edges), then per-pixel noise of
    /// ±`noise` levels on every channel.
    pub fn render(&self, size: u32, noise: u8, rng: &mut SplitMix64) -> RgbImage {
        let s = size as f32;
        let n = size as usize;
        let mut data = Vec::with_capacity(3 * n * n);
        const SUB: [f32; 2] = [0.25, 0.75];
        for y in 0..n {
            for x in 0..n {
                let mut acc = [0u32; 3];
                for sy in SUB {
                    for sx in SUB {
                        let px = (x as f32 + sx) / s;
                        let py = (y as f32 + sy) / s;
                        let c = self
                            .objects
                            .iter()
                            .find(|o| o.contains(px, py))
                            .map_or(self.background, |o| o.rgb);
                        for k in 0..3 {
                            acc[k] += c[k] as u32;
                        }
                    }
                }
                for a in acc {
                    let v = ((a + 2) / 4) as i32;
                    let jitter = if noise == 0 {
                        0
                    } else {
                        rng.below(2 * noise as u64 + 1) as i32 - noise as i32
                    };
                    data.push((v + jitter).clamp(0, 255) as u8);
                }
            }
        }
        RgbImage::new(size, size, data).expect("size matches")
    }
}

impl Object {
    /// Whether the point `(px, py)` (fractions of the side) is inside the shape.
    fn contains(&self, px: f32, py: f32) -> bool {
        let dx = px - self.cx;
        let dy = py - self.cy;
        let h = self.half;
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= h * h,
            Shape::Square => dx.abs() <= 0.85 * h && dy.abs() <= 0.85 * h,
            // Apex up, base at the bottom; half width at the base equals the half height.
            Shape::Triangle => dy >= -h && dy <= h && dx.abs() <= (dy + h) * 0.5,
        }
    }
}

/// `x`, `x and y`, `x, y and z`.
fn join_list(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

// ---------------------------------------------------------------------------------------------
// Questions.

/// The five kinds of question.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuestionKind {
    Colour,
    Shape,
    Count,
    Position,
    YesNo,
}

impl QuestionKind {
    pub const ALL: [QuestionKind; 5] = [
        QuestionKind::Colour,
        QuestionKind::Shape,
        QuestionKind::Count,
        QuestionKind::Position,
        QuestionKind::YesNo,
    ];

    /// Short name, as used in eval ids (`eval-00012-color`) and reports.
    pub fn name(self) -> &'static str {
        match self {
            QuestionKind::Colour => "color",
            QuestionKind::Shape => "shape",
            QuestionKind::Count => "count",
            QuestionKind::Position => "position",
            QuestionKind::YesNo => "yesno",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A question about a scene with its one-word answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qa {
    pub kind: QuestionKind,
    pub question: String,
    pub answer: String,
}

/// Asks a question of `kind` about `scene`. For yes/no, `yes` chooses the answer (the caller
/// balances them); other kinds ignore it.
pub fn ask(scene: &Scene, kind: QuestionKind, yes: bool, rng: &mut SplitMix64) -> Qa {
    let any = |rng: &mut SplitMix64| scene.objects[rng.below(scene.count() as u64) as usize];
    let (question, answer) = match kind {
        QuestionKind::Colour => {
            let o = any(rng);
            (
                format!("What color is the {}?", o.shape.word()),
                o.colour.word().to_string(),
            )
        }
        QuestionKind::Shape => {
            let o = any(rng);
            (
                format!("What shape is the {} object?", o.colour.word()),
                o.shape.word().to_string(),
            )
        }
        QuestionKind::Count => (
            "How many shapes are there?".to_string(),
            COUNT_WORDS[scene.count() - 1].to_string(),
        ),
        QuestionKind::Position => {
            let o = any(rng);
            (
                format!("Where is the {}?", o.shape.word()),
                o.position.word().to_string(),
            )
        }
        QuestionKind::YesNo => {
            let (colour, shape) = if yes {
                let o = any(rng);
                (o.colour, o.shape)
            } else {
                let absent: Vec<(Colour, Shape)> = Colour::ALL
                    .iter()
                    .flat_map(|&c| Shape::ALL.iter().map(move |&s| (c, s)))
                    .filter(|&(c, s)| !scene.has(c, s))
                    .collect();
                absent[rng.below(absent.len() as u64) as usize]
            };
            (
                format!("Is there a {} {}?", colour.word(), shape.word()),
                if yes { "yes" } else { "no" }.to_string(),
            )
        }
    };
    Qa {
        kind,
        question,
        answer,
    }
}

/// The instruction of the SFT conversations that ask for the caption.
pub const DESCRIBE: &str = "Describe the image.";

/// Every question and answer text the generator can produce (for the vocabulary).
fn all_qa_texts() -> Vec<String> {
    let mut v = vec!["How many shapes are there?".to_string()];
    for s in Shape::ALL {
        v.push(format!("What color is the {}?", s.word()));
        v.push(format!("Where is the {}?", s.word()));
        v.push(s.word().into());
    }
    for c in Colour::ALL {
        v.push(format!("What shape is the {} object?", c.word()));
        v.push(c.word().into());
        for s in Shape::ALL {
            v.push(format!("Is there a {} {}?", c.word(), s.word()));
        }
    }
    for p in Position::ALL {
        v.push(p.word().into());
        v.push(format!("a red circle {}", p.phrase()));
    }
    v.extend(COUNT_WORDS.iter().map(|w| w.to_string()));
    v.push(DESCRIBE.to_string());
    v.extend([
        "yes".into(),
        "no".into(),
        join_list(&["a".into(), "a".into(), "a".into()]),
    ]);
    v
}

/// Normalised exact match for the study's evaluation: both sides are cut at the first
/// `<|endoftext|>` (or `</s>`), lower-cased, whitespace-collapsed, and stripped of surrounding
/// whitespace and trailing punctuation; an empty answer never matches.
pub fn answer_matches(predicted: &str, reference: &str) -> bool {
    let p = normalise_answer(predicted);
    !p.is_empty() && p == normalise_answer(reference)
}

/// The normal form [`answer_matches`] compares.
pub fn normalise_answer(text: &str) -> String {
    let mut t = text;
    for stop in ["<|endoftext|>", "</s>"] {
        if let Some(at) = t.find(stop) {
            t = &t[..at];
        }
    }
    let t = t.to_lowercase();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    t.trim_end_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
        .trim_start()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// The tokenizer.

/// The special tokens, with ids 0, 1, 2.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const UNK: &str = "<unk>";
pub const SPECIAL_TOKENS: [&str; 3] = [ENDOFTEXT, IMAGE_TAG, UNK];

/// The pre-tokenizer's words: runs of word characters, single punctuation characters, `\n`.
const WORD_PATTERN: &str = r"\w+|[^\w\s]|\n";

fn pre_tokenizer() -> Result<Split> {
    Split::new(
        SplitPattern::Regex(WORD_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| anyhow!("cannot build the pre-tokenizer: {e}"))
}

/// The words of `text` as the study tokenizer's pre-tokenizer splits it.
pub fn split_words(text: &str) -> Result<Vec<String>> {
    let mut pts = PreTokenizedString::from(text);
    pre_tokenizer()?
        .pre_tokenize(&mut pts)
        .map_err(|e| anyhow!("pre-tokenizer failed: {e}"))?;
    Ok(pts
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect())
}

/// The tokenizer's vocabulary in id order: the special tokens (`<|endoftext|>` = 0,
/// `<image>` = 1, `<unk>` = 2), then every word of the generator and of the `phi` and `pretrain`
/// templates, sorted.
pub fn vocabulary() -> Result<Vec<String>> {
    let mut texts = all_qa_texts();
    for t in [Template::phi(), Template::pretrain()] {
        texts.extend([
            t.system.clone(),
            t.separator.clone(),
            t.user_format.replace("{content}", " "),
            t.image_format
                .replace("{content}", " ")
                .replace(IMAGE_TAG, " "),
            t.assistant_format.replace("{content}", " "),
        ]);
        if t.end_of_turn != ENDOFTEXT {
            texts.push(t.end_of_turn.clone());
        }
    }
    let mut words = std::collections::BTreeSet::new();
    for t in &texts {
        words.extend(split_words(t)?);
    }
    let mut vocab: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    vocab.extend(
        words
            .into_iter()
            .filter(|w| !SPECIAL_TOKENS.contains(&w.as_str())),
    );
    Ok(vocab)
}

/// Builds the study tokenizer (see the module docs).
pub fn study_tokenizer() -> Result<Tokenizer> {
    let vocab = vocabulary()?;
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::Value::from(i as u64)))
        .collect();
    // Through text: the model's deserialiser borrows its `type` string.
    let model_json = serde_json::json!({
        "type": "WordLevel",
        "vocab": map,
        "unk_token": UNK,
    })
    .to_string();
    let model: WordLevel =
        serde_json::from_str(&model_json).context("cannot build the WordLevel model")?;
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(pre_tokenizer()?));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(*s, true))
        .collect();
    tok.add_special_tokens(&specials);
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        ensure!(
            tok.token_to_id(s) == Some(i as u32),
            "special token {s} did not get id {i}"
        );
    }
    Ok(tok)
}

/// The study tokenizer as `tokenizer.json` text.
pub fn tokenizer_json() -> Result<String> {
    study_tokenizer()?
        .to_string(true)
        .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))
}

// ---------------------------------------------------------------------------------------------
// The study's files.

/// Sizes and seed of the study data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudySpec {
    /// Caption samples in `pretrain.json` (PT/DPT).
    pub pretrain_samples: usize,
    /// Question conversations in `sft.json` (SFT/DFT).
    pub sft_samples: usize,
    /// Questions in `eval.jsonl`.
    pub eval_questions: usize,
    /// Distinct training images; pretrain sample `i` and SFT sample `i` use image
    /// `i % train_images`.
    pub train_images: usize,
    /// Distinct held-out images; eval questions are spread over them, different kinds per image.
    pub eval_images: usize,
    /// Side of the square images, in pixels (16..=1024).
    pub image_size: u32,
    /// Per-pixel noise amplitude in levels (0 = plain background).
    pub noise: u8,
    /// Percentage of SFT conversations with a second question turn.
    pub two_turn_percent: u32,
    /// Percentage of SFT conversations that ask for the caption instead (`Describe the image.`),
    /// as LLaVA's instruction data mixes descriptions with questions. Without them the teacher
    /// forgets how to caption during SFT, and DPT then distils its wrong captions into the
    /// student (measured: teacher‖student KL 10.4 nats per caption token at the start of DPT).
    #[serde(default)]
    pub describe_percent: u32,
    pub seed: u64,
}

impl StudySpec {
    /// The full study (3–4 minutes a seed on 2 cores, measured).
    pub fn full() -> Self {
        Self {
            pretrain_samples: 2000,
            sft_samples: 3000,
            eval_questions: 300,
            train_images: 2000,
            eval_images: 100,
            image_size: 24,
            noise: 8,
            two_turn_percent: 25,
            describe_percent: 20,
            seed: 20240,
        }
    }

    /// The quick study (under 30 s a seed on 2 cores, measured).
    pub fn quick() -> Self {
        Self {
            pretrain_samples: 300,
            sft_samples: 500,
            eval_questions: 100,
            train_images: 300,
            eval_images: 50,
            ..Self::full()
        }
    }

    pub fn validate(&self) -> Result<()> {
        for (name, n) in [
            ("pretrain_samples", self.pretrain_samples),
            ("sft_samples", self.sft_samples),
            ("eval_questions", self.eval_questions),
            ("train_images", self.train_images),
            ("eval_images", self.eval_images),
        ] {
            ensure!(n > 0, "study spec: {name} must be positive");
            ensure!(
                n <= 10_000_000,
                "study spec: {name} = {n} is unreasonably large"
            );
        }
        ensure!(
            (16..=1024).contains(&self.image_size),
            "study spec: image_size must be 16..=1024, got {}",
            self.image_size
        );
        ensure!(
            self.noise <= 64,
            "study spec: noise must be at most 64, got {}",
            self.noise
        );
        ensure!(
            self.describe_percent <= 100,
            "study spec: describe_percent must be at most 100, got {}",
            self.describe_percent
        );
        ensure!(
            self.two_turn_percent <= 100,
            "study spec: two_turn_percent must be at most 100, got {}",
            self.two_turn_percent
        );
        Ok(())
    }
}

/// Where [`write_study_data`] put everything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StudyFiles {
    pub dir: PathBuf,
    /// `dir/images`; the `image` fields of all three data files are relative to `dir`, the
    /// default image root of [`crate::data::Dataset::load`] (pass `dir` as `--image-folder`).
    pub images: PathBuf,
    /// LLaVA JSON list of captions (train with the `pretrain` template).
    pub pretrain: PathBuf,
    /// LLaVA JSON list of 1–2 turn QA conversations (train with the `phi` template).
    pub sft: PathBuf,
    /// JSONL `{"id","image","question","answer"}` on held-out images.
    pub eval: PathBuf,
    pub tokenizer: PathBuf,
    /// `study.json`: the spec the files were made from.
    pub manifest: PathBuf,
}

/// One line of `eval.jsonl`. The id ends in the question kind: `eval-00012-color`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalItem {
    pub id: String,
    pub image: String,
    pub question: String,
    pub answer: String,
}

impl EvalItem {
    /// The question kind, read from the id's suffix.
    pub fn kind(&self) -> Option<QuestionKind> {
        self.id.rsplit('-').next().and_then(QuestionKind::from_name)
    }
}

/// Reads `eval.jsonl` (one [`EvalItem`] per non-empty line).
pub fn read_eval(path: &Path) -> Result<Vec<EvalItem>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read eval file {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: bad eval record", path.display(), i + 1))
        })
        .collect()
}

#[derive(Serialize)]
struct Message<'a> {
    from: &'a str,
    value: &'a str,
}

#[derive(Serialize)]
struct Record<'a> {
    id: String,
    image: &'a str,
    conversations: Vec<Message<'a>>,
}

/// Stream kinds of [`stream`].
const TRAIN_IMAGE: u64 = 1;
const EVAL_IMAGE: u64 = 2;
const SFT_SAMPLE: u64 = 3;
const EVAL_SAMPLE: u64 = 4;

/// An independent random stream for item `index` of `kind`.
fn stream(seed: u64, kind: u64, index: u64) -> SplitMix64 {
    let mix = |x: u64| SplitMix64::new(x).next_u64();
    SplitMix64::new(mix(mix(mix(seed) ^ kind) ^ index))
}

pub fn train_image_name(i: usize) -> String {
    format!("images/train_{i:05}.png")
}

pub fn eval_image_name(i: usize) -> String {
    format!("images/eval_{i:05}.png")
}

/// The scene and image of training (`eval = false`) or held-out image `index`.
pub fn study_image(spec: &StudySpec, eval: bool, index: usize) -> (Scene, RgbImage) {
    let kind = if eval { EVAL_IMAGE } else { TRAIN_IMAGE };
    let mut rng = stream(spec.seed, kind, index as u64);
    let scene = Scene::random(&mut rng);
    let image = scene.render(spec.image_size, spec.noise, &mut rng);
    (scene, image)
}

/// PNG bytes of an RGB image (default compression, adaptive filter: deterministic).
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Default, FilterType::Adaptive)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .context("cannot encode PNG")?;
    Ok(out)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Renders and writes `n` images; returns their scenes.
fn write_images(dir: &Path, spec: &StudySpec, eval: bool, n: usize) -> Result<Vec<Scene>> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let (scene, image) = study_image(spec, eval, i);
            let name = if eval {
                eval_image_name(i)
            } else {
                train_image_name(i)
            };
            write_file(&dir.join(&name), &encode_png(&image)?)?;
            Ok(scene)
        })
        .collect()
}

/// A JSON list with one record per line.
fn json_list(records: &[String]) -> String {
    let mut s = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        s.push_str(r);
        s.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    s.push_str("]\n");
    s
}

/// Writes the study data under `dir` (created if needed; files of the same names are replaced):
/// `images/train_*.png`, `images/eval_*.png`, `pretrain.json`, `sft.json`, `eval.jsonl`,
/// `tokenizer.json` and `study.json`. The same spec gives byte-identical files.
pub fn write_study_data(dir: &Path, spec: &StudySpec) -> Result<StudyFiles> {
    spec.validate()?;
    let images = dir.join("images");
    fs::create_dir_all(&images)
        .with_context(|| format!("cannot create study folder {}", images.display()))?;

    let train_scenes = write_images(dir, spec, false, spec.train_images)?;
    let eval_scenes = write_images(dir, spec, true, spec.eval_images)?;

    // Captions.
    let train_names: Vec<String> = (0..spec.train_images).map(train_image_name).collect();
    let pretrain: Vec<String> = (0..spec.pretrain_samples)
        .map(|i| {
            let img = i % spec.train_images;
            let caption = train_scenes[img].caption();
            serde_json::to_string(&Record {
                id: format!("pt-{i:05}"),
                image: &train_names[img],
                conversations: vec![
                    Message {
                        from: "human",
                        value: IMAGE_TAG,
                    },
                    Message {
                        from: "gpt",
                        value: &caption,
                    },
                ],
            })
            .map_err(Into::into)
        })
        .collect::<Result<_>>()?;

    // QA conversations: kinds at random, yes/no answers alternating over the file.
    let mut yes_next = true;
    let mut next_yes = || {
        let y = yes_next;
        yes_next = !yes_next;
        y
    };
    let mut sft = Vec::with_capacity(spec.sft_samples);
    for i in 0..spec.sft_samples {
        let img = i % spec.train_images;
        let scene = &train_scenes[img];
        let mut rng = stream(spec.seed, SFT_SAMPLE, i as u64);
        if rng.below(100) < spec.describe_percent as u64 {
            let caption = scene.caption();
            let prompt = format!("{IMAGE_TAG}\n{DESCRIBE}");
            sft.push(serde_json::to_string(&Record {
                id: format!("sft-{i:05}"),
                image: &train_names[img],
                conversations: vec![
                    Message { from: "human", value: &prompt },
                    Message { from: "gpt", value: &caption },
                ],
            })?);
            continue;
        }
        let first = QuestionKind::ALL[rng.below(5) as usize];
        let mut kinds = vec![first];
        if rng.below(100) < spec.two_turn_percent as u64 {
            let others: Vec<QuestionKind> = QuestionKind::ALL
                .into_iter()
                .filter(|&k| k != first)
                .collect();
            kinds.push(others[rng.below(others.len() as u64) as usize]);
        }
        let qas: Vec<Qa> = kinds
            .iter()
            .map(|&k| {
                let yes = k == QuestionKind::YesNo && next_yes();
                ask(scene, k, yes, &mut rng)
            })
            .collect();
        let questions: Vec<String> = qas
            .iter()
            .enumerate()
            .map(|(t, qa)| {
                if t == 0 {
                    format!("{IMAGE_TAG}\n{}", qa.question)
                } else {
                    qa.question.clone()
                }
            })
            .collect();
        let mut conversations = Vec::new();
        for (q, qa) in questions.iter().zip(&qas) {
            conversations.push(Message {
                from: "human",
                value: q,
            });
            conversations.push(Message {
                from: "gpt",
                value: &qa.answer,
            });
        }
        sft.push(serde_json::to_string(&Record {
            id: format!("sft-{i:05}"),
            image: &train_names[img],
            conversations,
        })?);
    }

    // Held-out questions: question q is about image q % E; the k-th question of image i has kind
    // (i + k) % 5, so each image gets different kinds and the kinds are evenly spread.
    let mut yes_next = true;
    let mut eval = String::new();
    for q in 0..spec.eval_questions {
        let img = q % spec.eval_images;
        let k = q / spec.eval_images;
        let kind = QuestionKind::ALL[(img + k) % 5];
        let yes = kind == QuestionKind::YesNo && {
            let y = yes_next;
            yes_next = !yes_next;
            y
        };
        let mut rng = stream(spec.seed, EVAL_SAMPLE, q as u64);
        let qa = ask(&eval_scenes[img], kind, yes, &mut rng);
        let item = EvalItem {
            id: format!("eval-{q:05}-{}", kind.name()),
            image: eval_image_name(img),
            question: qa.question,
            answer: qa.answer,
        };
        writeln!(eval, "{}", serde_json::to_string(&item)?).expect("writing to a String");
    }

    let files = StudyFiles {
        dir: dir.to_path_buf(),
        pretrain: dir.join("pretrain.json"),
        sft: dir.join("sft.json"),
        eval: dir.join("eval.jsonl"),
        tokenizer: dir.join("tokenizer.json"),
        manifest: dir.join("study.json"),
        images,
    };
    write_file(&files.pretrain, json_list(&pretrain).as_bytes())?;
    write_file(&files.sft, json_list(&sft).as_bytes())?;
    write_file(&files.eval, eval.as_bytes())?;
    let mut tok = tokenizer_json()?;
    tok.push('\n');
    write_file(&files.tokenizer, tok.as_bytes())?;
    let mut manifest = serde_json::to_string_pretty(spec)?;
    manifest.push('\n');
    write_file(&files.manifest, manifest.as_bytes())?;
    Ok(files)
}

/// Reads back the spec a study folder was written with (`study.json`), if any: lets a caller
/// reuse existing data when the spec matches instead of writing it again.
pub fn read_study_spec(dir: &Path) -> Result<Option<StudySpec>> {
    let path = dir.join("study.json");
    if !path.exists() {
        return Ok(None);
    }
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(spec) => Ok(Some(spec)),
        Err(e) => bail!("{} is not a study spec: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_unambiguous() {
        let mut rng = SplitMix64::new(3);
        for _ in 0..500 {
            let s = Scene::random(&mut rng);
            assert!((1..=3).contains(&s.count()));
            for (i, a) in s.objects.iter().enumerate() {
                for b in &s.objects[i + 1..] {
                    assert!(a.shape != b.shape && a.colour != b.colour && a.position != b.position);
                    // Shapes never overlap: their bounding boxes are disjoint.
                    let gap = (a.cx - b.cx).abs().max((a.cy - b.cy).abs());
                    assert!(gap > a.half + b.half, "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn every_object_stays_inside_its_grid_cell() {
        // One object per visual token at 8-pixel patches of 24-pixel images: each shape's box
        // lies inside the third of the image its slot names, on both axes.
        let mut rng = SplitMix64::new(5);
        for _ in 0..2000 {
            for o in Scene::random(&mut rng).objects {
                for c in [o.cx, o.cy] {
                    let cell = (c * 3.0).floor();
                    assert!(c - o.half >= cell / 3.0 && c + o.half <= (cell + 1.0) / 3.0, "{o:?}");
                }
            }
        }
    }

    #[test]
    fn captions_join_in_reading_order() {
        let mut rng = SplitMix64::new(9);
        let s = loop {
            let s = Scene::random(&mut rng);
            if s.count() == 3 {
                break s;
            }
        };
        let c = s.caption();
        assert_eq!(c.matches(", ").count(), 1);
        assert_eq!(c.matches(" and ").count(), 1);
        assert!(c.starts_with("a "));
    }
}
