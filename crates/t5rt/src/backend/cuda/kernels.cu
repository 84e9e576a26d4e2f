// t5rt's CUDA kernels, compiled at run time by NVRTC (see cuda/mod.rs). They need no CUDA
// header: bf16 and fp16 values travel as 16-bit patterns and are converted here by hand, so
// NVRTC compiles them with nothing but its built-ins on any machine.
//
// Every kernel mirrors a CPU kernel of backend/cpu (the reference the GPU tests compare
// against). Shapes are passed as ints; indices are computed in size_t.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define NEG_INF __int_as_float(0xff800000)

// Programmatic dependent launch (sm_90 and later; cuda/mod.rs launches `gemv` and
// `attention_step` that way there): a kernel launched so may start while the kernel before
// it finishes, and PDL_WAIT() is where it waits for that kernel's completion and memory (so
// nothing before it may read what an earlier kernel writes, or write what one reads).
// PDL_LAUNCH() lets the next such kernel start early. Every kernel calls both first thing
// (`gemv` after reading its weights); without the launch attribute they do nothing.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define PDL_LAUNCH() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_WAIT()
#define PDL_LAUNCH()
#endif

// ---------------------------------------------------------------- conversions

// f32 -> bf16 bits, round to nearest even (NaN stays NaN), as backend/cpu/packed.rs bf16_bits.
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> IEEE half bits, round to nearest even, with subnormals, overflow to inf.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 mag = x & 0x7fffffffu;
    if (mag > 0x7f800000u) return (u16)(sign | 0x7e00u);           // NaN
    if (mag >= 0x477ff000u) return (u16)(sign | 0x7c00u);          // rounds to >= 65520: inf
    if (mag < 0x38800000u) {                                       // below 2^-14: subnormal
        if (mag < 0x33000000u) return (u16)sign;                   // below 2^-25: zero
        u32 e = mag >> 23;
        u32 m = (mag & 0x7fffffu) | 0x800000u;
        u32 shift = 126u - e;                                      // 14 - (e - 127) + 23 - 10 - 1
        u32 half_ = m >> (shift);
        u32 rem = m & ((1u << shift) - 1u);
        u32 halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (half_ & 1u))) half_ += 1u;
        return (u16)(sign | half_);
    }
    u32 r = mag - 0x38000000u;                                     // rebias 127 -> 15
    u32 h = r >> 13;
    u32 rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1u;
    return (u16)(sign | h);
}

extern "C" __global__ void to_bf16(const float* x, u16* y, int n) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void to_f16(const float* x, u16* y, int n) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) y[i] = f32_to_f16(x[i]);
}

// Pairs of f32 -> one slot of two bf16 (low = even element), as CpuBackend::compress_kv.
extern "C" __global__ void compress_kv(const float* x, float* y, int pairs) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)pairs) {
        u32 lo = f32_to_bf16(x[2 * i]);
        u32 hi = f32_to_bf16(x[2 * i + 1]);
        y[i] = __uint_as_float(lo | (hi << 16));
    }
}

// ---------------------------------------------------------------- loads through L2

// A 16-byte load through L2 only (never L1 or the read-only cache): for data other blocks of
// the same kernel wrote.
__device__ __forceinline__ float4 ld_cg4(const float4* p) {
    float4 r;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float ld_cg1(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}

__device__ __forceinline__ uint4 ld_cg4u(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

// 16-byte loads, through L2 only when CG (see ld_cg4), else plain.
template <bool CG>
__device__ __forceinline__ float4 ld_f4(const float4* p) {
    return CG ? ld_cg4(p) : *p;
}

template <bool CG>
__device__ __forceinline__ uint4 ld_u4(const uint4* p) {
    return CG ? ld_cg4u(p) : *p;
}

// ---------------------------------------------------------------- block reductions

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (unsigned)warps) ? scratch[lane] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (unsigned)warps) ? scratch[lane] : NEG_INF;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// ---------------------------------------------------------------- elementwise

// T5's RMSNorm: out = w * x / sqrt(mean(x^2) + eps), statistics in f32. One block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int rows, int d,
                                    float eps) {
    PDL_WAIT();
    PDL_LAUNCH();
    __shared__ float scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i] * xr[i];
    s = block_sum(s, scratch);
    float inv = 1.0f / sqrtf(s / (float)d + eps);
    float* o = out + (size_t)r * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = w[i] * (xr[i] * inv);
}

// act: 0 relu, 1 gelu_new (tanh approximation), 2 silu. `up` (gated variants) may be null.
__device__ __forceinline__ float activation(float v, int act) {
    if (act == 0) return v > 0.0f ? v : 0.0f;
    if (act == 1) {
        const float k = 0.7978845608028654f;  // sqrt(2 / pi)
        return 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
    return v / (1.0f + expf(-v));
}

extern "C" __global__ void activate(float* x, const float* up, int n, int act) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) {
        float a = activation(x[i], act);
        x[i] = up ? a * up[i] : a;
    }
}

