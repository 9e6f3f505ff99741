//! Exact and near-duplicate removal in a whole build, on real code and edited copies.

use std::path::Path;
use tritter_data::{build_dataset, BuildOptions, DataRecipe, REMOVED_FILE};

const ORIGINAL: &str = include_str!("../src/shard.rs");
const OTHER: &str = include_str!("../src/recipe.rs");

/// Every 25th line replaced: Jaccard ≈ 0.8 with the original.
fn lightly_edited(text: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            if i % 25 == 0 {
                format!("// revised {i}")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn write_corpus(dir: &Path) -> DataRecipe {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("original.rs"), ORIGINAL).unwrap();
    std::fs::write(src.join("copy.rs"), ORIGINAL).unwrap();
    std::fs::write(src.join("edited.rs"), lightly_edited(ORIGINAL)).unwrap();
    std::fs::write(src.join("other.rs"), OTHER).unwrap();
    let text = r#"
name = "dedup"
output = "dataset"
valid_fraction = 0.0
[[sources]]
name = "src"
kind = "dir"
path = "src"
"#;
    let path = dir.join("data.toml");
    std::fs::write(&path, text).unwrap();
    DataRecipe::from_file(&path).unwrap()
}

fn removed(dataset: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dataset.join(REMOVED_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn copies_and_edited_copies_are_removed_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_corpus(dir.path());
    let summary = build_dataset(&recipe, &BuildOptions::default()).unwrap();
    let stats = &summary.manifest.stats.stages;
    assert_eq!(stats["exact dedup"].dropped["identical content"], 1);
    assert_eq!(stats["near dedup"].dropped["near duplicate"], 1);
    assert_eq!(stats["tokenize"].kept, 2);

    let lines = removed(&summary.dir);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let name = |v: &serde_json::Value| v.as_str().unwrap().trim_start_matches("src/").to_string();
    let exact = lines.iter().find(|l| l["stage"] == "exact dedup").unwrap();
    let pair = [name(&exact["id"]), name(&exact["duplicate_of"])];
    assert!(pair.contains(&"original.rs".into()) && pair.contains(&"copy.rs".into()));
    let near = lines.iter().find(|l| l["stage"] == "near dedup").unwrap();
    assert_eq!(near["reason"], "near duplicate");
    // The edited copy and whichever of original/copy came first are one cluster.
    let pair = [name(&near["id"]), name(&near["duplicate_of"])];
    assert!(pair.contains(&"edited.rs".into()), "{near}");
    assert!(near["jaccard"].as_f64().unwrap() >= 0.7, "{near}");
    assert!(!lines.iter().any(|l| name(&l["id"]) == "other.rs"));

    // Deterministic: a rebuild writes the same shards and log.
    let shards = |d: &Path| {
        let mut files: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e != "json"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect::<Vec<_>>()
    };
    let first = shards(&summary.dir);
    let again = build_dataset(&recipe, &BuildOptions::default()).unwrap();
    assert_eq!(shards(&again.dir), first);
}

#[test]
fn dedup_can_be_turned_off_and_bad_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_corpus(dir.path());
    let path = dir.path().join("data.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}[dedup]\nexact = false\nnear = false\n"),
    )
    .unwrap();
    let off = DataRecipe::from_file(&path).unwrap();
    let summary = build_dataset(&off, &BuildOptions::default()).unwrap();
    assert_eq!(summary.manifest.stats.stages["tokenize"].kept, 4);
    assert!(removed(&summary.dir).is_empty());
    drop(recipe);

    std::fs::write(&path, format!("{text}[dedup]\nthreshold = 0\n")).unwrap();
    let err = DataRecipe::from_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("data.toml") && err.contains("dedup.threshold"),
        "{err}"
    );
    std::fs::write(&path, format!("{text}[dedup]\nshingle = 3\n")).unwrap();
    let err = DataRecipe::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("shingle"), "{err}");
}
