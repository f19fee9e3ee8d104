//! Deep Metric's learned metric: datasets, backbones, losses, training, retrieval metrics.
//!
//! The crate is the core the `indexer` and `search-server` programs build on: they load a
//! checkpoint written here ([`checkpoint`]) and embed images through [`embed::Embedder`].

pub mod backbone;
pub mod bench;
pub mod checkpoint;
pub mod curves;
pub mod data;
pub mod device;
pub mod embed;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod ops;
pub mod optim;
pub mod plan;
pub mod preprocess;
pub mod train;
pub mod weights;
