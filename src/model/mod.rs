//! Models: the decoder LLM (and, on top of it, the vision tower and projector of the MLLM).

pub mod config;
pub mod llm;
pub mod params;

pub use config::{Arch, LlmConfig};
pub use llm::{Llm, LlmActs, LoadedLlm, SeqLayout};
pub use params::{ParamId, ParamSet, ParamSpec};
