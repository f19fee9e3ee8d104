//! A flat, cache-friendly copy of an hnsw_rs graph, for searching — the graph of indexes
//! written before format version 4 (newer ones build a [`crate::layered::LayeredGraph`],
//! which links this way at insertion).
//!
//! hnsw_rs builds and persists the graph well, but its search pays for its concurrent,
//! insert-ready layout on every step: a SipHash map of visited points, an `Arc` allocation
//! per candidate, a lock per expanded node. This copy searches the same graph from plain
//! arrays (layer-0 neighbour lists as fixed-stride `u32` rows, the gallery's own contiguous
//! vectors, a visited list cleared by bumping a stamp): Malkov & Yashunin's Algorithm 2 with
//! the greedy descent through the upper layers.
//!
//! Its layer-0 lists are also *rebuilt the way hnswlib keeps them*. hnsw_rs applies the
//! paper's neighbour-selection heuristic (keep a candidate only if it is closer to the node
//! than to every neighbour already kept) to a new point's own list, but fills its
//! neighbours' reverse lists up to 2·M by distance alone: every node ends with the full 32
//! links, mostly short ones, and as the graph grows the long links made early are pushed out,
//! so whole regions lose their ways in (on 1M × 512-d vectors its search needs ef 1024 for
//! recall@10 0.95, hnswlib's ef 256). Here each node's list is re-selected with the heuristic
//! from hnsw_rs's list plus its layer-1 list (longer links), and then every link gets its
//! reverse link, appended while the row has room and heuristic-shrunk when it is full, as
//! hnswlib does; see `bench/RESULTS-indexer.md` for the effect on QPS at equal recall.
//!
//! The copy is derived data. [`FlatGraph::refresh`] brings it up to date after inserts in
//! one pass over hnsw_rs's lists, re-selecting only the nodes whose list changed (a hash of
//! each node's raw list is kept for that, and the reverse links a row already holds stay
//! candidates), so a single insert costs a walk over the graph and a few dozen small prunes.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};

use hnsw_rs::prelude::Hnsw;
use rayon::prelude::*;

use crate::distance::{squared_l2, UnitL2};
use crate::vectors::Rows;

/// Neighbour lists of every node, layer 0 (pruned) and the upper layers (as hnsw_rs has them).
#[derive(Debug, Clone, Default)]
pub struct FlatGraph {
    n: usize,
    /// Node the search starts from: one of the nodes of the highest layer.
    entry: u32,
    top_level: usize,
    /// Most links a layer-0 list holds (hnsw_rs: 2·M).
    stride: usize,
    /// Layer 0: node v's row `links0[v*(stride+1)..]` is `[count, ids…]`.
    links0: Vec<u32>,
    /// Hash of node v's raw hnsw_rs layer-0 list, to find the lists an insert changed.
    raw_hash: Vec<u64>,
    /// Layers ≥ 1 of the nodes that have them: `upper[&v][l - 1]` = v's list in layer l.
    upper: HashMap<u32, Vec<Vec<u32>>>,
}

/// One node's lists as read from hnsw_rs.
struct RawNode {
    id: u32,
    level: usize,
    /// Layer 0 ids, in hnsw_rs's order (by distance to the node).
    layer0: Vec<u32>,
    upper: Vec<Vec<u32>>,
}

impl FlatGraph {
    /// A copy of `hnsw`, whose points are the rows of `vectors` (`dim` values each, row i =
    /// id i). Returns `None` when the graph is empty or does not name its points 0..n
    /// exactly once (the gallery always does; such a graph is searched through hnsw_rs).
    pub fn from_hnsw(hnsw: &Hnsw<'_, f32, UnitL2>, vectors: Rows<'_>) -> Option<Self> {
        let mut g = Self::default();
        g.refresh(hnsw, vectors).then_some(g)
    }

