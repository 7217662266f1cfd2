// Rotary position embedding of a step's queries and keys, and the step's new keys and values written into their
// slots of the paged KV cache, in one pass over the fused q/k/v matmul output.
//
// qkv rows hold num_heads query heads, then num_kv_heads key heads, then num_kv_heads value heads. The rotation
// follows transformers' rotate_half: out = x * cos + rotate_half(x) * sin, computed in float32 with the
// checkpoint's cos/sin tables (float32, (positions, head_dim)) and rounded once. In torch this is four ops plus
// two cache writes per layer, each a dispatch.

#include <cstdint>

#include "bf16.h"
#include "eoq_kernels.h"

namespace {

using eoq::load;
using eoq::store;

template <typename T, typename C>
void rope_and_store(const T* qkv, const float* cos_table, const float* sin_table, const int64_t* positions,
                    const int64_t* slots, T* qk_out, C* k_cache, C* v_cache, int64_t tokens, int64_t num_heads,
                    int64_t num_kv_heads, int64_t head_dim, int64_t cache_slots) {
    const int64_t half = head_dim / 2;
    const int64_t row = (num_heads + 2 * num_kv_heads) * head_dim;
#pragma omp parallel for if (tokens >= 16)
    for (int64_t t = 0; t < tokens; ++t) {
        const float* c = cos_table + positions[t] * head_dim;
        const float* s = sin_table + positions[t] * head_dim;
        const T* src = qkv + t * row;
        for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
            const T* x = src + h * head_dim;
            T* o = qk_out + (t * (num_heads + num_kv_heads) + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                const float a = load(x[i]), b = load(x[i + half]);
                store(a * c[i] + b * s[i], o + i);
                store(b * c[i + half] + a * s[i + half], o + i + half);
            }
            if (h >= num_heads) {  // a key head: into the cache too (rounded once more if the cache is narrower)
                C* dst = k_cache + ((h - num_heads) * cache_slots + slots[t]) * head_dim;
                for (int64_t i = 0; i < head_dim; ++i) store(load(o[i]), dst + i);
            }
        }
        const T* v = src + (num_heads + num_kv_heads) * head_dim;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            C* dst = v_cache + (h * cache_slots + slots[t]) * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) store(load(v[h * head_dim + i]), dst + i);
        }
    }
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_rope_and_store(int dtype, int cache_dtype, const void* qkv, const float* cos_table,
                       const float* sin_table, const int64_t* positions, const int64_t* slots, void* qk_out,
                       void* k_cache, void* v_cache, int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, int64_t cache_slots) {
    if (head_dim % 2) return 1;
    return eoq::with_dtypes(dtype, cache_dtype, [&](auto* tag, auto* cache_tag) {
        using T = eoq::Elem<decltype(tag)>;
        using C = eoq::Elem<decltype(cache_tag)>;
        rope_and_store(static_cast<const T*>(qkv), cos_table, sin_table, positions, slots, static_cast<T*>(qk_out),
                       static_cast<C*>(k_cache), static_cast<C*>(v_cache), tokens, num_heads, num_kv_heads, head_dim,
                       cache_slots);
    });
}

}  // extern "C"
