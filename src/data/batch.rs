//! Packing encoded samples into one batch without padding.
//!
//! Sequences are concatenated; `seq_lens` delimits them and `positions` restarts at 0 in each, so
//! varlen attention and RoPE see every sequence as if it were alone, and no compute is spent on
//! padding.

use anyhow::{ensure, Result};

use super::template::{EncodedSample, Group};

/// A packed batch: every per-position vector has `Σ seq_lens` entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedBatch {
    /// Token ids; visual positions hold the placeholder id.
    pub ids: Vec<u32>,
    pub groups: Vec<Group>,
    /// Position of each token within its own sequence (0, 1, …).
    pub positions: Vec<u32>,
    /// Length of each sequence, in batch order.
    pub seq_lens: Vec<usize>,
    /// Per sequence: the index of its image in `pixel_values`, or `None` for a text-only sample.
    pub images: Vec<Option<usize>>,
    /// Preprocessed images, `[3, H, W]` each, in the order the sequences reference them.
    pub pixel_values: Vec<Vec<f32>>,
}

impl PackedBatch {
    pub fn n_sequences(&self) -> usize {
        self.seq_lens.len()
    }

    pub fn n_tokens(&self) -> usize {
        self.ids.len()
    }

    /// Start offset of each sequence in the packed vectors (cumulative `seq_lens`, length n + 1),
    /// the `cu_seqlens` varlen attention takes.
    pub fn cu_seq_lens(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.seq_lens.len() + 1);
        out.push(0);
        for &l in &self.seq_lens {
            out.push(out[out.len() - 1] + l);
        }
        out
    }
}

/// Concatenates samples, each with its preprocessed image when it has one.
///
/// Errors when a sample's image presence disagrees with its encoding (an image-bearing sample
/// without pixels or the reverse) or its ids and groups differ in length.
pub fn collate(samples: Vec<(EncodedSample, Option<Vec<f32>>)>) -> Result<PackedBatch> {
    let mut b = PackedBatch::default();
    for (i, (s, pixels)) in samples.into_iter().enumerate() {
        ensure!(
            s.ids.len() == s.groups.len(),
            "sample {i} of the batch has {} ids but {} groups",
            s.ids.len(),
            s.groups.len()
        );
        ensure!(!s.ids.is_empty(), "sample {i} of the batch is empty");
        ensure!(
            s.has_image == pixels.is_some(),
            "sample {i} of the batch: has_image is {} but pixel values were {}given",
            s.has_image,
            if pixels.is_some() { "" } else { "not " }
        );
        ensure!(
            s.ids.len() <= u32::MAX as usize,
            "sample {i} is too long to index"
        );
        b.positions.extend(0..s.ids.len() as u32);
        b.seq_lens.push(s.ids.len());
        b.ids.extend_from_slice(&s.ids);
        b.groups.extend_from_slice(&s.groups);
        b.images.push(pixels.map(|p| {
            b.pixel_values.push(p);
            b.pixel_values.len() - 1
        }));
    }
    Ok(b)
}