extern "C" __global__ void scale(float* x, int n, float s) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) x[i] *= s;
}

// out[i, :] = table[ids[i], :] (ids were checked against the vocabulary on the host).
extern "C" __global__ void embed(const u32* ids, const float* table, float* out, int n, int d) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n * d) {
        size_t row = i / d, col = i % d;
        out[i] = table[(size_t)ids[row] * d + col];
    }
}

// cache[b, pos, :] = src[b, :]; pos = step[0] when `step` is given (a captured decoding
// step reads its position from the device), else the argument.
extern "C" __global__ void write_position(const float* src, float* cache, int batch, int width,
                                          int stride, int pos, const u32* step) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (step) pos = (int)step[0];
    if (i < (size_t)batch * width) {
        size_t b = i / width, c = i % width;
        cache[(b * stride + pos) * width + c] = src[i];
    }
}

// dst[i, :] = src[rows[i], :]
extern "C" __global__ void gather_rows(const float* src, const u32* rows, float* dst, int n_rows,
                                       int row_len) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n_rows * row_len) {
        size_t r = i / row_len, c = i % row_len;
        dst[i] = src[(size_t)rows[r] * row_len + c];
    }
}

// dst[r, :new_len] = src[r, start:start + len] padded with zeros (new_len >= len).
extern "C" __global__ void copy_rows(const float* src, float* dst, int rows, int src_len,
                                     int start, int len, int new_len) {
    PDL_WAIT();
    PDL_LAUNCH();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)rows * new_len) {
        size_t r = i / new_len, c = i % new_len;
        dst[i] = c < (size_t)len ? src[r * src_len + start + c] : 0.0f;
    }
}

extern "C" __global__ void fill_column(float* x, int rows, int n, int col, float v) {
    PDL_WAIT();
    PDL_LAUNCH();
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows) x[(size_t)r * n + col] = v;
}

// Index of the largest value of each row (first on ties), one block per row.
extern "C" __global__ void argmax_rows(const float* x, u32* out, int rows, int n) {
    PDL_WAIT();
    PDL_LAUNCH();
    __shared__ float best_v[1024];
    __shared__ u32 best_i[1024];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    float bv = NEG_INF;
    u32 bi = 0xffffffffu;
#pragma unroll 4
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i];
        if (v > bv || (v == bv && (u32)i < bi) || bi == 0xffffffffu) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < (unsigned)s) {
            float ov = best_v[threadIdx.x + s];
            u32 oi = best_i[threadIdx.x + s];
            if (oi != 0xffffffffu &&
                (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x]) ||
                 best_i[threadIdx.x] == 0xffffffffu)) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = best_i[0] == 0xffffffffu ? 0u : best_i[0];
}

// ---------------------------------------------------------------- attention

// The keys [j0, j1) between those masked at the start and the end of mask row m (at least one
// key: the last, when all are masked), as the CPU kernels leave them out.
__device__ __forceinline__ void unmasked_range(const float* m, int kv_len, int* j0, int* j1) {
    while (*j0 < kv_len - 1 && m[*j0] == NEG_INF) (*j0)++;
    while (*j1 > *j0 + 1 && m[*j1 - 1] == NEG_INF) (*j1)--;
}

// One key/value element t of row j: f32, or the bf16 half of a slot (compress_kv's layout).
__device__ __forceinline__ float kv_at(const float* kv, size_t at, int bf16) {
    if (!bf16) return kv[at];
    u32 slot = __float_as_uint(kv[at >> 1]);
    return bf16_to_f32((u16)((at & 1) ? (slot >> 16) : (slot & 0xffffu)));
}

