//! Scale-out: input shards scanned separately (`--shard i/n`) and merged give the same
//! dataset as one process; `--resume` reuses finished shards after a crash or a kill;
//! the merge refuses missing, foreign and corrupt shards by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tritter_data::work::WorkDir;
use tritter_data::{
    build_dataset, build_shard, merge_shards, BuildOptions, DataRecipe, DatasetManifest, ShardSpec,
};

/// Real code, exact copies and lightly edited copies (Jaccard ≈ 0.85) under names that the
/// path-hash order spreads over the input shards.
fn write_corpus(dir: &Path) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let files = [
        ("shard", include_str!("../src/shard.rs")),
        ("recipe", include_str!("../src/recipe.rs")),
        ("dedup", include_str!("../src/dedup.rs")),
        ("bpe", include_str!("../src/bpe.rs")),
        ("secrets", include_str!("../src/secrets.rs")),
        ("language", include_str!("../src/language.rs")),
        ("tokenizer", include_str!("../src/tokenizer.rs")),
        ("work", include_str!("../src/work.rs")),
    ];
    for (name, text) in files {
        std::fs::write(src.join(format!("{name}.rs")), text).unwrap();
    }
    for c in 0..4 {
        let (_, text) = files[c];
        std::fs::write(src.join(format!("copy_{c}.rs")), text).unwrap();
        let edited: Vec<String> = files[c + 2]
            .1
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i % 40 == 0 {
                    format!("// revised {c} {i}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(src.join(format!("edited_{c}.rs")), edited.join("\n")).unwrap();
    }
}

fn recipe(dir: &Path, input_shards: usize, threshold: f64) -> DataRecipe {
    let text = format!(
        r#"
name = "scale"
output = "dataset"
valid_fraction = 0.2
shard_tokens = 20000
input_shards = {input_shards}
[dedup]
threshold = {threshold}
[[sources]]
name = "src"
kind = "dir"
path = "src"
"#
    );
    let path = dir.join("data.toml");
    std::fs::write(&path, text).unwrap();
    DataRecipe::from_file(&path).unwrap()
}

/// A dataset: every file but the manifest (the reports as sorted lines: their order
/// follows the shard count), and the manifest's counts.
#[derive(Debug, PartialEq)]
struct Snapshot {
    files: BTreeMap<String, u64>,
    reports: BTreeMap<String, Vec<String>>,
    counts: serde_json::Value,
}

fn snapshot(dir: &Path) -> Snapshot {
    let (mut files, mut reports) = (BTreeMap::new(), BTreeMap::new());
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        if name.ends_with(".jsonl") {
            let mut lines: Vec<String> = String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect();
            lines.sort();
            reports.insert(name, lines);
        } else if name != "manifest.json" {
            files.insert(name, tritter_data::document::fnv1a(&bytes));
        }
    }
    let m = DatasetManifest::load(dir).unwrap();
    let counts =
        serde_json::json!({ "splits": m.splits, "languages": m.languages, "stats": m.stats });
    Snapshot {
        files,
        reports,
        counts,
    }
}

fn options(jobs: usize) -> BuildOptions {
    BuildOptions {
        jobs: Some(jobs),
        ..BuildOptions::default()
    }
}

#[test]
fn sharded_builds_equal_the_whole_build() {
    let dir = tempfile::tempdir().unwrap();
    write_corpus(dir.path());
    let out = dir.path().join("dataset");

    let whole = build_dataset(&recipe(dir.path(), 1, 0.7), &options(1)).unwrap();
    let stats = &whole.manifest.stats.stages;
    let removed = std::fs::read_to_string(out.join(tritter_data::REMOVED_FILE)).unwrap();
    assert_eq!(
        stats["exact dedup"].dropped["identical content"], 4,
        "{removed}"
    );
    assert_eq!(
        stats["near dedup"].dropped["near duplicate"], 4,
        "{removed}"
    );
    let expected = snapshot(&out);

    // In one process, three shards on two threads.
    let r3 = recipe(dir.path(), 3, 0.7);
    let threaded = build_dataset(&r3, &options(2)).unwrap();
    assert_eq!(snapshot(&out), expected);
    assert!(
        threaded.table().contains("signatures"),
        "{}",
        threaded.table()
    );
    assert!(
        !WorkDir::for_output(&out).root.exists(),
        "the work directory is removed"
    );

    // As separate jobs, then merged: the copies are spread over shards, so the merge's
    // exact dedup across shards does part of the work.
    std::fs::remove_dir_all(&out).unwrap();
    let mut within_shards = 0;
    for index in 0..3 {
        let (meta, reused) = build_shard(&r3, ShardSpec { index, count: 3 }, &options(1)).unwrap();
        assert!(!reused);
        within_shards += meta.stats.stages["exact dedup"]
            .dropped
            .get("identical content")
            .copied()
            .unwrap_or(0);
    }
    assert!(!out.exists(), "a shard alone writes no dataset");
    assert!(
        within_shards < 4,
        "every copy met its original inside one shard"
    );
    merge_shards(&r3, &options(1)).unwrap();
    assert_eq!(snapshot(&out), expected);
}

