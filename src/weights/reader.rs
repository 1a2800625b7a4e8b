use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    file: usize,
    /// Absolute byte range inside the file.
    bytes: std::ops::Range<usize>,
}

/// All tensors of a checkpoint folder or file, by name.
pub struct WeightSource {
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl WeightSource {
    /// Opens `dir/model.safetensors.index.json` (sharded) or `dir/model.safetensors`; a path to a
    /// `.safetensors` file opens that file alone.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Self::from_files(&[path.to_path_buf()]);
        }
        ensure!(path.is_dir(), "{}: no such checkpoint folder or file", path.display());
        let index = path.join("model.safetensors.index.json");
        let single = path.join("model.safetensors");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
            let mut shards: Vec<PathBuf> = Vec::new();
            for (tensor, file) in map {
                let file = file
                    .as_str()
                    .with_context(|| format!("{}: weight_map entry for {tensor} is not a file name", index.display()))?;
                let p = path.join(file);
                if !shards.contains(&p) {
                    shards.push(p);
                }
            }
            let source = Self::from_files(&shards)?;
            for tensor in map.keys() {
                ensure!(
                    source.tensors.contains_key(tensor),
                    "{}: lists tensor {tensor}, which none of its shards holds",
                    index.display()
                );
            }
            Ok(source)
        } else if single.is_file() {
            Self::from_files(&[single])
        } else {
            bail!(
                "{}: holds neither model.safetensors nor model.safetensors.index.json",
                path.display()
            )
        }
    }

    fn from_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the file is opened read-only; like every mmap reader we assume nobody truncates
            // it while we read (the safetensors crate makes the same assumption).
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
            let (header_len, _) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
            let data_start = 8 + header_len;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                debug_assert!(start >= data_start);
                let info = TensorInfo {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    file: fi,
                    bytes: start..start + view.data().len(),
                };
                if tensors.insert(name.clone(), info).is_some() {
                    bail!("{}: tensor {name} appears in more than one shard", path.display());
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(WeightSource { files, tensors })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// A description of where the tensors come from, for error messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            files => format!("{} ({} shards)", files[0].0.parent().unwrap_or(Path::new(".")).display(), files.len()),
        }
    }

    /// Reads tensor `name`, checking its shape, converted to f32.
    pub fn read_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: tensor {name} is missing", self.describe()))?;
        ensure!(
            info.shape == shape,
            "{}: tensor {name} has shape {:?}, the config implies {:?}",
            self.files[info.file].0.display(),
            info.shape,
            shape
        );
        let bytes = &self.files[info.file].1[info.bytes.clone()];
        Ok(match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => bail!(
                "{}: tensor {name} has dtype {other:?}; kd-engine reads bf16, f16 and f32 weights",
                self.files[info.file].0.display()
            ),
        })
    }

    /// Reads an integer tensor (I64 or I32) as i64, e.g. token ids in a reference file.
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let info = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: tensor {name} is missing", self.describe()))?;
        let bytes = &self.files[info.file].1[info.bytes.clone()];
        Ok(match info.dtype {
            Dtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(),
            Dtype::I32 => bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64).collect(),
            other => bail!("{}: tensor {name} has dtype {other:?}, expected an integer type", self.describe()),
        })
    }
}
