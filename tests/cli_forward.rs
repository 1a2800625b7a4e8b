//! `kd-engine forward` end to end, and every kind of bad input it must refuse with a clear
//! message and a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, max_rel_diff};
use kd_engine::weights::{write_safetensors, NamedTensor, WeightSource};

const MODEL: &str = "llm/qwen2_gqa_tied";

fn kd(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(args).output().expect("run kd-engine");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "kd-engine panicked: {stderr}");
    (out.status.success(), stderr)
}

fn forward(model: &Path, ids: &str, out: &Path) -> (bool, String) {
    kd(&["forward", "--model", model.to_str().unwrap(), "--input-ids", ids, "--out", out.to_str().unwrap(), "--device", "cpu"])
}

/// A copy of the fixture model whose tensors are rewritten by `edit`.
fn edited_model(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> PathBuf {
    let src = fixture(MODEL);
    let w = WeightSource::open(&src).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = w
        .names()
        .map(|n| {
            let shape = w.info(n).unwrap().shape.clone();
            (n.to_string(), shape.clone(), w.read_f32(n, &shape).unwrap())
        })
        .collect();
    edit(&mut tensors);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let named: Vec<NamedTensor> =
        tensors.iter().map(|(n, s, d)| NamedTensor { name: n.clone(), shape: s.clone(), data: d }).collect();
    write_safetensors(&dir.join("model.safetensors"), &named).unwrap();
    dir.to_path_buf()
}

#[test]
fn forward_writes_logits_matching_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let r = WeightSource::open(&fixture(&format!("{MODEL}/reference.safetensors"))).unwrap();
    let ids: Vec<String> = r.read_i64("input_ids").unwrap().iter().map(|i| i.to_string()).collect();
    let (ok, err) = forward(&fixture(MODEL), &ids.join(","), &out);
    assert!(ok, "{err}");
    let got = WeightSource::open(&out).unwrap();
    let shape = r.info("logits").unwrap().shape.clone();
    assert_eq!(got.info("logits").unwrap().shape, shape);
    let d = max_rel_diff(&got.read_f32("logits", &shape).unwrap(), &r.read_f32("logits", &shape).unwrap());
    assert!(d <= 1e-4, "max rel diff {d}");
}

#[test]
fn truncated_safetensors_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_model(tmp.path(), |_| {});
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let (ok, err) = forward(&dir, "1,2", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn corrupt_header_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_model(tmp.path(), |_| {});
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..20].copy_from_slice(b"not json!!!!");
    std::fs::write(&file, &bytes).unwrap();
    let (ok, err) = forward(&dir, "1,2", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_model(tmp.path(), |t| t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight"));
    let (ok, err) = forward(&dir, "1,2", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("model.layers.1.mlp.up_proj.weight is missing"), "{err}");
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_model(tmp.path(), |t| {
        let e = t.iter_mut().find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight").unwrap();
        e.1 = vec![16, 128];
        e.2.truncate(16 * 128);
    });
    let (ok, err) = forward(&dir, "1,2", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("model.layers.0.self_attn.k_proj.weight") && err.contains("[16, 128]") && err.contains("[32, 64]"), "{err}");
}

#[test]
fn unknown_model_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_model(tmp.path(), |_| {});
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"qwen2\"", "\"mamba\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let (ok, err) = forward(&dir, "1,2", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("unknown model_type \"mamba\"") && err.contains("config.json"), "{err}");
}

#[test]
fn bad_config_json_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = edited_model(tmp.path(), |_| {});
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"qwen2\",").unwrap();
    let (ok, err) = forward(&dir, "1,2", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("config.json: not valid JSON"), "{err}");
}

#[test]
fn token_id_out_of_range_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = forward(&fixture(MODEL), "1,256", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("token id 256 is out of range") && err.contains("256"), "{err}");
}

#[test]
fn empty_and_malformed_input_ids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let (ok, err) = forward(&fixture(MODEL), "", &out);
    assert!(!ok);
    assert!(err.contains("--input-ids is empty"), "{err}");
    let (ok, err) = forward(&fixture(MODEL), "1,x,3", &out);
    assert!(!ok);
    assert!(err.contains("\"x\" is not a token id"), "{err}");
    assert!(!out.exists(), "no output on failure");
}

#[test]
fn missing_model_folder_and_unbuilt_commands_fail_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, err) = forward(&tmp.path().join("nope"), "1", &tmp.path().join("o.safetensors"));
    assert!(!ok);
    assert!(err.contains("nope"), "{err}");
    let (ok, err) = kd(&["generate"]);
    assert!(!ok);
    assert!(err.contains("--model"), "generate without a model names the missing argument: {err}");
}
