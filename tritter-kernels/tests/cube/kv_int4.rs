//! The INT4 KV cache on `Wgpu` (lavapipe in CI): the device cache holds exactly the host
//! cache's codes and parameters after every append (prefill chunks, single tokens, groups
//! quantized mid-append), its decode attention equals the host's fused decode across
//! chunk boundaries, GQA ratios, windows and partly filled groups, and its error against
//! full-precision attention is bounded.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::tensor::{Tensor, TensorData};
use tritter_kernels::check::{one_query_attention, relative_l2, SplitMix};
use tritter_kernels::kv_int4::{DeviceKvCache, Int4KvCache};
use tritter_kernels::TritterBackend;

fn uniform(rng: &mut SplitMix, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.below(2_000_001) as f32 - 1_000_000.0) / 1_000_000.0)
        .collect()
}

fn tensor3(x: &[f32], shape: [usize; 3]) -> Tensor<Wgpu, 3> {
    Tensor::from_data(TensorData::new(x.to_vec(), shape), &WgpuDevice::Cpu)
}

fn host3(t: Tensor<Wgpu, 3>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn device_cache(
    kv_heads: usize,
    head_dim: usize,
    group: usize,
    recent: usize,
) -> Box<dyn DeviceKvCache<Wgpu>> {
    Wgpu::device_int4_kv_cache(kv_heads, head_dim, group, recent, &WgpuDevice::Cpu)
        .expect("Wgpu keeps INT4 caches on the device")
}

#[test]
fn device_cache_holds_the_host_caches_numbers() {
    let mut rng = SplitMix(21);
    // (kv_heads, head_dim, group, recent, appends): head_dim 36 ends in a half word and a
    // partial value group; a prefill larger than several groups quantizes many at once.
    for (kv, d, g, r, appends) in [
        (2, 36, 16, 8, vec![5, 1, 30, 1, 1, 17, 40]),
        (1, 64, 32, 16, vec![200, 1, 1, 1, 47]),
        (3, 128, 32, 128, vec![1, 300, 1]),
    ] {
        let mut host = Int4KvCache::new(kv, d, g, r);
        let mut device = device_cache(kv, d, g, r);
        for new in appends {
            // Keys with an outlier channel, as trained models have.
            let mut k = uniform(&mut rng, kv * new * d);
            k.iter_mut().step_by(d).for_each(|x| *x *= 9.0);
            let v = uniform(&mut rng, kv * new * d);
            host.append(&k, &v, new);
            device.append(tensor3(&k, [kv, new, d]), tensor3(&v, [kv, new, d]));
            let what = format!(
                "{kv}×{d}, group {g}, recent {r}, after {} tokens",
                host.len()
            );
            assert_eq!(device.len(), host.len(), "{what}");
            assert_eq!(device.quantized_len(), host.quantized_len(), "{what}");
            let (keys, values) = device.dequantize();
            let (want_keys, want_values) = host.dequantize();
            assert_eq!(host3(keys), want_keys, "keys: {what}");
            assert_eq!(host3(values), want_values, "values: {what}");
        }
    }
}

#[test]
fn device_decode_attention_equals_the_host_fused_decode() {
    let mut rng = SplitMix(22);
    // (kv_heads, query heads per kv head, head_dim, tokens, window): several 256-token
    // chunks, a partly filled group, GQA 1–4, head_dim below a power of two, windows
    // that start inside a group and inside the recent tokens.
    for (kv, per_kv, d, len, window) in [
        (1, 1, 16, 3, None),
        (2, 4, 64, 700, None),
        (2, 2, 48, 613, Some(300)),
        (4, 1, 32, 97, Some(5)),
        (1, 3, 128, 1000, Some(999)),
        (8, 4, 128, 1024, None),
    ] {
        let (g, r) = (32, 16);
        let mut host = Int4KvCache::new(kv, d, g, r);
        let mut device = device_cache(kv, d, g, r);
        // A prefill and a few decode steps.
        let mut appended = 0;
        for new in [len - len.min(3), len.min(3)] {
            if new == 0 {
                continue;
            }
            let k = uniform(&mut rng, kv * new * d);
            let v = uniform(&mut rng, kv * new * d);
            host.append(&k, &v, new);
            device.append(tensor3(&k, [kv, new, d]), tensor3(&v, [kv, new, d]));
            appended += new;
        }
        assert_eq!(appended, len);
        let nh = kv * per_kv;
        let q = uniform(&mut rng, nh * d);
        let want = host.decode_attention(&q, nh, window);
        let got: Vec<f32> = device
            .decode_attention(
                Tensor::from_data(TensorData::new(q, [nh, d]), &WgpuDevice::Cpu),
                window,
            )
            .into_data()
            .to_vec()
            .unwrap();
        assert!(got.iter().all(|x| x.is_finite()));
        let err = relative_l2(&got, &want);
        assert!(
            err < 1e-5,
            "{kv}×{per_kv} d {d}, {len} tokens, window {window:?}: relative difference {err}"
        );
    }
}

#[test]
fn device_int4_decode_error_against_full_precision_is_bounded() {
    // Keys with outlier channels (KIVI's observation), values with a per-channel offset,
    // queries that pick out earlier keys: shaped like a trained model's, not the uniform
    // worst case.
    let mut rng = SplitMix(23);
    let (kv, per_kv, d, len) = (2, 4, 128, 2048);
    let mut k = uniform(&mut rng, kv * len * d);
    for (i, x) in k.iter_mut().enumerate() {
        if i % d < 4 {
            *x *= 8.0;
        }
    }
    let offset = uniform(&mut rng, d);
    let v: Vec<f32> = uniform(&mut rng, kv * len * d)
        .iter()
        .enumerate()
        .map(|(i, x)| offset[i % d] + 0.5 * x)
        .collect();
    let mut device = device_cache(kv, d, 32, 128);
    device.append(tensor3(&k, [kv, len, d]), tensor3(&v, [kv, len, d]));
    let nh = kv * per_kv;
    let mut q = uniform(&mut rng, nh * d);
    for h in 0..nh {
        for _ in 0..2 {
            let pick = rng.below(len as u64) as usize;
            let key = &k[((h / per_kv) * len + pick) * d..][..d];
            for (qc, kc) in q[h * d..(h + 1) * d].iter_mut().zip(key) {
                *qc += 0.5 * kc;
            }
        }
    }
    let got: Vec<f32> = device
        .decode_attention(
            Tensor::from_data(TensorData::new(q.clone(), [nh, d]), &WgpuDevice::Cpu),
            None,
        )
        .into_data()
        .to_vec()
        .unwrap();
    let mut worst = 0f32;
    for h in 0..nh {
        let span = (h / per_kv) * len * d..(h / per_kv + 1) * len * d;
        let (keys, values) = (&k[span.clone()], &v[span]);
        let exact = one_query_attention(&q[h * d..(h + 1) * d], keys, values, d);
        worst = worst.max(relative_l2(&got[h * d..(h + 1) * d], &exact));
    }
    println!("device INT4 decode attention, {len} tokens: relative L2 error {worst:.4}");
    assert!(worst < 0.05, "{worst}");
    // 1920 tokens as codes (half a byte per element, f16 scale and zero point per key
    // group × channel and per value token × channel group), 128 recent tokens in f32
    // storage: under half an f16 cache.
    let f16_bytes = 2 * 2 * kv * len * d;
    println!("{} bytes against {f16_bytes} in f16", device.bytes());
    let per_head = 1920 * (d + 4 * d / 32) + 4 * 1920 / 32 * d + 2 * 4 * 128 * d;
    assert_eq!(device.bytes(), kv * per_head);
    assert!(device.bytes() * 2 < f16_bytes);
}
