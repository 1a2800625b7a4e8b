//! The distillation losses against their definitions (SPEC §1): f64 central-difference gradient
//! checks of the backend's softmax-KL and relation loss and of the whole LLaVA-KD objective, values
//! against the formulas written out naively here, row selection against hand-derived rows,
//! micro-batch invariance, and the errors.

mod common;

use common::{check_grad, TestRng};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{Backend, Divergence, KlShape, IGNORE_INDEX};
use kd_engine::data::template::Group;
use kd_engine::loss::{
    distill_loss, visual_ranges, DistillConfig, KlTargets, Logits, LossCounts, LossInputs, LossReport,
};

type B = CpuBackend<f64>;
const TOL: f64 = 1e-6;

fn log_softmax(z: &[f64], tau: f64) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b / tau));
    let lse = m + z.iter().map(|&v| (v / tau - m).exp()).sum::<f64>().ln();
    z.iter().map(|&v| v / tau - lse).collect()
}

/// τ²·KL(p_t‖p_s) of one row, written out.
fn naive_kl(zs: &[f64], zt: &[f64], tau: f64) -> f64 {
    let (ls, lt) = (log_softmax(zs, tau), log_softmax(zt, tau));
    tau * tau * ls.iter().zip(&lt).map(|(&a, &b)| if b.exp() == 0.0 { 0.0 } else { b.exp() * (b - a) }).sum::<f64>()
}

/// 1 − cos(vec Z_sZ_sᵀ, vec Z_tZ_tᵀ) with explicit loops.
fn naive_relation(s: &[f64], vs: usize, t: &[f64], vt: usize, kept: usize, start: usize, n: usize) -> f64 {
    let gram = |z: &[f64], v: usize| {
        let mut r = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                r[i * n + j] = (0..kept).map(|c| z[(start + i) * v + c] * z[(start + j) * v + c]).sum();
            }
        }
        r
    };
    let (rs, rt) = (gram(s, vs), gram(t, vt));
    let dot: f64 = rs.iter().zip(&rt).map(|(a, b)| a * b).sum();
    let ns = rs.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nt = rt.iter().map(|a| a * a).sum::<f64>().sqrt();
    1.0 - dot / (ns * nt)
}

fn check_softmax_kl(tau: f32) {
    let be = B::new();
    let mut rng = TestRng(100 + tau as u64);
    let (rows, vs, vt, kept) = (7, 13, 11, 9);
    let s = rng.vec(rows * vs, 3.0);
    let t = rng.vec(rows * vt, 3.0);
    let listed = [6u32, 0, 3, 2];
    let scale = 0.37;
    let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: tau, divergence: Divergence::Fkl };
    // The gradient is accumulated: start from random contents and look at the difference.
    let d0 = rng.vec(rows * vs, 1.0);
    let mut d = d0.clone();
    let sum = be.softmax_kl(&s, &t, shape, &listed, scale as f32, &mut d).unwrap();
    let want: f64 = listed
        .iter()
        .map(|&r| naive_kl(&s[r as usize * vs..][..kept], &t[r as usize * vt..][..kept], tau as f64))
        .sum();
    assert!((sum - want).abs() <= 1e-12 * want.abs(), "tau {tau}: value {sum} vs naive {want}");
    for r in 0..rows {
        for c in 0..vs {
            if !listed.contains(&(r as u32)) || c >= kept {
                assert_eq!(d[r * vs + c], d0[r * vs + c], "tau {tau}: row {r} col {c} must be untouched");
            }
        }
    }
    let grad: Vec<f64> = d.iter().zip(&d0).map(|(a, b)| a - b).collect();
    let f = |z: &[f64]| {
        let mut scratch = vec![0.0; rows * vs];
        be.softmax_kl(&z.to_vec(), &t, shape, &listed, scale as f32, &mut scratch).unwrap() * (scale as f32) as f64
    };
    check_grad(&format!("softmax_kl tau {tau}"), &s, &grad, 1000, TOL, &mut |z| f(z));
}

#[test]
fn softmax_kl_value_and_gradient_tau_1() {
    check_softmax_kl(1.0);
}

#[test]
fn softmax_kl_value_and_gradient_tau_2() {
    check_softmax_kl(2.0);
}

