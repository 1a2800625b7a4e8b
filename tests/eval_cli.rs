//! `kd-engine eval` and `kd-engine generate --image --prompt` on tiny random MLLM folders: the
//! CLI's answers equal the library's (batching does not change them), predictions files hold one
//! line per question, the printed score is the metric of those predictions, and bad input names
//! its file and line.

mod eval_common;

use std::path::Path;

use eval_common::{run, solid_png, split_png, tiny_mllm_folder, write_lines, Be};
use kd_engine::eval::answer::MllmRunner;
use kd_engine::eval::metrics::{score_item, Metric, Summary};
use kd_engine::eval::questions::{default_suffix, question_prompt, read_questions};
use kd_engine::eval::{GenerateOptions, Sampling};
use serde_json::{json, Value};

struct Setup {
    _tmp: tempfile::TempDir,
    model: std::path::PathBuf,
    images: std::path::PathBuf,
    root: std::path::PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = tiny_mllm_folder(&root.join("student"), 11);
    let images = root.join("images");
    solid_png(&images.join("red.png"), [255, 0, 0], 40);
    solid_png(&images.join("sub/blue.png"), [0, 0, 255], 28);
    split_png(&images.join("split.png"), 33);
    Setup { _tmp: tmp, model, images, root }
}

/// What the library answers to each question alone (batch of one), greedy.
fn library_answers(s: &Setup, data: &Path, metric: Metric, max_new: usize) -> Vec<String> {
    let be = Be::new();
    let runner = MllmRunner::load(&be, &s.model, None, None).unwrap();
    let opts = GenerateOptions { max_new_tokens: max_new, eos: runner.eos.clone(), sampling: Sampling::Greedy };
    read_questions(data, Some(metric))
        .unwrap()
        .iter()
        .map(|q| {
            let item = (question_prompt(q, default_suffix(metric)), q.image_path(&s.images));
            runner.answer(&be, &[item], &opts, &mut |_| Ok(())).unwrap().0.remove(0).text
        })
        .collect()
}

fn eval(s: &Setup, data: &Path, metric: &str, out: &Path) -> (bool, String, String) {
    run(args!["eval", "--model", s.model, "--data", data, "--image-folder", s.images, "--metric", metric, "--batch", "2", "--max-new-tokens", "6", "--out", out, "--json", "--device", "cpu"])
}

fn check_metric(s: &Setup, metric: Metric, lines: &[Value]) {
    let data = s.root.join(format!("{}.jsonl", metric.name()));
    write_lines(&data, lines);
    let out = s.root.join(format!("pred/{}.jsonl", metric.name()));
    let (ok, stdout, stderr) = eval(s, &data, metric.name(), &out);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    let preds: Vec<Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(preds.len(), lines.len());
    let expected = library_answers(s, &data, metric, 6);
    let questions = read_questions(&data, Some(metric)).unwrap();
    let mut items = Vec::new();
    for ((p, q), want) in preds.iter().zip(&questions).zip(&expected) {
        assert_eq!(p["id"].as_str().unwrap(), q.id);
        assert_eq!(p["prediction"].as_str().unwrap(), want, "batched CLI answer = the library's answer alone");
        let it = score_item(metric, want, &q.answers, q.choices.as_deref()).unwrap();
        assert_eq!(p["score"].as_f64().unwrap(), it.value());
        items.push(it);
    }
    let printed: Value = serde_json::from_str(stdout.trim()).unwrap();
    let want = serde_json::to_value(Summary::of(metric, &items)).unwrap();
    assert_eq!(printed, want);
    eprintln!("{}: predictions {:?} → {printed}", metric.name(), expected);
}

#[test]
fn eval_cli_scores_its_predictions_for_every_metric() {
    let s = setup();
    check_metric(
        &s,
        Metric::Exact,
        &[
            json!({"id": 1, "image": "red.png", "question": "What colour is it?", "answer": ["red", "red", "dark red"]}),
            json!({"id": "b", "image": "sub/blue.png", "question": "What colour is the image?", "answer": "blue"}),
            json!({"id": 3, "image": "split.png", "question": "Which colours?", "answer": "red and blue"}),
        ],
    );
    check_metric(
        &s,
        Metric::YesNo,
        &[
            json!({"id": 1, "image": "red.png", "question": "Is there a red circle?", "answer": "yes"}),
            json!({"id": 2, "image": "sub/blue.png", "question": "Is there a red circle?", "answer": "No"}),
            json!({"id": 3, "image": "split.png", "question": "Is there a blue square?", "answer": "yes"}),
        ],
    );
    check_metric(
        &s,
        Metric::Choice,
        &[
            json!({"id": 1, "image": "red.png", "question": "What colour?", "answer": "A", "choices": ["red", "blue", "green"]}),
            json!({"id": 2, "image": "sub/blue.png", "question": "What colour?", "answer": "blue", "choices": ["red", "blue"]}),
            json!({"id": 3, "question": "Text only: which is a shape?", "answer": "(C)", "choices": ["red", "blue", "circle"]}),
        ],
    );
}

