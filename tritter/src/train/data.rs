//! Training data: fixed-length windows of the token stream, served step by step.
//!
//! The sampler is a pure function of `(seed, sample index)`, so the data position of a run
//! is its step count: a resumed run continues with exactly the batches the uninterrupted
//! run would have seen, with no hidden RNG state to save.

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tritter_data::TokenStream;

/// Inputs and next-token targets, `[batch, seq]` each, and with document masking the
/// document of every input position (`[batch, seq]`, row major).
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    pub inputs: Tensor<B, 2, Int>,
    pub targets: Tensor<B, 2, Int>,
    pub documents: Option<Arc<Vec<i32>>>,
}

impl<B: Backend> TokenBatch<B> {
    /// Builds a batch from windows of `seq + 1` tokens.
    pub fn from_windows(windows: &[&[u32]], device: &B::Device) -> Self {
        let batch = windows.len();
        let seq = windows[0].len() - 1;
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for w in windows {
            inputs.extend(w[..seq].iter().map(|&t| t as i64));
            targets.extend(w[1..].iter().map(|&t| t as i64));
        }
        let tensor =
            |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [batch, seq]), device);
        Self {
            inputs: tensor(inputs),
            targets: tensor(targets),
            documents: None,
        }
    }

    /// Adds the document of every input position, for windows starting at `starts` in a
    /// stream whose documents start at `doc_starts`.
    pub fn with_documents(mut self, starts: &[usize], doc_starts: &[u64]) -> Self {
        let seq = self.inputs.dims()[1];
        let mut documents = Vec::with_capacity(starts.len() * seq);
        for &start in starts {
            // Documents begun at or before each position.
            let mut doc = doc_starts.partition_point(|&s| s as usize <= start);
            for position in start..start + seq {
                while doc_starts.get(doc).is_some_and(|&s| s as usize <= position) {
                    doc += 1;
                }
                documents.push(doc as i32);
            }
        }
        self.documents = Some(Arc::new(documents));
        self
    }

    pub fn tokens(&self) -> usize {
        self.inputs.dims().iter().product()
    }
}

/// The batch of windows of `seq + 1` tokens starting at `starts`.
fn batch_at<B: Backend>(
    stream: &TokenStream,
    starts: &[usize],
    seq: usize,
    document_mask: bool,
    device: &B::Device,
) -> TokenBatch<B> {
    let windows: Vec<&[u32]> = starts
        .iter()
        .map(|&s| &stream.tokens[s..s + seq + 1])
        .collect();
    let batch = TokenBatch::from_windows(&windows, device);
    if document_mask {
        batch.with_documents(starts, &stream.doc_starts)
    } else {
        batch
    }
}

/// SplitMix64's increment (2⁶⁴ / φ).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64: a stateless, well-mixed hash of the sample index.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(GOLDEN_GAMMA);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The SplitMix64 generator seeded with `seed`: successive outputs of [`splitmix64`]
/// over a state advancing by the golden gamma.
pub(crate) fn splitmix_stream(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        let z = splitmix64(state);
        state = state.wrapping_add(GOLDEN_GAMMA);
        z
    }
}

/// Where training sample `n` starts in a stream of `len` tokens.
pub fn window_start(seed: u64, n: u64, len: usize, seq_len: usize) -> usize {
    let span = (len - seq_len) as u64; // windows of seq_len + 1 tokens
    (splitmix64(seed ^ splitmix64(n)) % span) as usize
}

/// Serves the training split one checkpoint interval (burn-train epoch) at a time.
#[derive(Clone)]
pub struct TrainLoader<B: Backend> {
    stream: Arc<TokenStream>,
    seed: u64,
    batch_size: usize,
    seq_len: usize,
    /// Micro-batches per epoch, and in the whole run.
    micro_per_epoch: usize,
    micro_total: usize,
    /// The next epoch to serve (0-based); shared by every copy of the loader.
    next_epoch: Arc<AtomicUsize>,
    /// Give each batch its documents, so attention stays within them.
    document_mask: bool,
    device: B::Device,
}

impl<B: Backend> TrainLoader<B> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: Arc<TokenStream>,
        seed: u64,
        batch_size: usize,
        seq_len: usize,
        micro_per_epoch: usize,
        micro_total: usize,
        first_epoch: usize,
        device: B::Device,
    ) -> Self {
        Self {
            stream,
            seed,
            batch_size,
            seq_len,
            micro_per_epoch,
            micro_total,
            next_epoch: Arc::new(AtomicUsize::new(first_epoch)),
            document_mask: false,
            device,
        }
    }

    /// Masks attention per document (packed sequences) when `on`.
    pub fn with_document_mask(mut self, on: bool) -> Self {
        self.document_mask = on;
        self
    }

    /// The batch of micro-step `micro` (0-based over the whole run).
    pub fn batch(&self, micro: usize) -> TokenBatch<B> {
        let tokens = &self.stream.tokens;
        let starts: Vec<usize> = (0..self.batch_size)
            .map(|i| {
                let n = (micro * self.batch_size + i) as u64;
                window_start(self.seed, n, tokens.len(), self.seq_len)
            })
            .collect();
        batch_at(
            &self.stream,
            &starts,
            self.seq_len,
            self.document_mask,
            &self.device,
        )
    }
}

