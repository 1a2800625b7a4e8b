//! Finite-difference gradient checks, in f64, of every op of the CPU backend that anything trains
//! through. Each check uses f(inputs) = Σ R ∘ op(inputs) with a random R, so dL/dout = R.

mod common;

use common::{check_grad, TestRng};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{AttnShape, Backend, Gemm, IGNORE_INDEX};

type B = CpuBackend<f64>;
const TOL: f64 = 1e-6;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn linear_layer_forward_and_both_gradients() {
    let be = B::new();
    let mut rng = TestRng(1);
    let (t, din, dout) = (5, 7, 3);
    let x = rng.vec(t * din, 1.0);
    let w = rng.vec(dout * din, 1.0);
    let r = rng.vec(t * dout, 1.0);
    let fwd = |x: &[f64], w: &[f64]| {
        let mut y = vec![0.0; t * dout];
        be.gemm(Gemm::linear(t, dout, din), &x.to_vec(), &w.to_vec(), &mut y).unwrap();
        y
    };
    // Forward against a naive triple loop.
    let y = fwd(&x, &w);
    for i in 0..t {
        for o in 0..dout {
            let want: f64 = (0..din).map(|k| x[i * din + k] * w[o * din + k]).sum();
            assert!((y[i * dout + o] - want).abs() < 1e-12);
        }
    }
    let mut dx = vec![0.0; t * din];
    be.gemm(Gemm::linear_input_grad(t, dout, din, false), &r, &w, &mut dx).unwrap();
    let mut dw = vec![0.0; dout * din];
    be.gemm(Gemm::linear_weight_grad(t, dout, din), &r, &x, &mut dw).unwrap();
    check_grad("linear dX", &x, &dx, 100, TOL, &mut |x| dot(&fwd(x, &w), &r));
    check_grad("linear dW", &w, &dw, 100, TOL, &mut |w| dot(&fwd(&x, w), &r));
}

#[test]
fn gemm_all_transpose_combinations_match_naive() {
    let be = B::new();
    let mut rng = TestRng(2);
    let (m, n, k) = (4, 5, 3);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = rng.vec(m * k, 1.0);
        let b = rng.vec(k * n, 1.0);
        let c0 = rng.vec(m * n, 1.0);
        let mut c = c0.clone();
        be.gemm(Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha: 2.0, beta: 0.5 }, &a, &b, &mut c).unwrap();
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| {
                        let av = if ta { a[p * m + i] } else { a[i * k + p] };
                        let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                        av * bv
                    })
                    .sum();
                assert!((c[i * n + j] - (2.0 * s + 0.5 * c0[i * n + j])).abs() < 1e-12, "ta={ta} tb={tb}");
            }
        }
    }
}

#[test]
fn bias_add_and_residual_add_gradients() {
    let be = B::new();
    let mut rng = TestRng(3);
    let (rows, cols) = (6, 4);
    let x = rng.vec(rows * cols, 1.0);
    let b = rng.vec(cols, 1.0);
    let r = rng.vec(rows * cols, 1.0);
    let f = |x: &[f64], b: &[f64]| {
        let mut y = x.to_vec();
        be.add_bias(&mut y, &b.to_vec(), rows).unwrap();
        let mut z = y.clone();
        be.add_assign(&mut z, &x.to_vec()).unwrap(); // residual: z = (x + b) + x
        dot(&z, &r)
    };
    let mut db = vec![0.0; cols];
    be.bias_grad(&r, &mut db, rows).unwrap();
    check_grad("bias", &b, &db, 100, TOL, &mut |b| f(&x, b));
    let dx: Vec<f64> = r.iter().map(|v| 2.0 * v).collect();
    check_grad("residual", &x, &dx, 100, TOL, &mut |x| f(x, &b));
}

