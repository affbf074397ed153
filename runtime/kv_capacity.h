// KV cache capacity planning: how many blocks fit a byte budget.
//
// Host-only. A "block" here spans every layer: the worker allocates one pool
// per layer and a BlockId indexes the same slot in each (see kv_format.h), so
// one block costs num_layers * KvBlockBytes(...) bytes. The worker measures
// the byte budgets (free device memory after weights and activations, times
// --gpu-memory-utilization; --swap-space GiB of pinned host memory); this file
// only does the arithmetic, so an int8 cache gets ~2x and an int4 cache ~4x
// the blocks of fp16 for the same bytes (a little less: their per-token
// scales/zero points are counted).
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "runtime/kv_format.h"

namespace strata {

// Shape of the cache held by one worker (one tensor-parallel shard).
struct KvCacheShape {
  KvFormat format;
  int32_t block_size = 16;   // tokens per block, power of two
  int32_t num_kv_heads = 0;  // kv heads of this shard
  int32_t head_dim = 0;
  int32_t num_layers = 0;
};

// OK, or INVALID_ARGUMENT naming the bad field (non-positive sizes, block size
// not a power of two), or UNIMPLEMENTED for a format KvFormatSupported()
// rejects.
absl::Status ValidateKvCacheShape(const KvCacheShape& shape);

// Exact bytes of one block across all layers.
int64_t KvBytesPerBlock(const KvCacheShape& shape);

// Number of whole blocks that fit `bytes_budget` (>= 0). Errors as
// ValidateKvCacheShape, plus INVALID_ARGUMENT for a negative budget.
absl::StatusOr<int64_t> PlanKvPool(int64_t bytes_budget, const KvCacheShape& shape);
// Same, spelled out.
absl::StatusOr<int64_t> PlanKvPool(int64_t bytes_budget, KvFormat format, int32_t block_size,
                                   int32_t num_kv_heads, int32_t head_dim, int32_t num_layers);

// Budgets the worker measured, in bytes.
struct KvMemoryBudget {
  int64_t gpu_bytes = 0;  // free device memory * gpu_memory_utilization
  int64_t cpu_bytes = 0;  // swap space (GiB flag converted with SwapSpaceBytes)
};

struct KvPoolPlan {
  int64_t bytes_per_block = 0;  // all layers
  int32_t num_gpu_blocks = 0;
  int32_t num_cpu_blocks = 0;
};

// Plans both pools. INVALID_ARGUMENT also when a pool would exceed the int32
// range of BlockId.
absl::StatusOr<KvPoolPlan> PlanKvPools(const KvMemoryBudget& budget, const KvCacheShape& shape);

// `--swap-space` is in GiB (may be fractional); INVALID_ARGUMENT if negative.
absl::StatusOr<int64_t> SwapSpaceBytes(double swap_space_gib);

// Tokens of KV (all layers) that one GiB holds, counting scales, zero points
// and alignment padding.
double KvTokensPerGiB(const KvCacheShape& shape);

}  // namespace strata
