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

/// Element type of the tensors [`write_safetensors_streamed`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    /// bfloat16, rounded to nearest even (as `torch.Tensor.to(torch.bfloat16)`).
    Bf16,
    F16,
}

impl StoreDtype {
    fn bytes(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::Bf16 | StoreDtype::F16 => 2,
        }
    }
    /// The safetensors header name.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::Bf16 => "BF16",
            StoreDtype::F16 => "F16",
        }
    }
    /// The name transformers writes in `config.json` (`dtype` / `torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::Bf16 => "bfloat16",
            StoreDtype::F16 => "float16",
        }
    }
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(values.len() * self.bytes());
        match self {
            StoreDtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            StoreDtype::Bf16 => values.iter().for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
            StoreDtype::F16 => values.iter().for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
        }
    }
}

/// Name and shape of one tensor [`write_safetensors_streamed`] writes.
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Writes a safetensors file one tensor at a time, so only one tensor's values are in memory at
/// once (a whole model need not be downloaded from the device first): `values(i)` returns tensor
/// `i`'s f32 values, which are stored as `dtype`. Tensors are laid out in name order, the header
/// carries `metadata` (transformers expects `{"format": "pt"}`). Atomic like
/// [`write_safetensors`]: a temporary file, then a rename.
pub fn write_safetensors_streamed(
    path: &Path,
    tensors: &[TensorMeta],
    dtype: StoreDtype,
    metadata: &[(&str, &str)],
    mut values: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    use std::io::Write;
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    for w in order.windows(2) {
        anyhow::ensure!(tensors[w[0]].name != tensors[w[1]].name, "tensor {} is listed twice", tensors[w[0]].name);
    }
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta = metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0usize;
    for &i in &order {
        let t = &tensors[i];
        let len = t.shape.iter().product::<usize>() * dtype.bytes();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The data starts 8-byte aligned, as the safetensors crate writes it.
    header.resize(header.len().next_multiple_of(8), b' ');

    let tmp = path.with_extension("safetensors.tmp");
    let mut write = || -> Result<()> {
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut bytes = Vec::new();
        for &i in &order {
            let t = &tensors[i];
            let v = values(i).with_context(|| format!("producing tensor {}", t.name))?;
            let n = t.shape.iter().product::<usize>();
            anyhow::ensure!(v.len() == n, "tensor {} has {} values for shape {:?}", t.name, v.len(), t.shape);
            dtype.encode(&v, &mut bytes);
            out.write_all(&bytes)?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", tmp.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
