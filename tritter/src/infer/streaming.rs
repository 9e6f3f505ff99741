//! Streaming inference: a model larger than the memory it may use runs layer group by
//! layer group. The resident parts (embedding, final norm, LM head) and every layer's KV
//! cache stay on the device; the packed layers come from the memory-mapped export in
//! groups, the next group loading on the [`LayerLoader`]'s thread while the current one
//! computes. Two sets of group buffers exist, swapped: the loader hands a group over
//! through a rendezvous channel, and the engine hands each computed group back so the
//! loader refills its buffers with the group after next. On a backend that computes on
//! host memory ([`TritterBackend::computes_in_place`]), the buffers are the file's own
//! mapped pages: the loader brings a group's pages into memory, the products read them in
//! place, and the engine drops them from its resident set when it hands the group back.
//!
//! Each pass through the groups serves every sequence of the batch: the BitLinear
//! products run on all sequences' rows at once (one weight transfer, one unpacking of
//! each weight row), attention runs per sequence against its own cache. Prompts are
//! processed in chunks of `prefill_chunk` tokens per layer, so activations stay bounded.

use super::budget::{plan, DeviceMemory, MemoryPlan, PlanRequest};
use super::generate::{Sampler, SamplingConfig};
use super::kv_cache::{KvCache, LayerCache};
use super::model_file::ModelFile;
use crate::export::BitLinearTensors;
use crate::model::attention::{attention_mask, contiguous, rope_row, Heads};
use crate::model::bitlinear::rms_norm;
use crate::model::ffn::squared_relu_gate;
use crate::model::TritterConfig;
use anyhow::{anyhow, bail, Result};
use burn::module::Param;
use burn::nn::RmsNorm;
use burn::prelude::*;
use rayon::prelude::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SendError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tritter_kernels::packed::{MappedCodes, PackedStorage};
use tritter_kernels::reference::mask_tensor;
use tritter_kernels::{AttentionMask, MaskMod, PackedTernary, TritterBackend};

/// A BitLinear with its weights packed on the device.
pub struct PackedLinear<B: TritterBackend> {
    pub weight: PackedTernary<B>,
    pub norm: RmsNorm<B>,
}

impl<B: TritterBackend> PackedLinear<B> {
    /// `[rows, d_in]` → `[rows, d_out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        B::ternary_packed_matmul(rms_norm(&self.norm, x), &self.weight)
    }
}

/// One transformer block on the device, weights packed.
pub struct LayerWeights<B: TritterBackend> {
    pub index: usize,
    /// `attn.qkv`, `attn.out`, `ffn.gate_up`, `ffn.down`.
    pub linears: [PackedLinear<B>; 4],
    pub q_norm: RmsNorm<B>,
    pub k_norm: RmsNorm<B>,
    pub attn_norm: RmsNorm<B>,
    pub ffn_norm: RmsNorm<B>,
    /// Bytes held on the device.
    pub bytes: usize,
}

fn load_norm<B: Backend>(file: &ModelFile, name: &str, device: &B::Device) -> Result<RmsNorm<B>> {
    let norm = read_norm(file, name, device)?;
    file.release(name);
    Ok(norm)
}

/// [`load_norm`] leaving the tensor's pages mapped, for the caller to release.
fn read_norm<B: Backend>(file: &ModelFile, name: &str, device: &B::Device) -> Result<RmsNorm<B>> {
    let values = file.f32s(name)?;
    let n = values.len();
    Ok(RmsNorm {
        gamma: Param::from_tensor(Tensor::from_data(TensorData::new(values, [n]), device)),
        epsilon: file.config.norm_eps,
    })
}

impl<B: TritterBackend> LayerWeights<B> {
    /// Moves block `index` from the file to the device; the codes travel packed. The
    /// file pages read are released from this process's resident set.
    pub fn load(file: &Arc<ModelFile>, index: usize, device: &B::Device) -> Result<Self> {
        Self::load_into(file, index, device, None, false)
    }

    /// [`LayerWeights::load`] into the device buffers of a layer no longer used. With
    /// `in_place`, on a backend that computes on mapped pages
    /// ([`TritterBackend::ternary_map`]), the packed codes are only brought into memory
    /// and stay there, in the file's mapping, until their group is released
    /// ([`LayerLoader::recycle`]).
    pub fn load_into(
        file: &Arc<ModelFile>,
        index: usize,
        device: &B::Device,
        previous: Option<Self>,
        in_place: bool,
    ) -> Result<Self> {
        let c = &file.config;
        let mut bytes = 0;
        let mut linears = Vec::with_capacity(4);
        // The scales and norms read, unmapped together once the layer is loaded. Their
        // pages must leave the resident set like every other tensor's: left mapped, they
        // would also hold in the page cache the folios they share with their neighbours.
        let mut read = Vec::with_capacity(12);
        // The codes copied to the device, released again once the layer's norms are
        // unmapped: a folio they share with a norm stays in the page cache while the
        // norm is mapped, and storage reads must not find it there on the next pass.
        let mut copied = Vec::with_capacity(4);
        let norm_of = |name: &str, read: &mut Vec<std::ops::Range<usize>>| {
            read.push(file.range(name)?);
            read_norm::<B>(file, name, device)
        };
        let mut previous = previous.map(|p| Vec::from(p.linears).into_iter());
        for t in BitLinearTensors::of_layer(c, index) {
            let (d_in, d_out) = (t.d_in, t.d_out);
            let (weight_name, scale_name) = (t.weight(), t.scale());
            let gamma = file.f32s(&scale_name)?[0];
            read.push(file.range(&scale_name)?);
            file.populate(&weight_name);
            // Verified here the first time (on the loader's thread, for streamed groups).
            let range = file.verified_range(&weight_name)?;
            let data = &(**file).as_ref()[range.clone()];
            let old = previous.as_mut().and_then(Iterator::next);
            let mapped = if in_place {
                let codes = MappedCodes::new(file.clone(), range.clone());
                B::ternary_map(codes, d_out, d_in, gamma)
            } else {
                None
            };
            let weight = match (mapped, old) {
                (Some(weight), _) => weight,
                (None, Some(old)) => B::ternary_reupload(old.weight, data, gamma, device),
                (None, None) => B::ternary_upload(data, d_out, d_in, gamma, device),
            };
            if !matches!(weight.storage, PackedStorage::Mapped(_)) {
                // The file pages just copied leave this process's resident set.
                file.release(&weight_name);
                copied.push(range);
            }
            let norm = norm_of(&t.norm(), &mut read)?;
            bytes += weight.stored_bytes() + 4 * d_in + 4;
            linears.push(PackedLinear { weight, norm });
        }
        let linears: [PackedLinear<B>; 4] = linears
            .try_into()
            .map_err(|_| anyhow!("four BitLinears per block"))?;
        let mut gamma = |name: &str| norm_of(&format!("blocks.{index}.{name}.gamma"), &mut read);
        let (h, hd) = (c.hidden_size, c.head_dim());
        let layer = Self {
            index,
            linears,
            q_norm: gamma("attn.q_norm")?,
            k_norm: gamma("attn.k_norm")?,
            attn_norm: gamma("attn_norm")?,
            ffn_norm: gamma("ffn_norm")?,
            bytes: bytes + 4 * (2 * hd + 2 * h),
        };
        file.unmap_all(read);
        if file.drops_page_cache() {
            file.release_all(copied);
        }
        Ok(layer)
    }

