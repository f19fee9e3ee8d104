//! Images with the properties the intake rules are about, built in memory for tests here
//! and in the crates that use this one (no binary fixtures in the repository).

use image::ImageEncoder;

/// A GIF whose logical screen is `w`×`h` holding one 1×1 frame.
pub fn gif_with_canvas(w: u16, h: u16) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        let frame = image::Frame::new(image::RgbaImage::from_pixel(
            1,
            1,
            image::Rgba([255, 0, 0, 255]),
        ));
        enc.encode_frame(frame).unwrap();
    }
    // Logical screen descriptor: bytes 6..10 after "GIF89a".
    out[6..8].copy_from_slice(&w.to_le_bytes());
    out[8..10].copy_from_slice(&h.to_le_bytes());
    out
}

/// A JPEG of `img` carrying an EXIF block whose Orientation is `orientation`.
pub fn jpeg_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
    let exif: Vec<u8> = [
        &b"II*\0"[..],
        &8u32.to_le_bytes(),
        &1u16.to_le_bytes(),
        &0x0112u16.to_le_bytes(),
        &3u16.to_le_bytes(),
        &1u32.to_le_bytes(),
        &u32::from(orientation).to_le_bytes(),
        &0u32.to_le_bytes(),
    ]
    .concat();
    let mut jpeg = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
    enc.set_exif_metadata(exif).unwrap();
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    jpeg
}
