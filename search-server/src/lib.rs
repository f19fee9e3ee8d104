//! Deep Metric's search server: query-by-image over a gallery index, as a JSON API and a
//! web page.
//!
//! Layout: [`routes`] (handlers and the `App`), [`upload`] (reading bodies with limits),
//! [`decode`] (untrusted image decoding, through the shared `intake` crate), [`budget`]
//! (the decode memory budget), [`batcher`] (the inference thread that batches
//! concurrent queries), [`thumbs`] and [`store`] (files under the data dir), [`metrics`]
//! (Prometheus text), [`backend`] (the model and index traits) with their real
//! implementations [`model`] (trainer's embedder) and [`index`] (indexer's on-disk HNSW
//! index), [`scan`] (`--gallery` folder indexing), [`config`] (the command line),
//! [`client`] (a tiny blocking HTTP client for tests and the load generator) and [`testing`]
//! (deterministic fakes).

pub mod assets;
pub mod backend;
pub mod batcher;
pub mod budget;
pub mod client;
pub mod config;
pub mod decode;
pub mod error;
pub mod index;
pub mod metrics;
pub mod model;
pub mod remote;
pub mod routes;
pub mod scan;
pub mod store;
pub mod testing;
pub mod thumbs;
pub mod upload;

pub use backend::{
    AddOutcome, EmbedBackend, GalleryItem, NewGalleryItem, SearchBackend, SearchHit,
};
pub use error::ApiError;
