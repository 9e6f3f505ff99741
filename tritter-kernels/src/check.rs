//! What the kernel checks share — the lavapipe tests, the whole-model comparison and the
//! `gpu-check` binary: a relative error, a deterministic generator, random ternary
//! matrices in the export's layout.

/// `‖a − b‖ / ‖b‖`.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f32 {
    let norm = b.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    diff / norm
}

/// A deterministic generator (SplitMix64).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A random ternary matrix: the export's bytes (`[d_out, ceil(d_in / 4)]`, code `q + 1`)
/// and its values `q` (`[d_out, d_in]`).
pub fn random_ternary(d_out: usize, d_in: usize, rng: &mut SplitMix) -> (Vec<u8>, Vec<i32>) {
    let row_bytes = d_in.div_ceil(4);
    let mut bytes = vec![0x55u8; d_out * row_bytes];
    let mut q = vec![0i32; d_out * d_in];
    for o in 0..d_out {
        for c in 0..d_in {
            let code = rng.below(3) as u8;
            q[o * d_in + c] = code as i32 - 1;
            let byte = &mut bytes[o * row_bytes + c / 4];
            *byte = (*byte & !(3 << (2 * (c % 4)))) | (code << (2 * (c % 4)));
        }
    }
    (bytes, q)
}
