//! Finite-difference check (f64) from the loss back to the projector weights through a frozen
//! decoder with spliced visual tokens, and to the LLM weights when it trains too.

mod common;

use common::{check_grad, TestRng};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{Backend, IGNORE_INDEX};
use kd_engine::data::{Group, PackedBatch};
use kd_engine::model::{find_hf, Arch, FeatureSelect, GradsReady, Llm, LlmConfig, Mllm, MllmGrads, MllmWeights, ParamSet, VisionConfig, VisionTower};
use kd_engine::backend::GeluKind;

type B = CpuBackend<f64>;

fn model() -> Mllm {
    let vision = VisionTower::new(VisionConfig {
        hidden: 8,
        intermediate: 12,
        layers: 2,
        heads: 2,
        channels: 3,
        image_size: 8,
        patch_size: 4,
        ln_eps: 1e-6,
        act: GeluKind::Tanh,
    });
    let llm = Llm::new(LlmConfig {
        arch: Arch::Qwen2,
        hidden: 12,
        intermediate: 16,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 6,
        vocab: 23,
        rms_eps: 1e-6,
        rope_theta: 1e4,
        tie_embeddings: true,
        qkv_bias: true,
        o_bias: false,
    });
    Mllm::new(vision, llm, -2, FeatureSelect::Patch).unwrap()
}

fn batch(rng: &mut TestRng) -> PackedBatch {
    use Group::*;
    // Sequence 0: 2 prompt tokens, 3 visual (4 patches minus the first), 2 prompt, 3 response.
    // Sequence 1: text only.
    let groups = [
        vec![Prompt, Prompt, Visual, Visual, Visual, Prompt, Prompt, Response, Response, Response],
        vec![Prompt, Prompt, Response, Response],
    ];
    let mut b = PackedBatch::default();
    for (i, g) in groups.iter().enumerate() {
        b.positions.extend(0..g.len() as u32);
        b.seq_lens.push(g.len());
        b.ids.extend(g.iter().map(|&k| if k == Visual { 22 } else { rng.below(22) as u32 }));
        b.groups.extend_from_slice(g);
        b.images.push((i == 0).then_some(0));
    }
    b.pixel_values.push(rng.vec(3 * 8 * 8, 1.0).into_iter().map(|x| x as f32).collect());
    b
}

fn targets(b: &PackedBatch) -> Vec<i32> {
    // Row j predicts token j+1 of the same sequence when that token is a response token.
    let mut t = vec![IGNORE_INDEX; b.ids.len()];
    let mut start = 0;
    for &len in &b.seq_lens {
        for j in start..start + len - 1 {
            if b.groups[j + 1] == Group::Response {
                t[j] = b.ids[j + 1] as i32;
            }
        }
        start += len;
    }
    t
}

fn init(be: &B, specs: &[kd_engine::model::ParamSpec], seed: u64) -> ParamSet<Vec<f64>> {
    let mut rng = TestRng(seed);
    ParamSet::from_fn(be, specs, |s| {
        let base = if s.name.contains("norm") { 1.0 } else { 0.0 };
        (0..s.numel()).map(|_| (base + rng.uniform() * 0.5) as f32).collect()
    })
    .unwrap()
}

fn weights(be: &B, m: &Mllm) -> MllmWeights<Vec<f64>> {
    MllmWeights { vision: init(be, &m.vision.specs, 1), projector: init(be, &m.projector.specs, 2), llm: init(be, &m.llm.specs, 3) }
}

/// The projector's gradients, and the LLM's when `train_llm` (head included), from one forward
/// and backward of `b`; `ready` hears which gradients are complete as the backward goes.
fn gradients(
    m: &Mllm,
    be: &B,
    w: &MllmWeights<Vec<f64>>,
    b: &PackedBatch,
    t: &[i32],
    train_llm: bool,
    ready: Option<&mut dyn GradsReady<Vec<f64>>>,
) -> (ParamSet<Vec<f64>>, Option<ParamSet<Vec<f64>>>) {
    let (_, dlogits, acts) = loss(m, be, w, b, t);
    let mut gproj = ParamSet::zeros(be, &m.projector.specs).unwrap();
    let mut gllm = train_llm.then(|| ParamSet::zeros(be, &m.llm.specs).unwrap());
    let dh = m.llm.lm_head_backward(be, &w.llm, &acts.llm.hidden, &dlogits, gllm.as_mut()).unwrap();
    let mut ready = ready;
    // A reborrow for this call alone (MllmGrads holds all its references for one lifetime).
    let ready: Option<&mut dyn GradsReady<Vec<f64>>> = match ready.as_mut() {
        Some(r) => Some(&mut **r),
        None => None,
    };
    m.backward(be, w, &acts, &dh, MllmGrads { projector: Some(&mut gproj), llm: gllm.as_mut(), ready }).unwrap();
    (gproj, gllm)
}

fn loss(m: &Mllm, be: &B, w: &MllmWeights<Vec<f64>>, b: &PackedBatch, t: &[i32]) -> (f64, Vec<f64>, kd_engine::model::MllmActs<Vec<f64>>) {
    let feats = m.encode_images(be, &w.vision, &b.pixel_values).unwrap();
    let acts = m.forward(be, w, b, Some(feats)).unwrap();
    let logits = m.llm.lm_head(be, &w.llm, &acts.llm.hidden).unwrap();
    let n = t.iter().filter(|&&x| x != IGNORE_INDEX).count();
    let mut d = vec![0.0; logits.len()];
    let l = be.cross_entropy(&logits, t, m.llm.cfg.vocab, 1.0 / n as f32, &mut d).unwrap() / n as f64;
    (l, d, acts)
}

