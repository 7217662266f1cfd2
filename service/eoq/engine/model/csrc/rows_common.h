// What the two row kernels (lowbit_rows.cpp: float32 activations; x8_rows.cpp: int8 ones) share: the weight a row
// per output in groups of 32 inputs, and their entry points' scaffolding: the shape checked, x widened to float32,
// the row count made a template argument, the float32 outputs narrowed back.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "bf16.h"
#include "simd.h"

namespace eoq::rows {

constexpr int64_t kGroup = 32;  // inputs per weight group
constexpr int64_t kMaxRows = 8;
constexpr int64_t kAhead = 4;  // outputs to prefetch ahead

// A weight a row per output: q (out_f, ng, kQBytes) and s (out_f, ng, kScales) float32. The formats (each kernel's
// Int4 and Int8) derive from it and add how they read a group.
template <typename Q, int64_t kQBytes, int64_t kScales>
struct GroupedRows {
    const Q* q;
    const float* s;
    int64_t ng;  // groups per output

    __attribute__((always_inline)) void prefetch_output(int64_t o) const {
        eoq::simd::prefetch(q + o * ng * kQBytes, ng * kQBytes);
        eoq::simd::prefetch(s + o * ng * kScales, ng * kScales * sizeof(float));
    }
};

template <typename F, int... R>
void with_row_count(int64_t rows, F&& f, std::integer_sequence<int, R...>) {
    ((rows == R + 1 ? (f(std::integral_constant<int, R + 1>{}), 0) : 0), ...);
}

// f(std::integral_constant<int, rows>{}), for rows in [1, kMaxRows]: a kernel instantiated for the row count.
template <typename F>
void with_row_count(int64_t rows, F&& f) {
    with_row_count(rows, f, std::make_integer_sequence<int, kMaxRows>{});
}

// The entry points' shared body: 1 for a shape the row kernels do not take (more than kMaxRows rows, in_f not a
// multiple of kGroup), else bf16.h's in_float32: 2 for a dtype other than float32 or bfloat16, else 0 after
// kernel(xf, out) on the rows widened to float32 and its float32 results (narrowed into y in bfloat16). Nothing
// runs for 0 rows.
template <typename Kernel>
int in_float32(int dtype, const void* x, void* y, int64_t rows, int64_t in_f, int64_t out_f, Kernel&& kernel) {
    if (rows < 0 || rows > kMaxRows || in_f % kGroup) return 1;
    return eoq::in_float32(dtype, x, y, rows, in_f, out_f, kernel);
}

}  // namespace eoq::rows
