//! Parameters that stack several Hugging Face tensors by rows (`qkv_proj`, `gate_up_proj`) keep
//! speaking Hugging Face tensor names outside the compute:
//!
//! * loading from a safetensors file of separate tensors puts each in its rows; a missing or
//!   mis-shaped part is named;
//! * a training checkpoint (weights, and the optimizer state written by ZeRO-1 ranks) holds the
//!   Hugging Face tensors, reads back bit-identically at another world size, and a checkpoint
//!   written with the plain layout loads into the stacked one;
//! * the LLaVA export writes Hugging Face tensors only, which `load_llava` reads back (into the
//!   model's own layout) with identical values.
//!
//! The stacked layout here comes from the test's own regrouping of the decoder's Hugging Face
//! tensors, independent of how `Llm::new` lays its parameters out.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::Backend;
use kd_engine::dist::{run_threads, Collective, DistOptions, GradSync};
use kd_engine::model::{
    export_llava, find_hf, load_llava, Arch, ExportOptions, FeatureSelect, Llm, LlmConfig, Mllm, MllmWeights, ParamSet, ParamSpec, VisionConfig, VisionTower,
};
use kd_engine::optim::AdamWConfig;
use kd_engine::train::checkpoint::{self, TrainState};
use kd_engine::weights::{write_safetensors, NamedTensor, StoreDtype, WeightSource};

type Be = CpuBackend<f32>;

fn llm_cfg() -> LlmConfig {
    LlmConfig {
        arch: Arch::Qwen2,
        hidden: 32,
        intermediate: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        vocab: 40,
        rms_eps: 1e-6,
        rope_theta: 1e6,
        tie_embeddings: false,
        qkv_bias: true,
        o_bias: false,
    }
}

/// The decoder's parameters as plain Hugging Face tensors, whatever layout `Llm::new` uses.
fn plain_llm_specs() -> Vec<ParamSpec> {
    Llm::new(llm_cfg()).specs.iter().flat_map(ParamSpec::hf_specs).collect()
}

/// Plain `specs` with each layer's q/k/v weights (and biases) stacked into `qkv_proj` and gate/up into
/// `gate_up_proj`, at the place of the first of them.
fn restack(specs: &[ParamSpec]) -> Vec<ParamSpec> {
    let by_name = |n: &str| specs.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no {n}"));
    let group = |prefix: &str, members: &[&str], suffix: &str, stacked: &str| {
        let parts: Vec<(String, usize)> = members
            .iter()
            .map(|m| {
                let n = format!("{prefix}{m}{suffix}");
                let rows = by_name(&n).shape[0];
                (n, rows)
            })
            .collect();
        let first = by_name(&parts[0].0);
        ParamSpec::stacked(format!("{prefix}{stacked}{suffix}"), parts, first.shape.get(1).copied(), first.decay)
    };
    let mut out = Vec::new();
    for s in specs {
        let n = s.name.as_str();
        if let Some(p) = n.strip_suffix("q_proj.weight") {
            out.push(group(p, &["q_proj", "k_proj", "v_proj"], ".weight", "qkv_proj"));
        } else if let Some(p) = n.strip_suffix("q_proj.bias") {
            out.push(group(p, &["q_proj", "k_proj", "v_proj"], ".bias", "qkv_proj"));
        } else if let Some(p) = n.strip_suffix("gate_proj.weight") {
            out.push(group(p, &["gate_proj", "up_proj"], ".weight", "gate_up_proj"));
        } else if !["k_proj.", "v_proj.", "up_proj."].iter().any(|m| n.contains(m)) {
            out.push(s.clone());
        }
    }
    out
}

/// A distinct value for every element of every parameter (exact in f32).
fn val(kind: u32, set: usize, tensor: usize, i: usize) -> f32 {
    (kind as usize * 4_000_000 + set * 1_000_000 + tensor * 20_000 + i) as f32 * 0.25
}

