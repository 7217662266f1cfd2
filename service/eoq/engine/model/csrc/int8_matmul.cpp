// y = x W^T for a weight held as int8 in blocks of 32 input features, each block with a float32 scale (the
// layout of a GGUF's Q8_0 tensors): for the few rows of a decode step, one pass over the int8 weight, a little
// over half the bytes of bfloat16.
//
// Output features are spread over torch's OpenMP threads; each reads its weight rows once for all input rows.

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "rows.h"

namespace {

constexpr int64_t kBlock = 32;
using eoq::kMaxRows;
constexpr int64_t kAhead = 4;  // outputs to prefetch ahead

// One output feature at a time, for R rows: each block's two halves go to separate sums and, with one or two rows,
// consecutive blocks alternate between two sets, so the FMAs do not wait on each other; the weights of a few
// outputs ahead are prefetched (at one token a step the pass over the weights streams from memory).
template <int R>
void int8_rows(const float* xf, const int8_t* w, const float* scales, float* out, int64_t in_f, int64_t out_f) {
    const int64_t nb = in_f / kBlock;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_f; ++o) {
        const int8_t* wo = w + o * in_f;
        const float* so = scales + o * nb;
#if defined(__AVX512F__)
        if (o + kAhead < out_f) {
            for (int64_t b = 0; b < in_f; b += 64)
                _mm_prefetch(reinterpret_cast<const char*>(wo + kAhead * in_f + b), _MM_HINT_T0);
            for (int64_t b = 0; b < nb; b += 16)
                _mm_prefetch(reinterpret_cast<const char*>(so + kAhead * nb + b), _MM_HINT_T0);
        }
        constexpr int kSets = R <= 2 ? 2 : 1;
        __m512 acc[kSets][2][R];
#pragma GCC unroll 2
        for (int st = 0; st < kSets; ++st)
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[st][0][r] = acc[st][1][r] = _mm512_setzero_ps();
        auto block = [&](int64_t b, __m512(&a)[2][R]) {
            const __m512 sc = _mm512_set1_ps(so[b]);
            const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + b * kBlock)))), sc);
            const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                                                reinterpret_cast<const __m128i*>(wo + b * kBlock + 16)))), sc);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const float* xr = xf + r * in_f + b * kBlock;
                a[0][r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a[0][r]);
                a[1][r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr + 16), a[1][r]);
            }
        };
        int64_t b = 0;
        for (; b + kSets <= nb; b += kSets) {
#pragma GCC unroll 2
            for (int st = 0; st < kSets; ++st) block(b + st, acc[st]);
        }
        for (; b < nb; ++b) block(b, acc[0]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            __m512 sum = _mm512_add_ps(acc[0][0][r], acc[0][1][r]);
            if constexpr (kSets == 2) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[1][0][r], acc[1][1][r]));
            out[r * out_f + o] = _mm512_reduce_add_ps(sum);
        }
#else
        for (int r = 0; r < R; ++r) {
            const float* xr = xf + r * in_f;
            float total = 0.f;
            for (int64_t b = 0; b < nb; ++b) {
                float part = 0.f;
#pragma omp simd reduction(+ : part)
                for (int64_t i = 0; i < kBlock; ++i)
                    part += xr[b * kBlock + i] * static_cast<float>(wo[b * kBlock + i]);
                total += part * so[b];
            }
            out[r * out_f + o] = total;
        }
#endif
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
    return eoq::by_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        eoq::run_rows(static_cast<const T*>(x), static_cast<T*>(y), rows, in_f, out_f,
                      [&](auto r, const float* xf, float* out) {
                          int8_rows<decltype(r)::value>(xf, w, scales, out, in_f, out_f);
                      });
    });
}

}  // extern "C"
