//! `indexer`: embed an image gallery into an on-disk HNSW index, query it, benchmark it.
//! Argument parsing only; the commands live in `indexer::commands`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use indexer::bench::BenchConfig;
use indexer::commands::{self, BenchArgs, BuildArgs, ImageSet, ModelSource, SyntheticArgs};
use indexer::storage::Location;
use indexer::HnswParams;
use trainer::data::{DatasetKind, SplitSpec};
use trainer::device::{DeviceArgs, DeviceError};

#[derive(Parser)]
#[command(
    name = "indexer",
    version,
    about = "Embed an image gallery into an on-disk HNSW index, query it, and benchmark retrieval"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct HnswArgs {
    /// HNSW max connections per node (2..=256); more = better recall, more memory.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW candidate list size while building; more = better graph, slower build.
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// HNSW layers (1..=16).
    #[arg(long, default_value_t = 16)]
    max_layer: usize,
    /// Walk the graph over an int8 copy of the vectors (a quarter of the memory traffic),
    /// re-ranking the best by the exact f32 distance. Stored in the index.
    #[arg(long, value_enum, default_value = "none")]
    quantize: indexer::params::Quantize,
}

impl HnswArgs {
    fn params(&self) -> HnswParams {
        HnswParams {
            m: self.m,
            ef_construction: self.ef_construction,
            max_layer: self.max_layer,
            quantize: self.quantize,
        }
    }
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A training run directory, or `pretrained:efficientnet-lite0` (also resnet18, resnet50, bn-inception).
    #[arg(long)]
    model: String,
    /// Weight file of a pretrained backbone (default: $DEEP_METRIC_WEIGHTS, else the Hugging Face
    /// cache, else downloaded from the hub into it; bn-inception has no hub repo and needs this).
    #[arg(long)]
    weights: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Clone)]
