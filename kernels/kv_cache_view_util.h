// Host-side construction and validation of KvCacheView / PagedBatchView.
//
// Kernels never validate: everything a kernel relies on is checked here, once,
// when a worker sets up its cache (MakeKvCacheView) or admits a step
// (ValidatePagedBatchOnHost, for host-resident batch arrays). Errors are
// permanent for the given configuration: INVALID_ARGUMENT for malformed
// shapes/pointers, UNIMPLEMENTED for a KV format Strata does not implement.
// Neither is worth retrying.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/kv_cache_view.h"

namespace strata {

struct KvCacheViewOptions {
  KvFormat format;
  int32_t block_size = 0;    // tokens per block; power of two
  int32_t num_kv_heads = 0;  // kv heads of this shard
  int32_t head_dim = 0;
  // [num_blocks][block_bytes], 16-byte aligned; may be null only if num_blocks == 0.
  uint8_t* pool = nullptr;
  int64_t num_blocks = 0;
  // Static scale mode only ([num_kv_heads] each, same memory space as the
  // kernels that read them). k_zero/v_zero are required for int8 and must be
  // null for fp8 (whose zero point is 0). Must be null for other modes.
  const float* k_scale = nullptr;
  const float* k_zero = nullptr;
  const float* v_scale = nullptr;
  const float* v_zero = nullptr;
};

// Checks, in order:
//   UNIMPLEMENTED     format not accepted by KvFormatSupported()
//   INVALID_ARGUMENT  block_size not a power of two (1..4096); num_kv_heads or
//                     head_dim not positive; head_dim * bits not a whole number
//                     of bytes; any section offset or the block size not fitting
//                     in 32 bits; num_blocks negative or above INT32_MAX; pool
//                     null (with blocks) or not 16-byte aligned; static scale
//                     pointers missing (static mode) or present (other modes).
absl::StatusOr<KvCacheView> MakeKvCacheView(const KvCacheViewOptions& options);

// Validates a step's batch whose arrays are in host memory against `cache`:
// query_start non-decreasing from 0 and ending at or below num_tokens; every
// sequence's context_len >= its new tokens and its blocks
// (ceil(context_len / block_size) <= max_blocks_per_seq) in [0, num_blocks);
// every slot -1 or inside the pool. INVALID_ARGUMENT otherwise.
absl::Status ValidatePagedBatchOnHost(const KvCacheView& cache, const PagedBatchView& batch);

}  // namespace strata
