//! The multimodal model: frozen vision tower → projector → visual rows spliced into the token
//! embeddings → decoder LLM. The LLM input of each sample is `[prompt prefix] [visual tokens]
//! [rest of prompt] [response]`; the data pipeline marks the visual positions (group `Visual`)
//! and this module replaces their embeddings by the projected image features.

use anyhow::{ensure, Result};

use super::llm::{Llm, LlmActs, SeqLayout};
use super::params::ParamSet;
use super::projector::{Projector, ProjectorActs};
use super::vision::VisionTower;
use crate::backend::Backend;
use crate::data::{Group, PackedBatch};

/// Which vision tokens reach the projector (LLaVA's `mm_vision_select_feature`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Drop the first token (upstream's "patch"; HF Llava's "default"): 729 → 728 for so400m.
    Patch,
    /// Keep every token.
    Full,
}

/// The three parts' weights.
#[derive(Clone)]
pub struct MllmWeights<Buf> {
    pub vision: ParamSet<Buf>,
    pub projector: ParamSet<Buf>,
    pub llm: ParamSet<Buf>,
}

/// Gradient sets of the trainable parts; `None` = frozen (no weight gradients computed).
pub struct MllmGrads<'a, Buf> {
    pub projector: Option<&'a mut ParamSet<Buf>>,
    pub llm: Option<&'a mut ParamSet<Buf>>,
    /// Told as gradients become complete during the backward (data parallelism starts their
    /// reduction then); `None`: nobody asks.
    pub ready: Option<&'a mut dyn GradsReady<Buf>>,
}

/// Told, during a backward, which gradients are complete (no later op of this backward adds to
/// them), so that their reduction can start while the backward goes on
/// (`dist::GradSync::overlap`). Every tensor of every trained set is reported exactly once.
pub trait GradsReady<Buf> {
    /// `done`: (set, tensor) pairs completed since the last call; sets are numbered as `grads`
    /// lists them: the projector's, then the LLM's, those trained.
    fn ready(&mut self, done: &[(usize, usize)], grads: &mut [&mut ParamSet<Buf>]) -> Result<()>;
}

pub struct Mllm {
    pub vision: VisionTower,
    pub projector: Projector,
    pub llm: Llm,
    /// Resolved HF `hidden_states` index of the features (e.g. layers − 1 for −2).
    pub feature_layer: usize,
    pub select: FeatureSelect,
}

/// Saved state of one forward pass.
pub struct MllmActs<Buf> {
    pub llm: LlmActs<Buf>,
    projector: Option<ProjectorActs<Buf>>,
    /// Per image in the batch: first row of its visual block in the packed sequence.
    pub visual_starts: Vec<usize>,
    ids: Vec<u32>,
}

impl Mllm {
    pub fn new(vision: VisionTower, llm: Llm, feature_layer: i64, select: FeatureSelect) -> Result<Self> {
        let feature_layer = vision.resolve_layer(feature_layer)?;
        let projector = Projector::new(vision.cfg.hidden, llm.cfg.hidden);
        Ok(Mllm { vision, projector, llm, feature_layer, select })
    }

    /// Visual tokens each image contributes to the LLM sequence.
    pub fn visual_tokens(&self) -> usize {
        self.vision.cfg.tokens() - usize::from(self.select == FeatureSelect::Patch)
    }

    /// Vision features of `images` at the feature layer, after token selection:
    /// `[images · visual_tokens, D_v]`. Frozen: nothing is saved. A teacher that shares the tower
    /// reuses this result.
    pub fn encode_images<B: Backend>(&self, be: &B, w: &ParamSet<B::Buf>, images: &[Vec<f32>]) -> Result<B::Buf> {
        let refs: Vec<&[f32]> = images.iter().map(Vec::as_slice).collect();
        let out = self.vision.forward(be, w, &refs, self.feature_layer)?;
        let feats = out.hidden_states.into_iter().last().expect("forward returns hidden_states[0..=upto]");
        let (n, d) = (self.vision.cfg.tokens(), self.vision.cfg.hidden);
        match self.select {
            FeatureSelect::Full => Ok(feats),
            FeatureSelect::Patch => {
                let keep = n - 1;
                let mut sel = be.empty(images.len() * keep * d)?;
                for i in 0..images.len() {
                    be.copy_range(&feats, (i * n + 1) * d, &mut sel, i * keep * d, keep * d)?;
                }
                Ok(sel)
            }
        }
    }

    /// First row of each image's visual block, in image order, checking that every image-bearing
    /// sequence has exactly one contiguous block of `visual_tokens` and text-only ones have none.
    pub fn visual_starts(&self, batch: &PackedBatch) -> Result<Vec<usize>> {
        let nv = self.visual_tokens();
        let mut starts = vec![usize::MAX; batch.pixel_values.len()];
        let mut offset = 0;
        for (s, (&len, image)) in batch.seq_lens.iter().zip(&batch.images).enumerate() {
            let groups = &batch.groups[offset..offset + len];
            let first = groups.iter().position(|&g| g == Group::Visual);
            let count = groups.iter().filter(|&&g| g == Group::Visual).count();
            match (image, first) {
                (Some(img), Some(f)) => {
                    ensure!(
                        count == nv && groups[f..f + nv].iter().all(|&g| g == Group::Visual),
                        "sequence {s}: its visual block has {count} positions, the vision tower gives {nv} tokens per image"
                    );
                    starts[*img] = offset + f;
                }
                (None, None) => {}
                (Some(_), None) => anyhow::bail!("sequence {s} has an image but no visual positions"),
                (None, Some(_)) => anyhow::bail!("sequence {s} has visual positions but no image"),
            }
            offset += len;
        }
        ensure!(starts.iter().all(|&s| s != usize::MAX), "an image of the batch belongs to no sequence");
        Ok(starts)
    }

