#include "kernels/kv_cache_view_util.h"

#include <cstdint>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"

namespace strata {
namespace {

constexpr int64_t kMaxU32 = std::numeric_limits<uint32_t>::max();

bool IsPowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The same arithmetic as MakeKvBlockLayout, in 64 bits, so that truncation to
// the layout's uint32 fields can be detected.
int64_t BlockBytes64(KvFormat f, int64_t block_size, int64_t heads, int64_t head_dim) {
  const int64_t token_bytes = head_dim * KvDtypeBits(f.dtype) / 8;
  const int64_t data = AlignUp(heads * block_size * token_bytes, kKvSectionAlign);
  int64_t off = 2 * data;
  const int64_t per_token = heads * block_size;
  const bool scale = f.scale_mode == KvScaleMode::kDynamic;
  if (scale) off += 2 * AlignUp(per_token * 2, kKvSectionAlign);
  if (scale && KvDtypeIsInteger(f.dtype)) off += 2 * AlignUp(per_token, kKvSectionAlign);
  return AlignUp(off, kKvSectionAlign);
}

}  // namespace

absl::StatusOr<KvCacheView> MakeKvCacheView(const KvCacheViewOptions& o) {
  if (!KvFormatSupported(o.format)) {
    return absl::UnimplementedError(absl::StrCat(
        "KV format not implemented: dtype ", static_cast<int>(o.format.dtype), " scale mode ",
        static_cast<int>(o.format.scale_mode)));
  }
  if (!IsPowerOfTwo(o.block_size) || o.block_size > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("block_size must be a power of two in [1, 4096], got ", o.block_size));
  }
  if (o.num_kv_heads <= 0 || o.head_dim <= 0 || o.head_dim > (1 << 16)) {
    return absl::InvalidArgumentError(absl::StrCat("bad shape: num_kv_heads ", o.num_kv_heads,
                                                   ", head_dim ", o.head_dim));
  }
  if ((int64_t{o.head_dim} * KvDtypeBits(o.format.dtype)) % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim ", o.head_dim, " is not a whole number of bytes for this dtype"));
  }
  const int64_t bytes64 = BlockBytes64(o.format, o.block_size, o.num_kv_heads, o.head_dim);
  if (bytes64 > kMaxU32) {
    return absl::InvalidArgumentError(
        absl::StrCat("block of ", bytes64, " bytes does not fit 32-bit offsets"));
  }
  if (o.num_blocks < 0 || o.num_blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("num_blocks out of range: ", o.num_blocks));
  }
  if (o.num_blocks > 0 && o.pool == nullptr) {
    return absl::InvalidArgumentError("pool is null");
  }
  if (reinterpret_cast<uintptr_t>(o.pool) % kKvSectionAlign != 0) {
    return absl::InvalidArgumentError("pool is not 16-byte aligned");
  }
  const bool is_static = o.format.scale_mode == KvScaleMode::kStatic;
  const bool needs_zero = is_static && KvDtypeIsInteger(o.format.dtype);
  if (is_static) {
    if (o.k_scale == nullptr || o.v_scale == nullptr) {
      return absl::InvalidArgumentError("static scale mode needs k_scale and v_scale");
    }
    if (needs_zero && (o.k_zero == nullptr || o.v_zero == nullptr)) {
      return absl::InvalidArgumentError(
          "static int8 needs k_zero and v_zero (pass zeros for a symmetric scale)");
    }
    if (!needs_zero && (o.k_zero != nullptr || o.v_zero != nullptr)) {
      return absl::InvalidArgumentError("fp8 static scales have no zero point");
    }
  } else if (o.k_scale || o.v_scale || o.k_zero || o.v_zero) {
    return absl::InvalidArgumentError("static scales given for a format without static scales");
  }

  KvCacheView v;
  v.layout = MakeKvBlockLayout(o.format, o.block_size, o.num_kv_heads, o.head_dim);
  if (v.layout.block_bytes != bytes64) {
    return absl::InternalError("block layout arithmetic disagrees");  // a bug, not bad input
  }
  v.pool = o.pool;
  v.num_blocks = static_cast<int32_t>(o.num_blocks);
  v.k_scale = o.k_scale;
  v.v_scale = o.v_scale;
  v.k_zero = needs_zero ? o.k_zero : nullptr;
  v.v_zero = needs_zero ? o.v_zero : nullptr;
  return v;
}

absl::Status ValidatePagedBatchOnHost(const KvCacheView& cache, const PagedBatchView& b) {
  if (b.num_seqs < 0 || b.num_tokens < 0 || b.max_blocks_per_seq < 0) {
    return absl::InvalidArgumentError("negative batch sizes");
  }
  if (b.num_seqs > 0 && (b.query_start == nullptr || b.context_lens == nullptr ||
                         b.block_tables == nullptr)) {
    return absl::InvalidArgumentError("batch arrays missing");
  }
  if (b.num_tokens > 0 && b.slot_mapping == nullptr) {
    return absl::InvalidArgumentError("slot_mapping missing");
  }
  if (b.num_seqs > 0 && b.query_start[0] != 0) {
    return absl::InvalidArgumentError("query_start[0] must be 0");
  }
  const int64_t bs = cache.layout.block_size;
  for (int32_t s = 0; s < b.num_seqs; ++s) {
    const int32_t n = b.query_start[s + 1] - b.query_start[s];
    if (n < 0) return absl::InvalidArgumentError(absl::StrCat("query_start decreases at ", s));
    const int32_t ctx = b.context_lens[s];
    if (ctx < n || ctx < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", s, ": context_len ", ctx, " < new tokens ", n));
    }
    const int64_t blocks = (ctx + bs - 1) / bs;
    if (blocks > b.max_blocks_per_seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", s, " needs ", blocks, " blocks > max_blocks_per_seq"));
    }
    for (int64_t i = 0; i < blocks; ++i) {
      const int32_t id = b.block_tables[int64_t{s} * b.max_blocks_per_seq + i];
      if (id < 0 || id >= cache.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", s, ": block id ", id, " out of range"));
      }
    }
  }
  if (b.num_seqs > 0 && b.query_start[b.num_seqs] > b.num_tokens) {
    return absl::InvalidArgumentError("query_start exceeds num_tokens");
  }
  const int64_t slots = int64_t{cache.num_blocks} * bs;
  for (int32_t t = 0; t < b.num_tokens; ++t) {
    const int64_t slot = b.slot_mapping[t];
    if (slot < -1 || slot >= slots) {
      return absl::InvalidArgumentError(absl::StrCat("token ", t, ": slot ", slot, " out of range"));
    }
  }
  return absl::OkStatus();
}

}  // namespace strata
