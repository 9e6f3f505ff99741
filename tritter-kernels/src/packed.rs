//! Inference on packed ternary weights: BitLinear's product computed from the export's
//! 2-bit codes, with int8 activations and exact integer accumulation (the W1.58A8 path).
//!
//! Packed layout (the export's): a `[d_out, ceil(d_in / 4)]` byte matrix; input `c` of
//! row `r` sits in byte `c / 4` at bits `2·(c % 4)`, coded `q + 1` (0 → −1, 1 → 0,
//! 2 → +1). The product is `y[t, o] = (Σ_c xq[t, c]·q[o, c]) · γ / s_t` with `xq`, `s_t`
//! from [`crate::reference::int8_quantize`]: the same numbers as the latent-weight path,
//! summed exactly in integers.
//!
//! CPU layout: the host keeps the same codes, 2 bits per weight, rearranged as they are
//! loaded ([`interleave`]): for each panel of [`PANEL_ROWS`] rows and each column of 16
//! inputs, 16 consecutive 32-bit words, word `r` holding row `r`'s 16 codes. One 64-byte
//! load then gives 16 rows × 16 inputs, and each group of four inputs becomes one vector
//! of 16 rows × 4 codes with two instructions (a multishift and a mask), which serves
//! every token of a tile by a broadcast multiply-add. A weight is unpacked once per tile
//! of up to [`TILE_TOKENS`] tokens.
//!
//! In place: a matrix may also stay in the export's rows inside a mapping of the model
//! file ([`MappedCodes`]), as streaming keeps it on the CPU. The product then rearranges
//! each task's panels into a per-thread scratch that stays in cache, as it reaches them:
//! the weights are read from memory once per product, never copied to a second buffer.
//! Few tokens, and with AMX any number, skip even that: the kernels multiply the rows as
//! they stand.

use crate::reference::{int8_quantize, ACT_MAX, QUANT_EPS};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use rayon::prelude::*;
use std::sync::Arc;

/// A ternary matrix packed 2 bits per weight, held where its backend computes.
#[derive(Debug, Clone)]
pub struct PackedTernary<B: Backend> {
    pub d_in: usize,
    pub d_out: usize,
    /// The per-tensor scale γ: the weight is `q · γ`.
    pub gamma: f32,
    pub storage: PackedStorage<B>,
}

#[derive(Debug, Clone)]
pub enum PackedStorage<B: Backend> {
    /// The codes in host memory (the CPU backend's device memory), in the CPU layout
    /// ([`interleave`]).
    Host(Arc<HostWords>),
    /// Rows of 32-bit words, 16 codes per word, `[d_out, ceil(d_in / 16)]`, on the device.
    Words(Tensor<B, 2, Int>),
    /// The export's rows, in place in a mapping the CPU reads as its device memory.
    Mapped(MappedCodes),
}

impl<B: Backend> PackedTernary<B> {
    /// Bytes this matrix occupies where it is stored.
    pub fn stored_bytes(&self) -> usize {
        match &self.storage {
            PackedStorage::Host(words) => 4 * words.len(),
            PackedStorage::Words(_) => self.d_out * self.d_in.div_ceil(16) * 4,
            PackedStorage::Mapped(codes) => codes.bytes().len(),
        }
    }
}

/// Bytes that something else keeps alive and unchanged, such as a model file's mapping.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// One matrix's export bytes (`[d_out, ceil(d_in / 4)]`) inside shared bytes.
#[derive(Clone)]
pub struct MappedCodes {
    source: SharedBytes,
    range: std::ops::Range<usize>,
}

impl MappedCodes {
    /// # Panics
    /// Where `range` lies outside `source`.
    pub fn new(source: SharedBytes, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= (*source).as_ref().len(),
            "{range:?} outside {} bytes",
            (*source).as_ref().len()
        );
        Self { source, range }
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.source).as_ref()[self.range.clone()]
    }

    /// Where the codes lie in the source.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.range.clone()
    }
}

impl std::fmt::Debug for MappedCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedCodes({:?})", self.range)
    }
}

