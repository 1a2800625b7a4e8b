//! Data-parallel training over several ranks (one per GPU, or one per thread on the CPU).
//!
//! Everything the step loop needs from the other ranks goes through one interface,
//! [`Collective`], with three implementations: [`Solo`] (world size 1: no communication at all),
//! [`ThreadGroup`] (ranks as threads of one process, over the CPU backend: the engine the tests
//! compare against the 1-rank run), and NCCL on CUDA (`backend::cuda::nccl`). On top of it,
//! [`data_parallel`] holds the step-wide sums (loss counts, reports) and the optimizer step with
//! its gradient reduction (plain all-reduce, or ZeRO-1: each optimizer piece's state lives on
//! one rank, [`partition`]), and [`launch`] / [`rendezvous`] start and connect the processes of a
//! multi-GPU job.

pub mod check;
pub mod collective;
pub mod data_parallel;
pub mod launch;
pub mod partition;
pub mod rendezvous;
pub mod threads;
pub mod watchdog;

pub use collective::{Collective, PeerFailure, Solo};
pub use data_parallel::{DistOptions, GradSync};
pub use partition::Partition;
pub use threads::{run_threads, ThreadGroup};
