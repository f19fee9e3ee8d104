//! Image decoding with limits, so a hostile or damaged file (a decompression bomb, a header
//! claiming 100,000 × 100,000 pixels) is an error instead of exhausting memory. The same
//! rules serve dataset files and the server's uploads.

use std::io::{BufReader, Cursor};
use std::path::Path;

use image::{DynamicImage, ImageError, ImageReader, Limits};

use crate::error::{Error, Result};

/// Largest accepted width or height, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 20_000;
/// Most memory a decoder may allocate for one image, in bytes.
pub const MAX_DECODE_ALLOC: u64 = 512 << 20;
/// File extensions of the formats this build decodes (matched case-insensitively when a
/// dataset folder is listed; decoding itself looks at the content, not the name).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp"];

fn limits() -> Limits {
    let mut l = Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_DECODE_ALLOC);
    l
}

/// Turns an `image` error into a sentence a user can act on.
fn describe(e: ImageError) -> String {
    match e {
        ImageError::Limits(l) => format!(
            "image is too large to decode ({l}); the limits are {MAX_IMAGE_SIDE} pixels per side and {} MiB",
            MAX_DECODE_ALLOC >> 20
        ),
        ImageError::Unsupported(u) => format!("unsupported image ({u}); supported formats: {}", IMAGE_EXTENSIONS.join(", ")),
        ImageError::Decoding(d) => format!("cannot decode image, the file is damaged or truncated ({d})"),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "cannot decode image, the file is truncated".to_string()
        }
        other => format!("cannot decode image ({other})"),
    }
}

fn decode<R: std::io::BufRead + std::io::Seek>(reader: ImageReader<R>) -> std::result::Result<DynamicImage, String> {
    let mut reader = reader;
    if reader.format().is_none() {
        return Err(format!("not an image in a supported format ({})", IMAGE_EXTENSIONS.join(", ")));
    }
    reader.limits(limits());
    reader.decode().map_err(describe)
}

/// Decodes the image file at `path` (format from its content). Errors name the file.
pub fn decode_image(path: &Path) -> Result<DynamicImage> {
    let file = std::fs::File::open(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound { "image file not found".to_string() } else { format!("cannot open image: {e}") };
        Error::file(path, why)
    })?;
    let reader = ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    decode(reader).map_err(|msg| Error::file(path, msg))
}

/// Decodes an image held in memory (an upload), with the same limits as [`decode_image`].
pub fn decode_image_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    if bytes.is_empty() {
        return Err(Error::Invalid("empty image: no bytes were received".to_string()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Invalid(format!("cannot read image: {e}")))?;
    decode(reader).map_err(Error::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{encode, gradient};

    #[test]
    fn decodes_files_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for fmt in [image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::Bmp] {
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

        assert!(decode_image_bytes(&[]).unwrap_err().to_string().contains("empty"));
        assert!(decode_image_bytes(b"hello world").unwrap_err().to_string().contains("not an image"));

        let png = encode(&gradient(64, 64), image::ImageFormat::Png);
        let e = decode_image_bytes(&png[..png.len() / 2]).unwrap_err().to_string();
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
        assert!(e.contains("too large") || e.contains("damaged") || e.contains("truncated"), "{e}");
    }

    /// CRC-32 (PNG chunk checksum), so the tampered header above is otherwise valid.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
