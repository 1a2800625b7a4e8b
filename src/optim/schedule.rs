//! The learning-rate schedule of the HF Trainer's `cosine` scheduler: linear warm-up over
//! `ceil(warmup_ratio · total)` steps, then cosine decay to 0 (`get_cosine_schedule_with_warmup`).

/// Warm-up then cosine decay over `total` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub base_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

impl CosineSchedule {
    pub fn new(base_lr: f64, warmup_ratio: f64, total: u64) -> Self {
        CosineSchedule { base_lr, warmup: (warmup_ratio * total as f64).ceil() as u64, total }
    }

    /// Learning rate of optimizer step `step` (0-based), as the HF lambda gives it.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base_lr * step as f64 / self.warmup.max(1) as f64;
        }
        let progress = (step - self.warmup) as f64 / (self.total.saturating_sub(self.warmup)).max(1) as f64;
        self.base_lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_zero() {
        // 100 steps, 3 % warm-up → 3 warm-up steps (ceil), as the HF Trainer computes it.
        let s = CosineSchedule::new(1e-3, 0.03, 100);
        assert_eq!(s.warmup, 3);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1) - 1e-3 / 3.0).abs() < 1e-15);
        assert!((s.lr(3) - 1e-3).abs() < 1e-15);
        // Halfway through the decay: half the base rate.
        let mid = 3 + 97 / 2;
        let want = 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * (mid - 3) as f64 / 97.0).cos());
        assert!((s.lr(mid) - want).abs() < 1e-15);
        assert!(s.lr(99) > 0.0 && s.lr(99) < 1e-5);
        assert_eq!(s.lr(100), 0.0);
        // A ratio that makes a fraction of a step still warms up for one.
        assert_eq!(CosineSchedule::new(1.0, 0.03, 10).warmup, 1);
    }
}
