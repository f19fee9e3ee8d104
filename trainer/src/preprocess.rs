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
    /// Resampling filter of the evaluation view (the one the weights were published with).
    /// Left out of the JSON when bilinear, so older checkpoints keep their identity.
    #[serde(default, skip_serializing_if = "Interpolation::is_bilinear")]
    pub interpolation: Interpolation,
    /// Resize the shorter side and center-crop even when `resize == crop` (CLIP's
    /// transform); otherwise `resize == crop` squashes the whole image to the square.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shorter_side: bool,
    /// Further square sizes the model also embeds at (multi-scale embedding): each view is
    /// resampled from the main evaluation view, and the L2-normalised vectors of all sizes
    /// are summed and normalised again. A network trained on random crops has seen its
    /// objects at a range of scales, which one input size samples at a single point. Empty:
    /// one size; left out of the JSON then, so older checkpoints keep their identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_sizes: Vec<u32>,
}

/// The resampling filter of [`Preprocess::eval_view`] (antialiased, as PIL's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interpolation {
    #[default]
    Bilinear,
    /// PIL's bicubic (Catmull-Rom, a = −0.5): timm's DINOv2 and OpenAI CLIP transforms.
    Bicubic,
}

impl Interpolation {
    fn is_bilinear(&self) -> bool {
        *self == Interpolation::Bilinear
    }
}

impl Preprocess {
    /// EfficientNet-Lite: RGB, (x − 127) / 128, 224×224 direct resize.
    pub fn efficientnet_lite() -> Self {
        Self {
            resize: 224,
            crop: 224,
            mean: [127.0; 3],
            std: [128.0; 3],
            bgr: false,
            interpolation: Interpolation::Bilinear,
            shorter_side: false,
            extra_sizes: Vec::new(),
        }
    }
    /// ImageNet mean/std, as timm's ResNets.
    pub fn imagenet(resize: u32, crop: u32) -> Self {
        Self {
            resize,
            crop,
            mean: [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
            std: [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
            bgr: false,
            interpolation: Interpolation::Bilinear,
            shorter_side: false,
            extra_sizes: Vec::new(),
        }
    }
    /// DINOv2's evaluation transform: bicubic resize of the shorter side to 256, center crop
    /// 224, ImageNet mean/std (timm publishes the weights for 518 px; the position embedding
    /// is resampled to the 16×16 patch grid of 224 px, which is what DINOv2's k-NN and linear
    /// evaluations use).
    pub fn dinov2() -> Self {
        Self {
            interpolation: Interpolation::Bicubic,
            ..Self::imagenet(256, 224)
        }
    }
    /// OpenAI CLIP: bicubic resize of the shorter side to 224, center crop 224, CLIP's
    /// mean/std.
    pub fn clip() -> Self {
        Self {
            resize: 224,
            crop: 224,
            mean: [0.48145466 * 255.0, 0.4578275 * 255.0, 0.40821073 * 255.0],
            std: [0.26862954 * 255.0, 0.261_302_6 * 255.0, 0.275_777_1 * 255.0],
            bgr: false,
            interpolation: Interpolation::Bicubic,
            shorter_side: true,
            extra_sizes: Vec::new(),
        }
    }
    /// BN-Inception (the seed): BGR, 0–255, minus [104, 117, 128], 227 crop from 256.
    pub fn bn_inception() -> Self {
        Self {
            resize: 256,
            crop: 227,
            mean: [104.0, 117.0, 128.0],
            std: [1.0; 3],
            bgr: true,
            interpolation: Interpolation::Bilinear,
            shorter_side: false,
            extra_sizes: Vec::new(),
        }
    }

    /// Normalise an RGB image of exactly `crop`×`crop` into CHW floats, appended to `out`.
    pub fn normalize_into(&self, img: &image::RgbImage, out: &mut Vec<f32>) {
        let (w, h) = img.dimensions();
        let start = out.len();
        out.resize(start + 3 * (w * h) as usize, 0.0);
        self.normalize_to(img, &mut out[start..]);
    }

    /// Normalise an RGB image into CHW floats written to `dst` (`3 × width × height` long),
    /// so a batch loader can fill its batch buffer in place from several threads.
    pub fn normalize_to(&self, img: &image::RgbImage, dst: &mut [f32]) {
        let plane = img.width() as usize * img.height() as usize;
        assert_eq!(
            dst.len(),
            3 * plane,
            "normalize_to: destination does not match the image size"
        );
        // (x − mean) / std as one multiply-add per value.
        let scale = self.std.map(|s| 1.0 / s);
        let offset = [0, 1, 2].map(|c| -self.mean[c] * scale[c]);
        let (r, rest) = dst.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        // Output channel c reads input channel c (RGB) or 2 − c (BGR).
        let (c0, c2) = if self.bgr { (2, 0) } else { (0, 2) };
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = px[c0] as f32 * scale[0] + offset[0];
            g[i] = px[1] as f32 * scale[1] + offset[1];
            b[i] = px[c2] as f32 * scale[2] + offset[2];
        }
    }
}

impl Preprocess {
    /// The view at extra size `size` ([`Preprocess::extra_sizes`]), resampled from the main
    /// evaluation view `main`: every program derives it the same way from what it holds.
    pub fn extra_view(&self, main: &image::RgbImage, size: u32) -> image::RgbImage {
        let (w, h) = main.dimensions();
        resample_with(
            main,
            [0.0, 0.0, w as f64, h as f64],
            size,
            size,
            self.interpolation,
        )
    }

