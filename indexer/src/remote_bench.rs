//! `indexer bench --store URL`: the benchmark's vectors loaded into a remote collection and
//! searched through the engine — exactly (index scans off) and through its HNSW indexes —
//! so the paper table and the costs can be read beside the embedded store's from the same
//! run. The collection is temporary and dropped at the end.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{Map, Value};
use trainer::checkpoint::ModelIdentity;
use trainer::metrics::{knn_exact, RetrievalMetrics};

use crate::bench::{BenchConfig, BenchReport};
use crate::remote::PgStore;

/// The remote store's figures.
#[derive(Debug, Clone)]
pub struct RemoteReport {
    /// `collection 'NAME' at HOST:PORT/DB`.
    pub store: String,
    pub shards: usize,
    /// Exact k-NN computed by the engine (sequential scan).
    pub exact: RetrievalMetrics,
    /// Through the engine's HNSW indexes at `ef`.
    pub hnsw: RetrievalMetrics,
    /// Load + index build, one transaction.
    pub build_seconds: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub qps: f64,
    pub qps_parallel: f64,
    pub recall_of_exact_top10: f64,
}

/// Drops the benchmark's collection however the run ends.
struct Temporary(String);

impl Drop for Temporary {
    fn drop(&mut self) {
        if let Err(e) = PgStore::drop_collection(&self.0) {
            eprintln!("warning: could not drop the benchmark collection: {e}");
        }
    }
}

/// `url` with a collection of the benchmark's own (unless the URL names one).
fn bench_url(url: &str) -> String {
    if url.contains("collection=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}collection=bench_{}", std::process::id())
}

/// Loads `vectors` (unit rows, labelled) into a temporary collection and measures it as
/// [`crate::bench::run`] measures the embedded index.
pub fn run(
    url: &str,
    vectors: &[f32],
    dim: usize,
    labels: &[u32],
    identity: ModelIdentity,
    cfg: &BenchConfig,
) -> Result<RemoteReport> {
    let url = bench_url(url);
    PgStore::check_new(&url)?;
    let n = labels.len();
    let items = crate::bench::bench_items(vectors, dim, labels);
    let t = Instant::now();
    let pool = rayon::current_num_threads().max(2) as u32;
    let (store, report) = PgStore::create(&url, identity, cfg.params, None, items, pool)?;
    let _drop = Temporary(url.clone());
    let build_seconds = t.elapsed().as_secs_f64();
    if report.added.len() != n {
        bail!("the engine stored {} of {n} vectors", report.added.len());
    }
    let row_of: HashMap<u64, u32> = report
        .added
        .iter()
        .enumerate()
        .map(|(row, &id)| (id, row as u32))
        .collect();

    let k = list_len(labels, &cfg.ks);
    let lists = |exact: bool, ef: usize| -> Result<Vec<Vec<u32>>> {
        (0..n)
            .into_par_iter()
            .map(|i| {
                let q = &vectors[i * dim..(i + 1) * dim];
                let hits = store.search(q, k + 1, ef, None, exact)?;
                Ok(hits
                    .iter()
                    .map(|(h, _)| row_of[&h.id])
                    .filter(|&j| j as usize != i)
                    .take(k)
                    .collect())
            })
            .collect()
    };
    eprintln!("remote store: exact k-NN of {n} queries through the engine");
    let exact = RetrievalMetrics::from_neighbors(&lists(true, k + 1)?, labels, &cfg.ks)?;
    eprintln!("remote store: HNSW k-NN of {n} queries through the engine");
    let hnsw =
        RetrievalMetrics::from_neighbors(&lists(false, cfg.ef.max(k + 1))?, labels, &cfg.ks)?;

    let exact10 = knn_exact(vectors, dim, 10)?;
    let mut lat = Vec::with_capacity(n);
    let (mut found, mut wanted) = (0usize, 0usize);
    for (i, truth) in exact10.iter().enumerate() {
        let q = &vectors[i * dim..(i + 1) * dim];
        let t = Instant::now();
        let hits = store.search(q, 11, cfg.ef.max(11), None, false)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let got: Vec<u32> = hits
            .iter()
            .map(|(h, _)| row_of[&h.id])
            .filter(|&j| j as usize != i)
            .take(10)
            .collect();
        found += truth.iter().filter(|t| got.contains(t)).count();
        wanted += truth.len();
    }
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    let t = Instant::now();
    (0..n)
        .into_par_iter()
        .try_for_each(|i| -> Result<()> {
            let q = &vectors[i * dim..(i + 1) * dim];
            std::hint::black_box(store.search(q, 11, cfg.ef, None, false)?);
            Ok(())
        })
        .context("parallel queries")?;
    let qps_parallel = n as f64 / t.elapsed().as_secs_f64();
    Ok(RemoteReport {
        store: store.describe(),
        shards: store.shards(),
        exact,
        hnsw,
        build_seconds,
        latency_ms_p50: percentile(&lat, 0.50),
        latency_ms_p99: percentile(&lat, 0.99),
        qps: 1e3 / mean,
        qps_parallel,
        recall_of_exact_top10: if wanted == 0 {
            1.0
        } else {
            found as f64 / wanted as f64
        },
    })
}