/// The CPU's matrix computed in place from `codes` ([`cpu_gemm`]).
///
/// # Panics
/// Where `codes` does not hold a `[d_out, ceil(d_in / 4)]` byte matrix.
pub fn map_host<B: Backend>(
    codes: MappedCodes,
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> PackedTernary<B> {
    assert_eq!(
        codes.bytes().len(),
        d_out * d_in.div_ceil(4),
        "a {d_out}×{d_in} matrix"
    );
    PackedTernary {
        d_in,
        d_out,
        gamma,
        storage: PackedStorage::Mapped(codes),
    }
}

/// 32-bit words in host memory, aligned to 64-byte cache lines (so that [`interleave`]
/// writes them with streaming stores), a large buffer in 2 MiB pages where the kernel
/// gives them ([`HostWords::zeroed`]; a clone too).
#[derive(Debug)]
pub struct HostWords {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

impl HostWords {
    /// `len` zeroed words. A large buffer (a resident layer's codes) is first advised
    /// into transparent huge pages, so that zeroing it faults in one 2 MiB page where it
    /// would fault in 512 small ones: on 2 cores of an EPYC, loading the streaming
    /// bench's 426 MiB model resident from the page cache took 0.44 s where it took
    /// 0.55 s, most of the difference page faults.
    pub fn zeroed(len: usize) -> Self {
        let n = len.div_ceil(16);
        let mut lines = advised_lines(n);
        // SAFETY: the capacity holds `n` lines, each written with zeros (a valid `Line`)
        // before the length covers it.
        unsafe {
            std::ptr::write_bytes(lines.as_mut_ptr(), 0, n);
            lines.set_len(n);
        }
        Self { lines, len }
    }

    /// The words' bytes: codes in the export's rows can sit in the same pages as the CPU
    /// layout's (as the streaming engine's mapping of a model file does, where the
    /// filesystem caches it in 2 MiB folios).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `4·len` initialized bytes, contiguous.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), 4 * self.len) }
    }

    /// [`HostWords::as_bytes`], mutably.
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_bytes`, borrowed mutably; any bytes are valid words.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), 4 * self.len) }
    }
}

impl Clone for HostWords {
    fn clone(&self) -> Self {
        let mut lines = advised_lines(self.lines.len());
        lines.extend_from_slice(&self.lines);
        Self {
            lines,
            len: self.len,
        }
    }
}

/// An empty vector with room for `n` lines, advised into huge pages before anything
/// touches them ([`advise_huge_pages`]).
fn advised_lines(n: usize) -> Vec<Line> {
    let mut lines: Vec<Line> = Vec::with_capacity(n);
    advise_huge_pages(lines.as_mut_ptr().cast(), n * std::mem::size_of::<Line>());
    lines
}

/// Asks the kernel to back the whole 2 MiB pages within `bytes` at `start` with
/// transparent huge pages (where it backs them only on request, as by default on many
/// distributions). Smaller buffers are left alone.
fn advise_huge_pages(start: *mut u8, bytes: usize) {
    const HUGE: usize = 2 << 20;
    if bytes < 2 * HUGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let (first, end) = (
            (start as usize).next_multiple_of(HUGE),
            start as usize + bytes,
        );
        let len = (end - first) / HUGE * HUGE;
        // SAFETY: the range lies within the allocation at `start`; the advice changes how
        // its pages are backed, never their contents. A refusal (THP disabled) is fine.
        unsafe {
            libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = start;
}

impl std::ops::Deref for HostWords {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: `lines` holds at least `len` initialized `u32`s, contiguous.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for HostWords {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as for `deref`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// Bytes [`validate_codes`] checks at once.
const VALIDATE_CHUNK: usize = 256;

/// Checks that `bytes` holds a `[d_out, ceil(d_in / 4)]` matrix of valid codes (no 3).
pub fn validate_codes(bytes: &[u8], d_out: usize, d_in: usize) -> Result<(), String> {
    let row_bytes = d_in.div_ceil(4);
    if bytes.len() != d_out * row_bytes {
        return Err(format!(
            "{} bytes, expected {d_out} × {row_bytes} = {}",
            bytes.len(),
            d_out * row_bytes
        ));
    }
    // A byte holds an invalid code when some 2-bit field is 0b11. Each chunk is checked
    // whole, by a fold the compiler turns into vector instructions (27 GB/s on one core
    // of an EPYC, where a search byte by byte ran at 1.2 GB/s, slower than the storage
    // a streamed model's first pass reads); the search runs only in a chunk that fails.
    let invalid = |b: &u8| (b & (b >> 1) & 0x55) != 0;
    for (c, chunk) in bytes.chunks(VALIDATE_CHUNK).enumerate() {
        if chunk.iter().fold(0u8, |any, b| any | (b & (b >> 1))) & 0x55 != 0 {
            let i = c * VALIDATE_CHUNK + chunk.iter().position(invalid).unwrap_or(0);
            return Err(format!(
                "invalid ternary code in row {} (byte {i})",
                i / row_bytes
            ));
        }
    }
    Ok(())
}

/// Keeps the export's codes in host memory, in the CPU layout.
pub fn upload_host<B: Backend>(
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> PackedTernary<B> {
    let mut words = HostWords::zeroed(panel_words(d_out, d_in));
    interleave(bytes, d_out, d_in, &mut words);
    PackedTernary {
        d_in,
        d_out,
        gamma,
        storage: PackedStorage::Host(Arc::new(words)),
    }
}

/// Rows per panel of the CPU layout.
pub const PANEL_ROWS: usize = 16;

/// 32-bit words of a `[d_out, d_in]` matrix in the CPU layout: rows padded to whole
/// panels, inputs to whole words (with code 1, zero).
pub fn panel_words(d_out: usize, d_in: usize) -> usize {
    d_out.div_ceil(PANEL_ROWS) * PANEL_ROWS * d_in.div_ceil(16)
}

/// Rearranges the export's `[d_out, ceil(d_in / 4)]` bytes into the CPU layout (see the
/// module documentation): word `(p·columns + c)·16 + r` holds bytes `4c..4c + 4` of row
/// `16p + r`, little-endian. One pass: it replaces the copy a load would make.
///
/// # Panics
/// Where `bytes` or `words` has the wrong length.
pub fn interleave(bytes: &[u8], d_out: usize, d_in: usize, words: &mut [u32]) {
    interleave_by(Transpose::best(), bytes, d_out, d_in, words)
}

/// [`interleave`] with a given transposer, for tests and benchmarks that compare them.
///
/// # Panics
/// Where this CPU cannot run `transpose` (see [`Transpose::supported`]), besides
/// [`interleave`]'s own cases.
pub fn interleave_with(
    transpose: Transpose,
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    words: &mut [u32],
) {
    assert!(
        Transpose::supported().contains(&transpose),
        "this CPU cannot run the {transpose:?} transposer"
    );
    interleave_by(transpose, bytes, d_out, d_in, words)
}

/// [`interleave`] by `transpose`, one this CPU runs.
fn interleave_by(transpose: Transpose, bytes: &[u8], d_out: usize, d_in: usize, words: &mut [u32]) {
    let (row_bytes, columns) = (d_in.div_ceil(4), d_in.div_ceil(16));
    assert_eq!(bytes.len(), d_out * row_bytes, "a {d_out}×{d_in} matrix");
    assert_eq!(words.len(), panel_words(d_out, d_in), "CPU layout words");
    // Panels on the thread pool: while the engine computes, they interleave with its work.
    words
        .par_chunks_exact_mut(PANEL_ROWS * columns)
        .enumerate()
        .for_each(|(p, panel)| {
            interleave_panel_with(
                transpose,
                panel_rows(bytes, d_out, row_bytes, p),
                row_bytes,
                panel,
                true,
                &[],
            )
        });
}

/// The export rows of panel `p` (up to 16).
fn panel_rows(bytes: &[u8], d_out: usize, row_bytes: usize, p: usize) -> &[u8] {
    &bytes[PANEL_ROWS * p * row_bytes..((PANEL_ROWS * (p + 1)).min(d_out)) * row_bytes]
}

/// One panel of [`interleave`] from its (up to 16) export `rows`; `stream` writes a
/// cache-line-aligned `panel` around the caches (a buffer read later, not a scratch).
/// `ahead`: bytes to bring into cache meanwhile (else each row's own next lines).
fn interleave_panel(rows: &[u8], row_bytes: usize, panel: &mut [u32], stream: bool, ahead: &[u8]) {
    interleave_panel_with(Transpose::best(), rows, row_bytes, panel, stream, ahead)
}

/// [`interleave_panel`] with a given transposer.
fn interleave_panel_with(
    transpose: Transpose,
    rows: &[u8],
    row_bytes: usize,
    panel: &mut [u32],
    stream: bool,
    ahead: &[u8],
) {
    // SAFETY (vector transposers): the CPU has the features (`Transpose::supported`);
    // `rows` holds `rows.len() / row_bytes` whole rows, and `panel` 16 words for each of
    // its columns.
    let done = match transpose {
        #[cfg(target_arch = "x86_64")]
        Transpose::Avx512 => unsafe {
            vnni::interleave_blocks(rows, row_bytes, panel, stream, ahead)
        },
        #[cfg(target_arch = "x86_64")]
        Transpose::Avx2 => unsafe {
            avx2::interleave_blocks(rows, row_bytes, panel, stream, ahead)
        },
        _ => {
            let _ = (stream, ahead);
            0
        }
    };
    interleave_columns(rows, row_bytes, done..panel.len() / PANEL_ROWS, panel);
}

/// The vector transposers' prefetch while row `row` of 64-byte block `block` of a panel
/// is read at `at`: line `16·block + row` of `ahead`, else the row's own bytes 256 on.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_ahead(at: *const u8, ahead: &[u8], block: usize, row: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let next = match ahead.is_empty() {
        true => at.wrapping_add(256),
        false => ahead
            .as_ptr()
            .wrapping_add((64 * (16 * block + row)).min(ahead.len() - 1)),
    };
    _mm_prefetch::<_MM_HINT_T1>(next.cast());
}

/// How [`interleave`] and the in-place product rearrange rows into panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// Word by word.
    Portable,
    /// 8 × 8 word transposes in AVX2 registers, two per 8 columns of a panel.
    Avx2,
    /// 16 × 16 word transposes in AVX-512 registers.
    Avx512,
}

impl Transpose {
    /// The transposers this CPU can run, narrowest first.
    pub fn supported() -> Vec<Transpose> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut all = vec![Transpose::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Transpose::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Transpose::Avx512);
            }
        }
        all
    }

    /// The widest one within `TRITTER_CPU_KERNELS` ([`crate::isa`]).
    pub fn best() -> Transpose {
        use crate::isa::Tier;
        static BEST: std::sync::OnceLock<Transpose> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            crate::isa::widest(&Transpose::supported(), |t| match t {
                Transpose::Portable => Tier::Portable,
                Transpose::Avx2 => Tier::Avx2,
                Transpose::Avx512 => Tier::Avx512,
            })
        })
    }
}

/// Sixteen zero codes (code 1).
const PAD_WORD: u32 = 0x5555_5555;

/// Word `c` of an export row: bytes `4c..4c + 4`, little-endian, past the row's end
/// padded with zero codes.
fn row_word(row: &[u8], c: usize) -> u32 {
    match row.get(4 * c..4 * c + 4) {
        Some(four) => u32::from_le_bytes(four.try_into().expect("four bytes")),
        None => {
            let mut word = PAD_WORD.to_le_bytes();
            let have = row.get(4 * c..).unwrap_or_default();
            word[..have.len()].copy_from_slice(have);
            u32::from_le_bytes(word)
        }
    }
}

/// Columns `columns` of one panel of [`interleave`], word by word (`rows`: up to 16 rows
/// of `row_bytes`; missing rows are padding).
fn interleave_columns(
    rows: &[u8],
    row_bytes: usize,
    columns: std::ops::Range<usize>,
    panel: &mut [u32],
) {
    let panel = &mut panel[columns.start * PANEL_ROWS..columns.end * PANEL_ROWS];
    for r in 0..PANEL_ROWS {
        let Some(row) = rows.get(r * row_bytes..(r + 1) * row_bytes) else {
            panel
                .iter_mut()
                .skip(r)
                .step_by(PANEL_ROWS)
                .for_each(|w| *w = PAD_WORD);
            continue;
        };
        // Whole words straight from the row's bytes; the last, partial one padded.
        let bytes = row.get(4 * columns.start..).unwrap_or_default();
        let whole = (bytes.len() / 4).min(columns.len());
        let words = panel.chunks_exact_mut(PANEL_ROWS);
        for (column, four) in words.zip(bytes.chunks_exact(4)).take(whole) {
            column[r] = u32::from_le_bytes(four.try_into().expect("four bytes"));
        }
        for c in columns.start + whole..columns.end {
            panel[(c - columns.start) * PANEL_ROWS + r] = row_word(row, c);
        }
    }
}

/// Moves the export's bytes to the device as 32-bit words, 16 codes each (rows padded
/// with code 1 = zero). The weights travel packed.
pub fn upload_words<B: Backend>(
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
    device: &B::Device,
) -> PackedTernary<B> {
    let row_bytes = d_in.div_ceil(4);
    let words_per_row = d_in.div_ceil(16);
    let mut words = Vec::with_capacity(d_out * words_per_row);
    for row in bytes.chunks_exact(row_bytes) {
        words.extend((0..words_per_row).map(|w| row_word(row, w) as i32));
    }
    let words = Tensor::from_data(TensorData::new(words, [d_out, words_per_row]), device);
    PackedTernary {
        d_in,
        d_out,
        gamma,
        storage: PackedStorage::Words(words),
    }
}

/// Weights unpacked at a time by [`matmul_words`]: bounds its scratch memory.
pub const UNPACK_TILE_WEIGHTS: usize = 1 << 22;

/// Scratch bytes [`matmul_words`] allocates beyond its input and output: one tile of
/// weights as integers, shifted codes and floats.
pub fn words_scratch_bytes(d_out: usize, d_in: usize) -> usize {
    let tile_rows = (UNPACK_TILE_WEIGHTS / d_in.max(1)).clamp(1, d_out.max(1));
    tile_rows * d_in.div_ceil(16) * 16 * 12
}

/// The product on the device, unpacking row tiles with integer tensor ops. Any backend.
pub fn matmul_words<B: Backend>(x: Tensor<B, 2>, w: &PackedTernary<B>) -> Tensor<B, 2> {
    let PackedStorage::Words(words) = &w.storage else {
        panic!("matmul_words needs device words");
    };
    let (xq, inv_scale) = int8_quantize(x);
    let tile_rows = (UNPACK_TILE_WEIGHTS / w.d_in.max(1)).clamp(1, w.d_out.max(1));
    let mut outputs = Vec::new();
    let mut start = 0;
    while start < w.d_out {
        let rows = tile_rows.min(w.d_out - start);
        let q = unpack_words(words.clone().narrow(0, start, rows), w.d_in);
        outputs.push(xq.clone().matmul(q.transpose()));
        start += rows;
    }
    Tensor::cat(outputs, 1) * inv_scale * w.gamma
}

/// The ternary values `q` `[rows, d_in]` of word rows `[rows, ceil(d_in / 16)]`, unpacked
/// with integer tensor ops.
pub fn unpack_words<B: Backend>(words: Tensor<B, 2, Int>, d_in: usize) -> Tensor<B, 2> {
    let [rows, words_per_row] = words.dims();
    let shifts = Tensor::<B, 1, Int>::from_data(
        TensorData::new((0..16).map(|k| 2 * k).collect::<Vec<i32>>(), [16]),
        &words.device(),
    )
    .reshape([1, 1, 16]);
    let codes = words
        .reshape([rows, words_per_row, 1])
        .expand([rows, words_per_row, 16])
        .bitwise_right_shift(shifts.expand([rows, words_per_row, 16]))
        .bitwise_and_scalar(B::IntElem::from_elem(3))
        .reshape([rows, words_per_row * 16])
        .narrow(1, 0, d_in);
    codes.float() - 1.0
}

/// `round(v)` (half to even) clamped to `[lo, hi]`, for ranges within ±2²², without a
/// library call and without a branch, so that loops over it vectorize (baseline x86-64
/// has no rounding instruction): clamping first changes nothing for integer bounds, and
/// adding and removing 1.5·2²³ leaves the nearest integer under the default rounding mode.
#[inline(always)]
pub(crate) fn round_clamped(v: f32, lo: f32, hi: f32) -> f32 {
    shifted_round(v, lo, hi) - ROUND_SHIFT
}

/// 1.5·2²³: a sum with it within ±2²² holds the nearest integer in its low mantissa bits.
pub(crate) const ROUND_SHIFT: f32 = 12_582_912.0;

/// `round(clamp(v, lo, hi)) + 1.5·2²³`, exactly.
#[inline(always)]
fn shifted_round(v: f32, lo: f32, hi: f32) -> f32 {
    v.clamp(lo, hi) + ROUND_SHIFT
}

/// [`int8_code`] as an integer: the nearest integer's bits are read back from the sum
/// with 1.5·2²³ (its low mantissa bits, two's complement) instead of converting, a
/// conversion whose saturation for out-of-range values stops loops from vectorizing.
#[inline(always)]
pub(crate) fn int8_code_i32(v: f32, inv_scale: f32) -> i32 {
    let shifted = shifted_round(v / inv_scale, -128.0, ACT_MAX);
    shifted.to_bits() as i32 - ROUND_SHIFT.to_bits() as i32
}

/// `max_i |x_i|` in 16 independent lanes.
#[inline(always)]
fn abs_max(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v.abs());
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(0f32, |m, v| m.max(v.abs()))
}

/// One token's `1/s = max(max|x|, ε) / 127`, as [`int8_quantize`] computes it.
#[inline(always)]
pub(crate) fn int8_inv_scale(row: &[f32]) -> f32 {
    abs_max(row).max(QUANT_EPS) / ACT_MAX
}

/// The int8 code `clamp(round(v·s), −128, 127)` of a value of a token with `1/s`.
#[inline(always)]
pub(crate) fn int8_code(v: f32, inv_scale: f32) -> f32 {
    round_clamped(v / inv_scale, -128.0, ACT_MAX)
}

/// Per-token int8 quantization of `x` `[tokens, d_in]`, as [`int8_quantize`] computes it.
/// Rows are laid out `stride ≥ d_in` apart, zero-padded. Returns the codes, `1/s` per
/// token, and the sum of each token's codes.
pub fn quantize_rows(x: &[f32], d_in: usize, stride: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        // SAFETY: the CPU has the features.
        return unsafe { quantize_rows_avx512(x, d_in, stride) };
    }
    quantize_rows_any(x, d_in, stride)
}

/// [`quantize_rows`] compiled for AVX-512: the same operations in the same order, so
/// the same codes, sixteen lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_rows_avx512(
    x: &[f32],
    d_in: usize,
    stride: usize,
) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    quantize_rows_any(x, d_in, stride)
}

/// Whether AVX-512 F, BW and VL are usable (and the portable kernels not forced).
#[cfg(target_arch = "x86_64")]
fn use_avx512() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && crate::isa::allows(crate::isa::Tier::Avx512)
    })
}

#[inline(always)]
fn quantize_rows_any(x: &[f32], d_in: usize, stride: usize) -> (Vec<i8>, Vec<f32>, Vec<i32>) {
    let tokens = x.len() / d_in.max(1);
    let mut xq = vec![0i8; tokens * stride];
    let mut inv_scales = Vec::with_capacity(tokens);
    let mut sums = Vec::with_capacity(tokens);
    for (row, out) in x.chunks_exact(d_in).zip(xq.chunks_exact_mut(stride)) {
        let inv_scale = int8_inv_scale(row);
        let out = &mut out[..d_in];
        // Sixteen lanes of codes and sums, so that the loop vectorizes; the codes are
        // integers in [-128, 127], converted exactly.
        let mut lanes = [0i32; 16];
        let (mut chunks, mut outs) = (row.chunks_exact(16), out.chunks_exact_mut(16));
        for (values, out) in (&mut chunks).zip(&mut outs) {
            for ((o, &v), lane) in out.iter_mut().zip(values).zip(lanes.iter_mut()) {
                let code = int8_code_i32(v, inv_scale);
                *o = code as i8;
                *lane += code;
            }
        }
        let mut sum: i32 = lanes.iter().sum();
        for (o, &v) in outs.into_remainder().iter_mut().zip(chunks.remainder()) {
            let code = int8_code_i32(v, inv_scale);
            *o = code as i8;
            sum += code;
        }
        inv_scales.push(inv_scale);
        sums.push(sum);
    }
    (xq, inv_scales, sums)
}

/// Tokens per tile of the CPU product: each unpacked weight vector serves this many.
pub const TILE_TOKENS: usize = 16;

/// Panels per parallel task: their weights stay in cache while every tile passes.
const PANELS_PER_TASK: usize = 4;

/// How [`Tiles`] lays out the int8 codes for a kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Runs of 16 codes in input order (VNNI).
    Inputs,
    /// Runs of 16 codes in the AVX2 kernel's order, inputs `0, 4, 8, 12, 1, 5, 9, 13,
    /// …` (four groups by place in a weight byte).
    ByPlace,
    /// Each token's codes as one row of `i16` (portable).
    Rows,
    /// Each token's codes as one row of `i8` in input order, a multiple of 128 long
    /// (whole pairs of AMX's blocks of 64), a tile's rows together (AMX).
    Tokens,
}

impl Order {
    fn of(kernel: Kernel) -> Self {
        match kernel {
            Kernel::Vnni => Order::Inputs,
            Kernel::Amx => Order::Tokens,
            Kernel::Avx2 | Kernel::AvxVnni => Order::ByPlace,
            Kernel::Portable => Order::Rows,
        }
    }
}

/// Int8 activations in tiles for the CPU product: for each tile of `width` tokens and
/// each column of 16 inputs, `width` runs of 16 codes (zero-padded past `d_in` and past
/// the last token), so a tile's codes for one column lie together; for the AMX kernel,
/// a tile's `width` rows of `stride` codes (zero-padded likewise); or, for the portable
/// kernel, each token's codes in a row of `i16` (`wide`).
struct Tiles {
    codes: Vec<i8>,
    /// Where the tiles start in `codes`.
    first: usize,
    wide: Vec<i16>,
    width: usize,
    columns: usize,
    /// Codes per token in `codes`.
    stride: usize,
    inv_scales: Vec<f32>,
    /// Each token's `Σ x` (the vector kernels multiply codes `q + 1`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    sums: Vec<i32>,
}

impl Tiles {
    fn new(x: &[f32], tokens: usize, d_in: usize, order: Order) -> Self {
        let columns = d_in.div_ceil(16);
        // AMX multiplies pairs of blocks of 64 inputs.
        let stride = match order {
            Order::Tokens => 128 * d_in.div_ceil(128),
            _ => 16 * columns,
        };
        let (rows, inv_scales, sums) = quantize_rows(x, d_in, stride);
        let width = tokens.clamp(1, TILE_TOKENS);
        let (codes, wide, first) = match order {
            Order::Rows => (
                Vec::new(),
                rows.iter().map(|&code| code as i16).collect(),
                0,
            ),
            Order::Tokens => {
                // From a 64-byte boundary, so that each row of a tile is whole lines.
                let (mut codes, start) = aligned_codes(tokens.div_ceil(width) * width * stride);
                codes[start..start + rows.len()].copy_from_slice(&rows);
                (codes, Vec::new(), start)
            }
            _ => (tiled(&rows, tokens, width, stride, order), Vec::new(), 0),
        };
        Self {
            codes,
            first,
            wide,
            width,
            columns,
            stride,
            inv_scales,
            sums,
        }
    }

    /// Tile `i`'s codes (empty in [`Order::Rows`]) and its number of tokens.
    fn tile(&self, i: usize, tokens: usize) -> (&[i8], usize) {
        let size = self.width * self.stride;
        (
            self.codes
                .get(self.first + i * size..self.first + (i + 1) * size)
                .unwrap_or_default(),
            (tokens - i * self.width).min(self.width),
        )
    }
}

/// `len` zero codes from a 64-byte boundary, for AMX's tiles: a buffer and where they
/// start in it.
fn aligned_codes(len: usize) -> (Vec<i8>, usize) {
    let codes = vec![0i8; len + 63];
    let start = codes.as_ptr().align_offset(64);
    (codes, start)
}

/// The vector kernels' tiles of [`Tiles`]: `rows` (`tokens` rows of `stride` codes) as
/// `width` runs of 16 codes per column of each tile, in `order`.
fn tiled(rows: &[i8], tokens: usize, width: usize, stride: usize, order: Order) -> Vec<i8> {
    let mut codes = vec![0i8; tokens.div_ceil(width) * width * stride];
    for (t, row) in rows.chunks_exact(stride).enumerate() {
        let tile = &mut codes[(t / width) * width * stride..][..width * stride];
        for (c, sixteen) in row.chunks_exact(16).enumerate() {
            let run = &mut tile[(c * width + t % width) * 16..][..16];
            if order == Order::ByPlace {
                for (i, code) in run.iter_mut().enumerate() {
                    *code = sixteen[4 * (i % 4) + i / 4];
                }
            } else {
                run.copy_from_slice(sixteen);
            }
        }
    }
    codes
}

/// Where the tasks write `y`: disjoint columns of every token's row.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: each task writes only its own panels' columns.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// One panel of weights against one tile of tokens, written into `y`.
struct PanelJob<'a> {
    /// The panel's `columns × 16` words.
    words: &'a [u32],
    /// The tile's codes: `columns` runs of `width × 16` (the vector kernels').
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    codes: &'a [i8],
    /// Tokens in the tile, and the first one's index.
    tokens: usize,
    first_token: usize,
    x: &'a Tiles,
    gamma: f32,
    y: Output,
    d_out: usize,
    /// The panel's first row (output).
    first_row: usize,
    /// Bytes to bring into cache while the panel computes, a line per column: the next
    /// task's export rows, when computing in place (empty otherwise).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    ahead: &'a [u8],
}

