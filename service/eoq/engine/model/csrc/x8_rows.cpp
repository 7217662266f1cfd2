// y = x W^T for the few rows (<= 8) of a small step with int8 activations: lowbit_rows.cpp's weights (4-bit Q4_1 or
// 8-bit Q8_0 rows, groups of 32 inputs) against the rows quantized per block of 32 (simd_int8.h), each group's 32
// products summed in int32 and scaled once:
//
//   4-bit: sum_i (step q_i + min) (d x_i) = step d sum_i q_i x_i + min (d sum_i x_i)
//   8-bit: sum_i (scale q_i) (d x_i)      = scale d sum_i q_i x_i
//
// Float32 does one FMA per weight and row after decoding it; this does a quarter of an integer instruction (VNNI)
// or less than one (AVX2) and no decoding into float. Lossy: the activations keep 8 bits per block (the error
// bound: tests/engine/test_int8_activations.py). Threads and prefetching as lowbit_rows.cpp.

#include <cstdint>

#include "eoq_kernels.h"
#include "rows_common.h"
#include "simd_int8.h"

namespace {

using eoq::rows::kAhead;
using namespace eoq::simd8;
static_assert(kBlock == eoq::rows::kGroup, "the activations' blocks are the weights' groups");

struct Int4 : eoq::rows::GroupedRows<uint8_t, 16, 2> {
    static constexpr bool kHasMin = true;
    __attribute__((always_inline)) static I8 dot(B32 w, B32 x) { return dot_us(izero(), w, x); }
    __attribute__((always_inline)) B32 weights(int64_t o, int64_t g) const { return nibbles16(q + (o * ng + g) * 16); }
    __attribute__((always_inline)) float step(int64_t o, int64_t g) const { return s[(o * ng + g) * 2]; }
    __attribute__((always_inline)) float min(int64_t o, int64_t g) const { return s[(o * ng + g) * 2 + 1]; }
};

struct Int8 : eoq::rows::GroupedRows<int8_t, kBlock, 1> {
    static constexpr bool kHasMin = false;
    __attribute__((always_inline)) static I8 dot(B32 w, B32 x) { return dot_ss(izero(), w, x); }
    __attribute__((always_inline)) B32 weights(int64_t o, int64_t g) const { return load32(q + (o * ng + g) * kBlock); }
    __attribute__((always_inline)) float step(int64_t o, int64_t g) const { return s[o * ng + g]; }
    __attribute__((always_inline)) float min(int64_t, int64_t) const { return 0.0f; }
};

// out (R, out_f) = x W^T, x quantized.
template <int R, typename Format>
void rows_matmul_x8(const QuantizedRows& x, const Format& format, float* out, int64_t out_f) {
    const int64_t in_f = x.k, ng = in_f / kBlock;
    const Format f = format;
    const QuantizedRows xq = x;
    // With one or two rows consecutive groups alternate between two sets of sums, so the FMAs do not wait on
    // each other.
    constexpr int kSets = R <= 2 ? 2 : 1;
#pragma omp parallel for schedule(static) firstprivate(f, xq)
    for (int64_t o = 0; o < out_f; ++o) {
        if (o + kAhead < out_f) f.prefetch_output(o + kAhead);
        F8 acc[kSets][R];
        float mins[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            mins[r] = 0.0f;
#pragma GCC unroll 2
            for (int st = 0; st < kSets; ++st) acc[st][r] = fzero();
        }
        auto group = [&](int64_t g, F8(&a)[R]) {
            const B32 w = f.weights(o, g);
            const float step = f.step(o, g);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const I8 dot = Format::dot(w, load32(xq.q + r * in_f + g * kBlock));
                a[r] = fmadd(dot, fset1(step * xq.d[r * ng + g]), a[r]);
                if constexpr (Format::kHasMin) mins[r] += f.min(o, g) * xq.dsum[r * ng + g];
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
            F8 sum = acc[0][r];
            if constexpr (kSets > 1) sum = fadd(sum, acc[1][r]);
            out[r * out_f + o] = reduce_add(sum) + mins[r];
        }
    }
}

// The entry points' shared body (rows_common.h): the float32 rows quantized, this file's kernel for their count run
// on them.
template <typename Format>
int run(int dtype, const void* x, const Format& f, void* y, int64_t rows, int64_t in_f, int64_t out_f) {
    return eoq::rows::in_float32(dtype, x, y, rows, in_f, out_f, [&](const float* xf, float* out) {
        const Quantized xq(xf, rows, in_f);
        eoq::rows::with_row_count(rows, [&](auto r) { rows_matmul_x8<decltype(r)::value>(xq.rows, f, out, out_f); });
    });
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_int4_matmul_x8(int dtype, const void* x, const uint8_t* q, const float* scales, void* y, int64_t rows,
                       int64_t in_f, int64_t out_f) {
    return run(dtype, x, Int4{{q, scales, in_f / kBlock}}, y, rows, in_f, out_f);
}

int eoq_int8_matmul_x8(int dtype, const void* x, const int8_t* q, const float* scales, void* y, int64_t rows,
                       int64_t in_f, int64_t out_f) {
    return run(dtype, x, Int8{{q, scales, in_f / kBlock}}, y, rows, in_f, out_f);
}

}  // extern "C"
