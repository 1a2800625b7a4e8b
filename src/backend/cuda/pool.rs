//! The caching device allocator: every tensor the CUDA backend creates comes from here, so the
//! training loop allocates nothing from the driver after its first step (SPEC §4).
//!
//! Why: `cuMemAlloc` costs tens of microseconds and `cuMemFree` waits for the whole device, so a
//! backend that asked the driver for every activation would stall the GPU once per op. Freed
//! blocks go back into a free list keyed by size instead, and the next request of (nearly) that
//! size reuses one without a driver call. Reuse needs no synchronisation because all work runs on
//! one stream: a kernel that reads a block before it was freed is ordered before any kernel that
//! writes it after reuse (PyTorch's caching allocator relies on the same stream order).
//!
//! Sizes are rounded (512 B below 1 MiB, 64 KiB above) so shapes that differ by a few elements
//! share blocks, and a cached block is reused for a request only when at most a quarter of it
//! would sit unused. The bytes counted as in use are the requests rounded up to 512 B, as PyTorch's
//! `memory_allocated` counts them (it splits large cached blocks, so its blocks fit the requests);
//! the bytes held from the driver, whole blocks, are counted as reserved. When the driver is out
//! of memory, every cached block is returned to it and the request retried once.
//! The driver side is a trait so the bookkeeping is tested on the CPU.

use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::{anyhow, Result};

/// The driver underneath the pool.
pub(crate) trait RawMemory: Send + Sync {
    /// A fresh allocation of `bytes`, `Ok(None)` when the device is out of memory.
    fn alloc(&self, bytes: usize) -> Result<Option<u64>>;
    /// Returns an allocation to the driver (errors cannot propagate from a drop: a failed free leaks).
    fn free(&self, ptr: u64, bytes: usize);
    /// Waits until no queued work can still use a cached block: called before cached blocks go
    /// back to the driver (a freed buffer's last kernels may still be running).
    fn quiesce(&self) {}
}

/// Byte counts of the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes asked for by live buffers, each rounded up to 512.
    pub in_use: usize,
    pub peak_in_use: usize,
    /// Bytes the pool holds from the driver: in use plus cached.
    pub reserved: usize,
    pub peak_reserved: usize,
    /// Driver calls and requests served from the cache.
    pub driver_allocs: u64,
    pub driver_frees: u64,
    pub reuses: u64,
}

const SMALL: usize = 1 << 20;

/// A block handed out by [`Pool::alloc`]; give it back with [`Pool::free`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    pub ptr: u64,
    /// The block's size (≥ the request).
    pub size: usize,
    /// What it counts as in use: the request rounded up to 512 bytes.
    counted: usize,
}

/// The block size a request of `bytes` is served with.
pub(crate) fn block_size(bytes: usize) -> usize {
    let unit = if bytes <= SMALL { 512 } else { 64 << 10 };
    bytes.div_ceil(unit).max(1) * unit
}

#[derive(Default)]
struct State {
    /// Cached blocks by size.
    free: BTreeMap<usize, Vec<u64>>,
    stats: PoolStats,
}

impl State {
    /// The smallest cached block that fits `block` with at most a quarter of it unused.
    fn take_fit(&mut self, block: usize) -> Option<(u64, usize)> {
        let (&size, list) = self.free.range_mut(block..=block + block / 3).next()?;
        let ptr = list.pop()?;
        if list.is_empty() {
            self.free.remove(&size);
        }
        Some((ptr, size))
    }

    fn hand_out(&mut self, ptr: u64, size: usize, bytes: usize) -> Block {
        let counted = bytes.div_ceil(512) * 512;
        let s = &mut self.stats;
        s.in_use += counted;
        s.peak_in_use = s.peak_in_use.max(s.in_use);
        s.peak_reserved = s.peak_reserved.max(s.reserved);
        Block { ptr, size, counted }
    }
}

pub(crate) struct Pool<R: RawMemory> {
    raw: R,
    state: Mutex<State>,
}

impl<R: RawMemory> Pool<R> {
    pub fn new(raw: R) -> Self {
        Pool { raw, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| anyhow!("the device memory pool's lock is poisoned (an earlier panic)"))
    }

