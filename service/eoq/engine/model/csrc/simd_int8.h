// Integer dot products of int8 activations with 4- and 8-bit weights, for the int8-activation kernels
// (x8_rows.cpp, x8_gemm.cpp), and the quantizer of the activations.
//
// Activations are quantized per row in blocks of 32 inputs (the weights' groups): q = round(x / d) in -127..127 with
// d = max |x| / 127, kept with d and the block's d * sum(q) (a Q4_1 weight's minimum multiplies that sum). A block's
// 32 products are summed in int32, exactly; only the scales are float32.
//
// The unit is 32 bytes and 8 int32 lanes, lane j summing the products of bytes [4j, 4j + 4):
// - x86 with AVX2 (the AVX-512 builds too, on 256-bit registers): vpmaddubsw (unsigned x signed bytes, pairs summed
//   into int16) then vpmaddwd by ones (pairs of int16 into int32), or one vpdpbusd where the target has VNNI
//   (AVX512-VNNI with VL, or AVX-VNNI). vpmaddubsw saturates its int16 pairs: the unsigned side stays <= 127
//   (a 4-bit value, or |w| of an 8-bit one, whose sign moves to the activation), so a pair is at most
//   2 * 127 * 127 < 32767;
// - elsewhere GCC vectors the compiler splits into what the target has.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace eoq::simd8 {

constexpr int64_t kBlock = 32;  // inputs per activation block (= the weights' groups)
constexpr int kNibbleDots = 8;  // dot_us of 4-bit values a NibbleSums may add up before nibble_widen

#if defined(__AVX2__)

// The integer dot product the kernels use (the load log names it): without VNNI an AVX-512 build's panels take
// vpmaddubsw on 512-bit registers (x8_gemm.cpp), its row kernels the 256-bit one.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr const char* kDot = "avx512-vnni";
#elif defined(__AVXVNNI__)
constexpr const char* kDot = "avx-vnni";
#elif defined(__AVX512BW__)
constexpr const char* kDot = "avx512bw";
#else
constexpr const char* kDot = "avx2";
#endif

struct B32 {  // 32 bytes
    __m256i v;
};
struct I8 {  // 8 int32 lanes
    __m256i v;
};
struct F8 {  // 8 float32 lanes
    __m256 v;
};

inline B32 load32(const void* p) { return {_mm256_loadu_si256(static_cast<const __m256i*>(p))}; }
// 4 bytes at p in every lane: an activation quad against 8 outputs' quads.
inline B32 broadcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return {_mm256_set1_epi32(v)};
}
// 16 bytes of nibbles as 32 values: the low nibbles (bytes 0-15), then the high ones (16-31).
inline B32 nibbles16(const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0f);
    return {_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m))};
}
// Each byte's low nibble, or its high one.
inline B32 low_nibbles(B32 a) { return {_mm256_and_si256(a.v, _mm256_set1_epi8(0x0f))}; }
inline B32 high_nibbles(B32 a) { return {_mm256_and_si256(_mm256_srli_epi16(a.v, 4), _mm256_set1_epi8(0x0f))}; }

inline I8 izero() { return {_mm256_setzero_si256()}; }

// An accumulator's new value kept as the one register it is: integer adds are associative, so GCC otherwise
// regroups a tile's chain of adds (x8_gemm.cpp's dots: a group's lines unrolled) into a tree that first computes
// every product, and with 16 ymm registers spills them to the stack (measured on a Zen 4 running the AVX2 build,
// 32 rows of the default model's layers: 101 -> 107 GMAC/s). VNNI's vpdpbusd accumulates in place and needs none.
inline void pin(__m256i& v) { asm("" : "+x"(v)); }

