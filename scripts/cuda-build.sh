#!/usr/bin/env bash
# Build the CUDA variant of the Deep Metric binaries on a machine without a GPU.
#
# Why this script: candle's `cuda` feature compiles its kernels with nvcc and links against
# libcuda/libcublas/libcurand/libnvrtc/libcudart at build time. None of that is installed here,
# so we install NVIDIA's pip wheels pinned to CUDA 13.0 (the GPU machines' driver is CUDA 13.0 and
# cudarc 0.19 rejects newer toolkits), give the linker unversioned symlinks to them, and a stub
# libcuda.so (the driver library ships with the driver, not in any wheel; the real one is used at
# run time). See docs/cuda.md.
#
# Every step is skipped when already done, so re-running only rebuilds what changed.
#
# Environment (all optional):
#   CUDA_TARGET_DIR   cargo target dir for the CUDA build (default: .cuda/target; it must differ
#                     from the CPU build's, the `cuda` feature changes candle's features)
#   CUDA_COMPUTE_CAP  GPU compute capability to build kernels for (default 90: H100/H200)
#   PYTHON            python with pip (default python3)
#   SHARED            the shared data folder (default: ../shared beside the repository)
#
# Output:
#   .cuda/dist/  what scripts/gpu-check.sh needs on the GPU machine (carry this folder; it must
#                stay under the device tool's 64 MiB with the repository):
#                trainer-cuda-tests.gz, trainer.gz (stripped, gzipped), the EfficientNet-Lite0
#                weights and cub100-mini.tar (every cub100 class, 12 images each, 256 px)
#   .cuda/bin/{trainer,indexer,search-server}.gz    the programs
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_DIR="$ROOT/.cuda"
WHEELS="$CUDA_DIR/wheels"
LINKDIR="$CUDA_DIR/link"
DIST="$CUDA_DIR/dist"
PYTHON="${PYTHON:-python3}"
SHARED="${SHARED:-$ROOT/../shared}"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$CUDA_DIR/target}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

log() { printf '[cuda-build] %s\n' "$*" >&2; }
die() { printf '[cuda-build] error: %s\n' "$*" >&2; exit 1; }

# Pinned wheels: "pip requirement|dist-info prefix|version prefix the install must have".
PINS=(
  "nvidia-cuda-nvcc==13.0.*|nvidia_cuda_nvcc|13.0."
  "nvidia-nvvm==13.0.*|nvidia_nvvm|13.0."
  "nvidia-cuda-crt==13.0.*|nvidia_cuda_crt|13.0."
  "nvidia-cuda-cccl==13.0.*|nvidia_cuda_cccl|13.0."
  "nvidia-cuda-runtime==13.0.*|nvidia_cuda_runtime|13.0."
  "nvidia-cublas==13.0.*|nvidia_cublas|13.0."
  "nvidia-curand|nvidia_curand|"  # any: libcurand.so.10 in all cu13 wheels
  "nvidia-cuda-nvrtc==13.0.*|nvidia_cuda_nvrtc|13.0."
)

# --- 1. wheels ---------------------------------------------------------------------------------
install_wheels() {
  local stamp="$WHEELS/.pins" want
  want="$(printf '%s\n' "${PINS[@]}")"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    log "wheels: already installed in $WHEELS"
    return
  fi
  "$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip: install pip or set PYTHON"
  rm -rf "$WHEELS"
  mkdir -p "$WHEELS"
  local reqs=() pin
  for pin in "${PINS[@]}"; do reqs+=("${pin%%|*}"); done
  # --no-deps: pip would otherwise pull newer CUDA versions in as dependencies of these.
  log "wheels: installing ${reqs[*]}"
  nice -n 19 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$WHEELS" "${reqs[@]}" || die "pip install of the CUDA 13.0 wheels failed (network?)"
  local prefix ver found
  for pin in "${PINS[@]}"; do
    prefix="$(cut -d'|' -f2 <<<"$pin")"; ver="$(cut -d'|' -f3 <<<"$pin")"
    found="$(ls -d "$WHEELS/${prefix}-"*.dist-info 2>/dev/null | head -n1)"
    [[ -n "$found" ]] || die "wheel $prefix missing from $WHEELS after pip install"
    [[ "$(basename "$found")" == "${prefix}-${ver}"* ]] || die "$(basename "$found") is not version ${ver}*"
  done
  printf '%s\n' "$want" >"$stamp"
}

install_wheels
CU="$WHEELS/nvidia/cu13"
[[ -x "$CU/bin/nvcc" ]] || die "$CU/bin/nvcc missing: delete $WHEELS and re-run"

# --- 2. link dir: unversioned symlinks (the wheels only ship libfoo.so.N) ---------------------
mkdir -p "$LINKDIR"
for lib in cublas cublasLt curand nvrtc cudart; do
  target="$(ls "$CU/lib/lib$lib.so."* 2>/dev/null | grep -E "/lib$lib\.so\.[0-9]+$" | head -n1 || true)"
  [[ -n "$target" ]] || die "lib$lib.so.N not found in $CU/lib"
  ln -sfn "$target" "$LINKDIR/lib$lib.so"
done

