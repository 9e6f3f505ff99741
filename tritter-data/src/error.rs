use std::path::{Path, PathBuf};

/// Errors of the data pipeline. Each names the file or field that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The OS error is part of the message, not a source of its own, so that a report
    /// of the chain (anyhow's `Caused by:`) does not say it twice.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
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
            error: source,
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

/// Refuses `path` as the destination of a file written at the end of long work (an
/// export, a trained tokenizer): a directory, or a path in a directory that does not
/// exist. `flag` names the option the path came from, and a directory is answered with
/// `file_name` in it as an example. Checked before the work, so it does not fail at its
/// end.
pub fn check_output_file(
    path: &Path,
    flag: &str,
    file_name: &str,
) -> std::result::Result<(), String> {
    let shown = path.display();
    if path.is_dir() {
        return Err(format!(
            "{flag} {shown} is a directory; name the file to write, e.g. {}",
            path.join(file_name).display()
        ));
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(format!(
            "{flag} {shown}: the directory {} does not exist",
            dir.display()
        )),
        _ => Ok(()),
    }
}

/// A count on the command line that must be at least 1 (a batch, a size, a number of
/// tokens): clap's `value_parser` for the binaries of this workspace.
pub fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("expected at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e}")),
    }
}
