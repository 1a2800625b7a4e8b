//! `kd-engine init` and the real-shape presets (`model::presets`): every preset's `config.json`
//! parses back through the real config readers with the SPEC §2 shapes, parameter counts match the
//! published figures, and small presets (hidden test presets and scaled-down real ones) are written
//! in HF layout — single file and sharded, bf16 and f32 — and load through the real loaders. No
//! test writes a real-size checkpoint.

mod common;

use std::path::Path;
use std::process::Command;

use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{Backend, GeluKind};
use kd_engine::model::presets::{self, init_kind, init_values, parse_size, plan_shards, InitKind};
use kd_engine::model::{Arch, InitOptions, LlmConfig, LoadedLlm, LoadedVision, PresetModel, VisionConfig};
use kd_engine::weights::{StoreDtype, WeightSource};

type Be = CpuBackend<f32>;

fn kd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(args).output().expect("run kd-engine");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "kd-engine panicked: {stderr}");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

/// One row of SPEC §2's table: name, hidden, intermediate, layers, heads, kv heads, tied,
/// rope_theta, vocab.
type QwenRow = (&'static str, usize, usize, usize, usize, usize, bool, f64, usize);
const QWEN: &[QwenRow] = &[
    ("qwen1.5-0.5b", 1024, 2816, 24, 16, 16, true, 1e6, 151936),
    ("qwen1.5-1.8b", 2048, 5504, 24, 16, 16, false, 1e6, 151936),
    ("qwen1.5-4b", 2560, 6912, 40, 20, 20, false, 5e6, 151936),
    ("qwen2.5-0.5b", 896, 4864, 24, 14, 2, true, 1e6, 151936),
    ("qwen2.5-3b", 2048, 11008, 36, 16, 2, true, 1e6, 151936),
    ("qwen2.5-7b", 3584, 18944, 28, 28, 4, false, 1e6, 152064),
];

/// Parameter counts as published (model cards; SigLIP: the vision tower of the dual model).
const PUBLISHED: &[(&str, f64)] = &[
    ("qwen1.5-0.5b", 464e6),
    ("qwen1.5-1.8b", 1.84e9),
    ("qwen1.5-4b", 3.95e9),
    ("qwen2.5-0.5b", 494e6),
    ("qwen2.5-3b", 3.09e9),
    ("qwen2.5-7b", 7.62e9),
    ("siglip-so400m-patch14-384", 428e6),
];

fn write_config_only(p: &presets::Preset, dir: &Path) {
    let text = serde_json::to_string_pretty(&p.config_json(StoreDtype::Bf16).unwrap()).unwrap();
    std::fs::write(dir.join("config.json"), text).unwrap();
}

#[test]
fn every_preset_config_parses_back_with_the_spec_shapes() {
    for &(name, hidden, inter, layers, heads, kv, tied, theta, vocab) in QWEN {
        let tmp = tempfile::tempdir().unwrap();
        let p = presets::find(name).unwrap();
        write_config_only(&p, tmp.path());
        let c = LlmConfig::from_dir(tmp.path()).unwrap();
        let want = LlmConfig {
            arch: Arch::Qwen2,
            hidden,
            intermediate: inter,
            layers,
            heads,
            kv_heads: kv,
            head_dim: hidden / heads,
            vocab,
            rms_eps: 1e-6,
            rope_theta: theta,
            tie_embeddings: tied,
            qkv_bias: true,
            o_bias: false,
        };
        assert_eq!(c, want, "{name}");
        assert_eq!(p.model, PresetModel::Llm(want), "{name}");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(json["architectures"][0], "Qwen2ForCausalLM", "{name}");
        assert_eq!(json["rms_norm_eps"].as_f64(), Some(1e-6), "{name}");
        assert_eq!(json["rope_parameters"]["rope_theta"].as_f64(), Some(theta), "{name}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = presets::find("siglip-so400m-patch14-384").unwrap();
    write_config_only(&p, tmp.path());
    let c = VisionConfig::from_dir(tmp.path()).unwrap();
    let want = VisionConfig {
        hidden: 1152,
        intermediate: 4304,
        layers: 27,
        heads: 16,
        channels: 3,
        image_size: 384,
        patch_size: 14,
        ln_eps: 1e-6,
        act: GeluKind::Tanh,
    };
    assert_eq!(c, want);
    assert_eq!(c.tokens(), 729);
    assert_eq!(c.head_dim(), 72);
}

#[test]
fn parameter_counts_match_the_published_figures() {
    for &(name, published) in PUBLISHED {
        let p = presets::find(name).unwrap();
        let n = p.param_count() as f64;
        let err = (n - published).abs() / published;
        println!("{name}: {n:.0} parameters (published {published:.3e}, {:.3}% off)", err * 100.0);
        assert!(err < 0.01, "{name}: {n} parameters vs published {published}");
        assert_eq!(p.published_params.map(|x| x as f64), Some(published), "{name}");
    }
    // Exact counts from the shapes.
    assert_eq!(presets::find("qwen1.5-0.5b").unwrap().param_count(), 463_987_712);
    assert_eq!(presets::find("qwen2.5-0.5b").unwrap().param_count(), 494_032_768);
    let siglip = presets::find("siglip-so400m-patch14-384").unwrap();
    assert_eq!(siglip.llava_param_count(), 412_987_248, "the tower LLaVA runs, without the pooling head");
    assert_eq!(siglip.param_count(), 428_225_600);
}

#[test]
fn init_list_prints_every_preset_with_its_parameter_count() {
    let (ok, out, err) = kd(&["init", "--list"]);
    assert!(ok, "{err}");
    for &(name, _) in PUBLISHED {
        assert!(out.contains(name), "--list lacks {name}:\n{out}");
    }
    for count in ["463.99M", "1.84B", "3.95B", "494.03M", "3.09B", "7.62B", "428.23M"] {
        assert!(out.contains(count), "--list lacks {count}:\n{out}");
    }
    assert!(!out.contains("tiny"), "test presets are hidden:\n{out}");
}

/// Reads every tensor of `dir` back and checks it holds the initialisation (rounded to bf16 when
/// stored so).
fn check_values(dir: &Path, p: &presets::Preset, seed: u64, dtype: StoreDtype) {
    let src = WeightSource::open(dir).unwrap();
    let specs = p.tensors();
    assert_eq!(src.names().count(), specs.len(), "tensor count");
    for s in &specs {
        let got = src.read_f32(&s.name, &s.shape).unwrap();
        let want = init_values(seed, &s.name, s.numel());
        let want: Vec<f32> = match dtype {
            StoreDtype::Bf16 => want.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
            _ => want,
        };
        assert_eq!(got, want, "{}", s.name);
    }
}

#[test]
fn tiny_decoder_is_written_single_and_sharded_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let p = presets::find("tiny-qwen2").unwrap();
    let be = Be::new();
    for (sub, dtype, shard) in [("single", StoreDtype::F32, u64::MAX), ("sharded", StoreDtype::Bf16, 140_000)] {
        let dir = tmp.path().join(sub);
        let opts = InitOptions { seed: 7, dtype, max_shard_bytes: shard, tokenizer: None };
        let s = presets::write_preset(&p, &dir, &opts).unwrap();
        assert_eq!(s.params, p.param_count());
        if shard == u64::MAX {
            assert_eq!(s.shards, vec!["model.safetensors"]);
        } else {
            assert!(s.shards.len() >= 3, "{:?}", s.shards);
            assert_eq!(s.shards[0], format!("model-00001-of-{:05}.safetensors", s.shards.len()));
            assert!(dir.join("model.safetensors.index.json").is_file());
            let idx: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
            assert_eq!(idx["metadata"]["total_size"].as_u64(), Some(s.bytes));
            for f in &s.shards {
                assert!(std::fs::metadata(dir.join(f)).unwrap().len() <= 140_000 + 4096, "{f} is over the shard size");
            }
        }
        let llm = LoadedLlm::load(&be, &dir, "").unwrap();
        assert_eq!(PresetModel::Llm(llm.model.cfg.clone()), p.model);
        let logits = be.download(&llm.logits(&be, &[1, 5, 42, 999]).unwrap()).unwrap();
        assert_eq!(logits.len(), 4 * 1000);
        assert!(logits.iter().all(|x| x.is_finite()));
        check_values(&dir, &p, 7, dtype);
        let gen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap();
        assert_eq!(gen["eos_token_id"], 151643);
    }
}

#[test]
fn tiny_vision_tower_is_written_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let p = presets::find("tiny-siglip").unwrap();
    let dir = tmp.path().join("v");
    presets::write_preset(&p, &dir, &InitOptions { seed: 3, ..InitOptions::default() }).unwrap();
    let be = Be::new();
    let v = LoadedVision::load(&be, &dir).unwrap();
    assert_eq!(PresetModel::Vision(v.tower.cfg.clone()), p.model);
    let img = vec![0.1f32; 3 * 28 * 28];
    let out = v.tower.forward(&be, &v.weights, &[&img], 3).unwrap();
    assert!(be.download(out.last_hidden_state.as_ref().unwrap()).unwrap().iter().all(|x| x.is_finite()));
    // The published layout: names under vision_model., the pooling head present.
    let src = WeightSource::open(&dir).unwrap();
    assert!(src.info("vision_model.head.attention.in_proj_weight").is_some());
    assert!(src.info("vision_model.embeddings.patch_embedding.weight").is_some());
    check_values(&dir, &p, 3, StoreDtype::Bf16);
    let pre = kd_engine::data::ImageProcessorConfig::for_tower(&dir, 28).unwrap();
    assert_eq!((pre.height, pre.width, pre.mean, pre.std), (28, 28, [0.5; 3], [0.5; 3]));
}

/// Real presets, scaled down through the CLI's test hook, load through the real loaders.
#[test]
fn cli_writes_scaled_down_real_presets() {
    let tmp = tempfile::tempdir().unwrap();
    let be = Be::new();
    let q = tmp.path().join("q4b");
    let (ok, _, err) = kd(&["init", "--preset", "qwen1.5-4b", "--out", q.to_str().unwrap(), "--scale-down", "64", "--max-shard-size", "300KB", "--seed", "1"]);
    assert!(ok, "{err}");
    assert!(q.join("model.safetensors.index.json").is_file(), "{err}");
    let llm = LoadedLlm::load(&be, &q, "").unwrap();
    assert_eq!(llm.model.cfg.head_dim, 128);
    assert_eq!(llm.model.cfg.rope_theta, 5e6);
    assert_eq!(llm.model.cfg.vocab, 151936 / 64);
    let v = tmp.path().join("siglip");
    let (ok, _, err) = kd(&["init", "--preset", "siglip-so400m-patch14-384", "--out", v.to_str().unwrap(), "--scale-down", "16", "--dtype", "f32"]);
    assert!(ok, "{err}");
    let t = LoadedVision::load(&be, &v).unwrap();
    assert_eq!((t.tower.cfg.hidden, t.tower.cfg.patch_size, t.tower.cfg.image_size), (72, 14, 98));
    // The target must be new or empty; an unknown preset lists the presets.
    let (ok, _, err) = kd(&["init", "--preset", "tiny-qwen2", "--out", v.to_str().unwrap()]);
    assert!(!ok && err.contains("not empty"), "{err}");
    let (ok, _, err) = kd(&["init", "--preset", "qwen9-1b", "--out", tmp.path().join("x").to_str().unwrap()]);
    assert!(!ok && err.contains("unknown preset") && err.contains("qwen2.5-7b"), "{err}");
    let (ok, _, err) = kd(&["init", "--preset", "tiny-qwen2", "--out", tmp.path().join("y").to_str().unwrap(), "--max-shard-size", "5XB"]);
    assert!(!ok && err.contains("unknown unit"), "{err}");
}

#[test]
fn initialisation_is_a_pure_function_of_seed_name_and_index() {
    assert_eq!(init_kind("model.layers.3.input_layernorm.weight"), InitKind::Ones);
    assert_eq!(init_kind("model.norm.weight"), InitKind::Ones);
    assert_eq!(init_kind("vision_model.encoder.layers.0.layer_norm2.weight"), InitKind::Ones);
    assert_eq!(init_kind("vision_model.head.attention.in_proj_bias"), InitKind::Zeros);
    assert_eq!(init_kind("model.layers.0.self_attn.q_proj.bias"), InitKind::Zeros);
    assert_eq!(init_kind("model.embed_tokens.weight"), InitKind::Normal);
    assert_eq!(init_kind("vision_model.head.probe"), InitKind::Normal);
    let a = init_values(5, "lm_head.weight", 200_001);
    assert_eq!(a, init_values(5, "lm_head.weight", 200_001));
    assert_eq!(&a[..1000], &init_values(5, "lm_head.weight", 1000)[..], "a prefix does not depend on the length");
    assert_ne!(a[..1000], init_values(6, "lm_head.weight", 1000)[..]);
    assert_ne!(a[..1000], init_values(5, "model.embed_tokens.weight", 1000)[..]);
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
    let std = (a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
    assert!(mean.abs() < 3e-4 && (std - 0.02).abs() < 3e-4, "mean {mean}, std {std}");
}

#[test]
fn shards_are_planned_as_transformers_does() {
    assert_eq!(plan_shards(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
    assert_eq!(plan_shards(&[10, 1, 1], 8), vec![vec![0], vec![1, 2]], "an oversized tensor gets its own shard");
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("300KB").unwrap(), 300_000);
    // The real checkpoints shard as published: 4B in 2 files, 7B in 4 (bf16, 5 GB shards).
    for (name, shards) in [("qwen1.5-0.5b", 1), ("qwen1.5-1.8b", 1), ("qwen1.5-4b", 2), ("qwen2.5-3b", 2), ("qwen2.5-7b", 4)] {
        let sizes: Vec<u64> = presets::find(name).unwrap().tensors().iter().map(|s| s.numel() as u64 * 2).collect();
        assert_eq!(plan_shards(&sizes, presets::DEFAULT_MAX_SHARD_BYTES).len(), shards, "{name}");
    }
}