    /// Where in the file lie the codes computed in place.
    fn mapped_ranges(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        self.linears
            .iter()
            .filter_map(|linear| match &linear.weight.storage {
                PackedStorage::Mapped(codes) => Some(codes.range()),
                _ => None,
            })
    }

    /// The block on several sequences' rows at once: `xs[i]` `[len_i, hidden]` continues
    /// sequence `i`, appending to `caches[i]`, its rows rotated by `rope`'s rows (see
    /// [`ChunkRope`]). Everything but the attention itself (cache append, scores) runs on
    /// all rows together.
    fn forward(
        &self,
        config: &TritterConfig,
        xs: Vec<Tensor<B, 2>>,
        rope: &ChunkRope<B>,
        caches: Vec<&mut LayerCache<B>>,
    ) -> Vec<Tensor<B, 2>> {
        let heads = Heads::new(config);
        let (nh, nkv) = (heads.num_heads, heads.num_kv_heads);
        let lens: Vec<usize> = xs.iter().map(|x| x.dims()[0]).collect();
        let x = Tensor::cat(xs, 0);
        let [qkv, out, gate_up, down] = &self.linears;
        let qkv = qkv.forward(x.clone());

        // QK-norm and RoPE for every row at its own position.
        let (cos, sin) = (rope.cos.clone(), rope.sin.clone());
        let [q, k, v] = B::qk_norm_rotary(
            qkv,
            self.q_norm.gamma.val(),
            self.k_norm.gamma.val(),
            self.q_norm.epsilon,
            cos,
            sin,
            nh,
            nkv,
        );

        // One new position per sequence against host caches (the CPU's): every
        // sequence at once, on the thread pool. Otherwise sequence by sequence.
        let a = if lens.iter().all(|&len| len == 1) && caches.iter().all(|c| c.is_host()) {
            host_decode(q, k, v, caches, heads.sliding_window)
        } else {
            attend_each(&heads, &lens, q, k, v, caches)
        };
        let h = x + rms_norm(&self.attn_norm, out.forward(a));
        let f = down.forward(squared_relu_gate(
            gate_up.forward(h.clone()),
            config.ffn_size,
        ));
        let y = h + rms_norm(&self.ffn_norm, f);
        let mut outs = Vec::with_capacity(lens.len());
        let mut offset = 0;
        for len in lens {
            outs.push(y.clone().narrow(0, offset, len));
            offset += len;
        }
        outs
    }
}

/// Attention of each sequence's rows (`q` `[rows, heads, d]`, `k` and `v`
/// `[rows, kv_heads, d]`, sequence `i` the `lens[i]` rows after the previous ones) to its
/// own cache, after appending its keys and values: `[rows, heads·d]`.
fn attend_each<B: TritterBackend>(
    heads: &Heads,
    lens: &[usize],
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    caches: Vec<&mut LayerCache<B>>,
) -> Tensor<B, 2> {
    let (nh, nkv, hd) = (heads.num_heads, heads.num_kv_heads, heads.head_dim);
    let device = q.device();
    let mut attended = Vec::with_capacity(lens.len());
    let mut offset = 0;
    for (&len, cache) in lens.iter().zip(caches) {
        let heads_first = |t: &Tensor<B, 3>| {
            contiguous(t.clone().narrow(0, offset, len).swap_dims(0, 1)).unsqueeze::<4>()
        };
        cache.push(heads_first(&k), heads_first(&v));
        // Decode against an INT4 cache (codes dequantized inside the attention) or
        // the CPU's host f16 cache.
        let decoded = (len == 1)
            .then(|| {
                let q = q.clone().narrow(0, offset, 1).reshape([nh, hd]);
                cache.decode_attention(q, heads.sliding_window)
            })
            .flatten();
        let a = if let Some(out) = decoded {
            out.reshape([1, nh * hd])
        } else if len == 1 {
            let (k, v) = cache.keys_values();
            let kv_len = k.dims()[2];
            // Decode: the query sees the whole cache (or its window), so the query
            // heads sharing a key/value head attend as one group of rows — no
            // repeated keys and values.
            let group = nh / nkv;
            let q = q.clone().narrow(0, offset, 1).reshape([1, nkv, group, hd]);
            let mask = heads.sliding_window.filter(|&w| w < kv_len).map(|w| {
                mask_tensor::<B>(
                    &AttentionMask::new(MaskMod::sliding_window(w)),
                    [1, nkv, 1, kv_len],
                    &device,
                )
                .expand([1, nkv, group, kv_len])
            });
            B::tritter_attention(q, k, v, mask, false).reshape([1, nh * hd])
        } else {
            let (k, v) = cache.keys_values();
            let kv_len = k.dims()[2];
            let mask = AttentionMask::new(attention_mask(heads.sliding_window, kv_len));
            let a = B::flex_attention(heads_first(&q), k, v, &mask);
            a.reshape([nh, len, hd])
                .swap_dims(0, 1)
                .reshape([len, nh * hd])
        };
        attended.push(a);
        offset += len;
    }
    Tensor::cat(attended, 0)
}

/// Rotary tables `[rows, head_dim]` (`cos`, signed `sin`) of the rows of one chunk of a
/// pass, every live sequence's rows of the chunk one after another: the same in every
/// layer, so computed once a pass.
struct ChunkRope<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: TritterBackend> ChunkRope<B> {
    /// Each chunk's tables for a pass over `live`, chunk `c` of a sequence continuing it
    /// at `c · chunk` past its cached tokens.
    fn pass(
        live: &[Sequence<B>],
        chunk: usize,
        config: &TritterConfig,
        device: &B::Device,
    ) -> Vec<Self> {
        let head_dim = Heads::new(config).head_dim;
        let most = live.iter().map(|s| s.hidden.len()).max().unwrap_or(0);
        (0..most)
            .map(|c| {
                let positions: Vec<usize> = live
                    .iter()
                    .filter_map(|s| {
                        let rows = s.hidden.get(c)?.dims()[0];
                        debug_assert!(rows <= chunk, "chunks of at most {chunk} rows");
                        let start = s.cache.len() + c * chunk;
                        Some(start..start + rows)
                    })
                    .flatten()
                    .collect();
                let (cos, sin) = rope_tables(&positions, head_dim, config.rope_theta, device);
                Self { cos, sin }
            })
            .collect()
    }
}

/// Rotary tables `[rows, head_dim]` (`cos`, signed `sin`) for rows at `positions`.
fn rope_tables<B: Backend>(
    positions: &[usize],
    head_dim: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &p in positions {
        rope_row(p, head_dim, theta, &mut cos, &mut sin);
    }
    let table =
        |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [positions.len(), head_dim]), device);
    (table(cos), table(sin))
}

