//! Training augmentation, as the seed: resize the shorter side to `resize` →
//! RandomResizedCrop to `crop`×`crop` (scale 0.16–1, aspect ratio 3/4–4/3) → horizontal flip
//! with probability 0.5, and optionally a small random rotation of the crop box (`--rotate`).
//! Evaluation uses [`Preprocess::eval_view`].
//!
//! The crop box is drawn exactly as torchvision's `RandomResizedCrop.get_params` draws it on
//! the resized image, then mapped back to the source image and resampled once (resizing and
//! cropping in one antialiased pass: faster, and one interpolation instead of two).
//!
//! Every view has its own random stream keyed by (seed, epoch, sample, occurrence), so a
//! run is reproducible whatever the thread scheduling, and a sample drawn twice in a batch
//! (a small class sampled with replacement) gets two different views.

use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::preprocess::{as_rgb8, resample, Preprocess};

/// torchvision's RandomResizedCrop box sampler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomResizedCrop {
    /// Range of the crop's area as a fraction of the image's.
    pub scale: (f64, f64),
    /// Range of the crop's width / height (sampled log-uniformly).
    pub ratio: (f64, f64),
}

impl Default for RandomResizedCrop {
    /// The seed's setting: scale (0.16, 1), ratio (3/4, 4/3).
    fn default() -> Self {
        Self {
            scale: (0.16, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }
}

impl RandomResizedCrop {
    /// Mean linear magnification of a crop resized to the output size, relative to the whole
    /// (square) image: E[1/√area] over the boxes [`RandomResizedCrop::sample`] accepts — area
    /// uniform in `scale`, log-aspect uniform in `ratio`, a box kept only if it fits (area ≤
    /// min(r, 1/r)), which favours small areas. Objects look this much larger in training
    /// views than in a whole-image eval view, so a network trained on such crops sees them best
    /// when embedding at a larger size (the train–test resolution discrepancy, Touvron et al.
    /// 2019). Integrated over the aspect by the midpoint rule; 1 when no box fits.
    pub fn mean_magnification(&self) -> f64 {
        const STEPS: usize = 256;
        let lo = self.scale.0.clamp(1e-6, 1.0);
        let hi = self.scale.1.clamp(lo, 1.0);
        let (t0, t1) = (self.ratio.0.ln(), self.ratio.1.ln());
        let (mut num, mut den) = (0.0, 0.0);
        for k in 0..STEPS {
            let t = t0 + (t1 - t0) * (k as f64 + 0.5) / STEPS as f64;
            let top = hi.min((-t.abs()).exp());
            if top > lo {
                num += 2.0 * (top.sqrt() - lo.sqrt());
                den += top - lo;
            }
        }
        if den <= 0.0 {
            1.0
        } else {
            num / den
        }
    }

    /// A crop box `[left, top, width, height]` (whole pixels) inside a `w`×`h` image: up to
    /// ten tries at a random area and aspect ratio, then a center crop with the ratio clamped.
    pub fn sample(&self, w: u32, h: u32, rng: &mut impl Rng) -> [u32; 4] {
        let (wf, hf) = (w as f64, h as f64);
        let area = wf * hf;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, lr0, lr1).exp();
            let cw = (target * aspect).sqrt().round();
            let ch = (target / aspect).sqrt().round();
            if cw > 0.0 && cw <= wf && ch > 0.0 && ch <= hf {
                let (cw, ch) = (cw as u32, ch as u32);
                let top = rng.gen_range(0..=h - ch);
                let left = rng.gen_range(0..=w - cw);
                return [left, top, cw, ch];
            }
        }
        let in_ratio = wf / hf.max(1.0);
        let (lo, hi) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let (cw, ch) = if in_ratio < lo {
            (w, ((wf / lo).round() as u32).clamp(1, h.max(1)))
        } else if in_ratio > hi {
            (((hf * hi).round() as u32).clamp(1, w.max(1)), h)
        } else {
            (w, h)
        };
        [(w - cw) / 2, (h - ch) / 2, cw, ch]
    }
}

