/* Register-only throughput ceilings of the inner loops t5rt's product tiles can use on a CPU
 * without VNNI: f32 FMA against the exact int8 sequences (issue 14). No memory traffic beyond
 * L1, one thread; the figures bound what any tile built on these instructions can reach.
 *
 *   gcc -O3 -mavx2 -mfma -mavx512f -mavx512bw bench/ceilings/int8_vs_f32.c -o /tmp/ceil && /tmp/ceil
 *
 * Prints G operations per second per core, a multiply-add counted as two (as GFLOP/s counts
 * them). The AVX-512 lines need AVX-512 F/BW; on a CPU without them, build with -DNO_AVX512.
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
static uint32_t xs[6][128];
static uint32_t ws[64 * 128];
static float xf[6][128];
static float wf[64 * 128];
static volatile int sink;

/* f32: 6 rows x 2 vectors of 8 columns, broadcast activations (t5rt's AVX2 f32 tile). */
static void f32_ymm(void) {
  __m256 a[6][2];
  for (int r = 0; r < 6; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 63;
    __m256 w0 = _mm256_loadu_ps(wf + g * 16), w1 = _mm256_loadu_ps(wf + g * 16 + 8);
    for (int r = 0; r < 6; r++) {
      __m256 b = _mm256_broadcast_ss(&xf[r][g]);
      a[r][0] = _mm256_fmadd_ps(b, w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(b, w1, a[r][1]);
    }
  }
  t = now() - t;
  float s = 0, o[8];
  for (int r = 0; r < 6; r++) { _mm256_storeu_ps(o, _mm256_add_ps(a[r][0], a[r][1])); s += o[0]; }
  sink = (int)s;
  printf("f32 FMA, ymm 6x2 tile:                   %6.1f\n", N * 12 * 8 * 2 / t / 1e9);
}

/* int8 exact, AVX2: |q| times sign-moved weights (vpsignb, vpmaddubsw, vpmaddwd by ones). */
static void int8_sign_ymm(void) {
  __m256i a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
  __m256i flip = _mm256_set1_epi8(-128), ones = _mm256_set1_epi16(1);
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 63;
    __m256i w0 = _mm256_loadu_si256((void *)(ws + g * 16)), w1 = _mm256_loadu_si256((void *)(ws + g * 16 + 8));
    for (int r = 0; r < 4; r++) {
      __m256i q = _mm256_xor_si256(_mm256_set1_epi32(xs[r][g]), flip), abs = _mm256_abs_epi8(q);
      a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(abs, _mm256_sign_epi8(w0, q)), ones));
      a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(abs, _mm256_sign_epi8(w1, q)), ones));
    }
  }
  t = now() - t;
  int z = 0;
  for (int r = 0; r < 4; r++) z += _mm256_extract_epi32(_mm256_add_epi32(a[r][0], a[r][1]), 0);
  sink = z;
  printf("int8 exact, ymm, sign + vpmaddubsw:      %6.1f\n", N * 8 * 32 * 2 / t / 1e9);
}

/* int8 exact, AVX2: weights pre-widened to 16 bits, vpmaddwd only (2 per 4 values of k). */
static void int8_wide_ymm(void) {
  __m256i a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_si256();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 63;
    const uint32_t *w = ws + g * 32;
    __m256i we0 = _mm256_loadu_si256((void *)w), wo0 = _mm256_loadu_si256((void *)(w + 8));
    __m256i we1 = _mm256_loadu_si256((void *)(w + 16)), wo1 = _mm256_loadu_si256((void *)(w + 24));
    for (int r = 0; r < 4; r++) {
      __m256i xe = _mm256_set1_epi32(xs[r][(2 * g) & 127]), xo = _mm256_set1_epi32(xs[r][(2 * g + 1) & 127]);
      a[r][0] = _mm256_add_epi32(a[r][0], _mm256_add_epi32(_mm256_madd_epi16(xe, we0), _mm256_madd_epi16(xo, wo0)));
      a[r][1] = _mm256_add_epi32(a[r][1], _mm256_add_epi32(_mm256_madd_epi16(xe, we1), _mm256_madd_epi16(xo, wo1)));
    }
  }
  t = now() - t;
  int z = 0;
  for (int r = 0; r < 4; r++) z += _mm256_extract_epi32(_mm256_add_epi32(a[r][0], a[r][1]), 0);
  sink = z;
  printf("int8 exact, ymm, 16-bit vpmaddwd:        %6.1f\n", N * 8 * 32 * 2 / t / 1e9);
}

