//! Batched greedy decoding of short answers, as the training study evaluates its models: a thin
//! front to [`super::generate::generate_mllm`] (KV cache, one packed prefill, vision features
//! computed once).

use anyhow::Result;

use super::generate::{generate_mllm, no_observer, GenerateOptions};
use super::sampling::Sampling;
use crate::backend::Backend;
use crate::data::EncodedSample;
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
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let opts = GenerateOptions { max_new_tokens, eos: stop.to_vec(), sampling: Sampling::Greedy };
    let out = generate_mllm(be, &state.model, &state.weights, prompts, &opts, &mut no_observer)?;
    Ok(out.sequences.into_iter().map(|g| g.tokens).collect())
}
