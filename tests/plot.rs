//! Loss-curve plots: PNGs for two synthetic stages are written, decode, have the expected size,
//! show the chosen line colours, and carry rendered text (the bundled font, no system fonts).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::Path;

use image::RgbImage;
use kd_engine::train::plot::{
    plot_losses, read_metrics_jsonl, stage_colour, stage_plot_file_name, term_colour, MetricRecord,
    ALL_STAGES_FILE, ALL_STAGES_PLOT_SIZE, STAGE_PLOT_SIZE,
};

fn record(
    stage: &str,
    stage_index: usize,
    step: u64,
    global: Option<u64>,
    terms: &[(&str, f64)],
) -> MetricRecord {
    MetricRecord {
        stage: stage.to_string(),
        stage_index,
        step,
        global_step: global,
        values: terms.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
    }
}

/// Two stages shaped like a LLaVA-KD run: DPT (ce + res + vis + rel) then SFT (ce + res + prompt),
/// decaying losses with a little wobble, and a few non-finite values that must be skipped.
fn synthetic(with_global: bool) -> Vec<MetricRecord> {
    let mut out = Vec::new();
    let mut g = 0u64;
    for step in 0..80u64 {
        let t = step as f64;
        let wob = 0.04 * (t * 0.7).sin();
        let ce = 2.5 * (-t / 30.0).exp() + 0.6 + wob;
        let res = 0.8 * (-t / 20.0).exp() + 0.1;
        let vis = 0.3 * (-t / 25.0).exp() + 0.05;
        let rel = 0.2 * (-t / 40.0).exp() + 0.02 + 0.5 * wob.abs();
        let mut loss = ce + res + vis + rel;
        if step == 33 {
            loss = f64::NAN;
        }
        let vis = if step == 50 { f64::INFINITY } else { vis };
        out.push(record(
            "dpt",
            0,
            step,
            with_global.then_some(g),
            &[("loss", loss), ("ce", ce), ("res", res), ("vis", vis), ("rel", rel)],
        ));
        g += 1;
    }
    for step in 0..60u64 {
        let t = step as f64;
        let ce = 1.4 * (-t / 25.0).exp() + 0.5 + 0.03 * (t * 0.9).cos();
        let res = 0.5 * (-t / 15.0).exp() + 0.08;
        let prompt = 0.4 * (-t / 30.0).exp() + 0.04;
        out.push(record(
            "sft",
            1,
            step,
            with_global.then_some(g),
            &[("loss", ce + res + prompt), ("ce", ce), ("res", res), ("prompt", prompt)],
        ));
        g += 1;
    }
    out
}

fn load(path: &Path) -> RgbImage {
    image::open(path).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display())).to_rgb8()
}

fn count_colour(img: &RgbImage, (r, g, b): (u8, u8, u8)) -> usize {
    img.pixels().filter(|p| p.0 == [r, g, b]).count()
}

fn distinct_colours(img: &RgbImage) -> usize {
    img.pixels().map(|p| p.0).collect::<HashSet<_>>().len()
}

/// Dark pixels (text) in the top `rows` rows of the image.
fn dark_pixels_in_top(img: &RgbImage, rows: u32) -> usize {
    (0..rows.min(img.height()))
        .flat_map(|y| (0..img.width()).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let p = img.get_pixel(x, y).0;
            (p[0] as u32 + p[1] as u32 + p[2] as u32) < 3 * 100
        })
        .count()
}

fn check_plot(img: &RgbImage, size: (u32, u32), colours: &[(u8, u8, u8)]) {
    assert_eq!(img.dimensions(), size);
    assert!(distinct_colours(img) >= 8, "too few colours: {}", distinct_colours(img));
    for &c in colours {
        let n = count_colour(img, c);
        assert!(n >= 100, "line colour {c:?} has only {n} pixels");
    }
    // The title is drawn in the top band with the bundled font: it must leave dark pixels there.
    let dark = dark_pixels_in_top(img, 40);
    assert!(dark >= 150, "title band has only {dark} dark pixels: font not rendered?");
}

