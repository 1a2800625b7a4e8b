//! The LLaVA-KD objective computed from hidden states, chunk by chunk, so the full `[T, V]`
//! logits are never stored and rows no term uses produce no logits at all.
//!
//! [`fused_distill_loss`] takes the student's final normed hidden states H_s `[T, h_s]` with its
//! LM head W_s `[V_s, h_s]` (and the teacher's H_t, W_t) and computes exactly what
//! `lm_head → distill_loss → lm_head_backward` computes (same rows and terms, SPEC §1; same
//! backend loss ops), returning the report, ∂/∂H_s and, when the LLM trains, ∂/∂W_s:
//!
//! 1. The rows some term uses are gathered: CE/L_res rows (predicting a response token), L_prompt
//!    rows, L_vis rows (visual positions) and, for L_rel, every visual row of each image. Other
//!    rows (the prompt, when L_prompt is off; padding; the last row of a sequence) cost nothing.
//! 2. They are cut into chunks of at most `chunk_rows` rows; with [`RelationForm::Logits`] each
//!    image's visual rows form one chunk of their own (728 rows at the anchor shape), so L_vis
//!    and L_rel share one computation of those logits.
//! 3. Per chunk: Z_s = H_s[chunk]·W_sᵀ and (when a KL or relation term needs it) Z_t = H_t[chunk]·W_tᵀ
//!    by the backend GEMM; the backend's `distill_rows_into` computes every row's CE and KL terms
//!    (each row weighted by the terms it belongs to) and **writes** ∂Z_s whole — on CUDA one
//!    softmax-KL launch per chunk, no zero-fill and no read of ∂Z_s — or, without distillation,
//!    `cross_entropy` writes it; `relation_loss` accumulates onto it; then ∂H_s[chunk] = ∂Z_s·W_s
//!    and ∂W_s += ∂Z_sᵀ·H_s[chunk].
//! 4. With [`RelationForm::Identity`] L_rel needs no logits: R = H·(WᵀW)·Hᵀ per image
//!    ([`super::relation_identity`]), its gradient added to ∂H_s (and to ∂W_s through ∂M_s).
//!
//! # Memory
//!
//! Besides the outputs (∂H_s `[T, h_s]`, and ∂W_s, which the optimizer holds anyway), one chunk of
//! c rows holds at most, in the backend's storage type of `e` bytes:
//!
//! `e · c · (2·V_s + V_t + 2·h_s + h_t)` — Z_s, ∂Z_s, Z_t, H_s[chunk], ∂H_s[chunk], H_t[chunk]
//! (Z_s and Z_t are freed before ∂H_s[chunk] is allocated, so the true peak is a little lower);
//!
//! at the anchor (V 151936, h_s 1024, h_t 2560) and bf16 (e = 2) that is 0.92 MB per row:
//! 236 MB for c = 256, 471 MB for c = 512 (the default), 670 MB for an image chunk of 728 rows
//! ([`RelationForm::Logits`]). The unfused path holds the full logits and their gradient:
//! `e · T · (2·V_s + V_t)` = 3.73 GB for T = 4096 (7.5 GB in f32). [`RelationForm::Identity`] adds
//! the `[h_s, h_s]` and `[h_t, h_t]` Gram matrices (2 + 13 MB in bf16) and per-image buffers of at
//! most two `[728, h]` per side and seven `[728, 728]` (18 MB in bf16, 36 MB in f32).
//!
//! Precision on a bf16 backend: ∂W_s is accumulated into the gradient buffer chunk by chunk, so
//! it is rounded to bf16 once per chunk (the unfused path rounds once); a CUDA port can keep ∂W_s
//! in f32 across the chunks. Chunks of equal size could reuse one set of buffers (an arena); this
//! reference implementation allocates per chunk.

use std::ops::Range;

use anyhow::{bail, ensure, Result};

use super::relation_identity::{head_gram, head_gram_backward, relation_loss_identity, GramSide};
use super::select::{LossCounts, LossInputs};
use super::{grad_scale, kept_vocab, DistillConfig, PendingReport};
use crate::backend::{Backend, Gemm, KlShape, RowTerms, IGNORE_INDEX};
use crate::model::{find_hf, Llm, ParamSet};