    /// The deterministic evaluation view: resize (shorter side to `resize`, or the whole image
    /// to `crop`×`crop` when `resize == crop`), then center crop `crop`×`crop`.
    ///
    /// Done as one antialiased bilinear resample of the source region that the crop covers
    /// (the filter still reads the pixels around that region, so this equals resizing the
    /// whole image and then cropping, at a fraction of the cost).
    pub fn eval_view(&self, img: &image::DynamicImage) -> image::RgbImage {
        let rgb = as_rgb8(img);
        let crop = self.crop;
        let (w, h) = rgb.dimensions();
        let filter = self.interpolation;
        if self.resize == crop && !self.shorter_side {
            if (w, h) == (crop, crop) {
                return rgb.into_owned();
            }
            return resample_with(&rgb, [0.0, 0.0, w as f64, h as f64], crop, crop, filter);
        }
        let s = self.resize as f64 / w.min(h).max(1) as f64;
        let nw = ((w as f64 * s).round() as u32).max(crop);
        let nh = ((h as f64 * s).round() as u32).max(crop);
        let (x, y) = ((nw - crop) / 2, (nh - crop) / 2);
        let (sx, sy) = (w as f64 / nw as f64, h as f64 / nh as f64);
        resample_with(
            &rgb,
            [
                x as f64 * sx,
                y as f64 * sy,
                crop as f64 * sx,
                crop as f64 * sy,
            ],
            crop,
            crop,
            filter,
        )
    }
}

/// The image as 8-bit RGB, borrowed when it already is.
pub(crate) fn as_rgb8(img: &image::DynamicImage) -> std::borrow::Cow<'_, image::RgbImage> {
    match img {
        image::DynamicImage::ImageRgb8(rgb) => std::borrow::Cow::Borrowed(rgb),
        other => std::borrow::Cow::Owned(other.to_rgb8()),
    }
}

thread_local! {
    /// One resizer per thread: it keeps its scratch buffers between calls.
    static RESIZER: std::cell::RefCell<fast_image_resize::Resizer> =
        std::cell::RefCell::new(fast_image_resize::Resizer::new());
}

/// Resamples the region `[left, top, width, height]` of `src` (in source pixels, fractions
/// allowed) to a `w`×`h` image with an antialiased bilinear filter (PIL's, which the seed's
/// torchvision transforms used). The region is clipped to the image.
pub(crate) fn resample(src: &image::RgbImage, region: [f64; 4], w: u32, h: u32) -> image::RgbImage {
    resample_with(src, region, w, h, Interpolation::Bilinear)
}

