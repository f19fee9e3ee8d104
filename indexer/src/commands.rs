//! The `indexer` subcommands. `main.rs` only parses arguments; everything a command does
//! lives here so it can be read (and tested) without the CLI layer.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use trainer::data::{load_dataset, DatasetKind, SplitSpec};
use trainer::embed::{Embedder, ModelSpec};

use crate::bench::{self, BenchConfig};
use crate::export::{self, VectorFormat};
use crate::filter::{self, Filter, Metadata};
use crate::images::{self, Source};
use crate::remote::PgStore;
use crate::storage::{self, GalleryStore, Location};
use crate::{GalleryIndex, HnswParams, NewItem};
use std::collections::HashMap;

/// Written next to the manifest by `build`: which model made the index, so `query` and `add`
/// (and the search server) can load it without being told.
pub const MODEL_FILE: &str = "model.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSource {
    /// `RUN_DIR` (absolute) or `pretrained:BACKBONE`.
    pub model: String,
    /// Explicit weight file of a pretrained backbone (absolute), if one was given.
    pub weights: Option<PathBuf>,
}

impl ModelSource {
    pub fn new(model: &str, weights: Option<&Path>) -> Self {
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let model = if model.starts_with("pretrained:") {
            model.to_string()
        } else {
            abs(Path::new(model)).display().to_string()
        };
        Self {
            model,
            weights: weights.map(abs),
        }
    }
    pub fn read(index_dir: &Path) -> Result<Self> {
        let path = index_dir.join(MODEL_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: the index does not record its model; pass --model",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid model record", path.display()))
    }
    pub fn write(&self, index_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::store::write_atomic(&index_dir.join(MODEL_FILE), text.as_bytes())?;
        Ok(())
    }
    /// Loads the model onto `device` (`--device`; not recorded: an index built on a GPU is
    /// queried on the CPU with the same vectors).
    pub fn load(&self, device: &Device) -> Result<Embedder> {
        let spec = ModelSpec::parse(&self.model, self.weights.clone())?;
        Embedder::load(&spec, device).with_context(|| format!("cannot load model {}", self.model))
    }
}

/// Where `build` takes its images from.
pub enum ImageSet {
    Dir(PathBuf),
    Dataset {
        kind: DatasetKind,
        root: PathBuf,
        split: SplitSpec,
    },
}

pub struct BuildArgs {
    pub model: ModelSource,
    pub device: Device,
    pub images: ImageSet,
    /// The index directory to create, or the remote collection.
    pub out: Location,
    pub params: HnswParams,
    pub batch_size: usize,
    pub skip_bad_images: bool,
}

fn sources_from(set: &ImageSet) -> Result<(Vec<Source>, Vec<u32>)> {
    match set {
        ImageSet::Dir(dir) => {
            let files = images::list_images(dir)?;
            let sources = files
                .into_iter()
                .map(|f| {
                    let display = f.path.strip_prefix(dir).unwrap_or(&f.path).display();
                    Source {
                        display: display.to_string(),
                        file: f.path,
                        label: f.label,
                    }
                })
                .collect();
            Ok((sources, Vec::new()))
        }
        ImageSet::Dataset { kind, root, split } => {
            let ds = load_dataset(*kind, root, split)?;
            let labels = ds.labels();
            let sources = ds
                .samples
                .iter()
                .map(|s| Source {
                    file: s.path.clone(),
                    display: s
                        .path
                        .strip_prefix(root)
                        .unwrap_or(&s.path)
                        .display()
                        .to_string(),
                    label: Some(ds.class_names[s.label as usize].clone()),
                })
                .collect();
            Ok((sources, labels))
        }
    }
}

