//! The store's own errors: each names the file it is about and, where the user can act,
//! what to do. Typed (not strings) so callers can tell "another process holds the lock"
//! or "no manifest beside index files" from a damaged file without parsing messages.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating-system call on `path` failed.
    #[error("{}: {what}: {err}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        err: std::io::Error,
    },
    /// A file's bytes are not what its checksum, its header or the manifest says.
    #[error("{}: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    /// A file the manifest says exists is not there.
    #[error("{}: {msg}", path.display())]
    Missing { path: PathBuf, msg: String },
    /// A directory holds index files but no manifest that could say which of them are valid.
    #[error(
        "{}: holds index files ({}) but no manifest.json{why}; refusing to start a new index over them. \
         Restore manifest.json (e.g. from a backup), or move these files elsewhere to start an empty index; nothing was changed",
        dir.display(), found.join(", ")
    )]
    NoManifest {
        dir: PathBuf,
        found: Vec<String>,
        why: String,
    },
    /// Written by another program or by an unsupported format version.
    #[error("{}: {msg}", path.display())]
    Unsupported { path: PathBuf, msg: String },
    /// Another process holds the directory's lock file.
    #[error(
        "{}: {what} is already in use by another process{holder}; stop it first (only one process may write it)",
        path.display()
    )]
    Locked {
        path: PathBuf,
        what: String,
        holder: String,
    },
    /// The target of a create already holds something.
    #[error("{}: {msg}", path.display())]
    Exists { path: PathBuf, msg: String },
    /// The index changed on disk since this process opened it.
    #[error("{}: the index was changed by another process since it was opened; open it again", path.display())]
    Stale { path: PathBuf },
    /// An operation failed without an OS error to show (e.g. inside hnsw_rs).
    #[error("{}: {msg}", path.display())]
    Failed { path: PathBuf, msg: String },
    /// No live item has this id (never added, or deleted).
    #[error("no item with id {0} in the index (never added, or deleted)")]
    NoSuchItem(u64),
    /// Arguments or data that cannot be stored (bad dim, non-finite vector, bad parameters).
    #[error("invalid input: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

impl StoreError {
    pub fn io(path: impl AsRef<Path>, what: &'static str, err: std::io::Error) -> Self {
        StoreError::Io {
            path: path.as_ref().to_path_buf(),
            what,
            err,
        }
    }
    pub fn corrupt(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            path: path.as_ref().to_path_buf(),
            msg: msg.to_string(),
        }
    }
    pub fn unsupported(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        StoreError::Unsupported {
            path: path.as_ref().to_path_buf(),
            msg: msg.to_string(),
        }
    }
}
