//! The layered graph this crate builds itself: hnswlib's insertion, parallel, on flat rows.
//!
//! hnsw_rs's graph levels off at recall@10 0.966 on 1M × 512-d vectors however large `ef` is
//! (hnswlib: 0.99 at ef 256), and re-linking its layer 0 afterwards (see [`crate::flat`])
//! cannot restore the long links its insertion dropped: it fills a neighbour's reverse list
//! by distance alone, so early long links are pushed out by later short ones. Its insertion
//! is also 2–3× slower than hnswlib's (a SipHash visited map, an `Arc` per candidate).
//! So new indexes link every layer at insertion the way hnswlib does:
//!
//! * a new node's neighbours are chosen from the `ef_construction` beam with the neighbour
//!   heuristic (keep a candidate only if it is nearer to the node than to every one kept),
//!   M of them;
//! * every chosen neighbour gets the reverse link, appended while its row has room (2·M in
//!   layer 0, M above) and otherwise the row plus the newcomer shrunk with the same heuristic
//!   — the step that keeps long links alive.
//!
//! Rows are fixed-stride `[count, ids…]` arrays of atomics: a search reads them without a
//! lock (a row being rewritten may be seen half old, half new; every id in it is a valid
//! node, as in hnswlib), a writer holds the row owner's lock. Levels are drawn from the node
//! id, so a build is reproducible up to the order parallel threads link in; the node of the
//! highest level is inserted first and stays the entry point, so the parallel phase needs no
//! global lock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapMut, UncheckedAdvice};
use parking_lot::Mutex;
use rayon::prelude::*;

use crate::distance::squared_l2;
use crate::flat::{prefetch, prefetch_bytes, prefetch_ptr, Scored, SCRATCH};
use crate::params::HnswParams;
use crate::quant::Int8Codes;
use crate::store::{Directory, FileEntry, Result, StoreError};
use crate::vectors::Rows;

/// No upper rows (a level-0 node).
const NONE: u32 = u32::MAX;
/// First bytes of a graph file; the digit is the file layout's version. Version 2 puts the
/// rows right after the header (4-byte aligned, so they are used in place from a map) and
/// the level bytes last; version 1 (levels first) is still read, onto the heap.
const MAGIC: &[u8; 8] = b"DMLAYER2";
const MAGIC_V1: &[u8; 8] = b"DMLAYER1";
/// Fixed header after the magic: m, max_layer, entry, top_level (u32), n, upper rows (u64).
const HEADER_LEN: usize = 8 + 4 * 4 + 2 * 8;
/// Nodes whose rows an open checks before dropping their pages again.
const CHECK_BLOCK: usize = 1 << 16;
/// Until the graph holds this many nodes, insertion is serial. Nodes linked at the same
/// time into a near-empty graph see few of each other and can be left reachable from
/// almost nowhere (a small index rebuilt at open once missed an exact match at ef 32);
/// serially the first thousand cost a fraction of a second and small builds are
/// reproducible.
const SERIAL_SEED: usize = 1024;

/// Fixed-stride rows of atomics: a prefix in a private (copy-on-write) map of the graph
/// file, the rest on the heap. Writing into a mapped row copies only its page into the
/// process; the file never changes.
#[derive(Default)]
struct Cells {
    /// Start of the mapped cells (null when none); the map is owned by the graph.
    mapped: Option<std::ptr::NonNull<AtomicU32>>,
    mapped_len: usize,
    tail: Vec<AtomicU32>,
}

// SAFETY: the mapped cells are atomics like the heap ones, in a map that lives as long as
// the graph holding these cells (see `LayeredGraph::map`).
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl Cells {
    fn heap(tail: Vec<AtomicU32>) -> Self {
        Self {
            mapped: None,
            mapped_len: 0,
            tail,
        }
    }

    fn mapped(&self) -> &[AtomicU32] {
        match self.mapped {
            // SAFETY: `mapped_len` cells from `ptr` lie in the owning graph's live map,
            // 4-byte aligned (page-aligned map, offsets in whole u32), and AtomicU32 has
            // u32's layout.
            Some(ptr) => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.mapped_len) },
            None => &[],
        }
    }

    fn len(&self) -> usize {
        self.mapped_len + self.tail.len()
    }

    /// Cells `at..at + len` (a row: never split between the map and the heap).
    #[inline]
    fn get(&self, at: usize, len: usize) -> &[AtomicU32] {
        if at < self.mapped_len {
            &self.mapped()[at..at + len]
        } else {
            &self.tail[at - self.mapped_len..at - self.mapped_len + len]
        }
    }

    fn resize(&mut self, len: usize) {
        self.tail
            .resize_with(len - self.mapped_len, || AtomicU32::new(0));
    }

    fn iter(&self) -> impl Iterator<Item = &AtomicU32> {
        self.mapped().iter().chain(&self.tail)
    }
}

