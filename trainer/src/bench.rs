//! `trainer bench`: end-to-end speed of a backbone (the real EfficientNet-Lite0 by default;
//! `--backbone` for the others, transformers included) — embedding at batch 1 and 32, one full
//! training step at batch 32 — and, with `--peers`, the same measurements from
//! PyTorch and ONNX Runtime (`bench/peers/*.py`) in the same invocation, so the ratios compare
//! runs made under the same machine load.
//!
//! Each phase runs in a child process (this binary, `bench --phase …`) so that its peak RSS
//! (`VmHWM`) is its own: the training phase's moments and gradients would otherwise hide the
//! embedding phases' footprint, and the allocator keeps freed memory (see
//! [`crate::ops::tune_glibc_malloc`]). The peers do the same per phase.
//!
//! Inputs are fixed pseudo-random tensors of the model's input size: the speed of a dense CNN
//! does not depend on pixel values, and it keeps JPEG decoding out of the figures. Times are
//! medians over `--iters` runs after one warm-up run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backbone::BackboneKind;
use crate::checkpoint::ModelIdentity;
use crate::device::{DeviceArgs, Precision};
use crate::embed::{Embedder, EmbeddingModel};
use crate::error::{Error, Result};
use crate::loss::{self, LossArgs, LossKind};
use crate::optim::{Adam, OptimizerKind, ParamGroup};

/// Classes × images per class of the synthetic training batch (P×K = 8 × 4 = 32).
const TRAIN_CLASSES: usize = 8;
/// Embedding size of the trained head (a linear layer on the pooled 1280-d features).
const TRAIN_EMBEDDING_DIM: usize = 512;
/// Learning rates of the benchmark's Adam (backbone, head); only the work matters, not the values.
const TRAIN_LR: (f64, f64) = (1e-4, 1e-3);

/// Command-line options of `trainer bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The network measured (the peers support efficientnet-lite0 and the transformers).
    #[arg(long, value_enum, default_value = "efficientnet-lite0")]
    pub backbone: BackboneKind,
    /// Its weights (default: $DEEP_METRIC_WEIGHTS, else the Hugging Face cache, else
    /// downloaded from the hub into it).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Threads for every engine (ours, PyTorch, ONNX Runtime); default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Batch of the throughput measurements (embedding and training).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Timed runs per phase after one warm-up (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Input side (the model's default is 224).
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Also print the per-op micro benchmark (`ops::bench`, ours only).
    #[arg(long)]
    pub ops: bool,
    /// Also run the PyTorch and ONNX Runtime peers (`bench/peers/*.py`) and print ratios.
    #[arg(long)]
    pub peers: bool,
    /// Directory of the peer scripts.
    #[arg(long, default_value = "bench/peers")]
    pub peers_dir: PathBuf,
    /// Python interpreter for the peers.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Write all figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Arithmetic precision of our phases (`bf16`: autocast with f32 master weights; see
    /// `trainer train --help`).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Internal: run one phase (`embed1`, `embed`, `train`) in this process and print its JSON.
    #[arg(long, hide = true)]
    pub phase: Option<String>,
}

/// Figures of one engine; `None` where the engine does not do that phase (ORT cannot train).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineFigures {
    pub engine: String,
    pub threads: usize,
    /// Milliseconds to embed one image (batch 1).
    pub latency_ms: Option<f64>,
    pub embed_img_s: Option<f64>,
    pub train_img_s: Option<f64>,
    /// Peak resident memory (MiB) of each phase's process.
    pub embed1_rss_mib: Option<f64>,
    pub embed_rss_mib: Option<f64>,
    pub train_rss_mib: Option<f64>,
}

/// Result of one phase run in a child process.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PhaseResult {
    phase: String,
    /// Median seconds per call.
    seconds: f64,
    batch: usize,
    rss_mib: f64,
}

/// Everything one `trainer bench` invocation measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// The backbone measured (reports written before it existed: EfficientNet-Lite0).
    #[serde(default = "lite0")]
    pub backbone: BackboneKind,
    pub batch: usize,
    pub size: usize,
    pub threads: usize,
    /// `/proc/loadavg` 1-minute figure before and after the measurements.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
    pub engines: Vec<EngineFigures>,
}

