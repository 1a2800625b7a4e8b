//! The metrics file: one JSON object per optimizer step, appended and flushed as it goes, so a
//! run that stops keeps every line it wrote and a resumed run continues the same file.

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

    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}").and_then(|_| self.file.flush()).with_context(|| format!("writing {}", self.path.display()))
    }
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