#[test]
fn softmax_kl_is_zero_for_equal_distributions_and_handles_zero_teacher_probability() {
    let be = B::new();
    let shape = KlShape { student_vocab: 4, teacher_vocab: 4, kept: 4, temperature: 1.0, divergence: Divergence::Fkl };
    // Row 0: identical rows (shifted by a constant: same softmax) → KL 0, gradient 0.
    // Row 1: teacher puts no mass on column 2 (−∞ logit) → 0·log 0 = 0, finite loss.
    let s = vec![0.5, -1.0, 2.0, 0.0, 0.3, 0.1, -0.2, 1.0];
    let t = vec![1.5, 0.0, 3.0, 1.0, 0.3, 0.1, f64::NEG_INFINITY, 1.0];
    let mut d = vec![0.0; 8];
    let v = be.softmax_kl(&s, &t, shape, &[0, 1], 1.0, &mut d).unwrap();
    assert!(d[..4].iter().all(|x| x.abs() < 1e-15), "{d:?}");
    let zt = [0.3, 0.1, 1.0];
    let pt: Vec<f64> = log_softmax(&zt, 1.0).iter().map(|x| x.exp()).collect();
    let ls = log_softmax(&s[4..], 1.0);
    let want = pt[0] * (pt[0].ln() - ls[0]) + pt[1] * (pt[1].ln() - ls[1]) + pt[2] * (pt[2].ln() - ls[3]);
    assert!((v - want).abs() < 1e-12, "{v} vs {want}");
    assert!((d[6] - ls[2].exp()).abs() < 1e-15, "gradient p_s − 0 on the zero-probability column");
}

#[test]
fn relation_loss_value_and_gradient_two_images() {
    let be = B::new();
    let mut rng = TestRng(200);
    let (rows, vs, vt, kept) = (11, 10, 12, 8);
    let s = rng.vec(rows * vs, 1.0);
    let t = rng.vec(rows * vt, 1.0);
    let images = [(6u32, 5u32), (1, 4)];
    let scale = 0.6;
    // Temperature is ignored by the relation loss.
    let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: 3.0, divergence: Divergence::Fkl };
    let d0 = rng.vec(rows * vs, 1.0);
    let mut d = d0.clone();
    let sum = be.relation_loss(&s, &t, shape, &images, scale as f32, &mut d).unwrap();
    let want: f64 =
        images.iter().map(|&(a, n)| naive_relation(&s, vs, &t, vt, kept, a as usize, n as usize)).sum();
    assert!((sum - want).abs() <= 1e-12 * want.abs(), "value {sum} vs naive {want}");
    for r in 0..rows {
        let in_image = images.iter().any(|&(a, n)| (a as usize..(a + n) as usize).contains(&r));
        for c in 0..vs {
            if !in_image || c >= kept {
                assert_eq!(d[r * vs + c], d0[r * vs + c], "row {r} col {c} must be untouched");
            }
        }
    }
    let grad: Vec<f64> = d.iter().zip(&d0).map(|(a, b)| a - b).collect();
    let f = |z: &[f64]| {
        let mut scratch = vec![0.0; rows * vs];
        be.relation_loss(&z.to_vec(), &t, shape, &images, scale as f32, &mut scratch).unwrap() * (scale as f32) as f64
    };
    check_grad("relation_loss", &s, &grad, 1000, TOL, &mut |z| f(z));
}

/// The real visual block size (728 tokens) with a small vocabulary: a directional derivative
/// checks the whole gradient at once, and the f32 backend agrees with the f64 one.
#[test]
fn relation_loss_at_728_visual_tokens() {
    let mut rng = TestRng(300);
    let (n, vs, vt, kept) = (728, 40, 48, 40);
    let rows = n + 3;
    let s = rng.vec(rows * vs, 1.0);
    let t = rng.vec(rows * vt, 1.0);
    let dir = rng.vec(rows * vs, 1.0);
    let images = [(2u32, n as u32)];
    let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: 1.0, divergence: Divergence::Fkl };
    let be = B::new();
    let mut d = vec![0.0; rows * vs];
    let v = be.relation_loss(&s, &t, shape, &images, 1.0, &mut d).unwrap();
    let f = |z: &[f64]| be.relation_loss(&z.to_vec(), &t, shape, &images, 1.0, &mut vec![0.0; rows * vs]).unwrap();
    let h = 1e-5;
    let plus: Vec<f64> = s.iter().zip(&dir).map(|(a, b)| a + h * b).collect();
    let minus: Vec<f64> = s.iter().zip(&dir).map(|(a, b)| a - h * b).collect();
    let numeric = (f(&plus) - f(&minus)) / (2.0 * h);
    let analytic: f64 = d.iter().zip(&dir).map(|(a, b)| a * b).sum();
    assert!((numeric - analytic).abs() <= 1e-6 * analytic.abs(), "directional derivative {numeric} vs {analytic}");
    let be32 = CpuBackend::<f32>::new();
    let s32: Vec<f32> = s.iter().map(|&x| x as f32).collect();
    let t32: Vec<f32> = t.iter().map(|&x| x as f32).collect();
    let mut d32 = vec![0.0f32; rows * vs];
    let v32 = be32.relation_loss(&s32, &t32, shape, &images, 1.0, &mut d32).unwrap();
    assert!((v32 - v).abs() <= 1e-4 * v, "f32 {v32} vs f64 {v}");
    let d64: Vec<f32> = d.iter().map(|&x| x as f32).collect();
    assert!(common::max_rel_diff(&d32, &d64) < 1e-4, "f32 gradient off by {}", common::max_rel_diff(&d32, &d64));
}

