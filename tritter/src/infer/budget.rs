//! Memory budgets and the plan that fits a model into one before anything is allocated.
//!
//! The plan counts what the engine holds on the device: the resident parts (embedding,
//! final norm, LM head), the layer buffers (every layer when the model fits, otherwise
//! two groups of `layer_group_size` layers — one computing while the next one loads),
//! the KV cache for the requested batch and context, and the activations of a prefill
//! chunk. A plan that does not fit is refused with the part that overflows named.

use super::model_file::MAX_FOLIO;
use crate::model::TritterConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use tritter_kernels::cpu::AttentionShape;
use tritter_kernels::TritterBackend;

/// A byte count parsed from `2GiB`, `512 MiB`, `1.5GB`, `64M` or `1048576`.
/// `K`/`M`/`G`/`T` alone are binary (as in `free -h`); `KB`/`MB`/… are decimal.
/// In a recipe: a string in these units, or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "ByteSizeValue", into = "u64")]
pub struct ByteSize(pub u64);

/// A size as TOML or JSON may spell it.
#[derive(Deserialize)]
#[serde(untagged)]
enum ByteSizeValue {
    Bytes(u64),
    Text(String),
}

impl TryFrom<ByteSizeValue> for ByteSize {
    type Error = String;
    fn try_from(value: ByteSizeValue) -> Result<Self, String> {
        match value {
            ByteSizeValue::Bytes(b) => Ok(ByteSize(b)),
            ByteSizeValue::Text(t) => t.parse(),
        }
    }
}

