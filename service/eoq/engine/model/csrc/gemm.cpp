// y = x W^T in float32 for a weight packed once at load into panels of 16 output features: panel p holds
// W[16p .. 16p+15, :] as (in_features, 16), so one 64-byte line is one input feature of 16 outputs (the last
// panel is padded with zero rows).
//
// The same for a 4- or 8-bit weight (groups of 32 input features with a step and a minimum each: a GGUF's Q4_1; or
// a scale: Q8_0) in the panels of the int8-activation kernel (x8_gemm.cpp; one layout serves both kinds of
// activations). Each thread expands the block of weights it is about to use (3 panels x 128 inputs, 24 KiB) into
// float32 in its L1 cache
// and runs the same tiles over it: an eighth of the bytes from memory for the same arithmetic (at 32 rows the
// float32 weights took ~21 ms a step to stream on this machine kind, about as long as the arithmetic).
//
// Why not the BLAS torch calls: on CPUs without fast bfloat16 the engine runs in float32, and there the BLAS
// path of F.linear for the few rows of a decode step (transposed weight, 4..48 rows) ran at 40-80 GFLOP/s on
// this machine kind, 2-3x under the same BLAS with packed weights; packed weights in that BLAS are only used for
// one batch size, decided when packing. This kernel takes any number of rows.
//
// A tile of rows x panels is held in registers over a block of 128 input features — 8 rows x 48 outputs in 24
// AVX-512 registers (each input feature: 3 weight loads and 8 broadcasts for 24 FMAs), 6 x 16 in 12 AVX2 registers
// (simd.h) —; the block's sums are then added to the output (sums of 128 terms added up, not one running sum over
// all inputs: closer to the exact result).
// Output panels are spread over torch's OpenMP threads; each thread walks the rows of a chunk of up to 64 rows
// while its panels' block of weights (24 KiB) stays in its L1 cache.

#include <algorithm>
#include <cstdint>
#include <utility>

#include "eoq_kernels.h"
#include "panels.h"
#include "simd.h"

namespace {

using eoq::panels::kLanes;  // output features per panel
using eoq::simd::F16;

constexpr int64_t kBlockK = 128;
constexpr int kMR = eoq::simd::kGemmRows;    // rows per tile
constexpr int kNR = eoq::simd::kGemmPanels;  // panels per tile

template <int MR, int NR>
void tile(const float* a, int64_t lda, const float* b, int64_t panel_stride, int64_t k, float* c, int64_t ldc,
          int64_t cols, bool accumulate) {
    F16 acc[MR][NR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
        for (int j = 0; j < NR; ++j) acc[m][j] = eoq::simd::zero();
    for (int64_t p = 0; p < k; ++p) {
        F16 bv[NR];
#pragma GCC unroll 3
        for (int j = 0; j < NR; ++j) bv[j] = eoq::simd::load(b + j * panel_stride + p * kLanes);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const F16 av = eoq::simd::set1(a[m * lda + p]);
#pragma GCC unroll 3
            for (int j = 0; j < NR; ++j) acc[m][j] = eoq::simd::fmadd(av, bv[j], acc[m][j]);
        }
    }
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) {
        const int left = static_cast<int>(std::min<int64_t>(cols - j * kLanes, kLanes));
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            float* out = c + m * ldc + j * kLanes;
            if (left == kLanes) {
                eoq::simd::store(out, accumulate ? acc[m][j] + eoq::simd::load(out) : acc[m][j]);
            } else {
                eoq::simd::store_first(out, accumulate ? acc[m][j] + eoq::simd::load_first(out, left) : acc[m][j],
                                       left);
            }
        }
    }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t, bool);

template <int MR, int... NR>
constexpr TileFn pick(int nr, std::integer_sequence<int, NR...>) {
    TileFn fn = nullptr;
    ((fn = nr == NR + 1 ? tile<MR, NR + 1> : fn), ...);
    return fn;
}

template <int... MR>
TileFn tile_for(int mr, int nr, std::integer_sequence<int, MR...>) {
    TileFn fn = nullptr;
    ((fn = mr == MR + 1 ? pick<MR + 1>(nr, std::make_integer_sequence<int, kNR>{}) : fn), ...);
    return fn;
}

