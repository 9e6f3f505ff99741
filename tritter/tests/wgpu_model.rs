//! The whole `test` preset on `Wgpu` (its CubeCL kernels; lavapipe in CI) against the CPU
//! backend: the same weights give the same logits and the same gradients of the loss, up
//! to BitLinear's roundings (an int8 activation or a ternary weight on the other side of
//! a rounding boundary when the float sums before it are ordered differently): observed
//! 0.4–1.4% relative on the logits and 0.3–1.6% on the gradients, depending on the draw
//! of the weights. The tests draw one fixed set: 1.6–1.7% on the logits and about 1.5–1.6%
//! through the INT4 cache.

use burn::backend::wgpu::{Wgpu, WgpuDevice};
use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::prelude::*;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use tritter::model::TritterModel;
use tritter::TritterConfig;
use tritter_kernels::check::relative_l2;

/// Relative L2 difference allowed between the backends.
const TOLERANCE: f32 = 3e-2;

type Cpu = Autodiff<Flex>;
type Gpu = Autodiff<Wgpu>;

#[test]
fn test_preset_logits_and_gradients_match_the_cpu_backend() {
    let config = TritterConfig::preset("test", 264).unwrap();
    let (cpu, gpu) = (Default::default(), WgpuDevice::Cpu);
    let (cpu_model, gpu_model) = twin_models::<Cpu, Gpu>(&config, &cpu, &gpu);

    let (batch, seq) = (2, 96);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| ((i * 37 + i / 7) % 264) as i64)
        .collect();
    let targets: Vec<i64> = ids.iter().map(|t| (t * 5 + 1) % 264).collect();
    let int = |v: &Vec<i64>| TensorData::new(v.clone(), [batch, seq]);

    let cpu_logits: Vec<f32> = cpu_model
        .forward(Tensor::from_data(int(&ids), &cpu), None)
        .into_data()
        .to_vec()
        .unwrap();
    let gpu_logits: Vec<f32> = gpu_model
        .forward(Tensor::from_data(int(&ids), &gpu), None)
        .into_data()
        .to_vec()
        .unwrap();
    let err = relative_l2(&gpu_logits, &cpu_logits);
    eprintln!("logits: relative difference {err}");
    assert!(err < TOLERANCE, "logits differ by {err} (relative)");

    let cpu_grads = cpu_model
        .loss(
            Tensor::from_data(int(&ids), &cpu),
            Tensor::from_data(int(&targets), &cpu),
            None,
        )
        .backward();
    let gpu_grads = gpu_model
        .loss(
            Tensor::from_data(int(&ids), &gpu),
            Tensor::from_data(int(&targets), &gpu),
            None,
        )
        .backward();
    // Every attention and BitLinear weight of the first and last blocks.
    let mut checked = 0;
    for (c, g) in [
        (&cpu_model.blocks[0], &gpu_model.blocks[0]),
        (
            cpu_model.blocks.last().unwrap(),
            gpu_model.blocks.last().unwrap(),
        ),
    ] {
        let pairs = [
            (c.attn.qkv.weight.clone(), g.attn.qkv.weight.clone()),
            (c.attn.out.weight.clone(), g.attn.out.weight.clone()),
        ];
        for (cw, gw) in pairs {
            let cg: Vec<f32> = cw.grad(&cpu_grads).unwrap().into_data().to_vec().unwrap();
            let gg: Vec<f32> = gw.grad(&gpu_grads).unwrap().into_data().to_vec().unwrap();
            let err = relative_l2(&gg, &cg);
            eprintln!("gradient: relative difference {err}");
            assert!(err < TOLERANCE, "gradient differs by {err} (relative)");
            checked += 1;
        }
    }
    let cg: Vec<f32> = cpu_model
        .embedding
        .weight
        .grad(&cpu_grads)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let gg: Vec<f32> = gpu_model
        .embedding
        .weight
        .grad(&gpu_grads)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    assert!(
        relative_l2(&gg, &cg) < TOLERANCE,
        "embedding gradient differs by {}",
        relative_l2(&gg, &cg)
    );
    assert_eq!(checked, 4);
}

/// `--kv-cache int4` on `Wgpu`: the codes live in device memory and decode steps read them
/// through the device's decode attention; its logits match the CPU backend's host INT4
/// cache (same numbers quantized; BitLinear's roundings as above).
#[test]
fn int4_cache_decodes_on_the_device_like_the_cpu_backend() {
    use tritter::infer::budget::KvCacheType;
    use tritter::infer::kv_cache::KvCache;
    let config = TritterConfig::preset("test", 264).unwrap();
    let (cpu, gpu) = (Default::default(), WgpuDevice::Cpu);
    let (cpu_model, gpu_model) = twin_models::<Flex, Wgpu>(&config, &cpu, &gpu);
    let mut cpu_cache = KvCache::with_storage(config.num_layers, KvCacheType::Int4, 0);
    let mut gpu_cache = KvCache::with_storage(config.num_layers, KvCacheType::Int4, 0);
    // A 200-token prompt quantizes a group of 32 (128–159 recent tokens stay in f16),
    // then decode steps cross into the next group.
    let prompt: Vec<i64> = (0..200).map(|i| ((i * 37 + i / 7) % 264) as i64).collect();
    let mut input = prompt;
    for step in 0..4 {
        let c = last_logits(&cpu_model, &input, &mut cpu_cache);
        let g = last_logits(&gpu_model, &input, &mut gpu_cache);
        let err = relative_l2(&g, &c);
        eprintln!("INT4 cache step {step}: relative difference {err}");
        assert!(err < TOLERANCE, "step {step}: logits differ by {err}");
        // Greedy: both continue with the CPU backend's choice.
        let next = c
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        input = vec![next as i64];
    }
    assert!(gpu_cache.layer_mut(0).on_device());
    assert!(!cpu_cache.layer_mut(0).on_device());
}

/// The logits of the last of `input`'s positions, run through `cache`.
fn last_logits<B: tritter_kernels::TritterBackend>(
    model: &TritterModel<B>,
    input: &[i64],
    cache: &mut tritter::infer::kv_cache::KvCache<B>,
) -> Vec<f32> {
    let n = input.len();
    let device = model.embedding.weight.device();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(input.to_vec(), [1, n]), &device);
    model
        .forward(ids, Some(cache))
        .narrow(1, n - 1, 1)
        .into_data()
        .to_vec()
        .unwrap()
}

/// The same fresh model on two backends: both load the same bytes (a fresh model's lazily
/// initialized parameters would initialize again in a clone).
fn twin_models<C: Backend, G: Backend>(
    config: &TritterConfig,
    cpu: &C::Device,
    gpu: &G::Device,
) -> (TritterModel<C>, TritterModel<G>) {
    // One fixed draw of the weights, so that a run is repeatable: how far BitLinear's
    // roundings move the logits depends on the draw (1.3–3.2% over unseeded runs of the
    // INT4 prefill). The tests run side by side and the backend's generator is shared:
    // each seeds and draws alone.
    static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let drawn = {
        let _alone = DRAW.lock().unwrap_or_else(|e| e.into_inner());
        C::seed(cpu, 5);
        config.init::<C>(cpu).into_record()
    };
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(drawn, ()).unwrap();
    (
        config
            .init::<C>(cpu)
            .load_record(recorder.load(bytes.clone(), cpu).unwrap()),
        config
            .init::<G>(gpu)
            .load_record(recorder.load(bytes, gpu).unwrap()),
    )
}