/// `U[lo, hi)`, tolerating an empty range (returns `lo`).
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// The `region` (`[left, top, width, height]`, source pixels) turned by `angle` radians about
/// its centre, resampled to `size`×`size`. The rotated box's axis-aligned bounds are first
/// resampled (antialiased) at the output scale, then the rotated box is read from them
/// bilinearly: a rotation needs no antialiasing once the scale is right. Turning the box in the
/// source, rather than turning the finished view, fills the corners with real pixels wherever
/// the image extends that far; beyond its edge the nearest edge pixel repeats.
fn rotated_resample(src: &RgbImage, region: [f64; 4], angle: f64, size: u32) -> RgbImage {
    let (sw, sh) = (src.width() as f64, src.height() as f64);
    let [x, y, w, h] = region;
    let (w, h) = (w.max(1e-3), h.max(1e-3));
    let (cx, cy) = (x + w / 2.0, y + h / 2.0);
    let (sin, cos) = angle.sin_cos();
    let (bw, bh) = (w * cos.abs() + h * sin.abs(), w * sin.abs() + h * cos.abs());
    let left = (cx - bw / 2.0).max(0.0);
    let top = (cy - bh / 2.0).max(0.0);
    let right = (cx + bw / 2.0).min(sw);
    let bottom = (cy + bh / 2.0).min(sh);
    if right <= left || bottom <= top {
        return resample(src, region, size, size);
    }
    // Output pixels per source pixel, along the box's own axes.
    let (kx, ky) = (size as f64 / w, size as f64 / h);
    let iw = ((right - left) * kx).ceil().max(1.0) as u32;
    let ih = ((bottom - top) * ky).ceil().max(1.0) as u32;
    let inter = resample(src, [left, top, right - left, bottom - top], iw, ih);
    let (fx, fy) = (iw as f64 / (right - left), ih as f64 / (bottom - top));
    let half = size as f64 / 2.0;
    // Clamping the sample point to the pixel centres repeats the edge pixels outside.
    let (xmax, ymax) = ((iw - 1) as f64, (ih - 1) as f64);
    let mut out = RgbImage::new(size, size);
    for (u, v, px) in out.enumerate_pixels_mut() {
        // Offset from the box centre in source pixels, before and after the turn.
        let dx = (u as f64 + 0.5 - half) / kx;
        let dy = (v as f64 + 0.5 - half) / ky;
        let sx = ((cx + cos * dx - sin * dy - left) * fx - 0.5).clamp(0.0, xmax);
        let sy = ((cy + sin * dx + cos * dy - top) * fy - 0.5).clamp(0.0, ymax);
        if let Some(p) = image::imageops::interpolate_bilinear(&inter, sx as f32, sy as f32) {
            *px = p;
        }
    }
    out
}

/// Train and eval views for one model's [`Preprocess`].
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    pub preprocess: Preprocess,
    pub crop: RandomResizedCrop,
    /// Probability of a horizontal flip.
    pub flip_p: f64,
    /// Largest rotation of the crop box, degrees (angle uniform in ±this; 0 = none, the seed).
    pub rotate_deg: f64,
    /// Probability of random erasing (Zhong et al. 2020): a rectangle of 2–40 % of the view,
    /// aspect 0.3–3.3, filled with the normalisation mean (zero after normalising). 0 = none.
    pub erase_p: f64,
    /// Base seed of every view's random stream.
    pub seed: u64,
}

impl Augment {
    /// The seed's augmentation for `preprocess` (sizes from `preprocess.resize` / `.crop`).
    pub fn new(preprocess: Preprocess, seed: u64) -> Self {
        Self {
            preprocess,
            crop: RandomResizedCrop::default(),
            flip_p: 0.5,
            rotate_deg: 0.0,
            erase_p: 0.0,
            seed,
        }
    }

