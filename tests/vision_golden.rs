//! The SigLIP vision tower against transformers (tests/fixtures/make_fixtures.py): every entry of
//! `hidden_states` and `last_hidden_state`, for a `SiglipVisionModel` (unprefixed names, f32) and a
//! dual-tower `SiglipModel` (nested vision_config with absent defaults, `vision_model.` names, bf16).

mod common;

use common::{fixture, max_rel_diff};
use kd_engine::backend::cpu::CpuBackend;
use kd_engine::backend::Backend;
use kd_engine::model::LoadedVision;
use kd_engine::weights::WeightSource;

fn check(name: &str) {
    let be = CpuBackend::<f32>::new();
    let v = LoadedVision::load(&be, &fixture(&format!("siglip/{name}"))).unwrap();
    let r = WeightSource::open(&fixture(&format!("siglip/{name}/reference.safetensors"))).unwrap();
    let read = |n: &str| {
        let shape = r.info(n).unwrap().shape.clone();
        (r.read_f32(n, &shape).unwrap(), shape)
    };
    let (pixels, _) = read("pixel_values");
    let (hs, hs_shape) = read("hidden_states");
    let (last, _) = read("last_hidden_state");
    let layers = v.tower.cfg.layers;
    assert_eq!(hs_shape[0], layers + 1);
    let out = v.tower.forward(&be, &v.weights, &[&pixels], layers).unwrap();
    let per = hs_shape[1] * hs_shape[2];
    for (l, got) in out.hidden_states.iter().enumerate() {
        let d = max_rel_diff(&be.download(got).unwrap(), &hs[l * per..][..per]);
        println!("{name}: hidden_states[{l}] max rel Δ {d:.2e}");
        assert!(d <= 1e-4, "{name}: hidden_states[{l}] differs by {d:.2e}");
    }
    let d = max_rel_diff(&be.download(out.last_hidden_state.as_ref().unwrap()).unwrap(), &last);
    println!("{name}: last_hidden_state max rel Δ {d:.2e}");
    assert!(d <= 1e-4, "{name}: last_hidden_state differs by {d:.2e}");
    // Stopping at hidden_states[-2] runs one block fewer and gives the same features.
    let upto = v.tower.resolve_layer(-2).unwrap();
    let early = v.tower.forward(&be, &v.weights, &[&pixels], upto).unwrap();
    assert!(early.last_hidden_state.is_none());
    assert_eq!(be.download(early.hidden_states.last().unwrap()).unwrap(), be.download(&out.hidden_states[upto]).unwrap());
    // Two images in one batch: each sees only itself.
    let twice = v.tower.forward(&be, &v.weights, &[&pixels, &pixels], layers).unwrap();
    let both = be.download(twice.last_hidden_state.as_ref().unwrap()).unwrap();
    assert!(max_rel_diff(&both[..last.len()], &last) <= 1e-4 && max_rel_diff(&both[last.len()..], &last) <= 1e-4);
}

#[test]
fn siglip_vision_model_matches_transformers() {
    check("tiny");
}

#[test]
fn dual_tower_siglip_model_bf16_matches_transformers() {
    check("dual_tower");
}

#[test]
fn feature_layer_indexing_follows_hf_hidden_states() {
    let be = CpuBackend::<f32>::new();
    let v = LoadedVision::load(&be, &fixture("siglip/tiny")).unwrap();
    assert_eq!(v.tower.resolve_layer(-1).unwrap(), 3);
    assert_eq!(v.tower.resolve_layer(-2).unwrap(), 2);
    assert_eq!(v.tower.resolve_layer(0).unwrap(), 0);
    let err = v.tower.resolve_layer(-5).unwrap_err().to_string();
    assert!(err.contains("out of range") && err.contains("4 entries"), "{err}");
    let err = v.tower.forward(&be, &v.weights, &[&[0.5f32; 10]], 3).err().unwrap().to_string();
    assert!(err.contains("image 0") && err.contains("[3, 28, 28]"), "{err}");
}
