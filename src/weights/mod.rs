//! Reading and writing Hugging Face safetensors: single files and sharded checkpoints
//! (`model.safetensors.index.json`), bf16 / f16 / f32, memory-mapped so a sharded 4B checkpoint is
//! never copied whole into memory. Every error names the file and, where there is one, the tensor.

mod reader;
mod staged_dir;
mod writer;

pub use reader::{TensorInfo, WeightSource};
pub use staged_dir::{write_json, StagedDir};
pub use writer::{write_safetensors, write_safetensors_streamed, NamedTensor, StoreDtype, TensorMeta};
