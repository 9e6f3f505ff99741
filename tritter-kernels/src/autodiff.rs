//! Autodiff for the Tritter ops: one graph node per BitLinear product instead of the
//! dozen element-wise nodes the straight-through reference would record.

use crate::mask::AttentionMask;
use crate::{QuantizedWeight, TritterBackend};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{Bool, Tensor, TensorPrimitive};

/// Backward of `y = Q_a(x) · Q_w(W)` with straight-through estimators: the quantizers
/// pass gradients unchanged, so `dx = dy · Q_w(W)ᵀ` and `dW = Q_a(x)ᵀ · dy`.
#[derive(Debug)]
struct BitLinearBackward;

impl<B: TritterBackend> Backward<B, 2> for BitLinearBackward {
    /// The quantized operands: `Q_a(x)` dequantized, and `Q_w(W)` as the forward left it.
    type State = (FloatTensor<B>, QuantizedWeight<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (xq, wq) = ops.state;
        let t = |x: FloatTensor<B>| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
        let (grad_x, grad_w) =
            B::bitlinear_backward(t(xq), wq, t(grad), [node_x.is_some(), node_w.is_some()]);
        for (node, g) in [(node_x, grad_x), (node_w, grad_w)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// BitLinear's product on `Autodiff<B>`: the inner backend's quantized forward, and
/// [`BitLinearBackward`].
pub fn bitlinear_matmul<B: TritterBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    weight: Tensor<Autodiff<B, C>, 2>,
    scale: Option<f32>,
) -> Tensor<Autodiff<B, C>, 2> {
    let x = x.into_primitive().tensor();
    let w = weight.into_primitive().tensor();
    let inner = |t: FloatTensor<B>| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
    let forward = B::bitlinear_forward(
        inner(x.primitive.clone()),
        inner(w.primitive.clone()),
        scale,
    );
    let output = forward.output.into_primitive().tensor();
    let result = match BitLinearBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (
                forward.x_quantized.into_primitive().tensor(),
                forward.w_quantized,
            ),
            output,
        ),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of attention: recomputes the probabilities from `q`, `k` and the mask (the
/// forward keeps no score matrix) and applies [`crate::reference::attention_backward`].
#[derive(Debug)]
struct AttentionBackward;

type AttentionState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    Option<BoolTensor<B>>,
    bool,
);

impl<B: Backend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, out, mask, causal) = ops.state;
        let t = |x: FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
        let (grad_q, grad_k, grad_v) = crate::reference::attention_backward(
            t(q),
            t(k),
            t(v),
            t(out),
            mask.map(Tensor::<B, 4, Bool>::from_primitive),
            causal,
            t(grad),
        );
        for (node, g) in [(node_q, grad_q), (node_k, grad_k), (node_v, grad_v)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// Attention on `Autodiff<B>`: the inner backend's attention forward (no score matrix
/// recorded), and [`AttentionBackward`].
pub fn attention<B: TritterBackend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>,
    k: Tensor<Autodiff<B, C>, 4>,
    v: Tensor<Autodiff<B, C>, 4>,
    mask: Option<Tensor<Autodiff<B, C>, 4, Bool>>,
    causal: bool,
) -> Tensor<Autodiff<B, C>, 4> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let mask: Option<BoolTensor<B>> = mask.map(|m| m.into_primitive());
    let inner =
        |t: &FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t.clone()));
    let out = B::tritter_attention(
        inner(&q.primitive),
        inner(&k.primitive),
        inner(&v.primitive),
        mask.clone().map(Tensor::<B, 4, Bool>::from_primitive),
        causal,
    )
    .into_primitive()
    .tensor();
    let result = match AttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (
                q.primitive,
                k.primitive,
                v.primitive,
                out.clone(),
                mask,
                causal,
            ),
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of [`TritterBackend::flex_attention`]: the inner backend's
/// [`TritterBackend::flex_attention_backward`] (the flash backward kernels on CubeCL
/// backends, from the forward's log-sum-exp).
#[derive(Debug)]
struct FlexAttentionBackward;

type FlexAttentionState<B> = ([FloatTensor<B>; 4], Option<FloatTensor<B>>, AttentionMask);