impl From<ByteSize> for u64 {
    fn from(size: ByteSize) -> u64 {
        size.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{s}` is not a size (expected e.g. 2GiB, 512MiB, 1048576)"))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            other => {
                return Err(format!(
                    "`{s}`: unknown unit `{other}` (expected B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ))
            }
        };
        Ok(ByteSize((value * multiplier as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        for (unit, size) in [
            ("TiB", 1u64 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ] {
            if self.0 >= size {
                return write!(f, "{:.2} {unit}", b / size as f64);
            }
        }
        write!(f, "{} B", self.0)
    }
}

/// How the KV cache stores keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KvCacheType {
    F32,
    F16,
    /// KIVI INT4: keys per channel, values per token, groups of 32 with an f16 scale and
    /// zero point each, the most recent 128 to 159 tokens in f16
    /// ([`tritter_kernels::kv_int4`]), held in host memory.
    Int4,
}

/// Tokens per INT4 quantization group and tokens kept in f16: the cache's own.
pub use tritter_kernels::kv_int4::{
    DEFAULT_GROUP as INT4_GROUP, DEFAULT_RECENT as INT4_RECENT_WINDOW,
};

impl std::str::FromStr for KvCacheType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "int4" => Ok(Self::Int4),
            other => Err(format!(
                "unknown KV cache type `{other}` (expected f32, f16 or int4)"
            )),
        }
    }
}

impl TryFrom<String> for KvCacheType {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<KvCacheType> for String {
    fn from(kind: KvCacheType) -> String {
        kind.to_string()
    }
}

impl fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Int4 => "int4",
        })
    }
}

impl KvCacheType {
    /// Bytes of keys and values of one sequence of `tokens` tokens, all layers.
    pub fn cache_bytes(self, config: &TritterConfig, tokens: usize) -> u64 {
        let per_token = (2 * config.num_layers * config.num_kv_heads * config.head_dim()) as u64;
        match self {
            Self::F32 => 4 * per_token * tokens as u64,
            Self::F16 => 2 * per_token * tokens as u64,
            Self::Int4 => {
                // Groups are quantized once `recent + group` tokens are in f16, so the
                // most is held at `tokens` or just before the last quantization.
                let (recent, group) = (INT4_RECENT_WINDOW, INT4_GROUP);
                let hd = config.head_dim() as u64;
                let heads = (config.num_layers * config.num_kv_heads) as u64;
                let held = |t: usize| {
                    let quantized = (t.saturating_sub(recent) / group * group) as u64;
                    // Half a byte per key and value element; an f16 scale and zero point
                    // per key group and channel, and per value token and channel group.
                    let codes = quantized * hd
                        + 4 * (quantized / group as u64) * hd
                        + 4 * quantized * hd.div_ceil(group as u64);
                    heads * codes + 2 * per_token * (t as u64 - quantized)
                };
                let before = (tokens >= recent + group)
                    .then(|| tokens - (tokens - recent) % group - 1)
                    .map_or(0, held);
                held(tokens).max(before)
            }
        }
    }
}

/// Memory the engine's process needs beyond its tensors: the code it runs, the stacks
/// of its threads, allocator slack. Measured on the CPU backend streaming a 1B model
/// (`tests/cli.rs`): about 8 MiB above the tensors' sum.
pub const RUNTIME_OVERHEAD: u64 = 10 << 20;

/// What the engine is asked to run.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub budget: u64,
    /// Tokens per sequence: prompt plus new tokens.
    pub context: usize,
    pub batch: usize,
    pub kv_cache: KvCacheType,
    /// Layers per group; `None` picks the largest that fits.
    pub layer_group_size: Option<usize>,
    /// Stream layer groups even when every layer would fit.
    pub stream: bool,
    /// Prompt tokens per sequence processed at once.
    pub prefill_chunk: usize,
}

/// One line of the plan.
#[derive(Debug, Clone)]
pub struct PlanItem {
    pub part: String,
    pub detail: String,
    pub bytes: u64,
}

/// Where every byte goes, and how the layers are grouped.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub items: Vec<PlanItem>,
    pub budget: u64,
    pub layer_group_size: usize,
    pub num_groups: usize,
    /// `false` when every layer stays resident (one load, no prefetch).
    pub streaming: bool,
    pub context: usize,
    pub batch: usize,
    pub kv_cache: KvCacheType,
    pub prefill_chunk: usize,
    /// Bytes of one layer on the device.
    pub layer_bytes: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<16} {:>12}  detail", "part", "bytes")?;
        for item in &self.items {
            writeln!(
                f,
                "{:<16} {:>12}  {}",
                item.part,
                ByteSize(item.bytes).to_string(),
                item.detail
            )?;
        }
        let total = self.total();
        writeln!(f, "{:<16} {:>12}", "total", ByteSize(total).to_string())?;
        write!(
            f,
            "{:<16} {:>12}  {}",
            "budget",
            ByteSize(self.budget).to_string(),
            if total <= self.budget {
                format!("fits, {} to spare", ByteSize(self.budget - total))
            } else {
                format!("exceeded by {}", ByteSize(total - self.budget))
            }
        )
    }
}

/// Bytes one layer occupies on the device: packed codes (rows padded to 32-bit words, as
/// the GPU path stores them, and to whole panels of 16 rows, as the CPU path does), γ,
/// and the layer's norm gains in f32.
pub fn layer_device_bytes(config: &TritterConfig) -> u64 {
    let (h, hd) = (config.hidden_size, config.head_dim());
    let bitlinears: usize = config
        .bitlinear_shapes()
        .iter()
        .map(|&(d_in, d_out)| tritter_kernels::packed::panel_words(d_out, d_in) * 4 + 4 + 4 * d_in)
        .sum();
    (bitlinears + 4 * (2 * hd + 2 * h)) as u64
}

/// Activation bytes of one prefill chunk through one layer (the largest transient the
/// engine creates), plus the hidden states of every prompt position and the logits.
fn activation_bytes(
    config: &TritterConfig,
    req: &PlanRequest,
    scratch: u64,
    device: DeviceMemory,
) -> (u64, String) {
    let (h, f, nh, nkv, hd) = (
        config.hidden_size,
        config.ffn_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim(),
    );
    let chunk = req.prefill_chunk.min(req.context).max(1);
    let rows = req.batch * chunk;
    let ctx = req.context;
    // Per row: normalized input, q/k/v product and its per-head copies, rotary tables,
    // attention output, out projection, residuals, gate/up product, gated product,
    // int8 copies and i32 accumulators of the widest product.
    let per_row = 4
        * (2 * h
            + 2 * config.qkv_size()
            + 2 * (nh + nkv) * hd
            + 2 * nh * hd
            + 3 * h
            + 2 * f
            + 2 * f)
        + 5 * (2 * f).max(config.qkv_size());
    // Attention of one sequence at a time to one layer's cache: its keys and values in
    // f32 as the attention reads them (copied out of a host cache, dequantized from
    // INT4, or, on a device, cast from the f16 buffers or copied contiguous out of the
    // f32 ones, which are written in place), and what the backend's attention holds
    // besides.
    let attention = 4 * 2 * nkv * ctx * hd
        + (device.attention)(AttentionShape {
            batch: 1,
            heads: nh,
            kv_heads: nkv,
            q_len: chunk,
            kv_len: ctx,
            d: hd,
        });
    let hidden = 4 * req.batch * ctx * h;
    let logits = 4 * req.batch * config.vocab_size * 2;
    let total = (rows * per_row + attention + hidden + logits) as u64 + scratch;
    (
        total,
        format!(
            "prefill chunk {chunk} × batch {}, hidden states of {ctx} positions",
            req.batch
        ),
    )
}

/// What a plan needs to know of the backend that will run it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceMemory {
    /// Extra memory of a packed product of a `[d_out, d_in]` matrix
    /// ([`TritterBackend::ternary_scratch_bytes`]).
    pub scratch: fn(usize, usize) -> usize,
    /// Whether streamed layers are computed in place, in the file's mapped pages, rather
    /// than copied to the device ([`TritterBackend::computes_in_place`]).
    pub in_place: bool,
    /// Extra memory of one attention call ([`TritterBackend::attention_scratch_bytes`]).
    pub attention: fn(AttentionShape) -> usize,
}

impl DeviceMemory {
    pub fn of<B: TritterBackend>() -> Self {
        Self {
            scratch: B::ternary_scratch_bytes,
            in_place: B::computes_in_place(),
            attention: B::attention_scratch_bytes,
        }
    }
}

/// Fits `config` into `req.budget` on `device`, or explains by how much it does not.
pub fn plan(config: &TritterConfig, req: &PlanRequest, device: DeviceMemory) -> Result<MemoryPlan> {
    if req.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if req.context == 0 {
        bail!("--context must be at least 1 token");
    }
    if req.context > config.max_seq_len {
        bail!(
            "context of {} tokens exceeds the model's max_seq_len of {}",
            req.context,
            config.max_seq_len
        );
    }
    let layers = config.num_layers;
    if let Some(g) = req.layer_group_size {
        if g == 0 || g > layers {
            bail!("--layer-group-size {g} must be between 1 and the model's {layers} layers");
        }
    }
    let (v, h) = (config.vocab_size, config.hidden_size);
    let mut fixed = vec![PlanItem {
        part: "embedding".into(),
        detail: format!("{v} × {h} f32, resident"),
        bytes: (4 * v * h) as u64,
    }];
    if !config.tie_embeddings {
        fixed.push(PlanItem {
            part: "lm head".into(),
            detail: format!("{h} × {v} f32, resident"),
            bytes: (4 * v * h) as u64,
        });
    }
    fixed.push(PlanItem {
        part: "final norm".into(),
        detail: format!("{h} f32, resident"),
        bytes: (4 * h) as u64,
    });
    fixed.push(PlanItem {
        part: "kv cache".into(),
        detail: format!(
            "{} × {} tokens × {layers} layers, {}",
            req.batch, req.context, req.kv_cache
        ),
        bytes: req.batch as u64 * req.kv_cache.cache_bytes(config, req.context),
    });
    let scratch = config
        .bitlinear_shapes()
        .iter()
        .map(|&(d_in, d_out)| (device.scratch)(d_out, d_in))
        .max()
        .unwrap_or(0) as u64;
    let (act, act_detail) = activation_bytes(config, req, scratch, device);
    fixed.push(PlanItem {
        part: "activations".into(),
        detail: act_detail,
        bytes: act,
    });
    // A tensor's file pages are mapped while it is copied to the device, then released;
    // layers computed in place need no copy.
    let staging = PlanItem {
        part: "staging".into(),
        detail: "file pages of the largest packed tensor while it is copied".into(),
        bytes: config
            .bitlinear_shapes()
            .iter()
            .map(|&(d_in, d_out)| d_out * d_in.div_ceil(4))
            .max()
            .unwrap_or(0) as u64,
    };
    let runtime = PlanItem {
        part: "runtime".into(),
        detail: "code, thread stacks and allocator slack (measured on the CPU backend)".into(),
        bytes: RUNTIME_OVERHEAD,
    };
    let fixed_bytes: u64 = fixed.iter().map(|i| i.bytes).sum::<u64>() + runtime.bytes;
    let layer = layer_device_bytes(config);
    let resident_total = fixed_bytes + staging.bytes + layers as u64 * layer;
    // Layers computed in place are the file's pages, which the mapping maps a whole
    // folio (up to 2 MiB, and no more than the file) at a time: a streamed layer's
    // codes, side by side in the file, bring in up to a folio past each end, and the
    // scales and norms of the layer being loaded, read through the mapping, up to two
    // folios while they are read.
    let folio = (MAX_FOLIO as u64).min(config.packed_size_bytes() as u64);
    let (held_layer, streamed_staging) = match device.in_place {
        true => (layer + 2 * folio, 2 * folio),
        false => (layer, staging.bytes),
    };

    let group = match req.layer_group_size {
        Some(g) => g,
        None if !req.stream && resident_total <= req.budget => layers,
        None => {
            // The largest groups of which two fit; streaming on request keeps at least
            // two groups.
            let room = req.budget.saturating_sub(fixed_bytes + streamed_staging);
            let most = if req.stream {
                layers.saturating_sub(1).max(1)
            } else {
                layers
            };
            ((room / (2 * held_layer)) as usize).clamp(1, most)
        }
    };
    let streaming = group < layers;
    let num_groups = layers.div_ceil(group);
    let mut items = fixed;
    items.insert(
        items.len() - 2,
        if streaming {
            PlanItem {
                part: "layer buffers".into(),
                detail: format!(
                    "2 × {group} of {layers} layers × {} packed (one computes, one loads){}",
                    ByteSize(layer),
                    if device.in_place {
                        ", in the file's mapped pages, each with a folio past either end"
                    } else {
                        ""
                    }
                ),
                bytes: 2 * group as u64 * held_layer,
            }
        } else {
            PlanItem {
                part: "layers".into(),
                detail: format!("all {layers} layers × {} packed, resident", ByteSize(layer)),
                bytes: layers as u64 * layer,
            }
        },
    );
    if streaming && device.in_place {
        items.push(PlanItem {
            part: "staging".into(),
            detail: "folios of file pages holding the loading layer's scales and norms".into(),
            bytes: streamed_staging,
        });
    } else {
        items.push(staging);
    }
    items.push(runtime);
    let plan = MemoryPlan {
        items,
        budget: req.budget,
        layer_group_size: group,
        num_groups,
        streaming,
        context: req.context,
        batch: req.batch,
        kv_cache: req.kv_cache,
        prefill_chunk: req.prefill_chunk,
        layer_bytes: layer,
    };
    let total = plan.total();
    if total > req.budget {
        let largest = plan
            .items
            .iter()
            .max_by_key(|i| i.bytes)
            .expect("plan has items");
        bail!(
            "the model does not fit the memory budget of {}: it needs {} (over by {}); \
             the largest part is {} at {} ({}){}\n{plan}",
            ByteSize(req.budget),
            ByteSize(total),
            ByteSize(total - req.budget),
            largest.part,
            ByteSize(largest.bytes),
            largest.detail,
            if streaming && group == 1 {
                ", even with layer groups of one layer"
            } else {
                ""
            }
        );
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_SCRATCH: DeviceMemory = DeviceMemory {
        scratch: |_, _| 0,
        in_place: false,
        attention: |_| 0,
    };

    fn req(budget: u64, context: usize, batch: usize, kv: KvCacheType) -> PlanRequest {
        PlanRequest {
            budget,
            context,
            batch,
            kv_cache: kv,
            layer_group_size: None,
            stream: false,
            prefill_chunk: 256,
        }
    }

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(p("2GiB"), Ok(2 << 30));
        assert_eq!(p("512 MiB"), Ok(512 << 20));
        assert_eq!(p("64M"), Ok(64 << 20));
        assert_eq!(p("1.5GB"), Ok(1_500_000_000));
        assert_eq!(p("1048576"), Ok(1 << 20));
        assert!(p("12 parsecs")
            .unwrap_err()
            .contains("unknown unit `parsecs`"));
        assert!(p("lots").unwrap_err().contains("not a size"));
        assert_eq!(ByteSize(3 << 29).to_string(), "1.50 GiB");
    }

    #[test]
    fn kv_cache_arithmetic_matches_the_reference_table() {
        // 7B (GQA-8, head_dim 128) at 128K tokens: f16 16 GiB, INT4 ≈ 5 GiB.
        let c = TritterConfig::preset("7B", 264).unwrap();
        let tokens = 128 * 1024;
        assert_eq!(KvCacheType::F16.cache_bytes(&c, tokens), 16 << 30);
        let int4 = KvCacheType::Int4.cache_bytes(&c, tokens) as f64 / (1u64 << 30) as f64;
        assert!((int4 - 5.0).abs() < 0.1, "{int4} GiB");
    }

    #[test]
    fn seventy_b_streams_in_sixteen_gib() {
        // 70B packed is 17.1 GB (15.9 GiB): with its cache and activations it cannot be
        // resident in 16 GiB, but streams in groups.
        let c = TritterConfig::preset("70B", 264).unwrap();
        assert!(c.packed_size_bytes() as u64 > 15 << 30);
        let plan = plan(&c, &req(16 << 30, 4096, 1, KvCacheType::F16), NO_SCRATCH).unwrap();
        assert!(plan.streaming && plan.num_groups > 1);
        assert!(plan.total() <= 16 << 30);
        // The layer buffers are two groups, and the group is the largest that fits.
        let bigger = 2 * (plan.layer_group_size as u64 + 1) * plan.layer_bytes;
        let others: u64 = plan
            .items
            .iter()
            .filter(|i| i.part != "layer buffers")
            .map(|i| i.bytes)
            .sum();
        assert!(others + bigger > 16 << 30);
    }

    /// 7B at 128K tokens with the INT4 cache fits a 16 GiB device: the attention of a
    /// prefill chunk to that context holds no scores on the flash kernels (CPU and
    /// CubeCL), where materializing them for 32 heads would take 8 GiB.
    #[test]
    fn flash_attention_keeps_long_prefills_small() {
        let c = TritterConfig::preset("7B", 264).unwrap();
        let r = req(16 << 30, 128 * 1024, 1, KvCacheType::Int4);
        let activations = |device: DeviceMemory| {
            let plan = plan(&c, &r, device).unwrap();
            assert!(plan.total() <= 16 << 30);
            plan.items
                .iter()
                .find(|i| i.part == "activations")
                .unwrap()
                .bytes
        };
        // Hidden states of every position (2 GiB) and one layer's keys and values in
        // f32 (1 GiB) are most of it.
        for device in [
            DeviceMemory::of::<burn::backend::Flex>(),
            DeviceMemory::of::<burn::backend::Wgpu>(),
        ] {
            let act = activations(device) as f64 / (1u64 << 30) as f64;
            assert!((3.0..3.5).contains(&act), "{act} GiB");
        }
    }

    #[test]
    fn a_plan_that_does_not_fit_names_the_overflow() {
        let c = TritterConfig::preset("7B", 264).unwrap();
        // 128K tokens of f16 cache alone is 16 GiB.
        let err = plan(
            &c,
            &req(8 << 30, 128 * 1024, 1, KvCacheType::F16),
            NO_SCRATCH,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("over by"), "{err}");
        assert!(err.contains("largest part is kv cache"), "{err}");
        // And a budget below the resident parts plus two one-layer groups.
        let t = TritterConfig::preset("test", 264).unwrap();
        let err = plan(&t, &req(300_000, 16, 1, KvCacheType::F32), NO_SCRATCH)
            .unwrap_err()
            .to_string();
        assert!(err.contains("even with layer groups of one layer"), "{err}");
    }

    /// Layers computed in place hold the folios their codes' pages are mapped in: a
    /// folio past either end of each, and two for the loading layer's scales and norms.
    #[test]
    fn in_place_layers_hold_their_folios() {
        let c = TritterConfig::preset("1B", 264).unwrap();
        let in_place = DeviceMemory {
            in_place: true,
            ..NO_SCRATCH
        };
        let r = PlanRequest {
            layer_group_size: Some(2),
            stream: true,
            ..req(1 << 30, 64, 1, KvCacheType::F16)
        };
        let folio = MAX_FOLIO as u64;
        let bytes = |plan: &MemoryPlan, part: &str| {
            plan.items.iter().find(|i| i.part == part).map(|i| i.bytes)
        };
        let copied = plan(&c, &r, NO_SCRATCH).unwrap();
        let mapped = plan(&c, &r, in_place).unwrap();
        assert_eq!(copied.layer_bytes, mapped.layer_bytes);
        assert_eq!(
            bytes(&copied, "layer buffers"),
            Some(4 * copied.layer_bytes)
        );
        assert_eq!(
            bytes(&mapped, "layer buffers"),
            Some(4 * (mapped.layer_bytes + 2 * folio))
        );
        assert_eq!(bytes(&mapped, "staging"), Some(2 * folio));
        // The budget that holds the copied groups does not hold the mapped ones.
        let tight = PlanRequest {
            budget: copied.total(),
            ..r.clone()
        };
        assert!(plan(&c, &tight, NO_SCRATCH).is_ok());
        let err = plan(&c, &tight, in_place).unwrap_err().to_string();
        assert!(err.contains("folio past either end"), "{err}");
    }

    #[test]
    fn a_model_that_fits_stays_resident() {
        let t = TritterConfig::preset("test", 264).unwrap();
        let plan = plan(&t, &req(1 << 30, 512, 4, KvCacheType::F32), NO_SCRATCH).unwrap();
        assert!(!plan.streaming);
        assert_eq!(plan.num_groups, 1);
        assert!(plan.to_string().contains("fits"));
    }
}
