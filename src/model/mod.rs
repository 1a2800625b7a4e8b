//! Models: the decoder LLM, the SigLIP vision tower, the projector, and the MLLM that joins them.

pub mod config;
pub mod export;
pub mod llm;
pub mod mllm;
pub mod params;
pub mod presets;
pub mod projector;
pub mod vision;

pub use config::{Arch, LlmConfig};
pub use export::{choose_image_token_id, export_llava, load_llava, mllm_logits, ExportOptions, ExportSummary, LlavaLayout, LoadedLlava};
pub use llm::{Llm, LlmActs, LoadedLlm, SeqLayout};
pub use mllm::{FeatureSelect, GradsReady, Mllm, MllmActs, MllmGrads, MllmWeights};
pub use params::{find_hf, HfTensor, ParamId, ParamPart, ParamSet, ParamSpec};
pub use presets::{InitOptions, InitSummary, Preset, PresetModel};
pub use projector::Projector;
pub use vision::{LoadedVision, VisionConfig, VisionOutput, VisionTower};
