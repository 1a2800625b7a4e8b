//! Finite-difference check (f64) of the whole decoder's hand-written backward: every weight tensor
//! and the input embeddings, for Qwen2 (GQA, tied and untied) and LLaMA (with attention biases, and
//! without), over a packed batch of two sequences; gradient checkpointing and the forward-only pass
//! against the plain training forward.

mod common;

use common::{check_grad, TestRng};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{Backend, IGNORE_INDEX};
use kd_engine::model::{Arch, Llm, LlmConfig, ParamSet, SeqLayout};

type B = CpuBackend<f64>;

fn config(arch: Arch, tie: bool, attention_bias: bool) -> LlmConfig {
    LlmConfig {
        arch,
        hidden: 12,
        intermediate: 10,
        layers: 2,
        heads: 4,
        kv_heads: if arch == Arch::Qwen2 { 2 } else { 4 },
        head_dim: if arch == Arch::Llama { 4 } else { 6 },
        vocab: 17,
        rms_eps: 1e-6,
        rope_theta: 100.0,
        tie_embeddings: tie,
        qkv_bias: arch == Arch::Qwen2 || attention_bias,
        o_bias: arch == Arch::Llama && attention_bias,
    }
}

struct Case {
    model: Llm,
    ids: Vec<u32>,
    targets: Vec<i32>,
    layout: SeqLayout,
}

impl Case {
    fn new(cfg: LlmConfig) -> Self {
        let lens = [6usize, 4];
        let mut rng = TestRng(42);
        let t: usize = lens.iter().sum();
        let ids: Vec<u32> = (0..t).map(|_| rng.below(cfg.vocab) as u32).collect();
        // Next-token targets inside each sequence; the last position of each and one more ignored.
        let mut targets = vec![IGNORE_INDEX; t];
        let mut start = 0;
        for &len in &lens {
            for j in start..start + len - 1 {
                targets[j] = ids[j + 1] as i32;
            }
            start += len;
        }
        targets[2] = IGNORE_INDEX;
        Case { model: Llm::new(cfg), ids, targets, layout: SeqLayout::from_lens(&lens) }
    }

    fn weights(&self, be: &B) -> ParamSet<Vec<f64>> {
        let mut rng = TestRng(7);
        ParamSet::from_fn(be, &self.model.specs, |s| {
            // Norm weights around 1, everything else small and random.
            let base = if s.name.contains("norm") { 1.0 } else { 0.0 };
            (0..s.numel()).map(|_| (base + rng.uniform() * 0.5) as f32).collect()
        })
        .unwrap()
    }

    /// CE loss (mean over targets) from input embeddings `x`.
    fn loss(&self, be: &B, w: &ParamSet<Vec<f64>>, x: Vec<f64>) -> f64 {
        let acts = self.model.forward(be, w, x, &self.layout).unwrap();
        let logits = self.model.lm_head(be, w, &acts.hidden).unwrap();
        let n = self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
        let mut d = vec![0.0; logits.len()];
        be.cross_entropy(&logits, &self.targets, self.model.cfg.vocab, 1.0, &mut d).unwrap() / n
    }

    fn check(&self) {
        let be = B::new();
        let w = self.weights(&be);
        let x = self.model.embed(&be, &w, &self.ids).unwrap();
        let acts = self.model.forward(&be, &w, x.clone(), &self.layout).unwrap();
        let logits = self.model.lm_head(&be, &w, &acts.hidden).unwrap();
        let n = self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let mut dlogits = vec![0.0; logits.len()];
        be.cross_entropy(&logits, &self.targets, self.model.cfg.vocab, 1.0 / n as f32, &mut dlogits).unwrap();
        let mut grads = ParamSet::zeros(&be, &self.model.specs).unwrap();
        let dh = self.model.lm_head_backward(&be, &w, &acts.hidden, &dlogits, Some(&mut grads)).unwrap();
        let dx = self.model.backward(&be, &w, &acts, &dh, Some(&mut grads)).unwrap();

        // The input-embedding gradient, with the weights fixed.
        check_grad("input embeddings", &x, &dx, 60, 1e-5, &mut |xp| self.loss(&be, &w, xp.to_vec()));

        // A frozen LLM still returns the same input gradient, and touches no weight gradient.
        let dx_frozen = self.model.backward(&be, &w, &acts, &dh, None).unwrap();
        assert_eq!(dx, dx_frozen, "frozen backward changes the input gradient");

        // Every weight: the loss through the token ids (so the tied head and the embedding rows
        // both count), the embedding-table gradient completed by the scatter-add.
        self.model.embed_backward(&be, &mut grads, &self.ids, &dx).unwrap();
        for (i, spec) in w.specs.iter().enumerate() {
            let mut wp = w.clone();
            check_grad(&spec.name, &w.bufs[i], &grads.bufs[i], 25, 1e-5, &mut |v| {
                wp.bufs[i] = v.to_vec();
                let x = self.model.embed(&be, &wp, &self.ids).unwrap();
                self.loss(&be, &wp, x)
            });
        }
    }
}