inline TileFn tile_for(int mr, int nr) { return tile_for(mr, nr, std::make_integer_sequence<int, kMR>{}); }

// The panel formats. Each gives the float32 weights of panels [p0, p0 + nr) for inputs [k0, k0 + kc) — its own
// memory, or a block it expanded them into — with the distance from one panel to the next (stride), and asks for
// a panel's block ahead of its use.

// float32: (panels, k, 16), used where it lies.
struct F32 {
    const float* w;
    int64_t k;

    const float* panels(int64_t p0, int, int64_t k0, int64_t, float*, int64_t& stride) const {
        stride = k * kLanes;
        return w + p0 * k * kLanes + k0 * kLanes;
    }

    void prefetch(int64_t p, int64_t k0) const {
        eoq::simd::prefetch(w + (p * k + k0) * kLanes, kBlockK * kLanes * sizeof(float));
    }
};

// The low-bit formats (Format derives from Expanded<Format>) expand each panel's block into (kc, 16) float32 with
// their expand(); k0 and kc are multiples of 32.
template <typename Format>
struct Expanded {
    const float* panels(int64_t p0, int nr, int64_t k0, int64_t kc, float* block, int64_t& stride) const {
        for (int j = 0; j < nr; ++j)
            static_cast<const Format&>(*this).expand(p0 + j, k0, kc, block + j * kBlockK * kLanes);
        stride = kBlockK * kLanes;
        return block;
    }
};

// The low-bit panels are laid out for the int8-activation kernel (x8_gemm.cpp, formats.py's pack_*_panels): a 64-byte
// line per few inputs of a panel, output j's bytes in its 32-bit lane j. Expanded into float32 here, each weight is
// the value the float32 arithmetic of the format gives (step * q + min, scale * q), whatever the layout.

// 4-bit: values (panels, k / 8, 16, 4) uint8, a line per 8 inputs 8i..8i+7: byte b of lane j holds output j's input
// 8i + b in its low nibble and 8i + 4 + b in its high one; scales (panels, k / 32, 2, 16) float32, each group's 16
// steps then 16 minimums: w = step * q + min.
struct Q4 : Expanded<Q4> {
    const uint8_t* q;
    const float* s;
    int64_t k;

    template <int B>
    __attribute__((always_inline)) static void octet_quad(const uint8_t* line, F16 step, F16 mn, float* out) {
        eoq::simd::store(out + B * kLanes, eoq::simd::fmadd(eoq::simd::lane_nibble<8 * B>(line), step, mn));
        eoq::simd::store(out + (4 + B) * kLanes, eoq::simd::fmadd(eoq::simd::lane_nibble<8 * B + 4>(line), step, mn));
    }

    void expand(int64_t p, int64_t k0, int64_t kc, float* out) const {
        const uint8_t* qp = q + p * (k / 8) * 4 * kLanes;
        const float* sp = s + p * (k / 32) * 2 * kLanes;
        for (int64_t g0 = k0; g0 < k0 + kc; g0 += 32) {
            const F16 step = eoq::simd::load(sp + (g0 / 32) * 2 * kLanes);
            const F16 mn = eoq::simd::load(sp + (g0 / 32) * 2 * kLanes + kLanes);
#pragma GCC unroll 4
            for (int64_t i = g0; i < g0 + 32; i += 8) {
                const uint8_t* line = qp + (i / 8) * 4 * kLanes;
                float* o = out + (i - k0) * kLanes;
                octet_quad<0>(line, step, mn, o);
                octet_quad<1>(line, step, mn, o);
                octet_quad<2>(line, step, mn, o);
                octet_quad<3>(line, step, mn, o);
            }
        }
    }

    void prefetch(int64_t p, int64_t k0) const {
        eoq::simd::prefetch(q + (p * (k / 8) + k0 / 8) * 4 * kLanes, kBlockK / 2 * kLanes);
        eoq::simd::prefetch(s + (p * (k / 32) + k0 / 32) * 2 * kLanes, kBlockK / 32 * 2 * kLanes * sizeof(float));
    }
};

