//! Micro benchmark of the ops on EfficientNet-Lite0 / ResNet / BN-Inception layer shapes,
//! against the stock candle composition in [`super::stock`].
//!
//! Each row times one forward, or one forward + backward (gradients w.r.t. input and
//! weight through `Tensor::backward`). A slow first run (> 1 s) is reported as is; faster
//! ones are repeated and the fastest run is kept.

use super::{avg_pool2d, conv2d, depthwise_conv2d, max_pool2d, same_padding, stock, Pad4};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::time::Instant;

/// One benchmark line: milliseconds per call, stock candle vs this module.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// Layer and pass, e.g. `dw3x3/1 144x56x56 fwd+bwd`.
    pub name: String,
    /// Stock candle time, or `None` if stock was skipped or failed (see `stock_error`).
    pub stock_ms: Option<f64>,
    /// Why stock candle has no time (e.g. pooling backward is unsupported).
    pub stock_error: Option<String>,
    /// Time of this module's op.
    pub ours_ms: f64,
}

impl BenchRow {
    /// `stock / ours`, when both ran.
    pub fn speedup(&self) -> Option<f64> {
        self.stock_ms.map(|s| s / self.ours_ms)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Batch size of every shape (32 matches the peer figures).
    pub batch: usize,
    /// Maximum repetitions of a fast call.
    pub iters: usize,
    /// Also time stock candle (slow: its depthwise backward takes seconds per call).
    pub stock: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            batch: 32,
            iters: 5,
            stock: true,
        }
    }
}

/// Runs the default benchmark (batch 32, with stock candle) and prints the table.
pub fn run() -> Result<Vec<BenchRow>> {
    let rows = run_with(&BenchConfig::default())?;
    print!("{}", format_table(&rows));
    Ok(rows)
}

/// A plain-text table of the rows (name, stock ms, ours ms, speedup).
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = format!(
        "{:<40} {:>11} {:>11} {:>8}\n",
        "op", "stock ms", "ours ms", "speedup"
    );
    for r in rows {
        let stock = match (r.stock_ms, &r.stock_error) {
            (Some(ms), _) => format!("{ms:.2}"),
            (None, Some(_)) => "error".to_string(),
            (None, None) => "-".to_string(),
        };
        let speed = r
            .speedup()
            .map(|x| format!("{x:.1}x"))
            .unwrap_or_else(|| "-".into());
        s += &format!(
            "{:<40} {:>11} {:>11.2} {:>8}\n",
            r.name, stock, r.ours_ms, speed
        );
    }
    s
}

/// Milliseconds of the fastest of up to `iters` runs (one run if it takes over a second).
fn time_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    let mut best = t.elapsed().as_secs_f64() * 1e3;
    if best > 1000.0 {
        return Ok(best);
    }
    for _ in 1..iters.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?.to_dtype(DType::F32)
}

type ConvOp = fn(&Tensor, &Tensor, usize, Pad4) -> Result<Tensor>;
type PoolOp = fn(&Tensor, usize, usize, Pad4) -> Result<Tensor>;

fn same4(h: usize, k: usize, s: usize) -> Pad4 {
    let (a, b) = same_padding(h, k, s);
    [a, b, a, b]
}

fn conv_fwd_bwd(op: ConvOp, x: &Var, w: &Var, s: usize, pad: Pad4) -> Result<()> {
    let y = op(x.as_tensor(), w.as_tensor(), s, pad)?;
    let g = y.sum_all()?.backward()?;
    if g.get(x.as_tensor()).is_none() || g.get(w.as_tensor()).is_none() {
        candle_core::bail!("bench: missing gradient")
    }
    Ok(())
}

