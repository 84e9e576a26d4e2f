/* Ceilings of the widened bf16 register tiles on AVX-512 (bf16 weights widened to f32 in
 * registers, a shift for the even value of each 32-bit pair and a mask for the odd one, then f32
 * FMAs), by tile shape, against the f32 tile (6 rows x 4 vectors, no widening). Panel and rows
 * in L1, one thread. On Intel's cores the widening takes the FMA ports (p0/p5 for 512-bit), so
 * per pair of k a 6 x 4 tile issues 8 widening operations beside 48 FMAs (ceiling 48/56 of the
 * FMA rate) and a 12 x 2 tile 4 (48/52). Session 31, Emerald Rapids Xeon (2-core VM): f32 6x4
 * 174-175 GFLOP/s, widened 6x4 149-150, 12x2 160-161, 8x2 154, 14x2 162.
 *
 *   gcc -O3 -mavx512f -mfma bench/ceilings/bf16_widen_tiles.c -o /tmp/widen && /tmp/widen
 *
 * Prints GFLOP/s (a multiply-add counted as two), best of 5.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define K 96
static float X[16][2*K] __attribute__((aligned(64)));
static uint32_t W[K*64] __attribute__((aligned(64)));
static float WF[2*K*64] __attribute__((aligned(64)));
static volatile float sink;
#define REP 400000
#define WIDENED(NAME,R,V) \
__attribute__((noinline)) void NAME(float out[R][V*16]) { \
  __m512 a[R][V]; for(int r=0;r<R;r++)for(int v=0;v<V;v++)a[r][v]=_mm512_setzero_ps(); \
  const __m512i m=_mm512_set1_epi32(0xffff0000); \
  for(int c=0;c<64/(16*V);c++){ \
  for(int g=0;g<K;g++){ const uint32_t*wp=W+g*64+c*16*V; __m512 w[V]; \
    for(int v=0;v<V;v++) w[v]=_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(wp+16*v),16)); \
    for(int r=0;r<R;r++){__m512 b=_mm512_set1_ps(X[r][2*g]); for(int v=0;v<V;v++) a[r][v]=_mm512_fmadd_ps(b,w[v],a[r][v]);} \
    for(int v=0;v<V;v++) w[v]=_mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(wp+16*v),m)); \
    for(int r=0;r<R;r++){__m512 b=_mm512_set1_ps(X[r][2*g+1]); for(int v=0;v<V;v++) a[r][v]=_mm512_fmadd_ps(b,w[v],a[r][v]);} \
  } } \
  for(int r=0;r<R;r++)for(int v=0;v<V;v++)_mm512_storeu_ps(out[r]+16*v,a[r][v]); }
WIDENED(w6x4,6,4)
WIDENED(w12x2,12,2)
WIDENED(w8x2,8,2)
WIDENED(w14x2,14,2)
__attribute__((noinline)) void f6x4(float out[6][64]) {
  __m512 a[6][4]; for(int r=0;r<6;r++)for(int v=0;v<4;v++)a[r][v]=_mm512_setzero_ps();
  for(int g=0;g<2*K;g++){ const float*wp=WF+g*64; __m512 w[4];
    for(int v=0;v<4;v++) w[v]=_mm512_loadu_ps(wp+16*v);
    for(int r=0;r<6;r++){__m512 b=_mm512_set1_ps(X[r][g]); for(int v=0;v<4;v++) a[r][v]=_mm512_fmadd_ps(b,w[v],a[r][v]);}
  }
  for(int r=0;r<6;r++)for(int v=0;v<4;v++)_mm512_storeu_ps(out[r]+16*v,a[r][v]); }
#define RUN(NAME,R) { static float o[R][64]; double best=0; for(int t=0;t<5;t++){double t0=now(); for(long i=0;i<REP;i++){NAME((void*)o); sink+=o[0][0];} double dt=now()-t0; double gf=2.0*R*64*2*K*REP/dt/1e9; if(gf>best)best=gf;} printf("%-6s %7.1f GFLOP/s\n",#NAME,best);} 
int main(){ for(int i=0;i<K*64;i++)W[i]=0x3f803f80; for(int i=0;i<2*K*64;i++)WF[i]=1e-3f; for(int r=0;r<16;r++)for(int i=0;i<2*K;i++)X[r][i]=1e-3f;
 RUN(f6x4,6) RUN(w6x4,6) RUN(w12x2,12) RUN(w8x2,8) RUN(w14x2,14) RUN(f6x4,6) RUN(w6x4,6) RUN(w12x2,12) return 0;}
