//! Ranks as threads of one process over the CPU backend: the engine that checks data parallelism
//! against the 1-rank run in CI.
//!
//! Each collective is one exchange: every rank deposits its values (as f64, which holds f32 and
//! f64 exactly), and when the last arrives every rank reads all of them and combines them itself
//! in rank order, so sums are bit-identical on every rank and from run to run. A rank that ends
//! (returns, fails or panics: its handle is dropped) or does not arrive within the timeout ends
//! the collective with a [`PeerFailure`] on every other rank.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::collective::{check_parts, Collective, Owned, PeerFailure};
use crate::backend::cpu::{CpuBackend, Elem};

/// One round's deposits, shared by the ranks that read them.
type Deposits = Arc<Vec<(&'static str, Vec<f64>)>>;

struct Round {
    /// Collectives completed so far.
    completed: u64,
    slots: Vec<Option<(&'static str, Vec<f64>)>>,
    arrived: usize,
    /// The last round's deposits, per rank until that rank has taken them.
    results: Vec<Option<Deposits>>,
    gone: Vec<bool>,
    aborted: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // A poisoned lock means a rank panicked elsewhere; the round's data is still consistent
        // (nothing panics while holding it), and that rank's departure is recorded on drop.
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One rank's handle on a group of ranks running as threads.
pub struct ThreadGroup {
    rank: usize,
    calls: std::sync::atomic::AtomicU64,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Handles for ranks `0..world`; a collective that waits longer than `timeout` for a rank
    /// fails on every rank.
    pub fn new(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            round: Mutex::new(Round {
                completed: 0,
                slots: vec![None; world],
                arrived: 0,
                results: vec![None; world],
                gone: vec![false; world],
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        (0..world).map(|rank| ThreadGroup { rank, calls: 0.into(), shared: shared.clone() }).collect()
    }

    /// Deposits `data` for collective `op` and returns every rank's deposit, in rank order.
    fn exchange(&self, op: &'static str, data: Vec<f64>) -> Result<Deposits> {
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let s = &*self.shared;
        let fail = |r: &mut Round, msg: String| -> anyhow::Error {
            let msg = r.aborted.get_or_insert(msg).clone();
            s.cv.notify_all();
            anyhow!(PeerFailure(msg))
        };
        let mut r = s.lock();
        if let Some(why) = &r.aborted {
            return Err(anyhow!(PeerFailure(why.clone())));
        }
        r.slots[self.rank] = Some((op, data));
        r.arrived += 1;
        if r.arrived == s.world {
            let deposits: Vec<(&'static str, Vec<f64>)> = r.slots.iter_mut().map(|d| d.take().unwrap_or(("", Vec::new()))).collect();
            if let Some((other, (name, _))) = deposits.iter().enumerate().find(|(_, (name, _))| *name != op) {
                let msg = format!("collective #{call}: rank {} called {op} while rank {other} called {name} (the ranks ran different steps)", self.rank);
                return Err(fail(&mut r, msg));
            }
            let deposits = Arc::new(deposits);
            r.results.iter_mut().for_each(|slot| *slot = Some(deposits.clone()));
            r.arrived = 0;
            r.completed += 1;
            s.cv.notify_all();
        }
        let deadline = Instant::now() + s.timeout;
        loop {
            if let Some(d) = r.results[self.rank].take() {
                return Ok(d);
            }
            if let Some(why) = &r.aborted {
                return Err(anyhow!(PeerFailure(why.clone())));
            }
            let missing: Vec<usize> = (0..s.world).filter(|&q| r.slots[q].is_none()).collect();
            if let Some(&q) = missing.iter().find(|&&q| r.gone[q]) {
                let msg = format!("rank {q} left the job (it failed or ended) before collective #{call} ({op}); stopping every rank");
                return Err(fail(&mut r, msg));
            }
            let now = Instant::now();
            if now >= deadline {
                let msg = format!(
                    "collective #{call} ({op}): rank(s) {missing:?} did not arrive within {:.1} s (hung or dead); stopping every rank",
                    s.timeout.as_secs_f64()
                );
                return Err(fail(&mut r, msg));
            }
            r = s.cv.wait_timeout(r, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        let mut r = self.shared.lock();
        r.gone[self.rank] = true;
        self.shared.cv.notify_all();
    }
}

fn to_f64<T: Elem>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.f64()).collect()
}

/// The concatenation of `bufs`, as f64.
fn concat<'a, T: Elem + 'a>(bufs: impl Iterator<Item = &'a Vec<T>>) -> Vec<f64> {
    bufs.flat_map(|b| b.iter().map(|v| v.f64())).collect()
}

/// `dst[i] = Σ_r deposits[r][off + i]` in rank order, in `T`'s arithmetic.
fn sum_into<T: Elem>(deposits: &Deposits, off: usize, dst: &mut [T]) -> Result<()> {
    for (i, d) in dst.iter_mut().enumerate() {
        let mut acc = T::of(deposits[0].1.get(off + i).copied().ok_or_else(|| anyhow!("a rank's bucket is shorter than this rank's"))?);
        for (_, dep) in &deposits[1..] {
            acc = acc + T::of(*dep.get(off + i).ok_or_else(|| anyhow!("a rank's bucket is shorter than this rank's"))?);
        }
        *d = acc;
    }
    Ok(())
}

fn check_lengths(deposits: &Deposits, op: &str) -> Result<()> {
    let n = deposits[0].1.len();
    if let Some((r, (_, d))) = deposits.iter().enumerate().find(|(_, (_, d))| d.len() != n) {
        bail!("{op}: rank {r} sent {} values, rank 0 sent {n} (the ranks' buffers differ)", d.len());
    }
    Ok(())
}

impl<T: Elem> Collective<CpuBackend<T>> for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_gather_host(&self, xs: &[f64]) -> Result<Vec<Vec<f64>>> {
        let d = self.exchange("all_gather_host", xs.to_vec())?;
        check_lengths(&d, "all_gather_host")?;
        Ok(d.iter().map(|(_, v)| v.clone()).collect())
    }
    fn all_reduce(&self, _: &CpuBackend<T>, bufs: &mut [&mut Vec<T>]) -> Result<()> {
        let d = self.exchange("all_reduce", concat(bufs.iter().map(|b| &**b)))?;
        check_lengths(&d, "all_reduce")?;
        let mut off = 0;
        for b in bufs.iter_mut() {
            sum_into(&d, off, b)?;
            off += b.len();
        }
        Ok(())
    }
    fn reduce_to_owners(&self, _: &CpuBackend<T>, bufs: &mut [Owned<'_, Vec<T>>]) -> Result<()> {
        check_parts(bufs, Vec::len)?;
        let d = self.exchange("reduce_to_owners", concat(bufs.iter().map(|b| &*b.buf)))?;
        check_lengths(&d, "reduce_to_owners")?;
        let mut off = 0;
        for b in bufs.iter_mut() {
            for part in b.parts.iter().filter(|p| p.owner == self.rank) {
                sum_into(&d, off + part.start, &mut b.buf[part.range()])?;
            }
            off += b.buf.len();
        }
        Ok(())
    }
    fn broadcast_from_owners(&self, _: &CpuBackend<T>, bufs: &mut [Owned<'_, Vec<T>>]) -> Result<()> {
        check_parts(bufs, Vec::len)?;
        // Each rank sends only the parts it owns; the receivers find them by walking the list.
        let mine: Vec<f64> = bufs
            .iter()
            .flat_map(|b| b.parts.iter().filter(|p| p.owner == self.rank).flat_map(|p| b.buf[p.range()].iter().map(|v| v.f64())))
            .collect();
        let d = self.exchange("broadcast_from_owners", mine)?;
        let mut offsets = vec![0usize; self.shared.world];
        for b in bufs.iter_mut() {
            for part in &b.parts {
                let o = part.owner;
                let src = d
                    .get(o)
                    .and_then(|(_, v)| v.get(offsets[o]..offsets[o] + part.len))
                    .ok_or_else(|| anyhow!("broadcast: rank {o} sent fewer values than the parts it owns"))?;
                if o != self.rank {
                    b.buf[part.range()].iter_mut().zip(src).for_each(|(x, &y)| *x = T::of(y));
                }
                offsets[o] += part.len;
            }
        }
        Ok(())
    }
    fn host_from(&self, local: Option<&[f32]>, len: usize, owner: usize) -> Result<Vec<f32>> {
        let mine = if owner == self.rank { to_f64(local.ok_or_else(|| anyhow!("host_from: the owner passed no values"))?) } else { Vec::new() };
        let d = self.exchange("host_from", mine)?;
        let v = &d.get(owner).ok_or_else(|| anyhow!("host_from: no rank {owner}"))?.1;
        if v.len() != len {
            bail!("host_from: rank {owner} sent {} values, {len} expected", v.len());
        }
        Ok(v.iter().map(|&x| x as f32).collect())
    }
}

/// Runs `f` on `world` ranks, each a thread with its own [`ThreadGroup`] handle, and returns their
/// results in rank order, or the job's error: the first rank's own failure (not a
/// [`PeerFailure`] it caused elsewhere) when there is one, named by rank. A rank that panics is a
/// failure; once one rank has ended, the others are waited for at most `timeout` each.
pub fn run_threads<R, F>(world: usize, timeout: Duration, f: F) -> Result<Vec<R>>
where
    R: Send + 'static,
    F: Fn(ThreadGroup) -> Result<R> + Send + Sync + 'static,
{
    anyhow::ensure!(world >= 1, "a job needs at least one rank");
    let f = Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<R>)>();
    for comm in ThreadGroup::new(world, timeout) {
        let (f, tx) = (f.clone(), tx.clone());
        let rank = comm.rank;
        std::thread::Builder::new()
            .name(format!("rank-{rank}"))
            .spawn(move || {
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)))
                    .unwrap_or_else(|p| {
                        let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
                        Err(anyhow!("rank {rank} panicked: {what}"))
                    });
                let _ = tx.send((rank, out));
            })
            .map_err(|e| anyhow!("starting the thread of rank {rank}: {e}"))?;
    }
    drop(tx);
    let mut results: Vec<Option<R>> = (0..world).map(|_| None).collect();
    let mut errors: Vec<(usize, anyhow::Error)> = Vec::new();
    let mut received = 0;
    while received < world {
        // Once one rank has ended, each of the others has `timeout` to end too.
        let next = if received == 0 { rx.recv().map_err(|_| ()) } else { rx.recv_timeout(timeout).map_err(|_| ()) };
        let Ok((rank, out)) = next else { break };
        received += 1;
        match out {
            Ok(r) => results[rank] = Some(r),
            Err(e) => errors.push((rank, e)),
        }
    }
    if !errors.is_empty() || received < world {
        let silent: Vec<usize> = (0..world).filter(|&r| results[r].is_none() && !errors.iter().any(|(q, _)| *q == r)).collect();
        let cause = errors.iter().position(|(_, e)| e.downcast_ref::<PeerFailure>().is_none()).unwrap_or(0);
        return match errors.into_iter().nth(cause) {
            Some((rank, e)) => Err(e.context(format!("rank {rank} of {world} failed; the job stopped{}", hung_note(&silent)))),
            None => bail!("rank(s) {silent:?} of {world} never finished; the job stopped"),
        };
    }
    Ok(results.into_iter().flatten().collect())
}

fn hung_note(silent: &[usize]) -> String {
    if silent.is_empty() {
        String::new()
    } else {
        format!(" (rank(s) {silent:?} did not end and were abandoned)")
    }
}
