//! Data build → train → checkpoint → resume → export → load → generate, on the CPU.

mod common;

use burn::backend::Flex;
use burn::prelude::*;
use tritter::export::export_model;
use tritter::infer::{
    check_greedy, generate, load_export, KvCacheType, PlanRequest, Sampler, SamplingConfig,
    StreamingEngine, LOGIT_TOLERANCE,
};
use tritter::train::recipe::TrainRecipe;
use tritter::train::{load_checkpoint_model, read_valid_losses, train, TrainOptions, METRICS_FILE};

fn options(dir: &std::path::Path, name: &str) -> TrainOptions {
    TrainOptions {
        out: Some(dir.join(name)),
        log_every: 10,
        ..Default::default()
    }
}

#[test]
fn training_lowers_the_loss_on_a_repetitive_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = TrainRecipe::from_file(&common::write_fixture(dir.path(), "")).unwrap();
    let summary = train(&recipe, &options(dir.path(), "run")).unwrap();
    let losses = summary.valid_losses;
    assert_eq!(losses.len(), 4, "one validation per checkpoint: {losses:?}");
    // ln(264) ≈ 5.58 at initialisation; a repetitive corpus is learned fast.
    assert!(losses[3] < losses[0], "{losses:?}");
    assert!(losses[3] < 2.5, "{losses:?}");
    // Train metrics are in metrics.jsonl, one line per step, with every quantity.
    let text = std::fs::read_to_string(summary.run_dir.join(METRICS_FILE)).unwrap();
    let train_lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["split"] == "train")
        .collect();
    assert_eq!(train_lines.len(), 40);
    for key in ["loss", "perplexity", "lr", "tokens/s", "grad_norm"] {
        assert!(train_lines[39][key].as_f64().unwrap().is_finite(), "{key}");
    }
    // Keep-last-3: checkpoints 2, 3, 4 remain.
    let ckpt = summary.run_dir.join("checkpoint");
    assert!(!ckpt.join("model-1.mpk").exists());
    assert!(ckpt.join("model-4.mpk").exists());
}

#[test]
fn training_with_document_masks_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let recipe =
        TrainRecipe::from_file(&common::write_fixture(dir.path(), "document_mask = true\n"))
            .unwrap();
    assert!(recipe.train.document_mask);
    let losses = train(&recipe, &options(dir.path(), "run"))
        .unwrap()
        .valid_losses;
    assert!(losses[3] < losses[0] && losses[3] < 2.5, "{losses:?}");
}

#[test]
fn resume_continues_the_same_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = TrainRecipe::from_file(&common::write_fixture(dir.path(), "")).unwrap();
    let full = train(
        &recipe,
        &TrainOptions {
            steps: Some(30),
            ..options(dir.path(), "full")
        },
    )
    .unwrap();
    // Stop after the first checkpoint, then resume to the same end.
    train(
        &recipe,
        &TrainOptions {
            steps: Some(30),
            ..options(dir.path(), "part")
        },
    )
    .ok();
    let part_dir = dir.path().join("part");
    // Simulate a kill after checkpoint 1: drop the later checkpoints and metrics.
    for epoch in 2..=3 {
        for kind in ["model", "optim", "scheduler"] {
            let _ = std::fs::remove_file(part_dir.join(format!("checkpoint/{kind}-{epoch}.mpk")));
        }
    }
    std::fs::remove_file(part_dir.join(METRICS_FILE)).unwrap();
    let resumed = train(
        &recipe,
        &TrainOptions {
            steps: Some(30),
            resume: true,
            ..options(dir.path(), "part")
        },
    )
    .unwrap();
    let full_losses = full.valid_losses;
    let resumed_losses = read_valid_losses(&resumed.run_dir.join(METRICS_FILE));
    assert_eq!(resumed_losses.len(), 2, "{resumed_losses:?}");
    for (a, b) in full_losses[1..].iter().zip(&resumed_losses) {
        assert!(
            (a - b).abs() < 1e-3 * a.abs(),
            "uninterrupted {full_losses:?} vs resumed {resumed_losses:?}"
        );
    }
}

