//! Models: the decoder LLM, the SigLIP vision tower, the projector, and the MLLM that joins them.

pub mod config;
pub mod llm;
pub mod params;
pub mod vision;

pub use config::{Arch, LlmConfig};
pub use llm::{Llm, LlmActs, LoadedLlm, SeqLayout};
pub use params::{ParamId, ParamSet, ParamSpec};
pub use vision::{LoadedVision, VisionConfig, VisionOutput, VisionTower};