    /// Brings the copy up to date with `hnsw` (which may only have grown since the last
    /// call). Returns false, leaving the copy unusable, if the graph is empty or malformed.
    pub fn refresh(&mut self, hnsw: &Hnsw<'_, f32, UnitL2>, vectors: Rows<'_>) -> bool {
        let ok = self.try_refresh(hnsw, vectors).is_some();
        if !ok {
            *self = Self::default();
        }
        ok
    }

    fn try_refresh(&mut self, hnsw: &Hnsw<'_, f32, UnitL2>, vectors: Rows<'_>) -> Option<()> {
        let n = hnsw.get_nb_point();
        if n == 0 || n < self.n || n >= u32::MAX as usize || vectors.len() < n {
            return None;
        }
        // One pass over hnsw_rs: every node's raw lists; keep those that are new or changed.
        let mut seen = vec![false; n];
        let mut entry: Option<(usize, u32)> = None;
        let mut stride = self.stride;
        let mut changed: Vec<RawNode> = Vec::new();
        let mut hashes = vec![0u64; n];
        for point in hnsw.get_point_indexation() {
            let id = point.get_origin_id();
            let level = point.get_point_id().0 as usize;
            if id >= n || std::mem::replace(&mut seen[id], true) {
                return None;
            }
            if entry.is_none_or(|(l, _)| level > l) {
                entry = Some((level, id as u32));
            }
            let mut layers = point.get_neighborhood_id().into_iter().take(level + 1);
            let layer0: Vec<u32> = layers
                .next()
                .unwrap_or_default()
                .iter()
                .map(|nb| nb.d_id as u32)
                .collect();
            if layer0.iter().any(|&nb| nb as usize >= n) {
                return None;
            }
            stride = stride.max(layer0.len());
            let mut h = std::collections::hash_map::DefaultHasher::new();
            layer0.hash(&mut h);
            hashes[id] = h.finish();
            let upper: Vec<Vec<u32>> = layers
                .map(|l| l.iter().map(|nb| nb.d_id as u32).collect())
                .collect();
            if id < self.n && self.raw_hash[id] == hashes[id] {
                // Layer 0 unchanged; upper lists are few and cheap, take them as they are.
                if level > 0 {
                    self.upper.insert(id as u32, upper);
                }
                continue;
            }
            changed.push(RawNode {
                id: id as u32,
                level,
                layer0,
                upper,
            });
        }
        let (top_level, entry) = entry?;
        if stride != self.stride {
            if self.n > 0 {
                // A list wider than the rows laid out so far: lay out every row again.
                return self.rebuild_with_stride(hnsw, vectors, stride);
            }
            self.stride = stride;
        }
        // Rows hold up to 2·M links (hnsw_rs's layer-0 width); a node's own list keeps at
        // least 3/8 of that (12 for M = 16), the reverse links fill the rest. Measured on
        // 100k clustered 128-d vectors with reverse links, keeping at least 0 / 8 / 12 / 20:
        // the same recall@10 (0.955 at ef 16) for up to 12, 20 adds links for little recall
        // (0.961) and costs 15 % QPS; on 1M × 512-d, 12 rather than 20 gave 1,468 vs 1,341 QPS
        // at recall ≥ 0.95.
        let min_keep = stride * 3 / 8;
        let row = stride + 1;
        self.links0.resize(n * row, 0);
        let pruned: Vec<Vec<u32>> = changed
            .par_iter()
            .map(|node| {
                // Candidates: hnsw_rs's list, the node's layer-1 list (longer links, made
                // while that layer was sparse) and the reverse links it already holds.
                let mut candidates = node.layer0.clone();
                candidates.extend(node.upper.first().into_iter().flatten());
                if (node.id as usize) < self.n {
                    candidates.extend_from_slice(self.neighbours0(node.id));
                }
                let mut list = prune(node.id, &candidates, min_keep, vectors);
                list.truncate(stride);
                list
            })
            .collect();
        let linked: Vec<u32> = changed.iter().map(|node| node.id).collect();
        for (node, list) in changed.into_iter().zip(pruned) {
            self.set_row(node.id, &list);
            if node.level > 0 {
                self.upper.insert(node.id, node.upper);
            }
        }
        self.n = n;
        self.entry = entry;
        self.top_level = top_level;
        self.raw_hash = hashes;
        self.link_back(&linked, vectors, min_keep);
        Some(())
    }