#[test]
fn embedding_gather_and_scatter_add_with_repeated_ids() {
    let be = B::new();
    let mut rng = TestRng(4);
    let (rows, dim) = (9, 3);
    let ids = [3u32, 0, 3, 8, 3, 1];
    let table = rng.vec(rows * dim, 1.0);
    let r = rng.vec(ids.len() * dim, 1.0);
    let f = |table: &[f64]| {
        let mut out = vec![0.0; ids.len() * dim];
        be.embedding(&table.to_vec(), &ids, dim, &mut out).unwrap();
        dot(&out, &r)
    };
    let mut dtable = vec![0.0; rows * dim];
    be.embedding_backward(&r, &ids, dim, &mut dtable).unwrap();
    check_grad("embedding", &table, &dtable, 100, TOL, &mut |t| f(t));
    let mut out = vec![0.0; 2 * dim];
    let err = be.embedding(&table, &[1, 9], dim, &mut out).unwrap_err().to_string();
    assert!(err.contains("token id 9") && err.contains("position 1"), "{err}");
}

#[test]
fn rmsnorm_gradients() {
    let be = B::new();
    let mut rng = TestRng(5);
    let (rows, dim) = (4, 10);
    let x = rng.vec(rows * dim, 2.0);
    let w = rng.vec(dim, 1.0);
    let r = rng.vec(rows * dim, 1.0);
    let f = |x: &[f64], w: &[f64]| {
        let mut out = vec![0.0; rows * dim];
        let mut rstd = vec![0.0; rows];
        be.rmsnorm(&x.to_vec(), &w.to_vec(), 1e-6, &mut out, &mut rstd).unwrap();
        (out, rstd)
    };
    let (out, rstd) = f(&x, &w);
    // Forward against the definition.
    for i in 0..rows {
        let row = &x[i * dim..][..dim];
        let ms = row.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        for j in 0..dim {
            assert!((out[i * dim + j] - row[j] / (ms + 1e-6).sqrt() * w[j]).abs() < 1e-12);
        }
    }
    let mut dx = vec![0.0; rows * dim];
    let mut dw = vec![0.0; dim];
    be.rmsnorm_backward(&r, &x, &w, &rstd, &mut dx, &mut dw).unwrap();
    check_grad("rmsnorm dx", &x, &dx, 100, TOL, &mut |x| dot(&f(x, &w).0, &r));
    check_grad("rmsnorm dw", &w, &dw, 100, TOL, &mut |w| dot(&f(&x, w).0, &r));
}

/// Hugging Face's RoPE, as `apply_rotary_pos_emb` writes it, on `x [T, heads, d]`:
/// `x·cos + rotate_half(x)·sin`, cos and sin of `pos · θ^(−2(i mod d/2)/d)`; `inverse` negates the
/// angle (the transposed rotation).
fn rope_reference(x: &[f64], pos: &[u32], d: usize, theta: f64, inverse: bool) -> Vec<f64> {
    let row = x.len() / pos.len();
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = vec![0.0; x.len()];
    for (ti, &p) in pos.iter().enumerate() {
        for base in (ti * row..(ti + 1) * row).step_by(d) {
            for i in 0..d {
                let angle = sign * (p as f64) * theta.powf(-((2 * (i % (d / 2))) as f64) / d as f64);
                let rot = if i < d / 2 { -x[base + i + d / 2] } else { x[base + i - d / 2] };
                y[base + i] = x[base + i] * angle.cos() + rot * angle.sin();
            }
        }
    }
    y
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-12, "{what}: element {i}: {g} against {w}");
    }
}

/// `[T, a + b + c]` → its three column blocks (row by row).
fn split_columns(x: &[f64], widths: [usize; 3]) -> [Vec<f64>; 3] {
    let row = widths.iter().sum::<usize>();
    let mut parts = [Vec::new(), Vec::new(), Vec::new()];
    for r in x.chunks(row) {
        let mut off = 0;
        for (p, &w) in parts.iter_mut().zip(&widths) {
            p.extend_from_slice(&r[off..off + w]);
            off += w;
        }
    }
    parts
}

