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
//!
//! The data holds the f32 tensors first, then every BitLinear's codes, each by name;
//! the codes start a multiple of [`CODES_ALIGN`] bytes into the file, the header padded
//! with spaces to put them there. Readers go by the header's offsets, so any safetensors
//! file with these tensors loads.

use crate::infer::model_file::evict_cached_pages;
use crate::model::bitlinear::BitLinear;
use crate::model::block::Block;
use crate::model::{TritterConfig, TritterModel};
use crate::train::data::splitmix_stream;
use anyhow::{Context, Result};
use burn::prelude::*;
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tritter_kernels::reference::ternary_quantize_scaled;
use xxhash_rust::xxh3::xxh3_64;

pub const FORMAT: &str = "tritter-ternary-v1";

/// Where in the file the packed codes start: a multiple of a cache line.
pub const CODES_ALIGN: usize = 64;

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

/// The BitLinear layers of a block, in the order of [`TritterConfig::bitlinear_shapes`]
/// (the file holds their tensors by name).
pub const BITLINEAR_NAMES: [&str; 4] = ["attn.qkv", "attn.out", "ffn.gate_up", "ffn.down"];

/// The tensors of one BitLinear of an export: layer `layer`'s `name` (one of
/// [`BITLINEAR_NAMES`]), a `[d_out, d_in]` matrix stored as packed codes
/// `[d_out, ceil(d_in / 4)]` (U8), its scale γ (F32 `[1]`) and its input RMSNorm's gain
/// (F32 `[d_in]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitLinearTensors {
    pub layer: usize,
    pub name: &'static str,
    pub d_in: usize,
    pub d_out: usize,
}

impl BitLinearTensors {
    /// The BitLinears of layer `layer` of a model of `config`, in the order of
    /// [`BITLINEAR_NAMES`].
    pub fn of_layer(config: &TritterConfig, layer: usize) -> impl Iterator<Item = Self> {
        BITLINEAR_NAMES
            .into_iter()
            .zip(config.bitlinear_shapes())
            .map(move |(name, (d_in, d_out))| Self {
                layer,
                name,
                d_in,
                d_out,
            })
    }

    /// Every BitLinear of a model of `config`, layer by layer (the order the engine
    /// reads them in), each layer's in the order of [`BITLINEAR_NAMES`].
    pub fn all(config: &TritterConfig) -> impl Iterator<Item = Self> + '_ {
        (0..config.num_layers).flat_map(|layer| Self::of_layer(config, layer))
    }

    /// The packed codes' tensor.
    pub fn weight(&self) -> String {
        self.tensor("weight")
    }

    /// γ's tensor.
    pub fn scale(&self) -> String {
        self.tensor("scale")
    }

    /// The input RMSNorm gain's tensor.
    pub fn norm(&self) -> String {
        self.tensor("norm")
    }

    /// Bytes of one row of packed codes.
    pub fn row_bytes(&self) -> usize {
        self.d_in.div_ceil(4)
    }

    fn tensor(&self, part: &str) -> String {
        format!("blocks.{}.{}.{part}", self.layer, self.name)
    }
}

