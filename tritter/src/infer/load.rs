//! Loading an exported model: every tensor checked for presence, dtype and size, the
//! ternary weights unpacked into latent weights whose quantization is exactly the
//! exported one.

use crate::export::{block_bitlinears, unpack_ternary, FORMAT};
use crate::model::{TritterConfig, TritterModel};
use crate::tokenizer::{ByteTokenizer, HfTokenizer, Tokenizer, TokenizerSpec};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::Param;
use burn::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors};
use std::path::Path;

/// An exported model, loaded.
pub struct LoadedModel<B: Backend> {
    pub model: TritterModel<B>,
    pub tokenizer: Box<dyn Tokenizer>,
    pub tokenizer_spec: TokenizerSpec,
}

pub fn load_export<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the map is read-only and lives only while the tensors are copied out.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("mapping {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| {
        anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get_meta = |key: &str| {
        meta.get(key)
            .ok_or_else(|| anyhow!("{}: metadata has no `{key}`", path.display()))
    };
    if get_meta("format")? != FORMAT {
        bail!(
            "{}: format `{}` is not `{FORMAT}`",
            path.display(),
            get_meta("format")?
        );
    }
    let config: TritterConfig = serde_json::from_str(get_meta("config")?)
        .with_context(|| format!("{}: malformed `config` metadata", path.display()))?;
    config
        .validate()
        .with_context(|| format!("{}: `config` metadata", path.display()))?;
    let tokenizer_spec: TokenizerSpec = serde_json::from_str(get_meta("tokenizer")?)
        .with_context(|| format!("{}: malformed `tokenizer` metadata", path.display()))?;
    let tokenizer: Box<dyn Tokenizer> = match &tokenizer_spec {
        TokenizerSpec::Byte => Box::new(ByteTokenizer),
        TokenizerSpec::HuggingFace(_) => Box::new(HfTokenizer::from_bytes(
            get_meta("tokenizer_json")?.as_bytes(),
        )?),
    };

    let tensor_bytes = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<&[u8]> {
        let view = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: tensor `{name}` is missing", path.display()))?;
        if view.dtype() != dtype || view.shape() != shape {
            bail!(
                "{}: tensor `{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                path.display(),
                view.dtype(),
                view.shape()
            );
        }
        Ok(view.data())
    };
    let f32_tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let bytes = tensor_bytes(name, Dtype::F32, shape)?;
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if values.iter().any(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds non-finite values",
                path.display()
            );
        }
        Ok(values)
    };
    let param1 = |name: &str, n: usize| -> Result<Param<Tensor<B, 1>>> {
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(f32_tensor(name, &[n])?, [n]),
            device,
        )))
    };
    let param2 = |name: &str, shape: [usize; 2]| -> Result<Param<Tensor<B, 2>>> {
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(f32_tensor(name, &shape)?, shape),
            device,
        )))
    };

    let mut model = config.init::<B>(device);
    let (v, h) = (config.vocab_size, config.hidden_size);
    model.embedding.weight = param2("embedding.weight", [v, h])?;
    if let Some(head) = model.lm_head.as_mut() {
        head.weight = param2("lm_head.weight", [h, v])?;
    }
    model.norm.gamma = param1("norm.gamma", h)?;
    let hd = config.head_dim();
    for (i, block) in model.blocks.iter_mut().enumerate() {
        block.attn.q_norm.gamma = param1(&format!("blocks.{i}.attn.q_norm.gamma"), hd)?;
        block.attn.k_norm.gamma = param1(&format!("blocks.{i}.attn.k_norm.gamma"), hd)?;
        block.attn_norm.gamma = param1(&format!("blocks.{i}.attn_norm.gamma"), h)?;
        block.ffn_norm.gamma = param1(&format!("blocks.{i}.ffn_norm.gamma"), h)?;
        let names: Vec<&str> = block_bitlinears(block).iter().map(|(n, _)| *n).collect();
        let layers = [
            &mut block.attn.qkv,
            &mut block.attn.out,
            &mut block.ffn.gate_up,
            &mut block.ffn.down,
        ];
        for (name, layer) in names.into_iter().zip(layers) {
            let prefix = format!("blocks.{i}.{name}");
            let [d_in, d_out] = layer.weight.dims();
            let packed = tensor_bytes(
                &format!("{prefix}.weight"),
                Dtype::U8,
                &[d_out, d_in.div_ceil(4)],
            )?;
            let q = unpack_ternary(packed, d_out, d_in).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{prefix}.weight` holds an invalid ternary code",
                    path.display()
                )
            })?;
            let gamma = f32_tensor(&format!("{prefix}.scale"), &[1])?[0];
            layer.norm.gamma = param1(&format!("{prefix}.norm"), d_in)?;
            layer.weight = Param::from_tensor(
                latent_from_ternary::<B>(&q, gamma, [d_out, d_in], device).transpose(),
            );
        }
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        tokenizer_spec,
    })
}

/// Latent weights that quantize back to exactly `q·γ`: `q·γ/p`, with `p` the fraction of
/// non-zero entries. Their absmean is `γ`, and `q/p` rounds and clamps back to `q`.
fn latent_from_ternary<B: Backend>(
    q: &[f32],
    gamma: f32,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2> {
    let nonzero = q.iter().filter(|v| **v != 0.0).count();
    let scale = if nonzero == 0 {
        0.0
    } else {
        gamma * q.len() as f32 / nonzero as f32
    };
    let values: Vec<f32> = q.iter().map(|v| v * scale).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}
