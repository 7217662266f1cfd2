// y = x W^T for any number of rows with int8 activations (the steps bigger than the row kernels'), W 4- or 8-bit in
// panels of 16 outputs laid out for integer dot products (eoq/engine/model/kernels/formats.py, pack_*_x8_panels):
// each output's weights in quads of consecutive inputs, one quad per 32-bit lane, so one instruction (simd_int8.h's
// dot_us / dot_ss) multiplies 4 inputs of 8 outputs (16 on AVX-512: the zmm tiles) by one broadcast quad of a row's
// activations.
//
// - 4-bit: values (panels, k / 8, 16, 4) uint8: for inputs 8i..8i+7, byte b of output j's lane holds input 8i + b
//   in its low and 8i + 4 + b in its high nibble; scales (panels, k / 32, 2, 16) float32 as gemm.cpp's 4-bit
//   panels (each group's 16 steps, then 16 minimums);
// - 8-bit: values (panels, k / 4, 16, 4) int8: inputs 4i..4i+3 of output j in lane j; scales (panels, k / 32, 16).
//
// The rows are quantized per block of 32 first (simd_int8.h). A tile of rows x panels sums each group's products in
// int32 registers, then adds them scaled (step x d, and min x d sum(q) for 4-bit) to float32 sums; the rest as
// gemm.cpp: panels over torch's OpenMP threads, chunks of 64 rows walking a panel's weights while they are cached.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "eoq_kernels.h"
#include "panels.h"
#include "simd_int8.h"

namespace {

using eoq::panels::kLanes;  // outputs per panel
using namespace eoq::simd8;

// The formats: q in 64-byte lines, one 32-bit lane of a line per output of a panel, a group's inputs a line after
// another (a panel's lines in input order); s a group's kScales x 16 float32 for a panel.
template <typename Q, int64_t S>
struct Panels {
    static constexpr int64_t kScales = S;
    const Q* q;
    const float* s;
    int64_t k;
};

// Each format sums a group's products in its Sums (zero, dot, then widen into int32 lanes once per group).

// 4-bit: a line holds 8 inputs, two quads: the bytes' low nibbles, then their high ones; unsigned (simd_int8.h's
// NibbleSums: without VNNI the group's products are added up in int16 and widened once).
struct Q4 : Panels<uint8_t, 2> {
    static constexpr int kQuads = 2;
    using Sums = NibbleSums;
    __attribute__((always_inline)) static void split(B32 v, B32 (&w)[2]) {
        w[0] = low_nibbles(v);
        w[1] = high_nibbles(v);
    }
    __attribute__((always_inline)) static Sums zero() { return nibble_zero(); }
    __attribute__((always_inline)) static Sums dot(Sums acc, B32 w, B32 x) { return nibble_dot(acc, w, x); }
    __attribute__((always_inline)) static I8 widen(Sums s) { return nibble_widen(s); }
};
static_assert(kBlock / 4 <= kNibbleDots, "a group's dot products of 4-bit values fit NibbleSums' int16 lanes");

// 8-bit: a line holds 4 inputs, one quad; signed; summed in int32.
struct Q8 : Panels<int8_t, 1> {
    static constexpr int kQuads = 1;
    using Sums = I8;
    __attribute__((always_inline)) static void split(B32 v, B32 (&w)[1]) { w[0] = v; }
    __attribute__((always_inline)) static Sums zero() { return izero(); }
    __attribute__((always_inline)) static Sums dot(Sums acc, B32 w, B32 x) { return dot_ss(acc, w, x); }
    __attribute__((always_inline)) static I8 widen(Sums s) { return s; }
};

// Group g's integer products of rows [r0, r0 + MR) and panels [p0, p0 + NR) into ia (lanes 0-7 and 8-15 of each
// panel: ia[m][j][0] and [1]), a line of each panel at a time against its quads of each row's activations.
template <int MR, int NR, typename Format>
__attribute__((always_inline)) inline void dots(const Format& w, I8 (&ia)[MR][NR][2], const QuantizedRows& x,
                                                int64_t r0, int64_t p0, int64_t g) {
    constexpr int kQuads = Format::kQuads;
    constexpr int64_t kLines = kBlock / (4 * kQuads);  // a group's lines per panel
    typename Format::Sums sums[MR][NR][2];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NR; ++j) sums[m][j][0] = sums[m][j][1] = Format::zero();
#pragma GCC unroll 8
    for (int64_t u = 0; u < kLines; ++u) {
        B32 wq[NR][2][kQuads];
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h)
                Format::split(load32(w.q + ((p0 + j) * (w.k / (4 * kQuads)) + g * kLines + u) * 64 + 32 * h), wq[j][h]);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
            const int8_t* xr = x.q + (r0 + m) * x.k + g * kBlock + 4 * kQuads * u;
            B32 a[kQuads];
#pragma GCC unroll 2
            for (int t = 0; t < kQuads; ++t) a[t] = broadcast4(xr + 4 * t);
#pragma GCC unroll 2
            for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
                for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
                    for (int t = 0; t < kQuads; ++t) sums[m][j][h] = Format::dot(sums[m][j][h], wq[j][h][t], a[t]);
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NR; ++j)
            for (int h = 0; h < 2; ++h) ia[m][j][h] = Format::widen(sums[m][j][h]);
}

