//! KV-cache greedy generation against transformers' `generate(do_sample=False)`, token for token,
//! on the tiny random checkpoints of tests/fixtures/{llm,llava} (expected outputs made by
//! tests/fixtures/make_generate_fixtures.py): through the library, batched, and through
//! `kd-engine generate --json`, with the end-of-sequence ids given on the command line or read
//! from the folder's generation_config.json / config.json.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixture;
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::data::{EncodedSample, Group};
use kd_engine::eval::{eos_ids_from_dir, generate_ids, generate_mllm, GenerateOptions, Sampling, StopReason};
use kd_engine::model::{load_llava, LoadedLlm};
use kd_engine::weights::WeightSource;
use serde::Deserialize;

type Be = CpuBackend<f32>;

#[derive(Deserialize, Debug, Clone)]
struct Case {
    name: String,
    input_ids: Vec<u32>,
    max_new_tokens: usize,
    eos_token_id: Option<Vec<u32>>,
    new_tokens: Vec<u32>,
    stopped_at_eos: bool,
}

#[derive(Deserialize, Debug)]
struct Golden {
    model: String,
    cases: Vec<Case>,
}

const LLMS: [&str; 4] = ["qwen2_gqa_tied", "qwen2_untied_sharded_bf16", "llama_f16", "qwen2_tied_long"];

