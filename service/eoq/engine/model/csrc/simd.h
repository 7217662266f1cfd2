// 16 float32 lanes for eoq's CPU kernels, whatever vectors the CPU has: one AVX-512 register, two AVX2 registers
// (with FMA), or a GCC vector the compiler splits into what the target has (SSE2, NEON, ...). The kernels are
// written once over F16; what differs between CPUs is here, with the register-blocking sizes that suit each.
//
// The library is built with -march=native, so the machine that runs it picks the branch.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace eoq::simd {

// Ask for [p, p + bytes) ahead of its use, a 64-byte line at a time, into every cache level (Locality 3) or the L2
// (2). Prefetches never fault: a block cut short at a buffer's end may ask past it.
template <int Locality = 3>
inline void prefetch(const void* p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, Locality);
}

#if defined(__AVX512F__)

constexpr const char* kIsa = "avx512";
// gemm.cpp's tile: rows x panels of 16 outputs held in registers (8 x 3 = 24 of the 32 zmm).
constexpr int kGemmRows = 8;
constexpr int kGemmPanels = 3;
// Registers are plenty: kernels may keep two independent sums where one would do, so the FMAs overlap.
constexpr bool kManyRegisters = true;

struct F16 {
    __m512 v;
};

inline F16 zero() { return {_mm512_setzero_ps()}; }
inline F16 set1(float x) { return {_mm512_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 load(const uint16_t* p) {  // bfloat16: the high half of a float32
    return {_mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16))};
}
inline F16 load_first(const float* p, int n) {  // lanes [0, n) from p, the rest 0; n <= 16
    return {_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p)};
}
inline void store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline void store_first(float* p, F16 a, int n) {  // lanes [0, n) to p; n <= 16
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), a.v);
}
inline F16 fmadd(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 operator*(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }

// 16 bytes as 16 lanes: unsigned, signed, and a byte's low and high nibbles (lane i: byte i's).
inline F16 from_u8(const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline F16 from_i8(const int8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline void from_nibbles(const uint8_t* p, F16& lo, F16& hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo.v = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xf)));
    hi.v = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

// 16 32-bit lanes at p (64 bytes; the int8-activation panels' lines, read as float32 weights): each lane's bits
// [kShift, kShift + 4) as an unsigned value, or its byte kByte as a signed one.
template <int kShift>
inline F16 lane_nibble(const uint8_t* p) {
    const __m512i v = _mm512_loadu_si512(p);
    return {_mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, kShift), _mm512_set1_epi32(0xf)))};
}
template <int kByte>
inline F16 lane_byte(const int8_t* p) {
    const __m512i v = _mm512_loadu_si512(p);
    return {_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * kByte), 24))};
}

inline float reduce_add(F16 a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(F16 a) { return _mm512_reduce_max_ps(a.v); }
// The first lane equal to x, or 16.
inline int first_equal(F16 a, float x) {
    const unsigned m = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(x), _CMP_EQ_OQ);
    return m ? __builtin_ctz(m) : 16;
}

// The lane sums of 16 vectors as one vector (lane j = the sum of v[j]'s lanes): four rounds of pairing, each
// halving the vectors and the partial sums they hold, instead of 16 separate reductions.
inline F16 sum_lanes16(const F16 (&v)[16]) {
    const __m512i lo1 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i hi1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m512i lo2 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i hi2 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const __m512i lo3 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
    const __m512i hi3 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const __m512i lo4 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i hi4 = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    __m512 a[8], b[4], c[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
        a[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i].v, lo1, v[2 * i + 1].v),
                             _mm512_permutex2var_ps(v[2 * i].v, hi1, v[2 * i + 1].v));
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
        b[i] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * i], lo2, a[2 * i + 1]),
                             _mm512_permutex2var_ps(a[2 * i], hi2, a[2 * i + 1]));
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)
        c[i] = _mm512_add_ps(_mm512_permutex2var_ps(b[2 * i], lo3, b[2 * i + 1]),
                             _mm512_permutex2var_ps(b[2 * i], hi3, b[2 * i + 1]));
    return {_mm512_add_ps(_mm512_permutex2var_ps(c[0], lo4, c[1]), _mm512_permutex2var_ps(c[0], hi4, c[1]))};
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr const char* kIsa = "avx2";
// 6 rows x 1 panel = 12 of the 16 ymm, leaving the panel's two and a broadcast (the classic 6 x 16 AVX2 tile).
constexpr int kGemmRows = 6;
constexpr int kGemmPanels = 1;
// An F16 already takes two registers: keep one sum where AVX-512 keeps two.
constexpr bool kManyRegisters = false;

