//! Allocator tuning for tensor-sized buffers.
//!
//! Every candle op returns a fresh `Vec`. glibc serves allocations above its mmap threshold
//! (at most 32 MiB) with a new `mmap`, and gives the pages back on `free`, so each large
//! activation costs a page fault per 4 KiB page plus the kernel zeroing it. Measured on the
//! 2-core dev machine, a batch-32 depthwise 3×3 forward (57 MiB output) spent ~40% of its
//! time in `clear_page`, and ran ~3× faster once freed memory was kept for reuse.

/// Makes glibc keep freed memory for reuse: no `mmap` for large blocks, no trimming of the
/// heap top. Call once at program start, before worker threads exist. Returns whether the
/// settings were applied (always `false` on non-glibc targets, where it does nothing).
///
/// Trade-off: the process keeps its peak heap size instead of returning memory to the OS,
/// which is what a trainer or an embedding server wants.
pub fn tune_glibc_malloc() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_MAX: c_int = -4;
        // SAFETY: mallopt only changes allocator parameters; both are documented glibc knobs.
        unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives the heap's free pages back to the OS (glibc `malloc_trim`). With
/// [`tune_glibc_malloc`] nothing is ever returned on its own, so a server that just decoded
/// a 40 MP upload (hundreds of MiB, freed at once) would keep that size for good: call this
/// after such one-off peaks, not after every model batch (whose buffers are worth keeping).
/// Returns whether memory was released (always `false` on non-glibc targets).
pub fn trim_malloc() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Makes every thread allocate from glibc's main arena. Call after [`tune_glibc_malloc`] in
/// programs whose model runs on a thread other than `main` (the server's inference thread):
/// such a thread allocates from its own arena, whose heaps are at most 64 MiB, so larger
/// activations fall back to a fresh `mmap` (page faults and zeroing on every op) whatever
/// `M_MMAP_MAX` says. Measured with 32 concurrent clients on the 2-core dev machine: the
/// server's throughput went from 41 to 51 queries/s. Small blocks still come from each
/// thread's tcache, so the shared arena's lock is rarely taken. Returns whether it applied.
pub fn single_malloc_arena() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_ARENA_MAX: c_int = -8;
        // SAFETY: mallopt only changes an allocator parameter; M_ARENA_MAX is documented.
        unsafe { mallopt(M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A vector of `len` values for a kernel that writes every element before reading any:
/// skips the zeroing `vec![0.0; len]` does over memory that is about to be overwritten
/// (glibc's `calloc` clears every reused block: 5 % of an embedding forward).
///
/// # Safety
/// The caller must write every element before anything reads it.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn uninit_vec<T: super::elem::Elem>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; `T` is f32 or f64 (no drop, every bit pattern valid
    // once written), and the caller writes each element before it is read.
    unsafe { v.set_len(len) };
    v
}
