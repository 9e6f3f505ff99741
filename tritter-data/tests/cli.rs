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
    let out = run(&["inspect", "ds"], dir.path());
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["languages"]["rust"]["documents"], 2);

    // Neither a recipe nor a source, or a source without --out: usage errors.
    let out = run(&["build"], dir.path());
    assert!(!out.status.success());
    let out = run(&["build", "--source", "a"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
    // A missing source directory is named.
    let out = run(&["build", "--source", "nope", "--out", "ds2"], dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}
