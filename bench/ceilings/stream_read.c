/* Read bandwidth of a buffer read in a loop, as a batch-1 decoding step reads its weights:
 * what bounds it (the misses one core keeps in flight, the bus's share, the pages, the share of
 * L3 a loop keeps between passes), for the kernels' memory-bound side. AVX-512 loads, the
 * buffer in 1 MiB chunks dealt round-robin to the OpenMP threads.
 *
 *   gcc -O2 -mavx512f -fopenmp bench/ceilings/stream_read.c -o /tmp/stream_read
 *   OMP_NUM_THREADS=2 /tmp/stream_read MIB HINT DIST_BYTES [huge]
 *
 * HINT: 0 no software prefetch; 1, 2, 3 `prefetcht0/t1/t2`; 4 `prefetchnta`; each step asks
 * for the four lines DIST_BYTES ahead of the 256 bytes it reads. `huge` advises 2 MiB pages
 * (`madvise(MADV_HUGEPAGE)`, before the first touch) and prints the process's AnonHugePages.
 * Prints the best pass's GB/s (after one warm-up pass) and the mean. A buffer that stays in
 * the caches between passes (a small MIB) reads at cache speed: that is the L3 share test.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define ASK(h)                                                                                \
  do {                                                                                        \
    _mm_prefetch(f, h);                                                                       \
    _mm_prefetch(f + 64, h);                                                                  \
    _mm_prefetch(f + 128, h);                                                                 \
    _mm_prefetch(f + 192, h);                                                                 \
  } while (0)

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s MIB HINT DIST_BYTES [huge]\n", argv[0]);
    return 2;
  }
  size_t total = (size_t)(atof(argv[1]) * 1048576) / 4;
  int hint = atoi(argv[2]);
  size_t dist = (size_t)atol(argv[3]);
  int huge = argc > 4 && strcmp(argv[4], "huge") == 0;
  size_t chunk = 262144, passes = 8, bytes = total * 4 + dist + (1 << 21);
  float *p = aligned_alloc(1 << 21, (bytes + (1 << 21) - 1) & ~(size_t)((1 << 21) - 1));
  if (!p) return 1;
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  for (size_t i = 0; i < bytes / 4; i++) p[i] = 1.0f;
  double best = 1e9, sum = 0;
  float acc = 0;
  for (size_t it = 0; it < passes; it++) {
    double t0 = now();
#pragma omp parallel reduction(+ : acc)
    {
      size_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (size_t c = tid * chunk; c < total; c += nt * chunk) {
        const float *q = p + c;
        size_t n = c + chunk > total ? total - c : chunk;
        for (size_t i = 0; i < n; i += 64) {
          const char *f = (const char *)(q + i) + dist;
          switch (hint) {
          case 1: ASK(_MM_HINT_T0); break;
          case 2: ASK(_MM_HINT_T1); break;
          case 3: ASK(_MM_HINT_T2); break;
          case 4: ASK(_MM_HINT_NTA); break;
          default: break;
          }
          s0 = _mm512_add_ps(s0, _mm512_load_ps(q + i));
          s1 = _mm512_add_ps(s1, _mm512_load_ps(q + i + 16));
          s2 = _mm512_add_ps(s2, _mm512_load_ps(q + i + 32));
          s3 = _mm512_add_ps(s3, _mm512_load_ps(q + i + 48));
        }
      }
      acc += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    double t = now() - t0;
    if (it > 0) {
      if (t < best) best = t;
      sum += t;
    }
  }
  if (huge) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    while (f && fgets(line, sizeof line, f))
      if (strstr(line, "AnonHugePages")) fputs(line, stdout);
    if (f) fclose(f);
  }
  printf("%d threads, %.0f MiB, hint %d, %zu bytes ahead%s: best %.1f GB/s, mean %.1f GB/s%s\n",
         omp_get_max_threads(), total * 4 / 1048576.0, hint, dist, huge ? ", huge pages" : "",
         total * 4 / best / 1e9, total * 4 / (sum / (passes - 1)) / 1e9, acc < 0 ? "!" : "");
  return 0;
}
