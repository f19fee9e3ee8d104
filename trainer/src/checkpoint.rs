//! The checkpoint format every program agrees on: a directory holding `model.safetensors`
//! (all weights, backbone and head) and `config.json` ([`ModelConfig`]).
//!
//! Downstream programs compare [`ModelIdentity`] values and refuse a mismatched model, so
//! anything that changes what an embedding means (backbone, dim, preprocessing, weights)
//! is part of the identity.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backbone::BackboneKind;
use crate::error::{Error, Result};
use crate::preprocess::Preprocess;

/// Written into every `config.json`; a reader refuses other values.
pub const FORMAT: &str = "deep-metric-checkpoint";
/// Bumped on any incompatible change of the layout or meaning of a checkpoint.
pub const FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// What a checkpoint is: enough to rebuild the network and preprocess inputs exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub format: String,
    pub format_version: u32,
    pub backbone: BackboneKind,
    /// Channels of the backbone's pooled feature.
    pub feature_dim: usize,
    /// Output dim of the linear embedding head; `None` = the pooled features themselves.
    pub embedding_dim: Option<usize>,
    /// How the backbone's last feature map is pooled (older checkpoints: average).
    #[serde(default)]
    pub pooling: crate::backbone::Pooling,
    pub preprocess: Preprocess,
    /// Training provenance (dataset, loss, schedule); informative only.
    #[serde(default)]
    pub training: serde_json::Value,
    /// Last evaluation's metrics; informative only.
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Epochs completed when this checkpoint was written.
    #[serde(default)]
    pub epoch: usize,
}

impl ModelConfig {
    pub fn new(
        backbone: BackboneKind,
        feature_dim: usize,
        embedding_dim: Option<usize>,
        preprocess: Preprocess,
    ) -> Self {
        Self {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            backbone,
            feature_dim,
            embedding_dim,
            pooling: Default::default(),
            preprocess,
            training: serde_json::Value::Null,
            metrics: serde_json::Value::Null,
            epoch: 0,
        }
    }

    /// The dimension of the vectors this model outputs.
    pub fn output_dim(&self) -> usize {
        self.embedding_dim.unwrap_or(self.feature_dim)
    }

    /// Reads and validates `dir/config.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::file(&path, format!("cannot read checkpoint config ({e}); is this a run directory written by `trainer`?"))
        })?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| Error::file(&path, format!("not a valid checkpoint config: {e}")))?;
        if cfg.format != FORMAT {
            return Err(Error::file(
                &path,
                format!("format is '{}', expected '{FORMAT}'", cfg.format),
            ));
        }
        if cfg.format_version != FORMAT_VERSION {
            return Err(Error::file(
                &path,
                format!(
                    "checkpoint format version {} is not supported (this build reads version {FORMAT_VERSION})",
                    cfg.format_version
                ),
            ));
        }
        Ok(cfg)
    }

    /// Writes `dir/config.json` atomically (temp file + rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
    }
}

/// Identity of a model for compatibility checks between an index and the model serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub backbone: BackboneKind,
    pub dim: usize,
    /// SHA-256 of the weight file's bytes.
    pub weights_sha256: String,
    /// SHA-256 of the canonical JSON of the preprocessing.
    pub preprocess_sha256: String,
}

impl ModelIdentity {
    pub fn new(cfg: &ModelConfig, weights_sha256: String) -> Self {
        let pre = serde_json::to_vec(&cfg.preprocess).expect("preprocess serialises");
        Self {
            backbone: cfg.backbone,
            dim: cfg.output_dim(),
            weights_sha256,
            preprocess_sha256: hex::encode(Sha256::digest(pre)),
        }
    }

    /// Errors naming the first field that differs.
    pub fn ensure_matches(&self, other: &ModelIdentity) -> Result<()> {
        if self == other {
            return Ok(());
        }
        let what = if self.backbone != other.backbone {
            format!("backbone {} vs {}", self.backbone, other.backbone)
        } else if self.dim != other.dim {
            format!("embedding dim {} vs {}", self.dim, other.dim)
        } else if self.preprocess_sha256 != other.preprocess_sha256 {
            "preprocessing differs".to_string()
        } else {
            format!(
                "weights differ (sha256 {}… vs {}…)",
                &self.weights_sha256[..12],
                &other.weights_sha256[..12]
            )
        };
        Err(Error::ModelMismatch(what))
    }
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::file(path, e))?;
    Ok(hex::encode(h.finalize()))
}

/// Writes a file so that a crash leaves either the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let tmp = tmp_sibling(path);
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::file(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::file(&tmp, e))?;
    f.sync_all().map_err(|e| Error::file(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::file(path, e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `path.tmp-<pid>` next to `path`, so the rename stays on one filesystem.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}
