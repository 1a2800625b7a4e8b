//! The LLaVA dataset reader: JSON list or JSONL, images under an image folder.
//!
//! Records look like `{"id", "image"?: "rel/path.jpg", "conversations": [{"from", "value"}...]}`
//! (`from` is `human`/`user` or `gpt`/`assistant`); samples without `image` are text-only.
//!
//! Loading validates every sample so that training never meets a bad one: the record's shape,
//! the conversation (encoded with the real template and tokenizer, which also catches samples too
//! long for `max_len`), and the image. Bad samples are skipped, counted by reason, and the first
//! few reasons kept for the log ([`SkipReport`]); if more than `max_skip_fraction` of the file is
//! bad, loading fails, since that points at a wrong path or format rather than a few broken files.
//!
//! Images: by default ([`ImageCheck::Decode`]) every image is fully decoded once at load, in
//! parallel, and then dropped; this finds corrupt and truncated files before the first step, at
//! the cost of decoding the dataset once more. [`ImageCheck::Header`] only reads each file's
//! header, for datasets too large for that. Either way, images are decoded again when a batch is
//! built, and a decode that fails there (a file changed or was cut after loading) skips that
//! sample from its batch with its reason ([`LoadedBatch::skipped`]) instead of stopping the run.
//!
//! Text is encoded at load only to validate it and encoded again per batch (deterministic and
//! cheap), so the dataset holds the conversations, not hundreds of visual placeholders each.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::batch::{collate, PackedBatch};
use super::image::{check_image_size, load_rgb, ImageTooLarge};
use super::processor::{preprocess, ImageProcessorConfig};
use super::rng::shuffled_indices;
use super::template::{
    EncodeError, EncodeErrorKind, EncodeOptions, EncodedSample, Role, Template, Turn,
};

/// A parsed or validated record, or why it was skipped.
type Checked = std::result::Result<Sample, SkippedSample>;
/// A sample ready to pack (ids and pixels), or why it had to be left out of its batch.
type Prepared = std::result::Result<(EncodedSample, Option<Vec<f32>>), SkippedSample>;

/// Default largest fraction of bad samples a dataset may have before loading fails.
pub const DEFAULT_MAX_SKIP_FRACTION: f64 = 0.1;

/// How thoroughly images are checked at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageCheck {
    /// Decode every image fully (finds truncated and corrupt files up front).
    Decode,
    /// Check that the file exists and its header parses (fast; corrupt pixel data is found, and
    /// skipped, when its batch is built).
    Header,
}

/// Options of [`Dataset::load`].
#[derive(Clone, Debug)]
pub struct DatasetOptions {
    /// Root that `image` paths are relative to (`--image-folder`); by default the folder of the
    /// data file.
    pub image_folder: Option<PathBuf>,
    /// Loading fails if more than this fraction of the records is skipped.
    pub max_skip_fraction: f64,
    pub image_check: ImageCheck,
    /// How many skip reasons are kept word for word for the log.
    pub max_examples: usize,
}

impl Default for DatasetOptions {
    fn default() -> Self {
        Self {
            image_folder: None,
            max_skip_fraction: DEFAULT_MAX_SKIP_FRACTION,
            image_check: ImageCheck::Decode,
            max_examples: 5,
        }
    }
}

/// Why a sample was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// A JSONL line that is not valid JSON.
    BadJson,
    /// Valid JSON of the wrong shape (no `conversations`, a turn without `value`, ...).
    BadRecord,
    MissingImage,
    CorruptImage,
    /// More pixels than PIL's decompression-bomb limit (not decoded).
    ImageTooLarge,
    TooManyImages,
    UnknownRole,
    NoAnswer,
    BadTurnOrder,
    MisplacedImageTag,
    TooLong,
}

