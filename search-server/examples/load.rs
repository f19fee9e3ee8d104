//! Load generator for a running search server: N concurrent clients post search queries for
//! T seconds, then it prints throughput, latency percentiles, errors and the server's peak
//! memory (VmHWM from /proc/PID/status, when the server runs on this machine).
//!
//! ```text
//! search-server --gallery DIR &               # or any running server
//! cargo run -p search-server --example load -- --addr 127.0.0.1:8080 \
//!     --clients 8 --seconds 20 --pid $(pgrep -n search-server) [--image q.jpg] [--k 10]
//! ```
//! See bench/load/README.md.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use search_server::client::Client;

#[derive(Parser, Debug)]
#[command(about = "Concurrent query load against a Deep Metric search server")]
struct Args {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Concurrent clients, each with its own keep-alive connection.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Warm-up before measuring (requests not counted), seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Query image files; default: 16 generated 320×240 images.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// Results per query.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// PID of the server, to report its peak RSS (VmHWM).
    #[arg(long)]
    pid: Option<u32>,
    /// Also print the summary as one JSON line.
    #[arg(long)]
    json: bool,
}

/// Generated queries: a coloured rectangle on a contrasting background, varied per index.
fn generated_queries() -> Vec<Vec<u8>> {
    (0..16u32)
        .map(|i| {
            let bg = image::Rgb([
                (i * 37 % 255) as u8,
                (i * 91 % 255) as u8,
                (i * 53 % 255) as u8,
            ]);
            let fg = image::Rgb([255 - bg.0[0], 255 - bg.0[1], 255 - bg.0[2]]);
            let img = image::RgbImage::from_fn(320, 240, |x, y| {
                if (60 + i * 5..200 + i * 3).contains(&x) && (40..180 - i * 2).contains(&y) {
                    fg
                } else {
                    bg
                }
            });
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Jpeg)
                .expect("encode query");
            out.into_inner()
        })
        .collect()
}

fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct ClientStats {
    latencies_ms: Vec<f64>,
    errors: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.seconds <= 0.0 {
        bail!("--clients and --seconds must be positive");
    }
    let queries = if args.image.is_empty() {
        generated_queries()
    } else {
        args.image
            .iter()
            .map(|p| {
                std::fs::read(p).with_context(|| format!("cannot read query image {}", p.display()))
            })
            .collect::<Result<_>>()?
    };
    let queries = Arc::new(queries);
    let mut probe = Client::new(&args.addr).with_context(|| format!("bad --addr {}", args.addr))?;
    let health = probe
        .get("/healthz")
        .with_context(|| format!("no server answering at {}", args.addr))?;
    println!("server: {}", health.text());

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let path = format!("/api/search?k={}", args.k);
    let handles: Vec<_> = (0..args.clients)
        .map(|c| {
            let (queries, measuring, stop, addr, path) = (
                queries.clone(),
                measuring.clone(),
                stop.clone(),
                args.addr.clone(),
                path.clone(),
            );
            std::thread::spawn(move || -> ClientStats {
                let mut stats = ClientStats {
                    latencies_ms: Vec::new(),
                    errors: Vec::new(),
                };
                let mut client = match Client::new(&addr) {
                    Ok(c) => c,
                    Err(e) => {
                        stats.errors.push(e.to_string());
                        return stats;
                    }
                };
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let q = &queries[i % queries.len()];
                    i += 1;
                    let t = Instant::now();
                    let r = client.post_image(&path, q);
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    match r {
                        Ok(r) if r.status == 200 => stats.latencies_ms.push(ms),
                        Ok(r) => stats
                            .errors
                            .push(format!("HTTP {}: {}", r.status, r.text())),
                        Err(e) => stats.errors.push(e.to_string()),
                    }
                }
                stats
            })
        })
        .collect();

    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);

    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        lat.extend(s.latencies_ms);
        errors.extend(s.errors);
    }
    lat.sort_by(f64::total_cmp);
    let qps = lat.len() as f64 / elapsed;
    let (p50, p90, p99) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
    );
    let max = lat.last().copied().unwrap_or(f64::NAN);
    println!(
        "clients {}  duration {:.1}s  ok {}  errors {}  QPS {:.1}",
        args.clients,
        elapsed,
        lat.len(),
        errors.len(),
        qps
    );
    println!("latency ms: p50 {p50:.1}  p90 {p90:.1}  p99 {p99:.1}  max {max:.1}");
    if let Some(first) = errors.first() {
        println!("first error: {first}");
    }
    let (hwm, rss) = match args.pid {
        Some(pid) => (
            proc_status_kib(pid, "VmHWM:"),
            proc_status_kib(pid, "VmRSS:"),
        ),
        None => (None, None),
    };
    if let (Some(hwm), Some(rss)) = (hwm, rss) {
        println!(
            "server memory: peak RSS (VmHWM) {:.1} MiB, current RSS {:.1} MiB",
            hwm as f64 / 1024.0,
            rss as f64 / 1024.0
        );
    } else if let Some(pid) = args.pid {
        println!("server memory: cannot read /proc/{pid}/status (is the server on this machine?)");
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "clients": args.clients, "seconds": elapsed, "ok": lat.len(), "errors": errors.len(),
                "qps": qps, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": max,
                "server_vmhwm_kib": hwm, "server_vmrss_kib": rss,
            })
        );
    }
    Ok(())
}