#[test]
fn projector_gradients_through_a_frozen_decoder_with_spliced_visual_tokens() {
    let be = B::new();
    let m = model();
    assert_eq!(m.visual_tokens(), 3);
    let mut rng = TestRng(5);
    let b = batch(&mut rng);
    let t = targets(&b);
    let w = weights(&be, &m);
    let (gproj, _) = gradients(&m, &be, &w, &b, &t, false, None);
    assert!(gproj.bufs.iter().all(|g| g.iter().any(|&x| x != 0.0)), "every projector tensor gets a gradient");
    for (i, spec) in m.projector.specs.iter().enumerate() {
        let mut wp = w.clone();
        check_grad(&spec.name, &w.projector.bufs[i], &gproj.bufs[i], 40, 1e-5, &mut |v| {
            wp.projector.bufs[i] = v.to_vec();
            loss(&m, &be, &wp, &b, &t).0
        });
    }
}

#[test]
fn llm_and_projector_gradients_when_both_train() {
    let be = B::new();
    let m = model();
    let mut rng = TestRng(6);
    let b = batch(&mut rng);
    let t = targets(&b);
    let w = weights(&be, &m);
    let (_, gllm) = gradients(&m, &be, &w, &b, &t, true, None);
    let gllm = gllm.unwrap();
    // The embedding table is tied to the head and its placeholder row (22) is overwritten at the
    // visual positions: finite differences check that only the head's use of that row counts.
    let names = [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    ];
    for name in names {
        // The parameter holding the HF tensor (a stacked q/k/v is checked whole).
        let i = find_hf(&w.llm.specs, name).unwrap().0.0;
        let mut wp = w.clone();
        check_grad(name, &w.llm.bufs[i], &gllm.bufs[i], 40, 1e-5, &mut |v| {
            wp.llm.bufs[i] = v.to_vec();
            loss(&m, &be, &wp, &b, &t).0
        });
    }
}

#[test]
fn visual_block_must_match_the_towers_token_count() {
    let be = B::new();
    let m = model();
    let mut rng = TestRng(7);
    let mut b = batch(&mut rng);
    b.groups[4] = Group::Prompt; // a 2-token visual block for a 3-token tower
    let w = weights(&be, &m);
    let feats = m.encode_images(&be, &w.vision, &b.pixel_values).unwrap();
    let err = m.forward(&be, &w, &b, Some(feats)).err().unwrap().to_string();
    assert!(err.contains("sequence 0") && err.contains("2 positions") && err.contains("3 tokens"), "{err}");
}

/// Records each `ready` call: the (set, tensor) pairs it reported, and for every tensor of every
/// set whether its gradient was still all zeros at that moment.
#[derive(Default)]
struct Recorder {
    calls: Vec<(Vec<(usize, usize)>, Vec<Vec<bool>>, Vec<Vec<Vec<f64>>>)>,
}

impl GradsReady<Vec<f64>> for Recorder {
    fn ready(&mut self, done: &[(usize, usize)], grads: &mut [&mut ParamSet<Vec<f64>>]) -> anyhow::Result<()> {
        let zero = grads.iter().map(|g| g.bufs.iter().map(|b| b.iter().all(|&x| x == 0.0)).collect()).collect();
        let values = grads.iter().map(|g| g.bufs.clone()).collect();
        self.calls.push((done.to_vec(), zero, values));
        Ok(())
    }
}

/// The backward tells which gradients are complete as it goes (what data parallelism reduces
/// while the backward continues): every trained tensor exactly once; a reported gradient already
/// holds its final value; and the last block is reported while the first block's gradients are
/// still untouched (zeros), i.e. before the backward has reached it.
#[test]
fn the_backward_reports_each_gradient_once_complete_and_before_the_backward_ends() {
    let be = B::new();
    let m = model();
    let mut rng = TestRng(7);
    let b = batch(&mut rng);
    let t = targets(&b);
    let w = weights(&be, &m);
    let mut rec = Recorder::default();
    let (gproj, gllm) = gradients(&m, &be, &w, &b, &t, true, Some(&mut rec));
    let gllm = gllm.unwrap();
    let finals = [&gproj, &gllm];
    let mut seen = std::collections::HashSet::new();
    for (done, _, values) in &rec.calls {
        for &(s, i) in done {
            assert!(seen.insert((s, i)), "({s}, {i}) reported twice");
            assert_eq!(values[s][i], finals[s].bufs[i], "set {s} tensor {i} was reported before its gradient was final");
        }
    }
    assert_eq!(seen.len(), gproj.bufs.len() + gllm.bufs.len(), "every trained tensor is reported");
    let id = |name: &str| find_hf(&m.llm.specs, name).unwrap().0.0;
    let last_block = rec.calls.iter().position(|(d, _, _)| d.contains(&(1, id("model.layers.1.mlp.down_proj.weight")))).unwrap();
    let (_, zero, _) = &rec.calls[last_block];
    assert!(zero[1][id("model.layers.0.self_attn.q_proj.weight")], "block 1 was reported after block 0's backward had run");
    assert!(zero[0].iter().all(|&z| z), "block 1 was reported after the projector's backward had run");
    assert!(last_block + 1 < rec.calls.len(), "reports come during the backward, not only at its end");
}
