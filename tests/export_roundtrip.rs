//! Exporting the student as one Hugging Face `LlavaForConditionalGeneration` folder and reading
//! single-folder LLaVA checkpoints back (`kd_engine::model::export`):
//!
//! * export → `load_llava` round trips (tied and untied, f32 and bf16, both feature selections)
//!   give identical weights and identical logits, with the config keys transformers needs;
//! * folders saved by transformers 5.17 itself and a TinyLLaVA-layout folder
//!   (tests/fixtures/make_llava_fixtures.py) load and reproduce transformers' logits;
//! * tokenizer handling (`<image>` id choice) and bad input give clear errors.
//!
//! `python_check_bundle` (ignored) is the Rust half of `scripts/check_hf_export.py`.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, max_rel_diff, TestRng};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::GeluKind;
use kd_engine::data::{load_rgb, load_tokenizer, preprocess};
use kd_engine::model::{
    export_llava, load_llava, mllm_logits, Arch, ExportOptions, FeatureSelect, LlavaLayout, Llm, LlmConfig, Mllm,
    MllmWeights, ParamSet, ParamSpec, VisionConfig, VisionTower,
};
use kd_engine::weights::{write_safetensors, NamedTensor, StoreDtype, WeightSource};
use serde_json::Value;

type Be = CpuBackend<f32>;

fn vision_cfg() -> VisionConfig {
    VisionConfig {
        hidden: 48,
        intermediate: 80,
        layers: 3,
        heads: 4,
        channels: 3,
        image_size: 28,
        patch_size: 7,
        ln_eps: 1e-6,
        act: GeluKind::Tanh,
    }
}

fn llm_cfg(arch: Arch, tied: bool, vocab: usize) -> LlmConfig {
    let llama = arch == Arch::Llama;
    LlmConfig {
        arch,
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: if llama { 32 } else { 16 },
        vocab,
        rms_eps: 1e-6,
        rope_theta: 1e6,
        tie_embeddings: tied,
        qkv_bias: !llama,
        o_bias: false,
    }
}

fn tiny_mllm(arch: Arch, tied: bool, vocab: usize, layer: i64, select: FeatureSelect) -> Mllm {
    Mllm::new(VisionTower::new(vision_cfg()), Llm::new(llm_cfg(arch, tied, vocab)), layer, select).unwrap()
}

/// Random weights: matrices N-ish(0, 0.1²), norm weights in [0.5, 1.5), biases ±0.1.
fn random_set(be: &Be, specs: &[ParamSpec], rng: &mut TestRng) -> ParamSet<Vec<f32>> {
    ParamSet::from_fn(be, specs, |s| {
        let n = s.numel();
        let norm = s.name.contains("norm") && s.name.ends_with("weight");
        if norm {
            (0..n).map(|_| 1.0 + 0.5 * rng.uniform() as f32).collect()
        } else if s.shape.len() == 1 {
            (0..n).map(|_| 0.1 * rng.uniform() as f32).collect()
        } else {
            (0..n).map(|_| 0.17 * rng.uniform() as f32).collect()
        }
    })
    .unwrap()
}

fn random_weights(be: &Be, m: &Mllm, seed: u64) -> MllmWeights<Vec<f32>> {
    let mut rng = TestRng(seed);
    MllmWeights {
        vision: random_set(be, &m.vision.specs, &mut rng),
        projector: random_set(be, &m.projector.specs, &mut rng),
        llm: random_set(be, &m.llm.specs, &mut rng),
    }
}

fn pixels(seed: u64) -> Vec<f32> {
    let mut rng = TestRng(seed);
    (0..3 * 28 * 28).map(|_| rng.uniform() as f32).collect()
}