/// `softmax_kl_ce` is `cross_entropy` on the listed labelled rows plus `softmax_kl`: the same
/// loss sums bit for bit, the gradient to rounding (added into a non-zero gradient in another
/// order), rows outside the list untouched; with V_s ≠ V_t and τ = 2.
#[test]
fn softmax_kl_with_fused_ce_equals_the_two_ops() {
    let be = B::new();
    let mut rng = TestRng(31);
    let (rows, vs, vt, kept) = (6, 13, 11, 9);
    let s = rng.vec(rows * vs, 3.0);
    let t = rng.vec(rows * vt, 3.0);
    let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept, temperature: 2.0, divergence: Divergence::Fkl };
    let listed = [4u32, 0, 3, 1];
    let labels = [7, 12, IGNORE_INDEX, 0]; // row 3 is distilled without a label
    let d0 = rng.vec(rows * vs, 1.0);

    let mut d = d0.clone();
    let (kl, ce) = be.softmax_kl_ce(&s, &t, shape, &listed, &labels, 0.3, 0.7, &mut d).unwrap();

    let mut targets = vec![IGNORE_INDEX; rows];
    for (&r, &l) in listed.iter().zip(&labels) {
        targets[r as usize] = l;
    }
    let mut dce = vec![0.0; rows * vs];
    let want_ce = be.cross_entropy(&s, &targets, vs, 0.7, &mut dce).unwrap();
    let mut want_d = d0.clone();
    be.add_assign(&mut want_d, &dce).unwrap();
    let want_kl = be.softmax_kl(&s, &t, shape, &listed, 0.3, &mut want_d).unwrap();
    assert_eq!((kl, ce), (want_kl, want_ce));
    let naive_ce: f64 = [(4usize, 7usize), (0, 12), (1, 0)].iter().map(|&(r, l)| -log_softmax(&s[r * vs..(r + 1) * vs], 1.0)[l]).sum();
    assert!((ce - naive_ce).abs() < 1e-12 * naive_ce, "{ce} vs {naive_ce}");
    for (i, (a, b)) in d.iter().zip(&want_d).enumerate() {
        assert!((a - b).abs() <= 1e-15 * b.abs().max(1.0), "gradient element {i}: {a} vs {b}");
    }
    assert_eq!(d[2 * vs..3 * vs], d0[2 * vs..3 * vs], "row 2 is not listed: untouched");
    assert_eq!(d[5 * vs..], d0[5 * vs..]);

    let err = |labels: &[i32]| be.softmax_kl_ce(&s, &t, shape, &listed[..labels.len()], labels, 1.0, 1.0, &mut d.clone()).unwrap_err().to_string();
    let e = err(&[1, 13]);
    assert!(e.contains("target 13") && e.contains("row 0"), "{e}");
    let e = be.softmax_kl_ce(&s, &t, shape, &listed, &[1], 1.0, 1.0, &mut d).unwrap_err().to_string();
    assert!(e.contains("1 targets for 4 rows"), "{e}");
}

