//! PNG plots of the training loss curves, drawn from the trainer's `metrics.jsonl`.
//!
//! [`plot_losses`] writes one PNG per stage (x: the step within the stage, one coloured line per
//! loss term that stage logged, with a legend) and `losses_all_stages.png` (the total loss over the
//! global step, one colour per stage, stage boundaries marked by dashed lines).
//!
//! No system fonts are needed (SPEC §7: CI has none): `plotters` is built without its `ttf`
//! feature, and its `ab_glyph` text renderer is handed DejaVu Sans, bundled in the binary from
//! `assets/fonts/DejaVuSans.ttf` (licence: `assets/fonts/LICENSE-DejaVu.txt`).
//!
//! Bad data never panics: non-finite values are skipped, an empty input is an error, a malformed
//! metrics line is an error naming its line (except an unterminated last line, which is what a
//! trainer killed mid-write leaves, and is skipped). Each PNG is written to a temporary file in
//! the output folder and renamed into place, so a reader never sees half a PNG.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::coord::Shift;
use plotters::prelude::*;

/// DejaVu Sans 2.37 (Debian `fonts-dejavu-core`), unmodified.
static FONT_TTF: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The family every text style in this module uses; the bundled font is registered under it.
const FONT: &str = "sans-serif";

/// Size of each per-stage PNG, in pixels.
pub const STAGE_PLOT_SIZE: (u32, u32) = (1024, 640);
/// Size of `losses_all_stages.png`, in pixels.
pub const ALL_STAGES_PLOT_SIZE: (u32, u32) = (1280, 640);
/// File name of the all-stages plot.
pub const ALL_STAGES_FILE: &str = "losses_all_stages.png";

/// Numeric fields of a metrics line that are not loss terms (everything else numeric is plotted).
pub const NON_LOSS_FIELDS: &[&str] = &[
    "stage",
    "stage_index",
    "step",
    "global_step",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "epoch",
    "samples",
    "tokens",
    "samples_per_s",
];

/// Known loss terms, in legend order; any other term follows them alphabetically.
const TERM_ORDER: &[&str] = &["loss", "ce", "res", "prompt", "vis", "rel"];

/// One line of `metrics.jsonl`: the loss terms logged at one optimiser step.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricRecord {
    /// Stage name, e.g. `"dpt"`.
    pub stage: String,
    /// Position of the stage in the recipe (0-based); orders the plots.
    pub stage_index: usize,
    /// Step within the stage.
    pub step: u64,
    /// Step over the whole run. When any record lacks it, the all-stages plot derives it by laying
    /// the stages end to end in `stage_index` order.
    pub global_step: Option<u64>,
    /// Loss terms by name (`"loss"` is the total); non-finite values are skipped when plotting.
    pub values: BTreeMap<String, f64>,
}

/// The colour of a loss term's line, the same in every plot (matplotlib's tab10 for the known
/// terms; other names get one of the remaining tab10 colours, chosen by a hash of the name).
pub fn term_colour(term: &str) -> (u8, u8, u8) {
    match term {
        "loss" => (31, 119, 180),  // blue
        "ce" => (255, 127, 14),    // orange
        "res" => (44, 160, 44),    // green
        "prompt" => (214, 39, 40), // red
        "vis" => (148, 103, 189),  // purple
        "rel" => (140, 86, 75),    // brown
        other => {
            const REST: [(u8, u8, u8); 4] =
                [(227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)];
            // FNV-1a: stable across runs and platforms, unlike std's hasher.
            let h = other.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            REST[(h % REST.len() as u64) as usize]
        }
    }
}

/// The colour of the n-th stage (in `stage_index` order) in `losses_all_stages.png`.
pub fn stage_colour(n: usize) -> (u8, u8, u8) {
    const STAGES: [(u8, u8, u8); 6] = [
        (31, 119, 180),
        (214, 39, 40),
        (44, 160, 44),
        (148, 103, 189),
        (255, 127, 14),
        (23, 190, 207),
    ];
    STAGES[n % STAGES.len()]
}

/// The file name of a stage's plot: `losses_stage{index}_{name}.png`, the name reduced to
/// `[A-Za-z0-9_-]`.
pub fn stage_plot_file_name(stage_index: usize, stage: &str) -> String {
    let name: String = stage
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    format!("losses_stage{stage_index}_{name}.png")
}

