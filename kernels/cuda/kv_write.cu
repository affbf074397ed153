// Quantizing cache write: one warp per (token, kv head, K or V) row. The
// element math is qmath::KvCodec (the CPU's), the row min/max are exact warp
// reductions, so the written bytes equal cpu::WriteKvCache's.
#include <cuda_runtime.h>

#include "kernels/cuda/attention_internal.h"
#include "kernels/cuda/kv_dispatch.h"
#include "kernels/quant_math.h"

namespace strata::cuda {
namespace detail {

constexpr int kWriteThreads = 128;

struct WriteParams {
  KvCacheView cache;
  const float* key;
  const float* value;
  const int64_t* slot_mapping;
  int32_t num_tokens;
  int32_t log2_bs;
};

template <KvDtype D, KvScaleMode M, int HD>
__global__ void __launch_bounds__(kWriteThreads) WriteKernel(const WriteParams p) {
  using C = qmath::KvCodec<D, M>;
  constexpr int kPairs = HD / 2;
  constexpr int kPerLane = (kPairs + 31) / 32;
  const KvBlockLayout& lay = p.cache.layout;
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (kWriteThreads / 32) + (threadIdx.x >> 5);
  const int rows_per_token = lay.num_kv_heads * 2;
  if (w >= static_cast<int64_t>(p.num_tokens) * rows_per_token) return;
  const int t = static_cast<int>(w / rows_per_token);
  const int rem = static_cast<int>(w % rows_per_token);
  const int h = rem >> 1;
  const bool is_v = rem & 1;
  const int64_t slot = p.slot_mapping[t];
  if (slot < 0 || slot >= (static_cast<int64_t>(p.cache.num_blocks) << p.log2_bs)) return;

  const float* src = (is_v ? p.value : p.key) + (static_cast<int64_t>(t) * lay.num_kv_heads + h) * HD;
  float2 x[kPerLane];
  float mn = INFINITY, mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int pr = lane + 32 * k;
    if (pr < kPairs) {
      x[k] = reinterpret_cast<const float2*>(src)[pr];
      mn = fminf(mn, fminf(x[k].x, x[k].y));
      mx = fmaxf(mx, fmaxf(x[k].x, x[k].y));
    }
  }
  float s = 1.0f, z = 0.0f;
  const int64_t block = slot >> p.log2_bs;
  const int off = static_cast<int>(slot & ((1 << p.log2_bs) - 1));
  uint8_t* blk = p.cache.pool + block * lay.block_bytes;
  const uint32_t idx = lay.scale_index(h, off);
  if constexpr (M == KvScaleMode::kStatic) {
    s = (is_v ? p.cache.v_scale : p.cache.k_scale)[h];
    if constexpr (KvDtypeIsInteger(D)) z = (is_v ? p.cache.v_zero : p.cache.k_zero)[h];
  } else if constexpr (M == KvScaleMode::kDynamic) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    const qmath::RowParams rp = qmath::DynamicRowParams(D, mn, mx);
    s = rp.scale;
    z = rp.zero;
    if (lane == 0) {
      reinterpret_cast<uint16_t*>(blk + (is_v ? lay.v_scale : lay.k_scale))[idx] = rp.scale_bits;
      if constexpr (KvDtypeIsInteger(D)) blk[(is_v ? lay.v_zero : lay.k_zero) + idx] = rp.zero_bits;
    }
  }
  uint8_t* row = blk + (is_v ? lay.v_data : lay.k_data) + lay.data_row(h, off);
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int pr = lane + 32 * k;
    if (pr >= kPairs) continue;
    const uint32_t c0 = C::Encode(x[k].x, s, z), c1 = C::Encode(x[k].y, s, z);
    if constexpr (C::kBits == 4) {
      row[pr] = static_cast<uint8_t>(c0 | (c1 << 4));
    } else if constexpr (C::kBits == 8) {
      reinterpret_cast<uint16_t*>(row)[pr] = static_cast<uint16_t>(c0 | (c1 << 8));
    } else if constexpr (C::kBits == 16) {
      reinterpret_cast<uint32_t*>(row)[pr] = c0 | (c1 << 16);
    } else {
      reinterpret_cast<uint2*>(row)[pr] = make_uint2(c0, c1);
    }
  }
}

}  // namespace detail

template <KvDtype D, KvScaleMode M, int HD>
cudaError_t WriteOp::Run(const KvCacheView& cache, const float* key, const float* value,
                         const int64_t* slot_mapping, int32_t num_tokens, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  detail::WriteParams p{cache, key, value, slot_mapping, num_tokens,
                        Log2Int(cache.layout.block_size)};
  const int64_t rows = static_cast<int64_t>(num_tokens) * cache.layout.num_kv_heads * 2;
  const int64_t blocks = (rows + detail::kWriteThreads / 32 - 1) / (detail::kWriteThreads / 32);
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  detail::WriteKernel<D, M, HD><<<static_cast<unsigned>(blocks), detail::kWriteThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define STRATA_WRITE_INSTANCES_(D, M)                                                     \
  STRATA_INSTANTIATE_OP(WriteOp, D, M,                                                     \
                        (const KvCacheView&, const float*, const float*, const int64_t*, \
                         int32_t, cudaStream_t))
STRATA_FOR_EACH_KV_FORMAT(STRATA_WRITE_INSTANCES_)
#undef STRATA_WRITE_INSTANCES_

cudaError_t WriteKvCache(KvCacheView cache, const float* key, const float* value,
                         const int64_t* slot_mapping, int32_t num_tokens, cudaStream_t stream) {
  if (num_tokens < 0 || (num_tokens > 0 && (!key || !value || !slot_mapping || !cache.pool))) {
    return cudaErrorInvalidValue;
  }
  return Dispatch<WriteOp>(DescOf(cache), cache, key, value, slot_mapping, num_tokens, stream);
}

}  // namespace strata::cuda
