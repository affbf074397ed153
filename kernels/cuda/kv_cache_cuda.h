// CUDA kernels over the paged, quantized KV cache.
//
// Every launcher takes its views by value, checks its arguments, enqueues work
// on `stream` and returns a cudaError_t (never synchronizes, never aborts):
//   cudaSuccess               enqueued
//   cudaErrorNotSupported     the (dtype, scale mode, head_dim) combination has
//                             no kernel instance (see KernelSupported)
//   cudaErrorInvalidValue     malformed arguments (host-visible ones only)
//   anything else             the launch's own error (cudaGetLastError)
// kernels/cuda/kv_cache_cuda_status.h converts these to absl::Status.
//
// All pointers below are device pointers unless marked "host". Shapes in
// comments; slot -1 = padding. The CPU reference of each kernel is named in
// its comment (kernels/cpu/kv_cache_cpu.h); kv_cache_cuda_test.cc compares
// the two across formats x head_dim x block size x GQA ratio.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/kv_cache_view.h"

namespace strata::cuda {

// Typed descriptor of one kernel instance. Instances exist for every format
// KvFormatSupported() accepts and head_dim in {48, 64, 128}.
struct KernelDesc {
  KvDtype dtype = KvDtype::kFp32;
  KvScaleMode scale_mode = KvScaleMode::kNone;
  int32_t head_dim = 0;
};
inline KernelDesc DescOf(const KvCacheView& v) {
  return {v.layout.format.dtype, v.layout.format.scale_mode, v.layout.head_dim};
}
// cudaSuccess or cudaErrorNotSupported.
cudaError_t KernelSupported(const KernelDesc& desc);

// Quantizes and writes new K/V rows into their slots (reference:
// cpu::WriteKvCache; the written bytes are identical).
//   key, value:   [num_tokens][num_kv_heads][head_dim] fp32
//   slot_mapping: [num_tokens] int64, -1 = padding (skipped)
cudaError_t WriteKvCache(KvCacheView cache, const float* key, const float* value,
                         const int64_t* slot_mapping, int32_t num_tokens, cudaStream_t stream);

// Arguments shared by the attention launchers. The batch's arrays
// (block_tables, context_lens, query_start) are device arrays; slot_mapping
// is not read.
struct AttentionArgs {
  KvCacheView cache;
  PagedBatchView batch;
  const float* query = nullptr;  // [num_tokens][num_heads][head_dim] fp32, after RoPE
  float* out = nullptr;          // [num_tokens][num_heads][head_dim] fp32
  int32_t num_heads = 0;         // multiple of cache.layout.num_kv_heads
  float softmax_scale = 0.0f;
  // PagedPrefillAttention only: leave sequences with exactly one new token
  // alone (their output rows are not written), so that a mixed step can run
  // them through PagedDecodeAttention on a sub-batch.
  bool skip_single_token = false;
  // PagedPrefillAttention only: when not null, thread blocks are launched for
  // these `num_indexed_seqs` sequences of the batch alone (a device array of
  // distinct indices in [0, batch.num_seqs): a mixed step's multi-token
  // sequences) and none for the rest, whose output rows are left untouched.
  // Without it a mixed step of 64 decodes and one 200-token chunk launched 65
  // sequences' worth of thread blocks, 98% of which exited at once: 5-21 us
  // of attention per layer at llama-2-13b's tp=1 / 2 / 4 shard head counts
  // on an H100 (bench/results/prefill_attention_2026-11-27_h100.md).
  const int32_t* seq_index = nullptr;
  int32_t num_indexed_seqs = 0;
};

// Split-K plan of one decode step, built once per step on the host. Each
// sequence's context is cut into partitions of `partition_size` tokens, one
// thread block per (partition, kv head group, sequence); partial results are
// merged by a second kernel.
struct DecodePlan {
  int32_t partition_size = 0;   // tokens; multiple of 256 and of block_size, <= MaxDecodePartition
  int32_t max_splits = 0;       // ceil(max_context_len / partition_size)
  int32_t max_context_len = 0;  // every context_len of the step must be <= this
  int64_t workspace_bytes = 0;  // device scratch PagedDecodeAttention needs
};
constexpr int32_t kMaxPartition = 2048;     // the CUDA-core decode kernel
constexpr int32_t kMaxPartitionMma = 4096;  // the tensor-core one (8-bit / 4-bit caches, fp16 and
                                            // bf16 at head_dim 128; block >= 16)
// The largest partition the decode kernel of `cache`'s format takes.
int32_t MaxDecodePartition(const KvCacheView& cache);

// `num_sms`: the device's multiprocessor count (cudaDevAttrMultiProcessorCount).
DecodePlan PlanDecode(const KvCacheView& cache, int32_t num_seqs, int32_t num_heads,
                      int32_t max_context_len, int32_t num_sms);
// The same with a forced partition size (benchmarks, tests).
DecodePlan PlanDecodeWithPartition(const KvCacheView& cache, int32_t num_seqs,
                                   int32_t num_heads, int32_t max_context_len,
                                   int32_t partition_size);

// Decode attention: exactly one new token per sequence (query_start[s] = its
// token index), at position context_lens[s] - 1, attending to positions
// [0, context_lens[s] - 1] (reference: cpu::PagedAttention). GQA: the query
// heads of one kv head share each K/V load. `workspace`: plan.workspace_bytes
// of device memory (may be null when 0). A context longer than
// plan.max_context_len yields NaN output for that sequence.
cudaError_t PagedDecodeAttention(AttentionArgs args, DecodePlan plan, void* workspace,
                                 cudaStream_t stream);

// Prefill / chunked prefill / mixed attention over the paged cache: every new
// token attends causally to its sequence's cached prefix and to the new tokens
// before it (reference: cpu::PagedAttention). `max_new_tokens`: host-known
// upper bound of query_start[s+1] - query_start[s]. Tokens after
// query_start[num_seqs] (padding) are not written.
cudaError_t PagedPrefillAttention(AttentionArgs args, int32_t max_new_tokens,
                                  cudaStream_t stream);

// Copy-on-write: copies whole blocks (all sections) src[i] -> dst[i] within
// one layer's pool (reference: cpu::CopyBlocks). src, dst: [n] device arrays;
// out-of-range pairs are skipped. dst blocks must be distinct and not sources.
cudaError_t CopyBlocks(KvCacheView cache, const int32_t* src, const int32_t* dst, int32_t n,
                       cudaStream_t stream);

enum class SwapDirection : uint8_t { kDeviceToHost = 0, kHostToDevice = 1 };

// Swaps whole blocks between the device pool and a pinned host pool of the same
// layout: kDeviceToHost copies device block src[i] to host block dst[i],
// kHostToDevice host block src[i] to device block dst[i]. src, dst: host
// arrays [n]; ids are checked against num_blocks / host_num_blocks (error:
// cudaErrorInvalidValue, nothing enqueued). Runs of consecutive ids are merged
// and the step's copies go out as one cudaMemcpyBatchAsync (per-run
// cudaMemcpyAsync on the legacy default stream, which the batch API rejects).
cudaError_t SwapBlocks(KvCacheView device_cache, uint8_t* host_pool, int32_t host_num_blocks,
                       const int32_t* src, const int32_t* dst, int32_t n, SwapDirection dir,
                       cudaStream_t stream);

}  // namespace strata::cuda
