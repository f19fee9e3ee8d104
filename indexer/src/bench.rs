//! The retrieval benchmark: the paper table computed exactly and through the HNSW index,
//! plus the index's costs (build time, bytes on disk, query latency, QPS) and an ef sweep.
//!
//! It works on vectors and labels, so the same code serves `indexer bench` (embeddings of a
//! dataset split) and tests on synthetic vectors.

use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{Map, Value};
use trainer::error::{Error, Result};
use trainer::metrics::{evaluate, knn_exact, RetrievalMetrics};

use crate::{GalleryIndex, HnswParams, ModelIdentity, NewItem, StoreError};

/// The benchmark reports through trainer's error (its metrics come from there).
impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Invalid(e.to_string())
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub ks: Vec<usize>,
    pub params: HnswParams,
    /// Search width of the main HNSW table and of the latency figures.
    pub ef: usize,
    /// Search widths of the recall/QPS sweep.
    pub ef_sweep: Vec<usize>,
    /// k-means seed of NMI.
    pub seed: u64,
}

/// One point of the ef sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    pub ef: usize,
    /// Fraction of the exact top-10 (query excluded) found in the HNSW top-10.
    pub recall_at_10: f64,
    /// Single-thread queries per second.
    pub qps: f64,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub n: usize,
    pub dim: usize,
    pub classes: usize,
    pub params: HnswParams,
    pub ef: usize,
    pub exact: RetrievalMetrics,
    pub hnsw: RetrievalMetrics,
    /// Set by the caller when the vectors were embedded as part of the run.
    pub embed_images_per_second: Option<f64>,
    pub build_seconds: f64,
    pub commit_seconds: f64,
    pub index_bytes: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// Single-thread queries per second at `ef` (1 / mean latency).
    pub qps: f64,
    /// Queries per second with all cores searching concurrently.
    pub qps_parallel: f64,
    pub recall_of_exact_top10: f64,
    pub sweep: Vec<SweepPoint>,
}

/// Runs everything on `vectors` (row-major, unit rows) with `labels`; the index is built in
/// `index_dir` (must not hold an index) and kept there.
pub fn run(
    vectors: &[f32],
    dim: usize,
    labels: &[u32],
    identity: ModelIdentity,
    index_dir: &Path,
    cfg: &BenchConfig,
) -> Result<BenchReport> {
    let n = labels.len();
    if n < 2 || vectors.len() != n * dim {
        return Err(Error::Invalid(format!(
            "benchmark needs at least 2 labelled vectors of dim {dim}, got {n}"
        )));
    }
    let exact = evaluate(vectors, dim, labels, &cfg.ks, cfg.seed)?;

    let t = Instant::now();
    let mut index = GalleryIndex::create(index_dir, identity, dim, cfg.params)?;
    index.add(bench_items(vectors, dim, labels))?;
    let build_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    index.commit()?;
    let commit_seconds = t.elapsed().as_secs_f64();
    let index_bytes = index.disk_bytes();

    // Lists as long as the exact evaluation's: max K, or the largest R for MAP@R.
    let mut counts = std::collections::HashMap::new();
    for l in labels {
        *counts.entry(l).or_insert(0usize) += 1;
    }
    let max_r = counts.values().max().copied().unwrap_or(1) - 1;
    let k = cfg
        .ks
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(max_r)
        .min(n - 1);
    let lists: Vec<Vec<u32>> = (0..n)
        .into_par_iter()
        .map(|i| {
            neighbours_without_self(
                &index,
                &vectors[i * dim..(i + 1) * dim],
                i,
                k,
                cfg.ef.max(k + 1),
            )
        })
        .collect();
    let hnsw = RetrievalMetrics::from_neighbors(&lists, labels, &cfg.ks)?;

    let exact10 = knn_exact(vectors, dim, 10)?;
    let (latencies, recall_of_exact_top10) = timed_queries(&index, vectors, dim, &exact10, cfg.ef);
    let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
    let t = Instant::now();
    (0..n).into_par_iter().for_each(|i| {
        std::hint::black_box(index.search(&vectors[i * dim..(i + 1) * dim], 11, cfg.ef));
    });
    let qps_parallel = n as f64 / t.elapsed().as_secs_f64();
    let mut sweep = Vec::new();
    for &ef in &cfg.ef_sweep {
        let (lat, recall) = timed_queries(&index, vectors, dim, &exact10, ef);
        sweep.push(SweepPoint {
            ef,
            recall_at_10: recall,
            qps: lat.len() as f64 / lat.iter().sum::<f64>() * 1e3,
        });
    }
    Ok(BenchReport {
        n,
        dim,
        classes: counts.len(),
        params: cfg.params,
        ef: cfg.ef,
        exact,
        hnsw,
        embed_images_per_second: None,
        build_seconds,
        commit_seconds,
        index_bytes,
        latency_ms_p50: percentile(&latencies, 0.50),
        latency_ms_p99: percentile(&latencies, 0.99),
        qps: 1e3 / mean,
        qps_parallel,
        recall_of_exact_top10,
        sweep,
    })
}

