//! Shared by the eval/compare/generate CLI tests: tiny random MLLM folders exported as Hugging
//! Face LLaVA (with the study's word-level tokenizer, so answers decode to words), solid-colour
//! test images and question files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::GeluKind;
use kd_engine::data::synthetic::{encode_png, tokenizer_json};
use kd_engine::data::RgbImage;
use kd_engine::model::{export_llava, Arch, ExportOptions, FeatureSelect, Llm, LlmConfig, Mllm, MllmWeights, ParamSet, ParamSpec, VisionConfig, VisionTower};
use kd_engine::weights::StoreDtype;

pub type Be = CpuBackend<f32>;

/// splitmix64, as tests/common's TestRng.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
}

fn random_set(be: &Be, specs: &[ParamSpec], rng: &mut Rng) -> ParamSet<Vec<f32>> {
    ParamSet::from_fn(be, specs, |s| {
        let n = s.numel();
        if s.name.contains("norm") && s.name.ends_with("weight") {
            (0..n).map(|_| 1.0 + 0.5 * rng.uniform()).collect()
        } else if s.shape.len() == 1 {
            (0..n).map(|_| 0.1 * rng.uniform()).collect()
        } else {
            (0..n).map(|_| 0.2 * rng.uniform()).collect()
        }
    })
    .unwrap()
}

/// Exports a tiny random Qwen2 + SigLIP MLLM (image 28 px, 15 visual tokens) with the study
/// tokenizer into `dir`; `seed` picks the weights, so two seeds answer differently.
pub fn tiny_mllm_folder(dir: &Path, seed: u64) -> PathBuf {
    let be = Be::new();
    let tok_dir = dir.with_extension("tokenizer");
    std::fs::create_dir_all(&tok_dir).unwrap();
    std::fs::write(tok_dir.join("tokenizer.json"), tokenizer_json().unwrap()).unwrap();
    let vocab = kd_engine::data::synthetic::study_tokenizer().unwrap().get_vocab_size(true);
    let vision = VisionConfig { hidden: 48, intermediate: 80, layers: 3, heads: 4, channels: 3, image_size: 28, patch_size: 7, ln_eps: 1e-6, act: GeluKind::Tanh };
    let llm = LlmConfig {
        arch: Arch::Qwen2,
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab,
        rms_eps: 1e-6,
        rope_theta: 1e4,
        tie_embeddings: true,
        qkv_bias: true,
        o_bias: false,
    };
    let m = Mllm::new(VisionTower::new(vision), Llm::new(llm), -2, FeatureSelect::Patch).unwrap();
    let mut rng = Rng(seed);
    let w = MllmWeights {
        vision: random_set(&be, &m.vision.specs, &mut rng),
        projector: random_set(&be, &m.projector.specs, &mut rng),
        llm: random_set(&be, &m.llm.specs, &mut rng),
    };
    let opts = ExportOptions { tokenizer: Some(&tok_dir), dtype: StoreDtype::F32, ..Default::default() };
    export_llava(&be, dir, &m, &w, &opts).unwrap();
    dir.to_path_buf()
}

/// A solid-colour PNG of `size`×`size` pixels.
pub fn solid_png(path: &Path, rgb: [u8; 3], size: u32) {
    let data: Vec<u8> = (0..size * size).flat_map(|_| rgb).collect();
    let img = RgbImage::new(size, size, data).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, encode_png(&img).unwrap()).unwrap();
}

/// An image with a red left half and a blue right half.
pub fn split_png(path: &Path, size: u32) {
    let data: Vec<u8> = (0..size * size).flat_map(|i| if i % size < size / 2 { [255, 0, 0] } else { [0, 0, 255] }).collect();
    std::fs::write(path, encode_png(&RgbImage::new(size, size, data).unwrap()).unwrap()).unwrap();
}

pub fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kd-engine"))
}

/// Runs the binary; returns (success, stdout, stderr).
pub fn run(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = std::process::Command::new(bin()).args(args).output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[macro_export]
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new(&$a)),*] };
}
