//! The BitNet b1.58 two-stage schedule: linear warmup, cosine decay, and at `stage2_at`
//! of the run a drop of the learning rate with weight decay switched off.

use super::recipe::OptimSection;
use burn::lr_scheduler::LrScheduler;
use burn::prelude::Backend;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Learning rate and weight decay as functions of the optimizer step.
#[derive(Debug, Clone)]
pub struct BitNetSchedule {
    pub optim: OptimSection,
    pub total_steps: usize,
    /// Micro-batches per optimizer step: the scheduler is stepped once per micro-batch.
    pub accumulation: usize,
    /// Micro-batches seen; shared with the training step, which applies weight decay.
    step: Arc<AtomicUsize>,
}

impl BitNetSchedule {
    pub fn new(optim: OptimSection, total_steps: usize, accumulation: usize) -> Self {
        Self {
            optim,
            total_steps,
            accumulation: accumulation.max(1),
            step: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Micro-batches seen so far (shared with clones).
    pub fn micro_steps(&self) -> usize {
        self.step.load(Ordering::Relaxed)
    }

    fn stage2_step(&self) -> usize {
        (self.optim.stage2_at * self.total_steps as f64).round() as usize
    }

    /// Learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let o = &self.optim;
        let peak = o.lr;
        let lr = if step < o.warmup_steps {
            peak * (step + 1) as f64 / o.warmup_steps as f64
        } else {
            let span = self.total_steps.saturating_sub(o.warmup_steps).max(1);
            let progress = ((step - o.warmup_steps) as f64 / span as f64).min(1.0);
            let min = peak * o.min_lr_ratio;
            min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
        };
        if step >= self.stage2_step() {
            lr * o.stage2_lr_ratio
        } else {
            lr
        }
    }

    /// Weight decay of step `step`: the recipe's in stage 1, zero in stage 2.
    pub fn weight_decay_at(&self, step: usize) -> f64 {
        if step >= self.stage2_step() {
            0.0
        } else {
            self.optim.weight_decay
        }
    }

    /// Weight decay of the optimizer step being taken now.
    pub fn current_weight_decay(&self) -> f64 {
        self.weight_decay_at(self.micro_steps().saturating_sub(1) / self.accumulation)
    }
}

impl LrScheduler for BitNetSchedule {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        let micro = self.step.fetch_add(1, Ordering::Relaxed);
        self.lr_at(micro / self.accumulation)
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.micro_steps()
    }

    fn load_record<B: Backend>(self, record: usize) -> Self {
        self.step.store(record, Ordering::Relaxed);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_and_two_stages() {
        let optim = OptimSection {
            lr: 1.0,
            warmup_steps: 10,
            min_lr_ratio: 0.0,
            stage2_at: 0.5,
            stage2_lr_ratio: 0.5,
            weight_decay: 0.1,
            ..OptimSection::default()
        };
        let s = BitNetSchedule::new(optim, 110, 1);
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        // Just before the midpoint: cosine at 44/100 of the decay.
        let before = 0.5 * (1.0 + (std::f64::consts::PI * 44.0 / 100.0).cos());
        assert!((s.lr_at(54) - before).abs() < 1e-12);
        // At the midpoint (step 55) the rate halves and weight decay stops.
        let at = 0.5 * 0.5 * (1.0 + (std::f64::consts::PI * 45.0 / 100.0).cos());
        assert!((s.lr_at(55) - at).abs() < 1e-12);
        assert_eq!(s.weight_decay_at(54), 0.1);
        assert_eq!(s.weight_decay_at(55), 0.0);
        assert!(s.lr_at(109) < 0.01);
    }

    #[test]
    fn record_restores_the_step() {
        let mut s = BitNetSchedule::new(OptimSection::default(), 1000, 2);
        for _ in 0..7 {
            s.step();
        }
        let record = s.to_record::<burn::backend::Flex>();
        let mut restored = BitNetSchedule::new(OptimSection::default(), 1000, 2)
            .load_record::<burn::backend::Flex>(record);
        assert_eq!(restored.step(), s.clone().step());
    }
}
