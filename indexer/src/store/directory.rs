//! File operations with explicit durability, in the manner of tantivy's `Directory`: every
//! way the index writes a file goes through here, so "written" always means "fsynced, and
//! its name fsynced in its directory" and there is one implementation of each step.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut, MmapOptions, UncheckedAdvice};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{Result, StoreError};

/// One file as the manifest expects to find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Hex SHA-256 of some bytes (the intake's: uploads, gallery files and index files agree).
pub use intake::sha256_hex;

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| StoreError::io(path, "cannot open", e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| StoreError::io(path, "cannot read", e))?;
    Ok(hex::encode(h.finalize()))
}

/// Fsyncs a directory, so the names created, renamed or deleted in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, "cannot fsync directory", e))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Replaces `path` so a crash leaves the old content or the complete new one: `fill` writes
/// a temporary sibling (same filesystem, so the rename is atomic), which is fsynced, renamed
/// over `path`, and the directory fsynced. On error the temporary file is removed.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("{name}.tmp-"))
        .tempfile_in(dir)
        .map_err(|e| StoreError::io(dir, "cannot create a temporary file", e))?;
    let tmp_path = tmp.path().to_path_buf();
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    fill(&mut w)
        .and_then(|_| w.flush())
        .map_err(|e| StoreError::io(&tmp_path, "cannot write", e))?;
    let tmp = w
        .into_inner()
        .map_err(|e| StoreError::io(&tmp_path, "cannot write", e.into_error()))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| StoreError::io(&tmp_path, "cannot fsync", e))?;
    tmp.persist(path)
        .map_err(|e| StoreError::io(path, "cannot rename into place", e.error))?;
    sync_dir(dir)
}

