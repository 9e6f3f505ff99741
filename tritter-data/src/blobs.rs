//! The Stack v2's content blobs: gzip files named by `blob_id`, in a local directory or
//! in S3 (`s3://bucket/prefix`, through `object_store`, credentials, region and endpoint
//! from the standard `AWS_*` environment variables). S3 blobs are fetched concurrently,
//! at most [`S3_CONCURRENCY`] at a time, with retries and backoff on transient errors.

use crate::error::{DataError, Result};
use encoding_rs::Encoding;
use futures::stream::{self, StreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, RetryConfig};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Requests in flight at once against S3.
pub const S3_CONCURRENCY: usize = 32;
/// Retries of one request on a transient error (5xx, timeouts, dropped connections).
pub const S3_RETRIES: usize = 5;

/// Where a source's blobs live, as the recipe names it.
#[derive(Debug, Clone, PartialEq)]
pub enum BlobLocation {
    Dir(PathBuf),
    /// `s3://bucket/prefix`.
    S3(String),
}

impl BlobLocation {
    /// `s3://…` as is; anything else a directory resolved against `base`.
    pub fn parse(text: &Path, base: &Path) -> Self {
        match text.to_str() {
            Some(url) if url.starts_with("s3://") => BlobLocation::S3(url.to_string()),
            _ => BlobLocation::Dir(base.join(text)),
        }
    }
}

impl std::fmt::Display for BlobLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobLocation::Dir(dir) => write!(f, "{}", dir.display()),
            BlobLocation::S3(url) => f.write_str(url),
        }
    }
}

/// One blob to fetch: its id and the `src_encoding` of its text.
#[derive(Debug, Clone)]
pub struct BlobRequest {
    pub blob_id: String,
    pub encoding: Option<String>,
}

/// An open blob store.
pub enum BlobStore {
    Dir(PathBuf),
    S3 {
        url: String,
        store: AmazonS3,
        prefix: Option<ObjectPath>,
        runtime: tokio::runtime::Runtime,
    },
}

impl BlobStore {
    pub fn open(location: &BlobLocation) -> Result<Self> {
        match location {
            BlobLocation::Dir(dir) => Ok(BlobStore::Dir(dir.clone())),
            BlobLocation::S3(url) => {
                let bad =
                    |e: &dyn std::fmt::Display| DataError::Source(format!("blob store {url}: {e}"));
                let store = AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_retry(RetryConfig {
                        max_retries: S3_RETRIES,
                        retry_timeout: Duration::from_secs(60),
                        ..RetryConfig::default()
                    })
                    .build()
                    .map_err(|e| bad(&e))?;
                let prefix = url
                    .strip_prefix("s3://")
                    .and_then(|rest| rest.split_once('/'))
                    .map(|(_, p)| p.trim_matches('/'))
                    .filter(|p| !p.is_empty())
                    .map(ObjectPath::from);
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .map_err(|e| bad(&e))?;
                // Fail early, naming the store, on a missing bucket, refused credentials
                // or an empty prefix, rather than counting every row's blob as missing.
                let listing = runtime
                    .block_on(store.list_with_delimiter(prefix.as_ref()))
                    .map_err(|e| bad(&e))?;
                if listing.objects.is_empty() && listing.common_prefixes.is_empty() {
                    return Err(bad(&"holds no objects"));
                }
                Ok(BlobStore::S3 {
                    url: url.clone(),
                    store,
                    prefix,
                    runtime,
                })
            }
        }
    }

    /// Every requested blob, decompressed and decoded to UTF-8, in request order; a blob
    /// that is missing, corrupt or undecodable is that row's reason. An S3 error other
    /// than a missing object (after retries) fails the whole fetch, naming the store.
    pub fn fetch_all(
        &self,
        requests: &[BlobRequest],
    ) -> Result<Vec<std::result::Result<Vec<u8>, &'static str>>> {
        match self {
            BlobStore::Dir(dir) => Ok(requests
                .iter()
                .map(|r| {
                    let path = blob_path(&r.blob_id).map(|id| dir.join(id))?;
                    let compressed = std::fs::read(path).map_err(|_| "missing blob")?;
                    decode_blob(&compressed, r.encoding.as_deref())
                })
                .collect()),
            BlobStore::S3 {
                url,
                store,
                prefix,
                runtime,
            } => {
                let fetched: Vec<Result<std::result::Result<Vec<u8>, &'static str>>> = runtime
                    .block_on(
                        stream::iter(requests)
                            .map(|r| async move {
                                let id = match blob_path(&r.blob_id) {
                                    Ok(id) => id,
                                    Err(reason) => return Ok(Err(reason)),
                                };
                                let location = match prefix {
                                    Some(p) => p.clone().join(id),
                                    None => ObjectPath::from(id),
                                };
                                let got = match store.get(&location).await {
                                    Ok(got) => got.bytes().await,
                                    Err(e) => Err(e),
                                };
                                match got {
                                    Ok(bytes) => Ok(decode_blob(&bytes, r.encoding.as_deref())),
                                    Err(object_store::Error::NotFound { .. }) => {
                                        Ok(Err("missing blob"))
                                    }
                                    Err(e) => Err(DataError::Source(format!(
                                        "blob store {url}: fetching {location}: {e}"
                                    ))),
                                }
                            })
                            .buffered(S3_CONCURRENCY)
                            .collect(),
                    );
                fetched.into_iter().collect()
            }
        }
    }
}

/// A blob id safe to use as a file or object name.
fn blob_path(blob_id: &str) -> std::result::Result<&str, &'static str> {
    if blob_id.is_empty() || blob_id.contains(['/', '\\']) || blob_id.starts_with('.') {
        Err("invalid blob id")
    } else {
        Ok(blob_id)
    }
}

/// A Stack v2 blob's bytes: gzip, in `encoding` (UTF-8 when absent), as UTF-8.
pub fn decode_blob(
    compressed: &[u8],
    encoding: Option<&str>,
) -> std::result::Result<Vec<u8>, &'static str> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(compressed)
        .read_to_end(&mut raw)
        .map_err(|_| "corrupt blob")?;
    let encoding = match encoding {
        None => encoding_rs::UTF_8,
        Some(label) => Encoding::for_label(label.as_bytes()).ok_or("unknown encoding")?,
    };
    encoding
        .decode_without_bom_handling_and_without_replacement(&raw)
        .map(|text| text.into_owned().into_bytes())
        .ok_or("invalid encoding")
}
