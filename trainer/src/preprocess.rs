//! Image → tensor preprocessing, described by data so a checkpoint can record it exactly.

use serde::{Deserialize, Serialize};

/// How a backbone wants its pixels. Stored in `config.json` so the indexer and the server
/// preprocess queries exactly as the model was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// Shorter side is resized to this before the (center) crop; equal to `crop` means a
    /// direct resize of the whole image to `crop`×`crop`.
    pub resize: u32,
    /// Square input size fed to the network.
    pub crop: u32,
    /// Per-channel mean, in the 0–255 scale, in the channel order of `bgr`.
    pub mean: [f32; 3],
    /// Per-channel std, in the 0–255 scale (1.0 keeps 0–255 values).
    pub std: [f32; 3],
    /// Feed channels as BGR (BN-Inception) instead of RGB.
    pub bgr: bool,
}

impl Preprocess {
    /// EfficientNet-Lite: RGB, (x − 127) / 128, 224×224 direct resize.
    pub fn efficientnet_lite() -> Self {
        Self { resize: 224, crop: 224, mean: [127.0; 3], std: [128.0; 3], bgr: false }
    }
    /// ImageNet mean/std, as timm's ResNets.
    pub fn imagenet(resize: u32, crop: u32) -> Self {
        Self {
            resize,
            crop,
            mean: [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
            std: [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
            bgr: false,
        }
    }
    /// BN-Inception (the seed): BGR, 0–255, minus [104, 117, 128], 227 crop from 256.
    pub fn bn_inception() -> Self {
        Self { resize: 256, crop: 227, mean: [104.0, 117.0, 128.0], std: [1.0; 3], bgr: true }
    }

    /// Normalise an RGB image of exactly `crop`×`crop` into CHW floats, appended to `out`.
    pub fn normalize_into(&self, img: &image::RgbImage, out: &mut Vec<f32>) {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let start = out.len();
        out.resize(start + 3 * plane, 0.0);
        let dst = &mut out[start..];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                let src_c = if self.bgr { 2 - c } else { c };
                dst[c * plane + i] = (px.0[src_c] as f32 - self.mean[c]) / self.std[c];
            }
        }
    }
}

impl Preprocess {
    /// The deterministic evaluation view: resize (shorter side to `resize`, or the whole image
    /// to `crop`×`crop` when `resize == crop`), then center crop `crop`×`crop`.
    pub fn eval_view(&self, img: &image::DynamicImage) -> image::RgbImage {
        use image::imageops::FilterType;
        let rgb = img.to_rgb8();
        let crop = self.crop;
        if self.resize == crop {
            if rgb.dimensions() == (crop, crop) {
                return rgb;
            }
            return image::imageops::resize(&rgb, crop, crop, FilterType::Triangle);
        }
        let (w, h) = rgb.dimensions();
        let s = self.resize as f32 / w.min(h).max(1) as f32;
        let (nw, nh) = (((w as f32 * s).round() as u32).max(crop), ((h as f32 * s).round() as u32).max(crop));
        let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
        let (x, y) = ((nw - crop) / 2, (nh - crop) / 2);
        image::imageops::crop_imm(&resized, x, y, crop, crop).to_image()
    }
}
