//! Model configuration: presets, overrides, validation, and exact size arithmetic.

use serde::{Deserialize, Serialize};

/// Hyperparameters of a Tritter model. The only place they live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TritterConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub ffn_size: usize,
    pub max_seq_len: usize,
    pub vocab_size: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Sliding-window attention: each token sees at most this many tokens (itself included).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Share the embedding matrix with the LM head.
    #[serde(default)]
    pub tie_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    500_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}

/// Named size presets (REFERENCE.md): hidden, layers, heads, kv heads, FFN, context.
pub const PRESETS: [(&str, [usize; 6]); 9] = [
    ("test", [256, 4, 4, 4, 512, 2048]),
    ("125M", [768, 12, 12, 12, 3072, 2048]),
    ("350M", [1024, 24, 16, 16, 4096, 2048]),
    ("1B", [2048, 16, 16, 16, 5632, 131072]),
    ("3B", [2560, 26, 20, 20, 6912, 131072]),
    ("7B", [4096, 32, 32, 8, 11008, 131072]),
    ("13B", [5120, 40, 40, 8, 13824, 131072]),
    ("30B", [6656, 60, 52, 8, 17920, 131072]),
    ("70B", [8192, 80, 64, 8, 28672, 131072]),
];

/// A field of the configuration that failed validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("model config: `{field}` = {value}: {expected}")]
pub struct ConfigError {
    pub field: &'static str,
    pub value: String,
    pub expected: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unknown model preset `{0}`; expected one of test, 125M, 350M, 1B, 3B, 7B, 13B, 30B, 70B")]
pub struct UnknownPreset(pub String);

/// Fields a recipe may set on top of a preset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigOverrides {
    pub hidden_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    pub num_kv_heads: Option<usize>,
    pub ffn_size: Option<usize>,
    pub max_seq_len: Option<usize>,
    pub vocab_size: Option<usize>,
    pub rope_theta: Option<f64>,
    pub norm_eps: Option<f64>,
    pub sliding_window: Option<usize>,
    pub tie_embeddings: Option<bool>,
}

impl TritterConfig {
    /// A preset by name (case-insensitive) with the given vocabulary size.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, UnknownPreset> {
        let (_, [hidden, layers, heads, kv, ffn, ctx]) = PRESETS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| UnknownPreset(name.to_string()))?;
        Ok(Self {
            hidden_size: *hidden,
            num_layers: *layers,
            num_heads: *heads,
            num_kv_heads: *kv,
            ffn_size: *ffn,
            max_seq_len: *ctx,
            vocab_size,
            rope_theta: default_rope_theta(),
            norm_eps: default_norm_eps(),
            sliding_window: None,
            tie_embeddings: false,
        })
    }

    pub fn with_overrides(mut self, o: &ConfigOverrides) -> Self {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = v; } )* };
        }
        set!(
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            ffn_size,
            max_seq_len,
            vocab_size,
            rope_theta,
            norm_eps,
            tie_embeddings
        );
        if o.sliding_window.is_some() {
            self.sliding_window = o.sliding_window;
        }
        self
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Output width of the fused q/k/v projection.
    pub fn qkv_size(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim()
    }

    /// Checks every constraint the model relies on, naming the first field that fails.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, value: &dyn std::fmt::Display, expected: &str| {
            Err(ConfigError {
                field,
                value: value.to_string(),
                expected: expected.to_string(),
            })
        };
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("ffn_size", self.ffn_size),
            ("max_seq_len", self.max_seq_len),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return err(field, &v, "must be positive");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return err(
                "hidden_size",
                &self.hidden_size,
                &format!("must be divisible by num_heads = {}", self.num_heads),
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return err(
                "num_kv_heads",
                &self.num_kv_heads,
                &format!("must divide num_heads = {}", self.num_heads),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(
                "hidden_size",
                &self.hidden_size,
                "must give an even head_dim (hidden_size / num_heads) for RoPE",
            );
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 1.0 {
            return err("rope_theta", &self.rope_theta, "must be greater than 1");
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return err("norm_eps", &self.norm_eps, "must be positive");
        }
        if self.sliding_window == Some(0) {
            return err("sliding_window", &0, "must be positive when set");
        }
        Ok(())
    }

    /// Shapes `[in, out]` of every BitLinear weight of one block, in order.
    pub fn bitlinear_shapes(&self) -> [(usize, usize); 4] {
        let h = self.hidden_size;
        [
            (h, self.qkv_size()),
            (self.num_heads * self.head_dim(), h),
            (h, 2 * self.ffn_size),
            (self.ffn_size, h),
        ]
    }

    /// Exact number of parameters of the model built from this config.
    pub fn parameter_count(&self) -> usize {
        self.ternary_parameter_count() + self.high_precision_parameter_count()
    }

    /// Parameters stored as ternary weights (the BitLinear matrices).
    pub fn ternary_parameter_count(&self) -> usize {
        let per_block: usize = self.bitlinear_shapes().iter().map(|(i, o)| i * o).sum();
        self.num_layers * per_block
    }

    /// Parameters kept in full precision: embedding, LM head, and every norm gain.
    pub fn high_precision_parameter_count(&self) -> usize {
        let h = self.hidden_size;
        let embed = self.vocab_size * h;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        let bitlinear_norms: usize = self.bitlinear_shapes().iter().map(|(i, _)| i).sum();
        let qk_norms = 2 * self.head_dim();
        let post_norms = 2 * h;
        embed + head + h + self.num_layers * (bitlinear_norms + qk_norms + post_norms)
    }

    /// Bytes of the ternary weights packed at 2 bits per weight (rows padded to whole
    /// bytes) plus one f32 scale per tensor.
    pub fn packed_size_bytes(&self) -> usize {
        let per_block: usize = self
            .bitlinear_shapes()
            .iter()
            .map(|(i, o)| o * i.div_ceil(4) + 4)
            .sum();
        self.num_layers * per_block
    }

    /// Bytes of the full-precision tensors as exported (f32).
    pub fn high_precision_bytes(&self) -> usize {
        4 * self.high_precision_parameter_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let mut c = TritterConfig::preset("test", 264).unwrap();
        assert!(c.validate().is_ok());
        c.num_kv_heads = 3;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "num_kv_heads");
        assert!(e.to_string().contains("num_kv_heads` = 3"), "{e}");
        assert!(TritterConfig::preset("9000B", 264).is_err());
    }

    #[test]
    fn overrides_apply() {
        let c = TritterConfig::preset("test", 264)
            .unwrap()
            .with_overrides(&ConfigOverrides {
                num_layers: Some(2),
                sliding_window: Some(64),
                ..Default::default()
            });
        assert_eq!(c.num_layers, 2);
        assert_eq!(c.sliding_window, Some(64));
        assert_eq!(c.hidden_size, 256);
    }
}
