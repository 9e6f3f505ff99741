//! Shard codecs: zstd by default, raw on request, the same tokens either way, and a
//! damaged shard named at load.

use tritter_data::{build_dataset, BuildOptions, DataRecipe, ShardReader, Split};

fn build(dir: &std::path::Path, codec: &str) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.rs"), include_str!("../src/build.rs")).unwrap();
    std::fs::write(src.join("b.rs"), include_str!("../src/dedup.rs")).unwrap();
    let path = dir.join(format!("{codec}.toml"));
    std::fs::write(
        &path,
        format!("name = \"s\"\noutput = \"{codec}\"\nvalid_fraction = 0.0\nshard_codec = \"{codec}\"\n[[sources]]\nname = \"src\"\nkind = \"dir\"\npath = \"src\"\n"),
    )
    .unwrap();
    let recipe = DataRecipe::from_file(&path).unwrap();
    build_dataset(&recipe, &BuildOptions::default())
        .unwrap()
        .dir
}

#[test]
fn zstd_and_raw_shards_hold_the_same_tokens_and_damage_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let zstd = build(dir.path(), "zstd");
    let raw = build(dir.path(), "raw");
    let (z, r) = (
        ShardReader::load(&zstd, Split::Train).unwrap(),
        ShardReader::load(&raw, Split::Train).unwrap(),
    );
    assert_eq!(z.tokens, r.tokens);
    assert_eq!(z.doc_starts, r.doc_starts);
    let compressed = zstd.join("train-00000.tokens.zst");
    let plain = raw.join("train-00000.tokens");
    let (zb, rb) = (
        std::fs::metadata(&compressed).unwrap().len(),
        std::fs::metadata(&plain).unwrap().len(),
    );
    assert!(zb * 3 < rb, "zstd {zb} bytes vs raw {rb}");

    // A flipped byte inside the frame, and a truncated frame.
    let bytes = std::fs::read(&compressed).unwrap();
    let mid = bytes.len() / 2;
    let mut flipped = bytes.clone();
    flipped[mid] ^= 0x5a;
    for damaged in [flipped, bytes[..mid].to_vec()] {
        std::fs::write(&compressed, &damaged).unwrap();
        let err = ShardReader::load(&zstd, Split::Train)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train-00000.tokens.zst") && err.contains("corrupt"),
            "{err}"
        );
    }
}
