//! Pretrained weights: finding the file ([`resolve_pretrained`]), reading any of the formats
//! checkpoints are published in ([`read_tensor_file`]), and renaming their keys to the
//! backbone's canonical variable names ([`load_backbone_weights`]).
//!
//! Formats are recognised by content, not extension: safetensors, PyTorch's zip container
//! (`torch.save` since 1.6) and its legacy container (read by [`legacy_pth`]).

pub mod legacy_pth;
pub mod names;
pub mod resolve;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::backbone::{self, BackboneKind};
use crate::error::{Error, Result};

pub use resolve::{resolve_pretrained, WEIGHTS_ENV};

/// The container formats a weight file can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `torch.save` zip container (PyTorch ≥ 1.6).
    TorchZip,
    /// `torch.save` legacy container (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`).
    TorchLegacy,
}

/// Recognises a weight file's format from its first bytes.
pub fn detect_format(head: &[u8]) -> Option<WeightFormat> {
    if head.starts_with(b"PK\x03\x04") {
        return Some(WeightFormat::TorchZip);
    }
    if legacy_pth::is_legacy_pth(head) {
        return Some(WeightFormat::TorchLegacy);
    }
    // safetensors: u64 little-endian header length, then a JSON object.
    if head.len() >= 9 {
        let n = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if (2..100_000_000).contains(&n) && head[8] == b'{' {
            return Some(WeightFormat::Safetensors);
        }
    }
    None
}

/// Reads every tensor of a weight file, with the names the file uses (a `state_dict`
/// wrapper looked through). Errors name the file.
pub fn read_tensor_file(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let mut head = [0u8; 32];
    let n = std::fs::File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| Error::file(path, format!("cannot read weight file: {e}")))?;
    let format = detect_format(&head[..n]).ok_or_else(|| {
        Error::file(
            path,
            "not a weight file this program reads (expected safetensors, or a PyTorch .pth/.pt \
             in the zip or the legacy format)",
        )
    })?;
    let tensors = match format {
        WeightFormat::Safetensors => candle_core::safetensors::load(path, device)
            .map_err(|e| Error::file(path, format!("invalid safetensors file: {e}")))?
            .into_iter()
            .collect(),
        WeightFormat::TorchLegacy => legacy_pth::read(path, device)?,
        WeightFormat::TorchZip => {
            let read = |key| {
                candle_core::pickle::read_all_with_key(path, key)
                    .map_err(|e| Error::file(path, format!("invalid PyTorch zip checkpoint: {e}")))
            };
            let mut tensors = read(None)?;
            for key in ["state_dict", "model", "state"] {
                if !tensors.is_empty() {
                    break;
                }
                // candle errors when the key is absent; only an actual find counts.
                tensors = read(Some(key)).unwrap_or_default();
            }
            tensors
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(device)?)))
                .collect::<Result<Vec<_>>>()?
        }
    };
    if tensors.is_empty() {
        return Err(Error::file(
            path,
            format!("{format:?} file holds no tensors"),
        ));
    }
    Ok(tensors)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads pretrained weights for `kind`, keyed by the canonical names `backbone::build`
