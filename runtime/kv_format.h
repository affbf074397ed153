// KV cache formats and the exact byte layout of one cache block.
//
// Host-only and dependency-free so that CPU code, CUDA kernels, the block
// manager and capacity planning all use the same arithmetic. The layout is
// documented in kernels/DESIGN.md; this file is its single implementation.
#pragma once

#include <cstdint>
#include <string_view>

#if defined(__CUDACC__)
#define STRATA_HD __host__ __device__
#else
#define STRATA_HD
#endif

namespace strata {

// Element type of cached K/V.
enum class KvDtype : uint8_t {
  kFp32 = 0,
  kFp16 = 1,
  kBf16 = 2,
  kFp8E4M3 = 3,
  kFp8E5M2 = 4,
  kInt8 = 5,
  kInt4 = 6,
};

// Where the quantization scale (and zero point) comes from.
enum class KvScaleMode : uint8_t {
  kNone = 0,     // plain cast (fp32/fp16/bf16, fp8_e5m2 plain)
  kStatic = 1,   // per-layer (optionally per-kv-head) scale/zero from a params file
  kDynamic = 2,  // per token per kv-head, computed at write time, stored in the block
};

struct KvFormat {
  KvDtype dtype = KvDtype::kFp32;
  KvScaleMode scale_mode = KvScaleMode::kNone;
  friend constexpr bool operator==(KvFormat a, KvFormat b) {
    return a.dtype == b.dtype && a.scale_mode == b.scale_mode;
  }
};

constexpr int kKvSectionAlign = 16;  // every section of a block starts 16-byte aligned

STRATA_HD constexpr int64_t AlignUp(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

// Bits of one cached element.
STRATA_HD constexpr int KvDtypeBits(KvDtype d) {
  switch (d) {
    case KvDtype::kFp32: return 32;
    case KvDtype::kFp16:
    case KvDtype::kBf16: return 16;
    case KvDtype::kFp8E4M3:
    case KvDtype::kFp8E5M2:
    case KvDtype::kInt8: return 8;
    case KvDtype::kInt4: return 4;
  }
  return 0;
}

STRATA_HD constexpr bool KvDtypeIsInteger(KvDtype d) {
  return d == KvDtype::kInt8 || d == KvDtype::kInt4;
}

// True for the combinations Strata implements. Everything else is rejected at
// start-up with UNIMPLEMENTED (see ValidateKvFormat in kv_format_util.h).
STRATA_HD constexpr bool KvFormatSupported(KvFormat f) {
  switch (f.dtype) {
    case KvDtype::kFp32:
    case KvDtype::kFp16:
    case KvDtype::kBf16: return f.scale_mode == KvScaleMode::kNone;
    case KvDtype::kFp8E5M2: return f.scale_mode != KvScaleMode::kDynamic;
    case KvDtype::kFp8E4M3: return f.scale_mode != KvScaleMode::kNone;
    case KvDtype::kInt8: return f.scale_mode != KvScaleMode::kNone;
    case KvDtype::kInt4: return f.scale_mode == KvScaleMode::kDynamic;
  }
  return false;
}

// Byte layout of one block of one layer:
//
//   K data   [num_kv_heads][block_size][head_dim]  elements of `dtype`
//            (int4: two per byte, element 2i in the low nibble, 2i+1 high)
//   V data   same shape
//   -- dynamic scale mode only --
//   K scale  [num_kv_heads][block_size]  fp16
//   V scale  [num_kv_heads][block_size]  fp16
//   K zero   [num_kv_heads][block_size]  int8 (int8) / uint8 (int4); integer dtypes only
//   V zero   [num_kv_heads][block_size]  same
//
// Each section starts at a multiple of kKvSectionAlign; block_bytes is a
// multiple of kKvSectionAlign. A block id indexes the same slot in every
// layer's pool: pool(layer) + block_id * block_bytes.
struct KvBlockLayout {
  int32_t block_size = 0;    // tokens per block (power of two)
  int32_t num_kv_heads = 0;  // kv heads held by this shard
  int32_t head_dim = 0;
  KvFormat format;
  uint32_t k_data = 0, v_data = 0;    // section offsets in bytes
  uint32_t k_scale = 0, v_scale = 0;  // 0 size when no per-token scale
  uint32_t k_zero = 0, v_zero = 0;    // 0 size when no per-token zero point
  uint32_t token_bytes = 0;           // bytes of one token-head row of data
  uint32_t block_bytes = 0;

  STRATA_HD constexpr bool has_token_scale() const {
    return format.scale_mode == KvScaleMode::kDynamic;
  }
  STRATA_HD constexpr bool has_token_zero() const {
    return has_token_scale() && KvDtypeIsInteger(format.dtype);
  }
  // Byte offset of token `t` of head `h` inside the K (or V) data section.
  STRATA_HD constexpr uint32_t data_row(int h, int t) const {
    return (static_cast<uint32_t>(h) * block_size + t) * token_bytes;
  }
  // Element index of (head, token) in the scale/zero sections.
  STRATA_HD constexpr uint32_t scale_index(int h, int t) const {
    return static_cast<uint32_t>(h) * block_size + t;
  }
};

STRATA_HD constexpr KvBlockLayout MakeKvBlockLayout(KvFormat format, int block_size,
                                                    int num_kv_heads, int head_dim) {
  KvBlockLayout l;
  l.block_size = block_size;
  l.num_kv_heads = num_kv_heads;
  l.head_dim = head_dim;
  l.format = format;
  l.token_bytes = static_cast<uint32_t>(head_dim * KvDtypeBits(format.dtype) / 8);
  const int64_t data_bytes =
      AlignUp(int64_t{num_kv_heads} * block_size * l.token_bytes, kKvSectionAlign);
  int64_t off = 0;
  l.k_data = static_cast<uint32_t>(off);
  off += data_bytes;
  l.v_data = static_cast<uint32_t>(off);
  off += data_bytes;
  const int64_t per_token = int64_t{num_kv_heads} * block_size;
  if (l.has_token_scale()) {
    const int64_t scale_bytes = AlignUp(per_token * 2, kKvSectionAlign);
    l.k_scale = static_cast<uint32_t>(off);
    off += scale_bytes;
    l.v_scale = static_cast<uint32_t>(off);
    off += scale_bytes;
  }
  if (l.has_token_zero()) {
    const int64_t zero_bytes = AlignUp(per_token, kKvSectionAlign);
    l.k_zero = static_cast<uint32_t>(off);
    off += zero_bytes;
    l.v_zero = static_cast<uint32_t>(off);
    off += zero_bytes;
  }
  l.block_bytes = static_cast<uint32_t>(AlignUp(off, kKvSectionAlign));
  return l;
}

// Exact bytes of one block of one layer. Capacity planning and swap sizing use
// this (times the number of layers) and nothing else.
STRATA_HD constexpr int64_t KvBlockBytes(KvFormat format, int block_size, int num_kv_heads,
                                         int head_dim) {
  return MakeKvBlockLayout(format, block_size, num_kv_heads, head_dim).block_bytes;
}

}  // namespace strata
