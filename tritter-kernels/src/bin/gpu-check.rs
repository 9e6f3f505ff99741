//! `gpu-check`: Tritter's CubeCL kernels on a GPU — correctness against the CPU
//! reference first, then one table of timings against Burn's own ops.
//!
//!     cargo build --profile gpu-check -p tritter-kernels --features cuda --bin gpu-check
//!     scripts/gpu-check.sh                       # on the GPU machine
//!     gpu-check --device wgpu --quick            # small sizes, any Vulkan device (lavapipe)
//!
//! Rows: ternary GEMV/GEMM (4096×4096, 4096×11008; batch 1, 16, 512) against Burn's f32
//! and f16 matmul, with effective GB/s counting packed weight bytes and TFLOP/s; flash
//! attention forward and backward (2K, 8K, 32K; causal and sliding window 4096) against
//! Burn's attention op, with TFLOP/s and the device memory reserved; the device's copy
//! bandwidth as the yardstick; INT4 decode attention from the device cache against the
//! flash kernel over an f16 cache (32K and 128K tokens), with its error.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, Tensor, TensorData};
use burn_cubecl::{BoolElement, CubeRuntime};
use std::time::Instant;
use tritter_kernels::check::{random_ternary, relative_l2, ternary_product, SplitMix};
use tritter_kernels::cube::fusion::Fused;
use tritter_kernels::cube::ternary::integer_product;
use tritter_kernels::{AttentionMask, MaskMod, TritterBackend};

type Gpu<R, BT> = Fused<R, f32, i32, BT>;
type GpuHalf<R, BT> = Fused<R, half::f16, i32, BT>;

struct Options {
    quick: bool,
    f16: bool,
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let device = value("--device").unwrap_or_else(|| "cuda".into());
    let quick = args.iter().any(|a| a == "--quick");
    // A runtime that cannot start (no driver) panics inside CubeCL: report it as an error.
    std::panic::set_hook(Box::new(|_| {}));
    let run = std::panic::catch_unwind(|| match device.as_str() {
        "wgpu" => {
            let options = Options { quick, f16: false };
            check::<burn::backend::wgpu::WgpuRuntime, u32>(Default::default(), &options)
        }
        "cuda" => cuda(quick),
        other => Err(format!("unknown device `{other}`; expected cuda or wgpu")),
    });
    let result = run.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!(
            "the {device} device failed ({message}); is its driver installed and a device present?"
        ))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-check: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(quick: bool) -> Result<(), String> {
    let options = Options { quick, f16: true };
    check::<cubecl::cuda::CudaRuntime, u8>(Default::default(), &options)
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: bool) -> Result<(), String> {
    Err("built without the `cuda` feature; rebuild with --features cuda".into())
}

