//! Autoregressive generation with a KV cache and temperature / top-k / top-p sampling.

use super::kv_cache::KvCache;
use crate::model::TritterModel;
use anyhow::{bail, Result};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tritter_kernels::TritterBackend;

/// How the next token is chosen. `temperature = 0` is greedy.
#[derive(Debug, Clone)]
pub struct SamplingConfig {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Refuses settings that describe no distribution to draw from: a temperature that
    /// is negative or not a number, a top-k of 0, a top-p outside (0, 1]. Named by the
    /// `tritter generate` flags that set them.
    pub fn check(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            bail!("--temperature {t}: expected a finite number of at least 0 (0 is greedy)");
        }
        if self.top_k == Some(0) {
            bail!("--top-k 0 keeps no token: expected at least 1");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--top-p {p}: expected a probability above 0 and at most 1");
            }
        }
        Ok(())
    }
}

/// Draws tokens from logits; deterministic for a given seed.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.config.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / t))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = self.config.top_k {
            candidates.truncate(k.max(1));
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.config.top_p {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    cumulative += p;
                    cumulative >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut r: f32 = self.rng.random();
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return candidates[i].0;
            }
            r -= p;
        }
        candidates[probs.len() - 1].0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
            if l > best.1 {
                (i, l)
            } else {
                best
            }
        })
        .0 as u32
}

/// The logits at every position of `tokens`, read in one forward pass without a cache:
/// `[tokens.len()]` rows of `vocab_size`.
pub fn forward_logits<B: TritterBackend>(
    model: &TritterModel<B>,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    if tokens.is_empty() || tokens.len() > model.config.max_seq_len {
        bail!(
            "{} tokens: expected 1 to the model's context of {}",
            tokens.len(),
            model.config.max_seq_len
        );
    }
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            [1, tokens.len()],
        ),
        &model.embedding.weight.device(),
    );
    let logits: Vec<f32> = model
        .forward(ids, None)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 logits");
    Ok(logits
        .chunks(model.config.vocab_size)
        .map(<[f32]>::to_vec)
        .collect())
}

/// Refuses a prompt of `prompt_len` tokens (the longest of a batch) that leaves no room
/// for `max_new` more in the model's context of `max_seq_len`, naming both counts.
pub fn check_context(prompt_len: usize, max_new: usize, max_seq_len: usize) -> Result<()> {
    if prompt_len + max_new > max_seq_len {
        bail!(
            "prompt ({prompt_len} tokens) + --max-new-tokens ({max_new}) exceeds the model's context of {max_seq_len} tokens"
        );
    }
    Ok(())
}

/// Generates up to `max_new` tokens after `prompt`, calling `on_token` with each as it
/// comes; stops after `eos`. With `use_cache = false` every step recomputes the whole
/// sequence (the reference the cache is tested against).
pub fn generate<B: TritterBackend>(
    model: &TritterModel<B>,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    use_cache: bool,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    sampler.config.check()?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    check_context(prompt.len(), max_new, model.config.max_seq_len)?;
    let device = model.embedding.weight.device();
    let to_tensor = |ids: &[u32]| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, ids.len()],
            ),
            &device,
        )
    };
    let mut cache =
        use_cache.then(|| KvCache::new(model.config.num_layers, prompt.len() + max_new));
    let mut tokens = prompt.to_vec();
    let mut generated = Vec::with_capacity(max_new);
    let mut next_input: Vec<u32> = prompt.to_vec();
    for _ in 0..max_new {
        let logits = match cache.as_mut() {
            Some(cache) => model.forward(to_tensor(&next_input), Some(cache)),
            None => model.forward(to_tensor(&tokens), None),
        };
        let [_, seq, vocab] = logits.dims();
        let last: Vec<f32> = logits
            .narrow(1, seq - 1, 1)
            .reshape([vocab])
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 logits");
        let token = sampler.sample(&last);
        tokens.push(token);
        generated.push(token);
        on_token(token);
        if Some(token) == eos {
            break;
        }
        next_input = vec![token];
    }
    Ok(generated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_without_a_distribution_are_refused() {
        let with = |temperature, top_k, top_p| SamplingConfig {
            temperature,
            top_k,
            top_p,
            seed: 0,
        };
        for ok in [
            with(0.0, None, None),
            with(0.7, Some(1), Some(1.0)),
            with(1.0, None, Some(0.01)),
        ] {
            assert!(ok.check().is_ok(), "{ok:?}");
        }
        for (bad, flag) in [
            (with(-0.5, None, None), "--temperature -0.5"),
            (with(f32::NAN, None, None), "--temperature NaN"),
            (with(f32::INFINITY, None, None), "--temperature inf"),
            (with(1.0, Some(0), None), "--top-k 0"),
            (with(1.0, None, Some(0.0)), "--top-p 0"),
            (with(1.0, None, Some(1.5)), "--top-p 1.5"),
            (with(1.0, None, Some(f32::NAN)), "--top-p NaN"),
        ] {
            let err = bad.check().unwrap_err().to_string();
            assert!(err.starts_with(flag), "{bad:?}: {err}");
        }
    }

    #[test]
    fn greedy_and_top_k_one_pick_the_maximum() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(Sampler::new(SamplingConfig::default()).sample(&logits), 1);
        let mut s = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn same_seed_same_draws_and_top_p_restricts() {
        let logits = [1.0, 1.0, 1.0, 1.0, 5.0];
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 9,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&t| t != 4),
            "temperature 1 should sometimes pick others"
        );
        // Token 4 holds ~93% of the mass: top-p 0.9 keeps it alone.
        let mut s = Sampler::new(SamplingConfig {
            top_p: Some(0.9),
            ..cfg
        });
        assert!((0..50).all(|_| s.sample(&logits) == 4));
    }
}
