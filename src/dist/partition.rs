//! Which rank holds the optimizer state of each optimizer piece (ZeRO-1).
//!
//! The unit is an optimizer [`Piece`]: a whole tensor, or a run of at most
//! `AdamWConfig::piece_elems` elements of a larger one, cut the same way at every world size. A
//! piece is updated by one `adamw` call exactly as on one rank (same seed, same element indices),
//! which makes ZeRO-1 equal to plain data parallelism bit for bit, and no rank holds more than an
//! even share plus one piece.

use crate::optim::Piece;

/// The owner of every piece, in the pieces' order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub world: usize,
    pub owners: Vec<usize>,
}

impl Partition {
    /// Greedy balance by element count: largest pieces first (ties in piece order), each to the
    /// rank holding the fewest elements so far (ties: the lowest rank). The same on every rank:
    /// it depends only on the shapes.
    pub fn balanced(pieces: &[Piece], world: usize) -> Partition {
        let world = world.max(1);
        let mut order: Vec<usize> = (0..pieces.len()).collect();
        order.sort_by(|&a, &b| pieces[b].len.cmp(&pieces[a].len).then(a.cmp(&b)));
        let mut load = vec![0usize; world];
        let mut owners = vec![0usize; pieces.len()];
        for k in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
            load[r] += pieces[k].len;
            owners[k] = r;
        }
        Partition { world, owners }
    }

    /// Elements each rank owns.
    pub fn loads(&self, pieces: &[Piece]) -> Vec<usize> {
        let mut load = vec![0usize; self.world];
        for (p, &o) in pieces.iter().zip(&self.owners) {
            load[o] += p.len;
        }
        load
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(len: usize) -> Piece {
        Piece { set: 0, tensor: 0, start: 0, len }
    }

    #[test]
    fn balances_pieces_deterministically() {
        let p: Vec<Piece> = [10, 40, 30, 20, 20].into_iter().map(piece).collect();
        let part = Partition::balanced(&p, 2);
        // 40 → r0; 30 → r1; the first 20 → r1 (30 < 40); the second 20 → r0 (40 < 50); 10 → r1.
        assert_eq!(part.owners, vec![1, 0, 1, 1, 0]);
        assert_eq!(part.loads(&p), vec![60, 60]);
        assert_eq!(Partition::balanced(&p, 1).owners, vec![0; 5]);
        // More ranks than pieces: some own nothing, which is allowed.
        assert_eq!(Partition::balanced(&p[..3], 4).loads(&p[..3]), vec![40, 30, 10, 0]);
    }
}