/// creates (plus `classifier.*`/`fc.*`/`last_linear.*` when the file has the ImageNet
/// classifier). Tensors are f32. Fails, naming the file and the key, when a variable the
/// backbone needs is missing or has the wrong shape.
pub fn load_backbone_weights(
    kind: BackboneKind,
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let raw = read_tensor_file(path, device)?;
    let keys: Vec<&str> = raw.iter().map(|(k, _)| k.as_str()).collect();
    let mut out = HashMap::with_capacity(raw.len());
    let mut unused = Vec::new();
    for (key, tensor) in &raw {
        match names::canonical_name(kind, key, &keys) {
            Some(name) => {
                let t = if tensor.dtype() == DType::F32 {
                    tensor.clone()
                } else {
                    tensor.to_dtype(DType::F32)?
                };
                if out.insert(name.clone(), t).is_some() {
                    return Err(Error::file(
                        path,
                        format!("two keys map to '{name}' (the second is '{key}')"),
                    ));
                }
            }
            None => unused.push(key.as_str()),
        }
    }
    for (name, shape) in expected_variables(kind)? {
        let found = out.get(&name).ok_or_else(|| {
            let hint = if unused.is_empty() {
                String::new()
            } else {
                format!(
                    "; keys it has that {kind} does not use: {}",
                    sample(&unused)
                )
            };
            Error::file(
                path,
                format!("weight '{name}' needed by {kind} is missing from this file{hint}"),
            )
        })?;
        if found.shape() != &shape {
            // A transformer's position embedding published for another image size.
            if let Some(t) =
                backbone::vit::fit_position_embedding(kind, &name, found, shape.dims())?
            {
                tracing::info!(
                    "{}: '{name}' resampled from {:?} to {:?} (bicubic, as timm)",
                    path.display(),
                    found.dims(),
                    shape.dims()
                );
                out.insert(name, t);
                continue;
            }
            return Err(Error::file(
                path,
                format!(
                    "weight '{name}' has shape {:?}, {kind} needs {:?}",
                    found.dims(),
                    shape.dims()
                ),
            ));
        }
    }
    Ok(out)
}

fn sample(keys: &[&str]) -> String {
    let mut s = keys
        .iter()
        .take(5)
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > 5 {
        s.push_str(&format!(" and {} more", keys.len() - 5));
    }
    s
}

/// Names and shapes of the variables `backbone::build(kind, …)` creates, without allocating
/// them (a recording `VarBuilder` backend hands out broadcast zeros).
pub fn expected_variables(kind: BackboneKind) -> Result<Vec<(String, Shape)>> {
    let recorder = ShapeRecorder::default();
    let seen = recorder.seen.clone();
    let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu);
    backbone::build(kind, vb)?;
    let seen = std::mem::take(&mut *seen.lock().expect("recorder lock"));
    Ok(seen)
}

#[derive(Default)]
struct ShapeRecorder {
    seen: Arc<Mutex<Vec<(String, Shape)>>>,
}

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .expect("recorder lock")
            .push((name.to_string(), s.clone()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: '{name}' requested without a shape")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected_by_content() {
        assert_eq!(
            detect_format(b"PK\x03\x04rest"),
            Some(WeightFormat::TorchZip)
        );
        assert_eq!(
            detect_format(&legacy_pth::LEGACY_MAGIC_PICKLE),
            Some(WeightFormat::TorchLegacy)
        );
        let mut st = 40u64.to_le_bytes().to_vec();
        st.extend(b"{\"a\":");
        assert_eq!(detect_format(&st), Some(WeightFormat::Safetensors));
        assert_eq!(detect_format(b"\x89PNG\r\n\x1a\n...."), None);
    }

    #[test]
    fn unknown_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("weights.pth");
        std::fs::write(&p, b"hello, not weights").unwrap();
        let err = read_tensor_file(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("weights.pth") && err.contains("not a weight file"),
            "{err}"
        );
    }

    #[test]
    fn legacy_file_with_wrong_keys_names_the_missing_weight() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("other.pth");
        let bytes = legacy_pth::writer::legacy_pth(
            &[("layer9.weight", vec![0.0; 3], vec![3], vec![1])],
            true,
        );
        std::fs::write(&p, bytes).unwrap();
        let err = load_backbone_weights(BackboneKind::EfficientnetLite0, &p, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("other.pth")
                && err.contains("'stem.conv.weight'")
                && err.contains("'layer9.weight'"),
            "{err}"
        );
    }

    #[test]
    fn expected_variables_of_efficientnet() {
        let vars = expected_variables(BackboneKind::EfficientnetLite0).unwrap();
        assert_eq!(vars.len(), 5 * 49);
        assert!(vars
            .iter()
            .any(|(n, s)| n == "stem.conv.weight" && s.dims() == [32, 3, 3, 3]));
        assert!(!vars.iter().any(|(n, _)| n.starts_with("classifier")));
    }
}
