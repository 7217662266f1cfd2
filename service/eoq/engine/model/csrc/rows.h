// What the row kernels (int4_matmul.cpp, int8_matmul.cpp) share: their input rows (at most kMaxRows, float32 or
// bfloat16) widened to float32, a kernel built for that row count run on them, its float32 outputs narrowed back.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16.h"

namespace eoq {

constexpr int64_t kMaxRows = 8;

// f(std::integral_constant<int, rows>{}) for 1 <= rows <= kMaxRows: a kernel instantiated for the row count.
template <typename F, int... R>
void with_row_count(int64_t rows, F&& f, std::integer_sequence<int, R...>) {
    ((rows == R + 1 ? (f(std::integral_constant<int, R + 1>{}), 0) : 0), ...);
}

// kernel(std::integral_constant<int, rows>{}, xf, out): the kernel for that many float32 rows xf (rows, in_f),
// writing float32 out (rows, out_f).
template <typename T, typename Kernel>
void run_rows(const T* x, T* y, int64_t rows, int64_t in_f, int64_t out_f, Kernel&& kernel) {
    if (rows <= 0 || rows > kMaxRows) return;
    std::vector<float> xf(rows * in_f);
    for (int64_t i = 0; i < rows * in_f; ++i) xf[i] = load(x[i]);
    std::vector<float> narrowed;
    float* out = reinterpret_cast<float*>(y);
    if constexpr (!std::is_same_v<T, float>) {
        narrowed.resize(rows * out_f);
        out = narrowed.data();
    }
    with_row_count(rows, [&](auto r) { kernel(r, xf.data(), out); }, std::make_integer_sequence<int, kMaxRows>{});
    if constexpr (!std::is_same_v<T, float>)
        for (int64_t i = 0; i < rows * out_f; ++i) store(narrowed[i], y + i);
}

// f(tag) with tag a null pointer of the element type ``dtype`` names (0 = float32, 1 = bfloat16 stored as
// uint16_t); returns 0, or 2 for another dtype.
template <typename F>
int by_dtype(int dtype, F&& f) {
    if (dtype == 0) {
        f(static_cast<float*>(nullptr));
    } else if (dtype == 1) {
        f(static_cast<uint16_t*>(nullptr));
    } else {
        return 2;
    }
    return 0;
}

}  // namespace eoq