/// Default rows per chunk: 467 MB of bf16 chunk buffers at the anchor shape (see the module
/// documentation).
pub const DEFAULT_CHUNK_ROWS: usize = 512;

/// How the relation term (L_rel) is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelationForm {
    /// R = Z·Zᵀ on the logits of each image's visual rows (one chunk per image, shared with L_vis).
    Logits,
    /// R = H·(WᵀW)·Hᵀ: vocabulary-free (see [`super::relation_identity`]).
    Identity,
}

/// Options of [`fused_distill_loss`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedHeadOptions {
    /// Rows per chunk (image chunks of [`RelationForm::Logits`] are one image each, whatever
    /// their size).
    pub chunk_rows: usize,
    pub relation: RelationForm,
}

impl Default for FusedHeadOptions {
    fn default() -> Self {
        FusedHeadOptions { chunk_rows: DEFAULT_CHUNK_ROWS, relation: RelationForm::Identity }
    }
}

/// One model's final hidden states and LM head.
#[derive(Debug)]
pub struct HeadSide<'a, Buf> {
    /// Final normed hidden states `[T, hidden_size]` (every row of the micro-batch).
    pub hidden: &'a Buf,
    pub hidden_size: usize,
    /// LM head weight `[vocab, hidden_size]` (for a tied head, the embedding table).
    pub weight: &'a Buf,
    pub vocab: usize,
    /// M = W[:kept]ᵀ·W[:kept] for [`RelationForm::Identity`], if already computed (the teacher's,
    /// and a frozen student's, once per run); computed per call when absent.
    pub gram: Option<&'a Buf>,
}

// Copy for any Buf: the struct holds only references.
impl<Buf> Clone for HeadSide<'_, Buf> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Buf> Copy for HeadSide<'_, Buf> {}

impl<'a, Buf> HeadSide<'a, Buf> {
    /// The head side of `llm` with weights `w`, for its final hidden states `hidden`.
    pub fn of(llm: &Llm, w: &'a ParamSet<Buf>, hidden: &'a Buf, gram: Option<&'a Buf>) -> Result<Self> {
        Ok(HeadSide { hidden, hidden_size: llm.cfg.hidden, weight: lm_head_weight(llm, w)?, vocab: llm.cfg.vocab, gram })
    }
}

/// M = W[:kept]ᵀ·W[:kept] of `llm`'s LM head in `w`: built once for a head that does not train
/// and passed as [`HeadSide::gram`].
pub fn frozen_head_gram<B: Backend>(be: &B, llm: &Llm, w: &ParamSet<B::Buf>, kept: usize) -> Result<B::Buf> {
    head_gram(be, lm_head_weight(llm, w)?, llm.cfg.vocab, llm.cfg.hidden, kept)
}

/// The LM head weight of `llm` in `w` (the embedding table when tied).
pub fn lm_head_weight<'a, Buf>(llm: &Llm, w: &'a ParamSet<Buf>) -> Result<&'a Buf> {
    Ok(&w.bufs[lm_head_index(llm)?])
}

/// The LM head's gradient buffer in a gradient set laid out like `llm.specs`.
pub fn lm_head_grad<'a, Buf>(llm: &Llm, g: &'a mut ParamSet<Buf>) -> Result<&'a mut Buf> {
    let i = lm_head_index(llm)?;
    Ok(&mut g.bufs[i])
}

fn lm_head_index(llm: &Llm) -> Result<usize> {
    let name = if llm.cfg.tie_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let (id, range) = find_hf(&llm.specs, name).ok_or_else(|| anyhow::anyhow!("the model has no {name}"))?;
    ensure!(
        range.start == 0 && range.end == llm.specs[id.0].numel(),
        "{name} is stacked into parameter {} with other tensors; the LM head must be a parameter of its own",
        llm.specs[id.0].name
    );
    Ok(id.0)
}

/// Rows of one chunk (ascending) and the images it holds whole, as local `(start, n)`.
struct Chunk {
    rows: Vec<u32>,
    images: Vec<(u32, u32)>,
}

