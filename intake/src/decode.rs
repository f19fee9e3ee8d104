//! Decoding untrusted image bytes: the format from the magic number, the dimensions from
//! the header checked against [`Limits`] *before* any pixel buffer is allocated (a 100 000 ×
//! 100 000 PNG or a GIF whose canvas is 40 MP but whose file is 800 bytes is refused or
//! budgeted from its header alone), EXIF orientation applied, and one strictness rule for
//! damaged files.
//!
//! The strictness rule: an image is accepted only if its decoder reads all the pixel data
//! the header promises without an error. JPEG needs one more check, because its decoder
//! fills scan data that is missing with grey instead of failing: a JPEG's scan must end with
//! the EOI marker, so a file cut anywhere after its headers is refused as truncated.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};

/// The formats this build decodes (see [`crate::IMAGE_EXTENSIONS`] for the file names).
pub const SUPPORTED_FORMATS: &[ImageFormat] = &[
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::WebP,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::Pnm,
    ImageFormat::Tiff,
];

const FORMAT_NAMES: &str = "JPEG, PNG, WebP, GIF, BMP, PNM (PPM/PGM) or TIFF";

/// Size limits, checked against the header before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `width × height` (for GIF, of the canvas every frame is drawn on).
    pub max_pixels: u64,
    /// Largest accepted side, whatever the area.
    pub max_side: u32,
    /// Smallest accepted side.
    pub min_side: u32,
}

impl Default for Limits {
    /// 40 megapixels (a large phone photo), 20 000 px per side, no minimum.
    fn default() -> Self {
        Self {
            max_pixels: 40_000_000,
            max_side: 20_000,
            min_side: 1,
        }
    }
}

/// Why some bytes are not a usable image. Callers map the kinds to their own answers (the
/// server: 400, 413 or 422) and add the file name where there is one.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the image is empty (0 bytes); send the image file's bytes")]
    Empty,
    #[error("this is not an image in a supported format ({FORMAT_NAMES}){0}")]
    NotAnImage(String),
    #[error("the {format} image is truncated: its data ends before the image does")]
    Truncated { format: String },
    #[error("the {format} image is damaged or truncated: {detail}")]
    Corrupt { format: String, detail: String },
    #[error("the image is {width}×{height} px; at least {min}×{min} px is needed")]
    TooSmall { width: u32, height: u32, min: u32 },
    #[error("the image is too large: {width}×{height} px, over the limit of {limit}; resize it and retry")]
    TooLarge {
        width: u32,
        height: u32,
        limit: String,
    },
    #[error("cannot read the image file: {0}")]
    Io(#[from] std::io::Error),
}

/// What the header says, read without decoding any pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub format: ImageFormat,
    /// As stored, before EXIF orientation (which can swap them).
    pub width: u32,
    pub height: u32,
    /// Bytes of the buffer the decoder will fill (e.g. 8 per pixel for 16-bit RGBA).
    pub decoded_bytes: u64,
}

impl Header {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// Memory a decode of this image holds at its peak in a typical consumer: the decoded
    /// buffer plus the 8-bit RGB copy the model and thumbnails make from it. What memory
    /// budgets should charge for it.
    pub fn peak_bytes(&self) -> u64 {
        self.decoded_bytes + 3 * self.pixels()
    }
}

/// The format of `bytes`, from its magic number; `NotAnImage` says what it looks like.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    match image::guess_format(bytes) {
        Ok(f) if SUPPORTED_FORMATS.contains(&f) => Ok(f),
        Ok(other) => Err(DecodeError::NotAnImage(format!(
            " (it looks like {other:?}, which is not read here)"
        ))),
        Err(_) => Err(DecodeError::NotAnImage(describe_non_image(bytes))),
    }
}

/// A hint about what a non-image is, so "I posted the HTML page" is obvious.
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

fn format_name(format: ImageFormat) -> String {
    format!("{format:?}").to_uppercase()
}

fn decoder_limits(limits: Limits) -> image::Limits {
    // Sides and area are checked by `check`, with messages that name the limit; the
    // decoder keeps only an allocation cap, for files whose header lies about their size.
    let mut l = image::Limits::no_limits();
    // 16-bit RGBA (8 bytes per pixel) is the widest buffer a supported format decodes into;
    // the slack covers decoders' working buffers (TIFF strips, PNG rows).
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    l
}

fn open(
    bytes: &[u8],
    format: ImageFormat,
    limits: Limits,
) -> Result<impl ImageDecoder + '_, DecodeError> {
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits(limits));
    reader.into_decoder().map_err(|e| classify(format, e, None))
}

fn check(header: &Header, limits: Limits) -> Result<(), DecodeError> {
    let (width, height) = (header.width, header.height);
    if width < limits.min_side || height < limits.min_side {
        return Err(DecodeError::TooSmall {
            width,
            height,
            min: limits.min_side,
        });
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit: format!("{} px per side", limits.max_side),
        });
    }
    if header.pixels() > limits.max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            limit: format!("{:.1} megapixels", limits.max_pixels as f64 / 1e6),
        });
    }
    Ok(())
}