// softmax(q·kᵀ + bias + mask)·v without 1/sqrt(d_kv) (T5), one block per (sequence b,
// head h, query i). q, out: [batch, q_len, heads*d_kv]; k, v: [batch/kv_group, kv_stride,
// heads*d_kv] (bf16 pairs when kv_bf16); bias: [heads, q_len, bias_stride] or null, each row's
// last kv_len values used; mask:
// [batch/kv_group, kv_len] or null. Keys the mask masks at the start or the end of the row
// are skipped, as the CPU kernel does. Scores live in dynamic shared memory (kv_len floats).
extern "C" __global__ void attention(const float* q, const float* k, const float* v,
                                     const float* bias, const float* mask, float* out, int batch,
                                     int heads, int d_kv, int q_len, int kv_len, int kv_stride,
                                     int kv_group, int kv_bf16, int bias_stride) {
    PDL_WAIT();
    PDL_LAUNCH();
    extern __shared__ float scores[];
    __shared__ float scratch[32];
    int idx = blockIdx.x;
    int i = idx % q_len;
    int h = (idx / q_len) % heads;
    int b = idx / (q_len * heads);
    if (b >= batch) return;
    int kb = b / kv_group;
    size_t inner = (size_t)heads * d_kv;
    const float* qr = q + ((size_t)b * q_len + i) * inner + (size_t)h * d_kv;
    int j0 = 0, j1 = kv_len;
    if (mask) unmasked_range(mask + (size_t)kb * kv_len, kv_len, &j0, &j1);
    float mx = NEG_INF;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        size_t base = ((size_t)kb * kv_stride + j) * inner + (size_t)h * d_kv;
        float s = 0.0f;
        for (int t = 0; t < d_kv; t++) s += qr[t] * kv_at(k, base + t, kv_bf16);
        if (bias) s += bias[((size_t)h * q_len + i) * bias_stride + (bias_stride - kv_len) + j];
        if (mask) s += mask[(size_t)kb * kv_len + j];
        scores[j - j0] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        float e = (scores[j - j0] == NEG_INF) ? 0.0f : expf(scores[j - j0] - mx);
        scores[j - j0] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    float inv = 1.0f / sum;
    float* o = out + ((size_t)b * q_len + i) * inner + (size_t)h * d_kv;
    for (int t = threadIdx.x; t < d_kv; t += blockDim.x) {
        float acc = 0.0f;
        for (int j = j0; j < j1; j++) {
            float p = scores[j - j0];
            if (p != 0.0f) acc += p * kv_at(v, ((size_t)kb * kv_stride + j) * inner + (size_t)h * d_kv + t, kv_bf16);
        }
        o[t] = acc * inv;
    }
}

// The middle of attention as two batched products (cuda/mod.rs's attend_gemm, the encoder):
// rows of scores q·kᵀ ([nb sequences from `first`, heads, q_len] rows of kv_len) become the
// weights softmax(s + bias + mask) in place, with `attention`'s conventions: keys masked at
// the start or the end of the row get weight 0 (left out), others exp(-inf) = 0. One block per
// row.
extern "C" __global__ void attention_softmax(float* scores, const float* bias, const float* mask,
                                             int batch, int heads, int q_len, int kv_len,
                                             int kv_group, int bias_stride, int first) {
    PDL_WAIT();
    PDL_LAUNCH();
    __shared__ float scratch[32];
    size_t row = blockIdx.x;
    int i = (int)(row % q_len);
    int h = (int)((row / q_len) % heads);
    int b = first + (int)(row / ((size_t)q_len * heads));
    if (b >= batch) return;
    int kb = b / kv_group;
    float* s = scores + row * kv_len;
    int j0 = 0, j1 = kv_len;
    if (mask) unmasked_range(mask + (size_t)kb * kv_len, kv_len, &j0, &j1);
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        float v = NEG_INF;
        if (j >= j0 && j < j1) {
            v = s[j];
            if (bias) v += bias[((size_t)h * q_len + i) * bias_stride + (bias_stride - kv_len) + j];
            if (mask) v += mask[(size_t)kb * kv_len + j];
        }
        s[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) {
        float e = (s[j] == NEG_INF) ? 0.0f : expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < kv_len; j += blockDim.x) s[j] *= inv;
}

// One query per sequence (a decoding step): the same function as `attention`, laid out for the
// GPU. One block of STEP_THREADS per (sequence b, head h, query i); decoding has one query per
// sequence (q_len 1), the encoder q_len (only with T5RT_CUDA_ENCODER_ATTENTION=step: the
// encoder's default is attend_gemm's batched products). The threads split each key/value row into
// `pieces` 16-byte pieces (4 f32 or 8 bf16 values) and the keys into
// `groups` (STEP_THREADS / pieces), so that a warp reads whole rows, coalesced. Scores: each
// group's lanes reduce their pieces' partial dot products with shuffles. Weighted values: the
// groups' partial sums meet in shared memory. Leading masked keys (a row that joined a running
// batch) are left out and the groups' shares start at the first unmasked key, so that the
// result equals the one without them bit for bit; other masked keys get exp(-inf) = 0, which
// sums add exactly.
// kv_len = step[0] + 1 when `step` is given (the self-attention of a captured decoding step,
// whose length is read on the device); shared memory then holds kv_stride scores.
// Needs d_kv in {8, 16, 32, 64, 128} (pieces a power of two, at most a warp; cuda/mod.rs
// checks; else `attention` serves). Shared memory: [scores: kv_cap][q: d_kv][partials:
// STEP_THREADS * 8].
#define STEP_THREADS 256
__device__ __forceinline__ void unpack_bf16x8(uint4 w, float* f) {
    f[0] = __uint_as_float(w.x << 16); f[1] = __uint_as_float(w.x & 0xffff0000u);
    f[2] = __uint_as_float(w.y << 16); f[3] = __uint_as_float(w.y & 0xffff0000u);
    f[4] = __uint_as_float(w.z << 16); f[5] = __uint_as_float(w.z & 0xffff0000u);
    f[6] = __uint_as_float(w.w << 16); f[7] = __uint_as_float(w.w & 0xffff0000u);
}