/// A layered proximity graph over rows of a vector array (row i = node i).
pub struct LayeredGraph {
    m: usize,
    ef_construction: usize,
    max_layer: usize,
    n: usize,
    entry: u32,
    top_level: usize,
    levels: Vec<u8>,
    /// Layer 0: node v's row is `links0[v*(2m+1)..]` = `[count, ids…]`.
    links0: Cells,
    /// Row number in `upper` of node v's layer-1 row (its layer-l row is `+ l - 1`).
    upper_at: Vec<u32>,
    /// Layers ≥ 1: rows of `m + 1`.
    upper: Cells,
    /// Held while writing any of the node's rows.
    locks: Vec<Mutex<()>>,
    /// The graph file the mapped prefixes of `links0` and `upper` point into.
    map: Option<MmapMut>,
}

impl std::fmt::Debug for LayeredGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredGraph")
            .field("n", &self.n)
            .field("m", &self.m)
            .field("top_level", &self.top_level)
            .finish()
    }
}

/// The level a node gets: hnswlib's `-ln(U) / ln(M)`, with U drawn from the node id
/// (splitmix64), capped below `max_layer`.
fn draw_level(id: usize, m: usize, max_layer: usize) -> u8 {
    let mut z = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64; // (0, 1]
    let level = (-u.ln() / (m as f64).ln()).floor() as usize;
    level.min(max_layer - 1) as u8
}

impl LayeredGraph {
    /// An empty graph with `params` (validated by the caller).
    pub fn new(params: &HnswParams) -> Self {
        Self {
            m: params.m,
            ef_construction: params.ef_construction,
            max_layer: params.max_layer,
            n: 0,
            entry: 0,
            top_level: 0,
            levels: Vec::new(),
            links0: Cells::default(),
            upper_at: Vec::new(),
            upper: Cells::default(),
            locks: Vec::new(),
            map: None,
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn width0(&self) -> usize {
        2 * self.m
    }

    /// Node v's row in `level` (`[count, ids…]`); empty above the node's level.
    fn row(&self, v: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = self.width0() + 1;
            self.links0.get(v as usize * w, w)
        } else if level <= self.levels[v as usize] as usize {
            let r = self.upper_at[v as usize] as usize + level - 1;
            self.upper.get(r * (self.m + 1), self.m + 1)
        } else {
            &[]
        }
    }

    /// The ids of a row as it reads now (see the module note on concurrent writers).
    fn links(row: &[AtomicU32]) -> impl Iterator<Item = u32> + '_ {
        let count = row
            .first()
            .map_or(0, |c| c.load(Ordering::Acquire) as usize)
            .min(row.len().saturating_sub(1));
        row[1.min(row.len())..1 + count]
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
    }

    /// Replaces a row (the caller holds the owner's lock): ids first, then the count.
    fn write_row(row: &[AtomicU32], ids: &[u32]) {
        for (slot, &id) in row[1..].iter().zip(ids) {
            slot.store(id, Ordering::Relaxed);
        }
        row[0].store(ids.len() as u32, Ordering::Release);
    }

    /// Makes room for nodes up to `n` (levels drawn, rows empty).
    fn grow(&mut self, n: usize) {
        let w = self.width0() + 1;
        self.links0.resize(n * w);
        for id in self.levels.len()..n {
            let level = draw_level(id, self.m, self.max_layer);
            self.levels.push(level);
            if level == 0 {
                self.upper_at.push(NONE);
            } else {
                self.upper_at.push((self.upper.len() / (self.m + 1)) as u32);
                let cells = level as usize * (self.m + 1);
                self.upper.resize(self.upper.len() + cells);
            }
            self.locks.push(Mutex::new(()));
        }
    }

