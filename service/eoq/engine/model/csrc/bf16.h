// float32 <-> bfloat16 (stored as uint16_t) for eoq's CPU kernels; float32 passes through.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace eoq {

inline float load(float x) { return x; }
inline float load(uint16_t bf16) {
    uint32_t bits = static_cast<uint32_t>(bf16) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, uint16_t* dst) {  // round to nearest even, as torch does; NaN stays NaN
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        *dst = static_cast<uint16_t>((bits >> 16) | 0x40u);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    *dst = static_cast<uint16_t>(bits >> 16);
}

// The entry points' element types: f(tag) with tag a null pointer of the type ``dtype`` names (0 = float32,
// 1 = bfloat16 held as uint16_t; Elem<decltype(tag)> is that type). Returns 0, or 2 for another dtype.
template <typename Tag>
using Elem = std::remove_pointer_t<Tag>;

template <typename F>
int with_dtype(int dtype, F&& f) {
    if (dtype == 0) {
        f(static_cast<float*>(nullptr));
    } else if (dtype == 1) {
        f(static_cast<uint16_t*>(nullptr));
    } else {
        return 2;
    }
    return 0;
}

// kernel(xf, out) with xf the rows of x (rows, in_f) in float32 (x itself when it is float32) and out (rows, out_f)
// float32 for the kernel's results (y itself when it is float32; narrowed into y after the kernel when it is
// bfloat16), for a float32-only kernel called on a step in dtype. Returns 2 for another dtype, else 0.
template <typename Kernel>
int in_float32(int dtype, const void* x, void* y, int64_t rows, int64_t in_f, int64_t out_f, Kernel&& kernel) {
    return with_dtype(dtype, [&](auto* tag) {
        using T = Elem<decltype(tag)>;
        constexpr bool kFloat = std::is_same_v<T, float>;
        if (rows == 0) return;
        std::vector<float> xf(kFloat ? 0 : rows * in_f), out(kFloat ? 0 : rows * out_f);
        if constexpr (!kFloat)
            for (int64_t i = 0; i < rows * in_f; ++i) xf[i] = load(static_cast<const T*>(x)[i]);
        kernel(kFloat ? static_cast<const float*>(x) : xf.data(), kFloat ? static_cast<float*>(y) : out.data());
        if constexpr (!kFloat)
            for (int64_t i = 0; i < rows * out_f; ++i) store(out[i], static_cast<T*>(y) + i);
    });
}

// f(tag, cache_tag) for two element types: the tensors "in dtype" and the KV cache "in cache_dtype" (the cache may
// be held narrower than the activations: bfloat16 beside float32). Returns 0, or 2 for a dtype it lacks.
template <typename F>
int with_dtypes(int dtype, int cache_dtype, F&& f) {
    int inner = 0;
    const int rc = with_dtype(dtype, [&](auto* tag) {
        inner = with_dtype(cache_dtype, [&](auto* cache_tag) { f(tag, cache_tag); });
    });
    return rc ? rc : inner;
}

}  // namespace eoq