// The work of block `bid` of attention_step (the chained kernels run it for some of their
// blocks). CG: q, k and v may have been written by other blocks of the same kernel, so they are
// read through L2 only (ld.global.cg), never a cache that could hold an older copy.
template <bool CG>
__device__ __forceinline__ void attention_step_body(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ bias, const float* __restrict__ mask, float* __restrict__ out,
    int batch, int heads, int d_kv, int q_len, int kv_len, int kv_stride, int kv_group,
    int kv_bf16, int bias_stride, int kv_cap, const u32* __restrict__ step, int bid) {
    extern __shared__ float4 smem4[];
    float* smem = (float*)smem4;
    __shared__ float scratch[32];
    int i = bid % q_len;
    int h = (bid / q_len) % heads;
    int b = bid / (q_len * heads);
    if (b >= batch) return;
    if (step) kv_len = (int)step[0] + 1;
    int kb = b / kv_group;
    size_t inner = (size_t)heads * d_kv;
    size_t row_q = (size_t)b * q_len + i;  // this query's row of q and out
    float* scores = smem;
    float* qs = smem + ((kv_cap + 3) & ~3);
    float* part = qs + d_kv;
    const float* qr = q + row_q * inner + (size_t)h * d_kv;
    for (int t = threadIdx.x; t < d_kv; t += blockDim.x) qs[t] = CG ? ld_cg1(qr + t) : qr[t];
    // The first unmasked key (the last key when all are masked, as the CPU keeps one).
    int j0 = 0;
    if (mask) {
        float first = NEG_INF;  // -(index of the first unmasked key this thread sees)
        for (int j = threadIdx.x; j < kv_len; j += blockDim.x)
            if (mask[(size_t)kb * kv_len + j] != NEG_INF) { first = -(float)j; break; }
        first = block_max(first, scratch);
        j0 = first == NEG_INF ? kv_len - 1 : (int)(-first);
    }
    __syncthreads();  // qs
    int n = kv_len - j0;
    size_t row0 = (size_t)kb * kv_stride + j0;
    size_t head_off = (size_t)h * d_kv;
    int per = kv_bf16 ? 8 : 4;
    int pieces = d_kv / per;
    int groups = blockDim.x / pieces;
    int c = threadIdx.x % pieces, g = threadIdx.x / pieces;
    // Scores: key l = base + g, piece c of its row.
    float qv[8];
#pragma unroll
    for (int u = 0; u < 8; u++) qv[u] = (u < per) ? qs[c * per + u] : 0.0f;
    float mx = NEG_INF;
    for (int base = 0; base < n; base += groups) {  // the same trip count for every thread
        int l = base + g;
        float s = 0.0f;
        if (l < n) {
            size_t at = (row0 + l) * inner + head_off;
            if (kv_bf16) {
                float f[8];
                unpack_bf16x8(ld_u4<CG>((const uint4*)((const u32*)k + at / 2) + c), f);
#pragma unroll
                for (int u = 0; u < 8; u++) s += qv[u] * f[u];
            } else {
                float4 w = ld_f4<CG>((const float4*)(k + at) + c);
                s = qv[0] * w.x + qv[1] * w.y + qv[2] * w.z + qv[3] * w.w;
            }
        }
        for (int o = pieces >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (l < n && c == 0) {
            if (bias)
                s += bias[((size_t)h * q_len + i) * bias_stride + (bias_stride - kv_len) + j0 + l];
            if (mask) s += mask[(size_t)kb * kv_len + j0 + l];
            scores[l] = s;
            mx = fmaxf(mx, s);
        }
    }
    mx = block_max(mx, scratch);  // starts with a barrier: every score is written
    float sum = 0.0f;
    for (int l = threadIdx.x; l < n; l += blockDim.x) {
        float e = (scores[l] == NEG_INF) ? 0.0f : expf(scores[l] - mx);
        scores[l] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);  // ends with a barrier: every weight is written
    float inv = 1.0f / sum;
    // Weighted values: piece c of rows l = g, g + groups, ...
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int l = g; l < n; l += groups) {
        float p = scores[l];
        size_t at = (row0 + l) * inner + head_off;
        if (kv_bf16) {
            float f[8];
            unpack_bf16x8(ld_u4<CG>((const uint4*)((const u32*)v + at / 2) + c), f);
#pragma unroll
            for (int u = 0; u < 8; u++) acc[u] += p * f[u];
        } else {
            float4 w = ld_f4<CG>((const float4*)(v + at) + c);
            acc[0] += p * w.x;
            acc[1] += p * w.y;
            acc[2] += p * w.z;
            acc[3] += p * w.w;
        }
    }
#pragma unroll
    for (int u = 0; u < 8; u++)
        if (u < per) part[(size_t)g * d_kv + c * per + u] = acc[u];
    __syncthreads();
    float* o = out + row_q * inner + head_off;
    for (int t = threadIdx.x; t < d_kv; t += blockDim.x) {
        float total = 0.0f;
        for (int gg = 0; gg < groups; gg++) total += part[(size_t)gg * d_kv + t];
        o[t] = total * inv;
    }
}