/// Decode attention of one new position per sequence (`q` `[rows, heads, d]`, `k` and `v`
/// `[rows, kv_heads, d]`, row `i` sequence `i`) against caches in host memory (the CPU's
/// f16 or INT4 cache): each sequence's keys and values appended and attended to on the
/// thread pool, sequences side by side. `[rows, heads·d]`.
fn host_decode<B: TritterBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    caches: Vec<&mut LayerCache<B>>,
    window: Option<usize>,
) -> Tensor<B, 2> {
    let device = q.device();
    let ([rows, nh, hd], nkv) = (q.dims(), k.dims()[1]);
    let host = |t: Tensor<B, 3>| -> Vec<f32> {
        t.into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 activations")
    };
    let (q, k, v) = (host(q), host(k), host(v));
    let mut hosts: Vec<_> = caches
        .into_iter()
        .map(|c| c.host_mut().expect("a host cache"))
        .collect();
    let mut out = vec![0f32; rows * nh * hd];
    out.par_chunks_mut(nh * hd)
        .zip(hosts.par_iter_mut())
        .enumerate()
        .for_each(|(i, (out, cache))| {
            let kv = i * nkv * hd..(i + 1) * nkv * hd;
            cache.append(&k[kv.clone()], &v[kv], 1);
            out.copy_from_slice(&cache.decode_attention(&q[i * nh * hd..][..nh * hd], nh, window));
        });
    Tensor::from_data(TensorData::new(out, [rows, nh * hd]), &device)
}

/// A group of consecutive layers on the device.
pub struct LayerGroup<B: TritterBackend> {
    pub index: usize,
    pub layers: Vec<LayerWeights<B>>,
}

impl<B: TritterBackend> LayerGroup<B> {
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes).sum()
    }

    /// Drops the file pages of codes computed in place from this process's resident
    /// set, once the device is done with them (and from the OS page cache too with
    /// [`ModelFile::set_drop_page_cache`]): one request for the layers that lie side by
    /// side in the file.
    fn release(&self, file: &ModelFile) {
        file.release_all(self.layers.iter().flat_map(LayerWeights::mapped_ranges));
    }
}

/// Loads group `index`, into `recycled`'s buffers where it has them.
fn load_group<B: TritterBackend>(
    file: &Arc<ModelFile>,
    index: usize,
    group_size: usize,
    device: &B::Device,
    recycled: Option<LayerGroup<B>>,
) -> Result<LayerGroup<B>> {
    let first = index * group_size;
    let last = (first + group_size).min(file.config.num_layers);
    let mut old = recycled.map(|g| g.layers.into_iter());
    Ok(LayerGroup {
        index,
        layers: (first..last)
            .map(|i| {
                let previous = old.as_mut().and_then(Iterator::next);
                LayerWeights::load_into(file, i, device, previous, true)
            })
            .collect::<Result<_>>()?,
    })
}

/// Time and bytes the loader thread spent moving the groups the engine took: counted as
/// each is taken, so a report never misses the last one nor counts one prefetched and
/// never used.
#[derive(Default)]
struct LoaderCounters {
    transfer_nanos: u64,
    bytes: u64,
}

/// A loaded group (or why it could not be), with the nanoseconds its load took.
type Loaded<B> = (Result<LayerGroup<B>>, u64);

/// Loads layer groups in order, cycling through the model, on its own thread: while the
/// engine computes group `g`, group `g + 1` is being read and moved to the device. The
/// hand-over is a rendezvous, so at most two groups are alive at once.
pub struct LayerLoader<B: TritterBackend> {
    rx: Option<Receiver<Loaded<B>>>,
    /// Spent groups go back to the loader, whose next group reuses their buffers: two
    /// sets of buffers, swapped.
    recycle: Sender<LayerGroup<B>>,
    handle: Option<JoinHandle<()>>,
    counters: LoaderCounters,
    wait_nanos: u64,
    file: Arc<ModelFile>,
}

impl<B: TritterBackend> LayerLoader<B> {
    pub fn spawn(file: Arc<ModelFile>, group_size: usize, device: B::Device) -> Self {
        let (tx, rx) = sync_channel(0);
        let (recycle, spent) = channel::<LayerGroup<B>>();
        let num_groups = file.config.num_layers.div_ceil(group_size);
        let loader_file = file.clone();
        let handle = std::thread::Builder::new()
            .name("tritter-layer-loader".into())
            .spawn(move || loop {
                for g in 0..num_groups {
                    let start = Instant::now();
                    // The uploads complete before the group is handed over: the engine
                    // computes on another thread (on GPUs, another stream).
                    let recycled = spent.try_recv().ok();
                    let group = load_group::<B>(&loader_file, g, group_size, &device, recycled)
                        .and_then(|g| {
                            B::sync(&device)
                                .map_err(|e| anyhow!("device error while loading: {e:?}"))?;
                            Ok(g)
                        });
                    let nanos = start.elapsed().as_nanos() as u64;
                    let failed = group.is_err();
                    if let Err(SendError((unsent, _))) = tx.send((group, nanos)) {
                        // The engine is done: the group prefetched for it leaves memory.
                        if let Ok(group) = unsent {
                            group.release(&loader_file);
                        }
                        return;
                    }
                    if failed {
                        return;
                    }
                }
            })
            .expect("spawning the layer loader");
        Self {
            rx: Some(rx),
            recycle,
            handle: Some(handle),
            counters: LoaderCounters::default(),
            wait_nanos: 0,
            file,
        }
    }

    /// The next group. The caller must drop the previous one first: the loader only
    /// starts the group after this one once this call has taken it.
    pub fn next_group(&mut self) -> Result<LayerGroup<B>> {
        let start = Instant::now();
        let group = self
            .rx
            .as_ref()
            .expect("loader running")
            .recv()
            .map_err(|_| anyhow!("the layer loader stopped"))?;
        self.wait_nanos += start.elapsed().as_nanos() as u64;
        let (group, nanos) = group;
        if let Ok(group) = &group {
            self.counters.transfer_nanos += nanos;
            self.counters.bytes += group.bytes() as u64;
        }
        group
    }
}

impl<B: TritterBackend> LayerLoader<B> {
    /// Hands a computed group back for its buffers to be reused, and drops the file
    /// pages of codes it computed on in place. The device must be done with it
    /// (synchronized).
    pub fn recycle(&self, group: LayerGroup<B>) {
        group.release(&self.file);
        // A loader that has stopped no longer needs buffers: the group is just dropped.
        let _ = self.recycle.send(group);
    }
}