#[test]
fn backend_distill_ops_reject_bad_shapes_and_rows() {
    let be = B::new();
    let shape = KlShape { student_vocab: 5, teacher_vocab: 6, kept: 5, temperature: 1.0, divergence: Divergence::Fkl };
    let s = vec![0.0; 4 * 5];
    let t = vec![0.0; 4 * 6];
    let mut d = vec![0.0; 4 * 5];
    let err = |r: anyhow::Result<f64>| r.unwrap_err().to_string();
    let e = err(be.softmax_kl(&s, &t, shape, &[1, 4], 1.0, &mut d));
    assert!(e.contains("row 4") && e.contains("4 rows"), "{e}");
    let e = err(be.softmax_kl(&s, &t, shape, &[2, 1, 2], 1.0, &mut d));
    assert!(e.contains("row 2 is listed twice"), "{e}");
    let e = err(be.softmax_kl(&s, &t, KlShape { kept: 6, ..shape }, &[0], 1.0, &mut d));
    assert!(e.contains("6 kept columns"), "{e}");
    let e = err(be.softmax_kl(&s, &t[..18].to_vec(), shape, &[0], 1.0, &mut d));
    assert!(e.contains("teacher logits"), "{e}");
    let e = err(be.softmax_kl(&s, &t, KlShape { temperature: 0.0, ..shape }, &[0], 1.0, &mut d));
    assert!(e.contains("temperature"), "{e}");
    let e = err(be.softmax_kl(&s, &t, shape, &[0], 1.0, &mut vec![0.0; 3]));
    assert!(e.contains("student gradient"), "{e}");
    let e = err(be.relation_loss(&s, &t, shape, &[(0, 2), (1, 2)], 1.0, &mut d));
    assert!(e.contains("overlap"), "{e}");
    let e = err(be.relation_loss(&s, &t, shape, &[(2, 3)], 1.0, &mut d));
    assert!(e.contains("rows 2..5") && e.contains("4 rows"), "{e}");
    let e = err(be.relation_loss(&s, &t, shape, &[(2, 0)], 1.0, &mut d));
    assert!(e.contains("no visual rows"), "{e}");
}

// ---- the objective ----

use Group::{Pad as Pd, Prompt as P, Response as R, Visual as V};

/// A packed batch: A = an image sample, B = a text-only two-turn sample.
struct Batch {
    ids: Vec<u32>,
    groups: Vec<Group>,
    seq_lens: Vec<usize>,
    images: Vec<std::ops::Range<usize>>,
}

impl Batch {
    fn new(seqs: &[&[Group]], vocab: usize, rng: &mut TestRng) -> Self {
        let groups: Vec<Group> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let seq_lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let ids = groups.iter().map(|&g| if g == V { 0 } else { rng.below(vocab) as u32 }).collect();
        let images = visual_ranges(&groups, &seq_lens).unwrap();
        Batch { ids, groups, seq_lens, images }
    }
    fn inputs(&self) -> LossInputs<'_> {
        LossInputs { ids: &self.ids, groups: &self.groups, seq_lens: &self.seq_lens, images: &self.images }
    }
}

const SEQ_A: &[Group] = &[P, P, P, V, V, V, V, V, P, P, R, R, R];
const SEQ_B: &[Group] = &[P, P, R, R, R, P, P, P, R, R];

fn all_terms() -> DistillConfig {
    DistillConfig {
        ce: true,
        alpha: 0.8,
        beta: 0.6,
        gamma: 0.5,
        targets: KlTargets { response: true, prompt: true, visual: true },
        mdist: true,
        rdist: true,
        temperature: 2.0,
        divergence: Divergence::Fkl,
    }
}

fn run(
    cfg: &DistillConfig,
    b: &Batch,
    s: &[f64],
    vs: usize,
    t: Option<(&[f64], usize)>,
    step: &LossCounts,
) -> anyhow::Result<(LossReport, Vec<f64>)> {
    let be = B::new();
    let mut d = vec![f64::NAN; s.len()]; // written, not accumulated: stale contents must not matter
    let s = s.to_vec();
    let t = t.map(|(t, v)| (t.to_vec(), v));
    let rep = distill_loss(
        &be,
        cfg,
        &b.inputs(),
        Logits { data: &s, vocab: vs },
        t.as_ref().map(|(t, v)| Logits { data: t, vocab: *v }),
        step,
        &mut d,
    )?;
    Ok((rep, d))
}