impl<B: TritterBackend> Backward<B, 3> for FlexAttentionBackward {
    type State = FlexAttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let ([q, k, v, out], lse, mask) = ops.state;
        let t4 = |t: FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
        let (grad_q, grad_k, grad_v) = B::flex_attention_backward(
            t4(q),
            t4(k),
            t4(v),
            t4(out),
            lse.map(|l| Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(l))),
            t4(grad),
            &mask,
        );
        for (node, g) in [(node_q, grad_q), (node_k, grad_k), (node_v, grad_v)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// [`TritterBackend::flex_attention`] on `Autodiff<B>`: the inner backend's forward
/// (keeping its log-sum-exp) and [`FlexAttentionBackward`].
pub fn flex_attention<B: TritterBackend, C: CheckpointStrategy>(
    q: Tensor<Autodiff<B, C>, 4>,
    k: Tensor<Autodiff<B, C>, 4>,
    v: Tensor<Autodiff<B, C>, 4>,
    mask: &AttentionMask,
) -> Tensor<Autodiff<B, C>, 4> {
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let inner =
        |t: &FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t.clone()));
    let (out, lse) = B::flex_attention_forward(
        inner(&q.primitive),
        inner(&k.primitive),
        inner(&v.primitive),
        mask,
    );
    let out = out.into_primitive().tensor();
    let result = match FlexAttentionBackward
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            (
                [q.primitive, k.primitive, v.primitive, out.clone()],
                lse.map(|l| l.into_primitive().tensor()),
                mask.clone(),
            ),
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of RMSNorm: [`TritterBackend::rms_norm_backward`] in one graph node.
#[derive(Debug)]
struct RmsNormBackward;

impl<B: TritterBackend> Backward<B, 2> for RmsNormBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_gamma] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, gamma, eps) = ops.state;
        let (grad_x, grad_gamma) = B::rms_norm_backward(
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x)),
            Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(gamma)),
            eps,
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grad)),
        );
        if let Some(node) = node_x {
            grads.register::<B>(node.id, grad_x.into_primitive().tensor());
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, grad_gamma.into_primitive().tensor());
        }
    }
}

