//! Cached and uncached decoding give the same logits: at every step of a KV-cache generation,
//! the logits the decoder chose from equal (to 1e-5 relative) the last row of a full forward of
//! the prompt plus the tokens generated so far. Checked for the LLM fixtures (batched, so
//! sequences of different lengths share the cache), for LLaVA (visual rows in the prefill), in f32
//! and f64; and the CPU decode ops against their definitions: the trait's default
//! `attention_decode` (which a backend without its own decode kernel runs) and a plain GEMM.

mod common;

use common::{fixture, max_rel_diff};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::{attention_decode_by_attention, AttnShape, Backend, Gemm};
use kd_engine::data::{EncodedSample, Group};
use kd_engine::eval::{generate_ids, generate_mllm, GenerateOptions, Sampling};
use kd_engine::model::{load_llava, mllm_logits, LoadedLlm};
use kd_engine::weights::WeightSource;

const LLMS: [&str; 4] = ["qwen2_gqa_tied", "qwen2_untied_sharded_bf16", "llama_f16", "qwen2_tied_long"];

fn prompts(dir: &std::path::Path) -> Vec<Vec<u32>> {
    let r = WeightSource::open(&dir.join("reference.safetensors")).unwrap();
    ["input_ids", "input_ids_b"].iter().map(|n| r.read_i64(n).unwrap().into_iter().map(|x| x as u32).collect()).collect()
}

