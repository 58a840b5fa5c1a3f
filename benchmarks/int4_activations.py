"""Whether int8 activations or a table lookup would speed up the AVX2 int4 decode (issue 21): the inner loop of
gemv.c's int4 kernel (64 codes a group against int16 activations, 4 vpmaddwd per 32 bytes) against llama.cpp's kind
(int8 activations, vpmaddubsw: blocks of 64, one a weight group, or of 32 as q8_0) and T-MAC's kind (the codes as
bit planes of 16 rows; for every 4 inputs a table of the 16 sums of their int8 activations, looked up by vpshufb,
the planes weighted 1/2/4/8 by vpmaddubsw), one activation row against weight rows of 2,560 inputs: in L2 (256 rows)
and from memory (393,216 rows, 503 MB; OpenMP, a static split), with a plain integer read of the same bytes. Nothing
in moelm uses the int8 or table kernels; docs/benchmarks.md has the figures and why they were not taken.

    python benchmarks/int4_activations.py          # needs gcc and an AVX2 CPU
"""
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define I 2560
#define G (I / 64)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a); a = _mm_hadd_ps(a, a); return _mm_cvtss_f32(a);
}
/* gemv.c's loop: the codes unpacked by shifts within 16-bit lanes, int16 activations in that order; PF runs at the
 * top of each 32-byte step (a prefetch of w + s * 32 + something: benchmarks/int4_pages.py) */
#define INT16(NAME, PF)                                                                                           \
__attribute__((noinline)) float NAME(const void *xv, const uint8_t *w, const float *sc) {                         \
    const int16_t *xq = xv; __m256 acc = _mm256_setzero_ps(); const __m256i m = _mm256_set1_epi16(15);            \
    for (int s = 0; s < G; s++) {                                                                                 \
        PF;                                                                                                       \
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + s * 32)); const int16_t *x = xq + s * 64;            \
        __m256i i = _mm256_madd_epi16(_mm256_and_si256(b, m), _mm256_loadu_si256((const __m256i *)x));            \
        i = _mm256_add_epi32(i, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), m),                   \
                                                  _mm256_loadu_si256((const __m256i *)(x + 16))));                \
        i = _mm256_add_epi32(i, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 8), m),                   \
                                                  _mm256_loadu_si256((const __m256i *)(x + 32))));                \
        i = _mm256_add_epi32(i, _mm256_madd_epi16(_mm256_srli_epi16(b, 12),                                       \
                                                  _mm256_loadu_si256((const __m256i *)(x + 48))));                \
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_broadcast_ss(sc + s), acc);                           \
    }                                                                                                             \
    return hsum(acc);                                                                                             \
}
INT16(int16, (void)0)
/* int8 activations: low nibbles (inputs 0-31 of a group) and high ones (32-63) by vpmaddubsw; blocks of 64 share
 * one scale (their int16 sums added), blocks of 32 have one each */
#define INT8(NAME, PER)                                                                                           \
__attribute__((noinline)) float NAME(const void *xv, const uint8_t *w, const float *sc) {                         \
    const int8_t *xq = xv; __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};                           \
    const __m256i m = _mm256_set1_epi8(15), one = _mm256_set1_epi16(1);                                          \
    for (int s = 0; s < G; s++) {                                                                                 \
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + s * 32)); const int8_t *x = xq + s * 64;             \
        __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(b, m), _mm256_loadu_si256((const __m256i *)x));      \
        __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), m),                          \
                                          _mm256_loadu_si256((const __m256i *)(x + 32)));                        \
        if (PER == 1) {                                                                                           \
            acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(lo, hi), one)),  \
                                         _mm256_broadcast_ss(sc + s), acc[0]);                                    \
        } else {                                                                                                  \
            __m256 f0 = _mm256_broadcast_ss(sc + 2 * s), f1 = _mm256_broadcast_ss(sc + 2 * s + 1);             \
            acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(lo, one)), f0, acc[0]);               \
            acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(hi, one)), f1, acc[1]);               \
        }                                                                                                         \
    }                                                                                                             \
    return hsum(_mm256_add_ps(acc[0], acc[1]));                                                                   \
}
INT8(int8_b64, 1)
INT8(int8_b32, 2)
/* table lookup: a block of 16 rows stores, for every 4 inputs q, 32 bytes: byte 2r + p holds row r's bit plane p
 * (4 bits, one an input) in its low nibble and plane p + 2 in its high one; the table of q's 16 subset sums (int8)
 * is looked up for 32 indices by one vpshufb, and vpmaddubsw by (1, 2) / (4, 8) sums a row's planes into int16
 * (16 x 4 inputs = one group of 64 fits: at most 15 x 127 x 16); a group's sums less 8 x its activations' sum
 * (the codes' offset) times the rows' scales. The tables are made once a token for all rows. */
