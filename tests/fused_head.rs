//! The chunked fused LM head (`loss::fused_head`) and the vocabulary-free relation loss
//! (`loss::relation_identity`) against the direct path, in f64 on the CPU backend:
//! `lm_head → distill_loss → lm_head_backward` on materialised logits must give the same values and
//! the same gradients (w.r.t. the hidden states and the head weight) to 1e-10 relative, with every
//! term on, V_s ≠ V_t both ways, chunk sizes that divide nothing, tied and untied heads, the LLM
//! training or frozen, and both relation forms.

mod common;

use common::TestRng;
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{Backend, Divergence, Gemm, KlShape};
use kd_engine::data::template::Group;
use kd_engine::loss::fused_head::{lm_head_grad, lm_head_weight, rows_with_logits};
use kd_engine::loss::relation_identity::{head_gram, head_gram_backward, relation_loss_identity, relation_step_flops, GramSide};
use kd_engine::loss::{
    distill_loss, fused_distill_loss, visual_ranges, DistillConfig, FusedHeadOptions, HeadSide, KlTargets, Logits,
    LossCounts, LossInputs, LossReport, PendingReport, RelationForm,
};
use kd_engine::model::{Arch, Llm, LlmConfig, ParamSet, SeqLayout};

type B = CpuBackend<f64>;
const TOL: f64 = 1e-10;

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
    let d = a.iter().zip(b).fold(0f64, |m, (x, y)| if (x - y).is_nan() { f64::INFINITY } else { m.max((x - y).abs()) });
    d / scale
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

fn llm(hidden: usize, heads: usize, vocab: usize, tied: bool) -> Llm {
    Llm::new(LlmConfig {
        arch: Arch::Qwen2,
        hidden,
        intermediate: hidden + 4,
        layers: 1,
        heads,
        kv_heads: 1,
        head_dim: hidden / heads,
        vocab,
        rms_eps: 1e-6,
        rope_theta: 1e4,
        tie_embeddings: tied,
        qkv_bias: true,
        o_bias: false,
    })
}

fn weights(be: &B, m: &Llm, seed: u64) -> ParamSet<Vec<f64>> {
    let mut rng = TestRng(seed);
    ParamSet::from_fn(be, &m.specs, |s| {
        let base = if s.name.contains("norm") { 1.0 } else { 0.0 };
        (0..s.numel()).map(|_| (base + rng.uniform() * 0.4) as f32).collect()
    })
    .unwrap()
}

/// A packed batch of four sequences covering every case of the row selection: an image between
/// prompt text; text only; an image directly followed by the response (its last visual row is a
/// CE row too); and a sequence ending in padding.
struct Batch {
    ids: Vec<u32>,
    groups: Vec<Group>,
    seq_lens: Vec<usize>,
    images: Vec<std::ops::Range<usize>>,
}

fn batch(rng: &mut TestRng, vocab: usize) -> Batch {
    use Group::*;
    let seqs: Vec<Vec<Group>> = vec![
        [vec![Prompt; 2], vec![Visual; 7], vec![Prompt; 3], vec![Response; 5]].concat(),
        [vec![Prompt; 4], vec![Response; 3]].concat(),
        [vec![Prompt; 1], vec![Visual; 7], vec![Response; 4]].concat(),
        [vec![Prompt; 3], vec![Response; 2], vec![Pad; 2]].concat(),
    ];
    let mut b = Batch { ids: vec![], groups: vec![], seq_lens: vec![], images: vec![] };
    for g in &seqs {
        b.seq_lens.push(g.len());
        b.ids.extend(g.iter().map(|_| rng.below(vocab) as u32));
        b.groups.extend_from_slice(g);
    }
    b.images = visual_ranges(&b.groups, &b.seq_lens).unwrap();
    b
}

fn inputs(b: &Batch) -> LossInputs<'_> {
    LossInputs { ids: &b.ids, groups: &b.groups, seq_lens: &b.seq_lens, images: &b.images }
}