/// `LUT[b]`: the four codes of byte `b` as `i16` weights `q = code − 1`.
const LUT: [[i16; 4]; 256] = {
    let mut lut = [[0i16; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 4 {
            lut[b][k] = ((b >> (2 * k)) & 3) as i16 - 1;
            k += 1;
        }
        b += 1;
    }
    lut
};

thread_local! {
    /// The portable kernel's panel, unpacked into rows of `i16` weights.
    static UNPACKED: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `Σ w·x` of one row of weights against `N` tokens' rows: `i16` products summed in
/// `i32`, which the compiler turns into pairwise multiply-adds (`pmaddwd` on x86,
/// `smlal` on Arm).
#[inline(always)]
fn dots<const N: usize>(w: &[i16], x: [&[i16]; N]) -> [i32; N] {
    let x = x.map(|x| &x[..w.len()]);
    let mut sums = [0i32; N];
    for (i, &w) in w.iter().enumerate() {
        let w = w as i32;
        for (sum, x) in sums.iter_mut().zip(&x) {
            *sum += w * x[i] as i32;
        }
    }
    sums
}

/// Portable kernel: `y[t, o] = Σ q·x · (1/s)·γ` for one [`PanelJob`], in plain Rust
/// the compiler vectorizes (SSE2, NEON, …). The panel's codes are unpacked once into
/// rows of `i16` weights, and each row is a dot product with up to four tokens' rows of
/// `i16` codes at a time, summed exactly in `i32`.
fn panel_portable(job: &PanelJob) {
    let PanelJob {
        words,
        tokens,
        first_token,
        x,
        gamma,
        y,
        d_out,
        first_row,
        ..
    } = *job;
    let d = 16 * x.columns;
    let rows = (d_out - first_row).min(PANEL_ROWS);
    let token_row = |t: usize| &x.wide[(first_token + t) * d..][..d];
    UNPACKED.with_borrow_mut(|weights| {
        weights.resize(rows * d, 0);
        for (r, row) in weights.chunks_exact_mut(d).enumerate() {
            for (c, sixteen) in row.chunks_exact_mut(16).enumerate() {
                let bytes = words[c * PANEL_ROWS + r].to_le_bytes();
                for (four, &b) in sixteen.chunks_exact_mut(4).zip(&bytes) {
                    four.copy_from_slice(&LUT[b as usize]);
                }
            }
        }
        for (r, row) in weights.chunks_exact(d).enumerate() {
            let write = |t: usize, acc: i32| {
                let token = first_token + t;
                let v = acc as f32 * x.inv_scales[token] * gamma;
                // SAFETY: row `first_row + r < d_out` of token `token`, this task's column.
                unsafe { *y.0.add(token * d_out + first_row + r) = v };
            };
            let mut t = 0;
            while t + 4 <= tokens {
                let sums = dots(row, std::array::from_fn::<_, 4, _>(|i| token_row(t + i)));
                for (i, acc) in sums.into_iter().enumerate() {
                    write(t + i, acc);
                }
                t += 4;
            }
            while t < tokens {
                write(t, dots(row, [token_row(t)])[0]);
                t += 1;
            }
        }
    });
}

/// AVX-512 VNNI + VBMI kernel. Codes `c = q + 1 ∈ {0, 1, 2}` are multiplied as unsigned
/// bytes against the signed activations with `vpdpbusd`: `Σ c·x = Σ q·x + Σ x`, so
/// `Σ q·x = Σ c·x − Σ x`, exact in `i32`.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{PanelJob, PANEL_ROWS, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    /// `vpmultishiftqb` selectors: byte `j` of every 64-bit lane takes the two bits of
    /// input `4k + j % 4` of the row in the lane's half `j / 4` (word byte `k`).
    const fn selector(k: u64) -> i64 {
        let mut bits = 0u64;
        let mut j = 0;
        while j < 8 {
            bits |= (32 * (j / 4) + 8 * k + 2 * (j % 4)) << (8 * j);
            j += 1;
        }
        bits as i64
    }

    /// A column of a panel (one 64-byte load: 16 rows × 16 inputs) unpacked into its
    /// four groups of four inputs: group `k` holds each row's codes of inputs `4k` to
    /// `4k + 3`, a byte each (a multishift and a mask).
    #[derive(Clone, Copy)]
    pub(super) struct Unpack {
        select: [__m512i; 4],
        mask: __m512i,
    }

    impl Unpack {
        #[inline(always)]
        pub(super) unsafe fn new() -> Self {
            Self {
                select: [
                    _mm512_set1_epi64(selector(0)),
                    _mm512_set1_epi64(selector(1)),
                    _mm512_set1_epi64(selector(2)),
                    _mm512_set1_epi64(selector(3)),
                ],
                mask: _mm512_set1_epi8(3),
            }
        }

        /// Group `k` of the column `packed`.
        #[inline(always)]
        pub(super) unsafe fn group(&self, packed: __m512i, k: usize) -> __m512i {
            _mm512_and_si512(
                _mm512_multishift_epi64_epi8(self.select[k], packed),
                self.mask,
            )
        }
    }

    #[inline(always)]
    unsafe fn tile<const NT: usize>(
        words: *const u32,
        columns: usize,
        x: *const i8,
        width: usize,
        ahead: &[u8],
    ) -> [__m512i; NT] {
        let unpack = Unpack::new();
        // Few tokens: one accumulator per token and group of four inputs, so that the
        // multiply-adds do not wait on each other; summed at the end.
        let chains = if NT <= 4 { 4 } else { 1 };
        let mut acc = [[_mm512_setzero_si512(); NT]; 4];
        let ahead_lines = ahead.len().div_ceil(64);
        for c in 0..columns {
            if c < ahead_lines {
                _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(64 * c).cast());
            }
            let packed = _mm512_loadu_si512(words.add(c * PANEL_ROWS).cast());
            let x = x.add(c * width * 16);
            for k in 0..4 {
                let w = unpack.group(packed, k);
                for (t, acc) in acc[k % chains].iter_mut().enumerate() {
                    let four = x.add(t * 16 + 4 * k).cast::<i32>().read_unaligned();
                    *acc = _mm512_dpbusd_epi32(*acc, w, _mm512_set1_epi32(four));
                }
            }
        }
        let mut sum = acc[0];
        for chain in &acc[1..chains] {
            for (s, a) in sum.iter_mut().zip(chain) {
                *s = _mm512_add_epi32(*s, *a);
            }
        }
        sum
    }

    #[inline(always)]
    unsafe fn store<const NT: usize>(acc: [__m512i; NT], job: &PanelJob) {
        let PanelJob {
            x,
            first_token,
            gamma,
            y,
            d_out,
            first_row,
            ..
        } = *job;
        let rows = (d_out - first_row).min(PANEL_ROWS);
        let mask = (1u32 << rows).wrapping_sub(1) as u16;
        let gamma = _mm512_set1_ps(gamma);
        for (t, acc) in acc.iter().enumerate() {
            let token = first_token + t;
            let sum = _mm512_set1_epi32(x.sums[token]);
            let inv = _mm512_set1_ps(x.inv_scales[token]);
            // `(a as f32 · 1/s) · γ`, the reference's order.
            let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(*acc, sum));
            let v = _mm512_mul_ps(_mm512_mul_ps(v, inv), gamma);
            _mm512_mask_storeu_ps(y.0.add(token * d_out + first_row), mask, v);
        }
    }

    /// One [`PanelJob`] of 1 to 16 tokens.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
    pub unsafe fn panel(job: &PanelJob) {
        let (w, c, xs, width) = (
            job.words.as_ptr(),
            job.x.columns,
            job.codes.as_ptr(),
            job.x.width,
        );
        macro_rules! run {
            ($($n:literal)*) => {
                match job.tokens {
                    $($n => store::<$n>(tile::<$n>(w, c, xs, width, job.ahead), job),)*
                    _ => unreachable!("tiles hold 1 to 16 tokens"),
                }
            };
        }
        run!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
    }

    /// [`super::interleave`]'s whole blocks of 16 columns in one panel: 64 bytes of each
    /// of the 16 rows, transposed as a 16 × 16 matrix of words in registers. Returns the
    /// columns written; the rest are the caller's.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn interleave_blocks(
        rows: &[u8],
        row_bytes: usize,
        panel: &mut [u32],
        stream: bool,
        ahead: &[u8],
    ) -> usize {
        let present = rows.len() / row_bytes.max(1);
        let pad = _mm512_set1_epi32(super::PAD_WORD as i32);
        // Streaming stores (no read of the destination first) where asked and the panel
        // is aligned to cache lines, as [`super::HostWords`] is.
        let stream = stream && (panel.as_ptr() as usize).is_multiple_of(64);
        let blocks = row_bytes / 64;
        for block in 0..blocks {
            let mut r = [pad; 16];
            for (i, r) in r.iter_mut().enumerate().take(present) {
                let at = rows.as_ptr().add(i * row_bytes + 64 * block);
                // Sixteen rows read side by side outrun the hardware prefetcher.
                super::prefetch_ahead(at, ahead, block, i);
                *r = _mm512_loadu_si512(at.cast());
            }
            // Pairs of rows, then quads: `u[4g + k]` holds column `4L + k` of rows
            // `4g..4g + 4` in its 128-bit lane `L`.
            let mut u = [pad; 16];
            for g in 0..4 {
                let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
                let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
                let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
                u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
                u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
                u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
                u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
            }
            // Lanes across the four quads: column `k + 4j` of all 16 rows.
            let out = panel.as_mut_ptr().add(16 * block * PANEL_ROWS);
            for k in 0..4 {
                let (a, b, c, d) = (u[k], u[4 + k], u[8 + k], u[12 + k]);
                let v0 = _mm512_shuffle_i32x4::<0x88>(a, b);
                let v1 = _mm512_shuffle_i32x4::<0xdd>(a, b);
                let v2 = _mm512_shuffle_i32x4::<0x88>(c, d);
                let v3 = _mm512_shuffle_i32x4::<0xdd>(c, d);
                for (column, v) in [
                    (k, _mm512_shuffle_i32x4::<0x88>(v0, v2)),
                    (k + 4, _mm512_shuffle_i32x4::<0x88>(v1, v3)),
                    (k + 8, _mm512_shuffle_i32x4::<0xdd>(v0, v2)),
                    (k + 12, _mm512_shuffle_i32x4::<0xdd>(v1, v3)),
                ] {
                    let at = out.add(column * PANEL_ROWS).cast();
                    if stream {
                        _mm512_stream_si512(at, v);
                    } else {
                        _mm512_storeu_si512(at, v);
                    }
                }
            }
        }
        // The streaming stores are complete before the buffer changes hands.
        if stream {
            _mm_sfence();
        }
        16 * blocks
    }

    /// Rows `rows` of a product on codes in the export's rows, against `NT` tokens
    /// ([`super::DirectJob`]), without rearranging them: each 64 bytes of a row (256
    /// inputs) shifted right by `2k` and masked to 2 bits per byte give the codes of inputs
    /// `4i + k`, multiplied against the activations stored in that order, four
    /// accumulators per token (one per `k`) summed across their lanes at the row's end.
    /// The codes [`PREFETCH_AHEAD`] bytes on are requested meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn rows<const NT: usize>(job: &super::DirectJob, rows: std::ops::Range<usize>) {
        let (row_bytes, stride) = (job.row_bytes, job.stride);
        let mask = _mm512_set1_epi8(3);
        let (full, tail) = (row_bytes / 64, row_bytes % 64);
        let tail_mask = (1u64 << tail).wrapping_sub(1);
        let x = job.x.as_ptr();
        for r in rows {
            let row = job.row(r).as_ptr();
            let mut acc = [[_mm512_setzero_si512(); NT]; 4];
            let mut block = |m: usize, w: __m512i| {
                let codes = [
                    _mm512_and_si512(w, mask),
                    _mm512_and_si512(_mm512_srli_epi16::<2>(w), mask),
                    _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask),
                    _mm512_and_si512(_mm512_srli_epi16::<6>(w), mask),
                ];
                for (k, (codes, acc)) in codes.iter().zip(&mut acc).enumerate() {
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let xs = _mm512_loadu_si512(x.add(t * stride + 256 * m + 64 * k).cast());
                        *acc = _mm512_dpbusd_epi32(*acc, *codes, xs);
                    }
                }
            };
            for m in 0..full {
                // Past the codes' end, the address is only a hint: a prefetch never
                // faults.
                let ahead = row.wrapping_add(64 * m + PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                block(m, _mm512_loadu_si512(row.add(64 * m).cast()));
            }
            if tail > 0 {
                // Bytes past the row stay unread: zero codes against zero activations.
                block(
                    full,
                    _mm512_maskz_loadu_epi8(tail_mask, row.add(64 * full).cast()),
                );
            }
            let [a, b, c, d] = acc;
            for (t, (((a, b), c), d)) in a.iter().zip(&b).zip(&c).zip(&d).enumerate() {
                let total = _mm512_add_epi32(_mm512_add_epi32(*a, *b), _mm512_add_epi32(*c, *d));
                job.store(t, r, _mm512_reduce_add_epi32(total));
            }
        }
    }

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
    }
}

