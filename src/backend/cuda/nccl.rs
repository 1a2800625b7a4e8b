//! NCCL under the collective interface ([`crate::dist::Collective`]): one process per GPU, the
//! communicator made from a unique id that rank 0 creates and shares (`dist::rendezvous`).
//!
//! libnccl is loaded at run time like the rest of CUDA (cudarc's `nccl` feature, dynamic
//! loading): a build without it runs everywhere, and world size 1 never touches it. Collectives
//! run on the backend's stream (the legacy default stream), each bucket in one NCCL group, except
//! the gradient buckets started during the backward (`Collective::start_*`): those go on a second,
//! non-blocking stream, after an event recorded on the backend's stream (so they see the
//! gradients computed so far while the backward goes on), and `finish` makes the backend's
//! stream wait for an event recorded after them. The host waits for collectives by polling an
//! event and `ncclCommGetAsyncError` against a deadline, never in a blocking synchronize: a peer
//! that died or hung makes this rank abort its communicator and fail with a [`PeerFailure`]
//! within the timeout (the launcher then stops the job).

use std::ffi::c_void;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::result as dr;
use cudarc::driver::sys;
use cudarc::nccl::{result as nc, sys as ns};

use super::{CudaBackend, CudaBuf, DType};
use crate::dist::collective::{check_parts, Collective, Owned, Part, PeerFailure};

/// Why NCCL cannot be used here, or `None` when libnccl loads.
pub fn nccl_unavailable() -> Option<String> {
    // SAFETY: only tries to open the library (no symbol is called).
    if unsafe { ns::is_culib_present() } {
        None
    } else {
        Some(
            "libnccl was not found: cudarc looks for libnccl.so (not libnccl.so.2 alone); put a folder holding libnccl.so \
             (e.g. a symlink to the libnccl.so.2 of PyTorch's nvidia-nccl wheel) on LD_LIBRARY_PATH"
                .into(),
        )
    }
}

fn nccl_err(what: &'static str) -> impl FnOnce(nc::NcclError) -> anyhow::Error {
    move |e| anyhow!("NCCL error in {what}: {:?}", e.0)
}

/// A fresh NCCL unique id (rank 0 makes it and shares it with the others).
pub fn unique_id() -> Result<Vec<u8>> {
    if let Some(why) = nccl_unavailable() {
        bail!("{why}");
    }
    let id = nc::get_uniqueid().map_err(nccl_err("ncclGetUniqueId"))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// This rank's NCCL communicator.
pub struct NcclComm<'a> {
    be: &'a CudaBackend,
    comm: ns::ncclComm_t,
    rank: usize,
    world: usize,
    timeout: Duration,
    /// The stream of the collectives started during the backward.
    side: sys::CUstream,
    /// NCCL communicators are not thread-safe: one collective at a time.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    aborted: bool,
    /// Collectives were started on `side` and not finished.
    started: bool,
}

// SAFETY: the raw communicator is used only under `state`'s lock, with the backend's context
// bound on the calling thread.
unsafe impl Send for NcclComm<'_> {}
unsafe impl Sync for NcclComm<'_> {}