pub fn build(args: BuildArgs) -> Result<()> {
    args.params.validate()?;
    // Before the (long) embedding; the index itself is written in a hidden sibling of
    // --out and renamed at the end, so a killed build leaves nothing a rerun would refuse.
    // (A remote collection is created in one transaction, so the same holds.)
    match &args.out {
        Location::Index(out) => GalleryIndex::check_new_dir(out).with_context(|| {
            format!(
                "cannot build into --out {} (use `indexer add` to extend an index)",
                out.display()
            )
        })?,
        Location::Remote(url) => PgStore::check_new(url)?,
    }
    let (sources, _) = sources_from(&args.images)?;
    if sources.is_empty() {
        bail!(
            "no images found to index (supported: {})",
            trainer::data::IMAGE_EXTENSIONS.join(", ")
        );
    }
    let embedder = args.model.load(&args.device)?;
    eprintln!(
        "embedding {} images with {} ({}-d)",
        sources.len(),
        args.model.model,
        embedder.dim()
    );
    let (report, stored, outcome, build_s) = match &args.out {
        Location::Index(out) => {
            let (index, report, outcome, build_s) = build_streamed(&args, out, &embedder, sources)?;
            let mib = index.disk_bytes() as f64 / (1 << 20) as f64;
            (report, format!("{:.1} MiB on disk", mib), outcome, build_s)
        }
        Location::Remote(url) => {
            let mut outcome = images::embed_sources(
                &embedder,
                sources,
                args.batch_size,
                args.skip_bad_images,
                true,
            )?;
            if outcome.embedded.is_empty() {
                bail!("no image could be read; nothing to index");
            }
            let t = Instant::now();
            let (store, report) = PgStore::create(
                url,
                embedder.identity().clone(),
                args.params,
                Some(serde_json::to_value(&args.model)?),
                to_items(std::mem::take(&mut outcome.embedded)),
                1,
            )?;
            let stored = format!("{} hash partitions", store.shards());
            (report, stored, outcome, t.elapsed().as_secs_f64())
        }
    };
    println!(
        "indexed {} images into {} ({:.1} img/s embedding, {:.2} s HNSW build + commit, {stored})",
        report.added.len(),
        args.out.describe(),
        outcome.images_per_second,
        build_s,
    );
    print_skips(&report.duplicates, &outcome.skipped);
    Ok(())
}

/// Embeds `sources` into a new index at `out`, each vector going into the index's vectors
/// file as its batch is embedded ([`GalleryIndex::add_streamed`], on a second thread fed
/// through a bounded channel): the build holds the vectors once, in the file it then maps
/// and links, instead of as embeddings, items and the index's array. An embedding error
/// leaves no index (the staged one is never moved into place). Returns the index, the add
/// report, the embedding outcome and the seconds from the last embedding to the commit.
fn build_streamed(
    args: &BuildArgs,
    out: &Path,
    embedder: &Embedder,
    sources: Vec<Source>,
) -> Result<(GalleryIndex, crate::AddReport, images::EmbedOutcome, f64)> {
    enum Msg {
        Item(images::Embedded),
        /// Every image was embedded (without it, the embedding stopped on an error).
        Done,
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(4 * args.batch_size.max(1));
    let (identity, dim, params, model) = (
        embedder.identity().clone(),
        embedder.dim(),
        args.params,
        &args.model,
    );
    std::thread::scope(|scope| {
        let indexing = scope.spawn(
            move || -> Result<(GalleryIndex, crate::AddReport, Instant)> {
                let mut report = crate::AddReport::default();
                let (mut complete, mut embedded_at) = (false, None);
                let index =
                    GalleryIndex::create_with(out, identity, dim, params, |index| -> Result<()> {
                        model.write(index.dir())?;
                        let items = std::iter::from_fn(|| match rx.recv() {
                            Ok(Msg::Item(e)) => Some(to_item(e)),
                            Ok(Msg::Done) => {
                                (complete, embedded_at) = (true, Some(Instant::now()));
                                None
                            }
                            Err(_) => None,
                        });
                        report = index.add_streamed(items)?;
                        if !complete {
                            bail!("the embedding stopped; nothing was indexed");
                        }
                        if report.added.is_empty() {
                            bail!("no image could be read; nothing to index");
                        }
                        Ok(())
                    })?;
                Ok((index, report, embedded_at.unwrap_or_else(Instant::now)))
            },
        );
        let mut indexing_stopped = false;
        let outcome = images::embed_sources_into(
            embedder,
            sources,
            args.batch_size,
            args.skip_bad_images,
            true,
            &mut |e| {
                tx.send(Msg::Item(e)).map_err(|_| {
                    indexing_stopped = true;
                    trainer::error::Error::Invalid("the index stopped taking vectors".into())
                })
            },
        );
        if outcome.is_ok() {
            let _ = tx.send(Msg::Done);
        }
        drop(tx);
        let indexed = indexing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (outcome, indexed) {
            (Ok(outcome), Ok((index, report, embedded_at))) => {
                Ok((index, report, outcome, embedded_at.elapsed().as_secs_f64()))
            }
            // The index's own error explains why it stopped taking vectors.
            (Err(_), Err(e)) if indexing_stopped => Err(e),
            (Err(e), _) => Err(e.into()),
            (Ok(_), Err(e)) => Err(e),
        }
    })
}

fn to_items(embedded: Vec<images::Embedded>) -> Vec<NewItem> {
    embedded.into_iter().map(to_item).collect()
}

fn to_item(e: images::Embedded) -> NewItem {
    NewItem {
        path: e.source.display,
        label: e.source.label,
        sha256: e.sha256,
        metadata: None,
        vector: e.vector,
    }
}

fn print_skips(duplicates: &[(String, u64)], skipped: &[(PathBuf, String)]) {
    for (path, id) in duplicates {
        println!("duplicate: {path} has the same content as item {id}; not added");
    }
    if !skipped.is_empty() {
        println!("skipped {} unreadable images (listed above)", skipped.len());
    }
}

/// Loads the model to use with a gallery: `--model` if given (refused when it does not
/// match the gallery), else the one the gallery recorded.
fn model_for(
    store: &dyn GalleryStore,
    model: Option<ModelSource>,
    device: &Device,
) -> Result<Embedder> {
    let source = match model {
        Some(m) => m,
        None => store.model_source()?,
    };
    let embedder = source.load(device)?;
    storage::ensure_model(store, embedder.identity())?;
    Ok(embedder)
}

/// `paths` may mix files and directories (searched recursively for images).
/// Reads an `add --metadata` sidecar: JSONL, one `{"path": …, "metadata": {…}}` per line
/// (blank lines skipped), `path` relative to the sidecar's folder. Keyed by the canonical
/// path, so `./a.jpg` and `a.jpg` are one file. Errors name the line.
pub fn read_metadata_sidecar(file: &Path) -> Result<HashMap<PathBuf, Metadata>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        path: PathBuf,
        metadata: serde_json::Value,
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the metadata file {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut out = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let at = || format!("{} line {}", file.display(), i + 1);
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).with_context(|| {
            format!(
                "{}: expected {{\"path\": \"…\", \"metadata\": {{…}}}}",
                at()
            )
        })?;
        let meta = filter::validate_metadata(line.metadata).with_context(at)?;
        let path = base.join(&line.path);
        let key = std::fs::canonicalize(&path)
            .with_context(|| format!("{}: no file {}", at(), path.display()))?;
        if out.insert(key, meta).is_some() {
            bail!(
                "{}: {} has metadata on an earlier line too",
                at(),
                line.path.display()
            );
        }
    }
    Ok(out)
}

