//! A test harness that can say "skipped". Cargo's own harness knows only passed, failed and
//! `#[ignore]`d (fixed at compile time), so a test that needs something a machine may lack
//! (Chromium, the shared Qwen tokenizer, a GPU) could only pass silently without it. A test file
//! declared with `harness = false` in Cargo.toml lists its tests in `main` and runs them through
//! [`run`]; each test returns [`Outcome`], and the summary line cargo prints counts the skips:
//!
//! ```text
//! test report_renders_in_headless_chromium ... skipped: chromium not installed
//! test result: ok. 1 passed; 0 failed; 1 skipped; 0 filtered out; finished in 0.21s
//! ```
//!
//! Arguments as libtest takes them: a name filter (substring, or whole name with `--exact`),
//! `--list`; other flags (`--nocapture`, `--test-threads`, ...) are accepted and ignored: the
//! tests run one after another on this thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// What a test found.
pub enum Outcome {
    Passed,
    /// It could not run here; the reason says what it needs.
    Skipped(String),
}

pub struct Test {
    pub name: &'static str,
    pub run: fn() -> Outcome,
}

/// Runs the tests the arguments select; exits 101 (libtest's code) when any failed.
pub fn run(tests: &[Test]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exact = args.iter().any(|a| a == "--exact");
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let selected = |name: &str| match filter {
        None => true,
        Some(f) if exact => name == f.as_str(),
        Some(f) => name.contains(f.as_str()),
    };
    let chosen: Vec<&Test> = tests.iter().filter(|t| selected(t.name)).collect();
    if args.iter().any(|a| a == "--list") {
        for t in &chosen {
            println!("{}: test", t.name);
        }
        return;
    }
    let started = Instant::now();
    println!("\nrunning {} test{}", chosen.len(), if chosen.len() == 1 { "" } else { "s" });
    let (mut passed, mut failed, mut skipped) = (Vec::new(), Vec::new(), 0usize);
    for t in &chosen {
        match catch_unwind(AssertUnwindSafe(t.run)) {
            Ok(Outcome::Passed) => {
                println!("test {} ... ok", t.name);
                passed.push(t.name);
            }
            Ok(Outcome::Skipped(why)) => {
                println!("test {} ... skipped: {why}", t.name);
                skipped += 1;
            }
            Err(_) => {
                println!("test {} ... FAILED", t.name);
                failed.push(t.name);
            }
        }
    }
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed; {skipped} skipped; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        passed.len(),
        failed.len(),
        tests.len() - chosen.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}
