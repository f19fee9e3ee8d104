//! Command-line configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::batcher::BatchConfig;
use crate::budget::DecodeBudget;
use crate::decode::DecodeLimits;
use crate::routes::Settings;

/// Query-by-image search over a gallery: a JSON API and a web page.
///
/// With no flags at all it serves the pretrained EfficientNet-Lite0 (downloaded into the
/// Hugging Face cache on first start, see --weights) over an empty gallery in
/// ./deep-metric-data, on http://127.0.0.1:8080; the page says how to add images.
///
/// With no --index, the server keeps its own index in --data-dir (created on first start)
/// and --gallery DIR adds a folder of images to it at start-up (files already indexed are
/// skipped by content hash). With --index DIR it serves an index built by `indexer build`
/// and refuses one built with a different model. With --store URL the gallery lives in a
/// remote vector engine (PostgreSQL + pgvector); uploads still go to --data-dir.
///
/// API: POST /api/search?k=10&filter=JSON (multipart field 'image' [+ 'filter'] or a raw
/// image/* body); POST /api/images (multipart 'image' parts, each with optional 'label' and
/// 'metadata' (a JSON object) paired by order; all or nothing; needs --api-key when set);
/// DELETE /api/images/{id} (needs --api-key); GET /api/images?offset=&limit=&filter=;
/// GET /api/images/{id} (the file, or its record with 'Accept: application/json');
/// GET /api/images/{id}/similar?k=&filter=; GET /api/images/{id}/thumb; GET /healthz;
/// GET /metrics (Prometheus). A filter is a JSON object, keys ANDed: {"label":"shoe"},
/// {"color":["red","blue"]} (any of), {"price":{"gte":10,"lt":50}}. Errors are JSON
/// {"error": "..."} with a 4xx/5xx status. k must be 1 or more; values above --max-k are
/// clamped to --max-k.
#[derive(Parser, Debug, Clone)]
#[command(name = "search-server", version, about, long_about)]
pub struct Args {
    /// Address to listen on. Use 0.0.0.0:PORT to serve other machines.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Where the server keeps its own index, uploaded images and cached thumbnails.
    #[arg(long, default_value = "./deep-metric-data")]
    pub data_dir: PathBuf,

    /// Serve this index (built by `indexer build`) instead of the one in --data-dir.
    #[arg(long)]
    pub index: Option<PathBuf>,

    /// Keep the gallery in a remote vector engine instead of an index on disk:
    /// postgres://USER@HOST:PORT/DB?collection=NAME (PostgreSQL with pgvector; the
    /// collection is created, empty, when missing). Several servers may share one.
    #[arg(long, conflicts_with = "index")]
    pub store: Option<String>,

    /// Base folder for relative image paths of an --index (the folder it was built from;
    /// default: the index directory's parent).
    #[arg(long)]
    pub images_root: Option<PathBuf>,

    /// Index this folder of images at start-up (recursively; a file's parent folder name
    /// is its label). Files already in the index (same SHA-256) are skipped.
    #[arg(long)]
    pub gallery: Option<PathBuf>,

    /// Embedding model: a run directory written by `trainer`, or pretrained:BACKBONE.
    #[arg(long, default_value = "pretrained:efficientnet-lite0")]
    pub model: String,

    /// Pretrained weight file (else $DEEP_METRIC_WEIGHTS, else the Hugging Face cache, else downloaded from the hub into it (efficientnet-lite0: timm/tf_efficientnet_lite0.in1k; resnet18/50: timm/resnet*.a1_in1k; bn-inception has no hub repo and needs this flag). $HF_HOME / $HF_HUB_CACHE
    /// locate the cache, $HF_ENDPOINT the hub, and $HF_HUB_OFFLINE=1 forbids downloading.
    #[arg(long)]
    pub weights: Option<PathBuf>,

    #[command(flatten)]
    pub device: trainer::device::DeviceArgs,

    /// Require this key for writes, POST /api/images and DELETE /api/images/{id}
    /// ('Authorization: Bearer KEY' or 'X-Api-Key').
    /// Also read from $DEEP_METRIC_API_KEY, which keeps it out of `ps` output.
    #[arg(long)]
    pub api_key: Option<String>,

    /// Disable writes: POST /api/images and DELETE /api/images/{id} answer 403.
    #[arg(long)]
    pub read_only: bool,

    /// Largest accepted upload, bytes.
    #[arg(long, default_value_t = 20_000_000)]
    pub max_upload_bytes: usize,

    /// Largest accepted image area, pixels (checked from the header, before decoding).
    #[arg(long, default_value_t = 40_000_000)]
    pub max_pixels: u64,