__attribute__((noinline)) void lut16(const int8_t *tables, const int16_t *xsum, const uint8_t *w, const float *sc,
                                     float *y) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i m = _mm256_set1_epi8(15), w01 = _mm256_set1_epi16(0x0201), w23 = _mm256_set1_epi16(0x0804);
    for (int s = 0; s < G; s++) {
        __m256i a = _mm256_set1_epi16((int16_t)(-8 * xsum[s]));
        for (int q = 0; q < 16; q++) {
            __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tables + (s * 16 + q) * 16)));
            __m256i b = _mm256_loadu_si256((const __m256i *)(w + (s * 16 + q) * 32));
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(w01, _mm256_shuffle_epi8(t, _mm256_and_si256(b, m))));
            a = _mm256_add_epi16(a, _mm256_maddubs_epi16(w23, _mm256_shuffle_epi8(
                t, _mm256_and_si256(_mm256_srli_epi16(b, 4), m))));
        }
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a))),
                               _mm256_loadu_ps(sc + s * 16), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1))),
                               _mm256_loadu_ps(sc + s * 16 + 8), acc1);
    }
    _mm256_storeu_ps(y, acc0); _mm256_storeu_ps(y + 8, acc1);
}
static double lut_rate(const int8_t *tables, const int16_t *xsum, const uint8_t *w, const float *sc, long rows,
                       int threads, int reps) {
    double best = 1e9; float *y = malloc(rows * sizeof(float));
    for (int r = 0; r < reps; r++) {
        double t = now();
        _Pragma("omp parallel for num_threads(threads) schedule(static)")
        for (long o = 0; o < rows / 16; o++) lut16(tables, xsum, w + o * 16 * (I / 2), sc + o * 16 * G, y + o * 16);
        t = now() - t; if (t < best) best = t;
    }
    free(y); return best;
}
typedef float (*Dot)(const void *, const uint8_t *, const float *);
static double rate(Dot dot, const void *x, const uint8_t *w, const float *sc, long rows, int threads, int reps) {
    double best = 1e9; float *y = malloc(rows * sizeof(float));
    for (int r = 0; r < reps; r++) {
        double t = now();
        _Pragma("omp parallel for num_threads(threads) schedule(static)")
        for (long o = 0; o < rows; o++) y[o] = dot(x, w + o * (I / 2), sc + o * 2 * G);
        t = now() - t; if (t < best) best = t;
    }
    free(y); return best;
}
static double read_rate(const uint32_t *w, long words, int threads, int reps) {
    double best = 1e9; volatile uint32_t sink = 0;
    for (int r = 0; r < reps; r++) {
        double t = now(); uint32_t total = 0;
        _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(+:total)")
        for (long i = 0; i < words; i++) total += w[i];
        sink = total; t = now() - t; if (t < best) best = t;
    }
    (void)sink; return best;
}
/* lut16 against the plain sum over 16 random rows: codes packed as bit planes, the tables made from activations
 * small enough that 4 of them sum within int8 (the test only: a real kernel would scale each table to int8) */
