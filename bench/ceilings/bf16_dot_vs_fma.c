/* Register-only throughput ceilings of the AVX-512 instructions t5rt's bf16 tiles can use on a
 * CPU with AVX-512 BF16: `vdpbf16ps` (the dot tile, activations rounded to bf16) against f32
 * FMA (the widened tile runs at this rate: bf16 weights widened to f32 in registers), with
 * `vpdpbusd` (the int8 tile) beside them. Same 6-row x 4-vector register tile for each, no memory
 * traffic beyond L1, one thread. This decides which bf16 tile t5rt runs by default (README,
 * "Kernels are chosen at run time").
 *
 *   gcc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mavx512vnni \
 *       bench/ceilings/bf16_dot_vs_fma.c -o /tmp/ceil_bf16 && /tmp/ceil_bf16
 *
 * Prints G operations per second per core, a multiply-add counted as two.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 100000000L
static float xf[6][128];
static float wf[64 * 128];
static uint32_t xs[6][128];
static uint32_t ws[64 * 128];
static volatile int sink;

/* f32 FMA: 16 multiply-adds per vector instruction. */
static void f32_fma(void) {
  __m512 a[6][4];
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 31;
    __m512 w[4];
    for (int v = 0; v < 4; v++) w[v] = _mm512_loadu_ps(wf + g * 64 + 16 * v);
    for (int r = 0; r < 6; r++) {
      __m512 b = _mm512_set1_ps(xf[r][g]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_fmadd_ps(b, w[v], a[r][v]);
    }
  }
  t = now() - t;
  float s = 0;
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) s += _mm512_reduce_add_ps(a[r][v]);
  sink = (int)s;
  printf("f32 FMA (vfmadd231ps), zmm 6x4:   %6.1f\n", N * 24 * 16 * 2 / t / 1e9);
}

/* vdpbf16ps: 32 multiply-adds per vector instruction (16 lanes x a pair). */
static void bf16_dot(void) {
  __m512 a[6][4];
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_ps();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 31;
    __m512bh w[4];
    for (int v = 0; v < 4; v++) w[v] = (__m512bh)_mm512_loadu_si512((void *)(ws + g * 64 + 16 * v));
    for (int r = 0; r < 6; r++) {
      __m512bh b = (__m512bh)_mm512_set1_epi32(xs[r][g]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_dpbf16_ps(a[r][v], b, w[v]);
    }
  }
  t = now() - t;
  float s = 0;
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) s += _mm512_reduce_add_ps(a[r][v]);
  sink = (int)s;
  printf("bf16 dot (vdpbf16ps), zmm 6x4:    %6.1f\n", N * 24 * 32 * 2 / t / 1e9);
}

/* vdpbf16ps on ymm: 16 multiply-adds per instruction; 6 rows x 4 vectors as above. */
static void bf16_dot_ymm(void) {
  __m256 a[6][4];
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) a[r][v] = _mm256_setzero_ps();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 31;
    __m256bh w[4];
    for (int v = 0; v < 4; v++) w[v] = (__m256bh)_mm256_loadu_si256((void *)(ws + g * 32 + 8 * v));
    for (int r = 0; r < 6; r++) {
      __m256bh b = (__m256bh)_mm256_set1_epi32(xs[r][g]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm256_dpbf16_ps(a[r][v], b, w[v]);
    }
  }
  t = now() - t;
  float s = 0;
  for (int r = 0; r < 6; r++)
    for (int v = 0; v < 4; v++) {
      float l[8];
      _mm256_storeu_ps(l, a[r][v]);
      for (int i = 0; i < 8; i++) s += l[i];
    }
  sink = (int)s;
  printf("bf16 dot (vdpbf16ps), ymm 6x4:    %6.1f\n", N * 24 * 16 * 2 / t / 1e9);
}

/* vpdpbusd: 64 multiply-adds per vector instruction (16 lanes x 4). */
static void int8_dot(void) {
  __m512i a[6][4];
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_si512();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 31;
    __m512i w[4];
    for (int v = 0; v < 4; v++) w[v] = _mm512_loadu_si512((void *)(ws + g * 64 + 16 * v));
    for (int r = 0; r < 6; r++) {
      __m512i b = _mm512_set1_epi32(xs[r][g]);
      for (int v = 0; v < 4; v++) a[r][v] = _mm512_dpbusd_epi32(a[r][v], b, w[v]);
    }
  }
  t = now() - t;
  int z = 0;
  for (int r = 0; r < 6; r++) for (int v = 0; v < 4; v++) z += _mm512_reduce_add_epi32(a[r][v]);
  sink = z;
  printf("int8 dot (vpdpbusd), zmm 6x4:     %6.1f\n", N * 24 * 64 * 2 / t / 1e9);
}

int main(void) {
  /* Small values: no overflow to infinity, no denormals. bf16 0x3a83 is about 1e-3. */
  for (int i = 0; i < 6 * 128; i++) ((float *)xf)[i] = 1e-3f, ((uint32_t *)xs)[i] = 0x3a833a83u;
  for (int i = 0; i < 64 * 128; i++) wf[i] = 1e-3f, ws[i] = 0x3a833a83u;
  printf("G operations/s, one core (multiply-add = 2)\n");
  for (int rep = 0; rep < 2; rep++) {
    f32_fma();
    bf16_dot();
    bf16_dot_ymm();
    int8_dot();
  }
  return 0;
}