/// `indexer delete`: durable at once (embedded: a WAL batch, then compacted by a commit;
/// remote: one committed transaction).
pub fn delete(location: &Location, ids: &[u64]) -> Result<()> {
    let mut store = storage::open(location, true)?;
    store.delete(ids)?;
    println!(
        "deleted {} item(s) from {} (now {} items)",
        ids.len(),
        location.describe(),
        store.count()?
    );
    Ok(())
}

pub fn add(
    location: &Location,
    paths: &[PathBuf],
    model: Option<ModelSource>,
    device: &Device,
    batch_size: usize,
    skip_bad: bool,
    metadata: Option<&Path>,
) -> Result<()> {
    let mut metadata = match metadata {
        Some(f) => read_metadata_sidecar(f)?,
        None => HashMap::new(),
    };
    // Refuse a concurrent writer now, not after embedding.
    let mut index = storage::open(location, true)?;
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(images::list_images(p)?);
        } else {
            files.push(intake::ImageFile {
                path: p.clone(),
                label: None,
            });
        }
    }
    if !metadata.is_empty() {
        let listed: std::collections::HashSet<PathBuf> = files
            .iter()
            .filter_map(|f| std::fs::canonicalize(&f.path).ok())
            .collect();
        if let Some(p) = metadata.keys().find(|p| !listed.contains(*p)) {
            bail!(
                "the metadata file names {}, which is not among the images to add",
                p.display()
            );
        }
    }
    // Hash first, so known content is reported without being decoded and embedded.
    let mut sources = Vec::new();
    let mut known = Vec::new();
    for intake::ImageFile { path: f, label } in files {
        let sha = match images::sha256_of(&f) {
            Ok(s) => s,
            Err(e) if skip_bad => {
                eprintln!("skipping {}: {e}", f.display());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match index.find_sha256(&sha)? {
            Some(id) => known.push((f.display().to_string(), id)),
            None => sources.push(Source {
                display: f.display().to_string(),
                file: f,
                label,
            }),
        }
    }
    let mut report = crate::AddReport::default();
    let mut skipped = Vec::new();
    if !sources.is_empty() {
        let embedder = model_for(index.as_ref(), model, device)?;
        let outcome = images::embed_sources(&embedder, sources, batch_size, skip_bad, true)?;
        skipped = outcome.skipped;
        let mut items = Vec::with_capacity(outcome.embedded.len());
        for e in outcome.embedded {
            let meta = std::fs::canonicalize(&e.source.file)
                .ok()
                .and_then(|p| metadata.remove(&p));
            let mut item = to_items(vec![e]).pop().expect("one item");
            item.metadata = meta;
            items.push(item);
        }
        report = index.add(items)?;
    }
    report.duplicates.splice(0..0, known);
    println!(
        "added {} images to {} (now {} items)",
        report.added.len(),
        location.describe(),
        index.count()?
    );
    print_skips(&report.duplicates, &skipped);
    Ok(())
}

pub fn info(location: &Location) -> Result<()> {
    let index_dir = match location {
        Location::Index(dir) => dir,
        Location::Remote(url) => return info_remote(url),
    };
    let index = GalleryIndex::open(index_dir)?;
    let id = index.identity();
    let p = index.params();
    let labels: std::collections::BTreeSet<&str> = index
        .items()
        .iter()
        .filter_map(|i| i.label.as_deref())
        .collect();
    println!("index        {}", index_dir.display());
    println!(
        "format       {} v{} (generation {})",
        crate::manifest::FORMAT,
        index.format_version(),
        index.generation()
    );
    println!(
        "items        {} ({} only in the write-ahead log, {} deleted), {} labels",
        index.live_len(),
        index.logged(),
        index.deleted_len(),
        labels.len()
    );
    println!(
        "model        {} → {}-d, weights sha256 {}",
        id.backbone, id.dim, &id.weights_sha256
    );
    if let Ok(src) = ModelSource::read(index_dir) {
        println!(
            "model source {}{}",
            src.model,
            src.weights
                .map(|w| format!(" (weights {})", w.display()))
                .unwrap_or_default()
        );
    }
    println!(
        "hnsw         M = {}, ef_construction = {}, max_layer = {}",
        p.m, p.ef_construction, p.max_layer
    );
    println!(
        "disk         {:.2} MiB",
        index.disk_bytes() as f64 / (1 << 20) as f64
    );
    for w in index.warnings() {
        println!("warning      {w}");
    }
    Ok(())
}

fn info_remote(url: &str) -> Result<()> {
    let store = PgStore::open(url, 1)?;
    let id = store.identity();
    println!("store        {}", store.describe());
    println!(
        "items        {} in {} hash partitions",
        store.count()?,
        store.shards()
    );
    println!(
        "model        {} → {}-d, weights sha256 {}",
        id.backbone, id.dim, &id.weights_sha256
    );
    if let Ok(src) = GalleryStore::model_source(&store) {
        println!(
            "model source {}{}",
            src.model,
            src.weights
                .map(|w| format!(" (weights {})", w.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Makes an index with a missing or damaged write-ahead log usable again: keeps the
/// acknowledged items before the damage, drops the rest (listed), and commits a new
/// generation; the damaged log is kept aside. Refused while another process writes.
pub fn recover(index_dir: &Path) -> Result<()> {
    let mut index = GalleryIndex::open_salvaging_wal(index_dir)?;
    index.lock_for_writing()?;
    let generation = index.generation();
    index.commit()?;
    for w in index.warnings() {
        println!("warning: {w}");
    }
    if index.generation() == generation {
        println!(
            "{}: nothing to recover ({} items)",
            index_dir.display(),
            index.len()
        );
    } else {
        println!(
            "{}: committed generation {} with {} items",
            index_dir.display(),
            index.generation(),
            index.len()
        );
    }
    Ok(())
}

/// What `indexer query` asks of the index.
pub struct QueryOptions<'a> {
    pub k: usize,
    /// HNSW search breadth (raised to `k` when smaller).
    pub ef: usize,
    /// Exact search over every vector instead of the graph.
    pub exact: bool,
    /// A filter as JSON (`--filter`), parsed here so its errors name the flag.
    pub filter: Option<&'a str>,
}

pub fn query(
    location: &Location,
    image: &Path,
    options: QueryOptions,
    model: Option<ModelSource>,
    device: &Device,
) -> Result<()> {
    let QueryOptions {
        k,
        ef,
        exact,
        filter,
    } = options;
    let filter = filter.map(Filter::parse).transpose().context("--filter")?;
    let index = storage::open(location, false)?;
    let live = index.count()?;
    if live == 0 {
        bail!(
            "{}: the gallery is empty; add images with `indexer add`",
            location.describe()
        );
    }
    let embedder = model_for(index.as_ref(), model, device)?;
    let (_, img) = images::read_image(image)?;
    let q = embedder
        .embed_images(&[img])?
        .pop()
        .context("the model returned no embedding")?;
    let t = Instant::now();
    let hits = index.search(&q, k, ef.max(k), filter.as_ref(), exact)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{} nearest of {live} items ({} search, {ms:.2} ms):",
        hits.len(),
        if exact { "exact" } else { "HNSW" }
    );
    println!(
        "{:>4}  {:>8}  {:>8}  {:>7}  {:<20}  path",
        "rank", "id", "distance", "cosine", "label"
    );
    for (rank, (h, it)) in hits.iter().enumerate() {
        println!(
            "{:>4}  {:>8}  {:>8.4}  {:>7.4}  {:<20}  {}{}",
            rank + 1,
            h.id,
            h.distance,
            h.score,
            it.label.as_deref().unwrap_or("-"),
            it.path,
            it.metadata
                .as_ref()
                .map(|m| format!("  {}", serde_json::Value::Object(m.clone())))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `indexer drop --store URL`: removes a remote collection.
pub fn drop_collection(url: &str) -> Result<()> {
    let at = crate::remote::redact(url);
    if PgStore::drop_collection(url)? {
        println!("dropped the collection of {at}");
        Ok(())
    } else {
        bail!("{at}: no such collection; nothing was dropped")
    }
}

pub fn export_vectors(index_dir: &Path, out: &Path) -> Result<()> {
    let format = VectorFormat::from_path(out)?;
    let index = GalleryIndex::open(index_dir)?;
    export::write_rows(out, format, index.vectors())?;
    println!(
        "wrote {} × {} vectors to {}",
        index.len(),
        index.dim(),
        out.display()
    );
    Ok(())
}

pub struct BenchArgs {
    pub model: ModelSource,
    pub device: Device,
    pub kind: DatasetKind,
    pub data: PathBuf,
    pub split: SplitSpec,
    pub limit: Option<usize>,
    pub cfg: BenchConfig,
    pub batch_size: usize,
    pub skip_bad_images: bool,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub index_out: Option<PathBuf>,
    /// A remote store to measure beside the embedded one (`--store`).
    pub store: Option<String>,
}

pub fn bench(mut args: BenchArgs) -> Result<()> {
    let (mut sources, mut labels) = sources_from(&ImageSet::Dataset {
        kind: args.kind,
        root: args.data.clone(),
        split: args.split.clone(),
    })?;
    if let Some(n) = args.limit {
        sources.truncate(n);
        labels.truncate(n);
    }
    if args.cfg.ks.is_empty() {
        args.cfg.ks = trainer::metrics::default_ks(args.kind == DatasetKind::Sop).to_vec();
    }
    let embedder = args.model.load(&args.device)?;
    eprintln!(
        "embedding {} images of {} {} with {}",
        sources.len(),
        args.kind,
        args.split,
        args.model.model
    );
    let outcome = images::embed_sources(
        &embedder,
        sources.clone(),
        args.batch_size,
        args.skip_bad_images,
        true,
    )?;
    // Keep the labels of the images that were embedded.
    let by_file: std::collections::HashMap<&Path, u32> = sources
        .iter()
        .map(|s| s.file.as_path())
        .zip(labels.iter().copied())
        .collect();
    let labels: Vec<u32> = outcome
        .embedded
        .iter()
        .map(|e| by_file[e.source.file.as_path()])
        .collect();
    let vectors: Vec<f32> = outcome
        .embedded
        .iter()
        .flat_map(|e| e.vector.iter().copied())
        .collect();
    let tmp;
    let index_dir = match &args.index_out {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("index")
        }
    };
    let mut report = bench::run(
        &vectors,
        embedder.dim(),
        &labels,
        embedder.identity().clone(),
        &index_dir,
        &args.cfg,
    )?;
    if args.index_out.is_some() {
        args.model.write(&index_dir)?;
    }
    report.embed_images_per_second = Some(outcome.images_per_second);
    println!("{}", report.markdown());
    let remote = match &args.store {
        Some(url) => {
            let r = crate::remote_bench::run(
                url,
                &vectors,
                embedder.dim(),
                &labels,
                embedder.identity().clone(),
                &args.cfg,
            )?;
            println!("{}", r.markdown(&report));
            Some(r)
        }
        None => None,
    };
    if let Some(p) = &args.json {
        let mut j = report.to_json();
        if let (Some(r), Some(obj)) = (&remote, j.as_object_mut()) {
            obj.extend(r.to_json(&report));
        }
        j["dataset"] = format!("{} {}", args.kind, args.split).into();
        j["model"] = args.model.model.clone().into();
        crate::store::write_atomic(p, serde_json::to_string_pretty(&j)?.as_bytes())?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        let title = format!(
            "HNSW on {} {} ({} items, M={})",
            args.kind, args.split, report.n, report.params.m
        );
        std::fs::write(p, bench::sweep_svg(&report.sweep, &title))
            .with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

pub struct SyntheticArgs {
    pub n: usize,
    pub dim: usize,
    pub classes: usize,
    pub noise: f32,
    pub queries: usize,
    pub params: HnswParams,
    pub ef_sweep: Vec<usize>,
    pub target_recall: f64,
    pub seed: u64,
    pub dir: Option<PathBuf>,
    /// Open the index in `dir` instead of building it.
    pub reuse: bool,
    pub json: Option<PathBuf>,
    /// Fractions of the items that get one label each (see [`synthetic::selectivity_labels`]).
    pub filter_selectivity: Vec<f64>,
}

/// Peak resident set size of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// A `/proc/self/status` field given in kB, in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The scale benchmark on synthetic clustered vectors: build time, commit and reload time,
/// peak RSS, and single-thread QPS at the smallest swept ef reaching `target_recall`
/// (recall of the exact top-10 over held-out queries).
pub fn bench_synthetic(a: SyntheticArgs) -> Result<()> {
    a.params.validate()?;
    if a.n == 0 || a.dim == 0 || a.queries == 0 {
        bail!("--n, --dim and --queries must be positive");
    }
    let labels = crate::synthetic::selectivity_labels(a.n, &a.filter_selectivity, a.seed)
        .map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    // Reusing an index: the queries it was benchmarked with, not all n vectors again (so the
    // peak RSS is that of a search process).
    let saved = match (&a.dir, a.reuse) {
        (Some(d), true) => read_saved_queries(&d.join("queries.npy"), a.queries, a.dim),
        _ => None,
    };
    // Rows 0..n are the index, n..n + queries the held-out queries; the index's rows are
    // generated while they are added (see below), never all at once.
    let generator = crate::synthetic::Clustered::new(a.dim, a.classes, a.noise, a.seed);
    let queries = match saved {
        Some(q) => q,
        None => generator.rows(a.n, a.n + a.queries),
    };
    let queries = &queries[..];
    let gen_s = t.elapsed().as_secs_f64();
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().join("index")
        }
    };
    let identity = trainer::checkpoint::ModelIdentity {
        backbone: trainer::backbone::BackboneKind::EfficientnetLite0,
        dim: a.dim,
        weights_sha256: "synthetic".repeat(8).chars().take(64).collect(),
        preprocess_sha256: "synthetic".repeat(8).chars().take(64).collect(),
    };
    // (build seconds, commit seconds) when this run built the index; peak RSS after it.
    let (built, rss_built) = if a.reuse {
        (None, None)
    } else {
        let t = Instant::now();
        let mut index = GalleryIndex::create(&dir, identity, a.dim, a.params)?;
        // Generated a batch at a time and streamed into the index's vectors file, so the
        // build holds one copy of the vectors (see `GalleryIndex::add_streamed`).
        const BATCH: usize = 16 * 1024;
        let dim = a.dim;
        let items = (0..a.n).step_by(BATCH).flat_map(|from| {
            let to = (from + BATCH).min(a.n);
            let rows = generator.rows(from, to);
            let labels = &labels;
            (from..to).map(move |i| NewItem {
                path: format!("#{i}"),
                label: labels.as_ref().and_then(|l| l[i].clone()),
                sha256: format!("{i:016x}"),
                metadata: None,
                vector: rows[(i - from) * dim..(i - from + 1) * dim].to_vec(),
            })
        });
        index.add_streamed(items)?;
        let build_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        index.commit()?;
        (Some((build_s, t.elapsed().as_secs_f64())), peak_rss_bytes())
    };
    let t = Instant::now();
    let index = GalleryIndex::open(&dir)?;
    let open_s = t.elapsed().as_secs_f64();
    if index.len() != a.n || index.dim() != a.dim {
        bail!(
            "{}: holds {} × {}-d vectors, not the {} × {}-d this run generates",
            dir.display(),
            index.len(),
            index.dim(),
            a.n,
            a.dim
        );
    }
    let bytes = index.disk_bytes();
    if a.dir.is_some() {
        // The held-out queries, for running a peer on exactly these (bench/peers/hnsw_peer.py
        // --queries-file); the base vectors come from `indexer export-vectors`.
        let path = dir.join("queries.npy");
        crate::export::write_vectors(&path, crate::export::VectorFormat::Npy, queries, a.dim)?;
    }

    use rayon::prelude::*;
    // The timed searches run first and the exact ground truth last: the truth scans every
    // vector, which would make the whole mapped vectors file resident and hide what a
    // search process holds. So recall is scored afterwards from the ids each search kept.
    // (ids of each query's hits, single-thread QPS) of one search function at one ef.
    let sweep = |search: &dyn Fn(&[f32], usize) -> Vec<u64>, ef: usize| {
        let t = Instant::now();
        let found: Vec<Vec<u64>> = queries.chunks_exact(a.dim).map(|q| search(q, ef)).collect();
        let secs = t.elapsed().as_secs_f64();
        (found, (queries.len() / a.dim) as f64 / secs)
    };
    let ids = |hits: Vec<crate::Hit>| hits.into_iter().map(|h| h.id).collect();
    let mut found = Vec::new();
    let mut found_rs = Vec::new();
    // An int8 index: the second columns are the same graph walked over the f32 vectors.
    let quantized = index.params().quantize == crate::params::Quantize::Int8;
    let other = if quantized {
        "f32 walk"
    } else {
        "hnsw_rs search"
    };
    for &ef in &a.ef_sweep {
        let (f, q) = sweep(&|q, ef| ids(index.search(q, 10, ef.max(10))), ef);
        found.push((ef, f, q));
    }
    // Reopen plus the index's own searches: the peak RSS of a search process, and what is
    // resident now: heap (anonymous) and pages of the mapped index files.
    let rss_search = peak_rss_bytes();
    let (rss_anon, rss_file) = (status_bytes("RssAnon:"), status_bytes("RssFile:"));
    for &ef in &a.ef_sweep {
        if index.search_hnsw_rs(&queries[..a.dim], 1, 1).is_some() {
            let (f, q) = sweep(
                &|q, ef| ids(index.search_hnsw_rs(q, 10, ef.max(10)).unwrap_or_default()),
                ef,
            );
            found_rs.push((ef, f, q));
        } else if quantized {
            let (f, q) = sweep(&|q, ef| ids(index.search_f32_walk(q, 10, ef.max(10))), ef);
            found_rs.push((ef, f, q));
        }
    }
    let t = Instant::now();
    let truth: Vec<Vec<u64>> = queries
        .par_chunks_exact(a.dim)
        .map(|q| {
            index
                .search_exact(q, 10)
                .into_iter()
                .map(|h| h.id)
                .collect()
        })
        .collect();
    let exact_s = t.elapsed().as_secs_f64();
    let recall = |found: &[Vec<u64>]| {
        let hits: usize = found
            .iter()
            .zip(&truth)
            .map(|(f, tr)| f.iter().filter(|id| tr.contains(id)).count())
            .sum();
        hits as f64 / (10 * truth.len()) as f64
    };
    let rows: Vec<(usize, f64, f64)> = found
        .iter()
        .map(|(ef, f, q)| (*ef, recall(f), *q))
        .collect();
    let rows_rs: Vec<(usize, f64, f64)> = found_rs
        .iter()
        .map(|(ef, f, q)| (*ef, recall(f), *q))
        .collect();
    let at_target = rows.iter().find(|r| r.1 >= a.target_recall).copied();
    let rss_peak = peak_rss_bytes();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;

    println!("## Synthetic scale benchmark: {} × {}-d, {} clusters (noise {}), M = {}, ef_construction = {}, quantize {:?}\n", a.n, a.dim, a.classes, a.noise, a.params.m, a.params.ef_construction, index.params().quantize);
    println!("| figure | value |\n|---|---:|");
    println!("| generate vectors (s) | {gen_s:.2} |");
    match built {
        Some((build_s, commit_s)) => {
            println!(
                "| HNSW build, {} threads (s) | {build_s:.2} |",
                rayon::current_num_threads()
            );
            println!("| build rate (vectors/s) | {:.0} |", a.n as f64 / build_s);
            println!("| commit to disk (s) | {commit_s:.2} |");
        }
        None => println!("| HNSW build | reused the index in {} |", dir.display()),
    }
    println!("| reopen: verify + load graph dump (s) | {open_s:.2} |");
    println!("| index on disk (MiB) | {:.1} |", mib(bytes));
    if let (Some(b), Some(p)) = (rss_built, rss_peak) {
        println!(
            "| peak RSS after build / overall (MiB) | {:.0} / {:.0} |",
            mib(b),
            mib(p)
        );
    }
    if let (Some(r), Some(an), Some(f)) = (rss_search, rss_anon, rss_file) {
        println!("| peak RSS after reopen + searches, before the other walk and the exact truth (MiB) | {:.0} (then heap {:.0}, mapped files {:.0}) |", mib(r), mib(an), mib(f));
    }
    println!(
        "| exact top-10 of {} queries, all threads (s) | {exact_s:.2} |",
        truth.len()
    );
    match at_target {
        Some((ef, r, q)) => println!(
            "| QPS at recall@10 ≥ {} (1 thread) | {q:.0} (ef {ef}, recall {r:.4}) |",
            a.target_recall
        ),
        None => println!(
            "| QPS at recall@10 ≥ {} | not reached by the swept ef |",
            a.target_recall
        ),
    }
    if rows_rs.is_empty() {
        println!("\n| ef | recall@10 | QPS (1 thread) |\n|---:|---:|---:|");
        for (ef, r, q) in &rows {
            println!("| {ef} | {r:.4} | {q:.0} |");
        }
    } else {
        println!("\n| ef | recall@10 | QPS (1 thread) | recall@10 via {other} | QPS via {other} |\n|---:|---:|---:|---:|---:|");
        for ((ef, r, q), (_, r_rs, q_rs)) in rows.iter().zip(&rows_rs) {
            println!("| {ef} | {r:.4} | {q:.0} | {r_rs:.4} | {q_rs:.0} |");
        }
    }
    if let Some(p) = &a.json {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            m.insert(k.into(), v);
        };
        put("n", a.n.into());
        put("dim", a.dim.into());
        put("m", a.params.m.into());
        put("ef_construction", a.params.ef_construction.into());
        put("threads", rayon::current_num_threads().into());
        if let Some((build_s, commit_s)) = built {
            put("build_seconds", build_s.into());
            put("commit_seconds", commit_s.into());
        }
        put("open_seconds", open_s.into());
        put("index_bytes", bytes.into());
        put("peak_rss_bytes", rss_peak.into());
        put("peak_rss_search_bytes", rss_search.into());
        put("rss_search_anon_bytes", rss_anon.into());
        put("rss_search_file_bytes", rss_file.into());
        if let Some((ef, r, q)) = at_target {
            put("target.ef", ef.into());
            put("target.recall@10", r.into());
            put("target.qps", q.into());
        }
        for (ef, r, q) in &rows {
            put(&format!("sweep.ef{ef}.recall@10"), (*r).into());
            put(&format!("sweep.ef{ef}.qps"), (*q).into());
        }
        for (ef, r_rs, q_rs) in &rows_rs {
            let key = if quantized { "f32_walk" } else { "hnsw_rs" };
            put(&format!("sweep.ef{ef}.{key}.recall@10"), (*r_rs).into());
            put(&format!("sweep.ef{ef}.{key}.qps"), (*q_rs).into());
        }
        crate::store::write_atomic(p, serde_json::to_string_pretty(&m)?.as_bytes())?;
    }
    if labels.is_some() {
        filtered_bench(&index, queries, &a, &rows);
    }
    Ok(())
}

/// The `rows × dim` queries a previous run saved with [`crate::export::write_vectors`] as
/// `.npy`, or `None` when the file is missing or not exactly that (then they are generated).
fn read_saved_queries(path: &Path, rows: usize, dim: usize) -> Option<Vec<f32>> {
    let bytes = std::fs::read(path).ok()?;
    let header = crate::export::npy_header(rows, dim);
    let body = bytes.strip_prefix(header.as_slice())?;
    (body.len() == rows * dim * 4).then(|| {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    })
}

/// The filtered-search table of `bench-synthetic --filter-selectivity`: for each label,
/// recall@10 against exact filtered search and single-thread QPS of the planner's choice,
/// of the filtered graph walk and of the exact scan of the matches, beside the unfiltered
/// QPS at the same ef (`unfiltered`: the sweep's rows).
fn filtered_bench(
    index: &GalleryIndex,
    queries: &[f32],
    a: &SyntheticArgs,
    unfiltered: &[(usize, f64, f64)],
) {
    use crate::gallery::FilterPlan;
    println!(
        "\n## Filtered search: {} × {}-d, labels at random; exact-scan threshold {} matches\n",
        a.n,
        a.dim,
        crate::gallery::EXACT_FILTER_MAX
    );
    println!("| selectivity | matches | ef | planner | recall@10 | QPS | filtered walk recall@10 | walk QPS | exact scan QPS | unfiltered QPS |");
    println!("|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let queries: Vec<&[f32]> = queries.chunks_exact(a.dim).collect();
    for (i, s) in a.filter_selectivity.iter().enumerate() {
        let label = crate::synthetic::selectivity_label(i);
        let f = Filter::parse(&serde_json::json!({ "label": label }).to_string())
            .expect("a label filter parses");
        let matches = index.page(0, 0, Some(&f)).total;
        let truth: Vec<Vec<u64>> = queries
            .iter()
            .map(|q| ids_of(index.search_exact_filtered(q, 10, Some(&f))))
            .collect();
        // (recall@10, QPS) of one way of answering.
        let measure = |search: &dyn Fn(&[f32]) -> Vec<u64>| {
            let t = Instant::now();
            let found: usize = queries
                .iter()
                .zip(&truth)
                .map(|(q, tr)| search(q).iter().filter(|id| tr.contains(id)).count())
                .sum();
            let total: usize = truth.iter().map(Vec::len).sum();
            (
                found as f64 / total.max(1) as f64,
                queries.len() as f64 / t.elapsed().as_secs_f64(),
            )
        };
        let (_, exact_qps) = measure(&|q| {
            ids_of(
                index
                    .search_with_plan(q, 10, 10, Some(&f), FilterPlan::Exact)
                    .0,
            )
        });
        for &(ef, _, unfiltered_qps) in unfiltered {
            let plan = index.plan(Some(&f));
            let (r, q) = measure(&|q| ids_of(index.search_filtered(q, 10, ef, Some(&f))));
            let (rw, qw) = measure(&|q| {
                ids_of(
                    index
                        .search_with_plan(q, 10, ef, Some(&f), FilterPlan::FilteredGraph)
                        .0,
                )
            });
            println!(
                "| {s} | {matches} | {ef} | {plan:?} | {r:.4} | {q:.0} | {rw:.4} | {qw:.0} | {exact_qps:.0} | {unfiltered_qps:.0} |"
            );
        }
    }
}

fn ids_of(hits: Vec<crate::Hit>) -> Vec<u64> {
    hits.into_iter().map(|h| h.id).collect()
}