/// Final hidden states of `m` on the batch's token ids.
fn hidden(be: &B, m: &Llm, w: &ParamSet<Vec<f64>>, b: &Batch) -> Vec<f64> {
    let x = m.embed(be, w, &b.ids).unwrap();
    m.forward(be, w, x, &SeqLayout::from_lens(&b.seq_lens)).unwrap().hidden
}

struct Setup {
    be: B,
    student: Llm,
    ws: ParamSet<Vec<f64>>,
    teacher: Llm,
    wt: ParamSet<Vec<f64>>,
    b: Batch,
    hs: Vec<f64>,
    ht: Vec<f64>,
}

fn setup(vs: usize, vt: usize, tied: bool, seed: u64) -> Setup {
    let be = B::new();
    let student = llm(8, 2, vs, tied);
    let teacher = llm(12, 3, vt, false);
    let ws = weights(&be, &student, seed);
    let wt = weights(&be, &teacher, seed + 1);
    let mut rng = TestRng(seed + 2);
    let b = batch(&mut rng, vs.min(vt));
    let hs = hidden(&be, &student, &ws, &b);
    let ht = hidden(&be, &teacher, &wt, &b);
    Setup { be, student, ws, teacher, wt, b, hs, ht }
}

/// The direct path: report, ∂H_s, and the LM head's gradient (`None` when frozen).
fn direct(s: &Setup, cfg: &DistillConfig, train: bool) -> (LossReport, Vec<f64>, Option<Vec<f64>>) {
    let be = &s.be;
    let inp = inputs(&s.b);
    let counts = LossCounts::of(&inp).unwrap();
    let zs = s.student.lm_head(be, &s.ws, &s.hs).unwrap();
    let zt = s.teacher.lm_head(be, &s.wt, &s.ht).unwrap();
    let mut dz = vec![0.0; zs.len()];
    let report = distill_loss(
        be,
        cfg,
        &inp,
        Logits { data: &zs, vocab: s.student.cfg.vocab },
        Some(Logits { data: &zt, vocab: s.teacher.cfg.vocab }),
        &counts,
        &mut dz,
    )
    .unwrap();
    let mut grads = ParamSet::zeros(be, &s.student.specs).unwrap();
    let dh = s.student.lm_head_backward(be, &s.ws, &s.hs, &dz, train.then_some(&mut grads)).unwrap();
    let dw = train.then(|| lm_head_grad(&s.student, &mut grads).unwrap().clone());
    (report, dh, dw)
}

/// The fused path; `dw0` is the head gradient's starting content (it is accumulated into).
#[allow(clippy::too_many_arguments)]
fn fused(
    s: &Setup,
    cfg: &DistillConfig,
    opts: FusedHeadOptions,
    dw0: Option<Vec<f64>>,
    grams: Option<(&Vec<f64>, &Vec<f64>)>,
    hs: &[f64],
    ht: &[f64],
) -> (LossReport, Vec<f64>, Option<Vec<f64>>) {
    let be = &s.be;
    let inp = inputs(&s.b);
    let counts = LossCounts::of(&inp).unwrap();
    let (hs, ht) = (hs.to_vec(), ht.to_vec());
    let student = HeadSide {
        hidden: &hs,
        hidden_size: s.student.cfg.hidden,
        weight: lm_head_weight(&s.student, &s.ws).unwrap(),
        vocab: s.student.cfg.vocab,
        gram: grams.map(|g| g.0),
    };
    let teacher = HeadSide {
        hidden: &ht,
        hidden_size: s.teacher.cfg.hidden,
        weight: lm_head_weight(&s.teacher, &s.wt).unwrap(),
        vocab: s.teacher.cfg.vocab,
        gram: grams.map(|g| g.1),
    };
    let mut dh = vec![f64::NAN; hs.len()]; // overwritten
    let mut dw = dw0;
    let report = fused_now(be, cfg, &inp, student, Some(teacher), &counts, &opts, &mut dh, dw.as_mut()).unwrap();
    (report, dh, dw)
}

