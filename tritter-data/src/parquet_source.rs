//! Table sources: The Stack v2 as its users receive it — Parquet metadata rows whose
//! content lives in a blob store (a directory or S3) as `{blob_id}`, gzip-compressed,
//! decoded with the row's `src_encoding` — and Parquet or JSON-lines files that carry the content in a
//! column.

use crate::blobs::{BlobLocation, BlobRequest, BlobStore};
use crate::error::{DataError, Result};
use crate::language::Language;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use std::path::{Path, PathBuf};

/// A `kind = "parquet"` source's settings, its paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ParquetColumns {
    /// JSON lines rather than Parquet.
    pub jsonl: bool,
    /// Where gzip blobs named by `blob_id` live (The Stack v2's `content/`, a directory
    /// or S3). Without it, the content is read from `content_column`.
    pub blobs: Option<BlobLocation>,
    pub content_column: String,
    pub path_column: String,
    /// Keep only rows whose `license_type` is one of these (Stack v2 default:
    /// `["permissive"]`; an empty list keeps every row).
    pub license_types: Option<Vec<String>>,
}

/// One row, ready for the pipeline's stages, or the reason it cannot be.
#[derive(Debug, Clone)]
pub struct ParquetRow {
    /// The blob id, or the row's path.
    pub id: String,
    pub path: String,
    pub content: std::result::Result<Vec<u8>, &'static str>,
    /// From the `language` column, when the file has one.
    pub language: Option<String>,
    pub is_generated: bool,
    pub is_vendor: bool,
    pub license_type: Option<String>,
}

impl ParquetRow {
    /// The row's language: the metadata's when present (Python checked for Triton
    /// kernels), otherwise by extension and shebang.
    pub fn detect_language(&self, content: &[u8]) -> Option<Language> {
        let path = Path::new(&self.path);
        match self
            .language
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("python") => Language::detect(Path::new("x.py"), content),
            Some("rust") => Some(Language::Rust),
            Some(_) => None,
            None => Language::detect(path, content),
        }
    }

    /// Whether the licence filter keeps the row.
    pub fn licensed(&self, columns: &ParquetColumns) -> bool {
        let allowed = match (&columns.license_types, &columns.blobs) {
            (Some(list), _) => list.clone(),
            (None, Some(_)) => vec!["permissive".to_string()],
            (None, None) => Vec::new(),
        };
        allowed.is_empty()
            || self
                .license_type
                .as_ref()
                .is_some_and(|l| allowed.iter().any(|a| a == l))
    }
}

/// The `.{extension}` files of `path` (the file itself, or a directory's, sorted).
pub fn table_files(path: &Path, extension: &str) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| DataError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    Ok(files)
}

fn text(field: &Field) -> Option<String> {
    match field {
        Field::Str(s) => Some(s.clone()),
        Field::Bytes(b) => Some(String::from_utf8_lossy(b.data()).into_owned()),
        _ => None,
    }
}

/// Reads every row of one Parquet file, fetching Stack v2 content from the blob
/// directory. A file that is not Parquet, or lacks the columns it needs, is an error
/// naming it; a missing or corrupt blob, or content its encoding cannot decode, is a
/// row with the reason.
pub fn read_rows(file: &Path, columns: &ParquetColumns) -> Result<Vec<ParquetRow>> {
    if columns.jsonl {
        return read_jsonl(file, columns);
    }
    let bad = |message: String| DataError::Source(format!("{}: {message}", file.display()));
    let handle = std::fs::File::open(file).map_err(|e| DataError::io(file, e))?;
    let reader = SerializedFileReader::new(handle)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let need = |name: &str| -> Result<()> {
        if names.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(bad(format!(
                "no `{name}` column (columns: {})",
                names.join(", ")
            )))
        }
    };
    need(&columns.path_column)?;
    match &columns.blobs {
        Some(_) => need("blob_id")?,
        None => need(&columns.content_column)?,
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad(format!("cannot read rows: {e}")))?;
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for row in rows {
        let row = row.map_err(|e| bad(format!("corrupt row: {e}")))?;
        let (mut path, mut content, mut blob_id, mut encoding) = (None, None, None, None);
        let mut parsed = ParquetRow {
            id: String::new(),
            path: String::new(),
            content: Err("no content"),
            language: None,
            is_generated: false,
            is_vendor: false,
            license_type: None,
        };
        for (name, field) in row.get_column_iter() {
            match (name.as_str(), field) {
                (n, f) if n == columns.path_column => path = text(f),
                (n, f) if n == columns.content_column && columns.blobs.is_none() => {
                    content = match f {
                        Field::Str(s) => Some(s.clone().into_bytes()),
                        Field::Bytes(b) => Some(b.data().to_vec()),
                        _ => None,
                    }
                }
                ("blob_id", f) => blob_id = text(f),
                ("src_encoding", f) => encoding = text(f),
                ("language", f) => parsed.language = text(f),
                ("license_type", f) => parsed.license_type = text(f),
                ("is_generated", Field::Bool(b)) => parsed.is_generated = *b,
                ("is_vendor", Field::Bool(b)) => parsed.is_vendor = *b,
                _ => {}
            }
        }
        parsed.path = path.unwrap_or_default();
        parsed.id = blob_id.clone().unwrap_or_else(|| parsed.path.clone());
        parsed.content = match (&columns.blobs, blob_id) {
            (Some(_), Some(blob_id)) => {
                pending.push((out.len(), BlobRequest { blob_id, encoding }));
                Err("blob not fetched")
            }
            (Some(_), None) => Err("no blob id"),
            (None, _) => content.ok_or("no content"),
        };
        out.push(parsed);
    }
    if let Some(location) = &columns.blobs {
        let store = BlobStore::open(location)?;
        let requests: Vec<BlobRequest> = pending.iter().map(|(_, r)| r.clone()).collect();
        for ((row, _), content) in pending.iter().zip(store.fetch_all(&requests)?) {
            out[*row].content = content;
        }
    }
    Ok(out)
}

/// JSON lines: one object per line with the content and path fields (and, when there,
/// `language`, `license_type`, `is_generated`, `is_vendor`). A line that is not such an
/// object is an error naming the file and line.
fn read_jsonl(file: &Path, columns: &ParquetColumns) -> Result<Vec<ParquetRow>> {
    let text = std::fs::read_to_string(file).map_err(|e| DataError::io(file, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| DataError::Source(format!("{}:{}: {what}", file.display(), i + 1));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_string);
        let flag = |name: &str| value.get(name).and_then(|v| v.as_bool()).unwrap_or(false);
        let path = field(&columns.path_column)
            .ok_or_else(|| bad(&format!("no string `{}` field", columns.path_column)))?;
        let content = field(&columns.content_column)
            .ok_or_else(|| bad(&format!("no string `{}` field", columns.content_column)))?;
        out.push(ParquetRow {
            id: path.clone(),
            path,
            content: Ok(content.into_bytes()),
            language: field("language"),
            is_generated: flag("is_generated"),
            is_vendor: flag("is_vendor"),
            license_type: field("license_type"),
        });
    }
    Ok(out)
}