fn set_with_values(be: &Be, specs: &[ParamSpec], kind: u32, set: usize) -> ParamSet<Vec<f32>> {
    let bufs = specs.iter().enumerate().map(|(t, s)| be.upload(&(0..s.numel()).map(|i| val(kind, set, t, i)).collect::<Vec<_>>()).unwrap()).collect();
    ParamSet { specs: specs.to_vec(), bufs }
}

/// The values of HF tensor `name` in `set`: the parameter holding it and its element range there,
/// worked out here from the parts' rows (not through `hf_tensors`/`find_hf`).
fn hf_values(set: &ParamSet<Vec<f32>>, name: &str) -> Vec<f32> {
    for (spec, buf) in set.specs.iter().zip(&set.bufs) {
        if spec.parts.is_empty() && spec.name == name {
            return buf.clone();
        }
        let row: usize = spec.shape[1..].iter().product();
        let mut start = 0;
        for p in &spec.parts {
            if p.name == name {
                return buf[start..start + p.rows * row].to_vec();
            }
            start += p.rows * row;
        }
    }
    panic!("no {name}")
}

fn all_hf_names(specs: &[ParamSpec]) -> Vec<String> {
    specs.iter().flat_map(|s| s.hf_tensors()).map(|t| t.name).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn the_restacked_layout_stacks_what_it_should() {
    let plain = plain_llm_specs();
    let stacked = restack(&plain);
    assert_eq!(stacked.iter().filter(|s| s.is_stacked()).count(), 3 * llm_cfg().layers);
    assert_eq!(all_hf_names(&stacked).len(), plain.len());
    let qkv = stacked.iter().find(|s| s.name == "model.layers.1.self_attn.qkv_proj.weight").unwrap();
    // q: 4 heads × 8, k and v: 2 kv heads × 8, each of hidden 32.
    assert_eq!(qkv.shape, vec![32 + 16 + 16, 32]);
    let gu = stacked.iter().find(|s| s.name == "model.layers.0.mlp.gate_up_proj.weight").unwrap();
    assert_eq!(gu.shape, vec![96, 32]);
}

#[test]
fn loading_puts_each_hf_tensor_in_its_rows_and_names_a_missing_or_misshaped_part() {
    let tmp = tempfile::tempdir().unwrap();
    let be = Be::new();
    let plain = plain_llm_specs();
    let stacked = restack(&plain);
    // The file: every HF tensor apart, tensor k's element i holding val(0, 0, k, i).
    let values: Vec<Vec<f32>> = plain.iter().enumerate().map(|(k, s)| (0..s.numel()).map(|i| val(0, 0, k, i)).collect()).collect();
    let write = |path: &Path, skip: Option<&str>, bad_shape: Option<&str>| {
        let tensors: Vec<NamedTensor> = plain
            .iter()
            .zip(&values)
            .filter(|(s, _)| Some(s.name.as_str()) != skip)
            .map(|(s, v)| {
                let shape = if Some(s.name.as_str()) == bad_shape { vec![s.numel(), 1] } else { s.shape.clone() };
                NamedTensor { name: format!("pre.{}", s.name), shape, data: v }
            })
            .collect();
        write_safetensors(path, &tensors).unwrap();
    };
    let good = tmp.path().join("good.safetensors");
    write(&good, None, None);
    let set = ParamSet::load(&be, &stacked, &WeightSource::open(&good).unwrap(), "pre.").unwrap();
    // Independent reference: the qkv weight of layer 1 is q's rows, then k's, then v's.
    let idx = |n: &str| plain.iter().position(|s| s.name == n).unwrap();
    let (qkv, _) = find_hf(&stacked, "model.layers.1.self_attn.q_proj.weight").unwrap();
    let mut want = Vec::new();
    for m in ["q_proj", "k_proj", "v_proj"] {
        want.extend(&values[idx(&format!("model.layers.1.self_attn.{m}.weight"))]);
    }
    assert_eq!(bits(set.get(qkv)), bits(&want));
    for (k, s) in plain.iter().enumerate() {
        assert_eq!(bits(&hf_values(&set, &s.name)), bits(&values[k]), "{}", s.name);
    }

    let missing = tmp.path().join("missing.safetensors");
    write(&missing, Some("model.layers.1.mlp.up_proj.weight"), None);
    let e = ParamSet::load(&be, &stacked, &WeightSource::open(&missing).unwrap(), "pre.").err().unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("pre.model.layers.1.mlp.up_proj.weight is missing") && e.contains("missing.safetensors"), "{e}");

    let misshaped = tmp.path().join("misshaped.safetensors");
    write(&misshaped, None, Some("model.layers.0.self_attn.v_proj.bias"));
    let e = ParamSet::load(&be, &stacked, &WeightSource::open(&misshaped).unwrap(), "pre.").err().unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("pre.model.layers.0.self_attn.v_proj.bias has shape"), "{e}");
}