struct F16 {
    __m256 lo, hi;  // lanes 0-7, 8-15
};

inline F16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline __m256 widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline F16 load(const uint16_t* p) {
    return {widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline F16 load_first(const float* p, int n) {
    alignas(32) float buf[16] = {};
    std::memcpy(buf, p, sizeof(float) * n);
    return load(buf);
}
inline void store(float* p, F16 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
inline void store_first(float* p, F16 a, int n) {
    alignas(32) float buf[16];
    store(buf, a);
    std::memcpy(p, buf, sizeof(float) * n);
}
inline F16 fmadd(F16 a, F16 b, F16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline F16 operator+(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 operator*(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 max(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }

// Each half's 8 bytes widened straight from memory (no shift of a 16-byte load in between).
inline __m128i load8(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
inline F16 from_u8(const uint8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load8(p))), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(load8(p + 8)))};
}
inline F16 from_i8(const int8_t* p) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p))), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(load8(p + 8)))};
}
// The 16 bytes in both halves of a register, then one in-lane byte shuffle per 8 lanes puts byte i in lane i's low
// byte (two shuffles where widening each half of the bytes, then of the nibbles, took six); the high nibble is that
// lane shifted right by 4.
inline void from_nibbles(const uint8_t* p, F16& lo, F16& hi) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i first = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,  //
                                           4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i second = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,  //
                                            12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i a = _mm256_shuffle_epi8(v, first), b = _mm256_shuffle_epi8(v, second);
    const __m256i mask = _mm256_set1_epi32(0xf);
    lo = {_mm256_cvtepi32_ps(_mm256_and_si256(a, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(b, mask))};
    hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}

inline __m256i load_lanes8(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
template <int kShift>
inline __m256 nibble8(__m256i v) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, kShift), _mm256_set1_epi32(0xf)));
}
template <int kByte>
inline __m256 byte8(__m256i v) {
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * kByte), 24));
}
template <int kShift>
inline F16 lane_nibble(const uint8_t* p) {
    return {nibble8<kShift>(load_lanes8(p)), nibble8<kShift>(load_lanes8(p + 32))};
}
template <int kByte>
inline F16 lane_byte(const int8_t* p) {
    return {byte8<kByte>(load_lanes8(p)), byte8<kByte>(load_lanes8(p + 32))};
}

inline float reduce8_add(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_add(F16 a) { return reduce8_add(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max(F16 a) {
    const __m256 m = _mm256_max_ps(a.lo, a.hi);
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline int first_equal(F16 a, float x) {
    const __m256 xv = _mm256_set1_ps(x);
    const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, xv, _CMP_EQ_OQ))) |
                       static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, xv, _CMP_EQ_OQ))) << 8;
    return m ? __builtin_ctz(m) : 16;
}

// The lane sums of 8 vectors of 8 lanes as one (lane j = the sum of v[j]'s): two rounds of horizontal adds give
// each 128-bit half's sums of four vectors, then the halves are added.
inline __m256 sum_lanes8(const __m256 (&v)[8]) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
inline F16 sum_lanes16(const F16 (&v)[16]) {
    __m256 a[8], b[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
        a[i] = _mm256_add_ps(v[i].lo, v[i].hi);
        b[i] = _mm256_add_ps(v[i + 8].lo, v[i + 8].hi);
    }
    return {sum_lanes8(a), sum_lanes8(b)};
}