#[test]
fn row_selection_follows_spec() {
    // seq 0: P V V P R R   seq 1: P R R P R   seq 2: V V R Pd (padding at the end)
    let groups = [P, V, V, P, R, R, P, R, R, P, R, V, V, R, Pd];
    let seq_lens = [6, 5, 4];
    let ids: Vec<u32> = (0..groups.len() as u32).map(|i| 10 + i).collect();
    let images = visual_ranges(&groups, &seq_lens).unwrap();
    assert_eq!(images, vec![1..3, 11..13]);
    let inputs = LossInputs { ids: &ids, groups: &groups, seq_lens: &seq_lens, images: &images };
    inputs.validate().unwrap();
    let rows = inputs.rows();
    // Row j predicts token j+1 of the same sequence; rows 5 and 10 end their sequences, row 14 is
    // the last row (and padding).
    assert_eq!(rows.response, vec![3, 4, 6, 7, 9, 12]);
    assert_eq!(rows.prompt, vec![2, 8]);
    assert_eq!(rows.visual, vec![1, 2, 11, 12]);
    let targets = inputs.ce_targets().unwrap();
    let want: Vec<i32> = (0..15)
        .map(|j| if [3, 4, 6, 7, 9, 12].contains(&j) { 10 + j + 1 } else { IGNORE_INDEX })
        .collect();
    assert_eq!(targets, want);
    let c = LossCounts::of(&inputs).unwrap();
    assert_eq!(c, LossCounts { ce: 6, response: 6, prompt: 2, visual: 4, images: 2 });
    // Across the boundary between seq 0 and seq 1: row 5 (R) is followed by row 6 (P) of another
    // sequence, so row 5 is in no shifted term.
    assert!(!rows.prompt.contains(&5));
    // Left padding: a padding row predicts nothing, even when a prompt token follows it.
    let groups = [Pd, Pd, P, R, R, Pd, P];
    let ids = [0u32; 7];
    let inputs = LossInputs { ids: &ids, groups: &groups, seq_lens: &[5, 2], images: &[] };
    let rows = inputs.rows();
    assert_eq!((rows.response, rows.prompt, rows.visual), (vec![2, 3], vec![], vec![]));
}

#[test]
fn whole_objective_gradient_all_terms_packed_batch() {
    let mut rng = TestRng(400);
    let (vs, vt) = (11, 14);
    let b = Batch::new(&[SEQ_A, SEQ_B], vs, &mut rng);
    let n = b.groups.len();
    let s = rng.vec(n * vs, 2.0);
    let t = rng.vec(n * vt, 2.0);
    let cfg = all_terms();
    // Step counts larger than the batch's (as if other micro-batches were in the step).
    let mut step = LossCounts::of(&b.inputs()).unwrap();
    assert_eq!(step, LossCounts { ce: 8, response: 8, prompt: 8, visual: 5, images: 1 });
    step += LossCounts { ce: 3, response: 3, prompt: 2, visual: 4, images: 1 };
    let (n_ce, n_prompt, n_vis) = (11.0, 10.0, 9.0);
    let (rep, d) = run(&cfg, &b, &s, vs, Some((&t, vt)), &step).unwrap();
    // Terms against the naive formulas, means over the step-wide counts.
    let kept = vs.min(vt);
    let kl = |rows: &[u32]| -> f64 {
        rows.iter().map(|&r| naive_kl(&s[r as usize * vs..][..kept], &t[r as usize * vt..][..kept], 2.0)).sum()
    };
    let rows = b.inputs().rows();
    let mut ce = 0.0;
    for &r in &rows.response {
        let ls = log_softmax(&s[r as usize * vs..][..vs], 1.0);
        ce -= ls[b.ids[r as usize + 1] as usize];
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-3);
    assert!(close(rep.ce, ce / n_ce), "ce {} vs {}", rep.ce, ce / n_ce);
    assert!(close(rep.response.unwrap(), kl(&rows.response) / n_ce));
    assert!(close(rep.prompt.unwrap(), kl(&rows.prompt) / n_prompt));
    assert!(close(rep.visual.unwrap(), kl(&rows.visual) / n_vis));
    let rel = naive_relation(&s, vs, &t, vt, kept, b.images[0].start, b.images[0].len());
    assert!(close(rep.relation.unwrap(), rel / 2.0));
    let want_total = rep.ce
        + 0.8f32 as f64 * (rep.response.unwrap() + rep.prompt.unwrap())
        + 0.6f32 as f64 * rep.visual.unwrap()
        + 0.5 * rep.relation.unwrap();
    assert!(close(rep.total, want_total));
    // The gradient of the total against central differences of the total, every coordinate. The
    // total is ≈ 12 while gradient entries are ~1e-3 (means over ~10 rows), so the differences carry
    // ~1e-9 of rounding noise (ε·12/h): the tolerance is a little looser than for single ops.
    let f = |z: &[f64]| run(&cfg, &b, z, vs, Some((&t, vt)), &step).unwrap().0.total;
    check_grad("LLaVA-KD objective", &s, &d, 10_000, 5e-6, &mut |z| f(z));
    // The last row of each sequence has no term using it (no next token, not visual).
    let last_a = SEQ_A.len() - 1;
    assert!(d[last_a * vs..][..vs].iter().all(|&x| x == 0.0));
    assert!(d[(n - 1) * vs..].iter().all(|&x| x == 0.0));
}