#[test]
fn eval_cli_reports_bad_lines_with_file_and_line() {
    let s = setup();
    let data = s.root.join("bad.jsonl");
    let out = s.root.join("p.jsonl");
    let cases: [(&str, &str, &str); 5] = [
        ("{\"id\": 1, \"image\": \"red.png\", \"question\": \"q\", \"answer\": \"yes\"}\n\n{oops\n", "yesno", "bad.jsonl:3"),
        ("{\"id\": 1, \"image\": \"red.png\", \"question\": \"q\", \"answer\": \"maybe\"}\n", "yesno", "bad.jsonl:1"),
        ("{\"id\": 1, \"image\": \"red.png\", \"question\": \"q\", \"answer\": \"A\"}\n", "choice", "needs \"choices\""),
        ("{\"id\": 1, \"image\": \"red.png\", \"question\": \"q\"}\n", "exact", "no reference answer"),
        ("{\"id\": 1, \"image\": \"nope.png\", \"question\": \"q\", \"answer\": \"x\"}\n", "exact", "bad.jsonl:1: image"),
    ];
    for (text, metric, want) in cases {
        std::fs::write(&data, text).unwrap();
        let (ok, stdout, stderr) = eval(&s, &data, metric, &out);
        assert!(!ok && stdout.is_empty(), "{text}");
        assert!(stderr.contains(want), "{text}: {stderr}");
    }
    std::fs::write(&data, "\n  \n").unwrap();
    let (ok, _, stderr) = eval(&s, &data, "exact", &out);
    assert!(!ok && stderr.contains("no questions"), "{stderr}");
    std::fs::write(&data, "{\"id\": 1, \"image\": \"red.png\", \"question\": \"q\", \"answer\": \"x\"}\n").unwrap();
    let (ok, _, stderr) = run(args!["eval", "--model", s.root.join("missing"), "--data", data, "--image-folder", s.images, "--metric", "exact"]);
    assert!(!ok && stderr.contains("missing"), "{stderr}");
}

#[test]
fn generate_cli_streams_the_answer_of_an_image_and_a_prompt() {
    let s = setup();
    let image = s.images.join("split.png");
    let be = Be::new();
    let runner = MllmRunner::load(&be, &s.model, None, None).unwrap();
    let opts = GenerateOptions { max_new_tokens: 10, eos: runner.eos.clone(), sampling: Sampling::Greedy };
    let prompt = "What is in the image? <b>&";
    let (answers, _) = runner.answer(&be, &[(prompt.to_string(), Some(image.clone()))], &opts, &mut |_| Ok(())).unwrap();
    let want = &answers[0];

    let (ok, stdout, stderr) = run(args!["generate", "--model", s.model, "--image", image, "--prompt", prompt, "--max-new-tokens", "10"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), want.text, "streamed text");
    assert!(stderr.contains("tokens/s"), "{stderr}");

    let (ok, stdout, stderr) = run(args!["generate", "--model", s.model, "--image", image, "--prompt", prompt, "--max-new-tokens", "10", "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let ids: Vec<u32> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want.tokens);

    // The same prompt as token ids (image token once per visual position, as transformers takes it).
    let ids = runner.prompt(prompt, true).unwrap().ids;
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let (ok, stdout, stderr) = run(args!["generate", "--model", s.model, "--image", image, "--input-ids", ids_arg, "--max-new-tokens", "10", "--json"]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["ids"], json!(want.tokens));
    let (ok, _, stderr) = run(args!["generate", "--model", s.model, "--input-ids", ids_arg, "--json"]);
    assert!(!ok && stderr.contains("no --image"), "{stderr}");

    // The llama template on a Qwen tokenizer lacks <s>: a clear error, as are two images.
    let (ok, _, stderr) = run(args!["generate", "--model", s.model, "--image", image, "--prompt", "hi", "--template", "llama"]);
    assert!(!ok && stderr.contains("<s>"), "{stderr}");
    let (ok, _, stderr) = run(args!["generate", "--model", s.model, "--image", image, "--image", image, "--prompt", "hi"]);
    assert!(!ok && stderr.contains("one image per prompt"), "{stderr}");
    let (ok, _, stderr) = run(args!["generate", "--model", s.model, "--image", s.images.join("none.png"), "--prompt", "hi"]);
    assert!(!ok && stderr.contains("none.png"), "{stderr}");

    // Sampling on request: seeded, so it reproduces.
    let sample = |seed: &str| run(args!["generate", "--model", s.model, "--image", image, "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9", "--seed", seed, "--json"]).1;
    assert_eq!(sample("4"), sample("4"));
}