    /// Links the rows of `vectors` from `first_id` on into the graph, in parallel on all
    /// cores. `vectors` holds every point, old ones included.
    pub fn insert_rows(&mut self, vectors: Rows<'_>, first_id: usize) {
        let n = vectors.len();
        if n <= self.n || first_id != self.n {
            return;
        }
        self.grow(n);
        let mut order: Vec<u32> = (self.n as u32..n as u32).collect();
        let old_n = self.n;
        self.n = n;
        if old_n == 0 {
            // The node of the highest level first: the entry point from then on.
            let first = (0..order.len())
                .max_by_key(|&i| (self.levels[order[i] as usize], Reverse(i)))
                .expect("at least one new node");
            let entry = order.remove(first);
            self.entry = entry;
            self.top_level = self.levels[entry as usize] as usize;
        }
        // Nodes above the current top change the entry point: serially, before the rest.
        let (high, rest): (Vec<u32>, Vec<u32>) = order
            .into_iter()
            .partition(|&v| self.levels[v as usize] as usize > self.top_level);
        for v in high {
            self.insert(vectors, v);
            if self.levels[v as usize] as usize > self.top_level {
                self.entry = v;
                self.top_level = self.levels[v as usize] as usize;
            }
        }
        let serial = SERIAL_SEED.saturating_sub(old_n).min(rest.len());
        for &v in &rest[..serial] {
            self.insert(vectors, v);
        }
        rest[serial..]
            .par_iter()
            .for_each(|&v| self.insert(vectors, v));
    }

    /// Links node q (hnswlib's `addPoint`): greedy descent to its level, then in each of
    /// its layers a beam of `ef_construction`, the heuristic's M neighbours, reverse links.
    fn insert(&self, vectors: Rows<'_>, q: u32) {
        let vec_of = |v: u32| vectors.row(v as usize);
        let qv = vec_of(q);
        let dist = |v: u32| squared_l2(qv, vec_of(v));
        let fetch = |v: u32| prefetch(vec_of(v));
        let level = self.levels[q as usize] as usize;
        let (mut cur, mut cur_d) = (self.entry, dist(self.entry));
        for lc in (level + 1..=self.top_level).rev() {
            (cur, cur_d) = self.greedy(dist, cur, cur_d, lc);
        }
        for lc in (0..=level.min(self.top_level)).rev() {
            let mut beam = self.beam(
                dist,
                fetch,
                (cur_d, cur),
                self.ef_construction,
                lc,
                |_| true,
                false,
            );
            beam.retain(|s| s.1 != q);
            let chosen = self.select(vectors, &beam, self.m);
            {
                let _g = self.locks[q as usize].lock();
                let ids: Vec<u32> = chosen.iter().map(|s| s.1).collect();
                Self::write_row(self.row(q, lc), &ids);
            }
            let width = if lc == 0 { self.width0() } else { self.m };
            for &Scored(d, s) in &chosen {
                self.link(vectors, s, q, d, lc, width);
            }
            if let Some(&Scored(d, v)) = beam.first() {
                (cur, cur_d) = (v, d);
            }
        }
    }

    /// Gives `s` the link to `q` in `level` (distance `d`): appended while the row has
    /// room, else the row and `q` shrunk back to `width` with the heuristic.
    fn link(&self, vectors: Rows<'_>, s: u32, q: u32, d: f32, level: usize, width: usize) {
        let _g = self.locks[s as usize].lock();
        let row = self.row(s, level);
        let count = row[0].load(Ordering::Relaxed) as usize;
        if Self::links(row).any(|u| u == q) {
            return;
        }
        if count < width {
            row[1 + count].store(q, Ordering::Relaxed);
            row[0].store(count as u32 + 1, Ordering::Release);
            return;
        }
        let sv = vectors.row(s as usize);
        let mut cands: Vec<Scored> = Self::links(row)
            .map(|u| Scored(squared_l2(sv, vectors.row(u as usize)), u))
            .collect();
        cands.push(Scored(d, q));
        cands.sort_unstable();
        let kept: Vec<u32> = self
            .select(vectors, &cands, width)
            .iter()
            .map(|s| s.1)
            .collect();
        Self::write_row(row, &kept);
    }

    /// The neighbour-selection heuristic (Malkov & Yashunin, Algorithm 4; hnswlib's
    /// `getNeighborsByHeuristic2`) over candidates sorted nearest first: keep one only if
    /// it is nearer to the base node than to every one kept, up to `max`.
    fn select(&self, vectors: Rows<'_>, sorted: &[Scored], max: usize) -> Vec<Scored> {
        let vec_of = |v: u32| vectors.row(v as usize);
        if sorted.len() <= max {
            return sorted.to_vec();
        }
        let mut kept: Vec<Scored> = Vec::with_capacity(max);
        for &c in sorted {
            if kept.len() >= max {
                break;
            }
            let cv = vec_of(c.1);
            if kept.iter().all(|k| squared_l2(vec_of(k.1), cv) >= c.0) {
                kept.push(c);
            }
        }
        kept
    }

