//! Is a training set made of glyphs (characters, symbols, line drawings, scanned marks)
//! rather than photos? `--views auto` asks, because the two want different training views:
//! a mirrored or turned photo shows the same object, a mirrored or turned glyph is often
//! another glyph, while glyphs are drawn slanted where photos are not
//! ([`crate::train::ViewPreset`]).
//!
//! The test is on pixels, not names: a glyph image is grey, mostly one background level,
//! with ink that stands well apart from it and few tones in between. Photos fail it by
//! their colour or, in black and white, by their many mid-tones (measured: every sampled
//! Omniglot image passes, no CUB photo does, and 2 of 64 CUB photos turned grey do).

use std::path::Path;

use image::RgbImage;

/// Pixels differing from the background level by at most this are background.
const BACKGROUND_TOLERANCE: i32 = 32;
/// Pixels differing from the background level by more than this are ink.
const INK_CONTRAST: i32 = 96;
/// A pixel whose channels differ by more than this is coloured.
const COLOUR_SPREAD: i32 = 16;
/// Largest side examined; larger images are subsampled (nearest pixel, so no mid-tones
/// are invented at stroke edges).
const EXAMINED_SIDE: u32 = 128;
/// Images decoded to decide.
pub const SAMPLE: usize = 64;
/// Fraction of the sampled images that must be glyphs for the whole set to count as glyphs.
pub const GLYPH_SHARE: f64 = 0.8;

/// The tone make-up of one image, as fractions of its pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tones {
    pub coloured: f64,
    pub background: f64,
    pub ink: f64,
    pub mid: f64,
}

impl Tones {
    /// Grey, at least half background, some ink, at least 90 % background or ink, and no
    /// more mid-tones than ink (anti-aliased strokes have about as many edge pixels as ink).
    pub fn is_glyph(&self) -> bool {
        self.coloured <= 0.02
            && self.background >= 0.5
            && self.ink >= 0.005
            && self.background + self.ink >= 0.9
            && self.mid <= self.ink
    }
}

/// Measures `img`'s tones against its background level (the median luminance).
pub fn tones(img: &RgbImage) -> Tones {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Tones {
            coloured: 0.0,
            background: 0.0,
            ink: 0.0,
            mid: 0.0,
        };
    }
    let step = w.max(h).div_ceil(EXAMINED_SIDE).max(1);
    let mut luma = Vec::new();
    let mut coloured = 0usize;
    for y in (0..h).step_by(step as usize) {
        for x in (0..w).step_by(step as usize) {
            let [r, g, b] = img.get_pixel(x, y).0.map(i32::from);
            if (r - g).abs().max((g - b).abs()).max((r - b).abs()) > COLOUR_SPREAD {
                coloured += 1;
            }
            luma.push((r * 299 + g * 587 + b * 114) / 1000);
        }
    }
    let n = luma.len();
    let mut sorted = luma.clone();
    sorted.sort_unstable();
    let level = sorted[n / 2];
    let (mut background, mut ink) = (0usize, 0usize);
    for &l in &luma {
        let d = (l - level).abs();
        if d <= BACKGROUND_TOLERANCE {
            background += 1;
        } else if d > INK_CONTRAST {
            ink += 1;
        }
    }
    let f = |k: usize| k as f64 / n as f64;
    Tones {
        coloured: f(coloured),
        background: f(background),
        ink: f(ink),
        mid: f(n - background - ink),
    }
}

/// How many of up to [`SAMPLE`] images spread over `paths` are glyphs; unreadable files
/// are left out of the count (training reports them itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlyphCount {
    pub sampled: usize,
    pub glyphs: usize,
}

impl GlyphCount {
    /// Whether the set counts as glyphs ([`GLYPH_SHARE`] of a non-empty sample).
    pub fn is_glyph_set(&self) -> bool {
        self.sampled > 0 && self.glyphs as f64 >= GLYPH_SHARE * self.sampled as f64
    }
}

