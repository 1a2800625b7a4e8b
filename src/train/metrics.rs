//! The metrics file: one JSON object per optimizer step, appended and flushed as it goes, so a
//! run that stops keeps every line it wrote and a resumed run continues the same file, first cut
//! back to its checkpoint's step ([`cut_to_step`]).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::loss::LossReport;

pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    pub fn append(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsWriter { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line in a single write, so a kill or a full disk leaves at most one
    /// unterminated fragment at the end, never a line broken across records.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        let mut line = record.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Cuts the metrics file back to the steps a checkpoint at `global_step` has seen, before a
/// resumed run appends: the steps after it (the resumed run writes them again), an unterminated
/// fragment and unreadable lines are dropped, and a step written twice (by a run that resumed
/// before this cut existed) keeps its last line. Returns how many lines were dropped. The file is
/// rewritten beside itself and renamed into place.
pub fn cut_to_step(path: &Path, global_step: u64) -> Result<usize> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept: BTreeMap<u64, &[u8]> = BTreeMap::new();
    let mut lines = 0usize;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        lines += 1;
        let step = line
            .strip_suffix(b"\n")
            .and_then(|l| serde_json::from_slice::<Value>(l).ok())
            .and_then(|v| v.get("global_step").and_then(Value::as_u64));
        if let Some(step) = step.filter(|&s| s <= global_step) {
            kept.insert(step, line);
        }
    }
    let dropped = lines - kept.len();
    if dropped == 0 {
        return Ok(0);
    }
    let tmp = path.with_extension("jsonl.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        for line in kept.values() {
            f.write_all(line)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cutting {} back to step {global_step}", path.display()))?;
    Ok(dropped)
}

/// The loss terms of a report as metric fields (terms that are off are left out).
pub fn loss_fields(r: &LossReport) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("loss".into(), json!(r.total));
    m.insert("ce".into(), json!(r.ce));
    for (k, v) in [("res", r.response), ("prompt", r.prompt), ("vis", r.visual), ("rel", r.relation)] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    m
}

/// One line of the log: each enabled term with its value.
pub fn describe(r: &LossReport) -> String {
    let mut s = format!("loss {:.4} ce {:.4}", r.total, r.ce);
    for (k, v) in [("res", r.response), ("prompt", r.prompt), ("vis", r.visual), ("rel", r.relation)] {
        if let Some(v) = v {
            s.push_str(&format!(" {k} {v:.4}"));
        }
    }
    s
}
