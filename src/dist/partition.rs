//! Which rank holds the optimizer state of each trainable tensor (ZeRO-1).
//!
//! The unit is a whole tensor, as PyTorch's `ZeroRedundancyOptimizer` partitions parameters:
//! every tensor is then updated by one `adamw` call exactly as on one rank (same element indices,
//! so the same stochastic-rounding noise on CUDA, where the kernel's noise is a function of the
//! element's index in its tensor), which makes ZeRO-1 equal to plain data parallelism bit for
//! bit. The price: a rank's share cannot be smaller than the largest tensor (the 0.5B student's
//! tied embedding is a third of its parameters), so the state per rank falls by the world size
//! only while no tensor is larger than 1/world of the total.

use crate::model::ParamSet;

/// The owner of every tensor of every trainable set, `owners[set][tensor]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub world: usize,
    pub owners: Vec<Vec<usize>>,
}

impl Partition {
    /// Greedy balance by element count: largest tensors first (ties in set, then tensor order),
    /// each to the rank holding the fewest elements so far (ties: the lowest rank). The same on
    /// every rank: it depends only on the shapes.
    pub fn balanced<Buf>(sets: &[&ParamSet<Buf>], world: usize) -> Partition {
        let world = world.max(1);
        let mut order: Vec<(usize, usize, usize)> =
            sets.iter().enumerate().flat_map(|(s, p)| p.specs.iter().enumerate().map(move |(i, spec)| (spec.numel(), s, i))).collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut load = vec![0usize; world];
        let mut owners: Vec<Vec<usize>> = sets.iter().map(|p| vec![0; p.specs.len()]).collect();
        for (n, s, i) in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += n;
            owners[s][i] = r;
        }
        Partition { world, owners }
    }

    pub fn owner(&self, set: usize, tensor: usize) -> usize {
        self.owners[set][tensor]
    }

    /// Elements each rank owns.
    pub fn loads<Buf>(&self, sets: &[&ParamSet<Buf>]) -> Vec<usize> {
        let mut load = vec![0usize; self.world];
        for (s, p) in sets.iter().enumerate() {
            for (i, spec) in p.specs.iter().enumerate() {
                load[self.owners[s][i]] += spec.numel();
            }
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ParamSpec;

    fn set(sizes: &[usize]) -> ParamSet<()> {
        ParamSet { specs: sizes.iter().enumerate().map(|(i, &n)| ParamSpec::vector(format!("t{i}"), n)).collect(), bufs: vec![(); sizes.len()] }
    }

    #[test]
    fn balances_whole_tensors_deterministically() {
        let a = set(&[10, 40, 30]);
        let b = set(&[20, 20]);
        let p = Partition::balanced(&[&a, &b], 2);
        // 40 → r0; 30 → r1; b0 (20) → r1 (30 < 40); b1 (20) → r0 (40 < 50); 10 → r1 (50 < 60).
        assert_eq!(p.owners, vec![vec![1, 0, 1], vec![1, 0]]);
        assert_eq!(p.loads(&[&a, &b]), vec![60, 60]);
        assert_eq!(Partition::balanced(&[&a, &b], 1).owners, vec![vec![0, 0, 0], vec![0, 0]]);
        // More ranks than tensors: some own nothing, which is allowed.
        let p = Partition::balanced(&[&a], 4);
        assert_eq!(p.loads(&[&a]), vec![40, 30, 10, 0]);
    }
}
