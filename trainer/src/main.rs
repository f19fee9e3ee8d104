//! `trainer`: learn an image-retrieval metric, evaluate checkpoints, list backbone stages.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use trainer::backbone::BackboneKind;
use trainer::data::{self, DatasetKind};
use trainer::device::{DeviceArgs, DeviceError, Precision};
use trainer::embed::{Embedder, ModelSpec};
use trainer::train::{self, TrainArgs};

/// Deep Metric trainer: fine-tunes a CNN into an embedding where images of the same class are
/// close (P×K batches, metric-learning losses), and reports the paper metrics (Recall@K, NMI,
/// MAP@R) on held-out classes.
///
/// `trainer --loss fuzzy --data … --out RUN` is shorthand for `trainer train …`.
#[derive(Parser)]
#[command(name = "trainer", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Train an embedding (the default when the first argument is a flag).
    Train {
        #[command(flatten)]
        args: TrainArgs,
        /// Continue the run in --out from its last checkpoint (model, optimiser, epoch).
        #[arg(long)]
        resume: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        device: DeviceArgs,
        /// Arithmetic precision: `f32`, or `bf16` autocast (bf16 activations, f32 master
        /// weights and optimiser state). bf16 is refused for now, with the reason
        /// (docs/cuda.md).
        #[arg(long, value_enum, default_value = "f32")]
        precision: Precision,
    },
    /// Evaluate a checkpoint, or a bare pretrained backbone, on a dataset split.
    Eval(EvalArgs),
    /// List a backbone's stages (names and indices for --freeze-until).
    Stages {
        #[arg(long, value_enum, default_value = "efficientnet-lite0")]
        backbone: BackboneKind,
    },
    /// Time embedding (batch 1 and 32) and a training step of a backbone (EfficientNet-Lite0
    /// unless --backbone); with --peers, against PyTorch and ONNX Runtime in the same run.
    Bench(trainer::bench::BenchArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Run directory written by `trainer` (model.safetensors + config.json).
    #[arg(
        long,
        required_unless_present = "pretrained_only",
        conflicts_with = "pretrained_only"
    )]
    model: Option<PathBuf>,
    /// Evaluate the bare pretrained backbone's pooled features instead of a checkpoint.
    #[arg(long)]
    pretrained_only: bool,
    /// Backbone for --pretrained-only.
    #[arg(long, value_enum, default_value = "efficientnet-lite0")]
    backbone: BackboneKind,
    /// Weights for --pretrained-only (default: $DEEP_METRIC_WEIGHTS, else the Hugging Face cache, else downloaded from the hub into it (efficientnet-lite0: timm/tf_efficientnet_lite0.in1k; resnet18/50: timm/resnet*.a1_in1k; dinov2-vits14/vitb14: timm/vit_{small,base}_patch14_dinov2.lvd142m; clip-vitb16: openai/clip-vit-base-patch16; bn-inception has no hub repo and needs this flag).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// With --pretrained-only: square input size (a checkpoint keeps the size it was trained at).
    #[arg(long, requires = "pretrained_only", value_parser = clap::value_parser!(u32).range(32..=1024))]
    image_size: Option<u32>,
    /// Also embed at these square sizes (comma-separated px) and sum the normalised vectors
    /// (multi-scale embedding; see `trainer train --extra-sizes`), in place of the sizes the
    /// checkpoint records; `0` = the main size only.
    #[arg(long, value_delimiter = ',', value_parser = trainer::train::parse_extra_size)]
    extra_sizes: Option<Vec<u32>>,
    #[arg(long, value_enum, default_value = "cub")]
    dataset: DatasetKind,
    #[arg(long)]
    data: PathBuf,
    /// `test` (paper protocol), `train`, `all` or `classes=A-B`.
    #[arg(long, default_value = "test")]
    split: String,
    /// Also write the metrics JSON here (with --model they are appended to RUN/metrics.jsonl too).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seed for k-means (NMI).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    skip_bad_images: bool,
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    device: DeviceArgs,
}