#[test]
fn whole_objective_gradient_with_each_non_default_divergence() {
    // The stage's divergence reaches every MDist term (response, prompt, visual): the value of
    // each against the mean of the per-row softmax_kl sums (tests/divergences.rs checks those
    // against the definitions), and the gradient of the total against central differences.
    let mut rng = TestRng(410);
    let (vs, vt) = (11, 14);
    let b = Batch::new(&[SEQ_A, SEQ_B], vs, &mut rng);
    let n = b.groups.len();
    let s = rng.vec(n * vs, 2.0);
    let t = rng.vec(n * vt, 2.0);
    let step = LossCounts::of(&b.inputs()).unwrap();
    let rows = b.inputs().rows();
    for name in ["rkl", "skl", "jsd", "tvd", "skew_fkl", "skew_rkl"] {
        let div = Divergence::parse(name, None).unwrap();
        let cfg = DistillConfig { divergence: div, ..all_terms() };
        let (rep, d) = run(&cfg, &b, &s, vs, Some((&t, vt)), &step).unwrap();
        let shape = KlShape { student_vocab: vs, teacher_vocab: vt, kept: vs.min(vt), temperature: 2.0, divergence: div };
        let term = |rows: &[u32], count: usize| {
            let mut scratch = vec![0.0; n * vs];
            B::new().softmax_kl(&s, &t, shape, rows, 1.0, &mut scratch).unwrap() / count as f64
        };
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-3);
        assert!(close(rep.response.unwrap(), term(&rows.response, step.response)), "{name} response");
        assert!(close(rep.prompt.unwrap(), term(&rows.prompt, step.prompt)), "{name} prompt");
        assert!(close(rep.visual.unwrap(), term(&rows.visual, step.visual)), "{name} visual");
        let f = |z: &[f64]| run(&cfg, &b, z, vs, Some((&t, vt)), &step).unwrap().0.total;
        check_grad(&format!("LLaVA-KD objective, {name}"), &s, &d, 2_000, 5e-6, &mut |z| f(z));
    }
}

#[test]
fn micro_batches_add_up_to_the_whole_step() {
    let mut rng = TestRng(500);
    let (vs, vt) = (9, 7);
    let seq_c: &[Group] = &[V, V, V, V, R, R, R];
    let whole = Batch::new(&[SEQ_A, SEQ_B, seq_c], vs, &mut rng);
    let n = whole.groups.len();
    let s = rng.vec(n * vs, 2.0);
    let t = rng.vec(n * vt, 2.0);
    let cfg = all_terms();
    let step = LossCounts::of(&whole.inputs()).unwrap();
    let (rep, d) = run(&cfg, &whole, &s, vs, Some((&t, vt)), &step).unwrap();
    // Micro-batch 1 = [A], micro-batch 2 = [B, C]: same step counts.
    let cut = SEQ_A.len();
    let part = |lo: usize, hi: usize, lens: Vec<usize>| Batch {
        ids: whole.ids[lo..hi].to_vec(),
        groups: whole.groups[lo..hi].to_vec(),
        images: visual_ranges(&whole.groups[lo..hi], &lens).unwrap(),
        seq_lens: lens,
    };
    let m1 = part(0, cut, vec![SEQ_A.len()]);
    let m2 = part(cut, n, vec![SEQ_B.len(), seq_c.len()]);
    let c1 = LossCounts::of(&m1.inputs()).unwrap();
    let c2 = LossCounts::of(&m2.inputs()).unwrap();
    assert_eq!(c1 + c2, step);
    assert_eq!([c1, c2].into_iter().sum::<LossCounts>(), step);
    let (r1, d1) = run(&cfg, &m1, &s[..cut * vs], vs, Some((&t[..cut * vt], vt)), &step).unwrap();
    let (r2, d2) = run(&cfg, &m2, &s[cut * vs..], vs, Some((&t[cut * vt..], vt)), &step).unwrap();
    let mut sum = r1;
    sum.add(&r2);
    for (name, a, b) in [
        ("ce", sum.ce, rep.ce),
        ("res", sum.response.unwrap(), rep.response.unwrap()),
        ("prompt", sum.prompt.unwrap(), rep.prompt.unwrap()),
        ("vis", sum.visual.unwrap(), rep.visual.unwrap()),
        ("rel", sum.relation.unwrap(), rep.relation.unwrap()),
        ("total", sum.total, rep.total),
    ] {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{name}: micro-batches {a} vs whole {b}");
    }
    let joined: Vec<f64> = d1.iter().chain(&d2).copied().collect();
    assert!(joined.iter().zip(&d).all(|(a, b)| (a - b).abs() <= 1e-15), "gradients differ");
}