// acc lane j += sum over b < 4 of u[4j + b] * s[4j + b]: u unsigned (<= 127 without VNNI), s signed.
inline I8 dot_us(I8 acc, B32 u, B32 s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return {_mm256_dpbusd_epi32(acc.v, u.v, s.v)};
#elif defined(__AVXVNNI__)
    return {_mm256_dpbusd_avx_epi32(acc.v, u.v, s.v)};
#else
    const __m256i pairs = _mm256_maddubs_epi16(u.v, s.v);
    __m256i r = _mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    pin(r);
    return {r};
#endif
}
// The same for signed w (not -128) and s: |w| times s with w's sign.
inline I8 dot_ss(I8 acc, B32 w, B32 s) { return dot_us(acc, {_mm256_sign_epi8(w.v, w.v)}, {_mm256_sign_epi8(s.v, w.v)}); }

// Several dot_us of 4-bit u (<= 15) summed, then widened into int32 lanes once (NibbleSums): without VNNI,
// vpmaddubsw's int16 pairs added up in int16 (up to kNibbleDots of them: each pair is at most 2 * 15 * 127 = 3810,
// 8 of them 30480 < 32767) and widened by one vpmaddwd, one multiply per 32 products instead of two. With VNNI (one
// vpdpbusd a quad) and on the portable vectors, the int32 sums as they come (after the ISA branches).
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__))
#define EOQ_NIBBLE_SUMS_INT16 1
struct NibbleSums {
    __m256i v;  // 16 int16 lanes: lane i sums the products of bytes 2i and 2i + 1
};
inline NibbleSums nibble_zero() { return {_mm256_setzero_si256()}; }
inline NibbleSums nibble_dot(NibbleSums a, B32 u, B32 s) {
    __m256i r = _mm256_add_epi16(a.v, _mm256_maddubs_epi16(u.v, s.v));
    pin(r);
    return {r};
}
inline I8 nibble_widen(NibbleSums a) { return {_mm256_madd_epi16(a.v, _mm256_set1_epi16(1))}; }
#endif

inline F8 fzero() { return {_mm256_setzero_ps()}; }
inline F8 fload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline F8 fset1(float x) { return {_mm256_set1_ps(x)}; }
inline void fstore(float* p, F8 a) { _mm256_storeu_ps(p, a.v); }
inline F8 fmul(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
// acc + float(i) * scale
inline F8 fmadd(I8 i, F8 scale, F8 acc) { return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(i.v), scale.v, acc.v)}; }
inline F8 fmadd(F8 a, F8 b, F8 acc) { return {_mm256_fmadd_ps(a.v, b.v, acc.v)}; }
inline F8 fadd(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
inline float reduce_add(F8 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One block of 32 activations: q, d = max |x| / 127 and d * sum(q). Rounds half to even (cvtps2dq).
inline void quantize_block(const float* x, int8_t* q, float& d, float& dsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    d = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i n[4];
    for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    // int32 -> int8 with packs (in-lane), then the lanes put back in order.
    const __m256i w16 = _mm256_packs_epi32(n[0], n[1]), x16 = _mm256_packs_epi32(n[2], n[3]);
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w16, x16),
                                                  _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), b);
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    dsum = d * static_cast<float>(_mm_cvtsi128_si32(s));
}

#else

constexpr const char* kDot = "generic";

typedef uint8_t VU __attribute__((vector_size(32)));
typedef int8_t VS __attribute__((vector_size(32)));
typedef int32_t VI __attribute__((vector_size(32)));
typedef float VF __attribute__((vector_size(32)));

struct B32 {
    VU v;
};
struct I8 {
    VI v;
};
struct F8 {
    VF v;
};

inline B32 load32(const void* p) {
    B32 r;
    std::memcpy(&r.v, p, 32);
    return r;
}
inline B32 broadcast4(const int8_t* p) {
    B32 r;
    for (int i = 0; i < 32; i += 4) std::memcpy(reinterpret_cast<char*>(&r.v) + i, p, 4);
    return r;
}
inline B32 nibbles16(const uint8_t* p) {
    B32 r;
    for (int i = 0; i < 16; ++i) {
        r.v[i] = p[i] & 0x0f;
        r.v[i + 16] = p[i] >> 4;
    }
    return r;
}
inline B32 low_nibbles(B32 a) { return {a.v & 0x0f}; }
inline B32 high_nibbles(B32 a) { return {a.v >> 4}; }

