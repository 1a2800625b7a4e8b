use std::path::Path;

use anyhow::{Context, Result};
use safetensors::{Dtype, View};

/// One f32 tensor to write.
pub struct NamedTensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a [f32],
}

impl View for &NamedTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Writes f32 tensors to a safetensors file atomically (temporary file, then rename), so a reader
/// never sees half a file.
pub fn write_safetensors(path: &Path, tensors: &[NamedTensor<'_>]) -> Result<()> {
    for t in tensors {
        anyhow::ensure!(
            t.shape.iter().product::<usize>() == t.data.len(),
            "tensor {} has {} values for shape {:?}",
            t.name,
            t.data.len(),
            t.shape
        );
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(tensors.iter().map(|t| (t.name.clone(), t)), None, &tmp)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