fn golden(file: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(&format!("generate/{file}"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn opts(case: &Case, dir: &Path) -> GenerateOptions {
    let eos = case.eos_token_id.clone().unwrap_or_else(|| eos_ids_from_dir(dir).unwrap());
    GenerateOptions { max_new_tokens: case.max_new_tokens, eos, sampling: Sampling::Greedy }
}

fn stop_of(case: &Case) -> StopReason {
    if case.stopped_at_eos {
        StopReason::Eos
    } else {
        StopReason::MaxNewTokens
    }
}

#[test]
fn llm_greedy_matches_transformers_token_for_token() {
    let be = Be::new();
    for name in LLMS {
        let g = golden(&format!("llm_{name}.json"));
        let dir = fixture(&g.model);
        let llm = LoadedLlm::load(&be, &dir, "").unwrap();
        assert!(g.cases.iter().any(|c| c.stopped_at_eos) && g.cases.iter().any(|c| !c.stopped_at_eos));
        for case in &g.cases {
            let out = generate_ids(&be, &llm.model, &llm.weights, std::slice::from_ref(&case.input_ids), &opts(case, &dir), &mut |_| Ok(())).unwrap();
            let got = &out.sequences[0];
            assert_eq!(got.tokens, case.new_tokens, "{name} / {}", case.name);
            assert_eq!(got.stop, stop_of(case), "{name} / {}", case.name);
        }
    }
}

/// Both prompts of a model in one batch (different lengths, one cache slot each), no EOS: the
/// "default" case comes out unchanged and the "eos" case's tokens are a prefix of its free run.
#[test]
fn batched_generation_gives_each_sequence_what_it_gets_alone() {
    let be = Be::new();
    for name in LLMS {
        let g = golden(&format!("llm_{name}.json"));
        let llm = LoadedLlm::load(&be, &fixture(&g.model), "").unwrap();
        let (d, e) = (&g.cases[0], &g.cases[1]);
        assert_eq!((d.name.as_str(), e.name.as_str()), ("default", "eos"));
        let o = GenerateOptions { max_new_tokens: 12, eos: vec![], sampling: Sampling::Greedy };
        let out = generate_ids(&be, &llm.model, &llm.weights, &[e.input_ids.clone(), d.input_ids.clone()], &o, &mut |_| Ok(())).unwrap();
        assert_eq!(out.sequences[1].tokens, d.new_tokens, "{name}");
        assert_eq!(out.sequences[0].tokens[..e.new_tokens.len()], e.new_tokens[..], "{name}");
        assert_eq!(out.sequences[0].tokens.len(), 12);
        // With the eos case's stop ids, its sequence leaves the batch early and the other goes on.
        let o = GenerateOptions { eos: e.eos_token_id.clone().unwrap(), ..o };
        let out = generate_ids(&be, &llm.model, &llm.weights, &[e.input_ids.clone(), d.input_ids.clone()], &o, &mut |_| Ok(())).unwrap();
        assert_eq!(out.sequences[0].tokens, e.new_tokens, "{name}");
        assert_eq!(out.sequences[0].stop, StopReason::Eos);
    }
}

fn llava_pixels(dir: &Path) -> Vec<f32> {
    let src = WeightSource::open(&dir.join("reference.safetensors")).unwrap();
    src.read_f32("pixel_values", &[3, 28, 28]).unwrap()
}

#[test]
fn llava_greedy_matches_transformers_token_for_token() {
    let be = Be::new();
    for name in ["hf_qwen2_tied", "hf_llama_untied_bf16"] {
        let g = golden(&format!("llava_{name}.json"));
        let dir = fixture(&g.model);
        let l = load_llava(&be, &dir).unwrap();
        let image_id = l.image_token_id.unwrap();
        let pixels = llava_pixels(&dir);
        for case in &g.cases {
            let groups = case.input_ids.iter().map(|&i| if i == image_id { Group::Visual } else { Group::Prompt }).collect();
            let sample = EncodedSample { ids: case.input_ids.clone(), groups, has_image: true };
            let out = generate_mllm(&be, &l.mllm, &l.weights, vec![(sample, Some(pixels.clone()))], &opts(case, &dir), &mut |_| Ok(())).unwrap();
            assert_eq!(out.sequences[0].tokens, case.new_tokens, "{name} / {}", case.name);
            assert_eq!(out.sequences[0].stop, stop_of(case), "{name} / {}", case.name);
        }
    }
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kd-engine"))
}

fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Runs `generate --json` and returns (the ids of its single stdout line, stderr).
fn cli_generate(dir: &Path, case: &Case, eos_arg: bool) -> (Vec<u32>, String) {
    let mut cmd = Command::new(bin());
    cmd.args(["generate", "--model"]).arg(dir).args(["--input-ids", &ids_arg(&case.input_ids)]);
    cmd.args(["--max-new-tokens", &case.max_new_tokens.to_string(), "--json", "--device", "cpu"]);
    if let (true, Some(eos)) = (eos_arg, &case.eos_token_id) {
        cmd.args(["--eos-token-id", &ids_arg(eos)]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "generate failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be exactly one JSON line: {stdout:?}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 1, "only \"ids\": {v}");
    let ids = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    (ids, stderr)
}

#[test]
fn cli_json_matches_transformers() {
    for name in LLMS {
        let g = golden(&format!("llm_{name}.json"));
        for case in &g.cases {
            let (ids, stderr) = cli_generate(&fixture(&g.model), case, true);
            assert_eq!(ids, case.new_tokens, "{name} / {}", case.name);
            assert!(stderr.contains("tokens/s"), "stderr reports the decode speed: {stderr}");
        }
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// The stop ids come from generation_config.json (a list), else config.json (an int).
#[test]
fn cli_reads_eos_from_generation_config_then_config() {
    let g = golden("llm_qwen2_gqa_tied.json");
    let case = g.cases.iter().find(|c| c.stopped_at_eos).unwrap().clone();
    let eos = case.eos_token_id.clone().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_dir(&fixture(&g.model), &dir);
    let gen = dir.join("generation_config.json");
    std::fs::write(&gen, serde_json::json!({"eos_token_id": eos, "do_sample": true, "temperature": 5.0, "top_p": 0.1}).to_string()).unwrap();
    let (ids, _) = cli_generate(&dir, &case, false);
    assert_eq!(ids, case.new_tokens, "EOS list from generation_config.json; its sampling settings ignored");

    std::fs::write(&gen, r#"{"bos_token_id": 1}"#).unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["eos_token_id"] = serde_json::json!(eos[0]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (ids, _) = cli_generate(&dir, &case, false);
    assert_eq!(ids, case.new_tokens, "EOS int from config.json");

    // No EOS anywhere: runs to --max-new-tokens.
    cfg["eos_token_id"] = serde_json::Value::Null;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (ids, stderr) = cli_generate(&dir, &case, false);
    assert_eq!(ids.len(), case.max_new_tokens);
    assert!(stderr.contains("stopped at --max-new-tokens"), "{stderr}");
}

#[test]
fn cli_errors_are_clear() {
    let dir = fixture("llm/qwen2_gqa_tied");
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(["generate", "--model"]).arg(&dir).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(out.stdout.is_empty(), "nothing on stdout on error");
        String::from_utf8(out.stderr).unwrap()
    };
    let e = run(&["--input-ids", "1,2", "--device", "cuda", "--json"]);
    assert!(e.contains("--device cuda") && e.contains("use --device cpu"), "{e}");
    let e = run(&["--input-ids", "1,300", "--json"]);
    assert!(e.contains("300") && e.contains("vocabulary of 256"), "{e}");
    let e = run(&["--input-ids", "1,x", "--json"]);
    assert!(e.contains("\"x\" is not a token id"), "{e}");
    let e = run(&["--json"]);
    assert!(e.contains("--prompt") && e.contains("--input-ids"), "{e}");
    let e = run(&["--input-ids", "1", "--image", "a.png"]);
    assert!(e.contains("plain language model"), "{e}");
    let e = run(&["--input-ids", "1", "--top-p", "0.9"]);
    assert!(e.contains("--temperature"), "{e}");
    let e = run(&["--input-ids", "1", "--eos-token-id", "7,-1"]);
    assert!(e.contains("--eos-token-id"), "{e}");
    let e = run(&["--prompt", "hello"]);
    assert!(e.contains("tokenizer"), "{e}");
}

/// Seeded sampling reproduces, depends on the seed, and with top-k 1 is greedy.
#[test]
fn sampling_is_seeded_and_top_k_1_is_greedy() {
    let be = Be::new();
    let g = golden("llm_qwen2_gqa_tied.json");
    let llm = LoadedLlm::load(&be, &fixture(&g.model), "").unwrap();
    let prompt = vec![g.cases[0].input_ids.clone()];
    let gen = |s: Sampling| generate_ids(&be, &llm.model, &llm.weights, &prompt, &GenerateOptions { max_new_tokens: 12, eos: vec![], sampling: s }, &mut |_| Ok(())).unwrap().sequences[0].tokens.clone();
    let random = |seed| Sampling::Random { temperature: 1.5, top_k: 0, top_p: 1.0, seed };
    assert_eq!(gen(random(1)), gen(random(1)));
    assert_ne!(gen(random(1)), gen(random(2)));
    assert_eq!(gen(Sampling::Random { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 }), g.cases[0].new_tokens);
    assert_eq!(gen(Sampling::Random { temperature: 1.0, top_k: 0, top_p: 1e-6, seed: 3 }), g.cases[0].new_tokens);
}