#[test]
fn qkv_split_rope_is_the_split_then_hf_rope_and_its_backward_is_the_gradient() {
    let be = B::new();
    let mut rng = TestRng(21);
    // GQA (4 query heads on 2 kv heads), multi-head (3 on 3), a head_dim whose half is odd (6).
    for (q_heads, kv_heads, d) in [(4usize, 2usize, 8usize), (3, 3, 4), (2, 1, 6)] {
        let pos = [0u32, 3, 1, 17, 2];
        let (t, theta) = (pos.len(), 1e4);
        let (qd, kd) = (q_heads * d, kv_heads * d);
        let what = format!("qkv_split_rope q_heads={q_heads} kv_heads={kv_heads} head_dim={d}");
        let qkv = rng.vec(t * (qd + 2 * kd), 1.0);
        let f = |qkv: &[f64]| {
            let (mut q, mut k, mut v) = (vec![f64::NAN; t * qd], vec![f64::NAN; t * kd], vec![f64::NAN; t * kd]);
            be.qkv_split_rope(&qkv.to_vec(), None, &pos, d, theta, &mut q, &mut k, &mut v).unwrap();
            (q, k, v)
        };
        let (q, k, v) = f(&qkv);
        // The definition: split the columns, then Hugging Face's RoPE on q and k.
        let [wq, wk, wv] = split_columns(&qkv, [qd, kd, kd]);
        assert_close(&q, &rope_reference(&wq, &pos, d, theta, false), &format!("{what}: q"));
        assert_close(&k, &rope_reference(&wk, &pos, d, theta, false), &format!("{what}: k"));
        assert_eq!(v, wv, "{what}: v");
        // With the projection's bias: the split of qkv with the bias added to every row first.
        let bias = rng.vec(qd + 2 * kd, 1.0);
        let (mut bq, mut bk, mut bv) = (vec![f64::NAN; t * qd], vec![f64::NAN; t * kd], vec![f64::NAN; t * kd]);
        be.qkv_split_rope(&qkv, Some(&bias), &pos, d, theta, &mut bq, &mut bk, &mut bv).unwrap();
        let mut biased = qkv.clone();
        be.add_bias(&mut biased, &bias, t).unwrap();
        assert_eq!((bq, bk, bv), f(&biased), "{what}: with bias");
        // The backward: dL/dqkv for L = Σ rq∘q + rk∘k + rv∘v.
        let (rq, rk, rv) = (rng.vec(t * qd, 1.0), rng.vec(t * kd, 1.0), rng.vec(t * kd, 1.0));
        let mut dqkv = vec![f64::NAN; qkv.len()];
        be.qkv_merge_rope_backward(&rq, &rk, &rv, &pos, d, theta, &mut dqkv).unwrap();
        check_grad(&what, &qkv, &dqkv, 200, TOL, &mut |x| {
            let (q, k, v) = f(x);
            dot(&q, &rq) + dot(&k, &rk) + dot(&v, &rv)
        });
        // … and it is the inverse rotation of dq and dk, then dv, placed as the columns were.
        let [gq, gk, gv] = split_columns(&dqkv, [qd, kd, kd]);
        assert_close(&gq, &rope_reference(&rq, &pos, d, theta, true), &format!("{what}: backward dq"));
        assert_close(&gk, &rope_reference(&rk, &pos, d, theta, true), &format!("{what}: backward dk"));
        assert_eq!(gv, rv, "{what}: backward dv");
    }
}

#[test]
fn swiglu_on_stacked_rows_is_silu_gate_times_up_and_its_backward_is_the_gradient() {
    let be = B::new();
    let mut rng = TestRng(22);
    for (rows, inter) in [(4usize, 5usize), (1, 1), (3, 16)] {
        let what = format!("swiglu {rows}x{inter}");
        let mut gate_up = rng.vec(rows * 2 * inter, 1.0);
        // Gates over SiLU's curved range, ups around 1.
        for r in gate_up.chunks_mut(2 * inter) {
            r[..inter].iter_mut().for_each(|g| *g *= 4.0);
        }
        let f = |gu: &[f64]| {
            let mut o = vec![f64::NAN; rows * inter];
            be.swiglu(&gu.to_vec(), inter, &mut o).unwrap();
            o
        };
        let out = f(&gate_up);
        let [g, u, _] = split_columns(&gate_up, [inter, inter, 0]);
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
        assert_close(&out, &want, &format!("{what}: forward against silu(gate)·up"));
        let r = rng.vec(rows * inter, 1.0);
        let mut dgu = vec![f64::NAN; gate_up.len()];
        be.swiglu_backward(&gate_up, inter, &r, &mut dgu).unwrap();
        check_grad(&what, &gate_up, &dgu, 200, TOL, &mut |x| dot(&f(x), &r));
    }
}

