// The KV cache as kernels see it: a trivially copyable view passed by value.
// No ownership, no allocation, no logging. Built and validated on the host by
// MakeKvCacheView (kernels/kv_cache_view_util.h).
#pragma once

#include <cstdint>
#include <type_traits>

#include "runtime/kv_format.h"

namespace strata {

// One layer's block pool.
struct KvCacheView {
  KvBlockLayout layout;
  // [num_blocks][layout.block_bytes], 16-byte aligned.
  uint8_t* pool = nullptr;
  int32_t num_blocks = 0;
  // Static scale mode only: per kv head of this shard, [num_kv_heads] each.
  // Dequantized value = (q - zero) * scale; zero is 0 for fp8.
  const float* k_scale = nullptr;
  const float* k_zero = nullptr;
  const float* v_scale = nullptr;
  const float* v_zero = nullptr;

  STRATA_HD uint8_t* block(int32_t b) const {
    return pool + static_cast<int64_t>(b) * layout.block_bytes;
  }
};
static_assert(std::is_trivially_copyable_v<KvCacheView>);

// Per-step batch description shared by the attention kernels. All arrays are
// host or device pointers matching the kernel's backend.
struct PagedBatchView {
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;             // total new tokens in the step
  int32_t max_blocks_per_seq = 0;     // row stride of block_tables
  const int32_t* block_tables = nullptr;  // [num_seqs][max_blocks_per_seq], block ids
  const int32_t* context_lens = nullptr;  // [num_seqs] tokens in cache after this step's write
  const int32_t* query_start = nullptr;   // [num_seqs + 1] prefix sums of new tokens per seq
  // [num_tokens] slot = block_id * block_size + offset; -1 = padding (not written).
  const int64_t* slot_mapping = nullptr;
};
static_assert(std::is_trivially_copyable_v<PagedBatchView>);

}  // namespace strata