fn projector_specs() -> Vec<ParamSpec> {
    vec![ParamSpec::matrix("linear_1.weight".into(), 8, 6), ParamSpec::vector("linear_1.bias".into(), 8)]
}

fn weights(be: &Be, llm_specs: &[ParamSpec]) -> MllmWeights<Vec<f32>> {
    MllmWeights {
        vision: ParamSet { specs: Vec::new(), bufs: Vec::new() },
        projector: set_with_values(be, &projector_specs(), 0, 0),
        llm: set_with_values(be, llm_specs, 0, 1),
    }
}

fn zero_weights(be: &Be, llm_specs: &[ParamSpec]) -> MllmWeights<Vec<f32>> {
    MllmWeights {
        vision: ParamSet { specs: Vec::new(), bufs: Vec::new() },
        projector: ParamSet::zeros(be, &projector_specs()).unwrap(),
        llm: ParamSet::zeros(be, llm_specs).unwrap(),
    }
}

const SETS: [&str; 2] = ["projector", "llm"];
const PIECE: usize = 64;

fn zero_opts() -> DistOptions {
    DistOptions { zero: true, bucket_elems: 1 << 20, overlap: false }
}

fn opt_cfg() -> AdamWConfig {
    AdamWConfig { piece_elems: PIECE, master_weights: true, ..AdamWConfig::default() }
}