impl<B: TritterBackend> Drop for LayerLoader<B> {
    fn drop(&mut self) {
        // Closing the channel makes the loader's next hand-over fail; it then exits.
        self.rx.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// What a generation cost and how well transfer hid behind compute.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Passes through the model: one prefill and one per decode step.
    pub passes: usize,
    pub first_token_secs: f64,
    /// End of the first pass (every prompt processed, one token each).
    pub prefill_secs: f64,
    pub total_secs: f64,
    /// Layer bytes moved to the device (0 when resident).
    pub bytes_streamed: u64,
    /// Time the loader spent moving them.
    pub transfer_secs: f64,
    /// Time the engine waited for a group.
    pub wait_secs: f64,
    /// Largest amount held on the device at once: resident parts, layer buffers, caches.
    pub peak_device_bytes: u64,
    /// Largest size of the KV caches of the batch (INT4 caches are in host memory).
    pub peak_kv_bytes: u64,
    pub streaming: bool,
}

impl StreamStats {
    pub fn tokens_per_sec(&self) -> f64 {
        self.generated_tokens as f64 / self.total_secs.max(1e-9)
    }

    /// Tokens per second after the prefill pass.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let tokens = self.generated_tokens.saturating_sub(self.batch);
        tokens as f64 / (self.total_secs - self.prefill_secs).max(1e-9)
    }

    /// Fraction of the transfer time hidden behind compute.
    pub fn overlap(&self) -> f64 {
        if self.transfer_secs <= 0.0 {
            return 1.0;
        }
        (1.0 - self.wait_secs / self.transfer_secs).clamp(0.0, 1.0)
    }

    /// Hidden transfer time over the shorter of transfer and compute: 100% when the
    /// shorter one is entirely overlapped by the longer (the most any schedule can hide).
    pub fn overlap_efficiency(&self) -> f64 {
        if self.transfer_secs <= 0.0 {
            return 1.0;
        }
        let compute = (self.total_secs - self.wait_secs).max(1e-9);
        let hidden = (self.transfer_secs - self.wait_secs).max(0.0);
        (hidden / self.transfer_secs.min(compute)).clamp(0.0, 1.0)
    }

    pub fn bytes_per_token(&self) -> f64 {
        self.bytes_streamed as f64 / self.generated_tokens.max(1) as f64
    }

    /// Bytes per second of the transfers themselves.
    pub fn transfer_bandwidth(&self) -> f64 {
        self.bytes_streamed as f64 / self.transfer_secs.max(1e-9)
    }
}

impl std::fmt::Display for StreamStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sequences, {} new tokens in {:.2} s ({:.2} tokens/s; {:.2} tokens/s after the prefill), first token after {:.3} s",
            self.batch,
            self.generated_tokens,
            self.total_secs,
            self.tokens_per_sec(),
            self.decode_tokens_per_sec(),
            self.first_token_secs
        )?;
        if self.streaming {
            write!(
                f,
                "; streamed {:.1} MiB ({:.2} MiB per token) at {:.2} GiB/s, {:.1}% of transfer time hidden behind compute (overlap efficiency {:.1}%)",
                self.bytes_streamed as f64 / (1 << 20) as f64,
                self.bytes_per_token() / (1 << 20) as f64,
                self.transfer_bandwidth() / (1u64 << 30) as f64,
                100.0 * self.overlap(),
                100.0 * self.overlap_efficiency()
            )?;
        }
        write!(
            f,
            "; peak {:.1} MiB held on the device, {:.2} MiB of it KV cache",
            self.peak_device_bytes as f64 / (1 << 20) as f64,
            self.peak_kv_bytes as f64 / (1 << 20) as f64
        )
    }
}

/// The result of [`StreamingEngine::generate`].
pub struct Generation {
    /// New tokens per sequence.
    pub tokens: Vec<Vec<u32>>,
    /// With `record_logits`: per sequence, the logits each new token was drawn from.
    pub logits: Vec<Vec<Vec<f32>>>,
    pub stats: StreamStats,
}

enum Layers<B: TritterBackend> {
    Resident(Vec<LayerWeights<B>>),
    Streamed { group_size: usize },
}

/// One sequence in flight.
struct Sequence<B: TritterBackend> {
    id: usize,
    /// Rows entering the next pass, in chunks of at most the prefill chunk: the prompt,
    /// then one token per step. Each layer replaces a chunk by its output, so a long
    /// prompt's rows are held once, not beside a copy.
    hidden: Vec<Tensor<B, 2>>,
    cache: KvCache<B>,
    sampler: Sampler,
}

/// Generation under a memory budget: resident when the plan fits every layer, streamed
/// in layer groups otherwise.
pub struct StreamingEngine<B: TritterBackend> {
    file: Arc<ModelFile>,
    pub plan: MemoryPlan,
    device: B::Device,
    embedding: Tensor<B, 2>,
    lm_head: Option<Tensor<B, 2>>,
    norm: RmsNorm<B>,
    resident_bytes: usize,
    layers: Layers<B>,
}

impl<B: TritterBackend> StreamingEngine<B> {
    /// Opens and checks `path`, then [`StreamingEngine::from_file`].
    pub fn open(path: &Path, request: PlanRequest, device: B::Device) -> Result<Self> {
        Self::from_file(Arc::new(ModelFile::open(path)?), request, device)
    }

    /// Plans the model into `request`'s budget (refusing a plan that does not fit before
    /// anything is allocated), and loads the resident parts — and every layer, when they
    /// all fit and streaming is not requested.
    pub fn from_file(
        file: Arc<ModelFile>,
        request: PlanRequest,
        device: B::Device,
    ) -> Result<Self> {
        crate::memory::return_freed_buffers();
        let config = &file.config;
        let plan = plan(config, &request, DeviceMemory::of::<B>())
            .map_err(|e| anyhow!("{}: {e}", file.path.display()))?;
        let (v, h) = (config.vocab_size, config.hidden_size);
        let matrix = |name: &str, shape: [usize; 2]| -> Result<Tensor<B, 2>> {
            let values = file.f32s(name)?;
            file.release(name);
            Ok(Tensor::from_data(TensorData::new(values, shape), &device))
        };
        let embedding = matrix("embedding.weight", [v, h])?;
        let lm_head = if config.tie_embeddings {
            None
        } else {
            Some(matrix("lm_head.weight", [h, v])?)
        };
        let norm = load_norm(&file, "norm.gamma", &device)?;
        let resident_bytes = 4 * (v * h * if config.tie_embeddings { 1 } else { 2 } + h);
        let layers = if plan.streaming {
            Layers::Streamed {
                group_size: plan.layer_group_size,
            }
        } else {
            Layers::Resident(
                (0..config.num_layers)
                    .map(|i| LayerWeights::load(&file, i, &device))
                    .collect::<Result<_>>()?,
            )
        };
        Ok(Self {
            file,
            plan,
            device,
            embedding,
            lm_head,
            norm,
            resident_bytes,
            layers,
        })
    }

    pub fn config(&self) -> &TritterConfig {
        &self.file.config
    }

    pub fn file(&self) -> &ModelFile {
        &self.file
    }

