//! Image decoding for datasets, through the shared intake (`intake::decode`): the same
//! limits, EXIF orientation and truncation rule as `indexer build` and the server's uploads,
//! so an image gives the same pixels, and the same vector, whichever way it came in. This
//! module only words the errors the trainer's way (naming the file).

use std::path::Path;

use image::DynamicImage;

use crate::error::{Error, Result};

pub use intake::IMAGE_EXTENSIONS;

/// The limits every dataset and `indexer` image is decoded with: 20 000 px per side as
/// before, and 120 MP, so the 108 MP photos of some phones (which the old 512 MiB decode cap
/// let through) still load; the server keeps its own, tighter `--max-pixels`.
pub const LIMITS: intake::Limits = intake::Limits {
    max_pixels: 120_000_000,
    max_side: 20_000,
    min_side: 1,
};
/// Largest accepted width or height, in pixels.
pub const MAX_IMAGE_SIDE: u32 = LIMITS.max_side;
/// Largest accepted `width × height`.
pub const MAX_IMAGE_PIXELS: u64 = LIMITS.max_pixels;

fn describe(e: intake::DecodeError) -> String {
    match e {
        intake::DecodeError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            "image file not found".to_string()
        }
        intake::DecodeError::Io(io) => format!("cannot read image: {io}"),
        other => other.to_string(),
    }
}

/// Decodes the image file at `path` (format from its content). Errors name the file.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    intake::decode_file(path, LIMITS).map_err(|e| Error::file(path, describe(e)))
}

/// Decodes an image held in memory, with the same limits as [`decode_image`].
pub fn decode_image_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    intake::decode(bytes, LIMITS).map_err(|e| Error::Invalid(describe(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{encode, gradient};

    #[test]
    fn decodes_files_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for fmt in [
            image::ImageFormat::Png,
            image::ImageFormat::Jpeg,
            image::ImageFormat::Bmp,
        ] {
            let bytes = encode(&gradient(40, 30), fmt);
            let path = dir.path().join(format!("a.{}", fmt.extensions_str()[0]));
            std::fs::write(&path, &bytes).unwrap();
            let img = decode_image(&path).unwrap();
            assert_eq!((img.width(), img.height()), (40, 30), "{fmt:?}");
            let img = decode_image_bytes(&bytes).unwrap();
            assert_eq!((img.width(), img.height()), (40, 30), "{fmt:?}");
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jpg");
        let e = decode_image(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.jpg") && e.contains("not found"), "{e}");

        let text = dir.path().join("notes.jpg");
        std::fs::write(&text, "this is not an image").unwrap();
        let e = decode_image(&text).unwrap_err().to_string();
        assert!(e.contains("notes.jpg") && e.contains("not an image"), "{e}");

        assert!(decode_image_bytes(&[])
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(decode_image_bytes(b"hello world")
            .unwrap_err()
            .to_string()
            .contains("not an image"));

        let png = encode(&gradient(64, 64), image::ImageFormat::Png);
        let e = decode_image_bytes(&png[..png.len() / 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") || e.contains("damaged"), "{e}");
    }

    #[test]
    fn oversized_images_are_refused_before_decoding() {
        // A valid 20,001 × 1 image: tiny file, over the side limit.
        let wide = encode(&gradient(MAX_IMAGE_SIDE + 1, 1), image::ImageFormat::Png);
        let e = decode_image_bytes(&wide).unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        // A bomb: a PNG header claiming 20,000 × 20,000 RGBA (1.6 GB) with almost no data.
        let mut bomb = encode(&gradient(8, 8), image::ImageFormat::Png);
        bomb[16..20].copy_from_slice(&MAX_IMAGE_SIDE.to_be_bytes());
        bomb[20..24].copy_from_slice(&MAX_IMAGE_SIDE.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode_image_bytes(&bomb).unwrap_err().to_string();
        assert!(
            e.contains("too large") || e.contains("damaged") || e.contains("truncated"),
            "{e}"
        );
    }

    #[test]
    fn exif_orientation_is_applied() {
        let jpeg = intake::testing::jpeg_with_orientation(&gradient(40, 30), 6);
        let decoded = decode_image_bytes(&jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (30, 40), "upright");
    }

    /// CRC-32 (PNG chunk checksum), so the tampered header above is otherwise valid.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
