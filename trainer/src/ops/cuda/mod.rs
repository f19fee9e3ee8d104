//! CUDA kernels for the custom ops (feature `cuda`): depthwise conv and pooling, forward and
//! backward. The CUDA C sources sit next to this file (`depthwise.cu`, `pool.cu`); `build.rs`
//! compiles them to PTX with nvcc and they are embedded here, then loaded once per device
//! (candle caches the module by name).
//!
//! Why our own kernels: candle 0.11's CUDA backend runs a depthwise conv as one conv per
//! channel plus a `cat` (21–51× slower than PyTorch on an H200) and has no backward for
//! overlapping pooling. The kernels follow the CPU ops' semantics exactly (same padding rules,
//! same first-arg-max tie-break), so the CPU/CUDA parity tests can compare them directly.
//!
//! Each kernel is a grid-stride loop over `f32` or `f64` NCHW data; the geometry is passed as
//! eleven `int`s `B, C, H, W, Ho, Wo, KH, KW, S, PT, PL` (see the `.cu` files).

use super::Geom;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Layout, Result, WithDType};

const DEPTHWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/depthwise.ptx"));
const POOL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/pool.ptx"));

/// Threads per block; `dw_bwd_weight` reduces in shared memory of exactly this size
/// (`DW_BLOCK` in depthwise.cu).
const BLOCK: u32 = 256;

/// Largest grid we launch; the kernels loop over whatever one grid does not cover.
const MAX_BLOCKS: usize = 1 << 20;

/// A PTX module of ours.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Module {
    Depthwise,
    Pool,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::Depthwise => "deep_metric_depthwise",
            Module::Pool => "deep_metric_pool",
        }
    }

    fn ptx(self) -> &'static str {
        match self {
            Module::Depthwise => DEPTHWISE_PTX,
            Module::Pool => POOL_PTX,
        }
    }
}

/// How the work of one launch is laid out.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Grid {
    /// One thread per element of an `n`-element tensor.
    Threads(usize),
    /// One block of [`BLOCK`] threads per item (block-wide reductions).
    Blocks(usize),
}

impl Grid {
    fn config(self) -> LaunchConfig {
        let blocks = match self {
            Grid::Threads(n) => n.div_ceil(BLOCK as usize),
            Grid::Blocks(n) => n,
        };
        LaunchConfig {
            grid_dim: (blocks.clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// One input of a launch: storage, layout, and the element count the kernel expects.
pub(crate) type Input<'a> = (&'a CudaStorage, &'a Layout, usize);

/// Runs `kernel` (`_f32`/`_f64` is appended from the inputs' dtype) of `module` on `inputs`,
/// writing a fresh `out_len`-element buffer: arguments are the inputs, the output, then the
/// geometry of `g`.
pub(crate) fn launch(
    op: &str,
    module: Module,
    kernel: &str,
    inputs: &[Input<'_>],
    out_len: usize,
    grid: Grid,
    g: &Geom,
) -> Result<CudaStorage> {
    let Some(&(first, _, _)) = inputs.first() else {
        bail!("{op}: internal error, a CUDA launch without inputs")
    };
    let dev = first.device().clone();
    match first.dtype() {
        DType::F32 => {
            let out = launch_typed::<f32>(op, module, kernel, inputs, out_len, grid, g)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        DType::F64 => {
            let out = launch_typed::<f64>(op, module, kernel, inputs, out_len, grid, g)?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        dt => bail!("{op}: only f32 and f64 are supported on CUDA, got {dt:?}"),
    }
}

fn launch_typed<T: CudaDType + DeviceRepr + WithDType>(
    op: &str,
    module: Module,
    kernel: &str,
    inputs: &[Input<'_>],
    out_len: usize,
    grid: Grid,
    g: &Geom,
) -> Result<CudaSlice<T>> {
    let dev = inputs[0].0.device().clone();
    let views = inputs
        .iter()
        .map(|&(s, l, want)| view::<T>(op, s, l, want))
        .collect::<Result<Vec<_>>>()?;
    let dims = geom_args(op, g)?;
    let suffix = if T::DTYPE == DType::F32 { "f32" } else { "f64" };
    let func =
        dev.get_or_load_custom_func(&format!("{kernel}_{suffix}"), module.name(), module.ptx())?;
    // SAFETY: every kernel writes all `out_len` elements of its output (one thread, or one
    // block, per element), so no uninitialised memory is ever read back.
    let out = unsafe { dev.alloc::<T>(out_len)? };
    {
        let mut b = func.builder();
        for v in &views {
            b.arg(v);
        }
        b.arg(&out);
        for d in &dims {
            b.arg(d);
        }
        // SAFETY: the argument list matches the kernel's signature in the .cu file (inputs,
        // output, 11 ints), and the buffers hold the element counts checked above.
        unsafe { b.launch(grid.config()) }.w()?;
    }
    Ok(out)
}

/// The contiguous `want`-element view of one input.
fn view<'a, T: CudaDType + WithDType>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
    want: usize,
) -> Result<CudaView<'a, T>> {
    if s.dtype() != T::DTYPE {
        bail!(
            "{op}: inputs have different dtypes ({:?} and {:?})",
            T::DTYPE,
            s.dtype()
        )
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: internal error, expected a contiguous input, got {l:?}")
    };
    if end - start != want {
        bail!(
            "{op}: internal error, input has {} elements, expected {want}",
            end - start
        )
    }
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// The kernels' `int` geometry arguments; also checks that in-plane indices fit an `int`.
fn geom_args(op: &str, g: &Geom) -> Result<[i32; 11]> {
    let [pt, _, pl, _] = g.pad;
    let vals = [g.b, g.c, g.h, g.w, g.ho, g.wo, g.kh, g.kw, g.stride, pt, pl];
    let plane = (g.h * g.w).max(g.ho * g.wo);
    if plane > i32::MAX as usize || g.c * g.kh * g.kw > i32::MAX as usize {
        bail!(
            "{op}: a {}x{} plane is too large for the CUDA kernels",
            g.h,
            g.w
        )
    }
    let mut out = [0i32; 11];
    for (o, &v) in out.iter_mut().zip(&vals) {
        *o = i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("{op}: size {v} too large for CUDA")))?;
    }
    Ok(out)
}
