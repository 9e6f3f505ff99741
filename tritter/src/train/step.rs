//! One training step, as llm.c spells it: forward, loss, backward, clip, optimizer step,
//! weight decay, schedule.

use super::data::TokenBatch;
use super::metrics::LmStats;
use super::schedule::BitNetSchedule;
use crate::model::TritterModel;
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::train::{InferenceStep, Interrupter, TrainOutput, TrainStep};
use tritter_kernels::TritterBackend;

/// What the training step shares with the loop around it.
#[derive(Clone)]
pub struct StepControl {
    pub schedule: BitNetSchedule,
    pub grad_clip: f64,
    pub interrupter: Interrupter,
}

impl std::fmt::Debug for StepControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepControl")
            .field("schedule", &self.schedule)
            .field("grad_clip", &self.grad_clip)
            .finish()
    }
}

/// The model as burn-train's Learner sees it.
#[derive(Module, Debug)]
pub struct LmTrainer<B: Backend> {
    pub model: TritterModel<B>,
    #[module(skip)]
    pub control: Option<StepControl>,
}

impl<B: AutodiffBackend + TritterBackend> TrainStep for LmTrainer<B> {
    type Input = TokenBatch<B>;
    type Output = LmStats;

    fn step(&self, batch: TokenBatch<B>) -> TrainOutput<LmStats> {
        let tokens = batch.tokens();
        let loss = self
            .model
            .loss(batch.inputs, batch.targets, batch.documents);
        let loss_value: f64 = loss.clone().into_scalar().elem();
        if !loss_value.is_finite() {
            if let Some(control) = &self.control {
                let step = control.schedule.micro_steps();
                control.interrupter.stop(Some(&format!(
                    "loss is {loss_value} at step {step}: training stopped; the last checkpoint is intact"
                )));
            }
        }
        let grads = GradientsParams::from_grads(loss.backward(), self);
        let grad_norm = global_grad_norm::<B, _>(self, &grads);
        TrainOutput {
            grads,
            item: LmStats {
                loss: loss_value,
                tokens,
                grad_norm: Some(grad_norm),
            },
        }
    }

    fn optimize<B2, O>(self, optim: &mut O, lr: f64, mut grads: GradientsParams) -> Self
    where
        B2: AutodiffBackend,
        O: Optimizer<Self, B2>,
        Self: AutodiffModule<B2>,
    {
        let Some(control) = self.control.clone() else {
            return optim.step(lr, self, grads);
        };
        clip_global_norm::<B2, _>(&self, &mut grads, control.grad_clip);
        let updated = optim.step(lr, self, grads);
        let decay = control.schedule.current_weight_decay();
        if decay > 0.0 {
            let factor = 1.0 - lr * decay;
            updated.map(&mut DecayTernaryWeights::<B2> {
                factor,
                in_bitlinear: 0,
                _b: Default::default(),
            })
        } else {
            updated
        }
    }
}

impl<B: TritterBackend> InferenceStep for LmTrainer<B> {
    type Input = TokenBatch<B>;
    type Output = LmStats;

    fn step(&self, batch: TokenBatch<B>) -> LmStats {
        let tokens = batch.tokens();
        let loss = self
            .model
            .loss(batch.inputs, batch.targets, batch.documents);
        LmStats {
            loss: loss.into_scalar().elem(),
            tokens,
            grad_norm: None,
        }
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (Burn's built-in
/// clipping is per tensor). Returns the norm before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    struct Scale<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        factor: f64,
        _b: std::marker::PhantomData<B>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let norm = global_grad_norm::<B, M>(model, grads);
    if norm > max_norm {
        let mut scale = Scale::<B> {
            grads,
            factor: max_norm / (norm + 1e-6),
            _b: Default::default(),
        };
        model.visit(&mut scale);
    }
    norm
}

/// L2 norm over every parameter's gradient.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &GradientsParams,
) -> f64 {
    struct SumSquares<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for SumSquares<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let sq = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(s) => s + sq,
                    None => sq,
                });
            }
        }
    }
    let mut visitor = SumSquares::<B> { grads, sum: None };
    model.visit(&mut visitor);
    visitor
        .sum
        .map_or(0.0, |s| s.into_scalar().elem::<f64>().sqrt())
}

/// Decoupled weight decay (`θ ← θ·(1 − lr·λ)`) of the BitLinear weight matrices only:
/// norms, embeddings, the head and scales are not decayed. In BitNet the latent weight's
/// magnitude is the ternary weight's confidence.
struct DecayTernaryWeights<B: AutodiffBackend> {
    factor: f64,
    in_bitlinear: usize,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for DecayTernaryWeights<B> {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        if container_type == "Struct:BitLinear" {
            self.in_bitlinear += 1;
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if container_type == "Struct:BitLinear" {
            self.in_bitlinear -= 1;
        }
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.in_bitlinear == 0 || D != 2 {
            return param;
        }
        let factor = self.factor;
        param.map(|t| Tensor::from_inner(t.inner().mul_scalar(factor)).require_grad())
    }
}