    fn embed(&self, ids: &[u32]) -> Tensor<B, 2> {
        let ids = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                ids.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [ids.len()],
            ),
            &self.device,
        );
        self.embedding.clone().select(0, ids)
    }

    /// Logits `[n, vocab]` from each sequence's last hidden row.
    fn logits(&self, last: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = rms_norm(&self.norm, last);
        match &self.lm_head {
            Some(head) => x.matmul(head.clone()),
            None => x.matmul(self.embedding.clone().transpose()),
        }
    }

    /// Generates up to `max_new` tokens after each prompt, all prompts together: every
    /// pass through the layers (one group transfer each) serves the whole batch. A
    /// sequence stops after `eos`. Sequence `i` samples with seed `sampling.seed + i`.
    /// `on_token(i, token)` sees each token as it comes.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new: usize,
        sampling: &SamplingConfig,
        eos: Option<u32>,
        record_logits: bool,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Generation> {
        let config = self.file.config.clone();
        sampling.check()?;
        if prompts.is_empty() {
            bail!("no prompts");
        }
        if prompts.len() > self.plan.batch {
            bail!(
                "{} prompts but the memory plan is for a batch of {}",
                prompts.len(),
                self.plan.batch
            );
        }
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                bail!("prompt {i} is empty");
            }
            if p.len() + max_new > self.plan.context {
                bail!(
                    "prompt {i} ({} tokens) + {max_new} new tokens exceeds the planned context of {} tokens",
                    p.len(),
                    self.plan.context
                );
            }
        }
        let mut stats = StreamStats {
            batch: prompts.len(),
            prompt_tokens: prompts.iter().map(Vec::len).sum(),
            streaming: self.plan.streaming,
            ..Default::default()
        };
        if max_new == 0 {
            // Nothing to sample: no pass runs (each pass ends by sampling a token).
            return Ok(Generation {
                tokens: vec![Vec::new(); prompts.len()],
                logits: vec![Vec::new(); prompts.len()],
                stats,
            });
        }
        let start = Instant::now();
        let chunk = self.plan.prefill_chunk.max(1);
        let mut live: Vec<Sequence<B>> = prompts
            .iter()
            .enumerate()
            .map(|(id, p)| Sequence {
                id,
                hidden: p.chunks(chunk).map(|ids| self.embed(ids)).collect(),
                cache: KvCache::with_storage(
                    config.num_layers,
                    self.plan.kv_cache,
                    p.len() + max_new,
                ),
                sampler: Sampler::new(SamplingConfig {
                    seed: sampling.seed.wrapping_add(id as u64),
                    ..sampling.clone()
                }),
            })
            .collect();
        let mut tokens = vec![Vec::new(); prompts.len()];
        let mut logits_out = vec![Vec::new(); prompts.len()];
        let mut loader = match &self.layers {
            Layers::Streamed { group_size } => Some(LayerLoader::<B>::spawn(
                self.file.clone(),
                *group_size,
                self.device.clone(),
            )),
            Layers::Resident(_) => None,
        };
        let (mut peak, mut peak_kv) = (0u64, 0u64);
        while !live.is_empty() {
            // One pass through every layer for every live sequence.
            let rope = ChunkRope::pass(&live, chunk, &config, &self.device);
            match (&self.layers, loader.as_mut()) {
                (Layers::Resident(layers), _) => {
                    let layer_bytes: usize = layers.iter().map(|l| l.bytes).sum();
                    in_pool::<B, _>(|| {
                        for layer in layers {
                            layer_pass(layer, &config, &mut live, &rope);
                        }
                    });
                    let cache: usize = live.iter().map(|s| s.cache.bytes()).sum();
                    peak = peak.max((self.resident_bytes + layer_bytes + cache) as u64);
                    peak_kv = peak_kv.max(cache as u64);
                }
                (Layers::Streamed { .. }, Some(loader)) => {
                    let mut previous_bytes = 0;
                    for _ in 0..self.plan.num_groups {
                        let group = loader.next_group()?;
                        in_pool::<B, _>(|| {
                            for layer in &group.layers {
                                layer_pass(layer, &config, &mut live, &rope);
                            }
                        });
                        // Every kernel reading this group finishes before its buffers
                        // are freed for the loader to reuse.
                        B::sync(&self.device)
                            .map_err(|e| anyhow!("device error while computing: {e:?}"))?;
                        // This group and the one loading beside it (at most as large as
                        // the larger of this one and the previous).
                        let bytes = group.bytes();
                        let cache: usize = live.iter().map(|s| s.cache.bytes()).sum();
                        let buffers = bytes + bytes.max(previous_bytes);
                        peak = peak.max((self.resident_bytes + buffers + cache) as u64);
                        peak_kv = peak_kv.max(cache as u64);
                        previous_bytes = bytes;
                        loader.recycle(group);
                    }
                }
                (Layers::Streamed { .. }, None) => unreachable!("streaming without a loader"),
            }
            stats.passes += 1;
            for s in live.iter_mut() {
                s.cache.advance(s.hidden.iter().map(|h| h.dims()[0]).sum());
            }
            let last = Tensor::cat(
                live.iter()
                    .map(|s| {
                        let h = s.hidden.last().expect("a sequence has rows");
                        h.clone().narrow(0, h.dims()[0] - 1, 1)
                    })
                    .collect(),
                0,
            );
            let vocab = config.vocab_size;
            let all: Vec<f32> = self
                .logits(last)
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 logits");
            let mut next_live = Vec::with_capacity(live.len());
            for (row, mut s) in live.into_iter().enumerate() {
                let logits = &all[row * vocab..(row + 1) * vocab];
                let token = s.sampler.sample(logits);
                if stats.generated_tokens == 0 {
                    stats.first_token_secs = start.elapsed().as_secs_f64();
                }
                stats.generated_tokens += 1;
                tokens[s.id].push(token);
                if record_logits {
                    logits_out[s.id].push(logits.to_vec());
                }
                on_token(s.id, token);
                if Some(token) != eos && tokens[s.id].len() < max_new {
                    s.hidden = vec![self.embed(&[token])];
                    next_live.push(s);
                }
            }
            live = next_live;
            if stats.passes == 1 {
                stats.prefill_secs = start.elapsed().as_secs_f64();
            }
        }
        if let Some(loader) = loader.take() {
            stats.transfer_secs = loader.counters.transfer_nanos as f64 * 1e-9;
            stats.bytes_streamed = loader.counters.bytes;
            stats.wait_secs = loader.wait_nanos as f64 * 1e-9;
        }
        stats.total_secs = start.elapsed().as_secs_f64();
        stats.peak_device_bytes = peak;
        stats.peak_kv_bytes = peak_kv;
        Ok(Generation {
            tokens,
            logits: logits_out,
            stats,
        })
    }
}