/// Reads the trainer's metrics file: one JSON object per line with at least `stage` (string) and
/// `step`; `stage_index` defaults to the order in which stages first appear, `global_step` is
/// optional. Numeric fields not in [`NON_LOSS_FIELDS`] become loss terms; `null`, `NaN` and
/// `±Infinity` values are skipped; blank lines are ignored.
pub fn read_metrics_jsonl(path: impl AsRef<Path>) -> Result<Vec<MetricRecord>> {
    let path = path.as_ref();
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading metrics file {}", path.display()))?;
    let lines: Vec<&str> = text.split('\n').collect();
    let mut stage_order: Vec<String> = Vec::new();
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // The last piece has no '\n' after it (when the file ends in '\n' it is empty).
        let unterminated = i + 1 == lines.len();
        let value = match parse_json_line(line) {
            Ok(v) => v,
            Err(_) if unterminated => continue, // a partial write by a trainer that was killed
            Err(e) => bail!("{}:{}: not a JSON object: {e}", path.display(), i + 1),
        };
        let record = record_from_json(&value, &mut stage_order)
            .with_context(|| format!("{}:{}", path.display(), i + 1))?;
        records.push(record);
    }
    if records.is_empty() {
        bail!("metrics file {} holds no metric records", path.display());
    }
    Ok(records)
}

/// Parses one metrics line; Python-style `NaN`/`Infinity` tokens (not JSON) are read as `null`.
fn parse_json_line(line: &str) -> serde_json::Result<serde_json::Value> {
    match serde_json::from_str(line) {
        Ok(v) => Ok(v),
        Err(e) => match nonfinite_tokens_to_null(line) {
            Some(fixed) => serde_json::from_str(&fixed),
            None => Err(e),
        },
    }
}

/// Replaces the bare tokens `NaN`, `Infinity` (optionally signed) outside strings with `null`;
/// `None` when there was none.
fn nonfinite_tokens_to_null(line: &str) -> Option<String> {
    const TOKENS: [&str; 6] = ["-Infinity", "+Infinity", "Infinity", "-NaN", "+NaN", "NaN"];
    let b = line.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let (mut in_str, mut escaped, mut changed) = (false, false, false);
    let mut i = 0;
    'outer: while i < b.len() {
        let c = b[i];
        if in_str {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else {
            for t in TOKENS {
                if b[i..].starts_with(t.as_bytes()) {
                    out.extend_from_slice(b"null");
                    i += t.len();
                    changed = true;
                    continue 'outer;
                }
            }
        }
        out.push(c);
        i += 1;
    }
    // Only ASCII was replaced by ASCII, so `out` is still UTF-8.
    if changed {
        String::from_utf8(out).ok()
    } else {
        None
    }
}

fn record_from_json(v: &serde_json::Value, stage_order: &mut Vec<String>) -> Result<MetricRecord> {
    let obj = v.as_object().ok_or_else(|| anyhow!("not a JSON object"))?;
    let stage = obj
        .get("stage")
        .and_then(|s| s.as_str())
        .ok_or_else(|| anyhow!("no \"stage\" string"))?
        .to_string();
    let step = obj
        .get("step")
        .and_then(as_count)
        .ok_or_else(|| anyhow!("no \"step\" (a non-negative integer)"))?;
    let global_step = obj.get("global_step").and_then(as_count);
    let stage_index = match obj.get("stage_index") {
        Some(s) => as_count(s)
            .ok_or_else(|| anyhow!("\"stage_index\" is not a non-negative integer"))?
            as usize,
        None => match stage_order.iter().position(|s| *s == stage) {
            Some(p) => p,
            None => {
                stage_order.push(stage.clone());
                stage_order.len() - 1
            }
        },
    };
    let values = obj
        .iter()
        .filter(|(k, _)| !NON_LOSS_FIELDS.contains(&k.as_str()))
        .filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (k.clone(), x)))
        .collect();
    Ok(MetricRecord { stage, stage_index, step, global_step, values })
}

/// A non-negative integer, also when written as a float with no fractional part (`12.0`).
fn as_count(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15)
            .map(|x| x as u64)
    })
}