/// [`write_atomic_with`] for bytes already in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// A writer that hashes what passes through it (so a file's manifest entry costs no re-read).
pub struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes of a mapped file that its verification holds resident at a time (a multiple of
/// the page size, so dropping a chunk drops exactly its pages).
const VERIFY_CHUNK: usize = 8 << 20;

/// An index directory. Files of a generation are written under new names with
/// [`Directory::write_new`] / [`Directory::seal`] and become durable by name with
/// [`Directory::sync`]; only the manifest is ever replaced, with [`Directory::atomic_write`].
#[derive(Debug, Clone)]
pub struct Directory {
    path: PathBuf,
}

impl Directory {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// See [`write_atomic`].
    pub fn atomic_write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.file(name), bytes)
    }

    /// Writes a new file through `fill` (replacing a leftover of the same name), fsyncs it
    /// and returns its entry. Its name is durable after the next [`Directory::sync`].
    ///
    /// A leftover is unlinked, never truncated: readers memory-map index files (see
    /// [`Directory::map_verified`]), and truncating an inode under a map kills its reader
    /// with SIGBUS, whereas an unlinked inode lives on until its last map is gone.
    pub fn write_new(
        &self,
        name: &str,
        fill: impl FnOnce(&mut HashingWriter<BufWriter<File>>) -> std::io::Result<()>,
    ) -> Result<FileEntry> {
        let path = self.file(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io(&path, "cannot delete the leftover", e))
            }
            _ => {}
        }
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, "cannot create", e))?;
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, f),
            hash: Sha256::new(),
            bytes: 0,
        };
        fill(&mut w)
            .and_then(|_| w.flush())
            .map_err(|e| StoreError::io(&path, "cannot write", e))?;
        let HashingWriter { inner, hash, bytes } = w;
        let f = inner
            .into_inner()
            .map_err(|e| StoreError::io(&path, "cannot write", e.into_error()))?;
        f.sync_all()
            .map_err(|e| StoreError::io(&path, "cannot fsync", e))?;
        Ok(FileEntry {
            name: name.to_string(),
            bytes,
            sha256: hex::encode(hash.finalize()),
        })
    }

    /// [`Directory::write_new`] for bytes already in memory.
    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> Result<FileEntry> {
        self.write_new(name, |w| w.write_all(bytes))
    }

    /// Fsyncs a file written by someone else (hnsw_rs) and returns its entry.
    pub fn seal(&self, name: &str) -> Result<FileEntry> {
        let path = self.file(name);
        let f = File::open(&path).map_err(|e| StoreError::io(&path, "cannot open", e))?;
        f.sync_all()
            .map_err(|e| StoreError::io(&path, "cannot fsync", e))?;
        let bytes = f
            .metadata()
            .map_err(|e| StoreError::io(&path, "cannot stat", e))?
            .len();
        Ok(FileEntry {
            name: name.to_string(),
            bytes,
            sha256: sha256_file(&path)?,
        })
    }

    fn check_len(&self, entry: &FileEntry, len: u64) -> Result<()> {
        if len != entry.bytes {
            return Err(StoreError::corrupt(
                self.file(&entry.name),
                format!(
                    "file is {len} bytes, the manifest says {} (truncated or overwritten)",
                    entry.bytes
                ),
            ));
        }
        Ok(())
    }

    fn missing(&self, entry: &FileEntry, e: std::io::Error) -> StoreError {
        let path = self.file(&entry.name);
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::Missing {
                path,
                msg: "listed in the manifest but not found".into(),
            }
        } else {
            StoreError::io(path, "cannot open index file", e)
        }
    }

    /// Reads a whole file and checks it against its entry (size first: cheap, and the usual
    /// symptom of truncation).
    pub fn read_verified(&self, entry: &FileEntry) -> Result<Vec<u8>> {
        let path = self.file(&entry.name);
        let mut f = File::open(&path).map_err(|e| self.missing(entry, e))?;
        let len = f
            .metadata()
            .map_err(|e| StoreError::io(&path, "cannot stat", e))?
            .len();
        self.check_len(entry, len)?;
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes)
            .map_err(|e| StoreError::io(&path, "cannot read", e))?;
        if sha256_hex(&bytes) != entry.sha256 {
            return Err(StoreError::corrupt(
                &path,
                "checksum mismatch: the file is corrupt",
            ));
        }
        Ok(bytes)
    }

    /// Checks a file's size and checksum without keeping its bytes.
    pub fn verify(&self, entry: &FileEntry) -> Result<()> {
        let path = self.file(&entry.name);
        let len = std::fs::metadata(&path)
            .map_err(|e| self.missing(entry, e))?
            .len();
        self.check_len(entry, len)?;
        if sha256_file(&path)? != entry.sha256 {
            return Err(StoreError::corrupt(
                &path,
                "checksum mismatch: the file is corrupt",
            ));
        }
        Ok(())
    }

    /// Memory-maps a file (read-only) after checking it against its entry, so its bytes are
    /// paged in as they are read instead of copied onto the heap.
    ///
    /// Mapping is safe because index files are immutable: a generation's files are written
    /// once under new names, only the manifest is ever replaced (by rename), and a commit
    /// that retires a generation unlinks its files, which leaves a reader's map of them
    /// intact (see [`Directory::write_new`] for leftovers).
    ///
    /// Verification policy: every open hashes the whole file once, through the map itself
    /// (so exactly the mapped bytes are checked), and drops each hashed chunk from the
    /// process's pages again (`MADV_DONTNEED`; the page cache keeps them). An open thus
    /// costs one sequential read but leaves the resident set as it was: pages come back as
    /// searches touch them. Checking at open rather than lazily per page keeps damage an
    /// error before any search (a bad vectors file is refused, a bad graph rebuilt) and
    /// keeps hashing off the search path.
    pub fn map_verified(&self, entry: &FileEntry) -> Result<Mmap> {
        self.map_verified_with(entry, |_, _| {})
    }

    /// [`Directory::map_verified`], also showing each verified chunk and its offset to
    /// `inspect` (to check the content in the same pass, while the chunk is resident).
    pub fn map_verified_with(
        &self,
        entry: &FileEntry,
        inspect: impl FnMut(usize, &[u8]),
    ) -> Result<Mmap> {
        let (path, file) = self.open_for_map(entry)?;
        // SAFETY: the file is immutable while mapped (see above).
        let map = unsafe { MmapOptions::new().map(&file) }
            .map_err(|e| StoreError::io(&path, "cannot memory-map", e))?;
        check_mapped(entry, &path, &map, inspect, |off, len| {
            // SAFETY: a shared read-only map: dropping its pages only re-reads the file.
            unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, off, len) }
        })?;
        Ok(map)
    }

    /// [`Directory::map_verified`] as a private, copy-on-write map: the owner may write
    /// into it (the graph links new nodes into old rows) and the file never changes; only
    /// the pages written are copied into the process's memory.
    pub fn map_verified_private(&self, entry: &FileEntry) -> Result<MmapMut> {
        let (path, file) = self.open_for_map(entry)?;
        // SAFETY: the file is immutable while mapped (see `map_verified`).
        let map = unsafe { MmapOptions::new().map_copy(&file) }
            .map_err(|e| StoreError::io(&path, "cannot memory-map", e))?;
        check_mapped(
            entry,
            &path,
            &map,
            |_, _| {},
            |off, len| {
                // SAFETY: nothing has been written into the map yet, so dropping its pages
                // loses nothing: they read back from the file.
                unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, off, len) }
            },
        )?;
        Ok(map)
    }

    fn open_for_map(&self, entry: &FileEntry) -> Result<(PathBuf, File)> {
        let path = self.file(&entry.name);
        let file = File::open(&path).map_err(|e| self.missing(entry, e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io(&path, "cannot stat", e))?
            .len();
        self.check_len(entry, len)?;
        Ok((path, file))
    }

    /// Fsyncs the directory itself (see [`sync_dir`]).
    pub fn sync(&self) -> Result<()> {
        sync_dir(&self.path)
    }

    /// Deletes a file; durable after the next [`Directory::sync`].
    pub fn remove(&self, name: &str) -> Result<()> {
        let p = self.file(name);
        std::fs::remove_file(&p).map_err(|e| StoreError::io(&p, "cannot delete", e))
    }

    /// Names of the plain entries in the directory, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.path)
            .map_err(|e| StoreError::io(&self.path, "cannot list directory", e))?;
        let mut v: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }
}