#[test]
fn a_checkpoint_holds_hf_tensors_and_resumes_bit_identically_at_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().to_path_buf();
    let be = Be::new();
    let stacked = restack(&plain_llm_specs());
    let largest_stacked = stacked.iter().filter(|s| s.is_stacked()).map(ParamSpec::numel).max().unwrap();
    assert!(largest_stacked > 4 * PIECE, "stacked parameters must span several optimizer pieces");
    let w = Arc::new(weights(&be, &stacked));

    // Two ZeRO-1 ranks: each sets the moments of the pieces it owns (m = val 1, v = val 2 at the
    // element's index in its parameter; the master copies are the weights), rank 0 gathers and
    // writes the checkpoint.
    let (w2, dir2) = (w.clone(), run_dir.clone());
    let held = run_threads(2, Duration::from_secs(5), move |g| {
        let be = Be::new();
        let sets = [&w2.projector, &w2.llm];
        let sync = GradSync::new(&g as &dyn Collective<Be>, zero_opts(), &sets, opt_cfg());
        let mut opt = sync.optimizer(&be, &sets)?;
        let mut n = 0;
        for (p, st) in opt.pieces.iter().zip(opt.state.iter_mut()) {
            if let Some(st) = st {
                st.m = (p.start..p.start + p.len).map(|i| val(1, p.set, p.tensor, i)).collect();
                st.v = (p.start..p.start + p.len).map(|i| val(2, p.set, p.tensor, i)).collect();
                n += 1;
            }
        }
        if let Some(tensors) = sync.optimizer_tensors(&be, &opt, &SETS)? {
            let state = TrainState { optimizer_step: 7, ..TrainState::default() };
            checkpoint::write(&be, &dir2, &state, &w2, Some(&tensors))?;
        }
        Ok(n)
    })
    .unwrap();
    assert!(held.iter().all(|&n| n > 0), "both ranks own pieces: {held:?}");
    let ckpt = checkpoint::latest(&run_dir).unwrap();
    checkpoint::verify(&ckpt).unwrap();

    // The files hold Hugging Face tensors with the values of their rows.
    let hf: Vec<(usize, String)> =
        [projector_specs(), stacked.clone()].iter().enumerate().flat_map(|(set, specs)| all_hf_names(specs).into_iter().map(move |n| (set, n))).collect();
    let wsrc = WeightSource::open(&ckpt.join("weights.safetensors")).unwrap();
    let want: BTreeSet<String> = hf.iter().map(|(set, n)| format!("{}.{n}", SETS[*set])).collect();
    assert_eq!(wsrc.names().map(str::to_string).collect::<BTreeSet<_>>(), want);
    let osrc = WeightSource::open(&ckpt.join("optimizer.safetensors")).unwrap();
    let want: BTreeSet<String> = ["m", "v", "master"].iter().flat_map(|k| hf.iter().map(move |(set, n)| format!("{k}.{}.{n}", SETS[*set]))).collect();
    assert_eq!(osrc.names().map(str::to_string).collect::<BTreeSet<_>>(), want);
    let specs = [projector_specs(), stacked.clone()];
    for (set, name) in &hf {
        let (id, range) = find_hf(&specs[*set], name).unwrap();
        let shape = specs[*set][id.0].hf_tensors().into_iter().find(|t| &t.name == name).unwrap().shape;
        let expect = |kind| bits(&range.clone().map(|i| val(kind, *set, id.0, i)).collect::<Vec<_>>());
        let read = |src: &WeightSource, n: String| bits(&src.read_f32(&n, &shape).unwrap());
        assert_eq!(read(&wsrc, format!("{}.{name}", SETS[*set])), expect(0), "weights {name}");
        assert_eq!(read(&osrc, format!("m.{}.{name}", SETS[*set])), expect(1), "m {name}");
        assert_eq!(read(&osrc, format!("v.{}.{name}", SETS[*set])), expect(2), "v {name}");
        assert_eq!(read(&osrc, format!("master.{}.{name}", SETS[*set])), expect(0), "master {name}");
    }

    // Weights come back bit-identically.
    let mut fresh = zero_weights(&be, &stacked);
    checkpoint::load_weights(&be, &ckpt, &mut fresh).unwrap();
    assert_eq!(fresh.projector.bufs, w.projector.bufs);
    assert_eq!(fresh.llm.bufs, w.llm.bufs);

    // Three ZeRO-1 ranks resume: each piece's moments and master copy are the ones written.
    let ck = ckpt.clone();
    let pieces = run_threads(3, Duration::from_secs(5), move |g| {
        let be = Be::new();
        let z = zero_weights(&be, &restack(&plain_llm_specs()));
        let sets = [&z.projector, &z.llm];
        let sync = GradSync::new(&g as &dyn Collective<Be>, zero_opts(), &sets, opt_cfg());
        let mut opt = sync.optimizer(&be, &sets)?;
        checkpoint::load_optimizer(&be, &ck, &mut opt, &SETS, 7)?;
        anyhow::ensure!(opt.step == 7);
        let mut n = 0;
        for (p, st) in opt.pieces.iter().zip(&opt.state) {
            let Some(st) = st else { continue };
            let want = |kind| bits(&(p.start..p.start + p.len).map(|i| val(kind, p.set, p.tensor, i)).collect::<Vec<_>>());
            anyhow::ensure!(bits(&st.m) == want(1), "m of piece {p:?}");
            anyhow::ensure!(bits(&st.v) == want(2), "v of piece {p:?}");
            anyhow::ensure!(st.master.as_ref().map(|m| bits(m)) == Some(want(0)), "master of piece {p:?}");
            n += 1;
        }
        Ok(n)
    })
    .unwrap();
    let total = kd_engine::optim::pieces(&[&projector_specs(), &stacked], PIECE).len();
    assert_eq!(pieces.iter().sum::<usize>(), total, "every piece restored on exactly one rank: {pieces:?}");
}

