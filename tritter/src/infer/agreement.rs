//! Whether two computations of the same ternary model agree.
//!
//! Two correct implementations that round differently (integer against float
//! accumulation, another SIMD width, another device) cannot promise identical logits: an
//! activation that lands within rounding error of an int8 rounding boundary goes one way
//! in one and the other way in the other, and moves every later logit by a fraction of a
//! quantization step. So agreement is checked in the terms that survive this: logits
//! close relative to their scale, and each greedy token the other side's best token up to
//! a near-tie. A layout, scale or position bug moves logits by far more.

use super::generate::{argmax, forward_logits};
use crate::model::TritterModel;
use anyhow::{bail, ensure, Result};
use tritter_kernels::TritterBackend;

/// Relative tolerance (of a row's largest |logit|) for two correct implementations.
pub const LOGIT_TOLERANCE: f32 = 2e-2;

/// What a comparison found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Agreement {
    /// Steps whose logits were compared.
    pub steps: usize,
    /// Largest `|a − b| / max|a|` over them.
    pub max_rel_diff: f32,
    /// Steps where the two greedy choices differed by a near-tie (after the first, two
    /// generations follow different sequences and are no longer compared).
    pub near_ties: usize,
}

/// `|a − b| / max|a|`, the largest over the row.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

fn best(logits: &[f32]) -> f32 {
    logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `token` is the row's greedy choice up to `tol` of its largest |logit|.
fn near_best(logits: &[f32], token: u32, tol: f32) -> bool {
    let scale = logits.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    logits
        .get(token as usize)
        .is_some_and(|&v| v >= best(logits) - tol * scale)
}

/// Compares two greedy generations from the same prompt, each with the logits every
/// token was picked from: logits within `tol` while the sequences are the same, and a
/// first difference only where both sides see a near-tie between the two tokens.
pub fn compare_generations(
    a_tokens: &[u32],
    a_logits: &[Vec<f32>],
    b_tokens: &[u32],
    b_logits: &[Vec<f32>],
    tol: f32,
) -> Result<Agreement> {
    ensure!(
        a_logits.len() == a_tokens.len() && b_logits.len() == b_tokens.len(),
        "each generated token needs its logits"
    );
    let mut agreement = Agreement::default();
    for (step, (&ta, &tb)) in a_tokens.iter().zip(b_tokens).enumerate() {
        let (la, lb) = (&a_logits[step], &b_logits[step]);
        ensure!(
            la.len() == lb.len(),
            "step {step}: logit rows of different sizes"
        );
        let diff = rel_diff(la, lb);
        agreement.steps += 1;
        agreement.max_rel_diff = agreement.max_rel_diff.max(diff);
        ensure!(
            diff <= tol,
            "step {step}: logits differ by {diff} (tolerance {tol})"
        );
        if ta != tb {
            ensure!(
                near_best(la, tb, tol) && near_best(lb, ta, tol),
                "step {step}: tokens {ta} and {tb} differ and are not a near-tie"
            );
            agreement.near_ties += 1;
            return Ok(agreement);
        }
    }
    if a_tokens.len() != b_tokens.len() {
        bail!(
            "one generation stopped after {} tokens, the other after {}",
            a_tokens.len(),
            b_tokens.len()
        );
    }
    Ok(agreement)
}

/// Checks a greedy generation against `model` by teacher forcing: `model` reads `prompt`
/// followed by `tokens` in one forward pass, and every token must be its greedy choice at
/// that position up to a near-tie; `logits`, when given (one row per token), must match
/// the model's within `tol`.
pub fn check_greedy<B: TritterBackend>(
    model: &TritterModel<B>,
    prompt: &[u32],
    tokens: &[u32],
    logits: Option<&[Vec<f32>]>,
    tol: f32,
) -> Result<Agreement> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    if tokens.is_empty() {
        return Ok(Agreement::default());
    }
    let mut sequence = prompt.to_vec();
    sequence.extend_from_slice(&tokens[..tokens.len() - 1]);
    let rows = forward_logits(model, &sequence)?;
    let mut agreement = Agreement::default();
    for (step, &token) in tokens.iter().enumerate() {
        let expected = &rows[prompt.len() - 1 + step];
        if let Some(logits) = logits {
            let diff = rel_diff(expected, &logits[step]);
            agreement.max_rel_diff = agreement.max_rel_diff.max(diff);
            ensure!(
                diff <= tol,
                "step {step}: logits differ by {diff} (tolerance {tol})"
            );
        }
        let greedy = argmax(expected);
        if greedy != token {
            ensure!(
                near_best(expected, token, tol),
                "step {step}: token {token} is not the model's choice {greedy} nor a near-tie"
            );
            agreement.near_ties += 1;
        }
        agreement.steps += 1;
    }
    Ok(agreement)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_agree_up_to_near_ties_only() {
        let rows = |v: &[[f32; 3]]| v.iter().map(|r| r.to_vec()).collect::<Vec<_>>();
        let a = rows(&[[1.0, 5.0, 0.0], [2.0, 2.0, 0.5], [0.0, 0.0, 9.0]]);
        let b = rows(&[[1.0, 5.0, 0.01], [2.0, 1.99, 0.5], [9.0, 0.0, 0.0]]);
        // Step 1 is a near-tie (0 vs 1); comparison stops there.
        let ok = compare_generations(&[1, 1, 2], &a, &[1, 0, 0], &b, 0.02).unwrap();
        assert_eq!((ok.steps, ok.near_ties), (2, 1));
        // The same difference without a tie is refused.
        let far = rows(&[[1.0, 5.0, 0.0], [2.0, 1.0, 0.5]]);
        let err = compare_generations(&[1, 1], &far, &[1, 0], &far, 0.02).unwrap_err();
        assert!(err.to_string().contains("not a near-tie"), "{err}");
        // Logits apart by more than the tolerance are refused even with equal tokens.
        let err =
            compare_generations(&[1], &a[..1], &[1], &rows(&[[1.0, 4.0, 0.0]]), 0.02).unwrap_err();
        assert!(err.to_string().contains("step 0: logits differ"), "{err}");
        // A generation that stops early without a difference is refused.
        assert!(compare_generations(&[1, 1], &a[..2], &[1], &b[..1], 0.02).is_err());
    }
}
