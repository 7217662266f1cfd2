// float32 <-> bfloat16 (stored as uint16_t) for eoq's CPU kernels; float32 passes through.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

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