/// [`fused_distill_loss`] with its sums read back at once.
#[allow(clippy::too_many_arguments)]
fn fused_now<Bk: Backend>(
    be: &Bk,
    cfg: &DistillConfig,
    inp: &LossInputs,
    student: HeadSide<'_, Bk::Buf>,
    teacher: Option<HeadSide<'_, Bk::Buf>>,
    counts: &LossCounts,
    opts: &FusedHeadOptions,
    dh: &mut Bk::Buf,
    dw: Option<&mut Bk::Buf>,
) -> anyhow::Result<LossReport> {
    let mut sums = be.sums(PendingReport::SLOTS)?;
    let pending = fused_distill_loss(be, cfg, inp, student, teacher, counts, opts, dh, dw, &mut sums, 0)?;
    pending.resolve(&be.read_sums(&sums)?)
}

fn all_terms(temperature: f32) -> DistillConfig {
    DistillConfig {
        ce: true,
        alpha: 0.7,
        beta: 1.3,
        gamma: 0.5,
        targets: KlTargets { response: true, prompt: true, visual: true },
        mdist: true,
        rdist: true,
        temperature,
        divergence: Divergence::Fkl,
    }
}

fn assert_reports(what: &str, a: &LossReport, b: &LossReport) {
    let pairs = [
        ("ce", Some(a.ce), Some(b.ce)),
        ("response", a.response, b.response),
        ("prompt", a.prompt, b.prompt),
        ("visual", a.visual, b.visual),
        ("relation", a.relation, b.relation),
        ("total", Some(a.total), Some(b.total)),
    ];
    for (name, x, y) in pairs {
        match (x, y) {
            (Some(x), Some(y)) => assert!(rel(x, y) <= TOL || (x - y).abs() < 1e-15, "{what}: {name} {x} vs direct {y}"),
            (None, None) => {}
            _ => panic!("{what}: {name} is {x:?} fused but {y:?} direct"),
        }
    }
}

/// Runs the comparison over chunk sizes, relation forms and train/frozen.
fn compare(s: &Setup, cfg: &DistillConfig, what: &str) {
    let vs = s.student.cfg.vocab;
    let hsz = s.student.cfg.hidden;
    for train in [true, false] {
        let (r0, dh0, dw0) = direct(s, cfg, train);
        for form in [RelationForm::Logits, RelationForm::Identity] {
            for chunk in [1, 3, 5, 7, 1000] {
                let opts = FusedHeadOptions { chunk_rows: chunk, relation: form };
                let tag = format!("{what}, {form:?}, chunk {chunk}, {}", if train { "training" } else { "frozen" });
                // Accumulation: start dW from random contents and compare the increment.
                let start = train.then(|| TestRng(9).vec(vs * hsz, 1.0));
                let (r, dh, dw) = fused(s, cfg, opts, start.clone(), None, &s.hs, &s.ht);
                assert_reports(&tag, &r, &r0);
                let e = max_rel(&dh, &dh0);
                assert!(e <= TOL, "{tag}: ∂H_s differs by {e:.2e}");
                if let (Some(dw), Some(start), Some(dw0)) = (dw, start, &dw0) {
                    let inc: Vec<f64> = dw.iter().zip(&start).map(|(a, b)| a - b).collect();
                    let e = max_rel(&inc, dw0);
                    assert!(e <= TOL, "{tag}: ∂W_s differs by {e:.2e}");
                }
            }
        }
    }
}

#[test]
fn fused_head_matches_direct_path_student_vocab_smaller() {
    let s = setup(37, 41, false, 10);
    compare(&s, &all_terms(1.0), "V_s 37 < V_t 41");
}