/// Asserts that `r` is an error whose message names `op` and contains `says` (the tensor it blames).
fn assert_err_names(r: anyhow::Result<()>, op: &str, says: &str, case: &str) {
    match r {
        Ok(()) => panic!("{op}, {case}: accepted"),
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains(op) && msg.contains(says), "{op}, {case}: the error does not say {says:?}: {msg}");
        }
    }
}

#[test]
fn fused_qkv_and_swiglu_ops_reject_bad_lengths() {
    let be = B::new();
    // T = 2, head_dim 4, q_dim 8 (2 heads), kv_dim 4 (1 head): rows of 16.
    const POS: [u32; 2] = [0, 1];
    let (pos, d) = (&POS, 4usize);
    let z = |n: usize| vec![0.0f64; n];
    // (fused, q, k, v, head_dim, positions)
    type Lens = (usize, usize, usize, usize, usize, &'static [u32]);
    let good: Lens = (32, 16, 8, 8, d, pos);
    // The case, its lengths, and the tensor the error must blame ("" for head_dim and positions).
    let cases: Vec<(&str, Lens, &str)> = vec![
        ("odd head_dim", (32, 16, 8, 8, 3, pos), ""),
        ("zero head_dim", (32, 16, 8, 8, 0, pos), ""),
        ("no positions", (32, 16, 8, 8, d, &[]), ""),
        ("q not whole heads", (33, 17, 8, 8, d, pos), "q"),
        ("empty q", (16, 0, 8, 8, d, pos), "q"),
        ("k not whole heads", (34, 16, 9, 9, d, pos), "k"),
        ("v shorter than k", (28, 16, 8, 4, d, pos), "v"),
        ("fused one short", (31, 16, 8, 8, d, pos), "qkv"),
        ("fused one long", (33, 16, 8, 8, d, pos), "qkv"),
    ];
    let run = |(fused, q, k, v, hd, p): Lens| -> [anyhow::Result<()>; 2] {
        let (mut qb, mut kb, mut vb, mut fb) = (z(q), z(k), z(v), z(fused));
        [
            be.qkv_split_rope(&z(fused), None, p, hd, 1e4, &mut qb, &mut kb, &mut vb),
            be.qkv_merge_rope_backward(&z(q), &z(k), &z(v), p, hd, 1e4, &mut fb),
        ]
    };
    let [a, b] = run(good);
    a.unwrap();
    b.unwrap();
    for (case, lens, tensor) in cases {
        let [split, merge] = run(lens);
        // The backward names its own tensors: dq, dk, dv, dqkv.
        let (says, dsays) = match tensor {
            "" if case.contains("head_dim") => (": head_dim".to_string(), ": head_dim".to_string()),
            "" => ("no positions".to_string(), "no positions".to_string()),
            t => (format!(": {t} has"), format!(": d{t} has")),
        };
        assert_err_names(split, "qkv_split_rope", &says, case);
        assert_err_names(merge, "qkv_merge_rope_backward", &dsays, case);
    }
    // The bias must be one row of the fused projection.
    let (mut qb, mut kb, mut vb) = (z(16), z(8), z(8));
    let short_bias = be.qkv_split_rope(&z(32), Some(&z(15)), pos, d, 1e4, &mut qb, &mut kb, &mut vb);
    assert_err_names(short_bias, "qkv_split_rope", "bias has 15", "bias one short");
    // swiglu: 3 rows of inter 5.
    let (gu, inter) = (z(30), 5usize);
    be.swiglu(&gu, inter, &mut z(15)).unwrap();
    be.swiglu_backward(&gu, inter, &z(15), &mut z(30)).unwrap();
    assert_err_names(be.swiglu(&gu, 0, &mut z(15)), "swiglu", "inter", "inter 0");
    assert_err_names(be.swiglu(&z(31), inter, &mut z(15)), "swiglu", ": gate_up has", "gate_up not whole rows");
    assert_err_names(be.swiglu(&gu, 4, &mut z(15)), "swiglu", ": gate_up has", "gate_up not rows of 2·inter");
    assert_err_names(be.swiglu(&gu, inter, &mut z(16)), "swiglu", ": out has", "out too long");
    assert_err_names(be.swiglu_backward(&gu, 0, &z(15), &mut z(30)), "swiglu_backward", "inter", "inter 0");
    assert_err_names(be.swiglu_backward(&z(29), inter, &z(15), &mut z(30)), "swiglu_backward", ": gate_up has", "gate_up not whole rows");
    assert_err_names(be.swiglu_backward(&gu, inter, &z(14), &mut z(30)), "swiglu_backward", ": dout has", "dout short");
    assert_err_names(be.swiglu_backward(&gu, inter, &z(15), &mut z(29)), "swiglu_backward", " dgate_up has", "dgate_up short");
}

/// Naive attention, written independently from the definition (softmax(QKᵀ/√d + mask)·V).
fn naive_attention(shape: AttnShape, lens: &[usize], q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let (h, hkv, d) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let t: usize = lens.iter().sum();
    let mut out = vec![0.0; t * h * d];
    let mut start = 0;
    for &len in lens {
        for i in 0..len {
            for head in 0..h {
                let kh = head / (h / hkv);
                let qi = &q[((start + i) * h + head) * d..][..d];
                let keys: Vec<usize> = (0..len).filter(|&j| !shape.causal || j <= i).collect();
                let s: Vec<f64> = keys
                    .iter()
                    .map(|&j| dot(qi, &k[((start + j) * hkv + kh) * d..][..d]) / (d as f64).sqrt())
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (&j, sj) in keys.iter().zip(&s) {
                    let p = (sj - m).exp() / z;
                    for c in 0..d {
                        out[((start + i) * h + head) * d + c] += p * v[((start + j) * hkv + kh) * d + c];
                    }
                }
            }
        }
        start += len;
    }
    out
}

fn check_attention(causal: bool) {
    let be = B::new();
    let mut rng = TestRng(if causal { 8 } else { 9 });
    let shape = AttnShape { n_heads: 4, n_kv_heads: 2, head_dim: 6, causal };
    let lens = [5usize, 1, 7];
    let t: usize = lens.iter().sum();
    let (qd, kvd) = (4 * 6, 2 * 6);
    let q = rng.vec(t * qd, 1.0);
    let k = rng.vec(t * kvd, 1.0);
    let v = rng.vec(t * kvd, 1.0);
    let r = rng.vec(t * qd, 1.0);
    let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
        let mut out = vec![0.0; t * qd];
        let mut lse = vec![0.0; t * 4];
        be.attention(shape, &lens, &q.to_vec(), &k.to_vec(), &v.to_vec(), &mut out, &mut lse).unwrap();
        (out, lse)
    };
    let (out, lse) = fwd(&q, &k, &v);
    let want = naive_attention(shape, &lens, &q, &k, &v);
    assert!(out.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12), "attention forward vs naive");
    let (mut dq, mut dk, mut dv) = (vec![0.0; t * qd], vec![0.0; t * kvd], vec![0.0; t * kvd]);
    be.attention_backward(shape, &lens, &q, &k, &v, &out, &lse, &r, &mut dq, &mut dk, &mut dv).unwrap();
    check_grad("attention dq", &q, &dq, 150, TOL, &mut |q| dot(&fwd(q, &k, &v).0, &r));
    check_grad("attention dk", &k, &dk, 150, TOL, &mut |k| dot(&fwd(&q, k, &v).0, &r));
    check_grad("attention dv", &v, &dv, 150, TOL, &mut |v| dot(&fwd(&q, &k, v).0, &r));
}