    /// Gives every link `v → u` of the nodes `from` its reverse `u → v`, the way hnswlib
    /// keeps them: appended while `u`'s row has room, otherwise `u`'s row and the newcomers
    /// are shrunk back to the row width with the heuristic.
    ///
    /// hnsw_rs fills reverse lists by distance alone, so as the graph grows the long links
    /// made early are replaced by short ones and regions of the graph lose their ways in.
    /// On 1M × 512-d clustered vectors this pass lifts recall@10 at ef 256 from 0.78 to 0.92
    /// (0.94 with the layer-1 candidates above); see `bench/RESULTS-indexer.md`.
    fn link_back(&mut self, from: &[u32], vectors: Rows<'_>, min_keep: usize) {
        let mut offers: HashMap<u32, Vec<u32>> = HashMap::new();
        for &v in from {
            for &u in self.neighbours0(v) {
                if !self.neighbours0(u).contains(&v) {
                    offers.entry(u).or_default().push(v);
                }
            }
        }
        let stride = self.stride;
        let rows: Vec<(u32, Vec<u32>)> = offers
            .into_par_iter()
            .map(|(u, newcomers)| {
                let mut list = self.neighbours0(u).to_vec();
                list.extend(newcomers);
                if list.len() > stride {
                    list = prune(u, &list, min_keep, vectors);
                    list.truncate(stride);
                }
                (u, list)
            })
            .collect();
        for (u, list) in rows {
            self.set_row(u, &list);
        }
    }

    /// Writes node `v`'s layer-0 row (`list.len()` ≤ stride).
    fn set_row(&mut self, v: u32, list: &[u32]) {
        let row = self.stride + 1;
        let slot = &mut self.links0[v as usize * row..(v as usize + 1) * row];
        slot.fill(0);
        slot[0] = list.len() as u32;
        slot[1..1 + list.len()].copy_from_slice(list);
    }

