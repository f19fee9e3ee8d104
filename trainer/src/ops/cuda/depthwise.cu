// Depthwise 2-D convolution on NCHW tensors: forward, input gradient, weight gradient.
//
// Same maths and argument conventions as the CPU kernels in ../depthwise.rs:
//   x [B, C, H, W], w [C, 1, KH, KW], y [B, C, Ho, Wo],
//   y[b][c][oy][ox] = sum_{ky,kx} w[c][ky][kx] * x[b][c][oy*S + ky - PT][ox*S + kx - PL]
// (zero outside the plane; PT/PL = top/left padding, bottom/right only shape Ho/Wo).
//
// Why not candle's conv2d with groups: candle runs one conv per channel plus a `cat`
// (21-51x slower than PyTorch on an H200). These are the direct kernels PyTorch uses for
// depthwise convs: one thread per output (forward) or per input (input gradient, a gather,
// so no atomics and a deterministic result), one block per filter tap (weight gradient,
// a block-wide reduction over batch and output positions).
//
// Each kernel is a grid-stride loop, so any grid size is correct. 3x3 and 5x5 filters get
// compile-time loop bounds (EfficientNet's only sizes); other sizes use the runtime path.

template <typename T, int K>
__device__ __forceinline__ void dw_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                       T* __restrict__ y, int B, int C, int H, int W,
                                       int Ho, int Wo, int KH, int KW, int S, int PT, int PL) {
    if (K) { KH = K; KW = K; }
    const size_t n = (size_t)B * C * Ho * Wo;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)blockDim.x * gridDim.x) {
        const int ox = (int)(i % Wo);
        const size_t t = i / Wo;
        const int oy = (int)(t % Ho);
        const size_t plane = t / Ho;  // b * C + c
        const int c = (int)(plane % C);
        const T* xp = x + plane * H * W;
        const T* wc = w + (size_t)c * KH * KW;
        const int iy0 = oy * S - PT, ix0 = ox * S - PL;
        T acc = 0;
#pragma unroll
        for (int ky = 0; ky < (K ? K : KH); ++ky) {
            const int iy = iy0 + ky;
            if (iy < 0 || iy >= H) continue;
#pragma unroll
            for (int kx = 0; kx < (K ? K : KW); ++kx) {
                const int ix = ix0 + kx;
                if (ix < 0 || ix >= W) continue;
                acc = fma(wc[ky * KW + kx], xp[iy * W + ix], acc);
            }
        }
        y[i] = acc;
    }
}

// gx[b][c][iy][ix] = sum over taps (ky, kx) whose output position is whole and in range.
template <typename T, int K>
__device__ __forceinline__ void dw_bwd_input(const T* __restrict__ g, const T* __restrict__ w,
                                             T* __restrict__ gx, int B, int C, int H, int W,
                                             int Ho, int Wo, int KH, int KW, int S, int PT,
                                             int PL) {
    if (K) { KH = K; KW = K; }
    const size_t n = (size_t)B * C * H * W;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)blockDim.x * gridDim.x) {
        const int ix = (int)(i % W);
        const size_t t = i / W;
        const int iy = (int)(t % H);
        const size_t plane = t / H;
        const int c = (int)(plane % C);
        const T* gp = g + plane * Ho * Wo;
        const T* wc = w + (size_t)c * KH * KW;
        T acc = 0;
#pragma unroll
        for (int ky = 0; ky < (K ? K : KH); ++ky) {
            const int ty = iy + PT - ky;
            if (ty < 0 || ty % S != 0) continue;
            const int oy = ty / S;
            if (oy >= Ho) continue;
#pragma unroll
            for (int kx = 0; kx < (K ? K : KW); ++kx) {
                const int tx = ix + PL - kx;
                if (tx < 0 || tx % S != 0) continue;
                const int ox = tx / S;
                if (ox >= Wo) continue;
                acc = fma(wc[ky * KW + kx], gp[oy * Wo + ox], acc);
            }
        }
        gx[i] = acc;
    }
}

// One block per (c, ky, kx); blockDim.x must be DW_BLOCK (a power of two).
#define DW_BLOCK 256
template <typename T>
__device__ __forceinline__ void dw_bwd_weight(const T* __restrict__ x, const T* __restrict__ g,
                                              T* __restrict__ gw, int B, int C, int H, int W,
                                              int Ho, int Wo, int KH, int KW, int S, int PT,
                                              int PL) {
    __shared__ T part[DW_BLOCK];
    const int taps = KH * KW;
    const size_t per_plane = (size_t)Ho * Wo;
    const size_t m = (size_t)B * per_plane;
    for (size_t tap = blockIdx.x; tap < (size_t)C * taps; tap += gridDim.x) {
        const int c = (int)(tap / taps);
        const int k = (int)(tap % taps);
        const int ky = k / KW, kx = k % KW;
        T acc = 0;
        for (size_t j = threadIdx.x; j < m; j += blockDim.x) {
            const size_t b = j / per_plane;
            const int r = (int)(j % per_plane);
            const int oy = r / Wo, ox = r % Wo;
            const int iy = oy * S - PT + ky, ix = ox * S - PL + kx;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            const size_t plane = b * C + c;
            acc = fma(g[plane * per_plane + r], x[plane * H * W + (size_t)iy * W + ix], acc);
        }
        part[threadIdx.x] = acc;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) gw[tap] = part[0];
        __syncthreads();
    }
}

#define DW_ARGS int B, int C, int H, int W, int Ho, int Wo, int KH, int KW, int S, int PT, int PL
#define DW_PASS B, C, H, W, Ho, Wo, KH, KW, S, PT, PL

#define DW_INSTANTIATE(T, SUF)                                                              \
    extern "C" __global__ void dw_fwd_##SUF(const T* x, const T* w, T* y, DW_ARGS) {       \
        if (KH == 3 && KW == 3) dw_fwd<T, 3>(x, w, y, DW_PASS);                             \
        else if (KH == 5 && KW == 5) dw_fwd<T, 5>(x, w, y, DW_PASS);                        \
        else dw_fwd<T, 0>(x, w, y, DW_PASS);                                                \
    }                                                                                       \
    extern "C" __global__ void dw_bwd_input_##SUF(const T* g, const T* w, T* gx, DW_ARGS) { \
        if (KH == 3 && KW == 3) dw_bwd_input<T, 3>(g, w, gx, DW_PASS);                      \
        else if (KH == 5 && KW == 5) dw_bwd_input<T, 5>(g, w, gx, DW_PASS);                 \
        else dw_bwd_input<T, 0>(g, w, gx, DW_PASS);                                         \
    }                                                                                       \
    extern "C" __global__ void dw_bwd_weight_##SUF(const T* x, const T* g, T* gw, DW_ARGS) {\
        dw_bwd_weight<T>(x, g, gw, DW_PASS);                                                \
    }

DW_INSTANTIATE(float, f32)
DW_INSTANTIATE(double, f64)