/// What one stage logged: each term's finite values by step (a repeated step keeps its last
/// value, as after a resumed run), and the range of steps seen.
struct StageData {
    index: usize,
    name: String,
    terms: BTreeMap<String, BTreeMap<u64, f64>>,
    /// step → (global step if logged, total loss if finite).
    totals: BTreeMap<u64, (Option<u64>, Option<f64>)>,
    min_step: u64,
    max_step: u64,
}

/// Writes one PNG per stage and `losses_all_stages.png` into `out_dir` (created if needed);
/// returns their paths, stages in `stage_index` order, the all-stages plot last. `title_prefix`
/// (e.g. the run name) starts every title; it may be empty.
pub fn plot_losses(
    records: &[MetricRecord],
    out_dir: &Path,
    title_prefix: &str,
) -> Result<Vec<PathBuf>> {
    if records.is_empty() {
        bail!("no metric records to plot (empty metrics)");
    }
    ensure_font()?;
    fs::create_dir_all(out_dir)
        .with_context(|| format!("creating plot folder {}", out_dir.display()))?;

    // The total is the "loss" term; a run that never logs one is plotted as the sum of its terms.
    let has_total = records.iter().any(|r| r.values.contains_key("loss"));
    let mut stages: BTreeMap<(usize, String), StageData> = BTreeMap::new();
    for r in records {
        let s = stages.entry((r.stage_index, r.stage.clone())).or_insert_with(|| StageData {
            index: r.stage_index,
            name: r.stage.clone(),
            terms: BTreeMap::new(),
            totals: BTreeMap::new(),
            min_step: r.step,
            max_step: r.step,
        });
        s.min_step = s.min_step.min(r.step);
        s.max_step = s.max_step.max(r.step);
        for (k, &v) in &r.values {
            if v.is_finite() {
                s.terms.entry(k.clone()).or_default().insert(r.step, v);
            }
        }
        let total = if has_total {
            r.values.get("loss").copied()
        } else if !r.values.is_empty() {
            Some(r.values.values().sum())
        } else {
            None
        };
        s.totals.insert(r.step, (r.global_step, total.filter(|t| t.is_finite())));
    }
    let stages: Vec<StageData> = stages.into_values().collect();
    let prefix = title_prefix.trim();
    let with_prefix = |t: String| if prefix.is_empty() { t } else { format!("{prefix} — {t}") };

    let mut written = Vec::with_capacity(stages.len() + 1);
    for s in &stages {
        let path = out_dir.join(stage_plot_file_name(s.index, &s.name));
        let title = with_prefix(format!("stage {}: {}", s.index, s.name));
        plot_stage(s, &path, &title).with_context(|| format!("plotting {}", path.display()))?;
        written.push(path);
    }
    let path = out_dir.join(ALL_STAGES_FILE);
    let title = with_prefix(if has_total {
        "total loss, all stages".to_string()
    } else {
        "sum of loss terms, all stages".to_string()
    });
    plot_all_stages(&stages, &path, &title, if has_total { "loss" } else { "sum of loss terms" })
        .with_context(|| format!("plotting {}", path.display()))?;
    written.push(path);
    Ok(written)
}

/// Registers the bundled font once per process, under every generic family name.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            for family in [FONT, "serif", "monospace"] {
                plotters::style::register_font(family, FontStyle::Normal, FONT_TTF).map_err(
                    |_| {
                        "the bundled font assets/fonts/DejaVuSans.ttf could not be parsed"
                            .to_string()
                    },
                )?;
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// One line of a chart.
struct Line {
    label: String,
    colour: RGBColor,
    width: u32,
    points: Vec<(f64, f64)>,
}

/// A dashed vertical line with a label at its top.
struct Mark {
    x: f64,
    label: String,
}

fn plot_stage(s: &StageData, path: &Path, title: &str) -> Result<()> {
    let mut names: Vec<&String> = s.terms.keys().collect();
    names.sort_by_key(|n| {
        (TERM_ORDER.iter().position(|t| t == n).unwrap_or(TERM_ORDER.len()), n.as_str())
    });
    let lines: Vec<Line> = names
        .into_iter()
        .map(|n| {
            let (r, g, b) = term_colour(n);
            Line {
                label: n.clone(),
                colour: RGBColor(r, g, b),
                width: if n == "loss" { 3 } else { 2 },
                points: s.terms[n].iter().map(|(&x, &y)| (x as f64, clamp_y(y))).collect(),
            }
        })
        .collect();
    let x = (s.min_step as f64)..(s.max_step as f64);
    render_png(path, STAGE_PLOT_SIZE, |root| {
        draw_chart(root, title, "step (within stage)", "loss term", x, &lines, &[])
    })
}

