//! Micro benchmark of `trainer::ops` against stock candle on EfficientNet-Lite0 / ResNet /
//! BN-Inception layer shapes.
//!
//! `cargo run -p trainer --example ops_bench [-- BATCH] [--no-stock] [--filter=TEXT]` (default batch 32).

use trainer::ops::bench::{format_table, run_with, BenchConfig};

fn main() -> anyhow::Result<()> {
    let tuned = trainer::ops::tune_glibc_malloc();
    println!("glibc malloc tuned for reuse: {tuned}");
    let mut cfg = BenchConfig::default();
    for arg in std::env::args().skip(1) {
        if arg == "--no-stock" {
            cfg.stock = false;
        } else if let Some(f) = arg.strip_prefix("--filter=") {
            cfg.filter = Some(f.to_string());
        } else {
            cfg.batch = arg
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid batch size {arg:?}: {e}"))?;
        }
    }
    let rows = run_with(&cfg)?;
    print!("{}", format_table(&rows));
    Ok(())
}
