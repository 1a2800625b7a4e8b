//! AdamW against `torch.optim.AdamW` + `clip_grad_norm_` (fixture), and a few training steps of a
//! tiny decoder lowering its loss.

mod common;

use common::{fixture, TestRng};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{Backend, IGNORE_INDEX};
use kd_engine::model::{Arch, Llm, LlmConfig, ParamSet, ParamSpec, SeqLayout};
use kd_engine::optim::{AdamW, AdamWConfig};
use kd_engine::weights::WeightSource;

#[test]
fn adamw_with_clipping_matches_torch_trajectory() {
    let r = WeightSource::open(&fixture("adamw/reference.safetensors")).unwrap();
    let read = |n: &str| {
        let shape = r.info(n).unwrap().shape.clone();
        r.read_f32(n, &shape).unwrap()
    };
    let (w0, b0) = (read("w0"), read("b0"));
    let (gw, gb) = (read("grad_w"), read("grad_b"));
    let (wa, ba) = (read("w_after"), read("b_after"));
    let norms = read("total_norm");
    let (nw, nb) = (w0.len(), b0.len());
    let be = CpuBackend::<f32>::new();
    let specs = vec![ParamSpec::matrix("w".into(), nw, 1), ParamSpec::vector("b".into(), nb)];
    let mut params = ParamSet { specs: specs.clone(), bufs: vec![w0, b0] };
    let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let mut opt = AdamW::new(&be, &[&params], cfg).unwrap();
    let mut clipped = 0;
    for s in 0..norms.len() {
        let grads = ParamSet { specs: specs.clone(), bufs: vec![gw[s * nw..][..nw].to_vec(), gb[s * nb..][..nb].to_vec()] };
        let rep = opt.step(&be, &mut [&mut params], &[&grads], 1e-2).unwrap();
        assert!(!rep.skipped);
        assert!((rep.grad_norm - norms[s] as f64).abs() <= 1e-6 * norms[s] as f64, "step {s}: norm {}", rep.grad_norm);
        clipped += (rep.clip_coef < 1.0) as usize;
        for (name, got, want) in [("w", &params.bufs[0], &wa[s * nw..][..nw]), ("b", &params.bufs[1], &ba[s * nb..][..nb])] {
            for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
                assert!((g - w).abs() <= 2e-6 * w.abs().max(1e-2), "step {s} {name}[{i}]: {g} vs torch {w}");
            }
        }
    }
    assert_eq!(clipped, 3, "the fixture clips on three of its six steps");
}

#[test]
fn adamw_skips_a_step_with_non_finite_gradients() {
    let be = CpuBackend::<f32>::new();
    let specs = vec![ParamSpec::vector("b".into(), 3)];
    let mut params = ParamSet { specs: specs.clone(), bufs: vec![vec![1.0, 2.0, 3.0]] };
    let mut opt = AdamW::new(&be, &[&params], AdamWConfig::default()).unwrap();
    let grads = ParamSet { specs, bufs: vec![vec![0.1, f32::NAN, 0.2]] };
    let rep = opt.step(&be, &mut [&mut params], &[&grads], 1e-2).unwrap();
    assert!(rep.skipped);
    assert_eq!(params.bufs[0], vec![1.0, 2.0, 3.0]);
    assert_eq!(opt.step, 0);
}

#[test]
fn a_few_adamw_steps_lower_a_tiny_decoders_loss() {
    let be = CpuBackend::<f32>::new();
    let cfg = LlmConfig {
        arch: Arch::Qwen2,
        hidden: 32,
        intermediate: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        vocab: 50,
        rms_eps: 1e-6,
        rope_theta: 10000.0,
        tie_embeddings: true,
        qkv_bias: true,
        o_bias: false,
    };
    let model = Llm::new(cfg);
    let mut rng = TestRng(3);
    let mut w = ParamSet::from_fn(&be, &model.specs, |s| {
        let base = if s.name.contains("norm") { 1.0 } else { 0.0 };
        (0..s.numel()).map(|_| (base + rng.uniform() * 0.1) as f32).collect()
    })
    .unwrap();
    // A repeating pattern the model can learn.
    let ids: Vec<u32> = (0..24).map(|i| [3u32, 17, 29, 41][i % 4]).collect();
    let targets: Vec<i32> = (0..24).map(|i| if i + 1 < 24 { ids[i + 1] as i32 } else { IGNORE_INDEX }).collect();
    let layout = SeqLayout::from_lens(&[24]);
    let mut opt = AdamW::new(&be, &[&w], AdamWConfig::default()).unwrap();
    let mut grads = ParamSet::zeros(&be, &model.specs).unwrap();
    let mut losses = Vec::new();
    for _ in 0..15 {
        grads.zero_all(&be).unwrap();
        let x = model.embed(&be, &w, &ids).unwrap();
        let acts = model.forward(&be, &w, x, &layout).unwrap();
        let logits = model.lm_head(&be, &w, &acts.hidden).unwrap();
        let mut dl = be.zeros(logits.len()).unwrap();
        let loss = be.cross_entropy(&logits, &targets, 50, 1.0 / 23.0, &mut dl).unwrap() / 23.0;
        losses.push(loss);
        let dh = model.lm_head_backward(&be, &w, &acts.hidden, &dl, Some(&mut grads)).unwrap();
        let dx = model.backward(&be, &w, &acts, &dh, Some(&mut grads)).unwrap();
        model.embed_backward(&be, &mut grads, &ids, &dx).unwrap();
        opt.step(&be, &mut [&mut w], &[&grads], 1e-2).unwrap();
    }
    println!("losses: {losses:?}");
    assert!(losses[0] > 3.5, "starts near ln(50): {}", losses[0]);
    assert!(losses.windows(2).all(|p| p[1] < p[0]), "loss must fall every step: {losses:?}");
    assert!(*losses.last().unwrap() < 0.5 * losses[0], "loss must at least halve: {losses:?}");
}