/// Peak resident set size of this process in MiB (`VmHWM`), if the platform reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The 1-minute load average (shared machines: the figures only compare at similar load).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Runs `f` once to warm up, then `iters` times; median seconds.
fn time_median(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// A deterministic normalised-image batch `[batch, 3, size, size]` with values in [-1, 1].
fn input_batch(batch: usize, size: usize, device: &Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let data: Vec<f32> = (0..batch * 3 * size * size)
        .map(|_| rng.gen_range(-1f32..1f32))
        .collect();
    Ok(Tensor::from_vec(data, (batch, 3, size, size), device)?)
}

fn lite0() -> BackboneKind {
    BackboneKind::EfficientnetLite0
}

fn weights_path(args: &BenchArgs) -> Result<PathBuf> {
    crate::weights::resolve_pretrained(args.backbone, args.weights.as_deref())
}

/// Embedding phase: the [`Embedder`]'s network path on a ready tensor.
fn run_embed(args: &BenchArgs, batch: usize, device: &Device) -> Result<f64> {
    let path = weights_path(args)?;
    let model = EmbeddingModel::pretrained(args.backbone, &path, None, device)?;
    let identity = ModelIdentity::new(&model.config, String::new());
    let embedder = Embedder::from_model(model, identity)?;
    let x = input_batch(batch, args.size, device)?;
    time_median(args.iters, || {
        let y = embedder.embed_tensor(&x)?;
        std::hint::black_box(y.to_vec2::<f32>()?);
        Ok(())
    })
}

/// Training phase: forward, metric loss, backward and an Adam update of every trainable
/// variable (all stages, frozen BN statistics, linear head).
fn run_train(args: &BenchArgs, device: &Device) -> Result<f64> {
    let path = weights_path(args)?;
    let batch = args.batch;
    if batch < 2 * TRAIN_CLASSES {
        return Err(Error::Invalid(format!(
            "--batch {batch} is too small for a training batch of {TRAIN_CLASSES} classes with 2+ images each"
        )));
    }
    let model =
        EmbeddingModel::pretrained(args.backbone, &path, Some(TRAIN_EMBEDDING_DIM), device)?;
    model.init_head_identity()?;
    let groups = {
        let data = model.varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let (mut bb, mut head) = (Vec::new(), Vec::new());
        for name in names
            .into_iter()
            .filter(|n| !crate::backbone::is_running_stat(n))
        {
            let entry = (name.clone(), data[name].clone());
            if name.starts_with(crate::embed::BACKBONE_PREFIX) {
                bb.push(entry);
            } else {
                head.push(entry);
            }
        }
        vec![
            ParamGroup {
                name: "backbone",
                vars: bb,
                lr: TRAIN_LR.0,
            },
            ParamGroup {
                name: "head",
                vars: head,
                lr: TRAIN_LR.1,
            },
        ]
    };
    let mut opt = Adam::new(OptimizerKind::Adam, groups, 0.0)?;
    let loss_fn = loss::build(LossKind::Fuzzy, &LossArgs::default(), None)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % TRAIN_CLASSES) as u32).collect();
    let x = input_batch(batch, args.size, device)?;
    time_median(args.iters, || {
        let emb = model.forward(&x)?;
        let out = loss_fn.forward(&emb, &labels)?;
        std::hint::black_box(out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let grads = out.loss.backward()?;
        opt.step(&grads, 1.0)?;
        // A GPU runs the update asynchronously: the step is done when its kernels are.
        Ok(device.synchronize()?)
    })
}

