//! Export to safetensors with ternary weights packed at 2 bits per weight.
//!
//! Layout of a BitLinear `L` (latent `[in, out]`) in the file:
//! - `L.weight`: `U8 [out, ceil(in / 4)]` — row `r` holds output feature `r`; input `c`
//!   sits in byte `c / 4` at bits `2·(c % 4) .. 2·(c % 4) + 2`, coded `q + 1`
//!   (0 → −1, 1 → 0, 2 → +1; code 3 is invalid; padding codes are 1 = zero).
//! - `L.scale`: `F32 [1]` — γ, so the weight is `Wq · γ`.
//! - `L.norm`: `F32 [in]` — the BitLinear's input RMSNorm gain.
//!
//! Full-precision tensors keep their Burn layout: `embedding.weight` `[vocab, hidden]`,
//! `lm_head.weight` `[hidden, vocab]` (absent when tied), and every norm gain. The file's
//! metadata holds `format`, the model `config` (JSON) and the `tokenizer` spec; a
//! Hugging Face tokenizer's JSON is embedded whole as `tokenizer_json`.

use crate::model::bitlinear::BitLinear;
use crate::model::block::Block;
use crate::model::TritterModel;
use anyhow::{Context, Result};
use burn::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;
use tritter_kernels::reference::ternary_quantize;

pub const FORMAT: &str = "tritter-ternary-v1";

/// Packs ternary values (row-major `[rows, cols]`, each −1, 0 or 1) 4 per byte.
pub fn pack_ternary(values: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    let row_bytes = cols.div_ceil(4);
    let mut out = vec![0x55u8; rows * row_bytes]; // every code 1 (= 0)
    for r in 0..rows {
        for c in 0..cols {
            let code = (values[r * cols + c] as i32 + 1) as u8;
            let byte = &mut out[r * row_bytes + c / 4];
            let shift = 2 * (c % 4);
            *byte = (*byte & !(0b11 << shift)) | (code << shift);
        }
    }
    out
}

/// Unpacks [`pack_ternary`]'s bytes; `None` if a code is 3.
pub fn unpack_ternary(bytes: &[u8], rows: usize, cols: usize) -> Option<Vec<f32>> {
    let row_bytes = cols.div_ceil(4);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            let code = (bytes[r * row_bytes + c / 4] >> (2 * (c % 4))) & 0b11;
            if code == 3 {
                return None;
            }
            out.push(code as f32 - 1.0);
        }
    }
    Some(out)
}

/// The BitLinear layers of a block with their names, in file order.
pub fn block_bitlinears<B: Backend>(block: &Block<B>) -> [(&'static str, &BitLinear<B>); 4] {
    [
        ("attn.qkv", &block.attn.qkv),
        ("attn.out", &block.attn.out),
        ("ffn.gate_up", &block.ffn.gate_up),
        ("ffn.down", &block.ffn.down),
    ]
}

fn f32_bytes<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<u8> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 tensor")
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Writes `model` to `path` (through a temporary file, renamed when complete).
pub fn export_model<B: Backend>(
    model: &TritterModel<B>,
    tokenizer: &tritter_data::TokenizerSpec,
    tokenizer_json: Option<&str>,
    path: &Path,
) -> Result<u64> {
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut full = |name: String, shape: Vec<usize>, bytes: Vec<u8>| {
        tensors.push((name, Dtype::F32, shape, bytes));
    };
    full(
        "embedding.weight".into(),
        model.embedding.weight.dims().to_vec(),
        f32_bytes(model.embedding.weight.val()),
    );
    if let Some(head) = &model.lm_head {
        full(
            "lm_head.weight".into(),
            head.weight.dims().to_vec(),
            f32_bytes(head.weight.val()),
        );
    }
    full(
        "norm.gamma".into(),
        model.norm.gamma.dims().to_vec(),
        f32_bytes(model.norm.gamma.val()),
    );
    for (i, block) in model.blocks.iter().enumerate() {
        for (name, norm) in [
            ("attn.q_norm", &block.attn.q_norm),
            ("attn.k_norm", &block.attn.k_norm),
            ("attn_norm", &block.attn_norm),
            ("ffn_norm", &block.ffn_norm),
        ] {
            full(
                format!("blocks.{i}.{name}.gamma"),
                norm.gamma.dims().to_vec(),
                f32_bytes(norm.gamma.val()),
            );
        }
    }
    for (i, block) in model.blocks.iter().enumerate() {
        for (name, layer) in block_bitlinears(block) {
            let [d_in, d_out] = layer.weight.dims();
            let (q, gamma) = ternary_quantize(layer.weight.val());
            let q: Vec<f32> = q
                .transpose()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            let prefix = format!("blocks.{i}.{name}");
            tensors.push((
                format!("{prefix}.weight"),
                Dtype::U8,
                vec![d_out, d_in.div_ceil(4)],
                pack_ternary(&q, d_out, d_in),
            ));
            tensors.push((
                format!("{prefix}.scale"),
                Dtype::F32,
                vec![1],
                f32_bytes(gamma),
            ));
            tensors.push((
                format!("{prefix}.norm"),
                Dtype::F32,
                vec![d_in],
                f32_bytes(layer.norm.gamma.val()),
            ));
        }
    }

    let mut metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("config".to_string(), serde_json::to_string(&model.config)?),
        ("tokenizer".to_string(), serde_json::to_string(tokenizer)?),
    ]);
    if let Some(json) = tokenizer_json {
        metadata.insert("tokenizer_json".to_string(), json.to_string());
    }
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).expect("consistent tensor"),
            )
        })
        .collect();
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(std::fs::metadata(path)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips_and_uses_the_documented_layout() {
        let values = [-1.0, 0.0, 1.0, 1.0, 0.0, -1.0, -1.0, 0.0, 1.0, 1.0];
        let packed = pack_ternary(&values, 2, 5);
        // Row 0: codes 0,1,2,2 → 0b10_10_01_00, then code 1 and three padding 1s;
        // row 1: codes 0,0,1,2 → 0b10_01_00_00, then code 2 and padding.
        assert_eq!(
            packed,
            vec![0b1010_0100, 0b0101_0101, 0b1001_0000, 0b0101_0110]
        );
        assert_eq!(unpack_ternary(&packed, 2, 5).unwrap(), values);
        assert!(unpack_ternary(&[0xff], 1, 4).is_none());
    }
}
