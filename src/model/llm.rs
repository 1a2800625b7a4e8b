//! The decoder LLM (Qwen2 and LLaMA families): pre-norm blocks of RMSNorm → GQA attention with
//! RoPE → residual, RMSNorm → SwiGLU MLP → residual; final RMSNorm; LM head (tied or not).
//!
//! Generation runs the same block code (one `block` function) with a [`KvCache`]: [`Llm::prefill`] on the
//! packed prompts, then [`Llm::decode_step`] one token per sequence against the cache.
//!
//! The forward saves what the hand-written backward needs. The backward starts from the gradient
//! of the final normed hidden state (the LM head is separate, so the losses can run it on the rows
//! they use, chunk by chunk) and returns the gradient of the input embeddings, which DPT needs even
//! when no LLM weight trains: weight gradients are skipped when no gradient set is given.

use anyhow::{ensure, Context, Result};

use super::config::LlmConfig;
use super::params::{ParamId, ParamSet, ParamSpec};
use crate::backend::{AttnShape, Backend, Gemm};

/// Packed sequences: per-token positions (for RoPE) and per-sequence lengths (for attention).
#[derive(Clone, Debug, PartialEq)]
pub struct SeqLayout {
    pub positions: Vec<u32>,
    pub seq_lens: Vec<usize>,
}

impl SeqLayout {
    /// Sequences of the given lengths packed back to back, positions restarting at 0 in each.
    pub fn from_lens(seq_lens: &[usize]) -> Self {
        let positions = seq_lens.iter().flat_map(|&n| 0..n as u32).collect();
        SeqLayout { positions, seq_lens: seq_lens.to_vec() }
    }
    pub fn tokens(&self) -> usize {
        self.positions.len()
    }
}

/// One block's parameters. The Q/K/V projections are one parameter (`qkv_proj`: the three
/// Hugging Face weights stacked by rows, and their biases likewise) and so are gate and up
/// (`gate_up_proj`): one GEMM reads the normed input once for all of them, where three or two
/// GEMMs would read it again and launch again; loading, checkpoints and export still see the
/// Hugging Face tensors ([`ParamSpec::stacked`]).
struct LayerIds {
    ln1: ParamId,
    wqkv: ParamId,
    bqkv: Option<ParamId>,
    wo: ParamId,
    bo: Option<ParamId>,
    ln2: ParamId,
    gate_up: ParamId,
    down: ParamId,
}

impl LayerIds {
    /// The block's tensors: contiguous in the spec list (added one block at a time, `ln1` first).
    fn range(&self) -> std::ops::Range<usize> {
        self.ln1.0..self.down.0 + 1
    }
}

/// What one block's backward needs from its forward.
struct LayerActs<Buf> {
    x_in: Buf,
    rstd1: Buf,
    h1: Buf,
    q: Buf,
    k: Buf,
    v: Buf,
    attn: Buf,
    lse: Buf,
    x_mid: Buf,
    rstd2: Buf,
    h2: Buf,
    /// `[T, 2·intermediate]`: each row's gate projection, then its up projection.
    gate_up: Buf,
    act: Buf,
}

/// A block's output, and what its backward needs when the pass keeps it.
type BlockOutput<Buf> = (Buf, Option<LayerActs<Buf>>);

/// What a block keeps for its backward: everything, or (gradient checkpointing) only its input,
/// from which the backward recomputes the rest.
enum SavedBlock<Buf> {
    Full(LayerActs<Buf>),
    Input(Buf),
}

/// Saved state of one forward pass.
pub struct LlmActs<Buf> {
    layers: Vec<SavedBlock<Buf>>,
    x_final: Buf,
    rstd_final: Buf,
    /// The final normed hidden state `[T, hidden]`: the LM head's input.
    pub hidden: Buf,
    layout: SeqLayout,
}

