//! Data recipes: which sources, languages, caps and tokenizer make a dataset.

use crate::dedup::DedupConfig;
use crate::error::{DataError, Result};
use crate::filter::FilterConfig;
use crate::language::Language;
use crate::secrets::SecretsConfig;
use crate::shard::ShardCodec;
use crate::tokenizer::TokenizerSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A data recipe, read from TOML. Relative paths resolve against the recipe's directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRecipe {
    pub name: String,
    /// Dataset directory to write.
    pub output: PathBuf,
    #[serde(default)]
    pub tokenizer: TokenizerSpec,
    #[serde(default = "default_languages")]
    pub languages: Vec<String>,
    /// Cap on the bytes of source kept over all sources.
    #[serde(default = "default_max_total_bytes")]
    pub max_total_bytes: u64,
    /// Files larger than this are dropped.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: u64,
    /// Fraction of documents (by a hash of their id) held out for validation.
    #[serde(default = "default_valid_fraction")]
    pub valid_fraction: f64,
    /// Tokens per shard file.
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: u64,
    /// Input shards: the files are split into this many contiguous parts, each scanned
    /// on its own (in parallel, or on its own machine with `--shard i/n`) with memory
    /// bounded by its size, then merged. Size caps are shared evenly among them.
    #[serde(default = "default_input_shards")]
    pub input_shards: usize,
    /// How token files are stored: `zstd` (default) or `raw`.
    #[serde(default)]
    pub shard_codec: ShardCodec,
    pub sources: Vec<SourceConfig>,
    /// Quality filters.
    #[serde(default)]
    pub filters: FilterConfig,
    /// Secrets and personal data.
    #[serde(default)]
    pub secrets: SecretsConfig,
    /// Exact and near-duplicate removal.
    #[serde(default)]
    pub dedup: DedupConfig,
    /// Directory the recipe was read from (not part of the file).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// One source of documents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceConfig {
    pub name: String,
    #[serde(flatten)]
    pub kind: SourceKind,
    /// Cap on bytes kept from this source.
    pub max_bytes: Option<u64>,
    /// When false (the default for the registry and stdlib sources), a missing source is
    /// skipped with a note instead of failing the build.
    #[serde(default)]
    pub required: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SourceKind {
    /// A local directory or git checkout, walked respecting `.gitignore`.
    Dir { path: PathBuf },
    /// Crate sources in the local Cargo registry (`$CARGO_HOME/registry/src`).
    CargoRegistry,
    /// The standard library of the `python3` on `PATH`, when there is one.
    PythonStdlib,
    /// A Parquet file or a directory of them: The Stack v2's metadata with `blobs` naming
    /// where its gzip content blobs live (`content/{blob_id}`: a directory, or
    /// `s3://bucket/prefix`), or rows carrying the
    /// content in `content_column`.
    Parquet {
        path: PathBuf,
        blobs: Option<PathBuf>,
        #[serde(default = "default_content_column")]
        content_column: String,
        #[serde(default = "default_path_column")]
        path_column: String,
        /// Kept `license_type` values (default with `blobs`: `["permissive"]`).
        license_types: Option<Vec<String>>,
    },
    /// A JSON-lines file or a directory of `.jsonl` files, one document per line.
    Jsonl {
        path: PathBuf,
        #[serde(default = "default_content_column")]
        content_field: String,
        #[serde(default = "default_path_column")]
        path_field: String,
    },
}

fn default_content_column() -> String {
    "content".into()
}
fn default_path_column() -> String {
    "path".into()
}

impl SourceConfig {
    pub fn is_required(&self) -> bool {
        self.required.unwrap_or(matches!(
            self.kind,
            SourceKind::Dir { .. } | SourceKind::Parquet { .. }
        ))
    }
}

fn default_languages() -> Vec<String> {
    Language::ALL.iter().map(|l| l.name().to_string()).collect()
}
fn default_max_total_bytes() -> u64 {
    64 << 20
}
fn default_max_file_bytes() -> u64 {
    256 << 10
}
fn default_valid_fraction() -> f64 {
    0.02
}
fn default_input_shards() -> usize {
    1
}
fn default_shard_tokens() -> u64 {
    1 << 24
}