/// [`resample`] with the given filter.
pub(crate) fn resample_with(
    src: &image::RgbImage,
    region: [f64; 4],
    w: u32,
    h: u32,
    filter: Interpolation,
) -> image::RgbImage {
    use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions};
    let (sw, sh) = (src.width() as f64, src.height() as f64);
    if sw == 0.0 || sh == 0.0 || w == 0 || h == 0 {
        return image::RgbImage::new(w, h);
    }
    let left = region[0].clamp(0.0, sw - 1.0);
    let top = region[1].clamp(0.0, sh - 1.0);
    let width = region[2].clamp(1e-3, sw - left);
    let height = region[3].clamp(1e-3, sh - top);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(match filter {
            Interpolation::Bilinear => FilterType::Bilinear,
            Interpolation::Bicubic => FilterType::CatmullRom,
        }))
        .crop(left, top, width, height);
    let mut dst = Image::new(w, h, PixelType::U8x3);
    let done = fast_image_resize::images::ImageRef::new(
        src.width(),
        src.height(),
        src.as_raw(),
        PixelType::U8x3,
    )
    .map_err(|e| e.to_string())
    .and_then(|src_ref| {
        RESIZER
            .with(|r| r.borrow_mut().resize(&src_ref, &mut dst, &options))
            .map_err(|e| e.to_string())
    });
    match done
        .ok()
        .and_then(|_| image::RgbImage::from_raw(w, h, dst.into_vec()))
    {
        Some(img) => img,
        None => {
            // Not reachable with a clipped region and matching pixel types; stay correct anyway.
            let (x, y) = (left as u32, top as u32);
            let (cw, ch) = ((width as u32).max(1), (height as u32).max(1));
            let region = image::imageops::crop_imm(src, x, y, cw, ch).to_image();
            image::imageops::resize(&region, w, h, image::imageops::FilterType::Triangle)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x % 256) as u8,
                (y % 256) as u8,
                ((x / 8 + y / 8) % 2 * 255) as u8,
            ])
        })
    }

    #[test]
    fn eval_view_matches_resize_then_center_crop() {
        let pre = Preprocess::imagenet(64, 56);
        let img = checker(160, 120);
        let view = pre.eval_view(&image::DynamicImage::ImageRgb8(img.clone()));
        assert_eq!(view.dimensions(), (56, 56));
        // The two-step reference: shorter side → 64 (85×64), then center crop 56.
        let resized = image::imageops::resize(&img, 85, 64, image::imageops::FilterType::Triangle);
        let reference = image::imageops::crop_imm(&resized, 14, 4, 56, 56).to_image();
        let mean_abs: f64 = view
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .sum::<f64>()
            / view.as_raw().len() as f64;
        assert!(
            mean_abs < 3.0,
            "mean |difference| to resize-then-crop: {mean_abs}"
        );
    }

    #[test]
    fn eval_view_squashes_when_resize_equals_crop_and_keeps_exact_inputs() {
        let pre = Preprocess::efficientnet_lite();
        let img = checker(300, 100);
        assert_eq!(
            pre.eval_view(&image::DynamicImage::ImageRgb8(img))
                .dimensions(),
            (224, 224)
        );
        let exact = checker(224, 224);
        assert_eq!(
            pre.eval_view(&image::DynamicImage::ImageRgb8(exact.clone())),
            exact
        );
        // Grayscale input becomes RGB.
        let gray = image::DynamicImage::ImageLuma8(image::GrayImage::new(50, 70));
        assert_eq!(pre.eval_view(&gray).dimensions(), (224, 224));
    }

    #[test]
    fn normalize_orders_channels_and_scales() {
        let img = image::RgbImage::from_fn(2, 1, |x, _| image::Rgb([10 + x as u8, 20, 30]));
        let mut out = vec![7.0];
        Preprocess::bn_inception().normalize_into(&img, &mut out);
        // BGR, minus [104, 117, 128], std 1: B plane, G plane, R plane.
        assert_eq!(out, vec![7.0, -74.0, -74.0, -97.0, -97.0, -118.0, -117.0]);
        let mut out = Vec::new();
        Preprocess::efficientnet_lite().normalize_into(&img, &mut out);
        assert_eq!(
            out,
            vec![
                (10.0 - 127.0) / 128.0,
                (11.0 - 127.0) / 128.0,
                -107.0 / 128.0,
                -107.0 / 128.0,
                -97.0 / 128.0,
                -97.0 / 128.0
            ]
        );
    }
}
