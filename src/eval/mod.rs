//! Inference for evaluation: batched greedy decoding of short answers.

pub mod greedy;

pub use greedy::greedy_answers;