/// AMX kernel (Intel Xeons from Sapphire Rapids on): each block of 64 inputs of a panel
/// is one tile multiply, `tdpbsud`, of the tile's tokens (rows of 64 signed codes, `A`)
/// against the panel's 16 rows (`B`: 16 rows of 64 unsigned codes, row `4j + k` holding
/// each output's inputs `16j + 4k … 16j + 4k + 3`, which is what the AVX-512 kernel's
/// multishift and mask give for column `j`, group `k`), summed in a 16 × 16 tile of
/// `i32`: 16 tokens × 16 rows × 64 inputs per instruction, where `vpdpbusd` does 64
/// multiply-adds. The codes are unpacked as in [`vnni`] into a 1 KiB buffer that the
/// tile loads from the first-level cache. `Σ q·x = Σ c·x − Σ x` as in the other kernels.
/// Even and odd blocks sum into two tiles, so that each multiply waits less on the one
/// before. Stable Rust has no AMX intrinsics: the tile instructions are inline assembly.
#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{vnni, PanelJob, PANEL_ROWS};
    use std::arch::{asm, x86_64::*};

    /// Palette 1's tile configuration, as `ldtilecfg` reads it.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        bytes_per_row: [u16; 16],
        rows: [u8; 16],
    }

    impl Config {
        /// Tiles `tmm0` to `tmm{N-1}` of `bytes_per_row` × `rows`, the others unused.
        fn tiles<const N: usize>(bytes_per_row: [u16; N], rows: [u8; N]) -> Self {
            let mut config = Config {
                palette: 1,
                start_row: 0,
                reserved: [0; 14],
                bytes_per_row: [0; 16],
                rows: [0; 16],
            };
            config.bytes_per_row[..N].copy_from_slice(&bytes_per_row);
            config.rows[..N].copy_from_slice(&rows);
            config
        }
    }

    /// Two chains of tile multiplies, even and odd blocks, so that each waits less on
    /// its sums: `tmm0`, `tmm1` the sums, `width` tokens × 16 `i32`; `tmm2`, `tmm3` the
    /// tokens' codes, `width` rows of 64; `tmm4`, `tmm5` the panel's codes, 16 rows of
    /// 64.
    fn config(width: usize) -> Config {
        let w = width as u8;
        Config::tiles([64; 6], [w, w, w, w, 16, 16])
    }

    /// A block's unpacked codes, the `B` of one tile multiply.
    #[repr(C, align(64))]
    struct Block([[u8; 64]; 16]);

    /// Unpacks block `b` of a panel's `columns` (zero codes past the last) into `block`,
    /// prefetching a line of `ahead` per column.
    #[inline(always)]
    unsafe fn unpack(words: &[u32], columns: usize, b: usize, ahead: &[u8], block: &mut Block) {
        let unpack = vnni::Unpack::new();
        for j in 0..4 {
            let c = 4 * b + j;
            if 64 * c < ahead.len() {
                _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(64 * c).cast());
            }
            // Past the last column: zero codes, against zero activations.
            let packed = match c < columns {
                true => _mm512_loadu_si512(words.as_ptr().add(c * PANEL_ROWS).cast()),
                false => _mm512_setzero_si512(),
            };
            for k in 0..4 {
                let w = unpack.group(packed, k);
                _mm512_store_si512(block.0[4 * j + k].as_mut_ptr().cast(), w);
            }
        }
    }

    /// One [`PanelJob`] of 1 to 16 tokens, the tile's codes in rows of `x.stride` (a
    /// multiple of 128) from a 64-byte boundary. The tile state is released at the end:
    /// a thread between products holds none for the kernel to save when it switches.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub unsafe fn panel(job: &PanelJob) {
        let PanelJob {
            words,
            codes,
            tokens,
            first_token,
            x,
            gamma,
            y,
            d_out,
            first_row,
            ahead,
        } = *job;
        let columns = x.columns;
        let blocks = columns.div_ceil(4);
        let config = config(x.width);
        let pairs = blocks.div_ceil(2);
        // Two pairs of blocks, one multiplied while the next is unpacked, so that the
        // tile loads read codes stored a pair earlier. Every block is written before it
        // is read.
        let mut ring = std::mem::MaybeUninit::<[Block; 4]>::uninit();
        let ring = ring.as_mut_ptr().cast::<Block>();
        let mut sums = [[[0i32; 16]; 16]; 2];
        asm!("ldtilecfg [{}]", in(reg) &config as *const Config, options(nostack, readonly));
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        // An odd last block pairs with zero codes, against the zeros that pad the
        // tokens' rows to whole pairs of blocks.
        unpack(words, columns, 0, ahead, &mut *ring);
        unpack(words, columns, 1, ahead, &mut *ring.add(1));
        for p in 0..pairs {
            if p + 1 < pairs {
                let next = ring.add(2 * ((p + 1) % 2));
                unpack(words, columns, 2 * p + 2, ahead, &mut *next);
                unpack(words, columns, 2 * p + 3, ahead, &mut *next.add(1));
            }
            let b = 2 * p;
            asm!(
                "tileloadd tmm2, [{x} + {stride}*1]",
                "tileloadd tmm4, [{w} + {row}*1]",
                "tdpbsud tmm0, tmm2, tmm4",
                "tileloadd tmm3, [{x} + {stride}*1 + 64]",
                "tileloadd tmm5, [{w} + {row}*1 + 1024]",
                "tdpbsud tmm1, tmm3, tmm5",
                x = in(reg) codes.as_ptr().add(64 * b),
                stride = in(reg) x.stride,
                w = in(reg) ring.add(2 * (p % 2)),
                row = in(reg) 64usize,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{even} + {row}*1], tmm0",
            "tilestored [{odd} + {row}*1], tmm1",
            "tilerelease",
            even = in(reg) sums[0].as_mut_ptr(),
            odd = in(reg) sums[1].as_mut_ptr(),
            row = in(reg) 64usize,
            options(nostack),
        );
        let rows = (d_out - first_row).min(PANEL_ROWS);
        let store = (1u32 << rows).wrapping_sub(1) as u16;
        let gamma = _mm512_set1_ps(gamma);
        let [even, odd] = &sums;
        for (t, (even, odd)) in even.iter().zip(odd).take(tokens).enumerate() {
            let token = first_token + t;
            let even = _mm512_loadu_si512(even.as_ptr().cast());
            let odd = _mm512_loadu_si512(odd.as_ptr().cast());
            let acc = _mm512_add_epi32(even, odd);
            let sum = _mm512_set1_epi32(x.sums[token]);
            let inv = _mm512_set1_ps(x.inv_scales[token]);
            // `(a as f32 · 1/s) · γ`, the reference's order.
            let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, sum));
            let v = _mm512_mul_ps(_mm512_mul_ps(v, inv), gamma);
            _mm512_mask_storeu_ps(y.0.add(token * d_out + first_row), store, v);
        }
    }

    /// The codes of 16 rows for one block of 256 inputs, by their place in a weight
    /// byte: `[k][m]` holds row `m`'s codes of inputs `4i + k`, `i` < 64, the `A` of one
    /// tile multiply for each `k`.
    #[repr(C, align(64))]
    struct Places([[[u8; 64]; 16]; 4]);

    /// [`rows`]' outputs of 16 rows (each row's 16 tokens), before they go to `y`.
    #[repr(C, align(64))]
    struct Values([[f32; 16]; 16]);

    /// `rows` of a product on the export's rows ([`super::DirectJob`]), from a multiple
    /// of 16, without rearranging them: the 64 bytes of a row that hold a block of 256
    /// inputs, split by place in a byte (bits `2k`, `2k + 1` of each byte to bits 0, 1,
    /// one GFNI affine transform each), are the row's codes of inputs `4i + k`, which is
    /// a tile's row as it stands. So each group of 16 rows takes four tile multiplies
    /// (`tdpbusd`, the codes unsigned) per block, of 16 rows × 64 inputs against the
    /// tokens' codes of the same inputs, laid out once per product
    /// ([`super::amx_tokens`]). Two groups go together, so that each tile of the
    /// tokens' codes loaded serves both, each group in two chains of sums (even and odd
    /// places); and each block is unpacked while the block before it is multiplied, so
    /// that the tile loads read codes stored a block earlier. The tile state is released
    /// at the end.
    #[target_feature(enable = "avx512f,avx512bw,gfni")]
    pub unsafe fn rows(job: &super::DirectJob, rows: std::ops::Range<usize>) {
        let super::DirectJob {
            bytes,
            row_bytes,
            x,
            stride,
            inv_scales,
            sums,
            gamma,
            y,
            d_out,
        } = *job;
        let (tokens, blocks) = (inv_scales.len(), stride / 256);
        // Bit `i` of each byte of a product by `place[k]` is the parity of the byte
        // masked by byte `7 − i` of the matrix: bits `2k`, `2k + 1` to bits 0, 1.
        let place: [__m512i; 4] = std::array::from_fn(|k| {
            _mm512_set1_epi64((1i64 << (2 * k + 56)) | (1i64 << (2 * k + 1 + 48)))
        });
        let full = row_bytes / 64;
        let tail_mask = (1u64 << (row_bytes % 64)).wrapping_sub(1);
        // Two blocks' codes of the two groups, `[block % 2][group]`; every place of a
        // block is written before it is read.
        let mut ring = std::mem::MaybeUninit::<[[Places; 2]; 2]>::uninit();
        let ring = ring.as_mut_ptr().cast::<[Places; 2]>();
        // Each group's sums, `[group][even, odd]`.
        let mut out = [[[[0i32; 16]; 16]; 2]; 2];
        let mut values = Values([[0f32; 16]; 16]);
        let gamma = _mm512_set1_ps(gamma);
        // Where each row's value for one token lies in `values`.
        let column = _mm512_mullo_epi32(
            _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
            _mm512_set1_epi32(16),
        );
        let mut configured = None;
        for first_row in rows.clone().step_by(32) {
            // A lone last group is multiplied twice, its copy's sums left unread.
            let first = [first_row, (first_row + 16).min(rows.end - 1) / 16 * 16];
            let groups = if first[1] == first[0] { 1 } else { 2 };
            let counts = first.map(|f| (d_out - f).min(16));
            let bases = first.map(|f| bytes.as_ptr().add(f * row_bytes));
            // Block `b`'s codes of both groups' rows by place, into `into`.
            let unpack = |b: usize, into: *mut [Places; 2], prefetch: bool| {
                for (g, base) in bases.iter().enumerate() {
                    for m in 0..counts[g] {
                        let row = base.add(m * row_bytes);
                        if prefetch {
                            // The next pair's line in the same place: the rows of a pair
                            // lie together, the next after them. Past the codes' end,
                            // the address is only a hint: a prefetch never faults.
                            _mm_prefetch::<_MM_HINT_T1>(
                                row.wrapping_add(32 * row_bytes + 64 * b).cast(),
                            );
                        }
                        // Bytes past the row stay unread: codes against zero activations.
                        let w = match b < full {
                            true => _mm512_loadu_si512(row.add(64 * b).cast()),
                            false => _mm512_maskz_loadu_epi8(tail_mask, row.add(64 * b).cast()),
                        };
                        for (k, place) in place.iter().enumerate() {
                            let codes = _mm512_gf2p8affine_epi64_epi8::<0>(w, *place);
                            _mm512_store_si512((*into)[g].0[k][m].as_mut_ptr().cast(), codes);
                        }
                    }
                }
            };
            for tile in 0..tokens.div_ceil(16) {
                let n = (tokens - 16 * tile).min(16);
                if configured != Some((counts, n)) {
                    let config = rows_config(counts, n);
                    asm!("ldtilecfg [{}]", in(reg) &config as *const Config, options(nostack, readonly));
                    configured = Some((counts, n));
                }
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                let tokens_codes = x.as_ptr().add(tile * blocks * 4096);
                unpack(0, ring, tile == 0);
                for b in 0..blocks {
                    if b + 1 < blocks {
                        unpack(b + 1, ring.add((b + 1) % 2), tile == 0);
                    }
                    // Place `k` of the tokens (`tmm4`) against place `k` of each group
                    // (`tmm5`, `tmm6`: the group's places 4 KiB apart).
                    asm!(
                        "tileloadd tmm4, [{x} + {stride}*1]",
                        "tileloadd tmm5, [{w} + {stride}*1]",
                        "tdpbusd tmm0, tmm5, tmm4",
                        "tileloadd tmm6, [{w} + {stride}*1 + 4096]",
                        "tdpbusd tmm2, tmm6, tmm4",
                        "tileloadd tmm4, [{x} + {stride}*1 + 1024]",
                        "tileloadd tmm5, [{w} + {stride}*1 + 1024]",
                        "tdpbusd tmm1, tmm5, tmm4",
                        "tileloadd tmm6, [{w} + {stride}*1 + 5120]",
                        "tdpbusd tmm3, tmm6, tmm4",
                        "tileloadd tmm4, [{x} + {stride}*1 + 2048]",
                        "tileloadd tmm5, [{w} + {stride}*1 + 2048]",
                        "tdpbusd tmm0, tmm5, tmm4",
                        "tileloadd tmm6, [{w} + {stride}*1 + 6144]",
                        "tdpbusd tmm2, tmm6, tmm4",
                        "tileloadd tmm4, [{x} + {stride}*1 + 3072]",
                        "tileloadd tmm5, [{w} + {stride}*1 + 3072]",
                        "tdpbusd tmm1, tmm5, tmm4",
                        "tileloadd tmm6, [{w} + {stride}*1 + 7168]",
                        "tdpbusd tmm3, tmm6, tmm4",
                        w = in(reg) ring.add(b % 2),
                        x = in(reg) tokens_codes.add(b * 4096),
                        stride = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                }
                asm!(
                    "tilestored [{out} + {stride}*1], tmm0",
                    "tilestored [{out} + {stride}*1 + 1024], tmm1",
                    "tilestored [{out} + {stride}*1 + 2048], tmm2",
                    "tilestored [{out} + {stride}*1 + 3072], tmm3",
                    out = in(reg) out.as_mut_ptr(),
                    stride = in(reg) 64usize,
                    options(nostack),
                );
                // Row `m` of a group's sums holds its output for each token: `(a as f32
                // · 1/s) · γ`, the reference's order, into `values[m]`, then each
                // token's column of `values` into its row of `y`.
                let t0 = 16 * tile;
                let keep = (1u32 << n).wrapping_sub(1) as u16;
                let sum = _mm512_maskz_loadu_epi32(keep, sums.as_ptr().add(t0).cast());
                let inv = _mm512_maskz_loadu_ps(keep, inv_scales.as_ptr().add(t0));
                for (g, [even, odd]) in out.iter().enumerate().take(groups) {
                    let rows = counts[g];
                    for (m, (even, odd)) in even.iter().zip(odd).take(rows).enumerate() {
                        let even = _mm512_loadu_si512(even.as_ptr().cast());
                        let odd = _mm512_loadu_si512(odd.as_ptr().cast());
                        let acc = _mm512_sub_epi32(_mm512_add_epi32(even, odd), sum);
                        let v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), inv), gamma);
                        _mm512_store_ps(values.0[m].as_mut_ptr(), v);
                    }
                    let store = (1u32 << rows).wrapping_sub(1) as u16;
                    for t in 0..n {
                        let at = values.0.as_ptr().cast::<f32>().add(t);
                        let v = _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            store,
                            column,
                            at.cast(),
                        );
                        _mm512_mask_storeu_ps(y.0.add((t0 + t) * d_out + first[g]), store, v);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// [`rows`]' tiles for two groups of `counts` rows and `n` tokens: `tmm0`, `tmm1`
    /// the first group's sums (`i32`, a row's for each token), `tmm2`, `tmm3` the
    /// second's; `tmm4` the tokens' codes of one place, 16 groups of four inputs × `n`
    /// tokens; `tmm5`, `tmm6` each group's codes of that place, its rows × 64.
    fn rows_config(counts: [usize; 2], n: usize) -> Config {
        let [r0, r1] = counts.map(|c| c as u8);
        let c = 4 * n as u16;
        Config::tiles([c, c, c, c, c, 64, 64], [r0, r0, r1, r1, 16, r0, r1])
    }

    /// Whether this CPU has AMX's tiles and int8 products, and Linux lets this process
    /// use their state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked
    /// once), besides the AVX-512 and GFNI that unpack the codes.
    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            // CPUID leaf 7 exists on every CPU with AVX-512 (checked first). GFNI
            // unpacks codes in the export's rows.
            let tiles = vnni::available() && std::arch::is_x86_feature_detected!("gfni") && {
                let edx = __cpuid_count(7, 0).edx;
                edx & (1 << 24) != 0 && edx & (1 << 25) != 0
            };
            #[cfg(target_os = "linux")]
            {
                const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
                const XFEATURE_XTILEDATA: libc::c_long = 18;
                // SAFETY: a request for a permission; no memory is passed.
                tiles
                    && unsafe {
                        libc::syscall(
                            libc::SYS_arch_prctl,
                            ARCH_REQ_XCOMP_PERM,
                            XFEATURE_XTILEDATA,
                        )
                    } == 0
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = tiles;
                false
            }
        })
    }
}