#[test]
fn cross_entropy_off_leaves_the_distillation_terms_alone() {
    // With `ce` off the objective is the distillation terms alone: the gradient is the full
    // objective's minus the CE-only objective's (two independent runs), the total leaves CE out,
    // and CE is still measured for the report.
    let mut rng = TestRng(620);
    let (vs, vt) = (9, 12);
    let b = Batch::new(&[SEQ_A, SEQ_B], vs, &mut rng);
    let n = b.groups.len();
    let s = rng.vec(n * vs, 2.0);
    let t = rng.vec(n * vt, 2.0);
    let step = LossCounts::of(&b.inputs()).unwrap();
    let off = DistillConfig { ce: false, ..all_terms() };
    let (r_off, d_off) = run(&off, &b, &s, vs, Some((&t, vt)), &step).unwrap();
    let (r_all, d_all) = run(&all_terms(), &b, &s, vs, Some((&t, vt)), &step).unwrap();
    let (r_ce, d_ce) = run(&DistillConfig::ce_only(), &b, &s, vs, None, &step).unwrap();
    assert_eq!(r_off.ce, r_ce.ce, "CE is measured even when off");
    assert!(r_ce.ce > 0.1);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
    assert!(close(r_off.total, r_all.total - r_ce.ce), "total {} vs {} − {}", r_off.total, r_all.total, r_ce.ce);
    let want = 0.8f32 as f64 * (r_off.response.unwrap() + r_off.prompt.unwrap()) + 0.6f32 as f64 * r_off.visual.unwrap() + 0.5 * r_off.relation.unwrap();
    assert!(close(r_off.total, want));
    for (i, ((o, a), c)) in d_off.iter().zip(&d_all).zip(&d_ce).enumerate() {
        assert!((o - (a - c)).abs() <= 1e-12, "∂/∂z[{i}]: CE off {o} vs all − CE-only {}", a - c);
    }
    let f = |z: &[f64]| run(&off, &b, z, vs, Some((&t, vt)), &step).unwrap().0.total;
    check_grad("objective without CE", &s, &d_off, 10_000, 5e-6, &mut |z| f(z));
    // Nothing left to train on is refused.
    let none = DistillConfig { ce: false, mdist: false, rdist: false, ..all_terms() };
    let e = run(&none, &b, &s, vs, Some((&t, vt)), &step).unwrap_err().to_string();
    assert!(e.contains("no term"), "{e}");
}

#[test]
fn switches_select_the_terms() {
    let mut rng = TestRng(600);
    let (vs, vt) = (8, 8);
    let b = Batch::new(&[SEQ_A, SEQ_B], vs, &mut rng);
    let n = b.groups.len();
    let s = rng.vec(n * vs, 2.0);
    let t = rng.vec(n * vt, 2.0);
    let step = LossCounts::of(&b.inputs()).unwrap();
    // Cross-entropy only: no teacher needed, equals the backend's cross-entropy mean.
    let (ce_rep, ce_d) = run(&DistillConfig::ce_only(), &b, &s, vs, None, &step).unwrap();
    assert_eq!((ce_rep.response, ce_rep.prompt, ce_rep.visual, ce_rep.relation), (None, None, None, None));
    assert_eq!(ce_rep.total, ce_rep.ce);
    let be = B::new();
    let mut d = vec![0.0; n * vs];
    let targets = b.inputs().ce_targets().unwrap();
    assert_eq!(step.ce, 8);
    let want = be.cross_entropy(&s, &targets, vs, (1.0 / 8.0f64) as f32, &mut d).unwrap() / 8.0;
    assert!((ce_rep.ce - want).abs() < 1e-12);
    assert_eq!(ce_d, d);
    // The default stage config (α = β = 1, γ = 0.5; response + visual; τ = 1).
    let def = DistillConfig::default();
    assert_eq!((def.alpha, def.beta, def.gamma, def.temperature), (1.0, 1.0, 0.5, 1.0));
    let (r, _) = run(&def, &b, &s, vs, Some((&t, vt)), &step).unwrap();
    assert!(r.response.is_some() && r.prompt.is_none() && r.visual.is_some() && r.relation.is_some());
    // MDist off, RDist on.
    let cfg = DistillConfig { mdist: false, ..def };
    let (r, _) = run(&cfg, &b, &s, vs, Some((&t, vt)), &step).unwrap();
    assert!(r.response.is_none() && r.visual.is_none() && r.relation.is_some());
    // Only the visual target.
    let cfg = DistillConfig { rdist: false, targets: KlTargets { response: false, prompt: false, visual: true }, ..def };
    let (r, _) = run(&cfg, &b, &s, vs, Some((&t, vt)), &step).unwrap();
    assert!(r.response.is_none() && r.visual.is_some() && r.relation.is_none());
    // A teacher passed to a CE-only config is ignored.
    let (r, d2) = run(&DistillConfig::ce_only(), &b, &s, vs, Some((&t, vt)), &step).unwrap();
    assert_eq!((r, d2), (ce_rep, ce_d));
    // A text-only batch with all terms on: the visual terms are 0, with no rows.
    let text = Batch::new(&[SEQ_B], vs, &mut rng);
    let m = text.groups.len();
    let step = LossCounts::of(&text.inputs()).unwrap();
    let (r, _) = run(&all_terms(), &text, &s[..m * vs], vs, Some((&t[..m * vt], vt)), &step).unwrap();
    assert_eq!((r.visual, r.relation), (Some(0.0), Some(0.0)));
}