extern "C" __global__ void __launch_bounds__(STEP_THREADS)
attention_step(const float* __restrict__ q, const float* __restrict__ k,
               const float* __restrict__ v, const float* __restrict__ bias,
               const float* __restrict__ mask, float* __restrict__ out, int batch, int heads,
               int d_kv, int q_len, int kv_len, int kv_stride, int kv_group, int kv_bf16,
               int bias_stride, int kv_cap, const u32* __restrict__ step) {
    PDL_WAIT();
    PDL_LAUNCH();
    attention_step_body<false>(q, k, v, bias, mask, out, batch, heads, d_kv, q_len, kv_len, kv_stride,
                        kv_group, kv_bf16, bias_stride, kv_cap, step, blockIdx.x);
}

// ---------------------------------------------------------------- skinny products


// Eight f16 values (low half of each word first) to f32, as unpack_bf16x8 does for bf16.
__device__ __forceinline__ void unpack_f16x8(uint4 w, float* f) {
    u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = f16_to_f32((u16)(words[i] & 0xffffu));
        f[2 * i + 1] = f16_to_f32((u16)(words[i] >> 16));
    }
}

// out[r, col] (+)= sum_t x[r, t] * w[col, t] for r < m <= GEMV_ROWS: decoding's products
// (a few rows), bound by reading the weights once. A warp per column: its lanes read the
// weight row 16 bytes at a time (4 f32, or 8 bf16/f16 values widened to f32) against x staged
// in shared memory, GEMV_LOADS pieces per lane in flight before their sums, then reduce with
// shuffles. kind: 0 f32, 1 bf16, 2 f16 weights; the activations stay f32 (not rounded). Needs
// k % 8 == 0 and m * k floats in shared memory.
#define GEMV_ROWS 8
#define GEMV_LOADS 4

// Weight row `col` of a gemv as 16-byte pieces (4 f32 or 8 bf16/f16 values), and their count.
__device__ __forceinline__ const uint4* gemv_row(const void* w, int col, int k, int kind) {
    return (const uint4*)((const char*)w + (size_t)col * k * (kind == 0 ? 4 : 2));
}

__device__ __forceinline__ int gemv_pieces(int k, int kind) { return kind == 0 ? k / 4 : k / 8; }

// This lane's first GEMV_LOADS 16-byte pieces of weight row `col` (pieces lane, lane + 32, ...;
// zeros past the row): `gemv` reads them before it waits for the kernel before it.
__device__ __forceinline__ void gemv_first_pieces(const void* __restrict__ w, int col, int k,
                                                  int kind, int lane, uint4* wv) {
    int pieces = gemv_pieces(k, kind);
    const uint4* wr = gemv_row(w, col, k, kind);
#pragma unroll
    for (int u = 0; u < GEMV_LOADS; u++) {
        int c = lane + 32 * u;
        wv[u] = c < pieces ? wr[c] : make_uint4(0u, 0u, 0u, 0u);
    }
}

// acc[r] += row `col` of w · x[r] over this lane's pieces (lane, lane + 32, ...); `first`: the
// first GEMV_LOADS pieces already read (gemv_first_pieces), or null.
template <int KIND>
__device__ __forceinline__ void gemv_column(const void* __restrict__ w, int col, int k,
                                            const float4* xs4, int m, int lane, float* acc,
                                            const uint4* first) {
    int pieces = gemv_pieces(k, KIND);
    const uint4* wr = gemv_row(w, col, k, KIND);
    for (int c0 = lane; c0 < pieces; c0 += 32 * GEMV_LOADS) {
        uint4 wv[GEMV_LOADS];
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; u++) {
            int c = c0 + 32 * u;
            wv[u] = (first && c0 == lane) ? first[u]
                                           : (c < pieces ? wr[c] : make_uint4(0u, 0u, 0u, 0u));
        }
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; u++) {
            int c = c0 + 32 * u;
            if (c < pieces) {
                if (KIND == 0) {
                    float4 wf = make_float4(__uint_as_float(wv[u].x), __uint_as_float(wv[u].y),
                                            __uint_as_float(wv[u].z), __uint_as_float(wv[u].w));
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; r++) {
                        if (r < m) {
                            float4 xv = xs4[(r * k) / 4 + c];
                            acc[r] += wf.x * xv.x + wf.y * xv.y + wf.z * xv.z + wf.w * xv.w;
                        }
                    }
                } else {
                    float f[8];
                    if (KIND == 1) unpack_bf16x8(wv[u], f);
                    else unpack_f16x8(wv[u], f);
#pragma unroll
                    for (int r = 0; r < GEMV_ROWS; r++) {
                        if (r < m) {
                            float4 a = xs4[(r * k) / 4 + 2 * c], bq = xs4[(r * k) / 4 + 2 * c + 1];
                            acc[r] += f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w +
                                      f[4] * bq.x + f[5] * bq.y + f[6] * bq.z + f[7] * bq.w;
                        }
                    }
                }
            }
        }
    }
}