/// Neighbour lists as long as the exact evaluation's: max K, or the largest R for MAP@R.
fn list_len(labels: &[u32], ks: &[usize]) -> usize {
    let mut counts = HashMap::new();
    for l in labels {
        *counts.entry(l).or_insert(0usize) += 1;
    }
    let max_r = counts.values().max().copied().unwrap_or(1) - 1;
    ks.iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(max_r)
        .min(labels.len() - 1)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn recall_at(m: &RetrievalMetrics, k: usize) -> Option<f64> {
    m.recall.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r)
}

impl RemoteReport {
    /// Whether the engine's exact Recall@K equal the embedded store's (the same vectors
    /// must give the same neighbours, up to ties).
    pub fn exact_matches(&self, embedded: &BenchReport) -> bool {
        self.exact
            .recall
            .iter()
            .zip(&embedded.exact.recall)
            .all(|((ka, a), (kb, b))| ka == kb && (a - b).abs() < 1e-9)
    }

    /// Flat JSON keys under `remote.`.
    pub fn to_json(&self, embedded: &BenchReport) -> Map<String, Value> {
        let mut m = Map::new();
        for (prefix, metrics) in [("remote.exact", &self.exact), ("remote.hnsw", &self.hnsw)] {
            for (k, v) in metrics.to_json() {
                m.insert(format!("{prefix}.{k}"), v);
            }
        }
        let mut put = |k: &str, v: Value| {
            m.insert(format!("remote.{k}"), v);
        };
        put("store", self.store.clone().into());
        put("shards", self.shards.into());
        put("build_seconds", self.build_seconds.into());
        put("latency_ms_p50", self.latency_ms_p50.into());
        put("latency_ms_p99", self.latency_ms_p99.into());
        put("qps", self.qps.into());
        put("qps_parallel", self.qps_parallel.into());
        put(
            "hnsw.recall_of_exact_top10",
            self.recall_of_exact_top10.into(),
        );
        put(
            "exact_matches_embedded",
            self.exact_matches(embedded).into(),
        );
        m
    }

    /// The side-by-side table printed after the embedded report.
    pub fn markdown(&self, embedded: &BenchReport) -> String {
        let r1 = |m: &RetrievalMetrics| {
            recall_at(m, 1).map_or("-".into(), |r| format!("{:.2}", 100.0 * r))
        };
        format!(
            "### Embedded store vs remote store ({}, {} hash partitions)\n\n\
             | store | exact R@1 | HNSW R@1 | recall of exact top-10 | build (s) | p50 / p99 (ms) | QPS, 1 thread | QPS, all cores |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n\
             | embedded | {} | {} | {:.4} | {:.2} | {:.3} / {:.3} | {:.0} | {:.0} |\n\
             | remote | {} | {} | {:.4} | {:.2} | {:.3} / {:.3} | {:.0} | {:.0} |\n\n\
             Exact Recall@K through the engine {} the embedded store's.\n",
            self.store,
            self.shards,
            r1(&embedded.exact),
            r1(&embedded.hnsw),
            embedded.recall_of_exact_top10,
            embedded.build_seconds + embedded.commit_seconds,
            embedded.latency_ms_p50,
            embedded.latency_ms_p99,
            embedded.qps,
            embedded.qps_parallel,
            r1(&self.exact),
            r1(&self.hnsw),
            self.recall_of_exact_top10,
            self.build_seconds,
            self.latency_ms_p50,
            self.latency_ms_p99,
            self.qps,
            self.qps_parallel,
            if self.exact_matches(embedded) {
                "equals"
            } else {
                "DIFFERS FROM"
            }
        )
    }
}
