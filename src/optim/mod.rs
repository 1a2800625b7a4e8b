//! Optimizers and learning-rate schedules.

pub mod adamw;
pub mod schedule;

pub use adamw::{pieces, AdamW, AdamWConfig, Piece, PieceState, StepReport, DEFAULT_PIECE_ELEMS};
pub use schedule::CosineSchedule;