__device__ __forceinline__ void gemv_column_any(int kind, const void* w, int col, int k,
                                                const float4* xs4, int m, int lane, float* acc,
                                                const uint4* first) {
    if (kind == 0) gemv_column<0>(w, col, k, xs4, m, lane, acc, first);
    else if (kind == 1) gemv_column<1>(w, col, k, xs4, m, lane, acc, first);
    else gemv_column<2>(w, col, k, xs4, m, lane, acc, first);
}

// Fused forms (decoding's sublayers in fewer launches):
// - norm_w non-null: x's rows go through T5's RMSNorm (eps): x is the sublayer's input, staged
//   times norm_w, and each row's sum is scaled by its 1 / rms at the end (the same value as
//   rms_norm's w * (x * inv), rounded in another order); the normalized rows are never written;
// - act >= 0 (activation's codes): out = act(sum); with `gated`, out0 = act(x · w0) * (x · w1),
//   one product (gridDim.y = 1), as `activate` does with `up`;
// - cache_rows > 0: products 1 and 2 (a decoding step's keys and values) go straight into the
//   caches out1/out2, row r at position p of r's cache_rows (p = step[0] when `step` is given,
//   a captured step; else pos), as write_position would put them.
// The work of block (bx, by) of a gemv grid `gx` blocks wide. `wait()` runs after the block
// has read the first weights of its first column and before it reads anything an earlier
// kernel (or block) writes. `chained`: x was written by other blocks of the same kernel, so
// it is read through L2 (ld.global.cg), never a cache that could hold an older copy.
template <class Wait>
__device__ __forceinline__ void gemv_body(
    const float* x, const void* w0, const void* w1, const void* w2, float* out0, float* out1,
    float* out2, int m, int n, int k, int kind, int accumulate, const float* __restrict__ norm_w,
    float eps, int act, int gated, int cache_rows, const u32* __restrict__ step, int pos, int bx,
    int by, int gx, int chained, Wait wait) {
    // Up to three products of the same input and shape in one launch (q, k and v): product
    // by reads weights w<by> and writes out<by>; a single product passes one grid row.
    const void* __restrict__ w = by == 0 ? w0 : (by == 1 ? w1 : w2);
    float* __restrict__ out = by == 0 ? out0 : (by == 1 ? out1 : out2);
    extern __shared__ float4 xs4[];
    __shared__ float inv_rms[GEMV_ROWS];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int warps = blockDim.x >> 5;
    // The weights of this warp's first column are read first: no kernel writes them, so
    // under a programmatic launch this overlaps the kernel before.
    int col0 = bx * warps + warp;
    uint4 first[GEMV_LOADS], first_up[GEMV_LOADS];
    if (col0 < n) {
        gemv_first_pieces(w, col0, k, kind, lane, first);
        if (gated) gemv_first_pieces(w1, col0, k, kind, lane, first_up);
    }
    wait();
    if (norm_w) {
        // Each row's 1 / rms (a warp per row, from x itself) while the block stages x * w.
        for (int r = warp; r < m; r += warps) {
            float s = 0.0f;
            for (int t = lane; t < k; t += 32) s += x[(size_t)r * k + t] * x[(size_t)r * k + t];
            s = warp_sum(s);
            if (lane == 0) inv_rms[r] = 1.0f / sqrtf(s / (float)k + eps);
        }
        const float4* nw4 = (const float4*)norm_w;
        for (int i = threadIdx.x; i < m * k / 4; i += blockDim.x) {
            float4 v = ((const float4*)x)[i], g = nw4[i % (k / 4)];
            xs4[i] = make_float4(v.x * g.x, v.y * g.y, v.z * g.z, v.w * g.w);
        }
    } else if (chained) {
        for (int i = threadIdx.x; i < m * k / 4; i += blockDim.x) xs4[i] = ld_cg4((const float4*)x + i);
    } else {
        for (int i = threadIdx.x; i < m * k / 4; i += blockDim.x) xs4[i] = ((const float4*)x)[i];
    }
    __syncthreads();
    if (cache_rows > 0 && step) pos = (int)step[0];
    for (int col = col0; col < n; col += gx * warps) {
        float acc[GEMV_ROWS], up[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) acc[r] = up[r] = 0.0f;
        gemv_column_any(kind, w, col, k, xs4, m, lane, acc, col == col0 ? first : nullptr);
        if (gated)
            gemv_column_any(kind, w1, col, k, xs4, m, lane, up, col == col0 ? first_up : nullptr);
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r < m) {
                float sum = warp_sum(acc[r]);
                float u = gated ? warp_sum(up[r]) : 0.0f;
                if (lane == 0) {
                    size_t at = (size_t)r * n + col;
                    if (cache_rows > 0 && by > 0) at = ((size_t)r * cache_rows + pos) * n + col;
                    if (norm_w) {
                        sum *= inv_rms[r];
                        u *= inv_rms[r];
                    }
                    if (act >= 0) sum = gated ? activation(sum, act) * u : activation(sum, act);
                    out[at] = accumulate ? out[at] + sum : sum;
                }
            }
        }
    }
}

