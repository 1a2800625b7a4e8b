//! kd-engine: LLaVA-KD distillation on hand-written kernels.
//!
//! The layout mirrors the pipeline: `data` → `model` (vision, projector, LLM) → `loss` → `optim` →
//! `train`, with `weights` (safetensors I/O) beside them and the backends (`backend::cpu`, the
//! reference, and `backend::cuda`) below them.

pub mod backend;
pub mod cli;
pub mod data;
pub mod dist;
pub mod eval;
pub mod loss;
pub mod model;
pub mod optim;
pub mod train;
pub mod weights;
