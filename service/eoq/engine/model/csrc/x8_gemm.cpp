// y = x W^T for any number of rows with int8 activations (the big steps: prefill), W 4- or 8-bit in panels of 16
// outputs laid out for integer dot products (eoq/engine/model/kernels/formats.py, pack_*_x8_panels): each output's
// weights in quads of consecutive inputs, one quad per 32-bit lane, so one instruction (simd_int8.h's dot_us /
// dot_ss) multiplies 4 inputs of 8 outputs by one broadcast quad of a row's activations.
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

#if defined(__AVX512F__)
constexpr int kMR = 4, kNR = 2;  // 16 int32 and 16 float32 sums in the 32 registers (some spill: touched per group)
#elif defined(__AVX2__)
constexpr int kMR = 2, kNR = 1;  // measured on a Zen AVX2 CPU: ~8 % faster than 3 rows (fewer spills of the 16 ymm)
#else
constexpr int kMR = 2, kNR = 1;
#endif

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

template <typename Format>
using TileFn = void (*)(const QuantizedRows&, int64_t, const Format&, int64_t, float*, int64_t, int64_t);

template <typename Format, int MR, int... NR>
constexpr TileFn<Format> pick(int nr, std::integer_sequence<int, NR...>) {
    TileFn<Format> fn = nullptr;
    ((fn = nr == NR + 1 ? tile<MR, NR + 1, Format> : fn), ...);
    return fn;
}

template <typename Format, int... MR>
TileFn<Format> tile_for(int mr, int nr, std::integer_sequence<int, MR...>) {
    TileFn<Format> fn = nullptr;
    ((fn = mr == MR + 1 ? pick<Format, MR + 1>(nr, std::make_integer_sequence<int, kNR>{}) : fn), ...);
    return fn;
}

// The rows quantized once, then the panel walk (panels.h) with this file's tiles.
template <typename Format>
void gemm_x8(const float* x, const Format& w, float* y, int64_t rows, int64_t n, int64_t k) {
    const Quantized xq(x, rows, k);
    eoq::panels::for_each_group<kNR>(rows, n, [&](eoq::panels::NoScratch&, const eoq::panels::Group& t) {
        for (int64_t r = 0; r < t.rc; r += kMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kMR, t.rc - r));
            tile_for<Format>(mr, t.nr, std::make_integer_sequence<int, kMR>{})(xq.rows, t.r0 + r, w, t.p0,
                                                                               y + (t.r0 + r) * n + t.col0, n, t.cols);
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
