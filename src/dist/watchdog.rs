//! A deadline for a call that cannot be bounded from inside (ncclCommInitRank blocks until every
//! rank has joined): if the guard is still alive at the deadline, the action runs (in a job: print
//! why and exit the process, so the launcher stops the other ranks instead of the job hanging).

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::Duration;

/// Disarms the watchdog when dropped.
pub struct Watchdog {
    _disarm: Sender<()>,
}

impl Watchdog {
    /// Runs `action` after `timeout` unless the returned guard is dropped first.
    pub fn arm(timeout: Duration, action: impl FnOnce() + Send + 'static) -> Watchdog {
        let (tx, rx) = channel::<()>();
        std::thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                action();
            }
        });
        Watchdog { _disarm: tx }
    }

    /// In a rank process: after `timeout`, prints that `what` did not finish and exits with
    /// status 3.
    pub fn exit_after(timeout: Duration, what: String) -> Watchdog {
        Watchdog::arm(timeout, move || {
            eprintln!("error: {what} did not finish within {:.0} s (a rank died or hung before joining); exiting", timeout.as_secs_f64());
            std::process::exit(3);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn fires_only_when_still_armed_at_the_deadline() {
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let guard = Watchdog::arm(Duration::from_millis(50), move || f.store(true, Ordering::SeqCst));
        drop(guard);
        std::thread::sleep(Duration::from_millis(150));
        assert!(!fired.load(Ordering::SeqCst), "a disarmed watchdog fired");
        let f = fired.clone();
        let _guard = Watchdog::arm(Duration::from_millis(50), move || f.store(true, Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(300));
        assert!(fired.load(Ordering::SeqCst), "an armed watchdog did not fire");
    }
}