#[test]
fn causal_gqa_attention_over_packed_sequences_gradients() {
    check_attention(true);
}

#[test]
fn bidirectional_attention_gradients() {
    check_attention(false);
}

#[test]
fn cross_entropy_with_ignored_rows_value_and_gradient() {
    let be = B::new();
    let mut rng = TestRng(10);
    let (rows, vocab) = (5, 11);
    let logits = rng.vec(rows * vocab, 3.0);
    let targets = [3, IGNORE_INDEX, 10, 0, IGNORE_INDEX];
    let scale = 1.0 / 3.0;
    let f = |z: &[f64]| {
        let mut d = vec![0.0; rows * vocab];
        be.cross_entropy(&z.to_vec(), &targets, vocab, scale as f32, &mut d).unwrap() * scale
    };
    // Value against −log softmax written out.
    let mut want = 0.0;
    for (r, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        let row = &logits[r * vocab..][..vocab];
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        want += lse - row[t as usize];
    }
    assert!((f(&logits) - want * scale).abs() < 1e-12);
    let mut d = vec![0.0; rows * vocab];
    be.cross_entropy(&logits, &targets, vocab, scale as f32, &mut d).unwrap();
    assert!(d[vocab..2 * vocab].iter().all(|&x| x == 0.0), "ignored rows get no gradient");
    check_grad("cross_entropy", &logits, &d, 200, TOL, &mut |z| f(z));
    let err = be.cross_entropy(&logits, &[3, 11, 0, 0, 0], vocab, 1.0, &mut d).unwrap_err().to_string();
    assert!(err.contains("target 11") && err.contains("row 1"), "{err}");
}