#[test]
fn writes_stage_and_all_stage_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots");
    let paths = plot_losses(&synthetic(true), &out, "tiny-run").unwrap();
    let names: Vec<String> =
        paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            stage_plot_file_name(0, "dpt"),
            stage_plot_file_name(1, "sft"),
            ALL_STAGES_FILE.to_string()
        ]
    );
    assert_eq!(names[0], "losses_stage0_dpt.png");
    for p in &paths {
        assert!(p.is_file(), "{} missing", p.display());
    }
    // Atomic writes leave no temporary files behind.
    let entries: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries.len(), 3, "unexpected files: {entries:?}");

    let dpt = load(&paths[0]);
    check_plot(&dpt, STAGE_PLOT_SIZE, &["loss", "ce", "res", "vis", "rel"].map(term_colour));
    assert_eq!(count_colour(&dpt, term_colour("prompt")), 0, "dpt has no prompt term");

    let sft = load(&paths[1]);
    check_plot(&sft, STAGE_PLOT_SIZE, &["loss", "ce", "res", "prompt"].map(term_colour));
    assert_eq!(count_colour(&sft, term_colour("vis")), 0, "sft has no vis term");

    let all = load(&paths[2]);
    check_plot(&all, ALL_STAGES_PLOT_SIZE, &[stage_colour(0), stage_colour(1)]);

    // Plotting again overwrites in place.
    let again = plot_losses(&synthetic(true), &out, "").unwrap();
    assert_eq!(again, paths);
    assert_eq!(fs::read_dir(&out).unwrap().count(), 3);
}

#[test]
fn global_step_is_derived_when_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let paths = plot_losses(&synthetic(false), dir.path(), "derived").unwrap();
    let all = load(paths.last().unwrap());
    check_plot(&all, ALL_STAGES_PLOT_SIZE, &[stage_colour(0), stage_colour(1)]);
}

#[test]
fn empty_and_non_finite_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let err = plot_losses(&[], dir.path(), "x").unwrap_err();
    assert!(format!("{err:#}").contains("no metric records"), "{err:#}");

    // A stage whose values are all non-finite still plots (empty axes), and nothing panics.
    let bad = vec![
        record("pt", 0, 0, None, &[("loss", f64::NAN), ("ce", f64::INFINITY)]),
        record("pt", 0, 1, None, &[("loss", f64::NEG_INFINITY)]),
        record("pt", 0, 1, None, &[]),
    ];
    let paths = plot_losses(&bad, dir.path(), "bad").unwrap();
    assert_eq!(paths.len(), 2);
    for p in &paths {
        load(p);
    }
    // A diverged run (values near f64::MAX, and tiny ones) must not hang or panic the axes.
    let diverged = vec![
        record("dpt", 0, 0, None, &[("loss", 2.0), ("ce", 1e-300)]),
        record("dpt", 0, 1, None, &[("loss", f64::MAX), ("ce", -f64::MAX)]),
        record("dpt", 0, 2, None, &[("loss", f64::MAX), ("ce", f64::MIN_POSITIVE)]),
    ];
    let paths = plot_losses(&diverged, &dir.path().join("diverged"), "").unwrap();
    assert!(count_colour(&load(&paths[0]), term_colour("loss")) > 0);
    // One record, one point.
    let one = vec![record("sft", 2, 7, Some(100), &[("loss", 1.0)])];
    let paths = plot_losses(&one, &dir.path().join("one"), "").unwrap();
    assert_eq!(paths.len(), 2);
    assert!(count_colour(&load(&paths[0]), term_colour("loss")) > 0);
}

