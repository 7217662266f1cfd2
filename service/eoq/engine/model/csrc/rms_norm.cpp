// RMSNorm over the float32 residual stream, with the residual add before it, in one pass per row.
//
//   x += delta            (delta in the model's dtype, may be absent)
//   out = x / sqrt(mean(x^2) + eps) * weight    (out in the model's dtype)
//
// In torch this is an add plus half a dozen elementwise ops per call, each a dispatch: at one token a step they
// cost more than the arithmetic. Rows are spread over torch's OpenMP threads when there are many.

#include <cmath>
#include <cstdint>

#include "bf16.h"
#include "eoq_kernels.h"

namespace {

using eoq::load;
using eoq::store;

template <typename T>
void add_rms_norm(float* x, const T* delta, const float* weight, T* out, int64_t rows, int64_t dim, float eps) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; ++r) {
        float* xr = x + r * dim;
        if (delta != nullptr) {
            const T* dr = delta + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) xr[i] += load(dr[i]);
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; ++i) ss += xr[i] * xr[i];
        const float scale = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
        T* orow = out + r * dim;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) store(xr[i] * scale * weight[i], orow + i);
    }
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_add_rms_norm(int dtype, float* x, const void* delta, const float* weight, void* out, int64_t rows,
                     int64_t dim, float eps) {
    return eoq::with_dtype(dtype, [&](auto* tag) {
        using T = eoq::Elem<decltype(tag)>;
        add_rms_norm(x, static_cast<const T*>(delta), weight, static_cast<T*>(out), rows, dim, eps);
    });
}

}  // extern "C"