// Group g's integer products ia added to acc scaled: by step x d, then min x d sum(q) for 4-bit (kScales 2: a group's
// 16 steps, then 16 minimums); by scale x d for 8-bit.
template <int MR, int NR, typename Format>
__attribute__((always_inline)) inline void scale(const Format& w, F8 (&acc)[MR][NR][2], const I8 (&ia)[MR][NR][2],
                                                 const QuantizedRows& x, int64_t r0, int64_t p0, int64_t g) {
    constexpr int64_t kScales = Format::kScales;
    const int64_t nb = w.k / kBlock;
#pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
        const float* sp = w.s + ((p0 + j) * nb + g) * kScales * kLanes;
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const F8 step = fload(sp + 8 * h), mn = kScales > 1 ? fload(sp + kLanes + 8 * h) : fzero();
#pragma GCC unroll 4
            for (int m = 0; m < MR; ++m) {
                const int64_t b = (r0 + m) * nb + g;
                acc[m][j][h] = fmadd(ia[m][j][h], fmul(step, fset1(x.d[b])), acc[m][j][h]);
                if constexpr (kScales > 1) acc[m][j][h] = fmadd(mn, fset1(x.dsum[b]), acc[m][j][h]);
            }
        }
    }
}

// Rows [r0, r0 + MR) x panels [p0, p0 + NR) into y (row stride ldy), the first ``cols`` columns of the panels.
template <int MR, int NR, typename Format>
void tile(const QuantizedRows& x, int64_t r0, const Format& w, int64_t p0, float* y, int64_t ldy, int64_t cols) {
    F8 acc[MR][NR][2];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NR; ++j) acc[m][j][0] = acc[m][j][1] = fzero();
    for (int64_t g = 0; g < x.k / kBlock; ++g) {
        I8 ia[MR][NR][2];
        dots<MR, NR>(w, ia, x, r0, p0, g);
        scale<MR, NR>(w, acc, ia, x, r0, p0, g);
    }
    for (int j = 0; j < NR; ++j) {
        const int64_t left = std::min<int64_t>(cols - j * kLanes, kLanes);
        for (int m = 0; m < MR; ++m) {
            float* out = y + m * ldy + j * kLanes;
            if (left == kLanes) {
                fstore(out, acc[m][j][0]);
                fstore(out + 8, acc[m][j][1]);
            } else {
                float buf[kLanes];
                fstore(buf, acc[m][j][0]);
                fstore(buf + 8, acc[m][j][1]);
                std::memcpy(out, buf, sizeof(float) * left);
            }
        }
    }
}

// The 256-bit tiles (AVX2 and the portable vectors; AVX-512 builds take the 512-bit ones below), up to kMR rows by
// kNR panels. AVX2: 4 rows, whose float32 sums spill to L1 (they are touched once a group) while the int16 sums stay
// in the 16 ymm (pin); measured on a Zen 4 running the AVX2 build, one process, interleaved, against 2 rows: the
// default model's 30 layers at 32 rows 17.8 -> 16.0 ms, at 64 rows 34.2 -> 30.5 ms, its 8-bit LM head at 64 rows
// 15.8 -> 14.7 ms, whole decode steps at 32 rows ~6 % faster (3 rows in between, 5 like 4, 6 slower; before pin and
// NibbleSums, 2 rows had measured ~8 % faster than 3). The portable vectors keep 2 rows.
struct Ymm {
#if defined(__AVX2__)
    static constexpr int kMR = 4, kNR = 1;
#else
    static constexpr int kMR = 2, kNR = 1;
#endif
    template <int MR, int NR, typename Format>
    static void run(const QuantizedRows& x, int64_t r0, const Format& w, int64_t p0, float* y, int64_t ldy,
                    int64_t cols) {
        tile<MR, NR>(x, r0, w, p0, y, ldy, cols);
    }
};

template <typename Format>
using TileFn = void (*)(const QuantizedRows&, int64_t, const Format&, int64_t, float*, int64_t, int64_t);

template <typename Tiles, typename Format, int MR, int... NR>
constexpr TileFn<Format> pick(int nr, std::integer_sequence<int, NR...>) {
    TileFn<Format> fn = nullptr;
    ((fn = nr == NR + 1 ? &Tiles::template run<MR, NR + 1, Format> : fn), ...);
    return fn;
}

