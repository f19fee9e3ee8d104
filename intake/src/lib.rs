//! The one way images come into Deep Metric: the trainer's datasets, `indexer build/add` and
//! the server's uploads and `--gallery` scans all read images through this crate, so a file
//! is accepted, oriented and labelled the same way whichever door it came in by (before
//! there were three decoders and three folder walkers, and they disagreed: the server
//! ignored EXIF orientation and accepted truncated JPEGs, the walkers treated hidden files,
//! symlinks and labels differently).
//!
//! - [`decode`]: format sniffing from the bytes, the size check from the header *before* any
//!   pixel buffer exists, EXIF orientation, and one strictness rule for truncated files.
//! - [`walk`]: one recursive folder walker with one rule for hidden entries, symlinks and
//!   labels.

pub mod decode;
pub mod testing;
pub mod walk;

use std::path::Path;

pub use decode::{
    decode, decode_file, probe, sniff, DecodeError, Header, Limits, SUPPORTED_FORMATS,
};
pub use walk::{is_hidden, label_for, walk_images, ImageFile, WalkError};

/// File extensions of the formats this build decodes, lower case. Folder listings match
/// them case-insensitively; decoding itself looks at the content, never at the name.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "gif", "bmp", "ppm", "pgm", "pbm", "pnm", "tif", "tiff",
];

/// True for a path whose extension is one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Hex SHA-256 of some bytes: the content key of an image everywhere (duplicate detection
/// in the index, upload and thumbnail file names).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_any_case() {
        assert!(has_image_extension(Path::new("a/b.JPG")));
        assert!(has_image_extension(Path::new("scan.Tiff")));
        assert!(has_image_extension(Path::new("x.pgm")));
        assert!(!has_image_extension(Path::new("notes.txt")));
        assert!(!has_image_extension(Path::new("jpg")));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
