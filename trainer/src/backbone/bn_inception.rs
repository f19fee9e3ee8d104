//! BN-Inception (temporary, being written).
use candle_core::Result;
use candle_nn::VarBuilder;
pub const FEATURE_DIM: usize = 1024;
pub struct BnInception;
impl BnInception {
    pub fn new(_vb: VarBuilder) -> Result<Box<dyn super::Backbone>> {
        candle_core::bail!("bn-inception is not built yet")
    }
}