#[test]
fn export_reproduces_the_checkpoint_and_generation_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = TrainRecipe::from_file(&common::write_fixture(dir.path(), "")).unwrap();
    let summary = train(
        &recipe,
        &TrainOptions {
            steps: Some(20),
            ..options(dir.path(), "run")
        },
    )
    .unwrap();
    let device = Default::default();
    let (model, spec, _) = load_checkpoint_model::<Flex>(&summary.run_dir, &device).unwrap();
    let out = dir.path().join("model.safetensors");
    let bytes = export_model(&model, &spec, None, &out).unwrap() as f64;
    let expected = (model.config.packed_size_bytes() + model.config.high_precision_bytes()) as f64;
    assert!(
        (bytes - expected).abs() / expected < 0.05,
        "file {bytes} vs expected {expected}"
    );

    let loaded = load_export::<Flex>(&out, &device).unwrap();
    let tokens = Tensor::<Flex, 2, Int>::from_data([[1, 5, 108, 109, 40, 105, 32, 97]], &device);
    let a = model.forward(tokens.clone(), None);
    let b = loaded.model.forward(tokens, None);
    // The loaded layers keep the exported γ, so they compute exactly what the
    // checkpoint computes.
    let diff = (a - b).abs().max().into_scalar();
    assert_eq!(diff, 0.0, "exported logits differ by {diff}");

    let prompt = [1u32, 5, 108, 109];
    let greedy = |m: &tritter::TritterModel<Flex>, cache: bool| {
        generate(
            m,
            &prompt,
            24,
            &mut Sampler::new(SamplingConfig::default()),
            None,
            cache,
            |_| {},
        )
        .unwrap()
    };
    let from_checkpoint = greedy(&model, true);
    assert_eq!(
        greedy(&loaded.model, true),
        from_checkpoint,
        "export vs checkpoint"
    );
    // Decoding with the cache against one full forward pass over the same tokens.
    check_greedy(
        &loaded.model,
        &prompt,
        &from_checkpoint,
        None,
        LOGIT_TOLERANCE,
    )
    .expect("cache vs no cache");
    // Same seed, same text; sampling at temperature 1.
    let sampled = |seed| {
        let cfg = SamplingConfig {
            temperature: 1.0,
            top_k: Some(20),
            top_p: Some(0.95),
            seed,
        };
        generate(
            &loaded.model,
            &prompt,
            24,
            &mut Sampler::new(cfg),
            None,
            true,
            |_| {},
        )
        .unwrap()
    };
    assert_eq!(sampled(3), sampled(3));

    // The packed engine, streaming one layer at a time, generates the same greedy tokens
    // from the trained weights, and batching prompts does not change them.
    let request = |batch| PlanRequest {
        budget: 64 << 20,
        context: 64,
        batch,
        kv_cache: KvCacheType::F32,
        layer_group_size: Some(1),
        stream: true,
        prefill_chunk: 3,
    };
    let mut engine = StreamingEngine::<Flex>::open(&out, request(2), device).unwrap();
    assert!(engine.plan.streaming && engine.plan.num_groups == model.config.num_layers);
    let other = vec![1u32, 5, 100, 101, 102, 103, 104];
    let result = engine
        .generate(
            &[prompt.to_vec(), other.clone()],
            24,
            &SamplingConfig::default(),
            None,
            true,
            |_, _| {},
        )
        .unwrap();
    // Integer accumulation against the float model: equal up to rounding near-ties.
    for (i, p) in [prompt.to_vec(), other].iter().enumerate() {
        let agreement = check_greedy(
            &model,
            p,
            &result.tokens[i],
            Some(&result.logits[i]),
            LOGIT_TOLERANCE,
        )
        .unwrap_or_else(|e| panic!("streamed prompt {i} vs the checkpoint: {e}"));
        assert_eq!(agreement.steps, 24);
    }
    assert!(result.stats.bytes_streamed > 0);
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let recipe_path = common::write_fixture(dir.path(), "");
    let text = std::fs::read_to_string(&recipe_path)
        .unwrap()
        .replace("lr = 5e-3", "lr = 3e38");
    std::fs::write(
        &recipe_path,
        text.replace("warmup_steps = 5", "warmup_steps = 1"),
    )
    .unwrap();
    let recipe = TrainRecipe::from_file(&recipe_path).unwrap();
    let err = train(&recipe, &options(dir.path(), "run"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("at step") && err.contains("loss is"), "{err}");
    // Whatever checkpoints exist still load.
    let run = dir.path().join("run");
    if tritter::train::latest_checkpoint(&run).is_some() {
        load_checkpoint_model::<Flex>(&run, &Default::default()).unwrap();
    }
}
