//! Training a BPE tokenizer on a recipe's documents, and building a dataset with it.

use tritter_data::bpe::{train_bpe, SPECIAL_TOKENS};
use tritter_data::{build_dataset, BuildOptions, DataRecipe, HfTokenizer, Tokenizer};

fn recipe(dir: &std::path::Path, extra: &str) -> DataRecipe {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, text) in [
        ("shard.rs", include_str!("../src/shard.rs")),
        ("recipe.rs", include_str!("../src/recipe.rs")),
        ("build.rs", include_str!("../src/build.rs")),
        ("dedup.rs", include_str!("../src/dedup.rs")),
    ] {
        std::fs::write(src.join(name), text).unwrap();
    }
    let path = dir.join("data.toml");
    std::fs::write(
        &path,
        format!("name = \"bpe\"\noutput = \"dataset\"\nvalid_fraction = 0.0\n{extra}\n[[sources]]\nname = \"src\"\nkind = \"dir\"\npath = \"src\"\n"),
    )
    .unwrap();
    DataRecipe::from_file(&path).unwrap()
}

#[test]
fn a_trained_tokenizer_round_trips_code_compresses_it_and_builds_a_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "");
    let out = dir.path().join("tokenizer.json");
    let summary = train_bpe(&r, 600, &out, &BuildOptions::default()).unwrap();
    assert_eq!(summary.documents, 4);
    assert!(
        summary.vocab_size > 300 && summary.vocab_size <= 600,
        "{summary:?}"
    );
    // Merges learned from the corpus: well under one token per byte.
    assert!(summary.tokens_per_byte < 0.5, "{summary:?}");

    let t = HfTokenizer::from_file(&out).unwrap();
    for (i, name) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(t.inner().token_to_id(name), Some(i as u32), "{name}");
    }
    assert_eq!((t.bos(), t.eos(), t.code_marker()), (Some(1), 2, Some(3)));
    // Text spelling a special token stays text.
    assert!(!t.encode(b"// ends in <eos>").contains(&2));
    // Any text round-trips, including bytes the corpus never had.
    for text in [
        include_str!("../src/shard.rs"),
        "def f(x):\n\treturn x ** 2  # ünïcödé, 中文, emoji 🦀\n",
        "",
    ] {
        let back = t.decode(&t.encode(text.as_bytes()));
        let first_difference = back.iter().zip(text.as_bytes()).position(|(a, b)| a != b);
        assert!(
            back == text.as_bytes(),
            "{} bytes back for {}; first difference at {first_difference:?}: {:?}",
            back.len(),
            text.len(),
            String::from_utf8_lossy(
                &back[first_difference.unwrap_or(0).saturating_sub(20)..][..60.min(back.len())]
            )
        );
    }

    // A recipe naming it builds a dataset whose documents decode to the sources.
    let path = dir.path().join("data.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "valid_fraction",
        "tokenizer = { huggingface = \"tokenizer.json\" }\nvalid_fraction",
    );
    std::fs::write(&path, text).unwrap();
    let with_bpe = DataRecipe::from_file(&path).unwrap();
    let built = build_dataset(&with_bpe, &BuildOptions::default()).unwrap();
    assert_eq!(built.manifest.vocab_size, summary.vocab_size);
    let stream = tritter_data::ShardReader::load(&built.dir, tritter_data::Split::Train).unwrap();
    assert!(stream.tokens.len() < include_str!("../src/shard.rs").len() * 4);
    let decoded = t.decode(&stream.tokens);
    let decoded = String::from_utf8(decoded).unwrap();
    assert!(decoded.contains(include_str!("../src/recipe.rs")));
}

#[test]
fn a_vocabulary_too_small_and_an_empty_corpus_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(dir.path(), "");
    let out = dir.path().join("t.json");
    let err = train_bpe(&r, 100, &out, &BuildOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("--vocab-size 100"), "{err}");
    assert!(!out.exists());
    let empty = recipe(dir.path(), "languages = [\"triton\"]");
    let err = train_bpe(&empty, 1000, &out, &BuildOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no documents"), "{err}");
    assert!(!out.exists());
    // Destinations that cannot become the file are refused before the training.
    for (bad, needle) in [
        (dir.path().to_path_buf(), "is a directory"),
        (dir.path().join("nodir/t.json"), "does not exist"),
    ] {
        let err = train_bpe(&r, 1000, &bad, &BuildOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle) && err.contains("--out"), "{err}");
    }
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["data.toml", "src"],
        "nothing but the recipe and its sources"
    );
}
