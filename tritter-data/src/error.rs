use std::path::PathBuf;

/// Errors of the data pipeline. Each names the file or field that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed data recipe {path}: {message}")]
    Recipe { path: PathBuf, message: String },
    #[error("source {0}")]
    Source(String),
    #[error("the corpus is empty: {0}")]
    EmptyCorpus(String),
    #[error("dataset {path}: {message}")]
    Dataset { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub fn dataset(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Dataset {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