/// prefix, the image block, suffix; never the image id elsewhere.
fn ids_with_image(vocab: usize, image: u32, n_image: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = vec![3, vocab as u32 - 1, 0];
    ids.extend(std::iter::repeat(image).take(n_image));
    ids.extend([17, 42, 5, 99, 0, 7]);
    ids
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn all_bufs(w: &MllmWeights<Vec<f32>>) -> Vec<(String, Vec<f32>)> {
    [("vision", &w.vision), ("projector", &w.projector), ("llm", &w.llm)]
        .into_iter()
        .flat_map(|(part, set)| set.specs.iter().zip(&set.bufs).map(move |(s, b)| (format!("{part}:{}", s.name), b.clone())))
        .collect()
}

fn export_no_tokenizer(be: &Be, dir: &Path, m: &Mllm, w: &MllmWeights<Vec<f32>>, image: u32, dtype: StoreDtype) {
    let opts = ExportOptions { image_token_id: Some(image), dtype, ..Default::default() };
    let summary = export_llava(be, dir, m, w, &opts).unwrap();
    assert_eq!(summary.image_token_id, image);
}

/// The keys transformers' LlavaConfig / Qwen2Config / LlamaConfig / SiglipVisionConfig need, with
/// the values the model implies.
fn check_config(dir: &Path, m: &Mllm, image: u32, dtype: &str) {
    let c = read_config(dir);
    let l = &m.llm.cfg;
    assert_eq!(c["model_type"], "llava");
    assert_eq!(c["architectures"][0], "LlavaForConditionalGeneration");
    assert_eq!(c["dtype"], dtype);
    assert_eq!(c["image_token_index"], image);
    assert_eq!(c["image_seq_length"], m.visual_tokens());
    assert_eq!(c["projector_hidden_act"], "gelu");
    assert_eq!(c["multimodal_projector_bias"], true);
    assert_eq!(c["tie_word_embeddings"], l.tie_embeddings);
    let layer = m.feature_layer as i64 - (m.vision.cfg.layers as i64 + 1);
    assert_eq!(c["vision_feature_layer"], layer);
    let strategy = if m.select == FeatureSelect::Patch { "default" } else { "full" };
    assert_eq!(c["vision_feature_select_strategy"], strategy);
    let t = &c["text_config"];
    assert_eq!(t["model_type"], if l.arch == Arch::Qwen2 { "qwen2" } else { "llama" });
    for (k, v) in [
        ("hidden_size", l.hidden),
        ("intermediate_size", l.intermediate),
        ("num_hidden_layers", l.layers),
        ("num_attention_heads", l.heads),
        ("num_key_value_heads", l.kv_heads),
        ("head_dim", l.head_dim),
        ("vocab_size", l.vocab),
    ] {
        assert_eq!(t[k], v, "text_config.{k}");
    }
    assert_eq!(t["rms_norm_eps"], 1e-6);
    assert_eq!(t["rope_parameters"]["rope_theta"], l.rope_theta);
    assert_eq!(t["rope_parameters"]["rope_type"], "default");
    assert_eq!(t["rope_theta"], l.rope_theta);
    assert_eq!(t["tie_word_embeddings"], l.tie_embeddings);
    assert_eq!(t["hidden_act"], "silu");
    let v = &c["vision_config"];
    assert_eq!(v["model_type"], "siglip_vision_model");
    for (k, x) in [
        ("hidden_size", 48),
        ("intermediate_size", 80),
        ("num_hidden_layers", 3),
        ("num_attention_heads", 4),
        ("image_size", 28),
        ("patch_size", 7),
        ("num_channels", 3),
    ] {
        assert_eq!(v[k], x, "vision_config.{k}");
    }
    assert_eq!(v["layer_norm_eps"], 1e-6);
    assert_eq!(v["hidden_act"], "gelu_pytorch_tanh");
    assert_eq!(v["vision_use_head"], false);
    let p: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap()).unwrap();
    assert_eq!(p["image_processor_type"], "SiglipImageProcessor");
    assert_eq!(p["size"]["height"], 28);
    assert_eq!(p["size"]["width"], 28);
    assert_eq!(p["resample"], 3);
    assert_eq!(p["image_mean"][0], 0.5);
}

