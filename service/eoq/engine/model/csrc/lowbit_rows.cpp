// y = x W^T for the few rows (<= 8) of a small step, with W held low-bit in groups of 32 input features: one pass
// over the weight at a fraction of float32's bytes (at one token a step the pass streams from memory).
//
// - 4-bit (a GGUF's Q4_1): q (out_f, in_f / 32, 16) bytes, byte i of a group holding q[i] in its low and
//   q[i + 16] in its high nibble; scales (out_f, in_f / 32, 2) float32 (step, min): w = step * q + min.
// - 8-bit (a GGUF's Q8_0): q (out_f, in_f) int8; scales (out_f, in_f / 32) float32: w = scale * q.
//
// One output feature at a time, spread over torch's OpenMP threads: each group is decoded into float32 weights
// (simd.h's 16 lanes) and multiplied with every input row, into independent sums so the FMAs do not wait on each
// other; the weights of a few outputs ahead are prefetched. x and y are float32 or bfloat16; the sums are float32.

#include <cstdint>

#include "eoq_kernels.h"
#include "rows_common.h"
#include "simd.h"

namespace {

using eoq::rows::kAhead;
using eoq::rows::kGroup;
using eoq::simd::F16;

struct Int4 : eoq::rows::GroupedRows<uint8_t, 16, 2> {
    // Group g of output o as float32: inputs [0, 16) in lo, [16, 32) in hi.
    __attribute__((always_inline)) void decode(int64_t o, int64_t g, F16& lo, F16& hi) const {
        eoq::simd::from_nibbles(q + (o * ng + g) * 16, lo, hi);
        const F16 step = eoq::simd::set1(s[(o * ng + g) * 2]);
        const F16 mn = eoq::simd::set1(s[(o * ng + g) * 2 + 1]);
        lo = eoq::simd::fmadd(lo, step, mn);
        hi = eoq::simd::fmadd(hi, step, mn);
    }
};

struct Int8 : eoq::rows::GroupedRows<int8_t, kGroup, 1> {
    __attribute__((always_inline)) void decode(int64_t o, int64_t g, F16& lo, F16& hi) const {
        const int8_t* qg = q + (o * ng + g) * kGroup;
        const F16 scale = eoq::simd::set1(s[o * ng + g]);
        lo = eoq::simd::from_i8(qg) * scale;
        hi = eoq::simd::from_i8(qg + 16) * scale;
    }
};

// out (R, out_f) = xf (R, in_f) W^T, all float32.
template <int R, typename Format>
void rows_matmul(const float* xf, const Format& format, float* out, int64_t in_f, int64_t out_f) {
    const int64_t ng = in_f / kGroup;
    const Format f = format;  // a local copy: stores to out cannot change its pointers, so they stay in registers
    // Independent sums, so the FMAs do not wait on each other: with one or two rows consecutive groups alternate
    // between two sets; where registers are plenty (AVX-512) a group's two halves go to separate sums too.
    constexpr int kSets = R <= 2 ? 2 : 1;
    constexpr int kHalves = eoq::simd::kManyRegisters ? 2 : 1;
#pragma omp parallel for schedule(static) firstprivate(f)
    for (int64_t o = 0; o < out_f; ++o) {
        if (o + kAhead < out_f) f.prefetch_output(o + kAhead);
        F16 acc[kSets][kHalves][R];
#pragma GCC unroll 2
        for (int st = 0; st < kSets; ++st)
#pragma GCC unroll 2
            for (int h = 0; h < kHalves; ++h)
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) acc[st][h][r] = eoq::simd::zero();
        auto group = [&](int64_t g, F16(&a)[kHalves][R]) {
            F16 lo, hi;
            f.decode(o, g, lo, hi);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const float* xr = xf + r * in_f + g * kGroup;
                a[0][r] = eoq::simd::fmadd(lo, eoq::simd::load(xr), a[0][r]);
                a[kHalves - 1][r] = eoq::simd::fmadd(hi, eoq::simd::load(xr + 16), a[kHalves - 1][r]);
            }
        };
        int64_t g = 0;
        for (; g + kSets <= ng; g += kSets) {
#pragma GCC unroll 2
            for (int st = 0; st < kSets; ++st) group(g + st, acc[st]);
        }
        for (; g < ng; ++g) group(g, acc[0]);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            F16 sum = acc[0][0][r];
#pragma GCC unroll 2
            for (int st = 0; st < kSets; ++st)
#pragma GCC unroll 2
                for (int h = 0; h < kHalves; ++h)
                    if (st + h > 0) sum = sum + acc[st][h][r];
            out[r * out_f + o] = eoq::simd::reduce_add(sum);
        }
    }
}

// The entry points' shared body (rows_common.h), with this file's kernel for the row count.
template <typename Format>
int run(int dtype, const void* x, const Format& f, void* y, int64_t rows, int64_t in_f, int64_t out_f) {
    return eoq::rows::in_float32(dtype, x, y, rows, in_f, out_f, [&](const float* xf, float* out) {
        eoq::rows::with_row_count(rows, [&](auto r) { rows_matmul<decltype(r)::value>(xf, f, out, in_f, out_f); });
    });
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_int4_matmul(int dtype, const void* x, const uint8_t* q, const float* scales, void* y, int64_t rows,
                    int64_t in_f, int64_t out_f) {
    return run(dtype, x, Int4{{q, scales, in_f / kGroup}}, y, rows, in_f, out_f);
}

int eoq_int8_matmul(int dtype, const void* x, const int8_t* q, const float* scales, void* y, int64_t rows,
                    int64_t in_f, int64_t out_f) {
    return run(dtype, x, Int8{{q, scales, in_f / kGroup}}, y, rows, in_f, out_f);
}

}  // extern "C"
