// CPU kernels over the paged, quantized KV cache. These are the CPU backend's
// real kernels (threaded with OpenMP) and the reference for the CUDA kernels.
#pragma once

#include <cstdint>

#include "kernels/kv_cache_view.h"

namespace strata::cpu {

// Quantizes and writes new K/V rows (after RoPE) into their slots.
//   key, value:   [num_tokens][num_kv_heads][head_dim] fp32
//   slot_mapping: [num_tokens], -1 = padding (skipped)
void WriteKvCache(const KvCacheView& cache, const float* key, const float* value,
                  const int64_t* slot_mapping, int32_t num_tokens);

// Attention of every new token over its sequence's paged cache (causal: the
// token at position p sees cache positions [0, p]). Covers decode (one new
// token per sequence) and prefill/chunked prefill (many), in one call.
//   query: [num_tokens][num_heads][head_dim] fp32 (after RoPE)
//   out:   [num_tokens][num_heads][head_dim] fp32
// The new tokens of sequence s are its last (query_start[s+1]-query_start[s])
// positions, ending at context_lens[s] - 1. GQA: head h reads kv head
// h / (num_heads / num_kv_heads).
void PagedAttention(const KvCacheView& cache, const PagedBatchView& batch, const float* query,
                    int32_t num_heads, float softmax_scale, float* out);

// Copies whole blocks (all sections) src[i] -> dst[i] within one layer's pool.
void CopyBlocks(const KvCacheView& cache, const int32_t* src, const int32_t* dst, int32_t n);

// Reads back (dequantizes) the K and V of one cached token, for tests and
// accuracy tools. k_out, v_out: [num_kv_heads][head_dim].
void ReadKvToken(const KvCacheView& cache, int64_t slot, float* k_out, float* v_out);

}  // namespace strata::cpu
