//! Training augmentation, as the seed: resize the shorter side to `resize` →
//! RandomResizedCrop to `crop`×`crop` (scale 0.16–1, aspect ratio 3/4–4/3) → horizontal flip
//! with probability 0.5. Evaluation uses [`Preprocess::eval_view`].
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

/// Train and eval views for one model's [`Preprocess`].
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    pub preprocess: Preprocess,
    pub crop: RandomResizedCrop,
    /// Probability of a horizontal flip.
    pub flip_p: f64,
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
        let mut view = resample(&rgb, region, crop, crop);
        if rng.gen::<f64>() < self.flip_p {
            image::imageops::flip_horizontal_in_place(&mut view);
        }
        view
    }

    /// The deterministic evaluation view ([`Preprocess::eval_view`]).
    pub fn eval_view(&self, img: &DynamicImage) -> RgbImage {
        self.preprocess.eval_view(img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::gradient;

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
