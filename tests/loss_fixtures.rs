//! The distillation losses against PyTorch autograd (`tests/fixtures/make_loss_fixtures.py`):
//! `KLDivLoss(reduction="batchmean")(log_softmax(s/τ), softmax(t/τ))·τ²`, the upstream relation
//! loss (per-image Gram of the visual logits, 1 − cosine of the flattened Grams, mean over images),
//! with masked-out rows and both directions of vocabulary mismatch, and the whole objective on a
//! padded batch computed the Hugging Face way. Values and gradients within 1e-5 relative, on the
//! f64 and the f32 CPU backends.

mod common;

use common::{fixture, max_rel_diff};
use kd_engine::backend::cpu::{CpuBackend, Elem};
use kd_engine::backend::{Backend, Divergence, KlShape};
use kd_engine::data::template::Group;
use kd_engine::loss::{distill_loss, visual_ranges, DistillConfig, KlTargets, Logits, LossCounts, LossInputs};
use kd_engine::weights::WeightSource;

const TOL: f64 = 1e-5;

struct Fixture(WeightSource);

impl Fixture {
    fn open() -> Self {
        Fixture(WeightSource::open(&fixture("loss/reference.safetensors")).unwrap())
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.0.info(name).unwrap_or_else(|| panic!("fixture tensor {name} missing")).shape.clone()
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.0.read_f32(name, &self.shape(name)).unwrap()
    }
    fn i64(&self, name: &str) -> Vec<i64> {
        self.0.read_i64(name).unwrap()
    }
    fn scalar(&self, name: &str) -> f64 {
        let v = self.f32(name);
        assert_eq!(v.len(), 1, "{name}");
        v[0] as f64
    }
}

fn to<T: Elem>(x: &[f32]) -> Vec<T> {
    x.iter().map(|&v| T::of(v as f64)).collect()
}

fn back<T: Elem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.f64() as f32).collect()
}

fn assert_value(what: &str, got: f64, want: f64) {
    let rel = (got - want).abs() / want.abs();
    assert!(rel <= TOL, "{what}: {got} vs PyTorch {want} (rel {rel:.1e})");
}

fn assert_grad(what: &str, got: &[f32], want: &[f32]) {
    let rel = max_rel_diff(got, want);
    assert!(rel <= TOL, "{what}: gradient differs from PyTorch by {rel:.1e} (max abs diff / max abs)");
    // Exact zeros where PyTorch has exact zeros (masked rows, columns past the kept vocabulary).
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == 0.0 {
            assert_eq!(g, 0.0, "{what}: element {i} must have no gradient");
        }
    }
}

fn kl_case<T: Elem>(fx: &Fixture, p: &str) {
    let be = CpuBackend::<T>::new();
    let (ss, ts) = (fx.shape(&format!("{p}s")), fx.shape(&format!("{p}t")));
    let (vs, vt) = (ss[1], ts[1]);
    let rows: Vec<u32> = fx.i64(&format!("{p}rows")).iter().map(|&r| r as u32).collect();
    let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept: vs.min(vt), temperature: fx.scalar(&format!("{p}tau")) as f32, divergence: Divergence::Fkl };
    let s = to::<T>(&fx.f32(&format!("{p}s")));
    let t = to::<T>(&fx.f32(&format!("{p}t")));
    let mut d = vec![T::zero(); s.len()];
    let scale = 1.0 / rows.len() as f64; // batchmean
    let sum = be.softmax_kl(&s, &t, shape, &rows, scale as f32, &mut d).unwrap();
    let what = format!("{p} ({})", std::any::type_name::<T>());
    assert_value(&what, sum * scale, fx.scalar(&format!("{p}loss")));
    assert_grad(&what, &back(&d), &fx.f32(&format!("{p}grad")));
}

fn rel_case<T: Elem>(fx: &Fixture, p: &str) {
    let be = CpuBackend::<T>::new();
    let (ss, ts) = (fx.shape(&format!("{p}s")), fx.shape(&format!("{p}t")));
    let (vs, vt) = (ss[1], ts[1]);
    let images: Vec<(u32, u32)> = fx.i64(&format!("{p}images")).chunks(2).map(|c| (c[0] as u32, c[1] as u32)).collect();
    let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept: vs.min(vt), temperature: 1.0, divergence: Divergence::Fkl };
    let s = to::<T>(&fx.f32(&format!("{p}s")));
    let t = to::<T>(&fx.f32(&format!("{p}t")));
    let mut d = vec![T::zero(); s.len()];
    let scale = 1.0 / images.len() as f64; // mean over images
    let sum = be.relation_loss(&s, &t, shape, &images, scale as f32, &mut d).unwrap();
    let what = format!("{p} ({})", std::any::type_name::<T>());
    assert_value(&what, sum * scale, fx.scalar(&format!("{p}loss")));
    assert_grad(&what, &back(&d), &fx.f32(&format!("{p}grad")));
}

#[test]
fn softmax_kl_matches_torch_kldivloss_batchmean() {
    let fx = Fixture::open();
    for p in ["kl_a_", "kl_b_", "kl_c_"] {
        kl_case::<f64>(&fx, p);
        kl_case::<f32>(&fx, p);
    }
    // The cases cover what they claim: τ ∈ {1, 2, 0.5}, teacher vocabulary larger and smaller,
    // masked-out rows.
    assert_eq!(fx.scalar("kl_a_tau"), 1.0);
    assert_eq!(fx.scalar("kl_b_tau"), 2.0);
    assert!(fx.shape("kl_b_t")[1] > fx.shape("kl_b_s")[1] && fx.shape("kl_c_t")[1] < fx.shape("kl_c_s")[1]);
    assert!(fx.i64("kl_a_rows").len() < fx.shape("kl_a_s")[0]);
}