struct PdlWait {
    __device__ __forceinline__ void operator()() const {
        PDL_WAIT();
        PDL_LAUNCH();
    }
};

extern "C" __global__ void __launch_bounds__(256)
gemv(const float* __restrict__ x, const void* w0, const void* w1, const void* w2, float* out0,
     float* out1, float* out2, int m, int n, int k, int kind, int accumulate,
     const float* __restrict__ norm_w, float eps, int act, int gated, int cache_rows,
     const u32* __restrict__ step, int pos) {
    gemv_body(x, w0, w1, w2, out0, out1, out2, m, n, k, kind, accumulate, norm_w, eps, act, gated,
              cache_rows, step, pos, blockIdx.x, blockIdx.y, gridDim.x, 0, PdlWait());
}

// ---------------------------------------------------------------- chained kernels

// A sublayer's attention and its output projection in one launch (attention_o): blocks take
// their roles from a ticket (an atomic counter), so that every block of an earlier role has
// started, and will finish, before a later one waits for it: no deadlock, whatever order the
// hardware starts blocks in. sync[0]: tickets; sync[1]: attention blocks done; sync[2]: gemv
// blocks done. Each counter is back to 0 when the kernel ends (the last ticket, and the last
// gemv block, reset them), ready for the next launch.

// Waits (thread 0 spinning, then the whole block) until *counter reaches `target`. A wait
// past 2^24 polls (seconds) traps: a bug in the chaining then fails the launch with an error
// instead of hanging the GPU.
__device__ __forceinline__ void wait_count(const u32* counter, u32 target) {
    if (threadIdx.x == 0) {
        u32 polls = 0;
        while (*(volatile const u32*)counter < target) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 700)
            __nanosleep(64);
#endif
            if (++polls == (1u << 24)) asm volatile("trap;");
        }
        __threadfence();
    }
    __syncthreads();
}

// Makes the block's writes visible to the whole GPU, then adds 1 to *counter; returns the
// count before (thread 0's, broadcast to the block). The barrier orders every thread's writes
// before thread 0's fence, which (cumulative) orders them before its atomic: the pattern of
// cooperative groups' grid barrier.
__device__ __forceinline__ u32 signal_count(u32* counter) {
    __shared__ u32 before;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        before = atomicAdd(counter, 1u);
    }
    __syncthreads();
    return before;
}

// Takes this block's ticket (sync[0]; the last ticket resets the counter, every block having
// taken one). A block's role follows from its ticket, so every block of an earlier role has
// started before any later one waits for it.
__device__ __forceinline__ u32 take_ticket(u32* sync) {
    __shared__ u32 ticket;
    if (threadIdx.x == 0) {
        ticket = atomicAdd(&sync[0], 1u);
        if (ticket == gridDim.x - 1) atomicExch(&sync[0], 0u);
    }
    __syncthreads();
    return ticket;
}

// The last role of a chained kernel: x += in · oᵀ (m rows, n outputs of k inputs, weights of
// gemv's `kind`), as gemv's block `vb` of `nb`, once sync[last - 1] reaches `wait_for` (every
// block of the role before is done; `in` is read through L2); the last of these blocks resets
// sync[1..last] for the next launch (every block is past its wait by then).
__device__ __forceinline__ void chained_output(const float* in, const void* o, float* x, int m,
                                               int n, int k, int kind, u32 vb, u32 nb, u32* sync,
                                               int last, u32 wait_for) {
    const u32* done = &sync[last - 1];
    gemv_body(in, o, o, o, x, x, x, m, n, k, kind, 1, nullptr, 0.0f, -1, 0, 0, nullptr, 0, (int)vb,
              0, (int)nb, 1, [&]() { wait_count(done, wait_for); });
    if (signal_count(&sync[last]) == nb - 1 && threadIdx.x == 0) {
        for (int i = 1; i <= last; i++) atomicExch(&sync[i], 0u);
    }
}