/// Median seconds of `f` over `runs` runs after one warm-up, the device synced around each.
fn time<B: Backend>(device: &B::Device, runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    B::sync(device).expect("device sync");
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            B::sync(device).expect("device sync");
            start.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn check<R: CubeRuntime, BT: BoolElement>(
    device: R::Device,
    options: &Options,
) -> Result<(), String> {
    println!("device: {device:?}");
    check_ternary::<R, BT>(&device, options)?;
    check_bitlinear_training::<R, BT>(&device, options)?;
    check_attention::<R, BT>(&device, options)?;
    println!("correctness: all checks passed\n");
    let copy = copy_bandwidth::<R, BT>(&device, options);
    println!("device copy bandwidth: {copy:.0} GB/s\n");
    time_ternary::<R, BT>(&device, options, copy);
    time_bitlinear_training::<R, BT>(&device, options);
    time_attention::<R, BT>(&device, options);
    time_kv_cache::<R, BT>(&device, options);
    Ok(())
}

fn check_ternary<R: CubeRuntime, BT: BoolElement>(
    device: &R::Device,
    options: &Options,
) -> Result<(), String> {
    let shapes: &[(usize, usize, usize)] = if options.quick {
        &[(3, 33, 100), (16, 64, 257)]
    } else {
        &[(1, 4096, 4096), (16, 11008, 4096), (512, 257, 1000)]
    };
    let mut rng = SplitMix(1);
    for &(tokens, d_out, d_in) in shapes {
        let (bytes, q) = random_ternary(d_out, d_in, &mut rng);
        let xq: Vec<i32> = (0..tokens * d_in)
            .map(|_| rng.below(256) as i32 - 128)
            .collect();
        let expected = ternary_product(&xq, &q, d_out, d_in);
        let w = Gpu::<R, BT>::ternary_upload(&bytes, d_out, d_in, 1.0, device);
        let x = Tensor::<Gpu<R, BT>, 2>::from_data(
            TensorData::new(
                xq.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                [tokens, d_in],
            ),
            device,
        );
        let scale = Tensor::<Gpu<R, BT>, 1>::ones([tokens], device);
        let got: Vec<f32> = integer_product(x, scale, &w)
            .into_data()
            .to_vec()
            .map_err(|e| format!("{e:?}"))?;
        if got != expected {
            return Err(format!(
                "ternary GEMM {tokens}×{d_in} · {d_in}×{d_out} is not exact"
            ));
        }
        println!("ternary GEMM {tokens:>4} × {d_in} → {d_out}: exact");
    }
    Ok(())
}

/// BitLinear's training forward and backward to the input through the kernels, against
/// the straight-through reference on the CPU backend.
fn check_bitlinear_training<R: CubeRuntime, BT: BoolElement>(
    device: &R::Device,
    options: &Options,
) -> Result<(), String> {
    let shapes: &[(usize, usize, usize)] = if options.quick {
        &[(5, 33, 100), (70, 64, 257)]
    } else {
        &[(3, 1000, 1100), (512, 2048, 1000)]
    };
    let cpu = Default::default();
    for &(tokens, d_out, d_in) in shapes {
        let x = random::<Flex, 2>([tokens, d_in], &cpu).into_data();
        let w = (random::<Flex, 2>([d_in, d_out], &cpu) * 0.05).into_data();
        let g = random::<Flex, 2>([tokens, d_out], &cpu).into_data();
        let want = {
            let [x, w, g] = [&x, &w, &g].map(|t| Tensor::<Flex, 2>::from_data(t.clone(), &cpu));
            let forward = tritter_kernels::reference::bitlinear_forward(x, w, None);
            let dx = g.matmul(forward.w_quantized.dense().transpose());
            [forward.output.into_data(), dx.into_data()]
        };
        let got = {
            let [x, w, g] =
                [&x, &w, &g].map(|t| Tensor::<Gpu<R, BT>, 2>::from_data(t.clone(), device));
            let forward = Gpu::<R, BT>::bitlinear_forward(x, w, None);
            let (dx, _) = Gpu::<R, BT>::bitlinear_backward(
                forward.x_quantized,
                forward.w_quantized,
                g,
                [true, false],
            );
            [
                forward.output.into_data(),
                dx.expect("asked for").into_data(),
            ]
        };
        let [got_y, got_dx] = got;
        let [want_y, want_dx] = want;
        let what = |part: &str| format!("BitLinear {part} {tokens}×{d_in} → {d_out}");
        within(&what("forward"), got_y, want_y, 1e-5)?;
        within(&what("backward to the input"), got_dx, want_dx, 1e-5)?;
        println!("BitLinear training {tokens:>4} × {d_in} → {d_out}: forward and dx within 1e-5");
    }
    Ok(())
}

/// `got` against `want` (as f32): an error naming `what` unless finite and within
/// `tolerance` relative L2.
fn within(what: &str, got: TensorData, want: TensorData, tolerance: f32) -> Result<(), String> {
    let (got, want): (Vec<f32>, Vec<f32>) = (got.to_vec().unwrap(), want.to_vec().unwrap());
    let err = relative_l2(&got, &want);
    if err.is_nan() || err >= tolerance {
        return Err(format!("{what}: relative error {err}"));
    }
    Ok(())
}

fn masks(window: usize) -> Vec<(String, MaskMod)> {
    vec![
        ("causal".into(), MaskMod::causal()),
        (
            format!("sliding window {window}"),
            MaskMod::sliding_window(window),
        ),
        ("document causal".into(), MaskMod::document_causal()),
        ("sinks 4 + window".into(), MaskMod::sinks(4, window)),
        ("prefix-lm".into(), MaskMod::prefix_lm(window / 2)),
    ]
}

fn random<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn check_attention<R: CubeRuntime, BT: BoolElement>(
    device: &R::Device,
    options: &Options,
) -> Result<(), String> {
    let (seq, heads, kv_heads, d) = if options.quick {
        (70, 4, 2, 16)
    } else {
        (300, 8, 2, 64)
    };
    let cpu = Default::default();
    let data = [
        random::<Flex, 4>([1, heads, seq, d], &cpu).into_data(),
        random::<Flex, 4>([1, kv_heads, seq, d], &cpu).into_data(),
        random::<Flex, 4>([1, kv_heads, seq, d], &cpu).into_data(),
        random::<Flex, 4>([1, heads, seq, d], &cpu).into_data(),
    ];
    let documents: Vec<i32> = (0..seq).map(|i| (i / 37) as i32).collect();
    for (name, mask) in masks(seq / 3) {
        let mask = AttentionMask::with_documents(mask, documents.clone());
        let [q, k, v, g] = data.clone().map(|t| Tensor::<Flex, 4>::from_data(t, &cpu));
        let out = Flex::flex_attention(q.clone(), k.clone(), v.clone(), &mask);
        let want = Flex::flex_attention_backward(q, k, v, out.clone(), None, g, &mask);
        let [q, k, v, g] = data
            .clone()
            .map(|t| Tensor::<Gpu<R, BT>, 4>::from_data(t, device));
        let (got_out, lse) =
            Gpu::<R, BT>::flex_attention_forward(q.clone(), k.clone(), v.clone(), &mask);
        let got = Gpu::<R, BT>::flex_attention_backward(q, k, v, got_out.clone(), lse, g, &mask);
        let pairs = [
            ("forward", got_out.into_data(), out.into_data()),
            ("dq", got.0.into_data(), want.0.into_data()),
            ("dk", got.1.into_data(), want.1.into_data()),
            ("dv", got.2.into_data(), want.2.into_data()),
        ];
        for (what, a, b) in pairs {
            within(&format!("flash attention {what} under {name}"), a, b, 1e-3)?;
        }
        println!("flash attention {name:<22} forward and backward within 1e-3 of the reference");
    }
    Ok(())
}

fn copy_bandwidth<R: CubeRuntime, BT: BoolElement>(device: &R::Device, options: &Options) -> f64 {
    let n = if options.quick { 1 << 20 } else { 1 << 28 };
    let x = Tensor::<Gpu<R, BT>, 1>::ones([n], device);
    let seconds = time::<Gpu<R, BT>>(device, 5, || {
        let _ = x.clone() * 1.0;
    });
    2.0 * n as f64 * 4.0 / seconds / 1e9
}

fn time_ternary<R: CubeRuntime, BT: BoolElement>(device: &R::Device, options: &Options, copy: f64) {
    let shapes: &[(usize, usize)] = if options.quick {
        &[(256, 256)]
    } else {
        &[(4096, 4096), (11008, 4096)]
    };
    let batches: &[usize] = if options.quick {
        &[1, 16]
    } else {
        &[1, 16, 512]
    };
    let runs = if options.quick { 2 } else { 20 };
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>12}",
        "ternary product (d_out × d_in, batch)", "ms", "GB/s", "TFLOP/s", "vs copy BW"
    );
    let mut rng = SplitMix(2);
    for &(d_out, d_in) in shapes {
        let (bytes, q) = random_ternary(d_out, d_in, &mut rng);
        let w = Gpu::<R, BT>::ternary_upload(&bytes, d_out, d_in, 0.5, device);
        let dense: Vec<f32> = (0..d_in * d_out)
            .map(|i| q[(i % d_out) * d_in + i / d_out] as f32)
            .collect();
        let w32 = Tensor::<Gpu<R, BT>, 2>::from_data(
            TensorData::new(dense.clone(), [d_in, d_out]),
            device,
        );
        let w16 = options.f16.then(|| {
            Tensor::<GpuHalf<R, BT>, 2>::from_data(TensorData::new(dense, [d_in, d_out]), device)
        });
        for &batch in batches {
            let flop = 2.0 * (batch * d_in * d_out) as f64;
            let x = random::<Gpu<R, BT>, 2>([batch, d_in], device);
            let t = time::<Gpu<R, BT>>(device, runs, || {
                let _ = Gpu::<R, BT>::ternary_packed_matmul(x.clone(), &w);
            });
            let packed = (d_out * d_in) as f64 / 4.0;
            let gbs = (packed + 4.0 * (batch * (d_in + d_out)) as f64) / t / 1e9;
            println!(
                "{:<34} {:>10.3} {:>10.1} {:>10.2} {:>11.0}%",
                format!("ternary {d_out}×{d_in}, {batch}"),
                t * 1e3,
                gbs,
                flop / t / 1e12,
                100.0 * gbs / copy
            );
            let t = time::<Gpu<R, BT>>(device, runs, || {
                let _ = x.clone().matmul(w32.clone());
            });
            println!(
                "{:<34} {:>10.3} {:>10.1} {:>10.2}",
                format!("  Burn f32 matmul, {batch}"),
                t * 1e3,
                4.0 * (d_in * d_out) as f64 / t / 1e9,
                flop / t / 1e12
            );
            if let Some(w16) = &w16 {
                let x16 = random::<GpuHalf<R, BT>, 2>([batch, d_in], device);
                let t = time::<GpuHalf<R, BT>>(device, runs, || {
                    let _ = x16.clone().matmul(w16.clone());
                });
                println!(
                    "{:<34} {:>10.3} {:>10.1} {:>10.2}",
                    format!("  Burn f16 matmul, {batch}"),
                    t * 1e3,
                    2.0 * (d_in * d_out) as f64 / t / 1e9,
                    flop / t / 1e12
                );
            }
        }
    }
    println!();
}

