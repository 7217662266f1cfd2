// Every layer of a Llama-family decoder for a decode step, in one call.
//
// At one token a step each kernel's work is a few microseconds, and so is the cost of calling it from Python
// (ctypes, the output tensor, the dispatch): nine calls a layer, 270 a step for the default model, cost as much
// as a third of the step; at 32 tokens the calls and the layer's Python still cost ~15 % of it. This runs the same
// kernels (with float32 or int8 activations, as the caller says) in the same order — the add + RMSNorm, the 4-bit
// matmul of the fused q/k/v projection, RoPE with the cache writes, decode attention over the paged cache, the
// output projection, the add + RMSNorm, the 4-bit gate/up projection, SwiGLU and the 4-bit down projection —
// from C++, with the step's intermediates in one buffer kept between calls. The 4-bit matmuls are the row kernels
// for a few tokens and the panel GEMM beyond (a bfloat16 step's rows widened to float32 for it and its results
// rounded back, as Linear does), as Linear chooses them. Same operations, same results.

#include <cstdint>
#include <vector>

#include "bf16.h"
#include "eoq_kernels.h"

extern "C" {  // the entry point declared in eoq_kernels.h, calling the others through it

int eoq_llama_layers_int4(int dtype, int cache_dtype, const EoqLlamaLayer* layers, int64_t num_layers,
                          EoqLlamaShape s, float* x, void* pending, const float* cos_table, const float* sin_table,
                          const int64_t* positions, const int64_t* slots, const int64_t* block_tables,
                          const int64_t* context_lens, int64_t table_width, int64_t tokens, int64_t row_tokens,
                          int int8_activations) {
    if (dtype != 0 && dtype != 1) return 2;
    const int64_t T = tokens;
    const bool rows = T <= row_tokens;
    if (!rows) {  // the panels: every layer's
        for (int64_t l = 0; l < num_layers; ++l)
            for (const EoqInt4Projection* P : {&layers[l].qkv, &layers[l].o, &layers[l].gate_up, &layers[l].down})
                if (!P->pq || !P->ps) return 3;
    }
    // The projections' 4-bit matmul: a row kernel (lowbit_rows.cpp, x8_rows.cpp) or the panels (gemm.cpp,
    // x8_gemm.cpp), with float32 or int8 activations (int8_activations: bit 0 the row kernels', bit 1 the panels'):
    // y (T, out_f) = in (T, in_f) W^T.
    auto* const row_kernel = int8_activations & 1 ? eoq_int4_matmul_x8 : eoq_int4_matmul;
    auto* const panel_kernel = int8_activations & 2 ? eoq_gemm_q4_x8 : eoq_gemm_q4;
    auto matmul = [&](const void* in, const EoqInt4Projection& P, void* y, int64_t in_f, int64_t out_f) {
        if (rows) return row_kernel(dtype, in, P.q, P.s, y, T, in_f, out_f);
        int rc = 0;  // the panels take float32: a bfloat16 step's rows widened, the results rounded back
        const int dtype_rc = eoq::in_float32(dtype, in, y, T, in_f, out_f, [&](const float* xf, float* out) {
            rc = panel_kernel(xf, P.pq, P.ps, out, T, out_f, in_f);
        });
        return dtype_rc ? dtype_rc : rc;
    };
    const int64_t elem = dtype == 0 ? 4 : 2, hd = s.head_dim;
    const int64_t qkv_f = (s.num_heads + 2 * s.num_kv_heads) * hd, qk_f = (s.num_heads + s.num_kv_heads) * hd;
    const int64_t attn_f = s.num_heads * hd;
    // The step's intermediates, each (T, features) in dtype, on 64-byte boundaries: reused by every layer.
    const int64_t sizes[] = {s.hidden, qkv_f, qk_f, attn_f, s.hidden, 2 * s.inter, s.inter};
    auto padded = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
    int64_t total = 64;
    for (int64_t f : sizes) total += padded(T * f * elem);
    thread_local std::vector<char> scratch;
    if (static_cast<int64_t>(scratch.size()) < total) scratch.resize(total);
    char* p = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
    void* bufs[7];
    for (int i = 0; i < 7; ++i) {
        bufs[i] = p;
        p += padded(T * sizes[i] * elem);
    }
    void *normed = bufs[0], *qkv = bufs[1], *qk = bufs[2], *attn = bufs[3], *o = bufs[4], *gate_up = bufs[5],
         *act = bufs[6];
    const int64_t cache_slots = s.num_blocks * s.block_size;
    int rc = 0;
    for (int64_t l = 0; l < num_layers && rc == 0; ++l) {
        const EoqLlamaLayer& L = layers[l];
        rc = eoq_add_rms_norm(dtype, x, l > 0 ? pending : nullptr, L.input_norm, normed, T, s.hidden, s.eps);
        if (!rc) rc = matmul(normed, L.qkv, qkv, s.hidden, qkv_f);
        if (!rc)
            rc = eoq_rope_and_store(dtype, cache_dtype, qkv, cos_table, sin_table, positions, slots, qk, L.k_cache,
                                    L.v_cache, T, s.num_heads, s.num_kv_heads, hd, cache_slots);
        if (!rc)
            rc = eoq_paged_decode_attention(dtype, cache_dtype, qk, qk_f, L.k_cache, L.v_cache, block_tables,
                                            context_lens, attn, T, s.num_heads, s.num_kv_heads, hd, s.block_size,
                                            s.num_blocks, table_width, s.scale);
        if (!rc) rc = matmul(attn, L.o, o, attn_f, s.hidden);
        if (!rc) rc = eoq_add_rms_norm(dtype, x, o, L.post_norm, normed, T, s.hidden, s.eps);
        if (!rc) rc = matmul(normed, L.gate_up, gate_up, s.hidden, 2 * s.inter);
        if (!rc) rc = eoq_silu_mul(dtype, gate_up, act, T, s.inter);
        if (!rc) rc = matmul(act, L.down, pending, s.inter, s.hidden);
    }
    return rc;
}

}  // extern "C"