// 8-bit: values (panels, k / 4, 16, 4) int8, a line per 4 inputs 4i..4i+3: byte b of lane j is output j's input
// 4i + b; scales (panels, k / 32, 16) float32: w = scale * q.
struct Q8 : Expanded<Q8> {
    const int8_t* q;
    const float* s;
    int64_t k;

    void expand(int64_t p, int64_t k0, int64_t kc, float* out) const {
        const int8_t* qp = q + p * k * kLanes;
        const float* sp = s + p * (k / 32) * kLanes;
        for (int64_t g0 = k0; g0 < k0 + kc; g0 += 32) {
            const F16 scale = eoq::simd::load(sp + (g0 / 32) * kLanes);
#pragma GCC unroll 4
            for (int64_t i = g0; i < g0 + 32; i += 4) {
                const int8_t* line = qp + i * kLanes;  // (i / 4) lines of 4 * 16 bytes
                float* o = out + (i - k0) * kLanes;
                eoq::simd::store(o, eoq::simd::lane_byte<0>(line) * scale);
                eoq::simd::store(o + kLanes, eoq::simd::lane_byte<1>(line) * scale);
                eoq::simd::store(o + 2 * kLanes, eoq::simd::lane_byte<2>(line) * scale);
                eoq::simd::store(o + 3 * kLanes, eoq::simd::lane_byte<3>(line) * scale);
            }
        }
    }

    void prefetch(int64_t p, int64_t k0) const {
        eoq::simd::prefetch(q + (p * k + k0) * kLanes, kBlockK * kLanes);
        eoq::simd::prefetch(s + (p * (k / 32) + k0 / 32) * kLanes, kBlockK / 32 * kLanes * sizeof(float));
    }
};

// A thread's block of expanded weights: kNR panels x 128 inputs in float32, 24 KiB, in its L1 cache.
struct Block {
    alignas(64) float v[kNR * kBlockK * kLanes];
};

// Output panels are spread over the threads in groups of kNR (panels.h); a thread takes each group's weights a block
// of 128 inputs at a time (a low-bit format expands it into float32 in the thread's Block) and runs the tiles over it
// for every row of the chunk, asking for the next block meanwhile.
template <typename Format>
void gemm_panels(const float* x, const Format& w, float* y, int64_t rows, int64_t n, int64_t k) {
    eoq::panels::for_each_group<kNR, Block>(rows, n, [&](Block& block, const eoq::panels::Group& t) {
        for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
            const int64_t kc = std::min(kBlockK, k - k0);
            int64_t stride = 0;
            const float* b = w.panels(t.p0, t.nr, k0, kc, block.v, stride);
            // The next block of these panels, or the first of the next panels.
            const bool last = k0 + kBlockK >= k;
            for (int j = 0; j < kNR; ++j) {
                const int64_t pn = last ? t.p0 + kNR + j : t.p0 + j;
                if (pn < t.panels) w.prefetch(pn, last ? 0 : k0 + kBlockK);
            }
            for (int64_t r = 0; r < t.rc; r += kMR) {
                const int mr = static_cast<int>(std::min<int64_t>(kMR, t.rc - r));
                tile_for(mr, t.nr)(x + (t.r0 + r) * k + k0, k, b, stride, kc, y + (t.r0 + r) * n + t.col0, n, t.cols,
                                   k0 > 0);
            }
        }
    });
}

}  // namespace

extern "C" {  // the entry points declared in eoq_kernels.h

int eoq_gemm_f32(const float* x, const float* packed, float* y, int64_t rows, int64_t n, int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || reinterpret_cast<uintptr_t>(packed) % 64) return 1;
    gemm_panels(x, F32{packed, k}, y, rows, n, k);
    return 0;
}

int eoq_gemm_q4(const float* x, const uint8_t* q, const float* scales, float* y, int64_t rows, int64_t n, int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || k % 32) return 1;
    gemm_panels(x, Q4{{}, q, scales, k}, y, rows, n, k);
    return 0;
}

int eoq_gemm_q8(const float* x, const int8_t* q, const float* scales, float* y, int64_t rows, int64_t n, int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || k % 32) return 1;
    gemm_panels(x, Q8{{}, q, scales, k}, y, rows, n, k);
    return 0;
}

}  // extern "C"
