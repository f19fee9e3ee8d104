//! `search-server`: see `search-server --help` and the crate docs.
//!
//! Exit status: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for a problem with the command
//! line, the model, the weights or the index (the message says what to do), 1 for a failure
//! while running.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpServer};
use anyhow::Context;
use clap::Parser;
use search_server::batcher::Batcher;
use search_server::config::Args;
use search_server::index::IndexGallery;
use search_server::metrics::Metrics;
use search_server::model::ModelBackend;
use search_server::remote::RemoteGallery;
use search_server::routes::{app, AppState};
use search_server::scan::scan_folder;
use search_server::store::UploadStore;
use search_server::thumbs::Thumbnails;
use search_server::{EmbedBackend, SearchBackend};

/// A start-up problem the user can fix: printed as is, exit status 2.
struct Usage(String);

fn main() -> ExitCode {
    // Keep freed activation buffers in the heap instead of faulting fresh pages per op
    // (each embed batch allocates tens of MiB per layer; see trainer::ops::alloc).
    trainer::ops::tune_glibc_malloc();
    // The model runs on the inference thread, not `main`: see `single_malloc_arena`.
    trainer::ops::single_malloc_arena();
    let mut args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,actix_server=warn,hnsw_rs=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    if args.api_key.is_none() {
        args.api_key = std::env::var("DEEP_METRIC_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty());
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(Usage(msg))) => {
            eprintln!("search-server: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("search-server: {e:#}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(Usage),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure::Usage(Usage(msg.to_string()))
}

/// Creates (if needed) and canonicalises the data directory.
fn prepare_data_dir(dir: &Path) -> Result<PathBuf, Failure> {
    std::fs::create_dir_all(dir).map_err(|e| {
        usage(format!(
            "cannot create the data directory {}: {e}",
            dir.display()
        ))
    })?;
    dir.canonicalize().map_err(|e| {
        usage(format!(
            "cannot resolve the data directory {}: {e}",
            dir.display()
        ))
    })
}

/// The gallery: a remote store (`--store`), an index built by `indexer build` (`--index`),
/// or the server's own index in the data directory. Opened before the HTTP runtime starts
/// (the remote store's client blocks).
fn open_gallery(
    args: &Args,
    data_dir: &Path,
    model: &ModelBackend,
) -> Result<Arc<dyn SearchBackend>, Failure> {
    if let Some(url) = &args.store {
        let g =
            RemoteGallery::open_or_create(url, model.identity(), args.ef, args.images_root.clone())
                .map_err(|e| usage(format!("{e:#}")))?;
        tracing::info!("gallery: {}", g.describe());
        return Ok(Arc::new(g));
    }
    let gallery = match &args.index {
        Some(dir) => {
            let root = args
                .images_root
                .clone()
                .or_else(|| dir.parent().map(Path::to_path_buf));
            let g = IndexGallery::open(dir, model.identity(), args.ef, root)
                .map_err(|e| usage(format!("{e:#}")))?;
            if let Some(missing) = g.first_missing_file() {
                tracing::warn!(
                    "gallery file {} not found: images and thumbnails will 404; pass --images-root (the \
                     folder the index was built from)",
                    missing.display()
                );
            }
            g
        }
        None => IndexGallery::open_or_create(&data_dir.join("index"), model.identity(), args.ef)
            .map_err(|e| usage(format!("{e:#}")))?,
    };
    if !args.read_only {
        gallery
            .lock_for_writing()
            .map_err(|e| usage(format!("{e:#}")))?;
    }
    Ok(Arc::new(gallery))
}

fn run(args: Args) -> Result<(), Failure> {
    args.validate().map_err(usage)?;
    let data_dir = prepare_data_dir(&args.data_dir)?;
    // One writing server per data directory for its whole life (the OS drops the lock on
    // exit or crash), refused here rather than failing requests later. --read-only servers
    // write nothing but atomically replaced thumbnails, so they may share it.
    let _data_dir_lock = if args.read_only {
        None
    } else {
        Some(
            indexer::store::DirLock::acquire(&data_dir, "LOCK", "this data directory")
                .map_err(|e| usage(format!("{e}, or choose another --data-dir")))?,
        )
    };

    let device = args.device.device.open().map_err(usage)?;
    tracing::info!("{device}");
    tracing::info!("loading model {}", args.model);
    let model = ModelBackend::load(&args.model, args.weights.clone(), &device.device)
        .map_err(|e| usage(format!("cannot load the model '{}': {e}", args.model)))?;
    tracing::info!("model ready: {}", model.describe());

    let gallery = open_gallery(&args, &data_dir, &model)?;
    tracing::info!("index: {} items", gallery.len()?);

    let model: Arc<dyn EmbedBackend> = Arc::new(model);
    if let Some(folder) = &args.gallery {
        if !folder.is_dir() {
            return Err(usage(format!(
                "--gallery {} is not a folder",
                folder.display()
            )));
        }
        let report = scan_folder(
            folder,
            model.as_ref(),
            gallery.as_ref(),
            args.limits(),
            args.max_batch.max(8),
        )?;
        gallery.close()?;
        tracing::info!(
            "gallery scan done: {} added, {} already indexed, {} unreadable; index has {} items",
            report.added,
            report.already_indexed,
            report.unreadable,
            gallery.len()?
        );
    }

    let metrics = Arc::new(Metrics::new());
    let (batcher, inference) = Batcher::start(model.clone(), args.batch(), metrics.clone());
    let state = web::Data::new(AppState {
        gallery: gallery.clone(),
        batcher,
        metrics,
        thumbs: Arc::new(Thumbnails::new(
            args.thumb_size,
            Some(data_dir.join("thumbs")),
            args.thumb_cache_mib << 20,
            args.limits(),
        )),
        uploads: UploadStore::new(&data_dir),
        settings: args.settings(),
        model: model.describe(),
    });

    let factory_state = state.clone();
    let server = HttpServer::new(move || app(factory_state.clone()))
        .workers(args.workers)
        .shutdown_timeout(args.shutdown_timeout)
        .bind(args.bind)
        .map_err(|e| usage(format!("cannot listen on {}: {e}", args.bind)))?;
    for addr in server.addrs() {
        tracing::info!("listening on http://{addr}");
    }
    let writes = match (args.read_only, args.api_key.is_some()) {
        (true, _) => "disabled (--read-only)",
        (false, true) => "enabled, API key required",
        (false, false) => "enabled without an API key",
    };
    tracing::info!("adding images: {writes}");

    // actix handles SIGTERM/SIGINT/SIGQUIT: it stops accepting, lets in-flight requests
    // finish (up to --shutdown-timeout), then `run` returns.
    actix_web::rt::System::new()
        .block_on(server.run())
        .context("the HTTP server failed")?;
    tracing::info!("shutting down");
    drop(state);
    inference.join_timeout(Duration::from_secs(10));
    if !args.read_only {
        gallery.close().context("saving the gallery at shutdown")?;
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