#[test]
fn reads_metrics_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let text = concat!(
        r#"{"stage": "dpt", "stage_index": 0, "step": 0, "global_step": 0, "loss": 1.2, "ce": 0.9, "res": 0.2, "vis": 0.05, "rel": 0.1, "lr": 0.001, "grad_norm": 0.7, "tokens_per_s": 1000.0, "elapsed_s": 1.5}"#,
        "\n\n",
        r#"{"stage": "dpt", "stage_index": 0, "step": 1, "global_step": 1, "loss": NaN, "ce": null, "res": 0.19, "vis": Infinity, "rel": -Infinity, "lr": 0.001, "note": "text"}"#,
        "\n",
        r#"{"stage": "sft", "stage_index": 1, "step": 0, "global_step": 2, "loss": 0.8, "prompt": 0.3}"#,
        "\n",
        r#"{"stage": "sft", "stage_index": 1, "step": 1, "glo"#, // cut short by a killed trainer
    );
    fs::write(&path, text).unwrap();
    let recs = read_metrics_jsonl(&path).unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0].stage, "dpt");
    assert_eq!((recs[0].stage_index, recs[0].step, recs[0].global_step), (0, 0, Some(0)));
    let keys: Vec<&str> = recs[0].values.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["ce", "loss", "rel", "res", "vis"]);
    assert_eq!(recs[0].values["loss"], 1.2);
    let keys: Vec<&str> = recs[1].values.keys().map(|k| k.as_str()).collect();
    assert_eq!(keys, ["res"], "non-finite and non-numeric values are skipped");
    assert_eq!(
        (recs[2].stage.as_str(), recs[2].stage_index, recs[2].global_step),
        ("sft", 1, Some(2))
    );

    let paths = plot_losses(&recs, &dir.path().join("plots"), "from jsonl").unwrap();
    assert_eq!(paths.len(), 3);

    // A malformed line in the middle is an error naming the line.
    let bad = dir.path().join("bad.jsonl");
    fs::write(&bad, "{\"stage\": \"dpt\", \"step\": 0, \"loss\": 1}\nnot json\n{\"stage\": \"dpt\", \"step\": 1}\n").unwrap();
    let err = format!("{:#}", read_metrics_jsonl(&bad).unwrap_err());
    assert!(err.contains("bad.jsonl:2"), "{err}");
    // A line without a stage is an error too.
    fs::write(&bad, "{\"step\": 0, \"loss\": 1}\n").unwrap();
    assert!(format!("{:#}", read_metrics_jsonl(&bad).unwrap_err()).contains("stage"));

    // An empty file is a clear error.
    let empty = dir.path().join("empty.jsonl");
    fs::write(&empty, "\n").unwrap();
    let err = format!("{:#}", read_metrics_jsonl(&empty).unwrap_err());
    assert!(err.contains("no metric records"), "{err}");
    assert!(read_metrics_jsonl(dir.path().join("missing.jsonl")).is_err());
}

/// Writes the sample plots to `target/plot-samples/` for a person to look at.
#[test]
fn sample_plots_for_inspection() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/plot-samples");
    plot_losses(&synthetic(true), &out, "sample run").unwrap();
}

/// A stage whose terms span decades (log scale) and whose largest term stays at the top of the
/// range to the last step, where a legend in the upper right would sit on it.
fn wide_range() -> Vec<MetricRecord> {
    // Two stages of 20 steps (few points: each is marked with a dot).
    (0..40u64)
        .map(|g| {
            let t = g as f64;
            let rel = 1e-3 * (1.0 + 0.5 * (t * 0.3).sin());
            let (stage, index) = if g < 20 { ("dpt", 0) } else { ("dft", 1) };
            record(stage, index, g % 20, Some(g), &[("loss", 6.0 + rel), ("ce", 6.0), ("rel", rel)])
        })
        .collect()
}

/// The plotting area: the x axis (the lowest long run of the axis colour) from its first to its
/// last column.
fn plot_area(img: &RgbImage) -> (u32, u32, u32) {
    let axis = [90u8, 90, 90];
    let axis_row = (0..img.height()).rev().find(|&y| (0..img.width()).filter(|&x| img.get_pixel(x, y).0 == axis).count() > 300).unwrap();
    let axis_start = (0..img.width()).find(|&x| img.get_pixel(x, axis_row).0 == axis).unwrap();
    let axis_end = (0..img.width()).rev().find(|&x| img.get_pixel(x, axis_row).0 == axis).unwrap();
    (axis_start, axis_row, axis_end)
}

#[test]
fn legends_sit_beside_the_curves_and_log_plots_draw_nothing_below_their_axis() {
    let dir = tempfile::tempdir().unwrap();
    let paths = plot_losses(&wide_range(), dir.path(), "wide").unwrap();
    for p in &paths {
        let img = load(p);
        let (axis_start, axis_row, axis_end) = plot_area(&img);
        let frame = [150u8, 150, 150];
        // Below the title band (its anti-aliased text has every grey).
        let inside = (50..axis_row).flat_map(|y| (axis_start..axis_end).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0 == frame).count();
        let beside = (0..img.height()).flat_map(|y| (axis_end + 1..img.width()).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0 == frame).count();
        assert!(inside == 0 && beside > 0, "{}: legend frame pixels inside the plot {inside}, beside it {beside}", p.display());
        let colours: Vec<[u8; 3]> = ["loss", "ce", "rel"].iter().map(|t| term_colour(t)).chain([stage_colour(0), stage_colour(1)]).map(|(r, g, b)| [r, g, b]).collect();
        let below = (axis_row + 1..img.height())
            .flat_map(|y| (0..axis_end).map(move |x| (x, y)))
            .filter(|&(x, y)| colours.contains(&img.get_pixel(x, y).0))
            .count();
        assert_eq!(below, 0, "{}: curve pixels below the x axis", p.display());
    }
}
