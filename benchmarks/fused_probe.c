/* What a one-pass CPU kernel for the SGLD step would cost.
 *
 * sgld_optax's step is compiled by XLA, which on CPU cannot compute the
 * update, the metric sums and the count sketch in one pass (see
 * docs/benchmarks.md). This probe writes that pass by hand, in C with
 * OpenMP, to measure what fusing would buy. It is a measurement, not part of
 * the library, and CI does not build it.
 *
 * Each element gets the same noise as sgld_optax: Threefry-2x32 with 20
 * rounds on the counter (0, i), then the Box-Muller transform of
 * sgld_optax/_src/noise.py with the same polynomials (for raw key words
 * (0, 42) its draws agree with noise.normal_from_words's to 1.2e-7, the
 * compilers contracting different multiply-adds). The step is
 * w <- w + s eta - h (nbeta g + loc (w - w0)) over one float32 vector of n
 * elements, in blocks of 4096 split over the threads:
 *
 *   floor    the update without noise;
 *   plain    the update with its noise;
 *   metrics  plain, plus the six sums of products of g, w - w0 and eta
 *            (from the block, still in cache);
 *   sketch   plain, plus a scatter-add of g, w - w0 and eta into
 *            2 x 1024 signed buckets per thread (a murmur3 hash of the
 *            index), merged at the end.
 *
 * Build and run (gcc with OpenMP; 256-bit vectors are what XLA uses by
 * default, 512 what so.compiler_options() asks for):
 *
 *   gcc -O3 -march=native -fopenmp -fno-math-errno -mprefer-vector-width=256 \
 *       -o /tmp/fused_probe benchmarks/fused_probe.c -lm
 *   OMP_NUM_THREADS=2 /tmp/fused_probe [n] [repeats]
 *
 * It prints the median time of each mode in milliseconds and its ratio to
 * plain.
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>

#define BLOCK 4096
#define BUCKETS 1024

typedef struct { uint32_t y0, y1; } Words;
typedef union { uint32_t u; float f; } Bits;

static inline uint32_t rotl(uint32_t x, int d) {
  return (x << d) | (x >> (32 - d));
}

#define ROUND(r) x0 += x1; x1 = rotl(x1, r); x1 ^= x0;

static inline __attribute__((always_inline)) Words threefry(
    uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
  uint32_t k2 = k0 ^ k1 ^ 0x1BD11BDAu;
  uint32_t x0 = c0 + k0, x1 = c1 + k1;
  ROUND(13) ROUND(15) ROUND(26) ROUND(6)  x0 += k1; x1 += k2 + 1u;
  ROUND(17) ROUND(29) ROUND(16) ROUND(24) x0 += k2; x1 += k0 + 2u;
  ROUND(13) ROUND(15) ROUND(26) ROUND(6)  x0 += k0; x1 += k1 + 3u;
  ROUND(17) ROUND(29) ROUND(16) ROUND(24) x0 += k1; x1 += k2 + 4u;
  ROUND(13) ROUND(15) ROUND(26) ROUND(6)  x0 += k2; x1 += k0 + 5u;
  Words w = {x0, x1};
  return w;
}

/* ln(1 + t) / t and cos(pi v / 2) in v^2: noise.py's coefficients. */
static const float LOG_C[9] = {
    1.0f, -0.4999999403953552f, 0.33333998918533325f, -0.2500135600566864f,
    0.1996299922466278f, -0.1658325046300888f, 0.14908719062805176f,
    -0.14196017384529114f, 0.08632376790046692f};
static const float COS_C[6] = {
    1.0f, -1.2337005138397217f, 0.2536693513393402f, -0.020862795412540436f,
    0.0009178587351925671f, -2.38830762100406e-05f};

static inline __attribute__((always_inline)) float normal(uint32_t y0,
                                                          uint32_t y1) {
  uint32_t x = y0 | 1u;
  int zeros = __builtin_clz(x);
  uint32_t mant = ((x << zeros) >> 8) & 0x7FFFFFu;
  int big = mant >= 0x3504F3u; /* mantissa of sqrt(2) */
  Bits m;
  m.u = mant | (big ? 0x3F000000u : 0x3F800000u);
  float e = (big ? 1.0f : 0.0f) - (float)(zeros + 1);
  float t = m.f - 1.0f;
  float p = LOG_C[8];
  p = p * t + LOG_C[7]; p = p * t + LOG_C[6]; p = p * t + LOG_C[5];
  p = p * t + LOG_C[4]; p = p * t + LOG_C[3]; p = p * t + LOG_C[2];
  p = p * t + LOG_C[1]; p = p * t + LOG_C[0];
  float radius = sqrtf(-2.0f * (t * p + e * 0.6931471805599453f));
  float v = (float)(y1 & 0x7FFFFFFFu) * 4.656612873077393e-10f; /* 2^-31 */
  float v2 = v * v;
  float c = COS_C[5];
  c = c * v2 + COS_C[4]; c = c * v2 + COS_C[3]; c = c * v2 + COS_C[2];
  c = c * v2 + COS_C[1]; c = c * v2 + COS_C[0];
  Bits z;
  z.f = radius * c;
  z.u ^= y1 & 0x80000000u;
  return z.f;
}

