//! The binaries on bad input (a clear error naming what was wrong and where, never a
//! panic) and across a SIGKILL.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

fn run(bin: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("binary runs")
}

fn train_bin() -> &'static str {
    env!("CARGO_BIN_EXE_train")
}

fn tritter_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tritter")
}

/// The command failed with a message containing every `needle`, and did not panic.
fn assert_clear_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "missing `{n}` in: {stderr}");
    }
}

#[test]
fn missing_and_malformed_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(train_bin(), &["nope.toml"], dir.path());
    assert_clear_error(&out, &["nope.toml"]);

    std::fs::write(
        dir.path().join("bad.toml"),
        "name = \"x\"\n[model\npreset = 1",
    )
    .unwrap();
    let out = run(train_bin(), &["bad.toml"], dir.path());
    assert_clear_error(&out, &["bad.toml", "malformed"]);
}

#[test]
fn unknown_preset_device_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = common::write_fixture(dir.path(), "");
    let text = std::fs::read_to_string(&recipe).unwrap();
    std::fs::write(
        &recipe,
        text.replace("preset = \"test\"", "preset = \"12B\""),
    )
    .unwrap();
    assert_clear_error(
        &run(train_bin(), &["train.toml"], dir.path()),
        &["unknown model preset `12B`"],
    );

    std::fs::write(&recipe, text.replace("num_layers = 2", "num_layerz = 2")).unwrap();
    assert_clear_error(
        &run(train_bin(), &["train.toml"], dir.path()),
        &["num_layerz"],
    );

    std::fs::write(
        &recipe,
        text.replace("num_kv_heads = 2", "num_kv_heads = 3"),
    )
    .unwrap();
    assert_clear_error(
        &run(train_bin(), &["train.toml"], dir.path()),
        &["num_kv_heads` = 3"],
    );

    std::fs::write(&recipe, &text).unwrap();
    assert_clear_error(
        &run(train_bin(), &["train.toml", "--device", "tpu"], dir.path()),
        &["unknown device `tpu`"],
    );
}

#[test]
fn cuda_without_a_driver_is_refused_clearly() {
    // This machine class has no NVIDIA driver; skip where one is present.
    if Path::new("/proc/driver/nvidia").exists() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    common::write_fixture(dir.path(), "");
    let out = run(
        train_bin(),
        &["train.toml", "--device", "cuda", "--steps", "1"],
        dir.path(),
    );
    assert_clear_error(&out, &["--device cuda"]);
}