struct OptModelArgs {
    /// Model to embed with; default: the one the index records. A model that does not
    /// match the index is refused.
    #[arg(long)]
    model: Option<String>,
    /// Weight file of a pretrained backbone given with --model.
    #[arg(long, requires = "model")]
    weights: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

impl OptModelArgs {
    fn source(&self) -> Option<ModelSource> {
        self.model
            .as_deref()
            .map(|m| ModelSource::new(m, self.weights.as_deref()))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Embed images (a folder, or a dataset split) and write a new index.
    Build {
        #[command(flatten)]
        model: ModelArgs,
        /// Folder of images (searched recursively); paths are recorded relative to it.
        #[arg(long, conflicts_with_all = ["dataset", "data"], required_unless_present = "dataset")]
        images: Option<PathBuf>,
        /// Dataset layout, with --data and --split; class names become item labels.
        #[arg(long, value_enum, requires = "data")]
        dataset: Option<DatasetKind>,
        /// Dataset root (for `list`, the list file).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Split to index: train, test, all.
        #[arg(long, default_value = "test")]
        split: SplitSpec,
        /// Index directory to create.
        #[arg(long, required_unless_present = "store")]
        out: Option<PathBuf>,
        /// Create a collection in a remote store instead:
        /// postgres://USER@HOST:PORT/DB?collection=NAME&shards=N (PostgreSQL with pgvector;
        /// N hash partitions, default 4).
        #[arg(long, conflicts_with = "out")]
        store: Option<String>,
        #[command(flatten)]
        hnsw: HnswArgs,
        /// Images per embedding batch.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Skip (and list) unreadable images instead of stopping at the first.
        #[arg(long)]
        skip_bad_images: bool,
    },
    /// Add images (files or folders) to an index; content already indexed is reported, not re-added.
    Add {
        #[arg(long)]
        index: Option<PathBuf>,
        /// A remote store instead of an index directory:
        /// postgres://USER@HOST:PORT/DB?collection=NAME (PostgreSQL with pgvector).
        #[arg(long, conflicts_with = "index", required_unless_present = "index")]
        store: Option<String>,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[command(flatten)]
        model: OptModelArgs,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long)]
        skip_bad_images: bool,
        /// Metadata for the added images: a JSONL file, one `{"path": …, "metadata": {…}}`
        /// per line, `path` relative to this file's folder (or absolute). Content that is
        /// already indexed keeps its metadata.
        #[arg(long)]
        metadata: Option<PathBuf>,
    },
    /// Delete items by id (durable at once; the index is then compacted by a commit).
    Delete {
        #[arg(long)]
        index: Option<PathBuf>,
        /// A remote store instead of an index directory:
        /// postgres://USER@HOST:PORT/DB?collection=NAME (PostgreSQL with pgvector).
        #[arg(long, conflicts_with = "index", required_unless_present = "index")]
        store: Option<String>,
        /// Ids to delete (as `query` prints them).
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Describe an index: size, model, parameters, disk use.
    Info {
        #[arg(long)]
        index: Option<PathBuf>,
        /// A remote store instead of an index directory:
        /// postgres://USER@HOST:PORT/DB?collection=NAME (PostgreSQL with pgvector).
        #[arg(long, conflicts_with = "index", required_unless_present = "index")]
        store: Option<String>,
    },
    /// Make an index with a missing or damaged write-ahead log usable again, losing the
    /// items logged after the damage (the damaged log is kept aside).
    Recover {
        #[arg(long)]
        index: PathBuf,
    },
    /// Print the nearest gallery images of a query image.
    Query {
        #[arg(long)]
        index: Option<PathBuf>,
        /// A remote store instead of an index directory:
        /// postgres://USER@HOST:PORT/DB?collection=NAME (PostgreSQL with pgvector).
        #[arg(long, conflicts_with = "index", required_unless_present = "index")]
        store: Option<String>,
        image: PathBuf,
        /// Neighbours to print (at least 1).
        #[arg(short, long, default_value_t = 10,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        k: usize,
        /// HNSW search width (≥ k).
        #[arg(long, default_value_t = 128)]
        ef: usize,
        /// Brute-force search instead of HNSW.
        #[arg(long)]
        exact: bool,
        /// Only items matching this JSON filter, e.g. '{"label": "shoe", "price": {"lt": 50}}'.
        #[arg(long)]
        filter: Option<String>,
        #[command(flatten)]
        model: OptModelArgs,
    },
    /// The paper table on a dataset split, exact and through HNSW, with the index's costs.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum)]
        dataset: DatasetKind,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "test")]
        split: SplitSpec,
        /// Only the first N images of the split (quick runs).
        #[arg(long)]
        limit: Option<usize>,
        /// Recall@K cut-offs (default: the dataset's: 1,2,4,8 or 1,10,100,1000 for SOP).
        #[arg(long, value_delimiter = ',')]
        ks: Vec<usize>,
        #[command(flatten)]
        hnsw: HnswArgs,
        /// HNSW search width of the main table and latency figures.
        #[arg(long, default_value_t = 128)]
        ef: usize,
        /// Search widths of the recall/QPS sweep.
        #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
        ef_search: Vec<usize>,
        /// Write the figures as flat JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write the recall/QPS curve as SVG here.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Keep the benchmark's index here (default: a temporary directory).
        #[arg(long)]
        index_out: Option<PathBuf>,
        /// Also measure a remote store on the same vectors (postgres://…; a temporary
        /// collection, dropped afterwards): exact and HNSW Recall@K through the engine, its
        /// QPS and latency beside the embedded store's.
        #[arg(long)]
        store: Option<String>,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long)]
        skip_bad_images: bool,
        /// k-means seed of NMI.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Remove a collection from a remote store (its items, vectors and model record).
    Drop {
        /// postgres://USER@HOST:PORT/DB?collection=NAME
        #[arg(long)]
        store: String,
    },
    /// Write an index's vectors to FILE.npy or FILE.fvecs (row i = item id i).
    ExportVectors {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Scale benchmark on synthetic clustered vectors: build time, peak RSS, QPS at a target recall.
    BenchSynthetic {
        #[arg(long, default_value_t = 100_000)]
        n: usize,
        #[arg(long, default_value_t = 512)]
        dim: usize,
        #[arg(long, default_value_t = 1000)]
        classes: usize,
        /// Spread of points around their cluster centre (1 ≈ as far as two centres).
        #[arg(long, default_value_t = 1.0)]
        noise: f32,
        /// Held-out queries (exact ground truth is brute force).
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        #[command(flatten)]
        hnsw: HnswArgs,
        #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256,512")]
        ef_search: Vec<usize>,
        #[arg(long, default_value_t = 0.95)]
        target_recall: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep the index here (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Search the index already in --dir (built by an earlier run with the same --n, --dim,
        /// --classes, --noise and --seed) instead of building it again.
        #[arg(long, requires = "dir")]
        reuse: bool,
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also measure filtered search: one label per listed fraction of the items (given
        /// at random, independent of the clusters), e.g. 0.01,0.1; recall@10 against exact
        /// filtered search and QPS of each plan.
        #[arg(long, value_delimiter = ',', conflicts_with = "reuse")]
        filter_selectivity: Vec<f64>,
    },
}

fn main() {
    // Keep freed activation buffers in the heap instead of faulting fresh pages per op
    // (each embed batch allocates tens of MiB per layer; see trainer::ops::alloc).
    trainer::ops::tune_glibc_malloc();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Warnings, and the weight download (a network fetch should never be silent).
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("warn,trainer::weights=info")
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        // A device that cannot be used is a problem with the command line or the machine
        // (status 2, as for bad arguments), not a failure while running.
        std::process::exit(if e.downcast_ref::<DeviceError>().is_some() {
            2
        } else {
            1
        });
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build {
            model,
            images,
            dataset,
            data,
            split,
            out,
            store,
            hnsw,
            batch_size,
            skip_bad_images,
        } => {
            let images = match (images, dataset, data) {
                (Some(dir), None, None) => ImageSet::Dir(dir),
                (None, Some(kind), Some(root)) => ImageSet::Dataset { kind, root, split },
                _ => bail!("give either --images DIR or --dataset KIND --data PATH"),
            };
            commands::build(BuildArgs {
                model: ModelSource::new(&model.model, model.weights.as_deref()),
                device: model.device.open()?,
                images,
                out: Location::from_args(out, store)?,
                params: hnsw.params(),
                batch_size,
                skip_bad_images,
            })
        }
        Command::Add {
            index,
            store,
            images,
            model,
            batch_size,
            skip_bad_images,
            metadata,
        } => commands::add(
            &Location::from_args(index, store)?,
            &images,
            model.source(),
            &model.device.open()?,
            batch_size,
            skip_bad_images,
            metadata.as_deref(),
        ),
        Command::Delete { index, store, ids } => {
            commands::delete(&Location::from_args(index, store)?, &ids)
        }
        Command::Info { index, store } => commands::info(&Location::from_args(index, store)?),
        Command::Drop { store } => commands::drop_collection(&store),
        Command::Recover { index } => commands::recover(&index),
        Command::Query {
            index,
            store,
            image,
            k,
            ef,
            exact,
            filter,
            model,
        } => commands::query(
            &Location::from_args(index, store)?,
            &image,
            commands::QueryOptions {
                k,
                ef,
                exact,
                filter: filter.as_deref(),
            },
            model.source(),
            &model.device.open()?,
        ),
        Command::Bench {
            model,
            dataset,
            data,
            split,
            limit,
            ks,
            hnsw,
            ef,
            ef_search,
            json,
            plot,
            index_out,
            store,
            batch_size,
            skip_bad_images,
            seed,
        } => commands::bench(BenchArgs {
            model: ModelSource::new(&model.model, model.weights.as_deref()),
            device: model.device.open()?,
            kind: dataset,
            data,
            split,
            limit,
            cfg: BenchConfig {
                ks,
                params: hnsw.params(),
                ef,
                ef_sweep: ef_search,
                seed,
            },
            batch_size,
            skip_bad_images,
            json,
            plot,
            index_out,
            store,
        }),
        Command::ExportVectors { index, out } => commands::export_vectors(&index, &out),
        Command::BenchSynthetic {
            n,
            dim,
            classes,
            noise,
            queries,
            hnsw,
            ef_search,
            target_recall,
            seed,
            dir,
            reuse,
            json,
            filter_selectivity,
        } => commands::bench_synthetic(SyntheticArgs {
            n,
            dim,
            classes,
            noise,
            queries,
            params: hnsw.params(),
            ef_sweep: ef_search,
            target_recall,
            seed,
            dir,
            reuse,
            json,
            filter_selectivity,
        }),
    }
}