export PATH="$CU/bin:$PATH"
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export NVCC_APPEND_FLAGS="-I$CU/include/cccl"
export RUSTFLAGS="${RUSTFLAGS:-} -L $LINKDIR"
export LD_LIBRARY_PATH="$CU/lib:$LINKDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# --- 3. libraries first (no linking of libcuda yet), then the stub made from what they use ----
log "cargo: building the libraries (candle-kernels takes ~15 CPU-minutes cold) into $CARGO_TARGET_DIR"
nice -n 19 cargo build --release --features cuda -p trainer --lib

make_stub() {
  local syms="$LINKDIR/libcuda.syms" src="$LINKDIR/libcuda_stub.c"
  # Driver-API symbols (cuInit, cuMemAlloc_v2, ...) that the rlibs leave undefined; the
  # runtime (cuda*), cuBLAS and cuRAND symbols come from the real wheel libraries.
  find "$CARGO_TARGET_DIR/release/deps" -name '*.rlib' -print0 \
    | xargs -0 nm -u 2>/dev/null \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*' \
    | grep -vE '^(cublas|curand|cuda[A-Z])' | sort -u >"$syms.new"
  [[ -s "$syms.new" ]] || die "no undefined cu* symbols found in the rlibs: did the build above use --features cuda?"
  if [[ -f "$LINKDIR/libcuda.so" && -f "$syms" ]] && cmp -s "$syms" "$syms.new"; then
    rm "$syms.new"; log "stub libcuda.so: up to date"; return
  fi
  mv "$syms.new" "$syms"
  {
    echo "/* Generated by scripts/cuda-build.sh: link-time stand-in for the driver's libcuda.so.1."
    echo "   Every function returns CUDA_ERROR_NO_DEVICE (100), so a binary that loads this stub"
    echo "   by mistake reports 'no CUDA device' instead of crashing. */"
    while read -r s; do echo "int $s(void) { return 100; }"; done <"$syms"
  } >"$src"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINKDIR/libcuda.so" "$src"
  ln -sfn libcuda.so "$LINKDIR/libcuda.so.1"
  log "stub libcuda.so: $(wc -l <"$syms") symbols"
}
make_stub

# --- 4. test binary, bench example, programs (most needed first) --------------------------------
log "cargo: building the trainer test binary (parity tests)"
test_bin="$(nice -n 19 cargo test --release --features cuda -p trainer --lib --no-run \
  --message-format=json-render-diagnostics \
  | "$PYTHON" -c 'import json,sys
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m.get("profile",{}).get("test") and m.get("executable"):
        print(m["executable"])' | tail -n1)"
[[ -n "$test_bin" ]] || die "could not build the trainer test binary (run: cargo test --release --features cuda -p trainer --no-run)"
log "cargo: building the programs and the cuda_bench example"
nice -n 19 cargo build --release --features cuda -p trainer -p indexer -p search-server --bins
nice -n 19 cargo build --release --features cuda -p trainer --example cuda_bench

# --- 5. strip + gzip ----------------------------------------------------------------------------
# .cuda/dist: what scripts/gpu-check.sh needs on the GPU machine (carry this folder; it must
# stay well under the device tool's 64 MiB). .cuda/bin: the three programs, for deployment.
pack() { # pack SRC DIR NAME
  local src="$1" dir="$2" out="$2/$3.gz"
  mkdir -p "$dir"
  if [[ -f "$out" && "$out" -nt "$src" ]]; then log "$out: up to date"; return; fi
  strip -o "$dir/$3" "$src"
  gzip -9 -f "$dir/$3"
  log "$out: $(du -h "$out" | cut -f1)"
}
pack "$test_bin" "$DIST" trainer-cuda-tests
pack "$CARGO_TARGET_DIR/release/trainer" "$DIST" trainer
pack "$CARGO_TARGET_DIR/release/indexer" "$CUDA_DIR/bin" indexer
pack "$CARGO_TARGET_DIR/release/search-server" "$CUDA_DIR/bin" search-server
mkdir -p "$CUDA_DIR/bin" && cp -f "$DIST/trainer.gz" "$CUDA_DIR/bin/trainer.gz"

# --- 6. the check's weights and data (the GPU machine has neither) ------------------------------
W="$SHARED/models/efficientnet-lite0/efficientnet-lite0-57934424.pth"
if [[ -f "$W" ]]; then
  cp -f "$W" "$DIST/"
else
  log "warning: $W not found (set SHARED): gpu-check.sh then needs shared/ on the GPU machine"
fi
if [[ -f "$SHARED/data/cub100/CUB_200_2011/images.txt" ]]; then
  if [[ ! -f "$DIST/cub100-mini.tar" ]]; then
    nice -n 19 "$PYTHON" "$ROOT/scripts/cub-mini.py" "$SHARED/data/cub100/CUB_200_2011" \
      "$DIST/cub100-mini.tar" --per-class 12 --side 256 --quality 75 >&2
  fi
else
  log "warning: $SHARED/data/cub100 not found: gpu-check.sh then needs shared/ on the GPU machine"
fi
size_mib=$(($(du -sb "$DIST" | cut -f1) >> 20))
((size_mib <= 60)) || log "warning: $DIST is $size_mib MiB: with the repository it may not fit the device tool's 64 MiB"
log "done: $size_mib MiB in $DIST (carry it to the GPU machine), binaries in $CUDA_DIR/bin"