#[test]
fn relation_loss_matches_upstream_torch_form() {
    let fx = Fixture::open();
    for p in ["rel_a_", "rel_b_"] {
        rel_case::<f64>(&fx, p);
        rel_case::<f32>(&fx, p);
    }
    assert!(fx.shape("rel_a_t")[1] > fx.shape("rel_a_s")[1]);
    assert_eq!(fx.i64("rel_a_images").len(), 4, "two images");
}

/// The objective fixture: packed ids/groups/logits and the reference terms.
struct Objective {
    ids: Vec<u32>,
    groups: Vec<Group>,
    seq_lens: Vec<usize>,
    s: Vec<f32>,
    t: Vec<f32>,
    vs: usize,
    vt: usize,
    cfg: DistillConfig,
    terms: Vec<f32>,
    grad: Vec<f32>,
}

impl Objective {
    fn load(fx: &Fixture) -> Self {
        let groups = fx
            .i64("obj_groups")
            .iter()
            .map(|&g| match g {
                0 => Group::Pad,
                1 => Group::Prompt,
                2 => Group::Visual,
                3 => Group::Response,
                _ => panic!("bad group {g}"),
            })
            .collect();
        let c = fx.f32("obj_config");
        let cfg = DistillConfig {
            ce: true,
            alpha: c[1],
            beta: c[2],
            gamma: c[3],
            targets: KlTargets { response: true, prompt: c[4] == 1.0, visual: true },
            mdist: true,
            rdist: true,
            temperature: c[0],
            divergence: Divergence::Fkl,
        };
        Objective {
            ids: fx.i64("obj_ids").iter().map(|&i| i as u32).collect(),
            groups,
            seq_lens: fx.i64("obj_seq_lens").iter().map(|&l| l as usize).collect(),
            s: fx.f32("obj_s"),
            t: fx.f32("obj_t"),
            vs: fx.shape("obj_s")[1],
            vt: fx.shape("obj_t")[1],
            cfg,
            terms: fx.f32("obj_terms"),
            grad: fx.f32("obj_grad"),
        }
    }

    /// Runs the objective over the sequences `seqs` (a contiguous run of the packed batch) with
    /// the given step counts; returns the report and the gradient rows.
    fn run<T: Elem>(&self, seqs: std::ops::Range<usize>, step: Option<&LossCounts>) -> (kd_engine::loss::LossReport, Vec<f32>, LossCounts) {
        let lo: usize = self.seq_lens[..seqs.start].iter().sum();
        let hi: usize = self.seq_lens[..seqs.end].iter().sum();
        let seq_lens = self.seq_lens[seqs].to_vec();
        let images = visual_ranges(&self.groups[lo..hi], &seq_lens).unwrap();
        let inputs = LossInputs { ids: &self.ids[lo..hi], groups: &self.groups[lo..hi], seq_lens: &seq_lens, images: &images };
        let counts = LossCounts::of(&inputs).unwrap();
        let be = CpuBackend::<T>::new();
        let s = to::<T>(&self.s[lo * self.vs..hi * self.vs]);
        let t = to::<T>(&self.t[lo * self.vt..hi * self.vt]);
        let mut d = vec![T::zero(); s.len()];
        let rep = distill_loss(
            &be,
            &self.cfg,
            &inputs,
            Logits { data: &s, vocab: self.vs },
            Some(Logits { data: &t, vocab: self.vt }),
            step.unwrap_or(&counts),
            &mut d,
        )
        .unwrap();
        (rep, back(&d), counts)
    }

    fn check(&self, what: &str, rep: &kd_engine::loss::LossReport, grad: &[f32]) {
        let got = [
            rep.ce,
            rep.response.unwrap(),
            rep.prompt.unwrap(),
            rep.visual.unwrap(),
            rep.relation.unwrap(),
            rep.total,
        ];
        for (name, (g, w)) in ["ce", "res", "prompt", "vis", "rel", "total"].iter().zip(got.iter().zip(&self.terms)) {
            assert_value(&format!("{what} {name}"), *g, *w as f64);
        }
        assert_grad(what, grad, &self.grad);
    }
}

fn objective<T: Elem>() {
    let fx = Fixture::open();
    let o = Objective::load(&fx);
    let name = std::any::type_name::<T>();
    // The fixture's layout: an image sample, a text-only two-turn sample, a pretrain-style sample
    // ending in one padding position.
    assert_eq!(o.seq_lens, vec![14, 11, 9]);
    assert_eq!(o.vs, 23);
    assert_eq!(o.vt, 31);
    // One batch.
    let n_seq = o.seq_lens.len();
    let (rep, grad, step) = o.run::<T>(0..n_seq, None);
    assert_eq!(step, LossCounts { ce: 12, response: 12, prompt: 8, visual: 11, images: 2 });
    o.check(&format!("objective, one batch ({name})"), &rep, &grad);
    // Two micro-batches with the step-wide counts: reports and gradients add up to the reference.
    let (_, _, c1) = o.run::<T>(0..2, None);
    let (_, _, c2) = o.run::<T>(2..3, None);
    let step = c1 + c2;
    let (mut r1, g1, _) = o.run::<T>(0..2, Some(&step));
    let (r2, g2, _) = o.run::<T>(2..3, Some(&step));
    r1.add(&r2);
    let joined: Vec<f32> = g1.into_iter().chain(g2).collect();
    o.check(&format!("objective, two micro-batches ({name})"), &r1, &joined);
}

#[test]
fn objective_matches_torch_on_a_padded_batch_f64() {
    objective::<f64>();
}

#[test]
fn objective_matches_torch_on_a_padded_batch_f32() {
    objective::<f32>();
}
