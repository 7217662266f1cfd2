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

// The G query heads that share a KV head take each value of a block from one read, and each key too where
// registers are few (AVX2, the portable vectors): a row is loaded (a bfloat16 one widened) once for the group, not
// once per head. Each head's sums keep their order, so the results are those of one head at a time, bit for bit.
// Measured on a Zen 4, the default model's 30 layers at 32 sequences of 350 tokens (bfloat16 cache, in cache): the
// AVX2 build 19.9 -> 13.5 ms (a head at a time it widened every row G = 3 times, and its 16 key sums of two
// registers each spilled), the portable one 68 -> 55 ms; AVX-512 (11.3 ms) keeps its key pass a head at a time, the
// query and the sums in registers, where reading the keys for the whole group measured 13 % slower.

// q . k for the n (<= 16) keys of one block and one query (head_dim = 16 * HV, scaled, float32), into out[0..n):
// the query and the 16 keys' sums in registers, where there are enough (AVX-512), one head at a time.
template <int HV, typename T>
inline void head_scores(const float* qg, const T* kb, int64_t n, float* out) {
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

// Scores q_g . k_j of the block's n (<= 16) keys for the G queries qf (G x 16 HV floats, scaled), into
// scores[g * stride + j]: each key's 16-lane partial sums per head into part (G x 16), then a head's 16 at once.
template <int HV, typename T>
inline void block_scores(const float* qf, int64_t G, const T* kb, int64_t n, float* scores, int64_t stride,
                         F16* part) {
    if constexpr (eoq::simd::kManyRegisters) {  // measured faster there: widening a row again is cheap
        for (int64_t g = 0; g < G; ++g) head_scores<HV>(qf + g * 16 * HV, kb, n, scores + g * stride);
        return;
    }
    for (int64_t j = 0; j < n; ++j) {
        F16 kv[HV];
#pragma GCC unroll 8
        for (int v = 0; v < HV; ++v) kv[v] = eoq::simd::load(kb + j * 16 * HV + 16 * v);
        for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf + g * 16 * HV;
            F16 a = eoq::simd::zero();
#pragma GCC unroll 8
            for (int v = 0; v < HV; ++v) a = eoq::simd::fmadd(eoq::simd::load(qg + 16 * v), kv[v], a);
            part[g * 16 + j] = a;
        }
    }
    // Lanes of keys past n sum what part holds there (finite: zeros, or an earlier block's sums) and are not stored.
    for (int64_t g = 0; g < G; ++g)
        eoq::simd::store_first(scores + g * stride, eoq::simd::sum_lanes16(*reinterpret_cast<const F16(*)[16]>(
                                                        part + g * 16)),
                               static_cast<int>(n));
}

// acc_g (16 HV floats, g < GC, at acc + g * acc_stride) += sum over the block's n values of p_g[j] * v[j]
// (p_g at p + g * p_stride), 16 lanes of every head at a time; with registers to spare (AVX-512) two sets of sums per
// head (even and odd j) so the FMAs overlap.
template <int HV, int GC, typename T>
inline void block_values(const float* p, int64_t p_stride, const T* vb, int64_t n, float* acc, int64_t acc_stride) {
    constexpr int kSets = eoq::simd::kManyRegisters ? 2 : 1;
#pragma GCC unroll 8
    for (int v = 0; v < HV; ++v) {
        F16 a[kSets][GC];
#pragma GCC unroll 4
        for (int g = 0; g < GC; ++g) {
            a[0][g] = eoq::simd::load(acc + g * acc_stride + 16 * v);
            if constexpr (kSets == 2) a[1][g] = eoq::simd::zero();
        }
        int64_t j = 0;
        for (; j + kSets <= n; j += kSets) {
#pragma GCC unroll 2
            for (int st = 0; st < kSets; ++st) {
                const F16 x = eoq::simd::load(vb + (j + st) * 16 * HV + 16 * v);
#pragma GCC unroll 4
                for (int g = 0; g < GC; ++g)
                    a[st][g] = eoq::simd::fmadd(eoq::simd::set1(p[g * p_stride + j + st]), x, a[st][g]);
            }
        }
        if (j < n) {
            const F16 x = eoq::simd::load(vb + j * 16 * HV + 16 * v);
#pragma GCC unroll 4
            for (int g = 0; g < GC; ++g) a[0][g] = eoq::simd::fmadd(eoq::simd::set1(p[g * p_stride + j]), x, a[0][g]);
        }
#pragma GCC unroll 4
        for (int g = 0; g < GC; ++g) {
            if constexpr (kSets == 2) a[0][g] = a[0][g] + a[1][g];
            eoq::simd::store(acc + g * acc_stride + 16 * v, a[0][g]);
        }
    }
}

// block_values for all G heads, up to 4 of them per pass over the block (their sums in registers).
template <int HV, typename T>
inline void block_values(const float* p, int64_t p_stride, const T* vb, int64_t n, float* acc, int64_t G) {
    constexpr int64_t kHeads = 4;
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
        const float* pg = p + g0 * p_stride;
        float* ag = acc + g0 * 16 * HV;
        switch (std::min(kHeads, G - g0)) {
            case 1: block_values<HV, 1>(pg, p_stride, vb, n, ag, 16 * HV); break;
            case 2: block_values<HV, 2>(pg, p_stride, vb, n, ag, 16 * HV); break;
            case 3: block_values<HV, 3>(pg, p_stride, vb, n, ag, 16 * HV); break;
            default: block_values<HV, 4>(pg, p_stride, vb, n, ag, 16 * HV); break;
        }
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
        std::vector<F16> part(G * 16);  // block_scores' partial sums (zeros at first)
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
                        block_scores<hv>(qf.data(), G, kb, n, scores.data() + t0, ctx, part.data());
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
                        block_values<hv>(scores.data() + t0, ctx, vb, n, acc.data(), G);
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
