//! Choosing the next token from a row of logits: greedy (arg-max) by default, or seeded random
//! sampling with temperature, top-k and top-p when asked for.
//!
//! Greedy takes the first maximum, as `torch.argmax` does, so ties resolve like transformers'
//! `generate(do_sample=False)`. Sampling follows transformers' warpers in their order
//! (temperature, then top-k, then top-p: keep the most probable tokens until their mass reaches
//! `top_p`, always at least one) and draws from the renormalised rest. Each sequence has its own
//! random stream derived from the seed and its index in the batch, so a sequence's sample does not
//! depend on which other sequences share its batch.

use anyhow::{bail, ensure, Result};

use crate::data::SplitMix64;

/// How the next token is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// Arg-max (transformers' `do_sample=False`).
    Greedy,
    /// Random draw from `softmax(logits / temperature)` restricted by `top_k` (0 = off) and
    /// `top_p` (1 = off).
    Random { temperature: f32, top_k: usize, top_p: f32, seed: u64 },
}

impl Sampling {
    /// Sampling settings from command-line style options: no temperature (or 0) means greedy.
    pub fn from_options(temperature: Option<f32>, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Result<Self> {
        let t = temperature.unwrap_or(0.0);
        ensure!(t.is_finite() && t >= 0.0, "temperature must be a finite number ≥ 0, got {t}");
        if let Some(p) = top_p {
            ensure!(p > 0.0 && p <= 1.0, "top-p must be in (0, 1], got {p}");
        }
        if t == 0.0 {
            if top_k.is_some() || top_p.is_some() {
                bail!("top-k/top-p need sampling: give a --temperature above 0 (0 or none means greedy)");
            }
            return Ok(Sampling::Greedy);
        }
        Ok(Sampling::Random { temperature: t, top_k: top_k.unwrap_or(0), top_p: top_p.unwrap_or(1.0), seed })
    }
}

/// Per-batch token chooser.
pub struct Sampler {
    mode: Sampling,
    rngs: Vec<SplitMix64>,
}

impl Sampler {
    pub fn new(mode: Sampling, sequences: usize) -> Self {
        let rngs = match mode {
            Sampling::Greedy => Vec::new(),
            Sampling::Random { seed, .. } => (0..sequences as u64)
                .map(|i| SplitMix64::new(SplitMix64::new(seed).next_u64() ^ SplitMix64::new(i).next_u64()))
                .collect(),
        };
        Sampler { mode, rngs }
    }

    /// The next token of sequence `seq` from its logits row.
    pub fn pick(&mut self, seq: usize, logits: &[f32]) -> Result<u32> {
        ensure!(!logits.is_empty(), "empty logits row");
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            bail!("the model produced a NaN logit (token {i}); the weights or inputs are broken");
        }
        match self.mode {
            Sampling::Greedy => Ok(argmax(logits)),
            Sampling::Random { temperature, top_k, top_p, .. } => {
                let rng = self.rngs.get_mut(seq).ok_or_else(|| anyhow::anyhow!("sampler: no random stream for sequence {seq}"))?;
                let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                Ok(sample(logits, temperature as f64, top_k, top_p as f64, u))
            }
        }
    }
}

/// Index of the first maximum.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The token that uniform draw `u ∈ [0, 1)` selects from the filtered distribution.
pub fn sample(row: &[f32], temperature: f64, top_k: usize, top_p: f64, u: f64) -> u32 {
    let mut order: Vec<usize> = (0..row.len()).collect();
    // Descending by logit; equal logits keep index order (a stable sort), so results reproduce.
    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
    if top_k > 0 {
        order.truncate(top_k.max(1));
    }
    let max = row[order[0]] as f64 / temperature;
    let weights: Vec<f64> = order.iter().map(|&i| (row[i] as f64 / temperature - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    // top-p: keep tokens while the mass of the more probable ones is below top_p.
    let mut kept = weights.len();
    if top_p < 1.0 {
        let mut before = 0.0;
        for (n, w) in weights.iter().enumerate() {
            if before >= top_p * total {
                kept = n.max(1);
                break;
            }
            before += w;
        }
    }
    let mass: f64 = weights[..kept].iter().sum();
    let target = u * mass;
    let mut acc = 0.0;
    for (n, w) in weights[..kept].iter().enumerate() {
        acc += w;
        if target < acc {
            return order[n] as u32;
        }
    }
    order[kept - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0]), 1);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.2 (logits are their logs)
        let row = [0.2f32.ln(), 0.5f32.ln(), 0.3f32.ln()];
        // top_p 0.6: 0.5 < 0.6 so the 0.3 token is kept too; 0.2 is dropped.
        let picks: Vec<u32> = (0..100).map(|i| sample(&row, 1.0, 0, 0.6, i as f64 / 100.0)).collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 2));
        assert_eq!(picks.iter().filter(|&&t| t == 1).count(), 63); // 0.5 / 0.8 of the mass
        // top_p 0.5: the first token alone reaches it.
        assert!((0..100).all(|i| sample(&row, 1.0, 0, 0.5, i as f64 / 100.0) == 1));
        // top_k 2 without top_p: tokens 1 and 2.
        assert!((0..100).all(|i| sample(&row, 1.0, 2, 1.0, i as f64 / 100.0) != 0));
        // No filter: all three, in proportion.
        let zeros = (0..1000).filter(|&i| sample(&row, 1.0, 0, 1.0, i as f64 / 1000.0) == 0).count();
        assert!((199..=201).contains(&zeros), "{zeros}");
    }

    #[test]
    fn sampling_is_seeded_and_per_sequence() {
        let row: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mode = Sampling::Random { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 7 };
        let draw = |n: usize, seq: usize| {
            let mut s = Sampler::new(mode, n);
            (0..20).map(|_| s.pick(seq, &row).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(draw(1, 0), draw(3, 0));
        assert_ne!(draw(3, 0), draw(3, 1));
        assert!(Sampler::new(Sampling::Greedy, 1).pick(0, &[0.0, f32::NAN]).is_err());
    }

    #[test]
    fn options() {
        assert_eq!(Sampling::from_options(None, None, None, 0).unwrap(), Sampling::Greedy);
        assert!(Sampling::from_options(None, None, Some(0.9), 0).is_err());
        assert!(Sampling::from_options(Some(-1.0), None, None, 0).is_err());
        assert!(matches!(Sampling::from_options(Some(0.7), None, Some(0.9), 3).unwrap(), Sampling::Random { top_k: 0, .. }));
    }
}