/// RMSNorm on `Autodiff<B>`: the inner backend's forward and [`RmsNormBackward`].
pub fn rms_norm<B: TritterBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    gamma: Tensor<Autodiff<B, C>, 1>,
    eps: f64,
) -> Tensor<Autodiff<B, C>, 2> {
    let x = x.into_primitive().tensor();
    let gamma = gamma.into_primitive().tensor();
    let out = B::rms_norm(
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x.primitive.clone())),
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(gamma.primitive.clone())),
        eps,
    )
    .into_primitive()
    .tensor();
    let result = match RmsNormBackward
        .prepare::<C>([x.node.clone(), gamma.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, eps), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of the squared-ReLU gate: [`TritterBackend::squared_relu_gate_backward`].
#[derive(Debug)]
struct SquaredReluGateBackward;

impl<B: TritterBackend> Backward<B, 1> for SquaredReluGateBackward {
    /// The fused gate/up product and the gate width.
    type State = (FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate_up, ffn) = ops.state;
        if let Some(node) = node {
            let t = |x: FloatTensor<B>| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(x));
            let grad = B::squared_relu_gate_backward(t(gate_up), t(grad), ffn);
            grads.register::<B>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// The squared-ReLU gate on `Autodiff<B>`: the inner backend's forward and
/// [`SquaredReluGateBackward`], one graph node.
pub fn squared_relu_gate<B: TritterBackend, C: CheckpointStrategy>(
    gate_up: Tensor<Autodiff<B, C>, 2>,
    ffn: usize,
) -> Tensor<Autodiff<B, C>, 2> {
    let gate_up = gate_up.into_primitive().tensor();
    let out = B::squared_relu_gate(
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(gate_up.primitive.clone())),
        ffn,
    )
    .into_primitive()
    .tensor();
    let result = match SquaredReluGateBackward
        .prepare::<C>([gate_up.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((gate_up.primitive, ffn), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of the rotary embedding: [`TritterBackend::rotary_backward`]; the tables
/// are constants.
#[derive(Debug)]
struct RotaryBackward;

impl<B: TritterBackend> Backward<B, 1> for RotaryBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node {
            let t = |x: FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
            let grad = B::rotary_backward(t(grad), t(cos), t(sin));
            grads.register::<B>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// The rotary embedding on `Autodiff<B>`: the inner backend's forward and
/// [`RotaryBackward`], one graph node (no gradient for the tables).
pub fn rotary<B: TritterBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 4>,
    cos: Tensor<Autodiff<B, C>, 4>,
    sin: Tensor<Autodiff<B, C>, 4>,
) -> Tensor<Autodiff<B, C>, 4> {
    let x = x.into_primitive().tensor();
    let (cos, sin) = (
        cos.into_primitive().tensor().primitive,
        sin.into_primitive().tensor().primitive,
    );
    let t = |x: &FloatTensor<B>| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x.clone()));
    let out = B::rotary(t(&x.primitive), t(&cos), t(&sin))
        .into_primitive()
        .tensor();
    let result = match RotaryBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cos, sin), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of [`TritterBackend::split_heads`]: the gradient merged back into the
/// input's columns.
#[derive(Debug)]
struct SplitHeadsBackward;

impl<B: TritterBackend> Backward<B, 1> for SplitHeadsBackward {
    /// The input's width and the first head taken.
    type State = (usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (width, start) = ops.state;
        if let Some(node) = node {
            let grad = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(grad));
            let grad = B::merge_heads(grad, width, start);
            grads.register::<B>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// [`TritterBackend::split_heads`] on `Autodiff<B>`, one graph node.
pub fn split_heads<B: TritterBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 3>,
    start: usize,
    heads: usize,
    head_dim: usize,
) -> Tensor<Autodiff<B, C>, 4> {
    let width = x.dims()[2];
    let x = x.into_primitive().tensor();
    let inner = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let out = B::split_heads(inner, start, heads, head_dim)
        .into_primitive()
        .tensor();
    let result = match SplitHeadsBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((width, start), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// Backward of [`TritterBackend::merge_heads`]: the gradient's columns split into heads.
#[derive(Debug)]
struct MergeHeadsBackward;

impl<B: TritterBackend> Backward<B, 1> for MergeHeadsBackward {
    /// The first head's column block, the number of heads and their size.
    type State = (usize, usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (start, heads, head_dim) = ops.state;
        if let Some(node) = node {
            let grad = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(grad));
            let grad = B::split_heads(grad, start, heads, head_dim);
            grads.register::<B>(node.id, grad.into_primitive().tensor());
        }
    }
}

/// [`TritterBackend::merge_heads`] on `Autodiff<B>`, one graph node.
pub fn merge_heads<B: TritterBackend, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 4>,
    width: usize,
    start: usize,
) -> Tensor<Autodiff<B, C>, 3> {
    let [_, heads, _, head_dim] = x.dims();
    let x = x.into_primitive().tensor();
    let inner = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x.primitive.clone()));
    let out = B::merge_heads(inner, width, start)
        .into_primitive()
        .tensor();
    let result = match MergeHeadsBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((start, heads, head_dim), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

#[cfg(test)]
mod tests {
    use crate::reference;
    use crate::TritterBackend;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor};

    type B = Autodiff<Flex>;

    #[test]
    fn rms_norm_gradients_match_differentiating_the_reference() {
        let device = Default::default();
        for (rows, dim) in [(1, 4), (13, 33), (64, 256)] {
            let x0 =
                Tensor::<Flex, 2>::random([rows, dim], Distribution::Normal(0.0, 2.0), &device);
            let g0 = Tensor::<Flex, 1>::random([dim], Distribution::Normal(1.0, 0.3), &device);
            let dy =
                Tensor::<Flex, 2>::random([rows, dim], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
                let g = Tensor::<B, 1>::from_inner(g0.clone()).require_grad();
                let y = if fused {
                    B::rms_norm(x.clone(), g.clone(), 1e-5)
                } else {
                    reference::rms_norm(x.clone(), g.clone(), 1e-5)
                };
                let grads = (y.clone() * Tensor::from_inner(dy.clone()))
                    .sum()
                    .backward();
                (y.inner(), x.grad(&grads).unwrap(), g.grad(&grads).unwrap())
            };
            let (y1, gx1, gg1) = run(true);
            let (y2, gx2, gg2) = run(false);
            let tol = burn::tensor::Tolerance::<f32>::default();
            y1.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            gx1.into_data()
                .assert_approx_eq::<f32>(&gx2.into_data(), tol);
            gg1.into_data()
                .assert_approx_eq::<f32>(&gg2.into_data(), tol);
        }
    }

    #[test]
    fn attention_gradients_match_differentiating_the_reference() {
        let device = Default::default();
        // (batch, heads, q, kv, d, causal, window): prefill, a cache continuation, a window.
        for (b, h, nq, nk, d, causal, window) in [
            (1, 2, 5, 5, 8, true, None),
            (2, 3, 3, 7, 16, true, None),
            (1, 2, 9, 9, 8, false, Some(3)),
            (2, 1, 4, 4, 4, false, None),
        ] {
            let r = |s: [usize; 4]| {
                Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &device)
            };
            let (q0, k0, v0) = (r([b, h, nq, d]), r([b, h, nk, d]), r([b, h, nk, d]));
            let g = r([b, h, nq, d]);
            let mask = window.map(|w| {
                let m: Vec<bool> = (0..nq)
                    .flat_map(|i| (0..nk).map(move |j| j > i + nk - nq || i + nk - nq - j >= w))
                    .collect();
                Tensor::<B, 2, burn::tensor::Bool>::from_data(
                    burn::tensor::TensorData::new(m, [nq, nk]),
                    &device,
                )
                .unsqueeze::<4>()
                .expand([b, h, nq, nk])
            });
            let run = |fused: bool| {
                let q = Tensor::<B, 4>::from_inner(q0.clone()).require_grad();
                let k = Tensor::<B, 4>::from_inner(k0.clone()).require_grad();
                let v = Tensor::<B, 4>::from_inner(v0.clone()).require_grad();
                let out = if fused {
                    B::tritter_attention(q.clone(), k.clone(), v.clone(), mask.clone(), causal)
                } else {
                    reference::attention(q.clone(), k.clone(), v.clone(), mask.clone(), causal)
                };
                let grads = (out.clone() * Tensor::from_inner(g.clone()))
                    .sum()
                    .backward();
                [
                    out.inner(),
                    q.grad(&grads).unwrap(),
                    k.grad(&grads).unwrap(),
                    v.grad(&grads).unwrap(),
                ]
            };
            let tol = burn::tensor::Tolerance::<f32>::default();
            for (a, r) in run(true).into_iter().zip(run(false)) {
                a.into_data().assert_approx_eq::<f32>(&r.into_data(), tol);
            }
        }
    }

    #[test]
    fn fused_op_matches_the_straight_through_reference() {
        let device = Default::default();
        for (tokens, d_in, d_out) in [(1, 4, 3), (7, 33, 17), (64, 96, 130)] {
            let x0 =
                Tensor::<Flex, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &device);
            let w0 =
                Tensor::<Flex, 2>::random([d_in, d_out], Distribution::Normal(0.0, 0.1), &device);
            let g =
                Tensor::<Flex, 2>::random([tokens, d_out], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = Tensor::<B, 2>::from_inner(x0.clone()).require_grad();
                let w = Tensor::<B, 2>::from_inner(w0.clone()).require_grad();
                let y = if fused {
                    B::bitlinear_matmul(x.clone(), w.clone(), None)
                } else {
                    reference::bitlinear_matmul(x.clone(), w.clone(), None)
                };
                let grads = (y.clone() * Tensor::from_inner(g.clone())).sum().backward();
                (y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
            };
            let (y1, gx1, gw1) = run(true);
            let (y2, gx2, gw2) = run(false);
            let tol = burn::tensor::Tolerance::<f32>::default();
            y1.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
            gx1.into_data()
                .assert_approx_eq::<f32>(&gx2.into_data(), tol);
            gw1.into_data()
                .assert_approx_eq::<f32>(&gw2.into_data(), tol);
        }
    }
}
