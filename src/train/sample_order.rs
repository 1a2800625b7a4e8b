//! The sample order of a stage: `ceil(len · epochs)` positions, each epoch a fresh permutation
//! seeded by (run seed, stage, epoch), so a resumed run sees exactly the same order. It is built
//! one epoch at a time as the steps reach it, never whole: `epochs` may be any finite number
//! (a run of `epochs = 1e30` ends at its `max_steps`), and only one epoch is held in memory.

use crate::data::Dataset;

pub struct SampleOrder {
    len: usize,
    /// Positions in the stage (saturates at `u64::MAX` for absurd epoch counts).
    total: u64,
    seed: u64,
    stage_index: usize,
    /// The permutation of the epoch last read, and its number.
    cached: Option<(u64, Vec<usize>)>,
}

impl SampleOrder {
    pub fn new(dataset: &Dataset, seed: u64, stage_index: usize, epochs: f64) -> Self {
        let len = dataset.len();
        // `as` saturates: a product beyond u64 becomes u64::MAX positions, never a panic.
        let total = (len as f64 * epochs).ceil() as u64;
        SampleOrder { len, total, seed, stage_index, cached: None }
    }

    /// Optimizer steps of `global_batch` samples that cover the order (the last may be short).
    pub fn steps(&self, global_batch: usize) -> u64 {
        self.total.div_ceil(global_batch.max(1) as u64)
    }

    fn epoch_seed(&self, epoch: u64) -> u64 {
        self.seed ^ (self.stage_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03)
    }

    /// The dataset indices of step `step` (0-based) of `global_batch` samples.
    pub fn step_indices(&mut self, dataset: &Dataset, step: u64, global_batch: usize) -> Vec<usize> {
        let gb = global_batch as u128;
        let start = (step as u128 * gb).min(self.total as u128) as u64;
        let end = ((step as u128 + 1) * gb).min(self.total as u128) as u64;
        (start..end).map(|pos| self.at(dataset, pos)).collect()
    }

    fn at(&mut self, dataset: &Dataset, pos: u64) -> usize {
        let (epoch, i) = (pos / self.len as u64, (pos % self.len as u64) as usize);
        if self.cached.as_ref().is_some_and(|c| c.0 != epoch) {
            self.cached = None;
        }
        let seed = self.epoch_seed(epoch);
        let (_, perm) = self.cached.get_or_insert_with(|| (epoch, dataset.order(seed)));
        perm[i]
    }
}
