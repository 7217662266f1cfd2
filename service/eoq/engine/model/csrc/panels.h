// The walk over a weight packed in panels of 16 outputs that the two panel GEMMs share (gemm.cpp: float32
// activations; x8_gemm.cpp: int8 ones): the rows in chunks of up to 64 and, for each chunk, the panels in groups of
// NR spread over torch's OpenMP threads, so a thread walks the chunk's rows while its panels' weights stay cached.
#pragma once

#include <algorithm>
#include <cstdint>

namespace eoq::panels {

constexpr int64_t kLanes = 16;  // outputs per panel
constexpr int64_t kRowChunk = 64;

// One step of the walk: rows [r0, r0 + rc) by panels [p0, p0 + nr) of the weight's panels, which are its output
// columns [col0, col0 + cols).
struct Group {
    int64_t r0, rc;
    int64_t p0;
    int nr;
    int64_t col0, cols;
    int64_t panels;
};

struct NoScratch {};

// f(scratch, group) for every group of NR panels (the last may have fewer) of an n-output weight and every chunk of
// the rows, each group of a chunk on one thread; scratch is a Scratch that each thread makes for a chunk (gemm.cpp's
// block of expanded weights), left uninitialised.
template <int NR, typename Scratch = NoScratch, typename F>
void for_each_group(int64_t rows, int64_t n, F&& f) {
    const int64_t panels = (n + kLanes - 1) / kLanes;
    const int64_t groups = (panels + NR - 1) / NR;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const int64_t rc = std::min(kRowChunk, rows - r0);
#pragma omp parallel
        {
            Scratch scratch;
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; ++g) {
                const int64_t p0 = g * NR;
                const int nr = static_cast<int>(std::min<int64_t>(NR, panels - p0));
                const int64_t col0 = p0 * kLanes;
                f(scratch, Group{r0, rc, p0, nr, col0, std::min(nr * kLanes, n - col0), panels});
            }
        }
    }
}

}  // namespace eoq::panels