template <typename Tiles, typename Format, int... MR>
TileFn<Format> tile_for(int mr, int nr, std::integer_sequence<int, MR...>) {
    TileFn<Format> fn = nullptr;
    ((fn = mr == MR + 1 ? pick<Tiles, Format, MR + 1>(nr, std::make_integer_sequence<int, Tiles::kNR>{}) : fn), ...);
    return fn;
}

// The function of Tiles for an mr x nr tile (1 <= mr <= Tiles::kMR, 1 <= nr <= Tiles::kNR).
template <typename Tiles, typename Format>
TileFn<Format> tile_of(int mr, int nr) {
    return tile_for<Tiles, Format>(mr, nr, std::make_integer_sequence<int, Tiles::kMR>{});
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512 builds: a whole 64-byte line (the 16 outputs of a panel) in one zmm register, so each instruction does
// twice the work of the 256-bit unit above — one vpdpbusd a row, line and quad with VNNI, taking the row's quad of
// activations as an embedded broadcast from memory; vpmaddubsw's int16 pairs without it — and the 32 registers hold
// a tile of zmm::Tiles::kMR rows by kNR panels. The same integer sums and the same float32 operations per lane, in
// the same order, as the 256-bit tiles: the results are theirs bit for bit.
#define EOQ_X8_ZMM 1
namespace zmm {

inline __m512i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}
inline void pin(__m512i& v) { asm("" : "+v"(v)); }  // as simd_int8.h's pin: keep a chain of adds a chain

// acc lane j += sum over b < 4 of u[4j + b] * s[4j + b] (u unsigned, <= 127 without VNNI; s signed), in int32.
inline __m512i dot_us32(__m512i acc, __m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    __m512i r = _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
    pin(r);
    return r;
#endif
}

// 4-bit: a line's low nibbles are the quad of inputs 8u..8u+3, its high ones 8u+4..8u+7 (as Q4 above). Without VNNI
// a group's vpmaddubsw pairs are added up in int16 (at most 2 * 15 * 127 each, kNibbleDots of them) and widened once.
struct ZQ4 {
    static constexpr int kQuads = 2;
    static constexpr int64_t kScales = 2;
    struct Line {
        __m512i u[2];
    };
    __attribute__((always_inline)) static Line prepare(__m512i v) {
        const __m512i m = _mm512_set1_epi8(0x0f);
        return {{_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16(v, 4), m)}};
    }
    __attribute__((always_inline)) static __m512i dot(__m512i acc, const Line& w, int t, __m512i x) {
#if defined(__AVX512VNNI__)
        return _mm512_dpbusd_epi32(acc, w.u[t], x);
#else
        __m512i r = _mm512_add_epi16(acc, _mm512_maddubs_epi16(w.u[t], x));
        pin(r);
        return r;
#endif
    }
    __attribute__((always_inline)) static __m512i widen(__m512i s) {
#if defined(__AVX512VNNI__)
        return s;
#else
        return _mm512_madd_epi16(s, _mm512_set1_epi16(1));
#endif
    }
};

// 8-bit: one quad a line, signed weights: |w| times the activations with w's sign (AVX-512 has no vpsignb: the
// activations are negated under w's sign mask), summed in int32.
struct ZQ8 {
    static constexpr int kQuads = 1;
    static constexpr int64_t kScales = 1;
    struct Line {
        __m512i a;
        __mmask64 neg;
    };
    __attribute__((always_inline)) static Line prepare(__m512i v) { return {_mm512_abs_epi8(v), _mm512_movepi8_mask(v)}; }
    __attribute__((always_inline)) static __m512i dot(__m512i acc, const Line& w, int, __m512i x) {
        return dot_us32(acc, w.a, _mm512_mask_sub_epi8(x, w.neg, _mm512_setzero_si512(), x));
    }
    __attribute__((always_inline)) static __m512i widen(__m512i s) { return s; }
};