/// HNSW top `k` of item `i`, the item itself removed (the protocol excludes the query).
fn neighbours_without_self(
    index: &GalleryIndex,
    q: &[f32],
    i: usize,
    k: usize,
    ef: usize,
) -> Vec<u32> {
    index
        .search(q, k + 1, ef)
        .into_iter()
        .map(|h| h.id as u32)
        .filter(|&j| j as usize != i)
        .take(k)
        .collect()
}

/// Per-query latency (ms, one thread, top-11 so 10 remain after dropping the query) and the
/// mean fraction of the exact top-10 found.
fn timed_queries(
    index: &GalleryIndex,
    vectors: &[f32],
    dim: usize,
    exact10: &[Vec<u32>],
    ef: usize,
) -> (Vec<f64>, f64) {
    let n = exact10.len();
    let mut lat = Vec::with_capacity(n);
    let mut found = 0usize;
    let mut wanted = 0usize;
    for (i, truth) in exact10.iter().enumerate() {
        let q = &vectors[i * dim..(i + 1) * dim];
        let t = Instant::now();
        let hits = index.search(q, 11, ef.max(11));
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let got: Vec<u32> = hits
            .iter()
            .map(|h| h.id as u32)
            .filter(|&j| j as usize != i)
            .take(10)
            .collect();
        found += truth.iter().filter(|t| got.contains(t)).count();
        wanted += truth.len();
    }
    (
        lat,
        if wanted == 0 {
            1.0
        } else {
            found as f64 / wanted as f64
        },
    )
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

impl BenchReport {
    /// Flat JSON with dotted keys: `exact.recall@1`, `hnsw.recall@1`, `nmi`, `map@r`, `qps`,
    /// `latency_ms_p50`, `build_seconds`, `sweep.ef64.recall@10`, …
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (prefix, metrics) in [("exact", &self.exact), ("hnsw", &self.hnsw)] {
            for (k, v) in metrics.to_json() {
                m.insert(format!("{prefix}.{k}"), v);
            }
        }
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("nmi", self.exact.nmi.map_or(Value::Null, Value::from));
        put("map@r", self.exact.map_at_r.into());
        put("r_precision", self.exact.r_precision.into());
        put("n", self.n.into());
        put("dim", self.dim.into());
        put("classes", self.classes.into());
        put("m", self.params.m.into());
        put("ef_construction", self.params.ef_construction.into());
        put("ef_search", self.ef.into());
        put(
            "embed_images_per_second",
            self.embed_images_per_second
                .map_or(Value::Null, Value::from),
        );
        put("build_seconds", self.build_seconds.into());
        put("commit_seconds", self.commit_seconds.into());
        put("index_bytes", self.index_bytes.into());
        put("latency_ms_p50", self.latency_ms_p50.into());
        put("latency_ms_p99", self.latency_ms_p99.into());
        put("qps", self.qps.into());
        put("qps_parallel", self.qps_parallel.into());
        put(
            "hnsw.recall_of_exact_top10",
            self.recall_of_exact_top10.into(),
        );
        for p in &self.sweep {
            put(
                &format!("sweep.ef{}.recall@10", p.ef),
                p.recall_at_10.into(),
            );
            put(&format!("sweep.ef{}.qps", p.ef), p.qps.into());
        }
        Value::Object(m)
    }

    /// The Markdown report printed on stdout.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "## Retrieval benchmark: {} items, {} classes, dim {}\n\n### Exact search (the papers' protocol)\n\n{}\n### HNSW (M = {}, ef_construction = {}, ef = {}; NMI needs no search)\n\n{}\n",
            self.n,
            self.classes,
            self.dim,
            self.exact.table(),
            self.params.m,
            self.params.ef_construction,
            self.ef,
            self.hnsw.table()
        );
        s += "### Costs\n\n| figure | value |\n|---|---:|\n";
        if let Some(ips) = self.embed_images_per_second {
            s += &format!("| embed throughput (img/s) | {ips:.1} |\n");
        }
        s += &format!(
            "| HNSW build (s) | {:.3} |\n| commit to disk (s) | {:.3} |\n| index on disk (MiB) | {:.2} |\n| query latency p50 / p99 (ms, 1 thread) | {:.3} / {:.3} |\n| QPS, 1 thread | {:.0} |\n| QPS, all cores | {:.0} |\n| HNSW recall of exact top-10 | {:.4} |\n\n",
            self.build_seconds,
            self.commit_seconds,
            self.index_bytes as f64 / (1 << 20) as f64,
            self.latency_ms_p50,
            self.latency_ms_p99,
            self.qps,
            self.qps_parallel,
            self.recall_of_exact_top10
        );
        if !self.sweep.is_empty() {
            s += "### ef sweep (recall of the exact top-10, single-thread QPS)\n\n| ef | recall@10 | QPS |\n|---:|---:|---:|\n";
            for p in &self.sweep {
                s += &format!("| {} | {:.4} | {:.0} |\n", p.ef, p.recall_at_10, p.qps);
            }
        }
        s
    }
}