#[test]
#[allow(clippy::single_range_in_vec_init)]
fn objective_errors_are_clear() {
    let mut rng = TestRng(700);
    let (vs, vt) = (8, 10);
    let b = Batch::new(&[SEQ_A, SEQ_B], vs, &mut rng);
    let n = b.groups.len();
    let s = rng.vec(n * vs, 1.0);
    let t = rng.vec(n * vt, 1.0);
    let step = LossCounts::of(&b.inputs()).unwrap();
    let cfg = DistillConfig::default();
    let e = run(&cfg, &b, &s, vs, None, &step).unwrap_err().to_string();
    assert!(e.contains("teacher logits are required for L_res, L_vis, L_rel"), "{e}");
    let e = run(&cfg, &b, &s[..(n - 1) * vs], vs, Some((&t, vt)), &step).unwrap_err().to_string();
    assert!(e.contains("student logits") && e.contains(&format!("{n} rows × {vs}")), "{e}");
    let e = run(&cfg, &b, &s, vs, Some((&t, 9)), &step).unwrap_err().to_string();
    assert!(e.contains("teacher logits") && e.contains("× 9"), "{e}");
    let small = LossCounts { visual: 2, ..step };
    let e = run(&cfg, &b, &s, vs, Some((&t, vt)), &small).unwrap_err().to_string();
    assert!(e.contains("visual-KL rows (2)") && e.contains("(5)"), "{e}");
    let bad = DistillConfig { temperature: -1.0, ..cfg };
    assert!(run(&bad, &b, &s, vs, Some((&t, vt)), &step).unwrap_err().to_string().contains("temperature"));
    let bad = DistillConfig { gamma: f32::NAN, ..cfg };
    assert!(run(&bad, &b, &s, vs, Some((&t, vt)), &step).unwrap_err().to_string().contains("gamma"));
    // A response token id outside the student vocabulary.
    let mut b2 = Batch { ids: b.ids.clone(), groups: b.groups.clone(), seq_lens: b.seq_lens.clone(), images: b.images.clone() };
    b2.ids[11] = vs as u32;
    let e = run(&cfg, &b2, &s, vs, Some((&t, vt)), &step).unwrap_err().to_string();
    assert!(e.contains("target 8") && e.contains("row 10"), "{e}");
    // Layout errors.
    let check = |images: Vec<std::ops::Range<usize>>, seq_lens: Vec<usize>, want: &str| {
        let b3 = Batch { ids: b.ids.clone(), groups: b.groups.clone(), seq_lens, images };
        let e = run(&cfg, &b3, &s, vs, Some((&t, vt)), &step).unwrap_err().to_string();
        assert!(e.contains(want), "expected {want:?} in: {e}");
    };
    check(vec![3..9], vec![13, 10], "row 8 of group prompt");
    check(vec![3..7], vec![13, 10], "cover 4 rows but there are 5 visual positions");
    check(vec![3..5, 4..8], vec![13, 10], "overlap");
    check(vec![3..8], vec![13, 9], "sum to 22 but there are 23 positions");
    check(vec![3..8], vec![5, 18], "crosses the end of sequence 0");
    check(vec![3..3, 3..8], vec![13, 10], "empty row range");
    let e = visual_ranges(&[V, V, P, V], &[4]).unwrap_err().to_string();
    assert!(e.contains("more than one block"), "{e}");
}