/// AVX2 kernels, for CPUs without AVX-512 VNNI. Half a panel (8 rows, one per 32-bit
/// lane) at a time: shifting each word by `2j` and masking every byte to 2 bits gives
/// vector `j`, whose byte `k` in each row's lane is the code of input `4k + j`. The tile's
/// activations are stored in that order (inputs `j, 4 + j, 8 + j, 12 + j` together), so
/// each vector multiplies four inputs of eight rows against one broadcast: four unpacking
/// steps per 16 inputs, where the AVX-512 kernel takes four multishifts. Two ways to sum
/// the products ([`Dot`]): AVX2's `vpmaddubsw`, into 16-bit pair sums of at most
/// 2·2·128 = 512, widened to 32 bits every 15 columns; or, where the CPU has AVX-VNNI,
/// `vpdpbusd` straight into 32 bits. `Σ q·x = Σ c·x − Σ x` as in the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PanelJob, PANEL_ROWS, PREFETCH_AHEAD};
    use std::arch::x86_64::*;

    /// Tokens computed together: their sums and a half panel's four weight vectors fit
    /// the 16 registers.
    const GROUP: usize = 8;

    /// How the kernels sum codes (unsigned bytes) times activations (signed bytes) into
    /// each 32-bit lane, four products a lane.
    pub trait Dot {
        /// Columns (panel kernel) or 32-byte blocks (direct kernel) an accumulator may
        /// take between two [`Dot::widen`]s, at most four [`Dot::add`]s each.
        const RUN: usize;
        /// `acc` plus the products of `codes` and `x`, in the accumulator's form.
        unsafe fn add(acc: __m256i, codes: __m256i, x: __m256i) -> __m256i;
        /// The accumulator's sums in 32 bits.
        unsafe fn widen(acc: __m256i) -> __m256i;
    }

    /// AVX2: `vpmaddubsw` into 16-bit pair sums of at most 512, widened by `vpmaddwd`
    /// every 15 columns or blocks: 15 × 4 × 512 = 30,720 < 2¹⁵.
    pub enum Pairs {}

    impl Dot for Pairs {
        const RUN: usize = 15;
        #[inline(always)]
        unsafe fn add(acc: __m256i, codes: __m256i, x: __m256i) -> __m256i {
            _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, x))
        }
        #[inline(always)]
        unsafe fn widen(acc: __m256i) -> __m256i {
            _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
        }
    }

    /// AVX-VNNI: `vpdpbusd`, four products summed into each 32-bit lane in one
    /// instruction, which never needs widening.
    pub enum Quads {}

    impl Dot for Quads {
        const RUN: usize = usize::MAX;
        #[inline(always)]
        unsafe fn add(acc: __m256i, codes: __m256i, x: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, codes, x)
        }
        #[inline(always)]
        unsafe fn widen(acc: __m256i) -> __m256i {
            acc
        }
    }

    /// `Σ c·x` of 8 rows (`words`: their column words, 16 apart) for `NT` tokens.
    #[inline(always)]
    unsafe fn sums<D: Dot, const NT: usize>(
        words: *const u32,
        columns: usize,
        x: *const i8,
        width: usize,
        ahead: &[u8],
    ) -> [__m256i; NT] {
        let mask = _mm256_set1_epi8(3);
        // Few tokens: one chain per place, so that the additions do not wait on each other.
        let chains = if NT <= 2 { 4 } else { 1 };
        let ahead_lines = ahead.len().div_ceil(64);
        let mut wide = [_mm256_setzero_si256(); NT];
        let mut start = 0;
        while start < columns {
            let end = columns.min(start.saturating_add(D::RUN));
            let mut acc = [[_mm256_setzero_si256(); NT]; 4];
            for c in start..end {
                if c < ahead_lines {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.as_ptr().add(64 * c).cast());
                }
                let packed = _mm256_loadu_si256(words.add(c * PANEL_ROWS).cast());
                let w = [
                    _mm256_and_si256(packed, mask),
                    _mm256_and_si256(_mm256_srli_epi32::<2>(packed), mask),
                    _mm256_and_si256(_mm256_srli_epi32::<4>(packed), mask),
                    _mm256_and_si256(_mm256_srli_epi32::<6>(packed), mask),
                ];
                let x = x.add(c * width * 16);
                for (j, w) in w.iter().enumerate() {
                    for (t, acc) in acc[j % chains].iter_mut().enumerate() {
                        let four = x.add(t * 16 + 4 * j).cast::<i32>().read_unaligned();
                        *acc = D::add(*acc, *w, _mm256_set1_epi32(four));
                    }
                }
            }
            for chain in &acc[..chains] {
                for (wide, acc) in wide.iter_mut().zip(chain) {
                    *wide = _mm256_add_epi32(*wide, D::widen(*acc));
                }
            }
            start = end;
        }
        wide
    }

    /// Writes rows `8·half..` of the panel for tokens `first..first + NT` of the tile.
    #[inline(always)]
    unsafe fn store<const NT: usize>(
        acc: [__m256i; NT],
        job: &PanelJob,
        first: usize,
        half: usize,
    ) {
        let PanelJob {
            x,
            first_token,
            gamma,
            y,
            d_out,
            first_row,
            ..
        } = *job;
        let row = first_row + 8 * half;
        let rows = (d_out - row).min(8) as i32;
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), lanes);
        let gamma = _mm256_set1_ps(gamma);
        for (t, acc) in acc.iter().enumerate() {
            let token = first_token + first + t;
            let sum = _mm256_set1_epi32(x.sums[token]);
            let inv = _mm256_set1_ps(x.inv_scales[token]);
            // `(a as f32 · 1/s) · γ`, the reference's order.
            let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(*acc, sum));
            let v = _mm256_mul_ps(_mm256_mul_ps(v, inv), gamma);
            _mm256_maskstore_ps(y.0.add(token * d_out + row), mask, v);
        }
    }

    /// Rows `rows` of a product on codes in the export's rows, against `NT` tokens
    /// ([`super::DirectJob`], 128 inputs a block), without rearranging them: each 32
    /// bytes of a row shifted right by `2k` and masked give the codes of inputs `4i + k`,
    /// multiplied four inputs per place against the activations stored in that order
    /// and summed by `D`, then across lanes at the row's end. The codes
    /// [`PREFETCH_AHEAD`] bytes on are requested meanwhile, as in [`super::vnni::rows`].
    #[inline(always)]
    unsafe fn rows_with<D: Dot, const NT: usize>(
        job: &super::DirectJob,
        rows: std::ops::Range<usize>,
    ) {
        let (row_bytes, stride) = (job.row_bytes, job.stride);
        let mask = _mm256_set1_epi8(3);
        let chains = if NT <= 2 { 4 } else { 1 };
        let blocks = row_bytes.div_ceil(32);
        let x = job.x.as_ptr();
        for r in rows {
            let row = job.row(r);
            let mut wide = [_mm256_setzero_si256(); NT];
            let mut start = 0;
            while start < blocks {
                let end = blocks.min(start.saturating_add(D::RUN));
                let mut acc = [[_mm256_setzero_si256(); NT]; 4];
                for m in start..end {
                    if m % 2 == 0 {
                        // A line ahead per 64 bytes; past the codes' end, the address is
                        // only a hint: a prefetch never faults.
                        let ahead = row.as_ptr().wrapping_add(32 * m + PREFETCH_AHEAD);
                        _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                    }
                    let w = match row.get(32 * m..32 * m + 32) {
                        Some(whole) => _mm256_loadu_si256(whole.as_ptr().cast()),
                        None => {
                            // The row's last bytes, then zero codes against zero
                            // activations.
                            let mut last = [0u8; 32];
                            last[..row_bytes - 32 * m].copy_from_slice(&row[32 * m..]);
                            _mm256_loadu_si256(last.as_ptr().cast())
                        }
                    };
                    let codes = [
                        _mm256_and_si256(w, mask),
                        _mm256_and_si256(_mm256_srli_epi16::<2>(w), mask),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask),
                        _mm256_and_si256(_mm256_srli_epi16::<6>(w), mask),
                    ];
                    for (k, codes) in codes.iter().enumerate() {
                        for (t, acc) in acc[k % chains].iter_mut().enumerate() {
                            let xs =
                                _mm256_loadu_si256(x.add(t * stride + 128 * m + 32 * k).cast());
                            *acc = D::add(*acc, *codes, xs);
                        }
                    }
                }
                for chain in &acc[..chains] {
                    for (wide, acc) in wide.iter_mut().zip(chain) {
                        *wide = _mm256_add_epi32(*wide, D::widen(*acc));
                    }
                }
                start = end;
            }
            for (t, wide) in wide.iter().enumerate() {
                let half = _mm_add_epi32(
                    _mm256_castsi256_si128(*wide),
                    _mm256_extracti128_si256::<1>(*wide),
                );
                let half = _mm_add_epi32(half, _mm_shuffle_epi32::<0b01_00_11_10>(half));
                let half = _mm_add_epi32(half, _mm_shuffle_epi32::<0b10_11_00_01>(half));
                job.store(t, r, _mm_cvtsi128_si32(half));
            }
        }
    }

    /// [`rows_with`] on AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows<const NT: usize>(job: &super::DirectJob, rows: std::ops::Range<usize>) {
        rows_with::<Pairs, NT>(job, rows)
    }

    /// [`rows_with`] on AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn rows_vnni<const NT: usize>(job: &super::DirectJob, rows: std::ops::Range<usize>) {
        rows_with::<Quads, NT>(job, rows)
    }

    /// One [`PanelJob`] of 1 to 16 tokens, its codes in the AVX2 order, summed by `D`.
    #[inline(always)]
    unsafe fn panel_with<D: Dot>(job: &PanelJob) {
        let (columns, width) = (job.x.columns, job.x.width);
        for half in 0..PANEL_ROWS / 8 {
            if job.first_row + 8 * half >= job.d_out {
                break;
            }
            let words = job.words.as_ptr().add(8 * half);
            let mut first = 0;
            while first < job.tokens {
                let n = (job.tokens - first).min(GROUP);
                let x = job.codes.as_ptr().add(16 * first);
                let ahead = if half == 0 && first == 0 {
                    job.ahead
                } else {
                    &[]
                };
                macro_rules! run {
                    ($($n:literal)*) => {
                        match n {
                            $($n => store::<$n>(sums::<D, $n>(words, columns, x, width, ahead), job, first, half),)*
                            _ => unreachable!("groups hold 1 to {GROUP} tokens"),
                        }
                    };
                }
                run!(1 2 3 4 5 6 7 8);
                first += n;
            }
        }
    }

    /// [`panel_with`] on AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn panel(job: &PanelJob) {
        panel_with::<Pairs>(job)
    }

    /// [`panel_with`] on AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn panel_vnni(job: &PanelJob) {
        panel_with::<Quads>(job)
    }

    pub fn vnni_available() -> bool {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("avxvnni")
    }

    /// [`super::interleave`]'s whole blocks of 8 columns in one panel: 32 bytes of each
    /// of the 16 rows, transposed as two 8 × 8 matrices of words in registers. Returns
    /// the columns written; the rest are the caller's.
    #[target_feature(enable = "avx2")]
    pub unsafe fn interleave_blocks(
        rows: &[u8],
        row_bytes: usize,
        panel: &mut [u32],
        stream: bool,
        ahead: &[u8],
    ) -> usize {
        let present = rows.len() / row_bytes.max(1);
        let pad = _mm256_set1_epi32(super::PAD_WORD as i32);
        // Streaming stores where asked and the panel is aligned to cache lines.
        let stream = stream && (panel.as_ptr() as usize).is_multiple_of(64);
        let blocks = row_bytes / 32;
        for block in 0..blocks {
            let out = panel.as_mut_ptr().add(8 * block * PANEL_ROWS);
            for half in 0..2 {
                let mut r = [pad; 8];
                for (i, r) in r.iter_mut().enumerate() {
                    let row = 8 * half + i;
                    if row >= present {
                        break;
                    }
                    let at = rows.as_ptr().add(row * row_bytes + 32 * block);
                    // A line per row and 64 bytes, as in the AVX-512 transposer.
                    if block % 2 == 0 {
                        super::prefetch_ahead(at, ahead, block / 2, row);
                    }
                    *r = _mm256_loadu_si256(at.cast());
                }
                // Pairs of rows, then quads: `u[4g + k]` holds column `k` (low lane) and
                // `k + 4` (high lane) of rows `4g..4g + 4`.
                let mut u = [pad; 8];
                for g in 0..2 {
                    let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
                    let (t0, t1) = (_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
                    let (t2, t3) = (_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
                    u[4 * g] = _mm256_unpacklo_epi64(t0, t2);
                    u[4 * g + 1] = _mm256_unpackhi_epi64(t0, t2);
                    u[4 * g + 2] = _mm256_unpacklo_epi64(t1, t3);
                    u[4 * g + 3] = _mm256_unpackhi_epi64(t1, t3);
                }
                for k in 0..4 {
                    for (column, v) in [
                        (k, _mm256_permute2x128_si256::<0x20>(u[k], u[4 + k])),
                        (k + 4, _mm256_permute2x128_si256::<0x31>(u[k], u[4 + k])),
                    ] {
                        let at = out.add(column * PANEL_ROWS + 8 * half).cast();
                        if stream {
                            _mm256_stream_si256(at, v);
                        } else {
                            _mm256_storeu_si256(at, v);
                        }
                    }
                }
            }
        }
        // The streaming stores are complete before the buffer changes hands.
        if stream {
            _mm_sfence();
        }
        8 * blocks
    }
}

/// Whether the AVX-512 VNNI kernels of [`crate::int8`] run on this CPU.
pub(crate) fn use_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && crate::isa::allows(crate::isa::Tier::Avx512)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Tokens from which [`cpu_gemm`] runs the AMX kernel: a tile multiply takes as long
/// for one token as for 16, and below 5 the AVX-512 kernel is faster. On 2 cores of an
/// Intel Xeon with AMX, 1B's FFN up-projection (5,632 × 2,048) from the CPU layout, in
/// G multiply-adds/s, AMX against AVX-512 VNNI: 91 against 145 at 1 token, 255 against
/// 379 at 4, 351-382 against 304-309 at 5, 837 against 498 at 16.
pub const AMX_TOKENS: usize = 5;

/// The CPU product's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust: `i16` dot products of each weight row with four tokens at a time,
    /// which the compiler vectorizes.
    Portable,
    /// AVX2: `vpmaddubsw` on codes split by their place in each byte.
    Avx2,
    /// AVX-VNNI: AVX2's kernel with `vpdpbusd` (256-bit) in place of `vpmaddubsw`, no
    /// widening.
    AvxVnni,
    /// AVX-512 VNNI + VBMI: `vpdpbusd` on codes unpacked with `vpmultishiftqb`.
    Vnni,
    /// AMX: the AVX-512 kernel's unpacking, and a 16 × 16 × 64 tile multiply
    /// (`tdpbsud`) per block of 64 inputs; in place, the export's rows as tiles
    /// (`tdpbusd`), each row's codes split by their place in a byte with GFNI.
    Amx,
}