    /// A block of at least `bytes` (> 0), or `Ok(None)` when the device is out of memory even
    /// after the cache was returned to the driver.
    pub fn alloc(&self, bytes: usize) -> Result<Option<Block>> {
        let block = block_size(bytes);
        let mut st = self.lock()?;
        if let Some((ptr, size)) = st.take_fit(block) {
            st.stats.reuses += 1;
            return Ok(Some(st.hand_out(ptr, size, bytes)));
        }
        let ptr = match self.raw.alloc(block)? {
            Some(p) => p,
            None => {
                self.release_cached(&mut st);
                match self.raw.alloc(block)? {
                    Some(p) => p,
                    None => return Ok(None),
                }
            }
        };
        st.stats.driver_allocs += 1;
        st.stats.reserved += block;
        Ok(Some(st.hand_out(ptr, block, bytes)))
    }

    /// Takes back a block from [`Self::alloc`] into the cache.
    pub fn free(&self, b: Block) {
        // A poisoned lock means a panic elsewhere; the block then leaks rather than being reused.
        if let Ok(mut st) = self.state.lock() {
            st.stats.in_use -= b.counted;
            st.free.entry(b.size).or_default().push(b.ptr);
        }
    }

    fn release_cached(&self, st: &mut State) {
        if st.free.is_empty() {
            return;
        }
        self.raw.quiesce();
        for (size, list) in std::mem::take(&mut st.free) {
            for ptr in list {
                self.raw.free(ptr, size);
                st.stats.driver_frees += 1;
                st.stats.reserved -= size;
            }
        }
    }

    /// Returns every cached block to the driver (blocks in use stay): the out-of-memory path's
    /// release, reached directly by the tests.
    #[cfg(test)]
    fn empty_cache(&self) -> Result<()> {
        let mut st = self.lock()?;
        self.release_cached(&mut st);
        Ok(())
    }

    pub fn stats(&self) -> PoolStats {
        self.state.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Starts a new high-water mark at the present use.
    pub fn reset_peaks(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.stats.peak_in_use = st.stats.in_use;
            st.stats.peak_reserved = st.stats.reserved;
        }
    }
}

