//! Errors that name what failed, which file, and what to do about it.

use std::path::PathBuf;

/// A library error. Binaries wrap these in `anyhow` with more context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("model mismatch: {0}")]
    ModelMismatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