/// Runs one phase in this process and prints its [`PhaseResult`] as one JSON line.
fn run_phase(args: &BenchArgs, phase: &str, device: &Device) -> Result<()> {
    let (seconds, batch) = match phase {
        "embed1" => (run_embed(args, 1, device)?, 1),
        "embed" => (run_embed(args, args.batch, device)?, args.batch),
        "train" => (run_train(args, device)?, args.batch),
        other => {
            return Err(Error::Invalid(format!(
                "unknown bench phase '{other}' (embed1, embed, train)"
            )))
        }
    };
    let r = PhaseResult {
        phase: phase.to_string(),
        seconds,
        batch,
        rss_mib: peak_rss_mib().unwrap_or(f64::NAN),
    };
    println!(
        "{}",
        serde_json::to_string(&r).expect("phase result serialises")
    );
    Ok(())
}

/// Last line of `stdout` that parses as JSON of type `T` (children may log other lines).
fn last_json<T: for<'de> Deserialize<'de>>(stdout: &[u8]) -> Option<T> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
}

fn run_child(mut cmd: Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .map_err(|e| Error::Invalid(format!("cannot start {what}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Our figures, one child process per phase.
fn measure_ours(args: &BenchArgs, threads: usize, device: &Device) -> Result<EngineFigures> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Invalid(format!("cannot locate the trainer binary: {e}")))?;
    let choice = crate::device::DeviceChoice::of(device);
    let mut fig = EngineFigures {
        engine: if device.is_cpu() {
            "trainer (ours)".into()
        } else {
            format!("trainer (ours, {choice})")
        },
        threads,
        ..Default::default()
    };
    for phase in ["embed1", "embed", "train"] {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "--phase", phase, "--threads", &threads.to_string()])
            .args(["--backbone", args.backbone.name()])
            .args(["--device", &choice.to_string()])
            .args([
                "--batch",
                &args.batch.to_string(),
                "--iters",
                &args.iters.to_string(),
                "--size",
                &args.size.to_string(),
            ]);
        if let Some(w) = &args.weights {
            cmd.arg("--weights").arg(w);
        }
        let stdout = run_child(cmd, &format!("bench phase {phase}"))?;
        let r: PhaseResult = last_json(&stdout)
            .ok_or_else(|| Error::Invalid(format!("bench phase {phase} printed no result line")))?;
        eprintln!(
            "ours {phase}: {:.1} ms per batch of {}, peak RSS {:.0} MiB",
            r.seconds * 1e3,
            r.batch,
            r.rss_mib
        );
        let rate = r.batch as f64 / r.seconds;
        match phase {
            "embed1" => {
                fig.latency_ms = Some(r.seconds * 1e3);
                fig.embed1_rss_mib = Some(r.rss_mib);
            }
            "embed" => {
                fig.embed_img_s = Some(rate);
                fig.embed_rss_mib = Some(r.rss_mib);
            }
            _ => {
                fig.train_img_s = Some(rate);
                fig.train_rss_mib = Some(r.rss_mib);
            }
        }
    }
    Ok(fig)
}

/// Runs `bench/peers/SCRIPT` and reads its JSON line.
fn measure_peer(
    args: &BenchArgs,
    script: &str,
    weights: &Path,
    threads: usize,
) -> Result<EngineFigures> {
    let path = args.peers_dir.join(script);
    if !path.is_file() {
        return Err(Error::file(
            &path,
            "peer script not found (run from the repository root or pass --peers-dir)",
        ));
    }
    let mut cmd = Command::new(&args.python);
    cmd.arg(&path)
        .arg("--weights")
        .arg(weights)
        .args(["--backbone", args.backbone.name()])
        .args([
            "--threads",
            &threads.to_string(),
            "--batch",
            &args.batch.to_string(),
        ])
        .args([
            "--iters",
            &args.iters.to_string(),
            "--size",
            &args.size.to_string(),
        ])
        .env("OMP_NUM_THREADS", threads.to_string())
        .env("MKL_NUM_THREADS", threads.to_string());
    let stdout = run_child(cmd, &format!("{} {}", args.python, path.display()))?;
    let fig: EngineFigures = last_json(&stdout)
        .ok_or_else(|| Error::file(&path, "the peer printed no JSON result line"))?;
    eprintln!("{}: done", fig.engine);
    Ok(fig)
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "—".into())
}