/// Decodes up to [`SAMPLE`] of `paths`, spread evenly over the list, and counts the glyphs.
pub fn count_glyphs(paths: &[&Path]) -> GlyphCount {
    let results: Vec<Option<bool>> = {
        use rayon::prelude::*;
        spread(paths.len(), SAMPLE)
            .into_par_iter()
            .map(|i| paths[i])
            .map(|p| {
                let img = super::decode_image(p).ok()?;
                Some(tones(&img.to_rgb8()).is_glyph())
            })
            .collect()
    };
    GlyphCount {
        sampled: results.iter().flatten().count(),
        glyphs: results.iter().flatten().filter(|&&g| g).count(),
    }
}

/// min(`k`, `n`) distinct indices evenly spread over `0..n` (a fixed step would pick fewer:
/// 63 of cub100's 2,950 with a step of ⌈2950 / 64⌉).
fn spread(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    (0..k).map(|i| i * n / k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A white card with a black stroke `w` pixels wide (a glyph).
    fn stroke(size: u32, w: u32) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            let on = (x as i64 - y as i64).unsigned_abs() < w as u64 && x > size / 5;
            image::Rgb(if on { [10, 10, 10] } else { [250, 250, 250] })
        })
    }

    /// A smooth two-axis gradient (a black-and-white photo's tones).
    fn grey_photo(size: u32) -> RgbImage {
        RgbImage::from_fn(size, size, |x, y| {
            let v = ((x + y) * 255 / (2 * size)) as u8;
            image::Rgb([v, v, v])
        })
    }

    #[test]
    fn strokes_on_a_card_are_glyphs_and_photos_are_not() {
        let t = tones(&stroke(105, 3));
        assert!(t.is_glyph(), "{t:?}");
        // White ink on black, as some scans and MNIST are: the background is whatever
        // level most pixels have.
        let mut inverted = stroke(105, 3);
        inverted
            .pixels_mut()
            .for_each(|p| p.0 = p.0.map(|c| 255 - c));
        assert!(tones(&inverted).is_glyph());
        // Large scans are subsampled without inventing mid-tones.
        assert!(tones(&stroke(1000, 12)).is_glyph());

        let grey = tones(&grey_photo(128));
        assert!(
            !grey.is_glyph(),
            "a smooth grey image has mostly mid-tones: {grey:?}"
        );
        // A coloured picture is not grey.
        let colour = RgbImage::from_fn(64, 64, |x, _| image::Rgb([(x * 4) as u8, 90, 200]));
        assert!(!tones(&colour).is_glyph());
        // A blank card has no ink.
        let blank = RgbImage::from_pixel(50, 50, image::Rgb([255, 255, 255]));
        assert!(!tones(&blank).is_glyph());
        assert!(!tones(&RgbImage::new(0, 0)).is_glyph());
    }

    #[test]
    fn a_set_counts_as_glyphs_when_most_sampled_files_are() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..10 {
            let p = dir.path().join(format!("{i}.png"));
            let img = if i < 8 { stroke(60, 2) } else { grey_photo(60) };
            img.save(&p).unwrap();
            paths.push(p);
        }
        // An unreadable file is left out of the sample, not counted against it.
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not an image").unwrap();
        paths.push(bad);
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let c = count_glyphs(&refs);
        assert_eq!((c.sampled, c.glyphs), (10, 8));
        assert!(c.is_glyph_set());
        let c = count_glyphs(&refs[6..]);
        assert_eq!((c.sampled, c.glyphs), (4, 2));
        assert!(!c.is_glyph_set());
        assert!(!count_glyphs(&[]).is_glyph_set());
        for n in [0, 1, 10, 64, 65, 2950, 10_880] {
            let picked = spread(n, SAMPLE);
            assert_eq!(picked.len(), n.min(SAMPLE), "{n} files");
            assert!(picked.windows(2).all(|w| w[0] < w[1]) && picked.iter().all(|&i| i < n));
        }
    }
}