/// BitLinear's training step through the kernels (latent weights packed on the device,
/// ternary product; `dx` from the packed words) against Burn's f32 ops on the dequantized
/// operands (the reference forward, `dy · Wqᵀ` by matmul).
fn time_bitlinear_training<R: CubeRuntime, BT: BoolElement>(device: &R::Device, options: &Options) {
    let (tokens, d_out, d_in) = if options.quick {
        (64, 256, 256)
    } else {
        (4096, 4096, 4096)
    };
    let runs = if options.quick { 2 } else { 10 };
    let flop = 2.0 * (tokens * d_in * d_out) as f64;
    let x = random::<Gpu<R, BT>, 2>([tokens, d_in], device);
    let w = random::<Gpu<R, BT>, 2>([d_in, d_out], device) * 0.05;
    let g = random::<Gpu<R, BT>, 2>([tokens, d_out], device);
    println!(
        "{:<40} {:>10} {:>10}",
        format!("BitLinear training ({tokens} × {d_in} → {d_out})"),
        "ms",
        "TFLOP/s"
    );
    let row = |name: &str, t: f64| {
        println!("{:<40} {:>10.3} {:>10.2}", name, t * 1e3, flop / t / 1e12);
    };
    let mut kept = None;
    let t = time::<Gpu<R, BT>>(device, runs, || {
        kept = Some(Gpu::<R, BT>::bitlinear_forward(x.clone(), w.clone(), None));
    });
    row("forward, ternary kernels", t);
    let forward = kept.expect("ran");
    let t = time::<Gpu<R, BT>>(device, runs, || {
        let _ = tritter_kernels::reference::bitlinear_forward(x.clone(), w.clone(), None);
    });
    row("  forward, Burn f32 ops", t);
    let t = time::<Gpu<R, BT>>(device, runs, || {
        let _ = Gpu::<R, BT>::bitlinear_backward(
            forward.x_quantized.clone(),
            forward.w_quantized.clone(),
            g.clone(),
            [true, false],
        );
    });
    row("dx = dy · Wqᵀ, packed words", t);
    let dense = forward.w_quantized.clone().dense();
    let t = time::<Gpu<R, BT>>(device, runs, || {
        let _ = g.clone().matmul(dense.clone().transpose());
    });
    row("  dx, Burn f32 matmul", t);
    println!();
}

