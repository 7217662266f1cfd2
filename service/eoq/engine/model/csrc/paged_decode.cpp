// Decode attention over the paged KV cache, reading each sequence's blocks where they lie (no gather).
//
// One query token per sequence. For every (sequence, KV head) pair — the unit of work, spread over the OpenMP
// threads (torch's own runtime: this library is loaded into a process that has torch's libgomp) — the G query
// heads that share the KV head are scored against the sequence's keys block by block, softmaxed in float32,
// and the values are summed with those weights. The cache of one layer is head-major,
// (num_kv_heads, num_blocks, block_size, head_dim); element types are float32 or bfloat16, the cache's either
// the queries' or bfloat16 beside float32 queries (half the bytes to read, widened exactly to float32).
//
// Built by eoq.engine.model.kernels with the machine's compiler when the engine starts; the engine falls back
// to torch's SDPA over gathered blocks when it can't be built.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "bf16.h"
#include "eoq_kernels.h"
#include "simd.h"

namespace {

using eoq::load;
using eoq::simd::F16;
using eoq::simd::prefetch;
using eoq::store;

// q . k for the n (<= 16) keys of one block and one query (head_dim = 16 * HV, scaled, float32), into out[0..n).
template <int HV, typename T>
inline void block_scores(const float* qg, const T* kb, int64_t n, float* out) {
    F16 qv[HV];
#pragma GCC unroll 8
    for (int v = 0; v < HV; ++v) qv[v] = eoq::simd::load(qg + 16 * v);
    F16 acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
        acc[j] = eoq::simd::zero();
        if (j < n) {
#pragma GCC unroll 8
            for (int v = 0; v < HV; ++v)
                acc[j] = eoq::simd::fmadd(qv[v], eoq::simd::load(kb + j * 16 * HV + 16 * v), acc[j]);
        }
    }
    eoq::simd::store_first(out, eoq::simd::sum_lanes16(acc), static_cast<int>(n));
}

