//! The collective operations data-parallel training uses, behind one trait so the step loop is
//! written once for NCCL and for ranks-as-threads.
//!
//! Every rank calls the same operations in the same order (the step loop is deterministic), and
//! every operation is bounded in time: a peer that died or hung turns into an error
//! ([`PeerFailure`]) on every rank still running, never a wait without end.

use anyhow::Result;

use crate::backend::Backend;

/// A run of a buffer's elements and the rank that owns it (ZeRO-1: the rank holding the
/// optimizer state of that piece of the tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub start: usize,
    pub len: usize,
    pub owner: usize,
}

impl Part {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

/// A buffer and the owners of its parts (which cover it, in order).
pub struct Owned<'a, Buf> {
    pub buf: &'a mut Buf,
    pub parts: Vec<Part>,
}

/// Checks that every part lies inside its buffer (`len` gives a buffer's length).
pub fn check_parts<Buf>(bufs: &[Owned<'_, Buf>], len: impl Fn(&Buf) -> usize) -> Result<()> {
    for b in bufs {
        let n = len(b.buf);
        if let Some(p) = b.parts.iter().find(|p| p.start + p.len > n) {
            anyhow::bail!("part {:?} lies past the end of its buffer of {n} elements", p.range());
        }
    }
    Ok(())
}

/// The operations of data-parallel training. Buffer lists are one bucket each: an implementation
/// moves them in one exchange (one NCCL group).
pub trait Collective<B: Backend>: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Every rank's `xs` (the same length on every rank), in rank order.
    fn all_gather_host(&self, xs: &[f64]) -> Result<Vec<Vec<f64>>>;
    /// Replaces every buffer with its sum over the ranks.
    fn all_reduce(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()>;
    /// Sums every part over the ranks into its owner's copy (the other copies are left
    /// unspecified): ZeRO-1's reduce-scatter, at the granularity of optimizer pieces.
    fn reduce_to_owners(&self, be: &B, bufs: &mut [Owned<'_, B::Buf>]) -> Result<()>;
    /// Copies every part from its owner to every rank: ZeRO-1's all-gather of the updated
    /// parameters.
    fn broadcast_from_owners(&self, be: &B, bufs: &mut [Owned<'_, B::Buf>]) -> Result<()>;
    /// Starts [`Collective::all_reduce`] of a bucket and returns while it runs (on CUDA: on a
    /// second stream, after the work queued so far); [`Collective::finish`] waits for it. Buckets
    /// are started in the same order on every rank. By default it runs to the end at once.
    fn start_all_reduce(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        self.all_reduce(be, bufs)
    }
    /// Starts [`Collective::reduce_to_owners`] of a bucket, as [`Collective::start_all_reduce`].
    fn start_reduce_to_owners(&self, be: &B, bufs: &mut [Owned<'_, B::Buf>]) -> Result<()> {
        self.reduce_to_owners(be, bufs)
    }
    /// Waits until every bucket started has been reduced; work queued after it sees the results.
    fn finish(&self, _be: &B) -> Result<()> {
        Ok(())
    }
    /// `owner`'s host values (`len` of them; `local` is `Some` exactly on the owner) on every rank:
    /// optimizer state on its way to the rank that writes the checkpoint.
    fn host_from(&self, local: Option<&[f32]>, len: usize, owner: usize) -> Result<Vec<f32>>;
}

/// The error a rank gets when another rank failed, left or hung: the job is over. Whoever runs
/// the ranks reports the failing rank's own error first when there is one.
#[derive(Debug)]
pub struct PeerFailure(pub String);

impl std::fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerFailure {}

/// Sums each rank's value in rank order (0 + x₀ + x₁ + …): the same bits on every rank and with
/// every implementation, whatever order the ranks arrive in.
pub fn sum_in_rank_order(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(0.0, |a, x| a + x)
}

/// World size 1: nothing to exchange, and nothing is loaded (no NCCL).
pub struct Solo;

impl<B: Backend> Collective<B> for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_gather_host(&self, xs: &[f64]) -> Result<Vec<Vec<f64>>> {
        Ok(vec![xs.to_vec()])
    }
    fn all_reduce(&self, _: &B, _: &mut [&mut B::Buf]) -> Result<()> {
        Ok(())
    }
    fn reduce_to_owners(&self, _: &B, _: &mut [Owned<'_, B::Buf>]) -> Result<()> {
        Ok(())
    }
    fn broadcast_from_owners(&self, _: &B, _: &mut [Owned<'_, B::Buf>]) -> Result<()> {
        Ok(())
    }
    fn host_from(&self, local: Option<&[f32]>, len: usize, owner: usize) -> Result<Vec<f32>> {
        match local {
            Some(x) if owner == 0 && x.len() == len => Ok(x.to_vec()),
            _ => anyhow::bail!("host_from: a single rank must own and pass its {len} values (owner {owner})"),
        }
    }
}