/// Runs `pass` on one of the CPU thread pool's workers where the device is the CPU, so
/// that the parallel loops inside it (the products, attention, the backend's
/// operations) start from a worker, which queues their tasks for the other workers,
/// instead of each waking the pool from outside and sleeping until it finishes (several
/// such loops a layer, every pass); the other workers stay with the pass
/// ([`help_until`]) rather than sleep between its loops. Elsewhere on the calling
/// thread: a GPU backend's work runs on the device, queued by the thread that submits
/// it.
fn in_pool<B: TritterBackend, R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    // The backends whose caches live in host memory are those that compute there.
    if !B::host_kv_cache() {
        return pass();
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let driver = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            let done = &done;
            s.spawn(move |_| {
                // Taken back by the pass's own thread, the pass is beneath this frame.
                if rayon::current_thread_index() != driver {
                    help_until(done);
                }
            });
        }
        // Set on return and when the pass unwinds alike.
        let _done = SetOnDrop(&done);
        pass()
    })
}

/// Runs the pool's tasks on this worker as soon as they are queued, until `done` or until
/// none has come for [`HELP_IDLE`]: the parallel loops of a pass start every few tens of
/// microseconds, the serial work between them (norms, the gate, rotary embedding) too
/// short for a worker that went to sleep to be woken in time, which left one core idle
/// through much of each product. Past [`HELP_SPIN`] without a task it polls between
/// naps, which leave its core idle, so that the scheduler can move a thread waiting for
/// a core there (the loader's, which polling alone kept waiting behind the pass: the
/// share of transfer time hidden fell from 88% to none in one streamed run of three).
/// The limit ends waits that nothing will end, such as a wait on a pass whose task this
/// thread holds further down.
fn help_until(done: &AtomicBool) {
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let idle = idle_since.get_or_insert_with(Instant::now).elapsed();
        if idle > HELP_IDLE {
            return;
        } else if idle > HELP_SPIN {
            std::thread::sleep(HELP_NAP);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// How long [`help_until`] polls for tasks that do not come: at all, without napping,
/// and the length of a nap.
const HELP_IDLE: Duration = Duration::from_millis(1);
const HELP_SPIN: Duration = Duration::from_micros(200);
const HELP_NAP: Duration = Duration::from_micros(20);

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// One layer over every live sequence: prompts in their chunks (of at most `chunk`
/// rows), each chunk of all sequences in one batched product. Each chunk's output
/// replaces its input.
fn layer_pass<B: TritterBackend>(
    layer: &LayerWeights<B>,
    config: &TritterConfig,
    live: &mut [Sequence<B>],
    rope: &[ChunkRope<B>],
) {
    for (c, rope) in rope.iter().enumerate() {
        let mut xs = Vec::new();
        let mut caches = Vec::new();
        let mut members = Vec::new();
        for (i, s) in live.iter_mut().enumerate() {
            let Some(x) = s.hidden.get(c) else {
                continue;
            };
            xs.push(x.clone());
            caches.push(s.cache.layer_mut(layer.index));
            members.push(i);
        }
        let ys = layer.forward(config, xs, rope, caches);
        for (i, y) in members.into_iter().zip(ys) {
            live[i].hidden[c] = y;
        }
    }
}

#[cfg(test)]
mod tests_support {
    use super::*;
    use crate::infer::budget::{KvCacheType, PlanRequest};
    use crate::model::ConfigOverrides;
    use crate::TestBackend as B;

    pub fn small(sliding_window: Option<usize>) -> TritterConfig {
        let mut c = TritterConfig::preset("test", 264)
            .unwrap()
            .with_overrides(&ConfigOverrides {
                hidden_size: Some(64),
                num_layers: Some(4),
                num_heads: Some(4),
                num_kv_heads: Some(2),
                ffn_size: Some(96),
                ..Default::default()
            });
        c.sliding_window = sliding_window;
        c
    }

    pub fn request(budget: u64, group: Option<usize>, kv: KvCacheType) -> PlanRequest {
        PlanRequest {
            budget,
            context: 40,
            batch: 3,
            kv_cache: kv,
            layer_group_size: group,
            stream: false,
            prefill_chunk: 5,
        }
    }

    pub fn prompts() -> Vec<Vec<u32>> {
        vec![
            (0..13).map(|t| 8 + t * 17 % 250).collect(),
            vec![1, 5, 70, 80],
            (0..21).map(|t| 8 + t * 29 % 250).collect(),
        ]
    }

    pub fn run(path: &Path, req: PlanRequest, stream: bool, prompts: &[Vec<u32>]) -> Generation {
        run_on::<B>(path, req, stream, prompts, Default::default())
    }

    pub fn run_on<E: TritterBackend>(
        path: &Path,
        req: PlanRequest,
        stream: bool,
        prompts: &[Vec<u32>],
        device: E::Device,
    ) -> Generation {
        run_for::<E>(path, req, stream, prompts, 8, device)
    }

    /// Greedy generation of up to `max_new` tokens, with logits.
    pub fn run_for<E: TritterBackend>(
        path: &Path,
        req: PlanRequest,
        stream: bool,
        prompts: &[Vec<u32>],
        max_new: usize,
        device: E::Device,
    ) -> Generation {
        let mut engine =
            StreamingEngine::<E>::open(path, PlanRequest { stream, ..req }, device).unwrap();
        engine
            .generate(
                prompts,
                max_new,
                &SamplingConfig::default(),
                None,
                true,
                |_, _| {},
            )
            .unwrap()
    }

    pub fn max_rel_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]) -> f32 {
        a.iter()
            .zip(b)
            .flat_map(|(sa, sb)| sa.iter().zip(sb))
            .fold(0f32, |m, (la, lb)| {
                m.max(crate::infer::agreement::rel_diff(la, lb))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;
    use super::*;
    use crate::export::write_random_export;
    use crate::infer::budget::KvCacheType;
    use crate::TestBackend as B;

    /// A pass on the CPU runs on the pool with the other workers helping: its parallel
    /// loops give their results, and a pass that panics unwinds to the caller instead of
    /// leaving the helpers polling for it.
    #[test]
    fn passes_run_on_the_pool_and_unwind_from_it() {
        let sum = in_pool::<B, _>(|| (0..10_000u64).into_par_iter().sum::<u64>());
        assert_eq!(sum, 10_000 * 9_999 / 2);
        let caught = std::panic::catch_unwind(|| {
            in_pool::<B, _>(|| {
                (0..64)
                    .into_par_iter()
                    .for_each(|i| assert!(i < 32, "task {i}"));
            })
        });
        assert!(caught.is_err(), "the pass's panic reached the caller");
    }

    /// A worker that would help a pass which never ends (one whose task it holds further
    /// down its own stack) leaves it once no task has come for a while.
    #[test]
    fn helpers_leave_a_pass_that_never_ends() {
        let never = AtomicBool::new(false);
        let start = Instant::now();
        rayon::scope(|_| help_until(&never));
        assert!(start.elapsed() >= HELP_IDLE, "it waited for tasks first");
    }

    /// On the CPU the loader hands over groups whose codes are the file's own pages.
    #[test]
    fn cpu_groups_are_computed_in_place_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_random_export(&small(None), 3, &path).unwrap();
        let file = Arc::new(ModelFile::open(&path).unwrap());
        let mut loader = LayerLoader::<B>::spawn(file.clone(), 2, Default::default());
        for first in [0, 2, 0] {
            let group = loader.next_group().unwrap();
            for (i, layer) in (first..).zip(&group.layers) {
                assert_eq!(layer.index, i);
                for (linear, t) in layer
                    .linears
                    .iter()
                    .zip(BitLinearTensors::of_layer(&file.config, i))
                {
                    let name = t.weight();
                    let PackedStorage::Mapped(codes) = &linear.weight.storage else {
                        panic!("{name} was copied: {:?}", linear.weight.storage);
                    };
                    assert_eq!(codes.range(), file.range(&name).unwrap());
                    assert_eq!(codes.bytes(), file.bytes(&name).unwrap());
                }
            }
            loader.recycle(group);
        }
    }

    /// No new tokens asked, none generated: no pass runs, resident or streamed.
    #[test]
    fn zero_new_tokens_generate_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_random_export(&small(None), 3, &path).unwrap();
        for stream in [false, true] {
            let req = request(u64::MAX, Some(2), KvCacheType::F32);
            let out = run_for::<B>(&path, req, stream, &prompts(), 0, Default::default());
            assert_eq!(out.tokens, vec![Vec::<u32>::new(); 3], "stream {stream}");
            assert_eq!((out.stats.passes, out.stats.generated_tokens), (0, 0));
            assert_eq!(out.stats.prompt_tokens, 38);
        }
    }

    /// With the page cache dropped after use, the streamed engine gives the same tokens
    /// and leaves none of the layers cached; without, the file stays cached.
    #[test]
    fn dropping_the_page_cache_reads_each_pass_from_storage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        // Layers of 2.3 MB: the kernel may still read ahead into pages a pass has
        // dropped (up to 64 KiB seen), which must stay a small part of them.
        let config = small(None).with_overrides(&crate::model::ConfigOverrides {
            hidden_size: Some(512),
            ffn_size: Some(1024),
            ..Default::default()
        });
        write_random_export(&config, 5, &path).unwrap();
        let file = Arc::new(ModelFile::open(&path).unwrap());
        let layer_ranges: Vec<_> = BitLinearTensors::all(&config)
            .map(|t| file.range(&t.weight()).unwrap())
            .collect();
        let layer_bytes: usize = layer_ranges.iter().map(|r| r.len()).sum();
        let cached = || -> usize {
            layer_ranges
                .iter()
                .map(|r| file.cached_bytes(r.clone()))
                .sum()
        };
        let generate = |drop: bool| {
            file.set_drop_page_cache(drop);
            // Every layer starts in the page cache: the pass itself must drop them.
            std::hint::black_box(std::fs::read(&path).unwrap());
            let req = PlanRequest {
                stream: true,
                ..request(u64::MAX, Some(2), KvCacheType::F32)
            };
            let mut engine =
                StreamingEngine::<B>::from_file(file.clone(), req, Default::default()).unwrap();
            let out = engine
                .generate(
                    &prompts(),
                    8,
                    &SamplingConfig::default(),
                    None,
                    true,
                    |_, _| {},
                )
                .unwrap();
            assert!(out.stats.streaming);
            out
        };
        let kept = generate(false);
        assert!(
            cached() >= layer_bytes * 9 / 10,
            "the layers left the page cache without being asked to: {} of {layer_bytes} bytes cached",
            cached()
        );
        // A filesystem whose pages are its storage (tmpfs) cannot drop them.
        file.drop_from_page_cache();
        let droppable = cached() < layer_bytes / 10;
        let dropped = generate(true);
        assert_eq!(dropped.tokens, kept.tokens);
        assert!(max_rel_diff(&dropped.logits, &kept.logits) == 0.0);
        assert_eq!(dropped.stats.bytes_streamed, kept.stats.bytes_streamed);
        if droppable {
            assert!(
                cached() < layer_bytes / 10,
                "{} of {layer_bytes} layer bytes still cached after a pass that drops them",
                cached()
            );
        } else {
            eprintln!("{}: this filesystem keeps its pages cached", path.display());
        }
        file.set_drop_page_cache(false);
    }

    #[test]
    fn streamed_groups_give_the_resident_tokens_and_logits() {
        let dir = tempfile::tempdir().unwrap();
        for (window, kv) in [
            (None, KvCacheType::F32),
            (Some(6), KvCacheType::F32),
            (None, KvCacheType::F16),
        ] {
            let path = dir.path().join("m.safetensors");
            write_random_export(&small(window), 3, &path).unwrap();
            let resident = run(&path, request(u64::MAX, None, kv), false, &prompts());
            assert!(!resident.stats.streaming);
            for group in [1, 3] {
                let streamed = run(&path, request(u64::MAX, Some(group), kv), true, &prompts());
                assert!(streamed.stats.streaming);
                assert_eq!(
                    streamed.tokens, resident.tokens,
                    "group {group}, window {window:?}, {kv}"
                );
                let diff = max_rel_diff(&streamed.logits, &resident.logits);
                assert!(diff <= 1e-5, "group {group}: logits differ by {diff}");
                // Every pass moved every layer once.
                let layer = streamed.stats.bytes_streamed / (4 * streamed.stats.passes as u64);
                assert!(layer > 0);
            }
            // Batching does not change a sequence's tokens.
            for (i, p) in prompts().iter().enumerate() {
                let alone = run(
                    &path,
                    request(u64::MAX, Some(2), kv),
                    true,
                    std::slice::from_ref(p),
                );
                // Other batch shapes may round the float parts differently.
                crate::infer::compare_generations(
                    &alone.tokens[0],
                    &alone.logits[0],
                    &resident.tokens[i],
                    &resident.logits[i],
                    crate::infer::LOGIT_TOLERANCE,
                )
                .unwrap_or_else(|e| panic!("prompt {i}: {e}"));
            }
        }
    }

    #[test]
    fn the_engine_matches_the_latent_weight_model() {
        // The packed integer product against the model loaded with latent weights and run
        // through the training-time forward pass.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_random_export(&small(None), 5, &path).unwrap();
        let loaded = crate::infer::load_export::<B>(&path, &Default::default()).unwrap();
        let prompt: Vec<u32> = (0..11).map(|t| 8 + t * 37 % 250).collect();
        let out = run(
            &path,
            request(u64::MAX, Some(1), KvCacheType::F32),
            true,
            std::slice::from_ref(&prompt),
        );
        let agreement = crate::infer::check_greedy(
            &loaded.model,
            &prompt,
            &out.tokens[0],
            Some(&out.logits[0]),
            crate::infer::LOGIT_TOLERANCE,
        )
        .unwrap();
        assert_eq!(agreement.steps, 8);
    }

    #[test]
    fn the_int4_cache_follows_the_full_precision_engine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        for window in [None, Some(90)] {
            write_random_export(&small(window), 6, &path).unwrap();
            let req = |kv, context| PlanRequest {
                context,
                ..request(u64::MAX, Some(2), kv)
            };
            // Short prompts stay in the f16 window, where INT4 is the f16 cache, with GQA
            // and three sequences. (On the CPU both are the host cache; its fused decode is
            // checked against attention over the dequantized cache in `kv_int4`, and
            // against the f32 engine below.)
            let f16 = run(&path, req(KvCacheType::F16, 40), true, &prompts());
            let int4 = run(&path, req(KvCacheType::Int4, 40), true, &prompts());
            for i in 0..3 {
                let a = crate::infer::compare_generations(
                    &int4.tokens[i],
                    &int4.logits[i],
                    &f16.tokens[i],
                    &f16.logits[i],
                    1e-3,
                )
                .unwrap_or_else(|e| panic!("prompt {i}: {e}"));
                assert_eq!(a.steps + 8 * a.near_ties, 8);
            }
            // A prompt long enough to quantize: 224 + 8 tokens, 64..96 of them as codes
            // after prefill; logits within the INT4 error of the f32 engine's.
            let long: Vec<Vec<u32>> = vec![(0..224).map(|t| 8 + (t * t + 7 * t) % 250).collect()];
            let f32 = run(&path, req(KvCacheType::F32, 240), true, &long);
            let int4 = run(&path, req(KvCacheType::Int4, 240), true, &long);
            let diff = max_rel_diff(&int4.logits, &f32.logits);
            println!("window {window:?}: INT4 vs f32 logits, max relative difference {diff:.4}");
            assert!(diff < 0.1, "{diff}");
            // Codes take less than a quarter of the f32 cache's bytes for those tokens.
            assert!(int4.stats.peak_kv_bytes * 2 < f32.stats.peak_kv_bytes);
            // The plan's INT4 arithmetic bounds what the engine held.
            let planned = KvCacheType::Int4.cache_bytes(&small(window), 232);
            assert!(
                int4.stats.peak_kv_bytes <= planned,
                "{} > {planned}",
                int4.stats.peak_kv_bytes
            );
        }
    }

    #[test]
    fn budgets_too_small_and_damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_random_export(&small(None), 1, &path).unwrap();
        // Less than the resident parts plus two one-layer groups.
        let err = StreamingEngine::<B>::open(
            &path,
            request(150_000, None, KvCacheType::F32),
            Default::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("does not fit the memory budget") && err.contains("over by"),
            "{err}"
        );

        // A flipped byte inside a packed tensor is found by name.
        let file = ModelFile::open(&path).unwrap();
        let target = "blocks.2.ffn.gate_up.weight";
        let entry = file.tensors.get(target).unwrap().clone();
        drop(file);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(entry.start + entry.end) / 2] ^= 0b0100_0001;
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, &bytes).unwrap();
        let named = |err: anyhow::Error| {
            let err = err.to_string();
            assert!(err.contains(target) && err.contains("corrupt"), "{err}");
        };
        // Resident: when the layers are loaded.
        let resident_error = |path: &Path| {
            let request = request(u64::MAX, None, KvCacheType::F32);
            StreamingEngine::<B>::open(path, request, Default::default())
                .err()
                .unwrap()
        };
        named(resident_error(&bad));
        // Streamed: by the first pass, before any token is sampled.
        let mut engine = StreamingEngine::<B>::open(
            &bad,
            PlanRequest {
                stream: true,
                ..request(u64::MAX, Some(1), KvCacheType::F32)
            },
            Default::default(),
        )
        .unwrap();
        let mut sampled = 0;
        named(
            engine
                .generate(
                    &prompts(),
                    4,
                    &SamplingConfig::default(),
                    None,
                    false,
                    |_, _| sampled += 1,
                )
                .err()
                .unwrap(),
        );
        assert_eq!(sampled, 0);
        // And all at once, on request.
        named(ModelFile::open(&bad).unwrap().verify_all().err().unwrap());
        ModelFile::open(&path).unwrap().verify_all().unwrap();

        // A truncated file names the first tensor it cuts.
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..entry.start + 10]).unwrap();
        let err = ModelFile::open(&cut).err().unwrap().to_string();
        assert!(err.contains(target) && err.contains("truncated"), "{err}");

        // A file without checksums: each packed tensor's codes are checked instead, and
        // a byte holding the code no weight has (3) is found by name.
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value =
            serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let meta = header["__metadata__"].as_object_mut().unwrap();
        assert!(meta.remove("checksums").is_some());
        let mut json = serde_json::to_vec(&header).unwrap();
        json.resize(json.len().next_multiple_of(8), b' ');
        let without = |data: &[u8]| {
            let mut file = (json.len() as u64).to_le_bytes().to_vec();
            file.extend_from_slice(&json);
            file.extend_from_slice(data);
            file
        };
        let mut data = std::fs::read(&path).unwrap()[8 + header_len..].to_vec();
        let plain = dir.path().join("plain.safetensors");
        std::fs::write(&plain, without(&data)).unwrap();
        let file = ModelFile::open(&plain).unwrap();
        file.verify_all().unwrap();
        drop(file);
        data[(entry.start + entry.end) / 2 - (8 + header_len)] = 0xFF;
        let invalid = dir.path().join("invalid.safetensors");
        std::fs::write(&invalid, without(&data)).unwrap();
        named(
            ModelFile::open(&invalid)
                .unwrap()
                .verify_all()
                .err()
                .unwrap(),
        );
        named(resident_error(&invalid));
    }
}