fn plot_all_stages(stages: &[StageData], path: &Path, title: &str, what: &str) -> Result<()> {
    let logged = stages.iter().all(|s| s.totals.values().all(|(g, _)| g.is_some()));
    let mut lines = Vec::with_capacity(stages.len());
    let mut marks = Vec::with_capacity(stages.len());
    let mut offset = stages.first().map_or(0, |s| s.min_step);
    let (mut x_lo, mut x_hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut prev_end: Option<f64> = None;
    for (n, s) in stages.iter().enumerate() {
        // Global steps: as logged, else the stages laid end to end.
        let global = |step: u64, logged_g: Option<u64>| -> f64 {
            match (logged, logged_g) {
                (true, Some(g)) => g as f64,
                _ => (offset + (step - s.min_step)) as f64,
            }
        };
        let xs: Vec<f64> = s.totals.iter().map(|(&st, &(g, _))| global(st, g)).collect();
        let start = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let end = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        x_lo = x_lo.min(start);
        x_hi = x_hi.max(end);
        let points: Vec<(f64, f64)> = s
            .totals
            .iter()
            .filter_map(|(&st, &(g, t))| t.map(|t| (global(st, g), clamp_y(t))))
            .collect();
        let (r, g, b) = stage_colour(n);
        lines.push(Line {
            label: format!("{} (stage {})", s.name, s.index),
            colour: RGBColor(r, g, b),
            width: 2,
            points,
        });
        // The boundary sits between the previous stage's last step and this one's first.
        let x = match prev_end {
            Some(p) if p < start => (p + start) / 2.0,
            _ => start,
        };
        marks.push(Mark { x, label: s.name.clone() });
        prev_end = Some(end);
        offset += s.max_step - s.min_step + 1;
    }
    render_png(path, ALL_STAGES_PLOT_SIZE, |root| {
        draw_chart(root, title, "global step", what, x_lo..x_hi, &lines, &marks)
    })
}

/// Draws into an RGB buffer and writes it as a PNG, atomically.
fn render_png(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    write_png_atomic(path, &buf, w, h)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Encodes to `.NAME.tmp-PID-N` beside `path`, syncs it and renames it over `path`.
fn write_png_atomic(path: &Path, rgb: &[u8], w: u32, h: u32) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| -> Result<()> {
        let mut out = BufWriter::new(File::create(&tmp)?);
        PngEncoder::new(&mut out).write_image(rgb, w, h, ExtendedColorType::Rgb8)?;
        out.flush()?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Values beyond ±1e100 (a diverged run) are drawn at ±1e100: plotters' axes hang on ranges
/// whose width overflows to infinity.
fn clamp_y(y: f64) -> f64 {
    y.clamp(-1e100, 1e100)
}

/// The y range of the lines: logarithmic when every value is positive and the largest is over 20
/// times the smallest (distillation terms are often far smaller than the cross-entropy, and would
/// lie flat on the floor of a linear axis), else linear.
enum YRange {
    Linear(Range<f64>),
    Log(Range<f64>),
}

fn y_range(lines: &[Line]) -> YRange {
    let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1));
    let (lo, hi) =
        ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if !lo.is_finite() || !hi.is_finite() {
        return YRange::Linear(0.0..1.0);
    }
    if lo > 0.0 && hi / lo > 20.0 {
        return YRange::Log((lo / 1.25)..(hi * 1.25));
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.05 };
    let lo = if lo >= 0.0 && lo - pad < 0.0 { 0.0 } else { lo - pad };
    YRange::Linear(lo..(hi + pad))
}

fn draw_chart(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x: Range<f64>,
    lines: &[Line],
    marks: &[Mark],
) -> Result<()> {
    let x = if x.end > x.start { x } else { (x.start - 1.0)..(x.start + 1.0) };
    match y_range(lines) {
        YRange::Linear(y) => draw_chart_in(root, title, x_desc, y_desc, x, y, lines, marks),
        YRange::Log(y) => {
            let y_desc = format!("{y_desc} (log scale)");
            let (bold, light) = log_ticks(y.start, y.end);
            let y = y.log_scale().with_key_points(bold).with_light_points(light);
            draw_chart_in(root, title, x_desc, &y_desc, x, y, lines, marks)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn draw_chart_in<Y>(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    x: Range<f64>,
    y: Y,
    lines: &[Line],
    marks: &[Mark],
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    // The legend gets its own column right of the chart, so it never covers a curve.
    let (w, _) = root.dim_in_pixel();
    let (plot_area, legend_area) = root.split_horizontally(w.saturating_sub(LEGEND_WIDTH));
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, (FONT, 26).into_font().color(&BLACK))
        .margin(18)
        .x_label_area_size(52)
        .y_label_area_size(80)
        .build_cartesian_2d(StepAxis(x), y)
        .map_err(plot_err)?;
    let int_fmt = |v: &f64| format_tick(*v);
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(10)
        .y_labels(8)
        .x_label_formatter(&int_fmt)
        .y_label_formatter(&int_fmt)
        .label_style((FONT, 15).into_font().color(&RGBColor(40, 40, 40)))
        .axis_desc_style((FONT, 18).into_font().color(&BLACK))
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(RGBColor(240, 240, 240))
        .axis_style(RGBColor(90, 90, 90))
        .draw()
        .map_err(plot_err)?;

    let y_span = chart.y_range();
    for (n, m) in marks.iter().enumerate() {
        let style = ShapeStyle::from(&RGBColor(120, 120, 120)).stroke_width(1);
        // The first stage's label needs no line: its start is no boundary.
        if n > 0 {
            chart
                .draw_series(DashedLineSeries::new(
                    [(m.x, y_span.start), (m.x, y_span.end)],
                    6,
                    5,
                    style,
                ))
                .map_err(plot_err)?;
        }
        chart
            .plotting_area()
            .draw(
                &(EmptyElement::at((m.x, y_span.end))
                    + Text::new(
                        m.label.clone(),
                        (5, 4),
                        (FONT, 16).into_font().color(&RGBColor(70, 70, 70)),
                    )),
            )
            .map_err(plot_err)?;
    }

    for l in lines {
        let style = ShapeStyle::from(&l.colour).stroke_width(l.width);
        chart.draw_series(LineSeries::new(l.points.iter().copied(), style)).map_err(plot_err)?;
        // Few points: mark them, so a one-point series still shows.
        if l.points.len() <= 40 {
            chart
                .draw_series(l.points.iter().map(|&p| Circle::new(p, 3, l.colour.filled())))
                .map_err(plot_err)?;
        }
    }

    if lines.iter().all(|l| l.points.is_empty()) {
        let (w, h) = root.dim_in_pixel();
        root.draw(&Text::new(
            "no finite values",
            (w as i32 / 2 - 70, h as i32 / 2),
            (FONT, 22).into_font().color(&RGBColor(120, 120, 120)),
        ))
        .map_err(plot_err)?;
    }
    draw_legend(&legend_area, lines)
}

/// Width of the legend column right of each chart, in pixels.
const LEGEND_WIDTH: u32 = 200;

/// One entry per line (a sample of its stroke and its label) in a framed box at the top of the
/// legend column.
fn draw_legend(area: &DrawingArea<BitMapBackend<'_>, Shift>, lines: &[Line]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let (top, row) = (70i32, 24i32);
    let bottom = top + row * (lines.len() as i32 - 1) + 14;
    area.draw(&Rectangle::new([(4, top - 16), (LEGEND_WIDTH as i32 - 14, bottom)], RGBColor(150, 150, 150)))
        .map_err(plot_err)?;
    for (i, l) in lines.iter().enumerate() {
        let y = top + row * i as i32;
        let style = ShapeStyle::from(&l.colour).stroke_width(l.width);
        area.draw(&PathElement::new([(14, y), (36, y)], style)).map_err(plot_err)?;
        area.draw(&Text::new(l.label.clone(), (44, y - 9), (FONT, 16).into_font().color(&BLACK))).map_err(plot_err)?;
    }
    Ok(())
}

/// A linear axis of steps whose ticks are whole steps (see [`step_ticks`]).
struct StepAxis(Range<f64>);

impl Ranged for StepAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let Range { start, end } = self.0;
        let frac = if end > start { (value - start) / (end - start) } else { 0.5 };
        limit.0 + (frac * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        let bold = step_ticks(self.0.start, self.0.end);
        if !hint.weight().allow_light_points() || bold.len() < 2 {
            return bold;
        }
        // Grid lines between the labelled ticks: a fifth (or half) of their spacing, whole steps.
        let step = bold[1] - bold[0];
        let sub = if step >= 5.0 && (step / 5.0).fract() == 0.0 { step / 5.0 } else { step / 2.0 };
        if sub < 1.0 || sub.fract() != 0.0 {
            return bold;
        }
        let mut v = (self.0.start / sub).ceil() * sub;
        let mut out = Vec::new();
        while v <= self.0.end && out.len() < 500 {
            out.push(v);
            v += sub;
        }
        out
    }

    fn range(&self) -> Range<f64> {
        self.0.clone()
    }
}

/// Ticks of a step axis over `lo..hi`: whole steps 1, 2 or 5 times a power of ten apart, at most
/// about ten of them (plotters' own choice would put ticks at fractional steps on short ranges).
fn step_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = ((hi - lo) / 10.0).max(1.0);
    let mut step = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * step >= raw {
            step *= m;
            break;
        }
    }
    let mut ticks = Vec::new();
    let mut v = (lo / step).ceil() * step;
    while v <= hi && ticks.len() < 50 {
        ticks.push(v);
        v += step;
    }
    ticks
}

