//! (in progress)
// TEMP-PLACEHOLDER (lead): replaced by the backbone branch's real implementation at merge.
use crate::backbone::BackboneKind;
use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
pub fn load_backbone_weights(_kind: BackboneKind, path: &Path, _device: &Device) -> Result<HashMap<String, Tensor>> {
    Err(Error::file(path, "weight loading is not available in this build"))
}
pub fn resolve_pretrained(_kind: BackboneKind, explicit: Option<&Path>) -> Result<PathBuf> {
    explicit.map(Path::to_path_buf).ok_or_else(|| Error::Invalid("no weights".into()))
}