/// One layer's decode attention (32 query heads, 8 key/value heads, head_dim 128) from the
/// device INT4 cache against the flash kernel over an f16 cache, and its error against
/// f32 attention over the same keys and values.
fn time_kv_cache<R: CubeRuntime, BT: BoolElement>(device: &R::Device, options: &Options) {
    let (nh, kv, d) = (32, 8, 128);
    // Quick runs stay short: lavapipe ends any shader's loops after 65,535 iterations in
    // all, which the f32 reference (the flash kernel) would pass at long lengths.
    let lengths: &[usize] = if options.quick {
        &[256, 400]
    } else {
        &[32768, 131072]
    };
    let runs = if options.quick { 2 } else { 10 };
    println!(
        "{:<40} {:>10} {:>10} {:>12} {:>10}",
        format!("decode attention ({nh}/{kv} heads, d {d})"),
        "ms",
        "GB/s",
        "cache MiB",
        "error"
    );
    for &n in lengths {
        let mut cache = Gpu::<R, BT>::device_int4_kv_cache(kv, d, 32, 128, device)
            .expect("CubeCL devices keep INT4 caches on the device");
        let k = random::<Gpu<R, BT>, 3>([kv, n, d], device);
        let v = random::<Gpu<R, BT>, 3>([kv, n, d], device);
        let start = Instant::now();
        let step = 8192.min(n);
        for at in (0..n).step_by(step) {
            let take = step.min(n - at);
            cache.append(k.clone().narrow(1, at, take), v.clone().narrow(1, at, take));
        }
        Gpu::<R, BT>::sync(device).expect("device sync");
        let append = start.elapsed().as_secs_f64();
        let q = random::<Gpu<R, BT>, 2>([nh, d], device);
        let mut out = None;
        let t = time::<Gpu<R, BT>>(device, runs, || {
            out = Some(cache.decode_attention(q.clone(), None));
        });
        let int4: Vec<f32> = out.expect("ran").into_data().to_vec().unwrap();
        let mask = AttentionMask::new(MaskMod::causal());
        let (q4, k4, v4) = (
            q.clone().reshape([1, nh, 1, d]),
            k.clone().unsqueeze::<4>(),
            v.clone().unsqueeze::<4>(),
        );
        let exact: Vec<f32> =
            Gpu::<R, BT>::flex_attention_forward(q4.clone(), k4.clone(), v4.clone(), &mask)
                .0
                .into_data()
                .to_vec()
                .unwrap();
        let bytes = cache.bytes() as f64;
        println!(
            "{:<40} {:>10.3} {:>10.1} {:>12.0} {:>10.4}",
            format!("INT4 cache, {n} tokens"),
            t * 1e3,
            bytes / t / 1e9,
            bytes / (1 << 20) as f64,
            relative_l2(&int4, &exact)
        );
        println!(
            "{:<40} {:>10.1}",
            format!("  append, {n} tokens (tokens/ms)"),
            n as f64 / append / 1e3
        );
        if options.f16 {
            let half = |t: Tensor<Gpu<R, BT>, 4>| {
                Tensor::<GpuHalf<R, BT>, 4>::from_data(t.into_data().convert::<half::f16>(), device)
            };
            let (q16, k16, v16) = (half(q4), half(k4), half(v4));
            let t = time::<GpuHalf<R, BT>>(device, runs, || {
                let _ = GpuHalf::<R, BT>::flex_attention_forward(
                    q16.clone(),
                    k16.clone(),
                    v16.clone(),
                    &mask,
                );
            });
            let bytes = (2 * 2 * kv * n * d) as f64;
            println!(
                "{:<40} {:>10.3} {:>10.1} {:>12.0}",
                format!("  f16 cache, flash kernel, {n} tokens"),
                t * 1e3,
                bytes / t / 1e9,
                bytes / (1 << 20) as f64
            );
        }
    }
    println!();
}

