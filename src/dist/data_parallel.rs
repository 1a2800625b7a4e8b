//! What a training step needs from the other ranks: the step-wide loss counts and reports, the
//! gradient reduction and the optimizer step (plain data parallelism or ZeRO-1), and the
//! optimizer state gathered for a checkpoint.
//!
//! The reference is the 1-rank run with the same global batch: every rank takes a contiguous
//! block of whole micro-batches of each global batch, every mean divides by the step's count over
//! all ranks, and the loss reports are summed in global micro-batch order, so the losses of a step
//! are those of one rank bit for bit whenever the weights are. Gradients are summed in rank order;
//! one rank accumulates micro-batch after micro-batch into its gradient buffers, so N ranks add
//! the same terms in another association: equal up to rounding (the tests state the tolerance).

use anyhow::{ensure, Result};

use super::collective::{sum_in_rank_order, Collective, Owned, Part};
use super::partition::Partition;
use crate::backend::Backend;
use crate::loss::{LossCounts, LossReport};
use crate::model::{GradsReady, ParamSet, ParamSpec};
use crate::optim::{pieces, AdamW, AdamWConfig, Piece, PieceState, StepReport};
use crate::train::checkpoint::{optimizer_entry_name, push_hf_tensors, HostTensor};

/// How the ranks share the optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistOptions {
    /// ZeRO-1: each optimizer piece's state on one rank (its gradients reduced to it, its updated
    /// parameters sent from it); otherwise every rank holds all of it (gradients all-reduced).
    pub zero: bool,
    /// Elements per gradient bucket: one exchange (one NCCL group) per bucket.
    pub bucket_elems: usize,
    /// Start each bucket's reduction during the backward of the step's last micro-batch, as soon
    /// as its gradients are complete ([`GradSync::overlap`]).
    pub overlap: bool,
}

/// Sums each rank's counts over the ranks (in rank order: exact for counts below 2⁵³).
pub fn sum_over_ranks<B: Backend>(comm: &dyn Collective<B>, values: &[usize]) -> Result<Vec<usize>> {
    let local: Vec<f64> = values.iter().map(|&v| v as f64).collect();
    let all = comm.all_gather_host(&local)?;
    Ok((0..values.len()).map(|i| sum_in_rank_order(all.iter().map(|r| r[i])) as usize).collect())
}

/// Checks that every rank runs the same job: `what` (e.g. the recipe) serialised the same way on
/// every rank. Ranks given different configs or `--set` overrides would otherwise call different
/// collectives or reduce differently sized buffers.
pub fn check_same_on_all_ranks<B: Backend>(comm: &dyn Collective<B>, what: &str, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string(value)?;
    // FNV-1a, split into halves an f64 holds exactly.
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    let all = comm.all_gather_host(&[(h >> 32) as f64, (h & 0xffff_ffff) as f64])?;
    if let Some(r) = (1..all.len()).find(|&r| all[r] != all[0]) {
        anyhow::bail!("rank {r}'s {what} differs from rank 0's: every rank must run the same config with the same --set overrides");
    }
    Ok(())
}

/// The step's loss counts over all ranks, and the fewest micro-batches any rank has this step
/// (`micro_batches` is this rank's).
pub fn step_counts<B: Backend>(comm: &dyn Collective<B>, local: &LossCounts, micro_batches: usize) -> Result<(LossCounts, usize)> {
    let mine = [local.ce, local.response, local.prompt, local.visual, local.images, micro_batches];
    let all = comm.all_gather_host(&mine.map(|v| v as f64))?;
    let v: Vec<usize> = (0..5).map(|i| sum_in_rank_order(all.iter().map(|r| r[i])) as usize).collect();
    let fewest = all.iter().map(|r| r[5] as usize).min().unwrap_or(0);
    Ok((LossCounts { ce: v[0], response: v[1], prompt: v[2], visual: v[3], images: v[4] }, fewest))
}

const REPORT_LEN: usize = 11;

fn encode(r: Option<&LossReport>, out: &mut Vec<f64>) {
    let opt = |x: Option<f64>| [x.is_some() as u8 as f64, x.unwrap_or(0.0)];
    match r {
        None => out.extend([0.0; REPORT_LEN]),
        Some(r) => {
            out.extend([1.0, r.ce, r.total]);
            for x in [r.response, r.prompt, r.visual, r.relation] {
                out.extend(opt(x));
            }
        }
    }
}

