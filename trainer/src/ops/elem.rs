//! Element types the kernels run on, storage access, and the CPU-feature dispatch.
//!
//! The workspace builds for baseline x86-64 (SSE2, no FMA), so the hot loops are written once
//! as `#[inline(always)]` generics over a `FMA` flag and instantiated a second time inside an
//! `#[target_feature(enable = "avx2,fma")]` wrapper; [`has_avx2_fma`] picks the variant at
//! run time. Without this the auto-vectoriser only gets 4-wide SSE and `mul_add` would call
//! the (slow) libm `fmaf`.

use candle_core::{bail, CpuStorage, Layout, Result, WithDType};

/// A float type the kernels support (`f32` for training/inference, `f64` for gradient tests).
pub(crate) trait Elem: WithDType + Copy + Send + Sync {
    /// `a * b + c`, fused when `FMA` (only instantiate `FMA = true` under `avx2,fma`).
    fn madd<const FMA: bool>(a: Self, b: Self, c: Self) -> Self;
    /// Smallest value, the identity of `max`.
    fn neg_infinity() -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn madd<const FMA: bool>(a: Self, b: Self, c: Self) -> Self {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn neg_infinity() -> Self {
        f32::NEG_INFINITY
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn madd<const FMA: bool>(a: Self, b: Self, c: Self) -> Self {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn neg_infinity() -> Self {
        f64::NEG_INFINITY
    }
}

/// True when the running CPU has AVX2 and FMA (std caches the `cpuid` answer).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The contiguous element slice of a storage/layout pair.
///
/// The public entry points call `.contiguous()` before applying an op, so a strided layout here
/// is a bug in this module rather than a user error; it is still reported, not assumed.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: internal error, expected a contiguous input, got {layout:?}"),
    }
}

/// [`contiguous_slice`] that must hold exactly `want` elements (`what` names it in the
/// error): the input check every CPU kernel entry point makes.
pub(crate) fn checked_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
    want: usize,
) -> Result<&'a [T]> {
    let s = contiguous_slice::<T>(storage, layout, op)?;
    if s.len() != want {
        bail!(
            "{op}: internal error, {what} has {} elements, expected {want}",
            s.len()
        )
    }
    Ok(s)
}

/// Number of worker threads the kernels split work for (rayon's pool size).
pub(crate) fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Runs a generic kernel on one element type, dispatching on the CPU storage dtype.
///
/// `$body` is a generic closure-like block evaluated with `$t` bound to `f32` or `f64`.
macro_rules! with_float_storage {
    ($op:expr, $storage:expr, |$t:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: only f32 and f64 tensors are supported, got {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use with_float_storage;