/// The BitLinear layers of a block with their names, in the order of [`BITLINEAR_NAMES`].
pub fn block_bitlinears<B: Backend>(block: &Block<B>) -> [(&'static str, &BitLinear<B>); 4] {
    let [qkv, out, gate_up, down] = BITLINEAR_NAMES;
    [
        (qkv, &block.attn.qkv),
        (out, &block.attn.out),
        (gate_up, &block.ffn.gate_up),
        (down, &block.ffn.down),
    ]
}

/// Tensors of an export, with the checksums written beside them.
#[derive(Default)]
pub struct ExportWriter {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl ExportWriter {
    pub fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) {
        self.tensors.push((name, dtype, shape, bytes));
    }

    pub fn push_f32(&mut self, name: String, shape: Vec<usize>, values: &[f32]) {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push(name, Dtype::F32, shape, bytes);
    }

    /// A BitLinear's three tensors: packed codes, scale, norm.
    pub fn push_bitlinear(
        &mut self,
        t: &BitLinearTensors,
        packed: Vec<u8>,
        gamma: f32,
        norm: &[f32],
    ) {
        self.push(t.weight(), Dtype::U8, vec![t.d_out, t.row_bytes()], packed);
        self.push_f32(t.scale(), vec![1], &[gamma]);
        self.push_f32(t.norm(), vec![t.d_in], norm);
    }

    /// Writes the file through a temporary one, renamed when complete. The metadata
    /// holds `format`, `config`, `tokenizer` (and `tokenizer_json`) and `checksums`:
    /// the xxh3-64 of every tensor's bytes, so a corrupt tensor is found by name.
    ///
    /// The tensors lie in the order the safetensors crate writes them in (the f32 ones,
    /// then the packed codes, each by name), and the header is padded with spaces (as
    /// the format allows) so that the codes start on a cache line: where every matrix
    /// is a whole number of lines, as in every preset, the product's 64-byte loads from
    /// the file's pages never straddle two.
    ///
    /// Not layer by layer: streamed from storage with the page cache dropped, the
    /// kernel's read-ahead through a file laid out in the order the engine reads it ran
    /// beside the product and slowed batch-16 decode of the 3B preset by a fifth (2 cores
    /// of an EPYC, ext4 on a virtual disk); in name order, or in reverse layer order,
    /// it did not.
    pub fn write(
        self,
        config: &TritterConfig,
        tokenizer: &tritter_data::TokenizerSpec,
        tokenizer_json: Option<&str>,
        path: &Path,
    ) -> Result<u64> {
        check_out_path(path)?;
        let checksums: BTreeMap<&str, String> = self
            .tensors
            .iter()
            .map(|(name, _, _, bytes)| (name.as_str(), format!("{:016x}", xxh3_64(bytes))))
            .collect();
        let mut metadata = BTreeMap::from([
            ("format", FORMAT.to_string()),
            ("config", serde_json::to_string(config)?),
            ("tokenizer", serde_json::to_string(tokenizer)?),
            ("checksums", serde_json::to_string(&checksums)?),
        ]);
        if let Some(json) = tokenizer_json {
            metadata.insert("tokenizer_json", json.to_string());
        }
        // The widest elements first, so that every tensor is aligned to its own.
        let mut tensors: Vec<_> = self.tensors.iter().collect();
        tensors.sort_by(|(a, a_type, _, _), (b, b_type, _, _)| {
            (b_type.bitsize(), a).cmp(&(a_type.bitsize(), b))
        });
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(&metadata)?);
        let (mut offset, mut codes_at) = (0, None);
        for (name, dtype, shape, bytes) in &tensors {
            if *dtype == Dtype::U8 {
                codes_at.get_or_insert(offset);
            }
            let end = offset + bytes.len();
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] }),
            );
            offset = end;
        }
        let mut header = serde_json::to_vec(&header)?;
        let codes_at = 8 + header.len() + codes_at.unwrap_or(offset);
        header.resize(
            header.len() + codes_at.next_multiple_of(CODES_ALIGN) - codes_at,
            b' ',
        );

        let tmp = path.with_extension("safetensors.partial");
        let write = || -> std::io::Result<std::fs::File> {
            let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            for (_, _, _, bytes) in &tensors {
                out.write_all(bytes)?;
            }
            let written = out.into_inner().map_err(|e| e.into_error())?;
            // On the disk before it replaces what `path` held: a crash leaves the old
            // file or the new one whole, never a torn one under the old name.
            written.sync_all()?;
            Ok(written)
        };
        let written = write()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent(path);
        let bytes = written.metadata()?.len();
        // Written pages sit in the page cache in 4 KiB folios, which a mapping reads
        // slower than the large ones a read from disk brings in (about 0.7x the tokens/s
        // streaming the 3B preset at batch 1 on 2 cores of an EPYC, for as long as they
        // stay cached): they leave it, so the first run reads the file in afresh.
        evict_cached_pages(&written, 0, bytes as usize);
        Ok(bytes)
    }
}

/// Refuses an export destination that cannot become a file (see
/// [`tritter_data::error::check_output_file`]).
pub fn check_out_path(path: &Path) -> Result<()> {
    tritter_data::error::check_output_file(path, "--out", "model.safetensors")
        .map_err(anyhow::Error::msg)
}

/// Makes the rename of a file in `path`'s directory durable (Unix: the directory's
/// entries are synced; elsewhere a rename is durable with the file).
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

fn f32_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 tensor")
}