#[test]
fn empty_corpus() {
    let dir = tempfile::tempdir().unwrap();
    common::write_fixture(dir.path(), "");
    for entry in std::fs::read_dir(dir.path().join("src")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    std::fs::write(dir.path().join("src/readme.md"), "not code").unwrap();
    assert_clear_error(
        &run(train_bin(), &["train.toml"], dir.path()),
        &["corpus is empty"],
    );
    assert!(
        !dir.path().join("dataset").exists(),
        "no half-written dataset is left"
    );
}

#[test]
fn truncated_checkpoint_and_export() {
    let dir = tempfile::tempdir().unwrap();
    common::write_fixture(dir.path(), "");
    let out = run(
        train_bin(),
        &["train.toml", "--steps", "10", "--out", "run"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        tritter_bin(),
        &["export", "run", "--out", "m.safetensors"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Destinations that cannot become the file, refused before the export's work, and
    // a run that is not there.
    std::fs::create_dir(dir.path().join("out")).unwrap();
    for (args, needles) in [
        (
            ["export", "run", "--out", "out"],
            &["--out out is a directory"][..],
        ),
        (
            ["export", "run", "--out", "nodir/m.safetensors"],
            &["the directory nodir does not exist"],
        ),
        (
            ["export", "nope", "--out", "n.safetensors"],
            &["nope: no such run directory or checkpoint"],
        ),
    ] {
        assert_clear_error(&run(tritter_bin(), &args, dir.path()), needles);
    }
    assert!(!dir.path().join("out.safetensors.partial").exists());
    assert!(!dir.path().join("n.safetensors").exists());

    // A truncated safetensors file.
    let bytes = std::fs::read(dir.path().join("m.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("cut.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let out = run(
        tritter_bin(),
        &["generate", "--model", "cut.safetensors", "--prompt", "x"],
        dir.path(),
    );
    assert_clear_error(&out, &["cut.safetensors", "truncated", "tensor `"]);

    // A run directory where the exported file belongs, on both engines.
    for budget in [&["--latent"][..], &["--memory-budget", "64MiB"]] {
        let args = [&["generate", "--model", "run", "--prompt", "x"][..], budget].concat();
        let out = run(tritter_bin(), &args, dir.path());
        assert_clear_error(&out, &["run is a directory", "tritter export"]);
    }

    // A prompt with no room left in the context for the tokens asked, refused before
    // anything is printed, on both engines.
    for budget in [&["--latent"][..], &["--memory-budget", "64MiB"]] {
        let args = [
            &["generate", "--model", "m.safetensors", "--prompt", "def "][..],
            &["--max-new-tokens", "100000"],
            budget,
        ]
        .concat();
        let out = run(tritter_bin(), &args, dir.path());
        assert_clear_error(&out, &["--max-new-tokens (100000)", "context of"]);
        assert!(out.stdout.is_empty(), "{:?}", out.stdout);
    }

    // A truncated checkpoint file.
    let ckpt = dir.path().join("run/checkpoint/model-1.mpk");
    let bytes = std::fs::read(&ckpt).unwrap();
    std::fs::write(&ckpt, &bytes[..bytes.len() / 3]).unwrap();
    let out = run(
        tritter_bin(),
        &[
            "export",
            "run/checkpoint/model-1.mpk",
            "--out",
            "n.safetensors",
        ],
        dir.path(),
    );
    assert_clear_error(&out, &["model-1.mpk"]);
    assert!(!dir.path().join("n.safetensors").exists());
    // Resuming refuses a run whose only checkpoint is damaged, naming the directory.
    let out = run(
        train_bin(),
        &["train.toml", "--resume", "--out", "run"],
        dir.path(),
    );
    assert_clear_error(&out, &["no usable checkpoint"]);

    // Starting over a run that has checkpoints is refused, so nothing is overwritten.
    let out = run(train_bin(), &["train.toml", "--out", "run"], dir.path());
    assert_clear_error(&out, &["--resume"]);
}

#[test]
fn killed_run_resumes_from_its_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    common::write_fixture(dir.path(), "");
    let mut child = Command::new(train_bin())
        .args(["train.toml", "--steps", "400", "--out", "run"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = dir.path().join("run/checkpoint");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !ckpt.join("scheduler-2.mpk").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = run(
        train_bin(),
        &["train.toml", "--steps", "40", "--resume", "--out", "run"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let losses = tritter::train::read_valid_losses(&dir.path().join("run/metrics.jsonl"));
    assert!(
        !losses.is_empty() && losses.iter().all(|l| l.is_finite()),
        "{losses:?}"
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn plans_for_presets_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let plan = |args: &[&str]| {
        let mut all = vec!["plan"];
        all.extend_from_slice(args);
        run(tritter_bin(), &all, dir.path())
    };
    // 70B (15.9 GiB packed) in 16 GiB streams in groups.
    let out = plan(&[
        "--preset",
        "70B",
        "--memory-budget",
        "16GiB",
        "--context",
        "8192",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("layer buffers") && text.contains("streaming:"),
        "{text}"
    );
    // 7B at 128K tokens of f16 cache does not fit 8 GiB: the cache is named.
    let out = plan(&[
        "--preset",
        "7B",
        "--memory-budget",
        "8GiB",
        "--context",
        "131072",
    ]);
    assert_clear_error(
        &out,
        &[
            "does not fit the memory budget of 8.00 GiB",
            "over by",
            "kv cache",
        ],
    );
    // With the INT4 cache (5 GiB) it fits 16 GiB, on the CPU and on a GPU: the flash
    // kernels' prefill holds no scores.
    for device in ["cpu", "cuda"] {
        let out = plan(&[
            "--preset",
            "7B",
            "--memory-budget",
            "16GiB",
            "--context",
            "131072",
            "--kv-cache",
            "int4",
            "--device",
            device,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{device}: {}", stderr(&out));
        assert!(text.contains("fits"), "{text}");
    }
    let out = plan(&["--preset", "7B", "--memory-budget", "lots"]);
    assert_clear_error(&out, &["lots", "not a size"]);
    let out = plan(&["--preset", "9B", "--memory-budget", "1GiB"]);
    assert_clear_error(&out, &["9B"]);
    let out = plan(&[
        "--preset",
        "test",
        "--memory-budget",
        "1GiB",
        "--kv-cache",
        "int8",
    ]);
    assert_clear_error(&out, &["int8"]);
}

/// A random-weight model at least four times the budget streams through it, and the
/// process's resident set grows by less than the budget.
#[test]
fn streaming_holds_a_model_four_times_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    // The 1B preset's layers, 24 of them: 296 MB packed.
    let mut config = tritter::TritterConfig::preset("1B", 264).unwrap();
    config.num_layers = 24;
    let model = dir.path().join("big.safetensors");
    let bytes = tritter::export::write_random_export(&config, 11, &model).unwrap();
    let budget: u64 = 64 << 20;
    assert!(bytes >= 4 * budget, "{bytes}");
    // Streams under the budget, with `extra` arguments: stdout, stderr, the engine's
    // peak resident set.
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "big.safetensors",
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "6",
            "--memory-budget",
            "64MiB",
        ];
        args.extend(extra);
        let out = run(tritter_bin(), &args, dir.path());
        let err = stderr(&out);
        eprintln!("{err}");
        assert!(out.status.success(), "{err}");
        assert!(err.contains("streaming 24 groups of 1 layers"), "{err}");
        let peak: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("engine-peak-rss-bytes "))
            .expect("peak RSS reported")
            .trim()
            .parse()
            .unwrap();
        assert!(
            peak <= budget,
            "resident set grew by {peak} bytes, budget {budget}: {err}"
        );
        (out.stdout, err, peak)
    };
    let (text, _, peak) = generate(&[]);
    assert!(
        peak > 2 * (12 << 20),
        "two layer buffers must have been held: {peak}"
    );
    // Read from storage on every pass: the same text, under the same budget.
    let (cold_text, cold_err, _) = generate(&["--drop-page-cache"]);
    assert!(
        cold_err.contains("leave the page cache once used"),
        "{cold_err}"
    );
    assert_eq!(cold_text, text);

    // A budget below the resident parts and two one-layer groups is refused up front.
    let out = run(
        tritter_bin(),
        &[
            "generate",
            "--model",
            "big.safetensors",
            "--prompt",
            "x",
            "--memory-budget",
            "20MiB",
        ],
        dir.path(),
    );
    assert_clear_error(
        &out,
        &[
            "big.safetensors",
            "does not fit the memory budget",
            "even with layer groups of one layer",
        ],
    );
    // Without a budget the CPU streams within the memory available, in the groups asked.
    let out = run(
        tritter_bin(),
        &[
            "generate",
            "--model",
            "big.safetensors",
            "--prompt",
            "def f(x):",
            "--max-new-tokens",
            "6",
            "--stream",
            "--layer-group-size",
            "4",
        ],
        dir.path(),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("of memory available"), "{err}");
    assert!(err.contains("streaming 6 groups of 4 layers"), "{err}");
    assert_eq!(out.stdout, text);
    // A GPU has no such default: streaming there needs a budget, refused before the
    // device is opened.
    for flags in [&["--stream"][..], &["--layer-group-size", "2"]] {
        let mut args = vec![
            "generate",
            "--model",
            "big.safetensors",
            "--prompt",
            "x",
            "--device",
            "wgpu",
        ];
        args.extend(flags);
        let out = run(tritter_bin(), &args, dir.path());
        assert_clear_error(
            &out,
            &[&format!("{} needs --memory-budget on a GPU", flags[0])],
        );
    }
}

#[test]
fn batched_prompts_match_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = tritter::TritterConfig::preset("test", 264).unwrap();
    tritter::export::write_random_export(&config, 2, &dir.path().join("m.safetensors")).unwrap();
    let prompts = ["def add(a, b):", "fn main() {", "import triton"];
    let lines: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i == 1 {
                serde_json::json!({ "prompt": p }).to_string()
            } else {
                serde_json::json!(p).to_string()
            }
        })
        .collect();
    std::fs::write(dir.path().join("prompts.jsonl"), lines.join("\n")).unwrap();
    let out = run(
        tritter_bin(),
        &[
            "generate",
            "--model",
            "m.safetensors",
            "--prompts",
            "prompts.jsonl",
            "--max-new-tokens",
            "12",
            "--memory-budget",
            "24MiB",
            "--layer-group-size",
            "1",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let completions: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(completions.len(), 3);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(completions[i]["prompt"], *p);
        // The same prompt alone through the same engine (the library's tests check the
        // engine against the latent-weight model).
        let alone = run(
            tritter_bin(),
            &[
                "generate",
                "--model",
                "m.safetensors",
                "--prompt",
                p,
                "--max-new-tokens",
                "12",
                "--memory-budget",
                "24MiB",
                "--layer-group-size",
                "1",
            ],
            dir.path(),
        );
        assert!(alone.status.success(), "{}", stderr(&alone));
        let text = String::from_utf8_lossy(&alone.stdout);
        let expected = format!("{p}{}", completions[i]["completion"].as_str().unwrap());
        assert_eq!(text.trim_end_matches('\n'), expected, "prompt {i}");
    }
    // Without a budget, the packed engine plans the model into the memory available
    // and holds it resident; with --latent, the training model runs on the latent
    // weights and says what they hold. Both give the same greedy text.
    let generate = |flag: &str| {
        let mut args = vec![
            "generate",
            "--model",
            "m.safetensors",
            "--prompt",
            "def add(a, b):",
        ];
        args.extend(["--max-new-tokens", "12", flag]);
        let out = run(tritter_bin(), &args, dir.path());
        assert!(out.status.success(), "{}", stderr(&out));
        out
    };
    let packed = generate("--prefill-chunk=256");
    assert!(
        stderr(&packed).contains("of memory available (--memory-budget sets one)")
            && stderr(&packed).contains("every layer resident"),
        "{}",
        stderr(&packed)
    );
    let reference = generate("--latent");
    let latent = tritter::infer::ByteSize(tritter::infer::load::latent_bytes(&config));
    assert!(
        stderr(&reference).contains(&format!("resident on latent f32 weights ({latent})")),
        "{}",
        stderr(&reference)
    );
    assert_eq!(packed.stdout, reference.stdout);
    assert_eq!(
        String::from_utf8_lossy(&packed.stdout).trim_end_matches('\n'),
        format!(
            "{}{}",
            prompts[0],
            completions[0]["completion"].as_str().unwrap()
        )
    );
    // A malformed prompts file names its line.
    std::fs::write(dir.path().join("bad.jsonl"), "\"ok\"\n{\"text\": 1}\n").unwrap();
    let out = run(
        tritter_bin(),
        &[
            "generate",
            "--model",
            "m.safetensors",
            "--prompts",
            "bad.jsonl",
        ],
        dir.path(),
    );
    assert_clear_error(&out, &["bad.jsonl:2", "prompt"]);
}

/// Sampling settings that describe no distribution, and counts of 0, are refused before
/// the model loads, on the resident and the packed engine alike, naming the flag.
#[test]
fn out_of_range_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = tritter::TritterConfig::preset("test", 264).unwrap();
    tritter::export::write_random_export(&config, 2, &dir.path().join("m.safetensors")).unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--temperature", "-1"], "--temperature -1"),
        (&["--temperature", "NaN"], "--temperature NaN"),
        (&["--temperature", "1", "--top-k", "0"], "--top-k 0"),
        (&["--temperature", "1", "--top-p", "0"], "--top-p 0"),
        (&["--top-p", "1.5"], "--top-p 1.5"),
        (&["--prefill-chunk", "0"], "--prefill-chunk"),
    ];
    for (flags, needle) in cases {
        for budget in [&["--latent"][..], &[], &["--memory-budget", "24MiB"]] {
            let mut args = vec!["generate", "--model", "m.safetensors", "--prompt", "def "];
            args.extend(flags);
            args.extend(budget);
            let out = run(tritter_bin(), &args, dir.path());
            assert_clear_error(&out, &[needle]);
            assert!(out.stdout.is_empty(), "{args:?} printed before refusing");
        }
    }
    let out = run(
        tritter_bin(),
        &["bench", "streaming", "--preset", "test", "--ratio", "0"],
        dir.path(),
    );
    assert_clear_error(&out, &["--ratio", "above 0"]);
    // A budget too small to stream the model is refused before anything is measured,
    // with the plan and the largest ratio that runs.
    let out = run(
        tritter_bin(),
        &[
            "bench",
            "streaming",
            "--preset",
            "test",
            "--ratio",
            "50",
            "--dir",
            ".",
        ],
        dir.path(),
    );
    assert_clear_error(
        &out,
        &[
            "model ÷ 50",
            "smallest plan that streams it",
            "or less runs it",
            "exceeded by",
        ],
    );
    assert!(out.stdout.is_empty(), "measured before refusing");
    let out = run(
        tritter_bin(),
        &["bench", "streaming", "--preset", "test", "--batches", "1,0"],
        dir.path(),
    );
    assert_clear_error(&out, &["--batches", "at least 1"]);
    let out = run(
        tritter_bin(),
        &["bench", "kv-cache", "--num-kv-heads", "5"],
        dir.path(),
    );
    assert_clear_error(&out, &["5 kv heads must divide"]);
    assert!(out.stdout.is_empty(), "the table began before the refusal");
}

/// `[inference]` in a training recipe gives `plan` and `generate` their budget, layer
/// group size and KV cache where no flag does; a flag still wins, and a bad value is
/// named with the recipe.
#[test]
fn a_recipe_sets_the_budget_of_plan_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = common::write_fixture(dir.path(), "");
    let base = std::fs::read_to_string(&recipe).unwrap();
    let with = |inference: &str| {
        std::fs::write(&recipe, format!("{base}\n[inference]\n{inference}\n")).unwrap()
    };
    with("gpu_memory_budget = \"24MiB\"\nlayer_group_size = 1\nkv_cache = \"int4\"");

    // The recipe's own model, planned without weights.
    let out = run(
        tritter_bin(),
        &["plan", "--recipe", "train.toml", "--context", "64"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.starts_with("recipe train.toml: 2 layers"), "{text}");
    assert!(text.contains("budget              24.00 MiB"), "{text}");
    assert!(text.contains("int4"), "{text}");
    let out = run(
        tritter_bin(),
        &[
            "plan",
            "--recipe",
            "train.toml",
            "--memory-budget",
            "1GiB",
            "--kv-cache",
            "f16",
        ],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(text.contains("budget               1.00 GiB"), "{text}");
    assert!(
        text.contains("layers, f16") && !text.contains("int4"),
        "{text}"
    );

    // A model file streams through the recipe's budget in its groups.
    let config = tritter::TritterConfig::preset("test", 264).unwrap();
    tritter::export::write_random_export(&config, 2, &dir.path().join("m.safetensors")).unwrap();
    let out = run(
        tritter_bin(),
        &[
            "generate",
            "--model",
            "m.safetensors",
            "--recipe",
            "train.toml",
            "--stream",
            "--prompt",
            "def ",
            "--max-new-tokens",
            "4",
        ],
        dir.path(),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "streaming {} groups of 1 layers",
            config.num_layers
        )),
        "{err}"
    );
    assert!(err.contains("of a 24.00 MiB budget"), "{err}");

    with("gpu_memory_budget = \"lots\"");
    let out = run(
        tritter_bin(),
        &["plan", "--recipe", "train.toml"],
        dir.path(),
    );
    assert_clear_error(&out, &["train.toml", "`lots` is not a size"]);
    with("layer_group_size = 0");
    let out = run(
        tritter_bin(),
        &["plan", "--recipe", "train.toml", "--memory-budget", "1GiB"],
        dir.path(),
    );
    assert_clear_error(&out, &["train.toml", "`inference.layer_group_size` = 0"]);
    with("kv_cache = \"f16\"");
    let out = run(
        tritter_bin(),
        &["plan", "--recipe", "train.toml"],
        dir.path(),
    );
    assert_clear_error(&out, &["no memory budget", "gpu_memory_budget"]);
}

#[test]
fn streaming_bench_prints_every_row() {
    let text = streaming_bench(&[
        "--preset",
        "350M",
        "--ratio",
        "2",
        "--prompt-tokens",
        "4",
        "--new-tokens",
        "4",
    ]);
    assert!(text.contains("ceiling on decode tokens/s"), "{text}");
    assert!(
        text.contains("rearranging packed codes into the CPU layout"),
        "{text}"
    );
    // A cold start needs a file the page cache lets go of (not so on tmpfs).
    if !text.contains("storage read bandwidth: unmeasured") {
        let cold = text
            .lines()
            .find(|l| l.starts_with("cold start to the first token"))
            .unwrap_or_else(|| panic!("no cold start in {text}"));
        let seconds: Vec<f64> = cold
            .split_whitespace()
            .zip(cold.split_whitespace().skip(1))
            .filter(|(_, unit)| *unit == "s" || *unit == "s;")
            .map(|(v, _)| v.trim_start_matches('(').parse().expect(cold))
            .collect();
        // The resident engine's time, its loading, the streaming engine's time.
        assert_eq!(seconds.len(), 3, "{cold}");
        assert!(seconds.iter().all(|s| *s > 0.0), "{cold}");
        assert!(seconds[1] < seconds[0], "{cold}");
    }
}

/// The bench on a GPU backend (wgpu: lavapipe in CI): the same rows, with the
/// host-to-device bandwidth as the transfers' limit, and the streamed engines holding
/// less than the budget on the device.
#[test]
fn streaming_bench_runs_on_wgpu() {
    let text = streaming_bench(&[
        "--preset",
        "125M",
        "--ratio",
        "1.4",
        "--prompt-tokens",
        "2",
        "--new-tokens",
        "2",
        "--device",
        "wgpu",
    ]);
    let upload = text
        .lines()
        .find_map(|l| l.strip_prefix("host-to-device bandwidth ("))
        .unwrap_or_else(|| panic!("no host-to-device bandwidth in {text}"));
    let gib: f64 = upload
        .split(": ")
        .nth(1)
        .and_then(|v| v.strip_suffix(" GiB/s"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("`{upload}`"));
    assert!(gib > 0.0, "{upload}");
    assert!(
        text.contains("ceiling on streamed decode steps/s"),
        "{text}"
    );
    // No CPU product on a GPU run.
    assert!(!text.contains("packed ternary product"), "{text}");
    let budget: f64 = text
        .split("budget ")
        .nth(1)
        .and_then(|rest| rest.split(" MiB").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no budget in MiB in {text}"));
    for line in text.lines() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let streamed = ["streaming", "storage"].contains(cells.first().unwrap_or(&""));
        if !streamed || cells.get(1).is_none_or(|b| b.parse::<usize>().is_err()) {
            continue;
        }
        let peak: f64 = cells[11].parse().expect(line);
        assert!(peak > 0.0 && peak <= budget, "{line}: budget {budget} MiB");
    }
}

/// Runs `tritter bench streaming` at batches 1 and 2 with `args`, checks that every row
/// is there with finite figures and the streamed engines' first-token ratios, and returns
/// its output.
fn streaming_bench(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["bench", "streaming", "--batches", "1,2", "--dir", "."];
    all.extend_from_slice(args);
    let out = run(tritter_bin(), &all, dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{text}", stderr(&out));
    assert!(!text.contains("NaN"), "{text}");
    let mut rows = Vec::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        // A row: the engine, then its batch.
        let engine = cells.first().copied().unwrap_or("");
        let batch = cells.get(1).and_then(|b| b.parse::<usize>().ok());
        if !["resident", "streaming", "storage"].contains(&engine) || batch.is_none() {
            continue;
        }
        assert_eq!(cells.len(), 13, "{line}");
        let number = |i: usize| -> f64 {
            let value: f64 = cells[i]
                .trim_end_matches('%')
                .parse()
                .unwrap_or_else(|_| panic!("cell {i} of `{line}`"));
            assert!(value.is_finite(), "cell {i} of `{line}`");
            value
        };
        let (groups, tokens_per_sec, first_token) = (number(2), number(3), number(5));
        assert!(tokens_per_sec > 0.0 && first_token > 0.0, "{line}");
        // The budget is half the model: the streamed engines go through several groups
        // and move bytes every token; the resident one holds all of it as one.
        if cells[0] == "resident" {
            assert_eq!(groups, 1.0, "{line}");
        } else {
            assert!(groups > 1.0 && number(6) > 0.0, "{line}");
        }
        rows.push((cells[0].to_string(), cells[1].to_string()));
    }
    let expected: Vec<(String, String)> = ["resident", "streaming", "storage"]
        .iter()
        .flat_map(|e| ["1", "2"].map(|b| (e.to_string(), b.to_string())))
        .collect();
    assert_eq!(rows, expected, "{text}");
    for line in [
        "first tok s: the median of 5 prefills",
        "first-token latency, streaming ÷ resident",
        "streaming batch-2 throughput ÷ batch-1",
    ] {
        assert!(text.contains(line), "missing `{line}` in {text}");
    }
    // The first-token ratio at each batch, for both streamed engines.
    for engine in ["streaming", "storage"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("first-token latency, {engine} ÷ resident: ")))
            .unwrap_or_else(|| panic!("no first-token ratio of {engine} in {text}"));
        let ratios: Vec<f64> = line
            .split(": ")
            .nth(1)
            .unwrap()
            .split(", ")
            .zip(["1", "2"])
            .map(|(cell, batch)| {
                let (ratio, at) = cell.split_once(" at batch ").expect(line);
                assert_eq!(at, batch, "{line}");
                ratio.parse().expect(line)
            })
            .collect();
        assert_eq!(ratios.len(), 2, "{line}");
        assert!(ratios.iter().all(|r| r.is_finite() && *r > 0.0), "{line}");
    }
    text.into_owned()
}