#[test]
fn qwen2_gqa_tied_decoder_gradients() {
    Case::new(config(Arch::Qwen2, true, false)).check();
}

#[test]
fn qwen2_gqa_untied_decoder_gradients() {
    Case::new(config(Arch::Qwen2, false, false)).check();
}

#[test]
fn llama_untied_decoder_gradients() {
    Case::new(config(Arch::Llama, false, false)).check();
}

#[test]
fn llama_tied_with_attention_bias_decoder_gradients() {
    Case::new(config(Arch::Llama, true, true)).check();
}

/// Hidden state, input gradient, weight gradients and saved values of one forward + backward.
fn run_once(case: &mut Case, checkpointing: bool) -> (Vec<f64>, Vec<f64>, ParamSet<Vec<f64>>, usize) {
    case.model.gradient_checkpointing = checkpointing;
    let be = B::new();
    let w = case.weights(&be);
    let x = case.model.embed(&be, &w, &case.ids).unwrap();
    let acts = case.model.forward(&be, &w, x, &case.layout).unwrap();
    let logits = case.model.lm_head(&be, &w, &acts.hidden).unwrap();
    let mut dlogits = vec![0.0; logits.len()];
    be.cross_entropy(&logits, &case.targets, case.model.cfg.vocab, 0.1, &mut dlogits).unwrap();
    let mut grads = ParamSet::zeros(&be, &case.model.specs).unwrap();
    let dh = case.model.lm_head_backward(&be, &w, &acts.hidden, &dlogits, Some(&mut grads)).unwrap();
    let dx = case.model.backward(&be, &w, &acts, &dh, Some(&mut grads)).unwrap();
    case.model.embed_backward(&be, &mut grads, &case.ids, &dx).unwrap();
    (acts.hidden.clone(), dx, grads, case.model.saved_values(&be, &acts))
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients_from_fewer_saved_values() {
    for cfg in [config(Arch::Qwen2, false, false), config(Arch::Llama, true, true)] {
        let mut case = Case::new(cfg);
        let (h_full, dx_full, g_full, saved_full) = run_once(&mut case, false);
        let (h_ckpt, dx_ckpt, g_ckpt, saved_ckpt) = run_once(&mut case, true);
        assert_eq!(h_full, h_ckpt, "checkpointing changed the forward");
        assert_eq!(dx_full, dx_ckpt, "checkpointing changed the input gradient");
        for (spec, (a, b)) in g_full.specs.iter().zip(g_full.bufs.iter().zip(&g_ckpt.bufs)) {
            assert!(a.iter().any(|&v| v != 0.0), "{}: no gradient at all", spec.name);
            assert_eq!(a, b, "{}: checkpointing changed the gradient", spec.name);
        }
        // Per block: 14 saved tensors (with the 10-wide MLP) against the 12-wide input alone.
        let t = case.layout.tokens();
        let c = &case.model.cfg;
        let tail = 2 * t * c.hidden + t; // final residual, final hidden, its rstd
        assert_eq!(saved_ckpt, c.layers * t * c.hidden + tail);
        assert!(saved_full > 5 * saved_ckpt - 5 * tail, "full {saved_full} vs checkpointed {saved_ckpt}");
    }
}

#[test]
fn forward_only_hidden_states_equal_the_training_forward() {
    let case = Case::new(config(Arch::Qwen2, true, false));
    let be = B::new();
    let w = case.weights(&be);
    let x = case.model.embed(&be, &w, &case.ids).unwrap();
    let acts = case.model.forward(&be, &w, x.clone(), &case.layout).unwrap();
    let hidden = case.model.hidden_states(&be, &w, x, &case.layout).unwrap();
    assert_eq!(acts.hidden, hidden);
}