/// Tensor names in the exported file are exactly transformers' (with the llava-hf vision prefix).
fn check_tensor_names(dir: &Path, m: &Mllm) {
    let src = WeightSource::open(dir).unwrap();
    let names: Vec<&str> = src.names().collect();
    // Hugging Face tensors, not parameters: a stacked q/k/v or gate/up parameter is written as its parts.
    let expected: usize = [&m.vision.specs, &m.projector.specs, &m.llm.specs].iter().flat_map(|s| s.iter()).map(|s| s.hf_tensors().len()).sum();
    assert_eq!(names.len(), expected);
    for n in &names {
        assert!(
            n.starts_with("language_model.model.")
                || *n == "language_model.lm_head.weight"
                || n.starts_with("vision_tower.vision_model.")
                || n.starts_with("multi_modal_projector.linear_"),
            "unexpected tensor name {n}"
        );
    }
    for n in [
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.1.self_attn.q_proj.weight",
        "language_model.model.layers.0.mlp.up_proj.weight",
        "language_model.model.norm.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias",
        "vision_tower.vision_model.post_layernorm.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
    ] {
        assert!(src.info(n).is_some(), "{n} missing");
    }
    assert_eq!(src.info("language_model.lm_head.weight").is_some(), !m.llm.cfg.tie_embeddings, "lm_head presence");
}