/// Writes `model` to `path` (through a temporary file, renamed when complete).
pub fn export_model<B: Backend>(
    model: &TritterModel<B>,
    tokenizer: &tritter_data::TokenizerSpec,
    tokenizer_json: Option<&str>,
    path: &Path,
) -> Result<u64> {
    let mut out = ExportWriter::default();
    let full = |out: &mut ExportWriter, name: String, shape: &[usize], values: Vec<f32>| {
        out.push_f32(name, shape.to_vec(), &values);
    };
    let emb = &model.embedding.weight;
    full(
        &mut out,
        "embedding.weight".into(),
        &emb.dims(),
        f32_values(emb.val()),
    );
    if let Some(head) = &model.lm_head {
        full(
            &mut out,
            "lm_head.weight".into(),
            &head.weight.dims(),
            f32_values(head.weight.val()),
        );
    }
    let norm = &model.norm.gamma;
    full(
        &mut out,
        "norm.gamma".into(),
        &norm.dims(),
        f32_values(norm.val()),
    );
    for (i, block) in model.blocks.iter().enumerate() {
        for (name, norm) in [
            ("attn.q_norm", &block.attn.q_norm),
            ("attn.k_norm", &block.attn.k_norm),
            ("attn_norm", &block.attn_norm),
            ("ffn_norm", &block.ffn_norm),
        ] {
            let g = &norm.gamma;
            full(
                &mut out,
                format!("blocks.{i}.{name}.gamma"),
                &g.dims(),
                f32_values(g.val()),
            );
        }
    }
    for (i, block) in model.blocks.iter().enumerate() {
        for (name, layer) in block_bitlinears(block) {
            let [d_in, d_out] = layer.weight.dims();
            let (q, gamma) = ternary_quantize_scaled(layer.weight.val(), layer.scale);
            let q = f32_values(q.transpose());
            let tensors = BitLinearTensors {
                layer: i,
                name,
                d_in,
                d_out,
            };
            out.push_bitlinear(
                &tensors,
                pack_ternary(&q, d_out, d_in),
                f32_values(gamma)[0],
                &f32_values(layer.norm.gamma.val()),
            );
        }
    }
    out.write(&model.config, tokenizer, tokenizer_json, path)
}