#[test]
fn a_checkpoint_of_the_plain_layout_loads_into_the_stacked_one() {
    let tmp = tempfile::tempdir().unwrap();
    let be = Be::new();
    let plain = plain_llm_specs();
    let stacked = restack(&plain);
    let w = weights(&be, &plain);
    let ckpt = checkpoint::write(&be, tmp.path(), &TrainState::default(), &w, None).unwrap();
    let mut fresh = zero_weights(&be, &stacked);
    checkpoint::load_weights(&be, &ckpt, &mut fresh).unwrap();
    for s in &plain {
        assert_eq!(bits(&hf_values(&fresh.llm, &s.name)), bits(&hf_values(&w.llm, &s.name)), "{}", s.name);
    }
    // And back: the stacked layout writes what the plain layout reads.
    let ckpt2 = checkpoint::write(&be, &tmp.path().join("again"), &TrainState::default(), &fresh, None).unwrap();
    let mut plain_again = zero_weights(&be, &plain);
    checkpoint::load_weights(&be, &ckpt2, &mut plain_again).unwrap();
    assert_eq!(plain_again.llm.bufs, w.llm.bufs);
}

#[test]
fn the_export_writes_hf_tensors_that_load_back_with_identical_values() {
    let tmp = tempfile::tempdir().unwrap();
    let be = Be::new();
    let vision = VisionConfig {
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 2,
        channels: 3,
        image_size: 14,
        patch_size: 7,
        ln_eps: 1e-6,
        act: kd_engine::backend::GeluKind::Tanh,
    };
    let mut mllm = Mllm::new(VisionTower::new(vision), Llm::new(llm_cfg()), -2, FeatureSelect::Patch).unwrap();
    let model_specs = mllm.llm.specs.clone();
    let plain_specs = plain_llm_specs();
    // Only the export's view of the layout changes: it writes from the specs and the buffers.
    mllm.llm.specs = restack(&plain_specs);
    let weights = MllmWeights {
        vision: set_with_values(&be, &mllm.vision.specs, 0, 2),
        projector: set_with_values(&be, &mllm.projector.specs, 0, 0),
        llm: set_with_values(&be, &mllm.llm.specs, 0, 1),
    };
    let dir = tmp.path().join("export");
    let opts = ExportOptions { image_token_id: Some(3), dtype: StoreDtype::F32, ..Default::default() };
    let summary = export_llava(&be, &dir, &mllm, &weights, &opts).unwrap();
    let n_plain = plain_specs.len() + all_hf_names(&mllm.vision.specs).len() + all_hf_names(&mllm.projector.specs).len();
    assert_eq!(summary.tensors, n_plain);
    let src = WeightSource::open(&dir).unwrap();
    assert_eq!(src.names().count(), n_plain);
    assert!(src.names().all(|n| !n.contains("qkv_proj") && !n.contains("gate_up_proj")));

    let loaded = load_llava(&be, &dir).unwrap();
    assert_eq!(loaded.mllm.llm.specs, model_specs);
    for s in &plain_specs {
        assert_eq!(bits(&hf_values(&loaded.weights.llm, &s.name)), bits(&hf_values(&weights.llm, &s.name)), "{}", s.name);
    }
    assert_eq!(loaded.weights.projector.bufs, weights.projector.bufs);
    assert_eq!(loaded.weights.vision.bufs, weights.vision.bufs);
}