impl DataRecipe {
    /// Reads and validates a recipe file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::from_toml(&text, path, base_dir)
    }

    /// Parses a recipe from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path, base_dir: PathBuf) -> Result<Self> {
        let mut recipe: DataRecipe = toml::from_str(text).map_err(|e| DataError::Recipe {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        recipe.base_dir = base_dir;
        recipe.validate(origin)?;
        Ok(recipe)
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(DataError::Recipe {
                path: origin.to_path_buf(),
                message,
            })
        };
        if let Some(problem) = self.dedup.problem().or_else(|| self.filters.problem()) {
            return bad(problem);
        }
        for name in &self.languages {
            if Language::parse(name).is_none() {
                return bad(format!(
                    "unknown language `{name}` in `languages`; expected one of python, rust, triton"
                ));
            }
        }
        if self.languages.is_empty() {
            return bad("`languages` is empty".into());
        }
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return bad(format!(
                "`valid_fraction` = {} must be in [0, 1)",
                self.valid_fraction
            ));
        }
        if self.sources.is_empty() {
            return bad("no `[[sources]]` given".into());
        }
        if self.input_shards == 0 {
            return bad("`input_shards` must be at least 1".into());
        }
        if self.shard_tokens == 0 {
            return bad("`shard_tokens` must be positive".into());
        }
        Ok(())
    }

    pub fn languages(&self) -> Vec<Language> {
        self.languages
            .iter()
            .filter_map(|n| Language::parse(n))
            .collect()
    }

    /// The dataset directory, resolved against the recipe's directory.
    /// A recipe with the default stages over local directories, writing to `out` (for
    /// `tritter-data build --source DIR… --out DIR`).
    pub fn from_sources(dirs: &[PathBuf], out: &Path) -> Result<Self> {
        let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let mut text = format!("name = \"sources\"\noutput = {}\n", quote(out));
        for (i, dir) in dirs.iter().enumerate() {
            text.push_str(&format!(
                "[[sources]]\nname = \"source-{i}\"\nkind = \"dir\"\npath = {}\n",
                quote(dir)
            ));
        }
        let cwd = std::env::current_dir().map_err(|e| DataError::io(".", e))?;
        Self::from_toml(&text, Path::new("--source"), cwd)
    }

    pub fn output_dir(&self) -> PathBuf {
        self.base_dir.join(&self.output)
    }

    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = r#"
name = "t"
output = "out"
[[sources]]
name = "here"
kind = "dir"
path = "src"
[[sources]]
name = "reg"
kind = "cargo-registry"
max_bytes = 10
"#;

    #[test]
    fn parses_sources_and_defaults() {
        let r = DataRecipe::from_toml(RECIPE, Path::new("r.toml"), "/base".into()).unwrap();
        assert_eq!(r.sources.len(), 2);
        assert_eq!(r.sources[0].kind, SourceKind::Dir { path: "src".into() });
        assert!(r.sources[0].is_required());
        assert!(!r.sources[1].is_required());
        assert_eq!(r.output_dir(), PathBuf::from("/base/out"));
        assert_eq!(r.languages().len(), 3);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let err = DataRecipe::from_toml(
            &RECIPE.replace("name = \"t\"", "name = \"t\"\nlanguages = [\"cobol\"]"),
            Path::new("r.toml"),
            ".".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cobol") && err.contains("r.toml"), "{err}");

        let err = DataRecipe::from_toml(
            &RECIPE.replace("cargo-registry", "ftp"),
            Path::new("r.toml"),
            ".".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ftp"), "{err}");

        // A stage the pipeline does not have.
        let err = DataRecipe::from_toml(
            &format!("{RECIPE}\n[dedupe]\nthreshold = 0.8\n"),
            Path::new("r.toml"),
            ".".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unknown field `dedupe`") && err.contains("r.toml"),
            "{err}"
        );

        let err = DataRecipe::from_toml("name = ", Path::new("r.toml"), ".".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("r.toml"), "{err}");
    }
}