#[test]
fn resume_reuses_finished_shards_only() {
    let dir = tempfile::tempdir().unwrap();
    write_corpus(dir.path());
    let out = dir.path().join("dataset");
    let r4 = recipe(dir.path(), 4, 0.7);
    build_dataset(&r4, &options(1)).unwrap();
    let expected = snapshot(&out);
    std::fs::remove_dir_all(&out).unwrap();

    // A crash: shards 0 and 2 finished, shard 1 half written, shard 3 not begun.
    for index in [0, 2] {
        build_shard(&r4, ShardSpec { index, count: 4 }, &options(1)).unwrap();
    }
    let work = WorkDir::for_output(&out);
    let partial = work.root.join("shard-00001-of-00004.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("documents.bin"), b"half a record").unwrap();

    let resumed = build_dataset(
        &r4,
        &BuildOptions {
            resume: true,
            ..options(1)
        },
    )
    .unwrap();
    assert_eq!(resumed.reused_shards, 2);
    assert!(resumed.table().contains("2 input shard(s) reused"));
    assert_eq!(snapshot(&out), expected);

    // Shards of another recipe are never reused.
    build_shard(&r4, ShardSpec { index: 0, count: 4 }, &options(1)).unwrap();
    let other = recipe(dir.path(), 4, 0.9);
    let rebuilt = build_dataset(
        &other,
        &BuildOptions {
            resume: true,
            ..options(1)
        },
    )
    .unwrap();
    assert_eq!(rebuilt.reused_shards, 0);
}

#[test]
fn the_merge_names_missing_foreign_and_corrupt_shards() {
    let dir = tempfile::tempdir().unwrap();
    write_corpus(dir.path());
    let r2 = recipe(dir.path(), 2, 0.7);
    let err = merge_shards(&r2, &options(1)).unwrap_err().to_string();
    assert!(err.contains("--shard i/n"), "{err}");

    build_shard(&r2, ShardSpec { index: 0, count: 2 }, &options(1)).unwrap();
    let err = merge_shards(&r2, &options(1)).unwrap_err().to_string();
    assert!(err.contains("shard(s) 1 of 2 are not finished"), "{err}");

    // Shard 1 from a different recipe.
    build_shard(
        &recipe(dir.path(), 2, 0.9),
        ShardSpec { index: 1, count: 2 },
        &options(1),
    )
    .unwrap();
    let r2 = recipe(dir.path(), 2, 0.7);
    let err = merge_shards(&r2, &options(1)).unwrap_err().to_string();
    assert!(
        err.contains("shard-00001-of-00002") && err.contains("different recipe"),
        "{err}"
    );

    // Shard 1 redone, then shard 0's documents truncated.
    build_shard(&r2, ShardSpec { index: 1, count: 2 }, &options(1)).unwrap();
    let work = WorkDir::for_output(&dir.path().join("dataset"));
    let docs: PathBuf = work
        .shard_dir(ShardSpec { index: 0, count: 2 })
        .join("documents.bin");
    let len = std::fs::metadata(&docs).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&docs)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = merge_shards(&r2, &options(1)).unwrap_err().to_string();
    assert!(
        err.contains("documents.bin") && err.contains("truncated"),
        "{err}"
    );
    assert!(
        !dir.path().join("dataset").exists(),
        "nothing half-merged is left"
    );
}

/// `tritter-data build` killed with SIGKILL after its first finished shard, then
/// `--resume`: the finished shards are reused and the dataset is the same as a clean
/// build's.
#[test]
fn a_killed_build_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // ~24 MB of distinct generated Python over 24 input shards: long enough to kill.
    for f in 0..1200 {
        let mut text = String::new();
        for l in 0..500 {
            text.push_str(&format!(
                "def f_{f}_{l}(x):\n    return x * {} + {}\n",
                f * 7 + l,
                (f * 31 + l * 17) % 1009
            ));
        }
        std::fs::write(src.join(format!("m{f}.py")), text).unwrap();
    }
    std::fs::write(
        dir.path().join("data.toml"),
        "name = \"big\"\noutput = \"dataset\"\ninput_shards = 24\nmax_total_bytes = 100_000_000\n\
         [dedup]\nnear = false\n[[sources]]\nname = \"src\"\nkind = \"dir\"\npath = \"src\"\n",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tritter-data"));
        cmd.args(["build", "data.toml", "--jobs", "1"])
            .args(extra)
            .current_dir(dir.path());
        cmd
    };
    let work = dir.path().join("dataset.work");
    let mut child = run(&[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let finished = |work: &Path| {
        std::fs::read_dir(work).map_or(0, |d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().ends_with(".partial"))
                .count()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while finished(&work) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = finished(&work);
    assert!(
        (1..24).contains(&done),
        "killed with {done} of 24 shards finished"
    );
    assert!(!dir.path().join("dataset").exists());

    let out = run(&["--resume"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("input shard(s) reused"), "{table}");
    let resumed = snapshot(&dir.path().join("dataset"));

    let out = run(&[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(snapshot(&dir.path().join("dataset")), resumed);
}
