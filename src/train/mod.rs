//! Training: configs, the stage loop, checkpoints, metrics and plots, the recipe runner, and the
//! miniature study that `kd-engine train` runs with no arguments.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod model_state;
pub mod plot;
pub mod recipe;
pub mod run_folder;
pub mod sample_order;
pub mod stage;
pub mod study;