#[test]
fn fused_head_matches_direct_path_student_vocab_larger_tied_tau_2() {
    let s = setup(43, 31, true, 20);
    compare(&s, &all_terms(2.0), "V_s 43 > V_t 31, tied, τ 2");
}

#[test]
fn fused_head_matches_direct_path_default_objective_and_term_switches() {
    let s = setup(29, 29, false, 30);
    compare(&s, &DistillConfig::default(), "LLaVA-KD defaults");
    let mdist_only = DistillConfig { rdist: false, ..all_terms(1.0) };
    compare(&s, &mdist_only, "MDist only");
    let rdist_only = DistillConfig { mdist: false, ..all_terms(1.0) };
    compare(&s, &rdist_only, "RDist only");
    // Distillation alone: the fused path skips CE's gradient where it is fused into the response
    // KL (softmax_kl_ce) as well as where it runs on its own.
    compare(&s, &DistillConfig { ce: false, ..mdist_only }, "MDist only, no CE");
    compare(&s, &DistillConfig { ce: false, ..all_terms(2.0) }, "every distillation term, no CE, τ 2");
}

#[test]
fn fused_head_matches_direct_path_every_divergence() {
    let s = setup(37, 41, false, 13);
    for name in ["rkl", "skl", "jsd", "tvd", "skew_fkl", "skew_rkl"] {
        let divergence = Divergence::parse(name, None).unwrap();
        compare(&s, &DistillConfig { divergence, ..all_terms(2.0) }, &format!("divergence {name}, τ 2"));
    }
}

#[test]
fn fused_head_cross_entropy_only_needs_no_teacher() {
    let s = setup(29, 33, false, 40);
    let cfg = DistillConfig::ce_only();
    let (r0, dh0, dw0) = direct(&s, &cfg, true);
    let be = &s.be;
    let inp = inputs(&s.b);
    let counts = LossCounts::of(&inp).unwrap();
    let student = HeadSide {
        hidden: &s.hs,
        hidden_size: 8,
        weight: lm_head_weight(&s.student, &s.ws).unwrap(),
        vocab: 29,
        gram: None,
    };
    let mut dh = vec![0.0; s.hs.len()];
    let mut dw = vec![0.0; 29 * 8];
    let opts = FusedHeadOptions { chunk_rows: 4, relation: RelationForm::Identity };
    let r = fused_now(be, &cfg, &inp, student, None, &counts, &opts, &mut dh, Some(&mut dw)).unwrap();
    assert_reports("CE only", &r, &r0);
    assert!(max_rel(&dh, &dh0) <= TOL);
    assert!(max_rel(&dw, &dw0.unwrap()) <= TOL);
    // A distilling objective without teacher hidden states is an error, not a panic.
    let e = fused_now(be, &all_terms(1.0), &inp, student, None, &counts, &opts, &mut dh, None).unwrap_err();
    assert!(e.to_string().contains("no teacher"), "{e}");
}

/// Rows no term uses produce no logits: poisoning them with NaN changes nothing.
#[test]
fn rows_no_term_uses_are_never_read() {
    let s = setup(37, 41, false, 50);
    // L_prompt off: prompt rows (other than those predicting a response or sitting on an image)
    // are used by nothing.
    let cfg = DistillConfig::default();
    let inp = inputs(&s.b);
    let targets = inp.ce_targets().unwrap();
    let sel = inp.rows();
    let used = |r: usize| targets[r] >= 0 || sel.visual.contains(&(r as u32)) || sel.response.contains(&(r as u32));
    let (mut hs, mut ht) = (s.hs.clone(), s.ht.clone());
    let mut unused = 0;
    for r in 0..inp.len() {
        if !used(r) {
            unused += 1;
            hs[r * 8..(r + 1) * 8].iter_mut().for_each(|x| *x = f64::NAN);
            ht[r * 12..(r + 1) * 12].iter_mut().for_each(|x| *x = f64::NAN);
        }
    }
    assert!(unused >= 8, "the batch must have unused rows ({unused})");
    let (r0, dh0, dw0) = direct(&s, &cfg, true);
    for form in [RelationForm::Logits, RelationForm::Identity] {
        let (r, dh, dw) = fused(&s, &cfg, FusedHeadOptions { chunk_rows: 4, relation: form }, Some(vec![0.0; 37 * 8]), None, &hs, &ht);
        assert_reports(&format!("poisoned unused rows, {form:?}"), &r, &r0);
        assert!(max_rel(&dh, &dh0) <= TOL, "{form:?}");
        assert!(max_rel(&dw.unwrap(), dw0.as_ref().unwrap()) <= TOL, "{form:?}");
        assert_eq!(rows_with_logits(&cfg, &inp, form).unwrap(), inp.len() - unused);
    }
}

