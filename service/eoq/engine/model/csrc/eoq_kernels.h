// The C interface of eoq's CPU kernels: every entry point of the library, declared once.
//
// Each kernel's .cpp includes this header and defines its entry points inside an extern "C" block, so a
// definition that disagrees with its declaration here fails to compile; llama_small.cpp calls the others through
// it; the ctypes bindings (eoq/engine/model/kernels/bindings.py) declare the same signatures, and
// tests/engine/test_kernel_header.py parses this file to check that they agree.
//
// dtype arguments name the element type of the tensors marked "in dtype": 0 = float32, 1 = bfloat16 (held as
// uint16_t); cache_dtype, the same for the KV cache (which may be narrower: bfloat16 beside float32). Tensors are
// contiguous unless a stride is passed. Every entry point returns 0, or a non-zero code for arguments it cannot take
// (2: a dtype it lacks).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// RMSNorm with the residual add before it (rms_norm.cpp): x (rows, dim) float32 += delta (rows, dim) in dtype (or
// null), in place; then out (rows, dim) in dtype = x / sqrt(mean(x^2) + eps) * weight (dim, float32).
int eoq_add_rms_norm(int dtype, float* x, const void* delta, const float* weight, void* out, int64_t rows,
                     int64_t dim, float eps);

// RoPE on a step's queries and keys, with the keys and values written to their cache slots (rope.cpp). qkv
// (tokens, (nh + 2 nkv) hd) in dtype; cos/sin tables float32 (positions, hd), sin with its first half negated
// (rotate_half folded in, as the decoder keeps it); positions and slots (tokens) int64; qk_out (tokens, nh + nkv, hd)
// in dtype, the caches (nkv, cache_slots, hd) in cache_dtype.
int eoq_rope_and_store(int dtype, int cache_dtype, const void* qkv, const float* cos_table,
                       const float* sin_table, const int64_t* positions, const int64_t* slots, void* qk_out,
                       void* k_cache, void* v_cache, int64_t tokens, int64_t num_heads, int64_t num_kv_heads,
                       int64_t head_dim, int64_t cache_slots);

// Decode attention straight from the paged KV cache (paged_decode.cpp). q (num_seqs, num_heads, head_dim) in dtype
// with q_stride elements from one sequence to the next (heads and their elements contiguous); out (num_seqs,
// num_heads, head_dim) in dtype; the caches (num_kv_heads, num_blocks, block_size, head_dim) in cache_dtype;
// block_tables (num_seqs, table_width) and context_lens (num_seqs) int64.
int eoq_paged_decode_attention(int dtype, int cache_dtype, const void* q, int64_t q_stride, const void* k_cache,
                               const void* v_cache, const int64_t* block_tables, const int64_t* context_lens,
                               void* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, int64_t num_blocks, int64_t table_width,
                               float scale);

// SwiGLU's gate (silu_mul.cpp): out (rows, inter) = silu(gate) * up for gate_up (rows, 2 inter) = [gate | up], both
// in dtype.
int eoq_silu_mul(int dtype, const void* gate_up, void* out, int64_t rows, int64_t inter);

// y = x W^T for a few rows (lowbit_rows.cpp): x (rows, in_f) and y (rows, out_f) in dtype, rows <= 8, in_f a
// multiple of 32. 4-bit (a GGUF's Q4_1): q (out_f, in_f / 32, 16) uint8, byte i of a group q[i] | q[i + 16] << 4;
// scales (out_f, in_f / 32, 2) float32 (step, min): w = step * q + min.
int eoq_int4_matmul(int dtype, const void* x, const uint8_t* q, const float* scales, void* y, int64_t rows,
                    int64_t in_f, int64_t out_f);
// 8-bit (a GGUF's Q8_0): q (out_f, in_f) int8; scales (out_f, in_f / 32) float32: w = scale * q.
int eoq_int8_matmul(int dtype, const void* x, const int8_t* q, const float* scales, void* y, int64_t rows,
                    int64_t in_f, int64_t out_f);

// The same with int8 activations (x8_rows.cpp; lossy): each row of x quantized per block of 32 inputs (q in -127..127
// with a float32 scale d = max |x| / 127), each group's products summed in int32 and scaled in float32.
int eoq_int4_matmul_x8(int dtype, const void* x, const uint8_t* q, const float* scales, void* y, int64_t rows,
                       int64_t in_f, int64_t out_f);
int eoq_int8_matmul_x8(int dtype, const void* x, const int8_t* q, const float* scales, void* y, int64_t rows,
                       int64_t in_f, int64_t out_f);

