//! Inference and evaluation: KV-cache generation on any backend ([`generate`](mod@generate), with greedy or
//! seeded random [`sampling`]), answering questions about images with an MLLM folder
//! ([`answer`]), question files ([`questions`]), benchmark metrics ([`metrics`]) and the
//! side-by-side HTML report ([`report`]). [`greedy`] is the training study's short-answer front.

pub mod answer;
pub mod generate;
pub mod greedy;
pub mod metrics;
pub mod questions;
pub mod report;
pub mod sampling;

pub use generate::{eos_ids_from_dir, generate, generate_ids, generate_mllm, DecodeStats, GenerateOptions, GenerateOutput, Generated, Step, StopReason};
pub use greedy::greedy_answers;
pub use metrics::Metric;
pub use sampling::Sampling;
