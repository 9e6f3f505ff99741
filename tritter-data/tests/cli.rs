//! The `tritter-data` command line.

use std::process::Command;

fn run(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tritter-data"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn build_from_source_directories_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("a/shard.rs", include_str!("../src/shard.rs")),
        ("b/recipe.rs", include_str!("../src/recipe.rs")),
    ] {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let out = run(
        &["build", "--source", "a", "--source", "b", "--out", "ds"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("rust") && table.contains("near dedup"),
        "{table}"
    );
    let out = run(&["inspect", "ds", "--samples", "5"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["languages"]["rust"]["documents"], 2);
    // Samples decode back to the sources' text.
    let samples = summary["samples"].as_array().unwrap();
    assert!(!samples.is_empty() && samples.len() <= 2);
    let text = samples[0]["text"].as_str().unwrap();
    assert!(
        include_str!("../src/shard.rs").starts_with(text)
            || include_str!("../src/recipe.rs").starts_with(text),
        "{text}"
    );

    // Neither a recipe nor a source, or a source without --out: usage errors.
    let out = run(&["build"], dir.path());
    assert!(!out.status.success());
    let out = run(&["build", "--source", "a"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
    // No threads to scan with: a usage error naming the flag, and nothing written.
    let out = run(
        &["build", "--source", "a", "--out", "ds3", "--jobs", "0"],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jobs"));
    assert!(!dir.path().join("ds3").exists());
    // A missing source directory is named.
    let out = run(&["build", "--source", "nope", "--out", "ds2"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}
