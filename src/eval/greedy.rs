//! Batched greedy decoding without a KV cache: every step re-runs the packed batch of unfinished
//! sequences and takes the arg-max of each one's last row. For the short answers of evaluation
//! sets this costs a few forwards of one packed batch; the vision features are computed once.

use anyhow::{ensure, Result};

use crate::backend::Backend;
use crate::data::{collate, EncodedSample, Group};
use crate::train::model_state::MllmState;

/// Greedy continuations (new tokens only, the stop token included when one was produced) of
/// each prompt, each with its preprocessed image or none.
pub fn greedy_answers<B: Backend>(
    be: &B,
    state: &MllmState<B::Buf>,
    prompts: Vec<(EncodedSample, Option<Vec<f32>>)>,
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let m = &state.model;
    let (h, v) = (m.llm.cfg.hidden, m.llm.cfg.vocab);
    let (nv, dv) = (m.visual_tokens(), m.vision.cfg.hidden);
    // Vision features once for every image; each step copies those of the unfinished sequences.
    let images: Vec<Vec<f32>> = prompts.iter().filter_map(|(_, p)| p.clone()).collect();
    let all_features = if images.is_empty() { None } else { Some(m.encode_images(be, &state.weights.vision, &images)?) };
    let mut image_of = Vec::with_capacity(prompts.len());
    let mut next_image = 0;
    for (_, p) in &prompts {
        image_of.push(p.as_ref().map(|_| {
            next_image += 1;
            next_image - 1
        }));
    }
    let mut seqs: Vec<EncodedSample> = prompts.into_iter().map(|(s, _)| s).collect();
    let mut out = vec![Vec::new(); seqs.len()];
    let mut active: Vec<usize> = (0..seqs.len()).collect();
    for _ in 0..max_new_tokens {
        if active.is_empty() {
            break;
        }
        let mut batch_items = Vec::with_capacity(active.len());
        let mut feats_of_active = Vec::new();
        for &i in &active {
            let pixels = image_of[i].map(|k| {
                feats_of_active.push(k);
                images[k].clone()
            });
            batch_items.push((seqs[i].clone(), pixels));
        }
        let batch = collate(batch_items)?;
        let features = match &all_features {
            Some(all) if !feats_of_active.is_empty() => {
                let mut f = be.zeros(feats_of_active.len() * nv * dv)?;
                for (j, &k) in feats_of_active.iter().enumerate() {
                    be.copy_range(all, k * nv * dv, &mut f, j * nv * dv, nv * dv)?;
                }
                Some(f)
            }
            _ => None,
        };
        let acts = m.forward(be, &state.weights, &batch, features)?;
        // The last row of each sequence predicts its next token.
        let mut last = be.zeros(active.len() * h)?;
        let mut end = 0;
        for (j, &len) in batch.seq_lens.iter().enumerate() {
            end += len;
            be.copy_range(&acts.llm.hidden, (end - 1) * h, &mut last, j * h, h)?;
        }
        let logits = be.download(&m.llm.lm_head(be, &state.weights.llm, &last)?)?;
        ensure!(logits.len() == active.len() * v, "greedy decoding: unexpected logits size");
        let mut still = Vec::with_capacity(active.len());
        for (j, &i) in active.iter().enumerate() {
            let row = &logits[j * v..(j + 1) * v];
            let next = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (t, &x)| if x > best.1 { (t, x) } else { best }).0 as u32;
            out[i].push(next);
            seqs[i].ids.push(next);
            seqs[i].groups.push(Group::Prompt);
            if !stop.contains(&next) {
                still.push(i);
            }
        }
        active = still;
    }
    Ok(out)
}