// y = x W^T in float32 for any number of rows, W packed in panels of 16 outputs (gemm.cpp; the formats:
// eoq/engine/model/kernels/formats.py). x (rows, k), y (rows, n). float32: packed (ceil(n / 16), k, 16), 64-byte
// aligned.
int eoq_gemm_f32(const float* x, const float* packed, float* y, int64_t rows, int64_t n, int64_t k);
// 4-bit: q uint8 (ceil(n / 16), k / 2, 16), scales float32 (ceil(n / 16), k / 32, 2, 16); k a multiple of 32.
int eoq_gemm_q4(const float* x, const uint8_t* q, const float* scales, float* y, int64_t rows, int64_t n, int64_t k);
// 8-bit: q int8 (ceil(n / 16), k, 16), scales float32 (ceil(n / 16), k / 32, 16); k a multiple of 32.
int eoq_gemm_q8(const float* x, const int8_t* q, const float* scales, float* y, int64_t rows, int64_t n, int64_t k);

// The same as eoq_gemm_q4 / eoq_gemm_q8 with int8 activations (x8_gemm.cpp; lossy, as eoq_int4_matmul_x8), W in
// panels laid out for integer dot products (eoq/engine/model/kernels/formats.py). 4-bit: q uint8 (ceil(n / 16),
// k / 8, 16, 4), scales as eoq_gemm_q4's; 8-bit: q int8 (ceil(n / 16), k / 4, 16, 4), scales as eoq_gemm_q8's.
int eoq_gemm_q4_x8(const float* x, const uint8_t* q, const float* scales, float* y, int64_t rows, int64_t n,
                   int64_t k);
int eoq_gemm_q8_x8(const float* x, const int8_t* q, const float* scales, float* y, int64_t rows, int64_t n,
                   int64_t k);

// The index of each row's first largest value (argmax.cpp): x float32 (rows, n), out int64 (rows).
int eoq_argmax(const float* x, int64_t* out, int64_t rows, int64_t n);

// A projection's 4-bit weight for eoq_llama_layers_int4: in rows as eoq_int4_matmul takes it (q, s), and in panels
// as eoq_gemm_q4 takes it (pq, ps; null where there are none).
typedef struct EoqInt4Projection {
    const uint8_t* q;
    const float* s;
    const uint8_t* pq;
    const float* ps;
} EoqInt4Projection;

// One layer's weights for eoq_llama_layers_int4 (set once at load): RMSNorm weights float32, the four projections,
// the layer's K and V caches (num_kv_heads, num_blocks, block_size, head_dim).
typedef struct EoqLlamaLayer {
    const float* input_norm;
    const float* post_norm;
    EoqInt4Projection qkv, o, gate_up, down;
    void* k_cache;
    void* v_cache;
} EoqLlamaLayer;

typedef struct EoqLlamaShape {
    int64_t hidden, num_heads, num_kv_heads, head_dim, inter, block_size, num_blocks;
    float eps, scale;
} EoqLlamaShape;

// Every layer of a Llama-family decoder for a decode step, in one call (llama_small.cpp). pending in dtype, the
// caches in cache_dtype. x (tokens, hidden) float32: the residual stream (the embeddings), updated in place;
// pending (tokens, hidden): on return the last layer's MLP output, not yet added to x (the final norm adds it);
// every decoding token's position, slot, block table row (table_width blocks) and context length, as the kernels
// above take them. The projections: steps of up to row_tokens tokens by the row kernels (eoq_int4_matmul), bigger
// ones by the panels (eoq_gemm_q4, a bfloat16 step's rows widened to float32 and back; every layer's panels given,
// else code 3); int8_activations: bit 0 runs the row kernels with int8 activations (eoq_int4_matmul_x8), bit 1 the
// panels (eoq_gemm_q4_x8). Returns 0, or the first failing kernel's code.
int eoq_llama_layers_int4(int dtype, int cache_dtype, const EoqLlamaLayer* layers, int64_t num_layers,
                          EoqLlamaShape s, float* x, void* pending, const float* cos_table, const float* sin_table,
                          const int64_t* positions, const int64_t* slots, const int64_t* block_tables,
                          const int64_t* context_lens, int64_t table_width, int64_t tokens, int64_t row_tokens,
                          int int8_activations);

// Which of simd.h's branches this build took: "avx512", "avx2" or "generic" (isa.cpp).
const char* eoq_simd_isa(void);
// Which integer dot product the int8-activation kernels use (simd_int8.h): "avx512-vnni", "avx-vnni", "avx2"
// (vpmaddubsw) or "generic" (isa.cpp).
const char* eoq_int8_dot_isa(void);

#ifdef __cplusplus
}  // extern "C"
#endif
