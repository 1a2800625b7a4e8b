//! Distillation losses of the CPU backend: fused softmax-KL and the Gram-matrix relation loss.

use anyhow::{bail, Result};

use super::Elem;
use crate::backend::KlShape;

pub fn softmax_kl<T: Elem>(_s: &[T], _t: &[T], _shape: KlShape, _rows: &[u32], _scale: f32, _ds: &mut [T]) -> Result<f64> {
    bail!("softmax_kl: being written")
}

pub fn relation_loss<T: Elem>(_s: &[T], _t: &[T], _shape: KlShape, _images: &[(u32, u32)], _scale: f32, _ds: &mut [T]) -> Result<f64> {
    bail!("relation_loss: being written")
}
