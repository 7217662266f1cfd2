// y = x W^T for a weight held as 4-bit values in groups of 32 input features, each group with a float32 step and
// minimum (w = step * q + min, q in 0..15: a GGUF's Q4_1): for the few rows of a decode step, one pass over the
// weight at a quarter of a byte per weight.
//
// Layout: q (out_f, in_f / 32, 16) bytes, byte i of a group holding q[i] in its low and q[i + 16] in its high
// nibble; scales (out_f, in_f / 32, 2) float32 (step, min). Each group is expanded into two vectors of 16 float32
// weights and multiplied with every input row. Output features are spread over torch's OpenMP threads.

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "rows.h"

namespace {

constexpr int64_t kGroup = 32;
using eoq::kMaxRows;
constexpr int64_t kAhead = 4;  // outputs to prefetch ahead

// One output feature at a time: the low and high halves of a group go to separate accumulators, and with one or
// two rows consecutive groups alternate between two sets, so the FMAs do not wait on each other.
template <int R>
void int4_rows(const float* xf, const uint8_t* q, const float* scales, float* out, int64_t in_f, int64_t out_f) {
    const int64_t ng = in_f / kGroup;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out_f; ++o) {
        const uint8_t* qo = q + o * ng * (kGroup / 2);
        const float* so = scales + o * ng * 2;
#if defined(__AVX512F__)
        constexpr int kSets = R <= 2 ? 2 : 1;
        __m512 acc[kSets][2][R];
#pragma GCC unroll 2
        for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) acc[s][0][r] = acc[s][1][r] = _mm512_setzero_ps();
        const __m512i low = _mm512_set1_epi32(0xf);
        if (o + kAhead < out_f) {  // a few outputs ahead: the weights stream from memory at one token a step
            for (int64_t b = 0; b < ng * (kGroup / 2); b += 64)
                _mm_prefetch(reinterpret_cast<const char*>(qo + kAhead * ng * (kGroup / 2) + b), _MM_HINT_T0);
            for (int64_t b = 0; b < ng * 2; b += 16)
                _mm_prefetch(reinterpret_cast<const char*>(so + kAhead * ng * 2 + b), _MM_HINT_T0);
        }
        auto group = [&](int64_t g, __m512(&a)[2][R]) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qo + g * 16)));
            const __m512 step = _mm512_set1_ps(so[2 * g]);
            const __m512 mn = _mm512_set1_ps(so[2 * g + 1]);
            const __m512 wlo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), step, mn);
            const __m512 whi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), step, mn);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const float* xr = xf + r * in_f + g * kGroup;
                a[0][r] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xr), a[0][r]);
                a[1][r] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xr + 16), a[1][r]);
            }
        };
        int64_t g = 0;
        for (; g + kSets <= ng; g += kSets) {
#pragma GCC unroll 2
            for (int s = 0; s < kSets; ++s) group(g + s, acc[s]);
        }
        for (; g < ng; ++g) group(g, acc[0]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            __m512 sum = _mm512_add_ps(acc[0][0][r], acc[0][1][r]);
            if constexpr (kSets == 2) sum = _mm512_add_ps(sum, _mm512_add_ps(acc[1][0][r], acc[1][1][r]));
            out[r * out_f + o] = _mm512_reduce_add_ps(sum);
        }
#else
        float w[kGroup];
        float acc[R] = {};
        for (int64_t g = 0; g < ng; ++g) {
            const float step = so[2 * g], mn = so[2 * g + 1];
            for (int64_t i = 0; i < kGroup / 2; ++i) {
                w[i] = step * static_cast<float>(qo[g * 16 + i] & 0xf) + mn;
                w[i + 16] = step * static_cast<float>(qo[g * 16 + i] >> 4) + mn;
            }
            for (int r = 0; r < R; ++r) {
                const float* xr = xf + r * in_f + g * kGroup;
                float part = 0.f;
#pragma omp simd reduction(+ : part)
                for (int64_t i = 0; i < kGroup; ++i) part += w[i] * xr[i];
                acc[r] += part;
            }
        }
        for (int r = 0; r < R; ++r) out[r * out_f + o] = acc[r];
#endif
    }
}

}  // namespace

extern "C" {

// dtype of x and y: 0 = float32, 1 = bfloat16. x (rows, in_f), q and scales as above, y (rows, out_f); all
// contiguous. rows <= 8, in_f a multiple of 32. Returns 0, or non-zero for arguments it cannot take.
int eoq_int4_matmul(int dtype, const void* x, const uint8_t* q, const float* scales, void* y, int64_t rows,
                    int64_t in_f, int64_t out_f) {
    if (rows < 0 || rows > kMaxRows || in_f % kGroup) return 1;
    return eoq::by_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        eoq::run_rows(static_cast<const T*>(x), static_cast<T*>(y), rows, in_f, out_f,
                      [&](auto r, const float* xf, float* out) {
                          int4_rows<decltype(r)::value>(xf, q, scales, out, in_f, out_f);
                      });
    });
}

}  // extern "C"