/// Reads the header only and checks it against `limits`: nothing the size of the image is
/// allocated, so this is how a caller learns what a decode would cost before paying it.
pub fn probe(bytes: &[u8], limits: Limits) -> Result<Header, DecodeError> {
    let format = sniff(bytes)?;
    let decoder = open(bytes, format, limits)?;
    checked_header(&decoder, format, limits)
}

/// The header a decoder read, checked against `limits` before any pixel is allocated.
fn checked_header(
    decoder: &impl ImageDecoder,
    format: ImageFormat,
    limits: Limits,
) -> Result<Header, DecodeError> {
    let (width, height) = decoder.dimensions();
    let header = Header {
        format,
        width,
        height,
        decoded_bytes: decoder.total_bytes(),
    };
    check(&header, limits)?;
    Ok(header)
}

/// Decodes `bytes` (any supported format, found from the content) within `limits`, upright
/// (EXIF orientation applied), or says why not. See the module docs for the strictness rule.
pub fn decode(bytes: &[u8], limits: Limits) -> Result<DynamicImage, DecodeError> {
    let format = sniff(bytes)?;
    let mut decoder = open(bytes, format, limits)?;
    let header = checked_header(&decoder, format, limits)?;
    if format == ImageFormat::Jpeg && !jpeg_scan_is_complete(bytes) {
        return Err(DecodeError::Truncated {
            format: format_name(format),
        });
    }
    // Phone photos are often stored sideways with an EXIF orientation tag: apply it, so the
    // image is embedded and shown the way people see it (a missing or unreadable tag means
    // upright).
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img =
        DynamicImage::from_decoder(decoder).map_err(|e| classify(format, e, Some(&header)))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Reads and decodes the file at `path` (format from its content, never its name).
pub fn decode_file(path: &std::path::Path, limits: Limits) -> Result<DynamicImage, DecodeError> {
    decode(&std::fs::read(path)?, limits)
}

fn classify(format: ImageFormat, e: ImageError, header: Option<&Header>) -> DecodeError {
    match e {
        ImageError::Limits(l) => DecodeError::TooLarge {
            width: header.map_or(0, |h| h.width),
            height: header.map_or(0, |h| h.height),
            limit: format!("the decoder's memory limit ({l})"),
        },
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated {
                format: format_name(format),
            }
        }
        ImageError::Unsupported(u) => DecodeError::NotAnImage(format!(" ({u})")),
        other => DecodeError::Corrupt {
            format: format_name(format),
            detail: other.to_string(),
        },
    }
}