/// Precomputed head Gram matrices (the teacher's once per run; a frozen student's too) give the
/// same result as computing them per call.
#[test]
fn precomputed_head_grams_are_used() {
    let s = setup(37, 41, false, 60);
    let cfg = all_terms(1.0);
    let be = &s.be;
    let kept = 37;
    let gs = head_gram(be, lm_head_weight(&s.student, &s.ws).unwrap(), 37, 8, kept).unwrap();
    let gt = head_gram(be, lm_head_weight(&s.teacher, &s.wt).unwrap(), 41, 12, kept).unwrap();
    let (r0, dh0, _) = direct(&s, &cfg, false);
    let opts = FusedHeadOptions { chunk_rows: 6, relation: RelationForm::Identity };
    let (r, dh, _) = fused(&s, &cfg, opts, None, Some((&gs, &gt)), &s.hs, &s.ht);
    assert_reports("precomputed grams", &r, &r0);
    assert!(max_rel(&dh, &dh0) <= TOL);
}

// ---- the relation loss via R = H·(WᵀW)·Hᵀ ----

/// The identity form against the backend's `relation_loss` on materialised logits Z = H·W[:kept]ᵀ:
/// value, ∂H (= ∂Z·W[:kept]) and ∂W (= ∂Zᵀ·H on the kept rows).
fn check_identity(rows: usize, hs: usize, ht: usize, vs: usize, vt: usize, images: &[(u32, u32)], seed: u64) {
    let be = B::new();
    let mut rng = TestRng(seed);
    let kept = vs.min(vt);
    let h_s = rng.vec(rows * hs, 1.0);
    let h_t = rng.vec(rows * ht, 1.0);
    let w_s = rng.vec(vs * hs, 0.5);
    let w_t = rng.vec(vt * ht, 0.5);
    let scale = 0.37f32;

    // Direct: logits over the kept columns only (what relation_loss reads).
    let logits = |h: &Vec<f64>, w: &Vec<f64>, hd: usize| {
        let mut z = vec![0.0; rows * kept];
        be.gemm(Gemm::linear(rows, kept, hd), h, &w[..kept * hd].to_vec(), &mut z).unwrap();
        z
    };
    let (zs, zt) = (logits(&h_s, &w_s, hs), logits(&h_t, &w_t, ht));
    let shape = KlShape { student_vocab: kept, teacher_vocab: kept, kept, temperature: 1.0, divergence: Divergence::Fkl };
    let mut dz = vec![0.0; rows * kept];
    let v0 = be.relation_loss(&zs, &zt, shape, images, scale, &mut dz).unwrap();
    let mut dh0 = vec![0.0; rows * hs];
    be.gemm(Gemm::linear_input_grad(rows, kept, hs, false), &dz, &w_s[..kept * hs].to_vec(), &mut dh0).unwrap();
    let mut dw0_kept = vec![0.0; kept * hs];
    be.gemm(Gemm::linear_weight_grad(rows, kept, hs), &dz, &h_s, &mut dw0_kept).unwrap();

    // Identity.
    let ms = head_gram(&be, &w_s, vs, hs, kept).unwrap();
    let mt = head_gram(&be, &w_t, vt, ht, kept).unwrap();
    let start = rng.vec(rows * hs, 1.0); // dhidden is accumulated into
    let mut dh = start.clone();
    let mut dm = vec![0.0; hs * hs];
    let mut sums = be.sums(2).unwrap();
    relation_loss_identity(
        &be,
        GramSide { hidden: &h_s, hidden_size: hs, gram: &ms },
        GramSide { hidden: &h_t, hidden_size: ht, gram: &mt },
        images,
        scale,
        &mut dh,
        Some(&mut dm),
        &mut sums,
        1,
    )
    .unwrap();
    assert_eq!(sums[0], 0.0, "only the slot it was given");
    let v = sums[1];
    let dw_start = rng.vec(vs * hs, 1.0);
    let mut dw = dw_start.clone();
    head_gram_backward(&be, &w_s, vs, hs, kept, &dm, &mut dw).unwrap();

    let what = format!("rows {rows}, h {hs}/{ht}, V {vs}/{vt}, images {images:?}");
    assert!(rel(v, v0) <= TOL, "{what}: value {v} vs direct {v0}");
    let inc: Vec<f64> = dh.iter().zip(&start).map(|(a, b)| a - b).collect();
    let e = max_rel(&inc, &dh0);
    assert!(e <= TOL, "{what}: ∂H differs by {e:.2e}");
    let inc: Vec<f64> = dw.iter().zip(&dw_start).map(|(a, b)| a - b).collect();
    let e = max_rel(&inc[..kept * hs], &dw0_kept);
    assert!(e <= TOL, "{what}: ∂W[:kept] differs by {e:.2e}");
    assert!(inc[kept * hs..].iter().all(|&x| x == 0.0), "{what}: rows past kept must be untouched");
}

