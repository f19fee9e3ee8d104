//! From image files to embeddings: listing, hashing, parallel decoding and batched embedding
//! with a progress bar.
//!
//! Decoding the next batch (rayon, all cores) overlaps embedding the current one: a
//! producer thread feeds decoded batches through a bounded channel.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use image::DynamicImage;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use trainer::data::decode_image_bytes;
use trainer::embed::Embedder;
use trainer::error::{Error, Result};

/// One image to embed.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: PathBuf,
    /// The path recorded in the index (relative to the images root when there is one).
    pub display: String,
    pub label: Option<String>,
}

/// An embedded image.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub source: Source,
    pub sha256: String,
    pub vector: Vec<f32>,
}

/// The result of embedding a list of sources.
#[derive(Debug, Default)]
pub struct EmbedOutcome {
    /// The embedded images ([`embed_sources`]; empty from [`embed_sources_into`], which hands
    /// them on instead).
    pub embedded: Vec<Embedded>,
    /// Images embedded.
    pub count: usize,
    /// `(file, why)` for images that could not be read (only with `skip_bad`).
    pub skipped: Vec<(PathBuf, String)>,
    /// Images per second over the whole run (decode + embed).
    pub images_per_second: f64,
}

/// Image files under `dir`, by the shared walker's rules (hidden entries skipped, links
/// followed, label = top-level folder; see `intake::walk`), sorted so ids are reproducible.
pub fn list_images(dir: &Path) -> Result<Vec<intake::ImageFile>> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "image directory not found"));
    }
    intake::walk_images(dir)
        .map_err(|e| Error::file(&e.path, format!("cannot list directory: {}", e.source)))
}

/// True for names with one of the decodable extensions (case-insensitive).
pub fn is_image_name(p: &Path) -> bool {
    intake::has_image_extension(p)
}

/// Reads a file once: its SHA-256 (the duplicate key) and the decoded image (through the
/// same intake as the trainer and the server, so the vector is the same whichever way the
/// image comes in).
pub fn read_image(path: &Path) -> Result<(String, DynamicImage)> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    let sha = intake::sha256_hex(&bytes);
    let img = decode_image_bytes(&bytes).map_err(|e| Error::file(path, e))?;
    Ok((sha, img))
}

/// SHA-256 of a file's bytes.
pub fn sha256_of(path: &Path) -> Result<String> {
    trainer::checkpoint::sha256_file(path)
}

/// Decoded images already reduced to the model's input view (see `embed_sources`).
type Decoded = Vec<(Source, Result<(String, image::RgbImage)>)>;

/// Decodes and embeds `sources` in batches of `batch_size`. With `skip_bad`, unreadable
/// images are listed in the outcome; without it the first one is an error naming the file.
/// `progress` shows an indicatif bar (img/s, ETA) on stderr.
pub fn embed_sources(
    embedder: &Embedder,
    sources: Vec<Source>,
    batch_size: usize,
    skip_bad: bool,
    progress: bool,
) -> Result<EmbedOutcome> {
    let mut embedded = Vec::new();
    let mut out = embed_sources_into(
        embedder,
        sources,
        batch_size,
        skip_bad,
        progress,
        &mut |e| {
            embedded.push(e);
            Ok(())
        },
    )?;
    out.embedded = embedded;
    Ok(out)
}

/// [`embed_sources`] handing each embedded image to `sink` as its batch is done instead of
/// collecting them (`indexer build` streams them into the index file); an error from
/// `sink` stops the run.
pub fn embed_sources_into(
    embedder: &Embedder,
    sources: Vec<Source>,
    batch_size: usize,
    skip_bad: bool,
    progress: bool,
    sink: &mut dyn FnMut(Embedded) -> Result<()>,
) -> Result<EmbedOutcome> {
    let batch_size = batch_size.max(1);
    let bar = if progress {
        ProgressBar::new(sources.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} embedding [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let start = Instant::now();
    let pre = embedder.config().preprocess.clone();
    let (tx, rx) = mpsc::sync_channel::<Decoded>(2);
    let batches: Vec<Vec<Source>> = sources.chunks(batch_size).map(|c| c.to_vec()).collect();
    let mut out = EmbedOutcome::default();
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || {
            for batch in batches {
                let decoded: Decoded = batch
                    .into_par_iter()
                    .map(|s| {
                        // The model's view right away (the same `eval_view` that
                        // `embed_images` applies): a batch of large photos never holds
                        // more than one full-size decode per thread.
                        let r = read_image(&s.file).map(|(sha, img)| (sha, pre.eval_view(&img)));
                        (s, r)
                    })
                    .collect();
                if tx.send(decoded).is_err() {
                    return; // the consumer stopped on an error
                }
            }
        });
        for decoded in rx {
            let batch_len = decoded.len() as u64;
            let mut good = Vec::with_capacity(decoded.len());
            let mut images = Vec::with_capacity(decoded.len());
            for (s, r) in decoded {
                match r {
                    Ok((sha, img)) => {
                        images.push(img);
                        good.push((s, sha));
                    }
                    Err(e) if skip_bad => {
                        bar.println(format!("skipping {}: {e}", s.file.display()));
                        out.skipped.push((s.file, e.to_string()));
                    }
                    Err(e) => return Err(with_hint(e)),
                }
            }
            if !images.is_empty() {
                let vectors = embedder.embed_views(&images)?;
                for ((source, sha256), vector) in good.into_iter().zip(vectors) {
                    sink(Embedded {
                        source,
                        sha256,
                        vector,
                    })?;
                    out.count += 1;
                }
            }
            bar.inc(batch_len);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    out.images_per_second = if secs > 0.0 {
        out.count as f64 / secs
    } else {
        0.0
    };
    Ok(out)
}

fn with_hint(e: Error) -> Error {
    match e {
        Error::File { path, msg } => Error::File {
            path,
            msg: format!("{msg} (use --skip-bad-images to index the rest)"),
        },
        other => other,
    }
}
