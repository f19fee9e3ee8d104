//! Cross-batch memory (XBM, Wang et al., CVPR 2020) around any pair loss.
//!
//! Embeddings drift slowly once training settles, so the embeddings of the last few thousand
//! training images are still good stand-ins for the current ones. Keeping them in a FIFO and
//! mining pairs against them gives a small CPU batch (P×K = 80) the positives and hard
//! negatives of a batch of thousands, at the cost of one `[n + m, d]` pairwise matrix.
//!
//! The wrapped loss sees the batch followed by the memory (detached) as one batch, then its
//! value is rescaled by `(n + m) / n` so each batch anchor keeps the weight `1/n` it has
//! without memory. Memory rows take part as anchors as well as candidates; their own terms
//! reach the batch rows only (the memory holds no gradient), and terms between two memory
//! rows are constants. After the step the batch is pushed into the memory.

use std::collections::VecDeque;
use std::sync::Mutex;

use candle_core::{DType, Result, Tensor, Var};

use super::{LossOutput, MetricLoss};

/// A pair loss with a FIFO of the last `size` training embeddings.
pub struct CrossBatchMemory {
    pub inner: Box<dyn MetricLoss>,
    size: usize,
    memory: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    rows: VecDeque<Vec<f32>>,
    labels: VecDeque<u32>,
}

impl CrossBatchMemory {
    /// `inner` must be a pair loss (proxies already see every class).
    pub fn new(inner: Box<dyn MetricLoss>, size: usize) -> Result<Self> {
        if !inner.parameters().is_empty() {
            candle_core::bail!(
                "--xbm works with the pair losses; {} already compares every batch with all classes",
                inner.name()
            );
        }
        Ok(Self {
            inner,
            size,
            memory: Mutex::new(Memory::default()),
        })
    }

    /// Rows currently held.
    pub fn len(&self) -> usize {
        self.memory.lock().expect("xbm lock").rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a batch (detached, as f32), dropping the oldest rows past `size`.
    fn push(&self, embeddings: &Tensor, labels: &[u32]) -> Result<()> {
        let rows = embeddings.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut m = self.memory.lock().expect("xbm lock");
        for (row, &y) in rows.into_iter().zip(labels) {
            m.rows.push_back(row);
            m.labels.push_back(y);
        }
        while m.rows.len() > self.size {
            m.rows.pop_front();
            m.labels.pop_front();
        }
        Ok(())
    }
}

impl MetricLoss for CrossBatchMemory {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn check(&self) -> Result<()> {
        if self.size == 0 {
            candle_core::bail!("--xbm must be at least 1 (rows of memory)");
        }
        self.inner.check()
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let (rows, mem_labels) = {
            let m = self.memory.lock().expect("xbm lock");
            (
                m.rows.iter().flatten().copied().collect::<Vec<f32>>(),
                m.labels.iter().copied().collect::<Vec<u32>>(),
            )
        };
        let out = if mem_labels.is_empty() {
            self.inner.forward(embeddings, labels)?
        } else {
            let d = embeddings.dim(1)?;
            let mem = Tensor::from_vec(rows, (mem_labels.len(), d), embeddings.device())?
                .to_dtype(embeddings.dtype())?;
            let all = Tensor::cat(&[embeddings, &mem], 0)?;
            let all_labels: Vec<u32> = labels.iter().chain(&mem_labels).copied().collect();
            let inner = self.inner.forward(&all, &all_labels)?;
            let scale = all_labels.len() as f64 / n as f64;
            LossOutput {
                loss: (inner.loss * scale)?,
                active: inner.active,
            }
        };
        self.push(embeddings, labels)?;
        Ok(out)
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn reset(&self) {
        let mut m = self.memory.lock().expect("xbm lock");
        m.rows.clear();
        m.labels.clear();
    }
}