#[test]
fn relation_identity_matches_direct_form() {
    check_identity(19, 8, 12, 37, 41, &[(2, 6), (11, 7)], 70);
    check_identity(19, 8, 12, 43, 31, &[(0, 5), (9, 10)], 71);
    // More hidden units than visual rows, fewer than the vocabulary (the real regime is n < h < V).
    check_identity(30, 24, 40, 97, 97, &[(3, 20)], 72);
}

#[test]
fn relation_identity_at_728_visual_rows() {
    check_identity(731, 16, 24, 40, 48, &[(2, 728)], 73);
}

#[test]
fn relation_identity_zero_gram_gives_loss_one_without_gradient() {
    let be = B::new();
    let zero = vec![0.0; 16];
    let r = TestRng(5).vec(16, 1.0);
    let cosine = |rs: &Vec<f64>, rt: &Vec<f64>| {
        let (mut g, mut sums) = (vec![f64::NAN; 16], be.sums(1).unwrap());
        be.gram_cosine_into(rs, rt, 1.0, &mut g, &mut sums, 0).unwrap();
        (sums[0], g)
    };
    let (l, g) = cosine(&zero, &r);
    assert_eq!(l, 1.0);
    assert!(g.iter().all(|&x| x == 0.0), "{g:?}");
    // Equal Gram matrices: loss 0 and zero gradient.
    let (l, g) = cosine(&r, &r);
    assert!(l.abs() < 1e-15, "{l}");
    assert!(g.iter().all(|x| x.abs() < 1e-15));
}

#[test]
fn relation_identity_rejects_bad_shapes() {
    let be = B::new();
    let h = vec![0.0; 10 * 4];
    let m = vec![0.0; 16];
    let side = GramSide { hidden: &h, hidden_size: 4, gram: &m };
    let mut d = vec![0.0; 40];
    let mut sums = be.sums(1).unwrap();
    let e = relation_loss_identity(&be, side, side, &[(8, 4)], 1.0, &mut d, None, &mut sums, 0).unwrap_err();
    assert!(e.to_string().contains("rows 8..12") && e.to_string().contains("10 rows"), "{e}");
    let e = relation_loss_identity(&be, side, side, &[(0, 4), (2, 4)], 1.0, &mut d, None, &mut sums, 0).unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    let e = head_gram(&be, &vec![0.0; 12], 3, 4, 5).unwrap_err();
    assert!(e.to_string().contains("5 kept rows"), "{e}");
}

