//! The inference thread: the only place uploads are decoded and embedded while serving.
//!
//! Embedding is CPU-bound (tens of ms per image), so it must never run on the async
//! workers, which would stop answering `/healthz` and thumbnails while a query runs.
//! Requests arrive through a bounded channel as encoded bytes; the thread takes the first
//! waiting upload, collects more while other requests are known to be on their way (for at
//! most `batch_wait`, up to `max_batch`), decodes the batch in parallel, embeds it in one
//! forward pass and answers each request through its oneshot.
//!
//! Decoding here, rather than on a blocking pool beside the model, keeps every CPU-heavy step
//! on the same cores one after the other: a decode running concurrently with the forward pass
//! preempts one of its threads, and every parallel layer then waits for the straggler (on a
//! 2-core machine that cost 15–30 % of the throughput under load). Waiting only while
//! requests are arriving keeps a lone query from paying `batch_wait` for company that is
//! not coming. A full queue answers 503 at once instead of letting latency grow without
//! bound.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use rayon::prelude::*;

use crate::backend::EmbedBackend;
use crate::budget::DecodePermit;
use crate::decode::{self, DecodeLimits};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// How the inference thread groups requests.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most images per forward pass.
    pub max_batch: usize,
    /// Longest a request waits for company once the thread is free (only while other
    /// requests are arriving, see [`Arriving`]).
    pub batch_wait: Duration,
    /// Images that may wait in the queue before new requests get 503.
    pub queue_capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            batch_wait: Duration::from_millis(3),
            queue_capacity: 256,
        }
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Embedded, ApiError>>;

/// What one request asks the inference thread for.
pub struct EmbedRequest {
    pub upload: Bytes,
    pub limits: DecodeLimits,
    /// The decode memory this image may use (see [`crate::budget`]); given back as soon as
    /// the full-size image is reduced to the model's view (and thumbnail).
    pub permit: Option<DecodePermit>,
    /// Also make a thumbnail this large from the same decode (adds).
    pub thumb_size: Option<u32>,
}

/// The answer: the vector and, when asked for, the thumbnail (JPEG).
#[derive(Debug)]
pub struct Embedded {
    pub vector: Vec<f32>,
    pub thumb: Option<Bytes>,
}

/// A queued request. It carries its [`Arriving`] guard so that the inference thread itself
/// releases it as it takes the job: the count it then checks never includes a request it
/// already holds (releasing it on the request's side, around the send, raced with the
/// thread and could make a lone query wait `batch_wait` for itself).
struct Job {
    arriving: Arriving,
    work: Work,
}

struct Work {
    request: EmbedRequest,
    reply: Reply,
}

impl Job {
    /// Takes the job off the queue: the request is no longer on its way.
    fn taken(self) -> Work {
        drop(self.arriving);
        self.work
    }
}

/// Handle to the inference thread. Cloning shares the same thread; the thread exits once
/// every handle is dropped and the queue is drained (see [`BatcherThread::join_timeout`]).
#[derive(Clone)]
pub struct Batcher {
    tx: Sender<Job>,
    queue: Receiver<Job>,
    arriving: Arc<AtomicUsize>,
}

