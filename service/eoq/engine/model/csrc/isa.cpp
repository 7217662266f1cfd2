// Which of simd.h's branches this build took: "avx512", "avx2" or "generic" (logged at load; tests build each
// branch the machine can run).

#include "eoq_kernels.h"
#include "simd.h"

extern "C" const char* eoq_simd_isa(void) { return eoq::simd::kIsa; }