/// Keys and values of past tokens for generation: per layer, `[slots, capacity, kv_heads·head_dim]`
/// for K and for V (after RoPE), and per slot how many positions are filled. One slot per
/// sequence of a batch, so sequences of different lengths decode side by side. Decoding steps
/// write into it in place; it is re-allocated only when [`KvCache::reserve`] must grow it.
pub struct KvCache<Buf> {
    /// Per layer: (K, V).
    layers: Vec<(Buf, Buf)>,
    lens: Vec<usize>,
    capacity: usize,
    kv_dim: usize,
}

impl<Buf> KvCache<Buf> {
    /// An empty cache of `slots` sequences of up to `capacity` tokens for a model of config `cfg`.
    pub fn new<B: Backend<Buf = Buf>>(be: &B, cfg: &LlmConfig, slots: usize, capacity: usize) -> Result<Self> {
        let kv_dim = cfg.kv_heads * cfg.head_dim;
        let n = slots
            .checked_mul(capacity)
            .and_then(|x| x.checked_mul(kv_dim))
            .ok_or_else(|| anyhow::anyhow!("KV cache of {slots} × {capacity} positions is too large"))?;
        let layers = (0..cfg.layers).map(|_| Ok((be.zeros(n)?, be.zeros(n)?))).collect::<Result<_>>()?;
        Ok(KvCache { layers, lens: vec![0; slots], capacity, kv_dim })
    }
    /// Filled positions of each slot.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Makes room for `positions` tokens per slot, keeping what is cached: the buffers are
    /// re-allocated (at least doubling) only when they are too small, so generation can start
    /// with a cache sized for the prompt and grow with the answer instead of reserving
    /// `max_new_tokens` up front.
    pub fn reserve<B: Backend<Buf = Buf>>(&mut self, be: &B, positions: usize) -> Result<()> {
        if positions <= self.capacity {
            return Ok(());
        }
        let cap = positions.max(2 * self.capacity);
        let (old, kvd, slots) = (self.capacity, self.kv_dim, self.lens.len());
        let n = slots
            .checked_mul(cap)
            .and_then(|x| x.checked_mul(kvd))
            .ok_or_else(|| anyhow::anyhow!("KV cache of {slots} × {cap} positions is too large"))?;
        for layer in &mut self.layers {
            for buf in [&mut layer.0, &mut layer.1] {
                let mut grown = be.zeros(n)?;
                for (slot, &len) in self.lens.iter().enumerate() {
                    be.copy_range(buf, slot * old * kvd, &mut grown, slot * cap * kvd, len * kvd)?;
                }
                *buf = grown;
            }
        }
        self.capacity = cap;
        Ok(())
    }

    /// Empties a slot so another sequence can use it.
    pub fn clear(&mut self, slot: usize) {
        if let Some(l) = self.lens.get_mut(slot) {
            *l = 0;
        }
    }
    fn check_model(&self, cfg: &LlmConfig) -> Result<()> {
        ensure!(
            self.layers.len() == cfg.layers && self.kv_dim == cfg.kv_heads * cfg.head_dim,
            "KV cache made for {} layers of width {}, the model has {} of width {}",
            self.layers.len(),
            self.kv_dim,
            cfg.layers,
            cfg.kv_heads * cfg.head_dim
        );
        Ok(())
    }
}

pub struct Llm {
    pub cfg: LlmConfig,
    pub specs: Vec<ParamSpec>,
    /// Gradient checkpointing: the training forward keeps only each block's input and the
    /// backward recomputes the block (one more forward of compute for ~1/15 of the activation
    /// memory; the gradients are bit-identical).
    pub gradient_checkpointing: bool,
    embed: ParamId,
    layers: Vec<LayerIds>,
    norm: ParamId,
    lm_head: ParamId,
}

