//! Golden tests: kd-engine's f32 CPU logits against transformers' (tests/fixtures/make_fixtures.py).

mod common;

use common::{fixture, max_rel_diff};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::Backend;
use kd_engine::model::{LoadedLlm, SeqLayout};
use kd_engine::weights::WeightSource;

const TOL: f64 = 1e-4;

fn reference(name: &str) -> (Vec<u32>, Vec<f32>, Vec<u32>, Vec<f32>) {
    let r = WeightSource::open(&fixture(&format!("llm/{name}/reference.safetensors"))).unwrap();
    let ids = |n: &str| r.read_i64(n).unwrap().into_iter().map(|x| x as u32).collect::<Vec<_>>();
    let logits = |n: &str| {
        let shape = r.info(n).unwrap().shape.clone();
        r.read_f32(n, &shape).unwrap()
    };
    (ids("input_ids"), logits("logits"), ids("input_ids_b"), logits("logits_b"))
}

fn check_model(name: &str) {
    let be = CpuBackend::<f32>::new();
    let llm = LoadedLlm::load(&be, &fixture(&format!("llm/{name}")), "").unwrap();
    let (ids_a, ref_a, ids_b, ref_b) = reference(name);

    let got_a = be.download(&llm.logits(&be, &ids_a).unwrap()).unwrap();
    let d_a = max_rel_diff(&got_a, &ref_a);
    println!("{name}: sequence a, max|Δ|/max|ref| = {d_a:.2e}");
    assert!(d_a <= TOL, "{name}: logits differ from transformers by {d_a:.2e} (> {TOL:.0e})");

    // Both sequences packed into one batch: each must see only itself.
    let ids: Vec<u32> = ids_a.iter().chain(&ids_b).copied().collect();
    let layout = SeqLayout::from_lens(&[ids_a.len(), ids_b.len()]);
    let x = llm.model.embed(&be, &llm.weights, &ids).unwrap();
    let acts = llm.model.forward(&be, &llm.weights, x, &layout).unwrap();
    let packed = be.download(&llm.model.lm_head(&be, &llm.weights, &acts.hidden).unwrap()).unwrap();
    let (pa, pb) = packed.split_at(ref_a.len());
    let d_pa = max_rel_diff(pa, &ref_a);
    let d_pb = max_rel_diff(pb, &ref_b);
    println!("{name}: packed batch, max rel Δ a {d_pa:.2e}, b {d_pb:.2e}");
    assert!(d_pa <= TOL && d_pb <= TOL, "{name}: packed logits differ ({d_pa:.2e}, {d_pb:.2e})");
}

#[test]
fn qwen2_gqa_tied_matches_transformers() {
    check_model("qwen2_gqa_tied");
}

#[test]
fn qwen2_untied_sharded_bf16_transformers4_config_matches_transformers() {
    check_model("qwen2_untied_sharded_bf16");
}

#[test]
fn llama_f16_explicit_head_dim_matches_transformers() {
    check_model("llama_f16");
}

#[test]
fn qwen2_long_sequence_matches_transformers() {
    check_model("qwen2_tied_long");
}