// Rows [r0, r0 + MR) x panels [p0, p0 + NR) into y (row stride ldy), the first ``cols`` columns of the panels: for
// each group, its lines' integer products (as dots above), then scaled into float32 sums (as scale above). Measured on
// a 2-core Zen 5, all of the default model's layers with int8 activations, weights streamed: 32 rows 12.9 -> 8.1-8.7
// ms (263 -> ~400 GMAC/s), 64 rows 22.7 -> 13.5-14.6 ms, against the 256-bit tiles; its LM head (8-bit) 3.9 -> 2.6 ms
// at 32 rows. Without VNNI (-march=x86-64-v4) 10.0 ms at 32 rows, where the AVX2 build takes 17.0.
template <int MR, int NR, typename ZF, typename Format>
void tile(const QuantizedRows& x, int64_t r0, const Format& w, int64_t p0, float* y, int64_t ldy, int64_t cols) {
    constexpr int kQuads = ZF::kQuads;
    constexpr int64_t kLines = kBlock / (4 * kQuads), kScales = ZF::kScales;
    const int64_t nb = x.k / kBlock, lines = w.k / (4 * kQuads);
    __m512 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; ++g) {
        __m512i sums[MR][NR];
        for (int m = 0; m < MR; ++m)
            for (int j = 0; j < NR; ++j) sums[m][j] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int64_t u = 0; u < kLines; ++u) {
            typename ZF::Line wl[NR];
#pragma GCC unroll 2
            for (int j = 0; j < NR; ++j)
                wl[j] = ZF::prepare(_mm512_loadu_si512(w.q + ((p0 + j) * lines + g * kLines + u) * 64));
#pragma GCC unroll 8
            for (int m = 0; m < MR; ++m) {
                const int8_t* xr = x.q + (r0 + m) * x.k + g * kBlock + 4 * kQuads * u;
#pragma GCC unroll 2
                for (int t = 0; t < kQuads; ++t) {
                    const __m512i a = bcast4(xr + 4 * t);
#pragma GCC unroll 2
                    for (int j = 0; j < NR; ++j) sums[m][j] = ZF::dot(sums[m][j], wl[j], t, a);
                }
            }
        }
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) {
            const float* sp = w.s + ((p0 + j) * nb + g) * kScales * kLanes;
            const __m512 step = _mm512_loadu_ps(sp);
            const __m512 mn = kScales > 1 ? _mm512_loadu_ps(sp + kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 8
            for (int m = 0; m < MR; ++m) {
                const int64_t b = (r0 + m) * nb + g;
                const __m512 ia = _mm512_cvtepi32_ps(ZF::widen(sums[m][j]));
                acc[m][j] = _mm512_fmadd_ps(ia, _mm512_mul_ps(step, _mm512_set1_ps(x.d[b])), acc[m][j]);
                if constexpr (kScales > 1) acc[m][j] = _mm512_fmadd_ps(mn, _mm512_set1_ps(x.dsum[b]), acc[m][j]);
            }
        }
    }
    for (int j = 0; j < NR; ++j) {
        const int64_t left = std::min<int64_t>(cols - j * kLanes, kLanes);
        const __mmask16 keep = left >= kLanes ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
        for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * ldy + j * kLanes, keep, acc[m][j]);
    }
}

template <typename Format> struct Of;
template <> struct Of<Q4> { using type = ZQ4; };
template <> struct Of<Q8> { using type = ZQ8; };

// The 512-bit tiles for tile_of: 8 int32 and 8 float32 sums, 4 weight registers; on a Zen 5, 32 and 64 rows: 4 x 2
// and 3 x 3 equal within noise, 5 x 2 and 6 x 2 ~5-10 % slower, 8 x 1 ~20 %, 2 x 4 3x slower.
struct Tiles {
    static constexpr int kMR = 4, kNR = 2;
    template <int MR, int NR, typename Format>
    static void run(const QuantizedRows& x, int64_t r0, const Format& w, int64_t p0, float* y, int64_t ldy,
                    int64_t cols) {
        tile<MR, NR, typename Of<Format>::type>(x, r0, w, p0, y, ldy, cols);
    }
};

}  // namespace zmm
#endif

// The rows quantized once, then the panel walk (panels.h) with this file's tiles.
template <typename Format>
void gemm_x8(const float* x, const Format& w, float* y, int64_t rows, int64_t n, int64_t k) {
    const Quantized xq(x, rows, k);
#if defined(EOQ_X8_ZMM)
    using Tiles = zmm::Tiles;
#else
    using Tiles = Ymm;
#endif
    eoq::panels::for_each_group<Tiles::kNR>(rows, n, [&](eoq::panels::NoScratch&, const eoq::panels::Group& t) {
        for (int64_t r = 0; r < t.rc; r += Tiles::kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(Tiles::kMR, t.rc - r));
            tile_of<Tiles, Format>(mr, t.nr)(xq.rows, t.r0 + r, w, t.p0, y + (t.r0 + r) * n + t.col0, n, t.cols);
        }
    });
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_gemm_q4_x8(const float* x, const uint8_t* q, const float* scales, float* y, int64_t rows, int64_t n,
                   int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || k % kBlock) return 1;
    gemm_x8(x, Q4{{q, scales, k}}, y, rows, n, k);
    return 0;
}

int eoq_gemm_q8_x8(const float* x, const int8_t* q, const float* scales, float* y, int64_t rows, int64_t n,
                   int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || k % kBlock) return 1;
    gemm_x8(x, Q8{{q, scales, k}}, y, rows, n, k);
    return 0;
}

}  // extern "C"