impl Kernel {
    /// The kernels this CPU can run, narrowest first, whatever `TRITTER_CPU_KERNELS` says.
    pub fn supported() -> Vec<Kernel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
            }
            if avx2::vnni_available() {
                kernels.push(Kernel::AvxVnni);
            }
            if vnni::available() {
                kernels.push(Kernel::Vnni);
            }
            if amx::available() {
                kernels.push(Kernel::Amx);
            }
        }
        kernels
    }

    /// The kernel [`cpu_gemm`] runs for a product of `tokens` tokens: [`Kernel::best`],
    /// except AMX below [`AMX_TOKENS`], where the AVX-512 kernel runs.
    pub fn for_tokens(tokens: usize) -> Kernel {
        match Kernel::best() {
            Kernel::Amx if tokens < AMX_TOKENS => Kernel::Vnni,
            best => best,
        }
    }

    /// The widest kernel this CPU runs within `TRITTER_CPU_KERNELS` ([`crate::isa`]).
    pub fn best() -> Kernel {
        use crate::isa::Tier;
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            crate::isa::widest(&Kernel::supported(), |k| match k {
                Kernel::Portable => Tier::Portable,
                Kernel::Avx2 => Tier::Avx2,
                Kernel::AvxVnni => Tier::AvxVnni,
                Kernel::Vnni => Tier::Avx512,
                Kernel::Amx => Tier::Amx,
            })
        })
    }
}

/// The product on the CPU: `x` `[tokens, d_in]` row-major against a `[d_out, d_in]`
/// matrix's `codes`, returns `[tokens, d_out]` row-major. Each weight vector is unpacked
/// once per tile of up to 16 tokens, in registers. Codes in the export's rows are
/// multiplied in place: up to 4 tokens row by row by the vector kernels, more by AMX in
/// tiles of 16 rows as they stand, or else by tasks that each rearrange their panels
/// into a per-thread scratch ([`rows_scratch_bytes`]), then run every tile over it — the
/// same numbers as from the CPU layout, bit for bit.
/// The kernel is [`Kernel::for_tokens`]: AMX from [`AMX_TOKENS`] tokens, else AVX-512
/// VNNI + VBMI, else AVX-VNNI, else AVX2, else portable Rust; every kernel gives the same
/// bits.
pub fn cpu_gemm(
    x: &[f32],
    tokens: usize,
    codes: Codes,
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> Vec<f32> {
    gemm(
        x,
        tokens,
        codes,
        d_out,
        d_in,
        gamma,
        Kernel::for_tokens(tokens),
    )
}

/// [`cpu_gemm`] with a given kernel, for tests and benchmarks that compare them.
///
/// # Panics
/// Where this CPU cannot run `kernel` (see [`Kernel::supported`]), besides
/// [`cpu_gemm`]'s own cases.
pub fn cpu_gemm_with(
    kernel: Kernel,
    x: &[f32],
    tokens: usize,
    codes: Codes,
    d_out: usize,
    d_in: usize,
    gamma: f32,
) -> Vec<f32> {
    assert!(
        Kernel::supported().contains(&kernel),
        "this CPU cannot run the {kernel:?} kernel"
    );
    gemm(x, tokens, codes, d_out, d_in, gamma, kernel)
}

/// Scratch bytes [`cpu_gemm`] keeps on the threads of the pool for products of `d_in`
/// inputs: per thread, the panels of a task rearranged from codes in rows, and, where
/// the portable kernel runs, a panel unpacked into `i16` weights. None where AMX runs:
/// it multiplies the rows as they stand from 5 tokens, and the AVX-512 kernel fewer.
pub fn rows_scratch_bytes(d_in: usize) -> usize {
    let columns = d_in.div_ceil(16);
    let panels = PANELS_PER_TASK * PANEL_ROWS * columns * 4;
    let per_thread = match Kernel::best() {
        Kernel::Amx => 0,
        Kernel::Portable => panels + PANEL_ROWS * 16 * columns * 2,
        _ => panels,
    };
    rayon::current_num_threads() * per_thread
}

/// Where a product's codes are.
#[derive(Clone, Copy)]
pub enum Codes<'a> {
    /// In the CPU layout.
    Panels(&'a [u32]),
    /// The export's rows.
    Rows(&'a [u8]),
}

thread_local! {
    /// [`cpu_gemm`]'s panels of one task, rearranged from rows.
    static SCRATCH: std::cell::RefCell<HostWords> = std::cell::RefCell::new(HostWords::zeroed(0));
}

/// How far ahead of their loads the direct products ([`vnni::rows`], [`avx2::rows`],
/// [`avx2::rows_vnni`]) ask for their codes, in bytes, into the second-level cache. A
/// task's rows lie one after another, one stream of codes; with the hardware prefetcher
/// alone, these kernels' loads waited on memory. One token from memory, G multiply-adds/s:
/// on 2 cores of an EPYC (Zen 4), AVX-512 VNNI went from 76-89 to 104-118 in 2 MiB pages
/// and from 65-75 to 81-88 in 4 KiB pages (AVX2 kept up without asking there: 93-95 and
/// 72-77, and 64-65 in 4 KiB pages asking); on 2 cores of an Intel Xeon with AMX, AVX2
/// went from 31-33 to 67-72 in 2 MiB pages and from 31 to 61-66 in 4 KiB pages, AVX-VNNI
/// from 36-37 to 69-76 and to 64-69. 4 KiB or 16 KiB ahead gave the same within noise.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 8 << 10;

/// Tokens up to which the vector kernels multiply codes in the export's rows directly
/// ([`vnni::rows`], [`avx2::rows`], [`avx2::rows_vnni`]): so few tokens compute too briefly to repay
/// rearranging the rows into panels first.
#[cfg(target_arch = "x86_64")]
const DIRECT_TOKENS: usize = 4;
// The kernels are instantiated for 1 to 4 tokens.
#[cfg(target_arch = "x86_64")]
const _: () = assert!(DIRECT_TOKENS <= 4);

/// Rows per task of the direct product: whole groups of AMX's 16.
#[cfg(target_arch = "x86_64")]
const DIRECT_ROWS: usize = 64;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(DIRECT_ROWS.is_multiple_of(16));

/// A product on the export's rows, for [`vnni::rows`], [`avx2::rows`] and [`amx::rows`]:
/// activation codes of each token in `stride` bytes ([`by_place`]), or for AMX, the
/// tiles of [`amx_tokens`] from a 64-byte boundary.
#[cfg(target_arch = "x86_64")]
struct DirectJob<'a> {
    bytes: &'a [u8],
    row_bytes: usize,
    x: &'a [i8],
    stride: usize,
    inv_scales: &'a [f32],
    sums: &'a [i32],
    gamma: f32,
    y: Output,
    d_out: usize,
}

#[cfg(target_arch = "x86_64")]
impl DirectJob<'_> {
    /// Row `r`'s codes.
    fn row(&self, r: usize) -> &[u8] {
        &self.bytes[r * self.row_bytes..][..self.row_bytes]
    }

    /// Writes output `r` of token `t` from its `Σ c·x`: `(Σ q·x as f32 · 1/s) · γ`, the
    /// reference's order, with `Σ q·x = Σ c·x − Σ x`.
    ///
    /// # Safety
    /// `r < d_out`, `t` one of the product's tokens, and no other task writes row `r`.
    #[inline(always)]
    unsafe fn store(&self, t: usize, r: usize, sum: i32) {
        let sum = sum.wrapping_sub(self.sums[t]);
        *self.y.0.add(t * self.d_out + r) = sum as f32 * self.inv_scales[t] * self.gamma;
    }
}

