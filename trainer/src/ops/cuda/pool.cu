// Max and average pooling on NCHW tensors, forward and backward.
//
// Same semantics as the CPU kernels in ../pool.rs: windows are clipped to the real input
// (padding never wins a max; it counts as zero in an average, which always divides by
// KH*KW, PyTorch's count_include_pad=True), and the max-pool gradient goes to the first
// row-major maximum of each window. candle has no backward for overlapping pools at all.
//
// Forward: one thread per output. Backward: one thread per *input* cell, gathering from
// the outputs whose windows contain it (for max pooling, the window's arg-max is recomputed
// and compared), so there are no atomics and the result is deterministic.
// Arguments: x/g/y as named, then B, C, H, W, Ho, Wo, KH, KW, S, PT, PL (top/left padding).

#define POOL_ARGS int B, int C, int H, int W, int Ho, int Wo, int KH, int KW, int S, int PT, int PL
#define GRID_LOOP(i, n)                                                                   \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n);               \
         i += (size_t)blockDim.x * gridDim.x)

// Clipped input range [lo, hi) of output o's window along one axis.
__device__ __forceinline__ void pool_window(int o, int s, int k, int pad, int len, int* lo,
                                            int* hi) {
    const int start = o * s - pad;
    *lo = start < 0 ? 0 : start;
    const int end = start + k;
    *hi = end < 0 ? 0 : (end > len ? len : end);
}

// In-plane index of the first maximum of output (oy, ox)'s window (never empty: pad < k).
template <typename T>
__device__ __forceinline__ int pool_argmax(const T* xp, int H, int W, int oy, int ox, int KH,
                                           int KW, int S, int PT, int PL) {
    int y0, y1, x0, x1;
    pool_window(oy, S, KH, PT, H, &y0, &y1);
    pool_window(ox, S, KW, PL, W, &x0, &x1);
    int best = y0 * W + x0;
    T best_v = xp[best];
    for (int iy = y0; iy < y1; ++iy)
        for (int ix = x0; ix < x1; ++ix) {
            const T v = xp[iy * W + ix];
            if (v > best_v) { best_v = v; best = iy * W + ix; }
        }
    return best;
}

// Outputs along one axis whose window covers input index i: o*s - pad <= i < o*s - pad + k.
__device__ __forceinline__ void covering(int i, int s, int k, int pad, int n_out, int* lo,
                                         int* hi) {
    const int t = i + pad;           // o*s <= t < o*s + k
    int a = t - k + 1;               // o >= ceil(a / s)
    *lo = a <= 0 ? 0 : (a + s - 1) / s;
    int b = t / s + 1;               // o <= floor(t / s)
    *hi = b > n_out ? n_out : b;
}

template <typename T>
__device__ __forceinline__ void max_fwd(const T* __restrict__ x, T* __restrict__ y, POOL_ARGS) {
    GRID_LOOP(i, (size_t)B * C * Ho * Wo) {
        const int ox = (int)(i % Wo);
        const int oy = (int)((i / Wo) % Ho);
        const T* xp = x + (i / ((size_t)Ho * Wo)) * H * W;
        y[i] = xp[pool_argmax(xp, H, W, oy, ox, KH, KW, S, PT, PL)];
    }
}

template <typename T>
__device__ __forceinline__ void max_bwd(const T* __restrict__ x, const T* __restrict__ g,
                                        T* __restrict__ gx, POOL_ARGS) {
    GRID_LOOP(i, (size_t)B * C * H * W) {
        const int ix = (int)(i % W);
        const int iy = (int)((i / W) % H);
        const size_t plane = i / ((size_t)H * W);
        const T* xp = x + plane * H * W;
        const T* gp = g + plane * Ho * Wo;
        int oy0, oy1, ox0, ox1;
        covering(iy, S, KH, PT, Ho, &oy0, &oy1);
        covering(ix, S, KW, PL, Wo, &ox0, &ox1);
        const int me = iy * W + ix;
        T acc = 0;
        for (int oy = oy0; oy < oy1; ++oy)
            for (int ox = ox0; ox < ox1; ++ox)
                if (pool_argmax(xp, H, W, oy, ox, KH, KW, S, PT, PL) == me)
                    acc += gp[oy * Wo + ox];
        gx[i] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void avg_fwd(const T* __restrict__ x, T* __restrict__ y, POOL_ARGS) {
    const T inv = (T)1 / (T)(KH * KW);
    GRID_LOOP(i, (size_t)B * C * Ho * Wo) {
        const int ox = (int)(i % Wo);
        const int oy = (int)((i / Wo) % Ho);
        const T* xp = x + (i / ((size_t)Ho * Wo)) * H * W;
        int y0, y1, x0, x1;
        pool_window(oy, S, KH, PT, H, &y0, &y1);
        pool_window(ox, S, KW, PL, W, &x0, &x1);
        T acc = 0;
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) acc += xp[iy * W + ix];
        y[i] = acc * inv;
    }
}

template <typename T>
__device__ __forceinline__ void avg_bwd(const T* __restrict__ g, T* __restrict__ gx, POOL_ARGS) {
    const T inv = (T)1 / (T)(KH * KW);
    GRID_LOOP(i, (size_t)B * C * H * W) {
        const int ix = (int)(i % W);
        const int iy = (int)((i / W) % H);
        const T* gp = g + (i / ((size_t)H * W)) * Ho * Wo;
        int oy0, oy1, ox0, ox1;
        covering(iy, S, KH, PT, Ho, &oy0, &oy1);
        covering(ix, S, KW, PL, Wo, &ox0, &ox1);
        T acc = 0;
        for (int oy = oy0; oy < oy1; ++oy)
            for (int ox = ox0; ox < ox1; ++ox) acc += gp[oy * Wo + ox];
        gx[i] = acc * inv;
    }
}

#define POOL_PASS B, C, H, W, Ho, Wo, KH, KW, S, PT, PL
#define POOL_INSTANTIATE(T, SUF)                                                          \
    extern "C" __global__ void max_pool_fwd_##SUF(const T* x, T* y, POOL_ARGS) {          \
        max_fwd<T>(x, y, POOL_PASS);                                                      \
    }                                                                                     \
    extern "C" __global__ void max_pool_bwd_##SUF(const T* x, const T* g, T* gx,          \
                                                  POOL_ARGS) {                            \
        max_bwd<T>(x, g, gx, POOL_PASS);                                                  \
    }                                                                                     \
    extern "C" __global__ void avg_pool_fwd_##SUF(const T* x, T* y, POOL_ARGS) {          \
        avg_fwd<T>(x, y, POOL_PASS);                                                      \
    }                                                                                     \
    extern "C" __global__ void avg_pool_bwd_##SUF(const T* g, T* gx, POOL_ARGS) {         \
        avg_bwd<T>(g, gx, POOL_PASS);                                                     \
    }

POOL_INSTANTIATE(float, f32)
POOL_INSTANTIATE(double, f64)