/// Maximal runs of consecutive rows: `(first global row, first local row, length)`.
fn runs(rows: &[u32]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (local, &r) in rows.iter().enumerate() {
        match out.last_mut() {
            Some((g, l, n)) if *g + *n == r as usize && *l + *n == local => *n += 1,
            _ => out.push((r as usize, local, 1)),
        }
    }
    out
}

/// `out[local rows] = src[rows]` for rows of width `w`.
fn gather<B: Backend>(be: &B, src: &B::Buf, rows: &[u32], w: usize) -> Result<B::Buf> {
    let mut out = be.empty(rows.len() * w)?;
    for (g, l, n) in runs(rows) {
        be.copy_range(src, g * w, &mut out, l * w, n * w)?;
    }
    Ok(out)
}

/// `dst[rows] = src[local rows]`.
fn scatter<B: Backend>(be: &B, src: &B::Buf, rows: &[u32], w: usize, dst: &mut B::Buf) -> Result<()> {
    for (g, l, n) in runs(rows) {
        be.copy_range(src, l * w, dst, g * w, n * w)?;
    }
    Ok(())
}

/// Term membership bits of a row.
const CE: u8 = 1;
const RES: u8 = 2;
const PROMPT: u8 = 4;
const VIS: u8 = 8;

/// The chunks: image chunks first (relation in logits form), then every other used row in order.
fn plan_chunks(role: &[u8], images: &[Range<usize>], image_chunks: bool, chunk_rows: usize) -> Vec<Chunk> {
    let mut taken = vec![false; role.len()];
    let mut chunks = Vec::new();
    if image_chunks {
        for r in images {
            taken[r.clone()].iter_mut().for_each(|t| *t = true);
            chunks.push(Chunk { rows: (r.start as u32..r.end as u32).collect(), images: vec![(0, r.len() as u32)] });
        }
    }
    let rest: Vec<u32> = (0..role.len()).filter(|&r| role[r] != 0 && !taken[r]).map(|r| r as u32).collect();
    for c in rest.chunks(chunk_rows.max(1)) {
        chunks.push(Chunk { rows: c.to_vec(), images: Vec::new() });
    }
    chunks
}