/// Hashes a mapped file's `bytes` chunk by chunk, showing each to `inspect` and then
/// calling `drop_pages(offset, len)` on it.
fn check_mapped(
    entry: &FileEntry,
    path: &Path,
    bytes: &[u8],
    mut inspect: impl FnMut(usize, &[u8]),
    drop_pages: impl Fn(usize, usize) -> std::io::Result<()>,
) -> Result<()> {
    if bytes.len() as u64 != entry.bytes {
        return Err(StoreError::corrupt(
            path,
            "the file changed while it was mapped",
        ));
    }
    let mut h = Sha256::new();
    for (i, chunk) in bytes.chunks(VERIFY_CHUNK).enumerate() {
        h.update(chunk);
        inspect(i * VERIFY_CHUNK, chunk);
        // Advisory: a failure only leaves the pages resident.
        let _ = drop_pages(i * VERIFY_CHUNK, chunk.len());
    }
    if hex::encode(h.finalize()) != entry.sha256 {
        return Err(StoreError::corrupt(
            path,
            "checksum mismatch: the file is corrupt",
        ));
    }
    Ok(())
}

/// An exclusive lock on `<dir>/<file>`, held until dropped (the OS releases it when the
/// process dies, so a crash never leaves a stale lock). The holder writes its pid into the
/// file so a refused process can say who holds it.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock or fails at once with [`StoreError::Locked`]; `what` names the
    /// directory's role in that message ("the index", "the data directory").
    pub fn acquire(dir: &Path, file_name: &str, what: &str) -> Result<Self> {
        let path = dir.join(file_name);
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, "cannot open lock file", e))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = holder
                    .trim()
                    .parse::<u32>()
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default();
                return Err(StoreError::Locked {
                    path,
                    what: what.to_string(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::io(&path, "cannot lock", e))
            }
        }
        // Informative only: a failure to record the pid does not weaken the lock.
        let _ = f
            .set_len(0)
            .and_then(|_| f.write_all(format!("{}\n", std::process::id()).as_bytes()));
        Ok(Self { _file: f, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A new directory built out of sight: everything is written into a hidden sibling of
/// `target`, renamed onto `target` by [`Staging::finish`]. A crash before that leaves
/// nothing at `target` (so a rerun starts clean); the sibling is removed by the next
/// [`Staging::begin`] for the same target once nobody holds its lock.
pub struct Staging {
    path: PathBuf,
    target: PathBuf,
}

/// The lock file of a staging directory, held by whoever fills it.
pub const STAGING_LOCK: &str = "LOCK";

impl Staging {
    /// Refuses a `target` that exists and is not an empty directory. `is_ours` says which
    /// file names a stale staging directory may hold for it to be deleted.
    pub fn begin(target: &Path, is_ours: impl Fn(&str) -> bool) -> Result<Self> {
        Self::check_target(target)?;
        let parent = parent_of(target);
        std::fs::create_dir_all(parent)
            .map_err(|e| StoreError::io(parent, "cannot create directory", e))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                StoreError::Invalid(format!("{}: not a directory name", target.display()))
            })?;
        let prefix = format!(".{name}.staging-");
        Self::remove_stale(parent, &prefix, &is_ours);
        let path = parent.join(format!("{prefix}{}", std::process::id()));
        if path.exists() {
            // Our own pid from an earlier, failed attempt in this process.
            Self::remove_if_ours(&path, &is_ours);
        }
        std::fs::create_dir(&path)
            .map_err(|e| StoreError::io(&path, "cannot create staging directory", e))?;
        Ok(Self {
            path,
            target: target.to_path_buf(),
        })
    }

    /// Errors unless `target` is absent or an empty directory (what the final rename can
    /// replace), so a caller can fail before doing expensive work.
    pub fn check_target(target: &Path) -> Result<()> {
        if let Ok(md) = std::fs::symlink_metadata(target) {
            let empty_dir = md.is_dir()
                && std::fs::read_dir(target)
                    .map(|mut rd| rd.next().is_none())
                    .unwrap_or(false);
            if !empty_dir {
                return Err(StoreError::Exists {
                    path: target.to_path_buf(),
                    msg: "already exists and is not an empty directory; choose a new directory"
                        .into(),
                });
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the staged content durable and moves it onto the target in one rename.
    pub fn finish(self) -> Result<PathBuf> {
        sync_dir(&self.path)?;
        std::fs::rename(&self.path, &self.target).map_err(|e| {
            StoreError::io(
                &self.target,
                "cannot move the new directory into place (does it exist and hold files?)",
                e,
            )
        })?;
        sync_dir(parent_of(&self.target))?;
        Ok(self.target)
    }

    /// Deletes `<parent>/<prefix>*` left by killed processes: only when their lock is free
    /// and they hold nothing but our files. Failures are logged, not fatal.
    fn remove_stale(parent: &Path, prefix: &str, is_ours: &dyn Fn(&str) -> bool) {
        let Ok(rd) = std::fs::read_dir(parent) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && e.path().is_dir() {
                Self::remove_if_ours(&e.path(), is_ours);
            }
        }
    }

    fn remove_if_ours(dir: &Path, is_ours: &dyn Fn(&str) -> bool) {
        let Ok(lock) = DirLock::acquire(dir, STAGING_LOCK, "a staging directory") else {
            return; // another process is filling it
        };
        let names = Directory::new(dir).names().unwrap_or_default();
        if let Some(foreign) = names.iter().find(|n| *n != STAGING_LOCK && !is_ours(n)) {
            tracing::warn!(
                "{}: left in place: it holds '{foreign}', which the indexer did not write",
                dir.display()
            );
            return;
        }
        drop(lock);
        match std::fs::remove_dir_all(dir) {
            Ok(()) => tracing::info!("removed {} (left by an interrupted run)", dir.display()),
            Err(e) => tracing::warn!("{}: cannot remove: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let d = Directory::new(dir.path());
        d.atomic_write("a.json", b"one").unwrap();
        d.atomic_write("a.json", b"two").unwrap();
        assert_eq!(std::fs::read(d.file("a.json")).unwrap(), b"two");
        assert_eq!(d.names().unwrap(), vec!["a.json".to_string()]);
        let e = write_atomic_with(&d.file("b"), |_| Err(std::io::Error::other("boom")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("boom"), "{e}");
        assert_eq!(d.names().unwrap(), vec!["a.json".to_string()]);
    }

    #[test]
    fn write_new_hashes_and_verify_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let d = Directory::new(dir.path());
        let e = d.write_bytes("v.bin", b"hello").unwrap();
        assert_eq!((e.bytes, e.sha256.clone()), (5, sha256_hex(b"hello")));
        assert_eq!(d.seal("v.bin").unwrap(), e);
        assert_eq!(d.read_verified(&e).unwrap(), b"hello");
        std::fs::write(d.file("v.bin"), b"hellO").unwrap();
        let err = d.verify(&e).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        std::fs::remove_file(d.file("v.bin")).unwrap();
        let err = d.read_verified(&e).unwrap_err();
        assert!(matches!(err, StoreError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("v.bin"));
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path(), "LOCK", "the index").unwrap();
        let err = DirLock::acquire(dir.path(), "LOCK", "the index").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Locked { .. }));
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("the index"),
            "{msg}"
        );
        drop(held);
        DirLock::acquire(dir.path(), "LOCK", "the index").unwrap();
    }

    #[test]
    fn staging_renames_at_the_end_and_cleans_up_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let ours = |n: &str| n.ends_with(".dat");
        // A killed run: staged files, lock released (the process is gone).
        let s = Staging::begin(&target, ours).unwrap();
        std::fs::write(s.path().join("x.dat"), b"1").unwrap();
        let stale = s.path().to_path_buf();
        drop(s);
        // Its pid is ours, so make it look like another process's.
        let other = dir.path().join(".out.staging-1");
        std::fs::rename(&stale, &other).unwrap();
        assert!(!target.exists());
        let s = Staging::begin(&target, ours).unwrap();
        assert!(!other.exists(), "stale staging directory removed");
        std::fs::write(s.path().join("y.dat"), b"2").unwrap();
        assert_eq!(s.finish().unwrap(), target);
        assert!(target.join("y.dat").is_file());
        let e = Staging::begin(&target, ours).err().unwrap();
        assert!(matches!(e, StoreError::Exists { .. }), "{e}");
        // A stale directory with a foreign file is left alone.
        let foreign = dir.path().join(".t2.staging-7");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), b"mine").unwrap();
        let s = Staging::begin(&dir.path().join("t2"), ours).unwrap();
        assert!(foreign.join("notes.txt").is_file());
        s.finish().unwrap();
    }
}