/// Whether a JPEG's first scan is followed by the EOI marker: walks the marker segments up
/// to the first SOS (so an EOI inside an embedded EXIF thumbnail does not count), then looks
/// for `FF D9` after it. Entropy-coded data cannot contain it (a data `FF` is stuffed as
/// `FF 00`), and progressive files end all their scans with one EOI. Bytes after the EOI
/// (some cameras append data) are allowed.
fn jpeg_scan_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    loop {
        let Some(&[ff, marker]) = bytes
            .get(i..i + 2)
            .map(|s| <&[u8; 2]>::try_from(s).unwrap())
        else {
            return false;
        };
        if ff != 0xFF {
            // Not a marker where one must be: leave the verdict to the decoder.
            return true;
        }
        match marker {
            0xFF => i += 1, // fill byte
            0xDA => return bytes[i + 2..].windows(2).any(|w| w == [0xFF, 0xD9]),
            0x01 | 0xD0..=0xD7 => i += 2,
            0xD9 => return true,
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4) else {
                    return false;
                };
                i += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 90])
        })
    }

    fn encode(img: &image::RgbImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_every_supported_format() {
        let img = gradient(40, 30);
        for format in SUPPORTED_FORMATS {
            let bytes = encode(&img, *format);
            assert_eq!(sniff(&bytes).unwrap(), *format);
            let h = probe(&bytes, Limits::default()).unwrap();
            assert_eq!((h.width, h.height, h.format), (40, 30, *format));
            let d = decode(&bytes, Limits::default()).unwrap();
            assert_eq!((d.width(), d.height()), (40, 30), "{format:?}");
        }
        // Binary PGM (grey) and PPM (colour), as scanners and netpbm tools write them.
        let pgm = [&b"P5\n20 10\n255\n"[..], &[128u8; 200]].concat();
        let d = decode(&pgm, Limits::default()).unwrap();
        assert_eq!((d.width(), d.height()), (20, 10));
        let ppm = [&b"P6\n# a comment\n4 8\n255\n"[..], &[7u8; 96]].concat();
        let d = decode(&ppm, Limits::default()).unwrap().to_rgb8();
        assert_eq!(
            (d.width(), d.height(), d.get_pixel(3, 7).0),
            (4, 8, [7, 7, 7])
        );
    }

    #[test]
    fn refuses_empty_text_html_pdf() {
        let l = Limits::default();
        assert!(matches!(decode(b"", l), Err(DecodeError::Empty)));
        for (bytes, hint) in [
            (&b"hello world"[..], "plain text"),
            (b"<!DOCTYPE html><html></html>", "HTML"),
            (b"%PDF-1.7\n%\xe2\xe3", "PDF"),
        ] {
            let e = decode(bytes, l).unwrap_err();
            assert!(matches!(e, DecodeError::NotAnImage(_)), "{e:?}");
            assert!(e.to_string().contains(hint), "{e}");
        }
    }

    /// The strictness rule, for every cut between 10 % and 95 % of the file.
    #[test]
    fn truncated_files_are_refused() {
        let img = gradient(96, 64);
        for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::Gif] {
            let full = encode(&img, format);
            assert!(decode(&full, Limits::default()).is_ok());
            for pct in [10, 25, 50, 75, 90, 95] {
                let cut = &full[..full.len() * pct / 100];
                let e = decode(cut, Limits::default()).unwrap_err();
                assert!(
                    matches!(
                        e,
                        DecodeError::Truncated { .. } | DecodeError::Corrupt { .. }
                    ),
                    "{format:?} cut at {pct}%: {e:?}"
                );
            }
        }
        // The JPEG rule names truncation; data after the EOI is fine.
        let mut jpeg = encode(&img, ImageFormat::Jpeg);
        let e = decode(&jpeg[..jpeg.len() - 2], Limits::default()).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        jpeg.extend_from_slice(b"trailing camera data");
        assert!(decode(&jpeg, Limits::default()).is_ok());
    }

    #[test]
    fn refuses_too_small_and_too_large_from_the_header() {
        let l = Limits {
            max_pixels: 1000,
            max_side: 100,
            min_side: 8,
        };
        let e = decode(&encode(&gradient(4, 40), ImageFormat::Png), l).unwrap_err();
        assert!(matches!(e, DecodeError::TooSmall { width: 4, .. }), "{e:?}");
        let e = decode(&encode(&gradient(40, 40), ImageFormat::Png), l).unwrap_err();
        assert!(matches!(e, DecodeError::TooLarge { .. }), "{e:?}");
        assert!(e.to_string().contains("too large"));
        let e = probe(&encode(&gradient(101, 9), ImageFormat::Png), l).unwrap_err();
        assert!(e.to_string().contains("px per side"), "{e}");
    }

    /// A 40 MP GIF canvas in a file of a few hundred bytes: the header check sees the
    /// canvas, so a budget can charge for it before the decoder allocates it.
    #[test]
    fn gif_canvas_counts() {
        let bytes = crate::testing::gif_with_canvas(8000, 5000);
        assert!(bytes.len() < 1000);
        let h = probe(&bytes, Limits::default()).unwrap();
        assert_eq!((h.width, h.height), (8000, 5000));
        assert_eq!(h.decoded_bytes, 8000 * 5000 * 4);
        let small = Limits {
            max_pixels: 1_000_000,
            ..Limits::default()
        };
        assert!(matches!(
            decode(&bytes, small),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn exif_orientation_is_applied() {
        let img = gradient(40, 30);
        let jpeg = crate::testing::jpeg_with_orientation(&img, 6);
        let h = probe(&jpeg, Limits::default()).unwrap();
        assert_eq!((h.width, h.height), (40, 30), "the header is as stored");
        let d = decode(&jpeg, Limits::default()).unwrap().to_rgb8();
        assert_eq!((d.width(), d.height()), (30, 40), "rotated upright");
        // Orientation 6 = rotate 90° clockwise: the stored top-left lands top-right.
        let plain = decode(
            &crate::testing::jpeg_with_orientation(&img, 1),
            Limits::default(),
        )
        .unwrap()
        .to_rgb8();
        let close = |a: &image::Rgb<u8>, b: &image::Rgb<u8>| {
            a.0.iter().zip(b.0).all(|(x, y)| x.abs_diff(y) < 12)
        };
        assert!(close(d.get_pixel(29, 0), plain.get_pixel(0, 0)));
        assert!(close(d.get_pixel(0, 39), plain.get_pixel(39, 29)));
    }

    #[test]
    fn files_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.tiff");
        std::fs::write(&p, encode(&gradient(12, 9), ImageFormat::Tiff)).unwrap();
        assert_eq!(decode_file(&p, Limits::default()).unwrap().width(), 12);
        let e = decode_file(&dir.path().join("nope.jpg"), Limits::default()).unwrap_err();
        assert!(matches!(&e, DecodeError::Io(io) if io.kind() == std::io::ErrorKind::NotFound));
    }
}