impl<'a> NcclComm<'a> {
    /// Joins the communicator of `world` ranks named by `id` as `rank` (every rank calls it).
    pub fn init(be: &'a CudaBackend, id: &[u8], rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        if let Some(why) = nccl_unavailable() {
            bail!("{why}");
        }
        ensure!(id.len() == 128, "an NCCL unique id has 128 bytes, got {}", id.len());
        let mut uid = ns::ncclUniqueId { internal: [0; 128] };
        uid.internal.iter_mut().zip(id).for_each(|(d, &b)| *d = b as ::core::ffi::c_char);
        be.gpu().bind()?;
        super::sim::set_collective_timeout(timeout);
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer and id; every rank of the job makes the same call.
        unsafe { nc::comm_init_rank(&mut comm, world as i32, uid, rank as i32) }.map_err(nccl_err("ncclCommInitRank"))?;
        // Non-blocking: a blocking stream would wait for the legacy default stream's work (and it
        // for this one's), which is exactly the overlap this stream is for.
        let side = dr::stream::create(dr::stream::StreamKind::NonBlocking).map_err(|e| anyhow!("creating the NCCL stream: {e}"))?;
        Ok(NcclComm { be, comm, rank, world, timeout, side, state: Mutex::new(State::default()) })
    }

    /// Runs `enqueue` (NCCL calls on the backend's stream) in one group and waits for it within
    /// the timeout, after the collectives started on the side stream.
    fn run(&self, op: &'static str, enqueue: impl FnOnce(ns::ncclComm_t, ns::cudaStream_t) -> Result<()>) -> Result<()> {
        let mut state = self.lock(op)?;
        // Collectives on one communicator run in the order they are called on every rank: the
        // started ones first.
        let done = self.finish_locked(&mut state).and_then(|()| self.group(NULL_STREAM, enqueue)).and_then(|()| {
            let ev = self.record(std::ptr::null_mut())?;
            self.wait_and_destroy(op, ev)
        });
        self.check(op, &mut state, done)
    }

    /// The lock, with the backend's context bound; an error once the communicator was aborted.
    fn lock(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, State>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.aborted {
            bail!(PeerFailure(format!("NCCL {op}: the communicator was aborted by an earlier failure")));
        }
        self.be.gpu().bind()?;
        Ok(state)
    }

    /// `enqueue` on `stream` in one NCCL group.
    fn group(&self, stream: ns::cudaStream_t, enqueue: impl FnOnce(ns::ncclComm_t, ns::cudaStream_t) -> Result<()>) -> Result<()> {
        nc::group_start().map_err(nccl_err("ncclGroupStart"))?;
        let queued = enqueue(self.comm, stream);
        let ended = nc::group_end().map(|_| ()).map_err(nccl_err("ncclGroupEnd"));
        queued.and(ended)
    }

    /// A fresh event recorded on `stream`.
    fn record(&self, stream: sys::CUstream) -> Result<sys::CUevent> {
        let ev = dr::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| anyhow!("cuEventCreate: {e}"))?;
        // SAFETY: a live event and stream.
        if let Err(e) = unsafe { dr::event::record(ev, stream) } {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { dr::event::destroy(ev) };
            bail!("cuEventRecord: {e}");
        }
        Ok(ev)
    }

    /// Waits for `ev` within the timeout, then destroys it.
    fn wait_and_destroy(&self, op: &'static str, ev: sys::CUevent) -> Result<()> {
        let waited = self.wait(op, ev);
        // SAFETY: a live event, destroyed once.
        let _ = unsafe { dr::event::destroy(ev) };
        waited
    }

    /// Makes the backend's stream wait for the collectives started on the side stream, and the
    /// host too (within the timeout: it is where a dead peer shows).
    fn finish_locked(&self, state: &mut State) -> Result<()> {
        if !state.started {
            return Ok(());
        }
        let ev = self.record(self.side)?;
        // SAFETY: live stream and event.
        if let Err(e) = unsafe { dr::stream::wait_event(std::ptr::null_mut(), ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) } {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { dr::event::destroy(ev) };
            bail!("cuStreamWaitEvent: {e}");
        }
        self.wait_and_destroy("gradient reduction", ev)?;
        state.started = false;
        Ok(())
    }

    /// Starts `enqueue` on the side stream after the work queued so far on the backend's stream.
    fn start(&self, op: &'static str, enqueue: impl FnOnce(ns::ncclComm_t, ns::cudaStream_t) -> Result<()>) -> Result<()> {
        let mut state = self.lock(op)?;
        let done = self.record(std::ptr::null_mut()).and_then(|ev| {
            // SAFETY: live stream and event; an event may be destroyed once waited on.
            let waited = unsafe { dr::stream::wait_event(self.side, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) };
            // SAFETY: created above, destroyed once (the wait keeps what it needs).
            let _ = unsafe { dr::event::destroy(ev) };
            waited.map_err(|e| anyhow!("cuStreamWaitEvent: {e}"))?;
            state.started = true;
            self.group(self.side as ns::cudaStream_t, enqueue)
        });
        self.check(op, &mut state, done)
    }

    /// Turns a failure the communicator itself reports (a peer died, aborted or timed out) into
    /// a [`PeerFailure`] and aborts: NCCL may report it from a call rather than from the stream
    /// (the simulated NCCL, which runs collectives at ncclGroupEnd, always does).
    fn check(&self, op: &'static str, state: &mut State, done: Result<()>) -> Result<()> {
        let Err(e) = done else { return Ok(()) };
        let async_err = self.async_error();
        let e = match e.downcast::<PeerFailure>() {
            Ok(p) => anyhow::Error::new(p),
            Err(e) if !matches!(async_err, ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress) => {
                anyhow::Error::new(PeerFailure(format!("NCCL {op} failed on rank {} of {}: {async_err:?} ({e:#}); the job stops", self.rank, self.world)))
            }
            Err(e) => return Err(e),
        };
        // SAFETY: a live communicator; after this it is never used again.
        let _ = unsafe { nc::comm_abort(self.comm) };
        state.aborted = true;
        Err(e)
    }

    /// The communicator's asynchronous error (`ncclSuccess` while it is healthy).
    fn async_error(&self) -> ns::ncclResult_t {
        let mut err = ns::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out pointer.
        unsafe { ns::ncclCommGetAsyncError(self.comm, &mut err) };
        err
    }

    /// Polls the recorded event `ev` and the communicator's error until the deadline.
    fn wait(&self, op: &'static str, ev: sys::CUevent) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: a live event.
            match unsafe { dr::event::query(ev) } {
                Ok(()) => return Ok(()),
                Err(dr::DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => {}
                Err(e) => bail!("CUDA error while waiting for NCCL {op}: {e}"),
            }
            let async_err = self.async_error();
            if !matches!(async_err, ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress) {
                bail!(PeerFailure(format!("NCCL {op} failed on rank {}: {async_err:?} (a rank died or the network failed); the job stops", self.rank)));
            }
            if Instant::now() >= deadline {
                bail!(PeerFailure(format!(
                    "NCCL {op} did not complete within {:.0} s on rank {} of {}: another rank died or hung; the job stops",
                    self.timeout.as_secs_f64(),
                    self.rank,
                    self.world
                )));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl Drop for NcclComm<'_> {
    fn drop(&mut self) {
        let aborted = self.state.lock().unwrap_or_else(|e| e.into_inner()).aborted;
        if self.be.gpu().bind().is_ok() {
            if !aborted {
                // SAFETY: a live communicator, destroyed once.
                let _ = unsafe { nc::comm_destroy(self.comm) };
            }
            // SAFETY: created at init, destroyed once.
            let _ = unsafe { dr::stream::destroy(self.side) };
        }
    }
}

fn dtype(b: &CudaBuf) -> ns::ncclDataType_t {
    match b.dtype() {
        DType::Bf16 => ns::ncclDataType_t::ncclBfloat16,
        DType::F32 => ns::ncclDataType_t::ncclFloat32,
    }
}

fn ptr(b: &CudaBuf) -> *mut c_void {
    b.ptr() as *mut c_void
}

/// The device address of a part of a buffer.
fn part_ptr(b: &CudaBuf, p: &Part) -> *mut c_void {
    (b.ptr() + (p.start * b.dtype().size()) as u64) as *mut c_void
}


const NULL_STREAM: ns::cudaStream_t = std::ptr::null_mut();

/// Sums every buffer over the ranks, in place.
fn enqueue_all_reduce(bufs: &[&mut CudaBuf], c: ns::ncclComm_t, st: ns::cudaStream_t) -> Result<()> {
    for b in bufs {
        // SAFETY: in place over the buffer's own length and type.
        unsafe { nc::all_reduce(ptr(b), ptr(b), b.len(), dtype(b), ns::ncclRedOp_t::ncclSum, c, st) }.map_err(nccl_err("ncclAllReduce"))?;
    }
    Ok(())
}

/// Sums every part over the ranks into its owner's copy (parts checked by the caller).
fn enqueue_reduce_to_owners(bufs: &[Owned<'_, CudaBuf>], c: ns::ncclComm_t, st: ns::cudaStream_t) -> Result<()> {
    for b in bufs {
        for p in &b.parts {
            let at = part_ptr(b.buf, p);
            // SAFETY: in place over a checked range of the buffer, in its own type.
            unsafe { nc::reduce(at, at, p.len, dtype(b.buf), ns::ncclRedOp_t::ncclSum, p.owner as i32, c, st) }.map_err(nccl_err("ncclReduce"))?;
        }
    }
    Ok(())
}

impl Collective<CudaBackend> for NcclComm<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_gather_host(&self, xs: &[f64]) -> Result<Vec<Vec<f64>>> {
        let n = xs.len();
        if n == 0 {
            return Ok(vec![Vec::new(); self.world]);
        }
        // f64 travels in f32-typed buffers of twice the length (the backend has no f64 buffers).
        let send = self.be.alloc(2 * n, DType::F32)?;
        let recv = self.be.alloc(2 * n * self.world, DType::F32)?;
        self.be.gpu().htod(send.ptr(), xs)?;
        self.run("all_gather", |c, st| {
            // SAFETY: send holds n f64, recv n·world.
            unsafe { nc::all_gather(ptr(&send), ptr(&recv), n, ns::ncclDataType_t::ncclFloat64, c, st) }.map_err(nccl_err("ncclAllGather"))?;
            Ok(())
        })?;
        let mut all = vec![0f64; n * self.world];
        self.be.gpu().dtoh(&mut all, recv.ptr())?;
        Ok(all.chunks(n).map(<[f64]>::to_vec).collect())
    }
    fn all_reduce(&self, _: &CudaBackend, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        self.run("all_reduce", |c, st| enqueue_all_reduce(bufs, c, st))
    }
    fn reduce_to_owners(&self, _: &CudaBackend, bufs: &mut [Owned<'_, CudaBuf>]) -> Result<()> {
        check_parts(bufs, CudaBuf::len)?;
        self.run("reduce", |c, st| enqueue_reduce_to_owners(bufs, c, st))
    }
    fn start_all_reduce(&self, _: &CudaBackend, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        self.start("all_reduce", |c, st| enqueue_all_reduce(bufs, c, st))
    }
    fn start_reduce_to_owners(&self, _: &CudaBackend, bufs: &mut [Owned<'_, CudaBuf>]) -> Result<()> {
        check_parts(bufs, CudaBuf::len)?;
        self.start("reduce", |c, st| enqueue_reduce_to_owners(bufs, c, st))
    }
    fn finish(&self, _: &CudaBackend) -> Result<()> {
        let mut state = self.lock("gradient reduction")?;
        let done = self.finish_locked(&mut state);
        self.check("gradient reduction", &mut state, done)
    }
    fn broadcast_from_owners(&self, _: &CudaBackend, bufs: &mut [Owned<'_, CudaBuf>]) -> Result<()> {
        check_parts(bufs, CudaBuf::len)?;
        self.run("broadcast", |c, st| {
            for b in bufs.iter() {
                for p in &b.parts {
                    let at = part_ptr(b.buf, p);
                    // SAFETY: in place over a checked range of the buffer, in its own type.
                    unsafe { nc::broadcast(at, at, p.len, dtype(b.buf), p.owner as i32, c, st) }.map_err(nccl_err("ncclBroadcast"))?;
                }
            }
            Ok(())
        })
    }
    fn host_from(&self, local: Option<&[f32]>, len: usize, owner: usize) -> Result<Vec<f32>> {
        let buf = self.be.alloc(len, DType::F32)?;
        if owner == self.rank {
            let data = local.ok_or_else(|| anyhow!("host_from: the owner passed no values"))?;
            ensure!(data.len() == len, "host_from: {} values for {len}", data.len());
            self.be.gpu().htod(buf.ptr(), data)?;
        }
        self.run("broadcast", |c, st| {
            // SAFETY: buf holds len f32 on every rank.
            unsafe { nc::broadcast(ptr(&buf), ptr(&buf), len, ns::ncclDataType_t::ncclFloat32, owner as i32, c, st) }.map_err(nccl_err("ncclBroadcast"))?;
            Ok(())
        })?;
        let mut out = vec![0f32; len];
        self.be.gpu().dtoh(&mut out, buf.ptr())?;
        Ok(out)
    }
}