/// The FLOP counts the module documentation quotes (anchor: 4 images × 728 rows, V 151936,
/// student h 1024, teacher h 2560).
#[test]
fn relation_flop_counts_at_the_anchor_shape() {
    let n = 728f64;
    let v = 151936f64;
    let per_gram_direct = 2.0 * n * n * v;
    let per_gram_identity = |h: f64| 2.0 * (n * h * h + n * n * h);
    println!(
        "per image Gram: direct {:.2} GFLOP; identity h=1024 {:.3} GFLOP ({:.1}x), h=2560 {:.3} GFLOP ({:.1}x)",
        per_gram_direct / 1e9,
        per_gram_identity(1024.0) / 1e9,
        per_gram_direct / per_gram_identity(1024.0),
        per_gram_identity(2560.0) / 1e9,
        per_gram_direct / per_gram_identity(2560.0)
    );
    assert!((per_gram_direct / 1e9 - 161.05).abs() < 0.01);
    assert!((per_gram_identity(1024.0) / 1e9 - 2.612).abs() < 0.001);
    assert!((per_gram_identity(2560.0) / 1e9 - 12.256).abs() < 0.001);
    let f = relation_step_flops(4, 728, 151936, 1024, 2560);
    println!(
        "anchor step relation: direct {:.3} TFLOP, identity frozen {:.4} TFLOP, identity training {:.4} TFLOP, M_t once {:.3} TFLOP",
        f.direct / 1e12,
        f.identity_frozen / 1e12,
        f.identity_training / 1e12,
        f.teacher_gram_once / 1e12
    );
    assert!((f.direct / 1e12 - 1.933).abs() < 0.001, "{}", f.direct);
    assert!((f.identity_frozen / 1e12 - 0.0638).abs() < 0.0005, "{}", f.identity_frozen);
    assert!((f.identity_training / 1e12 - 0.7113).abs() < 0.0005, "{}", f.identity_training);
    assert!((f.teacher_gram_once / 1e12 - 1.991).abs() < 0.001);
}

// ---- kd-engine bench-step at a tiny scale ----