fn set_threads(n: Option<usize>) {
    if let Some(n) = n {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

fn eval(a: EvalArgs) -> Result<()> {
    set_threads(a.threads);
    let spec = match &a.model {
        Some(dir) => ModelSpec::Run(dir.clone()),
        None => ModelSpec::Pretrained {
            backbone: a.backbone,
            weights: a.weights.clone(),
        },
    };
    let device = a.device.open()?;
    let mut embedder = Embedder::load(&spec, &device).context("loading the model")?;
    if let Some(size) = a.image_size {
        embedder = embedder.with_image_size(size);
    }
    if let Some(sizes) = a.extra_sizes.clone() {
        embedder = embedder.with_extra_sizes(sizes);
    }
    let split: data::SplitSpec = a.split.parse().map_err(anyhow::Error::msg)?;
    let set = data::load_dataset(a.dataset, &a.data, &split)?;
    eprintln!(
        "evaluating {} images of {} classes",
        set.samples.len(),
        set.class_names.len()
    );
    let emb = embedder.embed_dataset(&set, a.skip_bad_images, true)?;
    let ks = trainer::metrics::default_ks(a.dataset == DatasetKind::Sop);
    let m = trainer::metrics::evaluate(&emb.data, emb.dim, &emb.labels, ks, a.seed)?;
    println!("{}", m.table());
    if let Some(dir) = &a.model {
        // A run records its pretrained baseline (same split, same image size) at epoch 0.
        let (baseline, _) =
            trainer::curves::points(&train::read_jsonl(&dir.join(train::METRICS_FILE)));
        let r1 = m.recall.first().map(|&(_, r)| r);
        if let Some(line) = train::versus_baseline(r1, baseline) {
            println!("{line}");
        }
    }
    let mut line = serde_json::Map::new();
    line.insert("epoch".into(), embedder.config().epoch.into());
    line.insert(
        "model".into(),
        serde_json::json!(a
            .model
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("pretrained:{}", a.backbone))),
    );
    line.extend(m.to_json());
    line.insert("images".into(), emb.labels.len().into());
    line.insert(
        "embed_images_per_sec".into(),
        (emb.labels.len() as f64 / emb.seconds).into(),
    );
    let value = serde_json::Value::Object(line);
    println!("{value}");
    if let Some(dir) = &a.model {
        train::append_jsonl(&dir.join(train::METRICS_FILE), &value)?;
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&value)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !emb.skipped.is_empty() {
        eprintln!(
            "skipped {} unreadable image(s); first: {}",
            emb.skipped.len(),
            emb.skipped[0]
        );
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train {
            args,
            resume,
            threads,
            device,
            precision,
        } => {
            set_threads(threads);
            let device = device.open()?;
            precision.check(&device)?;
            let s = train::train(args, resume, &device)?;
            eprintln!("done: {} epochs", s.epochs_done);
            Ok(())
        }
        Cmd::Eval(a) => eval(a),
        Cmd::Bench(a) => {
            let device = a.device.open()?;
            a.precision.check(&device)?;
            Ok(trainer::bench::run(&a, &device)?)
        }
        Cmd::Stages { backbone } => {
            // The architecture alone names the stages: no weights needed (zeros stand in).
            let vb =
                candle_nn::VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
            let net = trainer::backbone::build(backbone, vb)?;
            for (i, name) in net.stage_names().iter().enumerate() {
                println!("{i:>3}  {name}");
            }
            println!(
                "{:>3}  (everything frozen but the embedding head)",
                net.num_stages()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Keep freed activation buffers in the heap instead of faulting fresh pages per op.
    trainer::ops::tune_glibc_malloc();
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `trainer --loss fuzzy …` means `trainer train --loss fuzzy …`.
    if argv
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| a.starts_with("--") && !matches!(a, "--help" | "--version"))
    {
        argv.insert(1, "train".into());
    }
    let cli = Cli::parse_from(argv);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A device that cannot be used is a problem with the command line or the
            // machine, not a failure while running.
            ExitCode::from(if e.downcast_ref::<DeviceError>().is_some() {
                2
            } else {
                1
            })
        }
    }
}