#else

constexpr const char* kIsa = "generic";
constexpr int kGemmRows = 2;
constexpr int kGemmPanels = 1;
constexpr bool kManyRegisters = false;

typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef uint8_t B16 __attribute__((vector_size(16)));
typedef int8_t S16 __attribute__((vector_size(16)));

struct F16 {
    V16 v;
};

inline F16 zero() { return {V16{}}; }
inline F16 set1(float x) { return {V16{} + x}; }
inline F16 load(const float* p) {
    F16 r;
    std::memcpy(&r.v, p, sizeof r.v);
    return r;
}
inline F16 load(const uint16_t* p) {
    uint16_t h[16];
    std::memcpy(h, p, sizeof h);
    I16 bits;
    for (int i = 0; i < 16; ++i) bits[i] = static_cast<int32_t>(static_cast<uint32_t>(h[i]) << 16);
    F16 r;
    std::memcpy(&r.v, &bits, sizeof r.v);
    return r;
}
inline F16 load_first(const float* p, int n) {
    F16 r = zero();
    std::memcpy(&r.v, p, sizeof(float) * n);
    return r;
}
inline void store(float* p, F16 a) { std::memcpy(p, &a.v, sizeof a.v); }
inline void store_first(float* p, F16 a, int n) { std::memcpy(p, &a.v, sizeof(float) * n); }
inline F16 fmadd(F16 a, F16 b, F16 c) { return {a.v * b.v + c.v}; }
inline F16 operator+(F16 a, F16 b) { return {a.v + b.v}; }
inline F16 operator*(F16 a, F16 b) { return {a.v * b.v}; }
inline F16 max(F16 a, F16 b) { return {a.v > b.v ? a.v : b.v}; }

inline F16 from_u8(const uint8_t* p) {
    B16 b;
    std::memcpy(&b, p, sizeof b);
    return {__builtin_convertvector(b, V16)};
}
inline F16 from_i8(const int8_t* p) {
    S16 b;
    std::memcpy(&b, p, sizeof b);
    return {__builtin_convertvector(b, V16)};
}
inline void from_nibbles(const uint8_t* p, F16& lo, F16& hi) {
    B16 b;
    std::memcpy(&b, p, sizeof b);
    lo.v = __builtin_convertvector(b & 0xf, V16);
    hi.v = __builtin_convertvector(b >> 4, V16);
}

template <int kShift>
inline F16 lane_nibble(const uint8_t* p) {
    I16 v;
    std::memcpy(&v, p, sizeof v);
    return {__builtin_convertvector((v >> kShift) & 0xf, V16)};  // the shift's sign bits are masked off
}
template <int kByte>
inline F16 lane_byte(const int8_t* p) {
    typedef uint32_t U16 __attribute__((vector_size(64)));
    U16 v;
    std::memcpy(&v, p, sizeof v);
    const I16 shifted = __builtin_convertvector(v << (24 - 8 * kByte), I16);  // the byte at the top, then down
    return {__builtin_convertvector(shifted >> 24, V16)};
}

inline float reduce_add(F16 a) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += a.v[i];
    return s;
}
inline float reduce_max(F16 a) {
    float m = a.v[0];
    for (int i = 1; i < 16; ++i) m = a.v[i] > m ? a.v[i] : m;
    return m;
}
inline int first_equal(F16 a, float x) {
    for (int i = 0; i < 16; ++i)
        if (a.v[i] == x) return i;
    return 16;
}
inline F16 sum_lanes16(const F16 (&v)[16]) {
    F16 r;
    for (int j = 0; j < 16; ++j) r.v[j] = reduce_add(v[j]);
    return r;
}

#endif

}  // namespace eoq::simd
