#include "runtime/kv_capacity.h"

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/status_macros.h"

namespace strata {

absl::Status ValidateKvCacheShape(const KvCacheShape& s) {
  if (s.block_size <= 0 || (s.block_size & (s.block_size - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV block size must be a positive power of two, got ", s.block_size));
  }
  if (s.num_kv_heads <= 0 || s.head_dim <= 0 || s.num_layers <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache shape needs positive num_kv_heads, head_dim and num_layers, got ",
        s.num_kv_heads, ", ", s.head_dim, ", ", s.num_layers));
  }
  if (s.format.dtype == KvDtype::kInt4 && s.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("int4 KV cache needs an even head_dim, got ", s.head_dim));
  }
  if (!KvFormatSupported(s.format)) {
    return absl::UnimplementedError(absl::StrCat(
        "unsupported KV format: dtype ", static_cast<int>(s.format.dtype), " with scale mode ",
        static_cast<int>(s.format.scale_mode)));
  }
  // The per-layer block must stay addressable with 32-bit offsets.
  const int64_t data = int64_t{s.num_kv_heads} * s.block_size * s.head_dim *
                       KvDtypeBits(s.format.dtype) / 8;
  if (data * 4 > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError("KV block of one layer exceeds 32-bit byte offsets");
  }
  return absl::OkStatus();
}

int64_t KvBytesPerBlock(const KvCacheShape& s) {
  return int64_t{s.num_layers} * KvBlockBytes(s.format, s.block_size, s.num_kv_heads, s.head_dim);
}

absl::StatusOr<int64_t> PlanKvPool(int64_t bytes_budget, const KvCacheShape& shape) {
  RETURN_IF_ERROR(ValidateKvCacheShape(shape));
  if (bytes_budget < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV memory budget must be >= 0 bytes, got ", bytes_budget));
  }
  return bytes_budget / KvBytesPerBlock(shape);
}

absl::StatusOr<int64_t> PlanKvPool(int64_t bytes_budget, KvFormat format, int32_t block_size,
                                   int32_t num_kv_heads, int32_t head_dim, int32_t num_layers) {
  return PlanKvPool(bytes_budget,
                    KvCacheShape{format, block_size, num_kv_heads, head_dim, num_layers});
}

absl::StatusOr<KvPoolPlan> PlanKvPools(const KvMemoryBudget& budget, const KvCacheShape& shape) {
  KvPoolPlan plan;
  ASSIGN_OR_RETURN(const int64_t gpu, PlanKvPool(budget.gpu_bytes, shape));
  ASSIGN_OR_RETURN(const int64_t cpu, PlanKvPool(budget.cpu_bytes, shape));
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (gpu > kMax || cpu > kMax) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool of ", gpu > kMax ? gpu : cpu, " blocks exceeds the BlockId range"));
  }
  plan.bytes_per_block = KvBytesPerBlock(shape);
  plan.num_gpu_blocks = static_cast<int32_t>(gpu);
  plan.num_cpu_blocks = static_cast<int32_t>(cpu);
  return plan;
}

absl::StatusOr<int64_t> SwapSpaceBytes(double swap_space_gib) {
  if (!(swap_space_gib >= 0) || !std::isfinite(swap_space_gib)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--swap-space must be a finite number of GiB >= 0, got ", swap_space_gib));
  }
  return static_cast<int64_t>(swap_space_gib * double{1 << 30});
}

double KvTokensPerGiB(const KvCacheShape& shape) {
  return double{1 << 30} / static_cast<double>(KvBytesPerBlock(shape)) * shape.block_size;
}

}  // namespace strata
