//! The one folder walker: every part of Deep Metric that lists a folder of images (the
//! trainer's `folder` dataset, `indexer build/add DIR`, the server's `--gallery DIR`) uses
//! it, so they all see the same files with the same labels.
//!
//! The rules:
//! - **Hidden** entries (name starting with `.`) are skipped at every depth, files and
//!   folders alike (`.git`, `.thumbnails`, macOS `._x.jpg` resource forks).
//! - **Symlinks** are followed, to files and to folders; a folder reached twice (a link
//!   loop, or two links to one folder) is walked once, and a dangling link is skipped.
//! - **Images** are files with one of [`crate::IMAGE_EXTENSIONS`], any case.
//! - **Labels**: a file's label is the name of its top-level folder under the root
//!   (`ROOT/cardinal/2019/1.jpg` → `cardinal`); a file directly in the root has none.
//! - The list is sorted by path, so ids given in listing order are reproducible.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// An image file found by [`walk_images`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageFile {
    /// `root` joined with the path below it (not canonicalised: links keep their names).
    pub path: PathBuf,
    /// The top-level folder's name, see the module docs.
    pub label: Option<String>,
}

/// A folder that cannot be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot list folder {}: {source}", path.display())]
pub struct WalkError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Names starting with `.`.
pub fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The label of `file` under `root` (see the module docs).
pub fn label_for(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).ok()?;
    let mut parts = rel.components();
    let first = parts.next()?;
    parts.next()?; // the file itself must be below the folder
    Some(first.as_os_str().to_string_lossy().into_owned())
}

/// Every image under `root`, recursively, by the rules in the module docs.
pub fn walk_images(root: &Path) -> Result<Vec<ImageFile>, WalkError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WalkError { path, source }
    };
    let meta = std::fs::metadata(root).map_err(err(root))?;
    if !meta.is_dir() {
        return Err(WalkError {
            path: root.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a folder"),
        });
    }
    let mut seen = HashSet::new();
    seen.insert(std::fs::canonicalize(root).map_err(err(root))?);
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(err(&dir))? {
            let entry = entry.map_err(err(&dir))?;
            if is_hidden(&entry.file_name()) {
                continue;
            }
            let path = entry.path();
            // `metadata` follows links; a dangling link has none and is skipped.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                if let Ok(real) = std::fs::canonicalize(&path) {
                    if seen.insert(real) {
                        stack.push(path);
                    }
                }
            } else if crate::has_image_extension(&path) {
                let label = label_for(root, &path);
                out.push(ImageFile { path, label });
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_hidden_symlinks_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["red/sub", "blue", ".git", "red/.cache", "elsewhere/green"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in [
            "red/1.jpg",
            "red/sub/2.PNG",
            "blue/1.tiff",
            "blue/.hidden.jpg",
            ".git/x.png",
            "red/.cache/t.jpg",
            "loose.ppm",
            "elsewhere/green/3.pgm",
            "blue/notes.txt",
        ] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("4.webp"), b"x").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            symlink(outside.path(), root.join("linked")).unwrap();
            symlink(outside.path().join("4.webp"), root.join("blue/link.webp")).unwrap();
            symlink(root.join("nothing.jpg"), root.join("blue/dangling.jpg")).unwrap();
            symlink(root, root.join("red/loop")).unwrap();
        }
        let found = walk_images(root).unwrap();
        let rel: Vec<(String, Option<String>)> = found
            .iter()
            .map(|f| {
                (
                    f.path.strip_prefix(root).unwrap().display().to_string(),
                    f.label.clone(),
                )
            })
            .collect();
        let s = |x: &str| Some(x.to_string());
        let mut want = vec![
            ("blue/1.tiff".to_string(), s("blue")),
            ("elsewhere/green/3.pgm".into(), s("elsewhere")),
            ("loose.ppm".into(), None),
            ("red/1.jpg".into(), s("red")),
            ("red/sub/2.PNG".into(), s("red")),
        ];
        #[cfg(unix)]
        want.extend([
            ("blue/link.webp".to_string(), s("blue")),
            ("linked/4.webp".into(), s("linked")),
        ]);
        want.sort();
        assert_eq!(rel, want);
    }

    #[test]
    fn missing_root_names_it() {
        let e = walk_images(Path::new("/definitely/not/here")).unwrap_err();
        assert!(e.to_string().contains("/definitely/not/here"), "{e}");
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(walk_images(f.path()).is_err());
    }
}