struct TrainIter<'a, B: Backend> {
    loader: &'a TrainLoader<B>,
    next: usize,
    end: usize,
    start: usize,
}

impl<B: Backend> Iterator for TrainIter<'_, B> {
    type Item = TokenBatch<B>;
    fn next(&mut self) -> Option<TokenBatch<B>> {
        (self.next < self.end).then(|| {
            self.next += 1;
            self.loader.batch(self.next - 1)
        })
    }
}

impl<B: Backend> DataLoaderIterator<TokenBatch<B>> for TrainIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress {
            items_processed: self.next - self.start,
            items_total: self.end - self.start,
        }
    }
}

impl<B: Backend> DataLoader<B, TokenBatch<B>> for TrainLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<TokenBatch<B>> + 'a> {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let start = (epoch * self.micro_per_epoch).min(self.micro_total);
        let end = ((epoch + 1) * self.micro_per_epoch).min(self.micro_total);
        Box::new(TrainIter {
            loader: self,
            next: start,
            end,
            start,
        })
    }

    fn num_items(&self) -> usize {
        self.micro_per_epoch * self.batch_size
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        Arc::new(Self {
            device: device.clone(),
            ..self.clone()
        })
    }

    fn slice(&self, _start: usize, _end: usize) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        Arc::new(self.clone())
    }
}

/// The validation split as consecutive, non-overlapping windows: the same batches at
/// every evaluation.
#[derive(Clone)]
pub struct ValidLoader<B: Backend> {
    stream: Arc<TokenStream>,
    batch_size: usize,
    seq_len: usize,
    batches: usize,
    document_mask: bool,
    device: B::Device,
}

impl<B: Backend> ValidLoader<B> {
    /// At most `max_batches` batches; fewer when the split is short.
    pub fn new(
        stream: Arc<TokenStream>,
        batch_size: usize,
        seq_len: usize,
        max_batches: usize,
        device: B::Device,
    ) -> Self {
        let windows = stream.tokens.len().saturating_sub(1) / seq_len;
        let batches = (windows / batch_size).min(max_batches);
        Self {
            stream,
            batch_size,
            seq_len,
            batches,
            document_mask: false,
            device,
        }
    }

    /// Masks attention per document (packed sequences) when `on`.
    pub fn with_document_mask(mut self, on: bool) -> Self {
        self.document_mask = on;
        self
    }

    pub fn num_batches(&self) -> usize {
        self.batches
    }

    pub fn batch(&self, index: usize) -> TokenBatch<B> {
        let starts: Vec<usize> = (0..self.batch_size)
            .map(|i| (index * self.batch_size + i) * self.seq_len)
            .collect();
        batch_at(
            &self.stream,
            &starts,
            self.seq_len,
            self.document_mask,
            &self.device,
        )
    }
}

struct ValidIter<'a, B: Backend> {
    loader: &'a ValidLoader<B>,
    next: usize,
}

impl<B: Backend> Iterator for ValidIter<'_, B> {
    type Item = TokenBatch<B>;
    fn next(&mut self) -> Option<TokenBatch<B>> {
        (self.next < self.loader.batches).then(|| {
            self.next += 1;
            self.loader.batch(self.next - 1)
        })
    }
}

impl<B: Backend> DataLoaderIterator<TokenBatch<B>> for ValidIter<'_, B> {
    fn progress(&self) -> Progress {
        Progress {
            items_processed: self.next,
            items_total: self.loader.batches,
        }
    }
}

impl<B: Backend> DataLoader<B, TokenBatch<B>> for ValidLoader<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<TokenBatch<B>> + 'a> {
        Box::new(ValidIter {
            loader: self,
            next: 0,
        })
    }

    fn num_items(&self) -> usize {
        self.batches * self.batch_size
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        Arc::new(Self {
            device: device.clone(),
            ..self.clone()
        })
    }

    fn slice(&self, _start: usize, _end: usize) -> Arc<dyn DataLoader<B, TokenBatch<B>>> {
        Arc::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_carry_the_document_of_every_position() {
        let stream = TokenStream {
            tokens: (0..20).collect(),
            doc_starts: vec![0, 5, 12],
        };
        let batch = batch_at::<crate::TestBackend>(&stream, &[3, 10], 6, true, &Default::default());
        assert_eq!(
            batch.documents.unwrap().as_slice(),
            &[1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]
        );
        let batch =
            batch_at::<crate::TestBackend>(&stream, &[3, 10], 6, false, &Default::default());
        assert!(batch.documents.is_none());
    }

    #[test]
    fn windows_are_in_range_and_deterministic() {
        for n in 0..1000 {
            let s = window_start(7, n, 100, 10);
            assert!(s + 11 <= 100);
            assert_eq!(s, window_start(7, n, 100, 10));
        }
        assert_ne!(
            window_start(7, 0, 1 << 20, 10),
            window_start(8, 0, 1 << 20, 10)
        );
    }
}