/// The device path (packed words unpacked by integer tensor ops) on a CubeCL backend:
/// Burn's wgpu runtime on the CPU's Vulkan driver (Mesa lavapipe).
#[cfg(test)]
mod wgpu_tests {
    use super::tests_support::*;
    use crate::infer::budget::KvCacheType;
    use burn::backend::wgpu::{Wgpu, WgpuDevice};

    #[test]
    fn streaming_on_wgpu_matches_the_cpu_engine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        crate::export::write_random_export(&small(None), 4, &path).unwrap();
        let prompts = prompts();
        let cpu = run_on::<crate::TestBackend>(
            &path,
            request(u64::MAX, None, KvCacheType::F32),
            false,
            &prompts,
            Default::default(),
        );
        // Streamed one layer at a time: uploads on the loader's thread, compute on this one.
        let gpu = run_on::<Wgpu>(
            &path,
            request(u64::MAX, Some(1), KvCacheType::F32),
            true,
            &prompts,
            WgpuDevice::Cpu,
        );
        assert!(gpu.stats.streaming && gpu.stats.bytes_streamed > 0);
        for i in 0..prompts.len() {
            crate::infer::compare_generations(
                &gpu.tokens[i],
                &gpu.logits[i],
                &cpu.tokens[i],
                &cpu.logits[i],
                crate::infer::LOGIT_TOLERANCE,
            )
            .unwrap_or_else(|e| panic!("prompt {i}: {e}"));
        }
        // The latent-weight model on wgpu agrees too.
        let loaded = crate::infer::load_export::<Wgpu>(&path, &WgpuDevice::Cpu).unwrap();
        crate::infer::check_greedy(
            &loaded.model,
            &prompts[0],
            &cpu.tokens[0],
            Some(&cpu.logits[0]),
            crate::infer::LOGIT_TOLERANCE,
        )
        .unwrap();
    }
}