fn roundtrip(arch: Arch, tied: bool, layer: i64, select: FeatureSelect, dtype: StoreDtype, seed: u64) {
    let be = Be::new();
    let m = tiny_mllm(arch, tied, 256, layer, select);
    let w = random_weights(&be, &m, seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("student");
    export_no_tokenizer(&be, &dir, &m, &w, 250, dtype);
    check_config(&dir, &m, 250, dtype.torch_name());
    check_tensor_names(&dir, &m);
    // Nothing but the folder is left behind.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("student")]);

    let back = load_llava(&be, &dir).unwrap();
    assert_eq!(back.layout, LlavaLayout::HfLlava);
    assert_eq!(back.image_token_id, Some(250));
    assert_eq!(back.mllm.feature_layer, m.feature_layer);
    assert_eq!(back.mllm.select, m.select);
    assert_eq!(back.mllm.llm.cfg, m.llm.cfg);
    assert_eq!(back.mllm.vision.cfg, m.vision.cfg);
    assert_eq!(back.image_processor.height, 28);
    let round = |x: f32| match dtype {
        StoreDtype::F32 => x,
        StoreDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        StoreDtype::F16 => half::f16::from_f32(x).to_f32(),
    };
    let expected: Vec<_> = all_bufs(&w).into_iter().map(|(n, v)| (n, v.into_iter().map(round).collect::<Vec<_>>())).collect();
    let got = all_bufs(&back.weights);
    assert_eq!(got.len(), expected.len());
    for ((gn, gv), (en, ev)) in got.iter().zip(&expected) {
        assert_eq!(gn, en);
        assert!(gv == ev, "{gn}: weights differ after the round trip");
    }
    // Identical weights → identical logits (the same computation).
    let ids = ids_with_image(256, 250, m.visual_tokens());
    let px = pixels(seed + 1);
    let mut wr = w.clone();
    for set in [&mut wr.vision, &mut wr.projector, &mut wr.llm] {
        set.bufs.iter_mut().for_each(|b| b.iter_mut().for_each(|x| *x = round(*x)));
    }
    let want = mllm_logits(&be, &m, &wr, &ids, Some(&px), 250).unwrap();
    let have = mllm_logits(&be, &back.mllm, &back.weights, &ids, Some(&px), 250).unwrap();
    assert_eq!(have.len(), ids.len() * 256);
    assert!(have == want, "logits differ after the round trip");
    // The image matters (the features really are spliced in).
    let other = mllm_logits(&be, &back.mllm, &back.weights, &ids, Some(&pixels(seed + 2)), 250).unwrap();
    assert!(max_rel_diff(&other, &have) > 1e-3);
}

#[test]
fn roundtrip_qwen2_tied_f32() {
    roundtrip(Arch::Qwen2, true, -2, FeatureSelect::Patch, StoreDtype::F32, 11);
}

#[test]
fn roundtrip_qwen2_untied_f32() {
    roundtrip(Arch::Qwen2, false, -2, FeatureSelect::Patch, StoreDtype::F32, 12);
}

#[test]
fn roundtrip_llama_untied_bf16_full_last_layer() {
    roundtrip(Arch::Llama, false, -1, FeatureSelect::Full, StoreDtype::Bf16, 13);
}

#[test]
fn roundtrip_qwen2_tied_f16_layer_1() {
    roundtrip(Arch::Qwen2, true, 1, FeatureSelect::Patch, StoreDtype::F16, 14);
}

// ------------------------------------------------------------------------------------------------
// Folders written by transformers 5.17 itself, and TinyLLaVA's layout.
// ------------------------------------------------------------------------------------------------

struct Reference {
    ids: Vec<u32>,
    pixels: Vec<f32>,
    logits: Vec<f32>,
    image_token_id: u32,
}

fn reference(dir: &Path) -> Reference {
    let r = WeightSource::open(&dir.join("reference.safetensors")).unwrap();
    let f = |n: &str| r.read_f32(n, &r.info(n).unwrap().shape.clone()).unwrap();
    Reference {
        ids: r.read_i64("input_ids").unwrap().into_iter().map(|x| x as u32).collect(),
        pixels: f("pixel_values"),
        logits: f("logits"),
        image_token_id: r.read_i64("image_token_id").unwrap()[0] as u32,
    }
}

fn check_fixture(name: &str, layout: LlavaLayout, image_token: Option<u32>, tied: bool, select: FeatureSelect, layer: usize) {
    let be = Be::new();
    let dir = fixture(&format!("llava/{name}"));
    let l = load_llava(&be, &dir).unwrap();
    assert_eq!(l.layout, layout);
    assert_eq!(l.image_token_id, image_token);
    assert_eq!(l.mllm.llm.cfg.tie_embeddings, tied);
    assert_eq!(l.mllm.select, select);
    assert_eq!(l.mllm.feature_layer, layer);
    let r = reference(&dir);
    let got = mllm_logits(&be, &l.mllm, &l.weights, &r.ids, Some(&r.pixels), r.image_token_id).unwrap();
    let d = max_rel_diff(&got, &r.logits);
    println!("{name}: logits max rel Δ {d:.2e} over {} tokens", r.ids.len());
    assert!(d <= 1e-4, "{name}: logits differ from transformers by {d:.2e}");
}

#[test]
fn transformers_saved_qwen2_tied_matches() {
    check_fixture("hf_qwen2_tied", LlavaLayout::HfLlava, Some(250), true, FeatureSelect::Patch, 2);
}

#[test]
fn transformers_saved_llama_untied_bf16_full_matches() {
    check_fixture("hf_llama_untied_bf16", LlavaLayout::HfLlava, Some(199), false, FeatureSelect::Full, 3);
}

#[test]
fn tinyllava_layout_matches() {
    check_fixture("tinyllava_qwen2", LlavaLayout::TinyLlava, None, true, FeatureSelect::Patch, 2);
}

/// A model transformers wrote, re-exported by kd-engine and read again, computes the same logits.
#[test]
fn reexport_of_transformers_folder_is_lossless() {
    let be = Be::new();
    for name in ["hf_llama_untied_bf16", "tinyllava_qwen2"] {
        let dir = fixture(&format!("llava/{name}"));
        let l = load_llava(&be, &dir).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("again");
        let r = reference(&dir);
        export_no_tokenizer(&be, &out, &l.mllm, &l.weights, r.image_token_id, StoreDtype::F32);
        let again = load_llava(&be, &out).unwrap();
        let a = mllm_logits(&be, &l.mllm, &l.weights, &r.ids, Some(&r.pixels), r.image_token_id).unwrap();
        let b = mllm_logits(&be, &again.mllm, &again.weights, &r.ids, Some(&r.pixels), r.image_token_id).unwrap();
        assert!(a == b, "{name}: logits changed by the re-export");
    }
}

// ------------------------------------------------------------------------------------------------
// Tokenizer and the <image> id.
// ------------------------------------------------------------------------------------------------

/// A tiny word-level tokenizer (ids 0..n_words, then `<|endoftext|>`).
fn write_tiny_tokenizer(dir: &Path, n_words: usize) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    vocab.insert("hello".into(), 1.into());
    for i in 2..n_words {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": n_words, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    dir.to_path_buf()
}

#[test]
fn tokenizer_gets_image_token_after_its_vocabulary() {
    let be = Be::new();
    let m = tiny_mllm(Arch::Qwen2, true, 256, -2, FeatureSelect::Patch);
    let w = random_weights(&be, &m, 21);
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tiny_tokenizer(&tmp.path().join("tok"), 40); // ids 0..=40 used
    let dir = tmp.path().join("student");
    let opts = ExportOptions { tokenizer: Some(&tok), dtype: StoreDtype::Bf16, ..Default::default() };
    let s = export_llava(&be, &dir, &m, &w, &opts).unwrap();
    assert_eq!(s.image_token_id, 41);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(s.files.iter().any(|x| x == f), "{f} not written: {:?}", s.files);
    }
    assert_eq!(read_config(&dir)["image_token_index"], 41);
    let t = load_tokenizer(&dir).unwrap();
    assert_eq!(t.token_to_id("<image>"), Some(41));
    let enc = t.encode("hello <image> w3", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 41, 3]);
    let tc: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(tc["eos_token"], "<|endoftext|>");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap();
    assert_eq!(g["eos_token_id"], 40);
    let p: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("processor_config.json")).unwrap()).unwrap();
    assert_eq!(p["processor_class"], "LlavaProcessor");
    assert_eq!(p["patch_size"], 7);
    assert_eq!(p["vision_feature_select_strategy"], "default");

    // Re-exporting from the exported tokenizer keeps its <image>.
    let again = tmp.path().join("again");
    let opts = ExportOptions { tokenizer: Some(&dir), image_token_id: Some(41), ..Default::default() };
    assert_eq!(export_llava(&be, &again, &m, &w, &opts).unwrap().image_token_id, 41);
    assert_eq!(load_tokenizer(&again).unwrap().token_to_id("<image>"), Some(41));

    // A source tokenizer_config.json is kept, with <image> added to its added_tokens_decoder.
    let tok_cfg = serde_json::json!({
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": "{{ messages }}", "eos_token": "<|endoftext|>",
        "added_tokens_decoder": {"40": {"content": "<|endoftext|>", "lstrip": false, "normalized": false,
                                         "rstrip": false, "single_word": false, "special": true}},
    });
    std::fs::write(tok.join("tokenizer_config.json"), tok_cfg.to_string()).unwrap();
    let with_cfg = tmp.path().join("with_cfg");
    let opts = ExportOptions { tokenizer: Some(&tok), ..Default::default() };
    export_llava(&be, &with_cfg, &m, &w, &opts).unwrap();
    let tc: Value = serde_json::from_str(&std::fs::read_to_string(with_cfg.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["tokenizer_class"], "Qwen2Tokenizer");
    assert_eq!(tc["chat_template"], "{{ messages }}");
    assert_eq!(tc["added_tokens_decoder"]["41"]["content"], "<image>");
    assert_eq!(tc["added_tokens_decoder"]["41"]["special"], true);
    assert_eq!(tc["added_tokens_decoder"]["40"]["content"], "<|endoftext|>");

    // Another id than the tokenizer's next one cannot be honoured.
    let opts = ExportOptions { tokenizer: Some(&tok), image_token_id: Some(100), ..Default::default() };
    let err = format!("{:#}", export_llava(&be, &tmp.path().join("x"), &m, &w, &opts).unwrap_err());
    assert!(err.contains("image_token_id 100") && err.contains("41"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn no_free_embedding_row_is_a_clear_error() {
    let be = Be::new();
    let m = tiny_mllm(Arch::Qwen2, true, 256, -2, FeatureSelect::Patch);
    let w = random_weights(&be, &m, 22);
    let tmp = tempfile::tempdir().unwrap();
    let tok = write_tiny_tokenizer(&tmp.path().join("tok"), 255); // ids 0..=255: every row used
    let opts = ExportOptions { tokenizer: Some(&tok), ..Default::default() };
    let err = format!("{:#}", export_llava(&be, &tmp.path().join("out"), &m, &w, &opts).unwrap_err());
    assert!(err.contains("no free embedding row") && err.contains("256 rows"), "{err}");
    // Without a tokenizer the id must be given, and inside the matrix.
    let err = format!("{:#}", export_llava(&be, &tmp.path().join("out"), &m, &w, &ExportOptions::default()).unwrap_err());
    assert!(err.contains("give a tokenizer or an image_token_id"), "{err}");
    let opts = ExportOptions { image_token_id: Some(256), ..Default::default() };
    let err = format!("{:#}", export_llava(&be, &tmp.path().join("out"), &m, &w, &opts).unwrap_err());
    assert!(err.contains("outside the 256-row"), "{err}");
    assert!(!tmp.path().join("out").exists());
}

#[test]
fn existing_target_is_never_overwritten() {
    let be = Be::new();
    let m = tiny_mllm(Arch::Qwen2, true, 256, -2, FeatureSelect::Patch);
    let w = random_weights(&be, &m, 23);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("student");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let opts = ExportOptions { image_token_id: Some(250), ..Default::default() };
    let err = format!("{:#}", export_llava(&be, &dir, &m, &w, &opts).unwrap_err());
    assert!(err.contains("already exists and is not empty") && err.contains("student"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("keep.txt")).unwrap(), "mine");
    // An empty folder is fine; nested parents are created.
    std::fs::remove_file(dir.join("keep.txt")).unwrap();
    export_llava(&be, &dir, &m, &w, &opts).unwrap();
    export_llava(&be, &tmp.path().join("a/b/c"), &m, &w, &opts).unwrap();
    assert!(load_llava(&be, &tmp.path().join("a/b/c")).is_ok());
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "temporary folder left behind: {names:?}");
}

// ------------------------------------------------------------------------------------------------
// Bad input.
// ------------------------------------------------------------------------------------------------

/// A copy of a fixture folder whose weights lack the tensors `drop` selects, all stored as f32.
fn copy_without(src: &Path, dst: &Path, drop: impl Fn(&str) -> bool) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let s = WeightSource::open(src).unwrap();
    let kept: Vec<(String, Vec<usize>, Vec<f32>)> = s
        .names()
        .filter(|n| !drop(n))
        .map(|n| {
            let shape = s.info(n).unwrap().shape.clone();
            (n.to_string(), shape.clone(), s.read_f32(n, &shape).unwrap())
        })
        .collect();
    let tensors: Vec<NamedTensor> = kept.iter().map(|(n, sh, d)| NamedTensor { name: n.clone(), shape: sh.clone(), data: d }).collect();
    write_safetensors(&dst.join("model.safetensors"), &tensors).unwrap();
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_llava(&Be::new(), dir).err().expect("loading should fail"))
}

