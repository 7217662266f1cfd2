// y = x W^T for a weight held as int8 in blocks of 32 input features, each block with a float32 scale (the
// layout of a GGUF's Q8_0 tensors): for the few rows of a decode step, one pass over the int8 weight, a little
// over half the bytes of bfloat16.
//
// Output features are spread over torch's OpenMP threads; each reads its weight rows once for all input rows.

#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "bf16.h"

namespace {

using eoq::load;
using eoq::store;

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 8;

template <typename T>
void int8_matmul(const T* x, const int8_t* w, const float* scales, T* y, int64_t rows, int64_t in_f, int64_t out_f) {
    const int64_t nb = in_f / kBlock;
    std::vector<float> xf(rows * in_f);
    for (int64_t i = 0; i < rows * in_f; ++i) xf[i] = load(x[i]);
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_f; ++o) {
        const int8_t* wo = w + o * in_f;
        const float* so = scales + o * nb;
        float sums[kMaxRows];
#if defined(__AVX512F__)
        __m512 acc[kMaxRows];
        for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            const __m512 s = _mm512_set1_ps(so[b]);
            for (int64_t h = 0; h < kBlock; h += 16) {
                const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + b * kBlock + h));
                const __m512 wv = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), s);
                for (int64_t r = 0; r < rows; ++r)
                    acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xf.data() + r * in_f + b * kBlock + h), acc[r]);
            }
        }
        for (int64_t r = 0; r < rows; ++r) sums[r] = _mm512_reduce_add_ps(acc[r]);
#else
        for (int64_t r = 0; r < rows; ++r) {
            const float* xr = xf.data() + r * in_f;
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                float part = 0.f;
#pragma omp simd reduction(+ : part)
                for (int64_t i = 0; i < kBlock; ++i)
                    part += xr[b * kBlock + i] * static_cast<float>(wo[b * kBlock + i]);
                total += part * so[b];
            }
            sums[r] = total;
        }
#endif
        for (int64_t r = 0; r < rows; ++r) store(sums[r], y + r * out_f + o);
    }
}

}  // namespace

extern "C" {

// dtype of x and y: 0 = float32, 1 = bfloat16. x (rows, in_f), w int8 (out_f, in_f), scales float32
// (out_f, in_f / 32), y (rows, out_f); all contiguous. rows <= 8, in_f a multiple of 32. Returns 0, or non-zero
// for arguments it cannot take.
int eoq_int8_matmul(int dtype, const void* x, const int8_t* w, const float* scales, void* y, int64_t rows,
                    int64_t in_f, int64_t out_f) {
    if (rows < 0 || rows > kMaxRows || in_f % kBlock) return 1;
    if (dtype == 0) {
        int8_matmul(static_cast<const float*>(x), w, scales, static_cast<float*>(y), rows, in_f, out_f);
    } else if (dtype == 1) {
        int8_matmul(static_cast<const uint16_t*>(x), w, scales, static_cast<uint16_t*>(y), rows, in_f, out_f);
    } else {
        return 2;
    }
    return 0;
}

}  // extern "C"