impl Llm {
    pub fn new(cfg: LlmConfig) -> Self {
        let mut specs = Vec::new();
        let mut add = |s: ParamSpec| {
            specs.push(s);
            ParamId(specs.len() - 1)
        };
        let (h, i, d) = (cfg.hidden, cfg.intermediate, cfg.head_dim);
        let (qd, kvd) = (cfg.heads * d, cfg.kv_heads * d);
        let embed = add(ParamSpec::matrix("model.embed_tokens.weight".into(), cfg.vocab, h));
        let layers = (0..cfg.layers)
            .map(|l| {
                let p = format!("model.layers.{l}.");
                let qkv = |kind: &str| [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)].map(|(n, rows)| (format!("{p}self_attn.{n}.{kind}"), rows)).to_vec();
                let ln1 = add(ParamSpec::vector(format!("{p}input_layernorm.weight"), h));
                let wqkv = add(ParamSpec::stacked(format!("{p}self_attn.qkv_proj.weight"), qkv("weight"), Some(h), true));
                let bqkv = cfg.qkv_bias.then(|| add(ParamSpec::stacked(format!("{p}self_attn.qkv_proj.bias"), qkv("bias"), None, false)));
                let wo = add(ParamSpec::matrix(format!("{p}self_attn.o_proj.weight"), h, qd));
                let bo = cfg.o_bias.then(|| add(ParamSpec::vector(format!("{p}self_attn.o_proj.bias"), h)));
                let ln2 = add(ParamSpec::vector(format!("{p}post_attention_layernorm.weight"), h));
                let gate_up_parts = ["gate_proj", "up_proj"].map(|n| (format!("{p}mlp.{n}.weight"), i)).to_vec();
                let gate_up = add(ParamSpec::stacked(format!("{p}mlp.gate_up_proj.weight"), gate_up_parts, Some(h), true));
                let down = add(ParamSpec::matrix(format!("{p}mlp.down_proj.weight"), h, i));
                LayerIds { ln1, wqkv, bqkv, wo, bo, ln2, gate_up, down }
            })
            .collect();
        let norm = add(ParamSpec::vector("model.norm.weight".into(), h));
        let lm_head = if cfg.tie_embeddings {
            embed
        } else {
            add(ParamSpec::matrix("lm_head.weight".into(), cfg.vocab, h))
        };
        Llm { cfg, specs, gradient_checkpointing: false, embed, layers, norm, lm_head }
    }

    /// The embedding table's index in the spec list.
    pub fn embed_id(&self) -> usize {
        self.embed.0
    }

    /// The output head's index in the spec list (the embedding's when tied).
    pub fn lm_head_id(&self) -> usize {
        self.lm_head.0
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape { n_heads: self.cfg.heads, n_kv_heads: self.cfg.kv_heads, head_dim: self.cfg.head_dim, causal: true }
    }

    /// Token embeddings `[T, hidden]`.
    pub fn embed<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, ids: &[u32]) -> Result<B::Buf> {
        let mut x = be.empty(ids.len() * self.cfg.hidden)?;
        be.embedding(w.get(self.embed), ids, self.cfg.hidden, &mut x)?;
        Ok(x)
    }

    /// Accumulates the input-embedding gradient into the embedding table's gradient.
    pub fn embed_backward<B: Backend>(&self, be: &B, grads: &mut ParamSet<B::Buf>, ids: &[u32], dx: &B::Buf) -> Result<()> {
        be.embedding_backward(dx, ids, self.cfg.hidden, grads.get_mut(self.embed))
    }

    fn check_input<B: Backend>(&self, be: &B, x: &B::Buf, layout: &SeqLayout) -> Result<()> {
        let t = layout.tokens();
        ensure!(be.len(x) == t * self.cfg.hidden, "llm forward: {} input values for {t} tokens of width {}", be.len(x), self.cfg.hidden);
        ensure!(layout.seq_lens.iter().sum::<usize>() == t, "llm forward: sequence lengths do not add up to {t} tokens");
        Ok(())
    }

    /// Runs the blocks and the final norm on input embeddings `x [T, hidden]`, keeping what the
    /// backward needs (only each block's input under gradient checkpointing).
    pub fn forward<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, x: B::Buf, layout: &SeqLayout) -> Result<LlmActs<B::Buf>> {
        self.check_input(be, &x, layout)?;
        let mut layers = Vec::with_capacity(self.cfg.layers);
        let mut x = x;
        for ids in &self.layers {
            layers.push(if self.gradient_checkpointing {
                let x_in = be.duplicate(&x)?;
                x = self.train_block(be, w, ids, x, layout, false)?.0;
                SavedBlock::Input(x_in)
            } else {
                let (x_out, acts) = self.train_block(be, w, ids, x, layout, true)?;
                x = x_out;
                SavedBlock::Full(acts.context("the block kept no activations")?)
            });
        }
        let t = layout.tokens();
        let mut rstd_final = be.empty(t)?;
        let mut hidden = be.empty(t * self.cfg.hidden)?;
        be.rmsnorm(&x, w.get(self.norm), self.cfg.rms_eps, &mut hidden, &mut rstd_final)?;
        Ok(LlmActs { layers, x_final: x, rstd_final, hidden, layout: layout.clone() })
    }

    /// The final normed hidden state `[T, hidden]` for a forward-only pass (the teacher): each
    /// block's activations are dropped as soon as the next block has its input.
    pub fn hidden_states<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, x: B::Buf, layout: &SeqLayout) -> Result<B::Buf> {
        self.check_input(be, &x, layout)?;
        let mut x = x;
        for ids in &self.layers {
            x = self.train_block(be, w, ids, x, layout, false)?.0;
        }
        self.final_norm(be, w, &x)
    }

    /// Values kept by a training forward for its backward (to compare checkpointing's savings).
    pub fn saved_values<B: Backend>(&self, be: &B, acts: &LlmActs<B::Buf>) -> usize {
        let block = |s: &SavedBlock<B::Buf>| match s {
            SavedBlock::Input(x) => be.len(x),
            SavedBlock::Full(a) => [&a.x_in, &a.rstd1, &a.h1, &a.q, &a.k, &a.v, &a.attn, &a.lse, &a.x_mid, &a.rstd2, &a.h2, &a.gate_up, &a.act]
                .iter()
                .map(|b| be.len(b))
                .sum(),
        };
        acts.layers.iter().map(block).sum::<usize>() + be.len(&acts.x_final) + be.len(&acts.rstd_final) + be.len(&acts.hidden)
    }

    /// One block of a packed training batch (varlen attention over `layout`'s sequences).
    fn train_block<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        ids: &LayerIds,
        x: B::Buf,
        layout: &SeqLayout,
        keep: bool,
    ) -> Result<BlockOutput<B::Buf>> {
        let c = &self.cfg;
        let t = layout.tokens();
        self.block(be, w, ids, x, &layout.positions, keep, |q, k, v| {
            let mut attn = be.empty(t * c.heads * c.head_dim)?;
            let mut lse = be.empty(t * c.heads)?;
            be.attention(self.attn_shape(), &layout.seq_lens, q, k, v, &mut attn, &mut lse)?;
            Ok((attn, lse))
        })
    }

    /// One decoder block on `x [T, hidden]` at RoPE `positions`. The attention step is the
    /// caller's (`attend(q, k, v) -> (out, lse)` with q and k already rotated), so training
    /// (packed varlen attention), prefill (the same, plus filling a KV cache) and decoding
    /// (one query against the cache) share every other line of the block. Returns the block's
    /// output and, when `keep`, what its backward needs.
    ///
    /// The residual adds ride on the output projections' GEMMs (beta = 1 onto the residual
    /// stream): a pass that keeps nothing (the teacher, generation) adds in place, where a
    /// separate add would read the stream twice and write it once more; a pass that keeps the
    /// block's input and middle for the backward adds onto a copy, which costs what the add did.
    #[allow(clippy::too_many_arguments)]
    fn block<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        ids: &LayerIds,
        x: B::Buf,
        positions: &[u32],
        keep: bool,
        attend: impl FnOnce(&B::Buf, &B::Buf, &B::Buf) -> Result<(B::Buf, B::Buf)>,
    ) -> Result<BlockOutput<B::Buf>> {
        let c = &self.cfg;
        let t = positions.len();
        let (h, im, qd, kvd) = (c.hidden, c.intermediate, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut rstd1 = be.empty(t)?;
        let mut h1 = be.empty(t * h)?;
        be.rmsnorm(&x, w.get(ids.ln1), c.rms_eps, &mut h1, &mut rstd1)?;
        // y (+)= inp·Wᵀ + b: `onto` is the residual stream to add to, else y is new.
        let linear = |wt: ParamId, b: Option<ParamId>, inp: &B::Buf, din: usize, dout: usize, onto: Option<B::Buf>| -> Result<B::Buf> {
            let (mut y, beta) = match onto {
                Some(y) => (y, 1.0),
                None => (be.empty(t * dout)?, 0.0),
            };
            be.gemm(Gemm { beta, ..Gemm::linear(t, dout, din) }, inp, w.get(wt), &mut y)?;
            if let Some(b) = b {
                be.add_bias(&mut y, w.get(b), t)?;
            }
            Ok(y)
        };
        // The stream to add a branch onto, and the value kept for the backward when `keep`.
        let residual = |x: B::Buf| -> Result<(B::Buf, Option<B::Buf>)> {
            Ok(if keep { (be.duplicate(&x)?, Some(x)) } else { (x, None) })
        };
        // The bias is added by the split, not by a pass of its own.
        let qkv = linear(ids.wqkv, None, &h1, h, qd + 2 * kvd, None)?;
        let (mut q, mut k, mut v) = (be.empty(t * qd)?, be.empty(t * kvd)?, be.empty(t * kvd)?);
        let bias = ids.bqkv.map(|b| w.get(b));
        be.qkv_split_rope(&qkv, bias, positions, c.head_dim, c.rope_theta, &mut q, &mut k, &mut v)?;
        drop(qkv);
        let (attn, lse) = attend(&q, &k, &v)?;
        let (stream, x_in) = residual(x)?;
        let x_mid = linear(ids.wo, ids.bo, &attn, qd, h, Some(stream))?;

        let mut rstd2 = be.empty(t)?;
        let mut h2 = be.empty(t * h)?;
        be.rmsnorm(&x_mid, w.get(ids.ln2), c.rms_eps, &mut h2, &mut rstd2)?;
        let gate_up = linear(ids.gate_up, None, &h2, h, 2 * im, None)?;
        let mut act = be.empty(t * im)?;
        be.swiglu(&gate_up, im, &mut act)?;
        let (stream, x_mid) = residual(x_mid)?;
        let x_out = linear(ids.down, None, &act, im, h, Some(stream))?;
        let acts = match (x_in, x_mid) {
            (Some(x_in), Some(x_mid)) => Some(LayerActs { x_in, rstd1, h1, q, k, v, attn, lse, x_mid, rstd2, h2, gate_up, act }),
            _ => None,
        };
        Ok((x_out, acts))
    }

    /// The final RMSNorm alone (inference: no statistics kept).
    fn final_norm<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, x: &B::Buf) -> Result<B::Buf> {
        let rows = be.len(x) / self.cfg.hidden;
        let mut rstd = be.empty(rows)?;
        let mut hidden = be.empty(rows * self.cfg.hidden)?;
        be.rmsnorm(x, w.get(self.norm), self.cfg.rms_eps, &mut hidden, &mut rstd)?;
        Ok(hidden)
    }

    /// Prefill for generation: runs packed sequences `x [T, hidden]` (lengths `seq_lens`,
    /// positions from 0) through the blocks exactly as [`Llm::forward`] does, and stores each
    /// sequence's keys and values in cache slot `slots[i]`, which must be empty. Returns the
    /// final normed hidden state of every token, `[T, hidden]`. Nothing is kept for a backward.
    pub fn prefill<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        x: B::Buf,
        seq_lens: &[usize],
        slots: &[usize],
        cache: &mut KvCache<B::Buf>,
    ) -> Result<B::Buf> {
        let c = &self.cfg;
        let layout = SeqLayout::from_lens(seq_lens);
        let t = layout.tokens();
        ensure!(be.len(&x) == t * c.hidden, "prefill: {} input values for {t} tokens of width {}", be.len(&x), c.hidden);
        ensure!(slots.len() == seq_lens.len(), "prefill: {} sequences but {} cache slots", seq_lens.len(), slots.len());
        cache.check_model(c)?;
        for (&slot, &len) in slots.iter().zip(seq_lens) {
            ensure!(slot < cache.lens.len(), "prefill: cache slot {slot} of {}", cache.lens.len());
            ensure!(cache.lens[slot] == 0, "prefill: cache slot {slot} already holds {} tokens", cache.lens[slot]);
            ensure!(len <= cache.capacity, "prefill: a {len}-token sequence does not fit the cache's {} positions", cache.capacity);
        }
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut x = x;
        for (l, ids) in self.layers.iter().enumerate() {
            let layer = &mut cache.layers[l];
            let cap = cache.capacity;
            let (x_out, _) = self.block(be, w, ids, x, &layout.positions, false, |q, k, v| {
                let mut start = 0;
                for (&slot, &len) in slots.iter().zip(seq_lens) {
                    be.copy_range(k, start * kvd, &mut layer.0, slot * cap * kvd, len * kvd)?;
                    be.copy_range(v, start * kvd, &mut layer.1, slot * cap * kvd, len * kvd)?;
                    start += len;
                }
                let mut attn = be.empty(t * qd)?;
                let mut lse = be.empty(t * c.heads)?;
                be.attention(self.attn_shape(), seq_lens, q, k, v, &mut attn, &mut lse)?;
                Ok((attn, lse))
            })?;
            x = x_out;
        }
        for (&slot, &len) in slots.iter().zip(seq_lens) {
            cache.lens[slot] = len;
        }
        self.final_norm(be, w, &x)
    }

    /// One decoding step: row `r` of `x [R, hidden]` is the next token of the sequence in cache
    /// slot `slots[r]` (distinct slots), at the position after its cached tokens. Appends each
    /// row's keys and values to its slot and returns the final normed hidden states `[R, hidden]`.
    pub fn decode_step<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        x: B::Buf,
        slots: &[usize],
        cache: &mut KvCache<B::Buf>,
    ) -> Result<B::Buf> {
        let c = &self.cfg;
        let r = slots.len();
        ensure!(be.len(&x) == r * c.hidden, "decode step: {} input values for {r} rows of width {}", be.len(&x), c.hidden);
        cache.check_model(c)?;
        let mut seen = vec![false; cache.lens.len()];
        for &slot in slots {
            ensure!(slot < cache.lens.len(), "decode step: cache slot {slot} of {}", cache.lens.len());
            ensure!(!std::mem::replace(&mut seen[slot], true), "decode step: cache slot {slot} appears twice");
            ensure!(cache.lens[slot] < cache.capacity, "decode step: cache slot {slot} is full ({} positions)", cache.capacity);
        }
        let positions: Vec<u32> = slots.iter().map(|&s| cache.lens[s] as u32).collect();
        let lens: Vec<usize> = slots.iter().map(|&s| cache.lens[s] + 1).collect();
        let slots_u32: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let cap = cache.capacity;
        let mut x = x;
        for (l, ids) in self.layers.iter().enumerate() {
            let layer = &mut cache.layers[l];
            let (x_out, _) = self.block(be, w, ids, x, &positions, false, |q, k, v| {
                for (row, (&slot, &pos)) in slots.iter().zip(&positions).enumerate() {
                    let at = (slot * cap + pos as usize) * kvd;
                    be.copy_range(k, row * kvd, &mut layer.0, at, kvd)?;
                    be.copy_range(v, row * kvd, &mut layer.1, at, kvd)?;
                }
                let mut attn = be.empty(r * qd)?;
                be.attention_decode(self.attn_shape(), cap, &slots_u32, &lens, q, &layer.0, &layer.1, &mut attn)?;
                Ok((attn, be.zeros(0)?))
            })?;
            x = x_out;
        }
        for &slot in slots {
            cache.lens[slot] += 1;
        }
        self.final_norm(be, w, &x)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn lm_head<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, hidden: &B::Buf) -> Result<B::Buf> {
        let rows = be.len(hidden) / self.cfg.hidden;
        let mut logits = be.empty(rows * self.cfg.vocab)?;
        be.gemm(Gemm::linear(rows, self.cfg.vocab, self.cfg.hidden), hidden, w.get(self.lm_head), &mut logits)?;
        Ok(logits)
    }

    /// Backward of [`Llm::lm_head`]: returns `dhidden`, accumulates the head's weight gradient.
    pub fn lm_head_backward<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        hidden: &B::Buf,
        dlogits: &B::Buf,
        grads: Option<&mut ParamSet<B::Buf>>,
    ) -> Result<B::Buf> {
        let (hd, v) = (self.cfg.hidden, self.cfg.vocab);
        let rows = be.len(hidden) / hd;
        let mut dh = be.empty(rows * hd)?;
        be.gemm(Gemm::linear_input_grad(rows, v, hd, false), dlogits, w.get(self.lm_head), &mut dh)?;
        if let Some(g) = grads {
            be.gemm(Gemm::linear_weight_grad(rows, v, hd), dlogits, hidden, g.get_mut(self.lm_head))?;
        }
        Ok(dh)
    }

    /// Backward from `dhidden` (gradient of [`LlmActs::hidden`]) to the input embeddings. Weight
    /// gradients are accumulated into `grads` when given (a frozen LLM passes `None`).
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        acts: &LlmActs<B::Buf>,
        dhidden: &B::Buf,
        grads: Option<&mut ParamSet<B::Buf>>,
    ) -> Result<B::Buf> {
        self.backward_reporting(be, w, acts, dhidden, grads, &mut |_, _| Ok(()))
    }

    /// [`Llm::backward`], telling `done` which tensors' gradients are complete as the backward
    /// goes (the final norm's, then each block's from the last to the first; the embedding's and
    /// a separate head's are not: the embedding backward and the loss write them elsewhere).
    pub fn backward_reporting<B: Backend>(
        &self,
        be: &B,
        w: &ParamSet<B::Buf>,
        acts: &LlmActs<B::Buf>,
        dhidden: &B::Buf,
        mut grads: Option<&mut ParamSet<B::Buf>>,
        done: &mut dyn FnMut(std::ops::Range<usize>, &mut ParamSet<B::Buf>) -> Result<()>,
    ) -> Result<B::Buf> {
        let c = &self.cfg;
        let t = acts.layout.tokens();
        let (h, im, qd, kvd) = (c.hidden, c.intermediate, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut dx = be.empty(t * h)?;
        let mut dnorm = be.zeros(h)?;
        be.rmsnorm_backward(dhidden, &acts.x_final, w.get(self.norm), &acts.rstd_final, &mut dx, &mut dnorm)?;
        if let Some(g) = grads.as_deref_mut() {
            be.add_assign(g.get_mut(self.norm), &dnorm)?;
            done(self.norm.0..self.norm.0 + 1, g)?;
        }
        let mut tmp_h = be.empty(t * h)?;
        for (ids, saved) in self.layers.iter().zip(&acts.layers).rev() {
            let recomputed;
            let a = match saved {
                SavedBlock::Full(a) => a,
                SavedBlock::Input(x_in) => {
                    recomputed = self.train_block(be, w, ids, be.duplicate(x_in)?, &acts.layout, true)?.1.context("the block kept no activations")?;
                    &recomputed
                }
            };
            // Linear layer backward: dX = dY·W, and (when training) dW += dYᵀ·X, db += Σ dY.
            let linear_back = |grads: &mut Option<&mut ParamSet<B::Buf>>,
                                   wt: ParamId,
                                   b: Option<ParamId>,
                                   dy: &B::Buf,
                                   x: &B::Buf,
                                   dx: &mut B::Buf,
                                   din: usize,
                                   dout: usize|
             -> Result<()> {
                be.gemm(Gemm::linear_input_grad(t, dout, din, false), dy, w.get(wt), dx)?;
                if let Some(g) = grads.as_deref_mut() {
                    be.gemm(Gemm::linear_weight_grad(t, dout, din), dy, x, g.get_mut(wt))?;
                    if let Some(b) = b {
                        be.bias_grad(dy, g.get_mut(b), t)?;
                    }
                }
                Ok(())
            };
            // MLP branch; dx is the gradient of the block's output.
            let mut dact = be.empty(t * im)?;
            linear_back(&mut grads, ids.down, None, &dx, &a.act, &mut dact, im, h)?;
            let mut dgate_up = be.empty(t * 2 * im)?;
            be.swiglu_backward(&a.gate_up, im, &dact, &mut dgate_up)?;
            drop(dact);
            let mut dh2 = be.empty(t * h)?;
            linear_back(&mut grads, ids.gate_up, None, &dgate_up, &a.h2, &mut dh2, h, 2 * im)?;
            drop(dgate_up);
            let mut dln = be.zeros(h)?;
            be.rmsnorm_backward(&dh2, &a.x_mid, w.get(ids.ln2), &a.rstd2, &mut tmp_h, &mut dln)?;
            be.add_assign(&mut dx, &tmp_h)?;
            if let Some(g) = grads.as_deref_mut() {
                be.add_assign(g.get_mut(ids.ln2), &dln)?;
            }
            // Attention branch; dx is now the gradient of x_mid.
            let mut dattn = be.empty(t * qd)?;
            linear_back(&mut grads, ids.wo, ids.bo, &dx, &a.attn, &mut dattn, qd, h)?;
            let mut dq = be.empty(t * qd)?;
            let mut dk = be.empty(t * kvd)?;
            let mut dv = be.empty(t * kvd)?;
            be.attention_backward(
                self.attn_shape(),
                &acts.layout.seq_lens,
                &a.q,
                &a.k,
                &a.v,
                &a.attn,
                &a.lse,
                &dattn,
                &mut dq,
                &mut dk,
                &mut dv,
            )?;
            let mut dqkv = be.empty(t * (qd + 2 * kvd))?;
            be.qkv_merge_rope_backward(&dq, &dk, &dv, &acts.layout.positions, c.head_dim, c.rope_theta, &mut dqkv)?;
            drop((dq, dk, dv));
            let mut dh1 = be.empty(t * h)?;
            linear_back(&mut grads, ids.wqkv, ids.bqkv, &dqkv, &a.h1, &mut dh1, h, qd + 2 * kvd)?;
            drop(dqkv);
            be.fill_zero(&mut dln)?;
            be.rmsnorm_backward(&dh1, &a.x_in, w.get(ids.ln1), &a.rstd1, &mut tmp_h, &mut dln)?;
            be.add_assign(&mut dx, &tmp_h)?;
            if let Some(g) = grads.as_deref_mut() {
                be.add_assign(g.get_mut(ids.ln1), &dln)?;
                done(ids.range(), g)?;
            }
        }
        Ok(dx)
    }
}

