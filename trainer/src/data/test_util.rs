//! Test helpers: small synthetic images and dataset trees.

use std::path::Path;

/// A colour gradient whose pixels differ in every row and column, so crops and flips show.
pub fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x + 2 * y) % 256) as u8,
        ])
    })
}

/// The largest difference of one channel of one pixel between two images of one size.
pub fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Encodes `img` in `format`.
pub fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format)
        .expect("encoding a test image");
    out.into_inner()
}

/// Writes a `w`×`h` PNG gradient at `path`, creating parent folders.
pub fn write_png(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, encode(&gradient(w, h), image::ImageFormat::Png)).unwrap();
}

/// `<workspace root>/../shared`, else `$DEEP_METRIC_SHARED` (for checkouts that live
/// elsewhere, such as git worktrees), or `None` (after saying the test is skipped).
pub fn shared_dir() -> Option<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    if dir.is_dir() {
        return Some(dir);
    }
    if let Some(env) = std::env::var_os("DEEP_METRIC_SHARED").map(std::path::PathBuf::from) {
        if env.is_dir() {
            return Some(env);
        }
    }
    eprintln!(
        "skipping: ../shared not found at {} (nor $DEEP_METRIC_SHARED)",
        dir.display()
    );
    None
}