    /// Memory for decoded images across searches, adds and thumbnails, MiB. Each request
    /// charges what its image decodes to (from the header: a 40 MP 16-bit RGBA PNG is
    /// ~420 MiB); past the budget requests wait (--decode-wait-ms), then get 503.
    #[arg(long, default_value_t = 512)]
    pub decode_budget_mib: u64,

    /// Longest a request waits for decode memory before answering 503, milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub decode_wait_ms: u64,

    /// Results per query when the request has no k.
    #[arg(long, default_value_t = 10)]
    pub default_k: usize,

    /// Largest k; larger requests are clamped to it.
    #[arg(long, default_value_t = 100)]
    pub max_k: usize,

    /// Search breadth of the HNSW index (higher: better recall, slower).
    #[arg(long, default_value_t = 64)]
    pub ef: usize,

    /// Most queries embedded in one forward pass. 8 keeps a batch's activations in cache:
    /// on the 2-core dev machine it served 32 clients ~10 % faster than 16.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,

    /// Longest a query waits for others to share its batch, milliseconds.
    #[arg(long, default_value_t = 3)]
    pub batch_wait_ms: u64,

    /// Queries that may wait for the model before new ones get 503.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,

    /// HTTP worker threads (they only do I/O; the model runs on its own thread).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,

    /// Longest side of thumbnails, pixels.
    #[arg(long, default_value_t = 256)]
    pub thumb_size: u32,

    /// Memory for cached thumbnails, MiB (they are also cached on disk in --data-dir).
    #[arg(long, default_value_t = 64)]
    pub thumb_cache_mib: usize,

    /// Seconds to finish in-flight requests after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

impl Args {
    /// Checks values clap cannot; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--max-upload-bytes", self.max_upload_bytes as u64),
            ("--max-pixels", self.max_pixels),
            ("--default-k", self.default_k as u64),
            ("--max-k", self.max_k as u64),
            ("--ef", self.ef as u64),
            ("--max-batch", self.max_batch as u64),
            ("--queue", self.queue as u64),
            ("--workers", self.workers as u64),
            ("--decode-budget-mib", self.decode_budget_mib),
        ];
        for (flag, v) in positive {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.max_k > 10_000 {
            return Err("--max-k must be at most 10000".into());
        }
        if self.thumb_size < 16 || self.thumb_size > 2048 {
            return Err("--thumb-size must be between 16 and 2048".into());
        }
        if self.read_only && self.gallery.is_some() {
            return Err(
                "--gallery adds images to the index, which --read-only forbids; drop one of them"
                    .into(),
            );
        }
        if let Some(k) = &self.api_key {
            if k.trim().is_empty() {
                return Err("--api-key is empty".into());
            }
        }
        Ok(())
    }

    pub fn settings(&self) -> Settings {
        Settings {
            api_key: self.api_key.clone(),
            read_only: self.read_only,
            max_upload_bytes: self.max_upload_bytes,
            limits: self.limits(),
            default_k: self.default_k.min(self.max_k),
            max_k: self.max_k,
            budget: DecodeBudget::new(
                self.decode_budget_mib << 20,
                Duration::from_millis(self.decode_wait_ms),
            ),
            public_roots: self.public_roots(),
        }
    }

    /// The folders result paths are shown relative to (see `Settings::public_roots`),
    /// canonical like the paths the server records.
    fn public_roots(&self) -> Vec<PathBuf> {
        let index_parent = self
            .index
            .as_ref()
            .and_then(|i| i.parent())
            .map(PathBuf::from);
        [
            self.gallery.clone(),
            self.images_root.clone().or(index_parent),
            Some(self.data_dir.clone()),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| p.canonicalize().ok())
        .collect()
    }

    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_pixels: self.max_pixels,
            ..DecodeLimits::default()
        }
    }

    pub fn batch(&self) -> BatchConfig {
        BatchConfig {
            max_batch: self.max_batch,
            batch_wait: Duration::from_millis(self.batch_wait_ms),
            queue_capacity: self.queue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let a = Args::try_parse_from(["search-server"]).unwrap();
        assert_eq!(a.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(a.max_upload_bytes, 20_000_000);
        assert_eq!((a.max_batch, a.batch_wait_ms), (8, 3));
        assert!(a.validate().is_ok());
        let bad = Args::try_parse_from(["search-server", "--max-k", "0"]).unwrap();
        assert!(bad.validate().unwrap_err().contains("--max-k"));
        let ro = Args::try_parse_from(["search-server", "--read-only", "--gallery", "x"]).unwrap();
        assert!(ro.validate().unwrap_err().contains("--read-only"));
        assert!(Args::try_parse_from(["search-server", "--bind", "nonsense"]).is_err());
    }
}