#[test]
fn missing_projector_tensor_names_folder_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broken_llava");
    copy_without(&fixture("llava/hf_qwen2_tied"), &dir, |n| n == "multi_modal_projector.linear_2.bias");
    let err = load_err(&dir);
    assert!(err.contains("broken_llava") && err.contains("projector") && err.contains("multi_modal_projector.linear_2.bias"), "{err}");
    assert!(err.contains("missing"), "{err}");

    let dir = tmp.path().join("no_projector");
    copy_without(&fixture("llava/hf_qwen2_tied"), &dir, |n| n.starts_with("multi_modal_projector."));
    let err = load_err(&dir);
    assert!(err.contains("no_projector") && err.contains("no projector weights"), "{err}");

    let dir = tmp.path().join("tiny_no_connector");
    copy_without(&fixture("llava/tinyllava_qwen2"), &dir, |n| n == "connector._connector.2.weight");
    let err = load_err(&dir);
    assert!(err.contains("tiny_no_connector") && err.contains("connector._connector.2.weight"), "{err}");

    let dir = tmp.path().join("untied_no_head");
    copy_without(&fixture("llava/hf_llama_untied_bf16"), &dir, |n| n == "language_model.lm_head.weight");
    let err = load_err(&dir);
    assert!(err.contains("untied_no_head") && err.contains("language_model.lm_head.weight"), "{err}");
}