    /// Greedy walk in `level` from `(cur, cur_d)` to a local minimum of `dist`.
    fn greedy(
        &self,
        dist: impl Fn(u32) -> f32,
        mut cur: u32,
        mut cur_d: f32,
        level: usize,
    ) -> (u32, f32) {
        loop {
            let mut moved = false;
            for nb in Self::links(self.row(cur, level)) {
                let d = dist(nb);
                if d < cur_d {
                    (cur, cur_d) = (nb, d);
                    moved = true;
                }
            }
            if !moved {
                return (cur, cur_d);
            }
        }
    }

    /// Beam search (Algorithm 2) in `level` from `start` by distance `dist` (`fetch`
    /// prefetches what `dist` will read), keeping `ef` results, nearest first. With
    /// `filtered`, only nodes `accept` takes are results, and the walk goes on until it
    /// holds `ef` of them (hnswlib's filtered search); other nodes stay candidates.
    #[allow(clippy::too_many_arguments)]
    fn beam(
        &self,
        dist: impl Fn(u32) -> f32,
        fetch: impl Fn(u32),
        start: (f32, u32),
        ef: usize,
        level: usize,
        accept: impl Fn(u32) -> bool,
        filtered: bool,
    ) -> Vec<Scored> {
        SCRATCH.with(|scratch| {
            let mut guard = scratch.borrow_mut();
            let s = &mut *guard;
            s.reset(self.n);
            let mut candidates: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(ef * 4);
            let mut results: BinaryHeap<Scored> = BinaryHeap::with_capacity(ef + 1);
            let (d0, v0) = start;
            s.visit(v0);
            candidates.push(Reverse(Scored(d0, v0)));
            if accept(v0) {
                results.push(Scored(d0, v0));
            }
            while let Some(Reverse(Scored(c_d, c))) = candidates.pop() {
                let full = !filtered || results.len() >= ef;
                let worst = results.peek().map_or(f32::INFINITY, |w| w.0);
                if full && c_d > worst {
                    break;
                }
                // The next candidate's row is a random read: start it now, while this
                // one's neighbours are scored.
                if let Some(Reverse(Scored(_, next))) = candidates.peek() {
                    let row = self.row(*next, level);
                    prefetch_ptr(row.as_ptr().cast(), std::mem::size_of_val(row));
                }
                s.fresh.clear();
                for nb in Self::links(self.row(c, level)) {
                    if s.visit(nb) {
                        fetch(nb);
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
            results.into_sorted_vec()
        })
    }

    /// `(id, euclidean distance)` of up to `k` approximate nearest neighbours of `query`
    /// (nearest first), with a layer-0 beam of `ef` (≥ k).
    pub fn search(
        &self,
        vectors: Rows<'_>,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Vec<(usize, f32)> {
        self.search_with(vectors, query, k, ef, |_| true, false)
    }

    /// [`LayeredGraph::search`] returning only nodes `accept` takes, walking through the
    /// others (see [`crate::flat::FlatGraph::search_filtered`] for the stopping rule).
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
        if k == 0 || dim != vectors.dim() || self.n == 0 || vectors.len() < self.n {
            return Vec::new();
        }
        let vec_of = |v: u32| vectors.row(v as usize);
        let dist = |v: u32| squared_l2(query, vec_of(v));
        let fetch = |v: u32| prefetch(vec_of(v));
        let mut out: Vec<(usize, f32)> = self
            .walk(dist, fetch, ef.max(k), accept, filtered)
            .into_iter()
            .map(|Scored(d, v)| (v as usize, d.max(0.0).sqrt()))
            .collect();
        out.truncate(k);
        out
    }

    /// Greedy descent through the upper layers, then the layer-0 beam.
    fn walk(
        &self,
        dist: impl Fn(u32) -> f32,
        fetch: impl Fn(u32),
        ef: usize,
        accept: impl Fn(u32) -> bool,
        filtered: bool,
    ) -> Vec<Scored> {
        let (mut cur, mut cur_d) = (self.entry, dist(self.entry));
        for level in (1..=self.top_level).rev() {
            (cur, cur_d) = self.greedy(&dist, cur, cur_d, level);
        }
        self.beam(dist, fetch, (cur_d, cur), ef, 0, accept, filtered)
    }

    /// [`LayeredGraph::search`] walking the int8 `codes` of the vectors (a quarter of the
    /// memory traffic), then re-ranking the walk's `ef` best by the exact f32 distance.
    pub fn search_int8(
        &self,
        vectors: Rows<'_>,
        codes: &Int8Codes,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Vec<(usize, f32)> {
        let dim = query.len();
        if k == 0
            || dim != vectors.dim()
            || self.n == 0
            || vectors.len() < self.n
            || codes.len() < self.n
        {
            return Vec::new();
        }
        let prepared = codes.prepare(query);
        let dist = |v: u32| codes.distance(&prepared, v);
        let fetch = |v: u32| prefetch_bytes(codes.row(v));
        let walked = self.walk(dist, fetch, ef.max(k), |_| true, false);
        let mut exact: Vec<Scored> = walked
            .into_iter()
            .map(|Scored(_, v)| Scored(squared_l2(query, vectors.row(v as usize)), v))
            .collect();
        exact.sort_unstable();
        exact.truncate(k);
        exact
            .into_iter()
            .map(|Scored(d, v)| (v as usize, d.max(0.0).sqrt()))
            .collect()
    }

    /// Mean number of layer-0 links per node.
    pub fn mean_degree(&self) -> f64 {
        let total: usize = (0..self.n as u32)
            .map(|v| Self::links(self.row(v, 0)).count())
            .sum();
        total as f64 / self.n.max(1) as f64
    }

    /// Writes the graph as `name` in `store` (fsynced; durable by name after the store's
    /// next sync). Layout: [`MAGIC`], m, max_layer, entry, top_level (u32 LE), n, upper
    /// rows (u64 LE), the layer-0 rows, the upper rows (u32 LE), one level byte per node.
    pub fn write(&self, store: &Directory, name: &str) -> Result<FileEntry> {
        store.write_new(name, |w| {
            w.write_all(MAGIC)?;
            for x in [self.m, self.max_layer, self.entry as usize, self.top_level] {
                w.write_all(&(x as u32).to_le_bytes())?;
            }
            w.write_all(&(self.n as u64).to_le_bytes())?;
            w.write_all(&((self.upper.len() / (self.m + 1)) as u64).to_le_bytes())?;
            let mut buf = Vec::with_capacity(1 << 16);
            for cells in [&self.links0, &self.upper] {
                let mut it = cells.iter().peekable();
                while it.peek().is_some() {
                    buf.clear();
                    for a in it.by_ref().take(1 << 14) {
                        buf.extend_from_slice(&a.load(Ordering::Relaxed).to_le_bytes());
                    }
                    w.write_all(&buf)?;
                }
            }
            w.write_all(&self.levels[..self.n])
        })
    }

    /// Opens the graph file listed as `entry` for `n` vectors with `params`: mapped
    /// (copy-on-write, so later inserts can link into old rows without touching the file)
    /// after its checksum and every row were checked, each block of rows dropped from the
    /// resident set once checked. A version-1 file is read onto the heap instead. Damage is
    /// a [`StoreError::Corrupt`] naming the file.
    pub fn open(
        store: &Directory,
        entry: &FileEntry,
        params: &HnswParams,
        n: usize,
    ) -> Result<Self> {
        let path = store.file(&entry.name);
        let mut map = store.map_verified_private(entry)?;
        if map.starts_with(MAGIC_V1) {
            return Self::parse(&path, &map, params, n);
        }
        let h = Header::read(&path, &map, MAGIC, params, n)?;
        let w0 = 2 * h.m + 1;
        let cells0 = n * w0;
        let cells_up = h.upper_rows * (h.m + 1);
        let levels_at = HEADER_LEN + 4 * (cells0 + cells_up);
        if map.len() != levels_at + n {
            return Err(bad(
                &path,
                format!(
                    "{} bytes, expected {} for {n} nodes",
                    map.len(),
                    levels_at + n
                ),
            ));
        }
        let levels = map[levels_at..].to_vec();
        let base = map.as_mut_ptr();
        let cells = |at: usize, len: usize| Cells {
            // SAFETY: `at` lies within the map (size checked above).
            mapped: std::ptr::NonNull::new(unsafe { base.add(at) }.cast::<AtomicU32>()),
            mapped_len: len,
            tail: Vec::new(),
        };
        let links0 = cells(HEADER_LEN, cells0);
        let upper = cells(HEADER_LEN + 4 * cells0, cells_up);
        let drop_pages = |from: usize, to: usize| {
            // SAFETY: nothing was written into the map yet: its dropped pages read back
            // from the file. Advisory: a failure only leaves them resident.
            let _ =
                unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, from, to - from) };
        };
        let mut g = Self::assemble(&path, params, h, levels, links0, upper, |done| {
            drop_pages(
                HEADER_LEN + 4 * w0 * done.saturating_sub(CHECK_BLOCK),
                HEADER_LEN + 4 * w0 * done,
            )
        })?;
        drop_pages(0, map.len());
        g.map = Some(map);
        Ok(g)
    }

    /// Reads a graph written in layout version 1 (levels before rows; checksummed by the
    /// caller) onto the heap: every count and id is checked, so a malformed file is a
    /// [`StoreError::Corrupt`] naming `path`, never a panic or a wrong answer.
    pub fn parse(
        path: &std::path::Path,
        bytes: &[u8],
        params: &HnswParams,
        n: usize,
    ) -> Result<Self> {
        let h = Header::read(path, bytes, MAGIC_V1, params, n)?;
        let w0 = 2 * h.m + 1;
        let expect = (HEADER_LEN as u64)
            .checked_add(n as u64)
            .and_then(|x| x.checked_add((n as u64).checked_mul(4 * w0 as u64)?))
            .and_then(|x| x.checked_add((h.upper_rows as u64).checked_mul(4 * (h.m as u64 + 1))?));
        if expect != Some(bytes.len() as u64) {
            return Err(bad(
                path,
                format!("{} bytes, expected {expect:?} for {n} nodes", bytes.len()),
            ));
        }
        let cells = |from: usize, len: usize| -> Vec<AtomicU32> {
            bytes[from..from + 4 * len]
                .chunks_exact(4)
                .map(|c| AtomicU32::new(u32::from_le_bytes(c.try_into().unwrap())))
                .collect()
        };
        let off0 = HEADER_LEN + n;
        let links0 = Cells::heap(cells(off0, n * w0));
        let upper = Cells::heap(cells(off0 + 4 * n * w0, h.upper_rows * (h.m + 1)));
        let levels = bytes[HEADER_LEN..HEADER_LEN + n].to_vec();
        Self::assemble(path, params, h, levels, links0, upper, |_| {})
    }

    /// A graph from its parts, after checking that levels, entry point and every row are
    /// consistent; `checked(done)` is called after each [`CHECK_BLOCK`] nodes' rows.
    fn assemble(
        path: &std::path::Path,
        params: &HnswParams,
        h: Header,
        levels: Vec<u8>,
        links0: Cells,
        upper: Cells,
        checked: impl Fn(usize),
    ) -> Result<Self> {
        let n = levels.len();
        let mut g = Self::new(params);
        g.n = n;
        g.entry = h.entry as u32;
        g.top_level = h.top_level;
        let mut rows = 0usize;
        for &l in &levels {
            if l as usize >= h.max_layer {
                return Err(bad(
                    path,
                    format!("a node of level {l} in a graph of {} layers", h.max_layer),
                ));
            }
            g.upper_at.push(if l == 0 { NONE } else { rows as u32 });
            rows += l as usize;
        }
        if rows != h.upper_rows {
            return Err(bad(
                path,
                format!(
                    "levels need {rows} upper rows, the header says {}",
                    h.upper_rows
                ),
            ));
        }
        if n > 0
            && (h.entry >= n
                || levels[h.entry] as usize != h.top_level
                || levels.iter().any(|&l| l as usize > h.top_level))
        {
            return Err(bad(path, "the entry point is not a node of the top level"));
        }
        g.levels = levels;
        g.links0 = links0;
        g.upper = upper;
        g.locks = (0..n).map(|_| Mutex::new(())).collect();
        for v in 0..n as u32 {
            for level in 0..=g.levels[v as usize] as usize {
                let row = g.row(v, level);
                let c = row[0].load(Ordering::Relaxed) as usize;
                if c >= row.len() {
                    return Err(bad(
                        path,
                        format!(
                            "node {v} lists {c} links in layer {level}, at most {}",
                            row.len() - 1
                        ),
                    ));
                }
                if let Some(u) = Self::links(row)
                    .find(|&u| u as usize >= n || u == v || (g.levels[u as usize] as usize) < level)
                {
                    return Err(bad(
                        path,
                        format!(
                        "node {v} links to {u} in layer {level}, which is not a node of that layer"
                    ),
                    ));
                }
            }
            if (v as usize + 1).is_multiple_of(CHECK_BLOCK) {
                checked(v as usize + 1);
            }
        }
        Ok(g)
    }

    /// Whether the rows are read from a map of the graph file (for tests).
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }
}

