// The floor of a decoding step made of many small dependent kernels, and of the alternative:
// one persistent kernel whose phases are separated by grid-wide barriers (issue 9). A t5-base
// batch-1 step is ~100 dependent kernels of 96-4000 blocks, 0.55-0.60 ms in graph replay on an
// H200; each kernel reads ~1.2 MB in a few microseconds. This measures, on the card at hand:
//   1. empty kernels in a row (stream launches, then one CUDA graph of them): the cost per
//      dependent kernel that no kernel-side work can remove;
//   2. the same with each kernel reading 1.2 MB (96 blocks of 256 threads, 16-byte loads), so
//      that a kernel's own ramp-up and tail are counted too;
//   3. one persistent kernel (one block per SM, co-resident) passing the same number of
//      grid-wide barriers (an atomic counter and a spin on it), with and without the 1.2 MB read
//      between barriers.
// Built and run on the GPU machine by scripts/gpu-session.sh (FLOOR=1) with nvcc; prints one
// line per measurement (microseconds per kernel or per barrier, median of 20 runs).
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x)                                                                          \
    do {                                                                                  \
        cudaError_t e = (x);                                                              \
        if (e != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

constexpr int KERNELS = 100;         // about a t5-base step
constexpr size_t READ_BYTES = 1 << 20 | 1 << 18;  // 1.25 MiB: a 768 x 768 bf16 weight and change
constexpr int READ_BLOCKS = 96, THREADS = 256;

__global__ void empty_kernel(int* sink) {
    if (sink && threadIdx.x == 0 && blockIdx.x == 0 && *sink == 12345) *sink = 0;
}

// Each thread sums 16-byte loads over its slice; the sum goes to `out` so the loads stay.
__global__ void read_kernel(const uint4* __restrict__ w, size_t n, float* out) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    unsigned acc = 0;
    for (; i < n; i += stride) {
        uint4 v = w[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[0] = 1.0f;
}

// `phases` grid-wide barriers; between them, when `w` is given, the grid reads phase p's own
// `n` 16-byte values (`w + p n`: the read kernels' work, spread over the persistent grid). A
// barrier that waits 2^26 polls traps (blocks not co-resident) instead of hanging the GPU.
__global__ void persistent_kernel(unsigned* counter, int phases, const uint4* __restrict__ w,
                                  size_t n, float* out) {
    unsigned acc = 0;
    for (int p = 0; p < phases; p++) {
        if (w) {
            const uint4* wp = w + (size_t)p * n;
            size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
            size_t stride = (size_t)gridDim.x * blockDim.x;
            for (; i < n; i += stride) {
                uint4 v = wp[i];
                acc ^= v.x ^ v.y ^ v.z ^ v.w;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            unsigned target = (unsigned)(p + 1) * gridDim.x;
            atomicAdd(counter, 1u);
            long polls = 0;
            while (atomicAdd(counter, 0u) < target) {
                if (++polls > (1L << 26)) __trap();
            }
            __threadfence();
        }
        __syncthreads();
    }
    if (acc == 0x9e3779b9u) out[0] = 1.0f;
}

template <class F>
static float median_us(F run, int reps = 20) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    run();  // warm-up
    CHECK(cudaDeviceSynchronize());
    std::vector<float> t;
    for (int r = 0; r < reps; r++) {
        CHECK(cudaEventRecord(a));
        run();
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1000.0f);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    int sms = prop.multiProcessorCount;
    printf("card: %s, %d SMs\n", prop.name, sms);
    size_t n16 = READ_BYTES / 16;
    uint4* w;
    float* out;
    unsigned* counter;
    int* sink;
    CHECK(cudaMalloc(&w, READ_BYTES * KERNELS));  // a different weight for each kernel
    CHECK(cudaMemset(w, 1, READ_BYTES * KERNELS));
    CHECK(cudaMalloc(&out, 4));
    CHECK(cudaMalloc(&counter, 4));
    CHECK(cudaMalloc(&sink, 4));
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));

    auto graph_of = [&](auto body) {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        body();
        CHECK(cudaStreamEndCapture(s, &g));
        CHECK(cudaGraphInstantiate(&ge, g, 0));
        return ge;
    };
    auto empties = [&] {
        for (int k = 0; k < KERNELS; k++) empty_kernel<<<1, 32, 0, s>>>(sink);
    };
    auto reads = [&] {
        for (int k = 0; k < KERNELS; k++)
            read_kernel<<<READ_BLOCKS, THREADS, 0, s>>>(w + k * n16, n16, out);
    };
    cudaGraphExec_t g_empty = graph_of(empties), g_read = graph_of(reads);
    auto in_stream = [&](auto body) {
        return [&, body] {
            body();
            CHECK(cudaStreamSynchronize(s));
        };
    };
    float t;
    t = median_us(in_stream(empties));
    printf("empty kernels, stream launches: %.2f us per kernel\n", t / KERNELS);
    t = median_us([&] { CHECK(cudaGraphLaunch(g_empty, s)); CHECK(cudaStreamSynchronize(s)); });
    printf("empty kernels, one graph: %.2f us per kernel\n", t / KERNELS);
    t = median_us(in_stream(reads));
    printf("1.25 MiB read kernels (%d x %d), stream launches: %.2f us per kernel\n", READ_BLOCKS,
           THREADS, t / KERNELS);
    t = median_us([&] { CHECK(cudaGraphLaunch(g_read, s)); CHECK(cudaStreamSynchronize(s)); });
    printf("1.25 MiB read kernels (%d x %d), one graph: %.2f us per kernel (%.0f GB/s)\n",
           READ_BLOCKS, THREADS, t / KERNELS, READ_BYTES * KERNELS / (t * 1e3));

    for (int per_sm : {1, 2}) {
        int blocks = sms * per_sm;
        int fit = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, persistent_kernel, THREADS, 0));
        if (fit < per_sm) {
            printf("persistent kernel: %d blocks per SM do not fit (%d)\n", per_sm, fit);
            continue;
        }
        for (bool with_reads : {false, true}) {
            t = median_us([&] {
                CHECK(cudaMemsetAsync(counter, 0, 4, s));
                persistent_kernel<<<blocks, THREADS, 0, s>>>(counter, KERNELS, with_reads ? w : nullptr,
                                                            n16, out);
                CHECK(cudaGetLastError());
                CHECK(cudaStreamSynchronize(s));
            });
            printf("persistent kernel, %d blocks, %s: %.2f us per barrier\n", blocks,
                   with_reads ? "1.25 MiB read per phase" : "barriers alone", t / KERNELS);
        }
    }
    return 0;
}