/// Device memory reserved by the runtime's pools, after releasing what it can first.
fn reserved<R: CubeRuntime>(device: &R::Device) -> u64 {
    R::client(device)
        .memory_usage()
        .map(|m| m.bytes_reserved)
        .unwrap_or(0)
}

fn time_attention<R: CubeRuntime, BT: BoolElement>(device: &R::Device, options: &Options) {
    let (heads, kv_heads, d) = (32, 8, 128);
    let lengths: &[usize] = if options.quick {
        &[128, 256]
    } else {
        &[2048, 8192, 32768]
    };
    let window = if options.quick { 64 } else { 4096 };
    let runs = if options.quick { 2 } else { 5 };
    println!(
        "{:<40} {:>10} {:>10} {:>14}",
        format!("attention (batch 1, {heads}/{kv_heads} heads, d {d})"),
        "ms",
        "TFLOP/s",
        "reserved MiB"
    );
    for &seq in lengths {
        for (name, mask) in [
            ("causal".to_string(), MaskMod::causal()),
            (format!("window {window}"), MaskMod::sliding_window(window)),
        ] {
            let mask = AttentionMask::new(mask);
            let blocks = mask.block_mask(1, seq, seq, 32, 32);
            // Attended pairs: what the FLOP count of a masked attention covers.
            let pairs = blocks.density() * (seq * seq) as f64;
            let flop = 4.0 * pairs * (d * heads) as f64;
            let q = random::<Gpu<R, BT>, 4>([1, heads, seq, d], device);
            let k = random::<Gpu<R, BT>, 4>([1, kv_heads, seq, d], device);
            let v = random::<Gpu<R, BT>, 4>([1, kv_heads, seq, d], device);
            R::client(device).memory_cleanup();
            let mut saved = None;
            let t = time::<Gpu<R, BT>>(device, runs, || {
                saved = Some(Gpu::<R, BT>::flex_attention_forward(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    &mask,
                ));
            });
            let memory = reserved::<R>(device) as f64 / (1 << 20) as f64;
            println!(
                "{:<40} {:>10.2} {:>10.2} {:>14.0}",
                format!("flash forward {seq}, {name}"),
                t * 1e3,
                flop / t / 1e12,
                memory
            );
            let (out, lse) = saved.expect("ran");
            let g = random::<Gpu<R, BT>, 4>([1, heads, seq, d], device);
            let t = time::<Gpu<R, BT>>(device, runs, || {
                let _ = Gpu::<R, BT>::flex_attention_backward(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    out.clone(),
                    lse.clone(),
                    g.clone(),
                    &mask,
                );
            });
            println!(
                "{:<40} {:>10.2} {:>10.2} {:>14.0}",
                format!("flash backward {seq}, {name}"),
                t * 1e3,
                2.5 * flop / t / 1e12,
                reserved::<R>(device) as f64 / (1 << 20) as f64
            );
            // Burn's op materializes the scores: only where they fit in 8 GiB.
            let scores = (heads * seq * seq * 4) as f64;
            if scores > 8.0 * (1u64 << 30) as f64 {
                println!(
                    "{:<40} {:>10}",
                    format!("  Burn attention {seq}, {name}"),
                    "skipped: S×S scores too large"
                );
                continue;
            }
            let (kr, vr) = (
                tritter_kernels::reference::repeat_kv(k.clone(), heads / kv_heads),
                tritter_kernels::reference::repeat_kv(v.clone(), heads / kv_heads),
            );
            let (dense, causal) = match name.as_str() {
                "causal" => (None, true),
                _ => {
                    let m = mask.dense(1, seq, seq);
                    let t = Tensor::<Gpu<R, BT>, 3, burn::tensor::Bool>::from_data(
                        TensorData::new(m, [1, seq, seq]),
                        device,
                    );
                    (
                        Some(t.unsqueeze_dim::<4>(1).expand([1, heads, seq, seq])),
                        false,
                    )
                }
            };
            R::client(device).memory_cleanup();
            let t = time::<Gpu<R, BT>>(device, runs, || {
                let _ = burn_attention(
                    q.clone(),
                    kr.clone(),
                    vr.clone(),
                    dense.clone(),
                    None,
                    AttentionModuleOptions {
                        scale: None,
                        softcap: None,
                        is_causal: causal,
                    },
                );
            });
            println!(
                "{:<40} {:>10.2} {:>10.2} {:>14.0}",
                format!("  Burn attention {seq}, {name}"),
                t * 1e3,
                flop / t / 1e12,
                reserved::<R>(device) as f64 / (1 << 20) as f64
            );
        }
    }
    println!();
}
