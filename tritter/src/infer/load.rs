//! Loading an exported model: every tensor checked for presence, dtype and size, the
//! ternary weights unpacked to `Wq · γ` with `γ` fixed, so the model computes exactly
//! what the exporting model computed.

use super::model_file::ModelFile;
use crate::export::{unpack_ternary, BitLinearTensors};
use crate::model::TritterModel;
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use anyhow::{anyhow, Result};
use burn::module::Param;
use burn::prelude::*;
use std::path::Path;

/// An exported model, loaded.
pub struct LoadedModel<B: Backend> {
    pub model: TritterModel<B>,
    pub tokenizer: Box<dyn Tokenizer>,
    pub tokenizer_spec: TokenizerSpec,
}

pub fn load_export<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    let file = ModelFile::open(path)?;
    let config = file.config.clone();
    let param1 = |name: &str, n: usize| -> Result<Param<Tensor<B, 1>>> {
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(file.f32s(name)?, [n]),
            device,
        )))
    };
    let param2 = |name: &str, shape: [usize; 2]| -> Result<Param<Tensor<B, 2>>> {
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(file.f32s(name)?, shape),
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
        let layers = [
            &mut block.attn.qkv,
            &mut block.attn.out,
            &mut block.ffn.gate_up,
            &mut block.ffn.down,
        ];
        for (t, layer) in BitLinearTensors::of_layer(&config, i).zip(layers) {
            let (d_in, d_out) = (t.d_in, t.d_out);
            let packed = file.bytes(&t.weight())?;
            let q = unpack_ternary(packed, d_out, d_in).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{}` holds an invalid ternary code",
                    path.display(),
                    t.weight()
                )
            })?;
            let gamma = file.f32s(&t.scale())?[0];
            layer.norm.gamma = param1(&t.norm(), d_in)?;
            let values: Vec<f32> = q.iter().map(|v| v * gamma).collect();
            layer.weight = Param::from_tensor(
                Tensor::<B, 2>::from_data(TensorData::new(values, [d_out, d_in]), device)
                    .transpose(),
            );
            layer.scale = Some(gamma);
        }
    }
    Ok(LoadedModel {
        model,
        tokenizer: file.tokenizer()?,
        tokenizer_spec: file.tokenizer_spec.clone(),
    })
}
