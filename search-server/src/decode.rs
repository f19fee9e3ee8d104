//! Decoding untrusted uploads into images, with limits checked *before* any pixel buffer is
//! allocated: a 100 000 × 100 000 PNG header is refused from its header alone.
//!
//! The server maps each failure to its own HTTP status (413 for too large, 422 for
//! unusable), so this module keeps its own error kinds rather than a generic decode error.

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader, Limits};

use crate::error::ApiError;

/// Smallest side accepted. Smaller images carry too little to search with (a 1×1 upload is
/// almost always a mistake or a tracking pixel), so they get a clear 422 instead of
/// meaningless results.
pub const MIN_SIDE: u32 = 8;

/// Limits applied to every uploaded image.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Largest accepted `width × height`.
    pub max_pixels: u64,
    /// Largest accepted side, whatever the area.
    pub max_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000,
            max_side: 16_384,
        }
    }
}

/// Why an upload is not a usable image.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("the image is empty (0 bytes); send the image file's bytes")]
    Empty,
    #[error("this is not an image in a supported format (JPEG, PNG, WebP, GIF or BMP){0}")]
    NotAnImage(String),
    #[error("the {format} image is truncated or corrupt: {detail}")]
    Corrupt { format: String, detail: String },
    #[error(
        "the image is {width}×{height} px; at least {MIN_SIDE}×{MIN_SIDE} px is needed to search with it"
    )]
    TooSmall { width: u32, height: u32 },
    #[error("the image is {width}×{height} px, over the limit of {limit}; resize it and retry")]
    TooLarge {
        width: u32,
        height: u32,
        limit: String,
    },
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            DecodeError::Empty => ApiError::BadRequest(e.to_string()),
            _ => ApiError::Unprocessable(e.to_string()),
        }
    }
}

/// The format of `bytes`, from its magic number, or `NotAnImage` naming what it looks like.
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    match image::guess_format(bytes) {
        Ok(
            f @ (ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp),
        ) => Ok(f),
        Ok(other) => Err(DecodeError::NotAnImage(format!(
            " (it looks like {other:?}, which this server does not read)"
        ))),
        Err(_) => Err(DecodeError::NotAnImage(describe_non_image(bytes))),
    }
}

/// A hint about what a non-image upload is, so "I posted the HTML page" is obvious.
fn describe_non_image(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(512)];
    let lower = String::from_utf8_lossy(head).to_ascii_lowercase();
    let trimmed = lower.trim_start();
    if head.starts_with(b"%PDF") {
        " (it is a PDF document)".into()
    } else if trimmed.starts_with("<!doctype html") || trimmed.starts_with("<html") {
        " (it is an HTML page)".into()
    } else if trimmed.starts_with('{') || trimmed.starts_with('[') {
        " (it looks like JSON)".into()
    } else if std::str::from_utf8(head).is_ok() {
        " (it is plain text)".into()
    } else {
        String::new()
    }
}

/// Reads the dimensions from the header only and checks them against the limits.
pub fn check_dimensions(
    bytes: &[u8],
    format: ImageFormat,
    limits: DecodeLimits,
) -> Result<(u32, u32), DecodeError> {
    let reader = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = reader.into_dimensions().map_err(|e| corrupt(format, e))?;
    if width < MIN_SIDE || height < MIN_SIDE {
        return Err(DecodeError::TooSmall { width, height });
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit: format!("{} px per side", limits.max_side),
        });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit: format!("{:.1} megapixels", limits.max_pixels as f64 / 1e6),
        });
    }
    Ok((width, height))
}

/// Decodes an upload after [`check_dimensions`]; the decoder also carries the limits, so a
/// file whose header lies about its size still cannot allocate past them.
pub fn decode_image(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage, DecodeError> {
    let format = sniff_format(bytes)?;
    let (width, height) = check_dimensions(bytes, format, limits)?;
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    // RGBA at 16 bits per channel is the widest buffer a supported format decodes into.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(l);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => DecodeError::TooLarge {
            width,
            height,
            limit: "the decoder's memory limit".into(),
        },
        other => corrupt(format, other),
    })
}

fn corrupt(format: ImageFormat, e: image::ImageError) -> DecodeError {
    DecodeError::Corrupt {
        format: format!("{format:?}").to_uppercase(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_a_valid_png() {
        let img = decode_image(&png(20, 10), DecodeLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (20, 10));
    }

    #[test]
    fn refuses_empty_text_html_pdf() {
        let l = DecodeLimits::default();
        assert_eq!(decode_image(b"", l), Err(DecodeError::Empty));
        let e = decode_image(b"hello world", l).unwrap_err().to_string();
        assert!(e.contains("plain text"), "{e}");
        let e = decode_image(b"<!DOCTYPE html><html></html>", l)
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTML"), "{e}");
        let e = decode_image(b"%PDF-1.7\n%\xe2\xe3", l)
            .unwrap_err()
            .to_string();
        assert!(e.contains("PDF"), "{e}");
    }

    #[test]
    fn refuses_tiny_and_truncated() {
        let l = DecodeLimits::default();
        assert!(matches!(
            decode_image(&png(1, 1), l),
            Err(DecodeError::TooSmall {
                width: 1,
                height: 1
            })
        ));
        let full = png(64, 64);
        let cut = &full[..full.len() / 2];
        assert!(
            matches!(decode_image(cut, l), Err(DecodeError::Corrupt { .. })),
            "{:?}",
            decode_image(cut, l)
        );
    }

    #[test]
    fn refuses_a_bomb_from_its_header() {
        let e = decode_image(
            &crate::testing::png_bomb_header(100_000, 100_000),
            DecodeLimits::default(),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                DecodeError::TooLarge {
                    width: 100_000,
                    height: 100_000,
                    ..
                }
            ),
            "{e:?}"
        );
        // Within the per-side limit but over the area limit.
        let l = DecodeLimits {
            max_pixels: 1000,
            max_side: 16_384,
        };
        assert!(matches!(
            decode_image(&png(40, 40), l),
            Err(DecodeError::TooLarge { .. })
        ));
    }
}
