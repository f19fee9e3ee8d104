//! The durable store under the index: every file the index writes goes through
//! [`Directory`] (atomic replace, fsync of file and directory, verified reads), one process
//! writes at a time ([`DirLock`]), and new directories appear whole ([`Staging`]). Errors
//! are [`StoreError`]s that name the file and what to do.

pub mod directory;
pub mod error;

pub use directory::{
    sha256_file, sha256_hex, sync_dir, write_atomic, write_atomic_with, DirLock, Directory,
    FileEntry, Staging,
};
pub use error::{Result, StoreError};