#[test]
fn unknown_layouts_and_configs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("llava/hf_qwen2_tied");
    let edit = |name: &str, f: &dyn Fn(&mut Value)| -> PathBuf {
        let dir = tmp.path().join(name);
        copy_without(&base, &dir, |_| false);
        let mut c = read_config(&dir);
        f(&mut c);
        std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        dir
    };
    let dir = edit("plain_qwen", &|c| c["model_type"] = "qwen2".into());
    let err = load_err(&dir);
    assert!(err.contains("plain_qwen") && err.contains("unknown checkpoint layout") && err.contains("qwen2"), "{err}");

    let dir = edit("clip_tower", &|c| c["vision_config"]["model_type"] = "clip_vision_model".into());
    let err = load_err(&dir);
    assert!(err.contains("clip_tower") && err.contains("clip_vision_model") && err.contains("SigLIP"), "{err}");

    let dir = edit("relu_projector", &|c| c["projector_hidden_act"] = "relu".into());
    assert!(load_err(&dir).contains("projector_hidden_act \"relu\""));

    let dir = edit("two_layers", &|c| c["vision_feature_layer"] = serde_json::json!([-2, -1]));
    assert!(load_err(&dir).contains("several layers"));

    let dir = edit("bad_layer", &|c| c["vision_feature_layer"] = (-9).into());
    assert!(load_err(&dir).contains("out of range"));

    let dir = tmp.path().join("empty");
    std::fs::create_dir(&dir).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("empty") && err.contains("no config.json"), "{err}");

    // TinyLLaVA with another connector.
    let dir = tmp.path().join("tiny_resampler");
    copy_without(&fixture("llava/tinyllava_qwen2"), &dir, |_| false);
    let mut c = read_config(&dir);
    c["connector_type"] = "resampler".into();
    std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    let err = load_err(&dir);
    assert!(err.contains("tiny_resampler") && err.contains("connector_type \"resampler\""), "{err}");
}

