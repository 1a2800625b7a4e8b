//! Optimizers and learning-rate schedules.

pub mod adamw;

pub use adamw::{AdamW, AdamWConfig, StepReport};
