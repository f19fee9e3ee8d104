//! Decoding untrusted uploads, through the shared intake (`intake::decode`): the same
//! format sniffing, header-first limits, EXIF orientation and truncation rule as
//! `indexer build` and the trainer, so an upload gives the same vector as the same file
//! indexed from a folder. This module adds the server's limits and maps each failure to its
//! own HTTP status (413 for too large, 400 for empty, 422 for unusable).

use image::{DynamicImage, ImageFormat};

use crate::error::ApiError;

pub use intake::{DecodeError, Header};

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

impl DecodeLimits {
    /// The intake's limits for these, with the server's [`MIN_SIDE`].
    pub fn intake(self) -> intake::Limits {
        intake::Limits {
            max_pixels: self.max_pixels,
            max_side: self.max_side,
            min_side: MIN_SIDE,
        }
    }
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            DecodeError::Empty => ApiError::BadRequest(e.to_string()),
            DecodeError::Io(io) => ApiError::internal("reading the image failed", io),
            _ => ApiError::Unprocessable(e.to_string()),
        }
    }
}

/// The format of `bytes`, from its magic number, or `NotAnImage` naming what it looks like.
pub fn sniff_format(bytes: &[u8]) -> Result<ImageFormat, DecodeError> {
    intake::sniff(bytes)
}

/// Reads the header only and checks it against the limits: what a decode would cost,
/// before paying it (see [`crate::budget`]).
pub fn probe(bytes: &[u8], limits: DecodeLimits) -> Result<Header, DecodeError> {
    intake::probe(bytes, limits.intake())
}

/// Decodes an upload: header checked first, then decoded upright.
pub fn decode_image(bytes: &[u8], limits: DecodeLimits) -> Result<DynamicImage, DecodeError> {
    intake::decode(bytes, limits.intake())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

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
        assert!(matches!(decode_image(b"", l), Err(DecodeError::Empty)));
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
                height: 1,
                ..
            })
        ));
        let full = png(64, 64);
        let cut = &full[..full.len() / 2];
        assert!(
            matches!(
                decode_image(cut, l),
                Err(DecodeError::Corrupt { .. } | DecodeError::Truncated { .. })
            ),
            "{:?}",
            decode_image(cut, l)
        );
        // A photo cut anywhere from 10 % to 90 % of its length is refused, not answered
        // with a grey-padded image (the JPEG decoder itself pads silently).
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_fn(120, 90, |x, y| image::Rgb([x as u8, y as u8, 77]))
            .write_to(&mut jpeg, ImageFormat::Jpeg)
            .unwrap();
        let jpeg = jpeg.into_inner();
        for pct in [10, 30, 50, 90] {
            let e = decode_image(&jpeg[..jpeg.len() * pct / 100], l).unwrap_err();
            assert!(
                matches!(
                    e,
                    DecodeError::Truncated { .. } | DecodeError::Corrupt { .. }
                ),
                "{pct}%: {e:?}"
            );
            assert!(matches!(ApiError::from(e), ApiError::Unprocessable(_)));
        }
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
