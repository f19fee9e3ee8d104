//! The batch loader: decodes and augments images in parallel on its own rayon pool, one
//! batch at a time, on a background thread that keeps a bounded queue of finished batches
//! ahead of the consumer, so the model does not wait for JPEG decoding.
//!
//! Batches come out in plan order whatever the thread timing, and each image's pixels are
//! a pure function of (augment seed, epoch, sample, occurrence), so runs are reproducible.
//!
//! Bad images: by default the first image that cannot be read ends the iteration with an
//! error naming the file and the annotation line that listed it. With
//! [`LoaderOptions::skip_bad_images`] the image is left out of its batch (labels and
//! indices stay aligned), counted, and listed in [`BatchLoader::bad_images`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;

use super::augment::Augment;
use super::sampler::PkSampler;
use super::{Dataset, Origin};
use crate::error::{Error, Result};
use crate::preprocess::Preprocess;

/// How the loader runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Decoding threads; 0 = one per core.
    pub threads: usize,
    /// Finished batches queued ahead of the consumer (at least 1).
    pub prefetch: usize,
    /// Leave unreadable images out (and report them) instead of failing.
    pub skip_bad_images: bool,
}

impl Default for LoaderOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            prefetch: 2,
            skip_bad_images: false,
        }
    }
}

/// A batch of normalised images, ready for `Tensor::from_vec(images, shape, device)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// B×3×H×W, each image CHW, normalised by the model's [`Preprocess`].
    pub images: Vec<f32>,
    /// (B, 3, H, W).
    pub shape: (usize, usize, usize, usize),
    /// Dense label of each image.
    pub labels: Vec<u32>,
    /// Index of each image in [`Dataset::samples`].
    pub indices: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// An image that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadImage {
    pub path: PathBuf,
    pub origin: Origin,
    pub error: String,
}

/// The images left out by [`LoaderOptions::skip_bad_images`], each listed once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BadImages {
    pub images: Vec<BadImage>,
    /// How many times a bad image was drawn (≥ `images.len()`: P×K may draw one twice).
    pub skipped_draws: usize,
}

impl BadImages {
    pub fn len(&self) -> usize {
        self.images.len()
    }
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }
}