    fn rebuild_with_stride(
        &mut self,
        hnsw: &Hnsw<'_, f32, UnitL2>,
        vectors: Rows<'_>,
        stride: usize,
    ) -> Option<()> {
        *self = Self {
            stride,
            ..Self::default()
        };
        self.try_refresh(hnsw, vectors)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Mean number of layer-0 links per node (after pruning).
    pub fn mean_degree(&self) -> f64 {
        let row = self.stride + 1;
        let total: u64 = (0..self.n).map(|v| self.links0[v * row] as u64).sum();
        total as f64 / self.n.max(1) as f64
    }

    fn neighbours0(&self, v: u32) -> &[u32] {
        let start = v as usize * (self.stride + 1);
        let count = self.links0[start] as usize;
        &self.links0[start + 1..start + 1 + count]
    }

    /// Node v's neighbours in layer `level` ≥ 1 (empty above its own level).
    fn neighbours_upper(&self, v: u32, level: usize) -> &[u32] {
        self.upper
            .get(&v)
            .and_then(|lists| lists.get(level - 1))
            .map_or(&[], Vec::as_slice)
    }

    /// `(id, euclidean distance)` of up to `k` approximate nearest neighbours of `query`
    /// (nearest first), searching layer 0 with `ef` (≥ k) candidates. `vectors` holds the
    /// graph's points as rows of `query.len()` values, row i = node i.
    pub fn search(
        &self,
        vectors: Rows<'_>,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Vec<(usize, f32)> {
        self.search_with(vectors, query, k, ef, |_| true, false)
    }

    /// [`FlatGraph::search`] returning only nodes `accept` takes, walking through the others
    /// (they stay candidates, so a selective filter does not cut the graph into islands).
    /// As in hnswlib's filtered search, the beam only stops once it holds `ef` accepted
    /// nodes, so the more selective the filter, the further it walks.
    pub fn search_filtered(
        &self,
        vectors: Rows<'_>,
        query: &[f32],
        k: usize,
        ef: usize,
        accept: impl Fn(u32) -> bool,
    ) -> Vec<(usize, f32)> {
        self.search_with(vectors, query, k, ef, accept, true)
    }

    /// The beam search behind both: `filtered` false keeps the plain algorithm's stopping
    /// rule (stop at the first candidate farther than the worst result) exactly.
    fn search_with(
        &self,
        vectors: Rows<'_>,
        query: &[f32],
        k: usize,
        ef: usize,
        accept: impl Fn(u32) -> bool,
        filtered: bool,
    ) -> Vec<(usize, f32)> {
        let dim = query.len();
        if k == 0 || dim != vectors.dim() || vectors.len() < self.n {
            return Vec::new();
        }
        let row = |v: u32| vectors.row(v as usize);
        let dist = |v: u32| squared_l2(query, row(v));

        // Greedy descent through the upper layers to the node nearest the query.
        let mut cur = self.entry;
        let mut cur_d = dist(cur);
        for level in (1..=self.top_level).rev() {
            loop {
                let mut moved = false;
                for &nb in self.neighbours_upper(cur, level) {
                    let d = dist(nb);
                    if d < cur_d {
                        (cur, cur_d) = (nb, d);
                        moved = true;
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        // Beam search in layer 0.
        let ef = ef.max(k);
        SCRATCH.with(|scratch| {
            let mut guard = scratch.borrow_mut();
            let s = &mut *guard;
            s.reset(self.n);
            let mut candidates: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(ef * 4);
            let mut results: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef + 1);
            s.visit(cur);
            candidates.push(Reverse(Scored(cur_d, cur)));
            if accept(cur) {
                results.push(Scored(cur_d, cur));
            }
            while let Some(Reverse(Scored(c_d, c))) = candidates.pop() {
                let full = !filtered || results.len() >= ef;
                let worst = results.peek().map_or(f32::INFINITY, |w| w.0);
                if full && c_d > worst {
                    break;
                }
                // Unvisited neighbours first, their vectors prefetched, then the distances:
                // the loads of all of them overlap instead of missing the cache one by one.
                s.fresh.clear();
                for &nb in self.neighbours0(c) {
                    if s.visit(nb) {
                        prefetch(row(nb));
                        s.fresh.push(nb);
                    }
                }
                for &nb in &s.fresh {
                    let d = dist(nb);
                    let worst = results.peek().map_or(f32::INFINITY, |w| w.0);
                    if results.len() < ef || d < worst {
                        candidates.push(Reverse(Scored(d, nb)));
                        if accept(nb) {
                            results.push(Scored(d, nb));
                            if results.len() > ef {
                                results.pop();
                            }
                        }
                    }
                }
            }
            let mut out: Vec<(usize, f32)> = results
                .into_sorted_vec()
                .into_iter()
                .map(|Scored(d, v)| (v as usize, d.max(0.0).sqrt()))
                .collect();
            out.truncate(k);
            out
        })
    }
}

/// The neighbour-selection heuristic (Malkov & Yashunin, Algorithm 4; hnswlib's
/// `getNeighborsByHeuristic2`): walking the candidates nearest first, keep one only if it is
/// nearer to `v` than to every neighbour kept so far. Drops links that a kept neighbour
/// already covers, so the list stays short and spread out.
fn prune(v: u32, candidates: &[u32], min_keep: usize, vectors: Rows<'_>) -> Vec<u32> {
    let row = |u: u32| vectors.row(u as usize);
    let mut sorted: Vec<(f32, u32)> = candidates
        .iter()
        .filter(|&&c| c != v)
        .map(|&c| (squared_l2(row(v), row(c)), c))
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    sorted.dedup_by_key(|x| x.1);
    let mut kept: Vec<u32> = Vec::with_capacity(sorted.len());
    let mut pruned: Vec<u32> = Vec::new();
    for (d_cv, c) in sorted {
        if kept.iter().all(|&r| squared_l2(row(r), row(c)) >= d_cv) {
            kept.push(c);
        } else {
            pruned.push(c);
        }
    }
    // Top up with the nearest pruned candidates to `min_keep` links (hnsw_rs's keep_pruned,
    // with a smaller target): a few redundant short links cost little and keep recall.
    let top_up = min_keep.saturating_sub(kept.len()).min(pruned.len());
    kept.extend_from_slice(&pruned[..top_up]);
    kept
}

/// A node and its squared distance, ordered by distance (ties by id, so results are
/// deterministic).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scored(pub(crate) f32, pub(crate) u32);

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// Per-thread visited set: one bit per node, and the list of the nodes this search set, so
/// clearing costs what the search visited rather than a pass over n entries. A bit per node
/// (128 KiB at 1M nodes) stays in the L2 cache where a 4-byte stamp per node (4 MiB) did
/// not: at 1M nodes every visited-check of a stamp array missed to the last-level cache.
#[derive(Default)]
pub(crate) struct Scratch {
    bits: Vec<u64>,
    touched: Vec<u32>,
    /// Neighbours of the node being expanded that this search has not seen yet.
    pub(crate) fresh: Vec<u32>,
}

impl Scratch {
    pub(crate) fn reset(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if self.touched.len() >= words / 8 {
            self.bits.iter_mut().for_each(|w| *w = 0);
        } else {
            for &v in &self.touched {
                self.bits[(v >> 6) as usize] = 0;
            }
        }
        self.touched.clear();
        if self.bits.len() < words {
            self.bits.resize(words, 0);
        }
    }

    /// Marks v visited; false if it already was.
    #[inline]
    pub(crate) fn visit(&mut self, v: u32) -> bool {
        let (word, bit) = ((v >> 6) as usize, 1u64 << (v & 63));
        let w = &mut self.bits[word];
        if *w & bit != 0 {
            false
        } else {
            *w |= bit;
            self.touched.push(v);
            true
        }
    }
}

thread_local! {
    pub(crate) static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Asks the CPU to start loading `bytes` bytes at `p` (at most 8 cache lines). A raw pointer,
/// so rows of atomics that other threads may be writing can be prefetched without forming
/// a plain reference to them; a prefetch reads nothing architecturally.
#[inline(always)]
pub(crate) fn prefetch_ptr(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in 0..8.min(bytes.div_ceil(64)) {
            // SAFETY: a hint with no architectural effect, even for an invalid address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

/// Asks the CPU to start loading a vector we are about to read (up to its first 16 cache
/// lines, 1 KiB; the hardware prefetcher follows longer ones).
#[inline(always)]
pub(crate) fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = v.as_ptr() as *const i8;
        for line in 0..16.min(v.len().div_ceil(16)) {
            // SAFETY: prefetch is a hint with no architectural effect, and every address is
            // inside the slice (line * 16 < len).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(line * 64)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// [`prefetch`] for a row of bytes (up to its first 8 cache lines, 512 codes).
#[inline(always)]
pub(crate) fn prefetch_bytes(v: &[u8]) {
    prefetch_ptr(v.as_ptr(), v.len());
}

#[cfg(test)]
mod tests {
    use super::Scratch;
    use crate::gallery::exact_top_k;
    use crate::graph::Graph;
    use crate::params::HnswParams;
    use crate::synthetic::clustered;
    use crate::vectors::Rows;

    fn recall(got: &[(usize, f32)], want: &[u64]) -> f64 {
        got.iter()
            .filter(|(id, _)| want.contains(&(*id as u64)))
            .count() as f64
            / want.len() as f64
    }

    #[test]
    fn flat_search_matches_hnsw_rs_on_the_same_graph() {
        let (dim, n) = (24, 4000);
        let (vectors, _) = clustered(n + 200, dim, 40, 1.0, 7);
        let (base, queries) = vectors.split_at(n * dim);
        let params = HnswParams {
            m: 12,
            ef_construction: 64,
            ..HnswParams::default()
        };
        let g = Graph::build_hnsw_rs(&params, Rows::new(base, dim)).unwrap();
        assert!(g.is_flat());
        let (mut r_flat, mut r_rs, mut same_first) = (0.0, 0.0, 0);
        for q in queries.chunks_exact(dim) {
            let want: Vec<u64> = exact_top_k(Rows::new(base, dim), q, 10)
                .iter()
                .map(|h| h.id)
                .collect();
            let flat = g.search(Rows::new(base, dim), q, 10, 32);
            let rs = g.search_hnsw_rs(q, 10, 32).unwrap();
            assert_eq!(flat.len(), 10);
            assert!(
                flat.windows(2).all(|w| w[0].1 <= w[1].1),
                "sorted: {flat:?}"
            );
            // Distances are exact Euclidean distances of the returned ids.
            for &(id, d) in &flat {
                let exact = crate::distance::squared_l2(q, &base[id * dim..(id + 1) * dim]).sqrt();
                assert!((d - exact).abs() < 1e-5, "{d} vs {exact}");
            }
            r_flat += recall(&flat, &want);
            r_rs += recall(&rs, &want);
            same_first += usize::from(flat[0].0 == rs[0].0);
        }
        let q = (queries.len() / dim) as f64;
        let (r_flat, r_rs) = (r_flat / q, r_rs / q);
        assert!(r_flat > 0.9, "flat recall@10 {r_flat}");
        assert!(r_flat >= r_rs - 0.01, "flat {r_flat} vs hnsw_rs {r_rs}");
        assert!(
            same_first as f64 >= 0.97 * q,
            "same nearest: {same_first} of {q}"
        );
    }

    /// Mean recall@10 of `search` at ef 32 over `queries`.
    fn mean_recall(
        base: &[f32],
        queries: &[f32],
        dim: usize,
        search: impl Fn(&[f32]) -> Vec<(usize, f32)>,
    ) -> f64 {
        let q = queries.chunks_exact(dim);
        let n = q.len() as f64;
        q.map(|q| {
            let want: Vec<u64> = exact_top_k(Rows::new(base, dim), q, 10)
                .iter()
                .map(|h| h.id)
                .collect();
            recall(&search(q), &want)
        })
        .sum::<f64>()
            / n
    }

    #[test]
    fn incremental_refresh_is_well_formed_and_as_good_as_a_fresh_copy() {
        let dim = 16;
        let (vectors, _) = clustered(1600, dim, 20, 1.0, 11);
        let (base, queries) = vectors.split_at(1500 * dim);
        let params = HnswParams {
            m: 8,
            ef_construction: 48,
            ..HnswParams::default()
        };
        let mut g = Graph::build_hnsw_rs(&params, Rows::new(&base[..1000 * dim], dim)).unwrap();
        // Single inserts (each refreshes incrementally), then a batch.
        for i in 1000..1040 {
            g.insert_rows(Rows::new(&base[..(i + 1) * dim], dim), i);
        }
        g.insert_rows(Rows::new(base, dim), 1040);
        let incremental = g.flat_copy().expect("flat copy").clone();
        let fresh = super::FlatGraph::from_hnsw(g.hnsw().unwrap(), Rows::new(base, dim)).unwrap();
        assert_eq!(incremental.n, 1500);
        assert_eq!(incremental.stride, 16, "hnsw_rs's layer 0 holds 2·M");
        for copy in [&incremental, &fresh] {
            for v in 0..1500u32 {
                let row = copy.neighbours0(v);
                let mut sorted = row.to_vec();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(
                    sorted.len(),
                    row.len(),
                    "duplicate link in row {v}: {row:?}"
                );
                assert!(row.iter().all(|&u| u != v && u < 1500), "row {v}: {row:?}");
            }
        }
        assert!(incremental.upper == fresh.upper, "upper layers differ");
        assert_eq!(
            (incremental.entry, incremental.top_level),
            (fresh.entry, fresh.top_level)
        );
        // The heuristic keeps rows below hnsw_rs's full 2·M even with the reverse links.
        let degree = fresh.mean_degree();
        assert!(degree > 4.0 && degree < 15.0, "mean degree {degree}");
        let r_inc = mean_recall(base, queries, dim, |q| {
            incremental.search(Rows::new(base, dim), q, 10, 32)
        });
        let r_fresh = mean_recall(base, queries, dim, |q| {
            fresh.search(Rows::new(base, dim), q, 10, 32)
        });
        assert!(r_fresh > 0.9, "fresh copy recall@10 {r_fresh}");
        assert!(
            r_inc > r_fresh - 0.02,
            "incremental {r_inc} vs fresh {r_fresh}"
        );
    }

    #[test]
    fn links_get_reverse_links_and_full_rows_shrink_by_the_heuristic() {
        // Points on a line: 0, 1, 2 close together, 3 far away. Rows hold 2 links.
        let vectors = [0.0f32, 1.0, 2.0, 10.0];
        let mut g = super::FlatGraph {
            n: 4,
            stride: 2,
            links0: vec![0; 4 * 3],
            raw_hash: vec![0; 4],
            ..Default::default()
        };
        g.set_row(0, &[1, 2]);
        g.set_row(2, &[3]);
        g.link_back(&[0], Rows::new(&vectors, 1), 0);
        // Rows with room take the reverse link as it is.
        assert_eq!(g.neighbours0(1), &[0]);
        assert_eq!(g.neighbours0(2), &[3, 0]);
        // Node 2's row is full: the newcomer 1 and the row are shrunk with the heuristic;
        // 0 is dropped (nearer to the kept 1 than to 2), the long link to 3 stays.
        g.set_row(3, &[2]);
        g.set_row(1, &[2]);
        g.link_back(&[1], Rows::new(&vectors, 1), 0);
        assert_eq!(g.neighbours0(2), &[1, 3]);
        // An existing link is not offered twice.
        g.link_back(&[3], Rows::new(&vectors, 1), 0);
        assert_eq!(g.neighbours0(2), &[1, 3]);
    }

    #[test]
    fn inserts_keep_the_flat_copy_in_step() {
        let dim = 8;
        let (vectors, _) = clustered(300, dim, 5, 1.0, 3);
        let params = HnswParams::default();
        let mut g = Graph::build_hnsw_rs(&params, Rows::new(&vectors[..200 * dim], dim)).unwrap();
        // One by one (serial inserts) and then a batch: each new point is found at once.
        for i in 200..210 {
            g.insert_rows(Rows::new(&vectors[..(i + 1) * dim], dim), i);
            assert!(g.is_flat());
            let hit = g.search(
                Rows::new(&vectors, dim),
                &vectors[i * dim..(i + 1) * dim],
                1,
                16,
            );
            assert_eq!(hit[0].0, i);
        }
        g.insert_rows(Rows::new(&vectors, dim), 210);
        for i in [210, 255, 299] {
            let hit = g.search(
                Rows::new(&vectors, dim),
                &vectors[i * dim..(i + 1) * dim],
                1,
                16,
            );
            assert_eq!(hit[0].0, i, "point {i}");
        }
        // k larger than the graph: every point, nearest first.
        let all = g.search(Rows::new(&vectors, dim), &vectors[..dim], 1000, 16);
        assert_eq!(all.len(), 300);
        assert_eq!(all[0].0, 0);
    }

    #[test]
    fn the_visited_set_forgets_between_searches_by_either_clearing_path() {
        let mut s = Scratch::default();
        // Few visits in a large set: cleared through the touched list; many in a small
        // one: cleared whole. Then a larger n than before.
        for (n, visits) in [(10_000, 5), (100, 90), (100, 3), (70_000, 40)] {
            s.reset(n);
            let ids: Vec<u32> = (0..visits).map(|i| (i * 97 % n) as u32).collect();
            for &v in &ids {
                assert!(s.visit(v), "n={n}: {v} fresh after reset");
                assert!(!s.visit(v), "n={n}: {v} seen twice");
            }
            s.reset(n);
            for &v in &ids {
                assert!(s.visit(v), "n={n}: {v} not forgotten");
            }
            s.reset(n);
        }
    }
}