/// A request on its way to the batcher (reading its upload). While any exist, the inference
/// thread waits up to `batch_wait` for them to join the batch; dropping it (or handing it to
/// [`Batcher::embed`]) says the request will not come, or has come.
pub struct Arriving(Arc<AtomicUsize>);

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
        let arriving = Arc::new(AtomicUsize::new(0));
        let seen = arriving.clone();
        let handle = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || run(rx, &seen, model, config, metrics))
            .expect("cannot spawn the inference thread");
        (
            Self {
                tx,
                queue,
                arriving,
            },
            BatcherThread(handle),
        )
    }

    /// Announces a request that will call [`Batcher::embed`] once its upload is read.
    pub fn arriving(&self) -> Arriving {
        self.arriving.fetch_add(1, Ordering::SeqCst);
        Arriving(self.arriving.clone())
    }

    /// Images waiting to be embedded.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Decodes and embeds one uploaded image, batched with whatever else is waiting. A file
    /// that is not a usable image gets its 4xx [`ApiError`] (see [`decode::decode_image`]).
    pub async fn embed(
        &self,
        arriving: Arriving,
        upload: Bytes,
        limits: DecodeLimits,
    ) -> Result<Vec<f32>, ApiError> {
        let request = EmbedRequest {
            upload,
            limits,
            permit: None,
            thumb_size: None,
        };
        Ok(self.embed_request(arriving, request).await?.vector)
    }

    /// [`Batcher::embed`] with a decode permit and optionally a thumbnail.
    pub async fn embed_request(
        &self,
        arriving: Arriving,
        request: EmbedRequest,
    ) -> Result<Embedded, ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let sent = self.tx.try_send(Job {
            arriving,
            work: Work { request, reply },
        });
        match sent {
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
            Ok(result) => result,
            Err(_) => Err(ApiError::internal(
                "embedding the image failed",
                "the inference thread dropped the request",
            )),
        }
    }
}

fn run(
    rx: Receiver<Job>,
    arriving: &AtomicUsize,
    model: Arc<dyn EmbedBackend>,
    config: BatchConfig,
    metrics: Arc<Metrics>,
) {
    // `recv` fails only once every sender is gone and the queue is empty: a clean shutdown.
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first.taken()];
        let deadline = Instant::now() + config.batch_wait;
        while jobs.len() < config.max_batch {
            // Take what is already queued without waiting; wait out the deadline only for
            // requests that are on their way.
            if let Ok(j) = rx.try_recv() {
                jobs.push(j.taken());
                continue;
            }
            if arriving.load(Ordering::SeqCst) == 0 {
                break;
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(j) => jobs.push(j.taken()),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // A client that gave up (closed connection) has dropped its receiver: skip its image.
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let start = Instant::now();
        // Each image is reduced to the model's view (and its thumbnail) right after decoding,
        // and the full-size image and its budget permit are dropped there, so a batch of
        // large uploads never holds more than its permits allow.
        let prepared: Vec<_> = jobs
            .into_par_iter()
            .map(|j| {
                let Work { request, reply } = j;
                let r = catch_unwind(AssertUnwindSafe(|| prepare(model.as_ref(), request)))
                    .unwrap_or_else(|_| {
                        Err(ApiError::internal("decoding the image failed", "panic"))
                    });
                (reply, r)
            })
            .collect();
        let mut images = Vec::with_capacity(prepared.len());
        let mut replies = Vec::with_capacity(prepared.len());
        for (reply, r) in prepared {
            match r {
                Ok((view, thumb)) => {
                    images.push(view);
                    replies.push((reply, thumb));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if images.is_empty() {
            continue;
        }
        let result = catch_unwind(AssertUnwindSafe(|| model.embed_prepared(&images)));
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
                for ((reply, thumb), vector) in replies.into_iter().zip(vectors) {
                    let _ = reply.send(Ok(Embedded { vector, thumb }));
                }
            }
            Err(msg) => {
                let err = ApiError::internal(
                    "embedding the image failed",
                    format!("batch of {}: {msg}", images.len()),
                );
                for (reply, _) in replies {
                    let _ = reply.send(Err(ApiError::Internal(err.to_string())));
                }
            }
        }
    }
    tracing::debug!("inference thread stopped");
}

/// Decodes one upload and reduces it to the model's view and, when asked, a thumbnail; the
/// full image, then the permit, are dropped before returning.
fn prepare(
    model: &dyn EmbedBackend,
    request: EmbedRequest,
) -> Result<(image::DynamicImage, Option<Bytes>), ApiError> {
    let EmbedRequest {
        upload,
        limits,
        permit,
        thumb_size,
    } = request;
    let image = decode::decode_image(&upload, limits)?;
    drop(upload);
    let thumb = match thumb_size {
        Some(size) => Some(
            crate::thumbs::render(&image, size)
                .map_err(|e| ApiError::internal("making the thumbnail failed", e))?,
        ),
        None => None,
    };
    let view = model.prepare(image);
    drop(permit);
    Ok((view, thumb))
}
