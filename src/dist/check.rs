//! A conformance check of a [`Collective`] implementation on live ranks: every operation on
//! values each rank can predict (small integers, exact in bf16), so `kd-engine selftest --nccl`
//! checks NCCL on a GPU (any world size, under `kd-engine launch`) with the same code the tests run
//! over threads.

use anyhow::{ensure, Result};

use super::collective::{Collective, Owned, Part};
use crate::backend::Backend;

/// `len` values of rank `r`: `r + 1 + (i mod 7)`, all small integers.
fn values(r: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (r + 1 + i % 7) as f32).collect()
}

/// Runs each operation once and checks its result on this rank; returns what was checked.
pub fn check_collective<B: Backend>(be: &B, comm: &dyn Collective<B>) -> Result<Vec<String>> {
    let (rank, world) = (comm.rank(), comm.world());
    let mut done = Vec::new();

    let all = comm.all_gather_host(&[rank as f64, 0.5 + rank as f64])?;
    ensure!(all.len() == world && (0..world).all(|r| all[r] == [r as f64, 0.5 + r as f64]), "all_gather_host: got {all:?}");
    done.push(format!("all_gather_host of {world} ranks"));

    // Two buffers in one bucket, one of a length no tile divides.
    let lens = [1000usize, 37];
    let mut bufs: Vec<B::Buf> = lens.iter().map(|&n| be.upload(&values(rank, n))).collect::<Result<_>>()?;
    let mut refs: Vec<&mut B::Buf> = bufs.iter_mut().collect();
    comm.all_reduce(be, &mut refs)?;
    for (b, &n) in bufs.iter().zip(&lens) {
        let want: Vec<f32> = (0..n).map(|i| (0..world).map(|r| values(r, n)[i]).sum()).collect();
        ensure!(be.download(b)? == want, "all_reduce: a {n}-element buffer is not the sum over {world} ranks");
    }
    done.push("all_reduce (one bucket of 2 buffers)".into());

    // The first buffer in three parts (owned by ranks 0, 1, 2 mod world), the second whole
    // (owned by the last rank).
    let parts = |i: usize, n: usize| -> Vec<Part> {
        if i == 0 {
            [(0, 400), (400, 200), (600, n - 600)].iter().enumerate().map(|(k, &(start, len))| Part { start, len, owner: k % world }).collect()
        } else {
            vec![Part { start: 0, len: n, owner: world - 1 }]
        }
    };
    let mut bufs: Vec<B::Buf> = lens.iter().map(|&n| be.upload(&values(rank, n))).collect::<Result<_>>()?;
    let mut owned: Vec<Owned<'_, B::Buf>> = bufs.iter_mut().zip(&lens).enumerate().map(|(i, (buf, &n))| Owned { buf, parts: parts(i, n) }).collect();
    comm.reduce_to_owners(be, &mut owned)?;
    for (i, (b, &n)) in bufs.iter().zip(&lens).enumerate() {
        let got = be.download(b)?;
        let sum: Vec<f32> = (0..n).map(|j| (0..world).map(|r| values(r, n)[j]).sum()).collect();
        for p in parts(i, n).iter().filter(|p| p.owner == rank) {
            ensure!(got[p.range()] == sum[p.range()], "reduce_to_owners: part {:?} of buffer {i} on its owner is not the sum", p.range());
        }
    }
    done.push("reduce_to_owners (parts of buffers)".into());

    let mut bufs: Vec<B::Buf> = lens.iter().map(|&n| be.upload(&values(rank, n))).collect::<Result<_>>()?;
    let mut owned: Vec<Owned<'_, B::Buf>> = bufs.iter_mut().zip(&lens).enumerate().map(|(i, (buf, &n))| Owned { buf, parts: parts(i, n) }).collect();
    comm.broadcast_from_owners(be, &mut owned)?;
    for (i, (b, &n)) in bufs.iter().zip(&lens).enumerate() {
        let got = be.download(b)?;
        for p in parts(i, n) {
            ensure!(got[p.range()] == values(p.owner, n)[p.range()], "broadcast_from_owners: part {:?} of buffer {i} is not its owner's", p.range());
        }
    }
    done.push("broadcast_from_owners (parts of buffers)".into());

    let owner = world - 1;
    let got = comm.host_from((rank == owner).then(|| values(owner, 5)).as_deref(), 5, owner)?;
    ensure!(got == values(owner, 5), "host_from: got {got:?}");
    done.push("host_from".into());
    Ok(done)
}
