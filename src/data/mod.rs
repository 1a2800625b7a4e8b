//! Data: images, templates, datasets.
//!
//! * [`image`]: decoding files into RGB exactly as PIL's `open(..).convert("RGB")`;
//! * [`resample`]: Pillow-exact resizing; [`processor`]: the SigLIP image processor;
//! * [`template`]: chat templates, tokenisation and per-position groups;
//! * [`dataset`]: the LLaVA JSON/JSONL reader with validation and skip accounting;
//! * [`batch`]: packing samples into one unpadded batch; [`rng`]: the seeded shuffle;
//! * [`synthetic`]: the procedural data of the miniature LLaVA-KD study.

pub mod batch;
pub mod dataset;
pub mod image;
pub mod processor;
pub mod resample;
pub mod rng;
pub mod synthetic;
pub mod template;

pub use batch::{collate, PackedBatch};
pub use dataset::{
    Dataset, DatasetOptions, ImageCheck, LoadedBatch, Sample, SampleEncoder, SkipReason,
    SkipReport, SkippedSample, DEFAULT_MAX_SKIP_FRACTION,
};
pub use image::{check_image_size, decode_rgb, load_rgb, ImageTooLarge, RgbImage, MAX_IMAGE_PIXELS};
pub use processor::{preprocess, ImageProcessorConfig, PREPROCESSOR_CONFIG_FILE};
pub use resample::{resize, Resample};
pub use rng::{shuffled_indices, SplitMix64};
pub use synthetic::{answer_matches, normalise_answer, write_study_data, StudyFiles, StudySpec};
pub use template::{
    default_visual_placeholder, load_tokenizer, EncodeError, EncodeErrorKind, EncodeOptions,
    EncodedSample, Group, Role, Template, Turn, DEFAULT_MAX_LEN, IMAGE_TAG,
};
