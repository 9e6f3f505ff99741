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

/// Bytes of the weights [`load_export`] holds: every parameter as an `f32`.
pub fn latent_bytes(config: &crate::TritterConfig) -> u64 {
    4 * config.parameter_count() as u64
}

/// Refuses to load `config`'s latent weights into host memory that has only `available`
/// bytes to give: the load would swap or be killed. The packed engine holds the 2-bit
/// codes instead, or streams them through a budget.
pub fn check_latent_fits(config: &crate::TritterConfig, available: u64) -> Result<()> {
    let latent = latent_bytes(config);
    if latent > available {
        anyhow::bail!(
            "resident generation holds the latent weights in f32, {}, more than the {} of memory available; \
             --memory-budget runs the packed engine on the 2-bit codes instead (streaming them when they do not fit)",
            super::ByteSize(latent),
            super::ByteSize(available)
        );
    }
    Ok(())
}

/// An exported model, loaded.
pub struct LoadedModel<B: Backend> {
    pub model: TritterModel<B>,
    pub tokenizer: Box<dyn Tokenizer>,
    pub tokenizer_spec: TokenizerSpec,
}

/// Opens the exported model at `path` and loads it ([`load_model_file`]).
pub fn load_export<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    load_model_file(&ModelFile::open(path)?, device)
}

/// Loads an opened export: every parameter as an `f32` on `device`
/// ([`latent_bytes`] of them), each tensor's bytes checked as it is read.
pub fn load_model_file<B: Backend>(file: &ModelFile, device: &B::Device) -> Result<LoadedModel<B>> {
    let path = &file.path;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_weights_larger_than_the_memory_available_are_refused() {
        let config = crate::TritterConfig::preset("3B", 32_000).unwrap();
        let latent = latent_bytes(&config);
        assert_eq!(latent, 4 * config.parameter_count() as u64);
        assert!(check_latent_fits(&config, latent).is_ok());
        let err = check_latent_fits(&config, latent - 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--memory-budget") && err.contains("GiB"),
            "{err}"
        );
    }
}
