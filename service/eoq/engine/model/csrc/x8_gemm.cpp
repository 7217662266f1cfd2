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
#include <vector>

#include "eoq_kernels.h"
#include "simd_int8.h"

namespace {

using namespace eoq::simd8;

constexpr int64_t kLanes = 16;  // outputs per panel
constexpr int64_t kRowChunk = 64;
#if defined(__AVX512F__)
constexpr int kMR = 4, kNR = 2;  // 16 int32 and 16 float32 sums in the 32 registers (some spill: touched per group)
#elif defined(__AVX2__)
constexpr int kMR = 3, kNR = 1;
#else
constexpr int kMR = 2, kNR = 1;
#endif

// Each format adds group g's integer products of rows [r0, r0 + MR) and panels [p0, p0 + NR) to ia (lanes 0-7
// and 8-15 of each panel: ia[m][j][0] and [1]), then adds them scaled to acc.
struct Q4 {
    const uint8_t* q;
    const float* s;
    int64_t k;

    template <int MR, int NR>
    __attribute__((always_inline)) void dots(I8 (&ia)[MR][NR][2], const QuantizedRows& x, int64_t r0, int64_t p0,
                                             int64_t g) const {
#pragma GCC unroll 4
        for (int64_t u = 0; u < 4; ++u) {  // the group's 4 octets of inputs
            B32 lo[NR][2], hi[NR][2];
#pragma GCC unroll 2
            for (int j = 0; j < NR; ++j) {
                const uint8_t* base = q + ((p0 + j) * (k / 8) + g * 4 + u) * 64;
#pragma GCC unroll 2
                for (int h = 0; h < 2; ++h) {
                    const B32 v = load32(base + 32 * h);
                    lo[j][h] = low_nibbles(v);
                    hi[j][h] = high_nibbles(v);
                }
            }
#pragma GCC unroll 4
            for (int m = 0; m < MR; ++m) {
                const int8_t* xr = x.q + (r0 + m) * x.k + g * kBlock + 8 * u;
                const B32 a = broadcast4(xr), b = broadcast4(xr + 4);
#pragma GCC unroll 2
                for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
                    for (int h = 0; h < 2; ++h) ia[m][j][h] = dot_us(dot_us(ia[m][j][h], lo[j][h], a), hi[j][h], b);
            }
        }
    }

    template <int MR, int NR>
    __attribute__((always_inline)) void scale(F8 (&acc)[MR][NR][2], const I8 (&ia)[MR][NR][2],
                                              const QuantizedRows& x, int64_t r0, int64_t p0, int64_t g) const {
        const int64_t nb = k / kBlock;
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) {
            const float* sp = s + ((p0 + j) * nb + g) * 2 * kLanes;
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                const F8 step = fload(sp + 8 * h), mn = fload(sp + kLanes + 8 * h);
#pragma GCC unroll 4
                for (int m = 0; m < MR; ++m) {
                    const int64_t b = (r0 + m) * nb + g;
                    acc[m][j][h] = fmadd(mn, fset1(x.dsum[b]), fmadd(ia[m][j][h], fmul(step, fset1(x.d[b])), acc[m][j][h]));
                }
            }
        }
    }
};

struct Q8 {
    const int8_t* q;
    const float* s;
    int64_t k;

    template <int MR, int NR>
    __attribute__((always_inline)) void dots(I8 (&ia)[MR][NR][2], const QuantizedRows& x, int64_t r0, int64_t p0,
                                             int64_t g) const {
#pragma GCC unroll 8
        for (int64_t u = 0; u < 8; ++u) {  // the group's 8 quads of inputs
            B32 w[NR][2];
#pragma GCC unroll 2
            for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
                for (int h = 0; h < 2; ++h) w[j][h] = load32(q + ((p0 + j) * (k / 4) + g * 8 + u) * 64 + 32 * h);
#pragma GCC unroll 4
            for (int m = 0; m < MR; ++m) {
                const B32 a = broadcast4(x.q + (r0 + m) * x.k + g * kBlock + 4 * u);
#pragma GCC unroll 2
                for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
                    for (int h = 0; h < 2; ++h) ia[m][j][h] = dot_ss(ia[m][j][h], w[j][h], a);
            }
        }
    }

    template <int MR, int NR>
    __attribute__((always_inline)) void scale(F8 (&acc)[MR][NR][2], const I8 (&ia)[MR][NR][2],
                                              const QuantizedRows& x, int64_t r0, int64_t p0, int64_t g) const {
        const int64_t nb = k / kBlock;
#pragma GCC unroll 2
        for (int j = 0; j < NR; ++j)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                const F8 sc = fload(s + ((p0 + j) * nb + g) * kLanes + 8 * h);
#pragma GCC unroll 4
                for (int m = 0; m < MR; ++m)
                    acc[m][j][h] = fmadd(ia[m][j][h], fmul(sc, fset1(x.d[(r0 + m) * nb + g])), acc[m][j][h]);
            }
    }
};

// Rows [r0, r0 + MR) x panels [p0, p0 + NR) into y (row stride ldy), the first ``cols`` columns of the panels.
template <int MR, int NR, typename Format>
void tile(const QuantizedRows& x, int64_t r0, const Format& w, int64_t p0, float* y, int64_t ldy, int64_t cols) {
    F8 acc[MR][NR][2];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NR; ++j) acc[m][j][0] = acc[m][j][1] = fzero();
    for (int64_t g = 0; g < x.k / kBlock; ++g) {
        I8 ia[MR][NR][2];
        for (int m = 0; m < MR; ++m)
            for (int j = 0; j < NR; ++j) ia[m][j][0] = ia[m][j][1] = izero();
        w.template dots<MR, NR>(ia, x, r0, p0, g);
        w.template scale<MR, NR>(acc, ia, x, r0, p0, g);
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

template <typename Format>
void gemm_x8(const float* x, const Format& w, float* y, int64_t rows, int64_t n, int64_t k) {
    const int64_t nb = k / kBlock;
    std::vector<int8_t> q(rows * k);
    std::vector<float> scales(2 * rows * nb);
    quantize_rows(x, rows, k, q.data(), scales.data(), scales.data() + rows * nb);
    const QuantizedRows xq{q.data(), scales.data(), scales.data() + rows * nb, k};
    const int64_t panels = (n + kLanes - 1) / kLanes;
    const int64_t groups = (panels + kNR - 1) / kNR;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const int64_t rc = std::min(kRowChunk, rows - r0);
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t p0 = g * kNR;
            const int nr = static_cast<int>(std::min<int64_t>(kNR, panels - p0));
            const int64_t col0 = p0 * kLanes;
            const int64_t cols = std::min(nr * kLanes, n - col0);
            for (int64_t r = 0; r < rc; r += kMR) {
                const int mr = static_cast<int>(std::min<int64_t>(kMR, rc - r));
                tile_for<Format>(mr, nr, std::make_integer_sequence<int, kMR>{})(xq, r0 + r, w, p0,
                                                                                 y + (r0 + r) * n + col0, n, cols);
            }
        }
    }
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_gemm_q4_x8(const float* x, const uint8_t* q, const float* scales, float* y, int64_t rows, int64_t n,
                   int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || k % kBlock) return 1;
    gemm_x8(x, Q4{q, scales, k}, y, rows, n, k);
    return 0;
}

int eoq_gemm_q8_x8(const float* x, const int8_t* q, const float* scales, float* y, int64_t rows, int64_t n,
                   int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || k % kBlock) return 1;
    gemm_x8(x, Q8{q, scales, k}, y, rows, n, k);
    return 0;
}

}  // extern "C"