impl<R: RawMemory> Drop for Pool<R> {
    fn drop(&mut self) {
        if let Ok(st) = self.state.get_mut() {
            let mut st = std::mem::take(st);
            self.release_cached(&mut st);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A fake device of `capacity` bytes that records every driver call.
    #[derive(Clone)]
    struct FakeDevice(Arc<Mutex<Fake>>);
    struct Fake {
        capacity: usize,
        used: usize,
        next: u64,
        live: BTreeMap<u64, usize>,
        quiesced: usize,
    }

    impl FakeDevice {
        fn new(capacity: usize) -> Self {
            FakeDevice(Arc::new(Mutex::new(Fake { capacity, used: 0, next: 1 << 20, live: BTreeMap::new(), quiesced: 0 })))
        }
        fn used(&self) -> usize {
            self.0.lock().unwrap().used
        }
        fn live(&self) -> usize {
            self.0.lock().unwrap().live.len()
        }
    }

    impl RawMemory for FakeDevice {
        fn alloc(&self, bytes: usize) -> Result<Option<u64>> {
            let mut f = self.0.lock().unwrap();
            if f.used + bytes > f.capacity {
                return Ok(None);
            }
            let p = f.next;
            f.next += bytes as u64;
            f.used += bytes;
            f.live.insert(p, bytes);
            Ok(Some(p))
        }
        fn free(&self, ptr: u64, bytes: usize) {
            let mut f = self.0.lock().unwrap();
            assert_eq!(f.live.remove(&ptr), Some(bytes), "freed a block the driver did not hand out, or with the wrong size");
            assert!(f.quiesced > 0, "a cached block went back to the driver without waiting for queued work");
            f.used -= bytes;
        }
        fn quiesce(&self) {
            self.0.lock().unwrap().quiesced += 1;
        }
    }

    #[test]
    fn block_sizes_round_up_by_size_class() {
        assert_eq!(block_size(1), 512);
        assert_eq!(block_size(512), 512);
        assert_eq!(block_size(513), 1024);
        assert_eq!(block_size(1 << 20), 1 << 20);
        assert_eq!(block_size((1 << 20) + 1), (1 << 20) + (64 << 10));
        assert_eq!(block_size(3 << 30), 3 << 30);
    }

    #[test]
    fn a_repeated_step_allocates_nothing_from_the_driver_after_the_first() {
        let dev = FakeDevice::new(1 << 30);
        let pool = Pool::new(dev.clone());
        // One "step": activations of several sizes, some freed early, some kept to the end.
        let step = |pool: &Pool<FakeDevice>| {
            let a = pool.alloc(4096 * 1024 * 2).unwrap().unwrap();
            let b = pool.alloc(1000).unwrap().unwrap();
            pool.free(b);
            let c = pool.alloc(3_000_000).unwrap().unwrap();
            let d = pool.alloc(999).unwrap().unwrap(); // same block class as b: reuses it
            for x in [a, c, d] {
                pool.free(x);
            }
        };
        step(&pool);
        let first = pool.stats();
        assert_eq!(first.driver_allocs, 3, "b's block is reused by d within the step");
        for _ in 0..5 {
            step(&pool);
        }
        let s = pool.stats();
        assert_eq!(s.driver_allocs, first.driver_allocs, "no driver allocation after the first step");
        assert_eq!(s.driver_frees, 0);
        assert_eq!(s.in_use, 0);
        assert_eq!(s.reserved, dev.used());
        assert_eq!(s.reuses, 1 + 5 * 4);
        // In use counts requests rounded to 512 B (3 000 000 → 3 000 320), reserved whole blocks.
        assert_eq!(s.peak_in_use, 4096 * 1024 * 2 + 3_000_320 + 1024);
        assert_eq!(s.peak_reserved, block_size(4096 * 1024 * 2) + block_size(3_000_000) + 1024);
    }

    #[test]
    fn live_blocks_never_overlap() {
        let dev = FakeDevice::new(1 << 30);
        let pool = Pool::new(dev.clone());
        let mut live: Vec<(Block, usize)> = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if live.len() > 8 && rng % 3 == 0 {
                let (b, _) = live.swap_remove((rng as usize / 3) % live.len());
                pool.free(b);
                continue;
            }
            let want = 1 + (rng >> 20) as usize % if i % 5 == 0 { 8 << 20 } else { 64 << 10 };
            let blk = pool.alloc(want).unwrap().unwrap();
            let (p, b) = (blk.ptr, blk.size);
            assert!(b >= want && b - want <= b / 4 + 64 * 1024, "block {b} for {want} bytes");
            for &(o, _) in &live {
                assert!(p + b as u64 <= o.ptr || o.ptr + o.size as u64 <= p, "block at {p} overlaps a live one at {}", o.ptr);
            }
            live.push((blk, want));
        }
        let in_use: usize = live.iter().map(|l| l.1.div_ceil(512) * 512).sum();
        assert_eq!(pool.stats().in_use, in_use);
        assert!(pool.stats().reuses > 0);
    }

    #[test]
    fn out_of_memory_returns_the_cache_to_the_driver_and_retries() {
        let dev = FakeDevice::new(10 << 20);
        let pool = Pool::new(dev.clone());
        let a = pool.alloc(4 << 20).unwrap().unwrap();
        let b = pool.alloc(4 << 20).unwrap().unwrap();
        pool.free(a);
        pool.free(b);
        // 6 MiB fits no cached 4 MiB block; the device has 2 MiB left, so the cache must go back.
        let c = pool.alloc(6 << 20).unwrap().expect("fits once the cache is released");
        let s = pool.stats();
        assert_eq!((s.driver_frees, s.reserved, s.in_use), (2, 6 << 20, 6 << 20));
        assert_eq!(dev.used(), 6 << 20);
        assert_eq!(dev.0.lock().unwrap().quiesced, 1, "one wait before the two blocks are freed");
        // Now truly out of memory: None, and the live block is untouched.
        assert!(pool.alloc(5 << 20).unwrap().is_none());
        pool.free(c);
        assert_eq!(pool.stats().peak_reserved, 8 << 20);
    }

    #[test]
    fn empty_cache_and_drop_return_every_block() {
        let dev = FakeDevice::new(1 << 30);
        let pool = Pool::new(dev.clone());
        let a = pool.alloc(100).unwrap().unwrap();
        let b = pool.alloc(5 << 20).unwrap().unwrap();
        pool.free(b);
        pool.empty_cache().unwrap();
        assert_eq!(dev.live(), 1, "the block in use stays");
        assert_eq!(pool.stats().reserved, a.size);
        pool.free(a);
        pool.reset_peaks();
        assert_eq!(pool.stats().peak_in_use, 0);
        drop(pool);
        assert_eq!((dev.live(), dev.used()), (0, 0));
    }

    #[test]
    fn a_much_larger_cached_block_is_not_used_for_a_small_request() {
        let dev = FakeDevice::new(1 << 30);
        let pool = Pool::new(dev.clone());
        let big = pool.alloc(64 << 20).unwrap().unwrap();
        pool.free(big);
        let small = pool.alloc(1 << 20).unwrap().unwrap();
        assert_ne!(small.ptr, big.ptr);
        assert_eq!(small.size, 1 << 20);
        assert_eq!(pool.stats().driver_allocs, 2);
    }
}