fn bench_step(dir: &std::path::Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let json = dir.join(format!("{name}.json"));
    let mut args = vec!["bench-step", "--device", "cpu", "--scale", "32", "--warmup", "0", "--json", json.to_str().unwrap()];
    if !extra.contains(&"--steps") {
        args.extend(["--steps", "1"]);
    }
    args.extend_from_slice(extra);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(&args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !stderr.contains("panicked"), "bench-step {extra:?} failed:\n{stderr}");
    assert!(stderr.contains("NOT the GPU anchor"), "the CPU run must say its figures are not the anchor:\n{stderr}");
    assert!(stdout.contains("tokens/s") && stdout.contains("teacher_forward"), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn bench_step_reports_every_phase_at_a_tiny_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let fused = bench_step(tmp.path(), "fused", &[]);
    assert_eq!(fused["scale"], 32);
    assert_eq!(fused["anchor"], false);
    assert_eq!(fused["head"], "fused");
    // 4 sequences of 1024/32 tokens: [1 prompt] [24 visual] [1 prompt] [6 response].
    assert_eq!(fused["shapes"]["batch"], 4);
    assert_eq!(fused["shapes"]["seq_len"], 32);
    assert_eq!(fused["shapes"]["layout"], serde_json::json!([1, 24, 1, 6]));
    assert_eq!(fused["tokens_per_step"], 128);
    assert_eq!(fused["shapes"]["logit_rows"], 4 * (24 + 6), "logits only for the rows a loss uses");
    let mut sum = 0.0;
    for p in ["vision", "teacher_forward", "student_forward", "loss", "backward", "optimizer"] {
        let ms = fused["phases"][p]["ms"].as_f64().unwrap_or_else(|| panic!("no phase {p}: {fused}"));
        assert!(ms >= 0.0, "{p}");
        assert!(fused["phases"][p]["tflop"].as_f64().is_some(), "{p}");
        sum += ms;
    }
    let step = fused["step_ms"].as_f64().unwrap();
    assert!((sum - step).abs() <= 1e-6 * step.max(1.0), "phases {sum} ms vs step {step} ms");
    let tps = fused["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 128.0 / (step / 1e3)).abs() <= 1e-6 * tps, "tokens/s {tps}");
    let mem = &fused["memory"];
    assert!(mem["peak_bytes"].as_u64().unwrap() > mem["weights_bytes"].as_u64().unwrap());
    assert!(mem["grads_bytes"].as_u64().unwrap() > 0 && mem["optimizer_bytes"].as_u64().unwrap() > 0);
    for k in ["total", "ce", "response", "visual", "relation"] {
        assert!(fused["loss"][k].as_f64().is_some_and(f64::is_finite), "loss {k}: {}", fused["loss"]);
    }
    // The three ways of computing the heads give the same loss.
    let total = |v: &serde_json::Value| v["loss"]["total"].as_f64().unwrap();
    for (name, extra) in [("logits", &["--relation", "logits"][..]), ("direct", &["--head", "direct"][..])] {
        let other = bench_step(tmp.path(), name, extra);
        let (a, b) = (total(&fused), total(&other));
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{name}: loss {b} vs fused identity {a}");
    }
    // Gradient checkpointing changes no bit: the loss of the third step (after two updates from
    // the recomputed gradients) is the plain run's exactly.
    let plain = bench_step(tmp.path(), "plain3", &["--steps", "3"]);
    let ckpt = bench_step(tmp.path(), "checkpointing3", &["--steps", "3", "--gradient-checkpointing"]);
    assert_eq!(ckpt["gradient_checkpointing"], true);
    assert_eq!(total(&plain).to_bits(), total(&ckpt).to_bits(), "checkpointing: {} vs {}", total(&ckpt), total(&plain));
}

#[test]
fn bench_step_on_cuda_without_a_cuda_backend_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine"))
        .args(["bench-step", "--device", "cuda", "--scale", "64", "--steps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return; // a build and machine with a CUDA backend wired in
    }
    assert!(!stderr.contains("panicked") && stderr.to_lowercase().contains("cuda"), "{stderr}");
}

/// With no arguments on a machine without a GPU, bench-step refuses rather than start the full
/// anchor (~25 GB, hours per step) on the CPU; it says what to pass.
#[test]
fn bench_step_on_the_cpu_without_scale_is_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine")).args(["bench-step", "--device", "cpu"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("needs --scale") && !stderr.contains("panicked"), "{stderr}");
}

/// `--dry-run` at the real anchor: the layout, the rows that get logits and the FLOPs (SPEC §5:
/// the step is ≈ 46 TFLOP with full logits), without allocating the models.
#[test]
fn bench_step_dry_run_describes_the_anchor() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kd-engine"))
            .args([&["bench-step", "--dry-run"][..], extra].concat())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let step_tflop = |out: &str| -> f64 {
        let line = out.lines().find(|l| l.trim_start().starts_with("step ")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let fused = run(&[]);
    assert!(fused.contains("4 × 1024 tokens, layout [32, 728, 32, 232], 3840 rows with logits"), "{fused}");
    assert!(fused.contains("4.839 B parameters"), "{fused}");
    let direct = run(&["--head", "direct"]);
    let (f, d) = (step_tflop(&fused), step_tflop(&direct));
    assert!((d - 46.6).abs() < 0.5, "direct step {d} TFLOP");
    assert!(f < d, "the fused head computes logits only for the rows a loss uses: {f} vs {d}");
}
