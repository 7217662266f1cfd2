// y = x W^T in float32 for a weight packed once at load into panels of 16 output features: panel p holds
// W[16p .. 16p+15, :] as (in_features, 16), so one 64-byte line is one input feature of 16 outputs (the last
// panel is padded with zero rows).
//
// Why not the BLAS torch calls: on CPUs without fast bfloat16 the engine runs in float32, and there the BLAS
// path of F.linear for the few rows of a decode step (transposed weight, 4..48 rows) ran at 40-80 GFLOP/s on
// this machine kind, 2-3x under the same BLAS with packed weights; packed weights in that BLAS are only used for
// one batch size, decided when packing. This kernel takes any number of rows.
//
// A tile of up to 8 rows x 48 output features is held in 24 AVX-512 registers over a block of 128 input
// features: each input feature costs 3 weight loads and 8 broadcasts for 24 FMAs; the block's sums are then added
// to the output (sums of 128 terms added up, not one running sum over all inputs: closer to the exact result).
// Output panels are spread over torch's OpenMP threads; each thread walks the rows of a chunk of up to 64 rows
// while its panels' block of weights (24 KiB) stays in its L1 cache.

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // output features per panel
constexpr int64_t kRowChunk = 64;
constexpr int64_t kBlockK = 128;

#if defined(__AVX512F__)
constexpr int kMR = 8;  // rows per tile
constexpr int kNR = 3;  // panels per tile

template <int MR, int NR>
void tile(const float* a, int64_t lda, const float* b, int64_t panel_stride, int64_t k, float* c, int64_t ldc,
          int64_t cols, bool accumulate) {
    __m512 acc[MR][NR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 3
        for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k; ++p) {
        __m512 bv[NR];
#pragma GCC unroll 3
        for (int j = 0; j < NR; ++j) bv[j] = _mm512_load_ps(b + j * panel_stride + p * kLanes);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            const __m512 av = _mm512_set1_ps(a[m * lda + p]);
#pragma GCC unroll 3
            for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_fmadd_ps(av, bv[j], acc[m][j]);
        }
    }
#pragma GCC unroll 3
    for (int j = 0; j < NR; ++j) {
        const int64_t left = cols - j * kLanes;
        const __mmask16 mask = left >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) {
            float* out = c + m * ldc + j * kLanes;
            const __m512 sum = accumulate ? _mm512_add_ps(acc[m][j], _mm512_maskz_loadu_ps(mask, out)) : acc[m][j];
            _mm512_mask_storeu_ps(out, mask, sum);
        }
    }
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t, bool);

template <int MR>
constexpr TileFn pick(int nr) {
    return nr == 1 ? tile<MR, 1> : nr == 2 ? tile<MR, 2> : tile<MR, 3>;
}

TileFn tile_for(int mr, int nr) {
    switch (mr) {
        case 1: return pick<1>(nr);
        case 2: return pick<2>(nr);
        case 3: return pick<3>(nr);
        case 4: return pick<4>(nr);
        case 5: return pick<5>(nr);
        case 6: return pick<6>(nr);
        case 7: return pick<7>(nr);
        default: return pick<8>(nr);
    }
}

void gemm(const float* x, const float* packed, float* y, int64_t rows, int64_t n, int64_t k) {
    const int64_t panels = (n + kLanes - 1) / kLanes;
    const int64_t groups = (panels + kNR - 1) / kNR;
    const int64_t stride = k * kLanes;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const int64_t rc = std::min(kRowChunk, rows - r0);
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t p0 = g * kNR;
            const int nr = static_cast<int>(std::min<int64_t>(kNR, panels - p0));
            const int64_t col0 = p0 * kLanes;
            const int64_t cols = std::min(nr * kLanes, n - col0);
            for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
                const int64_t kc = std::min(kBlockK, k - k0);
                for (int64_t r = 0; r < rc; r += kMR) {
                    const int mr = static_cast<int>(std::min<int64_t>(kMR, rc - r));
                    tile_for(mr, nr)(x + (r0 + r) * k + k0, k, packed + p0 * stride + k0 * kLanes, stride, kc,
                                     y + (r0 + r) * n + col0, n, cols, k0 > 0);
                }
            }
        }
    }
}
#else
void gemm(const float* x, const float* packed, float* y, int64_t rows, int64_t n, int64_t k) {
    const int64_t panels = (n + kLanes - 1) / kLanes;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        const float* b = packed + p * k * kLanes;
        const int64_t cols = std::min(kLanes, n - p * kLanes);
        for (int64_t r = 0; r < rows; ++r) {
            float acc[kLanes] = {};
            const float* a = x + r * k;
            for (int64_t i = 0; i < k; ++i) {
#pragma omp simd
                for (int64_t j = 0; j < kLanes; ++j) acc[j] += a[i] * b[i * kLanes + j];
            }
            for (int64_t j = 0; j < cols; ++j) y[r * n + p * kLanes + j] = acc[j];
        }
    }
}
#endif

}  // namespace

extern "C" {

// x float32 (rows, k) contiguous, packed float32 (ceil(n / 16), k, 16) 64-byte aligned, y float32 (rows, n).
// Returns 0, or non-zero for arguments it cannot take.
int eoq_gemm_f32(const float* x, const float* packed, float* y, int64_t rows, int64_t n, int64_t k) {
    if (rows < 0 || n <= 0 || k <= 0 || reinterpret_cast<uintptr_t>(packed) % 64) return 1;
    gemm(x, packed, y, rows, n, k);
    return 0;
}

}  // extern "C"