/// The vector kernels' codes of each token for [`gemm_rows_direct`]: each block of
/// `block` inputs stored by their place in a weight byte (inputs `4i + k` at
/// `block/4 · k + i`).
#[cfg(target_arch = "x86_64")]
fn by_place(codes: &[i8], block: usize) -> Vec<i8> {
    let mut placed = vec![0i8; codes.len()];
    for (from, to) in codes
        .chunks_exact(block)
        .zip(placed.chunks_exact_mut(block))
    {
        for (i, four) in from.chunks_exact(4).enumerate() {
            for (k, &code) in four.iter().enumerate() {
                to[block / 4 * k + i] = code;
            }
        }
    }
    placed
}

/// [`gemm`] on codes in the export's rows without rearranging them: 1 to
/// [`DIRECT_TOKENS`] tokens row by row with a vector kernel, any number in tiles of 16
/// rows with AMX ([`cpu_gemm`] runs AMX from [`AMX_TOKENS`]). The same bits as through
/// the panels.
#[cfg(target_arch = "x86_64")]
fn gemm_rows_direct(
    x: &[f32],
    tokens: usize,
    bytes: &[u8],
    d_out: usize,
    d_in: usize,
    gamma: f32,
    kernel: Kernel,
) -> Vec<f32> {
    // Inputs per block: a 64-byte row vector's codes (AVX-512, AMX), a 32-byte one's
    // (AVX2, AVX-VNNI).
    let block = match kernel {
        Kernel::Vnni | Kernel::Amx => 256,
        _ => 128,
    };
    let stride = block * d_in.div_ceil(block);
    let (codes, inv_scales, sums) = quantize_rows(x, d_in, stride);
    let (placed, first) = match kernel {
        Kernel::Amx => amx_tokens(&codes, tokens, stride / 256),
        _ => (by_place(&codes, block), 0),
    };
    let mut y = Vec::<f32>::with_capacity(tokens * d_out);
    let job = DirectJob {
        bytes,
        row_bytes: d_in.div_ceil(4),
        x: &placed[first..],
        stride,
        inv_scales: &inv_scales,
        sums: &sums,
        gamma,
        y: Output(y.as_mut_ptr()),
        d_out,
    };
    (0..d_out.div_ceil(DIRECT_ROWS))
        .into_par_iter()
        .for_each(|task| {
            let rows = task * DIRECT_ROWS..((task + 1) * DIRECT_ROWS).min(d_out);
            // SAFETY: the CPU runs `kernel` (the caller's); every row of `rows` lies in
            // `bytes`, every token's codes in `placed`, in blocks of the kernel's; stores
            // stay in this task's rows of the tokens' outputs.
            unsafe {
                match (kernel, tokens) {
                    (Kernel::Amx, _) => amx::rows(&job, rows),
                    (Kernel::Vnni, 1) => vnni::rows::<1>(&job, rows),
                    (Kernel::Vnni, 2) => vnni::rows::<2>(&job, rows),
                    (Kernel::Vnni, 3) => vnni::rows::<3>(&job, rows),
                    (Kernel::Vnni, _) => vnni::rows::<4>(&job, rows),
                    (Kernel::AvxVnni, 1) => avx2::rows_vnni::<1>(&job, rows),
                    (Kernel::AvxVnni, 2) => avx2::rows_vnni::<2>(&job, rows),
                    (Kernel::AvxVnni, 3) => avx2::rows_vnni::<3>(&job, rows),
                    (Kernel::AvxVnni, _) => avx2::rows_vnni::<4>(&job, rows),
                    (_, 1) => avx2::rows::<1>(&job, rows),
                    (_, 2) => avx2::rows::<2>(&job, rows),
                    (_, 3) => avx2::rows::<3>(&job, rows),
                    (_, _) => avx2::rows::<4>(&job, rows),
                }
            }
        });
    // SAFETY: the tasks wrote all `tokens × d_out` elements (every row of every token).
    unsafe { y.set_len(tokens * d_out) };
    y
}

/// The tokens' int8 codes (`stride = 256 · blocks` per token, zero-padded) as
/// [`amx::rows`] multiplies them, from a 64-byte boundary: for each tile of 16 tokens,
/// each block of 256 inputs and each place `k` in a weight byte, a tile of 16 rows of 64
/// bytes, row `j` holding each token's codes of inputs `16j + 4i + k`, `i` < 4, four
/// bytes a token. Returns the codes and where they start.
#[cfg(target_arch = "x86_64")]
fn amx_tokens(codes: &[i8], tokens: usize, blocks: usize) -> (Vec<i8>, usize) {
    let stride = 256 * blocks;
    let (mut tiles, first) = aligned_codes(tokens.div_ceil(16) * blocks * 4096);
    for (t, row) in codes.chunks_exact(stride).enumerate() {
        let tile = &mut tiles[first + (t / 16) * blocks * 4096..][..blocks * 4096];
        for (block, inputs) in tile.chunks_exact_mut(4096).zip(row.chunks_exact(256)) {
            for (j, sixteen) in inputs.chunks_exact(16).enumerate() {
                // Place `k`'s four codes, inputs `k, 4 + k, 8 + k, 12 + k`, as one word.
                let c = u128::from_le_bytes(std::array::from_fn(|b| sixteen[b] as u8));
                for k in 0..4 {
                    let place = (c >> (8 * k)) & 0x0000_00ff_0000_00ff_0000_00ff_0000_00ff;
                    let word = place as u32
                        | (place >> 24) as u32
                        | (place >> 48) as u32
                        | (place >> 72) as u32;
                    let at = k * 1024 + j * 64 + 4 * (t % 16);
                    block[at..at + 4].copy_from_slice(&word.to_le_bytes().map(|b| b as i8));
                }
            }
        }
    }
    (tiles, first)
}

