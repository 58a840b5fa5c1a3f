/* Loading quantized checkpoints: stored codes -> moelm's packing, straight into the model's buffers.
 *
 * unpair_i4: compressed-tensors pack-quantized int4 (byte k of a row holds inputs 2k (low nibble) and 2k + 1
 * (high)) -> moelm int4 (byte j of a group of G inputs holds inputs j (low) and j + G/2 (high)). With m < G/4 and
 * a = src[m], b = src[m + G/4] of one group: dst[2m] = lo(a) | lo(b) << 4, dst[2m + 1] = hi(a) | hi(b) << 4.
 * unsign_i8: int8 codes stored as unsigned (+128) -> signed. Rows are split between threads (the destination's
 * first touch, its page faults, then happens on both cores). */
#include <stdint.h>
#ifdef __SSE2__
#include <emmintrin.h>

/* 16 bytes a, b -> dst bytes lo(a) | lo(b) << 4 and hi(a) | hi(b) << 4, interleaved: 32 bytes */
static inline void pair16(__m128i a, __m128i b, __m128i *first, __m128i *second) {
    const __m128i m = _mm_set1_epi8(15);
    __m128i l = _mm_or_si128(_mm_and_si128(a, m), _mm_slli_epi16(_mm_and_si128(b, m), 4));
    __m128i h = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), m), _mm_andnot_si128(m, b));
    *first = _mm_unpacklo_epi8(l, h);
    *second = _mm_unpackhi_epi8(l, h);
}
#endif

void unpair_i4(const uint8_t *src, int64_t src_stride, uint8_t *dst, int64_t dst_stride, int64_t rows,
               int64_t bytes, int64_t group, int threads) {
    const int64_t q = group / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *s = src + r * src_stride;
        uint8_t *d = dst + r * dst_stride;
        for (int64_t g = 0; g < bytes; g += 2 * q) {
            int64_t m = 0;
#ifdef __SSE2__
            __m128i first, second;
            if (q == 8) {  /* group 32: one 16-byte load holds a and b */
                __m128i x = _mm_loadu_si128((const __m128i *)(s + g));
                pair16(x, _mm_srli_si128(x, 8), &first, &second);
                _mm_storeu_si128((__m128i *)(d + g), first);
                m = q;
            }
            for (; m + 16 <= q; m += 16) {
                pair16(_mm_loadu_si128((const __m128i *)(s + g + m)), _mm_loadu_si128((const __m128i *)(s + g + m + q)),
                       &first, &second);
                _mm_storeu_si128((__m128i *)(d + g + 2 * m), first);
                _mm_storeu_si128((__m128i *)(d + g + 2 * m + 16), second);
            }
#endif
            for (; m < q; m++) {
                uint8_t a = s[g + m], b = s[g + m + q];
                d[g + 2 * m] = (uint8_t)((a & 15) | (b << 4));
                d[g + 2 * m + 1] = (uint8_t)((a >> 4) | (b & 0xF0));
            }
        }
    }
}

void unsign_i8(const uint8_t *src, int64_t src_stride, int8_t *dst, int64_t dst_stride, int64_t rows, int64_t bytes,
               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < bytes; j++)
            dst[r * dst_stride + j] = (int8_t)(src[r * src_stride + j] ^ 0x80);
}