impl SkipReason {
    pub fn describe(self) -> &'static str {
        match self {
            Self::BadJson => "bad JSON",
            Self::BadRecord => "bad record",
            Self::MissingImage => "missing image",
            Self::CorruptImage => "corrupt image",
            Self::ImageTooLarge => "image too large",
            Self::TooManyImages => "more than one image",
            Self::UnknownRole => "unknown role",
            Self::NoAnswer => "no answer",
            Self::BadTurnOrder => "bad turn order",
            Self::MisplacedImageTag => "misplaced <image> tag",
            Self::TooLong => "too long",
        }
    }

    /// The reason of an image that failed to load: too large, else corrupt.
    fn of_image_error(err: &anyhow::Error) -> Self {
        if err.downcast_ref::<ImageTooLarge>().is_some() {
            Self::ImageTooLarge
        } else {
            Self::CorruptImage
        }
    }

    fn from_encode_error(err: &anyhow::Error) -> Self {
        match err.downcast_ref::<EncodeError>().map(|e| e.kind) {
            Some(EncodeErrorKind::UnknownRole) => Self::UnknownRole,
            Some(EncodeErrorKind::NoAnswer) => Self::NoAnswer,
            Some(EncodeErrorKind::BadTurnOrder) => Self::BadTurnOrder,
            Some(EncodeErrorKind::TooManyImages) => Self::TooManyImages,
            Some(EncodeErrorKind::MisplacedImageTag) => Self::MisplacedImageTag,
            Some(EncodeErrorKind::TooLong) => Self::TooLong,
            None => Self::BadRecord,
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// One skipped sample: where it was, why, and the full message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedSample {
    /// Where in the file: `line 7` (JSONL) or `item 3` (JSON list), 1-based.
    pub source: String,
    pub id: Option<String>,
    pub reason: SkipReason,
    pub detail: String,
}

impl fmt::Display for SkippedSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(id) = &self.id {
            write!(f, " (id {id})")?;
        }
        write!(f, ": {}: {}", self.reason, self.detail)
    }
}

/// Counts of skipped samples by reason, and the first few in full, for the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkipReport {
    /// Records seen (good and bad).
    pub total: usize,
    /// Records kept.
    pub kept: usize,
    pub counts: BTreeMap<SkipReason, usize>,
    /// The first `max_examples` skips, word for word.
    pub examples: Vec<String>,
    pub max_examples: usize,
}

impl SkipReport {
    pub fn new(max_examples: usize) -> Self {
        Self {
            max_examples,
            ..Self::default()
        }
    }

    pub fn skipped(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn count(&self, reason: SkipReason) -> usize {
        self.counts.get(&reason).copied().unwrap_or(0)
    }

    /// Fraction of the records skipped (0 for an empty report).
    pub fn skipped_fraction(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.skipped() as f64 / self.total as f64
        }
    }

    /// Counts one skipped sample (and keeps its text if fewer than `max_examples` are kept).
    pub fn record(&mut self, skip: &SkippedSample) {
        *self.counts.entry(skip.reason).or_insert(0) += 1;
        if self.examples.len() < self.max_examples {
            self.examples.push(skip.to_string());
        }
    }
}

impl fmt::Display for SkipReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kept {} of {} samples", self.kept, self.total)?;
        if self.skipped() > 0 {
            let counts: Vec<String> = self
                .counts
                .iter()
                .map(|(r, n)| format!("{n} {r}"))
                .collect();
            write!(f, "; skipped {} ({})", self.skipped(), counts.join(", "))?;
            for e in &self.examples {
                write!(f, "\n  {e}")?;
            }
        }
        Ok(())
    }
}

/// A validated sample: its conversation and the resolved path of its image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub id: Option<String>,
    /// Where in the file: `line 7` or `item 3`.
    pub source: String,
    pub image: Option<PathBuf>,
    pub turns: Vec<Turn>,
}

/// Template, tokenizer and encoding options: everything that turns a conversation into ids.
pub struct SampleEncoder {
    pub template: Template,
    pub tokenizer: Tokenizer,
    pub options: EncodeOptions,
}

impl SampleEncoder {
    pub fn encode(&self, sample: &Sample) -> Result<EncodedSample> {
        self.template.encode(
            &sample.turns,
            sample.image.is_some(),
            &self.tokenizer,
            &self.options,
        )
    }
}

/// A batch and the samples that had to be left out of it.
#[derive(Debug)]
pub struct LoadedBatch {
    pub batch: PackedBatch,
    /// Samples whose image failed to decode while building this batch.
    pub skipped: Vec<SkippedSample>,
}

/// A loaded, validated LLaVA dataset.
#[derive(Debug)]
pub struct Dataset {
    path: PathBuf,
    samples: Vec<Sample>,
    report: SkipReport,
}