/// A hand-written SVG of the recall/QPS curve (QPS on a log axis), one labelled point per ef.
pub fn sweep_svg(points: &[SweepPoint], title: &str) -> String {
    let (w, h, ml, mr, mt, mb) = (640.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let rmin = points
        .iter()
        .map(|p| p.recall_at_10)
        .fold(1.0f64, f64::min)
        .clamp(0.0, 0.9);
    let rmin = (rmin * 20.0).floor() / 20.0;
    let (qlo, qhi) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.qps), hi.max(p.qps))
    });
    let (llo, lhi) = if points.is_empty() {
        (0.0, 1.0)
    } else {
        (
            qlo.max(1e-9).log10().floor(),
            qhi.max(1e-9).log10().ceil().max(qlo.log10().floor() + 1.0),
        )
    };
    let x = |r: f64| ml + (r - rmin) / (1.0 - rmin).max(1e-9) * pw;
    let y = |q: f64| mt + ph - (q.max(1e-9).log10() - llo) / (lhi - llo) * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        xml_escape(title)
    );
    s += &format!("<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#444\"/>\n");
    let mut r = rmin;
    while r <= 1.0 + 1e-9 {
        s += &format!(
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\">{4:.2}</text>\n",
            x(r), mt, mt + ph, mt + ph + 16.0, r
        );
        r += if 1.0 - rmin > 0.3 { 0.1 } else { 0.05 };
    }
    let mut e = llo;
    while e <= lhi + 1e-9 {
        let q = 10f64.powf(e);
        s += &format!(
            "<line x1=\"{ml}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>\n",
            y(q), ml + pw, ml - 6.0, y(q) + 4.0, q
        );
        e += 1.0;
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">recall of the exact top-10</text>\n",
        ml + pw / 2.0,
        h - 10.0
    );
    s += &format!("<text transform=\"translate(16,{}) rotate(-90)\" text-anchor=\"middle\">queries per second (1 thread, log)</text>\n", mt + ph / 2.0);
    let path: Vec<String> = points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.recall_at_10), y(p.qps)))
        .collect();
    s += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n",
        path.join(" ")
    );
    for p in points {
        s += &format!(
            "<circle cx=\"{0:.1}\" cy=\"{1:.1}\" r=\"4\" fill=\"#1f77b4\"/><text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">ef {3}</text>\n",
            x(p.recall_at_10), y(p.qps), y(p.qps) - 8.0, p.ef
        );
    }
    s += "</svg>\n";
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The benchmark's rows as gallery items (a synthetic path and content key per row), the same
/// for every store so their figures compare.
pub(crate) fn bench_items(vectors: &[f32], dim: usize, labels: &[u32]) -> Vec<NewItem> {
    vectors
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, v)| NewItem {
            path: format!("#{i}"),
            label: Some(labels[i].to_string()),
            sha256: format!("row-{i}"),
            metadata: None,
            vector: v.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::clustered;

    #[test]
    fn report_has_the_documented_keys_and_sane_values() {
        let dim = 16;
        let (v, labels) = clustered(600, dim, 12, 0.8, 2);
        let dir = tempfile::tempdir().unwrap();
        let cfg = BenchConfig {
            ks: vec![1, 2, 4, 8],
            params: HnswParams::default(),
            ef: 64,
            ef_sweep: vec![16, 64],
            seed: 1,
        };
        let r = run(
            &v,
            dim,
            &labels,
            crate::gallery_tests::identity(dim),
            &dir.path().join("idx"),
            &cfg,
        )
        .unwrap();
        let j = r.to_json();
        for key in [
            "exact.recall@1",
            "exact.recall@8",
            "hnsw.recall@1",
            "nmi",
            "map@r",
            "r_precision",
            "qps",
            "latency_ms_p50",
            "latency_ms_p99",
            "build_seconds",
            "index_bytes",
            "hnsw.recall_of_exact_top10",
            "sweep.ef16.recall@10",
            "sweep.ef64.qps",
        ] {
            assert!(
                j.get(key).is_some_and(|v| v.is_number()),
                "missing or non-numeric {key}: {j}"
            );
        }
        // Exact and a good HNSW agree closely on well separated clusters.
        let e1 = j["exact.recall@1"].as_f64().unwrap();
        let h1 = j["hnsw.recall@1"].as_f64().unwrap();
        assert!(e1 > 0.5 && (e1 - h1).abs() < 0.05, "{e1} vs {h1}");
        assert!(r.recall_of_exact_top10 > 0.9);
        assert!(r.latency_ms_p50 <= r.latency_ms_p99);
        assert!(r.markdown().contains("| R@1 |"));
        let svg = sweep_svg(&r.sweep, "test <curve>");
        assert!(svg.starts_with("<svg") && svg.contains("ef 16") && svg.contains("&lt;curve&gt;"));
        assert!(GalleryIndex::open(&dir.path().join("idx")).unwrap().len() == 600);
    }
}
