//! Fixtures shared by the end-to-end tests: a small corpus on disk and recipes for it.

use std::path::{Path, PathBuf};

/// Writes a repetitive Python/Rust corpus and a data recipe for it; returns the training
/// recipe's path.
#[allow(dead_code)]
pub fn write_fixture(dir: &Path, extra_train: &str) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40 {
        let py = format!(
            "def add_{i}(a, b):\n    return a + b\n\n\ndef mul_{i}(a, b):\n    return a * b\n\n\nprint(add_{i}(1, 2))\n"
        );
        std::fs::write(src.join(format!("m{i}.py")), py.repeat(4)).unwrap();
        let rs = format!("pub fn add_{i}(a: i32, b: i32) -> i32 {{\n    a + b\n}}\n\nfn main() {{\n    println!(\"{{}}\", add_{i}(1, 2));\n}}\n");
        std::fs::write(src.join(format!("m{i}.rs")), rs.repeat(4)).unwrap();
    }
    std::fs::write(
        dir.join("data.toml"),
        r#"
name = "fixture"
output = "dataset"
valid_fraction = 0.1
[[sources]]
name = "src"
kind = "dir"
path = "src"
"#,
    )
    .unwrap();
    let recipe = dir.join("train.toml");
    std::fs::write(
        &recipe,
        format!(
            r#"
name = "fixture"
data = "data.toml"
seed = 7

[model]
preset = "test"
hidden_size = 64
num_layers = 2
num_heads = 4
num_kv_heads = 2
ffn_size = 128
max_seq_len = 128

[train]
steps = 40
batch_size = 4
seq_len = 64
checkpoint_every = 10
keep_checkpoints = 3
valid_batches = 2
output_dir = "runs"
{extra_train}

[optim]
lr = 5e-3
warmup_steps = 5
min_lr_ratio = 0.1
stage2_at = 0.5
stage2_lr_ratio = 0.5
weight_decay = 0.1
grad_clip = 1.0
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
"#
        ),
    )
    .unwrap();
    recipe
}