/// A decoder with its weights on a backend.
pub struct LoadedLlm<Buf> {
    pub model: Llm,
    pub weights: ParamSet<Buf>,
}

impl<Buf> LoadedLlm<Buf> {
    /// Loads `dir/config.json` and the checkpoint's safetensors (tensor names under `prefix`).
    pub fn load<B: Backend<Buf = Buf>>(be: &B, dir: &std::path::Path, prefix: &str) -> Result<Self> {
        let model = Llm::new(LlmConfig::from_dir(dir)?);
        let source = crate::weights::WeightSource::open(dir)?;
        let weights = ParamSet::load(be, &model.specs, &source, prefix)?;
        Ok(LoadedLlm { model, weights })
    }

    /// Logits `[T, vocab]` of one sequence of token ids (ids are checked against the vocabulary).
    pub fn logits<B: Backend<Buf = Buf>>(&self, be: &B, ids: &[u32]) -> Result<Buf> {
        ensure!(!ids.is_empty(), "no input ids: at least one token is needed");
        let x = self.model.embed(be, &self.weights, ids)?;
        let hidden = self.model.hidden_states(be, &self.weights, x, &SeqLayout::from_lens(&[ids.len()]))?;
        self.model.lm_head(be, &self.weights, &hidden)
    }
}
