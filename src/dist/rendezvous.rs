//! Shares the NCCL unique id (128 bytes) of a job: rank 0 serves it on `MASTER_ADDR:MASTER_PORT`,
//! every other rank connects (retrying while rank 0 starts) and reads it. Std TCP only; every
//! step has a deadline, so a rank that never comes is an error naming it, not a wait without end.
//!
//! The exchange: the client sends `MAGIC`, its rank and the world size (u32 little-endian each);
//! the server checks both and answers with the payload's length (u32) and the payload.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

const MAGIC: u32 = 0x6b64_6e63; // "kdnc"
const POLL: Duration = Duration::from_millis(20);

/// Rank 0: serves `payload` to ranks 1..world on `port` (all interfaces), returning once every
/// one of them has it, or an error naming those that did not come within `timeout`.
pub fn serve(port: u16, world: usize, payload: &[u8], timeout: Duration) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("rendezvous: listening on port {port} (MASTER_PORT)"))?;
    serve_on(listener, world, payload, timeout)
}

/// [`serve`] on a listener already bound (tests bind port 0).
pub fn serve_on(listener: TcpListener, world: usize, payload: &[u8], timeout: Duration) -> Result<()> {
    listener.set_nonblocking(true).context("rendezvous: a non-blocking listener")?;
    let deadline = Instant::now() + timeout;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((stream, peer)) => {
                // A stray or broken client must not stop the job: it is named and skipped.
                if let Err(e) = answer(stream, world, payload, &mut served, deadline) {
                    eprintln!("rendezvous: ignored a connection from {peer}: {e:#}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                    bail!("rendezvous: rank(s) {missing:?} of {world} did not connect within {:.0} s; are they running with the same MASTER_ADDR and MASTER_PORT?", timeout.as_secs_f64());
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e).context("rendezvous: accepting a connection"),
        }
    }
    Ok(())
}

fn read_u32(s: &mut TcpStream) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn answer(mut s: TcpStream, world: usize, payload: &[u8], served: &mut [bool], deadline: Instant) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(POLL)))?;
    let (magic, rank, their_world) = (read_u32(&mut s)?, read_u32(&mut s)? as usize, read_u32(&mut s)? as usize);
    ensure!(magic == MAGIC, "not a kd-engine rank");
    ensure!(their_world == world, "rank {rank} says the world size is {their_world}, rank 0 has {world}");
    ensure!(rank > 0 && rank < world, "rank {rank} is outside 1..{world}");
    ensure!(!served[rank], "rank {rank} connected twice (two processes with the same RANK?)");
    s.write_all(&(payload.len() as u32).to_le_bytes())?;
    s.write_all(payload)?;
    served[rank] = true;
    Ok(())
}

/// Rank `rank` > 0: reads the payload from rank 0 at `addr` (`host:port`), retrying the
/// connection until `timeout` (rank 0 may start later).
pub fn fetch(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let target = addr.to_socket_addrs().with_context(|| format!("rendezvous: resolving {addr} (MASTER_ADDR:MASTER_PORT)"))?.next();
    let target = target.with_context(|| format!("rendezvous: {addr} resolves to no address"))?;
    let mut last_err = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&target, POLL.max(deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(2)))) {
            Ok(mut s) => {
                s.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(POLL)))?;
                let mut hello = Vec::with_capacity(12);
                for v in [MAGIC, rank as u32, world as u32] {
                    hello.extend(v.to_le_bytes());
                }
                s.write_all(&hello).context("rendezvous: greeting rank 0")?;
                let len = read_u32(&mut s).with_context(|| format!("rendezvous: rank 0 at {addr} refused rank {rank} (see its log)"))? as usize;
                ensure!(len <= 1 << 20, "rendezvous: rank 0 announced {len} bytes");
                let mut payload = vec![0u8; len];
                s.read_exact(&mut payload).context("rendezvous: reading the unique id")?;
                return Ok(payload);
            }
            Err(e) => {
                last_err = e.to_string();
                std::thread::sleep(POLL * 5);
            }
        }
    }
    bail!("rendezvous: rank {rank} could not reach rank 0 at {addr} within {:.0} s (last error: {last_err})", timeout.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_payload_and_a_missing_rank_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || serve_on(listener, 4, b"unique-id", Duration::from_secs(10)));
        let clients: Vec<_> = (1..4).map(|r| {
            let addr = addr.clone();
            std::thread::spawn(move || fetch(&addr, r, 4, Duration::from_secs(10)))
        }).collect();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), b"unique-id");
        }
        server.join().unwrap().unwrap();

        // Rank 2 never comes; rank 1 says another world size and is turned away.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || serve_on(listener, 3, b"id", Duration::from_millis(800)));
        let e = fetch(&addr, 1, 5, Duration::from_millis(600)).unwrap_err().to_string();
        assert!(e.contains("refused rank 1"), "{e}");
        let e = server.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank(s) [1, 2] of 3 did not connect"), "{e}");

        // No rank 0 at all.
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let e = fetch(&free, 1, 2, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("could not reach rank 0"), "{e}");
    }
}
