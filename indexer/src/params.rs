//! HNSW construction parameters and their validation.
//!
//! hnsw_rs calls `process::exit(1)` when `max_nb_connection > 256` and silently clamps the
//! layer count, so every value a user can type is checked here, before hnsw_rs sees it.

use crate::store::{Result, StoreError as Error};
use serde::{Deserialize, Serialize};

/// The most neighbours per node hnsw_rs accepts (it stores the count in a `u8`-sized table).
pub const MAX_M: usize = 256;
/// hnsw_rs keeps at most 16 layers (`NB_LAYER_MAX`).
pub const MAX_LAYERS: usize = 16;

/// How the graph walk reads the vectors: as stored (f32), or through an int8 copy with an
/// exact f32 re-rank of the walk's best (see [`crate::quant`]): a quarter of the memory
/// traffic per step, for large galleries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    #[default]
    None,
    Int8,
}

impl Quantize {
    pub fn is_none(&self) -> bool {
        *self == Quantize::None
    }
}

/// How the HNSW graph is built. Recorded in the index manifest so a rebuilt or extended graph
/// uses the same settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Max neighbours per node and layer (hnsw_rs `max_nb_connection`), 2..=256.
    pub m: usize,
    /// Candidate list size while inserting; larger = better graph, slower build.
    pub ef_construction: usize,
    /// Number of layers, 1..=16.
    pub max_layer: usize,
    /// The walk's copy of the vectors (absent from manifests before format version 4: none).
    #[serde(default, skip_serializing_if = "Quantize::is_none")]
    pub quantize: Quantize,
}

impl Default for HnswParams {
    /// M = 16, ef_construction = 200, 16 layers: hnswlib's customary defaults.
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            max_layer: MAX_LAYERS,
            quantize: Quantize::None,
        }
    }
}

impl HnswParams {
    /// Errors with a message naming the offending parameter and its valid range.
    pub fn validate(&self) -> Result<()> {
        if !(2..=MAX_M).contains(&self.m) {
            return Err(Error::Invalid(format!(
                "HNSW m (max connections per node) must be between 2 and {MAX_M}, got {}",
                self.m
            )));
        }
        if self.ef_construction == 0 || self.ef_construction > 100_000 {
            return Err(Error::Invalid(format!(
                "HNSW ef_construction must be between 1 and 100000, got {}",
                self.ef_construction
            )));
        }
        if !(1..=MAX_LAYERS).contains(&self.max_layer) {
            return Err(Error::Invalid(format!(
                "HNSW max_layer must be between 1 and {MAX_LAYERS}, got {}",
                self.max_layer
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        HnswParams::default().validate().unwrap();
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_parameter_named() {
        let bad = [
            (
                HnswParams {
                    m: 257,
                    ..Default::default()
                },
                "m",
            ),
            (
                HnswParams {
                    m: 1,
                    ..Default::default()
                },
                "m",
            ),
            (
                HnswParams {
                    ef_construction: 0,
                    ..Default::default()
                },
                "ef_construction",
            ),
            (
                HnswParams {
                    max_layer: 17,
                    ..Default::default()
                },
                "max_layer",
            ),
            (
                HnswParams {
                    max_layer: 0,
                    ..Default::default()
                },
                "max_layer",
            ),
        ];
        for (p, name) in bad {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains(name), "{msg}");
        }
        HnswParams {
            m: 256,
            ..Default::default()
        }
        .validate()
        .unwrap();
    }
}
