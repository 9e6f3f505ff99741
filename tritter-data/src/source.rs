//! Sources: where documents come from. Each lists candidate files in a deterministic order
//! (by a hash of the path relative to the source root, so the order does not depend on
//! where the tree lives, and a size cap samples across the whole tree rather than its
//! alphabetical head).

use crate::blobs::BlobLocation;
use crate::document::fnv1a;
use crate::error::{DataError, Result};
use crate::parquet_source::{table_files, ParquetColumns};
use crate::recipe::{DataRecipe, SourceConfig, SourceKind};
use std::path::{Path, PathBuf};

/// A candidate file of a source.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    /// Path relative to the source root, with `/` separators: the document id's tail.
    pub relative: String,
    pub size: u64,
}

/// A resolved source: its root and its files in pipeline order.
#[derive(Debug)]
pub struct ResolvedSource {
    pub name: String,
    pub root: PathBuf,
    /// Code files, or for a Parquet source its `.parquet` files.
    pub files: Vec<SourceFile>,
    pub max_bytes: Option<u64>,
    /// For a Parquet source: its columns, the blob directory resolved.
    pub parquet: Option<ParquetColumns>,
}

/// Extensions worth reading; extensionless files are read only for a Python shebang.
const CODE_EXTENSIONS: [&str; 3] = ["py", "pyi", "rs"];

/// Resolves the root of a source. `Ok(None)` when an optional source is absent here.
pub fn source_root(recipe: &DataRecipe, source: &SourceConfig) -> Result<Option<PathBuf>> {
    let root = match &source.kind {
        SourceKind::Dir { path } => Some(recipe.resolve(path)),
        SourceKind::Parquet { path, .. } | SourceKind::Jsonl { path, .. } => {
            Some(recipe.resolve(path))
        }
        SourceKind::CargoRegistry => cargo_home().map(|home| home.join("registry").join("src")),
        SourceKind::PythonStdlib => python_stdlib(),
    };
    let parquet = matches!(
        source.kind,
        SourceKind::Parquet { .. } | SourceKind::Jsonl { .. }
    );
    match root {
        Some(root) if root.is_dir() || (parquet && root.is_file()) => Ok(Some(root)),
        other => {
            let what = other
                .map(|p| format!("{} is not a directory", p.display()))
                .unwrap_or_else(|| "could not be located on this machine".to_string());
            if source.is_required() {
                Err(DataError::Source(format!("`{}`: {what}", source.name)))
            } else {
                eprintln!("note: skipping optional source `{}`: {what}", source.name);
                Ok(None)
            }
        }
    }
}

/// Lists a source's candidate files, in deterministic order.
pub fn list_source(recipe: &DataRecipe, source: &SourceConfig) -> Result<Option<ResolvedSource>> {
    let Some(root) = source_root(recipe, source)? else {
        return Ok(None);
    };
    let table = match &source.kind {
        SourceKind::Parquet {
            blobs,
            content_column,
            path_column,
            license_types,
            ..
        } => Some(ParquetColumns {
            jsonl: false,
            blobs: blobs
                .as_ref()
                .map(|b| BlobLocation::parse(b, &recipe.base_dir)),
            content_column: content_column.clone(),
            path_column: path_column.clone(),
            license_types: license_types.clone(),
        }),
        SourceKind::Jsonl {
            content_field,
            path_field,
            ..
        } => Some(ParquetColumns {
            jsonl: true,
            blobs: None,
            content_column: content_field.clone(),
            path_column: path_field.clone(),
            license_types: None,
        }),
        _ => None,
    };
    if let Some(columns) = table {
        let extension = if columns.jsonl { "jsonl" } else { "parquet" };
        let files = table_files(&root, extension)?
            .into_iter()
            .map(|path| SourceFile {
                relative: relative_id(&root, &path),
                size: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
                path,
            })
            .collect();
        if let Some(BlobLocation::Dir(dir)) = columns
            .blobs
            .as_ref()
            .filter(|b| matches!(b, BlobLocation::Dir(d) if !d.is_dir()))
        {
            return Err(DataError::Source(format!(
                "`{}`: blob directory {} is not a directory",
                source.name,
                dir.display()
            )));
        }
        return Ok(Some(ResolvedSource {
            name: source.name.clone(),
            root,
            files,
            max_bytes: source.max_bytes,
            parquet: Some(columns),
        }));
    }
    let exclude_site_packages = source.kind == SourceKind::PythonStdlib;
    let mut files = Vec::new();
    let walker = ignore::WalkBuilder::new(&root)
        .require_git(false)
        .follow_links(false)
        .build();
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(err) => {
                eprintln!(
                    "note: skipping unreadable entry in `{}`: {err}",
                    source.name
                );
                continue;
            }
        };
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !ext.is_empty() && !CODE_EXTENSIONS.contains(&ext) {
            continue;
        }
        let relative = relative_id(&root, path);
        if exclude_site_packages && relative.contains("site-packages/") {
            continue;
        }
        let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
        files.push(SourceFile {
            path: path.to_path_buf(),
            relative,
            size,
        });
    }
    files.sort_by(|a, b| {
        fnv1a(a.relative.as_bytes())
            .cmp(&fnv1a(b.relative.as_bytes()))
            .then_with(|| a.relative.cmp(&b.relative))
    });
    Ok(Some(ResolvedSource {
        name: source.name.clone(),
        root,
        files,
        max_bytes: source.max_bytes,
        parquet: None,
    }))
}

fn relative_id(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

pub fn cargo_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Some(PathBuf::from(home));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo"))
}

fn python_stdlib() -> Option<PathBuf> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let path = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(path.trim()))
}