impl Dataset {
    /// Reads, validates and keeps the good samples of a LLaVA JSON list or JSONL file.
    ///
    /// Errors: the file cannot be read, a JSON list that does not parse as a whole, no usable
    /// sample, or more than `max_skip_fraction` of the records skipped.
    pub fn load(path: &Path, encoder: &SampleEncoder, opts: &DatasetOptions) -> Result<Self> {
        ensure!(
            (0.0..=1.0).contains(&opts.max_skip_fraction),
            "max_skip_fraction must be between 0 and 1, got {}",
            opts.max_skip_fraction
        );
        let text =
            fs::read(path).with_context(|| format!("cannot read dataset {}", path.display()))?;
        let image_root = match &opts.image_folder {
            Some(dir) => dir.clone(),
            None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let parsed = parse_records(&text, &image_root)
            .with_context(|| format!("dataset {}", path.display()))?;

        let checked: Vec<Checked> = parsed
            .into_par_iter()
            .map(|record| record.and_then(|s| validate(s, encoder, opts.image_check)))
            .collect();

        let mut report = SkipReport::new(opts.max_examples);
        report.total = checked.len();
        let mut samples = Vec::with_capacity(checked.len());
        for item in checked {
            match item {
                Ok(s) => samples.push(s),
                Err(skip) => report.record(&skip),
            }
        }
        report.kept = samples.len();

        if report.total == 0 {
            bail!("dataset {} is empty: it holds no samples", path.display());
        }
        if samples.is_empty() {
            bail!("dataset {} has no usable sample: {report}", path.display());
        }
        let dataset = Self {
            path: path.to_path_buf(),
            samples,
            report,
        };
        dataset.check_skip_fraction(0, opts.max_skip_fraction)?;
        Ok(dataset)
    }

    /// Fails when the records skipped at load plus `at_batch_time` (distinct samples left out
    /// of their batches since) are more than `max_fraction` of the file's records.
    pub fn check_skip_fraction(&self, at_batch_time: usize, max_fraction: f64) -> Result<()> {
        let report = &self.report;
        let skipped = report.skipped() + at_batch_time;
        let fraction = skipped as f64 / report.total.max(1) as f64;
        if fraction <= max_fraction {
            return Ok(());
        }
        let when = if at_batch_time == 0 {
            String::new()
        } else {
            format!(", {} at load and {at_batch_time} at batch time", report.skipped())
        };
        bail!(
            "dataset {}: skipped {skipped} of {} samples ({:.1}%{when}), more than max_skip_fraction {:.1}% \
             (a wrong --image-folder or template?): {report}",
            self.path.display(),
            report.total,
            100.0 * fraction,
            100.0 * max_fraction
        )
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// What was skipped at load.
    pub fn report(&self) -> &SkipReport {
        &self.report
    }

    /// The sample order for one pass over the data: a permutation of `0..len()` that depends only
    /// on `seed` (the same on every machine; derive one seed per epoch, e.g. `seed + epoch`).
    pub fn order(&self, seed: u64) -> Vec<usize> {
        shuffled_indices(self.samples.len(), seed)
    }

    /// Encodes the samples at `indices`, decodes and preprocesses their images (in parallel),
    /// and packs them in the given order. A sample that fails here (its image changed on disk
    /// since loading) is left out and reported, never fatal; an index out of range is an error.
    pub fn load_batch(
        &self,
        indices: &[usize],
        encoder: &SampleEncoder,
        processor: &ImageProcessorConfig,
    ) -> Result<LoadedBatch> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.samples.len()) {
            bail!(
                "sample index {bad} out of range: dataset {} has {} samples",
                self.path.display(),
                self.len()
            );
        }
        let prepared: Vec<Prepared> = indices
            .par_iter()
            .map(|&i| prepare(&self.samples[i], encoder, processor))
            .collect();
        let mut ready = Vec::with_capacity(prepared.len());
        let mut skipped = Vec::new();
        for p in prepared {
            match p {
                Ok(x) => ready.push(x),
                Err(s) => skipped.push(s),
            }
        }
        let batch = collate(ready)
            .with_context(|| format!("packing a batch of {}", self.path.display()))?;
        Ok(LoadedBatch { batch, skipped })
    }
}

fn prepare(sample: &Sample, encoder: &SampleEncoder, processor: &ImageProcessorConfig) -> Prepared {
    let skip = |reason, err: anyhow::Error| SkippedSample {
        source: sample.source.clone(),
        id: sample.id.clone(),
        reason,
        detail: format!("{err:#}"),
    };
    let encoded = encoder
        .encode(sample)
        .map_err(|e| skip(SkipReason::from_encode_error(&e), e))?;
    let pixels = match &sample.image {
        None => None,
        Some(path) => {
            let image = load_rgb(path).map_err(|e| {
                let reason = if path.exists() { SkipReason::of_image_error(&e) } else { SkipReason::MissingImage };
                skip(reason, e)
            })?;
            Some(preprocess(&image, processor).map_err(|e| skip(SkipReason::CorruptImage, e))?)
        }
    };
    Ok((encoded, pixels))
}