#ifndef NO_AVX512
/* f32: 6 rows x 4 vectors of 16 columns (t5rt's AVX-512 f32 tile). */
static void f32_zmm(void) {
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
  printf("f32 FMA, zmm 6x4 tile:                   %6.1f\n", N * 24 * 16 * 2 / t / 1e9);
}

/* int8 exact, AVX-512BW: sign moved by a masked negation, then as the ymm version. */
static void int8_sign_zmm(void) {
  __m512i a[4][4];
  for (int r = 0; r < 4; r++) for (int v = 0; v < 4; v++) a[r][v] = _mm512_setzero_si512();
  __m512i flip = _mm512_set1_epi8(-128), ones = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 31;
    __m512i w[4];
    for (int v = 0; v < 4; v++) w[v] = _mm512_loadu_si512((void *)(ws + g * 64 + 16 * v));
    for (int r = 0; r < 4; r++) {
      __m512i q = _mm512_xor_si512(_mm512_set1_epi32(xs[r][g]), flip);
      __mmask64 neg = _mm512_movepi8_mask(q);
      __m512i abs = _mm512_abs_epi8(q);
      for (int v = 0; v < 4; v++)
        a[r][v] = _mm512_add_epi32(a[r][v], _mm512_madd_epi16(_mm512_maddubs_epi16(abs, _mm512_mask_sub_epi8(w[v], neg, zero, w[v])), ones));
    }
  }
  t = now() - t;
  int z = 0;
  for (int r = 0; r < 4; r++) for (int v = 0; v < 4; v++) z += _mm512_reduce_add_epi32(a[r][v]);
  sink = z;
  printf("int8 exact, zmm, sign + vpmaddubsw:      %6.1f\n", N * 16 * 64 * 2 / t / 1e9);
}

/* int8 exact, AVX-512BW: 16-bit weights, vpmaddwd only. */
static void int8_wide_zmm(void) {
  __m512i a[6][2];
  for (int r = 0; r < 6; r++) a[r][0] = a[r][1] = _mm512_setzero_si512();
  double t = now();
  for (long n = 0; n < N; n++) {
    int g = n & 31;
    const uint32_t *w = ws + g * 64;
    __m512i we0 = _mm512_loadu_si512((void *)w), wo0 = _mm512_loadu_si512((void *)(w + 16));
    __m512i we1 = _mm512_loadu_si512((void *)(w + 32)), wo1 = _mm512_loadu_si512((void *)(w + 48));
    for (int r = 0; r < 6; r++) {
      __m512i xe = _mm512_set1_epi32(xs[r][(2 * g) & 127]), xo = _mm512_set1_epi32(xs[r][(2 * g + 1) & 127]);
      a[r][0] = _mm512_add_epi32(a[r][0], _mm512_add_epi32(_mm512_madd_epi16(xe, we0), _mm512_madd_epi16(xo, wo0)));
      a[r][1] = _mm512_add_epi32(a[r][1], _mm512_add_epi32(_mm512_madd_epi16(xe, we1), _mm512_madd_epi16(xo, wo1)));
    }
  }
  t = now() - t;
  int z = 0;
  for (int r = 0; r < 6; r++) z += _mm512_reduce_add_epi32(_mm512_add_epi32(a[r][0], a[r][1]));
  sink = z;
  printf("int8 exact, zmm, 16-bit vpmaddwd:        %6.1f\n", N * 12 * 64 * 2 / t / 1e9);
}
#endif

int main(void) {
  /* Small values: no overflow to infinity, no denormals (which slow FMA down). */
  for (int i = 0; i < 6 * 128; i++) ((uint32_t *)xs)[i] = i * 2654435761u, ((float *)xf)[i] = 1e-3f;
  for (int i = 0; i < 64 * 128; i++) ws[i] = (i * 7) & 0x7f7f7f7f, wf[i] = 1e-3f;
  printf("G operations/s, one core (multiply-add = 2)\n");
  f32_ymm();
  int8_sign_ymm();
  int8_wide_ymm();
#ifndef NO_AVX512
  f32_zmm();
  int8_sign_zmm();
  int8_wide_zmm();
#endif
  return 0;
}