    /// The random stream of one view: ChaCha keyed by (seed, epoch, sample, occurrence).
    fn rng(&self, epoch: u64, sample: usize, occurrence: u32) -> ChaCha8Rng {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&epoch.to_le_bytes());
        key[16..24].copy_from_slice(&(sample as u64).to_le_bytes());
        key[24..28].copy_from_slice(&occurrence.to_le_bytes());
        ChaCha8Rng::from_seed(key)
    }

    /// A random training view (`crop`×`crop` RGB) of dataset sample `sample` in `epoch`;
    /// `occurrence` counts earlier draws of the same sample in the epoch (0 for the first).
    pub fn train_view(
        &self,
        img: &DynamicImage,
        epoch: u64,
        sample: usize,
        occurrence: u32,
    ) -> RgbImage {
        let mut rng = self.rng(epoch, sample, occurrence);
        let rgb = as_rgb8(img);
        let (w, h) = rgb.dimensions();
        // The box is drawn on the image resized to shorter side `resize`, as the seed did.
        let s = self.preprocess.resize as f64 / w.min(h).max(1) as f64;
        let nw = ((w as f64 * s).round() as u32).max(1);
        let nh = ((h as f64 * s).round() as u32).max(1);
        let [x, y, cw, ch] = self.crop.sample(nw, nh, &mut rng);
        let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
        let region = [x as f64 * sx, y as f64 * sy, cw as f64 * sx, ch as f64 * sy];
        let crop = self.preprocess.crop;
        let flip = rng.gen::<f64>() < self.flip_p;
        // Drawn after the flip, and only when asked, so that views without rotation are
        // the same as before the option existed.
        let angle = if self.rotate_deg > 0.0 {
            uniform(&mut rng, -self.rotate_deg, self.rotate_deg).to_radians()
        } else {
            0.0
        };
        let mut view = if angle == 0.0 {
            resample(&rgb, region, crop, crop)
        } else {
            rotated_resample(&rgb, region, angle, crop)
        };
        if flip {
            image::imageops::flip_horizontal_in_place(&mut view);
        }
        // Drawn last, and only when asked, for the same reason as the angle.
        if self.erase_p > 0.0 && rng.gen::<f64>() < self.erase_p {
            self.erase(&mut view, &mut rng);
        }
        view
    }

    /// Random erasing: up to ten tries for a rectangle that fits, as in Zhong et al.
    fn erase(&self, view: &mut RgbImage, rng: &mut impl Rng) {
        let (w, h) = (view.width() as f64, view.height() as f64);
        let m = self.preprocess.mean;
        let m = if self.preprocess.bgr {
            [m[2], m[1], m[0]]
        } else {
            m
        };
        let fill = image::Rgb(m.map(|c| c.round().clamp(0.0, 255.0) as u8));
        for _ in 0..10 {
            let area = w * h * uniform(rng, 0.02, 0.4);
            let aspect = uniform(rng, 0.3f64.ln(), (1.0f64 / 0.3).ln()).exp();
            let (ew, eh) = (
                (area * aspect).sqrt().round(),
                (area / aspect).sqrt().round(),
            );
            if ew < 1.0 || eh < 1.0 || ew >= w || eh >= h {
                continue;
            }
            let x0 = rng.gen_range(0..=(w - ew) as u32);
            let y0 = rng.gen_range(0..=(h - eh) as u32);
            for y in y0..y0 + eh as u32 {
                for x in x0..x0 + ew as u32 {
                    view.put_pixel(x, y, fill);
                }
            }
            return;
        }
    }

    /// The deterministic evaluation view ([`Preprocess::eval_view`]).
    pub fn eval_view(&self, img: &DynamicImage) -> RgbImage {
        self.preprocess.eval_view(img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{gradient, max_pixel_diff};

    #[test]
    fn mean_magnification_matches_sampled_crops() {
        for lo in [0.16, 0.5, 1.0] {
            let rrc = RandomResizedCrop {
                scale: (lo, 1.0),
                ..Default::default()
            };
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let (w, h) = (1000u32, 1000u32);
            let n = 20_000;
            let mean: f64 = (0..n)
                .map(|_| {
                    let [_, _, cw, ch] = rrc.sample(w, h, &mut rng);
                    ((w * h) as f64 / (cw * ch) as f64).sqrt()
                })
                .sum::<f64>()
                / n as f64;
            let predicted = rrc.mean_magnification();
            assert!(
                (mean / predicted - 1.0).abs() < 0.01,
                "scale ({lo}, 1): sampled {mean:.4}, predicted {predicted:.4}"
            );
        }
        // Without the redraws it would be 2 / (1 + √0.16) = 1.43.
        let m = RandomResizedCrop::default().mean_magnification();
        assert!((m - 1.499).abs() < 0.002, "{m}");
    }

    #[test]
    fn crop_boxes_respect_scale_ratio_and_bounds() {
        let rrc = RandomResizedCrop::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (w, h) = (341u32, 256u32);
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let [x, y, cw, ch] = rrc.sample(w, h, &mut rng);
            assert!(
                cw >= 1 && ch >= 1 && x + cw <= w && y + ch <= h,
                "{x} {y} {cw} {ch}"
            );
            let frac = (cw * ch) as f64 / (w * h) as f64;
            let ratio = cw as f64 / ch as f64;
            // Rounding to whole pixels moves both a little past the nominal ranges.
            assert!((0.15..=1.0).contains(&frac), "area fraction {frac}");
            assert!((0.72..=1.36).contains(&ratio), "ratio {ratio}");
            areas.push(frac);
        }
        let mean = areas.iter().sum::<f64>() / areas.len() as f64;
        assert!(
            mean > 0.45 && mean < 0.65,
            "mean area fraction {mean} (≈0.55 expected)"
        );
        // A 10:1 strip can never fit the ratio range: the fallback center crop clamps it.
        let [x, y, cw, ch] = rrc.sample(1000, 100, &mut rng);
        assert_eq!((cw, ch), (133, 100));
        assert_eq!((x, y), (433, 0));
    }

    #[test]
    fn train_views_are_reproducible_sized_and_varied() {
        let aug = Augment::new(Preprocess::imagenet(64, 56), 7);
        let img = DynamicImage::ImageRgb8(gradient(120, 90));
        let a = aug.train_view(&img, 3, 11, 0);
        assert_eq!(a.dimensions(), (56, 56));
        assert_eq!(
            a,
            aug.train_view(&img, 3, 11, 0),
            "same (seed, epoch, sample, occurrence) → same view"
        );
        assert_ne!(
            a,
            aug.train_view(&img, 4, 11, 0),
            "another epoch → another view"
        );
        assert_ne!(
            a,
            aug.train_view(&img, 3, 12, 0),
            "another sample → another view"
        );
        assert_ne!(
            a,
            aug.train_view(&img, 3, 11, 1),
            "a repeated draw → another view"
        );
        assert_ne!(
            a,
            Augment::new(Preprocess::imagenet(64, 56), 8).train_view(&img, 3, 11, 0)
        );
        // Views are computed in parallel: the result must not depend on the thread.
        let par: Vec<RgbImage> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| aug.train_view(&img, 3, 11, 0)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(par.iter().all(|v| *v == a));
    }

    #[test]
    fn rotation_turns_the_crop_and_zero_keeps_the_old_views() {
        // A smooth picture: red grows left→right, green top→bottom.
        let img = DynamicImage::ImageRgb8(RgbImage::from_fn(96, 96, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, 128])
        }));
        let mut aug = Augment::new(Preprocess::imagenet(48, 48), 5);
        aug.crop = RandomResizedCrop {
            scale: (0.5, 0.5),
            ratio: (1.0, 1.0),
        };
        aug.flip_p = 0.0;
        let plain = aug.train_view(&img, 0, 3, 0);
        // A rotation of (almost) zero reads the same box: equal up to interpolation.
        let r0 = rotated_resample(&as_rgb8(&img), [24.0, 24.0, 48.0, 48.0], 1e-9, 48);
        let r0b = resample(&as_rgb8(&img), [24.0, 24.0, 48.0, 48.0], 48, 48);
        let diff = max_pixel_diff(&r0, &r0b);
        assert!(diff <= 2, "max difference {diff}");
        // A positive quarter turn of the box (y down) shows the image turned a quarter
        // counter-clockwise.
        let q = rotated_resample(
            &as_rgb8(&img),
            [24.0, 24.0, 48.0, 48.0],
            std::f64::consts::FRAC_PI_2,
            48,
        );
        let turned = image::imageops::rotate270(&r0b);
        let diff = max_pixel_diff(&q, &turned);
        assert!(diff <= 3, "quarter turn differs by {diff}");
        // With --rotate the views differ from the plain ones, reproducibly; without it the
        // stream is untouched.
        aug.rotate_deg = 15.0;
        let turned_view = aug.train_view(&img, 0, 3, 0);
        assert_ne!(turned_view, plain);
        assert_eq!(turned_view, aug.train_view(&img, 0, 3, 0));
        aug.rotate_deg = 0.0;
        assert_eq!(aug.train_view(&img, 0, 3, 0), plain);
    }

    #[test]
    fn erasing_paints_one_mean_rectangle_and_zero_keeps_the_old_views() {
        let img = DynamicImage::ImageRgb8(gradient(64, 64));
        let mut aug = Augment::new(Preprocess::imagenet(32, 32), 9);
        let plain: Vec<RgbImage> = (0..20).map(|s| aug.train_view(&img, 0, s, 0)).collect();
        aug.erase_p = 1.0;
        let m = aug.preprocess.mean.map(|c| c.round() as u8);
        for (s, before) in plain.iter().enumerate() {
            let v = aug.train_view(&img, 0, s, 0);
            assert_eq!(v, aug.train_view(&img, 0, s, 0), "reproducible");
            // The changed pixels form one rectangle of the mean colour, 2–40 % of the view.
            let changed: Vec<(u32, u32)> = v
                .enumerate_pixels()
                .filter(|(x, y, p)| before.get_pixel(*x, *y) != *p)
                .map(|(x, y, p)| {
                    assert_eq!(p.0, m, "sample {s}: an erased pixel is the mean");
                    (x, y)
                })
                .collect();
            assert!(!changed.is_empty(), "sample {s}: nothing erased");
            let (x0, y0, x1, y1) = changed
                .iter()
                .fold((u32::MAX, u32::MAX, 0, 0), |(x0, y0, x1, y1), &(x, y)| {
                    (x0.min(x), y0.min(y), x1.max(x), y1.max(y))
                });
            let area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64 / (32.0 * 32.0);
            assert!(area <= 0.45, "sample {s}: erased {area} of the view");
            for y in y0..=y1 {
                for x in x0..=x1 {
                    assert_eq!(
                        v.get_pixel(x, y).0,
                        m,
                        "sample {s}: a hole in the rectangle"
                    );
                }
            }
        }
        aug.erase_p = 0.0;
        assert!((0..20).all(|s| aug.train_view(&img, 0, s, 0) == plain[s]));
    }

    #[test]
    fn flips_happen_about_half_the_time() {
        // With the whole image as the crop, a flipped view mirrors an unflipped one.
        let mut aug = Augment::new(Preprocess::imagenet(32, 32), 1);
        aug.crop = RandomResizedCrop {
            scale: (1.0, 1.0),
            ratio: (1.0, 1.0),
        };
        let img = DynamicImage::ImageRgb8(gradient(32, 32));
        let mut no_flip = aug.clone();
        no_flip.flip_p = 0.0;
        let plain = no_flip.train_view(&img, 0, 0, 0);
        let mut mirrored = plain.clone();
        image::imageops::flip_horizontal_in_place(&mut mirrored);
        let mut flips = 0;
        for sample in 0..200 {
            let v = aug.train_view(&img, 0, sample, 0);
            if v == mirrored {
                flips += 1;
            } else {
                assert_eq!(
                    v, plain,
                    "sample {sample}: neither the image nor its mirror"
                );
            }
        }
        assert!((70..=130).contains(&flips), "{flips} flips out of 200");
        assert!((0..50).all(|s| no_flip.train_view(&img, 0, s, 0) == plain));
    }
}