/// The fixed header of a graph file, checked against the index.
struct Header {
    m: usize,
    max_layer: usize,
    entry: usize,
    top_level: usize,
    upper_rows: usize,
}

impl Header {
    fn read(
        path: &std::path::Path,
        bytes: &[u8],
        magic: &[u8; 8],
        params: &HnswParams,
        n: usize,
    ) -> Result<Self> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != magic {
            return Err(bad(
                path,
                "not a layered graph file of this version (bad header)",
            ));
        }
        let u32_at = |i: usize| {
            u32::from_le_bytes(bytes[8 + 4 * i..12 + 4 * i].try_into().unwrap()) as usize
        };
        let u64_at = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        let (m, max_layer, entry, top_level) = (u32_at(0), u32_at(1), u32_at(2), u32_at(3));
        let (count, upper_rows) = (u64_at(24), u64_at(32));
        if m != params.m || max_layer != params.max_layer {
            return Err(bad(
                path,
                format!(
                    "built with M {m} and {max_layer} layers, the manifest says M {} and {} layers",
                    params.m, params.max_layer
                ),
            ));
        }
        if count != n as u64 {
            return Err(bad(
                path,
                format!("holds {count} nodes, the index has {n} vectors"),
            ));
        }
        // Every node has at most max_layer - 1 upper rows; more is damage (and an overflow).
        if upper_rows > (n as u64).saturating_mul(max_layer as u64) {
            return Err(bad(path, format!("{upper_rows} upper rows for {n} nodes")));
        }
        Ok(Self {
            m,
            max_layer,
            entry,
            top_level,
            upper_rows: upper_rows as usize,
        })
    }
}