/// The LLaVA-KD objective from hidden states with a chunked fused LM head (see the module
/// documentation). Same contract as [`super::distill_loss`] with logits replaced by
/// (hidden states, head): **writes** ∂total/∂H_s into `dhidden` (`[T, h_s]`, zero on rows no term
/// uses) and, when `dweight` is given (the LLM trains), **accumulates** ∂total/∂W_s into it
/// (`[V_s, h_s]`, as `lm_head_backward` does). `teacher` must be given when `cfg` enables any
/// distillation term.
///
/// The terms' sums go to slots `at .. at + PendingReport::SLOTS` of `sums` (which must start at
/// 0): nothing is read back here, so on CUDA the host never waits for the device. Resolve the
/// returned [`PendingReport`] once the step's sums are read.
#[allow(clippy::too_many_arguments)]
pub fn fused_distill_loss<B: Backend>(
    be: &B,
    cfg: &DistillConfig,
    inputs: &LossInputs,
    student: HeadSide<'_, B::Buf>,
    teacher: Option<HeadSide<'_, B::Buf>>,
    step: &LossCounts,
    opts: &FusedHeadOptions,
    dhidden: &mut B::Buf,
    mut dweight: Option<&mut B::Buf>,
    sums: &mut B::Sums,
    at: usize,
) -> Result<PendingReport> {
    const WHAT: &str = "fused head loss";
    cfg.validate()?;
    ensure!(opts.chunk_rows > 0, "{WHAT}: chunk_rows must be positive");
    let batch = LossCounts::of(inputs)?;
    let t_rows = inputs.len();
    let check_side = |who: &str, s: &HeadSide<'_, B::Buf>| -> Result<()> {
        ensure!(s.vocab > 0 && s.hidden_size > 0, "{WHAT}: the {who} has an empty vocabulary or hidden size");
        let got = be.len(s.hidden);
        ensure!(
            got == t_rows * s.hidden_size,
            "{WHAT}: {who} hidden states have {got} elements, expected {t_rows} rows × {} = {}",
            s.hidden_size,
            t_rows * s.hidden_size
        );
        let got = be.len(s.weight);
        ensure!(
            got == s.vocab * s.hidden_size,
            "{WHAT}: the {who} LM head has {got} elements, expected {} × {}",
            s.vocab,
            s.hidden_size
        );
        Ok(())
    };
    check_side("student", &student)?;
    let (hs, vs) = (student.hidden_size, student.vocab);
    ensure!(be.len(dhidden) == t_rows * hs, "{WHAT}: the hidden-state gradient has {} elements, expected {}", be.len(dhidden), t_rows * hs);
    if let Some(d) = dweight.as_deref() {
        ensure!(be.len(d) == vs * hs, "{WHAT}: the LM head gradient has {} elements, expected {}", be.len(d), vs * hs);
    }
    let teacher = match teacher {
        Some(t) if cfg.needs_teacher() => {
            check_side("teacher", &t)?;
            Some(t)
        }
        Some(_) => None,
        None if cfg.needs_teacher() => bail!("{WHAT}: the objective distils, but no teacher hidden states were given"),
        None => None,
    };
    step.check_covers(&batch, cfg, WHAT)?;

    let targets = inputs.ce_targets()?;
    let sel = inputs.rows();
    let mut role = vec![0u8; t_rows];
    for (r, &t) in targets.iter().enumerate() {
        if t != IGNORE_INDEX {
            role[r] |= CE;
        }
    }
    if teacher.is_some() {
        for (on, bit, rows) in [
            (cfg.response_on(), RES, &sel.response),
            (cfg.prompt_on(), PROMPT, &sel.prompt),
            (cfg.visual_on(), VIS, &sel.visual),
        ] {
            if on {
                rows.iter().for_each(|&r| role[r as usize] |= bit);
            }
        }
    }
    let relation = teacher.is_some() && cfg.relation_on();
    let image_chunks = relation && opts.relation == RelationForm::Logits;
    let chunks = plan_chunks(&role, inputs.images, image_chunks, opts.chunk_rows);

    be.fill_zero(dhidden)?;
    let ce_scale = grad_scale(cfg.ce_weight(), step.ce);
    let pending = PendingReport::new(at, cfg, step, teacher.is_some());
    let slot = |k: usize| pending.slot(k);
    // The KL terms a row may carry (its role bit), each with its gradient scale and sum slot.
    let kl_terms = [
        (RES, grad_scale(cfg.alpha, step.response), slot(PendingReport::RESPONSE)),
        (PROMPT, grad_scale(cfg.alpha, step.prompt), slot(PendingReport::PROMPT)),
        (VIS, grad_scale(cfg.beta, step.visual), slot(PendingReport::VISUAL)),
    ];
    let kl_scales: Vec<f32> = kl_terms.iter().map(|t| t.1).collect();
    let kl_slots: Vec<usize> = kl_terms.iter().map(|t| t.2).collect();
    let shape = teacher.map(|t| KlShape {
        student_vocab: vs,
        teacher_vocab: t.vocab,
        kept: kept_vocab(vs, t.vocab),
        temperature: cfg.temperature,
        divergence: cfg.divergence,
    });

    for chunk in &chunks {
        let c = chunk.rows.len();
        let h_chunk = gather(be, student.hidden, &chunk.rows, hs)?;
        let mut zs = be.empty(c * vs)?;
        be.gemm(Gemm::linear(c, vs, hs), &h_chunk, student.weight, &mut zs)?;
        // Written whole by the chunk's one loss op below: every row of a chunk carries a term (the
        // rows of an image chunk without one get 0), so no zero-fill.
        let mut dz = be.empty(c * vs)?;
        let local_targets: Vec<i32> = chunk.rows.iter().map(|&r| targets[r as usize]).collect();
        // Bit k of a row: it belongs to KL term k of `kl_terms`.
        let row_terms: Vec<u8> =
            chunk.rows.iter().map(|&r| kl_terms.iter().enumerate().filter(|(_, t)| role[r as usize] & t.0 != 0).fold(0u8, |m, (k, _)| m | 1 << k)).collect();
        match (teacher, shape) {
            (Some(t), Some(shape)) if row_terms.iter().any(|&b| b != 0) || !chunk.images.is_empty() => {
                let ht_chunk = gather(be, t.hidden, &chunk.rows, t.hidden_size)?;
                let mut zt = be.empty(c * t.vocab)?;
                be.gemm(Gemm::linear(c, t.vocab, t.hidden_size), &ht_chunk, t.weight, &mut zt)?;
                drop(ht_chunk);
                let terms = RowTerms {
                    targets: &local_targets,
                    kl_terms: &row_terms,
                    kl_scales: &kl_scales,
                    kl_slots: &kl_slots,
                    ce_scale,
                    ce_slot: slot(PendingReport::CE),
                };
                be.distill_rows_into(&zs, &zt, shape, &terms, &mut dz, sums)?;
                if !chunk.images.is_empty() {
                    let scale = grad_scale(cfg.gamma, step.images);
                    be.relation_loss_into(&zs, &zt, shape, &chunk.images, scale, &mut dz, sums, slot(PendingReport::RELATION))?;
                }
            }
            _ => be.cross_entropy_into(&zs, &local_targets, vs, ce_scale, &mut dz, sums, slot(PendingReport::CE))?,
        }
        drop(zs);
        let mut dh_chunk = be.empty(c * hs)?;
        be.gemm(Gemm::linear_input_grad(c, vs, hs, false), &dz, student.weight, &mut dh_chunk)?;
        scatter(be, &dh_chunk, &chunk.rows, hs, dhidden)?;
        if let Some(dw) = dweight.as_deref_mut() {
            be.gemm(Gemm::linear_weight_grad(c, vs, hs), &dz, &h_chunk, dw)?;
        }
    }

    if relation && opts.relation == RelationForm::Identity && !inputs.images.is_empty() {
        let (t, shape) = (teacher.expect("relation implies a teacher"), shape.expect("a teacher has a shape"));
        let kept = shape.kept;
        let own_s = match student.gram {
            Some(_) => None,
            None => Some(head_gram(be, student.weight, vs, hs, kept)?),
        };
        let own_t = match t.gram {
            Some(_) => None,
            None => Some(head_gram(be, t.weight, t.vocab, t.hidden_size, kept)?),
        };
        let gs = student.gram.or(own_s.as_ref()).expect("one of them is set");
        let gt = t.gram.or(own_t.as_ref()).expect("one of them is set");
        let images: Vec<(u32, u32)> = inputs.images.iter().map(|r| (r.start as u32, r.len() as u32)).collect();
        let mut dgram = match dweight {
            Some(_) => Some(be.zeros(hs * hs)?),
            None => None,
        };
        relation_loss_identity(
            be,
            GramSide { hidden: student.hidden, hidden_size: hs, gram: gs },
            GramSide { hidden: t.hidden, hidden_size: t.hidden_size, gram: gt },
            &images,
            grad_scale(cfg.gamma, step.images),
            dhidden,
            dgram.as_mut(),
            sums,
            slot(PendingReport::RELATION),
        )?;
        if let (Some(dm), Some(dw)) = (dgram, dweight) {
            head_gram_backward(be, student.weight, vs, hs, kept, &dm, dw)?;
        }
    }

    Ok(pending)
}

/// Rows that get logits under [`fused_distill_loss`] (for reports): those of some term, plus, with
/// [`RelationForm::Logits`] and L_rel on, every visual row of an image.
pub fn rows_with_logits(cfg: &DistillConfig, inputs: &LossInputs, relation: RelationForm) -> Result<usize> {
    let targets = inputs.ce_targets()?;
    let sel = inputs.rows();
    let mut used: Vec<bool> = targets.iter().map(|&t| t != IGNORE_INDEX).collect();
    for (on, rows) in [(cfg.response_on(), &sel.response), (cfg.prompt_on(), &sel.prompt), (cfg.visual_on(), &sel.visual)] {
        if on {
            rows.iter().for_each(|&r| used[r as usize] = true);
        }
    }
    if cfg.relation_on() && relation == RelationForm::Logits {
        inputs.images.iter().for_each(|r| used[r.clone()].iter_mut().for_each(|u| *u = true));
    }
    Ok(used.iter().filter(|&&u| u).count())
}