static int check_lut(void) {
    static uint8_t codes[16][I], w[16 * I / 2]; static int8_t x[I], tables[I / 4 * 16]; static int16_t xsum[G];
    static float sc[16 * G]; float y[16];
    for (int r = 0; r < 16; r++) for (int i = 0; i < I; i++) codes[r][i] = rand() % 16;
    for (int i = 0; i < I; i++) x[i] = rand() % 63 - 31;
    for (int k = 0; k < 16 * G; k++) sc[k] = (rand() % 100 + 1) * 1e-3f;
    for (int q = 0; q < I / 4; q++) {
        for (int idx = 0; idx < 16; idx++) {
            int t = 0; for (int j = 0; j < 4; j++) if (idx >> j & 1) t += x[4 * q + j];
            tables[q * 16 + idx] = (int8_t)t;
        }
        for (int r = 0; r < 16; r++) for (int p = 0; p < 2; p++) {
            int lo = 0, hi = 0;
            for (int j = 0; j < 4; j++) {
                lo |= (codes[r][4 * q + j] >> p & 1) << j;
                hi |= (codes[r][4 * q + j] >> (p + 2) & 1) << j;
            }
            /* rows 0-7 in the first 16 bytes (vpmaddubsw's int16 lanes 0-7), rows 8-15 in the second */
            w[q * 32 + (r / 8) * 16 + (r % 8) * 2 + p] = (uint8_t)(lo | hi << 4);
        }
    }
    for (int s = 0; s < G; s++) { int t = 0; for (int i = 0; i < 64; i++) t += x[s * 64 + i]; xsum[s] = t; }
    lut16(tables, xsum, w, sc, y);
    int bad = 0;
    for (int r = 0; r < 16; r++) {
        double want = 0;
        for (int s = 0; s < G; s++) {
            long d = 0; for (int i = 0; i < 64; i++) d += (long)x[s * 64 + i] * (codes[r][s * 64 + i] - 8);
            want += d * (double)sc[s * 16 + r];
        }
        if (fabs(y[r] - want) > 1e-4 * (fabs(want) + 1)) {
            printf("lut16 row %d: %g, want %g\n", r, y[r], want);
            bad = 1;
        }
    }
    return bad;
}
int main(void) {
    if (check_lut()) return 1;
    long big = 393216;
    int16_t *x16 = malloc(I * 2); int8_t *x8 = malloc(I);
    for (int i = 0; i < I; i++) { x16[i] = rand() % 32767 - 16383; x8[i] = rand() % 255 - 127; }
    uint8_t *w = aligned_alloc(64, big * I / 2); float *sc = malloc(big * 2 * G * sizeof(float));
    _Pragma("omp parallel for")
    for (long i = 0; i < big * I / 2; i++) w[i] = (uint8_t)(i * 7);
    for (long i = 0; i < big * 2 * G; i++) sc[i] = 1e-3f;
    int8_t *tables = malloc(I / 4 * 16); int16_t *xsum = malloc(G * sizeof(int16_t));
    for (int i = 0; i < I / 4 * 16; i++) tables[i] = rand() % 255 - 127;
    for (int s = 0; s < G; s++) xsum[s] = rand() % 64;
    const char *names[] = {"int16 activations (gemv.c)", "int8, blocks of 64", "int8, blocks of 32",
                           "table lookup, 16 rows (T-MAC's kind)"};
    Dot dots[] = {int16, int8_b64, int8_b32}; const void *xs[] = {x16, x8, x8};
    /* rounds alternate the kernels (the host's noise falls on all alike); the best of each */
    double l2[4] = {1e9, 1e9, 1e9, 1e9}, one[5] = {1e9, 1e9, 1e9, 1e9, 1e9}, two[5] = {1e9, 1e9, 1e9, 1e9, 1e9}, t;
    long words = big * I / 8;
    for (int round = 0; round < 6; round++) {
        for (int k = 0; k < 3; k++) {
            if ((t = rate(dots[k], xs[k], w, sc, 256, 1, 30)) < l2[k]) l2[k] = t;
            if ((t = rate(dots[k], xs[k], w, sc, big, 1, 1)) < one[k]) one[k] = t;
            if ((t = rate(dots[k], xs[k], w, sc, big, 2, 1)) < two[k]) two[k] = t;
        }
        if ((t = lut_rate(tables, xsum, w, sc, 256, 1, 30)) < l2[3]) l2[3] = t;
        if ((t = lut_rate(tables, xsum, w, sc, big, 1, 1)) < one[3]) one[3] = t;
        if ((t = lut_rate(tables, xsum, w, sc, big, 2, 1)) < two[3]) two[3] = t;
        if ((t = read_rate((uint32_t *)w, words, 1, 1)) < one[4]) one[4] = t;
        if ((t = read_rate((uint32_t *)w, words, 2, 1)) < two[4]) two[4] = t;
    }
    double b = big * I / 2.0;
    printf("| kernel | in L2 (ns per 32 bytes) | memory, 1 thread (GB/s) | memory, 2 threads (GB/s) |\n");
    printf("|---|---|---|---|\n");
    for (int k = 0; k < 4; k++)
        printf("| %s | %.2f | %.1f | %.1f |\n", names[k], l2[k] / (256.0 * I / 64) * 1e9, b / one[k] / 1e9,
               b / two[k] / 1e9);
    printf("| a plain read (integer sum) | | %.1f | %.1f |\n", b / one[4] / 1e9, b / two[4] / 1e9);
    return 0;
}
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "h.c", Path(tmp) / "h"
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(src), "-lm"], check=True)
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    sys.exit(main())
