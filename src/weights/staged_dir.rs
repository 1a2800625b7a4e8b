//! Folders written atomically: everything goes into a hidden temporary sibling, which is renamed
//! into place only when complete, so a reader never sees half a model and a failed write leaves
//! nothing behind (the temporary folder is removed on drop unless committed).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

pub struct StagedDir {
    target: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts writing `target`, which must not exist or be empty; `what` names it in errors
    /// ("export target") and `tag` the temporary folder (`.NAME.kd-TAG-PID`).
    pub fn new(target: &Path, what: &str, tag: &str) -> Result<Self> {
        let name = target.file_name().with_context(|| format!("{what} {} has no name", target.display()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if target.exists() {
            ensure!(target.is_dir(), "{what} {} exists and is not a folder", target.display());
            let non_empty = std::fs::read_dir(target).with_context(|| format!("reading {}", target.display()))?.next().is_some();
            ensure!(!non_empty, "{what} {} already exists and is not empty; remove it or choose another folder", target.display());
        }
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(format!(".{}.kd-{tag}-{}", name.to_string_lossy(), std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing a stale {}", path.display()))?;
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(StagedDir { target: target.to_path_buf(), path, committed: false })
    }

    /// The temporary folder to write into.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the finished folder into place; returns the names of the files it holds, sorted.
    pub fn commit(mut self) -> Result<Vec<String>> {
        let mut files: Vec<String> = std::fs::read_dir(&self.path)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        files.sort();
        if self.target.exists() {
            std::fs::remove_dir(&self.target).with_context(|| format!("removing the empty {}", self.target.display()))?;
        }
        std::fs::rename(&self.path, &self.target)
            .with_context(|| format!("renaming {} to {}", self.path.display(), self.target.display()))?;
        self.committed = true;
        Ok(files)
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes pretty JSON with a final newline, as transformers writes its config files.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
