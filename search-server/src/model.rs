//! The real embedding model: `trainer`'s [`Embedder`] behind [`EmbedBackend`].

use image::DynamicImage;
use trainer::checkpoint::ModelIdentity;
use trainer::embed::{Embedder, ModelSpec};

use crate::backend::EmbedBackend;

/// A loaded model and a description of where it came from.
pub struct ModelBackend {
    embedder: Embedder,
    description: String,
}

impl ModelBackend {
    /// Loads `spec` (`pretrained:BACKBONE` or a run directory) onto `device`. Errors say
    /// which file is missing or wrong and, for pretrained weights, every way to provide them.
    pub fn load(
        spec: &str,
        weights: Option<std::path::PathBuf>,
        device: &candle_core::Device,
    ) -> trainer::error::Result<Self> {
        let parsed = ModelSpec::parse(spec, weights)?;
        let embedder = Embedder::load(&parsed, device)?;
        let description = format!("{} ({}-d)", spec, embedder.dim());
        Ok(Self {
            embedder,
            description,
        })
    }

    pub fn identity(&self) -> &ModelIdentity {
        self.embedder.identity()
    }
}

impl EmbedBackend for ModelBackend {
    fn embed(&self, images: &[DynamicImage]) -> anyhow::Result<Vec<Vec<f32>>> {
        Ok(self.embedder.embed_images(images)?)
    }
    /// The model's eval view (e.g. 224×224 RGB): what `embed_images` would compute from
    /// the full image anyway, so embedding the view gives the same vector.
    fn prepare(&self, image: DynamicImage) -> DynamicImage {
        DynamicImage::ImageRgb8(self.embedder.config().preprocess.eval_view(&image))
    }
    fn embed_prepared(&self, images: &[DynamicImage]) -> anyhow::Result<Vec<Vec<f32>>> {
        let views: Vec<image::RgbImage> = images
            .iter()
            .map(|im| match im {
                DynamicImage::ImageRgb8(rgb) => rgb.clone(),
                other => other.to_rgb8(),
            })
            .collect();
        Ok(self.embedder.embed_views(&views)?)
    }
    fn dim(&self) -> usize {
        self.embedder.dim()
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}