fn decode(v: &[f64]) -> Option<LossReport> {
    let opt = |i: usize| (v[i] != 0.0).then_some(v[i + 1]);
    (v[0] != 0.0).then(|| LossReport { ce: v[1], total: v[2], response: opt(3), prompt: opt(5), visual: opt(7), relation: opt(9) })
}

/// The step's report: every rank's micro-batch reports (at most `slots` each; a micro-batch whose
/// samples were all skipped has none) added in global micro-batch order, as one rank adds them.
pub fn step_report<B: Backend>(comm: &dyn Collective<B>, local: &[LossReport], slots: usize) -> Result<LossReport> {
    ensure!(local.len() <= slots, "{} micro-batch reports for {slots} micro-batches", local.len());
    let mut v = Vec::with_capacity(slots * REPORT_LEN);
    (0..slots).for_each(|i| encode(local.get(i), &mut v));
    let mut total = LossReport::default();
    for rank in comm.all_gather_host(&v)? {
        for r in rank.chunks(REPORT_LEN).filter_map(decode) {
            total.add(&r);
        }
    }
    Ok(total)
}

/// Gradient reduction and the optimizer step of one stage across the ranks.
pub struct GradSync<'a, B: Backend> {
    comm: &'a dyn Collective<B>,
    opts: DistOptions,
    cfg: AdamWConfig,
    pieces: Vec<Piece>,
    partition: Partition,
    /// `parts[set][tensor]`: the tensor's pieces with their owners.
    parts: Vec<Vec<Vec<Part>>>,
    /// The buckets, each (set, tensor) pairs in order: consecutive tensors of the sets, at most
    /// `bucket_elems` elements unless one tensor alone is larger.
    buckets: Vec<Vec<(usize, usize)>>,
}

impl<'a, B: Backend> GradSync<'a, B> {
    /// For the trainable sets `params` and the optimizer `cfg` (shapes and piece size fix the
    /// partition, the same on every rank).
    pub fn new(comm: &'a dyn Collective<B>, opts: DistOptions, params: &[&ParamSet<B::Buf>], cfg: AdamWConfig) -> Self {
        let specs: Vec<&[ParamSpec]> = params.iter().map(|p| p.specs.as_slice()).collect();
        let pieces = pieces(&specs, cfg.piece_elems);
        let partition = Partition::balanced(&pieces, comm.world());
        let mut parts: Vec<Vec<Vec<Part>>> = params.iter().map(|p| vec![Vec::new(); p.specs.len()]).collect();
        for (p, &owner) in pieces.iter().zip(&partition.owners) {
            parts[p.set][p.tensor].push(Part { start: p.start, len: p.len, owner });
        }
        let mut buckets: Vec<Vec<(usize, usize)>> = Vec::new();
        let mut elems = 0usize;
        for (s, set) in params.iter().enumerate() {
            for (i, spec) in set.specs.iter().enumerate() {
                let n = spec.numel();
                match buckets.last_mut() {
                    Some(b) if elems + n <= opts.bucket_elems => b.push((s, i)),
                    _ => {
                        buckets.push(vec![(s, i)]);
                        elems = 0;
                    }
                }
                elems += n;
            }
        }
        GradSync { comm, opts, cfg, pieces, partition, parts, buckets }
    }

    fn sharded(&self) -> bool {
        self.opts.zero && self.comm.world() > 1
    }

    /// The optimizer of this rank: the state of the pieces it owns under ZeRO-1, else all.
    pub fn optimizer(&self, be: &B, params: &[&ParamSet<B::Buf>]) -> Result<AdamW<B::State>> {
        let rank = self.comm.rank();
        let sharded = self.sharded();
        AdamW::holding(be, params, self.cfg, |k| !sharded || self.partition.owners[k] == rank)
    }