/// Times one conv layer (forward, then forward + backward) for both implementations.
#[allow(clippy::too_many_arguments)]
fn bench_conv(
    cfg: &BenchConfig,
    rows: &mut Vec<BenchRow>,
    label: &str,
    (ours, theirs): (ConvOp, ConvOp),
    xs: [usize; 4],
    ws: [usize; 4],
    s: usize,
    pad: Pad4,
) -> Result<()> {
    let x = Var::from_tensor(&randn(&xs)?)?;
    let w = Var::from_tensor(&(randn(&ws)? * 0.1)?)?;
    for bwd in [false, true] {
        let pass = if bwd { "fwd+bwd" } else { "fwd" };
        let run = |op: ConvOp| -> Result<f64> {
            time_ms(cfg.iters, || {
                if bwd {
                    conv_fwd_bwd(op, &x, &w, s, pad)
                } else {
                    op(x.as_tensor(), w.as_tensor(), s, pad).map(|_| ())
                }
            })
        };
        let ours_ms = run(ours)?;
        let (stock_ms, stock_error) = if cfg.stock {
            match run(theirs) {
                Ok(ms) => (Some(ms), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        rows.push(BenchRow {
            name: format!("{label} {pass}"),
            stock_ms,
            stock_error,
            ours_ms,
        });
    }
    Ok(())
}

/// Times one pooling layer (forward, then forward + backward) for both implementations.
fn bench_pool(
    cfg: &BenchConfig,
    rows: &mut Vec<BenchRow>,
    label: &str,
    (ours, theirs): (PoolOp, PoolOp),
    xs: [usize; 4],
    (k, s): (usize, usize),
    pad: Pad4,
) -> Result<()> {
    let x = Var::from_tensor(&randn(&xs)?)?;
    for bwd in [false, true] {
        let pass = if bwd { "fwd+bwd" } else { "fwd" };
        let run = |op: PoolOp| -> Result<f64> {
            time_ms(cfg.iters, || {
                let y = op(x.as_tensor(), k, s, pad)?;
                if bwd {
                    y.sum_all()?.backward()?;
                }
                Ok(())
            })
        };
        let ours_ms = run(ours)?;
        let (stock_ms, stock_error) = if cfg.stock {
            match run(theirs) {
                Ok(ms) => (Some(ms), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        rows.push(BenchRow {
            name: format!("{label} {pass}"),
            stock_ms,
            stock_error,
            ours_ms,
        });
    }
    Ok(())
}

/// Runs every shape with the given configuration.
pub fn run_with(cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let b = cfg.batch;
    let mut rows = Vec::new();
    let dw = (depthwise_conv2d as ConvOp, stock::depthwise_conv2d as ConvOp);
    let dense = (conv2d as ConvOp, stock::conv2d as ConvOp);
    // EfficientNet-Lite0 depthwise layers (TF SAME padding).
    for (c, h, k, s) in [(144, 56, 3, 1), (96, 112, 3, 2), (240, 28, 5, 1), (144, 56, 5, 2)] {
        let label = format!("dw{k}x{k}/{s} {c}x{h}x{h}");
        let xs = [b, c, h, h];
        bench_conv(cfg, &mut rows, &label, dw, xs, [c, 1, k, k], s, same4(h, k, s))?;
    }
    // Dense convs: Lite0 1x1 projections/expansions and stem, ResNet 3x3.
    for (ci, co, h, k, s) in [
        (144, 24, 56, 1, 1),
        (24, 144, 56, 1, 1),
        (3, 32, 224, 3, 2),
        (64, 64, 56, 3, 1),
    ] {
        let label = format!("conv{k}x{k}/{s} {ci}->{co} {h}x{h}");
        let xs = [b, ci, h, h];
        bench_conv(cfg, &mut rows, &label, dense, xs, [co, ci, k, k], s, same4(h, k, s))?;
    }
    // ResNet stem max-pool, BN-Inception 3x3/1 average pool.
    let max = (max_pool2d as PoolOp, stock::max_pool2d as PoolOp);
    let avg = (avg_pool2d as PoolOp, stock::avg_pool2d as PoolOp);
    bench_pool(cfg, &mut rows, "maxpool3x3/2 64x112x112", max, [b, 64, 112, 112], (3, 2), [1; 4])?;
    bench_pool(cfg, &mut rows, "avgpool3x3/1 192x28x28", avg, [b, 192, 28, 28], (3, 1), [1; 4])?;
    Ok(rows)
}