fn bad(path: &std::path::Path, msg: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(path, format!("graph file: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gallery::exact_top_k;
    use crate::synthetic::clustered;
    use crate::vectors::Rows;

    fn recall_at_10(g: &LayeredGraph, base: &[f32], queries: &[f32], dim: usize, ef: usize) -> f64 {
        let q = queries.chunks_exact(dim);
        let count = q.len() as f64;
        q.map(|q| {
            let want: Vec<u64> = exact_top_k(Rows::new(base, dim), q, 10)
                .iter()
                .map(|h| h.id)
                .collect();
            let got = g.search(Rows::new(base, dim), q, 10, ef);
            got.iter()
                .filter(|(id, _)| want.contains(&(*id as u64)))
                .count() as f64
                / 10.0
        })
        .sum::<f64>()
            / count
    }

    fn params(m: usize) -> HnswParams {
        HnswParams {
            m,
            ef_construction: 64,
            ..HnswParams::default()
        }
    }

    #[test]
    fn rows_are_well_formed_and_recall_is_high() {
        let dim = 24;
        let (vectors, _) = clustered(5200, dim, 40, 1.0, 5);
        let (base, queries) = vectors.split_at(5000 * dim);
        let mut g = LayeredGraph::new(&params(12));
        g.insert_rows(Rows::new(base, dim), 0);
        assert_eq!(g.len(), 5000);
        for v in 0..5000u32 {
            for level in 0..=g.levels[v as usize] as usize {
                let mut ids: Vec<u32> = LayeredGraph::links(g.row(v, level)).collect();
                assert!(
                    ids.iter().all(|&u| u != v && (u as usize) < 5000),
                    "row {v}/{level}: {ids:?}"
                );
                let len = ids.len();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), len, "duplicate link in row {v}/{level}");
            }
        }
        let degree = g.mean_degree();
        assert!(degree > 6.0 && degree <= 24.0, "mean degree {degree}");
        let r = recall_at_10(&g, base, queries, dim, 64);
        assert!(r > 0.97, "recall@10 {r}");
    }

    #[test]
    fn incremental_inserts_match_a_batch_build() {
        let dim = 16;
        let (vectors, _) = clustered(3100, dim, 20, 1.0, 9);
        let (base, queries) = vectors.split_at(3000 * dim);
        let mut g = LayeredGraph::new(&params(8));
        let rows = Rows::new(base, dim);
        g.insert_rows(rows.prefix(5), 0);
        for i in 5..40 {
            g.insert_rows(rows.prefix(i + 1), i);
            let hit = g.search(rows, &base[i * dim..(i + 1) * dim], 1, 16);
            assert_eq!(hit[0].0, i, "a new point is found at once");
        }
        g.insert_rows(rows, 40);
        let mut batch = LayeredGraph::new(&params(8));
        batch.insert_rows(rows, 0);
        let (ri, rb) = (
            recall_at_10(&g, base, queries, dim, 32),
            recall_at_10(&batch, base, queries, dim, 32),
        );
        assert!(rb > 0.9 && ri > rb - 0.02, "incremental {ri} vs batch {rb}");
        // k beyond the graph: every point once, nearest first.
        let all = g.search(rows, &base[..dim], 5000, 16);
        assert!(all.len() > 2900 && all.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn full_rows_keep_long_links_by_the_heuristic() {
        // Points on a line; node 2's layer-0 row (width 2·M = 2) holds 1 and the far 3.
        let vectors = [0.0f32, 1.0, 2.0, 10.0];
        let p = HnswParams {
            m: 1,
            ef_construction: 4,
            max_layer: 1,
            ..HnswParams::default()
        };
        let mut g = LayeredGraph::new(&p);
        g.grow(4);
        g.n = 4;
        LayeredGraph::write_row(g.row(2, 0), &[1, 3]);
        // 0 is nearer to the kept 1 than to 2: the heuristic drops it, the long link stays.
        let rows = Rows::new(&vectors, 1);
        g.link(rows, 2, 0, 4.0, 0, 2);
        assert_eq!(
            LayeredGraph::links(g.row(2, 0)).collect::<Vec<_>>(),
            vec![1, 3]
        );
        // A row with room takes the link as it is, once.
        g.link(rows, 0, 1, 1.0, 0, 2);
        g.link(rows, 0, 1, 1.0, 0, 2);
        assert_eq!(
            LayeredGraph::links(g.row(0, 0)).collect::<Vec<_>>(),
            vec![1]
        );
    }

    /// Writes `bytes` as `name` and returns its entry (checksummed like a real one).
    fn put(store: &Directory, name: &str, bytes: &[u8]) -> FileEntry {
        store.write_bytes(name, bytes).unwrap()
    }

    #[test]
    fn a_written_graph_maps_back_and_damage_is_reported() {
        let dim = 8;
        let (base, _) = clustered(700, dim, 7, 1.0, 2);
        let rows = Rows::new(&base, dim);
        let p = params(6);
        let mut g = LayeredGraph::new(&p);
        g.insert_rows(rows, 0);
        let dir = tempfile::tempdir().unwrap();
        let store = Directory::new(dir.path());
        let entry = g.write(&store, "g.layers").unwrap();
        let bytes = std::fs::read(store.file("g.layers")).unwrap();
        let mut back = LayeredGraph::open(&store, &entry, &p, 700).unwrap();
        assert!(back.is_mapped());
        for i in [0usize, 123, 699] {
            let q = &base[i * dim..(i + 1) * dim];
            assert_eq!(back.search(rows, q, 5, 32), g.search(rows, q, 5, 32));
        }
        // Growing a mapped graph links new nodes into old (mapped) rows; the file is not
        // written, and the grown graph writes out and maps back whole.
        let (more, _) = clustered(760, dim, 7, 1.0, 2);
        let more_rows = Rows::new(&more, dim);
        back.insert_rows(more_rows, 700);
        assert_eq!(std::fs::read(store.file("g.layers")).unwrap(), bytes);
        let hit = back.search(more_rows, &more[750 * dim..751 * dim], 1, 32);
        assert_eq!(hit[0].0, 750);
        let grown = back.write(&store, "g2.layers").unwrap();
        let again = LayeredGraph::open(&store, &grown, &p, 760).unwrap();
        let q = &more[720 * dim..721 * dim];
        assert_eq!(
            again.search(more_rows, q, 5, 32),
            back.search(more_rows, q, 5, 32)
        );

        // Wrong count, wrong params, truncation, an id out of range: errors, no panic.
        assert!(LayeredGraph::open(&store, &entry, &p, 699).is_err());
        assert!(LayeredGraph::open(&store, &entry, &params(7), 700).is_err());
        let e = put(&store, "t.layers", &bytes[..bytes.len() - 4]);
        let err = LayeredGraph::open(&store, &e, &p, 700).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        let mut bad = bytes.clone();
        let first_link = HEADER_LEN + 4;
        bad[first_link..first_link + 4].copy_from_slice(&5000u32.to_le_bytes());
        let e = put(&store, "b.layers", &bad);
        let err = LayeredGraph::open(&store, &e, &p, 700)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.layers") && err.contains("links to 5000"),
            "{err}"
        );
        let mut bad = bytes.clone();
        bad[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = put(&store, "c.layers", &bad);
        assert!(LayeredGraph::open(&store, &e, &p, 700).is_err());

        // The version-1 layout (levels before the rows) still reads, onto the heap.
        let rows_end = bytes.len() - 700;
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&bytes[8..HEADER_LEN]);
        v1.extend_from_slice(&bytes[rows_end..]);
        v1.extend_from_slice(&bytes[HEADER_LEN..rows_end]);
        let e = put(&store, "v1.layers", &v1);
        let old = LayeredGraph::open(&store, &e, &p, 700).unwrap();
        assert!(!old.is_mapped());
        let q = &base[42 * dim..43 * dim];
        assert_eq!(old.search(rows, q, 5, 32), g.search(rows, q, 5, 32));
        assert!(
            LayeredGraph::parse(&store.file("v1.layers"), &v1[..v1.len() - 4], &p, 700).is_err()
        );
    }
}