    /// Forward to the final normed hidden state. `features` are [`Mllm::encode_images`] of the
    /// batch's images (computed once and shared with the teacher when the tower is the same).
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        w: &MllmWeights<B::Buf>,
        batch: &PackedBatch,
        features: Option<B::Buf>,
    ) -> Result<MllmActs<B::Buf>> {
        let (x, projector, starts) = self.input_embeddings(be, w, batch, features)?;
        let layout = SeqLayout { positions: batch.positions.clone(), seq_lens: batch.seq_lens.clone() };
        let llm = self.llm.forward(be, &w.llm, x, &layout)?;
        Ok(MllmActs { llm, projector, visual_starts: starts, ids: batch.ids.clone() })
    }

    /// The final normed hidden state `[T, hidden]` of a forward-only pass (the teacher, and
    /// inference): nothing is kept for a backward.
    pub fn hidden_states<B: Backend>(&self, be: &B, w: &MllmWeights<B::Buf>, batch: &PackedBatch, features: Option<B::Buf>) -> Result<B::Buf> {
        let (x, _, _) = self.input_embeddings(be, w, batch, features)?;
        let layout = SeqLayout { positions: batch.positions.clone(), seq_lens: batch.seq_lens.clone() };
        self.llm.hidden_states(be, &w.llm, x, &layout)
    }

    /// The LLM's input `[T, hidden]`: token embeddings with each image's visual block replaced by
    /// its projected features. Shared by [`Mllm::forward`] and generation's prefill. Also returns
    /// the projector's saved state and the first row of each visual block.
    #[allow(clippy::type_complexity)]
    pub fn input_embeddings<B: Backend>(
        &self,
        be: &B,
        w: &MllmWeights<B::Buf>,
        batch: &PackedBatch,
        features: Option<B::Buf>,
    ) -> Result<(B::Buf, Option<ProjectorActs<B::Buf>>, Vec<usize>)> {
        let starts = self.visual_starts(batch)?;
        let h = self.llm.cfg.hidden;
        let nv = self.visual_tokens();
        let mut x = self.llm.embed(be, &w.llm, &batch.ids)?;
        let projector = match features {
            Some(f) if !starts.is_empty() => {
                let (visual, acts) = self.projector.forward(be, &w.projector, f)?;
                for (i, &start) in starts.iter().enumerate() {
                    be.copy_range(&visual, i * nv * h, &mut x, start * h, nv * h)?;
                }
                Some(acts)
            }
            None if !starts.is_empty() => anyhow::bail!("the batch has {} images but no vision features were given", starts.len()),
            _ => None,
        };
        Ok((x, projector, starts))
    }

    /// Backward from the gradient of the final normed hidden state: weight gradients of the
    /// trainable parts. Gradients reach the projector through the LLM even when it is frozen.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &MllmWeights<B::Buf>,
        acts: &MllmActs<B::Buf>,
        dhidden: &B::Buf,
        grads: MllmGrads<'_, B::Buf>,
    ) -> Result<()> {
        let MllmGrads { projector: mut gproj, llm: mut gllm, mut ready } = grads;
        if gproj.is_none() && gllm.is_none() {
            return Ok(());
        }
        let llm_set = gproj.is_some() as usize;
        let mut report = |done: &[(usize, usize)], gproj: &mut Option<&mut ParamSet<B::Buf>>, gllm: Option<&mut ParamSet<B::Buf>>| -> Result<()> {
            match ready.as_deref_mut() {
                Some(r) => r.ready(done, &mut gproj.as_deref_mut().into_iter().chain(gllm).collect::<Vec<_>>()),
                None => Ok(()),
            }
        };
        let mut dx = self.llm.backward_reporting(be, &w.llm, &acts.llm, dhidden, gllm.as_deref_mut(), &mut |range, g| {
            report(&range.map(|t| (llm_set, t)).collect::<Vec<_>>(), &mut gproj, Some(g))
        })?;
        let (h, nv) = (self.llm.cfg.hidden, self.visual_tokens());
        if let (Some(g), Some(pacts)) = (gproj.as_deref_mut(), &acts.projector) {
            let mut dvisual = be.empty(acts.visual_starts.len() * nv * h)?;
            for (i, &start) in acts.visual_starts.iter().enumerate() {
                be.copy_range(&dx, start * h, &mut dvisual, i * nv * h, nv * h)?;
            }
            self.projector.backward(be, &w.projector, pacts, &dvisual, g)?;
        }
        if let Some(n) = gproj.as_deref().map(|g| g.bufs.len()) {
            report(&(0..n).map(|t| (0, t)).collect::<Vec<_>>(), &mut gproj, gllm.as_deref_mut())?;
        }
        if let Some(g) = gllm.as_deref_mut() {
            // Visual rows came from the projector, not the embedding table: no gradient there.
            let zeros = be.zeros(nv * h)?;
            for &start in &acts.visual_starts {
                be.copy_range(&zeros, 0, &mut dx, start * h, nv * h)?;
            }
            self.llm.embed_backward(be, g, &acts.ids, &dx)?;
            // Last: the embedding (the tied head's too) and a separate head, whose gradient the
            // loss wrote before this backward.
            let mut last = vec![(llm_set, self.llm.embed_id())];
            last.extend((self.llm.lm_head_id() != self.llm.embed_id()).then_some((llm_set, self.llm.lm_head_id())));
            report(&last, &mut gproj, Some(g))?;
        }
        Ok(())
    }
}
