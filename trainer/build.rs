//! With the `cuda` feature, compiles the CUDA kernels in `src/ops/cuda/*.cu` to PTX with nvcc
//! (into `OUT_DIR`, embedded by `src/ops/cuda/mod.rs`). Without it, does nothing.
//!
//! Why PTX at build time rather than NVRTC at run time: a kernel that does not compile then
//! fails the build (on the GPU-less build machine) instead of the first run on a GPU.
//! nvcc is found as `$NVCC`, else `$CUDA_ROOT/bin/nvcc`, else on `PATH` (scripts/cuda-build.sh
//! sets this up); the PTX targets `compute_$CUDA_COMPUTE_CAP` (default 80), which the driver
//! JIT-compiles for that GPU generation and every newer one.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &[&str] = &["depthwise", "pool"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_COMPUTE_CAP", "NVCC_APPEND_FLAGS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = nvcc_path();
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let cap = cap.trim().replace('.', "");
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP must be a compute capability like 90 or 8.0, got {cap:?}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in KERNELS {
        let src = Path::new("src/ops/cuda").join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nvcc ({}): {e}. The `cuda` feature needs the CUDA toolkit; \
                     build with scripts/cuda-build.sh or set NVCC / CUDA_ROOT",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn nvcc_path() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(root) = std::env::var_os("CUDA_ROOT") {
        let p = Path::new(&root).join("bin/nvcc");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("nvcc")
}