/// Writes an export of `config` with random weights, straight to packed codes: models of
/// any size without building them in f32 (for tests and benchmarks of inference).
/// Codes are drawn near-uniformly from {−1, 0, 1}, γ keeps unit output variance, the
/// embedding is N(0, 1)-like and norms are 1. Deterministic in `seed`.
pub fn write_random_export(config: &TritterConfig, seed: u64, path: &Path) -> Result<u64> {
    let mut next = splitmix_stream(seed);
    // The 81 bytes made of valid codes only.
    let valid: Vec<u8> = (0..=255u8).filter(|b| b & (b >> 1) & 0x55 == 0).collect();
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Irwin–Hall approximation of a normal: sum of 4 uniforms.
                let u = next();
                let s: f32 = (0..4)
                    .map(|k| ((u >> (16 * k)) & 0xffff) as f32 / 65535.0)
                    .sum();
                (s - 2.0) * std * 3f32.sqrt()
            })
            .collect()
    };
    let (v, h, hd) = (config.vocab_size, config.hidden_size, config.head_dim());
    let mut out = ExportWriter::default();
    out.push_f32("embedding.weight".into(), vec![v, h], &normal(v * h, 1.0));
    if !config.tie_embeddings {
        out.push_f32(
            "lm_head.weight".into(),
            vec![h, v],
            &normal(h * v, 1.0 / (h as f32).sqrt()),
        );
    }
    out.push_f32("norm.gamma".into(), vec![h], &vec![1.0; h]);
    for i in 0..config.num_layers {
        for (name, d) in [
            ("attn.q_norm", hd),
            ("attn.k_norm", hd),
            ("attn_norm", h),
            ("ffn_norm", h),
        ] {
            out.push_f32(format!("blocks.{i}.{name}.gamma"), vec![d], &vec![1.0; d]);
        }
    }
    let mut next = splitmix_stream(seed ^ 0x5151_5151);
    for t in BitLinearTensors::all(config) {
        let (d_in, row_bytes) = (t.d_in, t.row_bytes());
        let mut packed = vec![0u8; t.d_out * row_bytes];
        for chunk in packed.chunks_mut(8) {
            let r = next().to_le_bytes();
            for (b, r) in chunk.iter_mut().zip(r) {
                *b = valid[(r as usize * valid.len()) >> 8];
            }
        }
        if d_in % 4 != 0 {
            // Padding codes are 1 (= 0), as the exporter writes them.
            let keep = d_in % 4;
            for row in packed.chunks_mut(row_bytes) {
                let last = row.last_mut().expect("row");
                let mask = (1u8 << (2 * keep)) - 1;
                *last = (*last & mask) | (0x55 & !mask);
            }
        }
        let gamma = (1.5 / d_in as f32).sqrt();
        out.push_bitlinear(&t, packed, gamma, &vec![1.0; d_in]);
    }
    out.write(config, &tritter_data::TokenizerSpec::Byte, None, path)
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

    /// A standard reader (the safetensors crate) reads every tensor of an export; the
    /// f32 tensors come first, then the codes, by name, from a cache line on.
    #[test]
    fn codes_follow_the_f32_tensors_by_name_from_a_cache_line() {
        use safetensors::SafeTensors;
        // Every matrix a whole number of cache lines (rows of 64 or 128 bytes).
        let config = TritterConfig::preset("test", 264).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_random_export(&config, 4, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let model = crate::infer::model_file::ModelFile::open(&path).unwrap();
        let mut f32_end = 0;
        for (name, view) in file.tensors() {
            assert_eq!(view.data(), model.bytes(&name).unwrap(), "{name}");
            let at = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            if view.dtype() == Dtype::F32 {
                assert_eq!((at - data_start) % 4, 0, "{name} at {at}");
                f32_end = f32_end.max(at + view.data().len());
            }
        }
        let mut at = f32_end;
        assert_eq!(at % CODES_ALIGN, 0, "the codes start at byte {at}");
        let mut codes: Vec<String> = BitLinearTensors::all(&config).map(|t| t.weight()).collect();
        codes.sort();
        for name in codes {
            let view = file.tensor(&name).unwrap();
            assert_eq!(view.dtype(), Dtype::U8);
            assert_eq!(
                view.data().as_ptr() as usize - bytes.as_ptr() as usize,
                at,
                "{name}"
            );
            assert_eq!(view.data().len() % CODES_ALIGN, 0, "{name}");
            at += view.data().len();
        }
        assert_eq!(at, bytes.len());
    }

    /// An export leaves the page cache once written, so the first run reads it in afresh
    /// (in large folios where the filesystem has them) instead of mapping the 4 KiB ones
    /// writing left. A file written plainly stays cached, which shows the check can fail.
    #[test]
    fn an_export_leaves_the_page_cache_once_written() {
        use crate::infer::model_file::ModelFile;
        use crate::model::ConfigOverrides;
        let config = TritterConfig::preset("test", 264)
            .unwrap()
            .with_overrides(&ConfigOverrides {
                hidden_size: Some(512),
                num_layers: Some(8),
                num_heads: Some(4),
                num_kv_heads: Some(2),
                ffn_size: Some(2048),
                ..Default::default()
            });
        let dir = tempfile::tempdir().unwrap();
        let exported = dir.path().join("m.safetensors");
        let bytes = write_random_export(&config, 9, &exported).unwrap() as usize;
        assert!(bytes > 4 << 20, "{bytes} bytes");
        let cached = |path: &Path| {
            let file = ModelFile::open(path).unwrap();
            file.cached_bytes(0..file.len())
        };
        let exported_cached = cached(&exported);

        let plain = dir.path().join("plain.safetensors");
        let file = std::fs::File::create(&plain).unwrap();
        std::io::Write::write_all(&mut &file, &std::fs::read(&exported).unwrap()).unwrap();
        file.sync_all().unwrap();
        let plain_cached = cached(&plain);
        evict_cached_pages(&file, 0, bytes);
        if cached(&plain) > bytes / 4 {
            eprintln!(
                "the filesystem under {} keeps evicted pages",
                dir.path().display()
            );
            return;
        }
        assert!(plain_cached > bytes / 2, "{plain_cached} of {bytes} cached");
        assert!(
            exported_cached < bytes / 4,
            "{exported_cached} of {bytes} bytes still cached after the export"
        );
    }
}