#[test]
fn mllm_logits_checks_its_inputs() {
    let be = Be::new();
    let m = tiny_mllm(Arch::Qwen2, true, 256, -2, FeatureSelect::Patch);
    let w = random_weights(&be, &m, 31);
    let px = pixels(1);
    // Too few image positions for the tower's 15 tokens.
    let err = mllm_logits(&be, &m, &w, &ids_with_image(256, 250, 14), Some(&px), 250).unwrap_err().to_string();
    assert!(err.contains("14 positions") && err.contains("15 tokens"), "{err}");
    // Image positions without an image.
    assert!(mllm_logits(&be, &m, &w, &ids_with_image(256, 250, 15), None, 250).is_err());
    // Text only is fine.
    let out = mllm_logits(&be, &m, &w, &[1, 2, 3], None, 250).unwrap();
    assert_eq!(out.len(), 3 * 256);
    assert!(mllm_logits(&be, &m, &w, &[1, 256], None, 250).unwrap_err().to_string().contains("outside the vocabulary"));
}

// ------------------------------------------------------------------------------------------------
// The Rust half of scripts/check_hf_export.py.
// ------------------------------------------------------------------------------------------------

/// Run by `scripts/check_hf_export.py` (see there). Environment:
/// * `KD_EXPORT_CHECK_WORK` (required): folder for the outputs;
/// * `KD_EXPORT_CHECK_MODEL`: an exported folder to check; unset: export a tiny random student
///   (SigLIP + Qwen2, untied, bf16, layer −2, "default"; or with `KD_EXPORT_CHECK_VARIANT=llama`:
///   LLaMA, tied, f16, layer −3, "full") with the real Qwen tokenizer from `../shared` (or a tiny
///   word-level one when absent) to `$WORK/model`;
/// * `KD_EXPORT_CHECK_IMAGE`, `KD_EXPORT_CHECK_PROMPT`: the input (prompt holds one `<image>`).
///
/// Writes `$WORK/kd_reference.safetensors`: `input_ids` I64 [T] (the `<image>` id expanded to
/// `image_seq_length` copies), `pixel_values` F32 [3, H, W] (kd-engine's preprocessing), `logits`
/// F32 [T, V] (kd-engine's CPU forward, f32).
#[test]
#[ignore = "run by scripts/check_hf_export.py"]
fn python_check_bundle() {
    let work = PathBuf::from(std::env::var("KD_EXPORT_CHECK_WORK").expect("set KD_EXPORT_CHECK_WORK"));
    std::fs::create_dir_all(&work).unwrap();
    let be = Be::new();
    let model = match std::env::var("KD_EXPORT_CHECK_MODEL") {
        Ok(m) if !m.is_empty() => PathBuf::from(m),
        _ => {
            let dir = work.join("model");
            if dir.exists() {
                std::fs::remove_dir_all(&dir).unwrap();
            }
            let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/qwen2-tokenizer");
            let (tok, vocab) = if shared.join("tokenizer.json").is_file() {
                (shared, 151936)
            } else {
                println!("../shared/data/qwen2-tokenizer is absent: using a tiny word-level tokenizer");
                (write_tiny_tokenizer(&work.join("tiny_tokenizer"), 200), 256)
            };
            // The default variant is the LLaVA-KD student's shape; "llama" exercises the other paths.
            let llama = std::env::var("KD_EXPORT_CHECK_VARIANT").as_deref() == Ok("llama");
            let (m, dtype) = if llama {
                (tiny_mllm(Arch::Llama, true, vocab, -3, FeatureSelect::Full), StoreDtype::F16)
            } else {
                (tiny_mllm(Arch::Qwen2, false, vocab, -2, FeatureSelect::Patch), StoreDtype::Bf16)
            };
            let w = random_weights(&be, &m, 77);
            let opts = ExportOptions { tokenizer: Some(&tok), dtype, ..Default::default() };
            let s = export_llava(&be, &dir, &m, &w, &opts).unwrap();
            println!("exported a tiny student to {} (<image> = {})", dir.display(), s.image_token_id);
            dir
        }
    };
    let image = std::env::var("KD_EXPORT_CHECK_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| fixture("data/images/chelsea_strip.png"));
    let prompt = std::env::var("KD_EXPORT_CHECK_PROMPT").unwrap_or_else(|_| "<image>\nWhat is in the picture?".into());

    let l = load_llava(&be, &model).unwrap();
    let image_id = l.image_token_id.expect("an HF LLaVA folder has an image token");
    let tok = load_tokenizer(&model).unwrap();
    let enc = tok.encode(prompt.as_str(), true).unwrap();
    let mut ids = Vec::new();
    for &id in enc.get_ids() {
        if id == image_id {
            ids.extend(std::iter::repeat(id).take(l.mllm.visual_tokens()));
        } else {
            ids.push(id);
        }
    }
    let px = preprocess(&load_rgb(&image).unwrap(), &l.image_processor).unwrap();
    let logits = mllm_logits(&be, &l.mllm, &l.weights, &ids, Some(&px), image_id).unwrap();

    let ids64: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let f32b = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let (pxb, lgb) = (f32b(&px), f32b(&logits));
    let (h, w) = (l.image_processor.height as usize, l.image_processor.width as usize);
    let vocab = l.mllm.llm.cfg.vocab;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let views = vec![
        ("input_ids".to_string(), TensorView::new(Dtype::I64, vec![ids.len()], &ids64).unwrap()),
        ("pixel_values".to_string(), TensorView::new(Dtype::F32, vec![3, h, w], &pxb).unwrap()),
        ("logits".to_string(), TensorView::new(Dtype::F32, vec![ids.len(), vocab], &lgb).unwrap()),
    ];
    let out = work.join("kd_reference.safetensors");
    safetensors::serialize_to_file(views, None, &out).unwrap();
    println!("model {}\nwrote {} ({} tokens, {} image tokens, vocab {vocab})", model.display(), out.display(), ids.len(), l.mllm.visual_tokens());
}