/// Generates `max_new` tokens for both prompts in one batch, recording every step's logits, and
/// checks each against an uncached forward.
fn check_llm<B: Backend>(be: &B, name: &str, max_new: usize, tol: f64) {
    let dir = fixture(&format!("llm/{name}"));
    let llm = LoadedLlm::load(be, &dir, "").unwrap();
    let prompts = prompts(&dir);
    let mut steps: Vec<(usize, usize, Vec<f32>)> = Vec::new();
    let opts = GenerateOptions { max_new_tokens: max_new, eos: vec![], sampling: Sampling::Greedy };
    let out = generate_ids(be, &llm.model, &llm.weights, &prompts, &opts, &mut |s| {
        steps.push((s.seq, s.index, s.logits.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(steps.len(), 2 * max_new);
    let v = llm.model.cfg.vocab;
    let mut worst: f64 = 0.0;
    for (seq, index, logits) in &steps {
        let mut ids = prompts[*seq].clone();
        ids.extend_from_slice(&out.sequences[*seq].tokens[..*index]);
        let full = be.download(&llm.logits(be, &ids).unwrap()).unwrap();
        let d = max_rel_diff(logits, &full[(ids.len() - 1) * v..]);
        assert!(d <= tol, "{name}: sequence {seq}, step {index}: cached vs uncached logits differ by {d:.2e} (relative)");
        worst = worst.max(d);
    }
    eprintln!("{name} ({}): worst relative difference {worst:.2e}", be.name());
}

#[test]
fn cached_equals_uncached_llm_f32() {
    for name in LLMS {
        check_llm(&CpuBackend::<f32>::new(), name, 10, 1e-5);
    }
}

#[test]
fn cached_equals_uncached_llm_f64() {
    for name in LLMS {
        // Observers see logits as f32 (downloaded): equal f64 values may still round one ulp apart.
        check_llm(&CpuBackend::<f64>::new(), name, 10, 1e-7);
    }
}

/// Past the cache's first size (prompt + 64 answer positions) it grows, keeping what it holds.
#[test]
fn cache_grows_past_its_first_size() {
    check_llm(&CpuBackend::<f32>::new(), "qwen2_tied_long", 90, 1e-5);
}

#[test]
fn cached_equals_uncached_llava() {
    let be = CpuBackend::<f32>::new();
    for name in ["hf_qwen2_tied", "hf_llama_untied_bf16"] {
        let dir = fixture(&format!("llava/{name}"));
        let l = load_llava(&be, &dir).unwrap();
        let image = l.image_token_id.unwrap();
        let r = WeightSource::open(&dir.join("reference.safetensors")).unwrap();
        let ids: Vec<u32> = r.read_i64("input_ids").unwrap().into_iter().map(|x| x as u32).collect();
        let pixels = r.read_f32("pixel_values", &[3, 28, 28]).unwrap();
        let groups = ids.iter().map(|&i| if i == image { Group::Visual } else { Group::Prompt }).collect();
        let sample = EncodedSample { ids: ids.clone(), groups, has_image: true };
        let mut steps: Vec<(usize, Vec<f32>)> = Vec::new();
        let opts = GenerateOptions { max_new_tokens: 8, eos: vec![], sampling: Sampling::Greedy };
        let out = generate_mllm(&be, &l.mllm, &l.weights, vec![(sample, Some(pixels.clone()))], &opts, &mut |s| {
            steps.push((s.index, s.logits.to_vec()));
            Ok(())
        })
        .unwrap();
        let v = l.mllm.llm.cfg.vocab;
        for (index, logits) in &steps {
            let mut full_ids = ids.clone();
            full_ids.extend_from_slice(&out.sequences[0].tokens[..*index]);
            let full = mllm_logits(&be, &l.mllm, &l.weights, &full_ids, Some(&pixels), image).unwrap();
            let d = max_rel_diff(logits, &full[(full_ids.len() - 1) * v..]);
            assert!(d <= 1e-5, "{name}: step {index}: cached vs uncached logits differ by {d:.2e}");
        }
    }
}

/// Random inputs for `attention_decode`: `[slots, cap, Hkv·D]` caches and `rows` queries.
fn decode_inputs(rng: &mut common::TestRng, shape: AttnShape, cap: usize, slots: usize, rows: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let kvd = shape.n_kv_heads * shape.head_dim;
    (rng.vec(rows * shape.n_heads * shape.head_dim, 1.0), rng.vec(slots * cap * kvd, 1.0), rng.vec(slots * cap * kvd, 1.0))
}

/// The CPU decode kernel against the trait's default (attention on the copied-out cache): GQA,
/// the head dims the SPEC names, several slots of different lengths, rows in another order
/// than the slots.
#[test]
fn cpu_attention_decode_equals_the_default_from_attention() {
    let cpu = CpuBackend::<f64>::new();
    let mut rng = common::TestRng(5);
    for (h, hkv, d) in [(6, 2, 8), (4, 4, 64), (14, 2, 64), (20, 20, 128), (16, 16, 72), (8, 1, 80)] {
        let shape = AttnShape { n_heads: h, n_kv_heads: hkv, head_dim: d, causal: false };
        let (cap, slots) = (13, 3);
        let (q, k, v) = decode_inputs(&mut rng, shape, cap, slots, 3);
        let (rows, lens) = ([2u32, 0, 1], [7usize, 1, 13]);
        let mut a = vec![0.0; 3 * h * d];
        let mut b = vec![0.0; 3 * h * d];
        cpu.attention_decode(shape, cap, &rows, &lens, &q, &k, &v, &mut a).unwrap();
        attention_decode_by_attention(&cpu, shape, cap, &rows, &lens, &q, &k, &v, &mut b).unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(diff < 1e-13, "heads {h}/{hkv}, dim {d}: {diff}");
        // Row 1 sees one cached position: its output is that value row (a softmax of one score is 1).
        for head in 0..h {
            let kh = head / (h / hkv);
            let got = &a[(h + head) * d..][..d];
            assert!(got.iter().zip(&v[kh * d..][..d]).all(|(x, y)| (x - y).abs() < 1e-14), "head {head}");
        }
    }
    // Bad arguments are errors, not panics.
    let shape = AttnShape { n_heads: 6, n_kv_heads: 2, head_dim: 8, causal: false };
    let (q, k, v) = decode_inputs(&mut rng, shape, 9, 3, 1);
    let mut o = vec![0.0; 48];
    // The CPU kernel and the trait's default run the same checks (`check_decode_args`).
    for (slot, len, want) in [(3u32, 1usize, "uses cache slot 3 of 3"), (0, 10, "attends to 10 of 9"), (0, 0, "attends to 0 of 9")] {
        let e = cpu.attention_decode(shape, 9, &[slot], &[len], &q, &k, &v, &mut o).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        let e = attention_decode_by_attention(&cpu, shape, 9, &[slot], &[len], &q, &k, &v, &mut o).unwrap_err().to_string();
        assert!(e.contains(want), "default: {e}");
    }
    let e = cpu.attention_decode(shape, 9, &[0, 1], &[1, 1], &q, &k, &v, &mut o).unwrap_err().to_string();
    assert!(e.contains("q has 48 elements, expected 96"), "{e}");
}

/// The CPU GEMM's few-row path (decoding's linear layers) against a plain f64 triple loop, with
/// transposed A, alpha and accumulation; and against the packed path on the same rows.
#[test]
fn few_row_gemm_equals_the_definition() {
    let cpu = CpuBackend::<f64>::new();
    let mut rng = common::TestRng(9);
    for (m, n, k, trans_a, alpha, beta) in [(1, 151, 64, false, 1.0, 0.0), (3, 70, 37, true, 0.5, 1.0), (8, 129, 200, false, 1.0, 1.0), (9, 33, 20, false, 1.0, 0.0)] {
        let a = rng.vec(m * k, 1.0);
        let b = rng.vec(n * k, 1.0);
        let c0 = rng.vec(m * n, 1.0);
        let g = Gemm { m, n, k, trans_a, trans_b: true, alpha, beta };
        let mut c = c0.clone();
        cpu.gemm(g, &a, &b, &mut c).unwrap();
        let mut worst: f64 = 0.0;
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| if trans_a { a[p * m + i] } else { a[i * k + p] } * b[j * k + p]).sum();
                let want = alpha as f64 * dot + beta as f64 * c0[i * n + j];
                worst = worst.max((c[i * n + j] - want).abs());
            }
        }
        assert!(worst < 1e-12, "m {m} n {n} k {k}: {worst}");
    }
}