static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

enum { FLOOR, PLAIN, METRICS, SKETCH, MODES };
static const char *NAMES[MODES] = {"floor", "plain", "metrics", "sketch"};

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* One step of `mode` over n elements; `sums` and `sketch` receive the
 * metric sums and the 3 x 2K signed buckets. */
static void step(int mode, size_t n, float *restrict w, const float *restrict g,
                 const float *restrict w0, double sums[6], float *sketch) {
  const uint32_t k0 = 0u, k1 = 42u;
  const float h = 5e-5f, nbeta = 10.0f, loc = 100.0f, s = 0.01f;
  memset(sums, 0, 6 * sizeof(double));
  memset(sketch, 0, 3 * 2 * BUCKETS * sizeof(float));
#pragma omp parallel
  {
    static __thread float local[3][2 * BUCKETS];
    double part[6] = {0};
    if (mode == SKETCH) memset(local, 0, sizeof local);
#pragma omp for schedule(static)
    for (size_t b = 0; b < n; b += BLOCK) {
      float eta[BLOCK], dist[BLOCK];
      float *restrict W = w + b;
      const float *restrict G = g + b, *restrict W0 = w0 + b;
      if (mode == FLOOR) {
#pragma omp simd
        for (int j = 0; j < BLOCK; j++)
          W[j] = W[j] - h * (nbeta * G[j] + loc * (W[j] - W0[j]));
        continue;
      }
#pragma omp simd
      for (int j = 0; j < BLOCK; j++) {
        Words y = threefry(k0, k1, 0u, (uint32_t)(b + j));
        float e = normal(y.y0, y.y1), d = W[j] - W0[j];
        eta[j] = e;
        dist[j] = d;
        W[j] = W[j] + (s * e - h * (nbeta * G[j] + loc * d));
      }
      if (mode == METRICS) {
        float gg = 0, dd = 0, ee = 0, gd = 0, ge = 0, de = 0;
#pragma omp simd reduction(+ : gg, dd, ee, gd, ge, de)
        for (int j = 0; j < BLOCK; j++) {
          gg += G[j] * G[j]; dd += dist[j] * dist[j]; ee += eta[j] * eta[j];
          gd += G[j] * dist[j]; ge += G[j] * eta[j]; de += dist[j] * eta[j];
        }
        part[0] += gg; part[1] += dd; part[2] += ee;
        part[3] += gd; part[4] += ge; part[5] += de;
      } else if (mode == SKETCH) {
        for (int j = 0; j < BLOCK; j++) {
          uint32_t x = fmix32(fmix32((uint32_t)(b + j) ^ 0x2545F491u) +
                              0x9E3779B9u);
          uint32_t k = (x & 0x7FFFFFFFu) % BUCKETS + BUCKETS * (x >> 31);
          local[0][k] += G[j];
          local[1][k] += dist[j];
          local[2][k] += eta[j];
        }
      }
    }
#pragma omp critical
    {
      for (int q = 0; q < 6; q++) sums[q] += part[q];
      if (mode == SKETCH)
        for (int c = 0; c < 3; c++)
          for (int k = 0; k < 2 * BUCKETS; k++)
            sketch[c * 2 * BUCKETS + k] += local[c][k];
    }
  }
}

int main(int argc, char **argv) {
  size_t n = argc > 1 ? (size_t)atol(argv[1]) : (size_t)4 << 20;
  int repeats = argc > 2 ? atoi(argv[2]) : 30;
  n = (n + BLOCK - 1) / BLOCK * BLOCK;
  float *w = aligned_alloc(64, n * sizeof(float));
  float *g = aligned_alloc(64, n * sizeof(float));
  float *w0 = aligned_alloc(64, n * sizeof(float));
  float *sketch = malloc(3 * 2 * BUCKETS * sizeof(float));
  double *times = malloc(repeats * sizeof(double)), median[MODES], sums[6];
  for (size_t i = 0; i < n; i++) {
    w[i] = w0[i] = 0.02f * ((float)(fmix32((uint32_t)i) % 2001) / 1000.0f - 1);
    g[i] = (float)(fmix32((uint32_t)i ^ 7u) % 2001) / 1000.0f - 1.0f;
  }
  printf("%zu float32 elements, %d threads, %d repeats\n", n,
         omp_get_max_threads(), repeats);
  for (int mode = 0; mode < MODES; mode++) {
    for (int r = 0; r < 3; r++) step(mode, n, w, g, w0, sums, sketch);
    for (int r = 0; r < repeats; r++) {
      double t0 = now_ms();
      step(mode, n, w, g, w0, sums, sketch);
      times[r] = now_ms() - t0;
    }
    qsort(times, repeats, sizeof(double), by_value);
    median[mode] = times[repeats / 2];
  }
  for (int mode = 0; mode < MODES; mode++)
    printf("%-8s %7.2f ms  %5.2fx plain\n", NAMES[mode], median[mode],
           median[mode] / median[PLAIN]);
  free(w); free(g); free(w0); free(sketch); free(times);
  return 0;
}