// x[r] += attention(q, k, v)[r] · oᵀ for the r < batch rows of a decoding step: blocks
// [0, batch * heads) run attention_step's blocks (writing `attn`), the rest gemv's blocks of
// the output projection (weights o, kind `kind`, n outputs of `heads * d_kv` inputs), each
// starting once every attention block is done. Bit for bit the two kernels' results.
extern "C" __global__ void __launch_bounds__(STEP_THREADS)
attention_o(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
            const float* __restrict__ bias, const float* __restrict__ mask, float* attn, int batch,
            int heads, int d_kv, int q_len, int kv_len, int kv_stride, int kv_group, int kv_bf16,
            int bias_stride, int kv_cap, const u32* __restrict__ step, const void* o, float* x,
            int n, int kind, u32* sync) {
    // (q_len is 1: attention_step's parameters, as the host builds them for both kernels.)
    PDL_WAIT();
    PDL_LAUNCH();
    u32 t = take_ticket(sync);
    u32 n_attn = (u32)(batch * heads);
    if (t < n_attn) {
        attention_step_body<false>(q, k, v, bias, mask, attn, batch, heads, d_kv, q_len, kv_len,
                                   kv_stride,
                            kv_group, kv_bf16, bias_stride, kv_cap, step, (int)t);
        signal_count(&sync[1]);
        return;
    }
    chained_output(attn, o, x, batch, n, heads * d_kv, kind, t - n_attn, gridDim.x - n_attn, sync,
                   2, n_attn);
}

// An attention sublayer of a decoding step in one launch (gemv_attention_o), three roles in
// ticket order: `gy` products of gemv with the norm fused (self-attention: q, k and v, the
// step's keys and values written into the caches, as norm_qkv_step's launch; cross-attention:
// q alone, gy = 1), then attention_step's blocks once every product block is done (sync[1]),
// reading q, k and v through L2, then the output product's gemv blocks once every attention
// block is done (sync[2]), x += attn · oᵀ. The last output block resets sync[1..3].
// Bit for bit the three launches' results.
extern "C" __global__ void __launch_bounds__(STEP_THREADS)
gemv_attention_o(const float* x_in, const void* w0, const void* w1, const void* w2, float* out0,
                 float* out1, float* out2, int m, int n, int k, int kind,
                 const float* __restrict__ norm_w, float eps, int cache_rows,
                 const u32* __restrict__ gemv_step, int pos, int gy, const float* q,
                 const float* kc, const float* vc, const float* __restrict__ bias,
                 const float* __restrict__ mask, float* attn, int batch, int heads, int d_kv,
                 int q_len, int kv_len, int kv_stride, int kv_group, int kv_bf16, int bias_stride,
                 int kv_cap, const u32* __restrict__ step, const void* o, float* x, int n_o,
                 int kind_o, u32* sync) {
    // (q is out0, kc / vc the caches out1 / out2 write (or the cross-attention's); q_len 1.)
    PDL_WAIT();
    PDL_LAUNCH();
    u32 t = take_ticket(sync);
    int warps = blockDim.x >> 5;
    u32 gx = (u32)((n + warps - 1) / warps);
    u32 n_proj = gx * (u32)gy;
    u32 n_attn = (u32)(batch * heads);
    if (t < n_proj) {
        gemv_body(x_in, w0, w1, w2, out0, out1, out2, m, n, k, kind, 0, norm_w, eps, -1, 0,
                  cache_rows, gemv_step, pos, (int)(t % gx), (int)(t / gx), (int)gx, 0, []() {});
        signal_count(&sync[1]);
        return;
    }
    if (t < n_proj + n_attn) {
        wait_count(&sync[1], n_proj);
        attention_step_body<true>(q, kc, vc, bias, mask, attn, batch, heads, d_kv, q_len, kv_len,
                                  kv_stride, kv_group, kv_bf16, bias_stride, kv_cap, step,
                                  (int)(t - n_proj));
        signal_count(&sync[2]);
        return;
    }
    u32 first = n_proj + n_attn;
    chained_output(attn, o, x, batch, n_o, heads * d_kv, kind_o, t - first, gridDim.x - first, sync,
                   3, n_attn);
}

// A feed-forward sublayer of a decoding step in one launch (gemv_gemv): the first n_up / 8
// blocks run norm_ffn_up's gemv (ff = act(norm(x) · w0ᵀ) [* norm(x) · w1ᵀ]), the rest, once
// a counter says all of those are done, wo's (x += ff · woᵀ). Counters as attention_o's.
// Bit for bit the two gemv launches' results.
extern "C" __global__ void __launch_bounds__(256)
gemv_gemv(const float* x_in, const void* w0, const void* w1, float* ff, int m, int n_up, int k,
          int kind, const float* __restrict__ norm_w, float eps, int act, int gated,
          const void* wo, float* x, int kind_o, u32* sync) {
    PDL_WAIT();
    PDL_LAUNCH();
    u32 t = take_ticket(sync);
    int warps = blockDim.x >> 5;
    u32 n_first = (u32)((n_up + warps - 1) / warps);
    if (t < n_first) {
        gemv_body(x_in, w0, w1, w0, ff, ff, ff, m, n_up, k, kind, 0, norm_w, eps, act, gated, 0,
                  nullptr, 0, (int)t, 0, (int)n_first, 0, []() {});
        signal_count(&sync[1]);
        return;
    }
    chained_output(ff, wo, x, m, k, n_up, kind_o, t - n_first, gridDim.x - n_first, sync, 2,
                   n_first);
}
