//! A run folder held by one run at a time: a lock file with the holder's pid, a fresh run refused
//! where a run already lives (a user's checkpoint and student are never replaced unasked), and the
//! temporary files of an interrupted checkpoint, export or plot removed before the run writes.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The lock file: the pid of the process that holds the folder.
pub const LOCK_FILE: &str = "kd-engine.lock";

/// What makes a folder a run's: a fresh run refuses to start where any of these is.
const RUN_FILES: &[&str] = &["checkpoint", "checkpoint.old", "metrics.jsonl", "student"];

/// Holds the folder while alive; the lock file is removed on drop.
#[derive(Debug)]
pub struct RunFolder {
    dir: PathBuf,
    /// The folder did not exist before this run.
    created: bool,
}

impl RunFolder {
    /// Takes `dir` for a run: creates it, takes its lock, refuses a fresh run (`resuming` false)
    /// where a run already lives, and removes what an interrupted run left half-written.
    pub fn open(dir: &Path, resuming: bool) -> Result<Self> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| format!("creating the run folder {}", dir.display()))?;
        lock(dir)?;
        let folder = RunFolder { dir: dir.to_path_buf(), created };
        if !resuming {
            if let Some(found) = RUN_FILES.iter().find(|f| dir.join(f).exists()) {
                bail!(
                    "{} already holds a run (it has {found}); continue it with --resume {}, or choose another folder with --out \
                     (nothing was changed)",
                    dir.display(),
                    dir.display()
                );
            }
        }
        remove_leftovers(dir)?;
        Ok(folder)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Gives the folder up after a failure before training: a folder this run created goes
    /// again with the files it wrote (`written`), so a failed start leaves no run folder behind.
    pub fn abandon(self, written: &[&str]) {
        if self.created {
            for name in written {
                let _ = std::fs::remove_file(self.dir.join(name));
            }
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            // Only an empty folder is removed: anything else in it is not this run's to delete.
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
    }
}

fn lock(dir: &Path) -> Result<()> {
    let path = dir.join(LOCK_FILE);
    // Two tries: the second after removing a lock whose process has exited.
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                return writeln!(f, "{}", std::process::id()).with_context(|| format!("writing {}", path.display()));
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                match text.trim().parse::<u32>() {
                    Ok(pid) if !process_alive(pid) => {
                        std::fs::remove_file(&path).with_context(|| format!("removing the stale lock {} (process {pid} has exited)", path.display()))?;
                    }
                    Ok(pid) => bail!(
                        "{} is in use by process {pid} (lock file {}); wait for that run to end or choose another folder",
                        dir.display(),
                        path.display()
                    ),
                    Err(_) => bail!(
                        "{}: the lock file {} does not hold a process id; if no run uses this folder, delete the lock file",
                        dir.display(),
                        path.display()
                    ),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating the lock file {}", path.display())),
        }
    }
    bail!("{}: could not take the lock {} (another run took it meanwhile?)", dir.display(), path.display())
}

/// Whether process `pid` exists. Where /proc is absent every pid counts as alive: a stale lock
/// is then removed by hand, as the error says, rather than a live run's lock taken.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the temporary files of an interrupted run in `dir`: `checkpoint.tmp/`, an export's
/// `.NAME.kd-export-PID/` and a plot's `.NAME.png.tmp-PID-N`. Only the holder of the lock calls
/// this, so no live run's files are removed.
fn remove_leftovers(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let leftover = name == "checkpoint.tmp" || (name.starts_with('.') && (name.contains(".kd-export-") || name.contains(".png.tmp-")));
        if !leftover {
            continue;
        }
        let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("removing {} left by an interrupted run", path.display()))?;
        eprintln!("removed {} (left by an interrupted run)", path.display());
    }
    Ok(())
}