#[test]
fn gelu_erf_and_tanh_values_and_gradients() {
    use kd_engine::backend::GeluKind;
    let be = B::new();
    // Reference values: x·Φ(x) with erf from tables (erf(1/√2) = 0.6826894921370859,
    // erf(√2) = 0.9544997361036416, erf(3/√2) = 0.9973002039367398).
    let x = vec![1.0, 2.0, -3.0, 0.0];
    let mut y = vec![0.0; 4];
    be.gelu(&x, &mut y, GeluKind::Erf).unwrap();
    let want = [0.5 * (1.0 + 0.6826894921370859), 1.0 * (1.0 + 0.9544997361036416), -1.5 * (1.0 - 0.9973002039367398), 0.0];
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 1e-14, "gelu erf {g} vs {w}");
    }
    be.gelu(&x, &mut y, GeluKind::Tanh).unwrap();
    for (&xi, &g) in x.iter().zip(&y) {
        let w = 0.5 * xi * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xi + 0.044715 * xi.powi(3))).tanh());
        assert!((g - w).abs() < 1e-14, "gelu tanh {g} vs {w}");
    }
    let mut rng = TestRng(11);
    let x = rng.vec(40, 4.0);
    let r = rng.vec(40, 1.0);
    for kind in [GeluKind::Erf, GeluKind::Tanh] {
        let f = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            be.gelu(&x.to_vec(), &mut y, kind).unwrap();
            dot(&y, &r)
        };
        let mut dx = vec![0.0; 40];
        be.gelu_backward(&x, &r, &mut dx, kind).unwrap();
        check_grad(&format!("gelu {kind:?}"), &x, &dx, 40, TOL, &mut |x| f(x));
    }
}

#[test]
fn layernorm_matches_definition() {
    let be = B::new();
    let mut rng = TestRng(12);
    let (rows, dim) = (3, 9);
    let x = rng.vec(rows * dim, 3.0);
    let w = rng.vec(dim, 1.0);
    let b = rng.vec(dim, 1.0);
    let mut out = vec![0.0; rows * dim];
    be.layernorm(&x, &w, &b, 1e-6, &mut out).unwrap();
    for i in 0..rows {
        let row = &x[i * dim..][..dim];
        let mean = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
        for j in 0..dim {
            let want = (row[j] - mean) / (var + 1e-6).sqrt() * w[j] + b[j];
            assert!((out[i * dim + j] - want).abs() < 1e-12);
        }
    }
}