// acc (16 * HV floats) += sum over the block's n values of p[j] * v[j]; with registers to spare (AVX-512) two sets
// of sums so the FMAs overlap.
template <int HV, typename T>
inline void block_values(const float* p, const T* vb, int64_t n, float* acc) {
    constexpr int kSets = eoq::simd::kManyRegisters ? 2 : 1;
    F16 a[kSets][HV];
#pragma GCC unroll 8
    for (int v = 0; v < HV; ++v) {
        a[0][v] = eoq::simd::load(acc + 16 * v);
        if constexpr (kSets == 2) a[1][v] = eoq::simd::zero();
    }
    int64_t j = 0;
    for (; j + kSets <= n; j += kSets) {
#pragma GCC unroll 2
        for (int st = 0; st < kSets; ++st) {
            const F16 pj = eoq::simd::set1(p[j + st]);
#pragma GCC unroll 8
            for (int v = 0; v < HV; ++v)
                a[st][v] = eoq::simd::fmadd(pj, eoq::simd::load(vb + (j + st) * 16 * HV + 16 * v), a[st][v]);
        }
    }
    if (j < n) {
        const F16 pj = eoq::simd::set1(p[j]);
#pragma GCC unroll 8
        for (int v = 0; v < HV; ++v)
            a[0][v] = eoq::simd::fmadd(pj, eoq::simd::load(vb + j * 16 * HV + 16 * v), a[0][v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < HV; ++v) {
        if constexpr (kSets == 2) a[0][v] = a[0][v] + a[1][v];
        eoq::simd::store(acc + 16 * v, a[0][v]);
    }
}

// f(std::integral_constant<int, HV>) for the head sizes block_scores / block_values are built for (16 * HV lanes);
// false for the others (the caller's plain loops).
template <typename F>
inline bool with_head_vectors(int64_t head_dim, F&& f) {
    switch (head_dim) {
        case 64: f(std::integral_constant<int, 4>{}); return true;
        case 128: f(std::integral_constant<int, 8>{}); return true;
        case 32: f(std::integral_constant<int, 2>{}); return true;
        default: return false;
    }
}

// The plain loops' pass over a block's n keys or values (head sizes block_scores / block_values are not built for,
// or blocks of another size): each row widened to float32 into row, then f(j).
template <typename T, typename F>
inline void for_each_row(const T* block, int64_t n, int64_t head_dim, float* row, F&& f) {
    for (int64_t j = 0; j < n; ++j) {
        const T* r = block + j * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < head_dim; ++i) row[i] = load(r[i]);
        f(j);
    }
}

template <typename T, typename C>
void decode(const T* q, int64_t q_stride, const C* k_cache, const C* v_cache, const int64_t* block_tables,
            const int64_t* context_lens, T* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
            int64_t head_dim, int64_t block_size, int64_t num_blocks, int64_t table_width, float scale) {
    const int64_t G = num_heads / num_kv_heads;
    const int64_t items = num_seqs * num_kv_heads;
    const int64_t block_bytes = block_size * head_dim * static_cast<int64_t>(sizeof(C));
#pragma omp parallel
    {
        std::vector<float> qf(G * head_dim), row(head_dim), acc(G * head_dim), scores;
#ifdef _OPENMP
        const int64_t threads = omp_get_num_threads();
#else
        const int64_t threads = 1;
#endif
        // Items dealt round-robin: contexts of different lengths spread over the threads, and each thread knows
        // its next item.
#pragma omp for schedule(static, 1)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t s = item / num_kv_heads, h = item % num_kv_heads;
            const int64_t ctx = context_lens[s];
            const int64_t* table = block_tables + s * table_width;
            // This thread's next item's keys and values, while this one computes: its blocks lie anywhere in the
            // cache, so the hardware prefetcher cannot guess them.
            if (const int64_t next = item + threads; next < items) {
                const int64_t sn = next / num_kv_heads, hn = next % num_kv_heads;
                const int64_t* tn = block_tables + sn * table_width;
                for (int64_t t0 = 0; t0 < context_lens[sn]; t0 += block_size) {
                    const int64_t off = (hn * num_blocks + tn[t0 / block_size]) * block_size * head_dim;
                    const int64_t bytes = std::min(block_size, context_lens[sn] - t0) * head_dim * sizeof(C);
                    prefetch<2>(k_cache + off, bytes);
                    prefetch<2>(v_cache + off, bytes);
                }
            }
            if (ctx <= 0) {  // nothing to attend to (the engine never asks this): zeros, not garbage
                for (int64_t g = 0; g < G; ++g)
                    for (int64_t i = 0; i < head_dim; ++i) store(0.f, out + (s * num_heads + h * G + g) * head_dim + i);
                continue;
            }
            scores.resize(static_cast<size_t>(G * ctx));
            for (int64_t g = 0; g < G; ++g) {
                const T* src = q + s * q_stride + (h * G + g) * head_dim;
                for (int64_t i = 0; i < head_dim; ++i) qf[g * head_dim + i] = load(src[i]) * scale;
            }
            // Scores: q . k for every cached token, block by block.
            for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
                const int64_t b = t0 / block_size;
                const C* kb = k_cache + (h * num_blocks + table[b]) * block_size * head_dim;
                const int64_t n = std::min(block_size, ctx - t0);
                // Blocks lie anywhere in the cache, so the hardware prefetcher stops at each block's end: fetch
                // the next block's keys, and this block's values for the second pass, ahead (-22 % per layer at
                // 32 sequences of ~110 tokens).
                if (t0 + block_size < ctx) prefetch(k_cache + (h * num_blocks + table[b + 1]) * block_size * head_dim,
                                                    block_bytes);
                prefetch(v_cache + (h * num_blocks + table[b]) * block_size * head_dim, block_bytes);
                if (block_size == 16 && with_head_vectors(head_dim, [&](auto hv) {
                        for (int64_t g = 0; g < G; ++g)
                            block_scores<hv>(qf.data() + g * head_dim, kb, n, scores.data() + g * ctx + t0);
                    }))
                    continue;
                for_each_row(kb, n, head_dim, row.data(), [&](int64_t j) {
                    for (int64_t g = 0; g < G; ++g) {
                        const float* qg = qf.data() + g * head_dim;
                        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                        for (int64_t i = 0; i < head_dim; ++i) dot += qg[i] * row[i];
                        scores[g * ctx + t0 + j] = dot;
                    }
                });
            }
            // Softmax per query head, in float32.
            for (int64_t g = 0; g < G; ++g) {
                float* sg = scores.data() + g * ctx;
                float mx = sg[0];
                for (int64_t t = 1; t < ctx; ++t) mx = std::max(mx, sg[t]);
                float sum = 0.f;
                // Clamped at -80 (a weight of e^-80 is nothing next to the max's 1): the vectorized exp leaves
                // its fast path for results that underflow.
#pragma omp simd reduction(+ : sum)
                for (int64_t t = 0; t < ctx; ++t) {
                    sg[t] = std::exp(std::fmax(sg[t] - mx, -80.f));
                    sum += sg[t];
                }
                const float inv = 1.f / sum;
                for (int64_t t = 0; t < ctx; ++t) sg[t] *= inv;
            }
            // Weighted sum of the values.
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t t0 = 0; t0 < ctx; t0 += block_size) {
                const C* vb = v_cache + (h * num_blocks + table[t0 / block_size]) * block_size * head_dim;
                const int64_t n = std::min(block_size, ctx - t0);
                if (with_head_vectors(head_dim, [&](auto hv) {
                        for (int64_t g = 0; g < G; ++g)
                            block_values<hv>(scores.data() + g * ctx + t0, vb, n, acc.data() + g * head_dim);
                    }))
                    continue;
                for_each_row(vb, n, head_dim, row.data(), [&](int64_t j) {
                    for (int64_t g = 0; g < G; ++g) {
                        const float p = scores[g * ctx + t0 + j];
                        float* ag = acc.data() + g * head_dim;
#pragma omp simd
                        for (int64_t i = 0; i < head_dim; ++i) ag[i] += p * row[i];
                    }
                });
            }
            for (int64_t g = 0; g < G; ++g) {
                T* dst = out + (s * num_heads + h * G + g) * head_dim;
                for (int64_t i = 0; i < head_dim; ++i) store(acc[g * head_dim + i], dst + i);
            }
        }
    }
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_paged_decode_attention(int dtype, int cache_dtype, const void* q, int64_t q_stride, const void* k_cache,
                               const void* v_cache, const int64_t* block_tables, const int64_t* context_lens,
                               void* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t num_blocks, int64_t table_width,
                               float scale) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads) return 1;
    return eoq::with_dtypes(dtype, cache_dtype, [&](auto* tag, auto* cache_tag) {
        using T = eoq::Elem<decltype(tag)>;
        using C = eoq::Elem<decltype(cache_tag)>;
        decode(static_cast<const T*>(q), q_stride, static_cast<const C*>(k_cache), static_cast<const C*>(v_cache),
               block_tables, context_lens, static_cast<T*>(out), num_seqs, num_heads, num_kv_heads, head_dim,
               block_size, num_blocks, table_width, scale);
    });
}

}  // extern "C"
