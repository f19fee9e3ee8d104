//! The inference thread: the only place embeddings are computed while serving.
//!
//! Embedding is CPU-bound (tens to hundreds of ms per image), so it must never run on the
//! async workers, which would stop answering `/healthz` and thumbnails while a query runs.
//! Requests arrive through a bounded channel; the thread takes the first waiting image, then
//! collects more for at most `batch_wait` (or until `max_batch`), embeds them as one batch
//! (one forward pass amortises per-call overhead), and answers each through its oneshot.
//! A full queue answers 503 at once instead of letting latency grow without bound.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use image::DynamicImage;

use crate::backend::EmbedBackend;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// How the inference thread groups requests.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most images per forward pass.
    pub max_batch: usize,
    /// Longest a request waits for company once the thread is free.
    pub batch_wait: Duration,
    /// Images that may wait in the queue before new requests get 503.
    pub queue_capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            batch_wait: Duration::from_millis(3),
            queue_capacity: 256,
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<f32>, String>>;

struct Job {
    image: DynamicImage,
    reply: Reply,
}

/// Handle to the inference thread. Cloning shares the same thread; the thread exits once
/// every handle is dropped and the queue is drained (see [`Batcher::shutdown`]).
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Job>,
    queue: Receiver<Job>,
}

/// Joins the inference thread; returned by [`Batcher::start`].
pub struct BatcherThread(JoinHandle<()>);

impl BatcherThread {
    /// Waits (at most `timeout`) for the thread to finish the requests already queued.
    /// Call after dropping every [`Batcher`] handle you own (the server has stopped); a
    /// handle still alive elsewhere makes this wait out the timeout rather than hang.
    pub fn join_timeout(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.0.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    "the inference thread did not stop within {timeout:?}; exiting anyway"
                );
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.0.join().is_err() {
            tracing::error!("the inference thread panicked while shutting down");
        }
        true
    }
}

impl Batcher {
    /// Starts the inference thread.
    pub fn start(
        model: Arc<dyn EmbedBackend>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> (Self, BatcherThread) {
        let config = BatchConfig {
            max_batch: config.max_batch.max(1),
            ..config
        };
        let (tx, rx) = bounded::<Job>(config.queue_capacity.max(1));
        let queue = rx.clone();
        let handle = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || run(rx, model, config, metrics))
            .expect("cannot spawn the inference thread");
        (Self { tx, queue }, BatcherThread(handle))
    }

    /// Images waiting to be embedded.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Embeds one image, batched with whatever else is waiting.
    pub async fn embed(&self, image: DynamicImage) -> Result<Vec<f32>, ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        match self.tx.try_send(Job { image, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::Busy(
                    "the server is busy embedding other images; retry in a moment".into(),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ApiError::Busy("the server is shutting down".into()))
            }
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(msg)) => Err(ApiError::internal("embedding the image failed", msg)),
            Err(_) => Err(ApiError::internal(
                "embedding the image failed",
                "the inference thread dropped the request",
            )),
        }
    }
}

fn run(
    rx: Receiver<Job>,
    model: Arc<dyn EmbedBackend>,
    config: BatchConfig,
    metrics: Arc<Metrics>,
) {
    // `recv` fails only once every sender is gone and the queue is empty: a clean shutdown.
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + config.batch_wait;
        while jobs.len() < config.max_batch {
            // Take what is already queued without waiting, then wait out the deadline.
            if let Ok(j) = rx.try_recv() {
                jobs.push(j);
                continue;
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(j) => jobs.push(j),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // A client that gave up (closed connection) has dropped its receiver: skip its image.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let (images, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.image, j.reply)).unzip();
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| model.embed(&images)));
        metrics.observe_batch(images.len(), start.elapsed().as_secs_f64());
        let result = match result {
            Ok(Ok(v)) if v.len() == images.len() => Ok(v),
            Ok(Ok(v)) => Err(format!(
                "the model returned {} vectors for {} images",
                v.len(),
                images.len()
            )),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the model panicked".to_string()),
        };
        match result {
            Ok(vectors) => {
                for (reply, v) in replies.into_iter().zip(vectors) {
                    let _ = reply.send(Ok(v));
                }
            }
            Err(msg) => {
                tracing::error!("embedding a batch of {} failed: {msg}", images.len());
                for reply in replies {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
    }
    tracing::debug!("inference thread stopped");
}
