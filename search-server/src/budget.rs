//! The decode memory budget: how much decoded-pixel memory search, add and thumbnail
//! requests may hold at once.
//!
//! A 300 KB PNG can decode to 320 MiB (40 MP of 16-bit RGBA), and an 826-byte GIF to a
//! 160 MiB canvas, so the upload size says nothing about the memory a request needs. Each
//! request reads its image's header first ([`crate::decode::probe`]), which gives the cost
//! ([`intake::Header::peak_bytes`]), and takes that many units from one semaphore before
//! decoding; the units come back once the full-size image is gone (the model's view or the
//! thumbnail is all that is kept). A request that cannot get its units within the wait
//! answers 503 (retry later) instead of pushing the server into swap or the OOM killer.
//! A cost above the whole budget is charged the whole budget, so one such image still
//! decodes, alone.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// One unit of the budget, bytes.
const UNIT: u64 = 1 << 20;
/// Decodes at least this large give their memory back to the OS when done (see
/// `trainer::ops::trim_malloc`): the allocator would otherwise keep the peak for good.
const TRIM_AFTER: u64 = 64 << 20;

/// The budget, shared by every handler.
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    sem: Arc<Semaphore>,
    units: u32,
    wait: Duration,
}

/// Memory held for one decode; released when dropped.
#[derive(Debug)]
pub struct DecodePermit {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl Drop for DecodePermit {
    fn drop(&mut self) {
        if self.bytes >= TRIM_AFTER {
            trainer::ops::trim_malloc();
        }
    }
}

impl DecodeBudget {
    /// `bytes` of decoded images at once (at least 1 MiB); requests wait at most `wait`.
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let units = (bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Self {
            sem: Arc::new(Semaphore::new(units as usize)),
            units,
            wait,
        }
    }

    /// Units the budget has free now (for tests and metrics).
    pub fn available_bytes(&self) -> u64 {
        self.sem.available_permits() as u64 * UNIT
    }

    /// The whole budget, bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.units) * UNIT
    }

    /// Takes `bytes` from the budget, waiting up to the configured time; 503 after that.
    pub async fn acquire(&self, bytes: u64) -> Result<DecodePermit, ApiError> {
        let units = bytes.div_ceil(UNIT).clamp(1, u64::from(self.units)) as u32;
        let acquire = self.sem.clone().acquire_many_owned(units);
        match actix_web::rt::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(DecodePermit {
                _permit: permit,
                bytes,
            }),
            Ok(Err(_closed)) => Err(ApiError::Busy("the server is shutting down".into())),
            Err(_elapsed) => Err(ApiError::Busy(format!(
                "the server is decoding other large images (memory budget {} MiB); retry in a moment",
                self.total_bytes() >> 20
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_web::test]
    async fn waits_then_refuses_and_releases() {
        let b = DecodeBudget::new(100 << 20, Duration::from_millis(50));
        let big = b.acquire(80 << 20).await.unwrap();
        assert_eq!(b.available_bytes(), 20 << 20);
        // Over what is left: waits, then 503.
        let e = b.acquire(30 << 20).await.unwrap_err();
        assert!(matches!(e, ApiError::Busy(_)), "{e:?}");
        // Small ones still fit beside it.
        let small = b.acquire(1).await.unwrap();
        drop(small);
        drop(big);
        assert_eq!(b.available_bytes(), 100 << 20);
        // More than the whole budget: charged the whole budget, so it runs alone.
        let huge = b.acquire(500 << 20).await.unwrap();
        assert_eq!(b.available_bytes(), 0);
        drop(huge);
        // A waiter gets the units as soon as they come back.
        let held = b.acquire(100 << 20).await.unwrap();
        let b2 = b.clone();
        let waiter = actix_web::rt::spawn(async move { b2.acquire(60 << 20).await.is_ok() });
        actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        assert!(waiter.await.unwrap());
    }
}