fn gemm(
    x: &[f32],
    tokens: usize,
    codes: Codes,
    d_out: usize,
    d_in: usize,
    gamma: f32,
    kernel: Kernel,
) -> Vec<f32> {
    assert_eq!(x.len(), tokens * d_in, "{tokens} tokens of {d_in} inputs");
    let row_bytes = d_in.div_ceil(4);
    match codes {
        Codes::Panels(words) => assert_eq!(
            words.len(),
            panel_words(d_out, d_in),
            "a {d_out}×{d_in} matrix"
        ),
        Codes::Rows(bytes) => {
            assert_eq!(bytes.len(), d_out * row_bytes, "a {d_out}×{d_in} matrix")
        }
    }
    if tokens == 0 || d_out == 0 {
        return vec![0f32; tokens * d_out];
    }
    #[cfg(target_arch = "x86_64")]
    if let (Codes::Rows(bytes), Kernel::Amx, _)
    | (Codes::Rows(bytes), Kernel::Vnni | Kernel::AvxVnni | Kernel::Avx2, 1..=DIRECT_TOKENS) =
        (codes, kernel, tokens)
    {
        return gemm_rows_direct(x, tokens, bytes, d_out, d_in, gamma, kernel);
    }
    // Every element is written below, once, by the task holding its row's panel.
    let mut y = Vec::<f32>::with_capacity(tokens * d_out);
    let x = Tiles::new(x, tokens, d_in, Order::of(kernel));
    let out = Output(y.as_mut_ptr());
    let panel_size = PANEL_ROWS * x.columns;
    let panels = d_out.div_ceil(PANEL_ROWS);
    let tasks = panels.div_ceil(PANELS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let first = task * PANELS_PER_TASK;
        let count = (panels - first).min(PANELS_PER_TASK);
        // `ahead[p]`: bytes to prefetch while the first tile passes panel `p`.
        let run = |words: &[u32], ahead: [&[u8]; PANELS_PER_TASK]| {
            for tile in 0..tokens.div_ceil(x.width) {
                let (codes, n) = x.tile(tile, tokens);
                for (p, words) in words.chunks_exact(panel_size).enumerate() {
                    let job = PanelJob {
                        words,
                        codes,
                        tokens: n,
                        first_token: tile * x.width,
                        x: &x,
                        gamma,
                        y: out,
                        d_out,
                        first_row: (first + p) * PANEL_ROWS,
                        ahead: if tile == 0 { ahead[p] } else { &[] },
                    };
                    // SAFETY (vector kernels): the CPU has the features (`Kernel::
                    // supported`); the panel holds `columns` whole column blocks, the tile
                    // `columns` runs of `width × 16` codes (in the AVX2 kernels' order for
                    // them); stores stay in this panel's columns of the tile's tokens' rows.
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Vnni => unsafe { vnni::panel(&job) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 => unsafe { avx2::panel(&job) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::AvxVnni => unsafe { avx2::panel_vnni(&job) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Amx => unsafe { amx::panel(&job) },
                        _ => panel_portable(&job),
                    }
                }
            }
        };
        match codes {
            Codes::Panels(words) => {
                // The next task's panels, a line per column, as for rows below: a
                // resident layer too large for the caches waited on memory with the
                // hardware prefetcher alone.
                // SAFETY: the words' `4·len` bytes, initialized and contiguous.
                let bytes = unsafe {
                    std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 4 * words.len())
                };
                let ahead = std::array::from_fn(|p| match first + count + p {
                    next if next < panels => &bytes[4 * next * panel_size..][..4 * panel_size],
                    _ => &[][..],
                });
                run(&words[first * panel_size..][..count * panel_size], ahead)
            }
            Codes::Rows(bytes) => SCRATCH.with_borrow_mut(|scratch| {
                if scratch.len() < count * panel_size {
                    *scratch = HostWords::zeroed(PANELS_PER_TASK * panel_size);
                }
                let words = &mut scratch[..count * panel_size];
                // The pool's threads mostly take consecutive tasks: the next one's rows
                // come from memory while this one is rearranged and computes.
                let ahead = std::array::from_fn(|p| match first + count + p {
                    next if next < panels => panel_rows(bytes, d_out, row_bytes, next),
                    _ => &[][..],
                });
                for (p, panel) in words.chunks_exact_mut(panel_size).enumerate() {
                    let rows = panel_rows(bytes, d_out, row_bytes, first + p);
                    interleave_panel(rows, row_bytes, panel, false, ahead[p]);
                }
                run(words, ahead)
            }),
        }
    });
    // SAFETY: the tasks wrote all `tokens × d_out` elements (every panel of every tile).
    unsafe { y.set_len(tokens * d_out) };
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::bitlinear_forward;
    use burn::backend::Flex;
    use burn::tensor::Distribution;
    use rand::{Rng, SeedableRng};

    fn random_packed(d_out: usize, d_in: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let q: Vec<f32> = (0..d_out * d_in)
            .map(|_| rng.random_range(-1i32..=1) as f32)
            .collect();
        let row_bytes = d_in.div_ceil(4);
        let mut bytes = vec![0x55u8; d_out * row_bytes];
        for r in 0..d_out {
            for c in 0..d_in {
                let code = (q[r * d_in + c] as i32 + 1) as u8;
                let b = &mut bytes[r * row_bytes + c / 4];
                *b = (*b & !(3 << (2 * (c % 4)))) | (code << (2 * (c % 4)));
            }
        }
        (bytes, q)
    }

    /// The integer product equals the reference on latent weights `q·γ/p` (which
    /// quantize back to exactly `q`, γ).
    #[test]
    fn cpu_and_device_paths_match_the_reference() {
        let device = Default::default();
        // Tiles of 1 to 16 tokens and several tiles; partial words, panels and tasks.
        for (tokens, d_in, d_out) in [
            (1, 64, 48),
            (5, 70, 33),
            (16, 257, 129),
            (7, 1030, 65),
            (19, 96, 40),
            (2, 16, 16),
            (3, 33, 300),
            (11, 130, 17),
            (33, 48, 80),
            (13, 3, 40),
        ] {
            let (bytes, q) = random_packed(d_out, d_in, (tokens * d_in) as u64);
            validate_codes(&bytes, d_out, d_in).unwrap();
            let gamma = 0.37f32;
            let p = q.iter().filter(|v| **v != 0.0).count() as f32 / q.len() as f32;
            let latent = Tensor::<Flex, 2>::from_data(
                TensorData::new(
                    q.iter().map(|v| v * gamma / p).collect::<Vec<_>>(),
                    [d_out, d_in],
                ),
                &device,
            )
            .transpose();
            let x =
                Tensor::<Flex, 2>::random([tokens, d_in], Distribution::Normal(0.0, 1.0), &device);
            let reference: Vec<f32> = bitlinear_forward(x.clone(), latent, None)
                .output
                .into_data()
                .to_vec()
                .unwrap();
            let xv: Vec<f32> = x.clone().into_data().to_vec().unwrap();
            let mut layout = vec![0u32; panel_words(d_out, d_in)];
            interleave(&bytes, d_out, d_in, &mut layout);
            let product =
                |codes: Codes, kernel: Kernel| gemm(&xv, tokens, codes, d_out, d_in, gamma, kernel);
            let portable = product(Codes::Panels(&layout), Kernel::Portable);
            // Integer accumulation: every kernel gives the same bits, from the CPU layout
            // and in place from the export's rows (row by row up to 4 tokens, by AMX as
            // tiles of rows, or each task rearranging into its scratch).
            for kernel in Kernel::supported() {
                let panels = product(Codes::Panels(&layout), kernel);
                assert_eq!(panels, portable, "{kernel:?} {tokens}x{d_in}x{d_out}");
                let rows = product(Codes::Rows(&bytes), kernel);
                assert_eq!(
                    rows, portable,
                    "{kernel:?} in place {tokens}x{d_in}x{d_out}"
                );
            }
            let fast = product(Codes::Panels(&layout), Kernel::best());
            let words = upload_words::<Flex>(&bytes, d_out, d_in, gamma, &device);
            let dev: Vec<f32> = matmul_words(x, &words).into_data().to_vec().unwrap();
            let norm = reference.iter().map(|v| v * v).sum::<f32>().sqrt();
            let mut rounding = vec![0.5f32, 1.5, 2.5, -0.5, -2.5, 126.5, -127.5, 3.4999];
            rounding
                .iter_mut()
                .for_each(|v| *v = round_clamped(*v, -128.0, 127.0));
            assert_eq!(rounding, [0.0, 2.0, 2.0, -0.0, -2.0, 126.0, -128.0, 3.0]);
            for (name, got) in [("cpu", &fast), ("words", &dev)] {
                let err = got
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt();
                assert!(
                    err / norm < 1e-5,
                    "{name} {tokens}x{d_in}x{d_out}: relative error {}",
                    err / norm
                );
            }
        }
    }

    /// The product runs AMX from [`AMX_TOKENS`] tokens where it is the best kernel, the
    /// AVX-512 one below; any other best kernel at every count.
    #[test]
    fn amx_runs_from_its_token_count() {
        for tokens in [1, AMX_TOKENS - 1, AMX_TOKENS, 16, 33] {
            let want = match Kernel::best() {
                Kernel::Amx if tokens < AMX_TOKENS => Kernel::Vnni,
                best => best,
            };
            assert_eq!(Kernel::for_tokens(tokens), want, "{tokens} tokens");
        }
        if Kernel::supported().contains(&Kernel::Amx) {
            assert!(Kernel::supported().contains(&Kernel::Vnni));
        }
    }

    /// The vector rearrangements (16 × 16 and 8 × 8 word transposes, streaming stores)
    /// give the portable one's words: whole and partial blocks of 8 and 16 words,
    /// missing rows, a partial last word, aligned and unaligned destinations.
    #[test]
    fn interleave_paths_agree() {
        for (d_out, d_in) in [
            (16, 256),
            (5, 1030),
            (33, 16),
            (40, 518),
            (17, 3),
            (64, 4096),
            (21, 384),
            (9, 140),
        ] {
            let (bytes, q) = random_packed(d_out, d_in, (d_out * d_in) as u64);
            let row_bytes = d_in.div_ceil(4);
            let columns = d_in.div_ceil(16);
            let mut portable = vec![0u32; panel_words(d_out, d_in)];
            for (p, panel) in portable.chunks_exact_mut(16 * columns).enumerate() {
                let rows = panel_rows(&bytes, d_out, row_bytes, p);
                interleave_columns(rows, row_bytes, 0..columns, panel);
            }
            // Each transposer, streaming into an aligned buffer and storing into an
            // unaligned one, prefetching each row's next lines or other bytes.
            for transpose in Transpose::supported() {
                let by = |words: &mut [u32], stream: bool, ahead: &[u8]| {
                    for (p, panel) in words.chunks_exact_mut(16 * columns).enumerate() {
                        let rows = panel_rows(&bytes, d_out, row_bytes, p);
                        interleave_panel_with(transpose, rows, row_bytes, panel, stream, ahead);
                    }
                };
                let mut aligned = HostWords::zeroed(panel_words(d_out, d_in));
                by(&mut aligned, true, &[]);
                let mut unaligned = vec![0u32; panel_words(d_out, d_in) + 1];
                by(&mut unaligned[1..], false, &bytes[..bytes.len().min(100)]);
                assert_eq!(&aligned[..], &portable[..], "{transpose:?} {d_out}×{d_in}");
                assert_eq!(
                    &unaligned[1..],
                    &portable[..],
                    "{transpose:?} {d_out}×{d_in}"
                );
            }
            let mut aligned = HostWords::zeroed(panel_words(d_out, d_in));
            interleave(&bytes, d_out, d_in, &mut aligned);
            assert_eq!(&aligned[..], &portable[..], "{d_out}×{d_in}");
            // Every code is where the layout says, and padding is zero weights.
            for o in 0..d_out.div_ceil(16) * 16 {
                for c in 0..columns * 16 {
                    let word = aligned[((o / 16) * columns + c / 16) * 16 + o % 16];
                    let code = ((word >> (2 * (c % 16))) & 3) as f32 - 1.0;
                    let want = if o < d_out && c < d_in {
                        q[o * d_in + c]
                    } else {
                        0.0
                    };
                    assert_eq!(code, want, "{d_out}×{d_in}: row {o}, input {c}");
                }
            }
        }
    }

    /// Sums at the kernels' limits stay exact: tokens of all-±127 codes against rows of
    /// +1 and −1 codes (the AVX2 kernel's 16-bit pair sums at their largest), one token
    /// and a whole tile, so `Σ = ±127·d_in` in every kernel.
    #[test]
    fn integer_accumulation_is_exact() {
        // Long enough for the 16-bit sums of the AVX2 kernels to be widened many times.
        let d_in = 4000;
        // Row 0 all +1 (code 2), row 1 all −1 (code 0).
        let mut bytes = vec![0b1010_1010u8; d_in / 4];
        bytes.extend(vec![0u8; d_in / 4]);
        let mut words = vec![0u32; panel_words(2, d_in)];
        interleave(&bytes, 2, d_in, &mut words);
        for tokens in [1, 3, 16] {
            // Token t: all 2.0 (codes 127) or all −2.0 (codes −127).
            let sign = |t: usize| if t.is_multiple_of(2) { 1.0f32 } else { -1.0 };
            let x: Vec<f32> = (0..tokens * d_in).map(|i| 2.0 * sign(i / d_in)).collect();
            for kernel in Kernel::supported() {
                for codes in [Codes::Panels(&words), Codes::Rows(&bytes)] {
                    let y = gemm(&x, tokens, codes, 2, d_in, 1.0, kernel);
                    for t in 0..tokens {
                        // inv_scale = 2/127: y = ±127·4000·(2/127) = ±8000.
                        for (row, want) in [(0, 8000.0 * sign(t)), (1, -8000.0 * sign(t))] {
                            let got = y[t * 2 + row];
                            assert!(
                                (got - want).abs() < 1e-2,
                                "{kernel:?} token {t} row {row}: {got}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The vectorized quantizer (each code read back from its rounding's bits) gives the
    /// codes and sums of [`int8_code`] one value at a time: ties to even, the clamp, the
    /// tail of a row that is not a whole run of 16, and zeros past `d_in`.
    #[test]
    fn row_quantization_matches_the_scalar_codes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for d_in in [1usize, 3, 16, 17, 70, 1030] {
            let stride = 16 * d_in.div_ceil(16) + 16;
            let tokens = 3;
            let mut x: Vec<f32> = (0..tokens * d_in)
                .map(|_| rng.random_range(-4.0f32..4.0))
                .collect();
            // A token whose largest value maps to 127 and others to exact halves.
            for (i, v) in x[..d_in].iter_mut().enumerate() {
                *v = if i == 0 { 127.0 } else { (i % 7) as f32 - 3.5 };
            }
            let check = |(codes, inv_scales, sums): (Vec<i8>, Vec<f32>, Vec<i32>)| {
                for t in 0..tokens {
                    let row = &x[t * d_in..][..d_in];
                    let inv_scale = int8_inv_scale(row);
                    assert_eq!(inv_scales[t], inv_scale);
                    let want: Vec<i8> =
                        row.iter().map(|&v| int8_code(v, inv_scale) as i8).collect();
                    let got = &codes[t * stride..][..stride];
                    assert_eq!(&got[..d_in], &want[..], "d_in {d_in}, token {t}");
                    assert!(
                        got[d_in..].iter().all(|&c| c == 0),
                        "padding of d_in {d_in}"
                    );
                    assert_eq!(sums[t], want.iter().map(|&c| c as i32).sum::<i32>());
                }
            };
            check(quantize_rows_any(&x, d_in, stride));
            check(quantize_rows(&x, d_in, stride));
        }
        // Ties round to even, as `round_clamped` does.
        assert_eq!(int8_code_i32(2.5, 1.0), 2);
        assert_eq!(int8_code_i32(-2.5, 1.0), -2);
        assert_eq!(int8_code_i32(-3.5, 1.0), -4);
        assert_eq!(int8_code_i32(1e9, 1.0), 127);
        assert_eq!(int8_code_i32(-1e9, 1.0), -128);
    }

    #[test]
    fn invalid_codes_and_sizes_are_named() {
        assert!(validate_codes(&[0x55, 0x55], 2, 4).is_ok());
        let err = validate_codes(&[0x55, 0b0111_0101], 2, 4).unwrap_err();
        assert!(err.contains("row 1"), "{err}");
        // Past the first chunk, in its last byte and its first field, and at the end.
        for (at, byte) in [
            (1000, 0b0101_0111),
            (1023, 0b1101_0101),
            (4039, 0b0011_0000),
        ] {
            let mut bytes = vec![0b1001_0001u8; 40 * 101];
            assert!(validate_codes(&bytes, 40, 403).is_ok());
            bytes[at] = byte;
            let err = validate_codes(&bytes, 40, 403).unwrap_err();
            assert!(
                err.contains(&format!("row {} (byte {at})", at / 101)),
                "{err}"
            );
        }
        assert!(validate_codes(&[0x55], 2, 4)
            .unwrap_err()
            .contains("expected 2"));
    }

    /// A clone holds the same words, and the bytes are the words' own, in memory order,
    /// for a buffer large enough to be advised into huge pages and for a small one.
    #[test]
    fn host_words_clone_and_bytes() {
        for len in [5usize, (5 << 20) / 4 + 3] {
            let mut words = HostWords::zeroed(len);
            for (i, w) in words.iter_mut().enumerate() {
                *w = (i as u32).wrapping_mul(0x9e37_79b9);
            }
            let copy = words.clone();
            assert_eq!(&copy[..], &words[..]);
            let bytes = copy.as_bytes();
            assert_eq!(bytes.len(), 4 * len);
            assert_eq!(bytes[4..8], words[1].to_ne_bytes());
            let mut other = HostWords::zeroed(len);
            other.as_bytes_mut().copy_from_slice(bytes);
            assert_eq!(&other[..], &words[..]);
        }
    }
}
