// Which of simd.h's branches this build took ("avx512", "avx2" or "generic") and which integer dot product
// simd_int8.h's int8-activation kernels use (logged at load; tests build each branch the machine can run).

#include "eoq_kernels.h"
#include "simd.h"
#include "simd_int8.h"

extern "C" const char* eoq_simd_isa(void) { return eoq::simd::kIsa; }
extern "C" const char* eoq_int8_dot_isa(void) { return eoq::simd8::kDot; }