    /// Calls `op` on `bucket`'s buffers of `sets`, with their parts' owners.
    fn with_bucket(&self, sets: &mut [&mut ParamSet<B::Buf>], bucket: &[(usize, usize)], op: impl FnOnce(&mut [Owned<'_, B::Buf>]) -> Result<()>) -> Result<()> {
        let mut owned: Vec<Owned<'_, B::Buf>> = Vec::with_capacity(bucket.len());
        for (s, set) in sets.iter_mut().enumerate() {
            for (i, buf) in set.bufs.iter_mut().enumerate() {
                if bucket.contains(&(s, i)) {
                    owned.push(Owned { buf, parts: self.parts[s][i].clone() });
                }
            }
        }
        op(&mut owned)
    }

    /// Starts the gradient reduction of bucket `b` (an all-reduce, or ZeRO-1's reduce to owners).
    fn start_bucket(&self, be: &B, grads: &mut [&mut ParamSet<B::Buf>], b: usize) -> Result<()> {
        self.with_bucket(grads, &self.buckets[b], |owned| {
            if self.sharded() {
                self.comm.start_reduce_to_owners(be, owned)
            } else {
                let mut bufs: Vec<&mut B::Buf> = owned.iter_mut().map(|o| &mut *o.buf).collect();
                self.comm.start_all_reduce(be, &mut bufs)
            }
        })
    }

    /// A tracker to pass to the backward of the step's last micro-batch (as
    /// [`crate::model::MllmGrads::ready`]): it starts each bucket's reduction as soon as all its
    /// gradients are complete, while the backward goes on; [`GradSync::step`] then starts the
    /// rest and waits for all. `None` when there is nothing to overlap (one rank, or overlap off).
    /// Each bucket is reduced exactly as without it, so the results are the same bits. Every
    /// rank must pass it to the same backward (the last micro-batch of the step, when every rank
    /// has one), since the buckets start in the order the backward completes them.
    pub fn overlap<'s>(&'s self, be: &'s B) -> Option<Overlap<'s, 'a, B>> {
        (self.comm.world() > 1 && self.opts.overlap).then(|| Overlap {
            sync: self,
            be,
            left: self.buckets.iter().map(Vec::len).collect(),
            done: self.parts.iter().map(|set| vec![false; set.len()]).collect(),
            started: vec![false; self.buckets.len()],
        })
    }

    /// Starts the reduction of every bucket `overlap` has not started, then waits for all.
    fn reduce(&self, be: &B, grads: &mut [&mut ParamSet<B::Buf>], overlap: Option<Overlap<'_, 'a, B>>) -> Result<()> {
        let started = overlap.map(|o| o.started).unwrap_or_else(|| vec![false; self.buckets.len()]);
        for b in (0..self.buckets.len()).filter(|&b| !started[b]) {
            self.start_bucket(be, grads, b)?;
        }
        self.comm.finish(be)
    }

    /// Waits for the reductions `overlap` started, when the step is skipped after all (the
    /// gradients are about to be zeroed for the next step).
    pub fn abandon(&self, be: &B, overlap: Option<Overlap<'_, 'a, B>>) -> Result<()> {
        match overlap {
            Some(_) => self.comm.finish(be),
            None => Ok(()),
        }
    }

    /// Calls `op` on consecutive buckets of `sets`' buffers (with their parts' owners).
    fn for_buckets(&self, sets: &mut [&mut ParamSet<B::Buf>], mut op: impl FnMut(&mut [Owned<'_, B::Buf>]) -> Result<()>) -> Result<()> {
        for bucket in &self.buckets {
            self.with_bucket(sets, bucket, &mut op)?;
        }
        Ok(())
    }

    /// Reduces the gradients, clips by their global norm and updates the parameters on every
    /// rank. The norm is Σ over ranks (in rank order) of Σ g² over the pieces each rank owns,
    /// computed the same way with or without ZeRO-1, so both give the same bits.
    /// `overlap`: the tracker the last micro-batch's backward was given, if any.
    pub fn step(
        &self,
        be: &B,
        opt: &mut AdamW<B::State>,
        params: &mut [&mut ParamSet<B::Buf>],
        grads: &mut [&mut ParamSet<B::Buf>],
        lr: f32,
        overlap: Option<Overlap<'_, 'a, B>>,
    ) -> Result<StepReport> {
        let world = self.comm.world();
        if world > 1 {
            self.reduce(be, grads, overlap)?;
        }
        // Σ g² of the pieces each rank owns, side by side in one set of sums: one read-back.
        let ranks: Vec<usize> = if self.sharded() { vec![self.comm.rank()] } else { (0..world).collect() };
        let mut sums = be.sums(ranks.len())?;
        for (slot, &rank) in ranks.iter().enumerate() {
            let ranges: Vec<(&B::Buf, std::ops::Range<usize>)> = self
                .pieces
                .iter()
                .zip(&self.partition.owners)
                .filter(|(_, &o)| o == rank)
                .map(|(p, _)| (&grads[p.set].bufs[p.tensor], p.start..p.start + p.len))
                .collect();
            be.sum_squares_into(&ranges, &mut sums, slot)?;
        }
        let owned = be.read_sums(&sums)?;
        let sum_squares = if self.sharded() {
            sum_in_rank_order(self.comm.all_gather_host(&owned)?.iter().map(|r| r[0]))
        } else {
            sum_in_rank_order(owned)
        };
        let grads_ref: Vec<&ParamSet<B::Buf>> = grads.iter().map(|g| &**g).collect();
        let report = opt.apply(be, params, &grads_ref, lr, sum_squares.sqrt())?;
        if self.sharded() && !report.skipped {
            self.for_buckets(params, |b| self.comm.broadcast_from_owners(be, b))?;
        }
        Ok(report)
    }

    /// The optimizer state as a checkpoint holds it (whole tensors, `names[set]` naming each
    /// set), complete on rank 0 (`Some`), `None` elsewhere; under ZeRO-1 each piece comes from
    /// its owner.
    pub fn optimizer_tensors(&self, be: &B, opt: &AdamW<B::State>, names: &[&str]) -> Result<Option<Vec<HostTensor>>> {
        let rank = self.comm.rank();
        let sharded = self.sharded();
        if !sharded && rank != 0 {
            return Ok(None);
        }
        let kinds: &[&str] = if opt.cfg.master_weights { &["m", "v", "master"] } else { &["m", "v"] };
        let mut out = Vec::new();
        for (s, name) in names.iter().enumerate() {
            for kind in kinds {
                for (i, spec) in opt.specs[s].iter().enumerate() {
                    let mut values = Vec::with_capacity(if rank == 0 { spec.numel() } else { 0 });
                    for (k, p) in opt.pieces.iter().enumerate().filter(|(_, p)| (p.set, p.tensor) == (s, i)) {
                        let owner = if sharded { self.partition.owners[k] } else { 0 };
                        let local = match (&opt.state[k], rank == 0 || owner == rank) {
                            (Some(st), true) => Some(be.download_state(piece_state(st, kind)?)?),
                            _ => None,
                        };
                        let piece = if owner == 0 { local } else { Some(self.comm.host_from(local.as_deref(), p.len, owner)?) };
                        if rank == 0 {
                            values.extend(piece.ok_or_else(|| anyhow::anyhow!("optimizer state of {name}.{} missing on rank 0", spec.name))?);
                        }
                    }
                    if rank == 0 {
                        push_hf_tensors(spec, values, |n| optimizer_entry_name(kind, name, n), &mut out)?;
                    }
                }
            }
        }
        Ok((rank == 0).then_some(out))
    }
}

/// Starts bucket reductions as the backward completes their gradients ([`GradSync::overlap`]).
pub struct Overlap<'s, 'a, B: Backend> {
    sync: &'s GradSync<'a, B>,
    be: &'s B,
    /// Tensors of each bucket not complete yet.
    left: Vec<usize>,
    /// `done[set][tensor]`: reported complete.
    done: Vec<Vec<bool>>,
    started: Vec<bool>,
}

impl<B: Backend> GradsReady<B::Buf> for Overlap<'_, '_, B> {
    fn ready(&mut self, done: &[(usize, usize)], grads: &mut [&mut ParamSet<B::Buf>]) -> Result<()> {
        for &(s, t) in done {
            let slot = self.done.get_mut(s).and_then(|set| set.get_mut(t));
            let Some(slot) = slot else { anyhow::bail!("the backward reported gradient ({s}, {t}), which no trained set has") };
            if std::mem::replace(slot, true) {
                continue;
            }
            let Some(b) = self.sync.buckets.iter().position(|b| b.contains(&(s, t))) else { continue };
            self.left[b] -= 1;
            if self.left[b] == 0 {
                self.sync.start_bucket(self.be, grads, b)?;
                self.started[b] = true;
            }
        }
        Ok(())
    }
}

/// The `kind` buffer (`m`, `v`, `master`) of a piece's state.
pub fn piece_state<'s, S>(st: &'s PieceState<S>, kind: &str) -> Result<&'s S> {
    match kind {
        "m" => Ok(&st.m),
        "v" => Ok(&st.v),
        "master" => st.master.as_ref().ok_or_else(|| anyhow::anyhow!("this optimizer keeps no master weights")),
        other => anyhow::bail!("no optimizer state called {other}"),
    }
}
