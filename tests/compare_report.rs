//! `kd-engine compare`: two tiny random MLLM folders answer the same questions; the HTML report
//! embeds the images, escapes the text and shows every model's answer, and renders in headless
//! Chromium (Debian's `chromium`) with the images' pixels on screen. Without a Chromium binary the
//! rendering test is reported as skipped (in the summary line: this file runs on the harness of
//! `tests/common/harness.rs`), unless `KD_REQUIRE_CHROMIUM=1` (as in CI, which installs it).

mod eval_common;
#[path = "common/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use eval_common::{run, solid_png, tiny_mllm_folder, write_lines, Be};
use harness::{Outcome, Test};
use kd_engine::eval::answer::MllmRunner;
use kd_engine::eval::questions::{question_prompt, read_questions};
use kd_engine::eval::report::escape_html;
use kd_engine::eval::{GenerateOptions, Sampling};
use serde_json::json;

const RED: [u8; 3] = [220, 20, 60];
const BLUE: [u8; 3] = [30, 90, 200];

struct Made {
    _tmp: tempfile::TempDir,
    html: PathBuf,
    answers: Vec<Vec<String>>,
}

/// Two models, three questions (red image, blue image, no image), a report scored with `exact`.
fn make_report() -> Made {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let models = [tiny_mllm_folder(&root.join("tinyllava-like"), 1), tiny_mllm_folder(&root.join("llava-kd-like"), 2)];
    let images = root.join("img");
    solid_png(&images.join("red.png"), RED, 48);
    solid_png(&images.join("blue.png"), BLUE, 48);
    let data = root.join("q.jsonl");
    write_lines(
        &data,
        &[
            json!({"id": "q-red", "image": "red.png", "question": "What colour is <b>this</b> & that?", "answer": "red"}),
            json!({"id": "q-blue", "image": "blue.png", "question": "Is the square blue?", "answer": ["yes", "yes", "blue"]}),
            json!({"id": "q-text", "question": "Name a shape.", "answer": "circle"}),
        ],
    );
    let html = root.join("out/report.html");
    let (ok, _, stderr) = run(args![
        "compare", "--models", format!("{},{}", models[0].display(), models[1].display()), "--data", data, "--image-folder", images, "--out", html,
        "--metric", "exact", "--max-new-tokens", "6", "--batch", "2"
    ]);
    assert!(ok, "{stderr}");
    // What each model answers, from the library, question by question.
    let be = Be::new();
    let questions = read_questions(&data, None).unwrap();
    let answers = models
        .iter()
        .map(|m| {
            let r = MllmRunner::load(&be, m, None, None).unwrap();
            let opts = GenerateOptions { max_new_tokens: 6, eos: r.eos.clone(), sampling: Sampling::Greedy };
            questions
                .iter()
                .map(|q| r.answer(&be, &[(question_prompt(q, ""), q.image_path(&images))], &opts, &mut |_| Ok(())).unwrap().0.remove(0).text)
                .collect()
        })
        .collect();
    Made { _tmp: tmp, html, answers }
}

fn report_embeds_images_escapes_text_and_shows_every_answer() {
    let m = make_report();
    let html = std::fs::read_to_string(&m.html).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 2, "both images embedded");
    assert!(!html.contains("src=\"http") && !html.contains("src=\"/") && !html.contains("file://"), "nothing external");
    assert!(html.contains("What colour is &lt;b&gt;this&lt;/b&gt; &amp; that?"));
    assert!(!html.contains("<b>this</b>"));
    assert!(html.contains("<th>tinyllava-like</th>") && html.contains("<th>llava-kd-like</th>"));
    assert!(html.contains("reference: yes | yes | blue"));
    assert!(html.contains("(no image)"));
    assert_ne!(m.answers[0], m.answers[1], "the two random models answer differently");
    for model in &m.answers {
        for a in model {
            assert!(html.contains(&format!("<div class=\"answer\">{}</div>", escape_html(a))), "answer {a:?} missing");
        }
    }
}

/// A Chromium binary: `$CHROMIUM`, else the usual names on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

fn screenshot(chrome: &Path, html: &Path, png: &Path) {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chrome)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg("--window-size=1200,900")
        .arg(format!("file://{}", html.display()))
        .output()
        .unwrap();
    assert!(png.is_file(), "chromium wrote no screenshot: {}", String::from_utf8_lossy(&out.stderr));
}

/// Pixels of exactly this colour.
fn count(img: &image::RgbImage, rgb: [u8; 3]) -> usize {
    img.pixels().filter(|p| p.0 == rgb).count()
}

fn report_renders_in_headless_chromium() -> Outcome {
    let Some(chrome) = chromium() else {
        // CI installs Debian's chromium and sets KD_REQUIRE_CHROMIUM=1, so there the check runs.
        assert!(!std::env::var("KD_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1"), "KD_REQUIRE_CHROMIUM=1 but no chromium on PATH (or $CHROMIUM)");
        return Outcome::Skipped("needs chromium (on PATH or $CHROMIUM)".into());
    };
    let m = make_report();
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("compare_report_screenshot.png");
    let _ = std::fs::remove_file(&png);
    screenshot(&chrome, &m.html, &png);
    let img = image::open(&png).unwrap().to_rgb8();
    println!("screenshot: {} ({}×{})", png.display(), img.width(), img.height());
    assert_eq!((img.width(), img.height()), (1200, 900));
    // Each 48-px image is drawn up to 260 px wide: a solid block of at least 150×150 pixels.
    let (red, blue) = (count(&img, RED), count(&img, BLUE));
    assert!(red >= 150 * 150 && blue >= 150 * 150, "image pixels on screen: red {red}, blue {blue}");
    // The answer cells: every answer is wrong or right, so their cell colours cover real area in
    // two columns (the page's only tinted backgrounds).
    let wrong = count(&img, [0xfb, 0xea, 0xea]);
    let right = count(&img, [0xe8, 0xf6, 0xe8]);
    assert!(wrong + right >= 4 * 200 * 30, "answer cells on screen: {wrong} + {right} pixels");
    // Both answer columns: tinted pixels in the left and right halves of the answer area.
    let tinted_x: Vec<u32> = img.enumerate_pixels().filter(|(_, _, p)| p.0 == [0xfb, 0xea, 0xea] || p.0 == [0xe8, 0xf6, 0xe8]).map(|(x, _, _)| x).collect();
    let (lo, hi) = (tinted_x.iter().min().unwrap(), tinted_x.iter().max().unwrap());
    assert!(hi - lo > 400, "answers side by side: tinted x range {lo}..{hi}");
    Outcome::Passed
}

fn main() {
    harness::run(&[
        Test { name: "report_embeds_images_escapes_text_and_shows_every_answer", run: || {
            report_embeds_images_escapes_text_and_shows_every_answer();
            Outcome::Passed
        } },
        Test { name: "report_renders_in_headless_chromium", run: report_renders_in_headless_chromium },
    ]);
}