/// Ticks of a log axis over `lo..hi` (both > 0): labelled ones at 1, 2 and 5 times each power of
/// ten (every integer multiple when that gives fewer than three, plotters' own choice is powers of
/// ten only, which leaves a narrow range with one label), grid lines at every integer multiple.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    // Multiples `mults` of the powers of ten whose exponent is a multiple of `every`, in range.
    let pick = |mults: &[f64], every: i32| -> Vec<f64> {
        let mut out = Vec::new();
        for d in (d0..=d1).filter(|d| d.rem_euclid(every) == 0) {
            for m in mults {
                let v = m * 10f64.powi(d);
                if v >= lo && v <= hi {
                    out.push(v);
                }
            }
        }
        out
    };
    if d1 - d0 > 6 {
        // A diverged run spans many decades: label about eight powers of ten.
        let bold = pick(&[1.0], (d1 - d0 + 7) / 8);
        let light = if d1 - d0 > 40 { bold.clone() } else { pick(&[1.0], 1) };
        return (bold, light);
    }
    let all = pick(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], 1);
    let bold = pick(&[1.0, 2.0, 5.0], 1);
    if bold.len() >= 3 {
        (bold, all)
    } else {
        (all.clone(), all)
    }
}

/// Tick labels: integers as integers, else about four significant digits, scientific notation
/// for very small or very large magnitudes.
fn format_tick(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 { "0".into() } else { format!("{v}") };
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    if v.fract() == 0.0 {
        return format!("{v:.0}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_tokens_outside_strings_become_null() {
        let fixed = nonfinite_tokens_to_null(r#"{"stage":"NaN x","loss":NaN,"ce":-Infinity}"#);
        assert_eq!(fixed.as_deref(), Some(r#"{"stage":"NaN x","loss":null,"ce":null}"#));
        assert_eq!(nonfinite_tokens_to_null(r#"{"loss":1}"#), None);
    }

    #[test]
    fn step_axis_ticks_are_whole_steps() {
        assert_eq!(step_ticks(5.0, 6.0), [5.0, 6.0]);
        assert_eq!(step_ticks(-1.0, 1.0), [-1.0, 0.0, 1.0]);
        assert_eq!(step_ticks(0.0, 79.0), [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]);
        assert_eq!(step_ticks(0.0, 139.0).len(), 7);
        assert_eq!(step_ticks(1000.0, 250_000.0)[..2], [50_000.0, 100_000.0]);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(200.0), "200");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(1.23456), "1.235");
        assert_eq!(format_tick(0.0001), "1.0e-4");
    }
}