impl fmt::Display for BadImages {
    /// A summary for logs: the count, then up to 20 files with their reasons.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 20;
        write!(f, "{} unreadable image(s) skipped", self.images.len())?;
        for b in self.images.iter().take(SHOWN) {
            write!(
                f,
                "\n  {} (listed at {}): {}",
                b.path.display(),
                b.origin,
                b.error
            )?;
        }
        if self.images.len() > SHOWN {
            write!(f, "\n  … and {} more", self.images.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Counts for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoaderProgress {
    /// Batches planned (skipping bad images can make fewer come out).
    pub batches_total: usize,
    /// Batches handed to the consumer so far.
    pub batches_done: usize,
    /// Images decoded and preprocessed so far (including ones still queued).
    pub images_done: usize,
    /// Bad images met so far (distinct).
    pub bad_images: usize,
}

/// Which view each image gets.
#[derive(Debug, Clone)]
enum View {
    Train { augment: Augment, epoch: u64 },
    Eval { preprocess: Preprocess },
}

impl View {
    fn preprocess(&self) -> &Preprocess {
        match self {
            View::Train { augment, .. } => &augment.preprocess,
            View::Eval { preprocess } => preprocess,
        }
    }
}

/// State shared by the consumer and the background thread.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    images_done: AtomicUsize,
    bad: Mutex<(BadImages, HashSet<usize>)>,
}

/// An iterator of [`Batch`]es produced in the background; see the module docs.
pub struct BatchLoader {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    batches_total: usize,
    batches_done: usize,
}

impl BatchLoader {
    /// One training epoch: the P×K batches of `sampler.epoch(epoch)` with random train views.
    pub fn train(
        dataset: Arc<Dataset>,
        sampler: &PkSampler,
        epoch: u64,
        augment: Augment,
        options: LoaderOptions,
    ) -> Result<Self> {
        Self::start(
            dataset,
            sampler.epoch(epoch),
            View::Train { augment, epoch },
            options,
        )
    }

    /// The whole dataset in order, `batch_size` images per batch (the last may be smaller),
    /// with the deterministic eval view.
    pub fn eval(
        dataset: Arc<Dataset>,
        preprocess: Preprocess,
        batch_size: usize,
        options: LoaderOptions,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::Invalid(
                "evaluation batch size must be at least 1".to_string(),
            ));
        }
        let plan = (0..dataset.len())
            .collect::<Vec<_>>()
            .chunks(batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        Self::start(dataset, plan, View::Eval { preprocess }, options)
    }

    /// Given batches of sample indices, with train views of `epoch` (for callers with their
    /// own sampling).
    pub fn train_batches(
        dataset: Arc<Dataset>,
        batches: Vec<Vec<usize>>,
        epoch: u64,
        augment: Augment,
        options: LoaderOptions,
    ) -> Result<Self> {
        Self::start(dataset, batches, View::Train { augment, epoch }, options)
    }

    fn start(
        dataset: Arc<Dataset>,
        plan: Vec<Vec<usize>>,
        view: View,
        options: LoaderOptions,
    ) -> Result<Self> {
        if let Some(&bad) = plan.iter().flatten().find(|&&i| i >= dataset.len()) {
            return Err(Error::Invalid(format!(
                "batch plan refers to sample {bad}, but the dataset has {}",
                dataset.len()
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("batch-loader-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start the image decoding threads: {e}")))?;
        let (tx, rx) = bounded(options.prefetch.max(1));
        let shared = Arc::new(Shared::default());
        let batches_total = plan.len();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("batch-loader".to_string())
            .spawn(move || {
                produce(
                    &dataset,
                    plan,
                    &view,
                    options.skip_bad_images,
                    &pool,
                    &worker_shared,
                    &tx,
                )
            })
            .map_err(Error::Io)?;
        Ok(Self {
            rx: Some(rx),
            worker: Some(worker),
            shared,
            batches_total,
            batches_done: 0,
        })
    }

    /// Batches planned.
    pub fn batches_total(&self) -> usize {
        self.batches_total
    }

    pub fn progress(&self) -> LoaderProgress {
        LoaderProgress {
            batches_total: self.batches_total,
            batches_done: self.batches_done,
            images_done: self.shared.images_done.load(Ordering::Relaxed),
            bad_images: self.shared.bad.lock().map(|b| b.0.len()).unwrap_or(0),
        }
    }

    /// The bad images skipped so far (all of them once the iterator is exhausted).
    pub fn bad_images(&self) -> BadImages {
        self.shared
            .bad
            .lock()
            .map(|b| b.0.clone())
            .unwrap_or_default()
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.rx.as_ref()?.recv() {
            Ok(item) => {
                self.batches_done += usize::from(item.is_ok());
                Some(item)
            }
            Err(_) => {
                // The producer is done; it only ends early by panicking, which must not
                // look like a complete epoch.
                self.rx = None;
                match self.worker.take().map(JoinHandle::join) {
                    Some(Err(_)) => Some(Err(Error::Invalid(
                        "the batch loader thread panicked".to_string(),
                    ))),
                    _ => None,
                }
            }
        }
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full queue.
        self.rx = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// The background thread: builds the batches in order and sends them.
fn produce(
    dataset: &Dataset,
    plan: Vec<Vec<usize>>,
    view: &View,
    skip_bad: bool,
    pool: &rayon::ThreadPool,
    shared: &Shared,
    tx: &Sender<Result<Batch>>,
) {
    let mut drawn: HashMap<usize, u32> = HashMap::new();
    for indices in plan {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        // How many times each sample was drawn before, this epoch: its augmentation stream.
        let occurrences: Vec<u32> = indices
            .iter()
            .map(|&i| {
                let n = drawn.entry(i).or_insert(0);
                *n += 1;
                *n - 1
            })
            .collect();
        let item =
            pool.install(|| build_batch(dataset, indices, &occurrences, view, skip_bad, shared));
        let stop = item.is_err();
        match item {
            Ok(None) => continue, // Every image of the batch was bad and skipped.
            Ok(Some(batch)) => {
                if tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
        if stop {
            return;
        }
    }
}

/// Decodes, transforms and normalises one batch in parallel, in place in the batch buffer.
fn build_batch(
    dataset: &Dataset,
    indices: Vec<usize>,
    occurrences: &[u32],
    view: &View,
    skip_bad: bool,
    shared: &Shared,
) -> Result<Option<Batch>> {
    let side = view.preprocess().crop as usize;
    let per = 3 * side * side;
    let mut images = vec![0f32; indices.len() * per];
    let results: Vec<std::result::Result<(), Error>> = images
        .par_chunks_mut(per)
        .zip(indices.par_iter().zip(occurrences.par_iter()))
        .map(|(dst, (&i, &occurrence))| {
            let sample = &dataset.samples[i];
            let img = sample
                .decode()
                .map_err(|e| with_origin(e, &sample.origin))?;
            let rgb = match view {
                View::Train { augment, epoch } => augment.train_view(&img, *epoch, i, occurrence),
                View::Eval { preprocess } => preprocess.eval_view(&img),
            };
            view.preprocess().normalize_to(&rgb, dst);
            shared.images_done.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .collect();

    if results.iter().all(Result::is_ok) {
        let labels = indices.iter().map(|&i| dataset.samples[i].label).collect();
        return Ok(Some(Batch {
            images,
            shape: (indices.len(), 3, side, side),
            labels,
            indices,
        }));
    }
    if !skip_bad {
        let first = results
            .into_iter()
            .find_map(Result::err)
            .expect("a failed result exists");
        return Err(first);
    }
    // Keep the good images, compacting the buffer in place.
    let mut kept = Vec::with_capacity(indices.len());
    {
        let mut bad = shared.bad.lock().unwrap_or_else(|p| p.into_inner());
        for (slot, (&i, r)) in indices.iter().zip(&results).enumerate() {
            match r {
                Ok(()) => {
                    images.copy_within(slot * per..(slot + 1) * per, kept.len() * per);
                    kept.push(i);
                }
                Err(e) => {
                    bad.0.skipped_draws += 1;
                    if bad.1.insert(i) {
                        let s = &dataset.samples[i];
                        tracing::warn!("skipping unreadable image: {e}");
                        bad.0.images.push(BadImage {
                            path: s.path.clone(),
                            origin: s.origin.clone(),
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
    }
    if kept.is_empty() {
        return Ok(None);
    }
    images.truncate(kept.len() * per);
    let labels = kept.iter().map(|&i| dataset.samples[i].label).collect();
    Ok(Some(Batch {
        images,
        shape: (kept.len(), 3, side, side),
        labels,
        indices: kept,
    }))
}

/// Adds the annotation line that listed the image to a decoding error.
fn with_origin(e: Error, origin: &Origin) -> Error {
    match e {
        Error::File { path, msg } => Error::File {
            path,
            msg: format!("{msg} (listed at {origin})"),
        },
        other => other,
    }
}
