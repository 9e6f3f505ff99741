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
    assert_clear_error(&out, &["cut.safetensors", "truncated or corrupt"]);

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