inline I8 izero() { return {VI{}}; }
inline I8 dot_us(I8 acc, B32 u, B32 s) {
    const VS sv = reinterpret_cast<VS&>(s.v);
    for (int j = 0; j < 8; ++j) {
        int32_t t = 0;
        for (int b = 0; b < 4; ++b) t += static_cast<int32_t>(u.v[4 * j + b]) * sv[4 * j + b];
        acc.v[j] += t;
    }
    return acc;
}
inline I8 dot_ss(I8 acc, B32 w, B32 s) {
    const VS wv = reinterpret_cast<VS&>(w.v), sv = reinterpret_cast<VS&>(s.v);
    for (int j = 0; j < 8; ++j) {
        int32_t t = 0;
        for (int b = 0; b < 4; ++b) t += static_cast<int32_t>(wv[4 * j + b]) * sv[4 * j + b];
        acc.v[j] += t;
    }
    return acc;
}

inline F8 fzero() { return {VF{}}; }
inline F8 fload(const float* p) {
    F8 r;
    std::memcpy(&r.v, p, 32);
    return r;
}
inline F8 fset1(float x) { return {VF{} + x}; }
inline void fstore(float* p, F8 a) { std::memcpy(p, &a.v, 32); }
inline F8 fmul(F8 a, F8 b) { return {a.v * b.v}; }
inline F8 fmadd(I8 i, F8 scale, F8 acc) { return {__builtin_convertvector(i.v, VF) * scale.v + acc.v}; }
inline F8 fmadd(F8 a, F8 b, F8 acc) { return {a.v * b.v + acc.v}; }
inline F8 fadd(F8 a, F8 b) { return {a.v + b.v}; }
inline float reduce_add(F8 a) {
    float s = 0.f;
    for (int i = 0; i < 8; ++i) s += a.v[i];
    return s;
}

inline void quantize_block(const float* x, int8_t* q, float& d, float& dsum) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::fabs(x[i]) > amax ? std::fabs(x[i]) : amax;
    d = amax / 127.0f;
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < 32; ++i) {
        const int32_t n = static_cast<int32_t>(std::nearbyint(x[i] * inv));
        q[i] = static_cast<int8_t>(n);
        sum += n;
    }
    dsum = d * static_cast<float>(sum);
}

#endif

#if !defined(EOQ_NIBBLE_SUMS_INT16)
// NibbleSums where the dot is summed in int32 as it comes (VNNI, the portable vectors): exact integers either way.
struct NibbleSums {
    I8 s;
};
inline NibbleSums nibble_zero() { return {izero()}; }
inline NibbleSums nibble_dot(NibbleSums a, B32 u, B32 s) { return {dot_us(a.s, u, s)}; }
inline I8 nibble_widen(NibbleSums a) { return a.s; }
#endif

// Rows of float32 activations quantized: q (rows, k) int8; d and dsum (rows, k / 32).
struct QuantizedRows {
    const int8_t* q;
    const float* d;
    const float* dsum;
    int64_t k;
};

inline void quantize_rows(const float* x, int64_t rows, int64_t k, int8_t* q, float* d, float* dsum) {
    const int64_t nb = k / kBlock;
#pragma omp parallel for schedule(static) if (rows * k >= (1 << 16))
    for (int64_t i = 0; i < rows * nb; ++i)
        quantize_block(x + i * kBlock, q + i * kBlock, d[i], dsum[i]);
}

// x (n, k) float32 quantized by quantize_rows into storage of its own; rows is the view of it the kernels take.
struct Quantized {
    Quantized(const float* x, int64_t n, int64_t k)
        : q(n * k), scales(2 * n * (k / kBlock)), rows{q.data(), scales.data(), scales.data() + n * (k / kBlock), k} {
        quantize_rows(x, n, k, q.data(), scales.data(), scales.data() + n * (k / kBlock));
    }
    Quantized(const Quantized&) = delete;  // rows points into this one's vectors
    Quantized& operator=(const Quantized&) = delete;

    std::vector<int8_t> q;
    std::vector<float> scales;  // every block's d, then every block's d * sum(q)
    QuantizedRows rows;
};

}  // namespace eoq::simd8