/// Checks one parsed record: image present (and decodable), conversation encodable.
fn validate(sample: Sample, encoder: &SampleEncoder, check: ImageCheck) -> Checked {
    let skip = |reason, detail: String| SkippedSample {
        source: sample.source.clone(),
        id: sample.id.clone(),
        reason,
        detail,
    };
    if let Some(path) = &sample.image {
        if !path.is_file() {
            return Err(skip(
                SkipReason::MissingImage,
                format!(
                    "image file {} does not exist (or is not a file)",
                    path.display()
                ),
            ));
        }
    }
    if let Err(e) = encoder.encode(&sample) {
        return Err(skip(SkipReason::from_encode_error(&e), format!("{e:#}")));
    }
    if let Some(path) = &sample.image {
        let checked = match check {
            ImageCheck::Decode => load_rgb(path).map(|_| ()),
            ImageCheck::Header => read_image_header(path),
        };
        if let Err(e) = checked {
            return Err(skip(SkipReason::of_image_error(&e), format!("{e:#}")));
        }
    }
    Ok(sample)
}

fn read_image_header(path: &Path) -> Result<()> {
    let (w, h) = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .into_dimensions()
        .with_context(|| format!("corrupt image header in {}", path.display()))?;
    if w == 0 || h == 0 {
        bail!("image {} has an empty size {w}x{h}", path.display());
    }
    check_image_size(w, h).with_context(|| format!("image {}", path.display()))
}

/// Splits the file into records: a JSON list (the whole file must parse) or JSON lines (each
/// line parses on its own, and a bad line, not UTF-8 included, is one skipped record).
fn parse_records(bytes: &[u8], image_root: &Path) -> Result<Vec<Checked>> {
    let bytes = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    if bytes.trim_ascii_start().starts_with(b"[") {
        let text = std::str::from_utf8(bytes).context("the JSON list is not UTF-8")?;
        let list: Vec<Value> = serde_json::from_str(text).context("invalid JSON list")?;
        Ok(list
            .into_iter()
            .enumerate()
            .map(|(i, v)| parse_record(v, format!("item {}", i + 1), image_root))
            .collect())
    } else {
        Ok(bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.trim_ascii().is_empty())
            .map(|(i, line)| {
                let source = format!("line {}", i + 1);
                let bad = |detail: String| SkippedSample {
                    source: source.clone(),
                    id: None,
                    reason: SkipReason::BadJson,
                    detail,
                };
                let line = std::str::from_utf8(line).map_err(|e| bad(format!("not UTF-8: {e}")))?;
                match serde_json::from_str::<Value>(line) {
                    Ok(v) => parse_record(v, source.clone(), image_root),
                    Err(e) => Err(bad(e.to_string())),
                }
            })
            .collect())
    }
}

fn parse_record(v: Value, source: String, image_root: &Path) -> Checked {
    let id = match v.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let fail = |reason, detail: String| SkippedSample {
        source: source.clone(),
        id: id.clone(),
        reason,
        detail,
    };
    let obj = v.as_object().ok_or_else(|| {
        fail(
            SkipReason::BadRecord,
            "the record is not a JSON object".into(),
        )
    })?;

    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(fail(
                SkipReason::BadRecord,
                "`image` is an empty string".into(),
            ))
        }
        Some(Value::String(s)) => Some(image_root.join(s)),
        Some(Value::Array(list)) => match list.as_slice() {
            [] => None,
            [Value::String(s)] => Some(image_root.join(s)),
            [_] => {
                return Err(fail(
                    SkipReason::BadRecord,
                    "`image` must be a path string".into(),
                ))
            }
            more => {
                return Err(fail(
                    SkipReason::TooManyImages,
                    format!("{} images; a sample may have one", more.len()),
                ))
            }
        },
        Some(other) => {
            return Err(fail(
                SkipReason::BadRecord,
                format!("`image` must be a path string, got {other}"),
            ))
        }
    };

    let convs = obj
        .get("conversations")
        .and_then(Value::as_array)
        .ok_or_else(|| fail(SkipReason::BadRecord, "no `conversations` list".into()))?;
    let mut turns = Vec::with_capacity(convs.len());
    for (k, turn) in convs.iter().enumerate() {
        let from = turn.get("from").and_then(Value::as_str).ok_or_else(|| {
            fail(
                SkipReason::BadRecord,
                format!("turn {} has no string `from`", k + 1),
            )
        })?;
        let value = turn.get("value").and_then(Value::as_str).ok_or_else(|| {
            fail(
                SkipReason::BadRecord,
                format!("turn {} has no string `value`", k + 1),
            )
        })?;
        let role = Role::parse(from).map_err(|e| {
            fail(
                SkipReason::from_encode_error(&e),
                format!("turn {}: {e}", k + 1),
            )
        })?;
        turns.push(Turn::new(role, value));
    }
    Ok(Sample {
        id,
        source,
        image,
        turns,
    })
}