/// The comparison table; ratios are ours ÷ peer for rates and peer ÷ ours for latency and
/// memory, so > 1 always means "ours is better".
pub fn format_report(r: &BenchReport) -> String {
    let mut s = format!(
        "{5} {0}×{0}, batch {1}, {2} thread(s), load average {3} → {4}\n",
        r.size,
        r.batch,
        r.threads,
        fmt_opt(r.load_before, 2),
        fmt_opt(r.load_after, 2),
        r.backbone
    );
    s += &format!(
        "{:<22} {:>11} {:>13} {:>13} {:>10} {:>10} {:>10}\n",
        "engine",
        "latency ms",
        "embed img/s",
        "train img/s",
        "RSS e1 MiB",
        "RSS e MiB",
        "RSS t MiB"
    );
    for e in &r.engines {
        s += &format!(
            "{:<22} {:>11} {:>13} {:>13} {:>10} {:>10} {:>10}\n",
            e.engine,
            fmt_opt(e.latency_ms, 1),
            fmt_opt(e.embed_img_s, 1),
            fmt_opt(e.train_img_s, 2),
            fmt_opt(e.embed1_rss_mib, 0),
            fmt_opt(e.embed_rss_mib, 0),
            fmt_opt(e.train_rss_mib, 0)
        );
    }
    let Some(ours) = r.engines.first() else {
        return s;
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    for peer in r.engines.iter().skip(1) {
        s += &format!(
            "ours vs {:<14} {:>11} {:>13} {:>13} {:>10} {:>10} {:>10}   (× better)\n",
            peer.engine,
            fmt_opt(ratio(peer.latency_ms, ours.latency_ms), 2),
            fmt_opt(ratio(ours.embed_img_s, peer.embed_img_s), 2),
            fmt_opt(ratio(ours.train_img_s, peer.train_img_s), 2),
            fmt_opt(ratio(peer.embed1_rss_mib, ours.embed1_rss_mib), 2),
            fmt_opt(ratio(peer.embed_rss_mib, ours.embed_rss_mib), 2),
            fmt_opt(ratio(peer.train_rss_mib, ours.train_rss_mib), 2)
        );
    }
    s
}

/// Entry point of `trainer bench`; our phases run on `device` (opened from `args.device`
/// by the caller, which reports a device error with its own exit status).
pub fn run(args: &BenchArgs, device: &Device) -> Result<()> {
    args.precision.check(device)?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if args.iters == 0 || args.batch == 0 || args.size < 32 {
        return Err(Error::Invalid(
            "--iters and --batch must be positive and --size at least 32".into(),
        ));
    }
    if let Some(phase) = &args.phase {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        return run_phase(args, phase, device);
    }
    if args.ops {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        let rows = crate::ops::bench::run_with(&crate::ops::bench::BenchConfig {
            stock: false,
            ..Default::default()
        })?;
        print!("{}", crate::ops::bench::format_table(&rows));
    }
    let weights = weights_path(args)?;
    let peer_backbones = [
        BackboneKind::EfficientnetLite0,
        BackboneKind::Dinov2Vits14,
        BackboneKind::Dinov2Vitb14,
        BackboneKind::ClipVitb16,
    ];
    if args.peers && !peer_backbones.contains(&args.backbone) {
        return Err(Error::Invalid(format!(
            "--peers: the peer scripts build efficientnet-lite0 and the transformers, not {}",
            args.backbone
        )));
    }
    let load_before = load_average();
    let mut engines = vec![measure_ours(args, threads, device)?];
    if args.peers {
        for script in ["bench_ort.py", "bench_torch.py"] {
            engines.push(measure_peer(args, script, &weights, threads)?);
        }
    }
    let report = BenchReport {
        backbone: args.backbone,
        batch: args.batch,
        size: args.size,
        threads,
        load_before,
        load_after: load_average(),
        engines,
    };
    print!("{}", format_report(&report));
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&report).expect("report serialises");
        std::fs::write(p, text).map_err(|e| Error::file(p, e))?;
    }
    Ok(())
}
